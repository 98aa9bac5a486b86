//! The audit timeline of real sandboxes (issue 13, points 3, 4, 5 and 7):
//! one chained log `airlock audit verify` holds to its head, export
//! bundles checked without the state directory, and secret values kept
//! out of the log, the state directory and the bundle.

use std::io::Read;
use std::path::Path;

use serde_json::Value;

use super::support::*;

/// A finished sandbox with a few events: created, started, exited, the
/// change's summary and one event per changed path.
fn finished(env: &Env, name: &str) {
    let o = env.run_sh(name, &[], "echo new > added.txt; echo more >> README; rm src/lib.c; echo done");
    assert!(o.status.success(), "{}", show(&o));
}

fn verify(env: &Env, name: &str) -> std::process::Output {
    env.airlock(["audit", "verify", name]).output().unwrap()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// `verify` fails (exit 1) and its report names `needle`.
fn fails_naming(env: &Env, name: &str, what: &str, needle: &str) {
    let o = verify(env, name);
    assert_eq!(o.status.code(), Some(1), "{what}: {}", show(&o));
    assert!(
        stdout(&o).contains("NOT INTACT") && stdout(&o).contains(needle),
        "{what}: wants {needle:?}: {}",
        show(&o)
    );
}

#[test]
fn verify_names_an_edited_truncated_reordered_or_removed_event() {
    let env = Env::new();
    finished(&env, "chained");
    let log = env.sandbox_dir("chained").join("audit.jsonl");
    let original = lines(&log);
    assert!(original.len() >= 6, "{original:?}");
    let kinds: Vec<String> = original
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].as_str().unwrap().to_owned())
        .collect();
    // The sandbox's life in order (the exec trace's process_* records of
    // what ran inside sit between its events).
    let life: Vec<&String> = kinds.iter().filter(|k| !k.starts_with("process_")).collect();
    assert_eq!(&life[..4], ["created", "command_started", "exited", "diff_summary"], "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "process_exec"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| *k == "workspace_changed").count(), 3, "{kinds:?}");
    let o = verify(&env, "chained");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains(&format!("intact: {} events", original.len())), "{}", show(&o));

    // The person's timeline and the exact records.
    let o = env.airlock(["audit", "chained"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    assert!(stdout(&o).contains("workspace_changed  added added.txt"), "{}", show(&o));
    assert!(stdout(&o).contains("deleted src/lib.c"), "{}", show(&o));
    let o = env.airlock(["audit", "chained", "--json"]).output().unwrap();
    assert_eq!(stdout(&o).lines().map(str::to_owned).collect::<Vec<_>>(), original);

    // Hand-edited: the exit code of the command, a valid record still.
    let exited = kinds.iter().position(|k| k == "exited").unwrap();
    let mut edited = original.clone();
    edited[exited] = edited[exited].replace("\"code\":0", "\"code\":1");
    assert_ne!(edited[exited], original[exited]);
    write_lines(&log, &edited);
    let line = exited + 1;
    fails_naming(&env, "chained", "edited", &format!("event seq {line} (line {line}) was edited"));

    // Truncated: the last two records cut off.
    write_lines(&log, &original[..original.len() - 2]);
    let last = original.len();
    fails_naming(
        &env,
        "chained",
        "truncated",
        &format!("records seq {last}: the last 2 events were removed"),
    );

    // Reordered.
    let mut reordered = original.clone();
    reordered.swap(1, 2);
    write_lines(&log, &reordered);
    fails_naming(&env, "chained", "reordered", "event seq 3 (line 2) follows seq 1");

    // A line removed.
    let mut removed = original.clone();
    removed.remove(1);
    write_lines(&log, &removed);
    fails_naming(&env, "chained", "removed", "event seq 2 was removed");

    // Put back: intact again.
    write_lines(&log, &original);
    assert_eq!(verify(&env, "chained").status.code(), Some(0));

    // A log written before the chain (no v, no prev, no head) still reads,
    // and verify says it predates the chain rather than calling it tampered.
    let legacy: Vec<String> = original
        .iter()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let map = v.as_object_mut().unwrap();
            map.remove("v");
            map.remove("prev");
            v.to_string()
        })
        .collect();
    write_lines(&log, &legacy);
    std::fs::remove_file(log.with_extension("head")).unwrap();
    let o = verify(&env, "chained");
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(stdout(&o).contains("written before airlock chained its audit logs"), "{}", show(&o));
    let o = env.airlock(["audit", "chained"]).output().unwrap();
    assert!(o.status.success() && stdout(&o).contains("command_started"), "{}", show(&o));
    // An event recorded now chains on to the old ones.
    let o = env.airlock(["rm", "chained"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
}

/// Every byte of a bundle's members, uncompressed (the tar stream).
fn bundle_bytes(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(std::fs::File::open(path).unwrap())
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn an_export_verifies_after_the_state_directory_is_gone_and_a_changed_one_does_not() {
    let env = Env::new();
    finished(&env, "exported");
    let bundle = env.dir.path().join("exported.tar.zst");
    let o = env.airlock(["export", "exported", "-o"]).arg(&bundle).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let o = env.airlock(["audit", "key"]).output().unwrap();
    let key = stdout(&o).trim().to_owned();
    assert!(key.starts_with("ed25519:") && key.len() == 8 + 64, "{key}");
    let timeline = stdout(&env.airlock(["audit", "exported", "--json"]).output().unwrap());

    // Elsewhere: no state directory at all.
    std::fs::remove_dir_all(&env.state).unwrap();
    let o = env.airlock(["audit", "verify", "--bundle"]).arg(&bundle).args(["--key", &key]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        stdout(&o).contains("signature valid") && stdout(&o).contains("its audit log: intact"),
        "{}",
        show(&o)
    );
    let o = env.airlock(["audit", "--json", "--bundle"]).arg(&bundle).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(stdout(&o), timeline);
    assert!(!env.state.exists(), "reading a bundle made no state directory");
    let o = env.airlock(["audit", "verify", "--bundle"]).arg(&bundle).output().unwrap();
    let v: Value = serde_json::from_slice(
        &env.airlock(["audit", "verify", "--json", "--bundle"]).arg(&bundle).output().unwrap().stdout,
    )
    .unwrap();
    assert_eq!(v["verified"], true, "{}", show(&o));
    let members: Vec<&str> =
        v["manifest"]["members"].as_array().unwrap().iter().map(|m| m["path"].as_str().unwrap()).collect();
    for want in [
        "meta.json",
        "policy.toml",
        "audit.jsonl",
        "audit.head",
        "net.jsonl",
        "logs/stdout.log",
        "diff.json",
        "diff.patch",
    ] {
        assert!(members.contains(&want), "{want} not in {members:?}");
    }

    // The report, from the bundle alone: the timeline, the diff with its
    // text, the policy.
    let page = env.dir.path().join("exported.html");
    let o = env
        .airlock(["report", "--bundle"])
        .arg(&bundle)
        .args(["--key", &key, "-o"])
        .arg(&page)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let html = std::fs::read_to_string(&page).unwrap();
    for want in ["exported", "added.txt", "+new", "+more", "src/lib.c", "echo done", "from an export bundle"]
    {
        assert!(html.contains(want), "the bundle's report has no {want:?}");
    }
    assert!(html.contains("limits"), "the bundle's report shows the policy's limits");
    assert!(!env.state.exists(), "a report from a bundle made no state directory");

    // Another host's key is not this one.
    let other = format!("ed25519:{}", "0".repeat(64));
    let o =
        env.airlock(["audit", "verify", "--bundle"]).arg(&bundle).args(["--key", &other]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(stderr(&o).contains("not by the key required"), "{}", show(&o));

    // A byte changed anywhere: refused, whatever it hit.
    let mut bytes = std::fs::read(&bundle).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    let changed = env.dir.path().join("changed.tar.zst");
    std::fs::write(&changed, &bytes).unwrap();
    for args in [
        &["audit", "verify", "--bundle"][..],
        &["audit", "--bundle"][..],
        &["report", "-o", "-", "--bundle"][..],
    ] {
        let o = env.airlock(args).arg(&changed).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", show(&o));
        assert!(stderr(&o).contains("bundle"), "{}", show(&o));
    }
}

#[test]
fn secret_values_in_argv_and_env_stay_out_of_the_audit_log_state_bundle_and_report() {
    let env = Env::new();
    let value = "s3cr3t-6f1d2c9e-value";
    let policy = env.dir.path().join("secrets.toml");
    std::fs::write(
        &policy,
        "extends = \"dev\"\n[secrets.EXAMPLE_TOKEN]\nfrom = \"env:EXAMPLE_TOKEN\"\nhosts = [\"api.example.com\"]\n",
    )
    .unwrap();
    // The host's own workspace holds the value too: the diff's context.
    std::fs::write(env.workspace.join("config.txt"), format!("token = {value}\nkeep\n")).unwrap();
    let policy = policy.to_str().unwrap();
    let o = env
        .airlock(["run", "--name", "leaky", "--policy", policy, "--env", &format!("LEAK={value}"), "--"])
        .args([
            "sh",
            "-c",
            &format!("echo \"$LEAK\" > leaked.txt; echo changed >> config.txt; echo {value}; exit 3"),
        ])
        .env("EXAMPLE_TOKEN", value)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(!stdout(&o).contains(value), "{}", show(&o));

    // Long-lived: an exec's argv and environment.
    let o = env
        .airlock(["create", "--name", "leaky-ll", "--policy", policy])
        .env("EXAMPLE_TOKEN", value)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let o = env
        .airlock([
            "exec",
            "-e",
            &format!("LEAK={value}"),
            "leaky-ll",
            "--",
            "sh",
            "-c",
            &format!("echo {value} \"$LEAK\""),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let o = env.airlock(["stop", "leaky-ll"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));

    for name in ["leaky", "leaky-ll"] {
        let dir = env.sandbox_dir(name);
        let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
        assert!(
            audit.contains("[REDACTED:EXAMPLE_TOKEN]"),
            "{name}: the argv is recorded, redacted: {audit}"
        );
        for file in ["audit.jsonl", "meta.json", "policy.toml", "logs/stdout.log"] {
            let text = std::fs::read(dir.join(file)).unwrap();
            assert!(!contains(&text, value.as_bytes()), "{name}: the value is in {file}");
        }
        let bundle = env.dir.path().join(format!("{name}.tar.zst"));
        let o = env.airlock(["export", name, "-o"]).arg(&bundle).output().unwrap();
        assert!(o.status.success(), "{}", show(&o));
        let bytes = bundle_bytes(&bundle);
        assert!(!contains(&bytes, value.as_bytes()), "{name}: the value is in the bundle");
        assert!(contains(&bytes, b"[REDACTED:EXAMPLE_TOKEN]"), "{name}: nothing redacted?");
        let o = env.airlock(["audit", "verify", "--bundle"]).arg(&bundle).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        // The report, from the state directory and from the bundle.
        for source in [["report", name], ["report", "--bundle"]] {
            let page = env.dir.path().join(format!("{name}-{}.html", source[1].trim_start_matches('-')));
            let mut cmd = env.airlock(source);
            if source[1] == "--bundle" {
                cmd.arg(&bundle);
            }
            let o = cmd.arg("-o").arg(&page).output().unwrap();
            assert!(o.status.success(), "{}", show(&o));
            let html = std::fs::read(&page).unwrap();
            assert!(!contains(&html, value.as_bytes()), "{name}: the value is in the report ({source:?})");
            assert!(
                contains(&html, b"[REDACTED:EXAMPLE_TOKEN]"),
                "{name}: the report shows the redacted argv"
            );
        }
    }
    // The run's diff in its bundle: the workspace's line holding the value
    // is there, redacted.
    let bytes = bundle_bytes(&env.dir.path().join("leaky.tar.zst"));
    assert!(contains(&bytes, b"token = [REDACTED:EXAMPLE_TOKEN]"), "the redacted patch is what is exported");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A daemon copies each sandbox's audit head into its index; a log
/// rewritten from the start with a fresh head of its own (all a writer of
/// the sandbox's directory could do) still fails against that copy.
#[test]
fn the_daemons_record_of_the_head_catches_a_log_rewritten_with_its_head() {
    use super::daemon_harness::TestDaemon;
    let d = TestDaemon::start("audit-head");
    let (status, created) = d.json("POST", "/v1/sandboxes", Some(serde_json::json!({ "name": "headed" })));
    assert_eq!(status, 201, "{created}");
    for argv in [["true"], ["false"]] {
        let (status, out) = d.request(
            "POST",
            "/v1/sandboxes/headed/exec",
            Some(&serde_json::json!({ "argv": argv }).to_string()),
        );
        assert_eq!(status, 200, "{out}");
    }
    let (status, out) = d.request("POST", "/v1/sandboxes/headed/stop", None);
    assert_eq!(status, 200, "{out}");
    let log = d.env.sandbox_dir("headed").join("audit.jsonl");
    let written = lines(&log).len();
    let verify = || d.env.airlock(["--direct", "audit", "verify", "headed"]).output().unwrap();
    // The reconcile pass (every 5 s) records the head once it changed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let recorded = format!("head seq {written} recorded by the daemon's index: holds");
    while !stdout(&verify()).contains(&recorded) {
        assert!(std::time::Instant::now() < deadline, "never recorded: {}", show(&verify()));
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert_eq!(verify().status.code(), Some(0), "{}", show(&verify()));

    // Cut back to its first two events, the head file made to match: the
    // log and the head beside it agree, the daemon's copy does not.
    let kept: Vec<String> = lines(&log)[..2].to_vec();
    write_lines(&log, &kept);
    let out = std::process::Command::new("sha256sum")
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(kept[1].as_bytes())?;
            c.wait_with_output()
        });
    let hash = String::from_utf8(out.unwrap().stdout).unwrap()[..64].to_owned();
    let head = format!("{{\"v\":2,\"seq\":2,\"hash\":\"{hash}\"}}");
    std::fs::write(log.with_extension("head"), format!("{head:<127}\n")).unwrap();
    let o = verify();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stdout(&o).contains(&format!(
            "the log ends at event seq 2 (line 2) but the daemon's index records seq {written}"
        )),
        "{}",
        show(&o)
    );
    assert!(
        stdout(&o).contains("head seq 2 recorded by the head beside it (audit.head): holds"),
        "{}",
        show(&o)
    );
    assert!(d.remove_all_and_settle(60).is_empty());
}
