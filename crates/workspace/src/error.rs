//! Error types. Paths in messages are quoted with [`crate::names::quote`]
//! because many of them were chosen by the sandbox.

use std::io;
use std::path::PathBuf;

use crate::digest::ChangeDigest;
use crate::names::quote;

/// Failures of diffing, persisting a layer and capturing artifacts.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// A filesystem operation failed.
    #[error("cannot {op} {}: {source}", quote(path))]
    Io {
        /// What we were doing ("read directory", "open file", ...).
        op: &'static str,
        /// The path it was done on.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The upper layer uses an overlayfs feature we never enable and so
    /// cannot interpret safely.
    #[error(
        "upper layer entry {} carries the overlayfs attribute {xattr}; airlock mounts overlays \
         without redirect_dir, metacopy and xwhiteouts, so this layer was not produced by \
         airlock's mount and is refused (discard the sandbox's changes)",
        quote(path)
    )]
    UnsupportedOverlay {
        /// The entry, relative to the layer root.
        path: PathBuf,
        /// The attribute name, with its value when relevant.
        xattr: String,
    },

    /// A symlink sat on the path of an entry; it was not followed.
    #[error("{} crosses a symlink or leaves its tree; refusing to follow it", quote(path))]
    SymlinkOnPath {
        /// The path whose resolution was refused.
        path: PathBuf,
    },

    /// An entry of a type that a layer or artifact copy must not contain.
    #[error("cannot copy {}: it is a {kind}, which airlock never copies out of a sandbox", quote(path))]
    SpecialFile {
        /// The entry, relative to its tree.
        path: PathBuf,
        /// What it is ("fifo", "block device", ...).
        kind: &'static str,
    },

    /// Directory nesting beyond [`crate::MAX_DEPTH`].
    #[error(
        "{} is nested more than {} directories deep; refusing to walk further",
        quote(path),
        crate::MAX_DEPTH
    )]
    TooDeep {
        /// The directory at which the limit was hit.
        path: PathBuf,
    },

    /// The destination of a copy already exists.
    #[error("{} already exists; choose a new destination or remove it first", path.display())]
    DestinationExists {
        /// The destination.
        path: PathBuf,
    },

    /// A glob pattern did not parse.
    #[error("invalid glob pattern {glob:?}: {source}")]
    InvalidGlob {
        /// The pattern as given.
        glob: String,
        /// Why globset rejected it.
        #[source]
        source: globset::Error,
    },

    /// Artifact capture stopped because the next file would exceed the
    /// size budget. The files listed in `copied` were captured.
    #[error(
        "artifact capture stopped at {limit} bytes: {} does not fit; {} file(s) were captured \
         (raise the artifact size limit in the policy to keep more)",
        quote(skipped),
        copied.len()
    )]
    ArtifactLimit {
        /// The byte budget.
        limit: u64,
        /// The first file that did not fit.
        skipped: PathBuf,
        /// Files captured before the limit was hit (relative to `dest`).
        copied: Vec<PathBuf>,
    },
}

impl WorkspaceError {
    /// Wraps an I/O error, turning a refused symlink into
    /// [`WorkspaceError::SymlinkOnPath`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if crate::fsx::is_symlink_refusal(&source) {
            return WorkspaceError::SymlinkOnPath { path };
        }
        WorkspaceError::Io { op, path, source }
    }
}

/// Why one change of a diff was refused by [`crate::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalReason {
    /// The path is absolute, empty, or has `.`, `..`, empty or NUL parts.
    InvalidPath(&'static str),
    /// The change record contradicts itself or the rest of the diff.
    Malformed(&'static str),
    /// The change creates a device, FIFO or socket.
    SpecialFile,
    /// The path matches a protected glob.
    Protected {
        /// The protected path that matched (the path itself, an ancestor
        /// or, for a deleted directory, something inside it).
        matched: PathBuf,
    },
    /// A `.git` entry would be deleted, replaced, or added as a
    /// non-directory (a gitfile can point git at hostile hooks; deleting
    /// `.git` loses history).
    GitReplaced,
    /// A symlink on the host side lies on the path; it is never followed.
    SymlinkOnPath,
    /// A new symlink's target is absolute or climbs out of the workspace.
    SymlinkEscapes {
        /// The link text.
        target: PathBuf,
    },
    /// The host changed since the sandbox started, in a conflicting way.
    Conflict(String),
    /// The upper layer no longer matches the diff being applied.
    UpperMismatch(String),
}

impl std::fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefusalReason::InvalidPath(why) => write!(f, "invalid path: {why}"),
            RefusalReason::Malformed(why) => write!(f, "malformed change: {why}"),
            RefusalReason::SpecialFile => {
                write!(f, "devices, FIFOs and sockets are never created on the host")
            }
            RefusalReason::Protected { matched } => {
                write!(f, "protected path ({})", quote(matched))
            }
            RefusalReason::GitReplaced => write!(
                f,
                "a .git entry would be deleted or become a file or symlink (which can point git at hostile hooks)"
            ),
            RefusalReason::SymlinkOnPath => {
                write!(f, "a symlink or non-directory on the host lies on this path; it is never followed")
            }
            RefusalReason::SymlinkEscapes { target } => {
                write!(f, "symlink target {} is absolute or leaves the workspace", quote(target))
            }
            RefusalReason::Conflict(what) => write!(f, "conflict with the host: {what}"),
            RefusalReason::UpperMismatch(what) => {
                write!(f, "the sandbox layer changed after the diff: {what}")
            }
        }
    }
}

/// One refused change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The change's path, relative to the workspace.
    pub path: PathBuf,
    /// Why it was refused.
    pub reason: RefusalReason,
}

impl Refusal {
    /// True when `allow_protected` would lift this refusal.
    pub fn overridable(&self) -> bool {
        matches!(
            self.reason,
            RefusalReason::Protected { .. }
                | RefusalReason::GitReplaced
                | RefusalReason::SymlinkEscapes { .. }
        )
    }
}

fn list_refusals(refusals: &[Refusal]) -> String {
    let mut out = String::new();
    for r in refusals {
        out.push_str("\n  ");
        out.push_str(&quote(&r.path));
        out.push_str(": ");
        out.push_str(&r.reason.to_string());
    }
    if refusals.iter().any(Refusal::overridable) {
        out.push_str(
            "\nprotected paths and escaping symlinks can be applied with --allow-protected after review",
        );
    }
    out
}

/// Failures of [`crate::apply`] and [`crate::check_apply`].
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Validation refused one or more changes; nothing was written.
    #[error("apply refused, nothing was written:{}", list_refusals(refusals))]
    Refused {
        /// Every refused change, in path order.
        refusals: Vec<Refusal>,
    },

    /// Opening the workspace or upper layer failed before any write.
    #[error("cannot {op} {}: {source}", path.display())]
    Open {
        /// What we were doing.
        op: &'static str,
        /// The root path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A protected-path pattern did not parse.
    #[error("invalid protected-path pattern {glob:?}: {source}; fix the policy")]
    InvalidGlob {
        /// The pattern as given.
        glob: String,
        /// Why globset rejected it.
        #[source]
        source: globset::Error,
    },

    /// Validation could not inspect a path (an I/O error, not a refusal).
    #[error("cannot {op} {} while validating: {source}; nothing was written", quote(path))]
    Validate {
        /// What we were doing.
        op: &'static str,
        /// The path, relative to its tree.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The change is no longer the one whose digest was expected (the
    /// sandbox's layer or the workspace changed since it was reviewed);
    /// nothing was written.
    #[error(
        "apply refused, nothing was written: the change is now {found}, not the {expected} that was \
         expected; the sandbox's layer or the workspace changed since that digest was shown. Review \
         the change again (`airlock diff`) and apply it with --expect set to the digest printed there"
    )]
    DigestMismatch {
        /// The digest asked for.
        expected: ChangeDigest,
        /// The digest of the change as it is now.
        found: ChangeDigest,
    },

    /// A file's bytes, read while they were copied, are not the reviewed
    /// ones (the sandbox rewrote its layer during apply); everything
    /// written was rolled back.
    #[error(
        "apply stopped: {} changed in the sandbox's layer while it was being applied, so it is no \
         longer the reviewed change {expected}; {}. Stop the sandbox, review the change again \
         (`airlock diff`) and apply the digest printed there",
        path.as_deref().map_or_else(|| "the change".to_string(), quote),
        rollback_summary(rollback_errors)
    )]
    ChangedWhileApplying {
        /// The file whose bytes differed (`None`: found by the digest of
        /// everything written).
        path: Option<PathBuf>,
        /// The digest that was to be written.
        expected: ChangeDigest,
        /// Undo steps that failed; empty when the rollback was complete.
        rollback_errors: Vec<String>,
    },

    /// A write failed; the workspace was rolled back to its prior state
    /// (unless `rollback_errors` says otherwise).
    #[error("cannot {op} {}: {source}; {}", quote(path), rollback_summary(rollback_errors))]
    Write {
        /// What we were doing.
        op: &'static str,
        /// The path, relative to the workspace.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
        /// Undo steps that failed in turn; empty when the rollback was
        /// complete.
        rollback_errors: Vec<String>,
    },
}

fn rollback_summary(errors: &[String]) -> String {
    if errors.is_empty() {
        return "all changes made so far were rolled back, the workspace is as before".to_string();
    }
    let mut out = String::from("ROLLBACK INCOMPLETE, inspect the workspace:");
    for e in errors {
        out.push_str("\n  ");
        out.push_str(e);
    }
    out
}
