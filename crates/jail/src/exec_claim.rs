//! Reading what a process claims in an exec call: its program, arguments
//! and working directory, from its memory and from /proc, all of it
//! hostile input. Every read is bounded (pages at a time, a budget per
//! call), every value is cut with a marker, and nothing is interpreted
//! beyond finding the terminating NUL bytes and pointers.
//!
//! The memory is read through a [`Memory`], so that the reading itself is
//! tested here against hostile layouts without a second process.

use std::io;

use airlock_proto::exec_record::{Claimed, KEEP_PER_ITEM, KEEP_PER_LIST, cut_item, more_items};

/// Another process's memory.
pub trait Memory {
    /// Copies what is readable at `address` into `buf`: how many bytes
    /// arrived (fewer where the range runs into unmapped memory).
    fn read(&self, address: u64, buf: &mut [u8]) -> io::Result<usize>;
}

/// A process's memory, read with process_vm_readv (by its pid in the
/// reader's view).
pub struct ProcessMemory(pub i32);

impl Memory for ProcessMemory {
    fn read(&self, address: u64, buf: &mut [u8]) -> io::Result<usize> {
        crate::sys::process_vm_read(self.0, address, buf)
    }
}

/// Reads are split at page boundaries, so that one unmapped page ends a
/// read exactly where it starts.
const PAGE: u64 = 4096;
/// Bytes read from the process per exec call, pointers and strings
/// together: past it, lengths are given as "at least".
pub const READ_BUDGET: usize = 1 << 20;
/// The first read of a string; longer ones continue a page at a time.
const FIRST_READ: usize = 256;
/// Argument pointers followed per call; past them, "at least".
pub const MAX_POINTERS: usize = 16_384;

/// What a process's argv and program were at the time of its call.
#[derive(Debug, Default, PartialEq)]
pub struct Claim {
    pub program: Option<Claimed>,
    pub argv: Vec<Claimed>,
    pub argc: u64,
    /// Why something could not be read.
    pub unreadable: Option<String>,
}

/// Reads up to `buf.len()` bytes at `address`, one page at a time; stops
/// at the first page that cannot be read. The count read.
fn read_paged(mem: &dyn Memory, address: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = address.checked_add(done as u64).ok_or(io::ErrorKind::InvalidInput)?;
        let to_page_end = (PAGE - at % PAGE) as usize;
        let want = to_page_end.min(buf.len() - done);
        let got = match mem.read(at, &mut buf[done..done + want]) {
            Ok(n) => n,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        };
        done += got;
        if got < want {
            break;
        }
    }
    Ok(done)
}

/// A NUL-terminated string at `address`: its first `keep` bytes, its length
/// as far as `budget` let it be scanned, and whether the NUL was found.
pub fn read_string(
    mem: &dyn Memory,
    address: u64,
    keep: usize,
    budget: &mut usize,
) -> io::Result<(Vec<u8>, u64, bool)> {
    let mut kept = Vec::new();
    let mut length = 0u64;
    let mut chunk = [0u8; PAGE as usize];
    loop {
        if *budget == 0 {
            return Ok((kept, length, false));
        }
        let at = address.checked_add(length).ok_or(io::ErrorKind::InvalidInput)?;
        // Most strings are short: a small first read, then whole pages.
        let first = if length == 0 { FIRST_READ } else { PAGE as usize };
        let want = ((PAGE - at % PAGE) as usize).min(*budget).min(first);
        let got = read_paged(mem, at, &mut chunk[..want])?;
        *budget -= got;
        if got == 0 {
            // Unmapped memory before a NUL: the kernel refuses such a call.
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        let part = &chunk[..got];
        let end = part.iter().position(|&b| b == 0);
        let used = end.unwrap_or(got);
        if kept.len() < keep {
            kept.extend_from_slice(&part[..used.min(keep - kept.len())]);
        }
        length += used as u64;
        if end.is_some() {
            return Ok((kept, length, true));
        }
    }
}

/// The pointers of a NULL-terminated array at `address` (an argv), at most
/// `max`; whether its end was found.
pub fn read_pointers(
    mem: &dyn Memory,
    address: u64,
    max: usize,
    budget: &mut usize,
) -> io::Result<(Vec<u64>, bool)> {
    let mut out = Vec::new();
    let mut chunk = [0u8; PAGE as usize];
    let mut at = address;
    if address == 0 {
        // execve(path, NULL, …): Linux takes it as an empty argv.
        return Ok((out, true));
    }
    while out.len() < max && *budget >= 8 {
        let want = ((PAGE - at % PAGE) as usize).min(*budget) / 8 * 8;
        let want = if want == 0 { 8 } else { want };
        let got = read_paged(mem, at, &mut chunk[..want])?;
        *budget = budget.saturating_sub(got);
        if got < 8 {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        for word in chunk[..got - got % 8].chunks_exact(8) {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(word);
            let pointer = u64::from_ne_bytes(raw);
            if pointer == 0 {
                return Ok((out, true));
            }
            out.push(pointer);
            if out.len() == max {
                return Ok((out, false));
            }
        }
        at = at.checked_add((got - got % 8) as u64).ok_or(io::ErrorKind::InvalidInput)?;
    }
    Ok((out, false))
}

/// Reads a call's program (`program_at`) and argv (`argv_at`), capped.
pub fn read_claim(mem: &dyn Memory, program_at: u64, argv_at: u64) -> Claim {
    let mut budget = READ_BUDGET;
    let mut claim = Claim::default();
    match read_string(mem, program_at, KEEP_PER_ITEM, &mut budget) {
        Ok((bytes, len, complete)) => claim.program = Some(cut_item(bytes, len, complete)),
        Err(e) => claim.unreadable = Some(format!("the program's name: {e}")),
    }
    let (pointers, all) = match read_pointers(mem, argv_at, MAX_POINTERS, &mut budget) {
        Ok(found) => found,
        Err(e) => {
            claim.unreadable.get_or_insert_with(|| format!("the argument list: {e}"));
            return claim;
        }
    };
    claim.argc = pointers.len() as u64;
    let mut used = 0usize;
    let mut cut_from = None;
    let mut cut_bytes = 0u64;
    let mut complete = all;
    for (i, &pointer) in pointers.iter().enumerate() {
        match read_string(mem, pointer, KEEP_PER_ITEM, &mut budget) {
            Ok((bytes, len, whole)) => {
                complete &= whole;
                let item = cut_item(bytes, len, whole);
                if cut_from.is_none() && used + item.as_bytes().len() > KEEP_PER_LIST {
                    cut_from = Some(i);
                }
                if cut_from.is_some() {
                    cut_bytes += len;
                } else {
                    used += item.as_bytes().len();
                    claim.argv.push(item);
                }
            }
            Err(e) => {
                claim.unreadable.get_or_insert_with(|| format!("argument {i}: {e}"));
                complete = false;
                break;
            }
        }
    }
    if let Some(from) = cut_from {
        claim.argv.push(more_items((pointers.len() - from) as u64, cut_bytes, complete));
    } else if !all {
        claim.argv.push(more_items(0, 0, false));
    }
    claim
}

/// The fields of `/proc/PID/status` the trace needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Status {
    /// The thread group, in the reader's PID namespace.
    pub tgid: i32,
    /// Its parent there.
    pub ppid: i32,
    /// The thread group in each PID namespace, outermost first (`NStgid`).
    pub nstgid: Vec<i32>,
}

impl Status {
    /// The process as the sandbox sees it: its innermost pid.
    pub fn inner(&self) -> i32 {
        self.nstgid.last().copied().unwrap_or(0)
    }
}

/// Parses `/proc/PID/status` (kernel-written text, read from a file the
/// process cannot change; still parsed strictly).
pub fn parse_status(text: &str) -> Option<Status> {
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let number = |name: &str| field(name)?.parse::<i32>().ok();
    let nstgid =
        field("NStgid:")?.split_whitespace().map(str::parse::<i32>).collect::<Result<Vec<_>, _>>().ok()?;
    Some(Status { tgid: number("Tgid:")?, ppid: number("PPid:")?, nstgid })
}

/// Field `n` (counted from 1) of `/proc/PID/stat`, from the third on:
/// counted after the command name, which may hold anything.
fn stat_field(text: &str, n: usize) -> Option<&str> {
    let after_name = &text[text.rfind(')')? + 1..];
    after_name.split_whitespace().nth(n.checked_sub(3)?)
}

/// The wait status in the `exit_code` field of `/proc/PID/stat` (the 52nd).
pub fn stat_exit_code(text: &str) -> Option<i32> {
    stat_field(text, 52)?.parse().ok()
}

/// What `/proc/PID/stat` says of a process that may have ended: when it
/// started (clock ticks after boot, the 22nd field: with its pid, it names
/// one process) and whether it has ended (a zombie, state `Z` or `X`).
pub fn stat_start_and_end(text: &str) -> Option<(u64, bool)> {
    let start = stat_field(text, 22)?.parse().ok()?;
    let ended = matches!(stat_field(text, 3)?, "Z" | "X");
    Some((start, ended))
}

/// (code, signal) of a wait status.
pub fn decode_wait_status(status: i32) -> (Option<i32>, Option<i32>) {
    if status & 0x7f == 0 { (Some((status >> 8) & 0xff), None) } else { (None, Some(status & 0x7f)) }
}

/// `name` made absolute against `base` (a directory), by name only.
pub fn absolute(base: Option<&[u8]>, name: &[u8]) -> Vec<u8> {
    if name.starts_with(b"/") {
        return name.to_vec();
    }
    let mut out = base.unwrap_or(b"?").to_vec();
    if !out.ends_with(b"/") {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

/// The program an execve or execveat names (`args` the call's arguments),
/// made absolute by name against the caller's working directory `cwd` or,
/// for execveat, the directory its descriptor names (`dir_of(fd)` reads
/// that descriptor's link; links are not resolved).
pub fn program_path(
    execveat: bool,
    args: &[u64; 6],
    named: &Claimed,
    cwd: Option<&[u8]>,
    dir_of: impl FnOnce(i32) -> Option<Vec<u8>>,
) -> Claimed {
    let name = named.as_bytes();
    if !execveat || name.starts_with(b"/") {
        return Claimed(absolute(cwd, name));
    }
    // The directory is a descriptor (an `int`), or AT_FDCWD.
    let dirfd = args[0] as u32 as i32;
    let empty_path = args[4] & libc::AT_EMPTY_PATH as u64 != 0;
    let dir = if dirfd == libc::AT_FDCWD { cwd.map(<[u8]>::to_vec) } else { dir_of(dirfd) };
    if name.is_empty() && empty_path {
        return Claimed(dir.unwrap_or_else(|| format!("(descriptor {dirfd})").into_bytes()));
    }
    Claimed(absolute(dir.as_deref(), name))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::collections::BTreeMap;

    /// execve names a path against the working directory; execveat against
    /// its descriptor's directory, or is the descriptor itself (AT_EMPTY_PATH).
    #[test]
    fn the_program_is_named_against_the_directory_its_call_means() {
        let named = |n: &str| Claimed(n.as_bytes().to_vec());
        let dir_of = |fd: i32| (fd == 7).then(|| b"/opt/tools".to_vec());
        let cwd = Some(&b"/work"[..]);
        let path =
            |execveat, args: [u64; 6], n: &str| program_path(execveat, &args, &named(n), cwd, dir_of).0;
        assert_eq!(path(false, [0; 6], "bin/make"), b"/work/bin/make");
        assert_eq!(path(false, [0; 6], "/usr/bin/make"), b"/usr/bin/make");
        assert_eq!(path(true, [7, 0, 0, 0, 0, 0], "make"), b"/opt/tools/make");
        let at_cwd = libc::AT_FDCWD as u32 as u64;
        assert_eq!(path(true, [at_cwd, 0, 0, 0, 0, 0], "make"), b"/work/make");
        let empty = libc::AT_EMPTY_PATH as u64;
        assert_eq!(path(true, [7, 0, 0, 0, empty, 0], ""), b"/opt/tools");
        assert_eq!(path(true, [9, 0, 0, 0, empty, 0], ""), b"(descriptor 9)");
    }

    /// Memory of mapped pages at page-aligned addresses; the rest faults.
    #[derive(Default)]
    struct Pages(BTreeMap<u64, Vec<u8>>);

    impl Pages {
        fn put(&mut self, address: u64, bytes: &[u8]) {
            for (i, b) in bytes.iter().enumerate() {
                let at = address + i as u64;
                let page = self.0.entry(at / PAGE * PAGE).or_insert_with(|| vec![0; PAGE as usize]);
                page[(at % PAGE) as usize] = *b;
            }
        }
        fn pointers(&mut self, address: u64, list: &[u64]) {
            let bytes: Vec<u8> = list.iter().flat_map(|p| p.to_ne_bytes()).collect();
            self.put(address, &bytes);
        }
    }

    impl Memory for Pages {
        fn read(&self, address: u64, buf: &mut [u8]) -> io::Result<usize> {
            let mut n = 0;
            while n < buf.len() {
                let at = address + n as u64;
                let Some(page) = self.0.get(&(at / PAGE * PAGE)) else { break };
                buf[n] = page[(at % PAGE) as usize];
                n += 1;
            }
            if n == 0 { Err(io::Error::from_raw_os_error(libc::EFAULT)) } else { Ok(n) }
        }
    }

    const STRINGS: u64 = 0x10_0000;
    const ARGV: u64 = 0x20_0000;

    fn with_args(args: &[&[u8]]) -> Pages {
        let mut mem = Pages::default();
        let mut at = STRINGS;
        let mut pointers = Vec::new();
        for a in args {
            mem.put(at, a);
            mem.put(at + a.len() as u64, &[0]);
            pointers.push(at);
            at += a.len() as u64 + 1;
        }
        pointers.push(0);
        mem.pointers(ARGV, &pointers);
        mem
    }

    #[test]
    fn an_ordinary_call_is_read_exactly() {
        let mem = with_args(&[b"/bin/sh", b"sh", b"-c", b"echo hi"]);
        let claim = read_claim(&mem, STRINGS, ARGV + 8);
        assert_eq!(claim.program, Some(Claimed::from("/bin/sh")));
        assert_eq!(claim.argv, vec![Claimed::from("sh"), "-c".into(), "echo hi".into()]);
        assert_eq!(claim.argc, 3);
        assert_eq!(claim.unreadable, None);
    }

    #[test]
    fn hostile_bytes_are_kept_exact_and_long_ones_cut_with_their_length() {
        let big = vec![b'x'; 100 * 1024];
        let mem = with_args(&[b"/bin/echo", b"\xff\xfe invalid", b"\x1b[2J\r\nforged", &big, b"after"]);
        let claim = read_claim(&mem, STRINGS, ARGV + 8);
        assert_eq!(claim.argv[0].as_bytes(), b"\xff\xfe invalid");
        assert_eq!(claim.argv[1].as_bytes(), b"\x1b[2J\r\nforged");
        let cut = claim.argv[2].as_bytes();
        assert!(cut.len() <= airlock_proto::exec_record::MAX_FIELD);
        assert!(cut.ends_with("…[cut by airlock: 102400 bytes in all]".as_bytes()));
        assert_eq!(claim.argv[3].as_bytes(), b"after");
        assert_eq!(claim.argc, 4);
    }

    #[test]
    fn many_arguments_are_cut_to_the_list_budget_with_a_count() {
        let arg = vec![b'a'; 500];
        let args: Vec<&[u8]> = std::iter::repeat_n(arg.as_slice(), 100).collect();
        let mem = with_args(&args);
        let claim = read_claim(&mem, STRINGS, ARGV);
        assert_eq!(claim.argc, 100);
        let kept: usize = claim.argv.iter().map(|a| a.as_bytes().len()).sum();
        assert!(kept <= airlock_proto::exec_record::MAX_LIST_BYTES, "{kept}");
        let last = String::from_utf8(claim.argv.last().unwrap().0.clone()).unwrap();
        assert!(last.contains("more arguments"), "{last}");
    }

    #[test]
    fn bad_pointers_and_unterminated_memory_are_reported_not_followed() {
        // A program name running off the end of mapped memory.
        let mut mem = Pages::default();
        mem.put(STRINGS, &vec![b'z'; PAGE as usize]);
        mem.pointers(ARGV, &[0xdead_0000, 0]);
        let claim = read_claim(&mem, STRINGS, ARGV);
        assert!(claim.program.is_none());
        assert!(claim.unreadable.as_deref().unwrap().contains("program"), "{claim:?}");
        // An argv pointing nowhere, and argv itself unmapped.
        let mem = with_args(&[b"/bin/true"]);
        let claim = read_claim(&mem, STRINGS, 0x9999_0000);
        assert!(claim.unreadable.as_deref().unwrap().contains("argument list"), "{claim:?}");
        // execve(path, NULL, …) is an empty argv.
        let claim = read_claim(&mem, STRINGS, 0);
        assert_eq!((claim.argc, claim.argv.len(), claim.unreadable), (0, 0, None));
    }

    #[test]
    fn an_endless_argv_stops_at_the_pointer_limit() {
        let mut mem = with_args(&[b"x"]);
        let pointers = vec![STRINGS; MAX_POINTERS + 100];
        mem.pointers(ARGV, &pointers);
        let claim = read_claim(&mem, STRINGS, ARGV);
        assert_eq!(claim.argc, MAX_POINTERS as u64);
        let last = String::from_utf8(claim.argv.last().unwrap().0.clone()).unwrap();
        assert!(last.contains("at least"), "{last}");
    }

    #[test]
    fn a_string_across_pages_is_read_whole() {
        let mut mem = Pages::default();
        let text = b"/usr/lib/some/long/path/that/crosses/a/page";
        let at = 2 * PAGE - 10;
        mem.put(at, text);
        mem.put(at + text.len() as u64, &[0]);
        let mut budget = READ_BUDGET;
        let (kept, len, whole) = read_string(&mem, at, 4096, &mut budget).unwrap();
        assert_eq!((kept.as_slice(), len, whole), (&text[..], text.len() as u64, true));
    }

    #[test]
    fn status_and_stat_are_parsed_strictly() {
        let status =
            "Name:\tsh\nTgid:\t4242\nNgid:\t0\nPid:\t4243\nPPid:\t4200\nNStgid:\t4242\t7\nNSpid:\t4243\t8\n";
        let parsed = parse_status(status).unwrap();
        assert_eq!(parsed, Status { tgid: 4242, ppid: 4200, nstgid: vec![4242, 7] });
        assert_eq!(parsed.inner(), 7);
        assert!(parse_status("Tgid:\tx\nPPid:\t1\nNStgid:\t1\n").is_none());
        // A command name with spaces and parentheses does not shift fields.
        let mut stat = String::from("77 (a) b (c) Z");
        for i in 4..=52 {
            stat.push_str(&format!(" {}", if i == 52 { 768 } else { i }));
        }
        assert_eq!(stat_exit_code(&stat), Some(768));
        assert_eq!(stat_start_and_end(&stat), Some((22, true)));
        assert_eq!(stat_start_and_end(&stat.replacen(") Z", ") S", 1)), Some((22, false)));
        assert!(stat_start_and_end("77 (a) Z 4").is_none());
        assert_eq!(decode_wait_status(768), (Some(3), None));
        assert_eq!(decode_wait_status(9), (None, Some(9)));
        assert_eq!(decode_wait_status(0x8b), (None, Some(11)), "core dumped");
    }

    #[test]
    fn relative_names_are_made_absolute_by_name() {
        assert_eq!(absolute(Some(b"/work"), b"./run.sh"), b"/work/./run.sh");
        assert_eq!(absolute(Some(b"/"), b"x"), b"/x");
        assert_eq!(absolute(Some(b"/w"), b"/usr/bin/env"), b"/usr/bin/env");
    }
}
