//! The same guarantees when airlock runs as an ordinary user (rootless): the
//! test binary, when root, re-runs airlock as the `airlock-test` user that
//! `scripts/test.sh` creates.

use std::os::unix::fs::chown;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use super::support::*;

const USER: &str = "airlock-test";

pub(super) struct Rootless {
    pub(super) env: Env,
    pub(super) uid: u32,
}

fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

pub(super) fn chown_tree(path: &Path, uid: u32, gid: u32) {
    chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid, gid);
        }
    }
}

/// A test environment owned by the unprivileged user, or None (skipped).
pub(super) fn setup() -> Option<Rootless> {
    let env = Env::new();
    if !is_root() {
        // Already unprivileged: the whole suite is the rootless run.
        return Some(Rootless { uid: rustix::process::getuid().as_raw(), env });
    }
    let ids = user_ids(USER);
    if !require(ids.is_some(), "the user airlock-test (created by scripts/test.sh)") {
        return None;
    }
    let (uid, gid) = ids?;
    std::fs::create_dir_all(&env.state).unwrap();
    chown_tree(env.dir.path(), uid, gid);
    Some(Rootless { env, uid })
}

impl Rootless {
    pub(super) fn airlock(&self, args: &[&str]) -> Command {
        let mut cmd = if is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", USER, "--regid", USER, "--init-groups", "--"]).arg(public_bin());
            c.env("HOME", format!("/home/{USER}"));
            c
        } else {
            Command::new(BIN)
        };
        cmd.args(args)
            .env("AIRLOCK_STATE_DIR", &self.env.state)
            .current_dir(&self.env.workspace)
            .stdin(Stdio::null());
        cmd
    }

    fn run_sh(&self, name: &str, extra: &[&str], script: &str) -> Output {
        let mut args = vec!["run", "--name", name];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", script]);
        self.airlock(&args).output().unwrap()
    }
}

#[test]
fn rootless_run_confines_and_keeps_changes_for_review() {
    let Some(r) = setup() else { return };
    let outside = r.env.dir.path().join("outside-file");
    let script = format!(
        "id -u; cat /proc/self/uid_map; grep CapEff /proc/self/status; \
         echo patched >> src/lib.c; (echo pwned > {}) 2>/dev/null; (echo x > /etc/evil) 2>/dev/null; \
         echo procs:$(ls -d /proc/[0-9]* | wc -l); \
         echo oom:$(cat /proc/1/oom_score_adj),$(cat /proc/self/oom_score_adj); exit 5",
        outside.display()
    );
    let o = r.run_sh("rootless", &[], &script);
    assert_eq!(o.status.code(), Some(5), "{}", show(&o));
    let out = stdout(&o);
    assert!(out.starts_with("0\n"), "{}", show(&o));
    // Root inside is the unprivileged user outside.
    let map: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(map, ["0", &r.uid.to_string(), "1"], "{}", show(&o));
    assert!(out.contains("CapEff:\t0000000000000000"), "{}", show(&o));
    assert!(!outside.exists());
    assert!(!Path::new("/etc/evil").exists());
    let procs: usize = out.lines().find_map(|l| l.strip_prefix("procs:")).unwrap().trim().parse().unwrap();
    assert!(procs < 10, "{}", show(&o));
    // Raising a score takes no privilege: the OOM killer prefers the
    // command to the agent in a rootless sandbox too.
    assert!(out.contains("oom:0,500\n"), "{}", show(&o));
    // Without root there are no cgroups or disk quota: dev allows running
    // weaker, and says so.
    if is_root() {
        assert!(stderr(&o).contains("running weaker"), "{}", show(&o));
    }
    assert_eq!(std::fs::read_to_string(r.env.workspace.join("src/lib.c")).unwrap(), "int x;\n");

    let o = r.airlock(&["diff", "rootless", "--stat"]).output().unwrap();
    assert!(stdout(&o).contains("src/lib.c"), "{}", show(&o));
    let o = r.airlock(&["apply", "rootless", "--yes"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(std::fs::read_to_string(r.env.workspace.join("src/lib.c")).unwrap(), "int x;\npatched\n");
}

#[test]
fn rootless_refuses_a_policy_that_needs_what_it_lacks() {
    // Whether an ordinary user has cgroups depends on the host's
    // delegation; as root the test knows its airlock-test user has none.
    if !require(is_root(), "root, to run airlock as a user without delegated cgroups") {
        return;
    }
    let Some(r) = setup() else { return };
    let o = r.run_sh("strict", &["--policy", "ci"], "true");
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(stderr(&o).contains("cgroups") && stderr(&o).contains("airlock doctor"), "{}", show(&o));
    // `create` decides in the supervisor's child, and says it the same way.
    let created = r.airlock(&["create", "--name", "strict-ll", "--policy", "ci"]).output().unwrap();
    assert_eq!(created.status.code(), Some(125), "{}", show(&created));
    assert_eq!(stderr(&created), stderr(&o), "{}", show(&created));
}

#[test]
fn rootless_time_limit_and_network() {
    let Some(r) = setup() else { return };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let token = "sleep 4242.4203";
    let script = format!("{}; ({token} &); {token}", connect_probe(port));
    let o = r.run_sh("rootless-limits", &["--timeout", "2s", "--rm"], &script);
    assert_eq!(o.status.code(), Some(124), "{}", show(&o));
    assert!(stdout(&o).contains("connect:ECONNREFUSED\n"), "{}", show(&o));
    assert!(listener.accept().is_err());
    assert!(wait_until(5, || pids_running(token).is_empty()), "survivors: {:?}", pids_running(token));
}

/// A rootless sandbox maps only root: `exec --user` to anyone else is
/// refused with the reason, and root works as before.
#[test]
fn rootless_exec_user_other_than_root_is_refused() {
    let Some(r) = setup() else { return };
    let o = r.airlock(&["create", "--name", "rl-users"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = r.airlock(&["exec", "--user", "0", "rl-users", "--", "id", "-u"]).output().unwrap();
    assert_eq!(stdout(&o), "0\n", "{}", show(&o));
    let o = r.airlock(&["exec", "--user", "nobody", "rl-users", "--", "id", "-u"]).output().unwrap();
    assert_eq!(o.status.code(), Some(126), "{}", show(&o));
    assert!(stderr(&o).contains("not mapped"), "{}", show(&o));
    let o = r.airlock(&["rm", "rl-users"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

/// A daemon run by an ordinary user answers a policy its host cannot run
/// with 422 and the message `airlock create` prints, not a 500.
#[test]
fn rootless_daemon_answers_422_for_a_policy_that_needs_what_it_lacks() {
    if !require(is_root(), "root, to run airlock as a user without delegated cgroups") {
        return;
    }
    let Some(r) = setup() else { return };
    let direct = r.airlock(&["create", "--name", "strict-d", "--policy", "ci"]).output().unwrap();
    assert_eq!(direct.status.code(), Some(125), "{}", show(&direct));
    let message = stderr(&direct).trim_end().strip_prefix("airlock: error: ").unwrap().to_string();

    let run_dir = r.env.dir.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    chown_tree(&run_dir, r.uid, r.uid);
    let socket = run_dir.join("airlock.sock");
    let mut daemon = r
        .airlock(&["daemon", "--socket", &socket.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let curl = |method: &str, path: &str, body: Option<&str>| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-m", "60", "-X", method, "-w", "\n%{http_code}", "--unix-socket"]).arg(&socket);
        if let Some(body) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary", body]);
        }
        let out = cmd.arg(format!("http://airlock{path}")).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse::<u16>().unwrap_or(0), body.to_string())
    };
    let up = wait_until(20, || curl("GET", "/v1/health", None).0 == 200);
    let answer = up.then(|| curl("POST", "/v1/sandboxes", Some(r#"{"name": "strict-d", "policy": "ci"}"#)));
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    assert!(up, "the rootless daemon did not come up on {}", socket.display());
    let (status, body) = answer.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(status, 422, "{body}");
    assert_eq!(v["error"]["code"], "host_unsupported", "{body}");
    assert_eq!(v["error"]["message"], message.as_str(), "{body}");
}
