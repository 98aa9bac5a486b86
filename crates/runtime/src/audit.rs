//! The per-sandbox audit trail: `audit.jsonl`, one JSON object per line.
//!
//! The file is only ever appended to. Each record is serialized first and
//! written with a single `write(2)` on an `O_APPEND` descriptor, so a crash
//! leaves at most one torn line at the end, never a line spliced into another.
//! Several processes may hold the log open at once (the supervisor, then
//! `airlock apply` or `airlock rm`): each append happens under an exclusive
//! `flock` on the file, during which the writer re-reads the tail whenever the
//! file grew behind its back, so `seq` stays strictly increasing across writers
//! and reopenings.
//!
//! The log is bounded (`limits.audit_size`, or [`DEFAULT_LIMIT`] where the
//! policy is not at hand): once it would pass its limit less a reserve, the
//! events a sandbox can cause in numbers (network decisions, execs, the
//! exec trace's events) are no
//! longer written, and one `audit_capped` record says so; the events of its
//! life (created, exited, stopped, applied, removed, …) are still written,
//! into the reserve. The state is in the file, so every writer — in any
//! process — holds the same cap. Every field of every event is capped too
//! (`caps`), with a marker saying how long it was.
//!
//! The log is a hash chain (`chain`): every record carries the schema
//! version (`v`) and the SHA-256 of the previous line's exact bytes
//! (`prev`), and after every append the writer rewrites the head (the last
//! record's `seq` and hash) in `audit.head`, under the same lock.
//! `airlock audit verify` holds the log to it. Records written before the
//! chain have neither field and stay readable. Dropping bulk events at the
//! limit keeps the chain whole: a dropped event was never written, and the
//! `audit_capped` record that says so is itself a link.
//!
//! A log that knows the sandbox's secret values ([`AuditLog::redacting`])
//! replaces them in every string of every event before it is written.
//!
//! Paths in events come from inside the sandbox and may not be UTF-8; they are
//! written as a JSON string when they are UTF-8 and as
//! `{"non_utf8_hex": "…"}` otherwise, so a weird file name can neither make an
//! event unrecordable nor be disguised by lossy conversion.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{FlockOperation, OFlags, flock};
use serde::{Deserialize, Serialize};

pub mod chain;

use crate::exec_trace::event::Capped;
use chain::{Head, HeadFile};

/// The version every record carries in `v`. Records without it were
/// written before the chain: version 1.
pub const SCHEMA_VERSION: u32 = 2;

/// Why the audit log could not be opened, read or appended to.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("could not {action} audit log {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "audit log {path} is damaged at line {line}: {source}; \
         keep the file for inspection and move it aside to continue"
    )]
    Corrupt {
        path: PathBuf,
        line: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not encode a {event} audit event for {path}: {source}")]
    Encode {
        event: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// One line of `audit.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The schema version ([`SCHEMA_VERSION`]); 1 for a record written
    /// before there was one.
    #[serde(default = "first_version")]
    pub v: u32,
    /// When the record was written: RFC 3339, UTC, milliseconds.
    pub ts: String,
    /// 1 for the first record of a sandbox, then +1 per record.
    pub seq: u64,
    /// SHA-256 (hex) of the previous line's exact bytes, 64 zeros for the
    /// first; absent in records written before the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    #[serde(flatten)]
    pub event: AuditEvent,
}

fn first_version() -> u32 {
    1
}

/// Something that happened to a sandbox, in the order the lifecycle produces
/// them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    Created {
        policy: String,
        #[serde(with = "path_repr::option")]
        workspace: Option<PathBuf>,
        workspace_mode: String,
        limits: serde_json::Value,
        degraded: Vec<String>,
        /// The OCI image the root came from, with its resolved digest.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<crate::image::ImageMeta>,
    },
    CommandStarted {
        argv: Vec<String>,
        pid: Option<i32>,
    },
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        duration_ms: u64,
        oom_killed: bool,
    },
    TimeLimitHit {
        limit_secs: u64,
    },
    /// `gc` found a sandbox whose supervisor died without finalizing it.
    SupervisorLost {
        detail: String,
    },
    DiffSummary {
        added: u64,
        modified: u64,
        deleted: u64,
        /// The change's digest (`sha256:…`), as `airlock diff` shows it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    ArtifactsCaptured {
        #[serde(with = "path_repr::vec")]
        files: Vec<PathBuf>,
        bytes: u64,
    },
    Applied {
        #[serde(with = "path_repr::vec")]
        written: Vec<PathBuf>,
        #[serde(with = "path_repr::vec")]
        deleted: Vec<PathBuf>,
        allow_protected: bool,
        by_uid: u32,
        /// The change digest written (`sha256:…`), as `airlock diff` showed it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    ApplyRefused {
        reason: String,
    },
    Removed {
        reason: String,
    },
    Error {
        stage: String,
        message: String,
    },
    /// One decision of the egress proxy (a connection or a request).
    Network(airlock_egress::NetEvent),
    /// A long-lived sandbox ran a process on request.
    ExecStarted {
        id: u32,
        argv: Vec<String>,
        pid: Option<i32>,
    },
    ExecEnded {
        id: u32,
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        duration_ms: u64,
    },
    /// A long-lived sandbox was stopped: by request, deadline or idleness.
    Stopped {
        reason: String,
    },
    /// The log reached its limit: network and exec events after this one
    /// were not recorded.
    AuditCapped {
        limit: u64,
        message: String,
    },
    /// The egress proxy process ended while its sandbox ran (killed, or a
    /// call outside its seccomp allowlist): the sandbox's connections fail
    /// from then on.
    EgressProxyEnded {
        code: Option<i32>,
        signal: Option<i32>,
        detail: String,
    },
    /// A file was read out of a long-lived sandbox (`airlock cp`, the
    /// daemon's files API): how many bytes left it, and why it was refused
    /// or broke off when it was.
    FileRead {
        path: String,
        bytes: u64,
        refused: Option<String>,
    },
    /// The host changed the sandbox's files (`airlock cp` in, the daemon's
    /// files API): a write (with its bytes), mkdir, remove or rename (with
    /// its destination), and why it was refused when it was.
    FileChanged {
        op: String,
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        bytes: u64,
        refused: Option<String>,
    },
    /// A process of the sandbox called execve or execveat (the exec trace),
    /// with what it claimed.
    ProcessExec(crate::exec_trace::ProcessExec),
    /// A process whose exec was recorded ended.
    ProcessExit(crate::exec_trace::ProcessExit),
    /// Execs past the trace's rate in one second, counted.
    ProcessExecSummary(crate::exec_trace::ProcessExecSummary),
    /// The exec trace's listener process ended while the sandbox could
    /// still exec: its execs fail from then on. In a microVM guest, its
    /// agent's trace thread ended (`reported_by: guest`; no code or signal).
    ExecTraceEnded {
        code: Option<i32>,
        signal: Option<i32>,
        detail: String,
        /// As on the trace's other records: `"guest"` when a microVM
        /// guest reported it; absent when the host saw its listener end.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reported_by: Option<String>,
    },
    /// One path the sandbox changed in its workspace, from the diff at
    /// finalize (after the `diff_summary`): what happened to it, its type
    /// before and after, the size and SHA-256 of its new content (of a
    /// file apply would write).
    WorkspaceChanged {
        #[serde(with = "path_repr::plain")]
        path: PathBuf,
        kind: String,
        old_type: Option<String>,
        new_type: Option<String>,
        size: Option<u64>,
        sha256: Option<String>,
    },
    /// The host looked into a long-lived sandbox's files (`airlock files`,
    /// the daemon's files API): a stat, a listing (with how many entries
    /// it gave) or a watch (with how many events), and why it was refused
    /// when it was.
    FileInspected {
        op: String,
        path: String,
        entries: u64,
        refused: Option<String>,
    },
    /// A connection to a published port (`create -p`) was accepted on the
    /// host, or a client of the supervisor asked for one: from whom, on
    /// which host address (None for the latter), to which port inside.
    PortAccepted {
        id: u64,
        peer: String,
        listen: Option<String>,
        sandbox_port: u16,
    },
    /// That connection ended: the bytes that went into the sandbox
    /// (`bytes_in`) and came out (`bytes_out`), how long it lasted, and
    /// why it failed when the port inside could not be reached.
    PortClosed {
        id: u64,
        bytes_in: u64,
        bytes_out: u64,
        duration_ms: u64,
        error: Option<String>,
    },
    /// A microVM sandbox's container engine answered its socket (`ready`,
    /// `ms` after the sandbox's supervisor started serving), or did not
    /// within its time (`detail` says why). Seen through the engine's own
    /// socket: `reported_by: guest`.
    ContainerEngine {
        ready: bool,
        ms: u64,
        detail: Option<String>,
        reported_by: String,
    },
    /// The guest's container engine created a container: its id, image
    /// and command as the engine reported them (`reported_by: guest`).
    ContainerCreated {
        id: String,
        image: String,
        command: Vec<String>,
        reported_by: String,
    },
}

impl AuditEvent {
    /// The `event` tag as written in the file; used in error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            AuditEvent::Created { .. } => "created",
            AuditEvent::CommandStarted { .. } => "command_started",
            AuditEvent::Exited { .. } => "exited",
            AuditEvent::TimeLimitHit { .. } => "time_limit_hit",
            AuditEvent::SupervisorLost { .. } => "supervisor_lost",
            AuditEvent::DiffSummary { .. } => "diff_summary",
            AuditEvent::ArtifactsCaptured { .. } => "artifacts_captured",
            AuditEvent::Applied { .. } => "applied",
            AuditEvent::ApplyRefused { .. } => "apply_refused",
            AuditEvent::Removed { .. } => "removed",
            AuditEvent::Error { .. } => "error",
            AuditEvent::Network(_) => "network",
            AuditEvent::ExecStarted { .. } => "exec_started",
            AuditEvent::ExecEnded { .. } => "exec_ended",
            AuditEvent::Stopped { .. } => "stopped",
            AuditEvent::AuditCapped { .. } => "audit_capped",
            AuditEvent::EgressProxyEnded { .. } => "egress_proxy_ended",
            AuditEvent::FileRead { .. } => "file_read",
            AuditEvent::FileChanged { .. } => "file_changed",
            AuditEvent::ProcessExec(_) => "process_exec",
            AuditEvent::ProcessExit(_) => "process_exit",
            AuditEvent::ProcessExecSummary(_) => "process_exec_summary",
            AuditEvent::ExecTraceEnded { .. } => "exec_trace_ended",
            AuditEvent::WorkspaceChanged { .. } => "workspace_changed",
            AuditEvent::FileInspected { .. } => "file_inspected",
            AuditEvent::PortAccepted { .. } => "port_accepted",
            AuditEvent::PortClosed { .. } => "port_closed",
            AuditEvent::ContainerEngine { .. } => "container_engine",
            AuditEvent::ContainerCreated { .. } => "container_created",
        }
    }

    /// Events a sandbox can cause without bound (a request, an exec): the
    /// ones dropped once the log is full. The rest mark its life and are
    /// few.
    fn is_bulk(&self) -> bool {
        matches!(
            self,
            AuditEvent::Network(_)
                | AuditEvent::ExecStarted { .. }
                | AuditEvent::ExecEnded { .. }
                | AuditEvent::ProcessExec(_)
                | AuditEvent::ProcessExit(_)
                | AuditEvent::ProcessExecSummary(_)
                | AuditEvent::WorkspaceChanged { .. }
                | AuditEvent::FileInspected { .. }
                | AuditEvent::PortAccepted { .. }
                | AuditEvent::PortClosed { .. }
                | AuditEvent::ContainerCreated { .. }
        )
    }

    /// The event with every field capped (see `caps`).
    fn capped(self) -> AuditEvent {
        use crate::caps::{MAX_FIELD, MAX_MESSAGE, cap_list, cap_path, cap_paths, cap_str};
        let field = |s: String| cap_str(&s, MAX_FIELD);
        let message = |s: String| cap_str(&s, MAX_MESSAGE);
        match self {
            AuditEvent::Created { policy, workspace, workspace_mode, limits, degraded, image } => {
                AuditEvent::Created {
                    image: image.map(|i| crate::image::ImageMeta {
                        reference: field(i.reference),
                        digest: field(i.digest),
                    }),
                    policy: field(policy),
                    workspace: workspace.map(|w| cap_path(&w, MAX_FIELD)),
                    workspace_mode: field(workspace_mode),
                    limits: crate::caps::cap_json(limits),
                    degraded: cap_list(&degraded),
                }
            }
            AuditEvent::CommandStarted { argv, pid } => {
                AuditEvent::CommandStarted { argv: cap_list(&argv), pid }
            }
            AuditEvent::SupervisorLost { detail } => AuditEvent::SupervisorLost { detail: message(detail) },
            AuditEvent::ArtifactsCaptured { files, bytes } => {
                AuditEvent::ArtifactsCaptured { files: cap_paths(&files), bytes }
            }
            AuditEvent::Applied { written, deleted, allow_protected, by_uid, digest } => {
                AuditEvent::Applied {
                    written: cap_paths(&written),
                    deleted: cap_paths(&deleted),
                    allow_protected,
                    by_uid,
                    digest: digest.map(field),
                }
            }
            AuditEvent::ApplyRefused { reason } => AuditEvent::ApplyRefused { reason: message(reason) },
            AuditEvent::Removed { reason } => AuditEvent::Removed { reason: message(reason) },
            AuditEvent::Error { stage, message: text } => {
                AuditEvent::Error { stage: field(stage), message: message(text) }
            }
            AuditEvent::Network(mut e) => {
                e.via = field(e.via);
                e.host = field(e.host);
                e.address = e.address.map(field);
                e.destination = e.destination.map(field);
                e.method = e.method.map(field);
                e.path = e.path.map(field);
                e.rule = field(e.rule);
                e.secrets = cap_list(&e.secrets);
                AuditEvent::Network(e)
            }
            AuditEvent::ExecStarted { id, argv, pid } => {
                AuditEvent::ExecStarted { id, argv: cap_list(&argv), pid }
            }
            AuditEvent::Stopped { reason } => AuditEvent::Stopped { reason: message(reason) },
            AuditEvent::FileRead { path, bytes, refused } => {
                AuditEvent::FileRead { path: field(path), bytes, refused: refused.map(message) }
            }
            AuditEvent::FileChanged { op, path, to, bytes, refused } => AuditEvent::FileChanged {
                op: field(op),
                path: field(path),
                to: to.map(field),
                bytes,
                refused: refused.map(message),
            },
            AuditEvent::EgressProxyEnded { code, signal, detail } => {
                AuditEvent::EgressProxyEnded { code, signal, detail: message(detail) }
            }
            AuditEvent::ProcessExec(e) => AuditEvent::ProcessExec(e.capped()),
            AuditEvent::ProcessExit(mut e) => {
                e.at = field(e.at);
                e.unknown = e.unknown.map(field);
                AuditEvent::ProcessExit(e)
            }
            AuditEvent::ProcessExecSummary(s) => AuditEvent::ProcessExecSummary(s.capped()),
            AuditEvent::ExecTraceEnded { code, signal, detail, reported_by } => AuditEvent::ExecTraceEnded {
                code,
                signal,
                detail: message(detail),
                reported_by: reported_by.map(field),
            },
            AuditEvent::WorkspaceChanged { path, kind, old_type, new_type, size, sha256 } => {
                AuditEvent::WorkspaceChanged {
                    path: cap_path(&path, MAX_FIELD),
                    kind: field(kind),
                    old_type: old_type.map(field),
                    new_type: new_type.map(field),
                    size,
                    sha256: sha256.map(field),
                }
            }
            AuditEvent::FileInspected { op, path, entries, refused } => AuditEvent::FileInspected {
                op: field(op),
                path: field(path),
                entries,
                refused: refused.map(message),
            },
            AuditEvent::PortAccepted { id, peer, listen, sandbox_port } => {
                AuditEvent::PortAccepted { id, peer: field(peer), listen: listen.map(field), sandbox_port }
            }
            AuditEvent::PortClosed { id, bytes_in, bytes_out, duration_ms, error } => {
                AuditEvent::PortClosed { id, bytes_in, bytes_out, duration_ms, error: error.map(message) }
            }
            AuditEvent::ContainerEngine { ready, ms, detail, reported_by } => AuditEvent::ContainerEngine {
                ready,
                ms,
                detail: detail.map(message),
                reported_by: field(reported_by),
            },
            AuditEvent::ContainerCreated { id, image, command, reported_by } => {
                AuditEvent::ContainerCreated {
                    id: field(id),
                    image: field(image),
                    command: cap_list(&command),
                    reported_by: field(reported_by),
                }
            }
            other @ (AuditEvent::Exited { .. }
            | AuditEvent::TimeLimitHit { .. }
            | AuditEvent::DiffSummary { .. }
            | AuditEvent::ExecEnded { .. }
            | AuditEvent::AuditCapped { .. }) => other,
        }
    }

    /// Events that close a chapter of the sandbox's life are forced to disk:
    /// losing them in a power cut would leave the trail claiming a sandbox is
    /// still running, or hide that its changes reached the workspace. The
    /// others are frequent and may ride on the page cache.
    fn must_sync(&self) -> bool {
        matches!(
            self,
            AuditEvent::Exited { .. }
                | AuditEvent::Removed { .. }
                | AuditEvent::Applied { .. }
                | AuditEvent::Stopped { .. }
                | AuditEvent::EgressProxyEnded { .. }
                | AuditEvent::ExecTraceEnded { .. }
        )
    }
}

/// One record as read back: its line, its exact text and what it says.
#[derive(Debug, Clone)]
pub struct Entry {
    pub line: u64,
    /// The line as written (without trailing padding).
    pub raw: String,
    pub record: AuditRecord,
}

/// A log's bytes (and, with `head`, its head), read under a shared lock.
fn read_locked(path: &Path, head: bool) -> Result<(Vec<u8>, io::Result<Option<Head>>), AuditError> {
    use std::io::Read;
    let io_err = |action, source| AuditError::Io { action, path: path.to_path_buf(), source };
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| io_err("read", e))?;
    flock(&file, FlockOperation::LockShared).map_err(|e| io_err("lock", e.into()))?;
    let mut data = Vec::new();
    let read = file.read_to_end(&mut data).map_err(|e| io_err("read", e));
    let head = if head { chain::read_head(path) } else { Ok(None) };
    let _ = flock(&file, FlockOperation::Unlock);
    read?;
    Ok((data, head))
}

/// What one append did.
struct Appended {
    /// A line was written (a bulk event past the limit may write none).
    written: bool,
    /// It closes a chapter: force it to disk.
    must_sync: bool,
}

/// `event` with every secret value in its strings replaced by
/// `[REDACTED:NAME]`: walked as JSON, so every field of every kind is
/// covered, and a path that is not UTF-8 is redacted in its bytes.
fn redact_event(event: AuditEvent, secrets: &[(String, Vec<u8>)]) -> AuditEvent {
    if secrets.is_empty() {
        return event;
    }
    fn walk(value: &mut serde_json::Value, secrets: &[(String, Vec<u8>)], top: bool) {
        use serde_json::Value;
        match value {
            Value::String(text) => *text = crate::network::redact_str(text, secrets),
            Value::Array(items) => items.iter_mut().for_each(|v| walk(v, secrets, false)),
            Value::Object(map) => {
                if let (1, Some(Value::String(hex))) = (map.len(), map.get_mut("non_utf8_hex")) {
                    if let Some(bytes) = chain::decode_hex(hex) {
                        let clean = airlock_egress::redact::redact_all(&bytes, secrets);
                        *hex = chain::hex(&clean);
                    }
                    return;
                }
                for (key, v) in map.iter_mut() {
                    // The tag names the kind; it is airlock's, not a value.
                    if !(top && key == "event") {
                        walk(v, secrets, false);
                    }
                }
            }
            _ => {}
        }
    }
    let kind = event.kind();
    let Ok(mut value) = serde_json::to_value(&event) else { return event };
    walk(&mut value, secrets, true);
    serde_json::from_value(value).unwrap_or_else(|e| AuditEvent::Error {
        stage: "audit".into(),
        message: format!("a {kind} event was not recorded: it could not be redacted ({e})"),
    })
}

/// The limit of a log opened without the policy's `limits.audit_size`.
pub const DEFAULT_LIMIT: u64 = 32 << 20;
/// Room kept below the limit for the `audit_capped` record and the events
/// of the sandbox's life after it.
const RESERVE: u64 = 64 << 10;
/// How the `audit_capped` record starts in the file (serde writes the tag
/// right after the flattened fields' `ts` and `seq`).
const CAPPED_TAG: &[u8] = br#""event":"audit_capped""#;

/// An open, append-only audit log.
#[derive(Debug)]
pub struct AuditLog {
    file: File,
    path: PathBuf,
    /// `audit.head`, rewritten after every append (see `chain`).
    head: HeadFile,
    next_seq: u64,
    /// SHA-256 of the last line: the next record's `prev`.
    last_hash: [u8; 32],
    /// File length right after our last append; a different length means
    /// another writer (or a crash) changed the tail and `next_seq` must be
    /// re-read. `None` forces a re-read.
    known_len: Option<u64>,
    limit: u64,
    /// This writer has seen (or written) the `audit_capped` record.
    capped: bool,
    /// Whether events that close a chapter are forced to disk (see
    /// [`AuditEvent::must_sync`]); off only for a log about to be deleted.
    durable: bool,
    /// (name, value) of the sandbox's secrets, replaced in every event.
    secrets: Vec<(String, Vec<u8>)>,
}

impl AuditLog {
    /// Opens (creating with mode 0600 if missing) the log at `path`. Never
    /// truncates, except for a torn last line left by a crash, which is cut off
    /// with a warning so the next record starts on a line of its own.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map_err(|source| AuditError::Io { action: "open", path: path.to_path_buf(), source })?;
        let head = HeadFile::open(path).map_err(|source| AuditError::Io {
            action: "open",
            path: chain::head_path(path),
            source,
        })?;
        let mut log = AuditLog {
            file,
            path: path.to_path_buf(),
            head,
            next_seq: 1,
            last_hash: chain::GENESIS,
            known_len: None,
            limit: DEFAULT_LIMIT,
            capped: false,
            durable: true,
            secrets: Vec::new(),
        };
        log.locked(AuditLog::resync)?;
        Ok(log)
    }

    /// The same log, bounded by `limit` bytes (the policy's
    /// `limits.audit_size`) instead of [`DEFAULT_LIMIT`].
    pub fn with_limit(mut self, limit: u64) -> AuditLog {
        self.limit = limit.max(2 * RESERVE);
        self
    }

    /// The same log, replacing the sandbox's secret values (name, value)
    /// wherever they appear in an event (an argument, a path, a message)
    /// with `[REDACTED:NAME]` before it is written.
    pub fn redacting(mut self, secrets: &[(String, Vec<u8>)]) -> AuditLog {
        self.redact(secrets);
        self
    }

    /// From now on, as [`AuditLog::redacting`].
    pub fn redact(&mut self, secrets: &[(String, Vec<u8>)]) {
        self.secrets = secrets.iter().filter(|(_, v)| !v.is_empty()).cloned().collect();
    }

    /// Stops forcing events to disk: for the log of a sandbox whose
    /// directory, this log with it, is removed as soon as it has ended
    /// (`run --rm`), where a sync would only delay the removal.
    pub(crate) fn about_to_be_removed(&mut self) {
        self.durable = false;
    }

    /// The path this log appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event` with the next sequence number, the current time and
    /// the link to the record before it, its fields capped (and its
    /// secrets redacted); an event the sandbox can cause in numbers is
    /// dropped instead once the log is full (see the module comment).
    pub fn record(&mut self, event: AuditEvent) -> Result<(), AuditError> {
        self.record_all(std::iter::once(event))
    }

    /// [`AuditLog::record`] for many events under one lock (the changes
    /// found at finalize): the head is rewritten once, after the last.
    pub fn record_all(&mut self, events: impl IntoIterator<Item = AuditEvent>) -> Result<(), AuditError> {
        let events: Vec<AuditEvent> =
            events.into_iter().map(|e| redact_event(e.capped(), &self.secrets)).collect();
        if events.is_empty() {
            return Ok(());
        }
        self.locked(|log| {
            log.resync()?;
            let mut sync = false;
            let mut wrote = false;
            let mut result = Ok(());
            for event in events {
                match log.append(event) {
                    Ok(Appended { written, must_sync }) => {
                        wrote |= written;
                        sync |= must_sync;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            // The log reaches the disk before the head that covers it.
            if sync {
                log.file.sync_data().map_err(|source| log.io_error("sync", source))?;
            }
            if wrote {
                // After a failed append too: what was written is covered.
                log.write_head(sync)?;
            }
            result
        })
    }

    /// Writes one record; must run under the lock, after `resync`.
    fn append(&mut self, event: AuditEvent) -> Result<Appended, AuditError> {
        let bulk = event.is_bulk();
        let record = AuditRecord {
            v: SCHEMA_VERSION,
            ts: rfc3339_utc(SystemTime::now()),
            seq: self.next_seq,
            prev: Some(chain::hex(&self.last_hash)),
            event,
        };
        let mut line = self.encode(&record)?;
        let len = self.known_len.unwrap_or(0);
        let soft_limit = self.limit - RESERVE;
        if bulk && len + line.len() as u64 + 1 > soft_limit {
            let written = self.mark_capped(len, soft_limit)?;
            return Ok(Appended { written, must_sync: false });
        }
        let hash = chain::sha256(&line);
        line.push(b'\n');
        if let Err(source) = (&self.file).write_all(&line) {
            // A short write may have left a partial line; the next
            // record's resync repairs it.
            self.known_len = None;
            return Err(self.io_error("append to", source));
        }
        self.known_len = self.known_len.map(|len| len + line.len() as u64);
        self.next_seq += 1;
        self.last_hash = hash;
        Ok(Appended { written: true, must_sync: self.durable && record.event.must_sync() })
    }

    /// Records the last record's seq and hash in `audit.head`.
    fn write_head(&self, sync: bool) -> Result<(), AuditError> {
        let head = Head { seq: self.next_seq - 1, hash: self.last_hash };
        self.head.write(head, sync && self.durable).map_err(|source| AuditError::Io {
            action: "record the head of",
            path: self.head.path.clone(),
            source,
        })
    }

    fn encode(&self, record: &AuditRecord) -> Result<Vec<u8>, AuditError> {
        serde_json::to_vec(record).map_err(|source| AuditError::Encode {
            event: record.event.kind(),
            path: self.path.clone(),
            source,
        })
    }

    /// Writes the `audit_capped` record unless the log has one; whether it
    /// wrote it. It is padded (with spaces, which JSON ignores) to pass the
    /// soft limit, so that every writer, whatever it knows, drops later
    /// bulk events; the padding is part of the line its successor's link
    /// hashes. Must run under the lock, after `resync`.
    fn mark_capped(&mut self, len: u64, soft_limit: u64) -> Result<bool, AuditError> {
        if !self.capped {
            self.capped = self.contains_capped_record(len).map_err(|source| self.io_error("read", source))?;
        }
        if self.capped {
            return Ok(false);
        }
        let event = AuditEvent::AuditCapped {
            limit: self.limit,
            message: format!(
                "the audit log reached its limit of {} (limits.audit_size): network, exec and other bulk \
                 events after this one were not recorded; the sandbox's lifecycle events still are. To keep \
                 more, raise limits.audit_size in the sandbox's policy",
                airlock_policy::format_size(self.limit)
            ),
        };
        let record = AuditRecord {
            v: SCHEMA_VERSION,
            ts: rfc3339_utc(SystemTime::now()),
            seq: self.next_seq,
            prev: Some(chain::hex(&self.last_hash)),
            event,
        };
        let mut line = self.encode(&record)?;
        let padding = (soft_limit + 1).saturating_sub(len + line.len() as u64 + 1);
        line.resize(line.len() + padding as usize, b' ');
        let hash = chain::sha256(&line);
        line.push(b'\n');
        if let Err(source) = (&self.file).write_all(&line) {
            self.known_len = None;
            return Err(self.io_error("append to", source));
        }
        self.known_len = Some(len + line.len() as u64);
        self.next_seq += 1;
        self.last_hash = hash;
        self.capped = true;
        Ok(true)
    }

    /// Whether the first `len` bytes hold an `audit_capped` record; read
    /// in chunks that overlap by the tag's length.
    fn contains_capped_record(&self, len: u64) -> io::Result<bool> {
        let mut buf = vec![0u8; 1 << 20];
        let overlap = CAPPED_TAG.len() as u64;
        let mut pos = 0u64;
        while pos < len {
            let want = (len - pos).min(buf.len() as u64) as usize;
            self.file.read_exact_at(&mut buf[..want], pos)?;
            if buf[..want].windows(CAPPED_TAG.len()).any(|w| w == CAPPED_TAG) {
                return Ok(true);
            }
            if pos + want as u64 >= len {
                break;
            }
            pos += (want as u64).saturating_sub(overlap).max(1);
        }
        Ok(false)
    }

    /// Reads every record. A torn last line (a crash mid-write) is skipped
    /// with a warning; anything unparseable before it is an error, because
    /// that means the log was damaged, not interrupted.
    pub fn read_all(path: &Path) -> Result<Vec<AuditRecord>, AuditError> {
        let io_err = |source| AuditError::Io { action: "read", path: path.to_path_buf(), source };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map_err(io_err)?;
        let mut reader = BufReader::new(file);
        let mut records = Vec::new();
        let mut line = Vec::new();
        let mut line_no = 0u64;
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(io_err)?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let complete = line.last() == Some(&b'\n');
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<AuditRecord>(text) {
                Ok(record) => records.push(record),
                Err(source) if complete => {
                    return Err(AuditError::Corrupt { path: path.to_path_buf(), line: line_no, source });
                }
                Err(err) => {
                    tracing::warn!(
                        path = %path.display(),
                        line = line_no,
                        error = %err,
                        "skipping torn last line of audit log"
                    );
                }
            }
        }
        Ok(records)
    }

    /// Every record with its line number and its exact text (for `audit
    /// --json`), from a log's bytes; `origin` names it in errors. A torn
    /// last line is skipped; anything else unparseable is an error.
    pub fn entries_of(data: &[u8], origin: &Path) -> Result<Vec<Entry>, AuditError> {
        let mut entries = Vec::new();
        let mut line_no = 0u64;
        let mut lines = data.split_inclusive(|&b| b == b'\n').peekable();
        while let Some(line) = lines.next() {
            line_no += 1;
            let complete = line.last() == Some(&b'\n');
            let text = line.strip_suffix(b"\n").unwrap_or(line);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<AuditRecord>(text) {
                Ok(record) => {
                    let raw = String::from_utf8_lossy(text).trim_end().to_owned();
                    entries.push(Entry { line: line_no, raw, record });
                }
                Err(_) if !complete && lines.peek().is_none() => {}
                Err(source) => {
                    return Err(AuditError::Corrupt { path: origin.to_path_buf(), line: line_no, source });
                }
            }
        }
        Ok(entries)
    }

    /// [`AuditLog::entries_of`] the log at `path`, read under a shared lock.
    pub fn read_entries(path: &Path) -> Result<Vec<Entry>, AuditError> {
        let (data, _) = read_locked(path, false)?;
        AuditLog::entries_of(&data, path)
    }

    /// The log's bytes and its head as they stand between two appends (read
    /// under a shared lock): what an export bundle carries.
    pub fn snapshot(path: &Path) -> Result<(Vec<u8>, io::Result<Option<Head>>), AuditError> {
        read_locked(path, true)
    }

    /// Checks the chain of the log at `path` against its head file and
    /// `anchors` (the daemon's record). Both files are read under a shared
    /// lock, so a writer's append and head never fall between them.
    pub fn verify(path: &Path, anchors: &[chain::Anchor]) -> Result<chain::ChainReport, AuditError> {
        let (data, head) = read_locked(path, true)?;
        let (head, unreadable) = match head {
            Ok(head) => (head, None),
            // Evidence too: a head that is not one is a problem, not an error.
            Err(e) => (None, Some(e)),
        };
        let mut all: Vec<chain::Anchor> = head
            .map(|head| chain::Anchor { head, source: chain::AnchorSource::HeadFile })
            .into_iter()
            .collect();
        all.extend_from_slice(anchors);
        let mut report = chain::verify(&data, &all, unreadable.is_none());
        if let Some(e) = unreadable {
            report.problems.insert(
                0,
                chain::Problem {
                    line: None,
                    seq: None,
                    what: format!("the head beside the log cannot be read: {e}"),
                },
            );
            report.verdict = chain::Verdict::Broken;
        }
        Ok(report)
    }

    /// Runs `f` while holding an exclusive flock on the log file.
    fn locked<T>(&mut self, f: impl FnOnce(&mut AuditLog) -> Result<T, AuditError>) -> Result<T, AuditError> {
        flock(&self.file, FlockOperation::LockExclusive).map_err(|e| self.io_error("lock", e.into()))?;
        let result = f(self);
        if let Err(err) = flock(&self.file, FlockOperation::Unlock) {
            // Closing the file releases the lock anyway; the record itself
            // was written, so this is not worth failing the caller for.
            tracing::warn!(path = %self.path.display(), error = %err, "could not unlock audit log");
        }
        result
    }

    /// Re-reads the tail when the file length is not the one we left it at:
    /// cuts off a torn last line and takes `next_seq` from the last record.
    /// Must run under the lock.
    fn resync(&mut self) -> Result<(), AuditError> {
        let mut len = self.file.metadata().map_err(|source| self.io_error("stat", source))?.len();
        if self.known_len == Some(len) {
            return Ok(());
        }
        if len == 0 {
            self.next_seq = 1;
            self.last_hash = chain::GENESIS;
            self.known_len = Some(0);
            return Ok(());
        }
        let mut last = [0u8; 1];
        self.file.read_exact_at(&mut last, len - 1).map_err(|source| self.io_error("read", source))?;
        if last[0] != b'\n' {
            let keep = match self.rfind_newline(len) {
                Ok(Some(pos)) => pos + 1,
                Ok(None) => 0,
                Err(source) => return Err(self.io_error("read", source)),
            };
            tracing::warn!(
                path = %self.path.display(),
                bytes = len - keep,
                "cutting off a torn last line of the audit log (left by a crash)"
            );
            self.file.set_len(keep).map_err(|source| self.io_error("repair", source))?;
            len = keep;
        }
        if len == 0 {
            self.next_seq = 1;
            self.last_hash = chain::GENESIS;
            self.known_len = Some(0);
            return Ok(());
        }
        // The last complete line is (previous newline, len - 1).
        let start = match self.rfind_newline(len - 1) {
            Ok(Some(pos)) => pos + 1,
            Ok(None) => 0,
            Err(source) => return Err(self.io_error("read", source)),
        };
        let line_len = usize::try_from(len - 1 - start).map_err(|_| {
            self.io_error("read", io::Error::new(io::ErrorKind::InvalidData, "last line too long"))
        })?;
        let mut line = vec![0u8; line_len];
        self.file.read_exact_at(&mut line, start).map_err(|source| self.io_error("read", source))?;
        #[derive(Deserialize)]
        struct SeqOnly {
            seq: u64,
        }
        let SeqOnly { seq } = serde_json::from_slice(&line).map_err(|source| AuditError::Corrupt {
            path: self.path.clone(),
            line: self.count_lines(start).unwrap_or(0) + 1,
            source,
        })?;
        self.next_seq = seq + 1;
        self.last_hash = chain::sha256(&line);
        self.known_len = Some(len);
        Ok(())
    }

    /// Offset of the last `\n` strictly before `end`, reading backwards in
    /// chunks so a long log costs only its tail.
    fn rfind_newline(&self, end: u64) -> io::Result<Option<u64>> {
        const CHUNK: u64 = 8192;
        let mut buf = vec![0u8; CHUNK as usize];
        let mut hi = end;
        while hi > 0 {
            let lo = hi.saturating_sub(CHUNK);
            let chunk = &mut buf[..(hi - lo) as usize];
            self.file.read_exact_at(chunk, lo)?;
            if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
                return Ok(Some(lo + i as u64));
            }
            hi = lo;
        }
        Ok(None)
    }

    /// Number of newlines before `end`; only used to give a line number in
    /// the rare error message.
    fn count_lines(&self, end: u64) -> io::Result<u64> {
        let mut buf = vec![0u8; 65536];
        let mut pos = 0u64;
        let mut count = 0u64;
        while pos < end {
            let want = (end - pos).min(buf.len() as u64) as usize;
            self.file.read_exact_at(&mut buf[..want], pos)?;
            count += buf[..want].iter().filter(|&&b| b == b'\n').count() as u64;
            pos += want as u64;
        }
        Ok(count)
    }

    fn io_error(&self, action: &'static str, source: io::Error) -> AuditError {
        AuditError::Io { action, path: self.path.clone(), source }
    }
}

pub use airlock_proto::time::rfc3339_utc;

/// Parses an RFC 3339 timestamp (`Z` or a numeric offset, optional fraction)
/// as written by [`rfc3339_utc`] or by hand. `None` when it is not one; used
/// by `gc` and `ls` to compute ages from the state directory.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(range)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, c) in frac.bytes().take(digits).enumerate() {
            if i < 9 {
                nanos += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
            }
        }
        rest = &frac[digits..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        _ => {
            let ob = rest.as_bytes();
            if ob.len() != 6 || ob[3] != b':' {
                return None;
            }
            let sign = match ob[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            if oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    let base = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))?
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))?
    };
    base.checked_add(Duration::from_nanos(u64::from(nanos)))
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Inverse of the civil date of a day count (`airlock_proto::time`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let shifted_month = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Exact JSON form for paths that may not be UTF-8 (see the module comment).
pub(crate) mod path_repr {
    use super::*;
    use serde::{Deserializer, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Bytes { non_utf8_hex: String },
    }

    fn to_repr(path: &Path) -> Repr {
        match path.to_str() {
            Some(s) => Repr::Text(s.to_owned()),
            None => Repr::Bytes {
                non_utf8_hex: path.as_os_str().as_bytes().iter().map(|b| format!("{b:02x}")).collect(),
            },
        }
    }

    fn from_repr<E: serde::de::Error>(repr: Repr) -> Result<PathBuf, E> {
        match repr {
            Repr::Text(s) => Ok(PathBuf::from(s)),
            Repr::Bytes { non_utf8_hex } => {
                let hex = non_utf8_hex.as_bytes();
                if hex.len() % 2 != 0 {
                    return Err(E::custom("non_utf8_hex has an odd number of digits"));
                }
                let digit = |c: u8| {
                    (c as char).to_digit(16).ok_or_else(|| E::custom("non_utf8_hex holds a non-hex digit"))
                };
                let bytes = hex
                    .chunks(2)
                    .map(|pair| Ok((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
                    .collect::<Result<Vec<u8>, E>>()?;
                Ok(PathBuf::from(OsString::from_vec(bytes)))
            }
        }
    }

    pub(crate) mod option {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
            path.as_deref().map(to_repr).serialize(s)
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
            Option::<Repr>::deserialize(d)?.map(from_repr).transpose()
        }
    }

    pub(crate) mod plain {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
            to_repr(path).serialize(s)
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
            from_repr(Repr::deserialize(d)?)
        }
    }

    pub(crate) mod vec {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(paths: &[PathBuf], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(paths.iter().map(|p| to_repr(p)))
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
            Vec::<Repr>::deserialize(d)?.into_iter().map(from_repr).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn removed(reason: &str) -> AuditEvent {
        AuditEvent::Removed { reason: reason.into() }
    }

    fn started(cmd: &str) -> AuditEvent {
        AuditEvent::CommandStarted { argv: vec![cmd.into()], pid: Some(7) }
    }

    #[test]
    fn appends_one_line_per_record_and_creates_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        log.record(AuditEvent::Created {
            image: None,
            policy: "local-dev".into(),
            workspace: Some("/src/app".into()),
            workspace_mode: "overlay".into(),
            limits: serde_json::json!({"memory_mb": 512}),
            degraded: vec!["cgroups".into()],
        })
        .unwrap();
        log.record(started("make")).unwrap();

        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["event"], "created");
        assert_eq!(first["seq"], 1);
        assert_eq!(first["workspace"], "/src/app");
        assert_eq!(first["limits"]["memory_mb"], 512);
        let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["event"], "command_started");
        assert_eq!(second["seq"], 2);

        let records = AuditLog::read_all(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].event, started("make"));
        assert!(parse_rfc3339(&records[0].ts).is_some(), "{}", records[0].ts);
    }

    #[test]
    fn reopening_continues_seq_and_never_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        {
            let mut log = AuditLog::open(&path).unwrap();
            for i in 0..3 {
                log.record(started(&format!("cmd{i}"))).unwrap();
            }
        }
        let mut log = AuditLog::open(&path).unwrap();
        log.record(removed("done")).unwrap();
        let seqs: Vec<u64> = AuditLog::read_all(&path).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
    }

    #[test]
    fn two_open_writers_keep_seq_increasing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut a = AuditLog::open(&path).unwrap();
        let mut b = AuditLog::open(&path).unwrap();
        a.record(started("a1")).unwrap();
        b.record(started("b1")).unwrap();
        a.record(started("a2")).unwrap();
        let seqs: Vec<u64> = AuditLog::read_all(&path).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }

    #[test]
    fn torn_last_line_is_skipped_on_read_and_cut_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        {
            let mut log = AuditLog::open(&path).unwrap();
            log.record(started("one")).unwrap();
            log.record(started("two")).unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"ts":"2024-01-01T00:00:00.000Z","seq":3,"event":"rem"#).unwrap();
        drop(f);

        let records = AuditLog::read_all(&path).unwrap();
        assert_eq!(records.len(), 2);

        let mut log = AuditLog::open(&path).unwrap();
        log.record(removed("after crash")).unwrap();
        let records = AuditLog::read_all(&path).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[2].seq, 3);
        assert_eq!(records[2].event, removed("after crash"));
    }

    #[test]
    fn garbage_in_the_middle_is_an_error_with_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        {
            let mut log = AuditLog::open(&path).unwrap();
            log.record(started("one")).unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"not json\n").unwrap();
        drop(f);
        // Reopening refuses to guess a seq after a damaged last record.
        let err = AuditLog::open(&path).unwrap_err();
        assert!(matches!(err, AuditError::Corrupt { line: 2, .. }), "{err}");
        // A corrupt line followed by valid records is reported by read_all.
        let valid = serde_json::to_string(&AuditRecord {
            v: SCHEMA_VERSION,
            prev: None,
            ts: rfc3339_utc(SystemTime::now()),
            seq: 9,
            event: removed("x"),
        })
        .unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        writeln!(f, "{valid}").unwrap();
        drop(f);
        let err = AuditLog::read_all(&path).unwrap_err();
        assert!(matches!(err, AuditError::Corrupt { line: 2, .. }), "{err}");
        assert!(err.to_string().contains("audit.jsonl"), "{err}");
    }

    #[test]
    fn non_utf8_paths_round_trip_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let weird = PathBuf::from(OsString::from_vec(b"src/\xff\xfe.rs".to_vec()));
        let event = AuditEvent::Applied {
            written: vec![weird.clone(), "src/ok.rs".into()],
            deleted: vec![],
            allow_protected: false,
            by_uid: 1000,
            digest: Some(format!("sha256:{}", "0".repeat(64))),
        };
        let mut log = AuditLog::open(&path).unwrap();
        log.record(event.clone()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(r#"{"non_utf8_hex":"7372632ffffe2e7273"}"#), "{text}");
        let records = AuditLog::read_all(&path).unwrap();
        assert_eq!(records[0].event, event);
    }

    fn refused_request(path_len: usize) -> AuditEvent {
        AuditEvent::Network(airlock_egress::NetEvent {
            via: "http".into(),
            host: "example.net".into(),
            port: 80,
            address: None,
            method: Some("GET".into()),
            path: Some(format!("/{}", "a".repeat(path_len))),
            allowed: false,
            rule: "no allow entry matches example.net:80".into(),
            handling: airlock_egress::Handling::Refused,
            bytes_out: 0,
            bytes_in: 0,
            duration_ms: 0,
            secrets: vec![],
            destination: None,
        })
    }

    #[test]
    fn fields_are_capped_with_their_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        log.record(refused_request(60_000)).unwrap();
        let argv: Vec<String> = (0..90_000).map(|i| format!("a{i:07}")).collect();
        log.record(AuditEvent::CommandStarted { argv, pid: None }).unwrap();
        log.record(AuditEvent::Error { stage: "run".into(), message: "m".repeat(100_000) }).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() < 20_000, "{}", text.len());
        let records = AuditLog::read_all(&path).unwrap();
        let AuditEvent::Network(e) = &records[0].event else { panic!() };
        assert!(e.path.as_deref().unwrap().ends_with("[cut by airlock: 60001 bytes in all]"));
        let AuditEvent::CommandStarted { argv, .. } = &records[1].event else { panic!() };
        assert_eq!(argv[0], "a0000000");
        assert!(argv.last().unwrap().contains("more items"), "{argv:?}");
        let AuditEvent::Error { message, .. } = &records[2].event else { panic!() };
        assert!(message.ends_with("[cut by airlock: 100000 bytes in all]"));
    }

    #[test]
    fn a_full_log_drops_bulk_events_once_marked_and_keeps_lifecycle_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let limit = 256 * 1024;
        let mut proxy = AuditLog::open(&path).unwrap().with_limit(limit);
        for _ in 0..1000 {
            proxy.record(refused_request(2000)).unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= limit - RESERVE + 4096, "{len}");
        // Another writer, which never saw the marker: no more bulk events,
        // no second marker; lifecycle events still go in.
        let mut other = AuditLog::open(&path).unwrap().with_limit(limit);
        other.record(AuditEvent::ExecStarted { id: 1, argv: vec!["true".into()], pid: None }).unwrap();
        other.record(refused_request(1)).unwrap();
        other.record(removed("done")).unwrap();
        let records = AuditLog::read_all(&path).unwrap();
        let kinds: Vec<&str> = records.iter().map(|r| r.event.kind()).collect();
        assert_eq!(kinds.iter().filter(|k| **k == "audit_capped").count(), 1, "{kinds:?}");
        let at = kinds.iter().position(|k| *k == "audit_capped").unwrap();
        assert_eq!(&kinds[at + 1..], ["removed"]);
        assert!(kinds[..at].iter().all(|k| *k == "network"));
        let AuditEvent::AuditCapped { message, .. } = &records[at].event else { panic!() };
        assert!(message.contains("limits.audit_size") && message.contains("256K"), "{message}");
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "seq stays continuous");
        assert!(std::fs::metadata(&path).unwrap().len() <= limit);
        // Reopened later (another process): still capped.
        let mut third = AuditLog::open(&path).unwrap().with_limit(limit);
        third.record(refused_request(1)).unwrap();
        assert_eq!(AuditLog::read_all(&path).unwrap().len(), records.len());
    }

    #[test]
    fn refuses_symlinked_log() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"").unwrap();
        let link = dir.path().join("audit.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(AuditLog::open(&link).is_err());
    }

    #[test]
    fn formats_known_instants() {
        let at =
            |secs: u64, millis: u64| rfc3339_utc(UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000Z");
        let before = UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(rfc3339_utc(before), "1969-12-31T23:59:58.500Z");
    }

    #[test]
    fn parse_inverts_format() {
        for ms in [0u64, 1, 951_782_400_005, 1_709_251_199_999, 253_402_300_799_000] {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            assert_eq!(parse_rfc3339(&rfc3339_utc(t)), Some(t), "{ms}");
        }
        let t = UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(parse_rfc3339(&rfc3339_utc(t)), Some(t));
        assert_eq!(parse_rfc3339("2024-03-01T02:00:00+02:00"), parse_rfc3339("2024-03-01T00:00:00Z"));
        for bad in [
            "",
            "2024-02-30T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00+2:00",
            "２024-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }
}
