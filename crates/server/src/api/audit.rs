//! `GET /v1/sandboxes/{name}/audit` (the audit log as NDJSON, optionally
//! followed) and `GET /v1/sandboxes/{name}/report` (the HTML report).
//!
//! The audit lines are sent exactly as the file holds them, one JSON object
//! per line, so what a client receives is what `audit.jsonl` says (and what
//! a check of the log's integrity reads). Only complete lines are sent: a
//! last line still being written waits for its newline.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
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
