//! Just enough of ELF to put airlock's own executable into the guest: the
//! program interpreter it names, and the part of the file the loader maps.
//!
//! A debug build is mostly debug sections (180 MB, of which the loader maps
//! 34 MB); under software emulation every byte of the initramfs is copied by
//! an emulated CPU, so the guest gets the mapped part only, with no section
//! headers (the loader never reads them).

use std::io;

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

fn segments(bytes: &[u8]) -> io::Result<Vec<Segment>> {
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) || bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err(bad("wrong magic, class or byte order"));
    }
    let table = usize::try_from(u64_at(bytes, 0x20)?).map_err(|_| bad("program header offset"))?;
    let entry_size = usize::from(u16_at(bytes, 0x36)?);
    let count = usize::from(u16_at(bytes, 0x38)?);
    if entry_size < 0x38 {
        return Err(bad("program header size"));
    }
    (0..count)
        .map(|i| {
            let at = table + i * entry_size;
            Ok(Segment {
                kind: u32_at(bytes, at)?,
                offset: u64_at(bytes, at + 8)?,
                file_size: u64_at(bytes, at + 0x20)?,
            })
        })
        .collect()
}

/// The program interpreter (dynamic loader) the executable names, if any.
pub fn interpreter(bytes: &[u8]) -> io::Result<Option<String>> {
    let Some(interp) = segments(bytes)?.into_iter().find(|s| s.kind == PT_INTERP) else { return Ok(None) };
    let start = usize::try_from(interp.offset).map_err(|_| bad("interpreter offset"))?;
    let end = start + usize::try_from(interp.file_size).map_err(|_| bad("interpreter size"))?;
    let raw = bytes.get(start..end).ok_or_else(|| bad("interpreter outside the file"))?;
    let text = raw.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8(text.to_vec()).map(Some).map_err(|_| bad("interpreter path is not UTF-8"))
}

/// Whether an uncompressed kernel (`vmlinux`) has a PVH entry point, so
/// that QEMU can start it without its decompressor.
pub fn has_pvh_entry(bytes: &[u8]) -> io::Result<bool> {
    for note in segments(bytes)?.into_iter().filter(|s| s.kind == PT_NOTE) {
        let start = usize::try_from(note.offset).map_err(|_| bad("note offset"))?;
        let end = start + usize::try_from(note.file_size).map_err(|_| bad("note size"))?;
        let notes = bytes.get(start..end).ok_or_else(|| bad("notes outside the file"))?;
        let mut at = 0;
        while at + 12 <= notes.len() {
            let name_size = u32_at(notes, at)? as usize;
            let desc_size = u32_at(notes, at + 4)? as usize;
            let kind = u32_at(notes, at + 8)?;
            let name = notes.get(at + 12..at + 12 + name_size).unwrap_or_default();
            if kind == XEN_ELFNOTE_PHYS32_ENTRY && name.starts_with(b"Xen") {
                return Ok(true);
            }
            at += 12 + name_size.next_multiple_of(4) + desc_size.next_multiple_of(4);
        }
    }
    Ok(false)
}

/// The executable cut after the last byte any segment covers, without
/// section headers: what the loader maps, and nothing else.
pub fn loadable(bytes: &[u8]) -> io::Result<Vec<u8>> {
    let segments = segments(bytes)?;
    if !segments.iter().any(|s| s.kind == PT_LOAD) {
        return Err(bad("no loadable segment"));
    }
    let table_end = usize::try_from(u64_at(bytes, 0x20)?).map_err(|_| bad("program header offset"))?
        + usize::from(u16_at(bytes, 0x36)?) * usize::from(u16_at(bytes, 0x38)?);
    let mut end = table_end;
    for s in &segments {
        let last = s.offset.checked_add(s.file_size).ok_or_else(|| bad("segment size"))?;
        end = end.max(usize::try_from(last).map_err(|_| bad("segment size"))?);
    }
    let mut cut = bytes.get(..end).ok_or_else(|| bad("a segment lies outside the file"))?.to_vec();
    // e_shoff, e_shnum, e_shstrndx: no section headers.
    cut[0x28..0x30].fill(0);
    cut[0x3c..0x40].fill(0);
    Ok(cut)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_test_binary_names_its_loader_and_shrinks() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let interp = interpreter(&exe).unwrap().unwrap();
        assert!(interp.contains("ld-linux"), "{interp}");
        let cut = loadable(&exe).unwrap();
        assert!(cut.len() <= exe.len());
        assert_eq!(interpreter(&cut).unwrap().unwrap(), interp);
        assert_eq!(u16_at(&cut, 0x3c).unwrap(), 0);
    }

    #[test]
    fn the_cut_executable_still_runs() {
        let dir = tempfile::tempdir().unwrap();
        let cut = loadable(&std::fs::read("/proc/self/exe").unwrap()).unwrap();
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
        let with = elf_with_notes(&[(b"GNU\0", 3), (b"Xen\0", 6), (b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY)]);
        assert!(has_pvh_entry(&with).unwrap());
        let without = elf_with_notes(&[(b"GNU\0", 3), (b"Xen\0", 6)]);
        assert!(!has_pvh_entry(&without).unwrap());
        // The type alone is not enough: it must be Xen's note.
        assert!(!has_pvh_entry(&elf_with_notes(&[(b"GNU\0", XEN_ELFNOTE_PHYS32_ENTRY)])).unwrap());
    }

    #[test]
    fn garbage_is_refused() {
        assert!(loadable(b"#!/bin/sh\n").is_err());
        assert!(interpreter(b"\x7fELF\x02\x01").is_err());
    }
}
