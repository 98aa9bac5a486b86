//! The audit log's hash chain: each record's `prev` is the SHA-256 of the
//! exact bytes of the line before it (without its newline; 64 zeros for
//! the first line), and the head — the last record's sequence number and
//! hash — is kept beside the log in `audit.head`, in the state directory
//! the sandbox cannot reach. The daemon's index and an export bundle's
//! manifest record heads too.
//!
//! [`verify`] walks a log's bytes and names the first line where the chain
//! breaks: an edited line breaks the link of the line after it, a removed
//! or reordered one breaks the sequence numbers and the link, an inserted
//! one both; cutting events off the end is found against a recorded head.
//! Records written before the chain existed (no `v`, no `prev`) are
//! counted as such, never taken for tampering. What the chain cannot tell
//! is written in SECURITY.md: whoever can rewrite the log and every
//! recorded head (root on the host) can forge a consistent history.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The `prev` of a log's first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// The head file's fixed length: rewritten in place with one `pwrite`, it
/// never keeps bytes of a longer earlier version.
const HEAD_LEN: usize = 128;

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// 64 hex digits (either case) as 32 bytes.
pub fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Hex digits (either case) as bytes; `None` when they are not.
pub(crate) fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks(2)
        .map(|pair| Some(((pair[0] as char).to_digit(16)? * 16 + (pair[1] as char).to_digit(16)?) as u8))
        .collect()
}

/// The last record of a log as someone recorded it: its sequence number
/// and the SHA-256 of its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct HeadText {
    v: u32,
    seq: u64,
    hash: String,
}

impl Head {
    /// The head file's text: one JSON object, padded to [`HEAD_LEN`].
    pub(crate) fn encode(&self) -> Vec<u8> {
        let text = HeadText { v: super::SCHEMA_VERSION, seq: self.seq, hash: hex(&self.hash) };
        let mut line = serde_json::to_vec(&text).unwrap_or_default();
        line.resize(HEAD_LEN - 1, b' ');
        line.push(b'\n');
        line
    }

    /// Parses a head file's (or a bundle member's) bytes.
    pub fn decode(bytes: &[u8]) -> Option<Head> {
        let text: HeadText = serde_json::from_slice(bytes.trim_ascii()).ok()?;
        Some(Head { seq: text.seq, hash: parse_hash(&text.hash)? })
    }
}

/// Where the head of `log` is kept: `audit.head` beside `audit.jsonl`.
pub fn head_path(log: &Path) -> PathBuf {
    log.with_extension("head")
}

/// The head file, open for rewriting after each append.
#[derive(Debug)]
pub(super) struct HeadFile {
    file: File,
    pub(super) path: PathBuf,
}

impl HeadFile {
    pub(super) fn open(log: &Path) -> io::Result<HeadFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = head_path(log);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)?;
        Ok(HeadFile { file, path })
    }

    pub(super) fn write(&self, head: Head, sync: bool) -> io::Result<()> {
        self.file.write_all_at(&head.encode(), 0)?;
        if sync {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// The head recorded beside `log`; `None` when there is none (a log written
/// before the chain, or a sandbox without events). An unreadable head is
/// an error: it is evidence.
pub fn read_head(log: &Path) -> io::Result<Option<Head>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = head_path(log);
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut buf = vec![0u8; HEAD_LEN * 2];
    let n = file.read_at(&mut buf, 0)?;
    buf.truncate(n);
    if buf.is_empty() {
        // Created, never written: the writer failed before its first record.
        return Ok(None);
    }
    Head::decode(&buf).map(Some).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a head", path.display()))
    })
}

/// Who recorded a head a log is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnchorSource {
    /// `audit.head` beside the log, rewritten after every append: the log
    /// must end exactly there.
    HeadFile,
    /// The daemon's index, which records the head every few seconds: the
    /// log must hold that record (it may have grown since).
    DaemonIndex,
    /// The signed manifest of an export bundle: the log must end there.
    Bundle,
}

impl AnchorSource {
    fn text(self) -> &'static str {
        match self {
            AnchorSource::HeadFile => "the head file (audit.head)",
            AnchorSource::DaemonIndex => "the daemon's index",
            AnchorSource::Bundle => "the bundle's signed manifest",
        }
    }

    /// Whether the log must end at this head, or may have grown past it.
    fn is_end(self) -> bool {
        !matches!(self, AnchorSource::DaemonIndex)
    }
}

/// A head to hold a log to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub head: Head,
    pub source: AnchorSource,
}

/// One place where the log is not what was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Line number in the file (1-based); `None` for the log as a whole.
    pub line: Option<u64>,
    /// The sequence number of the event it concerns, when known.
    pub seq: Option<u64>,
    pub what: String,
}

/// The outcome of checking a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every chained record links to the one before; every head holds.
    Intact,
    /// Every record predates the chain: there is nothing to check.
    PredatesChain,
    /// At least one problem.
    Broken,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub verdict: Verdict,
    /// Records in the log (complete lines).
    pub events: u64,
    /// Records written before the chain existed (at the start of the log).
    pub unchained: u64,
    /// The last record's sequence number and hash.
    pub last_seq: Option<u64>,
    #[serde(serialize_with = "hex_opt")]
    pub last_hash: Option<[u8; 32]>,
    /// The heads the log was held to, each with whether it held.
    pub anchors: Vec<AnchorCheck>,
    /// A last line without its newline: a writer that crashed mid-record
    /// (the next writer cuts it off); not an event, not a problem.
    pub torn_tail: bool,
    /// Problems, first ones first (at most [`MAX_PROBLEMS`]).
    pub problems: Vec<Problem>,
}

/// One head and how the log compares with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AnchorCheck {
    pub source: AnchorSource,
    pub seq: u64,
    pub held: bool,
}

fn hex_opt<S: serde::Serializer>(hash: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    hash.map(|h| hex(&h)).serialize(s)
}

/// Problems listed at most; the rest are counted in one more.
pub const MAX_PROBLEMS: usize = 100;

/// The fields of a record the chain needs; the event's own fields are not
/// read, so a record of a kind this airlock does not know still checks.
#[derive(Deserialize)]
struct Link {
    #[serde(default)]
    v: Option<u32>,
    seq: u64,
    #[serde(default)]
    prev: Option<String>,
}

/// Checks the chain of a log's bytes against `anchors`. `head_expected`:
/// the log should have a head file (it lives in a state directory, where
/// every writer since the chain keeps one); a chained log without one is a
/// problem.
pub fn verify(data: &[u8], anchors: &[Anchor], head_expected: bool) -> ChainReport {
    let mut problems = Vec::new();
    let mut more = 0u64;
    let mut report = |problems: &mut Vec<Problem>, line: Option<u64>, seq: Option<u64>, what: String| {
        if problems.len() < MAX_PROBLEMS {
            problems.push(Problem { line, seq, what });
        } else {
            more += 1;
        }
    };
    // (seq, line, hash) of every record, for the anchors.
    let mut seen: Vec<(u64, u64, [u8; 32])> = Vec::new();
    let mut events = 0u64;
    let mut unchained = 0u64;
    let mut chained = 0u64;
    let mut prev_hash = GENESIS;
    let mut prev_seq: Option<u64> = None;
    let mut torn_tail = false;
    let mut line_no = 0u64;
    let mut rest = data;
    while !rest.is_empty() {
        let (line, complete) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let line = &rest[..i];
                rest = &rest[i + 1..];
                (line, true)
            }
            None => {
                let line = rest;
                rest = &[];
                (line, false)
            }
        };
        line_no += 1;
        if !complete {
            torn_tail = true;
            break;
        }
        let hash = sha256(line);
        let link = if line.iter().all(u8::is_ascii_whitespace) {
            Err("it is blank".to_owned())
        } else {
            serde_json::from_slice::<Link>(line).map_err(|e| format!("it is not an audit record ({e})"))
        };
        let link = match link {
            Ok(link) => link,
            Err(why) => {
                report(
                    &mut problems,
                    Some(line_no),
                    None,
                    format!("line {line_no} was not written by airlock: {why}"),
                );
                prev_hash = hash;
                continue;
            }
        };
        events += 1;
        let seq = link.seq;
        let is_chained = link.v.is_some() || link.prev.is_some();
        if !is_chained {
            if chained > 0 {
                report(
                    &mut problems,
                    Some(line_no),
                    Some(seq),
                    format!(
                        "event seq {seq} (line {line_no}) carries no link to the event before it, although \
                         events before it do: it was inserted, or edited"
                    ),
                );
            } else {
                unchained += 1;
            }
        } else {
            chained += 1;
            let expected_seq = prev_seq.map_or(1, |p| p + 1);
            let link_ok = link.prev.as_deref().and_then(parse_hash) == Some(prev_hash);
            if seq != expected_seq {
                let what = match prev_seq {
                    Some(p) if seq > expected_seq => format!(
                        "event seq {seq} (line {line_no}) follows seq {p}: {} removed before it",
                        if seq - expected_seq == 1 {
                            format!("event seq {expected_seq} was")
                        } else {
                            format!("events seq {expected_seq}–{} were", seq - 1)
                        }
                    ),
                    Some(p) if p == seq => format!(
                        "event seq {seq} appears twice (lines {} and {line_no}): one of them was inserted",
                        line_no - 1
                    ),
                    Some(p) => format!(
                        "event seq {seq} (line {line_no}) follows seq {p}: events were reordered, or \
                         this one inserted"
                    ),
                    None => format!(
                        "the log starts with event seq {seq} (line {line_no}), not seq 1: events were \
                         removed from its start"
                    ),
                };
                report(&mut problems, Some(line_no), Some(seq), what);
            } else if !link_ok {
                let what = match link.prev.as_deref().and_then(parse_hash) {
                    None => format!("event seq {seq} (line {line_no}) has no valid link (prev)"),
                    Some(_) if line_no == 1 => {
                        format!("event seq {seq} (line 1) links to an event before it, which is gone")
                    }
                    Some(_) => format!(
                        "event seq {} (line {}) was edited: its hash is not the link event seq {seq} \
                         (line {line_no}) holds (or that link was edited)",
                        prev_seq.unwrap_or(0),
                        line_no - 1
                    ),
                };
                report(&mut problems, Some(line_no), Some(seq), what);
            }
        }
        seen.push((seq, line_no, hash));
        prev_hash = hash;
        prev_seq = Some(seq);
    }
    let last = seen.last().copied();
    if head_expected && chained > 0 && !anchors.iter().any(|a| a.source == AnchorSource::HeadFile) {
        report(
            &mut problems,
            None,
            None,
            "the log is chained but no head is recorded beside it (audit.head is missing): events may \
             have been cut off its end"
                .to_owned(),
        );
    }
    let mut checks = Vec::new();
    for anchor in anchors {
        let Head { seq, hash } = anchor.head;
        let source = anchor.source.text();
        let found = seen.iter().rev().find(|(s, _, _)| *s == seq);
        let held = match (found, last) {
            (Some((_, line, h)), last) => {
                let last_seq = last.map_or(seq, |(s, _, _)| s);
                if *h != hash {
                    report(
                        &mut problems,
                        Some(*line),
                        Some(seq),
                        format!(
                            "event seq {seq} (line {line}) is not the one {source} recorded: it was edited, \
                             or the log rewritten from there"
                        ),
                    );
                    false
                } else if anchor.source.is_end() && last_seq != seq {
                    report(
                        &mut problems,
                        None,
                        Some(last_seq),
                        format!(
                            "events seq {}–{last_seq} come after the last one {source} recorded (seq {seq}): \
                             appended by something that did not record them there",
                            seq + 1
                        ),
                    );
                    false
                } else {
                    true
                }
            }
            (None, Some((last_seq, line, _))) if last_seq < seq => {
                report(
                    &mut problems,
                    Some(line),
                    Some(last_seq),
                    format!(
                        "the log ends at event seq {last_seq} (line {line}) but {source} records seq {seq}: \
                         the last {} removed (truncated)",
                        if seq - last_seq == 1 {
                            "event was".to_owned()
                        } else {
                            format!("{} events were", seq - last_seq)
                        }
                    ),
                );
                false
            }
            (None, None) => {
                report(
                    &mut problems,
                    None,
                    None,
                    format!(
                        "the log holds no events but {source} records seq {seq}: all of them were removed"
                    ),
                );
                false
            }
            (None, Some(_)) => {
                report(
                    &mut problems,
                    None,
                    Some(seq),
                    format!("event seq {seq}, which {source} recorded, is missing"),
                );
                false
            }
        };
        checks.push(AnchorCheck { source: anchor.source, seq, held });
    }
    if more > 0 {
        problems.push(Problem { line: None, seq: None, what: format!("… and {more} more problems") });
    }
    let verdict = if !problems.is_empty() {
        Verdict::Broken
    } else if chained == 0 && events > 0 {
        Verdict::PredatesChain
    } else {
        Verdict::Intact
    };
    ChainReport {
        verdict,
        events,
        unchained,
        last_seq: last.map(|(s, _, _)| s),
        last_hash: last.map(|(_, _, h)| h),
        anchors: checks,
        torn_tail,
        problems,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::super::{AuditEvent, AuditLog};
    use super::*;

    fn started(cmd: &str) -> AuditEvent {
        AuditEvent::CommandStarted { argv: vec![cmd.into()], pid: Some(7) }
    }

    /// A chained log of `n` records; its path.
    fn log_of(dir: &Path, n: usize) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            log.record(started(&format!("cmd{i}"))).unwrap();
        }
        path
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    }

    fn broken(path: &Path) -> ChainReport {
        let report = AuditLog::verify(path, &[]).unwrap();
        assert_eq!(report.verdict, Verdict::Broken, "{report:#?}");
        report
    }

    #[test]
    fn a_written_log_verifies_and_its_head_is_its_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_of(dir.path(), 5);
        let report = AuditLog::verify(&path, &[]).unwrap();
        assert_eq!(report.verdict, Verdict::Intact, "{report:#?}");
        assert_eq!((report.events, report.last_seq, report.unchained), (5, Some(5), 0));
        let head = read_head(&path).unwrap().unwrap();
        assert_eq!(head.seq, 5);
        assert_eq!(Some(head.hash), report.last_hash);
        assert_eq!(report.anchors, [AnchorCheck { source: AnchorSource::HeadFile, seq: 5, held: true }]);
        let first: serde_json::Value = serde_json::from_str(&lines(&path)[0]).unwrap();
        assert_eq!(first["v"], 2);
        assert_eq!(first["prev"], "0".repeat(64));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(head_path(&path)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn an_edited_event_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_of(dir.path(), 5);
        let mut l = lines(&path);
        l[2] = l[2].replace("cmd2", "cmdX");
        write_lines(&path, &l);
        let report = broken(&path);
        assert_eq!(report.problems[0].line, Some(4), "{report:#?}");
        assert!(report.problems[0].what.contains("event seq 3 (line 3) was edited"), "{report:#?}");
    }

    #[test]
    fn an_edited_last_event_is_found_by_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_of(dir.path(), 3);
        let mut l = lines(&path);
        l[2] = l[2].replace("cmd2", "cmdX");
        write_lines(&path, &l);
        let report = broken(&path);
        assert!(
            report.problems[0].what.contains("event seq 3 (line 3) is not the one the head file"),
            "{report:#?}"
        );
    }

    #[test]
    fn a_removed_event_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_of(dir.path(), 5);
        let mut l = lines(&path);
        l.remove(1);
        write_lines(&path, &l);
        let report = broken(&path);
        assert_eq!(report.problems[0].seq, Some(3));
        assert!(report.problems[0].what.contains("event seq 2 was removed"), "{report:#?}");
    }

    #[test]
    fn reordered_events_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_of(dir.path(), 5);
        let mut l = lines(&path);
        l.swap(2, 3);
        write_lines(&path, &l);
        let report = broken(&path);
        assert_eq!(report.problems[0].line, Some(3));
        assert!(report.problems[0].what.contains("seq 4 (line 3) follows seq 2"), "{report:#?}");
    }

    #[test]
    fn an_inserted_event_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_of(dir.path(), 4);
        let mut l = lines(&path);
        // A forged record that copies a real one's link and number.
        let forged = l[2].replace("cmd2", "forged");
        l.insert(2, forged);
        write_lines(&path, &l);
        let report = broken(&path);
        assert_eq!(report.problems[0].line, Some(4), "{report:#?}");
        assert!(report.problems[0].what.contains("event seq 3 appears twice (lines 3 and 4)"), "{report:#?}");
    }

    #[test]
    fn truncation_at_the_end_is_found_by_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_of(dir.path(), 5);
        let mut l = lines(&path);
        l.truncate(3);
        write_lines(&path, &l);
        let report = broken(&path);
        assert!(
            report.problems[0]
                .what
                .contains("ends at event seq 3 (line 3) but the head file (audit.head) records seq 5"),
            "{report:#?}"
        );
        // Without the head, the cut cannot be told: the log says so.
        std::fs::remove_file(head_path(&path)).unwrap();
        let report = broken(&path);
        assert!(report.problems[0].what.contains("audit.head is missing"), "{report:#?}");
    }

    #[test]
    fn a_log_that_grew_past_the_daemons_record_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_of(dir.path(), 3);
        let recorded = read_head(&path).unwrap().unwrap();
        let mut log = AuditLog::open(&path).unwrap();
        log.record(started("later")).unwrap();
        let daemon = Anchor { head: recorded, source: AnchorSource::DaemonIndex };
        let report = AuditLog::verify(&path, &[daemon]).unwrap();
        assert_eq!(report.verdict, Verdict::Intact, "{report:#?}");
        // The log rewritten from seq 2 on, head and all: the daemon's
        // record of seq 3 no longer holds.
        let mut l = lines(&path);
        l.truncate(1);
        write_lines(&path, &l);
        std::fs::remove_file(head_path(&path)).unwrap();
        let mut log = AuditLog::open(&path).unwrap();
        for cmd in ["x", "y", "z"] {
            log.record(started(cmd)).unwrap();
        }
        let report = AuditLog::verify(&path, &[daemon]).unwrap();
        assert_eq!(report.verdict, Verdict::Broken);
        assert!(report.problems[0].what.contains("event seq 3 (line 3) is not the one the daemon's index"));
    }

    #[test]
    fn a_log_from_before_the_chain_predates_it_and_a_later_append_chains_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let old = "{\"ts\":\"2025-01-01T00:00:00.000Z\",\"seq\":1,\"event\":\"removed\",\"reason\":\"a\"}\n\
                   {\"ts\":\"2025-01-01T00:00:01.000Z\",\"seq\":2,\"event\":\"removed\",\"reason\":\"b\"}\n";
        std::fs::write(&path, old).unwrap();
        let report = AuditLog::verify(&path, &[]).unwrap();
        assert_eq!(report.verdict, Verdict::PredatesChain, "{report:#?}");
        assert_eq!(report.unchained, 2);
        // Still readable, version 1.
        let records = AuditLog::read_all(&path).unwrap();
        assert_eq!(records[0].v, 1);
        assert_eq!(records[0].prev, None);

        let mut log = AuditLog::open(&path).unwrap();
        log.record(started("new")).unwrap();
        let report = AuditLog::verify(&path, &[]).unwrap();
        assert_eq!(report.verdict, Verdict::Intact, "{report:#?}");
        assert_eq!((report.unchained, report.events), (2, 3));
        // A chained record cannot be passed off as an old one.
        let mut l = lines(&path);
        l.push(l[0].clone().replace("\"seq\":1", "\"seq\":4"));
        write_lines(&path, &l);
        let report = broken(&path);
        assert!(report.problems[0].what.contains("carries no link"), "{report:#?}");
    }

    #[test]
    fn a_capped_log_still_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap().with_limit(256 * 1024);
        for _ in 0..300 {
            log.record(AuditEvent::ExecStarted { id: 1, argv: vec!["a".repeat(1000)], pid: None }).unwrap();
        }
        log.record(AuditEvent::Removed { reason: "done".into() }).unwrap();
        let kinds: Vec<String> =
            AuditLog::read_all(&path).unwrap().iter().map(|r| r.event.kind().to_owned()).collect();
        assert!(kinds.iter().any(|k| k == "audit_capped"));
        let report = AuditLog::verify(&path, &[]).unwrap();
        assert_eq!(report.verdict, Verdict::Intact, "{report:#?}");
    }

    #[test]
    fn a_torn_last_line_is_not_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_of(dir.path(), 3);
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, b"{\"v\":2,\"ts\":\"2").unwrap();
        let report = AuditLog::verify(&path, &[]).unwrap();
        assert_eq!(report.verdict, Verdict::Intact, "{report:#?}");
        assert!(report.torn_tail);
    }

    #[test]
    fn secrets_are_redacted_from_every_field() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let secrets = vec![("TOKEN".to_owned(), b"s3cr3t-value".to_vec())];
        let mut log = AuditLog::open(&path).unwrap().redacting(&secrets);
        log.record(AuditEvent::CommandStarted {
            argv: vec!["curl".into(), "-H".into(), "Authorization: s3cr3t-value".into()],
            pid: None,
        })
        .unwrap();
        log.record(AuditEvent::Error { stage: "run".into(), message: "bad s3cr3t-value".into() }).unwrap();
        let mut weird = b"dir/\xff-s3cr3t-value".to_vec();
        log.record(AuditEvent::WorkspaceChanged {
            path: PathBuf::from(OsString::from_vec(weird.clone())),
            kind: "added".into(),
            old_type: None,
            new_type: Some("file".into()),
            size: Some(1),
            sha256: None,
        })
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("[REDACTED:TOKEN]"), "{text}");
        // The non-UTF-8 path, redacted in its bytes.
        weird.truncate(5);
        weird.extend_from_slice(b"-[REDACTED:TOKEN]");
        assert!(text.contains(&hex(&weird)), "{text}");
        assert!(!text.contains(&hex(b"s3cr3t")), "{text}");
        assert_eq!(AuditLog::verify(&path, &[]).unwrap().verdict, Verdict::Intact);
    }
}
