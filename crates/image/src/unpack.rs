//! Unpacking one image layer (a tar archive written by someone else) into a
//! directory of its own.
//!
//! Every name is resolved one component at a time below the layer's root
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: a `..`, an
//! absolute name or a symlink on the way never reaches outside. The
//! rules, each with a test below:
//! - a name with a `..` component refuses the layer; a leading `/` is
//!   dropped (the name is taken relative to the layer's root, as Docker does);
//! - a symlink is created as a link and never followed: a later entry that
//!   goes through it (`a -> /etc`, then `a/x`) refuses the layer;
//! - a hardlink must name a regular file already unpacked from the same
//!   layer, resolved the same way; anything else refuses the layer;
//! - device nodes and fifos are skipped (counted in the report);
//! - setuid and setgid bits are dropped (counted); owners are not applied:
//!   every file belongs to whoever unpacks, so unpacking works without root;
//! - whiteouts stay overlayfs whiteouts, since layers are stacked as overlay
//!   lower layers and shared between images: `.wh.NAME` becomes a 0/0
//!   character device named NAME, `.wh..wh..opq` sets `user.overlay.opaque`
//!   on its directory (the sandbox mounts its overlay with `userxattr`).
//!   Extended attributes from the archive are never applied, so a layer
//!   cannot mark a directory opaque by other means;
//! - limits on total size, file count and a single file's size refuse the
//!   layer when the header says so, before the data is written; the caller
//!   unpacks into a temporary directory and removes it on any error.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Bounds a layer must stay within (after decompression).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_total_bytes: u64,
    pub max_files: u64,
    pub max_file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_total_bytes: 16 << 30, max_files: 1_000_000, max_file_bytes: 8 << 30 }
    }
}

/// The limit on the sum of a layer's file sizes, as [`UnpackError::Limit`] names it.
pub const TOTAL_SIZE: &str = "total size";

/// What unpacking a layer did besides writing files.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackReport {
    pub entries: u64,
    pub bytes: u64,
    pub skipped_devices: u64,
    pub dropped_setid: u64,
    pub whiteouts: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry {0:?} climbs out of the layer with '..'")]
    Escape(PathBuf),
    #[error("layer entry {path:?} goes through a symlink or a non-directory on the way")]
    ThroughLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer entry {path:?} is a hardlink to {target:?}, which is not a regular file of this layer")]
    HardlinkOutside { path: PathBuf, target: PathBuf },
    #[error("layer entry {0:?} has an invalid whiteout name")]
    BadWhiteout(PathBuf),
    #[error("layer exceeds its {what} limit of {limit}")]
    Limit { what: &'static str, limit: u64 },
    #[error("cannot unpack layer entry {path:?}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read layer archive: {0}")]
    Read(#[source] io::Error),
}

const OPAQUE: &[u8] = b".wh..wh..opq";
const WHITEOUT_PREFIX: &[u8] = b".wh.";

/// Unpacks a layer (plain, gzip or zstd tar, told apart by their magic
/// bytes) into `dest`, an existing empty directory.
pub fn unpack_layer(reader: impl Read, dest: &Path, limits: &Limits) -> Result<UnpackReport, UnpackError> {
    let mut buffered = BufReader::new(reader);
    let magic = buffered.fill_buf().map_err(UnpackError::Read)?;
    let decompressed: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(UnpackError::Read)?)
    } else {
        Box::new(buffered)
    };
    // Headers and padding come on top of the files' sizes; the stream as a
    // whole is bounded too, so a stream of huge PAX headers is refused.
    let bounded = Bounded { inner: decompressed, left: limits.max_total_bytes.saturating_add(1 << 30) };
    let root =
        open_dir(rustix::fs::CWD, dest).map_err(|e| UnpackError::Write { path: dest.into(), source: e })?;
    let mut unpacker =
        Unpacker { root, limits: *limits, report: UnpackReport::default(), dir_modes: HashMap::new() };
    let mut archive = tar::Archive::new(bounded);
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let entry = entry.map_err(read_error)?;
        unpacker.entry(entry)?;
    }
    unpacker.finish_dir_modes()?;
    Ok(unpacker.report)
}

/// The bounded reader's own error, told apart from other read errors.
fn read_error(e: io::Error) -> UnpackError {
    if e.get_ref().is_some_and(|inner| inner.is::<StreamTooLong>()) {
        return UnpackError::Limit { what: "decompressed stream size", limit: 0 };
    }
    UnpackError::Read(e)
}

#[derive(Debug, thiserror::Error)]
#[error("decompressed layer stream too long")]
struct StreamTooLong;

struct Bounded<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| io::Error::other(StreamTooLong))?;
        Ok(n)
    }
}

struct Unpacker {
    root: OwnedFd,
    limits: Limits,
    report: UnpackReport,
    /// Directories are created owner-writable so their entries can be
    /// written without root; their own modes are applied at the end.
    dir_modes: HashMap<PathBuf, u32>,
}

/// The name's components below the layer root: `.` and a leading `/`
/// dropped, `..` refused.
fn clean(raw: &[u8]) -> Result<PathBuf, UnpackError> {
    let path = Path::new(OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(UnpackError::Escape(path.into())),
        }
    }
    Ok(out)
}

const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

fn open_dir(at: impl AsFd, name: &Path) -> io::Result<OwnedFd> {
    rustix::fs::openat(at, name, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(io::Error::from)
}

/// Opens one directory below `at`, never following a link.
fn open_beneath(at: impl AsFd, name: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        at,
        name,
        flags | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        BENEATH,
    )
}

impl Unpacker {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let path = clean(&entry.path_bytes())?;
        let Some(name) = path.file_name().map(ToOwned::to_owned) else {
            return Ok(()); // the root itself: its mode stays ours
        };
        self.report.entries += 1;
        if self.report.entries > self.limits.max_files {
            return Err(UnpackError::Limit { what: "file count", limit: self.limits.max_files });
        }
        let size = entry.size();
        if size > self.limits.max_file_bytes {
            return Err(UnpackError::Limit { what: "single file size", limit: self.limits.max_file_bytes });
        }
        self.report.bytes = self.report.bytes.saturating_add(size);
        if self.report.bytes > self.limits.max_total_bytes {
            return Err(UnpackError::Limit { what: TOTAL_SIZE, limit: self.limits.max_total_bytes });
        }
        let mode = entry.header().mode().map_err(read_error)?;
        if mode & 0o6000 != 0 && matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            self.report.dropped_setid += 1;
        }
        let mode = mode & 0o1777;
        let parent_path = path.parent().unwrap_or(Path::new(""));
        let write_err = |source: io::Error| UnpackError::Write { path: path.clone(), source };

        let name_bytes = name.as_bytes();
        if name_bytes == OPAQUE {
            let dir = self.parent(parent_path, &path)?;
            let dir = rustix::fs::openat2(
                &dir,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                BENEATH,
            )
            .map_err(|e| write_err(e.into()))?;
            rustix::fs::fsetxattr(&dir, "user.overlay.opaque", b"y", rustix::fs::XattrFlags::empty())
                .map_err(|e| write_err(e.into()))?;
            self.report.whiteouts += 1;
            return Ok(());
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/') {
                return Err(UnpackError::BadWhiteout(path));
            }
            let dir = self.parent(parent_path, &path)?;
            let hidden = OsStr::from_bytes(hidden);
            remove_existing(&dir, hidden).map_err(write_err)?;
            rustix::fs::mknodat(&dir, hidden, FileType::CharacterDevice, Mode::empty(), 0)
                .map_err(|e| write_err(e.into()))?;
            self.report.whiteouts += 1;
            return Ok(());
        }

        let dir = self.parent(parent_path, &path)?;
        match kind {
            tar::EntryType::Directory => {
                match rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    Ok(_) => {
                        remove_existing(&dir, &name).map_err(write_err)?;
                        mkdir(&dir, &name).map_err(write_err)?;
                    }
                    Err(Errno::NOENT) => mkdir(&dir, &name).map_err(write_err)?,
                    Err(e) => return Err(write_err(e.into())),
                }
                self.dir_modes.insert(path.clone(), mode);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                remove_existing(&dir, &name).map_err(write_err)?;
                let file = rustix::fs::openat(
                    &dir,
                    &name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| write_err(e.into()))?;
                let mut file = std::fs::File::from(file);
                io::copy(&mut entry, &mut file).map_err(|e| match read_error(e) {
                    UnpackError::Read(e) => write_err(e),
                    other => other,
                })?;
                rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).map_err(|e| write_err(e.into()))?;
            }
            tar::EntryType::Symlink => {
                let target =
                    entry.link_name_bytes().ok_or_else(|| write_err(io::ErrorKind::InvalidData.into()))?;
                remove_existing(&dir, &name).map_err(write_err)?;
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &dir, &name)
                    .map_err(|e| write_err(e.into()))?;
            }
            tar::EntryType::Link => {
                let raw =
                    entry.link_name_bytes().ok_or_else(|| write_err(io::ErrorKind::InvalidData.into()))?;
                let target = clean(&raw)?;
                let outside = || UnpackError::HardlinkOutside { path: path.clone(), target: target.clone() };
                let target_name = target.file_name().ok_or_else(outside)?;
                let target_parent =
                    target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let target_dir =
                    open_beneath(&self.root, target_parent, OFlags::PATH).map_err(|_| outside())?;
                let st = rustix::fs::statat(&target_dir, target_name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|_| outside())?;
                if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                    return Err(outside());
                }
                remove_existing(&dir, &name).map_err(write_err)?;
                rustix::fs::linkat(&target_dir, target_name, &dir, &name, AtFlags::empty())
                    .map_err(|e| write_err(e.into()))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.report.skipped_devices += 1;
                tracing::debug!(path = %path.display(), "device node or fifo in a layer skipped");
            }
            _ => tracing::debug!(path = %path.display(), "layer entry of an unknown type skipped"),
        }
        Ok(())
    }

    /// The directory that holds `path`, created (owner-writable) where
    /// missing, reached without following any link.
    fn parent(&mut self, parent: &Path, path: &Path) -> Result<OwnedFd, UnpackError> {
        let through = |e: Errno| UnpackError::ThroughLink { path: path.into(), source: e.into() };
        let mut dir = open_beneath(&self.root, Path::new("."), OFlags::PATH).map_err(through)?;
        for part in parent.components() {
            let part = Path::new(part.as_os_str());
            dir = match open_beneath(&dir, part, OFlags::PATH) {
                Ok(next) => next,
                Err(Errno::NOENT) => {
                    mkdir(&dir, part.as_os_str())
                        .map_err(|e| UnpackError::Write { path: path.into(), source: e })?;
                    open_beneath(&dir, part, OFlags::PATH).map_err(through)?
                }
                Err(e) => return Err(through(e)),
            };
        }
        Ok(dir)
    }

    /// Applies the directories' own modes, deepest first (a read-only
    /// directory last of all below it).
    fn finish_dir_modes(&mut self) -> Result<(), UnpackError> {
        let mut dirs: Vec<_> = self.dir_modes.drain().collect();
        dirs.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
        for (path, mode) in dirs {
            let err = |e: Errno| UnpackError::Write { path: path.clone(), source: e.into() };
            let dir = match rustix::fs::openat2(
                &self.root,
                &path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                BENEATH,
            ) {
                Ok(dir) => dir,
                // Replaced by a later entry of the same layer.
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                Err(e) => return Err(err(e)),
            };
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode | 0o700)).map_err(err)?;
        }
        Ok(())
    }
}

fn mkdir(dir: impl AsFd, name: &OsStr) -> io::Result<()> {
    rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o755)).map_err(io::Error::from)
}

/// Removes what a later entry replaces; a directory only when it is empty
/// (a layer that replaces a full directory by a file is refused).
fn remove_existing(dir: impl AsFd, name: &OsStr) -> io::Result<()> {
    let st = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let flags = if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    rustix::fs::unlinkat(dir, name, flags).map_err(io::Error::from)
}

#[cfg(test)]
mod tests;
