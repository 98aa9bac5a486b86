//! Starting the sandbox: the host side of the jail.
//!
//! The supervisor clones a child into new user, mount, PID, network, IPC and
//! UTS namespaces. The child waits until the supervisor has written its id
//! maps (and placed it in its cgroup), becomes root of its user namespace,
//! and execs airlock's agent, which becomes PID 1 of the sandbox and builds
//! the rest from the plan it reads over the control channel. Exec happens
//! only after the id maps exist: a process that execs while unmapped loses
//! every capability, and the agent needs them to build the root.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::sys;

/// Descriptor numbers the agent finds its inputs at.
pub const AGENT_CONTROL_FD: i32 = 3;
pub const AGENT_WORKSPACE_FD: i32 = 4;
/// The agent's end of the egress channel (accepted proxy connections go
/// out over it as descriptors).
pub const AGENT_EGRESS_FD: i32 = 5;

/// How ids inside the sandbox map to host ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMap {
    pub uid_map: String,
    pub gid_map: String,
    /// Rootless: an unprivileged process may map only its own ids and must
    /// deny setgroups first.
    pub deny_setgroups: bool,
    /// The host uid that root inside the sandbox is.
    pub host_root_uid: u32,
}

impl IdMap {
    /// As root: root inside is `base` on the host, with 65536 ids after it,
    /// so nothing inside is ever host root. Otherwise: root inside is the
    /// calling user, who stays unprivileged on the host.
    pub fn for_current_user(base: u32) -> IdMap {
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        if uid == 0 {
            IdMap {
                uid_map: format!("0 {base} 65536\n"),
                gid_map: format!("0 {base} 65536\n"),
                deny_setgroups: false,
                host_root_uid: base,
            }
        } else {
            IdMap {
                uid_map: format!("0 {uid} 1\n"),
                gid_map: format!("0 {gid} 1\n"),
                deny_setgroups: true,
                host_root_uid: uid,
            }
        }
    }

    fn write_for(&self, pid: i32) -> io::Result<()> {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        if self.deny_setgroups {
            fs::write(proc.join("setgroups"), "deny")?;
        }
        fs::write(proc.join("uid_map"), &self.uid_map)?;
        fs::write(proc.join("gid_map"), &self.gid_map)?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot create the sandbox's namespaces: {0}")]
    Clone(#[source] io::Error),
    #[error("cannot write the sandbox's user id map: {0}")]
    IdMap(#[source] io::Error),
    #[error("cannot set up the control channel: {0}")]
    Channel(#[source] io::Error),
    #[error("cannot prepare the sandbox: {0}")]
    Prepare(String),
    #[error("argument {0} contains a NUL byte")]
    BadPath(PathBuf),
    #[error("cannot open airlock's own binary {0} to start the agent: {1}")]
    AgentBinary(PathBuf, #[source] io::Error),
    #[error("cannot create an id-mapped view of the workspace {path}: {source}")]
    IdMappedMount { path: PathBuf, source: io::Error },
}

/// What the supervisor needs to start an agent.
pub struct SpawnRequest<'a> {
    /// The airlock binary (re-executed in its agent role).
    pub agent_exe: &'a Path,
    pub agent_args: &'a [&'a str],
    /// stdin, stdout and stderr of the sandbox.
    pub stdio: [BorrowedFd<'a>; 3],
    /// An id-mapped workspace tree handed to the agent at [`AGENT_WORKSPACE_FD`].
    pub workspace_tree: Option<BorrowedFd<'a>>,
    /// The agent's end of the egress channel, handed over at [`AGENT_EGRESS_FD`].
    pub egress_channel: Option<BorrowedFd<'a>>,
    pub id_map: &'a IdMap,
    /// The sandbox's cgroup when it lives in the v2 hierarchy alone (an
    /// open descriptor of its directory): the agent is started in it.
    pub cgroup: Option<BorrowedFd<'a>>,
}

/// A started agent: its host pid and the host end of its control channel.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub control: UnixStream,
    /// Started in [`SpawnRequest::cgroup`]; false when none was given or
    /// the kernel could not (then the caller moves it).
    pub in_cgroup: bool,
}

const NAMESPACES: i32 = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// Clones the agent into fresh namespaces. `prepare` runs after the id maps
/// are written and before the agent may exec: the supervisor places it in
/// its cgroup there.
pub fn spawn(
    req: &SpawnRequest<'_>,
    prepare: impl FnOnce(i32) -> Result<(), String>,
) -> Result<Spawned, SpawnError> {
    // Opened here, as the supervisor: the sandbox's unprivileged root may not
    // be allowed to walk the directories the binary lives in.
    let exe =
        fs::File::open(req.agent_exe).map_err(|e| SpawnError::AgentBinary(req.agent_exe.to_path_buf(), e))?;
    let exe_fd = exe.as_raw_fd();
    let args: Vec<CString> = req
        .agent_args
        .iter()
        .map(|a| CString::new(*a).map_err(|_| SpawnError::BadPath(PathBuf::from(a))))
        .collect::<Result<_, _>>()?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // The agent starts with an empty environment: it learns everything from
    // the plan, and nothing of the host's environment reaches the sandbox by
    // accident.
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];

    let (host_end, agent_end) = UnixStream::pair().map_err(SpawnError::Channel)?;
    let (sync_read, sync_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| SpawnError::Channel(e.into()))?;

    // Copies above every target number, so that placing them at 0..=4 in the
    // child cannot clobber one another.
    let high = 10;
    let mut sources: Vec<(OwnedFd, i32)> = Vec::new();
    for (i, fd) in req.stdio.iter().enumerate() {
        sources.push((sys::dup_above(*fd, high).map_err(SpawnError::Channel)?, i as i32));
    }
    sources.push((sys::dup_above(agent_end.as_fd(), high).map_err(SpawnError::Channel)?, AGENT_CONTROL_FD));
    if let Some(tree) = req.workspace_tree {
        sources.push((sys::dup_above(tree, high).map_err(SpawnError::Channel)?, AGENT_WORKSPACE_FD));
    }
    if let Some(channel) = req.egress_channel {
        sources.push((sys::dup_above(channel, high).map_err(SpawnError::Channel)?, AGENT_EGRESS_FD));
    }
    let placements: Vec<(i32, i32)> = sources.iter().map(|(fd, to)| (fd.as_raw_fd(), *to)).collect();
    let sync_fd = sync_read.as_raw_fd();
    let sync_write_fd = sync_write.as_raw_fd();
    let drop_groups = !req.id_map.deny_setgroups;
    let first_unused = placements.iter().map(|(_, to)| to + 1).max().unwrap_or(3);

    // SAFETY: the child branch below only calls the async-signal-safe raw_*
    // helpers and ends in execve or _exit.
    let (cloned, in_cgroup) = unsafe { clone_agent(req.cgroup) }.map_err(SpawnError::Clone)?;
    let pid = match cloned {
        Some(pid) => pid,
        None => {
            // Child. Exit codes here are only seen if the agent never starts.
            // Without our copy of the write end, a dead parent means EOF.
            sys::raw_close(sync_write_fd);
            if sys::raw_set_pdeathsig(libc::SIGKILL).is_err() || !sys::raw_read_byte(sync_fd) {
                sys::raw_exit(125);
            }
            if sys::raw_become_namespace_root(drop_groups).is_err() {
                let _ =
                    sys::raw_write_all(2, b"airlock: cannot become root of the sandbox's user namespace\n");
                sys::raw_exit(125);
            }
            for (from, to) in &placements {
                if sys::raw_dup_to(*from, *to).is_err() {
                    sys::raw_exit(125);
                }
            }
            // The binary stays open (close-on-exec) just past the agent's
            // descriptors; execveat needs it and exec then closes it.
            if sys::raw_dup3(exe_fd, first_unused, libc::O_CLOEXEC).is_err() {
                sys::raw_exit(125);
            }
            sys::raw_close_from(first_unused + 1);
            let _ = sys::raw_execveat(first_unused, &argv, &envp);
            let _ = sys::raw_write_all(2, b"airlock: cannot execute the sandbox agent\n");
            sys::raw_exit(125);
        }
    };
    drop(sync_read);
    drop(exe);
    drop(sources);
    drop(agent_end);

    let abort = |err: SpawnError| {
        // Closing the sync pipe without a byte makes the child exit.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap_or(rustix::process::Pid::INIT),
            rustix::process::Signal::KILL,
        );
        let _ = sys::wait_pid(pid);
        err
    };
    if let Err(e) = req.id_map.write_for(pid) {
        return Err(abort(SpawnError::IdMap(e)));
    }
    if let Err(e) = prepare(pid) {
        return Err(abort(SpawnError::Prepare(e)));
    }
    if let Err(e) = rustix::io::write(&sync_write, &[1]) {
        return Err(abort(SpawnError::Channel(e.into())));
    }
    Ok(Spawned { pid, control: host_end, in_cgroup })
}

/// Clones the agent's process into its namespaces and, given a cgroup v2
/// directory, into that cgroup; where the kernel cannot (before 5.7, or
/// not allowed), as before, into the caller's cgroup. Returns what the
/// clone returned (None in the child) and whether the child starts in the
/// cgroup.
///
/// # Safety
/// As for [`sys::clone_into_namespaces`]: the caller's child branch uses
/// only async-signal-safe operations until execve or _exit.
unsafe fn clone_agent(cgroup: Option<BorrowedFd<'_>>) -> io::Result<(Option<i32>, bool)> {
    if let Some(cgroup) = cgroup {
        // SAFETY: passed on to the caller, as documented above.
        match unsafe { sys::clone_into_namespaces_and_cgroup(NAMESPACES, cgroup) } {
            Ok(cloned) => return Ok((cloned, true)),
            // No child exists: only the caller's process is here.
            Err(e) => tracing::debug!(error = %e, "cannot start the agent in its cgroup; it is moved there"),
        }
    }
    // SAFETY: passed on to the caller, as documented above.
    Ok((unsafe { sys::clone_into_namespaces(NAMESPACES) }?, false))
}

/// An id-mapped, detached copy of `path`'s mount (root only): on it, host
/// ids appear shifted by `id_map` the same way the sandbox's own ids are, so
/// a workspace owned by host root is owned by root inside the sandbox, while
/// the sandbox's root stays an unprivileged id on the host.
///
/// `owner`: when the sandbox is made for another user (by the daemon), the
/// uid that must own the workspace; checked on the very directory mounted.
pub fn idmapped_tree(path: &Path, id_map: &IdMap, owner: Option<u32>) -> Result<OwnedFd, SpawnError> {
    let fail = |source: io::Error| SpawnError::IdMappedMount { path: path.to_path_buf(), source };
    // A throwaway process whose only job is to own a user namespace with the
    // sandbox's id map; the kernel takes the map from its namespace file.
    let (hold_read, hold_write) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| fail(e.into()))?;
    let hold_fd = hold_read.as_raw_fd();
    let hold_write_fd = hold_write.as_raw_fd();
    // SAFETY: the child only blocks on a raw read and exits.
    let pid = match unsafe { sys::clone_into_namespaces(libc::CLONE_NEWUSER) }.map_err(fail)? {
        Some(pid) => pid,
        None => {
            let _ = sys::raw_set_pdeathsig(libc::SIGKILL);
            sys::raw_close(hold_write_fd);
            sys::raw_read_byte(hold_fd);
            sys::raw_exit(0);
        }
    };
    drop(hold_read);
    let result = (|| {
        id_map.write_for(pid)?;
        let userns = fs::File::open(format!("/proc/{pid}/ns/user"))?;
        let tree = sys::clone_tree_checked(path, owner)?;
        sys::idmap_tree(tree.as_fd(), userns.as_fd())?;
        Ok::<_, io::Error>(tree)
    })();
    drop(hold_write);
    let _ = sys::wait_pid(pid);
    result.map_err(fail)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn root_or_skip() -> bool {
        if rustix::process::geteuid().is_root() {
            return true;
        }
        assert!(std::env::var("CI").is_err(), "needs root (open_tree)");
        eprintln!("SKIPPED: needs root (open_tree)");
        false
    }

    #[test]
    fn a_checked_tree_refuses_symlinks_and_other_owners() {
        if !root_or_skip() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();

        assert!(sys::clone_tree_checked(&real, Some(0)).is_ok());
        assert!(sys::clone_tree_checked(&real, None).is_ok());
        // A workspace swapped for a symlink is not followed.
        assert!(sys::clone_tree_checked(&link, None).is_err());
        // Nor one owned by someone other than the requester.
        std::os::unix::fs::chown(&real, Some(4242), Some(4242)).unwrap();
        let err = sys::clone_tree_checked(&real, Some(1000)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        assert!(sys::clone_tree_checked(&real, Some(4242)).is_ok());
    }
}
