//! The two halves of a sandbox's life that every owner shares — `airlock
//! run` in the foreground and the long-lived supervisor behind the daemon:
//! bringing a sandbox up to the point where untrusted code may run, and
//! finalizing it once its agent is gone.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_jail::cgroup::SandboxCgroup;
use airlock_jail::probe::HostReport;
use airlock_jail::spawn::{self, IdMap, SpawnRequest};
use airlock_policy::{CleanupAction, Policy, WorkspaceMode};
use airlock_proto::HostMessage;

use crate::audit::{AuditEvent, AuditLog};
use crate::caps::{CappedLog, SharedLog};
use crate::idblocks::{IdBlock, Registry};
use crate::layer::WritableLayer;
use crate::network::Network;
use crate::plan::{self, LaunchInput, SandboxPaths};
use crate::run::{Notice, RunOutcome};
use crate::state::{ExitInfo, LiveLock, SandboxDir, SandboxMeta, SandboxState};
use crate::stdio::SandboxStdio;
use crate::{RunError, exit_codes, now_rfc3339};

/// A sandbox whose agent is up and may run untrusted code.
pub(crate) struct Launched {
    pub name: String,
    pub meta: SandboxMeta,
    pub audit: AuditLog,
    pub cgroup: Option<SandboxCgroup>,
    pub layer: Option<WritableLayer>,
    pub network: Option<Network>,
    pub secret_values: Vec<(String, Vec<u8>)>,
    pub stdio: SandboxStdio,
    pub logs: OutputLogs,
    pub agent_pid: i32,
    pub control: UnixStream,
}

/// The sandbox's output logs, capped at the policy's `limits.log_size`
/// each and shared by everything that writes to them.
#[derive(Clone)]
pub(crate) struct OutputLogs {
    pub stdout: SharedLog,
    pub stderr: SharedLog,
}

impl OutputLogs {
    fn open(sandbox: &SandboxDir, limit: u64) -> Result<OutputLogs, RunError> {
        let open = |path: PathBuf| {
            CappedLog::open(&path, limit).map(CappedLog::shared).map_err(|e| RunError::State(path, e))
        };
        Ok(OutputLogs { stdout: open(sandbox.stdout_log())?, stderr: open(sandbox.stderr_log())? })
    }
}

/// What a sandbox is launched with.
pub(crate) struct LaunchSpec<'a> {
    pub sandbox: &'a SandboxDir,
    pub policy: &'a Policy,
    pub workspace: Option<&'a Path>,
    pub host: &'a HostReport,
    pub degraded: Vec<String>,
    /// Empty: the agent serves processes on request (long-lived sandboxes).
    pub command: &'a [String],
    pub terminal: bool,
    /// For a sandbox made on another user's behalf: the uid that must own
    /// the workspace directory that gets mounted.
    pub workspace_owner: Option<u32>,
}

/// The environment variable a test sets to a launch phase's name (see
/// [`LAUNCH_PHASES`]) to make the launch fail right after that phase.
/// Read only by debug builds.
pub(crate) const FAIL_AT_ENV: &str = "AIRLOCK_TEST_FAIL_AT";

/// The phases of a launch, in order, as [`FAIL_AT_ENV`] names them.
pub(crate) const LAUNCH_PHASES: &[&str] =
    &["state", "cgroup", "layer", "idmapped", "network", "spawned", "joined", "proxy-ready", "running"];

/// Marks a phase of the launch as done; fails there when a test asked to.
fn phase_done(phase: &'static str) -> Result<(), RunError> {
    debug_assert!(LAUNCH_PHASES.contains(&phase), "phase {phase} is not listed");
    tracing::debug!(phase, "launch phase done");
    if cfg!(debug_assertions) && std::env::var(FAIL_AT_ENV).is_ok_and(|at| at == phase) {
        return Err(RunError::InjectedFailure(phase.to_string()));
    }
    Ok(())
}

/// A launch that failed half-way, and undoing what it had set up failed
/// too: both are kept, the launch's error first.
#[derive(Debug, thiserror::Error)]
#[error("{error}; undoing the launch also failed: {}", undo.join("; "))]
pub struct UndoFailed {
    #[source]
    pub error: RunError,
    /// What could not be released, one line each.
    pub undo: Vec<String>,
}

/// What a launch has set up so far. A launch that fails half-way undoes it
/// at once (and so does dropping it, say on a panic): the agent is killed,
/// the proxy with it, the cgroup and the layer's tmpfs are removed, and
/// only then is the id block given back, since those ran as its ids.
#[derive(Default)]
struct LaunchGuard {
    id_block: Option<IdBlock>,
    cgroup: Option<SandboxCgroup>,
    layer: Option<WritableLayer>,
    network: Option<Network>,
    agent_pid: Option<i32>,
}

impl LaunchGuard {
    /// Releases everything held, last made first; what failed, one line each.
    fn undo(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        if let Some(pid) = self.agent_pid.take() {
            let _ = rustix::process::kill_process(pid_of(pid), rustix::process::Signal::KILL);
            if let Err(e) = airlock_jail::sys::wait_pid(pid) {
                failed.push(format!("reaping the agent (pid {pid}): {e}"));
            }
        }
        if let Some(network) = self.network.take() {
            network.abort();
        }
        if let Some(cg) = self.cgroup.take()
            && let Err(e) = cg.remove()
        {
            failed.push(format!("removing cgroup {}: {e}", cg.name()));
        }
        if let Some(layer) = self.layer.take() {
            let upper = layer.upper.clone();
            if let Err(e) = layer.discard() {
                failed.push(format!("releasing the writable layer of {}: {e}", upper.display()));
            }
        }
        // Dropped without being kept: given back to the registry.
        drop(self.id_block.take());
        failed
    }
}

impl Drop for LaunchGuard {
    fn drop(&mut self) {
        for failure in self.undo() {
            tracing::warn!(%failure, "undoing a failed launch");
        }
    }
}

/// Creates everything around the sandbox and starts its agent. A failure
/// half-way releases at once what was set up; nothing is left for `gc`.
pub(crate) fn launch_sandbox(spec: LaunchSpec<'_>) -> Result<Launched, RunError> {
    let mut guard = LaunchGuard::default();
    match launch_steps(spec, &mut guard) {
        Ok(launched) => Ok(launched),
        Err(error) => {
            let undo = guard.undo();
            if undo.is_empty() {
                Err(error)
            } else {
                Err(RunError::LaunchUndo(Box::new(UndoFailed { error, undo })))
            }
        }
    }
}

fn launch_steps(spec: LaunchSpec<'_>, guard: &mut LaunchGuard) -> Result<Launched, RunError> {
    let LaunchSpec { sandbox, policy, workspace, host, degraded, command, terminal, workspace_owner } = spec;
    let name = sandbox.name().to_string();
    let provisions = plan::provisions(policy, workspace.is_some(), host);
    if provisions.own_ids {
        // Searchable (not listable) by the sandbox's unprivileged root, which
        // must reach its mount points below.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(sandbox.path(), std::fs::Permissions::from_mode(0o711))
            .map_err(|e| RunError::State(sandbox.path().to_path_buf(), e))?;
    }
    std::fs::write(sandbox.policy_path(), policy.to_toml())
        .map_err(|e| RunError::State(sandbox.policy_path(), e))?;

    let mut meta = SandboxMeta {
        name: name.clone(),
        created_at: now_rfc3339(),
        policy: policy.name.clone(),
        workspace: workspace.map(Path::to_path_buf),
        workspace_mode: workspace_mode_name(policy, workspace),
        command: command.to_vec(),
        state: SandboxState::Creating,
        supervisor_pid: Some(std::process::id() as i32),
        host_uid: None,
        id_block: None,
        cgroup: None,
        started_at: None,
        finished_at: None,
        exit: None,
        applied_at: None,
        degraded: degraded.clone(),
        owner_uid: Some(rustix::process::getuid().as_raw()),
        labels: Default::default(),
        deadline_unix: None,
        idle_timeout_secs: None,
    };
    sandbox.write_meta(&meta)?;
    let mut audit = AuditLog::open(&sandbox.audit_path())?.with_limit(policy.limits.audit_size);
    audit.record(AuditEvent::Created {
        policy: policy.name.clone(),
        workspace: meta.workspace.clone(),
        workspace_mode: meta.workspace_mode.clone(),
        limits: crate::limits_json(policy),
        degraded: degraded.clone(),
    })?;

    // As root, the sandbox's ids are a block of its own, held until its
    // directory is removed; given back at once if the launch fails below.
    // Taken once meta.json exists, so that a sandbox refused for want of a
    // block is listed (failed) and can be removed.
    if provisions.own_ids {
        guard.id_block = Some(Registry::host()?.allocate(sandbox.path())?);
    }
    let id_map = IdMap::for_current_user(guard.id_block.as_ref().map_or(0, IdBlock::first_host_uid));
    meta.host_uid = Some(id_map.host_root_uid);
    meta.id_block = guard.id_block.as_ref().map(IdBlock::index);
    // Named in the same write as the ids, before it exists (one write, and
    // one sync, fewer per launch); gc finds a cgroup by the sandbox's name.
    meta.cgroup = provisions.cgroup.as_ref().map(|_| crate::cgroup_name(sandbox));
    sandbox.write_meta(&meta)?;

    phase_done("state")?;
    if let (Some(limits), Some(cgroup_name)) = (&provisions.cgroup, &meta.cgroup) {
        guard.cgroup = Some(SandboxCgroup::create(cgroup_name, limits)?);
    }

    phase_done("cgroup")?;
    if let Some(l) = &provisions.layer {
        guard.layer = Some(WritableLayer::create(sandbox, l.size_limit, id_map.host_root_uid)?);
    }
    let layer = guard.layer.as_ref();
    let rootfs = sandbox.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| RunError::State(rootfs.clone(), e))?;
    let paths = SandboxPaths {
        rootfs,
        upper: layer.map_or_else(|| sandbox.upper_dir(), |l| l.upper.clone()),
        work: layer.map_or_else(|| sandbox.work_dir(), |l| l.work.clone()),
    };

    // As root the workspace is seen through an id-mapped mount, so that files
    // owned by host users keep their owners inside while the sandbox's root
    // stays an unprivileged host uid.
    phase_done("layer")?;
    // A detached mount: closing its descriptor releases it.
    let tree = match workspace {
        Some(ws) if provisions.own_ids => Some(spawn::idmapped_tree(ws, &id_map, workspace_owner)?),
        _ => None,
    };

    phase_done("idmapped")?;
    guard.network = crate::network::Network::start(
        policy,
        &name,
        sandbox.path(),
        &sandbox.audit_path(),
        id_map.host_root_uid,
        guard.cgroup.as_ref(),
    )?;
    let network = guard.network.as_ref();
    let secret_values = network.map(|n| n.secret_values()).unwrap_or_default();
    let network_env = network.map(|n| n.environment()).unwrap_or_default();
    let logs = OutputLogs::open(sandbox, policy.limits.log_size)?;
    let mut stdio = SandboxStdio::new(logs.stdout.clone(), logs.stderr.clone(), terminal, &secret_values)
        .map_err(|e| RunError::State(sandbox.stdout_log(), e))?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let host_env = |k: &str| std::env::var(k).ok();
    let launch = plan::launch(
        policy,
        &LaunchInput {
            name: &name,
            command,
            workspace,
            cwd: &cwd,
            paths: &paths,
            host,
            idmapped_workspace: tree.is_some(),
            tty: terminal,
            host_env: &host_env,
            network: network.map(|n| plan::NetworkInput {
                ports: n.ports,
                env: &network_env,
                bundle: &n.bundle,
                bundle_targets: &[crate::network::SANDBOX_CA_BUNDLE, crate::network::SYSTEM_CA_BUNDLE],
            }),
        },
    );

    let exe = std::env::current_exe().map_err(RunError::SelfExe)?;
    phase_done("network")?;
    let spawned = spawn::spawn(
        &SpawnRequest {
            agent_exe: &exe,
            agent_args: &["airlock-agent", crate::AGENT_ROLE],
            stdio: stdio.child_fds(),
            workspace_tree: tree.as_ref().map(|t| std::os::fd::AsFd::as_fd(t)),
            egress_channel: network.and_then(|n| n.agent_end.as_ref()).map(std::os::fd::AsFd::as_fd),
            id_map: &id_map,
        },
        |_| Ok(()),
    )?;
    drop(tree);
    let agent_pid = spawned.pid;
    guard.agent_pid = Some(agent_pid);
    stdio.release_child_ends();
    let mut control = spawned.control;
    phase_done("spawned")?;
    airlock_proto::send(&mut control, &HostMessage::Launch(Box::new(launch)))?;
    // While the agent builds the root filesystem: the cgroup write, which
    // may wait for a kernel grace period. Untrusted code waits for Proceed.
    if let Some(cg) = &guard.cgroup {
        cg.add_pid(agent_pid)?;
    }
    phase_done("joined")?;
    // The proxy has been starting meanwhile; no untrusted code runs
    // without it.
    if let Some(n) = &guard.network {
        n.wait_ready()?;
    }
    phase_done("proxy-ready")?;
    airlock_proto::send(&mut control, &HostMessage::Proceed)?;
    if let Some(n) = guard.network.as_mut() {
        // The agent holds its own copy now.
        drop(n.agent_end.take());
    }

    meta.state = SandboxState::Running;
    meta.started_at = Some(now_rfc3339());
    sandbox.write_meta(&meta)?;
    phase_done("running")?;

    // Up: from here on the sandbox's owner releases all of it.
    if let Some(block) = guard.id_block.take() {
        block.keep();
    }
    guard.agent_pid = None;
    let (cgroup, layer, network) = (guard.cgroup.take(), guard.layer.take(), guard.network.take());
    Ok(Launched { name, meta, audit, cgroup, layer, network, secret_values, stdio, logs, agent_pid, control })
}

/// Removes a sandbox's directory, then gives back the id block it held.
pub(crate) fn remove_sandbox_dir(sandbox: &SandboxDir, id_block: Option<u32>) -> Result<(), RunError> {
    sandbox.remove_all()?;
    crate::idblocks::release_for(sandbox.path(), id_block);
    Ok(())
}

fn workspace_mode_name(policy: &Policy, workspace: Option<&Path>) -> String {
    match (workspace, policy.workspace.mode) {
        (None, _) | (_, WorkspaceMode::None) => "none",
        (_, WorkspaceMode::Overlay) => "overlay",
        (_, WorkspaceMode::Ro) => "ro",
        (_, WorkspaceMode::Rw) => "rw",
    }
    .to_string()
}

pub(crate) fn pid_of(pid: i32) -> rustix::process::Pid {
    rustix::process::Pid::from_raw(pid).unwrap_or(rustix::process::Pid::INIT)
}

/// Ends everything still running in a sandbox: its agent (PID 1, whose
/// death takes the PID namespace down), then whatever raced out of it into
/// the cgroup, the proxy among it (whose end is then expected, not news).
/// The agent is still to be reaped.
pub(crate) fn kill_sandbox(agent_pid: i32, network: Option<&Network>, cgroup: Option<&SandboxCgroup>) {
    let _ = rustix::process::kill_process(pid_of(agent_pid), rustix::process::Signal::KILL);
    if let Some(n) = network {
        n.ending();
    }
    if let Some(cg) = cgroup {
        let _ = cg.kill_all();
    }
}

/// What is left of a sandbox once its agent has ended (and been reaped).
pub(crate) struct Remains {
    pub name: String,
    pub meta: SandboxMeta,
    pub audit: AuditLog,
    pub cgroup: Option<SandboxCgroup>,
    pub layer: Option<WritableLayer>,
    /// Stopped first: the proxy's last events reach the audit log before
    /// the sandbox's end is recorded.
    pub network: Option<Network>,
    pub stdio: SandboxStdio,
    pub secret_values: Vec<(String, Vec<u8>)>,
    /// The state to record when it ended normally: `exited` for a command,
    /// `stopped` for a long-lived sandbox. Written before the live lock is
    /// released, so nobody who waits for the lock sees a half-done sandbox.
    pub final_state: SandboxState,
}

/// The one teardown of a sandbox whose agent is gone, for `run` and the
/// supervisor alike: stops the proxy, flushes the output, records how the
/// sandbox ended, releases its kernel objects, keeps (or summarizes) its
/// layer, captures artifacts and applies the cleanup rule.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finalize(
    sandbox: &SandboxDir,
    policy: &Policy,
    workspace: Option<&Path>,
    remains: Remains,
    ending: Ending,
    duration: Duration,
    // Some(true): remove now (`--rm`); Some(false): keep whatever the policy
    // says (long-lived sandboxes, removed by request); None: the policy's rule.
    remove: Option<bool>,
    live: LiveLock,
    notify: &mut dyn FnMut(Notice),
) -> Result<RunOutcome, RunError> {
    let Remains { name, mut meta, mut audit, cgroup, layer, network, mut stdio, secret_values, final_state } =
        remains;
    if let Some(n) = network {
        n.stop();
    }
    stdio.release_child_ends();
    stdio.finish();
    // Removed as soon as it is finalized: nothing of it needs forcing to disk.
    let removed_at_once = remove == Some(true) && ending.setup_failed.is_none();
    if removed_at_once {
        audit.about_to_be_removed();
    }
    let oom_killed = cgroup.as_ref().is_some_and(|cg| cg.oom_kills() > 0);
    let exit_code = ending.exit_code();
    audit.record(AuditEvent::Exited {
        code: ending.code,
        signal: ending.signal,
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        oom_killed,
    })?;
    if let Some(cg) = &cgroup
        && let Err(e) = cg.remove()
    {
        notify(Notice::Warning(format!(
            "could not remove the sandbox's cgroup: {e}; `airlock gc` will retry"
        )));
    }

    meta.state = if ending.setup_failed.is_some() { SandboxState::Failed } else { final_state };
    meta.finished_at = Some(now_rfc3339());
    meta.exit =
        Some(ExitInfo { code: ending.code, signal: ending.signal, timed_out: ending.timed_out, oom_killed });
    if removed_at_once {
        sandbox.write_meta_before_removal(&meta)?;
    } else {
        sandbox.write_meta(&meta)?;
    }

    if let Some(reason) = &ending.setup_failed {
        audit.record(AuditEvent::Error { stage: "setup".into(), message: reason.clone() })?;
        if let Some(layer) = layer {
            let _ = layer.discard();
        }
        // The agent is gone and no untrusted code ran: nothing is owned
        // by the block's ids any more.
        crate::idblocks::release_for(sandbox.path(), meta.id_block);
        return Err(RunError::SetupFailed(reason.clone()));
    }
    if let Some((_, message)) = &ending.exec_failed {
        notify(Notice::Warning(message.clone()));
    }

    let succeeded = exit_code == 0;
    let action = if succeeded { policy.cleanup.on_success } else { policy.cleanup.on_failure };
    let remove_after = remove == Some(true);
    let remove = remove.unwrap_or(action == CleanupAction::Remove);

    // Finalize: persist the writable layer, summarize the change, capture artifacts.
    let mut changes = None;
    let mut artifacts = Vec::new();
    if let (Some(layer), Some(ws)) = (layer, workspace) {
        // Scrubbed before it is copied to disk (as root it is still on its
        // tmpfs here): an echoed credential never reaches the state dir.
        if let Err(e) = crate::network::scrub_tree(&layer.upper, &secret_values) {
            notify(Notice::Warning(format!("could not scrub secrets from the layer: {e}")));
        }
        // A sandbox about to be removed is summarized from its live layer;
        // copying it to disk first would be wasted work.
        let live_upper = layer.upper.clone();
        let unpersisted = if remove {
            Some(layer)
        } else {
            layer.persist(sandbox)?;
            None
        };
        let review_upper = if remove { live_upper } else { sandbox.upper_dir() };
        let diff = airlock_workspace::compute_diff(ws, &review_upper)?;
        let stat = diff.stat();
        audit.record(AuditEvent::DiffSummary {
            added: stat.files_added + stat.dirs_added,
            modified: stat.files_modified + stat.type_changed,
            deleted: stat.files_deleted + stat.dirs_deleted,
        })?;
        changes = Some(stat);
        if let Some(layer) = unpersisted {
            let _ = layer.discard();
        }
    }
    // Artifacts of a sandbox about to be removed would go with it.
    if let Some(ws) = workspace
        && !policy.artifacts.capture.is_empty()
        && !remove
    {
        let upper = sandbox.upper_dir();
        match airlock_workspace::capture_artifacts(
            &upper,
            ws,
            &policy.artifacts.capture,
            &sandbox.artifacts_dir(),
            policy.artifacts.max_bytes,
        ) {
            Ok(files) => {
                let bytes = files
                    .iter()
                    .filter_map(|f| std::fs::symlink_metadata(sandbox.artifacts_dir().join(f)).ok())
                    .map(|m| m.len())
                    .sum();
                let names = files
                    .iter()
                    .map(|f| PathBuf::from(crate::network::redact_str(&f.to_string_lossy(), &secret_values)))
                    .collect();
                audit.record(AuditEvent::ArtifactsCaptured { files: names, bytes })?;
                artifacts = files;
            }
            Err(e) => notify(Notice::Warning(format!("artifact capture: {e}"))),
        }
    }

    // A credential echoed back by a server must not stay on disk.
    for dir in [sandbox.artifacts_dir()] {
        if let Err(e) = crate::network::scrub_tree(&dir, &secret_values) {
            notify(Notice::Warning(format!("could not scrub secrets from {}: {e}", dir.display())));
        }
    }

    tracing::debug!("phase: finalized");
    if remove {
        audit.record(AuditEvent::Removed {
            reason: if remove_after {
                "--rm".into()
            } else {
                format!("cleanup rule of policy {}", policy.name)
            },
        })?;
        drop(audit);
        drop(live);
        remove_sandbox_dir(sandbox, meta.id_block)?;
    }
    tracing::debug!("phase: cleaned up");
    Ok(RunOutcome {
        name,
        exit_code,
        timed_out: ending.timed_out,
        oom_killed,
        changes,
        removed: remove,
        artifacts,
    })
}

#[derive(Default)]
pub(crate) struct Ending {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub confined: bool,
    pub setup_failed: Option<String>,
    pub exec_failed: Option<(i32, String)>,
}

impl Ending {
    pub fn exit_code(&self) -> i32 {
        if self.timed_out {
            return exit_codes::TIMED_OUT;
        }
        if let Some((code, _)) = self.exec_failed {
            return code;
        }
        if self.setup_failed.is_some() {
            return exit_codes::AIRLOCK_FAILED;
        }
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            (None, None) => exit_codes::AIRLOCK_FAILED,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_undo_that_fails_is_kept_beside_the_launch_error() {
        let tmp = tempfile::tempdir().unwrap();
        // Said to be on a tmpfs, but not a mount point: releasing it fails.
        let not_mounted = tmp.path().join("layer");
        std::fs::create_dir(&not_mounted).unwrap();
        let mut guard = LaunchGuard::default();
        guard.layer = Some(WritableLayer::on_tmpfs_for_test(
            not_mounted.join("upper"),
            not_mounted.join("work"),
            not_mounted.clone(),
        ));
        let undo = guard.undo();
        assert_eq!(undo.len(), 1, "{undo:?}");
        assert!(undo[0].contains("writable layer"), "{undo:?}");
        assert!(guard.layer.is_none(), "released once, not again on drop");

        let error = RunError::LaunchUndo(Box::new(UndoFailed {
            error: RunError::InjectedFailure("layer".into()),
            undo,
        }));
        let text = error.to_string();
        assert!(text.starts_with("failure injected for a test at launch phase layer; undoing"), "{text}");
        assert!(text.contains("writable layer"), "{text}");
        let RunError::LaunchUndo(both) = &error else { unreachable!() };
        let source = std::error::Error::source(both.as_ref()).unwrap();
        assert_eq!(source.to_string(), RunError::InjectedFailure("layer".into()).to_string());
    }

    #[test]
    fn an_empty_guard_undoes_nothing() {
        assert!(LaunchGuard::default().undo().is_empty());
    }
}
