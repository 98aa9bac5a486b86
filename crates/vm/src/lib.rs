//! The microVM tier's engine: a sandbox with its own kernel, under QEMU's
//! `microvm` machine.
//!
//! - `engine`: QEMU and KVM on this host — which of the ways KVM can fail
//!   this is, found in seconds — and the accelerator a policy allows.
//! - `guest`: `airlock vm setup` — the distribution's kernel and an
//!   initramfs whose PID 1 is this same executable, cached and rebuilt when
//!   either changes (`cpio`, `elf` build it).
//! - `init`: the guest's PID 1 (`airlock __vm-init`): modules, the host's
//!   root read-only over 9p, then the agent over virtio-serial.
//! - `jail`: QEMU confined (`airlock __vm-jail`): namespaces of its own, a
//!   mount view with only what it needs, no capability, its cgroup.
//! - `limits`: the policy's pids, memory and disk limits inside the guest
//!   (a cgroup for what the agent starts, a sized tmpfs for its files).
//! - `boot`, `run`: starting a sandbox's guest (its owner, the runtime's
//!   lifecycle, runs commands in it over the agent's channel).
//! - `egress_port`: the guest's connections to the egress proxy, over a
//!   virtio-serial port of their own.
//! - `ports_port`: the host's connections to ports inside (published
//!   ports), over another, with the egress port's multiplexer; and to the
//!   container engine's socket.
//! - `containers`: a container engine in the guest, on a disk of its own.

pub mod boot;
pub mod containers;
pub mod cpio;
pub mod egress_port;
pub mod elf;
pub mod engine;
pub mod guest;
pub mod init;
pub mod jail;
pub mod limits;
pub mod ports_port;
pub mod run;

use std::io;
use std::path::{Path, PathBuf};

/// argv[1] of the guest's PID 1 (passed on the kernel's command line).
pub const GUEST_ROLE: &str = "__vm-init";

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("the microVM tier needs {qemu}, which is not installed: install qemu-system-x86", qemu = engine::QEMU)]
    NoQemu,
    #[error(
        "policy {policy} runs on the microvm tier, which needs KVM, and {case}; fix: {fix}; or let the policy \
         run microVMs under software emulation (slow) by listing \"kvm\" in isolation.allow_weaker"
    )]
    NoKvm { case: String, fix: String, policy: String },
    #[error(
        "the microVM tier needs a guest kernel: none in /boot with modules in /lib/modules; install \
         linux-image-amd64"
    )]
    NoKernel,
    #[error("guest kernel modules: {0}")]
    Modules(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("guest manifest: {0}")]
    Manifest(String),
    #[error("microVM: {0}")]
    Boot(String),
    #[error("microVM: {what}\n  QEMU said: {qemu}\n  the guest's console ended with:\n{console}")]
    Guest { what: String, qemu: String, console: String },
    #[error("microVM agent: {0}")]
    Protocol(#[from] airlock_proto::ProtoError),
    #[error(
        "this host lacks cgroups, which policy {policy} requires to limit QEMU's memory, CPU and tasks; run \
         `airlock doctor` for how to fix it, or use a policy that lists \"cgroups\" in isolation.allow_weaker"
    )]
    NoCgroups { policy: String },
    #[error("QEMU's cgroup: {0}")]
    Cgroup(#[from] airlock_jail::cgroup::CgroupError),
    #[error("no cache directory: set AIRLOCK_VM_CACHE, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
}

impl VmError {
    pub(crate) fn io(path: &Path, source: io::Error) -> VmError {
        VmError::Io { path: path.to_path_buf(), source }
    }

    /// The host lacks what the tier needs (a refusal, not a failure).
    pub fn is_host_unsupported(&self) -> bool {
        matches!(
            self,
            VmError::NoQemu
                | VmError::NoKvm { .. }
                | VmError::NoKernel
                | VmError::Modules(_)
                | VmError::NoCgroups { .. }
        )
    }
}

/// Where the guest and the KVM verdict are cached: `$AIRLOCK_VM_CACHE`, else
/// `/var/cache/airlock/vm` as root, else `$XDG_CACHE_HOME/airlock/vm`
/// (`~/.cache/airlock/vm`). A cache, not state: removing it costs a rebuild.
pub fn cache_dir() -> Result<PathBuf, VmError> {
    if let Some(dir) = std::env::var_os("AIRLOCK_VM_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from("/var/cache/airlock/vm"));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("airlock/vm"));
    }
    std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/airlock/vm"))
        .ok_or(VmError::NoCacheDir)
}
