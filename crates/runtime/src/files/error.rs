//! Why a file operation on a sandbox failed, in words: what was asked, why
//! it did not happen, and what to do. Whatever came from inside (a link's
//! target, a name) is quoted with `quote_bytes` before it is shown.

use std::io;

use airlock_proto::file::{FileError, FileKind};
use airlock_workspace::quote_bytes;

/// Why a file operation on a sandbox failed.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{path}: not a path in the sandbox ({why}); give an absolute path such as /tmp/file")]
    InvalidPath { path: String, why: &'static str },
    #[error("{}", not_found(op, path))]
    NotFound { op: &'static str, path: String },
    #[error("{path} in the sandbox is {}", not_regular(op, *found, target.as_deref()))]
    NotRegular {
        op: &'static str,
        path: String,
        found: FileKind,
        /// A symlink's target, already quoted for display.
        target: Option<String>,
    },
    #[error("{path} in the sandbox is {}, not a directory{}", found.describe(), link(target.as_deref()))]
    NotDirectory { path: String, found: FileKind, target: Option<String> },
    #[error("{path} already exists in the sandbox ({}); remove it first, or {}", found.describe(), if *op == "rename" { "allow replacing it" } else { "choose another name" })]
    Exists { op: &'static str, path: String, found: FileKind },
    #[error(
        "{path} in the sandbox is a directory that is not empty; remove it recursively to remove what it holds"
    )]
    NotEmpty { path: String },
    #[error(
        "{path} in the sandbox is {} bytes, more than the {} a copy out of this sandbox may take (its disk \
         budget, the largest file anything inside can write); a file that large is the host's own: copy it \
         on the host", fmt_size(*size), fmt_size(*limit)
    )]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error(
        "{path}: {} bytes is more than this sandbox's disk budget of {} (the largest file anything inside \
         can write); nothing was written", fmt_size(*size), fmt_size(*limit)
    )]
    TooLargeToWrite { path: String, size: u64, limit: u64 },
    #[error("{path} grew past {} while it was read (the most a copy out of this sandbox may take); nothing was kept", fmt_size(*limit))]
    Grew { path: String, limit: u64 },
    #[error(
        "the copy to {path} broke off: the source changed size while it was read ({expected} bytes announced, {}); \
         the file in the sandbox is unchanged, copy again",
        if received > expected { "more arrived".to_owned() } else { format!("{received} arrived") }
    )]
    SizeMismatch { path: String, expected: u64, received: u64 },
    #[error("watching {path}: the sandbox allows at most {limit} {}; watch fewer directories (not recursively) or stop another watch", if *limit > 100 { "watched directories" } else { "watches at once" })]
    LimitReached { path: String, limit: u32 },
    #[error("{op} {path} in the sandbox: {source}")]
    Os {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} {path} broke off inside the sandbox; nothing was changed or kept, try again")]
    Aborted { op: &'static str, path: String },
    #[error("{op} {path}: the sandbox's supervisor: {source}; is the sandbox running? (see `airlock ls`)")]
    Supervisor {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} {path}: the sandbox's agent answered out of turn; nothing was kept")]
    Protocol { op: &'static str, path: String },
    #[error("writing the copy of {path}: {source}")]
    Output {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("reading what to write to {path}: {source}; the file in the sandbox is unchanged")]
    Input {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn not_found(op: &str, path: &str) -> String {
    match op {
        "write" => format!("the directory of {path} does not exist in the sandbox; make it first (mkdir)"),
        "mkdir" => {
            format!("the directory above {path} does not exist in the sandbox; make the parents too (-p)")
        }
        _ => format!("no file {path} in the sandbox"),
    }
}

fn link(target: Option<&str>) -> String {
    target.map(|t| format!(" (it points to {t})")).unwrap_or_default()
}

fn not_regular(op: &str, found: FileKind, target: Option<&str>) -> String {
    let what = if op == "write" { "replaced by a copy" } else { "copied out" };
    match (found, target) {
        (FileKind::Symlink, Some(target)) => {
            format!("a symbolic link to {target}; links are not followed: name the file it points to")
        }
        (FileKind::Symlink, None) => "a symbolic link; links are not followed: name the file itself".into(),
        (found, _) => format!("{}; only regular files are {what}", found.describe()),
    }
}

pub(crate) fn fmt_size(bytes: u64) -> String {
    if bytes < 1024 {
        format!("{bytes}")
    } else {
        format!("{bytes} ({})", airlock_policy::format_size(bytes))
    }
}

impl FilesError {
    /// Words the agent's error kind for operation `op` on `path` (already
    /// quoted).
    pub(crate) fn from_agent(op: &'static str, path: &str, error: FileError) -> FilesError {
        let path = path.to_owned();
        let quoted = |t: Option<Vec<u8>>| t.map(|t| quote_bytes(&t));
        match error {
            FileError::NotFound => FilesError::NotFound { op, path },
            FileError::NotRegular { found, link_target } => {
                FilesError::NotRegular { op, path, found, target: quoted(link_target) }
            }
            FileError::NotDirectory { found, link_target } => {
                FilesError::NotDirectory { path, found, target: quoted(link_target) }
            }
            FileError::Exists { found } => FilesError::Exists { op, path, found },
            FileError::NotEmpty => FilesError::NotEmpty { path },
            FileError::InvalidPath => FilesError::InvalidPath { path, why: "it names nothing to act on" },
            FileError::TooLarge { size, limit } if op == "write" => {
                FilesError::TooLargeToWrite { path, size, limit }
            }
            FileError::TooLarge { size, limit } => FilesError::TooLarge { path, size, limit },
            FileError::LimitReached { limit } => FilesError::LimitReached { path, limit },
            FileError::SizeMismatch { expected, received } => {
                FilesError::SizeMismatch { path, expected, received }
            }
            FileError::Os { errno } => {
                FilesError::Os { op, path, source: io::Error::from_raw_os_error(errno) }
            }
            FileError::Aborted => FilesError::Aborted { op, path },
        }
    }

    /// What kind of failure this is, for front ends that map it to their
    /// own codes (the API's statuses).
    pub fn kind(&self) -> FailureKind {
        match self {
            FilesError::InvalidPath { .. } => FailureKind::BadRequest,
            FilesError::NotFound { .. } => FailureKind::NotFound,
            FilesError::NotRegular { .. } | FilesError::NotDirectory { .. } => FailureKind::WrongType,
            FilesError::Exists { .. } | FilesError::NotEmpty { .. } => FailureKind::Conflict,
            FilesError::TooLarge { .. } | FilesError::TooLargeToWrite { .. } | FilesError::Grew { .. } => {
                FailureKind::TooLarge
            }
            FilesError::Supervisor { .. } => FailureKind::NotRunning,
            FilesError::Output { .. } => FailureKind::Host,
            FilesError::SizeMismatch { .. }
            | FilesError::Input { .. }
            | FilesError::LimitReached { .. }
            | FilesError::Os { .. }
            | FilesError::Aborted { .. }
            | FilesError::Protocol { .. } => FailureKind::Failed,
        }
    }
}

/// The classes of [`FilesError`] a front end tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    BadRequest,
    NotFound,
    WrongType,
    Conflict,
    TooLarge,
    NotRunning,
    /// The host's own side (writing the copy) failed.
    Host,
    Failed,
}
