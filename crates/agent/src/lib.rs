//! airlock's agent: PID 1 inside the sandbox.
//!
//! It reads its launch plan from the control channel, confines itself (and
//! so everything it will start) with the jail's in-sandbox steps, runs the
//! command in its own session, forwards the signals the supervisor sends,
//! reaps every orphan, and reports how the command ended. When the command
//! ends, the agent exits, and the kernel kills whatever the command left
//! behind in the PID namespace.

pub mod egress;
mod files;
mod guest_trace;
mod oom;
mod program;
mod service;
mod signals;
mod users;
mod workload;

use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use airlock_jail::setup;
use airlock_jail::spawn::AGENT_CONTROL_FD;
use airlock_proto::{AgentMessage, HostMessage, Launch};

/// Exit code when the agent itself fails (mirrors `airlock run`'s 125).
pub(crate) const AGENT_FAILED: i32 = 125;

/// The agent's entry point; returns the process exit code.
pub fn main() -> i32 {
    // Re-armed after exec: if the supervisor dies, so does the sandbox.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    // The channels to the host (control, egress) stay the agent's: nothing
    // it starts may inherit them.
    if let Err(e) = airlock_jail::sys::cloexec_from(3) {
        eprintln!("airlock agent: cannot protect its channels: {e}");
        return AGENT_FAILED;
    }
    // SAFETY: the supervisor placed the agent's end of the control channel at
    // this descriptor number; nothing else in this process owns it.
    let mut control = unsafe { UnixStream::from_raw_fd(AGENT_CONTROL_FD) };
    let launch = match airlock_proto::recv::<_, HostMessage>(&mut control) {
        Ok(Some(HostMessage::Launch(launch))) => launch,
        Ok(Some(other)) => {
            report(
                &mut control,
                AgentMessage::SetupFailed {
                    step: "read the launch plan".into(),
                    message: format!("expected Launch first, got {other:?}"),
                },
            );
            return AGENT_FAILED;
        }
        // The supervisor went away before sending a plan: nothing to do.
        Ok(None) => return AGENT_FAILED,
        Err(e) => {
            report(
                &mut control,
                AgentMessage::SetupFailed { step: "read the launch plan".into(), message: e.to_string() },
            );
            return AGENT_FAILED;
        }
    };
    // Before the agent's /proc is replaced and Landlock confines it.
    oom::keep_handle();
    if let Err(e) = setup::build(&launch.jail) {
        return setup_failed(&mut control, e.step, &e.message);
    }
    // Untrusted code runs only once the supervisor confirms the cgroup.
    match airlock_proto::recv::<_, HostMessage>(&mut control) {
        Ok(Some(HostMessage::Proceed)) => {}
        Ok(None) => return AGENT_FAILED,
        Ok(Some(other)) => {
            return setup_failed(&mut control, "wait for the cgroup", &format!("unexpected {other:?}"));
        }
        Err(e) => return setup_failed(&mut control, "wait for the cgroup", &e),
    }
    // A long-lived sandbox (no command) may be asked to run an exec as
    // another user, and a command may run as its image's user; the agent
    // keeps what switching ids takes, nothing more (the command's change of
    // uid drops it).
    let keep = if launch.command.is_empty() || launch.user.is_some() {
        setup::AgentPrivileges::SwitchIds
    } else {
        setup::AgentPrivileges::None
    };
    match setup::confine(&launch.jail, keep) {
        Ok(confinement) => {
            let exec_trace = confinement.exec_listener.is_some();
            report(&mut control, AgentMessage::Confined { landlock: confinement.landlock, exec_trace });
            // Right behind Confined: the listener every exec now waits on.
            // The agent keeps no copy, so only the host can answer.
            if let Some(listener) = confinement.exec_listener
                && let Err(e) = airlock_proto::send_tagged_fd(
                    &control,
                    airlock_proto::EXEC_LISTENER_TAG,
                    listener.as_fd(),
                )
            {
                return setup_failed(&mut control, "hand the exec trace's listener to the host", &e);
            }
        }
        Err(e) => return setup_failed(&mut control, e.step, &e.message),
    }
    run_command(&mut control, &launch)
}

/// The agent of a microVM guest (`airlock_vm`'s PID 1): the guest's kernel
/// and the VM are the boundary, so no jail is built; the agent serves
/// execs and file operations as in a long-lived sandbox. `connect` opens
/// the channel to the host once the signals the agent waits for are
/// blocked, so that threads it starts inherit the mask. `workload`: the
/// `cgroup.procs` of the cgroup every process it starts goes into.
pub fn serve_guest(
    env: Vec<(String, String)>,
    workload: Option<OwnedFd>,
    exec_trace: bool,
    connect: impl FnOnce() -> io::Result<UnixStream>,
) -> i32 {
    oom::keep_handle();
    if let Some(procs) = workload {
        workload::set(procs);
    }
    let waiter = match signals::Waiter::install() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("airlock guest agent: cannot install signal handlers: {e}");
            return AGENT_FAILED;
        }
    };
    // Before anything is started, so that every process inherits it; a
    // trace the policy asked for and that cannot be had is a refusal.
    let trace = if exec_trace {
        match guest_trace::install() {
            Ok(installed) => Some(installed),
            Err(e) => {
                eprintln!("airlock guest agent: {e}");
                return AGENT_FAILED;
            }
        }
    } else {
        None
    };
    let control = match connect() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("airlock guest agent: cannot open the channel to the host: {e}");
            return AGENT_FAILED;
        }
    };
    let launch = Launch {
        jail: guest_plan(),
        command: Vec::new(),
        env,
        cwd: "/".into(),
        tty: false,
        egress: None,
        user: None,
    };
    service::serve(control, &launch, waiter, trace)
}

/// The plan a `Launch` carries; a guest applies none of it.
fn guest_plan() -> airlock_jail::JailPlan {
    airlock_jail::JailPlan {
        hostname: "airlock".into(),
        root_mountpoint: "/".into(),
        read_only: Vec::new(),
        hidden: Vec::new(),
        tmp_size: 0,
        workspace: None,
        files: Vec::new(),
        rlimits: airlock_jail::plan::RlimitPlan::default(),
        landlock: airlock_jail::plan::LandlockPlan { enabled: false, required: false },
        seccomp: false,
        redirect: None,
        exec_trace: false,
        image_layers: Vec::new(),
    }
}

fn setup_failed(control: &mut UnixStream, step: &str, err: &dyn std::fmt::Display) -> i32 {
    report(control, AgentMessage::SetupFailed { step: step.into(), message: err.to_string() });
    AGENT_FAILED
}

/// Opens a terminal and sends its master end to the supervisor (which sets
/// its size from the caller's terminal).
fn open_terminal(control: &UnixStream) -> io::Result<OwnedFd> {
    let (master, slave) = service::open_terminal(24, 80)?;
    airlock_proto::send_fd(control, master.as_fd())?;
    Ok(slave)
}

/// Starts `cmd` in its own session and process group, with no signal
/// blocked (the agent's sigwaitinfo mask would otherwise survive exec), and
/// with its stdin as controlling terminal when `tty`: signals are forwarded
/// to the whole group. Where the workload has a cgroup of its own (a
/// microVM guest), the process moves there before it runs anything.
pub(crate) fn in_own_session(cmd: &mut Command, tty: bool) {
    let workload = workload::procs();
    // SAFETY: the closure runs between fork and exec and makes only raw
    // system calls (sigprocmask, setsid, ioctl, write), which are
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            crate::signals::unblock_all()?;
            rustix::process::setsid()?;
            if tty {
                rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
            }
            // "0": the writing process. The descriptor was opened by root,
            // whose credentials the kernel checks, so this works after
            // `exec --user` changed ids.
            if let Some(procs) = workload {
                rustix::io::write(procs, b"0")?;
            }
            Ok(())
        });
    }
}

fn report(control: &mut UnixStream, msg: AgentMessage) {
    // The supervisor may already be gone; then the kernel ends us anyway.
    let _ = airlock_proto::send(control, &msg);
}

fn run_command(control: &mut UnixStream, launch: &Launch) -> i32 {
    let waiter = match signals::Waiter::install() {
        Ok(w) => w,
        Err(e) => {
            report(
                control,
                AgentMessage::SetupFailed { step: "install signal handlers".into(), message: e.to_string() },
            );
            return AGENT_FAILED;
        }
    };
    if let Some(ports) = launch.egress
        && let Err(e) = egress::listen(ports, launch.jail.redirect)
    {
        return setup_failed(control, "listen for the egress proxy", &e);
    }
    // No command: a long-lived sandbox that runs processes on request.
    let Some((program, args)) = launch.command.split_first() else {
        return match control.try_clone() {
            Ok(stream) => service::serve(stream, launch, waiter, None),
            Err(e) => setup_failed(control, "start serving", &e),
        };
    };
    let cwd = if launch.cwd.is_dir() { launch.cwd.clone() } else { "/".into() };
    // The image's user (resolved by the host to numbers), with its name
    // and home from the sandbox's own /etc/passwd where it has an entry.
    let user = match launch.user.as_deref().map(users::resolve).transpose() {
        Ok(user) => user,
        Err(message) => {
            report(control, AgentMessage::ExecFailed { exit_code: 126, message });
            return 126;
        }
    };
    let mut cmd = program::command(program, &[&launch.env], &cwd, user.as_ref());
    cmd.args(args).env_clear().envs(launch.env.iter().cloned()).current_dir(&cwd);
    if let Some(user) = &user {
        user.apply(&mut cmd);
    }
    if launch.tty {
        // The terminal comes from the sandbox's own devpts instance, so that
        // it has a name inside (`tty` works); the supervisor gets its master
        // end and relays it to the caller's terminal.
        match open_terminal(control) {
            Ok(slave) => {
                let (a, b) = match (slave.try_clone(), slave.try_clone()) {
                    (Ok(a), Ok(b)) => (a, b),
                    (Err(e), _) | (_, Err(e)) => return setup_failed(control, "open the terminal", &e),
                };
                cmd.stdin(Stdio::from(a)).stdout(Stdio::from(b)).stderr(Stdio::from(slave));
            }
            Err(e) => return setup_failed(control, "open the terminal", &e),
        }
    }
    in_own_session(&mut cmd, launch.tty);
    let child = match oom::spawn_ahead_of_agent(&mut cmd) {
        Ok(child) => child,
        Err(e) => {
            let exit_code = if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 };
            report(control, AgentMessage::ExecFailed { exit_code, message: format!("{program}: {e}") });
            return exit_code;
        }
    };
    let pid = child.id() as i32;
    report(control, AgentMessage::Started { pid });
    let status = waiter.run_until_exit(pid);
    report(control, AgentMessage::Exited { code: status.code, signal: status.signal });
    match (status.code, status.signal) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => AGENT_FAILED,
    }
}
