//! persist_layer: a layer copied to disk means the same as the original.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use airlock_workspace::{WorkspaceError, compute_diff, persist_layer};

use super::common::*;
use crate::require_root;

#[test]
fn whiteouts_opaque_dirs_modes_and_links_survive() {
    require_root!();
    let f = Fixture::new();
    write(&f.lower, "gone", b"g\n");
    write(&f.lower, "d/old", b"o\n");
    write(&f.lower, "m", b"m\n");
    whiteout(&f.upper, "gone");
    write(&f.upper, "d/new", b"n\n");
    opaque(&f.upper, "d");
    write_mode(&f.upper, "m", b"m\n", 0o700);
    write_mode(&f.upper, "suid", b"s\n", 0o4755);
    symlink(&f.upper, "link", "/etc/shadow");
    fs::set_permissions(f.upper.join("d"), fs::Permissions::from_mode(0o750)).unwrap();
    rustix::fs::chownat(
        rustix::fs::CWD,
        f.upper.join("m"),
        Some(rustix::fs::Uid::from_raw(100_000)),
        Some(rustix::fs::Gid::from_raw(100_000)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();

    let to = f.root.join("disk/layer");
    persist_layer(&f.upper, &to).unwrap();

    let gone = fs::symlink_metadata(to.join("gone")).unwrap();
    assert!(gone.file_type().is_char_device());
    assert_eq!(gone.rdev(), 0);
    let mut opaque = [0u8; 8];
    let n = rustix::fs::lgetxattr(to.join("d"), "trusted.overlay.opaque", &mut opaque[..]).unwrap();
    assert_eq!(&opaque[..n], b"y");
    let mode = |p: &str| fs::symlink_metadata(to.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("m"), 0o700);
    assert_eq!(mode("d"), 0o750);
    assert_eq!(mode("suid"), 0o755, "setuid stripped");
    assert_eq!(fs::symlink_metadata(to.join("m")).unwrap().uid(), 100_000);
    assert_eq!(fs::read_link(to.join("link")).unwrap().to_str(), Some("/etc/shadow"));

    let original = compute_diff(&f.lower, &f.upper).unwrap();
    let copy = compute_diff(&f.lower, &to).unwrap();
    // Only the stripped setuid bit differs.
    let strip = |d: &airlock_workspace::Diff| {
        d.changes.iter().map(|c| (c.path.clone(), c.kind, c.new_mode.map(|m| m & 0o777))).collect::<Vec<_>>()
    };
    assert_eq!(strip(&original), strip(&copy));
}

#[test]
fn fifos_are_kept_as_inert_nodes_that_apply_refuses() {
    use std::os::unix::fs::FileTypeExt;
    let f = Fixture::new();
    write(&f.upper, "a", b"a\n");
    fifo(&f.upper, "pipe");
    let to = f.root.join("copy");
    persist_layer(&f.upper, &to).unwrap();
    assert!(std::fs::symlink_metadata(to.join("pipe")).unwrap().file_type().is_fifo());
    let diff = compute_diff(&f.lower, &to).unwrap();
    let err = airlock_workspace::apply(&diff, &to, &f.lower, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("pipe"), "{err}");
    assert!(!f.lower.join("a").exists(), "partial apply");
}

#[test]
fn existing_destination_is_refused() {
    let f = Fixture::new();
    let to = f.outside("exists");
    let err = persist_layer(&f.upper, &to).unwrap_err();
    assert!(matches!(err, WorkspaceError::DestinationExists { .. }), "{err}");
}

/// A microVM's guest sees the directory that holds its upper layer and can
/// put a link to any host path in its place: persist, diff, apply and
/// artifact capture refuse that layer rather than read where it points.
#[test]
fn an_upper_layer_replaced_by_a_symlink_is_refused_not_followed() {
    let f = Fixture::new();
    let host = f.outside("host");
    write(&host, "secret", b"host only\n");
    let upper = f.root.join("swapped");
    std::os::unix::fs::symlink(&host, &upper).unwrap();

    let to = f.root.join("copy");
    let err = persist_layer(&upper, &to).unwrap_err();
    assert!(err.to_string().contains("open layer"), "{err}");
    assert!(!to.join("secret").exists(), "the link's target was copied");
    let err = compute_diff(&f.lower, &upper).unwrap_err();
    assert!(err.to_string().contains("open upper layer"), "{err}");
    let diff = compute_diff(&f.lower, &f.upper).unwrap();
    assert!(airlock_workspace::apply(&diff, &upper, &f.lower, &Default::default()).is_err());
    let dest = f.root.join("artifacts");
    assert!(airlock_workspace::capture_artifacts(&upper, &f.lower, &["*".into()], &dest, 1 << 20).is_err());
    assert!(!f.lower.join("secret").exists() && !dest.join("secret").exists());
}
