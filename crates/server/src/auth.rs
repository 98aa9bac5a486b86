//! Tenancy: every request acts for the uid on the other end of the socket.
//! A user sees and touches only the sandboxes they own; root sees all. What
//! a user names on the host (a workspace, a policy file) must be theirs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::error::ApiError;

/// The caller, from SO_PEERCRED on its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Peer {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether this caller may see and act on a sandbox owned by `owner`.
    pub fn may_access(&self, owner: u32) -> bool {
        self.is_root() || self.uid == owner
    }

    /// `None` for root (everything), else the caller's uid: the owner filter
    /// for listings.
    pub fn owner_filter(&self) -> Option<u32> {
        (!self.is_root()).then_some(self.uid)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Peer>()
            .copied()
            .ok_or_else(|| ApiError::forbidden("the caller could not be identified"))
    }
}

/// Checks that `peer` may use `path` as a workspace and returns it resolved.
/// The daemon is root; without this a user could have their sandbox read
/// any directory on the host. A user's workspace must be a directory they
/// own, reachable by them through every parent.
pub fn check_workspace(peer: &Peer, path: &Path) -> Result<PathBuf, ApiError> {
    if !path.is_absolute() {
        return Err(ApiError::bad_request(
            "invalid_workspace",
            format!(
                "workspace {} must be an absolute path (the daemon has no current directory of yours)",
                path.display()
            ),
        ));
    }
    let resolved = path.canonicalize().map_err(|e| {
        ApiError::bad_request("invalid_workspace", format!("workspace {}: {e}", path.display()))
    })?;
    let meta = std::fs::metadata(&resolved).map_err(|e| {
        ApiError::bad_request("invalid_workspace", format!("workspace {}: {e}", resolved.display()))
    })?;
    if !meta.is_dir() {
        return Err(ApiError::bad_request(
            "invalid_workspace",
            format!("workspace {} is not a directory", resolved.display()),
        ));
    }
    if peer.is_root() {
        return Ok(resolved);
    }
    if meta.uid() != peer.uid {
        tracing::warn!(uid = peer.uid, path = %resolved.display(), owner = meta.uid(), "denied: workspace not owned by the caller");
        return Err(ApiError::forbidden(format!(
            "workspace {} is owned by uid {}, not by you (uid {}); use a directory you own",
            resolved.display(),
            meta.uid(),
            peer.uid
        )));
    }
    for parent in resolved.ancestors().skip(1) {
        let Ok(m) = std::fs::metadata(parent) else {
            return Err(ApiError::forbidden(format!("cannot check {}", parent.display())));
        };
        if !searchable_by(&m, peer) {
            tracing::warn!(uid = peer.uid, path = %parent.display(), "denied: workspace parent not searchable by the caller");
            return Err(ApiError::forbidden(format!(
                "workspace {} is not reachable by you: {} is not searchable by uid {}",
                resolved.display(),
                parent.display(),
                peer.uid
            )));
        }
    }
    Ok(resolved)
}

/// Permission to search a directory, judged by its mode bits against the
/// caller's uid and primary gid (supplementary groups are not known here, so
/// this errs on the side of refusing).
fn searchable_by(meta: &std::fs::Metadata, peer: &Peer) -> bool {
    let mode = meta.mode();
    if meta.uid() == peer.uid {
        mode & 0o100 != 0
    } else if meta.gid() == peer.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn access_rules() {
        let root = Peer { uid: 0, gid: 0, pid: None };
        let alice = Peer { uid: 1000, gid: 1000, pid: None };
        assert!(root.may_access(1000) && root.may_access(0));
        assert!(alice.may_access(1000));
        assert!(!alice.may_access(0) && !alice.may_access(1001));
        assert_eq!(root.owner_filter(), None);
        assert_eq!(alice.owner_filter(), Some(1000));
    }

    #[test]
    fn workspace_checks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        let me = Peer {
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            pid: None,
        };
        let err = check_workspace(&me, Path::new("relative")).unwrap_err();
        assert_eq!(err.code, "invalid_workspace");
        let err = check_workspace(&me, &dir.path().join("missing")).unwrap_err();
        assert_eq!(err.code, "invalid_workspace");
        std::fs::write(dir.path().join("file"), b"").unwrap();
        assert_eq!(check_workspace(&me, &dir.path().join("file")).unwrap_err().code, "invalid_workspace");
        // Symlinks are resolved before the checks.
        std::os::unix::fs::symlink(&ws, dir.path().join("link")).unwrap();
        let resolved = check_workspace(&me, &dir.path().join("link")).unwrap();
        assert_eq!(resolved, ws.canonicalize().unwrap());

        // Someone else's directory is refused to a non-root caller.
        let stranger = Peer { uid: 4_000_000, gid: 4_000_000, pid: None };
        if me.uid != stranger.uid {
            let err = check_workspace(&stranger, &ws).unwrap_err();
            assert_eq!(err.code, "forbidden", "{err}");
        }
        if me.is_root() {
            std::os::unix::fs::chown(&ws, Some(stranger.uid), Some(stranger.gid)).unwrap();
            assert!(check_workspace(&stranger, &ws).is_ok() || !searchable_path(dir.path()));
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
            let err = check_workspace(&stranger, &ws).unwrap_err();
            assert_eq!(err.code, "forbidden", "{err}");
        }
    }

    fn searchable_path(p: &Path) -> bool {
        p.ancestors().all(|a| std::fs::metadata(a).is_ok_and(|m| m.mode() & 0o001 != 0))
    }
}
