//! apply: the safety contract, point by point.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use airlock_workspace::{
    ApplyError, ApplyOptions, Change, ChangeKind, ContentHash, Diff, EntryType, RefusalReason, apply,
    check_apply, compute_diff,
};

use super::common::*;
use crate::require_root;

fn opts() -> ApplyOptions {
    ApplyOptions::default()
}

fn protected_opts(allow: bool) -> ApplyOptions {
    ApplyOptions {
        allow_protected: allow,
        protected: vec![".git/hooks".into(), ".git/config".into(), "*.env".into()],
        ..ApplyOptions::default()
    }
}

/// A hand-made change record, for diffs an attacker could forge.
fn change(path: &str, kind: ChangeKind, old: Option<EntryType>, new: Option<EntryType>) -> Change {
    Change {
        path: PathBuf::from(path),
        kind,
        old_type: old,
        new_type: new,
        old_mode: old.map(|_| 0o644),
        new_mode: new.map(|_| 0o644),
        size: None,
        binary: false,
        symlink_target: None,
        old_symlink_target: None,
        lines_added: None,
        lines_removed: None,
        content_changed: true,
        content_sha256: None,
    }
}

fn refusals(err: ApplyError) -> Vec<(PathBuf, RefusalReason)> {
    match err {
        ApplyError::Refused { refusals } => refusals.into_iter().map(|r| (r.path, r.reason)).collect(),
        other => panic!("expected a refusal, got {other}"),
    }
}

/// Applies `diff` and checks the workspace now equals the merged view
/// `expected` (a tree built by hand).
#[test]
fn applies_adds_modifies_deletes_and_dirs() {
    require_root!();
    let f = Fixture::new();
    write(&f.lower, "a.txt", b"old\n");
    write(&f.lower, "b.txt", b"delete me\n");
    write(&f.lower, "keep/k", b"k\n");
    write(&f.lower, "olddir/x/y", b"y\n");
    write(&f.upper, "a.txt", b"new\n");
    whiteout(&f.upper, "b.txt");
    write(&f.upper, "keep/added", b"added\n");
    write_mode(&f.upper, "newdir/sub/file.sh", b"#!/bin/sh\n", 0o755);
    symlink(&f.upper, "newdir/link", "sub/file.sh");
    whiteout(&f.upper, "olddir");
    let expected = f.outside("expected");
    write(&expected, "a.txt", b"new\n");
    write(&expected, "keep/k", b"k\n");
    write(&expected, "keep/added", b"added\n");
    write_mode(&expected, "newdir/sub/file.sh", b"#!/bin/sh\n", 0o755);
    symlink(&expected, "newdir/link", "sub/file.sh");

    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    check_apply(&diff, &f.upper, &f.lower, &opts()).unwrap();
    let report = apply(&diff, &f.upper, &f.lower, &opts()).unwrap();
    assert_eq!(snapshot(&f.lower), snapshot(&expected));
    assert!(report.deleted.contains(&PathBuf::from("olddir/x/y")));
    assert!(report.written.contains(&PathBuf::from("newdir/link")));
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    // No scratch entries left behind.
    assert!(snapshot(&f.lower).keys().all(|p| !p.to_string_lossy().contains(".airlock-")),);
}

#[test]
fn check_apply_writes_nothing() {
    let f = Fixture::new();
    write(&f.lower, "a", b"1\n");
    write(&f.upper, "a", b"2\n");
    write(&f.upper, "b", b"new\n");
    let before = snapshot(&f.lower);
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    check_apply(&diff, &f.upper, &f.lower, &opts()).unwrap();
    assert_eq!(snapshot(&f.lower), before);
}

#[test]
fn upper_symlink_to_outside_is_refused_and_never_read_through() {
    let f = Fixture::new();
    let secret = f.outside("secret");
    write(&secret, "shadow", b"root:hash\n");
    let target = secret.join("shadow");
    symlink(&f.upper, "leak", target.to_str().unwrap());
    symlink(&f.upper, "up", "../../x");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();

    let refused = refusals(apply(&diff, &f.upper, &f.lower, &opts()).unwrap_err());
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused.iter().all(|(_, r)| matches!(r, RefusalReason::SymlinkEscapes { .. })));
    assert!(snapshot(&f.lower).is_empty());

    // Allowed explicitly: created as a link, with the text verbatim.
    let allow = ApplyOptions { allow_protected: true, ..opts() };
    apply(&diff, &f.upper, &f.lower, &allow).unwrap();
    let meta = fs::symlink_metadata(f.lower.join("leak")).unwrap();
    assert!(meta.file_type().is_symlink());
    assert_eq!(fs::read_link(f.lower.join("leak")).unwrap(), target);
}

#[test]
fn forged_file_record_over_upper_symlink_is_refused() {
    // The diff claims a regular file, the layer holds a link to a secret:
    // apply must not copy the secret's content.
    let f = Fixture::new();
    let secret = f.outside("secret");
    write(&secret, "shadow", b"root:hash\n");
    symlink(&f.upper, "copy", secret.join("shadow").to_str().unwrap());
    let diff = Diff { changes: vec![change("copy", ChangeKind::Added, None, Some(EntryType::File))] };
    let refused = refusals(apply(&diff, &f.upper, &f.lower, &opts()).unwrap_err());
    assert!(matches!(refused[0].1, RefusalReason::UpperMismatch(_)), "{refused:?}");
    assert!(snapshot(&f.lower).is_empty());
}

#[test]
fn host_symlink_on_the_path_is_refused() {
    let f = Fixture::new();
    let outside = f.outside("etc");
    write(&outside, "passwd", b"root:x:0:0\n");
    symlink(&f.lower, "link", outside.to_str().unwrap());
    write(&f.upper, "link/passwd", b"pwned\n");
    write(&f.upper, "link/new", b"pwned\n");
    let diff = Diff {
        changes: vec![
            change("link/new", ChangeKind::Added, None, Some(EntryType::File)),
            change("link/passwd", ChangeKind::Modified, Some(EntryType::File), Some(EntryType::File)),
        ],
    };
    let refused = refusals(apply(&diff, &f.upper, &f.lower, &opts()).unwrap_err());
    assert_eq!(refused.len(), 2);
    assert!(refused.iter().all(|(_, r)| *r == RefusalReason::SymlinkOnPath));
    assert_eq!(fs::read(outside.join("passwd")).unwrap(), b"root:x:0:0\n");
    assert!(!outside.join("new").exists());
    // Even allow_protected does not lift it.
    let allow = ApplyOptions { allow_protected: true, ..opts() };
    assert!(apply(&diff, &f.upper, &f.lower, &allow).is_err());
}

#[test]
fn traversal_names_are_all_refused() {
    let f = Fixture::new();
    let outside = f.outside("victim");
    write(&f.upper, "ok", b"fine\n");
    let bad = ["../victim/x", "a/../../victim/x", "/tmp/abs", "a//b", "./a", "a/."];
    let mut changes: Vec<Change> =
        bad.iter().map(|p| change(p, ChangeKind::Added, None, Some(EntryType::File))).collect();
    let mut ok = change("ok", ChangeKind::Added, None, Some(EntryType::File));
    ok.content_sha256 = Some(ContentHash::of_bytes(b"fine\n"));
    changes.push(ok);
    let diff = Diff { changes };
    let refused = refusals(apply(&diff, &f.upper, &f.lower, &opts()).unwrap_err());
    assert_eq!(refused.len(), bad.len(), "{refused:?}");
    assert!(refused.iter().all(|(_, r)| matches!(r, RefusalReason::InvalidPath(_))));
    assert!(snapshot(&f.lower).is_empty(), "nothing written");
    assert!(snapshot(&outside).is_empty());
}

#[test]
fn special_files_refuse_the_whole_apply() {
    let f = Fixture::new();
    write(&f.lower, "a", b"1\n");
    write(&f.upper, "a", b"2\n");
    write(&f.upper, "good", b"good\n");
    fifo(&f.upper, "pipe");
    let before = snapshot(&f.lower);
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let err = apply(&diff, &f.upper, &f.lower, &opts()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("pipe") && msg.contains("never created"), "{msg}");
    assert_eq!(refusals(err), vec![(PathBuf::from("pipe"), RefusalReason::SpecialFile)]);
    assert_eq!(snapshot(&f.lower), before, "all-or-nothing");
}

#[test]
fn device_nodes_are_refused() {
    require_root!();
    let f = Fixture::new();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        f.upper.join("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    assert_eq!(diff.changes[0].new_type, Some(EntryType::Other));
    let refused = refusals(apply(&diff, &f.upper, &f.lower, &opts()).unwrap_err());
    assert_eq!(refused[0].1, RefusalReason::SpecialFile);
    assert!(!f.lower.join("null").exists());
}

#[test]
fn setuid_and_setgid_are_stripped() {
    let f = Fixture::new();
    write_mode(&f.upper, "suid", b"x\n", 0o4755);
    write_mode(&f.upper, "sgid", b"x\n", 0o2750);
    mkdir(&f.upper, "sticky");
    fs::set_permissions(f.upper.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let report = apply(&diff, &f.upper, &f.lower, &opts()).unwrap();
    let mode = |p: &str| fs::metadata(f.lower.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("suid"), 0o755);
    assert_eq!(mode("sgid"), 0o750);
    assert_eq!(mode("sticky"), 0o777);
    let mut stripped = report.stripped_mode_bits.clone();
    stripped.sort();
    assert_eq!(stripped, vec![PathBuf::from("sgid"), PathBuf::from("sticky"), PathBuf::from("suid")]);
}

#[test]
fn type_changes_apply_in_every_direction() {
    let f = Fixture::new();
    let outside = f.outside("outside");
    write(&outside, "precious", b"keep\n");
    write(&f.lower, "file2dir", b"f\n");
    write(&f.lower, "dir2file/child", b"c\n");
    write(&f.lower, "file2link", b"f\n");
    symlink(&f.lower, "link2dir", outside.to_str().unwrap());
    write(&f.lower, "dir2link/child", b"c\n");
    symlink(&f.lower, "link2file", "file2link");
    write(&f.upper, "file2dir/new", b"n\n");
    write(&f.upper, "dir2file", b"now a file\n");
    symlink(&f.upper, "file2link", "target");
    write(&f.upper, "link2dir/inside", b"in\n");
    symlink(&f.upper, "dir2link", "file2dir");
    write(&f.upper, "link2file", b"plain\n");
    let expected = f.outside("expected");
    write(&expected, "file2dir/new", b"n\n");
    write(&expected, "dir2file", b"now a file\n");
    symlink(&expected, "file2link", "target");
    write(&expected, "link2dir/inside", b"in\n");
    symlink(&expected, "dir2link", "file2dir");
    write(&expected, "link2file", b"plain\n");

    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    apply(&diff, &f.upper, &f.lower, &opts()).unwrap();
    assert_eq!(snapshot(&f.lower), snapshot(&expected));
    // The old link2dir pointed outside: its target was never written to.
    assert_eq!(snapshot(&outside).len(), 1);
    assert!(!outside.join("inside").exists());
}

#[test]
fn protected_paths_refused_without_flag_and_allowed_with_it() {
    let f = Fixture::new();
    write(&f.lower, ".git/HEAD", b"ref: refs/heads/main\n");
    write(&f.lower, ".git/config", b"[core]\n");
    write(&f.upper, ".git/config", b"[core]\n\tfsmonitor = evil\n");
    write(&f.upper, ".git/hooks/pre-commit", b"#!/bin/sh\nevil\n");
    write(&f.upper, "app/prod.env", b"X=1\n");
    write(&f.upper, "src/ok.rs", b"fn main() {}\n");
    let before = snapshot(&f.lower);
    let diff = compute_diff(&f.lower, &f.upper).unwrap();

    let err = apply(&diff, &f.upper, &f.lower, &protected_opts(false)).unwrap_err();
    assert!(err.to_string().contains("--allow-protected"), "{err}");
    let refused: Vec<PathBuf> = refusals(err).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        refused,
        vec![
            PathBuf::from(".git/config"),
            PathBuf::from(".git/hooks"),
            PathBuf::from(".git/hooks/pre-commit"),
            PathBuf::from("app/prod.env"),
        ]
    );
    assert_eq!(snapshot(&f.lower), before);

    apply(&diff, &f.upper, &f.lower, &protected_opts(true)).unwrap();
    assert_eq!(fs::read(f.lower.join(".git/hooks/pre-commit")).unwrap(), b"#!/bin/sh\nevil\n");
}

#[test]
fn deleting_a_dir_holding_protected_files_is_refused() {
    require_root!();
    let f = Fixture::new();
    write(&f.lower, "sub/.git/hooks/post-checkout", b"#!/bin/sh\n");
    write(&f.lower, "other/secrets.env", b"K=V\n");
    whiteout(&f.upper, "sub");
    // A forged diff that hides the children of the deleted directory.
    let diff = Diff { changes: vec![change("other", ChangeKind::Deleted, Some(EntryType::Dir), None)] };
    let refused = refusals(apply(&diff, &f.upper, &f.lower, &protected_opts(false)).unwrap_err());
    assert_eq!(
        refused,
        vec![(
            PathBuf::from("other"),
            RefusalReason::Protected { matched: PathBuf::from("other/secrets.env") }
        )]
    );
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let refused = refusals(apply(&diff, &f.upper, &f.lower, &protected_opts(false)).unwrap_err());
    assert!(refused.iter().any(|(p, _)| p == Path::new("sub")), "{refused:?}");
    assert!(f.lower.join("sub/.git/hooks/post-checkout").exists());
}

#[test]
fn git_replaced_by_a_file_is_refused() {
    let f = Fixture::new();
    write(&f.lower, ".git/HEAD", b"ref\n");
    write(&f.upper, ".git", b"gitdir: /tmp/evil\n");
    write(&f.upper, "vendor/lib/.git", b"gitdir: /tmp/evil\n");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let refused = refusals(apply(&diff, &f.upper, &f.lower, &opts()).unwrap_err());
    let git: Vec<_> =
        refused.iter().filter(|(_, r)| *r == RefusalReason::GitReplaced).map(|(p, _)| p.clone()).collect();
    assert_eq!(git, vec![PathBuf::from(".git"), PathBuf::from("vendor/lib/.git")]);
    assert!(f.lower.join(".git/HEAD").exists());
}

#[test]
fn one_bad_entry_among_good_ones_changes_nothing() {
    let f = Fixture::new();
    write(&f.lower, "a.txt", b"a\n");
    write(&f.lower, "gone.txt", b"g\n");
    write(&f.lower, "dir/x", b"x\n");
    symlink(&f.lower, "ln", "a.txt");
    write(&f.upper, "a.txt", b"changed\n");
    write(&f.upper, "dir/y", b"new\n");
    write(&f.upper, "zz/new", b"new\n");
    symlink(&f.upper, "zz/escape", "/etc/passwd");
    let before = snapshot(&f.lower);
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    assert!(apply(&diff, &f.upper, &f.lower, &opts()).is_err());
    assert_eq!(snapshot(&f.lower), before);
}

#[test]
fn deleting_a_dir_with_a_symlink_to_outside_keeps_the_target() {
    require_root!();
    let f = Fixture::new();
    let outside = f.outside("outside");
    write(&outside, "important/data", b"keep me\n");
    write(&f.lower, "build/out.o", b"obj\n");
    symlink(&f.lower, "build/escape", outside.join("important").to_str().unwrap());
    whiteout(&f.upper, "build");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let report = apply(&diff, &f.upper, &f.lower, &opts()).unwrap();
    assert!(!f.lower.join("build").exists());
    assert_eq!(fs::read(outside.join("important/data")).unwrap(), b"keep me\n");
    assert!(report.deleted.contains(&PathBuf::from("build/escape")));
}

#[test]
fn conflicts_with_host_changes_are_refused() {
    let f = Fixture::new();
    write(&f.lower, "edited", b"v1\n");
    write(&f.upper, "edited", b"v2\n");
    write(&f.upper, "both-added", b"sandbox\n");
    write(&f.upper, "same-added", b"same\n");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    // The host moves on after the sandbox started.
    fs::remove_file(f.lower.join("edited")).unwrap();
    write(&f.lower, "both-added", b"host\n");
    write(&f.lower, "same-added", b"same\n");
    let refused = refusals(apply(&diff, &f.upper, &f.lower, &opts()).unwrap_err());
    let paths: Vec<_> = refused.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(paths, vec![PathBuf::from("both-added"), PathBuf::from("edited")]);
    assert!(refused.iter().all(|(_, r)| matches!(r, RefusalReason::Conflict(_))));

    // Without the real conflicts, an identical addition is not one.
    fs::remove_file(f.lower.join("both-added")).unwrap();
    write(&f.lower, "edited", b"v1\n");
    let report = apply(&diff, &f.upper, &f.lower, &opts()).unwrap();
    assert_eq!(report.unchanged, vec![PathBuf::from("same-added")]);
    assert_eq!(fs::read(f.lower.join("edited")).unwrap(), b"v2\n");
}

#[test]
fn upper_changed_after_diff_is_refused() {
    let f = Fixture::new();
    write(&f.upper, "a", b"short\n");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    write(&f.upper, "a", b"much longer content now\n");
    let refused = refusals(apply(&diff, &f.upper, &f.lower, &opts()).unwrap_err());
    assert!(matches!(refused[0].1, RefusalReason::UpperMismatch(_)));
}

#[test]
fn hostile_but_legal_names_are_applied_verbatim() {
    let f = Fixture::new();
    let name = os(b"new\nline \xff.txt");
    fs::write(f.upper.join(name), b"x\n").unwrap();
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    apply(&diff, &f.upper, &f.lower, &opts()).unwrap();
    assert_eq!(fs::read(f.lower.join(name)).unwrap(), b"x\n");
}

#[test]
fn failed_write_rolls_back_for_real() {
    // As root, permissions do not stop writes; a mount point does: it
    // cannot be renamed aside (EBUSY), which fails the apply midway.
    require_root!();
    let f = Fixture::new();
    write(&f.lower, "a.txt", b"a\n");
    write(&f.lower, "old/x", b"x\n");
    write(&f.lower, "zz-mounted", b"host\n");
    write(&f.upper, "a.txt", b"A\n");
    write(&f.upper, "b/new", b"n\n");
    whiteout(&f.upper, "old");
    write(&f.upper, "zz-mounted", b"sandbox\n");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let src = f.outside("bind-src");
    write(&src, "file", b"host\n");
    let target = f.lower.join("zz-mounted");
    rustix::mount::mount_bind(src.join("file"), &target).unwrap();
    let before = snapshot(&f.lower);
    let result = apply(&diff, &f.upper, &f.lower, &opts());
    let after = snapshot(&f.lower);
    rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH).unwrap();
    match result {
        Err(ApplyError::Write { path, rollback_errors, .. }) => {
            assert_eq!(path, PathBuf::from("zz-mounted"));
            assert!(rollback_errors.is_empty(), "{rollback_errors:?}");
        }
        other => panic!("expected a write failure, got {other:?}"),
    }
    assert_eq!(after, before, "rolled back to byte-identical");
}

/// `expect` binds the apply to a reviewed digest: a change that differs in
/// any way (here: content, a file more, a mode) is refused, nothing written.
#[test]
fn a_wrong_expectation_writes_nothing() {
    let f = Fixture::new();
    write(&f.lower, "a.txt", b"old\n");
    write(&f.upper, "a.txt", b"reviewed\n");
    let reviewed = compute_diff(&f.lower, &f.upper).unwrap().digest();
    let before = snapshot(&f.lower);
    let edits: [(&str, &dyn Fn()); 3] = [
        ("content", &|| write(&f.upper, "a.txt", b"REVIEWED\n")),
        ("a file more", &|| write(&f.upper, "extra.txt", b"x\n")),
        ("a mode", &|| {
            fs::set_permissions(f.upper.join("a.txt"), fs::Permissions::from_mode(0o755)).unwrap()
        }),
    ];
    for (what, edit) in edits {
        edit();
        let diff = compute_diff(&f.lower, &f.upper).unwrap();
        let found = diff.digest();
        assert_ne!(found, reviewed, "{what}");
        let opts = ApplyOptions { expect: Some(reviewed), ..opts() };
        for result in [
            check_apply(&diff, &f.upper, &f.lower, &opts).map(|_| ()),
            apply(&diff, &f.upper, &f.lower, &opts).map(|_| ()),
        ] {
            match result {
                Err(e @ ApplyError::DigestMismatch { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&found.to_string()) && msg.contains(&reviewed.to_string()), "{msg}");
                    assert!(msg.contains("nothing was written") && msg.contains("airlock diff"), "{msg}");
                }
                other => panic!("{what}: expected a digest mismatch, got {other:?}"),
            }
        }
        assert_eq!(snapshot(&f.lower), before, "{what}: something was written");
    }
    // The digest of the change as it now is applies it, and is reported.
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let report =
        apply(&diff, &f.upper, &f.lower, &ApplyOptions { expect: Some(diff.digest()), ..opts() }).unwrap();
    assert_eq!(report.digest, Some(diff.digest()));
    assert_eq!(fs::read(f.lower.join("a.txt")).unwrap(), b"REVIEWED\n");
}

/// A record that writes a file without naming its content's hash cannot
/// be held to the review: refused.
#[test]
fn a_file_record_without_its_hash_is_refused() {
    let f = Fixture::new();
    write(&f.upper, "new.txt", b"x\n");
    let diff = Diff { changes: vec![change("new.txt", ChangeKind::Added, None, Some(EntryType::File))] };
    let refused = refusals(apply(&diff, &f.upper, &f.lower, &opts()).unwrap_err());
    assert!(matches!(refused[0].1, RefusalReason::Malformed(m) if m.contains("hash")), "{refused:?}");
    assert!(snapshot(&f.lower).is_empty());
}

/// A sandbox that keeps rewriting its file while apply copies it: every
/// apply either writes the reviewed bytes or refuses and leaves the
/// workspace as it was; the other content never lands.
#[test]
fn apply_while_the_layer_is_rewritten_writes_the_reviewed_bytes_or_nothing() {
    use std::io::{Seek, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let f = Fixture::new();
    // Big enough that a copy takes many reads, so the writer interleaves.
    let reviewed = vec![b'a'; 4 << 20];
    let other = vec![b'b'; 4 << 20];
    write(&f.lower, "big.bin", b"host\n");
    write(&f.upper, "big.bin", &reviewed);
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let expect = diff.digest();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), f.upper.join("big.bin"));
        let (reviewed, other) = (reviewed.clone(), other.clone());
        std::thread::spawn(move || {
            let mut file = fs::OpenOptions::new().write(true).open(path).unwrap();
            while !stop.load(Ordering::Relaxed) {
                for content in [&other, &reviewed] {
                    file.rewind().unwrap();
                    file.write_all(content).unwrap();
                }
            }
        })
    };
    let (mut applied, mut refused) = (0, 0);
    for _ in 0..20 {
        match apply(&diff, &f.upper, &f.lower, &ApplyOptions { expect: Some(expect), ..opts() }) {
            Ok(report) => {
                assert_eq!(report.digest, Some(expect));
                assert!(fs::read(f.lower.join("big.bin")).unwrap() == reviewed, "unreviewed bytes written");
                applied += 1;
                write(&f.lower, "big.bin", b"host\n");
            }
            Err(ApplyError::ChangedWhileApplying { rollback_errors, .. }) => {
                assert!(rollback_errors.is_empty(), "{rollback_errors:?}");
                assert_eq!(fs::read(f.lower.join("big.bin")).unwrap(), b"host\n");
                refused += 1;
            }
            Err(other) => panic!("unexpected {other}"),
        }
        let leftovers: Vec<_> =
            snapshot(&f.lower).into_keys().filter(|p| p.to_string_lossy().contains(".airlock-")).collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    eprintln!("{applied} applied with the reviewed bytes, {refused} refused");
    assert!(refused > 0, "the rewriting never overlapped a copy: the test did not test");
}
