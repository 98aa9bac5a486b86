//! Confining one of airlock's own host-side processes that reads hostile
//! bytes (the egress proxy): it confines itself, once, before it reads any.
//!
//! The order is part of the design:
//! 1. Load what must be loaded while the host's files are still visible
//!    (glibc's name-service modules).
//! 2. Enter a mount namespace of its own (and an IPC namespace, so no host
//!    System V object is reachable). Rootless, a user namespace first, in
//!    which the calling user is root: that is what lets it mount.
//! 3. Empty the capability bounding set while CAP_SETPCAP is still held,
//!    keeping in the effective set only what steps 4 and 5 need.
//! 4. Build a root that holds nothing but the files it reads, and pivot into
//!    it; the old root is detached.
//! 5. As root: become the process's own unprivileged uid and gid with no
//!    supplementary groups, which empties the remaining sets. Rootless: empty
//!    them directly. Then check, asking the kernel (no /proc is left), that
//!    all five sets are empty.
//! 6. Non-dumpable, no_new_privs and the parent-death signal — after the
//!    id change, which would reset the dumpable flag and the death signal —
//!    then check that the parent is still there.
//! 7. The seccomp allowlist, last: nothing above would pass it.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use crate::mounts::{self, MountError};
use crate::privileges::{self, CAP_SETGID, CAP_SETUID, CAP_SYS_ADMIN, PrivError};
use crate::seccomp::{self, SeccompError};
use crate::sys;

/// How a host-side process confines itself.
pub struct ServiceJail<'a> {
    /// Host files it keeps reading, bound read-only at their own paths in
    /// an otherwise empty root (missing ones are left out).
    pub files: &'a [PathBuf],
    /// Shared libraries to load while the host's files are still visible.
    pub libraries: &'a [CString],
    /// An existing directory the new root's tmpfs is mounted over (covered
    /// only in the process's own mount namespace).
    pub mountpoint: &'a Path,
    /// As root: the uid and gid to become. None (rootless): stay the
    /// calling user, inside a user namespace of the process's own.
    pub ids: Option<(u32, u32)>,
    /// The process it must not outlive (its supervisor, which started it).
    pub parent: rustix::process::Pid,
    pub filter: &'a seccompiler::BpfProgram,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceJailError {
    #[error("a process confines itself while it has one thread, and this one has {0}")]
    Threads(usize),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("building its mount view: {0}")]
    Mount(#[from] MountError),
    #[error(transparent)]
    Privileges(#[from] PrivError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("capabilities are still held after dropping them (or not the one it keeps)")]
    CapabilitiesLeft,
    #[error("its supervisor (pid {0}) is gone")]
    ParentGone(i32),
}

fn os(what: &'static str) -> impl FnOnce(io::Error) -> ServiceJailError {
    move |source| ServiceJailError::Os { what, source }
}

/// The number of threads of the calling process.
fn thread_count() -> Result<usize, ServiceJailError> {
    let tasks = std::fs::read_dir("/proc/self/task").map_err(os("listing /proc/self/task"))?;
    Ok(tasks.count())
}

/// Confines the calling process for good; see the module's steps. Must run
/// while the process has a single thread: ids and capabilities change per
/// thread.
pub fn confine(jail: &ServiceJail<'_>) -> Result<(), ServiceJailError> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(ServiceJailError::Threads(threads));
    }
    for library in jail.libraries {
        if !sys::load_library_for_good(library) {
            tracing::debug!(?library, "not loaded (glibc would not find it either)");
        }
    }

    let namespaces = libc::CLONE_NEWNS | libc::CLONE_NEWIPC;
    if jail.ids.is_some() {
        sys::raw_unshare(namespaces).map_err(os("entering a mount namespace of its own"))?;
    } else {
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        sys::raw_unshare(libc::CLONE_NEWUSER | namespaces)
            .map_err(os("entering a user and mount namespace of its own"))?;
        // The calling user maps to itself; an unprivileged process may map
        // only its own ids, and must give up setgroups to map its group.
        std::fs::write("/proc/self/setgroups", "deny").map_err(os("denying setgroups"))?;
        std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))
            .map_err(os("writing its uid map"))?;
        std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))
            .map_err(os("writing its gid map"))?;
    }

    privileges::drop_capabilities_except(&[CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID])?;
    mounts::enter_file_root(jail.mountpoint, jail.files)?;
    match jail.ids {
        Some((uid, gid)) => privileges::switch_ids(uid, gid)?,
        None => privileges::clear_capability_sets()?,
    }
    if !privileges::holds_no_capabilities() {
        return Err(ServiceJailError::CapabilitiesLeft);
    }

    privileges::set_non_dumpable()?;
    privileges::set_no_new_privs()?;
    sys::raw_set_pdeathsig(libc::SIGKILL).map_err(os("setting its parent-death signal"))?;
    // The supervisor may have died before the signal was armed.
    if rustix::process::getppid() != Some(jail.parent) {
        return Err(ServiceJailError::ParentGone(jail.parent.as_raw_nonzero().get()));
    }
    seccomp::install(jail.filter)?;
    Ok(())
}

/// How the exec trace's listener confines itself: as [`confine`] does,
/// except that it must read the memory of the sandbox's processes, so it
/// joins the sandbox's user namespace and keeps CAP_SYS_PTRACE there, and
/// nothing else.
pub struct TracerJail<'a> {
    /// The sandbox's user namespace (`/proc/AGENT/ns/user`).
    pub user_ns: std::os::fd::BorrowedFd<'a>,
    /// As root: the uid and gid to become first, none of the sandbox's.
    /// None (rootless): stay the calling user, who owns the namespace.
    pub ids: Option<(u32, u32)>,
    /// An existing directory the new, empty root's tmpfs is mounted over.
    pub mountpoint: &'a Path,
    /// The process it must not outlive.
    pub parent: rustix::process::Pid,
    pub filter: &'a seccompiler::BpfProgram,
    /// Network and IPC namespaces left already, as root, before the
    /// sandbox existed ([`detach_network_and_ipc`]); None: left in step 3.
    pub detached: Option<Detached>,
}

/// Proof that the calling process is in network and IPC namespaces of its
/// own, made by [`detach_network_and_ipc`].
#[derive(Debug)]
pub struct Detached(());

/// As root, before the sandbox's user namespace is known: new network and
/// IPC namespaces, which belong to the host's user namespace, so that once
/// the process joined the sandbox's it holds no capability over them. Done
/// early because it is the slowest step of [`confine_tracer`] (a network
/// namespace costs about a millisecond to make), and the exec trace's
/// listener makes it while the supervisor makes the sandbox. Without root
/// it fails (EPERM): the caller leaves them in [`confine_tracer`] instead.
pub fn detach_network_and_ipc() -> Result<Detached, ServiceJailError> {
    sys::raw_unshare(libc::CLONE_NEWIPC | libc::CLONE_NEWNET)
        .map_err(os("entering IPC and network namespaces of its own"))?;
    Ok(Detached(()))
}

/// Confines the exec trace's listener for good. The order:
/// 1. As root, become its own unprivileged uid and gid (no supplementary
///    groups) while keeping its capabilities for the next step: the ids
///    must be chosen in the host's namespace, where they exist.
/// 2. Join the sandbox's user namespace (allowed to its owner, and to a
///    holder of CAP_SYS_ADMIN above it). There it holds every capability
///    of that namespace, and none anywhere else.
/// 3. A new mount namespace (owned by the sandbox's user namespace), and,
///    unless they were left before ([`TracerJail::detached`]), new IPC and
///    network namespaces: no host file, System V object or network.
/// 4. Empty the bounding set, keeping CAP_SYS_ADMIN (for the root) and
///    CAP_SYS_PTRACE; then an empty root, pivoted into.
/// 5. Keep CAP_SYS_PTRACE alone: the right to read the sandbox's
///    processes (their memory, directories and exit codes), which are all
///    of that namespace. Checked by asking the kernel.
/// 6. Non-dumpable, no_new_privs, the parent-death signal (after every
///    change of credentials, which resets it), the parent checked.
/// 7. The seccomp allowlist, last.
///
/// Descriptors opened before (the host's /proc, the listener's channel)
/// stay usable: they are how it reaches what its view no longer holds.
pub fn confine_tracer(jail: &TracerJail<'_>) -> Result<(), ServiceJailError> {
    use crate::privileges::CAP_SYS_PTRACE;
    let threads = thread_count()?;
    if threads != 1 {
        return Err(ServiceJailError::Threads(threads));
    }
    if let Some((uid, gid)) = jail.ids {
        rustix::thread::set_keep_capabilities(true).map_err(|e| os("keeping capabilities")(e.into()))?;
        privileges::switch_ids(uid, gid)?;
        // Kept in the permitted set only; the next step needs them effective.
        let sets =
            rustix::thread::capabilities(None).map_err(|e| os("reading its capabilities")(e.into()))?;
        let raised = rustix::thread::CapabilitySets {
            effective: sets.permitted,
            permitted: sets.permitted,
            inheritable: rustix::thread::CapabilitySet::empty(),
        };
        rustix::thread::set_capabilities(None, raised)
            .map_err(|e| os("raising its capabilities")(e.into()))?;
        rustix::thread::set_keep_capabilities(false).map_err(|e| os("keeping capabilities")(e.into()))?;
    }
    rustix::thread::move_into_link_name_space(jail.user_ns, Some(rustix::thread::LinkNameSpaceType::User))
        .map_err(|e| os("joining the sandbox's user namespace")(e.into()))?;
    match jail.detached {
        Some(Detached(())) => {
            sys::raw_unshare(libc::CLONE_NEWNS).map_err(os("entering a mount namespace of its own"))?
        }
        None => sys::raw_unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET)
            .map_err(os("entering mount, IPC and network namespaces of its own"))?,
    }
    privileges::drop_capabilities_except(&[CAP_SYS_ADMIN, CAP_SYS_PTRACE])?;
    mounts::enter_file_root(jail.mountpoint, &[])?;
    privileges::keep_only(&[CAP_SYS_PTRACE])?;
    if !privileges::holds_exactly(&[CAP_SYS_PTRACE]) {
        return Err(ServiceJailError::CapabilitiesLeft);
    }
    privileges::set_non_dumpable()?;
    privileges::set_no_new_privs()?;
    sys::raw_set_pdeathsig(libc::SIGKILL).map_err(os("setting its parent-death signal"))?;
    if rustix::process::getppid() != Some(jail.parent) {
        return Err(ServiceJailError::ParentGone(jail.parent.as_raw_nonzero().get()));
    }
    seccomp::install(jail.filter)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::privileges::test_fork::{have_root, run_in_child};

    /// As root, in a forked child: the process ends up with the ids it was
    /// given, no capability, a root holding only the named file, and a
    /// filter. (The sandbox's filter stands in for the proxy's here so the
    /// child can still ask the kernel about itself afterwards.)
    #[test]
    fn a_confined_process_sees_only_its_files_and_holds_nothing() {
        if !have_root("a_confined_process_sees_only_its_files_and_holds_nothing") {
            return;
        }
        let kept = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let content = std::fs::read(&kept).unwrap();
        let filter = seccomp::compile().unwrap();
        let parent = rustix::process::getpid();
        let code = run_in_child(|| {
            let jail = ServiceJail {
                files: std::slice::from_ref(&kept),
                libraries: &[],
                mountpoint: Path::new("/tmp"),
                ids: Some((4242, 4343)),
                parent,
                filter: &filter,
            };
            if let Err(e) = confine(&jail) {
                eprintln!("{e}");
                return 1;
            }
            if std::fs::read(&kept).ok().as_deref() != Some(content.as_slice()) {
                return 2;
            }
            for gone in ["/etc/passwd", "/proc/self/status", "/root", "/home", "/dev/null", "/usr"] {
                if std::fs::symlink_metadata(gone).is_ok() {
                    eprintln!("{gone} is visible");
                    return 3;
                }
            }
            if std::fs::write(&kept, b"x").is_ok() || std::fs::write("/new-file", b"x").is_ok() {
                return 4;
            }
            if rustix::process::getuid().as_raw() != 4242 || rustix::process::getgid().as_raw() != 4343 {
                return 5;
            }
            if !privileges::holds_no_capabilities() {
                return 6;
            }
            let get = |op| {
                // SAFETY: these prctl options take no pointer arguments.
                unsafe { libc::prctl(op, 0, 0, 0, 0) }
            };
            if get(libc::PR_GET_DUMPABLE) != 0 || get(libc::PR_GET_NO_NEW_PRIVS) != 1 {
                return 7;
            }
            if get(libc::PR_GET_SECCOMP) != 2 {
                return 8;
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn a_file_below_the_mount_point_is_refused() {
        let err = mounts::check_not_below(Path::new("/tmp"), &[PathBuf::from("/tmp/resolv.conf")]);
        assert!(err.is_err());
        assert!(mounts::check_not_below(Path::new("/tmp"), &[PathBuf::from("/etc/hosts")]).is_ok());
    }
}
