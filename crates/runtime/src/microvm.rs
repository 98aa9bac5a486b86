//! The microVM tier: the policy picked the tier; the engine (`airlock_vm`)
//! boots a guest with its own kernel.
//!
//! A sandbox on this tier is launched by the same lifecycle as the process
//! tier's ([`check`] is its host check, [`boot`] its launch step), served
//! by the same supervisor (`create`, the daemon) or run's relay, and
//! finalized the same way: state, logs and audit log alike.
//!
//! Egress is the process tier's: the lifecycle starts the sandbox's
//! egress proxy as for a process-tier sandbox, and the guest's connections
//! reach it over a virtio-serial port of their own (`airlock_vm::egress_port`).
//! The workspace in mode overlay is the process tier's: its writable
//! layer (upper and work) lives on the host (as root in the sandbox's layer
//! tmpfs; rootless in `layer/` of its directory, apart from the rest),
//! served to the guest over virtio-fs by a jailed virtiofsd; the guest's
//! kernel mounts the overlay (the workspace read-only over 9p below), so the
//! process tier's diff and apply read the same upper directory. In mode rw
//! the jailed virtiofsd serves the workspace itself (as root the process
//! tier's id-mapped tree), and QEMU gets no share of it. See the README's
//! microVM section.

use std::path::Path;

use airlock_jail::cgroup::{CgroupLimits, SandboxCgroup};
use airlock_jail::probe::{Feature, HostReport};
use airlock_policy::{Policy, Weakening};
use airlock_vm::egress_port::HostEgress;
use airlock_vm::init::RootEntry;
use airlock_vm::run::{Note, VmStart};

use crate::run::Notice;
use crate::{RunError, plan};

/// A sandbox's launch step on this tier: boots its guest, jailed, with
/// QEMU in `cgroup` (the sandbox's own, sized by [`cgroup_limits`]) and the
/// agent serving on the channel the VM returns. Whether emulation is
/// allowed was decided (and said) by [`check`]; the build of a missing
/// guest and the boot are logged. QEMU dies with the calling thread (its
/// parent-death signal): the sandbox's owner calls this from the thread
/// that owns the sandbox to its end.
#[allow(clippy::too_many_arguments)]
pub(crate) fn boot(
    policy: &Policy,
    name: &str,
    workspace: Option<&Path>,
    cgroup: Option<&SandboxCgroup>,
    egress: Option<HostEgress>,
    writable: Option<airlock_vm::boot::WritableShare>,
    image: Option<&crate::image::ResolvedImage>,
    engine_disk: Option<std::path::PathBuf>,
) -> Result<airlock_vm::boot::Vm, RunError> {
    // On an image, none of the host's directories: its layers are the root.
    let mut root = match image {
        Some(_) => hidden_entries(policy),
        None => guest_root(policy, &mut |notice| {
            if let Notice::Warning(w) = notice {
                tracing::warn!(sandbox = name, "{w}");
            }
        }),
    };
    if let Some(ws) = workspace {
        root.push(RootEntry::Workspace(ws.to_path_buf()));
    }
    let start = VmStart {
        policy: policy.name.clone(),
        allow_emulation: policy.allows_weaker(Weakening::Kvm),
        memory: policy.limits.memory,
        cpus: policy.limits.cpus,
        limits: airlock_vm::limits::GuestLimits { pids: policy.limits.pids, disk: policy.limits.disk },
        root,
        image_layers: image.map(|i| i.layers.clone()).unwrap_or_default(),
        cgroup: cgroup.cloned(),
        writable,
        exec_trace: policy.audit.exec_trace,
        ports: policy.network.ports,
        engine_disk,
    };
    let (vm, accel) = airlock_vm::run::start(&start, egress, &mut |note| match note {
        // Said by `check` already, before the sandbox existed.
        Note::Warning(w) => tracing::debug!(sandbox = name, "{w}"),
        Note::Progress(p) => tracing::info!(sandbox = name, "{p}"),
    })?;
    tracing::info!(
        sandbox = name,
        ms = vm.boot_time.as_millis() as u64,
        accel = accel.as_str(),
        "microVM booted"
    );
    Ok(vm)
}

/// The checks of a long-lived sandbox's request on this tier: the host can
/// run it (the same refusal as `airlock run`'s), and what the tier does
/// not do yet is said. Emulation, when the policy allows it and the host
/// needs it, is said and recorded among what the sandbox runs without
/// (`kvm`).
pub(crate) fn check(
    policy: &Policy,
    workspace: Option<&Path>,
    host: &HostReport,
    notify: &mut dyn FnMut(Notice),
) -> Result<Vec<String>, RunError> {
    let choice = engine_choice(policy)?;
    let mut degraded = Vec::new();
    if let Some(warning) = choice.warning {
        notify(Notice::Warning(warning));
        degraded.push(Weakening::Kvm.as_str().to_owned());
    }
    // QEMU's cgroup (the sandbox's): refused where the host gives none
    // (rootless) unless the policy allows it, before the guest is built.
    if !host.enforces(Feature::Cgroups) {
        if !policy.allows_weaker(Weakening::Cgroups) {
            return Err(airlock_vm::VmError::NoCgroups { policy: policy.name.clone() }.into());
        }
        notify(Notice::Warning(format!(
            "QEMU runs without a cgroup (this host gives none): its memory, CPU and tasks are bounded only by \
             the guest's RAM and vCPUs (policy {} allows it: isolation.allow_weaker has \"cgroups\")",
            policy.name
        )));
        degraded.push(Weakening::Cgroups.as_str().to_owned());
    }
    // An overlay workspace's layer without root has no tmpfs to cap it:
    // refused, or run without the cap, by the process tier's own rule.
    let disk = plan::shortfalls(policy, host).into_iter().filter(|s| s.feature == Weakening::DiskQuota);
    for shortfall in disk {
        if !shortfall.allowed {
            return Err(RunError::HostLacks {
                feature: shortfall.feature.to_string(),
                policy: policy.name.clone(),
            });
        }
        notify(Notice::Warning(format!(
            "running weaker than the host could with root: without {} (the overlay workspace's layer has no size \
             cap; policy {} allows it; see `airlock doctor`)",
            shortfall.feature, policy.name
        )));
        degraded.push(shortfall.feature.to_string());
    }
    if let Some(ws) = workspace
        && !RootEntry::fits(ws)
    {
        return Err(RunError::WorkspaceRefused(format!(
            "{}: the microVM tier cannot share a workspace whose path has spaces or characters the kernel's \
             command line cannot carry",
            ws.display()
        )));
    }
    // A path the policy hides must be masked in the guest too: one that
    // cannot travel to it is a refusal, never a silent omission.
    if let Some(path) = unmaskable_hidden(policy) {
        return Err(RunError::PolicyRefused(format!(
            "filesystem.hidden: {} cannot be masked in a microVM (its path has spaces or characters the \
             kernel's command line cannot carry); rename it, or hide a parent directory whose path can be \
             carried",
            path.display()
        )));
    }
    // Built (when missing or stale) before the sandbox exists, with progress.
    airlock_vm::guest::setup(&airlock_vm::cache_dir()?, &mut |step| {
        notify(Notice::Info(format!("building the guest: {step}")))
    })?;
    Ok(degraded)
}

/// What the sandbox's egress proxy may use beside QEMU in the sandbox's
/// cgroup: its memory, and its tasks (two workers, its resolver's and
/// relay's threads).
const PROXY_MEMORY_MIB: u64 = 64;
const PROXY_TASKS: u64 = 64;

/// The limits of a microVM sandbox's cgroup, which holds QEMU and, with
/// egress, the proxy: the guest's RAM and QEMU's overhead, QEMU's tasks,
/// the proxy's allowance, the policy's CPU share.
pub(crate) fn cgroup_limits(policy: &Policy) -> CgroupLimits {
    let mut limits = airlock_vm::run::qemu_limits(policy.limits.memory, policy.limits.cpus);
    if policy.network.has_egress() {
        limits.memory = limits.memory.map(|m| m + (PROXY_MEMORY_MIB << 20));
        limits.pids = limits.pids.map(|p| p + PROXY_TASKS);
    }
    limits
}

/// The accelerator this policy gets on this host, or the refusal.
fn engine_choice(policy: &Policy) -> Result<airlock_vm::engine::Choice, RunError> {
    let cache = airlock_vm::cache_dir()?;
    let kernel = airlock_vm::guest::find_kernel().ok_or(airlock_vm::VmError::NoKernel)?;
    let report = airlock_vm::engine::probe_cached(&cache, Some(&kernel.vmlinuz));
    Ok(airlock_vm::engine::choose(&report, policy.allows_weaker(Weakening::Kvm), &policy.name)?)
}

/// The host's directories the guest sees, read-only: the policy's
/// `filesystem.read_only` (symbolic links among them stay links), with the
/// jail's always-hidden paths and the policy's `hidden` masked.
fn guest_root(policy: &Policy, notify: &mut dyn FnMut(Notice)) -> Vec<RootEntry> {
    let mut entries = Vec::new();
    for path in &policy.filesystem.read_only {
        if !RootEntry::fits(path) {
            notify(Notice::Warning(format!(
                "{} is not shared with the microVM: its path has spaces or characters the kernel's command \
                 line cannot carry",
                path.display()
            )));
            continue;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(path) {
                Ok(target) if RootEntry::target_fits(&target) => {
                    entries.push(RootEntry::Link { path: path.clone(), target })
                }
                Ok(target) => notify(Notice::Warning(format!(
                    "{} is not shared with the microVM: its link's target {} has spaces or characters the \
                     kernel's command line cannot carry",
                    path.display(),
                    target.display()
                ))),
                Err(_) => {}
            },
            Ok(m) if m.is_dir() => entries.push(RootEntry::Share(path.clone())),
            _ => {}
        }
    }
    entries.extend(hidden_entries(policy));
    entries
}

/// The jail's always-hidden paths and the policy's `hidden`, masked in the
/// guest (whatever its root: the host's directories or an image's).
fn hidden_entries(policy: &Policy) -> Vec<RootEntry> {
    airlock_jail::mounts::ALWAYS_HIDDEN
        .iter()
        .map(Path::new)
        .chain(policy.filesystem.hidden.iter().map(|p| p.as_path()))
        .filter(|path| RootEntry::fits(path))
        .map(|path| RootEntry::Hide(path.to_path_buf()))
        .collect()
}

/// The first path the policy hides that the guest could not be told to
/// mask.
fn unmaskable_hidden(policy: &Policy) -> Option<&Path> {
    policy.filesystem.hidden.iter().map(|p| p.as_path()).find(|p| !RootEntry::fits(p))
}

/// For `airlock gc`: QEMU processes whose airlock (a supervisor, a run) is
/// gone, found by their run directory on their command line
/// (`<cache>/run/<pid>-<n>`), are killed, and those directories removed.
/// QEMU dies with its airlock by the parent-death signal already; this is
/// for a QEMU that did not. The killed, one line each.
pub fn reap_orphaned_vms() -> Vec<String> {
    let Ok(cache) = airlock_vm::cache_dir() else { return Vec::new() };
    let runs = cache.join("run");
    let Ok(entries) = std::fs::read_dir(&runs) else { return Vec::new() };
    let orphaned: Vec<std::path::PathBuf> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let owner = name.to_str().and_then(|n| n.split('-').next()).and_then(|p| p.parse::<u32>().ok());
            owner.is_some_and(|pid| !process_alive(pid))
        })
        .map(|e| e.path())
        .collect();
    let mut killed = Vec::new();
    if !orphaned.is_empty()
        && let Ok(processes) = std::fs::read_dir("/proc")
    {
        for process in processes.flatten() {
            let Some(pid) = process.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(process.path().join("cmdline")) else { continue };
            let cmdline = String::from_utf8_lossy(&cmdline);
            if let Some(dir) = orphaned.iter().find(|d| cmdline.contains(&format!("{}/", d.display()))) {
                let _ = rustix::process::kill_process(
                    crate::lifecycle::pid_of(pid),
                    rustix::process::Signal::KILL,
                );
                killed.push(format!("QEMU pid {pid} of {}", dir.display()));
            }
        }
    }
    for dir in &orphaned {
        let _ = std::fs::remove_dir_all(dir);
    }
    killed
}

/// Whether process `pid` runs: it exists and is not a zombie (a killed
/// supervisor stays one until init reaps it).
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command's closing parenthesis.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The guest listens where the process tier's agent does, and the host
    /// takes the redirected connections of a transparent sandbox only.
    #[test]
    fn the_guest_uses_the_process_tiers_ports_and_hand_overs() {
        use airlock_proto::handover::HandOver;
        use airlock_vm::egress_port as port;
        assert_eq!(port::HTTP_PORT, airlock_egress::HTTP_PROXY_PORT);
        assert_eq!(port::SOCKS_PORT, airlock_egress::SOCKS_PROXY_PORT);
        let to = HandOver::Transparent { destination: "203.0.113.9:22".parse().unwrap() };
        for transparent in [false, true] {
            assert!(port::host_takes(&HandOver::Http, transparent));
            assert!(port::host_takes(&HandOver::Socks, transparent));
            assert_eq!(port::host_takes(&to, transparent), transparent);
            assert_eq!(port::host_takes(&HandOver::DnsStream, transparent), transparent);
            // A datagram socket is never the guest's to hand over.
            assert!(!port::host_takes(&HandOver::DnsDatagram, transparent));
        }
        // The guest redirects to the process tier's ports.
        let mut policy = airlock_policy::Policy::builtin("dev").unwrap();
        policy.network.transparent = true;
        let plan = crate::network::redirect_of(&policy.network).unwrap();
        assert_eq!(
            (plan.tcp_port, plan.dns_port),
            (airlock_egress::TRANSPARENT_PORT, airlock_egress::RESOLVER_PORT)
        );
        assert_eq!(port::GUEST_CA_BUNDLE, crate::network::SANDBOX_CA_BUNDLE);
        assert_eq!(port::GUEST_SYSTEM_BUNDLE, crate::network::SYSTEM_CA_BUNDLE);
    }

    /// A link whose target could not travel in the root's one word is left
    /// out, said, and the masks after it still reach the guest.
    #[test]
    fn a_link_whose_target_cannot_travel_is_left_out_and_the_masks_stay() {
        let dir = tempfile::tempdir().unwrap();
        let (good, bad) = (dir.path().join("good"), dir.path().join("bad"));
        std::os::unix::fs::symlink("usr/bin", &good).unwrap();
        std::os::unix::fs::symlink("a b|hide:/x", &bad).unwrap();
        let mut policy = airlock_policy::Policy::builtin("dev").unwrap();
        policy.filesystem.read_only = vec![good.clone(), bad.clone()];
        let mut warnings = Vec::new();
        let root = guest_root(&policy, &mut |n| {
            if let Notice::Warning(w) = n {
                warnings.push(w);
            }
        });
        assert_eq!(root[0], RootEntry::Link { path: good, target: "usr/bin".into() });
        assert!(!root.iter().any(|e| matches!(e, RootEntry::Link { path, .. } if *path == bad)), "{root:?}");
        assert!(warnings.len() == 1 && warnings[0].contains("bad"), "{warnings:?}");
        assert!(root.contains(&RootEntry::Hide("/etc/shadow".into())), "{root:?}");
        let word = RootEntry::list_to_arg(&root);
        assert_eq!(RootEntry::list_from_args([word.as_str()]), root);
    }

    /// A hidden path the guest cannot be told to mask is found (and the
    /// launch refused), not dropped.
    #[test]
    fn a_hidden_path_that_cannot_travel_is_found() {
        let mut policy = airlock_policy::Policy::builtin("dev").unwrap();
        policy.filesystem.hidden = vec!["/srv/keys".into()];
        assert_eq!(unmaskable_hidden(&policy), None);
        policy.filesystem.hidden.push("/srv/team keys".into());
        policy.filesystem.hidden.push("/srv/a|b".into());
        assert_eq!(unmaskable_hidden(&policy), Some(Path::new("/srv/team keys")));
    }

    #[test]
    fn a_process_is_alive_until_it_is_gone() {
        assert!(process_alive(std::process::id()));
        // Above the kernel's largest pid (4194304): never a process.
        assert!(!process_alive(5_000_000));
    }
}
