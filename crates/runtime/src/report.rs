//! `airlock report`: what the HTML report shows, gathered from a sandbox's
//! state directory, and the page rendered (`airlock_report`). The CLI and
//! the daemon's `GET …/report` both call [`render`].
//!
//! A report is for reviewing a sandbox whatever state it is in, so a part
//! that cannot be read (a damaged audit line, a layer already removed, a
//! policy file gone) becomes a notice on the page, not a failure: only a
//! sandbox that does not exist fails.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use airlock_policy::{Policy, format_duration, format_size};
use airlock_report::{
    DIFF_TEXT_BUDGET, DiffSection, FileChange, FileContent, PolicySection, ReportInput, SandboxFacts,
};
use airlock_workspace::{ChangeRenderer, EntryType};
use serde_json::Value;

use crate::ops::{self, OpError};
use crate::state::{SandboxDir, SandboxMeta, StateRoot};
use crate::view::{SandboxView, State};

/// The report of sandbox `name`, as one self-contained HTML page, which
/// calls it `shown` (the daemon stores a user's sandbox under a name of its
/// own and shows the user theirs).
pub fn render(root: &StateRoot, name: &str, shown: &str) -> Result<String, OpError> {
    let mut input = gather(root, name)?;
    input.sandbox.name = shown.to_owned();
    Ok(airlock_report::render(&input))
}

/// The Content-Security-Policy every report carries, for a server to send
/// as a header too.
pub fn content_security_policy() -> String {
    airlock_report::content_security_policy()
}

/// What the report of sandbox `name` shows.
pub fn gather(root: &StateRoot, name: &str) -> Result<ReportInput, OpError> {
    let sandbox = root.open(name)?;
    let meta = sandbox.read_meta().ok();
    let mut problems = Vec::new();
    let events = match read_events(&sandbox.audit_path()) {
        Ok((events, mut damaged)) => {
            problems.append(&mut damaged);
            events
        }
        Err(e) => {
            problems.push(format!("The audit log could not be read: {e}"));
            Vec::new()
        }
    };
    let policy = match Policy::load_file(&sandbox.policy_path()) {
        Ok(policy) => Some(policy_section(&policy)),
        Err(e) => {
            problems.push(format!("The sandbox's stored policy could not be read: {e}"));
            None
        }
    };
    Ok(ReportInput {
        sandbox: facts(&sandbox, meta.as_ref()),
        events,
        problems,
        diff: diff_section(root, name, meta.as_ref()),
        policy,
        generated_at: crate::now_rfc3339(),
        generator: format!("airlock {}", env!("CARGO_PKG_VERSION")),
    })
}

fn facts(sandbox: &SandboxDir, meta: Option<&SandboxMeta>) -> SandboxFacts {
    let (state, lost) = State::of(meta, sandbox.is_live(), false);
    let view = SandboxView::of(sandbox.name(), meta, (state, lost));
    let exit = view.exit.as_ref().map(|e| {
        let mut text = match (e.code, e.signal) {
            (_, Some(s)) => format!("killed by signal {s}"),
            (Some(c), None) => format!("exit {c}"),
            (None, None) => "ended".to_owned(),
        };
        if e.timed_out {
            text.push_str(", time limit hit");
        }
        if e.oom_killed {
            text.push_str(", out of memory");
        }
        text
    });
    SandboxFacts {
        name: view.name,
        state: if lost {
            format!("{} (lost: its supervisor died)", state.as_str())
        } else {
            state.as_str().to_owned()
        },
        policy: view.policy,
        tier: view.tier.as_str().to_owned(),
        workspace: view.workspace,
        workspace_mode: view.workspace_mode,
        created_at: view.created_at,
        started_at: view.started_at,
        finished_at: view.finished_at,
        exit,
        degraded: meta.map(|m| m.degraded.clone()).unwrap_or_default(),
    }
}

/// How much of an audit log a report reads. The log is bounded by the
/// policy's `limits.audit_size` (32M unless a policy file raises it); a
/// report made in the daemon must stay bounded whatever a policy says.
const MAX_LOG_READ: u64 = 128 << 20;

/// Every record of the audit log as it is in the file, whatever its kind,
/// and what is wrong with the file (a line that is not a JSON object). A
/// last line without its newline is being written (or was cut by a
/// crash) and is left out.
pub fn read_events(path: &Path) -> std::io::Result<(Vec<Value>, Vec<String>)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    let size = file.metadata()?.len();
    let mut bytes = Vec::new();
    file.take(MAX_LOG_READ).read_to_end(&mut bytes)?;
    let mut problems = Vec::new();
    if size > MAX_LOG_READ {
        problems.push(format!(
            "The audit log is {}; this page shows its first {} (the log itself has the rest).",
            format_size(size),
            format_size(MAX_LOG_READ)
        ));
    }
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(end) => &bytes[..=end],
        None => &[][..],
    };
    let mut events = Vec::new();
    for (i, line) in complete.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Value>(line) {
            Ok(v @ Value::Object(_)) => events.push(v),
            Ok(_) => {
                problems.push(format!("Line {} of the audit log is not an event (not a JSON object).", i + 1))
            }
            Err(e) => problems.push(format!("Line {} of the audit log is damaged: {e}.", i + 1)),
        }
    }
    Ok((events, problems))
}

fn diff_section(root: &StateRoot, name: &str, meta: Option<&SandboxMeta>) -> DiffSection {
    let mode = meta.map(|m| m.workspace_mode.as_str()).unwrap_or("none");
    if meta.is_none_or(|m| m.workspace.is_none()) || mode == "none" {
        return DiffSection::Unavailable("The sandbox has no workspace.".to_owned());
    }
    match mode {
        "overlay" => {}
        "rw" => {
            return DiffSection::Unavailable(
                "The workspace was writable in place (mode rw): the sandbox's changes went straight to it, so \
                 there is no diff to review."
                    .to_owned(),
            );
        }
        other => {
            return DiffSection::Unavailable(format!(
                "The workspace was mounted in mode {other}: the sandbox could not change it."
            ));
        }
    }
    let view = match ops::diff(root, name, &mut |_| {}) {
        Ok(view) => view,
        Err(e) => return DiffSection::Unavailable(format!("The diff could not be computed: {e}")),
    };
    let renderer = match ChangeRenderer::open(&view.lower, &view.upper) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::debug!(error = %e, "the report shows the diff without its content");
            None
        }
    };
    let mut budget = DIFF_TEXT_BUDGET;
    let files = view
        .diff
        .changes
        .iter()
        .map(|c| {
            let entry = c.new_type.or(c.old_type);
            let content = match (&renderer, entry) {
                (_, Some(EntryType::Dir)) => FileContent::Empty,
                (None, _) => FileContent::NotShown("The sandbox's layer could not be opened to show it.".into()),
                (Some(_), _) if budget == 0 => FileContent::NotShown(format!(
                    "Not shown: the page holds at most {} of diff; `airlock diff` shows all of it.",
                    format_size(DIFF_TEXT_BUDGET as u64)
                )),
                (Some(renderer), _) => {
                    let mut text = Vec::new();
                    match renderer.render(c, &mut text) {
                        Ok(()) if text.len() > budget => {
                            budget = 0;
                            FileContent::NotShown(format!(
                                "Not shown: its diff ({} bytes) is past what the page holds; `airlock diff` shows it.",
                                text.len()
                            ))
                        }
                        Ok(()) => {
                            budget -= text.len();
                            FileContent::Shown(String::from_utf8_lossy(&text).into_owned())
                        }
                        Err(e) => FileContent::NotShown(format!("Not shown: {e}")),
                    }
                }
            };
            FileChange {
                path: airlock_workspace::quote(&c.path),
                kind: json_name(&c.kind),
                entry: entry.map(|t| json_name(&t)).unwrap_or_default(),
                lines_added: c.lines_added,
                lines_removed: c.lines_removed,
                binary: c.binary,
                content,
            }
        })
        .collect();
    DiffSection::Changes { files, digest: view.diff.digest().to_string() }
}

/// A unit enum's name as its JSON form spells it (`type_changed`).
fn json_name(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

fn policy_section(policy: &Policy) -> PolicySection {
    let l = &policy.limits;
    let limits = vec![
        ("timeout".to_owned(), format_duration(l.timeout)),
        ("memory".to_owned(), format_size(l.memory)),
        ("processes (pids)".to_owned(), l.pids.to_string()),
        ("cpus".to_owned(), l.cpus.to_string()),
        ("disk (writable layer)".to_owned(), format_size(l.disk)),
        ("open files (nofile)".to_owned(), l.nofile.to_string()),
        ("/tmp size".to_owned(), format_size(policy.filesystem.tmp_size)),
        ("output log size".to_owned(), format_size(l.log_size)),
        ("audit log size".to_owned(), format_size(l.audit_size)),
        ("stop grace".to_owned(), format_duration(l.stop_grace)),
    ];
    // The header names the files the policy was resolved from, here the
    // copy in the sandbox's state directory: a host path (under the name
    // the daemon stores the sandbox by) that says nothing to a reviewer.
    let toml = policy.to_toml();
    let toml = match toml.split_once('\n') {
        Some((first, rest)) if first.starts_with("# Policy ") => rest.to_owned(),
        _ => toml,
    };
    PolicySection { limits, toml }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use super::*;

    #[test]
    fn events_are_read_as_written_and_damage_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(f, r#"{{"ts":"t","seq":1,"event":"created","policy":"dev"}}"#).unwrap();
        writeln!(f, r#"{{"ts":"t","seq":2,"event":"exec","pid":5,"ppid":1,"argv":["sh"],"hash":"x"}}"#)
            .unwrap();
        writeln!(f, "not json").unwrap();
        writeln!(f, "[1]").unwrap();
        // The capped record is padded with spaces (see audit.rs).
        writeln!(f, r#"{{"ts":"t","seq":3,"event":"audit_capped"}}{}"#, " ".repeat(10)).unwrap();
        write!(f, r#"{{"ts":"t","seq":4,"ev"#).unwrap();
        drop(f);
        let (events, problems) = read_events(&path).unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["created", "exec", "audit_capped"]);
        assert_eq!(events[1]["hash"], "x", "fields this build does not know are kept");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("Line 3 of the audit log is damaged"), "{problems:?}");
        assert!(problems[1].starts_with("Line 4 of the audit log is not an event"), "{problems:?}");

        let link = dir.path().join("link.jsonl");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(read_events(&link).is_err(), "a link is not followed");
    }
}
