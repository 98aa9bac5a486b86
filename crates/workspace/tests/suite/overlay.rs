//! One end-to-end check against a real overlayfs mount.

use std::fs;
use std::path::PathBuf;

use airlock_workspace::{ApplyOptions, ChangeKind, apply, compute_diff};

use super::common::*;
use crate::require_root;

#[test]
fn real_overlay_upper_layer_diffs_and_applies() {
    require_root!();
    let f = Fixture::new();
    write(&f.lower, "keep.txt", b"keep\n");
    write(&f.lower, "edit.txt", b"one\n");
    write(&f.lower, "rm.txt", b"bye\n");
    write(&f.lower, "tree/a", b"a\n");
    write(&f.lower, "tree/b", b"b\n");
    write_mode(&f.lower, "chmod.sh", b"#!/bin/sh\n", 0o644);
    let work = f.outside("work");
    let merged = f.outside("merged");
    let data =
        format!("lowerdir={},upperdir={},workdir={}", f.lower.display(), f.upper.display(), work.display());
    let data = std::ffi::CString::new(data).unwrap();
    let mounted = rustix::mount::mount(
        "overlay",
        &merged,
        "overlay",
        rustix::mount::MountFlags::empty(),
        Some(data.as_c_str()),
    );
    if let Err(e) = mounted {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("overlay mount failed: {e}");
        }
        eprintln!("skipping: cannot mount overlayfs here: {e}");
        return;
    }
    let writes = (|| -> std::io::Result<()> {
        fs::write(merged.join("edit.txt"), b"one\ntwo\n")?;
        fs::remove_file(merged.join("rm.txt"))?;
        fs::remove_dir_all(merged.join("tree"))?;
        fs::create_dir(merged.join("tree"))?;
        fs::write(merged.join("tree/c"), b"c\n")?;
        fs::write(merged.join("new.txt"), b"new\n")?;
        fs::set_permissions(merged.join("chmod.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        Ok(())
    })();
    rustix::mount::unmount(&merged, rustix::mount::UnmountFlags::empty()).unwrap();
    writes.unwrap();

    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    let got: Vec<(PathBuf, ChangeKind)> = diff.changes.iter().map(|c| (c.path.clone(), c.kind)).collect();
    assert_eq!(
        got,
        vec![
            (PathBuf::from("chmod.sh"), ChangeKind::Modified),
            (PathBuf::from("edit.txt"), ChangeKind::Modified),
            (PathBuf::from("new.txt"), ChangeKind::Added),
            (PathBuf::from("rm.txt"), ChangeKind::Deleted),
            (PathBuf::from("tree/a"), ChangeKind::Deleted),
            (PathBuf::from("tree/b"), ChangeKind::Deleted),
            (PathBuf::from("tree/c"), ChangeKind::Added),
        ]
    );
    assert!(diff.changes[0].is_mode_only());

    apply(&diff, &f.upper, &f.lower, &ApplyOptions::default()).unwrap();
    let expected = f.outside("expected");
    write(&expected, "keep.txt", b"keep\n");
    write(&expected, "edit.txt", b"one\ntwo\n");
    write(&expected, "tree/c", b"c\n");
    write(&expected, "new.txt", b"new\n");
    write_mode(&expected, "chmod.sh", b"#!/bin/sh\n", 0o755);
    assert_eq!(snapshot(&f.lower), snapshot(&expected));
}
