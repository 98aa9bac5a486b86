//! `GET /v1/sandboxes/{name}/audit` (the audit log as NDJSON, optionally
//! followed), `GET /v1/sandboxes/{name}/report` (the HTML report) and
//! `GET /v1/sandboxes/{name}/export` (the signed bundle).
//!
//! The audit lines are sent exactly as the file holds them, one JSON object
//! per line, so what a client receives is what `audit.jsonl` says (and what
//! a check of the log's integrity reads). Only complete lines are sent: a
//! last line still being written waits for its newline.

use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use crate::app::App;
use crate::auth::Peer;
use crate::body::ChannelBody;
use crate::error::ApiError;
use crate::extract::{QueryPairs, SandboxName};
use crate::sandbox;

/// How often a followed log is looked at for new lines.
const POLL: Duration = Duration::from_millis(250);
/// How much is read at a time.
const CHUNK: usize = 64 * 1024;
/// A line longer than this is not one the runtime wrote (it caps every
/// field): the stream ends rather than buffer it.
const MAX_LINE: usize = 16 << 20;

/// `GET /v1/sandboxes/{name}/audit[?follow=true]`.
pub async fn audit(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    query.only(&["follow"])?;
    let follow = query.flag("follow")?;
    let file = app
        .blocking(move |app| {
            let loaded = sandbox::authorize(app, &peer, &name)?;
            sandbox::open_state_file(&loaded.dir.audit_path())
        })
        .await?;
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    if let Some(file) = file {
        tokio::spawn(send_lines(Arc::new(file), follow, tx));
    }
    Ok(crate::body::streamed("application/x-ndjson", ChannelBody::new(rx)))
}

/// Sends the log's complete lines; with `follow`, then every line appended
/// after them, until the log is removed with its sandbox (its last lines
/// sent first) or the client goes away.
async fn send_lines(file: Arc<File>, follow: bool, tx: mpsc::Sender<Bytes>) {
    let mut offset = 0u64;
    let mut pending: Vec<u8> = Vec::new();
    loop {
        // Whether the log was already removed before this read: if so, the
        // read gets everything it will ever hold.
        let gone = follow && removed(&file);
        loop {
            let reader = file.clone();
            let chunk = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; CHUNK];
                reader.read_at(&mut buf, offset).map(|n| {
                    buf.truncate(n);
                    buf
                })
            })
            .await;
            let chunk = match chunk {
                Ok(Ok(chunk)) => chunk,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "reading an audit log for a client stopped");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "an audit log reader failed");
                    return;
                }
            };
            if chunk.is_empty() {
                break;
            }
            offset += chunk.len() as u64;
            pending.extend_from_slice(&chunk);
            if let Some(end) = pending.iter().rposition(|&b| b == b'\n') {
                let rest = pending.split_off(end + 1);
                let lines = std::mem::replace(&mut pending, rest);
                if tx.send(Bytes::from(lines)).await.is_err() {
                    return;
                }
            } else if pending.len() > MAX_LINE {
                tracing::warn!(
                    bytes = pending.len(),
                    "an audit log line is too long to send; the stream ends"
                );
                return;
            }
        }
        if !follow || gone {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = tx.closed() => return,
        }
    }
}

/// Whether the log was removed (its sandbox with it): no name links to it
/// any more.
fn removed(file: &File) -> bool {
    file.metadata().map(|m| m.nlink() == 0).unwrap_or(true)
}

/// `GET /v1/sandboxes/{name}/report`: the HTML report, one self-contained
/// page, with the same Content-Security-Policy it carries inside as a
/// header (plus what only a header can say: no framing).
pub async fn report(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    query.only(&[])?;
    let page = app
        .blocking(move |app| {
            let stored = sandbox::authorize(app, &peer, &name)?.name().to_owned();
            airlock_runtime::report::render(&app.root, &stored, &name)
                .map_err(|e| app.scope(&peer).reword(e.into(), &stored, &name))
        })
        .await?;
    let csp = format!("{}; frame-ancestors 'none'", airlock_runtime::report::content_security_policy());
    let csp =
        HeaderValue::try_from(csp).map_err(|e| ApiError::internal(format!("report policy header: {e}")))?;
    let mut response = page.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `GET /v1/sandboxes/{name}/export`: the signed bundle `airlock export`
/// writes, made by the same function. It is written whole into a file of
/// the daemon's state root that has no name (so nothing is left behind if
/// the daemon dies) before the answer starts: a failure is an error
/// answer, never a bundle cut short, and its length is known.
pub async fn export(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    query.only(&[])?;
    let (mut file, length, filename) = app
        .blocking(move |app| {
            let stored = sandbox::authorize(app, &peer, &name)?.name().to_owned();
            let reword = |e: ApiError| app.scope(&peer).reword(e, &stored, &name);
            let staging = unnamed_file(app.root.path())
                .map_err(|e| ApiError::internal(format!("cannot stage the bundle of {name}: {e}")))?;
            let filename = format!("{name}.tar.zst");
            let (mut file, _) = airlock_runtime::bundle::export_into(
                &app.root,
                &stored,
                &name,
                staging,
                Path::new(&filename),
            )
            .map_err(|e| reword(e.into()))?;
            let length = file
                .rewind()
                .and_then(|()| file.metadata())
                .map_err(|e| ApiError::internal(format!("reading the bundle of {name} back: {e}")))?
                .len();
            Ok((file, length, filename))
        })
        .await?;
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; CHUNK];
        // Ends at the end of the bundle, on an error (the declared length
        // is then not reached, which the client sees), or when the client
        // hangs up.
        while let Ok(n @ 1..) = file.read(&mut buf) {
            if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                break;
            }
        }
    });
    let disposition = HeaderValue::try_from(format!("attachment; filename=\"{filename}\""))
        .map_err(|e| ApiError::internal(format!("bundle file name header: {e}")))?;
    let mut response = crate::body::streamed("application/zstd", ChannelBody::new(rx));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_DISPOSITION, disposition);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    Ok(response)
}

/// A new file in `dir` that no name leads to (`O_TMPFILE`), readable and
/// writable by this process alone; where the file system cannot make one,
/// a file whose name is removed as soon as it is open.
fn unnamed_file(dir: &Path) -> std::io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let mode = Mode::from_raw_mode(0o600);
    match rustix::fs::open(dir, OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC, mode) {
        Ok(fd) => return Ok(File::from(fd)),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    // A dot name: a listing of the state root never takes it for a sandbox.
    let path: PathBuf = dir.join(format!(".export-{}-{}.tmp", std::process::id(), unique()));
    let fd = rustix::fs::open(&path, OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC, mode)?;
    std::fs::remove_file(&path)?;
    Ok(File::from(fd))
}

/// A number no other call of this process got.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
