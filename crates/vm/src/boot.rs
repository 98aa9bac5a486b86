//! Starting a guest: QEMU's `microvm` machine, jailed, with the fewest
//! devices — a serial console (a log file), one virtio-serial port (the
//! agent's channel), a second one for egress when the sandbox has any,
//! read-only 9p shares (the host's directories, or an image's layers all
//! in one; the workspace in modes ro and overlay), and one virtio-fs
//! device for what the guest writes (an overlay workspace's layer, or the
//! workspace in mode rw), served by a jailed virtiofsd — and the agent's
//! first word over the channel.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_jail::cgroup::SandboxCgroup;
use airlock_proto::AgentMessage;

use crate::egress_port::HostEgress;
use crate::engine::Accel;
use crate::guest::Guest;
use crate::init::{PORT_NAME, RootEntry, WORKSPACE_TAG, share_tag};
use crate::jail;
use crate::limits::GuestLimits;
use crate::{GUEST_ROLE, VmError};

/// What a guest gets.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub accel: Accel,
    pub memory_mib: u64,
    pub cpus: u32,
    /// How long the guest may take to boot to its agent.
    pub deadline: Duration,
    /// The guest's root: what of the host it sees, read-only.
    pub root: Vec<RootEntry>,
    /// An image's unpacked layers, bottom first, at most
    /// [`MAX_IMAGE_LAYERS`]: gathered in QEMU's view under
    /// [`jail::IMAGE_DIR`] and shared as one read-only 9p share (tag
    /// [`IMAGE_TAG`]), whose directories the guest stacks as overlay lowers
    /// for its root in place of the host's directories.
    pub image_layers: Vec<PathBuf>,
    /// The cgroup QEMU runs in (its limits cover QEMU as a whole: guest
    /// RAM, vCPUs and what QEMU spends itself); placed before it starts.
    pub cgroup: Option<SandboxCgroup>,
    /// The guest has egress: a second virtio-serial port, served by
    /// [`crate::egress_port`], and loopback with the proxy ports inside.
    pub egress: bool,
    /// Transparent egress (with `egress` only): the redirection the guest's
    /// PID 1 installs before any command runs, said on its command line.
    pub redirect: Option<airlock_jail::plan::Redirect>,
    /// The host directory the guest writes (an overlay workspace's layer,
    /// or the workspace in mode rw), served over virtio-fs by a jailed
    /// virtiofsd, never by QEMU.
    pub writable: Option<WritableShare>,
    /// The policy's limits the guest enforces inside.
    pub limits: GuestLimits,
    /// The policy's `[audit] exec_trace`: the guest's agent records every
    /// exec inside and reports it (said on its command line).
    pub exec_trace: bool,
    /// The host connects to ports inside (published ports, or the
    /// container engine's socket): a virtio-serial port of its own, served
    /// by [`crate::ports_port`].
    pub ports: bool,
    /// A container engine in the guest (see [`crate::containers`]): its
    /// disk, a raw file the guest alone formats and mounts, attached as a
    /// virtio block device. Writable in QEMU's view; nothing else of the
    /// host's is.
    pub engine_disk: Option<PathBuf>,
}

/// The word of init's command line that turns the guest's exec trace on.
pub const EXEC_TRACE_ARG: &str = "exectrace";

/// What the guest does with the host directory it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// An overlay workspace's writable layer: the guest mounts the
    /// workspace (read-only 9p) as an overlay over its `upper` and `work`.
    Layer,
    /// The workspace itself (mode rw), mounted at its own path.
    Workspace,
}

/// A host directory the guest writes, as virtiofsd serves it.
#[derive(Debug, Clone)]
pub struct WritableShare {
    pub writes: Writes,
    /// What virtiofsd serves and chroots into: the layer directory (holding
    /// `upper` and `work`, and nothing else), or the workspace.
    pub dir: PathBuf,
    /// As root: the first of the sandbox's block of 65536 host ids, which
    /// virtiofsd's user namespace maps 0–65535 to (the layer's owner is its
    /// root, the block's first id, as a process-tier sandbox's). None: the
    /// caller's own uid, alone.
    pub first_host_uid: Option<u32>,
    /// As root, for the workspace: a detached id-mapped tree of it with the
    /// block's map (host id u is u in the guest, as in a process-tier
    /// sandbox's workspace), which virtiofsd's jail attaches in place of a
    /// bind. Rootless, the workspace is bound, the caller's ids alone.
    pub tree: Option<Arc<OwnedFd>>,
}

/// A running guest; killed (and its directory removed) when dropped.
pub struct Vm {
    qemu: Qemu,
    /// The agent's channel.
    pub channel: UnixStream,
    /// From starting QEMU to the agent's `Serving`.
    pub boot_time: Duration,
    /// The way into the guest's ports, when it has one.
    pub ports: Option<crate::ports_port::HostPorts>,
}

/// A QEMU child (the KVM trial's) dies with the process that started it.
pub(crate) fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and makes one prctl
    // system call, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            Ok(())
        });
    }
}

/// First of the host ids QEMU runs as when airlock is root: below the
/// egress proxies' (999,000,000) and the sandboxes' (1,000,000,000) ranges.
pub const QEMU_FIRST_UID: u32 = 998_000_000;

/// The ids QEMU runs as, as root: a uid of its own per airlock process
/// (pids of live processes are distinct, so two running microVMs never
/// share one, and a reused pid's QEMU died with its airlock); the group of
/// `/dev/kvm` when it uses KVM, else the same number as the uid. It then
/// reads only what the world may read of the shared directories.
fn qemu_ids(accel: Accel) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let uid = QEMU_FIRST_UID + std::process::id();
    let gid = match accel {
        Accel::Kvm => fs::metadata("/dev/kvm").map_or(uid, |m| m.gid()),
        Accel::Tcg => uid,
    };
    (uid, gid)
}

/// The host's TSC rate in kHz, for a guest under emulation (the microvm
/// machine has no timer the kernel can calibrate against there).
fn tsc_khz() -> u64 {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map_or(2_000_000, |mhz| (mhz * 1000.0) as u64)
}

/// The kernel's command line: quiet, reboot (and so QEMU's exit) on panic,
/// and the agent's role for /init.
/// The longest command line an x86 kernel keeps (COMMAND_LINE_SIZE, its
/// NUL included); it cuts longer ones silently, which would drop masks.
const MAX_COMMAND_LINE: usize = 2047;

/// The word on the kernel's command line that tells the guest it has an
/// egress port (with transparent egress, the word says what it redirects:
/// [`crate::egress_port::egress_arg`]).
pub const EGRESS_ARG: &str = "egress:on";

/// The most words the kernel passes its init after `--` (its
/// MAX_INIT_ARGS, 32; argv[0] comes on top). One more panics the kernel at
/// boot ("Too many boot init vars").
const MAX_INIT_WORDS: usize = 32;

/// The word on the kernel's command line that tells the guest its
/// workspace is an overlay whose writable layer is the virtio-fs share.
pub const LAYER_ARG: &str = "layer:on";

/// The prefix of the word on the kernel's command line that tells the
/// guest how many image layers it has (`image:N`): one word, whatever the
/// number, since the share names its layers' directories by number.
pub const IMAGE_ARG: &str = "image:";

/// The most image layers a guest takes: as many as the process tier's
/// overlay stacks (the guest's overlay options for them fit a page: see
/// [`crate::init`]'s tests). The layers take one device whatever their
/// number.
pub const MAX_IMAGE_LAYERS: usize = airlock_jail::mounts::MAX_IMAGE_LAYERS;

/// The 9p tag of the one share holding an image's layers, a directory
/// each, named by its place from the bottom (`0`, `1`, …).
pub const IMAGE_TAG: &str = "img";

/// The number of image layers the guest's arguments announce.
pub fn image_layers_from_args<S: AsRef<str>>(args: impl IntoIterator<Item = S>) -> usize {
    args.into_iter()
        .find_map(|a| a.as_ref().strip_prefix(IMAGE_ARG).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// The virtio-fs share's tag when it is an overlay's layer.
pub const LAYER_TAG: &str = "layer";

/// The word on the kernel's command line that tells the guest its
/// workspace is the virtio-fs share itself (mode rw).
pub const RW_ARG: &str = "rw:on";

/// The virtio-fs share's tag when it is the workspace.
pub const RW_TAG: &str = "rw";

impl Writes {
    /// The virtio-fs share's tag, and the word that tells the guest.
    fn tag_and_arg(self) -> (&'static str, &'static str) {
        match self {
            Writes::Layer => (LAYER_TAG, LAYER_ARG),
            Writes::Workspace => (RW_TAG, RW_ARG),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn kernel_command_line(
    accel: Accel,
    root: &[RootEntry],
    image_layers: usize,
    egress: bool,
    writes: Option<Writes>,
    redirect: Option<&airlock_jail::plan::Redirect>,
    limits: GuestLimits,
    exec_trace: bool,
    ports: bool,
    containers: bool,
) -> Result<String, VmError> {
    let mut line = String::from("console=ttyS0 quiet panic=-1 reboot=t");
    if accel == Accel::Tcg {
        line.push_str(&format!(" tsc_early_khz={}", tsc_khz()));
    }
    // What follows `--` is init's argv: a few words, whatever the policy
    // (the kernel panics past 32 of them).
    line.push_str(&format!(" -- {GUEST_ROLE}"));
    if egress {
        line.push(' ');
        line.push_str(&crate::egress_port::egress_arg(redirect));
    }
    if let Some(writes) = writes {
        line.push(' ');
        line.push_str(writes.tag_and_arg().1);
    }
    if exec_trace {
        line.push(' ');
        line.push_str(EXEC_TRACE_ARG);
    }
    if ports {
        line.push(' ');
        line.push_str(crate::ports_port::PORTS_ARG);
    }
    if containers {
        line.push(' ');
        line.push_str(crate::containers::CONTAINERS_ARG);
    }
    if image_layers > 0 {
        line.push_str(&format!(" {IMAGE_ARG}{image_layers}"));
    }
    line.push(' ');
    line.push_str(&limits.to_arg());
    line.push(' ');
    line.push_str(&RootEntry::list_to_arg(root));
    // A path with a space would split into words of its own.
    let words = line.split_once(" -- ").map_or(0, |(_, init)| init.split(' ').count());
    if words > MAX_INIT_WORDS {
        return Err(VmError::Boot(format!(
            "the guest's init would get {words} words on the kernel's command line (at most {MAX_INIT_WORDS}): \
             a path of the guest's root has spaces, which the command line cannot carry"
        )));
    }
    if line.len() > MAX_COMMAND_LINE {
        return Err(VmError::Boot(format!(
            "the guest's root does not fit the kernel's command line ({} bytes, at most {MAX_COMMAND_LINE}): \
             list fewer or shorter paths in filesystem.read_only and filesystem.hidden",
            line.len()
        )));
    }
    Ok(line)
}

/// The size of TCG's translation buffer, in MiB (QEMU's default is 1 GiB).
pub const TCG_TRANSLATION_MIB: u64 = 128;

fn qemu_args(
    guest: &Guest,
    spec: &BootSpec,
    socket: &Path,
    egress_socket: &Path,
    ports_socket: &Path,
    fs_socket: &Path,
    console: &Path,
) -> Result<Vec<String>, VmError> {
    let accel = match spec.accel {
        // TCG's translated code is held to a bounded buffer, so QEMU's
        // memory beyond the guest's RAM stays within its cgroup's allowance.
        Accel::Tcg => format!("tcg,tb-size={TCG_TRANSLATION_MIB}"),
        Accel::Kvm => "kvm".to_owned(),
    };
    let writes = spec.writable.as_ref().map(|w| w.writes);
    // virtio-fs needs the guest's RAM shared with virtiofsd: a memfd.
    let machine = if writes.is_some() { "microvm,memory-backend=ram" } else { "microvm" };
    let mut args: Vec<String> = vec!["-M".into(), machine.into(), "-accel".into(), accel];
    if spec.accel == Accel::Kvm {
        args.extend(["-cpu".into(), "host".into()]);
    }
    let path = |p: &Path| p.to_string_lossy().replace(',', ",,");
    args.extend([
        "-m".into(),
        format!("{}M", spec.memory_mib),
        "-smp".into(),
        spec.cpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        // QEMU's own seccomp filter: no obsolete system calls, no change of
        // ids, no new processes, no scheduling or resource changes.
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-serial".into(),
        format!("file:{}", path(console)),
        "-kernel".into(),
        guest.kernel.to_string_lossy().into_owned(),
        "-initrd".into(),
        guest.initramfs.to_string_lossy().into_owned(),
        "-append".into(),
        kernel_command_line(
            spec.accel,
            &spec.root,
            spec.image_layers.len(),
            spec.egress,
            writes,
            spec.redirect.as_ref(),
            spec.limits,
            spec.exec_trace,
            spec.ports,
            spec.engine_disk.is_some(),
        )?,
        "-chardev".into(),
        format!("socket,id=agent,path={}", path(socket)),
        "-device".into(),
        "virtio-serial-device".into(),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={PORT_NAME}"),
    ]);
    if spec.egress {
        // The guest's only way out: a port of its own to the egress proxy.
        args.extend([
            "-chardev".into(),
            format!("socket,id=egress,path={}", path(egress_socket)),
            "-device".into(),
            format!("virtserialport,chardev=egress,name={}", crate::egress_port::PORT_NAME),
        ]);
    }
    if spec.ports {
        // Published ports: the host's connections into the guest.
        args.extend([
            "-chardev".into(),
            format!("socket,id=ports,path={}", path(ports_socket)),
            "-device".into(),
            format!("virtserialport,chardev=ports,name={}", crate::ports_port::PORT_NAME),
        ]);
    }
    if let Some(disk) = &spec.engine_disk {
        // The container engine's disk: raw, the guest's discards given back
        // to the host; its flushes ignored (`cache=unsafe`), since the
        // guest formats it anew at every boot and nothing on it outlives
        // the VM.
        args.extend([
            "-drive".into(),
            format!("file={},if=none,id=engine,format=raw,cache=unsafe,discard=unmap", path(disk)),
            "-device".into(),
            "virtio-blk-device,drive=engine".into(),
        ]);
    }
    if let Some(writes) = writes {
        let tag = writes.tag_and_arg().0;
        args.extend([
            // virtiofsd serves virtio 1.0 only; microvm's virtio-mmio
            // devices are legacy unless told otherwise.
            "-global".into(),
            "virtio-mmio.force-legacy=false".into(),
            "-object".into(),
            format!("memory-backend-memfd,id=ram,size={}M,share=on", spec.memory_mib),
            "-chardev".into(),
            format!("socket,id={tag},path={}", path(fs_socket)),
            "-device".into(),
            format!("vhost-user-fs-device,chardev={tag},tag={tag}"),
        ]);
    }
    let shares = spec.root.iter().filter_map(|e| match e {
        RootEntry::Share(p) => Some(p),
        _ => None,
    });
    // The workspace (modes ro and overlay) is one more read-only share,
    // with a tag of its own; in mode rw QEMU gets no share of it at all.
    let workspace = spec.root.iter().find_map(|e| match e {
        RootEntry::Workspace(path) if writes != Some(Writes::Workspace) => {
            Some((WORKSPACE_TAG.to_owned(), path))
        }
        _ => None,
    });
    if spec.image_layers.len() > MAX_IMAGE_LAYERS {
        return Err(VmError::Boot(format!(
            "the image has {} layers; a guest stacks at most {MAX_IMAGE_LAYERS}",
            spec.image_layers.len()
        )));
    }
    let image_dir = PathBuf::from(jail::IMAGE_DIR);
    let image = (!spec.image_layers.is_empty()).then(|| (IMAGE_TAG.to_owned(), &image_dir));
    // `multidevs=remap`: a share that spans mounts (the image's directory
    // on the view's tmpfs, its layers bound below it) keeps inode numbers
    // apart for the guest.
    for (tag, share) in shares.enumerate().map(|(i, p)| (share_tag(i), p)).chain(workspace).chain(image) {
        args.extend([
            "-fsdev".into(),
            format!("local,id={tag},path={},security_model=none,readonly=on,multidevs=remap", path(share)),
            "-device".into(),
            format!("virtio-9p-device,fsdev={tag},mount_tag={tag}"),
        ]);
    }
    Ok(args)
}

impl Vm {
    /// Boots `guest`, with its sockets and logs in `dir` (created here,
    /// removed with the VM); `egress` serves its egress port when
    /// `spec.egress` asks for one.
    pub fn boot(
        guest: &Guest,
        spec: &BootSpec,
        dir: &Path,
        egress: Option<HostEgress>,
    ) -> Result<Vm, VmError> {
        // The runs' directory is searchable (QEMU, under its own uid, must
        // reach its run's socket) but not listable; each run's is QEMU's own.
        if let Some(runs) = dir.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(runs)
                .map_err(|e| VmError::io(runs, e))?;
            fs::set_permissions(runs, std::os::unix::fs::PermissionsExt::from_mode(0o711))
                .map_err(|e| VmError::io(runs, e))?;
        }
        if let Some(runs) = dir.parent() {
            sweep_runs(runs);
        }
        if spec.egress != egress.is_some() {
            return Err(VmError::Boot("an egress port without its proxy, or the reverse".into()));
        }
        fs::DirBuilder::new().mode(0o700).create(dir).map_err(|e| VmError::io(dir, e))?;
        // Removed again if QEMU does not start; once it has, its guard removes it.
        let Started { pid, virtiofsd, agent, egress_port, ports_port, started } =
            match start_qemu(guest, spec, dir) {
                Ok(started) => started,
                Err(e) => {
                    let _ = fs::remove_dir_all(dir);
                    return Err(e);
                }
            };
        let mut qemu = Qemu { pid, virtiofsd, status: None, dir: dir.to_path_buf() };
        let deadline = started + spec.deadline;
        let mut channel = qemu.accept(&agent, deadline)?;
        if let (Some(listener), Some(egress)) = (egress_port, egress) {
            // Served from now on: the guest reads its trust bundle before
            // its agent says it serves.
            let port = qemu.accept(&listener, deadline)?;
            crate::egress_port::serve_host(port, egress)
                .map_err(|e| VmError::Boot(format!("cannot serve the egress port: {e}")))?;
        }
        let ports = match ports_port {
            Some(listener) => {
                let port = qemu.accept(&listener, deadline)?;
                Some(
                    crate::ports_port::HostPorts::serve(port)
                        .map_err(|e| VmError::Boot(format!("cannot serve the ports port: {e}")))?,
                )
            }
            None => None,
        };
        qemu.await_agent(&mut channel, deadline)?;
        let vm = Vm { qemu, channel, boot_time: started.elapsed(), ports };
        tracing::info!(
            ms = vm.boot_time.as_millis() as u64,
            accel = spec.accel.as_str(),
            "guest agent serving"
        );
        Ok(vm)
    }

    /// Why the guest ended on its own (see [`Qemu::ended`]).
    pub fn ended(&mut self, during: &str) -> VmError {
        self.qemu.ended(during)
    }

    /// An error that carries the end of QEMU's log and of the guest's console.
    pub fn failure(&self, what: &str) -> VmError {
        self.qemu.failure(what)
    }

    /// QEMU's host process id (PID 1 of its own PID namespace).
    pub fn pid(&self) -> i32 {
        self.qemu.pid
    }

    /// virtiofsd's host process id, when the guest writes a host directory.
    pub fn virtiofsd_pid(&self) -> Option<i32> {
        self.qemu.virtiofsd
    }

    /// Kills QEMU (and the guest with it) and reaps it: its raw wait
    /// status, unless it was reaped before or could not be. Its directory
    /// goes when this is dropped.
    pub fn kill(&mut self) -> Option<i32> {
        if self.qemu.status.is_some() {
            return None;
        }
        // QEMU is our unreaped child: its pid cannot have been reused.
        if let Some(pid) = rustix::process::Pid::from_raw(self.qemu.pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        let status = airlock_jail::sys::wait_pid(self.qemu.pid).ok();
        self.qemu.status = Some("killed".to_owned());
        if let Some(virtiofsd) = self.qemu.virtiofsd.take() {
            airlock_jail::sys::kill_and_reap(virtiofsd);
        }
        status
    }
}

/// A jailed QEMU just started.
struct Started {
    pid: i32,
    virtiofsd: Option<i32>,
    /// Where QEMU connects the agent's port.
    agent: UnixListener,
    /// Where QEMU connects the egress port, when the guest has one.
    egress_port: Option<UnixListener>,
    /// Where QEMU connects the ports port, when the guest has one.
    ports_port: Option<UnixListener>,
    started: Instant,
}

/// Starts QEMU, jailed, for a guest whose run directory `dir` exists. Its
/// sockets are there, beside the console log: the run's directory is the
/// only path QEMU may write in its view.
fn start_qemu(guest: &Guest, spec: &BootSpec, dir: &Path) -> Result<Started, VmError> {
    let socket = dir.join("agent.sock");
    let console = dir.join("console.log");
    let listen = |path: &Path| -> Result<UnixListener, VmError> {
        let listener = UnixListener::bind(path).map_err(|e| VmError::io(path, e))?;
        listener.set_nonblocking(true).map_err(|e| VmError::io(path, e))?;
        Ok(listener)
    };
    let agent = listen(&socket)?;
    let egress_socket = dir.join("egress.sock");
    let egress_port = if spec.egress { Some(listen(&egress_socket)?) } else { None };
    let ports_socket = dir.join("ports.sock");
    let ports_port = if spec.ports { Some(listen(&ports_socket)?) } else { None };
    let fs_socket = dir.join("fs.sock");
    let writes = spec.writable.as_ref().map(|w| w.writes);
    let virtiofsd = match &spec.writable {
        Some(share) => Some(start_virtiofsd(share, &fs_socket, dir, spec.cgroup.as_ref())?),
        None => None,
    };
    // QEMU's start failing below leaves no virtiofsd behind.
    let virtiofsd_guard = KillOnDrop(virtiofsd);
    let qemu_log = dir.join("qemu.log");
    let log = fs::File::create(&qemu_log).map_err(|e| VmError::io(&qemu_log, e))?;
    let program = jail::qemu_program()?;
    let needs = jail::Needs {
        accel: spec.accel,
        kernel: &guest.kernel,
        initramfs: &guest.initramfs,
        // The workspace (modes ro and overlay) is shared read-only like the
        // root's directories; in mode rw QEMU does not see it.
        shares: spec
            .root
            .iter()
            .filter_map(|e| match e {
                RootEntry::Share(p) => Some(p.clone()),
                RootEntry::Workspace(p) if writes != Some(Writes::Workspace) => Some(p.clone()),
                _ => None,
            })
            .collect(),
        hidden: spec
            .root
            .iter()
            .filter_map(|e| match e {
                RootEntry::Hide(p) => Some(p.clone()),
                _ => None,
            })
            .collect(),
        run_dir: dir,
        disk: spec.engine_disk.as_deref(),
        // An overlay's lower layers: 9p answers its xattr questions.
        proc: writes == Some(Writes::Layer) || !spec.image_layers.is_empty(),
        image_layers: &spec.image_layers,
    };
    let plan = jail::plan(
        &program,
        qemu_args(guest, spec, &socket, &egress_socket, &ports_socket, &fs_socket, &console)?,
        &needs,
    )?;
    let ids = if rustix::process::geteuid().is_root() {
        let (uid, gid) = qemu_ids(spec.accel);
        // QEMU creates the console log and connects to the sockets as itself.
        let sockets = std::iter::once(&socket)
            .chain(spec.egress.then_some(&egress_socket))
            .chain(spec.ports.then_some(&ports_socket))
            .chain(writes.is_some().then_some(&fs_socket))
            .chain(spec.engine_disk.as_ref());
        for path in std::iter::once(dir).chain(sockets.map(PathBuf::as_path)) {
            rustix::fs::chown(
                path,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(|e| VmError::io(path, e.into()))?;
        }
        Some((uid, gid))
    } else {
        None
    };
    let started = Instant::now();
    let pid = jail::spawn(&jail::Start {
        plan: &plan,
        ids,
        id_count: 1,
        stderr: &log,
        stdin: None,
        tree: None,
        cgroup: spec.cgroup.as_ref(),
    })?;
    let virtiofsd = virtiofsd_guard.defuse();
    Ok(Started { pid, virtiofsd, agent, egress_port, ports_port, started })
}

/// A helper's pid, killed and reaped when dropped unless defused.
struct KillOnDrop(Option<i32>);

impl KillOnDrop {
    fn defuse(mut self) -> Option<i32> {
        self.0.take()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            airlock_jail::sys::kill_and_reap(pid);
        }
    }
}

/// Starts virtiofsd, jailed, serving `share` writable on a socket at
/// `socket` (bound here, handed over as its standard input): root of a user
/// namespace of its own that maps the guest's ids 0–65535 to the sandbox's
/// block of unprivileged host ids (its root, the block's first, owns the
/// layer) — or, rootless, to the caller alone — in a mount view holding
/// its binary, its libraries and the shared directory, where it chroots
/// into that directory, so a symlink the guest writes resolves inside it
/// (virtiofsd opens what it serves without following links, relative to
/// directories it holds open) and nothing else of the host is there to
/// reach. The workspace as root is the id-mapped tree of `share`, so the
/// guest's ids are the host's there, as in a process-tier sandbox's.
/// Guest-written xattrs are kept (overlay's `user.overlay.*` markers, and
/// the workspace's own); in the workspace file capabilities are refused.
fn start_virtiofsd(
    share: &WritableShare,
    socket: &Path,
    dir: &Path,
    cgroup: Option<&SandboxCgroup>,
) -> Result<i32, VmError> {
    let listener = UnixListener::bind(socket).map_err(|e| VmError::io(socket, e))?;
    let log_path = dir.join("virtiofsd.log");
    let log = fs::File::create(&log_path).map_err(|e| VmError::io(&log_path, e))?;
    let program = PathBuf::from(jail::VIRTIOFSD);
    if !program.exists() {
        return Err(VmError::Boot(format!(
            "{} is missing: the microVM tier's workspace in modes overlay and rw needs virtiofsd (Debian: \
             qemu-system-x86)",
            program.display()
        )));
    }
    let plan = virtiofsd_plan(&program, share)?;
    let ids = share.first_host_uid.map(|uid| (uid, uid));
    use std::os::fd::AsFd;
    jail::spawn(&jail::Start {
        plan: &plan,
        ids,
        id_count: 65_536,
        stderr: &log,
        stdin: Some(listener.as_fd()),
        tree: share.tree.as_deref().map(AsFd::as_fd),
        cgroup,
    })
}

/// virtiofsd's command line and jail for `share`.
fn virtiofsd_plan(program: &Path, share: &WritableShare) -> Result<jail::Plan, VmError> {
    let mut options = "sandbox=chroot,xattr,cache=auto".to_owned();
    let mut keep = jail::VIRTIOFSD_CAPABILITIES.to_vec();
    if share.writes == Writes::Workspace {
        // Set through the id-mapped workspace, a file capability would be
        // stored for host root and hold on the host: refused (EPERM).
        options.push_str(",modcaps=-setfcap");
        keep.retain(|c| *c != jail::CAP_SETFCAP);
    }
    let args = vec![
        "--fd=0".to_owned(),
        "-o".to_owned(),
        format!("source={}", share.dir.to_string_lossy().replace(',', "\\,")),
        "-o".to_owned(),
        options,
        "--rlimit-nofile=0".to_owned(),
    ];
    let served = if share.tree.is_some() { jail::Served::Attached } else { jail::Served::Bound };
    let mut plan = jail::plan_virtiofsd(program, args, &share.dir, served, &keep)?;
    // Rootless its user namespace denies setgroups for good; virtiofsd
    // exits unless dropping the caller's supplementary groups succeeds.
    plan.setgroups_noop = share.first_host_uid.is_none();
    // The workspace's files land in the host's tree as the guest marks
    // them: no setuid or setgid bit (EPERM to the guest).
    plan.no_setid_bits = share.writes == Writes::Workspace;
    Ok(plan)
}

/// The QEMU process and its run's directory; killed and removed when dropped.
struct Qemu {
    /// Host pid of QEMU (PID 1 of its own PID namespace), our child.
    pid: i32,
    /// Host pid of virtiofsd, our child too, when the guest has a layer.
    virtiofsd: Option<i32>,
    /// How it ended, once reaped.
    status: Option<String>,
    dir: PathBuf,
}

impl Qemu {
    fn accept(&mut self, listener: &UnixListener, deadline: Instant) -> Result<UnixStream, VmError> {
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).map_err(|e| VmError::io(&self.dir, e))?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(VmError::io(&self.dir, e)),
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(self.failure("QEMU did not connect to the agent's channel in time"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn await_agent(&mut self, channel: &mut UnixStream, deadline: Instant) -> Result<(), VmError> {
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        channel.set_read_timeout(Some(remaining)).map_err(|e| VmError::io(&self.dir, e))?;
        let first = airlock_proto::recv::<_, AgentMessage>(channel);
        channel.set_read_timeout(None).map_err(|e| VmError::io(&self.dir, e))?;
        match first {
            Ok(Some(AgentMessage::Serving)) => Ok(()),
            Ok(Some(other)) => Err(self.failure(&format!("the guest's agent said {other:?} first"))),
            Ok(None) => Err(self.ended("before its agent started")),
            Err(airlock_proto::ProtoError::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
            {
                Err(self.failure("the guest's agent did not start in time"))
            }
            Err(e) => Err(self.failure(&format!("the guest's agent: {e}"))),
        }
    }

    /// How QEMU ended, if it has (reaped here).
    fn try_wait(&mut self) -> Option<String> {
        if self.status.is_none()
            && let Some(pid) = rustix::process::Pid::from_raw(self.pid)
            && let Ok(Some((_, status))) =
                rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG)
        {
            self.status = Some(match (status.exit_status(), status.terminating_signal()) {
                (Some(code), _) => format!("exit status: {code}"),
                (None, Some(signal)) => format!("signal: {signal}"),
                _ => "ended".to_owned(),
            });
        }
        self.status.clone()
    }

    fn check_alive(&mut self) -> Result<(), VmError> {
        match self.try_wait() {
            Some(status) => Err(self.failure(&format!("QEMU ended ({status})"))),
            None => Ok(()),
        }
    }

    /// Why the guest ended on its own (its channel closed): a kernel panic,
    /// a power-off, or QEMU's end, read from the guest's console once QEMU
    /// has exited (briefly waited for; it flushes the console as it goes).
    fn ended(&mut self, during: &str) -> VmError {
        let waited = Instant::now();
        while waited.elapsed() < Duration::from_secs(2) && self.try_wait().is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let console = fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let what = if let Some(panic) = console.lines().find(|l| l.contains("Kernel panic")) {
            let reason =
                panic.split_once("Kernel panic").map_or("", |(_, r)| r).trim_start_matches([' ', '-']);
            format!("the guest's kernel panicked {during} ({})", printable(reason.trim()))
        } else if console.contains("reboot: Power down") || console.contains("reboot: System halted") {
            format!("the guest powered off {during}")
        } else if console.contains("reboot: Restarting system") {
            format!("the guest rebooted {during}")
        } else {
            match self.try_wait() {
                Some(status) => format!("QEMU ended ({status}) {during}"),
                None => format!("the guest closed its channel {during}"),
            }
        };
        self.failure(&what)
    }

    fn failure(&self, what: &str) -> VmError {
        let tail = |name: &str| {
            let text = fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<String> = text.lines().filter(|l| !l.trim().is_empty()).map(printable).collect();
            lines[lines.len().saturating_sub(12)..].join("\n")
        };
        let mut qemu = tail("qemu.log");
        let virtiofsd = tail("virtiofsd.log");
        if !virtiofsd.is_empty() {
            qemu.push_str(&format!("\n  virtiofsd said: {virtiofsd}"));
        }
        VmError::Guest { what: what.to_owned(), qemu, console: tail("console.log") }
    }
}

/// Removes the directories of runs whose airlock is gone (killed before it
/// could clean up): each is named `<pid>-<n>` after the airlock that made
/// it. Their QEMU died with that airlock (its parent-death signal), and
/// its cgroup, the sandbox's, is `airlock gc`'s to remove.
pub fn sweep_runs(runs: &Path) {
    let gone = |run: &str| {
        run.split('-').next().and_then(|p| p.parse::<u32>().ok()).is_some_and(|pid| {
            pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists()
        })
    };
    if let Ok(entries) = fs::read_dir(runs) {
        for entry in entries.flatten() {
            if entry.file_name().to_str().is_some_and(gone) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The guest writes its console: shown to a person, every control
/// character (escape sequences, carriage returns) becomes `?`.
fn printable(line: &str) -> String {
    line.chars().map(|c| if c.is_control() && c != '\t' { '?' } else { c }).collect()
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            airlock_jail::sys::kill_and_reap(self.pid);
        }
        if let Some(virtiofsd) = self.virtiofsd.take() {
            airlock_jail::sys::kill_and_reap(virtiofsd);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LIMITS: GuestLimits = GuestLimits { pids: 256, disk: 1 << 30 };

    #[test]
    fn the_exec_trace_is_asked_for_on_inits_command_line_only_when_the_policy_wants_it() {
        let on =
            kernel_command_line(Accel::Tcg, &[], 0, false, None, None, LIMITS, true, false, false).unwrap();
        assert!(on.split(' ').any(|w| w == EXEC_TRACE_ARG), "{on}");
        let off =
            kernel_command_line(Accel::Tcg, &[], 0, false, None, None, LIMITS, false, false, false).unwrap();
        assert!(!off.split(' ').any(|w| w == EXEC_TRACE_ARG), "{off}");
    }

    #[test]
    fn a_root_too_long_for_the_kernels_command_line_is_refused_not_cut() {
        let hide = |i: usize| RootEntry::Hide(format!("/etc/secret-{i:04}-with-a-long-name").into());
        let fits: Vec<RootEntry> = (0..20).map(hide).collect();
        let line = kernel_command_line(Accel::Tcg, &fits, 0, false, None, None, LIMITS, false, false, false)
            .unwrap();
        assert!(line.ends_with("|hide:/etc/secret-0019-with-a-long-name"), "{line}");
        // However many entries, init gets few arguments (the kernel's
        // limit is 32).
        let (_, init_args) = line.split_once(" -- ").unwrap();
        assert_eq!(init_args.split(' ').count(), 3, "{line}");
        let too_many: Vec<RootEntry> = (0..100).map(hide).collect();
        let err =
            kernel_command_line(Accel::Tcg, &too_many, 0, false, None, None, LIMITS, false, false, false)
                .unwrap_err()
                .to_string();
        assert!(err.contains("filesystem.hidden"), "{err}");
        // Few pieces, but long ones.
        let long = |i: usize| RootEntry::Hide(format!("/{}{i}", "x".repeat(80)).into());
        let too_long: Vec<RootEntry> = (0..28).map(long).collect();
        let err =
            kernel_command_line(Accel::Tcg, &too_long, 0, false, None, None, LIMITS, false, false, false)
                .unwrap_err()
                .to_string();
        assert!(err.contains("filesystem.hidden") && err.contains("2047"), "{err}");
    }

    /// The kernel panics at boot when its init gets more than 32 words:
    /// however many pieces the root has, the egress word (whatever it
    /// redirects), the layer word, the limits and the root are five; a
    /// line that would split into more is refused before, with the reason.
    #[test]
    fn a_root_of_too_many_pieces_for_the_kernels_init_is_refused() {
        let plan = airlock_jail::plan::Redirect { tcp_port: 3129, dns_port: 3053, ipv6: true };
        let hide = |i: usize| RootEntry::Hide(format!("/h{i}").into());
        let layer = Some(Writes::Layer);
        let many: Vec<RootEntry> = (0..100).map(hide).collect();
        let line =
            kernel_command_line(Accel::Tcg, &many, 0, true, layer, Some(&plan), LIMITS, false, false, false)
                .unwrap();
        let init = line.split_once(" -- ").unwrap().1;
        assert_eq!(
            init.split(' ').collect::<Vec<_>>(),
            [
                GUEST_ROLE,
                "egress:3129:3053:6",
                LAYER_ARG,
                "limits:256:1073741824",
                &RootEntry::list_to_arg(&many)
            ],
            "{line}"
        );
        // A path with spaces (the runtime leaves such paths out) would be
        // many words: refused, not left to the kernel.
        let spaced = [RootEntry::Hide(format!("/h{}", " x".repeat(28)).into())];
        let err = kernel_command_line(
            Accel::Tcg,
            &spaced,
            0,
            true,
            layer,
            Some(&plan),
            LIMITS,
            false,
            false,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("33 words") && err.contains("spaces"), "{err}");
    }

    #[test]
    fn the_guest_is_told_of_its_egress_port_only_when_it_has_one() {
        let with = kernel_command_line(
            Accel::Tcg,
            &[RootEntry::Share("/usr".into())],
            0,
            true,
            None,
            None,
            LIMITS,
            false,
            false,
            false,
        )
        .unwrap();
        assert!(
            with.ends_with(&format!(" -- {GUEST_ROLE} {EGRESS_ARG} limits:256:1073741824 root:share:/usr")),
            "{with}"
        );
        let without =
            kernel_command_line(Accel::Tcg, &[], 0, false, None, None, LIMITS, false, false, false).unwrap();
        assert!(!without.contains("egress"), "{without}");
        assert_eq!(RootEntry::from_arg(EGRESS_ARG), None, "not a piece of the guest's root");
    }

    #[test]
    fn the_guest_is_told_what_to_redirect_in_its_egress_word() {
        use crate::egress_port::{egress_arg, egress_from_arg};
        let plan = airlock_jail::plan::Redirect { tcp_port: 3129, dns_port: 3053, ipv6: false };
        let line =
            kernel_command_line(Accel::Tcg, &[], 0, true, None, Some(&plan), LIMITS, false, false, false)
                .unwrap();
        assert!(
            line.ends_with(&format!(" -- {GUEST_ROLE} egress:3129:3053:4 limits:256:1073741824 root:")),
            "{line}"
        );
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words.iter().find_map(|w| egress_from_arg(w)), Some(Some(plan)));
        assert_eq!(egress_from_arg(EGRESS_ARG), Some(None));
        assert_eq!(egress_arg(None), EGRESS_ARG);
        // No egress port, nothing to redirect to.
        let none =
            kernel_command_line(Accel::Tcg, &[], 0, false, None, Some(&plan), LIMITS, false, false, false)
                .unwrap();
        assert!(!none.contains("egress"), "{none}");
        let v6 = airlock_jail::plan::Redirect { ipv6: true, ..plan };
        assert_eq!(egress_from_arg(&egress_arg(Some(&v6))), Some(Some(v6)));
        for bad in [
            "egress:",
            "egress:off",
            "egress:1:2",
            "egress:1:2:5",
            "egress:1:2:4:9",
            "egress:x:2:4",
            "share:/usr",
        ] {
            assert_eq!(egress_from_arg(bad), None, "{bad}");
        }
        assert_eq!(RootEntry::from_arg(&egress_arg(Some(&plan))), None, "not a piece of the guest's root");
    }

    #[test]
    fn a_writable_layer_is_a_virtio_fs_share_with_shared_guest_memory_and_said_to_the_guest() {
        let guest = Guest {
            key: String::new(),
            kernel_release: "6.1".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            initramfs_bytes: 0,
        };
        let mut spec = BootSpec {
            accel: Accel::Tcg,
            memory_mib: 256,
            cpus: 1,
            deadline: Duration::from_secs(1),
            root: vec![RootEntry::Workspace("/w".into())],
            image_layers: Vec::new(),
            cgroup: None,
            egress: false,
            redirect: None,
            writable: None,
            limits: LIMITS,
            exec_trace: false,
            ports: false,
            engine_disk: None,
        };
        let run = Path::new("/run/x");
        let args = |spec: &BootSpec| {
            qemu_args(
                &guest,
                spec,
                &run.join("a"),
                &run.join("e"),
                &run.join("p"),
                &run.join("fs.sock"),
                &run.join("c"),
            )
            .unwrap()
            .join(" ")
        };
        let without = args(&spec);
        assert!(!without.contains("vhost-user-fs") && !without.contains(LAYER_ARG), "{without}");
        assert!(
            without.contains("fsdev=ws,mount_tag=ws"),
            "the workspace is a read-only 9p share: {without}"
        );
        spec.writable = Some(WritableShare {
            writes: Writes::Layer,
            dir: "/s/layer".into(),
            first_host_uid: Some(1_000_065_536),
            tree: None,
        });
        let with = args(&spec);
        for part in [
            "-M microvm,memory-backend=ram ",
            "memory-backend-memfd,id=ram,size=256M,share=on",
            "virtio-mmio.force-legacy=false",
            "socket,id=layer,path=/run/x/fs.sock",
            "vhost-user-fs-device,chardev=layer,tag=layer",
            "fsdev=ws,mount_tag=ws",
        ] {
            assert!(with.contains(part), "{part} missing: {with}");
        }
        assert!(with.contains(&format!(" {LAYER_ARG}")), "the guest is told: {with}");
        assert!(!with.contains(RW_ARG), "{with}");
    }

    /// Mode rw: the workspace is the virtio-fs share (virtiofsd's), and
    /// QEMU has no share of it at all, so it cannot write host files.
    #[test]
    fn a_rw_workspace_is_a_virtio_fs_share_and_no_9p_share_of_qemus() {
        let guest = Guest {
            key: String::new(),
            kernel_release: "6.1".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            initramfs_bytes: 0,
        };
        let spec = BootSpec {
            accel: Accel::Tcg,
            memory_mib: 256,
            cpus: 1,
            deadline: Duration::from_secs(1),
            root: vec![RootEntry::Share("/usr".into()), RootEntry::Workspace("/w".into())],
            image_layers: Vec::new(),
            cgroup: None,
            egress: false,
            redirect: None,
            writable: Some(WritableShare {
                writes: Writes::Workspace,
                dir: "/w".into(),
                first_host_uid: None,
                tree: None,
            }),
            limits: LIMITS,
            exec_trace: false,
            ports: false,
            engine_disk: None,
        };
        let run = Path::new("/run/x");
        let args = qemu_args(
            &guest,
            &spec,
            &run.join("a"),
            &run.join("e"),
            &run.join("p"),
            &run.join("fs.sock"),
            &run.join("c"),
        )
        .unwrap()
        .join(" ");
        for part in [
            "memory-backend-memfd,id=ram,size=256M,share=on",
            "socket,id=rw,path=/run/x/fs.sock",
            "vhost-user-fs-device,chardev=rw,tag=rw",
            "path=/usr,security_model=none,readonly=on",
        ] {
            assert!(args.contains(part), "{part} missing: {args}");
        }
        assert!(
            !args.contains("path=/w,") && !args.contains("mount_tag=ws"),
            "QEMU shares the workspace: {args}"
        );
        assert!(args.contains(&format!(" {RW_ARG} ")) && !args.contains(LAYER_ARG), "{args}");
        assert!(args.contains("workspace:/w"), "the guest still learns the workspace's path: {args}");
    }

    /// An image's layers, however many, are one read-only 9p share (of
    /// the directory QEMU's view gathers them in), with no share of the
    /// host's directories beside them, and the guest learns only their
    /// number, in one word; past the most a guest stacks, refused.
    #[test]
    fn an_images_layers_are_one_read_only_share_and_one_word_for_the_guest() {
        let guest = Guest {
            key: String::new(),
            kernel_release: "6.1".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            initramfs_bytes: 0,
        };
        let layers: Vec<PathBuf> =
            (0..40).map(|n| format!("/s/images/layers/sha256/{n:064}").into()).collect();
        let mut spec = BootSpec {
            accel: Accel::Tcg,
            memory_mib: 256,
            cpus: 1,
            deadline: Duration::from_secs(1),
            root: vec![RootEntry::Hide("/etc/shadow".into())],
            image_layers: layers,
            cgroup: None,
            egress: false,
            redirect: None,
            writable: None,
            limits: LIMITS,
            exec_trace: false,
            ports: false,
            engine_disk: None,
        };
        let run = Path::new("/run/x");
        let args = |spec: &BootSpec| {
            qemu_args(
                &guest,
                spec,
                &run.join("a"),
                &run.join("e"),
                &run.join("p"),
                &run.join("fs.sock"),
                &run.join("c"),
            )
            .map(|a| a.join(" "))
        };
        let forty = args(&spec).unwrap();
        assert!(
            forty.contains(
                "local,id=img,path=/airlock-image,security_model=none,readonly=on,multidevs=remap -device \
                 virtio-9p-device,fsdev=img,mount_tag=img"
            ),
            "{forty}"
        );
        assert_eq!(forty.matches("virtio-9p-device").count(), 1, "one device for every layer: {forty}");
        assert!(!forty.contains("sha256"), "QEMU's arguments name no layer: {forty}");
        assert!(!forty.contains("mount_tag=ro0"), "no host directory: {forty}");
        let line =
            kernel_command_line(Accel::Tcg, &spec.root, 40, false, None, None, LIMITS, false, false, false)
                .unwrap();
        let words: Vec<&str> = line.split(' ').collect();
        assert!(words.contains(&"image:40") && !line.contains("sha256"), "{line}");
        assert_eq!(image_layers_from_args(words), 40);
        assert_eq!(image_layers_from_args(["limits:1:2"]), 0);

        spec.image_layers = vec!["/s/l".into(); MAX_IMAGE_LAYERS + 1];
        let err = args(&spec).unwrap_err().to_string();
        assert!(err.contains("500 layers") && err.contains("at most 499"), "{err}");
    }

    /// virtiofsd serving the workspace keeps no CAP_SETFCAP and says so to
    /// itself; serving a layer it keeps what it had.
    #[test]
    fn virtiofsd_serving_the_workspace_cannot_set_file_capabilities() {
        let program = Path::new(jail::VIRTIOFSD);
        if !program.exists() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "needs {} under CI=true", jail::VIRTIOFSD);
            eprintln!("skipping: no {}", jail::VIRTIOFSD);
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let share = |writes| WritableShare {
            writes,
            dir: dir.path().to_path_buf(),
            first_host_uid: None,
            tree: None,
        };
        let rw = virtiofsd_plan(program, &share(Writes::Workspace)).unwrap();
        assert!(rw.args.iter().any(|a| a.contains("modcaps=-setfcap")), "{:?}", rw.args);
        assert!(!rw.keep_capabilities.contains(&jail::CAP_SETFCAP));
        assert_eq!(rw.writable, [dir.path().to_path_buf()], "rootless: bound");
        assert!(rw.setgroups_noop, "rootless, setgroups cannot drop the caller's groups");
        assert!(rw.no_setid_bits, "a rw workspace takes no setuid or setgid bit");
        let layer = virtiofsd_plan(program, &share(Writes::Layer)).unwrap();
        assert!(!layer.no_setid_bits, "the layer's bits are stripped by apply");
        assert!(!layer.args.iter().any(|a| a.contains("modcaps")), "{:?}", layer.args);
        assert_eq!(layer.keep_capabilities, jail::VIRTIOFSD_CAPABILITIES);
        let as_root = virtiofsd_plan(
            program,
            &WritableShare { first_host_uid: Some(1_000_000_000), ..share(Writes::Layer) },
        )
        .unwrap();
        assert!(!as_root.setgroups_noop, "as root virtiofsd drops its groups itself");
        assert!(rw.args.contains(&format!("source={}", dir.path().display())), "{:?}", rw.args);
    }

    #[test]
    fn the_guests_console_is_shown_without_control_characters() {
        assert_eq!(printable("ok\x1b[2J\rforged\tline"), "ok?[2J?forged\tline");
    }
}
