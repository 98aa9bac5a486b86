//! PID 1 of the guest (`airlock __vm-init`, started by the kernel from the
//! initramfs): load the modules, mount the host's root read-only over 9p,
//! switch into it, and serve the host's requests over the virtio-serial
//! port as the process tier's agent does over its socket. No udev, no
//! systemd, no network device, no shell: this process and what the host asks it
//! to run are all that runs in the guest. With egress, loopback and the
//! proxy ports relayed over a port of their own (`egress_port`); with
//! published ports, the host's connections to loopback over another
//! (`ports_port`); with
//! transparent egress, the netfilter modules loaded and the process tier's
//! redirection installed before the agent serves. The guest's /etc/hosts
//! and /etc/resolv.conf are airlock's own, as a process-tier sandbox's.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;

use rustix::mount::{MountFlags, mount, mount_bind, mount_move};

use crate::boot::{LAYER_ARG, LAYER_TAG, RW_ARG, RW_TAG};
use crate::egress_port::{GuestEgress, GuestEgressError, PORT_NAME as EGRESS_PORT};
use crate::guest::{CONTAINERS_ORDER, MODULE_DIR, MODULE_ORDER, TRANSPARENT_ORDER};
use crate::limits::{Budget, GuestLimits};
use crate::ports_port::PORT_NAME as PORTS_PORT;

/// The guest's virtio-serial port's name.
pub const PORT_NAME: &str = "airlock.agent";

/// The guest's PATH (each exec adds the environment the host sends).
const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The guest's entry point; never returns while the guest lives.
pub fn main() -> i32 {
    let prepared = prepare().and_then(|Prepared { port, egress, ports, workload, engine }| {
        Ok((port, egress.map(prepare_egress).transpose()?, ports, workload, engine))
    });
    let code = match prepared {
        Ok((port, egress, ports, workload, engine)) => {
            let env = vec![("PATH".to_owned(), GUEST_PATH.to_owned())];
            // The egress relay's threads start once the agent has blocked
            // its signals, so that they inherit the mask.
            let exec_trace = std::env::args().any(|a| a == crate::boot::EXEC_TRACE_ARG);
            airlock_agent::serve_guest(env, Some(workload), exec_trace, move || {
                let proxy = egress.is_some().then(crate::egress_port::guest_proxy_url);
                if let Some(egress) = egress {
                    egress.serve()?;
                }
                // Without egress, loopback comes up here: the guest's
                // programs listen on it for the host's connections.
                if let Some(ports) = ports {
                    airlock_jail::sys::set_loopback_up()?;
                    crate::ports_port::serve_guest(&ports)?;
                }
                // From a thread of its own, which starts it once the agent
                // serves (its exec waits for the exec trace's answer).
                if let Some(engine) = engine {
                    std::thread::Builder::new().name("engine".into()).spawn(move || {
                        if let Err(e) = crate::containers::start(&engine, proxy.as_deref()) {
                            let _ = fs::write(crate::containers::ENGINE_LOG, format!("airlock: {e}\n"));
                        }
                    })?;
                }
                connect(&port)
            })
        }
        Err(e) => {
            eprintln!("airlock guest: {e}");
            125
        }
    };
    // Nothing is written to keep (the root is read-only): power off at once.
    rustix::fs::sync();
    let _ = rustix::system::reboot(rustix::system::RebootCommand::Restart);
    code
}

#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error("{what}: {source}")]
    Step { what: String, source: io::Error },
    #[error("no virtio-serial port named {0} appeared")]
    NoPort(&'static str),
    #[error("egress: {0}")]
    Egress(#[from] GuestEgressError),
    #[error("the host gave no limits (limits:PIDS:DISK) on the kernel's command line")]
    NoLimits,
    #[error("container engine: {0}")]
    Engine(#[from] crate::containers::EngineError),
}

/// In the final root: the trust bundle, loopback and the proxy ports, and
/// the redirection when the host asked for it.
fn prepare_egress(device: PathBuf) -> Result<GuestEgress, InitError> {
    Ok(GuestEgress::prepare(&device, redirect_requested())?)
}

/// What the host's command line says of egress: none, through the proxy
/// ports (`Some(None)`), or transparent too (`Some(Some(plan))`).
fn egress_requested() -> Option<Option<airlock_jail::plan::Redirect>> {
    std::env::args().find_map(|a| crate::egress_port::egress_from_arg(&a))
}

/// The redirection the host's command line asks for, if any.
fn redirect_requested() -> Option<airlock_jail::plan::Redirect> {
    egress_requested().flatten()
}

/// Transparent egress: nftables, NAT and conntrack, loaded (before the
/// initramfs is left behind) only for a guest that redirects.
fn load_transparent_modules() -> Result<(), InitError> {
    if redirect_requested().is_some() { load_module_list(TRANSPARENT_ORDER) } else { Ok(()) }
}

/// The guest's /etc/hosts and /etc/resolv.conf: airlock's own (the same
/// text as a process-tier sandbox's, `airlock_jail::names`), written to the
/// guest's memory and bound read-only over the host's files, which /etc's
/// share would show. Where the host has neither, the guest has nothing to
/// hide and nothing is bound.
fn install_name_files() -> Result<(), InitError> {
    let dir = Path::new("/run/airlock");
    fs::create_dir_all(dir).map_err(step("create /run/airlock"))?;
    let uname = rustix::system::uname();
    let hostname = uname.nodename().to_str().ok().filter(|n| !n.is_empty() && *n != "(none)");
    for (name, text) in
        [("hosts", airlock_jail::names::hosts(hostname)), ("resolv.conf", airlock_jail::names::resolv_conf())]
    {
        let own = dir.join(name);
        fs::write(&own, text).map_err(step(format!("write {}", own.display())))?;
        let target = Path::new("/etc").join(name);
        bind_over(&own, &target).map_err(step(format!("put airlock's own {} in place", target.display())))?;
    }
    Ok(())
}

/// Binds `source` read-only over the file at `target`, following a
/// symlink there as a mount does: a dangling one (the host's resolv.conf
/// into /run, which in the guest is its own memory) gets its file made
/// first. Nothing at `target` at all: nothing to cover.
fn bind_over(source: &Path, target: &Path) -> io::Result<()> {
    let mut at = target.to_path_buf();
    if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) && fs::metadata(&at).is_err() {
        let link = fs::read_link(&at)?;
        let named = at.parent().unwrap_or(Path::new("/")).join(link);
        at = lexically_normal(&named);
        if let Some(parent) = at.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::File::create(&at)?;
    } else if fs::symlink_metadata(&at).is_err() {
        return Ok(());
    }
    rustix::mount::mount_bind(source, &at)?;
    rustix::mount::mount_remount(&at, MountFlags::BIND | MountFlags::RDONLY, c"")?;
    Ok(())
}

/// An absolute path with `.` and `..` resolved by name, never above `/`.
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::from("/");
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn step<E: Into<io::Error>>(what: impl Into<String>) -> impl FnOnce(E) -> InitError {
    let what = what.into();
    move |e| InitError::Step { what, source: e.into() }
}

/// One piece of the guest's root, as the host lists it after the role on
/// the kernel's command line: all of them in one word (the kernel gives
/// init at most 32 arguments, and aborts the boot past that), separated by
/// [`ROOT_SEPARATOR`]. The command line splits on spaces, so paths with
/// spaces, or with that separator, are not shared; the host leaves them
/// out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootEntry {
    /// A host directory shared read-only over 9p, with tag `ro<index>`.
    Share(PathBuf),
    /// A symbolic link (the host's `/bin -> usr/bin`).
    Link { path: PathBuf, target: PathBuf },
    /// A path masked inside (an empty file or directory over it).
    Hide(PathBuf),
    /// The workspace at its own path: read-only over 9p with tag
    /// [`WORKSPACE_TAG`], the lower layer of an overlay (`layer:on`), or
    /// the virtio-fs share itself (`rw:on`).
    Workspace(PathBuf),
}

/// The 9p tag of the workspace's share.
pub const WORKSPACE_TAG: &str = "ws";

/// Between the entries of the guest's root in its one word.
pub const ROOT_SEPARATOR: char = '|';

/// The prefix of the word that lists the guest's root.
const ROOT_WORD: &str = "root:";

impl RootEntry {
    /// The word on the kernel's command line.
    pub fn to_arg(&self) -> String {
        match self {
            RootEntry::Share(p) => format!("share:{}", p.display()),
            RootEntry::Link { path, target } => format!("link:{}={}", path.display(), target.display()),
            RootEntry::Hide(p) => format!("hide:{}", p.display()),
            RootEntry::Workspace(p) => format!("workspace:{}", p.display()),
        }
    }

    pub fn from_arg(arg: &str) -> Option<RootEntry> {
        let (kind, rest) = arg.split_once(':')?;
        match kind {
            "share" => Some(RootEntry::Share(rest.into())),
            "link" => rest.split_once('=').map(|(p, t)| RootEntry::Link { path: p.into(), target: t.into() }),
            "hide" => Some(RootEntry::Hide(rest.into())),
            "workspace" => Some(RootEntry::Workspace(rest.into())),
            _ => None,
        }
    }

    /// Whether `path` can travel on the kernel's command line.
    pub fn fits(path: &Path) -> bool {
        path.to_str().is_some_and(|p| {
            p.starts_with('/')
                && p.chars().all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != ROOT_SEPARATOR)
        })
    }

    /// Whether a link's `target` (relative or absolute) can travel on the
    /// kernel's command line: a space or separator in it would cut the
    /// root's one word, and the entries after it (masks too) would be lost.
    pub fn target_fits(target: &Path) -> bool {
        RootEntry::fits(&Path::new("/").join(target))
    }

    /// The one word on the kernel's command line that lists `entries`, in
    /// order.
    pub fn list_to_arg(entries: &[RootEntry]) -> String {
        let listed: Vec<String> = entries.iter().map(RootEntry::to_arg).collect();
        format!("{ROOT_WORD}{}", listed.join(&ROOT_SEPARATOR.to_string()))
    }

    /// The entries listed in the guest's arguments, in order.
    pub fn list_from_args<S: AsRef<str>>(args: impl IntoIterator<Item = S>) -> Vec<RootEntry> {
        args.into_iter()
            .filter_map(|a| a.as_ref().strip_prefix(ROOT_WORD).map(str::to_owned))
            .flat_map(|listed| {
                listed.split(ROOT_SEPARATOR).filter_map(RootEntry::from_arg).collect::<Vec<_>>()
            })
            .collect()
    }
}

/// The 9p tag of the `index`th share.
pub fn share_tag(index: usize) -> String {
    format!("ro{index}")
}

/// The agent's port, the egress port when the host gave the guest one, and
/// the workload cgroup's `cgroup.procs` (see [`crate::limits`]).
fn prepare() -> Result<Prepared, InitError> {
    mount("proc", "/proc", "proc", MountFlags::empty(), None).map_err(step("mount /proc"))?;
    mount("sysfs", "/sys", "sysfs", MountFlags::empty(), None).map_err(step("mount /sys"))?;
    mount("devtmpfs", "/dev", "devtmpfs", MountFlags::empty(), None).map_err(step("mount /dev"))?;
    load_modules()?;
    load_transparent_modules()?;
    let containers = crate::containers::requested();
    if containers {
        load_module_list(CONTAINERS_ORDER)?;
    }
    let entries = RootEntry::list_from_args(std::env::args().skip(2));
    let limits = GuestLimits::from_args(std::env::args().skip(2)).ok_or(InitError::NoLimits)?;
    // Read before anything is written to the guest's tmpfs.
    let budget =
        Budget::new(crate::limits::mem_available().map_err(step("read /proc/meminfo"))?, limits.disk);
    // The guest's root is a tmpfs of its own (in guest memory), which holds
    // every place the guest may write but the workspace: sized, so that
    // filling it is ENOSPC. The host's system directories are mounted
    // read-only into it.
    let root_options = std::ffi::CString::new(format!("mode=0755,size={}", budget.tmpfs))
        .map_err(|e| step("size the root")(io::Error::other(e)))?;
    let options = c"trans=virtio,version=9p2000.L,cache=loose,msize=512000";
    // On an image, the sized tmpfs holds the places the guest writes and
    // the root is the image's read-only overlay; on the host's directories
    // the tmpfs is the root itself.
    let image_layers = crate::boot::image_layers_from_args(std::env::args().skip(2));
    let scratch = if image_layers > 0 { Path::new("/scratch") } else { Path::new("/newroot") };
    fs::create_dir_all(scratch).map_err(step("create the guest's tmpfs"))?;
    mount("tmpfs", scratch, "tmpfs", MountFlags::NOSUID, Some(root_options.as_c_str()))
        .map_err(step("mount the guest's tmpfs"))?;
    if image_layers > 0 {
        mount_image_root(image_layers, &entries, options)?;
    }
    let layered = std::env::args().any(|a| a == LAYER_ARG);
    let writable = std::env::args().any(|a| a == RW_ARG);
    let mut shares = 0;
    for entry in &entries {
        match entry {
            RootEntry::Share(path) => {
                let target = under_new_root(path);
                fs::create_dir_all(&target).map_err(step(format!("create {}", path.display())))?;
                let tag = share_tag(shares);
                shares += 1;
                retry(|| {
                    mount(tag.as_str(), &target, "9p", MountFlags::RDONLY | MountFlags::NODEV, Some(options))
                })
                .map_err(step(format!("mount {} over 9p", path.display())))?;
            }
            RootEntry::Link { path, target } => {
                let at = under_new_root(path);
                if let Some(parent) = at.parent() {
                    let _ = fs::create_dir_all(parent);
                }
                std::os::unix::fs::symlink(target, &at).map_err(step(format!("link {}", path.display())))?;
            }
            RootEntry::Workspace(path) => {
                let target = under_new_root(path);
                fs::create_dir_all(&target)
                    .map_err(step(format!("create the workspace {}", path.display())))?;
                let flags = MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID;
                if layered {
                    mount_overlay(&target, options).map_err(step(format!(
                        "mount the workspace {} as an overlay over virtio-fs",
                        path.display()
                    )))?;
                } else if writable {
                    // Mode rw: the host's directory itself, served by virtiofsd.
                    let flags = MountFlags::NODEV | MountFlags::NOSUID;
                    retry(|| mount(RW_TAG, &target, "virtiofs", flags, None))
                        .map_err(step(format!("mount the workspace {} over virtio-fs", path.display())))?;
                } else {
                    retry(|| mount(WORKSPACE_TAG, &target, "9p", flags, Some(options)))
                        .map_err(step(format!("mount the workspace {} over 9p", path.display())))?;
                }
            }
            RootEntry::Hide(_) => {}
        }
    }
    for dir in ["/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/home", "/var/tmp"] {
        let _ = fs::create_dir_all(under_new_root(Path::new(dir)));
    }
    for dir in ["/tmp", "/var/tmp"] {
        let _ = fs::set_permissions(under_new_root(Path::new(dir)), fs::Permissions::from_mode(0o1777));
    }
    // /dev/shm is a directory of the root's tmpfs, so that it shares the
    // one budget: made where devtmpfs will cover it, and held at /shm (in
    // the initramfs) to be bound over /dev/shm once /dev is mounted.
    let shm = Path::new("/newroot/dev/shm");
    let shm_on_tmpfs = if image_layers > 0 { scratch.join("shm") } else { shm.to_path_buf() };
    fs::create_dir_all(&shm_on_tmpfs).map_err(step("create /dev/shm"))?;
    fs::set_permissions(&shm_on_tmpfs, fs::Permissions::from_mode(0o1777))
        .map_err(step("create /dev/shm"))?;
    fs::create_dir_all("/shm").map_err(step("create /shm"))?;
    mount_bind(&shm_on_tmpfs, "/shm").map_err(step("hold /dev/shm"))?;
    mount("proc", "/newroot/proc", "proc", MountFlags::empty(), None)
        .map_err(step("mount the root's /proc"))?;
    mount("sysfs", "/newroot/sys", "sysfs", MountFlags::empty(), None)
        .map_err(step("mount the root's /sys"))?;
    mount("devtmpfs", "/newroot/dev", "devtmpfs", MountFlags::empty(), None)
        .map_err(step("mount the root's /dev"))?;
    let pts = Path::new("/newroot/dev/pts");
    let _ = fs::create_dir(pts);
    mount("devpts", pts, "devpts", MountFlags::NOSUID, Some(c"ptmxmode=0666,mode=0620"))
        .map_err(step("mount /newroot/dev/pts"))?;
    let _ = fs::create_dir(shm);
    mount_bind("/shm", shm).map_err(step("mount /newroot/dev/shm"))?;
    let (workload, engine) = workload_cgroup(limits.pids, &budget, containers)?;
    for entry in &entries {
        if let RootEntry::Hide(path) = entry {
            hide(&under_new_root(path)).map_err(step(format!("hide {}", path.display())))?;
        }
    }
    // After the masks: the engine's own /etc/docker covers the host's
    // (hidden or not), which it never sees.
    if containers {
        crate::containers::prepare_root(Path::new("/newroot"))?;
    }
    let port = find_port(PORT_NAME)?;
    let egress = if egress_requested().is_some() { Some(find_port(EGRESS_PORT)?) } else { None };
    let ports = if crate::ports_port::requested() { Some(find_port(PORTS_PORT)?) } else { None };
    // The initramfs cannot be pivoted away from: move the new root over it
    // and enter it (what switch_root does). The initramfs's memory stays:
    // this executable runs from it.
    std::env::set_current_dir("/newroot").map_err(step("enter the new root"))?;
    mount_move(".", "/").map_err(step("move the new root to /"))?;
    rustix::process::chroot(".").map_err(step("chroot into the new root"))?;
    std::env::set_current_dir("/").map_err(step("enter /"))?;
    install_name_files()?;
    Ok(Prepared { port, egress, ports, workload, engine })
}

/// The guest's root in place, and what the agent serves from: its port,
/// the egress and ports ports when the host gave them, and the workload's
/// `cgroup.procs`.
struct Prepared {
    port: PathBuf,
    egress: Option<PathBuf>,
    ports: Option<PathBuf>,
    workload: OwnedFd,
    /// With a container engine: its cgroup's `cgroup.procs`.
    engine: Option<OwnedFd>,
}

/// The workload's cgroup (see [`crate::limits`]), made in a cgroup v2
/// hierarchy mounted in the initramfs (where the agent's `cgroup.procs`
/// stays open), and the same hierarchy shown read-only at the new root's
/// /sys/fs/cgroup, so that the workload can read its limits. With a
/// container engine the workload is nested (see
/// [`crate::limits::nest_for_containers`]) and the new root's hierarchy
/// writable: the engine makes its containers' cgroups there. Root in the
/// guest could lift the limits either way.
fn workload_cgroup(
    pids: u64,
    budget: &Budget,
    containers: bool,
) -> Result<(OwnedFd, Option<OwnedFd>), InitError> {
    let own = Path::new("/cgroup");
    fs::create_dir_all(own).map_err(step("create /cgroup"))?;
    let cgroup2 = |at: &Path, flags: MountFlags| mount("cgroup2", at, "cgroup2", flags, None);
    let safe = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    cgroup2(own, safe).map_err(step("mount cgroup2"))?;
    let procs =
        crate::limits::create_workload(own, pids, budget).map_err(step("create the workload's cgroup"))?;
    let (procs, engine, shown) = if containers {
        let (execs, engine) = crate::limits::nest_for_containers(own)
            .map_err(step("nest the workload's cgroup for the container engine"))?;
        (execs, Some(engine), safe)
    } else {
        (procs, None, safe | MountFlags::RDONLY)
    };
    cgroup2(Path::new("/newroot/sys/fs/cgroup"), shown).map_err(step("mount the root's /sys/fs/cgroup"))?;
    Ok((procs, engine))
}

/// The directories of an image's root that are the guest's own, empty, on
/// its tmpfs (a process-tier sandbox's private tmpfs mounts).
const IMAGE_PRIVATE_DIRS: &[(&str, u32)] =
    &[("/tmp", 0o1777), ("/var/tmp", 0o1777), ("/run", 0o755), ("/root", 0o755), ("/home", 0o755)];

/// The files airlock puts over an image's own (or where it has none).
const IMAGE_FILES: &[&str] = &["/etc/hosts", "/etc/resolv.conf"];

/// An image's root at /newroot: its layers (the directories `0`, `1`, …
/// bottom first of one read-only 9p share, tag `img`, mounted at
/// [`IMAGE_LAYERS_AT`]) stacked as the lowers of a read-only overlay,
/// under a skeleton on the guest's tmpfs that holds every mount point the
/// guest needs (so nothing is created in the image), as the process tier
/// does. `userxattr`: opaque directories are `user.overlay.opaque`, as
/// the host's unpacker wrote them; whiteouts are 0:0 character devices,
/// which 9p shows as they are. The private directories are then bound from
/// the tmpfs, so every write counts against the one budget.
fn mount_image_root(layers: usize, entries: &[RootEntry], options: &std::ffi::CStr) -> Result<(), InitError> {
    let scratch = Path::new("/scratch");
    let skeleton = scratch.join("skeleton");
    let under = |base: &Path, path: &Path| base.join(path.strip_prefix("/").unwrap_or(path));
    let workspace = entries.iter().filter_map(|e| match e {
        RootEntry::Workspace(path) => Some(path.as_path()),
        _ => None,
    });
    let dirs =
        ["/proc", "/sys", "/dev", "/etc"].into_iter().chain(IMAGE_PRIVATE_DIRS.iter().map(|(d, _)| *d));
    for dir in dirs.map(Path::new).chain(workspace) {
        fs::create_dir_all(under(&skeleton, dir))
            .map_err(step(format!("create {} in the skeleton", dir.display())))?;
    }
    for file in IMAGE_FILES {
        fs::File::create(under(&skeleton, Path::new(file)))
            .map_err(step(format!("create {file} in the skeleton")))?;
    }
    std::os::unix::fs::symlink("../run", under(&skeleton, Path::new("/var/run")))
        .map_err(step("create /var/run in the skeleton"))?;
    let read_only = MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID;
    let at = Path::new(IMAGE_LAYERS_AT);
    fs::create_dir_all(at).map_err(step(format!("create {IMAGE_LAYERS_AT}")))?;
    retry(|| mount(crate::boot::IMAGE_TAG, at, "9p", read_only, Some(options)))
        .map_err(step("mount the image's layers over 9p"))?;
    let data = image_overlay_options(&skeleton, layers)
        .map_err(|e| step("list the image's layers")(io::Error::other(e)))?;
    mount("overlay", "/newroot", "overlay", read_only, Some(data.as_c_str()))
        .map_err(step("mount the image's layers as the root"))?;
    for (dir, mode) in IMAGE_PRIVATE_DIRS {
        let own = under(&scratch.join("private"), Path::new(dir));
        fs::create_dir_all(&own).map_err(step(format!("create {}", own.display())))?;
        fs::set_permissions(&own, fs::Permissions::from_mode(*mode))
            .map_err(step(format!("set {dir}'s mode")))?;
        mount_bind(&own, under(Path::new("/newroot"), Path::new(dir)))
            .map_err(step(format!("mount {dir}")))?;
    }
    Ok(())
}

/// Where the guest mounts the share of an image's layers: a short path,
/// since every layer is named in the overlay's options, which hold a page.
const IMAGE_LAYERS_AT: &str = "/l";

/// The options of an image's overlay: `skeleton` on top, then the layers
/// top first; refused (not cut) past the page mount(2) passes on.
fn image_overlay_options(skeleton: &Path, layers: usize) -> Result<std::ffi::CString, String> {
    let mut lower = skeleton.display().to_string();
    for index in (0..layers).rev() {
        lower.push_str(&format!(":{IMAGE_LAYERS_AT}/{index}"));
    }
    let options = format!("lowerdir={lower},userxattr");
    if options.len() > airlock_jail::mounts::MAX_MOUNT_OPTIONS {
        return Err(format!(
            "{layers} layers make overlay options of {} bytes (at most {})",
            options.len(),
            airlock_jail::mounts::MAX_MOUNT_OPTIONS
        ));
    }
    std::ffi::CString::new(options).map_err(|e| e.to_string())
}

/// The workspace as an overlay: the host's directory (read-only 9p) below,
/// the host's writable layer (virtio-fs) above. `userxattr`: overlay's
/// markers are `user.overlay.*` xattrs, which virtiofsd, unprivileged on
/// the host, can write (`trusted.*` would need the host's CAP_SYS_ADMIN);
/// whiteouts are 0:0 character devices, which Linux ≥ 5.8 lets anyone make.
fn mount_overlay(target: &Path, options: &std::ffi::CStr) -> rustix::io::Result<()> {
    let (lower, layer) = (Path::new("/ws-lower"), Path::new("/ws-layer"));
    for dir in [lower, layer] {
        fs::create_dir_all(dir).map_err(|_| rustix::io::Errno::IO)?;
    }
    let read_only = MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID;
    retry(|| mount(WORKSPACE_TAG, lower, "9p", read_only, Some(options)))?;
    retry(|| mount(LAYER_TAG, layer, "virtiofs", MountFlags::NODEV | MountFlags::NOSUID, None))?;
    let overlay =
        c"lowerdir=/ws-lower,upperdir=/ws-layer/upper,workdir=/ws-layer/work,userxattr,index=off,xino=off";
    mount("overlay", target, "overlay", MountFlags::NODEV | MountFlags::NOSUID, Some(overlay))
}

fn under_new_root(path: &Path) -> PathBuf {
    Path::new("/newroot").join(path.strip_prefix("/").unwrap_or(path))
}

/// An empty read-only tmpfs over a directory, /dev/null over a file.
fn hide(path: &Path) -> rustix::io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => mount("tmpfs", path, "tmpfs", MountFlags::RDONLY, Some(c"mode=0000")),
        Ok(_) => rustix::mount::mount_bind("/dev/null", path),
    }
}

/// Loads each module of the initramfs in the order recorded at setup.
fn load_modules() -> Result<(), InitError> {
    load_module_list(MODULE_ORDER)
}

/// Loads the modules an order file of the initramfs lists, in its order.
fn load_module_list(order_file: &str) -> Result<(), InitError> {
    let order = fs::read_to_string(order_file).map_err(step(format!("read {order_file}")))?;
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = format!("{MODULE_DIR}/{name}");
        let file = fs::File::open(&path).map_err(step(format!("open {path}")))?;
        match rustix::system::finit_module(&file, c"", 0) {
            Ok(()) => {}
            // Built in, or loaded already as another's dependency.
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(step(format!("load module {name}"))(e)),
        }
    }
    Ok(())
}

/// Device probes finish asynchronously on some kernels: retry briefly.
fn retry<T>(mut attempt: impl FnMut() -> rustix::io::Result<T>) -> rustix::io::Result<T> {
    let started = Instant::now();
    loop {
        match attempt() {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() > Duration::from_secs(5) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The device node of the port named `wanted`, as the new root's /dev shows it.
fn find_port(wanted: &'static str) -> Result<PathBuf, InitError> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if let Ok(entries) = fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                let device = Path::new("/newroot/dev").join(entry.file_name());
                if name.trim() == wanted && device.exists() {
                    return Ok(Path::new("/dev").join(entry.file_name()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(InitError::NoPort(wanted))
}

/// Opens the port and relays it to one end of a socket pair, whose other
/// end the agent serves: the agent speaks to a socket in both tiers.
/// Called with every signal the agent waits for blocked, so the relay
/// threads inherit the mask and never take them.
fn connect(port: &Path) -> io::Result<UnixStream> {
    let device = fs::OpenOptions::new().read(true).write(true).open(port)?;
    let (agent_end, relay_end) = UnixStream::pair()?;
    let (mut from_host, mut to_agent) = (device.try_clone()?, relay_end.try_clone()?);
    std::thread::Builder::new().name("port-in".into()).spawn(move || {
        let _ = copy(&mut from_host, &mut to_agent);
        // The host hung up: the agent sees the end of its requests.
        let _ = to_agent.shutdown(std::net::Shutdown::Write);
    })?;
    let (mut from_agent, mut to_host) = (relay_end, device);
    std::thread::Builder::new().name("port-out".into()).spawn(move || {
        let _ = copy(&mut from_agent, &mut to_host);
    })?;
    Ok(agent_end)
}

fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn each_root_entry_travels_on_the_command_line_and_back() {
        let entries = [
            RootEntry::Share("/usr".into()),
            RootEntry::Link { path: "/bin".into(), target: "usr/bin".into() },
            RootEntry::Hide("/etc/shadow".into()),
            RootEntry::Workspace("/srv/repo".into()),
        ];
        for entry in &entries {
            assert_eq!(RootEntry::from_arg(&entry.to_arg()), Some(entry.clone()), "{}", entry.to_arg());
        }
        assert_eq!(RootEntry::from_arg("unknown:/x"), None);
        // All in one word, in order, among the guest's other arguments.
        let word = RootEntry::list_to_arg(&entries);
        assert_eq!(word, "root:share:/usr|link:/bin=usr/bin|hide:/etc/shadow|workspace:/srv/repo");
        assert_eq!(RootEntry::list_from_args(["egress:on", word.as_str(), "limits:1:2"]), entries);
        assert!(!RootEntry::fits(Path::new("/a|b")), "the separator cannot be in a path");
        assert!(
            RootEntry::target_fits(Path::new("usr/bin")) && RootEntry::target_fits(Path::new("/usr/bin"))
        );
        for target in ["usr/a b", "a|hide:/x", "../x y"] {
            assert!(!RootEntry::target_fits(Path::new(target)), "{target}");
        }
    }

    /// The guest's overlay names every layer, top first, under the
    /// skeleton; the most layers an image may have fit its page.
    #[test]
    fn an_images_overlay_stacks_its_layers_top_first_and_the_most_fit_a_page() {
        let skeleton = Path::new("/scratch/skeleton");
        let three = image_overlay_options(skeleton, 3).unwrap();
        assert_eq!(three.to_str().unwrap(), "lowerdir=/scratch/skeleton:/l/2:/l/1:/l/0,userxattr");
        let most = image_overlay_options(skeleton, crate::boot::MAX_IMAGE_LAYERS).unwrap();
        assert!(
            most.as_bytes().len() <= airlock_jail::mounts::MAX_MOUNT_OPTIONS,
            "{}",
            most.as_bytes().len()
        );
        let err = image_overlay_options(skeleton, 2000).unwrap_err();
        assert!(err.contains("2000 layers"), "{err}");
    }

    #[test]
    fn a_symlinked_name_file_is_followed_by_name() {
        let n = |p: &str| lexically_normal(Path::new(p));
        assert_eq!(
            n("/etc/../run/systemd/resolve/stub-resolv.conf"),
            Path::new("/run/systemd/resolve/stub-resolv.conf")
        );
        assert_eq!(n("/etc/./hosts"), Path::new("/etc/hosts"));
        assert_eq!(n("/../../x"), Path::new("/x"));
    }
}
