//! One hand-made hostile layer per attack. Names are written into the tar
//! header bytes directly: the tar crate's own setters refuse `..` and
//! absolute names, which is exactly what a hostile layer would contain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use super::*;

/// One tar entry as a hostile writer would make it.
struct Raw<'a> {
    name: &'a str,
    kind: tar::EntryType,
    mode: u32,
    link: &'a str,
    data: &'a [u8],
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> Raw<'a> {
    Raw { name, kind: tar::EntryType::Regular, mode: 0o644, link: "", data }
}

fn dir(name: &str) -> Raw<'_> {
    Raw { name, kind: tar::EntryType::Directory, mode: 0o755, link: "", data: b"" }
}

fn link<'a>(name: &'a str, kind: tar::EntryType, target: &'a str) -> Raw<'a> {
    Raw { name, kind, mode: 0o777, link: target, data: b"" }
}

fn tar_of(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_old();
        let old = header.as_old_mut();
        old.name[..entry.name.len()].copy_from_slice(entry.name.as_bytes());
        old.linkname[..entry.link.len()].copy_from_slice(entry.link.as_bytes());
        header.set_entry_type(entry.kind);
        header.set_mode(entry.mode);
        header.set_size(entry.data.len() as u64);
        header.set_cksum();
        builder.append(&header, entry.data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// A header that claims `size` bytes, followed by nothing: what a bomb's
/// first block looks like before any data arrives.
fn claimed_size_header(name: &str, size: u64) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(size);
    header.set_cksum();
    header.as_bytes().to_vec()
}

fn unpack(bytes: &[u8], limits: &Limits) -> (tempfile::TempDir, Result<UnpackReport, UnpackError>) {
    let outer = tempfile::tempdir().unwrap();
    let dest = outer.path().join("layer");
    fs::create_dir(&dest).unwrap();
    let result = unpack_layer(bytes, &dest, limits);
    (outer, result)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(bytes, 19).unwrap()
}

#[test]
fn an_ordinary_layer_unpacks_in_every_compression() {
    let layer = tar_of(&[
        dir("bin"),
        file("bin/hello", b"#!/bin/sh\necho hi\n"),
        link("bin/sh", tar::EntryType::Symlink, "busybox"),
    ]);
    for bytes in [layer.clone(), gzip(&layer), zstd(&layer)] {
        let (tmp, result) = unpack(&bytes, &Limits::default());
        let report = result.unwrap();
        assert_eq!(report.entries, 3);
        let root = tmp.path().join("layer");
        assert_eq!(fs::read(root.join("bin/hello")).unwrap(), b"#!/bin/sh\necho hi\n");
        assert_eq!(fs::read_link(root.join("bin/sh")).unwrap(), Path::new("busybox"));
    }
}

#[test]
fn dot_dot_refuses_the_layer() {
    let sibling = tempfile::tempdir().unwrap();
    let (tmp, result) =
        unpack(&tar_of(&[file("../escaped", b"x"), file("a/../../escaped2", b"x")]), &Limits::default());
    assert!(matches!(result, Err(UnpackError::Escape(_))), "{result:?}");
    assert!(!tmp.path().join("escaped").exists());
    assert!(fs::read_dir(sibling.path()).unwrap().next().is_none());
}

#[test]
fn an_absolute_name_lands_inside_the_layer() {
    let (tmp, result) = unpack(&tar_of(&[file("/etc/airlock-absolute", b"inside")]), &Limits::default());
    result.unwrap();
    assert!(!Path::new("/etc/airlock-absolute").exists());
    assert_eq!(fs::read(tmp.path().join("layer/etc/airlock-absolute")).unwrap(), b"inside");
}

#[test]
fn a_symlink_is_never_followed_on_the_way() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap();
    let (tmp, result) = unpack(
        &tar_of(&[link("a", tar::EntryType::Symlink, target), file("a/x", b"owned")]),
        &Limits::default(),
    );
    assert!(matches!(result, Err(UnpackError::ThroughLink { .. })), "{result:?}");
    assert!(!outside.path().join("x").exists());
    // The link itself is kept as a link: inside a sandbox it resolves in the sandbox's root.
    assert!(fs::symlink_metadata(tmp.path().join("layer/a")).unwrap().file_type().is_symlink());
}

#[test]
fn a_symlink_to_a_relative_parent_is_not_followed_either() {
    let (tmp, result) = unpack(
        &tar_of(&[link("up", tar::EntryType::Symlink, ".."), file("up/escaped", b"x")]),
        &Limits::default(),
    );
    assert!(matches!(result, Err(UnpackError::ThroughLink { .. })), "{result:?}");
    assert!(!tmp.path().join("escaped").exists());
}

#[test]
fn a_file_entry_replacing_a_symlink_does_not_write_through_it() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    fs::write(&victim, "untouched").unwrap();
    let (tmp, result) = unpack(
        &tar_of(&[link("f", tar::EntryType::Symlink, victim.to_str().unwrap()), file("f", b"new")]),
        &Limits::default(),
    );
    result.unwrap();
    assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
    assert_eq!(fs::read(tmp.path().join("layer/f")).unwrap(), b"new");
}

#[test]
fn hardlinks_reach_only_regular_files_of_the_layer() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    fs::write(&secret, "host").unwrap();
    for target in ["../secret", secret.to_str().unwrap(), "/etc/passwd", "missing"] {
        let (_tmp, result) = unpack(&tar_of(&[link("h", tar::EntryType::Link, target)]), &Limits::default());
        assert!(
            matches!(result, Err(UnpackError::HardlinkOutside { .. } | UnpackError::Escape(_))),
            "{target}: {result:?}"
        );
    }
    assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1);
    // Through a symlink inside the layer: refused too.
    let layer = tar_of(&[
        link("s", tar::EntryType::Symlink, outside.path().to_str().unwrap()),
        link("h", tar::EntryType::Link, "s/secret"),
    ]);
    let (_tmp, result) = unpack(&layer, &Limits::default());
    assert!(matches!(result, Err(UnpackError::HardlinkOutside { .. })), "{result:?}");
    assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1);
    // To a file of the layer: kept.
    let (tmp, result) = unpack(
        &tar_of(&[file("d/orig", b"same"), link("h", tar::EntryType::Link, "d/orig")]),
        &Limits::default(),
    );
    result.unwrap();
    assert_eq!(fs::metadata(tmp.path().join("layer/h")).unwrap().nlink(), 2);
}

#[test]
fn device_nodes_and_fifos_are_skipped() {
    let layer = tar_of(&[
        Raw { name: "dev/sda", kind: tar::EntryType::Block, mode: 0o666, link: "", data: b"" },
        Raw { name: "dev/mem", kind: tar::EntryType::Char, mode: 0o666, link: "", data: b"" },
        Raw { name: "pipe", kind: tar::EntryType::Fifo, mode: 0o666, link: "", data: b"" },
    ]);
    let (tmp, result) = unpack(&layer, &Limits::default());
    assert_eq!(result.unwrap().skipped_devices, 3);
    for name in ["dev/sda", "dev/mem", "pipe"] {
        assert!(fs::symlink_metadata(tmp.path().join("layer").join(name)).is_err(), "{name}");
    }
}

#[test]
fn setuid_and_setgid_bits_are_dropped() {
    let layer = tar_of(&[
        Raw { name: "su", kind: tar::EntryType::Regular, mode: 0o4755, link: "", data: b"x" },
        Raw { name: "sg", kind: tar::EntryType::Regular, mode: 0o2755, link: "", data: b"x" },
        Raw { name: "tmp", kind: tar::EntryType::Directory, mode: 0o1777, link: "", data: b"" },
    ]);
    let (tmp, result) = unpack(&layer, &Limits::default());
    assert_eq!(result.unwrap().dropped_setid, 2);
    let mode =
        |name: &str| fs::metadata(tmp.path().join("layer").join(name)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("su"), 0o755);
    assert_eq!(mode("sg"), 0o755);
    assert_eq!(mode("tmp"), 0o1777, "the sticky bit is kept");
}

#[test]
fn whiteouts_become_overlay_whiteouts() {
    let layer = tar_of(&[dir("etc"), file("etc/.wh.gone", b""), dir("opt"), file("opt/.wh..wh..opq", b"")]);
    let (tmp, result) = unpack(&layer, &Limits::default());
    assert_eq!(result.unwrap().whiteouts, 2);
    let root = tmp.path().join("layer");
    let gone = fs::symlink_metadata(root.join("etc/gone")).unwrap();
    assert!(gone.file_type().is_char_device());
    assert_eq!(gone.rdev(), 0);
    assert!(fs::symlink_metadata(root.join("etc/.wh.gone")).is_err());
    let mut value = [0u8; 4];
    let n = rustix::fs::getxattr(root.join("opt").as_path(), "user.overlay.opaque", &mut value).unwrap();
    assert_eq!(&value[..n], b"y");
    assert!(fs::read_dir(root.join("opt")).unwrap().next().is_none());
}

#[test]
fn whiteouts_naming_dot_dot_are_refused() {
    let (_tmp, result) = unpack(&tar_of(&[file("etc/.wh...", b"")]), &Limits::default());
    assert!(matches!(result, Err(UnpackError::BadWhiteout(_))), "{result:?}");
}

#[test]
fn a_single_huge_file_is_refused_before_it_is_written() {
    let limits = Limits { max_file_bytes: 1 << 20, ..Limits::default() };
    // The header alone claims 1 TiB: refused on the header, nothing to read.
    let (tmp, result) = unpack(&gzip(&claimed_size_header("big", 1 << 40)), &limits);
    assert!(matches!(result, Err(UnpackError::Limit { what: "single file size", .. })), "{result:?}");
    assert!(!tmp.path().join("layer/big").exists());
}

#[test]
fn a_tar_bomb_is_refused_in_gzip_and_zstd() {
    // 64 files of 1 MiB of zeros: tiny compressed, 64 MiB unpacked.
    let zeros = vec![0u8; 1 << 20];
    let names: Vec<String> = (0..64).map(|i| format!("zero{i}")).collect();
    let layer = tar_of(&names.iter().map(|n| file(n, &zeros)).collect::<Vec<_>>());
    let limits = Limits { max_total_bytes: 16 << 20, ..Limits::default() };
    for bytes in [gzip(&layer), zstd(&layer)] {
        assert!(bytes.len() < 1 << 20, "the bomb is small compressed: {}", bytes.len());
        let (tmp, result) = unpack(&bytes, &limits);
        assert!(matches!(result, Err(UnpackError::Limit { what: "total size", .. })), "{result:?}");
        let written: u64 = fs::read_dir(tmp.path().join("layer"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(written <= 16 << 20, "stopped at the limit: {written}");
    }
}

#[test]
fn too_many_files_are_refused() {
    let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    let layer = tar_of(&names.iter().map(|n| file(n, b"")).collect::<Vec<_>>());
    let (_tmp, result) = unpack(&layer, &Limits { max_files: 10, ..Limits::default() });
    assert!(matches!(result, Err(UnpackError::Limit { what: "file count", .. })), "{result:?}");
}

#[test]
fn a_read_only_directory_still_receives_its_entries() {
    let layer = tar_of(&[
        Raw { name: "ro", kind: tar::EntryType::Directory, mode: 0o555, link: "", data: b"" },
        file("ro/inside", b"x"),
    ]);
    let (tmp, result) = unpack(&layer, &Limits::default());
    result.unwrap();
    assert_eq!(fs::read(tmp.path().join("layer/ro/inside")).unwrap(), b"x");
}
