//! Starting a sandbox's guest: choose the accelerator, make sure the guest
//! is built, and boot it (jailed, in the cgroup its owner gives). The
//! sandbox's owner — the runtime's lifecycle, for `airlock run` and
//! long-lived sandboxes alike — runs its processes over the VM's channel.

use std::time::Duration;

use airlock_jail::cgroup::{CgroupLimits, SandboxCgroup};

use crate::boot::{BootSpec, Vm};
use crate::egress_port::HostEgress;
use crate::engine::{self, Accel};
use crate::{VmError, guest};

/// The guest a sandbox gets, and within which limits.
#[derive(Debug, Clone)]
pub struct VmStart {
    pub policy: String,
    /// The policy lists "kvm" in `isolation.allow_weaker`.
    pub allow_emulation: bool,
    /// The policy's memory limit, in bytes (see [`guest_memory_mib`]).
    pub memory: u64,
    pub cpus: f64,
    /// The policy's `limits.pids` and `limits.disk`, which the guest
    /// enforces inside (see [`crate::limits`]).
    pub limits: crate::limits::GuestLimits,
    /// What of the host the guest sees, read-only.
    pub root: Vec<crate::init::RootEntry>,
    /// An image's unpacked layers, bottom first (see
    /// [`BootSpec::image_layers`]); empty: the guest's root is the host's.
    pub image_layers: Vec<std::path::PathBuf>,
    /// The cgroup QEMU runs in, sized by [`qemu_limits`] (None only where
    /// the host gives none and the policy allows that).
    pub cgroup: Option<SandboxCgroup>,
    /// The host directory the guest writes (see [`BootSpec::writable`]).
    pub writable: Option<crate::boot::WritableShare>,
    /// The policy's `[audit] exec_trace` (see [`BootSpec::exec_trace`]).
    pub exec_trace: bool,
    /// The host connects to ports inside (the policy allows published
    /// ports): see [`crate::ports_port`].
    pub ports: bool,
    /// A container engine in the guest, on this disk (see
    /// [`BootSpec::engine_disk`]); the guest then has the ports port too.
    pub engine_disk: Option<std::path::PathBuf>,
}

/// Something for the person at the terminal.
pub enum Note {
    Warning(String),
    Progress(String),
}

/// The guest's RAM: the policy's memory limit, but enough to boot.
const MIN_GUEST_MIB: u64 = 256;

/// What QEMU may use beyond the guest's RAM (its own code and heap, device
/// buffers, TCG's translated code): the bound of its cgroup's memory limit.
pub const QEMU_OVERHEAD_MIB: u64 = 256;

/// Tasks QEMU may have: its main loop, RCU and signal threads, one thread
/// per vCPU and up to 64 workers of its thread pool (9p's file I/O).
const QEMU_BASE_TASKS: u64 = 96;

/// The guest's RAM in MiB for a policy's memory limit of `memory` bytes.
pub fn guest_memory_mib(memory: u64) -> u64 {
    (memory >> 20).max(MIN_GUEST_MIB)
}

/// The guest's vCPUs for a policy's `cpus`.
fn guest_cpus(cpus: f64) -> u32 {
    (cpus.ceil() as u32).clamp(1, 64)
}

/// The limits of a cgroup that holds QEMU for a policy's `memory` (bytes)
/// and `cpus`: the guest's RAM and QEMU's own overhead, QEMU's tasks, and
/// the policy's CPU share.
pub fn qemu_limits(memory: u64, cpus: f64) -> CgroupLimits {
    CgroupLimits {
        memory: Some((guest_memory_mib(memory) + QEMU_OVERHEAD_MIB) << 20),
        pids: Some(QEMU_BASE_TASKS + u64::from(guest_cpus(cpus))),
        cpus: Some(cpus),
    }
}

/// Boots a guest for `req`: chooses the accelerator, builds the guest if it
/// is not cached, and returns the VM with its agent serving, and the
/// accelerator it runs under. Call it from a thread that lives as long as
/// the VM: QEMU's parent-death signal fires when that thread ends.
///
/// `egress`: the egress proxy's channel and trust bundle, when the policy
/// gives the guest a way out (its only one: the guest has no network
/// device); its port is served from threads of this process.
pub fn start(
    req: &VmStart,
    egress: Option<HostEgress>,
    notify: &mut dyn FnMut(Note),
) -> Result<(Vm, Accel), VmError> {
    let cache = crate::cache_dir()?;
    let kernel = guest::find_kernel().ok_or(VmError::NoKernel)?;
    let report = engine::probe_cached(&cache, Some(&kernel.vmlinuz));
    let choice = engine::choose(&report, req.allow_emulation, &req.policy)?;
    if let Some(warning) = choice.warning {
        notify(Note::Warning(warning));
    }
    let setup =
        guest::setup(&cache, &mut |step| notify(Note::Progress(format!("building the guest: {step}"))))?;
    let spec = BootSpec {
        accel: choice.accel,
        memory_mib: guest_memory_mib(req.memory),
        cpus: guest_cpus(req.cpus),
        deadline: match choice.accel {
            Accel::Kvm => Duration::from_secs(30),
            Accel::Tcg => Duration::from_secs(300),
        },
        root: req.root.clone(),
        image_layers: req.image_layers.clone(),
        cgroup: req.cgroup.clone(),
        egress: egress.is_some(),
        redirect: egress.as_ref().and_then(|e| e.redirect),
        writable: req.writable.clone(),
        limits: req.limits,
        exec_trace: req.exec_trace,
        // The host reaches the engine's socket over the ports port.
        ports: req.ports || req.engine_disk.is_some(),
        engine_disk: req.engine_disk.clone(),
    };
    let dir = cache.join("run").join(format!("{}-{}", std::process::id(), unique()));
    let vm = Vm::boot(setup.guest(), &spec, &dir, egress)?;
    Ok((vm, choice.accel))
}

fn unique() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}
