//! Landlock: a second, path-based fence around the filesystem, independent of
//! the mount namespace.
//!
//! The mount namespace decides what the command can see; Landlock decides what
//! it may do with what it sees, and it still holds if a mount is misconfigured
//! or a path is reachable through a file descriptor passed in. `read_exec`
//! paths allow reading, listing and executing; `read_write` paths allow every
//! filesystem right the kernel knows (including device ioctls, truncation and,
//! from ABI 9, connecting to Unix sockets beneath them).
//!
//! Rights are requested for the newest ABI the `landlock` crate knows, best
//! effort: an older kernel enforces what it can, and the outcome says so.
//!
//! From ABI 6 the ruleset also scopes abstract Unix sockets and signals: the
//! command cannot connect to abstract sockets of processes outside its Landlock
//! domain (host daemons listening in the abstract namespace) nor signal them.
//!
//! Network rights (ABI 4) are deliberately not handled. Landlock filters TCP
//! bind/connect by port only, not by address, and the sandbox's network
//! namespace has nothing but loopback, with egress going through airlock's
//! proxy. Allowing every port would equal not handling the rights, and denying
//! them would break local test servers and the proxy connection; the network
//! namespace is the boundary that actually decides.
//!
//! `landlock_restrict_self` applies to the calling thread (and its future
//! children) only; call [`restrict_self`] on the thread that starts the command.

use std::io;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, PathFdError, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetError, RulesetStatus, Scope,
};

/// The newest ABI whose rights airlock requests (best effort on older kernels).
const TARGET_ABI: ABI = ABI::V10;

/// Paths the sandboxed command may use; paths that do not exist are skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LandlockRules {
    /// Read files, list directories, execute.
    pub read_exec: Vec<PathBuf>,
    /// Every filesystem right (create, write, remove, rename, truncate, ioctl...).
    pub read_write: Vec<PathBuf>,
}

/// What the kernel enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockOutcome {
    /// Every right airlock asks for is enforced; `abi` is the kernel's ABI.
    FullyEnforced {
        /// Landlock ABI version of the running kernel.
        abi: i32,
    },
    /// The kernel is older than the newest ABI airlock knows: the rights it
    /// supports are enforced, the newer ones (and scopes below ABI 6) are not.
    PartiallyEnforced {
        /// Landlock ABI version of the running kernel.
        abi: i32,
    },
    /// The kernel has no Landlock (not built in, or not enabled at boot).
    NotSupported,
}

/// Why the Landlock restriction could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// A rule's path exists but cannot be inspected.
    #[error("cannot inspect {path} for a Landlock rule: {source}")]
    Stat {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A rule's path cannot be opened.
    #[error("cannot open {path} for a Landlock rule: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The error from the landlock crate.
        #[source]
        source: PathFdError,
    },
    /// The kernel rejected a rule.
    #[error("adding the Landlock rule for {path} failed: {source}")]
    AddRule {
        /// The path.
        path: PathBuf,
        /// The error from the landlock crate.
        #[source]
        source: RulesetError,
    },
    /// Creating or enforcing the ruleset failed.
    #[error("creating or enforcing the Landlock ruleset failed: {0}")]
    Ruleset(#[source] RulesetError),
    /// The policy requires Landlock and the kernel does not enforce it.
    #[error(
        "the policy requires Landlock but this kernel does not enforce it (not built in, or \
         `landlock` missing from the kernel's lsm= boot parameter); run `airlock doctor`, or \
         use a policy that does not require Landlock"
    )]
    NotEnforced,
}

/// The running kernel's Landlock ABI version, or `None` without Landlock.
pub fn abi_version() -> Option<i32> {
    crate::sys::landlock_abi().ok().and_then(|v| i32::try_from(v).ok()).filter(|v| *v > 0)
}

/// Restricts the calling thread and its future children to `rules`.
///
/// With `required`, a kernel that enforces nothing is an error; a partially
/// enforcing (older) kernel is accepted and reported in the outcome. The
/// landlock crate sets no_new_privs as part of this, as Landlock requires it
/// for processes without CAP_SYS_ADMIN.
pub fn restrict_self(rules: &LandlockRules, required: bool) -> Result<LandlockOutcome, LandlockError> {
    let all = AccessFs::from_all(TARGET_ABI);
    let read = AccessFs::from_read(TARGET_ABI);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(LandlockError::Ruleset)?
        .scope(Scope::from_all(TARGET_ABI))
        .map_err(LandlockError::Ruleset)?
        .create()
        .map_err(LandlockError::Ruleset)?;
    let grants = rules.read_exec.iter().map(|p| (p, read)).chain(rules.read_write.iter().map(|p| (p, all)));
    for (path, access) in grants {
        let Some(rule) = path_rule(path, access)? else {
            tracing::debug!(path = %path.display(), "Landlock path does not exist; skipped");
            continue;
        };
        ruleset =
            ruleset.add_rule(rule).map_err(|source| LandlockError::AddRule { path: path.clone(), source })?;
    }
    let status = ruleset.restrict_self().map_err(LandlockError::Ruleset)?;
    let abi = abi_version().unwrap_or(0);
    let outcome = match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockOutcome::FullyEnforced { abi },
        RulesetStatus::PartiallyEnforced => LandlockOutcome::PartiallyEnforced { abi },
        RulesetStatus::NotEnforced => LandlockOutcome::NotSupported,
    };
    if required && outcome == LandlockOutcome::NotSupported {
        return Err(LandlockError::NotEnforced);
    }
    tracing::debug!(?outcome, "Landlock restriction applied");
    Ok(outcome)
}

/// The rule granting `access` beneath `path`, or `None` if `path` does not
/// exist. Files get only the rights that apply to files (the kernel rejects
/// directory rights on them).
fn path_rule(path: &Path, access: BitFlags<AccessFs>) -> Result<Option<PathBeneath<PathFd>>, LandlockError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LandlockError::Stat { path: path.to_owned(), source });
        }
    };
    let access = if meta.is_dir() { access } else { access & AccessFs::from_file(TARGET_ABI) };
    let fd = PathFd::new(path).map_err(|source| LandlockError::Open { path: path.to_owned(), source })?;
    Ok(Some(PathBeneath::new(fd, access)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::privileges::test_fork::run_in_child;

    fn landlock_available(test: &str) -> bool {
        if abi_version().is_some() {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: this kernel has no Landlock and CI=true"
        );
        eprintln!("skipping {test}: this kernel has no Landlock");
        false
    }

    fn system_read_exec() -> Vec<PathBuf> {
        ["/usr", "/bin", "/lib", "/lib64", "/etc", "/does-not-exist-airlock"]
            .into_iter()
            .map(PathBuf::from)
            .collect()
    }

    #[test]
    fn writes_are_confined_to_read_write_paths() {
        if !landlock_available("writes_are_confined_to_read_write_paths") {
            return;
        }
        let inside = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let rules =
            LandlockRules { read_exec: system_read_exec(), read_write: vec![inside.path().to_owned()] };
        let inside_file = inside.path().join("ok");
        let outside_file = outside.path().join("denied");
        let code = run_in_child(|| {
            match restrict_self(&rules, true) {
                Ok(LandlockOutcome::FullyEnforced { .. } | LandlockOutcome::PartiallyEnforced { .. }) => {}
                Ok(LandlockOutcome::NotSupported) => return 1,
                Err(e) => {
                    eprintln!("{e}");
                    return 2;
                }
            }
            if std::fs::write(&inside_file, b"ok").is_err() {
                return 3;
            }
            match std::fs::write(&outside_file, b"no") {
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => {}
                Err(_) => return 4,
                Ok(()) => return 5,
            }
            // Reading system paths and executing programs still works.
            if std::fs::read_dir("/etc").is_err() {
                return 6;
            }
            match std::process::Command::new("/bin/true").status() {
                Ok(s) if s.success() => 0,
                _ => 7,
            }
        });
        assert_eq!(code, 0);
        assert!(inside_file.exists());
        assert!(!outside_file.exists());
    }

    #[test]
    fn read_exec_paths_are_read_only() {
        if !landlock_available("read_exec_paths_are_read_only") {
            return;
        }
        let ro = tempfile::tempdir().unwrap();
        let existing = ro.path().join("existing");
        std::fs::write(&existing, b"data").unwrap();
        let rules = LandlockRules { read_exec: vec![ro.path().to_owned()], read_write: vec![] };
        let code = run_in_child(|| {
            if restrict_self(&rules, true).is_err() {
                return 1;
            }
            if std::fs::read(&existing).ok().as_deref() != Some(b"data".as_slice()) {
                return 2;
            }
            let denied = |r: io::Result<()>| matches!(r, Err(e) if e.raw_os_error() == Some(libc::EACCES));
            if !denied(std::fs::write(&existing, b"changed")) {
                return 3;
            }
            if !denied(std::fs::remove_file(&existing)) {
                return 4;
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn signals_to_processes_outside_the_domain_are_scoped() {
        if !landlock_available("signals_to_processes_outside_the_domain_are_scoped") {
            return;
        }
        if abi_version().unwrap_or(0) < 6 {
            eprintln!("skipping: signal scoping needs Landlock ABI 6");
            return;
        }
        let code = run_in_child(|| {
            // SAFETY: getppid has no preconditions.
            let parent = unsafe { libc::getppid() };
            // SAFETY: signal 0 only checks permission; nothing is delivered.
            if unsafe { libc::kill(parent, 0) } != 0 {
                return 1;
            }
            let rules = LandlockRules { read_exec: system_read_exec(), read_write: vec![] };
            if restrict_self(&rules, true).is_err() {
                return 2;
            }
            // SAFETY: as above.
            let rc = unsafe { libc::kill(parent, 0) };
            let errno = io::Error::last_os_error().raw_os_error();
            if rc == -1 && errno == Some(libc::EPERM) { 0 } else { 3 }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn abi_version_matches_support() {
        // Either no Landlock, or a positive version the crate can map.
        if let Some(v) = abi_version() {
            assert!(v >= 1);
        }
    }
}
