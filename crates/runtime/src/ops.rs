//! Work on sandboxes that already exist: list, diff, apply, remove, gc.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use airlock_policy::{CleanupAction, Policy, Writeback};
/// The digest of a change (as `airlock diff` shows it and `apply --expect`
/// takes it), and why an apply did not happen.
pub use airlock_workspace::{ApplyError, ChangeDigest};
use airlock_workspace::{ApplyOptions, ApplyReport, Diff};
use serde::Serialize;

use crate::audit::{AuditEvent, AuditLog};
use crate::layer;
use crate::state::{SandboxDir, SandboxMeta, SandboxState, StateRoot};
use crate::view::{Detail, SandboxView, State};
use crate::{RunError, now_rfc3339};

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Workspace(#[from] airlock_workspace::WorkspaceError),
    #[error(transparent)]
    Apply(#[from] airlock_workspace::ApplyError),
    #[error("sandbox {0} has no workspace overlay, so there is nothing to diff or apply")]
    NoOverlay(String),
    #[error(
        "sandbox {name} is still running (supervisor pid {pid}); wait for it to finish, or `airlock rm {name}` to stop it"
    )]
    StillRunning { name: String, pid: i32 },
    #[error(
        "policy {policy} of sandbox {name} forbids writing changes back (workspace.writeback = \"never\"); read them with `airlock diff {name}`"
    )]
    WritebackForbidden { name: String, policy: String },
    #[error("the stored policy of sandbox {0} cannot be read: {1}")]
    StoredPolicy(String, Box<airlock_policy::PolicyError>),
    #[error("could not stop sandbox {0}: its supervisor did not exit")]
    StopFailed(String),
}

/// Every sandbox, as `airlock ls` shows it (the one view of
/// [`crate::view`], without inspect's detail).
pub fn list(root: &StateRoot) -> Result<Vec<SandboxView>, OpError> {
    let mut out = Vec::new();
    for sandbox in root.list()? {
        let live = sandbox.is_live();
        // One whose meta.json cannot be read (one being created has none
        // yet; a crash can leave a torn one) is still listed, from what its
        // directory says: failed unless its supervisor lives; `rm` works.
        let meta = match sandbox.read_meta() {
            Ok(meta) => Some(meta),
            Err(e) => {
                if !live {
                    // The error says what to do (`airlock rm`).
                    tracing::warn!("sandbox {} is listed as failed: {e}", sandbox.name());
                }
                None
            }
        };
        let state = State::of(meta.as_ref(), live, false);
        out.push(SandboxView::of(sandbox.name(), meta.as_ref(), state));
    }
    Ok(out)
}

/// A sandbox's change, with the two trees it was computed from.
pub struct DiffView {
    pub diff: Diff,
    pub lower: PathBuf,
    pub upper: PathBuf,
}

/// `progress` hears how many entries have been examined, now and then.
pub fn diff(root: &StateRoot, name: &str, progress: &mut dyn FnMut(u64)) -> Result<DiffView, OpError> {
    let sandbox = root.open(name)?;
    let meta = sandbox.read_meta()?;
    let (lower, upper) = layers(&sandbox, &meta)?;
    let diff = airlock_workspace::compute_diff_with(&lower, &upper, progress)?;
    Ok(DiffView { diff, lower, upper })
}

fn layers(sandbox: &SandboxDir, meta: &SandboxMeta) -> Result<(PathBuf, PathBuf), OpError> {
    let Some(lower) = meta.workspace.clone().filter(|_| meta.workspace_mode == "overlay") else {
        return Err(OpError::NoOverlay(meta.name.clone()));
    };
    // While it runs the layer is still in `layer/`: as root on its tmpfs,
    // for a rootless microVM apart from the rest of the sandbox's directory.
    // (A link the guest put there is refused when it is opened.)
    let live_upper = sandbox.layer_dir().join("upper");
    let live = layer::is_mount_point(&sandbox.layer_dir()) || std::fs::symlink_metadata(&live_upper).is_ok();
    let upper = if live { live_upper } else { sandbox.upper_dir() };
    Ok((lower, upper))
}

/// A validated apply, ready to be confirmed and carried out.
pub struct PendingApply {
    sandbox: SandboxDir,
    pub view: DiffView,
    options: ApplyOptions,
}

impl PendingApply {
    /// The digest of the change [`apply`] will write: show it with the
    /// change, it is what the write is held to.
    pub fn digest(&self) -> ChangeDigest {
        self.view.diff.digest()
    }
}

/// Validates everything `apply` would do, without writing. With `expect`,
/// refuses unless the change's digest is that one (the change reviewed
/// with `airlock diff`).
pub fn prepare_apply(
    root: &StateRoot,
    name: &str,
    allow_protected: bool,
    expect: Option<ChangeDigest>,
    progress: &mut dyn FnMut(u64),
) -> Result<PendingApply, OpError> {
    let sandbox = root.open(name)?;
    let meta = sandbox.read_meta()?;
    if sandbox.is_live() {
        return Err(OpError::StillRunning { name: name.to_string(), pid: meta.supervisor_pid.unwrap_or(0) });
    }
    let policy = stored_policy(&sandbox)?;
    if policy.workspace.writeback == Writeback::Never {
        let refusal = OpError::WritebackForbidden { name: name.to_string(), policy: meta.policy };
        // A policy refusal is part of the sandbox's history.
        AuditLog::open(&sandbox.audit_path())?
            .record(AuditEvent::ApplyRefused { reason: refusal.to_string() })?;
        return Err(refusal);
    }
    let view = diff(root, name, progress)?;
    let options = ApplyOptions { allow_protected, protected: policy.workspace.protected.clone(), expect };
    if let Err(e) = airlock_workspace::check_apply(&view.diff, &view.upper, &view.lower, &options) {
        let mut audit = AuditLog::open(&sandbox.audit_path())?;
        audit.record(AuditEvent::ApplyRefused { reason: e.to_string() })?;
        return Err(e.into());
    }
    Ok(PendingApply { sandbox, view, options })
}

/// Writes exactly the change that was prepared (and shown, with its
/// digest): each file's bytes are checked against it as they are copied.
/// `progress` hears how many entries have been written or removed.
pub fn apply(pending: PendingApply, progress: &mut dyn FnMut(u64)) -> Result<ApplyReport, OpError> {
    let PendingApply { sandbox, view, mut options } = pending;
    options.expect.get_or_insert(view.diff.digest());
    let mut audit = AuditLog::open(&sandbox.audit_path())?;
    let report = match airlock_workspace::apply_with(&view.diff, &view.upper, &view.lower, &options, progress)
    {
        Ok(r) => r,
        Err(e) => {
            audit.record(AuditEvent::ApplyRefused { reason: e.to_string() })?;
            return Err(e.into());
        }
    };
    audit.record(AuditEvent::Applied {
        written: report.written.clone(),
        deleted: report.deleted.clone(),
        allow_protected: options.allow_protected,
        by_uid: rustix::process::getuid().as_raw(),
        digest: report.digest.map(|d| d.to_string()),
    })?;
    let mut meta = sandbox.read_meta()?;
    meta.applied_at = Some(now_rfc3339());
    sandbox.write_meta(&meta)?;
    Ok(report)
}

fn stored_policy(sandbox: &SandboxDir) -> Result<Policy, OpError> {
    Policy::load_file(&sandbox.policy_path())
        .map_err(|e| OpError::StoredPolicy(sandbox.name().to_string(), Box::new(e)))
}

/// Removes a sandbox, stopping it first if it still runs.
pub fn remove(root: &StateRoot, name: &str) -> Result<(), OpError> {
    let sandbox = root.open(name)?;
    if sandbox.is_live() {
        stop_sandbox(&sandbox)?;
    }
    release_leftovers(&sandbox, false);
    if let Ok(mut audit) = AuditLog::open(&sandbox.audit_path()) {
        let _ = audit.record(AuditEvent::Removed { reason: "airlock rm".into() });
    }
    // Unreadable metadata: the registry is searched for the directory.
    let id_block = sandbox.read_meta().ok().and_then(|m| m.id_block);
    crate::lifecycle::remove_sandbox_dir(&sandbox, id_block)?;
    Ok(())
}

/// How long a stopping supervisor may take to finalize (persist the layer,
/// capture artifacts, unmount) after its processes' grace period, before
/// it is killed.
const FINALIZE_WAIT: Duration = Duration::from_secs(60);

/// The one stop of every front end (`airlock stop` and `rm`, with or without
/// a daemon, the API's stop and destroy). Returns once the sandbox is
/// finalized: state `stopped`, layer persisted, mounts gone. A sandbox that
/// is not running is left as it is.
pub fn stop(root: &StateRoot, name: &str) -> Result<(), OpError> {
    let sandbox = root.open(name)?;
    if sandbox.is_live() {
        stop_sandbox(&sandbox)?;
    }
    Ok(())
}

/// A long-lived sandbox's supervisor is asked to stop: it sends SIGTERM to
/// every exec's process group, waits the policy's `limits.stop_grace`,
/// kills what is left, records `stopped` and finalizes. One that does not
/// finish by then — or a foreground `airlock run` — has its supervisor
/// killed, and its agent dies with it (parent-death signal), the PID
/// namespace with the agent.
fn stop_sandbox(sandbox: &SandboxDir) -> Result<(), OpError> {
    let grace = stored_policy(sandbox).map_or(airlock_policy::DEFAULT_STOP_GRACE, |p| p.limits.stop_grace);
    if let Ok(client) = crate::supervisor::SupervisorClient::connect(sandbox)
        && client.stop().is_ok()
        && wait_not_live(sandbox, grace + FINALIZE_WAIT)
    {
        return Ok(());
    }
    let meta = sandbox.read_meta()?;
    if let Some(pid) = meta.supervisor_pid.and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
    if let Some(cg) = sandbox_cgroup(sandbox) {
        let _ = cg.kill_all();
    }
    if wait_not_live(sandbox, Duration::from_secs(5)) {
        Ok(())
    } else {
        Err(OpError::StopFailed(sandbox.name().to_string()))
    }
}

fn wait_not_live(sandbox: &SandboxDir, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while sandbox.is_live() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// What a running sandbox uses now, from its cgroup: memory in bytes and
/// CPU time in microseconds since it started (cgroup v2's `memory.current`
/// and `cpu.stat`, or v1's `memory.usage_in_bytes` and `cpuacct.usage`).
/// `None` for a sandbox without a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub memory_bytes: u64,
    pub cpu_usec: u64,
}

pub fn usage(sandbox: &SandboxDir) -> Option<Usage> {
    let cgroup = sandbox_cgroup(sandbox)?;
    let read =
        |file: &str| cgroup.paths().iter().find_map(|dir| std::fs::read_to_string(dir.join(file)).ok());
    let number = |text: Option<String>| text.and_then(|t| t.trim().parse::<u64>().ok());
    let memory_bytes = number(read("memory.current")).or_else(|| number(read("memory.usage_in_bytes")))?;
    let cpu_usec = read("cpu.stat")
        .and_then(|t| {
            t.lines().find_map(|l| l.strip_prefix("usage_usec ").and_then(|v| v.trim().parse().ok()))
        })
        .or_else(|| number(read("cpuacct.usage")).map(|ns| ns / 1000))
        .unwrap_or(0);
    Some(Usage { memory_bytes, cpu_usec })
}

fn sandbox_cgroup(sandbox: &SandboxDir) -> Option<airlock_jail::cgroup::SandboxCgroup> {
    airlock_jail::cgroup::SandboxCgroup::open(&crate::cgroup_name(sandbox))
}

/// What a dead supervisor may have left: the cgroup and the layer tmpfs
/// (the layer is persisted first when `keep_layer`, so a review is still
/// possible), and a container engine's disk and socket (the disk holds
/// nothing once its guest is gone, the socket leads nowhere).
fn release_leftovers(sandbox: &SandboxDir, keep_layer: bool) -> Vec<String> {
    let mut done = Vec::new();
    for file in [crate::containers::DISK, crate::containers::SOCKET] {
        let path = sandbox.path().join(file);
        if std::fs::remove_file(&path).is_ok() {
            done.push(format!("file {}", path.display()));
        }
    }
    if let Some(cg) = sandbox_cgroup(sandbox)
        && cg.remove().is_ok()
    {
        done.push(format!("cgroup {}", cg.name()));
    }
    let layer_dir = sandbox.layer_dir();
    if layer::is_mount_point(&layer_dir) {
        if keep_layer {
            let _ = airlock_workspace::persist_layer(&layer_dir.join("upper"), &sandbox.upper_dir());
        }
        if layer::release(&layer_dir).is_ok() {
            done.push(format!("mount {}", layer_dir.display()));
        }
    }
    done
}

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    /// Sandboxes whose supervisor died, now marked failed.
    pub lost: Vec<String>,
    /// Sandboxes removed per their policy's cleanup rule.
    pub removed: Vec<String>,
    /// Kernel objects released (cgroups, mounts).
    pub released: Vec<String>,
}

/// Finds sandboxes whose supervisor died (SIGKILL, crash, reboot), releases
/// what they left in the kernel, records it, and applies the cleanup rule.
pub fn gc(root: &StateRoot) -> Result<GcReport, OpError> {
    let mut report = GcReport::default();
    let mut known = Vec::new();
    for sandbox in root.list()? {
        known.push(crate::cgroup_name(&sandbox));
        if sandbox.is_live() {
            continue;
        }
        let Ok(mut meta) = sandbox.read_meta() else { continue };
        if !matches!(meta.state, SandboxState::Creating | SandboxState::Running) {
            report.released.extend(release_leftovers(&sandbox, true));
            continue;
        }
        report.released.extend(release_leftovers(&sandbox, true));
        let mut audit = AuditLog::open(&sandbox.audit_path())?;
        audit.record(AuditEvent::SupervisorLost {
            detail: format!(
                "supervisor pid {} is gone; the sandbox's processes died with it",
                meta.supervisor_pid.unwrap_or(0)
            ),
        })?;
        meta.state = SandboxState::Failed;
        meta.finished_at = Some(now_rfc3339());
        sandbox.write_meta(&meta)?;
        report.lost.push(meta.name.clone());
        let remove = stored_policy(&sandbox).is_ok_and(|p| p.cleanup.on_failure == CleanupAction::Remove);
        if remove {
            audit.record(AuditEvent::Removed { reason: "gc: cleanup rule for failed sandboxes".into() })?;
            drop(audit);
            crate::lifecycle::remove_sandbox_dir(&sandbox, meta.id_block)?;
            report.removed.push(meta.name.clone());
        }
    }
    // Id blocks whose sandbox directory is gone, in any state root (the
    // registry is host-wide; a block is stale only once its directory is).
    if rustix::process::geteuid().is_root() {
        match crate::idblocks::Registry::host().and_then(|r| r.reclaim_stale()) {
            Ok(freed) => report.released.extend(
                freed.into_iter().map(|(block, dir)| format!("id block {block} of {}", dir.display())),
            ),
            Err(e) => tracing::warn!(error = %e, "could not reclaim stale host id blocks"),
        }
    }
    // Cgroups whose sandbox directory is gone: only those that were made
    // for this state root (the name's hash says so; the cgroup parent is
    // shared by every state root on the host, and another one may be
    // creating a cgroup right now), and only empty ones.
    for name in airlock_jail::cgroup::SandboxCgroup::list() {
        if !known.contains(&name)
            && ours(root, &name)
            && let Some(cg) = airlock_jail::cgroup::SandboxCgroup::open(&name)
            && cg.pids().is_empty()
            && cg.remove().is_ok()
        {
            report.released.push(format!("cgroup {name}"));
        }
    }
    // microVMs whose supervisor died: QEMU and its run directory.
    report.released.extend(crate::microvm::reap_orphaned_vms());
    Ok(report)
}

/// Whether cgroup `name` (`<sandbox>-<hash>`) was made for a sandbox of
/// this state root.
fn ours(root: &StateRoot, name: &str) -> bool {
    let Some((sandbox, _)) = name.rsplit_once('-') else { return false };
    // Names cut short in the cgroup name cannot be told apart: leave them.
    sandbox.len() < 48 && crate::cgroup_name_at(&root.path().join(sandbox), sandbox) == name
}

/// The workspace a sandbox was created for (for messages).
pub fn workspace_of(root: &StateRoot, name: &str) -> Option<PathBuf> {
    root.open(name).ok()?.read_meta().ok()?.workspace
}

/// One line of `airlock net log`.
#[derive(Debug, Clone, Serialize)]
pub struct NetLogEntry {
    pub ts: String,
    #[serde(flatten)]
    pub event: airlock_egress::NetEvent,
}

/// Every egress decision recorded for a sandbox, oldest first.
pub fn net_log(root: &StateRoot, name: &str) -> Result<Vec<NetLogEntry>, OpError> {
    let sandbox = root.open(name)?;
    Ok(network_events(AuditLog::read_all(&sandbox.audit_path())?))
}

/// The egress decisions among audit records, oldest first: `net_log` of a
/// log read here, or of one a daemon sent (`GET …/audit`).
pub fn network_events(records: impl IntoIterator<Item = crate::audit::AuditRecord>) -> Vec<NetLogEntry> {
    records
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::Network(event) => Some(NetLogEntry { ts: r.ts, event }),
            _ => None,
        })
        .collect()
}

/// Every record of a sandbox's audit log, oldest first, with its line and
/// its exact text: the timeline `airlock audit` shows.
pub fn audit_entries(root: &StateRoot, name: &str) -> Result<Vec<crate::audit::Entry>, OpError> {
    let sandbox = root.open(name)?;
    Ok(AuditLog::read_entries(&sandbox.audit_path())?)
}

/// Checks a sandbox's audit log: its chain, the head beside it, and
/// `recorded`, the head the daemon's index holds for it (when a daemon
/// owns the sandbox and its index can be read).
pub fn verify_audit(
    root: &StateRoot,
    name: &str,
    recorded: Option<crate::audit::chain::Head>,
) -> Result<crate::audit::chain::ChainReport, OpError> {
    use crate::audit::chain::{Anchor, AnchorSource};
    let sandbox = root.open(name)?;
    let anchors: Vec<Anchor> =
        recorded.map(|head| Anchor { head, source: AnchorSource::DaemonIndex }).into_iter().collect();
    Ok(AuditLog::verify(&sandbox.audit_path(), &anchors)?)
}

/// Everything known about one sandbox, for `airlock inspect`: the view
/// with inspect's detail.
pub fn inspect(root: &StateRoot, name: &str) -> Result<SandboxView, OpError> {
    let sandbox = root.open(name)?;
    let meta = sandbox.read_meta()?;
    let live = sandbox.is_live();
    let state = State::of(Some(&meta), live, false);
    let mut view = SandboxView::of(sandbox.name(), Some(&meta), state);
    view.detail = Some(Detail::read(&sandbox, Some(&meta), state.0, live).0);
    Ok(view)
}

/// The sandbox's captured output: (stdout log, stderr log).
pub fn log_paths(root: &StateRoot, name: &str) -> Result<(PathBuf, PathBuf), OpError> {
    let sandbox = root.open(name)?;
    Ok((sandbox.stdout_log(), sandbox.stderr_log()))
}
