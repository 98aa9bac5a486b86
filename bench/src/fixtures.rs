//! What the benchmarks run on: the scratch directory, workspace trees of a
//! given size, and a minimal OCI bundle for runc.

use std::fs::{self, DirBuilder, Permissions};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::BenchError;
use crate::measure;

/// Files at the top of every tree that the diff benchmark's sandbox appends to.
pub const TOUCHED: usize = 10;

/// Creates `dir` (and missing parents) with mode 0755, whatever the umask.
pub fn make_dir_0755(dir: &Path) -> Result<(), BenchError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| BenchError::new(format!("cannot create {}: {e}", dir.display())))?;
    fs::set_permissions(dir, Permissions::from_mode(0o755))
        .map_err(|e| BenchError::new(format!("cannot chmod {}: {e}", dir.display())))
}

/// The first existing ancestor of `dir` (or `dir` itself) that others cannot
/// traverse, if any. airlock refuses a state directory below one of those.
pub fn untraversable_ancestor(dir: &Path) -> Option<(PathBuf, u32)> {
    dir.ancestors()
        .filter_map(|a| fs::metadata(a).ok().map(|m| (a, m.permissions().mode())))
        .find_map(|(a, mode)| if mode & 0o001 == 0 { Some((a.to_path_buf(), mode & 0o7777)) } else { None })
}

/// Picks the directory that holds this run's trees and state directories:
/// the one asked for, else a `bench-work` directory in the cargo target
/// directory, else one under the system temp directory. Every ancestor must be
/// o+x, since airlock checks that of its state directory.
pub fn choose_work_root(
    requested: Option<&Path>,
    airlock: &Path,
) -> Result<(PathBuf, Vec<String>), BenchError> {
    let mut notes = Vec::new();
    if let Some(dir) = requested {
        let dir = absolute(dir)?;
        if let Some((bad, mode)) = untraversable_ancestor(&dir) {
            return Err(BenchError::new(format!(
                "--work-dir {}: {} has mode {mode:o}; airlock needs every parent of its state directory \
                 to be o+x (chmod o+x {}, or choose another --work-dir)",
                dir.display(),
                bad.display(),
                bad.display()
            )));
        }
        return Ok((dir, notes));
    }
    let mut candidates = Vec::new();
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        candidates.push(absolute(Path::new(&target))?.join("bench-work"));
    }
    // <target>/release/airlock → <target>/bench-work
    if let Some(target) = airlock.parent().and_then(Path::parent) {
        candidates.push(target.join("bench-work"));
    }
    for dir in candidates {
        match untraversable_ancestor(&dir) {
            None => return Ok((dir, notes)),
            Some((bad, mode)) => notes.push(format!(
                "not using {}: {} has mode {mode:o} (not o+x)",
                dir.display(),
                bad.display()
            )),
        }
    }
    let fallback = std::env::temp_dir().join("airlock-bench");
    notes.push(format!("using {} for scratch files", fallback.display()));
    Ok((fallback, notes))
}

fn absolute(p: &Path) -> Result<PathBuf, BenchError> {
    std::path::absolute(p).map_err(|e| BenchError::new(format!("{}: {e}", p.display())))
}

/// Writes a tree of exactly `files` small files under `root`: `f1`…`f10` at
/// the top (the ones the diff benchmark's sandbox changes), the rest spread
/// over subdirectories of at most 1000 files each.
pub fn make_tree(root: &Path, files: usize) -> Result<(), BenchError> {
    let err = |p: &Path, e: std::io::Error| BenchError::new(format!("cannot write {}: {e}", p.display()));
    make_dir_0755(root)?;
    let top = files.min(TOUCHED);
    for i in 1..=top {
        let p = root.join(format!("f{i}"));
        fs::write(&p, format!("file {i}\n")).map_err(|e| err(&p, e))?;
    }
    let rest = files - top;
    let per_dir = 1000;
    for d in 0..rest.div_ceil(per_dir) {
        let dir = root.join(format!("d{d:04}"));
        make_dir_0755(&dir)?;
        let in_this = per_dir.min(rest - d * per_dir);
        for i in 0..in_this {
            let p = dir.join(format!("file{i:04}.txt"));
            fs::write(&p, format!("{d} {i}\n")).map_err(|e| err(&p, e))?;
        }
    }
    Ok(())
}

/// Looks a program up in `$PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| {
        fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
    })
}

/// How the runc bundle's root filesystem got its `/bin/true`.
pub enum RootfsKind {
    /// The host's `/bin/true` and the libraries `ldd` lists.
    HostTrue { libs: usize },
    /// A static busybox, linked as `/bin/true`.
    Busybox,
}

impl std::fmt::Display for RootfsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootfsKind::HostTrue { libs } => write!(f, "host /bin/true + {libs} libs from ldd"),
            RootfsKind::Busybox => write!(f, "static busybox"),
        }
    }
}

/// Builds a root filesystem holding just enough to run `/bin/true`.
pub fn make_rootfs(rootfs: &Path) -> Result<RootfsKind, BenchError> {
    make_dir_0755(&rootfs.join("bin"))?;
    match copy_host_true(rootfs) {
        Ok(libs) => Ok(RootfsKind::HostTrue { libs }),
        Err(host_err) => {
            let Some(busybox) = find_in_path("busybox") else {
                return Err(BenchError::new(format!("{host_err}; and no busybox to fall back on")));
            };
            copy_file(&busybox, &rootfs.join("bin/busybox"))?;
            std::os::unix::fs::symlink("busybox", rootfs.join("bin/true"))
                .map_err(|e| BenchError::new(format!("cannot link busybox as true: {e}")))?;
            Ok(RootfsKind::Busybox)
        }
    }
}

fn copy_host_true(rootfs: &Path) -> Result<usize, BenchError> {
    let host_true = fs::canonicalize("/bin/true").map_err(|e| BenchError::new(format!("/bin/true: {e}")))?;
    let mut ldd = Command::new("ldd");
    ldd.arg(&host_true);
    let listing = measure::checked(ldd, "ldd /bin/true")?;
    let libs = ldd_paths(&listing);
    copy_file(&host_true, &rootfs.join("bin/true"))?;
    for lib in &libs {
        let rel = lib.strip_prefix("/").unwrap_or(lib);
        copy_file(lib, &rootfs.join(rel))?;
    }
    Ok(libs.len())
}

/// The absolute paths in `ldd` output: `libc.so.6 => /lib/…/libc.so.6 (0x…)`
/// and `/lib64/ld-linux-x86-64.so.2 (0x…)`; the vDSO has none.
fn ldd_paths(listing: &str) -> Vec<PathBuf> {
    listing
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn copy_file(from: &Path, to: &Path) -> Result<(), BenchError> {
    if let Some(parent) = to.parent() {
        make_dir_0755(parent)?;
    }
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| BenchError::new(format!("cannot copy {} to {}: {e}", from.display(), to.display())))
}

/// Creates an OCI bundle in `bundle` whose container runs `/bin/true`: a
/// rootfs from [`make_rootfs`], `runc spec` (rootless unless we are root),
/// made non-interactive, plus a read-write bind mount of `workspace` if given.
pub fn make_runc_bundle(
    runc: &Path,
    bundle: &Path,
    workspace: Option<&Path>,
) -> Result<RootfsKind, BenchError> {
    make_dir_0755(bundle)?;
    let kind = make_rootfs(&bundle.join("rootfs"))?;
    let mut spec = Command::new(runc);
    spec.arg("spec").arg("--bundle").arg(bundle);
    if !is_root() {
        spec.arg("--rootless");
    }
    measure::checked(spec, "runc spec")?;
    let config_path = bundle.join("config.json");
    let text = fs::read_to_string(&config_path)
        .map_err(|e| BenchError::new(format!("cannot read {}: {e}", config_path.display())))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| BenchError::new(format!("{}: {e}", config_path.display())))?;
    let process = config
        .get_mut("process")
        .and_then(|p| p.as_object_mut())
        .ok_or_else(|| BenchError::new("runc spec wrote no process section"))?;
    process.insert("terminal".into(), serde_json::Value::Bool(false));
    process.insert("args".into(), serde_json::json!(["/bin/true"]));
    if let Some(ws) = workspace {
        let mounts = config
            .get_mut("mounts")
            .and_then(|m| m.as_array_mut())
            .ok_or_else(|| BenchError::new("runc spec wrote no mounts section"))?;
        mounts.push(serde_json::json!({
            "destination": ws,
            "type": "bind",
            "source": ws,
            "options": ["rbind", "rw"],
        }));
    }
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| BenchError::new(format!("cannot encode runc config: {e}")))?;
    fs::write(&config_path, text)
        .map_err(|e| BenchError::new(format!("cannot write {}: {e}", config_path.display())))?;
    Ok(kind)
}

pub fn is_root() -> bool {
    euid() == 0
}

/// The harness's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ldd_paths_skip_the_vdso() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(out),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn tree_has_exactly_the_files_asked_for() {
        let dir = std::env::temp_dir().join(format!("airlock-bench-tree-{}", std::process::id()));
        make_tree(&dir, 2345).unwrap();
        let mut count = 0;
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    count += 1;
                }
            }
        }
        assert_eq!(count, 2345);
        assert!(dir.join("f10").is_file());
        fs::remove_dir_all(&dir).unwrap();
    }
}
