//! Only airlock stops a long-lived sandbox. The agent is PID 1 of the
//! sandbox; an exec that could end it (a signal to PID 1, or starving it of
//! the threads it relays output with) would end every other exec with it.

use std::process::{Child, Command, Output, Stdio};

use crate::suite::support::*;

fn exec(env: &Env, name: &str, script: &str) -> Output {
    env.airlock(["exec", name, "--", "sh", "-c", script]).output().unwrap()
}

/// An exec left running in the background, its output collected at the end.
fn exec_in_background(env: &Env, name: &str, script: &str) -> Child {
    let mut cmd: Command = env.airlock(["exec", name, "--", "sh", "-c", script]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// The output of `child`, which must end within `secs` (an exec whose end
/// the agent failed to report would leave its client waiting forever).
fn finished_within(mut child: Child, secs: u64, what: &str) -> Output {
    if !wait_until(secs, || child.try_wait().unwrap().is_some()) {
        let _ = child.kill();
        let o = child.wait_with_output().unwrap();
        panic!("{what} did not end within {secs}s: its end was lost\n{}", show(&o));
    }
    child.wait_with_output().unwrap()
}

fn state_of(env: &Env, name: &str) -> String {
    let o = env.airlock(["inspect", name, "--json"]).output().unwrap();
    let view: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    view["state"].as_str().unwrap_or_default().to_string()
}

#[test]
fn signals_from_inside_to_the_agent_are_ignored() {
    let env = Env::new();
    let o = env.airlock(["create", "--name", "sig", "--mode", "none"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    // A neighbour exec that must live through the attack.
    let neighbour = exec_in_background(&env, "sig", "sleep 2; echo survived");
    assert!(wait_until(10, || exec(&env, "sig", "pgrep -x sleep").status.success()));

    // Every signal an exec can send, each to PID 1 (root inside may signal
    // it; the kernel delivers only those the agent has a handler for).
    let o = exec(
        &env,
        "sig",
        "for s in TERM INT HUP QUIT USR1 USR2 WINCH PIPE ALRM CHLD CONT STOP KILL; do \
           kill -s $s 1 || echo \"kill -$s failed\"; done; echo sent",
    );
    assert_eq!(stdout(&o), "sent\n", "{}", show(&o));

    let neighbour = finished_within(neighbour, 20, "the neighbour exec");
    assert_eq!(stdout(&neighbour), "survived\n", "{}", show(&neighbour));
    assert_eq!(neighbour.status.code(), Some(0), "{}", show(&neighbour));
    assert_eq!(state_of(&env, "sig"), "running");
    let o = exec(&env, "sig", "echo still here");
    assert_eq!(stdout(&o), "still here\n", "{}", show(&o));

    // airlock itself still stops it, as a clean stop.
    let o = env.airlock(["stop", "sig"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(wait_until(15, || state_of(&env, "sig") == "stopped"), "{}", state_of(&env, "sig"));
}

/// The agent's threads count against the sandbox's pids limit. An exec that
/// takes every pid must not make the agent fail when it next needs a thread
/// (to report a neighbour's end), or the whole sandbox would be lost.
#[test]
fn an_exec_that_takes_every_pid_does_not_take_the_agent_down() {
    if !require(is_root(), "root (cgroup pids limit)") {
        return;
    }
    let env = Env::new();
    let o = env.airlock(["create", "--name", "pids", "--mode", "none", "--pids", "48"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    // Ends while the hog below holds every pid: reporting its end needs a
    // thread. (It needs no fork of its own: the shell execs sleep.)
    let neighbour = exec_in_background(&env, "pids", "exec sleep 3");
    assert!(wait_until(10, || exec(&env, "pids", "pgrep -x sleep").status.success()));
    // dash gives up at the first fork the limit refuses; the sleeps it
    // started hold the pids until they end.
    let hog =
        exec_in_background(&env, "pids", "i=0; while [ $i -lt 200 ]; do sleep 6 & i=$((i+1)); done; wait");

    let neighbour = finished_within(neighbour, 20, "the neighbour exec");
    assert_eq!(neighbour.status.code(), Some(0), "{}", show(&neighbour));
    let hog = finished_within(hog, 30, "the exec that took every pid");
    // dash's error exit: the only error this script can meet is a refused
    // fork. Its "Cannot fork" may not reach the client: once no thread can
    // start, the agent reports an end without waiting for trailing output.
    assert_eq!(hog.status.code(), Some(2), "the pids limit was never reached: {}", show(&hog));

    assert_eq!(state_of(&env, "pids"), "running");
    assert!(
        wait_until(20, || stdout(&exec(&env, "pids", "echo still here")) == "still here\n"),
        "the sandbox did not recover once the hog's processes ended"
    );
    assert_eq!(state_of(&env, "pids"), "running");
}
