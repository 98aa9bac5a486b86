//! `POST /v1/sandboxes/{name}/exec`: runs a process in a running sandbox.
//!
//! Two ways to talk to it:
//!
//! * plain (the default): the body is the JSON request, the answer streams
//!   the exec's events as NDJSON, one JSON object per line:
//!
//!   ```text
//!   {"type":"started","pid":12}
//!   {"type":"stdout","data":"aGkK"}          base64, as the process wrote it
//!   {"type":"stderr","data":"..."}
//!   {"type":"exit","code":0,"signal":null,"timed_out":false}
//!   {"type":"error","message":"..."}         only if the exec broke off
//!   ```
//!
//! * interactive (`?stream=raw`, or `Upgrade: airlock-exec-stream`): stdin,
//!   a terminal, resizes and signals as frames both ways
//!   (`proto::exec_stream`); see `exec_session`.
//!
//! A client that hangs up before the end cancels the exec: its process
//! group is killed (SIGKILL) and the exec is recorded as ended by it.
//!
//! The supervisor client blocks, so the exec runs on a blocking thread and
//! hands its output to the response body through a bounded channel: a slow
//! reader slows the exec's output down rather than growing memory.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use airlock_proto::Stream;
use airlock_proto::exec_stream as frames;
use airlock_proto::supervisor::{ExecEvent, ExecSpec};
use airlock_runtime::supervisor::{ExecControl, SupervisorClient};
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use axum::response::Response;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::exec_session as session;
use super::{DurationArg, check_env};
use crate::app::App;
use crate::auth::Peer;
use crate::body::{ChannelBody, base64};
use crate::db::ExecEnd;
use crate::error::ApiError;
use crate::extract::{JsonBody, QueryPairs, SandboxName};
use crate::sandbox::{self, ApiState};

/// The terminal size of `tty: true`.
const DEFAULT_TTY: (u16, u16) = (24, 80);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    #[serde(default)]
    pub tty: Option<TtyArg>,
    pub timeout: Option<DurationArg>,
    /// `UID[:GID]` or `NAME[:GROUP]` of the sandbox; root inside by default.
    pub user: Option<String>,
}

/// `tty`: `false`, `true` (24x80) or `{"rows": R, "cols": C}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TtyArg {
    On(bool),
    Size(TtySize),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

pub fn exec_spec(body: ExecBody) -> Result<ExecSpec, ApiError> {
    let invalid = |m: String| ApiError::bad_request("invalid_request", m);
    if body.argv.is_empty() || body.argv[0].is_empty() {
        return Err(invalid("argv must name a program: [\"echo\", \"hi\"]".into()));
    }
    if body.argv.len() > 4096 || body.argv.iter().any(|a| a.contains('\0')) {
        return Err(invalid("argv: at most 4096 arguments, none containing NUL".into()));
    }
    let tty = match body.tty {
        None | Some(TtyArg::On(false)) => None,
        Some(TtyArg::On(true)) => Some(DEFAULT_TTY),
        Some(TtyArg::Size(TtySize { rows, cols })) => {
            if rows == 0 || cols == 0 {
                return Err(invalid(format!("tty: rows and cols must be at least 1, got {rows}x{cols}")));
            }
            Some((rows, cols))
        }
    };
    if let Some(cwd) = &body.cwd
        && (!cwd.is_absolute() || cwd.as_os_str().as_encoded_bytes().contains(&0))
    {
        return Err(invalid(format!("cwd {} must be an absolute path", cwd.display())));
    }
    if let Some(user) = &body.user {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':');
        if user.is_empty() || user.len() > 64 || !user.chars().all(allowed) || user.matches(':').count() > 1 {
            return Err(invalid(format!(
                "user {user:?} must be UID[:GID] or NAME[:GROUP] (letters, digits, '_', '-', '.')"
            )));
        }
    }
    Ok(ExecSpec {
        argv: body.argv,
        env: check_env(&body.env)?,
        cwd: body.cwd,
        timeout_secs: body
            .timeout
            .as_ref()
            .map(|t| t.get("timeout"))
            .transpose()?
            .map(|d| d.as_secs().max(1)),
        tty,
        user: body.user,
    })
}

/// Whether the query asks for the interactive, framed exchange.
fn raw_mode(query: &QueryPairs) -> Result<bool, ApiError> {
    query.only(&["stream"])?;
    match query.0.iter().rev().find(|(k, _)| k == "stream").map(|(_, v)| v.as_str()) {
        None | Some("ndjson") => Ok(false),
        Some("raw") => Ok(true),
        Some(other) => Err(ApiError::bad_request(
            "invalid_query",
            format!("stream must be raw or ndjson, got {other:?}"),
        )),
    }
}

pub async fn exec(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
    request: Request,
) -> Result<Response, ApiError> {
    let upgrade = request.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    match upgrade {
        Some(protocol) if protocol.eq_ignore_ascii_case(session::UPGRADE_PROTOCOL) => {
            query.only(&[])?;
            return session::exec_upgraded(app, peer, name, request).await;
        }
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_upgrade",
                format!(
                    "Upgrade: {other} is not offered; exec upgrades only to {}",
                    session::UPGRADE_PROTOCOL
                ),
            ));
        }
        None => {}
    }
    if raw_mode(&query)? {
        return session::exec_raw(app, peer, name, request).await;
    }
    let JsonBody(body) = JsonBody::<ExecBody>::from_request(request, &app).await?;
    let spec = exec_spec(body)?;
    let target = connect(&app, peer, &name).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let (control_tx, control_rx) = watch::channel(None);
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let cancelled = Arc::new(AtomicBool::new(false));
    let output = tx.clone();
    let gone = async move { output.closed().await };
    tokio::spawn(cancel_on_hangup(gone, control_rx, done_rx, cancelled.clone()));
    let worker = app.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Output { tx: &tx, gone: false, raw: false, cancelled };
        run(&worker, &target, &spec, None, &mut |control| _ = control_tx.send(Some(control)), &mut out);
        let _ = done_tx.send(());
    });
    Ok(crate::body::streamed("application/x-ndjson", ChannelBody::new(rx)))
}

/// A running sandbox the caller may run processes in: its supervisor, its
/// owner and its stored name (for the index and the event log).
pub(crate) struct Target {
    pub client: SupervisorClient,
    pub owner: u32,
    pub stored: String,
}

/// Checks the caller may run processes in `name` (execs, and the files
/// API's operations) and reaches its supervisor.
pub(crate) async fn connect(app: &Arc<App>, peer: Peer, name: &str) -> Result<Target, ApiError> {
    let target = name.to_string();
    app.blocking(move |app| {
        let loaded = sandbox::authorize(app, &peer, &target)?;
        if loaded.state != ApiState::Running {
            return Err(ApiError::conflict(
                "not_running",
                format!("sandbox {target} is not running (state: {})", loaded.state.as_str()),
            ));
        }
        let client = SupervisorClient::connect(&loaded.dir).map_err(|e| {
            ApiError::conflict(
                "not_managed",
                format!("sandbox {target} has no supervisor to run processes ({e})"),
            )
        })?;
        Ok(Target { client, owner: loaded.owner_uid, stored: loaded.name().to_owned() })
    })
    .await
}

/// An exec whose client hung up is killed (its whole process group): no one
/// is left to read its output or end it, and an agent that gave up on a
/// request expects the work to stop with it.
pub(super) async fn cancel_on_hangup(
    gone: impl Future<Output = ()>,
    mut control: watch::Receiver<Option<ExecControl>>,
    done: oneshot::Receiver<()>,
    cancelled: Arc<AtomicBool>,
) {
    let hung_up = async {
        gone.await;
        control.wait_for(Option::is_some).await.ok().and_then(|c| c.clone())
    };
    tokio::select! {
        control = hung_up => {
            if let Some(control) = control {
                tracing::info!("an exec's client hung up; killing the process");
                cancelled.store(true, Ordering::SeqCst);
                let _ = tokio::task::spawn_blocking(move || control.signal(super::SIGKILL)).await;
            }
        }
        _ = done => {}
    }
}

/// Where the exec's output goes: NDJSON lines or frames.
pub(super) struct Output<'a> {
    pub tx: &'a mpsc::Sender<Bytes>,
    pub gone: bool,
    pub raw: bool,
    /// Set when the client hung up and the process was killed for it.
    pub cancelled: Arc<AtomicBool>,
}

impl Output<'_> {
    fn send(&mut self, chunk: Vec<u8>) {
        // The reader hung up: the rest of the output is dropped while
        // `cancel_on_hangup` kills the process.
        if !self.gone && self.tx.blocking_send(Bytes::from(chunk)).is_err() {
            self.gone = true;
        }
    }

    fn json(&mut self, value: &serde_json::Value) {
        if self.raw {
            return self.frame(frames::END, value.to_string().as_bytes());
        }
        let mut line = value.to_string().into_bytes();
        line.push(b'\n');
        self.send(line);
    }

    fn frame(&mut self, kind: u8, payload: &[u8]) {
        for frame in frames::encode_chunked(kind, payload) {
            self.send(frame);
        }
    }
}

/// Where [`run`] sends what an exec does, whatever the front end: the
/// native API's NDJSON lines or frames, or the E2B API's Connect events.
pub(crate) trait ExecSink {
    fn started(&mut self, pid: i32);
    fn output(&mut self, stream: Stream, data: &[u8]);
    fn exited(&mut self, code: Option<i32>, signal: Option<i32>, timed_out: bool);
    /// The exec broke off (the sandbox stopped, the supervisor failed).
    fn broke(&mut self, message: &str);
    /// Whether the client hung up and the process was killed for it.
    fn cancelled(&self) -> bool;
}

impl ExecSink for Output<'_> {
    fn started(&mut self, pid: i32) {
        if !self.raw {
            self.json(&serde_json::json!({ "type": "started", "pid": pid }));
        }
    }

    fn output(&mut self, stream: Stream, data: &[u8]) {
        if self.raw {
            let kind = match stream {
                Stream::Stdout => frames::STDOUT,
                Stream::Stderr => frames::STDERR,
            };
            return self.frame(kind, data);
        }
        let kind = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        self.json(&serde_json::json!({ "type": kind, "data": base64(data) }));
    }

    fn exited(&mut self, code: Option<i32>, signal: Option<i32>, timed_out: bool) {
        self.json(
            &serde_json::json!({ "type": "exit", "code": code, "signal": signal, "timed_out": timed_out }),
        );
    }

    fn broke(&mut self, message: &str) {
        self.json(&serde_json::json!({ "type": "error", "message": message }));
    }

    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

/// The blocking half: runs the exec, sends its output, records it.
pub(crate) fn run(
    app: &App,
    target: &Target,
    spec: &ExecSpec,
    input: Option<Box<dyn Read + Send>>,
    session: &mut dyn FnMut(ExecControl),
    out: &mut dyn ExecSink,
) {
    let (client, owner, name) = (&target.client, target.owner, target.stored.as_str());
    app.metrics.count_exec(owner);
    // The index keeps argv as the audit log does: secret values redacted.
    let argv = crate::redact::texts(client, &spec.argv);
    let ts = airlock_runtime::now_rfc3339();
    let id = app
        .db
        .exec_started(name, &argv, None, &ts)
        .map_err(|e| tracing::warn!(error = %e, "could not index an exec"))
        .ok();
    app.record_event(Some(name), Some(owner), "exec_started", serde_json::json!({ "argv": argv }));
    let mut end = ExecEnd { code: None, signal: None, timed_out: false };
    let result = client.exec_session(
        spec,
        input,
        &mut |event| match event {
            ExecEvent::Started { pid } => {
                if let Some(id) = id {
                    let _ = app.db.exec_pid(id, pid);
                }
                out.started(pid);
            }
            ExecEvent::Output { stream, data } => out.output(stream, &data),
            ExecEvent::Exited { code, signal, timed_out } => {
                end = ExecEnd { code, signal, timed_out };
                out.exited(code, signal, timed_out);
            }
        },
        session,
    );
    let error = result.err().map(|e| e.to_string());
    if let Some(message) = &error {
        out.broke(message);
    }
    let ended = airlock_runtime::now_rfc3339();
    if let Some(id) = id
        && let Err(e) = app.db.exec_ended(id, end, &ended)
    {
        tracing::warn!(error = %e, "could not index the end of an exec");
    }
    app.record_event(
        Some(name),
        Some(owner),
        "exec_ended",
        serde_json::json!({
            "argv": argv,
            "code": end.code,
            "signal": end.signal,
            "timed_out": end.timed_out,
            "error": error,
            "cancelled": out.cancelled(),
        }),
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn body(json: &str) -> Result<ExecSpec, ApiError> {
        exec_spec(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn exec_requests_are_checked() {
        let spec = body(r#"{"argv":["echo","hi"],"env":{"A":"1"},"cwd":"/tmp","timeout":"5s"}"#).unwrap();
        assert_eq!(spec.argv, ["echo", "hi"]);
        assert_eq!(spec.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(spec.timeout_secs, Some(5));
        assert_eq!(spec.tty, None);
        assert_eq!(body(r#"{"argv":[]}"#).unwrap_err().code, "invalid_request");
        assert_eq!(body(r#"{"argv":[""]}"#).unwrap_err().code, "invalid_request");
        assert_eq!(body(r#"{"argv":["a\u0000b"]}"#).unwrap_err().code, "invalid_request");
        assert_eq!(body(r#"{"argv":["sh"],"cwd":"rel"}"#).unwrap_err().code, "invalid_request");
        assert!(serde_json::from_str::<ExecBody>(r#"{"argv":["sh"],"stdin":"x"}"#).is_err());
        assert_eq!(body(r#"{"argv":["id"],"user":"1000:50"}"#).unwrap().user.as_deref(), Some("1000:50"));
        assert_eq!(body(r#"{"argv":["id"],"user":"nobody"}"#).unwrap().user.as_deref(), Some("nobody"));
        for bad in ["", "a b", "a:b:c", "../x", r"x\u0000"] {
            let json = format!(r#"{{"argv":["id"],"user":"{bad}"}}"#);
            assert_eq!(body(&json).unwrap_err().code, "invalid_request", "{bad:?}");
        }
    }

    #[test]
    fn tty_takes_a_flag_or_a_size() {
        assert_eq!(body(r#"{"argv":["sh"],"tty":false}"#).unwrap().tty, None);
        assert_eq!(body(r#"{"argv":["sh"],"tty":true}"#).unwrap().tty, Some((24, 80)));
        assert_eq!(body(r#"{"argv":["sh"],"tty":{"rows":30,"cols":100}}"#).unwrap().tty, Some((30, 100)));
        assert_eq!(
            body(r#"{"argv":["sh"],"tty":{"rows":0,"cols":100}}"#).unwrap_err().code,
            "invalid_request"
        );
        assert!(serde_json::from_str::<ExecBody>(r#"{"argv":["sh"],"tty":{"rows":1}}"#).is_err());
        assert!(serde_json::from_str::<ExecBody>(r#"{"argv":["sh"],"tty":"yes"}"#).is_err());
    }

    #[test]
    fn the_stream_query_picks_the_mode() {
        let q = |s: &str| raw_mode(&QueryPairs(serde_urlencoded::from_str(s).unwrap()));
        assert!(!q("").unwrap());
        assert!(!q("stream=ndjson").unwrap());
        assert!(q("stream=raw").unwrap());
        assert_eq!(q("stream=ws").unwrap_err().code, "invalid_query");
        assert_eq!(q("other=1").unwrap_err().code, "invalid_query");
    }
}
