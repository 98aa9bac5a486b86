//! A process's memory as the kernel accounts it: `/proc/PID/smaps` read
//! mapping by mapping, so that a QEMU's resident memory can be split into
//! the guest's RAM (one mapping of exactly the guest's size: anonymous
//! memory, or a memfd when the guest's RAM is shared with a vhost-user
//! helper such as virtiofsd) and what QEMU costs beyond it.

/// One mapping of `/proc/PID/smaps`: its header and the fields we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// `rwxp`-style permissions.
    pub perms: String,
    /// The file it maps, or a pseudo-name (`[heap]`, `[stack]`), or empty
    /// for anonymous memory.
    pub path: String,
    pub size_kib: u64,
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// Anonymous pages: of an anonymous mapping, or copied on write in a
    /// private file mapping.
    pub anon_kib: u64,
}

impl Mapping {
    fn anonymous(&self) -> bool {
        self.path.is_empty()
    }

    /// Memory QEMU can give a guest as its RAM: anonymous, or a memfd
    /// (`/memfd:NAME (deleted)`), which QEMU shares with vhost-user helpers.
    fn ram_like(&self) -> bool {
        self.anonymous() || self.path.starts_with("/memfd:")
    }

    fn file_backed(&self) -> bool {
        self.path.starts_with('/')
    }

    fn executable(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }
}

/// Parses the text of `/proc/PID/smaps`. A header line is `start-end perms
/// offset dev inode [path]`; the lines after it are `Key: value kB`.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(header) = parse_header(line) {
            maps.push(header);
            continue;
        }
        let Some(current) = maps.last_mut() else { continue };
        let Some((key, rest)) = line.split_once(':') else { continue };
        let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        match key {
            "Size" => current.size_kib = value,
            "Rss" => current.rss_kib = value,
            "Pss" => current.pss_kib = value,
            "Anonymous" => current.anon_kib = value,
            _ => {}
        }
    }
    maps
}

fn parse_header(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let (start, end) = range.split_once('-')?;
    if start.is_empty() || !start.chars().chain(end.chars()).all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    // offset, device, inode; the path (which may hold spaces) is the rest.
    let (_offset, _dev, _inode) = (fields.next()?, fields.next()?, fields.next()?);
    let path = fields.next().unwrap_or("").trim().to_string();
    Some(Mapping { perms: perms.to_string(), path, size_kib: 0, rss_kib: 0, pss_kib: 0, anon_kib: 0 })
}

/// A QEMU's resident memory, KiB, split by what holds it. The classes do
/// not overlap and add up to the total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QemuMemory {
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// Resident pages of the guest's RAM: the anonymous or memfd mapping
    /// whose size is exactly the guest's memory (None when there is no such
    /// mapping, and then nothing is counted as guest RAM).
    pub guest_ram_kib: Option<u64>,
    /// TCG's translated code: anonymous, executable (none under KVM).
    pub translation_kib: u64,
    /// File-backed mappings: QEMU's binary and libraries, and the guest
    /// kernel image QEMU keeps mapped (page cache, shared with whoever else
    /// maps the same files; its PSS share is in `file_pss_kib`); memfds
    /// other than the guest's RAM too.
    pub file_kib: u64,
    pub file_pss_kib: u64,
    /// Everything else: QEMU's heap, thread stacks, device state.
    pub other_kib: u64,
    /// Anonymous pages outside the guest's RAM: memory QEMU itself wrote,
    /// which (unlike clean file pages) cannot be dropped and re-read.
    pub anon_beyond_guest_kib: u64,
}

impl QemuMemory {
    /// What QEMU holds beyond the guest's RAM (RSS).
    pub fn beyond_guest_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_ram_kib.unwrap_or(0))
    }

    /// The same, with file pages counted by their PSS share.
    pub fn beyond_guest_pss_kib(&self) -> u64 {
        self.pss_kib.saturating_sub(self.guest_ram_kib.unwrap_or(0))
    }
}

/// Splits the mappings of a QEMU (or of a helper that maps the guest's RAM,
/// such as virtiofsd); `guest_mib` is the guest's memory (QEMU's `-m`).
pub fn qemu_memory(maps: &[Mapping], guest_mib: u64) -> QemuMemory {
    let guest_kib = guest_mib * 1024;
    // The guest's RAM: one anonymous or memfd, writable, non-executable
    // mapping of exactly its size. If two qualify (a coincidence of sizes),
    // the larger resident one is the RAM the guest has been using.
    let ram = maps
        .iter()
        .enumerate()
        .filter(|(_, m)| {
            m.ram_like() && m.size_kib == guest_kib && m.perms.starts_with("rw") && !m.executable()
        })
        .max_by_key(|(_, m)| m.rss_kib)
        .map(|(i, _)| i);
    let mut q = QemuMemory::default();
    for (i, m) in maps.iter().enumerate() {
        q.rss_kib += m.rss_kib;
        q.pss_kib += m.pss_kib;
        if Some(i) == ram {
            q.guest_ram_kib = Some(m.rss_kib);
            continue;
        }
        q.anon_beyond_guest_kib += m.anon_kib;
        if m.anonymous() && m.executable() {
            q.translation_kib += m.rss_kib;
        } else if m.file_backed() {
            q.file_kib += m.rss_kib;
            q.file_pss_kib += m.pss_kib;
        } else {
            q.other_kib += m.rss_kib;
        }
    }
    q
}

/// PSS and RSS (KiB) of one process, from `/proc/PID/smaps_rollup`.
pub fn pss_rss(pid: i32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_rollup(&text)
}

/// `Pss:` and `Rss:` of an smaps_rollup text.
pub fn parse_rollup(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("Pss:")?, field("Rss:")?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Shortened from a real QEMU (7.2, `-m 512M`, TCG) on the development
    /// machine.
    const QEMU_SMAPS: &str = "\
5581e0a00000-5581e0c9e000 r--p 00000000 fe:00 1837094                    /usr/bin/qemu-system-x86_64
Size:               2680 kB
KernelPageSize:        4 kB
Rss:                2600 kB
Pss:                1300 kB
Pss_Dirty:             0 kB
5581e2a00000-5581e3b00000 rw-p 00000000 00:00 0                          [heap]
Size:              17408 kB
Rss:               12000 kB
Pss:               12000 kB
Anonymous:         12000 kB
7fb38fe00000-7fb393cdb000 rw-p 00000000 fe:00 10018936                   /var/cache/airlock/vm/guest/vmlinux
Size:              64364 kB
Rss:               61440 kB
Pss:               30720 kB
7fb393e00000-7fb3b3e00000 rw-p 00000000 00:00 0 
Size:             524288 kB
Rss:               92160 kB
Pss:               92160 kB
Anonymous:         92160 kB
7fb3b4000000-7fb3bbfff000 rwxp 00000000 00:00 0 
Size:             131068 kB
Rss:                8192 kB
Pss:                8192 kB
Anonymous:          8192 kB
7fb3bc021000-7fb3c0000000 ---p 00000000 00:00 0 
Size:              65404 kB
Rss:                   0 kB
Pss:                   0 kB
7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  40 kB
Pss:                  40 kB
";

    #[test]
    fn smaps_headers_and_fields_are_read() {
        let maps = parse_smaps(QEMU_SMAPS);
        assert_eq!(maps.len(), 7);
        assert_eq!(maps[0].path, "/usr/bin/qemu-system-x86_64");
        assert_eq!((maps[0].size_kib, maps[0].rss_kib, maps[0].pss_kib), (2680, 2600, 1300));
        assert_eq!(maps[1].path, "[heap]");
        assert_eq!(maps[3].path, "");
        assert_eq!(maps[4].perms, "rwxp");
        assert_eq!(maps[6].rss_kib, 40);
    }

    #[test]
    fn a_path_with_spaces_is_kept_whole() {
        let maps = parse_smaps("7f00-7f10 r--p 00000000 fe:00 12 /tmp/a dir/lib.so (deleted)\nRss: 8 kB\n");
        assert_eq!(maps[0].path, "/tmp/a dir/lib.so (deleted)");
        assert_eq!(maps[0].rss_kib, 8);
    }

    #[test]
    fn qemu_splits_into_guest_ram_translation_files_and_the_rest() {
        let q = qemu_memory(&parse_smaps(QEMU_SMAPS), 512);
        assert_eq!(q.rss_kib, 2600 + 12000 + 61440 + 92160 + 8192 + 40);
        assert_eq!(q.guest_ram_kib, Some(92160));
        assert_eq!(q.translation_kib, 8192);
        assert_eq!(q.file_kib, 2600 + 61440);
        assert_eq!(q.file_pss_kib, 1300 + 30720);
        assert_eq!(q.other_kib, 12000 + 40);
        assert_eq!(q.guest_ram_kib.unwrap() + q.translation_kib + q.file_kib + q.other_kib, q.rss_kib);
        assert_eq!(q.beyond_guest_kib(), q.rss_kib - 92160);
        assert_eq!(q.beyond_guest_pss_kib(), q.pss_kib - 92160);
        // The heap and the translated code; the kernel image is clean.
        assert_eq!(q.anon_beyond_guest_kib, 12000 + 8192);
    }

    #[test]
    fn without_a_mapping_of_the_guests_size_nothing_counts_as_guest_ram() {
        let q = qemu_memory(&parse_smaps(QEMU_SMAPS), 1024);
        assert_eq!(q.guest_ram_kib, None);
        assert_eq!(q.beyond_guest_kib(), q.rss_kib);
        // The 512 MiB mapping is then just anonymous memory.
        assert_eq!(q.other_kib, 12000 + 40 + 92160);
    }

    #[test]
    fn guest_ram_shared_through_a_memfd_is_guest_ram_too() {
        let shared = QEMU_SMAPS.replace(
            "7fb393e00000-7fb3b3e00000 rw-p 00000000 00:00 0 ",
            "7fb393e00000-7fb3b3e00000 rw-s 00000000 00:01 4242                       /memfd:ram (deleted)",
        );
        let q = qemu_memory(&parse_smaps(&shared), 512);
        assert_eq!(q.guest_ram_kib, Some(92160));
        assert_eq!(q.file_kib, 2600 + 61440);
        // A file of the guest's size is not its RAM.
        let file = QEMU_SMAPS.replace(
            "7fb393e00000-7fb3b3e00000 rw-p 00000000 00:00 0 ",
            "7fb393e00000-7fb3b3e00000 rw-p 00000000 fe:00 77                         /srv/disk.img",
        );
        assert_eq!(qemu_memory(&parse_smaps(&file), 512).guest_ram_kib, None);
    }

    #[test]
    fn rollup_fields_are_read() {
        let text =
            "55d0-7ffe ---p 00000000 00:00 0 [rollup]\nRss: 10872 kB\nPss: 3120 kB\nPss_Anon: 900 kB\n";
        assert_eq!(parse_rollup(text), Some((3120, 10872)));
        assert_eq!(parse_rollup("Rss: 1 kB\n"), None);
    }

    #[test]
    fn own_memory_is_readable() {
        let (pss, rss) = pss_rss(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert!(pss > 0 && rss >= pss, "pss {pss} rss {rss}");
        let maps = parse_smaps(&std::fs::read_to_string("/proc/self/smaps").unwrap());
        assert!(maps.iter().any(Mapping::file_backed), "{maps:?}");
        assert!(maps.iter().map(|m| m.rss_kib).sum::<u64>() > 0);
    }
}
