//! Capturing artifacts (test reports, build outputs) from a finished
//! sandbox, reading the merged view without mounting it: an upper entry
//! wins over lower, whiteouts hide, opaque directories hide lower's
//! children. Only regular files are copied; symlinks are never followed
//! (neither in the sandbox's layer nor in the workspace) and special files
//! are skipped.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use rustix::fs::{Mode, OFlags};

use crate::diff::EntryType;
use crate::error::WorkspaceError;
use crate::fsx::{self, MAX_DEPTH};
use crate::layer;

/// Copies every regular file of the merged view whose workspace-relative
/// path matches one of `globs` (globset syntax; `*` stops at `/`, `**`
/// crosses it) into `dest`, keeping relative paths. Files are written with
/// mode 0644. Stops with [`WorkspaceError::ArtifactLimit`] before the first
/// file that would take the total past `max_bytes`; what was copied until
/// then stays in `dest` and is listed in the error.
pub fn capture_artifacts(
    upper: &Path,
    lower: &Path,
    globs: &[String],
    dest: &Path,
    max_bytes: u64,
) -> Result<Vec<PathBuf>, WorkspaceError> {
    let set = build(globs)?;
    let upper_fd =
        fsx::open_layer_root(upper).map_err(|e| WorkspaceError::io("open upper layer", upper, e))?;
    let lower_fd = fsx::open_root(lower).map_err(|e| WorkspaceError::io("open workspace", lower, e))?;
    std::fs::create_dir_all(dest).map_err(|e| WorkspaceError::io("create directory", dest, e))?;
    let dest_fd = fsx::open_root(dest).map_err(|e| WorkspaceError::io("open directory", dest, e))?;
    let mut cap = Capture {
        upper: upper_fd,
        lower: lower_fd,
        dest: dest_fd,
        set,
        max_bytes,
        used: 0,
        copied: Vec::new(),
    };
    cap.walk(Path::new(""), true, true, 0)?;
    Ok(cap.copied)
}

fn build(globs: &[String]) -> Result<GlobSet, WorkspaceError> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        let glob = GlobBuilder::new(g)
            .literal_separator(true)
            .build()
            .map_err(|source| WorkspaceError::InvalidGlob { glob: g.clone(), source })?;
        b.add(glob);
    }
    b.build().map_err(|source| WorkspaceError::InvalidGlob { glob: globs.join(", "), source })
}

#[derive(Clone, Copy)]
enum Source {
    Upper,
    Lower,
}

struct Capture {
    upper: OwnedFd,
    lower: OwnedFd,
    dest: OwnedFd,
    set: GlobSet,
    max_bytes: u64,
    used: u64,
    copied: Vec<PathBuf>,
}

impl Capture {
    fn open_dir_opt(root: BorrowedFd<'_>, rel: &Path) -> Result<Option<OwnedFd>, WorkspaceError> {
        match fsx::open_dir(root, rel) {
            Ok(d) => Ok(Some(d)),
            Err(e) if fsx::is_absent(&e) => Ok(None),
            Err(e) => Err(WorkspaceError::io("open directory", rel, e)),
        }
    }

    /// Walks directory `rel` of the merged view. `in_upper` / `lower_visible`
    /// say which layers contribute to it.
    fn walk(
        &mut self,
        rel: &Path,
        in_upper: bool,
        lower_visible: bool,
        depth: usize,
    ) -> Result<(), WorkspaceError> {
        if depth > MAX_DEPTH {
            return Err(WorkspaceError::TooDeep { path: rel.to_path_buf() });
        }
        let upper_dir = if in_upper { Self::open_dir_opt(self.upper.as_fd(), rel)? } else { None };
        let lower_dir = if lower_visible { Self::open_dir_opt(self.lower.as_fd(), rel)? } else { None };
        let mut names = std::collections::BTreeSet::new();
        for d in [&upper_dir, &lower_dir].into_iter().flatten() {
            let listed =
                fsx::list_dir(d.as_fd()).map_err(|e| WorkspaceError::io("read directory", rel, e))?;
            names.extend(listed);
        }
        for name in names {
            let child = rel.join(&name);
            let up = match &upper_dir {
                Some(d) => layer::inspect(d.as_fd(), &name, &child)?,
                None => None,
            };
            let low = match &lower_dir {
                Some(d) => {
                    fsx::lstat_at(d.as_fd(), &name).map_err(|e| WorkspaceError::io("stat", &child, e))?
                }
                None => None,
            };
            match (up, low) {
                (Some(u), _) if u.is_whiteout() => {}
                (Some(u), low) => match u.meta.ty {
                    EntryType::Dir => {
                        let lower_child =
                            lower_visible && !u.opaque && low.is_some_and(|l| l.ty == EntryType::Dir);
                        self.walk(&child, true, lower_child, depth + 1)?;
                    }
                    EntryType::File => self.take(&child, Source::Upper, u.meta.size)?,
                    EntryType::Symlink | EntryType::Other => {}
                },
                (None, Some(l)) => match l.ty {
                    EntryType::Dir => self.walk(&child, false, true, depth + 1)?,
                    EntryType::File => self.take(&child, Source::Lower, l.size)?,
                    EntryType::Symlink | EntryType::Other => {}
                },
                (None, None) => {}
            }
        }
        Ok(())
    }

    fn take(&mut self, rel: &Path, source: Source, size: u64) -> Result<(), WorkspaceError> {
        if !self.set.is_match(rel) {
            return Ok(());
        }
        let room = self.max_bytes.saturating_sub(self.used);
        if size > room {
            return Err(WorkspaceError::ArtifactLimit {
                limit: self.max_bytes,
                skipped: rel.to_path_buf(),
                copied: std::mem::take(&mut self.copied),
            });
        }
        let root = match source {
            Source::Upper => self.upper.as_fd(),
            Source::Lower => self.lower.as_fd(),
        };
        let input = fsx::open_file(root, rel).map_err(|e| WorkspaceError::io("open", rel, e))?;
        let dir = self.dest_parent(rel)?;
        let (_, name) = fsx::split(rel).map_err(|e| WorkspaceError::io("copy", rel, e))?;
        let fd = rustix::fs::openat(
            &dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| WorkspaceError::io("create artifact", rel, e.into()))?;
        let mut output = File::from(fd);
        // The file may still grow if something writes to the layer; never
        // copy more than the budget allows.
        let copied = io::copy(&mut input.take(room), &mut output)
            .map_err(|e| WorkspaceError::io("copy artifact", rel, e))?;
        self.used += copied;
        self.copied.push(rel.to_path_buf());
        Ok(())
    }

    /// Opens (creating as needed) the destination directory for `rel`.
    fn dest_parent(&self, rel: &Path) -> Result<OwnedFd, WorkspaceError> {
        let (parent, _) = fsx::split(rel).map_err(|e| WorkspaceError::io("copy", rel, e))?;
        let mut sofar = PathBuf::new();
        for comp in parent.components() {
            let dir = fsx::open_dir(self.dest.as_fd(), &sofar)
                .map_err(|e| WorkspaceError::io("open directory", &sofar, e))?;
            sofar.push(comp);
            match rustix::fs::mkdirat(&dir, comp.as_os_str(), Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(WorkspaceError::io("create directory", &sofar, e.into())),
            }
        }
        fsx::open_dir(self.dest.as_fd(), parent).map_err(|e| WorkspaceError::io("open directory", parent, e))
    }
}
