//! A launch that fails half-way releases at once what it had set up: its
//! cgroup, its layer's tmpfs, its egress proxy, its agent and its id block.
//! So does `run` or a long-lived sandbox's supervisor failing after the
//! launch (relaying, recording, persisting the layer). Nothing is left for
//! `airlock gc`. Failures are injected after each phase or step with
//! `AIRLOCK_TEST_FAIL_AT` (read by debug builds only).

use std::path::Path;
use std::process::Command;

use crate::suite::support::*;

/// The phases of a launch, in order (`LAUNCH_PHASES` in the runtime's
/// lifecycle.rs).
const PHASES: &[&str] =
    &["state", "cgroup", "layer", "idmapped", "network", "spawned", "joined", "proxy-ready", "running"];

const REGISTRY: &str = "/run/airlock/id-blocks";
const BLOCK_SIZE: u32 = 65_536;

/// A test environment whose sandboxes take their id blocks from a range of
/// their own. A block given back after a failure can be taken at once by a
/// sandbox of another test running in parallel, whose processes would then
/// look like leftovers of this one.
struct PrivateBlocks {
    env: Env,
    range: &'static str,
}

impl PrivateBlocks {
    /// `range`: `FIRST-LAST` block indexes no other test allocates from
    /// (others take the lowest free blocks; `security::host_ids` uses
    /// 14990-14991).
    fn new(range: &'static str) -> PrivateBlocks {
        PrivateBlocks { env: Env::new(), range }
    }

    fn airlock<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.env.airlock(args);
        cmd.env("AIRLOCK_TEST_ID_BLOCKS", self.range);
        cmd
    }
}

impl std::ops::Deref for PrivateBlocks {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

/// Registry entries naming a directory below `state`.
fn registry_entries_below(state: &Path) -> Vec<String> {
    let needle = state.display().to_string();
    let Ok(entries) = std::fs::read_dir(REGISTRY) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let entry: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(e.path()).ok()?).ok()?;
            let dir = entry["sandbox"].as_str()?.to_string();
            dir.starts_with(&needle).then_some(dir)
        })
        .collect()
}

/// Host processes whose real uid lies in the block starting at `first`.
fn processes_in_block(first: u32) -> Vec<(i32, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok());
        if let Some(uid) = uid
            && (first..first + BLOCK_SIZE).contains(&uid)
        {
            found.push((pid, uid));
        }
    }
    found
}

#[test]
fn a_launch_failing_after_any_phase_leaves_nothing_behind() {
    if !require(is_root(), "root (cgroups, the layer's tmpfs and id blocks are made only as root)") {
        return;
    }
    let env = PrivateBlocks::new("14950-14959");
    for phase in PHASES {
        let name = format!("undo-{phase}");
        let o = env
            .airlock(["run", "--name", &name, "--memory", "64M", "--", "sh", "-c", "sleep 30"])
            .env("AIRLOCK_TEST_FAIL_AT", phase)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(125), "phase {phase}: {}", show(&o));
        assert!(
            stderr(&o).contains(&format!("failure injected for a test at launch phase {phase}")),
            "phase {phase}: {}",
            show(&o)
        );
        assert!(!stderr(&o).contains("undoing the launch also failed"), "phase {phase}: {}", show(&o));

        let dir = env.sandbox_dir(&name);
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
        assert_eq!(meta["state"], "failed", "phase {phase}: {meta}");
        // Checked at once, without waiting and without gc.
        assert_eq!(cgroup_dirs(&name), Vec::<std::path::PathBuf>::new(), "phase {phase}: cgroup left");
        assert_eq!(
            mounts_containing(&dir.display().to_string()),
            Vec::<String>::new(),
            "phase {phase}: mount left"
        );
        assert_eq!(registry_entries_below(&env.state), Vec::<String>::new(), "phase {phase}: id block kept");
        assert_eq!(pids_running(&format!("__egress {name}")), Vec::<i32>::new(), "phase {phase}: proxy left");
        // The exec trace's listener starts before the agent, as its own id.
        assert_eq!(
            pids_running(&format!("__exectrace {name} ")),
            Vec::<i32>::new(),
            "phase {phase}: exec trace listener left"
        );
        if let Some(first) = meta["host_uid"].as_u64() {
            let first = u32::try_from(first).unwrap();
            assert_eq!(processes_in_block(first), Vec::new(), "phase {phase}: processes of its ids left");
        }
        // The failed sandbox is listed and can be removed.
        let rm = env.airlock(["rm", &name]).output().unwrap();
        assert!(rm.status.success(), "phase {phase}: {}", show(&rm));
    }
    // With nothing injected, the same run works: the injection is the cause.
    let o = env
        .airlock(["run", "--name", "undo-none", "--memory", "64M", "--rm", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

/// The same through `airlock create`: the long-lived sandbox's supervisor
/// launches with the same code and undoes the same way.
#[test]
fn a_create_failing_after_any_phase_leaves_nothing_behind() {
    if !require(is_root(), "root (cgroups, the layer's tmpfs and id blocks are made only as root)") {
        return;
    }
    let env = PrivateBlocks::new("14960-14969");
    for phase in PHASES {
        let name = format!("undo-create-{phase}");
        let o = env
            .airlock(["create", "--name", &name, "--memory", "64M"])
            .env("AIRLOCK_TEST_FAIL_AT", phase)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(125), "phase {phase}: {}", show(&o));
        assert!(
            stderr(&o).contains(&format!("failure injected for a test at launch phase {phase}")),
            "phase {phase}: {}",
            show(&o)
        );
        let dir = env.sandbox_dir(&name);
        assert_eq!(cgroup_dirs(&name), Vec::<std::path::PathBuf>::new(), "phase {phase}: cgroup left");
        assert_eq!(
            mounts_containing(&dir.display().to_string()),
            Vec::<String>::new(),
            "phase {phase}: mount left"
        );
        assert_eq!(registry_entries_below(&env.state), Vec::<String>::new(), "phase {phase}: id block kept");
        assert_eq!(pids_running(&format!("__egress {name}")), Vec::<i32>::new(), "phase {phase}: proxy left");
        // The exec trace's listener starts before the agent, as its own id.
        assert_eq!(
            pids_running(&format!("__exectrace {name} ")),
            Vec::<i32>::new(),
            "phase {phase}: exec trace listener left"
        );
        if let Ok(meta) = std::fs::read(dir.join("meta.json")) {
            let meta: serde_json::Value = serde_json::from_slice(&meta).unwrap();
            if let Some(first) = meta["host_uid"].as_u64() {
                let first = u32::try_from(first).unwrap();
                assert_eq!(processes_in_block(first), Vec::new(), "phase {phase}: processes of its ids left");
            }
        }
    }
    let o = env.airlock(["create", "--name", "undo-create-none", "--memory", "64M"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let o = env.airlock(["rm", "undo-create-none"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
}

/// What must be gone at once after a failure of sandbox `name` whose state
/// directory is `dir`: its cgroup in every hierarchy, its mounts, its proxy
/// and every process running as its ids.
fn assert_nothing_running(name: &str, dir: &Path, meta: &serde_json::Value, at: &str) {
    assert_eq!(cgroup_dirs(name), Vec::<std::path::PathBuf>::new(), "{at}: cgroup left");
    assert_eq!(mounts_containing(&dir.display().to_string()), Vec::<String>::new(), "{at}: mount left");
    assert_eq!(pids_running(&format!("__egress {name}")), Vec::<i32>::new(), "{at}: proxy left");
    let first = meta["host_uid"].as_u64().map(|u| u32::try_from(u).unwrap());
    assert!(first.is_some(), "{at}: as root the sandbox has an id block: {meta}");
    assert_eq!(processes_in_block(first.unwrap()), Vec::new(), "{at}: processes of its ids left");
}

fn read_meta(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap()
}

/// The steps after a launch at which `run` or the shared finalize can fail
/// (`LATER_STEPS` in the runtime's lifecycle.rs), and whether the layer is
/// on disk by then (its files are owned by the block's ids, so the block
/// stays with the sandbox until `rm`).
const RUN_STEPS: &[(&str, bool)] = &[
    ("attached", false),
    ("relaying", false),
    ("reaped", false),
    ("exit-recorded", false),
    ("persisted", true),
    ("artifacts", true),
];

#[test]
fn a_run_failing_after_its_launch_leaves_nothing_behind() {
    if !require(is_root(), "root (cgroups, the layer's tmpfs and id blocks are made only as root)") {
        return;
    }
    let env = PrivateBlocks::new("14970-14979");
    for &(step, layer_on_disk) in RUN_STEPS {
        let name = format!("late-{step}");
        // Still running when the failure comes while relaying: the failure
        // must end it, not wait for it.
        let script = if matches!(step, "attached" | "relaying") {
            "echo made > made-inside; sleep 30"
        } else {
            "echo made > made-inside"
        };
        let started = std::time::Instant::now();
        let o = env
            .airlock(["run", "--name", &name, "--memory", "64M", "--", "sh", "-c", script])
            .env("AIRLOCK_TEST_FAIL_AT", step)
            .output()
            .unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "{step}: the failure waited");
        assert_eq!(o.status.code(), Some(125), "{step}: {}", show(&o));
        assert!(
            stderr(&o).contains(&format!("failure injected for a test at step {step}")),
            "{step}: {}",
            show(&o)
        );
        assert!(!stderr(&o).contains("also failed"), "{step}: {}", show(&o));

        let dir = env.sandbox_dir(&name);
        let meta = read_meta(&dir);
        let expected = if layer_on_disk { "exited" } else { "failed" };
        assert_eq!(meta["state"], expected, "{step}: {meta}");
        assert_nothing_running(&name, &dir, &meta, step);
        let held = registry_entries_below(&env.state);
        if layer_on_disk {
            assert_eq!(held, vec![dir.display().to_string()], "{step}: the kept layer keeps its block");
            assert!(dir.join("upper/made-inside").is_file(), "{step}: the layer was kept");
        } else {
            assert_eq!(held, Vec::<String>::new(), "{step}: id block kept");
        }
        let rm = env.airlock(["rm", &name]).output().unwrap();
        assert!(rm.status.success(), "{step}: {}", show(&rm));
        assert_eq!(registry_entries_below(&env.state), Vec::<String>::new(), "{step}: block kept after rm");
    }
}

/// The supervisor of a long-lived sandbox: failing before it reports the
/// sandbox ready (`create` sees the error), or while it stops it (the
/// sandbox's state and audit log say what went wrong).
#[test]
fn a_supervisor_failing_after_the_launch_leaves_nothing_behind() {
    if !require(is_root(), "root (cgroups, the layer's tmpfs and id blocks are made only as root)") {
        return;
    }
    let env = PrivateBlocks::new("14980-14989");
    let name = "svc-late-serving";
    let o = env
        .airlock(["create", "--name", name, "--memory", "64M"])
        .env("AIRLOCK_TEST_FAIL_AT", "serving")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(stderr(&o).contains("failure injected for a test at step serving"), "{}", show(&o));
    let dir = env.sandbox_dir(name);
    let meta = read_meta(&dir);
    assert_eq!(meta["state"], "failed", "{meta}");
    assert_nothing_running(name, &dir, &meta, "serving");
    assert_eq!(registry_entries_below(&env.state), Vec::<String>::new(), "serving: id block kept");

    for (step, layer_on_disk) in [("stopping", false), ("exit-recorded", false), ("persisted", true)] {
        let name = format!("svc-late-{step}");
        let o = env
            .airlock(["create", "--name", &name, "--memory", "64M"])
            .env("AIRLOCK_TEST_FAIL_AT", step)
            .output()
            .unwrap();
        assert!(o.status.success(), "{step}: {}", show(&o));
        // Something still running when the stop fails half-way.
        let o = env.airlock(["exec", &name, "--", "sh", "-c", "echo made > made-inside"]).output().unwrap();
        assert!(o.status.success(), "{step}: {}", show(&o));
        let spawned = Command::new(BIN)
            .args(["exec", &name, "--", "sleep", "30"])
            .env("AIRLOCK_TEST_ID_BLOCKS", env.range)
            .env("AIRLOCK_STATE_DIR", &env.state)
            .env("AIRLOCK_CGROUP_PARENT", cgroup_parent())
            .env("AIRLOCK_SOCKET", env.dir.path().join("no-daemon.sock"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let mut sleeper = spawned.unwrap();
        let dir = env.sandbox_dir(&name);
        let meta = read_meta(&dir);
        let first = u32::try_from(meta["host_uid"].as_u64().unwrap()).unwrap();
        assert!(wait_until(10, || !processes_in_block(first).is_empty()), "{step}: nothing runs");

        let o = env.airlock(["stop", &name]).output().unwrap();
        assert!(o.status.success(), "{step}: {}", show(&o));
        let _ = sleeper.wait();
        let meta = read_meta(&dir);
        let expected = if layer_on_disk { "stopped" } else { "failed" };
        assert_eq!(meta["state"], expected, "{step}: {meta}");
        let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
        assert!(audit.contains(&format!("failure injected for a test at step {step}")), "{step}: {audit}");
        assert_nothing_running(&name, &dir, &meta, step);
        let held = registry_entries_below(&env.state);
        if layer_on_disk {
            assert_eq!(held, vec![dir.display().to_string()], "{step}: the kept layer keeps its block");
        } else {
            assert_eq!(held, Vec::<String>::new(), "{step}: id block kept");
        }
        let rm = env.airlock(["rm", &name]).output().unwrap();
        assert!(rm.status.success(), "{step}: {}", show(&rm));
    }
    assert_eq!(registry_entries_below(&env.state), Vec::<String>::new(), "a block kept after rm");
}
