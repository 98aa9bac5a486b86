//! Typed file operations, carried out by the agent inside the sandbox so
//! that a path means what it means to the sandbox's own processes and can
//! reach nothing else. Today: reading a regular file. Writing, stat, list,
//! mkdir, remove, rename and watch join [`FileOp`] in the same style.
//!
//! The agent's answers are untrusted: they carry no free text (errors are a
//! closed kind plus an errno; a symlink's target travels as bytes for the
//! host to escape), and the host re-checks every limit it set.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest data chunk the agent sends per message.
pub const FILE_CHUNK: usize = 64 * 1024;
/// How many data chunks the agent may send ahead of the host's
/// acknowledgements ([`crate::HostMessage::FileAck`]): the host buffers at
/// most this many per read, however slow its own client is.
pub const FILE_WINDOW: u32 = 16;

/// What to do, and where (an absolute path in the sandbox's view).
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
}

impl FileOp {
    pub fn path(&self) -> &std::path::Path {
        match self {
            FileOp::Read { path, .. } => path,
        }
    }
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
    /// The operation finished (for a read: every byte was sent).
    Done,
    Failed(FileError),
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
