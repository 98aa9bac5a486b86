//! Creation failures keep their kind across the supervisor's fork: the
//! daemon answers 422 / 409 / 400 with the message a direct `airlock create`
//! (and `airlock run`) prints.

use serde_json::{Value, json};

use super::daemon_harness::TestDaemon;
use super::support::*;

/// The message of a failed CLI command, without its "airlock: error: ".
fn cli_message(o: &std::process::Output) -> String {
    assert_eq!(o.status.code(), Some(125), "{}", show(o));
    let text = stderr(o);
    let line = text.lines().find_map(|l| l.strip_prefix("airlock: error: "));
    line.unwrap_or_else(|| panic!("no error line: {}", show(o))).to_string()
}

fn api_error(d: &TestDaemon, body: Value) -> (u16, String, String) {
    let (status, v) = d.json("POST", "/v1/sandboxes", Some(body));
    let code = v["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code: {v}")).to_string();
    (status, code, v["error"]["message"].as_str().unwrap_or_default().to_string())
}

#[test]
fn a_policy_the_host_cannot_run_is_422_with_the_cli_message() {
    let d = TestDaemon::start("cerr-host");
    // The check that refuses it runs in the supervisor's child.
    let policy = d.env.dir.path().join("vm.toml");
    std::fs::write(&policy, "extends = \"dev\"\n\n[isolation]\ntier = \"microvm\"\n").unwrap();
    let policy = policy.display().to_string();

    let direct = cli_message(&d.env.airlock(["create", "--policy", &policy]).output().unwrap());
    let run = cli_message(&d.env.airlock(["run", "--policy", &policy, "--", "true"]).output().unwrap());
    assert_eq!(direct, run);
    assert!(direct.contains("microvm"), "{direct}");

    let (status, code, message) = api_error(&d, json!({ "policy": policy }));
    assert_eq!((status, code.as_str()), (422, "host_unsupported"), "{message}");
    assert_eq!(message, direct);
    assert!(d.sandbox_names().is_empty(), "{:?}", d.sandbox_names());
}

#[test]
fn a_taken_name_is_409_whoever_made_it() {
    let d = TestDaemon::start("cerr-name");
    // Made directly, not through the daemon: only the runtime knows it.
    let o = d.env.airlock(["create", "--name", "taken"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let direct = cli_message(&d.env.airlock(["create", "--name", "taken"]).output().unwrap());
    assert!(direct.contains("a sandbox named taken already exists"), "{direct}");

    let (status, code, message) = api_error(&d, json!({ "name": "taken", "labels": { "by": "api" } }));
    assert_eq!((status, code.as_str()), (409, "conflict"), "{message}");
    assert!(message.contains("a sandbox named taken already exists"), "{message}");
    // The refused request changed nothing of the sandbox that has the name.
    let (status, view) = d.json("GET", "/v1/sandboxes/taken", None);
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["state"], "running", "{view}");
    assert!(view["labels"].get("by").is_none(), "{view}");

    let (status, _) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": "again" })));
    assert_eq!(status, 201);
    let (status, code, message) = api_error(&d, json!({ "name": "again" }));
    assert_eq!((status, code.as_str()), (409, "conflict"), "{message}");
    for name in ["taken", "again"] {
        let o = d.env.airlock(["rm", name]).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    }
}

#[test]
fn a_malformed_policy_is_400_with_the_cli_message() {
    let d = TestDaemon::start("cerr-policy");
    let policy = d.env.dir.path().join("bad.toml");
    std::fs::write(&policy, "extends = \"dev\"\n[limits]\nmemory = \"lots\"\n").unwrap();
    let policy = policy.display().to_string();
    let direct = cli_message(&d.env.airlock(["create", "--policy", &policy]).output().unwrap());
    assert!(direct.contains("bad.toml"), "{direct}");
    let (status, code, message) = api_error(&d, json!({ "policy": policy }));
    assert_eq!((status, code.as_str()), (400, "invalid_policy"), "{message}");
    assert_eq!(message, direct);
}
