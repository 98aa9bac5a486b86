//! airlock-workspace: the host side of the copy-on-write workspace.
//!
//! A sandbox sees the host workspace through overlayfs: the workspace is the
//! read-only lower layer and everything the sandbox writes lands in an upper
//! layer owned by airlock. After the run this crate
//!
//! - computes what changed from the upper layer alone ([`compute_diff`]),
//!   with a digest of everything apply would write ([`Diff::digest`]),
//! - presents it for review ([`Diff::render_unified`], [`Diff::render_stat`],
//!   [`Diff::to_json`], [`ChangeRenderer`] one change at a time),
//! - applies it back all-or-nothing without ever writing outside the
//!   workspace ([`apply`], [`check_apply`]),
//! - keeps the layer on disk ([`persist_layer`]) and copies out artifacts
//!   ([`capture_artifacts`]).
//!
//! Everything in the upper layer was written by untrusted code: names,
//! types, sizes, xattrs and symlinks there are treated as hostile input.
//! No function here follows a symlink below the roots it is given.

mod apply;
mod artifacts;
mod diff;
pub mod digest;
mod error;
mod fsx;
mod layer;
mod names;
mod persist;
mod render;

pub use apply::{ApplyOptions, ApplyReport, apply, apply_with, check_apply};
pub use artifacts::capture_artifacts;
pub use diff::{Change, ChangeKind, Diff, DiffStat, EntryType, compute_diff, compute_diff_with};
pub use digest::{ChangeDigest, ContentHash, DigestParseError};
pub use error::{ApplyError, Refusal, RefusalReason, WorkspaceError};
pub use fsx::MAX_DEPTH;
pub use names::{printable, quote, quote_bytes};
pub use persist::persist_layer;
pub use render::{ChangeRenderer, header_line, patch_sections};
