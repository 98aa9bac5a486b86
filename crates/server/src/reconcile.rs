//! Bringing the index in line with the state directories, which are the
//! truth. At start: every sandbox directory gets a row (owner from its
//! metadata when the index never saw it), rows without a directory go, and
//! sandboxes whose supervisor died are cleaned up the way `airlock gc` does,
//! with a `supervisor_lost` event. Then every few seconds: the same check for
//! dead supervisors, and a `stopped` event for each sandbox that ended on its
//! own (deadline, idle timeout, its agent died).

use std::collections::{HashMap, HashSet};

use airlock_runtime::ops;

use crate::app::App;
use crate::db::SandboxRow;
use crate::sandbox::{self, ApiState, Loaded};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Sandboxes in the state root after reconciling.
    pub known: usize,
    /// Sandboxes whose supervisor had died.
    pub lost: usize,
    /// Index rows dropped because their directory is gone.
    pub forgotten: usize,
    /// Directories the index did not know.
    pub adopted: usize,
}

pub fn startup(app: &App) -> Summary {
    let mut summary = Summary::default();
    let rows = rows(app);
    summary.lost = collect_lost(app, &rows);
    let Some(dirs) = list(app) else { return summary };
    let mut seen = HashSet::new();
    for dir in dirs {
        seen.insert(dir.name().to_owned());
        let row = rows.get(dir.name());
        let Ok(loaded) = sandbox::load(app, dir, row) else { continue };
        if row.is_none() {
            summary.adopted += 1;
        }
        if let Err(e) = app.db.upsert_sandbox(&sandbox::row_for(&loaded)) {
            tracing::warn!(error = %e, sandbox = loaded.name(), "could not index a sandbox");
        }
        record_audit_head(app, &loaded);
        summary.known += 1;
    }
    summary.forgotten = forget_missing(app, &rows, &seen);
    summary
}

/// The periodic pass. Names the daemon is working on are left alone.
pub fn periodic(app: &App) {
    let rows = rows(app);
    let Some(dirs) = list(app) else { return };
    let loaded: Vec<Loaded> = dirs
        .into_iter()
        .filter(|d| app.busy_with(d.name()).is_none())
        .filter_map(|d| {
            let row = rows.get(d.name());
            sandbox::load(app, d, row).ok()
        })
        .collect();
    if loaded.iter().any(|l| l.lost) {
        collect_lost(app, &rows);
    }
    let mut seen: HashSet<String> = HashSet::new();
    for l in &loaded {
        seen.insert(l.name().to_owned());
        // Only sandboxes the index knows: one that appears while the
        // daemon runs is a `run` sandbox or a create still being indexed.
        if !rows.contains_key(l.name()) || l.lost {
            continue;
        }
        record_audit_head(app, l);
        match app.db.set_state(l.name(), l.state.as_str()) {
            Ok(Some(previous)) if previous == "running" && l.state != ApiState::Running => {
                crate::api::sandboxes::record_stopped(app, l, l.state.as_str(), "ended");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, sandbox = l.name(), "could not update the index"),
        }
    }
    // Also count busy names as present: they are being worked on.
    for name in rows.keys() {
        if app.busy_with(name).is_some() {
            seen.insert(name.clone());
        }
    }
    forget_missing(app, &rows, &seen);
}

/// Copies the head of a sandbox's audit chain into the index: a record
/// of it outside the sandbox's directory, which `airlock audit verify`
/// holds the log to. Only ever forward; a head found behind the record is
/// left for verify to report.
fn record_audit_head(app: &App, l: &Loaded) {
    use airlock_runtime::audit::chain;
    let log = l.dir.audit_path();
    match chain::read_head(&log) {
        Ok(Some(head)) => match app.db.record_audit_head(l.name(), head) {
            Ok(crate::db::HeadUpdate::Behind(recorded)) => tracing::debug!(
                sandbox = l.name(),
                recorded = recorded.seq,
                found = head.seq,
                "the audit log's head is behind the one the index recorded"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, sandbox = l.name(), "could not record an audit head"),
        },
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, sandbox = l.name(), "cannot read the audit head"),
    }
}

fn rows(app: &App) -> HashMap<String, SandboxRow> {
    match app.db.sandboxes() {
        Ok(rows) => rows.into_iter().map(|r| (r.name.clone(), r)).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the index");
            HashMap::new()
        }
    }
}

fn list(app: &App) -> Option<Vec<airlock_runtime::state::SandboxDir>> {
    match app.root.list() {
        Ok(dirs) => Some(dirs),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the state directory");
            None
        }
    }
}

/// Runs `airlock gc` semantics and records what it found. Returns how many
/// sandboxes had lost their supervisor.
fn collect_lost(app: &App, rows: &HashMap<String, SandboxRow>) -> usize {
    let report = match ops::gc(&app.root) {
        Ok(report) => report,
        Err(e) => {
            tracing::warn!(error = %e, "cleaning up after dead supervisors failed");
            return 0;
        }
    };
    let owner = |name: &str| {
        rows.get(name).map(|r| r.owner_uid).or_else(|| {
            let dir = app.root.open(name).ok()?;
            sandbox::load(app, dir, None).ok().map(|l| l.owner_uid)
        })
    };
    for name in &report.lost {
        tracing::warn!(sandbox = name, "the sandbox's supervisor died; cleaned up after it");
        app.record_event(
            Some(name),
            owner(name),
            "supervisor_lost",
            serde_json::json!({ "released": released_by(&report.released, app, name) }),
        );
        if let Err(e) = app.db.set_state(name, ApiState::Failed.as_str()) {
            tracing::warn!(error = %e, sandbox = name, "could not update the index");
        }
    }
    for name in &report.removed {
        app.record_event(
            Some(name),
            owner(name),
            "destroyed",
            serde_json::json!({ "reason": "cleanup rule for failed sandboxes" }),
        );
        if let Err(e) = app.db.delete_sandbox(name) {
            tracing::warn!(error = %e, sandbox = name, "could not update the index");
        }
    }
    report.lost.len()
}

/// The kernel objects in a gc report that were `name`'s: its cgroup
/// (`cgroup NAME-HASH`, the name cut to 48 bytes as the runtime does) and
/// mounts below its state directory.
fn released_by(released: &[String], app: &App, name: &str) -> Vec<String> {
    let cgroup = format!("cgroup {}-", name.get(..48).unwrap_or(name));
    let mount = format!("mount {}/", app.root.path().join(name).display());
    released.iter().filter(|r| r.starts_with(&cgroup) || r.starts_with(&mount)).cloned().collect()
}

/// Drops index rows whose directory is gone (removed with `airlock rm` or
/// by hand), with a `destroyed` event. Returns how many.
fn forget_missing(app: &App, rows: &HashMap<String, SandboxRow>, present: &HashSet<String>) -> usize {
    let mut n = 0;
    for (name, row) in rows {
        if present.contains(name) || app.root.open(name).is_ok() {
            continue;
        }
        if let Err(e) = app.db.delete_sandbox(name) {
            tracing::warn!(error = %e, sandbox = name, "could not update the index");
            continue;
        }
        app.record_event(
            Some(name),
            Some(row.owner_uid),
            "destroyed",
            serde_json::json!({ "reason": "state directory removed outside the daemon" }),
        );
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use airlock_runtime::state::StateRoot;

    use super::*;
    use crate::db::Db;

    fn write_meta(root: &StateRoot, name: &str, state: &str, extra: serde_json::Value) {
        let dir = root.create_sandbox(Some(name)).unwrap();
        let mut meta = serde_json::json!({
            "name": name, "created_at": "2026-01-01T00:00:00.000Z", "policy": "dev", "workspace": null,
            "workspace_mode": "none", "command": [], "state": state, "supervisor_pid": null,
            "host_uid": null, "cgroup": null, "started_at": null, "finished_at": null,
            "exit": null, "applied_at": null, "degraded": []
        });
        if let (Some(m), Some(e)) = (meta.as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        std::fs::write(dir.meta_path(), serde_json::to_vec(&meta).unwrap()).unwrap();
    }

    #[test]
    fn startup_adopts_forgets_and_collects() {
        let tmp = tempfile::tempdir().unwrap();
        let root = StateRoot::at(tmp.path().to_path_buf());
        write_meta(&root, "done", "exited", serde_json::json!({ "owner_uid": 1234, "labels": { "a": "b" } }));
        // Says running, but nobody holds its lock: its supervisor died.
        write_meta(&root, "orphan", "running", serde_json::json!({}));
        let app = App::with_db(root, Db::in_memory().unwrap());
        app.db
            .upsert_sandbox(&SandboxRow {
                name: "gone".into(),
                owner_uid: 5,
                labels: BTreeMap::new(),
                policy: "dev".into(),
                state: "running".into(),
                created_at: "t".into(),
            })
            .unwrap();

        let summary = startup(&app);
        assert_eq!(summary, Summary { known: 2, lost: 1, forgotten: 1, adopted: 2 });
        let done = app.db.sandbox("done").unwrap().unwrap();
        assert_eq!(done.owner_uid, 1234);
        assert_eq!(done.labels["a"], "b");
        assert_eq!(done.state, "stopped");
        assert_eq!(app.db.sandbox("orphan").unwrap().unwrap().state, "failed");
        assert!(app.db.sandbox("gone").unwrap().is_none());
        let kinds: Vec<String> =
            app.db.events_after(0, None, &[], 100).unwrap().into_iter().map(|e| e.kind).collect();
        assert!(kinds.contains(&"supervisor_lost".to_string()), "{kinds:?}");
        assert!(kinds.contains(&"destroyed".to_string()), "{kinds:?}");

        // A second start changes nothing.
        let again = startup(&app);
        assert_eq!(again, Summary { known: 2, lost: 0, forgotten: 0, adopted: 0 });
    }
}
