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
pub(crate) fn emulation_policy(env: &Env) -> PathBuf {
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

pub(crate) fn airlock_vm(env: &Env, cache: &Path, args: &[&str]) -> Output {
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

/// `airlock vm setup` with `cache`, and its largest resident memory (KiB)
/// seen while it ran.
fn setup_with_peak(env: &Env, cache: &Path) -> (Output, u64) {
    let child = env
        .airlock(["vm", "setup"])
        .env("AIRLOCK_VM_CACHE", cache)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let rss = std::fs::read_to_string(&status).ok().and_then(|text| {
                    text.lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                });
                peak = peak.max(rss.unwrap_or(0));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    (out, sampler.join().unwrap())
}

#[test]
fn vm_setup_builds_once_and_again_when_airlock_changes() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = env.dir.path().join("vm-cache");
    let (first, peak_kib) = setup_with_peak(&env, &cache);
    assert!(first.status.success(), "{}", show(&first));
    // Progress while it builds: the kernel, airlock, libraries, modules.
    for step in ["kernel ", "libraries", "kernel modules", "guest ready"] {
        assert!(stderr(&first).contains(step), "no {step:?} in:\n{}", stderr(&first));
    }
    // Whoever builds it (often a sandbox's supervisor, on its first run)
    // streams the big files through: it never holds airlock's executable
    // (a debug build is over 300 MB) nor the decompressed kernel (some 60
    // MB) whole.
    let exe_kib = std::fs::metadata(BIN).unwrap().len() / 1024;
    assert!(
        peak_kib < 128 * 1024,
        "vm setup grew to {peak_kib} KiB building the guest (airlock is {exe_kib} KiB)"
    );
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
    // A long-lived microVM is refused with the same message as run's.
    let create =
        airlock_vm(&env, &cache, &["create", "--tier", "microvm", "--policy", "ci", "--name", "vm1"]);
    assert_eq!(create.status.code(), Some(125), "{}", show(&create));
    assert_eq!(stderr(&create), err, "create and run refuse alike");
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
        // The test's directory holds the workspace (whose path the guest
        // has) and, beside it, the policy, which the guest must not see.
        policy.display()
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
    // The workspace (the current directory, mode overlay) is the guest's:
    // no warning that it is missing.
    assert!(!stderr(&out).contains("workspace yet"), "{}", show(&out));
    // The run went through the sandbox lifecycle: listed with its tier and
    // exit code, its output in its logs, its start and end in its audit log.
    let listed: serde_json::Value =
        serde_json::from_str(&stdout(&airlock_vm(&env, &cache, &["ls", "--json"]))).unwrap();
    assert_eq!(
        (listed[0]["tier"].as_str(), listed[0]["exit"]["code"].as_i64()),
        (Some("microvm"), Some(7)),
        "{listed}"
    );
    let name = listed[0]["name"].as_str().unwrap();
    let logs = airlock_vm(&env, &cache, &["logs", name]);
    assert!(stdout(&logs).contains(&format!("release={release}\n")), "{}", show(&logs));
    let stderr_log = airlock_vm(&env, &cache, &["logs", "--stderr", name]);
    assert!(stdout(&stderr_log).contains("to-stderr"), "{}", show(&stderr_log));
    let audit = std::fs::read_to_string(env.sandbox_dir(name).join("audit.jsonl")).unwrap();
    for event in ["\"created\"", "\"command_started\"", "\"exited\""] {
        assert!(audit.contains(event), "no {event} in the audit log:\n{audit}");
    }
    let accel = if stderr(&out).contains("software emulation (TCG)") { "tcg" } else { "kvm" };
    let boot = stderr(&out)
        .lines()
        .find(|l| l.contains("guest agent serving"))
        .map(str::to_owned)
        .unwrap_or_default();
    eprintln!("microVM ({accel}): run to exit {:.1} s; {boot}", took.as_secs_f64());
}

/// `run`'s stdin reaches the guest's command whole however much there is:
/// it is sent within the exec's window of the agent's acknowledgements
/// (the agent closes the stdin of an exec whose host sends past it), so a
/// command that reads late still gets every byte.
#[test]
fn runs_stdin_arrives_whole_within_the_window_however_late_it_is_read() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let policy = emulation_policy(&env);
    let input = vec![b'x'; 4 << 20];
    let out = airlock_with_input(
        &env,
        &["run", "--policy", policy.to_str().unwrap(), "--", "sh", "-c", "sleep 3; wc -c"],
        &input,
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out).trim(), input.len().to_string(), "{}", show(&out));
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
    let mut cmd = env.airlock([
        "run",
        "--policy",
        policy.to_str().unwrap(),
        "--name",
        "pdeath",
        "--",
        "sh",
        "-c",
        "echo ready; sleep 600",
    ]);
    cmd.env("AIRLOCK_VM_CACHE", &cache).stderr(Stdio::null());
    let mut run = spawn_until_ready(cmd);
    let (qemu, _) = guest_of(&cache, run.id());
    let needle = format!("{}/run/{}-", cache.display(), run.id());
    // QEMU runs as an unprivileged uid of its own, with no capabilities,
    // under its own seccomp filter.
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap();
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
    // So does QEMU's cgroup, the sandbox's, empty.
    assert!(!cgroup_dirs("pdeath").is_empty(), "QEMU ran in the sandbox's cgroup");
    let setup = airlock_vm(&env, &cache, &["vm", "setup"]);
    assert!(setup.status.success(), "{}", show(&setup));
    assert_eq!(left(&runs), 0, "the dead run's directory was swept");
    // gc finds the sandbox lost and removes its cgroup.
    let gc = airlock_vm(&env, &cache, &["gc"]);
    assert!(gc.status.success(), "{}", show(&gc));
    assert_eq!(cgroup_dirs("pdeath"), Vec::<PathBuf>::new(), "the dead run's cgroup was swept");
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

/// The values of QEMU's options `-kernel`, `-initrd` and each 9p share's
/// `path=`, from its command line: what its view must hold.
fn qemu_inputs(pid: i32) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> =
        cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let mut files = Vec::new();
    let mut shares = Vec::new();
    for pair in args.windows(2) {
        match pair[0].as_str() {
            "-kernel" | "-initrd" => files.push(PathBuf::from(&pair[1])),
            "-fsdev" => {
                let path = pair[1].split(',').find_map(|o| o.strip_prefix("path=")).unwrap();
                shares.push(PathBuf::from(path));
            }
            _ => {}
        }
    }
    (files, shares)
}

/// The limit file `name` of the cgroup QEMU is in for `controller` (v1), or
/// of its v2 cgroup, as text.
fn cgroup_limit(pid: i32, controller: &str, v1: &str, v2: &str) -> Option<String> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let file = if controllers.split(',').any(|c| c == controller) {
            PathBuf::from(format!("/sys/fs/cgroup/{controller}{path}/{v1}"))
        } else if controllers.is_empty() {
            PathBuf::from(format!("/sys/fs/cgroup{path}/{v2}"))
        } else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(&file) {
            return Some(text.trim().to_owned());
        }
    }
    None
}

/// QEMU `qemu` of the run whose directory is `run_dir` is jailed: its own
/// namespaces, PID 1 of its own, no capability, a mount view with only
/// what it needs (none of `absent`), no network but loopback.
fn assert_jailed(qemu: i32, run_dir: &Path, absent: &[&Path]) {
    let proc = PathBuf::from(format!("/proc/{qemu}"));
    // Namespaces of its own: user, mount, PID, network, IPC.
    for ns in ["user", "mnt", "pid", "net", "ipc"] {
        let theirs = std::fs::read_link(proc.join("ns").join(ns)).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "QEMU shares the host's {ns} namespace");
    }
    let status = std::fs::read_to_string(proc.join("status")).unwrap();
    let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap().to_owned();
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "QEMU is PID 1 of its own namespace: {nspid}");
    assert!(status.lines().any(|l| l == "CapBnd:\t0000000000000000"), "{status}");

    // Its mount view holds what it needs and nothing else.
    let (files, shares) = qemu_inputs(qemu);
    assert_eq!(files.len(), 2, "a kernel and an initramfs");
    let mountinfo = std::fs::read_to_string(proc.join("mountinfo")).unwrap();
    let mut seen = Vec::new();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (point, options) = (PathBuf::from(fields[4]), fields[5]);
        let library = |p: &Path| {
            ["/lib", "/lib64", "/usr/lib"].iter().any(|d| p.starts_with(d))
                && p.to_string_lossy().contains(".so")
        };
        // With an overlay workspace, a /proc of QEMU's own PID namespace
        // (its 9p server reads xattrs through /proc/self/fd); checked below.
        let own_proc = point == Path::new("/proc") && fields.contains(&"proc");
        let allowed = own_proc
            || point == Path::new("/")
            || files.contains(&point)
            || shares.iter().any(|s| point.starts_with(s))
            || point == run_dir
            || library(&point)
            || point == Path::new("/etc/ld.so.cache")
            || point.starts_with("/usr/share/qemu")
            || point.starts_with("/usr/bin/qemu-system");
        assert!(allowed, "QEMU's view holds {} ({line})", point.display());
        if point != run_dir {
            assert!(options.split(',').any(|o| o == "ro"), "{} is writable in QEMU's view", point.display());
        }
        seen.push(point);
    }
    assert!(seen.iter().any(|p| p == run_dir), "the run's directory is in QEMU's view:\n{mountinfo}");
    for file in &files {
        assert!(seen.contains(file), "{} is not in QEMU's view:\n{mountinfo}", file.display());
    }
    // Seen from the host through its root: no /proc (host processes), /sys,
    // /dev (no KVM here), home, state or test directory.
    let root = proc.join("root");
    if seen.iter().any(|p| p == Path::new("/proc")) {
        let pids: Vec<String> = std::fs::read_dir(root.join("proc"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<u32>().is_ok())
            .collect();
        assert_eq!(pids, ["1"], "QEMU's /proc shows processes beyond its own");
    }
    let hidden = [Path::new("/sys"), Path::new("/dev"), Path::new("/root"), Path::new("/home")];
    for path in hidden.iter().chain(absent) {
        let inside = root.join(path.strip_prefix("/").unwrap());
        let visible = shares.iter().any(|s| path.starts_with(s));
        assert!(visible || !inside.exists(), "QEMU sees {}", path.display());
    }
    assert!(root.join("usr/bin").exists() || shares.iter().any(|s| s == Path::new("/usr")));

    // No network interface but loopback.
    let net = std::fs::read_to_string(proc.join("net/dev")).unwrap();
    let interfaces: Vec<&str> =
        net.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    assert_eq!(interfaces, ["lo"], "{net}");
}

#[test]
fn qemu_runs_in_namespaces_a_mount_view_and_a_cgroup_of_its_own() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = emulation_policy(&env);
    let mut cmd = env.airlock([
        "run",
        "--policy",
        policy.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo ready; read line; echo \"guest got $line\"",
    ]);
    cmd.env("AIRLOCK_VM_CACHE", &cache).stdin(Stdio::piped()).stderr(Stdio::piped());
    let mut run = spawn_until_ready(cmd);
    let (qemu, run_dir) = guest_of(&cache, run.id());
    assert_jailed(qemu, &run_dir, &[env.state.as_path(), policy.as_path()]);

    // A cgroup whose limits cover QEMU: the guest's RAM (512M) plus a
    // bounded overhead, and a task limit.
    let memory: u64 = cgroup_limit(qemu, "memory", "memory.limit_in_bytes", "memory.max")
        .expect("QEMU is in a memory cgroup")
        .parse()
        .expect("a memory limit");
    assert!((512 << 20..=1024 << 20).contains(&memory), "memory limit {memory}");
    let pids: u64 = cgroup_limit(qemu, "pids", "pids.max", "pids.max")
        .expect("QEMU is in a pids cgroup")
        .parse()
        .expect("a task limit");
    assert!((8..=256).contains(&pids), "pids limit {pids}");

    // And the guest still runs the command.
    std::io::Write::write_all(&mut run.stdin.take().unwrap(), b"hello\n").unwrap();
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out).trim(), "guest got hello", "{}", show(&out));
}

#[test]
fn rootless_qemu_runs_jailed_as_the_caller_and_without_cgroups_only_if_the_policy_allows() {
    if !ready() {
        return;
    }
    let Some(r) = super::rootless::setup() else { return };
    let cache = r.env.dir.path().join("vm-cache");
    std::fs::create_dir(&cache).unwrap();
    std::os::unix::fs::chown(&cache, Some(r.uid), None).unwrap();
    // An ordinary user gets no cgroup: refused, before anything is built,
    // unless the policy allows it.
    let strict = emulation_policy(&r.env);
    let refused = r
        .airlock(&["run", "--policy", strict.to_str().unwrap(), "--", "true"])
        .env("AIRLOCK_VM_CACHE", &cache)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(125), "{}", show(&refused));
    assert!(
        stderr(&refused).contains("lacks cgroups") && stderr(&refused).contains("allow_weaker"),
        "{}",
        show(&refused)
    );
    assert!(!cache.join("guest").exists(), "the guest was built for a refused run");
    let policy = r.env.dir.path().join("rootless-microvm.toml");
    std::fs::write(
        &policy,
        // (disk-quota: ci's overlay workspace has no size cap rootless.)
        "extends = \"ci\"\n[isolation]\ntier = \"microvm\"\nallow_weaker = [\"kvm\", \"cgroups\", \"disk-quota\"]\n\
         [limits]\ntimeout = \"10m\"\ncpus = 1\nmemory = \"512M\"\n",
    )
    .unwrap();
    let mut cmd = r.airlock(&[
        "run",
        "--policy",
        policy.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo ready; read line; echo \"guest got $line\"",
    ]);
    cmd.env("AIRLOCK_VM_CACHE", &cache).stdin(Stdio::piped()).stderr(Stdio::piped());
    let mut run = spawn_until_ready(cmd);
    let (qemu, run_dir) = guest_of(&cache, run.id());
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    assert!(uid.split_whitespace().all(|u| u == r.uid.to_string()), "QEMU runs as the caller: {uid}");
    assert_jailed(qemu, &run_dir, &[r.env.state.as_path(), Path::new("/home/airlock-test")]);
    std::io::Write::write_all(&mut run.stdin.take().unwrap(), b"hello\n").unwrap();
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out).trim(), "guest got hello", "{}", show(&out));
    assert!(stderr(&out).contains("QEMU runs without a cgroup"), "said: {}", show(&out));
}

#[test]
fn a_view_qemu_cannot_be_given_is_a_clear_error_that_leaves_nothing() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    // A directory shared with the guest that QEMU's own uid cannot reach
    // (inside one only root may enter).
    let private = env.dir.path().join("private");
    let shared = private.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::set_permissions(&private, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let policy = env.dir.path().join("unreachable.toml");
    std::fs::write(
        &policy,
        format!(
            "extends = \"ci\"\n[isolation]\ntier = \"microvm\"\nallow_weaker = [\"kvm\"]\n\
             [filesystem]\nread_only = [\"/usr\", \"{}\"]\n[limits]\ntimeout = \"10m\"\ncpus = 1\n",
            shared.display()
        ),
    )
    .unwrap();
    let child = env
        .airlock(["run", "--policy", policy.to_str().unwrap(), "--name", "noview", "--", "true"])
        .env("AIRLOCK_VM_CACHE", &cache)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains("confining QEMU")
            && err.contains(&shared.display().to_string())
            && err.contains("denied"),
        "the jail says what it could not give QEMU: {err}"
    );
    assert!(pids_running(&format!("{}/run/{pid}-", cache.display())).is_empty(), "a QEMU was left running");
    assert_eq!(cgroup_dirs("noview"), Vec::<PathBuf>::new(), "QEMU's cgroup was left");
    let runs = std::fs::read_dir(cache.join("run")).unwrap().flatten();
    assert_eq!(runs.filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{pid}-"))).count(), 0);
}

/// `airlock` with the shared guest cache, its output collected; `input`
/// goes to its stdin.
fn airlock_with_input(env: &Env, args: &[&str], input: &[u8]) -> Output {
    let mut child = env
        .airlock(args)
        .env("AIRLOCK_VM_CACHE", shared_cache())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input).unwrap();
    child.wait_with_output().unwrap()
}

/// The QEMU processes started by supervisor `pid` (their run directory,
/// `<cache>/run/<pid>-<n>`, is on their command line).
pub(crate) fn qemus_of(pid: i64) -> Vec<i32> {
    pids_running(&format!("{}/run/{pid}-", shared_cache().display()))
}

/// The one QEMU that airlock process `owner` (a `run`, or a sandbox's
/// supervisor) started from `cache`, and its run directory.
fn guest_of(cache: &Path, owner: impl std::fmt::Display) -> (i32, PathBuf) {
    let prefix = format!("{owner}-");
    let qemu = pids_running(&format!("{}/run/{prefix}", cache.display()));
    assert_eq!(qemu.len(), 1, "one QEMU started by {owner}: {qemu:?}");
    let run_dir = std::fs::read_dir(cache.join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&prefix))
        .expect("the QEMU's run directory");
    (qemu[0], run_dir)
}

pub(crate) fn supervisor_pid(env: &Env, name: &str) -> i64 {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.sandbox_dir(name).join("meta.json")).unwrap()).unwrap();
    meta["supervisor_pid"].as_i64().unwrap()
}

#[test]
fn a_long_lived_microvm_is_served_like_a_process_tier_sandbox() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = emulation_policy(&env);
    let policy = policy.to_str().unwrap();
    // One guest for every check.
    let created = airlock_vm(
        &env,
        &cache,
        &[
            "create",
            "--policy",
            policy,
            "--name",
            "lv",
            "--workspace",
            env.workspace.to_str().unwrap(),
            "--mode",
            "ro",
            "--env",
            "GREETING=hi",
        ],
    );
    assert!(created.status.success(), "{}", show(&created));
    assert_eq!(stdout(&created).trim(), "lv");
    let supervisor = supervisor_pid(&env, "lv");
    // One QEMU, started by the sandbox's supervisor; jailed as `run`'s QEMU
    // is, inside the sandbox's own cgroup (the one meta.json names, which gc
    // sweeps), sized for it.
    let (qemu, run_dir) = guest_of(&cache, supervisor);
    assert_jailed(qemu, &run_dir, &[env.state.as_path()]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.sandbox_dir("lv").join("meta.json")).unwrap()).unwrap();
    let cgroup = meta["cgroup"].as_str().expect("the sandbox has a cgroup").to_owned();
    let placed = std::fs::read_to_string(format!("/proc/{qemu}/cgroup")).unwrap();
    for controller in ["memory", "pids"] {
        let line = placed
            .lines()
            .find(|l| l.split(':').nth(1).is_some_and(|c| c.split(',').any(|c| c == controller)));
        let line = line.or_else(|| placed.lines().find(|l| l.starts_with("0::"))).unwrap();
        assert!(
            line.ends_with(&format!("/{cgroup}")),
            "QEMU's {controller} cgroup is not {cgroup}: {placed}"
        );
    }
    let memory: u64 =
        cgroup_limit(qemu, "memory", "memory.limit_in_bytes", "memory.max").unwrap().parse().unwrap();
    assert!((512 << 20..=1024 << 20).contains(&memory), "memory limit {memory}");

    // ls and inspect show the tier, in the one view.
    let listed: serde_json::Value =
        serde_json::from_str(&stdout(&airlock_vm(&env, &cache, &["ls", "--json"]))).unwrap();
    assert_eq!(listed[0]["tier"], "microvm", "{listed}");
    assert_eq!(listed[0]["state"], "running", "{listed}");
    let inspected: serde_json::Value =
        serde_json::from_str(&stdout(&airlock_vm(&env, &cache, &["inspect", "--json", "lv"]))).unwrap();
    assert_eq!(inspected["tier"], "microvm", "{inspected}");
    assert_eq!(inspected["workspace_mode"], "ro", "{inspected}");
    assert!(inspected["degraded"].as_array().unwrap().iter().any(|d| d == "kvm") || !in_ci(), "{inspected}");

    // exec: the guest's kernel, output on both streams, the exit code, stdin.
    let (release, _) = guest_kernel().unwrap();
    // The sandbox's environment (the policy's, `create --env`) under the exec's own.
    let script = "uname -r; echo to-stderr >&2; read line; echo \"stdin=$line $GREETING $AIRLOCK_SANDBOX $OWN\"; exit 3";
    let out = airlock_with_input(
        &env,
        &["exec", "-i", "--env", "OWN=mine", "lv", "--", "sh", "-c", script],
        b"from the host\n",
    );
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert_eq!(stdout(&out), format!("{release}\nstdin=from the host hi lv mine\n"), "{}", show(&out));
    assert!(stderr(&out).contains("to-stderr"), "{}", show(&out));
    // A missing program, a signal, and the exec's own time limit (the
    // supervisor kills through the agent) end as in the process tier.
    let missing = airlock_vm(&env, &cache, &["exec", "lv", "--", "/no/such/program"]);
    assert_eq!(missing.status.code(), Some(127), "{}", show(&missing));
    let killed = airlock_vm(&env, &cache, &["exec", "lv", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(killed.status.code(), Some(128 + 15), "{}", show(&killed));
    let limited = airlock_vm(&env, &cache, &["exec", "--timeout", "2s", "lv", "--", "sleep", "600"]);
    assert_eq!(limited.status.code(), Some(124), "{}", show(&limited));

    // The workspace, read-only (mode ro), at its own path, where execs start.
    let seen =
        airlock_vm(&env, &cache, &["exec", "lv", "--", "sh", "-c", "pwd; cat README; echo x > README"]);
    assert_eq!(seen.status.code(), Some(2), "{}", show(&seen));
    assert_eq!(stdout(&seen), format!("{}\nhello\n", env.workspace.display()), "{}", show(&seen));
    assert!(stderr(&seen).contains("Read-only file system"), "{}", show(&seen));
    assert_eq!(std::fs::read_to_string(env.workspace.join("README")).unwrap(), "hello\n");

    // cp both ways, files ls and stat, through the agent's typed file operations.
    let host_file = env.dir.path().join("in.txt");
    std::fs::write(&host_file, "copied in\n").unwrap();
    let cp_in = airlock_vm(&env, &cache, &["cp", host_file.to_str().unwrap(), "lv:/tmp/in.txt"]);
    assert!(cp_in.status.success(), "{}", show(&cp_in));
    let shown = airlock_vm(
        &env,
        &cache,
        &["exec", "lv", "--", "sh", "-c", "cat /tmp/in.txt; echo made > /tmp/out.txt"],
    );
    assert_eq!(stdout(&shown), "copied in\n", "{}", show(&shown));
    let back = env.dir.path().join("out.txt");
    let cp_out = airlock_vm(&env, &cache, &["cp", "lv:/tmp/out.txt", back.to_str().unwrap()]);
    assert!(cp_out.status.success(), "{}", show(&cp_out));
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "made\n");
    let listing = airlock_vm(&env, &cache, &["files", "ls", "lv:/tmp"]);
    assert!(listing.status.success(), "{}", show(&listing));
    assert!(
        stdout(&listing).contains("in.txt") && stdout(&listing).contains("out.txt"),
        "{}",
        show(&listing)
    );
    let stat = airlock_vm(&env, &cache, &["files", "stat", "lv:/tmp/in.txt"]);
    assert!(stat.status.success() && stdout(&stat).split_whitespace().any(|w| w == "10"), "{}", show(&stat));

    // The sandbox's logs and audit log, as for the process tier.
    let logs = airlock_vm(&env, &cache, &["logs", "lv"]);
    assert!(
        stdout(&logs).contains(&format!("{release}\n")) && stdout(&logs).contains("copied in"),
        "{}",
        show(&logs)
    );
    let audit = std::fs::read_to_string(env.sandbox_dir("lv").join("audit.jsonl")).unwrap();
    for event in ["\"created\"", "\"exec_started\"", "\"exec_ended\"", "\"file_changed\"", "\"file_read\""] {
        assert!(audit.contains(event), "no {event} in the audit log:\n{audit}");
    }

    // stop: QEMU is gone at once; the sandbox is stopped, and rm leaves nothing.
    let stopped = airlock_vm(&env, &cache, &["stop", "lv"]);
    assert!(stopped.status.success(), "{}", show(&stopped));
    assert!(qemus_of(supervisor).is_empty(), "QEMU outlived the stop: {:?}", qemus_of(supervisor));
    let listed: serde_json::Value =
        serde_json::from_str(&stdout(&airlock_vm(&env, &cache, &["ls", "--json"]))).unwrap();
    assert_eq!(listed[0]["state"], "stopped", "{listed}");
    assert_eq!(listed[0]["exit"]["code"], 0, "{listed}");
    let audit = std::fs::read_to_string(env.sandbox_dir("lv").join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"stopped\"") && audit.contains("\"exited\""), "{audit}");
    let removed = airlock_vm(&env, &cache, &["rm", "lv"]);
    assert!(removed.status.success(), "{}", show(&removed));
    assert!(!env.sandbox_dir("lv").exists(), "the sandbox's state is gone");
    assert_eq!(cgroup_dirs("lv"), Vec::<PathBuf>::new(), "the sandbox's cgroup is gone");
    let runs = std::fs::read_dir(cache.join("run")).unwrap().flatten();
    let left: Vec<_> =
        runs.filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{supervisor}-"))).collect();
    assert!(left.is_empty(), "the VM's directory is gone: {left:?}");
}

/// The idle timeout and the maximum runtime stop a long-lived microVM as
/// they stop a process-tier sandbox: the same supervisor, the same stop, the
/// same audit record, and no QEMU left.
#[test]
fn the_idle_timeout_and_the_deadline_stop_a_microvm() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = emulation_policy(&env);
    let policy = policy.to_str().unwrap();
    let mut supervisors = Vec::new();
    for (name, flag, value) in [("idle", "--idle-timeout", "3s"), ("deadline", "--timeout", "40s")] {
        let o = airlock_vm(
            &env,
            &cache,
            &["create", "--policy", policy, "--name", name, "--mode", "none", flag, value],
        );
        assert!(o.status.success(), "{}", show(&o));
        let supervisor = supervisor_pid(&env, name);
        assert_eq!(qemus_of(supervisor).len(), 1, "{name}: one QEMU");
        supervisors.push(supervisor);
    }
    let stopped = |name: &str| {
        let o = env.airlock(["inspect", name, "--json"]).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).is_ok_and(|v| v["state"] == "stopped")
    };
    assert!(wait_until(120, || stopped("idle")), "the idle microVM was not stopped");
    assert!(wait_until(120, || stopped("deadline")), "the microVM past its deadline was not stopped");
    for (name, why) in [("idle", "idle timeout reached"), ("deadline", "maximum runtime reached")] {
        let audit = std::fs::read_to_string(env.sandbox_dir(name).join("audit.jsonl")).unwrap();
        assert!(audit.contains(why), "{name}: {audit}");
    }
    for supervisor in supervisors {
        assert!(wait_until(30, || qemus_of(supervisor).is_empty()), "a QEMU outlived its stopped sandbox");
    }
    for name in ["idle", "deadline"] {
        let o = env.airlock(["rm", name]).output().unwrap();
        assert!(o.status.success(), "{}", show(&o));
    }
}

#[test]
fn a_failed_launch_or_a_killed_supervisor_leaves_no_qemu() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = emulation_policy(&env);
    // A launch that fails once the guest is up (a failure injected after
    // the sandbox is recorded running) kills and reaps QEMU at once.
    let failed = env
        .airlock(["create", "--policy", policy.to_str().unwrap(), "--name", "halfway", "--mode", "none"])
        .env("AIRLOCK_VM_CACHE", &cache)
        .env("AIRLOCK_TEST_FAIL_AT", "running")
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(125), "{}", show(&failed));
    assert!(stderr(&failed).contains("launch phase running"), "{}", show(&failed));
    let halfway = supervisor_pid(&env, "halfway");
    assert!(qemus_of(halfway).is_empty(), "QEMU outlived a failed launch: {:?}", qemus_of(halfway));
    let listed: serde_json::Value =
        serde_json::from_str(&stdout(&airlock_vm(&env, &cache, &["ls", "--json"]))).unwrap();
    assert_eq!(listed[0]["state"], "failed", "{listed}");
    let runs = std::fs::read_dir(cache.join("run")).unwrap().flatten();
    let left: Vec<_> =
        runs.filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{halfway}-"))).collect();
    assert!(left.is_empty(), "the failed launch's VM directory is gone: {left:?}");
    assert!(airlock_vm(&env, &cache, &["rm", "halfway"]).status.success());

    let created = airlock_vm(
        &env,
        &cache,
        &[
            "create",
            "--policy",
            policy.to_str().unwrap(),
            "--name",
            "orphan",
            "--workspace",
            env.workspace.to_str().unwrap(),
            "--mode",
            "overlay",
        ],
    );
    assert!(created.status.success(), "{}", show(&created));
    let supervisor = supervisor_pid(&env, "orphan");
    assert_eq!(qemus_of(supervisor).len(), 1);
    let layer = env.sandbox_dir("orphan").join("layer");
    let virtiofsd = || pids_running(&format!("source={}", layer.display()));
    assert_eq!(virtiofsd().len(), 1, "the overlay workspace's virtiofsd");
    // SIGKILL: the supervisor cannot clean up. QEMU dies with it (the
    // parent-death signal); gc finds the sandbox lost and sweeps the rest.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(supervisor as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    assert!(
        wait_until(20, || qemus_of(supervisor).is_empty()),
        "QEMU outlived its supervisor: {:?}",
        qemus_of(supervisor)
    );
    // virtiofsd's parent-death signal is cleared by its own fsuid changes;
    // it ends when QEMU's end closes its vhost-user connection.
    assert!(
        wait_until(20, || virtiofsd().is_empty()),
        "virtiofsd outlived its supervisor: {:?}",
        virtiofsd()
    );
    let listed: serde_json::Value =
        serde_json::from_str(&stdout(&airlock_vm(&env, &cache, &["ls", "--json"]))).unwrap();
    assert_eq!(
        (listed[0]["state"].as_str(), listed[0]["lost"].as_bool()),
        (Some("failed"), Some(true)),
        "{listed}"
    );
    let gc = airlock_vm(&env, &cache, &["gc"]);
    assert!(gc.status.success(), "{}", show(&gc));
    assert!(stdout(&gc).contains("orphan"), "{}", show(&gc));
    let audit = std::fs::read_to_string(env.sandbox_dir("orphan").join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"supervisor_lost\""), "{audit}");
    let runs = std::fs::read_dir(cache.join("run")).unwrap().flatten();
    let left: Vec<_> =
        runs.filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{supervisor}-"))).collect();
    assert!(left.is_empty(), "gc swept the VM's directory: {left:?}");
    let removed = airlock_vm(&env, &cache, &["rm", "orphan"]);
    assert!(removed.status.success(), "{}", show(&removed));
}

#[test]
fn the_daemon_creates_a_microvm_sandbox_and_execs_in_it() {
    if !ready() {
        return;
    }
    let d = super::daemon_harness::TestDaemon::start_with("microvm", |cmd| {
        cmd.env("AIRLOCK_VM_CACHE", shared_cache());
    });
    let policy = emulation_policy(&d.env);
    let policy = policy.to_str().unwrap();
    // The host's refusal, as the CLI says it: 422 (on a host where KVM
    // runs ordinary guests, this policy runs).
    let (_, kvm_only) = d.json(
        "POST",
        "/v1/sandboxes",
        Some(serde_json::json!({ "name": "refused", "policy": "ci", "tier": "microvm" })),
    );
    let (state, _) = doctor_kvm_state(&d.env, &shared_cache());
    if state != "usable" {
        assert_eq!(kvm_only["error"]["code"], "host_unsupported", "{kvm_only}");
        assert!(kvm_only["error"]["message"].as_str().unwrap().contains("allow_weaker"), "{kvm_only}");
    }
    let (status, bad) =
        d.json("POST", "/v1/sandboxes", Some(serde_json::json!({ "policy": policy, "tier": "vm" })));
    assert_eq!((status, bad["error"]["code"].as_str()), (400, Some("invalid_request")), "{bad}");
    // The policy's tier, or the request's.
    let (status, created) =
        d.json("POST", "/v1/sandboxes", Some(serde_json::json!({ "name": "dvm", "policy": policy })));
    assert_eq!(status, 201, "{created}\n{}", d.log());
    assert_eq!(created["tier"], "microvm", "{created}");
    let (status, body) =
        d.request("POST", "/v1/sandboxes/dvm/exec", Some(r#"{"argv":["sh","-c","uname -r; exit 5"]}"#));
    assert_eq!(status, 200, "{body}");
    let lines: Vec<serde_json::Value> =
        body.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    let (release, _) = guest_kernel().unwrap();
    let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{release}\n"));
    assert!(lines.iter().any(|l| l["type"] == "stdout" && l["data"] == encoded.as_str()), "{body}");
    assert_eq!(lines.last().unwrap()["code"], 5, "{body}");
    let (_, inspected) = d.json("GET", "/v1/sandboxes/dvm", None);
    assert_eq!(inspected["tier"], "microvm", "{inspected}");
    assert_eq!(qemus_of(inspected["supervisor_pid"].as_i64().unwrap()).len(), 1, "{inspected}");
    // A guest that powers off ends the sandbox, with the reason in its audit log.
    let (_, body) = d.request(
        "POST",
        "/v1/sandboxes/dvm/exec",
        Some(r#"{"argv":["sh","-c","echo o > /proc/sysrq-trigger; sleep 60"]}"#),
    );
    assert!(body.lines().last().is_some_and(|l| l.contains("exit") || l.contains("error")), "{body}");
    assert!(
        wait_until(30, || d.json("GET", "/v1/sandboxes/dvm", None).1["state"] == "stopped"),
        "{}",
        d.json("GET", "/v1/sandboxes/dvm", None).1
    );
    let (_, ended) = d.json("GET", "/v1/sandboxes/dvm", None);
    assert_eq!((ended["exit"]["code"].as_i64(), ended["exit"]["signal"].as_i64()), (None, None), "{ended}");
    let audit = std::fs::read_to_string(d.env.sandbox_dir("dvm").join("audit.jsonl")).unwrap();
    assert!(audit.contains("the guest powered off while the sandbox ran"), "{audit}");
    let supervisor = inspected["supervisor_pid"].as_i64().unwrap();
    assert!(qemus_of(supervisor).is_empty(), "QEMU outlived its guest: {:?}", qemus_of(supervisor));
    let (status, removed) = d.json("DELETE", "/v1/sandboxes/dvm", None);
    assert_eq!(status, 200, "{removed}");
    assert!(!d.env.sandbox_dir("dvm").exists());
}

/// What `diff --json` lists for sandbox `name`: each change's path, kind
/// and new type, in order.
fn listed_changes(env: &Env, name: &str) -> Vec<(String, String, String)> {
    let out = env.airlock(["diff", name, "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (text("path"), text("kind"), text("new_type"))
        })
        .collect()
}

/// Every file under `dir` with its content (directories as `<dir>`).
fn tree_of(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let rel = entry.path().strip_prefix(dir).unwrap().display().to_string();
            if entry.file_type().unwrap().is_dir() {
                out.push((rel, "<dir>".to_owned()));
                stack.push(entry.path());
            } else {
                out.push((rel, std::fs::read_to_string(entry.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn fill_workspace(dir: &Path) {
    std::fs::create_dir_all(dir.join("gone")).unwrap();
    std::fs::create_dir_all(dir.join("kept")).unwrap();
    std::fs::write(dir.join("old"), "old\n").unwrap();
    std::fs::write(dir.join("edited"), "one\n").unwrap();
    std::fs::write(dir.join("gone/a"), "a\n").unwrap();
    std::fs::write(dir.join("kept/b"), "b\n").unwrap();
}

#[test]
fn an_overlay_workspace_in_a_microvm_is_reviewed_and_applied_as_the_process_tiers() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let review = "[workspace]\nmode = \"overlay\"\nwriteback = \"review\"\n\
                  [cleanup]\non_success = \"keep\"\non_failure = \"keep\"\n";
    let vm_policy = env.dir.path().join("overlay-vm.toml");
    std::fs::write(
        &vm_policy,
        format!(
            "extends = \"ci\"\n[isolation]\ntier = \"microvm\"\nallow_weaker = [\"kvm\"]\n\
             [limits]\ntimeout = \"10m\"\ncpus = 1\nmemory = \"512M\"\n{review}"
        ),
    )
    .unwrap();
    let process_policy = env.dir.path().join("overlay-process.toml");
    std::fs::write(&process_policy, format!("extends = \"ci\"\n{review}")).unwrap();
    let vm_ws = env.dir.path().join("vm-ws");
    let process_ws = env.dir.path().join("process-ws");
    fill_workspace(&vm_ws);
    fill_workspace(&process_ws);
    let before = tree_of(&vm_ws);
    let script = "echo x > new && rm old && echo two >> edited && rm -r gone && mkdir -p made/deep \
                  && echo y > made/deep/f && echo c > kept/c";

    let created = airlock_vm(
        &env,
        &cache,
        &[
            "create",
            "--policy",
            vm_policy.to_str().unwrap(),
            "--name",
            "ov",
            "--workspace",
            vm_ws.to_str().unwrap(),
        ],
    );
    assert!(created.status.success(), "{}", show(&created));
    let supervisor = supervisor_pid(&env, "ov");

    // virtiofsd, serving the layer tmpfs and nothing else, is confined:
    // the sandbox's id block (root of its own user namespace), namespaces
    // of its own, at most the capabilities it serves files with, no new
    // privileges, chrooted into the layer, in the sandbox's cgroup.
    let layer = env.sandbox_dir("ov").join("layer");
    let virtiofsd = pids_running(&format!("source={}", layer.display()));
    assert_eq!(virtiofsd.len(), 1, "one virtiofsd for the sandbox");
    let virtiofsd = virtiofsd[0];
    let proc = PathBuf::from(format!("/proc/{virtiofsd}"));
    let status = std::fs::read_to_string(proc.join("status")).unwrap();
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().to_owned();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.sandbox_dir("ov").join("meta.json")).unwrap()).unwrap();
    let block_root = 1_000_000_000 + 65_536 * meta["id_block"].as_u64().expect("an id block");
    for id in field("Uid:").split_whitespace().chain(field("Gid:").split_whitespace()) {
        assert_eq!(id.parse::<u64>().unwrap(), block_root, "virtiofsd's ids: {status}");
    }
    let served_with: u64 = [0, 1, 3, 4, 6, 7, 27, 31].iter().map(|c| 1u64 << c).sum();
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let held = u64::from_str_radix(&field(set), 16).unwrap();
        assert_eq!(held & !served_with, 0, "virtiofsd holds more than it serves files with: {status}");
    }
    assert_eq!(field("CapInh:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    for ns in ["user", "mnt", "pid", "net", "ipc"] {
        let theirs = std::fs::read_link(proc.join("ns").join(ns)).unwrap();
        assert_ne!(theirs, std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(), "shares {ns}");
    }
    let root = proc.join("root");
    assert!(root.join("upper").is_dir() && root.join("work").is_dir(), "virtiofsd's root is the layer");
    for absent in ["usr", "etc", "proc", "meta.json"] {
        assert!(!root.join(absent).exists(), "virtiofsd sees /{absent}");
    }
    let cgroup = meta["cgroup"].as_str().expect("the sandbox has a cgroup").to_owned();
    let placed = std::fs::read_to_string(proc.join("cgroup")).unwrap();
    assert!(placed.lines().all(|l| l.ends_with(&format!("/{cgroup}")) || l.ends_with(":/")), "{placed}");
    assert!(placed.contains(&format!("/{cgroup}")), "{placed}");

    // The same changes in the guest and in a process-tier sandbox.
    let exec = airlock_vm(&env, &cache, &["exec", "ov", "--", "sh", "-c", script]);
    assert!(exec.status.success(), "{}", show(&exec));
    let process = env
        .airlock([
            "run",
            "--policy",
            process_policy.to_str().unwrap(),
            "--name",
            "pr",
            "--workspace",
            process_ws.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap();
    assert!(process.status.success(), "{}", show(&process));
    assert_eq!(tree_of(&vm_ws), before, "the host's workspace changed before apply");
    let vm_changes = listed_changes(&env, "ov");
    assert_eq!(vm_changes, listed_changes(&env, "pr"), "the two tiers' diffs differ");
    for expected in [("new", "added"), ("old", "deleted"), ("edited", "modified"), ("made/deep/f", "added")] {
        assert!(
            vm_changes.iter().any(|(p, k, _)| p == expected.0 && k == expected.1),
            "{expected:?} not in {vm_changes:?}"
        );
    }
    assert!(vm_changes.iter().any(|(p, k, _)| p.starts_with("gone") && k == "deleted"), "{vm_changes:?}");

    // Stopped, then applied: the host's workspace is the process tier's.
    let stopped = airlock_vm(&env, &cache, &["stop", "ov"]);
    assert!(stopped.status.success(), "{}", show(&stopped));
    assert_eq!(listed_changes(&env, "ov"), vm_changes, "the diff survives the guest");
    for name in ["ov", "pr"] {
        let applied = env.airlock(["apply", name, "--yes"]).output().unwrap();
        assert!(applied.status.success(), "{}", show(&applied));
    }
    assert_eq!(tree_of(&vm_ws), tree_of(&process_ws));
    assert!(
        vm_ws.join("made/deep/f").exists() && !vm_ws.join("old").exists() && !vm_ws.join("gone").exists()
    );
    assert_eq!(std::fs::read_to_string(vm_ws.join("edited")).unwrap(), "one\ntwo\n");

    // Gone with the sandbox.
    let removed = env.airlock(["rm", "ov"]).output().unwrap();
    assert!(removed.status.success(), "{}", show(&removed));
    assert!(!proc.exists(), "virtiofsd outlived its sandbox");
    assert!(qemus_of(supervisor).is_empty(), "QEMU outlived its sandbox");
}

/// `airlock run` at a terminal (script(1) makes one), as the process tier's
/// `lifecycle::a_terminal_gets_a_fresh_pty_inside`: the command gets a
/// terminal of its own in the guest (from the guest's devpts) of the
/// caller's size, which follows the caller's changes; the caller's terminal
/// is in raw mode meanwhile and restored after; the exit code is the
/// command's. The same run's artifacts are captured from its overlay
/// workspace as a process-tier run's (one boot for both).
#[test]
fn a_run_at_a_terminal_gets_one_in_the_guest_and_its_artifacts_are_captured() {
    if !ready()
        || !require(Command::new("script").arg("--version").output().is_ok(), "script(1) from util-linux")
    {
        return;
    }
    let env = Env::new();
    let policy = emulation_policy(&env);
    // In the workspace, where the command starts: no quoting through two shells.
    std::fs::write(
        env.workspace.join("guest.sh"),
        "tty; stty size; test -t 0 && echo stdin-is-tty\n\
         n=0; while [ \"$(stty size)\" = \"41 123\" ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n+1)); done\n\
         echo \"resized to $(stty size)\"\n\
         mkdir -p out && echo '<testsuite/>' > out/junit-report.xml\n\
         exit 5\n",
    )
    .unwrap();
    // The caller's terminal changes size once the guest has shown the first
    // (the test writes to this FIFO then); it then gets SIGWINCH.
    let resize = env.dir.path().join("resize");
    let made = Command::new("mkfifo").arg(&resize).status().unwrap();
    assert!(made.success());
    let command = format!(
        "stty rows 41 cols 123; before=$(stty -g); \
         (read go < {resize}; stty rows 50 cols 100 < /dev/tty) & \
         {BIN} run --policy {policy} --name term -- sh guest.sh; echo \"code=$?\"; \
         [ \"$before\" = \"$(stty -g)\" ] && echo restored",
        resize = resize.display(),
        policy = policy.display(),
    );
    let mut script = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("AIRLOCK_STATE_DIR", &env.state)
        .env("AIRLOCK_CGROUP_PARENT", cgroup_parent())
        .env("AIRLOCK_SOCKET", env.dir.path().join("no-daemon.sock"))
        .env("AIRLOCK_VM_CACHE", shared_cache())
        .current_dir(&env.workspace)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let (seen, mut out) = (seen.clone(), script.stdout.take().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let text = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    let shown = wait_until(300, || text().contains("41 123") || script.try_wait().unwrap().is_some())
        && text().contains("41 123");
    // Wakes the resizer if it still waits (not when the run ended early:
    // non-blocking, so nothing hangs without a reader).
    use rustix::fs::{Mode, OFlags};
    if let Ok(fifo) = rustix::fs::open(&resize, OFlags::WRONLY | OFlags::NONBLOCK, Mode::empty()) {
        let _ = rustix::io::write(&fifo, b"go\n");
    }
    let status = script.wait().unwrap();
    reader.join().unwrap();
    let out = text();
    let mut stderr_text = String::new();
    std::io::Read::read_to_string(&mut script.stderr.take().unwrap(), &mut stderr_text).unwrap();
    let context = format!("status {status:?}\n--- output\n{out}\n--- stderr\n{stderr_text}");
    assert!(shown, "the guest never showed the caller's size: {context}");
    assert!(out.contains("/dev/pts/"), "a terminal of the guest's devpts: {context}");
    assert!(out.contains("stdin-is-tty"), "{context}");
    assert!(out.contains("resized to 50 100"), "the size change reached the guest: {context}");
    assert!(out.contains("code=5"), "the command's exit code: {context}");
    assert!(out.contains("restored"), "the caller's terminal was left changed: {context}");
    // The listing: a microVM run that kept its workspace (exit 5: ci keeps it).
    let listed: serde_json::Value =
        serde_json::from_str(&stdout(&airlock_vm(&env, &shared_cache(), &["ls", "--json"]))).unwrap();
    assert_eq!((listed[0]["tier"].as_str(), listed[0]["exit"]["code"].as_i64()), (Some("microvm"), Some(5)));
    // Its output went to its log too, as the process tier's terminal does.
    let logs = airlock_vm(&env, &shared_cache(), &["logs", "term"]);
    assert!(stdout(&logs).contains("stdin-is-tty"), "{}", show(&logs));
    let captured = env.sandbox_dir("term").join("artifacts/out/junit-report.xml");
    assert_eq!(std::fs::read_to_string(&captured).unwrap_or_default(), "<testsuite/>\n", "{context}");
    let audit = std::fs::read_to_string(env.sandbox_dir("term").join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"artifacts_captured\"") && audit.contains("out/junit-report.xml"), "{audit}");
    // The workspace on the host is untouched.
    assert!(!env.workspace.join("out").exists());
}

/// Reads one of the workload cgroup's files in sandbox `name` with shell
/// builtins only (which need no new process: the workload may be at its
/// pids limit).
fn workload_file(env: &Env, name: &str, file: &str) -> String {
    let script = format!("read v < /sys/fs/cgroup/workload/{file}; echo \"$v\"");
    let out = airlock_vm(env, &shared_cache(), &["exec", name, "--", "sh", "-c", &script]);
    assert!(out.status.success(), "{}", show(&out));
    stdout(&out).trim().to_owned()
}

/// The policy's limits inside the guest, which QEMU's cgroup on the host
/// cannot give: what the agent starts is in a cgroup of the guest's own
/// with `limits.pids` and the memory the guest can spare beside its agent,
/// so a fork bomb ends at the limit and an OOM kills a process, not the
/// agent, and the sandbox stays usable after both; the guest's writable
/// places are one tmpfs of `limits.disk`, so filling it is ENOSPC. The
/// same guest's artifacts are captured when it stops.
#[test]
fn the_policys_limits_hold_inside_a_microvm_and_it_stays_usable() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = env.dir.path().join("limits.toml");
    std::fs::write(
        &policy,
        "extends = \"ci\"\n[isolation]\ntier = \"microvm\"\nallow_weaker = [\"kvm\"]\n\
         [limits]\ntimeout = \"10m\"\ncpus = 1\nmemory = \"512M\"\npids = 64\ndisk = \"64M\"\n",
    )
    .unwrap();
    let created = airlock_vm(
        &env,
        &cache,
        &[
            "create",
            "--policy",
            policy.to_str().unwrap(),
            "--name",
            "lim",
            "--workspace",
            env.workspace.to_str().unwrap(),
        ],
    );
    assert!(created.status.success(), "{}", show(&created));

    // Where the limits are: the exec's own cgroup, read-only to it.
    let seen = airlock_vm(
        &env,
        &cache,
        &[
            "exec",
            "lim",
            "--",
            "sh",
            "-c",
            "cat /proc/self/cgroup /sys/fs/cgroup/workload/pids.max /sys/fs/cgroup/workload/memory.max; \
             df -k / /tmp /dev/shm | tail -n +2 | awk '{print $2}'; \
             echo max > /sys/fs/cgroup/workload/pids.max || echo read-only",
        ],
    );
    assert!(seen.status.success(), "{}", show(&seen));
    let text = stdout(&seen);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    assert_eq!(lines.first().copied(), Some("0::/workload"), "{}", show(&seen));
    assert_eq!(lines.get(1).copied(), Some("64"), "pids.max is the policy's: {}", show(&seen));
    let memory_max: u64 = lines[2].parse().unwrap();
    assert!(
        (256 << 20..512 << 20).contains(&memory_max),
        "memory.max below the guest's 512 MiB, with room for the agent: {memory_max}"
    );
    // One tmpfs of limits.disk for the root (/tmp with it) and /dev/shm.
    assert_eq!(&lines[3..6], ["65536", "65536", "65536"], "{}", show(&seen));
    assert_eq!(lines.last().copied(), Some("read-only"), "{}", show(&seen));
    // An exec as another user moves in too (the move is checked against
    // the credentials of whoever opened cgroup.procs: the guest's PID 1),
    // and may write the guest's /tmp.
    let other = airlock_vm(
        &env,
        &cache,
        &[
            "exec",
            "--user",
            "1000:1000",
            "lim",
            "--",
            "sh",
            "-c",
            "id -u; cat /proc/self/cgroup; echo x > /tmp/mine",
        ],
    );
    assert_eq!(stdout(&other), "1000\n0::/workload\n", "{}", show(&other));
    assert!(other.status.success(), "{}", show(&other));

    // Writing past limits.disk outside the workspace: ENOSPC, and the
    // sandbox goes on.
    let filled = airlock_vm(
        &env,
        &cache,
        &[
            "exec",
            "lim",
            "--",
            "sh",
            "-c",
            "dd if=/dev/zero of=/tmp/fill bs=1M count=100; e=$?; rm /tmp/fill; exit $e",
        ],
    );
    assert_ne!(filled.status.code(), Some(0), "{}", show(&filled));
    assert!(stderr(&filled).contains("No space left on device"), "{}", show(&filled));

    // More memory than the workload may have: the process is killed, not
    // the agent. One allocation past the limit: a program that creeps up
    // to it in steps can instead thrash (the kernel reclaims and refaults
    // its code pages, which counts as progress) until its deadline — see
    // the README's "Not yet".
    let hog = "m = int(open('/sys/fs/cgroup/workload/memory.max').read())\na = b'x' * (m + (64 << 20))\n";
    let oom = airlock_vm(&env, &cache, &["exec", "lim", "--", "python3", "-c", hog]);
    assert_eq!(oom.status.code(), Some(128 + 9), "{}", show(&oom));
    let events =
        airlock_vm(&env, &cache, &["exec", "lim", "--", "cat", "/sys/fs/cgroup/workload/memory.events"]);
    let kills = stdout(&events)
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(kills >= 1, "the kill was the workload cgroup's: {}", show(&events));

    // A fork bomb ends at the limit; execs work during it (started by the
    // agent, outside the limit, and moved in) and after it.
    let bomb = airlock_vm(
        &env,
        &cache,
        &["exec", "--timeout", "60s", "lim", "--", "sh", "-c", "b() { b | b & }; b; wait"],
    );
    // Its shell returns at once (its children go on); served, not an
    // airlock failure.
    assert!(bomb.status.code().is_some_and(|c| c != 125), "{}", show(&bomb));
    // It dies out by itself once forks keep failing; under emulation on a
    // host busy with other tests that took over 180 s once.
    assert!(
        wait_until(360, || workload_file(&env, "lim", "pids.current").parse::<u64>().is_ok_and(|n| n <= 1)),
        "the bomb's processes did not end"
    );
    let events = workload_file(&env, "lim", "pids.events");
    let refused: u64 = events.strip_prefix("max ").and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(refused > 0, "no fork was refused at the limit: {events}");
    let peak: u64 = workload_file(&env, "lim", "pids.peak").parse().unwrap();
    // An exec moved in at the limit may pass it by one or two.
    assert!((60..=68).contains(&peak), "pids.peak {peak}");
    let after = airlock_vm(&env, &cache, &["exec", "lim", "--", "sh", "-c", "echo $(echo forked)"]);
    assert_eq!(stdout(&after), "forked\n", "{}", show(&after));

    // Artifacts: written in the workspace, captured when the sandbox stops.
    let wrote = airlock_vm(
        &env,
        &cache,
        &["exec", "lim", "--", "sh", "-c", "mkdir -p test-results && echo ok > test-results/r.txt"],
    );
    assert!(wrote.status.success(), "{}", show(&wrote));
    let stopped = airlock_vm(&env, &cache, &["stop", "lim"]);
    assert!(stopped.status.success(), "{}", show(&stopped));
    let captured = env.sandbox_dir("lim").join("artifacts/test-results/r.txt");
    assert_eq!(std::fs::read_to_string(&captured).unwrap_or_default(), "ok\n");
    assert!(!env.workspace.join("test-results").exists());
    let removed = airlock_vm(&env, &cache, &["rm", "lim"]);
    assert!(removed.status.success(), "{}", show(&removed));
}

/// The process ids of the one virtiofsd serving `dir`, and its status.
fn virtiofsd_serving(dir: &Path) -> (i32, String) {
    let pids = pids_running(&format!("source={}", dir.display()));
    assert_eq!(pids.len(), 1, "one virtiofsd serving {}: {pids:?}", dir.display());
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    (pids[0], status)
}

/// A status field of a process, trimmed.
fn status_field(status: &str, name: &str) -> String {
    status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default().trim().to_owned()
}

/// The owner and group of `path` on the host (not following a link).
fn owner_of(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.uid(), meta.gid())
}

/// In the guest: tries to give `file` a file capability (a valid v2
/// `security.capability`, CAP_SETUID permitted and effective) and prints
/// `fcap set` or `fcap errno N`.
fn set_file_capability(file: &str) -> String {
    format!(
        r#"python3 -c 'import os, struct
try:
    os.setxattr("{file}", "security.capability", struct.pack("<5I", 0x02000001, 1 << 7, 0, 0, 0))
    print("fcap set")
except OSError as e:
    print("fcap errno", e.errno)'"#
    )
}

/// Mode rw: the guest writes the host's workspace itself, through a
/// virtiofsd jailed as the overlay's is, while QEMU has no share of it; the
/// ids are the process tier's (as root an id-mapped tree: the guest's root
/// writes as host root, other ids as themselves); a file capability is
/// refused; and a symlink to / the guest writes leads to the guest's own
/// root, never to the host's files.
#[test]
fn a_rw_workspace_in_a_microvm_is_written_through_a_jailed_virtiofsd_with_the_process_tiers_ids() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let rw = "[workspace]\nmode = \"rw\"\nwriteback = \"review\"\n";
    let policy = env.dir.path().join("rw-vm.toml");
    std::fs::write(
        &policy,
        format!(
            "extends = \"ci\"\n[isolation]\ntier = \"microvm\"\nallow_weaker = [\"kvm\"]\n\
             [limits]\ntimeout = \"10m\"\ncpus = 1\nmemory = \"512M\"\n{rw}"
        ),
    )
    .unwrap();
    let ws = env.dir.path().join("rw-ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("old"), "one\n").unwrap();
    std::os::unix::fs::chown(ws.join("old"), Some(1000), Some(1000)).unwrap();
    std::fs::write(ws.join("gone"), "gone\n").unwrap();
    let outside = env.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), "host only\n").unwrap();

    let created = airlock_vm(
        &env,
        &cache,
        &[
            "create",
            "--policy",
            policy.to_str().unwrap(),
            "--name",
            "rw",
            "--workspace",
            ws.to_str().unwrap(),
        ],
    );
    assert!(created.status.success(), "{}", show(&created));
    let supervisor = supervisor_pid(&env, "rw");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.sandbox_dir("rw").join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["workspace_mode"], "rw", "{meta}");

    // QEMU is jailed as ever and has no share of the workspace at all.
    let (qemu, run_dir) = guest_of(&cache, supervisor);
    let (_, shares) = qemu_inputs(qemu);
    assert!(!shares.iter().any(|s| ws.starts_with(s)), "QEMU shares the workspace: {shares:?}");
    assert_jailed(qemu, &run_dir, &[ws.as_path(), env.state.as_path()]);

    // virtiofsd serves it: the sandbox's id block, namespaces of its own,
    // no CAP_SETFCAP among what it may hold, chrooted into the workspace
    // (an id-mapped mount of it), in the sandbox's cgroup.
    let (virtiofsd, status) = virtiofsd_serving(&ws);
    let block_root = 1_000_000_000 + 65_536 * meta["id_block"].as_u64().expect("an id block");
    for id in status_field(&status, "Uid:")
        .split_whitespace()
        .chain(status_field(&status, "Gid:").split_whitespace())
    {
        assert_eq!(id.parse::<u64>().unwrap(), block_root, "virtiofsd's ids: {status}");
    }
    let served_with: u64 = [0, 1, 3, 4, 6, 7, 27].iter().map(|c| 1u64 << c).sum();
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let held = u64::from_str_radix(&status_field(&status, set), 16).unwrap();
        assert_eq!(
            held & !served_with,
            0,
            "virtiofsd holds more than it serves the workspace with: {status}"
        );
    }
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{status}");
    let proc = PathBuf::from(format!("/proc/{virtiofsd}"));
    for ns in ["user", "mnt", "pid", "net", "ipc"] {
        let theirs = std::fs::read_link(proc.join("ns").join(ns)).unwrap();
        assert_ne!(theirs, std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(), "shares {ns}");
    }
    let root = proc.join("root");
    assert!(root.join("old").is_file() && root.join("gone").is_file(), "virtiofsd's root is the workspace");
    for absent in ["usr", "etc", "proc", "outside"] {
        assert!(!root.join(absent).exists(), "virtiofsd sees /{absent}");
    }
    // Seen from its chroot, the one mount is the workspace's directory at
    // its root: id-mapped, nosuid, nodev, noexec.
    let mountinfo = std::fs::read_to_string(proc.join("mountinfo")).unwrap();
    let served = mountinfo.lines().find(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        fields.get(3) == Some(&ws.to_str().unwrap()) && fields.get(4) == Some(&"/")
    });
    let served = served.unwrap_or_else(|| panic!("virtiofsd's root is not the workspace:\n{mountinfo}"));
    for option in ["idmapped", "nosuid", "nodev", "noexec"] {
        assert!(
            served.split_whitespace().nth(5).unwrap().split(',').any(|o| o == option),
            "{option}: {served}"
        );
    }
    let cgroup = meta["cgroup"].as_str().expect("the sandbox has a cgroup").to_owned();
    let placed = std::fs::read_to_string(proc.join("cgroup")).unwrap();
    assert!(placed.contains(&format!("/{cgroup}")), "{placed}");

    // The guest writes and removes host files; its links stay links.
    let script = format!(
        "echo new > new && rm gone && echo two >> old && mkdir d && touch d/f && chown 1234:2345 d/f \
         && ln -s / escape && ln -s ../outside up && {{ cat escape{outside}/secret up/secret; true; }} && {fcap} \
         && cp /bin/true tool && {{ chmod 4755 tool && echo SUID-SET; chmod 2755 tool && echo SGID-SET; true; }}",
        outside = outside.display(),
        fcap = set_file_capability("new"),
    );
    let exec = airlock_vm(&env, &cache, &["exec", "rw", "--", "sh", "-c", &script]);
    assert!(exec.status.success(), "{}", show(&exec));
    assert!(
        !stdout(&exec).contains("host only"),
        "the guest read a host file through its link: {}",
        show(&exec)
    );
    assert!(stdout(&exec).contains("fcap errno 1"), "a file capability was not refused: {}", show(&exec));
    assert_eq!(std::fs::read_to_string(ws.join("new")).unwrap(), "new\n");
    // No setuid or setgid bit reaches the host's tree through virtiofsd.
    assert!(!stdout(&exec).contains("SUID-SET") && !stdout(&exec).contains("SGID-SET"), "{}", show(&exec));
    let tool_mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(ws.join("tool")).unwrap().permissions());
    assert_eq!(tool_mode & 0o6000, 0, "a set-id bit reached the host: {tool_mode:o}");
    assert!(!ws.join("gone").exists(), "a file removed in the guest is still on the host");
    assert_eq!(std::fs::read_to_string(ws.join("old")).unwrap(), "one\ntwo\n");
    assert_eq!(owner_of(&ws.join("old")), (1000, 1000), "an edited file keeps its owner");
    assert_eq!(owner_of(&ws.join("d/f")), (1234, 2345), "the guest's ids are the host's");
    assert_eq!(std::fs::read_link(ws.join("escape")).unwrap(), Path::new("/"));
    assert_eq!(std::fs::read_link(ws.join("up")).unwrap(), Path::new("../outside"));
    assert_eq!(std::fs::read_to_string(outside.join("secret")).unwrap(), "host only\n");
    let mut value = [0u8; 64];
    assert_eq!(
        rustix::fs::lgetxattr(ws.join("new"), "security.capability", &mut value).err(),
        Some(rustix::io::Errno::NODATA),
        "a file capability reached the host"
    );
    // The guest's root writes as a process-tier rw sandbox's root does.
    let process_ws = env.dir.path().join("process-ws");
    std::fs::create_dir(&process_ws).unwrap();
    let process_policy = env.dir.path().join("rw-process.toml");
    std::fs::write(&process_policy, format!("extends = \"ci\"\n{rw}")).unwrap();
    let process = env
        .airlock([
            "run",
            "--policy",
            process_policy.to_str().unwrap(),
            "--workspace",
            process_ws.to_str().unwrap(),
        ])
        .args(["--", "sh", "-c", "echo p > p"])
        .output()
        .unwrap();
    assert!(process.status.success(), "{}", show(&process));
    assert_eq!(
        owner_of(&ws.join("new")),
        owner_of(&process_ws.join("p")),
        "owners differ from the process tier's"
    );
    assert_eq!(owner_of(&ws.join("new")), (0, 0));

    // Stopped and removed: virtiofsd and QEMU go, the workspace stays.
    let removed = env.airlock(["rm", "rw"]).output().unwrap();
    assert!(removed.status.success(), "{}", show(&removed));
    assert!(!proc.exists(), "virtiofsd outlived its sandbox");
    assert!(qemus_of(supervisor).is_empty(), "QEMU outlived its sandbox");
    assert_eq!(std::fs::read_to_string(ws.join("new")).unwrap(), "new\n");
}

/// A rootless microVM's cache: its own, owned by the rootless user.
fn rootless_cache(r: &super::rootless::Rootless) -> PathBuf {
    let cache = r.env.dir.path().join("vm-cache");
    std::fs::create_dir(&cache).unwrap();
    std::os::unix::fs::chown(&cache, Some(r.uid), None).unwrap();
    cache
}

/// A rootless policy on the microVM tier (no cgroups there), allowing
/// `extra` too, with `tail` appended.
fn rootless_policy(r: &super::rootless::Rootless, name: &str, extra: &str, tail: &str) -> PathBuf {
    let path = r.env.dir.path().join(name);
    std::fs::write(
        &path,
        format!(
            "extends = \"ci\"\n[isolation]\ntier = \"microvm\"\nallow_weaker = [\"kvm\", \"cgroups\"{extra}]\n\
             [limits]\ntimeout = \"10m\"\ncpus = 1\nmemory = \"512M\"\n{tail}"
        ),
    )
    .unwrap();
    path
}

/// Without root an overlay workspace's layer is a plain directory of the
/// sandbox's, as the process tier's is, with no size cap: refused unless
/// the policy allows that, as for the process tier. Allowed, virtiofsd,
/// running as the caller, serves the directory holding `upper` and `work`
/// and nothing else of the sandbox's, and the diff and apply are the
/// process tier's.
#[test]
fn rootless_an_overlay_workspace_in_a_microvm_is_reviewed_and_applied() {
    if !ready() {
        return;
    }
    let Some(r) = super::rootless::setup() else { return };
    let cache = rootless_cache(&r);
    let keep = "[workspace]\nmode = \"overlay\"\nwriteback = \"review\"\n\
                [cleanup]\non_success = \"keep\"\non_failure = \"keep\"\n";
    let strict = rootless_policy(&r, "strict.toml", "", keep);
    let refused = r
        .airlock(&["run", "--policy", strict.to_str().unwrap(), "--", "true"])
        .env("AIRLOCK_VM_CACHE", &cache)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(125), "{}", show(&refused));
    assert!(stderr(&refused).contains("lacks disk-quota"), "{}", show(&refused));
    assert!(!cache.join("guest").exists(), "the guest was built for a refused run");
    // The process tier refuses the same policy (on its own tier) alike.
    let process = r.env.dir.path().join("process.toml");
    std::fs::write(
        &process,
        format!("extends = \"ci\"\n[isolation]\nallow_weaker = [\"cgroups\", \"landlock\"]\n{keep}"),
    )
    .unwrap();
    let refused = r.airlock(&["run", "--policy", process.to_str().unwrap(), "--", "true"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(125), "{}", show(&refused));
    assert!(stderr(&refused).contains("lacks disk-quota"), "{}", show(&refused));

    let policy = rootless_policy(&r, "overlay.toml", ", \"disk-quota\"", keep);
    let ws = r.env.dir.path().join("ov-ws");
    fill_workspace(&ws);
    super::rootless::chown_tree(&ws, r.uid, r.uid);
    let before = tree_of(&ws);
    let created = r
        .airlock(&[
            "create",
            "--policy",
            policy.to_str().unwrap(),
            "--name",
            "rov",
            "--workspace",
            ws.to_str().unwrap(),
        ])
        .env("AIRLOCK_VM_CACHE", &cache)
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", show(&created));
    let sandbox = r.env.sandbox_dir("rov");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sandbox.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["workspace_mode"], "overlay", "{meta}");
    let degraded: Vec<&str> =
        meta["degraded"].as_array().unwrap().iter().filter_map(|d| d.as_str()).collect();
    assert!(degraded.contains(&"disk-quota"), "{meta}");

    // virtiofsd: the caller, serving `layer/`, which holds upper and work alone.
    let layer = sandbox.join("layer");
    let (virtiofsd, status) = virtiofsd_serving(&layer);
    for id in status_field(&status, "Uid:").split_whitespace() {
        assert_eq!(id, r.uid.to_string(), "virtiofsd runs as the caller: {status}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{status}");
    let mut held: Vec<String> = std::fs::read_dir(format!("/proc/{virtiofsd}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    held.sort();
    assert_eq!(held, ["upper", "work"], "virtiofsd's root is the layer and nothing else");

    let script = "echo x > new && rm old && echo two >> edited && rm -r gone && mkdir -p made/deep \
                  && echo y > made/deep/f && echo c > kept/c";
    let exec = r
        .airlock(&["exec", "rov", "--", "sh", "-c", script])
        .env("AIRLOCK_VM_CACHE", &cache)
        .output()
        .unwrap();
    assert!(exec.status.success(), "{}", show(&exec));
    assert_eq!(tree_of(&ws), before, "the host's workspace changed before apply");
    let diff = |r: &super::rootless::Rootless| {
        let out = r.airlock(&["diff", "rov", "--json"]).output().unwrap();
        assert!(out.status.success(), "{}", show(&out));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut changes: Vec<(String, String)> = json["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["path"].as_str().unwrap().to_owned(), c["kind"].as_str().unwrap().to_owned()))
            .collect();
        changes.sort();
        changes
    };
    let running = diff(&r);
    for expected in [("new", "added"), ("old", "deleted"), ("edited", "modified"), ("made/deep/f", "added")] {
        assert!(
            running.iter().any(|(p, k)| p == expected.0 && k == expected.1),
            "{expected:?} not in {running:?}"
        );
    }
    let stopped = r.airlock(&["stop", "rov"]).env("AIRLOCK_VM_CACHE", &cache).output().unwrap();
    assert!(stopped.status.success(), "{}", show(&stopped));
    assert!(!std::path::Path::new(&format!("/proc/{virtiofsd}")).exists(), "virtiofsd outlived its guest");
    assert_eq!(diff(&r), running, "the diff survives the guest");
    assert!(sandbox.join("upper").is_dir() && !layer.exists(), "the layer is where a rootless one lives");
    let applied = r.airlock(&["apply", "rov", "--yes"]).output().unwrap();
    assert!(applied.status.success(), "{}", show(&applied));
    assert!(ws.join("made/deep/f").exists() && !ws.join("old").exists() && !ws.join("gone").exists());
    assert_eq!(std::fs::read_to_string(ws.join("edited")).unwrap(), "one\ntwo\n");
    assert_eq!(owner_of(&ws.join("new")), (r.uid, r.uid));
}

/// Without root, mode rw: the guest writes the workspace as the caller,
/// as a rootless process-tier sandbox does (one id: the guest's root is
/// the caller, and no other id can own a file).
#[test]
fn rootless_a_rw_workspace_in_a_microvm_is_written_as_the_caller() {
    if !ready() {
        return;
    }
    let Some(r) = super::rootless::setup() else { return };
    let cache = rootless_cache(&r);
    let policy = rootless_policy(&r, "rw.toml", "", "[workspace]\nmode = \"rw\"\nwriteback = \"review\"\n");
    let ws = r.env.dir.path().join("rw-ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("gone"), "gone\n").unwrap();
    std::fs::write(ws.join("old"), "one\n").unwrap();
    super::rootless::chown_tree(&ws, r.uid, r.uid);
    let script = "echo new > new && rm gone && echo two >> old && mkdir d && echo f > d/f \
                  && { chown 1234 d/f 2>/dev/null && echo chowned || echo 'chown refused'; } \
                  && cp /bin/true tool && { chmod 4755 tool && echo SUID-SET; chmod 2755 tool && echo SGID-SET; true; }";
    let run = r
        .airlock(&["run", "--policy", policy.to_str().unwrap(), "--workspace", ws.to_str().unwrap()])
        .args(["--", "sh", "-c", script])
        .env("AIRLOCK_VM_CACHE", &cache)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", show(&run));
    assert!(stdout(&run).contains("chown refused"), "{}", show(&run));
    assert!(stderr(&run).contains("workspace mode rw"), "the warning is said: {}", show(&run));
    assert_eq!(std::fs::read_to_string(ws.join("new")).unwrap(), "new\n");
    // No setuid or setgid bit reaches the host's tree through virtiofsd.
    assert!(!stdout(&run).contains("SUID-SET") && !stdout(&run).contains("SGID-SET"), "{}", show(&run));
    let tool_mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(ws.join("tool")).unwrap().permissions());
    assert_eq!(tool_mode & 0o6000, 0, "a set-id bit reached the host: {tool_mode:o}");
    assert!(!ws.join("gone").exists(), "a file removed in the guest is still on the host");
    assert_eq!(std::fs::read_to_string(ws.join("old")).unwrap(), "one\ntwo\n");
    for made in ["new", "d", "d/f", "old"] {
        assert_eq!(owner_of(&ws.join(made)), (r.uid, r.uid), "{made} is not the caller's");
    }
    // As a rootless process-tier sandbox writes.
    let process_ws = r.env.dir.path().join("process-ws");
    std::fs::create_dir(&process_ws).unwrap();
    super::rootless::chown_tree(&process_ws, r.uid, r.uid);
    let process = r
        .airlock(&["run", "--policy", "dev", "--mode", "rw", "--workspace", process_ws.to_str().unwrap()])
        .args(["--", "sh", "-c", "echo p > p"])
        .output()
        .unwrap();
    assert!(process.status.success(), "{}", show(&process));
    assert_eq!(owner_of(&process_ws.join("p")), owner_of(&ws.join("new")));
}

/// The guest sees the directory that holds its upper layer (virtio-fs
/// serves it) and its root can mount that share again and put a link to a
/// host directory where `upper` was. airlock, as root, then refuses the
/// layer when it persists and diffs it, never copying or reading the host
/// directory the link names.
#[test]
fn a_guest_that_puts_a_link_in_place_of_its_upper_layer_gets_it_refused_not_followed() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = env.dir.path().join("swap.toml");
    std::fs::write(
        &policy,
        "extends = \"ci\"\n[isolation]\ntier = \"microvm\"\nallow_weaker = [\"kvm\"]\n\
         [limits]\ntimeout = \"10m\"\ncpus = 1\nmemory = \"512M\"\n\
         [workspace]\nmode = \"overlay\"\nwriteback = \"review\"\n\
         [cleanup]\non_success = \"keep\"\non_failure = \"keep\"\n",
    )
    .unwrap();
    let host = env.dir.path().join("host-only");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("secret"), "host only\n").unwrap();
    std::fs::set_permissions(&host, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let script = format!(
        r#"import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("/tmp/layer", exist_ok=True)
if libc.mount(b"layer", b"/tmp/layer", b"virtiofs", 0, None) != 0:
    raise SystemExit("mount: " + os.strerror(ctypes.get_errno()))
open("made", "w").write("x")
os.rename("/tmp/layer/upper", "/tmp/layer/real")
os.symlink("{host}", "/tmp/layer/upper")
print("swapped")"#,
        host = host.display()
    );
    let out = airlock_vm(
        &env,
        &cache,
        &["run", "--policy", policy.to_str().unwrap(), "--name", "swap", "--", "python3", "-c", &script],
    );
    assert!(stdout(&out).contains("swapped"), "the guest did not get to swap: {}", show(&out));
    assert_eq!(out.status.code(), Some(125), "{}", show(&out));
    assert!(stderr(&out).contains("layer/upper"), "the refusal names the layer: {}", show(&out));
    let diff = env.airlock(["diff", "swap"]).output().unwrap();
    assert!(!diff.status.success(), "{}", show(&diff));
    assert!(!stdout(&diff).contains("host only"), "{}", show(&diff));
    // Nothing of the host directory was copied into the state directory.
    let sandbox = env.sandbox_dir("swap");
    let mut stack = vec![sandbox.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let kind = entry.file_type().unwrap();
            assert!(entry.file_name() != "secret", "copied into the state: {}", entry.path().display());
            if kind.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    assert_eq!(std::fs::read_to_string(host.join("secret")).unwrap(), "host only\n");
    let removed = env.airlock(["rm", "swap"]).output().unwrap();
    assert!(removed.status.success(), "{}", show(&removed));
}

#[test]
fn every_exec_in_the_guest_is_recorded_as_the_guests_report() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = emulation_policy(&env);
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str("[audit]\nexec_trace = true\n");
    std::fs::write(&policy, text).unwrap();
    // A nested shell, and a background job (a subshell that execs) the
    // command waits for.
    let script = "sh -c 'echo nested-$((6*7))'; (/bin/echo background-job) & wait; exit 3";
    let out = env
        .airlock(["run", "--name", "vmtrace", "--policy", policy.to_str().unwrap(), "--", "sh", "-c", script])
        .env("AIRLOCK_VM_CACHE", &cache)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(stdout(&out).contains("nested-42") && stdout(&out).contains("background-job"), "{}", show(&out));

    let audit = env.airlock(["audit", "vmtrace", "--json"]).output().unwrap();
    assert!(audit.status.success(), "{}", show(&audit));
    let records: Vec<serde_json::Value> = stdout(&audit)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let execs: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["event"] == "process_exec" && r.get("no_such_file").is_none()).collect();
    let argv = |r: &serde_json::Value| -> Vec<String> {
        r["argv"].as_array().unwrap().iter().map(|a| a.as_str().unwrap_or("<bytes>").to_owned()).collect()
    };
    let the_one = |arg: &str| -> &serde_json::Value {
        let found: Vec<&&serde_json::Value> =
            execs.iter().filter(|r| argv(r).iter().any(|a| a == arg)).collect();
        assert_eq!(found.len(), 1, "{arg}: {execs:#?}");
        found[0]
    };
    let command = the_one(script);
    let nested = the_one("echo nested-$((6*7))");
    let background = the_one("background-job");
    for exec in [command, nested, background] {
        assert_eq!(exec["reported_by"], "guest", "{exec}");
        assert!(exec["pid"].as_i64().unwrap() > 1, "{exec}");
        assert!(exec["ppid"].as_i64().unwrap() >= 1, "{exec}");
        assert!(exec["cwd"].is_string(), "{exec}");
    }
    // The guest's agent (its PID 1) started the command; the command's
    // shell started the nested one.
    assert_eq!(command["ppid"], 1, "{command}");
    assert_eq!(nested["ppid"], command["pid"], "{nested}");
    assert_eq!(background["path"], "/bin/echo", "{background}");
    assert_ne!(background["pid"], command["pid"], "{background}");
    // What the host saw itself is not marked.
    let host_seen: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["event"] == "command_started").collect();
    assert!(
        !host_seen.is_empty() && host_seen.iter().all(|r| r.get("reported_by").is_none()),
        "{records:#?}"
    );

    let verify = env.airlock(["audit", "verify", "vmtrace"]).output().unwrap();
    assert!(verify.status.success(), "{}", show(&verify));
}

#[test]
fn a_long_lived_guests_execs_are_recorded_by_its_supervisor_as_the_guests_report() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = emulation_policy(&env);
    let created =
        airlock_vm(&env, &cache, &["create", "--policy", policy.to_str().unwrap(), "--name", "lvt"]);
    assert!(created.status.success(), "{}", show(&created));
    let out =
        airlock_vm(&env, &cache, &["exec", "lvt", "--", "sh", "-c", "sh -c 'echo long-lived-$((6*7))'"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(stdout(&out).contains("long-lived-42"), "{}", show(&out));
    let stopped = airlock_vm(&env, &cache, &["stop", "lvt"]);
    assert!(stopped.status.success(), "{}", show(&stopped));

    let audit = airlock_vm(&env, &cache, &["audit", "lvt", "--json"]);
    assert!(audit.status.success(), "{}", show(&audit));
    let records: Vec<serde_json::Value> = stdout(&audit)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let nested: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| {
            r["event"] == "process_exec"
                && r["argv"].as_array().is_some_and(|a| a.iter().any(|x| x == "echo long-lived-$((6*7))"))
        })
        .collect();
    assert_eq!(nested.len(), 1, "{records:#?}");
    assert_eq!(nested[0]["reported_by"], "guest", "{}", nested[0]);
    assert!(nested[0]["ppid"].as_i64().unwrap() > 1, "{}", nested[0]);
    let verify = airlock_vm(&env, &cache, &["audit", "verify", "lvt"]);
    assert!(verify.status.success(), "{}", show(&verify));
    let _ = airlock_vm(&env, &cache, &["rm", "lvt"]);
}

#[test]
fn a_guest_traces_no_exec_when_the_policy_turns_the_trace_off() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = emulation_policy(&env);
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str("[audit]\nexec_trace = false\n");
    std::fs::write(&policy, text).unwrap();
    let out = env
        .airlock([
            "run",
            "--name",
            "untraced",
            "--policy",
            policy.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "sh -c true; exit 3",
        ])
        .env("AIRLOCK_VM_CACHE", &cache)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let audit = env.airlock(["audit", "untraced", "--json"]).output().unwrap();
    assert!(audit.status.success(), "{}", show(&audit));
    let text = stdout(&audit);
    assert!(text.contains("\"command_started\""), "{text}");
    assert!(!text.contains("process_exec") && !text.contains("reported_by"), "{text}");
}

/// Every record of sandbox `name`'s audit log, as `airlock audit --json`
/// prints them.
fn audit_records(env: &Env, cache: &Path, name: &str) -> Vec<serde_json::Value> {
    let audit = airlock_vm(env, cache, &["audit", name, "--json"]);
    assert!(audit.status.success(), "{}", show(&audit));
    stdout(&audit).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// The execs that ran (not a PATH search's misses).
fn ran(records: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    records.iter().filter(|r| r["event"] == "process_exec" && r.get("no_such_file").is_none()).collect()
}

/// The one `process_exit` of the process that made `exec`.
fn end_of<'a>(records: &'a [serde_json::Value], exec: &serde_json::Value) -> &'a serde_json::Value {
    let ends: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["event"] == "process_exit" && r["pid"] == exec["pid"]).collect();
    assert_eq!(ends.len(), 1, "{exec}: {ends:#?}");
    assert!(ends[0]["seq"].as_u64() > exec["seq"].as_u64(), "{exec} {}", ends[0]);
    assert_eq!(ends[0]["reported_by"], "guest", "{}", ends[0]);
    ends[0]
}

#[test]
fn the_guest_reports_how_each_traced_process_ended_background_ones_too() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = emulation_policy(&env);
    // A fork that execs, a nested shell with its own code, a shell that a
    // signal ends, and a background job the command leaves running.
    let script = "(/bin/echo forked); /bin/sh -c 'exit 4'; /bin/sh -c 'kill -TERM $$'; \
                  /bin/sleep 600 >/dev/null 2>&1 & exit 3";
    let out = env
        .airlock([
            "run",
            "--name",
            "vmends",
            "--policy",
            policy.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            script,
        ])
        .env("AIRLOCK_VM_CACHE", &cache)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(stdout(&out).contains("forked"), "{}", show(&out));

    let records = audit_records(&env, &cache, "vmends");
    let execs = ran(&records);
    let the_one = |arg: &str| -> &serde_json::Value {
        let found: Vec<&&serde_json::Value> = execs
            .iter()
            .filter(|r| r["argv"].as_array().unwrap().iter().any(|a| a.as_str() == Some(arg)))
            .collect();
        assert_eq!(found.len(), 1, "{arg}: {execs:#?}");
        found[0]
    };
    let command = the_one(script);
    let forked = the_one("forked");
    let nested = the_one("exit 4");
    let killed = the_one("kill -TERM $$");
    let background = the_one("600");
    assert_eq!(end_of(&records, command)["code"], 3);
    assert_eq!(end_of(&records, forked)["code"], 0);
    assert_eq!(end_of(&records, nested)["code"], 4);
    let term = end_of(&records, killed);
    assert_eq!((term["code"].as_i64(), term["signal"].as_i64()), (None, Some(15)), "SIGTERM: {term}");
    // The background job outlived the command: it ended with the guest's
    // processes, after the command, killed as a process-tier sandbox's is.
    let sleep = end_of(&records, background);
    assert_eq!((sleep["code"].as_i64(), sleep["signal"].as_i64()), (None, Some(9)), "SIGKILL: {sleep}");
    assert!(sleep["seq"].as_u64() > end_of(&records, command)["seq"].as_u64(), "{sleep}");
    // Every process whose exec was recorded has one end.
    for exec in &execs {
        let end = end_of(&records, exec);
        assert!(end["code"].is_i64() || end["signal"].is_i64(), "{end}");
        assert!(end["duration_ms"].is_u64(), "{end}");
    }
    let o = airlock_vm(&env, &cache, &["audit", "vmends"]);
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.contains("process_exit ") && l.contains("code 4") && l.contains("guest")),
        "{}",
        show(&o)
    );
    let verify = airlock_vm(&env, &cache, &["audit", "verify", "vmends"]);
    assert!(verify.status.success(), "{}", show(&verify));
}

#[test]
fn an_exec_flood_in_a_guest_is_summarized_while_its_supervisor_keeps_answering() {
    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = emulation_policy(&env);
    let created =
        airlock_vm(&env, &cache, &["create", "--policy", policy.to_str().unwrap(), "--name", "vmflood"]);
    assert!(created.status.success(), "{}", show(&created));
    // Under emulation a new process costs tens of milliseconds, far below
    // the 200 execs a second the trace itemizes: the flood is exec calls
    // the kernel refuses (a program that is not there: each is received,
    // read and answered as any other, without building a process), then
    // processes that run, whose ends are recorded.
    const CALLS: u64 = 3_000;
    const RUNS: u64 = 100;
    let script = format!(
        "/usr/bin/perl -e 'exec(\"/nonexistent/flood\") for 1..{CALLS}'; \
         i=0; while [ $i -lt {RUNS} ]; do /bin/true; i=$((i+1)); done; echo flood-done"
    );
    let flood = env
        .airlock(["exec", "vmflood", "--", "/bin/sh", "-c", &script])
        .env("AIRLOCK_VM_CACHE", &cache)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(3) {
        for args in [&["inspect", "vmflood", "--json"][..], &["ls"][..]] {
            let asked = Instant::now();
            let o = airlock_vm(&env, &cache, args);
            assert!(o.status.success(), "{}", show(&o));
            assert!(asked.elapsed() < Duration::from_secs(5), "{args:?} took {:?}", asked.elapsed());
        }
        answered += 1;
    }
    let o = flood.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o), "flood-done\n");
    assert!(answered > 0);
    let stopped = airlock_vm(&env, &cache, &["stop", "vmflood"]);
    assert!(stopped.status.success(), "{}", show(&stopped));

    let records = audit_records(&env, &cache, "vmflood");
    let summaries: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["event"] == "process_exec_summary").collect();
    // A second with the itemized rate's worth of calls must have a summary
    // of what went past it. Under emulation on a loaded host the guest may
    // never reach that rate (each call crosses the emulated kernel): then
    // every call is itemized, which the counts below check.
    let mut per_second: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for r in records.iter().filter(|r| r["event"] == "process_exec") {
        let second = r["at"].as_str().unwrap_or_default();
        *per_second.entry(second.get(..19).unwrap_or(second)).or_default() += 1;
    }
    let busiest = per_second.values().copied().max().unwrap_or(0);
    let rate = airlock_jail::exec_rate::ITEMIZED_PER_SECOND as u64;
    if busiest >= rate {
        assert!(!summaries.is_empty(), "{busiest} calls itemized in one second, and no summary");
    } else {
        eprintln!(
            "note: the guest made at most {busiest} exec calls a second here (the rate is {rate}): none to summarize"
        );
    }
    let counted_of = |path: &str| -> u64 {
        summaries
            .iter()
            .flat_map(|s| s["programs"].as_array().unwrap().iter())
            .filter(|p| p["path"] == path)
            .map(|p| p["count"].as_u64().unwrap())
            .sum()
    };
    let lost: u64 = summaries.iter().map(|s| s["lost"].as_u64().unwrap()).sum();
    for s in &summaries {
        assert_eq!(s["reported_by"], "guest", "{s}");
    }
    let execs_of = |path: &str| -> Vec<&serde_json::Value> {
        records.iter().filter(|r| r["event"] == "process_exec" && r["path"] == path).collect()
    };
    // Each call itemized or counted (or, past the guest's queue, lost).
    let refused = execs_of("/nonexistent/flood");
    assert!(refused.iter().all(|r| r["no_such_file"] == true), "{:?}", refused.first());
    let calls = refused.len() as u64 + counted_of("/nonexistent/flood");
    assert!(calls <= CALLS && calls + lost >= CALLS, "{calls} calls, {lost} lost");
    let runs = execs_of("/bin/true");
    let run_calls = runs.len() as u64 + counted_of("/bin/true");
    assert!(run_calls <= RUNS && run_calls + lost >= RUNS, "{run_calls} runs, {lost} lost");
    // The itemized processes' ends, as far as the queue took them.
    let ended = runs
        .iter()
        .filter(|t| {
            records.iter().any(|r| r["event"] == "process_exit" && r["pid"] == t["pid"] && r["code"] == 0)
        })
        .count() as u64;
    assert!(ended + lost >= runs.len() as u64, "{ended} of {} ends, {lost} lost", runs.len());
    if !summaries.is_empty() {
        let o = airlock_vm(&env, &cache, &["audit", "vmflood"]);
        assert!(
            stdout(&o)
                .lines()
                .any(|l| l.contains("process_exec_summary") && l.contains("/nonexistent/flood ×")),
            "{}",
            show(&o)
        );
    }
    let _ = airlock_vm(&env, &cache, &["rm", "vmflood"]);
}

#[test]
fn a_daemons_microvm_sandbox_records_the_guests_execs_and_ends() {
    if !ready() {
        return;
    }
    let d = super::daemon_harness::TestDaemon::start_with("microvm-trace", |cmd| {
        cmd.env("AIRLOCK_VM_CACHE", shared_cache());
    });
    let policy = emulation_policy(&d.env);
    let (status, created) = d.json(
        "POST",
        "/v1/sandboxes",
        Some(serde_json::json!({ "name": "dtrace", "policy": policy.to_str().unwrap() })),
    );
    assert_eq!(status, 201, "{created}\n{}", d.log());
    assert_eq!(created["tier"], "microvm", "{created}");
    let (status, body) = d.request(
        "POST",
        "/v1/sandboxes/dtrace/exec",
        Some(r#"{"argv":["/bin/sh","-c","/bin/sh -c 'exit 4'"]}"#),
    );
    assert_eq!(status, 200, "{body}");
    let audit = || -> Vec<serde_json::Value> {
        let (status, body) = d.request("GET", "/v1/sandboxes/dtrace/audit", None);
        assert_eq!(status, 200, "{body}");
        body.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let nested = |records: &[serde_json::Value]| -> Option<serde_json::Value> {
        ran(records)
            .into_iter()
            .find(|r| r["argv"].as_array().is_some_and(|a| a.iter().any(|x| x == "exit 4")))
            .cloned()
    };
    // The ends follow the exec's answer over the guest's channel.
    assert!(
        wait_until(20, || {
            let records = audit();
            nested(&records)
                .is_some_and(|n| records.iter().any(|r| r["event"] == "process_exit" && r["pid"] == n["pid"]))
        }),
        "{:#?}",
        audit()
    );
    let records = audit();
    let exec = nested(&records).unwrap();
    assert_eq!(exec["reported_by"], "guest", "{exec}");
    assert_eq!(end_of(&records, &exec)["code"], 4);
    let (status, removed) = d.json("DELETE", "/v1/sandboxes/dtrace", None);
    assert_eq!(status, 200, "{removed}");
}

/// Published ports reach into a guest as into a process-tier sandbox: a
/// server in the guest answers on the host's port, each connection is in
/// the audit log, a port nothing listens on inside is closed without a
/// byte, and removing the sandbox frees the host's ports.
#[test]
fn a_published_port_reaches_a_server_in_the_guest_and_is_audited() {
    use super::ports::{SERVE_3000, audit_events, free_port, get, port_free};
    use std::io::Read;

    if !ready() {
        return;
    }
    let env = Env::new();
    let cache = shared_cache();
    let policy = emulation_policy(&env);
    let (port, quiet) = (free_port(), free_port());
    let (web, nobody) = (format!("{port}:3000"), format!("{quiet}:3999"));
    let created = airlock_vm(
        &env,
        &cache,
        &["create", "--policy", policy.to_str().unwrap(), "--name", "vweb", "-p", &web, "-p", &nobody],
    );
    assert!(created.status.success(), "{}", show(&created));
    let served = airlock_vm(&env, &cache, &["exec", "vweb", "--", "sh", "-c", SERVE_3000]);
    assert!(served.status.success(), "{}", show(&served));

    // Python starts slowly under emulation.
    let mut answer = None;
    wait_until(120, || {
        answer = get(port);
        answer.is_some()
    });
    let answer = answer.unwrap_or_else(|| panic!("nothing answered on host port {port}"));
    assert!(answer.starts_with("HTTP/1.0 200") && answer.contains("Directory listing"), "{answer}");

    let mut conn = std::net::TcpStream::connect(("127.0.0.1", quiet)).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    assert_eq!(conn.read_to_end(&mut got).map(|_| got.len()).unwrap_or(0), 0);
    // The relay ends once the client is done too.
    drop(conn);

    // The last connection to each port inside, and how it ended.
    fn closed_for(events: &[serde_json::Value], sandbox_port: u16) -> Option<&serde_json::Value> {
        let accepted =
            events.iter().rfind(|e| e["event"] == "port_accepted" && e["sandbox_port"] == sandbox_port)?;
        events.iter().find(|e| e["event"] == "port_closed" && e["id"] == accepted["id"])
    }
    let mut events = Vec::new();
    wait_until(10, || {
        events = audit_events(airlock_vm(&env, &cache, &["audit", "vweb", "--json"]));
        closed_for(&events, 3000).is_some() && closed_for(&events, 3999).is_some()
    });
    let closed_for = |port| closed_for(&events, port).unwrap_or_else(|| panic!("{events:?}"));
    let served = closed_for(3000);
    assert!(
        served["bytes_in"].as_u64().unwrap() > 0 && served["bytes_out"].as_u64().unwrap() > 0,
        "{served}"
    );
    assert!(served["error"].is_null(), "{served}");
    let refused = closed_for(3999);
    assert_eq!(refused["bytes_out"], 0, "{refused}");

    let stopped = airlock_vm(&env, &cache, &["stop", "vweb"]);
    assert!(stopped.status.success(), "{}", show(&stopped));
    let removed = airlock_vm(&env, &cache, &["rm", "vweb"]);
    assert!(removed.status.success(), "{}", show(&removed));
    assert!(wait_until(5, || port_free(port) && port_free(quiet)), "host ports still taken after rm");
}
