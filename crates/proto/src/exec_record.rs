//! What the exec trace records, as it appears in `audit.jsonl`: one event
//! per exec the sandbox made (what the process claimed), one when such a
//! process ended, and one summary per second of a flood. Here, beside the
//! messages, because the records cross channels: from the process tier's
//! listener process to its supervisor, and from a guest to its host.
//!
//! Arguments, paths and directories are bytes a sandbox chose. They are
//! kept exact — a JSON string when they are UTF-8, `{"non_utf8_hex": …}`
//! otherwise — and cut to a bounded size with a marker that says how long
//! they were, so that no value can make an event unrecordable, huge or
//! misleading. Showing them to a person escapes them (`airlock audit`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest string field recorded (a path, a host, a rule, an argument).
/// The audit log's cap (re-exported as `airlock_runtime::caps::MAX_FIELD`).
pub const MAX_FIELD: usize = 1024;
/// Most bytes an argv or a list of paths takes in one record, all items
/// together; the rest is replaced by one item saying how much was cut.
pub const MAX_LIST_BYTES: usize = 8192;

/// Bytes of one item kept before its cut marker, so that item and marker
/// together stay within [`MAX_FIELD`] (the audit log's own cap then leaves
/// them alone).
pub const KEEP_PER_ITEM: usize = MAX_FIELD - 64;
/// Bytes of a whole argv kept before its "more arguments" marker.
pub const KEEP_PER_LIST: usize = MAX_LIST_BYTES - 256;

/// Bytes a sandbox chose, recorded exactly (see the module comment).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Claimed(pub Vec<u8>);

impl Claimed {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for Claimed {
    fn from(text: &str) -> Claimed {
        Claimed(text.as_bytes().to_vec())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Repr {
    Text(String),
    Bytes { non_utf8_hex: String },
}

impl Serialize for Claimed {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => Repr::Text(text.to_owned()).serialize(s),
            Err(_) => {
                let hex = self.0.iter().map(|b| format!("{b:02x}")).collect();
                Repr::Bytes { non_utf8_hex: hex }.serialize(s)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Claimed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Claimed, D::Error> {
        use serde::de::Error;
        match Repr::deserialize(d)? {
            Repr::Text(text) => Ok(Claimed(text.into_bytes())),
            Repr::Bytes { non_utf8_hex } => {
                let hex = non_utf8_hex.as_bytes();
                if hex.len() % 2 != 0 {
                    return Err(D::Error::custom("non_utf8_hex has an odd number of digits"));
                }
                let digit = |c: u8| {
                    (c as char)
                        .to_digit(16)
                        .ok_or_else(|| D::Error::custom("non_utf8_hex holds a non-hex digit"))
                };
                hex.chunks(2)
                    .map(|pair| Ok((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
                    .collect::<Result<Vec<u8>, _>>()
                    .map(Claimed)
            }
        }
    }
}

/// `bytes` cut to [`KEEP_PER_ITEM`] with a marker giving `total`, its whole
/// length (which may be larger than `bytes` when only part was read).
pub fn cut_item(mut bytes: Vec<u8>, total: u64, complete: bool) -> Claimed {
    if bytes.len() as u64 >= total && complete && bytes.len() <= MAX_FIELD {
        return Claimed(bytes);
    }
    bytes.truncate(KEEP_PER_ITEM);
    let size = if complete { format!("{total} bytes in all") } else { format!("at least {total} bytes") };
    bytes.extend_from_slice(format!("…[cut by airlock: {size}]").as_bytes());
    Claimed(bytes)
}

/// The marker item that replaces the arguments past what a record keeps.
pub fn more_items(items: u64, bytes: u64, complete: bool) -> Claimed {
    let more = if complete { "" } else { "at least " };
    Claimed(format!("…[cut by airlock: {more}{items} more arguments, {bytes} bytes]").into_bytes())
}

/// A list held to the audit log's caps again (what the tracer sends is
/// read from a sandbox: it is capped where it is read, and once more here,
/// where it is recorded).
pub fn recap_list(items: Vec<Claimed>) -> Vec<Claimed> {
    let mut out = Vec::new();
    let mut used = 0usize;
    let total = items.len();
    for (i, item) in items.into_iter().enumerate() {
        let item = recap(item);
        if used + item.0.len() > MAX_LIST_BYTES {
            out.push(more_items((total - i) as u64, 0, false));
            break;
        }
        used += item.0.len();
        out.push(item);
    }
    out
}

/// An item held to [`MAX_FIELD`] again, with a marker if it was over.
pub fn recap(item: Claimed) -> Claimed {
    if item.0.len() <= MAX_FIELD {
        return item;
    }
    let total = item.0.len() as u64;
    cut_item(item.0, total, true)
}

/// One execve or execveat a process of the sandbox made, as it claimed it
/// at the time of the call (its memory can change right after; see
/// SECURITY.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessExec {
    /// When the call was received: the host's clock, RFC 3339, UTC, ms.
    pub at: String,
    /// The process, in the sandbox's PID namespace.
    pub pid: i32,
    /// Its parent there at the time of the call (1 is the sandbox's agent;
    /// 0: a parent outside the sandbox).
    pub ppid: i32,
    /// `execve` or `execveat`.
    pub syscall: String,
    /// The program the call named, made absolute against the process's
    /// working directory (or the directory descriptor of an execveat);
    /// symbolic links are not resolved. None when it could not be read.
    pub path: Option<Claimed>,
    /// Its arguments, argv[0] first, each cut at about 1 KiB and the whole
    /// at about 8 KiB, with markers saying how much was cut.
    pub argv: Vec<Claimed>,
    /// How many arguments the call passed (as far as they were read).
    pub argc: u64,
    /// Its working directory, as the kernel names it from inside.
    pub cwd: Option<Claimed>,
    /// Why the program or its arguments could not be read (bad pointers:
    /// the kernel then refuses the call too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
    /// The program named did not exist in the sandbox's view when the
    /// call was made (ENOENT or ENOTDIR on the way): the kernel refuses
    /// the call. One call per PATH directory a shell tries.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_such_file: bool,
    /// Who reported it when not the host itself: `"guest"` for a microVM
    /// guest's agent (the guest's kernel is not trusted, so the event is
    /// only what the guest claimed). Set by the host as it records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_by: Option<String>,
}

/// A process whose exec was recorded has ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessExit {
    /// When the host saw it end.
    pub at: String,
    /// The process, in the sandbox's PID namespace.
    pub pid: i32,
    /// Its exit code, or the signal that ended it; both None when the
    /// status is not known (see `unknown`).
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// From its first recorded exec to its end.
    pub duration_ms: u64,
    /// Why the exit status is not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
    /// Who reported it when not the host itself: `"guest"` for a microVM
    /// guest's agent (the guest's kernel is not trusted, so the event is
    /// only what the guest claimed). Set by the host as it records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_by: Option<String>,
}

/// How often a program was started in a summarized window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgramCount {
    /// The program as the call named it (not made absolute).
    pub path: Claimed,
    pub count: u64,
}

/// Execs past the trace's rate in one window: counted, not itemized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessExecSummary {
    pub from: String,
    pub until: String,
    /// Execs in the window that have no event of their own.
    pub execs: u64,
    /// The programs they started, most frequent first (at most 16).
    pub programs: Vec<ProgramCount>,
    /// Execs among `execs` whose program is not in `programs`.
    pub other: u64,
    /// Execs recorded one by one per second before the rest are counted.
    pub itemized_per_second: u32,
    /// Events the trace could not hand on because its supervisor was
    /// slower than the sandbox (its queue was full): execs and ends lost.
    #[serde(default)]
    pub lost: u64,
    /// Who reported it when not the host itself: `"guest"` for a microVM
    /// guest's agent (the guest's kernel is not trusted, so the event is
    /// only what the guest claimed). Set by the host as it records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_by: Option<String>,
}

/// What a reporter other than the host's own listener (a microVM guest's
/// agent) sends of the exec trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum TraceRecord {
    Exec(ProcessExec),
    Exit(ProcessExit),
    Summary(ProcessExecSummary),
    /// The reporter's trace ended (why): nothing is recorded from then on,
    /// and the execs it answered fail.
    Ended {
        detail: String,
    },
}

/// The value of `reported_by` on what a microVM guest reported.
pub const REPORTED_BY_GUEST: &str = "guest";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn claimed_bytes_round_trip_exactly() {
        for bytes in [b"plain".to_vec(), b"\xff\xfe\x00tab\tnl\n\x1b[2J".to_vec(), Vec::new()] {
            let json = serde_json::to_string(&Claimed(bytes.clone())).unwrap();
            assert_eq!(serde_json::from_str::<Claimed>(&json).unwrap().0, bytes, "{json}");
        }
        assert_eq!(serde_json::to_string(&Claimed(b"\xff".to_vec())).unwrap(), r#"{"non_utf8_hex":"ff"}"#);
        assert_eq!(serde_json::to_string(&Claimed(b"a\x1bb".to_vec())).unwrap(), r#""a\u001bb""#);
        assert!(serde_json::from_str::<Claimed>(r#"{"non_utf8_hex":"f"}"#).is_err());
        assert!(serde_json::from_str::<Claimed>(r#"{"non_utf8_hex":"zz"}"#).is_err());
    }

    #[test]
    fn a_long_item_is_cut_with_its_length_and_stays_under_the_field_cap() {
        let long = vec![b'a'; 100 * 1024];
        let cut = cut_item(long.clone(), long.len() as u64, true);
        assert!(cut.0.len() <= MAX_FIELD, "{}", cut.0.len());
        assert!(cut.0.ends_with("…[cut by airlock: 102400 bytes in all]".as_bytes()));
        // The audit log's cap leaves it as it is.
        assert_eq!(recap(cut.clone()), cut);
        let partial = cut_item(vec![b'b'; 2000], 500_000, false);
        assert!(partial.0.ends_with("…[cut by airlock: at least 500000 bytes]".as_bytes()));
        assert_eq!(cut_item(b"short".to_vec(), 5, true).0, b"short");
    }
}
