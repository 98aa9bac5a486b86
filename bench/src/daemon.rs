//! The daemon benchmarks: `airlock daemon` on a socket of the harness's own,
//! with its own state directory, driven over HTTP/1.1 on that Unix socket by
//! a small client in this process (so no client process start-up is in the
//! times).
//!
//! - create → first exec: `POST /v1/sandboxes`, then `POST …/exec` of
//!   `true`; wall time from writing the create request to reading the exec's
//!   `exit` line;
//! - exec round trip into a running sandbox: `true` through the daemon's
//!   API from this process, `airlock exec NAME -- true` through the daemon
//!   (the CLI finds it on its socket) and `airlock --direct exec NAME --
//!   true` (straight to the sandbox's supervisor), interleaved;
//! - N sandboxes created concurrently (rate), left idle, their host memory
//!   measured (PSS of each sandbox's supervisor and everything below it, plus
//!   the daemon's PSS divided by N), then removed concurrently and checked to
//!   be gone.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::measure::{self, Sample, Summary};
use crate::procmem::pss_rss;
use crate::report;
use crate::{BenchError, Outcome, fixtures};

/// Median exec round trip through the daemon, at most.
pub const MAX_EXEC_ROUND_TRIP: Duration = Duration::from_millis(5);
/// Median create → first exec, at most.
pub const MAX_CREATE_TO_EXEC: Duration = Duration::from_millis(25);
/// Median `airlock exec NAME -- true` as a process, through the daemon and
/// directly, at most.
pub const MAX_CLI_EXEC: Duration = Duration::from_millis(3);
/// This many idle sandboxes must fit at once…
pub const MIN_IDLE_SANDBOXES: usize = 200;
/// …each costing the host at most this much (KiB).
pub const MAX_IDLE_KIB: u64 = 4 * 1024;

/// How long one request may take before the harness gives up on it.
const IO_TIMEOUT: Duration = Duration::from_secs(180);
/// The line that ends a successful exec stream.
const EXIT_MARKER: &[u8] = b"\"type\":\"exit\"";
/// argv[1] of a sandbox supervisor (`airlock __supervise`).
const SUPERVISOR_ARG: &str = "__supervise";
/// Distinct failure messages kept per phase.
const MAX_ERRORS: usize = 5;

/// The section's outcome.
pub struct DaemonResults {
    /// Why nothing was measured (the daemon did not start), if so.
    pub skipped: Option<String>,
    pub first_exec: Outcome,
    pub first_create: Outcome,
    pub first_exec_only: Outcome,
    pub exec_daemon: Outcome,
    pub exec_cli: Outcome,
    /// `airlock exec` (a process) through the daemon.
    pub exec_cli_daemon: Outcome,
    pub scale: Vec<Scale>,
}

impl DaemonResults {
    pub fn failed(&self) -> bool {
        self.skipped.is_some()
            || [&self.first_exec, &self.exec_daemon, &self.exec_cli, &self.exec_cli_daemon]
                .iter()
                .any(|o| matches!(o, Outcome::Failed(_)))
            || self.scale.iter().any(|s| s.created < s.wanted || !s.left.is_empty())
    }
}

/// N sandboxes at once.
pub struct Scale {
    pub wanted: usize,
    pub created: usize,
    /// Wall time from releasing the N create requests to the last answer.
    pub create_wall: Duration,
    /// Each create request's own time, under that concurrency.
    pub create_each: Option<Summary>,
    pub errors: Vec<String>,
    pub memory: Option<Memory>,
    pub deleted: usize,
    pub delete_wall: Duration,
    /// What was still there after removing them all.
    pub left: Vec<String>,
}

/// Host memory of the idle sandboxes, in KiB.
pub struct Memory {
    /// Sandboxes whose supervisor was found.
    pub sandboxes: usize,
    /// Processes counted: the supervisors and everything below them.
    pub processes: usize,
    /// PSS of the supervisors and everything below them.
    pub pss_kib: u64,
    /// …of which the supervisors' own.
    pub supervisor_pss_kib: u64,
    pub rss_kib: u64,
    pub daemon_pss_kib: u64,
    pub daemon_rss_kib: u64,
    /// How far MemAvailable fell from before the creates to now (includes
    /// kernel memory: namespaces, mounts, page tables, cgroups).
    pub available_drop_kib: Option<i64>,
}

impl Memory {
    /// PSS per sandbox, the daemon's share included.
    pub fn per_sandbox_kib(&self) -> Option<u64> {
        let n = u64::try_from(self.sandboxes).ok().filter(|n| *n > 0)?;
        Some((self.pss_kib + self.daemon_pss_kib) / n)
    }
}

/// One HTTP answer; `marked` is when `marker` first showed up in the body as
/// a complete line.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub marked: Option<Instant>,
}

impl Response {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One request over the Unix socket, `Connection: close`, reading (and
/// de-chunking) the answer as it arrives.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    marker: Option<&[u8]>,
) -> Result<Response, BenchError> {
    let what = |e: &dyn std::fmt::Display| BenchError::new(format!("{method} {path}: {e}"));
    let mut s = UnixStream::connect(socket).map_err(|e| what(&e))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| what(&e))?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| what(&e))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: airlock\r\nConnection: close\r\n");
    if let Some(body) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes()).map_err(|e| what(&e))?;

    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut status = None;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    let mut pos = 0;
    let mut decoded = Vec::new();
    let mut marked = None;
    let mut done = false;
    while !done {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(what(&e)),
        };
        raw.extend_from_slice(buf.get(..n).unwrap_or_default());
        if status.is_none() {
            let Some(end) = find(&raw, b"\r\n\r\n") else { continue };
            let head = String::from_utf8_lossy(raw.get(..end).unwrap_or_default()).into_owned();
            let mut lines = head.lines();
            let code = lines
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| what(&format!("not an HTTP answer: {head:?}")))?;
            status = Some(code);
            for line in lines {
                let Some((k, v)) = line.split_once(':') else { continue };
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                } else if k == "content-length" {
                    length = v.parse().ok();
                }
            }
            pos = end + 4;
        }
        if chunked {
            loop {
                let rest = raw.get(pos..).unwrap_or_default();
                let Some(eol) = find(rest, b"\r\n") else { break };
                let size_text = String::from_utf8_lossy(rest.get(..eol).unwrap_or_default()).into_owned();
                let size_hex = size_text.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_hex, 16)
                    .map_err(|_| what(&format!("bad chunk size {size_text:?}")))?;
                if size == 0 {
                    done = true;
                    break;
                }
                let Some(chunk) = rest.get(eol + 2..eol + 2 + size) else { break };
                if rest.len() < eol + 2 + size + 2 {
                    break;
                }
                decoded.extend_from_slice(chunk);
                pos += eol + 2 + size + 2;
            }
        } else {
            decoded.extend_from_slice(raw.get(pos..).unwrap_or_default());
            pos = raw.len();
            done = length.is_some_and(|l| decoded.len() >= l);
        }
        if marked.is_none()
            && let Some(m) = marker
            && let Some(at) = find(&decoded, m)
            && decoded.get(at..).is_some_and(|tail| tail.contains(&b'\n'))
        {
            marked = Some(Instant::now());
        }
    }
    let status = status.ok_or_else(|| what(&"the connection closed before an answer"))?;
    Ok(Response { status, body: decoded, marked })
}

/// `airlock daemon` on a socket in `dir`, with its state in `dir/state`.
/// Stopped (SIGTERM) when dropped, after removing any sandbox left behind.
pub struct Daemon {
    airlock: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn start(airlock: &Path, dir: &Path) -> Result<Daemon, BenchError> {
        Daemon::start_with_env(airlock, dir, &[])
    }

    /// Starts the daemon with `env` added to its environment (and so to its
    /// sandboxes' supervisors').
    pub fn start_with_env(
        airlock: &Path,
        dir: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Daemon, BenchError> {
        Daemon::start_with(airlock, dir, &[], env)
    }

    /// Starts the daemon with `args` after `daemon --socket PATH` (another
    /// listener) and `env` added to its environment.
    pub fn start_with(
        airlock: &Path,
        dir: &Path,
        args: &[std::ffi::OsString],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Daemon, BenchError> {
        fixtures::make_dir_0755(dir)?;
        let socket = dir.join("run/airlock.sock");
        // sun_path holds 108 bytes with the terminating NUL.
        if socket.as_os_str().len() > 100 {
            return Err(BenchError::new(format!(
                "the socket path {} is too long for a Unix socket; use a shorter --work-dir",
                socket.display()
            )));
        }
        let log = dir.join("daemon.log");
        let log_file = std::fs::File::create(&log)
            .map_err(|e| BenchError::new(format!("cannot create {}: {e}", log.display())))?;
        let state = dir.join("state");
        let child = Command::new(airlock)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("AIRLOCK_STATE_DIR", &state)
            .env("AIRLOCK_SOCKET", &socket)
            .envs(env.iter().copied())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| BenchError::new(format!("cannot start airlock daemon: {e}")))?;
        let mut d = Daemon { airlock: airlock.to_path_buf(), socket, state, log, child: Some(child) };
        let started = Instant::now();
        loop {
            if request(&d.socket, "GET", "/v1/health", None, None).is_ok_and(|r| r.status == 200) {
                return Ok(d);
            }
            let exited = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || started.elapsed() > Duration::from_secs(20) {
                let why =
                    exited.map_or_else(|| "did not answer /v1/health in 20 s".into(), |s| format!("{s}"));
                return Err(BenchError::new(format!("airlock daemon: {why}; its log: {}", d.log_tail())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines.get(lines.len().saturating_sub(5)..).unwrap_or_default().join(" | ")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn create(&self, name: &str) -> Result<(), BenchError> {
        self.create_with(name, &json!({ "name": name, "policy": "dev" }))
    }

    /// `POST /v1/sandboxes` with `body`, which names `name`.
    pub fn create_with(&self, name: &str, body: &Value) -> Result<(), BenchError> {
        let body = body.to_string();
        let r = request(&self.socket, "POST", "/v1/sandboxes", Some(&body), None)?;
        if r.status != 201 {
            return Err(BenchError::new(format!("create {name}: HTTP {}: {}", r.status, r.text())));
        }
        Ok(())
    }

    /// Runs `true` in `name`; returns when the exit line was read.
    pub fn exec_true(&self, name: &str) -> Result<Instant, BenchError> {
        let body = json!({ "argv": ["true"] }).to_string();
        let path = format!("/v1/sandboxes/{name}/exec");
        let r = request(&self.socket, "POST", &path, Some(&body), Some(EXIT_MARKER))?;
        let text = r.text();
        if r.status != 200 {
            return Err(BenchError::new(format!("exec in {name}: HTTP {}: {text}", r.status)));
        }
        let exit = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["type"] == "exit")
            .ok_or_else(|| BenchError::new(format!("exec in {name}: no exit line in {text:?}")))?;
        if exit["code"] != 0 {
            return Err(BenchError::new(format!("exec in {name}: true did not exit 0: {exit}")));
        }
        r.marked.ok_or_else(|| BenchError::new(format!("exec in {name}: exit line not seen")))
    }

    pub fn delete(&self, name: &str) -> Result<(), BenchError> {
        let r = request(&self.socket, "DELETE", &format!("/v1/sandboxes/{name}"), None, None)?;
        if r.status != 200 {
            return Err(BenchError::new(format!("delete {name}: HTTP {}: {}", r.status, r.text())));
        }
        Ok(())
    }

    pub fn supervisor_pid(&self, name: &str) -> Result<Option<i32>, BenchError> {
        let r = request(&self.socket, "GET", &format!("/v1/sandboxes/{name}"), None, None)?;
        if r.status != 200 {
            return Err(BenchError::new(format!("inspect {name}: HTTP {}: {}", r.status, r.text())));
        }
        let v: Value = serde_json::from_slice(&r.body)
            .map_err(|e| BenchError::new(format!("inspect {name}: not JSON ({e})")))?;
        Ok(v["supervisor_pid"].as_i64().and_then(|p| i32::try_from(p).ok()))
    }

    /// The names the daemon lists.
    pub fn list(&self) -> Result<Vec<String>, BenchError> {
        let r = request(&self.socket, "GET", "/v1/sandboxes", None, None)?;
        if r.status != 200 {
            return Err(BenchError::new(format!("list: HTTP {}: {}", r.status, r.text())));
        }
        let v: Value =
            serde_json::from_slice(&r.body).map_err(|e| BenchError::new(format!("list: not JSON ({e})")))?;
        Ok(v["sandboxes"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["name"].as_str().map(String::from)).collect())
            .unwrap_or_default())
    }

    /// Sandbox directories in the state directory.
    pub fn state_entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.state)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `airlock --direct exec NAME -- true`, straight to the supervisor.
    pub fn cli_exec(&self, name: &str) -> Command {
        let mut c = Command::new(&self.airlock);
        c.env("AIRLOCK_STATE_DIR", &self.state)
            .env_remove("AIRLOCK_SOCKET")
            .args(["--direct", "exec", name, "--", "true"]);
        c
    }

    /// `airlock exec NAME -- true`, which finds this daemon on its socket.
    pub fn cli_exec_through_daemon(&self, name: &str) -> Command {
        let mut c = Command::new(&self.airlock);
        c.env("AIRLOCK_STATE_DIR", &self.state)
            .env("AIRLOCK_SOCKET", &self.socket)
            .args(["exec", name, "--", "true"]);
        c
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let left = self.state_entries();
        for name in &left {
            let _ = self.delete(name);
        }
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) with a pid of our own unreaped child and a
                // valid signal number has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let _ = child.wait();
        }
        // Whatever the daemon could not remove, the CLI tries.
        let left = self.state_entries();
        if !left.is_empty() {
            let mut rm = Command::new(&self.airlock);
            rm.env("AIRLOCK_STATE_DIR", &self.state).arg("rm").args(&left);
            let _ = measure::checked(rm, "airlock rm");
        }
    }
}

/// What the section is asked to do.
pub struct Plan {
    pub iterations: usize,
    pub warmup: usize,
    pub execs: usize,
    pub counts: Vec<usize>,
}

/// Runs the whole section against a fresh daemon in `dir`.
pub fn run(airlock: &Path, dir: &Path, plan: &Plan, notes: &mut Vec<String>) -> DaemonResults {
    let not_run = |why: &str| Outcome::Skipped(why.to_string());
    let daemon = match Daemon::start(airlock, dir) {
        Ok(d) => d,
        Err(e) => {
            return DaemonResults {
                skipped: Some(e.to_string()),
                first_exec: not_run("no daemon"),
                first_create: not_run("no daemon"),
                first_exec_only: not_run("no daemon"),
                exec_daemon: not_run("no daemon"),
                exec_cli: not_run("no daemon"),
                exec_cli_daemon: not_run("no daemon"),
                scale: Vec::new(),
            };
        }
    };
    eprintln!("airlock-bench: daemon on {}", daemon.socket.display());

    eprintln!(
        "airlock-bench: daemon, create → first exec, {} runs after {} warm-up",
        plan.iterations, plan.warmup
    );
    let (first_exec, first_create, first_exec_only) = first_exec(&daemon, plan);

    eprintln!("airlock-bench: daemon, exec round trip, {} execs each way, interleaved", plan.execs);
    let (exec_daemon, exec_cli, exec_cli_daemon) = exec_round_trip(&daemon, plan);

    let mut scale = Vec::new();
    for &n in &plan.counts {
        eprintln!("airlock-bench: daemon, {n} sandboxes at once");
        let s = scale_to(&daemon, n);
        let stop = s.created < s.wanted;
        scale.push(s);
        if stop {
            notes.push(format!("daemon: stopped scaling at {n} sandboxes, which did not all start"));
            break;
        }
    }
    let log = daemon.log.clone();
    drop(daemon);
    // The scratch directory goes away: keep what the daemon said.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if !lines.is_empty() {
        notes.push(format!("daemon: its log, {} lines; the last ones:", lines.len()));
        for line in lines.get(lines.len().saturating_sub(5)..).unwrap_or_default() {
            notes.push(format!("  {line}"));
        }
    }
    DaemonResults {
        skipped: None,
        first_exec,
        first_create,
        first_exec_only,
        exec_daemon,
        exec_cli,
        exec_cli_daemon,
        scale,
    }
}

pub fn summarize(walls: &[Duration]) -> Outcome {
    let samples: Vec<Sample> = walls.iter().map(|&wall| Sample { wall, max_rss_kib: 0 }).collect();
    Summary::of(&samples).map_or_else(|| Outcome::Failed("no samples".into()), Outcome::Measured)
}

/// One create → first exec: the times to the create's `201` and to the
/// exec's exit line.
pub struct FirstExec {
    pub create: Duration,
    pub total: Duration,
}

/// Creates `name`, runs `true` in it and removes it (untimed).
pub fn create_then_exec(d: &Daemon, name: &str) -> Result<FirstExec, BenchError> {
    let t0 = Instant::now();
    let r = d.create(name).and_then(|()| {
        let t1 = Instant::now();
        d.exec_true(name).map(|t2| FirstExec { create: t1 - t0, total: t2 - t0 })
    });
    let removed = d.delete(name);
    let times = r?;
    removed?;
    Ok(times)
}

/// create → first exec, one sandbox at a time, removed (untimed) after each.
fn first_exec(d: &Daemon, plan: &Plan) -> (Outcome, Outcome, Outcome) {
    let (mut total, mut create, mut exec) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..plan.warmup + plan.iterations {
        match create_then_exec(d, &format!("bench-first-{i}")) {
            Ok(t) => {
                if i >= plan.warmup {
                    total.push(t.total);
                    create.push(t.create);
                    exec.push(t.total - t.create);
                }
            }
            Err(e) => {
                let f = || Outcome::Failed(format!("run {}: {e}", i + 1));
                return (f(), f(), f());
            }
        }
    }
    (summarize(&total), summarize(&create), summarize(&exec))
}

/// One CLI route of the exec round trip: its label, the command, the times
/// and the first error.
type CliRoute = (&'static str, fn(&Daemon, &str) -> Command, Vec<Duration>, Option<String>);

/// `true` in one running sandbox, round by round: through the daemon's API
/// from this process, `airlock exec` through the daemon, and `airlock
/// --direct exec`.
fn exec_round_trip(d: &Daemon, plan: &Plan) -> (Outcome, Outcome, Outcome) {
    let name = "bench-exec";
    if let Err(e) = d.create(name) {
        let f = || Outcome::Failed(e.to_string());
        return (f(), f(), f());
    }
    let warm = plan.warmup.max(1);
    let mut via_daemon = Vec::new();
    let mut daemon_err = None;
    let mut cli_routes: [CliRoute; 2] = [
        ("airlock exec", Daemon::cli_exec_through_daemon, Vec::new(), None),
        ("airlock --direct exec", Daemon::cli_exec, Vec::new(), None),
    ];
    for i in 0..warm + plan.execs {
        if daemon_err.is_none() {
            let t0 = Instant::now();
            match d.exec_true(name) {
                Ok(t) if i >= warm => via_daemon.push(t - t0),
                Ok(_) => {}
                Err(e) => daemon_err = Some(format!("exec {}: {e}", i + 1)),
            }
        }
        for (route, command, walls, err) in cli_routes.iter_mut() {
            if err.is_some() {
                continue;
            }
            let label = format!("{route} {name} -- true");
            let r = if i < warm {
                measure::checked(command(d, name), &label).map(|_| None)
            } else {
                measure::timed(command(d, name), &label).map(|s| Some(s.wall))
            };
            match r {
                Ok(Some(w)) => walls.push(w),
                Ok(None) => {}
                Err(e) => *err = Some(format!("exec {}: {e}", i + 1)),
            }
        }
    }
    let removed = d.delete(name);
    let outcome = |err: &Option<String>, walls: &[Duration]| match err {
        Some(e) => Outcome::Failed(e.clone()),
        None => summarize(walls),
    };
    let [(_, _, through_walls, through_err), (_, _, direct_walls, direct_err)] = &cli_routes;
    let cli_daemon = outcome(through_err, through_walls);
    let cli = outcome(direct_err, direct_walls);
    let daemon = match removed {
        Err(e) if daemon_err.is_none() => Outcome::Failed(format!("removing the sandbox: {e}")),
        _ => outcome(&daemon_err, &via_daemon),
    };
    (daemon, cli, cli_daemon)
}

/// Runs `job` for each name on its own thread, all released together;
/// returns each one's result and time, and the wall time of the whole: from
/// the first request's start to the last one's end.
fn concurrently(
    names: &[String],
    job: impl Fn(&str) -> Result<(), BenchError> + Sync,
) -> (Vec<Result<Duration, String>>, Duration) {
    let barrier = Barrier::new(names.len());
    let spans: Vec<(Instant, Instant, Result<(), String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                let (barrier, job) = (&barrier, &job);
                scope.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    let r = job(name).map_err(|e| e.to_string());
                    (start, Instant::now(), r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    let now = Instant::now();
                    (now, now, Err("the thread panicked".into()))
                })
            })
            .collect()
    });
    let first = spans.iter().map(|s| s.0).min();
    let last = spans.iter().map(|s| s.1).max();
    let wall = first.zip(last).map_or(Duration::ZERO, |(a, b)| b.saturating_duration_since(a));
    (spans.into_iter().map(|(start, end, r)| r.map(|()| end - start)).collect(), wall)
}

fn keep_error(errors: &mut Vec<String>, e: String) {
    if errors.len() < MAX_ERRORS && !errors.contains(&e) {
        errors.push(e);
    }
}

fn scale_to(d: &Daemon, n: usize) -> Scale {
    let names: Vec<String> = (0..n).map(|i| format!("bench-idle-{n}-{i}")).collect();
    let available_before = mem_available_kib();
    let (results, create_wall) = concurrently(&names, |name| d.create(name));
    let mut errors = Vec::new();
    let mut each = Vec::new();
    let mut created = Vec::new();
    for (name, r) in names.iter().zip(results) {
        match r {
            Ok(w) => {
                each.push(Sample { wall: w, max_rss_kib: 0 });
                created.push(name.clone());
            }
            Err(e) => keep_error(&mut errors, e),
        }
    }
    // Let what starts lazily start, and the creates' transient memory go.
    std::thread::sleep(Duration::from_secs(2));
    let mut supervisors = Vec::new();
    for name in &created {
        match d.supervisor_pid(name) {
            Ok(Some(pid)) => supervisors.push(pid),
            Ok(None) => keep_error(&mut errors, format!("{name}: running without a supervisor pid")),
            Err(e) => keep_error(&mut errors, e.to_string()),
        }
    }
    let memory = measure_memory(&supervisors, d.pid(), available_before);

    // Remove everything there is, including any half-made sandbox.
    let mut doomed = d.list().unwrap_or_default();
    for name in d.state_entries() {
        if !doomed.contains(&name) {
            doomed.push(name);
        }
    }
    let (results, delete_wall) = concurrently(&doomed, |name| d.delete(name));
    let mut deleted = 0;
    for r in results {
        match r {
            Ok(_) => deleted += 1,
            Err(e) => keep_error(&mut errors, e),
        }
    }
    let mut left: Vec<String> = Vec::new();
    match d.list() {
        Ok(names) if !names.is_empty() => left.push(format!("{} listed by the daemon", names.len())),
        Ok(_) => {}
        Err(e) => left.push(format!("cannot list: {e}")),
    }
    let dirs = d.state_entries();
    if !dirs.is_empty() {
        left.push(format!("{} state directories", dirs.len()));
    }
    // Supervisors finish after answering; give them a moment.
    let started = Instant::now();
    let mut alive = supervisors.clone();
    while !alive.is_empty() && started.elapsed() < Duration::from_secs(10) {
        alive.retain(|&pid| is_supervisor(pid));
        if !alive.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if !alive.is_empty() {
        left.push(format!("{} supervisor processes", alive.len()));
    }
    Scale {
        wanted: n,
        created: created.len(),
        create_wall,
        create_each: Summary::of(&each),
        errors,
        memory,
        deleted,
        delete_wall,
        left,
    }
}

fn is_supervisor(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| find(&c, SUPERVISOR_ARG.as_bytes()).is_some())
}

/// Every process's parent, from /proc/*/stat.
pub fn parents() -> HashMap<i32, i32> {
    let mut map = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return map };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid …": comm may hold spaces and parentheses.
        let Some((_, after)) = stat.rsplit_once(')') else { continue };
        if let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse::<i32>().ok()) {
            map.insert(pid, ppid);
        }
    }
    map
}

/// `roots` and all their descendants.
pub fn with_descendants(roots: &[i32], parents: &HashMap<i32, i32>) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, &ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    let mut stack: Vec<i32> = roots.to_vec();
    while let Some(pid) = stack.pop() {
        out.push(pid);
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids);
        }
    }
    out
}

fn measure_memory(supervisors: &[i32], daemon: Option<u32>, available_before: Option<u64>) -> Option<Memory> {
    let procs = with_descendants(supervisors, &parents());
    let (mut pss, mut supervisor_pss, mut rss, mut counted) = (0, 0, 0, 0);
    for pid in &procs {
        if let Some((p, r)) = pss_rss(*pid) {
            pss += p;
            rss += r;
            counted += 1;
            if supervisors.contains(pid) {
                supervisor_pss += p;
            }
        }
    }
    let (daemon_pss, daemon_rss) =
        daemon.and_then(|p| i32::try_from(p).ok()).and_then(pss_rss).unwrap_or((0, 0));
    let available_drop = match (available_before, mem_available_kib()) {
        (Some(before), Some(after)) => {
            i64::try_from(before).ok().zip(i64::try_from(after).ok()).map(|(b, a)| b - a)
        }
        _ => None,
    };
    (!supervisors.is_empty()).then_some(Memory {
        sandboxes: supervisors.len(),
        processes: counted,
        pss_kib: pss,
        supervisor_pss_kib: supervisor_pss,
        rss_kib: rss,
        daemon_pss_kib: daemon_pss,
        daemon_rss_kib: daemon_rss,
        available_drop_kib: available_drop,
    })
}

fn mem_available_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn mib(kib: f64) -> String {
    format!("{:.2} MiB", kib / 1024.0)
}

/// Prints the section's tables.
pub fn print(r: &DaemonResults, problems: &mut Vec<String>) {
    println!();
    println!("== daemon: airlock daemon on its own socket, driven over HTTP/1.1 from this process; ms");
    if let Some(why) = &r.skipped {
        println!("  skipped: {why}");
        return;
    }
    report::time_header("create → first exec (policy dev, no workspace)", false);
    for (label, o) in [
        ("POST /v1/sandboxes, then exec true: to the exit line", &r.first_exec),
        ("  of which: create (to the 201)", &r.first_create),
        ("  of which: the first exec", &r.first_exec_only),
    ] {
        report::time_row(label, o, String::new(), String::new(), problems);
    }
    report::time_header("exec round trip of true into a running sandbox", false);
    report::time_row(
        "through the daemon: POST …/exec to the exit line",
        &r.exec_daemon,
        String::new(),
        String::new(),
        problems,
    );
    report::time_row(
        "airlock exec NAME -- true (CLI, through the daemon)",
        &r.exec_cli_daemon,
        String::new(),
        String::new(),
        problems,
    );
    report::time_row(
        "airlock --direct exec NAME -- true (CLI, to the supervisor)",
        &r.exec_cli,
        String::new(),
        String::new(),
        problems,
    );

    if r.scale.is_empty() {
        return;
    }
    println!();
    println!("== daemon: N sandboxes created at once (one connection each), left idle, then removed at once");
    println!(
        "  {:>5} {:>8} {:>10} {:>10} {:>10} {:>11} {:>10}",
        "N", "started", "wall", "per sec", "each med", "each p90", "rm wall"
    );
    for s in &r.scale {
        let per_sec = s.created as f64 / s.create_wall.as_secs_f64().max(1e-9);
        let (med, p90) = s
            .create_each
            .map_or_else(|| ("-".into(), "-".into()), |e| (report::ms(e.median), report::ms(e.p90)));
        println!(
            "  {:>5} {:>8} {:>10} {:>10.1} {:>10} {:>11} {:>10}",
            s.wanted,
            s.created,
            report::ms(s.create_wall),
            per_sec,
            med,
            p90,
            report::ms(s.delete_wall)
        );
    }
    println!();
    println!(
        "== daemon: host memory per idle sandbox (policy dev, no workspace), from /proc/PID/smaps_rollup"
    );
    println!("   PSS per sandbox: its supervisor, everything below it (the agent), the daemon's PSS / N;");
    println!("   RSS: the same processes' RSS per sandbox, shared pages counted in full");
    println!(
        "  {:>5} {:>6} {:>11} {:>11} {:>11} {:>11} {:>11} {:>16}",
        "N", "procs", "supervisor", "below it", "daemon/N", "= total", "RSS", "MemAvail drop/N"
    );
    for s in &r.scale {
        let Some(m) = &s.memory else {
            println!("  {:>5} not measured", s.wanted);
            continue;
        };
        let n = m.sandboxes.max(1) as f64;
        let drop = m.available_drop_kib.map_or_else(|| "-".into(), |d| mib(d as f64 / n));
        println!(
            "  {:>5} {:>6} {:>11} {:>11} {:>11} {:>11} {:>11} {:>16}",
            m.sandboxes,
            m.processes,
            mib(m.supervisor_pss_kib as f64 / n),
            mib(m.pss_kib.saturating_sub(m.supervisor_pss_kib) as f64 / n),
            mib(m.daemon_pss_kib as f64 / n),
            mib((m.pss_kib + m.daemon_pss_kib) as f64 / n),
            mib(m.rss_kib as f64 / n),
            drop
        );
    }
    if let Some(m) = r.scale.iter().rev().find_map(|s| s.memory.as_ref()) {
        println!(
            "  daemon at {} sandboxes: PSS {}, RSS {}",
            m.sandboxes,
            mib(m.daemon_pss_kib as f64),
            mib(m.daemon_rss_kib as f64)
        );
    }
    println!("  (MemAvail drop: MemAvailable before the creates minus after, per sandbox: includes kernel");
    println!("  memory — namespaces, mounts, page tables, cgroups — and anything else on the machine)");
    for s in &r.scale {
        for e in &s.errors {
            problems.push(format!("daemon, {} sandboxes: {e}", s.wanted));
        }
        if s.deleted < s.created {
            problems
                .push(format!("daemon, {} sandboxes: only {} of {} removed", s.wanted, s.deleted, s.created));
        }
        if !s.left.is_empty() {
            problems.push(format!("daemon, {} sandboxes: left behind: {}", s.wanted, s.left.join(", ")));
        }
    }
}

/// The section's targets.
pub fn targets(r: &DaemonResults, target: &mut impl FnMut(Option<bool>, String)) {
    match r.exec_daemon.summary() {
        Some(s) => target(
            Some(s.median <= MAX_EXEC_ROUND_TRIP),
            format!(
                "exec round trip through the daemon's API: median {} (≤ {})",
                report::ms(s.median),
                report::ms(MAX_EXEC_ROUND_TRIP),
            ),
        ),
        None => target(None, "exec round trip through the daemon: not measured".into()),
    }
    // What a process start adds shows as the ratio to the API's round trip.
    let api = r.exec_daemon.summary().map(|s| s.median);
    for (route, outcome) in
        [("airlock exec, through the daemon", &r.exec_cli_daemon), ("airlock --direct exec", &r.exec_cli)]
    {
        match outcome.summary() {
            Some(s) => target(
                Some(s.median <= MAX_CLI_EXEC),
                format!(
                    "{route} (a process): median {} (≤ {}, {:.0}% of it){}",
                    report::ms(s.median),
                    report::ms(MAX_CLI_EXEC),
                    100.0 * s.median.as_secs_f64() / MAX_CLI_EXEC.as_secs_f64(),
                    api.filter(|a| !a.is_zero()).map_or_else(String::new, |a| format!(
                        "; {:.2}x the API's round trip",
                        s.median.as_secs_f64() / a.as_secs_f64()
                    ))
                ),
            ),
            None => target(None, format!("{route}: not measured")),
        }
    }
    match r.first_exec.summary() {
        Some(s) => target(
            Some(s.median <= MAX_CREATE_TO_EXEC),
            format!(
                "create → first exec: median {} (≤ {})",
                report::ms(s.median),
                report::ms(MAX_CREATE_TO_EXEC)
            ),
        ),
        None => target(None, "create → first exec: not measured".into()),
    }
    let most = r.scale.iter().filter(|s| s.memory.is_some()).max_by_key(|s| s.created);
    match most.and_then(|s| s.memory.as_ref().and_then(Memory::per_sandbox_kib).map(|k| (s, k))) {
        Some((s, per)) => target(
            Some(s.created >= MIN_IDLE_SANDBOXES && per <= MAX_IDLE_KIB),
            format!(
                "idle sandboxes: {} of {} started, {} each (PSS, daemon share included) (≥ {MIN_IDLE_SANDBOXES} \
                 at ≤ {})",
                s.created,
                s.wanted,
                mib(per as f64),
                mib(MAX_IDLE_KIB as f64)
            ),
        ),
        None => target(None, format!("≥ {MIN_IDLE_SANDBOXES} idle sandboxes at ≤ 4 MiB each: not measured")),
    }
}

/// `--daemon-counts 1,10,200`.
pub fn parse_counts(list: &str) -> Result<Vec<usize>, BenchError> {
    let counts: Vec<usize> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.parse::<usize>() {
            Ok(n) if (1..=5000).contains(&n) => Ok(n),
            _ => Err(BenchError::new(format!("--daemon-counts: expected numbers 1–5000, got {s:?}"))),
        })
        .collect::<Result<_, _>>()?;
    if counts.is_empty() {
        return Err(BenchError::new("--daemon-counts needs at least one number"));
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn counts_parse() {
        assert_eq!(parse_counts("1,10,200").unwrap(), vec![1, 10, 200]);
        assert!(parse_counts("").is_err());
        assert!(parse_counts("0").is_err());
        assert!(parse_counts("ten").is_err());
    }

    #[test]
    fn descendants_follow_the_tree() {
        let parents: HashMap<i32, i32> = [(2, 1), (3, 2), (4, 3), (5, 1), (6, 9)].into_iter().collect();
        let mut d = with_descendants(&[2], &parents);
        d.sort_unstable();
        assert_eq!(d, vec![2, 3, 4]);
    }

    #[test]
    fn chunked_answers_are_decoded() {
        let dir = tempdir();
        let socket = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).unwrap();
            conn.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                  f\r\n{\"type\":\"starte\r\n\
                  9\r\nd\"}\n{\"typ\r\n\
                  11\r\ne\":\"exit\",\"code\":\r\n\
                  3\r\n0}\n\r\n0\r\n\r\n",
            )
            .unwrap();
        });
        let r = request(&socket, "POST", "/x", Some("{}"), Some(EXIT_MARKER)).unwrap();
        server.join().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            "{\"type\":\"started\"}\n{\"type\":\"exit\",\"code\":0}\n"
        );
        assert!(r.marked.is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("airlock-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
