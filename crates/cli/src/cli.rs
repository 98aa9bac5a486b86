//! The command line: what each subcommand takes, and which library call it
//! becomes.

use std::io::{self, BufRead, IsTerminal, Write};
use std::path::PathBuf;

use airlock_policy::{Overrides, Policy, Tier, WorkspaceMode, parse_duration, parse_size};
use airlock_proto::Stream;
use airlock_proto::supervisor::ExecEvent;
use airlock_runtime::state::StateRoot;
use airlock_runtime::{RunRequest, ops, supervisor};
use clap::{Args, Parser, Subcommand};

use crate::present;

#[path = "daemon_client.rs"]
mod daemon_client;
#[path = "files_cmd.rs"]
mod files_cmd;
#[path = "remote.rs"]
mod remote;

use daemon_client::Daemon;

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
    /// With a daemon, the process runs through its API (with `-i` or `-t`,
    /// its interactive form); without one, through the sandbox's supervisor.
    Exec(ExecArgs),
    /// Copy a file into or out of a long-lived sandbox: `cp FILE NAME:/path`,
    /// `cp NAME:/path FILE`.
    Cp { source: String, destination: String },
    /// File operations on a long-lived sandbox, done by its agent (nothing
    /// inside the sandbox is needed): ls, stat, mkdir, rm, mv, watch.
    #[command(subcommand)]
    Files(files_cmd::FilesCommand),
    /// Everything known about a sandbox: state, limits, deadline, policy.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// The sandbox's captured output (stdout; --stderr for the other one).
    ///
    /// Written by the sandbox, so at a terminal its control characters
    /// (escape sequences, carriage returns), invalid UTF-8 and bidi controls
    /// are shown escaped; piped or redirected, the bytes are exact.
    Logs {
        name: String,
        #[arg(long)]
        stderr: bool,
        /// At a terminal too, write the bytes as they are (colours and
        /// escape sequences take effect: only for output you trust).
        #[arg(long)]
        raw: bool,
    },
    /// Stop a long-lived sandbox (it stays until `rm`, for review).
    Stop { name: String },
    /// Show what a sandbox changed in its workspace, ending with the
    /// change's digest (`change sha256:…`) for `apply --expect`.
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
        /// Write only if the change is still exactly the one `airlock diff`
        /// showed with this digest (`sha256:…`, its last line); otherwise
        /// refuse and write nothing.
        #[arg(long, value_name = "DIGEST")]
        expect: Option<ops::ChangeDigest>,
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
    /// One self-contained HTML page about a sandbox for a reviewer: its
    /// timeline (with filters), process tree, workspace diff, network
    /// decisions, limits and policy. It loads nothing from anywhere and runs
    /// nothing the sandbox wrote.
    Report {
        /// The sandbox (or --bundle).
        #[arg(required_unless_present = "bundle")]
        name: Option<String>,
        #[command(flatten)]
        from: BundleArgs,
        /// Where to write the page (`-` for standard output). A new file is
        /// readable by you only: it holds what the sandbox ran and reached.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: PathBuf,
    },
    /// The sandbox's network: every connection and request the egress proxy decided.
    #[command(subcommand)]
    Net(NetCommand),
    /// The sandbox's timeline: lifecycle, execs, file access, network
    /// decisions, workspace changes, apply; `audit verify` checks its chain.
    Audit(AuditArgs),
    /// Write everything a reviewer needs about a stopped sandbox into one
    /// signed bundle: logs, diff, audit and network logs, artifacts,
    /// resolved policy, metadata.
    Export {
        name: String,
        /// The bundle to write (default: NAME.tar.zst here).
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// The microVM tier's guest (`vm setup` builds it).
    #[command(subcommand)]
    Vm(VmCommand),
    /// OCI images in the local store (under the state directory): pull,
    /// ls, rm, prune.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Serve airlock's sandboxes as Model Context Protocol tools, on stdio
    /// (or streamable HTTP with --listen); through the daemon when one
    /// answers, directly otherwise. Sandboxes it creates outlive it until
    /// their policy's deadline.
    Mcp {
        /// Also offer the `apply` tool, which writes a stopped sandbox's
        /// reviewed changes into its workspace on the host.
        #[arg(long)]
        allow_apply: bool,
        /// Serve streamable HTTP on this loopback address (ADDR:PORT; path
        /// /mcp) instead of stdio. It has no authentication: loopback only.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<std::net::SocketAddr>,
    },
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
        /// Also serve the E2B-compatible API (control plane and every
        /// sandbox's envd) on this address; needs --tokens, and --tls-cert
        /// and --tls-key unless the address is loopback.
        #[arg(long, value_name = "ADDR:PORT", requires = "tokens")]
        e2b_listen: Option<std::net::SocketAddr>,
        /// PEM certificate chain for --listen and --e2b-listen.
        #[arg(long, value_name = "CERT.pem", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for --listen and --e2b-listen (not readable by others).
        #[arg(long, value_name = "KEY.pem", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Bearer tokens for --listen (and API keys for --e2b-listen):
        /// lines `<uid> <sha256-hex-of-token> [comment]` (make one with
        /// `printf %s TOKEN | sha256sum`); the file must be readable by its
        /// owner only.
        #[arg(long, value_name = "FILE")]
        tokens: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum VmCommand {
    /// Build (or check) the guest kernel and initramfs the microVM tier
    /// boots, in the cache ($AIRLOCK_VM_CACHE, default /var/cache/airlock/vm
    /// as root); rebuilt only when airlock or the kernel changed.
    Setup,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Pull an image into the store and print its digest: a registry
    /// reference (registry.example.com/team/py:3.12 or …@sha256:…),
    /// oci:DIR[:TAG|@sha256:…], oci-archive:FILE[:TAG] or docker-archive:FILE.
    Pull {
        reference: String,
        /// Plain HTTP for this registry (a local test registry), not HTTPS;
        /// the policy's image.insecure marks registries for every pull.
        #[arg(long)]
        insecure: bool,
        /// Also trust this CA (PEM) for the registry's certificate
        /// (repeatable; the policy's network.extra_roots are trusted too).
        #[arg(long, value_name = "CA.pem")]
        ca: Vec<PathBuf>,
        /// Registry credentials from this Docker-style config.json
        /// (default: $DOCKER_CONFIG/config.json, else ~/.docker/config.json),
        /// for registries the policy's image.credentials do not name.
        #[arg(long, value_name = "FILE")]
        authfile: Option<PathBuf>,
        /// The policy whose image rules and network rules the pull follows:
        /// a built-in name or a policy file. The registry must be allowed
        /// by its network.allow (or --allow), like a sandbox's egress.
        #[arg(long, default_value = "dev")]
        policy: String,
        /// Allow egress to HOST[:PORT] for this pull (repeatable), where
        /// the policy permits the flag.
        #[arg(long = "allow", value_name = "HOST[:PORT]")]
        allow: Vec<String>,
    },
    /// List the images in the store.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image (by name or digest) unless a sandbox uses it; its
    /// layers go once no other image holds them.
    Rm { reference: String },
    /// Remove every image no sandbox uses, and what only they held.
    Prune,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AuditArgs {
    #[command(subcommand)]
    command: Option<AuditCommand>,
    /// The sandbox (or --bundle).
    #[arg(required_unless_present = "bundle")]
    name: Option<String>,
    #[command(flatten)]
    from: BundleArgs,
    /// One event per line, each the record as written (docs/audit.md).
    #[arg(long)]
    json: bool,
}

/// Reading an export bundle instead of the state directory.
#[derive(Args)]
struct BundleArgs {
    /// An export bundle (`airlock export`), checked first: its signature,
    /// every member's hash, the audit chain. No state directory needed.
    #[arg(long, value_name = "FILE", conflicts_with = "name")]
    bundle: Option<PathBuf>,
    /// Require the bundle to be signed by this key (`ed25519:HEX`, as
    /// `airlock audit key` prints it on the exporting host).
    #[arg(long, value_name = "KEY", requires = "bundle")]
    key: Option<String>,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the audit log's hash chain and its recorded heads: says which
    /// event was removed, reordered, inserted or edited. Exit 0 intact,
    /// 1 not intact, 2 written before the chain (nothing to check).
    Verify {
        #[arg(required_unless_present = "bundle")]
        name: Option<String>,
        #[command(flatten)]
        from: BundleArgs,
        #[arg(long)]
        json: bool,
    },
    /// Print this host's public key for export bundles (created on first use).
    Key,
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
    /// The command and its arguments (with --image: the image's own
    /// Entrypoint and Cmd when none is given).
    #[arg(last = true, required_unless_present = "image")]
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
    /// Isolation tier: process, or microvm (a guest with its own kernel;
    /// `run` only so far). Never weaker than the policy's.
    #[arg(long, value_parser = parse_tier)]
    tier: Option<Tier>,
    /// Run on an OCI image's root instead of the host's system directories:
    /// a registry reference, oci:DIR[:TAG], oci-archive:FILE or
    /// docker-archive:FILE (pulled into the store when missing).
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// A container engine of the sandbox's own inside its microVM (its
    /// socket: `inspect --json`'s containers.socket), where the policy
    /// allows it.
    #[arg(long)]
    containers: bool,
    /// Run as this user of the sandbox, UID[:GID] (numbers; a UID alone
    /// takes its group from the image's /etc/passwd): the command, and
    /// with `create` every exec that names no user. Over the image's User.
    #[arg(long, short = 'u', value_name = "UID[:GID]", value_parser = parse_user)]
    user: Option<String>,
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
            tier: self.tier,
            image: self.image.as_deref().map(airlock_runtime::image::canonical_name),
            containers: self.containers,
        }
    }
}

fn parse_tier(s: &str) -> Result<Tier, String> {
    s.parse()
}

fn parse_user(s: &str) -> Result<String, String> {
    airlock_runtime::image::parse_user(s).map(|_| s.to_owned())
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
    /// Publish a port the sandbox listens on: [HOST_ADDR:]HOST_PORT:SANDBOX_PORT
    /// (repeatable). HOST_ADDR is 127.0.0.1 unless given; the policy must
    /// allow it ([network] ports).
    #[arg(long = "publish", short = 'p', value_name = "[HOST_ADDR:]HOST_PORT:SANDBOX_PORT")]
    ports: Vec<airlock_runtime::ports::PortMapping>,
}

#[derive(Args)]
struct ExecArgs {
    name: String,
    /// Pass this terminal's input (stdin) to the process.
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Run the process on a terminal (with -i from a terminal: an interactive
    /// session, whose size changes follow this terminal's).
    #[arg(long, short = 't')]
    tty: bool,
    /// Run as this user of the sandbox: UID[:GID] or NAME[:GROUP] from its
    /// own /etc/passwd and /etc/group (default: root inside, which is no one
    /// on the host).
    #[arg(long, short = 'u')]
    user: Option<String>,
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
    /// Whether this command can go through the daemon (`run`, `gc`,
    /// `doctor`, `policy`, `net` and `daemon` itself always work here).
    fn daemon_capable(&self) -> bool {
        matches!(
            self,
            Command::Create(_)
                | Command::Diff { .. }
                | Command::Exec(_)
                | Command::Cp { .. }
                | Command::Files(_)
                | Command::Logs { .. }
                | Command::Ls { .. }
                | Command::Inspect { .. }
                | Command::Stop { .. }
                | Command::Rm { .. }
                | Command::Apply { .. }
                | Command::Events { .. }
                | Command::Report { from: BundleArgs { bundle: None, .. }, .. }
                | Command::Export { .. }
        )
    }
}

/// Uses the daemon when one answers on its socket (and `--direct` was not
/// given); works on the state directory directly otherwise.
pub fn dispatch(cli: Cli) -> CliResult {
    let daemon = if cli.direct || !cli.command.daemon_capable() { None } else { Daemon::detect() };
    match daemon {
        Some(daemon) => remote::through_daemon(&daemon, cli.command),
        None => direct(cli.command, cli.direct),
    }
}

fn direct(command: Command, forced: bool) -> CliResult {
    match command {
        Command::Run(args) => run(args),
        Command::Create(args) => create(args),
        Command::Exec(args) => exec(args),
        Command::Cp { source, destination } => cp(Copy::plan(&source, &destination)?),
        Command::Files(command) => files_cmd::direct(command),
        Command::Inspect { name, json } => {
            let root = state()?;
            let view = ops::inspect(&root, &name)?;
            // Labels given at `airlock create` are kept with the sandbox.
            let labels = root.open(&name)?.read_meta()?.labels;
            let facts = airlock_runtime::view::DaemonFacts { labels, ..Default::default() };
            present::inspect(&view, &view, &facts, json)?;
            Ok(0)
        }
        Command::Logs { name, stderr, raw } => {
            let (out, err) = ops::log_paths(&state()?, &name)?;
            let path = if stderr { err } else { out };
            let mut file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut out = present::SandboxOutput::stdout(raw);
            std::io::copy(&mut file, &mut out)?;
            out.flush()?;
            Ok(0)
        }
        Command::Stop { name } => {
            let root = state()?;
            let sandbox = root.open(&name)?;
            if !sandbox.is_live() {
                return Err(format!(
                    "sandbox {name} is not running; see `airlock ls`, or start one with `airlock create`"
                )
                .into());
            }
            // A foreground `airlock run` has no supervisor to ask.
            supervisor::SupervisorClient::connect(&sandbox).map_err(|e| {
                format!("sandbox {name} has no supervisor to stop it ({e}): end its `airlock run`, or `airlock rm {name}`")
            })?;
            ops::stop(&root, &name)?;
            println!("stopped {name}");
            Ok(0)
        }
        Command::Diff { name, stat, json } => {
            let mut progress = present::ProgressLine::stderr("diff");
            let view = ops::diff(&state()?, &name, &mut |n| progress.update(n))?;
            drop(progress);
            present::diff(&view, stat, json)?;
            Ok(0)
        }
        Command::Apply { name, yes, allow_protected, expect } => apply(&name, yes, allow_protected, expect),
        Command::Ls { json } => {
            let views = ops::list(&state()?)?;
            present::list(&views, &views, json)?;
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
            let report = airlock_jail::probe::probe_host(airlock_jail::probe::Depth::Doctor);
            let microvm = microvm_report();
            present::doctor(&report, &microvm, json)?;
            Ok(0)
        }
        Command::Vm(VmCommand::Setup) => {
            let cache = airlock_vm::cache_dir()?;
            let setup = airlock_vm::guest::setup(&cache, &mut |step| eprintln!("airlock: {step}"))?;
            match setup {
                airlock_vm::guest::Setup::UpToDate(g) => {
                    eprintln!(
                        "airlock: the guest is up to date (kernel {}, {})",
                        g.kernel_release,
                        g.initramfs.display()
                    )
                }
                airlock_vm::guest::Setup::Built(_) => {}
            }
            Ok(0)
        }
        Command::Policy(cmd) => policy(cmd),
        Command::Image(cmd) => image(cmd),
        Command::Report { name, from, output } => {
            let page = match (&from.bundle, name) {
                (Some(path), _) => match airlock_runtime::bundle::open(path, from.key.as_deref()) {
                    Ok(opened) => airlock_runtime::report::render_bundle(&opened),
                    Err(
                        e @ (airlock_runtime::bundle::BundleError::Refused { .. }
                        | airlock_runtime::bundle::BundleError::Tampered { .. }),
                    ) => {
                        return Ok(present::bundle_refused(&e, false)?);
                    }
                    Err(e) => return Err(e.into()),
                },
                (None, Some(name)) => airlock_runtime::report::render(&state()?, &name, &name)?,
                (None, None) => return Err("name a sandbox, or --bundle FILE".into()),
            };
            write_report(&output, |out| Ok(out.write_all(page.as_bytes())?))?;
            Ok(0)
        }
        Command::Net(NetCommand::Log { name, json }) => {
            present::net_log(&ops::net_log(&state()?, &name)?, json)?;
            Ok(0)
        }
        Command::Audit(args) => audit(args),
        Command::Export { name, output } => {
            let root = state()?;
            let output = output.unwrap_or_else(|| PathBuf::from(format!("{name}.tar.zst")));
            let report = airlock_runtime::bundle::export(&root, &name, &output)?;
            present::exported(&report);
            Ok(0)
        }
        Command::Mcp { allow_apply, listen } => {
            airlock_mcp::serve(airlock_mcp::Options { allow_apply, listen, direct: forced })?;
            Ok(0)
        }
        Command::Daemon { socket, group, listen, e2b_listen, tls_cert, tls_key, tokens } => {
            let tcp = match (listen, &tls_cert, &tls_key, &tokens) {
                (None, _, _, _) => None,
                (Some(listen), Some(cert), Some(key), Some(tokens)) => Some(airlock_server::TcpOptions {
                    listen,
                    cert: cert.clone(),
                    key: key.clone(),
                    tokens: tokens.clone(),
                }),
                _ => {
                    return Err("a TCP listener needs all of --listen, --tls-cert, --tls-key and --tokens \
                                (it never serves without TLS and bearer tokens)"
                        .into());
                }
            };
            if listen.is_none() && e2b_listen.is_none() && (tokens.is_some() || tls_cert.is_some()) {
                return Err("--tokens, --tls-cert and --tls-key are for --listen or --e2b-listen".into());
            }
            let e2b = match (e2b_listen, tokens) {
                (Some(listen), Some(tokens)) => {
                    Some(airlock_server::E2bOptions { listen, tokens, tls: tls_cert.zip(tls_key) })
                }
                _ => None,
            };
            airlock_server::run_daemon(airlock_server::DaemonOptions {
                socket,
                group,
                state_dir: None,
                tcp,
                e2b,
            })?;
            Ok(0)
        }
    }
}

/// Writes a report to `output` (`-`: standard output) with `write`: into a
/// new file beside it, renamed over it only once complete, so a report that
/// failed half-way never replaces a good one. A new file is mode 0600 (less
/// the umask).
pub(crate) fn write_report<F>(output: &std::path::Path, write: F) -> Result<(), Box<dyn std::error::Error>>
where
    F: FnOnce(&mut dyn Write) -> Result<(), Box<dyn std::error::Error>>,
{
    if output == std::path::Path::new("-") {
        let mut out = io::stdout().lock();
        write(&mut out)?;
        return Ok(out.flush()?);
    }
    let mut staged = Staged::create(output, 0o600).map_err(|e| format!("{}: {e}", output.display()))?;
    write(&mut staged)?;
    staged.commit().map_err(|e| format!("{}: {e}", output.display()))?;
    eprintln!("airlock: wrote the report to {}", output.display());
    Ok(())
}

/// `airlock audit`: the timeline, `verify`, `key`.
fn audit(args: AuditArgs) -> CliResult {
    use airlock_runtime::bundle::{self, BundleError};
    let opened =
        |from: &BundleArgs| -> Result<Result<bundle::Opened, BundleError>, Box<dyn std::error::Error>> {
            let Some(path) = &from.bundle else { return Err("no bundle".into()) };
            match bundle::open(path, from.key.as_deref()) {
                Err(e @ (BundleError::Refused { .. } | BundleError::Tampered { .. })) => Ok(Err(e)),
                other => Ok(Ok(other?)),
            }
        };
    match args.command {
        Some(AuditCommand::Key) => {
            let key = bundle::host_key(&state()?)?;
            println!("{}", bundle::public_key_text(&key));
            Ok(0)
        }
        Some(AuditCommand::Verify { name, from, json }) => {
            if from.bundle.is_some() {
                return Ok(match opened(&from)? {
                    Ok(opened) => present::bundle_verified(&opened, json)?,
                    Err(e) => present::bundle_refused(&e, json)?,
                });
            }
            let name = name.ok_or("name a sandbox, or --bundle FILE")?;
            let root = state()?;
            // The daemon's index keeps a copy of the head outside the
            // sandbox's directory; one that cannot be read is not needed.
            let index = airlock_server::db::index_path(root.path());
            let recorded = match airlock_server::db::recorded_audit_head(&index, &name) {
                Ok(head) => head,
                Err(e) => {
                    present::notice(airlock_runtime::Notice::Warning(format!(
                        "not checking against the daemon's record: {e}"
                    )));
                    None
                }
            };
            let report = ops::verify_audit(&root, &name, recorded)?;
            Ok(present::chain_report(&name, &report, json)?)
        }
        None if args.from.bundle.is_some() => match opened(&args.from)? {
            Ok(opened) => {
                let audit = opened.audit.as_deref().unwrap_or_default();
                let origin =
                    args.from.bundle.clone().unwrap_or_default().join(airlock_runtime::bundle::AUDIT);
                let entries = airlock_runtime::audit::AuditLog::entries_of(audit, &origin)?;
                present::bundle_header(&opened, args.json);
                present::audit_timeline(&entries, args.json)?;
                Ok(0)
            }
            Err(e) => present::bundle_refused(&e, args.json).map_err(Into::into),
        },
        None => {
            let name = args.name.ok_or("name a sandbox, or --bundle FILE")?;
            present::audit_timeline(&ops::audit_entries(&state()?, &name)?, args.json)?;
            Ok(0)
        }
    }
}

/// The microVM engine, tried afresh (the verdict is kept for launches),
/// and the guest's cache.
fn microvm_report() -> present::MicrovmReport {
    let kernel = airlock_vm::guest::find_kernel();
    let engine = airlock_vm::engine::probe(kernel.as_ref().map(|k| k.vmlinuz.as_path()));
    let cache = airlock_vm::cache_dir().ok();
    if let Some(cache) = &cache {
        airlock_vm::engine::remember_fresh(cache, kernel.as_ref().map(|k| k.vmlinuz.as_path()), &engine);
    }
    let guest = cache.as_deref().and_then(|c| airlock_vm::guest::current(c).ok().flatten());
    present::MicrovmReport { engine, kernel: kernel.map(|k| k.release), cache, guest }
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
        user: args.sandbox.user,
    };
    let outcome = airlock_runtime::run(&req, &mut present::notice)?;
    present::run_summary(&outcome);
    Ok(outcome.exit_code)
}

fn image(cmd: ImageCommand) -> CliResult {
    use airlock_runtime::image;
    let root = state()?;
    let store = image::store(root.path())?;
    match cmd {
        ImageCommand::Pull { reference, insecure, ca, authfile, policy, allow } => {
            let policy =
                Policy::resolve(&policy)?.apply_overrides(&Overrides { allow, ..Default::default() })?;
            let options = image::PullOptions { insecure, ca, authfile };
            let record = image::pull(&store, &policy, &reference, &options, &mut present::PullProgress)?;
            println!("{}", record.manifest);
            Ok(0)
        }
        ImageCommand::Ls { json } => {
            let size = present::StoreSize { usage: store.usage(), budget: store.budget() };
            present::images(&store.list()?, &size, json)?;
            Ok(0)
        }
        ImageCommand::Rm { reference } => {
            let used = image_users(&root)?;
            let name = image::canonical_name(&reference);
            let removed = store.remove(&name, &|digest| used.get(digest.as_str()).cloned())?;
            println!("removed {}", removed.manifest);
            Ok(0)
        }
        ImageCommand::Prune => {
            let used = image_users(&root)?;
            let keep = used.keys().filter_map(|d| airlock_image::store::Digest::parse(d).ok()).collect();
            for record in store.prune(&keep)? {
                println!("removed {}", record.manifest);
            }
            Ok(0)
        }
    }
}

/// The image digests the state root's sandboxes were made from, each with
/// one sandbox that uses it.
fn image_users(
    root: &StateRoot,
) -> Result<std::collections::HashMap<String, String>, Box<dyn std::error::Error>> {
    let mut used = std::collections::HashMap::new();
    for sandbox in root.list()? {
        if let Ok(meta) = sandbox.read_meta()
            && let Some(image) = meta.image
        {
            used.entry(image.digest).or_insert(meta.name);
        }
    }
    Ok(used)
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
        ports: args.ports,
        user: args.sandbox.user.clone(),
    };
    let created = supervisor::create(&state()?, &req)?;
    println!("{}", created.name);
    Ok(0)
}

fn exec(args: ExecArgs) -> CliResult {
    use std::io::IsTerminal;
    let root = state()?;
    // Connected by the exec itself: one connection, not a probe and then it.
    let client = supervisor::SupervisorClient::at(&root.open(&args.name)?);
    let not_running = |e: &io::Error| {
        format!(
            "sandbox {} is not running ({e}); see `airlock ls`, or start one with `airlock create`",
            args.name
        )
    };
    let terminal = args.tty.then(crate::terminal::size).map(|s| s.unwrap_or((24, 80)));
    let spec = airlock_proto::supervisor::ExecSpec {
        argv: args.command,
        env: args.env,
        cwd: args.cwd,
        timeout_secs: args.timeout.map(|d| d.as_secs().max(1)),
        tty: terminal,
        user: args.user,
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
    let mut forwarder = None;
    let ended = client.exec_session(
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
            ExecEvent::Exited { code: c, signal, timed_out } => code = exit_status(c, signal, timed_out),
        },
        &mut |control| {
            if terminal.is_some() {
                let control = control.clone();
                resizer =
                    crate::terminal::forward_resizes(move |rows, cols| control.resize(rows, cols).is_ok())
                        .ok();
            }
            forwarder = crate::terminal::forward_signals(move |signal| control.signal(signal).is_ok()).ok();
        },
    );
    // Nobody listens on the supervisor's socket (or it is gone).
    if let Err(e) = &ended
        && matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
    {
        return Err(not_running(e).into());
    }
    ended?;
    drop(resizer);
    drop(forwarder);
    Ok(code)
}

/// An exec's exit code as `airlock exec` returns it: the process's own,
/// 128+N for a signal, 124 for a timeout.
fn exit_status(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> i32 {
    if timed_out {
        return airlock_runtime::exit_codes::TIMED_OUT;
    }
    code.or(signal.map(|s| 128 + s)).unwrap_or(airlock_runtime::exit_codes::AIRLOCK_FAILED)
}

/// `NAME:/path` → (NAME, /path); a host path otherwise.
fn sandbox_path(arg: &str) -> Option<(&str, &str)> {
    let (name, path) = arg.split_once(':')?;
    (airlock_runtime::state::validate_name(name).is_ok() && path.starts_with('/')).then_some((name, path))
}

/// What `airlock cp SOURCE DESTINATION` copies. A destination that is a
/// directory (on the host: an existing one or a trailing `/`; in the
/// sandbox: a trailing `/`) gets the source's file name.
enum Copy<'a> {
    In { file: PathBuf, name: &'a str, path: String },
    Out { name: &'a str, path: &'a str, file: PathBuf },
}

impl<'a> Copy<'a> {
    fn plan(source: &'a str, destination: &'a str) -> Result<Copy<'a>, Box<dyn std::error::Error>> {
        let file_name = |path: &str| -> Result<String, Box<dyn std::error::Error>> {
            match path.rsplit('/').next() {
                Some(base) if !base.is_empty() && base != "." && base != ".." => Ok(base.to_owned()),
                _ => Err(format!("{path} does not name a file; give the destination's file name").into()),
            }
        };
        match (sandbox_path(source), sandbox_path(destination)) {
            (None, Some((name, path))) => {
                if std::fs::metadata(source).map_err(|e| format!("{source}: {e}"))?.is_dir() {
                    return Err(format!("{source} is a directory; airlock cp copies files").into());
                }
                let path = if path.ends_with('/') {
                    format!("{path}{}", file_name(source)?)
                } else {
                    path.to_owned()
                };
                Ok(Copy::In { file: PathBuf::from(source), name, path })
            }
            (Some((name, path)), None) => {
                let mut file = PathBuf::from(destination);
                if destination.ends_with('/') || file.is_dir() {
                    file.push(file_name(path)?);
                }
                Ok(Copy::Out { name, path, file })
            }
            _ => Err("exactly one of SOURCE and DESTINATION must be NAME:/absolute/path".into()),
        }
    }
}

/// A copy out of a sandbox, written beside its destination and renamed over
/// it only once complete: a copy that fails or is refused leaves whatever
/// was there before untouched, and no partial file behind.
pub(crate) struct Staged {
    temp: PathBuf,
    destination: PathBuf,
    file: std::fs::File,
    committed: bool,
}

impl Staged {
    /// A new temporary file for `destination`: with the permission bits of
    /// the file it replaces, else `mode` (the umask applies, as for `cp`).
    pub(crate) fn create(destination: &std::path::Path, mode: u32) -> io::Result<Staged> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let mode = match std::fs::metadata(destination) {
            Ok(meta) if meta.is_file() => meta.mode() & 0o777,
            _ => mode & 0o777,
        };
        let base = destination.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let parent = match destination.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let temp = parent.join(format!(".{base}.airlock-cp-{}-{n}", std::process::id()));
        let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&temp)?;
        Ok(Staged { temp, destination: destination.to_path_buf(), file, committed: false })
    }

    /// Where the copy is until it is committed.
    pub(crate) fn staged_path(&self) -> &std::path::Path {
        &self.temp
    }

    /// Puts the finished copy in place.
    pub(crate) fn commit(mut self) -> io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.temp, &self.destination)?;
        self.committed = true;
        Ok(())
    }
}

impl Write for Staged {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.file.write(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Files only, both ways a typed operation the sandbox's agent carries out
/// (`runtime::files`), so the path resolves in the sandbox's view and
/// nothing inside the sandbox is needed. Into it, the file replaces the
/// target only once all of it arrived (keeping the target's mode; a new
/// file gets the source's permission bits). Out of it, the agent opens the
/// file without following a link and refuses anything but a regular file
/// within the sandbox's disk budget. Directories coming out of a sandbox
/// would be untrusted archives; use diff/apply.
fn cp(copy: Copy<'_>) -> CliResult {
    let root = state()?;
    match copy {
        Copy::In { file, name, path } => {
            use std::os::unix::fs::PermissionsExt;
            let client = running(&root, name)?;
            let mut input = std::fs::File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let meta = input.metadata().map_err(|e| format!("{}: {e}", file.display()))?;
            let mode = meta.permissions().mode() & 0o777;
            airlock_runtime::files::write_file(&client, &path, meta.len(), Some(mode), &mut input)?;
        }
        Copy::Out { name, path, file } => {
            let client = running(&root, name)?;
            let staged = std::cell::RefCell::new(None);
            airlock_runtime::files::read_file(
                &client,
                path,
                None,
                &mut |opened| {
                    let created = Staged::create(&file, opened.mode)
                        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
                    *staged.borrow_mut() = Some(created);
                    Ok(())
                },
                &mut StagedSink(&staged),
            )?;
            if let Some(staged) = staged.into_inner() {
                staged.commit().map_err(|e| format!("{}: {e}", file.display()))?;
            }
        }
    }
    Ok(0)
}

/// The supervisor of a running sandbox, or why there is none.
fn running(root: &StateRoot, name: &str) -> Result<supervisor::SupervisorClient, Box<dyn std::error::Error>> {
    Ok(supervisor::SupervisorClient::connect(&root.open(name)?).map_err(|e| {
        format!("sandbox {name} is not running ({e}); see `airlock ls`, or start one with `airlock create`")
    })?)
}

/// Writes into the staged copy once it exists.
struct StagedSink<'a>(&'a std::cell::RefCell<Option<Staged>>);

impl Write for StagedSink<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self.0.borrow_mut().as_mut() {
            Some(staged) => staged.write(data),
            None => Err(io::Error::other("no destination file yet")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().as_mut().map_or(Ok(()), |staged| staged.flush())
    }
}

/// What the person decided about a sandbox's changes.
enum Confirmed {
    Apply(ops::PendingApply),
    /// Nothing to do: the exit code.
    Done(i32),
}

fn apply(name: &str, yes: bool, allow_protected: bool, expect: Option<ops::ChangeDigest>) -> CliResult {
    match confirm_apply(name, yes, allow_protected, expect)? {
        Confirmed::Done(code) => Ok(code),
        Confirmed::Apply(pending) => apply_locally(pending),
    }
}

/// Writes the prepared change, exactly the one its digest names.
fn apply_locally(pending: ops::PendingApply) -> CliResult {
    let mut progress = present::ProgressLine::stderr("apply");
    let report = ops::apply(pending, &mut |n| progress.update(n))?;
    drop(progress);
    let digest = report.digest.map(|d| format!(" (change {d})")).unwrap_or_default();
    println!("applied: {} written, {} deleted{digest}", report.written.len(), report.deleted.len());
    Ok(0)
}

/// Checks the changes (against `expect`, when given), shows their summary
/// and digest, and asks (unless `yes`). What is then written is held to
/// the digest shown.
fn confirm_apply(
    name: &str,
    yes: bool,
    allow_protected: bool,
    expect: Option<ops::ChangeDigest>,
) -> Result<Confirmed, Box<dyn std::error::Error>> {
    let root = state()?;
    let mut progress = present::ProgressLine::stderr("diff");
    let pending = ops::prepare_apply(&root, name, allow_protected, expect, &mut |n| progress.update(n))?;
    drop(progress);
    if pending.view.diff.is_empty() {
        println!("sandbox {name} changed nothing; nothing to apply");
        return Ok(Confirmed::Done(0));
    }
    let mut out = io::stdout().lock();
    pending.view.diff.render_stat(&mut out)?;
    drop(out);
    let digest = pending.digest().to_string();
    if !yes && !ask_to_apply(name, &pending.view.lower.display().to_string(), &digest)? {
        return Ok(Confirmed::Done(1));
    }
    Ok(Confirmed::Apply(pending))
}

/// Asks whether to apply `name`'s change (shown above, with its `digest`)
/// to `workspace`; refuses to guess when nobody can answer.
fn ask_to_apply(name: &str, workspace: &str, digest: &str) -> Result<bool, Box<dyn std::error::Error>> {
    if !io::stdin().is_terminal() {
        return Err(format!(
            "refusing to apply without confirmation: stdin is not a terminal; pass --yes to apply {name} \
             (with --expect {digest} to write only this change)"
        )
        .into());
    }
    print!("Apply change {digest} to {workspace}? [y/N] ");
    io::stdout().flush()?;
    let mut answer = String::new();
    io::stdin().lock().read_line(&mut answer)?;
    let yes = matches!(answer.trim(), "y" | "Y" | "yes");
    if !yes {
        println!("nothing applied");
    }
    Ok(yes)
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
