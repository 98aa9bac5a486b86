//! envd's `process.Process` service: start a process (its output streamed
//! as events), connect to a running one, list them, feed their stdin,
//! signal them, resize their terminal.
//!
//! A process runs through `api::exec::run`, the native exec's own path
//! (supervisor, index, events, audit). Unlike a native exec, it outlives
//! the request that started it, as E2B's processes do: a client that goes
//! away stops receiving output, not the process, which another client can
//! `Connect` to by pid or tag until it ends (the sandbox's deadline ends it
//! at the latest). The daemon keeps the running ones in a [`Table`].

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::{Arc, Mutex};

use airlock_proto::Stream;
use airlock_runtime::supervisor::ExecControl;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};

use super::E2b;
use super::access::EnvdCaller;
use super::connect::{self, ConnectError, Message};
use crate::api::exec::{ExecBody, ExecSink, TtyArg, TtySize, exec_spec};
use crate::body::ChannelReader;

/// The routes of the service.
pub(crate) fn routes() -> axum::Router<Arc<E2b>> {
    axum::Router::new()
        .route("/process.Process/Start", post(start))
        .route("/process.Process/Connect", post(connect_to))
        .route("/process.Process/List", post(list))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/CloseStdin", post(close_stdin))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/Update", post(update))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProcessConfig {
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
}

impl ProcessConfig {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "cmd": self.cmd, "args": self.args, "envs": self.envs, "cwd": self.cwd })
    }
}

#[derive(Debug, Default, Deserialize)]
struct Pty {
    #[serde(default)]
    size: Option<PtySize>,
}

#[derive(Debug, Default, Deserialize)]
struct PtySize {
    #[serde(default)]
    cols: u32,
    #[serde(default)]
    rows: u32,
}

impl PtySize {
    fn checked(&self) -> Result<(u16, u16), ConnectError> {
        match (u16::try_from(self.rows), u16::try_from(self.cols)) {
            (Ok(rows @ 1..), Ok(cols @ 1..)) => Ok((rows, cols)),
            _ => Err(ConnectError::invalid(format!(
                "pty size {}x{} must be 1-65535 rows and columns",
                self.rows, self.cols
            ))),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct StartRequest {
    #[serde(default)]
    process: Option<ProcessConfig>,
    #[serde(default)]
    pty: Option<Pty>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    stdin: Option<bool>,
}

/// Which process: by pid or by the tag it was started with.
#[derive(Debug, Default, Deserialize)]
struct Selector {
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Selected {
    #[serde(default)]
    process: Option<Selector>,
}

#[derive(Debug, Default, Deserialize)]
struct SendInputRequest {
    #[serde(default)]
    process: Option<Selector>,
    #[serde(default)]
    input: Option<ProcessInput>,
}

#[derive(Debug, Default, Deserialize)]
struct ProcessInput {
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    pty: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct SendSignalRequest {
    #[serde(default)]
    process: Option<Selector>,
    #[serde(default)]
    signal: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct UpdateRequest {
    #[serde(default)]
    process: Option<Selector>,
    #[serde(default)]
    pty: Option<Pty>,
}

/// A running process, as the other methods reach it.
struct Proc {
    pid: u32,
    tag: Option<String>,
    config: serde_json::Value,
    control: ExecControl,
    /// Its stdin, while open (started with `stdin` or a pty).
    stdin: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    /// Its events, enveloped, for `Connect`ed clients.
    events: broadcast::Sender<Bytes>,
}

/// The running processes of every sandbox, by stored name and pid.
#[derive(Default)]
pub(crate) struct Table {
    procs: Mutex<HashMap<(String, u32), Arc<Proc>>>,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), Arc<Proc>>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn find(&self, stored: &str, selector: Option<&Selector>) -> Result<Arc<Proc>, ConnectError> {
        let Some(selector) = selector else {
            return Err(ConnectError::invalid("process: give a pid or a tag"));
        };
        let procs = self.lock();
        let found = match (selector.pid, &selector.tag) {
            (Some(pid), _) => procs.get(&(stored.to_owned(), pid)).cloned(),
            (None, Some(tag)) => procs
                .iter()
                .find(|((s, _), p)| s == stored && p.tag.as_deref() == Some(tag.as_str()))
                .map(|(_, p)| p.clone()),
            (None, None) => return Err(ConnectError::invalid("process: give a pid or a tag")),
        };
        found.ok_or_else(|| match (selector.pid, &selector.tag) {
            (Some(pid), _) => ConnectError::new("not_found", format!("process with pid {pid} not found")),
            (_, tag) => ConnectError::new("not_found", format!("process with tag {tag:?} not found")),
        })
    }
}

fn event(value: serde_json::Value) -> Bytes {
    connect::stream_message(&serde_json::json!({ "event": value }))
}

fn keepalive() -> Bytes {
    event(serde_json::json!({ "keepalive": {} }))
}

async fn start(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    headers: HeaderMap,
    message: Message<StartRequest>,
) -> Response {
    if !message.streaming {
        return connect::refuse(false, ConnectError::invalid("Start is a server-streaming method"));
    }
    match start_process(e2b, caller, &headers, message).await {
        Ok(response) => response,
        Err(e) => connect::stream_error(e),
    }
}

async fn start_process(
    e2b: Arc<E2b>,
    caller: EnvdCaller,
    headers: &HeaderMap,
    message: Message<StartRequest>,
) -> Result<Response, ConnectError> {
    let request = message.value;
    let config = request.process.ok_or_else(|| ConnectError::invalid("process: the command is required"))?;
    let tty = match &request.pty {
        Some(pty) => {
            let (rows, cols) = pty.size.as_ref().map_or(Ok((24, 80)), PtySize::checked)?;
            Some(TtyArg::Size(TtySize { rows, cols }))
        }
        None => None,
    };
    let pty = tty.is_some();
    let cwd = config.cwd.clone().filter(|c| !c.is_empty()).map(std::path::PathBuf::from);
    let body = ExecBody {
        argv: std::iter::once(config.cmd.clone()).chain(config.args.iter().cloned()).collect(),
        env: config.envs.clone(),
        cwd,
        tty,
        timeout: None,
        user: super::e2b_user(headers)?,
    };
    let spec = exec_spec(body)?;
    let target = crate::api::exec::connect(&e2b.app, caller.peer, &caller.sandbox_id).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let (stdin, stdin_rx) = match request.stdin.unwrap_or(false) || pty {
        true => {
            let (stdin_tx, stdin_rx) = mpsc::channel(16);
            (Some(stdin_tx), Some(stdin_rx))
        }
        false => (None, None),
    };
    let input = stdin_rx.map(|rx| Box::new(ChannelReader::new(rx)) as Box<dyn Read + Send>);
    let (events, _) = broadcast::channel(256);
    let control = Arc::new(Mutex::new(None::<ExecControl>));
    let mut sink = Sink {
        e2b: e2b.clone(),
        stored: caller.stored.clone(),
        tx,
        gone: false,
        events,
        pty,
        config: config.json(),
        tag: request.tag,
        stdin,
        control: control.clone(),
        pid: None,
        end: None,
    };
    tokio::task::spawn_blocking(move || {
        let app = sink.e2b.app.clone();
        let session = control.clone();
        crate::api::exec::run(
            &app,
            &target,
            &spec,
            input,
            &mut |c| *session.lock().unwrap_or_else(|p| p.into_inner()) = Some(c),
            &mut sink,
        );
        sink.finish();
    });
    Ok(connect::streamed(rx, Some((message.keepalive, keepalive()))))
}

/// Where a started process's events go: its starter's stream (while the
/// starter listens) and the `Connect`ed clients.
struct Sink {
    e2b: Arc<E2b>,
    stored: String,
    tx: mpsc::Sender<Bytes>,
    /// The starter went away: its stream gets nothing more.
    gone: bool,
    events: broadcast::Sender<Bytes>,
    pty: bool,
    config: serde_json::Value,
    tag: Option<String>,
    stdin: Option<mpsc::Sender<Vec<u8>>>,
    control: Arc<Mutex<Option<ExecControl>>>,
    pid: Option<u32>,
    /// The end event, or the error the exec broke off with.
    end: Option<Result<serde_json::Value, ConnectError>>,
}

impl Sink {
    fn send(&mut self, frame: Bytes) {
        let _ = self.events.send(frame.clone());
        if !self.gone && self.tx.blocking_send(frame).is_err() {
            self.gone = true;
        }
    }

    /// The process is over: its end goes out, and it leaves the table.
    fn finish(mut self) {
        if let Some(pid) = self.pid {
            self.e2b.processes.lock().remove(&(self.stored.clone(), pid));
        }
        let end = self.end.take().unwrap_or_else(|| {
            Err(ConnectError::new("unavailable", "the process ended without an exit status"))
        });
        match end {
            Ok(end) => {
                self.send(event(serde_json::json!({ "end": end })));
                self.send(connect::stream_end(None));
            }
            Err(e) => self.send(connect::stream_end(Some(&e))),
        }
    }
}

impl ExecSink for Sink {
    fn started(&mut self, pid: i32) {
        let pid = u32::try_from(pid).unwrap_or_default();
        self.pid = Some(pid);
        let control = self.control.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(control) = control {
            let proc = Proc {
                pid,
                tag: self.tag.clone(),
                config: self.config.clone(),
                control,
                stdin: Mutex::new(self.stdin.take()),
                events: self.events.clone(),
            };
            self.e2b.processes.lock().insert((self.stored.clone(), pid), Arc::new(proc));
        }
        self.send(event(serde_json::json!({ "start": { "pid": pid } })));
    }

    fn output(&mut self, stream: Stream, data: &[u8]) {
        let key = match (self.pty, stream) {
            (true, _) => "pty",
            (false, Stream::Stdout) => "stdout",
            (false, Stream::Stderr) => "stderr",
        };
        self.send(event(serde_json::json!({ "data": { key: connect::bytes(data) } })));
    }

    fn exited(&mut self, code: Option<i32>, signal: Option<i32>, timed_out: bool) {
        let status = match (code, signal) {
            _ if timed_out => "timed out".to_owned(),
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(9)) => "signal: killed".to_owned(),
            (None, Some(15)) => "signal: terminated".to_owned(),
            (None, Some(signal)) => format!("signal: {signal}"),
            (None, None) => "unknown".to_owned(),
        };
        self.end = Some(Ok(serde_json::json!({
            "exitCode": code.unwrap_or(-1),
            "exited": code.is_some(),
            "status": status,
        })));
    }

    fn broke(&mut self, message: &str) {
        self.end = Some(Err(ConnectError::new("unavailable", message)));
    }

    fn cancelled(&self) -> bool {
        false
    }
}

async fn connect_to(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<Selected>,
) -> Response {
    if !message.streaming {
        return connect::refuse(false, ConnectError::invalid("Connect is a server-streaming method"));
    }
    let proc = match e2b.processes.find(&caller.stored, message.value.process.as_ref()) {
        Ok(proc) => proc,
        Err(e) => return connect::stream_error(e),
    };
    let mut events = proc.events.subscribe();
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let pid = proc.pid;
    drop(proc);
    tokio::spawn(async move {
        if tx.send(event(serde_json::json!({ "start": { "pid": pid } }))).await.is_err() {
            return;
        }
        loop {
            match events.recv().await {
                Ok(frame) => {
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
                // Output this client was too slow for is skipped.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    connect::streamed(rx, Some((message.keepalive, keepalive())))
}

async fn list(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    _message: Message<serde_json::Value>,
) -> Response {
    let processes: Vec<serde_json::Value> = e2b
        .processes
        .lock()
        .iter()
        .filter(|((stored, _), _)| *stored == caller.stored)
        .map(|(_, p)| serde_json::json!({ "config": p.config, "pid": p.pid, "tag": p.tag }))
        .collect();
    connect::unary(&serde_json::json!({ "processes": processes }))
}

async fn send_input(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<SendInputRequest>,
) -> Result<Response, ConnectError> {
    let request = message.value;
    let proc = e2b.processes.find(&caller.stored, request.process.as_ref())?;
    let input = request.input.unwrap_or_default();
    let data = match (input.stdin, input.pty) {
        (Some(data), _) | (None, Some(data)) => connect::from_bytes(&data)?,
        (None, None) => return Ok(connect::unary(&serde_json::json!({}))),
    };
    let sender = proc.stdin.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(sender) = sender else {
        return Err(ConnectError::new(
            "failed_precondition",
            format!("process {}: stdin is closed, or the process was started without stdin", proc.pid),
        ));
    };
    if !data.is_empty() && sender.send(data).await.is_err() {
        return Err(ConnectError::new("not_found", format!("process with pid {} has ended", proc.pid)));
    }
    Ok(connect::unary(&serde_json::json!({})))
}

async fn close_stdin(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<Selected>,
) -> Result<Response, ConnectError> {
    let proc = e2b.processes.find(&caller.stored, message.value.process.as_ref())?;
    // The reader sees the end once the last sender is gone.
    proc.stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
    Ok(connect::unary(&serde_json::json!({})))
}

/// The signal of a `SendSignalRequest`: by name or number.
fn signal_number(signal: Option<&serde_json::Value>) -> Result<i32, ConnectError> {
    match signal {
        Some(serde_json::Value::String(name)) if name == "SIGNAL_SIGKILL" => Ok(9),
        Some(serde_json::Value::String(name)) if name == "SIGNAL_SIGTERM" => Ok(15),
        Some(serde_json::Value::Number(n)) if matches!(n.as_i64(), Some(9 | 15)) => {
            Ok(i32::try_from(n.as_i64().unwrap_or(9)).unwrap_or(9))
        }
        other => Err(ConnectError::invalid(format!("signal {other:?}: SIGNAL_SIGKILL or SIGNAL_SIGTERM"))),
    }
}

async fn send_signal(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<SendSignalRequest>,
) -> Result<Response, ConnectError> {
    let request = message.value;
    let signal = signal_number(request.signal.as_ref())?;
    let proc = e2b.processes.find(&caller.stored, request.process.as_ref())?;
    let control = proc.control.clone();
    let sent = tokio::task::spawn_blocking(move || control.signal(signal)).await;
    match sent {
        Ok(Ok(())) => Ok(connect::unary(&serde_json::json!({}))),
        _ => Err(ConnectError::new("not_found", format!("process with pid {} has ended", proc.pid))),
    }
}

async fn update(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<UpdateRequest>,
) -> Result<Response, ConnectError> {
    let request = message.value;
    let proc = e2b.processes.find(&caller.stored, request.process.as_ref())?;
    if let Some(size) = request.pty.and_then(|p| p.size) {
        let (rows, cols) = size.checked()?;
        let control = proc.control.clone();
        let sent = tokio::task::spawn_blocking(move || control.resize(rows, cols)).await;
        if !matches!(sent, Ok(Ok(()))) {
            return Err(ConnectError::new("not_found", format!("process with pid {} has ended", proc.pid)));
        }
    }
    Ok(connect::unary(&serde_json::json!({})))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(signal_number(Some(&serde_json::json!("SIGNAL_SIGKILL"))).unwrap(), 9);
        assert_eq!(signal_number(Some(&serde_json::json!(15))).unwrap(), 15);
        assert!(signal_number(Some(&serde_json::json!("SIGNAL_UNSPECIFIED"))).is_err());
        assert!(signal_number(Some(&serde_json::json!(1))).is_err());
        assert!(signal_number(None).is_err());
    }

    #[test]
    fn start_requests_read_the_canonical_json() {
        let request: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"A":"1"},"cwd":"/tmp"},"stdin":false,"pty":{"size":{"cols":100,"rows":30}},"unknownField":1}"#,
        )
        .unwrap();
        let config = request.process.unwrap();
        assert_eq!((config.cmd.as_str(), config.args.len()), ("/bin/bash", 3));
        assert_eq!(request.pty.unwrap().size.unwrap().checked().unwrap(), (30, 100));
        assert!(PtySize { cols: 0, rows: 1 }.checked().is_err());
    }
}
