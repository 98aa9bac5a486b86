//! The command-line contract: exit codes, streams, errors, policy commands.

use super::support::*;

#[test]
fn exit_code_and_output_are_the_commands() {
    let env = Env::new();
    let o = env.run_sh("exit-code", &[], "echo out; echo err >&2; exit 7");
    assert_eq!(o.status.code(), Some(7), "{}", show(&o));
    assert_eq!(stdout(&o), "out\n");
    assert!(stderr(&o).contains("err\n"), "{}", show(&o));
    // Both streams are kept as logs too.
    let logs = env.sandbox_dir("exit-code").join("logs");
    assert_eq!(std::fs::read_to_string(logs.join("stdout.log")).unwrap(), "out\n");
    assert_eq!(std::fs::read_to_string(logs.join("stderr.log")).unwrap(), "err\n");
}

#[test]
fn missing_command_is_127_and_non_executable_is_126() {
    let env = Env::new();
    let o = env.airlock(["run", "--rm", "--", "no-such-command-here"]).output().unwrap();
    assert_eq!(o.status.code(), Some(127), "{}", show(&o));
    std::fs::write(env.workspace.join("script.sh"), "#!/bin/sh\necho hi\n").unwrap();
    let script = env.workspace.join("script.sh");
    let o = env.airlock(["run", "--rm", "--"]).arg(&script).output().unwrap();
    assert_eq!(o.status.code(), Some(126), "{}", show(&o));
}

#[test]
fn stdin_passes_through() {
    use std::io::Write;
    let env = Env::new();
    let mut child = env
        .airlock(["run", "--rm", "--", "sh", "-c", "read line; echo got:$line"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"ping\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(stdout(&o), "got:ping\n", "{}", show(&o));
}

#[test]
fn airlock_failure_is_125_with_an_explanation() {
    let env = Env::new();
    let o = env.airlock(["run", "--policy", "no-such-policy", "--", "true"]).output().unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("no-such-policy"), "{}", show(&o));

    let o = env.airlock(["run", "--name", "Bad/Name", "--", "true"]).output().unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
}

#[test]
fn flags_cannot_raise_limits_the_policy_fixes() {
    let env = Env::new();
    let o = env.airlock(["run", "--policy", "ci", "--timeout", "99h", "--", "true"]).output().unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(stderr(&o).contains("timeout"), "{}", show(&o));
}

/// The least trusted profiles get a kernel of their own: on a host whose KVM
/// cannot run them (this development machine and its CI) they are refused
/// with the case and the fix, and no flag moves them to the process tier.
#[test]
fn plugin_and_remediation_run_only_in_a_microvm() {
    let env = Env::new();
    for name in ["plugin", "remediation"] {
        let o = env.airlock(["run", "--policy", name, "--tier", "process", "--", "true"]).output().unwrap();
        assert_eq!(o.status.code(), Some(125), "{}", show(&o));
        assert!(stderr(&o).contains("requires the microvm tier"), "{}", show(&o));

        let o = env.airlock(["run", "--policy", name, "--", "cat", "/proc/1/cmdline"]).output().unwrap();
        if o.status.code() == Some(125) {
            let err = stderr(&o);
            assert!(
                err.contains(&format!("policy {name} runs on the microvm tier, which needs KVM")),
                "{err}"
            );
            assert!(err.contains("fix:") && err.contains("allow_weaker"), "{err}");
        } else {
            // A host whose KVM works: PID 1 is the guest's init.
            assert_eq!(o.status.code(), Some(0), "{}", show(&o));
            assert!(stdout(&o).contains("__vm-init"), "{}", show(&o));
        }
    }
}

#[test]
fn policy_commands() {
    let env = Env::new();
    let o = env.airlock(["policy", "ls"]).output().unwrap();
    for name in ["dev", "ci", "plugin", "remediation"] {
        assert!(stdout(&o).contains(name), "{}", show(&o));
    }
    let o = env.airlock(["policy", "show", "plugin"]).output().unwrap();
    assert!(stdout(&o).contains("[workspace]"), "{}", show(&o));

    let file = env.dir.path().join("mine.toml");
    std::fs::write(&file, "extends = \"ci\"\n[limits]\ntimout = \"5m\"\n").unwrap();
    let o = env.airlock(["policy", "check"]).arg(&file).output().unwrap();
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(err.contains("mine.toml:3") && err.contains("timout"), "{}", show(&o));

    std::fs::write(&file, "extends = \"ci\"\n[limits]\ntimeout = \"5m\"\n").unwrap();
    let o = env.airlock(["policy", "check"]).arg(&file).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

#[test]
fn doctor_reports_every_check_as_json() {
    let env = Env::new();
    let o = env.airlock(["doctor", "--json"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids: Vec<&str> =
        report["checks"].as_array().unwrap().iter().filter_map(|c| c["id"].as_str()).collect();
    for id in ["user-namespaces", "seccomp", "landlock", "cgroup-memory", "overlayfs-in-userns"] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    // The verdict per feature a policy may require, as run and create plan by.
    let ok =
        |id: &str| report["checks"].as_array().unwrap().iter().any(|c| c["id"] == id && c["status"] == "ok");
    assert_eq!(report["enforces"]["landlock"], ok("landlock"), "{report}");
    assert_eq!(report["enforces"]["disk-quota"], ok("disk-quota"), "{report}");
    let cgroups = ok("cgroup-memory") && ok("cgroup-pids") && ok("cgroup-cpu");
    assert_eq!(report["enforces"]["cgroups"], cgroups, "{report}");
    let text = env.airlock(["doctor"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("features a policy may require"),
        "{}",
        show(&text)
    );
}

#[test]
fn ls_lists_and_rm_removes() {
    let env = Env::new();
    let o = env.run_sh("listed", &[], "true");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = env.airlock(["ls", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let entry = list.as_array().unwrap().iter().find(|s| s["name"] == "listed").unwrap();
    assert_eq!(entry["state"], "stopped");
    assert_eq!(entry["lost"], false);
    assert_eq!(entry["exit"]["code"], 0);
    let o = env.airlock(["rm", "listed"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!env.sandbox_dir("listed").exists());
}

#[test]
fn audit_trail_records_the_life_of_a_sandbox() {
    let env = Env::new();
    let o = env.run_sh("audited", &[], "echo change >> README; exit 3");
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    let audit = std::fs::read_to_string(env.sandbox_dir("audited").join("audit.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // Its life, in order; between them the exec trace's records of what
    // ran inside (`suite::exec_trace` looks at those).
    let life: Vec<&serde_json::Value> =
        events.iter().filter(|e| !e["event"].as_str().unwrap_or_default().starts_with("process_")).collect();
    let kinds: Vec<&str> = life.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(
        kinds,
        ["created", "command_started", "exited", "diff_summary", "workspace_changed"],
        "{audit}"
    );
    assert_eq!(life[2]["code"], 3);
    assert_eq!(life[3]["modified"], 1);
    assert!(life[3]["digest"].as_str().unwrap().starts_with("sha256:"), "{audit}");
    // Each changed path, with the size and hash of its new content.
    assert_eq!(life[4]["path"], "README");
    assert_eq!(life[4]["kind"], "modified");
    assert_eq!(life[4]["size"], 13);
    assert_eq!(life[4]["sha256"].as_str().unwrap().len(), 64);
    let ran = events.iter().filter(|e| e["event"] == "process_exec" && e.get("no_such_file").is_none());
    assert_eq!(ran.count(), 1, "sh, and nothing else: {audit}");
    // The resolved policy is kept beside it.
    let policy = std::fs::read_to_string(env.sandbox_dir("audited").join("policy.toml")).unwrap();
    assert!(policy.contains("[limits]"));
}
