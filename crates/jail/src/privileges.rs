//! Dropping privileges of the sandbox's PID 1 before it starts the command.
//!
//! The agent is root inside its user namespace and so holds a full capability
//! set there. Capabilities in a user namespace still reach kernel code that
//! unprivileged users cannot (mounting filesystems, netfilter, raw sockets), so
//! the command must start with none: empty bounding and ambient sets (nothing
//! can come back through exec) and empty effective/permitted/inheritable sets.
//! no_new_privs stops setuid/file-capability executables from granting
//! anything, and a non-dumpable PID 1 cannot be ptrace-attached or have its
//! memory read through /proc by the command it runs.
//!
//! These calls affect the calling thread only (capabilities and the dumpable
//! flag are per-thread in the kernel); call them on the thread that forks or
//! execs the command.

use std::fs;
use std::io;
use std::path::Path;

use crate::sys;

/// Why a privilege change failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivError {
    /// A `prctl` call failed.
    #[error("prctl({what}) failed: {source}")]
    Prctl {
        /// The operation, e.g. `PR_SET_NO_NEW_PRIVS`.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Dropping one capability from the bounding set failed.
    #[error(
        "dropping capability {cap} from the bounding set failed: {source}; the process needs \
         CAP_SETPCAP (airlock's agent runs as root in its user namespace)"
    )]
    BoundingDrop {
        /// Capability number.
        cap: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `capset` failed.
    #[error("capset clearing effective/permitted/inheritable capabilities failed: {0}")]
    Capset(#[source] io::Error),
    /// `/proc/sys/kernel/cap_last_cap` could not be read or parsed.
    #[error(
        "cannot read the highest capability number from {path}: {problem}; is /proc mounted \
         in the sandbox?"
    )]
    LastCap {
        /// The file read.
        path: &'static str,
        /// What went wrong.
        problem: String,
    },
    /// Capabilities were still present after dropping them.
    #[error("capabilities are still present after dropping them ({status})")]
    StillPresent {
        /// The Cap* lines of /proc/self/status.
        status: String,
    },
}

const CAP_LAST_CAP: &str = "/proc/sys/kernel/cap_last_cap";

/// `prctl` with one integer argument.
fn prctl(option: libc::c_int, arg2: libc::c_ulong) -> io::Result<libc::c_int> {
    sys::prctl_ints(option, arg2, 0)
}

/// Sets no_new_privs: execve can never again grant privileges (setuid bits,
/// file capabilities). Required before an unprivileged seccomp install.
pub fn set_no_new_privs() -> Result<(), PrivError> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1)
        .map(|_| ())
        .map_err(|source| PrivError::Prctl { what: "PR_SET_NO_NEW_PRIVS", source })
}

/// Marks the process non-dumpable: no core dumps of the agent's memory, and
/// processes without CAP_SYS_PTRACE cannot ptrace it or open its /proc files.
/// The kernel resets this flag on execve, so the command itself stays dumpable.
pub fn set_non_dumpable() -> Result<(), PrivError> {
    prctl(libc::PR_SET_DUMPABLE, 0)
        .map(|_| ())
        .map_err(|source| PrivError::Prctl { what: "PR_SET_DUMPABLE", source })
}

/// The highest capability number this kernel knows.
fn last_cap() -> Result<u32, PrivError> {
    let text = fs::read_to_string(CAP_LAST_CAP)
        .map_err(|e| PrivError::LastCap { path: CAP_LAST_CAP, problem: e.to_string() })?;
    text.trim().parse().map_err(|e| PrivError::LastCap {
        path: CAP_LAST_CAP,
        problem: format!("`{}` is not a number: {e}", text.trim()),
    })
}

/// Capability numbers (linux/capability.h).
pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;

/// What a long-lived sandbox's agent keeps so that an exec can run as
/// another user of the sandbox: switching ids (setgroups, setgid, setuid)
/// and nothing else.
pub const ID_SWITCHING: &[u32] = &[CAP_SETGID, CAP_SETUID];

/// Sets the calling thread's effective and permitted capabilities to `keep`
/// (all below 64) and its inheritable ones to empty.
fn capset_only(keep: &[u32]) -> io::Result<()> {
    sys::capset_thread(capability_masks(keep))
}

/// `keep` as the two 32-bit words of a capability set.
fn capability_masks(keep: &[u32]) -> [u32; 2] {
    let mut masks = [0u32; 2];
    for &cap in keep.iter().filter(|&&cap| cap < 64) {
        masks[(cap / 32) as usize] |= 1 << (cap % 32);
    }
    masks
}

/// Drops every capability for good: the bounding set (every capability up to
/// the kernel's `cap_last_cap`), the ambient set, then effective, permitted and
/// inheritable. The order matters: dropping from the bounding set needs
/// CAP_SETPCAP, which the final capset removes. Checks the result afterwards.
pub fn drop_all_capabilities() -> Result<(), PrivError> {
    drop_capabilities_except(&[])
}

/// As [`drop_all_capabilities`], but the calling thread keeps `keep` in its
/// effective and permitted sets. The bounding set is still emptied, so no
/// program it starts can have them: execve grants a process (root included)
/// only what the bounding set allows, and the inheritable and ambient sets
/// are empty.
pub fn drop_capabilities_except(keep: &[u32]) -> Result<(), PrivError> {
    for cap in 0..=last_cap()? {
        match prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap)) {
            Ok(_) => {}
            // A capability this kernel does not support is already absent.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(source) => return Err(PrivError::BoundingDrop { cap, source }),
        }
    }
    prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong)
        .map_err(|source| PrivError::Prctl { what: "PR_CAP_AMBIENT_CLEAR_ALL", source })?;
    capset_only(keep).map_err(PrivError::Capset)?;
    if !holds_only(keep) {
        return Err(PrivError::StillPresent {
            status: cap_lines(Path::new("/proc/thread-self/status")).unwrap_or_default(),
        });
    }
    Ok(())
}

/// Empties the bounding and ambient sets but for `keep`, and leaves the
/// calling thread's effective and permitted sets as they are: a program it
/// then executes as (namespace) root holds exactly `keep`. For a helper
/// such as virtiofsd that needs a few capabilities in its own user
/// namespace and drops them further itself.
pub fn limit_bounding_set(keep: &[u32]) -> Result<(), PrivError> {
    for cap in (0..=last_cap()?).filter(|cap| !keep.contains(cap)) {
        match prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap)) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(source) => return Err(PrivError::BoundingDrop { cap, source }),
        }
    }
    prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong)
        .map_err(|source| PrivError::Prctl { what: "PR_CAP_AMBIENT_CLEAR_ALL", source })?;
    Ok(())
}

/// Becomes `uid` and `gid` with no supplementary groups. As root this also
/// empties the effective and permitted capability sets: the kernel clears
/// them when every uid of a thread leaves 0. Changes the calling thread
/// only (ids are per thread in the kernel): call it while single-threaded.
pub fn switch_ids(uid: u32, gid: u32) -> Result<(), PrivError> {
    use rustix::process::{Gid, Uid};
    let fail = |what: &'static str| move |e: rustix::io::Errno| PrivError::Prctl { what, source: e.into() };
    rustix::thread::set_thread_groups(&[]).map_err(fail("setgroups"))?;
    let gid = Gid::from_raw(gid);
    rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(fail("setresgid"))?;
    let uid = Uid::from_raw(uid);
    rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(fail("setresuid"))?;
    Ok(())
}

/// Keeps only `keep` in the calling thread's effective and permitted sets
/// (their subset it holds), and empties its inheritable set. Needs no
/// capability: a thread may always give up what it holds.
pub fn keep_only(keep: &[u32]) -> Result<(), PrivError> {
    capset_only(keep).map_err(PrivError::Capset)
}

/// Empties the calling thread's effective, permitted and inheritable sets.
/// Needs no capability (a thread may always give up what it holds); the
/// bounding set must have been emptied before, while CAP_SETPCAP was held.
pub fn clear_capability_sets() -> Result<(), PrivError> {
    capset_only(&[]).map_err(PrivError::Capset)
}

/// Whether the calling thread holds no capability in any of its five sets,
/// asked of the kernel itself (capget, PR_CAPBSET_READ, PR_CAP_AMBIENT_IS_SET)
/// rather than through /proc: for a process whose mount view has none.
pub fn holds_no_capabilities() -> bool {
    holds_exactly(&[])
}

/// Whether the calling thread's effective and permitted sets are exactly
/// `keep` and its inheritable, bounding and ambient sets empty, asked of
/// the kernel itself (see [`holds_no_capabilities`]).
pub fn holds_exactly(keep: &[u32]) -> bool {
    let Ok(sets) = rustix::thread::capabilities(None) else { return false };
    let masks = capability_masks(keep);
    let wanted = u64::from(masks[0]) | (u64::from(masks[1]) << 32);
    if sets.effective.bits() != wanted || sets.permitted.bits() != wanted || !sets.inheritable.is_empty() {
        return false;
    }
    // Every capability number a kernel may know; past the highest one the
    // kernel answers EINVAL, which means absent.
    let absent = |answer: io::Result<libc::c_int>| match answer {
        Ok(held) => held == 0,
        Err(e) => e.raw_os_error() == Some(libc::EINVAL),
    };
    (0..64u32).all(|cap| {
        absent(prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap)))
            && absent(prctl2(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_IS_SET as libc::c_ulong, cap.into()))
    })
}

/// `prctl` with two integer arguments.
fn prctl2(option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> io::Result<libc::c_int> {
    sys::prctl_ints(option, arg2, arg3)
}

/// The CapInh/CapPrm/CapEff/CapBnd/CapAmb lines of a status file.
fn cap_lines(path: &Path) -> io::Result<String> {
    let text = fs::read_to_string(path)?;
    Ok(text.lines().filter(|l| l.starts_with("Cap")).collect::<Vec<_>>().join(", "))
}

/// Whether the calling thread holds no capability at all, judged from its
/// `/proc/thread-self/status` (effective, permitted, bounding and ambient
/// sets). Unreadable or malformed status counts as "not empty".
pub fn capabilities_are_empty() -> bool {
    holds_only(&[])
}

/// Whether the calling thread's effective and permitted sets are exactly
/// `keep` and its inheritable, bounding and ambient sets are empty.
fn holds_only(keep: &[u32]) -> bool {
    let Ok(text) = fs::read_to_string("/proc/thread-self/status") else {
        return false;
    };
    let kept: u64 = keep.iter().fold(0, |mask, &cap| mask | (1 << cap));
    let mut seen = 0;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let expected = match key {
            "CapEff" | "CapPrm" => kept,
            "CapInh" | "CapBnd" | "CapAmb" => 0,
            _ => continue,
        };
        match u64::from_str_radix(value.trim(), 16) {
            Ok(mask) if mask == expected => seen += 1,
            _ => return false,
        }
    }
    seen == 5
}

/// Helpers for tests that must run in a forked child because they change the
/// process irreversibly (seccomp, Landlock, capabilities).
#[cfg(test)]
pub(crate) mod test_fork {
    /// Whether the test may proceed as root; prints why not otherwise, and
    /// panics under CI=true so CI cannot silently skip it.
    pub(crate) fn have_root(test: &str) -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{test} needs root and CI=true");
        eprintln!("skipping {test}: needs root");
        false
    }

    /// Runs `f` in a forked child and returns its result as the child's exit
    /// code (101 if it panicked, 128 + signal if it was killed).
    pub(crate) fn run_in_child(f: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only runs `f` and then `_exit`s without returning
        // into the test harness; glibc's fork handlers keep malloc usable in
        // the child of a multithreaded parent.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            // SAFETY: _exit ends only this child, skipping the parent's atexit
            // handlers and buffered state that the child must not flush.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: `pid` is our child and `status` is a valid out-pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
        if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::test_fork::{have_root, run_in_child};
    use super::*;
    use std::os::unix::fs::chown;

    #[test]
    fn capability_numbers_become_the_two_words_capset_takes() {
        assert_eq!(capability_masks(&[]), [0, 0]);
        assert_eq!(capability_masks(ID_SWITCHING), [(1 << CAP_SETGID) | (1 << CAP_SETUID), 0]);
        assert_eq!(capability_masks(&[CAP_SYS_ADMIN, 33, 40]), [1 << CAP_SYS_ADMIN, (1 << 1) | (1 << 8)]);
        // A number past 63 names nothing a kernel has; it must not wrap.
        assert_eq!(capability_masks(&[64, 100]), [0, 0]);
    }

    #[test]
    fn no_new_privs_is_set() {
        let code = run_in_child(|| {
            if prctl(libc::PR_GET_NO_NEW_PRIVS, 0).ok() != Some(0) {
                return 1;
            }
            if set_no_new_privs().is_err() {
                return 2;
            }
            match prctl(libc::PR_GET_NO_NEW_PRIVS, 0) {
                Ok(1) => 0,
                _ => 3,
            }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn non_dumpable_is_set() {
        let code = run_in_child(|| {
            if set_non_dumpable().is_err() {
                return 1;
            }
            match prctl(libc::PR_GET_DUMPABLE, 0) {
                Ok(0) => 0,
                _ => 2,
            }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn drop_all_capabilities_empties_every_set_and_chown_fails() {
        if !have_root("drop_all_capabilities_empties_every_set_and_chown_fails") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("owned");
        fs::write(&file, b"x").unwrap();
        // Root can hand the file to another user before the drop...
        assert!(!capabilities_are_empty());
        let code = run_in_child(|| {
            if chown(&file, Some(4242), None).is_err() {
                return 1;
            }
            if let Err(e) = drop_all_capabilities() {
                eprintln!("{e}");
                return 2;
            }
            if !capabilities_are_empty() {
                return 3;
            }
            let status = fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
            let zero = |key: &str| {
                status.lines().any(|l| {
                    l.strip_prefix(key)
                        .and_then(|v| v.strip_prefix(':'))
                        .is_some_and(|v| v.trim() == "0000000000000000")
                })
            };
            if !(zero("CapEff") && zero("CapPrm") && zero("CapBnd") && zero("CapInh")) {
                return 4;
            }
            // ...but not after it.
            match chown(&file, Some(4343), None) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => 0,
                Err(_) => 5,
                Ok(()) => 6,
            }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn switching_ids_as_root_leaves_nothing_and_the_check_needs_no_proc() {
        if !have_root("switching_ids_as_root_leaves_nothing_and_the_check_needs_no_proc") {
            return;
        }
        assert!(!holds_no_capabilities(), "root holds capabilities");
        let code = run_in_child(|| {
            // As the egress proxy does: empty the bounding set, keep what
            // switching ids needs, switch, and nothing is left.
            if drop_capabilities_except(&[CAP_SETUID, CAP_SETGID]).is_err() {
                return 1;
            }
            if holds_no_capabilities() {
                return 2;
            }
            if switch_ids(4242, 4343).is_err() {
                return 3;
            }
            let groups = rustix::process::getgroups().unwrap_or_default();
            if rustix::process::getuid().as_raw() != 4242
                || rustix::process::getegid().as_raw() != 4343
                || !groups.is_empty()
            {
                return 4;
            }
            if !holds_no_capabilities() || !capabilities_are_empty() {
                return 5;
            }
            // No way back.
            if switch_ids(0, 0).is_ok() {
                return 6;
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn clearing_the_sets_after_the_bounding_set_leaves_nothing() {
        if !have_root("clearing_the_sets_after_the_bounding_set_leaves_nothing") {
            return;
        }
        let code = run_in_child(|| {
            if drop_capabilities_except(&[CAP_SYS_ADMIN]).is_err() {
                return 1;
            }
            if clear_capability_sets().is_err() {
                return 2;
            }
            if !holds_no_capabilities() {
                return 3;
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn last_cap_is_read_from_proc() {
        let cap = last_cap().unwrap();
        // CAP_AUDIT_READ (37) exists since Linux 3.16.
        assert!(cap >= 37, "{cap}");
    }

    #[test]
    fn keeping_id_switching_allows_setuid_but_nothing_else_and_exec_gets_none() {
        if !have_root("keeping_id_switching_allows_setuid_but_nothing_else_and_exec_gets_none") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("owned");
        fs::write(&file, b"x").unwrap();
        let code = run_in_child(|| {
            if let Err(e) = drop_capabilities_except(ID_SWITCHING) {
                eprintln!("{e}");
                return 1;
            }
            if capabilities_are_empty() || !holds_only(ID_SWITCHING) {
                return 2;
            }
            // Not even chown: only the ids may change.
            if chown(&file, Some(4343), None).is_ok() {
                return 3;
            }
            // A program started as root gets nothing back through exec.
            let Ok(out) = std::process::Command::new("/bin/sh")
                .args(["-c", "grep -E '^Cap(Prm|Eff)' /proc/self/status"])
                .output()
            else {
                return 4;
            };
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if text.lines().count() != 2 || !text.lines().all(|l| l.ends_with("0000000000000000")) {
                eprintln!("{text}");
                return 5;
            }
            // And a switch of ids works, after which nothing is left.
            // SAFETY: setgid/setuid take plain integers.
            if unsafe { libc::setgid(4242) } != 0 || unsafe { libc::setuid(4242) } != 0 {
                return 6;
            }
            if !capabilities_are_empty() {
                return 7;
            }
            0
        });
        assert_eq!(code, 0);
    }
}
