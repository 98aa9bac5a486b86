//! The daemon's index: `<state root>/airlock.db` (SQLite). It records what
//! a sandbox's own files do not: who owns it, its labels, the execs run in it
//! and the daemon's event stream. The state directories stay the source of
//! truth for the sandboxes themselves; `reconcile` brings the two together.
//!
//! The schema is versioned with `PRAGMA user_version`: migration *n* takes a
//! database from version *n* to *n + 1*, each in its own transaction.
//! Released migrations are never edited, only appended to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use airlock_runtime::audit::chain::{self, Head};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// The migrations, in order. `MIGRATIONS.len()` is the current version.
const MIGRATIONS: &[&str] = &[
    // 1: sandboxes, execs, events.
    "CREATE TABLE sandboxes (
        name       TEXT PRIMARY KEY,
        owner_uid  INTEGER NOT NULL,
        labels     TEXT NOT NULL DEFAULT '{}',
        policy     TEXT NOT NULL,
        state      TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE execs (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        sandbox    TEXT NOT NULL,
        argv       TEXT NOT NULL,
        pid        INTEGER,
        started_at TEXT NOT NULL,
        ended_at   TEXT,
        exit_code  INTEGER,
        signal     INTEGER,
        timed_out  INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX execs_by_sandbox ON execs(sandbox);
    CREATE TABLE events (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        ts        TEXT NOT NULL,
        sandbox   TEXT,
        owner_uid INTEGER,
        kind      TEXT NOT NULL,
        detail    TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_by_owner ON events(owner_uid, id);",
    // 2: events by sandbox, to keep each sandbox's history bounded.
    "CREATE INDEX events_by_sandbox ON events(sandbox, id);",
    // 3: events numbered per owner, so a user's event ids say nothing of
    // how many events other users' sandboxes made in between.
    "ALTER TABLE events ADD COLUMN owner_seq INTEGER;
    UPDATE events SET owner_seq = (
        SELECT COUNT(*) FROM events AS e WHERE e.owner_uid = events.owner_uid AND e.id <= events.id
    ) WHERE owner_uid IS NOT NULL;
    CREATE UNIQUE INDEX events_by_owner_seq ON events(owner_uid, owner_seq);",
    // 4: the head of each sandbox's audit chain as the daemon last saw it,
    // a copy outside the sandbox's directory that `audit verify` checks.
    "ALTER TABLE sandboxes ADD COLUMN audit_seq INTEGER;
    ALTER TABLE sandboxes ADD COLUMN audit_hash TEXT;",
    // 5: the E2B API's envd access tokens (SHA-256 of each, never the
    // token), each bound to one sandbox (stored name) and its owner.
    "CREATE TABLE e2b_access (
        digest     TEXT PRIMARY KEY,
        sandbox    TEXT NOT NULL,
        owner_uid  INTEGER NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX e2b_access_by_sandbox ON e2b_access(sandbox);",
];

/// The index's file in a state root.
pub fn index_path(state_root: &Path) -> PathBuf {
    state_root.join("airlock.db")
}

/// Events kept per sandbox name: the oldest go once a sandbox (or the
/// names it was reused for) has more. Tenants choose argv and paths, and a
/// long-lived sandbox can run execs without end: the index must not grow
/// with them.
pub const EVENTS_PER_SANDBOX: i64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this airlock knows ({known}); \
         run the airlock that created it, or move the file away to start a fresh index"
    )]
    Newer { path: PathBuf, found: u32, known: u32 },
    #[error("database {path}: could not set its permissions: {source}")]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One row of `sandboxes`.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub name: String,
    pub owner_uid: u32,
    pub labels: BTreeMap<String, String>,
    pub policy: String,
    pub state: String,
    pub created_at: String,
}

/// One row of `events`, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRow {
    /// For root, the event's number in the whole log; for a user, in their
    /// own events (see [`Db::events_after`]).
    pub id: i64,
    pub ts: String,
    pub sandbox: Option<String>,
    pub kind: String,
    pub detail: serde_json::Value,
}

/// The sandbox an E2B envd access token opens: its stored name, owner and
/// creation time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct E2bAccess {
    pub sandbox: String,
    pub owner_uid: u32,
    pub created_at: String,
}

/// How an exec ended, for its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecEnd {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
}

/// The database behind one mutex: every statement is short, and the daemon
/// calls these from blocking threads.
pub struct Db {
    path: PathBuf,
    conn: Mutex<Connection>,
    events_per_sandbox: i64,
}

impl Db {
    /// Opens (creating if needed) and migrates the database at `path`. The
    /// file is 0600: labels and argv are the owners' business.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let conn = Connection::open(path).map_err(sqlite(path))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|source| DbError::Permissions { path: path.to_path_buf(), source })?;
        }
        Db::setup(path, conn)
    }

    /// A private in-memory database (tests).
    pub fn in_memory() -> Result<Db, DbError> {
        let path = Path::new(":memory:");
        Db::setup(path, Connection::open_in_memory().map_err(sqlite(path))?)
    }

    fn setup(path: &Path, mut conn: Connection) -> Result<Db, DbError> {
        // WAL lets readers run beside a writer; the busy timeout covers a
        // second process (an `airlock` CLI reading the index) holding a lock.
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(sqlite(path))?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(())).map_err(sqlite(path))?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(sqlite(path))?;
        migrate(path, &mut conn)?;
        Ok(Db { path: path.to_path_buf(), conn: Mutex::new(conn), events_per_sandbox: EVENTS_PER_SANDBOX })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (statements are atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> DbError + '_ {
        |source| DbError::Sqlite { path: self.path.clone(), source }
    }

    pub fn schema_version(&self) -> Result<u32, DbError> {
        user_version(&self.conn()).map_err(self.err())
    }

    /// Inserts a sandbox, or replaces the row of one with the same name (a
    /// row left by a sandbox removed behind the daemon's back).
    pub fn upsert_sandbox(&self, row: &SandboxRow) -> Result<(), DbError> {
        let labels = labels_json(&row.labels);
        self.conn()
            .execute(
                "INSERT INTO sandboxes (name, owner_uid, labels, policy, state, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET owner_uid = ?2, labels = ?3, policy = ?4,
                     state = ?5, created_at = ?6,
                     -- Another sandbox under the same name has a chain of its own.
                     audit_seq = CASE WHEN created_at = ?6 THEN audit_seq END,
                     audit_hash = CASE WHEN created_at = ?6 THEN audit_hash END",
                params![row.name, row.owner_uid, labels, row.policy, row.state, row.created_at],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn sandbox(&self, name: &str) -> Result<Option<SandboxRow>, DbError> {
        self.conn()
            .query_row(
                "SELECT name, owner_uid, labels, policy, state, created_at FROM sandboxes WHERE name = ?1",
                params![name],
                sandbox_row,
            )
            .optional()
            .map_err(self.err())
    }

    pub fn sandboxes(&self) -> Result<Vec<SandboxRow>, DbError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, owner_uid, labels, policy, state, created_at FROM sandboxes ORDER BY name")
            .map_err(self.err())?;
        let rows = stmt.query_map([], sandbox_row).map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Records the state the daemon last saw; returns the previous one.
    pub fn set_state(&self, name: &str, state: &str) -> Result<Option<String>, DbError> {
        let conn = self.conn();
        let previous: Option<String> = conn
            .query_row("SELECT state FROM sandboxes WHERE name = ?1", params![name], |r| r.get(0))
            .optional()
            .map_err(self.err())?;
        if previous.as_deref() != Some(state) {
            conn.execute("UPDATE sandboxes SET state = ?2 WHERE name = ?1", params![name, state])
                .map_err(self.err())?;
        }
        Ok(previous)
    }

    /// Records the head of a sandbox's audit chain, only ever forward: a
    /// head behind the one recorded (a log cut short, or rewritten) is not
    /// taken, and the answer says so with the recorded one.
    pub fn record_audit_head(&self, name: &str, head: Head) -> Result<HeadUpdate, DbError> {
        let conn = self.conn();
        let recorded: Option<(Option<i64>, Option<String>)> = conn
            .query_row("SELECT audit_seq, audit_hash FROM sandboxes WHERE name = ?1", params![name], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(self.err())?;
        let Some(recorded) = recorded else { return Ok(HeadUpdate::Unknown) };
        let recorded = head_of(recorded);
        match recorded {
            Some(old) if old.seq > head.seq => return Ok(HeadUpdate::Behind(old)),
            Some(old) if old == head => return Ok(HeadUpdate::Same),
            _ => {}
        }
        let seq = i64::try_from(head.seq).unwrap_or(i64::MAX);
        conn.execute(
            "UPDATE sandboxes SET audit_seq = ?2, audit_hash = ?3 WHERE name = ?1",
            params![name, seq, chain::hex(&head.hash)],
        )
        .map_err(self.err())?;
        Ok(HeadUpdate::Recorded)
    }

    /// The audit head recorded for a sandbox.
    pub fn audit_head(&self, name: &str) -> Result<Option<Head>, DbError> {
        let conn = self.conn();
        audit_head_in(&conn, name).map_err(self.err())
    }

    /// Forgets a sandbox and its execs; its events stay (they are history).
    pub fn delete_sandbox(&self, name: &str) -> Result<(), DbError> {
        let conn = self.conn();
        conn.execute("DELETE FROM sandboxes WHERE name = ?1", params![name]).map_err(self.err())?;
        conn.execute("DELETE FROM execs WHERE sandbox = ?1", params![name]).map_err(self.err())?;
        Ok(())
    }

    /// Records an E2B envd access token (its SHA-256, hex) for one
    /// sandbox: its stored name, owner and creation time (a later sandbox
    /// of the same name is another sandbox). Tokens of sandboxes no longer
    /// in the index and created over a day ago are forgotten here (a token
    /// of a removed sandbox is kept a while so its holder learns "not
    /// running" rather than "unauthorized").
    pub fn e2b_grant(&self, digest_hex: &str, access: &E2bAccess) -> Result<(), DbError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO e2b_access (digest, sandbox, owner_uid, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![digest_hex, access.sandbox, access.owner_uid, access.created_at],
        )
        .map_err(self.err())?;
        conn.execute(
            "DELETE FROM e2b_access WHERE sandbox NOT IN (SELECT name FROM sandboxes)
                AND created_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day')",
            [],
        )
        .map_err(self.err())?;
        Ok(())
    }

    /// What an E2B envd access token with this SHA-256 (hex) was issued for.
    pub fn e2b_access(&self, digest_hex: &str) -> Result<Option<E2bAccess>, DbError> {
        self.conn()
            .query_row(
                "SELECT sandbox, owner_uid, created_at FROM e2b_access WHERE digest = ?1",
                params![digest_hex],
                |r| Ok(E2bAccess { sandbox: r.get(0)?, owner_uid: r.get(1)?, created_at: r.get(2)? }),
            )
            .optional()
            .map_err(self.err())
    }

    pub fn exec_started(
        &self,
        sandbox: &str,
        argv: &[String],
        pid: Option<i32>,
        ts: &str,
    ) -> Result<i64, DbError> {
        let argv =
            serde_json::to_string(&airlock_runtime::caps::cap_list(argv)).unwrap_or_else(|_| "[]".to_owned());
        let conn = self.conn();
        conn.execute(
            "INSERT INTO execs (sandbox, argv, pid, started_at) VALUES (?1, ?2, ?3, ?4)",
            params![sandbox, argv, pid, ts],
        )
        .map_err(self.err())?;
        Ok(conn.last_insert_rowid())
    }

    pub fn exec_pid(&self, id: i64, pid: i32) -> Result<(), DbError> {
        self.conn()
            .execute("UPDATE execs SET pid = ?2 WHERE id = ?1", params![id, pid])
            .map_err(self.err())?;
        Ok(())
    }

    pub fn exec_ended(&self, id: i64, end: ExecEnd, ts: &str) -> Result<(), DbError> {
        self.conn()
            .execute(
                "UPDATE execs SET ended_at = ?2, exit_code = ?3, signal = ?4, timed_out = ?5 WHERE id = ?1",
                params![id, ts, end.code, end.signal, end.timed_out],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Execs recorded for a sandbox: (total, still running).
    pub fn exec_counts(&self, sandbox: &str) -> Result<(u64, u64), DbError> {
        self.conn()
            .query_row(
                "SELECT COUNT(*), COUNT(*) - COUNT(ended_at) FROM execs WHERE sandbox = ?1",
                params![sandbox],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .map(|(total, running)| (total.max(0) as u64, running.max(0) as u64))
            .map_err(self.err())
    }

    /// Appends an event, numbered in the whole log and among its owner's,
    /// its detail's strings and lists capped (with a marker saying so);
    /// then drops the sandbox's oldest events beyond
    /// [`EVENTS_PER_SANDBOX`]. Returns its id in the whole log.
    pub fn record_event(
        &self,
        ts: &str,
        sandbox: Option<&str>,
        owner_uid: Option<u32>,
        kind: &str,
        detail: &serde_json::Value,
    ) -> Result<i64, DbError> {
        let detail = airlock_runtime::caps::cap_json(detail.clone());
        let conn = self.conn();
        conn.execute(
            "INSERT INTO events (ts, sandbox, owner_uid, kind, detail, owner_seq) VALUES (?1, ?2, ?3, ?4, ?5,
                 CASE WHEN ?3 IS NULL THEN NULL
                      ELSE (SELECT COALESCE(MAX(owner_seq), 0) + 1 FROM events WHERE owner_uid = ?3) END)",
            params![ts, sandbox, owner_uid, kind, detail.to_string()],
        )
        .map_err(self.err())?;
        let id = conn.last_insert_rowid();
        if let Some(sandbox) = sandbox {
            conn.execute(
                "DELETE FROM events WHERE sandbox = ?1 AND id <= (
                     SELECT id FROM events WHERE sandbox = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                params![sandbox, self.events_per_sandbox],
            )
            .map_err(self.err())?;
        }
        Ok(id)
    }

    /// Events after `after`, oldest first, at most `limit`. With `owner`
    /// `None` (root) every event, numbered in the whole log; with an owner
    /// only theirs, numbered among theirs (1, 2, 3, … with no gaps where
    /// other users' events fall). `sandboxes`, when not empty, narrows to
    /// events of those (stored) names.
    pub fn events_after(
        &self,
        after: i64,
        owner: Option<u32>,
        sandboxes: &[String],
        limit: u32,
    ) -> Result<Vec<EventRow>, DbError> {
        let conn = self.conn();
        let names = (!sandboxes.is_empty()).then(|| serde_json::json!(sandboxes).to_string());
        let sql = match owner {
            None => {
                "SELECT id, ts, sandbox, kind, detail FROM events
                 WHERE id > ?1 AND ?2 IS NULL AND (?3 IS NULL OR sandbox IN (SELECT value FROM json_each(?3)))
                 ORDER BY id LIMIT ?4"
            }
            Some(_) => {
                "SELECT owner_seq, ts, sandbox, kind, detail FROM events
                 WHERE owner_uid = ?2 AND owner_seq > ?1
                   AND (?3 IS NULL OR sandbox IN (SELECT value FROM json_each(?3)))
                 ORDER BY owner_seq LIMIT ?4"
            }
        };
        let mut stmt = conn.prepare(sql).map_err(self.err())?;
        let rows = stmt
            .query_map(params![after, owner, names, limit], |r| {
                let detail: String = r.get(4)?;
                Ok(EventRow {
                    id: r.get(0)?,
                    ts: r.get(1)?,
                    sandbox: r.get(2)?,
                    kind: r.get(3)?,
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }
}

/// What [`Db::record_audit_head`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadUpdate {
    Recorded,
    Same,
    /// The head found is behind this recorded one: kept.
    Behind(Head),
    /// No such sandbox in the index.
    Unknown,
}

fn head_of((seq, hash): (Option<i64>, Option<String>)) -> Option<Head> {
    Some(Head { seq: u64::try_from(seq?).ok()?, hash: chain::parse_hash(&hash?)? })
}

fn audit_head_in(conn: &Connection, name: &str) -> Result<Option<Head>, rusqlite::Error> {
    let row: Option<(Option<i64>, Option<String>)> = conn
        .query_row("SELECT audit_seq, audit_hash FROM sandboxes WHERE name = ?1", params![name], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    Ok(row.and_then(head_of))
}

/// The audit head the daemon's index at `path` holds for sandbox `name`,
/// read without changing anything (the CLI's `audit verify`, beside a
/// daemon that may be running). `None` when there is no index, no such
/// row, or an index from before heads were recorded.
pub fn recorded_audit_head(path: &Path, name: &str) -> Result<Option<Head>, DbError> {
    if !path.exists() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(sqlite(path))?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(sqlite(path))?;
    if user_version(&conn).map_err(sqlite(path))? < 4 {
        return Ok(None);
    }
    audit_head_in(&conn, name).map_err(sqlite(path))
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> DbError + '_ {
    move |source| DbError::Sqlite { path: path.to_path_buf(), source }
}

fn user_version(conn: &Connection) -> Result<u32, rusqlite::Error> {
    conn.query_row("PRAGMA user_version", [], |r| r.get::<_, u32>(0))
}

fn migrate(path: &Path, conn: &mut Connection) -> Result<(), DbError> {
    let known = MIGRATIONS.len() as u32;
    let found = user_version(conn).map_err(sqlite(path))?;
    if found > known {
        return Err(DbError::Newer { path: path.to_path_buf(), found, known });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction().map_err(sqlite(path))?;
        tx.execute_batch(sql).map_err(sqlite(path))?;
        // PRAGMA takes no parameters; the value is our own integer.
        tx.execute_batch(&format!("PRAGMA user_version = {}", index + 1)).map_err(sqlite(path))?;
        tx.commit().map_err(sqlite(path))?;
        tracing::info!(path = %path.display(), version = index + 1, "database migrated");
    }
    Ok(())
}

fn labels_json(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".to_owned())
}

fn sandbox_row(r: &rusqlite::Row<'_>) -> Result<SandboxRow, rusqlite::Error> {
    let labels: String = r.get(2)?;
    Ok(SandboxRow {
        name: r.get(0)?,
        owner_uid: r.get(1)?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        policy: r.get(3)?,
        state: r.get(4)?,
        created_at: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn row(name: &str, owner: u32) -> SandboxRow {
        SandboxRow {
            name: name.into(),
            owner_uid: owner,
            labels: BTreeMap::from([("team".into(), "a".into())]),
            policy: "dev".into(),
            state: "running".into(),
            created_at: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    #[test]
    fn e2b_tokens_are_found_by_digest_and_old_ones_of_removed_sandboxes_forgotten() {
        let db = Db::in_memory().unwrap();
        let row = |name: &str| SandboxRow {
            name: name.into(),
            owner_uid: 1000,
            labels: BTreeMap::new(),
            policy: "dev".into(),
            state: "running".into(),
            created_at: "2020-01-01T00:00:00.000Z".into(),
        };
        let access = |name: &str| E2bAccess {
            sandbox: name.into(),
            owner_uid: 1000,
            created_at: "2020-01-01T00:00:00.000Z".into(),
        };
        db.upsert_sandbox(&row("old")).unwrap();
        db.e2b_grant("aa", &access("old")).unwrap();
        assert_eq!(db.e2b_access("aa").unwrap(), Some(access("old")));
        assert_eq!(db.e2b_access("bb").unwrap(), None);
        // Removed long ago: its token goes at the next grant.
        db.delete_sandbox("old").unwrap();
        assert_eq!(db.e2b_access("aa").unwrap(), Some(access("old")), "kept until then");
        db.upsert_sandbox(&row("new")).unwrap();
        db.e2b_grant("cc", &access("new")).unwrap();
        assert_eq!(db.e2b_access("aa").unwrap(), None);
        assert_eq!(db.e2b_access("cc").unwrap(), Some(access("new")));
        assert!(db.e2b_grant("cc", &access("new")).is_err(), "a digest is granted once");
    }

    #[test]
    fn migrates_a_fresh_database_and_reopens_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        let db = Db::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len() as u32);
        db.upsert_sandbox(&row("a", 1000)).unwrap();
        drop(db);
        let db = Db::open(&path).unwrap();
        assert_eq!(db.sandbox("a").unwrap().unwrap(), row("a", 1000));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn audit_heads_are_recorded_only_forward_and_read_back_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        let db = Db::open(&path).unwrap();
        let head = |seq, byte| Head { seq, hash: [byte; 32] };
        assert_eq!(db.record_audit_head("a", head(3, 1)).unwrap(), HeadUpdate::Unknown);
        db.upsert_sandbox(&row("a", 1000)).unwrap();
        assert_eq!(db.record_audit_head("a", head(3, 1)).unwrap(), HeadUpdate::Recorded);
        assert_eq!(db.record_audit_head("a", head(3, 1)).unwrap(), HeadUpdate::Same);
        assert_eq!(db.record_audit_head("a", head(5, 2)).unwrap(), HeadUpdate::Recorded);
        // A log cut back to seq 4 does not move the record back.
        assert_eq!(db.record_audit_head("a", head(4, 3)).unwrap(), HeadUpdate::Behind(head(5, 2)));
        assert_eq!(db.audit_head("a").unwrap(), Some(head(5, 2)));
        assert_eq!(recorded_audit_head(&path, "a").unwrap(), Some(head(5, 2)));
        assert_eq!(recorded_audit_head(&path, "b").unwrap(), None);
        assert_eq!(recorded_audit_head(&dir.path().join("none.db"), "a").unwrap(), None);
        // Upserting the row again (reconcile) keeps the head; another
        // sandbox under the name starts without one.
        db.upsert_sandbox(&row("a", 1000)).unwrap();
        assert_eq!(db.audit_head("a").unwrap(), Some(head(5, 2)));
        let mut again = row("a", 1000);
        again.created_at = "2026-02-01T00:00:00.000Z".into();
        db.upsert_sandbox(&again).unwrap();
        assert_eq!(db.audit_head("a").unwrap(), None);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA user_version = 999").unwrap();
        drop(conn);
        let err = Db::open(&path).err().unwrap();
        assert!(matches!(err, DbError::Newer { found: 999, .. }), "{err}");
    }

    #[test]
    fn sandboxes_state_and_deletion() {
        let db = Db::in_memory().unwrap();
        db.upsert_sandbox(&row("b", 1)).unwrap();
        db.upsert_sandbox(&row("a", 2)).unwrap();
        let mut replaced = row("b", 3);
        replaced.labels.clear();
        db.upsert_sandbox(&replaced).unwrap();
        let names: Vec<_> = db.sandboxes().unwrap().into_iter().map(|r| (r.name, r.owner_uid)).collect();
        assert_eq!(names, [("a".to_owned(), 2), ("b".to_owned(), 3)]);
        assert_eq!(db.set_state("a", "stopped").unwrap().as_deref(), Some("running"));
        assert_eq!(db.set_state("a", "stopped").unwrap().as_deref(), Some("stopped"));
        assert_eq!(db.set_state("zzz", "stopped").unwrap(), None);
        let id = db.exec_started("a", &["echo".into()], None, "t0").unwrap();
        db.exec_pid(id, 7).unwrap();
        assert_eq!(db.exec_counts("a").unwrap(), (1, 1));
        db.exec_ended(id, ExecEnd { code: Some(0), signal: None, timed_out: false }, "t1").unwrap();
        assert_eq!(db.exec_counts("a").unwrap(), (1, 0));
        db.delete_sandbox("a").unwrap();
        assert!(db.sandbox("a").unwrap().is_none());
        assert_eq!(db.exec_counts("a").unwrap(), (0, 0));
    }

    #[test]
    fn events_are_filtered_by_owner_and_sandbox() {
        let db = Db::in_memory().unwrap();
        let detail = serde_json::json!({"k": 1});
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        db.record_event("t", Some("a"), Some(1000), "created", &detail).unwrap();
        db.record_event("t", Some("b"), Some(0), "created", &detail).unwrap();
        db.record_event("t", Some("b"), Some(0), "stopped", &detail).unwrap();
        db.record_event("t", None, None, "daemon", &detail).unwrap();
        db.record_event("t", Some("a"), Some(1000), "stopped", &detail).unwrap();
        let all = db.events_after(0, None, &[], 100).unwrap();
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        let mine = db.events_after(0, Some(1000), &[], 100).unwrap();
        assert_eq!(mine.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["created", "stopped"]);
        // Numbered among the owner's own: no gap where root's events fell.
        assert_eq!(mine.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(mine[0].detail, detail);
        assert_eq!(db.events_after(1, Some(1000), &[], 100).unwrap().len(), 1);
        assert_eq!(db.events_after(0, None, &names(&["b"]), 100).unwrap().len(), 2);
        assert_eq!(db.events_after(0, Some(1000), &names(&["b"]), 100).unwrap().len(), 0);
        assert_eq!(db.events_after(0, None, &names(&["a", "b"]), 100).unwrap().len(), 4);
        assert_eq!(db.events_after(0, None, &[], 2).unwrap().len(), 2);
    }

    #[test]
    fn migration_3_numbers_existing_events_per_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.execute_batch(
            "PRAGMA user_version = 1;
             INSERT INTO events (ts, sandbox, owner_uid, kind) VALUES
               ('t', 'a', 1000, 'created'), ('t', 'r', 0, 'created'), ('t', NULL, NULL, 'x'),
               ('t', 'a', 1000, 'stopped');",
        )
        .unwrap();
        drop(conn);
        let db = Db::open(&path).unwrap();
        let mine = db.events_after(0, Some(1000), &[], 100).unwrap();
        assert_eq!(
            mine.iter().map(|e| (e.id, e.kind.as_str())).collect::<Vec<_>>(),
            [(1, "created"), (2, "stopped")]
        );
        db.record_event("t", Some("a"), Some(1000), "destroyed", &serde_json::json!({})).unwrap();
        assert_eq!(db.events_after(2, Some(1000), &[], 100).unwrap()[0].id, 3);
        assert_eq!(db.events_after(0, Some(0), &[], 100).unwrap()[0].id, 1);
    }

    #[test]
    fn event_details_are_capped_and_each_sandbox_keeps_its_latest() {
        let mut db = Db::in_memory().unwrap();
        // The same query as with EVENTS_PER_SANDBOX, on fewer rows.
        const KEEP: i64 = 200;
        db.events_per_sandbox = KEEP;
        let argv = vec!["x".repeat(900_000)];
        db.record_event("t", Some("a"), Some(1), "exec_started", &serde_json::json!({ "argv": argv }))
            .unwrap();
        let stored = &db.events_after(0, None, &[], 10).unwrap()[0];
        let text = stored.detail.to_string();
        assert!(text.len() < 2000 && text.contains("[cut by airlock: 900000 bytes in all]"), "{text}");
        let exec = db.exec_started("a", &argv, None, "t").unwrap();
        let kept: String =
            db.conn().query_row("SELECT argv FROM execs WHERE id = ?1", params![exec], |r| r.get(0)).unwrap();
        assert!(kept.len() < 2000, "{}", kept.len());

        let other = db.record_event("t", Some("b"), Some(1), "created", &serde_json::json!({})).unwrap();
        for i in 0..KEEP + 50 {
            db.record_event("t", Some("a"), Some(1), "exec_ended", &serde_json::json!({ "i": i })).unwrap();
        }
        let count = |name: &str| -> i64 {
            db.conn()
                .query_row("SELECT COUNT(*) FROM events WHERE sandbox = ?1", params![name], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(count("a"), KEEP);
        assert_eq!(count("b"), 1, "another sandbox's events are not touched");
        let latest = db.events_after(other, None, &["a".to_string()], 100_000).unwrap();
        assert_eq!(latest.last().unwrap().detail["i"], KEEP + 49);
    }
}
