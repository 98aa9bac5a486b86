//! Copying an upper layer (typically from a tmpfs) to disk, so a sandbox's
//! changes outlive the mount and can be diffed or applied later.
//!
//! What overlayfs needs to read the copy as a layer again is kept: whiteouts
//! (recreated as 0/0 character devices, which needs root), opaque markers,
//! permission bits, numeric ownership and symlinks (link text verbatim).
//! Everything else is dropped or refused: other xattrs (file capabilities,
//! `security.*`, overlay bookkeeping) are not copied, setuid/setgid bits are
//! stripped, and devices, FIFOs and sockets stop the copy with an error.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Uid, XattrFlags};

use crate::diff::EntryType;
use crate::error::WorkspaceError;
use crate::fsx::{self, MAX_DEPTH};
use crate::layer::{self, UpperEntry};

/// Copies the layer at `from` to `to`, which must not exist yet (its parent
/// is created if needed). On failure the partial copy is removed.
pub fn persist_layer(from: &Path, to: &Path) -> Result<(), WorkspaceError> {
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(WorkspaceError::DestinationExists { path: to.to_path_buf() });
    }
    let src = fsx::open_layer_root(from).map_err(|e| WorkspaceError::io("open layer", from, e))?;
    if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| WorkspaceError::io("create directory", parent, e))?;
    }
    std::fs::create_dir(to).map_err(|e| WorkspaceError::io("create directory", to, e))?;
    let result =
        fsx::open_root(to).map_err(|e| WorkspaceError::io("open directory", to, e)).and_then(|dst| {
            copy_root(src.as_fd(), dst.as_fd())?;
            rustix::fs::syncfs(&dst).map_err(|e| WorkspaceError::io("sync", to, e.into()))
        });
    if result.is_err() {
        // The copy is ours and incomplete; a half layer must not be
        // mistaken for a whole one later.
        if let Err(e) = std::fs::remove_dir_all(to) {
            tracing::warn!("could not remove partial layer copy {}: {e}", to.display());
        }
    }
    result
}

fn copy_root(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> Result<(), WorkspaceError> {
    let root = Path::new("");
    let st = rustix::fs::fstat(src).map_err(|e| WorkspaceError::io("stat", root, e.into()))?;
    let xattrs = fsx::overlay_xattrs(src).map_err(|e| WorkspaceError::io("read xattrs of", root, e))?;
    for (name, value) in xattrs {
        match name.split_once("overlay.").map(|(_, k)| k) {
            Some("opaque") if value == b"y" => set_opaque(dst, &name, root)?,
            Some("opaque" | "redirect" | "metacopy" | "whiteout" | "whiteouts") => {
                return Err(WorkspaceError::UnsupportedOverlay { path: root.to_path_buf(), xattr: name });
            }
            _ => {}
        }
    }
    copy_children(src, dst, root, 0)?;
    finish_dir(dst, st.st_uid, st.st_gid, st.st_mode & 0o7777, root)
}

fn set_opaque(dir: BorrowedFd<'_>, xattr: &str, rel: &Path) -> Result<(), WorkspaceError> {
    rustix::fs::fsetxattr(dir, xattr, b"y", XattrFlags::empty())
        .map_err(|e| WorkspaceError::io("set opaque xattr on", rel, e.into()))
}

/// Ownership first: `chown` clears setuid bits, and the mode is applied
/// after it anyway, with setuid/setgid removed.
fn finish_dir(fd: BorrowedFd<'_>, uid: u32, gid: u32, mode: u32, rel: &Path) -> Result<(), WorkspaceError> {
    rustix::fs::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .map_err(|e| WorkspaceError::io("set owner of", rel, e.into()))?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & 0o1777))
        .map_err(|e| WorkspaceError::io("set mode of", rel, e.into()))
}

fn copy_children(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    rel: &Path,
    depth: usize,
) -> Result<(), WorkspaceError> {
    if depth > MAX_DEPTH {
        return Err(WorkspaceError::TooDeep { path: rel.to_path_buf() });
    }
    let names = fsx::list_dir(src).map_err(|e| WorkspaceError::io("read directory", rel, e))?;
    for name in names {
        let child = rel.join(&name);
        let Some(entry) = layer::inspect(src, &name, &child)? else {
            continue;
        };
        copy_entry(src, dst, &name, &child, entry, depth)?;
    }
    Ok(())
}

fn copy_entry(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    name: &OsStr,
    rel: &Path,
    entry: UpperEntry,
    depth: usize,
) -> Result<(), WorkspaceError> {
    let meta = entry.meta;
    let owner = (Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)));
    if entry.is_whiteout() {
        rustix::fs::mknodat(dst, name, FileType::CharacterDevice, Mode::empty(), rustix::fs::makedev(0, 0))
            .map_err(|e| WorkspaceError::io("create whiteout", rel, e.into()))?;
        return rustix::fs::chownat(dst, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| WorkspaceError::io("set owner of", rel, e.into()));
    }
    match meta.ty {
        EntryType::Dir => {
            rustix::fs::mkdirat(dst, name, Mode::from_raw_mode(0o700))
                .map_err(|e| WorkspaceError::io("create directory", rel, e.into()))?;
            let open = |at: BorrowedFd<'_>| -> io::Result<OwnedFd> {
                Ok(rustix::fs::openat(
                    at,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?)
            };
            let s = open(src).map_err(|e| WorkspaceError::io("open directory", rel, e))?;
            let d = open(dst).map_err(|e| WorkspaceError::io("open directory", rel, e))?;
            if let Some(xattr) = entry.opaque_xattr {
                set_opaque(d.as_fd(), xattr, rel)?;
            }
            copy_children(s.as_fd(), d.as_fd(), rel, depth + 1)?;
            finish_dir(d.as_fd(), meta.uid, meta.gid, meta.mode, rel)
        }
        EntryType::File => {
            let mut input = fsx::open_file_at(src, name).map_err(|e| WorkspaceError::io("open", rel, e))?;
            let fd = rustix::fs::openat(
                dst,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| WorkspaceError::io("create", rel, e.into()))?;
            let mut output = File::from(fd);
            io::copy(&mut input, &mut output).map_err(|e| WorkspaceError::io("copy", rel, e))?;
            rustix::fs::fchown(&output, owner.0, owner.1)
                .map_err(|e| WorkspaceError::io("set owner of", rel, e.into()))?;
            rustix::fs::fchmod(&output, Mode::from_raw_mode(meta.mode & 0o777))
                .map_err(|e| WorkspaceError::io("set mode of", rel, e.into()))
        }
        EntryType::Symlink => {
            let target = fsx::read_link_at(src, name).map_err(|e| WorkspaceError::io("read link", rel, e))?;
            rustix::fs::symlinkat(&target, dst, name)
                .map_err(|e| WorkspaceError::io("create symlink", rel, e.into()))?;
            rustix::fs::chownat(dst, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| WorkspaceError::io("set owner of", rel, e.into()))
        }
        // A FIFO or socket the sandbox left is kept as an inert node of the
        // same type (creating one needs no privilege and opens nothing), so
        // the review shows it and apply refuses it. Devices cannot be made in
        // a user namespace; one here means the layer was tampered with.
        EntryType::Other => {
            let ty = match meta.kind_name {
                "fifo" => FileType::Fifo,
                "socket" => FileType::Socket,
                _ => {
                    return Err(WorkspaceError::SpecialFile {
                        path: rel.to_path_buf(),
                        kind: meta.kind_name,
                    });
                }
            };
            rustix::fs::mknodat(dst, name, ty, Mode::from_raw_mode(0o600), 0)
                .map_err(|e| WorkspaceError::io("create placeholder for", rel, e.into()))?;
            rustix::fs::chownat(dst, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| WorkspaceError::io("set owner of", rel, e.into()))
        }
    }
}
