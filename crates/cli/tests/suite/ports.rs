//! Published ports (`airlock create -p HOST_PORT:SANDBOX_PORT`): a server
//! inside answers from the host's loopback, each connection is in the
//! audit log, the policy can forbid it, a taken host port is refused
//! cleanly, and the sandbox still has no way out.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};

use super::daemon_harness::TestDaemon;
use super::support::*;

/// A host port free right now.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts Python's HTTP server on 127.0.0.1:3000 inside, in the background.
pub(crate) const SERVE_3000: &str =
    "nohup python3 -m http.server 3000 --bind 127.0.0.1 >/tmp/http.log 2>&1 &";

/// One GET / to 127.0.0.1:`port` from the host: the whole answer, or None
/// while nothing answers yet.
pub(crate) fn get(port: u16) -> Option<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    conn.write_all(b"GET / HTTP/1.0\r\nHost: example.com\r\n\r\n").ok()?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).ok()?;
    answer.starts_with("HTTP/").then_some(answer)
}

/// Waits for the server inside to answer through the published port.
fn answer_through(port: u16) -> String {
    let mut answer = None;
    wait_until(20, || {
        answer = get(port);
        answer.is_some()
    });
    answer.unwrap_or_else(|| panic!("nothing answered on host port {port}"))
}

pub(crate) fn audit_events(env_audit: Output) -> Vec<Value> {
    assert!(env_audit.status.success(), "{}", show(&env_audit));
    stdout(&env_audit).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

pub(crate) fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn a_published_port_answers_from_the_host_and_each_connection_is_audited() {
    let env = Env::new();
    let port = free_port();
    let mapping = format!("{port}:3000");
    let o = env.airlock(["create", "--name", "web", "-p", &mapping]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let o = env.airlock(["exec", "web", "--", "sh", "-c", SERVE_3000]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));

    let answer = answer_through(port);
    assert!(answer.starts_with("HTTP/1.0 200") && answer.contains("Directory listing"), "{answer}");

    // The view says what is published.
    let o = env.airlock(["inspect", "web", "--json"]).output().unwrap();
    let view: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(view["ports"], json!([{ "host": format!("127.0.0.1:{port}"), "sandbox_port": 3000 }]));

    // The sandbox's egress is unchanged: the host's port is not reachable
    // from inside (its loopback is its own), nothing else is either.
    let probe = connect_probe(port);
    let o = env.airlock(["exec", "web", "--", "sh", "-c", &probe]).output().unwrap();
    assert!(stdout(&o).contains("connect:ECONNREFUSED"), "{}", show(&o));

    // One accepted and one closed record per connection, with the peer,
    // the port inside and the bytes each way.
    let events = audit_events(env.airlock(["audit", "web", "--json"]).output().unwrap());
    let accepted: Vec<&Value> = events.iter().filter(|e| e["event"] == "port_accepted").collect();
    let closed: Vec<&Value> = events.iter().filter(|e| e["event"] == "port_closed").collect();
    assert!(!accepted.is_empty(), "{events:?}");
    let last = accepted.last().unwrap();
    assert_eq!(last["sandbox_port"], 3000, "{last}");
    assert_eq!(last["listen"], format!("127.0.0.1:{port}"), "{last}");
    assert!(last["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{last}");
    let done = closed.iter().find(|c| c["id"] == last["id"]).unwrap_or_else(|| panic!("{events:?}"));
    assert!(done["bytes_in"].as_u64().unwrap() > 0 && done["bytes_out"].as_u64().unwrap() > 0, "{done}");
    assert!(done["error"].is_null(), "{done}");

    // Removing the sandbox closes the listener and ends its connector.
    let o = env.airlock(["stop", "web"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let o = env.airlock(["rm", "web"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    assert!(wait_until(5, || port_free(port)), "host port {port} still taken after rm");
    assert!(pids_running("__ports web").is_empty(), "{:?}", pids_running("__ports web"));
}

#[test]
fn a_connection_to_a_port_nobody_listens_on_inside_is_closed_and_recorded() {
    let env = Env::new();
    let port = free_port();
    let mapping = format!("{port}:3999");
    let o = env.airlock(["create", "--name", "quiet", "-p", &mapping]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    // Closed without a byte: nothing listens on 3999 inside.
    assert_eq!(conn.read_to_end(&mut got).map(|_| got.len()).unwrap_or(0), 0);
    let mut events = Vec::new();
    wait_until(5, || {
        events = audit_events(env.airlock(["audit", "quiet", "--json"]).output().unwrap());
        events.iter().any(|e| e["event"] == "port_closed")
    });
    let closed = events.iter().find(|e| e["event"] == "port_closed").unwrap_or_else(|| panic!("{events:?}"));
    assert!(closed["error"].as_str().unwrap().contains("port 3999"), "{closed}");
    let o = env.airlock(["stop", "quiet"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
}

#[test]
fn a_taken_host_port_is_refused_and_leaves_nothing_behind() {
    let env = Env::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let free = free_port();
    let (first, second) = (format!("{free}:3000"), format!("{port}:3001"));
    let o = env.airlock(["create", "--name", "clash", "-p", &first, "-p", &second]).output().unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(
        stderr(&o).contains(&format!("127.0.0.1:{port}")) && stderr(&o).contains("is the port taken"),
        "{}",
        show(&o)
    );
    assert!(!env.sandbox_dir("clash").exists(), "a state directory was left");
    assert!(port_free(free), "the port bound before the taken one is still held");
    assert!(pids_running("__ports clash").is_empty());
}

#[test]
fn a_policy_without_ports_refuses_them_directly_and_through_the_daemon() {
    let env = Env::new();
    let mapping = format!("{}:3000", free_port());
    let o = env.airlock(["create", "--name", "plug", "--policy", "plugin", "-p", &mapping]).output().unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(stderr(&o).contains("policy plugin does not allow publishing ports"), "{}", show(&o));
    assert!(!env.sandbox_dir("plug").exists());

    let d = TestDaemon::start("ports");
    let (status, body) = d.json(
        "POST",
        "/v1/sandboxes",
        Some(json!({ "name": "plug", "policy": "plugin", "ports": [mapping] })),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_policy", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("ports = false"), "{body}");
    let (status, body) =
        d.json("POST", "/v1/sandboxes", Some(json!({ "name": "bad", "policy": "dev", "ports": ["3000"] })));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    assert!(d.sandbox_names().is_empty(), "{:?}", d.sandbox_names());
}

/// Through the daemon's API: `ports` in the create body publishes, the view
/// shows it, a taken port is a conflict, and a caller who is not root may
/// not have the daemon listen below 1024 for it.
#[test]
fn the_api_publishes_ports_and_refuses_a_taken_one() {
    let d = TestDaemon::start("ports-api");
    let port = free_port();
    let (status, body) = d.json(
        "POST",
        "/v1/sandboxes",
        Some(json!({ "name": "api-web", "policy": "dev", "ports": [format!("{port}:3000")] })),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["ports"], json!([{ "host": format!("127.0.0.1:{port}"), "sandbox_port": 3000 }]));
    let exec = json!({ "argv": ["sh", "-c", SERVE_3000] }).to_string();
    let (status, text) = d.request("POST", "/v1/sandboxes/api-web/exec", Some(&exec));
    assert!(status == 200 && text.contains("\"code\":0"), "{status} {text}");
    assert!(answer_through(port).starts_with("HTTP/1.0 200"));

    let (status, body) = d.json(
        "POST",
        "/v1/sandboxes",
        Some(json!({ "name": "api-clash", "policy": "dev", "ports": [format!("{port}:3000")] })),
    );
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "port_unavailable", "{body}");

    if is_root() {
        let body = json!({ "name": "low", "policy": "dev", "ports": ["80:3000"] }).to_string();
        let (status, text) = d.request_as("airlock-test", "POST", "/v1/sandboxes", Some(&body));
        // 403 when the user exists and may use the socket; anything but a
        // created sandbox otherwise.
        assert_ne!(status, 201, "{text}");
        if status == 403 {
            assert!(text.contains("below 1024"), "{text}");
        }
    }
    let (status, body) = d.json("DELETE", "/v1/sandboxes/api-web", None);
    assert!(status == 200 || status == 204, "{status} {body}");
    assert!(wait_until(10, || port_free(port)), "host port {port} still taken after DELETE");
}

#[test]
fn rootless_published_port_answers() {
    let Some(r) = super::rootless::setup() else { return };
    let port = free_port();
    let mapping = format!("{port}:3000");
    let o = r.airlock(&["create", "--name", "rl-web", "-p", &mapping]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let o = r.airlock(&["exec", "rl-web", "--", "sh", "-c", SERVE_3000]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let answer = answer_through(port);
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let o = r.airlock(&["stop", "rl-web"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let o = r.airlock(&["rm", "rl-web"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    assert!(wait_until(5, || port_free(port)), "host port {port} still taken after rm");
}
