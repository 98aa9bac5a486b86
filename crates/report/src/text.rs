//! Values from the audit log as text a person reads. Everything here came
//! from the sandbox or passed through it: control characters, bidi
//! controls and invalid UTF-8 are made visible by the one escaping module
//! (`airlock_workspace::printable`); HTML escaping happens later, in the
//! template, for every value alike.

use serde_json::Value;

/// Running text from the log, made visible.
pub(crate) fn visible(s: &str) -> String {
    airlock_workspace::printable(s.as_bytes())
}

/// The bytes a JSON value stands for when it is a string, or one written
/// as `{"non_utf8_hex": "…"}` (how the audit log keeps names that are not
/// UTF-8). `None` for anything else.
pub(crate) fn bytes_of(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::String(s) => Some(s.as_bytes().to_vec()),
        Value::Object(map) if map.len() == 1 => {
            let hex = map.get("non_utf8_hex")?.as_str()?.as_bytes();
            if hex.len() % 2 != 0 {
                return None;
            }
            hex.chunks(2)
                .map(|pair| {
                    let digit = |c: u8| (c as char).to_digit(16);
                    u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()
                })
                .collect()
        }
        _ => None,
    }
}

/// A value as one piece of text: strings (and byte strings) made visible,
/// numbers and booleans as they are, anything else as compact JSON.
pub(crate) fn value_text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => match bytes_of(other) {
            Some(bytes) => airlock_workspace::printable(&bytes),
            None => visible(&other.to_string()),
        },
    }
}

/// One argument as a shell would need it written: bare when it is plain,
/// in double quotes (with `"`, `$` and `` ` `` escaped) otherwise. What
/// [`visible`] escapes is escaped, and so are newlines, tabs and a
/// backslash itself, so an escape shown always stands for one byte.
pub(crate) fn shell_word(bytes: &[u8]) -> String {
    let mut doubled = Vec::with_capacity(bytes.len());
    for &b in bytes {
        if b == b'\\' {
            doubled.push(b'\\');
        }
        doubled.push(b);
    }
    let text = airlock_workspace::printable(&doubled);
    let plain = !text.is_empty() && text.chars().all(|c| c.is_alphanumeric() || "-_./:=@%+,".contains(c));
    if plain {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '"' | '$' | '`' => {
                out.push('\\');
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An argument vector as one command line.
pub(crate) fn command_line(argv: &Value) -> String {
    match argv.as_array() {
        Some(items) => items
            .iter()
            .map(|a| match bytes_of(a) {
                Some(bytes) => shell_word(&bytes),
                None => value_text(a),
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => value_text(argv),
    }
}

/// A count of bytes, short: 512 B, 3.2 KiB, 1.5 MiB.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Milliseconds, short: 850 ms, 3.2 s, 4 min 05 s.
pub(crate) fn millis(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms} ms"),
        1000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} min {:02} s", ms / 60_000, ms / 1000 % 60),
    }
}

/// The time of day of an RFC 3339 timestamp (`12:34:56.789`), for narrow
/// columns; the whole timestamp when it is not in that form.
pub(crate) fn time_of_day(ts: &str) -> String {
    match ts.split_once('T') {
        Some((_, rest)) => visible(rest.trim_end_matches('Z')),
        None => visible(ts),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn arguments_are_quoted_only_when_needed_and_made_visible() {
        assert_eq!(command_line(&json!(["ls", "-la", "/tmp"])), "ls -la /tmp");
        assert_eq!(command_line(&json!(["sh", "-c", "echo hi; exit 3"])), "sh -c \"echo hi; exit 3\"");
        assert_eq!(command_line(&json!(["echo", ""])), "echo \"\"");
        assert_eq!(command_line(&json!(["printf", "a\"$HOME`x`"])), "printf \"a\\\"\\$HOME\\`x\\`\"");
        // A terminal escape and a bidi override are shown, not obeyed.
        assert_eq!(command_line(&json!(["echo", "\u{1b}[2J\u{202e}x"])), "echo \"\\033[2J\\342\\200\\256x\"");
        // Bytes that are not UTF-8, as the log keeps them.
        assert_eq!(command_line(&json!(["cat", {"non_utf8_hex": "66ff"}])), "cat \"f\\377\"");
        assert_eq!(command_line(&json!("not a list")), "not a list");
        assert_eq!(command_line(&json!(["é"])), "é");
        assert_eq!(command_line(&json!(["a\nb\tc", "\\033"])), "\"a\\nb\\tc\" \"\\\\033\"");
    }

    #[test]
    fn odd_byte_strings_are_not_decoded() {
        assert_eq!(bytes_of(&json!({"non_utf8_hex": "6"})), None);
        assert_eq!(bytes_of(&json!({"non_utf8_hex": "zz"})), None);
        assert_eq!(bytes_of(&json!({"non_utf8_hex": "41", "x": 1})), None);
        assert_eq!(value_text(&json!({"a": [1, "\u{7}"]})), "{\"a\":[1,\"\\u0007\"]}");
    }

    #[test]
    fn sizes_and_times() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(millis(850), "850 ms");
        assert_eq!(millis(3250), "3.2 s");
        assert_eq!(millis(245_000), "4 min 05 s");
        assert_eq!(time_of_day("2026-01-02T03:04:05.678Z"), "03:04:05.678");
        assert_eq!(time_of_day("garbage"), "garbage");
    }
}
