//! What this host can do for the process tier: one report that `airlock
//! run`, `airlock create` and `airlock doctor` all decide from.
//!
//! The probe has two depths. [`Depth::Launch`] reads what launching needs
//! (the cgroup hierarchies and whether they are writable, the Landlock ABI,
//! root or not) in well under a millisecond, so `run` pays nothing for it.
//! [`Depth::Doctor`] starts from exactly those verdicts and then exercises
//! the real mechanisms (a child creates a user namespace, mounts an overlay,
//! installs a seccomp filter, a test cgroup is created, …) instead of
//! guessing from kernel versions, because distributions backport features
//! and restrict others by sysctl or LSM. A trial can only turn an Ok into a
//! Missing, so doctor never reports a feature that a launch would refuse
//! for want of it.
//!
//! The system calls are in [`HostFacts::read`]; the verdicts of a launch
//! come from [`launch_report`], a pure function of those facts, so that the
//! decisions built on them are unit-tested with made-up hosts.
//!
//! Checks that change process state run in a forked child so this process
//! stays untouched (a multi-threaded process cannot even `unshare` a user
//! namespace). The child runs only raw system calls ([`crate::sys`]'s
//! `raw_*` helpers) on data prepared before the fork, reports
//! `(step, errno)` over a pipe and `_exit`s: after fork in a multi-threaded
//! process, allocating or taking a lock could deadlock.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cgroup::{self, CgroupError, CgroupLimits, CgroupSupport, Placement, SandboxCgroup};
use crate::sys;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Works fully.
    Ok,
    /// Not available; the feature it backs cannot be used.
    Missing,
    /// Available with restrictions described in the detail.
    Limited,
}

/// One line of the doctor report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable identifier, for scripts and tests.
    pub id: &'static str,
    pub title: String,
    pub status: Status,
    /// What was tried and what happened.
    pub detail: String,
    /// What the user can do, when not Ok.
    pub fix: Option<String>,
}

/// A host feature a policy may require, or let the runtime do without
/// (`isolation.allow_weaker`); spelled as the policy spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Feature {
    Cgroups,
    Landlock,
    DiskQuota,
}

impl Feature {
    pub const ALL: [Feature; 3] = [Feature::Cgroups, Feature::Landlock, Feature::DiskQuota];

    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Cgroups => "cgroups",
            Feature::Landlock => "landlock",
            Feature::DiskQuota => "disk-quota",
        }
    }

    /// The checks that must all be Ok for the host to enforce the feature.
    pub fn checks(self) -> &'static [&'static str] {
        match self {
            Feature::Cgroups => &["cgroup-memory", "cgroup-pids", "cgroup-cpu"],
            Feature::Landlock => &["landlock"],
            Feature::DiskQuota => &["disk-quota"],
        }
    }
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What this host can do: `airlock doctor` prints it, and `run` and
/// `create` plan from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostReport {
    pub checks: Vec<Check>,
    pub running_as_root: bool,
    /// `uname -r` and `uname -v`.
    pub kernel: String,
    /// The cgroup hierarchies the verdicts were made from; a sandbox's
    /// cgroup is created in them (`SandboxCgroup::create_on`), and so are
    /// the doctor's trial cgroups.
    #[serde(skip)]
    pub cgroups: CgroupSupport,
}

impl HostReport {
    /// The check with this id.
    pub fn get(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }

    /// Whether the host enforces `feature`: every check behind it is Ok.
    /// The one rule by which a launch plans and doctor summarises.
    pub fn enforces(&self, feature: Feature) -> bool {
        feature.checks().iter().all(|id| self.get(id).is_some_and(|c| c.status == Status::Ok))
    }
}

/// How far [`probe_host`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Only what a launch decides from, read without trying anything.
    Launch,
    /// Everything, each mechanism tried for real (`airlock doctor`).
    Doctor,
}

/// What the host says before anything is tried: the inputs of every
/// launch decision.
#[derive(Debug, Clone, PartialEq)]
pub struct HostFacts {
    pub running_as_root: bool,
    /// `uname -r` and `uname -v`.
    pub kernel: String,
    pub cgroups: CgroupSupport,
    /// The Landlock ABI version, or the errno of asking for it.
    pub landlock_abi: Result<libc::c_long, i32>,
}

impl HostFacts {
    /// Reads the facts from this host (no child, no trial, nothing changed).
    pub fn read() -> HostFacts {
        let uname = rustix::system::uname();
        HostFacts {
            running_as_root: rustix::process::geteuid().is_root(),
            kernel: format!("{} {}", uname.release().to_string_lossy(), uname.version().to_string_lossy()),
            cgroups: cgroup::probe(),
            landlock_abi: sys::landlock_abi().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
}

/// Probes the host. Never fails (a check that cannot run reports Missing
/// with the reason). [`Depth::Launch`] takes well under a millisecond,
/// [`Depth::Doctor`] well under a second.
pub fn probe_host(depth: Depth) -> HostReport {
    let facts = HostFacts::read();
    match depth {
        Depth::Launch => launch_report(&facts),
        Depth::Doctor => doctor_report(&facts),
    }
}

/// The verdicts a launch decides from, from the facts alone: Landlock, the
/// three cgroup controllers and the writable layer's size limit.
pub fn launch_report(facts: &HostFacts) -> HostReport {
    let support = &facts.cgroups;
    let checks = vec![
        check_landlock(facts.landlock_abi),
        check_cgroup("cgroup-memory", "memory", support.memory.as_ref(), support),
        check_cgroup("cgroup-pids", "pids", support.pids.as_ref(), support),
        check_cgroup("cgroup-cpu", "cpu", support.cpu.as_ref(), support),
        check_disk_quota(facts.running_as_root),
    ];
    HostReport {
        checks,
        running_as_root: facts.running_as_root,
        kernel: facts.kernel.clone(),
        cgroups: facts.cgroups.clone(),
    }
}

/// Every check, starting from the launch verdicts and trying each mechanism.
fn doctor_report(facts: &HostFacts) -> HostReport {
    let root = facts.running_as_root;
    let launch = launch_report(facts);
    let verdict = |id: &str| {
        launch.get(id).cloned().unwrap_or_else(|| {
            Subject { id: "unknown", title: id }.missing("the launch probe has no such check", "report a bug")
        })
    };
    let checks = vec![
        check_user_namespaces(root),
        check_namespaces(),
        check_overlay_in_userns(),
        check_idmapped_mounts(root),
        check_seccomp(),
        verdict("landlock"),
        try_cgroup(verdict("cgroup-memory"), "memory", &facts.cgroups),
        try_cgroup(verdict("cgroup-pids"), "pids", &facts.cgroups),
        try_cgroup(verdict("cgroup-cpu"), "cpu", &facts.cgroups),
        try_disk_quota(verdict("disk-quota")),
    ];
    HostReport { checks, running_as_root: root, kernel: launch.kernel, cgroups: launch.cgroups }
}

/// What one check is about; builds its outcomes, so that a fix comes with
/// every outcome but Ok.
#[derive(Clone, Copy)]
struct Subject<'a> {
    id: &'static str,
    title: &'a str,
}

impl Subject<'_> {
    fn outcome(self, status: Status, detail: String, fix: Option<String>) -> Check {
        Check { id: self.id, title: self.title.to_owned(), status, detail, fix }
    }

    fn ok(self, detail: impl Into<String>) -> Check {
        self.outcome(Status::Ok, detail.into(), None)
    }

    fn missing(self, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        self.outcome(Status::Missing, detail.into(), Some(fix.into()))
    }

    fn limited(self, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        self.outcome(Status::Limited, detail.into(), Some(fix.into()))
    }

    /// The probe child could not be started or did not report.
    fn child_broken(self, e: &io::Error) -> Check {
        self.missing(format!("the probe could not run: {e}"), "check process limits (ulimit -u) and retry")
    }

    /// The outcome of work done by [`in_child`]: Ok with `worked` when every
    /// step succeeded, else Missing naming the failed step (1-based index
    /// into `steps`) with the fix `fix` gives for that failure.
    fn after_child<S: Into<String>>(
        self,
        result: io::Result<Result<(), ChildFailure>>,
        steps: &[&str],
        worked: impl Into<String>,
        fix: impl FnOnce(ChildFailure) -> S,
    ) -> Check {
        match result {
            Ok(Ok(())) => self.ok(worked),
            Ok(Err(f)) => self.missing(f.describe(steps), fix(f)),
            Err(e) => self.child_broken(&e),
        }
    }
}

// ---------------------------------------------------------------------------
// Namespaces

const USERNS_STEPS: &[&str] = &[
    "create a user namespace (unshare CLONE_NEWUSER)",
    "create a mount namespace inside it (no capabilities in the new user namespace)",
];

fn check_user_namespaces(root: bool) -> Check {
    const CHECK: Subject<'static> = Subject { id: "user-namespaces", title: "user namespaces" };
    // Step 2 matters: with AppArmor's userns restriction the unshare succeeds
    // but the namespace grants no capabilities, so nothing can be set up in it.
    CHECK.after_child(
        unshare_in_new_userns(libc::CLONE_NEWNS),
        USERNS_STEPS,
        format!(
            "a child created a user namespace and used its capabilities (as {})",
            if root { "root" } else { "this user" }
        ),
        |f| userns_fix(f.errno),
    )
}

/// In a child: creates a user namespace (step 1), then in it a namespace of
/// kind `flag` (step 2), which needs the new namespace's capabilities.
fn unshare_in_new_userns(flag: libc::c_int) -> io::Result<Result<(), ChildFailure>> {
    in_child(|| {
        sys::raw_unshare(libc::CLONE_NEWUSER).map_err(step(1))?;
        sys::raw_unshare(flag).map_err(step(2))
    })
}

/// Names the sysctl that blocks user namespaces on this host.
fn userns_fix(errno: i32) -> String {
    let read = |p: &str| fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    let persist = "(add the setting to /etc/sysctl.d/99-airlock.conf to keep it after reboot)";
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return format!(
            "user.max_user_namespaces is 0: `sudo sysctl -w user.max_user_namespaces=15000` {persist}"
        );
    }
    if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return format!(
            "kernel.unprivileged_userns_clone is 0: `sudo sysctl -w kernel.unprivileged_userns_clone=1` {persist}"
        );
    }
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        return format!(
            "AppArmor restricts unprivileged user namespaces \
             (kernel.apparmor_restrict_unprivileged_userns=1): `sudo sysctl -w \
             kernel.apparmor_restrict_unprivileged_userns=0` {persist}, or install an AppArmor \
             profile for the airlock binary that grants `userns,`"
        );
    }
    if errno == libc::EPERM || errno == libc::ENOSYS {
        return "no sysctl blocks user namespaces, so a seccomp filter or LSM of the \
                surrounding container does (in Docker, run with \
                `--security-opt seccomp=unconfined` or a profile that allows unshare); \
                or run airlock as root"
            .to_owned();
    }
    "run airlock as root, or enable user namespaces in the kernel (CONFIG_USER_NS)".to_owned()
}

const NAMESPACES: &[(&str, libc::c_int)] = &[
    ("mount", libc::CLONE_NEWNS),
    ("pid", libc::CLONE_NEWPID),
    ("net", libc::CLONE_NEWNET),
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("cgroup", libc::CLONE_NEWCGROUP),
];

fn check_namespaces() -> Check {
    const CHECK: Subject<'static> =
        Subject { id: "namespaces", title: "mount, pid, net, ipc, uts and cgroup namespaces" };
    let steps = &["create a user namespace", "create the namespace inside it"];
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for (name, flag) in NAMESPACES {
        match unshare_in_new_userns(*flag) {
            Ok(Ok(())) => ok.push(*name),
            Ok(Err(f)) => failed.push(format!("{name}: {}", f.describe(steps))),
            Err(e) => failed.push(format!("{name}: {e}")),
        }
    }
    if failed.is_empty() {
        return CHECK.ok(format!("created inside a new user namespace: {}", ok.join(", ")));
    }
    let detail = format!("failed: {}; worked: [{}]", failed.join("; "), ok.join(", "));
    let fix = "enable the missing namespaces in the kernel (CONFIG_*_NS), and see the \
               user-namespaces check";
    if ok.is_empty() { CHECK.missing(detail, fix) } else { CHECK.limited(detail, fix) }
}

const OVERLAY_STEPS: &[&str] = &[
    "create user and mount namespaces",
    "deny setgroups",
    "write uid_map",
    "write gid_map",
    "make mounts private",
    "mount a tmpfs",
    "create the overlay lower directory",
    "create the overlay upper directory",
    "create the overlay work directory",
    "create the overlay mount point",
    "mount overlayfs with userxattr",
    "create a file through the overlay",
];

fn check_overlay_in_userns() -> Check {
    const CHECK: Subject<'static> =
        Subject { id: "overlayfs-in-userns", title: "overlayfs inside a user namespace" };
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    // Everything the child needs, prepared before the fork.
    let base = std::env::temp_dir();
    let prepared = (|| {
        let c = |p: PathBuf| CString::new(p.as_os_str().as_bytes());
        let lower = base.join("l");
        let upper = base.join("u");
        let work = base.join("w");
        let merged = base.join("m");
        let options = format!(
            "lowerdir={},upperdir={},workdir={},userxattr",
            lower.display(),
            upper.display(),
            work.display()
        );
        Ok::<_, std::ffi::NulError>((
            c(base.clone())?,
            c(lower)?,
            c(upper)?,
            c(work)?,
            c(merged.clone())?,
            CString::new(options)?,
            c(merged.join("probe"))?,
        ))
    })();
    let Ok((base_c, lower, upper, work, merged, options, file)) = prepared else {
        return CHECK.missing(
            format!("the temporary directory {} contains a NUL byte", base.display()),
            "set TMPDIR to a plain path",
        );
    };
    let uid_map = format!("0 {uid} 1");
    let gid_map = format!("0 {gid} 1");
    let result = in_child(|| {
        sys::raw_unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS).map_err(step(1))?;
        sys::raw_write_file(c"/proc/self/setgroups", b"deny").map_err(step(2))?;
        sys::raw_write_file(c"/proc/self/uid_map", uid_map.as_bytes()).map_err(step(3))?;
        sys::raw_write_file(c"/proc/self/gid_map", gid_map.as_bytes()).map_err(step(4))?;
        sys::raw_mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None).map_err(step(5))?;
        // The tmpfs hides the real temp dir only inside this child's mount
        // namespace, so nothing is left behind on the host.
        sys::raw_mount(Some(c"tmpfs"), &base_c, Some(c"tmpfs"), 0, Some(c"size=4m")).map_err(step(6))?;
        for (n, dir) in [(7, &lower), (8, &upper), (9, &work), (10, &merged)] {
            sys::raw_mkdir(dir, 0o755).map_err(step(n))?;
        }
        sys::raw_mount(Some(c"overlay"), &merged, Some(c"overlay"), 0, Some(&options)).map_err(step(11))?;
        sys::raw_create_file(&file, b"ok").map_err(step(12))
    });
    CHECK.after_child(
        result,
        OVERLAY_STEPS,
        "a child mapped itself to root in a new user namespace, mounted an overlay \
         (userxattr) on a tmpfs and wrote through it",
        |f| {
            if f.step <= 4 {
                "see the user-namespaces check"
            } else {
                "overlayfs in user namespaces needs Linux 5.11 or later with overlay \
                 built in (modprobe overlay); or run airlock as root"
            }
        },
    )
}

// ---------------------------------------------------------------------------
// Idmapped mounts

fn check_idmapped_mounts(root: bool) -> Check {
    const CHECK: Subject<'static> = Subject { id: "idmapped-mounts", title: "idmapped mounts" };
    if !root {
        return CHECK.missing(
            "not tried: creating an idmapped mount needs root (CAP_SYS_ADMIN in the initial \
             user namespace)",
            "run airlock as root to map workspace ownership with idmapped mounts",
        );
    }
    let dir = std::env::temp_dir().join(format!("airlock-idmap-probe-{}", unique_tag()));
    if let Err(e) = fs::create_dir(&dir) {
        return CHECK.missing(
            format!("cannot create the probe directory {}: {e}", dir.display()),
            "make the temporary directory (TMPDIR) writable",
        );
    }
    let result = try_idmap(&dir);
    let _ = fs::remove_dir(&dir);
    let fstype = fs_name(&dir);
    match result {
        Ok(()) => CHECK.ok(format!("idmapped a clone of {} ({fstype})", dir.display())),
        Err(IdmapError::Syscall(what, e)) => {
            let why = match e.raw_os_error() {
                Some(libc::ENOSYS) => "the kernel has no mount_setattr (needs Linux 5.12+)".to_owned(),
                Some(libc::EINVAL) => format!("{fstype} does not support idmapped mounts here"),
                _ => format!("{what} failed: {e}"),
            };
            CHECK.missing(
                format!("{why} (tried on {})", dir.display()),
                "use Linux 6.3+ (idmapped tmpfs) or keep the state directory on ext4, xfs or btrfs",
            )
        }
        Err(IdmapError::Setup(e)) => CHECK.child_broken(&e),
    }
}

enum IdmapError {
    Setup(io::Error),
    Syscall(&'static str, io::Error),
}

/// Clones `dir` as a detached mount and applies an id mapping taken from a
/// helper child's user namespace. The detached mount is never attached, so
/// closing its fd discards it.
fn try_idmap(dir: &Path) -> Result<(), IdmapError> {
    let (ready_r, ready_w) = cloexec_pipe().map_err(IdmapError::Setup)?;
    let ready_w_raw = ready_w.as_raw_fd();
    // SAFETY: the helper makes only raw system calls on the descriptor number
    // copied above, then sleeps until kill_and_reap below kills it.
    let helper = unsafe {
        sys::fork_child(|| {
            if sys::raw_unshare(libc::CLONE_NEWUSER).is_err()
                || sys::raw_write_all(ready_w_raw, b"r").is_err()
            {
                return 1;
            }
            sys::raw_pause_forever()
        })
    }
    .map_err(IdmapError::Setup)?;
    drop(ready_w);
    let outcome = (|| {
        let mut byte = [0u8; 1];
        let mut ready = fs::File::from(ready_r);
        ready.read_exact(&mut byte).map_err(IdmapError::Setup)?;
        let proc_dir = PathBuf::from(format!("/proc/{helper}"));
        fs::write(proc_dir.join("uid_map"), "0 100000 65536")
            .map_err(|e| IdmapError::Syscall("write the helper's uid_map", e))?;
        fs::write(proc_dir.join("gid_map"), "0 100000 65536")
            .map_err(|e| IdmapError::Syscall("write the helper's gid_map", e))?;
        let userns = fs::File::open(proc_dir.join("ns/user")).map_err(IdmapError::Setup)?;
        let tree = sys::clone_tree(dir).map_err(|e| IdmapError::Syscall("open_tree", e))?;
        sys::idmap_tree(tree.as_fd(), userns.as_fd()).map_err(|e| IdmapError::Syscall("mount_setattr", e))
    })();
    sys::kill_and_reap(helper);
    outcome
}

/// The filesystem type of `path`, for messages.
fn fs_name(path: &Path) -> String {
    let Ok(st) = rustix::fs::statfs(path.parent().unwrap_or(path)) else {
        return "this filesystem".to_owned();
    };
    // f_type is signed on some architectures; magics are positive.
    let magic = st.f_type as u64;
    match magic {
        0x0102_1994 => "tmpfs",
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x794C_7630 => "overlayfs",
        _ => "this filesystem",
    }
    .to_owned()
}

// ---------------------------------------------------------------------------
// seccomp and Landlock

fn check_seccomp() -> Check {
    const CHECK: Subject<'static> = Subject { id: "seccomp", title: "seccomp filters" };
    let status_text = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field =
        |key: &str| status_text.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_owned());
    let Some(mode) = field("Seccomp:") else {
        return CHECK.missing(
            "/proc/self/status has no Seccomp field: the kernel is built without CONFIG_SECCOMP",
            "use a kernel with CONFIG_SECCOMP_FILTER=y",
        );
    };
    let inherited = field("Seccomp_filters:").unwrap_or_else(|| "0".to_owned());
    // An allow-all filter: proves filter mode works without changing anything.
    let mut program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_ALLOW,
    }];
    let fprog = libc::sock_fprog { len: 1, filter: program.as_mut_ptr() };
    let result = in_child(|| {
        sys::raw_set_no_new_privs().map_err(step(1))?;
        sys::raw_seccomp_set_filter(&fprog).map_err(step(2))
    });
    CHECK.after_child(
        result,
        &["set no_new_privs", "install a seccomp filter"],
        format!(
            "a child installed a filter; airlock itself runs with Seccomp mode {mode} and \
             {inherited} inherited filter(s), which sandboxes stack on"
        ),
        |_| "use a kernel with CONFIG_SECCOMP_FILTER=y",
    )
}

fn check_landlock(abi: Result<libc::c_long, i32>) -> Check {
    const CHECK: Subject<'static> = Subject { id: "landlock", title: "Landlock" };
    match abi {
        Ok(abi) => CHECK.ok(format!("Landlock ABI version {abi}")),
        Err(libc::EOPNOTSUPP) => CHECK.missing(
            "the kernel has Landlock but it is not enabled at boot",
            "add landlock to the kernel's lsm= boot parameter (e.g. \
             lsm=landlock,lockdown,yama,integrity,apparmor,bpf) and reboot",
        ),
        Err(errno) => CHECK.missing(
            format!("landlock_create_ruleset failed: {}", io::Error::from_raw_os_error(errno)),
            "use Linux 5.13+ built with CONFIG_SECURITY_LANDLOCK=y",
        ),
    }
}

// ---------------------------------------------------------------------------
// cgroups, disk quota, KVM

fn check_cgroup(
    id: &'static str,
    controller: &str,
    placement: Option<&Placement>,
    support: &CgroupSupport,
) -> Check {
    let title = format!("cgroup {controller} limits");
    let check = Subject { id, title: &title };
    let Some(placement) = placement else {
        return check.missing(
            format!("no hierarchy offers the {controller} controller ({})", support.detail),
            format!(
                "mount the {controller} controller (cgroup v2 with it enabled, or \
                 `mount -t cgroup -o {controller} cgroup /sys/fs/cgroup/{controller}`), \
                 or use a policy with isolation.allow_weaker = [\"cgroups\"]"
            ),
        );
    };
    let where_ = placement_name(placement);
    if !support.writable {
        return check.missing(
            format!(
                "{where_}, but this user may not create cgroups in every hierarchy used ({})",
                support.detail
            ),
            "run airlock as root, or use a policy that allows running without cgroup limits \
             (isolation.allow_weaker = [\"cgroups\"], as `dev` does)",
        );
    }
    check.ok(format!("{where_}, writable"))
}

fn placement_name(placement: &Placement) -> String {
    match placement {
        Placement::V1(p) => format!("v1 at {}", p.display()),
        Placement::V2(p) => format!("v2 at {}", p.display()),
    }
}

/// Confirms an Ok cgroup verdict by really creating a cgroup with a limit
/// on `controller`, in the hierarchies a sandbox would use (`support`):
/// write access to the mount point says little about enabling controllers
/// or writing limit files.
fn try_cgroup(verdict: Check, controller: &str, support: &CgroupSupport) -> Check {
    if verdict.status != Status::Ok {
        return verdict;
    }
    let check = Subject { id: verdict.id, title: &verdict.title };
    let where_ = verdict.detail.trim_end_matches(", writable");
    let limits = match controller {
        "memory" => CgroupLimits { memory: Some(64 << 20), ..CgroupLimits::default() },
        "pids" => CgroupLimits { pids: Some(64), ..CgroupLimits::default() },
        _ => CgroupLimits { cpus: Some(1.0), ..CgroupLimits::default() },
    };
    let name = format!("doctor-{}-{controller}", unique_tag());
    match SandboxCgroup::create_on(support, &name, &limits).and_then(|cg| cg.remove()) {
        Ok(()) => {
            check.ok(format!("{where_}; a test cgroup with a {controller} limit was created and removed"))
        }
        Err(CgroupError::NotPermitted { fix, source, path }) => {
            check.missing(format!("{where_}, but cannot create {}: {source}", path.display()), fix)
        }
        Err(CgroupError::ControllerMissing { fix, .. }) => check.missing(where_.to_owned(), fix),
        Err(e) => check.missing(
            format!("{where_}, but a test cgroup failed: {e}"),
            "run `airlock gc`, then retry; report a bug if it persists",
        ),
    }
}

const DISK_QUOTA: Subject<'static> = Subject { id: "disk-quota", title: "size limit for the writable layer" };

fn check_disk_quota(root: bool) -> Check {
    if !root {
        return DISK_QUOTA.missing(
            "the workspace's writable layer cannot be size-limited without root",
            "run airlock as root to cap the writable layer's size",
        );
    }
    DISK_QUOTA.ok("as root, the writable layer goes on a tmpfs of the policy's disk size")
}

const DISK_QUOTA_STEPS: &[&str] = &[
    "create a mount namespace",
    "make mounts private",
    "mount a size-limited tmpfs",
    "statfs the tmpfs",
    "check the tmpfs size (it was not limited)",
];

/// Confirms an Ok disk-quota verdict: a child mounts a small tmpfs and the
/// kernel must report its size as limited.
fn try_disk_quota(verdict: Check) -> Check {
    if verdict.status != Status::Ok {
        return verdict;
    }
    let Ok(dir) = CString::new(std::env::temp_dir().as_os_str().as_bytes()) else {
        return DISK_QUOTA
            .missing("the temporary directory path contains a NUL byte", "set TMPDIR to a plain path");
    };
    const LIMIT: u64 = 1 << 20;
    let result = in_child(|| {
        sys::raw_unshare(libc::CLONE_NEWNS).map_err(step(1))?;
        sys::raw_mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None).map_err(step(2))?;
        sys::raw_mount(Some(c"tmpfs"), &dir, Some(c"tmpfs"), 0, Some(c"size=1m")).map_err(step(3))?;
        let bytes = sys::raw_fs_size(&dir).map_err(step(4))?;
        if bytes > LIMIT {
            return Err((5, 0));
        }
        Ok(())
    });
    DISK_QUOTA.after_child(
        result,
        DISK_QUOTA_STEPS,
        "a child mounted a 1 MiB tmpfs in its own mount namespace and the kernel enforced the size",
        |_| "use a kernel with tmpfs (CONFIG_TMPFS=y)",
    )
}

// ---------------------------------------------------------------------------
// Child processes

/// This process's id and a sequence number: names of what a trial creates,
/// so that two probes at once (two tests, two daemon requests) never meet.
fn unique_tag() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// A failed step in a probe child: 1-based step number and errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChildFailure {
    step: u8,
    errno: i32,
}

impl ChildFailure {
    fn describe(&self, steps: &[&str]) -> String {
        let what = steps.get(usize::from(self.step).saturating_sub(1)).copied().unwrap_or("an unknown step");
        if self.errno == 0 {
            format!("failed to {what}")
        } else {
            format!("failed to {what}: {}", io::Error::from_raw_os_error(self.errno))
        }
    }
}

/// Tags a failed system call in a probe child with its 1-based step number.
fn step(n: u8) -> impl FnOnce(io::Error) -> (u8, i32) {
    move |e| (n, e.raw_os_error().unwrap_or(libc::EIO))
}

fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// Runs `f` in a forked child and returns its verdict. `f` must only make
/// raw system calls on data prepared before the fork (no allocation, no
/// locks, no panics), since the child of a multi-threaded process inherits
/// other threads' locks in whatever state they were.
fn in_child<F>(f: F) -> io::Result<Result<(), ChildFailure>>
where
    F: FnOnce() -> Result<(), (u8, i32)>,
{
    let (read_end, write_end) = cloexec_pipe()?;
    let write_raw = write_end.as_raw_fd();
    // SAFETY: the child runs `f`, restricted as documented above, and writes
    // its report from a stack buffer with a raw write.
    let pid = unsafe {
        sys::fork_child(|| {
            let (step, errno) = f().err().unwrap_or((0, 0));
            let e = errno.to_ne_bytes();
            let msg = [step, e[0], e[1], e[2], e[3]];
            if sys::raw_write_all(write_raw, &msg).is_ok() { 0 } else { 1 }
        })
    }?;
    drop(write_end);
    let mut msg = [0u8; 5];
    let read = fs::File::from(read_end).read_exact(&mut msg);
    let status = sys::wait_pid(pid)?;
    if read.is_err() {
        return Err(io::Error::other(format!(
            "probe child {pid} ended without a report (wait status {status:#x})"
        )));
    }
    let errno = i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]]);
    Ok(match msg[0] {
        0 => Ok(()),
        step => Err(ChildFailure { step, errno }),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn require_root(test: &str) -> bool {
        if rustix::process::geteuid().is_root() {
            return true;
        }
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test} needs root and CI=true");
        }
        eprintln!("skipping {test}: needs root");
        false
    }

    #[test]
    fn child_reports_step_and_errno() {
        assert_eq!(in_child(|| Ok(())).unwrap(), Ok(()));
        assert_eq!(
            in_child(|| Err((3, libc::EPERM))).unwrap(),
            Err(ChildFailure { step: 3, errno: libc::EPERM })
        );
        // A raw syscall failure travels back with its real errno.
        let missing = c"/nonexistent-airlock-probe/x";
        assert_eq!(
            in_child(|| sys::raw_mkdir(missing, 0o755).map_err(step(7))).unwrap(),
            Err(ChildFailure { step: 7, errno: libc::ENOENT })
        );
        let f = ChildFailure { step: 2, errno: libc::EACCES };
        assert!(f.describe(&["a", "do b"]).starts_with("failed to do b: Permission denied"));
    }

    fn facts(root: bool, writable: bool, pids: bool, landlock: Result<libc::c_long, i32>) -> HostFacts {
        let v2 = || Some(Placement::V2(PathBuf::from("/sys/fs/cgroup")));
        HostFacts {
            running_as_root: root,
            kernel: "6.1.0 #1 SMP".to_owned(),
            cgroups: CgroupSupport {
                memory: v2(),
                pids: if pids { v2() } else { None },
                cpu: v2(),
                writable,
                detail: "v2 at /sys/fs/cgroup offers [memory cpu]".to_owned(),
                hierarchies: Default::default(),
            },
            landlock_abi: landlock,
        }
    }

    fn statuses(report: &HostReport) -> Vec<(&str, Status)> {
        report.checks.iter().map(|c| (c.id, c.status)).collect()
    }

    #[test]
    fn launch_report_follows_the_facts() {
        let full = launch_report(&facts(true, true, true, Ok(4)));
        assert!(Feature::ALL.iter().all(|f| full.enforces(*f)), "{full:?}");
        assert_eq!(full.get("landlock").unwrap().detail, "Landlock ABI version 4");
        assert!(full.get("cgroup-pids").unwrap().detail.starts_with("v2 at /sys/fs/cgroup"));

        // Rootless on a host that delegates nothing: no cgroups, no size limit.
        let rootless = launch_report(&facts(false, false, true, Ok(4)));
        assert_eq!(
            statuses(&rootless),
            [
                ("landlock", Status::Ok),
                ("cgroup-memory", Status::Missing),
                ("cgroup-pids", Status::Missing),
                ("cgroup-cpu", Status::Missing),
                ("disk-quota", Status::Missing),
            ]
        );
        assert!(!rootless.enforces(Feature::Cgroups) && !rootless.enforces(Feature::DiskQuota));
        assert!(rootless.enforces(Feature::Landlock));
        assert!(rootless.checks.iter().all(|c| c.fix.is_some() == (c.status != Status::Ok)));

        // One controller missing is enough to lose the cgroups feature.
        let no_pids = launch_report(&facts(true, true, false, Ok(1)));
        assert_eq!(no_pids.get("cgroup-pids").unwrap().status, Status::Missing);
        assert_eq!(no_pids.get("cgroup-memory").unwrap().status, Status::Ok);
        assert!(!no_pids.enforces(Feature::Cgroups));

        // Landlock built in but not enabled at boot names the boot parameter.
        let off = launch_report(&facts(true, true, true, Err(libc::EOPNOTSUPP)));
        assert!(!off.enforces(Feature::Landlock));
        assert!(off.get("landlock").unwrap().fix.as_deref().unwrap().contains("lsm="));
        let absent = launch_report(&facts(true, true, true, Err(libc::ENOSYS)));
        assert!(absent.get("landlock").unwrap().fix.as_deref().unwrap().contains("5.13"));
    }

    /// The doctor's trials make cgroups named after this process; a test
    /// that checks none is left must not overlap another one's trials.
    static DOCTOR_PROBES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn doctor_never_reports_a_feature_a_launch_would_miss() {
        let _one_at_a_time = DOCTOR_PROBES.lock().unwrap_or_else(|e| e.into_inner());
        let launch = probe_host(Depth::Launch);
        let doctor = probe_host(Depth::Doctor);
        assert_eq!(launch.running_as_root, doctor.running_as_root);
        for feature in Feature::ALL {
            // A trial may find more wrong than the facts show, never less.
            assert!(
                !doctor.enforces(feature) || launch.enforces(feature),
                "{feature}: {doctor:?} {launch:?}"
            );
            for id in feature.checks() {
                let (l, d) = (launch.get(id).unwrap(), doctor.get(id).unwrap());
                if l.status != Status::Ok {
                    assert_eq!(l, d, "doctor must show the launch verdict for {id}");
                }
            }
        }
        if require_root("doctor_never_reports_a_feature_a_launch_would_miss") {
            for feature in Feature::ALL {
                assert!(launch.enforces(feature) && doctor.enforces(feature), "{feature}: {doctor:?}");
            }
        }
    }

    #[test]
    fn host_report_on_this_machine() {
        let _one_at_a_time = DOCTOR_PROBES.lock().unwrap_or_else(|e| e.into_inner());
        let report = probe_host(Depth::Doctor);
        let ids: Vec<&str> = report.checks.iter().map(|c| c.id).collect();
        assert_eq!(
            ids,
            [
                "user-namespaces",
                "namespaces",
                "overlayfs-in-userns",
                "idmapped-mounts",
                "seccomp",
                "landlock",
                "cgroup-memory",
                "cgroup-pids",
                "cgroup-cpu",
                "disk-quota"
            ]
        );
        for c in &report.checks {
            assert!(!c.detail.is_empty(), "{} has no detail", c.id);
            assert_eq!(c.status == Status::Ok, c.fix.is_none(), "{c:?}");
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["checks"][0]["id"], "user-namespaces");
        assert!(matches!(json["checks"][0]["status"].as_str(), Some("ok" | "missing" | "limited")));
        assert!(!report.kernel.is_empty());
        if !require_root("host_report_on_this_machine") {
            return;
        }
        assert!(report.running_as_root);
        for id in [
            "user-namespaces",
            "namespaces",
            "seccomp",
            "landlock",
            "cgroup-memory",
            "cgroup-pids",
            "cgroup-cpu",
            "disk-quota",
        ] {
            let c = report.get(id).unwrap();
            assert_eq!(c.status, Status::Ok, "{c:?}");
        }
        assert!(report.get("no-such-check").is_none());
        // The doctor's test cgroups are gone again.
        let pid = std::process::id().to_string();
        assert!(SandboxCgroup::list().iter().all(|n| !n.starts_with(&format!("doctor-{pid}-"))));
    }
}
