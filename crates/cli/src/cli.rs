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

#[path = "daemon_client.rs"]
mod daemon_client;

use daemon_client::{Daemon, DaemonError};

pub type CliResult = Result<i32, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "Run untrusted code in a sandbox whose changes wait for your review."
)]
pub struct Cli {
    /// Work on the state directory directly, even when a daemon answers on
    /// its socket ($AIRLOCK_SOCKET, or the daemon's default).
    #[arg(long, global = true)]
    direct: bool,
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
    ///
    /// With a daemon, the process runs through its API; `-i` and `-t` talk
    /// to the sandbox's supervisor directly instead, as the API has no stdin
    /// or terminal yet.
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
    /// The daemon's event log, one line per event (needs a running daemon).
    Events {
        /// Keep reading: print new events as they happen.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only the events of this sandbox.
        #[arg(long)]
        sandbox: Option<String>,
        /// Start after the event with this id.
        #[arg(long, value_name = "ID")]
        since: Option<u64>,
        /// Print each event as the daemon's JSON object, one per line.
        #[arg(long)]
        json: bool,
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
        /// Also serve the API over TLS on this TCP address (ADDR:PORT);
        /// needs --tls-cert, --tls-key and --tokens.
        #[arg(long, value_name = "ADDR:PORT", requires_all = ["tls_cert", "tls_key", "tokens"])]
        listen: Option<std::net::SocketAddr>,
        /// PEM certificate chain for --listen.
        #[arg(long, value_name = "CERT.pem", requires = "listen")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for --listen (not readable by others).
        #[arg(long, value_name = "KEY.pem", requires = "listen")]
        tls_key: Option<PathBuf>,
        /// Bearer tokens for --listen: lines `<uid> <sha256-hex-of-token>
        /// [comment]` (make one with `printf %s TOKEN | sha256sum`); the
        /// file must be readable by its owner only.
        #[arg(long, value_name = "FILE", requires = "listen")]
        tokens: Option<PathBuf>,
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
    /// Workspace mode: overlay, ro, rw, none (default: the policy's). With
    /// a daemon, `create` with overlay, ro or rw runs directly (the API
    /// takes the policy's mode).
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
    /// Pass this terminal's input to the process (talks to the sandbox
    /// directly, not through the daemon).
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Run the process on a terminal (with -i from a terminal: an interactive
    /// session); talks to the sandbox directly, not through the daemon.
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

impl Command {
    /// Whether this command, with these options, can go through the daemon.
    fn daemon_capable(&self) -> bool {
        match self {
            Command::Create(args) => matches!(args.sandbox.mode, None | Some(WorkspaceMode::None)),
            Command::Exec(args) => !args.interactive && !args.tty,
            // The text forms need the files themselves: computed here.
            Command::Diff { json, .. } => *json,
            Command::Ls { .. }
            | Command::Inspect { .. }
            | Command::Stop { .. }
            | Command::Rm { .. }
            | Command::Apply { .. }
            | Command::Events { .. } => true,
            _ => false,
        }
    }
}

/// Uses the daemon when one answers on its socket (and `--direct` was not
/// given); works on the state directory directly otherwise.
pub fn dispatch(cli: Cli) -> CliResult {
    let daemon = if cli.direct || !cli.command.daemon_capable() { None } else { Daemon::detect() };
    match daemon {
        Some(daemon) => through_daemon(&daemon, cli.command),
        None => direct(cli.command, cli.direct),
    }
}

fn direct(command: Command, forced: bool) -> CliResult {
    match command {
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
                .map_err(|e| format!("sandbox {name} is not running ({e}); see `airlock ls`, or start one with `airlock create`"))?
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
        Command::Events { .. } if forced => {
            Err("airlock events reads the daemon's event log; run it without --direct".into())
        }
        Command::Events { .. } => Err(match daemon_client::socket_path() {
            Some(socket) => format!(
                "airlock events reads the daemon's event log, and no daemon answers on {}; start one with \
                 `airlock daemon` (or set AIRLOCK_SOCKET)",
                socket.display()
            ),
            None => "airlock events reads the daemon's event log, and there is no daemon socket to look for \
                     (set AIRLOCK_SOCKET or XDG_RUNTIME_DIR)"
                .to_owned(),
        }
        .into()),
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
        Command::Daemon { socket, group, listen, tls_cert, tls_key, tokens } => {
            let tcp = match (listen, tls_cert, tls_key, tokens) {
                (None, None, None, None) => None,
                (Some(listen), Some(cert), Some(key), Some(tokens)) => {
                    Some(airlock_server::TcpOptions { listen, cert, key, tokens })
                }
                _ => {
                    return Err("a TCP listener needs all of --listen, --tls-cert, --tls-key and --tokens \
                                (it never serves without TLS and bearer tokens)"
                        .into());
                }
            };
            airlock_server::run_daemon(airlock_server::DaemonOptions {
                socket,
                group,
                state_dir: None,
                tcp,
            })?;
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
    let client = supervisor::SupervisorClient::connect(&root.open(&args.name)?).map_err(|e| {
        format!(
            "sandbox {} is not running ({e}); see `airlock ls`, or start one with `airlock create`",
            args.name
        )
    })?;
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
        Ok(supervisor::SupervisorClient::connect(&root.open(name)?).map_err(|e| {
            format!(
                "sandbox {name} is not running ({e}); see `airlock ls`, or start one with `airlock create`"
            )
        })?)
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

/// What the person decided about a sandbox's changes.
enum Confirmed {
    Apply(ops::PendingApply),
    /// Nothing to do: the exit code.
    Done(i32),
}

fn apply(name: &str, yes: bool, allow_protected: bool) -> CliResult {
    match confirm_apply(name, yes, allow_protected)? {
        Confirmed::Done(code) => Ok(code),
        Confirmed::Apply(pending) => apply_locally(pending),
    }
}

fn apply_locally(pending: ops::PendingApply) -> CliResult {
    let report = ops::apply(pending)?;
    println!("applied: {} written, {} deleted", report.written.len(), report.deleted.len());
    Ok(0)
}

/// Checks the changes, shows their summary and asks (unless `yes`).
fn confirm_apply(
    name: &str,
    yes: bool,
    allow_protected: bool,
) -> Result<Confirmed, Box<dyn std::error::Error>> {
    let root = state()?;
    let pending = ops::prepare_apply(&root, name, allow_protected)?;
    if pending.view.diff.is_empty() {
        println!("sandbox {name} changed nothing; nothing to apply");
        return Ok(Confirmed::Done(0));
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
            return Ok(Confirmed::Done(1));
        }
    }
    Ok(Confirmed::Apply(pending))
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

/// The commands the daemon serves; anything else runs directly.
fn through_daemon(daemon: &Daemon, command: Command) -> CliResult {
    use hyper::Method;
    let sandbox_path =
        |name: &str, rest: &str| format!("/v1/sandboxes/{}{rest}", daemon_client::encode(name));
    match command {
        Command::Create(args) => remote_create(daemon, args),
        Command::Exec(args) => remote_exec(daemon, args),
        Command::Ls { json } => {
            let answer = daemon.json(Method::GET, "/v1/sandboxes", None)?;
            let sandboxes = answer["sandboxes"].as_array().cloned().unwrap_or_default();
            let mut out = io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &sandboxes)?;
                writeln!(out)?;
            } else {
                daemon_client::print_list(&sandboxes, &mut out)?;
            }
            Ok(0)
        }
        Command::Inspect { name, json } => {
            let answer = daemon.json(Method::GET, &sandbox_path(&name, ""), None)?;
            let mut out = io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &answer)?;
                writeln!(out)?;
            } else {
                daemon_client::print_inspect(&answer, &mut out)?;
            }
            Ok(0)
        }
        Command::Stop { name } => {
            let answer = daemon.json(Method::POST, &sandbox_path(&name, "/stop"), None)?;
            println!("stopped {name} ({})", answer["state"].as_str().unwrap_or("stopped"));
            Ok(0)
        }
        Command::Rm { names } => {
            for name in names {
                daemon.json(Method::DELETE, &sandbox_path(&name, ""), None)?;
                println!("removed {name}");
            }
            Ok(0)
        }
        Command::Diff { name, json: true, .. } => {
            let answer = daemon.json(Method::GET, &sandbox_path(&name, "/diff"), None)?;
            let mut out = io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, &answer)?;
            writeln!(out)?;
            Ok(0)
        }
        Command::Apply { name, yes, allow_protected } => {
            let pending = match confirm_apply(&name, yes, allow_protected)? {
                Confirmed::Done(code) => return Ok(code),
                Confirmed::Apply(pending) => pending,
            };
            let body = serde_json::json!({ "allow_protected": allow_protected });
            match daemon.json(Method::POST, &sandbox_path(&name, "/apply"), Some(&body)) {
                Ok(answer) => {
                    let count = |key: &str| answer[key].as_array().map_or(0, Vec::len);
                    println!("applied: {} written, {} deleted", count("written"), count("deleted"));
                    Ok(0)
                }
                // A root daemon writes only for root; a user applies as themself.
                Err(e) if e.code() == Some("forbidden") => apply_locally(pending),
                Err(e) => Err(e.into()),
            }
        }
        Command::Events { follow, sandbox, since, json } => {
            remote_events(daemon, follow, sandbox, since, json)
        }
        other => direct(other, false),
    }
}

/// The policy as the daemon takes it: a built-in name, or a policy file by
/// its absolute path.
fn policy_for_daemon(policy: &str) -> Result<String, Box<dyn std::error::Error>> {
    if Policy::builtin_names().contains(&policy) || !std::path::Path::new(policy).exists() {
        return Ok(policy.to_owned());
    }
    let path = std::fs::canonicalize(policy).map_err(|e| format!("policy file {policy}: {e}"))?;
    Ok(path.to_string_lossy().into_owned())
}

fn remote_create(daemon: &Daemon, args: CreateArgs) -> CliResult {
    use serde_json::{Value, json};
    let s = &args.sandbox;
    let mut body = serde_json::Map::new();
    if let Some(name) = &s.name {
        body.insert("name".into(), json!(name));
    }
    body.insert("policy".into(), json!(policy_for_daemon(&s.policy)?));
    // As without a daemon, the workspace defaults to the current directory;
    // `--mode none` mounts nothing.
    if s.mode != Some(WorkspaceMode::None) {
        let workspace = match &s.workspace {
            Some(path) => path.clone(),
            None => std::env::current_dir()?,
        };
        let absolute = std::fs::canonicalize(&workspace)
            .map_err(|e| format!("workspace {}: {e}", workspace.display()))?;
        body.insert("workspace".into(), json!(absolute));
    }
    if !s.env.is_empty() {
        body.insert("env".into(), Value::Object(s.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect()));
    }
    if !args.labels.is_empty() {
        body.insert(
            "labels".into(),
            Value::Object(args.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
        );
    }
    if let Some(timeout) = s.timeout {
        body.insert("timeout".into(), json!(timeout.as_secs().max(1)));
    }
    if let Some(idle) = args.idle_timeout {
        body.insert("idle_timeout".into(), json!(idle.as_secs().max(1)));
    }
    if let Some(memory) = s.memory {
        body.insert("memory".into(), json!(memory));
    }
    if let Some(pids) = s.pids {
        body.insert("pids".into(), json!(pids));
    }
    if let Some(cpus) = s.cpus {
        body.insert("cpus".into(), json!(cpus));
    }
    if !s.allow.is_empty() {
        body.insert("allow".into(), json!(s.allow));
    }
    let created = daemon.json(hyper::Method::POST, "/v1/sandboxes", Some(&Value::Object(body)))?;
    println!("{}", created["name"].as_str().unwrap_or_default());
    Ok(0)
}

fn remote_exec(daemon: &Daemon, args: ExecArgs) -> CliResult {
    use serde_json::{Value, json};
    let mut body = json!({ "argv": args.command });
    if !args.env.is_empty() {
        body["env"] = Value::Object(args.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect());
    }
    if let Some(cwd) = &args.cwd {
        body["cwd"] = json!(cwd);
    }
    if let Some(timeout) = args.timeout {
        body["timeout"] = json!(timeout.as_secs().max(1));
    }
    let path = format!("/v1/sandboxes/{}/exec", daemon_client::encode(&args.name));
    let mut code = None;
    let mut out = io::stdout();
    let mut err = io::stderr();
    daemon.lines(hyper::Method::POST, &path, Some(&body), &mut |line| {
        if line.is_empty() {
            return Ok(());
        }
        let event: Value = serde_json::from_str(line)?;
        let data = || daemon_client::base64_decode(event["data"].as_str().unwrap_or_default());
        match event["type"].as_str() {
            Some("stdout") => {
                let _ = out.write_all(&data()?);
                let _ = out.flush();
            }
            Some("stderr") => {
                let _ = err.write_all(&data()?);
            }
            Some("exit") => {
                code = Some(if event["timed_out"] == true {
                    airlock_runtime::exit_codes::TIMED_OUT
                } else {
                    let signal = event["signal"].as_i64().map(|s| 128 + s);
                    event["code"]
                        .as_i64()
                        .or(signal)
                        .and_then(|c| i32::try_from(c).ok())
                        .unwrap_or(airlock_runtime::exit_codes::AIRLOCK_FAILED)
                });
            }
            Some("error") => {
                return Err(DaemonError::Protocol(format!(
                    "exec in {}: {}",
                    args.name,
                    event["message"].as_str().unwrap_or("the exec broke off")
                )));
            }
            _ => {}
        }
        Ok(())
    })?;
    let _ = out.flush();
    Ok(code.ok_or_else(|| DaemonError::Protocol("the exec stream ended without an exit status".into()))?)
}

fn remote_events(
    daemon: &Daemon,
    follow: bool,
    sandbox: Option<String>,
    since: Option<u64>,
    json: bool,
) -> CliResult {
    let mut query = Vec::new();
    if follow {
        query.push("follow=true".to_owned());
    }
    if let Some(name) = &sandbox {
        query.push(format!("sandbox={}", daemon_client::encode(name)));
    }
    if let Some(id) = since {
        query.push(format!("since={id}"));
    }
    let path =
        if query.is_empty() { "/v1/events".to_owned() } else { format!("/v1/events?{}", query.join("&")) };
    let mut parser = daemon_client::SseParser::default();
    let result = daemon.lines(hyper::Method::GET, &path, None, &mut |line| {
        let Some(event) = parser.line(line) else { return Ok(()) };
        let mut out = io::stdout().lock();
        if json {
            writeln!(out, "{}", event.data)?;
        } else {
            let value: serde_json::Value = serde_json::from_str(&event.data)?;
            daemon_client::print_event(&value, &mut out)?;
        }
        out.flush()?;
        Ok(())
    });
    match result {
        Ok(()) => Ok(0),
        // A reader that stops early (`airlock events -f | head`) is not an error.
        Err(DaemonError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(e.into()),
    }
}
