//! Host-side tools treat what a sandbox made as hostile (issue 9, point 6).
//!
//! Copying out: `airlock cp NAME:/path FILE` once followed a symlink to
//! /dev/zero (1.26 GB and counting) and hung on a FIFO. Only regular files
//! come out, opened by the agent without following the last component and
//! without blocking, within the sandbox's disk budget; a refused copy leaves
//! the host file as it was. Printing: `airlock net log` once printed a
//! sandbox-chosen host name raw, escape sequences and a forged "allow" line
//! included. Every command that prints what a sandbox chose escapes it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::super::daemon_harness::TestDaemon;
use super::super::support::*;

/// Runs `cmd` and fails the test if it has not ended within `secs`: a copy
/// that follows /dev/zero or waits on a FIFO never ends on its own.
fn output_within(mut cmd: Command, secs: u64) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("still running after {secs}s (it hung): {}", show(&o));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// What a hostile sandbox leaves for a copy out: every kind of file that is
/// not a regular one, and ways to reach them.
const HOSTILE_TREE: &str = "set -e
printf regular > /tmp/ok
ln -s /dev/zero /tmp/zero
ln -s /tmp/fifo /tmp/to-fifo
mkfifo /tmp/fifo
mkdir /tmp/dir
ln -s /dev /tmp/devdir
python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"/tmp/sock\")'
echo planted";

/// (path in the sandbox, what the refusal must call it).
fn refusals(big: &Path) -> Vec<(String, &'static str)> {
    vec![
        ("/tmp/zero".into(), "a symbolic link to /dev/zero"),
        ("/tmp/to-fifo".into(), "a symbolic link to /tmp/fifo"),
        ("/tmp/fifo".into(), "a FIFO"),
        ("/dev/zero".into(), "a character device"),
        // A link on the way resolves in the sandbox's own view; what it
        // reaches is still refused.
        ("/tmp/devdir/zero".into(), "a character device"),
        ("/tmp/dir".into(), "a directory"),
        ("/tmp/sock".into(), "a socket"),
        ("/tmp/absent".into(), "no file /tmp/absent"),
        (big.display().to_string(), "disk budget"),
    ]
}

/// A policy whose disk budget (and so the cap on copies out) is 1 MiB.
fn small_disk_policy(dir: &Path) -> PathBuf {
    let path = dir.join("small-disk.toml");
    std::fs::write(&path, "extends = \"dev\"\n[limits]\ndisk = \"1M\"\n").unwrap();
    path
}

/// A 2 MiB file in the workspace: the sandbox sees it (it is the host's)
/// but could never have written it under a 1 MiB budget.
fn big_workspace_file(workspace: &Path) -> PathBuf {
    let big = workspace.join("big.bin");
    std::fs::write(&big, vec![b'b'; 2 << 20]).unwrap();
    big
}

/// Copies each refused path out with `cp` and checks the refusal: a clear
/// error naming what was found, in bounded time, and the host file that was
/// there before still there, with no partial copy beside it.
fn check_refusals(cp: &dyn Fn(&str, &Path) -> Command, big: &Path, how: &str) {
    let host = tempfile::tempdir().unwrap();
    let precious = host.path().join("precious.txt");
    for (path, want) in refusals(big) {
        std::fs::write(&precious, "precious").unwrap();
        let o = output_within(cp(&path, &precious), 60);
        assert_eq!(o.status.code(), Some(125), "{how}: cp {path}: {}", show(&o));
        assert!(stderr(&o).contains(want), "{how}: cp {path} should say {want:?}: {}", show(&o));
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "precious", "{how}: cp {path} clobbered it");
        let left: Vec<_> = std::fs::read_dir(host.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1, "{how}: cp {path} left {left:?}");
    }
    let o = output_within(cp("/tmp/ok", &precious), 60);
    assert!(o.status.success(), "{how}: {}", show(&o));
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "regular", "{how}");
}

#[test]
fn cp_out_of_a_sandbox_takes_only_regular_files_within_the_disk_budget() {
    let env = Env::new();
    let policy = small_disk_policy(env.dir.path());
    let big = big_workspace_file(&env.workspace);
    let o = env
        .airlock(["create", "--name", "hostile-cp", "--policy", policy.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let o = env.airlock(["exec", "hostile-cp", "--", "sh", "-c", HOSTILE_TREE]).output().unwrap();
    assert!(stdout(&o).contains("planted"), "{}", show(&o));

    let cp = |path: &str, to: &Path| {
        let mut cmd = env.airlock(["cp", &format!("hostile-cp:{path}")]);
        cmd.arg(to);
        cmd
    };
    check_refusals(&cp, &big, "direct");

    // Every copy is recorded in the sandbox's audit trail, refusals too.
    let audit = std::fs::read_to_string(env.sandbox_dir("hostile-cp").join("audit.jsonl")).unwrap();
    let reads: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["event"] == "file_read")
        .collect();
    assert!(reads.iter().any(|r| r["path"] == "/tmp/zero" && r["bytes"] == 0 && r["refused"].is_string()));
    assert!(reads.iter().any(|r| r["path"] == "/tmp/ok" && r["bytes"] == 7 && r["refused"].is_null()));

    // Copying in onto a link the sandbox planted is refused, naming the
    // link and its target: the link is not followed, and not silently
    // replaced either; the file it points to (the host's, seen through the
    // overlay) is not written.
    let o = env
        .airlock([
            "exec",
            "hostile-cp",
            "--",
            "ln",
            "-s",
            &env.workspace.join("README").display().to_string(),
        ])
        .arg("/tmp/planted")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let upload = env.dir.path().join("upload.txt");
    std::fs::write(&upload, "uploaded").unwrap();
    let o = env.airlock(["cp"]).arg(&upload).arg("hostile-cp:/tmp/planted").output().unwrap();
    assert!(!o.status.success(), "{}", show(&o));
    assert!(stderr(&o).contains("symbolic link to") && stderr(&o).contains("README"), "{}", show(&o));
    assert_eq!(std::fs::read_to_string(env.workspace.join("README")).unwrap(), "hello\n");
    let check = "test -L /tmp/planted && cat README && ls -a /tmp | grep -c airlock-write";
    let o = env
        .airlock(["exec", "hostile-cp", "--cwd"])
        .arg(&env.workspace)
        .args(["--", "sh", "-c", check])
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "hello\n0\n", "{}", show(&o));

    let o = env.airlock(["rm", "hostile-cp"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
}

#[test]
fn cp_out_through_the_daemon_takes_only_regular_files_within_the_disk_budget() {
    let d = TestDaemon::start("hostile-cp");
    let policy = small_disk_policy(d.env.dir.path());
    let big = big_workspace_file(&d.env.workspace);
    let body = json!({ "name": "hostile-dcp", "policy": policy, "workspace": d.env.workspace });
    let (status, created) = d.json("POST", "/v1/sandboxes", Some(body));
    assert_eq!(status, 201, "{created}");
    let (status, out) = d.request(
        "POST",
        "/v1/sandboxes/hostile-dcp/exec",
        Some(&json!({ "argv": ["sh", "-c", HOSTILE_TREE] }).to_string()),
    );
    assert_eq!(status, 200, "{out}");
    let cp = |path: &str, to: &Path| {
        let mut cmd = d.env.airlock(["cp", &format!("hostile-dcp:{path}")]);
        cmd.arg(to).env("AIRLOCK_SOCKET", &d.socket).env("AIRLOCK_CGROUP_PARENT", &d.cgroup_parent);
        cmd
    };
    check_refusals(&cp, &big, "through the daemon");

    // The API answers each with its own code, before any byte of a body.
    for (path, status, code) in [
        ("/tmp/zero", 422, "wrong_file_type"),
        ("/tmp/fifo", 422, "wrong_file_type"),
        ("/dev/zero", 422, "wrong_file_type"),
        ("/tmp/sock", 422, "wrong_file_type"),
        ("/tmp/absent", 404, "file_not_found"),
        (big.to_str().unwrap(), 422, "file_too_large"),
    ] {
        let (got, body) = d.request("GET", &format!("/v1/sandboxes/hostile-dcp/files?path={path}"), None);
        assert_eq!(got, status, "GET {path}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
        assert_eq!(error["error"]["code"], code, "GET {path}: {body}");
    }
    assert!(d.remove_all_and_settle(60).is_empty());
}

/// A file the sandbox keeps swapping between a regular file and a symlink to
/// /dev/zero while it is copied: each copy is either the regular file, whole
/// and exact, or a refusal that names the link, never zeros and never a hang.
#[test]
fn cp_out_of_a_file_swapped_for_a_link_mid_copy() {
    let env = Env::new();
    let o = env.airlock(["create", "--name", "swapper"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let swap = "head -c 4194304 /dev/zero | tr '\\0' a > /tmp/real
nohup sh -c 'while :; do ln -f /tmp/real /tmp/s.file; mv -fT /tmp/s.file /tmp/swap; \
ln -sfn /dev/zero /tmp/s.link; mv -fT /tmp/s.link /tmp/swap; done' >/dev/null 2>&1 &
while [ ! -e /tmp/swap ] && [ ! -L /tmp/swap ]; do sleep 0.01; done
echo swapping";
    let o = env.airlock(["exec", "swapper", "--", "sh", "-c", swap]).output().unwrap();
    assert!(stdout(&o).contains("swapping"), "{}", show(&o));
    let host = tempfile::tempdir().unwrap();
    let (mut copied, mut refused) = (0, 0);
    for i in 0..30 {
        let dest = host.path().join(format!("copy-{i}"));
        let mut cmd = env.airlock(["cp", "swapper:/tmp/swap"]);
        cmd.arg(&dest);
        let o = output_within(cmd, 60);
        if o.status.success() {
            let got = std::fs::read(&dest).unwrap();
            assert!(got.len() == 4 << 20 && got.iter().all(|b| *b == b'a'), "copy {i}: {} bytes", got.len());
            copied += 1;
        } else {
            assert!(stderr(&o).contains("symbolic link"), "copy {i}: {}", show(&o));
            assert!(!dest.exists(), "copy {i} left a file");
            refused += 1;
        }
    }
    eprintln!("swapped mid-copy: {copied} whole copies, {refused} refusals");
    let o = env.airlock(["rm", "swapper"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
}

/// A SOCKS request for a host name that carries terminal escapes, a carriage
/// return, a newline followed by a forged "allow" line, and a bidi override.
const HOSTILE_HOSTS: &str = r#"python3 - <<'EOF'
import socket
def socks(name):
    s = socket.create_connection(("127.0.0.1", 1080), timeout=5)
    s.sendall(b"\x05\x01\x00")
    s.recv(2)
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x01\xbb")
    print("reply", s.recv(10)[1:2])
    s.close()
socks("evil.example.com\x1b[2k\r2030-01-01t00:00:00.000z allow http  bank.example.com:443  [allow] out=1b in=1b 1ms\nforged".encode())
socks("x\u202emoc.elpmaxe".encode())
EOF"#;

#[test]
fn net_log_prints_hostile_host_names_escaped_and_json_exact() {
    let env = Env::new();
    let o = env.run_sh("hostile-net", &[], HOSTILE_HOSTS);
    assert_eq!(stdout(&o).matches("reply").count(), 2, "{}", show(&o));

    let o = env.airlock(["net", "log", "hostile-net", "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let entries: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(entries.len(), 2, "{}", show(&o));
    // JSON stays JSON: the host is recorded exactly as asked for.
    assert!(entries[0]["host"].as_str().unwrap().contains("\x1b[2k\r2030"), "{entries:?}");
    assert!(entries[0]["host"].as_str().unwrap().ends_with("\nforged"), "{entries:?}");
    assert_eq!(entries[1]["host"], "x\u{202e}moc.elpmaxe");

    let o = env.airlock(["net", "log", "hostile-net"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let text = stdout(&o);
    for raw in ['\x1b', '\r', '\u{202e}'] {
        assert!(!text.contains(raw), "{raw:?} reached the terminal: {text:?}");
    }
    // One line per decision, each starting with its real time: no forged line.
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), entries.len(), "{text}");
    for (line, entry) in lines.iter().zip(&entries) {
        assert!(line.starts_with(entry["ts"].as_str().unwrap()), "{line}");
        assert!(line.contains("DENY"), "{line}");
    }
    assert!(lines[0].contains(r#""evil.example.com\033[2k\r2030-01-01t00:00:00.000z allow"#), "{text}");
    assert!(lines[0].contains(r"\nforged"), "{text}");
    assert!(lines[1].contains(r#""x\342\200\256moc.elpmaxe""#), "{text}");
}

/// Arguments with a terminal title escape, a bell, a bidi override and a
/// newline followed by a forged audit record (an allowed connection).
fn hostile_argv() -> Vec<String> {
    let forged = r#"{"ts":"2030-01-01T00:00:00.000Z","seq":999,"event":"network","via":"http","host":"bank.example.com","port":443,"address":null,"method":null,"path":null,"allowed":true,"rule":"forged","handling":"tunnel","bytes_out":1,"bytes_in":1,"duration_ms":1,"secrets":[]}"#;
    vec![
        "sh".into(),
        "-c".into(),
        "printf 'out\\033[2Jwiped\\rfake\\n'; printf 'err\\033]0;title\\007\\n' >&2".into(),
        "\x1b]0;owned\x07".into(),
        format!("a\u{202e}b\n{forged}"),
    ]
}

fn assert_no_raw_controls(what: &str, text: &str) {
    for raw in ['\x1b', '\x07', '\r', '\u{202e}'] {
        assert!(!text.contains(raw), "{what}: {raw:?} reached the terminal: {text:?}");
    }
}

/// `script -qec COMMAND /dev/null`: COMMAND with a terminal as its stdout
/// (whose line discipline turns each `\n` into `\r\n`; undone here).
fn at_a_terminal(env: &Env, command: &str, socket: Option<&Path>) -> Output {
    let mut cmd = Command::new("script");
    cmd.args(["-qec", command, "/dev/null"])
        .env("AIRLOCK_STATE_DIR", &env.state)
        .env("AIRLOCK_CGROUP_PARENT", cgroup_parent())
        .env("AIRLOCK_SOCKET", socket.map_or(env.dir.path().join("no-daemon.sock"), Path::to_path_buf))
        .current_dir(&env.workspace)
        .stdin(Stdio::null());
    let mut o = cmd.output().unwrap();
    o.stdout = String::from_utf8_lossy(&o.stdout).replace("\r\n", "\n").into_bytes();
    o
}

#[test]
fn audit_inspect_and_logs_show_hostile_arguments_escaped() {
    if !require(Command::new("script").arg("--version").output().is_ok(), "script(1) from util-linux") {
        return;
    }
    let env = Env::new();
    let o = env
        .airlock(["create", "--name", "hostile-argv", "--label", "note=\x1b]0;owned\x07\nlabel"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let argv = hostile_argv();
    let o = env.airlock(["exec", "hostile-argv", "--"]).args(&argv).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    // `exec` is a session with the sandbox's process: its output is raw.
    assert!(o.stdout.starts_with(b"out\x1b[2J"), "{}", show(&o));

    // The audit trail is one JSON record per line, the arguments exact, and
    // the forged record inside them is not a record.
    let audit = std::fs::read_to_string(env.sandbox_dir("hostile-argv").join("audit.jsonl")).unwrap();
    let records: Vec<Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let started = records.iter().find(|r| r["event"] == "exec_started").unwrap();
    assert_eq!(started["argv"], json!(argv));
    assert!(!records.iter().any(|r| r["event"] == "network"), "{audit}");
    let o = env.airlock(["net", "log", "hostile-argv"]).output().unwrap();
    assert_eq!(stdout(&o), "no network activity recorded\n", "{}", show(&o));

    let o = env.airlock(["inspect", "hostile-argv"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    assert_no_raw_controls("inspect", &stdout(&o));
    assert!(stdout(&o).contains(r#"note="\033]0;owned\007\nlabel""#), "{}", show(&o));

    // logs: exact when piped, escaped at a terminal unless --raw.
    let o = env.airlock(["logs", "hostile-argv"]).output().unwrap();
    assert_eq!(o.stdout, b"out\x1b[2Jwiped\rfake\n", "{}", show(&o));
    let o = at_a_terminal(&env, &format!("{BIN} logs hostile-argv"), None);
    assert_no_raw_controls("logs at a terminal", &stdout(&o));
    assert!(stdout(&o).contains(r"out\033[2Jwiped\rfake"), "{}", show(&o));
    let o = at_a_terminal(&env, &format!("{BIN} logs --stderr hostile-argv"), None);
    assert!(stdout(&o).contains(r"err\033]0;title\007"), "{}", show(&o));
    let o = at_a_terminal(&env, &format!("{BIN} logs --raw hostile-argv"), None);
    assert!(o.stdout.windows(4).any(|w| w == b"\x1b[2J"), "{}", show(&o));

    let o = env.airlock(["rm", "hostile-argv"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
}

#[test]
fn events_inspect_and_logs_through_the_daemon_show_hostile_arguments_escaped() {
    if !require(Command::new("script").arg("--version").output().is_ok(), "script(1) from util-linux") {
        return;
    }
    let d = TestDaemon::start("hostile-events");
    let cli = |args: &[&str]| {
        d.env
            .airlock(args)
            .env("AIRLOCK_SOCKET", &d.socket)
            .env("AIRLOCK_CGROUP_PARENT", &d.cgroup_parent)
            .output()
            .unwrap()
    };
    // The API refuses control characters in labels; a bidi override is text.
    let body = json!({ "name": "hostile-ev", "labels": { "note": "a\u{202e}b" } });
    let (status, created) = d.json("POST", "/v1/sandboxes", Some(body));
    assert_eq!(status, 201, "{created}");
    let (status, out) = d.request(
        "POST",
        "/v1/sandboxes/hostile-ev/exec",
        Some(&json!({ "argv": hostile_argv() }).to_string()),
    );
    assert_eq!(status, 200, "{out}");

    let o = cli(&["events", "--sandbox", "hostile-ev"]);
    assert!(o.status.success(), "{}", show(&o));
    let text = stdout(&o);
    assert_no_raw_controls("events", &text);
    let o = cli(&["events", "--sandbox", "hostile-ev", "--json"]);
    let objects: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(text.lines().count(), objects.len(), "one line per event:\n{text}");
    let started = objects.iter().find(|e| e["kind"] == "exec_started").unwrap();
    assert_eq!(started["detail"]["argv"], json!(hostile_argv()), "JSON stays exact");
    assert!(text.contains(r#""\033]0;owned\007""#), "{text}");

    let o = cli(&["inspect", "hostile-ev"]);
    assert_no_raw_controls("inspect", &stdout(&o));
    assert!(stdout(&o).contains(r#"note="a\342\200\256b""#), "{}", show(&o));
    let o = cli(&["ls"]);
    assert_no_raw_controls("ls", &stdout(&o));

    let o = at_a_terminal(&d.env, &format!("{BIN} logs hostile-ev"), Some(&d.socket));
    assert_no_raw_controls("logs at a terminal", &stdout(&o));
    assert!(stdout(&o).contains(r"out\033[2Jwiped\rfake"), "{}", show(&o));
    assert!(d.remove_all_and_settle(60).is_empty());
}
