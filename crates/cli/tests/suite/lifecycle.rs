//! Limits and lifetime: time limits, signals, the supervisor's death,
//! cleanup rules, and bombs that must hit the sandbox's limits only.

use std::process::Stdio;

use super::support::*;

#[test]
fn time_limit_kills_the_whole_tree_with_124() {
    let env = Env::new();
    let token = "sleep 4242.4201";
    let started = std::time::Instant::now();
    let o = env.run_sh("timeout", &["--timeout", "2s"], &format!("({token} &) ; {token}"));
    assert_eq!(o.status.code(), Some(124), "{}", show(&o));
    assert!(started.elapsed().as_secs() < 30);
    assert!(wait_until(5, || pids_running(token).is_empty()), "survivors: {:?}", pids_running(token));
    let audit = std::fs::read_to_string(env.sandbox_dir("timeout").join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"time_limit_hit\""), "{audit}");
}

#[test]
fn sigterm_reaches_the_command() {
    let env = Env::new();
    let child = env
        .airlock([
            "run",
            "--name",
            "sigterm",
            "--",
            "sh",
            "-c",
            "trap 'echo got-term; exit 42' TERM; echo ready; while true; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let meta = env.sandbox_dir("sigterm").join("logs/stdout.log");
    assert!(wait_until(20, || std::fs::read_to_string(&meta).is_ok_and(|s| s.contains("ready"))));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(42), "{}", show(&o));
    assert!(stdout(&o).contains("got-term"));
}

#[test]
fn supervisor_death_kills_the_sandbox_and_gc_cleans_up() {
    let env = Env::new();
    let token = "sleep 04242.4202";
    let mut child = env
        .airlock([
            "run",
            "--name",
            "orphan",
            "--",
            "sh",
            "-c",
            // The duration is assembled inside, so only the sleeps themselves
            // carry the token in their command line.
            "t=4242.420$((1+1)); (sleep 0$t &); echo x > new-file; sleep 0$t",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(20, || pids_running(token).len() >= 2), "sandbox never started");
    if is_root() {
        assert!(!cgroup_dirs("orphan").is_empty(), "the running sandbox has no cgroup");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(wait_until(10, || pids_running(token).is_empty()), "survivors: {:?}", pids_running(token));

    let o = env.airlock(["ls", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((&list[0]["state"], &list[0]["lost"]), (&"failed".into(), &true.into()), "{list}");

    let o = env.airlock(["gc", "--json"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["lost"][0], "orphan", "{report}");
    assert!(cgroup_dirs("orphan").is_empty(), "{:?}", cgroup_dirs("orphan"));
    assert!(mounts_containing(&env.sandbox_dir("orphan").display().to_string()).is_empty());
    let audit = std::fs::read_to_string(env.sandbox_dir("orphan").join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"supervisor_lost\""), "{audit}");
    // The work done before the crash is still reviewable.
    let o = env.airlock(["diff", "orphan", "--json"]).output().unwrap();
    assert!(stdout(&o).contains("new-file"), "{}", show(&o));
}

#[test]
fn rm_flag_and_cleanup_rules_remove_the_sandbox() {
    let env = Env::new();
    let o = env.run_sh("gone", &["--rm"], "true");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!env.sandbox_dir("gone").exists());

    // ci removes successful sandboxes and keeps failed ones for debugging.
    let o = env.run_sh("ci-ok", &["--policy", "ci"], "true");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!env.sandbox_dir("ci-ok").exists());
    let o = env.run_sh("ci-fail", &["--policy", "ci"], "exit 1");
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(env.sandbox_dir("ci-fail").exists());
}

/// A sandbox whose meta.json a crash tore (or someone garbled) is listed,
/// failed, not skipped without a word; `rm` removes it.
#[test]
fn a_sandbox_with_unreadable_metadata_is_listed_failed_and_can_be_removed() {
    let env = Env::new();
    let o = env.run_sh("torn", &[], "true");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let meta = env.sandbox_dir("torn").join("meta.json");
    let whole = std::fs::read(&meta).unwrap();
    for garbled in [&whole[..whole.len() / 2], b"".as_slice(), b"\0\xff not json".as_slice()] {
        std::fs::write(&meta, garbled).unwrap();
        let ls = env.airlock(["ls", "--json"]).output().unwrap();
        assert!(ls.status.success(), "{}", show(&ls));
        let listed: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
        let torn = listed.as_array().unwrap().iter().find(|s| s["name"] == "torn");
        let torn = torn.unwrap_or_else(|| panic!("not listed: {}", show(&ls)));
        assert_eq!(torn["state"], "failed", "{torn}");
        assert!(stderr(&ls).contains("torn"), "the warning names it: {}", show(&ls));
    }
    let rm = env.airlock(["rm", "torn"]).output().unwrap();
    assert!(rm.status.success(), "{}", show(&rm));
    assert!(!env.sandbox_dir("torn").exists());
}

#[test]
fn fork_bomb_hits_the_pids_limit() {
    let env = Env::new();
    let token = "sleep 4242.4204";
    let o = env.run_sh(
        "forkbomb",
        &["--pids", "32", "--timeout", "20s", "--rm"],
        &format!("i=0; while [ $i -lt 200 ]; do {token} & i=$((i+1)); done; echo all-started"),
    );
    assert!(!stdout(&o).contains("all-started"), "{}", show(&o));
    assert!(stderr(&o).to_lowercase().contains("fork"), "{}", show(&o));
    // Nothing it started outlives it, and the host still starts processes.
    assert!(wait_until(5, || pids_running(token).is_empty()), "survivors: {:?}", pids_running(token));
    assert!(std::process::Command::new("true").status().unwrap().success());
}

#[test]
fn memory_bomb_hits_the_memory_limit() {
    if !require(is_root(), "root (cgroup limits)") {
        return;
    }
    let env = Env::new();
    let o = env.run_sh(
        "membomb",
        &["--memory", "64M", "--timeout", "60s"],
        "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
    );
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!stdout(&o).contains("survived"), "{}", show(&o));
    assert!(stderr(&o).contains("memory limit"), "{}", show(&o));
}

#[test]
fn disk_filling_hits_the_layer_budget() {
    if !require(is_root(), "root (size-limited writable layer)") {
        return;
    }
    let env = Env::new();
    let policy = env.dir.path().join("small-disk.toml");
    std::fs::write(&policy, "extends = \"dev\"\n[limits]\ndisk = \"16M\"\n").unwrap();
    let o = env.run_sh(
        "diskfill",
        &["--policy", policy.to_str().unwrap()],
        "i=0; while [ $i -lt 64 ]; do head -c 1048576 /dev/zero > f$i || { echo full at $i; exit 9; }; i=$((i+1)); done",
    );
    assert_eq!(o.status.code(), Some(9), "{}", show(&o));
    assert!(stdout(&o).contains("full at"), "{}", show(&o));
    // The host's copy of the workspace is untouched.
    assert!(!env.workspace.join("f0").exists());
}

#[test]
fn pid1_reaps_orphans() {
    let env = Env::new();
    let o = env.run_sh(
        "reaper",
        &["--rm"],
        // Waits until no orphan is left, running or unreaped (10 s at most).
        "for i in 1 2 3 4 5; do (sleep 0.05 &) ; done; n=0; \
         left() { cat /proc/[0-9]*/stat 2>/dev/null | awk '$2 == \"(sleep)\"' | wc -l; }; \
         while [ $(left) -gt 0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done; \
         echo left:$(left) zombies:$(cat /proc/[0-9]*/stat 2>/dev/null | awk '$3 == \"Z\"' | wc -l)",
    );
    assert!(stdout(&o).contains("left:0 zombies:0"), "{}", show(&o));
}

#[test]
fn a_terminal_gets_a_fresh_pty_inside() {
    if !require(
        std::process::Command::new("script").arg("--version").output().is_ok(),
        "script(1) from util-linux",
    ) {
        return;
    }
    let env = Env::new();
    let command = format!("{BIN} run --rm -- sh -c 'tty; test -t 0 && echo stdin-is-tty'");
    let o = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("AIRLOCK_STATE_DIR", &env.state)
        .env("AIRLOCK_CGROUP_PARENT", cgroup_parent())
        .current_dir(&env.workspace)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(out.contains("/dev/pts/0"), "{}", show(&o));
    assert!(out.contains("stdin-is-tty"), "{}", show(&o));
}

#[test]
fn sigterm_reaches_a_command_without_handlers() {
    // No trap: the signal's default action must apply, which needs the
    // command to start with nothing blocked.
    let env = Env::new();
    let token = "sleep 04242.4206";
    let child = env
        .airlock(["run", "--rm", "--", "sh", "-c", "exec sleep 0$((4242)).420$((3+3))"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(20, || !pids_running(token).is_empty()), "never started");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(128 + 15), "{}", show(&o));
}
