//! The cgroup v2 backend: one unified tree, controllers enabled top-down
//! through `cgroup.subtree_control`, `cgroup.kill` and `cgroup.freeze` built in.

use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use super::{
    CPU_PERIOD_US, CgroupError, CgroupLimits, Controller, Manager, POLL, cpu_quota_us, create_leaf,
    keyed_value, read_text, read_u64, write_value,
};

/// How long to wait for a freeze to take hold before signalling anyway.
const FREEZE_WAIT: Duration = Duration::from_millis(200);

/// A sandbox's directory in the v2 tree.
#[derive(Debug, Clone)]
pub(crate) struct V2Cgroup {
    pub(crate) mount: PathBuf,
    parent: PathBuf,
    path: PathBuf,
    /// Controllers the v2 root offers that airlock uses; the v2 tree is used
    /// for tracking even when this is empty (hybrid hosts).
    served: Vec<Controller>,
}

impl V2Cgroup {
    pub(crate) fn new(mount: PathBuf, parent: &str, name: &str, served: Vec<Controller>) -> Self {
        let parent = mount.join(parent);
        let path = parent.join(name);
        V2Cgroup { mount, parent, path, served }
    }

    /// Creates the parent and the sandbox directory, enabling the controllers
    /// on the way down: a v2 cgroup only has a controller's files when every
    /// ancestor lists it in `cgroup.subtree_control`. Controllers the limits
    /// need must be enabled; the others (kept for accounting) are best effort.
    pub(crate) fn create(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        create_leaf(&self.parent, &self.path, || {
            for controller in &self.served {
                let required = controller.requested(limits);
                for dir in [&self.mount, &self.parent] {
                    match enable(dir, controller.name()) {
                        Ok(()) => {}
                        Err(e) if required => return Err(e),
                        Err(_) => break,
                    }
                }
            }
            Ok(())
        })
    }
}

/// Adds `+controller` to `dir`'s subtree_control unless already there.
fn enable(dir: &Path, controller: &str) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let current = read_text(&file).unwrap_or_default();
    if current.split_whitespace().any(|c| c == controller) {
        return Ok(());
    }
    write_value(&file, &format!("+{controller}")).map_err(|e| match e {
        CgroupError::Io { path, source, .. } => {
            CgroupError::Io { action: "enable a controller (write +controller) in", path, source }
        }
        other => other,
    })
}

impl Manager for V2Cgroup {
    fn path(&self) -> &Path {
        &self.path
    }

    fn apply(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        if let (Some(bytes), true) = (limits.memory, self.serves(Controller::Memory)) {
            write_value(&self.path.join("memory.max"), &bytes.to_string())?;
            // memory.swap.max is absent when the kernel has no swap
            // accounting; then there is no swap to disable either.
            match write_value(&self.path.join("memory.swap.max"), "0") {
                Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        if let (Some(max), true) = (limits.pids, self.serves(Controller::Pids)) {
            write_value(&self.path.join("pids.max"), &max.to_string())?;
        }
        if let (Some(cpus), true) = (limits.cpus, self.serves(Controller::Cpu)) {
            let value = format!("{} {CPU_PERIOD_US}", cpu_quota_us(cpus));
            write_value(&self.path.join("cpu.max"), &value)?;
        }
        Ok(())
    }

    fn serves(&self, controller: Controller) -> bool {
        self.served.contains(&controller)
    }

    fn kill_switch(&self) -> Result<bool, CgroupError> {
        let file = self.path.join("cgroup.kill");
        // cgroup.kill appeared in Linux 5.14.
        if !file.exists() {
            return Ok(false);
        }
        write_value(&file, "1")?;
        Ok(true)
    }

    fn set_frozen(&self, frozen: bool) -> Result<bool, CgroupError> {
        let file = self.path.join("cgroup.freeze");
        // cgroup.freeze appeared in Linux 5.2.
        if !file.exists() {
            return Ok(false);
        }
        write_value(&file, if frozen { "1" } else { "0" })?;
        if frozen {
            // Freezing is asynchronous; cgroup.events says when it holds.
            let start = Instant::now();
            while start.elapsed() < FREEZE_WAIT {
                let events = read_text(&self.path.join("cgroup.events")).unwrap_or_default();
                if keyed_value(&events, "frozen") == Some(1) {
                    break;
                }
                thread::sleep(POLL);
            }
        }
        Ok(true)
    }

    fn oom_kills(&self) -> Option<u64> {
        if !self.serves(Controller::Memory) {
            return None;
        }
        let events = read_text(&self.path.join("memory.events"))?;
        keyed_value(&events, "oom_kill")
    }

    fn memory_peak(&self) -> Option<u64> {
        if !self.serves(Controller::Memory) {
            return None;
        }
        // memory.peak appeared in Linux 5.19.
        read_u64(&self.path.join("memory.peak"))
    }
}
