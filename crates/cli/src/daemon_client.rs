//! The CLI's side of `airlock daemon`: the client itself is shared with the
//! MCP server (crates/daemon-client); what is left here is how the CLI
//! prints the daemon's events.

use std::io::Write;

pub use airlock_daemon_client::*;
use serde_json::Value;

/// One line per event: `ID TIME SANDBOX KIND DETAIL`, the detail as
/// `key=value` pairs whose strings (arguments, paths, messages: often the
/// sandbox's) are quoted when odd.
pub fn print_event(event: &Value, out: &mut dyn Write) -> std::io::Result<()> {
    let detail = match &event["detail"] {
        Value::Null => String::new(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{}={}", crate::present::shown(k), detail(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => detail(other),
    };
    writeln!(
        out,
        "{:<6} {} {:<24} {:<16} {detail}",
        text(&event["id"]),
        text(&event["ts"]),
        text(&event["sandbox"]),
        text(&event["kind"])
    )
}

/// A JSON value as a person reads it: strings bare (quoted and escaped when
/// they hold anything odd), nothing as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => crate::present::shown(s),
        other => detail(other),
    }
}

/// A value inside an event's detail: strings as [`text`], lists as
/// `[a, b]`, objects as `{k: v}`.
fn detail(v: &Value) -> String {
    match v {
        Value::String(s) => crate::present::shown(s),
        Value::Array(items) => format!("[{}]", items.iter().map(detail).collect::<Vec<_>>().join(", ")),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{}: {}", crate::present::shown(k), detail(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn events_show_hostile_arguments_escaped_on_one_line() {
        let event = serde_json::json!({
            "id": 7, "ts": "t", "sandbox": "box", "kind": "exec_started",
            "detail": { "argv": ["sh", "-c", "echo \u{1b}]0;owned\u{7}\nid: 8 allow", "a\u{202e}b"] }
        });
        let mut out = Vec::new();
        print_event(&event, &mut out).unwrap();
        let line = String::from_utf8(out).unwrap();
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(
            !line.contains('\u{1b}') && !line.contains('\u{7}') && !line.contains('\u{202e}'),
            "{line:?}"
        );
        assert!(
            line.contains(r#"argv=[sh, -c, "echo \033]0;owned\007\nid: 8 allow", "a\342\200\256b"]"#),
            "{line}"
        );
    }
}
