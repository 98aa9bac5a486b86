//! `airlock mcp`, driven by the official Python MCP SDK (`mcp` from PyPI,
//! installed by scripts/test.sh into target/test-deps/py-mcp) running
//! mcp_client.py: every tool over stdio, once on the state directory and
//! once through a daemon, `apply` only with --allow-apply; and the
//! streamable HTTP transport on loopback.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use super::daemon_harness::TestDaemon;
use super::support::*;

const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/suite/mcp_client.py");
/// The stdio server is started as the README's client configuration says.
const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");

/// The venv's interpreter, or None (skipped outside CI, a failure in CI).
fn python() -> Option<PathBuf> {
    let python =
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/test-deps/py-mcp/bin/python"));
    let installed = Command::new(&python)
        .args(["-c", "import mcp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    require(installed, "the Python mcp package in target/test-deps/py-mcp (scripts/test.sh installs it)")
        .then_some(python)
}

/// The client script, as `env`'s airlock would be run (its state
/// directory, and `socket` as the daemon to look for).
fn client(python: &PathBuf, env: &Env, socket: &std::path::Path, args: &[&str]) -> Output {
    // `airlock` on PATH, as a client configured with the README's snippet finds it.
    let bin_dir = std::path::Path::new(BIN).parent().unwrap();
    let path = std::env::join_paths(
        std::iter::once(bin_dir.to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    Command::new(python)
        .arg(CLIENT)
        .args(args)
        .env("PATH", path)
        .env("AIRLOCK_STATE_DIR", &env.state)
        .env("AIRLOCK_CGROUP_PARENT", cgroup_parent())
        .env("AIRLOCK_SOCKET", socket)
        .env_remove("AIRLOCK_LOG")
        .current_dir(&env.workspace)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn assert_scenario(o: &Output, allow_apply: bool) {
    assert_eq!(o.status.code(), Some(0), "{}", show(o));
    let out = stdout(o);
    for step in [
        "tools listed with their schemas",
        "create_sandbox",
        "exec: non-zero exit with stdout and stderr",
        "exec: timeout",
        "exec: output cut at the cap, with a marker",
        "write_file, read_file, list_files",
        "diff of the overlay workspace",
        "network_log has the refused request",
        "unknown sandbox",
        "bad arguments (type)",
        "unknown tool",
        "stop_sandbox",
        "destroy_sandbox",
        "a sandbox left running",
    ] {
        assert!(out.contains(&format!("ok: {step}")), "step {step:?} missing:\n{}", show(o));
    }
    let apply_step =
        if allow_apply { "ok: apply with the reviewed digest" } else { "ok: apply is not offered" };
    assert!(out.contains(apply_step), "{}", show(o));
    assert!(out.trim_end().ends_with("done"), "{}", show(o));
}

/// The sandbox the session left running is an ordinary one: `airlock ls`
/// shows it after the client went away.
fn assert_kept(env: &Env) {
    let o = env.airlock(["ls", "--json"]).output().unwrap();
    let list: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&o)));
    let kept = list.iter().find(|s| s["name"] == "mcp-kept").unwrap_or_else(|| panic!("{list:?}"));
    assert_eq!(kept["state"], "running", "{kept}");
    // Created without a workspace: nothing mounted, not the server's cwd.
    assert_eq!(kept["workspace_mode"], "none", "{kept}");
    assert!(!list.iter().any(|s| s["name"] == "mcp-box"), "destroyed, yet listed: {list:?}");
}

#[test]
fn mcp_tools_over_stdio_work_on_the_state_directory() {
    let Some(python) = python() else { return };
    let env = Env::new();
    let ws = env.workspace.display().to_string();
    let no_daemon = env.dir.path().join("no-daemon.sock");
    let o = client(&python, &env, &no_daemon, &["stdio", README, &ws]);
    assert_scenario(&o, false);
    // Without --allow-apply nothing reached the host's workspace.
    assert_eq!(std::fs::read_to_string(env.workspace.join("README")).unwrap(), "hello\n");
    assert_kept(&env);
}

#[test]
fn mcp_apply_is_offered_with_allow_apply_and_writes_the_reviewed_change() {
    let Some(python) = python() else { return };
    let env = Env::new();
    let ws = env.workspace.display().to_string();
    let no_daemon = env.dir.path().join("no-daemon.sock");
    let o = client(&python, &env, &no_daemon, &["stdio", README, &ws, "--allow-apply"]);
    assert_scenario(&o, true);
    assert_eq!(std::fs::read_to_string(env.workspace.join("README")).unwrap(), "changed\n");
    assert_kept(&env);
}

#[test]
fn mcp_tools_go_through_the_daemon_when_one_answers() {
    let Some(python) = python() else { return };
    let d = TestDaemon::start("mcp");
    let ws = d.env.workspace.display().to_string();
    let o = client(&python, &d.env, &d.socket, &["stdio", README, &ws, "--allow-apply"]);
    assert_scenario(&o, true);
    assert_eq!(std::fs::read_to_string(d.env.workspace.join("README")).unwrap(), "changed\n");
    // The daemon served them: its event log has the sandbox's life and execs.
    let (status, events) = d.request("GET", "/v1/events?sandbox=mcp-box", None);
    assert_eq!(status, 200, "{events}");
    for kind in ["created", "exec_started", "exec_ended", "stopped", "destroyed"] {
        assert!(events.contains(&format!("event: {kind}")), "no {kind} event:\n{events}");
    }
    assert!(d.sandbox_names().contains(&"mcp-kept".to_owned()), "{:?}", d.sandbox_names());
    let (status, _) = d.request("DELETE", "/v1/sandboxes/mcp-kept", None);
    assert_eq!(status, 200);
}

#[test]
fn mcp_over_streamable_http_on_loopback() {
    let Some(python) = python() else { return };
    let env = Env::new();
    let mut server = env
        .airlock(["mcp", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("airlock: MCP on ").map(str::to_owned))
        .expect("the server did not say where it listens");
    assert!(url.starts_with("http://127.0.0.1:") && url.ends_with("/mcp"), "{url}");
    let no_daemon = env.dir.path().join("no-daemon.sock");
    let o = client(&python, &env, &no_daemon, &["http", &url]);
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains("ok: streamable HTTP: create, exec, destroy"), "{}", show(&o));
    assert!(stdout(&o).contains("ok: unknown sandbox"), "{}", show(&o));
}

#[test]
fn mcp_refuses_to_listen_beyond_loopback() {
    let env = Env::new();
    let o = env.airlock(["mcp", "--listen", "0.0.0.0:0"]).output().unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("loopback"), "{}", show(&o));
}
