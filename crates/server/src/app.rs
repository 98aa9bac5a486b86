//! What every handler shares: the state root, the index, the event
//! notifier, the metrics, and the names being created right now.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use airlock_runtime::state::StateRoot;
use airlock_runtime::supervisor::SupervisorClient;
use axum::http::StatusCode;
use tokio::sync::watch;

use crate::db::Db;
use crate::error::{ApiError, DaemonError};

pub struct App {
    pub root: StateRoot,
    pub db: Db,
    /// The id of the newest event; followers of `/v1/events` wait on it.
    events: watch::Sender<i64>,
    pub metrics: Metrics,
    /// Sandboxes this daemon is creating, stopping or removing right now:
    /// the periodic reconcile leaves them alone, and a second operation on
    /// the same name is refused until the first ends.
    busy: Mutex<HashMap<String, Op>>,
    /// The uid the daemon runs as.
    pub daemon_uid: u32,
}

impl App {
    /// Opens the index in the state root.
    pub fn open(root: StateRoot) -> Result<App, DaemonError> {
        let db = Db::open(&crate::db::index_path(root.path()))?;
        Ok(App::with_db(root, db))
    }

    pub fn with_db(root: StateRoot, db: Db) -> App {
        let (events, _) = watch::channel(0);
        App {
            root,
            db,
            events,
            metrics: Metrics::default(),
            busy: Mutex::new(HashMap::new()),
            daemon_uid: rustix::process::geteuid().as_raw(),
        }
    }

    /// Runs `f` on a blocking thread: the runtime's calls (supervisor
    /// sockets, file walks, SQLite) all block.
    pub async fn blocking<T, F>(self: &Arc<Self>, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Arc<App>) -> Result<T, ApiError> + Send + 'static,
    {
        let app = self.clone();
        tokio::task::spawn_blocking(move || f(&app)).await?
    }

    /// Appends an event to the index and wakes the followers. A failure to
    /// record is logged, never fatal to the operation that caused it.
    pub fn record_event(
        &self,
        sandbox: Option<&str>,
        owner: Option<u32>,
        kind: &str,
        detail: serde_json::Value,
    ) {
        let ts = airlock_runtime::now_rfc3339();
        match self.db.record_event(&ts, sandbox, owner, kind, &detail) {
            Ok(id) => {
                self.events.send_replace(id);
            }
            Err(e) => tracing::warn!(error = %e, kind, sandbox, "could not record an event"),
        }
    }

    /// Records an event about a running sandbox whose strings came from
    /// its caller (paths), each redacted by the sandbox's supervisor first
    /// (`redact`), on a blocking thread.
    pub async fn record_redacted(
        self: &Arc<Self>,
        client: SupervisorClient,
        sandbox: String,
        owner: u32,
        kind: &'static str,
        detail: serde_json::Value,
    ) {
        let app = self.clone();
        let recorded = tokio::task::spawn_blocking(move || {
            let detail = crate::redact::detail(&client, detail);
            app.record_event(Some(&sandbox), Some(owner), kind, detail);
        })
        .await;
        if let Err(e) = recorded {
            tracing::warn!(error = %e, kind, "could not record an event");
        }
    }

    pub fn subscribe_events(&self) -> watch::Receiver<i64> {
        self.events.subscribe()
    }

    /// Marks `name` as under `op`; `Err` with the operation already under
    /// way if there is one.
    pub fn claim(self: &Arc<Self>, name: &str, op: Op) -> Result<BusyGuard, Op> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(current) = busy.get(name) {
            return Err(*current);
        }
        busy.insert(name.to_owned(), op);
        Ok(BusyGuard { app: self.clone(), name: name.to_owned() })
    }

    /// Whose names `peer` uses (see `scope`).
    pub fn scope(&self, peer: &crate::auth::Peer) -> crate::scope::Scope {
        crate::scope::Scope::of(peer, self.daemon_uid)
    }

    pub fn busy_with(&self, name: &str) -> Option<Op> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).get(name).copied()
    }
}

/// A lifecycle operation the daemon has under way on a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Stop,
    Remove,
}

impl Op {
    pub fn doing(self) -> &'static str {
        match self {
            Op::Create => "being created",
            Op::Stop => "being stopped",
            Op::Remove => "being removed",
        }
    }
}

/// Releases its name when dropped.
pub struct BusyGuard {
    app: Arc<App>,
    name: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.app.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.name);
    }
}

/// Counters for `/metrics` (since this daemon started), kept per user so
/// that each caller is shown their own totals (root: everyone's).
#[derive(Default)]
pub struct Metrics {
    /// Execs started, by the owner of the sandbox they ran in.
    execs: Mutex<BTreeMap<u32, u64>>,
    /// Responses by caller (`None`: one that could not be identified) and
    /// status.
    responses: Mutex<BTreeMap<(Option<u32>, u16), u64>>,
}

impl Metrics {
    pub fn count_exec(&self, owner: u32) {
        *self.execs.lock().unwrap_or_else(|p| p.into_inner()).entry(owner).or_default() += 1;
    }

    /// Execs in the sandboxes of `owner`, or in all of them (`None`).
    pub fn execs(&self, owner: Option<u32>) -> u64 {
        let execs = self.execs.lock().unwrap_or_else(|p| p.into_inner());
        execs.iter().filter(|(uid, _)| owner.is_none_or(|o| o == **uid)).map(|(_, n)| n).sum()
    }

    pub fn count_response(&self, caller: Option<u32>, status: StatusCode) {
        let mut responses = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        *responses.entry((caller, status.as_u16())).or_default() += 1;
    }

    /// Responses by status to `caller`, or to everyone (`None`).
    pub fn responses(&self, caller: Option<u32>) -> BTreeMap<u16, u64> {
        let responses = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = BTreeMap::new();
        for ((uid, status), n) in responses.iter() {
            if caller.is_none() || *uid == caller {
                *out.entry(*status).or_default() += n;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_counts_alone_and_root_counts_all() {
        let m = Metrics::default();
        m.count_exec(1000);
        m.count_exec(0);
        m.count_exec(0);
        m.count_response(Some(1000), StatusCode::OK);
        m.count_response(Some(0), StatusCode::OK);
        m.count_response(Some(0), StatusCode::NOT_FOUND);
        m.count_response(None, StatusCode::FORBIDDEN);
        assert_eq!((m.execs(Some(1000)), m.execs(Some(1001)), m.execs(None)), (1, 0, 3));
        assert_eq!(m.responses(Some(1000)), BTreeMap::from([(200, 1)]));
        assert!(m.responses(Some(1001)).is_empty());
        assert_eq!(m.responses(None), BTreeMap::from([(200, 2), (403, 1), (404, 1)]));
    }
}
