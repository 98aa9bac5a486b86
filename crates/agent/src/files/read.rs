//! Reading a regular file out of the sandbox. The last component is opened
//! without following a symlink and without blocking (a FIFO opens at once
//! and is then refused), checked with fstat to hold a regular file, refused
//! when larger than the cap, and streamed at most `FILE_WINDOW` chunks ahead
//! of the host's acknowledgements.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use airlock_proto::file::{FILE_CHUNK, FileError, FileKind, FileReply};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use super::{Flow, Replier, os_error};

pub(super) fn read(replier: &Replier, flow: &Flow, path: &Path, limit: u64) {
    let reply = |reply| replier.send(reply);
    let file = match open_regular(path, limit) {
        Ok((file, size, mode)) => {
            reply(FileReply::Opened { size, mode, limit });
            file
        }
        Err(e) => return reply(FileReply::Failed(e)),
    };
    let file = std::fs::File::from(file);
    let mut buf = vec![0u8; FILE_CHUNK];
    let mut total: u64 = 0;
    loop {
        let n = match io::Read::read(&mut &file, &mut buf) {
            Ok(0) => return reply(FileReply::Done),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return reply(FileReply::Failed(os_error(&e))),
        };
        total = total.saturating_add(n as u64);
        if total > limit {
            // It grew while it was read.
            return reply(FileReply::Failed(FileError::TooLarge { size: total, limit }));
        }
        if !flow.reserve() {
            return;
        }
        reply(FileReply::Data { data: buf[..n].to_vec() });
    }
}

/// Opens `path` for reading if, and only if, it is a regular file of at
/// most `limit` bytes: (descriptor, size, permission bits).
fn open_regular(path: &Path, limit: u64) -> Result<(OwnedFd, u64, u32), FileError> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    // The sandbox can swap the path between the open and the look that
    // says why it failed; a few tries settle on one answer.
    let mut tries = 0;
    let fd = loop {
        tries += 1;
        match rustix::fs::open(path, flags, Mode::empty()) {
            Ok(fd) => break fd,
            Err(Errno::NOENT | Errno::NOTDIR) => return Err(FileError::NotFound),
            // A symlink as the last component (O_NOFOLLOW), or a socket or a
            // device without a driver: say what it is.
            Err(errno @ (Errno::LOOP | Errno::NXIO | Errno::NODEV)) => match describe_unopened(path) {
                Some(described) => return Err(described),
                None if tries < 3 => continue,
                None => return Err(FileError::Os { errno: errno.raw_os_error() }),
            },
            Err(errno) => return Err(FileError::Os { errno: errno.raw_os_error() }),
        }
    };
    let stat = rustix::fs::fstat(&fd).map_err(|errno| FileError::Os { errno: errno.raw_os_error() })?;
    let found = FileKind::from_mode(stat.st_mode);
    if found != FileKind::Regular {
        return Err(FileError::NotRegular { found, link_target: None });
    }
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    if size > limit {
        return Err(FileError::TooLarge { size, limit });
    }
    Ok((fd, size, stat.st_mode & 0o7777))
}

/// What a path that could not be opened is, without opening it; `None`
/// when it is (now) a regular file or gone, or a link no longer: it changed
/// under us, and the open is worth another try.
fn describe_unopened(path: &Path) -> Option<FileError> {
    let stat = rustix::fs::lstat(path).ok()?;
    let found = FileKind::from_mode(stat.st_mode);
    if found == FileKind::Regular {
        return None;
    }
    let link_target = match found {
        FileKind::Symlink => Some(rustix::fs::readlink(path, Vec::new()).ok()?.into_bytes()),
        _ => None,
    };
    Some(FileError::NotRegular { found, link_target })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn refusal(path: &Path, limit: u64) -> FileError {
        open_regular(path, limit).err().unwrap()
    }

    #[test]
    fn only_regular_files_under_the_cap_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"hello").unwrap();
        let (_, size, _) = open_regular(&file, 5).unwrap();
        assert_eq!(size, 5);
        assert_eq!(refusal(&file, 4), FileError::TooLarge { size: 5, limit: 4 });
        assert_eq!(refusal(&dir.path().join("absent"), 9), FileError::NotFound);
        assert_eq!(refusal(&file.join("below-a-file"), 9), FileError::NotFound);

        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert_eq!(
            refusal(&link, 9),
            FileError::NotRegular { found: FileKind::Symlink, link_target: Some(b"/dev/zero".to_vec()) }
        );
        // A FIFO with no writer: the open must not wait for one.
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_eq!(refusal(&fifo, 9), FileError::NotRegular { found: FileKind::Fifo, link_target: None });
        assert_eq!(
            refusal(Path::new("/dev/null"), 9),
            FileError::NotRegular { found: FileKind::CharDevice, link_target: None }
        );
        assert_eq!(
            refusal(dir.path(), 9),
            FileError::NotRegular { found: FileKind::Directory, link_target: None }
        );
        let socket = dir.path().join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(refusal(&socket, 9), FileError::NotRegular { found: FileKind::Socket, link_target: None });
    }
}
