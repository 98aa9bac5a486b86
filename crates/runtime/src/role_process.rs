//! Starting one of airlock's own host-side roles (`__egress`,
//! `__exectrace`) as a child process: airlock's executable, an empty
//! environment (but the log filter), stdout closed, and the descriptors it
//! reads placed at the fixed numbers its role expects, every other one
//! closed. Which executable: [`helper_exe`].

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The binary installed beside `airlock` that serves the roles a sandbox's
/// launch starts and waits for (the agent, the exec trace's listener). It
/// links only their code: the dynamic loader relocates about a tenth of
/// what it does for `airlock` (whose CLI, daemon, image and egress code
/// they never run), and each start costs about a third of the CPU time,
/// on every sandbox's launch.
pub const HELPER_BINARY: &str = "airlock-helper";

/// The executable for those processes: `airlock-helper` beside
/// the running `airlock`, or `airlock` itself (which serves every role
/// too) where the helper was not installed.
pub fn helper_exe() -> Result<PathBuf, crate::RunError> {
    let own = std::env::current_exe().map_err(crate::RunError::SelfExe)?;
    let helper = own.with_file_name(HELPER_BINARY);
    if helper.is_file() {
        Ok(helper)
    } else {
        tracing::debug!(missing = %helper.display(), "no helper binary; airlock serves the sandbox's roles itself");
        Ok(own)
    }
}

/// A started role: its process, and a pidfd to signal it by (so a reaped
/// pid is never signalled).
pub(crate) struct Started {
    pub child: Child,
    pub pid: i32,
    pub pidfd: Option<OwnedFd>,
}

/// Runs `EXE ROLE NAME` (airlock's own executable) with each descriptor of
/// `fds` at its number.
pub(crate) fn spawn(
    exe: &Path,
    role: &str,
    name: &str,
    fds: &[(BorrowedFd<'_>, i32)],
) -> io::Result<Started> {
    // Copies above the target numbers, so placing them cannot clobber one
    // another in the child.
    let mut sources = Vec::with_capacity(fds.len());
    for (fd, to) in fds {
        sources.push((airlock_jail::sys::dup_above(*fd, 10)?, *to));
    }
    let raw: Vec<(i32, i32)> = sources.iter().map(|(fd, to)| (fd.as_raw_fd(), *to)).collect();
    let first_unused = fds.iter().map(|(_, to)| *to).max().map_or(3, |last| last + 1);
    let mut cmd = Command::new(exe);
    cmd.arg(role).arg(name).env_clear().stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
    if let Some(level) = std::env::var_os("AIRLOCK_LOG") {
        cmd.env("AIRLOCK_LOG", level);
    }
    // SAFETY: between fork and exec this only calls raw dup3 and
    // close_range, async-signal-safe system calls on integers prepared
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for (from, to) in &raw {
                airlock_jail::sys::raw_dup_to(*from, *to)?;
            }
            airlock_jail::sys::raw_close_from(first_unused);
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(sources);
    let pid = child.id() as i32;
    let pidfd = rustix::process::Pid::from_raw(pid)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    Ok(Started { child, pid, pidfd })
}
