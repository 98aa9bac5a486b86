//! The cgroup v2 backend: one unified tree, controllers enabled top-down
//! through `cgroup.subtree_control`, `cgroup.kill` and `cgroup.freeze` built in.

use std::io;
use std::path::Path;

use super::{
    CPU_PERIOD_US, CgroupDir, CgroupError, CgroupLimits, Controller, Manager, cpu_quota_us, create_leaf,
    keyed_value, read_text, read_u64, write_value,
};

/// A sandbox's directory in the v2 tree.
#[derive(Debug, Clone)]
pub(crate) struct V2Cgroup {
    pub(crate) dir: CgroupDir,
    /// Controllers the v2 root offers that airlock uses; the v2 tree is used
    /// for tracking even when this is empty (hybrid hosts).
    served: Vec<Controller>,
}

impl V2Cgroup {
    pub(crate) fn new(dir: CgroupDir, served: Vec<Controller>) -> Self {
        V2Cgroup { dir, served }
    }

    /// Creates the parent and the sandbox directory, enabling the controllers
    /// on the way down: a v2 cgroup only has a controller's files when every
    /// ancestor lists it in `cgroup.subtree_control`. Controllers the limits
    /// need must be enabled; the others (kept for accounting) are best effort.
    pub(crate) fn create(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        create_leaf(&self.dir.parent, &self.dir.path, || {
            for controller in &self.served {
                let required = controller.requested(limits);
                for dir in [&self.dir.mount, &self.dir.parent] {
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
        &self.dir.path
    }

    fn apply(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        if let (Some(bytes), true) = (limits.memory, self.serves(Controller::Memory)) {
            write_value(&self.dir.file("memory.max"), &bytes.to_string())?;
            // memory.swap.max is absent when the kernel has no swap
            // accounting; then there is no swap to disable either.
            match write_value(&self.dir.file("memory.swap.max"), "0") {
                Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        if let (Some(max), true) = (limits.pids, self.serves(Controller::Pids)) {
            write_value(&self.dir.file("pids.max"), &max.to_string())?;
        }
        if let (Some(cpus), true) = (limits.cpus, self.serves(Controller::Cpu)) {
            let value = format!("{} {CPU_PERIOD_US}", cpu_quota_us(cpus));
            write_value(&self.dir.file("cpu.max"), &value)?;
        }
        Ok(())
    }

    fn serves(&self, controller: Controller) -> bool {
        self.served.contains(&controller)
    }

    fn kill_switch(&self) -> Result<bool, CgroupError> {
        let file = self.dir.file("cgroup.kill");
        // cgroup.kill appeared in Linux 5.14.
        if !file.exists() {
            return Ok(false);
        }
        write_value(&file, "1")?;
        Ok(true)
    }

    fn set_frozen(&self, frozen: bool) -> Result<bool, CgroupError> {
        let file = self.dir.file("cgroup.freeze");
        // cgroup.freeze appeared in Linux 5.2.
        if !file.exists() {
            return Ok(false);
        }
        write_value(&file, if frozen { "1" } else { "0" })?;
        Ok(true)
    }

    fn is_frozen(&self) -> bool {
        let events = read_text(&self.dir.file("cgroup.events")).unwrap_or_default();
        keyed_value(&events, "frozen") == Some(1)
    }

    fn oom_kills(&self) -> Option<u64> {
        let events = read_text(&self.dir.file("memory.events"))?;
        keyed_value(&events, "oom_kill")
    }

    fn memory_peak(&self) -> Option<u64> {
        // memory.peak appeared in Linux 5.19.
        read_u64(&self.dir.file("memory.peak"))
    }
}
