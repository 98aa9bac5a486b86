//! `GET /v1/events`: the daemon's event log as server-sent events.
//!
//! ```text
//! id: 42
//! event: created
//! data: {"id":42,"ts":"…","sandbox":"ci-42","kind":"created","detail":{…}}
//! ```
//!
//! Without `follow` the stream ends after the recorded events; with
//! `follow=true` it stays open and delivers new ones as they happen (a
//! comment line every 15 s keeps idle connections alive). `since=ID` (or a
//! `Last-Event-ID` header, as browsers send on reconnect) starts after that
//! event; `sandbox=NAME` narrows to one sandbox. A user sees the events of
//! their own sandboxes only, under their own names, numbered among their
//! own (ids without gaps where other users' events fall), and the stream's
//! keepalives keep their own schedule: nothing in it moves with anyone
//! else's activity.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use tokio::sync::mpsc;

use crate::app::App;
use crate::auth::Peer;
use crate::body::ChannelBody;
use crate::db::EventRow;
use crate::error::ApiError;
use crate::extract::QueryPairs;
use crate::scope::Scope;

const PAGE: u32 = 500;
const KEEPALIVE: Duration = Duration::from_secs(15);

pub async fn events(
    State(app): State<Arc<App>>,
    peer: Peer,
    headers: HeaderMap,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    query.only(&["follow", "since", "sandbox"])?;
    let follow = query.flag("follow")?;
    let since =
        match query.get("since").or_else(|| headers.get("last-event-id").and_then(|v| v.to_str().ok())) {
            Some(s) => s.trim().parse::<i64>().map_err(|_| {
                ApiError::bad_request("invalid_query", format!("since={s:?}: expected an event id"))
            })?,
            None => 0,
        };
    let scope = app.scope(&peer);
    let mut sandboxes = Vec::new();
    if let Some(name) = query.get("sandbox") {
        airlock_runtime::state::validate_name(name)?;
        sandboxes.push(scope.stored(name)?);
        sandboxes.extend(scope.legacy(name));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(stream(app, peer.owner_filter(), scope, sandboxes, since, follow, tx));
    Ok(crate::body::streamed("text/event-stream", ChannelBody::new(rx)))
}

async fn stream(
    app: Arc<App>,
    owner: Option<u32>,
    scope: Scope,
    sandboxes: Vec<String>,
    mut last: i64,
    follow: bool,
    tx: mpsc::Sender<Bytes>,
) {
    // Subscribe before the first read, so nothing recorded in between is missed.
    let mut newest = app.subscribe_events();
    // Keepalives on a fixed schedule: one that restarted with every event
    // anywhere would tell a user when other users' sandboxes were busy.
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    loop {
        let filter = sandboxes.clone();
        let page = app.blocking(move |app| Ok(app.db.events_after(last, owner, &filter, PAGE)?)).await;
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                let data = serde_json::json!({ "code": e.code, "message": e.message });
                let _ = tx.send(Bytes::from(format!("event: error\ndata: {data}\n\n"))).await;
                return;
            }
        };
        let full = page.len() as u32 == PAGE;
        for mut event in page {
            last = event.id;
            if let (Some(stored), Some(uid)) = (&event.sandbox, owner) {
                event.sandbox = scope.shown(stored, uid);
            }
            if tx.send(sse(&event)).await.is_err() {
                return;
            }
        }
        if full {
            continue;
        }
        if !follow {
            return;
        }
        tokio::select! {
            changed = newest.changed() => if changed.is_err() { return },
            _ = keepalive.tick() => {
                if tx.send(Bytes::from_static(b": keepalive\n\n")).await.is_err() {
                    return;
                }
            }
            () = tx.closed() => return,
        }
    }
}

/// One event in SSE framing. The data is one line of JSON (serde_json
/// escapes newlines inside strings), so no `data:` continuation is needed.
pub fn sse(event: &EventRow) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".to_owned());
    let kind: String = event.kind.chars().filter(|c| !c.is_control()).collect();
    Bytes::from(format!("id: {}\nevent: {}\ndata: {}\n\n", event.id, kind, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_framing_is_one_line_per_field() {
        let event = EventRow {
            id: 7,
            ts: "t".into(),
            sandbox: Some("a".into()),
            kind: "created".into(),
            detail: serde_json::json!({"text": "two\nlines"}),
        };
        let text = String::from_utf8(sse(&event).to_vec()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "id: 7");
        assert_eq!(lines[1], "event: created");
        assert!(lines[2].starts_with("data: {") && lines[2].contains(r"two\nlines"));
        assert!(text.ends_with("\n\n"));
    }
}
