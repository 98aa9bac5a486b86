//! Writing a file into the sandbox: the bytes go to a new temporary file in
//! the target's directory, which replaces the target (one rename) only once
//! every declared byte arrived. Anything else — a cancel, a host that goes
//! quiet, a short or long stream, a full disk — removes the temporary file
//! and leaves the target as it was.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use airlock_proto::file::{
    DEFAULT_FILE_MODE, FILE_CHUNK, FileError, FileKind, FileReply, WRITE_TEMP_PREFIX as TEMP_PREFIX,
};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use super::{Flow, Replier, errno_error};

/// How long a write waits for the host's next chunk before it gives up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

pub(super) fn write(
    replier: &Replier,
    flow: &Flow,
    data: &Receiver<Vec<u8>>,
    path: &Path,
    size: u64,
    mode: Option<u32>,
) {
    let mut staged = match Staged::create(path, mode) {
        Ok(staged) => staged,
        Err(e) => return replier.fail(e),
    };
    replier.send(FileReply::Ready);
    let mut received: u64 = 0;
    while received < size {
        let chunk = match data.recv_timeout(IDLE_TIMEOUT) {
            Ok(chunk) => chunk,
            // Cancelled (the channel closed) or abandoned: the guard
            // removes the temporary file.
            Err(RecvTimeoutError::Disconnected | RecvTimeoutError::Timeout) => {
                if !flow.cancelled() {
                    replier.fail(FileError::Aborted);
                }
                return;
            }
        };
        received = received.saturating_add(chunk.len() as u64);
        if received > size || chunk.len() > FILE_CHUNK {
            return replier.fail(FileError::SizeMismatch { expected: size, received });
        }
        if let Err(errno) = write_all(&staged.file, &chunk) {
            return replier.fail(errno_error(errno));
        }
        replier.send(FileReply::Ack);
    }
    if flow.cancelled() {
        return;
    }
    replier.finish(staged.commit());
}

fn write_all(file: &OwnedFd, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        match rustix::io::write(file, data) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => data = &data[n..],
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The temporary file of one write; removed on drop unless committed.
struct Staged {
    dir: OwnedFd,
    name: Vec<u8>,
    temp: Vec<u8>,
    file: OwnedFd,
    committed: bool,
}

/// The directory and the last component of `path`: no trailing `/`, and a
/// name that is neither `.` nor `..`.
pub(super) fn split(path: &Path) -> Result<(&Path, &[u8]), FileError> {
    let bytes = path.as_os_str().as_bytes();
    let at = bytes.iter().rposition(|b| *b == b'/').ok_or(FileError::InvalidPath)?;
    let name = &bytes[at + 1..];
    if name.is_empty() || name == b"." || name == b".." {
        return Err(FileError::InvalidPath);
    }
    let dir = if at == 0 { Path::new("/") } else { Path::new(std::ffi::OsStr::from_bytes(&bytes[..at])) };
    Ok((dir, name))
}

impl Staged {
    fn create(path: &Path, mode: Option<u32>) -> Result<Staged, FileError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let (dir, name) = split(path)?;
        let dir = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|errno| match errno {
                Errno::NOTDIR => FileError::NotFound,
                errno => errno_error(errno),
            })?;
        // A replaced file keeps its permission bits and owner; anything but
        // a regular file is refused (a symlink too: it is not followed).
        let existing = check_target(&dir, name)?;
        let mode = existing.as_ref().map_or(mode.unwrap_or(DEFAULT_FILE_MODE), |e| e.mode) & 0o7777;
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut tries = 0;
        loop {
            tries += 1;
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let temp = format!("{TEMP_PREFIX}{}.{n}.{nanos:x}", std::process::id()).into_bytes();
            match rustix::fs::openat(&dir, temp.as_slice(), flags, Mode::from_raw_mode(0o600)) {
                Ok(file) => {
                    let staged = Staged { dir, name: name.to_vec(), temp, file, committed: false };
                    // Exactly these bits, whatever the umask.
                    rustix::fs::fchmod(&staged.file, Mode::from_raw_mode(mode)).map_err(errno_error)?;
                    if let Some(existing) = existing {
                        // Root inside may give the file back to its owner;
                        // where the ids are not mapped it stays ours.
                        let _ = rustix::fs::fchown(
                            &staged.file,
                            Some(rustix::fs::Uid::from_raw(existing.uid)),
                            Some(rustix::fs::Gid::from_raw(existing.gid)),
                        );
                        rustix::fs::fchmod(&staged.file, Mode::from_raw_mode(mode)).map_err(errno_error)?;
                    }
                    return Ok(staged);
                }
                Err(Errno::EXIST) if tries < 8 => {}
                Err(errno) => return Err(errno_error(errno)),
            }
        }
    }

    /// Puts the complete file in place, after checking once more that the
    /// target has not become something else meanwhile.
    fn commit(&mut self) -> Result<(), FileError> {
        rustix::fs::fsync(&self.file).map_err(errno_error)?;
        check_target(&self.dir, &self.name)?;
        rustix::fs::renameat(&self.dir, self.temp.as_slice(), &self.dir, self.name.as_slice())
            .map_err(errno_error)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = rustix::fs::unlinkat(&self.dir, self.temp.as_slice(), AtFlags::empty());
        }
    }
}

struct Existing {
    mode: u32,
    uid: u32,
    gid: u32,
}

/// The target as it is: `None` when absent, its mode and owner when a
/// regular file, refused otherwise.
fn check_target(dir: &impl AsFd, name: &[u8]) -> Result<Option<Existing>, FileError> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => {
            let found = FileKind::from_mode(stat.st_mode);
            if found != FileKind::Regular {
                let link_target = (found == FileKind::Symlink)
                    .then(|| rustix::fs::readlinkat(dir, name, Vec::new()).ok().map(|t| t.into_bytes()))
                    .flatten();
                return Err(FileError::NotRegular { found, link_target });
            }
            Ok(Some(Existing { mode: stat.st_mode & 0o7777, uid: stat.st_uid, gid: stat.st_gid }))
        }
        Err(Errno::NOENT) => Ok(None),
        Err(errno) => Err(errno_error(errno)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn paths_split_into_a_directory_and_a_name() {
        assert_eq!(split(Path::new("/a/b")).unwrap(), (Path::new("/a"), &b"b"[..]));
        assert_eq!(split(Path::new("/b")).unwrap(), (Path::new("/"), &b"b"[..]));
        for bad in ["/", "/a/", "/a/.", "/a/..", "relative"] {
            assert_eq!(split(Path::new(bad)).unwrap_err(), FileError::InvalidPath, "{bad}");
        }
    }

    #[test]
    fn a_commit_keeps_the_mode_and_a_drop_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("file");
        std::fs::write(&target, b"old").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o751)).unwrap();

        let staged = Staged::create(&target, Some(0o600)).unwrap();
        write_all(&staged.file, b"half").unwrap();
        drop(staged);
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["file"], "no temporary file is left");

        let mut staged = Staged::create(&target, Some(0o600)).unwrap();
        write_all(&staged.file, b"new").unwrap();
        staged.commit().unwrap();
        drop(staged);
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777, 0o751);
        assert_eq!(names(dir.path()), ["file"]);

        let fresh = dir.path().join("fresh");
        Staged::create(&fresh, None).unwrap().commit().unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o7777, 0o644);
        let private = dir.path().join("private");
        Staged::create(&private, Some(0o600)).unwrap().commit().unwrap();
        assert_eq!(std::fs::metadata(&private).unwrap().permissions().mode() & 0o7777, 0o600);
    }

    #[test]
    fn only_a_regular_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        assert_eq!(
            Staged::create(&link, None).err().unwrap(),
            FileError::NotRegular { found: FileKind::Symlink, link_target: Some(b"/etc/passwd".to_vec()) }
        );
        assert_eq!(
            Staged::create(dir.path(), None).err().unwrap(),
            FileError::NotRegular { found: FileKind::Directory, link_target: None }
        );
        assert_eq!(Staged::create(&dir.path().join("absent/file"), None).err().unwrap(), FileError::NotFound);
        assert_eq!(names(dir.path()), ["link"]);
    }
}
