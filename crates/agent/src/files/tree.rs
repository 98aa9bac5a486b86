//! Stat, list, mkdir, remove and rename. None follows a symlink at the
//! last component, and the walks (list, recursive remove) go from
//! directory descriptor to directory descriptor without ever following one,
//! so a link the sandbox planted cannot lead them into another directory.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use airlock_proto::file::{
    DEFAULT_DIR_MODE, FileError, FileInfo, FileKind, FileReply, LIST_BATCH, LIST_MAX_DEPTH, LIST_MAX_ENTRIES,
    ListEntry,
};
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use super::{Flow, Replier, errno_error, kind_of};

/// Deepest a recursive remove descends (each level holds a descriptor).
const REMOVE_MAX_DEPTH: usize = 256;

const DIR_FLAGS: OFlags =
    OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

fn info(stat: &rustix::fs::Stat, link_target: Option<Vec<u8>>) -> FileInfo {
    FileInfo {
        kind: FileKind::from_mode(stat.st_mode),
        size: u64::try_from(stat.st_size).unwrap_or(0),
        mode: stat.st_mode & 0o7777,
        mtime: stat.st_mtime,
        mtime_nsec: u32::try_from(stat.st_mtime_nsec).unwrap_or(0),
        uid: stat.st_uid,
        gid: stat.st_gid,
        link_target,
    }
}

/// lstat: the path itself, a symlink with its target.
pub(super) fn stat(path: &Path) -> Result<FileInfo, FileError> {
    let stat = rustix::fs::lstat(path).map_err(not_found_or_os)?;
    let target = (FileKind::from_mode(stat.st_mode) == FileKind::Symlink)
        .then(|| rustix::fs::readlink(path, Vec::new()).ok().map(|t| t.into_bytes()))
        .flatten();
    Ok(info(&stat, target))
}

fn not_found_or_os(errno: Errno) -> FileError {
    match errno {
        Errno::NOENT | Errno::NOTDIR => FileError::NotFound,
        errno => FileError::Os { errno: errno.raw_os_error() },
    }
}

fn entry_info(dir: &impl AsFd, name: &[u8]) -> Result<FileInfo, Errno> {
    let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let target = (FileKind::from_mode(stat.st_mode) == FileKind::Symlink)
        .then(|| rustix::fs::readlinkat(dir, name, Vec::new()).ok().map(|t| t.into_bytes()))
        .flatten();
    Ok(info(&stat, target))
}

/// A directory's names, sorted, without `.` and `..`.
fn names(dir: &OwnedFd) -> Result<Vec<Vec<u8>>, Errno> {
    names_up_to(dir, usize::MAX).map(|(names, _)| names)
}

/// At most `limit` of a directory's names (in the order the directory
/// gives them), sorted; true when there were more. A listing never holds
/// more names than it may still send, however large the directory.
fn names_up_to(dir: &OwnedFd, limit: usize) -> Result<(Vec<Vec<u8>>, bool), Errno> {
    let mut names = Vec::new();
    let mut more = false;
    for entry in rustix::fs::Dir::read_from(dir)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name == b"." || name == b".." {
            continue;
        }
        if names.len() == limit {
            more = true;
            break;
        }
        names.push(name);
    }
    names.sort();
    Ok((names, more))
}

/// Opens the directory a listing or watch starts from. The path resolves
/// like any other in the sandbox's view (a symlink to a directory names
/// that directory); anything but a directory is refused by name.
pub(super) fn open_dir(path: &Path) -> Result<OwnedFd, FileError> {
    match rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::NOENT) => Err(FileError::NotFound),
        Err(Errno::NOTDIR) => match kind_of(path) {
            Some((found, link_target)) => Err(FileError::NotDirectory { found, link_target }),
            None => Err(FileError::NotFound),
        },
        Err(errno) => Err(errno_error(errno)),
    }
}

/// Lists `path` down to `depth` levels, depth first in name order, sending
/// batches as they fill (within the window).
pub(super) fn list(
    replier: &Replier,
    flow: &Flow,
    path: &Path,
    depth: u32,
    max_entries: Option<u32>,
) -> Result<(), FileError> {
    let depth = depth.clamp(1, LIST_MAX_DEPTH) as usize;
    let cap = max_entries.unwrap_or(LIST_MAX_ENTRIES).min(LIST_MAX_ENTRIES) as usize;
    let root = open_dir(path)?;
    let mut batch = Vec::new();
    let mut count = 0usize;
    let (root_names, mut truncated) = names_up_to(&root, cap).map_err(errno_error)?;
    // (directory, its path below the root, its names not yet visited)
    let mut stack: Vec<(OwnedFd, Vec<u8>, std::vec::IntoIter<Vec<u8>>)> =
        vec![(root.try_clone().map_err(|e| super::os_error(&e))?, Vec::new(), root_names.into_iter())];
    loop {
        let level = stack.len();
        let Some((dir, prefix, pending)) = stack.last_mut() else { break };
        let Some(name) = pending.next() else {
            stack.pop();
            continue;
        };
        // Gone since it was read: skip it.
        let Ok(entry) = entry_info(dir, &name) else { continue };
        if count == cap {
            truncated = true;
            break;
        }
        count += 1;
        let mut full = prefix.clone();
        if !full.is_empty() {
            full.push(b'/');
        }
        full.extend_from_slice(&name);
        let descend = entry.kind == FileKind::Directory && level < depth;
        batch.push(ListEntry { name: full.clone(), info: entry });
        if batch.len() == LIST_BATCH {
            if !flow.reserve() {
                return Err(FileError::Aborted);
            }
            replier.send(FileReply::Entries { entries: std::mem::take(&mut batch), truncated: false });
        }
        if descend
            && let Ok(child) = rustix::fs::openat(&*dir, name.as_slice(), DIR_FLAGS, Mode::empty())
            && let Ok((child_names, more)) = names_up_to(&child, cap - count)
        {
            truncated |= more;
            stack.push((child, full, child_names.into_iter()));
        }
    }
    if !flow.reserve() {
        return Err(FileError::Aborted);
    }
    replier.send(FileReply::Entries { entries: batch, truncated });
    Ok(())
}

pub(super) fn mkdir(path: &Path, parents: bool, mode: Option<u32>) -> Result<(), FileError> {
    let mode = mode.unwrap_or(DEFAULT_DIR_MODE) & 0o7777;
    if !parents {
        return make_one(path, mode);
    }
    let mut at = PathBuf::from("/");
    for component in path.components().skip(1) {
        at.push(component);
        match make_one(&at, mode) {
            Ok(()) => {}
            // mkdir -p: an existing directory (or a link to one) is fine.
            Err(FileError::Exists { .. }) if at.is_dir() => {}
            Err(FileError::Exists { found }) => {
                let link_target = kind_of(&at).and_then(|(_, t)| t);
                return Err(FileError::NotDirectory { found, link_target });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn make_one(path: &Path, mode: u32) -> Result<(), FileError> {
    match rustix::fs::mkdir(path, Mode::from_raw_mode(mode)) {
        Ok(()) => {}
        Err(Errno::EXIST) => {
            let found = kind_of(path).map_or(FileKind::Unknown, |(kind, _)| kind);
            return Err(FileError::Exists { found });
        }
        Err(errno) => return Err(not_found_or_os(errno)),
    }
    // Exactly these bits, whatever the umask; on the directory just made,
    // not on whatever the sandbox may have put there since.
    let dir = rustix::fs::open(path, DIR_FLAGS, Mode::empty()).map_err(errno_error)?;
    rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode)).map_err(errno_error)
}

pub(super) fn remove(path: &Path, recursive: bool) -> Result<(), FileError> {
    let (parent, name) = super::write::split(path)?;
    let parent =
        rustix::fs::open(parent, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(not_found_or_os)?;
    remove_at(&parent, name, recursive, 0)
}

fn remove_at(parent: &OwnedFd, name: &[u8], recursive: bool, depth: usize) -> Result<(), FileError> {
    let stat = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW).map_err(not_found_or_os)?;
    if FileKind::from_mode(stat.st_mode) != FileKind::Directory {
        // A symlink is removed itself, never what it points to.
        return rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(not_found_or_os);
    }
    if recursive {
        if depth >= REMOVE_MAX_DEPTH {
            return Err(FileError::Os { errno: libc::ELOOP });
        }
        let dir = rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty()).map_err(not_found_or_os)?;
        for child in names(&dir).map_err(errno_error)? {
            match remove_at(&dir, &child, true, depth + 1) {
                Ok(()) | Err(FileError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
    }
    match rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) => Ok(()),
        Err(Errno::NOTEMPTY | Errno::EXIST) => Err(FileError::NotEmpty),
        Err(errno) => Err(not_found_or_os(errno)),
    }
}

pub(super) fn rename(from: &Path, to: &Path, replace: bool) -> Result<(), FileError> {
    super::write::split(from)?;
    super::write::split(to)?;
    let flags = if replace { RenameFlags::empty() } else { RenameFlags::NOREPLACE };
    match rustix::fs::renameat_with(rustix::fs::CWD, from, rustix::fs::CWD, to, flags) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) if !replace => {
            Err(FileError::Exists { found: kind_of(to).map_or(FileKind::Unknown, |(kind, _)| kind) })
        }
        Err(Errno::NOTEMPTY | Errno::EXIST) => Err(FileError::NotEmpty),
        Err(errno) => Err(not_found_or_os(errno)),
    }
}

/// The name of an entry as the host would join it: for tests.
#[cfg(test)]
fn joined(entries: &[ListEntry]) -> Vec<String> {
    entries.iter().map(|e| String::from_utf8_lossy(&e.name).into_owned()).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn stat_describes_a_symlink_itself() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        let found = stat(&link).unwrap();
        assert_eq!(found.kind, FileKind::Symlink);
        assert_eq!(found.link_target.as_deref(), Some(&b"/etc"[..]));
        assert_eq!(stat(&dir.path().join("absent")).unwrap_err(), FileError::NotFound);
        assert_eq!(stat(dir.path()).unwrap().kind, FileKind::Directory);
    }

    #[test]
    fn remove_never_follows_a_symlink() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tree/sub")).unwrap();
        std::fs::write(dir.path().join("tree/sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("tree/link")).unwrap();
        assert_eq!(remove(&dir.path().join("tree"), false).unwrap_err(), FileError::NotEmpty);
        remove(&dir.path().join("tree"), true).unwrap();
        assert!(!dir.path().join("tree").exists());
        assert!(outside.path().join("keep").exists(), "the link's target is untouched");

        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        remove(&dir.path().join("link"), true).unwrap();
        assert!(outside.path().join("keep").exists());
        assert_eq!(remove(&dir.path().join("link"), false).unwrap_err(), FileError::NotFound);
        assert_eq!(remove(Path::new("/"), true).unwrap_err(), FileError::InvalidPath);
    }

    #[test]
    fn mkdir_with_and_without_parents() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        assert_eq!(mkdir(&deep, false, None).unwrap_err(), FileError::NotFound);
        mkdir(&deep, true, Some(0o700)).unwrap();
        assert_eq!(std::fs::metadata(&deep).unwrap().permissions().mode() & 0o7777, 0o700);
        mkdir(&deep, true, None).unwrap();
        assert_eq!(mkdir(&deep, false, None).unwrap_err(), FileError::Exists { found: FileKind::Directory });
        std::fs::write(dir.path().join("file"), b"").unwrap();
        assert!(matches!(
            mkdir(&dir.path().join("file/x"), true, None).unwrap_err(),
            FileError::NotDirectory { found: FileKind::Regular, .. }
        ));
    }

    #[test]
    fn rename_may_refuse_to_replace() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        assert_eq!(rename(&a, &b, false).unwrap_err(), FileError::Exists { found: FileKind::Regular });
        rename(&a, &b, true).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"a");
        assert_eq!(rename(&a, &b, true).unwrap_err(), FileError::NotFound);
    }

    /// Runs a listing and collects what it sends.
    fn listing(path: &Path, depth: u32, cap: Option<u32>) -> (Vec<String>, bool) {
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let replier = Replier { writer: std::sync::Arc::new(std::sync::Mutex::new(ours)), id: 1 };
        let flow = Flow::default();
        list(&replier, &flow, path, depth, cap).unwrap();
        drop(replier);
        let (mut names, mut truncated) = (Vec::new(), false);
        while let Some(airlock_proto::AgentMessage::File { reply, .. }) =
            airlock_proto::recv(&mut theirs).unwrap()
        {
            if let FileReply::Entries { entries, truncated: t } = reply {
                names.extend(joined(&entries));
                truncated |= t;
            }
        }
        (names, truncated)
    }

    #[test]
    fn listings_stay_below_their_directory_and_stop_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("d/e")).unwrap();
        std::fs::write(dir.path().join("d/e/f"), b"x").unwrap();
        std::fs::write(dir.path().join("top"), b"x").unwrap();
        std::os::unix::fs::symlink("/", dir.path().join("d/root")).unwrap();
        assert_eq!(listing(dir.path(), 1, None), (vec!["d".into(), "top".into()], false));
        assert_eq!(
            listing(dir.path(), 5, None).0,
            ["d", "d/e", "d/e/f", "d/root", "top"],
            "the link to / is listed, not entered"
        );
        assert_eq!(listing(dir.path(), 5, Some(3)), (vec!["d".into(), "d/e".into(), "d/e/f".into()], true));
        assert!(!listing(dir.path(), 5, Some(5)).1, "exactly the cap is not truncated");
        // Many entries travel in several batches.
        let many = dir.path().join("many");
        std::fs::create_dir(&many).unwrap();
        for i in 0..(LIST_BATCH * 2 + 3) {
            std::fs::write(many.join(format!("{i:04}")), b"").unwrap();
        }
        assert_eq!(listing(&many, 1, None).0.len(), LIST_BATCH * 2 + 3);
        let (some, truncated) = listing(&many, 1, Some(10));
        assert_eq!((some.len(), truncated), (10, true), "a large directory is read only up to the cap");
        assert!(matches!(
            open_dir(&dir.path().join("d/e/f")).unwrap_err(),
            FileError::NotDirectory { found: FileKind::Regular, .. }
        ));
    }
}
