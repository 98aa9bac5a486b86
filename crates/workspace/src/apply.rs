//! Applying a reviewed diff back to the host workspace.
//!
//! The diff and the upper layer come from untrusted code, so apply is built
//! as two phases:
//!
//! 1. **Validate** every change without writing anything: path syntax,
//!    protected paths, special files, symlink targets, the host side (no
//!    symlink on the way, no conflicting concurrent change) and the upper
//!    side (still what the diff says). Every refusal is collected, and one
//!    refusal stops the whole apply.
//! 2. **Write** with a journal: entries that go away are first renamed
//!    aside (same directory, unique name), new content is written to a
//!    temporary name and renamed into place. If any step fails, the journal
//!    is undone in reverse and the workspace is as before. On success the
//!    set-aside entries are deleted.
//!
//! Apply writes the change the diff describes and nothing else: modes and
//! link texts come from the diff itself, and each file's bytes are hashed
//! while they are copied into their temporary file and compared with the
//! hash the diff recorded *before* that file is moved into place. A sandbox
//! that still rewrites its layer can make apply fail (and roll back), never
//! make it write something else. [`ApplyOptions::expect`] binds the whole
//! apply to the digest a person reviewed ([`Diff::digest`]); the digest of
//! what was written, computed from the hashes of the bytes copied, must
//! equal it before the set-aside entries are deleted.
//!
//! All host paths are resolved beneath the workspace descriptor with
//! symlinks refused (see [`crate::fsx`]); symlinks from the diff are
//! created with their link text verbatim and never resolved. New entries
//! get at most `0o777` permission bits (setuid, setgid and sticky are
//! stripped and reported) and belong to the user running apply.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use globset::{Glob, GlobSet, GlobSetBuilder};
use rustix::fs::{Mode, OFlags, RenameFlags};

use crate::diff::{Change, ChangeKind, Diff, EntryType};
use crate::digest::{self, ChangeDigest, ContentHash, ContentHasher};
use crate::error::{ApplyError, Refusal, RefusalReason};
use crate::fsx::{self, MAX_DEPTH, Meta};
use crate::names;

/// What apply may do beyond the safe default.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Apply changes to protected paths, `.git` replacements and symlinks
    /// whose target is absolute or leaves the workspace. Never lifts the
    /// refusal of devices/FIFOs/sockets, invalid paths, host-side symlinks
    /// or conflicts.
    pub allow_protected: bool,
    /// Globs (globset syntax) relative to the workspace. A change is
    /// protected when its path or any ancestor matches, and a deletion of a
    /// directory is protected when anything inside it on the host matches.
    /// `*` also matches `/` here, so `*.env` protects at any depth.
    pub protected: Vec<String>,
    /// The digest of the change that was reviewed: apply refuses, writing
    /// nothing, unless the change is still exactly that.
    pub expect: Option<ChangeDigest>,
}

/// What apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Files, symlinks and directories created or rewritten, and entries
    /// whose permission bits changed.
    pub written: Vec<PathBuf>,
    /// Entries removed (each listed deleted path, including children of a
    /// removed directory).
    pub deleted: Vec<PathBuf>,
    /// Entries whose setuid/setgid/sticky bits were dropped.
    pub stripped_mode_bits: Vec<PathBuf>,
    /// Added entries the host already had, identical; left alone.
    pub unchanged: Vec<PathBuf>,
    /// Non-fatal problems after the changes were in place (for example a
    /// set-aside copy that could not be removed).
    pub warnings: Vec<String>,
    /// The digest of what was written, from the hashes of the bytes
    /// copied (equal to the diff's digest, or apply fails).
    pub digest: Option<ChangeDigest>,
}

/// Runs the validation pass alone: `Ok` means [`apply`] would not refuse
/// (it can still fail on I/O, in which case it rolls back).
pub fn check_apply(
    diff: &Diff,
    upper: &Path,
    workspace: &Path,
    opts: &ApplyOptions,
) -> Result<(), ApplyError> {
    let roots = Roots::open(upper, workspace)?;
    validate(diff, &roots, opts).map(|_| ())
}

/// Validates every change, then writes them all or none.
pub fn apply(
    diff: &Diff,
    upper: &Path,
    workspace: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    apply_with(diff, upper, workspace, opts, &mut |_| {})
}

/// [`apply`], telling `progress` how many entries it has written or
/// removed so far (for a progress line on large applies).
pub fn apply_with(
    diff: &Diff,
    upper: &Path,
    workspace: &Path,
    opts: &ApplyOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<ApplyReport, ApplyError> {
    let roots = Roots::open(upper, workspace)?;
    let plan = validate(diff, &roots, opts)?;
    execute(&roots, diff, plan, progress)
}

struct Roots {
    upper: OwnedFd,
    ws: OwnedFd,
}

impl Roots {
    fn open(upper: &Path, workspace: &Path) -> Result<Roots, ApplyError> {
        let err = |op, p: &Path| {
            let path = p.to_path_buf();
            move |source| ApplyError::Open { op, path, source }
        };
        Ok(Roots {
            upper: fsx::open_layer_root(upper).map_err(err("open upper layer", upper))?,
            ws: fsx::open_root(workspace).map_err(err("open workspace", workspace))?,
        })
    }
}

/// One write-phase operation.
#[derive(Debug, Clone)]
enum Op {
    /// Set the entry aside (restored on rollback, deleted on success).
    Remove,
    Mkdir {
        mode: u32,
    },
    WriteFile {
        mode: u32,
        replace: bool,
        /// The hash the copied bytes must have.
        content: ContentHash,
    },
    Symlink {
        target: PathBuf,
        replace: bool,
    },
    Chmod {
        mode: u32,
        dir: bool,
    },
}

#[derive(Debug, Clone)]
struct Step {
    path: PathBuf,
    op: Op,
}

struct Plan {
    removes: Vec<Step>,
    creates: Vec<Step>,
    report: ApplyReport,
    /// What the written change's digest must be.
    digest: ChangeDigest,
}

/// Whether a path lies inside something the plan replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cover {
    /// Host state applies.
    None,
    /// Under a directory the plan creates: the host has nothing here.
    Fresh,
    /// Under an entry the plan removes.
    Removed,
}

fn build_globset(patterns: &[String]) -> Result<GlobSet, ApplyError> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let glob = Glob::new(p).map_err(|source| ApplyError::InvalidGlob { glob: p.clone(), source })?;
        b.add(glob);
    }
    b.build().map_err(|source| ApplyError::InvalidGlob { glob: patterns.join(", "), source })
}

/// Permission bits apply will create: never setuid/setgid/sticky.
fn sanitize_mode(mode: Option<u32>, default: u32) -> (u32, bool) {
    let mode = mode.unwrap_or(default);
    (mode & 0o777, mode & 0o7000 != 0)
}

/// True when `target`, placed at `link`, is absolute or climbs above the
/// workspace root lexically.
fn symlink_escapes(link: &Path, target: &Path) -> bool {
    let bytes = target.as_os_str().as_bytes();
    if bytes.first() == Some(&b'/') {
        return true;
    }
    let mut depth = link.components().count().saturating_sub(1);
    for comp in bytes.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return true,
            },
            _ => depth += 1,
        }
    }
    false
}

/// The record's own fields must agree with its kind.
fn malformed(c: &Change) -> Option<&'static str> {
    match (c.kind, c.old_type, c.new_type) {
        (ChangeKind::Added, None, Some(_)) => None,
        (ChangeKind::Deleted, Some(_), None) => None,
        (ChangeKind::Modified, Some(a), Some(b)) if a == b => None,
        (ChangeKind::TypeChanged, Some(a), Some(b)) if a != b => None,
        _ => Some("kind and old/new types disagree"),
    }
}

struct Validator<'a> {
    roots: &'a Roots,
    opts: &'a ApplyOptions,
    globs: GlobSet,
    refusals: Vec<Refusal>,
    fresh: BTreeSet<PathBuf>,
    removed: BTreeSet<PathBuf>,
    plan: Plan,
}

fn validate(diff: &Diff, roots: &Roots, opts: &ApplyOptions) -> Result<Plan, ApplyError> {
    let digest = diff.digest();
    if let Some(expected) = opts.expect
        && expected != digest
    {
        return Err(ApplyError::DigestMismatch { expected, found: digest });
    }
    let mut changes: Vec<&Change> = diff.changes.iter().collect();
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    let mut v = Validator {
        roots,
        opts,
        globs: build_globset(&opts.protected)?,
        refusals: Vec::new(),
        fresh: BTreeSet::new(),
        removed: BTreeSet::new(),
        plan: Plan { removes: Vec::new(), creates: Vec::new(), report: ApplyReport::default(), digest },
    };
    let mut seen = BTreeSet::new();
    for c in changes {
        if !seen.insert(c.path.as_os_str().as_bytes().to_vec()) {
            v.refuse(c, RefusalReason::Malformed("the path is listed twice"));
            continue;
        }
        v.check(c)?;
    }
    if !v.refusals.is_empty() {
        return Err(ApplyError::Refused { refusals: v.refusals });
    }
    Ok(v.plan)
}

impl Validator<'_> {
    fn refuse(&mut self, c: &Change, reason: RefusalReason) {
        self.refusals.push(Refusal { path: c.path.clone(), reason });
    }

    fn io_err(op: &'static str, path: &Path, source: io::Error) -> ApplyError {
        ApplyError::Validate { op, path: path.to_path_buf(), source }
    }

    /// The protected pattern matching `path` or one of its ancestors.
    fn protected_match(&self, path: &Path) -> Option<PathBuf> {
        if self.globs.is_empty() {
            return None;
        }
        path.ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .find(|a| self.globs.is_match(a))
            .map(Path::to_path_buf)
    }

    fn cover(&self, path: &Path) -> Cover {
        let mut ancestors = path.ancestors().skip(1);
        if ancestors.clone().any(|a| self.fresh.contains(a)) {
            Cover::Fresh
        } else if ancestors.any(|a| self.removed.contains(a)) {
            Cover::Removed
        } else {
            Cover::None
        }
    }

    fn check(&mut self, c: &Change) -> Result<(), ApplyError> {
        if let Some(why) = names::invalid_reason(&c.path) {
            self.refuse(c, RefusalReason::InvalidPath(why));
            return Ok(());
        }
        if let Some(why) = malformed(c) {
            self.refuse(c, RefusalReason::Malformed(why));
            return Ok(());
        }
        if c.new_type == Some(EntryType::Other) {
            self.refuse(c, RefusalReason::SpecialFile);
            return Ok(());
        }
        let mut policy_ok = true;
        if !self.opts.allow_protected {
            if let Some(matched) = self.protected_match(&c.path) {
                self.refuse(c, RefusalReason::Protected { matched });
                policy_ok = false;
            }
            let is_git = c.path.file_name() == Some(OsStr::new(".git"));
            let git_bad = match c.kind {
                ChangeKind::Added => c.new_type != Some(EntryType::Dir),
                ChangeKind::Modified => c.new_type == Some(EntryType::Symlink),
                ChangeKind::Deleted | ChangeKind::TypeChanged => true,
            };
            if is_git && git_bad {
                self.refuse(c, RefusalReason::GitReplaced);
                policy_ok = false;
            }
            let escaping = match (c.new_type, &c.symlink_target) {
                (Some(EntryType::Symlink), Some(t)) if symlink_escapes(&c.path, t) => Some(t),
                _ => None,
            };
            if let Some(target) = escaping {
                self.refuse(c, RefusalReason::SymlinkEscapes { target: target.clone() });
                policy_ok = false;
            }
        }
        if c.new_type == Some(EntryType::Symlink)
            && c.symlink_target
                .as_ref()
                .is_none_or(|t| t.as_os_str().is_empty() || t.as_os_str().as_bytes().contains(&0))
        {
            self.refuse(c, RefusalReason::Malformed("symlink without a usable target"));
            return Ok(());
        }
        if c.new_type.is_some() && !self.check_upper(c)? {
            return Ok(());
        }
        let cover = self.cover(&c.path);
        let host = match cover {
            Cover::Fresh => {
                if c.kind != ChangeKind::Added {
                    self.refuse(c, RefusalReason::Malformed("only additions can lie inside a new directory"));
                    return Ok(());
                }
                None
            }
            Cover::Removed => {
                if c.kind != ChangeKind::Deleted {
                    self.refuse(c, RefusalReason::Malformed("only deletions can lie inside a removed entry"));
                } else if policy_ok {
                    self.plan.report.deleted.push(c.path.clone());
                }
                return Ok(());
            }
            Cover::None => match self.host_lookup(c)? {
                HostLookup::Found(m) => m,
                HostLookup::Refused => return Ok(()),
            },
        };
        if digest::writes_content(c) && c.content_sha256.is_none() {
            // Without it, apply could not tell the reviewed bytes from others.
            self.refuse(c, RefusalReason::Malformed("a file record without the hash of its content"));
            return Ok(());
        }
        self.plan_change(c, host)
    }

    /// The upper entry must still be what the diff says. Returns false
    /// after refusing.
    fn check_upper(&mut self, c: &Change) -> Result<bool, ApplyError> {
        let upper = self.roots.upper.as_fd();
        let meta = match fsx::lstat(upper, &c.path) {
            Ok(m) => m,
            Err(e) if fsx::is_symlink_refusal(&e) => {
                self.refuse(
                    c,
                    RefusalReason::UpperMismatch("a symlink lies on its path in the layer".into()),
                );
                return Ok(false);
            }
            Err(e) => return Err(Self::io_err("inspect upper layer entry", &c.path, e)),
        };
        let mismatch = match meta {
            None => Some("it is missing from the layer".to_string()),
            Some(m) if m.whiteout || Some(m.ty) != c.new_type => {
                Some(format!("it is now a {} in the layer", m.kind_name))
            }
            Some(m)
                if m.ty == EntryType::File && c.content_changed && c.size.is_some_and(|s| s != m.size) =>
            {
                Some("its size changed".to_string())
            }
            Some(m) if m.ty == EntryType::Symlink => {
                let target = fsx::read_link(upper, &c.path)
                    .map_err(|e| Self::io_err("read upper link", &c.path, e))?;
                (Some(&target) != c.symlink_target.as_ref()).then(|| "its link target changed".to_string())
            }
            Some(_) => None,
        };
        if let Some(what) = mismatch {
            self.refuse(c, RefusalReason::UpperMismatch(what));
            return Ok(false);
        }
        Ok(true)
    }

    fn host_lookup(&mut self, c: &Change) -> Result<HostLookup, ApplyError> {
        let ws = self.roots.ws.as_fd();
        let (parent, name) = fsx::split(&c.path).map_err(|e| Self::io_err("split path", &c.path, e))?;
        let dir = match fsx::open_dir(ws, parent) {
            Ok(d) => d,
            Err(e) if fsx::is_symlink_refusal(&e) => {
                self.refuse(c, RefusalReason::SymlinkOnPath);
                return Ok(HostLookup::Refused);
            }
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) => {
                self.refuse(c, RefusalReason::SymlinkOnPath);
                return Ok(HostLookup::Refused);
            }
            Err(e) if fsx::is_absent(&e) => {
                if c.kind == ChangeKind::Deleted {
                    return Ok(HostLookup::Found(None));
                }
                self.refuse(
                    c,
                    RefusalReason::Conflict("its parent directory no longer exists on the host".into()),
                );
                return Ok(HostLookup::Refused);
            }
            Err(e) => return Err(Self::io_err("open directory", parent, e)),
        };
        let meta = fsx::lstat_at(dir.as_fd(), name).map_err(|e| Self::io_err("stat", &c.path, e))?;
        Ok(HostLookup::Found(meta))
    }

    fn plan_change(&mut self, c: &Change, host: Option<Meta>) -> Result<(), ApplyError> {
        let path = c.path.clone();
        match c.kind {
            ChangeKind::Added => match host {
                None => self.plan_create(c),
                Some(h) if Some(h.ty) == c.new_type && self.host_matches_upper(c, h)? => {
                    self.plan.report.unchanged.push(path);
                    Ok(())
                }
                Some(h) => {
                    let what = if Some(h.ty) == c.new_type {
                        "it was also created on the host, with different content".to_string()
                    } else {
                        format!("it was also created on the host, as a {}", h.kind_name)
                    };
                    self.refuse(c, RefusalReason::Conflict(what));
                    Ok(())
                }
            },
            ChangeKind::Modified => {
                let Some(h) = host.filter(|h| Some(h.ty) == c.old_type) else {
                    self.refuse(c, Self::gone_conflict(host));
                    return Ok(());
                };
                let (mode, stripped) = sanitize_mode(c.new_mode, h.mode);
                if stripped {
                    self.plan.report.stripped_mode_bits.push(path.clone());
                }
                let op = match c.new_type {
                    Some(EntryType::Dir) => Op::Chmod { mode, dir: true },
                    Some(EntryType::File) if !c.content_changed => Op::Chmod { mode, dir: false },
                    Some(EntryType::File) => Op::WriteFile { mode, replace: true, content: content_hash(c)? },
                    Some(EntryType::Symlink) => {
                        Op::Symlink { target: c.symlink_target.clone().unwrap_or_default(), replace: true }
                    }
                    Some(EntryType::Other) | None => return Ok(()),
                };
                self.plan.creates.push(Step { path, op });
                Ok(())
            }
            ChangeKind::Deleted => match host {
                None => Ok(()),
                Some(h) if Some(h.ty) == c.old_type => {
                    self.plan_remove(c, h)?;
                    self.plan.report.deleted.push(path);
                    Ok(())
                }
                Some(h) => {
                    self.refuse(
                        c,
                        RefusalReason::Conflict(format!("it is now a {} on the host", h.kind_name)),
                    );
                    Ok(())
                }
            },
            ChangeKind::TypeChanged => {
                let Some(h) = host.filter(|h| Some(h.ty) == c.old_type) else {
                    self.refuse(c, Self::gone_conflict(host));
                    return Ok(());
                };
                self.plan_remove(c, h)?;
                self.plan_create(c)
            }
        }
    }

    fn gone_conflict(host: Option<Meta>) -> RefusalReason {
        RefusalReason::Conflict(match host {
            None => "it no longer exists on the host".to_string(),
            Some(h) => format!("it is now a {} on the host", h.kind_name),
        })
    }

    fn plan_create(&mut self, c: &Change) -> Result<(), ApplyError> {
        let path = c.path.clone();
        let op = match c.new_type {
            Some(EntryType::Dir) => {
                let (mode, stripped) = sanitize_mode(c.new_mode, 0o755);
                if stripped {
                    self.plan.report.stripped_mode_bits.push(path.clone());
                }
                self.fresh.insert(path.clone());
                Op::Mkdir { mode }
            }
            Some(EntryType::File) => {
                let (mode, stripped) = sanitize_mode(c.new_mode, 0o644);
                if stripped {
                    self.plan.report.stripped_mode_bits.push(path.clone());
                }
                Op::WriteFile { mode, replace: false, content: content_hash(c)? }
            }
            Some(EntryType::Symlink) => {
                Op::Symlink { target: c.symlink_target.clone().unwrap_or_default(), replace: false }
            }
            Some(EntryType::Other) | None => return Ok(()),
        };
        self.plan.creates.push(Step { path, op });
        Ok(())
    }

    fn plan_remove(&mut self, c: &Change, host: Meta) -> Result<(), ApplyError> {
        if host.ty == EntryType::Dir && !self.opts.allow_protected {
            let dir = fsx::open_dir(self.roots.ws.as_fd(), &c.path)
                .map_err(|e| Self::io_err("open directory", &c.path, e))?;
            if let Some(matched) = self.protected_inside(dir.as_fd(), &c.path, 0)? {
                self.refuse(c, RefusalReason::Protected { matched });
                return Ok(());
            }
        }
        self.removed.insert(c.path.clone());
        self.plan.removes.push(Step { path: c.path.clone(), op: Op::Remove });
        Ok(())
    }

    /// Finds a protected path (or a nested `.git`) inside a host directory that is
    /// about to be removed, however the diff describes its contents.
    fn protected_inside(
        &self,
        dir: BorrowedFd<'_>,
        rel: &Path,
        depth: usize,
    ) -> Result<Option<PathBuf>, ApplyError> {
        if depth > MAX_DEPTH {
            return Err(Self::io_err(
                "walk",
                rel,
                io::Error::new(io::ErrorKind::InvalidInput, "directory nesting too deep"),
            ));
        }
        let names = fsx::list_dir(dir).map_err(|e| Self::io_err("read directory", rel, e))?;
        for name in names {
            let child = rel.join(&name);
            if name == ".git" || (!self.globs.is_empty() && self.globs.is_match(&child)) {
                return Ok(Some(child));
            }
            let meta = fsx::lstat_at(dir, &name).map_err(|e| Self::io_err("stat", &child, e))?;
            if meta.is_some_and(|m| m.ty == EntryType::Dir) {
                let sub = rustix::fs::openat(
                    dir,
                    &name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| Self::io_err("open directory", &child, e.into()))?;
                if let Some(found) = self.protected_inside(sub.as_fd(), &child, depth + 1)? {
                    return Ok(Some(found));
                }
            }
        }
        Ok(None)
    }

    /// For an addition the host already has: is it the same thing? A file
    /// is when its bytes have the hash the diff recorded.
    fn host_matches_upper(&self, c: &Change, host: Meta) -> Result<bool, ApplyError> {
        let ws = self.roots.ws.as_fd();
        match host.ty {
            EntryType::Dir => Ok(true),
            EntryType::File => {
                let mut file = fsx::open_file(ws, &c.path).map_err(|e| Self::io_err("open", &c.path, e))?;
                let (hash, _) =
                    ContentHash::of_reader(&mut file).map_err(|e| Self::io_err("read", &c.path, e))?;
                Ok(c.content_sha256 == Some(hash))
            }
            EntryType::Symlink => {
                let t = fsx::read_link(ws, &c.path).map_err(|e| Self::io_err("read link", &c.path, e))?;
                Ok(Some(&t) == c.symlink_target.as_ref())
            }
            EntryType::Other => Ok(false),
        }
    }
}

/// The content hash of a change that writes a file (checked present by
/// the validator before planning).
fn content_hash(c: &Change) -> Result<ContentHash, ApplyError> {
    c.content_sha256.ok_or_else(|| ApplyError::Validate {
        op: "plan",
        path: c.path.clone(),
        source: io::Error::other("a file record without the hash of its content"),
    })
}

enum HostLookup {
    Found(Option<Meta>),
    Refused,
}

/// One thing the write phase did, and how to take it back.
#[derive(Debug)]
enum Undo {
    /// We created `name`; undo removes it.
    Created { parent: PathBuf, name: OsString },
    /// We renamed `name` to `backup`; undo renames it back.
    MovedAside { parent: PathBuf, name: OsString, backup: OsString },
    /// We renamed our temporary `from` to `to`; undo renames it back.
    Renamed { parent: PathBuf, from: OsString, to: OsString },
    /// We changed permission bits; undo restores them.
    Chmod { path: PathBuf, old: u32, dir: bool },
}

static NAME_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name for a temporary or set-aside entry; `O_EXCL` and
/// `RENAME_NOREPLACE` make a clash an error, never an overwrite.
fn scratch_name(kind: &str) -> OsString {
    let n = NAME_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    OsString::from(format!(".airlock-{kind}-{}-{nanos:x}-{n}", std::process::id()))
}

#[cfg(test)]
thread_local! {
    /// Test hook: fail the write phase at the N-th mutating step.
    pub(crate) static FAIL_AT_STEP: std::cell::Cell<Option<usize>> =
        const { std::cell::Cell::new(None) };
}

#[cfg(test)]
thread_local! {
    /// Test hook: runs once validation is done, right before the first
    /// write (where a sandbox could rewrite its layer).
    pub(crate) static BEFORE_WRITE: std::cell::RefCell<Option<Box<dyn FnMut()>>> =
        const { std::cell::RefCell::new(None) };
}

struct Writer<'a> {
    roots: &'a Roots,
    undo: Vec<Undo>,
    backups: Vec<(PathBuf, OsString)>,
    steps_done: usize,
    /// The hash of the bytes copied into each file written.
    written: BTreeMap<PathBuf, ContentHash>,
}

/// Why the write phase stopped.
enum WriteFailure {
    /// An operation failed: what, on which path, and the OS error.
    Io(&'static str, PathBuf, io::Error),
    /// The bytes copied for this file are not the reviewed ones.
    ContentChanged(Option<PathBuf>),
}

impl From<(&'static str, PathBuf, io::Error)> for WriteFailure {
    fn from((op, path, source): (&'static str, PathBuf, io::Error)) -> WriteFailure {
        WriteFailure::Io(op, path, source)
    }
}

type WriteResult<T> = Result<T, WriteFailure>;

impl Writer<'_> {
    /// Called before every mutation; lets tests inject a failure anywhere.
    fn checkpoint(&mut self, path: &Path) -> WriteResult<()> {
        self.steps_done += 1;
        #[cfg(test)]
        {
            if FAIL_AT_STEP.with(|f| f.get()) == Some(self.steps_done) {
                return Err(WriteFailure::Io(
                    "continue (injected failure)",
                    path.to_path_buf(),
                    io::Error::other("injected failure"),
                ));
            }
        }
        let _ = path;
        Ok(())
    }

    fn parent_dir(&self, path: &Path) -> WriteResult<(OwnedFd, PathBuf, OsString)> {
        let (parent, name) = fsx::split(path).map_err(|e| ("split", path.to_path_buf(), e))?;
        let dir = fsx::open_dir(self.roots.ws.as_fd(), parent)
            .map_err(|e| ("open directory", parent.to_path_buf(), e))?;
        Ok((dir, parent.to_path_buf(), name.to_os_string()))
    }

    fn move_aside(&mut self, dir: BorrowedFd<'_>, parent: &Path, name: &OsStr) -> WriteResult<()> {
        let path = parent.join(name);
        self.checkpoint(&path)?;
        let backup = scratch_name("old");
        rustix::fs::renameat_with(dir, name, dir, &backup, RenameFlags::NOREPLACE)
            .map_err(|e| ("set aside", path.clone(), e.into()))?;
        self.undo.push(Undo::MovedAside {
            parent: parent.to_path_buf(),
            name: name.to_os_string(),
            backup: backup.clone(),
        });
        self.backups.push((parent.to_path_buf(), backup));
        Ok(())
    }

    fn remove(&mut self, path: &Path) -> WriteResult<()> {
        let (dir, parent, name) = self.parent_dir(path)?;
        self.move_aside(dir.as_fd(), &parent, &name)
    }

    fn mkdir(&mut self, path: &Path) -> WriteResult<()> {
        let (dir, parent, name) = self.parent_dir(path)?;
        self.checkpoint(path)?;
        // Owner-only until the end, so nothing can be slipped inside
        // before the final mode is set.
        rustix::fs::mkdirat(&dir, &name, Mode::from_raw_mode(0o700))
            .map_err(|e| ("create directory", path.to_path_buf(), e.into()))?;
        self.undo.push(Undo::Created { parent, name });
        Ok(())
    }

    /// Creates the temporary entry with `make`, then moves it into place,
    /// setting the old entry aside first when replacing.
    fn install(
        &mut self,
        path: &Path,
        replace: bool,
        make: impl FnOnce(BorrowedFd<'_>, &OsStr) -> WriteResult<()>,
    ) -> WriteResult<()> {
        let (dir, parent, name) = self.parent_dir(path)?;
        let tmp = scratch_name("new");
        self.checkpoint(path)?;
        self.undo.push(Undo::Created { parent: parent.clone(), name: tmp.clone() });
        make(dir.as_fd(), &tmp)?;
        if replace {
            self.move_aside(dir.as_fd(), &parent, &name)?;
        }
        self.checkpoint(path)?;
        rustix::fs::renameat_with(&dir, &tmp, &dir, &name, RenameFlags::NOREPLACE)
            .map_err(|e| ("move into place", path.to_path_buf(), e.into()))?;
        self.undo.push(Undo::Renamed { parent, from: tmp, to: name });
        Ok(())
    }

    fn write_file(&mut self, path: &Path, mode: u32, replace: bool, content: ContentHash) -> WriteResult<()> {
        // The source is opened with O_NOFOLLOW and checked to be a regular
        // file: a symlink in the layer is never read through.
        let mut src = fsx::open_file(self.roots.upper.as_fd(), path)
            .map_err(|e| ("open upper file", path.to_path_buf(), e))?;
        let mut copied = None;
        self.install(path, replace, |dir, tmp| {
            let fd = rustix::fs::openat(
                dir,
                tmp,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| ("create", path.to_path_buf(), e.into()))?;
            let mut dst = File::from(fd);
            // The hash is of the very bytes written, compared before the
            // file is moved into place: what the sandbox changes later, or
            // while we read, cannot reach the workspace unnoticed.
            let hash = copy_hashing(&mut src, &mut dst).map_err(|e| ("write", path.to_path_buf(), e))?;
            copied = Some(hash);
            if hash != content {
                return Err(WriteFailure::ContentChanged(Some(path.to_path_buf())));
            }
            rustix::fs::fchmod(&dst, Mode::from_raw_mode(mode))
                .map_err(|e| ("set mode of", path.to_path_buf(), e.into()))?;
            Ok(())
        })?;
        if let Some(hash) = copied {
            self.written.insert(path.to_path_buf(), hash);
        }
        Ok(())
    }

    fn symlink(&mut self, path: &Path, target: &Path, replace: bool) -> WriteResult<()> {
        self.install(path, replace, |dir, tmp| {
            rustix::fs::symlinkat(target, dir, tmp)
                .map_err(|e| WriteFailure::Io("create symlink", path.to_path_buf(), e.into()))
        })
    }

    fn chmod(&mut self, path: &Path, mode: u32, is_dir: bool) -> WriteResult<()> {
        self.checkpoint(path)?;
        let old = set_mode(self.roots.ws.as_fd(), path, mode, is_dir)
            .map_err(|e| ("set mode of", path.to_path_buf(), e))?;
        self.undo.push(Undo::Chmod { path: path.to_path_buf(), old, dir: is_dir });
        Ok(())
    }

    /// Takes back everything in reverse; failures are collected, and the
    /// remaining undo steps still run.
    fn rollback(&mut self) -> Vec<String> {
        let ws = self.roots.ws.as_fd();
        let mut errors = Vec::new();
        while let Some(step) = self.undo.pop() {
            let result = match &step {
                Undo::Created { parent, name } => {
                    fsx::open_dir(ws, parent).and_then(|d| fsx::remove_tree_at(d.as_fd(), name, 0))
                }
                Undo::MovedAside { parent, name, backup } => fsx::open_dir(ws, parent).and_then(|d| {
                    rustix::fs::renameat_with(&d, backup, &d, name, RenameFlags::NOREPLACE)
                        .map_err(io::Error::from)
                }),
                Undo::Renamed { parent, from, to } => fsx::open_dir(ws, parent).and_then(|d| {
                    rustix::fs::renameat_with(&d, to, &d, from, RenameFlags::NOREPLACE)
                        .map_err(io::Error::from)
                }),
                Undo::Chmod { path, old, dir } => set_mode(ws, path, *old, *dir).map(|_| ()),
            };
            if let Err(e) = result {
                errors.push(format!("undo {step:?}: {e}"));
            }
        }
        errors
    }
}

/// Sets the permission bits of the entry at `path` (never through a
/// symlink) and returns the previous ones.
fn set_mode(ws: BorrowedFd<'_>, path: &Path, mode: u32, is_dir: bool) -> io::Result<u32> {
    let (parent, name) = fsx::split(path)?;
    let dir = fsx::open_dir(ws, parent)?;
    let fd: OwnedFd = if is_dir {
        rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?
    } else {
        fsx::open_file_at(dir.as_fd(), name)?.into()
    };
    let old = rustix::fs::fstat(&fd)?.st_mode & 0o7777;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
    Ok(old)
}

/// Copies `src` to `dst` and returns the hash of the bytes written.
fn copy_hashing(src: &mut File, dst: &mut File) -> io::Result<ContentHash> {
    use std::io::{Read, Write};
    let mut hasher = ContentHasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = buf.get(..n).unwrap_or_default();
        hasher.update(chunk);
        dst.write_all(chunk)?;
    }
    Ok(hasher.finish())
}

fn execute(
    roots: &Roots,
    diff: &Diff,
    plan: Plan,
    progress: &mut dyn FnMut(u64),
) -> Result<ApplyReport, ApplyError> {
    let Plan { mut removes, creates, mut report, digest: expected } = plan;
    let mut w =
        Writer { roots, undo: Vec::new(), backups: Vec::new(), steps_done: 0, written: BTreeMap::new() };
    #[cfg(test)]
    BEFORE_WRITE.with(|hook| {
        if let Some(hook) = hook.borrow_mut().as_mut() {
            hook();
        }
    });
    // Deepest first, so a removed parent never hides a child we still
    // want to set aside.
    removes.sort_by(|a, b| b.path.cmp(&a.path));
    let result = (|| -> WriteResult<()> {
        let mut done = 0u64;
        for step in &removes {
            w.remove(&step.path)?;
            done += 1;
            progress(done);
        }
        let mut new_dirs = Vec::new();
        for step in &creates {
            done += 1;
            progress(done);
            match &step.op {
                Op::Mkdir { mode } => {
                    w.mkdir(&step.path)?;
                    new_dirs.push((step.path.clone(), *mode));
                }
                Op::WriteFile { mode, replace, content } => {
                    w.write_file(&step.path, *mode, *replace, *content)?
                }
                Op::Symlink { target, replace } => w.symlink(&step.path, target, *replace)?,
                Op::Chmod { mode, dir } => w.chmod(&step.path, *mode, *dir)?,
                Op::Remove => {}
            }
            report.written.push(step.path.clone());
        }
        // Final modes of new directories last (deepest first), so a
        // read-only directory does not block filling it.
        for (path, mode) in new_dirs.iter().rev() {
            w.chmod(path, *mode, true)?;
        }
        // The last moment to take it all back: the digest of what was
        // written (the copied bytes' hashes; a file the host already had,
        // identical, by the hash checked during validation) must be the
        // reviewed one.
        let unchanged: BTreeSet<&Path> = report.unchanged.iter().map(PathBuf::as_path).collect();
        let written = digest::digest_of(&diff.changes, |c| {
            w.written
                .get(&c.path)
                .copied()
                .or(c.content_sha256.filter(|_| unchanged.contains(c.path.as_path())))
        });
        if written != expected {
            return Err(WriteFailure::ContentChanged(None));
        }
        report.digest = Some(written);
        Ok(())
    })();
    match result {
        Ok(()) => {}
        Err(WriteFailure::Io(op, path, source)) => {
            let rollback_errors = w.rollback();
            return Err(ApplyError::Write { op, path, source, rollback_errors });
        }
        Err(WriteFailure::ContentChanged(path)) => {
            let rollback_errors = w.rollback();
            return Err(ApplyError::ChangedWhileApplying { path, expected, rollback_errors });
        }
    }
    for (parent, backup) in &w.backups {
        let removed =
            fsx::open_dir(roots.ws.as_fd(), parent).and_then(|d| fsx::remove_tree_at(d.as_fd(), backup, 0));
        if let Err(e) = removed {
            let msg =
                format!("could not delete the set-aside copy {}: {e}", names::quote(&parent.join(backup)));
            tracing::warn!("{msg}");
            report.warnings.push(msg);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::compute_diff;
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn snapshot(base: &Path) -> BTreeMap<PathBuf, String> {
        fn walk(base: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, String>) {
            let mut names: Vec<_> =
                fs::read_dir(base.join(rel)).unwrap().map(|e| e.unwrap().file_name()).collect();
            names.sort();
            for name in names {
                let child = rel.join(&name);
                let full = base.join(&child);
                let meta = fs::symlink_metadata(&full).unwrap();
                let mode = meta.permissions().mode() & 0o7777;
                let desc = if meta.file_type().is_symlink() {
                    format!("link {:?}", fs::read_link(&full).unwrap())
                } else if meta.is_dir() {
                    walk(base, &child, out);
                    format!("dir {mode:o}")
                } else {
                    format!("file {mode:o} {:?}", fs::read(&full).unwrap())
                };
                out.insert(child, desc);
            }
        }
        let mut out = BTreeMap::new();
        walk(base, Path::new(""), &mut out);
        out
    }

    fn put(base: &Path, rel: &str, content: &[u8]) {
        let p = base.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    /// Fails the write phase at every possible step in turn; each time the
    /// workspace must come back byte-identical, and the same workspace is
    /// reused, so any leftover from a rollback would show up.
    #[test]
    fn failure_at_any_write_step_rolls_back_completely() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        let upper = tmp.path().join("upper");
        put(&ws, "a.txt", b"old a\n");
        put(&ws, "del.txt", b"delete me\n");
        put(&ws, "deldir/inner/x", b"x\n");
        put(&ws, "file2dir", b"f\n");
        put(&ws, "dir2file/c", b"c\n");
        put(&ws, "mode.sh", b"#!/bin/sh\n");
        std::os::unix::fs::symlink("a.txt", ws.join("ln")).unwrap();
        fs::create_dir_all(&upper).unwrap();
        put(&upper, "a.txt", b"new a\n");
        put(&upper, "file2dir/inside", b"i\n");
        put(&upper, "dir2file", b"now file\n");
        put(&upper, "mode.sh", b"#!/bin/sh\n");
        fs::set_permissions(upper.join("mode.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        put(&upper, "new/deep/file", b"n\n");
        fs::set_permissions(upper.join("new/deep"), fs::Permissions::from_mode(0o555)).unwrap();
        std::os::unix::fs::symlink("mode.sh", upper.join("ln")).unwrap();
        let mut diff = compute_diff(&ws, &upper).unwrap();
        // Deletions without whiteouts (which need root): add the records.
        for (path, ty) in [("del.txt", EntryType::File), ("deldir", EntryType::Dir)] {
            diff.changes.push(Change {
                path: PathBuf::from(path),
                kind: ChangeKind::Deleted,
                old_type: Some(ty),
                new_type: None,
                old_mode: Some(0o644),
                new_mode: None,
                size: None,
                binary: false,
                symlink_target: None,
                old_symlink_target: None,
                lines_added: None,
                lines_removed: None,
                content_changed: true,
                content_sha256: None,
            });
        }
        let before = snapshot(&ws);
        let opts = ApplyOptions::default();
        let mut step = 1;
        loop {
            FAIL_AT_STEP.with(|f| f.set(Some(step)));
            let result = apply(&diff, &upper, &ws, &opts);
            FAIL_AT_STEP.with(|f| f.set(None));
            match result {
                Err(ApplyError::Write { rollback_errors, .. }) => {
                    assert!(rollback_errors.is_empty(), "step {step}: {rollback_errors:?}");
                    assert_eq!(snapshot(&ws), before, "after failing at step {step}");
                }
                Ok(_) => break,
                Err(other) => panic!("step {step}: unexpected {other}"),
            }
            step += 1;
        }
        assert!(step > 10, "only {step} steps: the hook is not reached");
        let after = snapshot(&ws);
        assert_eq!(after[Path::new("a.txt")], format!("file 644 {:?}", b"new a\n"));
        assert_eq!(after[Path::new("mode.sh")], format!("file 755 {:?}", b"#!/bin/sh\n"));
        assert_eq!(after[Path::new("new/deep")], "dir 555");
        assert_eq!(after[Path::new("ln")], "link \"mode.sh\"");
        assert!(!after.contains_key(Path::new("deldir")));
        assert!(!after.contains_key(Path::new("del.txt")));
        assert!(after.keys().all(|p| !p.to_string_lossy().contains(".airlock-")));
    }

    /// The sandbox rewrites a file (same size, so validation's size check
    /// cannot see it) after the plan and before the write: apply stops
    /// before moving that file into place and takes back what it wrote.
    #[test]
    fn layer_rewritten_between_plan_and_write_is_refused_and_rolled_back() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        let upper = tmp.path().join("upper");
        put(&ws, "a.txt", b"old a\n");
        put(&upper, "a.txt", b"new a\n");
        put(&upper, "b/new.txt", b"new\n");
        // Last in path order: everything before it is written first.
        put(&upper, "z.txt", b"zzz\n");
        let diff = compute_diff(&ws, &upper).unwrap();
        let reviewed = diff.digest();
        let before = snapshot(&ws);
        for expect in [Some(reviewed), None] {
            let hooked_upper = upper.clone();
            BEFORE_WRITE.with(|h| {
                *h.borrow_mut() = Some(Box::new(move || put(&hooked_upper, "z.txt", b"BAD\n")));
            });
            let opts = ApplyOptions { expect, ..ApplyOptions::default() };
            let result = apply(&diff, &upper, &ws, &opts);
            BEFORE_WRITE.with(|h| *h.borrow_mut() = None);
            match result {
                Err(ref e @ ApplyError::ChangedWhileApplying { ref path, expected, ref rollback_errors }) => {
                    assert_eq!(path.as_deref(), Some(Path::new("z.txt")));
                    assert_eq!(expected, reviewed);
                    assert!(rollback_errors.is_empty(), "{rollback_errors:?}");
                    let msg = e.to_string();
                    assert!(msg.contains("z.txt") && msg.contains(&reviewed.to_string()), "{msg}");
                    assert!(msg.contains("airlock diff") && msg.contains("rolled back"), "{msg}");
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            assert_eq!(snapshot(&ws), before, "expect {expect:?}: the workspace changed");
            put(&upper, "z.txt", b"zzz\n");
        }
        // The reviewed bytes back in the layer: the same digest applies.
        let opts = ApplyOptions { expect: Some(reviewed), ..ApplyOptions::default() };
        let report = apply(&diff, &upper, &ws, &opts).unwrap();
        assert_eq!(report.digest, Some(reviewed));
        assert_eq!(fs::read(ws.join("z.txt")).unwrap(), b"zzz\n");
    }

    #[test]
    fn symlink_escape_is_lexical() {
        assert!(symlink_escapes(Path::new("a"), Path::new("/etc/passwd")));
        assert!(symlink_escapes(Path::new("a"), Path::new("../x")));
        assert!(symlink_escapes(Path::new("d/a"), Path::new("../../x")));
        assert!(symlink_escapes(Path::new("d/a"), Path::new("x/../../..")));
        assert!(!symlink_escapes(Path::new("d/a"), Path::new("../x")));
        assert!(!symlink_escapes(Path::new("a"), Path::new("./b/../c")));
    }

    #[test]
    fn modes_are_sanitized() {
        assert_eq!(sanitize_mode(Some(0o4755), 0o644), (0o755, true));
        assert_eq!(sanitize_mode(Some(0o2775), 0o644), (0o775, true));
        assert_eq!(sanitize_mode(Some(0o1777), 0o644), (0o777, true));
        assert_eq!(sanitize_mode(Some(0o640), 0o644), (0o640, false));
        assert_eq!(sanitize_mode(None, 0o644), (0o644, false));
    }
}
