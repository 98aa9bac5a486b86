//! The work a start and an exec do, counted in system calls rather than
//! timed (times belong in `bench/`): a regression that brings back a sync,
//! a connection or a thread per command shows here on any machine.

use std::process::Command;

use crate::suite::support::*;

/// Runs `cmd` under `strace -f`, tracing `calls`; returns the traced lines.
fn traced(env: &Env, calls: &str, cmd: &Command) -> Vec<String> {
    let log = env.dir.path().join(format!("strace-{calls}.log"));
    let mut strace = Command::new("strace");
    strace.args(["-f", "-qq", "-s", "200", "-e", &format!("trace={calls}"), "-o"]).arg(&log);
    strace.arg(cmd.get_program()).args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => strace.env(key, v),
            None => strace.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        strace.current_dir(dir);
    }
    let out = strace.output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    std::fs::read_to_string(&log).unwrap().lines().map(str::to_owned).collect()
}

fn has_strace() -> bool {
    Command::new("strace").arg("-V").output().is_ok_and(|o| o.status.success())
}

#[test]
fn run_rm_syncs_only_the_states_a_reboot_could_tear() {
    if !require(has_strace(), "strace") || !require(is_root(), "root") {
        return;
    }
    let env = Env::new();
    let lines = traced(
        &env,
        "fsync,fdatasync,syncfs,sync",
        &env.airlock(["run", "--rm", "--mode", "none", "--", "true"]),
    );
    let syncs: Vec<&String> = lines.iter().filter(|l| l.contains("sync(")).collect();
    // meta.json as the sandbox is created, once it has its ids and cgroup,
    // and once it runs: each synced before its rename, never the directory
    // after it. The state it ends in and the audit log's last events go
    // with the directory `--rm` removes, unsynced.
    assert!(syncs.len() <= 3, "{} syncs for `run --rm -- true`:\n{}", syncs.len(), lines.join("\n"));
}

#[test]
fn an_exec_connects_once_and_starts_one_thread() {
    if !require(has_strace(), "strace") {
        return;
    }
    let env = Env::new();
    let o = env.airlock(["create", "--name", "counted"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let lines =
        traced(&env, "connect,clone,clone3", &env.airlock(["--direct", "exec", "counted", "--", "true"]));
    let connects: Vec<&String> = lines.iter().filter(|l| l.contains("supervisor.sock")).collect();
    assert_eq!(connects.len(), 1, "connections to the supervisor:\n{}", lines.join("\n"));
    // The signal forwarder only: no thread just to close stdin.
    let threads = lines
        .iter()
        .filter(|l| (l.contains("clone(") || l.contains("clone3(")) && !l.contains("resumed"))
        .count();
    assert!(threads <= 1, "{threads} threads started for one exec:\n{}", lines.join("\n"));
    let o = env.airlock(["stop", "counted"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
}
