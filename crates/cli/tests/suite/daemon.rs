//! `airlock daemon`: the API over its Unix socket, driven with curl (the
//! way a person or script would) and with raw sockets for the abuse tests.
//! Each test starts its own daemon (`daemon_harness`) on a socket in its
//! own directory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use super::daemon_harness::TestDaemon;
use super::support::*;

const TEST_USER: &str = "airlock-test";

fn assert_error(status: u16, body: &str, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    let v: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body}"));
    assert_eq!(v["error"]["code"], want_code, "{body}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

/// The NDJSON lines of an exec.
fn exec_lines(body: &str) -> Vec<Value> {
    body.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn event_kinds(d: &TestDaemon, query: &str) -> Vec<String> {
    let (status, text) = d.request("GET", &format!("/v1/events{query}"), None);
    assert_eq!(status, 200, "{text}");
    text.lines().filter_map(|l| l.strip_prefix("event: ")).map(str::to_string).collect()
}

#[test]
fn daemon_round_trip_create_list_inspect_exec_stop_delete() {
    let d = TestDaemon::start_args("api-1", &[]);
    let (status, health) = d.json("GET", "/v1/health", None);
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");

    let socket_mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&d.socket).unwrap().permissions());
    assert_eq!(socket_mode & 0o002, 0, "socket is world-writable: {socket_mode:o}");

    let ws = d.env.workspace.display().to_string();
    let (status, created) = d.json(
        "POST",
        "/v1/sandboxes",
        Some(json!({ "name": "rt", "workspace": ws, "labels": { "team": "infra" }, "env": { "GREETING": "hi" } })),
    );
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["name"], "rt");
    assert_eq!(created["state"], "running");
    assert_eq!(created["labels"]["team"], "infra");

    let (_, list) = d.json("GET", "/v1/sandboxes?label=team=infra&state=running", None);
    let names: Vec<&str> =
        list["sandboxes"].as_array().unwrap().iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["rt"], "{list}");
    let (_, none) = d.json("GET", "/v1/sandboxes?label=team=other", None);
    assert!(none["sandboxes"].as_array().unwrap().is_empty(), "{none}");
    let (_, stopped) = d.json("GET", "/v1/sandboxes?state=stopped", None);
    assert!(stopped["sandboxes"].as_array().unwrap().is_empty(), "{stopped}");

    let (status, inspect) = d.json("GET", "/v1/sandboxes/rt", None);
    assert_eq!(status, 200);
    assert_eq!(inspect["workspace"], ws.as_str());
    assert!(inspect["supervisor_pid"].as_i64().is_some(), "{inspect}");
    assert!(inspect["limits"]["memory"].as_u64().is_some(), "{inspect}");
    assert!(inspect["deadline"].as_str().is_some(), "{inspect}");

    let (status, body) = d.request(
        "POST",
        "/v1/sandboxes/rt/exec",
        Some(r#"{"argv":["sh","-c","echo hi; echo $GREETING >&2"]}"#),
    );
    assert_eq!(status, 200, "{body}");
    let lines = exec_lines(&body);
    assert_eq!(lines.first().unwrap()["type"], "started", "{body}");
    assert!(lines.iter().any(|l| l["type"] == "stdout" && l["data"] == "aGkK"), "{body}"); // "hi\n"
    assert!(lines.iter().any(|l| l["type"] == "stderr" && l["data"] == "aGkK"), "{body}");
    let exit = lines.last().unwrap();
    assert_eq!(exit["type"], "exit", "{body}");
    assert_eq!(exit["code"], 0, "{body}");
    assert_eq!(exit["timed_out"], false, "{body}");

    let (_, body) = d.request("POST", "/v1/sandboxes/rt/exec", Some(r#"{"argv":["sh","-c","exit 7"]}"#));
    assert_eq!(exec_lines(&body).last().unwrap()["code"], 7, "{body}");

    let (status, stopped) = d.json("POST", "/v1/sandboxes/rt/stop", None);
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["state"], "stopped");
    let (status, body) = d.request("POST", "/v1/sandboxes/rt/exec", Some(r#"{"argv":["true"]}"#));
    assert_error(status, &body, 409, "not_running");

    let (status, removed) = d.json("DELETE", "/v1/sandboxes/rt", None);
    assert_eq!(status, 200, "{removed}");
    assert_eq!(removed["removed"], true);
    assert!(!d.env.sandbox_dir("rt").exists());
    let (status, body) = d.request("GET", "/v1/sandboxes/rt", None);
    assert_error(status, &body, 404, "not_found");

    let kinds = event_kinds(&d, "?sandbox=rt");
    for kind in ["created", "exec_started", "exec_ended", "stopped", "destroyed"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} event in {kinds:?}");
    }
    let (status, metrics) = d.request("GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(metrics.contains("airlock_execs_total 2"), "{metrics}");
    assert!(metrics.contains("airlock_http_requests_total{status=\"409\"} 1"), "{metrics}");
}

#[test]
fn daemon_answers_bad_input_with_json_4xx() {
    let d = TestDaemon::start_args("api-2", &[]);
    let (s, b) = d.request("POST", "/v1/sandboxes", Some("{garbage"));
    assert_error(s, &b, 400, "invalid_json");
    let (s, b) = d.request("POST", "/v1/sandboxes", Some(r#"{"name":"x","colour":"red"}"#));
    assert_error(s, &b, 400, "invalid_json");
    assert!(b.contains("unknown field"), "{b}");
    for name in ["../etc", "UPPER", "a b", "-dash", "x;rm", &"n".repeat(64)] {
        let (s, b) = d.request("POST", "/v1/sandboxes", Some(&json!({ "name": name }).to_string()));
        assert_error(s, &b, 400, "invalid_name");
    }
    let (s, b) = d.request("GET", "/v1/sandboxes/Bad%20Name", None);
    assert_error(s, &b, 400, "invalid_name");
    let (s, b) = d.request("GET", "/v1/sandboxes/..%2Fetc", None);
    assert!(s == 400 || s == 404, "{s} {b}");
    let (s, b) = d.request("POST", "/v1/sandboxes", Some(r#"{"workspace":"relative/dir"}"#));
    assert_error(s, &b, 400, "invalid_workspace");
    let (s, b) = d.request("POST", "/v1/sandboxes", Some(r#"{"timeout":"forever"}"#));
    assert_error(s, &b, 400, "invalid_request");
    let (s, b) = d.request("GET", "/v1/nothing-here", None);
    assert_error(s, &b, 404, "no_route");
    let (s, b) = d.request("PUT", "/v1/sandboxes", None);
    assert_error(s, &b, 405, "method_not_allowed");
    let (s, b) = d.request("GET", "/v1/sandboxes?colour=red", None);
    assert_error(s, &b, 400, "invalid_query");
    let big = format!("{{\"name\":\"{}\"}}", "a".repeat(2 << 20));
    let mut big_file = tempfile::NamedTempFile::new_in(d.env.dir.path()).unwrap();
    big_file.write_all(big.as_bytes()).unwrap();
    let (s, b) = d.request("POST", "/v1/sandboxes", Some(&format!("@{}", big_file.path().display())));
    assert_error(s, &b, 413, "payload_too_large");

    // 100 concurrent bad requests, each on its own connection, of several
    // kinds: every one gets a 4xx, and the daemon stays healthy.
    let payloads: [&[u8]; 5] = [
        b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 8\r\nConnection: close\r\n\r\n{garbage",
        b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\nConnection: close\r\n\r\n{\"name\":\"../../x\"}  ",
        b"GET /v1/sandboxes/%00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"DELETE /v1/sandboxes/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"NONSENSE\r\n\r\n",
    ];
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let socket = d.socket.clone();
            let payload = payloads[i % payloads.len()].to_vec();
            std::thread::spawn(move || {
                let mut conn = UnixStream::connect(&socket).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                conn.write_all(&payload).unwrap();
                let mut answer = Vec::new();
                let _ = conn.read_to_end(&mut answer);
                String::from_utf8_lossy(&answer).into_owned()
            })
        })
        .collect();
    for t in threads {
        let answer = t.join().unwrap();
        let status: u16 = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        assert!((400..500).contains(&status), "not a 4xx: {answer:?}");
    }
    let (s, b) = d.request("GET", "/v1/health", None);
    assert_eq!(s, 200, "{b}");
}

#[test]
fn daemon_users_see_only_their_own_sandboxes() {
    if !require(is_root(), "root (to run requests as another user)") {
        return;
    }
    let has_user = Command::new("id").arg(TEST_USER).output().is_ok_and(|o| o.status.success());
    if !require(has_user, "the user airlock-test (created by scripts/test.sh)") {
        return;
    }
    // The group makes the socket reachable by the test user; tenancy is
    // what must keep them out of root's sandboxes.
    let d = TestDaemon::start_args("api-3", &["--group", TEST_USER]);
    let (status, created) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": "roots" })));
    assert_eq!(status, 201, "{created}");
    let (status, mine) = d.json("GET", "/v1/sandboxes", None);
    assert_eq!(status, 200);
    assert_eq!(mine["sandboxes"].as_array().unwrap().len(), 1, "{mine}");

    let (s, b) = d.request_as(TEST_USER, "GET", "/v1/sandboxes", None);
    assert_eq!(s, 200, "{b}");
    let theirs: Value = serde_json::from_str(&b).unwrap();
    assert!(theirs["sandboxes"].as_array().unwrap().is_empty(), "{b}");
    let (s, b) = d.request_as(TEST_USER, "GET", "/vm", None);
    assert_eq!((s, b.as_str()), (200, "[]"));
    for (method, path, body) in [
        ("GET", "/v1/sandboxes/roots", None),
        ("POST", "/v1/sandboxes/roots/exec", Some(r#"{"argv":["id"]}"#)),
        ("POST", "/v1/sandboxes/roots/stop", None),
        ("DELETE", "/v1/sandboxes/roots", None),
        ("DELETE", "/vm/roots", None),
    ] {
        let (s, b) = d.request_as(TEST_USER, method, path, body);
        assert_error(s, &b, 404, "not_found");
    }
    // Naming a directory the user does not own is refused.
    let ws = d.env.workspace.display().to_string();
    let (s, b) =
        d.request_as(TEST_USER, "POST", "/v1/sandboxes", Some(&json!({ "workspace": ws }).to_string()));
    assert_error(s, &b, 403, "forbidden");
    let (s, b) = d.request_as(TEST_USER, "POST", "/v1/sandboxes", Some(r#"{"policy":"/etc/passwd"}"#));
    assert_error(s, &b, 403, "forbidden");
    let (s, b) = d.request_as(TEST_USER, "GET", "/v1/events", None);
    assert_eq!(s, 200);
    assert!(!b.contains("roots"), "root's events leaked: {b}");

    // Root's sandbox is untouched.
    let (_, inspect) = d.json("GET", "/v1/sandboxes/roots", None);
    assert_eq!(inspect["state"], "running", "{inspect}");
}

#[test]
fn daemon_restart_keeps_sandboxes_and_a_dead_supervisor_is_collected() {
    let mut d = TestDaemon::start_args("api-4", &[]);
    for name in ["keep", "lose"] {
        let (status, created) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": name })));
        assert_eq!(status, 201, "{created}");
    }
    d.restart();
    let (status, body) = d.request("POST", "/v1/sandboxes/keep/exec", Some(r#"{"argv":["echo","still"]}"#));
    assert_eq!(status, 200, "{body}");
    assert_eq!(exec_lines(&body).last().unwrap()["code"], 0, "{body}");

    let (_, inspect) = d.json("GET", "/v1/sandboxes/lose", None);
    let pid = inspect["supervisor_pid"].as_i64().unwrap() as i32;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let collected =
        wait_until(30, || event_kinds(&d, "?sandbox=lose").iter().any(|k| k == "supervisor_lost"));
    assert!(collected, "no supervisor_lost event: {:?}", event_kinds(&d, "?sandbox=lose"));
    let (_, inspect) = d.json("GET", "/v1/sandboxes/lose", None);
    assert_eq!(inspect["state"], "failed", "{inspect}");
    let (_, inspect) = d.json("GET", "/v1/sandboxes/keep", None);
    assert_eq!(inspect["state"], "running", "{inspect}");
}

#[test]
fn daemon_serves_the_committed_openapi_document() {
    let d = TestDaemon::start_args("api-5", &[]);
    let (status, served) = d.request("GET", "/v1/openapi.json", None);
    assert_eq!(status, 200);
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../server/openapi.json")).unwrap();
    assert_eq!(
        served.trim_end(),
        committed.trim_end(),
        "served document differs from crates/server/openapi.json"
    );
}

/// Starts `airlock exec NAME -- sh -c SCRIPT` through the daemon in the
/// background and waits for its first line, "ready".
fn background_exec(d: &TestDaemon, name: &str, script: &str) -> std::process::Child {
    let mut cmd = d.env.airlock(["exec", name, "--", "sh", "-c", script]);
    cmd.env("AIRLOCK_SOCKET", &d.socket).env("AIRLOCK_CGROUP_PARENT", &d.cgroup_parent);
    spawn_until_ready(cmd)
}

/// The API's stop and destroy are the runtime's one stop: SIGTERM, the
/// policy's grace period, then the answer with the sandbox finalized —
/// `stopped`, no mount left, the same `stopped` audit record as the CLI's.
#[test]
fn api_stop_and_destroy_use_the_one_stop() {
    let d = TestDaemon::start_args("api-stop", &[]);
    let policy = d.env.dir.path().join("grace.toml");
    std::fs::write(&policy, "extends = \"dev\"\n\n[limits]\nstop_grace = \"20s\"\n").unwrap();
    let ws = d.env.workspace.display().to_string();
    let script = "trap 'echo cleaned up; exit 0' TERM; echo ready; while :; do sleep 0.1; done";
    for name in ["st", "ds"] {
        let body = json!({ "name": name, "workspace": ws, "policy": policy.display().to_string() });
        let (status, created) = d.json("POST", "/v1/sandboxes", Some(body));
        assert_eq!(status, 201, "{created}");
    }

    let child = background_exec(&d, "st", script);
    let started = std::time::Instant::now();
    let (status, stopped) = d.json("POST", "/v1/sandboxes/st/stop", None);
    assert_eq!(status, 200, "{stopped}");
    assert!(started.elapsed() < Duration::from_secs(15), "stop took {:?}", started.elapsed());
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let dir = d.env.sandbox_dir("st");
    assert_eq!(mounts_containing(&dir.to_string_lossy()), Vec::<String>::new());
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("cleaned up"), "{}", show(&out));
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert_eq!(audit.matches("\"stopped\"").count(), 1, "{audit}");
    assert!(audit.contains("stopped on request"), "{audit}");

    let child = background_exec(&d, "ds", script);
    let (status, removed) = d.json("DELETE", "/v1/sandboxes/ds", None);
    assert_eq!(status, 200, "{removed}");
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("cleaned up"), "{}", show(&out));
    assert!(!d.env.sandbox_dir("ds").exists());

    // One `stopped` each, before `destroyed`, with the audit log's reason.
    for name in ["st", "ds"] {
        let (status, text) = d.request("GET", &format!("/v1/events?sandbox={name}"), None);
        assert_eq!(status, 200, "{text}");
        let events: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let stopped: Vec<&Value> = events.iter().filter(|e| e["kind"] == "stopped").collect();
        assert_eq!(stopped.len(), 1, "{text}");
        assert_eq!(stopped[0]["detail"]["reason"], "requested", "{text}");
        assert_eq!(stopped[0]["detail"]["message"], "stopped on request", "{text}");
        assert_eq!(stopped[0]["detail"]["state"], "stopped", "{text}");
    }
    let kinds = event_kinds(&d, "?sandbox=ds");
    assert_eq!(kinds.iter().rev().take(2).collect::<Vec<_>>(), ["destroyed", "stopped"], "{kinds:?}");
}

/// The `stopped` events the daemon recorded for `name`.
fn stopped_events(d: &TestDaemon, name: &str) -> Vec<Value> {
    let (status, text) = d.request("GET", &format!("/v1/events?sandbox={name}"), None);
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["kind"] == "stopped")
        .collect()
}

/// A sandbox the supervisor stops by itself (idle timeout, deadline) gets
/// the daemon's `stopped` event with the reason its audit log recorded.
#[test]
fn api_events_say_why_the_supervisor_stopped_a_sandbox() {
    let d = TestDaemon::start_args("api-idle", &[]);
    let ws = d.env.workspace.display().to_string();
    for (name, body) in [
        ("idl", json!({ "name": "idl", "workspace": ws, "idle_timeout": "2s" })),
        ("dl", json!({ "name": "dl", "workspace": ws, "timeout": "2s" })),
    ] {
        let (status, created) = d.json("POST", "/v1/sandboxes", Some(body));
        assert_eq!(status, 201, "{name}: {created}");
    }
    for (name, reason, message) in
        [("idl", "idle", "idle timeout reached"), ("dl", "deadline", "maximum runtime reached")]
    {
        assert!(wait_until(30, || !stopped_events(&d, name).is_empty()), "{name} was not seen to stop");
        let events = stopped_events(&d, name);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["detail"]["reason"], reason, "{events:?}");
        assert_eq!(events[0]["detail"]["message"], message, "{events:?}");
    }
}
