//! Per-process resource limits for the sandboxed command.
//!
//! cgroups cap the sandbox as a whole (memory, pids, CPU); rlimits add the
//! per-process limits cgroups do not have: open files, file size, core dumps
//! (which could write the command's memory, secrets included, to disk) and
//! locked memory. `nproc` counts processes per real uid, which inside the user
//! namespace is the sandbox's mapped uid, so it complements the cgroup pids
//! limit.
//!
//! Both the soft and the hard limit are set, so the command cannot raise its
//! soft limit back. A limit is never raised above the current hard limit: that
//! needs CAP_SYS_RESOURCE, and asking for more than the host granted is a
//! configuration mistake better clamped than failed on.

use std::io;

use crate::sys;

/// Limits to apply; `None` leaves a resource as inherited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rlimits {
    /// RLIMIT_NOFILE: open file descriptors.
    pub nofile: Option<u64>,
    /// RLIMIT_NPROC: processes of the sandbox's uid.
    pub nproc: Option<u64>,
    /// RLIMIT_CORE: core dump size in bytes (0 disables core dumps).
    pub core: Option<u64>,
    /// RLIMIT_FSIZE: largest file the command may write, in bytes.
    pub fsize: Option<u64>,
    /// RLIMIT_MEMLOCK: locked memory in bytes.
    pub memlock: Option<u64>,
}

/// Why a limit could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum RlimitError {
    /// Reading the current limit failed.
    #[error("getrlimit({resource}) failed: {source}")]
    Get {
        /// The resource, e.g. `RLIMIT_NOFILE`.
        resource: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting the limit failed.
    #[error("setrlimit({resource}, {value}) failed: {source}")]
    Set {
        /// The resource, e.g. `RLIMIT_NOFILE`.
        resource: &'static str,
        /// The value asked for (after clamping).
        value: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A resource as libc names it, with its human name for errors and logs.
type Resource = (sys::RlimitResource, &'static str);

fn get(resource: Resource) -> Result<libc::rlimit, RlimitError> {
    sys::get_rlimit(resource.0).map_err(|source| RlimitError::Get { resource: resource.1, source })
}

fn set(resource: Resource, lim: libc::rlimit) -> Result<(), RlimitError> {
    sys::set_rlimit(resource.0, lim).map_err(|source| RlimitError::Set {
        resource: resource.1,
        value: lim.rlim_max,
        source,
    })
}

/// Sets soft and hard limit of `resource` to `wanted`, clamped to the current
/// hard limit.
fn apply_one(resource: Resource, wanted: u64) -> Result<(), RlimitError> {
    let current = get(resource)?;
    let value = if wanted > current.rlim_max {
        tracing::debug!(
            resource = resource.1,
            wanted,
            hard = current.rlim_max,
            "rlimit above the inherited hard limit; clamping to the hard limit"
        );
        current.rlim_max
    } else {
        wanted
    };
    set(resource, libc::rlimit { rlim_cur: value, rlim_max: value })
}

/// Applies every limit that is set in `r` to the calling process.
pub fn apply(r: &Rlimits) -> Result<(), RlimitError> {
    let limits: [(Resource, Option<u64>); 5] = [
        ((libc::RLIMIT_NOFILE, "RLIMIT_NOFILE"), r.nofile),
        ((libc::RLIMIT_NPROC, "RLIMIT_NPROC"), r.nproc),
        ((libc::RLIMIT_CORE, "RLIMIT_CORE"), r.core),
        ((libc::RLIMIT_FSIZE, "RLIMIT_FSIZE"), r.fsize),
        ((libc::RLIMIT_MEMLOCK, "RLIMIT_MEMLOCK"), r.memlock),
    ];
    for (resource, wanted) in limits {
        if let Some(wanted) = wanted {
            apply_one(resource, wanted)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::privileges::test_fork::run_in_child;

    #[test]
    fn sets_soft_and_hard_and_leaves_unset_limits_alone() {
        let fsize_before = get((libc::RLIMIT_FSIZE, "RLIMIT_FSIZE")).unwrap();
        let code = run_in_child(|| {
            let r = Rlimits { nofile: Some(64), core: Some(0), ..Rlimits::default() };
            if apply(&r).is_err() {
                return 1;
            }
            let nofile = get((libc::RLIMIT_NOFILE, "")).unwrap();
            let core = get((libc::RLIMIT_CORE, "")).unwrap();
            let fsize = get((libc::RLIMIT_FSIZE, "")).unwrap();
            if (nofile.rlim_cur, nofile.rlim_max) != (64, 64) {
                return 2;
            }
            if (core.rlim_cur, core.rlim_max) != (0, 0) {
                return 3;
            }
            if (fsize.rlim_cur, fsize.rlim_max) != (fsize_before.rlim_cur, fsize_before.rlim_max) {
                return 4;
            }
            // The hard limit holds: the soft limit cannot be raised past it.
            let raised = libc::rlimit { rlim_cur: 65, rlim_max: 65 };
            let raised = set((libc::RLIMIT_NOFILE, "RLIMIT_NOFILE"), raised);
            if raised.is_err() || have_sys_resource() { 0 } else { 5 }
        });
        assert_eq!(code, 0);
    }

    /// CAP_SYS_RESOURCE (24) in the effective set lets root raise hard limits.
    fn have_sys_resource() -> bool {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << 24) != 0)
    }

    #[test]
    fn clamps_to_the_current_hard_limit() {
        let code = run_in_child(|| {
            let lowered = libc::rlimit { rlim_cur: 100, rlim_max: 100 };
            if set((libc::RLIMIT_NOFILE, "RLIMIT_NOFILE"), lowered).is_err() {
                return 1;
            }
            let r = Rlimits { nofile: Some(1_000_000), ..Rlimits::default() };
            if apply(&r).is_err() {
                return 2;
            }
            let nofile = get((libc::RLIMIT_NOFILE, "")).unwrap();
            if (nofile.rlim_cur, nofile.rlim_max) == (100, 100) { 0 } else { 3 }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn fsize_limit_stops_large_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let code = run_in_child(|| {
            // SIGXFSZ would kill the child; ignore it so write returns EFBIG.
            crate::sys::set_signal_ignored(libc::SIGXFSZ).unwrap();
            let r = Rlimits { fsize: Some(4096), ..Rlimits::default() };
            if apply(&r).is_err() {
                return 1;
            }
            match std::fs::write(&path, vec![0u8; 8192]) {
                Err(e) if e.raw_os_error() == Some(libc::EFBIG) => 0,
                Err(_) => 2,
                Ok(()) => 3,
            }
        });
        assert_eq!(code, 0);
    }
}
