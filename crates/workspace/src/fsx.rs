//! Descriptor-relative filesystem helpers that never follow symlinks.
//!
//! Every tree this crate touches (the upper layer written by the sandbox, the
//! host workspace, an artifact destination) is opened once as a root
//! directory descriptor; everything beneath it is reached with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), falling back to a walk of
//! `O_NOFOLLOW | O_DIRECTORY` opens on kernels without `openat2`. The final
//! component is always handled with an `*at` call that does not follow it
//! either, so a symlink planted anywhere on a path is an error, never a
//! redirection.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use crate::diff::EntryType;

/// Deepest directory nesting we walk; hostile layers can nest far deeper
/// than any real project, and recursion must stay bounded.
pub const MAX_DEPTH: usize = 512;

/// What `lstat` tells us about one entry, reduced to what the crate needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub ty: EntryType,
    /// Permission bits including setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub size: u64,
    /// A 0/0 character device: an overlayfs whiteout.
    pub whiteout: bool,
    pub uid: u32,
    pub gid: u32,
    /// Human name of the file type, for messages about special files.
    pub kind_name: &'static str,
}

impl Meta {
    pub(crate) fn from_stat(st: &rustix::fs::Stat) -> Meta {
        let ft = FileType::from_raw_mode(st.st_mode);
        let (ty, kind_name) = match ft {
            FileType::RegularFile => (EntryType::File, "regular file"),
            FileType::Directory => (EntryType::Dir, "directory"),
            FileType::Symlink => (EntryType::Symlink, "symlink"),
            FileType::Fifo => (EntryType::Other, "fifo"),
            FileType::Socket => (EntryType::Other, "socket"),
            FileType::CharacterDevice => (EntryType::Other, "character device"),
            FileType::BlockDevice => (EntryType::Other, "block device"),
            FileType::Unknown => (EntryType::Other, "unknown file type"),
        };
        Meta {
            ty,
            mode: st.st_mode & 0o7777,
            size: u64::try_from(st.st_size).unwrap_or(0),
            whiteout: ft == FileType::CharacterDevice && st.st_rdev == 0,
            uid: st.st_uid,
            gid: st.st_gid,
            kind_name,
        }
    }
}

/// Opens the root of a tree. The root path itself is trusted (it comes from
/// the host's configuration), so it may be reached through symlinks.
pub(crate) fn open_root(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

/// Opens the root of an upper layer: its directories above are the host's,
/// but its own name is not followed if it is a symlink. A microVM's guest
/// sees the directory that holds `upper` (virtio-fs serves it) and can
/// replace `upper` with a link to any host path; the host must then refuse
/// it, never walk, copy or scrub where it points.
pub(crate) fn open_layer_root(path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::open(path, flags, Mode::empty())?)
}

/// Opens directory `rel` beneath `root` without following any symlink.
/// `rel` must already be validated (only normal components).
pub(crate) fn open_dir(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let target: &Path = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    // openat2 returns EAGAIN when a concurrent rename raced the lookup.
    for _ in 0..8 {
        match rustix::fs::openat2(root, target, flags, Mode::empty(), resolve) {
            Err(rustix::io::Errno::AGAIN) => continue,
            Err(rustix::io::Errno::NOSYS) => return open_dir_walk(root, rel),
            other => return Ok(other?),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::ResourceBusy,
        "path kept changing during lookup (openat2 returned EAGAIN repeatedly)",
    ))
}

/// Fallback for kernels before 5.6: one `O_NOFOLLOW` open per component.
fn open_dir_walk(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let mut cur = rustix::fs::openat(root, ".", flags, Mode::empty())?;
    for comp in rel.components() {
        let Component::Normal(name) = comp else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "path component is not a plain name"));
        };
        cur = rustix::fs::openat(&cur, name, flags, Mode::empty())?;
    }
    Ok(cur)
}

/// Splits a validated relative path into its parent and final name.
pub(crate) fn split(rel: &Path) -> io::Result<(&Path, &OsStr)> {
    match (rel.parent(), rel.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "path has no final component")),
    }
}

/// `lstat` of one name inside an open directory; `None` when absent.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Meta>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(Meta::from_stat(&st))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `lstat` of `rel` beneath `root`. Missing entries, and paths whose parent
/// is missing or not a directory, are `None`; a symlink on the way is ELOOP.
pub(crate) fn lstat(root: BorrowedFd<'_>, rel: &Path) -> io::Result<Option<Meta>> {
    if rel.as_os_str().is_empty() {
        return Ok(Some(Meta::from_stat(&rustix::fs::fstat(root)?)));
    }
    let (parent, name) = split(rel)?;
    let dir = match open_dir(root, parent) {
        Ok(d) => d,
        Err(e) if is_absent(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    lstat_at(dir.as_fd(), name)
}

/// ENOENT or ENOTDIR: the path does not exist as such.
pub(crate) fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::NOENT.raw_os_error()
            || code == rustix::io::Errno::NOTDIR.raw_os_error()
    )
}

/// ELOOP: a symlink sat on the path and was refused.
pub(crate) fn is_symlink_refusal(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
        || e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error())
}

/// Names in an open directory, without `.` and `..`, sorted bytewise.
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        names.push(OsStr::from_bytes(name).to_os_string());
    }
    names.sort();
    Ok(names)
}

/// Reads a symlink's text verbatim (never resolving it).
pub(crate) fn read_link_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<PathBuf> {
    let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
    Ok(PathBuf::from(OsStr::from_bytes(target.as_bytes())))
}

/// Reads the symlink at `rel` beneath `root`.
pub(crate) fn read_link(root: BorrowedFd<'_>, rel: &Path) -> io::Result<PathBuf> {
    let (parent, name) = split(rel)?;
    let dir = open_dir(root, parent)?;
    read_link_at(dir.as_fd(), name)
}

/// Opens a regular file for reading. `O_NOFOLLOW` refuses a symlink,
/// `O_NONBLOCK` keeps a FIFO swapped in after `lstat` from hanging us, and
/// the `fstat` check refuses anything that is not a regular file.
pub(crate) fn open_file_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(File::from(fd))
}

/// Opens the regular file at `rel` beneath `root`.
pub(crate) fn open_file(root: BorrowedFd<'_>, rel: &Path) -> io::Result<File> {
    let (parent, name) = split(rel)?;
    let dir = open_dir(root, parent)?;
    open_file_at(dir.as_fd(), name)
}

/// Reads a whole regular file if it is at most `limit` bytes; `None` when
/// it is larger, so huge hostile files are never pulled into memory.
pub(crate) fn read_file_bounded(root: BorrowedFd<'_>, rel: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let file = open_file(root, rel)?;
    let mut buf = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    if u64::try_from(buf.len()).unwrap_or(u64::MAX) > limit {
        return Ok(None);
    }
    Ok(Some(buf))
}

/// Reads at most `n` bytes from the start of the file at `rel`.
pub(crate) fn read_head(root: BorrowedFd<'_>, rel: &Path, n: u64) -> io::Result<Vec<u8>> {
    let file = open_file(root, rel)?;
    let mut buf = Vec::new();
    file.take(n).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Compares two open files byte for byte, streaming.
pub(crate) fn same_content(mut a: File, mut b: File) -> io::Result<bool> {
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
    loop {
        let na = read_full(&mut a, &mut ba)?;
        let nb = read_full(&mut b, &mut bb)?;
        if na != nb || ba.get(..na) != bb.get(..nb) {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

/// Fills `buf` as far as the file allows (short only at end of file).
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let Some(rest) = buf.get_mut(filled..) else {
            break;
        };
        match f.read(rest) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Names of the overlayfs xattrs (`trusted.overlay.*` / `user.overlay.*`)
/// on an open file, with their values.
pub(crate) fn overlay_xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let size = match rustix::fs::flistxattr_query(fd) {
        Ok(n) => n,
        Err(rustix::io::Errno::OPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    if size == 0 {
        return Ok(Vec::new());
    }
    let mut list = vec![0u8; size];
    let n = rustix::fs::flistxattr(fd, list.as_mut_slice())?;
    list.truncate(n);
    let mut out = Vec::new();
    for raw in list.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let name = String::from_utf8_lossy(raw).into_owned();
        if !(name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.")) {
            continue;
        }
        let value = get_xattr(fd, raw)?.unwrap_or_default();
        out.push((name, value));
    }
    Ok(out)
}

/// One xattr's value; `None` when it is not set.
fn get_xattr(fd: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let name = OsStr::from_bytes(name);
    let size = match rustix::fs::fgetxattr_query(fd, name) {
        Ok(n) => n,
        Err(rustix::io::Errno::NODATA) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut value = vec![0u8; size];
    let n = rustix::fs::fgetxattr(fd, name, value.as_mut_slice())?;
    value.truncate(n);
    Ok(Some(value))
}

/// Removes `name` inside `dir`, recursively for directories, without ever
/// following a symlink: a link is unlinked, its target is never touched.
pub(crate) fn remove_tree_at(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> io::Result<()> {
    let Some(meta) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if meta.ty != EntryType::Dir {
        return Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?);
    }
    if depth > MAX_DEPTH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("directory nesting deeper than {MAX_DEPTH} levels"),
        ));
    }
    let child = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for entry in list_dir(child.as_fd())? {
        remove_tree_at(child.as_fd(), &entry, depth + 1)?;
    }
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
}
