//! `airlock run`: one sandbox, one command, in-process, no daemon.
//!
//! resolve policy → check the host → create the state dir → cgroup and
//! writable layer → spawn the agent → stream output, forward signals,
//! enforce the deadline → finalize (layer, diff summary, artifacts, audit)
//! → clean up per policy → the command's exit code.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use airlock_jail::cgroup::{CgroupLimits, SandboxCgroup};
use airlock_jail::spawn::{self, IdMap, SpawnRequest};
use airlock_policy::{CleanupAction, Overrides, Policy, WorkspaceMode};
use airlock_proto::{AgentMessage, HostMessage};

use crate::audit::{AuditEvent, AuditLog};
use crate::layer::WritableLayer;
use crate::plan::{self, HostFacts, LaunchInput, SandboxPaths};
use crate::state::{ExitInfo, SandboxDir, SandboxMeta, SandboxState, StateRoot};
use crate::stdio::SandboxStdio;
use crate::{RunError, exit_codes, now_rfc3339};

/// What the caller asked for.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    pub policy: String,
    pub overrides: Overrides,
    pub workspace: Option<PathBuf>,
    pub name: Option<String>,
    pub remove_after: bool,
    pub command: Vec<String>,
}

/// Something the person at the terminal should know, as it happens.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    Warning(String),
    Info(String),
}

/// How the run ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub name: String,
    pub exit_code: i32,
    pub timed_out: bool,
    pub oom_killed: bool,
    pub changes: Option<airlock_workspace::DiffStat>,
    pub removed: bool,
    pub artifacts: Vec<PathBuf>,
}

/// How long the agent may take to build and confine the sandbox.
const SETUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub fn run(req: &RunRequest, notify: &mut dyn FnMut(Notice)) -> Result<RunOutcome, RunError> {
    let base = Policy::resolve(&req.policy)?;
    let policy = base.apply_overrides(&req.overrides)?;
    if policy.isolation.tier == airlock_policy::Tier::Microvm {
        return Err(RunError::TierUnavailable);
    }
    if req.command.is_empty() {
        return Err(RunError::NoCommand);
    }
    let workspace = resolve_workspace(&policy, req.workspace.as_deref())?;
    if policy.workspace.mode == WorkspaceMode::Rw && workspace.is_some() {
        notify(Notice::Warning(
            "workspace mode rw: the sandbox writes straight into the host directory, with no review".into(),
        ));
    }

    let is_root = rustix::process::geteuid().is_root();
    let cgroup_support = airlock_jail::cgroup::probe();
    let host = HostFacts {
        is_root,
        cgroups: cgroup_support.writable
            && cgroup_support.memory.is_some()
            && cgroup_support.pids.is_some()
            && cgroup_support.cpu.is_some(),
        landlock: airlock_jail::landlock_rules::abi_version().is_some(),
        disk_quota: is_root,
    };
    let mut degraded = Vec::new();
    for s in plan::shortfalls(&policy, &host) {
        if !s.allowed {
            return Err(RunError::HostLacks { feature: s.feature.to_string(), policy: policy.name.clone() });
        }
        degraded.push(s.feature.to_string());
    }
    if !degraded.is_empty() {
        notify(Notice::Warning(format!(
            "running weaker than the host could with root: without {} (policy {} allows it; see `airlock doctor`)",
            degraded.join(", "),
            policy.name
        )));
    }

    tracing::debug!("phase: start: policy resolved, host checked");
    let root = StateRoot::from_env()?;
    crate::prepare_state_root(&root, is_root)?;
    let sandbox = root.create_sandbox(req.name.as_deref())?;
    let result = supervise(&sandbox, &policy, workspace.as_deref(), &host, degraded, req, notify);
    if let Err(e) = &result {
        record_failure(&sandbox, e);
    }
    result
}

fn resolve_workspace(policy: &Policy, requested: Option<&Path>) -> Result<Option<PathBuf>, RunError> {
    if policy.workspace.mode == WorkspaceMode::None {
        return Ok(None);
    }
    let dir = match requested {
        Some(p) => p.to_path_buf(),
        None => std::env::current_dir().map_err(|e| RunError::WorkspaceDir(PathBuf::from("."), e))?,
    };
    let dir = dir.canonicalize().map_err(|e| RunError::WorkspaceDir(dir.clone(), e))?;
    if !dir.is_dir() {
        return Err(RunError::WorkspaceDir(dir, io::Error::from(io::ErrorKind::NotADirectory)));
    }
    if dir == Path::new("/") {
        return Err(RunError::WorkspaceIsRoot);
    }
    Ok(Some(dir))
}

/// Host uid that root inside this sandbox becomes (root only): one block of
/// 65536 ids per sandbox, picked from its name, far above ordinary users.
fn host_id_base(name: &str) -> u32 {
    let hash =
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    1_000_000_000 + ((hash % 15_000) as u32) * 65_536
}

fn supervise(
    sandbox: &SandboxDir,
    policy: &Policy,
    workspace: Option<&Path>,
    host: &HostFacts,
    degraded: Vec<String>,
    req: &RunRequest,
    notify: &mut dyn FnMut(Notice),
) -> Result<RunOutcome, RunError> {
    let _live = sandbox.lock_live()?;
    let name = sandbox.name().to_string();
    if host.is_root {
        // Searchable (not listable) by the sandbox's unprivileged root, which
        // must reach its mount points below.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(sandbox.path(), std::fs::Permissions::from_mode(0o711))
            .map_err(|e| RunError::State(sandbox.path().to_path_buf(), e))?;
    }
    let id_map = IdMap::for_current_user(host_id_base(&name));
    std::fs::write(sandbox.policy_path(), policy.to_toml())
        .map_err(|e| RunError::State(sandbox.policy_path(), e))?;

    let mut meta = SandboxMeta {
        name: name.clone(),
        created_at: now_rfc3339(),
        policy: policy.name.clone(),
        workspace: workspace.map(Path::to_path_buf),
        workspace_mode: workspace_mode_name(policy, workspace),
        command: req.command.clone(),
        state: SandboxState::Creating,
        supervisor_pid: Some(std::process::id() as i32),
        host_uid: Some(id_map.host_root_uid),
        cgroup: None,
        started_at: None,
        finished_at: None,
        exit: None,
        applied_at: None,
        degraded: degraded.clone(),
    };
    sandbox.write_meta(&meta)?;
    let mut audit = AuditLog::open(&sandbox.audit_path())?;
    audit.record(AuditEvent::Created {
        policy: policy.name.clone(),
        workspace: meta.workspace.clone(),
        workspace_mode: meta.workspace_mode.clone(),
        limits: crate::limits_json(policy),
        degraded: degraded.clone(),
    })?;

    tracing::debug!("phase: state directory ready");
    let cgroup = if host.cgroups {
        let limits = CgroupLimits {
            memory: Some(policy.limits.memory),
            pids: Some(policy.limits.pids),
            cpus: Some(policy.limits.cpus),
        };
        let cgroup_name = crate::cgroup_name(sandbox);
        let cg = SandboxCgroup::create(&cgroup_name, &limits)?;
        meta.cgroup = Some(cgroup_name);
        // Recorded at once: if this supervisor dies, gc finds the cgroup by it.
        sandbox.write_meta(&meta)?;
        Some(cg)
    } else {
        None
    };

    tracing::debug!("phase: cgroup created");
    let overlay = workspace.is_some() && policy.workspace.mode == WorkspaceMode::Overlay;
    let layer = if overlay {
        Some(WritableLayer::create(
            sandbox,
            host.disk_quota.then_some(policy.limits.disk),
            id_map.host_root_uid,
        )?)
    } else {
        None
    };
    let rootfs = sandbox.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| RunError::State(rootfs.clone(), e))?;
    let paths = SandboxPaths {
        rootfs,
        upper: layer.as_ref().map_or_else(|| sandbox.upper_dir(), |l| l.upper.clone()),
        work: layer.as_ref().map_or_else(|| sandbox.work_dir(), |l| l.work.clone()),
    };

    // As root the workspace is seen through an id-mapped mount, so that files
    // owned by host users keep their owners inside while the sandbox's root
    // stays an unprivileged host uid.
    tracing::debug!("phase: writable layer ready");
    let tree = match workspace {
        Some(ws) if host.is_root => Some(spawn::idmapped_tree(ws, &id_map)?),
        _ => None,
    };

    tracing::debug!("phase: id-mapped workspace ready");
    let network = crate::network::Network::start(policy, &name, sandbox.path(), &sandbox.audit_path())?;
    let secret_values = network.as_ref().map(|n| n.secret_values()).unwrap_or_default();
    let network_env = network.as_ref().map(|n| n.environment()).unwrap_or_default();
    let terminal = SandboxStdio::caller_has_terminal();
    let mut stdio = SandboxStdio::new(&sandbox.stdout_log(), &sandbox.stderr_log(), terminal, &secret_values)
        .map_err(|e| RunError::State(sandbox.stdout_log(), e))?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let host_env = |k: &str| std::env::var(k).ok();
    let launch = plan::launch(
        policy,
        &LaunchInput {
            name: &name,
            command: &req.command,
            workspace,
            cwd: &cwd,
            paths: &paths,
            host,
            idmapped_workspace: tree.is_some(),
            tty: terminal,
            host_env: &host_env,
            network: network.as_ref().map(|n| plan::NetworkInput {
                ports: n.ports,
                env: &network_env,
                bundle: &n.bundle,
                bundle_targets: &[crate::network::SANDBOX_CA_BUNDLE, crate::network::SYSTEM_CA_BUNDLE],
            }),
        },
    );

    let exe = std::env::current_exe().map_err(RunError::SelfExe)?;
    tracing::debug!("phase: network ready");
    let spawned = spawn::spawn(
        &SpawnRequest {
            agent_exe: &exe,
            agent_args: &["airlock-agent", crate::AGENT_ROLE],
            stdio: stdio.child_fds(),
            workspace_tree: tree.as_ref().map(|t| std::os::fd::AsFd::as_fd(t)),
            egress_channel: network.as_ref().and_then(|n| n.agent_end.as_ref()).map(std::os::fd::AsFd::as_fd),
            id_map: &id_map,
        },
        |_| Ok(()),
    )?;
    drop(tree);
    stdio.release_child_ends();
    let agent_pid = spawned.pid;
    let mut control = spawned.control;
    airlock_proto::send(&mut control, &HostMessage::Launch(Box::new(launch)))?;
    // While the agent builds the root filesystem: the cgroup write, which
    // may wait for a kernel grace period. Untrusted code waits for Proceed.
    if let Some(cg) = &cgroup
        && let Err(e) = cg.add_pid(agent_pid)
    {
        let _ = rustix::process::kill_process(pid_of(agent_pid), rustix::process::Signal::KILL);
        let _ = airlock_jail::sys::wait_pid(agent_pid);
        return Err(e.into());
    }
    tracing::debug!("phase: agent in its cgroup");
    airlock_proto::send(&mut control, &HostMessage::Proceed)?;
    let mut network = network;
    if let Some(n) = network.as_mut() {
        // The agent holds its own copy now.
        drop(n.agent_end.take());
    }

    meta.state = SandboxState::Running;
    meta.started_at = Some(now_rfc3339());
    sandbox.write_meta(&meta)?;

    // The first message says whether the sandbox came up; with a terminal,
    // its master end follows it. Bounded, so a wedged setup cannot hang us.
    let _ = control.set_read_timeout(Some(SETUP_TIMEOUT));
    tracing::debug!("phase: waiting for the agent");
    let first = airlock_proto::recv::<_, AgentMessage>(&mut control);
    if terminal && matches!(first, Ok(Some(AgentMessage::Confined { .. }))) {
        let master = airlock_proto::recv_fd(&control).map_err(RunError::Terminal)?;
        stdio.attach_terminal(master, &sandbox.stdout_log()).map_err(RunError::Terminal)?;
    }
    let _ = control.set_read_timeout(None);

    let forwarder =
        crate::signals::Forwarder::start(agent_pid, stdio.tty.as_ref().and_then(|p| p.resize_handle().ok()))
            .map_err(RunError::Signals)?;
    let (tx, rx) = mpsc::channel();
    if let Ok(Some(msg)) = first {
        let _ = tx.send(msg);
    }
    let reader = std::thread::spawn(move || {
        while let Ok(Some(msg)) = airlock_proto::recv::<_, AgentMessage>(&mut control) {
            if tx.send(msg).is_err() {
                break;
            }
        }
    });

    let started = Instant::now();
    let deadline = started + policy.limits.timeout;
    let mut ending = Ending::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(AgentMessage::Confined { landlock }) => {
                ending.confined = true;
                tracing::debug!(%landlock, "sandbox confined");
            }
            Ok(AgentMessage::Started { pid }) => {
                audit.record(AuditEvent::CommandStarted { argv: req.command.clone(), pid: Some(pid) })?;
            }
            Ok(AgentMessage::SetupFailed { step, message }) => {
                ending.setup_failed = Some(format!("{step}: {}", truncate(&message)));
            }
            Ok(AgentMessage::ExecFailed { exit_code, message }) => {
                let code = if exit_code == 126 { 126 } else { 127 };
                ending.exec_failed = Some((code, truncate(&message)));
            }
            Ok(AgentMessage::Exited { code, signal }) => {
                ending.code = code;
                ending.signal = signal;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                ending.timed_out = true;
                audit.record(AuditEvent::TimeLimitHit { limit_secs: policy.limits.timeout.as_secs() })?;
                // PID 1 dying takes the whole PID namespace with it; the
                // cgroup kill catches anything that raced out of it.
                let _ = rustix::process::kill_process(pid_of(agent_pid), rustix::process::Signal::KILL);
                if let Some(cg) = &cgroup {
                    let _ = cg.kill_all();
                }
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    tracing::debug!("phase: command ended");
    let status = airlock_jail::sys::wait_pid(agent_pid).map_err(RunError::Wait)?;
    let _ = reader.join();
    if let Some(n) = network {
        n.stop();
    }
    drop(forwarder);
    stdio.finish();
    let duration = started.elapsed();

    if !ending.confined && !ending.timed_out && ending.setup_failed.is_none() {
        ending.setup_failed = Some(format!(
            "the sandbox agent ended before confining itself (wait status {status:#x}); its messages are above"
        ));
    }
    if ending.code.is_none() && ending.signal.is_none() && !ending.timed_out {
        // The agent died without reporting: take its own status.
        if libc::WIFSIGNALED(status) {
            ending.signal = Some(libc::WTERMSIG(status));
        } else if ending.setup_failed.is_none() && ending.exec_failed.is_none() {
            ending.code = Some(libc::WEXITSTATUS(status));
        }
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

    meta.state = if ending.setup_failed.is_some() { SandboxState::Failed } else { SandboxState::Exited };
    meta.finished_at = Some(now_rfc3339());
    meta.exit =
        Some(ExitInfo { code: ending.code, signal: ending.signal, timed_out: ending.timed_out, oom_killed });
    sandbox.write_meta(&meta)?;

    if let Some(reason) = &ending.setup_failed {
        audit.record(AuditEvent::Error { stage: "setup".into(), message: reason.clone() })?;
        if let Some(layer) = layer {
            let _ = layer.discard();
        }
        return Err(RunError::SetupFailed(reason.clone()));
    }
    if let Some((_, message)) = &ending.exec_failed {
        notify(Notice::Warning(message.clone()));
    }

    let succeeded = exit_code == 0;
    let action = if succeeded { policy.cleanup.on_success } else { policy.cleanup.on_failure };
    let remove = req.remove_after || action == CleanupAction::Remove;

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
            reason: if req.remove_after {
                "--rm".into()
            } else {
                format!("cleanup rule of policy {}", policy.name)
            },
        })?;
        drop(audit);
        drop(_live);
        sandbox.remove_all()?;
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
struct Ending {
    code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    confined: bool,
    setup_failed: Option<String>,
    exec_failed: Option<(i32, String)>,
}

impl Ending {
    fn exit_code(&self) -> i32 {
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

fn pid_of(pid: i32) -> rustix::process::Pid {
    rustix::process::Pid::from_raw(pid).unwrap_or(rustix::process::Pid::INIT)
}

/// Messages from the agent are untrusted; keep what we print bounded.
fn truncate(s: &str) -> String {
    const MAX: usize = 2000;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
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

fn record_failure(sandbox: &SandboxDir, error: &RunError) {
    if let Ok(mut audit) = AuditLog::open(&sandbox.audit_path()) {
        let _ = audit.record(AuditEvent::Error { stage: "run".into(), message: error.to_string() });
    }
    if let Ok(mut meta) = sandbox.read_meta()
        && matches!(meta.state, SandboxState::Creating | SandboxState::Running)
    {
        meta.state = SandboxState::Failed;
        meta.finished_at = Some(now_rfc3339());
        let _ = sandbox.write_meta(&meta);
    }
}
