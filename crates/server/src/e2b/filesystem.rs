//! envd's `filesystem.Filesystem` service: stat, list (with depth), make a
//! directory, move, remove, and watch a directory, streamed (`WatchDir`) or
//! polled (`CreateWatcher`, `GetWatcherEvents`, `RemoveWatcher`).
//!
//! Each is one of `runtime::files`' typed operations, carried out by the
//! sandbox's agent in the sandbox's own view, as the native files API's
//! are; paths must be absolute.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use airlock_proto::file::{FileInfo, FileKind, WatchEvent, WatchEventKind};
use airlock_runtime::files::{self, FilesError};
use airlock_runtime::supervisor::SupervisorClient;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::response::Response;
use axum::routing::post;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::E2b;
use super::access::EnvdCaller;
use super::connect::{self, ConnectError, Message};
use crate::api::exec::Target;

/// Events a polled watcher keeps for its client; beyond, the oldest go.
const WATCHER_BACKLOG: usize = 10_000;
/// Polled watchers one sandbox may have at once (the agent caps its
/// watches too).
const WATCHERS_PER_SANDBOX: usize = 16;

pub(crate) fn routes() -> axum::Router<Arc<E2b>> {
    axum::Router::new()
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Move", post(move_entry))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route("/filesystem.Filesystem/WatchDir", post(watch_dir))
        .route("/filesystem.Filesystem/CreateWatcher", post(create_watcher))
        .route("/filesystem.Filesystem/GetWatcherEvents", post(get_watcher_events))
        .route("/filesystem.Filesystem/RemoveWatcher", post(remove_watcher))
}

#[derive(Debug, Default, Deserialize)]
struct PathRequest {
    #[serde(default)]
    path: String,
}

#[derive(Debug, Default, Deserialize)]
struct ListDirRequest {
    #[serde(default)]
    path: String,
    #[serde(default)]
    depth: u32,
}

#[derive(Debug, Default, Deserialize)]
struct MoveRequest {
    #[serde(default)]
    source: String,
    #[serde(default)]
    destination: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatchRequest {
    #[serde(default)]
    path: String,
    #[serde(default)]
    recursive: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatcherRequest {
    #[serde(default)]
    watcher_id: String,
}

/// An absolute path, as every operation needs.
pub(crate) fn absolute(path: &str) -> Result<String, ConnectError> {
    if !path.starts_with('/') {
        return Err(ConnectError::invalid(format!(
            "path {path:?} must be absolute (airlock does not resolve paths against a home directory)"
        )));
    }
    let trimmed = path.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/".to_owned() } else { trimmed.to_owned() })
}

/// Runs a file operation in the caller's sandbox; answers its result and
/// the sandbox it ran in (to record the event with).
pub(crate) async fn on_files<T: Send + 'static>(
    e2b: &E2b,
    caller: &EnvdCaller,
    op: impl FnOnce(&SupervisorClient) -> Result<T, FilesError> + Send + 'static,
) -> Result<(T, Target), ConnectError> {
    let target = crate::api::exec::connect(&e2b.app, caller.peer, &caller.sandbox_id).await?;
    let client = target.client.clone();
    let answer =
        tokio::task::spawn_blocking(move || op(&client)).await.map_err(crate::error::ApiError::from)?;
    Ok((answer.map_err(|e| ConnectError::from(crate::api::files::refusal(e)))?, target))
}

/// Records a change to the sandbox's files, its paths redacted of secret
/// values by the sandbox's supervisor, as the native files API does.
async fn record(e2b: &E2b, target: Target, kind: &'static str, detail: serde_json::Value) {
    e2b.app.record_redacted(target.client, target.stored, target.owner, kind, detail).await;
}

/// `EntryInfo` of the entry at `path`.
pub(crate) fn entry_info(path: &str, info: &FileInfo) -> serde_json::Value {
    let name = path.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("/");
    let kind = match info.kind {
        FileKind::Regular => "FILE_TYPE_FILE",
        FileKind::Directory => "FILE_TYPE_DIRECTORY",
        FileKind::Symlink => "FILE_TYPE_SYMLINK",
        _ => "FILE_TYPE_UNSPECIFIED",
    };
    let mtime = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(info.mtime).unwrap_or(0))
        + Duration::from_nanos(u64::from(info.mtime_nsec));
    let mut entry = serde_json::json!({
        "name": name,
        "type": kind,
        "path": path,
        "size": connect::int64(i64::try_from(info.size).unwrap_or(i64::MAX)),
        "mode": info.mode & 0o7777,
        "permissions": permissions(info.kind, info.mode),
        "owner": info.uid.to_string(),
        "group": info.gid.to_string(),
        "modifiedTime": airlock_proto::time::rfc3339_utc(mtime),
        "isSymlink": info.kind == FileKind::Symlink,
    });
    if let Some(target) = &info.link_target {
        entry["symlinkTarget"] = serde_json::Value::String(String::from_utf8_lossy(target).into_owned());
    }
    entry
}

/// `ls -l`'s permission column, as envd shows it.
fn permissions(kind: FileKind, mode: u32) -> String {
    let mut out = String::with_capacity(10);
    out.push(match kind {
        FileKind::Directory => 'd',
        FileKind::Symlink => 'L',
        FileKind::Fifo => 'p',
        FileKind::Socket => 'S',
        FileKind::CharDevice => 'c',
        FileKind::BlockDevice => 'D',
        _ => '-',
    });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 0o7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        out.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    out
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" { format!("/{name}") } else { format!("{dir}/{name}") }
}

async fn stat(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<PathRequest>,
) -> Result<Response, ConnectError> {
    let path = absolute(&message.value.path)?;
    let target = path.clone();
    let (info, _) = on_files(&e2b, &caller, move |client| files::stat(client, &target)).await?;
    Ok(connect::unary(&serde_json::json!({ "entry": entry_info(&path, &info) })))
}

async fn list_dir(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<ListDirRequest>,
) -> Result<Response, ConnectError> {
    let path = absolute(&message.value.path)?;
    let depth = message.value.depth.clamp(1, airlock_proto::file::LIST_MAX_DEPTH);
    let target = path.clone();
    let (listing, _) =
        on_files(&e2b, &caller, move |client| files::list(client, &target, depth, None)).await?;
    let mut entries: Vec<serde_json::Value> = listing
        .entries
        .iter()
        .map(|e| entry_info(&join(&path, &String::from_utf8_lossy(&e.name)), &e.info))
        .collect();
    entries.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    Ok(connect::unary(&serde_json::json!({ "entries": entries })))
}

async fn make_dir(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<PathRequest>,
) -> Result<Response, ConnectError> {
    let path = absolute(&message.value.path)?;
    let target = path.clone();
    // envd makes the parents too, and says when the directory was there.
    let (made, sandbox) = on_files(&e2b, &caller, move |client| match files::stat(client, &target) {
        Ok(info) => Ok(Err(info.kind)),
        Err(FilesError::NotFound { .. }) => {
            files::mkdir(client, &target, true, None)?;
            files::stat(client, &target).map(Ok)
        }
        Err(e) => Err(e),
    })
    .await?;
    match made {
        Ok(info) => {
            record(&e2b, sandbox, "file_mkdir", serde_json::json!({ "path": path })).await;
            Ok(connect::unary(&serde_json::json!({ "entry": entry_info(&path, &info) })))
        }
        Err(found) => Err(ConnectError::new(
            "already_exists",
            format!("{path} already exists in the sandbox ({})", found.describe()),
        )),
    }
}

async fn move_entry(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<MoveRequest>,
) -> Result<Response, ConnectError> {
    let (from, to) = (absolute(&message.value.source)?, absolute(&message.value.destination)?);
    let (source, destination) = (from.clone(), to.clone());
    let (info, sandbox) = on_files(&e2b, &caller, move |client| {
        files::rename(client, &source, &destination, true)?;
        files::stat(client, &destination)
    })
    .await?;
    record(&e2b, sandbox, "file_renamed", serde_json::json!({ "path": from, "to": to })).await;
    Ok(connect::unary(&serde_json::json!({ "entry": entry_info(&to, &info) })))
}

async fn remove(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<PathRequest>,
) -> Result<Response, ConnectError> {
    let path = absolute(&message.value.path)?;
    let target = path.clone();
    let ((), sandbox) = on_files(&e2b, &caller, move |client| files::remove(client, &target, true)).await?;
    record(&e2b, sandbox, "file_removed", serde_json::json!({ "path": path })).await;
    Ok(connect::unary(&serde_json::json!({})))
}

/// A watch event as envd's `FilesystemEvent`; `None` for what it has no
/// word for (lost events) and for the temporary file of a write in
/// progress (envd writes in place; its clients expect the target's events).
fn filesystem_event(event: &WatchEvent) -> Option<serde_json::Value> {
    let base = event.name.rsplit(|b| *b == b'/').next().unwrap_or(&event.name);
    if base.starts_with(airlock_proto::file::WRITE_TEMP_PREFIX.as_bytes()) {
        return None;
    }
    let kind = match event.kind {
        WatchEventKind::Created | WatchEventKind::RenamedTo => "EVENT_TYPE_CREATE",
        WatchEventKind::Modified => "EVENT_TYPE_WRITE",
        WatchEventKind::Removed => "EVENT_TYPE_REMOVE",
        WatchEventKind::RenamedFrom => "EVENT_TYPE_RENAME",
        WatchEventKind::Overflow | WatchEventKind::Gone => return None,
    };
    Some(serde_json::json!({ "name": String::from_utf8_lossy(&event.name), "type": kind }))
}

/// Runs a watch of `path` on a blocking thread, handing each event to
/// `deliver` until it answers false; `started` learns whether the watch
/// began (or why not), and `ended`, once it began, how it ended.
fn spawn_watch(
    client: SupervisorClient,
    path: String,
    recursive: bool,
    started: oneshot::Sender<Result<(), FilesError>>,
    mut deliver: impl FnMut(Option<serde_json::Value>) -> bool + Send + 'static,
    ended: impl FnOnce(Result<(), FilesError>) + Send + 'static,
) {
    tokio::task::spawn_blocking(move || {
        let mut started = Some(started);
        let result = files::watch(&client, &path, recursive, &mut |event| {
            if let Some(started) = started.take() {
                let _ = started.send(Ok(()));
            }
            match event {
                None => deliver(None),
                Some(event) if event.kind == WatchEventKind::Gone => false,
                Some(event) => match filesystem_event(event) {
                    Some(json) => deliver(Some(json)),
                    None => true,
                },
            }
        });
        match (started.take(), result) {
            // It never began: the caller answers with why.
            (Some(started), Err(e)) => {
                let _ = started.send(Err(e));
            }
            (_, result) => ended(result),
        }
    });
}

async fn watch_dir(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<WatchRequest>,
) -> Response {
    if !message.streaming {
        return connect::refuse(false, ConnectError::invalid("WatchDir is a server-streaming method"));
    }
    let path = match absolute(&message.value.path) {
        Ok(path) => path,
        Err(e) => return connect::stream_error(e),
    };
    let target = match crate::api::exec::connect(&e2b.app, caller.peer, &caller.sandbox_id).await {
        Ok(target) => target,
        Err(e) => return connect::stream_error(e.into()),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let (started_tx, started_rx) = oneshot::channel();
    let events = tx.clone();
    let deliver = move |event: Option<serde_json::Value>| match event {
        // Quiet: go on while the client is there.
        None => !events.is_closed(),
        Some(json) => {
            events.blocking_send(connect::stream_message(&serde_json::json!({ "filesystem": json }))).is_ok()
        }
    };
    // A stream ends with its end envelope, whatever ended the watch.
    let end = tx.clone();
    let ended = move |result: Result<(), FilesError>| {
        let error = result.err().map(|e| ConnectError::new("unavailable", e.to_string()));
        let _ = end.blocking_send(connect::stream_end(error.as_ref()));
    };
    spawn_watch(target.client, path, message.value.recursive, started_tx, deliver, ended);
    match started_rx.await {
        Ok(Ok(())) => {
            let _ = tx.send(connect::stream_message(&serde_json::json!({ "start": {} }))).await;
        }
        Ok(Err(e)) => return connect::stream_error(ConnectError::from(crate::api::files::refusal(e))),
        Err(_) => {
            return connect::stream_error(ConnectError::new("internal", "the watch ended before it began"));
        }
    }
    let keepalive = connect::stream_message(&serde_json::json!({ "keepalive": {} }));
    connect::streamed(rx, Some((message.keepalive, keepalive)))
}

/// A polled watch: its events wait here for `GetWatcherEvents`.
struct Watcher {
    stored: String,
    events: Mutex<VecDeque<serde_json::Value>>,
    stop: AtomicBool,
    /// The watch is over (removed, or its directory or sandbox went away).
    ended: AtomicBool,
}

/// Every sandbox's polled watchers, by id.
#[derive(Default)]
pub(crate) struct Watchers {
    map: Mutex<HashMap<String, Arc<Watcher>>>,
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Watcher>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The caller's watcher `id`: another sandbox's is not found.
    fn get(&self, caller: &EnvdCaller, id: &str) -> Result<Arc<Watcher>, ConnectError> {
        self.lock()
            .get(id)
            .filter(|w| w.stored == caller.stored)
            .cloned()
            .ok_or_else(|| ConnectError::new("not_found", format!("watcher {id:?} not found")))
    }
}

async fn create_watcher(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<WatchRequest>,
) -> Result<Response, ConnectError> {
    let path = absolute(&message.value.path)?;
    let count = {
        let mut watchers = e2b.watchers.lock();
        // Ended watches hold no place: their directory or sandbox is gone.
        watchers.retain(|_, w| !w.ended.load(Ordering::SeqCst));
        watchers.values().filter(|w| w.stored == caller.stored).count()
    };
    if count >= WATCHERS_PER_SANDBOX {
        return Err(ConnectError::new(
            "resource_exhausted",
            format!("a sandbox may have at most {WATCHERS_PER_SANDBOX} watchers; remove one first"),
        ));
    }
    let target = crate::api::exec::connect(&e2b.app, caller.peer, &caller.sandbox_id).await?;
    let watcher = Arc::new(Watcher {
        stored: caller.stored.clone(),
        events: Mutex::new(VecDeque::new()),
        stop: AtomicBool::new(false),
        ended: AtomicBool::new(false),
    });
    let (started_tx, started_rx) = oneshot::channel();
    let kept = watcher.clone();
    let over = watcher.clone();
    spawn_watch(
        target.client,
        path,
        message.value.recursive,
        started_tx,
        move |event| {
            if let Some(json) = event {
                let mut events = kept.events.lock().unwrap_or_else(|p| p.into_inner());
                if events.len() >= WATCHER_BACKLOG {
                    events.pop_front();
                }
                events.push_back(json);
            }
            !kept.stop.load(Ordering::SeqCst)
        },
        move |_| over.ended.store(true, Ordering::SeqCst),
    );
    match started_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ConnectError::from(crate::api::files::refusal(e))),
        Err(_) => return Err(ConnectError::new("internal", "the watch ended before it began")),
    }
    let id = super::access::new_token()?[..32].to_owned();
    e2b.watchers.lock().insert(id.clone(), watcher);
    Ok(connect::unary(&serde_json::json!({ "watcherId": id })))
}

async fn get_watcher_events(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<WatcherRequest>,
) -> Result<Response, ConnectError> {
    let watcher = e2b.watchers.get(&caller, &message.value.watcher_id)?;
    let events: Vec<serde_json::Value> =
        watcher.events.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
    if events.is_empty() && watcher.ended.load(Ordering::SeqCst) {
        e2b.watchers.lock().remove(&message.value.watcher_id);
        return Err(ConnectError::new(
            "not_found",
            format!("watcher {:?} ended: its directory is gone", message.value.watcher_id),
        ));
    }
    Ok(connect::unary(&serde_json::json!({ "events": events })))
}

async fn remove_watcher(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    message: Message<WatcherRequest>,
) -> Result<Response, ConnectError> {
    let watcher = e2b.watchers.get(&caller, &message.value.watcher_id)?;
    watcher.stop.store(true, Ordering::SeqCst);
    e2b.watchers.lock().remove(&message.value.watcher_id);
    Ok(connect::unary(&serde_json::json!({})))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn entries_read_as_envd_writes_them() {
        let info = FileInfo {
            kind: FileKind::Regular,
            size: 5,
            mode: 0o644,
            mtime: 0,
            mtime_nsec: 0,
            uid: 0,
            gid: 0,
            link_target: None,
        };
        let entry = entry_info("/tmp/a.txt", &info);
        assert_eq!(entry["name"], "a.txt");
        assert_eq!(entry["type"], "FILE_TYPE_FILE");
        assert_eq!(entry["size"], "5");
        assert_eq!(entry["permissions"], "-rw-r--r--");
        assert!(entry["modifiedTime"].as_str().unwrap().starts_with("1970-01-01T00:00:00"));
        assert_eq!(permissions(FileKind::Directory, 0o755), "drwxr-xr-x");
        assert_eq!(absolute("/tmp/").unwrap(), "/tmp");
        assert_eq!(absolute("/").unwrap(), "/");
        assert!(absolute("tmp").is_err());
    }

    #[test]
    fn watch_events_get_envd_names() {
        let event = |kind| WatchEvent { kind, name: b"a".to_vec(), dir: false, cookie: 0 };
        assert_eq!(filesystem_event(&event(WatchEventKind::Created)).unwrap()["type"], "EVENT_TYPE_CREATE");
        assert_eq!(filesystem_event(&event(WatchEventKind::Modified)).unwrap()["type"], "EVENT_TYPE_WRITE");
        assert!(filesystem_event(&event(WatchEventKind::Overflow)).is_none());
        let temp = WatchEvent { name: b"d/.airlock-write.1.1.ab".to_vec(), ..event(WatchEventKind::Created) };
        assert!(filesystem_event(&temp).is_none());
    }
}
