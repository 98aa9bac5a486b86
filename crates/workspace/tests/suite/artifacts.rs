//! capture_artifacts: files from the merged view, never through links.

use std::fs;
use std::path::PathBuf;

use airlock_workspace::{WorkspaceError, capture_artifacts};

use super::common::*;
use crate::require_root;

#[test]
fn copies_matching_files_from_the_merged_view() {
    require_root!();
    let f = Fixture::new();
    write(&f.lower, "reports/old.xml", b"lower old\n");
    write(&f.lower, "reports/hidden.xml", b"deleted in sandbox\n");
    write(&f.lower, "reports/replaced.xml", b"lower\n");
    write(&f.lower, "opaque/gone.xml", b"hidden by opaque\n");
    write(&f.lower, "src/main.rs", b"fn main() {}\n");
    write(&f.upper, "reports/replaced.xml", b"upper\n");
    whiteout(&f.upper, "reports/hidden.xml");
    write(&f.upper, "reports/new.xml", b"new\n");
    write(&f.upper, "opaque/kept.xml", b"kept\n");
    opaque(&f.upper, "opaque");
    let secret = f.outside("secret");
    write(&secret, "key.xml", b"secret\n");
    symlink(&f.upper, "reports/leak.xml", secret.join("key.xml").to_str().unwrap());
    symlink(&f.upper, "linkdir", secret.to_str().unwrap());

    let dest = f.root.join("artifacts");
    let globs = vec!["**/*.xml".to_string(), "linkdir/**".to_string()];
    let mut copied = capture_artifacts(&f.upper, &f.lower, &globs, &dest, 1 << 20).unwrap();
    copied.sort();
    assert_eq!(
        copied,
        vec![
            PathBuf::from("opaque/kept.xml"),
            PathBuf::from("reports/new.xml"),
            PathBuf::from("reports/old.xml"),
            PathBuf::from("reports/replaced.xml"),
        ]
    );
    assert_eq!(fs::read(dest.join("reports/replaced.xml")).unwrap(), b"upper\n");
    assert!(!dest.join("reports/leak.xml").exists());
    assert!(!dest.join("linkdir").exists());
}

#[test]
fn stops_at_the_size_budget() {
    let f = Fixture::new();
    write(&f.upper, "a.log", &[b'a'; 600]);
    write(&f.upper, "b.log", &[b'b'; 600]);
    let dest = f.root.join("artifacts");
    let err = capture_artifacts(&f.upper, &f.lower, &["*.log".to_string()], &dest, 1000).unwrap_err();
    match err {
        WorkspaceError::ArtifactLimit { limit, skipped, copied } => {
            assert_eq!(limit, 1000);
            assert_eq!(skipped, PathBuf::from("b.log"));
            assert_eq!(copied, vec![PathBuf::from("a.log")]);
        }
        other => panic!("expected ArtifactLimit, got {other}"),
    }
    assert!(!dest.join("b.log").exists());
}

#[test]
fn invalid_glob_is_reported() {
    let f = Fixture::new();
    let err = capture_artifacts(&f.upper, &f.lower, &["a[".to_string()], &f.root.join("d"), 10).unwrap_err();
    assert!(matches!(err, WorkspaceError::InvalidGlob { .. }), "{err}");
}
