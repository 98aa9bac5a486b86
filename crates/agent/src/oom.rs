//! Keeping the OOM killer off the agent.
//!
//! The agent is PID 1 of the sandbox: if the kernel's OOM killer picks it
//! when the sandbox reaches its memory limit, every process inside dies with
//! it, and a long-lived sandbox is lost to one greedy exec. It can be the
//! biggest process there: memory that fills the sandbox's tmpfs counts
//! against the limit but belongs to no process.
//!
//! So everything the agent starts gets a higher `oom_score_adj` than the
//! agent's own: the OOM killer takes a sandboxed process first, the agent
//! only when nothing else is left (and, on a host short of memory, the
//! sandbox's processes before host processes of the same size). A process
//! inherits its score at fork, and raising a score needs no privilege, so
//! the agent raises its own around each fork, through a handle opened
//! before Landlock, and lowers it again after, which it may: never below the
//! floor it was started with. The processes it starts cannot lower theirs:
//! Landlock leaves /proc read-only to them, and the sandbox's /proc is
//! mounted read-only as well.

use std::fs::File;
use std::io;
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};

/// The score of every process the agent starts (of -1000..=1000; 0 is the
/// kernel's default). Enough to put any of them ahead of the agent, short of
/// "always first" (1000) on the host as a whole.
pub const WORKLOAD_SCORE: i32 = 500;

/// The agent's own `oom_score_adj`, when it could be opened. The lock also
/// keeps two forks from overlapping one raise.
static OWN_SCORE: OnceLock<Mutex<Option<File>>> = OnceLock::new();

/// Opens the agent's `oom_score_adj` for later writes. Call before Landlock
/// confines the agent: it checks writes when a file is opened.
pub fn keep_handle() {
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/proc/self/oom_score_adj").ok();
    let _ = OWN_SCORE.set(Mutex::new(file));
}

fn read_score(file: &File) -> io::Result<i32> {
    let mut buf = [0u8; 16];
    let n = rustix::io::pread(file, &mut buf, 0)?;
    std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| io::Error::other("unreadable oom_score_adj"))
}

fn write_score(file: &File, score: i32) -> io::Result<()> {
    rustix::io::pwrite(file, score.to_string().as_bytes(), 0)?;
    Ok(())
}

/// Spawns `cmd` with [`WORKLOAD_SCORE`] (or the agent's own, if higher).
/// Where the score cannot be set the process starts with the agent's, as
/// it would without this.
pub fn spawn_ahead_of_agent(cmd: &mut Command) -> io::Result<Child> {
    let Some(lock) = OWN_SCORE.get() else { return cmd.spawn() };
    let guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let Some(file) = guard.as_ref() else { return cmd.spawn() };
    let Ok(own) = read_score(file) else { return cmd.spawn() };
    if own >= WORKLOAD_SCORE || write_score(file, WORKLOAD_SCORE).is_err() {
        return cmd.spawn();
    }
    let spawned = cmd.spawn();
    // Back to the agent's own score, which is never below its floor. Should
    // that fail, the agent merely ranks with what it starts.
    let _ = write_score(file, own);
    spawned
}
