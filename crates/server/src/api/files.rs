//! Files inside a running sandbox, and the artifacts of any sandbox:
//!
//! - `GET    /v1/sandboxes/{name}/files?path=/abs` — a regular file's bytes;
//! - `PUT    /v1/sandboxes/{name}/files?path=/abs[&mode=0644]` — writes the body there;
//! - `DELETE /v1/sandboxes/{name}/files?path=/abs[&recursive=true]` — removes it;
//! - `GET    /v1/sandboxes/{name}/files/list?path=/abs/dir[&depth=N&max_entries=N]`;
//! - `GET    /v1/sandboxes/{name}/files/stat?path=/abs` — one entry;
//! - `POST   /v1/sandboxes/{name}/files/mkdir?path=/abs[&parents=true&mode=0755]`;
//! - `POST   /v1/sandboxes/{name}/files/rename?from=/abs&to=/abs[&replace=false]`;
//! - `GET    /v1/sandboxes/{name}/files/watch?path=/abs/dir[&recursive=true]` — NDJSON events;
//! - `GET    /v1/sandboxes/{name}/artifacts` — the captured artifacts as a tar stream.
//!
//! The file operations never touch the host's filesystem: each is a typed
//! operation (`runtime::files`) the sandbox's agent carries out in the
//! sandbox's own view, through its supervisor, so a path means what it
//! means to the sandbox's own processes and nothing outside the sandbox's
//! view can be named; nothing needs a program inside the sandbox. Names
//! that come back are untrusted bytes: exact in `*_b64` fields when they
//! are not UTF-8.
//!
//! The artifacts are files the daemon itself wrote into the state directory;
//! they are walked without following symlinks and sent as a ustar archive.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use airlock_proto::file::FileKind;
use airlock_runtime::files::view::{Entry, WatchLine, entry};
use airlock_runtime::files::{self, FailureKind, FilesError};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use http_body::Frame;
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::app::App;
use crate::auth::Peer;
use crate::body::{ChannelBody, ChannelReader};
use crate::error::ApiError;
use crate::extract::{QueryPairs, SandboxName};
use crate::sandbox;

/// Largest body `PUT .../files` accepts. It is streamed into the sandbox,
/// never held in memory; the sandbox's own disk limit usually ends it first.
pub const FILE_LIMIT: u64 = 4 << 30;

/// A path query parameter: absolute, no NUL, at most 4096 bytes.
fn path_param(query: &QueryPairs, key: &str) -> Result<String, ApiError> {
    let invalid = |m: String| ApiError::bad_request("invalid_path", m);
    let path = query.get(key).ok_or_else(|| invalid(format!("the {key} query parameter is required")))?;
    if !path.starts_with('/') {
        return Err(invalid(format!("{key} {path:?} must be absolute")));
    }
    if path.contains('\0') || path.len() > files::PATH_MAX_BYTES {
        return Err(invalid(format!("{key} must be at most 4096 bytes without NUL")));
    }
    Ok(path.to_owned())
}

/// The `path` query parameter, the only one `known` besides the others.
fn query_path(query: &QueryPairs, known: &[&str]) -> Result<String, ApiError> {
    query.only(known)?;
    path_param(query, "path")
}

/// A numeric query parameter within `range`, `None` when absent; `mode`
/// takes octal (`0644`, `644`).
fn number_param(query: &QueryPairs, key: &str, octal: bool, max: u32) -> Result<Option<u32>, ApiError> {
    let Some(text) = query.get(key) else { return Ok(None) };
    let parsed = if octal { u32::from_str_radix(text.trim_start_matches("0o"), 8) } else { text.parse() };
    match parsed {
        Ok(n) if n <= max => Ok(Some(n)),
        _ => Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "{key}={text:?}: expected {} at most {}",
                if octal { "octal bits" } else { "a number" },
                if octal { format!("{max:o}") } else { max.to_string() }
            ),
        )),
    }
}

/// The API's answer to a file operation that failed.
pub(crate) fn refusal(e: FilesError) -> ApiError {
    let message = e.to_string();
    let (status, code) = match (&e, e.kind()) {
        (_, FailureKind::BadRequest) => (StatusCode::BAD_REQUEST, "invalid_path"),
        (_, FailureKind::NotFound) => (StatusCode::NOT_FOUND, "file_not_found"),
        (_, FailureKind::WrongType) => (StatusCode::UNPROCESSABLE_ENTITY, "wrong_file_type"),
        (FilesError::NotEmpty { .. }, FailureKind::Conflict) => (StatusCode::CONFLICT, "not_empty"),
        (_, FailureKind::Conflict) => (StatusCode::CONFLICT, "file_exists"),
        (_, FailureKind::TooLarge) => (StatusCode::UNPROCESSABLE_ENTITY, "file_too_large"),
        (_, FailureKind::NotRunning) => (StatusCode::CONFLICT, "not_running"),
        (_, FailureKind::Host) => return ApiError::internal(message),
        (_, FailureKind::Failed) => (StatusCode::UNPROCESSABLE_ENTITY, "file_error"),
    };
    ApiError::new(status, code, message)
}

/// What the blocking reader of `GET .../files` sends the response body.
enum Chunk {
    /// The file is open and regular: the answer can start.
    Opened,
    Data(Bytes),
    End(Result<u64, FilesError>),
}

#[derive(Debug, thiserror::Error)]
#[error("reading the file broke off: {0}")]
struct ReadBrokeOff(String);

/// The streamed bytes of a file; an error ends the response abnormally, so
/// a client never mistakes a cut-off file for a whole one.
struct FileBody {
    rx: mpsc::Receiver<Chunk>,
    done: bool,
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = ReadBrokeOff;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReadBrokeOff>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            return match self.rx.poll_recv(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Chunk::Opened)) => continue,
                Poll::Ready(Some(Chunk::Data(bytes))) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Poll::Ready(Some(Chunk::End(result))) => {
                    self.done = true;
                    match result {
                        Ok(_) => Poll::Ready(None),
                        Err(e) => Poll::Ready(Some(Err(ReadBrokeOff(e.to_string())))),
                    }
                }
                Poll::Ready(None) => {
                    self.done = true;
                    Poll::Ready(Some(Err(ReadBrokeOff("the reader ended without a status".into()))))
                }
            };
        }
    }
}

/// Hands the bytes of a read to the response body, chunk by chunk; fails
/// (and so ends the read) once the client has hung up.
struct ChunkSender<'a>(&'a mpsc::Sender<Chunk>);

impl Write for ChunkSender<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Chunk::Data(Bytes::copy_from_slice(data)))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `GET /v1/sandboxes/{name}/files?path=…`: a regular file, read by the
/// sandbox's agent (the last component is not followed if it is a link; a
/// FIFO, device, socket or directory is refused; at most the sandbox's disk
/// budget), streamed as it is read.
pub async fn read(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let path = query_path(&query, &["path"])?;
    let target = super::exec::connect(&app, peer, &name).await?;
    stream_file(&app, target, path).await
}

/// Streams the regular file at `path` of `target` as the answer, once it
/// is known to be readable; also the E2B API's `GET /files`.
pub(crate) async fn stream_file(
    app: &Arc<App>,
    target: super::exec::Target,
    path: String,
) -> Result<Response, ApiError> {
    let super::exec::Target { client, owner, stored } = target;
    let (tx, mut rx) = mpsc::channel::<Chunk>(16);
    let source = path.clone();
    let recorder = client.clone();
    tokio::task::spawn_blocking(move || {
        let opened = tx.clone();
        let result = files::read_file(
            &client,
            &source,
            None,
            &mut |_| opened.blocking_send(Chunk::Opened).map_err(|_| io::ErrorKind::BrokenPipe.into()),
            &mut ChunkSender(&tx),
        );
        let _ = tx.blocking_send(Chunk::End(result));
    });
    // Nothing is promised until the file is known to be readable: a
    // missing file is a 404, a FIFO a 422, not a 200 that breaks off.
    match rx.recv().await {
        Some(Chunk::Opened) => {}
        Some(Chunk::End(Err(e))) => return Err(refusal(e)),
        Some(Chunk::Data(_) | Chunk::End(Ok(_))) | None => {
            return Err(ApiError::internal("the file reader ended without opening the file"));
        }
    }
    app.record_redacted(recorder, stored, owner, "file_read", serde_json::json!({ "path": path })).await;
    Ok(crate::body::streamed("application/octet-stream", FileBody { rx, done: false }))
}

/// Feeds the request body to the writer, refusing more than `limit` bytes;
/// answers how many bytes the whole body had. Stops early, without an
/// error, when the writer stops reading (its end says why).
async fn pump_body(mut body: Body, chunks: mpsc::Sender<Vec<u8>>, limit: u64) -> Result<u64, ApiError> {
    use http_body::Body as _;
    let mut total = 0u64;
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => return Ok(total),
            Some(Err(e)) => {
                return Err(ApiError::bad_request("invalid_body", format!("reading the body: {e}")));
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    total += data.len() as u64;
                    if total > limit {
                        return Err(too_large(limit));
                    }
                    if chunks.send(data.to_vec()).await.is_err() {
                        return Ok(total);
                    }
                }
            }
        }
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the file is larger than {limit} bytes"),
    )
}

#[derive(Debug, Serialize)]
pub struct Written {
    pub path: String,
    pub size: u64,
}

/// `PUT /v1/sandboxes/{name}/files?path=…[&mode=…]`: streamed by the agent
/// into a temporary file beside the target, renamed over it once all the
/// bytes the body declared (`Content-Length`) arrived.
pub async fn write(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
    body: Body,
) -> Result<Response, ApiError> {
    use http_body::Body as _;
    let path = query_path(&query, &["path", "mode"])?;
    let mode = number_param(&query, "mode", true, 0o7777)?;
    let Some(size) = body.size_hint().exact() else {
        return Err(ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "the body must declare its length (Content-Length): the file replaces the target only once that many bytes arrived",
        ));
    };
    if size > FILE_LIMIT {
        return Err(too_large(FILE_LIMIT));
    }
    let target = super::exec::connect(&app, peer, &name).await?;
    let size = write_body(&app, target, &path, mode, size, body).await?;
    Ok(axum::Json(Written { path, size }).into_response())
}

/// Streams `body`, of exactly `size` bytes, into the file `path` of
/// `target` (replaced only once every byte arrived); also the E2B API's
/// `POST /files`. Answers the bytes written.
pub(crate) async fn write_body(
    app: &Arc<App>,
    target: super::exec::Target,
    path: &str,
    mode: Option<u32>,
    size: u64,
    body: Body,
) -> Result<u64, ApiError> {
    let super::exec::Target { client, owner, stored } = target;
    let (chunks, chunks_rx) = mpsc::channel::<Vec<u8>>(8);
    let destination = path.to_owned();
    let recorder = client.clone();
    let upload = tokio::task::spawn_blocking(move || {
        let mut input = ChannelReader::new(chunks_rx);
        files::write_file(&client, &destination, size, mode, &mut input)
    });
    let (received, written) = tokio::join!(pump_body(body, chunks, FILE_LIMIT), upload);
    // A body that broke off is the first thing to say; the agent dropped
    // the partial file either way.
    received?;
    let size = written?.map_err(refusal)?;
    app.record_redacted(
        recorder,
        stored,
        owner,
        "file_written",
        serde_json::json!({ "path": path, "size": size }),
    )
    .await;
    Ok(size)
}

/// Runs a blocking file operation against the named sandbox.
async fn on_sandbox<T: Send + 'static>(
    app: &Arc<App>,
    peer: Peer,
    name: &str,
    op: impl FnOnce(&airlock_runtime::supervisor::SupervisorClient) -> Result<T, FilesError> + Send + 'static,
) -> Result<(T, super::exec::Target), ApiError> {
    let target = super::exec::connect(app, peer, name).await?;
    let client = target.client.clone();
    let answer = tokio::task::spawn_blocking(move || op(&client)).await?;
    Ok((answer.map_err(refusal)?, target))
}

#[derive(Debug, Serialize)]
pub struct Listing {
    pub path: String,
    pub entries: Vec<Entry>,
    /// More entries were left out at `max_entries`.
    pub truncated: bool,
}

/// `GET /v1/sandboxes/{name}/files/list?path=…[&depth=N&max_entries=N]`
pub async fn list(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<axum::Json<Listing>, ApiError> {
    use airlock_proto::file::{LIST_MAX_DEPTH, LIST_MAX_ENTRIES};
    let path = query_path(&query, &["path", "depth", "max_entries"])?;
    let depth = number_param(&query, "depth", false, LIST_MAX_DEPTH)?.unwrap_or(1).max(1);
    let max_entries = number_param(&query, "max_entries", false, LIST_MAX_ENTRIES)?;
    let target = path.clone();
    let (listing, _) =
        on_sandbox(&app, peer, &name, move |client| files::list(client, &target, depth, max_entries)).await?;
    let mut entries: Vec<Entry> = listing.entries.into_iter().map(|e| entry(&e.name, e.info)).collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(axum::Json(Listing { path, entries, truncated: listing.truncated }))
}

/// `GET /v1/sandboxes/{name}/files/stat?path=…`: the path itself (a
/// symlink is described, not followed).
pub async fn stat(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<axum::Json<Entry>, ApiError> {
    let path = query_path(&query, &["path"])?;
    let target = path.clone();
    let (info, _) = on_sandbox(&app, peer, &name, move |client| files::stat(client, &target)).await?;
    let base = path.trim_end_matches('/').rsplit('/').next().filter(|b| !b.is_empty()).unwrap_or("/");
    Ok(axum::Json(entry(base.as_bytes(), info)))
}

#[derive(Debug, Serialize)]
pub struct Changed {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// `POST /v1/sandboxes/{name}/files/mkdir?path=…[&parents=true&mode=0755]`
pub async fn mkdir(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let path = query_path(&query, &["path", "parents", "mode"])?;
    let parents = query.flag("parents")?;
    let mode = number_param(&query, "mode", true, 0o7777)?;
    let target = path.clone();
    let ((), t) =
        on_sandbox(&app, peer, &name, move |client| files::mkdir(client, &target, parents, mode)).await?;
    app.record_redacted(t.client, t.stored, t.owner, "file_mkdir", serde_json::json!({ "path": path })).await;
    Ok((StatusCode::CREATED, axum::Json(Changed { path, to: None })).into_response())
}

/// `DELETE /v1/sandboxes/{name}/files?path=…[&recursive=true]`
pub async fn remove(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<axum::Json<Changed>, ApiError> {
    let path = query_path(&query, &["path", "recursive"])?;
    let recursive = query.flag("recursive")?;
    let target = path.clone();
    let ((), t) =
        on_sandbox(&app, peer, &name, move |client| files::remove(client, &target, recursive)).await?;
    app.record_redacted(t.client, t.stored, t.owner, "file_removed", serde_json::json!({ "path": path }))
        .await;
    Ok(axum::Json(Changed { path, to: None }))
}

/// `POST /v1/sandboxes/{name}/files/rename?from=…&to=…[&replace=false]`
pub async fn rename(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<axum::Json<Changed>, ApiError> {
    query.only(&["from", "to", "replace"])?;
    let from = path_param(&query, "from")?;
    let to = path_param(&query, "to")?;
    let replace = query.get("replace").is_none() || query.flag("replace")?;
    let (source, target) = (from.clone(), to.clone());
    let ((), t) =
        on_sandbox(&app, peer, &name, move |client| files::rename(client, &source, &target, replace)).await?;
    let detail = serde_json::json!({ "path": from, "to": to });
    app.record_redacted(t.client, t.stored, t.owner, "file_renamed", detail).await;
    Ok(axum::Json(Changed { path: from, to: Some(to) }))
}

fn ndjson(line: &impl Serialize) -> Bytes {
    let mut text = serde_json::to_vec(line).unwrap_or_default();
    text.push(b'\n');
    Bytes::from(text)
}

/// `GET /v1/sandboxes/{name}/files/watch?path=…[&recursive=true]`: NDJSON,
/// first `{"event":"watching"}` once the watch is in place, then one line
/// per event, until the client goes away (or the directory does: `gone`).
pub async fn watch(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let path = query_path(&query, &["path", "recursive"])?;
    let recursive = query.flag("recursive")?;
    let super::exec::Target { client, .. } = super::exec::connect(&app, peer, &name).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<Result<(), FilesError>>();
    tokio::task::spawn_blocking(move || {
        let mut started = Some(started_tx);
        let result = files::watch(&client, &path, recursive, &mut |event| {
            if let Some(started) = started.take() {
                let _ = started.send(Ok(()));
                return tx.blocking_send(ndjson(&WatchLine::watching())).is_ok();
            }
            match event {
                // Quiet: is anyone still listening?
                None => !tx.is_closed(),
                // A client too slow to take the events is dropped, not
                // waited for: the agent's own queue reports what it lost.
                Some(event) => tx.blocking_send(ndjson(&WatchLine::from(event))).is_ok(),
            }
        });
        match (started.take(), result) {
            (Some(started), Err(e)) => {
                let _ = started.send(Err(e));
            }
            (None, Err(e)) => tracing::debug!(error = %e, "a watch ended"),
            (_, Ok(())) => {}
        }
    });
    match started_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(refusal(e)),
        Err(_) => return Err(ApiError::internal("the watch ended before it started")),
    }
    Ok(crate::body::streamed("application/x-ndjson", ChannelBody::new(rx)))
}

/// `GET /v1/sandboxes/{name}/artifacts`: works in any state. The files
/// were copied out of the sandbox by the runtime (regular files only, within
/// the policy's artifact budget), so their names and bytes are the
/// sandbox's: the walk follows no link, takes only directories and regular
/// files, and stops with an error (the body ends abnormally) past the
/// budget, [`ARTIFACT_MAX_DEPTH`] or [`ARTIFACT_MAX_ENTRIES`].
pub async fn artifacts(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
) -> Result<Response, ApiError> {
    let (dir, budget) = app
        .blocking(move |app| {
            let loaded = sandbox::authorize(app, &peer, &name)?;
            let budget = airlock_policy::Policy::load_file(&loaded.dir.policy_path())
                .map_or(ARTIFACT_FALLBACK_BUDGET, |p| p.artifacts.max_bytes);
            Ok((loaded.dir.artifacts_dir(), budget))
        })
        .await?;
    let (tx, rx) = mpsc::channel::<TarChunk>(16);
    tokio::task::spawn_blocking(move || {
        let failed = tx.clone();
        let limits = TarLimits { bytes: budget, entries: ARTIFACT_MAX_ENTRIES, depth: ARTIFACT_MAX_DEPTH };
        let mut tar = Tar::new(ChunkWriter { tx, buf: Vec::with_capacity(CHUNK) }, limits);
        // A client that hangs up ends the walk with a broken pipe.
        if let Err(e) = tar.append_tree(&dir).and_then(|()| tar.finish()) {
            tracing::debug!(error = %e, "the artifacts stream ended early");
            let _ = failed.blocking_send(TarChunk::Failed(e.to_string()));
        }
    });
    Ok(crate::body::streamed("application/x-tar", TarBody { rx, done: false }))
}

/// Deepest directory the artifacts tar descends into.
const ARTIFACT_MAX_DEPTH: usize = 512;
/// Most entries (files and directories) the artifacts tar holds.
const ARTIFACT_MAX_ENTRIES: u64 = 100_000;
/// The byte budget when the sandbox's policy cannot be read.
const ARTIFACT_FALLBACK_BUDGET: u64 = 1 << 30;

const CHUNK: usize = 64 * 1024;

enum TarChunk {
    Data(Bytes),
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
#[error("the artifacts archive broke off: {0}")]
struct TarBrokeOff(String);

/// The archive as it is written; a failure ends it abnormally, so a client
/// never takes a cut-off archive for a whole one.
struct TarBody {
    rx: mpsc::Receiver<TarChunk>,
    done: bool,
}

impl http_body::Body for TarBody {
    type Data = Bytes;
    type Error = TarBrokeOff;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, TarBrokeOff>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(TarChunk::Data(bytes))) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            Poll::Ready(Some(TarChunk::Failed(message))) => {
                self.done = true;
                Poll::Ready(Some(Err(TarBrokeOff(message))))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
        }
    }
}

/// Buffers writes into chunks for a [`TarBody`].
struct ChunkWriter {
    tx: mpsc::Sender<TarChunk>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx.blocking_send(TarChunk::Data(chunk)).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// How much of a tree a [`Tar`] takes before it refuses the rest.
#[derive(Debug, Clone, Copy)]
struct TarLimits {
    bytes: u64,
    entries: u64,
    depth: usize,
}

/// A minimal ustar writer: regular files and directories only.
struct Tar<W: Write> {
    out: W,
    limits: TarLimits,
    bytes: u64,
    entries: u64,
}

/// The largest size an 11-digit octal field holds.
const USTAR_MAX_SIZE: u64 = 0o77_777_777_777;

fn over_limit(what: String) -> io::Error {
    io::Error::other(what)
}

impl<W: Write> Tar<W> {
    fn new(out: W, limits: TarLimits) -> Tar<W> {
        Tar { out, limits, bytes: 0, entries: 0 }
    }

    /// Every directory and regular file below `root`, in name order, named
    /// relative to it. Each directory is reached from `root` one component
    /// at a time, never through a symlink; symlinks and special files are
    /// skipped, never followed or opened.
    fn append_tree(&mut self, root: &Path) -> io::Result<()> {
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let root = match rustix::fs::open(root, dir_flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let depth = rel.components().count();
            if depth > self.limits.depth {
                return Err(over_limit(format!(
                    "the artifacts are nested deeper than {} directories",
                    self.limits.depth
                )));
            }
            let mut dir = root.try_clone()?;
            for component in rel.components() {
                dir = rustix::fs::openat(&dir, component.as_os_str(), dir_flags, Mode::empty())?;
            }
            let mut names = Vec::new();
            for entry in rustix::fs::Dir::read_from(&dir)? {
                let name = entry?.file_name().to_bytes().to_vec();
                if name != b"." && name != b".." {
                    names.push(std::ffi::OsString::from_vec(name));
                }
            }
            names.sort();
            let mut subdirs = Vec::new();
            for name in names {
                self.entries += 1;
                if self.entries > self.limits.entries {
                    return Err(over_limit(format!(
                        "the artifacts hold more than {} entries",
                        self.limits.entries
                    )));
                }
                let rel = rel.join(&name);
                let stat = rustix::fs::statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?;
                match FileKind::from_mode(stat.st_mode) {
                    FileKind::Directory => {
                        if self.header(&rel, stat.st_mode, stat.st_mtime, b'5', 0)? {
                            subdirs.push(rel);
                        }
                    }
                    FileKind::Regular => self.append_file(&dir, &name, &rel)?,
                    _ => {
                        tracing::warn!(path = %rel.display(), "artifacts: skipping an entry that is not a file or directory");
                    }
                }
            }
            // Popped in name order.
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }

    fn append_file(&mut self, dir: &OwnedFd, name: &std::ffi::OsStr, rel: &Path) -> io::Result<()> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let file = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(e) => {
                tracing::warn!(path = %rel.display(), error = %e, "artifacts: skipping an unreadable file");
                return Ok(());
            }
        };
        let stat = rustix::fs::fstat(&file)?;
        if FileKind::from_mode(stat.st_mode) != FileKind::Regular {
            return Ok(());
        }
        let size = u64::try_from(stat.st_size).unwrap_or(0);
        if self.bytes.saturating_add(size) > self.limits.bytes {
            return Err(over_limit(format!(
                "the artifacts hold more than their budget of {} bytes",
                self.limits.bytes
            )));
        }
        self.bytes += size;
        if !self.header(rel, stat.st_mode, stat.st_mtime, b'0', size)? {
            return Ok(());
        }
        // Exactly `size` bytes, whatever the file does meanwhile.
        let copied = io::copy(&mut file.take(size), &mut self.out)?;
        self.zeros(size - copied)?;
        self.zeros((512 - size % 512) % 512)
    }

    fn zeros(&mut self, mut n: u64) -> io::Result<()> {
        const ZEROS: [u8; 512] = [0; 512];
        while n > 0 {
            let k = n.min(512);
            self.out.write_all(&ZEROS[..k as usize])?;
            n -= k;
        }
        Ok(())
    }

    /// Writes a header; false (and a warning) when the entry cannot be
    /// represented and is skipped.
    fn header(&mut self, rel: &Path, mode: u32, mtime: i64, kind: u8, size: u64) -> io::Result<bool> {
        let mut name = rel.as_os_str().as_encoded_bytes().to_vec();
        if kind == b'5' {
            name.push(b'/');
        }
        match ustar_header(&name, mode & 0o7777, size, mtime.max(0).unsigned_abs(), kind) {
            Some(block) => {
                self.out.write_all(&block)?;
                Ok(true)
            }
            None => {
                tracing::warn!(path = %rel.display(), size, "artifacts: skipping an entry ustar cannot name or size");
                Ok(false)
            }
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        self.zeros(1024)?;
        self.out.flush()
    }
}

/// Writes `value` as zero-padded octal filling `field` but its last byte (NUL).
fn octal(field: &mut [u8], value: u64) -> Option<()> {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    if text.len() > digits {
        return None;
    }
    field[..digits].copy_from_slice(text.as_bytes());
    field[digits] = 0;
    Some(())
}

/// One 512-byte ustar header; None when the name cannot be split into the
/// 155-byte prefix and 100-byte name fields, or the size is too large.
fn ustar_header(name: &[u8], mode: u32, size: u64, mtime: u64, kind: u8) -> Option<[u8; 512]> {
    let mut h = [0u8; 512];
    let (prefix, rest) = if name.len() <= 100 {
        (&[][..], name)
    } else {
        // Split at a '/' leaving at most 155 bytes before it and 1-100 after.
        let at = (0..name.len())
            .filter(|&i| name[i] == b'/' && i <= 155 && name.len() - i - 1 <= 100 && i + 1 < name.len())
            .find(|&i| name[i + 1..].iter().any(|b| *b != b'/'))?;
        (&name[..at], &name[at + 1..])
    };
    if size > USTAR_MAX_SIZE || prefix.len() > 155 || rest.is_empty() || rest.len() > 100 {
        return None;
    }
    h[..rest.len()].copy_from_slice(rest);
    octal(&mut h[100..108], u64::from(mode))?;
    octal(&mut h[108..116], 0)?;
    octal(&mut h[116..124], 0)?;
    octal(&mut h[124..136], size)?;
    octal(&mut h[136..148], mtime.min(USTAR_MAX_SIZE))?;
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    h[345..345 + prefix.len()].copy_from_slice(prefix);
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    octal(&mut h[148..155], u64::from(sum))?;
    h[155] = b' ';
    Some(h)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn paths_are_checked() {
        let q = |s: &str| QueryPairs(serde_urlencoded::from_str(s).unwrap());
        assert_eq!(query_path(&q("path=/etc/passwd"), &["path"]).unwrap(), "/etc/passwd");
        assert_eq!(query_path(&q("path=%2F..%2F..%2Fetc"), &["path"]).unwrap(), "/../../etc");
        for bad in ["", "path=", "path=rel", "path=/a%00b", "path=/x&other=1"] {
            assert_eq!(
                query_path(&q(bad), &["path"]).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad:?}"
            );
        }
        assert_eq!(number_param(&q("mode=0640"), "mode", true, 0o7777).unwrap(), Some(0o640));
        assert!(number_param(&q("mode=9"), "mode", true, 0o7777).is_err());
        assert!(number_param(&q("depth=65"), "depth", false, 64).is_err());
    }

    #[test]
    fn ustar_headers() {
        let h = ustar_header(b"dir/junit.xml", 0o644, 13, 1_700_000_000, b'0').unwrap();
        assert_eq!(&h[..13], b"dir/junit.xml");
        assert_eq!(&h[100..108], b"0000644\0");
        assert_eq!(&h[124..136], b"00000000015\0");
        assert_eq!(&h[257..263], b"ustar\0");
        let stored: u32 = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        let mut blank = h;
        blank[148..156].fill(b' ');
        assert_eq!(stored, blank.iter().map(|b| u32::from(*b)).sum::<u32>());
        let long = format!("{}/{}", "p".repeat(120), "n".repeat(90));
        let h = ustar_header(long.as_bytes(), 0o644, 0, 0, b'0').unwrap();
        assert_eq!(&h[..90], "n".repeat(90).as_bytes());
        assert_eq!(&h[345..465], "p".repeat(120).as_bytes());
        assert!(ustar_header("x".repeat(101).as_bytes(), 0o644, 0, 0, b'0').is_none());
        assert!(ustar_header(b"big", 0o644, USTAR_MAX_SIZE + 1, 0, b'0').is_none());
    }

    #[test]
    fn a_tree_becomes_a_tar() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("out/deep")).unwrap();
        std::fs::write(tmp.path().join("out/junit.xml"), "<testsuite/>").unwrap();
        std::fs::write(tmp.path().join("top.txt"), "x".repeat(600)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tmp.path().join("link")).unwrap();
        let mut out = Vec::new();
        let mut tar = Tar::new(&mut out, TarLimits { bytes: 1 << 20, entries: 100, depth: 10 });
        tar.append_tree(tmp.path()).unwrap();
        tar.finish().unwrap();
        assert_eq!(out.len() % 512, 0);
        let mut names = Vec::new();
        let mut at = 0;
        while at + 512 <= out.len() && out[at] != 0 {
            let h = &out[at..at + 512];
            let end = h[..100].iter().position(|b| *b == 0).unwrap_or(100);
            names.push(String::from_utf8(h[..end].to_vec()).unwrap());
            let size = u64::from_str_radix(std::str::from_utf8(&h[124..135]).unwrap(), 8).unwrap();
            at += 512 + size.div_ceil(512) as usize * 512;
        }
        assert_eq!(names, ["out/", "top.txt", "out/deep/", "out/junit.xml"]);
        let mut empty = Vec::new();
        Tar::new(&mut empty, TarLimits { bytes: 0, entries: 0, depth: 0 })
            .append_tree(&tmp.path().join("absent"))
            .unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn a_tree_past_its_limits_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b/c")).unwrap();
        std::fs::write(tmp.path().join("a/b/c/deep.txt"), "x".repeat(10)).unwrap();
        let tar = |limits| Tar::new(Vec::new(), limits).append_tree(tmp.path());
        assert!(tar(TarLimits { bytes: 10, entries: 4, depth: 3 }).is_ok());
        for (limits, want) in [
            (TarLimits { bytes: 9, entries: 4, depth: 3 }, "budget"),
            (TarLimits { bytes: 10, entries: 3, depth: 3 }, "entries"),
            (TarLimits { bytes: 10, entries: 4, depth: 2 }, "deeper"),
        ] {
            let err = tar(limits).unwrap_err().to_string();
            assert!(err.contains(want), "{limits:?}: {err}");
        }
        // The root itself must not be a link.
        let link = tmp.path().with_extension("link");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        let err = Tar::new(Vec::new(), TarLimits { bytes: 10, entries: 4, depth: 3 }).append_tree(&link);
        let _ = std::fs::remove_file(&link);
        assert!(err.is_err());
    }
}
