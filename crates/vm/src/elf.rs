//! Just enough of ELF to put airlock's own executable into the guest: the
//! program interpreter it names, and the part of the file the loader maps.
//!
//! A debug build is mostly debug sections (330 MB, of which the loader maps
//! about 60 MB); under software emulation every byte of the initramfs is
//! copied by an emulated CPU, so the guest gets the mapped part only, with no
//! section headers (the loader never reads them). That part is found from
//! the headers and streamed from the file, never read whole into memory.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
/// Xen's ELF note type for the 32-bit PVH entry point, which QEMU uses to
/// boot an uncompressed kernel directly.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// One program header's fields that matter here.
struct Segment {
    kind: u32,
    offset: u64,
    file_size: u64,
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("not a 64-bit little-endian ELF executable: {why}"))
}

fn u16_at(bytes: &[u8], at: usize) -> io::Result<u16> {
    let b = bytes.get(at..at + 2).ok_or_else(|| bad("truncated"))?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(bytes: &[u8], at: usize) -> io::Result<u32> {
    let b = bytes.get(at..at + 4).ok_or_else(|| bad("truncated"))?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(bytes: &[u8], at: usize) -> io::Result<u64> {
    let b = bytes.get(at..at + 8).ok_or_else(|| bad("truncated"))?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_le_bytes(a))
}

/// Where the program header table is: its offset, entry size and count.
fn program_table(bytes: &[u8]) -> io::Result<(u64, usize, usize)> {
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) || bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err(bad("wrong magic, class or byte order"));
    }
    let entry_size = usize::from(u16_at(bytes, 0x36)?);
    if entry_size < 0x38 {
        return Err(bad("program header size"));
    }
    Ok((u64_at(bytes, 0x20)?, entry_size, usize::from(u16_at(bytes, 0x38)?)))
}

fn parse_segments(table: &[u8], entry_size: usize, count: usize) -> io::Result<Vec<Segment>> {
    (0..count)
        .map(|i| {
            let at = i * entry_size;
            Ok(Segment {
                kind: u32_at(table, at)?,
                offset: u64_at(table, at + 8)?,
                file_size: u64_at(table, at + 0x20)?,
            })
        })
        .collect()
}

fn segments(bytes: &[u8]) -> io::Result<Vec<Segment>> {
    let (offset, entry_size, count) = program_table(bytes)?;
    let table =
        usize::try_from(offset).ok().and_then(|at| bytes.get(at..)).ok_or_else(|| bad("truncated"))?;
    parse_segments(table, entry_size, count)
}

fn interpreter_name(raw: &[u8]) -> io::Result<String> {
    let text = raw.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8(text.to_vec()).map_err(|_| bad("interpreter path is not UTF-8"))
}

/// The program interpreter (dynamic loader) the executable names, if any.
pub fn interpreter(bytes: &[u8]) -> io::Result<Option<String>> {
    let Some(interp) = segments(bytes)?.into_iter().find(|s| s.kind == PT_INTERP) else { return Ok(None) };
    let start = usize::try_from(interp.offset).map_err(|_| bad("interpreter offset"))?;
    let end = start + usize::try_from(interp.file_size).map_err(|_| bad("interpreter size"))?;
    let raw = bytes.get(start..end).ok_or_else(|| bad("interpreter outside the file"))?;
    interpreter_name(raw).map(Some)
}

/// The most of a kernel's notes read (Linux's are a few hundred bytes).
const MAX_NOTES: u64 = 64 * 1024;

/// Whether an uncompressed kernel (`vmlinux`) has a PVH entry point, so
/// that QEMU can start it without its decompressor: its notes are read
/// from the file, not the whole kernel.
pub fn has_pvh_entry(file: &File) -> io::Result<bool> {
    let (_, _, segments) = file_segments(file)?;
    for note in segments.into_iter().filter(|s| s.kind == PT_NOTE) {
        if note.file_size > MAX_NOTES {
            return Err(bad("notes too large"));
        }
        let mut notes = vec![0u8; note.file_size as usize];
        file.read_exact_at(&mut notes, note.offset).map_err(|_| bad("notes outside the file"))?;
        let mut at = 0;
        while at + 12 <= notes.len() {
            let name_size = u32_at(&notes, at)? as usize;
            let desc_size = u32_at(&notes, at + 4)? as usize;
            let kind = u32_at(&notes, at + 8)?;
            let name = notes.get(at + 12..at + 12 + name_size).unwrap_or_default();
            if kind == XEN_ELFNOTE_PHYS32_ENTRY && name.starts_with(b"Xen") {
                return Ok(true);
            }
            at += 12 + name_size.next_multiple_of(4) + desc_size.next_multiple_of(4);
        }
    }
    Ok(false)
}

/// A file's ELF header and its program headers, read from their places:
/// the header, where the program header table ends, and the segments.
fn file_segments(file: &File) -> io::Result<([u8; ELF_HEADER], u64, Vec<Segment>)> {
    let mut header = [0u8; ELF_HEADER];
    file.read_exact_at(&mut header, 0).map_err(|_| bad("truncated"))?;
    let (table_offset, entry_size, count) = program_table(&header)?;
    let mut table = vec![0u8; entry_size * count];
    file.read_exact_at(&mut table, table_offset).map_err(|_| bad("program headers outside the file"))?;
    let segments = parse_segments(&table, entry_size, count)?;
    Ok((header, table_offset + table.len() as u64, segments))
}

/// The ELF header's size (64-bit), which the cut's reader rewrites.
const ELF_HEADER: usize = 0x40;

/// The longest interpreter path read (the kernel's own limit).
const MAX_INTERPRETER: u64 = 4096;

/// What the loader maps of an executable file, found from its headers: the
/// file's first [`Loadable::len`] bytes, without section headers (the
/// loader never reads them). The file is never held whole: its other bytes
/// are only streamed by [`Loadable::reader`] (a debug build of airlock is
/// hundreds of MB, which its supervisor would otherwise hold at once).
pub struct Loadable {
    /// The ELF header, its section headers' fields cleared.
    header: [u8; ELF_HEADER],
    /// Bytes from the start of the file to the last any segment covers.
    pub len: u64,
    /// The program interpreter (dynamic loader) it names, if any.
    pub interpreter: Option<String>,
}

impl Loadable {
    /// Reads `file`'s ELF and program headers (and its interpreter's name).
    pub fn of(file: &File) -> io::Result<Loadable> {
        let (mut header, table_end, segments) = file_segments(file)?;
        if !segments.iter().any(|s| s.kind == PT_LOAD) {
            return Err(bad("no loadable segment"));
        }
        let mut len = table_end;
        for s in &segments {
            len = len.max(s.offset.checked_add(s.file_size).ok_or_else(|| bad("segment size"))?);
        }
        if len > file.metadata()?.len() {
            return Err(bad("a segment lies outside the file"));
        }
        let interpreter = match segments.iter().find(|s| s.kind == PT_INTERP) {
            Some(s) if s.file_size <= MAX_INTERPRETER => {
                let mut raw = vec![0u8; s.file_size as usize];
                file.read_exact_at(&mut raw, s.offset).map_err(|_| bad("interpreter outside the file"))?;
                Some(interpreter_name(&raw)?)
            }
            Some(_) => return Err(bad("interpreter path too long")),
            None => None,
        };
        // e_shoff, e_shnum, e_shstrndx: no section headers.
        header[0x28..0x30].fill(0);
        header[0x3c..0x40].fill(0);
        Ok(Loadable { header, len: len.max(ELF_HEADER as u64), interpreter })
    }

    /// The cut executable's [`Loadable::len`] bytes: the rewritten header,
    /// then `file`'s own bytes after it.
    pub fn reader(
        &self,
        mut file: File,
    ) -> io::Result<io::Chain<io::Cursor<[u8; ELF_HEADER]>, io::Take<File>>> {
        file.seek(SeekFrom::Start(ELF_HEADER as u64))?;
        Ok(io::Cursor::new(self.header).chain(file.take(self.len - ELF_HEADER as u64)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The test binary as [`Loadable`] cuts it.
    fn cut_test_binary() -> Vec<u8> {
        let exe = File::open("/proc/self/exe").unwrap();
        let loadable = Loadable::of(&exe).unwrap();
        let mut cut = Vec::new();
        loadable.reader(exe).unwrap().read_to_end(&mut cut).unwrap();
        assert_eq!(cut.len() as u64, loadable.len);
        cut
    }

    #[test]
    fn the_test_binary_names_its_loader_and_shrinks() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let interp = interpreter(&exe).unwrap().unwrap();
        assert!(interp.contains("ld-linux"), "{interp}");
        let loadable = Loadable::of(&File::open("/proc/self/exe").unwrap()).unwrap();
        assert_eq!(loadable.interpreter.as_deref(), Some(interp.as_str()));
        let cut = cut_test_binary();
        assert!(cut.len() < exe.len(), "a debug build has sections the loader never maps");
        assert_eq!(interpreter(&cut).unwrap().unwrap(), interp);
        assert_eq!(u16_at(&cut, 0x3c).unwrap(), 0);
        // Beyond the header, the file's own bytes.
        assert_eq!(cut[ELF_HEADER..], exe[ELF_HEADER..cut.len()]);
    }

    #[test]
    fn the_cut_executable_still_runs() {
        let dir = tempfile::tempdir().unwrap();
        let cut = cut_test_binary();
        let path = dir.path().join("cut");
        std::fs::write(&path, cut).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let out = std::process::Command::new(&path).arg("--list").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("the_cut_executable_still_runs"));
    }

    /// An ELF header, one PT_NOTE program header and the notes it covers.
    fn elf_with_notes(notes: &[(&[u8], u32)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, kind) in notes {
            body.extend_from_slice(&(name.len() as u32).to_le_bytes());
            body.extend_from_slice(&4u32.to_le_bytes());
            body.extend_from_slice(&kind.to_le_bytes());
            body.extend_from_slice(name);
            body.resize(body.len().next_multiple_of(4), 0);
            body.extend_from_slice(&[1, 2, 3, 4]);
        }
        let mut elf = vec![0u8; 0x40 + 0x38];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[0x40..0x44].copy_from_slice(&PT_NOTE.to_le_bytes());
        elf[0x48..0x50].copy_from_slice(&(0x78u64).to_le_bytes());
        elf[0x60..0x68].copy_from_slice(&(body.len() as u64).to_le_bytes());
        elf.extend_from_slice(&body);
        elf
    }

    #[test]
    fn the_pvh_entry_is_found_among_the_kernels_notes() {
        let dir = tempfile::tempdir().unwrap();
        let pvh = |elf: Vec<u8>| {
            let path = dir.path().join("vmlinux");
            std::fs::write(&path, elf).unwrap();
            has_pvh_entry(&File::open(&path).unwrap()).unwrap()
        };
        assert!(pvh(elf_with_notes(&[(b"GNU\0", 3), (b"Xen\0", 6), (b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY)])));
        assert!(!pvh(elf_with_notes(&[(b"GNU\0", 3), (b"Xen\0", 6)])));
        // The type alone is not enough: it must be Xen's note.
        assert!(!pvh(elf_with_notes(&[(b"GNU\0", XEN_ELFNOTE_PHYS32_ENTRY)])));
    }

    #[test]
    fn garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [("script", &b"#!/bin/sh\n"[..]), ("notes-only", &elf_with_notes(&[])[..])] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            assert!(Loadable::of(&File::open(&path).unwrap()).is_err(), "{name}");
        }
        assert!(interpreter(b"\x7fELF\x02\x01").is_err());
    }
}
