//! The interactive forms of `POST /v1/sandboxes/{name}/exec`: frames both
//! ways (`proto::exec_stream`), either in a full-duplex HTTP/1.1 exchange
//! (`?stream=raw`: the request body, chunked as the client goes, starts with
//! the JSON request on one line and then carries the client's frames; the
//! answer's body carries the process's) or, for clients that cannot stream
//! a request body while reading the answer, after an upgrade (`Upgrade:
//! airlock-exec-stream`: the JSON request is the body, the answer a `101`,
//! and the connection then carries the frames). From the client: stdin,
//! resize, signal, close stdin; to it: stdout, stderr and, always last, the
//! end (the NDJSON form's `exit` or `error` object).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use airlock_proto::exec_stream as frames;
use airlock_proto::supervisor::ExecSpec;
use airlock_runtime::supervisor::ExecControl;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use axum::response::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use super::exec::{ExecBody, Output, Target, cancel_on_hangup, connect, exec_spec, run};
use crate::app::App;
use crate::auth::Peer;
use crate::body::{ChannelBody, ChannelReader};
use crate::error::ApiError;
use crate::extract::{BODY_LIMIT, JsonBody};

/// The content type of the framed interactive answer.
const STREAM_TYPE: &str = "application/vnd.airlock.exec-stream";
/// What `Upgrade:` names to switch the connection to those frames.
pub(super) const UPGRADE_PROTOCOL: &str = "airlock-exec-stream";

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

pub(super) async fn exec_raw(
    app: Arc<App>,
    peer: Peer,
    name: String,
    request: Request,
) -> Result<Response, ApiError> {
    let mut incoming = Incoming { body: request.into_body(), buf: Vec::new(), ended: false };
    let line = incoming.request_line().await?;
    let body: ExecBody = serde_json::from_slice(&line)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON request line: {e}")))?;
    let spec = exec_spec(body)?;
    let target = connect(&app, peer, &name).await?;
    let output = start_session(app, target, spec, incoming, None);
    Ok(crate::body::streamed(STREAM_TYPE, ChannelBody::new(output)))
}

/// The `Upgrade` form: the JSON request is the body, the answer is `101`,
/// and the connection then carries the same frames both ways, for clients
/// that cannot stream a request body while reading the answer.
pub(super) async fn exec_upgraded(
    app: Arc<App>,
    peer: Peer,
    name: String,
    mut request: Request,
) -> Result<Response, ApiError> {
    let on_upgrade = hyper::upgrade::on(&mut request);
    let JsonBody(body) = JsonBody::<ExecBody>::from_request(request, &app).await?;
    let spec = exec_spec(body)?;
    let target = connect(&app, peer, &name).await?;
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
        let mut output = start_session(app, target, spec, incoming, Some(gone_rx));
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
    target: Target,
    spec: ExecSpec,
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
            &target,
            &spec,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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
