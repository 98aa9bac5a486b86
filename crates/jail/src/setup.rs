//! The in-sandbox half of the jail: the steps the agent performs on itself,
//! in order, before it starts any untrusted code.
//!
//! Why this order:
//! - mounts while we still hold CAP_SYS_ADMIN in our user namespace, and
//!   the network's redirection while we hold CAP_NET_ADMIN there
//!   ([`build`], overlapping the supervisor's cgroup placement);
//! - cgroup namespace once the supervisor says we are in our cgroup, so its
//!   root is the sandbox's own cgroup;
//! - rlimits and non-dumpable before anything untrusted can observe us;
//! - Landlock before the capability drop (it needs no privilege, but it
//!   must be in place before seccomp forbids nothing it needs);
//! - capabilities dropped, then no_new_privs, then seccomp last, as close to
//!   the command's exec as possible, so the filter governs everything after.

use std::path::{Path, PathBuf};

use crate::landlock_rules::{self, LandlockOutcome, LandlockRules};
use crate::mounts;
use crate::plan::{JailPlan, WorkspaceMountMode};
use crate::{privileges, redirect, rlimit, seccomp, sys};

#[derive(Debug, thiserror::Error)]
#[error("{step}: {message}")]
pub struct SetupError {
    pub step: &'static str,
    pub message: String,
}

fn step<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> SetupError {
    move |e| SetupError { step, message: e.to_string() }
}

/// What the confinement achieved, for the supervisor to report.
#[derive(Debug, Clone)]
pub struct Confinement {
    pub landlock: String,
}

/// Builds the sandbox's view of the world: the root filesystem, hostname,
/// loopback and (transparent egress) the redirection of everything else. Runs before the supervisor has placed the agent in its
/// cgroup (that write can take a kernel grace period; overlapping it with
/// this work saves most of it); only airlock's own code runs here.
pub fn build(plan: &JailPlan) -> Result<(), SetupError> {
    mounts::build_root(plan).map_err(step("build the root filesystem"))?;
    rustix::system::sethostname(plan.hostname.as_bytes()).map_err(step("set the hostname"))?;
    sys::set_loopback_up().map_err(step("bring up loopback"))?;
    // While the agent still holds CAP_NET_ADMIN in the sandbox's user
    // namespace: the command never does, so it cannot undo this.
    if let Some(plan) = &plan.redirect {
        redirect::install(plan).map_err(|e| SetupError {
            step: "redirect the sandbox's connections to airlock (transparent egress)",
            message: format!(
                "{e}; this needs nf_tables with NAT in the kernel: without it, set network.transparent = false \
                 in the policy (programs that ignore the proxy settings then get no network)"
            ),
        })?;
    }
    Ok(())
}

/// Which capabilities the confined agent keeps for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentPrivileges {
    /// None (`airlock run`: the agent starts one command as root inside).
    None,
    /// Switching ids only, so that execs in a long-lived sandbox can run as
    /// another user of the sandbox. The processes it starts get none.
    SwitchIds,
}

/// Confines the calling process (the agent, PID 1 of the sandbox), once it
/// is in its cgroup: everything after this is untrusted-safe.
pub fn confine(plan: &JailPlan, keep: AgentPrivileges) -> Result<Confinement, SetupError> {
    // SAFETY: a new cgroup namespace changes no memory or file descriptor
    // state of this process; it only changes how /proc/self/cgroup reads.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWCGROUP) }
        .map_err(step("enter a cgroup namespace"))?;
    let limits = rlimit::Rlimits {
        nofile: plan.rlimits.nofile,
        nproc: plan.rlimits.nproc,
        core: Some(0),
        fsize: plan.rlimits.fsize,
        memlock: None,
    };
    rlimit::apply(&limits).map_err(step("set resource limits"))?;
    privileges::set_non_dumpable().map_err(step("make the agent non-dumpable"))?;

    let landlock = if plan.landlock.enabled {
        let outcome = landlock_rules::restrict_self(&landlock_rules_for(plan), plan.landlock.required)
            .map_err(step("apply Landlock"))?;
        match outcome {
            LandlockOutcome::FullyEnforced { abi } => format!("enforced (ABI {abi})"),
            LandlockOutcome::PartiallyEnforced { abi } => format!("partially enforced (ABI {abi})"),
            LandlockOutcome::NotSupported => "not supported by this kernel".to_string(),
        }
    } else {
        "off".to_string()
    };

    let kept = match keep {
        AgentPrivileges::None => &[][..],
        AgentPrivileges::SwitchIds => privileges::ID_SWITCHING,
    };
    privileges::drop_capabilities_except(kept).map_err(step("drop capabilities"))?;
    privileges::set_no_new_privs().map_err(step("set no_new_privs"))?;
    if plan.seccomp {
        // A workspace written in place takes files as the sandbox marks
        // them: no setuid or setgid bit may reach the host's tree.
        let writes_host_tree =
            plan.workspace.as_ref().is_some_and(|ws| matches!(ws.mode, WorkspaceMountMode::ReadWrite));
        let sets: &[seccomp::RuleSet] = if writes_host_tree {
            &[seccomp::RuleSet::Sandbox, seccomp::RuleSet::NoSetIdBits]
        } else {
            &[seccomp::RuleSet::Sandbox]
        };
        let filter = seccomp::compile_sets(sets).map_err(step("compile the seccomp filter"))?;
        seccomp::install(&filter).map_err(step("install the seccomp filter"))?;
    }
    Ok(Confinement { landlock })
}

/// Landlock's view: everything readable, writes only where the sandbox has
/// writable mounts anyway. It backs up the mount table in case a mount is
/// ever left writable by mistake.
fn landlock_rules_for(plan: &JailPlan) -> LandlockRules {
    let mut read_write: Vec<PathBuf> = ["/tmp", "/var/tmp", "/run", mounts::SANDBOX_HOME, "/home", "/dev"]
        .iter()
        .map(PathBuf::from)
        .collect();
    if let Some(ws) = &plan.workspace
        && !matches!(ws.mode, WorkspaceMountMode::ReadOnly)
    {
        read_write.push(ws.path.clone());
    }
    LandlockRules { read_exec: vec![Path::new("/").to_path_buf()], read_write }
}
