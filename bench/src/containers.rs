//! The containers benchmark: what a container engine inside a microVM
//! sandbox (`create --containers`) costs to get and to use.
//!
//! - engine ready: from the start of `airlock --direct create --tier
//!   microvm --containers` to the engine answering `GET /_ping` with 200
//!   through the sandbox's socket on the host, with create's own time (to
//!   its exit) beside it;
//! - `docker run --rm IMAGE true` through that socket, IMAGE a busybox
//!   root imported once per guest (`docker import`, untimed).
//!
//! The accelerator is chosen as the microvm section chooses it. The target
//! (engine ready within [`MAX_ENGINE_READY`] of create) is for KVM; under
//! software emulation it is not judged.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::microvm::{Accel, choose_accel};
use crate::{BenchError, Outcome, daemon, measure, report};

/// Engine ready (answering `/_ping` through the host's socket) after
/// create began, with KVM, at most.
pub const MAX_ENGINE_READY: Duration = Duration::from_millis(1500);
/// How long an engine may take to answer, under emulation included.
const READY_DEADLINE: Duration = Duration::from_secs(300);
/// `docker run --rm IMAGE true` per guest.
const RUNS_PER_GUEST: usize = 3;
/// The image each guest's engine imports.
const IMAGE: &str = "airlock-bench/busybox:1";

/// What the section is asked to do.
pub struct Plan {
    /// Timed guests (each: create, engine ready, runs, rm).
    pub iterations: usize,
    /// Untimed guests before them.
    pub warmup: usize,
    /// The guest cache (`AIRLOCK_VM_CACHE`).
    pub cache: PathBuf,
}

/// The section's outcome.
pub struct ContainersResults {
    /// Why nothing was measured, if so.
    pub skipped: Option<String>,
    pub accel: Option<Accel>,
    /// Doctor's words on KVM here.
    pub kvm: String,
    /// create began → the engine answered `/_ping` through the socket.
    pub ready: Outcome,
    /// create, to its exit.
    pub create: Outcome,
    /// `docker run --rm IMAGE true` through the socket.
    pub docker_run: Outcome,
}

impl ContainersResults {
    fn skipped(why: String) -> ContainersResults {
        let s = || Outcome::Skipped("the section did not run".into());
        ContainersResults {
            skipped: Some(why),
            accel: None,
            kvm: String::new(),
            ready: s(),
            create: s(),
            docker_run: s(),
        }
    }

    pub fn failed(&self) -> bool {
        [&self.ready, &self.docker_run].iter().any(|o| matches!(o, Outcome::Failed(_)))
    }
}

/// The bench's policy: `dev` (which lets `--containers` ask for an
/// engine) on the microVM tier, one vCPU, room for dockerd, allowed to run
/// under emulation when KVM does not work here.
pub fn policy_text(accel: Accel) -> String {
    let mut text = String::from(
        "# Written by airlock-bench for its containers section.\nextends = \"dev\"\n[isolation]\ntier = \"microvm\"\n",
    );
    if accel == Accel::Tcg {
        text.push_str("# KVM does not work on this host: run the guests under QEMU's software emulation.\n");
        text.push_str("allow_weaker = [\"kvm\", \"cgroups\", \"disk-quota\", \"landlock\"]\n");
    }
    text.push_str("[limits]\ntimeout = \"1h\"\ncpus = 1\nmemory = \"1G\"\ndisk = \"2G\"\n");
    text
}

fn vm_cmd(airlock: &Path, state: &Path, cache: &Path, cwd: &Path) -> Command {
    let mut c = Command::new(airlock);
    c.env("AIRLOCK_STATE_DIR", state)
        .env("AIRLOCK_VM_CACHE", cache)
        .env_remove("AIRLOCK_SOCKET")
        .env_remove("AIRLOCK_LOG")
        .current_dir(cwd)
        .arg("--direct");
    c
}

fn docker(socket: &Path) -> Command {
    let mut c = Command::new("docker");
    c.env("DOCKER_HOST", format!("unix://{}", socket.display()));
    c
}

/// Whether the engine behind `socket` answers `/_ping` with 200 now.
fn pings(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else { return false };
    if stream.set_read_timeout(Some(Duration::from_secs(5))).is_err()
        || stream.write_all(b"GET /_ping HTTP/1.0\r\nHost: engine\r\n\r\n").is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.take(4096).read_to_end(&mut answer);
    answer.starts_with(b"HTTP/1.0 200") || answer.starts_with(b"HTTP/1.1 200")
}

/// A root of the host's static busybox with `true` and `sh`, as a tar
/// `docker import` takes.
fn busybox_root(path: &Path) -> Result<(), BenchError> {
    let busybox = std::fs::read("/bin/busybox")
        .map_err(|e| BenchError::new(format!("/bin/busybox (Debian: busybox-static): {e}")))?;
    let file = std::fs::File::create(path)
        .map_err(|e| BenchError::new(format!("cannot create {}: {e}", path.display())))?;
    let mut tar = tar::Builder::new(file);
    let failed = |e: std::io::Error| BenchError::new(format!("cannot write {}: {e}", path.display()));
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    tar.append_data(&mut dir, "bin", &[][..]).map_err(failed)?;
    let mut bin = tar::Header::new_gnu();
    bin.set_mode(0o755);
    bin.set_size(busybox.len() as u64);
    tar.append_data(&mut bin, "bin/busybox", &busybox[..]).map_err(failed)?;
    for applet in ["true", "sh"] {
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_mode(0o777);
        link.set_size(0);
        tar.append_link(&mut link, format!("bin/{applet}"), "busybox").map_err(failed)?;
    }
    tar.into_inner().and_then(|mut f| f.flush()).map_err(failed)
}

/// Runs the whole section, its scratch files in `dir`.
pub fn run(airlock: &Path, dir: &Path, plan: &Plan, notes: &mut Vec<String>) -> ContainersResults {
    match run_inner(airlock, dir, plan, notes) {
        Ok(r) => r,
        Err(e) => ContainersResults::skipped(e.to_string()),
    }
}

fn run_inner(
    airlock: &Path,
    dir: &Path,
    plan: &Plan,
    notes: &mut Vec<String>,
) -> Result<ContainersResults, BenchError> {
    crate::fixtures::make_dir_0755(dir)?;
    let state = dir.join("state");
    let cache = &plan.cache;
    let docker_cli = Command::new("docker").arg("--version").output().is_ok_and(|o| o.status.success());
    if !docker_cli || !Path::new("/usr/sbin/dockerd").exists() {
        return Err(BenchError::new(
            "needs Debian's docker.io on the host (the guest's engine, and the docker CLI that talks to it)",
        ));
    }
    let root = dir.join("busybox-root.tar");
    busybox_root(&root)?;

    let mut doctor = vm_cmd(airlock, &state, cache, dir);
    doctor.args(["doctor", "--json"]).stdin(Stdio::null());
    let out = doctor.output().map_err(|e| BenchError::new(format!("airlock doctor: cannot start: {e}")))?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| BenchError::new(format!("airlock doctor --json: not JSON ({e})")))?;
    let (accel, kvm) = choose_accel(&report).map_err(BenchError::new)?;
    eprintln!("airlock-bench: containers, accelerator {} (KVM here: {kvm})", accel.as_str());
    let mut setup = vm_cmd(airlock, &state, cache, dir);
    setup.args(["vm", "setup"]);
    measure::checked(setup, "airlock vm setup")?;
    let policy_path = dir.join("policy.toml");
    std::fs::write(&policy_path, policy_text(accel))
        .map_err(|e| BenchError::new(format!("cannot write {}: {e}", policy_path.display())))?;
    let policy = policy_path.to_string_lossy().into_owned();

    let (mut ready, mut create, mut runs) = (Vec::new(), Vec::new(), Vec::new());
    let mut failed = None;
    for round in 0..plan.warmup + plan.iterations {
        let timed = round >= plan.warmup;
        eprintln!("airlock-bench: containers, guest {}/{}", round + 1, plan.warmup + plan.iterations);
        let name = format!("bench-containers-{round}");
        let r = one_guest(airlock, &state, cache, dir, &policy, &name, &root);
        let mut rm = vm_cmd(airlock, &state, cache, dir);
        rm.args(["rm", &name]);
        if let Err(e) = measure::checked(rm, "airlock rm") {
            notes.push(format!("containers: could not remove {name}: {e}"));
        }
        match r {
            Ok(guest) if timed => {
                ready.push(guest.ready);
                create.push(guest.create);
                runs.extend(guest.runs);
            }
            Ok(_) => {}
            Err(e) => {
                failed = Some(format!("guest {}: {e}", round + 1));
                break;
            }
        }
    }
    let outcome = |walls: &[Duration]| match &failed {
        Some(why) => Outcome::Failed(why.clone()),
        None => daemon::summarize(walls),
    };
    Ok(ContainersResults {
        skipped: None,
        accel: Some(accel),
        kvm,
        ready: outcome(&ready),
        create: outcome(&create),
        docker_run: outcome(&runs),
    })
}

/// One guest's times.
struct Guest {
    ready: Duration,
    create: Duration,
    runs: Vec<Duration>,
}

fn one_guest(
    airlock: &Path,
    state: &Path,
    cache: &Path,
    dir: &Path,
    policy: &str,
    name: &str,
    root: &Path,
) -> Result<Guest, BenchError> {
    let mut c = vm_cmd(airlock, state, cache, dir);
    c.args([
        "create",
        "--policy",
        policy,
        "--tier",
        "microvm",
        "--containers",
        "--mode",
        "none",
        "--name",
        name,
    ]);
    let started = Instant::now();
    measure::checked(c, "airlock create --tier microvm --containers")?;
    let create = started.elapsed();
    let socket = state.join(name).join("containers.sock");
    while !pings(&socket) {
        if started.elapsed() > READY_DEADLINE {
            return Err(BenchError::new(format!(
                "the engine did not answer /_ping through {} within {}",
                socket.display(),
                report::secs(READY_DEADLINE)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = started.elapsed();
    let mut import = docker(&socket);
    import.arg("import").arg(root).arg(IMAGE);
    measure::checked(import, "docker import")?;
    let mut runs = Vec::with_capacity(RUNS_PER_GUEST);
    for _ in 0..RUNS_PER_GUEST {
        let mut run = docker(&socket);
        run.args(["run", "--rm", IMAGE, "true"]);
        runs.push(measure::timed(run, "docker run --rm IMAGE true")?.wall);
    }
    Ok(Guest { ready, create, runs })
}

/// Prints the section's table.
pub fn print(r: &ContainersResults, problems: &mut Vec<String>) {
    println!();
    let Some(accel) = r.accel else {
        println!("== containers");
        println!("  skipped: {}", r.skipped.as_deref().unwrap_or("not run"));
        return;
    };
    let how = match accel {
        Accel::Kvm => "accelerator: kvm (doctor: KVM works here)".to_string(),
        Accel::Tcg => format!("accelerator: tcg — SOFTWARE EMULATION, not KVM (doctor: {})", r.kvm),
    };
    println!("== containers: an engine inside a microVM sandbox; {how}");
    report::time_header("create --containers, ms (wall)", false);
    for (label, o) in [
        ("create began → engine answers /_ping via the socket", &r.ready),
        ("  create, to its exit", &r.create),
        ("docker run --rm IMAGE true through the socket", &r.docker_run),
    ] {
        report::time_row(label, o, String::new(), String::new(), problems);
    }
}

/// The section's target: judged only with KVM.
pub fn targets(r: &ContainersResults, target: &mut impl FnMut(Option<bool>, String)) {
    let Some(accel) = r.accel else {
        target(None, "containers target: the section did not run".into());
        return;
    };
    let Some(s) = r.ready.summary() else {
        target(None, "containers: engine ready not measured".into());
        return;
    };
    let text = format!(
        "engine ready after create --containers: median {} (≤ {} with KVM)",
        report::ms(s.median),
        report::ms(MAX_ENGINE_READY)
    );
    match accel {
        Accel::Kvm => target(Some(s.median <= MAX_ENGINE_READY), text),
        Accel::Tcg => target(
            None,
            format!(
                "{text} — measured under software emulation (tcg): the target is for KVM, not judged here"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulation_is_allowed_only_without_kvm() {
        assert!(policy_text(Accel::Tcg).contains("\"kvm\""));
        assert!(!policy_text(Accel::Kvm).contains("allow_weaker"));
        assert!(policy_text(Accel::Kvm).contains("extends = \"dev\""), "dev lets --containers ask");
    }
}
