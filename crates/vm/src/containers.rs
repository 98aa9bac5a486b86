//! A container engine inside the guest: Debian's `docker.io` (dockerd,
//! with the containerd and runc it starts), from the guest's read-only
//! view of the host's system directories.
//!
//! The host gives the guest a disk of its own (a sparse raw file of the
//! policy's disk limit, a virtio-blk device) and says `containers` on init's
//! command line. The guest's PID 1 then, before its agent serves,
//!
//! 1. loads virtio-blk, ext4, bridge and veth (in the initramfs), and readies the mount
//!    points the engine writes (a tmpfs over /etc/docker, which the host's
//!    read-only /etc would otherwise give it);
//!
//! and once its agent serves (from a thread of its own: with the exec trace
//! every exec waits for the agent's trace thread):
//!
//! 2. formats the disk (`mkfs.ext4` from the guest's view of e2fsprogs) at
//!    every boot — the host never mounts or reads it — and mounts it at
//!    /var/lib/docker, where dockerd keeps images, containers and volumes
//!    (and its containerd, its own state);
//! 3. with transparent egress, extends the guest's redirection to what
//!    arrives from bridges (`airlock_jail::redirect::install_for_bridges`),
//!    so that containers on the engine's default bridge get the policy;
//! 4. starts dockerd in the workload's cgroup, below which it puts each
//!    container's, so the policy's pids and memory cover the engine and
//!    its containers together; with egress, the proxy variables of the
//!    guest's proxy listener (the sandbox's trust bundle is already over
//!    the system's); its log in [`ENGINE_LOG`].
//!
//! The engine's socket is [`ENGINE_SOCKET`]; the host reaches it only over
//! the ports port, with a hand-over that names no path
//! (`HandOver::ContainerEngine`).

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};

use rustix::mount::{MountFlags, mount};

/// The word on init's command line that asks for the engine.
pub const CONTAINERS_ARG: &str = "containers";

/// The engine's socket inside the guest: fixed here, never chosen by the
/// guest or named by the host.
pub const ENGINE_SOCKET: &str = "/run/docker.sock";

/// dockerd's output, for a person looking into a guest whose engine did
/// not answer (`airlock exec NAME -- cat /run/airlock/engine.log`).
pub const ENGINE_LOG: &str = "/run/airlock/engine.log";

/// Where the engine keeps its state: the guest's disk.
pub const DATA_ROOT: &str = "/var/lib/docker";

/// The guest's cgroup (below the workload's) that containers go in.
pub const CONTAINERS_CGROUP: &str = "/workload/containers";

const DOCKERD: &str = "/usr/sbin/dockerd";
const MKFS: &str = "/usr/sbin/mkfs.ext4";

/// Whether the host's command line asks for the engine.
pub fn requested() -> bool {
    std::env::args().any(|a| a == CONTAINERS_ARG)
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{what}: {source}")]
    Step { what: String, source: io::Error },
    #[error(
        "{0} is missing from the guest's root: a container engine needs Debian's docker.io and e2fsprogs on \
         the host (their /usr is the guest's)"
    )]
    Missing(&'static str),
    #[error("the engine's disk (a virtio block device) did not appear")]
    NoDisk,
}

fn step(what: impl Into<String>) -> impl FnOnce(io::Error) -> EngineError {
    let what = what.into();
    move |source| EngineError::Step { what, source }
}

/// In the initramfs, before the new root is entered: the mount points the
/// engine writes, made on the guest's own tmpfs (`new_root` is where the
/// new root is mounted).
pub fn prepare_root(new_root: &Path) -> Result<(), EngineError> {
    let under = |p: &str| new_root.join(p.trim_start_matches('/'));
    fs::create_dir_all(under(DATA_ROOT)).map_err(step(format!("create {DATA_ROOT}")))?;
    // dockerd writes its trust key under /etc/docker, which is the host's
    // (read-only) where the host has docker.io: a small tmpfs of the
    // guest's own over it.
    let etc_docker = under("/etc/docker");
    if etc_docker.is_dir() {
        mount(
            "tmpfs",
            &etc_docker,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(c"size=1m,mode=0755"),
        )
        .map_err(|e| step("mount a tmpfs over /etc/docker")(e.into()))?;
    }
    Ok(())
}

/// The engine's disk's device node: the guest's only virtio block device.
fn disk_device() -> Result<std::path::PathBuf, EngineError> {
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(5) {
        let device = Path::new("/dev/vda");
        if device.exists() {
            return Ok(device.to_path_buf());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(EngineError::NoDisk)
}

/// In the new root, from a thread of PID 1's once the agent serves (with
/// the exec trace every exec waits for the agent's trace thread): formats
/// the disk at every boot (the disk is the sandbox's from its creation to
/// its end, and the host reads none of it), mounts it at [`DATA_ROOT`],
/// and starts dockerd, each in the engine's cgroup (`engine_procs`, the
/// `engine` child's `cgroup.procs`). `proxy`: the guest's HTTP proxy
/// listener, when the sandbox has egress. What goes wrong is in
/// [`ENGINE_LOG`]; the host sees the engine answer, or not.
pub fn start(engine_procs: &OwnedFd, proxy: Option<&str>) -> Result<(), EngineError> {
    for program in [DOCKERD, MKFS] {
        if !Path::new(program).exists() {
            return Err(EngineError::Missing(program));
        }
    }
    let device = disk_device()?;
    if let Some(dir) = Path::new(ENGINE_LOG).parent() {
        fs::create_dir_all(dir).map_err(step(format!("create {}", dir.display())))?;
    }
    let log = fs::File::create(ENGINE_LOG).map_err(step(format!("create {ENGINE_LOG}")))?;
    let output = |log: &fs::File| log.try_clone().map_err(step(format!("open {ENGINE_LOG}")));
    let mut mkfs = Command::new(MKFS);
    mkfs.args(["-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(&device)
        .stdin(Stdio::null())
        .stdout(output(&log)?)
        .stderr(output(&log)?);
    in_cgroup(&mut mkfs, engine_procs);
    let formatting = mkfs.spawn().map_err(step(format!("run {MKFS}")))?;
    // PID 1's agent reaps every child, this one too: its end is awaited
    // on a pidfd, and whether it formatted the disk is the mount's to say.
    await_end(formatting.id());
    mount(&device, DATA_ROOT, "ext4", MountFlags::NOSUID | MountFlags::NODEV, None).map_err(|e| {
        step(format!("mount the engine's disk at {DATA_ROOT} (was it formatted? see {ENGINE_LOG})"))(e.into())
    })?;
    // With transparent egress, the containers get the engine's default
    // bridge, and what they send through it is redirected as the guest's
    // own traffic is; without it, no network of their own.
    let redirect = std::env::args().find_map(|a| crate::egress_port::egress_from_arg(&a)).flatten();
    if let Some(plan) = &redirect {
        airlock_jail::redirect::install_for_bridges(plan).map_err(|e| EngineError::Step {
            what: "redirect the containers' bridge".into(),
            source: io::Error::other(e),
        })?;
    }
    let mut dockerd = Command::new(DOCKERD);
    dockerd
        .args(dockerd_args(redirect.is_some()))
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(output(&log)?)
        .stderr(log);
    if let Some(proxy) = proxy {
        // The engine's pulls leave through the sandbox's egress proxy and
        // its policy, as every program's in the guest.
        for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            dockerd.env(name, proxy);
        }
        dockerd.env("NO_PROXY", "localhost,127.0.0.1,::1");
    }
    in_cgroup(&mut dockerd, engine_procs);
    dockerd.spawn().map_err(step(format!("start {DOCKERD}")))?;
    Ok(())
}

/// `command` moves itself into the cgroup whose `cgroup.procs` this is
/// before it runs anything.
fn in_cgroup(command: &mut Command, procs: &OwnedFd) {
    let procs = procs.as_raw_fd();
    // SAFETY: runs between fork and exec; write(2) of a constant buffer to
    // a descriptor that stays open in the child is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(procs);
            rustix::io::write(fd, b"0")?;
            Ok(())
        });
    }
}

/// Waits until process `pid`, a child someone else reaps, has ended.
fn await_end(pid: u32) {
    let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else { return };
    // Gone already (ended and reaped): nothing to wait for.
    let Ok(pidfd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) else { return };
    let mut fds = [rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN)];
    while let Err(rustix::io::Errno::INTR) = rustix::event::poll(&mut fds, None) {}
}

/// dockerd's arguments: its socket and state where airlock put them, each
/// container's cgroup below the workload's, and never iptables rules (the
/// guest's netfilter is airlock's transparent redirection) nor forwarding
/// (the guest has no network device to forward to). `bridge`: the engine's
/// default bridge, whose traffic the guest redirects to airlock's proxy
/// (`airlock_jail::redirect::install_for_bridges`); without it, none, so
/// containers get their own loopback only, or with `--network host` the
/// guest's, where airlock's proxy ports are.
pub fn dockerd_args(bridge: bool) -> Vec<String> {
    let network = if bridge { None } else { Some("--bridge=none") };
    [
        &format!("--host=unix://{ENGINE_SOCKET}"),
        &format!("--data-root={DATA_ROOT}"),
        "--exec-root=/run/docker",
        "--pidfile=/run/docker.pid",
    ]
    .into_iter()
    .chain(network)
    .chain([
        "--iptables=false",
        "--ip6tables=false",
        "--ip-forward=false",
        "--ip-masq=false",
        "--storage-driver=overlay2",
        "--exec-opt=native.cgroupdriver=cgroupfs",
        &format!("--cgroup-parent={CONTAINERS_CGROUP}"),
        "--log-level=warn",
    ])
    .map(str::to_owned)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_listens_where_the_host_expects_and_brings_no_network_of_its_own() {
        let args = dockerd_args(false);
        assert!(args.contains(&"--host=unix:///run/docker.sock".to_owned()), "{args:?}");
        assert!(args.contains(&"--bridge=none".to_owned()) && args.contains(&"--iptables=false".to_owned()));
        assert!(args.iter().any(|a| a == "--cgroup-parent=/workload/containers"), "{args:?}");
        assert!(args.iter().any(|a| a == "--data-root=/var/lib/docker"), "{args:?}");
        let bridged = dockerd_args(true);
        assert!(!bridged.iter().any(|a| a.starts_with("--bridge")), "the default bridge: {bridged:?}");
        for never in ["--iptables=false", "--ip-forward=false", "--ip-masq=false"] {
            assert!(bridged.contains(&never.to_owned()), "{never}: {bridged:?}");
        }
    }
}
