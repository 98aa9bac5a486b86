//! Computing what a sandbox changed, from its overlayfs upper layer.
//!
//! Only the upper layer is walked, so the cost grows with what changed, not
//! with the size of the workspace. The lower tree is consulted for exactly
//! the paths found in upper, plus the subtrees that a deleted or opaque
//! directory hides (so that review lists every file that goes away).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::digest::{self, ChangeDigest, ContentHash};
use crate::error::WorkspaceError;
use crate::fsx::{self, MAX_DEPTH, Meta};
use crate::layer::{self, UpperEntry};

/// Files larger than this are not loaded to count lines or render hunks.
pub(crate) const TEXT_LIMIT: u64 = 8 * 1024 * 1024;
/// How much of a file is inspected to decide whether it is binary.
pub(crate) const SNIFF_LEN: u64 = 8000;

/// What happened to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The path did not exist in the workspace.
    Added,
    /// Same type, different content, link target or permission bits.
    Modified,
    /// The path no longer exists.
    Deleted,
    /// The path exists with another type (file ⇄ dir ⇄ symlink ⇄ other).
    TypeChanged,
}

/// The type of a filesystem entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryType {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A device, FIFO or socket; shown in review, never applied.
    Other,
}

/// One changed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Relative to the workspace root. Any bytes but `/` and NUL.
    pub path: PathBuf,
    /// What happened.
    pub kind: ChangeKind,
    /// Type in the workspace before the run (`None` when added).
    pub old_type: Option<EntryType>,
    /// Type after the run (`None` when deleted).
    pub new_type: Option<EntryType>,
    /// Permission bits before (`st_mode & 0o7777`).
    pub old_mode: Option<u32>,
    /// Permission bits after, as the sandbox left them (apply strips
    /// setuid/setgid/sticky).
    pub new_mode: Option<u32>,
    /// Size in bytes of the new file, or of the old one when deleted.
    pub size: Option<u64>,
    /// Either side of a file change is binary (holds NUL or is not UTF-8).
    pub binary: bool,
    /// Link text of the new symlink (or of the old one when deleted).
    pub symlink_target: Option<PathBuf>,
    /// Link text of the old symlink when a symlink was retargeted.
    pub old_symlink_target: Option<PathBuf>,
    /// Lines added, for text files small enough to diff.
    pub lines_added: Option<u64>,
    /// Lines removed, for text files small enough to diff.
    pub lines_removed: Option<u64>,
    /// File bytes or link text differ (false for a mode-only change).
    pub content_changed: bool,
    /// SHA-256 of the new file's content, when apply writes content (an
    /// added or retyped file, or a file whose bytes changed). Apply writes
    /// a file only if the bytes it copies have this hash; a file record
    /// that needs one and lacks it is refused.
    pub content_sha256: Option<ContentHash>,
}

impl Change {
    fn new(path: PathBuf, kind: ChangeKind) -> Change {
        Change {
            path,
            kind,
            old_type: None,
            new_type: None,
            old_mode: None,
            new_mode: None,
            size: None,
            binary: false,
            symlink_target: None,
            old_symlink_target: None,
            lines_added: None,
            lines_removed: None,
            content_changed: kind != ChangeKind::Modified,
            content_sha256: None,
        }
    }

    /// True when only the permission bits changed.
    pub fn is_mode_only(&self) -> bool {
        self.kind == ChangeKind::Modified && !self.content_changed && self.old_mode != self.new_mode
    }
}

/// Everything a sandbox changed, sorted by path (parents before children).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// The changes.
    pub changes: Vec<Change>,
}

/// Summary counts of a [`Diff`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiffStat {
    /// Non-directory entries added.
    pub files_added: u64,
    /// Non-directory entries modified (content, target or mode).
    pub files_modified: u64,
    /// Non-directory entries deleted.
    pub files_deleted: u64,
    /// Entries whose type changed.
    pub type_changed: u64,
    /// Directories added.
    pub dirs_added: u64,
    /// Directories deleted.
    pub dirs_deleted: u64,
    /// Lines added across text files.
    pub lines_added: u64,
    /// Lines removed across text files.
    pub lines_removed: u64,
    /// Changes involving binary files.
    pub binary_files: u64,
}

impl Diff {
    /// True when the sandbox changed nothing.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Counts of files, directories and lines.
    pub fn stat(&self) -> DiffStat {
        let mut s = DiffStat::default();
        for c in &self.changes {
            let is_dir = |t: Option<EntryType>| t == Some(EntryType::Dir);
            match c.kind {
                ChangeKind::Added if is_dir(c.new_type) => s.dirs_added += 1,
                ChangeKind::Added => s.files_added += 1,
                ChangeKind::Deleted if is_dir(c.old_type) => s.dirs_deleted += 1,
                ChangeKind::Deleted => s.files_deleted += 1,
                ChangeKind::Modified if is_dir(c.new_type) => {}
                ChangeKind::Modified => s.files_modified += 1,
                ChangeKind::TypeChanged => s.type_changed += 1,
            }
            s.lines_added += c.lines_added.unwrap_or(0);
            s.lines_removed += c.lines_removed.unwrap_or(0);
            if c.binary {
                s.binary_files += 1;
            }
        }
        s
    }

    /// The digest of everything apply would write for this diff (see
    /// [`crate::digest`]): what `--expect` compares with.
    pub fn digest(&self) -> ChangeDigest {
        digest::digest_of(&self.changes, |c| c.content_sha256)
    }

    /// The diff as JSON. The shape is stable (`"version": 1`):
    ///
    /// ```text
    /// { "version": 1,
    ///   "digest": "sha256:<64 hex digits>",
    ///   "stat": { "files_added": n, "files_modified": n, "files_deleted": n,
    ///             "type_changed": n, "dirs_added": n, "dirs_deleted": n,
    ///             "lines_added": n, "lines_removed": n, "binary_files": n },
    ///   "changes": [ { "path": "src/a.rs", "path_lossy": false,
    ///                  "kind": "added|modified|deleted|type_changed",
    ///                  "old_type": "file|dir|symlink|other"|null, "new_type": ...,
    ///                  "old_mode": 420|null, "new_mode": 420|null,
    ///                  "size": n|null, "binary": false,
    ///                  "symlink_target": "..."|null, "old_symlink_target": "..."|null,
    ///                  "lines_added": n|null, "lines_removed": n|null,
    ///                  "content_changed": true,
    ///                  "content_sha256": "<64 hex digits>"|null } ] }
    /// ```
    ///
    /// Paths and link targets that are not UTF-8 are converted lossily and
    /// flagged with `"path_lossy": true`; modes are decimal `st_mode & 0o7777`.
    pub fn to_json(&self) -> serde_json::Value {
        let lossy = |p: &Path| p.to_str().is_none();
        let text = |p: &Path| p.to_string_lossy().into_owned();
        let changes: Vec<serde_json::Value> = self
            .changes
            .iter()
            .map(|c| {
                serde_json::json!({
                    "path": text(&c.path),
                    "path_lossy": lossy(&c.path),
                    "kind": c.kind,
                    "old_type": c.old_type,
                    "new_type": c.new_type,
                    "old_mode": c.old_mode,
                    "new_mode": c.new_mode,
                    "size": c.size,
                    "binary": c.binary,
                    "symlink_target": c.symlink_target.as_deref().map(text),
                    "old_symlink_target": c.old_symlink_target.as_deref().map(text),
                    "lines_added": c.lines_added,
                    "lines_removed": c.lines_removed,
                    "content_changed": c.content_changed,
                    "content_sha256": c.content_sha256.map(|h| h.to_hex()),
                })
            })
            .collect();
        serde_json::json!({
            "version": 1,
            "digest": self.digest(),
            "stat": self.stat(),
            "changes": changes,
        })
    }
}

/// Computes the changes recorded in `upper` relative to `lower`.
///
/// Symlinks are never followed on either side. Fails on overlay features we
/// cannot interpret (redirects, metacopy) rather than guessing.
pub fn compute_diff(lower: &Path, upper: &Path) -> Result<Diff, WorkspaceError> {
    compute_diff_with(lower, upper, &mut |_| {})
}

/// [`compute_diff`], telling `progress` how many entries of the upper layer
/// it has examined so far, now and then (for a progress line on large
/// diffs).
pub fn compute_diff_with(
    lower: &Path,
    upper: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Diff, WorkspaceError> {
    let mut walker = Walker::open(lower, upper)?;
    walker.progress = Some(progress);
    walker.run()?;
    let mut changes = walker.changes;
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Diff { changes })
}

/// How the children of an upper directory relate to the lower tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirMode {
    /// Upper holds only the changed children; the rest come from lower.
    Merged,
    /// Upper holds all children (opaque or new directory); lower's
    /// children at this path, if `lower` exists, are gone unless upper has
    /// them too.
    Replace { lower: bool },
}

pub(crate) struct Walker<'p> {
    lower: OwnedFd,
    upper: OwnedFd,
    pub(crate) changes: Vec<Change>,
    /// Lower-tree lookups made; the test suite uses it to show the walk
    /// does not scale with the size of the workspace.
    pub(crate) lower_lookups: usize,
    /// Entries examined, and who wants to know.
    examined: u64,
    progress: Option<&'p mut dyn FnMut(u64)>,
}

impl<'p> Walker<'p> {
    pub(crate) fn open(lower: &Path, upper: &Path) -> Result<Walker<'p>, WorkspaceError> {
        let lower_fd = fsx::open_root(lower).map_err(|e| WorkspaceError::io("open workspace", lower, e))?;
        let upper_fd =
            fsx::open_layer_root(upper).map_err(|e| WorkspaceError::io("open upper layer", upper, e))?;
        Ok(Walker {
            lower: lower_fd,
            upper: upper_fd,
            changes: Vec::new(),
            lower_lookups: 0,
            examined: 0,
            progress: None,
        })
    }

    pub(crate) fn run(&mut self) -> Result<(), WorkspaceError> {
        let root = Path::new("");
        let xattrs = fsx::overlay_xattrs(self.upper.as_fd())
            .map_err(|e| WorkspaceError::io("read xattrs of", root, e))?;
        let mut opaque = false;
        for (name, value) in xattrs {
            match name.split_once("overlay.").map(|(_, k)| k) {
                Some("opaque") if value == b"y" => opaque = true,
                Some("opaque" | "redirect" | "metacopy" | "whiteout" | "whiteouts") => {
                    return Err(WorkspaceError::UnsupportedOverlay { path: root.to_path_buf(), xattr: name });
                }
                _ => {}
            }
        }
        let mode = if opaque { DirMode::Replace { lower: true } } else { DirMode::Merged };
        self.walk_dir(root, mode, 0)
    }

    fn walk_dir(&mut self, rel: &Path, mode: DirMode, depth: usize) -> Result<(), WorkspaceError> {
        if depth > MAX_DEPTH {
            return Err(WorkspaceError::TooDeep { path: rel.to_path_buf() });
        }
        let upper_dir = fsx::open_dir(self.upper.as_fd(), rel)
            .map_err(|e| WorkspaceError::io("open upper directory", rel, e))?;
        let upper_names = fsx::list_dir(upper_dir.as_fd())
            .map_err(|e| WorkspaceError::io("read upper directory", rel, e))?;
        let mut names: BTreeSet<OsString> = upper_names.iter().cloned().collect();
        let upper_set: BTreeSet<OsString> = upper_names.into_iter().collect();
        let lower_dir = match mode {
            DirMode::Merged | DirMode::Replace { lower: true } => {
                self.lower_lookups += 1;
                match fsx::open_dir(self.lower.as_fd(), rel) {
                    Ok(d) => Some(d),
                    Err(e) if fsx::is_absent(&e) => None,
                    Err(e) => return Err(WorkspaceError::io("open directory", rel, e)),
                }
            }
            DirMode::Replace { lower: false } => None,
        };
        if let (DirMode::Replace { lower: true }, Some(ld)) = (mode, &lower_dir) {
            // An opaque directory hides all of lower's children: list them
            // so the ones upper does not bring back show up as deleted.
            self.lower_lookups += 1;
            let lower_names =
                fsx::list_dir(ld.as_fd()).map_err(|e| WorkspaceError::io("read directory", rel, e))?;
            names.extend(lower_names);
        }
        for name in names {
            let child = rel.join(&name);
            let upper_entry = if upper_set.contains(&name) {
                layer::inspect(upper_dir.as_fd(), &name, &child)?
            } else {
                None
            };
            let lower_meta = match &lower_dir {
                Some(ld) => {
                    self.lower_lookups += 1;
                    fsx::lstat_at(ld.as_fd(), &name).map_err(|e| WorkspaceError::io("stat", &child, e))?
                }
                None => None,
            };
            let parent_replaces = matches!(mode, DirMode::Replace { .. });
            self.compare(&child, upper_entry, lower_meta, parent_replaces, depth)?;
            self.examined += 1;
            // Within a huge directory too, not only at its end.
            if self.examined.is_multiple_of(1024) {
                self.report();
            }
        }
        self.report();
        Ok(())
    }

    fn report(&mut self) {
        if let Some(progress) = self.progress.as_mut() {
            progress(self.examined);
        }
    }

    fn compare(
        &mut self,
        rel: &Path,
        upper: Option<UpperEntry>,
        lower: Option<Meta>,
        parent_replaces: bool,
        depth: usize,
    ) -> Result<(), WorkspaceError> {
        // A whiteout means "absent"; inside an opaque directory it is
        // redundant, and without a lower entry it hides nothing.
        let upper = upper.filter(|u| !u.is_whiteout());
        match (upper, lower) {
            (None, None) => Ok(()),
            (None, Some(l)) => self.deleted(rel, l, depth),
            (Some(u), None) => {
                let mut c = Change::new(rel.to_path_buf(), ChangeKind::Added);
                self.fill_new(&mut c, rel, u.meta)?;
                self.changes.push(c);
                if u.meta.ty == EntryType::Dir {
                    self.walk_dir(rel, DirMode::Replace { lower: false }, depth + 1)?;
                }
                Ok(())
            }
            (Some(u), Some(l)) if u.meta.ty == EntryType::Dir && l.ty == EntryType::Dir => {
                if u.meta.mode != l.mode {
                    let mut c = Change::new(rel.to_path_buf(), ChangeKind::Modified);
                    c.old_type = Some(EntryType::Dir);
                    c.new_type = Some(EntryType::Dir);
                    c.old_mode = Some(l.mode);
                    c.new_mode = Some(u.meta.mode);
                    self.changes.push(c);
                }
                let mode = if u.opaque || parent_replaces {
                    DirMode::Replace { lower: true }
                } else {
                    DirMode::Merged
                };
                self.walk_dir(rel, mode, depth + 1)
            }
            (Some(u), Some(l)) if u.meta.ty == l.ty => self.modified(rel, u.meta, l),
            (Some(u), Some(l)) => {
                let mut c = Change::new(rel.to_path_buf(), ChangeKind::TypeChanged);
                self.fill_old(&mut c, rel, l)?;
                self.fill_new(&mut c, rel, u.meta)?;
                self.changes.push(c);
                if l.ty == EntryType::Dir {
                    self.deleted_children(rel, depth + 1)?;
                }
                if u.meta.ty == EntryType::Dir {
                    self.walk_dir(rel, DirMode::Replace { lower: false }, depth + 1)?;
                }
                Ok(())
            }
        }
    }

    /// Same non-directory type on both sides: compare what can differ.
    fn modified(&mut self, rel: &Path, u: Meta, l: Meta) -> Result<(), WorkspaceError> {
        let mut c = Change::new(rel.to_path_buf(), ChangeKind::Modified);
        c.old_type = Some(l.ty);
        c.new_type = Some(u.ty);
        c.old_mode = Some(l.mode);
        c.new_mode = Some(u.mode);
        let changed = match u.ty {
            EntryType::File => {
                c.size = Some(u.size);
                let same = u.size == l.size && {
                    let a = fsx::open_file(self.lower.as_fd(), rel)
                        .map_err(|e| WorkspaceError::io("open file", rel, e))?;
                    let b = fsx::open_file(self.upper.as_fd(), rel)
                        .map_err(|e| WorkspaceError::io("open upper file", rel, e))?;
                    fsx::same_content(a, b).map_err(|e| WorkspaceError::io("read", rel, e))?
                };
                c.content_changed = !same;
                if !same {
                    self.hash_new(&mut c, rel)?;
                    let old = self.sniff(Side::Lower, rel)?;
                    let new = self.sniff(Side::Upper, rel)?;
                    c.binary = old.binary || new.binary;
                    if !c.binary {
                        self.count_lines(&mut c, rel, true, true)?;
                    }
                }
                !same || u.mode != l.mode
            }
            EntryType::Symlink => {
                let old = fsx::read_link(self.lower.as_fd(), rel)
                    .map_err(|e| WorkspaceError::io("read link", rel, e))?;
                let new = fsx::read_link(self.upper.as_fd(), rel)
                    .map_err(|e| WorkspaceError::io("read upper link", rel, e))?;
                let changed = old != new;
                c.content_changed = changed;
                c.old_symlink_target = Some(old);
                c.symlink_target = Some(new);
                changed
            }
            EntryType::Other | EntryType::Dir => u.mode != l.mode,
        };
        if changed {
            self.changes.push(c);
        }
        Ok(())
    }

    /// Records a deletion of `rel` and, for directories, of everything
    /// below it in lower.
    fn deleted(&mut self, rel: &Path, l: Meta, depth: usize) -> Result<(), WorkspaceError> {
        let mut c = Change::new(rel.to_path_buf(), ChangeKind::Deleted);
        self.fill_old(&mut c, rel, l)?;
        if l.ty == EntryType::File {
            let old = self.sniff(Side::Lower, rel)?;
            c.binary = old.binary;
            if !c.binary {
                self.count_lines(&mut c, rel, true, false)?;
            }
        }
        self.changes.push(c);
        if l.ty == EntryType::Dir {
            self.deleted_children(rel, depth + 1)?;
        }
        Ok(())
    }

    fn deleted_children(&mut self, rel: &Path, depth: usize) -> Result<(), WorkspaceError> {
        if depth > MAX_DEPTH {
            return Err(WorkspaceError::TooDeep { path: rel.to_path_buf() });
        }
        self.lower_lookups += 1;
        let dir = fsx::open_dir(self.lower.as_fd(), rel)
            .map_err(|e| WorkspaceError::io("open directory", rel, e))?;
        let names = fsx::list_dir(dir.as_fd()).map_err(|e| WorkspaceError::io("read directory", rel, e))?;
        for name in names {
            let child = rel.join(&name);
            self.lower_lookups += 1;
            if let Some(meta) =
                fsx::lstat_at(dir.as_fd(), &name).map_err(|e| WorkspaceError::io("stat", &child, e))?
            {
                self.deleted(&child, meta, depth)?;
            }
        }
        Ok(())
    }

    fn fill_old(&mut self, c: &mut Change, rel: &Path, l: Meta) -> Result<(), WorkspaceError> {
        c.old_type = Some(l.ty);
        c.old_mode = Some(l.mode);
        match l.ty {
            EntryType::File if c.kind == ChangeKind::Deleted => c.size = Some(l.size),
            EntryType::Symlink => {
                let t = fsx::read_link(self.lower.as_fd(), rel)
                    .map_err(|e| WorkspaceError::io("read link", rel, e))?;
                if c.kind == ChangeKind::Deleted {
                    c.symlink_target = Some(t);
                } else {
                    c.old_symlink_target = Some(t);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn fill_new(&mut self, c: &mut Change, rel: &Path, u: Meta) -> Result<(), WorkspaceError> {
        c.new_type = Some(u.ty);
        c.new_mode = Some(u.mode);
        match u.ty {
            EntryType::File => {
                c.size = Some(u.size);
                self.hash_new(c, rel)?;
                let new = self.sniff(Side::Upper, rel)?;
                c.binary = new.binary;
                if !c.binary {
                    self.count_lines(c, rel, false, true)?;
                }
            }
            EntryType::Symlink => {
                c.symlink_target = Some(
                    fsx::read_link(self.upper.as_fd(), rel)
                        .map_err(|e| WorkspaceError::io("read upper link", rel, e))?,
                );
            }
            EntryType::Dir | EntryType::Other => {}
        }
        Ok(())
    }

    /// Hashes the new file's content, the bytes the digest and apply bind
    /// to. Its size is taken from what was read: a file the sandbox is
    /// still writing is described as it was hashed.
    fn hash_new(&self, c: &mut Change, rel: &Path) -> Result<(), WorkspaceError> {
        let mut file = fsx::open_file(self.upper.as_fd(), rel)
            .map_err(|e| WorkspaceError::io("open upper file", rel, e))?;
        let (hash, len) =
            ContentHash::of_reader(&mut file).map_err(|e| WorkspaceError::io("read", rel, e))?;
        c.content_sha256 = Some(hash);
        c.size = Some(len);
        Ok(())
    }

    fn side(&self, side: Side) -> BorrowedFd<'_> {
        match side {
            Side::Lower => self.lower.as_fd(),
            Side::Upper => self.upper.as_fd(),
        }
    }

    fn sniff(&self, side: Side, rel: &Path) -> Result<Sniff, WorkspaceError> {
        let head = fsx::read_head(self.side(side), rel, SNIFF_LEN)
            .map_err(|e| WorkspaceError::io("read", rel, e))?;
        Ok(Sniff { binary: looks_binary(&head) })
    }

    /// Fills the line counts for a text change when both sides fit in
    /// memory and are UTF-8; otherwise the change is marked binary.
    fn count_lines(
        &self,
        c: &mut Change,
        rel: &Path,
        with_old: bool,
        with_new: bool,
    ) -> Result<(), WorkspaceError> {
        let load = |side: Side, wanted: bool| -> Result<Option<Option<String>>, WorkspaceError> {
            if !wanted {
                return Ok(Some(None));
            }
            let bytes = fsx::read_file_bounded(self.side(side), rel, TEXT_LIMIT)
                .map_err(|e| WorkspaceError::io("read", rel, e))?;
            Ok(bytes.map(|b| String::from_utf8(b).ok()))
        };
        let (Some(old), Some(new)) = (load(Side::Lower, with_old)?, load(Side::Upper, with_new)?) else {
            // Too large to diff: no line counts, not binary either.
            return Ok(());
        };
        if (with_old && old.is_none()) || (with_new && new.is_none()) {
            c.binary = true;
            return Ok(());
        }
        let (added, removed) =
            crate::render::count_lines(old.as_deref().unwrap_or(""), new.as_deref().unwrap_or(""));
        c.lines_added = Some(added);
        c.lines_removed = Some(removed);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Lower,
    Upper,
}

struct Sniff {
    binary: bool,
}

/// Git's rule: a NUL byte in the first few kilobytes means binary.
pub(crate) fn looks_binary(head: &[u8]) -> bool {
    head.contains(&0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::fs;

    /// The walk is driven by the upper layer: a big workspace with a small
    /// change costs a handful of lower lookups, not one per file.
    #[test]
    fn lower_lookups_do_not_grow_with_the_workspace() {
        let tmp = tempfile::tempdir().unwrap();
        let lower = tmp.path().join("lower");
        let upper = tmp.path().join("upper");
        for d in 0..40 {
            let dir = lower.join(format!("pkg{d}"));
            fs::create_dir_all(&dir).unwrap();
            for i in 0..50 {
                fs::write(dir.join(format!("f{i}.txt")), b"x\n").unwrap();
            }
        }
        fs::create_dir_all(upper.join("pkg7")).unwrap();
        fs::write(upper.join("pkg7/f3.txt"), b"changed\n").unwrap();
        fs::write(upper.join("new.txt"), b"new\n").unwrap();
        let mut walker = Walker::open(&lower, &upper).unwrap();
        walker.run().unwrap();
        assert_eq!(walker.changes.len(), 2);
        assert!(
            walker.lower_lookups <= 6,
            "{} lower lookups for 2 changes in a 2000-file tree",
            walker.lower_lookups
        );
    }
}
