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
//! * interactive (`?stream=raw`): a full-duplex HTTP/1.1 exchange. The
//!   request body (chunked, sent as the client goes) starts with the JSON
//!   request on one line, then carries frames from the client; the answer's
//!   body carries frames to the client. A frame is one type byte, a 4-byte
//!   big-endian payload length and the payload. From the client: 0 stdin
//!   bytes, 4 resize (rows u16, cols u16, big-endian), 5 signal (i32
//!   big-endian), 6 close stdin; the end of the request body closes stdin
//!   too. To the client: 1 stdout, 2 stderr (with a TTY all output is
//!   stdout), 3 the end: the same JSON as the NDJSON `exit` (or `error`)
//!   line, always the last frame.
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
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use super::{DurationArg, check_env};
use crate::app::App;
use crate::auth::Peer;
use crate::body::{ChannelBody, ChannelReader, base64};
use crate::db::ExecEnd;
use crate::error::ApiError;
use crate::extract::{BODY_LIMIT, JsonBody, QueryPairs, SandboxName};
use crate::sandbox::{self, ApiState};

/// The terminal size of `tty: true`.
const DEFAULT_TTY: (u16, u16) = (24, 80);
/// The content type of the framed interactive answer.
const STREAM_TYPE: &str = "application/vnd.airlock.exec-stream";
/// What `Upgrade:` names to switch the connection to those frames.
const UPGRADE_PROTOCOL: &str = "airlock-exec-stream";

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
        transfer: false,
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
        Some(protocol) if protocol.eq_ignore_ascii_case(UPGRADE_PROTOCOL) => {
            query.only(&[])?;
            return exec_upgraded(app, peer, name, request).await;
        }
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_upgrade",
                format!("Upgrade: {other} is not offered; exec upgrades only to {UPGRADE_PROTOCOL}"),
            ));
        }
        None => {}
    }
    if raw_mode(&query)? {
        return exec_raw(app, peer, name, request).await;
    }
    let JsonBody(body) = JsonBody::<ExecBody>::from_request(request, &app).await?;
    let spec = exec_spec(body)?;
    let client = connect(&app, peer, &name).await?;
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
        run(
            &worker,
            &client,
            &spec,
            &name,
            None,
            &mut |control| _ = control_tx.send(Some(control)),
            &mut out,
        );
        let _ = done_tx.send(());
    });
    Ok(crate::body::streamed("application/x-ndjson", ChannelBody::new(rx)))
}

/// Checks the caller may exec in `name` and reaches its supervisor; also
/// answers the sandbox's owner.
async fn connect(app: &Arc<App>, peer: Peer, name: &str) -> Result<(SupervisorClient, u32), ApiError> {
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
        Ok((client, loaded.owner_uid))
    })
    .await
}

/// The request body as it arrives, with what has been read but not used.
struct Incoming {
    body: Body,
    buf: Vec<u8>,
    ended: bool,
}

impl Incoming {
    /// Reads one more chunk into `buf`; false at the end of the body.
    async fn fill(&mut self) -> Result<bool, ApiError> {
        while !self.ended {
            let frame = std::future::poll_fn(|cx| {
                http_body::Body::poll_frame(std::pin::Pin::new(&mut self.body), cx)
            })
            .await;
            match frame {
                None => self.ended = true,
                Some(Err(e)) => {
                    return Err(ApiError::bad_request("invalid_body", format!("reading the request: {e}")));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        self.buf.extend_from_slice(&data);
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// The JSON request: the body up to its first newline.
    async fn request_line(&mut self) -> Result<Vec<u8>, ApiError> {
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf[..at].to_vec();
                self.buf.drain(..=at);
                return Ok(line);
            }
            if self.buf.len() > BODY_LIMIT {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the exec request line is longer than {BODY_LIMIT} bytes"),
                ));
            }
            if !self.fill().await? {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "the body must start with the exec request as one line of JSON",
                ));
            }
        }
    }

    /// The next client frame; `None` at the end of the body.
    async fn frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, BodyBroke> {
        loop {
            if let Some(frame) = frames::take(&mut self.buf).map_err(BodyBroke::Malformed)? {
                return Ok(Some(frame));
            }
            match self.fill().await {
                Ok(true) => {}
                Ok(false) if self.buf.is_empty() => return Ok(None),
                Ok(false) => return Err(BodyBroke::Malformed("the body ended inside a frame".into())),
                Err(e) => return Err(BodyBroke::Lost(e.message)),
            }
        }
    }
}

/// Why an interactive exec's request body stopped early.
#[derive(Debug)]
enum BodyBroke {
    /// The connection failed or closed mid-body: the client is gone.
    Lost(String),
    /// Something that is not a frame: stdin is closed, the rest ignored.
    Malformed(String),
}

async fn exec_raw(app: Arc<App>, peer: Peer, name: String, request: Request) -> Result<Response, ApiError> {
    let mut incoming = Incoming { body: request.into_body(), buf: Vec::new(), ended: false };
    let line = incoming.request_line().await?;
    let body: ExecBody = serde_json::from_slice(&line)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON request line: {e}")))?;
    let spec = exec_spec(body)?;
    let client = connect(&app, peer, &name).await?;
    let output = start_session(app, client, spec, name, incoming, None);
    Ok(crate::body::streamed(STREAM_TYPE, ChannelBody::new(output)))
}

/// The `Upgrade` form: the JSON request is the body, the answer is `101`,
/// and the connection then carries the same frames both ways, for clients
/// that cannot stream a request body while reading the answer.
async fn exec_upgraded(
    app: Arc<App>,
    peer: Peer,
    name: String,
    mut request: Request,
) -> Result<Response, ApiError> {
    let on_upgrade = hyper::upgrade::on(&mut request);
    let JsonBody(body) = JsonBody::<ExecBody>::from_request(request, &app).await?;
    let spec = exec_spec(body)?;
    let client = connect(&app, peer, &name).await?;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!(error = %e, "an exec upgrade did not happen"),
        };
        let (mut reader, mut writer) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
        let (chunks, chunks_rx) = mpsc::channel::<Bytes>(16);
        let (gone_tx, gone_rx) = oneshot::channel::<()>();
        // The connection's end is the client's: a clean end of input is a
        // close-stdin frame, so end of stream means the client is gone.
        let read = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = gone_tx.send(());
                        return;
                    }
                    Ok(n) => {
                        if chunks.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let incoming =
            Incoming { body: Body::new(ChannelBody::new(chunks_rx)), buf: Vec::new(), ended: false };
        let mut output = start_session(app, client, spec, name, incoming, Some(gone_rx));
        while let Some(chunk) = output.recv().await {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
        read.abort();
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, UPGRADE_PROTOCOL)
        .body(Body::empty())
        .map_err(|e| ApiError::internal(format!("building the upgrade answer: {e}")))
}

/// Runs an interactive exec fed by `incoming`'s frames and answers the
/// channel its output frames arrive on. The exec is killed when the client
/// is gone: its output cannot be delivered, its frames broke off, or
/// `client_gone` fires.
fn start_session(
    app: Arc<App>,
    client: (SupervisorClient, u32),
    spec: ExecSpec,
    name: String,
    incoming: Incoming,
    client_gone: Option<oneshot::Receiver<()>>,
) -> mpsc::Receiver<Bytes> {
    let (stdin_tx, stdin_rx) = mpsc::channel::<Vec<u8>>(16);
    let (control_tx, control_rx) = watch::channel(None);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let (hangup_done_tx, hangup_done_rx) = oneshot::channel::<()>();
    let (lost_tx, lost_rx) = oneshot::channel::<()>();
    let cancelled = Arc::new(AtomicBool::new(false));
    // Gone is any of: the output cannot be delivered, the request body
    // broke off (a silent process gives the output nothing to fail on), or
    // the caller saw the connection end.
    let output = tx.clone();
    let gone = async move {
        let told = async {
            // A sender dropped unused means nothing: wait on.
            let seen = match client_gone {
                Some(rx) => rx.await.is_ok(),
                None => false,
            };
            if !seen {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = output.closed() => {}
            Ok(()) = lost_rx => {}
            _ = told => {}
        }
    };
    tokio::spawn(cancel_on_hangup(gone, control_rx.clone(), hangup_done_rx, cancelled.clone()));
    tokio::task::spawn_blocking(move || {
        let input = ChannelReader::new(stdin_rx);
        let mut out = Output { tx: &tx, gone: false, raw: true, cancelled };
        run(
            &app,
            &client,
            &spec,
            &name,
            Some(Box::new(input)),
            &mut |control| _ = control_tx.send(Some(control)),
            &mut out,
        );
        let _ = done_tx.send(());
        let _ = hangup_done_tx.send(());
    });
    tokio::spawn(async move {
        // Once the exec is over, the rest of the body is not wanted: dropping
        // it (and the stdin sender) also ends the supervisor client's
        // stdin thread.
        tokio::select! {
            result = pump(incoming, stdin_tx, control_rx) => match result {
                Ok(()) => {}
                Err(BodyBroke::Lost(message)) => {
                    tracing::debug!(%message, "an interactive exec's client went away");
                    let _ = lost_tx.send(());
                }
                Err(BodyBroke::Malformed(message)) => {
                    tracing::debug!(%message, "an interactive exec's request body is malformed");
                }
            },
            _ = done_rx => {}
        }
    });
    rx
}

/// Hands the client's frames to the exec until the body ends (or a frame is
/// malformed: stdin is closed then and the rest of the body ignored).
async fn pump(
    mut incoming: Incoming,
    stdin: mpsc::Sender<Vec<u8>>,
    mut control_rx: watch::Receiver<Option<ExecControl>>,
) -> Result<(), BodyBroke> {
    let mut stdin = Some(stdin);
    let mut control: Option<ExecControl> = None;
    let mut control_gone = false;
    while let Some((kind, payload)) = incoming.frame().await? {
        match kind {
            frames::STDIN => {
                // Stdin already closed, or the exec is over: dropped.
                if let Some(tx) = &stdin
                    && !payload.is_empty()
                    && tx.send(payload).await.is_err()
                {
                    stdin = None;
                }
            }
            frames::CLOSE_STDIN => stdin = None,
            frames::RESIZE | frames::SIGNAL => {
                let order = match (kind, payload.as_slice()) {
                    (frames::RESIZE, [r0, r1, c0, c1]) => {
                        Order::Resize(u16::from_be_bytes([*r0, *r1]), u16::from_be_bytes([*c0, *c1]))
                    }
                    (frames::SIGNAL, [a, b, c, d]) => Order::Signal(i32::from_be_bytes([*a, *b, *c, *d])),
                    _ => {
                        return Err(BodyBroke::Malformed(format!(
                            "frame type {kind} needs a 4-byte payload, got {}",
                            payload.len()
                        )));
                    }
                };
                if control.is_none() && !control_gone {
                    control = control_rx.wait_for(Option::is_some).await.ok().and_then(|c| c.clone());
                    control_gone = control.is_none();
                }
                // No control: the exec never started or is over.
                if let Some(ctl) = control.clone() {
                    let sent = tokio::task::spawn_blocking(move || match order {
                        Order::Resize(rows, cols) => ctl.resize(rows, cols),
                        Order::Signal(signal) => ctl.signal(signal),
                    })
                    .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        control = None;
                        control_gone = true;
                    }
                }
            }
            other => return Err(BodyBroke::Malformed(format!("unknown frame type {other}"))),
        }
    }
    Ok(())
}

enum Order {
    Resize(u16, u16),
    Signal(i32),
}

/// An exec whose client hung up is killed (its whole process group): no one
/// is left to read its output or end it, and an agent that gave up on a
/// request expects the work to stop with it.
async fn cancel_on_hangup(
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
struct Output<'a> {
    tx: &'a mpsc::Sender<Bytes>,
    gone: bool,
    raw: bool,
    /// Set when the client hung up and the process was killed for it.
    cancelled: Arc<AtomicBool>,
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
}

/// The blocking half: runs the exec, sends its output, records it.
fn run(
    app: &App,
    (client, owner): &(SupervisorClient, u32),
    spec: &ExecSpec,
    name: &str,
    input: Option<Box<dyn Read + Send>>,
    session: &mut dyn FnMut(ExecControl),
    out: &mut Output<'_>,
) {
    let owner = *owner;
    app.metrics.count_exec();
    let ts = airlock_runtime::now_rfc3339();
    let id = app
        .db
        .exec_started(name, &spec.argv, None, &ts)
        .map_err(|e| tracing::warn!(error = %e, "could not index an exec"))
        .ok();
    app.record_event(Some(name), Some(owner), "exec_started", serde_json::json!({ "argv": spec.argv }));
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
                out.json(
                    &serde_json::json!({ "type": "exit", "code": code, "signal": signal, "timed_out": timed_out }),
                );
            }
        },
        session,
    );
    let error = result.err().map(|e| e.to_string());
    if let Some(message) = &error {
        out.json(&serde_json::json!({ "type": "error", "message": message }));
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
            "argv": spec.argv,
            "code": end.code,
            "signal": end.signal,
            "timed_out": end.timed_out,
            "error": error,
            "cancelled": out.cancelled.load(Ordering::SeqCst),
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

    #[tokio::test]
    async fn client_frames_are_parsed_across_chunks() {
        let mut bytes = b"{\"argv\":[\"sh\"]}\n".to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 0, 3, b'a', b'b', b'c', 4, 0, 0, 0, 4, 0, 30, 0, 100]);
        let mut incoming = Incoming { body: Body::from(bytes), buf: Vec::new(), ended: false };
        assert_eq!(incoming.request_line().await.unwrap(), b"{\"argv\":[\"sh\"]}");
        assert_eq!(incoming.frame().await.unwrap(), Some((0, b"abc".to_vec())));
        assert_eq!(incoming.frame().await.unwrap(), Some((4, vec![0, 30, 0, 100])));
        assert_eq!(incoming.frame().await.unwrap(), None);
        let mut cut = Incoming { body: Body::from(vec![0u8, 0, 0, 0, 9, 1]), buf: Vec::new(), ended: false };
        assert!(cut.frame().await.is_err());
    }
}
