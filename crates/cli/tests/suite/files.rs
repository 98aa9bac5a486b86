//! Typed file operations (`airlock cp`, `airlock files …`) against real
//! sandboxes, directly and through a daemon: every operation is done by the
//! sandbox's agent, so none needs a program inside the sandbox.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use super::daemon_harness::TestDaemon;
use super::support::*;

/// `airlock …` directly, or through `daemon` when given.
fn cli(env: &Env, daemon: Option<&TestDaemon>, args: &[&str]) -> Command {
    let mut cmd = env.airlock(args);
    if let Some(d) = daemon {
        cmd.env("AIRLOCK_SOCKET", &d.socket).env("AIRLOCK_CGROUP_PARENT", &d.cgroup_parent);
    }
    cmd
}

fn run(env: &Env, daemon: Option<&TestDaemon>, args: &[&str]) -> Output {
    cli(env, daemon, args).output().unwrap()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", show(&o));
    stdout(&o)
}

fn json(o: Output) -> Value {
    serde_json::from_str(&ok(o)).unwrap()
}

fn names(listing: &Value) -> Vec<String> {
    listing["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_owned()).collect()
}

/// Every operation on one sandbox, the same way whoever answers.
fn every_operation(env: &Env, daemon: Option<&TestDaemon>, name: &str) {
    let at = |path: &str| format!("{name}:{path}");
    // mkdir (with parents and a mode), a new file's mode, cp both ways.
    ok(run(env, daemon, &["files", "mkdir", "-p", "--mode", "750", &at("/tmp/a/b/c")]));
    let o = run(env, daemon, &["files", "mkdir", &at("/tmp/a/b/c")]);
    assert!(!o.status.success() && stderr(&o).contains("already exists"), "{}", show(&o));
    let o = run(env, daemon, &["files", "mkdir", &at("/tmp/x/y")]);
    assert!(!o.status.success() && stderr(&o).contains("does not exist"), "{}", show(&o));
    let source = env.dir.path().join("source.bin");
    let content: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    std::fs::write(&source, &content).unwrap();
    std::fs::set_permissions(&source, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    ok(run(env, daemon, &["cp", &source.display().to_string(), &at("/tmp/a/b/c/")]));
    let stat = json(run(env, daemon, &["files", "stat", "--json", &at("/tmp/a/b/c/source.bin")]));
    assert_eq!(
        (stat["type"].as_str(), stat["size"].as_u64(), stat["mode"].as_u64()),
        (Some("file"), Some(300_000), Some(0o640)),
        "{stat}"
    );
    let dir = json(run(env, daemon, &["files", "stat", "--json", &at("/tmp/a/b/c")]));
    assert_eq!((dir["type"].as_str(), dir["mode"].as_u64()), (Some("dir"), Some(0o750)), "{dir}");
    let back = env.dir.path().join("back.bin");
    ok(run(env, daemon, &["cp", &at("/tmp/a/b/c/source.bin"), &back.display().to_string()]));
    assert!(std::fs::read(&back).unwrap() == content, "the copy out differs");

    // list, to a depth, with a cap.
    let listing = json(run(env, daemon, &["files", "ls", "--json", "--depth", "5", &at("/tmp/a")]));
    assert_eq!(names(&listing), ["b", "b/c", "b/c/source.bin"], "{listing}");
    assert_eq!(listing["truncated"], false);
    let capped =
        json(run(env, daemon, &["files", "ls", "--json", "--depth", "5", "--max", "2", &at("/tmp/a")]));
    assert_eq!((names(&capped).len(), &capped["truncated"]), (2, &Value::Bool(true)), "{capped}");
    let text = ok(run(env, daemon, &["files", "ls", &at("/tmp/a/b/c")]));
    assert!(text.starts_with("-rw-r-----") && text.trim_end().ends_with(" source.bin"), "{text}");

    // rename, refusing to replace when asked.
    ok(run(env, daemon, &["cp", &source.display().to_string(), &at("/tmp/a/other")]));
    let o = run(env, daemon, &["files", "mv", "--no-replace", &at("/tmp/a/other"), "/tmp/a/b/c/source.bin"]);
    assert!(!o.status.success() && stderr(&o).contains("already exists"), "{}", show(&o));
    ok(run(env, daemon, &["files", "mv", &at("/tmp/a/other"), "/tmp/a/renamed"]));
    let listing = json(run(env, daemon, &["files", "ls", "--json", &at("/tmp/a")]));
    assert_eq!(names(&listing), ["b", "renamed"], "{listing}");

    // remove: a file, a non-empty directory only when recursive.
    ok(run(env, daemon, &["files", "rm", &at("/tmp/a/renamed")]));
    let o = run(env, daemon, &["files", "rm", &at("/tmp/a/b")]);
    assert!(!o.status.success() && stderr(&o).contains("not empty"), "{}", show(&o));
    ok(run(env, daemon, &["files", "rm", "-r", &at("/tmp/a")]));
    let o = run(env, daemon, &["files", "stat", &at("/tmp/a")]);
    assert!(!o.status.success() && stderr(&o).contains("no file /tmp/a"), "{}", show(&o));
}

#[test]
fn every_operation_directly_and_through_the_daemon() {
    let env = Env::new();
    ok(run(&env, None, &["create", "--name", "fdirect"]));
    every_operation(&env, None, "fdirect");
    let _ = run(&env, None, &["rm", "fdirect"]);

    let d = TestDaemon::start("files-cli");
    ok(run(&d.env, Some(&d), &["create", "--name", "fdaemon"]));
    every_operation(&d.env, Some(&d), "fdaemon");
    let _ = run(&d.env, Some(&d), &["rm", "fdaemon"]);
}

/// A policy whose root holds only libraries: no shell, no coreutils.
fn libraries_only(env: &Env) -> String {
    let path = env.dir.path().join("libs-only.toml");
    std::fs::write(
        &path,
        "extends = \"dev\"\n\n[filesystem]\nread_only = [\"/usr/lib\", \"/usr/lib64\", \"/lib\", \"/lib64\"]\n",
    )
    .unwrap();
    path.display().to_string()
}

#[test]
fn a_sandbox_whose_root_holds_only_libraries_still_has_its_files() {
    let env = Env::new();
    let policy = libraries_only(&env);
    ok(run(&env, None, &["create", "--name", "bare", "--policy", &policy]));
    // Nothing to run inside: no shell, no cat, no cp.
    for tool in ["sh", "cat", "/bin/sh", "/usr/bin/env"] {
        let o = run(&env, None, &["exec", "bare", "--", tool, "-c", "true"]);
        assert_eq!(o.status.code(), Some(127), "{tool} exists inside: {}", show(&o));
    }
    let listing = json(run(&env, None, &["files", "ls", "--json", "bare:/usr"]));
    assert!(!names(&listing).iter().any(|n| n == "bin"), "{listing}");

    let source = env.dir.path().join("in.txt");
    std::fs::write(&source, "into a bare sandbox\n").unwrap();
    ok(run(&env, None, &["files", "mkdir", "-p", "bare:/tmp/work/deep"]));
    ok(run(&env, None, &["cp", &source.display().to_string(), "bare:/tmp/work/deep/in.txt"]));
    ok(run(&env, None, &["files", "mv", "bare:/tmp/work/deep/in.txt", "/tmp/work/moved.txt"]));
    let stat = json(run(&env, None, &["files", "stat", "--json", "bare:/tmp/work/moved.txt"]));
    assert_eq!(stat["size"], 20, "{stat}");
    let out = env.dir.path().join("out.txt");
    ok(run(&env, None, &["cp", "bare:/tmp/work/moved.txt", &out.display().to_string()]));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "into a bare sandbox\n");
    let listing = json(run(&env, None, &["files", "ls", "--json", "--depth", "3", "bare:/tmp/work"]));
    assert_eq!(names(&listing), ["deep", "moved.txt"], "{listing}");
    ok(run(&env, None, &["files", "rm", "-r", "bare:/tmp/work"]));
    let listing = json(run(&env, None, &["files", "ls", "--json", "bare:/tmp"]));
    assert!(names(&listing).is_empty(), "{listing}");
    let _ = run(&env, None, &["rm", "bare"]);
}

/// A write that breaks off (here: the sandbox's /tmp fills up half way)
/// leaves the old file as it was and no temporary file behind.
#[test]
fn a_write_that_breaks_off_leaves_the_old_file_and_nothing_else() {
    let env = Env::new();
    let policy = env.dir.path().join("small-tmp.toml");
    std::fs::write(&policy, "extends = \"dev\"\n\n[filesystem]\ntmp_size = \"2M\"\n").unwrap();
    ok(run(&env, None, &["create", "--name", "full", "--policy", &policy.display().to_string()]));
    let old = env.dir.path().join("old.txt");
    std::fs::write(&old, "the old file\n").unwrap();
    ok(run(&env, None, &["cp", &old.display().to_string(), "full:/tmp/target"]));
    ok(run(&env, None, &["exec", "full", "--", "chmod", "604", "/tmp/target"]));
    let big = env.dir.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 3 << 20]).unwrap();
    let o = run(&env, None, &["cp", &big.display().to_string(), "full:/tmp/target"]);
    assert!(!o.status.success(), "{}", show(&o));
    assert!(stderr(&o).contains("/tmp/target"), "{}", show(&o));
    let listing = json(run(&env, None, &["files", "ls", "--json", "full:/tmp"]));
    assert_eq!(names(&listing), ["target"], "a temporary file was left: {listing}");
    let back = env.dir.path().join("back.txt");
    ok(run(&env, None, &["cp", "full:/tmp/target", &back.display().to_string()]));
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "the old file\n");
    // A complete replacement keeps the mode it had.
    ok(run(&env, None, &["cp", &old.display().to_string(), "full:/tmp/target"]));
    let stat = json(run(&env, None, &["files", "stat", "--json", "full:/tmp/target"]));
    assert_eq!(stat["mode"], 0o604, "{stat}");
    let _ = run(&env, None, &["rm", "full"]);
}

#[test]
fn hostile_names_are_shown_escaped_and_symlinks_are_never_followed() {
    let env = Env::new();
    ok(run(&env, None, &["create", "--name", "names"]));
    let setup = "mkdir -p /tmp/h /tmp/outside/keep && echo kept > /tmp/outside/keep/file \
                 && touch \"/tmp/h/$(printf 'evil\\n\\033[2Jname')\" \"/tmp/h/$(printf 'bad\\377')\" \
                 && ln -s /tmp/outside /tmp/h/link";
    ok(run(&env, None, &["exec", "names", "--", "sh", "-c", setup]));

    let text = ok(run(&env, None, &["files", "ls", "--depth", "4", "names:/tmp/h"]));
    assert!(!text.contains('\x1b'), "an escape code reached the terminal: {text:?}");
    assert_eq!(text.lines().count(), 3, "one line per entry, whatever the names hold: {text:?}");
    assert!(text.contains(r#""evil\n\033[2Jname""#), "{text}");
    assert!(text.contains(r#""bad\377""#), "{text}");
    assert!(text.contains("link -> /tmp/outside"), "{text}");
    assert!(!text.contains("keep"), "the listing went through the link: {text}");
    let listing = json(run(&env, None, &["files", "ls", "--json", "names:/tmp/h"]));
    let bad = listing["entries"].as_array().unwrap().iter().find(|e| e["name_b64"].is_string()).unwrap();
    assert_eq!(bad["name_b64"], "YmFk/w==", "{listing}");

    let stat = json(run(&env, None, &["files", "stat", "--json", "names:/tmp/h/link"]));
    assert_eq!(
        (stat["type"].as_str(), stat["link_target"].as_str()),
        (Some("symlink"), Some("/tmp/outside"))
    );
    // Removing the link (even recursively, even the whole directory)
    // removes the link, never what it points to.
    ok(run(&env, None, &["files", "rm", "-r", "names:/tmp/h"]));
    let kept = ok(run(&env, None, &["exec", "names", "--", "cat", "/tmp/outside/keep/file"]));
    assert_eq!(kept, "kept\n");
    let _ = run(&env, None, &["rm", "names"]);
}

/// Reads `watch` lines until one satisfies `want` (or the stream ends).
fn wait_for_line(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    want: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = want(&line);
        seen.push(line);
        if done {
            break;
        }
    }
    seen
}

fn watch_sees_an_exec(env: &Env, daemon: Option<&TestDaemon>, name: &str) {
    ok(run(env, daemon, &["exec", name, "--", "mkdir", "-p", "/tmp/w/sub"]));
    let mut watch = cli(env, daemon, &["files", "watch", "-r", &format!("{name}:/tmp/w")])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = wait_for_line(&mut lines, |_| true);
    assert_eq!(first, ["watching"]);
    ok(run(
        env,
        daemon,
        &[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "echo x > /tmp/w/sub/made; mv /tmp/w/sub/made /tmp/w/moved; printf 'y\\033' > \"/tmp/w/$(printf 'n\\033[1m')\"",
        ],
    ));
    let seen = wait_for_line(&mut lines, |l| l.starts_with("created \"n"));
    let _ = watch.kill();
    let _ = watch.wait();
    for want in ["created sub/made", "renamed_from sub/made", "renamed_to moved", r#"created "n\033[1m""#] {
        assert!(seen.iter().any(|l| l == want), "no {want:?} in {seen:?}");
    }
    assert!(!seen.iter().any(|l| l.contains('\x1b')), "{seen:?}");
}

#[test]
fn watch_sees_files_an_exec_makes_directly_and_through_the_daemon() {
    let env = Env::new();
    ok(run(&env, None, &["create", "--name", "watched"]));
    watch_sees_an_exec(&env, None, "watched");
    let _ = run(&env, None, &["rm", "watched"]);

    let d = TestDaemon::start("files-watch");
    ok(run(&d.env, Some(&d), &["create", "--name", "watched"]));
    watch_sees_an_exec(&d.env, Some(&d), "watched");
    let _ = run(&d.env, Some(&d), &["rm", "watched"]);
}
