//! Presenting a diff to a person: git-style unified diff and `--stat`.
//!
//! The output is for review, not for `git apply`: paths are quoted when
//! odd, and control characters and bidi overrides inside file contents are
//! made visible, so a hostile file cannot rewrite the reviewer's terminal
//! or hide lines ("Trojan Source").

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use similar::{Algorithm, ChangeTag, TextDiff};

use crate::diff::{Change, ChangeKind, Diff, EntryType, TEXT_LIMIT, looks_binary};
use crate::digest::ContentHash;
use crate::fsx;
use crate::names::{quote, quote_prefixed};

/// Big inputs can make a line diff slow; past this, similar falls back to
/// a coarser (still correct) diff.
const DIFF_TIMEOUT: Duration = Duration::from_secs(5);

fn text_diff<'a>(old: &'a str, new: &'a str) -> TextDiff<'a, 'a, str> {
    TextDiff::configure().algorithm(Algorithm::Myers).timeout(DIFF_TIMEOUT).diff_lines(old, new)
}

/// Lines added and removed between two texts.
pub(crate) fn count_lines(old: &str, new: &str) -> (u64, u64) {
    let diff = text_diff(old, new);
    let (mut added, mut removed) = (0, 0);
    for change in diff.iter_all_changes() {
        match change.tag() {
            ChangeTag::Insert => added += 1,
            ChangeTag::Delete => removed += 1,
            ChangeTag::Equal => {}
        }
    }
    (added, removed)
}

/// Git's notation for an entry's type and permission bits.
fn git_mode(ty: Option<EntryType>, mode: Option<u32>) -> String {
    let perm = mode.unwrap_or(0);
    match ty {
        Some(EntryType::File) => format!("10{perm:04o}"),
        Some(EntryType::Symlink) => "120000".to_string(),
        Some(EntryType::Dir) => format!("04{perm:04o}"),
        Some(EntryType::Other) | None => format!("00{perm:04o}"),
    }
}

struct Sides<'a> {
    lower: BorrowedFd<'a>,
    upper: BorrowedFd<'a>,
}

enum Content {
    Text(String),
    Binary,
    TooLarge(u64),
}

impl Sides<'_> {
    fn load(&self, upper: bool, c: &Change) -> io::Result<Content> {
        let root = if upper { self.upper } else { self.lower };
        match fsx::read_file_bounded(root, &c.path, TEXT_LIMIT)? {
            None => Ok(Content::TooLarge(c.size.unwrap_or(0))),
            Some(bytes) if upper && c.content_sha256.is_some_and(|h| h != ContentHash::of_bytes(&bytes)) => {
                Err(changed_while_shown(c))
            }
            Some(bytes) if looks_binary(&bytes) => Ok(Content::Binary),
            Some(bytes) => Ok(String::from_utf8(bytes).map_or(Content::Binary, Content::Text)),
        }
    }
}

/// The content shown is not the content the diff's digest names: the
/// sandbox rewrote the file after the diff was computed.
fn changed_while_shown(c: &Change) -> io::Error {
    io::Error::other(format!(
        "{} changed in the sandbox while the diff was being shown, so the text above is not the change \
         its digest names; run `airlock diff` again (stop the sandbox first for a review that stays valid)",
        quote(&c.path)
    ))
}

impl Diff {
    /// The line that ends `render_unified` and `render_stat`:
    /// `change sha256:<64 hex digits>`, the digest `apply --expect` takes.
    pub fn digest_line(&self) -> String {
        format!("change {}", self.digest())
    }

    /// Writes a git-style unified diff of every change, then
    /// [`Diff::digest_line`]. `lower` and `upper` must be the trees the diff
    /// was computed from; files are read from them without following
    /// symlinks. A new file whose bytes no longer have the hash recorded in
    /// the diff (the sandbox rewrote it since) fails the rendering before
    /// the digest line, so the digest printed always names what was shown.
    pub fn render_unified(&self, lower: &Path, upper: &Path, out: &mut dyn Write) -> io::Result<()> {
        let renderer = ChangeRenderer::open(lower, upper)?;
        for c in &self.changes {
            renderer.render(c, out)?;
        }
        writeln!(out, "{}", self.digest_line())
    }

    /// Splits `patch`, a text [`Diff::render_unified`] wrote for this diff
    /// (kept elsewhere, such as a copy with secret values redacted), into
    /// what each change rendered to, in the order of `changes`: None for a
    /// change that rendered nothing (a directory) or is not in the patch.
    /// For a caller that holds the patch but not the trees.
    pub fn sections_of(&self, patch: &str) -> Vec<Option<String>> {
        let mut by_header = patch_sections(patch);
        self.changes.iter().map(|c| by_header.remove(&header_line(&c.path))).collect()
    }

    /// Writes a `git diff --stat`-style summary (directories omitted),
    /// then [`Diff::digest_line`].
    pub fn render_stat(&self, out: &mut dyn Write) -> io::Result<()> {
        let rows: Vec<(String, String, u64, u64)> = self
            .changes
            .iter()
            .filter(|c| {
                !(c.old_type.is_none_or(|t| t == EntryType::Dir)
                    && c.new_type.is_none_or(|t| t == EntryType::Dir))
            })
            .map(|c| {
                let added = c.lines_added.unwrap_or(0);
                let removed = c.lines_removed.unwrap_or(0);
                let count = if c.binary { "Bin".to_string() } else { (added + removed).to_string() };
                (quote(&c.path), count, added, removed)
            })
            .collect();
        let name_w = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
        let count_w = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
        let max_lines = rows.iter().map(|r| r.2 + r.3).max().unwrap_or(0);
        const BAR: u64 = 40;
        for (name, count, added, removed) in &rows {
            let (mut plus, mut minus) = (*added, *removed);
            if max_lines > BAR {
                plus = (plus * BAR).div_ceil(max_lines);
                minus = (minus * BAR).div_ceil(max_lines);
            }
            let bar = format!(
                "{}{}",
                "+".repeat(usize::try_from(plus).unwrap_or(0)),
                "-".repeat(usize::try_from(minus).unwrap_or(0))
            );
            let sep = if bar.is_empty() { "" } else { " " };
            writeln!(out, " {name:<name_w$} | {count:>count_w$}{sep}{bar}")?;
        }
        let s = self.stat();
        let files = rows.len();
        write!(out, " {files} file{} changed", if files == 1 { "" } else { "s" })?;
        if s.lines_added > 0 {
            write!(out, ", {} insertion{}(+)", s.lines_added, if s.lines_added == 1 { "" } else { "s" })?;
        }
        if s.lines_removed > 0 {
            write!(out, ", {} deletion{}(-)", s.lines_removed, if s.lines_removed == 1 { "" } else { "s" })?;
        }
        writeln!(out)?;
        writeln!(out, "{}", self.digest_line())
    }
}

/// Renders one change at a time, as [`Diff::render_unified`] does for all
/// of them: for a caller that shows each change apart (the HTML report,
/// which highlights each file by its type and stops showing content past a
/// budget). Holds both trees open, so every change is read from the trees
/// the diff was computed from.
pub struct ChangeRenderer {
    lower: OwnedFd,
    upper: OwnedFd,
}

impl ChangeRenderer {
    /// Opens the two trees (the upper one without following a link at its
    /// root, as [`Diff::render_unified`] does).
    pub fn open(lower: &Path, upper: &Path) -> io::Result<ChangeRenderer> {
        Ok(ChangeRenderer { lower: fsx::open_root(lower)?, upper: fsx::open_layer_root(upper)? })
    }

    /// Writes `c` as a git-style unified diff (nothing for a directory).
    /// Fails for a new file whose bytes are no longer the ones the diff
    /// recorded (the sandbox rewrote it since).
    pub fn render(&self, c: &Change, out: &mut dyn Write) -> io::Result<()> {
        let sides = Sides { lower: self.lower.as_fd(), upper: self.upper.as_fd() };
        render_change(&sides, c, out)
    }
}

fn render_change(sides: &Sides<'_>, c: &Change, out: &mut dyn Write) -> io::Result<()> {
    match c.kind {
        ChangeKind::Added => render_new(sides, c, out),
        ChangeKind::Deleted => render_old(sides, c, out),
        ChangeKind::TypeChanged => {
            render_old(sides, c, out)?;
            render_new(sides, c, out)
        }
        ChangeKind::Modified => render_modified(sides, c, out),
    }
}

/// The first line of what a change to `path` renders to in a patch.
pub fn header_line(path: &Path) -> String {
    format!("diff --git {} {}", quote_prefixed("a/", path), quote_prefixed("b/", path))
}

/// A patch [`Diff::render_unified`] wrote, split by change: each header
/// line ([`header_line`]) and the text rendered under it (both sides of a
/// type change under the one header), the digest line left out.
pub fn patch_sections(patch: &str) -> std::collections::HashMap<String, String> {
    let mut sections: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut current: Option<String> = None;
    for line in patch.split_inclusive('\n') {
        // Content lines start with ' ', '+', '-', '@' or '\\': only a
        // change's header starts with "diff --git ".
        if line.starts_with("diff --git ") {
            current = Some(line.trim_end_matches('\n').to_owned());
        } else if line.starts_with("change sha256:") {
            current = None;
            continue;
        }
        if let Some(header) = &current {
            sections.entry(header.clone()).or_default().push_str(line);
        }
    }
    sections
}

fn header(c: &Change, out: &mut dyn Write) -> io::Result<()> {
    writeln!(out, "{}", header_line(&c.path))
}

fn render_new(sides: &Sides<'_>, c: &Change, out: &mut dyn Write) -> io::Result<()> {
    let ty = c.new_type;
    if ty == Some(EntryType::Dir) {
        return Ok(());
    }
    header(c, out)?;
    writeln!(out, "new file mode {}", git_mode(ty, c.new_mode))?;
    let b = quote_prefixed("b/", &c.path);
    match ty {
        Some(EntryType::Symlink) => {
            let target = c.symlink_target.as_deref().unwrap_or(Path::new(""));
            link_hunk(None, Some(target), "/dev/null", &b, out)
        }
        Some(EntryType::File) => match sides.load(true, c)? {
            Content::Text(new) => text_hunks("", &new, "/dev/null", &b, out),
            Content::Binary => writeln!(out, "Binary files /dev/null and {b} differ"),
            Content::TooLarge(n) => writeln!(out, "File {b} too large to show ({n} bytes)"),
        },
        _ => writeln!(out, "Special file (device, FIFO or socket): shown for review, never applied"),
    }
}

fn render_old(sides: &Sides<'_>, c: &Change, out: &mut dyn Write) -> io::Result<()> {
    let ty = c.old_type;
    if ty == Some(EntryType::Dir) {
        return Ok(());
    }
    header(c, out)?;
    writeln!(out, "deleted file mode {}", git_mode(ty, c.old_mode))?;
    let a = quote_prefixed("a/", &c.path);
    match ty {
        Some(EntryType::Symlink) => {
            let target = if c.kind == ChangeKind::Deleted {
                c.symlink_target.as_deref()
            } else {
                c.old_symlink_target.as_deref()
            };
            link_hunk(target, None, &a, "/dev/null", out)
        }
        Some(EntryType::File) => match sides.load(false, c)? {
            Content::Text(old) => text_hunks(&old, "", &a, "/dev/null", out),
            Content::Binary => writeln!(out, "Binary files {a} and /dev/null differ"),
            Content::TooLarge(_) => writeln!(out, "File {a} too large to show"),
        },
        _ => Ok(()),
    }
}

fn render_modified(sides: &Sides<'_>, c: &Change, out: &mut dyn Write) -> io::Result<()> {
    header(c, out)?;
    if c.old_mode != c.new_mode {
        writeln!(out, "old mode {}", git_mode(c.old_type, c.old_mode))?;
        writeln!(out, "new mode {}", git_mode(c.new_type, c.new_mode))?;
    }
    if !c.content_changed {
        return Ok(());
    }
    let a = quote_prefixed("a/", &c.path);
    let b = quote_prefixed("b/", &c.path);
    match c.new_type {
        Some(EntryType::Symlink) => {
            link_hunk(c.old_symlink_target.as_deref(), c.symlink_target.as_deref(), &a, &b, out)
        }
        Some(EntryType::File) => match (sides.load(false, c)?, sides.load(true, c)?) {
            (Content::Text(old), Content::Text(new)) => text_hunks(&old, &new, &a, &b, out),
            (Content::TooLarge(_), _) | (_, Content::TooLarge(_)) => {
                writeln!(out, "File {b} too large to show")
            }
            _ => writeln!(out, "Binary files {a} and {b} differ"),
        },
        _ => Ok(()),
    }
}

/// A symlink is shown like git does: its target as a one-line file
/// without a trailing newline.
fn link_hunk(
    old: Option<&Path>,
    new: Option<&Path>,
    a: &str,
    b: &str,
    out: &mut dyn Write,
) -> io::Result<()> {
    writeln!(out, "--- {a}")?;
    writeln!(out, "+++ {b}")?;
    let (old_range, new_range) = match (old, new) {
        (Some(_), Some(_)) => ("-1", "+1"),
        (Some(_), None) => ("-1", "+0,0"),
        _ => ("-0,0", "+1"),
    };
    writeln!(out, "@@ {old_range} {new_range} @@")?;
    for (sign, target) in [('-', old), ('+', new)] {
        if let Some(t) = target {
            writeln!(out, "{sign}{}", quote(t))?;
            writeln!(out, "\\ No newline at end of file")?;
        }
    }
    Ok(())
}

fn text_hunks(old: &str, new: &str, a: &str, b: &str, out: &mut dyn Write) -> io::Result<()> {
    let diff = text_diff(old, new);
    let mut buf = Vec::new();
    diff.unified_diff().context_radius(3).header(a, b).to_writer(&mut buf)?;
    out.write_all(&make_visible(&buf))
}

/// Replaces C0 controls (except tab and newline), DEL and Unicode bidi
/// controls with visible notation (`^[`, `<U+202E>`).
fn make_visible(bytes: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '\n' | '\t' => out.push(ch),
            '\u{0}'..='\u{1f}' => {
                out.push('^');
                out.push(char::from(u8::try_from(u32::from(ch) + 0x40).unwrap_or(b'?')));
            }
            '\u{7f}' => out.push_str("^?"),
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' => {
                out.push_str(&format!("<U+{:04X}>", u32::from(ch)));
            }
            _ => out.push(ch),
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn git_modes() {
        assert_eq!(git_mode(Some(EntryType::File), Some(0o644)), "100644");
        assert_eq!(git_mode(Some(EntryType::File), Some(0o4755)), "104755");
        assert_eq!(git_mode(Some(EntryType::Symlink), Some(0o777)), "120000");
        assert_eq!(git_mode(Some(EntryType::Dir), Some(0o755)), "040755");
    }

    #[test]
    fn controls_are_made_visible() {
        let shown = make_visible("ok\t\u{1b}[2Jx\r\u{202e}evil\n".as_bytes());
        assert_eq!(String::from_utf8_lossy(&shown), "ok\t^[[2Jx^M<U+202E>evil\n");
    }

    #[test]
    fn a_kept_patch_splits_into_what_each_change_rendered() {
        let dir = tempfile::tempdir().unwrap();
        let (lower, upper) = (dir.path().join("lower"), dir.path().join("upper"));
        for d in [&lower, &upper] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(lower.join("a.txt"), "one\ntwo\n").unwrap();
        std::fs::write(upper.join("a.txt"), "one\nTWO\n").unwrap();
        std::fs::create_dir(upper.join("new dir")).unwrap();
        std::fs::write(upper.join("new dir/b.txt"), "diff --git a/x b/x\n").unwrap();
        let diff = crate::compute_diff(&lower, &upper).unwrap();
        let mut patch = Vec::new();
        diff.render_unified(&lower, &upper, &mut patch).unwrap();
        let patch = String::from_utf8(patch).unwrap();
        let sections = diff.sections_of(&patch);
        assert_eq!(sections.len(), diff.changes.len());
        let renderer = ChangeRenderer::open(&lower, &upper).unwrap();
        for (c, section) in diff.changes.iter().zip(&sections) {
            let mut one = Vec::new();
            renderer.render(c, &mut one).unwrap();
            let one = String::from_utf8(one).unwrap();
            if one.is_empty() {
                assert_eq!(section, &None, "{c:?}");
            } else {
                assert_eq!(section.as_deref(), Some(one.as_str()), "{c:?}");
            }
        }
        // Every rendered byte but the digest line is in some section.
        let joined: usize = sections.iter().flatten().map(String::len).sum();
        assert_eq!(joined + diff.digest_line().len() + 1, patch.len());
    }

    #[test]
    fn line_counts() {
        assert_eq!(count_lines("a\nb\nc\n", "a\nB\nc\nd\n"), (2, 1));
        assert_eq!(count_lines("", "x\n"), (1, 0));
    }
}
