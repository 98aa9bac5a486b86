//! compute_diff and its presentations.

use std::path::{Path, PathBuf};

use airlock_workspace::{ChangeKind, Diff, EntryType, WorkspaceError, compute_diff};

use super::common::*;
use crate::require_root;

fn kinds(diff: &Diff) -> Vec<(String, ChangeKind)> {
    diff.changes.iter().map(|c| (c.path.to_string_lossy().into_owned(), c.kind)).collect()
}

fn unified(diff: &Diff, f: &Fixture) -> String {
    let mut out = Vec::new();
    diff.render_unified(&f.lower, &f.upper, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn add_modify_delete_in_merged_dirs() {
    require_root!();
    let f = Fixture::new();
    write(&f.lower, "a.txt", b"one\ntwo\nthree\n");
    write(&f.lower, "b.txt", b"bye\n");
    write(&f.lower, "dir/c.txt", b"c\n");
    write(&f.lower, "untouched.txt", b"same\n");
    write(&f.upper, "a.txt", b"one\nTWO\nthree\nfour\n");
    write(&f.upper, "new.txt", b"hello\n");
    whiteout(&f.upper, "b.txt");
    write(&f.upper, "dir/d.txt", b"d\n");
    // A whiteout for something lower never had hides nothing.
    whiteout(&f.upper, "never-existed");

    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    assert_eq!(
        kinds(&diff),
        vec![
            ("a.txt".into(), ChangeKind::Modified),
            ("b.txt".into(), ChangeKind::Deleted),
            ("dir/d.txt".into(), ChangeKind::Added),
            ("new.txt".into(), ChangeKind::Added),
        ]
    );
    let a = &diff.changes[0];
    assert_eq!((a.lines_added, a.lines_removed), (Some(2), Some(1)));
    assert!(a.content_changed && !a.binary);
    let b = &diff.changes[1];
    assert_eq!(b.old_type, Some(EntryType::File));
    assert_eq!(b.size, Some(4));
    assert_eq!(b.lines_removed, Some(1));
}

#[test]
fn copied_up_but_unchanged_file_is_not_a_change() {
    let f = Fixture::new();
    write_mode(&f.lower, "same.txt", b"x\n", 0o644);
    write_mode(&f.upper, "same.txt", b"x\n", 0o644);
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    assert!(diff.is_empty(), "{diff:?}");
}

#[test]
fn deleted_dir_lists_everything_beneath_it() {
    require_root!();
    let f = Fixture::new();
    write(&f.lower, "gone/x", b"x\n");
    write(&f.lower, "gone/y/z", b"z\n");
    symlink(&f.lower, "gone/link", "/etc");
    whiteout(&f.upper, "gone");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    assert_eq!(
        kinds(&diff),
        vec![
            ("gone".into(), ChangeKind::Deleted),
            ("gone/link".into(), ChangeKind::Deleted),
            ("gone/x".into(), ChangeKind::Deleted),
            ("gone/y".into(), ChangeKind::Deleted),
            ("gone/y/z".into(), ChangeKind::Deleted),
        ]
    );
    assert_eq!(diff.changes[1].symlink_target, Some(PathBuf::from("/etc")));
}

#[test]
fn opaque_dir_replaces_lower_children() {
    require_root!();
    for xattr in ["trusted.overlay.opaque", "user.overlay.opaque"] {
        let f = Fixture::new();
        write(&f.lower, "d/keep", b"k\n");
        write(&f.lower, "d/old", b"o\n");
        write(&f.lower, "d/sub/deep", b"deep\n");
        write(&f.upper, "d/keep", b"k\n");
        write(&f.upper, "d/new", b"n\n");
        set_xattr(&f.upper, "d", xattr, b"y");
        let diff = compute_diff(&f.lower, &f.upper).unwrap();
        assert_eq!(
            kinds(&diff),
            vec![
                ("d/new".into(), ChangeKind::Added),
                ("d/old".into(), ChangeKind::Deleted),
                ("d/sub".into(), ChangeKind::Deleted),
                ("d/sub/deep".into(), ChangeKind::Deleted),
            ],
            "with {xattr}"
        );
    }
}

#[test]
fn opaque_dir_replacing_a_file_is_a_type_change() {
    require_root!();
    let f = Fixture::new();
    write(&f.lower, "x", b"file\n");
    write(&f.upper, "x/inner", b"i\n");
    opaque(&f.upper, "x");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    assert_eq!(
        kinds(&diff),
        vec![("x".into(), ChangeKind::TypeChanged), ("x/inner".into(), ChangeKind::Added),]
    );
}

#[test]
fn redirect_and_metacopy_are_refused() {
    require_root!();
    let f = Fixture::new();
    mkdir(&f.lower, "a");
    mkdir(&f.upper, "b");
    set_xattr(&f.upper, "b", "trusted.overlay.redirect", b"/a");
    let err = compute_diff(&f.lower, &f.upper).unwrap_err();
    assert!(matches!(err, WorkspaceError::UnsupportedOverlay { .. }), "{err}");
    assert!(err.to_string().contains("redirect"), "{err}");

    let f = Fixture::new();
    write(&f.lower, "f", b"data\n");
    write(&f.upper, "f", b"");
    set_xattr(&f.upper, "f", "user.overlay.metacopy", b"");
    let err = compute_diff(&f.lower, &f.upper).unwrap_err();
    assert!(matches!(err, WorkspaceError::UnsupportedOverlay { .. }), "{err}");
}

#[test]
fn type_changes_in_every_direction() {
    let f = Fixture::new();
    write(&f.lower, "file2dir", b"f\n");
    write(&f.lower, "dir2file/child", b"c\n");
    write(&f.lower, "file2link", b"f\n");
    symlink(&f.lower, "link2dir", "somewhere");
    write(&f.lower, "dir2link/child", b"c\n");
    write(&f.upper, "file2dir/new", b"n\n");
    write(&f.upper, "dir2file", b"now a file\n");
    symlink(&f.upper, "file2link", "target");
    mkdir(&f.upper, "link2dir");
    symlink(&f.upper, "dir2link", "elsewhere");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    assert_eq!(
        kinds(&diff),
        vec![
            ("dir2file".into(), ChangeKind::TypeChanged),
            ("dir2file/child".into(), ChangeKind::Deleted),
            ("dir2link".into(), ChangeKind::TypeChanged),
            ("dir2link/child".into(), ChangeKind::Deleted),
            ("file2dir".into(), ChangeKind::TypeChanged),
            ("file2dir/new".into(), ChangeKind::Added),
            ("file2link".into(), ChangeKind::TypeChanged),
            ("link2dir".into(), ChangeKind::TypeChanged),
        ]
    );
    let d2l = &diff.changes[2];
    assert_eq!(d2l.old_type, Some(EntryType::Dir));
    assert_eq!(d2l.new_type, Some(EntryType::Symlink));
    assert_eq!(d2l.symlink_target, Some(PathBuf::from("elsewhere")));
    let l2d = &diff.changes[7];
    assert_eq!(l2d.old_symlink_target, Some(PathBuf::from("somewhere")));
}

#[test]
fn mode_only_change() {
    let f = Fixture::new();
    write_mode(&f.lower, "run.sh", b"#!/bin/sh\n", 0o644);
    write_mode(&f.upper, "run.sh", b"#!/bin/sh\n", 0o755);
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    assert_eq!(diff.changes.len(), 1);
    let c = &diff.changes[0];
    assert!(c.is_mode_only());
    assert_eq!((c.old_mode, c.new_mode), (Some(0o644), Some(0o755)));
    let text = unified(&diff, &f);
    let digest = format!("change {}\n", diff.digest());
    assert_eq!(text, format!("diff --git a/run.sh b/run.sh\nold mode 100644\nnew mode 100755\n{digest}"));
    // A mode-only change writes no content: none is bound.
    assert_eq!(c.content_sha256, None);
}

#[test]
fn unified_output_is_git_style() {
    require_root!();
    let f = Fixture::new();
    write(&f.lower, "mod.txt", b"a\nb\nc\n");
    write(&f.lower, "del.txt", b"bye\n");
    write(&f.lower, "bin.dat", b"\0\x01\x02");
    symlink(&f.lower, "retarget", "old-target");
    write(&f.upper, "mod.txt", b"a\nB\nc\n");
    whiteout(&f.upper, "del.txt");
    write(&f.upper, "bin.dat", b"\0\x01\x03");
    write(&f.upper, "add.txt", b"new line\n");
    symlink(&f.upper, "link", "../outside");
    symlink(&f.upper, "retarget", "new-target");
    write_mode(&f.upper, "suid", b"x\n", 0o4755);

    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let text = unified(&diff, &f);
    let expected = [
        "diff --git a/add.txt b/add.txt\nnew file mode 100644\n--- /dev/null\n+++ b/add.txt\n@@ -0,0 +1 @@\n+new line\n",
        "diff --git a/bin.dat b/bin.dat\nBinary files a/bin.dat and b/bin.dat differ\n",
        "diff --git a/del.txt b/del.txt\ndeleted file mode 100644\n--- a/del.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n",
        "diff --git a/link b/link\nnew file mode 120000\n--- /dev/null\n+++ b/link\n@@ -0,0 +1 @@\n+../outside\n\\ No newline at end of file\n",
        "--- a/mod.txt\n+++ b/mod.txt\n@@ -1,3 +1,3 @@\n a\n-b\n+B\n c\n",
        "@@ -1 +1 @@\n-old-target\n\\ No newline at end of file\n+new-target\n\\ No newline at end of file\n",
        "diff --git a/suid b/suid\nnew file mode 104755\n",
    ];
    for e in expected {
        assert!(text.contains(e), "missing {e:?} in:\n{text}");
    }
    // Changes appear in path order.
    let add = text.find("a/add.txt").unwrap();
    let suid = text.find("a/suid").unwrap();
    assert!(add < suid);
}

#[test]
fn hostile_names_are_quoted_in_review_output() {
    let f = Fixture::new();
    let name = os(b"x\n+++ b\x1b[2J");
    std::fs::write(f.upper.join(name), b"\x1b]0;pwned\x07hello\n").unwrap();
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let text = unified(&diff, &f);
    assert!(!text.contains("\n+++ b\n"), "{text}");
    assert!(text.contains("\"b/x\\n+++ b\\033[2J\""), "{text}");
    assert!(!text.contains('\x1b'), "escape reached the terminal: {text:?}");
    assert!(text.contains("+^[]0;pwned^Ghello"), "{text}");
    let mut stat = Vec::new();
    diff.render_stat(&mut stat).unwrap();
    assert!(!stat.contains(&0x1b));
}

#[test]
fn non_utf8_names_survive() {
    let f = Fixture::new();
    std::fs::write(f.upper.join(os(b"caf\xe9")), b"x\n").unwrap();
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    assert_eq!(diff.changes[0].path, Path::new(os(b"caf\xe9")));
    let json = diff.to_json();
    assert_eq!(json["changes"][0]["path_lossy"], true);
}

#[test]
fn stat_counts_and_render() {
    require_root!();
    let f = Fixture::new();
    write(&f.lower, "m.txt", b"1\n2\n3\n");
    write(&f.lower, "d.txt", b"a\nb\n");
    write(&f.lower, "olddir/f", b"f\n");
    write(&f.upper, "m.txt", b"1\nX\n3\n4\n");
    whiteout(&f.upper, "d.txt");
    whiteout(&f.upper, "olddir");
    write(&f.upper, "newdir/a.txt", b"a\n");
    write(&f.upper, "img.png", b"\x89PNG\0\0");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let s = diff.stat();
    assert_eq!(s.files_added, 2);
    assert_eq!(s.files_modified, 1);
    assert_eq!(s.files_deleted, 2);
    assert_eq!(s.dirs_added, 1);
    assert_eq!(s.dirs_deleted, 1);
    assert_eq!(s.type_changed, 0);
    assert_eq!(s.lines_added, 2 + 1);
    assert_eq!(s.lines_removed, 1 + 2 + 1);
    assert_eq!(s.binary_files, 1);
    let mut out = Vec::new();
    diff.render_stat(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains(" m.txt        |   3 ++-\n"), "{text}");
    assert!(text.contains(" img.png      | Bin\n"), "{text}");
    let last = format!(" 5 files changed, 3 insertions(+), 4 deletions(-)\nchange {}\n", diff.digest());
    assert!(text.ends_with(&last), "{text}");
}

#[test]
fn json_shape_is_stable() {
    let f = Fixture::new();
    write(&f.upper, "a.txt", b"x\ny\n");
    symlink(&f.upper, "l", "a.txt");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let json = diff.to_json();
    assert_eq!(json["version"], 1);
    assert_eq!(json["stat"]["files_added"], 2);
    let c = &json["changes"][0];
    let mut keys: Vec<&str> = c.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "binary",
            "content_changed",
            "content_sha256",
            "kind",
            "lines_added",
            "lines_removed",
            "new_mode",
            "new_type",
            "old_mode",
            "old_symlink_target",
            "old_type",
            "path",
            "path_lossy",
            "size",
            "symlink_target"
        ]
    );
    assert_eq!(c["path"], "a.txt");
    assert_eq!(c["kind"], "added");
    assert_eq!(c["new_type"], "file");
    assert_eq!(c["old_type"], serde_json::Value::Null);
    assert_eq!(c["new_mode"], 0o644);
    assert_eq!(c["size"], 4);
    assert_eq!(c["lines_added"], 2);
    // sha256("x\ny\n"), and the change's digest as `apply --expect` takes it.
    assert_eq!(c["content_sha256"], "09834d488008f5f1ef589a2d7cedc52425bee9dd23b2212e4c1d673c5cbb54e4");
    assert_eq!(json["digest"], diff.digest().to_string());
    assert_eq!(json["changes"][1]["content_sha256"], serde_json::Value::Null);
    assert_eq!(json["changes"][1]["new_type"], "symlink");
    assert_eq!(json["changes"][1]["symlink_target"], "a.txt");
}

#[test]
fn special_files_show_up_as_other() {
    let f = Fixture::new();
    fifo(&f.upper, "pipe");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    assert_eq!(diff.changes[0].new_type, Some(EntryType::Other));
    let text = unified(&diff, &f);
    assert!(text.contains("never applied"), "{text}");
}

#[test]
fn upper_symlink_is_reported_not_followed() {
    let f = Fixture::new();
    symlink(&f.upper, "shadow", "/etc/shadow");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let c = &diff.changes[0];
    assert_eq!(c.new_type, Some(EntryType::Symlink));
    assert_eq!(c.symlink_target, Some(PathBuf::from("/etc/shadow")));
    assert_eq!(c.size, None);
}

/// Long diffs and applies report how far they are, for a progress line.
#[test]
fn diff_and_apply_report_progress() {
    let f = Fixture::new();
    for i in 0..50 {
        write(&f.upper, &format!("d{}/f{i}.txt", i % 5), b"new\n");
    }
    let mut seen = Vec::new();
    let diff = airlock_workspace::compute_diff_with(&f.lower, &f.upper, &mut |n| seen.push(n)).unwrap();
    assert_eq!(diff.changes.len(), 55, "{diff:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    // 50 files and 5 directories examined, reported once per directory.
    assert_eq!(seen.last(), Some(&55), "{seen:?}");
    assert_eq!(seen.len(), 6, "{seen:?}");

    let mut written = Vec::new();
    let opts = airlock_workspace::ApplyOptions::default();
    let report =
        airlock_workspace::apply_with(&diff, &f.upper, &f.lower, &opts, &mut |n| written.push(n)).unwrap();
    assert_eq!(report.written.len(), 55);
    assert_eq!(written, (1..=55).collect::<Vec<u64>>());
}

/// The sandbox rewrites a file between the diff and its rendering: the
/// text shown would not be what the digest names, so rendering fails
/// before the digest line is printed.
#[test]
fn rendering_refuses_content_rewritten_after_the_diff() {
    let f = Fixture::new();
    write(&f.upper, "a.txt", b"what the digest names\n");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let mut out = Vec::new();
    diff.render_unified(&f.lower, &f.upper, &mut out).unwrap();
    assert!(String::from_utf8_lossy(&out).ends_with(&format!("change {}\n", diff.digest())));
    write(&f.upper, "a.txt", b"something else shown\n");
    let mut out = Vec::new();
    let err = diff.render_unified(&f.lower, &f.upper, &mut out).unwrap_err();
    assert!(err.to_string().contains("a.txt") && err.to_string().contains("airlock diff"), "{err}");
    let shown = String::from_utf8_lossy(&out);
    assert!(!shown.contains("change sha256:"), "a digest under a text it does not name: {shown}");
}
