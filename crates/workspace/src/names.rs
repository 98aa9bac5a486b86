//! Checking and printing names and text that came from the sandbox.
//!
//! A name in the upper layer may hold any byte except `/` and NUL, including
//! newlines, terminal escapes and bidi controls. Such a name must neither
//! reach the host as a path that means something else (`..`) nor spoof the
//! review output (a newline followed by a fake `+++ b/...` header), so
//! everything shown to a person goes through [`quote`].
//!
//! This is the one place that makes sandbox-supplied text safe to print,
//! for every command that shows it (diff, net log, ls, inspect, events,
//! error messages, logs at a terminal): [`quote`] / [`quote_bytes`] for a
//! single value (a name, a host, a label), [`printable`] for running text
//! that keeps its lines. Both escape the same things the same way: control
//! characters (C0, DEL, C1: terminal escapes, carriage returns), invalid
//! UTF-8, and bidi and other invisible formatting characters, as octal
//! escapes of their bytes.

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

/// [`quote`] for raw bytes: a value from the sandbox (a host name, a
/// label, an argument) as one token, quoted and escaped when it holds
/// anything but printable ASCII.
pub fn quote_bytes(bytes: &[u8]) -> String {
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
            0x20..=0x7e => out.push(char::from(b)),
            _ => escape_byte(&mut out, b),
        }
    }
    out.push('"');
    out
}

/// Running text from the sandbox (its output, a message quoting it) made
/// safe for a terminal: lines and tabs stay, printable Unicode stays,
/// everything [`quote_bytes`] escapes is escaped the same way. Nothing is
/// added around it, so it reads like the original.
pub fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\n' || c == '\t' || !(c.is_control() || is_invisible_format(c)) {
                out.push(c);
            } else {
                let mut utf8 = [0u8; 4];
                for &b in c.encode_utf8(&mut utf8).as_bytes() {
                    escape_byte(&mut out, b);
                }
            }
        }
        for &b in chunk.invalid() {
            escape_byte(&mut out, b);
        }
    }
    out
}

/// One byte that must not reach a terminal as it is: a C escape for the
/// usual whitespace, octal otherwise (the form git uses in paths).
fn escape_byte(out: &mut String, b: u8) {
    match b {
        b'\n' => out.push_str("\\n"),
        b'\t' => out.push_str("\\t"),
        b'\r' => out.push_str("\\r"),
        _ => {
            let _ = write!(out, "\\{b:03o}");
        }
    }
}

/// Characters that change how text around them is shown without showing
/// themselves: bidi embeddings, overrides and isolates (which can make a
/// line read differently from what it holds), zero-width characters, line
/// and paragraph separators, and the tag block (invisible ASCII look-alikes).
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}'
    )
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
        // Bidi overrides and invalid UTF-8 are bytes like any other.
        assert_eq!(quote_bytes("a\u{202E}b".as_bytes()), "\"a\\342\\200\\256b\"");
        assert_eq!(quote_bytes(b"x\x7f\x9b"), "\"x\\177\\233\"");
    }

    #[test]
    fn printable_text_keeps_its_lines_and_loses_its_tricks() {
        assert_eq!(printable(b"plain text\n\tindented\n"), "plain text\n\tindented\n");
        assert_eq!(printable("caf\u{e9} \u{2713}".as_bytes()), "caf\u{e9} \u{2713}");
        assert_eq!(printable(b"\x1b[2Jgone\rover"), "\\033[2Jgone\\rover");
        // C1 controls (CSI as one character), DEL, invalid UTF-8.
        assert_eq!(printable("a\u{9b}31mb\x7f".as_bytes()), "a\\302\\23331mb\\177");
        assert_eq!(printable(b"caf\xe9"), "caf\\351");
        // A right-to-left override, a zero-width space, an invisible tag.
        assert_eq!(
            printable("x\u{202E}y\u{200B}z\u{E0041}".as_bytes()),
            "x\\342\\200\\256y\\342\\200\\213z\\363\\240\\201\\201"
        );
    }
}
