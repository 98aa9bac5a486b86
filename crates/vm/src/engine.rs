//! The engine: QEMU, and whether KVM can accelerate it on this host.
//!
//! Three ways KVM fails, told apart because each has its own fix: no
//! `/dev/kvm`; no permission on it; and KVM present but unable to run an
//! ordinary guest. The last is what a nested hypervisor that runs only guest
//! kernels built for it looks like (this project's development machine):
//! opening `/dev/kvm`, creating a VM and running a few real-mode
//! instructions all work there — QEMU runs a stock kernel's real-mode setup
//! code and then the guest hangs for good. So the trial is the real thing,
//! bounded: QEMU with KVM boots the distribution's kernel (no initramfs) and
//! must print the kernel's first line within [`TRIAL_DEADLINE`]; with
//! working KVM that takes well under a second.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long the KVM trial may take before KVM counts as unusable.
pub const TRIAL_DEADLINE: Duration = Duration::from_secs(5);

/// The QEMU binary for x86-64 guests, as the distribution installs it.
pub const QEMU: &str = "qemu-system-x86_64";

/// What KVM can do here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Kvm {
    /// A stock kernel boots under QEMU with KVM.
    Usable { detail: String },
    /// No `/dev/kvm`.
    Missing,
    /// `/dev/kvm` exists but this user cannot open it read-write.
    NoPermission { error: String },
    /// `/dev/kvm` opens but an ordinary guest does not run.
    Unusable { reason: String },
    /// The trial could not be made (no QEMU, no kernel to boot).
    Untested { reason: String },
}

impl Kvm {
    /// One line saying which case this is.
    pub fn describe(&self) -> String {
        match self {
            Kvm::Usable { detail } => format!("KVM works: {detail}"),
            Kvm::Missing => "/dev/kvm does not exist".into(),
            Kvm::NoPermission { error } => {
                format!("/dev/kvm exists but cannot be opened read-write: {error}")
            }
            Kvm::Unusable { reason } => format!("/dev/kvm opens but cannot run an ordinary guest: {reason}"),
            Kvm::Untested { reason } => format!("KVM could not be tried: {reason}"),
        }
    }

    /// What to do about it, unless it works.
    pub fn fix(&self) -> Option<String> {
        match self {
            Kvm::Usable { .. } => None,
            Kvm::Missing => Some(
                "enable virtualization in the firmware and load kvm_intel or kvm_amd (on a cloud VM: \
                 an instance type with nested virtualization)"
                    .into(),
            ),
            Kvm::NoPermission { .. } => Some(
                "add your user to the kvm group (`sudo usermod -aG kvm $USER`), then log in again".into(),
            ),
            Kvm::Unusable { .. } => Some(
                "run microVMs on a host whose KVM runs ordinary guests (bare metal, or a cloud instance \
                 with nested virtualization)"
                    .into(),
            ),
            Kvm::Untested { .. } => Some("install qemu-system-x86 and linux-image-amd64".into()),
        }
    }
}

/// The engine's state on this host: what `airlock doctor` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineReport {
    /// The QEMU binary, when installed.
    pub qemu: Option<PathBuf>,
    pub kvm: Kvm,
    /// How long the KVM trial took, in milliseconds (0 when none ran).
    pub trial_ms: u64,
}

/// How a guest is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software emulation: every guest instruction translated; slow,
    /// and the guest's isolation rests on QEMU's emulator rather than the
    /// CPU's virtualization.
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// `program` found on PATH.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Probes the engine: QEMU's presence, then KVM, booting `kernel` under it
/// when `/dev/kvm` opens.
pub fn probe(kernel: Option<&Path>) -> EngineReport {
    let qemu = find_program(QEMU);
    let started = Instant::now();
    let kvm = classify(Path::new("/dev/kvm"), qemu.as_deref(), kernel);
    let trial_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    EngineReport { qemu, kvm, trial_ms }
}

fn classify(device: &Path, qemu: Option<&Path>, kernel: Option<&Path>) -> Kvm {
    if !device.exists() {
        return Kvm::Missing;
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(device) {
        return Kvm::NoPermission { error: e.to_string() };
    }
    let Some(qemu) = qemu else {
        return Kvm::Untested { reason: format!("{QEMU} is not installed") };
    };
    let Some(kernel) = kernel else {
        return Kvm::Untested { reason: "no guest kernel in /boot with its modules".into() };
    };
    trial(qemu, kernel, TRIAL_DEADLINE)
}

/// Boots `kernel` with KVM and waits for its first line on the serial console.
fn trial(qemu: &Path, kernel: &Path, deadline: Duration) -> Kvm {
    let mut command = Command::new(qemu);
    command
        .args(["-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1 reboot=t"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::boot::die_with_parent(&mut command);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return Kvm::Untested { reason: format!("cannot start {}: {e}", qemu.display()) },
    };
    let (seen_tx, seen_rx) = mpsc::channel::<bool>();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                if line.windows(13).any(|w| w == b"Linux version") {
                    let _ = seen_tx.send(true);
                    return;
                }
            }
            let _ = seen_tx.send(false);
        });
    }
    let started = Instant::now();
    let outcome = seen_rx.recv_timeout(deadline);
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    let complaint = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.contains("warning:") && !l.contains("terminating on signal"))
        .map(str::to_owned);
    match outcome {
        Ok(true) => Kvm::Usable {
            detail: format!(
                "QEMU with KVM booted the distribution's kernel to its first line in {} ms",
                started.elapsed().as_millis()
            ),
        },
        Ok(false) => Kvm::Unusable {
            reason: match complaint {
                Some(c) => format!("QEMU with KVM failed: {c}"),
                None => "QEMU with KVM ended before the kernel printed anything".into(),
            },
        },
        Err(_) => Kvm::Unusable {
            reason: format!(
                "QEMU with KVM booted the distribution's kernel and it printed nothing within {} s (a \
                 nested hypervisor that runs only guest kernels built for it behaves like this)",
                deadline.as_secs()
            ),
        },
    }
}

/// The accelerator a microVM gets, or why none: KVM when it works;
/// software emulation only when the policy allows running without KVM,
/// with a warning for the person at the terminal.
pub fn choose(report: &EngineReport, allow_emulation: bool, policy: &str) -> Result<Choice, crate::VmError> {
    if report.qemu.is_none() {
        return Err(crate::VmError::NoQemu);
    }
    if matches!(report.kvm, Kvm::Usable { .. }) {
        return Ok(Choice { accel: Accel::Kvm, warning: None });
    }
    if allow_emulation {
        return Ok(Choice {
            accel: Accel::Tcg,
            warning: Some(format!(
                "microVM under software emulation (TCG), without KVM: {}; much slower, and the guest's \
                 isolation rests on QEMU's emulator (policy {policy} allows this: isolation.allow_weaker \
                 has \"kvm\")",
                report.kvm.describe()
            )),
        });
    }
    Err(crate::VmError::NoKvm {
        case: report.kvm.describe(),
        fix: report.kvm.fix().unwrap_or_default(),
        policy: policy.to_owned(),
    })
}

/// An accelerator, and what to tell the person when it is the weaker one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub accel: Accel,
    pub warning: Option<String>,
}

/// The KVM verdict of this boot of the host, kept so that every microVM
/// launch does not pay for a trial: `/proc/sys/kernel/random/boot_id` and
/// the kernel tried are its key. `airlock doctor` always tries afresh.
pub fn probe_cached(cache: &Path, kernel: Option<&Path>) -> EngineReport {
    #[derive(Serialize, Deserialize)]
    struct Kept {
        boot_id: String,
        kernel: Option<PathBuf>,
        report: EngineReport,
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let file = cache.join("kvm.json");
    if let Ok(text) = std::fs::read_to_string(&file)
        && let Ok(kept) = serde_json::from_str::<Kept>(&text)
        && kept.boot_id == boot_id
        && kept.kernel.as_deref() == kernel
        && kept.report.qemu == find_program(QEMU)
    {
        return kept.report;
    }
    let report = probe(kernel);
    remember(cache, &boot_id, kernel, &report);
    report
}

/// Records a fresh verdict for [`probe_cached`] (doctor's too).
pub fn remember_fresh(cache: &Path, kernel: Option<&Path>, report: &EngineReport) {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    remember(cache, &boot_id, kernel, report);
}

fn remember(cache: &Path, boot_id: &str, kernel: Option<&Path>, report: &EngineReport) {
    let kept = serde_json::json!({ "boot_id": boot_id, "kernel": kernel, "report": report });
    if std::fs::create_dir_all(cache).is_ok() {
        let tmp = cache.join(format!("kvm.json.{}", std::process::id()));
        if std::fs::write(&tmp, kept.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, cache.join("kvm.json"));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn report(kvm: Kvm) -> EngineReport {
        EngineReport { qemu: Some("/usr/bin/qemu-system-x86_64".into()), kvm, trial_ms: 0 }
    }

    #[test]
    fn a_missing_device_is_its_own_case() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(classify(&dir.path().join("kvm"), None, None), Kvm::Missing);
    }

    #[test]
    fn an_unopenable_device_is_a_permission_case() {
        let dir = tempfile::tempdir().unwrap();
        // A directory cannot be opened for writing, whoever asks.
        let case = classify(dir.path(), None, None);
        assert!(matches!(case, Kvm::NoPermission { .. }), "{case:?}");
        assert!(case.fix().unwrap().contains("kvm group"));
    }

    #[test]
    fn emulation_only_when_the_policy_allows_it_and_then_with_a_warning() {
        let stuck = report(Kvm::Unusable { reason: "printed nothing".into() });
        let refused = choose(&stuck, false, "ci").unwrap_err().to_string();
        assert!(refused.contains("cannot run an ordinary guest"), "{refused}");
        assert!(refused.contains("allow_weaker"), "{refused}");
        let allowed = choose(&stuck, true, "mine").unwrap();
        assert_eq!(allowed.accel, Accel::Tcg);
        assert!(allowed.warning.unwrap().contains("software emulation"));
        let works = choose(&report(Kvm::Usable { detail: String::new() }), false, "ci").unwrap();
        assert_eq!(works, Choice { accel: Accel::Kvm, warning: None });
        let no_qemu = EngineReport { qemu: None, ..stuck };
        assert!(matches!(choose(&no_qemu, true, "ci"), Err(crate::VmError::NoQemu)));
    }
}
