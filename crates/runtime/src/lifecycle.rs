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
use airlock_policy::{CleanupAction, Policy, Tier, WorkspaceMode};
use airlock_proto::HostMessage;
use airlock_vm::boot::{WritableShare, Writes};

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
    /// Released by [`finalize`], or at once when this is dropped unfinished.
    pub held: Held,
    pub secret_values: Vec<(String, Vec<u8>)>,
    pub stdio: SandboxStdio,
    pub logs: OutputLogs,
    /// The agent's pid (the process tier), or QEMU's (the microVM tier).
    pub agent_pid: i32,
    /// The agent's control stream: the socketpair of the process tier, the
    /// virtio-serial channel of the microVM tier.
    pub control: UnixStream,
    /// The agent already said it serves (a guest's agent says so while the
    /// VM boots); the process tier's confirms its confinement first.
    pub agent_serving: bool,
    /// The sandbox's environment, put under each exec's own: the microVM
    /// tier's (its guest's agent got none at launch); empty for the
    /// process tier, whose agent has it from its launch plan.
    pub exec_env: Vec<(String, String)>,
    /// Where an exec without a directory of its own starts: the microVM
    /// tier's workspace; None for the process tier (its launch plan's).
    pub exec_cwd: Option<PathBuf>,
    /// Who an exec that names no user runs as: the image's `User`.
    pub exec_user: Option<String>,
    /// The way into a guest's ports (the microVM tier, where the policy
    /// allows them); the process tier's go through its network namespace.
    pub guest_ports: Option<airlock_vm::ports_port::HostPorts>,
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
    /// The image the root comes from (process tier).
    pub image: Option<&'a crate::image::ResolvedImage>,
    /// Who the command and every exec that names no user run as
    /// ([`crate::image::run_as`]); None: root inside.
    pub user: Option<&'a str>,
}

/// The environment variable a test sets to a launch phase's or a later
/// step's name (see [`LAUNCH_PHASES`], [`LATER_STEPS`]) to make the
/// sandbox's owner fail right after it. Read only by debug builds.
pub(crate) const FAIL_AT_ENV: &str = "AIRLOCK_TEST_FAIL_AT";

/// The phases of a launch, in order, as [`FAIL_AT_ENV`] names them.
pub(crate) const LAUNCH_PHASES: &[&str] =
    &["state", "cgroup", "layer", "idmapped", "network", "spawned", "joined", "proxy-ready", "running"];

/// The steps after a launch at which a failure can be injected: `run`'s
/// (attached, relaying, reaped), the supervisor's (serving, stopping) and
/// the shared finalize's (exit-recorded, persisted, artifacts).
pub(crate) const LATER_STEPS: &[&str] =
    &["attached", "relaying", "reaped", "serving", "stopping", "exit-recorded", "persisted", "artifacts"];

/// Marks a phase of the launch as done; fails there when a test asked to.
fn phase_done(phase: &'static str) -> Result<(), RunError> {
    debug_assert!(LAUNCH_PHASES.contains(&phase), "phase {phase} is not listed");
    tracing::debug!(phase, "launch phase done");
    injected_failure(phase)
        .map_or(Ok(()), |_| Err(RunError::InjectedFailure(format!("launch phase {phase}"))))
}

/// Marks a step after the launch as done; fails there when a test asked to.
pub(crate) fn step_done(step: &'static str) -> Result<(), RunError> {
    debug_assert!(LATER_STEPS.contains(&step), "step {step} is not listed");
    tracing::debug!(step, "step done");
    injected_failure(step).map_or(Ok(()), |_| Err(RunError::InjectedFailure(format!("step {step}"))))
}

/// Some(()) when a test asked (through [`FAIL_AT_ENV`]) to fail at `at`.
fn injected_failure(at: &str) -> Option<()> {
    (cfg!(debug_assertions) && std::env::var(FAIL_AT_ENV).is_ok_and(|wanted| wanted == at)).then_some(())
}

/// A launch (or a sandbox's owner after it) failed, and releasing what the
/// sandbox held failed too: both are kept, the original error first.
#[derive(Debug, thiserror::Error)]
#[error("{error}; undoing the launch also failed: {}", undo.join("; "))]
pub struct UndoFailed {
    #[source]
    pub error: RunError,
    /// What could not be released, one line each.
    pub undo: Vec<String>,
}

/// One thing a sandbox holds on the host, as [`undo_order`] releases it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// SIGKILL to the agent (PID 1: its PID namespace dies with it), reaped;
    /// on the microVM tier, to QEMU (the guest dies with it), reaped, and
    /// its directory (sockets, console log) removed.
    Agent,
    /// The egress proxy, killed and reaped.
    Proxy,
    /// The exec trace's listener process, killed and reaped.
    Tracer,
    /// Whatever is left in the cgroup is killed, then its directories go.
    Cgroup,
    /// The writable layer's tmpfs is unmounted (its content discarded).
    Layer,
    /// The id block is given back to the registry — or kept with the
    /// sandbox's directory, see [`block_fate`].
    IdBlock,
}

/// What a sandbox holds at one moment, for [`undo_order`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Holding {
    pub agent: bool,
    pub proxy: bool,
    pub tracer: bool,
    pub cgroup: bool,
    pub layer: bool,
    pub id_block: bool,
}

/// The order of an undo: first every process (the agent, then the proxy,
/// then whatever raced out into the cgroup), then the kernel objects they
/// used, and the id block last, since those ran as its ids.
pub(crate) fn undo_order(holding: Holding) -> Vec<Release> {
    [
        (holding.agent, Release::Agent),
        (holding.proxy, Release::Proxy),
        (holding.tracer, Release::Tracer),
        (holding.cgroup, Release::Cgroup),
        (holding.layer, Release::Layer),
        (holding.id_block, Release::IdBlock),
    ]
    .into_iter()
    .filter_map(|(held, release)| held.then_some(release))
    .collect()
}

/// What becomes of the id block at the end of an undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockFate {
    /// Given back: nothing owned by its ids is left.
    Release,
    /// Kept with the sandbox's directory until `airlock rm`: files owned
    /// by its ids stay there (a layer outside a tmpfs, or one persisted).
    KeptForFiles,
    /// Kept: a process of the sandbox may have survived (the agent or the
    /// cgroup could not be ended), and its ids must not go to another
    /// sandbox while it lives. `airlock rm`/`gc` release it later.
    KeptForSurvivors,
}

/// Decides the id block's fate once the other releases have run.
pub(crate) fn block_fate(files_on_disk: bool, processes_may_survive: bool) -> BlockFate {
    if processes_may_survive {
        BlockFate::KeptForSurvivors
    } else if files_on_disk {
        BlockFate::KeptForFiles
    } else {
        BlockFate::Release
    }
}

/// What a sandbox holds on the host, from its launch to its teardown.
/// Whatever is still held when it is dropped — a launch that failed
/// half-way, `run` or the supervisor failing after the launch (relaying,
/// writing the audit log, persisting the layer), a panic — is released at
/// once, in [`undo_order`]. The normal teardown ([`finalize`]) takes each
/// piece out as it releases it properly.
#[derive(Default)]
pub(crate) struct Held {
    id_block: Option<IdBlock>,
    pub cgroup: Option<SandboxCgroup>,
    pub layer: Option<WritableLayer>,
    pub network: Option<Network>,
    /// The exec trace's listener process.
    pub exec_trace: Option<crate::exec_trace::ExecTracer>,
    /// The agent, until it has been reaped.
    agent_pid: Option<i32>,
    /// The microVM tier: QEMU, in place of an agent process on the host.
    vm: Option<airlock_vm::boot::Vm>,
    /// Files owned by the block's ids are on disk in the sandbox's
    /// directory: the block stays with it (see [`block_fate`]).
    block_owns_files: bool,
}

impl Held {
    fn holding(&self) -> Holding {
        Holding {
            agent: self.agent_pid.is_some() || self.vm.is_some(),
            proxy: self.network.is_some(),
            tracer: self.exec_trace.is_some(),
            cgroup: self.cgroup.is_some(),
            layer: self.layer.is_some(),
            id_block: self.id_block.is_some(),
        }
    }

    /// Ends everything still running in the sandbox: its agent (PID 1,
    /// whose death takes the PID namespace down), then whatever raced out
    /// of it into the cgroup, the proxy among it (whose end is then
    /// expected, not news). The agent is still to be reaped.
    pub fn kill_all(&self) {
        if let Some(pid) = self.agent_pid {
            let _ = rustix::process::kill_process(pid_of(pid), rustix::process::Signal::KILL);
        }
        if let Some(vm) = &self.vm {
            let _ = rustix::process::kill_process(pid_of(vm.pid()), rustix::process::Signal::KILL);
        }
        if let Some(n) = &self.network {
            n.ending();
        }
        if let Some(cg) = &self.cgroup {
            let _ = cg.kill_all();
        }
    }

    /// The agent has been reaped: there is no process to kill any more.
    pub fn agent_reaped(&mut self) {
        self.agent_pid = None;
    }

    /// Reaps the agent (after [`Held::kill_all`]), or kills and reaps QEMU
    /// and removes its directory: the wait status, unless it could not be
    /// reaped.
    pub fn reap_agent(&mut self) -> Option<i32> {
        if let Some(mut vm) = self.vm.take() {
            return vm.kill();
        }
        let status = self.agent_pid.and_then(|pid| airlock_jail::sys::wait_pid(pid).ok());
        self.agent_pid = None;
        status
    }

    /// The microVM tier: why the guest ended on its own (a kernel panic, a
    /// power-off, QEMU's end), read from its console and QEMU's log.
    pub fn vm_ended(&mut self, during: &str) -> Option<airlock_vm::VmError> {
        self.vm.as_mut().map(|vm| vm.ended(during))
    }

    /// The sandbox's directory now holds files owned by the block's ids.
    pub fn block_owns_files(&mut self) {
        self.block_owns_files = true;
    }

    /// The sandbox is kept: it holds its block until its directory is removed.
    pub fn keep_id_block(&mut self) {
        if let Some(block) = self.id_block.take() {
            block.keep();
        }
    }

    /// Releases everything still held, in [`undo_order`]; what failed,
    /// one line each.
    pub fn undo(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        let mut may_survive = false;
        for release in undo_order(self.holding()) {
            match release {
                Release::Agent => {
                    // Dropping the VM kills and reaps QEMU, and removes its directory.
                    drop(self.vm.take());
                    if let Some(pid) = self.agent_pid.take() {
                        let _ = rustix::process::kill_process(pid_of(pid), rustix::process::Signal::KILL);
                        if let Err(e) = airlock_jail::sys::wait_pid(pid) {
                            may_survive = true;
                            failed.push(format!("reaping the agent (pid {pid}): {e}"));
                        }
                    }
                }
                Release::Proxy => {
                    if let Some(network) = self.network.take() {
                        network.abort();
                    }
                }
                Release::Tracer => {
                    if let Some(tracer) = self.exec_trace.take() {
                        tracer.abort();
                    }
                }
                Release::Cgroup => {
                    if let Some(cg) = self.cgroup.take()
                        && let Err(e) = cg.remove()
                    {
                        may_survive = true;
                        failed.push(format!("removing cgroup {}: {e}", cg.name()));
                    }
                }
                Release::Layer => {
                    if let Some(layer) = self.layer.take() {
                        let upper = layer.upper.clone();
                        if let Err(e) = layer.discard() {
                            failed.push(format!("releasing the writable layer of {}: {e}", upper.display()));
                        }
                    }
                }
                Release::IdBlock => {
                    let Some(block) = self.id_block.take() else { continue };
                    match block_fate(self.block_owns_files, may_survive) {
                        // Dropped without being kept: given back to the registry.
                        BlockFate::Release => drop(block),
                        BlockFate::KeptForFiles => {
                            block.keep();
                        }
                        BlockFate::KeptForSurvivors => {
                            let index = block.keep();
                            failed.push(format!(
                                "host id block {index} stays taken until `airlock rm` or `airlock gc`, \
                                 as a process of the sandbox may have survived"
                            ));
                        }
                    }
                }
            }
        }
        failed
    }

    /// Passes `result` on; when it is an error, first releases at once what
    /// is still held, and keeps the undo's failures beside the error.
    pub fn or_undo<T>(&mut self, result: Result<T, RunError>) -> Result<T, RunError> {
        result.map_err(|error| {
            let undo = self.undo();
            if undo.is_empty() { error } else { RunError::LaunchUndo(Box::new(UndoFailed { error, undo })) }
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for failure in self.undo() {
            tracing::warn!(%failure, "releasing what a failed sandbox held");
        }
    }
}

/// Creates everything around the sandbox and starts its agent. A failure
/// half-way releases at once what was set up; nothing is left for `gc`.
pub(crate) fn launch_sandbox(spec: LaunchSpec<'_>) -> Result<Launched, RunError> {
    let mut held = Held::default();
    let result = launch_steps(spec, &mut held);
    held.or_undo(result)
}

fn launch_steps(spec: LaunchSpec<'_>, held: &mut Held) -> Result<Launched, RunError> {
    let LaunchSpec {
        sandbox,
        policy,
        workspace,
        host,
        degraded,
        command,
        terminal,
        workspace_owner,
        image,
        user,
    } = spec;
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
        tier: policy.isolation.tier,
        ports: Vec::new(),
        image: image.map(|i| i.meta.clone()),
        containers_socket: None,
    };
    sandbox.write_meta(&meta)?;
    let mut audit = AuditLog::open(&sandbox.audit_path())?.with_limit(policy.limits.audit_size);
    audit.record(AuditEvent::Created {
        image: meta.image.clone(),
        policy: policy.name.clone(),
        workspace: meta.workspace.clone(),
        workspace_mode: meta.workspace_mode.clone(),
        limits: crate::limits_json(policy),
        degraded: degraded.clone(),
    })?;
    if policy.isolation.tier == Tier::Microvm {
        let one_command = (!command.is_empty()).then_some(OneCommand { terminal });
        let guest = GuestSpec { workspace, workspace_owner, one_command, image, user };
        return launch_vm(sandbox, policy, guest, host, meta, audit, held);
    }

    // As root, the sandbox's ids are a block of its own, held until its
    // directory is removed; given back at once if the launch fails below.
    // Taken once meta.json exists, so that a sandbox refused for want of a
    // block is listed (failed) and can be removed.
    if provisions.own_ids {
        held.id_block = Some(Registry::host()?.allocate(sandbox.path())?);
    }
    let id_map = IdMap::for_current_user(held.id_block.as_ref().map_or(0, IdBlock::first_host_uid));
    meta.host_uid = Some(id_map.host_root_uid);
    meta.id_block = held.id_block.as_ref().map(IdBlock::index);
    // Named in the same write as the ids, before it exists (one write, and
    // one sync, fewer per launch); gc finds a cgroup by the sandbox's name.
    meta.cgroup = provisions.cgroup.as_ref().map(|_| crate::cgroup_name(sandbox));
    sandbox.write_meta(&meta)?;

    phase_done("state")?;
    // The exec trace's listener process starts now and gets ready while
    // the cgroup, the layer and the network are made (killed if the launch
    // fails first); it confines itself once the agent below exists.
    let traced = policy.audit.exec_trace;
    let prepared_trace = if traced { Some(prepare_exec_trace(&name, id_map.host_root_uid)?) } else { None };
    // On a pure v2 host the agent starts in its cgroup (clone3); elsewhere
    // it is moved there once it exists.
    let mut start_in_cgroup = None;
    if let (Some(limits), Some(cgroup_name)) = (&provisions.cgroup, &meta.cgroup) {
        let cgroup = SandboxCgroup::create_on(&host.cgroups, cgroup_name, limits)?;
        start_in_cgroup = cgroup.start_target();
        if start_in_cgroup.is_none() {
            // The agent's move below would wait for the kernel; that wait
            // runs while the layer, the network and the agent are made. Not
            // sooner: it holds the lock that creating a cgroup takes.
            airlock_jail::cgroup::start_move_wait(&host.cgroups);
        }
        held.cgroup = Some(cgroup);
    }

    phase_done("cgroup")?;
    if let Some(l) = &provisions.layer {
        held.layer = Some(WritableLayer::create(sandbox, l.size_limit, id_map.host_root_uid)?);
    }
    let layer = held.layer.as_ref();
    let rootfs = sandbox.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| RunError::State(rootfs.clone(), e))?;
    let (hosts, resolv_conf) = crate::network::write_name_files(sandbox.path(), &name)?;
    let paths = SandboxPaths {
        rootfs,
        upper: layer.map_or_else(|| sandbox.upper_dir(), |l| l.upper.clone()),
        work: layer.map_or_else(|| sandbox.work_dir(), |l| l.work.clone()),
        hosts,
        resolv_conf,
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
    held.network = crate::network::Network::start(
        policy,
        &name,
        sandbox.path(),
        &sandbox.audit_path(),
        id_map.host_root_uid,
        held.cgroup.as_ref(),
    )?;
    let network = held.network.as_ref();
    let secret_values = network.map(|n| n.secret_values()).unwrap_or_default();
    keep_secrets_out(sandbox, policy, &mut meta, &mut audit, &secret_values)?;
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
            image,
            user,
            host_env: &host_env,
            network: network.map(|n| plan::NetworkInput {
                ports: n.ports,
                env: &network_env,
                bundle: &n.bundle,
                bundle_targets: &[crate::network::SANDBOX_CA_BUNDLE, crate::network::SYSTEM_CA_BUNDLE],
                redirect: n.redirect,
            }),
        },
    );

    let exe = crate::role_process::helper_exe()?;
    phase_done("network")?;
    let spawned = spawn::spawn(
        &SpawnRequest {
            agent_exe: &exe,
            agent_args: &["airlock-agent", crate::AGENT_ROLE],
            stdio: stdio.child_fds(),
            workspace_tree: tree.as_ref().map(|t| std::os::fd::AsFd::as_fd(t)),
            egress_channel: network.and_then(|n| n.agent_end.as_ref()).map(std::os::fd::AsFd::as_fd),
            id_map: &id_map,
            cgroup: start_in_cgroup.as_ref().map(std::os::fd::AsFd::as_fd),
        },
        |_| Ok(()),
    )?;
    drop((tree, start_in_cgroup));
    let agent_pid = spawned.pid;
    let agent_in_cgroup = spawned.in_cgroup;
    held.agent_pid = Some(agent_pid);
    stdio.release_child_ends();
    let mut control = spawned.control;
    // The exec trace's listener process confines itself while the agent
    // builds the sandbox; it needs the sandbox's user namespace, which
    // exists from here on.
    debug_assert_eq!(launch.jail.exec_trace, traced, "the plan traces execs as the policy says");
    if let Some(prepared) = prepared_trace {
        held.exec_trace = Some(start_exec_trace(prepared, sandbox, policy, agent_pid, &secret_values)?);
    }
    phase_done("spawned")?;
    airlock_proto::send(&mut control, &HostMessage::Launch(Box::new(launch)))?;
    // While the agent builds the root filesystem: the cgroup write, which
    // may wait for a kernel grace period. Untrusted code waits for Proceed.
    match &held.cgroup {
        Some(_) if agent_in_cgroup => tracing::debug!("the agent was cloned into its cgroup"),
        Some(cg) => cg.add_pid(agent_pid)?,
        None => {}
    }
    phase_done("joined")?;
    // The egress proxy is not waited for: it starts at the sandbox's first
    // connection, which waits in the egress channel until it serves. The
    // exec trace is: every exec waits for its listener.
    if let Some(tracer) = &held.exec_trace {
        tracer.wait_ready()?;
    }
    phase_done("proxy-ready")?;
    airlock_proto::send(&mut control, &HostMessage::Proceed)?;
    // Untrusted code may write from here on: a layer outside a tmpfs then
    // holds files owned by the block's ids.
    if held.layer.as_ref().is_some_and(|l| !l.on_tmpfs()) {
        held.block_owns_files();
    }
    if let Some(n) = held.network.as_mut() {
        // The agent holds its own copy now.
        drop(n.agent_end.take());
    }

    meta.state = SandboxState::Running;
    meta.started_at = Some(now_rfc3339());
    sandbox.write_meta(&meta)?;
    phase_done("running")?;

    // Up: from here on the sandbox's owner releases all of it, through
    // `finalize` or, failing, by dropping what it holds.
    let held = std::mem::take(held);
    Ok(Launched {
        name,
        meta,
        audit,
        held,
        secret_values,
        stdio,
        logs,
        agent_pid,
        control,
        agent_serving: false,
        exec_env: Vec::new(),
        exec_cwd: None,
        exec_user: user.map(str::to_owned),
        guest_ports: None,
    })
}

/// Starts the exec trace's listener process for sandbox `name`, ahead of
/// its agent; as root it runs as the id of the sandbox's id block.
fn prepare_exec_trace(
    name: &str,
    block_first_uid: u32,
) -> Result<crate::exec_trace::PreparedTracer, RunError> {
    let run_as = if rustix::process::geteuid().is_root() {
        let id = crate::exec_trace::tracer_id(block_first_uid)?;
        Some((id, id))
    } else {
        None
    };
    crate::exec_trace::prepare(name, run_as)
}

/// Has the prepared listener confine itself in the sandbox of the agent
/// `agent_pid`; its events go to the audit log, redacted.
fn start_exec_trace(
    prepared: crate::exec_trace::PreparedTracer,
    sandbox: &SandboxDir,
    policy: &Policy,
    agent_pid: i32,
    secret_values: &[(String, Vec<u8>)],
) -> Result<crate::exec_trace::ExecTracer, RunError> {
    // Redacting: an argument can carry a value a server echoed back.
    let mut audit =
        AuditLog::open(&sandbox.audit_path())?.with_limit(policy.limits.audit_size).redacting(secret_values);
    let notice = move |notice| {
        let _ = audit.record(crate::exec_trace::audit_event(notice));
    };
    prepared.start(agent_pid, notice)
}

/// Takes the exec trace's listener, which the agent sends right behind
/// `Confined { exec_trace: true }`, and hands it to the listener process.
pub(crate) fn take_exec_listener(control: &UnixStream, held: &mut Held) -> Result<(), RunError> {
    let (tag, listener) = airlock_proto::recv_tagged_fd(control)
        .map_err(|e| RunError::ExecTrace(format!("receiving the sandbox's exec listener: {e}")))?;
    if tag != airlock_proto::EXEC_LISTENER_TAG {
        return Err(RunError::ExecTrace("the agent sent another descriptor than its exec listener".into()));
    }
    match held.exec_trace.as_mut() {
        Some(tracer) => tracer.hand_over(listener),
        // Not asked for: nobody would answer its execs.
        None => Err(RunError::ExecTrace("the agent traces execs, which its plan did not ask for".into())),
    }
}

/// What a microVM's launch needs beyond the process tier's arguments.
struct GuestSpec<'a> {
    workspace: Option<&'a Path>,
    /// The uid that must own the workspace (a sandbox the daemon makes for
    /// another user), checked on the tree virtiofsd gets in mode rw.
    workspace_owner: Option<u32>,
    /// `airlock run`: its command's output, arriving over the channel, is
    /// written to the stdio's sandbox ends, and so reaches the caller and
    /// the logs as the process tier's does.
    one_command: Option<OneCommand>,
    /// The image the guest's root comes from (its layers, Env, WorkingDir).
    image: Option<&'a crate::image::ResolvedImage>,
    /// Who the command and execs that name no user run as.
    user: Option<&'a str>,
}

/// The microVM tier's launch, from the sandbox's recorded creation on: the
/// guest boots (QEMU held from its spawn on, killed on undo) and its
/// agent's channel is the control stream. The cgroup (sized for QEMU),
/// the id block (for the proxy's uid and virtiofsd's id map), an overlay
/// workspace's writable layer and, in mode rw, the id-mapped workspace are
/// the process tier's (what the guest writes reaches them through a jailed
/// virtiofsd); the jail the guest's own kernel replaces; the supervisor,
/// relays, logs, audit and finalize are the same.
fn launch_vm(
    sandbox: &SandboxDir,
    policy: &Policy,
    guest: GuestSpec<'_>,
    host: &HostReport,
    mut meta: SandboxMeta,
    mut audit: AuditLog,
    held: &mut Held,
) -> Result<Launched, RunError> {
    let GuestSpec { workspace, workspace_owner, one_command, image, user } = guest;
    let name = meta.name.clone();
    // QEMU runs in the sandbox's own cgroup, sized for it (the guest's RAM
    // and QEMU's overhead, and the egress proxy's allowance). Named in
    // meta.json before it exists, so that gc finds it should this process
    // die; `check` refused a host without cgroups unless the policy allows
    // that.
    meta.cgroup = host.enforces(airlock_jail::probe::Feature::Cgroups).then(|| crate::cgroup_name(sandbox));
    // As root, the egress proxy's own uid derives from an id block of the
    // sandbox's (as for the process tier), and so do virtiofsd's ids; the
    // guest itself needs none.
    let egress = policy.network.has_egress();
    // An overlay workspace's writable layer, as the process tier's (as
    // root a tmpfs of the policy's disk size), served to the guest by a
    // virtiofsd whose user namespace maps the guest's ids to the sandbox's
    // id block: the same upper directory, owned as a process-tier
    // sandbox's, that the diff reads.
    let layer = plan::provisions(policy, workspace.is_some(), host).layer;
    // Mode rw: the workspace itself, served by virtiofsd (never QEMU).
    let rw_workspace = workspace.filter(|_| policy.workspace.mode == WorkspaceMode::Rw);
    if (egress || layer.is_some() || rw_workspace.is_some()) && host.running_as_root {
        held.id_block = Some(Registry::host()?.allocate(sandbox.path())?);
        meta.id_block = held.id_block.as_ref().map(IdBlock::index);
    }
    let first_uid =
        held.id_block.as_ref().map_or_else(|| rustix::process::getuid().as_raw(), IdBlock::first_host_uid);
    if meta.cgroup.is_some() || meta.id_block.is_some() {
        sandbox.write_meta(&meta)?;
    }
    phase_done("state")?;
    if let Some(cgroup_name) = &meta.cgroup {
        let limits = crate::microvm::cgroup_limits(policy);
        held.cgroup = Some(SandboxCgroup::create_on(&host.cgroups, cgroup_name, &limits)?);
    }
    phase_done("cgroup")?;
    let block_uid = held.id_block.as_ref().map(IdBlock::first_host_uid);
    let writable = match (layer, rw_workspace) {
        (Some(layer), _) => {
            // Rootless there is no tmpfs: the layer is kept apart, so that
            // virtiofsd serves its directory and nothing else of the
            // sandbox's (its size then unbounded, as the process tier's).
            let layer = held.layer.insert(match layer.size_limit {
                Some(size) => WritableLayer::create(sandbox, Some(size), first_uid)?,
                None => WritableLayer::create_apart(sandbox, first_uid)?,
            });
            layer.upper.parent().map(|dir| WritableShare {
                writes: Writes::Layer,
                dir: dir.to_path_buf(),
                first_host_uid: block_uid,
                tree: None,
            })
        }
        (None, Some(ws)) => {
            // As root the process tier's id-mapped tree, so the guest's
            // ids are the host's there and its root is the workspace's
            // (rootless virtiofsd is the caller, and binds it).
            let tree = match block_uid {
                Some(uid) => Some(std::sync::Arc::new(spawn::idmapped_tree(
                    ws,
                    &IdMap::for_current_user(uid),
                    workspace_owner,
                )?)),
                None => None,
            };
            Some(WritableShare {
                writes: Writes::Workspace,
                dir: ws.to_path_buf(),
                first_host_uid: block_uid,
                tree,
            })
        }
        (None, None) => None,
    };
    phase_done("layer")?;
    // The sandbox's egress proxy, as the process tier's (in the sandbox's
    // cgroup); its channel goes to the guest's egress port instead of to
    // an agent's network namespace.
    held.network = Network::start(
        policy,
        &name,
        sandbox.path(),
        &sandbox.audit_path(),
        first_uid,
        held.cgroup.as_ref(),
    )?;
    let network = held.network.as_ref();
    let secret_values = network.map(|n| n.secret_values()).unwrap_or_default();
    keep_secrets_out(sandbox, policy, &mut meta, &mut audit, &secret_values)?;
    let network_env = network.map(|n| n.environment()).unwrap_or_default();
    let logs = OutputLogs::open(sandbox, policy.limits.log_size)?;
    // Output arrives over the channel, not from a child's descriptors (a
    // terminal's too: the guest's agent opens it and relays it). Written
    // to the stdio's sandbox ends, it is redacted there as the process
    // tier's is.
    let terminal = one_command.is_some_and(|c| c.terminal);
    let mut stdio = SandboxStdio::new(logs.stdout.clone(), logs.stderr.clone(), terminal, &secret_values)
        .map_err(|e| RunError::State(sandbox.stdout_log(), e))?;
    if one_command.is_none() {
        stdio.release_child_ends();
    }
    let host_env = |k: &str| std::env::var(k).ok();
    let image_env = image.map_or(&[][..], |i| &i.config.env[..]);
    let mut exec_env: Vec<(String, String)> =
        plan::environment_of(policy, &name, &host_env, image_env, &network_env).into_iter().collect();
    if policy.isolation.containers {
        // The docker CLI inside finds the guest's engine.
        exec_env
            .push(("DOCKER_HOST".to_owned(), format!("unix://{}", airlock_vm::containers::ENGINE_SOCKET)));
    }
    // Without a workspace, the image's WorkingDir (as on the process tier).
    let exec_cwd = workspace.map(Path::to_path_buf).or_else(|| {
        image.and_then(|i| i.config.working_dir.as_deref()).filter(|d| d.starts_with('/')).map(PathBuf::from)
    });
    phase_done("network")?;
    // The guest's connections reach the proxy over the egress channel, as
    // the process tier's do: its process starts at the first of them.
    let host_egress = match held.network.as_mut() {
        Some(network) => {
            let handover =
                network.agent_end.take().ok_or_else(|| RunError::Egress("no egress channel".into()))?;
            let bundle =
                std::fs::read(&network.bundle).map_err(|e| RunError::State(network.bundle.clone(), e))?;
            // With transparent egress the guest redirects as the process
            // tier's agent does, and the host takes what it redirected.
            Some(airlock_vm::egress_port::HostEgress { handover, bundle, redirect: network.redirect })
        }
        None => None,
    };
    phase_done("proxy-ready")?;
    // A container engine's disk: the guest's alone to format and mount;
    // in the sandbox's directory, so it goes with the sandbox.
    let engine_disk = match policy.isolation.containers {
        true => Some(crate::containers::create_disk(sandbox, policy.limits.disk)?),
        false => None,
    };
    let vm = crate::microvm::boot(
        policy,
        &name,
        workspace,
        held.cgroup.as_ref(),
        host_egress,
        writable,
        image,
        engine_disk,
    )?;
    let agent_pid = vm.pid();
    let guest_ports = vm.ports.clone();
    let control = vm.channel.try_clone().map_err(|e| RunError::State(sandbox.path().to_path_buf(), e))?;
    held.vm = Some(vm);
    // The guest may write from here on: a layer outside a tmpfs (as root,
    // only where the host could not give one) then holds the block's files.
    if held.id_block.is_some() && held.layer.as_ref().is_some_and(|l| !l.on_tmpfs()) {
        held.block_owns_files();
    }
    phase_done("spawned")?;
    meta.state = SandboxState::Running;
    meta.started_at = Some(now_rfc3339());
    sandbox.write_meta(&meta)?;
    phase_done("running")?;
    let held = std::mem::take(held);
    Ok(Launched {
        name,
        meta,
        audit,
        held,
        secret_values,
        stdio,
        logs,
        agent_pid,
        control,
        agent_serving: true,
        exec_env,
        exec_cwd,
        exec_user: user.map(str::to_owned),
        guest_ports,
    })
}

/// `airlock run`'s one command on the microVM tier.
#[derive(Clone, Copy)]
struct OneCommand {
    /// The caller sits at a terminal: the command gets one in the guest.
    terminal: bool,
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

/// What is left of a sandbox once its agent has ended (and been reaped).
pub(crate) struct Remains {
    pub name: String,
    pub meta: SandboxMeta,
    pub audit: AuditLog,
    /// The agent reaped. Its proxy is stopped first, so that the proxy's
    /// last events reach the audit log before the sandbox's end is
    /// recorded; what finalize does not get to is released on its error.
    pub held: Held,
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
    // Given up before the directory is removed; otherwise the caller keeps
    // it until it has recorded a failure.
    live: &mut Option<LiveLock>,
    notify: &mut dyn FnMut(Notice),
) -> Result<RunOutcome, RunError> {
    let Remains { name, mut meta, mut audit, mut held, mut stdio, secret_values, final_state } = remains;
    let result = finalize_steps(
        sandbox,
        policy,
        workspace,
        (&mut meta, &mut audit, &mut held, &mut stdio, &secret_values),
        final_state,
        &ending,
        duration,
        remove,
        notify,
    );
    // A container engine's disk holds nothing once its guest is gone (the
    // guest formats it at every boot): its space goes back now.
    let _ = std::fs::remove_file(sandbox.path().join(crate::containers::DISK));
    let (outcome, removing) = held.or_undo(result)?;
    if removing {
        audit.record(AuditEvent::Removed {
            reason: if remove == Some(true) {
                "--rm".into()
            } else {
                format!("cleanup rule of policy {}", policy.name)
            },
        })?;
        drop(audit);
        drop(live.take());
        remove_sandbox_dir(sandbox, meta.id_block)?;
    } else {
        held.keep_id_block();
    }
    tracing::debug!("phase: cleaned up");
    Ok(RunOutcome { name, ..outcome })
}

/// What [`finalize`] works on, borrowed from the [`Remains`].
type Parts<'a> =
    (&'a mut SandboxMeta, &'a mut AuditLog, &'a mut Held, &'a mut SandboxStdio, &'a [(String, Vec<u8>)]);

/// The steps of [`finalize`] up to the cleanup rule; the outcome (without
/// the name) and whether the sandbox is to be removed. Each releases what
/// it is done with; what an error leaves is released by the caller.
#[allow(clippy::too_many_arguments)]
fn finalize_steps(
    sandbox: &SandboxDir,
    policy: &Policy,
    workspace: Option<&Path>,
    (meta, audit, held, stdio, secret_values): Parts<'_>,
    final_state: SandboxState,
    ending: &Ending,
    duration: Duration,
    remove: Option<bool>,
    notify: &mut dyn FnMut(Notice),
) -> Result<(RunOutcome, bool), RunError> {
    if let Some(n) = held.network.take() {
        n.stop();
    }
    // The last ends (processes killed with the sandbox) before its own.
    if let Some(tracer) = held.exec_trace.take() {
        tracer.stop();
    }
    stdio.release_child_ends();
    stdio.finish();
    // Removed as soon as it is finalized: nothing of it needs forcing to disk.
    let removed_at_once = remove == Some(true) && ending.setup_failed.is_none();
    if removed_at_once {
        audit.about_to_be_removed();
    }
    let oom_killed = held.cgroup.as_ref().is_some_and(|cg| cg.oom_kills() > 0);
    let exit_code = ending.exit_code();
    audit.record(AuditEvent::Exited {
        code: ending.code,
        signal: ending.signal,
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        oom_killed,
    })?;
    step_done("exit-recorded")?;
    if let Some(cg) = held.cgroup.take()
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
    sandbox.write_meta(meta)?;

    if let Some(reason) = &ending.setup_failed {
        audit.record(AuditEvent::Error { stage: "setup".into(), message: reason.clone() })?;
        // The agent is gone and no untrusted code ran: nothing is owned by
        // the block's ids any more; the caller's undo gives it back.
        held.block_owns_files = false;
        return Err(RunError::SetupFailed(reason.clone()));
    }
    if let Some((_, message)) = &ending.exec_failed {
        notify(Notice::Warning(message.clone()));
    }

    let succeeded = exit_code == 0;
    let action = if succeeded { policy.cleanup.on_success } else { policy.cleanup.on_failure };
    let remove = remove.unwrap_or(action == CleanupAction::Remove);

    // Finalize: persist the writable layer, summarize the change, capture artifacts.
    let mut changes = None;
    let mut artifacts = Vec::new();
    let live_upper = held.layer.as_ref().map(|l| l.upper.clone());
    if let (Some(live_upper), Some(ws)) = (live_upper, workspace) {
        // Scrubbed before it is copied to disk (as root it is still on its
        // tmpfs here): an echoed credential never reaches the state dir.
        if let Err(e) = crate::network::scrub_tree(&live_upper, secret_values) {
            notify(Notice::Warning(format!("could not scrub secrets from the layer: {e}")));
        }
        // A sandbox about to be removed is summarized from its live layer;
        // copying it to disk first would be wasted work.
        let review_upper = if remove {
            live_upper
        } else {
            if let Some(layer) = &held.layer {
                layer.copy_to_state(sandbox)?;
            }
            // Its files, owned by the block's ids, are on disk now.
            held.block_owns_files();
            release_layer(held, notify);
            sandbox.upper_dir()
        };
        step_done("persisted")?;
        let diff = airlock_workspace::compute_diff(ws, &review_upper)?;
        let stat = diff.stat();
        audit.record(AuditEvent::DiffSummary {
            added: stat.files_added + stat.dirs_added,
            modified: stat.files_modified + stat.type_changed,
            deleted: stat.files_deleted + stat.dirs_deleted,
            digest: Some(diff.digest().to_string()),
        })?;
        audit.record_all(diff.changes.iter().map(change_event))?;
        if !remove && !secret_values.is_empty() {
            // The workspace's side of the diff (context, removed lines) is
            // the host's and may hold a secret's value: the patch an export
            // carries is made now, while the values are known, redacted.
            if let Err(e) = write_redacted_patch(sandbox, &diff, ws, &review_upper, secret_values) {
                notify(Notice::Warning(format!("could not keep the redacted diff for export: {e}")));
            }
        }
        changes = Some(stat);
    }
    release_layer(held, notify);
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
                    .map(|f| PathBuf::from(crate::network::redact_str(&f.to_string_lossy(), secret_values)))
                    .collect();
                audit.record(AuditEvent::ArtifactsCaptured { files: names, bytes })?;
                artifacts = files;
            }
            Err(e) => notify(Notice::Warning(format!("artifact capture: {e}"))),
        }
    }

    // A credential echoed back by a server must not stay on disk.
    for dir in [sandbox.artifacts_dir()] {
        if let Err(e) = crate::network::scrub_tree(&dir, secret_values) {
            notify(Notice::Warning(format!("could not scrub secrets from {}: {e}", dir.display())));
        }
    }
    step_done("artifacts")?;
    tracing::debug!("phase: finalized");
    let outcome = RunOutcome {
        name: String::new(),
        exit_code,
        timed_out: ending.timed_out,
        oom_killed,
        changes,
        removed: remove,
        artifacts,
    };
    Ok((outcome, remove))
}

/// Once the secrets' values are known (read by the network's setup): the
/// audit log redacts them from every event from now on, and the command
/// line in meta.json and the resolved policy (whose `env.set` holds
/// `--env` values) are rewritten without them, so a value passed on the
/// command line stays out of the state directory and what is exported
/// from it.
fn keep_secrets_out(
    sandbox: &SandboxDir,
    policy: &Policy,
    meta: &mut SandboxMeta,
    audit: &mut AuditLog,
    secrets: &[(String, Vec<u8>)],
) -> Result<(), RunError> {
    if secrets.is_empty() {
        return Ok(());
    }
    audit.redact(secrets);
    let command: Vec<String> = meta.command.iter().map(|a| crate::network::redact_str(a, secrets)).collect();
    if command != meta.command {
        meta.command = command;
        sandbox.write_meta(meta)?;
    }
    let text = policy.to_toml();
    let clean = crate::network::redact_str(&text, secrets);
    if clean != text {
        std::fs::write(sandbox.policy_path(), clean)
            .map_err(|e| RunError::State(sandbox.policy_path(), e))?;
    }
    Ok(())
}

/// The audit event of one changed path.
fn change_event(change: &airlock_workspace::Change) -> AuditEvent {
    let name = |value: serde_json::Result<serde_json::Value>| {
        value.ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    };
    AuditEvent::WorkspaceChanged {
        path: change.path.clone(),
        kind: name(serde_json::to_value(change.kind)),
        old_type: change.old_type.map(|t| name(serde_json::to_value(t))),
        new_type: change.new_type.map(|t| name(serde_json::to_value(t))),
        size: change.size,
        sha256: change.content_sha256.map(|h| h.to_hex()),
    }
}

/// Writes the sandbox's unified diff, secrets redacted, to
/// [`SandboxDir::redacted_patch_path`] (0600, replaced atomically).
fn write_redacted_patch(
    sandbox: &SandboxDir,
    diff: &airlock_workspace::Diff,
    lower: &Path,
    upper: &Path,
    secrets: &[(String, Vec<u8>)],
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = Vec::new();
    diff.render_unified(lower, upper, &mut text)?;
    let clean = airlock_egress::redact::redact_all(&text, secrets);
    let path = sandbox.redacted_patch_path();
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    file.write_all(&clean)?;
    drop(file);
    std::fs::rename(&tmp, &path)
}

/// Unmounts the writable layer's tmpfs (its content is on disk or not
/// wanted by now).
fn release_layer(held: &mut Held, notify: &mut dyn FnMut(Notice)) {
    if let Some(layer) = held.layer.take() {
        let upper = layer.upper.clone();
        if let Err(e) = layer.discard() {
            notify(Notice::Warning(format!(
                "could not release the writable layer of {}: {e}; `airlock gc` will retry",
                upper.display()
            )));
        }
    }
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
        let mut held = Held::default();
        held.layer = Some(WritableLayer::on_tmpfs_for_test(
            not_mounted.join("upper"),
            not_mounted.join("work"),
            not_mounted.clone(),
        ));
        let undo = held.undo();
        assert_eq!(undo.len(), 1, "{undo:?}");
        assert!(undo[0].contains("writable layer"), "{undo:?}");
        assert!(held.layer.is_none(), "released once, not again on drop");

        let injected = || RunError::InjectedFailure("launch phase layer".into());
        let error = RunError::LaunchUndo(Box::new(UndoFailed { error: injected(), undo }));
        let text = error.to_string();
        assert!(text.starts_with("failure injected for a test at launch phase layer; undoing"), "{text}");
        assert!(text.contains("writable layer"), "{text}");
        let RunError::LaunchUndo(both) = &error else { unreachable!() };
        let source = std::error::Error::source(both.as_ref()).unwrap();
        assert_eq!(source.to_string(), injected().to_string());
    }

    #[test]
    fn an_empty_guard_undoes_nothing() {
        assert!(Held::default().undo().is_empty());
        assert_eq!(undo_order(Holding::default()), Vec::new());
    }

    #[test]
    fn processes_go_first_and_the_id_block_last() {
        let all =
            Holding { agent: true, proxy: true, tracer: true, cgroup: true, layer: true, id_block: true };
        assert_eq!(
            undo_order(all),
            vec![
                Release::Agent,
                Release::Proxy,
                Release::Tracer,
                Release::Cgroup,
                Release::Layer,
                Release::IdBlock
            ]
        );
        // After the agent was reaped and the proxy stopped (a finalize that
        // failed half-way): the rest, in the same order.
        let late = Holding { cgroup: true, layer: true, id_block: true, ..Holding::default() };
        assert_eq!(undo_order(late), vec![Release::Cgroup, Release::Layer, Release::IdBlock]);
        let no_cgroup = Holding { agent: true, id_block: true, ..Holding::default() };
        assert_eq!(undo_order(no_cgroup), vec![Release::Agent, Release::IdBlock]);
    }

    #[test]
    fn the_block_is_given_back_only_when_nothing_of_its_ids_is_left() {
        assert_eq!(block_fate(false, false), BlockFate::Release);
        assert_eq!(block_fate(true, false), BlockFate::KeptForFiles);
        assert_eq!(block_fate(false, true), BlockFate::KeptForSurvivors);
        assert_eq!(block_fate(true, true), BlockFate::KeptForSurvivors);
    }

    /// A registry in a temporary directory and a sandbox directory that
    /// holds a block of it.
    fn block_for_test(tmp: &Path) -> (Registry, PathBuf, IdBlock) {
        let registry = Registry::at(tmp.join("registry"), 0..4);
        let sandbox = tmp.join("sandbox");
        std::fs::create_dir(&sandbox).unwrap();
        let block = registry.allocate(&sandbox).unwrap();
        (registry, sandbox, block)
    }

    #[test]
    fn dropping_what_a_failed_sandbox_held_gives_its_block_back() {
        let tmp = tempfile::tempdir().unwrap();
        let (registry, sandbox, block) = block_for_test(tmp.path());
        let index = block.index();
        let mut held = Held::default();
        held.id_block = Some(block);
        assert_eq!(registry.holder(index).unwrap(), Some(sandbox.clone()));
        drop(held);
        assert_eq!(registry.holder(index).unwrap(), None, "released on drop");
    }

    #[test]
    fn a_block_whose_ids_own_files_on_disk_stays_with_the_sandbox() {
        let tmp = tempfile::tempdir().unwrap();
        let (registry, sandbox, block) = block_for_test(tmp.path());
        let index = block.index();
        let mut held = Held::default();
        held.id_block = Some(block);
        held.block_owns_files();
        assert_eq!(held.undo(), Vec::<String>::new());
        assert_eq!(registry.holder(index).unwrap(), Some(sandbox), "kept for the layer on disk");
    }

    #[test]
    fn a_failure_is_passed_on_after_the_undo() {
        let tmp = tempfile::tempdir().unwrap();
        let (registry, _sandbox, block) = block_for_test(tmp.path());
        let index = block.index();
        let mut held = Held::default();
        held.id_block = Some(block);
        let result: Result<(), RunError> = Err(RunError::InjectedFailure("step relaying".into()));
        let error = held.or_undo(result).unwrap_err();
        assert!(matches!(&error, RunError::InjectedFailure(at) if at == "step relaying"), "{error}");
        assert_eq!(registry.holder(index).unwrap(), None, "released before the error is returned");
        assert!(held.or_undo(Ok(7)).is_ok_and(|v| v == 7));
    }
}
