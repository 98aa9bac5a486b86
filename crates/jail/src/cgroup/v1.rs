//! The cgroup v1 backend: one tree per controller (or per co-mounted group of
//! controllers), no kill switch, freezing through the separate freezer tree.

use std::io;
use std::path::Path;

use super::{
    CPU_PERIOD_US, CgroupDir, CgroupError, CgroupLimits, Controller, Manager, cpu_quota_us, create_leaf,
    keyed_value, read_text, read_u64, write_value,
};

/// A sandbox's directory in one v1 hierarchy.
#[derive(Debug, Clone)]
pub(crate) struct V1Cgroup {
    pub(crate) dir: CgroupDir,
    /// Every controller bound to this mount (e.g. `cpu` and `cpuacct`).
    controllers: Vec<String>,
}

impl V1Cgroup {
    pub(crate) fn new(dir: CgroupDir, controllers: &[String]) -> Self {
        V1Cgroup { dir, controllers: controllers.to_vec() }
    }

    /// v1 needs no enabling: a directory gets its controllers' files at once.
    pub(crate) fn create(&self) -> Result<(), CgroupError> {
        create_leaf(&self.dir.parent, &self.dir.path, || Ok(()))
    }

    fn carries(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

impl Manager for V1Cgroup {
    fn path(&self) -> &Path {
        &self.dir.path
    }

    fn apply(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        if let (Some(bytes), true) = (limits.memory, self.serves(Controller::Memory)) {
            write_value(&self.dir.file("memory.limit_in_bytes"), &bytes.to_string())?;
            // memsw (memory+swap) may never be below the memory limit, so it
            // is written second. Setting it equal forbids swapping. Without
            // swap accounting (swapaccount=0) the file is absent; fall back
            // to swappiness 0, which tells reclaim to avoid swap for us.
            let memsw = self.dir.file("memory.memsw.limit_in_bytes");
            match write_value(&memsw, &bytes.to_string()) {
                Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    write_value(&self.dir.file("memory.swappiness"), "0")?;
                }
                other => other?,
            }
        }
        if let (Some(max), true) = (limits.pids, self.serves(Controller::Pids)) {
            write_value(&self.dir.file("pids.max"), &max.to_string())?;
        }
        if let (Some(cpus), true) = (limits.cpus, self.serves(Controller::Cpu)) {
            write_value(&self.dir.file("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write_value(&self.dir.file("cpu.cfs_quota_us"), &cpu_quota_us(cpus).to_string())?;
        }
        Ok(())
    }

    fn serves(&self, controller: Controller) -> bool {
        self.carries(controller.name())
    }

    fn kill_switch(&self) -> Result<bool, CgroupError> {
        Ok(false)
    }

    fn set_frozen(&self, frozen: bool) -> Result<bool, CgroupError> {
        if !self.carries("freezer") {
            return Ok(false);
        }
        write_value(&self.dir.file("freezer.state"), if frozen { "FROZEN" } else { "THAWED" })?;
        Ok(true)
    }

    fn is_frozen(&self) -> bool {
        // The state passes through FREEZING until every task stopped.
        read_text(&self.dir.file("freezer.state")).is_some_and(|s| s.trim() == "FROZEN")
    }

    fn oom_kills(&self) -> Option<u64> {
        // The oom_kill line appeared in Linux 4.13.
        let text = read_text(&self.dir.file("memory.oom_control"))?;
        keyed_value(&text, "oom_kill")
    }

    fn memory_peak(&self) -> Option<u64> {
        read_u64(&self.dir.file("memory.max_usage_in_bytes"))
    }
}
