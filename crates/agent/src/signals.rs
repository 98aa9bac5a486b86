//! PID 1's signal handling: forward what the supervisor sends to the
//! command's process group, reap every child, notice the command's end.
//!
//! The kernel drops signals to a namespace's init unless it has a handler, so
//! each forwarded signal gets a no-op handler and is then blocked and read
//! synchronously with sigwaitinfo: no work happens in signal context.

use std::io;

use airlock_jail::sys::{self, SignalSet};

const FORWARDED: &[libc::c_int] =
    &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGWINCH];

pub struct Waiter {
    set: SignalSet,
}

pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    fn from_wait_status(status: libc::c_int) -> ExitStatus {
        if libc::WIFEXITED(status) {
            ExitStatus { code: Some(libc::WEXITSTATUS(status)), signal: None }
        } else {
            ExitStatus { code: None, signal: Some(libc::WTERMSIG(status)) }
        }
    }
}

impl Waiter {
    pub fn install() -> io::Result<Waiter> {
        let mut waited: Vec<libc::c_int> = FORWARDED.to_vec();
        waited.push(libc::SIGCHLD);
        for &sig in &waited {
            sys::install_noop_handler(sig)?;
        }
        let set = SignalSet::of(&waited);
        // Children unblock everything before exec (`unblock_all`), since a
        // mask survives exec.
        sys::block_signals(&set)?;
        Ok(Waiter { set })
    }

    /// Waits for the command `pid` to end, forwarding signals meanwhile.
    pub fn run_until_exit(&self, pid: i32) -> ExitStatus {
        loop {
            if let Some(status) = reap_all(pid) {
                return status;
            }
            match sys::wait_signal(&self.set) {
                Ok(sig) if sig != libc::SIGCHLD => signal_group(pid, sig),
                _ => continue,
            }
        }
    }
}

/// Sends `sig` to the process group led by `pid` (a command started in its
/// own session), or to the process alone if it has left its group.
pub(crate) fn signal_group(pid: i32, sig: libc::c_int) {
    if sys::send_signal(-pid, sig).is_err() {
        let _ = sys::send_signal(pid, sig);
    }
}

/// Reaps every exited child without blocking; returns the command's status
/// once it is among them.
fn reap_all(command: i32) -> Option<ExitStatus> {
    let mut found = None;
    while let Some((pid, status)) = sys::try_reap_any() {
        if pid == command {
            found = Some(ExitStatus::from_wait_status(status));
        }
    }
    found
}

/// A signal the agent received, and whether it came from inside the sandbox.
pub struct Received {
    pub signal: i32,
    /// Sent by a process of the sandbox's own PID namespace. The kernel
    /// reports a sender outside the namespace (the host) as pid 0.
    pub from_inside: bool,
}

impl Waiter {
    /// Waits up to `timeout` for a forwarded signal or SIGCHLD.
    pub fn next_signal(&self, timeout: std::time::Duration) -> Option<Received> {
        let (signal, sender) = sys::wait_signal_timeout(&self.set, timeout)?;
        Some(Received { signal, from_inside: sender > 0 })
    }
}

/// Reaps every exited child without blocking.
pub fn reap_any() -> Vec<(i32, ExitStatus)> {
    let mut out = Vec::new();
    while let Some((pid, status)) = sys::try_reap_any() {
        out.push((pid, ExitStatus::from_wait_status(status)));
    }
    out
}

/// Unblocks every signal. For the child between fork and exec: the agent
/// blocks the signals it reads with sigwaitinfo, and a blocked mask survives
/// exec, so without this a command could never be interrupted.
/// Async-signal-safe: a single sigprocmask call.
pub fn unblock_all() -> io::Result<()> {
    sys::unblock_all_signals()
}
