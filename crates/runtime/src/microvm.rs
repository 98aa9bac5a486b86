//! `airlock run` on the microVM tier: the policy picked the tier; the
//! engine (`airlock_vm`) runs the command in a guest with its own kernel.
//!
//! Egress is the process tier's proxy, over the guest's egress port
//! (`microvm_egress`). What this tier does not have yet it says, rather
//! than pretends: the workspace (the guest sees none: a warning unless the
//! mode is `none`) and review. See the README's microVM section.

use std::path::Path;

use airlock_policy::{Policy, Weakening};
use airlock_vm::init::RootEntry;
use airlock_vm::run::{Note, VmRun};

use crate::run::{Notice, RunOutcome, RunRequest};
use crate::{RunError, plan};

pub(crate) fn run(
    req: &RunRequest,
    policy: &Policy,
    notify: &mut dyn FnMut(Notice),
) -> Result<RunOutcome, RunError> {
    let name = match &req.name {
        Some(name) => name.clone(),
        None => crate::names::generate(),
    };
    // Refused before anything else is said or built.
    engine_choice(policy)?;
    if policy.workspace.mode != airlock_policy::WorkspaceMode::None {
        let which = match &req.workspace {
            Some(dir) => dir.display().to_string(),
            None => "the current directory".to_owned(),
        };
        notify(Notice::Warning(format!(
            "the microVM tier has no workspace yet: {which} is not visible in the guest (use --mode none to \
             say so)"
        )));
    }
    // The guest's only way out: the sandbox's egress proxy, with its
    // directory and audit log (None: the policy gives it no network).
    let mut egress = crate::microvm_egress::VmEgress::start(policy, &name, &req.command)?;
    let network_env = egress.as_ref().map(|e| e.environment()).unwrap_or_default();
    let host_env = |k: &str| std::env::var(k).ok();
    let env = plan::environment_of(policy, &name, &host_env, &network_env);
    let vm_run = VmRun {
        policy: policy.name.clone(),
        allow_emulation: policy.allows_weaker(Weakening::Kvm),
        argv: req.command.clone(),
        env: env.into_iter().collect(),
        cwd: None,
        memory: policy.limits.memory,
        cpus: policy.limits.cpus,
        timeout: policy.limits.timeout,
        root: guest_root(policy, notify),
    };
    let host_egress = match egress.as_mut().map(|e| e.host_egress()).transpose() {
        Ok(host_egress) => host_egress,
        // The proxy did not start: recorded, and the guest never boots.
        Err(error) => {
            if let Some(egress) = egress.take() {
                egress.finish(policy, Err(&error), std::time::Duration::ZERO, req.remove_after)?;
            }
            return Err(error);
        }
    };
    let started = std::time::Instant::now();
    let result = airlock_vm::run::run(&vm_run, host_egress, &mut |note| match note {
        Note::Warning(w) => notify(Notice::Warning(w)),
        Note::Progress(p) => notify(Notice::Info(p)),
    })
    .map_err(RunError::from);
    let finished = match egress {
        Some(egress) => egress.finish(
            policy,
            result.as_ref().map(|o| (o.exit_code, o.timed_out)),
            started.elapsed(),
            req.remove_after,
        ),
        None => Ok(true),
    };
    // The run's own error first; recording its end failing comes second.
    let outcome = result?;
    let removed = finished?;
    tracing::info!(
        ms = outcome.boot_time.as_millis() as u64,
        accel = outcome.accel.as_str(),
        "microVM booted"
    );
    Ok(RunOutcome {
        name,
        exit_code: outcome.exit_code,
        timed_out: outcome.timed_out,
        oom_killed: false,
        changes: None,
        removed,
        artifacts: Vec::new(),
    })
}

/// Why a long-lived sandbox on the microVM tier is refused: the host's
/// case first (so that `create`, the daemon and `run` give the same
/// message on a host without usable KVM), else that this version has no
/// long-lived microVMs.
pub fn refuse_long_lived(policy: &Policy) -> RunError {
    if let Err(e) = engine_choice(policy) {
        return e;
    }
    RunError::TierUnavailable
}

/// The accelerator this policy gets on this host, or the refusal.
fn engine_choice(policy: &Policy) -> Result<airlock_vm::engine::Choice, RunError> {
    let cache = airlock_vm::cache_dir()?;
    let kernel = airlock_vm::guest::find_kernel().ok_or(airlock_vm::VmError::NoKernel)?;
    let report = airlock_vm::engine::probe_cached(&cache, Some(&kernel.vmlinuz));
    Ok(airlock_vm::engine::choose(&report, policy.allows_weaker(Weakening::Kvm), &policy.name)?)
}

/// The host's directories the guest sees, read-only: the policy's
/// `filesystem.read_only` (symbolic links among them stay links), with the
/// jail's always-hidden paths and the policy's `hidden` masked.
fn guest_root(policy: &Policy, notify: &mut dyn FnMut(Notice)) -> Vec<RootEntry> {
    let mut entries = Vec::new();
    for path in &policy.filesystem.read_only {
        if !RootEntry::fits(path) {
            notify(Notice::Warning(format!(
                "{} is not shared with the microVM: its path has spaces or characters the kernel's command \
                 line cannot carry",
                path.display()
            )));
            continue;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(path) {
                    entries.push(RootEntry::Link { path: path.clone(), target });
                }
            }
            Ok(m) if m.is_dir() => entries.push(RootEntry::Share(path.clone())),
            _ => {}
        }
    }
    let hidden = airlock_jail::mounts::ALWAYS_HIDDEN
        .iter()
        .map(Path::new)
        .chain(policy.filesystem.hidden.iter().map(|p| p.as_path()));
    for path in hidden {
        if RootEntry::fits(path) {
            entries.push(RootEntry::Hide(path.to_path_buf()));
        }
    }
    entries
}
