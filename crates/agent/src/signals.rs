//! PID 1's signal handling: forward what the supervisor sends to the
//! command's process group, reap every child, notice the command's end.
//!
//! The kernel drops signals to a namespace's init unless it has a handler, so
//! each forwarded signal gets a no-op handler and is then blocked and read
//! synchronously with sigwaitinfo: no work happens in signal context.

use std::io;

const FORWARDED: &[libc::c_int] =
    &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGWINCH];

pub struct Waiter {
    set: libc::sigset_t,
}

pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

extern "C" fn ignore(_: libc::c_int) {}

impl Waiter {
    pub fn install() -> io::Result<Waiter> {
        // SAFETY: sigset_t is plain data; sigemptyset initializes it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: set is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        for &sig in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
            // SAFETY: set is a valid, initialized sigset_t.
            unsafe { libc::sigaddset(&mut set, sig) };
            install_noop_handler(sig)?;
        }
        // SAFETY: set is initialized; the old mask is not needed. Children
        // unblock everything before exec (`unblock_all`), since a mask
        // survives exec.
        let ret = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waiter { set })
    }

    /// Waits for the command `pid` to end, forwarding signals meanwhile.
    pub fn run_until_exit(&self, pid: i32) -> ExitStatus {
        loop {
            if let Some(status) = reap_all(pid) {
                return status;
            }
            // SAFETY: siginfo_t is plain data written by the kernel.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: the set and the out-pointer are valid.
            let sig = unsafe { libc::sigwaitinfo(&self.set, &mut info) };
            if sig < 0 || sig == libc::SIGCHLD {
                continue;
            }
            signal_group(pid, sig);
        }
    }
}

/// Sends `sig` to the process group led by `pid` (a command started in its
/// own session), or to the process alone if it has left its group.
pub(crate) fn signal_group(pid: i32, sig: libc::c_int) {
    // SAFETY: kill takes plain integers; it has no memory-safety requirements.
    if unsafe { libc::kill(-pid, sig) } != 0 {
        // SAFETY: as above.
        unsafe { libc::kill(pid, sig) };
    }
}

fn install_noop_handler(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: sigaction is plain data; zeroed is a valid empty action.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = ignore as *const () as usize;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: action is initialized; the handler does nothing and is
    // async-signal-safe.
    let ret = unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) };
    if ret != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Reaps every exited child without blocking; returns the command's status
/// once it is among them.
fn reap_all(command: i32) -> Option<ExitStatus> {
    let mut found = None;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: status is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return found;
        }
        if pid == command {
            found = Some(if libc::WIFEXITED(status) {
                ExitStatus { code: Some(libc::WEXITSTATUS(status)), signal: None }
            } else {
                ExitStatus { code: None, signal: Some(libc::WTERMSIG(status)) }
            });
        }
    }
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
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
        };
        // SAFETY: siginfo_t is plain data written by the kernel.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: the set, the out-pointer and the timeout are valid.
        let sig = unsafe { libc::sigtimedwait(&self.set, &mut info, &ts) };
        if sig <= 0 {
            return None;
        }
        // SAFETY: the kernel filled `info` for the signal just taken; si_pid
        // is valid to read for every signal (0 where it carries no sender).
        let sender = unsafe { info.si_pid() };
        Some(Received { signal: sig, from_inside: sender > 0 })
    }
}

/// Reaps every exited child without blocking.
pub fn reap_any() -> Vec<(i32, ExitStatus)> {
    let mut out = Vec::new();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: status is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return out;
        }
        let st = if libc::WIFEXITED(status) {
            ExitStatus { code: Some(libc::WEXITSTATUS(status)), signal: None }
        } else {
            ExitStatus { code: None, signal: Some(libc::WTERMSIG(status)) }
        };
        out.push((pid, st));
    }
}

/// Unblocks every signal. For the child between fork and exec: the agent
/// blocks the signals it reads with sigwaitinfo, and a blocked mask survives
/// exec, so without this a command could never be interrupted.
/// Async-signal-safe: a single sigprocmask call.
pub fn unblock_all() -> io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: empty is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut empty) };
    // SAFETY: the set is initialized; the old mask is not needed.
    if unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
