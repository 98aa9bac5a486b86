//! [`TestDaemon`]: an `airlock daemon` on a private socket with its own
//! cgroup parent (so leftovers are attributable to it alone even while other
//! tests run in the same process), shared by the daemon tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::support::*;

/// The cgroup hierarchies a sandbox may have directories in.
const CGROUP_BASES: [&str; 5] = [
    "/sys/fs/cgroup",
    "/sys/fs/cgroup/memory",
    "/sys/fs/cgroup/pids",
    "/sys/fs/cgroup/cpu",
    "/sys/fs/cgroup/unified",
];

/// A daemon on `<tempdir>/run/airlock.sock` whose sandboxes live below a
/// cgroup parent of their own.
pub(super) struct TestDaemon {
    pub env: Env,
    pub socket: PathBuf,
    pub cgroup_parent: String,
    extra: Vec<String>,
    child: Option<Child>,
}

impl TestDaemon {
    pub fn start(tag: &str) -> TestDaemon {
        TestDaemon::start_with(tag, |_| {})
    }

    /// [`TestDaemon::start`] with more `airlock daemon` flags, kept for
    /// [`TestDaemon::restart`].
    pub fn start_args(tag: &str, extra: &[&str]) -> TestDaemon {
        TestDaemon::start_prepared(tag, |_| extra.iter().map(|s| s.to_string()).collect())
    }

    /// [`TestDaemon::start_args`] with flags that name files the test puts
    /// in the daemon's directory first (`prepare` gets the [`Env`]).
    pub fn start_prepared(tag: &str, prepare: impl FnOnce(&Env) -> Vec<String>) -> TestDaemon {
        let mut d = TestDaemon::new(tag, prepare);
        d.spawn(|_| {});
        d
    }

    /// [`TestDaemon::start`], with `configure` applied to the daemon's
    /// command before it is spawned.
    pub fn start_with(tag: &str, configure: impl FnOnce(&mut Command)) -> TestDaemon {
        let mut d = TestDaemon::new(tag, |_| Vec::new());
        d.spawn(configure);
        d
    }

    fn new(tag: &str, prepare: impl FnOnce(&Env) -> Vec<String>) -> TestDaemon {
        let env = Env::new();
        let socket = env.dir.path().join("run/airlock.sock");
        let cgroup_parent = format!("{}-{tag}", cgroup_parent());
        let extra = prepare(&env);
        TestDaemon { env, socket, cgroup_parent, extra, child: None }
    }

    fn spawn(&mut self, configure: impl FnOnce(&mut Command)) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.env.dir.path().join("daemon.log"))
            .unwrap();
        let mut cmd = self.env.airlock(["daemon", "--socket", &self.socket.display().to_string()]);
        cmd.args(&self.extra)
            .env("AIRLOCK_CGROUP_PARENT", &self.cgroup_parent)
            .stdout(Stdio::null())
            .stderr(log);
        configure(&mut cmd);
        self.child = Some(cmd.spawn().unwrap());
        let up = wait_until(20, || self.request("GET", "/v1/health", None).0 == 200);
        assert!(up, "the daemon did not come up on {}:\n{}", self.socket.display(), self.log());
    }

    /// SIGKILLs the daemon (its sandboxes must survive it).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts the daemon again, on the same socket and state, with the same
    /// flags.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(|_| {});
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.env.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// (status, body) of one request made with curl; status 0 when curl
    /// got no answer at all.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        self.curl(Command::new("curl"), method, path, body)
    }

    /// [`TestDaemon::request`] as another user, through setpriv.
    pub fn request_as(&self, user: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut setpriv = Command::new("setpriv");
        setpriv.args(["--reuid", user, "--regid", user, "--init-groups", "--", "curl"]);
        self.curl(setpriv, method, path, body)
    }

    fn curl(&self, mut cmd: Command, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        cmd.args(["-sS", "-m", "120", "-X", method, "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&self.socket);
        if let Some(body) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary", body]);
        }
        let out = cmd.arg(format!("http://airlock{path}")).stdin(Stdio::null()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), format!("{body}{}", String::from_utf8_lossy(&out.stderr)))
    }

    pub fn json(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        let (status, text) = self.request(method, path, body.as_deref());
        let value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        (status, value)
    }

    /// The names of every sandbox the daemon lists.
    pub fn sandbox_names(&self) -> Vec<String> {
        let (status, list) = self.json("GET", "/v1/sandboxes", None);
        assert_eq!(status, 200, "{list}");
        list["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect()
    }

    /// Everything this daemon's sandboxes could have left on the host, one
    /// line each; empty when the host is clean.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let state = self.env.state.display().to_string();
        let environ_marker = format!("AIRLOCK_STATE_DIR={state}");
        let cgroup_marker = format!("/{}/", self.cgroup_parent);
        let me = std::process::id() as i32;
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            if pid == me || Some(pid) == self.pid() {
                continue;
            }
            // Supervisors carry the state directory in their environment;
            // agents and whatever they started sit in the sandbox's cgroup.
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let in_state = environ.split(|b| *b == 0).any(|v| v == environ_marker.as_bytes());
            let cgroups = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
            let in_cgroup = cgroups.contains(&cgroup_marker);
            if in_state || in_cgroup {
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                out.push(format!("process {pid}: {cmdline}"));
            }
        }
        for mount in mounts_containing(&state) {
            out.push(format!("mount {mount}"));
        }
        for base in CGROUP_BASES {
            let Ok(entries) = std::fs::read_dir(Path::new(base).join(&self.cgroup_parent)) else { continue };
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    out.push(format!("cgroup {}", entry.path().display()));
                }
            }
        }
        for name in self.state_dirs() {
            out.push(format!("state directory {}", self.env.state.join(name).display()));
        }
        out
    }

    /// Sandbox directories below the state directory (the daemon's own
    /// files there start with a dot).
    fn state_dirs(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.env.state) else { return Vec::new() };
        entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect()
    }

    /// Removes every sandbox through the API and waits (up to `secs`) for
    /// the host to be clean; the leftovers when it is not.
    pub fn remove_all_and_settle(&self, secs: u64) -> Vec<String> {
        for name in self.sandbox_names() {
            let (status, body) = self.request("DELETE", &format!("/v1/sandboxes/{name}"), None);
            assert!(status == 200 || status == 404, "DELETE {name}: {status} {body}");
        }
        let mut left = Vec::new();
        wait_until(secs, || {
            left = self.leftovers();
            left.is_empty()
        });
        left
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let _ = child.wait();
        }
        // Sandboxes outlive the daemon by design: remove what a failed test
        // left, then the cgroup parent itself.
        let names = self.state_dirs();
        if !names.is_empty() {
            let _ = self
                .env
                .airlock(["rm"])
                .args(&names)
                .env("AIRLOCK_CGROUP_PARENT", &self.cgroup_parent)
                .output();
        }
        for base in CGROUP_BASES {
            let _ = std::fs::remove_dir(Path::new(base).join(&self.cgroup_parent));
        }
    }
}
