//! The daemon's `GET …/audit` (NDJSON, followed with `?follow=true`),
//! `GET …/report` (the HTML page) and `GET …/export` (the signed bundle):
//! what they send, when a followed stream ends, and that a caller sees only
//! their own sandboxes' logs, reports and bundles. And what the daemon's
//! index keeps of an exec: no secret value.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use super::daemon_harness::TestDaemon;
use super::support::*;

const TEST_USER: &str = "airlock-test";

/// `curl -N` on `path`, as root or as `user`, its stdout's lines sent to
/// the returned channel as they arrive.
fn follow(d: &TestDaemon, user: Option<&str>, path: &str) -> (Child, mpsc::Receiver<String>) {
    let mut cmd = match user {
        Some(user) => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", user, "--regid", user, "--init-groups", "--", "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    cmd.args(["-sSN", "--unix-socket"]).arg(&d.socket).arg(format!("http://airlock{path}"));
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Lines from `rx` until one satisfies `done` (all of them, that one last),
/// or panics after `secs` seconds.
fn lines_until(rx: &mpsc::Receiver<String>, secs: u64, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                let stop = done(&v);
                got.push(v);
                if stop {
                    return got;
                }
            }
            Err(e) => panic!("no matching line within {secs}s ({e}); got {got:?}"),
        }
    }
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["event"].as_str()).collect()
}

/// Descriptors the daemon holds open on `file`.
fn daemon_fds_on(d: &TestDaemon, file: &std::path::Path) -> usize {
    let Some(pid) = d.pid() else { return 0 };
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|target| target.starts_with(file)))
                .count()
        })
        .unwrap_or(0)
}

/// (status, content type, body) of a GET with curl, as root or as `user`.
fn get(d: &TestDaemon, user: Option<&str>, path: &str) -> (u16, String, String) {
    let mut cmd = match user {
        Some(user) => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", user, "--regid", user, "--init-groups", "--", "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    let out = cmd
        .args(["-sS", "-m", "120", "-w", "\n%{http_code} %{content_type}", "--unix-socket"])
        .arg(&d.socket)
        .arg(format!("http://airlock{path}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (status, content_type) = tail.split_once(' ').unwrap_or((tail, ""));
    (status.parse().unwrap_or(0), content_type.to_owned(), body.to_owned())
}

#[test]
fn daemon_audit_sends_the_log_as_written_and_follows_it_until_the_sandbox_goes() {
    let d = TestDaemon::start("audit-1");
    let (status, created) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": "au" })));
    assert_eq!(status, 201, "{created}");
    let (status, body) = d.request("POST", "/v1/sandboxes/au/exec", Some(r#"{"argv":["true"]}"#));
    assert_eq!(status, 200, "{body}");

    // The whole log, byte for byte as the file holds it.
    let log = d.env.state.join("au/audit.jsonl").canonicalize().unwrap();
    let (status, content_type, body) = get(&d, None, "/v1/sandboxes/au/audit");
    assert_eq!((status, content_type.as_str()), (200, "application/x-ndjson"), "{body}");
    assert_eq!(body, std::fs::read_to_string(&log).unwrap());
    let events: Vec<Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    for kind in ["created", "exec_started", "exec_ended"] {
        assert!(kinds(&events).contains(&kind), "no {kind} in {body}");
    }
    let (status, _, body) = get(&d, None, "/v1/sandboxes/au/audit?follow=sometimes");
    assert_eq!(status, 400, "{body}");

    // Followed: what is there, then what is appended.
    let (mut follower, rx) = follow(&d, None, "/v1/sandboxes/au/audit?follow=true");
    let already = lines_until(&rx, 30, |e| e["seq"].as_u64() == Some(events.len() as u64));
    assert_eq!(already, events, "a follow starts with the whole log");
    let (status, body) =
        d.request("POST", "/v1/sandboxes/au/exec", Some(r#"{"argv":["echo","followed-marker"]}"#));
    assert_eq!(status, 200, "{body}");
    let new = lines_until(&rx, 30, |e| e["event"] == "exec_ended");
    assert!(new.iter().any(|e| e["event"] == "exec_started" && e["argv"][1] == "followed-marker"), "{new:?}");

    // A client that leaves ends its stream: the daemon lets go of the log.
    let (mut leaver, leaver_rx) = follow(&d, None, "/v1/sandboxes/au/audit?follow=true");
    lines_until(&leaver_rx, 30, |e| e["seq"].as_u64() == Some(1));
    assert!(daemon_fds_on(&d, &log) >= 2, "two followers hold the log open");
    leaver.kill().unwrap();
    leaver.wait().unwrap();
    assert!(
        wait_until(10, || daemon_fds_on(&d, &log) == 1),
        "the daemon still reads the log for a client that left"
    );

    // `airlock report` goes through the daemon when one answers, and
    // writes a file only its owner reads.
    let page = d.env.dir.path().join("au.html");
    let o = d
        .env
        .airlock(["report", "au", "-o", page.to_str().unwrap()])
        .env("AIRLOCK_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("exec #2: echo followed-marker"), "{html}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&page).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "{mode:o}");

    // Removing the sandbox ends the stream, after its last events.
    let (status, removed) = d.json("DELETE", "/v1/sandboxes/au", None);
    assert_eq!(status, 200, "{removed}");
    let last = lines_until(&rx, 30, |e| e["event"] == "removed");
    assert!(kinds(&last).contains(&"stopped"), "{last:?}");
    let ended = wait_until(10, || follower.try_wait().unwrap().is_some());
    assert!(ended, "the follow did not end with its sandbox");
    assert!(follower.wait().unwrap().success());
    assert_eq!(daemon_fds_on(&d, &log), 0);
}

#[test]
fn daemon_report_and_audit_are_each_callers_own() {
    if !require(is_root(), "root (to run requests as another user)") {
        return;
    }
    let has_user = Command::new("id").arg(TEST_USER).output().is_ok_and(|o| o.status.success());
    if !require(has_user, "the user airlock-test (created by scripts/test.sh)") {
        return;
    }
    let d = TestDaemon::start_args("audit-2", &["--group", TEST_USER]);
    let (status, created) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": "roots" })));
    assert_eq!(status, 201, "{created}");
    let (status, body) =
        d.request("POST", "/v1/sandboxes/roots/exec", Some(r#"{"argv":["echo","roots-secret-argv"]}"#));
    assert_eq!(status, 200, "{body}");
    let (status, body) = d.request_as(TEST_USER, "POST", "/v1/sandboxes", Some(r#"{"name":"mine"}"#));
    assert_eq!(status, 201, "{body}");
    let (status, body) = d.request_as(
        TEST_USER,
        "POST",
        "/v1/sandboxes/mine/exec",
        Some(r#"{"argv":["echo","my-own-argv"]}"#),
    );
    assert_eq!(status, 200, "{body}");

    // Another user's sandbox does not exist for them, followed or not.
    for path in
        ["/v1/sandboxes/roots/audit", "/v1/sandboxes/roots/audit?follow=true", "/v1/sandboxes/roots/report"]
    {
        let (status, _, body) = get(&d, Some(TEST_USER), path);
        assert_eq!(status, 404, "{path}: {body}");
        assert!(!body.contains("roots-secret-argv"), "{body}");
    }

    // Their own: the log, and the report under the name they gave.
    let (status, _, body) = get(&d, Some(TEST_USER), "/v1/sandboxes/mine/audit");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("my-own-argv") && !body.contains("roots-secret-argv"), "{body}");
    let (status, content_type, page) = get(&d, Some(TEST_USER), "/v1/sandboxes/mine/report");
    assert_eq!((status, content_type.as_str()), (200, "text/html; charset=utf-8"), "{page}");
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    assert!(page.contains("<title>airlock report: mine</title>"), "the caller's own name");
    assert!(page.contains("exec #1: echo my-own-argv"), "{page}");
    let uid = Command::new("id").args(["-u", TEST_USER]).output().unwrap();
    let stored = format!("u{}-mine", String::from_utf8_lossy(&uid.stdout).trim());
    assert!(!page.contains("roots-secret-argv"), "nothing of others");
    assert!(!page.contains(&stored), "the name the daemon stores it under is not shown to its owner");

    // Root sees everyone's, under the stored names.
    let (_, list) = d.json("GET", "/v1/sandboxes", None);
    let theirs = list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .find(|n| n.ends_with("-mine"))
        .unwrap_or_else(|| panic!("{list}"))
        .to_owned();
    let (status, _, page) = get(&d, None, &format!("/v1/sandboxes/{theirs}/report"));
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("my-own-argv"));

    for (user, name) in [(None, "roots"), (Some(TEST_USER), "mine")] {
        let (status, body) = match user {
            Some(user) => d.request_as(user, "DELETE", &format!("/v1/sandboxes/{name}"), None),
            None => d.request("DELETE", &format!("/v1/sandboxes/{name}"), None),
        };
        assert_eq!(status, 200, "{body}");
    }
}

/// Downloads `path` into `file` with curl as root or as `user`: (status,
/// content type, the response's headers).
fn download(d: &TestDaemon, user: Option<&str>, path: &str, file: &std::path::Path) -> (u16, String, String) {
    let mut cmd = match user {
        Some(user) => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", user, "--regid", user, "--init-groups", "--", "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    let headers = file.with_extension("headers");
    let out = cmd
        .args(["-sS", "-m", "120", "-w", "%{http_code} %{content_type}", "-D"])
        .arg(&headers)
        .arg("-o")
        .arg(file)
        .arg("--unix-socket")
        .arg(&d.socket)
        .arg(format!("http://airlock{path}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, content_type) = text.split_once(' ').unwrap_or((&text, ""));
    (
        status.parse().unwrap_or(0),
        content_type.to_owned(),
        std::fs::read_to_string(&headers).unwrap_or_default(),
    )
}

/// `airlock audit verify --bundle FILE [--key KEY]` against a state
/// directory that never held the sandbox.
fn verify_elsewhere(bundle: &std::path::Path, key: Option<&str>) -> std::process::Output {
    let elsewhere = Env::new();
    let mut cmd = elsewhere.airlock(["audit", "verify", "--bundle"]);
    cmd.arg(bundle);
    if let Some(key) = key {
        cmd.args(["--key", key]);
    }
    cmd.output().unwrap()
}

#[test]
fn daemon_export_is_the_signed_bundle_of_the_callers_own_stopped_sandbox() {
    if !require(is_root(), "root (to run requests as another user)") {
        return;
    }
    let has_user = Command::new("id").arg(TEST_USER).output().is_ok_and(|o| o.status.success());
    if !require(has_user, "the user airlock-test (created by scripts/test.sh)") {
        return;
    }
    let d = TestDaemon::start_args("audit-3", &["--group", TEST_USER]);
    let (status, created) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": "ex" })));
    assert_eq!(status, 201, "{created}");
    let (status, body) =
        d.request("POST", "/v1/sandboxes/ex/exec", Some(r#"{"argv":["echo","export-marker"]}"#));
    assert_eq!(status, 200, "{body}");

    // Running: refused as `airlock export` refuses it, with a typed error.
    let (status, body) = d.json("GET", "/v1/sandboxes/ex/export", None);
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("still_running")), "{body}");
    let (status, body) = d.json("GET", "/v1/sandboxes/ex/export?x=1", None);
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_query")), "{body}");
    let (status, body) = d.json("POST", "/v1/sandboxes/ex/stop", None);
    assert_eq!(status, 200, "{body}");

    // Another user: no such sandbox, and no bundle.
    let drop_box = d.env.dir.path().join("drop");
    std::fs::create_dir(&drop_box).unwrap();
    std::fs::set_permissions(&drop_box, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let theirs = drop_box.join("theirs.tar.zst");
    let (status, _, _) = download(&d, Some(TEST_USER), "/v1/sandboxes/ex/export", &theirs);
    assert_eq!(status, 404);
    let refusal = std::fs::read_to_string(&theirs).unwrap_or_default();
    assert!(refusal.contains("not_found") && !refusal.contains("export-marker"), "{refusal}");

    // The owner: the bundle, as an attachment, checked on a copy elsewhere
    // against the daemon host's key.
    let bundle = d.env.dir.path().join("ex.tar.zst");
    let (status, content_type, headers) = download(&d, None, "/v1/sandboxes/ex/export", &bundle);
    assert_eq!((status, content_type.as_str()), (200, "application/zstd"), "{headers}");
    let headers = headers.to_ascii_lowercase();
    assert!(headers.contains("content-disposition: attachment; filename=\"ex.tar.zst\""), "{headers}");
    let length = std::fs::metadata(&bundle).unwrap().len();
    assert!(headers.contains(&format!("content-length: {length}")), "{headers}");
    let key = d.env.airlock(["audit", "key"]).output().unwrap();
    assert!(key.status.success(), "{}", show(&key));
    let key = stdout(&key).trim().to_owned();
    let copy = tempfile::tempdir().unwrap();
    let copied = copy.path().join("copy.tar.zst");
    std::fs::copy(&bundle, &copied).unwrap();
    let o = verify_elsewhere(&copied, Some(&key));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains("bundle of sandbox ex"), "{}", show(&o));
    let o = Env::new().airlock(["audit", "--bundle"]).arg(&copied).output().unwrap();
    assert!(o.status.success() && stdout(&o).contains("export-marker"), "{}", show(&o));
    // Nothing of the bundle stays behind in the daemon's state root.
    let staged: Vec<_> = std::fs::read_dir(&d.env.state)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("export"))
        .map(|e| e.file_name())
        .collect();
    assert!(staged.is_empty(), "{staged:?}");

    // `airlock export` goes through the daemon when one answers: with a
    // state directory of its own that does not hold the sandbox, only the
    // daemon can have made this bundle.
    let cli = Env::new();
    let out = cli.dir.path().join("cli.tar.zst");
    let o = cli
        .airlock(["export", "ex", "-o", out.to_str().unwrap()])
        .env("AIRLOCK_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains(&format!("signed by {key}")), "{}", show(&o));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&out).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    let o = verify_elsewhere(&out, Some(&key));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    let (status, body) = d.request("DELETE", "/v1/sandboxes/ex", None);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn daemon_index_keeps_exec_argv_and_paths_with_secret_values_redacted() {
    let value = "s3cr3t-index-4be1a07d-value";
    let d = TestDaemon::start_with("audit-4", |cmd| {
        cmd.env("EXAMPLE_TOKEN", value);
    });
    let policy = d.env.dir.path().join("secrets.toml");
    std::fs::write(
        &policy,
        "extends = \"dev\"\n[secrets.EXAMPLE_TOKEN]\nfrom = \"env:EXAMPLE_TOKEN\"\nhosts = [\"api.example.com\"]\n",
    )
    .unwrap();
    let (status, created) =
        d.json("POST", "/v1/sandboxes", Some(json!({ "name": "sec", "policy": policy.to_str().unwrap() })));
    assert_eq!(status, 201, "{created}");
    let exec = json!({ "argv": ["sh", "-c", format!("echo {value} >/dev/null"), value] }).to_string();
    let (status, body) = d.request("POST", "/v1/sandboxes/sec/exec", Some(&exec));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"code\":0,"), "{body}");
    let (status, body) = d.request("POST", &format!("/v1/sandboxes/sec/files/mkdir?path=/tmp/{value}"), None);
    assert_eq!(status, 201, "{body}");

    // The index as its file holds it (and its write-ahead log, where the
    // latest changes are until a checkpoint): not one copy of the value.
    let index = d.env.state.join("airlock.db");
    let db =
        rusqlite::Connection::open_with_flags(&index, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let argv: String = db
        .query_row("SELECT argv FROM execs WHERE sandbox = 'sec' ORDER BY id DESC LIMIT 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&argv).unwrap(),
        json!(["sh", "-c", "echo [REDACTED:EXAMPLE_TOKEN] >/dev/null", "[REDACTED:EXAMPLE_TOKEN]"]),
        "argv is indexed as the audit log records it"
    );
    drop(db);
    let mut bytes = std::fs::read(&index).unwrap();
    bytes.extend(std::fs::read(index.with_extension("db-wal")).unwrap_or_default());
    let marker = b"[REDACTED:EXAMPLE_TOKEN]";
    assert!(bytes.windows(marker.len()).any(|w| w == marker), "the redaction marker is in the index");
    assert!(!bytes.windows(value.len()).any(|w| w == value.as_bytes()), "the secret value is in the index");
    // The events the API serves from it say the same.
    let (status, events) = d.request("GET", "/v1/events?sandbox=sec", None);
    assert_eq!(status, 200, "{events}");
    assert!(events.contains("[REDACTED:EXAMPLE_TOKEN]") && !events.contains(value), "{events}");

    let (status, body) = d.request("DELETE", "/v1/sandboxes/sec", None);
    assert_eq!(status, 200, "{body}");
}
