//! `airlock daemon --e2b-listen`: E2B's own SDKs, unmodified and from their
//! registries (scripts/test.sh installs Python `e2b` into
//! target/test-deps/py-e2b and JavaScript `e2b` into target/test-deps/node),
//! drive airlock sandboxes through one listener; each test starts its own
//! daemon. Malformed requests are sent with curl.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use super::daemon_harness::TestDaemon;
use super::support::*;

const ALICE: &str = "e2b-key-alice";
const BOB: &str = "e2b-key-bob";
/// A uid with no sandboxes of its own but root's: the second tenant.
const BOB_UID: u32 = 4_000_123;

fn deps() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-deps")
}

/// The venv's python with `e2b` installed; `None` (skipped, or failed under
/// CI) without it.
fn python_sdk() -> Option<PathBuf> {
    let python = deps().join("py-e2b/bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import e2b"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    require(ok, "the Python e2b SDK in target/test-deps/py-e2b (scripts/test.sh installs it)")
        .then_some(python)
}

/// The directory holding node_modules/e2b, when node and the SDK are there.
fn node_sdk() -> Option<PathBuf> {
    let dir = deps().join("node");
    let ok = dir.join("node_modules/e2b/package.json").exists()
        && Command::new("node").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    require(ok, "node and the JavaScript e2b SDK in target/test-deps/node (scripts/test.sh installs it)")
        .then_some(dir)
}

/// A daemon with an E2B listener on loopback, for root (ALICE) and BOB_UID.
struct E2bDaemon {
    daemon: TestDaemon,
    port: u16,
}

impl E2bDaemon {
    fn start() -> E2bDaemon {
        let port = free_port();
        let daemon = TestDaemon::start_prepared(&format!("e2b-{port}"), |env| {
            let tokens = write_tokens(env.dir.path(), &[(0, ALICE), (BOB_UID, BOB)]);
            vec![
                "--e2b-listen".into(),
                format!("127.0.0.1:{port}"),
                "--tokens".into(),
                tokens.display().to_string(),
            ]
        });
        let d = E2bDaemon { daemon, port };
        let up = wait_until(20, || {
            d.curl(&["-H", &format!("X-API-KEY: {ALICE}")], "GET", "/sandboxes", None).0 == 200
        });
        assert!(up, "the E2B listener did not come up on port {port}: {}", d.daemon.log());
        d
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs a Python program with the SDK's variables set to this daemon.
    fn python(&self, python: &Path, key: &str, program: &str) -> (bool, String, String) {
        let out = Command::new(python)
            .args(["-c", program])
            .env("E2B_API_URL", self.url())
            .env("E2B_SANDBOX_URL", self.url())
            .env("E2B_API_KEY", key)
            // A crash in the SDK's native parts shows its Python stacks.
            .env("PYTHONFAULTHANDLER", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = format!("{}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        (out.status.success(), stdout(&out), err)
    }

    /// (status, body) of a curl request to this listener.
    fn curl(&self, headers: &[&str], method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-m", "60", "-X", method, "-w", "\n%{http_code}"]).args(headers);
        if let Some(body) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary", body]);
        }
        let out = cmd.arg(format!("{}{path}", self.url())).stdin(Stdio::null()).output().unwrap();
        let text = stdout(&out);
        let (rest, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), rest.to_owned())
    }
}

fn write_tokens(dir: &Path, tenants: &[(u32, &str)]) -> PathBuf {
    let mut text = String::new();
    for (uid, token) in tenants {
        let out =
            Command::new("sh").args(["-c", "printf %s \"$1\" | sha256sum", "sh", token]).output().unwrap();
        let digest = stdout(&out).split_whitespace().next().unwrap().to_string();
        text.push_str(&format!("{uid} {digest}\n"));
    }
    let path = dir.join("tokens");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The lines of `out` that are JSON objects, by their "step".
fn steps(out: &str) -> std::collections::BTreeMap<String, Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_str()?.to_owned(), v)))
        .collect()
}

const SYNC_PROGRAM: &str = r#"
import json, time
from e2b import Sandbox, SandboxQuery, CommandExitException
def say(step, **kw): print(json.dumps(dict(step=step, **kw)), flush=True)
s = Sandbox.create(timeout=120, metadata={"suite": "e2b-sync"}, envs={"GREETING": "hello"})
say("created", id=s.sandbox_id)
out, err = [], []
r = s.commands.run("echo $GREETING; echo oops >&2", on_stdout=out.append, on_stderr=err.append)
say("run", stdout=r.stdout, stderr=r.stderr, code=r.exit_code, streamed_out=out, streamed_err=err)
try:
    s.commands.run("exit 3")
    say("nonzero", raised=False)
except CommandExitException as e:
    say("nonzero", raised=True, code=e.exit_code)
h = s.commands.run("sleep 600", background=True)
listed = [p.pid for p in s.commands.list()]
killed = h.kill()
try:
    h.wait()
    say("background", ended="normally")
except CommandExitException as e:
    say("background", ended="killed", listed=h.pid in listed, killed=killed, code=e.exit_code)
s.files.write("/tmp/e2b/dir/a.txt", "hello file")
s.files.write("/tmp/e2b/bin.dat", b"\x00\x01\xff")
entries = sorted(e.name for e in s.files.list("/tmp/e2b"))
say("files", text=s.files.read("/tmp/e2b/dir/a.txt"), binary=list(s.files.read("/tmp/e2b/bin.dat", format="bytes")),
    entries=entries, exists=s.files.exists("/tmp/e2b/dir/a.txt"), missing=s.files.exists("/tmp/e2b/none"),
    mkdir=s.files.make_dir("/tmp/e2b/new"), again=s.files.make_dir("/tmp/e2b/new"))
w = s.files.watch_dir("/tmp/e2b")
s.files.write("/tmp/e2b/watched.txt", "x")
events = []
for _ in range(50):
    events += [(e.name, e.type.value) for e in w.get_new_events()]
    if any(n == "watched.txt" for n, _ in events): break
    time.sleep(0.1)
w.stop()
say("watch", events=events)
ids = [x.sandbox_id for x in Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b-sync"})).next_items()]
other = [x.sandbox_id for x in Sandbox.list(query=SandboxQuery(metadata={"suite": "other"})).next_items()]
say("list", ids=ids, other=other, metadata=s.get_info().metadata)
again = Sandbox.connect(s.sandbox_id)
metrics = s.get_metrics()
say("connect", stdout=again.commands.run("echo via-connect").stdout, samples=len(metrics),
    mem_used=metrics[0].mem_used, mem_total=metrics[0].mem_total)
s.set_timeout(2)
stopped = False
for _ in range(40):
    time.sleep(0.5)
    if not s.is_running():
        stopped = True
        break
say("timeout", stopped=stopped, listed=s.sandbox_id in [x.sandbox_id for x in Sandbox.list().next_items()])
say("kill", killed=s.kill(), again=Sandbox.kill(s.sandbox_id))
"#;

#[test]
fn python_sync_sdk_drives_a_sandbox() {
    let Some(python) = python_sdk() else { return };
    let d = E2bDaemon::start();
    let (ok, out, err) = d.python(&python, ALICE, SYNC_PROGRAM);
    assert!(ok, "{out}\n{err}\n{}", d.daemon.log());
    let s = steps(&out);
    let run = &s["run"];
    assert_eq!(
        (run["stdout"].as_str(), run["stderr"].as_str(), run["code"].as_i64()),
        (Some("hello\n"), Some("oops\n"), Some(0))
    );
    assert_eq!(run["streamed_out"], serde_json::json!(["hello\n"]), "{run}");
    assert_eq!(run["streamed_err"], serde_json::json!(["oops\n"]), "{run}");
    assert_eq!((s["nonzero"]["raised"].as_bool(), s["nonzero"]["code"].as_i64()), (Some(true), Some(3)));
    let bg = &s["background"];
    assert_eq!(
        (bg["ended"].as_str(), bg["listed"].as_bool(), bg["killed"].as_bool()),
        (Some("killed"), Some(true), Some(true)),
        "{bg}"
    );
    let files = &s["files"];
    assert_eq!(files["text"], "hello file");
    assert_eq!(files["binary"], serde_json::json!([0, 1, 255]));
    assert_eq!(files["entries"], serde_json::json!(["bin.dat", "dir"]));
    assert_eq!((files["exists"].as_bool(), files["missing"].as_bool()), (Some(true), Some(false)));
    assert_eq!((files["mkdir"].as_bool(), files["again"].as_bool()), (Some(true), Some(false)));
    let events = s["watch"]["events"].as_array().unwrap();
    assert!(events.iter().any(|e| e[0] == "watched.txt" && e[1] == "create"), "{events:?}");
    assert!(events.iter().all(|e| !e[0].as_str().unwrap().starts_with(".airlock")), "{events:?}");
    let id = s["created"]["id"].as_str().unwrap();
    assert_eq!(s["list"]["ids"], serde_json::json!([id]));
    assert_eq!(s["list"]["other"], serde_json::json!([]));
    assert_eq!(s["list"]["metadata"]["suite"], "e2b-sync");
    let connected = &s["connect"];
    assert_eq!(
        (connected["stdout"].as_str(), connected["samples"].as_u64()),
        (Some("via-connect\n"), Some(1))
    );
    assert!(connected["mem_total"].as_u64() > Some(0), "{connected}");
    assert_eq!(
        (s["timeout"]["stopped"].as_bool(), s["timeout"]["listed"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!((s["kill"]["killed"].as_bool(), s["kill"]["again"].as_bool()), (Some(true), Some(false)));
    // The sandbox stopped at its deadline as any sandbox does, then was removed.
    assert!(d.daemon.log().contains(id) || d.daemon.sandbox_names().is_empty());
    assert!(d.daemon.sandbox_names().is_empty(), "{:?}", d.daemon.sandbox_names());
}

const INTERACTIVE_PROGRAM: &str = r#"
import json
from e2b import Sandbox, PtySize
s = Sandbox.create(timeout=120)
h = s.commands.run("cat; echo done", background=True, stdin=True)
s.commands.send_stdin(h.pid, "typed\n")
again = s.commands.connect(h.pid)
s.commands.close_stdin(h.pid)
r = h.wait()
# A connected client gets the events from when it connected on.
r2 = again.wait()
chunks = []
t = s.pty.create(PtySize(rows=30, cols=100))
s.pty.resize(t.pid, PtySize(rows=40, cols=120))
s.pty.send_stdin(t.pid, b"stty size; echo pty-$((6*7)); exit 4\n")
for out, err, data in t:
    if data: chunks.append(data.decode(errors="replace"))
s.kill()
print(json.dumps(dict(step="interactive", stdin=r.stdout, connected=r2.stdout, code=r2.exit_code, pty="".join(chunks))))
"#;

#[test]
fn python_sdk_feeds_stdin_reconnects_and_drives_a_terminal() {
    let Some(python) = python_sdk() else { return };
    let d = E2bDaemon::start();
    let (ok, out, err) = d.python(&python, ALICE, INTERACTIVE_PROGRAM);
    assert!(ok, "{out}\n{err}\n{}", d.daemon.log());
    let s = &steps(&out)["interactive"];
    assert_eq!(s["stdin"], "typed\ndone\n", "{s}");
    assert!(s["connected"].as_str().unwrap().ends_with("done\n") && s["code"] == 0, "{s}");
    let pty = s["pty"].as_str().unwrap();
    assert!(pty.contains("pty-42") && pty.contains("40 120"), "{pty:?}");
}

const ASYNC_PROGRAM: &str = r#"
import asyncio, json, os, sys
from e2b import AsyncSandbox
async def main():
    s = await AsyncSandbox.create(timeout=120)
    out = []
    r = await s.commands.run("for i in 1 2 3; do echo line$i; done", on_stdout=out.append)
    await s.files.write("/tmp/async.txt", "async data")
    text = await s.files.read("/tmp/async.txt")
    events = []
    handle = await s.files.watch_dir("/tmp", on_event=lambda e: events.append(e.name))
    await s.files.write("/tmp/watched-async.txt", "y")
    for _ in range(50):
        if "watched-async.txt" in events: break
        await asyncio.sleep(0.1)
    await handle.stop()
    killed = await s.kill()
    print(json.dumps(dict(step="async", stdout=r.stdout, streamed="".join(out), text=text, events=events, killed=killed)))
asyncio.run(main())
# Every check is done and printed. The SDK's native HTTP client now and then
# aborts (SIGABRT, no Python frame) while the interpreter finalizes after an
# async run; that teardown is the client's own, so it is skipped.
sys.stdout.flush()
os._exit(0)
"#;

#[test]
fn python_async_sdk_drives_a_sandbox() {
    let Some(python) = python_sdk() else { return };
    let d = E2bDaemon::start();
    let (ok, out, err) = d.python(&python, ALICE, ASYNC_PROGRAM);
    assert!(ok, "{out}\n{err}\n{}", d.daemon.log());
    let s = &steps(&out)["async"];
    assert_eq!(s["stdout"], "line1\nline2\nline3\n");
    assert_eq!(s["streamed"], "line1\nline2\nline3\n");
    assert_eq!(s["text"], "async data");
    assert!(s["events"].as_array().unwrap().iter().any(|e| e == "watched-async.txt"), "{s}");
    assert_eq!(s["killed"], true);
}

const NODE_PROGRAM: &str = r#"
const { Sandbox, CommandExitError } = require('e2b');
(async () => {
  const s = await Sandbox.create({ timeoutMs: 120000 });
  const out = [];
  const r = await s.commands.run('echo from-node', { onStdout: (d) => out.push(d) });
  let code = null;
  try { await s.commands.run('exit 5'); } catch (e) { code = e instanceof CommandExitError ? e.exitCode : String(e); }
  const events = [];
  const watch = await s.files.watchDir('/tmp', (e) => events.push(e.name));
  await s.files.write('/tmp/node.txt', 'node data');
  const bg = await s.commands.run('sleep 600', { background: true });
  await bg.kill();
  let bgCode = null;
  try { await bg.wait(); } catch (e) { bgCode = e instanceof CommandExitError ? e.exitCode : String(e); }
  for (let i = 0; i < 50 && !events.includes('node.txt'); i++) await new Promise((r) => setTimeout(r, 100));
  await watch.stop();
  const text = await s.files.read('/tmp/node.txt');
  const names = (await s.files.list('/tmp')).map((e) => e.name);
  const listed = (await Sandbox.list().nextItems()).map((x) => x.sandboxId);
  const killed = await s.kill();
  console.log(JSON.stringify({ step: 'node', id: s.sandboxId, stdout: r.stdout, streamed: out.join(''), code, text, has: names.includes('node.txt'), listed, killed, watched: events.includes('node.txt'), bgCode }));
})().catch((e) => { console.error(e); process.exit(1); });
"#;

#[test]
fn javascript_sdk_on_node_drives_a_sandbox() {
    let Some(dir) = node_sdk() else { return };
    let d = E2bDaemon::start();
    let out = Command::new("node")
        .args(["-e", NODE_PROGRAM])
        .current_dir(&dir)
        .env("E2B_API_URL", d.url())
        .env("E2B_SANDBOX_URL", d.url())
        .env("E2B_API_KEY", ALICE)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", show(&out), d.daemon.log());
    let s = &steps(&stdout(&out))["node"];
    assert_eq!(
        (s["stdout"].as_str(), s["streamed"].as_str()),
        (Some("from-node\n"), Some("from-node\n")),
        "{s}"
    );
    assert_eq!(s["code"], 5, "{s}");
    assert_eq!(s["text"], "node data");
    assert_eq!(s["has"], true);
    assert_eq!((s["watched"].as_bool(), s["bgCode"].as_i64()), (Some(true), Some(-1)), "{s}");
    assert!(s["listed"].as_array().unwrap().contains(&s["id"]), "{s}");
    assert_eq!(s["killed"], true);
}

#[test]
fn a_second_tenant_cannot_see_or_touch_the_first_ones_sandbox() {
    let Some(python) = python_sdk() else { return };
    let d = E2bDaemon::start();
    let (ok, out, err) = d.python(
        &python,
        ALICE,
        r#"
import json
from e2b import Sandbox
s = Sandbox.create(timeout=120)
s.files.write("/tmp/secret", "alice's")
print(json.dumps(dict(step="alice", id=s.sandbox_id, token=s._envd_access_token)))
"#,
    );
    assert!(ok, "{out}\n{err}");
    let alice = &steps(&out)["alice"];
    let (id, alice_token) = (alice["id"].as_str().unwrap(), alice["token"].as_str().unwrap());
    let program = format!(
        r#"
import json
from e2b import Sandbox
from e2b.exceptions import NotFoundException, AuthenticationException, SandboxException
listed = [x.sandbox_id for x in Sandbox.list().next_items()]
try:
    Sandbox.get_info("{id}"); info = "visible"
except NotFoundException: info = "not found"
try:
    Sandbox.connect("{id}"); connected = "connected"
except NotFoundException: connected = "not found"
killed = Sandbox.kill("{id}")
mine = Sandbox.create(timeout=60)
print(json.dumps(dict(step="bob", listed=listed, info=info, connected=connected, killed=killed, id=mine.sandbox_id, token=mine._envd_access_token)))
"#
    );
    let (ok, out, err) = d.python(&python, BOB, &program);
    assert!(ok, "{out}\n{err}\n{}", d.daemon.log());
    let bob = &steps(&out)["bob"];
    assert!(!bob["listed"].as_array().unwrap().iter().any(|x| x == id), "{bob}");
    assert_eq!(
        (bob["info"].as_str(), bob["connected"].as_str()),
        (Some("not found"), Some("not found")),
        "{bob}"
    );
    assert_eq!(bob["killed"], false);
    // Bob's own sandbox's token, with Alice's sandbox id on envd's routes.
    let bob_token = format!("X-Access-Token: {}", bob["token"].as_str().unwrap());
    let as_bob = |sandbox: &str| {
        let sandbox = format!("E2b-Sandbox-Id: {sandbox}");
        let headers = ["-H", sandbox.as_str(), "-H", bob_token.as_str()];
        let (read, _) = d.curl(&headers, "GET", "/files?path=/tmp/secret", None);
        let (list, _) = d.curl(&headers, "POST", "/process.Process/List", Some("{}"));
        let (stat, _) = d.curl(&headers, "POST", "/filesystem.Filesystem/Stat", Some(r#"{"path":"/tmp"}"#));
        (read, list, stat)
    };
    assert_eq!(as_bob(id), (401, 401, 401));
    assert_eq!(as_bob(bob["id"].as_str().unwrap()), (404, 200, 200), "the same token opens Bob's own");
    let bob_key = format!("X-API-KEY: {BOB}");
    let (status, _) =
        d.curl(&["-H", &bob_key], "DELETE", &format!("/sandboxes/{}", bob["id"].as_str().unwrap()), None);
    assert_eq!(status, 204);
    // No token at all: 401, and Alice's sandbox is untouched.
    let envd = ["-H", &format!("E2b-Sandbox-Id: {id}") as &str, "-H", "E2b-Sandbox-Port: 49983"];
    let (status, body) = d.curl(&envd, "GET", "/files?path=/tmp/secret", None);
    assert_eq!(status, 401, "{body}");
    let token_header = format!("X-Access-Token: {alice_token}");
    let with_token = [&envd[..], &["-H", &token_header]].concat();
    let (status, body) = d.curl(&with_token, "GET", "/files?path=/tmp/secret", None);
    assert_eq!((status, body.as_str()), (200, "alice's"));
    let (status, _) =
        d.curl(&["-H", &format!("X-API-KEY: {ALICE}")], "DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(status, 204);
}

const PORTS_PROGRAM: &str = r#"
import json
from e2b import Sandbox
s = Sandbox.create(timeout=120)
s.files.write("/tmp/site/hello.txt", "served from inside")
s.commands.run("nohup python3 -m http.server 8000 --bind 127.0.0.1 --directory /tmp/site >/tmp/http.log 2>&1 &")
closed = Sandbox.create(template="CLOSED_POLICY", timeout=120)
print(json.dumps(dict(step="ports", id=s.sandbox_id, token=s._envd_access_token, host=s.get_host(8000),
    quiet=s.get_host(8001), closed=closed.get_host(8000), closed_token=closed._envd_access_token)))
"#;

/// `get_host(PORT)` names `PORT-ID.localhost:LISTENER_PORT`, which the
/// listener relays to that port inside the sandbox.
#[test]
fn get_host_reaches_a_port_inside_the_sandbox() {
    let Some(python) = python_sdk() else { return };
    let d = E2bDaemon::start();
    // dev, as the other sandbox, but with its ports closed to the outside.
    let closed = d.daemon.env.dir.path().join("closed.toml");
    std::fs::write(&closed, "extends = \"dev\"\n[network]\nports = false\n").unwrap();
    let program = PORTS_PROGRAM.replace("CLOSED_POLICY", &closed.display().to_string());
    let (ok, out, err) = d.python(&python, ALICE, &program);
    assert!(ok, "{out}\n{err}\n{}", d.daemon.log());
    let s = &steps(&out)["ports"];
    let (id, token) = (s["id"].as_str().unwrap(), s["token"].as_str().unwrap());
    let host = s["host"].as_str().unwrap();
    assert_eq!(host, format!("8000-{id}.localhost:{}", d.port));
    // curl, as a browser would, with the name resolved to the listener.
    let get = |host: &str, headers: &[&str], path: &str| {
        let (name, port) = host.rsplit_once(':').unwrap();
        let resolve = format!("{name}:{port}:127.0.0.1");
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-m", "30", "-w", "\n%{http_code}", "--resolve", &resolve]);
        for header in headers {
            cmd.args(["-H", header]);
        }
        let out = cmd.arg(format!("http://{host}{path}")).stdin(Stdio::null()).output().unwrap();
        let text = stdout(&out);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse::<u16>().unwrap_or(0), body.to_owned())
    };
    let with_token = format!("X-Access-Token: {token}");
    let mut answer = (0, String::new());
    let served = wait_until(20, || {
        answer = get(host, &[&with_token], "/hello.txt");
        answer.0 == 200
    });
    assert!(served, "{answer:?}\n{}", d.daemon.log());
    assert_eq!(answer.1, "served from inside");
    // SDK-style headers name the same port.
    let by_headers = [format!("E2b-Sandbox-Id: {id}"), "E2b-Sandbox-Port: 8000".into(), with_token.clone()];
    let by_headers: Vec<&str> = by_headers.iter().flat_map(|h| ["-H", h.as_str()]).collect();
    assert_eq!(d.curl(&by_headers, "GET", "/hello.txt", None), (200, "served from inside".into()));
    // Each request was a connection into the sandbox, in its audit log.
    let audit = d.daemon.env.airlock(["audit", id, "--json"]).output().unwrap();
    let accepted = stdout(&audit)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "port_accepted" && e["sandbox_port"] == 8000)
        .count();
    assert!(accepted >= 2, "{}", show(&audit));

    // Without the sandbox's token, nothing is relayed.
    let (status, body) = get(host, &[], "/hello.txt");
    assert_eq!(status, 401, "{body}");
    // Nothing listening inside: 502, saying so.
    let (status, body) = get(s["quiet"].as_str().unwrap(), &[&with_token], "/");
    assert!(status == 502 && body.contains("port 8001"), "{status} {body}");
    // A policy that forbids ports: 403 with its reason.
    let closed_token = format!("X-Access-Token: {}", s["closed_token"].as_str().unwrap());
    let (status, body) = get(s["closed"].as_str().unwrap(), &[&closed_token], "/hello.txt");
    assert!(status == 403 && body.contains("ports = false"), "{status} {body}");
    // WebSocket is refused plainly.
    let upgrade = ["Connection: Upgrade", "Upgrade: websocket", &with_token];
    assert_eq!(get(host, &upgrade, "/").0, 501);

    // Another tenant, with a token of their own sandbox, is told nothing
    // of Alice's: 404, as for a sandbox that does not exist.
    let (ok, out, err) = d.python(
        &python,
        BOB,
        "import json\nfrom e2b import Sandbox\ns = Sandbox.create(timeout=60)\nprint(json.dumps(dict(step='bob', token=s._envd_access_token, host=s.get_host(8000))))",
    );
    assert!(ok, "{out}\n{err}");
    let bob = &steps(&out)["bob"];
    let bob_token = format!("X-Access-Token: {}", bob["token"].as_str().unwrap());
    let (status, body) = get(host, &[&bob_token], "/hello.txt");
    assert!(status == 404 && !body.contains("served"), "{status} {body}");
    let (status, body) = get(&format!("8000-no-such-sandbox.localhost:{}", d.port), &[&bob_token], "/");
    assert_eq!(status, 404, "{body}");
    let (status, body) = get(bob["host"].as_str().unwrap(), &[&bob_token], "/");
    assert_eq!(status, 502, "Bob's own sandbox, nothing listening: {body}");
}

#[test]
fn bad_requests_get_e2b_errors_and_hurt_nothing() {
    let d = E2bDaemon::start();
    let key = format!("X-API-KEY: {ALICE}");
    let auth = ["-H", key.as_str()];
    let code = |(status, body): (u16, String)| {
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
        assert_eq!(v["code"].as_u64(), Some(u64::from(status)), "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        status
    };
    assert_eq!(code(d.curl(&[], "GET", "/sandboxes", None)), 401);
    assert_eq!(code(d.curl(&["-H", "X-API-KEY: wrong"], "GET", "/v2/sandboxes", None)), 401);
    assert_eq!(code(d.curl(&auth, "GET", "/sandboxes/no-such-sandbox", None)), 404);
    assert_eq!(code(d.curl(&auth, "GET", "/sandboxes/..%2Fetc", None)), 404);
    assert_eq!(code(d.curl(&auth, "DELETE", "/sandboxes/no-such-sandbox", None)), 404);
    assert_eq!(
        code(d.curl(&auth, "POST", "/sandboxes/no-such-sandbox/timeout", Some(r#"{"timeout":5}"#))),
        404
    );
    assert_eq!(code(d.curl(&auth, "POST", "/v2/sandboxes", Some("{not json"))), 400);
    assert_eq!(code(d.curl(&auth, "POST", "/v2/sandboxes", Some(r#"{"templateID":"no-such-policy"}"#))), 400);
    assert_eq!(
        code(d.curl(&auth, "POST", "/v2/sandboxes", Some(r#"{"templateID":"base","autoPause":true}"#))),
        400
    );
    let big = format!(r#"{{"templateID":"base","metadata":{{"k":"{}"}}}}"#, "a".repeat(2 << 20));
    let file = d.daemon.env.dir.path().join("big.json");
    std::fs::write(&file, big).unwrap();
    let (status, body) = d.curl(
        &[
            &auth[..],
            &["--data-binary", &format!("@{}", file.display()), "-H", "content-type: application/json"],
        ]
        .concat(),
        "POST",
        "/v2/sandboxes",
        None,
    );
    assert_eq!(code((status, body)), 413);
    // envd's routes: no token, a token for nothing, a bad Connect body.
    let envd = ["-H", "E2b-Sandbox-Id: no-such-sandbox", "-H", "E2b-Sandbox-Port: 49983"];
    assert_eq!(code(d.curl(&envd, "POST", "/process.Process/List", Some("{}"))), 401);
    let forged = [&envd[..], &["-H", "X-Access-Token: 00"]].concat();
    assert_eq!(code(d.curl(&forged, "POST", "/filesystem.Filesystem/Stat", Some(r#"{"path":"/"}"#))), 401);
    // Nothing was created, and the daemon still answers.
    let (status, body) = d.curl(&auth, "GET", "/v2/sandboxes", None);
    assert_eq!((status, body.trim()), (200, "[]"));
    assert!(d.daemon.sandbox_names().is_empty());
}

#[test]
fn a_connect_call_with_bad_json_gets_a_connect_error() {
    let Some(python) = python_sdk() else { return };
    let d = E2bDaemon::start();
    let (ok, out, err) = d.python(
        &python,
        ALICE,
        "import json\nfrom e2b import Sandbox\ns = Sandbox.create(timeout=60)\nprint(json.dumps(dict(step='s', id=s.sandbox_id, token=s._envd_access_token)))",
    );
    assert!(ok, "{out}\n{err}");
    let s = &steps(&out)["s"];
    let (id, token) = (s["id"].as_str().unwrap(), s["token"].as_str().unwrap());
    let headers =
        ["-H".to_string(), format!("E2b-Sandbox-Id: {id}"), "-H".into(), format!("X-Access-Token: {token}")];
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    let (status, body) = d.curl(&headers, "POST", "/filesystem.Filesystem/Stat", Some("{bad"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status, v["code"].as_str()), (400, Some("invalid_argument")), "{v}");
    let (status, body) = d.curl(&headers, "POST", "/filesystem.Filesystem/Stat", Some(r#"{"path":"/nope"}"#));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status, v["code"].as_str()), (404, Some("not_found")), "{v}");
    let (status, _) = d.curl(&headers, "GET", "/health", None);
    assert_eq!(status, 204);
    let (status, _) =
        d.curl(&["-H", &format!("X-API-KEY: {ALICE}")], "DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(status, 204);
}

#[test]
fn plain_http_is_refused_off_loopback() {
    let env = Env::new();
    let tokens = write_tokens(env.dir.path(), &[(0, ALICE)]);
    let socket = env.dir.path().join("run/airlock.sock");
    let out = env
        .airlock([
            "daemon",
            "--socket",
            &socket.display().to_string(),
            "--e2b-listen",
            "0.0.0.0:0",
            "--tokens",
        ])
        .arg(&tokens)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address") && err.contains("--tls-cert"), "{err}");
}

#[test]
fn the_listener_serves_tls_when_given_a_certificate() {
    let port = free_port();
    let mut cert = PathBuf::new();
    let d = TestDaemon::start_prepared(&format!("e2b-tls-{port}"), |env| {
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        cert = env.dir.path().join("cert.pem");
        let key = env.dir.path().join("key.pem");
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let tokens = write_tokens(env.dir.path(), &[(0, ALICE)]);
        let path = |p: &Path| p.display().to_string();
        vec![
            "--e2b-listen".into(),
            format!("127.0.0.1:{port}"),
            "--tokens".into(),
            path(&tokens),
            "--tls-cert".into(),
            path(&cert),
            "--tls-key".into(),
            path(&key),
        ]
    });
    let get = |scheme: &str| {
        let out = Command::new("curl")
            .args(["-sS", "-m", "20", "--cacert"])
            .arg(&cert)
            .args(["-H", &format!("X-API-KEY: {ALICE}"), "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{scheme}://127.0.0.1:{port}/v2/sandboxes"))
            .output()
            .unwrap();
        stdout(&out).trim().to_owned()
    };
    assert!(wait_until(20, || get("https") == "200"), "no TLS answer: {}", d.log());
    assert_ne!(get("http"), "200", "plain HTTP was answered on the TLS port");
}

/// The README's example, as it stands there.
#[test]
fn the_readme_example_runs() {
    let Some(python) = python_sdk() else { return };
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("python3 -c 'from e2b import Sandbox"))
        .expect("the README's E2B example");
    let program = line.trim_start_matches("python3 -c '").trim_end_matches('\'');
    let d = E2bDaemon::start();
    let (ok, out, err) = d.python(&python, ALICE, program);
    assert!(ok, "{out}\n{err}");
    assert_eq!(out, "hi\n\n", "the command's output, then print's newline");
    assert!(d.daemon.sandbox_names().is_empty());
}
