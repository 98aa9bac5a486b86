//! Long-lived sandboxes: `create`, `exec`, `stop`, each owned by a detached
//! supervisor process that enforces the deadline and the idle timeout.

use std::process::Output;

use super::support::*;

fn create(env: &Env, name: &str, extra: &[&str]) -> Output {
    let mut args = vec!["create", "--name", name];
    args.extend_from_slice(extra);
    env.airlock(args).output().unwrap()
}

fn exec(env: &Env, name: &str, script: &str) -> Output {
    env.airlock(["exec", name, "--", "sh", "-c", script]).output().unwrap()
}

fn state_of(env: &Env, name: &str) -> String {
    let o = env.airlock(["ls", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .map(|s| if s["lost"] == true { "lost".into() } else { s["state"].as_str().unwrap().to_string() })
        .unwrap_or_default()
}

fn supervisor_pid(env: &Env, name: &str) -> i32 {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.sandbox_dir(name).join("meta.json")).unwrap()).unwrap();
    meta["supervisor_pid"].as_i64().unwrap() as i32
}

#[test]
fn create_exec_stop_and_review() {
    let env = Env::new();
    let o = create(&env, "svc", &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), "svc");
    assert_eq!(state_of(&env, "svc"), "running");

    let o = exec(&env, "svc", "echo out; echo err >&2; hostname; exit 3");
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert_eq!(stdout(&o), "out\nsvc\n");
    assert_eq!(stderr(&o), "err\n");

    // Processes see the workspace through the overlay, like `run`.
    let o = exec(&env, "svc", "echo patched >> src/lib.c; cat src/lib.c");
    assert_eq!(stdout(&o), "int x;\npatched\n", "{}", show(&o));
    assert_eq!(std::fs::read_to_string(env.workspace.join("src/lib.c")).unwrap(), "int x;\n");

    // Repeated: a failed exec must not race the agent's reaper.
    for _ in 0..5 {
        let o = env.airlock(["exec", "svc", "--", "no-such-program"]).output().unwrap();
        assert_eq!(o.status.code(), Some(127), "{}", show(&o));
    }
    let o = env.airlock(["exec", "svc", "--timeout", "1s", "--", "sleep", "30"]).output().unwrap();
    assert_eq!(o.status.code(), Some(124), "{}", show(&o));

    let o = env.airlock(["inspect", "svc", "--json"]).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["state"], "running", "{info}");
    assert!(info["deadline_unix"].as_u64().is_some(), "{info}");
    let o = env.airlock(["logs", "svc"]).output().unwrap();
    assert!(stdout(&o).contains("out\n"), "{}", show(&o));

    let o = env.airlock(["stop", "svc"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(wait_until(10, || state_of(&env, "svc") == "stopped"), "state {}", state_of(&env, "svc"));
    let o = env.airlock(["inspect", "svc", "--json"]).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["state"], "stopped", "{info}");
    // Nothing is lost: diff, logs and audit stay until rm.
    let o = env.airlock(["diff", "svc", "--stat"]).output().unwrap();
    assert!(stdout(&o).contains("src/lib.c"), "{}", show(&o));
    let log = std::fs::read_to_string(env.sandbox_dir("svc").join("logs/stdout.log")).unwrap();
    assert!(log.contains("out\n"), "{log}");
    let audit = std::fs::read_to_string(env.sandbox_dir("svc").join("audit.jsonl")).unwrap();
    for event in ["\"exec_started\"", "\"exec_ended\"", "\"stopped\"", "stopped on request"] {
        assert!(audit.contains(event), "{event} missing: {audit}");
    }
    let o = env.airlock(["rm", "svc"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

#[test]
fn execs_run_concurrently() {
    let env = Env::new();
    assert_eq!(create(&env, "many", &[]).status.code(), Some(0));
    // Each waits (20 s at most) until all four have started: one after
    // another, the first would give up having seen only itself.
    let rendezvous = "touch /tmp/started-$0; n=0; \
        while [ $(ls /tmp | grep -c started-) -lt 4 ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n+1)); done; \
        echo $0:$(ls /tmp | grep -c started-)";
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let mut cmd = env.airlock(["exec", "many", "--", "sh", "-c", rendezvous, &i.to_string()]);
            std::thread::spawn(move || cmd.output().unwrap())
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let o = h.join().unwrap();
        assert_eq!(stdout(&o), format!("{i}:4\n"), "execs ran one after another\n{}", show(&o));
    }
    let _ = env.airlock(["rm", "many"]).output();
}

#[test]
fn idle_timeout_and_deadline_stop_the_sandbox() {
    let env = Env::new();
    assert_eq!(create(&env, "idle", &["--idle-timeout", "2s"]).status.code(), Some(0));
    assert_eq!(create(&env, "deadline", &["--timeout", "3s"]).status.code(), Some(0));
    // The deadline is the same stop: SIGTERM first, then the grace period.
    let child = background_exec(
        &env,
        "deadline",
        "trap 'echo cleaned up; exit 0' TERM; echo ready; while :; do sleep 0.1; done",
    );
    assert!(wait_until(15, || state_of(&env, "idle") == "stopped"));
    assert!(wait_until(15, || state_of(&env, "deadline") == "stopped"));
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("cleaned up"), "{}", show(&out));
    let idle = std::fs::read_to_string(env.sandbox_dir("idle").join("audit.jsonl")).unwrap();
    assert!(idle.contains("idle timeout reached"), "{idle}");
    let deadline = std::fs::read_to_string(env.sandbox_dir("deadline").join("audit.jsonl")).unwrap();
    assert!(deadline.contains("maximum runtime reached"), "{deadline}");
}

#[test]
fn the_supervisor_is_detached_and_its_death_is_cleaned_up() {
    let env = Env::new();
    assert_eq!(create(&env, "owned", &[]).status.code(), Some(0));
    let pid = supervisor_pid(&env, "owned");
    // Not a child of whoever created it: it outlives its creator.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid: i32 = stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_ne!(ppid, std::process::id() as i32);
    let token = "sleep 04242.4205";
    let mut bg =
        env.airlock(["exec", "owned", "--", "sh", "-c", "t=4242.420$((2+3)); sleep 0$t"]).spawn().unwrap();
    assert!(wait_until(10, || !pids_running(token).is_empty()), "exec never started");

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    assert!(wait_until(10, || pids_running(token).is_empty()), "survivors: {:?}", pids_running(token));
    let _ = bg.wait();
    assert!(wait_until(10, || state_of(&env, "owned") == "lost"), "state {}", state_of(&env, "owned"));
    let o = env.airlock(["gc", "--json"]).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["lost"][0], "owned", "{report}");
    let audit = std::fs::read_to_string(env.sandbox_dir("owned").join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"supervisor_lost\""), "{audit}");
}

/// An exec whose process does not read its input, while a client streams
/// it, holds up nothing else: the agent writes each exec's stdin from a
/// thread of its own within a window, so other execs, file operations and
/// the stop go on; and every byte still arrives once the process reads.
#[test]
fn an_exec_that_does_not_read_its_input_holds_up_nothing_else() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    const SENT: u64 = 16 << 20;
    let env = Env::new();
    assert_eq!(create(&env, "stall", &[]).status.code(), Some(0));
    let mut reader = env
        .airlock([
            "exec",
            "-i",
            "stall",
            "--",
            "sh",
            "-c",
            "while [ ! -e /tmp/go ]; do sleep 0.1; done; wc -c",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let mut input = reader.stdin.take().unwrap();
        let written = written.clone();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            while written.load(Ordering::Relaxed) < SENT {
                input.write_all(&chunk).unwrap();
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
    };
    // Wait until the input is stuck: nothing more goes for a second.
    let mut last = u64::MAX;
    assert!(
        wait_until(60, || {
            let now = written.load(Ordering::Relaxed);
            let stalled = now == last;
            last = now;
            if !stalled {
                std::thread::sleep(std::time::Duration::from_millis(950));
            }
            stalled
        }),
        "the input never stalled"
    );
    assert!(written.load(Ordering::Relaxed) < SENT, "the process read nothing, yet all input was taken");

    // Meanwhile another exec and a file operation are served.
    let mut other = env
        .airlock(["exec", "stall", "--", "echo", "served"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut other_status = None;
    assert!(
        wait_until(30, || {
            other_status = other.try_wait().unwrap();
            other_status.is_some()
        }),
        "an exec waited behind another exec's unread input"
    );
    let o = other.wait_with_output().unwrap();
    assert_eq!(stdout(&o), "served\n", "{}", show(&o));
    let o = env.airlock(["files", "stat", "stall:/tmp"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    // Once the process reads, every byte arrives, in order of sending.
    let o = exec(&env, "stall", "touch /tmp/go");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    writer.join().unwrap();
    let o = reader.wait_with_output().unwrap();
    assert_eq!(stdout(&o).trim(), SENT.to_string(), "{}", show(&o));
}

#[test]
fn stdin_reaches_an_exec_and_cp_copies_both_ways() {
    use std::io::Write;
    let env = Env::new();
    assert_eq!(create(&env, "io", &[]).status.code(), Some(0));
    let mut child = env
        .airlock(["exec", "-i", "io", "--", "sh", "-c", "read a; read b; echo $b-$a"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"one\ntwo\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(stdout(&o), "two-one\n", "{}", show(&o));

    let fixture = env.dir.path().join("fixture.json");
    std::fs::write(&fixture, "{\"a\": 1}\n").unwrap();
    let o = env.airlock(["cp"]).arg(&fixture).arg("io:/tmp/fixture.json").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = exec(&env, "io", "cat /tmp/fixture.json; echo made > /tmp/back.txt");
    assert_eq!(stdout(&o), "{\"a\": 1}\n", "{}", show(&o));
    // Replacing a file keeps its mode; into a missing directory is an error.
    exec(&env, "io", "chmod 751 /tmp/fixture.json");
    let o = env.airlock(["cp"]).arg(&fixture).arg("io:/tmp/fixture.json").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = exec(&env, "io", "stat -c %a /tmp/fixture.json; ls -a /tmp | grep -c airlock-write");
    assert_eq!(stdout(&o), "751\n0\n", "{}", show(&o));
    let o = env.airlock(["cp"]).arg(&fixture).arg("io:/nowhere/x").output().unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("/nowhere"), "{}", show(&o));
    // Input that is not the size the file had (a FIFO says 0 and then
    // delivers more) is refused, and the old file stays.
    let fifo = env.dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let feeder = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::write(fifo, b"unexpected"))
    };
    let o = env.airlock(["cp"]).arg(&fifo).arg("io:/tmp/fixture.json").output().unwrap();
    let _ = feeder.join();
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("broke off"), "{}", show(&o));
    let o = exec(&env, "io", "cat /tmp/fixture.json; ls -a /tmp | grep -c airlock-write");
    assert_eq!(stdout(&o), "{\"a\": 1}\n0\n", "{}", show(&o));
    let back = env.dir.path().join("back.txt");
    let o = env.airlock(["cp", "io:/tmp/back.txt"]).arg(&back).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "made\n");
    // A missing file is an error, and leaves nothing behind on the host.
    let missing = env.dir.path().join("missing.txt");
    let o = env.airlock(["cp", "io:/tmp/nope"]).arg(&missing).output().unwrap();
    assert_ne!(o.status.code(), Some(0));
    assert!(!missing.exists());
    // The copied file is not the sandbox's output: the logs have the two
    // execs' `cat`, and nothing of the copy out.
    let log = std::fs::read_to_string(env.sandbox_dir("io").join("logs/stdout.log")).unwrap();
    assert_eq!(log.matches("{\"a\": 1}").count(), 2, "{log}");
    assert!(!log.contains("made"), "{log}");
    let _ = env.airlock(["rm", "io"]).output();
}

#[test]
fn exec_with_a_terminal() {
    if !require(
        std::process::Command::new("script").arg("--version").output().is_ok(),
        "script(1) from util-linux",
    ) {
        return;
    }
    let env = Env::new();
    assert_eq!(create(&env, "tty", &[]).status.code(), Some(0));
    // Without -i the process gets no input; -t gives it a terminal of its own.
    let o = env
        .airlock(["exec", "-t", "tty", "--", "sh", "-c", "tty; test -t 0 && echo stdin-is-tty"])
        .output()
        .unwrap();
    assert!(stdout(&o).contains("/dev/pts/"), "{}", show(&o));
    assert!(stdout(&o).contains("stdin-is-tty"), "{}", show(&o));
    // Interactive, from a terminal: input goes through, the size follows.
    let command = format!("printf 'echo typed-$((40+2))\\nexit 7\\n' | {} exec -it tty -- sh", BIN);
    let o = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("AIRLOCK_STATE_DIR", &env.state)
        .current_dir(&env.workspace)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(stdout(&o).contains("typed-42"), "{}", show(&o));
    let _ = env.airlock(["rm", "tty"]).output();
}

/// `exec --user`: the process runs as that user of the sandbox, with no
/// capabilities and no way back to root; the agent keeps only what
/// switching ids takes, and processes started as root get none of it.
#[test]
fn exec_as_another_user_of_the_sandbox() {
    let env = Env::new();
    assert_eq!(create(&env, "users", &[]).status.code(), Some(0));
    let as_user = |user: &str, script: &str| {
        env.airlock(["exec", "--user", user, "users", "--", "sh", "-c", script]).output().unwrap()
    };
    let o = exec(&env, "users", "echo secret > /tmp/root-only; chmod 600 /tmp/root-only; id -u");
    assert_eq!(stdout(&o), "0\n", "{}", show(&o));

    let o = as_user(
        "nobody",
        "id -u; id -g; echo $USER $HOME; grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status; \
         cat /tmp/root-only 2>/dev/null || echo denied; touch /tmp/mine; stat -c %u /tmp/mine",
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..3], ["65534", "65534", "nobody /nonexistent"], "{}", show(&o));
    assert!(lines[3..8].iter().all(|l| l.ends_with("0000000000000000")), "{}", show(&o));
    assert_eq!(&lines[8..], ["denied", "65534"], "{}", show(&o));

    let o = as_user("1234:50", "id -u; id -g");
    assert_eq!(stdout(&o), "1234\n50\n", "{}", show(&o));

    let o = as_user("ghost", "true");
    assert_eq!(o.status.code(), Some(126), "{}", show(&o));
    assert!(stderr(&o).contains("no user \"ghost\""), "{}", show(&o));
    let o = as_user("70000", "true");
    assert_eq!(o.status.code(), Some(126), "{}", show(&o));
    assert!(stderr(&o).contains("not mapped"), "{}", show(&o));

    // The agent holds CAP_SETUID and CAP_SETGID (0xc0) and nothing else, with
    // an empty bounding set; a process started as root has no capability.
    let o = exec(&env, "users", "grep -E '^Cap(Prm|Eff|Bnd|Inh|Amb)' /proc/1/status /proc/self/status");
    let caps = stdout(&o);
    for line in caps.lines() {
        let expected =
            if line.starts_with("/proc/1/status:CapPrm") || line.starts_with("/proc/1/status:CapEff") {
                "00000000000000c0"
            } else {
                "0000000000000000"
            };
        assert!(line.ends_with(expected), "{line}\n{}", show(&o));
    }
    assert_eq!(caps.lines().count(), 10, "{}", show(&o));
    assert_eq!(env.airlock(["rm", "users"]).output().unwrap().status.code(), Some(0));
}

/// An exec whose client dies (here `airlock exec`, SIGKILLed) is killed:
/// no one is left to read its output or end it.
#[test]
fn an_exec_dies_with_its_client() {
    use std::io::BufRead;
    let env = Env::new();
    assert_eq!(create(&env, "orphan", &[]).status.code(), Some(0));
    let mut child = env
        .airlock(["exec", "orphan", "--", "sh", "-c", "echo $$; exec sleep 300"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let pid = line.trim().to_owned();
    child.kill().unwrap();
    let _ = child.wait();
    let gone = wait_until(10, || exec(&env, "orphan", &format!("kill -0 {pid}")).status.code() == Some(1));
    assert!(gone, "process {pid} still runs after its client died");
    let _ = env.airlock(["rm", "orphan"]).output();
}

/// Without a daemon too, a signal sent to `airlock exec` reaches the
/// process, which may handle it.
#[test]
fn signals_to_airlock_exec_reach_the_process() {
    use std::io::BufRead;
    let env = Env::new();
    assert_eq!(create(&env, "sig", &[]).status.code(), Some(0));
    let mut child = env
        .airlock([
            "exec",
            "sig",
            "--",
            "sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; echo ready; sleep 60 & wait",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "got-term");
    assert_eq!(child.wait().unwrap().code(), Some(7));
    let _ = env.airlock(["rm", "sig"]).output();
}

/// The agent is PID 1: if the OOM killer took it, one greedy exec would end
/// the whole sandbox. Filling the sandbox's tmpfs is the case where the
/// agent is the biggest process there (the memory belongs to no process).
#[test]
fn an_exec_that_exhausts_memory_dies_and_the_sandbox_lives() {
    if !require(is_root(), "root (cgroup limits)") {
        return;
    }
    let env = Env::new();
    let o = create(&env, "oom", &["--mode", "none", "--memory", "64M"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    // What the OOM killer goes by: everything started ranks ahead of the
    // agent, and cannot change that. (The agent holds the raised score only
    // while it forks, which can still be under way when the exec starts.)
    let o = exec(
        &env,
        "oom",
        "for i in $(seq 50); do a=$(cat /proc/1/oom_score_adj); [ \"$a\" = 0 ] && break; sleep 0.1; done; \
         echo $a; cat /proc/self/oom_score_adj; \
         echo 0 > /proc/self/oom_score_adj && echo lowered; true",
    );
    assert_eq!(stdout(&o), "0\n500\n", "{}", show(&o));

    // The OOM killer ends dd, and the client is told why rather than left
    // with a bare 137. The sandbox stays.
    let o = env
        .airlock(["exec", "oom", "--", "dd", "if=/dev/zero", "of=/tmp/fill", "bs=1M", "count=200"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(137), "{}", show(&o));
    assert!(stderr(&o).contains("OOM killer ended this process"), "{}", show(&o));
    assert!(stderr(&o).contains("memory limit (64M)"), "{}", show(&o));
    // A process killed otherwise gets no such explanation.
    let o = exec(&env, "oom", "rm /tmp/fill; kill -KILL $$");
    assert_eq!(o.status.code(), Some(137), "{}", show(&o));
    assert!(!stderr(&o).contains("OOM"), "{}", show(&o));
    assert_eq!(state_of(&env, "oom"), "running", "{}", show(&o));
    let o = exec(&env, "oom", "echo alive");
    assert_eq!(stdout(&o), "alive\n", "{}", show(&o));
    assert_eq!(env.airlock(["stop", "oom"]).output().unwrap().status.code(), Some(0));
}

/// A sandbox whose agent ends by itself is recorded as it ended, not as a
/// clean stop.
#[test]
fn an_agent_that_dies_is_recorded_as_it_died() {
    let env = Env::new();
    let o = create(&env, "gone", &["--mode", "none"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    // The agent is one of the supervisor's two children (the other is the
    // sandbox's egress proxy).
    let supervisor = supervisor_pid(&env, "gone");
    let is_agent = |pid: &i32| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        cmdline.split(|b| *b == 0).nth(1) == Some(b"__agent".as_slice())
    };
    let agents: Vec<i32> = children_of(supervisor).into_iter().filter(is_agent).collect();
    assert_eq!(agents.len(), 1, "agents among the supervisor's children: {agents:?}");
    let killed = std::process::Command::new("kill").args(["-KILL", &agents[0].to_string()]).status().unwrap();
    assert!(killed.success());
    assert!(wait_until(10, || state_of(&env, "gone") == "stopped"), "state {}", state_of(&env, "gone"));
    let o = env.airlock(["inspect", "gone"]).output().unwrap();
    assert!(stdout(&o).contains("exit:       signal 9"), "{}", show(&o));
    let o = env.airlock(["ls"]).output().unwrap();
    let row = stdout(&o).lines().find(|l| l.starts_with("gone ")).unwrap_or_default().to_string();
    assert!(row.contains(" 137 "), "{}", show(&o));
}

/// A policy file in the test's directory extending `dev` with the given
/// `stop_grace`.
fn grace_policy(env: &Env, grace: &str) -> String {
    let path = env.dir.path().join("grace.toml");
    std::fs::write(&path, format!("extends = \"dev\"\n\n[limits]\nstop_grace = \"{grace}\"\n")).unwrap();
    path.to_string_lossy().into_owned()
}

/// Starts `airlock exec NAME -- sh -c SCRIPT` in the background and waits
/// for its first line of output (the script says it is ready).
fn background_exec(env: &Env, name: &str, script: &str) -> std::process::Child {
    spawn_until_ready(env.airlock(["exec", name, "--", "sh", "-c", script]))
}

/// `airlock stop` sends SIGTERM to the sandbox's processes: one that
/// handles it gets to clean up (its output reaches its client and the
/// sandbox's log, its file the layer), and `stop` returns with the sandbox
/// finalized — `stopped`, no mount left, `stopped` audited once.
#[test]
fn stop_lets_processes_clean_up_and_returns_finalized() {
    let env = Env::new();
    let policy = grace_policy(&env, "20s");
    let o = create(&env, "grace", &["--policy", &policy]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let script = "trap 'echo cleaned up; echo done > cleanup.txt; exit 0' TERM; echo ready; \
                  while :; do sleep 0.1; done";
    let child = background_exec(&env, "grace", script);

    let started = std::time::Instant::now();
    let o = env.airlock(["stop", "grace"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    // It ended on SIGTERM, well before the 20 s grace period.
    assert!(started.elapsed() < std::time::Duration::from_secs(15), "stop took {:?}", started.elapsed());
    // No wait: stop returned with the sandbox finalized.
    assert_eq!(state_of(&env, "grace"), "stopped");
    let dir = env.sandbox_dir("grace");
    assert_eq!(mounts_containing(&dir.to_string_lossy()), Vec::<String>::new());

    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("cleaned up"), "{}", show(&out));
    let log = std::fs::read_to_string(dir.join("logs/stdout.log")).unwrap();
    assert!(log.contains("cleaned up"), "{log}");
    let o = env.airlock(["diff", "grace", "--stat"]).output().unwrap();
    assert!(stdout(&o).contains("cleanup.txt"), "{}", show(&o));
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert_eq!(audit.matches("\"stopped\"").count(), 1, "{audit}");
    assert!(audit.contains("stopped on request"), "{audit}");
    let o = env.airlock(["rm", "grace"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

/// A process that ignores SIGTERM is killed once the policy's grace period
/// is over, and not before.
#[test]
fn a_process_ignoring_sigterm_is_killed_after_the_grace_period() {
    let env = Env::new();
    let policy = grace_policy(&env, "2s");
    let o = create(&env, "stubborn", &["--policy", &policy]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let child = background_exec(&env, "stubborn", "trap '' TERM; echo ready; while :; do sleep 0.1; done");

    let started = std::time::Instant::now();
    let o = env.airlock(["stop", "stubborn"]).output().unwrap();
    let took = started.elapsed();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(took >= std::time::Duration::from_secs(2), "killed before the grace period: {took:?}");
    assert!(took < std::time::Duration::from_secs(12), "stop took {took:?}");
    assert_eq!(state_of(&env, "stubborn"), "stopped");
    let out = child.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(mounts_containing(&env.sandbox_dir("stubborn").to_string_lossy()), Vec::<String>::new());
}

/// `rm` of a running sandbox is the same stop: the process gets SIGTERM
/// first, and the audit log says `stopped` before `removed`.
#[test]
fn rm_of_a_running_sandbox_stops_it_the_same_way() {
    let env = Env::new();
    let policy = grace_policy(&env, "20s");
    assert_eq!(create(&env, "rmgrace", &["--policy", &policy]).status.code(), Some(0));
    let child = background_exec(
        &env,
        "rmgrace",
        "trap 'echo cleaned up; exit 0' TERM; echo ready; while :; do sleep 0.1; done",
    );
    let o = env.airlock(["rm", "rmgrace"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("cleaned up"), "{}", show(&out));
    assert!(!env.sandbox_dir("rmgrace").exists());
}

/// A foreground `airlock run` has no supervisor: `stop` says how to end it
/// instead of killing it behind its terminal's back.
#[test]
fn stop_of_a_foreground_run_says_how_to_end_it() {
    let env = Env::new();
    let mut run = env.airlock(["run", "--name", "fg", "--", "sleep", "60"]).spawn().unwrap();
    assert!(wait_until(15, || state_of(&env, "fg") == "running"), "state {}", state_of(&env, "fg"));
    let o = env.airlock(["stop", "fg"]).output().unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("no supervisor"), "{}", show(&o));
    assert_eq!(state_of(&env, "fg"), "running");
    let o = env.airlock(["rm", "fg"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let _ = run.wait();
}
