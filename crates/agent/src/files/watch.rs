//! Watching a directory with inotify until the host cancels. The thread
//! reading the kernel's events never waits on the host: events queue here
//! up to a bound and are sent as the window allows; past the bound they are
//! dropped and one `overflow` event says so (as the kernel's own queue
//! does). A recursive watch adds each directory below, reached by name
//! without following a symlink (`IN_DONT_FOLLOW`), up to `WATCH_MAX_DIRS`.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use airlock_proto::file::{FileError, FileReply, WATCH_MAX_DIRS, WatchEvent, WatchEventKind};
use rustix::event::{PollFd, PollFlags};
use rustix::fs::inotify::{self, ReadFlags, WatchFlags};
use rustix::io::Errno;

use super::{Flow, Replier, errno_error};

/// Events held for a slow host before they are dropped.
const QUEUE: usize = 1024;
/// How often the thread looks whether the host cancelled.
const TICK_MS: i64 = 200;

fn mask() -> WatchFlags {
    WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::MODIFY
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVE_SELF
        | WatchFlags::ONLYDIR
}

struct Watcher {
    inotify: OwnedFd,
    root: PathBuf,
    recursive: bool,
    /// Watch descriptor → the directory's path below the root.
    dirs: HashMap<i32, Vec<u8>>,
    root_wd: i32,
    queue: VecDeque<WatchEvent>,
    overflowed: bool,
}

pub(super) fn watch(replier: &Replier, flow: &Flow, path: &Path, recursive: bool) {
    match Watcher::start(path, recursive) {
        Ok(mut watcher) => {
            replier.send(FileReply::Watching { dirs: u32::try_from(watcher.dirs.len()).unwrap_or(u32::MAX) });
            watcher.run(replier, flow);
        }
        Err(e) => replier.fail(e),
    }
}

fn joined(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut full = prefix.to_vec();
    if !full.is_empty() {
        full.push(b'/');
    }
    full.extend_from_slice(name);
    full
}

impl Watcher {
    fn start(path: &Path, recursive: bool) -> Result<Watcher, FileError> {
        // Says what the path is when it is not a directory.
        drop(super::tree::open_dir(path)?);
        let inotify = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)
            .map_err(errno_error)?;
        let root_wd = inotify::add_watch(&inotify, path, mask()).map_err(errno_error)?;
        let mut watcher = Watcher {
            inotify,
            root: path.to_path_buf(),
            recursive,
            dirs: HashMap::from([(root_wd, Vec::new())]),
            root_wd,
            queue: VecDeque::new(),
            overflowed: false,
        };
        if recursive && !watcher.add_tree(&[]) {
            return Err(FileError::LimitReached { limit: WATCH_MAX_DIRS });
        }
        Ok(watcher)
    }

    /// Watches every directory below `prefix` (a path below the root);
    /// false when the cap stopped it.
    fn add_tree(&mut self, prefix: &[u8]) -> bool {
        let mut pending = vec![prefix.to_vec()];
        while let Some(rel) = pending.pop() {
            let dir = self.root.join(OsStr::from_bytes(&rel));
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                // file_type does not follow a symlink.
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let child = joined(&rel, entry.file_name().as_bytes());
                if !self.add_dir(&child) {
                    return false;
                }
                pending.push(child);
            }
        }
        true
    }

    /// Watches one directory below the root, not through a symlink.
    fn add_dir(&mut self, rel: &[u8]) -> bool {
        if self.dirs.len() >= WATCH_MAX_DIRS as usize {
            return false;
        }
        let path = self.root.join(OsStr::from_bytes(rel));
        if let Ok(wd) = inotify::add_watch(&self.inotify, &path, mask() | WatchFlags::DONT_FOLLOW) {
            self.dirs.insert(wd, rel.to_vec());
        }
        true
    }

    fn push(&mut self, event: WatchEvent) {
        let repeated = event.kind == WatchEventKind::Modified && self.queue.back() == Some(&event);
        if repeated {
            return;
        }
        if self.queue.len() >= QUEUE {
            self.overflowed = true;
            return;
        }
        self.queue.push_back(event);
    }

    fn run(&mut self, replier: &Replier, flow: &Flow) {
        let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
        let tick = rustix::event::Timespec { tv_sec: 0, tv_nsec: TICK_MS * 1_000_000 };
        loop {
            if flow.cancelled() {
                return;
            }
            let mut fds = [PollFd::new(&self.inotify, PollFlags::IN)];
            match rustix::event::poll(&mut fds, Some(&tick)) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(errno) => return replier.fail(errno_error(errno)),
            }
            let gone = match self.read_events(&mut buf) {
                Ok(gone) => gone,
                Err(errno) => return replier.fail(errno_error(errno)),
            };
            if gone {
                self.push(WatchEvent { kind: WatchEventKind::Gone, name: Vec::new(), dir: true, cookie: 0 });
            }
            if !self.flush(replier, flow, gone) {
                return;
            }
            if gone {
                return replier.send(FileReply::Done);
            }
        }
    }

    /// Reads what the kernel has; true once the watched directory is gone.
    fn read_events(&mut self, buf: &mut [MaybeUninit<u8>]) -> Result<bool, Errno> {
        let mut gone = false;
        let mut new_dirs = Vec::new();
        let mut raw = Vec::new();
        let mut reader = inotify::Reader::new(&self.inotify, buf);
        loop {
            match reader.next() {
                Ok(event) => raw.push((
                    event.wd(),
                    event.events(),
                    event.cookie(),
                    event.file_name().map(|n| n.to_bytes().to_vec()),
                )),
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => continue,
                Err(errno) => return Err(errno),
            }
        }
        for (wd, flags, cookie, file_name) in raw {
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                self.overflowed = true;
                continue;
            }
            if flags.contains(ReadFlags::IGNORED) {
                self.dirs.remove(&wd);
                gone |= wd == self.root_wd;
                continue;
            }
            if wd == self.root_wd && flags.intersects(ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF) {
                gone = true;
                continue;
            }
            let Some(prefix) = self.dirs.get(&wd) else { continue };
            let Some(name) = file_name else { continue };
            let name = joined(prefix, &name);
            let dir = flags.contains(ReadFlags::ISDIR);
            let kind = if flags.contains(ReadFlags::CREATE) {
                WatchEventKind::Created
            } else if flags.contains(ReadFlags::DELETE) {
                WatchEventKind::Removed
            } else if flags.contains(ReadFlags::MODIFY) {
                WatchEventKind::Modified
            } else if flags.contains(ReadFlags::MOVED_FROM) {
                WatchEventKind::RenamedFrom
            } else if flags.contains(ReadFlags::MOVED_TO) {
                WatchEventKind::RenamedTo
            } else {
                continue;
            };
            if dir && matches!(kind, WatchEventKind::Created | WatchEventKind::RenamedTo) {
                new_dirs.push(name.clone());
            }
            self.queue_event(WatchEvent { kind, name, dir, cookie });
        }
        if self.recursive {
            for dir in new_dirs {
                // Events inside it before its watch was added are lost; a
                // listing of it catches up.
                if !self.add_dir(&dir) || !self.add_tree(&dir) {
                    self.overflowed = true;
                }
            }
        }
        Ok(gone)
    }

    fn queue_event(&mut self, event: WatchEvent) {
        self.push(event);
    }

    /// Sends what the window allows (all of it, waiting, when `all`); false
    /// once cancelled.
    fn flush(&mut self, replier: &Replier, flow: &Flow, all: bool) -> bool {
        loop {
            let next = if self.overflowed {
                WatchEvent { kind: WatchEventKind::Overflow, name: Vec::new(), dir: false, cookie: 0 }
            } else if let Some(event) = self.queue.front() {
                event.clone()
            } else {
                return true;
            };
            let room = if all { Some(flow.reserve()) } else { flow.try_reserve() };
            match room {
                None | Some(false) if all => return false,
                None => return false,
                Some(false) => return true,
                Some(true) => {}
            }
            if self.overflowed {
                self.overflowed = false;
            } else {
                self.queue.pop_front();
            }
            replier.send(FileReply::Event(next));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn events_are_named_below_the_root_and_new_directories_are_watched() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("/", dir.path().join("link")).unwrap();
        let mut watcher = Watcher::start(dir.path(), true).unwrap();
        assert_eq!(watcher.dirs.len(), 2, "the root and sub; the link is not entered");
        std::fs::write(dir.path().join("sub/a"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("new")).unwrap();
        let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
        assert!(!watcher.read_events(&mut buf).unwrap());
        std::fs::write(dir.path().join("new/b"), b"x").unwrap();
        std::fs::remove_file(dir.path().join("sub/a")).unwrap();
        assert!(!watcher.read_events(&mut buf).unwrap());
        let seen: Vec<(WatchEventKind, String)> =
            watcher.queue.iter().map(|e| (e.kind, String::from_utf8_lossy(&e.name).into_owned())).collect();
        assert!(seen.contains(&(WatchEventKind::Created, "sub/a".into())), "{seen:?}");
        assert!(seen.contains(&(WatchEventKind::Created, "new".into())), "{seen:?}");
        assert!(seen.contains(&(WatchEventKind::Created, "new/b".into())), "{seen:?}");
        assert!(seen.contains(&(WatchEventKind::Removed, "sub/a".into())), "{seen:?}");
        std::fs::remove_dir_all(dir.path()).unwrap();
        assert!(watcher.read_events(&mut buf).unwrap(), "the root's removal ends the watch");
    }

    #[test]
    fn a_full_queue_becomes_one_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let mut watcher = Watcher::start(dir.path(), false).unwrap();
        for i in 0..QUEUE + 5 {
            watcher.push(WatchEvent {
                kind: WatchEventKind::Created,
                name: format!("{i}").into_bytes(),
                dir: false,
                cookie: 0,
            });
        }
        assert_eq!(watcher.queue.len(), QUEUE);
        assert!(watcher.overflowed);
    }
}
