//! The policy's limits inside the guest, which QEMU's cgroup on the host
//! cannot give: QEMU's cgroup bounds the VM as a whole, but a fork bomb or
//! a greedy process inside would still take the guest — and its agent —
//! down with it, and files written to the guest's own directories would
//! fill its RAM until the kernel's OOM killer chose.
//!
//! So the guest's PID 1 puts everything its agent starts (the command, each
//! exec) into one cgroup v2 of its own, `workload`, with the policy's
//! `limits.pids` as `pids.max` and the memory the guest can spare beside its
//! agent as `memory.max`: an OOM there kills a process of the workload,
//! never the agent, which stays outside (and which a workload busy on
//! every vCPU does not starve: the cgroup competes for CPU as one task
//! beside the agent's threads). And the guest's writable places
//! (its root, with /tmp, /var/tmp, /run, /root, /home, and /dev/shm) are one
//! tmpfs sized by the policy's `limits.disk`, at most half of that memory,
//! so that writing past it fails with ENOSPC rather than ending in an OOM.
//!
//! These limits keep the sandbox usable, not its guest confined: root in the
//! guest may lift them (the guest's kernel and QEMU's jail are the boundary).

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

/// What the host tells the guest on the kernel's command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestLimits {
    /// The policy's `limits.pids`: most tasks the workload may have.
    pub pids: u64,
    /// The policy's `limits.disk`, in bytes: the size of the guest's
    /// writable places (see [`Budget`]).
    pub disk: u64,
}

impl GuestLimits {
    /// The word on the kernel's command line (one: the kernel gives init
    /// at most 32 arguments).
    pub fn to_arg(self) -> String {
        format!("limits:{}:{}", self.pids, self.disk)
    }

    /// Read back from the guest's arguments; None when missing.
    pub fn from_args<S: AsRef<str>>(args: impl IntoIterator<Item = S>) -> Option<GuestLimits> {
        args.into_iter().find_map(|arg| {
            let (pids, disk) = arg.as_ref().strip_prefix("limits:")?.split_once(':')?;
            Some(GuestLimits { pids: pids.parse().ok()?, disk: disk.parse().ok()? })
        })
    }
}

/// What the guest keeps out of its workload's reach: the agent, its
/// threads and the egress relay's buffers (at most 1 MiB queued, and a
/// window of 64 KiB for each of 128 connections), and the kernel's own
/// allocations outside any cgroup.
pub const AGENT_RESERVE: u64 = 32 << 20;

/// The least memory a workload gets, however small the guest.
const MIN_WORKLOAD: u64 = 32 << 20;

/// The least size of the guest's writable places.
const MIN_TMPFS: u64 = 1 << 20;

/// How the guest divides what it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The workload cgroup's `memory.max`, in bytes.
    pub memory_max: u64,
    /// The size of the tmpfs holding the guest's writable places, in bytes.
    pub tmpfs: u64,
}

impl Budget {
    /// From the memory the guest has available once booted (`MemAvailable`,
    /// read before anything is written to its tmpfs) and the policy's disk
    /// limit: the workload gets all but [`AGENT_RESERVE`]; its files at most
    /// half of that, so that a process that fills them still has room to
    /// see ENOSPC.
    pub fn new(available: u64, disk: u64) -> Budget {
        let memory_max = available.saturating_sub(AGENT_RESERVE).max(MIN_WORKLOAD);
        let tmpfs = disk.min(memory_max / 2).max(MIN_TMPFS);
        Budget { memory_max, tmpfs }
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn mem_available() -> io::Result<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo")?;
    parse_mem_available(&meminfo).ok_or_else(|| io::Error::other("no MemAvailable in /proc/meminfo"))
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// The name of the workload's cgroup, below the guest's root cgroup.
pub const WORKLOAD: &str = "workload";

/// Creates the workload's cgroup in the cgroup v2 hierarchy mounted at
/// `root`, with the controllers and limits of `pids` and `budget`, and
/// opens its `cgroup.procs` for the agent: it moves each process it starts
/// there before the process runs anything. Opened here, as root, so that
/// the move works for an exec that already changed to another user (the
/// kernel checks the opener's credentials).
pub fn create_workload(root: &Path, pids: u64, budget: &Budget) -> io::Result<OwnedFd> {
    let write = |path: &Path, value: &str| {
        fs::write(path, value)
            .map_err(|e| io::Error::new(e.kind(), format!("write {value:?} to {}: {e}", path.display())))
    };
    // cpu too: a workload busy on every vCPU then weighs as one task
    // beside the agent's threads, which stay responsive (an exec, a stop).
    write(&root.join("cgroup.subtree_control"), "+pids +memory +cpu")?;
    let dir = root.join(WORKLOAD);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("create {}: {e}", dir.display()))),
    }
    write(&dir.join("pids.max"), &pids.to_string())?;
    write(&dir.join("memory.max"), &budget.memory_max.to_string())?;
    // No swap in the guest; said anyway, so memory.max is the whole bound.
    let _ = fs::write(dir.join("memory.swap.max"), "0");
    let procs = dir.join("cgroup.procs");
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", procs.display())))?;
    Ok(file.into())
}

/// With a container engine in the guest, the workload's cgroup becomes an
/// inner node (cgroup v2 keeps processes out of a cgroup whose controllers
/// its children use): the agent's processes go to `workload/execs`, the
/// engine to `workload/engine`, and the engine puts each container below
/// `workload/containers` itself, so the workload's limits bound all three
/// together. Called before anything is in the workload; the `cgroup.procs`
/// of `execs` and of `engine`, opened as [`create_workload`] opens its own.
pub fn nest_for_containers(root: &Path) -> io::Result<(OwnedFd, OwnedFd)> {
    let dir = root.join(WORKLOAD);
    fs::write(dir.join("cgroup.subtree_control"), "+pids +memory +cpu")
        .map_err(|e| io::Error::new(e.kind(), format!("enable controllers below {}: {e}", dir.display())))?;
    let open = |name: &str| -> io::Result<OwnedFd> {
        let child = dir.join(name);
        match fs::create_dir(&child) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("create {}: {e}", child.display()))),
        }
        let procs = child.join("cgroup.procs");
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", procs.display())))?;
        Ok(file.into())
    };
    Ok((open("execs")?, open("engine")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limits_travel_on_the_command_line_and_back() {
        let limits = GuestLimits { pids: 256, disk: 20 << 30 };
        let arg = limits.to_arg();
        assert_eq!(arg, "limits:256:21474836480");
        let mixed = ["egress:on", &arg, "root:share:/usr|hide:/etc/shadow"];
        assert_eq!(GuestLimits::from_args(mixed), Some(limits));
        assert_eq!(GuestLimits::from_args(["limits:256"]), None, "a missing disk limit");
        assert_eq!(GuestLimits::from_args(["limits:many:1"]), None);
        assert_eq!(GuestLimits::from_args(["egress:on"]), None);
    }

    #[test]
    fn the_workload_gets_all_but_the_agents_reserve_and_its_files_at_most_half() {
        let mib = |n: u64| n << 20;
        // A 512 MiB guest (about 370 MiB available once booted) under a
        // policy with a larger disk limit: RAM decides.
        let large_disk = Budget::new(mib(370), 20 << 30);
        assert_eq!(large_disk.memory_max, mib(370) - AGENT_RESERVE);
        assert_eq!(large_disk.tmpfs, (mib(370) - AGENT_RESERVE) / 2);
        // A smaller disk limit decides.
        assert_eq!(Budget::new(mib(370), mib(64)).tmpfs, mib(64));
        // A guest short of memory still gives its workload some.
        let tiny = Budget::new(mib(20), mib(64));
        assert_eq!(tiny.memory_max, MIN_WORKLOAD);
        assert_eq!(tiny.tmpfs, MIN_WORKLOAD / 2);
        assert_eq!(Budget::new(mib(370), 0).tmpfs, MIN_TMPFS);
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let meminfo =
            "MemTotal:         468548 kB\nMemFree:          378920 kB\nMemAvailable:     380644 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(380_644 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert!(mem_available().is_ok_and(|n| n > 0), "this host's /proc/meminfo");
    }
}
