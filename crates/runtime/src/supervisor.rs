//! Long-lived sandboxes: one small supervisor process per sandbox.
//!
//! The supervisor owns its sandbox for its whole life, not the daemon: it
//! starts it (the same launch as `airlock run`, with the agent in service
//! mode), serves requests on `<state>/<name>/supervisor.sock` (exec, stop,
//! extend, status), enforces the deadline and the idle timeout, and
//! finalizes the sandbox when it stops. It is detached (its own session,
//! reparented to init), so the daemon can die and restart while sandboxes
//! keep running and their deadlines keep firing.
//!
//! Threads: the main one waits for the next reason to stop; one reads the
//! agent's messages and routes exec events to the connection that asked;
//! one accepts client connections, each served on its own thread.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_policy::{Overrides, Policy};
use airlock_proto::file::{FileOp, FileReply};
use airlock_proto::supervisor::{ExecEvent, ExecSpec, Reply, Request};
use airlock_proto::window::{STDIN_WINDOW, Take, Window};
use airlock_proto::{AgentMessage, ExecRequest, HostMessage, Stream};
use serde::{Deserialize, Serialize};

use crate::RunError;
use crate::audit::{AuditEvent, AuditLog};
use crate::create_failure::{CreateFailure, Report};
use crate::file_relay::{FileRoutes, Relay, route_file_reply};
use crate::lifecycle::{Ending, LaunchSpec, Launched, Remains, finalize, launch_sandbox, step_done};
use crate::ports::PortAccess;
use crate::run::Notice;
use crate::state::{SandboxDir, SandboxState, StateRoot};

/// argv[1] of the supervisor role.
pub const SUPERVISOR_ROLE: &str = "__supervise";
/// The descriptor on which the supervisor reports, in one JSON line, that
/// the sandbox runs or why it could not ([`Report`]).
const READY_FD: i32 = 3;
/// The socket clients reach the supervisor on, inside the sandbox's state dir.
pub const SOCKET: &str = "supervisor.sock";

/// What a client asks for when creating a long-lived sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateRequest {
    pub name: Option<String>,
    pub policy: String,
    #[serde(skip)]
    pub overrides: Overrides,
    pub workspace: Option<PathBuf>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub idle_timeout: Option<Duration>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Who the sandbox is for; the caller's uid when None. The daemon sets
    /// the uid of the client it serves.
    #[serde(default)]
    pub owner_uid: Option<u32>,
    /// Ports to publish (`-p`): host listeners relayed to ports inside.
    #[serde(default)]
    pub ports: Vec<crate::ports::PortMapping>,
    /// `--user UID[:GID]`: who execs that name no user run as, over the
    /// image's `User`; None: the image's, else root inside.
    #[serde(default)]
    pub user: Option<String>,
}

/// The wire form of a request to the supervisor process (overrides are not
/// serializable as a whole; their parts are).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spec {
    request: CreateRequest,
    timeout: Option<Duration>,
    memory: Option<u64>,
    pids: Option<u64>,
    cpus: Option<f64>,
    env: Vec<(String, String)>,
    workspace_mode: Option<String>,
    allow: Vec<String>,
    #[serde(default)]
    tier: Option<airlock_policy::Tier>,
    owner_uid: u32,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    containers: bool,
}

pub struct Created {
    pub name: String,
}

/// Starts a detached supervisor for a new sandbox and waits until the
/// sandbox runs (or says why it could not).
pub fn create(root: &StateRoot, req: &CreateRequest) -> Result<Created, RunError> {
    // Validate here, so that a bad request fails fast with the real error.
    let owner_uid = req.owner_uid.unwrap_or_else(|| rustix::process::getuid().as_raw());
    if let Some(name) = &req.name {
        crate::state::check_name_owner(name, owner_uid)?;
    }
    let policy = Policy::resolve(&req.policy)?.apply_overrides(&req.overrides)?;
    crate::ports::check(&req.ports, &policy)?;
    crate::containers::check(&policy, policy.image.reference.is_some())?;
    if let Some(user) = &req.user {
        crate::image::check_user(user)?;
    }
    // The image's rules fail the create here, before a supervisor starts.
    if let Some(reference) = &policy.image.reference {
        crate::image::check(&policy, reference)?;
    }
    drop(policy);
    let o = &req.overrides;
    let spec = Spec {
        request: req.clone(),
        timeout: o.timeout,
        memory: o.memory,
        pids: o.pids,
        cpus: o.cpus,
        env: o.env.iter().cloned().chain(req.env.iter().cloned()).collect(),
        workspace_mode: o.workspace_mode.map(|m| m.to_string()),
        allow: o.allow.clone(),
        tier: o.tier,
        owner_uid,
        // Local paths made absolute: the supervisor runs elsewhere.
        image: o.image.as_deref().map(crate::image::canonical_name),
        containers: o.containers,
    };
    let spec_json = serde_json::to_vec(&spec).map_err(|e| RunError::Supervisor(e.to_string()))?;
    let exe = std::env::current_exe().map_err(RunError::SelfExe)?;
    let (ready_read, ready_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| RunError::Supervisor(e.to_string()))?;
    let ready_raw = std::os::fd::AsRawFd::as_raw_fd(&ready_write);
    let mut cmd = Command::new(exe);
    cmd.arg(SUPERVISOR_ROLE)
        .env("AIRLOCK_STATE_DIR", root.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec this only calls setsid and dup2, both
    // async-signal-safe raw system calls.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setsid()?;
            airlock_jail::sys::raw_dup_to(ready_raw, READY_FD)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| RunError::Supervisor(format!("cannot start: {e}")))?;
    drop(ready_write);
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&spec_json).map_err(|e| RunError::Supervisor(e.to_string()))?;
    }
    let mut answer = String::new();
    let _ = io::BufRead::read_line(&mut io::BufReader::new(std::fs::File::from(ready_read)), &mut answer);
    // The first process exits as soon as it has forked the real supervisor.
    let _ = child.wait();
    match Report::from_line(&answer) {
        Report::Ready { name } => Ok(Created { name }),
        Report::Failed(failure) => Err(failure.into()),
    }
}

/// Writes the supervisor's one report to its creator.
fn report(ready: &mut std::fs::File, report: &Report) {
    let _ = ready.write_all(report.to_line().as_bytes());
}

/// A failure before the request could be served, as its creator sees it.
fn failed_early(message: String) -> Report {
    Report::Failed(CreateFailure::Other { message: format!("sandbox supervisor: {message}") })
}

/// The supervisor role's entry point (`airlock __supervise`).
pub fn main() -> i32 {
    // SAFETY: the READY_FD descriptor was placed by `create` for us alone.
    let ready = unsafe { OwnedFd::from_raw_fd(READY_FD) };
    let mut ready = std::fs::File::from(ready);
    // Detach for good: the first process exits, the second is reparented
    // to init (or the nearest subreaper) and outlives whoever created it.
    // SAFETY: nothing has started a thread yet in this process.
    match unsafe { airlock_jail::sys::fork() } {
        Ok(Some(_)) => return 0,
        Ok(None) => {}
        Err(e) => {
            report(&mut ready, &failed_early(format!("cannot detach: {e}")));
            return 1;
        }
    }
    let mut input = Vec::new();
    if let Err(e) = io::stdin().read_to_end(&mut input) {
        report(&mut ready, &failed_early(format!("cannot read the request: {e}")));
        return 1;
    }
    let mut ready = Some(ready);
    match serve_new(&input, &mut ready) {
        Ok(()) => 0,
        Err(e) => {
            if let Some(ready) = ready.as_mut() {
                report(ready, &Report::Failed(CreateFailure::from(&e)));
            } else {
                tracing::error!("sandbox supervisor failed: {e}");
            }
            1
        }
    }
}

fn serve_new(input: &[u8], ready: &mut Option<std::fs::File>) -> Result<(), RunError> {
    let spec: Spec = serde_json::from_slice(input).map_err(|e| RunError::Supervisor(e.to_string()))?;
    let mode = match &spec.workspace_mode {
        Some(m) => Some(m.parse().map_err(RunError::Supervisor)?),
        None => None,
    };
    let overrides = Overrides {
        timeout: spec.timeout,
        memory: spec.memory,
        pids: spec.pids,
        cpus: spec.cpus,
        env: spec.env.clone(),
        workspace_mode: mode,
        allow: spec.allow.clone(),
        tier: spec.tier,
        image: spec.image.clone(),
        containers: spec.containers,
    };
    let req = &spec.request;
    let checked = crate::run::check(&req.policy, &overrides, req.workspace.as_deref(), &mut |_| {})?;
    crate::ports::check(&req.ports, &checked.policy)?;
    // Before anything of the sandbox exists: a taken host port fails the
    // create with nothing to clean up.
    let listeners = crate::ports::bind_all(&req.ports)?;
    let root = StateRoot::from_env()?;
    crate::prepare_state_root(&root, checked.host.running_as_root)?;
    let image = crate::image::resolve_for(&root, &checked.policy)?;
    let user = crate::image::run_as(req.user.as_deref(), image.as_ref())?;
    let sandbox = root.create_sandbox(req.name.as_deref())?;
    // Held until a failure is recorded: whoever waits for it to go (`airlock
    // stop`) sees the sandbox's final state.
    let mut live = Some(sandbox.lock_live()?);
    let launched = match launch_sandbox(LaunchSpec {
        sandbox: &sandbox,
        policy: &checked.policy,
        workspace: checked.workspace.as_deref(),
        host: &checked.host,
        degraded: checked.degraded.clone(),
        command: &[],
        terminal: false,
        workspace_owner: (spec.owner_uid != 0).then_some(spec.owner_uid),
        image: image.as_ref(),
        user: user.as_deref(),
    }) {
        Ok(l) => l,
        Err(e) => {
            crate::run::record_failure(&sandbox, &e);
            return Err(e);
        }
    };
    // What `extend` may reach: the unmodified policy's limit, which flags
    // only ever shortened; a week when the policy lets flags raise limits.
    let base = Policy::resolve(&req.policy)?;
    let max_runtime = if base.limits.allow_raise {
        Duration::from_secs(7 * 24 * 3600).max(checked.policy.limits.timeout)
    } else {
        base.limits.timeout
    };
    // A failure from here on has already released what the sandbox held
    // (its agent, cgroup, layer and id block) by the time it returns.
    let mut supervisor =
        match Supervisor::start(&sandbox, &checked.policy, launched, &spec, req, max_runtime, listeners) {
            Ok(supervisor) => supervisor,
            Err(e) => {
                crate::run::record_failure(&sandbox, &e);
                return Err(e);
            }
        };
    // Said once, then the descriptor is closed: the creator returns now.
    if let Some(mut ready) = ready.take() {
        report(&mut ready, &Report::Ready { name: sandbox.name().to_string() });
    }
    let outcome = supervisor.run();
    let finished =
        supervisor.finish(&sandbox, &checked.policy, checked.workspace.as_deref(), &mut live, outcome);
    if let Err(e) = &finished {
        // Nobody waits for this process's answer any more: the sandbox's
        // state and audit log say what went wrong.
        crate::run::record_failure(&sandbox, e);
    }
    finished
}

/// Why the sandbox stops.
#[derive(Clone, Copy)]
enum StopReason {
    Requested,
    Deadline,
    Idle,
    AgentGone,
}

impl StopReason {
    const ALL: [StopReason; 4] =
        [StopReason::Requested, StopReason::Deadline, StopReason::Idle, StopReason::AgentGone];

    /// What the audit log's `stopped` record says.
    fn text(&self) -> &'static str {
        match self {
            StopReason::Requested => "stopped on request",
            StopReason::Deadline => "maximum runtime reached",
            StopReason::Idle => "idle timeout reached",
            StopReason::AgentGone => "the sandbox's agent ended",
        }
    }

    /// The short word the daemon's `stopped` event carries.
    fn code(&self) -> &'static str {
        match self {
            StopReason::Requested => "requested",
            StopReason::Deadline => "deadline",
            StopReason::Idle => "idle",
            StopReason::AgentGone => "ended",
        }
    }
}

/// Why the sandbox last stopped, read from its audit log's latest `stopped`
/// record: the daemon's short word (`requested`, `deadline`, `idle`,
/// `ended`) and the record's text. None before it has stopped.
pub fn last_stop(sandbox: &SandboxDir) -> Option<(&'static str, String)> {
    let records = crate::audit::AuditLog::read_all(&sandbox.audit_path()).ok()?;
    let text = records.into_iter().rev().find_map(|r| match r.event {
        AuditEvent::Stopped { reason } => Some(reason),
        _ => None,
    })?;
    let code = StopReason::ALL.iter().find(|r| r.text() == text).map_or("ended", StopReason::code);
    Some((code, text))
}

/// Messages to the supervisor's main thread.
enum Control {
    Stop,
    AgentGone,
    /// The deadline moved: look at it again now rather than at the end of
    /// the current wait (which may be far later than an earlier deadline).
    DeadlineMoved,
    /// A microVM guest killed what was left in it, and its trace's records
    /// of those ends are recorded.
    ProcessesEnded,
}

type ExecRoutes = Arc<Mutex<HashMap<u32, Route>>>;

/// Where an exec's events go.
struct Route {
    tx: Sender<ExecEvent>,
    /// Credit for the exec's stdin chunks, given back by the agent's
    /// `StdinAck`s and closed when the exec ends.
    stdin: Arc<Window>,
}

struct Supervisor {
    name: String,
    launched: Option<Launched>,
    agent: Arc<Mutex<UnixStream>>,
    routes: ExecRoutes,
    control_rx: Receiver<Control>,
    deadline: Arc<AtomicU64>,
    idle_timeout: Option<Duration>,
    last_activity: Arc<Mutex<Instant>>,
    running_execs: Arc<AtomicU32>,
    started: Instant,
    socket: PathBuf,
    ports: Arc<PortAccess>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Supervisor {
    fn start(
        sandbox: &SandboxDir,
        policy: &Policy,
        mut launched: Launched,
        spec: &Spec,
        req: &CreateRequest,
        max_runtime: Duration,
        listeners: Vec<(crate::ports::PortMapping, std::net::TcpListener)>,
    ) -> Result<Supervisor, RunError> {
        // The agent first confirms it is confined, then that it serves.
        let _ = launched.control.set_read_timeout(Some(Duration::from_secs(60)));
        let greetings = if launched.agent_serving { 0 } else { 2 };
        for _ in 0..greetings {
            match airlock_proto::recv::<_, AgentMessage>(&mut launched.control) {
                Ok(Some(AgentMessage::Confined { exec_trace: true, .. })) => {
                    crate::lifecycle::take_exec_listener(&launched.control, &mut launched.held)?;
                }
                Ok(Some(AgentMessage::Confined { .. } | AgentMessage::Serving)) => {}
                // Returning drops `launched`, which ends the sandbox and
                // releases what it held.
                Ok(Some(AgentMessage::SetupFailed { step, message })) => {
                    return Err(RunError::SetupFailed(format!("{step}: {message}")));
                }
                other => {
                    return Err(RunError::SetupFailed(format!("the agent did not come up: {other:?}")));
                }
            }
        }
        let _ = launched.control.set_read_timeout(None);
        step_done("serving")?;

        let deadline = unix_now() + policy.limits.timeout.as_secs();
        launched.meta.owner_uid = Some(spec.owner_uid);
        launched.meta.labels = req.labels.clone();
        launched.meta.deadline_unix = Some(deadline);
        launched.meta.idle_timeout_secs = req.idle_timeout.map(|d| d.as_secs());
        launched.meta.ports = req.ports.clone();
        if policy.isolation.containers {
            launched.meta.containers_socket = Some(sandbox.path().join(crate::containers::SOCKET));
        }
        sandbox.write_meta(&launched.meta)?;

        let socket = sandbox.path().join(SOCKET);
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).map_err(|e| RunError::State(socket.clone(), e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| RunError::State(socket.clone(), e))?;
        }

        let agent_reader = launched.control.try_clone().map_err(|e| RunError::Supervisor(e.to_string()))?;
        let agent = Arc::new(Mutex::new(
            launched.control.try_clone().map_err(|e| RunError::Supervisor(e.to_string()))?,
        ));
        let routes: ExecRoutes = Arc::new(Mutex::new(HashMap::new()));
        let file_routes: FileRoutes = Arc::new(Mutex::new(HashMap::new()));
        let (control_tx, control_rx) = mpsc::channel();
        let last_activity = Arc::new(Mutex::new(Instant::now()));
        let running_execs = Arc::new(AtomicU32::new(0));
        let deadline = Arc::new(AtomicU64::new(deadline));
        let logs = Logs { files: launched.logs.clone(), secrets: launched.secret_values.clone() };
        let audit = Arc::new(Mutex::new(
            AuditLog::open(&sandbox.audit_path())?
                .with_limit(policy.limits.audit_size)
                .redacting(&launched.secret_values),
        ));

        // Only a guest's agent reports an exec trace (its own kernel's); a
        // process-tier agent is inside the sandbox, and its trace is the
        // host's own listener's.
        let guest_trace = (policy.isolation.tier == airlock_policy::Tier::Microvm).then(|| audit.clone());
        // Why a client's `ConnectPort` is refused, when it is.
        let ports_refused = crate::ports::reachable(policy).err();
        let ports = PortAccess::new(
            sandbox.name(),
            launched.agent_pid,
            launched.guest_ports.clone(),
            ports_refused.map(|e| e.to_string()),
            audit.clone(),
        );
        if let Err(e) = ports.publish(listeners) {
            ports.close();
            return Err(e.into());
        }
        // The container engine's socket: into this guest's engine, nothing else.
        if policy.isolation.containers {
            let guest = launched.guest_ports.clone().ok_or_else(|| {
                RunError::Supervisor("a container engine without the guest's ports port".into())
            })?;
            crate::containers::serve(sandbox, spec.owner_uid, guest, audit.clone())?;
        }
        spawn_agent_reader(
            agent_reader,
            routes.clone(),
            file_routes.clone(),
            control_tx.clone(),
            last_activity.clone(),
            logs,
            guest_trace,
        );
        let server = Server {
            exec_env: Arc::new(launched.exec_env.clone()),
            exec_cwd: launched.exec_cwd.clone(),
            exec_user: launched.exec_user.clone(),
            agent: agent.clone(),
            routes: routes.clone(),
            file_routes,
            file_limit: policy.limits.disk,
            control: control_tx,
            deadline: deadline.clone(),
            idle_timeout: req.idle_timeout,
            last_activity: last_activity.clone(),
            running_execs: running_execs.clone(),
            next_id: Arc::new(AtomicU32::new(1)),
            audit,
            secrets: Arc::new(launched.secret_values.clone()),
            max_deadline: unix_now() + max_runtime.as_secs(),
            max_runtime_secs: max_runtime.as_secs(),
            ports: ports.clone(),
            memory: launched
                .meta
                .cgroup
                .as_deref()
                .and_then(airlock_jail::cgroup::SandboxCgroup::open)
                .map(|cgroup| Arc::new(MemoryWatch { cgroup, limit: policy.limits.memory })),
        };
        std::thread::Builder::new()
            .name("clients".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let server = server.clone();
                    std::thread::spawn(move || server.handle(conn));
                }
            })
            .map_err(|e| RunError::Supervisor(e.to_string()))?;

        Ok(Supervisor {
            name: sandbox.name().to_string(),
            launched: Some(launched),
            agent,
            routes,
            control_rx,
            deadline,
            idle_timeout: req.idle_timeout,
            last_activity,
            running_execs,
            started: Instant::now(),
            socket,
            ports,
        })
    }

    /// Waits for the reason to stop.
    fn run(&mut self) -> StopReason {
        loop {
            let now = unix_now();
            let deadline = self.deadline.load(Ordering::Relaxed);
            if now >= deadline {
                return StopReason::Deadline;
            }
            let mut wait = Duration::from_secs(deadline - now);
            if let Some(idle) = self.idle_timeout {
                let idle_for = self.last_activity.lock().map_or(Duration::ZERO, |t| t.elapsed());
                if self.running_execs.load(Ordering::Relaxed) == 0 {
                    if idle_for >= idle {
                        return StopReason::Idle;
                    }
                    wait = wait.min(idle - idle_for);
                } else {
                    wait = wait.min(idle);
                }
            }
            match self.control_rx.recv_timeout(wait.min(Duration::from_secs(60))) {
                Ok(Control::Stop) => return StopReason::Requested,
                Ok(Control::AgentGone) => return StopReason::AgentGone,
                Ok(Control::DeadlineMoved | Control::ProcessesEnded)
                | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return StopReason::AgentGone,
            }
        }
    }

    fn finish(
        &mut self,
        sandbox: &SandboxDir,
        policy: &Policy,
        workspace: Option<&Path>,
        live: &mut Option<crate::state::LiveLock>,
        reason: StopReason,
    ) -> Result<(), RunError> {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(sandbox.path().join(crate::containers::SOCKET));
        // The published ports stop listening with the sandbox.
        self.ports.close();
        let Some(launched) = self.launched.take() else { return Ok(()) };
        let Launched { name, meta, mut audit, mut held, secret_values, stdio, control, .. } = launched;
        // An error returned early drops `held`, which ends the sandbox and
        // releases its cgroup, layer and id block at once.
        // A microVM's guest that ended by itself (a kernel panic, a
        // power-off): why, read from its console, before QEMU is reaped.
        let guest_end = if matches!(reason, StopReason::AgentGone) {
            held.vm_ended("while the sandbox ran")
        } else {
            None
        };
        if let Some(end) = &guest_end {
            audit.record(AuditEvent::Error { stage: "guest".into(), message: end.to_string() })?;
        }
        audit.record(AuditEvent::Stopped { reason: reason.text().to_string() })?;
        step_done("stopping")?;
        if !matches!(reason, StopReason::AgentGone) {
            self.end_execs(policy.limits.stop_grace);
            if policy.isolation.tier == airlock_policy::Tier::Microvm {
                self.end_guest_processes();
            }
        }
        held.kill_all();
        let agent_status = held.reap_agent();
        drop(control);
        if let Ok(agent) = self.agent.lock() {
            let _ = agent.shutdown(std::net::Shutdown::Both);
        }
        // Anyone still waiting on an exec learns it ended with the sandbox.
        if let Ok(mut routes) = self.routes.lock() {
            for (_, route) in routes.drain() {
                let ended = ExecEvent::Exited { code: None, signal: Some(libc::SIGKILL), timed_out: false };
                let _ = route.tx.send(ended);
            }
        }
        let mut ending = ending_of(reason, agent_status);
        if guest_end.is_some() {
            // QEMU's own status says nothing of the guest's: no code, no
            // signal (125 where an exit code is asked for).
            (ending.code, ending.signal) = (None, None);
        }
        let mut notices = Vec::new();
        finalize(
            sandbox,
            policy,
            workspace,
            Remains { name, meta, audit, held, stdio, secret_values, final_state: SandboxState::Stopped },
            ending,
            self.started.elapsed(),
            Some(false),
            live,
            &mut |n| notices.push(n),
        )?;
        for n in notices {
            if let Notice::Warning(w) = n {
                tracing::warn!(sandbox = %self.name, "{w}");
            }
        }
        Ok(())
    }
}

impl Supervisor {
    /// Asks every running exec to end and waits up to `grace`; whatever is
    /// left dies with the sandbox.
    fn end_execs(&self, grace: Duration) {
        if !ask_execs_to_end(&self.routes, &self.agent, grace) {
            tracing::debug!(sandbox = %self.name, "grace period over; killing the sandbox's processes");
        }
    }

    /// A microVM's guest: its agent kills whatever is left in it (a
    /// background job) and answers once its trace's records of those ends
    /// are sent (the agent reader records them first); waited for
    /// [`crate::exec_trace::GUEST_LAST_ENDS`] at most.
    fn end_guest_processes(&self) {
        let sent = self
            .agent
            .lock()
            .is_ok_and(|mut agent| airlock_proto::send(&mut *agent, &HostMessage::EndProcesses).is_ok());
        if !sent {
            return;
        }
        let until = Instant::now() + crate::exec_trace::GUEST_LAST_ENDS;
        loop {
            match self.control_rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                // Stopping already; a deadline no longer matters.
                Ok(Control::Stop | Control::DeadlineMoved) => {}
                Ok(Control::ProcessesEnded | Control::AgentGone) | Err(_) => return,
            }
        }
    }
}

/// Sends SIGTERM to every running exec's process group through the agent,
/// then waits up to `grace` for all of them to end (their routes go when
/// the agent reports the end); whether they did. An agent that does not
/// answer costs the grace period and no more: the caller kills the sandbox
/// either way.
fn ask_execs_to_end<W: Write>(routes: &ExecRoutes, agent: &Mutex<W>, grace: Duration) -> bool {
    let running: Vec<u32> = routes.lock().map(|r| r.keys().copied().collect()).unwrap_or_default();
    if running.is_empty() {
        return true;
    }
    tracing::debug!(execs = running.len(), "asking the sandbox's processes to end");
    if let Ok(mut agent) = agent.lock() {
        for id in running {
            let _ = airlock_proto::send(&mut *agent, &HostMessage::Signal { id, signal: libc::SIGTERM });
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        if routes.lock().map_or(true, |r| r.is_empty()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How a long-lived sandbox ended. Stopped by the supervisor (on request,
/// at its deadline, when idle), it ended normally (code 0), even though its
/// agent was killed. An agent that ended by itself (killed by the OOM
/// killer, say) is recorded as it ended, so that `ls` and `inspect` do not
/// call it a clean stop.
fn ending_of(reason: StopReason, agent_status: Option<i32>) -> Ending {
    let (code, signal) = match (reason, agent_status) {
        (StopReason::AgentGone, Some(status)) if libc::WIFSIGNALED(status) => {
            (None, Some(libc::WTERMSIG(status)))
        }
        (StopReason::AgentGone, Some(status)) => (Some(libc::WEXITSTATUS(status)), None),
        _ => (Some(0), None),
    };
    Ending {
        timed_out: matches!(reason, StopReason::Deadline),
        confined: true,
        code,
        signal,
        ..Ending::default()
    }
}

/// Exec output goes to the sandbox's logs too, redacted like `run`'s, and
/// capped with them (the same shared files): the client gets all of it.
struct Logs {
    files: crate::lifecycle::OutputLogs,
    secrets: Vec<(String, Vec<u8>)>,
}

impl Logs {
    /// Redacts `data` and appends it to its stream's log. Returns what the
    /// client gets.
    fn write(&mut self, stream: Stream, data: &[u8]) -> Vec<u8> {
        let data = if self.secrets.is_empty() {
            data.to_vec()
        } else {
            airlock_egress::redact::redact_all(data, &self.secrets)
        };
        let file = match stream {
            Stream::Stdout => &self.files.stdout,
            Stream::Stderr => &self.files.stderr,
        };
        let _ = crate::caps::lock(file).write(&data);
        data
    }
}

/// Whether a chunk of stdin may go to the agent.
enum Credit {
    Granted,
    ExecEnded,
    ClientGone,
}

/// Waits for room in an exec's stdin window, watching meanwhile for its
/// client to go away (it is not read while this waits).
fn wait_for_credit(window: &Window, client: &UnixStream) -> Credit {
    loop {
        match window.take(Duration::from_millis(250)) {
            Take::Taken => return Credit::Granted,
            Take::Closed => return Credit::ExecEnded,
            Take::TimedOut if peer_hung_up(client) => return Credit::ClientGone,
            Take::TimedOut => {}
        }
    }
}

/// The other end of `socket` is closed (without reading what it sent).
fn peer_hung_up(socket: &UnixStream) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(socket, PollFlags::RDHUP)];
    let now = Timespec { tv_sec: 0, tv_nsec: 0 };
    matches!(poll(&mut fds, Some(&now)), Ok(n) if n > 0)
        && fds[0].revents().intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
}

fn spawn_agent_reader(
    mut agent: UnixStream,
    routes: ExecRoutes,
    file_routes: FileRoutes,
    control: Sender<Control>,
    last_activity: Arc<Mutex<Instant>>,
    mut logs: Logs,
    guest_trace: Option<Arc<Mutex<AuditLog>>>,
) {
    std::thread::spawn(move || {
        while let Ok(Some(msg)) = airlock_proto::recv::<_, AgentMessage>(&mut agent) {
            if let Ok(mut t) = last_activity.lock() {
                *t = Instant::now();
            }
            let (id, event, last) = match msg {
                AgentMessage::ExecStarted { id, pid } => (id, ExecEvent::Started { pid }, false),
                AgentMessage::ExecOutput { id, stream, data } => {
                    let data = logs.write(stream, &data);
                    (id, ExecEvent::Output { stream, data }, false)
                }
                AgentMessage::ExecRefused { id, exit_code, message } => {
                    let data = logs.write(Stream::Stderr, format!("airlock: {message}\n").as_bytes());
                    if let Ok(r) = routes.lock()
                        && let Some(route) = r.get(&id)
                    {
                        let _ = route.tx.send(ExecEvent::Output { stream: Stream::Stderr, data });
                    }
                    (id, ExecEvent::Exited { code: Some(exit_code), signal: None, timed_out: false }, true)
                }
                AgentMessage::ExecEnded { id, code, signal } => {
                    (id, ExecEvent::Exited { code, signal, timed_out: false }, true)
                }
                AgentMessage::File { id, reply } => {
                    route_file_reply(&file_routes, id, reply);
                    continue;
                }
                AgentMessage::StdinAck { id } => {
                    if let Ok(r) = routes.lock()
                        && let Some(route) = r.get(&id)
                    {
                        route.stdin.give_back();
                    }
                    continue;
                }
                AgentMessage::ProcessesEnded => {
                    let _ = control.send(Control::ProcessesEnded);
                    continue;
                }
                AgentMessage::ExecTrace { trace } => {
                    match &guest_trace {
                        Some(audit) => {
                            if let Ok(mut audit) = audit.lock()
                                && let Err(e) = audit.record(crate::exec_trace::guest_event(trace))
                            {
                                tracing::warn!("recording the guest's exec trace: {e}");
                            }
                        }
                        None => tracing::debug!("ignored an exec trace record from a process-tier agent"),
                    }
                    continue;
                }
                _ => continue,
            };
            if let Ok(mut r) = routes.lock() {
                if let Some(route) = r.get(&id) {
                    let _ = route.tx.send(event);
                }
                if last && let Some(route) = r.remove(&id) {
                    route.stdin.close();
                }
            }
        }
        let _ = control.send(Control::AgentGone);
    });
}

/// Serves client connections; cloned per connection.
#[derive(Clone)]
struct Server {
    /// Put under each exec's environment (see `Launched::exec_env`).
    exec_env: Arc<Vec<(String, String)>>,
    /// Where an exec without a directory of its own starts (see `Launched::exec_cwd`).
    exec_cwd: Option<PathBuf>,
    /// Who an exec without a user of its own runs as (see `Launched::exec_user`).
    exec_user: Option<String>,
    agent: Arc<Mutex<UnixStream>>,
    routes: ExecRoutes,
    file_routes: FileRoutes,
    /// The most a read may return: the policy's disk budget, which is also
    /// the largest file anything in the sandbox can write (RLIMIT_FSIZE).
    file_limit: u64,
    control: Sender<Control>,
    deadline: Arc<AtomicU64>,
    idle_timeout: Option<Duration>,
    last_activity: Arc<Mutex<Instant>>,
    running_execs: Arc<AtomicU32>,
    next_id: Arc<AtomicU32>,
    audit: Arc<Mutex<AuditLog>>,
    /// The secret values (name, value) the audit log redacts, for
    /// `Request::Redact`.
    secrets: Arc<Vec<(String, Vec<u8>)>>,
    /// The latest deadline `extend` may set: the policy's maximum runtime
    /// from the start (a flag may shorten it, extend may give time back up
    /// to it); unbounded within a week when the policy allows raising.
    max_deadline: u64,
    max_runtime_secs: u64,
    ports: Arc<PortAccess>,
    memory: Option<Arc<MemoryWatch>>,
}

/// The sandbox's cgroup and memory limit, to tell a client why its exec was
/// killed: a SIGKILL alone does not say that the OOM killer sent it.
struct MemoryWatch {
    cgroup: airlock_jail::cgroup::SandboxCgroup,
    limit: u64,
}

impl MemoryWatch {
    fn explain(&self) -> String {
        format!(
            "airlock: the kernel's OOM killer ended this process: the sandbox reached its memory limit ({}). \
             Free memory inside (files in /tmp count too), or create the sandbox with a larger --memory.\n",
            airlock_policy::format_size(self.limit)
        )
    }
}

impl Server {
    fn handle(&self, mut conn: UnixStream) {
        let request = match airlock_proto::recv::<_, Request>(&mut conn) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                let _ = airlock_proto::send(&mut conn, &Reply::Error { message: e.to_string() });
                return;
            }
        };
        let reply = match request {
            Request::Exec(spec) => return self.exec(conn, spec),
            Request::File(op) => return self.file(conn, op),
            Request::ConnectPort { port, peer } => return self.connect_port(conn, port, peer),
            Request::Stop => {
                let _ = self.control.send(Control::Stop);
                Reply::Ok
            }
            Request::Extend { seconds } => {
                let wanted = self.deadline.load(Ordering::Relaxed).saturating_add(seconds);
                if wanted > self.max_deadline {
                    Reply::Error {
                        message: format!(
                            "the policy caps this sandbox's runtime at {} s from its start; it cannot be extended past that",
                            self.max_runtime_secs
                        ),
                    }
                } else {
                    self.deadline.store(wanted, Ordering::Relaxed);
                    Reply::Ok
                }
            }
            Request::Deadline { unix } => {
                if unix > self.max_deadline {
                    Reply::Error {
                        message: format!(
                            "the policy caps this sandbox's runtime at {} s from its start; its deadline cannot be set past that",
                            self.max_runtime_secs
                        ),
                    }
                } else {
                    self.deadline.store(unix, Ordering::Relaxed);
                    let _ = self.control.send(Control::DeadlineMoved);
                    Reply::Ok
                }
            }
            Request::Stdin { .. }
            | Request::CloseStdin
            | Request::Signal { .. }
            | Request::Resize { .. }
            | Request::FileData { .. } => {
                Reply::Error { message: "no exec on this connection: send Exec first".into() }
            }
            // The same function the audit log applies to every string of an
            // event; the values never leave this process.
            Request::Redact { texts } => Reply::Redacted {
                texts: texts.iter().map(|t| crate::network::redact_str(t, &self.secrets)).collect(),
            },
            Request::Status => Reply::Status {
                running: true,
                deadline_unix: self.deadline.load(Ordering::Relaxed),
                idle_timeout_secs: self.idle_timeout.map(|d| d.as_secs()),
                execs_running: self.running_execs.load(Ordering::Relaxed),
            },
        };
        let _ = airlock_proto::send(&mut conn, &reply);
    }

    fn exec(&self, mut conn: UnixStream, spec: ExecSpec) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let stdin = Arc::new(Window::new(STDIN_WINDOW));
        if let Ok(mut r) = self.routes.lock() {
            r.insert(id, Route { tx, stdin: stdin.clone() });
        }
        self.running_execs.fetch_add(1, Ordering::Relaxed);
        let user = spec.user.clone().or_else(|| self.exec_user.clone());
        let base = crate::plan::base_env_for(&self.exec_env, user.as_deref());
        let request = HostMessage::Exec(Box::new(ExecRequest {
            id,
            argv: spec.argv.clone(),
            // The exec's own variables last: they win.
            env: base.chain(&spec.env).cloned().collect(),
            cwd: spec.cwd.clone().or_else(|| self.exec_cwd.clone()),
            tty: spec.tty,
            user,
        }));
        let sent =
            self.agent.lock().map(|mut a| airlock_proto::send(&mut *a, &request).is_ok()).unwrap_or(false);
        if sent {
            self.forward_input(&conn, id, stdin.clone());
            self.relay_exec(&mut conn, id, &spec, &rx);
        } else {
            let message = "the sandbox's agent is gone".to_string();
            let _ = airlock_proto::send(&mut conn, &Reply::Error { message });
        }
        if let Ok(mut r) = self.routes.lock() {
            r.remove(&id);
        }
        stdin.close();
        self.running_execs.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut t) = self.last_activity.lock() {
            *t = Instant::now();
        }
    }

    /// Passes what the client sends after Exec (stdin, signals) to the agent,
    /// until the client closes its side. Stdin goes within the exec's window:
    /// while its process does not read, this stops reading the client (whose
    /// sends then wait), and nothing else in the sandbox waits with it.
    fn forward_input(&self, conn: &UnixStream, id: u32, window: Arc<Window>) {
        let Ok(mut reader) = conn.try_clone() else { return };
        let agent = self.agent.clone();
        std::thread::spawn(move || {
            while let Ok(Some(request)) = airlock_proto::recv::<_, Request>(&mut reader) {
                let msg = match request {
                    Request::Stdin { data } if !data.is_empty() => match wait_for_credit(&window, &reader) {
                        Credit::Granted => HostMessage::Stdin { id, data },
                        // The exec ended: its input goes nowhere.
                        Credit::ExecEnded => continue,
                        Credit::ClientGone => break,
                    },
                    Request::Stdin { .. } | Request::CloseStdin => {
                        HostMessage::Stdin { id, data: Vec::new() }
                    }
                    Request::Signal { signal } => HostMessage::Signal { id, signal },
                    Request::Resize { rows, cols } => HostMessage::Resize { id, rows, cols },
                    _ => continue,
                };
                let sent =
                    agent.lock().map(|mut a| airlock_proto::send(&mut *a, &msg).is_ok()).unwrap_or(false);
                if !sent {
                    return;
                }
            }
            // The client is gone (clients never half-close: the end of input
            // is CloseStdin), so no one is left to read the output or end the
            // process: kill its group. Once the exec has ended, the agent no
            // longer knows the id and ignores this.
            let kill = HostMessage::Signal { id, signal: libc::SIGKILL };
            if let Ok(mut a) = agent.lock() {
                let _ = airlock_proto::send(&mut *a, &kill);
            }
        });
    }

    /// Relays an exec's events to its client until it ends, enforcing its
    /// timeout and recording its start and end in the audit log.
    fn relay_exec(&self, conn: &mut UnixStream, id: u32, spec: &ExecSpec, rx: &Receiver<ExecEvent>) {
        let started = Instant::now();
        let deadline = spec.timeout_secs.map(|s| started + Duration::from_secs(s));
        let mut timed_out = false;
        let mut pid = None;
        let oom_kills_before = self.memory.as_ref().map(|m| m.cgroup.oom_kills());
        loop {
            let wait =
                deadline.map_or(Duration::from_secs(3600), |d| d.saturating_duration_since(Instant::now()));
            let event = match rx.recv_timeout(wait) {
                Ok(event) => event,
                Err(mpsc::RecvTimeoutError::Timeout) if deadline.is_some() && !timed_out => {
                    timed_out = true;
                    let kill = HostMessage::Signal { id, signal: libc::SIGKILL };
                    if let Ok(mut a) = self.agent.lock() {
                        let _ = airlock_proto::send(&mut *a, &kill);
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let event = match event {
                ExecEvent::Started { pid: p } => {
                    pid = Some(p);
                    self.record(AuditEvent::ExecStarted { id, argv: spec.argv.clone(), pid: Some(p) });
                    ExecEvent::Started { pid: p }
                }
                ExecEvent::Exited { code, signal, .. } if timed_out => {
                    ExecEvent::Exited { code: Some(crate::exit_codes::TIMED_OUT).or(code), signal, timed_out }
                }
                other => other,
            };
            let last = matches!(event, ExecEvent::Exited { .. });
            if let (ExecEvent::Exited { signal: Some(libc::SIGKILL), timed_out: false, .. }, Some(memory)) =
                (&event, &self.memory)
                && oom_kills_before.is_some_and(|before| memory.cgroup.oom_kills() > before)
            {
                let data = memory.explain().into_bytes();
                let _ = airlock_proto::send(
                    conn,
                    &Reply::Exec(ExecEvent::Output { stream: Stream::Stderr, data }),
                );
            }
            if let ExecEvent::Exited { code, signal, timed_out } = &event {
                if pid.is_none() {
                    self.record(AuditEvent::ExecStarted { id, argv: spec.argv.clone(), pid: None });
                }
                self.record(AuditEvent::ExecEnded {
                    id,
                    code: *code,
                    signal: *signal,
                    timed_out: *timed_out,
                    duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                });
            }
            // A client that went away does not stop the process.
            let _ = airlock_proto::send(conn, &Reply::Exec(event));
            if last {
                return;
            }
        }
    }

    /// Runs a file operation in the agent and relays its answers, checking
    /// each against what was asked: the agent is inside the sandbox
    /// (`file_relay`). Reads and changes are recorded in the audit log.
    fn file(&self, mut conn: UnixStream, op: FileOp) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let path = op.path().to_string_lossy().into_owned();
        let (name, to) = match &op {
            FileOp::Rename { to, .. } => (op.name(), Some(to.to_string_lossy().into_owned())),
            _ => (op.name(), None),
        };
        let relay = Relay { agent: &self.agent, routes: &self.file_routes, id, disk_limit: self.file_limit };
        let outcome = relay.run(&mut conn, op);
        let refused = outcome.result.err().map(|e| format!("{e:?}"));
        match name {
            "read" => self.record(AuditEvent::FileRead { path, bytes: outcome.bytes, refused }),
            "write" | "mkdir" | "remove" | "rename" => self.record(AuditEvent::FileChanged {
                op: name.to_owned(),
                path,
                to,
                bytes: outcome.bytes,
                refused,
            }),
            _ => self.record(AuditEvent::FileInspected {
                op: name.to_owned(),
                path,
                entries: outcome.entries,
                refused,
            }),
        }
        if let Ok(mut t) = self.last_activity.lock() {
            *t = Instant::now();
        }
    }

    /// Relays this client connection to `port` inside the sandbox, after
    /// answering whether it could be made.
    fn connect_port(&self, conn: UnixStream, port: u16, peer: String) {
        let origin = crate::ports::Origin { peer, listen: None };
        let answer = |conn: &mut UnixStream, failed: Option<&crate::ports::PortError>| {
            let reply = match failed {
                None => Reply::Ok,
                Some(e) => Reply::Error { message: e.to_string() },
            };
            let _ = airlock_proto::send(conn, &reply);
        };
        if let Err(e) = self.ports.serve(conn, port, origin, answer) {
            tracing::debug!("port {port}: {e}");
        }
    }

    fn record(&self, event: AuditEvent) {
        if let Ok(mut audit) = self.audit.lock() {
            let _ = audit.record(event);
        }
    }
}

/// Sends signals and terminal sizes to a running exec.
#[derive(Clone)]
pub struct ExecControl {
    conn: Arc<Mutex<UnixStream>>,
}

impl ExecControl {
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        self.send(&Request::Signal { signal })
    }

    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        self.send(&Request::Resize { rows, cols })
    }

    fn send(&self, request: &Request) -> io::Result<()> {
        let mut conn = self.conn.lock().map_err(|_| io::Error::other("exec control poisoned"))?;
        airlock_proto::send(&mut *conn, request).map_err(io::Error::other)
    }
}

/// A client of one sandbox's supervisor (the daemon, the CLI).
#[derive(Debug, Clone)]
pub struct SupervisorClient {
    socket: PathBuf,
}

impl SupervisorClient {
    pub fn connect(sandbox: &SandboxDir) -> io::Result<SupervisorClient> {
        let socket = sandbox.path().join(SOCKET);
        // Fail now, not on first use, when nobody is listening.
        UnixStream::connect(&socket)?;
        Ok(SupervisorClient { socket })
    }

    /// A client that connects only with its first request (whose error
    /// then says that nobody listens): one connection fewer for a caller
    /// that has a single request to make.
    pub fn at(sandbox: &SandboxDir) -> SupervisorClient {
        SupervisorClient { socket: sandbox.path().join(SOCKET) }
    }

    fn request(&self, request: &Request) -> io::Result<UnixStream> {
        let mut conn = UnixStream::connect(&self.socket)?;
        airlock_proto::send(&mut conn, request).map_err(io::Error::other)?;
        Ok(conn)
    }

    fn simple(&self, request: &Request) -> io::Result<Reply> {
        let mut conn = self.request(request)?;
        match airlock_proto::recv::<_, Reply>(&mut conn).map_err(io::Error::other)? {
            Some(Reply::Error { message }) => Err(io::Error::other(message)),
            Some(reply) => Ok(reply),
            None => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }

    /// Runs a process and reports its events until it ends. Its stdin is
    /// closed at once; see [`SupervisorClient::exec_with_input`].
    pub fn exec(&self, spec: &ExecSpec, on_event: &mut dyn FnMut(ExecEvent)) -> io::Result<()> {
        self.exec_with_input(spec, None, on_event)
    }

    /// Like [`SupervisorClient::exec`], feeding `input` to the process's
    /// stdin from another thread until it ends.
    pub fn exec_with_input(
        &self,
        spec: &ExecSpec,
        input: Option<Box<dyn Read + Send>>,
        on_event: &mut dyn FnMut(ExecEvent),
    ) -> io::Result<()> {
        self.exec_session(spec, input, on_event, &mut |_| {})
    }

    /// The general form: `session` gets a handle for sending signals and
    /// terminal sizes while the exec runs.
    pub fn exec_session(
        &self,
        spec: &ExecSpec,
        input: Option<Box<dyn Read + Send>>,
        on_event: &mut dyn FnMut(ExecEvent),
        session: &mut dyn FnMut(ExecControl),
    ) -> io::Result<()> {
        let mut conn = self.request(&Request::Exec(spec.clone()))?;
        // One writer for input and control, so their frames never interleave.
        let control = ExecControl { conn: Arc::new(Mutex::new(conn.try_clone()?)) };
        session(control.clone());
        match input {
            Some(mut input) => {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match input.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if control.send(&Request::Stdin { data: buf[..n].to_vec() }).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = control.send(&Request::CloseStdin);
                });
            }
            // No input: closed at once, without a thread to do it.
            None => {
                let _ = control.send(&Request::CloseStdin);
            }
        }
        loop {
            match airlock_proto::recv::<_, Reply>(&mut conn).map_err(io::Error::other)? {
                Some(Reply::Exec(event)) => {
                    let last = matches!(event, ExecEvent::Exited { .. });
                    on_event(event);
                    if last {
                        return Ok(());
                    }
                }
                Some(Reply::Error { message }) => return Err(io::Error::other(message)),
                Some(_) => {}
                None => return Err(io::Error::other("the sandbox stopped during the exec")),
            }
        }
    }

    /// Runs a file operation and hands each answer to `on_reply`, until the
    /// last (`Done` or `Failed`) or until `on_reply` answers false (the
    /// operation is then abandoned: the connection closes and the
    /// supervisor cancels it).
    pub fn file(&self, op: &FileOp, on_reply: &mut dyn FnMut(FileReply) -> bool) -> io::Result<()> {
        let mut conn = self.request(&Request::File(op.clone()))?;
        loop {
            match airlock_proto::recv::<_, Reply>(&mut conn).map_err(io::Error::other)? {
                Some(Reply::File(reply)) => {
                    let last = matches!(reply, FileReply::Done | FileReply::Failed(_));
                    if !on_reply(reply) || last {
                        return Ok(());
                    }
                }
                Some(Reply::Error { message }) => return Err(io::Error::other(message)),
                Some(_) => return Err(io::Error::other("the supervisor answered out of turn")),
                None => return Err(io::Error::other("the sandbox stopped during the file operation")),
            }
        }
    }

    /// Starts a file operation and returns its connection, for operations
    /// that send as well as receive (a write's data) or wait on their own
    /// terms (a watch).
    pub fn file_session(&self, op: &FileOp) -> io::Result<FileSession> {
        Ok(FileSession { conn: self.request(&Request::File(op.clone()))? })
    }

    /// A connection to `port` on the sandbox's loopback, made by its
    /// supervisor: once this returns, the stream carries the port's bytes
    /// both ways. `peer` names whom it is for in the audit log (an address,
    /// a front end). Refused when the sandbox's policy forbids ports or its
    /// tier cannot carry them, and when nothing listens on the port.
    pub fn connect_port(&self, port: u16, peer: &str) -> io::Result<UnixStream> {
        let mut conn = self.request(&Request::ConnectPort { port, peer: peer.to_owned() })?;
        match airlock_proto::recv::<_, Reply>(&mut conn).map_err(io::Error::other)? {
            Some(Reply::Ok) => Ok(conn),
            Some(Reply::Error { message }) => Err(io::Error::other(message)),
            Some(other) => Err(io::Error::other(format!("unexpected answer {other:?}"))),
            None => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }

    pub fn stop(&self) -> io::Result<()> {
        self.simple(&Request::Stop).map(drop)
    }

    pub fn extend(&self, seconds: u64) -> io::Result<()> {
        self.simple(&Request::Extend { seconds }).map(drop)
    }

    /// Sets the deadline to `unix` (seconds since the epoch), earlier or
    /// later; the supervisor refuses a time past the policy's maximum.
    pub fn set_deadline(&self, unix: u64) -> io::Result<()> {
        self.simple(&Request::Deadline { unix }).map(drop)
    }

    pub fn status(&self) -> io::Result<Reply> {
        self.simple(&Request::Status)
    }

    /// `texts` with the sandbox's secret values redacted by its supervisor,
    /// exactly as its audit log redacts them (see `Request::Redact`).
    pub fn redact(&self, texts: Vec<String>) -> io::Result<Vec<String>> {
        let count = texts.len();
        match self.simple(&Request::Redact { texts })? {
            Reply::Redacted { texts } if texts.len() == count => Ok(texts),
            Reply::Redacted { texts } => {
                Err(io::Error::other(format!("the supervisor redacted {} texts of {count}", texts.len())))
            }
            _ => Err(io::Error::other("the supervisor answered out of turn")),
        }
    }
}

/// One file operation's connection to the supervisor. Dropping it abandons
/// the operation: the supervisor cancels it in the agent (a write then
/// leaves the target as it was).
pub struct FileSession {
    conn: UnixStream,
}

impl FileSession {
    /// The next answer.
    pub fn answer(&mut self) -> io::Result<FileReply> {
        match airlock_proto::recv::<_, Reply>(&mut self.conn).map_err(io::Error::other)? {
            Some(Reply::File(reply)) => Ok(reply),
            Some(Reply::Error { message }) => Err(io::Error::other(message)),
            Some(_) => Err(io::Error::other("the supervisor answered out of turn")),
            None => Err(io::Error::other("the sandbox stopped during the file operation")),
        }
    }

    /// Waits up to `timeout` for an answer to arrive: false when none did.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let timeout = rustix::event::Timespec {
            tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let mut fds = [rustix::event::PollFd::new(&self.conn, rustix::event::PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(n) => Ok(n > 0),
            Err(rustix::io::Errno::INTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// A write's next chunk (at most `FILE_CHUNK` bytes).
    pub fn send_data(&mut self, data: Vec<u8>) -> io::Result<()> {
        airlock_proto::send(&mut self.conn, &Request::FileData { data }).map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn routes_of(ids: &[u32]) -> (ExecRoutes, Vec<Receiver<ExecEvent>>) {
        let routes: ExecRoutes = Arc::new(Mutex::new(HashMap::new()));
        let mut receivers = Vec::new();
        for &id in ids {
            let (tx, rx) = mpsc::channel();
            routes.lock().unwrap().insert(id, Route { tx, stdin: Arc::new(Window::new(STDIN_WINDOW)) });
            receivers.push(rx);
        }
        (routes, receivers)
    }

    /// The frames the agent got, until none is left.
    fn frames(mut agent_side: UnixStream) -> Vec<HostMessage> {
        agent_side.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        while let Ok(Some(msg)) = airlock_proto::recv::<_, HostMessage>(&mut agent_side) {
            out.push(msg);
        }
        out
    }

    #[test]
    fn a_stop_waits_the_grace_period_for_an_agent_that_does_not_answer_and_no_longer() {
        let (ours, agent_side) = UnixStream::pair().unwrap();
        let (routes, _rx) = routes_of(&[3, 5]);
        let started = Instant::now();
        let ended = ask_execs_to_end(&routes, &Mutex::new(ours), Duration::from_millis(300));
        let waited = started.elapsed();
        assert!(!ended, "nobody answered");
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");
        let mut sent: Vec<(u32, i32)> = frames(agent_side)
            .into_iter()
            .map(|m| match m {
                HostMessage::Signal { id, signal } => (id, signal),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        sent.sort_unstable();
        assert_eq!(sent, vec![(3, libc::SIGTERM), (5, libc::SIGTERM)], "each exec was asked once");
    }

    #[test]
    fn a_stop_goes_on_as_soon_as_every_exec_has_ended() {
        let (ours, agent_side) = UnixStream::pair().unwrap();
        let (routes, _rx) = routes_of(&[1]);
        // What the agent reader does when the agent reports the end.
        let reader = {
            let routes = routes.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                routes.lock().unwrap().remove(&1);
            })
        };
        let started = Instant::now();
        assert!(ask_execs_to_end(&routes, &Mutex::new(ours), Duration::from_secs(30)));
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        reader.join().unwrap();
        assert_eq!(frames(agent_side).len(), 1);

        // Nothing running: nothing is sent, nothing is waited for.
        let (ours, agent_side) = UnixStream::pair().unwrap();
        let (routes, _) = routes_of(&[]);
        assert!(ask_execs_to_end(&routes, &Mutex::new(ours), Duration::from_secs(30)));
        assert!(frames(agent_side).is_empty());
    }

    #[test]
    fn how_a_long_lived_sandbox_ended() {
        let exited = |code: i32| code << 8;
        let killed_by = |signal: i32| signal;
        // Stopped by the supervisor: a clean end, whatever killing the agent did.
        for reason in [StopReason::Requested, StopReason::Idle] {
            let e = ending_of(reason, Some(killed_by(libc::SIGKILL)));
            assert_eq!((e.code, e.signal, e.timed_out, e.exit_code()), (Some(0), None, false, 0));
        }
        let e = ending_of(StopReason::Deadline, Some(killed_by(libc::SIGKILL)));
        assert!(e.timed_out);
        assert_eq!(e.exit_code(), crate::exit_codes::TIMED_OUT);
        // An agent that ended by itself is recorded as it ended.
        let e = ending_of(StopReason::AgentGone, Some(killed_by(libc::SIGKILL)));
        assert_eq!((e.code, e.signal), (None, Some(libc::SIGKILL)));
        assert_eq!(e.exit_code(), 128 + libc::SIGKILL);
        let e = ending_of(StopReason::AgentGone, Some(exited(3)));
        assert_eq!((e.code, e.signal, e.exit_code()), (Some(3), None, 3));
        // One that could not be reaped still counts as stopped cleanly.
        assert_eq!(ending_of(StopReason::AgentGone, None).code, Some(0));
    }
}
