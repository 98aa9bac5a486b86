//! The supervisor's side of the typed file operations: it passes each
//! operation from its client to the agent and the answers back, and holds
//! the agent — which is inside the sandbox — to the protocol and the caps
//! it was given. A read or write is capped at the sandbox's disk budget; a
//! listing at `LIST_MAX_ENTRIES`; names and link targets at `PATH_MAX`.
//! Flow control holds both ways: at most `FILE_WINDOW` answers of the agent
//! wait here per operation, and at most `FILE_WINDOW` chunks of a write go
//! to the agent ahead of its acknowledgements, so neither a slow client nor
//! a hostile agent makes the supervisor buffer more.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_proto::HostMessage;
use airlock_proto::file::{
    FILE_CHUNK, FILE_WINDOW, FileError, FileInfo, FileOp, FileReply, LIST_MAX_ENTRIES, WATCH_MAX_DIRS,
};
use airlock_proto::supervisor::{Reply, Request};

/// Where the agent's answers to each file operation go. Bounded: the agent
/// may run `FILE_WINDOW` answers ahead of our acknowledgements and no more;
/// one that does anyway loses its route (the operation fails), so a hostile
/// agent cannot make the supervisor buffer without limit.
pub(crate) type FileRoutes = Arc<Mutex<HashMap<u32, SyncSender<FileReply>>>>;

/// How long an operation waits for the agent's next answer (a watch waits
/// for events as long as its client stays).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a write waits for its client's next chunk.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a watch looks whether its client is still there.
const WATCH_TICK: Duration = Duration::from_millis(500);
/// The longest name or link target an answer may carry (PATH_MAX).
const NAME_MAX_BYTES: usize = 4096;

/// Hands an agent's answer to the file operation waiting for it. An agent
/// that runs past its window loses the route: the operation then fails.
pub(crate) fn route_file_reply(file_routes: &FileRoutes, id: u32, reply: FileReply) {
    let Ok(mut routes) = file_routes.lock() else { return };
    let last = reply.is_last();
    let delivered = routes.get(&id).is_some_and(|tx| tx.try_send(reply).is_ok());
    if last || !delivered {
        routes.remove(&id);
    }
}

/// What the audit log records of one operation.
pub(crate) struct Outcome {
    /// Bytes read or written.
    pub bytes: u64,
    /// Entries listed, or events a watch passed on.
    pub entries: u64,
    pub result: Result<(), FileError>,
}

/// One operation between a client connection and the agent.
pub(crate) struct Relay<'a> {
    pub agent: &'a Arc<Mutex<UnixStream>>,
    pub routes: &'a FileRoutes,
    pub id: u32,
    /// The sandbox's disk budget: the most a read or write may move.
    pub disk_limit: u64,
}

impl Relay<'_> {
    fn to_agent(&self, msg: &HostMessage) -> bool {
        self.agent.lock().map(|mut a| airlock_proto::send(&mut *a, msg).is_ok()).unwrap_or(false)
    }

    /// The operation as the agent gets it, with the supervisor's caps.
    pub(crate) fn capped(&self, op: FileOp) -> Result<(FileOp, Check), FileError> {
        Ok(match op {
            FileOp::Read { path, max_bytes } => {
                let limit = max_bytes.map_or(self.disk_limit, |m| m.min(self.disk_limit));
                (FileOp::Read { path, max_bytes: Some(limit) }, Check::read(limit))
            }
            FileOp::Write { path, size, mode } => {
                if size > self.disk_limit {
                    return Err(FileError::TooLarge { size, limit: self.disk_limit });
                }
                (FileOp::Write { path, size, mode }, Check::new(Expect::Write { size }))
            }
            FileOp::List { path, depth, max_entries } => {
                let cap = max_entries.unwrap_or(LIST_MAX_ENTRIES).min(LIST_MAX_ENTRIES);
                (
                    FileOp::List { path, depth, max_entries: Some(cap) },
                    Check::new(Expect::List { cap: u64::from(cap) }),
                )
            }
            op @ FileOp::Stat { .. } => (op, Check::new(Expect::Stat)),
            op @ FileOp::Watch { .. } => (op, Check::new(Expect::Watch)),
            op @ (FileOp::Mkdir { .. } | FileOp::Remove { .. } | FileOp::Rename { .. }) => {
                (op, Check::new(Expect::Nothing))
            }
        })
    }

    /// Runs `op` and relays it to `conn` until its end.
    pub(crate) fn run(&self, conn: &mut UnixStream, op: FileOp) -> Outcome {
        let (op, mut check) = match self.capped(op) {
            Ok(capped) => capped,
            Err(e) => {
                let _ = airlock_proto::send(conn, &Reply::File(FileReply::Failed(e.clone())));
                return Outcome { bytes: 0, entries: 0, result: Err(e) };
            }
        };
        let watch = matches!(op, FileOp::Watch { .. });
        let (tx, rx) = mpsc::sync_channel(FILE_WINDOW as usize + 2);
        if let Ok(mut routes) = self.routes.lock() {
            routes.insert(self.id, tx);
        }
        let result = if !self.to_agent(&HostMessage::File { id: self.id, op }) {
            Err(FileError::Aborted)
        } else if let Expect::Write { size } = check.expect {
            self.write(conn, &rx, &mut check, size)
        } else {
            self.answers(conn, &rx, &mut check, watch)
        };
        if let Err(e) = &result {
            let _ = airlock_proto::send(conn, &Reply::File(FileReply::Failed(e.clone())));
        }
        let gone = self.routes.lock().map(|mut r| r.remove(&self.id).is_some()).unwrap_or(false);
        if gone || result.is_err() {
            // Still running in the agent (its client left, or it broke the
            // rules): stop it. The agent ignores ids it no longer knows.
            self.to_agent(&HostMessage::FileCancel { id: self.id });
        }
        let result = match (result, check.told.take()) {
            (Ok(()), Some(told)) => Err(told),
            (result, _) => result,
        };
        Outcome { bytes: check.bytes, entries: check.entries, result }
    }

    /// Relays the agent's answers until the last one, acknowledging each
    /// windowed one once the client has it. `Err` is a failure still to be
    /// told to the client.
    fn answers(
        &self,
        conn: &mut UnixStream,
        rx: &Receiver<FileReply>,
        check: &mut Check,
        watch: bool,
    ) -> Result<(), FileError> {
        loop {
            let wait = if watch { WATCH_TICK } else { ANSWER_TIMEOUT };
            let reply = match rx.recv_timeout(wait) {
                Ok(reply) => check.check(reply),
                Err(RecvTimeoutError::Timeout) if watch => {
                    if client_gone(conn) {
                        return Ok(());
                    }
                    continue;
                }
                Err(_) => return Err(FileError::Aborted),
            };
            let windowed = reply.is_windowed();
            let end = match &reply {
                FileReply::Done => Some(Ok(())),
                FileReply::Failed(e) => Some(Err(e.clone())),
                _ => None,
            };
            if airlock_proto::send(conn, &Reply::File(reply)).is_err() {
                // The client left: nothing to tell it.
                return Ok(());
            }
            if let Some(end) = end {
                // Told already; kept for the audit log.
                check.told = end.err();
                return Ok(());
            }
            if windowed {
                self.to_agent(&HostMessage::FileAck { id: self.id });
            }
        }
    }

    /// A write: the client's chunks go to the agent at most `FILE_WINDOW`
    /// ahead of its acknowledgements, and exactly `size` bytes of them.
    fn write(
        &self,
        conn: &mut UnixStream,
        rx: &Receiver<FileReply>,
        check: &mut Check,
        size: u64,
    ) -> Result<(), FileError> {
        match rx.recv_timeout(ANSWER_TIMEOUT).map(|r| check.check(r)) {
            Ok(FileReply::Ready) => {
                if airlock_proto::send(conn, &Reply::File(FileReply::Ready)).is_err() {
                    return Err(FileError::Aborted);
                }
            }
            Ok(FileReply::Failed(e)) => return Err(e),
            _ => return Err(FileError::Aborted),
        }
        let _ = conn.set_read_timeout(Some(CLIENT_TIMEOUT));
        let mut sent: u64 = 0;
        while sent < size {
            while let Ok(reply) = rx.try_recv() {
                check.ack(reply)?;
            }
            if check.chunks - check.acks >= u64::from(FILE_WINDOW) {
                let reply = rx.recv_timeout(ANSWER_TIMEOUT).map_err(|_| FileError::Aborted)?;
                check.ack(reply)?;
                continue;
            }
            let data = match airlock_proto::recv::<_, Request>(conn) {
                Ok(Some(Request::FileData { data })) => data,
                // The client left or broke off: the agent drops the
                // temporary file.
                _ => return Err(FileError::Aborted),
            };
            let received = sent.saturating_add(data.len() as u64);
            if data.len() > FILE_CHUNK || received > size {
                return Err(FileError::SizeMismatch { expected: size, received });
            }
            if !self.to_agent(&HostMessage::FileData { id: self.id, data }) {
                return Err(FileError::Aborted);
            }
            sent = received;
            check.bytes = sent;
            check.chunks += 1;
        }
        loop {
            let reply = rx.recv_timeout(ANSWER_TIMEOUT).map_err(|_| FileError::Aborted)?;
            match check.check(reply) {
                FileReply::Ack => {}
                FileReply::Done => {
                    let _ = airlock_proto::send(conn, &Reply::File(FileReply::Done));
                    return Ok(());
                }
                FileReply::Failed(e) => return Err(e),
                _ => return Err(FileError::Aborted),
            }
        }
    }
}

/// Whether the client hung up (it sends nothing while a watch runs).
fn client_gone(conn: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    match rustix::net::recv(conn, &mut byte, rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT)
    {
        Ok((0, _)) => true,
        Ok(_) => false,
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => false,
        Err(_) => true,
    }
}

/// What the agent may answer to one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    Read {
        limit: u64,
    },
    Write {
        size: u64,
    },
    Stat,
    List {
        cap: u64,
    },
    Watch,
    /// Mkdir, remove, rename: only the end.
    Nothing,
}

/// The supervisor's view of one operation: what the agent may still send.
#[derive(Debug)]
pub(crate) struct Check {
    expect: Expect,
    /// Read: opened; write: ready; stat: answered; watch: watching.
    started: bool,
    /// Bytes read or written; entries listed (or watch events passed on).
    bytes: u64,
    entries: u64,
    /// A write's chunks sent, and the agent's acknowledgements of them.
    chunks: u64,
    acks: u64,
    truncated: bool,
    /// The failure the agent answered (already passed to the client).
    told: Option<FileError>,
}

fn info_ok(info: &FileInfo) -> bool {
    info.link_target.as_ref().is_none_or(|t| t.len() <= NAME_MAX_BYTES)
}

impl Check {
    fn new(expect: Expect) -> Check {
        Check {
            expect,
            started: false,
            bytes: 0,
            entries: 0,
            chunks: 0,
            acks: 0,
            truncated: false,
            told: None,
        }
    }

    fn read(limit: u64) -> Check {
        Check::new(Expect::Read { limit })
    }

    /// A write's acknowledgement; anything else ends it.
    fn ack(&mut self, reply: FileReply) -> Result<(), FileError> {
        match self.check(reply) {
            FileReply::Ack => Ok(()),
            FileReply::Failed(e) => Err(e),
            _ => Err(FileError::Aborted),
        }
    }

    /// The answer to pass on: the agent's, or the failure it earned by
    /// breaking the protocol or a cap.
    pub(crate) fn check(&mut self, reply: FileReply) -> FileReply {
        let broken = FileReply::Failed(FileError::Aborted);
        match (self.expect, reply) {
            (_, FileReply::Failed(FileError::Aborted)) => broken,
            (Expect::Read { limit }, FileReply::Opened { size, mode, .. }) if !self.started => {
                self.started = true;
                if size > limit {
                    return FileReply::Failed(FileError::TooLarge { size, limit });
                }
                FileReply::Opened { size, mode, limit }
            }
            (Expect::Read { limit }, FileReply::Data { data })
                if self.started && data.len() <= FILE_CHUNK =>
            {
                self.bytes += data.len() as u64;
                if self.bytes > limit {
                    return FileReply::Failed(FileError::TooLarge { size: self.bytes, limit });
                }
                FileReply::Data { data }
            }
            (Expect::Read { .. }, FileReply::Done) if self.started => FileReply::Done,
            // Once open, only a cap or the kernel can end a read early.
            (Expect::Read { .. }, FileReply::Failed(e))
                if !self.started || matches!(e, FileError::TooLarge { .. } | FileError::Os { .. }) =>
            {
                FileReply::Failed(e)
            }
            (Expect::Write { .. }, FileReply::Ready) if !self.started => {
                self.started = true;
                FileReply::Ready
            }
            // No more acknowledgements than chunks sent.
            (Expect::Write { .. }, FileReply::Ack) if self.started && self.acks < self.chunks => {
                self.acks += 1;
                FileReply::Ack
            }
            (Expect::Write { .. }, FileReply::Done) if self.started => FileReply::Done,
            (Expect::Stat, FileReply::Stat(info)) if !self.started && info_ok(&info) => {
                self.started = true;
                FileReply::Stat(info)
            }
            (Expect::Stat, FileReply::Done) if self.started => FileReply::Done,
            (Expect::List { cap }, FileReply::Entries { entries, truncated }) if !self.truncated => {
                self.entries += entries.len() as u64;
                let sane = entries
                    .iter()
                    .all(|e| !e.name.is_empty() && e.name.len() <= NAME_MAX_BYTES * 4 && info_ok(&e.info));
                if self.entries > cap || !sane {
                    return broken;
                }
                self.truncated = truncated;
                FileReply::Entries { entries, truncated }
            }
            (Expect::List { .. }, FileReply::Done) => FileReply::Done,
            (Expect::Watch, FileReply::Watching { dirs }) if !self.started && dirs <= WATCH_MAX_DIRS => {
                self.started = true;
                FileReply::Watching { dirs }
            }
            (Expect::Watch, FileReply::Event(event))
                if self.started && event.name.len() <= NAME_MAX_BYTES * 4 =>
            {
                self.entries += 1;
                FileReply::Event(event)
            }
            (Expect::Watch, FileReply::Done) if self.started => FileReply::Done,
            (Expect::Nothing, FileReply::Done) => FileReply::Done,
            // A refusal comes before anything else.
            (_, FileReply::Failed(e)) if !self.started && self.entries == 0 => FileReply::Failed(e),
            // A write can still fail on the disk.
            (
                Expect::Write { .. },
                FileReply::Failed(e @ (FileError::Os { .. } | FileError::SizeMismatch { .. })),
            ) => FileReply::Failed(e),
            (Expect::Watch, FileReply::Failed(e @ FileError::Os { .. })) => FileReply::Failed(e),
            _ => broken,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use airlock_proto::file::{FileKind, ListEntry};

    use super::*;

    fn data(n: usize) -> FileReply {
        FileReply::Data { data: vec![7; n] }
    }

    #[test]
    fn the_relay_holds_the_agent_to_the_cap_and_the_protocol() {
        let mut check = Check::read(100);
        // Data before the file is open is a broken protocol.
        assert_eq!(check.check(data(1)), FileReply::Failed(FileError::Aborted));
        // The agent cannot raise the cap it was given.
        assert_eq!(
            check.check(FileReply::Opened { size: 10, mode: 0o644, limit: u64::MAX }),
            FileReply::Opened { size: 10, mode: 0o644, limit: 100 }
        );
        assert_eq!(check.check(data(60)), data(60));
        assert_eq!(
            check.check(data(41)),
            FileReply::Failed(FileError::TooLarge { size: 101, limit: 100 }),
            "more bytes than the cap, whatever fstat said"
        );
        let mut check = Check::read(1 << 30);
        check.started = true;
        assert_eq!(check.check(data(FILE_CHUNK + 1)), FileReply::Failed(FileError::Aborted));
        assert_eq!(
            check.check(FileReply::Failed(FileError::NotFound)),
            FileReply::Failed(FileError::Aborted),
            "a file found missing after it was opened is a lie"
        );
        let mut check = Check::read(5);
        assert_eq!(
            check.check(FileReply::Opened { size: 6, mode: 0o644, limit: 5 }),
            FileReply::Failed(FileError::TooLarge { size: 6, limit: 5 })
        );
    }

    #[test]
    fn other_operations_get_only_their_own_answers() {
        let mut check = Check::new(Expect::Nothing);
        assert_eq!(check.check(data(1)), FileReply::Failed(FileError::Aborted));
        let mut check = Check::new(Expect::Stat);
        assert_eq!(
            check.check(FileReply::Done),
            FileReply::Failed(FileError::Aborted),
            "Done before the answer"
        );
        let entry = |name: &[u8]| ListEntry {
            name: name.to_vec(),
            info: FileInfo {
                kind: FileKind::Regular,
                size: 0,
                mode: 0o644,
                mtime: 0,
                mtime_nsec: 0,
                uid: 0,
                gid: 0,
                link_target: None,
            },
        };
        let mut check = Check::new(Expect::List { cap: 2 });
        let batch = |names: &[&[u8]]| FileReply::Entries {
            entries: names.iter().map(|n| entry(n)).collect(),
            truncated: false,
        };
        assert_eq!(check.check(batch(&[b"a", b"b"])), batch(&[b"a", b"b"]));
        assert_eq!(check.check(batch(&[b"c"])), FileReply::Failed(FileError::Aborted), "past the cap");
        let mut check = Check::new(Expect::List { cap: 9 });
        assert_eq!(check.check(batch(&[b""])), FileReply::Failed(FileError::Aborted), "an empty name");
        let mut check = Check::new(Expect::Watch);
        assert_eq!(
            check.check(FileReply::Watching { dirs: WATCH_MAX_DIRS + 1 }),
            FileReply::Failed(FileError::Aborted)
        );
        let mut check = Check::new(Expect::Write { size: 3 });
        assert_eq!(check.check(FileReply::Ack), FileReply::Failed(FileError::Aborted), "an ack before Ready");
    }

    #[test]
    fn writes_larger_than_the_disk_budget_are_refused_before_they_start() {
        let (a, _b) = UnixStream::pair().unwrap();
        let agent = Arc::new(Mutex::new(a));
        let routes: FileRoutes = Arc::new(Mutex::new(HashMap::new()));
        let relay = Relay { agent: &agent, routes: &routes, id: 1, disk_limit: 10 };
        let op = FileOp::Write { path: "/x".into(), size: 11, mode: None };
        assert_eq!(relay.capped(op).unwrap_err(), FileError::TooLarge { size: 11, limit: 10 });
        let op = FileOp::List { path: "/".into(), depth: 1, max_entries: Some(u32::MAX) };
        assert!(matches!(
            relay.capped(op).unwrap().0,
            FileOp::List { max_entries: Some(LIST_MAX_ENTRIES), .. }
        ));
    }

    #[test]
    fn an_agent_past_its_window_loses_its_route() {
        let routes: FileRoutes = Arc::new(Mutex::new(HashMap::new()));
        let (tx, rx) = mpsc::sync_channel(2);
        routes.lock().unwrap().insert(4, tx);
        route_file_reply(&routes, 4, data(1));
        route_file_reply(&routes, 4, data(1));
        assert!(routes.lock().unwrap().contains_key(&4));
        route_file_reply(&routes, 4, data(1));
        assert!(!routes.lock().unwrap().contains_key(&4), "a full window drops the route");
        assert_eq!(rx.iter().count(), 2, "and the waiting side sees the end");
        // Unknown ids are ignored.
        route_file_reply(&routes, 9, FileReply::Done);
    }
}
