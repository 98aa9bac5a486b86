//! The CLI through `airlock daemon`: with a daemon answering on
//! `$AIRLOCK_SOCKET`, create/exec/cp/logs/ls/inspect/events/stop/rm/diff/apply go
//! through its API (the daemon's event log and its SQLite-backed fields
//! show it); without one, or with `--direct`, the same commands work on
//! the state directory as before.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use super::daemon_harness::TestDaemon;
use super::support::*;

/// The shared test daemon (its own state directory, socket and cgroup
/// parent), driven here through the CLI.
struct Daemon {
    inner: TestDaemon,
}

impl Daemon {
    fn start(tag: &str) -> Daemon {
        Daemon { inner: TestDaemon::start(&format!("cli-{tag}")) }
    }

    fn env(&self) -> &Env {
        &self.inner.env
    }

    /// `airlock ARGS` with this daemon's socket.
    fn airlock(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = self.inner.env.airlock(args);
        cmd.env("AIRLOCK_SOCKET", &self.inner.socket).env("AIRLOCK_CGROUP_PARENT", &self.inner.cgroup_parent);
        cmd
    }

    /// A GET with curl, as a check independent of the CLI.
    fn curl(&self, path: &str) -> String {
        self.inner.request("GET", path, None).1
    }

    /// The kinds of the daemon's events about `name`.
    fn event_kinds(&self, name: &str) -> Vec<String> {
        self.curl(&format!("/v1/events?sandbox={name}"))
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .map(str::to_owned)
            .collect()
    }
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", show(o)))
}

fn ok(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "{}", show(o));
}

#[test]
fn cli_create_exec_ls_inspect_events_stop_rm_through_the_daemon() {
    let d = Daemon::start("rt");
    let o = d.airlock(&["create", "--name", "cd1", "--label", "team=infra", "--env", "GREETING=hi"]);
    ok(&o);
    assert_eq!(stdout(&o).trim(), "cd1");
    // The daemon made it: its log says so, with the labels it indexed.
    let events = d.curl("/v1/events?sandbox=cd1");
    assert!(events.contains("event: created") && events.contains("\"team\":\"infra\""), "{events}");

    let o = d.airlock(&["exec", "cd1", "--", "sh", "-c", "echo out; echo $GREETING >&2; exit 3"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert_eq!(stdout(&o), "out\n");
    assert_eq!(stderr(&o), "hi\n");
    let o = d.airlock(&["exec", "cd1", "--env", "V=1", "--cwd", "/", "--", "sh", "-c", "echo $V; pwd"]);
    ok(&o);
    assert_eq!(stdout(&o), "1\n/\n");
    let o = d.airlock(&["exec", "cd1", "--timeout", "1s", "--", "sleep", "30"]);
    assert_eq!(o.status.code(), Some(124), "{}", show(&o));
    let kinds = d.event_kinds("cd1");
    assert_eq!(kinds.iter().filter(|k| *k == "exec_ended").count(), 3, "{kinds:?}");

    // ls and inspect print the daemon's objects (owner and exec counts come
    // from its index).
    let o = d.airlock(&["ls", "--json"]);
    ok(&o);
    let list = json(&o);
    let entry = list.as_array().unwrap().iter().find(|s| s["name"] == "cd1").unwrap().clone();
    assert_eq!(entry["state"], "running", "{list}");
    assert_eq!(entry["labels"]["team"], "infra", "{list}");
    assert!(entry["owner_uid"].as_u64().is_some(), "{list}");
    let o = d.airlock(&["ls"]);
    ok(&o);
    assert!(stdout(&o).lines().any(|l| l.starts_with("cd1 ") && l.contains("running")), "{}", show(&o));
    let o = d.airlock(&["inspect", "cd1", "--json"]);
    ok(&o);
    let info = json(&o);
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["execs_total"], 3, "{info}");
    assert!(info["supervisor_pid"].as_i64().is_some(), "{info}");
    let o = d.airlock(&["inspect", "cd1"]);
    ok(&o);
    assert!(stdout(&o).contains("labels:     team=infra"), "{}", show(&o));
    assert!(stdout(&o).contains("execs:      3"), "{}", show(&o));

    // Logs are read from the state directory, with or without a daemon.
    let o = d.airlock(&["logs", "cd1"]);
    ok(&o);
    assert!(stdout(&o).contains("out\n"), "{}", show(&o));

    // Errors are the daemon's message, exit 125.
    let o = d.airlock(&["exec", "nope", "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(stderr(&o).starts_with("airlock: error: "), "{}", show(&o));
    assert!(stderr(&o).contains("nope"), "{}", show(&o));
    let o = d.airlock(&["create", "--name", "cd1"]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(stderr(&o).contains("already exists"), "{}", show(&o));

    let o = d.airlock(&["stop", "cd1"]);
    ok(&o);
    let o = d.airlock(&["inspect", "cd1", "--json"]);
    assert_eq!(json(&o)["state"], "stopped", "{}", show(&o));
    let o = d.airlock(&["exec", "cd1", "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(stderr(&o).contains("not running"), "{}", show(&o));

    // events: one line per event; --json prints the daemon's objects.
    let o = d.airlock(&["events", "--sandbox", "cd1"]);
    ok(&o);
    let text = stdout(&o);
    for kind in ["created", "exec_started", "exec_ended", "stopped"] {
        assert!(text.lines().any(|l| l.split_whitespace().nth(3) == Some(kind)), "no {kind}: {text}");
    }
    let o = d.airlock(&["events", "--json"]);
    ok(&o);
    let objects: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        objects.iter().any(|e| e["kind"] == "stopped" && e["detail"]["reason"] == "requested"),
        "{objects:?}"
    );
    let first = objects[0]["id"].as_u64().unwrap();
    let o = d.airlock(&["events", "--json", "--since", &first.to_string()]);
    ok(&o);
    assert_eq!(stdout(&o).lines().count(), objects.len() - 1, "{}", show(&o));

    let o = d.airlock(&["rm", "cd1"]);
    ok(&o);
    assert!(!d.env().sandbox_dir("cd1").exists());
    assert!(d.event_kinds("cd1").iter().any(|k| k == "destroyed"));
    let o = d.airlock(&["inspect", "cd1"]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
}

#[test]
fn cli_events_follow_streams_new_events() {
    let d = Daemon::start("follow");
    let mut child = d
        .cmd(&["events", "--follow", "--json", "--sandbox", "cdf"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    ok(&d.airlock(&["create", "--name", "cdf"]));
    ok(&d.airlock(&["exec", "cdf", "--", "true"]));
    let mut kinds = Vec::new();
    while !kinds.iter().any(|k| k == "exec_ended") {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else { break };
        let event: Value = serde_json::from_str(&line).unwrap();
        kinds.push(event["kind"].as_str().unwrap().to_owned());
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(kinds, ["created", "exec_started", "exec_ended"]);
}

#[test]
fn cli_diff_and_apply_through_the_daemon() {
    let d = Daemon::start("apply");
    ok(&d.airlock(&["create", "--name", "cda"]));
    ok(&d.airlock(&["exec", "cda", "--", "sh", "-c", "echo patched >> src/lib.c"]));
    ok(&d.airlock(&["stop", "cda"]));
    // Every form through the API: this CLI's own state directory is empty.
    let elsewhere = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| d.cmd(args).env("AIRLOCK_STATE_DIR", elsewhere.path()).output().unwrap();
    let o = run(&["diff", "cda", "--json"]);
    ok(&o);
    let diff = json(&o);
    assert!(diff.to_string().contains("src/lib.c"), "{diff}");
    let o = run(&["diff", "cda"]);
    ok(&o);
    assert!(stdout(&o).contains("+patched"), "{}", show(&o));
    let o = run(&["diff", "cda", "--stat"]);
    ok(&o);
    assert!(stdout(&o).contains("src/lib.c") && stdout(&o).contains("1 file changed"), "{}", show(&o));
    // Without a terminal to ask, apply refuses unless told --yes.
    let o = run(&["apply", "cda"]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(stderr(&o).contains("--yes"), "{}", show(&o));
    assert_eq!(std::fs::read_to_string(d.env().workspace.join("src/lib.c")).unwrap(), "int x;\n");
    let o = run(&["apply", "cda", "--yes"]);
    ok(&o);
    assert!(stdout(&o).contains("src/lib.c"), "{}", show(&o));
    assert!(stdout(&o).contains("applied: 1 written"), "{}", show(&o));
    assert_eq!(std::fs::read_to_string(d.env().workspace.join("src/lib.c")).unwrap(), "int x;\npatched\n");
    assert!(d.event_kinds("cda").iter().any(|k| k == "applied"), "{:?}", d.event_kinds("cda"));
}

#[test]
fn cli_direct_flag_bypasses_a_running_daemon() {
    let d = Daemon::start("direct");
    let o = d.airlock(&["--direct", "create", "--name", "cdd", "--label", "k=v"]);
    ok(&o);
    let o = d.airlock(&["exec", "cdd", "--direct", "--", "echo", "hi"]);
    ok(&o);
    assert_eq!(stdout(&o), "hi\n");
    // Neither went through the daemon's API.
    let kinds = d.event_kinds("cdd");
    assert!(!kinds.iter().any(|k| k == "created" || k == "exec_ended"), "{kinds:?}");
    let o = d.airlock(&["--direct", "ls", "--json"]);
    ok(&o);
    let list = json(&o);
    assert!(list.as_array().unwrap().iter().any(|s| s["name"] == "cdd"), "{list}");
    let o = d.airlock(&["--direct", "events"]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(stderr(&o).contains("without --direct"), "{}", show(&o));
    ok(&d.airlock(&["--direct", "rm", "cdd"]));
}

/// The keys only a daemon knows (docs/api.md): what it adds to the one view.
const DAEMON_ONLY: [&str; 4] = ["owner_uid", "labels", "execs_total", "execs_running"];

/// `ls --json` and `inspect --json` print one shape whoever answers: the
/// same keys (a daemon adds only [`DAEMON_ONLY`]) and the same state
/// vocabulary, for the same sandbox running and stopped.
#[test]
fn cli_ls_and_inspect_print_one_shape_with_and_without_the_daemon() {
    let d = Daemon::start("shape");
    ok(&d.airlock(&["create", "--name", "cds", "--label", "team=infra"]));
    ok(&d.airlock(&["exec", "cds", "--", "true"]));
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let compare = |when: &str, want_state: &str| {
        let entry = |args: &[&str]| {
            let o = d.airlock(args);
            ok(&o);
            json(&o).as_array().unwrap().iter().find(|s| s["name"] == "cds").cloned().unwrap()
        };
        let inspect = |args: &[&str]| {
            let o = d.airlock(args);
            ok(&o);
            json(&o)
        };
        let pairs = [
            ("ls", entry(&["--direct", "ls", "--json"]), entry(&["ls", "--json"])),
            (
                "inspect",
                inspect(&["--direct", "inspect", "cds", "--json"]),
                inspect(&["inspect", "cds", "--json"]),
            ),
        ];
        for (what, direct, daemon) in pairs {
            let extra: Vec<String> =
                keys(&daemon).into_iter().filter(|k| !keys(&direct).contains(k)).collect();
            let missing: Vec<String> =
                keys(&direct).into_iter().filter(|k| !keys(&daemon).contains(k)).collect();
            assert!(missing.is_empty(), "{when} {what}: the daemon lacks {missing:?}\n{direct}\n{daemon}");
            assert!(
                extra.iter().all(|k| DAEMON_ONLY.contains(&k.as_str())),
                "{when} {what}: the daemon adds {extra:?}\n{direct}\n{daemon}"
            );
            for key in ["state", "lost", "name", "policy", "exit"] {
                assert_eq!(direct[key], daemon[key], "{when} {what} {key}\n{direct}\n{daemon}");
            }
            assert_eq!(direct["state"], want_state, "{when} {what}\n{direct}");
        }
    };
    compare("running", "running");
    ok(&d.airlock(&["stop", "cds"]));
    compare("stopped", "stopped");
    ok(&d.airlock(&["rm", "cds"]));
}

/// Without a daemon (no socket, or a socket nobody answers on) the same
/// commands work on the state directory.
#[test]
fn cli_without_a_daemon_works_directly() {
    let env = Env::new();
    let socket = env.dir.path().join("no-daemon.sock");
    // A socket that accepts connections but never answers: the health
    // check gives up after a second.
    let silent = env.dir.path().join("silent.sock");
    let _listener = UnixListener::bind(&silent).unwrap();
    for (i, socket) in [&socket, &silent].into_iter().enumerate() {
        let name = format!("nd{i}");
        let run = |args: &[&str]| env.airlock(args).env("AIRLOCK_SOCKET", socket).output().unwrap();
        let started = std::time::Instant::now();
        let o = run(&["create", "--name", &name, "--label", "k=v"]);
        ok(&o);
        assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
        assert_eq!(stdout(&o).trim(), name);
        let o = run(&["exec", &name, "--", "sh", "-c", "echo out; exit 4"]);
        assert_eq!(o.status.code(), Some(4), "{}", show(&o));
        assert_eq!(stdout(&o), "out\n");
        let o = run(&["ls", "--json"]);
        ok(&o);
        let list = json(&o);
        let entry = list.as_array().unwrap().iter().find(|s| s["name"] == name.as_str()).unwrap().clone();
        assert!(entry.get("owner_uid").is_none(), "the daemon's object, without a daemon: {entry}");
        let o = run(&["inspect", &name, "--json"]);
        ok(&o);
        assert_eq!(json(&o)["state"], "running", "{}", show(&o));
        ok(&run(&["stop", &name]));
        assert!(
            wait_until(10, || json(&run(&["inspect", &name, "--json"]))["state"] == "stopped"),
            "{}",
            show(&run(&["inspect", &name, "--json"]))
        );
        let o = run(&["events"]);
        assert_eq!(o.status.code(), Some(125), "{}", show(&o));
        assert!(stderr(&o).contains("no daemon answers"), "{}", show(&o));
        ok(&run(&["rm", &name]));
        assert!(!env.sandbox_dir(&name).exists());
    }
}

/// `exec` (plain, `-i`, `-t`, `-it` on a real terminal), `cp` and `logs`
/// through the API. The CLI here has a state directory of its own, with no
/// sandbox in it, so only the daemon can have served them.
#[test]
fn cli_exec_cp_and_logs_go_through_the_daemon() {
    let d = Daemon::start("io");
    ok(&d.airlock(&["create", "--name", "cio"]));
    let elsewhere = tempfile::tempdir().unwrap();
    let cli = |args: &[&str]| {
        let mut cmd = d.cmd(args);
        cmd.env("AIRLOCK_STATE_DIR", elsewhere.path());
        cmd
    };
    let run = |args: &[&str]| cli(args).output().unwrap();
    // `sh -c COMMAND` on a terminal of its own (script(1) makes one), with
    // this CLI's environment.
    let in_terminal = |command: &str| {
        let mut script = std::process::Command::new("script");
        script.args(["-qec", command, "/dev/null"]);
        for (key, value) in cli(&[]).get_envs() {
            match value {
                Some(value) => script.env(key, value),
                None => script.env_remove(key),
            };
        }
        script
    };

    // stdin with -i; stdout, stderr and the exit code come back apart.
    let mut child = cli(&["exec", "-i", "cio", "--", "sh", "-c", "cat; echo done >&2; exit 5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"piped in\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", show(&o));
    assert_eq!(stdout(&o), "piped in\n");
    assert_eq!(stderr(&o), "done\n");
    // --user: that user of the sandbox.
    let o = run(&["exec", "--user", "nobody", "cio", "--", "id", "-un"]);
    ok(&o);
    assert_eq!(stdout(&o), "nobody\n");
    let o = run(&["exec", "--user", "ghost", "cio", "--", "true"]);
    assert_eq!(o.status.code(), Some(126), "{}", show(&o));
    assert!(stderr(&o).contains("ghost"), "{}", show(&o));
    // Without -i the process's stdin is empty, not the caller's.
    let o = run(&["exec", "cio", "--", "sh", "-c", "cat; echo end"]);
    ok(&o);
    assert_eq!(stdout(&o), "end\n");

    // -t without a terminal here: one inside, of the default size.
    let o = run(&["exec", "-t", "cio", "--", "sh", "-c", "tty; stty size"]);
    ok(&o);
    assert!(stdout(&o).starts_with("/dev/pts/"), "{}", show(&o));
    assert!(stdout(&o).contains("24 80"), "{}", show(&o));
    // -it on a real terminal (script(1) makes one): the sandbox's terminal
    // takes the caller's size, and keys typed reach the process.
    let command =
        format!("stty rows 41 cols 123; {} exec -it cio -- sh -c 'stty size; read x; echo got:$x'", BIN);
    let mut child = in_terminal(&command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let (mut from, output) = (child.stdout.take().unwrap(), output.clone());
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut from, &mut chunk) {
                output.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        })
    };
    // Keys typed before the exec runs would be flushed when the CLI puts
    // the terminal in raw mode: type once the process inside has answered.
    let answered = wait_until(30, || String::from_utf8_lossy(&output.lock().unwrap()).contains("41 123"));
    std::io::Write::write_all(&mut input, b"typed\r").unwrap();
    let mut o = child.wait_with_output().unwrap();
    drop(input);
    reader.join().unwrap();
    o.stdout = output.lock().unwrap().clone();
    assert!(answered, "the process never printed its terminal's size\n{}", show(&o));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains("41 123"), "{}", show(&o));
    assert!(stdout(&o).contains("got:typed"), "{}", show(&o));
    // A terminal that never learnt its size (0x0) gets the default one.
    let command = format!("stty rows 0 cols 0; {BIN} exec -t cio -- stty size");
    let o = in_terminal(&command).stdin(Stdio::null()).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains("24 80"), "{}", show(&o));

    // A signal sent to `airlock exec` reaches the process.
    let mut child = cli(&[
        "exec",
        "cio",
        "--",
        "sh",
        "-c",
        "trap 'echo got-int; exit 7' INT; echo ready; sleep 60 & wait",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "got-int");
    assert_eq!(child.wait().unwrap().code(), Some(7));

    // A client that goes away takes its process with it.
    let mut child = cli(&["exec", "cio", "--", "sh", "-c", "echo $$; exec sleep 300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = BufReader::new(child.stdout.take().unwrap()).lines().next().unwrap().unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    assert!(
        wait_until(10, || run(&["exec", "cio", "--", "kill", "-0", &pid]).status.code() == Some(1)),
        "process {pid} still runs after its client went away"
    );
    let cancelled = d.curl("/v1/events?sandbox=cio");
    assert!(cancelled.contains("\"cancelled\":true") && cancelled.contains("sleep 300"), "{cancelled}");

    // cp both ways, into directories, through the files API.
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("fixture.json"), b"{\"k\": 1}\n").unwrap();
    let fixture = host.path().join("fixture.json");
    ok(&run(&["cp", fixture.to_str().unwrap(), "cio:/tmp/"]));
    let o = run(&["exec", "cio", "--", "cat", "/tmp/fixture.json"]);
    assert_eq!(stdout(&o), "{\"k\": 1}\n", "{}", show(&o));
    ok(&run(&["exec", "cio", "--", "sh", "-c", "printf 'from inside' > /tmp/report.txt"]));
    let back = tempfile::tempdir().unwrap();
    ok(&run(&["cp", "cio:/tmp/report.txt", back.path().to_str().unwrap()]));
    assert_eq!(std::fs::read_to_string(back.path().join("report.txt")).unwrap(), "from inside");
    let missing = back.path().join("missing.txt");
    let o = run(&["cp", "cio:/tmp/nope", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(stderr(&o).contains("/tmp/nope"), "{}", show(&o));
    assert!(!missing.exists(), "a failed copy left {}", missing.display());
    let kinds = d.event_kinds("cio");
    assert!(kinds.iter().any(|k| k == "file_written") && kinds.iter().any(|k| k == "file_read"), "{kinds:?}");

    // logs: the sandbox's captured output, each stream on its own.
    let o = run(&["logs", "cio"]);
    ok(&o);
    assert!(stdout(&o).contains("piped in\n") && !stdout(&o).contains("done\n"), "{}", show(&o));
    // Files copied in or out are not the sandbox's output: not in its logs.
    assert!(!stdout(&o).contains("from inside"), "{}", show(&o));
    let o = run(&["logs", "cio", "--stderr"]);
    ok(&o);
    assert!(stdout(&o).contains("done\n"), "{}", show(&o));
    let o = run(&["logs", "nope"]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
}

/// `create --mode` goes through the API too: a read-only workspace is
/// read-only, and a mode the policy forbids is refused by the daemon.
#[test]
fn cli_create_with_a_workspace_mode_through_the_daemon() {
    let d = Daemon::start("mode");
    ok(&d.airlock(&["create", "--name", "cro", "--mode", "ro"]));
    assert!(d.event_kinds("cro").iter().any(|k| k == "created"), "{:?}", d.event_kinds("cro"));
    let o = d.airlock(&["inspect", "cro", "--json"]);
    assert_eq!(json(&o)["workspace_mode"], "ro", "{}", show(&o));
    let o = d.airlock(&["exec", "cro", "--", "sh", "-c", "cat src/lib.c; echo x >> src/lib.c"]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o), "int x;\n", "{}", show(&o));
    assert!(stderr(&o).contains("Read-only"), "{}", show(&o));
    ok(&d.airlock(&["rm", "cro"]));
    // The plugin policy mounts no workspace and takes no other mode.
    let o = d.airlock(&["create", "--name", "cpl", "--policy", "plugin", "--mode", "rw"]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(stderr(&o).contains("not allowed by policy \"plugin\""), "{}", show(&o));
}
