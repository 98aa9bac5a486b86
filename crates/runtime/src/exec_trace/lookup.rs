//! Whether the program an exec call names exists in the sandbox's view:
//! a shell or `execvp` searching PATH calls exec once per directory until
//! one works, and those misses are marked (`no_such_file`), so the one
//! exec that ran stands out.
//!
//! The path is walked the way the kernel walks it, one component at a time
//! from the calling process's root (`/proc/PID/root`), never following a
//! link by the tracer's own root: each component is opened without
//! following it, a symbolic link's text is read and walked in turn (an
//! absolute one from the sandbox's root), `..` goes back to the directory
//! the walk came from and never above the root. A link on procfs (a magic
//! link, or `self`, which means something else to the tracer) makes the
//! answer "cannot tell", and so does anything the tracer may not look at
//! (its ids are none of the sandbox's): only a clean "no such file" (or
//! "not a directory") along the way is a miss. The walk is bounded: 40
//! links, 4096 components.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{FileType, Mode, OFlags};

/// What the walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    Exists,
    /// ENOENT or ENOTDIR: the kernel refuses the exec the same way.
    NoSuchFile,
    CannotTell,
}

const MAX_LINKS: usize = 40;
const MAX_STEPS: usize = 4096;
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

fn open_path(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(dir, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
}

// f_type's type differs between architectures and libcs.
#[allow(clippy::unnecessary_cast)]
fn on_procfs(dir: BorrowedFd<'_>) -> bool {
    rustix::fs::fstatfs(dir).map_or(true, |fs| fs.f_type as i64 == PROC_SUPER_MAGIC)
}

/// Walks absolute `path` from `root` (see the module comment).
pub(crate) fn lookup(root: BorrowedFd<'_>, path: &[u8]) -> Lookup {
    if !path.starts_with(b"/") {
        return Lookup::CannotTell;
    }
    let Ok(top) = open_path(root, b".") else { return Lookup::CannotTell };
    let mut dirs: Vec<OwnedFd> = vec![top];
    let mut pending: VecDeque<Vec<u8>> = components(path).collect();
    let (mut links, mut steps) = (0usize, 0usize);
    while let Some(name) = pending.pop_front() {
        steps += 1;
        if steps > MAX_STEPS {
            return Lookup::CannotTell;
        }
        if name == b".." {
            if dirs.len() > 1 {
                dirs.pop();
            }
            continue;
        }
        let Some(dir) = dirs.last() else { return Lookup::CannotTell };
        let fd = match open_path(dir.as_fd(), &name) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) if !on_procfs(dir.as_fd()) => {
                return Lookup::NoSuchFile;
            }
            Err(_) => return Lookup::CannotTell,
        };
        let Ok(stat) = rustix::fs::fstat(&fd) else { return Lookup::CannotTell };
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Symlink => {
                links += 1;
                if links > MAX_LINKS || on_procfs(dir.as_fd()) {
                    return Lookup::CannotTell;
                }
                let Ok(target) = rustix::fs::readlinkat(&fd, "", Vec::new()) else {
                    return Lookup::CannotTell;
                };
                let target = target.into_bytes();
                if target.starts_with(b"/") {
                    dirs.truncate(1);
                }
                for (i, part) in components(&target).enumerate() {
                    pending.insert(i, part);
                }
            }
            FileType::Directory => dirs.push(fd),
            _ if pending.is_empty() => return Lookup::Exists,
            // A file where the path goes on: ENOTDIR.
            _ => return Lookup::NoSuchFile,
        }
    }
    Lookup::Exists
}

fn components(path: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".").map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::symlink;

    fn root_of(dir: &std::path::Path) -> OwnedFd {
        rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap()
    }

    #[test]
    fn a_path_search_miss_is_told_from_a_hit_through_links_in_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::create_dir_all(r.join("usr/local/bin")).unwrap();
        std::fs::write(r.join("usr/bin/git"), b"").unwrap();
        // Merged /usr, with an absolute and a relative link.
        symlink("/usr/bin", r.join("bin")).unwrap();
        symlink("usr/bin", r.join("sbin")).unwrap();
        symlink("../../bin/git", r.join("usr/local/bin/git-link")).unwrap();
        symlink("/nowhere/git", r.join("usr/local/bin/dangling")).unwrap();
        let root = root_of(r);
        let at = |p: &str| lookup(root.as_fd(), p.as_bytes());
        assert_eq!(at("/usr/bin/git"), Lookup::Exists);
        assert_eq!(at("/bin/git"), Lookup::Exists);
        assert_eq!(at("/sbin/git"), Lookup::Exists);
        assert_eq!(at("/usr/local/bin/git-link"), Lookup::Exists);
        assert_eq!(at("/usr/local/bin/git"), Lookup::NoSuchFile);
        assert_eq!(at("/usr/local/sbin/git"), Lookup::NoSuchFile, "a PATH directory that does not exist");
        assert_eq!(at("/usr/local/bin/dangling"), Lookup::NoSuchFile);
        assert_eq!(at("/usr/bin/git/x"), Lookup::NoSuchFile, "not a directory");
        assert_eq!(at("relative/git"), Lookup::CannotTell);
    }

    #[test]
    fn the_walk_never_leaves_the_root_and_ends_on_loops() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside-file");
        std::fs::write(&outside, b"").unwrap();
        let r = tmp.path().join("root");
        std::fs::create_dir_all(r.join("d")).unwrap();
        symlink("/../../../outside-file", r.join("d/up")).unwrap();
        symlink("loop-b", r.join("loop-a")).unwrap();
        symlink("loop-a", r.join("loop-b")).unwrap();
        let root = root_of(&r);
        // `..` above the root stays at the root: the file outside is not found.
        assert_eq!(lookup(root.as_fd(), b"/../outside-file"), Lookup::NoSuchFile);
        assert_eq!(lookup(root.as_fd(), b"/d/up"), Lookup::NoSuchFile);
        assert_eq!(lookup(root.as_fd(), b"/loop-a"), Lookup::CannotTell);
    }

    #[test]
    fn links_on_procfs_are_not_judged() {
        let root = root_of(std::path::Path::new("/"));
        // `self` means the caller to procfs: never a miss.
        assert_eq!(lookup(root.as_fd(), b"/proc/self/exe"), Lookup::CannotTell);
        assert_eq!(lookup(root.as_fd(), b"/proc/1/fd/12345"), Lookup::CannotTell);
    }
}
