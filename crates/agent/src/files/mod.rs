//! Service mode: file operations for the host (`airlock cp`, the daemon's
//! files API), done here rather than by a program inside so that they need
//! nothing in the sandbox's root (an image of libraries only still has its
//! files copied in and out) and what is opened is checked on the descriptor
//! itself. Paths resolve in the sandbox's own view (the agent is confined
//! like everything else in it).
//!
//! Every operation runs on a thread of its own, so the thread that reads
//! the host's requests never waits on a file system or a slow peer. Streams
//! are bounded both ways by `FILE_WINDOW` ([`Flow`]): the agent sends at
//! most that many chunks, batches or events ahead of the host's
//! acknowledgements, and takes at most that many chunks of a write ahead of
//! its own.

mod read;
mod tree;
mod watch;
mod write;

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};

use airlock_proto::AgentMessage;
use airlock_proto::file::{FILE_WINDOW, FileError, FileKind, FileOp, FileReply, WATCH_MAX_ACTIVE};
use rustix::io::Errno;

use crate::service::{Writer, send};

/// The operations in progress, by id.
#[derive(Clone, Default)]
pub(crate) struct Files {
    flows: Arc<Mutex<HashMap<u32, Arc<Flow>>>>,
    watches: Arc<AtomicU32>,
}

/// One operation's flow control: how many windowed answers are in flight,
/// whether the host cancelled it, and (for a write) where its data goes.
#[derive(Default)]
pub(crate) struct Flow {
    state: Mutex<FlowState>,
    changed: Condvar,
    /// A write's incoming chunks; taken (closing the channel) on cancel.
    data: Mutex<Option<SyncSender<Vec<u8>>>>,
}

#[derive(Default)]
struct FlowState {
    in_flight: u32,
    cancelled: bool,
}

impl Files {
    pub(crate) fn ack(&self, id: u32) {
        self.update(id, |s| s.in_flight = s.in_flight.saturating_sub(1));
    }

    pub(crate) fn cancel(&self, id: u32) {
        if let Some(flow) = self.flow(id) {
            flow.cancel();
        }
    }

    /// A chunk of write `id`. A host that runs past the window (the
    /// channel is full) breaks the protocol: the write is cancelled.
    pub(crate) fn data(&self, id: u32, data: Vec<u8>) {
        let Some(flow) = self.flow(id) else { return };
        let full = match flow.data.lock().ok().and_then(|d| d.clone()) {
            Some(tx) => matches!(tx.try_send(data), Err(TrySendError::Full(_))),
            None => false,
        };
        if full {
            flow.cancel();
        }
    }

    fn flow(&self, id: u32) -> Option<Arc<Flow>> {
        self.flows.lock().ok().and_then(|f| f.get(&id).cloned())
    }

    fn update(&self, id: u32, change: impl FnOnce(&mut FlowState)) {
        if let Some(flow) = self.flow(id)
            && let Ok(mut state) = flow.state.lock()
        {
            change(&mut state);
            flow.changed.notify_all();
        }
    }

    fn register(&self, id: u32) -> Option<Arc<Flow>> {
        let mut flows = self.flows.lock().ok()?;
        if flows.contains_key(&id) {
            return None;
        }
        let flow = Arc::new(Flow::default());
        flows.insert(id, flow.clone());
        Some(flow)
    }

    fn forget(&self, id: u32) {
        if let Ok(mut flows) = self.flows.lock() {
            flows.remove(&id);
        }
    }
}

impl Flow {
    /// Waits for room to send one more windowed answer; false once cancelled.
    pub(crate) fn reserve(&self) -> bool {
        let Ok(mut state) = self.state.lock() else { return false };
        while !state.cancelled && state.in_flight >= FILE_WINDOW {
            state = match self.changed.wait(state) {
                Ok(state) => state,
                Err(_) => return false,
            };
        }
        if state.cancelled {
            return false;
        }
        state.in_flight += 1;
        true
    }

    /// Takes room for one more windowed answer if there is some, without
    /// waiting: `None` once cancelled.
    pub(crate) fn try_reserve(&self) -> Option<bool> {
        let mut state = self.state.lock().ok()?;
        if state.cancelled {
            return None;
        }
        if state.in_flight >= FILE_WINDOW {
            return Some(false);
        }
        state.in_flight += 1;
        Some(true)
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.state.lock().map(|s| s.cancelled).unwrap_or(true)
    }

    fn cancel(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.cancelled = true;
        }
        if let Ok(mut data) = self.data.lock() {
            data.take();
        }
        self.changed.notify_all();
    }

    /// Opens the channel a write's chunks arrive on.
    fn take_data(&self) -> Receiver<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(FILE_WINDOW as usize);
        if let Ok(mut data) = self.data.lock()
            && !self.cancelled()
        {
            *data = Some(tx);
        }
        rx
    }
}

/// How an operation answers the host.
pub(crate) struct Replier {
    writer: Writer,
    id: u32,
}

impl Replier {
    pub(crate) fn send(&self, reply: FileReply) {
        send(&self.writer, AgentMessage::File { id: self.id, reply });
    }

    pub(crate) fn fail(&self, error: FileError) {
        self.send(FileReply::Failed(error));
    }

    /// `Done` for `Ok`, `Failed` for an error.
    pub(crate) fn finish(&self, result: Result<(), FileError>) {
        match result {
            Ok(()) => self.send(FileReply::Done),
            Err(e) => self.fail(e),
        }
    }
}

pub(crate) fn start(writer: &Writer, files: &Files, id: u32, op: FileOp) {
    let replier = Replier { writer: writer.clone(), id };
    if op.paths().iter().any(|p| !p.is_absolute()) {
        return replier.fail(FileError::InvalidPath);
    }
    let Some(flow) = files.register(id) else {
        return replier.fail(FileError::Aborted);
    };
    let watching = matches!(op, FileOp::Watch { .. });
    if watching && files.watches.fetch_add(1, Ordering::SeqCst) >= WATCH_MAX_ACTIVE {
        files.watches.fetch_sub(1, Ordering::SeqCst);
        files.forget(id);
        return replier.fail(FileError::LimitReached { limit: WATCH_MAX_ACTIVE });
    }
    let data = matches!(op, FileOp::Write { .. }).then(|| flow.take_data());
    let thread_files = files.clone();
    let spawned = std::thread::Builder::new().name(format!("file-{}", op.name())).spawn(move || {
        let replier = Replier { writer: replier.writer, id };
        match op {
            FileOp::Read { path, max_bytes } => {
                read::read(&replier, &flow, &path, max_bytes.unwrap_or(u64::MAX))
            }
            FileOp::Write { path, size, mode } => {
                if let Some(data) = data {
                    write::write(&replier, &flow, &data, &path, size, mode)
                }
            }
            FileOp::Stat { path } => {
                replier.finish(tree::stat(&path).map(|info| replier.send(FileReply::Stat(info))))
            }
            FileOp::List { path, depth, max_entries } => {
                replier.finish(tree::list(&replier, &flow, &path, depth, max_entries))
            }
            FileOp::Mkdir { path, parents, mode } => replier.finish(tree::mkdir(&path, parents, mode)),
            FileOp::Remove { path, recursive } => replier.finish(tree::remove(&path, recursive)),
            FileOp::Rename { from, to, replace } => replier.finish(tree::rename(&from, &to, replace)),
            FileOp::Watch { path, recursive } => {
                watch::watch(&replier, &flow, &path, recursive);
                thread_files.watches.fetch_sub(1, Ordering::SeqCst);
            }
        }
        thread_files.forget(id);
    });
    if let Err(e) = spawned {
        if watching {
            files.watches.fetch_sub(1, Ordering::SeqCst);
        }
        files.forget(id);
        Replier { writer: writer.clone(), id }.fail(os_error(&e));
    }
}

pub(crate) fn os_error(e: &io::Error) -> FileError {
    FileError::Os { errno: e.raw_os_error().unwrap_or(libc::EIO) }
}

pub(crate) fn errno_error(errno: Errno) -> FileError {
    match errno {
        Errno::NOENT => FileError::NotFound,
        errno => FileError::Os { errno: errno.raw_os_error() },
    }
}

/// What `path` itself is, and a symlink's target; `None` when nothing is there.
pub(crate) fn kind_of(path: &Path) -> Option<(FileKind, Option<Vec<u8>>)> {
    let stat = rustix::fs::lstat(path).ok()?;
    let kind = FileKind::from_mode(stat.st_mode);
    let target = (kind == FileKind::Symlink)
        .then(|| rustix::fs::readlink(path, Vec::new()).ok().map(|t| t.into_bytes()))
        .flatten();
    Some((kind, target))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_cancelled_flow_stops_waiting_for_room() {
        let files = Files::default();
        let flow = files.register(7).unwrap();
        assert!(files.register(7).is_none(), "an id in use is refused");
        for _ in 0..FILE_WINDOW {
            assert!(flow.reserve());
        }
        assert_eq!(flow.try_reserve(), Some(false), "the window is full");
        files.ack(7);
        assert!(flow.reserve(), "an acknowledgement makes room for one more");
        let waiter = {
            let flow = flow.clone();
            std::thread::spawn(move || flow.reserve())
        };
        files.cancel(7);
        assert!(!waiter.join().unwrap());
        assert_eq!(flow.try_reserve(), None);
        files.forget(7);
        files.ack(7);
    }

    #[test]
    fn a_write_past_its_window_is_cancelled() {
        let files = Files::default();
        let flow = files.register(3).unwrap();
        let rx = flow.take_data();
        for _ in 0..FILE_WINDOW {
            files.data(3, vec![1]);
        }
        assert!(!flow.cancelled());
        files.data(3, vec![1]);
        assert!(flow.cancelled(), "one chunk past the window breaks the protocol");
        let received: Vec<_> = rx.iter().collect();
        assert_eq!(received.len(), FILE_WINDOW as usize, "the channel closed after what it held");
    }

    /// Every answer on the other end of `writer`, until `want` sees one it
    /// waits for.
    fn answers_until(
        theirs: &mut std::os::unix::net::UnixStream,
        want: impl Fn(u32, &FileReply) -> bool,
    ) -> Vec<(u32, FileReply)> {
        let mut seen = Vec::new();
        while let Some(AgentMessage::File { id, reply }) = airlock_proto::recv(theirs).unwrap() {
            let done = want(id, &reply);
            seen.push((id, reply));
            if done {
                break;
            }
        }
        seen
    }

    #[test]
    fn a_sandbox_runs_a_bounded_number_of_watches() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer: Writer = Arc::new(Mutex::new(ours));
        let files = Files::default();
        let watch = FileOp::Watch { path: dir.path().to_path_buf(), recursive: false };
        for id in 0..WATCH_MAX_ACTIVE {
            start(&writer, &files, id, watch.clone());
        }
        let started = answers_until(&mut theirs, |id, _| id == WATCH_MAX_ACTIVE - 1);
        assert!(started.iter().all(|(_, r)| matches!(r, FileReply::Watching { dirs: 1 })), "{started:?}");
        start(&writer, &files, 99, watch.clone());
        let refused = answers_until(&mut theirs, |id, _| id == 99);
        assert_eq!(
            refused.last().unwrap().1,
            FileReply::Failed(FileError::LimitReached { limit: WATCH_MAX_ACTIVE })
        );
        // A cancelled watch frees its place.
        files.cancel(0);
        assert!(
            (0..100).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                files.watches.load(Ordering::SeqCst) < WATCH_MAX_ACTIVE
            }),
            "the cancelled watch still counts"
        );
        start(&writer, &files, 100, watch);
        let again = answers_until(&mut theirs, |id, _| id == 100);
        assert!(matches!(again.last().unwrap().1, FileReply::Watching { .. }), "{again:?}");
        for id in 1..=100 {
            files.cancel(id);
        }
    }

    #[test]
    fn a_cancelled_write_leaves_the_old_file_and_no_temporary_one() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"old").unwrap();
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer: Writer = Arc::new(Mutex::new(ours));
        let files = Files::default();
        start(&writer, &files, 1, FileOp::Write { path: target.clone(), size: 10, mode: None });
        answers_until(&mut theirs, |_, r| *r == FileReply::Ready);
        files.data(1, b"new".to_vec());
        answers_until(&mut theirs, |_, r| *r == FileReply::Ack);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "the temporary file is there mid-way");
        files.cancel(1);
        let gone = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            std::fs::read_dir(dir.path()).unwrap().count() == 1
        });
        assert!(gone, "the temporary file was left behind");
        assert_eq!(std::fs::read(&target).unwrap(), b"old");

        // A complete one replaces the target.
        start(&writer, &files, 2, FileOp::Write { path: target.clone(), size: 3, mode: None });
        answers_until(&mut theirs, |_, r| *r == FileReply::Ready);
        files.data(2, b"new".to_vec());
        answers_until(&mut theirs, |_, r| *r == FileReply::Done);
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
