//! Reading entries of an overlayfs upper layer.
//!
//! Only what our own mounts produce is accepted: whiteouts (0/0 character
//! devices), opaque directories, and the bookkeeping xattrs (`origin`,
//! `impure`, `nlink`, ...), which carry no meaning for the diff. Redirects,
//! metacopy files and xwhiteouts change what an entry means; we never
//! enable them, so seeing one means the layer was forged and it is refused.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};

use crate::diff::EntryType;
use crate::error::WorkspaceError;
use crate::fsx::{self, Meta};

/// One entry of the upper layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpperEntry {
    pub meta: Meta,
    /// The directory hides everything below it in the lower layer.
    pub opaque: bool,
    /// Which opaque xattr carried the mark, to copy it as found.
    pub opaque_xattr: Option<&'static str>,
}

impl UpperEntry {
    pub(crate) fn is_whiteout(&self) -> bool {
        self.meta.whiteout
    }
}

/// `lstat`s `name` in the upper directory `dir` and checks its overlay
/// attributes. `rel` is only used for messages.
pub(crate) fn inspect(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    rel: &Path,
) -> Result<Option<UpperEntry>, WorkspaceError> {
    let Some(meta) = fsx::lstat_at(dir, name).map_err(|e| WorkspaceError::io("stat", rel, e))? else {
        return Ok(None);
    };
    let mut entry = UpperEntry { meta, opaque: false, opaque_xattr: None };
    let fd = match meta.ty {
        EntryType::Dir => rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| WorkspaceError::io("open directory", rel, e.into()))?,
        EntryType::File => {
            fsx::open_file_at(dir, name).map_err(|e| WorkspaceError::io("open file", rel, e))?.into()
        }
        // Whiteouts, symlinks and special files carry no xattr we act on.
        EntryType::Symlink | EntryType::Other => return Ok(Some(entry)),
    };
    let xattrs = fsx::overlay_xattrs(fd.as_fd()).map_err(|e| WorkspaceError::io("read xattrs of", rel, e))?;
    for (xname, value) in xattrs {
        let (prefix, key) = match xname.split_once("overlay.") {
            Some((p, k)) => (p, k),
            None => continue,
        };
        match key {
            "opaque" if value == b"y" && meta.ty == EntryType::Dir => {
                entry.opaque = true;
                entry.opaque_xattr =
                    Some(if prefix == "trusted." { "trusted.overlay.opaque" } else { "user.overlay.opaque" });
            }
            "opaque" | "redirect" | "metacopy" | "whiteout" | "whiteouts" => {
                return Err(WorkspaceError::UnsupportedOverlay {
                    path: rel.to_path_buf(),
                    xattr: format!("{xname}={}", String::from_utf8_lossy(&value)),
                });
            }
            _ => {}
        }
    }
    Ok(Some(entry))
}
