//! A launch that fails half-way releases at once what it had set up: its
//! cgroup, its layer's tmpfs, its egress proxy, its agent and its id block.
//! Nothing is left for `airlock gc`. Failures are injected after each phase
//! with `AIRLOCK_TEST_FAIL_AT` (read by debug builds only).

use std::path::Path;

use crate::suite::support::*;

/// The phases of a launch, in order (`LAUNCH_PHASES` in the runtime's
/// lifecycle.rs).
const PHASES: &[&str] =
    &["state", "cgroup", "layer", "idmapped", "network", "spawned", "joined", "proxy-ready", "running"];

const REGISTRY: &str = "/run/airlock/id-blocks";
const BLOCK_SIZE: u32 = 65_536;

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
    let env = Env::new();
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
    let env = Env::new();
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
