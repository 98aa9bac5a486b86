//! The host's side of the typed file operations (`proto::file`): what
//! `airlock cp`, `airlock files` and the daemon's files API call, whoever
//! the front end. The agent does the work inside the sandbox, in the
//! sandbox's own view; the supervisor relays and caps it; this end checks
//! the caps once more on what it receives and words the errors
//! ([`FilesError`]), quoting whatever came from inside.

mod error;
pub mod view;

use std::io::{self, Read, Write};
use std::time::Duration;

use airlock_proto::file::{
    FILE_CHUNK, FileError, FileInfo, FileOp, FileReply, LIST_MAX_ENTRIES, ListEntry, WatchEvent,
};
use airlock_workspace::quote_bytes;
pub use error::{FailureKind, FilesError};

use crate::supervisor::{FileSession, SupervisorClient};

/// The longest path accepted (PATH_MAX).
pub const PATH_MAX_BYTES: usize = 4096;

/// Checks a path in the sandbox before asking: absolute, no NUL, at most
/// [`PATH_MAX_BYTES`].
pub fn check_path(path: &str) -> Result<(), FilesError> {
    let invalid = |why| Err(FilesError::InvalidPath { path: quote_bytes(path.as_bytes()), why });
    if !path.starts_with('/') {
        return invalid("it is not absolute");
    }
    if path.contains('\0') {
        return invalid("it holds a NUL byte");
    }
    if path.len() > PATH_MAX_BYTES {
        return invalid("it is longer than 4096 bytes");
    }
    Ok(())
}

/// A name or path from inside the sandbox, as one token safe to print.
pub fn shown(name: &[u8]) -> String {
    quote_bytes(name)
}

/// What a read found before its bytes: the file's size and permission bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub size: u64,
    pub mode: u32,
    pub limit: u64,
}

/// Runs an operation that answers with its end only, or with one answer
/// before it; returns that answer.
fn simple(client: &SupervisorClient, op: FileOp, shown: &str) -> Result<Option<FileReply>, FilesError> {
    let name = op.name();
    check_paths(&op)?;
    let mut session = client.file_session(&op).map_err(|source| FilesError::Supervisor {
        op: name,
        path: shown.into(),
        source,
    })?;
    let mut answer = None;
    loop {
        match session.answer() {
            Ok(FileReply::Done) => return Ok(answer),
            Ok(FileReply::Failed(e)) => return Err(FilesError::from_agent(name, shown, e)),
            Ok(reply) if answer.is_none() => answer = Some(reply),
            Ok(_) => return Err(FilesError::Protocol { op: name, path: shown.into() }),
            Err(source) => return Err(FilesError::Supervisor { op: name, path: shown.into(), source }),
        }
    }
}

fn check_paths(op: &FileOp) -> Result<(), FilesError> {
    for path in op.paths() {
        check_path(&path.to_string_lossy())?;
    }
    Ok(())
}

/// lstat of `path` in the sandbox: a symlink is described (with its
/// target), not followed.
pub fn stat(client: &SupervisorClient, path: &str) -> Result<FileInfo, FilesError> {
    let shown = shown(path.as_bytes());
    match simple(client, FileOp::Stat { path: path.into() }, &shown)? {
        Some(FileReply::Stat(info)) => Ok(info),
        _ => Err(FilesError::Protocol { op: "stat", path: shown }),
    }
}

/// A listing: the entries (names are bytes below the directory), and
/// whether more were left out at the cap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<ListEntry>,
    pub truncated: bool,
}

/// The entries of the directory `path` down to `depth` levels, at most
/// `max_entries` (and never more than `LIST_MAX_ENTRIES`). Symlinks are
/// listed, not followed.
pub fn list(
    client: &SupervisorClient,
    path: &str,
    depth: u32,
    max_entries: Option<u32>,
) -> Result<Listing, FilesError> {
    let shown = shown(path.as_bytes());
    let cap = max_entries.unwrap_or(LIST_MAX_ENTRIES).min(LIST_MAX_ENTRIES) as usize;
    let op = FileOp::List { path: path.into(), depth, max_entries: Some(cap as u32) };
    check_paths(&op)?;
    let supervisor = |source| FilesError::Supervisor { op: "list", path: shown.clone(), source };
    let mut session = client.file_session(&op).map_err(supervisor)?;
    let mut listing = Listing::default();
    loop {
        match session.answer().map_err(supervisor)? {
            FileReply::Entries { entries, truncated } => {
                listing.entries.extend(entries);
                listing.truncated |= truncated;
                // Checked here too: the agent is inside the sandbox.
                if listing.entries.len() > cap {
                    return Err(FilesError::Protocol { op: "list", path: shown });
                }
            }
            FileReply::Done => return Ok(listing),
            FileReply::Failed(e) => return Err(FilesError::from_agent("list", &shown, e)),
            _ => return Err(FilesError::Protocol { op: "list", path: shown }),
        }
    }
}

/// Makes the directory `path` (with `parents`, the missing ones above it
/// too) with `mode` (default 0755).
pub fn mkdir(
    client: &SupervisorClient,
    path: &str,
    parents: bool,
    mode: Option<u32>,
) -> Result<(), FilesError> {
    let shown = shown(path.as_bytes());
    simple(client, FileOp::Mkdir { path: path.into(), parents, mode }, &shown).map(drop)
}

/// Removes a file, a symlink (not what it points to) or an empty directory;
/// with `recursive`, a directory and everything below it, following no link.
pub fn remove(client: &SupervisorClient, path: &str, recursive: bool) -> Result<(), FilesError> {
    let shown = shown(path.as_bytes());
    simple(client, FileOp::Remove { path: path.into(), recursive }, &shown).map(drop)
}

/// Renames `from` to `to`; without `replace` an existing `to` is refused.
pub fn rename(client: &SupervisorClient, from: &str, to: &str, replace: bool) -> Result<(), FilesError> {
    let shown = shown(from.as_bytes());
    let op = FileOp::Rename { from: from.into(), to: to.into(), replace };
    match simple(client, op, &shown) {
        // Which path exists is the destination's business.
        Err(FilesError::Exists { op, found, .. }) => {
            Err(FilesError::Exists { op, path: quote_bytes(to.as_bytes()), found })
        }
        other => other.map(drop),
    }
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
) -> Result<u64, FilesError> {
    let shown = shown(path.as_bytes());
    let op = FileOp::Read { path: path.into(), max_bytes };
    check_paths(&op)?;
    let mut opened: Option<Opened> = None;
    let mut written: u64 = 0;
    let mut outcome: Option<Result<(), FilesError>> = None;
    let result = client.file(&op, &mut |reply| {
        let step = match (reply, opened) {
            (FileReply::Opened { size, mode, limit }, None) => {
                let info = Opened { size, mode, limit: max_bytes.map_or(limit, |m| m.min(limit)) };
                opened = Some(info);
                on_open(info).map_err(|source| FilesError::Output { path: shown.clone(), source })
            }
            (FileReply::Data { data }, Some(info)) => {
                written += data.len() as u64;
                // The supervisor already caps it; the sandbox is on the
                // other side of it, so the cap is checked here too.
                if written > info.limit {
                    Err(FilesError::Grew { path: shown.clone(), limit: info.limit })
                } else {
                    sink.write_all(&data).map_err(|source| FilesError::Output { path: shown.clone(), source })
                }
            }
            (FileReply::Done, Some(_)) => {
                outcome =
                    Some(sink.flush().map_err(|source| FilesError::Output { path: shown.clone(), source }));
                return false;
            }
            (FileReply::Failed(FileError::TooLarge { size, limit }), Some(_)) if size > limit => {
                Err(FilesError::Grew { path: shown.clone(), limit })
            }
            (FileReply::Failed(e), _) => Err(FilesError::from_agent("read", &shown, e)),
            _ => Err(FilesError::Aborted { op: "read", path: shown.clone() }),
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
        (None, Err(source)) => Err(FilesError::Supervisor { op: "read", path: shown, source }),
        (None, Ok(())) => Err(FilesError::Aborted { op: "read", path: shown }),
    }
}

/// Writes exactly `size` bytes from `source` to `path` in the sandbox. The
/// target is replaced only once all of them arrived (keeping its mode; a
/// new file gets `mode`, default 0644); a source that ends early or has
/// more than `size` bytes, or any failure, leaves it as it was. Returns the
/// bytes written.
pub fn write_file(
    client: &SupervisorClient,
    path: &str,
    size: u64,
    mode: Option<u32>,
    source: &mut dyn Read,
) -> Result<u64, FilesError> {
    let shown = shown(path.as_bytes());
    let op = FileOp::Write { path: path.into(), size, mode };
    check_paths(&op)?;
    // An empty file is complete as soon as the agent has it open: a source
    // that was not empty after all must be caught before.
    if size == 0 && grew(source) {
        return Err(FilesError::SizeMismatch { path: shown, expected: 0, received: 1 });
    }
    let supervisor = |source| FilesError::Supervisor { op: "write", path: shown.clone(), source };
    let mut session = client.file_session(&op).map_err(supervisor)?;
    match session.answer().map_err(supervisor)? {
        FileReply::Ready => {}
        FileReply::Failed(e) => return Err(FilesError::from_agent("write", &shown, e)),
        _ => return Err(FilesError::Protocol { op: "write", path: shown }),
    }
    let mut sent: u64 = 0;
    let mut buf = vec![0u8; FILE_CHUNK];
    while sent < size {
        let want = usize::try_from((size - sent).min(FILE_CHUNK as u64)).unwrap_or(FILE_CHUNK);
        let n = match source.read(&mut buf[..want]) {
            Ok(0) => return Err(FilesError::SizeMismatch { path: shown, expected: size, received: sent }),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(FilesError::Input { path: shown, source }),
        };
        if sent + n as u64 == size && grew(source) {
            // Dropping the session cancels: the target stays as it was.
            return Err(FilesError::SizeMismatch { path: shown, expected: size, received: size + 1 });
        }
        // The agent may have failed meanwhile (a full disk): its answer
        // waits on the connection.
        if session.wait(Duration::ZERO).map_err(supervisor)? {
            return match session.answer().map_err(supervisor)? {
                FileReply::Failed(e) => Err(FilesError::from_agent("write", &shown, e)),
                _ => Err(FilesError::Protocol { op: "write", path: shown }),
            };
        }
        session.send_data(buf[..n].to_vec()).map_err(supervisor)?;
        sent += n as u64;
    }
    match session.answer().map_err(supervisor)? {
        FileReply::Done => Ok(sent),
        FileReply::Failed(e) => Err(FilesError::from_agent("write", &shown, e)),
        _ => Err(FilesError::Protocol { op: "write", path: shown }),
    }
}

/// Whether a source that gave its announced size still has more.
fn grew(source: &mut dyn Read) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match source.read(&mut byte) {
            Ok(n) => return n > 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// How often [`watch`] calls back when nothing happens, so its caller can
/// notice that its own client went away.
pub const WATCH_TICK: Duration = Duration::from_millis(500);

/// Watches the directory `path` (with `recursive`, those below it too),
/// calling `on_event` with each event, and with `None` every
/// [`WATCH_TICK`] of quiet, until it answers false (the watch is then
/// cancelled) or the directory goes away. Names in events are bytes below
/// the directory: show them with [`shown`].
pub fn watch(
    client: &SupervisorClient,
    path: &str,
    recursive: bool,
    on_event: &mut dyn FnMut(Option<&WatchEvent>) -> bool,
) -> Result<(), FilesError> {
    let shown = shown(path.as_bytes());
    let op = FileOp::Watch { path: path.into(), recursive };
    check_paths(&op)?;
    let supervisor = |source| FilesError::Supervisor { op: "watch", path: shown.clone(), source };
    let mut session: FileSession = client.file_session(&op).map_err(supervisor)?;
    match session.answer().map_err(supervisor)? {
        FileReply::Watching { .. } => {}
        FileReply::Failed(e) => return Err(FilesError::from_agent("watch", &shown, e)),
        _ => return Err(FilesError::Protocol { op: "watch", path: shown }),
    }
    if !on_event(None) {
        return Ok(());
    }
    loop {
        if !session.wait(WATCH_TICK).map_err(supervisor)? {
            if !on_event(None) {
                return Ok(());
            }
            continue;
        }
        match session.answer().map_err(supervisor)? {
            FileReply::Event(event) => {
                if !on_event(Some(&event)) {
                    return Ok(());
                }
            }
            FileReply::Done => return Ok(()),
            FileReply::Failed(e) => return Err(FilesError::from_agent("watch", &shown, e)),
            _ => return Err(FilesError::Protocol { op: "watch", path: shown }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use airlock_proto::file::FileKind;

    use super::*;

    #[test]
    fn paths_are_checked_before_asking() {
        assert!(check_path("/tmp/x").is_ok());
        for bad in ["tmp/x", "", "/a\0b"] {
            assert!(matches!(check_path(bad), Err(FilesError::InvalidPath { .. })), "{bad:?}");
        }
        assert!(check_path(&format!("/{}", "a".repeat(PATH_MAX_BYTES))).is_err());
    }

    #[test]
    fn errors_say_what_to_do_and_quote_what_came_from_inside() {
        let link = FilesError::from_agent(
            "read",
            "/tmp/l",
            FileError::NotRegular { found: FileKind::Symlink, link_target: Some(b"/x\n\x1b[31m".to_vec()) },
        )
        .to_string();
        assert!(link.contains(r#""/x\n\033[31m""#), "{link}");
        assert!(!link.contains('\x1b'));
        let missing = FilesError::from_agent("write", "/no/dir/f", FileError::NotFound).to_string();
        assert!(missing.contains("does not exist") && missing.contains("mkdir"), "{missing}");
        let exists = FilesError::from_agent("rename", "/b", FileError::Exists { found: FileKind::Regular });
        assert!(exists.to_string().contains("allow replacing it"), "{exists}");
        assert_eq!(exists.kind(), FailureKind::Conflict);
        assert_eq!(FilesError::from_agent("read", "/x", FileError::NotFound).kind(), FailureKind::NotFound);
    }

    #[test]
    fn a_source_that_grew_is_noticed() {
        assert!(grew(&mut &b"x"[..]));
        assert!(!grew(&mut &b""[..]));
    }
}
