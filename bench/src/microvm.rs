//! The microVM benchmarks: what a sandbox on the microVM tier costs.
//!
//! - boot to first exec: `airlock run --rm --tier microvm -- true` end to
//!   end; `airlock create --tier microvm` then `airlock exec NAME -- true`
//!   (two CLI processes, no daemon); and the same through the daemon's API;
//!   beside a bare QEMU started with the very command line airlock gave its
//!   QEMU, to the agent's first word (what QEMU and the guest cost without
//!   airlock's jail, cgroup, supervisor and exec);
//! - exec round trip of `true` into a running microVM: through the daemon's
//!   API, and `airlock exec` through the daemon and `--direct`;
//! - host memory of one idle microVM: QEMU's resident memory split into the
//!   guest's RAM it has touched and what it holds beyond that (TCG's
//!   translation buffer, files, heap), and the processes beside it.
//!
//! The accelerator is chosen as airlock chooses it: KVM when `airlock doctor`
//! says it works; otherwise software emulation (TCG), through a policy the
//! harness writes that allows it. Under TCG the KVM targets are not judged.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::daemon::{self, Daemon};
use crate::measure;
use crate::procmem::{self, QemuMemory};
use crate::report;
use crate::{BenchError, Outcome};

/// Median boot to first exec with KVM, at most.
pub const MAX_BOOT_TO_EXEC: Duration = Duration::from_millis(150);
/// Median exec round trip into a microVM with KVM, at most.
pub const MAX_EXEC_ROUND_TRIP: Duration = Duration::from_millis(5);
/// Host memory per idle microVM beyond its guest's RAM, with KVM, at most (KiB).
pub const MAX_OVERHEAD_KIB: u64 = 30 * 1024;

/// How long a bare QEMU may take to reach the agent's first word.
const BARE_DEADLINE: Duration = Duration::from_secs(120);
/// How long the exec benchmark's microVM idles before its memory is read.
const IDLE_BEFORE_MEMORY: Duration = Duration::from_secs(2);
/// The microVM the exec round trip and the memory use.
const EXEC_VM: &str = "bench-vm-exec";

/// What the section is asked to do.
pub struct Plan {
    /// Timed rounds of the boot cases.
    pub iterations: usize,
    /// Untimed rounds before them.
    pub warmup: usize,
    /// Execs per route in the round-trip benchmark.
    pub execs: usize,
    /// The guest cache (`AIRLOCK_VM_CACHE`).
    pub cache: PathBuf,
}

/// How the guests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The section's outcome.
pub struct MicrovmResults {
    /// Why nothing was measured, if so.
    pub skipped: Option<String>,
    /// The accelerator chosen from doctor's verdict.
    pub accel: Option<Accel>,
    /// Doctor's words on KVM here.
    pub kvm: String,
    /// The policy the sandboxes ran under.
    pub policy: String,
    /// What `airlock vm setup` said, and how long it took.
    pub setup: String,
    pub run: Outcome,
    /// airlock's own boot time within `run` (QEMU started → agent serving),
    /// from its log.
    pub run_boot: Outcome,
    /// The accelerators airlock's log named for the `run` cases.
    pub run_accels: Vec<String>,
    pub cli_total: Outcome,
    pub cli_create: Outcome,
    pub cli_exec: Outcome,
    pub api_total: Outcome,
    pub api_create: Outcome,
    pub api_exec: Outcome,
    pub bare: Outcome,
    pub exec_api: Outcome,
    pub exec_cli_daemon: Outcome,
    pub exec_cli_direct: Outcome,
    pub memory: Result<VmMemory, String>,
}

impl MicrovmResults {
    fn skipped(why: String) -> MicrovmResults {
        let s = || Outcome::Skipped("the section did not run".into());
        MicrovmResults {
            skipped: Some(why),
            accel: None,
            kvm: String::new(),
            policy: String::new(),
            setup: String::new(),
            run: s(),
            run_boot: s(),
            run_accels: Vec::new(),
            cli_total: s(),
            cli_create: s(),
            cli_exec: s(),
            api_total: s(),
            api_create: s(),
            api_exec: s(),
            bare: s(),
            exec_api: s(),
            exec_cli_daemon: s(),
            exec_cli_direct: s(),
            memory: Err("not measured".into()),
        }
    }

    pub fn failed(&self) -> bool {
        [
            &self.run,
            &self.cli_total,
            &self.api_total,
            &self.exec_api,
            &self.exec_cli_daemon,
            &self.exec_cli_direct,
        ]
        .iter()
        .any(|o| matches!(o, Outcome::Failed(_)))
            || (self.skipped.is_none() && self.memory.is_err())
    }
}

/// Host memory of one idle microVM, KiB.
pub struct VmMemory {
    pub qemu_pid: i32,
    /// QEMU's `-accel` and `-m`, from its command line.
    pub qemu_accel: String,
    pub guest_mib: u64,
    pub qemu: QemuMemory,
    /// The sandbox's supervisor (`airlock __supervise`), which a process-tier
    /// sandbox has too.
    pub supervisor_pss_kib: u64,
    pub supervisor_rss_kib: u64,
    /// Any other process below the supervisor (virtiofsd, the egress
    /// proxy), split like QEMU (a vhost-user helper maps the guest's RAM).
    pub helpers: Vec<(String, QemuMemory)>,
}

impl VmMemory {
    /// QEMU and the helpers beyond the guest's RAM (RSS): what the target
    /// judges (the supervisor, which every sandbox has, is not in it).
    pub fn overhead_kib(&self) -> u64 {
        self.qemu.beyond_guest_kib() + self.helpers.iter().map(|h| h.1.beyond_guest_kib()).sum::<u64>()
    }
}

/// What `airlock doctor --json` says of the microVM engine: the accelerator
/// airlock would use, and why; None when QEMU is missing.
pub fn choose_accel(doctor: &Value) -> Result<(Accel, String), String> {
    let engine = &doctor["microvm"]["engine"];
    if engine["qemu"].is_null() {
        return Err("qemu-system-x86_64 is not installed (Debian: qemu-system-x86)".into());
    }
    let kvm = &engine["kvm"];
    let state = kvm["state"].as_str().unwrap_or("unknown");
    let detail = ["detail", "reason", "error"].iter().find_map(|k| kvm[*k].as_str()).unwrap_or("");
    let words = if detail.is_empty() { state.to_string() } else { format!("{state}: {detail}") };
    let accel = if state == "usable" { Accel::Kvm } else { Accel::Tcg };
    Ok((accel, words))
}

/// The bench's policy: the built-in `plugin` profile (microVM tier, no
/// egress, 1 vCPU, 512 MiB), allowed to run under emulation when KVM does
/// not work here, with time enough for a slow run.
pub fn policy_text(accel: Accel) -> String {
    let mut text = String::from(
        "# Written by airlock-bench for its microvm section.\nextends = \"plugin\"\n[isolation]\ntier = \"microvm\"\n",
    );
    if accel == Accel::Tcg {
        text.push_str("# KVM does not work on this host: run the guests under QEMU's software emulation.\n");
        text.push_str("allow_weaker = [\"kvm\"]\n");
    }
    text.push_str("[limits]\ntimeout = \"1h\"\n");
    text
}

/// airlock's log line for a booted guest (`AIRLOCK_LOG=info`): its boot
/// time (QEMU started → the agent serving) and accelerator.
pub fn parse_boot_log(stderr: &str) -> Option<(Duration, String)> {
    let line = strip_ansi(stderr).lines().find(|l| l.contains("microVM booted"))?.to_string();
    let field = |name: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(name)).map(|v| v.trim_matches('"').to_string())
    };
    let ms = field("ms=")?.parse::<u64>().ok()?;
    Some((Duration::from_millis(ms), field("accel=")?))
}

/// Removes terminal colour sequences (`ESC [ … m`) from a log.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// QEMU's `-accel` (its first word) and `-m` (MiB) from its argv.
pub fn qemu_facts(argv: &[String]) -> (Option<String>, Option<u64>) {
    let value = |flag: &str| argv.iter().position(|a| a == flag).and_then(|i| argv.get(i + 1));
    let accel = value("-accel").map(|v| v.split(',').next().unwrap_or_default().to_string());
    let mib = value("-m").and_then(|v| {
        let v = v.split(',').next().unwrap_or_default();
        let (digits, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
        let n = digits.parse::<u64>().ok()?;
        match unit {
            "" | "M" | "m" => Some(n),
            "G" | "g" => Some(n * 1024),
            _ => None,
        }
    });
    (accel, mib)
}

/// airlock's QEMU command line made to run bare: the same program and
/// arguments, but the agent's socket and the console log in `dir`. Refused
/// for a guest with more ports than the agent's (egress needs airlock on the
/// other end before the agent starts).
pub fn bare_args(argv: &[String], dir: &Path) -> Result<(PathBuf, Vec<String>, PathBuf), String> {
    let (program, rest) = argv.split_first().ok_or("an empty command line")?;
    let socket = dir.join("agent.sock");
    let mut args = Vec::with_capacity(rest.len());
    let mut iter = rest.iter();
    let mut agent = false;
    while let Some(arg) = iter.next() {
        args.push(arg.clone());
        let Some(value) = (match arg.as_str() {
            "-chardev" | "-serial" => iter.next(),
            _ => None,
        }) else {
            continue;
        };
        let replaced = if arg == "-serial" {
            if !value.starts_with("file:") {
                return Err(format!("a serial console that is not a file: {value}"));
            }
            format!("file:{}", dir.join("console.log").display())
        } else if value.starts_with("socket,id=agent,") {
            agent = true;
            format!("socket,id=agent,path={}", socket.display())
        } else {
            return Err(format!(
                "a character device besides the agent's ({value}): only a guest without egress boots bare"
            ));
        };
        args.push(replaced);
    }
    if !agent {
        return Err("no agent channel in QEMU's command line".into());
    }
    Ok((PathBuf::from(program), args, socket))
}

fn vm_cmd(airlock: &Path, state: &Path, cache: &Path, cwd: &Path) -> Command {
    let mut c = Command::new(airlock);
    c.env("AIRLOCK_STATE_DIR", state)
        .env("AIRLOCK_VM_CACHE", cache)
        .env_remove("AIRLOCK_SOCKET")
        .env_remove("AIRLOCK_LOG")
        .current_dir(cwd)
        .arg("--direct");
    c
}

/// Runs `c` to its end with its output captured; the error has its stderr.
fn run_checked(c: Command, what: &str) -> Result<String, BenchError> {
    measure::checked(c, what)
}

/// Per case, its samples of each part, or why it stopped.
struct Track {
    parts: Vec<Vec<Duration>>,
    failed: Option<String>,
    skipped: Option<String>,
}

impl Track {
    fn new(parts: usize) -> Track {
        Track { parts: vec![Vec::new(); parts], failed: None, skipped: None }
    }

    fn live(&self) -> bool {
        self.failed.is_none() && self.skipped.is_none()
    }

    fn record(&mut self, round: usize, timed: bool, r: Result<Vec<Duration>, BenchError>) {
        match r {
            Ok(values) if timed => {
                for (part, v) in self.parts.iter_mut().zip(values) {
                    part.push(v);
                }
            }
            Ok(_) => {}
            Err(e) => {
                let phase = if timed { "timed round" } else { "warm-up round" };
                self.failed = Some(format!("{phase} {}: {e}", round + 1));
            }
        }
    }

    fn outcomes(self) -> Vec<Outcome> {
        // A failure is reported once, on the first part (the total).
        self.parts
            .iter()
            .enumerate()
            .map(|(i, walls)| match (&self.failed, &self.skipped) {
                (Some(why), _) if i == 0 => Outcome::Failed(why.clone()),
                (Some(_), _) => Outcome::Skipped("failed, see above".into()),
                (None, Some(why)) => Outcome::Skipped(why.clone()),
                (None, None) => daemon::summarize(walls),
            })
            .collect()
    }
}

/// Runs the whole section, its scratch files in `dir`.
pub fn run(airlock: &Path, dir: &Path, plan: &Plan, notes: &mut Vec<String>) -> MicrovmResults {
    match run_inner(airlock, dir, plan, notes) {
        Ok(r) => r,
        Err(e) => MicrovmResults::skipped(e.to_string()),
    }
}

fn run_inner(
    airlock: &Path,
    dir: &Path,
    plan: &Plan,
    notes: &mut Vec<String>,
) -> Result<MicrovmResults, BenchError> {
    crate::fixtures::make_dir_0755(dir)?;
    let state = dir.join("state");
    let cache = &plan.cache;

    // The accelerator, as airlock would choose it.
    let mut doctor = vm_cmd(airlock, &state, cache, dir);
    doctor.args(["doctor", "--json"]).stdin(Stdio::null());
    let out = doctor.output().map_err(|e| BenchError::new(format!("airlock doctor: cannot start: {e}")))?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| BenchError::new(format!("airlock doctor --json: not JSON ({e})")))?;
    let (accel, kvm) = choose_accel(&report).map_err(BenchError::new)?;
    eprintln!("airlock-bench: microvm, accelerator {} (KVM here: {kvm})", accel.as_str());

    // The guest, built (untimed) before anything boots.
    let mut setup = vm_cmd(airlock, &state, cache, dir);
    setup.args(["vm", "setup"]).stderr(Stdio::piped());
    let started = Instant::now();
    let out = setup.output().map_err(|e| BenchError::new(format!("airlock vm setup: cannot start: {e}")))?;
    let said = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(BenchError::new(format!("airlock vm setup failed: {}", said.trim())));
    }
    let last = said.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("done").trim();
    let setup = format!("{last} ({} in all)", report::secs(started.elapsed()));

    let policy_path = dir.join("policy.toml");
    std::fs::write(&policy_path, policy_text(accel))
        .map_err(|e| BenchError::new(format!("cannot write {}: {e}", policy_path.display())))?;
    let policy = policy_path.to_string_lossy().into_owned();
    let policy_words = match accel {
        Accel::Kvm => "plugin (microVM tier, no egress, 1 vCPU, 512 MiB), timeout 1h",
        Accel::Tcg => {
            "plugin (microVM tier, no egress, 1 vCPU, 512 MiB), timeout 1h, allow_weaker = [\"kvm\"]"
        }
    };

    let daemon =
        Daemon::start_with_env(airlock, &dir.join("daemon"), &[("AIRLOCK_VM_CACHE", cache.as_os_str())])?;
    let create_body =
        |name: &str| json!({ "name": name, "policy": policy, "tier": "microvm", "workspace_mode": "none" });

    // One microVM: exec round trips, then its memory once idle; its QEMU's
    // command line is what the bare boots run.
    eprintln!(
        "airlock-bench: microvm, one guest through the daemon: {} execs per route, interleaved",
        plan.execs
    );
    let (exec_api, exec_cli_daemon, exec_cli_direct, memory, qemu_argv) =
        match daemon.create_with(EXEC_VM, &create_body(EXEC_VM)) {
            Err(e) => {
                let none = || Outcome::Skipped("no guest (see above)".into());
                (Outcome::Failed(e.to_string()), none(), none(), Err("no guest to measure".into()), None)
            }
            Ok(()) => {
                let (a, b, c) = exec_round_trip(&daemon, plan);
                std::thread::sleep(IDLE_BEFORE_MEMORY);
                let measured = vm_memory(&daemon, EXEC_VM);
                if let Err(e) = daemon.delete(EXEC_VM) {
                    notes.push(format!("microvm: could not remove {EXEC_VM}: {e}"));
                }
                match measured {
                    Ok((m, argv)) => (a, b, c, Ok(m), Some(argv)),
                    Err(e) => (a, b, c, Err(e), None),
                }
            }
        };

    // Boot to first exec, four ways, round by round.
    eprintln!(
        "airlock-bench: microvm, boot to first exec, {} rounds after {} warm-up, 4 cases interleaved",
        plan.iterations, plan.warmup
    );
    let state_cli = dir.join("state-cli");
    let mut run_track = Track::new(2);
    let mut cli_track = Track::new(3);
    let mut api_track = Track::new(3);
    let mut bare_track = Track::new(1);
    let mut run_accels: Vec<String> = Vec::new();
    match &qemu_argv {
        None => {
            bare_track.skipped =
                Some("no QEMU command line to copy (the exec benchmark's guest did not run)".into())
        }
        Some(argv) => {
            if let Err(why) = bare_args(argv, dir) {
                bare_track.skipped = Some(why);
            }
        }
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    for round in 0..plan.warmup + plan.iterations {
        let timed = round >= plan.warmup;
        if tty {
            eprint!("\r  round {}/{}", round + 1, plan.warmup + plan.iterations);
        }
        if run_track.live() {
            let mut c = vm_cmd(airlock, &state_cli, cache, dir);
            c.env("AIRLOCK_LOG", "info").env("NO_COLOR", "1");
            c.args(["run", "--rm", "--policy", &policy, "--tier", "microvm", "--mode", "none", "--", "true"]);
            let started = Instant::now();
            let r = run_checked_stderr(c, "airlock run --rm --tier microvm -- true").and_then(|stderr| {
                let wall = started.elapsed();
                let (boot, accel) = parse_boot_log(&stderr).ok_or_else(|| {
                    BenchError::new(format!("no \"microVM booted\" line in airlock's log: {}", stderr.trim()))
                })?;
                if !run_accels.contains(&accel) {
                    run_accels.push(accel);
                }
                Ok(vec![wall, boot])
            });
            run_track.record(round, timed, r);
        }
        if cli_track.live() {
            let name = format!("bench-vm-cli-{round}");
            let mut create = vm_cmd(airlock, &state_cli, cache, dir);
            create.args([
                "create", "--policy", &policy, "--tier", "microvm", "--mode", "none", "--name", &name,
            ]);
            let mut exec = vm_cmd(airlock, &state_cli, cache, dir);
            exec.args(["exec", &name, "--", "true"]);
            // create and exec, each to its process's end; the total is both.
            let t0 = Instant::now();
            let r = run_checked(create, "airlock create --tier microvm").and_then(|_| {
                let created = t0.elapsed();
                let t1 = Instant::now();
                run_checked(exec, "airlock exec NAME -- true")
                    .map(|_| vec![t0.elapsed(), created, t1.elapsed()])
            });
            let mut rm = vm_cmd(airlock, &state_cli, cache, dir);
            rm.args(["rm", &name]);
            let removed = run_checked(rm, "airlock rm");
            cli_track.record(round, timed, r.and_then(|v| removed.map(|_| v)));
        }
        if api_track.live() {
            let name = format!("bench-vm-api-{round}");
            let t0 = Instant::now();
            let r = daemon.create_with(&name, &create_body(&name)).and_then(|()| {
                let t1 = Instant::now();
                daemon.exec_true(&name).map(|t2| vec![t2 - t0, t1 - t0, t2 - t1])
            });
            let removed = daemon.delete(&name);
            api_track.record(round, timed, r.and_then(|v| removed.map(|()| v)));
        }
        if bare_track.live()
            && let Some(argv) = &qemu_argv
        {
            let r = bare_boot(argv, &dir.join(format!("bare-{round}"))).map(|t| vec![t]);
            bare_track.record(round, timed, r);
        }
    }
    if tty {
        eprintln!();
    }
    drop(daemon);

    let mut run_o = run_track.outcomes().into_iter();
    let mut cli_o = cli_track.outcomes().into_iter();
    let mut api_o = api_track.outcomes().into_iter();
    let mut bare_o = bare_track.outcomes().into_iter();
    let next = |it: &mut std::vec::IntoIter<Outcome>| {
        it.next().unwrap_or_else(|| Outcome::Failed("not measured".into()))
    };
    Ok(MicrovmResults {
        skipped: None,
        accel: Some(accel),
        kvm,
        policy: policy_words.to_string(),
        setup,
        run: next(&mut run_o),
        run_boot: next(&mut run_o),
        run_accels,
        cli_total: next(&mut cli_o),
        cli_create: next(&mut cli_o),
        cli_exec: next(&mut cli_o),
        api_total: next(&mut api_o),
        api_create: next(&mut api_o),
        api_exec: next(&mut api_o),
        bare: next(&mut bare_o),
        exec_api,
        exec_cli_daemon,
        exec_cli_direct,
        memory,
    })
}

/// Like [`run_checked`], but returns the command's stderr (airlock's log).
fn run_checked_stderr(mut c: Command, what: &str) -> Result<String, BenchError> {
    c.stdin(Stdio::null());
    let out = c.output().map_err(|e| BenchError::new(format!("{what}: cannot start: {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let code = out.status.code().map_or_else(|| "a signal".to_string(), |c| format!("exit code {c}"));
        return Err(BenchError::new(format!("{what}: failed with {code}: {}", stderr.trim())));
    }
    Ok(stderr)
}

/// `true` in the running microVM, round by round: through the daemon's API,
/// `airlock exec` through the daemon, and `airlock --direct exec`.
fn exec_round_trip(d: &Daemon, plan: &Plan) -> (Outcome, Outcome, Outcome) {
    let warm = plan.warmup.max(1);
    let mut walls: [Vec<Duration>; 3] = Default::default();
    let mut errors: [Option<String>; 3] = Default::default();
    for i in 0..warm + plan.execs {
        let timed = i >= warm;
        if errors[0].is_none() {
            let t0 = Instant::now();
            match d.exec_true(EXEC_VM) {
                Ok(t) if timed => walls[0].push(t - t0),
                Ok(_) => {}
                Err(e) => errors[0] = Some(format!("exec {}: {e}", i + 1)),
            }
        }
        let commands = [(1, d.cli_exec_through_daemon(EXEC_VM)), (2, d.cli_exec(EXEC_VM))];
        for (k, command) in commands {
            if errors[k].is_some() {
                continue;
            }
            let label = format!("airlock exec {EXEC_VM} -- true");
            let r = if timed {
                measure::timed(command, &label).map(|s| Some(s.wall))
            } else {
                measure::checked(command, &label).map(|_| None)
            };
            match r {
                Ok(Some(w)) => walls[k].push(w),
                Ok(None) => {}
                Err(e) => errors[k] = Some(format!("exec {}: {e}", i + 1)),
            }
        }
    }
    let outcome = |k: usize| match &errors[k] {
        Some(e) => Outcome::Failed(e.clone()),
        None => daemon::summarize(&walls[k]),
    };
    (outcome(0), outcome(1), outcome(2))
}

fn argv_of(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The idle microVM's memory, and its QEMU's command line.
fn vm_memory(d: &Daemon, name: &str) -> Result<(VmMemory, Vec<String>), String> {
    let supervisor = d
        .supervisor_pid(name)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{name}: running without a supervisor pid"))?;
    let procs = daemon::with_descendants(&[supervisor], &daemon::parents());
    let mut qemu: Option<(i32, Vec<String>)> = None;
    let mut others = Vec::new();
    for pid in procs.into_iter().filter(|p| *p != supervisor) {
        let comm =
            std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
        let argv = argv_of(pid);
        if comm.starts_with("qemu-system") {
            if let Some((other, _)) = &qemu {
                return Err(format!("two QEMU processes below the supervisor ({other} and {pid})"));
            }
            qemu = Some((pid, argv));
        } else {
            let what = match argv.get(1) {
                Some(role) if role.starts_with("__") => format!("{comm} {role} (pid {pid})"),
                _ => format!("{comm} (pid {pid})"),
            };
            others.push((pid, what));
        }
    }
    let (qemu_pid, argv) =
        qemu.ok_or_else(|| format!("no QEMU process below {name}'s supervisor ({supervisor})"))?;
    let (accel, guest_mib) = qemu_facts(&argv);
    let guest_mib = guest_mib.ok_or_else(|| format!("no -m in QEMU's command line: {argv:?}"))?;
    let split = |pid: i32| -> Result<QemuMemory, String> {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
            .map_err(|e| format!("cannot read /proc/{pid}/smaps: {e}"))?;
        Ok(procmem::qemu_memory(&procmem::parse_smaps(&smaps), guest_mib))
    };
    let qemu_mem = split(qemu_pid)?;
    let mut helpers = Vec::new();
    for (pid, what) in others {
        // One that ended meanwhile is not there to count.
        if let Ok(m) = split(pid) {
            helpers.push((what, m));
        }
    }
    let (supervisor_pss_kib, supervisor_rss_kib) = procmem::pss_rss(supervisor)
        .ok_or_else(|| format!("cannot read the supervisor's ({supervisor}) memory"))?;
    let memory = VmMemory {
        qemu_pid,
        qemu_accel: accel.unwrap_or_else(|| "?".into()),
        guest_mib,
        qemu: qemu_mem,
        supervisor_pss_kib,
        supervisor_rss_kib,
        helpers,
    };
    Ok((memory, argv))
}

/// Boots a bare QEMU with airlock's command line (sockets and console in
/// `dir`): the time from spawning it to the first byte on the agent's
/// channel (the agent's `Serving`, its first word); then kills it.
fn bare_boot(argv: &[String], dir: &Path) -> Result<Duration, BenchError> {
    crate::fixtures::make_dir_0755(dir)?;
    let (program, args, socket) = bare_args(argv, dir).map_err(BenchError::new)?;
    let listener = UnixListener::bind(&socket)
        .map_err(|e| BenchError::new(format!("cannot listen on {}: {e}", socket.display())))?;
    listener.set_nonblocking(true).map_err(|e| BenchError::new(e.to_string()))?;
    let log_path = dir.join("qemu.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| BenchError::new(format!("cannot create {}: {e}", log_path.display())))?;
    let mut command = Command::new(&program);
    command.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs between fork and exec and makes one
        // prctl(2) call, which is async-signal-safe: QEMU dies with us.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let started = Instant::now();
    let mut child =
        command.spawn().map_err(|e| BenchError::new(format!("cannot start {}: {e}", program.display())))?;
    let result = (|| {
        let failed = |what: String| {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            BenchError::new(format!("bare QEMU: {what}; its log: {}", log.trim()))
        };
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(failed(format!("accept: {e}"))),
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(failed(format!("QEMU ended ({status}) before connecting")));
            }
            if started.elapsed() > BARE_DEADLINE {
                return Err(failed("QEMU did not connect in time".into()));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        stream.set_nonblocking(false).map_err(|e| failed(e.to_string()))?;
        stream
            .set_read_timeout(Some(
                BARE_DEADLINE.saturating_sub(started.elapsed()).max(Duration::from_millis(1)),
            ))
            .map_err(|e| failed(e.to_string()))?;
        let mut first = [0u8; 1];
        match stream.read(&mut first) {
            Ok(1) => Ok(started.elapsed()),
            Ok(_) => Err(failed("the agent's channel closed before its first word".into())),
            Err(e) => Err(failed(format!("no first word from the agent: {e}"))),
        }
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
    result
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Prints the section's tables.
pub fn print(r: &MicrovmResults, problems: &mut Vec<String>) {
    println!();
    let Some(accel) = r.accel else {
        println!("== microVM");
        println!("  skipped: {}", r.skipped.as_deref().unwrap_or("not run"));
        return;
    };
    let how = match accel {
        Accel::Kvm => "accelerator: kvm (doctor: KVM works here)".to_string(),
        Accel::Tcg => format!(
            "accelerator: tcg — SOFTWARE EMULATION, not KVM (doctor: {}); the policy allows it",
            r.kvm
        ),
    };
    println!("== microVM tier; {how}");
    println!("   policy: {}; guest: {}", r.policy, r.setup);
    if !r.run_accels.is_empty() {
        println!("   airlock's log named the accelerator of each `run`: {}", r.run_accels.join(", "));
    }
    report::time_header("boot to first exec of true, ms (wall)", false);
    let rows: [(&str, &Outcome); 9] = [
        ("airlock run --rm --tier microvm -- true", &r.run),
        ("  of which the boot (QEMU start → agent serving)", &r.run_boot),
        ("airlock create, then airlock exec NAME -- true", &r.cli_total),
        ("  of which create (to its exit)", &r.cli_create),
        ("  of which the first exec (a process)", &r.cli_exec),
        ("daemon: POST /v1/sandboxes, then exec true", &r.api_total),
        ("  of which the create (to its 201)", &r.api_create),
        ("  of which the first exec", &r.api_exec),
        ("peer: bare QEMU, same command line, to first word", &r.bare),
    ];
    for (label, o) in rows {
        report::time_row(label, o, String::new(), String::new(), problems);
    }
    report::time_header("exec round trip of true into a running microVM, ms", false);
    for (label, o) in [
        ("through the daemon: POST …/exec to the exit line", &r.exec_api),
        ("airlock exec NAME -- true (CLI, through the daemon)", &r.exec_cli_daemon),
        ("airlock --direct exec NAME -- true (CLI, supervisor)", &r.exec_cli_direct),
    ] {
        report::time_row(label, o, String::new(), String::new(), problems);
    }
    println!();
    println!(
        "== microVM: host memory of one idle microVM (after its execs and {} s idle), from /proc/PID/smaps",
        IDLE_BEFORE_MEMORY.as_secs()
    );
    match &r.memory {
        Err(why) => {
            println!("  not measured (see below)");
            problems.push(format!("microvm memory: {why}"));
        }
        Ok(m) => {
            let q = &m.qemu;
            println!(
                "  QEMU (pid {}, -accel {}, -m {} MiB): RSS {}, PSS {}",
                m.qemu_pid,
                m.qemu_accel,
                m.guest_mib,
                mib(q.rss_kib),
                mib(q.pss_kib)
            );
            match q.guest_ram_kib {
                Some(g) => println!(
                    "    guest RAM it has touched (the {} MiB mapping of its RAM)  {:>10}",
                    m.guest_mib,
                    mib(g)
                ),
                None => println!(
                    "    guest RAM: no anonymous or memfd mapping of exactly {} MiB; all of QEMU counts below",
                    m.guest_mib
                ),
            }
            println!(
                "    TCG translation buffer (anonymous, executable; none under KVM) {:>10}",
                mib(q.translation_kib)
            );
            println!(
                "    file-backed: QEMU's binary, libraries, the kernel image it maps {:>10} (PSS {})",
                mib(q.file_kib),
                mib(q.file_pss_kib)
            );
            println!(
                "    other anonymous: heap, thread stacks, device state             {:>10}",
                mib(q.other_kib)
            );
            println!(
                "    = beyond the guest's RAM                                        {:>10} (with file pages by PSS: {})",
                mib(q.beyond_guest_kib()),
                mib(q.beyond_guest_pss_kib())
            );
            println!(
                "      of which anonymous (memory QEMU wrote: not reclaimable)       {:>10}; the rest is clean file pages",
                mib(q.anon_beyond_guest_kib)
            );
            if accel == Accel::Tcg {
                println!(
                    "      without TCG's buffer (what KVM would not have)                {:>10}",
                    mib(q.beyond_guest_kib().saturating_sub(q.translation_kib))
                );
            }
            if m.helpers.is_empty() {
                println!(
                    "  other processes beside QEMU below the supervisor: none (no egress proxy: the policy has none)"
                );
            }
            for (what, h) in &m.helpers {
                let ram =
                    h.guest_ram_kib.map_or_else(String::new, |g| format!(", of which guest RAM {}", mib(g)));
                println!(
                    "  {what}: RSS {}{ram}, beyond guest RAM {} (PSS {})",
                    mib(h.rss_kib),
                    mib(h.beyond_guest_kib()),
                    mib(h.pss_kib)
                );
            }
            println!(
                "  the sandbox's supervisor (every sandbox has one, process tier too): PSS {}, RSS {}",
                mib(m.supervisor_pss_kib),
                mib(m.supervisor_rss_kib)
            );
            println!(
                "  overhead per VM (QEMU and the processes beside it, RSS beyond guest RAM; supervisor not included): {}",
                mib(m.overhead_kib())
            );
        }
    }
}

/// The section's targets: judged only with KVM.
pub fn targets(r: &MicrovmResults, target: &mut impl FnMut(Option<bool>, String)) {
    let Some(accel) = r.accel else {
        target(None, "microVM targets: the section did not run".into());
        return;
    };
    let under = |what: String| {
        format!("{what} — measured under software emulation (tcg): the target is for KVM, not judged here")
    };
    // Boot to first exec: the daemon's route (no client process), else the CLI's.
    let boot = r
        .api_total
        .summary()
        .map(|s| ("create → first exec through the daemon", s.median))
        .or_else(|| r.cli_total.summary().map(|s| ("airlock create + exec", s.median)));
    match boot {
        Some((route, median)) => {
            let text = format!(
                "microVM boot to first exec ({route}): median {} (≤ {} with KVM)",
                report::ms(median),
                report::ms(MAX_BOOT_TO_EXEC)
            );
            match accel {
                Accel::Kvm => target(Some(median <= MAX_BOOT_TO_EXEC), text),
                Accel::Tcg => target(None, under(text)),
            }
        }
        None => target(None, "microVM boot to first exec: not measured".into()),
    }
    match r.exec_api.summary() {
        Some(s) => {
            let text = format!(
                "microVM exec round trip through the daemon's API: median {} (≤ {} with KVM)",
                report::ms(s.median),
                report::ms(MAX_EXEC_ROUND_TRIP)
            );
            match accel {
                Accel::Kvm => target(Some(s.median <= MAX_EXEC_ROUND_TRIP), text),
                Accel::Tcg => target(None, under(text)),
            }
        }
        None => target(None, "microVM exec round trip: not measured".into()),
    }
    match &r.memory {
        Ok(m) => {
            let text = format!(
                "microVM host memory beyond guest RAM: {} per VM (≤ {} with KVM)",
                mib(m.overhead_kib()),
                mib(MAX_OVERHEAD_KIB)
            );
            match accel {
                Accel::Kvm => {
                    target(Some(m.qemu.guest_ram_kib.is_some() && m.overhead_kib() <= MAX_OVERHEAD_KIB), text)
                }
                Accel::Tcg => target(None, under(text)),
            }
        }
        Err(_) => target(None, "microVM host memory: not measured".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn doctor_decides_the_accelerator() {
        let usable = json!({"microvm": {"engine": {"qemu": "/usr/bin/qemu-system-x86_64",
            "kvm": {"state": "usable", "detail": "booted in 120 ms"}}}});
        assert_eq!(choose_accel(&usable).unwrap(), (Accel::Kvm, "usable: booted in 120 ms".into()));
        let nested = json!({"microvm": {"engine": {"qemu": "/usr/bin/qemu-system-x86_64",
            "kvm": {"state": "unusable", "reason": "QEMU with KVM failed"}}}});
        assert_eq!(choose_accel(&nested).unwrap(), (Accel::Tcg, "unusable: QEMU with KVM failed".into()));
        let missing = json!({"microvm": {"engine": {"qemu": "/usr/bin/qemu-system-x86_64", "kvm": {"state": "missing"}}}});
        assert_eq!(choose_accel(&missing).unwrap(), (Accel::Tcg, "missing".into()));
        let no_qemu = json!({"microvm": {"engine": {"qemu": null, "kvm": {"state": "untested"}}}});
        assert!(choose_accel(&no_qemu).unwrap_err().contains("not installed"));
    }

    #[test]
    fn emulation_is_allowed_only_without_kvm() {
        assert!(policy_text(Accel::Tcg).contains("allow_weaker = [\"kvm\"]"));
        assert!(!policy_text(Accel::Kvm).contains("allow_weaker"));
        assert!(policy_text(Accel::Kvm).contains("extends = \"plugin\""));
    }

    #[test]
    fn the_boot_line_of_airlocks_log_is_read_with_or_without_colour() {
        let plain = "2026-12-07T06:00:00Z  WARN running under emulation\n\
                     2026-12-07T06:00:04Z  INFO microVM booted sandbox=brave-otter ms=4123 accel=\"tcg\"\n";
        assert_eq!(parse_boot_log(plain), Some((Duration::from_millis(4123), "tcg".into())));
        let coloured = "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m microVM booted \u{1b}[3msandbox\u{1b}[0m\u{1b}[2m=\u{1b}[0mx \u{1b}[3mms\u{1b}[0m\u{1b}[2m=\u{1b}[0m87 \u{1b}[3maccel\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"kvm\"\n";
        assert_eq!(parse_boot_log(coloured), Some((Duration::from_millis(87), "kvm".into())));
        assert_eq!(parse_boot_log("INFO guest agent serving ms=5\n"), None);
    }

    #[test]
    fn qemus_accelerator_and_memory_come_from_its_command_line() {
        let argv = strings(&[
            "/usr/bin/qemu-system-x86_64",
            "-M",
            "microvm",
            "-accel",
            "tcg,tb-size=128",
            "-m",
            "512M",
        ]);
        assert_eq!(qemu_facts(&argv), (Some("tcg".into()), Some(512)));
        assert_eq!(
            qemu_facts(&strings(&["q", "-accel", "kvm", "-m", "2G"])),
            (Some("kvm".into()), Some(2048))
        );
        assert_eq!(qemu_facts(&strings(&["q", "-m", "512"])), (None, Some(512)));
        assert_eq!(qemu_facts(&strings(&["q", "-m", "1T"])), (None, None));
    }

    #[test]
    fn the_bare_boot_copies_airlocks_command_line_but_its_sockets() {
        let argv = strings(&[
            "/usr/bin/qemu-system-x86_64",
            "-M",
            "microvm",
            "-serial",
            "file:/var/lib/airlock/x/vm/1-1/console.log",
            "-kernel",
            "/cache/guest/vmlinux",
            "-chardev",
            "socket,id=agent,path=/var/lib/airlock/x/vm/1-1/agent.sock",
            "-device",
            "virtserialport,chardev=agent,name=airlock.agent",
        ]);
        let (program, args, socket) = bare_args(&argv, Path::new("/scratch/bare-0")).unwrap();
        assert_eq!(program, PathBuf::from("/usr/bin/qemu-system-x86_64"));
        assert_eq!(socket, PathBuf::from("/scratch/bare-0/agent.sock"));
        assert_eq!(
            args,
            strings(&[
                "-M",
                "microvm",
                "-serial",
                "file:/scratch/bare-0/console.log",
                "-kernel",
                "/cache/guest/vmlinux",
                "-chardev",
                "socket,id=agent,path=/scratch/bare-0/agent.sock",
                "-device",
                "virtserialport,chardev=agent,name=airlock.agent",
            ])
        );
        let mut with_egress = argv.clone();
        with_egress.extend(strings(&["-chardev", "socket,id=egress,path=/x/egress.sock"]));
        assert!(bare_args(&with_egress, Path::new("/s")).unwrap_err().contains("without egress"));
        assert!(
            bare_args(&strings(&["q", "-M", "microvm"]), Path::new("/s")).unwrap_err().contains("no agent")
        );
    }

    #[test]
    fn ansi_colour_is_removed() {
        assert_eq!(strip_ansi("\u{1b}[3mms\u{1b}[0m\u{1b}[2m=\u{1b}[0m12"), "ms=12");
    }
}
