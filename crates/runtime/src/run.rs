//! `airlock run`: one sandbox, one command, in-process, no daemon.
//!
//! resolve policy → check the host → create the state dir → cgroup and
//! writable layer → spawn the agent → stream output, forward signals,
//! enforce the deadline → finalize (layer, diff summary, artifacts, audit)
//! → clean up per policy → the command's exit code.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use airlock_policy::{Overrides, Policy, WorkspaceMode};
use airlock_proto::AgentMessage;
use airlock_proto::window::{STDIN_WINDOW, Take, Window};

use crate::audit::{AuditEvent, AuditLog};
use crate::lifecycle::{Ending, LaunchSpec, Launched, Remains, finalize, launch_sandbox, step_done};
use crate::plan;
use crate::state::{LiveLock, SandboxDir, SandboxState, StateRoot};
use crate::stdio::SandboxStdio;
use crate::{RunError, now_rfc3339};
use airlock_jail::probe::{self, HostReport};

/// What the caller asked for.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    pub policy: String,
    pub overrides: Overrides,
    pub workspace: Option<PathBuf>,
    pub name: Option<String>,
    pub remove_after: bool,
    pub command: Vec<String>,
    /// `--user UID[:GID]`: who the command runs as, over the image's
    /// `User`; None: the image's, else root inside.
    pub user: Option<String>,
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
    if req.command.is_empty() && req.overrides.image.is_none() {
        return Err(RunError::NoCommand);
    }
    let checked = check(&req.policy, &req.overrides, req.workspace.as_deref(), notify)?;
    tracing::debug!("phase: start: policy resolved, host checked");
    if let Some(name) = &req.name {
        crate::state::check_name_owner(name, rustix::process::getuid().as_raw())?;
    }
    let root = StateRoot::from_env()?;
    crate::prepare_state_root(&root, checked.host.running_as_root)?;
    if let Some(user) = &req.user {
        crate::image::check_user(user)?;
    }
    let image = crate::image::resolve_for(&root, &checked.policy)?;
    let user = crate::image::run_as(req.user.as_deref(), image.as_ref())?;
    // The image's own command (Entrypoint, then Cmd) when the caller gives
    // none; a command given replaces both.
    let with_image_command;
    let req = match &image {
        Some(image) if req.command.is_empty() => {
            with_image_command = RunRequest { command: image.command(), ..req.clone() };
            &with_image_command
        }
        _ => req,
    };
    if req.command.is_empty() {
        return Err(RunError::NoCommand);
    }
    let sandbox = root.create_sandbox(req.name.as_deref())?;
    let sandbox = if req.remove_after { sandbox.removed_when_it_ends() } else { sandbox };
    // Held until a failure is recorded: whoever waits for it to go sees
    // the sandbox's final state.
    let mut live = None;
    let result = supervise(&sandbox, checked, req, image.as_ref(), user.as_deref(), &mut live, notify);
    if let Err(e) = &result {
        record_failure(&sandbox, e);
    }
    drop(live);
    result
}

/// Said whenever a sandbox gets the workspace in mode rw, on either tier.
const RW_WARNING: &str =
    "workspace mode rw: the sandbox writes straight into the host directory, with no review";

/// A request checked against the policy and the host, before anything exists.
pub(crate) struct Checked {
    pub policy: Policy,
    pub workspace: Option<PathBuf>,
    pub host: HostReport,
    pub degraded: Vec<String>,
}

/// Resolves the policy with the caller's overrides, the workspace, and what
/// the host can enforce; refuses what the policy would not run weaker.
pub(crate) fn check(
    policy: &str,
    overrides: &Overrides,
    workspace: Option<&Path>,
    notify: &mut dyn FnMut(Notice),
) -> Result<Checked, RunError> {
    let policy = Policy::resolve(policy)?.apply_overrides(overrides)?;
    crate::containers::check(&policy, policy.image.reference.is_some())?;
    if let Some(required_by) = &policy.isolation.weaker_tier_than {
        notify(Notice::Warning(format!(
            "policy {} runs on the process tier, sharing the host's kernel, although {required_by}, which it \
             extends, requires the microvm tier",
            policy.name
        )));
    }
    if policy.isolation.tier == airlock_policy::Tier::Microvm {
        // The guest has its own kernel: none of the host's jail features
        // apply (an overlay's layer without root is `check`'s to say).
        let host = probe::probe_host(probe::Depth::Launch);
        let workspace = resolve_workspace(&policy, workspace)?;
        if policy.workspace.mode == WorkspaceMode::Rw && workspace.is_some() {
            notify(Notice::Warning(RW_WARNING.into()));
        }
        let degraded = crate::microvm::check(&policy, workspace.as_deref(), &host, notify)?;
        return Ok(Checked { policy, workspace, host, degraded });
    }
    let workspace = resolve_workspace(&policy, workspace)?;
    if let Some(repo) = workspace.as_deref().and_then(git_dir_outside) {
        notify(Notice::Warning(format!(
            "the workspace's git repository is outside it ({}, named by .git): only the workspace is \
             visible inside, so git there will find no repository; for git inside, make the \
             repository's main checkout the workspace",
            repo.display()
        )));
    }
    if policy.workspace.mode == WorkspaceMode::Rw && workspace.is_some() {
        notify(Notice::Warning(RW_WARNING.into()));
    }
    // The same report `airlock doctor` prints, without its trials.
    let host = probe::probe_host(probe::Depth::Launch);
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
    Ok(Checked { policy, workspace, host, degraded })
}

/// Where the workspace's git directory is, when that is outside the
/// workspace: `.git` as a symlink, or as a file naming a `gitdir:` elsewhere
/// (a worktree, a submodule). Agents work in worktrees often; inside the
/// sandbox such a repository is missing and git says only "not a git
/// repository". Reads the user's own directory, before anything runs.
fn git_dir_outside(workspace: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let dot_git = workspace.join(".git");
    let kind = std::fs::symlink_metadata(&dot_git).ok()?.file_type();
    let named = if kind.is_symlink() {
        std::fs::read_link(&dot_git).ok()?
    } else if kind.is_file() {
        let mut text = String::new();
        std::fs::File::open(&dot_git).ok()?.take(4096).read_to_string(&mut text).ok()?;
        PathBuf::from(text.lines().find_map(|l| l.strip_prefix("gitdir:"))?.trim())
    } else {
        return None;
    };
    let named = workspace.join(named);
    // A gitdir that does not exist (any more) is still outside or not.
    let resolved = named.canonicalize().unwrap_or_else(|_| lexically_normal(&named));
    (!resolved.starts_with(workspace)).then_some(resolved)
}

/// `path` with `.` and `..` resolved by name alone.
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
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

fn supervise(
    sandbox: &SandboxDir,
    checked: Checked,
    req: &RunRequest,
    image: Option<&crate::image::ResolvedImage>,
    user: Option<&str>,
    live: &mut Option<LiveLock>,
    notify: &mut dyn FnMut(Notice),
) -> Result<RunOutcome, RunError> {
    let Checked { policy, workspace, host, degraded } = checked;
    let (policy, workspace, host) = (&policy, workspace.as_deref(), &host);
    *live = Some(sandbox.lock_live()?);
    let microvm = policy.isolation.tier == airlock_policy::Tier::Microvm;
    // At a terminal the command gets one of its own, on either tier.
    let terminal = SandboxStdio::caller_has_terminal();
    // A microVM's time limit covers its boot.
    let launch_started = Instant::now();
    // From here on, an error returned early drops `held`, which ends the
    // sandbox and releases its cgroup, layer and id block at once.
    let launched = launch_sandbox(LaunchSpec {
        sandbox,
        policy,
        workspace,
        host,
        degraded,
        command: &req.command,
        terminal,
        workspace_owner: None,
        image,
        user,
    })?;
    if microvm {
        let vm = VmRun { terminal, started: launch_started };
        return supervise_vm(sandbox, policy, workspace, req, launched, vm, live, notify);
    }
    let Launched {
        name,
        meta,
        mut audit,
        mut held,
        secret_values,
        mut stdio,
        logs: _,
        agent_pid,
        mut control,
        agent_serving: _,
        exec_env: _,
        exec_cwd: _,
        exec_user: _,
        guest_ports: _,
    } = launched;

    // The first message says whether the sandbox came up; with a terminal,
    // its master end follows it. Bounded, so a wedged setup cannot hang us.
    let _ = control.set_read_timeout(Some(SETUP_TIMEOUT));
    tracing::debug!("phase: waiting for the agent");
    let first = airlock_proto::recv::<_, AgentMessage>(&mut control);
    if matches!(first, Ok(Some(AgentMessage::Confined { exec_trace: true, .. }))) {
        crate::lifecycle::take_exec_listener(&control, &mut held)?;
    }
    if terminal && matches!(first, Ok(Some(AgentMessage::Confined { .. }))) {
        let master = airlock_proto::recv_fd(&control).map_err(RunError::Terminal)?;
        stdio.attach_terminal(master).map_err(RunError::Terminal)?;
    }
    let _ = control.set_read_timeout(None);
    step_done("attached")?;

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
            Ok(AgentMessage::Confined { landlock, .. }) => {
                ending.confined = true;
                tracing::debug!(%landlock, "sandbox confined");
            }
            Ok(AgentMessage::Started { pid }) => {
                audit.record(AuditEvent::CommandStarted { argv: req.command.clone(), pid: Some(pid) })?;
                step_done("relaying")?;
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
                held.kill_all();
                break;
            }
            // Service-mode messages never come for a one-shot command.
            Ok(
                AgentMessage::Serving
                | AgentMessage::ExecStarted { .. }
                | AgentMessage::ExecOutput { .. }
                | AgentMessage::ExecRefused { .. }
                | AgentMessage::ExecEnded { .. }
                | AgentMessage::StdinAck { .. }
                | AgentMessage::File { .. }
                | AgentMessage::ProcessesEnded,
            ) => {}
            // The process tier's trace is its host's own listener; an agent
            // inside the sandbox has no say in it.
            Ok(AgentMessage::ExecTrace { .. }) => {
                tracing::debug!("ignored an exec trace record from the agent")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    tracing::debug!("phase: command ended");
    let status = airlock_jail::sys::wait_pid(agent_pid).map_err(RunError::Wait)?;
    held.agent_reaped();
    let _ = reader.join();
    drop(forwarder);
    let duration = started.elapsed();
    step_done("reaped")?;

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
    finalize(
        sandbox,
        policy,
        workspace,
        Remains { name, meta, audit, held, stdio, secret_values, final_state: SandboxState::Exited },
        ending,
        duration,
        if req.remove_after { Some(true) } else { None },
        live,
        notify,
    )
}

/// Asks the guest's agent to kill every process left in the guest, and
/// records the guest's trace until its answer (which follows the records
/// of those ends) or [`crate::exec_trace::GUEST_LAST_ENDS`].
fn end_guest_processes(
    writer: &std::sync::Mutex<std::os::unix::net::UnixStream>,
    rx: &mpsc::Receiver<AgentMessage>,
    audit: &mut AuditLog,
) -> Result<(), RunError> {
    let sent = writer
        .lock()
        .is_ok_and(|mut w| airlock_proto::send(&mut *w, &airlock_proto::HostMessage::EndProcesses).is_ok());
    if !sent {
        return Ok(());
    }
    let until = Instant::now() + crate::exec_trace::GUEST_LAST_ENDS;
    loop {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(AgentMessage::ExecTrace { trace }) => audit.record(crate::exec_trace::guest_event(trace))?,
            Ok(AgentMessage::ProcessesEnded) => return Ok(()),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!("the guest did not answer for the end of its processes: {e}");
                return Ok(());
            }
        }
    }
}

/// How `airlock run` runs its command in a guest.
struct VmRun {
    /// The caller sits at a terminal: the command gets one in the guest.
    terminal: bool,
    /// When the launch began: the time limit covers the boot.
    started: Instant,
}

/// `airlock run`'s command on the microVM tier, launched by the same
/// lifecycle: it runs as exec 1 of the guest's agent, its output written to
/// the stdio's sandbox ends (so it reaches the caller and the logs as the
/// process tier's does), stdin and signals passed on over the channel, the
/// time limit (boot included) enforced here; then the same finalize. At a
/// terminal, the agent gives the command a terminal of the caller's size
/// in the guest, the caller's is in raw mode until the run ends (as for the
/// process tier's relayed terminal), and size changes follow it. A guest
/// that ends by itself (a panic, a power-off) fails the run with the
/// reason.
#[allow(clippy::too_many_arguments)]
fn supervise_vm(
    sandbox: &SandboxDir,
    policy: &Policy,
    workspace: Option<&Path>,
    req: &RunRequest,
    launched: Launched,
    VmRun { terminal, started }: VmRun,
    live: &mut Option<LiveLock>,
    notify: &mut dyn FnMut(Notice),
) -> Result<RunOutcome, RunError> {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};

    use airlock_proto::{ExecRequest, HostMessage, Stream};

    const ID: u32 = 1;
    let Launched {
        name,
        meta,
        mut audit,
        mut held,
        secret_values,
        mut stdio,
        mut control,
        exec_env,
        exec_cwd,
        exec_user,
        ..
    } = launched;
    let channel_error = |e: io::Error| RunError::State(sandbox.path().to_path_buf(), e);
    let tty = terminal.then(|| stdio.attach_guest_terminal());
    let request = ExecRequest {
        id: ID,
        argv: req.command.clone(),
        env: crate::plan::base_env_for(&exec_env, exec_user.as_deref()).cloned().collect(),
        cwd: exec_cwd,
        tty,
        user: exec_user,
    };
    let writer = Arc::new(Mutex::new(control.try_clone().map_err(channel_error)?));
    if let Ok(mut w) = writer.lock() {
        airlock_proto::send(&mut *w, &HostMessage::Exec(Box::new(request)))?;
    }
    // stdin from a thread of its own (not joined: it may block on a
    // terminal); its end closes the command's. Each chunk takes a credit of
    // the exec's window, given back by the agent's StdinAck: a command that
    // does not read its input holds up only this thread.
    let window = Arc::new(Window::new(STDIN_WINDOW));
    let input = writer.clone();
    let credit = window.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut stdin = io::stdin().lock();
        loop {
            let data = match stdin.read(&mut buf) {
                Ok(n) => buf[..n].to_vec(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => Vec::new(),
            };
            let done = data.is_empty();
            // The end of input (empty) takes no credit, as the supervisor's.
            if !done && !take_credit(&credit) {
                return;
            }
            let sent = input.lock().is_ok_and(|mut w| {
                airlock_proto::send(&mut *w, &HostMessage::Stdin { id: ID, data }).is_ok()
            });
            if !sent || done {
                return;
            }
        }
    });
    let resize = tty.map(|_| -> Box<dyn Fn() + Send> {
        let resizes = writer.clone();
        Box::new(move || {
            if let Some((rows, cols)) = crate::stdio::caller_window_size()
                && let Ok(mut w) = resizes.lock()
            {
                let _ = airlock_proto::send(&mut *w, &HostMessage::Resize { id: ID, rows, cols });
            }
        })
    });
    let signals = writer.clone();
    let forwarder = crate::signals::Forwarder::start_with(resize, move |signal| {
        if let Ok(mut w) = signals.lock() {
            let _ = airlock_proto::send(&mut *w, &HostMessage::Signal { id: ID, signal });
        }
    })
    .map_err(RunError::Signals)?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        while let Ok(Some(msg)) = airlock_proto::recv::<_, AgentMessage>(&mut control) {
            match &msg {
                AgentMessage::StdinAck { id: ID } => window.give_back(),
                AgentMessage::ExecEnded { id: ID, .. } | AgentMessage::ExecRefused { id: ID, .. } => {
                    window.close()
                }
                _ => {}
            }
            if tx.send(msg).is_err() {
                break;
            }
        }
        // The guest is gone: its input goes nowhere.
        window.close();
    });
    let [_, out, err] = stdio.child_fds();
    let mut out = std::fs::File::from(out.try_clone_to_owned().map_err(channel_error)?);
    let mut err = std::fs::File::from(err.try_clone_to_owned().map_err(channel_error)?);

    let deadline = started + policy.limits.timeout;
    // The guest's own kernel confines it.
    let mut ending = Ending { confined: true, ..Ending::default() };
    let mut guest_failure = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(AgentMessage::ExecStarted { id: ID, pid }) => {
                audit.record(AuditEvent::CommandStarted { argv: req.command.clone(), pid: Some(pid) })?;
                step_done("relaying")?;
            }
            Ok(AgentMessage::ExecOutput { id: ID, stream, data }) => {
                let target = match stream {
                    Stream::Stdout => &mut out,
                    Stream::Stderr => &mut err,
                };
                // A reader that went away (`| head`) stops the output, not the run.
                let _ = target.write_all(&data);
            }
            Ok(AgentMessage::ExecRefused { id: ID, exit_code, message }) => {
                ending.exec_failed = Some((exit_code, truncate(&message)));
                break;
            }
            Ok(AgentMessage::ExecEnded { id: ID, code, signal }) => {
                ending.code = code;
                ending.signal = signal;
                break;
            }
            Ok(AgentMessage::ExecTrace { trace }) => audit.record(crate::exec_trace::guest_event(trace))?,
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                ending.timed_out = true;
                audit.record(AuditEvent::TimeLimitHit { limit_secs: policy.limits.timeout.as_secs() })?;
                held.kill_all();
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                guest_failure = held.vm_ended("while the command ran");
                break;
            }
        }
    }
    drop((out, err));
    drop(forwarder);
    // What the command left running in the guest (a background job) ends
    // now, as a process-tier sandbox's does with its agent, and the
    // trace's records of those ends come before the guest's answer.
    if !ending.timed_out && guest_failure.is_none() {
        end_guest_processes(&writer, &rx, &mut audit)?;
    }
    // The guest served its one command: QEMU goes, and the channel with it.
    held.kill_all();
    let _ = held.reap_agent();
    let _ = reader.join();
    // What the guest's trace sent after the command's end (a background
    // job's last records) until QEMU went.
    for msg in rx.try_iter() {
        if let AgentMessage::ExecTrace { trace } = msg {
            audit.record(crate::exec_trace::guest_event(trace))?;
        }
    }
    step_done("reaped")?;
    if let Some(failure) = guest_failure {
        // Recorded (failed, with the reason) by the caller.
        return Err(failure.into());
    }
    finalize(
        sandbox,
        policy,
        workspace,
        Remains { name, meta, audit, held, stdio, secret_values, final_state: SandboxState::Exited },
        ending,
        started.elapsed(),
        if req.remove_after { Some(true) } else { None },
        live,
        notify,
    )
}

/// Waits for a credit of the command's stdin window: false once the exec
/// (or the guest) has ended.
fn take_credit(window: &Window) -> bool {
    loop {
        match window.take(Duration::from_secs(1)) {
            Take::Taken => return true,
            Take::Closed => return false,
            Take::TimedOut => {}
        }
    }
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

pub(crate) fn record_failure(sandbox: &SandboxDir, error: &RunError) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_git_directory_outside_the_workspace_is_found() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let main_git = root.join("main/.git");
        std::fs::create_dir_all(main_git.join("worktrees/wt")).unwrap();
        let plain = root.join("main");
        assert_eq!(git_dir_outside(&plain), None, "a repository's own checkout");

        let worktree = root.join("wt");
        std::fs::create_dir(&worktree).unwrap();
        std::fs::write(
            worktree.join(".git"),
            format!("gitdir: {}\n", main_git.join("worktrees/wt").display()),
        )
        .unwrap();
        assert_eq!(git_dir_outside(&worktree), Some(main_git.join("worktrees/wt")));

        // Relative, as submodules write it; and a symlink.
        let sub = root.join("main/sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join(".git"), "gitdir: ../.git/modules/sub\n").unwrap();
        assert_eq!(git_dir_outside(&sub), Some(main_git.join("modules/sub")), "missing gitdir");
        std::fs::create_dir_all(main_git.join("modules/sub")).unwrap();
        assert_eq!(git_dir_outside(&sub), Some(main_git.join("modules/sub")));
        let linked = root.join("linked");
        std::fs::create_dir(&linked).unwrap();
        std::os::unix::fs::symlink(&main_git, linked.join(".git")).unwrap();
        assert_eq!(git_dir_outside(&linked), Some(main_git.clone()));

        // Inside the workspace, or no repository at all: nothing to say.
        let inside = root.join("inside");
        std::fs::create_dir_all(inside.join("gitdir")).unwrap();
        std::fs::write(inside.join(".git"), "gitdir: gitdir\n").unwrap();
        assert_eq!(git_dir_outside(&inside), None);
        assert_eq!(git_dir_outside(&root), None);
    }
}
