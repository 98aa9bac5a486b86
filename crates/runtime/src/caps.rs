//! Bounds on what a sandbox can make grow on the host besides its layer:
//! its output logs (capped at `limits.log_size` each, with one line saying
//! so), and every field recorded about it (argv, paths, hosts, rules,
//! messages), cut with a marker that says it was cut and how long it was.
//! The audit log's own cap lives in `audit`, the daemon's index caps its
//! events itself; both cut their fields with the functions here.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Longest string field recorded (a path, a host, a rule, an argument);
/// and most bytes an argv or a list of paths takes in one record. Defined
/// beside the exec trace's records, which cross channels to get here.
pub use airlock_proto::exec_record::{MAX_FIELD, MAX_LIST_BYTES};
/// Longest message recorded (an error, a reason).
pub const MAX_MESSAGE: usize = 4096;

/// `text` if it fits in `max` bytes; else its start (cut at a character
/// boundary) and a marker giving the whole length.
pub fn cap_str(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[cut by airlock: {} bytes in all]", &text[..end], text.len())
}

/// [`cap_str`] for a path, which may not be UTF-8.
pub fn cap_path(path: &Path, max: usize) -> PathBuf {
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() <= max {
        return path.to_path_buf();
    }
    if let Some(text) = path.to_str() {
        return PathBuf::from(cap_str(text, max));
    }
    let mut cut = bytes[..max].to_vec();
    cut.extend_from_slice(format!("…[cut by airlock: {} bytes in all]", bytes.len()).as_bytes());
    PathBuf::from(std::ffi::OsString::from_vec(cut))
}

/// An argv (or any list of strings) with each item capped at
/// [`MAX_FIELD`] and the whole at about [`MAX_LIST_BYTES`]: items past
/// that are replaced by one saying how many there were and their size.
pub fn cap_list(items: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut used = 0;
    for (i, item) in items.iter().enumerate() {
        let capped = cap_str(item, MAX_FIELD);
        if used + capped.len() > MAX_LIST_BYTES {
            let rest = &items[i..];
            let bytes: usize = rest.iter().map(String::len).sum();
            out.push(format!("…[cut by airlock: {} more items, {bytes} bytes]", rest.len()));
            return out;
        }
        used += capped.len();
        out.push(capped);
    }
    out
}

/// [`cap_list`] for paths.
pub fn cap_paths(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut used = 0;
    for (i, path) in paths.iter().enumerate() {
        let capped = cap_path(path, MAX_FIELD);
        let len = capped.as_os_str().len();
        if used + len > MAX_LIST_BYTES {
            let rest = &paths[i..];
            let bytes: usize = rest.iter().map(|p| p.as_os_str().len()).sum();
            out.push(PathBuf::from(format!("…[cut by airlock: {} more paths, {bytes} bytes]", rest.len())));
            return out;
        }
        used += len;
        out.push(capped);
    }
    out
}

/// A JSON value with every string capped at [`MAX_FIELD`] and every array
/// at about [`MAX_LIST_BYTES`] of strings (for records whose shape is free,
/// like the daemon's event details).
pub fn cap_json(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(cap_str(&s, MAX_FIELD)),
        Value::Array(items) => {
            let mut out = Vec::new();
            let mut used = 0;
            let total = items.len();
            for (i, item) in items.into_iter().enumerate() {
                let item = cap_json(item);
                let len = item.to_string().len();
                if used + len > MAX_LIST_BYTES {
                    out.push(Value::String(format!("…[cut by airlock: {} more items]", total - i)));
                    break;
                }
                used += len;
                out.push(item);
            }
            Value::Array(out)
        }
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (cap_str(&k, MAX_FIELD), cap_json(v))).collect())
        }
        other => other,
    }
}

/// One of the sandbox's output logs, shared by everything in this process
/// that writes to it (the command's streams, a terminal, execs), so the cap
/// holds for all of them together.
pub type SharedLog = Arc<Mutex<CappedLog>>;

/// An append-only log that stops at its limit, with one marker line saying
/// so and what to do.
pub struct CappedLog {
    file: File,
    name: String,
    limit: u64,
    written: u64,
    cut: bool,
}

impl CappedLog {
    /// Opens (creating, mode 0600) the log at `path` for appending; what it
    /// already holds counts against `limit`.
    pub fn open(path: &Path, limit: u64) -> io::Result<CappedLog> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = File::options()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)?;
        let written = file.metadata()?.len();
        let name = path.file_name().map_or_else(|| "log".into(), |n| n.to_string_lossy().into_owned());
        let mut log = CappedLog { file, name, limit, written, cut: false };
        // Already full (a reopened log): its marker is there.
        log.cut = log.written + log.marker().len() as u64 > limit;
        Ok(log)
    }

    pub fn shared(self) -> SharedLog {
        Arc::new(Mutex::new(self))
    }

    /// Appends what fits; at the limit, the marker line instead of the rest,
    /// once. Never fails the caller for the part it leaves out.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.cut || data.is_empty() {
            return Ok(());
        }
        let marker = self.marker();
        let room = self.limit.saturating_sub(self.written).saturating_sub(marker.len() as u64);
        let fits = usize::try_from(room).unwrap_or(usize::MAX).min(data.len());
        self.file.write_all(&data[..fits])?;
        self.written += fits as u64;
        if fits < data.len() {
            self.cut = true;
            self.file.write_all(marker.as_bytes())?;
            self.written += marker.len() as u64;
        }
        Ok(())
    }

    fn marker(&self) -> String {
        format!(
            "\n[airlock: {} reached its limit of {} (limits.log_size); later output was not written here \
             but still reached the caller. To keep more, raise limits.log_size in the sandbox's policy.]\n",
            self.name,
            airlock_policy::format_size(self.limit)
        )
    }
}

/// Locks a shared log; a writer that panicked left it usable.
pub fn lock(log: &SharedLog) -> MutexGuard<'_, CappedLog> {
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn strings_are_cut_at_a_boundary_with_their_length() {
        assert_eq!(cap_str("short", 10), "short");
        let long = "é".repeat(600); // 1200 bytes
        let cut = cap_str(&long, 1023);
        assert!(cut.starts_with(&"é".repeat(511)), "{cut}");
        assert!(cut.ends_with("…[cut by airlock: 1200 bytes in all]"), "{cut}");
        assert!(cut.len() < 1100);
    }

    #[test]
    fn paths_keep_their_bytes_when_not_utf8() {
        let raw = PathBuf::from(std::ffi::OsString::from_vec(vec![0xff; 5000]));
        let cut = cap_path(&raw, MAX_FIELD);
        let bytes = cut.as_os_str().as_bytes();
        assert!(bytes.starts_with(&[0xff; MAX_FIELD]));
        assert!(bytes.ends_with(b"[cut by airlock: 5000 bytes in all]"));
        assert_eq!(cap_path(Path::new("/a/b"), MAX_FIELD), PathBuf::from("/a/b"));
    }

    #[test]
    fn long_lists_end_with_what_was_cut() {
        let argv: Vec<String> = (0..100_000).map(|i| format!("arg{i}")).collect();
        let cut = cap_list(&argv);
        let bytes: usize = cut.iter().map(String::len).sum();
        assert!(bytes < MAX_LIST_BYTES + 200, "{bytes}");
        let last = cut.last().unwrap();
        assert!(last.contains("more items") && last.contains("cut by airlock"), "{last}");
        assert_eq!(cut[0], "arg0");
        let one_huge = vec!["x".repeat(900_000)];
        assert_eq!(
            cap_list(&one_huge),
            [format!("{}…[cut by airlock: 900000 bytes in all]", "x".repeat(1024))]
        );
        let paths: Vec<PathBuf> = (0..10_000).map(|i| PathBuf::from(format!("src/file{i}.rs"))).collect();
        let cut = cap_paths(&paths);
        assert!(cut.len() < 1000 && cut.last().unwrap().to_string_lossy().contains("more paths"));
    }

    #[test]
    fn json_strings_and_arrays_are_capped() {
        let detail =
            serde_json::json!({ "argv": vec!["y".repeat(3000); 50], "code": 0, "path": "p".repeat(70_000) });
        let capped = cap_json(detail);
        assert!(capped.to_string().len() < 12_000, "{}", capped.to_string().len());
        assert_eq!(capped["code"], 0);
        assert!(capped["path"].as_str().unwrap().ends_with("[cut by airlock: 70000 bytes in all]"));
        let argv = capped["argv"].as_array().unwrap();
        assert!(argv.last().unwrap().as_str().unwrap().contains("more items"));
    }

    #[test]
    fn a_log_stops_at_its_limit_with_one_marker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/stdout.log");
        let limit = 64 * 1024;
        let mut log = CappedLog::open(&path, limit).unwrap();
        let chunk = vec![b'a'; 10_000];
        for _ in 0..20 {
            log.write(&chunk).unwrap();
        }
        let text = std::fs::read(&path).unwrap();
        assert_eq!(text.len() as u64, limit, "the marker fills the log exactly");
        let tail = String::from_utf8_lossy(&text[text.len() - 300..]).into_owned();
        assert!(tail.contains("stdout.log reached its limit of 64K (limits.log_size)"), "{tail}");
        assert_eq!(String::from_utf8_lossy(&text).matches("[airlock:").count(), 1);
        // Reopened full: still nothing more, no second marker.
        let mut again = CappedLog::open(&path, limit).unwrap();
        again.write(b"more").unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len() as u64, limit);
        // Under the limit, everything is kept.
        let small = dir.path().join("small.log");
        let mut log = CappedLog::open(&small, limit).unwrap();
        log.write(b"hello\n").unwrap();
        assert_eq!(std::fs::read(&small).unwrap(), b"hello\n");
    }
}
