//! One line of the timeline per audit event: its kind and a sentence
//! saying what happened. Kinds this build knows get their own sentence;
//! any other kind (a newer airlock's, or one added since) is shown from its
//! fields, so nothing in the log is left out of the page.

use serde_json::Value;

use crate::text::{bytes, command_line, millis, value_text, visible};

/// How a row is coloured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tone {
    Plain,
    /// An allowed connection, a clean exit.
    Good,
    /// A refusal, a failure, a kill.
    Bad,
    /// Something a reviewer should notice: a weaker sandbox, a full log.
    Warn,
}

impl Tone {
    pub(crate) fn class(self) -> &'static str {
        match self {
            Tone::Plain => "plain",
            Tone::Good => "good",
            Tone::Bad => "bad",
            Tone::Warn => "warn",
        }
    }
}

/// The `event` tag of a record (made visible), or `unknown`.
pub(crate) fn kind(v: &Value) -> String {
    match v.get("event").and_then(Value::as_str) {
        Some(k) if !k.is_empty() => visible(k),
        _ => "unknown".to_owned(),
    }
}

pub(crate) fn seq(v: &Value) -> Option<u64> {
    v.get("seq").and_then(Value::as_u64)
}

pub(crate) fn ts(v: &Value) -> String {
    v.get("ts").and_then(Value::as_str).map(visible).unwrap_or_default()
}

/// A field as text, when present and not null.
pub(crate) fn field(v: &Value, key: &str) -> Option<String> {
    v.get(key).filter(|x| !x.is_null()).map(value_text)
}

pub(crate) fn number(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

fn unsigned(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn flag(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// The usual name of signal `n` on Linux.
fn signal_name(n: i64) -> Option<&'static str> {
    Some(match n {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        31 => "SIGSYS",
        _ => return None,
    })
}

/// How a process ended, from `code` (or `exit`, as the exec trace writes
/// it) and `signal`, and whether that was a success.
pub(crate) fn ending(v: &Value) -> Option<(String, bool)> {
    let code = number(v, "code").or_else(|| number(v, "exit"));
    let signal = number(v, "signal");
    match (code, signal) {
        (_, Some(s)) => Some((
            match signal_name(s) {
                Some(name) => format!("killed by signal {s} ({name})"),
                None => format!("killed by signal {s}"),
            },
            false,
        )),
        (Some(c), None) => Some((format!("exit {c}"), c == 0)),
        (None, None) => None,
    }
}

/// What an event says, in a sentence, and how to colour it.
pub(crate) fn summary(v: &Value) -> (String, Tone) {
    let (mut text, tone) = summary_text(v);
    // What a microVM guest reported is its claim, not what the host saw.
    if let Some(by) = field(v, "reported_by") {
        text.push_str(&format!(" (reported by the {by})"));
    }
    (text, tone)
}

fn summary_text(v: &Value) -> (String, Tone) {
    let get = |key: &str| field(v, key).unwrap_or_else(|| "-".to_owned());
    let refused = |text: String| match field(v, "refused") {
        Some(why) => (format!("{text}: refused ({why})"), Tone::Bad),
        None => (text, Tone::Plain),
    };
    match v.get("event").and_then(Value::as_str).unwrap_or("") {
        "created" => {
            let mut text = format!("created with policy {}", get("policy"));
            if let Some(ws) = field(v, "workspace") {
                text.push_str(&format!(", workspace {ws} ({})", get("workspace_mode")));
            }
            let degraded = list(v, "degraded");
            if degraded.is_empty() {
                (text, Tone::Plain)
            } else {
                (format!("{text}; running without: {}", degraded.join(", ")), Tone::Warn)
            }
        }
        "command_started" => (format!("started {}{}", command(v), pid_suffix(v)), Tone::Plain),
        "exited" => {
            let (how, ok) = ending(v).unwrap_or_else(|| ("ended".to_owned(), false));
            let mut text = format!("command {how}{}", duration_suffix(v));
            if flag(v, "oom_killed") {
                text.push_str("; out of memory (the memory limit was hit)");
            }
            (text, if ok && !flag(v, "oom_killed") { Tone::Good } else { Tone::Bad })
        }
        "time_limit_hit" => {
            (format!("time limit of {} s reached: everything was killed", get("limit_secs")), Tone::Bad)
        }
        "supervisor_lost" => (format!("supervisor lost: {}", get("detail")), Tone::Bad),
        "diff_summary" => (
            format!(
                "workspace changes: {} added, {} modified, {} deleted",
                get("added"),
                get("modified"),
                get("deleted")
            ),
            Tone::Plain,
        ),
        "artifacts_captured" => {
            let files = list(v, "files");
            let size = unsigned(v, "bytes").map(bytes).unwrap_or_default();
            (format!("{} artifact(s) captured, {size}: {}", files.len(), files.join(", ")), Tone::Plain)
        }
        "applied" => {
            let written = list(v, "written");
            let deleted = list(v, "deleted");
            let mut text = format!(
                "applied to the workspace by uid {}: {} written, {} deleted",
                get("by_uid"),
                written.len(),
                deleted.len()
            );
            if let Some(digest) = field(v, "digest") {
                text.push_str(&format!(" (change {digest})"));
            }
            if flag(v, "allow_protected") {
                text.push_str("; protected paths allowed");
                return (text, Tone::Warn);
            }
            (text, Tone::Plain)
        }
        "apply_refused" => (format!("apply refused: {}", get("reason")), Tone::Bad),
        "removed" => (format!("removed: {}", get("reason")), Tone::Plain),
        "stopped" => (format!("stopped: {}", get("reason")), Tone::Plain),
        "error" => (format!("error in {}: {}", get("stage"), get("message")), Tone::Bad),
        "network" => network_sentence(v),
        "exec_started" => (format!("exec #{}: {}{}", get("id"), command(v), pid_suffix(v)), Tone::Plain),
        "exec_ended" => {
            let (how, ok) = ending(v).unwrap_or_else(|| ("ended".to_owned(), false));
            let timed_out = flag(v, "timed_out");
            let text = format!(
                "exec #{} {how}{}{}",
                get("id"),
                duration_suffix(v),
                if timed_out { "; its time limit was hit" } else { "" }
            );
            (text, if ok && !timed_out { Tone::Good } else { Tone::Bad })
        }
        "audit_capped" => (get("message"), Tone::Warn),
        "egress_proxy_ended" => {
            let how = ending(v).map(|(how, _)| how).unwrap_or_else(|| "ended".to_owned());
            (format!("egress proxy {how}: {}", get("detail")), Tone::Bad)
        }
        "file_read" => refused(format!(
            "file read out of the sandbox: {} ({})",
            get("path"),
            unsigned(v, "bytes").map(bytes).unwrap_or_default()
        )),
        "file_changed" => {
            let mut text = format!("file {} by the host: {}", get("op"), get("path"));
            if let Some(to) = field(v, "to") {
                text.push_str(&format!(" → {to}"));
            }
            if let Some(n) = unsigned(v, "bytes").filter(|n| *n > 0) {
                text.push_str(&format!(" ({})", bytes(n)));
            }
            refused(text)
        }
        _ => generic(v),
    }
}

/// An event of a kind this build does not know: a process start or end
/// when it carries the exec trace's fields, its fields otherwise.
fn generic(v: &Value) -> (String, Tone) {
    if v.get("no_such_file").and_then(Value::as_bool) == Some(true) {
        let path = field(v, "path").unwrap_or_else(|| "-".to_owned());
        return (format!("tried {path}{}: no such file", pid_suffix(v)), Tone::Plain);
    }
    if v.get("argv").is_some() {
        let mut text = format!("ran {}{}", command(v), pid_suffix(v));
        if let Some(cwd) = field(v, "cwd") {
            text.push_str(&format!(" in {cwd}"));
        }
        if let Some(path) = field(v, "path") {
            text.push_str(&format!(" ({path})"));
        }
        return (text, Tone::Plain);
    }
    if v.get("pid").is_some()
        && let Some((how, ok)) = ending(v)
    {
        let text = format!("pid {} {how}{}", field(v, "pid").unwrap_or_default(), duration_suffix(v));
        return (text, if ok { Tone::Good } else { Tone::Bad });
    }
    const SHOWN: usize = 8;
    let Some(map) = v.as_object() else { return (value_text(v), Tone::Plain) };
    let own = || map.iter().filter(|(k, _)| !matches!(k.as_str(), "ts" | "seq" | "event"));
    let fields: Vec<String> = own()
        .take(SHOWN)
        .map(|(k, x)| {
            let mut text = value_text(x);
            if text.chars().count() > 200 {
                text = text.chars().take(200).collect::<String>() + "…";
            }
            format!("{}={text}", visible(k))
        })
        .collect();
    let more = own().count().saturating_sub(SHOWN);
    let mut text = fields.join(" ");
    if more > 0 {
        text.push_str(&format!(" (and {more} more fields)"));
    }
    (text, Tone::Plain)
}

fn network_sentence(v: &Value) -> (String, Tone) {
    let allowed = flag(v, "allowed");
    let mut text = String::from(if allowed { "allowed " } else { "denied " });
    if let Some(method) = field(v, "method") {
        text.push_str(&method);
        text.push(' ');
    }
    text.push_str(&destination(v));
    if let Some(path) = field(v, "path") {
        text.push_str(&path);
    }
    text.push_str(&format!(" via {}", field(v, "via").unwrap_or_default()));
    if let Some(rule) = field(v, "rule") {
        text.push_str(&format!(" — {rule}"));
    }
    (text, if allowed { Tone::Good } else { Tone::Bad })
}

/// `host:port` of a network event (IPv6 literals in brackets).
pub(crate) fn destination(v: &Value) -> String {
    let host = field(v, "host").unwrap_or_default();
    match number(v, "port") {
        Some(port) if host.contains(':') => format!("[{host}]:{port}"),
        Some(port) => format!("{host}:{port}"),
        None => host,
    }
}

fn command(v: &Value) -> String {
    v.get("argv").map(command_line).unwrap_or_default()
}

fn pid_suffix(v: &Value) -> String {
    match (field(v, "pid"), field(v, "ppid")) {
        (Some(pid), Some(ppid)) => format!(" (pid {pid}, parent {ppid})"),
        (Some(pid), None) => format!(" (pid {pid})"),
        _ => String::new(),
    }
}

fn duration_suffix(v: &Value) -> String {
    unsigned(v, "duration_ms").map(|ms| format!(" after {}", millis(ms))).unwrap_or_default()
}

/// A list of strings (or byte strings) as text.
fn list(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|items| items.iter().map(value_text).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn known_kinds_read_as_sentences() {
        let (text, tone) =
            summary(&json!({"event": "exec_started", "id": 3, "argv": ["sh", "-c", "make test"], "pid": 41}));
        assert_eq!((text.as_str(), tone), ("exec #3: sh -c \"make test\" (pid 41)", Tone::Plain));
        let (text, tone) = summary(
            &json!({"event": "exec_ended", "id": 3, "code": 2, "signal": null, "timed_out": false, "duration_ms": 1500}),
        );
        assert_eq!((text.as_str(), tone), ("exec #3 exit 2 after 1.5 s", Tone::Bad));
        let (text, tone) = summary(
            &json!({"event": "exited", "code": null, "signal": 9, "duration_ms": 10, "oom_killed": true}),
        );
        assert!(text.contains("signal 9 (SIGKILL)") && text.contains("out of memory"), "{text}");
        assert_eq!(tone, Tone::Bad);
        let (text, tone) = summary(&json!({
            "event": "network", "via": "http", "host": "example.net", "port": 80, "method": "GET",
            "path": "/x", "allowed": false, "rule": "no allow entry matches example.net:80"
        }));
        assert_eq!(text, "denied GET example.net:80/x via http — no allow entry matches example.net:80");
        assert_eq!(tone, Tone::Bad);
        let (text, _) = summary(
            &json!({"event": "network", "via": "socks", "host": "2001:db8::1", "port": 443, "allowed": true, "rule": "r"}),
        );
        assert_eq!(text, "allowed [2001:db8::1]:443 via socks — r");
        let (text, tone) = summary(
            &json!({"event": "created", "policy": "dev", "workspace": "/w", "workspace_mode": "overlay", "degraded": ["cgroups"]}),
        );
        assert_eq!(
            (text.as_str(), tone),
            ("created with policy dev, workspace /w (overlay); running without: cgroups", Tone::Warn)
        );
        let (text, tone) = summary(
            &json!({"event": "file_changed", "op": "write", "path": "/a", "bytes": 2048, "refused": "no space"}),
        );
        assert_eq!(
            (text.as_str(), tone),
            ("file write by the host: /a (2.0 KiB): refused (no space)", Tone::Bad)
        );
    }

    #[test]
    fn the_exec_traces_events_read_as_processes() {
        let (text, _) = summary(&json!({
            "event": "exec", "pid": 12, "ppid": 7, "argv": ["git", "push"], "cwd": "/work", "path": "/usr/bin/git"
        }));
        assert_eq!(text, "ran git push (pid 12, parent 7) in /work (/usr/bin/git)");
        let (text, _) = summary(&json!({
            "event": "process_exec", "pid": 12, "ppid": 7, "argv": ["git"], "path": "/usr/local/bin/git",
            "no_such_file": true
        }));
        assert_eq!(text, "tried /usr/local/bin/git (pid 12, parent 7): no such file");
        let (text, _) = summary(&json!({
            "event": "process_exec", "pid": 3, "ppid": 1, "argv": ["sh"], "cwd": "/", "path": "/bin/sh",
            "reported_by": "guest"
        }));
        assert_eq!(text, "ran sh (pid 3, parent 1) in / (/bin/sh) (reported by the guest)");
        let (text, tone) = summary(&json!({"event": "exec_end", "pid": 12, "exit": 0, "duration_ms": 30}));
        assert_eq!((text.as_str(), tone), ("pid 12 exit 0 after 30 ms", Tone::Good));
    }

    #[test]
    fn unknown_kinds_show_their_fields() {
        let (text, _) =
            summary(&json!({"ts": "t", "seq": 4, "event": "future_thing", "b": "\u{1b}[31m", "a": [1]}));
        assert_eq!(text, "a=[1] b=\\033[31m");
        let many: serde_json::Map<String, Value> = (0..20).map(|i| (format!("k{i:02}"), json!(i))).collect();
        let (text, _) = summary(&Value::Object(many));
        assert!(text.ends_with("(and 12 more fields)"), "{text}");
        assert_eq!(kind(&json!({"event": "x\u{202e}y"})), "x\\342\\200\\256y");
        assert_eq!(kind(&json!({})), "unknown");
    }
}
