//! Shared helpers: a private state directory and workspace per test, the
//! built binary, and host-feature requirements that fail loudly in CI.

use std::ffi::OsStr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_airlock");

/// A test's own state directory and workspace, removed at the end.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub workspace: PathBuf,
}

/// A test that fails half-way can leave long-lived sandboxes running, and
/// their supervisors would outlive it with their cgroups and mounts: stop
/// what is still running and let `gc` release what is left.
impl Drop for Env {
    fn drop(&mut self) {
        if !self.state.is_dir() {
            return;
        }
        let Ok(o) = self.airlock(["ls", "--json"]).output() else { return };
        let list: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap_or_default();
        for s in list.iter().filter(|s| s["state"] == "running") {
            if let Some(name) = s["name"].as_str() {
                let _ = self.airlock(["stop", name]).output();
            }
        }
        let _ = self.airlock(["gc"]).output();
    }
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new().prefix("airlock-test-").tempdir_in(test_root()).unwrap();
        // The sandbox's root is an unprivileged host uid that must reach its
        // mount points below the state directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let state = dir.path().join("state");
        let workspace = dir.path().join("repo");
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::write(workspace.join("README"), "hello\n").unwrap();
        std::fs::create_dir_all(workspace.join("src")).unwrap();
        std::fs::write(workspace.join("src/lib.c"), "int x;\n").unwrap();
        Env { dir, state, workspace }
    }

    /// `airlock` with this test's state directory and workspace as cwd.
    pub fn airlock<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("AIRLOCK_STATE_DIR", &self.state)
            .env("AIRLOCK_CGROUP_PARENT", cgroup_parent())
            // Never a daemon the host may be running: the tests that want
            // one start their own and point AIRLOCK_SOCKET at it.
            .env("AIRLOCK_SOCKET", self.dir.path().join("no-daemon.sock"))
            .env_remove("AIRLOCK_LOG")
            .current_dir(&self.workspace)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `airlock run --name NAME [extra…] -- sh -c SCRIPT`.
    pub fn run_sh(&self, name: &str, extra: &[&str], script: &str) -> Output {
        let mut args: Vec<&str> = vec!["run", "--name", name];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", script]);
        self.airlock(args).output().unwrap()
    }

    pub fn sandbox_dir(&self, name: &str) -> PathBuf {
        self.state.join(name)
    }
}

/// Where test directories go: the target directory's own (a checkout
/// anywhere keeps its tests' files to itself). The sandbox's unprivileged
/// root and the rootless tests' user must be able to walk to it, so a
/// checkout below a private directory (say /root) falls back to a directory
/// of this user's in /var/tmp.
pub fn test_root() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).to_path_buf();
    std::fs::create_dir_all(&target).unwrap();
    if searchable_by_others(&target) {
        return target;
    }
    fallback_root()
}

/// `/var/tmp/airlock-tests-UID`: one per user, so that runs as root and as
/// an ordinary user do not lock each other out, and checked to be this
/// user's own directory: anyone may create names in /var/tmp first.
fn fallback_root() -> PathBuf {
    let uid = rustix::process::geteuid().as_raw();
    let root = PathBuf::from(format!("/var/tmp/airlock-tests-{uid}"));
    match std::fs::DirBuilder::new().mode(0o755).create(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("cannot create {}: {e}", root.display()),
    }
    let meta = std::fs::symlink_metadata(&root).unwrap();
    assert!(
        meta.is_dir() && meta.uid() == uid,
        "{} is not a directory of uid {uid}: remove it and run the tests again",
        root.display()
    );
    // Whatever the umask made of it: others must be able to walk through.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    root
}

fn searchable_by_others(path: &Path) -> bool {
    path.ancestors()
        .all(|p| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o001 != 0).unwrap_or(false))
}

/// Name of a test process's copy of the binary in the fallback root.
const BIN_COPY_PREFIX: &str = "airlock-bin-";

/// The airlock binary at a path every user can reach (the rootless tests
/// run it as another user): the built one, or a copy in the test root named
/// after this process, so that concurrent runs (from two checkouts, say)
/// each keep their own. Copies of processes that have ended are removed
/// first; nothing else would, and each is as big as the build.
pub fn public_bin() -> PathBuf {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let built = Path::new(BIN).to_path_buf();
        if searchable_by_others(built.parent().unwrap()) {
            return built;
        }
        let root = test_root();
        remove_copies_of_ended_runs(&root);
        let copy = root.join(format!("{BIN_COPY_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_file(&copy);
        // A hard link costs nothing where the file system allows it.
        if std::fs::hard_link(&built, &copy).is_err() {
            std::fs::copy(&built, &copy).unwrap();
        }
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        copy
    })
    .clone()
}

fn remove_copies_of_ended_runs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(BIN_COPY_PREFIX).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

pub fn cgroup_parent() -> String {
    format!("airlock-test-{}", std::process::id())
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Skips (outside CI) or fails (in CI) when `ok` is false.
#[must_use]
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("this test needs {what}, which this host lacks (CI=true makes that a failure)");
    }
    eprintln!("SKIPPED: this test needs {what}");
    false
}

/// A debug dump for assertion messages.
pub fn show(o: &Output) -> String {
    format!("status {:?}\n--- stdout\n{}\n--- stderr\n{}", o.status.code(), stdout(o), stderr(o))
}

/// Host pids whose command line contains `needle`.
pub fn pids_running(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && pid != std::process::id() as i32 {
            out.push(pid);
        }
    }
    out
}

/// Shell for inside a sandbox: tries a TCP connection to 127.0.0.1:`port`
/// with Python (scripts/test.sh installs it) and prints `connect:` and
/// `connected` or the errno's name. A tool that is missing shows as a
/// missing line, not as a connection that failed.
pub fn connect_probe(port: u16) -> String {
    format!(
        r#"python3 -c 'import errno, socket
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("127.0.0.1", {port}))
    print("connect:connected")
except OSError as e:
    print("connect:" + errno.errorcode.get(e.errno, str(e)))'"#
    )
}

/// Processes whose parent is `pid`, from /proc.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:")).map(str::trim);
        if ppid == Some(pid.to_string().as_str()) {
            found.push(child);
        }
    }
    found
}

/// Spawns `cmd` (an exec whose script prints `ready` once its set-up is
/// done) with its stdout piped, and returns once that first line came.
pub fn spawn_until_ready(mut cmd: Command) -> std::process::Child {
    use std::io::Read;
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = Vec::new();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        first.push(byte[0]);
    }
    assert_eq!(first, b"ready", "the exec did not start");
    child.stdout = Some(stdout);
    child
}

/// Polls `f` for up to `secs` seconds.
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    f()
}

/// Mount points (from this process's view) whose path contains `needle`.
pub fn mounts_containing(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.contains(needle))
        .map(str::to_string)
        .collect()
}

/// The cgroup directories of sandbox `name` (named `<name>-<hash>`), in
/// every hierarchy present.
pub fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let parent = cgroup_parent();
    let mut out = Vec::new();
    for base in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/unified",
    ] {
        let Ok(entries) = std::fs::read_dir(Path::new(base).join(&parent)) else { continue };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&format!("{name}-")) {
                out.push(entry.path());
            }
        }
    }
    out
}
