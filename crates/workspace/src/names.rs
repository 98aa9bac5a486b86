//! Checking and printing names that came from the sandbox.
//!
//! A name in the upper layer may hold any byte except `/` and NUL, including
//! newlines, terminal escapes and bidi controls. Such a name must neither
//! reach the host as a path that means something else (`..`) nor spoof the
//! review output (a newline followed by a fake `+++ b/...` header), so
//! everything shown to a person goes through [`quote`].

use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Why a relative path from a diff is unacceptable; `None` when it is fine.
///
/// The check works on raw bytes because `Path::components` silently drops
/// `.` and repeated slashes, which would hide exactly what we refuse.
pub(crate) fn invalid_reason(path: &Path) -> Option<&'static str> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Some("the path is empty");
    }
    if bytes.first() == Some(&b'/') {
        return Some("the path is absolute");
    }
    if bytes.contains(&0) {
        return Some("the path contains a NUL byte");
    }
    for comp in bytes.split(|b| *b == b'/') {
        match comp {
            b"" => return Some("the path has an empty component (`//` or a trailing `/`)"),
            b"." => return Some("the path has a `.` component"),
            b".." => return Some("the path has a `..` component"),
            _ => {}
        }
    }
    None
}

/// Quotes a path the way git does when it holds anything but printable
/// ASCII: wrapped in double quotes, with C escapes and octal for other
/// bytes. Plain names are returned unchanged.
pub fn quote(path: &Path) -> String {
    quote_bytes(path.as_os_str().as_bytes())
}

/// [`quote`] for raw bytes.
pub(crate) fn quote_bytes(bytes: &[u8]) -> String {
    let plain = bytes.iter().all(|b| (0x20..0x7f).contains(b) && *b != b'"' && *b != b'\\');
    if plain {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for &b in bytes {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\r' => out.push_str("\\r"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\{b:03o}");
            }
        }
    }
    out.push('"');
    out
}

/// Quotes `prefix` + `path` as one unit (`a/x y` stays together).
pub(crate) fn quote_prefixed(prefix: &str, path: &Path) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    bytes.extend_from_slice(path.as_os_str().as_bytes());
    quote_bytes(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn rejects_traversal_and_odd_components() {
        for bad in ["", "/etc/passwd", "a/../b", "..", ".", "a/./b", "a//b", "a/"] {
            assert!(invalid_reason(Path::new(bad)).is_some(), "{bad:?} accepted");
        }
        let nul = Path::new(OsStr::from_bytes(b"a\0b"));
        assert!(invalid_reason(nul).is_some());
        for good in ["a", "a/b", ".hidden", "a/..b", "...", "x/.git"] {
            assert!(invalid_reason(Path::new(good)).is_none(), "{good:?} refused");
        }
        let non_utf8 = Path::new(OsStr::from_bytes(b"caf\xe9"));
        assert!(invalid_reason(non_utf8).is_none());
    }

    #[test]
    fn quoting_neutralises_spoofing_names() {
        assert_eq!(quote(Path::new("src/main.rs")), "src/main.rs");
        assert_eq!(quote(Path::new("x\n+++ b/etc/passwd")), "\"x\\n+++ b/etc/passwd\"");
        assert_eq!(quote(Path::new("\u{1b}[2J")), "\"\\033[2J\"");
        assert_eq!(quote(Path::new(OsStr::from_bytes(b"caf\xe9"))), "\"caf\\351\"");
        assert_eq!(quote_prefixed("a/", Path::new("x y")), "a/x y");
    }
}
