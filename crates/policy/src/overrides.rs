//! The CLI layer: flags like `--timeout`, `--env` and `--allow` on top of a
//! resolved policy. Flags tighten; they raise a limit only where the policy
//! author allowed it with `allow_raise = true`, and add a network destination
//! only where the policy has `allow_flag = true`.

use std::time::Duration;

use crate::error::PolicyError;
use crate::parse::check_env_name;
use crate::{HostPattern, Policy, Tier, WorkspaceMode, Writeback, format_duration, format_size};

/// Values given on the command line; `None` keeps the policy's value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub timeout: Option<Duration>,
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    pub cpus: Option<f64>,
    /// `--env K=V`, added to `env.set` (later entries win).
    pub env: Vec<(String, String)>,
    pub workspace_mode: Option<WorkspaceMode>,
    /// `--allow HOST[:PORT]`, appended to `network.allow`; refused unless the
    /// policy has egress and `allow_flag = true`.
    pub allow: Vec<String>,
    /// `--tier`: may move a sandbox to a stronger tier, never to a weaker one.
    pub tier: Option<Tier>,
    /// `--image REF`: the sandbox's root from this OCI image (the policy's
    /// `image.require_digest` and `image.registries` still apply).
    pub image: Option<String>,
    /// `--containers`: a container engine inside the sandbox's microVM;
    /// refused unless the policy has one or `containers_flag = true`.
    pub containers: bool,
}

const MIN_MEMORY: u64 = 16 * 1024 * 1024;

/// Rejects a raise unless the policy allows it.
fn check_raise(
    policy: &Policy,
    limit: &'static str,
    flag: &'static str,
    raised: bool,
    current: String,
    requested: String,
) -> Result<(), PolicyError> {
    if raised && !policy.limits.allow_raise {
        return Err(PolicyError::LimitRaise { limit, flag, policy: policy.name.clone(), current, requested });
    }
    Ok(())
}

fn invalid(flag: &'static str, value: String, reason: &str) -> PolicyError {
    PolicyError::InvalidOverride { flag, value, reason: reason.to_string() }
}

pub(crate) fn apply(base: &Policy, o: &Overrides) -> Result<Policy, PolicyError> {
    let mut p = base.clone();
    let limits = &base.limits;

    if let Some(timeout) = o.timeout {
        let shown = format_duration(timeout);
        if timeout.is_zero() {
            return Err(invalid("--timeout", shown, "must be longer than zero"));
        }
        check_raise(
            base,
            "timeout",
            "--timeout",
            timeout > limits.timeout,
            format_duration(limits.timeout),
            shown,
        )?;
        p.limits.timeout = timeout;
    }
    if let Some(memory) = o.memory {
        let shown = format_size(memory);
        if memory < MIN_MEMORY {
            return Err(invalid("--memory", shown, "must be at least 16M"));
        }
        check_raise(base, "memory", "--memory", memory > limits.memory, format_size(limits.memory), shown)?;
        p.limits.memory = memory;
    }
    if let Some(pids) = o.pids {
        if pids < crate::MIN_PIDS {
            return Err(invalid(
                "--pids",
                pids.to_string(),
                "must be at least 8 (the sandbox's own agent needs a few)",
            ));
        }
        if pids > crate::MAX_PIDS {
            return Err(invalid("--pids", pids.to_string(), "must be at most 4194304 (the kernel's limit)"));
        }
        check_raise(base, "pids", "--pids", pids > limits.pids, limits.pids.to_string(), pids.to_string())?;
        p.limits.pids = pids;
    }
    if let Some(cpus) = o.cpus {
        if !(cpus.is_finite() && cpus > 0.0 && cpus <= crate::MAX_CPUS) {
            return Err(invalid(
                "--cpus",
                cpus.to_string(),
                "must be a number greater than 0 and at most 1024",
            ));
        }
        check_raise(base, "cpus", "--cpus", cpus > limits.cpus, limits.cpus.to_string(), cpus.to_string())?;
        p.limits.cpus = cpus;
    }
    for (name, value) in &o.env {
        check_env_name(name).map_err(|reason| invalid("--env", format!("{name}={value}"), &reason))?;
        if base.secret(name).is_some() {
            return Err(PolicyError::EnvIsSecret { policy: base.name.clone(), name: name.clone() });
        }
        if value.contains('\0') {
            return Err(invalid("--env", name.clone(), "value must not contain a NUL byte"));
        }
        p.env.set.insert(name.clone(), value.clone());
    }
    if let Some(mode) = o.workspace_mode {
        // Any mode is a deliberate choice; only rw can move changes to the
        // host without review, so it is refused where writeback is "never".
        if mode == WorkspaceMode::Rw && base.workspace.writeback == Writeback::Never {
            return Err(PolicyError::RwWithoutWriteback { policy: base.name.clone() });
        }
        p.workspace.mode = mode;
    }
    if let Some(image) = &o.image {
        p.image.reference = Some(image.clone());
    }
    if let Some(tier) = o.tier {
        if base.isolation.tier == Tier::Microvm && tier == Tier::Process {
            return Err(invalid(
                "--tier",
                tier.as_str().to_owned(),
                &format!("policy {} requires the microvm tier", base.name),
            ));
        }
        p.isolation.tier = tier;
    }
    if o.containers && !base.isolation.containers {
        if !base.isolation.containers_flag {
            return Err(PolicyError::ContainersFlagDisabled { policy: base.name.clone() });
        }
        p.isolation.containers = true;
    }
    for entry in &o.allow {
        let pattern =
            HostPattern::parse(entry).map_err(|reason| invalid("--allow", entry.clone(), &reason))?;
        if !base.network.has_egress() {
            return Err(PolicyError::AllowWithoutEgress { policy: base.name.clone(), entry: entry.clone() });
        }
        if !base.network.allow_flag {
            return Err(PolicyError::AllowFlagDisabled { policy: base.name.clone(), entry: entry.clone() });
        }
        if !p.network.allow.contains(&pattern) {
            p.network.allow.push(pattern);
        }
    }
    Ok(p)
}
