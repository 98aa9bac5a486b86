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

/// The report of an export bundle that passed [`crate::bundle::open`]'s
/// checks, on any host: made from what the bundle holds (its audit log, the
/// sandbox's metadata and stored policy, the diff and the patch it carries,
/// redacted at finalize where the sandbox had secrets).
pub fn render_bundle(opened: &crate::bundle::Opened) -> String {
    let part = |name: &str| opened.parts.get(name).map(Vec::as_slice);
    let mut problems = Vec::new();
    let meta = part("meta.json").and_then(|bytes| {
        serde_json::from_slice::<SandboxMeta>(bytes)
            .map_err(|e| problems.push(format!("The bundle's meta.json could not be read: {e}")))
            .ok()
    });
    let events = match opened.audit.as_deref() {
        Some(bytes) => {
            let (events, mut damaged) = events_of(bytes);
            problems.append(&mut damaged);
            events
        }
        None => {
            problems.push("The bundle has no audit log.".to_owned());
            Vec::new()
        }
    };
    let policy = match part("policy.toml").map(policy_of) {
        Some(Ok(policy)) => Some(policy_section(&policy)),
        Some(Err(e)) => {
            problems.push(format!("The bundle's policy.toml could not be read: {e}"));
            None
        }
        None => None,
    };
    let name = &opened.manifest.sandbox;
    let input = ReportInput {
        sandbox: facts(name, meta.as_ref(), false),
        events,
        problems,
        diff: bundle_diff(part("diff.json"), part("diff.patch")),
        policy,
        generated_at: crate::now_rfc3339(),
        generator: format!("airlock {} (from an export bundle)", env!("CARGO_PKG_VERSION")),
    };
    airlock_report::render(&input)
}

/// A bundle's stored policy (it may extend only a built-in profile).
fn policy_of(bytes: &[u8]) -> Result<Policy, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    Policy::load_text(text, Path::new("policy.toml")).map_err(|e| e.to_string())
}

/// The diff section from a bundle's `diff.json` (the changes) and
/// `diff.patch` (their text, as exported: redacted where it had to be).
fn bundle_diff(json: Option<&[u8]>, patch: Option<&[u8]>) -> DiffSection {
    let Some(json) = json else {
        return DiffSection::Unavailable(
            "The bundle holds no diff (the sandbox had no overlay workspace).".into(),
        );
    };
    let diff: Value = match serde_json::from_slice(json) {
        Ok(v) => v,
        Err(e) => return DiffSection::Unavailable(format!("The bundle's diff.json could not be read: {e}")),
    };
    let mut sections = patch.map(|p| airlock_workspace::patch_sections(&String::from_utf8_lossy(p)));
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
    let mut budget = DIFF_TEXT_BUDGET;
    let files = diff
        .get("changes")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let path = std::path::PathBuf::from(text(c, "path"));
            let entry = c.get("new_type").filter(|t| !t.is_null()).or(c.get("old_type"));
            let entry = entry.and_then(Value::as_str).unwrap_or_default().to_owned();
            let found = sections.as_mut().and_then(|s| s.remove(&airlock_workspace::header_line(&path)));
            let content = match found {
                _ if entry == "dir" => FileContent::Empty,
                None if sections.is_none() => FileContent::NotShown("The bundle holds no patch.".into()),
                None => FileContent::NotShown("Not in the bundle's patch.".into()),
                Some(_) if budget == 0 => FileContent::NotShown(format!(
                    "Not shown: the page holds at most {} of diff.",
                    format_size(DIFF_TEXT_BUDGET as u64)
                )),
                Some(t) if t.len() > budget => {
                    budget = 0;
                    FileContent::NotShown(format!(
                        "Not shown: its diff ({} bytes) is past what the page holds.",
                        t.len()
                    ))
                }
                Some(t) => {
                    budget -= t.len();
                    FileContent::Shown(t)
                }
            };
            FileChange {
                path: airlock_workspace::quote(&path),
                kind: text(c, "kind"),
                entry,
                lines_added: c.get("lines_added").and_then(Value::as_u64),
                lines_removed: c.get("lines_removed").and_then(Value::as_u64),
                binary: c.get("binary").and_then(Value::as_bool).unwrap_or(false),
                content,
            }
        })
        .collect();
    DiffSection::Changes { files, digest: text(&diff, "digest") }
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
    let stored = Policy::load_file(&sandbox.policy_path());
    // Unknown (no stored policy) counts as holding secrets: the diff's
    // content is then shown only redacted.
    let has_secrets = stored.as_ref().map_or(true, |p| !p.secrets.is_empty());
    let policy = match stored {
        Ok(policy) => Some(policy_section(&policy)),
        Err(e) => {
            problems.push(format!("The sandbox's stored policy could not be read: {e}"));
            None
        }
    };
    Ok(ReportInput {
        sandbox: facts(sandbox.name(), meta.as_ref(), sandbox.is_live()),
        events,
        problems,
        diff: diff_section(root, name, &sandbox, meta.as_ref(), has_secrets),
        policy,
        generated_at: crate::now_rfc3339(),
        generator: format!("airlock {}", env!("CARGO_PKG_VERSION")),
    })
}

fn facts(name: &str, meta: Option<&SandboxMeta>, live: bool) -> SandboxFacts {
    let (state, lost) = State::of(meta, live, false);
    let view = SandboxView::of(name, meta, (state, lost));
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
    let (events, mut damaged) = events_of(&bytes);
    problems.append(&mut damaged);
    Ok((events, problems))
}

/// The records of an audit log's bytes, and what is wrong with them.
fn events_of(bytes: &[u8]) -> (Vec<Value>, Vec<String>) {
    let mut problems = Vec::new();
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
    (events, problems)
}

/// Where the text of each change comes from. The workspace's side of a
/// diff (context, removed lines) is the host's and may hold a secret's
/// value, which only the sandbox's supervisor knows: for a sandbox with
/// secrets the text is the patch kept redacted at finalize, or, while it
/// runs, what its supervisor gives back redacted; otherwise none is shown.
enum ChangeText {
    Layers(ChangeRenderer),
    Kept(Vec<Option<String>>),
    RedactedLive(ChangeRenderer, crate::supervisor::SupervisorClient),
    Withheld(String),
}

impl ChangeText {
    /// The text of change number `index`, or why it is not shown.
    fn of(index: usize, change: &airlock_workspace::Change, from: &ChangeText) -> Result<String, String> {
        let rendered = |renderer: &ChangeRenderer| {
            let mut text = Vec::new();
            renderer.render(change, &mut text).map_err(|e| format!("Not shown: {e}"))?;
            Ok::<_, String>(String::from_utf8_lossy(&text).into_owned())
        };
        match from {
            ChangeText::Layers(renderer) => rendered(renderer),
            ChangeText::Kept(sections) => Ok(sections.get(index).cloned().flatten().unwrap_or_default()),
            ChangeText::RedactedLive(renderer, supervisor) => {
                let text = rendered(renderer)?;
                match supervisor.redact(vec![text]) {
                    Ok(mut texts) if texts.len() == 1 => Ok(texts.remove(0)),
                    _ => Err(WITHHELD.to_owned()),
                }
            }
            ChangeText::Withheld(why) => Err(why.clone()),
        }
    }
}

const WITHHELD: &str = "Withheld: the sandbox has secrets and its supervisor could not redact this text; `airlock diff` shows it.";

fn diff_section(
    root: &StateRoot,
    name: &str,
    sandbox: &SandboxDir,
    meta: Option<&SandboxMeta>,
    has_secrets: bool,
) -> DiffSection {
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
    let renderer = ChangeRenderer::open(&view.lower, &view.upper).map_err(|e| {
        tracing::debug!(error = %e, "the report shows the diff without its content");
        "The sandbox's layer could not be opened to show it.".to_owned()
    });
    let kept = || {
        std::fs::read_to_string(sandbox.redacted_patch_path()).map_err(|_| {
            "Withheld: the sandbox has secrets and no diff kept redacted; `airlock diff` shows it.".to_owned()
        })
    };
    let source = match (has_secrets, sandbox.is_live(), renderer) {
        (false, _, Ok(renderer)) => ChangeText::Layers(renderer),
        (true, false, _) => match kept() {
            Ok(patch) => ChangeText::Kept(view.diff.sections_of(&patch)),
            Err(why) => ChangeText::Withheld(why),
        },
        (true, true, Ok(renderer)) => match crate::supervisor::SupervisorClient::connect(sandbox) {
            Ok(supervisor) => ChangeText::RedactedLive(renderer, supervisor),
            Err(_) => ChangeText::Withheld(WITHHELD.to_owned()),
        },
        (_, _, Err(why)) => ChangeText::Withheld(why),
    };
    let mut budget = DIFF_TEXT_BUDGET;
    let files = view
        .diff
        .changes
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let entry = c.new_type.or(c.old_type);
            let content = match entry {
                Some(EntryType::Dir) => FileContent::Empty,
                _ if budget == 0 => FileContent::NotShown(format!(
                    "Not shown: the page holds at most {} of diff; `airlock diff` shows all of it.",
                    format_size(DIFF_TEXT_BUDGET as u64)
                )),
                _ => match ChangeText::of(index, c, &source) {
                    Ok(text) if text.len() > budget => {
                        budget = 0;
                        FileContent::NotShown(format!(
                            "Not shown: its diff ({} bytes) is past what the page holds; `airlock diff` shows it.",
                            text.len()
                        ))
                    }
                    Ok(text) => {
                        budget -= text.len();
                        FileContent::Shown(text)
                    }
                    Err(why) => FileContent::NotShown(why),
                },
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
