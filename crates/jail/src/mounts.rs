//! The sandbox's root filesystem, built inside its own mount namespace.
//!
//! The order is part of the design:
//! 1. Make every mount private first, so nothing we do propagates to the host.
//! 2. Build the new root on a fresh tmpfs: read-only host system directories,
//!    a fresh /proc, a minimal /dev, private tmpfs for /tmp, /run and $HOME.
//! 3. Mask secrets and kernel knobs after their parents exist.
//! 4. Mount the workspace last: it may live below /tmp or /home, which only
//!    exist once step 2 has created them.
//! 5. pivot_root into the new root and detach the old one, then make the root
//!    tmpfs itself read-only.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, symlink};
use std::path::{Component, Path, PathBuf};

use rustix::mount::{
    MountFlags, MountPropagationFlags, MoveMountFlags, UnmountFlags, mount, mount_bind_recursive,
    mount_change, move_mount, unmount,
};

use crate::plan::{JailPlan, WorkspaceMountMode, WorkspaceSource};
use crate::sys;

/// Host paths that are never visible inside, whatever the policy says:
/// credentials, private keys and the host's administrative configuration.
pub const ALWAYS_HIDDEN: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/security/opasswd",
    "/etc/ssl/private",
    "/etc/ssh/ssh_host_rsa_key",
    "/etc/ssh/ssh_host_ecdsa_key",
    "/etc/ssh/ssh_host_ed25519_key",
    "/etc/ssh/ssh_host_dsa_key",
    "/etc/kubernetes",
    "/etc/docker",
    "/etc/containerd",
    "/etc/credstore",
    "/etc/credstore.encrypted",
    "/etc/wireguard",
    "/etc/NetworkManager/system-connections",
    "/etc/libvirt",
    "/etc/cloud",
];

/// Kernel interfaces below /proc that OCI runtimes mask: they leak host
/// memory, keys or timing, or let root poke the kernel.
const PROC_MASKED: &[&str] = &[
    "/proc/kcore",
    "/proc/keys",
    "/proc/key-users",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/latency_stats",
    "/proc/kallsyms",
    "/proc/kmsg",
    "/proc/acpi",
    "/proc/scsi",
    "/proc/asound",
    "/proc/firmware",
    "/proc/interrupts",
    "/proc/sysrq-trigger",
    "/proc/config.gz",
    "/sys/firmware",
    "/sys/kernel/debug",
    "/sys/kernel/security",
    "/sys/kernel/tracing",
    "/sys/devices/virtual/powercap",
];

/// Kernel interfaces that stay visible but read-only.
const PROC_READ_ONLY: &[&str] = &["/proc/sys", "/proc/irq", "/proc/bus", "/proc/fs"];

/// Device nodes bound from the host into the minimal /dev.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Directories that get a private, size-limited tmpfs.
const PRIVATE_TMPFS: &[&str] = &["/tmp", "/var/tmp", "/run", "/root", "/home"];

/// The sandbox's $HOME: root's home inside, empty.
pub const SANDBOX_HOME: &str = "/root";

#[derive(Debug, thiserror::Error)]
#[error("{step} ({path}): {source}")]
pub struct MountError {
    pub step: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

trait Context<T> {
    fn ctx(self, step: &'static str, path: &Path) -> Result<T, MountError>;
}

impl<T, E: Into<io::Error>> Context<T> for Result<T, E> {
    fn ctx(self, step: &'static str, path: &Path) -> Result<T, MountError> {
        self.map_err(|e| MountError { step, path: path.to_path_buf(), source: e.into() })
    }
}

/// `root` joined with an absolute in-sandbox path.
fn under(root: &Path, path: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for c in path.components() {
        if let Component::Normal(part) = c {
            out.push(part);
        }
    }
    out
}

fn cstr(path: &Path) -> Result<CString, MountError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
        .ctx("path contains a NUL byte", path)
}

fn mkdir_all(path: &Path) -> Result<(), MountError> {
    fs::DirBuilder::new().recursive(true).mode(0o755).create(path).ctx("create mount point", path)
}

fn touch(path: &Path) -> Result<(), MountError> {
    if let Some(parent) = path.parent() {
        mkdir_all(parent)?;
    }
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map(drop)
        .ctx("create file mount point", path)
}

/// mount(2) of a filesystem with string options.
fn mount_fs(source: &str, target: &Path, fstype: &str, flags: MountFlags, data: &str) -> io::Result<()> {
    let data = CString::new(data).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    mount(source, target, fstype, flags, Some(data.as_c_str())).map_err(io::Error::from)
}

fn tmpfs(target: &Path, size: u64, mode: u32, flags: MountFlags) -> Result<(), MountError> {
    let data = format!("size={size},mode={mode:o}");
    mount_fs("tmpfs", target, "tmpfs", flags, &data).ctx("mount tmpfs", target)
}

const SAFE: MountFlags = MountFlags::NOSUID.union(MountFlags::NODEV);

/// Makes a mount (and, with `recursive`, everything below it) read-only,
/// nosuid and nodev, keeping whatever flags the kernel locked.
fn make_read_only(target: &Path, recursive: bool) -> Result<(), MountError> {
    let flags = if recursive { libc::AT_RECURSIVE as libc::c_uint } else { 0 };
    let set = libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    sys::mount_setattr(None, &cstr(target)?, flags, set, 0, None).ctx("make read-only", target)
}

/// Binds a host path read-only at the same place under `root`. Symlinks
/// (e.g. /bin -> usr/bin on merged-/usr systems) are recreated, not followed.
fn bind_read_only(root: &Path, host: &Path) -> Result<(), MountError> {
    let meta = match fs::symlink_metadata(host) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx("inspect host path", host),
    };
    let target = under(root, host);
    if meta.file_type().is_symlink() {
        let link = fs::read_link(host).ctx("read host symlink", host)?;
        if let Some(parent) = target.parent() {
            mkdir_all(parent)?;
        }
        return match symlink(&link, &target) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e).ctx("recreate symlink", &target),
            _ => Ok(()),
        };
    }
    if meta.is_dir() {
        mkdir_all(&target)?;
    } else {
        touch(&target)?;
    }
    mount_bind_recursive(host, &target).ctx("bind host path", host)?;
    make_read_only(&target, true)
}

/// Hides `path` (already under the new root): an empty read-only tmpfs over
/// a directory, /dev/null over a file. Missing paths need no hiding.
fn mask(path: &Path) -> Result<(), MountError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    if meta.file_type().is_symlink() {
        // A symlink cannot be mounted over; its target is masked on its own
        // if it is sensitive, and it resolves inside the new root anyway.
        return Ok(());
    }
    if meta.is_dir() {
        mount_fs("tmpfs", path, "tmpfs", SAFE | MountFlags::NOEXEC | MountFlags::RDONLY, "size=4k,mode=000")
            .ctx("mask directory", path)
    } else {
        mount_bind_recursive("/dev/null", path).ctx("mask file", path)?;
        make_read_only(path, false)
    }
}

/// Builds the new root and pivots into it. Runs inside the sandbox's new
/// user and mount namespaces, as root of that user namespace.
pub fn build_root(plan: &JailPlan) -> Result<(), MountError> {
    let slash = Path::new("/");
    mount_change(slash, MountPropagationFlags::PRIVATE | MountPropagationFlags::REC)
        .ctx("make all mounts private", slash)?;

    let mountpoint = plan.root_mountpoint.as_path();
    tmpfs(mountpoint, 16 << 20, 0o755, SAFE)?;
    let image_root;
    let root = if plan.image_layers.is_empty() {
        for host in &plan.read_only {
            bind_read_only(mountpoint, host)?;
        }
        mountpoint
    } else {
        image_root = mount_image(mountpoint, plan)?;
        image_root.as_path()
    };

    // /proc for the new PID namespace. mount(2) of proc is only allowed when
    // this namespace already sees a fully visible /proc, which it does: the
    // host's is still mounted at /proc at this point.
    let proc_dir = under(root, Path::new("/proc"));
    mkdir_all(&proc_dir)?;
    // Read-only: nothing inside needs to write /proc, and a writable one
    // would let a process lower its own OOM score to the agent's floor
    // where Landlock is not there to stop it.
    mount_fs("proc", &proc_dir, "proc", SAFE | MountFlags::NOEXEC | MountFlags::RDONLY, "")
        .ctx("mount /proc", &proc_dir)?;

    // /sys, read-only. A kernel that refuses sysfs here (it does when /sys is
    // partly hidden on the host) leaves an empty directory: no tool we know of
    // needs /sys to run, and failing closed is the safer default.
    let sys_dir = under(root, Path::new("/sys"));
    mkdir_all(&sys_dir)?;
    if let Err(e) = mount_fs("sysfs", &sys_dir, "sysfs", SAFE | MountFlags::NOEXEC | MountFlags::RDONLY, "") {
        tracing::debug!("sysfs not mounted inside the sandbox: {e}");
    }

    build_dev(root, plan.tmp_size)?;

    for dir in PRIVATE_TMPFS {
        let target = under(root, Path::new(dir));
        mkdir_all(&target)?;
        let mode = if *dir == "/tmp" || *dir == "/var/tmp" { 0o1777 } else { 0o755 };
        tmpfs(&target, plan.tmp_size, mode, SAFE)?;
    }
    // Programs that expect /var/run find the private /run.
    let var_run = under(root, Path::new("/var/run"));
    if fs::symlink_metadata(&var_run).is_err() {
        symlink("../run", &var_run).ctx("create /var/run", &var_run)?;
    }

    let hidden = ALWAYS_HIDDEN.iter().map(PathBuf::from).chain(plan.hidden.iter().cloned());
    for path in hidden.chain(PROC_MASKED.iter().map(PathBuf::from)) {
        mask(&under(root, &path))?;
    }
    for path in PROC_READ_ONLY {
        let target = under(root, Path::new(path));
        if target.exists() {
            mount_bind_recursive(&target, &target).ctx("bind kernel knob", &target)?;
            make_read_only(&target, true)?;
        }
    }

    if let Some(ws) = &plan.workspace {
        mount_workspace(root, ws)?;
    }
    for file in &plan.files {
        bind_file(root, &file.source, &file.target)?;
    }

    pivot(root)
}

/// Mounts an image's layers as the root: a read-only overlay (no upper
/// layer, so nothing reaches the stored layers) of a skeleton holding the
/// mount points this function's caller needs, above the image's layers.
/// The skeleton and short links to the layers live on the tmpfs at
/// `mountpoint`; the overlay goes on `mountpoint/root`, which is returned.
/// The layer list is given relative to the tmpfs (the mount options are
/// one page at most), and with `userxattr` (the user namespace's overlay:
/// opaque directories are `user.overlay.opaque`, as the unpacker writes).
fn mount_image(mountpoint: &Path, plan: &JailPlan) -> Result<PathBuf, MountError> {
    let skeleton = mountpoint.join("skeleton");
    let merged = mountpoint.join("root");
    mkdir_all(&merged)?;
    let dirs = ["/proc", "/sys", "/dev", "/etc"].iter().chain(PRIVATE_TMPFS).map(PathBuf::from);
    for dir in dirs.chain(plan.workspace.iter().map(|ws| ws.path.clone())) {
        mkdir_all(&under(&skeleton, &dir))?;
    }
    for file in &plan.files {
        touch(&under(&skeleton, &file.target))?;
    }
    let var_run = under(&skeleton, Path::new("/var/run"));
    mkdir_all(&under(&skeleton, Path::new("/var")))?;
    symlink("../run", &var_run).ctx("create /var/run", &var_run)?;
    let links = mountpoint.join("l");
    mkdir_all(&links)?;
    for (n, layer) in plan.image_layers.iter().enumerate() {
        symlink(layer, links.join(n.to_string())).ctx("link image layer", layer)?;
    }
    rustix::process::chdir(mountpoint).ctx("enter the root's tmpfs", mountpoint)?;
    let data = image_overlay_options(plan.image_layers.len());
    mount_fs("overlay", &merged, "overlay", SAFE | MountFlags::RDONLY, &data)
        .ctx("mount image layers", &merged)?;
    rustix::process::chdir("/").ctx("leave the root's tmpfs", mountpoint)?;
    Ok(merged)
}

/// The most layers an image may have: overlayfs stacks at most 500 lower
/// layers (the kernel's OVL_MAX_STACK), and the skeleton is one of them.
/// Both tiers' overlay options for that many fit the page they are given
/// in.
pub const MAX_IMAGE_LAYERS: usize = 499;

/// The most bytes of options mount(2) passes a filesystem: one page, its
/// NUL included.
pub const MAX_MOUNT_OPTIONS: usize = 4095;

/// The options of an image's overlay of `layers` layers, relative to the
/// root's tmpfs: the skeleton on top, then `l/0`, `l/1`… (the plan's
/// layers, top first).
fn image_overlay_options(layers: usize) -> String {
    let mut lower = String::from("skeleton");
    for n in 0..layers {
        lower.push_str(&format!(":l/{n}"));
    }
    format!("lowerdir={lower},userxattr")
}

/// Makes a fresh, otherwise empty root holding only `files` and pivots into
/// it: a tmpfs mounted over `mountpoint` (any existing directory: it is
/// only covered in this mount namespace), each host file that exists bound
/// read-only at its own path (symlinks followed, so the file itself is
/// seen), then the root itself made read-only. For airlock's own host-side
/// processes (the egress proxy): run in a new mount namespace the caller
/// holds CAP_SYS_ADMIN over. Nothing else of the host's tree stays
/// reachable: no /proc, /sys, /dev, home or state directory.
pub fn enter_file_root(mountpoint: &Path, files: &[PathBuf]) -> Result<(), MountError> {
    check_not_below(mountpoint, files)?;
    let slash = Path::new("/");
    mount_change(slash, MountPropagationFlags::PRIVATE | MountPropagationFlags::REC)
        .ctx("make all mounts private", slash)?;
    tmpfs(mountpoint, 1 << 20, 0o755, SAFE | MountFlags::NOEXEC)?;
    for file in files {
        match fs::metadata(file) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).ctx("inspect host file", file),
        }
        let target = under(mountpoint, file);
        touch(&target)?;
        mount_bind_recursive(file.as_path(), &target).ctx("bind host file", file)?;
        make_read_only(&target, false)?;
    }
    pivot(mountpoint)
}

/// What one of airlock's host-side programs (QEMU) sees, each path at its
/// own place in an otherwise empty root: see [`enter_view`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Files and directories bound read-only (directories with what is
    /// mounted below them); symlinks followed, so the path's target is seen
    /// at the path. One below a directory already listed is seen through it.
    pub read_only: Vec<PathBuf>,
    /// Directories (or files) bound writable (nosuid, nodev, noexec).
    pub writable: Vec<PathBuf>,
    /// Device nodes bound as they are (nosuid, noexec; not nodev, or they
    /// could not be opened).
    pub devices: Vec<PathBuf>,
    /// Paths masked once the rest is in place (see the sandbox's masks).
    pub hidden: Vec<PathBuf>,
    /// A /proc of the process's own PID namespace, read-only (virtiofsd
    /// reaches its open files through /proc/self/fd).
    pub proc: bool,
    /// Host directories bound read-only at another place of the view
    /// (a microVM's image layers, gathered under one directory that QEMU
    /// shares whole). Each must exist; no other path of the view may lie in
    /// or above a place.
    pub read_only_at: Vec<BindAt>,
}

/// A host directory seen at another path of a [`View`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BindAt {
    pub host: PathBuf,
    pub at: PathBuf,
}

/// Makes a fresh root holding only `view` and pivots into it: a tmpfs over
/// `mountpoint` (an existing directory no path of the view lies in or
/// above: it is covered only in this mount namespace), the view's paths
/// bound at their own places, masks, then the root made read-only. Nothing
/// else of the host's tree stays reachable: no /proc, /sys, /dev, home or
/// state directory. Runs in a new mount namespace the caller holds
/// CAP_SYS_ADMIN over. A read-only path that does not exist is left out; a
/// writable one or a device that does not exist is an error.
pub fn enter_view(mountpoint: &Path, view: &View) -> Result<(), MountError> {
    enter_view_attaching(mountpoint, view, None)
}

/// A detached mount the host prepared (as root, an id-mapped tree of a
/// directory: the caller could not reach or map it itself), to be attached
/// in a view at `path`.
#[derive(Debug, Clone, Copy)]
pub struct Attach<'a> {
    pub tree: std::os::fd::BorrowedFd<'a>,
    pub path: &'a Path,
}

/// [`enter_view`], with `attach` attached writable (nosuid, nodev, noexec)
/// at its path, as a writable directory would be bound there.
pub fn enter_view_attaching(
    mountpoint: &Path,
    view: &View,
    attach: Option<Attach<'_>>,
) -> Result<(), MountError> {
    let attached = attach.map(|a| a.path.to_path_buf());
    let hosts = view.read_only_at.iter().map(|b| &b.host);
    let every = view.read_only.iter().chain(&view.writable).chain(&view.devices).chain(&attached);
    let every: Vec<PathBuf> = every.cloned().collect();
    check_apart(mountpoint, &every.iter().chain(hosts).cloned().collect::<Vec<_>>())?;
    check_places_apart(&view.read_only_at, &every)?;
    let slash = Path::new("/");
    mount_change(slash, MountPropagationFlags::PRIVATE | MountPropagationFlags::REC)
        .ctx("make all mounts private", slash)?;
    tmpfs(mountpoint, 1 << 20, 0o755, SAFE | MountFlags::NOEXEC)?;
    let mut read_only = view.read_only.clone();
    read_only.sort();
    let mut directories: Vec<&Path> = Vec::new();
    for path in &read_only {
        if directories.iter().any(|d| path.starts_with(d)) {
            continue;
        }
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).ctx("inspect host path", path),
        };
        let target = under(mountpoint, path);
        if meta.is_dir() {
            mkdir_all(&target)?;
            directories.push(path);
        } else {
            touch(&target)?;
        }
        mount_bind_recursive(path.as_path(), &target).ctx("bind host path", path)?;
        make_read_only(&target, true)?;
    }
    for BindAt { host, at } in &view.read_only_at {
        let target = under(mountpoint, at);
        mkdir_all(&target)?;
        mount_bind_recursive(host.as_path(), &target).ctx("bind host directory", host)?;
        make_read_only(&target, true)?;
    }
    for dir in &view.writable {
        let target = under(mountpoint, dir);
        if fs::symlink_metadata(&target).is_err() {
            // A file (a microVM's engine disk) is bound onto a file.
            if fs::metadata(dir).is_ok_and(|m| m.is_file()) {
                if let Some(parent) = target.parent() {
                    mkdir_all(parent)?;
                }
                touch(&target)?;
            } else {
                mkdir_all(&target)?;
            }
        }
        mount_bind_recursive(dir.as_path(), &target).ctx("bind writable directory", dir)?;
        let set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC;
        sys::mount_setattr(None, &cstr(&target)?, libc::AT_RECURSIVE as libc::c_uint, set, 0, None)
            .ctx("make writable directory nosuid", &target)?;
    }
    if let Some(Attach { tree, path }) = attach {
        let target = under(mountpoint, path);
        if fs::symlink_metadata(&target).is_err() {
            mkdir_all(&target)?;
        }
        move_mount(tree, c"", rustix::fs::CWD, &target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
            .ctx("attach the host's tree", path)?;
        let set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC;
        sys::mount_setattr(None, &cstr(&target)?, libc::AT_RECURSIVE as libc::c_uint, set, 0, None)
            .ctx("make the attached tree nosuid", &target)?;
    }
    for device in &view.devices {
        let target = under(mountpoint, device);
        if fs::symlink_metadata(&target).is_err() {
            touch(&target)?;
        }
        mount_bind_recursive(device.as_path(), &target).ctx("bind device", device)?;
        let set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NOEXEC;
        sys::mount_setattr(None, &cstr(&target)?, 0, set, 0, None).ctx("make device nosuid", &target)?;
    }
    if view.proc {
        let target = under(mountpoint, Path::new("/proc"));
        mkdir_all(&target)?;
        let flags = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        rustix::mount::mount("proc", &target, "proc", flags, None).ctx("mount proc", &target)?;
    }
    for path in &view.hidden {
        mask(&under(mountpoint, path))?;
    }
    pivot(mountpoint)
}

/// The first of `candidates` that is an existing directory neither in nor
/// above any of `paths`: a tmpfs mounted over it hides none of them.
pub fn mountpoint_apart<'a>(candidates: &[&'a str], paths: &[PathBuf]) -> Option<&'a Path> {
    candidates.iter().map(|c| Path::new(*c)).find(|c| c.is_dir() && check_apart(c, paths).is_ok())
}

/// A path in or above the mount point would be covered by the new root's
/// tmpfs (or cover it) before it is bound.
fn check_apart(mountpoint: &Path, paths: &[PathBuf]) -> Result<(), MountError> {
    check_not_below(mountpoint, paths)?;
    match paths.iter().find(|p| mountpoint.starts_with(p)) {
        Some(path) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the mount point {} lies in it", mountpoint.display()),
        ))
        .ctx("bind host path", path),
        None => Ok(()),
    }
}

/// A place of `binds` in or above a path of the view (or another place)
/// would hide it, or be made inside a host directory bound there.
fn check_places_apart(binds: &[BindAt], paths: &[PathBuf]) -> Result<(), MountError> {
    for (n, BindAt { at, .. }) in binds.iter().enumerate() {
        let others = binds.iter().enumerate().filter(|(m, _)| *m != n).map(|(_, b)| &b.at);
        if let Some(path) = paths.iter().chain(others).find(|p| p.starts_with(at) || at.starts_with(p)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("it lies in or above {}, another path of the view", path.display()),
            ))
            .ctx("place a host directory", at);
        }
    }
    Ok(())
}

/// A file below the mount point would be covered by the new root's tmpfs
/// before it is bound.
pub(crate) fn check_not_below(mountpoint: &Path, files: &[PathBuf]) -> Result<(), MountError> {
    match files.iter().find(|f| f.starts_with(mountpoint)) {
        Some(file) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it lies below the mount point {}", mountpoint.display()),
        ))
        .ctx("bind host file", file),
        None => Ok(()),
    }
}

fn build_dev(root: &Path, shm_size: u64) -> Result<(), MountError> {
    let dev = under(root, Path::new("/dev"));
    mkdir_all(&dev)?;
    tmpfs(&dev, 1 << 20, 0o755, MountFlags::NOSUID | MountFlags::NOEXEC)?;
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if !host.exists() {
            continue;
        }
        let target = dev.join(name);
        touch(&target)?;
        // A user namespace may not create device nodes; binding the host's
        // harmless ones is how every rootless runtime provides them.
        mount_bind_recursive(&host, &target).ctx("bind device", &host)?;
    }
    let pts = dev.join("pts");
    mkdir_all(&pts)?;
    mount_fs(
        "devpts",
        &pts,
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "newinstance,ptmxmode=0666,mode=620",
    )
    .ctx("mount devpts", &pts)?;
    let links: [(&str, &str); 5] = [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    for (name, target) in links {
        symlink(target, dev.join(name)).ctx("create /dev link", &dev.join(name))?;
    }
    let shm = dev.join("shm");
    mkdir_all(&shm)?;
    tmpfs(&shm, shm_size, 0o1777, SAFE | MountFlags::NOEXEC)?;
    Ok(())
}

fn mount_workspace(root: &Path, ws: &crate::plan::WorkspaceMount) -> Result<(), MountError> {
    let target = under(root, &ws.path);
    mkdir_all(&target)?;
    // First place the host directory at its path inside: the id-mapped tree
    // the supervisor prepared (root), or a bind of the host path (rootless,
    // where the caller owns the path anyway). For overlay it then serves as
    // the lower layer, and the overlay is mounted on top of it.
    match ws.source {
        WorkspaceSource::MountFd(fd) => {
            // SAFETY: the supervisor passed this descriptor to us at this
            // number and nothing else in the agent owns it.
            let tree = unsafe { OwnedFd::from_raw_fd(fd) };
            move_mount(&tree, c"", rustix::fs::CWD, &target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
                .ctx("attach id-mapped workspace", &ws.path)?;
        }
        WorkspaceSource::Path => {
            mount_bind_recursive(&ws.path, &target).ctx("bind workspace", &ws.path)?;
        }
    }
    let nosuid = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    match &ws.mode {
        WorkspaceMountMode::Overlay { upper, work } => {
            let data = format!(
                "lowerdir={},upperdir={},workdir={},userxattr",
                escape_overlay(&target),
                escape_overlay(upper),
                escape_overlay(work)
            );
            mount_fs("overlay", &target, "overlay", SAFE, &data).ctx("mount workspace overlay", &ws.path)
        }
        WorkspaceMountMode::ReadOnly => make_read_only(&target, true),
        WorkspaceMountMode::ReadWrite => {
            sys::mount_setattr(None, &cstr(&target)?, libc::AT_RECURSIVE as libc::c_uint, nosuid, 0, None)
                .ctx("make workspace nosuid", &target)
        }
    }
}

/// Binds one host file read-only at `target` inside (created if missing;
/// skipped when its directory does not exist and cannot be made, as for a
/// host without /etc/ssl/certs).
fn bind_file(root: &Path, source: &Path, target: &Path) -> Result<(), MountError> {
    let mut inside = under(root, target);
    // A mount follows a symlink at its target: the host's /etc/resolv.conf
    // is often one (into /run, a fresh tmpfs inside), so the file it names
    // is made inside the new root and the bind goes there.
    if fs::symlink_metadata(&inside).is_ok_and(|m| m.file_type().is_symlink())
        && let Ok(link) = fs::read_link(&inside)
    {
        let named = if link.is_absolute() {
            under(root, &link)
        } else {
            let dir = inside.parent().unwrap_or(root).to_path_buf();
            let relative = dir.strip_prefix(root).map(Path::to_path_buf).unwrap_or_default();
            under(root, &normalize_lexically(&Path::new("/").join(relative).join(&link)))
        };
        inside = named;
    }
    if fs::symlink_metadata(&inside).is_err() && touch(&inside).is_err() {
        tracing::debug!("not binding {}: cannot create it inside", target.display());
        return Ok(());
    }
    mount_bind_recursive(source, &inside).ctx("bind file", target)?;
    make_read_only(&inside, false)
}

/// `path` (absolute) with `.` and `..` resolved by name, never above `/`.
fn normalize_lexically(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// overlayfs splits its options on ',' and its layer lists on ':'; both
/// are escaped with a backslash.
fn escape_overlay(path: &Path) -> String {
    let mut out = String::new();
    for ch in path.to_string_lossy().chars() {
        if matches!(ch, ',' | ':' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

fn pivot(root: &Path) -> Result<(), MountError> {
    // pivot_root(".", ".") stacks the old root on top of the new one; the
    // detach then removes it without needing a directory to park it in.
    rustix::process::chdir(root).ctx("enter new root", root)?;
    rustix::process::pivot_root(".", ".").ctx("pivot_root", root)?;
    unmount(".", UnmountFlags::DETACH).ctx("detach old root", root)?;
    rustix::process::chdir("/").ctx("enter new root", root)?;
    make_read_only(Path::new("/"), false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::privileges::test_fork::{have_root, run_in_child};

    #[test]
    fn a_symlinks_target_is_resolved_by_name_inside_the_root() {
        let n = |p: &str| normalize_lexically(Path::new(p));
        assert_eq!(
            n("/etc/../run/systemd/resolve/stub-resolv.conf"),
            Path::new("/run/systemd/resolve/stub-resolv.conf")
        );
        assert_eq!(n("/etc/./hosts"), Path::new("/etc/hosts"));
        // Never above the root.
        assert_eq!(n("/../../x"), Path::new("/x"));
        assert_eq!(under(Path::new("/r"), &n("/etc/../../../etc/hosts")), Path::new("/r/etc/hosts"));
    }

    #[test]
    fn a_mount_point_apart_from_every_path_is_chosen() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("x");
        let paths = [inside.clone()];
        let tmp = dir.path().to_str().unwrap();
        // The directory holding a path, and the root above everything, are passed over.
        assert_eq!(mountpoint_apart(&[tmp, "/", "/no/such/dir"], &paths), None);
        assert_eq!(mountpoint_apart(&[tmp, "/proc"], &paths), Some(Path::new("/proc")));
        assert!(check_apart(Path::new("/proc"), &[PathBuf::from("/proc/self")]).is_err());
    }

    /// As root, in a forked child with a mount namespace of its own: the
    /// view holds its read-only file read-only, its writable directory
    /// writable, its hidden file masked, and nothing else of the host.
    #[test]
    fn a_view_holds_only_its_paths() {
        if !have_root("a_view_holds_only_its_paths") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("kept.txt");
        fs::write(&kept, b"kept").unwrap();
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::write(shared.join("secret"), b"secret").unwrap();
        fs::write(shared.join("plain"), b"plain").unwrap();
        let writable = dir.path().join("run");
        fs::create_dir(&writable).unwrap();
        let placed = dir.path().join("layer");
        fs::create_dir(&placed).unwrap();
        fs::write(placed.join("file"), b"placed").unwrap();
        let place = PathBuf::from("/airlock-test-place/0");
        let view = View {
            read_only: vec![kept.clone(), shared.clone(), dir.path().join("missing")],
            writable: vec![writable.clone()],
            devices: Vec::new(),
            hidden: vec![shared.join("secret")],
            proc: false,
            read_only_at: vec![BindAt { host: placed.clone(), at: place.clone() }],
        };
        let every = [kept.clone(), shared.clone(), writable.clone(), placed.clone()];
        let mountpoint = mountpoint_apart(&["/mnt", "/srv", "/media", "/opt", "/var/tmp", "/tmp"], &every)
            .unwrap()
            .to_path_buf();
        let code = run_in_child(|| {
            if sys::raw_unshare(libc::CLONE_NEWNS).is_err() {
                return 1;
            }
            if let Err(e) = enter_view(&mountpoint, &view) {
                eprintln!("{e}");
                return 2;
            }
            if fs::read(&kept).ok().as_deref() != Some(b"kept".as_slice()) || fs::write(&kept, b"x").is_ok() {
                return 3;
            }
            if fs::read(shared.join("plain")).ok().as_deref() != Some(b"plain".as_slice()) {
                return 4;
            }
            if fs::read(shared.join("secret")).is_ok_and(|b| !b.is_empty()) {
                return 5;
            }
            if fs::write(writable.join("log"), b"x").is_err() {
                return 6;
            }
            for gone in ["/etc/passwd", "/proc/self", "/sys/kernel", "/dev/null", "/root", "/home"] {
                if fs::symlink_metadata(gone).is_ok() {
                    eprintln!("{gone} is visible");
                    return 7;
                }
            }
            if fs::symlink_metadata(dir.path().join("missing")).is_ok() || fs::write("/new", b"x").is_ok() {
                return 8;
            }
            // The placed directory is at its place alone, read-only.
            if fs::read(place.join("file")).ok().as_deref() != Some(b"placed".as_slice())
                || fs::write(place.join("new"), b"x").is_ok()
                || fs::symlink_metadata(&placed).is_ok()
            {
                return 9;
            }
            0
        });
        assert_eq!(code, 0);
        assert_eq!(fs::read(writable.join("log")).unwrap(), b"x", "the writable directory is the host's");
    }

    #[test]
    fn the_overlay_options_of_the_most_layers_fit_a_page() {
        assert_eq!(image_overlay_options(2), "lowerdir=skeleton:l/0:l/1,userxattr");
        assert!(image_overlay_options(MAX_IMAGE_LAYERS).len() <= MAX_MOUNT_OPTIONS);
    }

    /// A place that would hide a path of the view, or lie inside one (and
    /// be made in the host's directory bound there), is refused.
    #[test]
    fn a_place_in_or_above_another_path_of_the_view_is_refused() {
        let at = |p: &str| BindAt { host: PathBuf::from("/store/layer"), at: PathBuf::from(p) };
        let paths = [PathBuf::from("/work/ws"), PathBuf::from("/usr/bin/qemu")];
        assert!(check_places_apart(&[at("/image/0"), at("/image/1")], &paths).is_ok());
        for bad in ["/work", "/work/ws/sub", "/usr/bin/qemu"] {
            let err = check_places_apart(&[at(bad)], &paths).unwrap_err();
            assert_eq!(err.path, PathBuf::from(bad), "{err}");
        }
        assert!(check_places_apart(&[at("/image"), at("/image/1")], &paths).is_err());
    }

    /// As root, in a forked child: a detached tree the host cloned (as the
    /// microVM tier does with an id-mapped workspace for virtiofsd) is
    /// attached at its path in the view, writable through to the host's
    /// directory, and nosuid, nodev and noexec there.
    #[test]
    fn a_view_attaches_a_detached_tree_writable() {
        if !have_root("a_view_attaches_a_detached_tree_writable") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("ws");
        fs::create_dir(&workspace).unwrap();
        fs::write(workspace.join("old"), b"old").unwrap();
        fs::write(dir.path().join("beside"), b"beside").unwrap();
        let tree = sys::clone_tree_checked(&workspace, None).unwrap();
        let view = View::default();
        let mountpoint = mountpoint_apart(
            &["/mnt", "/srv", "/media", "/opt", "/var/tmp", "/tmp"],
            std::slice::from_ref(&workspace),
        )
        .unwrap()
        .to_path_buf();
        let code = run_in_child(|| {
            if sys::raw_unshare(libc::CLONE_NEWNS).is_err() {
                return 1;
            }
            let attach = Attach { tree: std::os::fd::AsFd::as_fd(&tree), path: &workspace };
            if let Err(e) = enter_view_attaching(&mountpoint, &view, Some(attach)) {
                eprintln!("{e}");
                return 2;
            }
            if fs::read(workspace.join("old")).ok().as_deref() != Some(b"old".as_slice()) {
                return 3;
            }
            if fs::write(workspace.join("new"), b"new").is_err()
                || fs::remove_file(workspace.join("old")).is_err()
            {
                return 4;
            }
            let Ok(st) = rustix::fs::statvfs(&workspace) else { return 5 };
            let wanted = rustix::fs::StatVfsMountFlags::NOSUID
                | rustix::fs::StatVfsMountFlags::NODEV
                | rustix::fs::StatVfsMountFlags::NOEXEC;
            if !st.f_flag.contains(wanted) {
                return 6;
            }
            if fs::symlink_metadata(dir.path().join("beside")).is_ok() || fs::symlink_metadata("/etc").is_ok()
            {
                return 7;
            }
            0
        });
        assert_eq!(code, 0);
        assert_eq!(fs::read(workspace.join("new")).unwrap(), b"new", "written through to the host");
        assert!(!workspace.join("old").exists(), "removed on the host");
    }
}
