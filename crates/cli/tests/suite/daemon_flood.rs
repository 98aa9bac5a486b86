//! `airlock daemon` under a flood of bad requests: 2,000 connections open
//! on its Unix socket at once, each sending something wrong (malformed or
//! oversized JSON, unknown fields, hostile sandbox names, file paths that try
//! to leave the sandbox, bytes that are not HTTP at all). Every HTTP request
//! must get a 4xx with the daemon's JSON error, the rest a 400 or a closed
//! connection, none may hang; afterwards the daemon is healthy, a sandbox
//! created before the flood still runs commands, and the daemon holds no
//! more descriptors than before.
//!
//! The daemon is started with a soft RLIMIT_NOFILE of 1024, the common
//! default, and must raise it itself: with 1,024 connections accepted it
//! would otherwise run out of descriptors.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::daemon_harness::TestDaemon;
use super::support::*;

/// Connections open at once.
const CONNECTIONS: usize = 2000;
/// The daemon's soft limit on open files at start (it raises it).
const DAEMON_SOFT_NOFILE: u64 = 1024;
/// Longer than this for an answer (or the connection's end) is a hang.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
/// The daemon's request body limit (`extract::BODY_LIMIT`).
const BODY_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    MalformedJson,
    UnknownField,
    Oversized,
    DotDotName,
    NulName,
    LongName,
    DeleteEscapingName,
    FilesRelativePath,
    FilesNulPath,
    Garbage,
}

/// The mix: every kind but the oversized body in turn, and an oversized
/// body (1 MiB + 1 byte) on every 50th connection.
fn kind_of(i: usize) -> Kind {
    const ROTATION: [Kind; 9] = [
        Kind::MalformedJson,
        Kind::UnknownField,
        Kind::DotDotName,
        Kind::NulName,
        Kind::LongName,
        Kind::DeleteEscapingName,
        Kind::FilesRelativePath,
        Kind::FilesNulPath,
        Kind::Garbage,
    ];
    if i.is_multiple_of(50) { Kind::Oversized } else { ROTATION[i % ROTATION.len()] }
}

/// The bytes connection `i` sends, and the status and error code an HTTP
/// request must get (`None`: not HTTP).
fn probe(i: usize, sandbox: &str) -> (Vec<u8>, Option<(u16, &'static str)>) {
    let http = |method: &str, target: &str, body: &[u8]| {
        let mut out = format!(
            "{method} {target} HTTP/1.1\r\nHost: airlock\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        out
    };
    match kind_of(i) {
        Kind::MalformedJson => {
            (http("POST", "/v1/sandboxes", br#"{"name": "flood-x", "policy": "#), Some((400, "invalid_json")))
        }
        Kind::UnknownField => (
            http("POST", "/v1/sandboxes", br#"{"name":"flood-y","policy":"dev","volumes":["/:/host"]}"#),
            Some((400, "invalid_json")),
        ),
        Kind::Oversized => {
            let mut body = b"{\"name\":\"".to_vec();
            body.resize(BODY_LIMIT + 1, b'a');
            (http("POST", "/v1/sandboxes", &body), Some((413, "payload_too_large")))
        }
        Kind::DotDotName => (http("GET", "/v1/sandboxes/..%2F..%2Fetc", b""), Some((400, "invalid_name"))),
        Kind::NulName => {
            (http("GET", &format!("/v1/sandboxes/{sandbox}%00x"), b""), Some((400, "invalid_name")))
        }
        Kind::LongName => {
            (http("GET", &format!("/v1/sandboxes/{}", "n".repeat(4000)), b""), Some((400, "invalid_name")))
        }
        Kind::DeleteEscapingName => {
            (http("DELETE", &format!("/v1/sandboxes/..%2F{sandbox}"), b""), Some((400, "invalid_name")))
        }
        Kind::FilesRelativePath => (
            http("GET", &format!("/v1/sandboxes/{sandbox}/files?path=../../etc/shadow"), b""),
            Some((400, "invalid_path")),
        ),
        Kind::FilesNulPath => (
            http("GET", &format!("/v1/sandboxes/{sandbox}/files?path=/etc/shadow%00.txt"), b""),
            Some((400, "invalid_path")),
        ),
        Kind::Garbage => {
            let bytes: &[u8] = match (i / 10) % 4 {
                // A TLS ClientHello's first bytes.
                0 => b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xde\xad\xbe\xef\r\n\r\n",
                1 => b"\x00\xff\xfe\xfd garbage \x7f\x80\r\n\r\n",
                2 => b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
                // A request line, then a header line with no colon.
                _ => b"GET /v1/health HTTP/1.1\r\nHost: airlock\r\nthis is no header\r\n\r\n",
            };
            (bytes.to_vec(), None)
        }
    }
}

/// What one connection saw.
#[derive(Debug)]
enum Outcome {
    /// An HTTP answer: status, content type, body.
    Answer { status: u16, content_type: String, body: Vec<u8> },
    /// The daemon closed (or reset) the connection without an answer.
    Closed,
    /// Nothing within [`ANSWER_TIMEOUT`].
    Hung,
    /// The answer could not be parsed.
    Unparsable(Vec<u8>),
}

fn parse_answer(raw: &[u8]) -> Outcome {
    if raw.is_empty() {
        return Outcome::Closed;
    }
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Outcome::Unparsable(raw.to_vec());
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status else { return Outcome::Unparsable(raw.to_vec()) };
    let mut content_type = String::new();
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_ascii_lowercase());
        if name == "content-type" {
            content_type = value;
        } else if name == "transfer-encoding" && value.contains("chunked") {
            chunked = true;
        }
    }
    let mut body = raw[end + 4..].to_vec();
    if chunked {
        body = dechunk(&body);
    }
    Outcome::Answer { status, content_type, body }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || raw.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[(eol + 4 + size).min(raw.len())..];
    }
    out
}

/// Opens all connections, then sends every request, then reads every
/// answer (to the end of the connection), each with a deadline.
async fn flood(socket: &Path, sandbox: &str) -> Vec<(usize, Outcome)> {
    let mut streams = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        match UnixStream::connect(socket).await {
            Ok(stream) => streams.push(stream),
            Err(e) => panic!(
                "connection {i} of {CONNECTIONS} failed: {e} (is net.core.somaxconn below {}?)",
                CONNECTIONS - 1024
            ),
        }
    }
    let mut tasks = Vec::with_capacity(CONNECTIONS);
    for (i, mut stream) in streams.into_iter().enumerate() {
        let (request, _) = probe(i, sandbox);
        tasks.push(tokio::spawn(async move {
            let exchange = async {
                // The daemon may answer (and close) before an oversized
                // body is all sent: a failed write is not the verdict.
                let _ = stream.write_all(&request).await;
                let mut raw = Vec::new();
                // A reset after the answer still leaves the answer in `raw`.
                let _ = stream.read_to_end(&mut raw).await;
                raw
            };
            match tokio::time::timeout(ANSWER_TIMEOUT, exchange).await {
                Ok(raw) => parse_answer(&raw),
                Err(_) => Outcome::Hung,
            }
        }));
    }
    let mut outcomes = Vec::with_capacity(CONNECTIONS);
    for (i, task) in tasks.into_iter().enumerate() {
        outcomes.push((i, task.await.unwrap()));
    }
    outcomes
}

/// What is wrong with connection `i`'s outcome, if anything.
fn judge(i: usize, sandbox: &str, outcome: &Outcome) -> Option<String> {
    let (_, expected) = probe(i, sandbox);
    let kind = kind_of(i);
    match (expected, outcome) {
        (_, Outcome::Hung) => Some(format!("{kind:?}: no answer and no close within {ANSWER_TIMEOUT:?}")),
        (_, Outcome::Unparsable(raw)) => {
            Some(format!("{kind:?}: an answer that is not HTTP: {:?}", String::from_utf8_lossy(raw)))
        }
        (Some((status, code)), Outcome::Answer { status: got, content_type, body }) => {
            let text = String::from_utf8_lossy(body);
            let error: Option<Value> = serde_json::from_slice(body).ok();
            let got_code = error.as_ref().and_then(|v| v["error"]["code"].as_str());
            let has_message =
                error.as_ref().and_then(|v| v["error"]["message"].as_str()).is_some_and(|m| !m.is_empty());
            (*got != status
                || got_code != Some(code)
                || !has_message
                || !content_type.starts_with("application/json"))
            .then(|| format!("{kind:?}: expected {status} {code}, got {got} ({content_type}) {text}"))
        }
        (Some(_), other) => Some(format!("{kind:?}: expected a JSON error, got {other:?}")),
        (None, Outcome::Closed) => None,
        (None, Outcome::Answer { status: 400, .. }) => None,
        (None, other) => Some(format!("{kind:?}: expected a 400 or a closed connection, got {other:?}")),
    }
}

/// Whether a SIGHUP waits for delivery to process `pid` or to one of its
/// threads (the pending masks in /proc; SIGHUP is bit 0).
fn hangup_pending(pid: i32) -> bool {
    let pending = |status: &str, field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & 1 != 0)
    };
    let process = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    pending(&process, "ShdPnd:")
        || threads
            .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
            .any(|s| pending(&s, "SigPnd:"))
}

/// Whether process `pid` runs (and is not a zombie waiting to be reaped).
fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next());
    state.is_some_and(|s| s != "Z" && s != "X")
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// (soft, hard) "Max open files" of a process, as /proc shows them.
fn nofile_limits(pid: i32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let mut fields = line["Max open files".len()..].split_whitespace();
    (fields.next().unwrap().to_owned(), fields.next().unwrap().to_owned())
}

/// Raises this process's soft limit on open files to its hard limit; the
/// hard limit, or `None` when it is too low for the test.
fn raise_own_nofile(needed: u64) -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let Rlimit { maximum, .. } = getrlimit(Resource::Nofile);
    let hard = maximum.unwrap_or(u64::MAX);
    if hard < needed {
        return None;
    }
    setrlimit(Resource::Nofile, Rlimit { current: maximum, maximum }).unwrap();
    Some(hard)
}

#[test]
fn daemon_answers_2000_concurrent_bad_requests_and_stays_whole() {
    // This process holds every client end, plus what parallel tests open.
    let hard = raise_own_nofile(CONNECTIONS as u64 + 512);
    if !require(hard.is_some(), &format!("a hard RLIMIT_NOFILE of at least {}", CONNECTIONS + 512)) {
        return;
    }
    let hard = hard.unwrap();
    let started = Instant::now();
    let soft = DAEMON_SOFT_NOFILE.min(hard);
    let d = TestDaemon::start_with("flood", move |cmd| {
        // SAFETY: the closure runs in the forked child before exec and only
        // makes the setrlimit system call (async-signal-safe), allocating
        // nothing and taking no lock.
        unsafe {
            cmd.pre_exec(move || {
                use rustix::process::{Resource, Rlimit, setrlimit};
                setrlimit(Resource::Nofile, Rlimit { current: Some(soft), maximum: Some(hard) })
                    .map_err(std::io::Error::from)
            });
        }
    });
    let pid = d.pid().unwrap();
    let (daemon_soft, daemon_hard) = nofile_limits(pid);
    assert_eq!(daemon_soft, daemon_hard, "the daemon did not raise its soft RLIMIT_NOFILE (from {soft})");

    let sandbox = "flood";
    let (status, created) =
        d.json("POST", "/v1/sandboxes", Some(json!({ "name": sandbox, "policy": "dev" })));
    assert_eq!(status, 201, "{created}\n{}", d.log());
    let exec = || {
        d.request("POST", &format!("/v1/sandboxes/{sandbox}/exec"), Some(r#"{"argv":["echo","still-here"]}"#))
    };
    let (status, body) = exec();
    assert_eq!(status, 200, "{body}");
    let (status, _) = d.request("GET", "/v1/health", None);
    assert_eq!(status, 200);
    let fds_before = open_fds(pid);

    let flooding = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let outcomes = runtime.block_on(flood(&d.socket, sandbox));
    drop(runtime);
    let flood_time = flooding.elapsed();

    let failures: Vec<String> = outcomes.iter().filter_map(|(i, o)| judge(*i, sandbox, o)).collect();
    let mut tally = std::collections::BTreeMap::<(Kind, String), usize>::new();
    for (i, outcome) in &outcomes {
        let seen = match outcome {
            Outcome::Answer { status, .. } => status.to_string(),
            Outcome::Closed => "closed".into(),
            Outcome::Hung => "hung".into(),
            Outcome::Unparsable(_) => "unparsable".into(),
        };
        *tally.entry((kind_of(*i), seen)).or_default() += 1;
    }
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} connections went wrong, e.g.:\n{}\ntally: {tally:?}\n{}",
        failures.len(),
        failures.iter().take(10).cloned().collect::<Vec<_>>().join("\n"),
        d.log()
    );
    assert_eq!(outcomes.len(), CONNECTIONS);

    // The daemon is whole: healthy, the sandbox still runs commands, and
    // every connection's descriptor is closed again.
    let (status, health) = d.json("GET", "/v1/health", None);
    assert_eq!((status, &health["status"]), (200, &json!("ok")), "{health}");
    let (status, body) = exec();
    assert_eq!(status, 200, "{body}");
    let lines: Vec<Value> =
        body.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|l| l["type"] == "stdout" && l["data"] == "c3RpbGwtaGVyZQo="), "{body}"); // "still-here\n"
    assert_eq!(lines.last().unwrap()["code"], 0, "{body}");
    let (status, inspect) = d.json("GET", &format!("/v1/sandboxes/{sandbox}"), None);
    assert_eq!((status, &inspect["state"]), (200, &json!("running")), "{inspect}");
    let mut fds_after = 0;
    let settled = wait_until(10, || {
        fds_after = open_fds(pid);
        fds_after <= fds_before + 4
    });
    assert!(settled, "the daemon holds {fds_after} descriptors, {fds_before} before the flood");
    // SIGHUP (a reload, for a daemon with a TCP listener) stops nothing.
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), rustix::process::Signal::HUP)
        .unwrap();
    // Once delivered, it has been handled, or it has ended the daemon.
    assert!(wait_until(10, || !hangup_pending(pid)), "SIGHUP was never delivered: {}", d.log());
    let (status, _) = d.request("GET", "/v1/health", None);
    assert_eq!(status, 200, "the daemon did not survive SIGHUP: {}", d.log());
    assert!(alive(pid), "the daemon did not survive SIGHUP: {}", d.log());
    let log = d.log();
    assert!(!log.contains("panicked") && !log.contains("Too many open files"), "{log}");

    let left = d.remove_all_and_settle(20);
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
    eprintln!(
        "{CONNECTIONS} bad requests answered in {:.1}s; descriptors {fds_before} → {fds_after}; \
         whole test {:.1}s; {tally:?}",
        flood_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
