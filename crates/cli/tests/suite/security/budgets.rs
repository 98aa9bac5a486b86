//! A sandbox cannot grow anything on the host beyond its budgets. 2 GiB on
//! stdout under a 16 MiB disk budget once left a 2 GiB `stdout.log`; 1,000
//! refused requests with 60 KB paths grew `audit.jsonl` by 60 MB; a 900 KB
//! argv landed whole in the audit log. Each host-side file a sandbox feeds
//! is capped (the output still reaches the caller in full), and each
//! recorded field is cut with a marker that says so.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::suite::daemon_harness::TestDaemon;
use crate::suite::support::*;

const MIB: u64 = 1 << 20;
const LOG_MARKER: &str = "reached its limit of";
const FIELD_MARKER: &str = "[cut by airlock:";

fn policy(env: &Env, file: &str, limits: &str) -> PathBuf {
    let path = env.dir.path().join(file);
    std::fs::write(&path, format!("extends = \"dev\"\n[limits]\n{limits}\n")).unwrap();
    path
}

/// Runs `cmd`, counting what it writes to stdout and stderr without
/// keeping it: (exit code, stdout bytes, stderr bytes, stderr's last 4 KiB).
fn run_counting(mut cmd: Command) -> (Option<i32>, u64, u64, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let counter = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            match out.read(&mut buf).unwrap() {
                0 => return n,
                k => n += k as u64,
            }
        }
    });
    let mut buf = vec![0u8; 1 << 20];
    let (mut err_bytes, mut tail) = (0u64, Vec::new());
    loop {
        match err.read(&mut buf).unwrap() {
            0 => break,
            k => {
                err_bytes += k as u64;
                tail.extend_from_slice(&buf[..k]);
                let keep = tail.len().saturating_sub(4096);
                tail.drain(..keep);
            }
        }
    }
    let out_bytes = counter.join().unwrap();
    let status = child.wait().unwrap();
    (status.code(), out_bytes, err_bytes, String::from_utf8_lossy(&tail).into_owned())
}

/// The log is no larger than `cap` and ends with the one marker line.
fn assert_capped_log(path: &Path, cap: u64) {
    let len = std::fs::metadata(path).unwrap().len();
    assert!(len <= cap, "{} is {len} bytes, over its cap of {cap}", path.display());
    let mut file = std::fs::File::open(path).unwrap();
    let mut text = Vec::new();
    file.read_to_end(&mut text).unwrap();
    let text = String::from_utf8_lossy(&text);
    assert_eq!(text.matches(LOG_MARKER).count(), 1, "{} has no single marker", path.display());
    let last = text.trim_end().lines().last().unwrap();
    assert!(last.contains(LOG_MARKER) && last.contains("limits.log_size"), "{last}");
}

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The issue's attack: 2 GiB on stdout with a 16 MiB disk budget. The
/// caller gets every byte; stdout.log stops at `limits.log_size` (the
/// dev default, 32 MiB) with its marker. Then stderr, with a smaller cap.
#[test]
fn gigabytes_on_stdout_and_stderr_stay_out_of_the_logs() {
    let env = Env::new();
    let tight = policy(&env, "tight.toml", "disk = \"16M\"");
    let mut cmd = env.airlock(["run", "--name", "flood", "--policy"]);
    cmd.arg(&tight).args(["--", "head", "-c", "2G", "/dev/zero"]);
    let (code, out, _, err) = run_counting(cmd);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, 2 << 30, "the caller must get all of the output");
    assert_capped_log(&env.sandbox_dir("flood").join("logs/stdout.log"), 32 * MIB);

    let small = policy(&env, "small.toml", "disk = \"16M\"\nlog_size = \"1M\"");
    let mut cmd = env.airlock(["run", "--name", "flood-err", "--policy"]);
    cmd.arg(&small).args(["--", "sh", "-c", "head -c 256M /dev/zero >&2; echo done"]);
    let (code, out, err_bytes, _) = run_counting(cmd);
    assert_eq!((code, out), (Some(0), 5));
    assert!(err_bytes >= 256 * MIB, "{err_bytes}");
    let logs = env.sandbox_dir("flood-err").join("logs");
    assert_capped_log(&logs.join("stderr.log"), MIB);
    assert_eq!(std::fs::read_to_string(logs.join("stdout.log")).unwrap(), "done\n");
}

/// Execs in a long-lived sandbox write to the same logs: the cap holds for
/// all of them together, with one marker, and every client gets its output.
#[test]
fn exec_output_in_a_long_lived_sandbox_is_capped_with_the_sandbox_logs() {
    let env = Env::new();
    let small = policy(&env, "small.toml", "log_size = \"1M\"");
    let o = env
        .airlock(["create", "--name", "execs", "--memory", "128M", "--policy"])
        .arg(&small)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    for (stream, script) in [("stdout", "head -c 16M /dev/zero"), ("stderr", "head -c 16M /dev/zero >&2")] {
        for _ in 0..2 {
            let mut cmd = env.airlock(["exec", "execs", "--", "sh", "-c", script]);
            cmd.stdin(Stdio::null());
            let (code, out, err, _) = run_counting(cmd);
            assert_eq!(code, Some(0));
            let got = if stream == "stdout" { out } else { err };
            assert_eq!(got, 16 * MIB, "{stream}: the client must get all of it");
        }
    }
    let logs = env.sandbox_dir("execs").join("logs");
    assert_capped_log(&logs.join("stdout.log"), MIB);
    assert_capped_log(&logs.join("stderr.log"), MIB);
    let o = env.airlock(["rm", "execs"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

/// The issue's attack: 1,000 requests with 60 KB paths, refused by the
/// proxy. Every recorded path is cut (with its length); with a small
/// `limits.audit_size` the log stops at it, says so once, and still
/// records how the sandbox ended.
#[test]
fn a_thousand_refused_requests_with_long_paths_stay_within_the_audit_cap() {
    if !require(Path::new("/usr/bin/python3").exists(), "python3 in /usr/bin (inside the sandbox)") {
        return;
    }
    let env = Env::new();
    std::fs::write(env.workspace.join("flood.py"), REQUEST_FLOOD).unwrap();
    let small = policy(&env, "small.toml", "audit_size = \"1M\"");
    let o = env
        .airlock(["run", "--name", "requests", "--policy"])
        .arg(&small)
        .args(["--", "python3", "flood.py"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), "refused 1000", "{}", show(&o));

    let audit = env.sandbox_dir("requests").join("audit.jsonl");
    let len = std::fs::metadata(&audit).unwrap().len();
    assert!(len <= MIB, "audit.jsonl is {len} bytes, over its 1M cap");
    let records = audit_lines(&audit);
    let kinds: Vec<&str> = records.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "audit_capped").count(), 1, "{kinds:?}");
    let network: Vec<_> = records.iter().filter(|r| r["event"] == "network").collect();
    assert!(network.len() > 100, "only {} requests recorded before the cap", network.len());
    for r in &network {
        let path = r["path"].as_str().unwrap();
        assert!(
            path.len() < 1200 && path.contains(FIELD_MARKER) && path.contains("60001 bytes in all"),
            "{path:.200}"
        );
    }
    assert!(kinds.contains(&"exited"), "the end of the sandbox must still be recorded: {kinds:?}");

    // The same with the default cap: the fields alone keep it small.
    let o = env.airlock(["run", "--name", "requests-default", "--", "python3", "flood.py"]).output().unwrap();
    assert_eq!(stdout(&o).trim(), "refused 1000", "{}", show(&o));
    let len = std::fs::metadata(env.sandbox_dir("requests-default").join("audit.jsonl")).unwrap().len();
    assert!(len < 4 * MIB, "audit.jsonl grew by {len} bytes for 1,000 requests");
}

/// 1,000 requests through the HTTP proxy port, each with a 60 KB path to a
/// host the policy does not allow; counts the 403s.
const REQUEST_FLOOD: &str = r#"
import socket
path = "/" + "a" * 60000
refused = 0
for _ in range(1000):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(("GET http://example.net%s HTTP/1.1\r\nHost: example.net\r\nConnection: close\r\n\r\n" % path).encode())
    answer = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        answer += chunk
    s.close()
    if answer.startswith(b"HTTP/1.1 403"):
        refused += 1
print("refused", refused)
"#;

/// The issue's attack: a 900 KB argv, for `run`, for an exec, and for an
/// exec through the daemon (whose event index records argv too). Each
/// record holds a cut argv that says so; the files stay small.
#[test]
fn a_900_kb_argv_is_cut_in_every_record() {
    let env = Env::new();
    // Nine arguments of 100 KB: one argument may not pass 128 KiB.
    let big: Vec<String> = (0..9).map(|i| format!("{i}{}", "x".repeat(100_000))).collect();
    let o = env.airlock(["run", "--name", "argv", "--", "true"]).args(&big).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let check = |audit: PathBuf, event: &str| {
        let len = std::fs::metadata(&audit).unwrap().len();
        assert!(len < 64 * 1024, "{} is {len} bytes", audit.display());
        let records = audit_lines(&audit);
        let started = records.iter().find(|r| r["event"] == event).unwrap_or_else(|| panic!("no {event}"));
        let argv = started["argv"].as_array().unwrap();
        let text = serde_json::to_string(argv).unwrap();
        assert!(text.len() < 12 * 1024, "{event} argv is {} bytes", text.len());
        assert!(text.contains(FIELD_MARKER) && text.contains("100001 bytes in all"), "{text:.300}");
    };
    check(env.sandbox_dir("argv").join("audit.jsonl"), "command_started");

    let o = env.airlock(["create", "--name", "argv-exec", "--memory", "64M"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = env.airlock(["exec", "argv-exec", "--", "true"]).args(&big).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    check(env.sandbox_dir("argv-exec").join("audit.jsonl"), "exec_started");
    let o = env.airlock(["rm", "argv-exec"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    // Through the daemon: its event index caps argv too.
    let d = TestDaemon::start("budgets");
    let body = serde_json::json!({ "name": "argv-api", "policy": "dev" }).to_string();
    let (status, answer) = d.request("POST", "/v1/sandboxes", Some(&body));
    assert_eq!(status, 201, "{answer}");
    let mut argv = vec!["true".to_string()];
    argv.extend(big.iter().cloned());
    // Too long for curl's command line: the body goes in a file.
    let body = d.env.dir.path().join("exec.json");
    std::fs::write(&body, serde_json::json!({ "argv": argv }).to_string()).unwrap();
    let o = Command::new("curl")
        .args(["-sS", "-m", "120", "-H", "content-type: application/json", "--unix-socket"])
        .arg(&d.socket)
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg("http://airlock/v1/sandboxes/argv-api/exec")
        .output()
        .unwrap();
    let answer = stdout(&o);
    assert!(answer.contains(r#""type":"exit""#), "{answer:.300}");
    check(d.env.state.join("argv-api/audit.jsonl"), "exec_started");
    let (status, events) = d.request("GET", "/v1/events?sandbox=argv-api", None);
    assert_eq!(status, 200, "{events:.300}");
    let exec_events: Vec<&str> = events.lines().filter(|l| l.contains(r#""kind":"exec_"#)).collect();
    assert_eq!(exec_events.len(), 2, "{events:.2000}");
    for line in exec_events {
        assert!(line.len() < 12 * 1024, "an event of {} bytes", line.len());
        assert!(line.contains(FIELD_MARKER) && line.contains("100001 bytes in all"), "{line:.300}");
    }
    let (status, answer) = d.request("DELETE", "/v1/sandboxes/argv-api", None);
    assert_eq!(status, 200, "{answer}");
}
