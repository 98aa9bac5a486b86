//! The digest of a change: one SHA-256 over everything apply would write.
//!
//! A person reviews a diff, then applies it; in between, a sandbox that is
//! still running can rewrite its layer. The digest names exactly the change
//! that was shown, so `apply --expect DIGEST` can refuse anything else.
//!
//! It covers, for every changed path: the path's bytes, what happens to it
//! (added, modified, deleted, type changed), its type before and after
//! (file, directory, symlink, other), the permission bits apply sets
//! (`mode & 0o777`, for files and directories), a symlink's link text, and
//! the SHA-256 of a file's content when apply writes content. A whiteout or
//! an opaque directory shows up as the deletions it causes, one record per
//! path that goes away, as in the diff itself.
//!
//! Encoding (version 1), all integers big-endian:
//!
//! ```text
//! record  = u64 len(path) ‖ path ‖ u8 kind ‖ u8 old_type ‖ u8 new_type
//!           ‖ (0 | 1 ‖ u32 mode) ‖ (0 | 1 ‖ u64 len(target) ‖ target)
//!           ‖ (0 | 1 ‖ sha256(content))
//! digest  = SHA-256("airlock change digest v1\n" ‖ u64 count
//!                   ‖ for each record, sorted as byte strings: u64 len ‖ record)
//! ```
//!
//! kind: added 1, modified 2, deleted 3, type_changed 4; types: none 0,
//! file 1, dir 2, symlink 3, other 4. A new encoding gets a new prefix, so
//! digests of two versions never compare equal.

use std::fmt;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::str::FromStr;

use ring::digest::{Context, SHA256};

use crate::diff::{Change, ChangeKind, EntryType};

/// What is hashed before the records: names the encoding.
const DOMAIN: &[u8] = b"airlock change digest v1\n";

/// How a digest is written for people: `sha256:` and 64 hex digits.
const PREFIX: &str = "sha256:";

/// The SHA-256 of one file's content.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    /// The hash of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> ContentHash {
        let mut hasher = ContentHasher::new();
        hasher.update(bytes);
        hasher.finish()
    }

    /// The hash of everything `reader` yields, and how many bytes that was.
    pub fn of_reader(reader: &mut dyn Read) -> io::Result<(ContentHash, u64)> {
        let mut hasher = ContentHasher::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(buf.get(..n).unwrap_or_default());
            total += n as u64;
        }
        Ok((hasher.finish(), total))
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.to_hex())
    }
}

/// Hashes content as it streams past (apply hashes what it copies).
pub(crate) struct ContentHasher(Context);

impl ContentHasher {
    pub(crate) fn new() -> ContentHasher {
        ContentHasher(Context::new(&SHA256))
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub(crate) fn finish(self) -> ContentHash {
        ContentHash(to_array(self.0.finish().as_ref()))
    }
}

/// The digest of a whole change (see the module documentation).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChangeDigest([u8; 32]);

impl ChangeDigest {
    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ChangeDigest {
    /// `sha256:` and 64 lowercase hex digits, as `--expect` takes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", hex(&self.0))
    }
}

impl fmt::Debug for ChangeDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChangeDigest({self})")
    }
}

/// A string that is not a change digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{given:?} is not a change digest: expected sha256: followed by 64 hex digits, as `airlock diff` \
     prints it on its last line (a shortened digest is not accepted)"
)]
pub struct DigestParseError {
    /// What was given (cut short when long).
    pub given: String,
}

impl FromStr for ChangeDigest {
    type Err = DigestParseError;

    /// Takes `sha256:HEX` or the 64 hex digits alone, in either case. A
    /// prefix of the digest is refused: the sandbox chooses the content, so
    /// it could search for a change whose digest starts the same way.
    fn from_str(s: &str) -> Result<ChangeDigest, DigestParseError> {
        let err = || DigestParseError { given: s.chars().take(80).collect() };
        let trimmed = s.trim();
        let digits = trimmed.strip_prefix(PREFIX).unwrap_or(trimmed);
        if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.as_bytes().chunks(2)) {
            let text = std::str::from_utf8(pair).map_err(|_| err())?;
            *byte = u8::from_str_radix(text, 16).map_err(|_| err())?;
        }
        Ok(ChangeDigest(out))
    }
}

impl serde::Serialize for ChangeDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The digest of `changes`, taking each file's content hash from
/// `content` (the diff's own hashes, or those of the bytes apply wrote).
pub(crate) fn digest_of<'a>(
    changes: impl IntoIterator<Item = &'a Change>,
    content: impl Fn(&Change) -> Option<ContentHash>,
) -> ChangeDigest {
    let mut records: Vec<Vec<u8>> = changes.into_iter().map(|c| record(c, content(c))).collect();
    records.sort();
    let mut ctx = Context::new(&SHA256);
    ctx.update(DOMAIN);
    ctx.update(&(records.len() as u64).to_be_bytes());
    for r in &records {
        ctx.update(&(r.len() as u64).to_be_bytes());
        ctx.update(r);
    }
    ChangeDigest(to_array(ctx.finish().as_ref()))
}

/// Whether apply writes file content for this change (a mode-only change
/// writes only permission bits).
pub(crate) fn writes_content(c: &Change) -> bool {
    c.new_type == Some(EntryType::File) && (c.kind != ChangeKind::Modified || c.content_changed)
}

fn record(c: &Change, content: Option<ContentHash>) -> Vec<u8> {
    let mut r = Vec::new();
    let path = c.path.as_os_str().as_bytes();
    r.extend_from_slice(&(path.len() as u64).to_be_bytes());
    r.extend_from_slice(path);
    r.push(match c.kind {
        ChangeKind::Added => 1,
        ChangeKind::Modified => 2,
        ChangeKind::Deleted => 3,
        ChangeKind::TypeChanged => 4,
    });
    r.push(type_tag(c.old_type));
    r.push(type_tag(c.new_type));
    // Apply never sets setuid, setgid or sticky; a symlink's bits mean nothing.
    match (c.new_type, c.new_mode) {
        (Some(EntryType::File | EntryType::Dir), Some(mode)) => {
            r.push(1);
            r.extend_from_slice(&(mode & 0o777).to_be_bytes());
        }
        _ => r.push(0),
    }
    match (c.new_type, &c.symlink_target) {
        (Some(EntryType::Symlink), Some(target)) => {
            let target = target.as_os_str().as_bytes();
            r.push(1);
            r.extend_from_slice(&(target.len() as u64).to_be_bytes());
            r.extend_from_slice(target);
        }
        _ => r.push(0),
    }
    match content.filter(|_| writes_content(c)) {
        Some(hash) => {
            r.push(1);
            r.extend_from_slice(hash.as_bytes());
        }
        None => r.push(0),
    }
    r
}

fn type_tag(ty: Option<EntryType>) -> u8 {
    match ty {
        None => 0,
        Some(EntryType::File) => 1,
        Some(EntryType::Dir) => 2,
        Some(EntryType::Symlink) => 3,
        Some(EntryType::Other) => 4,
    }
}

fn to_array(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = *b;
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::diff::Diff;
    use std::path::PathBuf;

    fn file(path: &str, content: &[u8], mode: u32) -> Change {
        Change {
            path: PathBuf::from(path),
            kind: ChangeKind::Added,
            old_type: None,
            new_type: Some(EntryType::File),
            old_mode: None,
            new_mode: Some(mode),
            size: Some(content.len() as u64),
            binary: false,
            symlink_target: None,
            old_symlink_target: None,
            lines_added: None,
            lines_removed: None,
            content_changed: true,
            content_sha256: Some(ContentHash::of_bytes(content)),
        }
    }

    fn link(path: &str, target: &str) -> Change {
        Change {
            new_type: Some(EntryType::Symlink),
            new_mode: Some(0o777),
            size: None,
            symlink_target: Some(PathBuf::from(target)),
            content_sha256: None,
            ..file(path, b"", 0o777)
        }
    }

    fn deleted(path: &str, ty: EntryType) -> Change {
        Change {
            kind: ChangeKind::Deleted,
            old_type: Some(ty),
            new_type: None,
            old_mode: Some(0o644),
            new_mode: None,
            content_sha256: None,
            ..file(path, b"", 0o644)
        }
    }

    fn sample() -> Vec<Change> {
        vec![
            file("src/a.rs", b"fn main() {}\n", 0o644),
            Change { new_type: Some(EntryType::Dir), content_sha256: None, ..file("src", b"", 0o755) },
            link("latest", "src/a.rs"),
            deleted("old.txt", EntryType::File),
        ]
    }

    fn digest(changes: Vec<Change>) -> ChangeDigest {
        Diff { changes }.digest()
    }

    /// The encoding is part of the interface: a digest printed today must
    /// still verify after an upgrade, so this value may never change (a new
    /// encoding gets a new domain prefix instead). It was computed apart,
    /// from the encoding in the module documentation, with Python's hashlib.
    #[test]
    fn digest_is_stable_across_runs_and_versions() {
        let d = digest(sample());
        assert_eq!(d, digest(sample()));
        assert_eq!(d.to_string(), "sha256:bf05792d9cc20ec32316882f94481db553edd9301244000c5d6a56beee9f0a90");
    }

    #[test]
    fn digest_ignores_the_order_of_records() {
        let mut shuffled = sample();
        shuffled.reverse();
        shuffled.swap(0, 2);
        assert_eq!(digest(shuffled), digest(sample()));
    }

    /// Everything apply writes is in the digest; anything else is not.
    #[test]
    fn digest_changes_with_everything_apply_writes() {
        let base = digest(sample());
        let with = |f: &dyn Fn(&mut Vec<Change>)| {
            let mut changes = sample();
            f(&mut changes);
            digest(changes)
        };
        let variants: Vec<(&str, ChangeDigest)> = vec![
            ("content", with(&|c| c[0].content_sha256 = Some(ContentHash::of_bytes(b"fn main() {}\n\n")))),
            ("mode", with(&|c| c[0].new_mode = Some(0o755))),
            ("dir mode", with(&|c| c[1].new_mode = Some(0o700))),
            ("path", with(&|c| c[0].path = PathBuf::from("src/b.rs"))),
            ("type", with(&|c| c[2] = file("latest", b"src/a.rs", 0o644))),
            ("symlink target", with(&|c| c[2].symlink_target = Some(PathBuf::from("src/b.rs")))),
            ("deleted path", with(&|c| c[3].path = PathBuf::from("old.md"))),
            ("deleted type", with(&|c| c[3] = deleted("old.txt", EntryType::Dir))),
            ("a deletion more", with(&|c| c.push(deleted("gone", EntryType::File)))),
            ("a deletion less", with(&|c| drop(c.pop()))),
            ("kind", with(&|c| c[0].kind = ChangeKind::TypeChanged)),
        ];
        let mut seen = std::collections::BTreeSet::from([base.to_string()]);
        for (what, d) in variants {
            assert!(
                seen.insert(d.to_string()),
                "changing the {what} did not change the digest (or collided)"
            );
        }
        // What apply does not write leaves it alone: setuid bits (stripped),
        // line counts, the binary flag, a symlink's own mode.
        let same = [
            with(&|c| c[0].new_mode = Some(0o4644)),
            with(&|c| c[0].lines_added = Some(3)),
            with(&|c| c[0].binary = true),
            with(&|c| c[2].new_mode = Some(0o755)),
        ];
        assert!(same.iter().all(|d| *d == base));
    }

    /// A mode-only change writes no bytes: its content is not bound, so a
    /// stale hash in the record does not matter.
    #[test]
    fn mode_only_changes_bind_the_mode_alone() {
        let mode_only = |hash: Option<ContentHash>| {
            let mut c = file("run.sh", b"", 0o755);
            c.kind = ChangeKind::Modified;
            c.old_type = Some(EntryType::File);
            c.old_mode = Some(0o644);
            c.content_changed = false;
            c.content_sha256 = hash;
            digest(vec![c])
        };
        assert_eq!(mode_only(None), mode_only(Some(ContentHash::of_bytes(b"x"))));
    }

    #[test]
    fn parsing_takes_the_printed_form_only_in_full() {
        let d = digest(sample());
        let text = d.to_string();
        assert_eq!(text.parse::<ChangeDigest>().unwrap(), d);
        assert_eq!(text.trim_start_matches("sha256:").parse::<ChangeDigest>().unwrap(), d);
        assert_eq!(text.to_uppercase().replace("SHA256:", "sha256:").parse::<ChangeDigest>().unwrap(), d);
        assert_eq!(format!(" {text}\n").parse::<ChangeDigest>().unwrap(), d);
        for bad in [&text[..19], "sha256:", "", "md5:abcd", &format!("{text}0"), &text.replace('a', "g")] {
            let err = bad.parse::<ChangeDigest>().unwrap_err();
            assert!(err.to_string().contains("64 hex digits"), "{err}");
        }
        assert_eq!(serde_json::to_value(d).unwrap(), serde_json::Value::String(text));
    }

    #[test]
    fn content_hash_is_sha256() {
        assert_eq!(
            ContentHash::of_bytes(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (hash, len) = ContentHash::of_reader(&mut &b"abc"[..]).unwrap();
        assert_eq!((hash, len), (ContentHash::of_bytes(b"abc"), 3));
    }
}
