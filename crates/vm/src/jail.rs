//! QEMU confined, as Firecracker's jailer confines Firecracker.
//!
//! The host side ([`spawn`]) starts `airlock __vm-jail` with the jail
//! crate's `spawn` — the same clone as a sandbox's agent: new user, mount,
//! PID, network, IPC and UTS namespaces, id maps written by the host, the
//! process placed in the VM's cgroup before it may run on. Its user
//! namespace maps one host uid and gid: QEMU's own as root, the caller's
//! rootless. It then sends the jailer a [`Plan`] over the control channel.
//!
//! The jailer ([`main`]), single-threaded and root only of that namespace:
//! 1. builds QEMU's mount view (`mounts::enter_view`): QEMU's binary, the
//!    libraries and firmware it loads, the kernel and initramfs and the
//!    directories shared with the guest, read-only (an image's layers
//!    gathered under [`IMAGE_DIR`], one share); the run's directory
//!    (sockets, console log) writable; `/dev/kvm` with KVM; the guest's
//!    masked paths masked here too. No /proc, /sys, /dev, home or state
//!    directory; the network namespace has only a loopback device (down).
//! 2. empties all five capability sets (bounding set included) and sets
//!    no_new_privs, so QEMU, though root of its namespace, starts with no
//!    capability anywhere.
//! 3. re-arms the parent-death signal (the clone's id change cleared it) and
//!    tells the host it is about to exec — a write that fails if airlock
//!    died before the signal was armed.
//! 4. execs QEMU with an empty environment; QEMU's own seccomp sandbox
//!    (`-sandbox`) is the last layer.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use airlock_jail::cgroup::SandboxCgroup;
use airlock_jail::mounts::{self, BindAt, View};
use airlock_jail::spawn::{self as jail_spawn, AGENT_CONTROL_FD, AGENT_WORKSPACE_FD, IdMap, SpawnRequest};
use airlock_jail::{privileges, sys};
use serde::{Deserialize, Serialize};

use crate::VmError;
use crate::engine::Accel;

/// argv[1] of the jailer.
pub const JAIL_ROLE: &str = "__vm-jail";

/// Existing directories the view's empty root may be mounted over (in the
/// jailer's mount namespace only): the first that no path of the view lies
/// in or above.
const MOUNTPOINTS: &[&str] = &["/mnt", "/srv", "/media", "/tmp", "/var/tmp", "/home", "/root"];

/// Firmware QEMU's microvm machine loads from its data directory: its BIOS
/// (qboot), and the option ROM that starts a PVH kernel or a bzImage.
const FIRMWARE: &[&str] = &["bios-microvm.bin", "pvh.bin", "linuxboot_dma.bin"];

/// What the jailer does: QEMU's command and its mount view.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Plan {
    /// QEMU's binary, at the path it has in the view (and on the host).
    pub program: PathBuf,
    pub args: Vec<String>,
    pub mountpoint: PathBuf,
    pub read_only: Vec<PathBuf>,
    pub writable: Vec<PathBuf>,
    pub devices: Vec<PathBuf>,
    pub hidden: Vec<PathBuf>,
    /// Host directories bound read-only elsewhere in the view: an image's
    /// layers, under [`IMAGE_DIR`].
    #[serde(default)]
    pub read_only_at: Vec<BindAt>,
    /// Capabilities the program may still hold in its own user namespace
    /// (virtiofsd's: it serves files as their owners and drops what it
    /// does not need itself); QEMU's is empty.
    #[serde(default)]
    pub keep_capabilities: Vec<u32>,
    /// A /proc of its own PID namespace: virtiofsd reaches its open files
    /// through /proc/self/fd, and QEMU's 9p server reads xattrs (the
    /// overlay's lower layer is asked for `user.overlay.*`) that way.
    #[serde(default)]
    pub proc: bool,
    /// Where the detached tree the host passed at [`AGENT_WORKSPACE_FD`] is
    /// attached, writable, in place of a bind (as root, virtiofsd's
    /// id-mapped workspace in mode rw).
    #[serde(default)]
    pub attach: Option<PathBuf>,
    /// setgroups succeeds without effect (`seccomp::setgroups_noop`):
    /// virtiofsd started rootless, whose user namespace can never drop the
    /// caller's supplementary groups, exits unless its attempt succeeds.
    #[serde(default)]
    pub setgroups_noop: bool,
    /// No setuid or setgid bit on any file it writes
    /// (`seccomp::RuleSet::NoSetIdBits`): virtiofsd serving a workspace in
    /// mode rw, whose files land in the host's tree as the guest marks them.
    #[serde(default)]
    pub no_setid_bits: bool,
}

/// What QEMU needs to see.
pub struct Needs<'a> {
    pub accel: Accel,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    /// Directories shared with the guest (read-only).
    pub shares: Vec<PathBuf>,
    /// Paths the guest masks; masked in QEMU's view too.
    pub hidden: Vec<PathBuf>,
    /// The run's directory: sockets and the console log.
    pub run_dir: &'a Path,
    /// A container engine's disk, the one host file besides the run's
    /// directory that QEMU writes.
    pub disk: Option<&'a Path>,
    /// A /proc of QEMU's own PID namespace (see [`Plan::proc`]).
    pub proc: bool,
    /// An image's unpacked layers, bottom first: the `n`th is seen at
    /// [`image_layer_dir`]`(n)`, and QEMU shares [`IMAGE_DIR`] whole.
    pub image_layers: &'a [PathBuf],
}

/// Where QEMU's view gathers an image's layers, one directory each named
/// by its place from the bottom (`0`, `1`, …): one 9p share holds them
/// all, so an image of any number of layers takes one device of the
/// guest's. A name of its own: no host path QEMU sees may lie in or above
/// it (the jailer refuses the view otherwise).
pub const IMAGE_DIR: &str = "/airlock-image";

/// Where the `n`th layer from the bottom is in QEMU's view.
pub fn image_layer_dir(n: usize) -> PathBuf {
    Path::new(IMAGE_DIR).join(n.to_string())
}

/// QEMU's binary, found on PATH, with symbolic links resolved (QEMU finds
/// its data and modules next to where it runs from).
pub fn qemu_program() -> Result<PathBuf, VmError> {
    let found = crate::engine::find_program(crate::engine::QEMU).ok_or(VmError::NoQemu)?;
    fs::canonicalize(&found).map_err(|e| VmError::io(&found, e))
}

/// The plan for QEMU `program` with `args`.
pub fn plan(program: &Path, args: Vec<String>, needs: &Needs<'_>) -> Result<Plan, VmError> {
    let prefix = program.parent().and_then(Path::parent).unwrap_or(Path::new("/usr"));
    let mut read_only =
        vec![program.to_path_buf(), needs.kernel.to_path_buf(), needs.initramfs.to_path_buf()];
    read_only.push(PathBuf::from("/etc/ld.so.cache"));
    let data = prefix.join("share/qemu");
    read_only.extend(FIRMWARE.iter().map(|f| data.join(f)).filter(|p| p.exists()));
    let mut loaded = vec![program.to_path_buf()];
    // TCG is a module QEMU loads at start-up (Debian builds it so).
    if needs.accel == Accel::Tcg
        && let Some(module) = module_dirs(prefix).map(|d| d.join("accel-tcg-x86_64.so")).find(|m| m.exists())
    {
        read_only.push(module.clone());
        loaded.push(module);
    }
    for object in &loaded {
        read_only.extend(libraries(object)?);
    }
    read_only.extend(needs.shares.iter().cloned());
    let read_only_at = needs
        .image_layers
        .iter()
        .enumerate()
        .map(|(n, layer)| BindAt { host: layer.clone(), at: image_layer_dir(n) })
        .collect();
    read_only.sort();
    read_only.dedup();
    let mut writable = vec![needs.run_dir.to_path_buf()];
    writable.extend(needs.disk.map(Path::to_path_buf));
    let devices = match needs.accel {
        Accel::Kvm => vec![PathBuf::from("/dev/kvm")],
        Accel::Tcg => Vec::new(),
    };
    let every: Vec<PathBuf> =
        read_only.iter().chain(&writable).chain(&devices).chain(needs.image_layers).cloned().collect();
    let mountpoint = mounts::mountpoint_apart(MOUNTPOINTS, &every)
        .ok_or_else(|| {
            VmError::Boot(format!(
                "no directory to build QEMU's view on: each of {} is missing or holds a path QEMU needs",
                MOUNTPOINTS.join(", ")
            ))
        })?
        .to_path_buf();
    Ok(Plan {
        program: program.to_path_buf(),
        args,
        mountpoint,
        read_only,
        writable,
        devices,
        hidden: needs.hidden.clone(),
        read_only_at,
        keep_capabilities: Vec::new(),
        proc: needs.proc,
        attach: None,
        setgroups_noop: false,
        no_setid_bits: false,
    })
}

/// virtiofsd, as Debian's QEMU ships it.
pub const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";

/// What virtiofsd keeps (linux/capability.h): what it needs to serve files
/// as the guest's users (chown, dac_override, fowner, fsetid, setgid,
/// setuid, mknod, setfcap), sys_chroot for its own chroot into the shared
/// directory, and setpcap to narrow its bounding set to the first eight
/// once there. All of them count in its user namespace only.
pub const VIRTIOFSD_CAPABILITIES: &[u32] = &[0, 1, 3, 4, 6, 7, 27, 31, 18, 8];

/// CAP_SETFCAP: not kept when virtiofsd serves the host's workspace itself
/// (mode rw). A file capability set through an id-mapped mount is stored
/// for the id the guest's root maps to, host root, and would hold for
/// anyone who runs that file on the host.
pub const CAP_SETFCAP: u32 = 31;

/// How virtiofsd reaches the directory it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Bound from the host's tree (the layer; the workspace rootless).
    Bound,
    /// The id-mapped tree the host passes it at [`AGENT_WORKSPACE_FD`]
    /// (the workspace as root): the guest's ids are then the host's, as
    /// in a process-tier sandbox's id-mapped workspace.
    Attached,
}

/// virtiofsd's jail: its binary and libraries read-only, and the one
/// directory it serves writable (the writable layer: upper and work; or
/// the workspace in mode rw). `keep`: the capabilities it may hold.
pub fn plan_virtiofsd(
    program: &Path,
    args: Vec<String>,
    shared: &Path,
    served: Served,
    keep: &[u32],
) -> Result<Plan, VmError> {
    let mut read_only = vec![program.to_path_buf(), PathBuf::from("/etc/ld.so.cache")];
    read_only.extend(libraries(program)?);
    read_only.sort();
    read_only.dedup();
    let (writable, attach) = match served {
        Served::Bound => (vec![shared.to_path_buf()], None),
        Served::Attached => (Vec::new(), Some(shared.to_path_buf())),
    };
    let every: Vec<PathBuf> = read_only.iter().chain(&writable).chain(&attach).cloned().collect();
    let mountpoint = mounts::mountpoint_apart(MOUNTPOINTS, &every)
        .ok_or_else(|| VmError::Boot("no directory to build virtiofsd's view on".to_owned()))?
        .to_path_buf();
    Ok(Plan {
        program: program.to_path_buf(),
        args,
        mountpoint,
        read_only,
        writable,
        devices: Vec::new(),
        hidden: Vec::new(),
        read_only_at: Vec::new(),
        keep_capabilities: keep.to_vec(),
        proc: true,
        attach,
        setgroups_noop: false,
        no_setid_bits: false,
    })
}

/// Where QEMU looks for its modules below its installation prefix.
fn module_dirs(prefix: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    ["lib/x86_64-linux-gnu/qemu", "lib64/qemu", "lib/qemu"].into_iter().map(move |d| prefix.join(d))
}

/// The shared objects `object` loads, its program interpreter (the dynamic
/// loader) included, as the loader itself lists them.
fn libraries(object: &Path) -> Result<Vec<PathBuf>, VmError> {
    let loader = loader_of(object)?;
    let out = Command::new(&loader)
        .arg("--list")
        .arg(object)
        .env_clear()
        .output()
        .map_err(|e| VmError::Boot(format!("cannot list the libraries of {}: {e}", object.display())))?;
    if !out.status.success() {
        return Err(VmError::Boot(format!(
            "cannot list the libraries of {}: {}",
            object.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut found = parse_library_list(&String::from_utf8_lossy(&out.stdout));
    found.push(loader);
    Ok(found)
}

/// The program interpreter an ELF object names, or the system's loader for
/// a shared library (which names none).
fn loader_of(object: &Path) -> Result<PathBuf, VmError> {
    let mut head = Vec::new();
    fs::File::open(object)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
        .map_err(|e| VmError::io(object, e))?;
    match crate::elf::interpreter(&head).map_err(|e| VmError::io(object, e))? {
        Some(interpreter) => Ok(PathBuf::from(interpreter)),
        None => Ok(PathBuf::from("/lib64/ld-linux-x86-64.so.2")),
    }
}

/// The paths in the loader's `--list` output (`name => /path (0x…)`, or a
/// bare `/path (0x…)` for the loader); the vDSO has none.
fn parse_library_list(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.rsplit_once(" (").map_or(path, |(p, _)| p).trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// How the jailer is started.
pub struct Start<'a> {
    pub plan: &'a Plan,
    /// As root: QEMU's host uid and gid. None: the calling user (rootless).
    pub ids: Option<(u32, u32)>,
    /// How many ids from `ids` on its user namespace maps (from 0): 1 for
    /// QEMU; virtiofsd serves files as the guest's users, 65536.
    pub id_count: u32,
    /// QEMU's stderr (its log).
    pub stderr: &'a fs::File,
    /// The program's standard input (virtiofsd's listening socket).
    pub stdin: Option<std::os::fd::BorrowedFd<'a>>,
    /// The detached tree the plan attaches ([`Plan::attach`]).
    pub tree: Option<std::os::fd::BorrowedFd<'a>>,
    /// The cgroup QEMU runs in, placed before the jailer runs on.
    pub cgroup: Option<&'a SandboxCgroup>,
}

/// How long the jailer may take to build QEMU's view.
const JAIL_DEADLINE: Duration = Duration::from_secs(30);

/// Starts the jailer, which becomes the plan's program (QEMU, or
/// virtiofsd); returns its host pid once the jailer said it execs it. On
/// error nothing is left running.
pub fn spawn(start: &Start<'_>) -> Result<i32, VmError> {
    let who = if start.plan.program.ends_with("virtiofsd") { "virtiofsd" } else { "QEMU" };
    let fail =
        |what: &'static str| move |e: io::Error| VmError::Boot(format!("starting {who}'s jail: {what}: {e}"));
    let exe = std::env::current_exe().map_err(fail("finding airlock's own binary"))?;
    let null = fs::File::open("/dev/null").map_err(fail("opening /dev/null"))?;
    let id_map = match start.ids {
        Some((uid, gid)) => IdMap {
            uid_map: format!("0 {uid} {}\n", start.id_count),
            gid_map: format!("0 {gid} {}\n", start.id_count),
            deny_setgroups: false,
            host_root_uid: uid,
        },
        None => IdMap::for_current_user(0),
    };
    let request = SpawnRequest {
        agent_exe: &exe,
        agent_args: &["airlock", JAIL_ROLE],
        stdio: [start.stdin.unwrap_or(null.as_fd()), null.as_fd(), start.stderr.as_fd()],
        workspace_tree: start.tree,
        egress_channel: None,
        id_map: &id_map,
        cgroup: None,
    };
    let spawned = jail_spawn::spawn(&request, |pid| match start.cgroup {
        Some(cgroup) => cgroup.add_pid(pid).map_err(|e| e.to_string()),
        None => Ok(()),
    })
    .map_err(|e| VmError::Boot(format!("starting {who}'s jail: {e}")))?;
    let pid = spawned.pid;
    let result = (|| {
        let mut control = spawned.control;
        let plan = serde_json::to_vec(start.plan).map_err(|e| VmError::Boot(format!("{who}'s plan: {e}")))?;
        control.write_all(&plan).map_err(fail("sending the plan"))?;
        control.shutdown(std::net::Shutdown::Write).map_err(fail("sending the plan"))?;
        control.set_read_timeout(Some(JAIL_DEADLINE)).map_err(fail("reading its answer"))?;
        let mut answer = String::new();
        let read = control.read_to_string(&mut answer);
        // "exec", then the end of the channel as the exec closes it; or
        // an error, before or instead of the exec.
        if read.is_ok() && answer == "exec\n" {
            return Ok(());
        }
        let error = answer.trim_start_matches("exec\n").trim();
        Err(VmError::Boot(match (error.strip_prefix("error: "), read) {
            (Some(error), _) => format!("confining {who}: {}", error.replace(['\n', '\r'], " ")),
            (None, Err(e)) => format!("confining {who}: no answer from its jail: {e}"),
            (None, Ok(_)) => format!("confining {who}: its jail ended without an answer"),
        }))
    })();
    match result {
        Ok(()) => Ok(pid),
        Err(e) => {
            sys::kill_and_reap(pid);
            Err(e)
        }
    }
}

/// `airlock __vm-jail`: confines itself by the plan read from its control
/// channel, then becomes QEMU. Returns only on failure (exit code 125),
/// having told the host why.
pub fn main() -> i32 {
    // SAFETY: the host placed the control channel at this descriptor and
    // nothing else in this process owns it.
    let mut control = unsafe { UnixStream::from_raw_fd(AGENT_CONTROL_FD) };
    let error = match confine_and_exec(&mut control) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let _ = control.write_all(format!("error: {error}\n").as_bytes());
    125
}

/// Why the jailer could not become QEMU.
#[derive(Debug, thiserror::Error)]
enum JailError {
    #[error("reading its plan: {0}")]
    Plan(String),
    #[error("building QEMU's mount view: {0}")]
    Mount(#[from] mounts::MountError),
    #[error(transparent)]
    Privileges(#[from] privileges::PrivError),
    #[error("capabilities are still held after dropping them")]
    CapabilitiesLeft,
    #[error(transparent)]
    Seccomp(#[from] airlock_jail::seccomp::SeccompError),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

enum Never {}

fn confine_and_exec(control: &mut UnixStream) -> Result<Never, JailError> {
    let os = |what: &'static str| move |source: io::Error| JailError::Os { what, source };
    let mut bytes = Vec::new();
    control.read_to_end(&mut bytes).map_err(|e| JailError::Plan(e.to_string()))?;
    let plan: Plan = serde_json::from_slice(&bytes).map_err(|e| JailError::Plan(e.to_string()))?;
    let view = View {
        read_only: plan.read_only,
        writable: plan.writable,
        devices: plan.devices,
        hidden: plan.hidden,
        proc: plan.proc,
        read_only_at: plan.read_only_at,
    };
    let tree = plan.attach.as_ref().map(|_| {
        // SAFETY: the host placed the tree at this descriptor (the plan
        // says so) and nothing else in this process owns it.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(AGENT_WORKSPACE_FD) }
    });
    let attach = plan
        .attach
        .as_deref()
        .zip(tree.as_ref())
        .map(|(path, tree)| mounts::Attach { tree: tree.as_fd(), path });
    // The bounding set is emptied while /proc still shows how many
    // capabilities there are; only what the mounts need is kept meanwhile.
    if plan.keep_capabilities.is_empty() {
        privileges::drop_capabilities_except(&[privileges::CAP_SYS_ADMIN])?;
        mounts::enter_view_attaching(&plan.mountpoint, &view, attach)?;
        privileges::clear_capability_sets()?;
        if !privileges::holds_no_capabilities() {
            return Err(JailError::CapabilitiesLeft);
        }
    } else {
        // Root of its own user namespace, it execs holding the bounding
        // set's capabilities, none of them over anything of the host's
        // but the files owned by its own uid.
        privileges::limit_bounding_set(&plan.keep_capabilities)?;
        mounts::enter_view_attaching(&plan.mountpoint, &view, attach)?;
    }
    // Attached: the mount stays with the view, the descriptor is not passed on.
    drop(tree);
    privileges::set_no_new_privs()?;
    if plan.setgroups_noop {
        airlock_jail::seccomp::install(&airlock_jail::seccomp::setgroups_noop()?)?;
    }
    if plan.no_setid_bits {
        let sets = [airlock_jail::seccomp::RuleSet::NoSetIdBits];
        airlock_jail::seccomp::install(&airlock_jail::seccomp::compile_sets(&sets)?)?;
    }
    sys::raw_set_pdeathsig(libc::SIGKILL).map_err(os("setting the parent-death signal"))?;
    // A host that died before the signal was armed has closed its end.
    control.write_all(b"exec\n").map_err(os("telling the host"))?;
    // Only stdin, stdout and stderr pass to QEMU; the control channel closes.
    sys::cloexec_from(AGENT_CONTROL_FD).map_err(os("closing the control channel on exec"))?;
    let error = Command::new(&plan.program).args(&plan.args).env_clear().exec();
    Err(JailError::Os { what: "executing QEMU", source: error })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// With this host's QEMU: the plan holds its binary, loader, libraries
    /// and firmware; the TCG module only under TCG; /dev/kvm only with KVM.
    #[test]
    fn the_plan_holds_what_qemu_loads_and_kvm_only_with_kvm() {
        let Ok(program) = qemu_program() else {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "needs qemu-system-x86_64 under CI=true");
            eprintln!("skipping: no {}", crate::engine::QEMU);
            return;
        };
        let run = tempfile::tempdir().unwrap();
        let layers = [PathBuf::from("/s/layers/aa"), PathBuf::from("/s/layers/bb")];
        let needs = |accel| Needs {
            accel,
            kernel: Path::new("/boot/vmlinuz"),
            initramfs: Path::new("/boot/initrd.img"),
            shares: vec![PathBuf::from("/opt")],
            hidden: vec![PathBuf::from("/etc/shadow")],
            run_dir: run.path(),
            disk: None,
            proc: false,
            image_layers: &layers,
        };
        let tcg = plan(&program, vec!["-M".into(), "microvm".into()], &needs(Accel::Tcg)).unwrap();
        assert!(tcg.read_only.contains(&program));
        assert!(tcg.read_only.iter().any(|p| p.to_string_lossy().contains("libc.so")), "{:?}", tcg.read_only);
        assert!(tcg.read_only.iter().any(|p| p.ends_with("bios-microvm.bin")), "{:?}", tcg.read_only);
        assert!(tcg.read_only.contains(&PathBuf::from("/opt")));
        assert_eq!(tcg.writable, [run.path().to_path_buf()]);
        assert!(tcg.devices.is_empty());
        assert_eq!(tcg.hidden, [PathBuf::from("/etc/shadow")]);
        // An image's layers are gathered under one directory, bottom first,
        // and seen nowhere else.
        assert_eq!(
            tcg.read_only_at,
            [
                BindAt { host: layers[0].clone(), at: PathBuf::from("/airlock-image/0") },
                BindAt { host: layers[1].clone(), at: PathBuf::from("/airlock-image/1") },
            ]
        );
        assert!(!tcg.read_only.iter().any(|p| p.starts_with("/s")), "{:?}", tcg.read_only);
        assert!(
            !tcg.read_only.iter().any(|p| p.starts_with(&tcg.mountpoint) || tcg.mountpoint.starts_with(p))
        );
        let kvm = plan(&program, Vec::new(), &needs(Accel::Kvm)).unwrap();
        assert_eq!(kvm.devices, [PathBuf::from("/dev/kvm")]);
        let module = |p: &Plan| p.read_only.iter().any(|p| p.ends_with("accel-tcg-x86_64.so"));
        assert!(!module(&kvm), "the TCG module is in a KVM guest's view");
        let has_module = module_dirs(program.parent().unwrap().parent().unwrap())
            .any(|d| d.join("accel-tcg-x86_64.so").exists());
        assert_eq!(module(&tcg), has_module);
    }

    #[test]
    fn the_loaders_list_gives_every_path_and_no_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_library_list(text),
            [PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
    }

    #[test]
    fn virtiofsd_sees_its_binary_and_the_layer_and_keeps_only_its_capabilities() {
        let program = Path::new(VIRTIOFSD);
        if !program.exists() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "needs {VIRTIOFSD} under CI=true");
            eprintln!("skipping: no {VIRTIOFSD}");
            return;
        }
        let layer = tempfile::tempdir().unwrap();
        let plan = plan_virtiofsd(
            program,
            vec!["--fd=0".into()],
            layer.path(),
            Served::Bound,
            VIRTIOFSD_CAPABILITIES,
        )
        .unwrap();
        assert_eq!(plan.writable, [layer.path().to_path_buf()]);
        assert!(plan.read_only.contains(&program.to_path_buf()));
        assert!(
            plan.read_only.iter().all(|p| p == program
                || p == Path::new("/etc/ld.so.cache")
                || p.to_string_lossy().contains(".so")),
            "{:?}",
            plan.read_only
        );
        assert!(plan.devices.is_empty() && plan.proc);
        // Never CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_NET_ADMIN or CAP_SYS_MODULE.
        for forbidden in [21, 19, 12, 16] {
            assert!(!plan.keep_capabilities.contains(&forbidden), "{forbidden}");
        }
        assert_eq!(plan.attach, None);

        // The workspace as root: attached from the host's id-mapped tree,
        // not bound; the plan travels to the jailer and back whole.
        let workspace = tempfile::tempdir().unwrap();
        let keep: Vec<u32> = VIRTIOFSD_CAPABILITIES.iter().copied().filter(|c| *c != CAP_SETFCAP).collect();
        let plan = plan_virtiofsd(program, Vec::new(), workspace.path(), Served::Attached, &keep).unwrap();
        assert!(plan.writable.is_empty());
        assert_eq!(plan.attach.as_deref(), Some(workspace.path()));
        assert!(!plan.keep_capabilities.contains(&CAP_SETFCAP));
        assert!(
            !workspace.path().starts_with(&plan.mountpoint) && !plan.mountpoint.starts_with(workspace.path())
        );
        let sent: Plan = serde_json::from_slice(&serde_json::to_vec(&plan).unwrap()).unwrap();
        assert_eq!(sent, plan);
    }
}
