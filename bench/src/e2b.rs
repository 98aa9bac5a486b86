//! Create → first output through E2B's own Python SDK, beside the native
//! API's create → first exec, against one `airlock daemon` that serves both
//! (its Unix socket, and `--e2b-listen` on a free loopback port).
//!
//! The SDK side is one long-lived Python process (bench/e2b_driver.py, run
//! with the venv `bench/run.sh` installs `e2b` into) that imports the SDK
//! once; per line it is sent it does `Sandbox.create()` →
//! `commands.run("echo hi")` → `kill` (untimed) and answers with its times,
//! so the interpreter's start and the import are in none of them. The two
//! routes alternate run by run (which goes first swaps every round), so a
//! burst of load elsewhere lands on both alike.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon::{self, Daemon};
use crate::report::{self, LABEL_W};
use crate::{BenchError, Outcome, fixtures};

/// The SDK's create → first output may take at most this many times the
/// native API's create → first exec…
pub const MAX_RATIO_VS_NATIVE: f64 = 1.5;
/// …and at most this long (the hosted E2B service's independent
/// measurements are about 440 ms).
pub const MAX_CREATE_TO_OUTPUT: Duration = Duration::from_millis(50);
/// The SDK version bench/run.sh installs (as scripts/test.sh pins it for
/// the E2B tests).
pub const SDK_VERSION: &str = "2.64.0";

/// The driver, written into the scratch directory to run.
const DRIVER: &str = include_str!("../e2b_driver.py");
/// How long one driver answer (a create, a run and a kill) may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the driver may take to import the SDK and say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What the section is asked to do.
pub struct Plan {
    pub iterations: usize,
    pub warmup: usize,
    /// The venv's python, with `e2b` installed.
    pub python: PathBuf,
}

/// The section's outcome.
pub struct E2bResults {
    /// Why nothing was measured (no SDK installed, or it did not import), if so.
    pub skipped: Option<String>,
    /// The SDK version the driver imported.
    pub sdk: Option<String>,
    /// Native: create to its `201`, then `true` to the exit line.
    pub native: Outcome,
    pub native_create: Outcome,
    /// SDK: `Sandbox.create()`, then `echo hi` to its output.
    pub sdk_output: Outcome,
    pub sdk_create: Outcome,
    /// SDK: until `commands.run` returned (the exit seen).
    pub sdk_exit: Outcome,
}

impl E2bResults {
    pub fn failed(&self) -> bool {
        [&self.native, &self.sdk_output].iter().any(|o| matches!(o, Outcome::Failed(_)))
    }

    fn skipped(why: String) -> E2bResults {
        let not_run = || Outcome::Skipped(why.clone());
        E2bResults {
            sdk: None,
            native: not_run(),
            native_create: not_run(),
            sdk_output: not_run(),
            sdk_create: not_run(),
            sdk_exit: not_run(),
            skipped: Some(why),
        }
    }

    fn failed_with(why: String, sdk: Option<String>) -> E2bResults {
        let f = || Outcome::Failed(why.clone());
        E2bResults {
            skipped: None,
            sdk,
            native: f(),
            native_create: f(),
            sdk_output: f(),
            sdk_create: f(),
            sdk_exit: f(),
        }
    }

    /// The SDK's median over the native API's.
    fn ratio(&self) -> Option<f64> {
        let (sdk, native) = (self.sdk_output.summary()?, self.native.summary()?);
        let native = native.median.as_secs_f64();
        (native > 0.0).then(|| sdk.median.as_secs_f64() / native)
    }
}

/// One SDK run's times, from just before `Sandbox.create()`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SdkRun {
    pub create: Duration,
    pub first_output: Duration,
    pub exit: Duration,
}

/// `<target>/bench-deps/py-e2b/bin/python`, where `<target>` is
/// `CARGO_TARGET_DIR` if set, else the airlock binary's target directory
/// (`<target>/release/airlock`): where bench/run.sh installs the SDK.
pub fn default_python(cargo_target: Option<&OsStr>, airlock: &Path) -> PathBuf {
    let target = match cargo_target.filter(|t| !t.is_empty()) {
        Some(t) => PathBuf::from(t),
        None => {
            airlock.parent().and_then(Path::parent).map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
        }
    };
    target.join("bench-deps/py-e2b/bin/python")
}

/// The driver's first line, `{"ready": "<e2b version>"}`: the version.
fn parse_ready(line: &str) -> Result<String, BenchError> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| BenchError::new(format!("the e2b driver said {line:?}, not its ready line ({e})")))?;
    v["ready"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| BenchError::new(format!("the e2b driver said {line:?}, not its ready line")))
}

/// One answer of the driver: its times, or the error it reported.
fn parse_run(line: &str) -> Result<SdkRun, BenchError> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| BenchError::new(format!("the e2b driver answered {line:?}, not JSON ({e})")))?;
    if let Some(why) = v["error"].as_str() {
        return Err(BenchError::new(format!("the e2b SDK: {why}")));
    }
    let field = |name: &str| {
        v[name]
            .as_f64()
            .filter(|ms| ms.is_finite() && *ms >= 0.0)
            .map(|ms| Duration::from_secs_f64(ms / 1e3))
            .ok_or_else(|| BenchError::new(format!("the e2b driver's answer {line:?} has no {name}")))
    };
    Ok(SdkRun {
        create: field("create_ms")?,
        first_output: field("first_output_ms")?,
        exit: field("exit_ms")?,
    })
}

/// The long-lived driver process: a line in, a line of times out.
struct Driver {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
    log: PathBuf,
}

impl Driver {
    /// Starts the driver with the SDK's variables naming `url`, and waits
    /// for its ready line; returns it with the SDK version.
    fn start(
        python: &Path,
        script: &Path,
        url: &str,
        key: &str,
        log: &Path,
    ) -> Result<(Driver, String), BenchError> {
        let log_file = std::fs::File::create(log)
            .map_err(|e| BenchError::new(format!("cannot create {}: {e}", log.display())))?;
        let mut child = Command::new(python)
            .arg(script)
            .env("E2B_API_URL", url)
            .env("E2B_SANDBOX_URL", url)
            .env("E2B_API_KEY", key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .map_err(|e| BenchError::new(format!("cannot start {}: {e}", python.display())))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = stdout {
            // A reader thread, so a hung driver times out instead of hanging
            // the harness; it ends with the driver's stdout.
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut driver = Driver { child, stdin, lines, log: log.to_path_buf() };
        let version = parse_ready(&driver.next_line(READY_TIMEOUT)?)?;
        Ok((driver, version))
    }

    fn next_line(&mut self, timeout: Duration) -> Result<String, BenchError> {
        match self.lines.recv_timeout(timeout) {
            Ok(Ok(line)) => Ok(line),
            Ok(Err(e)) => Err(BenchError::new(format!("reading the e2b driver: {e}; {}", self.log_tail()))),
            Err(RecvTimeoutError::Timeout) => Err(BenchError::new(format!(
                "the e2b driver did not answer in {}; {}",
                report::secs(timeout),
                self.log_tail()
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                let status =
                    self.child.try_wait().ok().flatten().map_or_else(String::new, |s| format!(" ({s})"));
                Err(BenchError::new(format!("the e2b driver exited{status}; {}", self.log_tail())))
            }
        }
    }

    /// One create → run → kill.
    fn run_once(&mut self) -> Result<SdkRun, BenchError> {
        let stdin = self.stdin.as_mut().ok_or_else(|| BenchError::new("the e2b driver's stdin is closed"))?;
        stdin
            .write_all(b"run\n")
            .and_then(|()| stdin.flush())
            .map_err(|e| BenchError::new(format!("writing to the e2b driver: {e}")))?;
        parse_run(&self.next_line(ANSWER_TIMEOUT)?)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        match lines.get(lines.len().saturating_sub(5)..) {
            Some(tail) if !tail.is_empty() => format!("its stderr: {}", tail.join(" | ")),
            _ => "its stderr is empty".into(),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The end of its stdin ends it; one stuck in a request is killed.
        drop(self.stdin.take());
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token of 32 hex digits from /dev/urandom.
fn new_token() -> Result<String, BenchError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| BenchError::new(format!("/dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The SHA-256 of `token` in hex, as the tokens file holds it (`printf %s
/// TOKEN | sha256sum`, as the README says to make one).
fn sha256_hex(token: &str) -> Result<String, BenchError> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| BenchError::new(format!("cannot run sha256sum: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(token.as_bytes()).map_err(|e| BenchError::new(format!("sha256sum: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| BenchError::new(format!("sha256sum: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .filter(|d| out.status.success() && d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
        .ok_or_else(|| BenchError::new(format!("sha256sum answered {text:?}")))
}

/// A tokens file in `dir` naming `token` for this uid; mode 0600.
fn write_tokens(dir: &Path, token: &str) -> Result<PathBuf, BenchError> {
    let path = dir.join("tokens");
    let text = format!("{} {} airlock-bench\n", fixtures::euid(), sha256_hex(token)?);
    std::fs::write(&path, text)
        .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)))
        .map_err(|e| BenchError::new(format!("{}: {e}", path.display())))?;
    Ok(path)
}

fn free_port() -> Result<u16, BenchError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::new(format!("no free port on 127.0.0.1: {e}")))
}

/// Waits until something accepts connections on `127.0.0.1:port`.
fn wait_for_listener(port: u16, daemon: &Daemon) -> Result<(), BenchError> {
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            return Err(BenchError::new(format!(
                "the daemon's E2B listener did not open 127.0.0.1:{port} in 20 s; its log: {}",
                daemon.log_tail()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Runs the whole section against a fresh daemon in `dir`.
pub fn run(airlock: &Path, dir: &Path, plan: &Plan, notes: &mut Vec<String>) -> E2bResults {
    if !plan.python.exists() {
        return E2bResults::skipped(format!(
            "no Python with the e2b SDK at {} (bench/run.sh installs e2b=={SDK_VERSION} there; or give \
             --e2b-python)",
            plan.python.display()
        ));
    }
    match measure(airlock, dir, plan, notes) {
        Ok(r) => r,
        Err(e) => E2bResults::failed_with(e.to_string(), None),
    }
}

fn measure(
    airlock: &Path,
    dir: &Path,
    plan: &Plan,
    notes: &mut Vec<String>,
) -> Result<E2bResults, BenchError> {
    fixtures::make_dir_0755(dir)?;
    let token = new_token()?;
    let tokens = write_tokens(dir, &token)?;
    let port = free_port()?;
    let args: Vec<OsString> = vec![
        "--e2b-listen".into(),
        format!("127.0.0.1:{port}").into(),
        "--tokens".into(),
        tokens.into_os_string(),
    ];
    let daemon = Daemon::start_with(airlock, &dir.join("daemon"), &args, &[])?;
    wait_for_listener(port, &daemon)?;
    let url = format!("http://127.0.0.1:{port}");
    eprintln!("airlock-bench: daemon on {} and E2B on {url}", daemon.socket.display());

    let script = dir.join("e2b_driver.py");
    std::fs::write(&script, DRIVER).map_err(|e| BenchError::new(format!("{}: {e}", script.display())))?;
    // A Python that cannot import the SDK is a missing peer, not airlock failing.
    let log = dir.join("driver.log");
    let (mut driver, sdk) = match Driver::start(&plan.python, &script, &url, &token, &log) {
        Ok(started) => started,
        Err(e) => return Ok(E2bResults::skipped(format!("the e2b driver did not start: {e}"))),
    };
    if sdk != SDK_VERSION {
        notes.push(format!("e2b: the driver imported e2b {sdk}, not the pinned {SDK_VERSION}"));
    }
    eprintln!(
        "airlock-bench: e2b {sdk} beside the native API, create → first output, {} runs after {} warm-up, \
         interleaved",
        plan.iterations, plan.warmup
    );

    let (mut native, mut native_create, mut native_err) = (Vec::new(), Vec::new(), None);
    let (mut output, mut create, mut exit, mut sdk_err) = (Vec::new(), Vec::new(), Vec::new(), None);
    for i in 0..plan.warmup + plan.iterations {
        let timed = i >= plan.warmup;
        let mut native_run = |native_err: &mut Option<String>| {
            if native_err.is_some() {
                return;
            }
            match daemon::create_then_exec(&daemon, &format!("bench-e2b-native-{i}")) {
                Ok(t) if timed => {
                    native.push(t.total);
                    native_create.push(t.create);
                }
                Ok(_) => {}
                Err(e) => *native_err = Some(format!("run {}: {e}", i + 1)),
            }
        };
        let mut sdk_run = |sdk_err: &mut Option<String>| {
            if sdk_err.is_some() {
                return;
            }
            match driver.run_once() {
                Ok(t) if timed => {
                    output.push(t.first_output);
                    create.push(t.create);
                    exit.push(t.exit);
                }
                Ok(_) => {}
                Err(e) => *sdk_err = Some(format!("run {}: {e}", i + 1)),
            }
        };
        // Whichever goes first may find the machine quieter: swap each round.
        if i % 2 == 0 {
            native_run(&mut native_err);
            sdk_run(&mut sdk_err);
        } else {
            sdk_run(&mut sdk_err);
            native_run(&mut native_err);
        }
        if native_err.is_some() && sdk_err.is_some() {
            break;
        }
    }
    drop(driver);
    // What the SDK made and did not kill (a failed run), the daemon's drop removes.
    let left = daemon.list().unwrap_or_default();
    if !left.is_empty() {
        notes.push(format!(
            "e2b: {} sandboxes left after the runs, removed now: {}",
            left.len(),
            left.join(", ")
        ));
    }
    if native_err.is_some() || sdk_err.is_some() {
        notes.push(format!("e2b: the daemon's log ends: {}", daemon.log_tail()));
    }
    drop(daemon);

    let outcome = |err: &Option<String>, walls: &[Duration]| match err {
        Some(e) => Outcome::Failed(e.clone()),
        None => daemon::summarize(walls),
    };
    Ok(E2bResults {
        skipped: None,
        sdk: Some(sdk),
        native: outcome(&native_err, &native),
        native_create: outcome(&native_err, &native_create),
        sdk_output: outcome(&sdk_err, &output),
        sdk_create: outcome(&sdk_err, &create),
        sdk_exit: outcome(&sdk_err, &exit),
    })
}

/// Prints the section's table.
pub fn print(r: &E2bResults, problems: &mut Vec<String>) {
    println!();
    let sdk = r.sdk.as_deref().unwrap_or(SDK_VERSION);
    println!(
        "== e2b: create → first output through E2B's Python SDK (e2b {sdk}) and the native API, one daemon; ms"
    );
    if let Some(why) = &r.skipped {
        println!("  skipped: {why}");
        return;
    }
    report::time_header("create → first output (policy dev, no workspace)", false);
    let none = String::new;
    report::time_row(
        "native: POST /v1/sandboxes, exec true: to the exit",
        &r.native,
        none(),
        none(),
        problems,
    );
    report::time_row("  of which: create (to the 201)", &r.native_create, none(), none(), problems);
    let ratio = r.ratio().map_or_else(|| "-".into(), |x| format!("{x:.2}x"));
    report::time_row(
        "e2b: Sandbox.create(), run(\"echo hi\"): to \"hi\"",
        &r.sdk_output,
        ratio,
        none(),
        problems,
    );
    report::time_row("  of which: Sandbox.create()", &r.sdk_create, none(), none(), problems);
    report::time_row("  commands.run returned (the exit seen)", &r.sdk_exit, none(), none(), problems);
    println!("  {:<LABEL_W$} (the column after max: the e2b median over the native median)", "");
}

/// The section's targets.
pub fn targets(r: &E2bResults, target: &mut impl FnMut(Option<bool>, String)) {
    if let Some(why) = &r.skipped {
        target(None, format!("e2b SDK create → first output: not measured ({why})"));
        return;
    }
    match (r.sdk_output.summary(), r.native.summary(), r.ratio()) {
        (Some(s), Some(n), Some(x)) => target(
            Some(x <= MAX_RATIO_VS_NATIVE),
            format!(
                "e2b SDK create → first output: median {}, {x:.2}x the native API's create → first exec {} \
                 (≤ {MAX_RATIO_VS_NATIVE}x)",
                report::ms(s.median),
                report::ms(n.median)
            ),
        ),
        _ => target(None, "e2b SDK create → first output vs the native API: not measured".into()),
    }
    match r.sdk_output.summary() {
        Some(s) => target(
            Some(s.median <= MAX_CREATE_TO_OUTPUT),
            format!(
                "e2b SDK create → first output: median {} (≤ {}; the hosted E2B service: ~440 ms)",
                report::ms(s.median),
                report::ms(MAX_CREATE_TO_OUTPUT)
            ),
        ),
        None => target(None, "e2b SDK create → first output: not measured".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::measure::Summary;

    #[test]
    fn the_drivers_answers_parse() {
        let run = parse_run(r#"{"create_ms": 20.5, "first_output_ms": 31.25, "exit_ms": 32}"#).unwrap();
        assert_eq!(
            run,
            SdkRun {
                create: Duration::from_secs_f64(0.0205),
                first_output: Duration::from_secs_f64(0.03125),
                exit: Duration::from_millis(32),
            }
        );
        let e = parse_run(r#"{"error": "SandboxException: 401: bad key"}"#).unwrap_err();
        assert_eq!(e.to_string(), "the e2b SDK: SandboxException: 401: bad key");
        assert!(
            parse_run(r#"{"create_ms": 1, "exit_ms": 2}"#)
                .unwrap_err()
                .to_string()
                .contains("first_output_ms")
        );
        assert!(parse_run(r#"{"create_ms": -1, "first_output_ms": 1, "exit_ms": 2}"#).is_err());
        assert!(
            parse_run("Traceback (most recent call last):").unwrap_err().to_string().contains("not JSON")
        );
        assert_eq!(parse_ready(r#"{"ready": "2.64.0"}"#).unwrap(), "2.64.0");
        assert!(parse_ready(r#"{"create_ms": 1}"#).is_err());
        assert!(parse_ready("").is_err());
    }

    #[test]
    fn the_sdk_is_looked_for_where_run_sh_installs_it() {
        let airlock = Path::new("/src/target/release/airlock");
        assert_eq!(default_python(None, airlock), Path::new("/src/target/bench-deps/py-e2b/bin/python"));
        assert_eq!(
            default_python(Some(OsStr::new("/t")), airlock),
            Path::new("/t/bench-deps/py-e2b/bin/python")
        );
        assert_eq!(
            default_python(Some(OsStr::new("")), airlock),
            Path::new("/src/target/bench-deps/py-e2b/bin/python")
        );
    }

    #[test]
    fn tokens_are_hashed_as_the_daemon_reads_them() {
        // printf %s test | sha256sum
        assert_eq!(
            sha256_hex("test").unwrap(),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    fn measured(ms: u64) -> Outcome {
        let d = Duration::from_millis(ms);
        Outcome::Measured(Summary {
            n: 1,
            median: d,
            p90: d,
            min: d,
            max: d,
            rss_median_kib: 0,
            rss_max_kib: 0,
        })
    }

    /// Both targets are judged on the SDK's median: against the native
    /// median times 1.5, and against 50 ms.
    #[test]
    fn targets_judge_the_ratio_and_the_budget() {
        let judged = |sdk: u64, native: u64| {
            let r = E2bResults {
                skipped: None,
                sdk: Some(SDK_VERSION.into()),
                native: measured(native),
                native_create: measured(native),
                sdk_output: measured(sdk),
                sdk_create: measured(sdk),
                sdk_exit: measured(sdk),
            };
            let mut verdicts = Vec::new();
            targets(&r, &mut |ok, line| verdicts.push((ok, line)));
            verdicts
        };
        let v = judged(36, 30);
        assert_eq!(v.iter().map(|(ok, _)| *ok).collect::<Vec<_>>(), vec![Some(true), Some(true)]);
        assert!(v[0].1.contains("1.20x the native API's create → first exec 30.00 ms"), "{}", v[0].1);
        let v = judged(46, 30);
        assert_eq!(v.iter().map(|(ok, _)| *ok).collect::<Vec<_>>(), vec![Some(false), Some(true)]);
        let v = judged(60, 45);
        assert_eq!(v.iter().map(|(ok, _)| *ok).collect::<Vec<_>>(), vec![Some(true), Some(false)]);
        let skipped = E2bResults::skipped("no SDK".into());
        let mut verdicts = Vec::new();
        targets(&skipped, &mut |ok, line| verdicts.push((ok, line)));
        assert_eq!(verdicts.len(), 1);
        assert_eq!(verdicts[0].0, None);
    }
}
