//! The command line: what each subcommand takes, and which library call it
//! becomes.

use std::io::{self, BufRead, IsTerminal, Write};
use std::path::PathBuf;

use airlock_policy::{Overrides, Policy, WorkspaceMode, parse_duration, parse_size};
use airlock_proto::Stream;
use airlock_proto::supervisor::ExecEvent;
use airlock_runtime::state::StateRoot;
use airlock_runtime::{RunRequest, ops, supervisor};
use clap::{Args, Parser, Subcommand};

use crate::present;

pub type CliResult = Result<i32, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "Run untrusted code in a sandbox whose changes wait for your review."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a new sandbox (no daemon needed).
    Run(RunArgs),
    /// Create a long-lived sandbox (run processes in it with `exec`).
    Create(CreateArgs),
    /// Run a process in a long-lived sandbox; its exit code is the process's.
    Exec(ExecArgs),
    /// Copy a file into or out of a long-lived sandbox: `cp FILE NAME:/path`,
    /// `cp NAME:/path FILE`.
    Cp { source: String, destination: String },
    /// Everything known about a sandbox: state, limits, deadline, policy.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// The sandbox's captured output (stdout; --stderr for the other one).
    Logs {
        name: String,
        #[arg(long)]
        stderr: bool,
    },
    /// Stop a long-lived sandbox (it stays until `rm`, for review).
    Stop { name: String },
    /// Show what a sandbox changed in its workspace.
    Diff {
        name: String,
        /// Files changed and lines added/removed, instead of the full diff.
        #[arg(long, conflicts_with = "json")]
        stat: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write a sandbox's changes into its workspace, after confirmation.
    Apply {
        name: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Also write protected paths (.git/hooks, shell rc files, editor config, …).
        #[arg(long)]
        allow_protected: bool,
    },
    /// List sandboxes.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove sandboxes (stopping them first if they still run).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Clean up after sandboxes whose supervisor died, and leftover kernel objects.
    Gc {
        #[arg(long)]
        json: bool,
    },
    /// Report what isolation this host supports and how to fix what is missing.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// List, show and check policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The sandbox's network: every connection and request the egress proxy decided.
    #[command(subcommand)]
    Net(NetCommand),
    /// Serve the HTTP/JSON API on a Unix socket (sandboxes outlive it).
    Daemon {
        /// Socket path (default: /run/airlock/airlock.sock as root, else
        /// $XDG_RUNTIME_DIR/airlock/airlock.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// A group (name or gid) whose members may connect: the socket
        /// becomes root:GROUP 0660.
        #[arg(long)]
        group: Option<String>,
    },
}

#[derive(Subcommand)]
enum NetCommand {
    /// Every connection and request, with the decision and the rule that made it.
    Log {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// Remove the sandbox after the run, whatever the policy's cleanup rule.
    #[arg(long)]
    rm: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// The options every new sandbox takes (`run` and `create`).
#[derive(Args)]
struct SandboxArgs {
    /// Built-in policy name (dev, ci, plugin, remediation) or a policy file.
    #[arg(long, default_value = "dev")]
    policy: String,
    /// The directory the sandbox works on (default: the current directory).
    #[arg(long)]
    workspace: Option<PathBuf>,
    /// Workspace mode: overlay, ro, rw, none (default: the policy's).
    #[arg(long, value_parser = parse_mode)]
    mode: Option<WorkspaceMode>,
    /// Sandbox name (default: generated, like brave-otter).
    #[arg(long)]
    name: Option<String>,
    /// Maximum runtime, e.g. 30s, 10m, 2h.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Memory limit, e.g. 512M, 2G.
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Maximum number of processes.
    #[arg(long)]
    pids: Option<u64>,
    /// CPU limit in cores, e.g. 0.5, 2.
    #[arg(long)]
    cpus: Option<f64>,
    /// Allow egress to HOST[:PORT] (repeatable), where the policy permits the flag.
    #[arg(long = "allow", value_name = "HOST[:PORT]")]
    allow: Vec<String>,
    /// Set an environment variable inside (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
}

impl SandboxArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            timeout: self.timeout,
            memory: self.memory,
            pids: self.pids,
            cpus: self.cpus,
            env: self.env.clone(),
            workspace_mode: self.mode,
            allow: self.allow.clone(),
        }
    }
}

#[derive(Args)]
struct CreateArgs {
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// Stop the sandbox after this long without an exec, e.g. 10m.
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<std::time::Duration>,
    /// A label K=V (repeatable), for finding sandboxes later.
    #[arg(long = "label", value_parser = parse_env)]
    labels: Vec<(String, String)>,
}

#[derive(Args)]
struct ExecArgs {
    name: String,
    /// Pass this terminal's input to the process.
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Run the process on a terminal (with -i from a terminal: an interactive session).
    #[arg(long, short = 't')]
    tty: bool,
    /// Set an environment variable for this process (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    #[arg(long)]
    cwd: Option<PathBuf>,
    /// Kill the process after this long (exit code 124), e.g. 30s.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<std::time::Duration>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// List the built-in policies.
    Ls,
    /// Print a policy: a built-in's documented source, or a file fully resolved.
    Show { name: String },
    /// Validate a policy file.
    Check { file: PathBuf },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn parse_mode(s: &str) -> Result<WorkspaceMode, String> {
    s.parse()
}

pub fn dispatch(cli: Cli) -> CliResult {
    match cli.command {
        Command::Run(args) => run(args),
        Command::Create(args) => create(args),
        Command::Exec(args) => exec(args),
        Command::Cp { source, destination } => cp(&source, &destination),
        Command::Inspect { name, json } => {
            present::inspect(&ops::inspect(&state()?, &name)?, json)?;
            Ok(0)
        }
        Command::Logs { name, stderr } => {
            let (out, err) = ops::log_paths(&state()?, &name)?;
            let path = if stderr { err } else { out };
            let mut file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            std::io::copy(&mut file, &mut std::io::stdout().lock())?;
            Ok(0)
        }
        Command::Stop { name } => {
            let root = state()?;
            supervisor::SupervisorClient::connect(&root.open(&name)?)
                .map_err(|e| format!("sandbox {name} is not running: {e}"))?
                .stop()?;
            println!("stopping {name}");
            Ok(0)
        }
        Command::Diff { name, stat, json } => {
            let view = ops::diff(&state()?, &name)?;
            present::diff(&view, stat, json)?;
            Ok(0)
        }
        Command::Apply { name, yes, allow_protected } => apply(&name, yes, allow_protected),
        Command::Ls { json } => {
            present::list(&ops::list(&state()?)?, json)?;
            Ok(0)
        }
        Command::Rm { names } => {
            let root = state()?;
            for name in names {
                ops::remove(&root, &name)?;
                println!("removed {name}");
            }
            Ok(0)
        }
        Command::Gc { json } => {
            present::gc(&ops::gc(&state()?)?, json)?;
            Ok(0)
        }
        Command::Doctor { json } => {
            let report = airlock_jail::probe::probe_host();
            present::doctor(&report, json)?;
            Ok(0)
        }
        Command::Policy(cmd) => policy(cmd),
        Command::Net(NetCommand::Log { name, json }) => {
            present::net_log(&ops::net_log(&state()?, &name)?, json)?;
            Ok(0)
        }
        Command::Daemon { socket, group } => {
            airlock_server::run_daemon(airlock_server::DaemonOptions { socket, group, state_dir: None })?;
            Ok(0)
        }
    }
}

fn state() -> Result<StateRoot, Box<dyn std::error::Error>> {
    Ok(StateRoot::from_env()?)
}

fn run(args: RunArgs) -> CliResult {
    let req = RunRequest {
        overrides: args.sandbox.overrides(),
        policy: args.sandbox.policy,
        workspace: args.sandbox.workspace,
        name: args.sandbox.name,
        remove_after: args.rm,
        command: args.command,
    };
    let outcome = airlock_runtime::run(&req, &mut present::notice)?;
    present::run_summary(&outcome);
    Ok(outcome.exit_code)
}

fn create(args: CreateArgs) -> CliResult {
    let req = supervisor::CreateRequest {
        name: args.sandbox.name.clone(),
        policy: args.sandbox.policy.clone(),
        overrides: args.sandbox.overrides(),
        workspace: args.sandbox.workspace.clone(),
        labels: args.labels.into_iter().collect(),
        idle_timeout: args.idle_timeout,
        env: Vec::new(),
        owner_uid: None,
    };
    let created = supervisor::create(&state()?, &req)?;
    println!("{}", created.name);
    Ok(0)
}

fn exec(args: ExecArgs) -> CliResult {
    use std::io::IsTerminal;
    let root = state()?;
    let client = supervisor::SupervisorClient::connect(&root.open(&args.name)?)
        .map_err(|e| format!("sandbox {} is not running: {e}", args.name))?;
    let terminal = args.tty.then(crate::terminal::size).map(|s| s.unwrap_or((24, 80)));
    let spec = airlock_proto::supervisor::ExecSpec {
        argv: args.command,
        env: args.env,
        cwd: args.cwd,
        timeout_secs: args.timeout.map(|d| d.as_secs().max(1)),
        tty: terminal,
    };
    // Raw mode only for a real interactive session; restored on drop.
    let _raw = (args.tty && args.interactive && std::io::stdin().is_terminal())
        .then(crate::terminal::RawMode::enter);
    let input: Option<Box<dyn std::io::Read + Send>> =
        if args.interactive { Some(Box::new(std::io::stdin())) } else { None };
    let mut code = airlock_runtime::exit_codes::AIRLOCK_FAILED;
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let mut resizer = None;
    client.exec_session(
        &spec,
        input,
        &mut |event| match event {
            ExecEvent::Started { .. } => {}
            ExecEvent::Output { stream: Stream::Stdout, data } => {
                let _ = out.write_all(&data);
                let _ = out.flush();
            }
            ExecEvent::Output { stream: Stream::Stderr, data } => {
                let _ = err.write_all(&data);
            }
            ExecEvent::Exited { code: c, signal, timed_out } => {
                code = if timed_out {
                    airlock_runtime::exit_codes::TIMED_OUT
                } else {
                    c.or(signal.map(|s| 128 + s)).unwrap_or(airlock_runtime::exit_codes::AIRLOCK_FAILED)
                };
            }
        },
        &mut |control| {
            if terminal.is_some() {
                resizer = crate::terminal::forward_resizes(control).ok();
            }
        },
    )?;
    drop(resizer);
    Ok(code)
}

/// `NAME:/path` → (NAME, /path); a host path otherwise.
fn sandbox_path(arg: &str) -> Option<(&str, &str)> {
    let (name, path) = arg.split_once(':')?;
    (airlock_runtime::state::validate_name(name).is_ok() && path.starts_with('/')).then_some((name, path))
}

/// Files only: the copy runs `cat` inside the sandbox, so the path is
/// resolved in the sandbox's view and can reach nothing else. Directories
/// coming out of a sandbox would be untrusted archives; use diff/apply.
fn cp(source: &str, destination: &str) -> CliResult {
    let root = state()?;
    let client = |name: &str| -> Result<supervisor::SupervisorClient, Box<dyn std::error::Error>> {
        Ok(supervisor::SupervisorClient::connect(&root.open(name)?)
            .map_err(|e| format!("sandbox {name} is not running: {e}"))?)
    };
    let mut failed = None;
    let mut collect = |event: ExecEvent, sink: &mut dyn Write| match event {
        ExecEvent::Output { stream: Stream::Stdout, data } => {
            let _ = sink.write_all(&data);
        }
        ExecEvent::Output { stream: Stream::Stderr, data } => {
            let _ = std::io::stderr().write_all(&data);
        }
        ExecEvent::Exited { code, signal, .. } if code != Some(0) => {
            failed = Some(code.or(signal.map(|s| 128 + s)))
        }
        _ => {}
    };
    match (sandbox_path(source), sandbox_path(destination)) {
        (None, Some((name, path))) => {
            let file = std::fs::File::open(source).map_err(|e| format!("{source}: {e}"))?;
            if file.metadata()?.is_dir() {
                return Err(format!("{source} is a directory; airlock cp copies files").into());
            }
            let spec = airlock_proto::supervisor::ExecSpec {
                argv: vec!["sh".into(), "-c".into(), "cat > \"$1\"".into(), "sh".into(), path.into()],
                ..Default::default()
            };
            client(name)?
                .exec_with_input(&spec, Some(Box::new(file)), &mut |e| collect(e, &mut std::io::sink()))?;
        }
        (Some((name, path)), None) => {
            let mut file = std::fs::File::create(destination).map_err(|e| format!("{destination}: {e}"))?;
            let spec = airlock_proto::supervisor::ExecSpec {
                argv: vec!["cat".into(), "--".into(), path.into()],
                ..Default::default()
            };
            client(name)?.exec(&spec, &mut |e| collect(e, &mut file))?;
            if failed.is_some() {
                drop(file);
                let _ = std::fs::remove_file(destination);
            }
        }
        _ => return Err("exactly one of SOURCE and DESTINATION must be NAME:/absolute/path".into()),
    }
    match failed {
        Some(code) => Err(format!("copy failed inside the sandbox (exit {})", code.unwrap_or(-1)).into()),
        None => Ok(0),
    }
}

fn apply(name: &str, yes: bool, allow_protected: bool) -> CliResult {
    let root = state()?;
    let pending = ops::prepare_apply(&root, name, allow_protected)?;
    if pending.view.diff.is_empty() {
        println!("sandbox {name} changed nothing; nothing to apply");
        return Ok(0);
    }
    let mut out = io::stdout().lock();
    pending.view.diff.render_stat(&mut out)?;
    drop(out);
    if !yes {
        if !io::stdin().is_terminal() {
            return Err(format!(
                "refusing to apply without confirmation: stdin is not a terminal; pass --yes to apply {name}"
            )
            .into());
        }
        print!("Apply these changes to {}? [y/N] ", pending.view.lower.display());
        io::stdout().flush()?;
        let mut answer = String::new();
        io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("nothing applied");
            return Ok(1);
        }
    }
    let report = ops::apply(pending)?;
    println!("applied: {} written, {} deleted", report.written.len(), report.deleted.len());
    Ok(0)
}

fn policy(cmd: PolicyCommand) -> CliResult {
    match cmd {
        PolicyCommand::Ls => {
            for name in Policy::builtin_names() {
                let description = Policy::builtin(name).map(|p| p.description).unwrap_or_default();
                println!("{name:<12} {description}");
            }
        }
        PolicyCommand::Show { name } => match Policy::builtin_source(&name) {
            Some(source) => print!("{source}"),
            None => print!("{}", Policy::resolve(&name)?.to_toml()),
        },
        PolicyCommand::Check { file } => {
            let policy = Policy::load_file(&file)?;
            println!(
                "{}: ok (policy {}, extends {})",
                file.display(),
                policy.name,
                policy.extends_chain.join(" → ")
            );
        }
    }
    Ok(0)
}
