//! Where the processes the agent starts go, when that is not the agent's
//! own cgroup: in a microVM guest, the workload's cgroup that the guest's
//! PID 1 made with the policy's limits (`airlock_vm::limits`), so that a
//! fork bomb or an OOM there never reaches the agent. The process tier's
//! agent shares its sandbox's cgroup with what it starts and has none.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

/// The workload cgroup's `cgroup.procs`, opened by the guest's PID 1.
static PROCS: OnceLock<OwnedFd> = OnceLock::new();

/// Sends every process started from now on into the cgroup whose
/// `cgroup.procs` this is. Once; a second call is ignored.
pub fn set(procs: OwnedFd) {
    let _ = PROCS.set(procs);
}

/// The descriptor a new process writes "0" to, to move itself there.
pub(crate) fn procs() -> Option<BorrowedFd<'static>> {
    PROCS.get().map(AsFd::as_fd)
}
