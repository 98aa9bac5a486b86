//! Fuzzing `airlock daemon` from its committed OpenAPI document with
//! schemathesis (from PyPI; scripts/test.sh installs it). schemathesis
//! speaks HTTP over TCP, so the test relays a loopback TCP port to the
//! daemon's Unix socket. The run passes when no request gets a 5xx, the
//! daemon stays healthy, and removing every sandbox the fuzzer created
//! leaves nothing behind.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::daemon_harness::TestDaemon;
use super::support::*;

/// How long schemathesis may run before the test kills it and fails.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// Relays connections on 127.0.0.1:`port` to a Unix socket, one pair of
/// copying threads per connection.
struct Forwarder {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    fn start(socket: PathBuf) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(tcp) = conn else { continue };
                // Dropping the TCP side when the daemon is unreachable
                // shows up in schemathesis as a connection error: a failure.
                let Ok(unix) = UnixStream::connect(&socket) else { continue };
                relay(tcp, unix);
            }
        });
        Forwarder { port, stop, thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn relay(tcp: TcpStream, unix: UnixStream) {
    let (Ok(mut tcp_in), Ok(mut unix_out)) = (tcp.try_clone(), unix.try_clone()) else { return };
    let (mut tcp_out, mut unix_in) = (tcp, unix);
    std::thread::spawn(move || {
        let _ = io::copy(&mut tcp_in, &mut unix_out);
        let _ = unix_out.shutdown(Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = io::copy(&mut unix_in, &mut tcp_out);
        let _ = tcp_out.shutdown(Shutdown::Write);
    });
}

fn schemathesis_installed() -> bool {
    Command::new("schemathesis")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The committed document, adjusted for fuzzing on this host:
/// - `GET /v1/events` and `GET …/audit` lose their `follow` parameter: a
///   followed stream never ends, which would only measure the request
///   timeout;
/// - `GET …/files/watch` is left out: a watch streams until its client
///   goes away;
/// - the workspace of `POST /v1/sandboxes` and `POST /vm` is the test's
///   own: as root the daemon would mount (and `apply` write back into) any
///   directory the fuzzer happens to name, `/` included.
fn fuzzing_document(workspace: &Path) -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../server/openapi.json");
    let mut doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let params = doc["paths"]["/v1/events"]["get"]["parameters"].as_array_mut().unwrap();
    let before = params.len();
    params.retain(|p| p["name"] != "follow");
    assert_eq!(params.len() + 1, before, "no follow parameter on GET /v1/events: update this test");
    let params = doc["paths"]["/v1/sandboxes/{name}/audit"]["get"]["parameters"].as_array_mut().unwrap();
    let before = params.len();
    params.retain(|p| p["name"] != "follow");
    assert_eq!(params.len() + 1, before, "no follow parameter on GET …/audit: update this test");
    // The Upgrade form switches the connection away from HTTP: not for a
    // fuzzer that expects an HTTP answer to each request (daemon_attach
    // tests it).
    let params = doc["paths"]["/v1/sandboxes/{name}/exec"]["post"]["parameters"].as_array_mut().unwrap();
    let before = params.len();
    params.retain(|p| p["name"] != "Upgrade");
    assert_eq!(params.len() + 1, before, "no Upgrade parameter on POST …/exec: update this test");
    // A watch that is set up streams until its client goes away: like a
    // followed event stream, it would only measure the request timeout.
    let paths = doc["paths"].as_object_mut().unwrap();
    assert!(
        paths.remove("/v1/sandboxes/{name}/files/watch").is_some(),
        "no files/watch route: update this test"
    );
    let ws = json!({ "type": "string", "enum": [workspace.display().to_string()] });
    for (schema, field) in [("CreateSandbox", "workspace"), ("CreateVm", "workspace_dir")] {
        let slot = &mut doc["components"]["schemas"][schema]["properties"][field];
        assert!(slot.is_object(), "no {schema}.{field} in the document: update this test");
        *slot = ws.clone();
    }
    doc
}

/// Every request of the run that got a 5xx, one line each (schemathesis
/// reports only one per operation and kind of failure).
fn server_errors(har: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(har) else { return vec!["(no HAR report)".into()] };
    let Ok(doc) = serde_json::from_str::<Value>(&text) else { return vec!["(unreadable HAR report)".into()] };
    let mut out: Vec<String> = doc["log"]["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["response"]["status"].as_u64().is_some_and(|s| s >= 500))
        .map(|e| {
            format!(
                "{} {} {} -> {} {}",
                e["request"]["method"].as_str().unwrap_or("?"),
                e["request"]["url"].as_str().unwrap_or("?"),
                e["request"]["postData"]["text"].as_str().unwrap_or(""),
                e["response"]["status"],
                e["response"]["content"]["text"].as_str().unwrap_or(""),
            )
        })
        .collect();
    out.dedup();
    out
}

#[test]
fn daemon_survives_schemathesis_without_a_server_error() {
    if !require(schemathesis_installed(), "schemathesis (scripts/test.sh installs it with pip)") {
        return;
    }
    let d = TestDaemon::start("fuzz");
    let forwarder = Forwarder::start(d.socket.clone());
    let dir = d.env.dir.path();
    let spec = dir.join("openapi-fuzz.json");
    std::fs::write(&spec, fuzzing_document(&d.env.workspace).to_string()).unwrap();

    let output = dir.join("schemathesis.log");
    let har = dir.join("schemathesis.har");
    let started = Instant::now();
    let mut child = Command::new("schemathesis")
        .args(["--no-color", "run"])
        .arg(&spec)
        .args(["--url", &forwarder.url()])
        .args(["--checks", "not_a_server_error"])
        // AIRLOCK_FUZZ_EXAMPLES digs deeper by hand (the suite keeps to 30).
        .args(["--max-examples", &std::env::var("AIRLOCK_FUZZ_EXAMPLES").unwrap_or_else(|_| "30".into())])
        .args(["--workers", "2"])
        .args(["--request-timeout", "60"])
        .args(["--generation-database", "none"])
        .args(["--report", "har", "--report-har-path"])
        .arg(&har)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&output).unwrap())
        .stderr(Stdio::from(std::fs::File::options().append(true).open(&output).unwrap()))
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let report = std::fs::read_to_string(&output).unwrap_or_default();
    eprintln!("schemathesis ran for {:.0}s", started.elapsed().as_secs_f64());
    assert!(status.is_some(), "schemathesis still running after {RUN_LIMIT:?}:\n{report}");
    // What counts is the daemon's answers: any 5xx in the recorded
    // exchanges, or a failed check. schemathesis's own internal errors (it
    // sometimes trips over its generator) are shown but are not the daemon's.
    let five_hundreds = server_errors(&har);
    let failed_checks = report.contains("FAILURES");
    assert!(
        five_hundreds.is_empty() && !failed_checks,
        "schemathesis found failures ({status:?}):\n{report}\n--- every 5xx\n{}\n--- daemon log\n{}",
        five_hundreds.join("\n"),
        d.log()
    );
    if !status.is_some_and(|s| s.success()) {
        eprintln!("schemathesis exited with {status:?} without a server error (its own errors):\n{report}");
    }

    let (code, health) = d.json("GET", "/v1/health", None);
    assert_eq!((code, &health["status"]), (200, &json!("ok")), "{health}");
    let log = d.log();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");

    drop(forwarder);
    let left = d.remove_all_and_settle(30);
    assert!(left.is_empty(), "left behind after removing the fuzzer's sandboxes:\n{}", left.join("\n"));
}
