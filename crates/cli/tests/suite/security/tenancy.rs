//! Tenants learn nothing of each other (issue 9, point 7).
//!
//! Creating a sandbox under a name another user held answered 409 "already
//! exists", though every other request answered as if that sandbox did not
//! exist; `/metrics` counted everyone's execs and requests. Now each user's
//! names are their own (the daemon stores user 1001's `ci` as `u1001-ci`),
//! and every total, event id and listing a user gets is theirs alone.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::{Value, json};

use super::super::daemon_harness::TestDaemon;
use super::super::support::*;

const TEST_USER: &str = "airlock-test";

fn test_user_uid() -> Option<u32> {
    let o = Command::new("id").args(["-u", TEST_USER]).output().ok()?;
    String::from_utf8_lossy(&o.stdout).trim().parse().ok().filter(|_| o.status.success())
}

/// Root and the test user, or a skip (a failure in CI).
fn two_users() -> Option<u32> {
    if !require(is_root(), "root (to run requests as another user)") {
        return None;
    }
    let uid = test_user_uid();
    require(uid.is_some(), "the user airlock-test (created by scripts/test.sh)").then_some(uid?)
}

fn parse(status: u16, body: &str) -> (u16, Value) {
    let value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}), status {status}: {body}"));
    (status, value)
}

fn as_user(d: &TestDaemon, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = d.request_as(TEST_USER, method, path, body.as_deref());
    parse(status, &text)
}

fn names(list: &Value) -> Vec<(String, u64)> {
    let mut names: Vec<(String, u64)> = list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_owned(), s["owner_uid"].as_u64().unwrap()))
        .collect();
    names.sort();
    names
}

/// The events of a stream: (id, sandbox, kind).
fn events(text: &str) -> Vec<(u64, String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|data| {
            let e: Value = serde_json::from_str(data).unwrap();
            (
                e["id"].as_u64().unwrap(),
                e["sandbox"].as_str().unwrap_or("-").to_owned(),
                e["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_name_another_user_holds_gives_no_sign_of_it() {
    let Some(uid) = two_users() else { return };
    let d = TestDaemon::start_args("tenancy-names", &["--group", TEST_USER]);
    let (status, roots) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": "shared" })));
    assert_eq!(status, 201, "{roots}");
    let (status, _) =
        d.request("POST", "/v1/sandboxes/shared/exec", Some(r#"{"argv":["touch","/tmp/roots"]}"#));
    assert_eq!(status, 200);

    // The user asks for root's name and for a name nobody holds: the same
    // answer, each a sandbox of their own under the name they gave.
    let (held, taken) = as_user(&d, "POST", "/v1/sandboxes", Some(json!({ "name": "shared" })));
    let (free, fresh) = as_user(&d, "POST", "/v1/sandboxes", Some(json!({ "name": "fresh" })));
    assert_eq!((held, free), (201, 201), "{taken}\n{fresh}");
    for (created, name) in [(&taken, "shared"), (&fresh, "fresh")] {
        assert_eq!(created["name"], name, "{created}");
        assert_eq!(created["owner_uid"], uid, "{created}");
        assert_eq!(created["state"], "running", "{created}");
    }
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&taken), keys(&fresh));

    // Two sandboxes named `shared`: each user reaches their own.
    let (_, text) = d.request_as(
        TEST_USER,
        "POST",
        "/v1/sandboxes/shared/exec",
        Some(r#"{"argv":["test","-e","/tmp/roots"]}"#),
    );
    assert!(text.contains(r#""code":1"#), "the user's `shared` is not root's: {text}");
    let (_, text) =
        d.request("POST", "/v1/sandboxes/shared/exec", Some(r#"{"argv":["test","-e","/tmp/roots"]}"#));
    assert!(text.contains(r#""code":0"#), "{text}");

    // A name taken in one's own namespace is a conflict, as it should be.
    let (status, again) = as_user(&d, "POST", "/v1/sandboxes", Some(json!({ "name": "shared" })));
    assert_eq!((status, again["error"]["code"].as_str()), (409, Some("conflict")), "{again}");
    let (status, again) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": "fresh" })));
    assert_eq!(status, 201, "root's `fresh` is free too: {again}");

    // Listings: the user's own names; root sees every sandbox by its
    // stored name, with its owner.
    let (_, mine) = as_user(&d, "GET", "/v1/sandboxes", None);
    assert_eq!(names(&mine), [("fresh".into(), u64::from(uid)), ("shared".into(), u64::from(uid))]);
    let (_, all) = d.json("GET", "/v1/sandboxes", None);
    let prefix = format!("u{uid}-");
    assert_eq!(
        names(&all),
        [
            ("fresh".into(), 0),
            ("shared".into(), 0),
            (format!("{prefix}fresh"), u64::from(uid)),
            (format!("{prefix}shared"), u64::from(uid)),
        ]
    );
    let (status, vms) = as_user(&d, "GET", "/vm", None);
    assert_eq!(status, 200);
    let mut vm_names: Vec<&str> =
        vms.as_array().unwrap().iter().map(|v| v["vm_name"].as_str().unwrap()).collect();
    vm_names.sort();
    assert_eq!(vm_names, ["fresh", "shared"]);

    // Nobody reaches into another namespace by spelling its stored name.
    let (status, body) = as_user(&d, "GET", &format!("/v1/sandboxes/{prefix}shared"), None);
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")), "{body}");
    let (status, body) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": format!("{prefix}other") })));
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_name")), "{body}");
    let o = d
        .env
        .airlock(["--direct", "create", "--name", &format!("{prefix}direct")])
        .env("AIRLOCK_CGROUP_PARENT", &d.cgroup_parent)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(stderr(&o).contains("reserved"), "{}", show(&o));
    // A user's names leave room for the prefix, and say so.
    let long = "n".repeat(63 - prefix.len() + 1);
    let (status, body) = as_user(&d, "POST", "/v1/sandboxes", Some(json!({ "name": long })));
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_name")), "{body}");

    // The user's events name their own sandboxes only, as they named them.
    let (_, text) = d.request_as(TEST_USER, "GET", "/v1/events", None);
    let theirs = events(&text);
    assert!(!theirs.is_empty() && theirs.iter().all(|(_, s, _)| s == "shared" || s == "fresh"), "{text}");
    let (_, text) = d.request_as(TEST_USER, "GET", "/v1/events?sandbox=shared", None);
    assert!(events(&text).iter().all(|(_, s, _)| s == "shared") && text.contains("exec_started"), "{text}");

    // Removing is per namespace too.
    let (status, _) = as_user(&d, "DELETE", "/v1/sandboxes/shared", None);
    assert_eq!(status, 200);
    let (_, inspect) = d.json("GET", "/v1/sandboxes/shared", None);
    assert_eq!(inspect["state"], "running", "root's `shared` is untouched: {inspect}");
    assert!(d.remove_all_and_settle(60).is_empty());
}

/// `/metrics` as (metric with labels → value).
fn metrics(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

fn responses(m: &BTreeMap<String, u64>) -> u64 {
    m.iter().filter(|(k, _)| k.starts_with("airlock_http_requests_total")).map(|(_, n)| n).sum()
}

#[test]
fn metrics_and_event_ids_count_only_the_callers_own() {
    let Some(_) = two_users() else { return };
    let d = TestDaemon::start_args("tenancy-metrics", &["--group", TEST_USER]);
    // Root is busy: a sandbox, execs, a refusal.
    let (status, _) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": "busy" })));
    assert_eq!(status, 201);
    for _ in 0..3 {
        let (status, _) = d.request("POST", "/v1/sandboxes/busy/exec", Some(r#"{"argv":["true"]}"#));
        assert_eq!(status, 200);
    }
    let (status, _) = d.request("GET", "/v1/sandboxes/nope", None);
    assert_eq!(status, 404);

    // The user's first request: nothing of root's shows.
    let (status, text) = d.request_as(TEST_USER, "GET", "/metrics", None);
    assert_eq!(status, 200, "{text}");
    let m = metrics(&text);
    assert_eq!(m["airlock_sandboxes{state=\"running\"}"], 0, "{text}");
    assert_eq!(m["airlock_execs_total"], 0, "{text}");
    assert_eq!(responses(&m), 0, "{text}");
    // Root's own totals cover everyone's.
    let (_, text) = d.request("GET", "/metrics", None);
    let all = metrics(&text);
    assert_eq!(all["airlock_sandboxes{state=\"running\"}"], 1, "{text}");
    assert_eq!(all["airlock_execs_total"], 3, "{text}");
    assert!(all["airlock_http_requests_total{status=\"404\"}"] >= 1, "{text}");

    // The user's own activity shows, and only it.
    let (status, _) = as_user(&d, "POST", "/v1/sandboxes", Some(json!({ "name": "mine" })));
    assert_eq!(status, 201);
    let (status, _) =
        d.request_as(TEST_USER, "POST", "/v1/sandboxes/mine/exec", Some(r#"{"argv":["true"]}"#));
    assert_eq!(status, 200);
    let (_, text) = d.request_as(TEST_USER, "GET", "/metrics", None);
    let m = metrics(&text);
    assert_eq!(m["airlock_sandboxes{state=\"running\"}"], 1, "{text}");
    assert_eq!(m["airlock_execs_total"], 1, "{text}");
    assert_eq!(m["airlock_http_requests_total{status=\"200\"}"], 2, "{text}");
    assert_eq!(m["airlock_http_requests_total{status=\"201\"}"], 1, "{text}");
    assert_eq!(responses(&m), 3, "{text}");

    // Event ids count the user's own events: 1, 2, 3… with no gap where
    // root's fell, however busy root is in between.
    for _ in 0..2 {
        let (status, _) = d.request("POST", "/v1/sandboxes/busy/exec", Some(r#"{"argv":["true"]}"#));
        assert_eq!(status, 200);
        let (status, _) =
            d.request_as(TEST_USER, "POST", "/v1/sandboxes/mine/exec", Some(r#"{"argv":["true"]}"#));
        assert_eq!(status, 200);
    }
    let (_, text) = d.request_as(TEST_USER, "GET", "/v1/events", None);
    let ids: Vec<u64> = events(&text).iter().map(|(id, _, _)| *id).collect();
    assert!(ids.len() >= 7, "{text}");
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>(), "{text}");
    let (_, text) = d.request_as(TEST_USER, "GET", "/v1/events?since=2", None);
    assert_eq!(events(&text).first().map(|e| e.0), Some(3), "{text}");
    // Root's ids are the whole log's.
    let (_, text) = d.request("GET", "/v1/events", None);
    assert!(events(&text).len() > ids.len(), "{text}");
    assert!(d.remove_all_and_settle(60).is_empty());
}
