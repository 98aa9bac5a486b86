//! The microVM tier: a guest with its own kernel under QEMU's microvm
//! machine, through the real binary.
//!
//! KVM on the development machine (and so in CI) runs only guest kernels
//! built for its nested hypervisor, so the guests here run under software
//! emulation (TCG), which the tests' policy allows (`allow_weaker =
//! ["kvm"]`). Each boot costs seconds of emulated CPU: every check that can
//! share a guest does (one script, several answers).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::support::*;

/// What the tier needs on the host: QEMU and a kernel with its modules.
pub(crate) fn ready() -> bool {
    let qemu = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .output()
        .is_ok_and(|o| o.status.success());
    require(
        qemu && guest_kernel().is_some() && is_root(),
        "root, qemu-system-x86_64 and a kernel in /boot with its modules (scripts/test.sh installs \
         qemu-system-x86 and linux-image-amd64)",
    )
}

/// The newest kernel in /boot with modules: the one `vm setup` picks.
fn guest_kernel() -> Option<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let release = e.file_name().to_string_lossy().strip_prefix("vmlinuz-")?.to_owned();
            Path::new("/lib/modules").join(&release).join("modules.dep").exists().then(|| (release, e.path()))
        })
        .collect();
    found.sort();
    found.pop()
}

/// The guest cache the booting tests share (built once per build of airlock).
pub(crate) fn shared_cache() -> PathBuf {
    test_root().join("microvm-cache")
}

/// A policy on the microVM tier that may run it under emulation.
fn emulation_policy(env: &Env) -> PathBuf {
    let path = env.dir.path().join("microvm.toml");
    std::fs::write(
        &path,
        // One vCPU: under emulation a second one costs most of a second of boot.
        "extends = \"ci\"\n[isolation]\ntier = \"microvm\"\nallow_weaker = [\"kvm\"]\n\
         [limits]\ntimeout = \"10m\"\ncpus = 1\nmemory = \"512M\"\n",
    )
    .unwrap();
    path
}

fn airlock_vm(env: &Env, cache: &Path, args: &[&str]) -> Output {
    env.airlock(args).env("AIRLOCK_VM_CACHE", cache).stdin(Stdio::null()).output().unwrap()
}

fn doctor_kvm_state(env: &Env, cache: &Path) -> (String, u64) {
    let out = airlock_vm(env, cache, &["doctor", "--json"]);
    assert!(out.status.success(), "{}", show(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let engine = &json["microvm"]["engine"];
    (engine["kvm"]["state"].as_str().unwrap_or_default().to_owned(), engine["trial_ms"].as_u64().unwrap())
}

/// Boots the distribution's kernel under QEMU with KVM, with twice the
/// doctor's deadline, and says whether it printed its first line: an
/// independent look at what doctor classifies.
fn kernel_boots_under_kvm(vmlinuz: &Path) -> bool {
    let mut qemu = Command::new("timeout")
        .args(["10", "qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "128"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(vmlinuz)
        .args(["-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1 reboot=t"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut console = String::new();
    std::io::Read::read_to_string(qemu.stdout.as_mut().unwrap(), &mut console).unwrap();
    let _ = qemu.wait();
    console.contains("Linux version")
}

#[test]
fn doctor_tells_which_kvm_case_this_host_is_in_within_seconds() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = env.dir.path().join("vm-cache");
    let started = Instant::now();
    let (state, trial_ms) = doctor_kvm_state(&env, &cache);
    let took = started.elapsed();
    // Never a hang: the trial has a 5 s deadline.
    assert!(trial_ms < 8_000 && took < Duration::from_secs(60), "trial {trial_ms} ms, doctor {took:?}");
    let device = Path::new("/dev/kvm");
    let expected = if !device.exists() {
        "missing"
    } else if std::fs::OpenOptions::new().read(true).write(true).open(device).is_err() {
        "no_permission"
    } else if kernel_boots_under_kvm(&guest_kernel().unwrap().1) {
        "usable"
    } else {
        "unusable"
    };
    assert_eq!(state, expected, "doctor's KVM case against an independent boot");
    let text = airlock_vm(&env, &cache, &["doctor"]);
    let text = stdout(&text);
    let line = text.lines().find(|l| l.contains("] kvm ")).unwrap_or_else(|| panic!("no kvm line:\n{text}"));
    assert_eq!(line.starts_with("[ok"), expected == "usable", "{text}");
    if expected != "usable" {
        assert!(text.contains("fix: "), "{text}");
        assert!(text.contains("microvm tier: runs only under software emulation"), "{text}");
    }
}

#[test]
fn vm_setup_builds_once_and_again_when_airlock_changes() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = env.dir.path().join("vm-cache");
    let first = airlock_vm(&env, &cache, &["vm", "setup"]);
    assert!(first.status.success(), "{}", show(&first));
    // Progress while it builds: the kernel, airlock, libraries, modules.
    for step in ["kernel ", "libraries", "kernel modules", "guest ready"] {
        assert!(stderr(&first).contains(step), "no {step:?} in:\n{}", stderr(&first));
    }
    // Started without its decompressor where it can be (Debian's xz kernels).
    let decompressed = cache.join("guest/vmlinux").exists();
    let said = if decompressed { "kernel decompressed" } else { "kernel kept compressed" };
    assert!(stderr(&first).contains(said), "no {said:?} in:\n{}", stderr(&first));
    let image = cache.join("guest/initramfs.cpio");
    let built = std::fs::metadata(&image).unwrap().modified().unwrap();
    let again = airlock_vm(&env, &cache, &["vm", "setup"]);
    assert!(again.status.success(), "{}", show(&again));
    assert!(stderr(&again).contains("up to date"), "{}", show(&again));
    assert_eq!(std::fs::metadata(&image).unwrap().modified().unwrap(), built, "rebuilt without a change");
    // Another airlock executable (a new build) makes the guest stale.
    let other = env.dir.path().join("airlock-new");
    if std::fs::hard_link(BIN, &other).is_err() {
        std::fs::copy(BIN, &other).unwrap();
    }
    let rebuilt = Command::new(&other)
        .args(["vm", "setup"])
        .env("AIRLOCK_VM_CACHE", &cache)
        .env("AIRLOCK_STATE_DIR", &env.state)
        .output()
        .unwrap();
    assert!(rebuilt.status.success(), "{}", show(&rebuilt));
    assert!(stderr(&rebuilt).contains("guest ready"), "{}", show(&rebuilt));
    // A cpio newc archive, written by airlock itself, with its agent as /init.
    let bytes = std::fs::read(&image).unwrap();
    assert!(bytes.starts_with(b"070701"));
    assert!(bytes.windows(5).any(|w| w == b"init\0"));
}

#[test]
fn without_kvm_the_tier_is_refused_unless_the_policy_allows_emulation() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let (state, _) = doctor_kvm_state(&env, &cache);
    if state == "usable" {
        // This host runs microVMs with KVM: nothing is refused.
        let out = airlock_vm(&env, &cache, &["run", "--tier", "microvm", "--policy", "ci", "--", "true"]);
        assert!(out.status.success(), "{}", show(&out));
        return;
    }
    let out = airlock_vm(&env, &cache, &["run", "--tier", "microvm", "--policy", "ci", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", show(&out));
    let err = stderr(&out);
    let case = match state.as_str() {
        "missing" => "/dev/kvm does not exist",
        "no_permission" => "cannot be opened",
        _ => "cannot run an ordinary guest",
    };
    assert!(err.contains(case) && err.contains("fix:"), "the case and its fix: {err}");
    assert!(err.contains("allow_weaker") && err.contains("policy ci runs on the microvm tier"), "{err}");
    // The flag never weakens a policy that requires the microVM tier.
    let policy = emulation_policy(&env);
    let weaker = airlock_vm(
        &env,
        &cache,
        &["run", "--policy", policy.to_str().unwrap(), "--tier", "process", "--", "true"],
    );
    assert_eq!(weaker.status.code(), Some(125), "{}", show(&weaker));
    assert!(stderr(&weaker).contains("requires the microvm tier"), "{}", show(&weaker));
    // Long-lived microVMs: the host's case first, the same message as run's…
    let create =
        airlock_vm(&env, &cache, &["create", "--tier", "microvm", "--policy", "ci", "--name", "vm1"]);
    assert_eq!(create.status.code(), Some(125), "{}", show(&create));
    assert_eq!(stderr(&create), err, "create and run refuse alike");
    // …and where the policy would run it, not in this version: refused, not downgraded.
    let create = airlock_vm(&env, &cache, &["create", "--policy", policy.to_str().unwrap(), "--name", "vm2"]);
    assert_eq!(create.status.code(), Some(125), "{}", show(&create));
    assert!(stderr(&create).contains("not in this version"), "{}", show(&create));
    let listed = airlock_vm(&env, &cache, &["ls", "--json"]);
    assert_eq!(stdout(&listed).trim(), "[]", "nothing was created: {}", show(&listed));
}

#[test]
fn a_command_runs_in_a_guest_with_its_own_kernel() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = emulation_policy(&env);
    // A host process the guest must not see (the script spells the number
    // so that its own command line does not match).
    let mut marker = Command::new("sleep").arg("987654").spawn().unwrap();
    let script = format!(
        r#"
        echo "release=$(uname -r)"
        echo "version=$(cat /proc/version)"
        echo "marker=$(grep -l "98765[4]" /proc/[0-9]*/cmdline 2>/dev/null | wc -l)"
        echo "processes=$(ps -e --no-headers -o args | grep -vc '^\[')"
        echo "shadow=$(cat /etc/shadow 2>/dev/null | wc -c)"
        echo "host_dir=$(test -e '{}' && echo seen || echo absent)"
        read line; echo "stdin=$line"
        echo to-stderr >&2
        exit 7"#,
        env.dir.path().display()
    );
    let started = Instant::now();
    let mut child = env
        .airlock(["run", "--policy", policy.to_str().unwrap(), "--", "sh", "-c", &script])
        .env("AIRLOCK_VM_CACHE", &cache)
        .env("AIRLOCK_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"from the host\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    let _ = marker.kill();
    let _ = marker.wait();
    let text = stdout(&out);
    let value = |key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {key}= in the guest's output:\n{}", show(&out)))
    };
    assert_eq!(out.status.code(), Some(7), "the command's exit code: {}", show(&out));
    let (release, _) = guest_kernel().unwrap();
    assert_eq!(value("release"), release, "uname -r is the guest kernel's");
    assert!(value("version").contains(&release), "/proc/version is the guest kernel's: {}", value("version"));
    let host = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    if host.trim() != release {
        assert_ne!(value("release"), host.trim(), "the host's kernel answered");
    }
    assert_eq!(value("marker"), "0", "a host process is visible in the guest");
    let processes: u32 = value("processes").parse().unwrap();
    // User-space processes (kernel threads have no command line): the
    // agent, the script and the pipeline counting them.
    assert!(processes < 12, "the guest runs only its agent and the command: {processes} processes");
    assert_eq!(value("shadow"), "0", "/etc/shadow is hidden in the guest");
    assert_eq!(value("host_dir"), "absent", "only the policy's system directories are shared");
    assert_eq!(value("stdin"), "from the host");
    assert!(stderr(&out).contains("to-stderr"), "{}", show(&out));
    // What the tier does not do yet it says: no workspace in the guest.
    assert!(stderr(&out).contains("no workspace yet"), "{}", show(&out));
    let accel = if stderr(&out).contains("software emulation (TCG)") { "tcg" } else { "kvm" };
    let boot = stderr(&out)
        .lines()
        .find(|l| l.contains("guest agent serving"))
        .map(str::to_owned)
        .unwrap_or_default();
    eprintln!("microVM ({accel}): run to exit {:.1} s; {boot}", took.as_secs_f64());
}

#[test]
fn a_missing_command_is_127_as_in_the_process_tier() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let policy = emulation_policy(&env);
    let out = airlock_vm(
        &env,
        &shared_cache(),
        &["run", "--policy", policy.to_str().unwrap(), "--", "/no/such/program"],
    );
    assert_eq!(out.status.code(), Some(127), "{}", show(&out));
    assert!(stderr(&out).contains("/no/such/program"), "{}", show(&out));
}

#[test]
fn a_signal_and_the_time_limit_end_the_command_as_in_the_process_tier() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let policy = emulation_policy(&env);
    let policy = policy.to_str().unwrap();
    let killed =
        airlock_vm(&env, &shared_cache(), &["run", "--policy", policy, "--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(killed.status.code(), Some(128 + 9), "{}", show(&killed));
    // The limit covers the whole run, boot included; the guest dies with it.
    let started = Instant::now();
    let limited = airlock_vm(
        &env,
        &shared_cache(),
        &["run", "--policy", policy, "--timeout", "20s", "--", "sleep", "600"],
    );
    assert_eq!(limited.status.code(), Some(124), "{}", show(&limited));
    assert!(started.elapsed() < Duration::from_secs(120), "{:?}", started.elapsed());
}

#[test]
fn qemu_runs_unprivileged_and_dies_with_airlock() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = emulation_policy(&env);
    let mut cmd =
        env.airlock(["run", "--policy", policy.to_str().unwrap(), "--", "sh", "-c", "echo ready; sleep 600"]);
    cmd.env("AIRLOCK_VM_CACHE", &cache).stderr(Stdio::null());
    let mut run = spawn_until_ready(cmd);
    let needle = format!("{}/run/{}-", cache.display(), run.id());
    let qemu = pids_running(&needle);
    assert_eq!(qemu.len(), 1, "one QEMU for this run");
    // QEMU runs as an unprivileged uid of its own, with no capabilities,
    // under its own seccomp filter.
    let status = std::fs::read_to_string(format!("/proc/{}/status", qemu[0])).unwrap();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned()).unwrap_or_default()
    };
    let uid: u32 = field("Uid:").split_whitespace().next().unwrap().parse().unwrap();
    assert!((998_000_000..999_000_000).contains(&uid), "QEMU runs as uid {uid}");
    assert!(field("Uid:").split_whitespace().all(|u| u == uid.to_string()), "{}", field("Uid:"));
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("Seccomp:"), "2", "QEMU's -sandbox filter");
    assert_eq!(field("Groups:"), "", "no supplementary groups");
    // SIGKILL: airlock cannot clean up. QEMU ends by two ways, either
    // enough: the kernel's parent-death signal, and the guest's agent
    // seeing its channel close and powering the guest off.
    run.kill().unwrap();
    run.wait().unwrap();
    assert!(
        wait_until(20, || pids_running(&needle).is_empty()),
        "QEMU outlived airlock: {:?}",
        pids_running(&needle)
    );
    // Its directory (socket, console log) stays until the next setup or run sweeps it.
    let runs = cache.join("run");
    let left = |runs: &Path| {
        std::fs::read_dir(runs)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{}-", run.id())))
            .count()
    };
    assert_eq!(left(&runs), 1);
    let setup = airlock_vm(&env, &cache, &["vm", "setup"]);
    assert!(setup.status.success(), "{}", show(&setup));
    assert_eq!(left(&runs), 0, "the dead run's directory was swept");
}

#[test]
fn a_guest_that_panics_or_powers_off_ends_the_run_with_the_reason() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let policy = emulation_policy(&env);
    let policy = policy.to_str().unwrap();
    let cache = shared_cache();
    let panic = "echo c > /proc/sysrq-trigger; sleep 60";
    let panicked = airlock_vm(&env, &cache, &["run", "--policy", policy, "--", "sh", "-c", panic]);
    assert_eq!(panicked.status.code(), Some(125), "{}", show(&panicked));
    assert!(
        stderr(&panicked).contains("the guest's kernel panicked while the command ran"),
        "{}",
        show(&panicked)
    );
    // Before powering off, the guest writes escape sequences to its console,
    // which the error message quotes: they arrive as `?`.
    let power_off = "printf '\\033[2Jforged\\r\\n' > /dev/console; echo o > /proc/sysrq-trigger; sleep 60";
    let off = airlock_vm(&env, &cache, &["run", "--policy", policy, "--", "sh", "-c", power_off]);
    assert_eq!(off.status.code(), Some(125), "{}", show(&off));
    assert!(stderr(&off).contains("the guest powered off while the command ran"), "{}", show(&off));
    assert!(stderr(&off).contains("?[2Jforged?"), "the console is quoted: {}", show(&off));
    assert!(!stderr(&off).contains('\x1b') && !stderr(&off).contains('\r'), "{}", show(&off));
}
