//! The one JSON shape of a file entry and of a watch event, whoever
//! answers: the daemon's files API and `airlock files --json` (direct or
//! through the daemon) print these. Names come from inside the sandbox:
//! `name` is lossy text, exact bytes are in `name_b64` when they are not
//! UTF-8.

use std::time::{Duration, UNIX_EPOCH};

use airlock_proto::file::{FileInfo, FileKind, WatchEvent, WatchEventKind};
use base64::Engine;
use serde::{Deserialize, Serialize};

/// One directory entry, as `files/list` and `files/stat` answer it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The name (for a listing, the path below the directory), lossily
    /// decoded when it is not UTF-8.
    pub name: String,
    /// The name's bytes in base64, only when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_b64: Option<String>,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// Permission bits (`0o644` is 420).
    pub mode: u32,
    /// RFC 3339, UTC.
    pub mtime: String,
    /// Owner, as numbers inside the sandbox.
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// A symlink's target, lossily decoded; exact in `link_target_b64`
    /// when not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target_b64: Option<String>,
}

/// Text and, when the bytes are not UTF-8, their exact base64.
pub fn text_and_b64(bytes: &[u8]) -> (String, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_owned(), None),
        Err(_) => (
            String::from_utf8_lossy(bytes).into_owned(),
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

/// The exact bytes of a text field and its `_b64` twin.
pub fn exact_bytes(text: &str, b64: Option<&str>) -> Vec<u8> {
    b64.and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_else(|| text.as_bytes().to_vec())
}

pub fn kind_name(kind: FileKind) -> &'static str {
    match kind {
        FileKind::Regular => "file",
        FileKind::Directory => "dir",
        FileKind::Symlink => "symlink",
        _ => "other",
    }
}

/// Seconds and nanoseconds since the epoch as RFC 3339.
fn mtime(secs: i64, nanos: u32) -> String {
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs.unsigned_abs(), nanos.min(999_999_999)))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    crate::audit::rfc3339_utc(t.unwrap_or(UNIX_EPOCH))
}

/// The entry named `name` (bytes from inside) described by `info`.
pub fn entry(name: &[u8], info: FileInfo) -> Entry {
    let (name, name_b64) = text_and_b64(name);
    let (link_target, link_target_b64) = match info.link_target.as_deref().map(text_and_b64) {
        Some((text, b64)) => (Some(text), b64),
        None => (None, None),
    };
    Entry {
        name,
        name_b64,
        kind: kind_name(info.kind).to_owned(),
        size: info.size,
        mode: info.mode,
        mtime: mtime(info.mtime, info.mtime_nsec),
        uid: info.uid,
        gid: info.gid,
        link_target,
        link_target_b64,
    }
}

impl Entry {
    /// `drwxr-xr-x 0 0 4096 2026-12-07T04:00:00Z name -> target`, every
    /// value from inside quoted and escaped.
    pub fn line(&self) -> String {
        let letter = match self.kind.as_str() {
            "dir" => 'd',
            "symlink" => 'l',
            "file" => '-',
            _ => '?',
        };
        let mut bits = String::new();
        for shift in [6, 3, 0] {
            let b = (self.mode >> shift) & 7;
            bits.push(if b & 4 != 0 { 'r' } else { '-' });
            bits.push(if b & 2 != 0 { 'w' } else { '-' });
            bits.push(if b & 1 != 0 { 'x' } else { '-' });
        }
        let name = super::shown(&exact_bytes(&self.name, self.name_b64.as_deref()));
        let target = match &self.link_target {
            Some(t) => format!(" -> {}", super::shown(&exact_bytes(t, self.link_target_b64.as_deref()))),
            None => String::new(),
        };
        format!(
            "{letter}{bits} {:>5} {:>5} {:>10} {} {name}{target}",
            self.uid, self.gid, self.size, self.mtime
        )
    }
}

/// One line of a watch, as `files/watch` streams it (NDJSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchLine {
    /// `watching` (first, once the watch is in place), `created`,
    /// `modified`, `removed`, `renamed_from`, `renamed_to`, `overflow`,
    /// `gone`.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_b64: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dir: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cookie: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

pub fn event_name(kind: WatchEventKind) -> &'static str {
    match kind {
        WatchEventKind::Created => "created",
        WatchEventKind::Modified => "modified",
        WatchEventKind::Removed => "removed",
        WatchEventKind::RenamedFrom => "renamed_from",
        WatchEventKind::RenamedTo => "renamed_to",
        WatchEventKind::Overflow => "overflow",
        WatchEventKind::Gone => "gone",
    }
}

impl WatchLine {
    pub fn watching() -> WatchLine {
        WatchLine { event: "watching".into(), name: None, name_b64: None, dir: true, cookie: 0 }
    }

    /// `created name`, the name quoted and escaped.
    pub fn line(&self) -> String {
        match &self.name {
            Some(name) => {
                let name = super::shown(&exact_bytes(name, self.name_b64.as_deref()));
                format!("{} {name}{}", self.event, if self.dir { "/" } else { "" })
            }
            None => self.event.clone(),
        }
    }
}

impl From<&WatchEvent> for WatchLine {
    fn from(event: &WatchEvent) -> WatchLine {
        let (name, name_b64) = if event.name.is_empty() {
            (None, None)
        } else {
            let (name, b64) = text_and_b64(&event.name);
            (Some(name), b64)
        };
        WatchLine {
            event: event_name(event.kind).into(),
            name,
            name_b64,
            dir: event.dir,
            cookie: event.cookie,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn info(kind: FileKind, link_target: Option<Vec<u8>>) -> FileInfo {
        FileInfo {
            kind,
            size: 3,
            mode: 0o751,
            mtime: 1_732_812_345,
            mtime_nsec: 500_000_000,
            uid: 0,
            gid: 0,
            link_target,
        }
    }

    #[test]
    fn entries_keep_names_exact_and_show_them_escaped() {
        let e = entry(b"a\xfe\n", info(FileKind::Symlink, Some(b"\xff".to_vec())));
        assert_eq!(e.name_b64.as_deref(), Some("Yf4K"));
        assert_eq!(e.link_target_b64.as_deref(), Some("/w=="));
        assert_eq!(e.kind, "symlink");
        assert_eq!(e.mtime, "2024-11-28T16:45:45.500Z");
        let line = e.line();
        assert!(line.starts_with("lrwxr-x--x"), "{line}");
        assert!(line.ends_with(r#""a\376\n" -> "\377""#), "{line}");
        let plain = entry(b"a.txt", info(FileKind::Regular, None));
        assert_eq!((plain.name.as_str(), plain.name_b64, plain.kind.as_str()), ("a.txt", None, "file"));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(serde_json::from_value::<Entry>(json).unwrap(), e);
    }

    #[test]
    fn watch_lines_quote_names() {
        let event =
            WatchEvent { kind: WatchEventKind::Created, name: b"x\x1b[2J".to_vec(), dir: false, cookie: 0 };
        let line = WatchLine::from(&event);
        assert_eq!(line.line(), r#"created "x\033[2J""#);
        assert_eq!(serde_json::to_string(&line).unwrap(), r#"{"event":"created","name":"x\u001b[2J"}"#);
    }
}
