//! Typed file operations, carried out by the agent inside the sandbox so
//! that a path means what it means to the sandbox's own processes and can
//! reach nothing else: read, write, stat, list, make a directory, remove,
//! rename, and watch a directory. None needs a program inside the sandbox.
//!
//! The agent's answers are untrusted: they carry no free text (errors are a
//! closed kind plus an errno; names and a symlink's target travel as bytes
//! for the host to escape), and the host re-checks every limit it set.
//!
//! Streams are flow-controlled both ways with a window of [`FILE_WINDOW`]
//! messages: the agent sends at most that many data chunks, list batches or
//! watch events ahead of the host's [`crate::HostMessage::FileAck`], and the
//! host sends at most that many [`crate::HostMessage::FileData`] chunks of a
//! write ahead of the agent's [`FileReply::Ack`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest data chunk either side sends per message.
pub const FILE_CHUNK: usize = 64 * 1024;
/// How many messages of one operation may be in flight ahead of the other
/// side's acknowledgements: neither side ever buffers more than this many
/// per operation, however slow its peer.
pub const FILE_WINDOW: u32 = 16;
/// Most entries a listing returns when the caller gives no cap, and the
/// most it may ask for.
pub const LIST_MAX_ENTRIES: u32 = 100_000;
/// Deepest a listing descends.
pub const LIST_MAX_DEPTH: u32 = 64;
/// Entries per [`FileReply::Entries`] message: each takes a few hundred
/// bytes at most (a 255-byte name in base64 and a link target of up to
/// 4096), so a batch stays far below the frame limit.
pub const LIST_BATCH: usize = 128;
/// Most directories one watch covers (a recursive watch adds one per
/// directory below).
pub const WATCH_MAX_DIRS: u32 = 4096;
/// Most watches a sandbox's agent runs at once.
pub const WATCH_MAX_ACTIVE: u32 = 16;
/// The prefix of the temporary file a write fills before renaming it over
/// its target (hidden, and recognisable if the agent dies mid-write).
pub const WRITE_TEMP_PREFIX: &str = ".airlock-write.";
/// The mode of a file a write creates when the caller gives none.
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// The mode of a directory mkdir creates when the caller gives none.
pub const DEFAULT_DIR_MODE: u32 = 0o755;

/// What to do, and where (absolute paths in the sandbox's view).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FileOp {
    /// Stream a regular file: [`FileReply::Opened`], then
    /// [`FileReply::Data`] chunks, then [`FileReply::Done`]. The last path
    /// component is opened without following a symlink and without waiting
    /// (a FIFO cannot hang the open); anything but a regular file is refused.
    /// More than `max_bytes` bytes is refused, before or while reading.
    Read {
        path: PathBuf,
        /// The caller's own cap; the supervisor lowers it to the sandbox's
        /// disk budget (the largest file the sandbox can write).
        #[serde(default)]
        max_bytes: Option<u64>,
    },
    /// Replace (or create) a regular file with exactly `size` bytes: the
    /// agent answers [`FileReply::Ready`] once a temporary file is open in
    /// the target's directory, takes [`crate::HostMessage::FileData`]
    /// chunks (acknowledging each with [`FileReply::Ack`]), and renames the
    /// temporary file over the target only once all `size` bytes arrived
    /// ([`FileReply::Done`]). Cancelled or broken off, the temporary file is
    /// removed and the target left as it was. A replaced file keeps its
    /// mode (and owner); a new one gets `mode` (default 0644). A target that
    /// exists and is not a regular file (a symlink included) is refused.
    Write {
        path: PathBuf,
        size: u64,
        #[serde(default)]
        mode: Option<u32>,
    },
    /// Describe the path itself (lstat: a symlink is described, not
    /// followed): [`FileReply::Stat`], then `Done`.
    Stat { path: PathBuf },
    /// A directory's entries, down to `depth` levels (1: its own entries),
    /// in [`FileReply::Entries`] batches, then `Done`. Symlinks are listed,
    /// never followed (the directory named may be reached through one, as
    /// any path is). At most `max_entries`; the last batch says whether
    /// more were left out.
    List {
        path: PathBuf,
        #[serde(default = "one")]
        depth: u32,
        #[serde(default)]
        max_entries: Option<u32>,
    },
    /// Make a directory (and, with `parents`, the missing ones above it; an
    /// existing directory is then no error).
    Mkdir {
        path: PathBuf,
        #[serde(default)]
        parents: bool,
        #[serde(default)]
        mode: Option<u32>,
    },
    /// Remove a file, a symlink (never what it points to) or an empty
    /// directory; with `recursive`, a directory and everything below it,
    /// without following any symlink.
    Remove {
        path: PathBuf,
        #[serde(default)]
        recursive: bool,
    },
    /// Rename `from` to `to` (both in the sandbox); with `replace: false`
    /// an existing `to` is refused rather than replaced.
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[serde(default = "yes")]
        replace: bool,
    },
    /// Watch a directory (with `recursive`, the directories below it too,
    /// up to [`WATCH_MAX_DIRS`]): [`FileReply::Watching`], then
    /// [`FileReply::Event`]s until the host cancels. Events the host is too
    /// slow to take are dropped and reported as one `overflow` event.
    Watch {
        path: PathBuf,
        #[serde(default)]
        recursive: bool,
    },
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

impl FileOp {
    /// The path the operation is about (for a rename, its source).
    pub fn path(&self) -> &Path {
        match self {
            FileOp::Read { path, .. }
            | FileOp::Write { path, .. }
            | FileOp::Stat { path }
            | FileOp::List { path, .. }
            | FileOp::Mkdir { path, .. }
            | FileOp::Remove { path, .. }
            | FileOp::Watch { path, .. } => path,
            FileOp::Rename { from, .. } => from,
        }
    }

    /// Every path the operation names.
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            FileOp::Rename { from, to, .. } => vec![from, to],
            other => vec![other.path()],
        }
    }

    /// A short name for logs and audit records.
    pub fn name(&self) -> &'static str {
        match self {
            FileOp::Read { .. } => "read",
            FileOp::Write { .. } => "write",
            FileOp::Stat { .. } => "stat",
            FileOp::List { .. } => "list",
            FileOp::Mkdir { .. } => "mkdir",
            FileOp::Remove { .. } => "remove",
            FileOp::Rename { .. } => "rename",
            FileOp::Watch { .. } => "watch",
        }
    }
}

/// What lstat says about one path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileInfo {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    /// Modification time: seconds and nanoseconds since the epoch.
    pub mtime: i64,
    #[serde(default)]
    pub mtime_nsec: u32,
    /// Owner, as numbers in the sandbox's own user namespace.
    pub uid: u32,
    pub gid: u32,
    /// A symlink's target, as bytes (escape before showing it).
    #[serde(default, with = "crate::bytes::option", skip_serializing_if = "Option::is_none")]
    pub link_target: Option<Vec<u8>>,
}

/// One entry of a listing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListEntry {
    /// The path below the listed directory (`a`, `a/b` at depth 2), as bytes.
    #[serde(with = "crate::bytes")]
    pub name: Vec<u8>,
    #[serde(flatten)]
    pub info: FileInfo,
}

/// What a watch saw.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WatchEventKind {
    Created,
    Modified,
    Removed,
    RenamedFrom,
    RenamedTo,
    /// Events were lost (the kernel's queue or the agent's overflowed); the
    /// directory should be listed again.
    Overflow,
    /// The watched directory itself went away; no more events follow.
    Gone,
}

/// One event of a watch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: WatchEventKind,
    /// The path below the watched directory, as bytes (empty for the
    /// directory itself and for `overflow`).
    #[serde(with = "crate::bytes")]
    pub name: Vec<u8>,
    /// Whether the entry is a directory.
    #[serde(default)]
    pub dir: bool,
    /// Pairs a `renamed_from` with its `renamed_to` (0 otherwise).
    #[serde(default)]
    pub cookie: u32,
}

/// One answer to a [`FileOp`]. An operation ends with `Done` or `Failed`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum FileReply {
    /// Read: the file is open and regular; `size` is what fstat said, and at
    /// most `limit` bytes will follow.
    Opened {
        size: u64,
        mode: u32,
        limit: u64,
    },
    /// Read: the next bytes of the file.
    Data {
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    /// Write: the temporary file is open; data may follow.
    Ready,
    /// Write: one more data chunk is on disk; the host may send another.
    Ack,
    /// Stat: what the path is.
    Stat(FileInfo),
    /// List: the next entries; `truncated` (on the last batch) says that
    /// more were left out at the cap.
    Entries {
        entries: Vec<ListEntry>,
        #[serde(default)]
        truncated: bool,
    },
    /// Watch: the directories are watched; `dirs` how many.
    Watching {
        dirs: u32,
    },
    /// Watch: something changed.
    Event(WatchEvent),
    /// The operation finished (for a read: every byte was sent).
    Done,
    Failed(FileError),
}

impl FileReply {
    /// Whether this is an operation's last answer.
    pub fn is_last(&self) -> bool {
        matches!(self, FileReply::Done | FileReply::Failed(_))
    }

    /// Whether the sender counts this answer against its window (the
    /// receiver acknowledges it with `FileAck`).
    pub fn is_windowed(&self) -> bool {
        matches!(self, FileReply::Data { .. } | FileReply::Entries { .. } | FileReply::Event(_))
    }
}

/// Why a file operation failed. No free text: the host words it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum FileError {
    /// Nothing at the path (or a directory on the way is missing).
    NotFound,
    /// The path names something other than a regular file.
    NotRegular {
        found: FileKind,
        /// A symlink's target, as bytes (escape before showing it).
        #[serde(default, with = "crate::bytes::option")]
        link_target: Option<Vec<u8>>,
    },
    /// Larger than the cap: `size` is what was known when it was refused (at
    /// least `limit + 1` when the file grew while it was read).
    TooLarge { size: u64, limit: u64 },
    /// Something already exists where the operation would create one.
    Exists { found: FileKind },
    /// The path (or, for a write, its target) names something other than
    /// a directory where one is needed.
    NotDirectory {
        found: FileKind,
        #[serde(default, with = "crate::bytes::option")]
        link_target: Option<Vec<u8>>,
    },
    /// A directory to remove is not empty (and `recursive` was not asked).
    NotEmpty,
    /// The path is not absolute, or names nothing to act on (`/` itself).
    InvalidPath,
    /// A cap of the agent's: most watched directories, most watches at once.
    LimitReached { limit: u32 },
    /// A write's data did not add up to the size it declared.
    SizeMismatch { expected: u64, received: u64 },
    /// The kernel refused (permission, I/O error, …): its errno.
    Os { errno: i32 },
    /// The operation broke off: the host cancelled it, or a peer broke the
    /// protocol (the host fills this in; an agent never needs it).
    Aborted,
}

/// What a path turned out to be.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Unknown,
}

impl FileKind {
    /// The kind of a `st_mode`.
    pub fn from_mode(mode: u32) -> FileKind {
        match mode & 0o170000 {
            0o100000 => FileKind::Regular,
            0o040000 => FileKind::Directory,
            0o120000 => FileKind::Symlink,
            0o010000 => FileKind::Fifo,
            0o140000 => FileKind::Socket,
            0o020000 => FileKind::CharDevice,
            0o060000 => FileKind::BlockDevice,
            _ => FileKind::Unknown,
        }
    }

    /// "a directory", "a FIFO", … for messages.
    pub fn describe(self) -> &'static str {
        match self {
            FileKind::Regular => "a regular file",
            FileKind::Directory => "a directory",
            FileKind::Symlink => "a symbolic link",
            FileKind::Fifo => "a FIFO (named pipe)",
            FileKind::Socket => "a socket",
            FileKind::CharDevice => "a character device",
            FileKind::BlockDevice => "a block device",
            FileKind::Unknown => "a file of unknown type",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn file_messages_have_a_stable_wire_form() {
        let op = FileOp::Read { path: "/tmp/a".into(), max_bytes: Some(5) };
        assert_eq!(serde_json::to_string(&op).unwrap(), r#"{"op":"read","path":"/tmp/a","max_bytes":5}"#);
        let old: FileOp = serde_json::from_str(r#"{"op":"read","path":"/x"}"#).unwrap();
        assert_eq!(old, FileOp::Read { path: "/x".into(), max_bytes: None });
        let refused = FileReply::Failed(FileError::NotRegular {
            found: FileKind::Symlink,
            link_target: Some(b"/dev/zero".to_vec()),
        });
        let text = serde_json::to_string(&refused).unwrap();
        assert_eq!(
            text,
            r#"{"reply":"failed","error":"not_regular","found":"symlink","link_target":"L2Rldi96ZXJv"}"#
        );
        assert_eq!(serde_json::from_str::<FileReply>(&text).unwrap(), refused);
        assert!(serde_json::from_str::<FileReply>(r#"{"reply":"failed","error":"root_please"}"#).is_err());
    }

    #[test]
    fn kinds_come_from_the_mode() {
        assert_eq!(FileKind::from_mode(0o100644), FileKind::Regular);
        assert_eq!(FileKind::from_mode(0o010600), FileKind::Fifo);
        assert_eq!(FileKind::from_mode(0o020666), FileKind::CharDevice);
        assert_eq!(FileKind::from_mode(0o040755), FileKind::Directory);
        assert_eq!(FileKind::from_mode(0o120777), FileKind::Symlink);
        assert_eq!(FileKind::from_mode(0), FileKind::Unknown);
    }
}
