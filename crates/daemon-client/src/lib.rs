//! The client side of `airlock daemon`, shared by the CLI and the MCP
//! server: finds a daemon on its socket and speaks its HTTP/JSON API
//! (docs/api.md). Blocking on the outside (its callers are synchronous),
//! a single-threaded tokio runtime inside.
//!
//! A daemon is used when one answers `GET /v1/health` within a second on
//! `$AIRLOCK_SOCKET`, or else on the daemon's default socket; otherwise the
//! callers work directly on the state directory.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How long the daemon has to answer the health check.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start the daemon client: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot reach the daemon on {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Http(#[from] hyper::Error),
    #[error("building a request for the daemon: {0}")]
    Request(#[from] hyper::http::Error),
    /// The daemon refused: `{"error": {"code", "message"}}`.
    #[error("{message}")]
    Api { status: u16, code: String, message: String },
    #[error("the daemon answered something that is not the expected JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the daemon's answer broke off: {0}")]
    Protocol(String),
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

impl DaemonError {
    /// The API's error code, for a refusal.
    pub fn code(&self) -> Option<&str> {
        match self {
            DaemonError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The socket the CLI looks for a daemon on: `$AIRLOCK_SOCKET`, else the
/// daemon's default (`/run/airlock/airlock.sock` as root,
/// `$XDG_RUNTIME_DIR/airlock/airlock.sock` otherwise).
pub fn socket_path() -> Option<PathBuf> {
    match std::env::var_os("AIRLOCK_SOCKET").filter(|s| !s.is_empty()) {
        Some(path) => Some(PathBuf::from(path)),
        None => airlock_server::default_socket().ok(),
    }
}

/// A daemon that answered its health check.
pub struct Daemon {
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl Daemon {
    /// The daemon on [`socket_path`], if one answers there within a second.
    pub fn detect() -> Option<Daemon> {
        let socket = socket_path()?;
        // No socket file: no daemon, and no need to start a runtime.
        if !socket.exists() {
            return None;
        }
        let daemon = Daemon::at(socket).ok()?;
        daemon.healthy().then_some(daemon)
    }

    pub fn at(socket: PathBuf) -> Result<Daemon, DaemonError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(DaemonError::Runtime)?;
        Ok(Daemon { socket, runtime })
    }

    fn healthy(&self) -> bool {
        let check = async {
            let response = self.send(Method::GET, "/v1/health", None).await?;
            let ok = response.status() == StatusCode::OK;
            let body = response.into_body().collect().await?.to_bytes();
            let value: Value = serde_json::from_slice(&body)?;
            Ok::<bool, DaemonError>(ok && value["status"] == "ok")
        };
        self.runtime
            .block_on(async { tokio::time::timeout(HEALTH_TIMEOUT, check).await })
            .is_ok_and(|r| r.unwrap_or(false))
    }

    /// Sends one request on a connection of its own.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response<Incoming>, DaemonError> {
        let (content_type, payload) = match body {
            Some(value) => (Some("application/json"), Bytes::from(serde_json::to_vec(value)?)),
            None => (None, Bytes::new()),
        };
        self.send_body(method, path, content_type, Full::new(payload)).await
    }

    /// Sends one request with any body (a stream, for an interactive exec)
    /// on a connection of its own.
    async fn send_body<B>(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: B,
    ) -> Result<Response<Incoming>, DaemonError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| DaemonError::Connect { socket: self.socket.clone(), source })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("daemon connection: {e}");
            }
        });
        let mut builder = Request::builder().method(method).uri(path).header(header::HOST, "airlock");
        if let Some(content_type) = content_type {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        Ok(sender.send_request(builder.body(body)?).await?)
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Streams `file` as the body of a `PUT` (`…/files`); the answer is one
    /// JSON document. The body declares the file's length, so a file that
    /// shrinks while it is read breaks the request off rather than sending
    /// a shorter file as if complete.
    pub fn put_file(&self, path: &str, file: std::fs::File) -> Result<Value, DaemonError> {
        let len = file.metadata()?.len();
        self.put(path, len, file)
    }

    /// Streams exactly `len` bytes of `source` as the body of a `PUT`; the
    /// answer is one JSON document.
    pub fn put(
        &self,
        path: &str,
        len: u64,
        mut source: impl std::io::Read + Send + 'static,
    ) -> Result<Value, DaemonError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        std::thread::spawn(move || {
            loop {
                let mut buf = vec![0u8; 256 * 1024];
                match source.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.blocking_send(buf).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let body = RequestStream { first: None, input: rx, len: Some(len) };
        self.runtime.block_on(async {
            let response = self.send_body(Method::PUT, path, Some("application/octet-stream"), body).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                return Err(refusal(status, &bytes));
            }
            Ok(serde_json::from_slice(&bytes)?)
        })
    }

    /// A `GET` whose answer is bytes (a file, a log), written to `sink` as
    /// they arrive. A refusal is an error before anything is written.
    pub fn download(&self, path: &str, sink: &mut dyn Write) -> Result<u64, DaemonError> {
        self.runtime.block_on(async {
            let response = self.send(Method::GET, path, None).await?;
            let status = response.status();
            let mut body = response.into_body();
            if !status.is_success() {
                let bytes = body.collect().await?.to_bytes();
                return Err(refusal(status, &bytes));
            }
            let mut written = 0u64;
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame?.into_data() else { continue };
                sink.write_all(&data)?;
                written += data.len() as u64;
            }
            sink.flush()?;
            Ok(written)
        })
    }

    /// An interactive exec (`?stream=raw`): sends the request line, then
    /// whatever arrives on `input` (already framed), and hands each frame of
    /// the answer to `on_frame` until the end frame, which it returns.
    pub fn exec_stream(
        &self,
        path: &str,
        request: &Value,
        input: tokio::sync::mpsc::Receiver<Vec<u8>>,
        mut on_frame: impl FnMut(u8, &[u8]) -> Result<(), DaemonError>,
    ) -> Result<Vec<u8>, DaemonError> {
        use airlock_proto::exec_stream as frames;
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        let body = RequestStream { first: Some(Bytes::from(line)), input, len: None };
        self.runtime.block_on(async {
            let response =
                self.send_body(Method::POST, path, Some("application/vnd.airlock.exec-stream"), body).await?;
            let status = response.status();
            let mut body = response.into_body();
            if !status.is_success() {
                let bytes = body.collect().await?.to_bytes();
                return Err(refusal(status, &bytes));
            }
            let mut pending = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame?.into_data() else { continue };
                pending.extend_from_slice(&data);
                while let Some((kind, payload)) = frames::take(&mut pending).map_err(DaemonError::Protocol)? {
                    if kind == frames::END {
                        return Ok(payload);
                    }
                    on_frame(kind, &payload)?;
                }
            }
            Err(DaemonError::Protocol("the exec stream ended without its end frame".into()))
        })
    }

    /// A request whose answer is one JSON document; refusals become
    /// [`DaemonError::Api`].
    pub fn json(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, DaemonError> {
        self.runtime.block_on(async {
            let response = self.send(method, path, body).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                return Err(refusal(status, &bytes));
            }
            Ok(serde_json::from_slice(&bytes)?)
        })
    }

    /// A request whose answer is a stream of lines (NDJSON, server-sent
    /// events): `on_line` gets each complete line, without its newline, as
    /// it arrives.
    pub fn lines(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        on_line: &mut dyn FnMut(&str) -> Result<(), DaemonError>,
    ) -> Result<(), DaemonError> {
        self.runtime.block_on(async {
            let response = self.send(method, path, body).await?;
            let status = response.status();
            let mut body = response.into_body();
            if !status.is_success() {
                let bytes = body.collect().await?.to_bytes();
                return Err(refusal(status, &bytes));
            }
            let mut pending: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame?.into_data() else { continue };
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let text = String::from_utf8_lossy(&line[..end]);
                    on_line(text.trim_end_matches('\r'))?;
                }
            }
            if !pending.is_empty() {
                on_line(String::from_utf8_lossy(&pending).trim_end_matches('\r'))?;
            }
            Ok(())
        })
    }
}

/// A request body produced as it goes: an interactive exec's first line and
/// then its frames, or a file's chunks; ends when every sender is gone.
struct RequestStream {
    first: Option<Bytes>,
    input: tokio::sync::mpsc::Receiver<Vec<u8>>,
    /// The exact length, when known (sent as Content-Length).
    len: Option<u64>,
}

impl hyper::body::Body for RequestStream {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if let Some(first) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(first))));
        }
        self.input.poll_recv(cx).map(|chunk| chunk.map(|c| Ok(hyper::body::Frame::data(Bytes::from(c)))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.len.map_or_else(hyper::body::SizeHint::default, hyper::body::SizeHint::with_exact)
    }
}

fn refusal(status: StatusCode, body: &[u8]) -> DaemonError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().map(|v| &v["error"]);
    let field = |name: &str| error.and_then(|e| e[name].as_str()).map(str::to_owned);
    DaemonError::Api {
        status: status.as_u16(),
        code: field("code").unwrap_or_else(|| "unknown".to_owned()),
        message: field("message").unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            format!("the daemon answered {status}: {}", text.trim())
        }),
    }
}

/// Percent-encodes a path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One server-sent event, as `GET /v1/events` frames it.
#[derive(Debug, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Reassembles server-sent events from lines.
#[derive(Default)]
pub struct SseParser {
    current: SseEvent,
    has_data: bool,
}

impl SseParser {
    /// Feeds one line; a blank line completes an event.
    pub fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let done = std::mem::take(&mut self.current);
            let had = std::mem::take(&mut self.has_data);
            return had.then_some(done);
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => self.current.id = Some(value.to_owned()),
            "event" => self.current.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn sse_events_are_reassembled_and_comments_skipped() {
        let mut p = SseParser::default();
        let mut got = Vec::new();
        for line in [": keepalive", "", "id: 4", "event: created", "data: {\"id\":4}", "", ""] {
            got.extend(p.line(line));
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id.as_deref(), Some("4"));
        assert_eq!(got[0].event.as_deref(), Some("created"));
        assert_eq!(got[0].data, "{\"id\":4}");
    }

    #[test]
    fn encode_escapes_everything_but_unreserved() {
        assert_eq!(encode("ci-42"), "ci-42");
        assert_eq!(encode("a=b c/d"), "a%3Db%20c%2Fd");
    }

    #[test]
    fn refusals_carry_the_daemons_message() {
        let e = refusal(StatusCode::CONFLICT, br#"{"error":{"code":"conflict","message":"taken"}}"#);
        assert_eq!(e.to_string(), "taken");
        assert_eq!(e.code(), Some("conflict"));
        let e = refusal(StatusCode::BAD_GATEWAY, b"nope");
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
