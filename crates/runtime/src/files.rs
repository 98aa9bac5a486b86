//! The host's side of the typed file operations (`proto::file`): what `airlock
//! cp` and the daemon's files API call. The agent does the work inside the
//! sandbox; the supervisor relays and caps it; this end checks the cap once
//! more on the bytes it receives and words the errors, quoting whatever came
//! from inside.

use std::io::{self, Write};

use airlock_proto::file::{FileError, FileKind, FileOp, FileReply};
use airlock_workspace::quote_bytes;

use crate::supervisor::SupervisorClient;

/// Why a file could not be read out of a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no file {path} in the sandbox")]
    NotFound { path: String },
    #[error("{path} in the sandbox is {}", not_regular(*found, target.as_deref()))]
    NotRegular {
        path: String,
        found: FileKind,
        /// A symlink's target, already quoted for display.
        target: Option<String>,
    },
    #[error(
        "{path} in the sandbox is {} bytes, more than the {} a copy out of this sandbox may take (its disk \
         budget, the largest file anything inside can write); a file that large is the host's own: copy it \
         on the host", fmt_size(*size), fmt_size(*limit)
    )]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("{path} grew past {} while it was read (the most a copy out of this sandbox may take); nothing was kept", fmt_size(*limit))]
    Grew { path: String, limit: u64 },
    #[error("reading {path} in the sandbox: {source}")]
    Os {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("reading {path} broke off inside the sandbox; nothing was kept, copy again")]
    Aborted { path: String },
    #[error("reading {path}: the sandbox's supervisor: {source}")]
    Supervisor {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the copy of {path}: {source}")]
    Output {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn not_regular(found: FileKind, target: Option<&str>) -> String {
    match (found, target) {
        (FileKind::Symlink, Some(target)) => {
            format!("a symbolic link to {target}; links are not followed: name the file it points to")
        }
        (FileKind::Symlink, None) => "a symbolic link; links are not followed: name the file itself".into(),
        (found, _) => format!("{}; only regular files are copied out", found.describe()),
    }
}

fn fmt_size(bytes: u64) -> String {
    if bytes < 1024 {
        format!("{bytes}")
    } else {
        format!("{bytes} ({})", airlock_policy::format_size(bytes))
    }
}

impl ReadError {
    fn from_reply(path: &str, error: FileError) -> ReadError {
        let path = path.to_owned();
        match error {
            FileError::NotFound => ReadError::NotFound { path },
            FileError::NotRegular { found, link_target } => {
                ReadError::NotRegular { path, found, target: link_target.map(|t| quote_bytes(&t)) }
            }
            FileError::TooLarge { size, limit } => ReadError::TooLarge { path, size, limit },
            FileError::Os { errno } => ReadError::Os { path, source: io::Error::from_raw_os_error(errno) },
            FileError::Aborted => ReadError::Aborted { path },
        }
    }
}

/// What a read found before its bytes: the file's size and permission bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub size: u64,
    pub mode: u32,
    pub limit: u64,
}

/// Reads the regular file at `path` (absolute, in the sandbox's view) into
/// `sink`, at most `max_bytes` (and never more than the sandbox's disk
/// budget). `on_open` runs once the file is known to be readable, before any
/// byte is written. Returns the number of bytes written.
pub fn read_file(
    client: &SupervisorClient,
    path: &str,
    max_bytes: Option<u64>,
    on_open: &mut dyn FnMut(Opened) -> io::Result<()>,
    sink: &mut dyn Write,
) -> Result<u64, ReadError> {
    let shown = quote_bytes(path.as_bytes());
    let op = FileOp::Read { path: path.into(), max_bytes };
    let mut opened: Option<Opened> = None;
    let mut written: u64 = 0;
    let mut outcome: Option<Result<(), ReadError>> = None;
    let result = client.file(&op, &mut |reply| {
        let step = match (reply, opened) {
            (FileReply::Opened { size, mode, limit }, None) => {
                let info = Opened { size, mode, limit: max_bytes.map_or(limit, |m| m.min(limit)) };
                opened = Some(info);
                on_open(info).map_err(|source| ReadError::Output { path: shown.clone(), source })
            }
            (FileReply::Data { data }, Some(info)) => {
                written += data.len() as u64;
                // The supervisor already caps it; the sandbox is on the
                // other side of it, so the cap is checked here too.
                if written > info.limit {
                    Err(ReadError::Grew { path: shown.clone(), limit: info.limit })
                } else {
                    sink.write_all(&data).map_err(|source| ReadError::Output { path: shown.clone(), source })
                }
            }
            (FileReply::Done, Some(_)) => {
                outcome =
                    Some(sink.flush().map_err(|source| ReadError::Output { path: shown.clone(), source }));
                return false;
            }
            (FileReply::Failed(FileError::TooLarge { size, limit }), Some(_)) if size > limit => {
                Err(ReadError::Grew { path: shown.clone(), limit })
            }
            (FileReply::Failed(e), _) => Err(ReadError::from_reply(&shown, e)),
            _ => Err(ReadError::Aborted { path: shown.clone() }),
        };
        match step {
            Ok(()) => true,
            Err(e) => {
                outcome = Some(Err(e));
                false
            }
        }
    });
    match (outcome, result) {
        (Some(Ok(())), _) => Ok(written),
        (Some(Err(e)), _) => Err(e),
        (None, Err(source)) => Err(ReadError::Supervisor { path: shown, source }),
        (None, Ok(())) => Err(ReadError::Aborted { path: shown }),
    }
}
