//! Files inside a running sandbox, and the artifacts of any sandbox:
//!
//! - `GET  /v1/sandboxes/{name}/files?path=/abs` — a regular file's bytes,
//!   read by the sandbox's agent (`runtime::files`): no link followed at the
//!   last component, nothing but a regular file, at most the disk budget;
//! - `PUT  /v1/sandboxes/{name}/files?path=/abs` — writes the body there;
//! - `GET  /v1/sandboxes/{name}/files/list?path=/abs/dir` — a directory's entries;
//! - `GET  /v1/sandboxes/{name}/files/stat?path=/abs` — one entry;
//! - `GET  /v1/sandboxes/{name}/artifacts` — the captured artifacts as a tar stream.
//!
//! The file operations never touch the host's filesystem: a read is done
//! by the agent, the others by a process (`sh`, `find`) run *inside* the
//! sandbox through its supervisor (until they too become typed operations),
//! so a path
//! means what it means to the sandbox's own processes, `..` and symlinks
//! included, and nothing outside the sandbox's view can be named. The names
//! `find` reports are untrusted bytes, read NUL-separated.
//!
//! The artifacts are files the daemon itself wrote into the state directory;
//! they are walked without following symlinks and sent as a ustar archive.

use std::cell::OnceCell;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use airlock_proto::Stream;
use airlock_proto::file::FileKind;
use airlock_proto::supervisor::{ExecEvent, ExecSpec};
use airlock_runtime::files::{self, ReadError};
use airlock_runtime::supervisor::{ExecControl, SupervisorClient};
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
use crate::body::{ChannelReader, base64};
use crate::error::ApiError;
use crate::extract::{QueryPairs, SandboxName};
use crate::sandbox;

/// Largest body `PUT .../files` accepts. It is streamed into the sandbox,
/// never held in memory; the sandbox's own disk limit usually ends it first.
pub const FILE_LIMIT: u64 = 4 << 30;
/// How long a write may take, the upload included.
const WRITE_TIMEOUT_SECS: u64 = 3600;
/// Largest listing (the raw `find` output) `files/list` reads.
const LIST_LIMIT: usize = 16 << 20;
/// How much of a failed process's stderr an error message quotes.
const STDERR_LIMIT: usize = 2048;
/// The exit status the scripts below use for "no such file".
const MISSING: i32 = 3;
/// The exit status the scripts below use for "not the right kind of file".
const WRONG_KIND: i32 = 4;

/// Writes stdin to a new temporary file beside the target (whose directory
/// must exist; an existing target must be a regular file) and prints its
/// name first: the daemon renames it into place only once the whole body
/// arrived, so a write that breaks off leaves the old file as it was.
const WRITE_SCRIPT: &str = r#"d=$(dirname -- "$1")
if [ ! -d "$d" ]; then exit 3; fi
if [ -e "$1" ] && [ ! -f "$1" ]; then echo "$1: exists and is not a regular file" >&2; exit 4; fi
t=$(mktemp -- "$d/.airlock-upload.XXXXXXXXXX") || exit 5
printf '%s\n' "$t"
exec cat > "$t""#;

/// Puts a finished upload in place: the old file's mode, or a new file's
/// usual one (mktemp made it private). `$2` must be one of ours.
const COMMIT_SCRIPT: &str = r#"case "$2" in "$(dirname -- "$1")"/.airlock-upload.*) ;; *) exit 4;; esac
if [ -f "$1" ]; then chmod --reference="$1" -- "$2"; else chmod a+r -- "$2"; fi
exec mv -f -- "$2" "$1""#;

/// Removes an upload that did not finish.
const ABORT_SCRIPT: &str = r#"case "$2" in "$(dirname -- "$1")"/.airlock-upload.*) ;; *) exit 4;; esac
exec rm -f -- "$2""#;

/// Lists a directory (a symlink to one is followed: `-H`).
const LIST_SCRIPT: &str = r#"if [ ! -e "$1" ] && [ ! -L "$1" ]; then exit 3; fi
if [ ! -d "$1" ]; then echo "$1: not a directory" >&2; exit 4; fi
exec find -H "$1" -mindepth 1 -maxdepth 1 -printf "$2""#;

/// Describes one path itself (a symlink is reported as a symlink).
const STAT_SCRIPT: &str = r#"if [ ! -e "$1" ] && [ ! -L "$1" ]; then exit 3; fi
exec find "$1" -maxdepth 0 -printf "$2""#;

/// `find -printf` formats: name, type, size, mode, mtime, each ended by NUL
/// (find itself turns `\0` into the byte).
const LIST_FORMAT: &str = "%P\\0%y\\0%s\\0%m\\0%T@\\0";
const STAT_FORMAT: &str = "%f\\0%y\\0%s\\0%m\\0%T@\\0";

/// The `path` query parameter: absolute, no NUL, at most 4096 bytes.
fn query_path(query: &QueryPairs) -> Result<String, ApiError> {
    query.only(&["path"])?;
    let invalid = |m: String| ApiError::bad_request("invalid_path", m);
    let path = query.get("path").ok_or_else(|| invalid("the path query parameter is required".into()))?;
    if !path.starts_with('/') {
        return Err(invalid(format!("path {path:?} must be absolute")));
    }
    if path.contains('\0') || path.len() > 4096 {
        return Err(invalid("path must be at most 4096 bytes without NUL".into()));
    }
    Ok(path.to_owned())
}

fn spec(script: &str, args: &[&str], timeout_secs: Option<u64>) -> ExecSpec {
    let mut argv = vec!["sh".to_owned(), "-c".to_owned(), script.to_owned(), "sh".to_owned()];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    ExecSpec { argv, timeout_secs, transfer: true, ..ExecSpec::default() }
}

/// How a process in the sandbox ended.
#[derive(Debug, Default)]
struct Finish {
    code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    stderr: Vec<u8>,
    /// The exec broke off (the sandbox stopped under it).
    broken: Option<String>,
}

impl Finish {
    fn ok(&self) -> bool {
        self.broken.is_none() && self.code == Some(0)
    }

    fn keep_stderr(&mut self, data: &[u8]) {
        let room = STDERR_LIMIT.saturating_sub(self.stderr.len());
        self.stderr.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// The API error for a process that did not succeed on `path`.
    fn error(&self, what: &str, path: &str) -> ApiError {
        if let Some(message) = &self.broken {
            return ApiError::conflict("not_running", format!("{what} {path}: {message}"));
        }
        if self.code == Some(MISSING) {
            let message = if what == "write" {
                format!("the directory of {path} does not exist in the sandbox")
            } else {
                format!("no file {path} in the sandbox")
            };
            return ApiError::new(StatusCode::NOT_FOUND, "file_not_found", message);
        }
        let how = match (self.code, self.signal, self.timed_out) {
            (_, _, true) => "timed out".to_owned(),
            (Some(code), _, _) => format!("exit status {code}"),
            (None, Some(signal), _) => format!("signal {signal}"),
            (None, None, _) => "no exit status".to_owned(),
        };
        // The sandbox's own words: escaped, for clients that print them.
        let stderr = airlock_workspace::printable(&self.stderr);
        let stderr = stderr.trim();
        let code = if self.code == Some(WRONG_KIND) { "wrong_file_type" } else { "file_error" };
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            code,
            if stderr.is_empty() {
                format!("{what} {path}: {how}")
            } else {
                format!("{what} {path}: {how}: {stderr}")
            },
        )
    }
}

/// Runs `spec` to its end, handing its stdout to `stdout`; when that
/// answers false (too much, or no one to send it to) the process is killed
/// and the rest of its output dropped. Stderr is kept for error messages.
fn run_script(
    client: &SupervisorClient,
    spec: &ExecSpec,
    input: Option<Box<dyn Read + Send>>,
    stdout: &mut dyn FnMut(Vec<u8>) -> bool,
) -> Finish {
    let mut finish = Finish::default();
    let control: OnceCell<ExecControl> = OnceCell::new();
    let mut stopped = false;
    let result = client.exec_session(
        spec,
        input,
        &mut |event| match event {
            ExecEvent::Started { .. } => {}
            ExecEvent::Output { stream: Stream::Stdout, data } => {
                if !stopped && !stdout(data) {
                    stopped = true;
                    if let Some(c) = control.get() {
                        let _ = c.signal(super::SIGKILL);
                    }
                }
            }
            ExecEvent::Output { stream: Stream::Stderr, data } => finish.keep_stderr(&data),
            ExecEvent::Exited { code, signal, timed_out } => {
                finish.code = code;
                finish.signal = signal;
                finish.timed_out = timed_out;
            }
        },
        &mut |c| {
            let _ = control.set(c);
        },
    );
    if let Err(e) = result {
        finish.broken = Some(e.to_string());
    }
    finish
}

/// Runs `spec` to its end, keeping at most `limit` bytes of stdout (more
/// kills the process and fails).
fn collect(
    client: &SupervisorClient,
    spec: &ExecSpec,
    input: Option<Box<dyn Read + Send>>,
    limit: usize,
) -> (Vec<u8>, bool, Finish) {
    let mut out = Vec::new();
    let mut over = false;
    let finish = run_script(client, spec, input, &mut |data| {
        over = out.len() + data.len() > limit;
        if !over {
            out.extend_from_slice(&data);
        }
        !over
    });
    (out, over, finish)
}

/// What the blocking reader of `GET .../files` sends the response body.
enum Chunk {
    /// The file is open and regular: the answer can start.
    Opened,
    Data(Bytes),
    End(Result<u64, ReadError>),
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

/// The API's answer to a read that failed before it began.
fn read_refusal(e: ReadError) -> ApiError {
    let message = e.to_string();
    match e {
        ReadError::NotFound { .. } => ApiError::new(StatusCode::NOT_FOUND, "file_not_found", message),
        ReadError::NotRegular { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "wrong_file_type", message)
        }
        ReadError::TooLarge { .. } | ReadError::Grew { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "file_too_large", message)
        }
        ReadError::Os { .. } | ReadError::Aborted { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "file_error", message)
        }
        ReadError::Supervisor { .. } => ApiError::conflict("not_running", message),
        ReadError::Output { .. } => ApiError::internal(message),
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
    let path = query_path(&query)?;
    let super::exec::Target { client, owner, stored } = super::exec::connect(&app, peer, &name).await?;
    let (tx, mut rx) = mpsc::channel::<Chunk>(16);
    let target = path.clone();
    tokio::task::spawn_blocking(move || {
        let opened = tx.clone();
        let result = files::read_file(
            &client,
            &target,
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
        Some(Chunk::End(Err(e))) => return Err(read_refusal(e)),
        Some(Chunk::Data(_) | Chunk::End(Ok(_))) | None => {
            return Err(ApiError::internal("the file reader ended without opening the file"));
        }
    }
    app.record_event(Some(&stored), Some(owner), "file_read", serde_json::json!({ "path": path }));
    Ok(crate::body::streamed("application/octet-stream", FileBody { rx, done: false }))
}

/// Feeds the request body to a process's stdin, refusing more than `limit`
/// bytes; answers how many bytes the whole body had. Stops early, without
/// an error, when the process stops reading (its end says why).
async fn pump_body(mut body: Body, stdin: mpsc::Sender<Vec<u8>>, limit: u64) -> Result<u64, ApiError> {
    use http_body::Body as _;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the file is larger than {limit} bytes"),
        )
    };
    if body.size_hint().lower() > limit {
        return Err(too_large());
    }
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
                        return Err(too_large());
                    }
                    if stdin.send(data.to_vec()).await.is_err() {
                        return Ok(total);
                    }
                }
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Written {
    pub path: String,
    pub size: u64,
}

/// `PUT /v1/sandboxes/{name}/files?path=…`: streamed into a temporary
/// file beside the target, renamed over it once complete.
pub async fn write(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
    body: Body,
) -> Result<Response, ApiError> {
    let path = query_path(&query)?;
    let super::exec::Target { client, owner, stored } = super::exec::connect(&app, peer, &name).await?;
    let (stdin, stdin_rx) = mpsc::channel::<Vec<u8>>(8);
    let target = path.clone();
    let upload = tokio::task::spawn_blocking(move || {
        let input: Box<dyn Read + Send> = Box::new(ChannelReader::new(stdin_rx));
        let (out, _, finish) =
            collect(&client, &spec(WRITE_SCRIPT, &[&target], Some(WRITE_TIMEOUT_SECS)), Some(input), 4096);
        (client, out, finish)
    });
    let (received, uploaded) = tokio::join!(pump_body(body, stdin, FILE_LIMIT), upload);
    let (client, out, finish) = uploaded?;
    let temp = String::from_utf8_lossy(&out).lines().next().unwrap_or_default().to_owned();
    let settle = |script: &'static str| {
        let (target, temp) = (path.clone(), temp.clone());
        tokio::task::spawn_blocking(move || {
            collect(&client, &spec(script, &[&target, &temp], Some(60)), None, 4096).2
        })
    };
    let size = match received {
        Ok(size) if finish.ok() => size,
        failed => {
            if !temp.is_empty() {
                let _ = settle(ABORT_SCRIPT).await;
            }
            return Err(failed.err().unwrap_or_else(|| finish.error("write", &path)));
        }
    };
    let committed = settle(COMMIT_SCRIPT).await?;
    if !committed.ok() {
        return Err(committed.error("write", &path));
    }
    app.record_event(
        Some(&stored),
        Some(owner),
        "file_written",
        serde_json::json!({ "path": path, "size": size }),
    );
    Ok(axum::Json(Written { path, size }).into_response())
}

/// One directory entry, as `files/list` and `files/stat` answer it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// The name, lossily decoded when it is not UTF-8.
    pub name: String,
    /// The name's bytes in base64, only when they are not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_b64: Option<String>,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
    /// Permission bits (`0o644` is 420).
    pub mode: u32,
    /// RFC 3339, UTC.
    pub mtime: String,
}

/// Parses `find -printf` output of five NUL-ended fields per entry.
fn parse_entries(out: &[u8]) -> Result<Vec<Entry>, String> {
    let mut fields: Vec<&[u8]> = out.split(|b| *b == 0).collect();
    // The output ends with a NUL, so the split ends with an empty piece.
    if fields.pop().is_some_and(|last| !last.is_empty()) {
        return Err("find's output does not end with NUL".into());
    }
    if !fields.len().is_multiple_of(5) {
        return Err(format!("find printed {} fields, not a multiple of 5", fields.len()));
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    fields
        .chunks(5)
        .map(|f| {
            let (name, name_b64) = match std::str::from_utf8(f[0]) {
                Ok(s) => (s.to_owned(), None),
                Err(_) => (text(f[0]), Some(base64(f[0]))),
            };
            let kind = match f[1] {
                b"f" => "file",
                b"d" => "dir",
                b"l" => "symlink",
                _ => "other",
            };
            let size = text(f[2]).parse::<u64>().map_err(|e| format!("size {:?}: {e}", text(f[2])))?;
            let mode =
                u32::from_str_radix(&text(f[3]), 8).map_err(|e| format!("mode {:?}: {e}", text(f[3])))?;
            let mtime = mtime(&text(f[4])).ok_or_else(|| format!("mtime {:?}", text(f[4])))?;
            Ok(Entry { name, name_b64, kind, size, mode, mtime })
        })
        .collect()
}

/// `find`'s `%T@` (seconds since the epoch with a fraction) as RFC 3339.
fn mtime(s: &str) -> Option<String> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let nanos: u32 = if digits.is_empty() { 0 } else { format!("{digits:0<9}").parse().ok()? };
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs.unsigned_abs(), nanos))?
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))?
    };
    Some(airlock_runtime::audit::rfc3339_utc(t))
}

async fn find(
    app: &Arc<App>,
    peer: Peer,
    name: String,
    query: &QueryPairs,
    script: &'static str,
    format: &'static str,
) -> Result<Vec<Entry>, ApiError> {
    let path = query_path(query)?;
    let client = super::exec::connect(app, peer, &name).await?.client;
    let target = path.clone();
    let (out, over, finish) = tokio::task::spawn_blocking(move || {
        collect(&client, &spec(script, &[&target, format], Some(60)), None, LIST_LIMIT)
    })
    .await?;
    if over {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "file_error",
            format!("the listing of {path} is larger than {LIST_LIMIT} bytes"),
        ));
    }
    if !finish.ok() {
        return Err(finish.error("list", &path));
    }
    parse_entries(&out).map_err(|e| ApiError::internal(format!("listing {path}: {e}")))
}

#[derive(Debug, Serialize)]
pub struct Listing {
    pub path: String,
    pub entries: Vec<Entry>,
}

/// `GET /v1/sandboxes/{name}/files/list?path=…`
pub async fn list(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<axum::Json<Listing>, ApiError> {
    let mut entries = find(&app, peer, name, &query, LIST_SCRIPT, LIST_FORMAT).await?;
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(axum::Json(Listing { path: query_path(&query)?, entries }))
}

/// `GET /v1/sandboxes/{name}/files/stat?path=…`
pub async fn stat(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<axum::Json<Entry>, ApiError> {
    let entries = find(&app, peer, name, &query, STAT_SCRIPT, STAT_FORMAT).await?;
    match <[Entry; 1]>::try_from(entries) {
        Ok([entry]) => Ok(axum::Json(entry)),
        Err(entries) => Err(ApiError::internal(format!("stat answered {} entries, not one", entries.len()))),
    }
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
        assert_eq!(query_path(&q("path=/etc/passwd")).unwrap(), "/etc/passwd");
        assert_eq!(query_path(&q("path=%2F..%2F..%2Fetc")).unwrap(), "/../../etc");
        for bad in ["", "path=", "path=rel", "path=/a%00b", "path=/x&other=1"] {
            assert_eq!(query_path(&q(bad)).unwrap_err().status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn find_output_is_parsed() {
        let nul =
            |fields: &[&[u8]]| fields.iter().flat_map(|f| f.iter().copied().chain([0])).collect::<Vec<u8>>();
        let out = nul(&[
            b"a.txt",
            b"f",
            b"5",
            b"644",
            b"1732812345.5000000000",
            b"\xff\xfe",
            b"d",
            b"4096",
            b"755",
            b"0",
            b"l",
            b"l",
            b"3",
            b"777",
            b"-1.0",
        ]);
        let entries = parse_entries(&out).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].name, "a.txt");
        assert_eq!(entries[0].name_b64, None);
        assert_eq!((entries[0].kind, entries[0].size, entries[0].mode), ("file", 5, 0o644));
        assert_eq!(entries[0].mtime, "2024-11-28T16:45:45.500Z");
        assert_eq!(entries[1].name_b64.as_deref(), Some("//4="));
        assert_eq!(entries[1].kind, "dir");
        assert_eq!(entries[2].kind, "symlink");
        assert!(parse_entries(b"").unwrap().is_empty());
        assert!(parse_entries(&nul(&[b"a", b"f"])).is_err());
        assert!(parse_entries(&nul(&[b"a", b"f", b"x", b"644", b"0"])).is_err());
        let mut cut = nul(&[b"a", b"f", b"1", b"644", b"0"]);
        cut.pop();
        assert!(parse_entries(&cut).is_err());
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
