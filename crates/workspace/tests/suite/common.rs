//! Fixtures: fake lower/upper trees built by hand, as overlayfs would.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, FileType, Mode, XattrFlags};

/// Returns early (or panics under CI=true) when the test needs root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !rustix::process::geteuid().is_root() {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("this test needs root (CI=true forbids skipping)");
            }
            eprintln!("skipping: this test needs root (whiteouts, trusted.* xattrs, mounts)");
            return;
        }
    };
}

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub lower: PathBuf,
    pub upper: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        // Modes in expectations assume the usual umask.
        rustix::process::umask(Mode::from_raw_mode(0o022));
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let lower = root.join("lower");
        let upper = root.join("upper");
        fs::create_dir(&lower).unwrap();
        fs::create_dir(&upper).unwrap();
        Fixture { _dir: dir, root, lower, upper }
    }

    /// A scratch directory next to the trees (for "outside" targets).
    pub fn outside(&self, name: &str) -> PathBuf {
        let p = self.root.join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

pub fn write(base: &Path, rel: &str, content: &[u8]) {
    let p = base.join(rel);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(&p, content).unwrap();
}

pub fn write_mode(base: &Path, rel: &str, content: &[u8], mode: u32) {
    write(base, rel, content);
    fs::set_permissions(base.join(rel), fs::Permissions::from_mode(mode)).unwrap();
}

pub fn mkdir(base: &Path, rel: &str) {
    fs::create_dir_all(base.join(rel)).unwrap();
}

pub fn symlink(base: &Path, rel: &str, target: &str) {
    let p = base.join(rel);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    std::os::unix::fs::symlink(target, p).unwrap();
}

/// An overlayfs whiteout: a 0/0 character device.
pub fn whiteout(base: &Path, rel: &str) {
    let p = base.join(rel);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    rustix::fs::mknodat(CWD, &p, FileType::CharacterDevice, Mode::empty(), rustix::fs::makedev(0, 0))
        .unwrap();
}

pub fn fifo(base: &Path, rel: &str) {
    rustix::fs::mknodat(CWD, base.join(rel), FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap();
}

pub fn set_xattr(base: &Path, rel: &str, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(base.join(rel), name, value, XattrFlags::empty()).unwrap();
}

pub fn opaque(base: &Path, rel: &str) {
    set_xattr(base, rel, "trusted.overlay.opaque", b"y");
}

/// Every entry under `base`: type, mode and content or link text, so two
/// snapshots are equal exactly when the trees are byte-identical.
pub fn snapshot(base: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    walk(base, Path::new(""), &mut out);
    out
}

fn walk(base: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, String>) {
    let mut entries: Vec<_> = fs::read_dir(base.join(rel)).unwrap().map(|e| e.unwrap().file_name()).collect();
    entries.sort();
    for name in entries {
        let child = rel.join(&name);
        let full = base.join(&child);
        let meta = fs::symlink_metadata(&full).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let desc = if meta.file_type().is_symlink() {
            format!("link {:?}", fs::read_link(&full).unwrap())
        } else if meta.is_dir() {
            walk(base, &child, out);
            format!("dir {mode:o}")
        } else if meta.is_file() {
            format!("file {mode:o} {:?}", fs::read(&full).unwrap())
        } else {
            format!("other {mode:o}")
        };
        out.insert(child, desc);
    }
}

pub fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}
