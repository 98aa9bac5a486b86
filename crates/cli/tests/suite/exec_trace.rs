//! The exec trace: every execve and execveat inside a process-tier sandbox,
//! by any of its processes (background ones that outlive their command
//! too), in the audit log with pid, parent, argv, directory and end; a
//! flood summarized while the supervisor keeps answering; hostile
//! arguments recorded exactly and shown escaped; rootless too.

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::support::*;

/// Every record of a sandbox's audit log, as `airlock audit --json` prints
/// them (one per line).
fn audit_records(env: &Env, name: &str) -> Vec<Value> {
    let o = env.airlock(["audit", name, "--json"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

fn of_kind<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["event"] == kind).collect()
}

/// The execs that ran (not a PATH search's misses) of `path`.
fn execs_of<'a>(records: &'a [Value], path: &str) -> Vec<&'a Value> {
    of_kind(records, "process_exec")
        .into_iter()
        .filter(|r| r["path"] == path && r.get("no_such_file").is_none())
        .collect()
}

fn argv(record: &Value) -> Vec<String> {
    record["argv"].as_array().unwrap().iter().map(|a| a.as_str().unwrap_or("<bytes>").to_owned()).collect()
}

fn the_one<'a>(records: &'a [Value], path: &str, arg: &str) -> &'a Value {
    let found: Vec<&Value> =
        execs_of(records, path).into_iter().filter(|r| argv(r).iter().any(|a| a == arg)).collect();
    assert_eq!(found.len(), 1, "{path} with {arg}: {found:#?}");
    found[0]
}

fn create(env: &Env, name: &str) {
    let o = env.airlock(["create", "--name", name, "--mode", "none"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

fn stop(env: &Env, name: &str) {
    let o = env.airlock(["stop", name]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

#[test]
fn every_exec_appears_once_with_its_parent_and_its_end() {
    let env = Env::new();
    create(&env, "tree");
    // Forks (a subshell), nested shells, a background job that execs after
    // the command it came from has ended, exit codes of every kind.
    let script = "/bin/sh -c '/bin/echo nested-1; /bin/sh -c \"/bin/echo nested-2\"'; \
                  ( /bin/sleep 1; /bin/echo background-after ) >/tmp/bg.out 2>&1 & \
                  /bin/sh -c 'exit 7'; /bin/echo top-done";
    let o = env.airlock(["exec", "tree", "--", "/bin/sh", "-c", script]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o), "nested-1\nnested-2\ntop-done\n");
    // The background job's exec comes after its command returned.
    assert!(
        wait_until(20, || {
            let o = env.airlock(["exec", "tree", "--", "/bin/cat", "/tmp/bg.out"]).output().unwrap();
            stdout(&o).contains("background-after")
        }),
        "the background job never ran"
    );
    stop(&env, "tree");
    let records = audit_records(&env, "tree");

    let top = the_one(&records, "/bin/sh", script);
    let outer = the_one(&records, "/bin/sh", "/bin/echo nested-1; /bin/sh -c \"/bin/echo nested-2\"");
    let inner = the_one(&records, "/bin/sh", "/bin/echo nested-2");
    let exit7 = the_one(&records, "/bin/sh", "exit 7");
    let echo1 = the_one(&records, "/bin/echo", "nested-1");
    let echo2 = the_one(&records, "/bin/echo", "nested-2");
    let done = the_one(&records, "/bin/echo", "top-done");
    let sleep = the_one(&records, "/bin/sleep", "1");
    let late = the_one(&records, "/bin/echo", "background-after");
    // The agent (pid 1) started the command; each shell its children.
    assert_eq!(top["ppid"], 1, "{top}");
    assert_eq!(argv(top), ["/bin/sh", "-c", script]);
    for (child, parent) in
        [(outer, top), (exit7, top), (done, top), (echo1, outer), (inner, outer), (echo2, inner)]
    {
        assert_eq!(child["ppid"], parent["pid"], "{child} should be a child of {parent}");
    }
    // The background job: a subshell forked by the command, which runs
    // sleep as its child and then becomes echo itself (the shell execs its
    // last command): by then its command has ended, and its parent is the
    // sandbox's agent, which adopts orphans. Parents are as they were at
    // the time of each call.
    assert_eq!(late["pid"], sleep["ppid"], "{sleep} {late}");
    assert_eq!(late["ppid"], 1, "{late}");
    assert_ne!(sleep["ppid"], top["pid"]);
    let pids: Vec<i64> = [top, outer, inner, exit7, echo1, echo2, done, sleep]
        .iter()
        .map(|r| r["pid"].as_i64().unwrap())
        .collect();
    let mut unique = pids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), pids.len(), "one process each: {pids:?}");
    for r in [top, outer, inner] {
        assert!(r["cwd"].as_str().is_some_and(|c| c.starts_with('/')), "{r}");
    }
    // The background exec was recorded after its command's exec ended.
    let command_ended = of_kind(&records, "exec_ended").first().map(|r| r["seq"].as_u64().unwrap()).unwrap();
    assert!(late["seq"].as_u64().unwrap() > command_ended, "{late}");

    // Each process that exec'd ended once, with its status and how long.
    let exit_of = |r: &Value| -> Value {
        let ends: Vec<&Value> =
            of_kind(&records, "process_exit").into_iter().filter(|e| e["pid"] == r["pid"]).collect();
        assert_eq!(ends.len(), 1, "{r}: {ends:#?}");
        assert!(ends[0]["seq"].as_u64() > r["seq"].as_u64());
        ends[0].clone()
    };
    assert_eq!(exit_of(exit7)["code"], 7);
    for r in [top, outer, inner, echo1, echo2, done, sleep, late] {
        assert_eq!(exit_of(r)["code"], 0, "{r}");
    }
    assert!(exit_of(sleep)["duration_ms"].as_u64().unwrap() >= 900, "{}", exit_of(sleep));

    // The timeline shows them, one line each.
    let o = env.airlock(["audit", "tree"]).output().unwrap();
    let text = stdout(&o);
    assert!(
        text.lines()
            .any(|l| l.contains("process_exec ") && l.contains("/bin/echo: /bin/echo background-after in /")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.contains("process_exit ") && l.contains("code 7")), "{text}");
}

#[test]
fn an_exec_flood_is_summarized_while_the_supervisor_keeps_answering() {
    let env = Env::new();
    create(&env, "flood");
    const EXECS: u64 = 10_000;
    let script = format!("i=0; while [ $i -lt {EXECS} ]; do /bin/true; i=$((i+1)); done; echo flood-done");
    let mut flood = env.airlock(["exec", "flood", "--", "/bin/sh", "-c", &script]);
    let flood_started = Instant::now();
    let flood = flood.stdout(std::process::Stdio::piped()).spawn().unwrap();
    // Meanwhile the supervisor answers, and another exec runs.
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let asked = Instant::now();
        let o = env.airlock(["inspect", "flood", "--json"]).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        assert!(asked.elapsed() < Duration::from_secs(5), "inspect took {:?}", asked.elapsed());
        answered += 1;
    }
    let asked = Instant::now();
    let o = env.airlock(["exec", "flood", "--", "/bin/echo", "meanwhile"]).output().unwrap();
    assert_eq!(stdout(&o), "meanwhile\n", "{}", show(&o));
    assert!(asked.elapsed() < Duration::from_secs(10), "an exec during the flood took {:?}", asked.elapsed());
    let o = flood.wait_with_output().unwrap();
    let flood_seconds = flood_started.elapsed().as_secs() + 1;
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o), "flood-done\n");
    assert!(answered > 0);
    stop(&env, "flood");

    let records = audit_records(&env, "flood");
    let itemized = execs_of(&records, "/bin/true").len() as u64;
    let summaries = of_kind(&records, "process_exec_summary");
    assert!(!summaries.is_empty(), "a flood is summarized");
    let mut counted = 0;
    for s in &summaries {
        assert_eq!(s["lost"], 0, "{s}");
        for p in s["programs"].as_array().unwrap() {
            if p["path"] == "/bin/true" {
                counted += p["count"].as_u64().unwrap();
            }
        }
        assert!(s["execs"].as_u64().unwrap() > 0);
    }
    assert_eq!(itemized + counted, EXECS, "{itemized} itemized, {counted} counted");
    // At most the rate, one by one, in any one second (a loaded machine
    // runs the loop slower: some seconds stay under the rate, unsummarized).
    let per_second = summaries[0]["itemized_per_second"].as_u64().unwrap();
    assert!(
        itemized <= per_second * (flood_seconds + 1),
        "{itemized} itemized in {flood_seconds} s at {per_second} a second"
    );
    let o = env.airlock(["audit", "flood"]).output().unwrap();
    assert!(
        stdout(&o).lines().any(|l| l.contains("process_exec_summary") && l.contains("/bin/true ×")),
        "{}",
        show(&o)
    );
    // The exec that ran meanwhile is in the timeline too (or counted).
    let meanwhile = execs_of(&records, "/bin/echo").len();
    let echo_counted: u64 = summaries
        .iter()
        .flat_map(|s| s["programs"].as_array().unwrap().iter())
        .filter(|p| p["path"] == "/bin/echo")
        .map(|p| p["count"].as_u64().unwrap())
        .sum();
    assert_eq!(meanwhile as u64 + echo_counted, 1);
}

#[test]
fn hostile_arguments_are_recorded_exactly_cut_and_shown_escaped() {
    let env = Env::new();
    // Invalid UTF-8, control characters and a line break that would forge a
    // record, and a 100 KiB argument.
    let script = "/bin/echo \"$(printf '\\377\\376')\" \"$(printf '\\033[2J\\r\\nforged line')\" \
                  \"$(head -c 102400 /dev/zero | tr '\\0' x)\" > /dev/null";
    let o: Output = env.run_sh("hostile", &["--mode", "none"], script);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let records = audit_records(&env, "hostile");
    let echo = execs_of(&records, "/bin/echo");
    assert_eq!(echo.len(), 1, "{records:#?}");
    let args = echo[0]["argv"].as_array().unwrap();
    assert_eq!(echo[0]["argc"], 4);
    assert_eq!(args[1], serde_json::json!({"non_utf8_hex": "fffe"}));
    assert_eq!(args[2], "\u{1b}[2J\r\nforged line");
    let big = args[3].as_str().unwrap();
    assert!(big.len() <= 1024, "{}", big.len());
    assert!(big.starts_with("xxxx") && big.ends_with("…[cut by airlock: 102400 bytes in all]"), "{big}");
    // The whole record stays small.
    let raw = std::fs::read_to_string(env.sandbox_dir("hostile").join("audit.jsonl")).unwrap();
    assert!(raw.lines().all(|l| l.len() < 16 * 1024));

    let o = env.airlock(["audit", "hostile"]).output().unwrap();
    let text = stdout(&o);
    let line = text
        .lines()
        .find(|l| l.contains("process_exec ") && l.contains("/bin/echo: "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(r#""\377\376""#), "{line}");
    assert!(line.contains(r#""\033[2J\r\nforged line""#), "{line}");
    assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text:?}");
    assert!(!text.lines().any(|l| l.starts_with("forged")), "{text}");
}

/// The process_exec records of programs named `name` (any directory), PATH
/// misses included.
fn attempts_of<'a>(records: &'a [Value], name: &str) -> Vec<&'a Value> {
    of_kind(records, "process_exec")
        .into_iter()
        .filter(|r| r["path"].as_str().is_some_and(|p| p.rsplit('/').next() == Some(name)))
        .collect()
}

#[test]
fn a_command_given_by_name_is_one_exec_not_a_search_of_every_path_directory() {
    let env = Env::new();
    // `run`: the agent finds `true` on the PATH itself, so the trace sees
    // one exec of the file that runs, named as the caller named it.
    let o = env.airlock(["run", "--name", "by-name", "--mode", "none", "--", "true"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let records = audit_records(&env, "by-name");
    let attempts = attempts_of(&records, "true");
    assert_eq!(attempts.len(), 1, "{attempts:#?}");
    assert!(attempts[0].get("no_such_file").is_none(), "{}", attempts[0]);
    assert!(attempts[0]["path"].as_str().unwrap().starts_with('/'), "{}", attempts[0]);
    assert_eq!(argv(attempts[0]), ["true"]);

    // `exec`, with a PATH of the request's own: an entry that is missing, a
    // file without the execute bit and a directory of that name are passed
    // over as execvp passes them; as another user, that user's bits count.
    create(&env, "lookup");
    let setup = "mkdir -p /tmp/a /tmp/b/tool /tmp/c /tmp/d && \
                 printf '#!/bin/sh\\necho not-executable\\n' > /tmp/a/tool && chmod 644 /tmp/a/tool && \
                 printf '#!/bin/sh\\necho the-right-one\\n' > /tmp/c/tool && chmod 755 /tmp/c/tool && \
                 printf '#!/bin/sh\\necho owner-only\\n' > /tmp/d/tool && chmod 700 /tmp/d/tool";
    let o = env.airlock(["exec", "lookup", "--", "/bin/sh", "-c", setup]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let path = "PATH=/nonexistent:/tmp/a:/tmp/b:/tmp/c:/usr/bin:/bin";
    let o = env.airlock(["exec", "-e", path, "lookup", "--", "tool", "arg"]).output().unwrap();
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(0), "the-right-one\n"), "{}", show(&o));
    let owner_first = "PATH=/tmp/d:/tmp/c";
    let o = env.airlock(["exec", "-e", owner_first, "lookup", "--", "tool"]).output().unwrap();
    assert_eq!(stdout(&o), "owner-only\n", "{}", show(&o));
    let o = env.airlock(["exec", "-e", owner_first, "-u", "1000", "lookup", "--", "tool"]).output().unwrap();
    assert_eq!(stdout(&o), "the-right-one\n", "{}", show(&o));
    // Nothing found: execvp's own search and error, as before.
    let o = env.airlock(["exec", "-e", path, "lookup", "--", "no-such-tool"]).output().unwrap();
    assert_eq!(o.status.code(), Some(127), "{}", show(&o));
    stop(&env, "lookup");

    let records = audit_records(&env, "lookup");
    let tools = attempts_of(&records, "tool");
    let ran: Vec<&str> = tools.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(ran, ["/tmp/c/tool", "/tmp/d/tool", "/tmp/c/tool"], "{tools:#?}");
    for r in &tools {
        assert!(r.get("no_such_file").is_none(), "{r}");
        assert_eq!(argv(r)[0], "tool", "{r}");
    }
}

#[test]
fn rootless_execs_are_traced_too() {
    let Some(r) = super::rootless::setup() else { return };
    let o = r
        .airlock(&[
            "run",
            "--name",
            "rootless-trace",
            "--mode",
            "none",
            "--",
            "/bin/sh",
            "-c",
            "/bin/sh -c '/bin/echo inner'; /bin/sh -c 'exit 3'; exit 4",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    assert_eq!(stdout(&o), "inner\n");
    let o = r.airlock(&["audit", "rootless-trace", "--json"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let records: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let top = the_one(&records, "/bin/sh", "/bin/sh -c '/bin/echo inner'; /bin/sh -c 'exit 3'; exit 4");
    let inner = the_one(&records, "/bin/sh", "/bin/echo inner");
    let echo = the_one(&records, "/bin/echo", "inner");
    assert_eq!(top["ppid"], 1);
    assert_eq!(inner["ppid"], top["pid"]);
    assert_eq!(echo["ppid"], inner["pid"]);
    let codes: Vec<(i64, Value)> = of_kind(&records, "process_exit")
        .iter()
        .map(|e| (e["pid"].as_i64().unwrap(), e["code"].clone()))
        .collect();
    assert!(codes.contains(&(top["pid"].as_i64().unwrap(), serde_json::json!(4))), "{codes:?}");
    assert!(codes.contains(&(echo["pid"].as_i64().unwrap(), serde_json::json!(0))), "{codes:?}");
    assert!(codes.iter().any(|(_, c)| *c == 3), "{codes:?}");
}

/// The listener process is the only one that can answer the sandbox's
/// execs: if it dies, they fail (ENOSYS), and its end is recorded.
#[test]
fn a_killed_trace_fails_the_sandboxs_execs_closed_and_is_recorded() {
    let env = Env::new();
    create(&env, "closed");
    let o = env.airlock(["exec", "closed", "--", "/bin/true"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let tracers = pids_running("__exectrace closed");
    assert_eq!(tracers.len(), 1, "{tracers:?}");
    // Confined: its own uid as root, non-dumpable, in a mount namespace of
    // its own, CAP_SYS_PTRACE alone, a seccomp filter.
    let status = std::fs::read_to_string(format!("/proc/{}/status", tracers[0])).unwrap();
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().to_owned();
    assert_eq!(field("CapEff:"), "0000000000080000", "{status}");
    assert_eq!(field("CapBnd:"), "0000000000000000", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
    if is_root() {
        let uid = field("Uid:");
        assert!(uid.split_whitespace().all(|u| u.parse::<u32>().unwrap() >= 997_000_000), "{uid}");
    }
    let own = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    assert_ne!(std::fs::read_link(format!("/proc/{}/ns/mnt", tracers[0])).unwrap(), own);
    // Network and IPC namespaces of its own (as root made before the
    // sandbox existed, in the host's user namespace).
    for ns in ["net", "ipc"] {
        assert_ne!(
            std::fs::read_link(format!("/proc/{}/ns/{ns}", tracers[0])).unwrap(),
            std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "{ns}"
        );
    }

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(tracers[0]).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    assert!(wait_until(10, || pids_running("__exectrace closed").is_empty()));
    let o = env.airlock(["exec", "closed", "--", "/bin/true"]).output().unwrap();
    assert_ne!(o.status.code(), Some(0), "an exec nobody recorded ran: {}", show(&o));
    stop(&env, "closed");
    let records = audit_records(&env, "closed");
    let ended = of_kind(&records, "exec_trace_ended");
    assert_eq!(ended.len(), 1, "{records:#?}");
    assert_eq!(ended[0]["signal"], 9);
}
