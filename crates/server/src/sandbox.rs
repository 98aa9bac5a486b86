//! A sandbox as the API sees it: its state directory (the truth about its
//! files and life) joined with its index row (owner, labels), in one shape
//! for list, inspect and events.

use std::collections::{BTreeMap, HashMap};

use airlock_runtime::state::{SandboxDir, SandboxMeta, StateError};
use serde::Serialize;

pub use airlock_runtime::view::DaemonFacts;

use crate::app::App;
use crate::auth::Peer;
use crate::db::SandboxRow;
use crate::error::ApiError;
use crate::scope::Scope;

/// The states the API reports: the runtime's one vocabulary.
pub use airlock_runtime::view::State as ApiState;

/// A `state` query value.
pub fn parse_state(s: &str) -> Result<ApiState, ApiError> {
    ApiState::parse(s).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_query",
            format!("unknown state {s:?}; states are creating, running, stopped, failed"),
        )
    })
}

/// One sandbox, loaded.
pub struct Loaded {
    pub dir: SandboxDir,
    pub meta: Option<SandboxMeta>,
    pub owner_uid: u32,
    pub labels: BTreeMap<String, String>,
    pub live: bool,
    pub state: ApiState,
    pub lost: bool,
    pub row_policy: Option<String>,
    pub row_created_at: Option<String>,
}

impl Loaded {
    pub fn name(&self) -> &str {
        self.dir.name()
    }

    pub fn policy(&self) -> String {
        self.meta.as_ref().map(|m| m.policy.clone()).or_else(|| self.row_policy.clone()).unwrap_or_default()
    }

    pub fn created_at(&self) -> String {
        self.meta
            .as_ref()
            .map(|m| m.created_at.clone())
            .or_else(|| self.row_created_at.clone())
            .unwrap_or_default()
    }
}

/// Reads one sandbox directory. Missing metadata (a creation in progress)
/// is not an error; unreadable metadata is reported as such.
pub fn load(app: &App, dir: SandboxDir, row: Option<&SandboxRow>) -> Result<Loaded, ApiError> {
    let path = dir.meta_path();
    let raw = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or(serde_json::Value::Null),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
        Err(e) => return Err(ApiError::internal(format!("cannot read {}: {e}", path.display()))),
    };
    let meta = serde_json::from_value::<SandboxMeta>(raw.clone()).ok();
    let live = dir.is_live();
    let (state, lost) =
        ApiState::of(meta.as_ref(), live, app.busy_with(dir.name()) == Some(crate::app::Op::Create));
    let owner_uid = row
        .map(|r| r.owner_uid)
        .or_else(|| raw.get("owner_uid").and_then(|v| v.as_u64()).and_then(|v| u32::try_from(v).ok()))
        .unwrap_or(app.daemon_uid);
    let labels = match row {
        Some(r) => r.labels.clone(),
        None => raw
            .get("labels")
            .and_then(|l| l.as_object())
            .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
            .unwrap_or_default(),
    };
    Ok(Loaded {
        dir,
        meta,
        owner_uid,
        labels,
        live,
        state,
        lost,
        row_policy: row.map(|r| r.policy.clone()),
        row_created_at: row.map(|r| r.created_at.clone()),
    })
}

/// The sandbox `peer` calls `name`, if they may see it; a sandbox of
/// another user is "not found", exactly like one that does not exist (and
/// the denial is logged). Names are the caller's own (`scope`): the
/// returned sandbox's `name()` is its stored name, for the runtime and the
/// index; messages quote `name`.
pub fn authorize(app: &App, peer: &Peer, name: &str) -> Result<Loaded, ApiError> {
    let scope = app.scope(peer);
    let stored = scope.stored(name)?;
    let dir = match app.root.open(&stored) {
        Ok(dir) => dir,
        Err(StateError::NotFound { .. }) => {
            // A plain name can still be the caller's own sandbox from before
            // names were per owner. The index decides, not the directory:
            // someone else's sandbox of that name is not even read, so the
            // answer takes no longer for it than for a name nobody has.
            let own_legacy = scope.legacy(name).filter(|legacy| {
                app.db.sandbox(legacy).ok().flatten().is_some_and(|r| r.owner_uid == peer.uid)
            });
            match own_legacy.map(|legacy| app.root.open(&legacy)) {
                Some(Ok(dir)) => dir,
                Some(Err(StateError::NotFound { .. })) | None => return Err(ApiError::no_sandbox(name)),
                Some(Err(e)) => return Err(scope.reword(e.into(), &stored, name)),
            }
        }
        Err(e) => return Err(scope.reword(e.into(), &stored, name)),
    };
    let row = app.db.sandbox(dir.name())?;
    let loaded = load(app, dir, row.as_ref())?;
    if !peer.may_access(loaded.owner_uid) || scope.shown(loaded.name(), loaded.owner_uid).is_none() {
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, sandbox = loaded.name(), owner = loaded.owner_uid, "denied: sandbox of another user");
        return Err(ApiError::no_sandbox(name));
    }
    Ok(loaded)
}

/// Every sandbox `peer` may see, oldest first. A user's listing loads only
/// their own sandboxes (their prefix, or an index row of theirs): how long
/// it takes does not depend on anyone else's.
pub fn visible(app: &App, peer: &Peer) -> Result<Vec<Loaded>, ApiError> {
    let scope = app.scope(peer);
    let rows: HashMap<String, SandboxRow> =
        app.db.sandboxes()?.into_iter().map(|r| (r.name.clone(), r)).collect();
    let mut out = Vec::new();
    for dir in app.root.list()? {
        let row = rows.get(dir.name());
        let candidate = match scope.tenant() {
            None => true,
            Some(uid) => {
                dir.name().starts_with(&airlock_runtime::state::tenant_prefix(uid))
                    || row.is_some_and(|r| r.owner_uid == uid && scope.may_hold(&r.name))
            }
        };
        if !candidate {
            continue;
        }
        match load(app, dir, row) {
            Ok(loaded)
                if peer.may_access(loaded.owner_uid)
                    && scope.shown(loaded.name(), loaded.owner_uid).is_some() =>
            {
                out.push(loaded)
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("skipping a sandbox in the listing: {e}"),
        }
    }
    Ok(out)
}

/// What list and inspect show: the runtime's one view, and what only the
/// daemon knows (owner, labels; exec counts in inspect).
#[derive(Debug, Serialize)]
pub struct SandboxView {
    #[serde(flatten)]
    pub view: airlock_runtime::view::SandboxView,
    #[serde(flatten)]
    pub daemon: DaemonFacts,
}

/// What `scope`'s caller is shown of `loaded`: under their own name.
pub fn view(loaded: &Loaded, scope: &Scope) -> SandboxView {
    let name = scope.shown(loaded.name(), loaded.owner_uid).unwrap_or_else(|| loaded.name().to_owned());
    let mut view =
        airlock_runtime::view::SandboxView::of(&name, loaded.meta.as_ref(), (loaded.state, loaded.lost));
    view.policy = loaded.policy();
    view.created_at = loaded.created_at();
    SandboxView {
        view,
        daemon: DaemonFacts {
            owner_uid: Some(loaded.owner_uid),
            labels: loaded.labels.clone(),
            execs_total: None,
            execs_running: None,
        },
    }
}

/// The view with the detail inspect adds. Blocks: it reads the stored
/// policy and asks a live supervisor for its current deadline.
pub fn inspect(app: &App, loaded: &Loaded, scope: &Scope) -> SandboxView {
    let mut v = view(loaded, scope);
    let (detail, status) =
        airlock_runtime::view::Detail::read(&loaded.dir, loaded.meta.as_ref(), loaded.state, loaded.live);
    let running = loaded.state == ApiState::Running;
    let (execs_total, execs_indexed) = app.db.exec_counts(loaded.name()).unwrap_or((0, 0));
    v.view.detail = Some(detail);
    v.daemon.execs_total = Some(execs_total);
    v.daemon.execs_running =
        Some(status.map_or(if running { execs_indexed } else { 0 }, |s| s.execs_running));
    v
}

/// The index row for a sandbox as it is now.
pub fn row_for(loaded: &Loaded) -> SandboxRow {
    SandboxRow {
        name: loaded.name().to_owned(),
        owner_uid: loaded.owner_uid,
        labels: loaded.labels.clone(),
        policy: loaded.policy(),
        state: loaded.state.as_str().to_owned(),
        created_at: loaded.created_at(),
    }
}

/// Opens a file the runtime wrote in a sandbox's state directory (a log,
/// the audit log) for reading, never following a link there; `None` when
/// it does not exist (yet).
pub fn open_state_file(path: &std::path::Path) -> Result<Option<std::fs::File>, ApiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::File::options()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path);
    match opened {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ApiError::internal(format!("reading {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod scope_tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use airlock_runtime::state::StateRoot;

    use super::*;
    use crate::db::Db;

    /// A stopped sandbox `name` owned by `owner`, indexed.
    fn sandbox(app: &App, name: &str, owner: u32) {
        let dir = app.root.create_sandbox(Some(name)).unwrap();
        let meta = serde_json::json!({
            "name": name, "created_at": "2026-01-01T00:00:00.000Z", "policy": "dev", "workspace": null,
            "workspace_mode": "none", "command": [], "state": "stopped", "supervisor_pid": null,
            "host_uid": null, "cgroup": null, "started_at": null, "finished_at": null,
            "exit": null, "applied_at": null, "degraded": [], "owner_uid": owner
        });
        std::fs::write(dir.meta_path(), serde_json::to_vec(&meta).unwrap()).unwrap();
        let row = SandboxRow {
            name: name.into(),
            owner_uid: owner,
            labels: BTreeMap::new(),
            policy: "dev".into(),
            state: "stopped".into(),
            created_at: "t".into(),
        };
        app.db.upsert_sandbox(&row).unwrap();
    }

    #[test]
    fn users_reach_their_own_names_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let app = App::with_db(StateRoot::at(tmp.path().to_path_buf()), Db::in_memory().unwrap());
        let (root, alice, bob) = (
            Peer { uid: 0, gid: 0, pid: None },
            Peer { uid: 1000, gid: 1000, pid: None },
            Peer { uid: 1001, gid: 1001, pid: None },
        );
        sandbox(&app, "shared", 0);
        sandbox(&app, "u1000-shared", 1000);
        sandbox(&app, "u1001-shared", 1001);
        // From before names were per owner: a plain name, owned by alice.
        sandbox(&app, "old", 1000);

        assert_eq!(authorize(&app, &alice, "shared").unwrap().name(), "u1000-shared");
        assert_eq!(authorize(&app, &bob, "shared").unwrap().name(), "u1001-shared");
        assert_eq!(authorize(&app, &root, "shared").unwrap().name(), "shared");
        assert_eq!(authorize(&app, &root, "u1000-shared").unwrap().owner_uid, 1000);
        assert_eq!(authorize(&app, &alice, "old").unwrap().name(), "old");
        for (peer, name) in
            [(&bob, "old"), (&bob, "u1000-shared"), (&alice, "u1001-shared"), (&alice, "nope")]
        {
            let err = authorize(&app, peer, name).err().unwrap();
            assert_eq!(
                (err.code, err.message.as_str()),
                ("not_found", format!("no sandbox named {name}").as_str())
            );
        }

        let shown = |peer: &Peer| {
            let scope = app.scope(peer);
            let mut names: Vec<String> =
                visible(&app, peer).unwrap().iter().map(|l| view(l, &scope).view.name).collect();
            names.sort();
            names
        };
        assert_eq!(shown(&alice), ["old", "shared"]);
        assert_eq!(shown(&bob), ["shared"]);
        assert_eq!(shown(&root), ["old", "shared", "u1000-shared", "u1001-shared"]);
    }
}
