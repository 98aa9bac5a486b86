//! Per-sandbox cgroups: memory, pids and CPU limits, process tracking, and a
//! kill that reaches every process a sandbox ever started.
//!
//! Each sandbox gets `<mount>/<parent>/<name>` (parent `airlock`, or
//! `$AIRLOCK_CGROUP_PARENT`) in every hierarchy it uses. Which hierarchy
//! serves a controller is decided per controller by probing the host (see
//! `layout.rs`): v2 when the v2 root offers the controller, else its v1 mount.
//! So hybrid hosts (v1 controllers plus an empty v2 tree) and pure-v2 hosts
//! go through the same code. The v2 tree, when mounted, is always used too,
//! even without controllers: it gives `cgroup.kill` and `cgroup.freeze`.
//!
//! The backends are plain reads and writes of cgroupfs files behind the
//! `Manager` trait, one implementation per version, dispatched by the
//! `Hierarchy` enum. Plain files because that *is* the kernel interface:
//! each operation is one `write(2)` whose errno we can explain, and a library
//! would have to be taught the hybrid layout anyway. No systemd: airlock must
//! work on hosts and in containers without it.

mod layout;
mod v1;
mod v2;
mod warmup;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use layout::Layout;
pub use warmup::start_move_wait;

/// Parent segment used when `AIRLOCK_CGROUP_PARENT` is not set.
pub const DEFAULT_PARENT: &str = "airlock";

/// Environment variable that overrides [`DEFAULT_PARENT`], so tests and
/// parallel installations do not collide with real sandboxes.
pub const PARENT_ENV: &str = "AIRLOCK_CGROUP_PARENT";

/// How long [`SandboxCgroup::kill_all`] keeps trying before giving up.
const KILL_DEADLINE: Duration = Duration::from_secs(2);
/// How long [`SandboxCgroup::remove`] retries an `rmdir` that says EBUSY
/// (the kernel releases a cgroup shortly after its last task is gone).
const RMDIR_DEADLINE: Duration = Duration::from_secs(1);
/// How long [`Manager::freeze`] waits for a freeze to take hold before the
/// caller signals anyway.
const FREEZE_WAIT: Duration = Duration::from_millis(200);
const POLL: Duration = Duration::from_millis(10);
/// CFS period for CPU limits: 100ms, the kernel default.
const CPU_PERIOD_US: u64 = 100_000;

/// Resource limits for one sandbox. `None` leaves the resource unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CgroupLimits {
    /// Memory in bytes. Swap is disabled where the controller allows, so the
    /// limit cannot be dodged by swapping.
    pub memory: Option<u64>,
    /// Maximum number of tasks (processes and threads).
    pub pids: Option<u64>,
    /// CPU bandwidth in CPUs (1.5 = one and a half CPUs' worth of time).
    pub cpus: Option<f64>,
}

/// Which hierarchy serves a controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Placement {
    /// A v1 hierarchy; the path is that controller's mount point.
    V1(PathBuf),
    /// The v2 hierarchy; the path is its mount point.
    V2(PathBuf),
}

impl Placement {
    /// The mount point of the hierarchy.
    pub fn mount(&self) -> &Path {
        match self {
            Placement::V1(p) | Placement::V2(p) => p,
        }
    }
}

/// What the host offers for sandbox cgroups: `airlock doctor` prints it,
/// and a sandbox's cgroup is created in the hierarchies it found
/// ([`SandboxCgroup::create_on`]), so v1 or v2 is decided once, here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupSupport {
    pub memory: Option<Placement>,
    pub pids: Option<Placement>,
    pub cpu: Option<Placement>,
    /// Whether this process may create cgroups in every hierarchy it would use.
    pub writable: bool,
    /// One line per hierarchy, for humans.
    pub detail: String,
    /// The hierarchies found (none when mountinfo could not be read).
    #[serde(skip)]
    pub hierarchies: Hierarchies,
}

impl CgroupSupport {
    /// Where a sandbox cgroup `name` under `parent` goes, one directory per
    /// hierarchy used: the v2 tree whenever mounted (for `cgroup.kill` and
    /// freezing), each v1 mount serving a controller airlock limits, and the
    /// v1 freezer when there is no v2 tree.
    pub fn sandbox_dirs(&self, parent: &str, name: &str) -> Vec<Placement> {
        plan(&self.hierarchies.0, parent, name)
            .iter()
            .map(|part| match part {
                Hierarchy::V1(c) => Placement::V1(c.dir.path.clone()),
                Hierarchy::V2(c) => Placement::V2(c.dir.path.clone()),
            })
            .collect()
    }
}

/// The cgroup hierarchies mounted on the host, as [`probe`] found them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hierarchies(Layout);

/// The controllers airlock sets limits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Controller {
    Memory,
    Pids,
    Cpu,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }

    fn requested(self, limits: &CgroupLimits) -> bool {
        match self {
            Controller::Memory => limits.memory.is_some(),
            Controller::Pids => limits.pids.is_some(),
            Controller::Cpu => limits.cpus.is_some(),
        }
    }
}

/// Failures of cgroup setup, use and teardown.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid sandbox cgroup name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    #[error("invalid {PARENT_ENV}={value:?}: {reason}")]
    InvalidParent { value: String, reason: &'static str },

    #[error("invalid {what} limit {value}: {reason}")]
    InvalidLimit { what: &'static str, value: String, reason: &'static str },

    #[error("the {controller} cgroup controller is not available on this host; {fix}")]
    ControllerMissing { controller: &'static str, fix: String },

    #[error("not permitted to create cgroup {}: {source}; {fix}", path.display())]
    NotPermitted {
        path: PathBuf,
        #[source]
        source: io::Error,
        fix: String,
    },

    #[error(
        "cgroup {} already exists: a sandbox with this name is running or was not cleaned up; \
         run `airlock gc` or pick another name",
        path.display()
    )]
    AlreadyExists { path: PathBuf },

    #[error("cannot read /proc/self/mountinfo to find the cgroup hierarchies: {source}")]
    Mountinfo {
        #[source]
        source: io::Error,
    },

    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot send SIGKILL to process {pid} of cgroup {}: {source}", path.display())]
    Signal {
        pid: i32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "processes {pids:?} of cgroup {} survived {waited:?} of SIGKILL; \
         they may be stuck in the kernel (uninterruptible I/O); retry `airlock rm` later",
        path.display()
    )]
    KillTimeout { path: PathBuf, pids: Vec<i32>, waited: Duration },
}

impl CgroupError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> CgroupError {
        CgroupError::Io { action, path: path.to_owned(), source }
    }
}

/// The operations a sandbox needs from one hierarchy. One implementation per
/// cgroup version; everything version-specific lives behind it.
trait Manager {
    /// The sandbox's directory in this hierarchy.
    fn path(&self) -> &Path;

    /// Writes the limits for the controllers this hierarchy serves.
    fn apply(&self, limits: &CgroupLimits) -> Result<(), CgroupError>;

    /// Whether this hierarchy serves `controller` for this sandbox.
    fn serves(&self, controller: Controller) -> bool;

    /// Kills every process at once (v2 `cgroup.kill`). Returns false when
    /// the kernel has no such switch and the caller must signal one by one.
    fn kill_switch(&self) -> Result<bool, CgroupError>;

    /// Asks the kernel to freeze or thaw. Returns false when this hierarchy
    /// cannot freeze.
    fn set_frozen(&self, frozen: bool) -> Result<bool, CgroupError>;

    /// Whether a requested freeze has taken hold (the kernel stops the tasks
    /// asynchronously).
    fn is_frozen(&self) -> bool;

    /// OOM kills inside the sandbox, as the memory controller counts them.
    /// Only asked of a hierarchy that serves memory.
    fn oom_kills(&self) -> Option<u64>;

    /// Peak memory use in bytes, when the kernel records it. Only asked of a
    /// hierarchy that serves memory.
    fn memory_peak(&self) -> Option<u64>;

    /// Freezes and waits up to [`FREEZE_WAIT`] for the freeze to hold.
    /// Returns false when this hierarchy cannot freeze.
    fn freeze(&self) -> Result<bool, CgroupError> {
        if !self.set_frozen(true)? {
            return Ok(false);
        }
        wait_until(FREEZE_WAIT, || self.is_frozen());
        Ok(true)
    }

    fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        write_value(&self.path().join("cgroup.procs"), &pid.to_string())
    }

    fn pids(&self) -> Vec<i32> {
        read_pids(&self.path().join("cgroup.procs"))
    }
}

/// Where a sandbox's directory lies in one hierarchy:
/// `<mount>/<parent>/<name>`.
#[derive(Debug, Clone)]
pub(crate) struct CgroupDir {
    mount: PathBuf,
    parent: PathBuf,
    path: PathBuf,
}

impl CgroupDir {
    fn new(mount: PathBuf, parent: &str, name: &str) -> CgroupDir {
        let parent = mount.join(parent);
        let path = parent.join(name);
        CgroupDir { mount, parent, path }
    }
    /// A control file in the sandbox's directory.
    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

/// A sandbox's directory in one hierarchy.
#[derive(Debug, Clone)]
enum Hierarchy {
    V1(v1::V1Cgroup),
    V2(v2::V2Cgroup),
}

impl Hierarchy {
    fn manager(&self) -> &dyn Manager {
        match self {
            Hierarchy::V1(c) => c,
            Hierarchy::V2(c) => c,
        }
    }

    fn mount(&self) -> &Path {
        match self {
            Hierarchy::V1(c) => &c.dir.mount,
            Hierarchy::V2(c) => &c.dir.mount,
        }
    }
}

/// Reports where each controller lives and whether this process can use it.
/// Never fails: an unreadable host shows up as missing placements and detail.
pub fn probe() -> CgroupSupport {
    match Layout::discover() {
        Ok(layout) => support_of(layout),
        Err(e) => CgroupSupport {
            memory: None,
            pids: None,
            cpu: None,
            writable: false,
            detail: format!("cannot read /proc/self/mountinfo: {e}"),
            hierarchies: Hierarchies::default(),
        },
    }
}

/// What `layout` offers, and whether this process may create cgroups in
/// every hierarchy a sandbox would use.
fn support_of(layout: Layout) -> CgroupSupport {
    let parent = parent_from_env().unwrap_or_else(|_| DEFAULT_PARENT.to_owned());
    let mut lines = Vec::new();
    let mut writable = true;
    for mount in used_mounts(&layout) {
        let target = creation_dir(&mount, &parent);
        let ok = rustix::fs::access(&target, rustix::fs::Access::WRITE_OK).is_ok();
        writable &= ok;
        lines.push(format!("{}: {}", mount.display(), if ok { "writable" } else { "not writable" }));
    }
    if let Some(v2) = &layout.v2 {
        lines.push(format!("v2 at {} offers [{}]", v2.path.display(), v2.controllers.join(" ")));
    }
    for m in &layout.v1 {
        lines.push(format!("v1 at {} carries [{}]", m.path.display(), m.controllers.join(" ")));
    }
    if layout.v2.is_none() && layout.v1.is_empty() {
        writable = false;
        lines.push("no cgroup hierarchy is mounted".to_owned());
    }
    CgroupSupport {
        memory: layout.placement(Controller::Memory),
        pids: layout.placement(Controller::Pids),
        cpu: layout.placement(Controller::Cpu),
        writable,
        detail: lines.join("; "),
        hierarchies: Hierarchies(layout),
    }
}

/// The parent segment: `$AIRLOCK_CGROUP_PARENT` when set, else `airlock`.
pub fn parent_from_env() -> Result<String, CgroupError> {
    match std::env::var(PARENT_ENV) {
        Ok(value) => {
            validate_segment(&value)
                .map_err(|reason| CgroupError::InvalidParent { value: value.clone(), reason })?;
            Ok(value)
        }
        Err(_) => Ok(DEFAULT_PARENT.to_owned()),
    }
}

/// A sandbox's cgroups, one directory per hierarchy used.
///
/// Dropping it does not remove anything: the cgroup must outlive a crashed
/// supervisor so that `airlock gc` can still find and kill what is left.
#[derive(Debug, Clone)]
pub struct SandboxCgroup {
    name: String,
    parts: Vec<Hierarchy>,
}

impl SandboxCgroup {
    /// Creates `<mount>/<parent>/<name>` in every hierarchy used, with
    /// `<parent>` from [`parent_from_env`], and writes the limits.
    pub fn create(name: &str, limits: &CgroupLimits) -> Result<SandboxCgroup, CgroupError> {
        SandboxCgroup::create_in(&parent_from_env()?, name, limits)
    }

    /// Creates `<mount>/<parent>/<name>` in every hierarchy `support` (the
    /// host probe's) says a sandbox uses, with `<parent>` from
    /// [`parent_from_env`], and writes the limits. The hierarchies are not
    /// looked up again: what the probe decided (and planned from) is used.
    pub fn create_on(
        support: &CgroupSupport,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<SandboxCgroup, CgroupError> {
        let parent = parent_from_env()?;
        validate_parent(&parent)?;
        validate_name(name)?;
        validate_limits(limits)?;
        SandboxCgroup::create_with(&support.hierarchies.0, &parent, name, limits)
    }

    /// [`SandboxCgroup::create`] under an explicit parent segment, for
    /// callers that carry it in configuration instead of the environment.
    pub fn create_in(parent: &str, name: &str, limits: &CgroupLimits) -> Result<SandboxCgroup, CgroupError> {
        validate_parent(parent)?;
        validate_name(name)?;
        validate_limits(limits)?;
        let layout = Layout::discover().map_err(|source| CgroupError::Mountinfo { source })?;
        SandboxCgroup::create_with(&layout, parent, name, limits)
    }

    /// The creation steps on a given layout (tests pass a pure-v1 view of a
    /// hybrid host to exercise the freezer path).
    fn create_with(
        layout: &Layout,
        parent: &str,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<SandboxCgroup, CgroupError> {
        for controller in Controller::ALL {
            if controller.requested(limits) && layout.placement(controller).is_none() {
                return Err(CgroupError::ControllerMissing {
                    controller: controller.name(),
                    fix: missing_fix(controller, layout),
                });
            }
        }

        let parts = plan(layout, parent, name);
        if parts.is_empty() {
            return Err(CgroupError::ControllerMissing {
                controller: "any",
                fix: "no cgroup hierarchy is mounted; mount cgroup2 at /sys/fs/cgroup \
                      (`mount -t cgroup2 none /sys/fs/cgroup`)"
                    .to_owned(),
            });
        }
        for part in &parts {
            let path = part.manager().path();
            if path.exists() {
                return Err(CgroupError::AlreadyExists { path: path.to_owned() });
            }
        }

        // Build up `parts` as directories appear so that a failure half-way
        // removes exactly what was created.
        let mut cgroup = SandboxCgroup { name: name.to_owned(), parts: Vec::new() };
        for part in parts {
            let created = match &part {
                Hierarchy::V1(c) => c.create(),
                Hierarchy::V2(c) => c.create(limits),
            };
            if let Err(e) = created {
                cgroup.remove_dirs_quietly();
                return Err(e);
            }
            cgroup.parts.push(part);
        }
        for part in &cgroup.parts {
            if let Err(e) = part.manager().apply(limits) {
                cgroup.remove_dirs_quietly();
                return Err(e);
            }
        }
        Ok(cgroup)
    }

    /// Opens an existing sandbox cgroup, for `airlock gc` and recovery after
    /// a restart. `None` when no hierarchy has it.
    pub fn open(name: &str) -> Option<SandboxCgroup> {
        SandboxCgroup::open_in(&parent_from_env().ok()?, name)
    }

    /// [`SandboxCgroup::open`] under an explicit parent segment.
    pub fn open_in(parent: &str, name: &str) -> Option<SandboxCgroup> {
        validate_parent(parent).ok()?;
        validate_name(name).ok()?;
        let layout = Layout::discover().ok()?;
        let parts: Vec<Hierarchy> =
            plan(&layout, parent, name).into_iter().filter(|p| p.manager().path().is_dir()).collect();
        if parts.is_empty() {
            return None;
        }
        Some(SandboxCgroup { name: name.to_owned(), parts })
    }

    /// Names of all sandbox cgroups under the parent in any hierarchy.
    pub fn list() -> Vec<String> {
        match parent_from_env() {
            Ok(parent) => SandboxCgroup::list_in(&parent),
            Err(_) => Vec::new(),
        }
    }

    /// [`SandboxCgroup::list`] under an explicit parent segment.
    pub fn list_in(parent: &str) -> Vec<String> {
        if validate_parent(parent).is_err() {
            return Vec::new();
        }
        let Ok(layout) = Layout::discover() else {
            return Vec::new();
        };
        let mut names = BTreeSet::new();
        for mount in used_mounts(&layout) {
            let Ok(entries) = fs::read_dir(mount.join(parent)) else {
                continue;
            };
            for entry in entries.flatten() {
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                let file_name = entry.file_name();
                match file_name.to_str() {
                    Some(name) if is_dir && validate_name(name).is_ok() => {
                        names.insert(name.to_owned());
                    }
                    _ => {}
                }
            }
        }
        names.into_iter().collect()
    }

    /// Moves `pid` (the whole process) into the sandbox in every hierarchy.
    /// This cgroup's directory opened for starting a process in it
    /// (`clone3`'s `CLONE_INTO_CGROUP`), when the cgroup lives in the v2
    /// hierarchy alone; None where it has v1 parts (a v1 hierarchy has no
    /// such start, the process is moved into each) or cannot be opened.
    pub fn start_target(&self) -> Option<std::os::fd::OwnedFd> {
        use rustix::fs::{Mode, OFlags};
        match self.parts.as_slice() {
            [Hierarchy::V2(v2)] => rustix::fs::open(
                &v2.dir.path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok(),
            _ => None,
        }
    }

    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        for part in &self.parts {
            part.manager().add_pid(pid)?;
        }
        Ok(())
    }

    /// Every process in the sandbox, in any hierarchy, sorted.
    pub fn pids(&self) -> Vec<i32> {
        let set: BTreeSet<i32> = self.parts.iter().flat_map(|p| p.manager().pids()).collect();
        set.into_iter().collect()
    }

    /// Kills every process in the sandbox and waits until none is left.
    ///
    /// With v2 `cgroup.kill` the kernel kills them atomically, forks included.
    /// Without it the sandbox is frozen first so nothing can fork while the
    /// pids are signalled one by one, then thawed so the kills land (a v1
    /// frozen task does not die until thawed). Repeats until empty, bounded
    /// by a deadline so a task stuck in the kernel cannot hang the caller.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let start = Instant::now();
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= KILL_DEADLINE {
                return Err(CgroupError::KillTimeout {
                    path: self.primary_path(),
                    pids,
                    waited: start.elapsed(),
                });
            }
            let mut killed = false;
            for part in &self.parts {
                if part.manager().kill_switch()? {
                    killed = true;
                    break;
                }
            }
            if !killed {
                self.freeze_and_signal()?;
            }
            thread::sleep(POLL);
        }
    }

    /// OOM kills that happened inside the sandbox (0 without a memory
    /// controller, since nothing could then be OOM-killed by the sandbox's
    /// limit).
    pub fn oom_kills(&self) -> u64 {
        self.memory_managers().find_map(|m| m.oom_kills()).unwrap_or(0)
    }

    /// Highest memory use seen, in bytes, when the kernel records it.
    pub fn memory_peak(&self) -> Option<u64> {
        self.memory_managers().find_map(|m| m.memory_peak())
    }

    /// The hierarchies whose memory controller limits this sandbox.
    fn memory_managers(&self) -> impl Iterator<Item = &dyn Manager> {
        self.parts.iter().map(Hierarchy::manager).filter(|m| m.serves(Controller::Memory))
    }

    /// Kills everything, then removes the sandbox's directory in every
    /// hierarchy, and the shared parent when this was the last sandbox (so
    /// nothing is left behind; a concurrent create recreates it, see
    /// `create_leaf`).
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.kill_all()?;
        for part in &self.parts {
            let path = part.manager().path();
            rmdir_retrying(path)?;
            // The shared default parent stays once made: removing it with
            // the last sandbox cost every `run` four more mkdirs and rmdirs
            // on a v1 host. A parent named by $AIRLOCK_CGROUP_PARENT (a
            // test's, a tenant's) goes with its last sandbox; the removal
            // fails with EBUSY/ENOTEMPTY while others exist, as intended.
            if let Some(parent) = path.parent()
                && parent.file_name() != Some(std::ffi::OsStr::new(DEFAULT_PARENT))
            {
                let _ = fs::remove_dir(parent);
            }
        }
        Ok(())
    }

    /// The sandbox's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sandbox's directory in each hierarchy used.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.parts.iter().map(|p| p.manager().path().to_owned()).collect()
    }

    fn primary_path(&self) -> PathBuf {
        self.parts.first().map(|p| p.manager().path().to_owned()).unwrap_or_default()
    }

    fn freeze_and_signal(&self) -> Result<(), CgroupError> {
        let mut frozen_by = None;
        for part in &self.parts {
            if part.manager().freeze()? {
                frozen_by = Some(part);
                break;
            }
        }
        // Signal even if thawing later fails: the processes must die.
        let mut result = Ok(());
        for pid in self.pids() {
            if let Err(e) = sigkill(pid) {
                result = Err(CgroupError::Signal { pid, path: self.primary_path(), source: e });
            }
        }
        if let Some(part) = frozen_by {
            part.manager().set_frozen(false)?;
        }
        result
    }

    /// Cleanup after a failed create: the directories are empty and fresh,
    /// so failure here is not expected and would hide the original error.
    fn remove_dirs_quietly(&self) {
        for part in self.parts.iter().rev() {
            let _ = fs::remove_dir(part.manager().path());
        }
    }
}

/// The hierarchies a sandbox lives in: the v2 tree whenever mounted (for
/// `cgroup.kill` and freezing), each v1 mount serving one of our controllers,
/// and the v1 freezer when there is no v2 tree to freeze with.
fn plan(layout: &Layout, parent: &str, name: &str) -> Vec<Hierarchy> {
    let mut parts = Vec::new();
    if let Some(v2) = &layout.v2 {
        let served = Controller::ALL
            .into_iter()
            .filter(|c| matches!(layout.placement(*c), Some(Placement::V2(_))))
            .collect();
        let dir = CgroupDir::new(v2.path.clone(), parent, name);
        parts.push(Hierarchy::V2(v2::V2Cgroup::new(dir, served)));
    }
    let mut seen: Vec<PathBuf> = Vec::new();
    for mount in &layout.v1 {
        let serves_ours = Controller::ALL
            .into_iter()
            .any(|c| matches!(layout.placement(c), Some(Placement::V1(ref p)) if *p == mount.path));
        let freezer_needed = layout.v2.is_none() && mount.controllers.iter().any(|c| c == "freezer");
        if (serves_ours || freezer_needed) && !seen.contains(&mount.path) {
            seen.push(mount.path.clone());
            let dir = CgroupDir::new(mount.path.clone(), parent, name);
            parts.push(Hierarchy::V1(v1::V1Cgroup::new(dir, &mount.controllers)));
        }
    }
    parts
}

/// Mount points of the hierarchies [`plan`] would use.
fn used_mounts(layout: &Layout) -> Vec<PathBuf> {
    plan(layout, DEFAULT_PARENT, "probe").iter().map(|p| p.mount().to_owned()).collect()
}

/// The directory a new sandbox cgroup is created in: the parent when it
/// exists, else the mount point (where the parent will be created).
fn creation_dir(mount: &Path, parent: &str) -> PathBuf {
    let dir = mount.join(parent);
    if dir.is_dir() { dir } else { mount.to_owned() }
}

fn missing_fix(controller: Controller, layout: &Layout) -> String {
    let name = controller.name();
    match &layout.v2 {
        Some(v2) if layout.v1.is_empty() => format!(
            "the cgroup v2 root {} does not offer it (cgroup.controllers); enable it in the \
             kernel (for memory: boot parameter cgroup_enable=memory) or use a policy \
             that allows running without cgroup limits (isolation.allow_weaker = [\"cgroups\"])",
            v2.path.display()
        ),
        _ => format!(
            "mount it (`mount -t cgroup -o {name} cgroup /sys/fs/cgroup/{name}` on a v1/hybrid \
             host, or boot with systemd.unified_cgroup_hierarchy=1 for pure v2), or use a policy that \
             allows running without cgroup limits (isolation.allow_weaker = [\"cgroups\"])"
        ),
    }
}

fn not_permitted_fix(path: &Path) -> String {
    let uid = rustix::process::geteuid().as_raw();
    format!(
        "uid {uid} cannot create cgroups under {}: run airlock as root, or use a \
         policy that allows running without cgroup limits (isolation.allow_weaker = [\"cgroups\"], as `dev` does)",
        path.display()
    )
}

/// Creates a directory, mapping permission problems to [`CgroupError::NotPermitted`].
fn mkdir(path: &Path, tolerate_existing: bool) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if tolerate_existing && e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(mkdir_error(path, e)),
    }
}

fn mkdir_error(path: &Path, e: io::Error) -> CgroupError {
    if is_permission(&e) {
        CgroupError::NotPermitted {
            fix: not_permitted_fix(path.parent().unwrap_or(path)),
            path: path.to_owned(),
            source: e,
        }
    } else if e.kind() == io::ErrorKind::AlreadyExists {
        CgroupError::AlreadyExists { path: path.to_owned() }
    } else {
        CgroupError::io("create directory", path, e)
    }
}

/// Creates the shared `parent`, runs `prepare` on it, then creates `leaf`.
/// Another sandbox's [`SandboxCgroup::remove`] may delete the parent once it
/// is empty, between these steps; a NotFound then means "start over".
fn create_leaf(
    parent: &Path,
    leaf: &Path,
    mut prepare: impl FnMut() -> Result<(), CgroupError>,
) -> Result<(), CgroupError> {
    const ATTEMPTS: usize = 5;
    let vanished = |e: &CgroupError| matches!(e, CgroupError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound);
    for attempt in 1..=ATTEMPTS {
        mkdir(parent, true)?;
        match prepare() {
            Ok(()) => {}
            Err(e) if vanished(&e) && attempt < ATTEMPTS => continue,
            Err(e) => return Err(e),
        }
        match fs::create_dir(leaf) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < ATTEMPTS => continue,
            Err(e) => return Err(mkdir_error(leaf, e)),
        }
    }
    Err(CgroupError::io(
        "create directory",
        leaf,
        io::Error::new(io::ErrorKind::NotFound, "the parent kept disappearing"),
    ))
}

fn is_permission(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS))
}

/// Writes one value to a cgroup control file in a single `write(2)`, which
/// is what the kernel parses. Never creates the file.
fn write_value(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| CgroupError::io("open for writing", path, e))?;
    let written = file.write(value.as_bytes()).map_err(|e| CgroupError::io("write", path, e))?;
    if written != value.len() {
        return Err(CgroupError::io(
            "write",
            path,
            io::Error::new(io::ErrorKind::WriteZero, "short write to a cgroup file"),
        ));
    }
    Ok(())
}

/// Reads a small control file; `None` when absent or unreadable.
fn read_text(path: &Path) -> Option<String> {
    let mut text = String::new();
    fs::File::open(path).ok()?.read_to_string(&mut text).ok()?;
    Some(text)
}

fn read_pids(path: &Path) -> Vec<i32> {
    read_text(path).map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect()).unwrap_or_default()
}

/// The value of `key` in a flat-keyed file (`memory.events`,
/// `memory.oom_control`): lines of `key value`.
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        (it.next() == Some(key)).then(|| it.next().and_then(|v| v.parse().ok())).flatten()
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    read_text(path).and_then(|t| t.trim().parse().ok())
}

fn sigkill(pid: i32) -> io::Result<()> {
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return Ok(());
    };
    match rustix::process::kill_process(pid, rustix::process::Signal::KILL) {
        Ok(()) => Ok(()),
        // Gone already, which is what we want.
        Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Polls `done` every [`POLL`] until it holds or `limit` has passed.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit && !done() {
        thread::sleep(POLL);
    }
}

fn rmdir_retrying(path: &Path) -> Result<(), CgroupError> {
    let start = Instant::now();
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < RMDIR_DEADLINE => {
                thread::sleep(POLL);
            }
            Err(e) => return Err(CgroupError::io("remove directory", path, e)),
        }
    }
}

/// Checks a sandbox name: `[a-z0-9][a-z0-9._-]{0,62}`, no `..`, nothing that
/// looks like a control file. The name becomes a directory in cgroupfs, so
/// anything that could climb out (`/`, `..`) or collide with kernel files is
/// refused before it reaches a path.
pub fn validate_name(name: &str) -> Result<(), CgroupError> {
    validate_segment(name).map_err(|reason| CgroupError::InvalidName { name: name.to_owned(), reason })
}

fn validate_parent(parent: &str) -> Result<(), CgroupError> {
    validate_segment(parent).map_err(|reason| CgroupError::InvalidParent { value: parent.to_owned(), reason })
}

fn validate_segment(s: &str) -> Result<(), &'static str> {
    let bytes = s.as_bytes();
    let Some(first) = bytes.first() else {
        return Err("must not be empty");
    };
    if bytes.len() > 63 {
        return Err("must be at most 63 characters");
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err("must start with a lowercase letter or digit");
    }
    if !bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("may contain only lowercase letters, digits, '.', '_' and '-'");
    }
    if s.contains("..") {
        return Err("must not contain '..'");
    }
    // Names that look like control files ("memory.max") would shadow nothing
    // (the kernel refuses them) but confuse listings; refuse them up front.
    let prefix = s.split_once('.').map(|(p, _)| p);
    if matches!(prefix, Some("cgroup" | "memory" | "pids" | "cpu" | "cpuset" | "io" | "freezer")) {
        return Err("must not look like a cgroup control file");
    }
    Ok(())
}

fn validate_limits(limits: &CgroupLimits) -> Result<(), CgroupError> {
    // Below one page the kernel would kill the first process at once.
    if let Some(m) = limits.memory.filter(|m| *m < 4096) {
        return Err(CgroupError::InvalidLimit {
            what: "memory",
            value: m.to_string(),
            reason: "must be at least 4096 bytes",
        });
    }
    if limits.pids == Some(0) {
        return Err(CgroupError::InvalidLimit {
            what: "pids",
            value: "0".to_owned(),
            reason: "must be at least 1",
        });
    }
    if let Some(c) = limits.cpus.filter(|c| !c.is_finite() || *c <= 0.0) {
        return Err(CgroupError::InvalidLimit {
            what: "cpus",
            value: c.to_string(),
            reason: "must be a positive number",
        });
    }
    Ok(())
}

/// CFS quota for `cpus` CPUs per [`CPU_PERIOD_US`]; at least 1ms, the
/// kernel's minimum.
fn cpu_quota_us(cpus: f64) -> u64 {
    let quota = (cpus * CPU_PERIOD_US as f64).round();
    if quota < 1000.0 {
        1000
    } else if quota >= u64::MAX as f64 {
        u64::MAX
    } else {
        // In range and integral after the checks above.
        quota as u64
    }
}
