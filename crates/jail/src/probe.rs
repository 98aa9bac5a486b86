//! What this host can do for the process tier, found by trying it.
//!
//! `airlock doctor` prints this report. Every check exercises the real
//! mechanism (a child creates a user namespace, mounts an overlay, installs a
//! seccomp filter, …) instead of guessing from kernel versions, because
//! distributions backport features and restrict others by sysctl or LSM.
//!
//! Checks that change process state run in a forked child so this process
//! stays untouched (a multi-threaded process cannot even `unshare` a user
//! namespace). The child runs only raw system calls on data prepared before
//! the fork, reports `(step, errno)` over a pipe and `_exit`s: after fork in a
//! multi-threaded process, allocating or taking a lock could deadlock.

use std::ffi::{CStr, CString};
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cgroup::{self, CgroupError, CgroupLimits, Placement, SandboxCgroup};

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

/// Everything `airlock doctor` reports about the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostReport {
    pub checks: Vec<Check>,
    pub running_as_root: bool,
    /// `uname -r` and `uname -v`.
    pub kernel: String,
}

impl HostReport {
    /// The check with this id.
    pub fn get(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }
}

/// Runs every check. Takes well under a second; never fails (a check that
/// cannot run reports Missing with the reason).
pub fn probe_host() -> HostReport {
    let root = rustix::process::geteuid().is_root();
    let uname = rustix::system::uname();
    let kernel = format!("{} {}", uname.release().to_string_lossy(), uname.version().to_string_lossy());
    let support = cgroup::probe();
    let checks = vec![
        check_user_namespaces(root),
        check_namespaces(),
        check_overlay_in_userns(),
        check_idmapped_mounts(root),
        check_seccomp(),
        check_landlock(),
        check_cgroup("cgroup-memory", "memory", support.memory.as_ref(), &support),
        check_cgroup("cgroup-pids", "pids", support.pids.as_ref(), &support),
        check_cgroup("cgroup-cpu", "cpu", support.cpu.as_ref(), &support),
        check_disk_quota(root),
        check_kvm(),
    ];
    HostReport { checks, running_as_root: root, kernel }
}

fn check(id: &'static str, title: &str, status: Status, detail: String, fix: Option<String>) -> Check {
    Check { id, title: title.to_owned(), status, detail, fix }
}

// ---------------------------------------------------------------------------
// Namespaces

const USERNS_STEPS: &[&str] = &[
    "create a user namespace (unshare CLONE_NEWUSER)",
    "create a mount namespace inside it (no capabilities in the new user namespace)",
];

fn check_user_namespaces(root: bool) -> Check {
    const ID: &str = "user-namespaces";
    const TITLE: &str = "user namespaces";
    // Step 2 matters: with AppArmor's userns restriction the unshare succeeds
    // but the namespace grants no capabilities, so nothing can be set up in it.
    let result = in_child(|| {
        sys::unshare(libc::CLONE_NEWUSER).map_err(|e| (1, e))?;
        sys::unshare(libc::CLONE_NEWNS).map_err(|e| (2, e))
    });
    match result {
        Ok(Ok(())) => check(
            ID,
            TITLE,
            Status::Ok,
            format!(
                "a child created a user namespace and used its capabilities (as {})",
                if root { "root" } else { "this user" }
            ),
            None,
        ),
        Ok(Err(f)) => check(ID, TITLE, Status::Missing, f.describe(USERNS_STEPS), Some(userns_fix(f.errno))),
        Err(e) => child_broken(ID, TITLE, &e),
    }
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
    const ID: &str = "namespaces";
    const TITLE: &str = "mount, pid, net, ipc, uts and cgroup namespaces";
    let steps = &["create a user namespace", "create the namespace inside it"];
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for (name, flag) in NAMESPACES {
        let flag = *flag;
        match in_child(|| {
            sys::unshare(libc::CLONE_NEWUSER).map_err(|e| (1, e))?;
            sys::unshare(flag).map_err(|e| (2, e))
        }) {
            Ok(Ok(())) => ok.push(*name),
            Ok(Err(f)) => failed.push(format!("{name}: {}", f.describe(steps))),
            Err(e) => failed.push(format!("{name}: {e}")),
        }
    }
    if failed.is_empty() {
        return check(
            ID,
            TITLE,
            Status::Ok,
            format!("created inside a new user namespace: {}", ok.join(", ")),
            None,
        );
    }
    let status = if ok.is_empty() { Status::Missing } else { Status::Limited };
    check(
        ID,
        TITLE,
        status,
        format!("failed: {}; worked: [{}]", failed.join("; "), ok.join(", ")),
        Some(
            "enable the missing namespaces in the kernel (CONFIG_*_NS), and see the \
             user-namespaces check"
                .to_owned(),
        ),
    )
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
    const ID: &str = "overlayfs-in-userns";
    const TITLE: &str = "overlayfs inside a user namespace";
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
        return check(
            ID,
            TITLE,
            Status::Missing,
            format!("the temporary directory {} contains a NUL byte", base.display()),
            Some("set TMPDIR to a plain path".to_owned()),
        );
    };
    let uid_map = format!("0 {uid} 1");
    let gid_map = format!("0 {gid} 1");
    let result = in_child(|| {
        sys::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS).map_err(|e| (1, e))?;
        sys::write_file(c"/proc/self/setgroups", b"deny").map_err(|e| (2, e))?;
        sys::write_file(c"/proc/self/uid_map", uid_map.as_bytes()).map_err(|e| (3, e))?;
        sys::write_file(c"/proc/self/gid_map", gid_map.as_bytes()).map_err(|e| (4, e))?;
        sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None).map_err(|e| (5, e))?;
        // The tmpfs hides the real temp dir only inside this child's mount
        // namespace, so nothing is left behind on the host.
        sys::mount(Some(c"tmpfs"), &base_c, Some(c"tmpfs"), 0, Some(c"size=4m")).map_err(|e| (6, e))?;
        for (step, dir) in [(7, &lower), (8, &upper), (9, &work), (10, &merged)] {
            sys::mkdir(dir).map_err(|e| (step, e))?;
        }
        sys::mount(Some(c"overlay"), &merged, Some(c"overlay"), 0, Some(&options)).map_err(|e| (11, e))?;
        sys::create_file(&file).map_err(|e| (12, e))
    });
    match result {
        Ok(Ok(())) => check(
            ID,
            TITLE,
            Status::Ok,
            "a child mapped itself to root in a new user namespace, mounted an overlay \
             (userxattr) on a tmpfs and wrote through it"
                .to_owned(),
            None,
        ),
        Ok(Err(f)) => check(
            ID,
            TITLE,
            Status::Missing,
            f.describe(OVERLAY_STEPS),
            Some(if f.step <= 4 {
                "see the user-namespaces check".to_owned()
            } else {
                "overlayfs in user namespaces needs Linux 5.11 or later with overlay \
                 built in (modprobe overlay); or run airlock as root"
                    .to_owned()
            }),
        ),
        Err(e) => child_broken(ID, TITLE, &e),
    }
}

// ---------------------------------------------------------------------------
// Idmapped mounts

const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` from <linux/mount.h> (not in the libc crate).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn check_idmapped_mounts(root: bool) -> Check {
    const ID: &str = "idmapped-mounts";
    const TITLE: &str = "idmapped mounts";
    if !root {
        return check(
            ID,
            TITLE,
            Status::Missing,
            "not tried: creating an idmapped mount needs root (CAP_SYS_ADMIN in the initial \
             user namespace)"
                .to_owned(),
            Some("run airlock as root to map workspace ownership with idmapped mounts".to_owned()),
        );
    }
    let dir = std::env::temp_dir().join(format!("airlock-idmap-probe-{}", std::process::id()));
    if let Err(e) = fs::create_dir(&dir) {
        return check(
            ID,
            TITLE,
            Status::Missing,
            format!("cannot create the probe directory {}: {e}", dir.display()),
            Some("make the temporary directory (TMPDIR) writable".to_owned()),
        );
    }
    let result = try_idmap(&dir);
    let _ = fs::remove_dir(&dir);
    let fstype = fs_name(&dir);
    match result {
        Ok(()) => {
            check(ID, TITLE, Status::Ok, format!("idmapped a clone of {} ({fstype})", dir.display()), None)
        }
        Err(IdmapError::Syscall(what, e)) => {
            let why = match e.raw_os_error() {
                Some(libc::ENOSYS) => "the kernel has no mount_setattr (needs Linux 5.12+)".to_owned(),
                Some(libc::EINVAL) => format!("{fstype} does not support idmapped mounts here"),
                _ => format!("{what} failed: {e}"),
            };
            check(
                ID,
                TITLE,
                Status::Missing,
                format!("{why} (tried on {})", dir.display()),
                Some(
                    "use Linux 6.3+ (idmapped tmpfs) or keep the state directory on ext4, \
                     xfs or btrfs"
                        .to_owned(),
                ),
            )
        }
        Err(IdmapError::Setup(e)) => child_broken(ID, TITLE, &e),
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
    let (ready_r, ready_w) = sys::pipe().map_err(IdmapError::Setup)?;
    let ready_w_raw = ready_w.as_raw_fd();
    let helper = sys::fork(|| -> Result<(), (u8, i32)> {
        sys::unshare(libc::CLONE_NEWUSER).map_err(|e| (1, e))?;
        sys::write_byte(ready_w_raw).map_err(|e| (2, e))?;
        sys::pause_forever()
    })
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
        let tree = rustix::mount::open_tree(
            rustix::fs::CWD,
            dir,
            rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC,
        )
        .map_err(|e| IdmapError::Syscall("open_tree", e.into()))?;
        let fd = u64::try_from(userns.as_raw_fd())
            .map_err(|_| IdmapError::Setup(io::Error::other("negative fd")))?;
        let attr = MountAttr { attr_set: MOUNT_ATTR_IDMAP, attr_clr: 0, propagation: 0, userns_fd: fd };
        sys::mount_setattr(tree.as_raw_fd(), &attr).map_err(|e| IdmapError::Syscall("mount_setattr", e))
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
    const ID: &str = "seccomp";
    const TITLE: &str = "seccomp filters";
    let status_text = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field =
        |key: &str| status_text.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_owned());
    let Some(mode) = field("Seccomp:") else {
        return check(
            ID,
            TITLE,
            Status::Missing,
            "/proc/self/status has no Seccomp field: the kernel is built without CONFIG_SECCOMP".to_owned(),
            Some("use a kernel with CONFIG_SECCOMP_FILTER=y".to_owned()),
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
        sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(|e| (1, e))?;
        sys::seccomp_filter(&fprog).map_err(|e| (2, e))
    });
    let steps = &["set no_new_privs", "install a seccomp filter"];
    match result {
        Ok(Ok(())) => check(
            ID,
            TITLE,
            Status::Ok,
            format!(
                "a child installed a filter; airlock itself runs with Seccomp mode {mode} and \
                 {inherited} inherited filter(s), which sandboxes stack on"
            ),
            None,
        ),
        Ok(Err(f)) => check(
            ID,
            TITLE,
            Status::Missing,
            f.describe(steps),
            Some("use a kernel with CONFIG_SECCOMP_FILTER=y".to_owned()),
        ),
        Err(e) => child_broken(ID, TITLE, &e),
    }
}

fn check_landlock() -> Check {
    const ID: &str = "landlock";
    const TITLE: &str = "Landlock";
    match sys::landlock_abi() {
        Ok(abi) => check(ID, TITLE, Status::Ok, format!("Landlock ABI version {abi}"), None),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => check(
            ID,
            TITLE,
            Status::Missing,
            "the kernel has Landlock but it is not enabled at boot".to_owned(),
            Some(
                "add landlock to the kernel's lsm= boot parameter (e.g. \
                 lsm=landlock,lockdown,yama,integrity,apparmor,bpf) and reboot"
                    .to_owned(),
            ),
        ),
        Err(e) => check(
            ID,
            TITLE,
            Status::Missing,
            format!("landlock_create_ruleset failed: {e}"),
            Some("use Linux 5.13+ built with CONFIG_SECURITY_LANDLOCK=y".to_owned()),
        ),
    }
}

// ---------------------------------------------------------------------------
// cgroups, disk quota, KVM

fn check_cgroup(
    id: &'static str,
    controller: &str,
    placement: Option<&Placement>,
    support: &cgroup::CgroupSupport,
) -> Check {
    let title = format!("cgroup {controller} limits");
    let Some(placement) = placement else {
        return check(
            id,
            &title,
            Status::Missing,
            format!("no hierarchy offers the {controller} controller ({})", support.detail),
            Some(format!(
                "mount the {controller} controller (cgroup v2 with it enabled, or \
                 `mount -t cgroup -o {controller} cgroup /sys/fs/cgroup/{controller}`), \
                 or remove the {controller} limit from the policy"
            )),
        );
    };
    let where_ = match placement {
        Placement::V1(p) => format!("v1 at {}", p.display()),
        Placement::V2(p) => format!("v2 at {}", p.display()),
    };
    let limits = match controller {
        "memory" => CgroupLimits { memory: Some(64 << 20), ..CgroupLimits::default() },
        "pids" => CgroupLimits { pids: Some(64), ..CgroupLimits::default() },
        _ => CgroupLimits { cpus: Some(1.0), ..CgroupLimits::default() },
    };
    // Really create one: write access to the mount point says little about
    // enabling controllers or writing limit files.
    let name = format!("doctor-{}-{controller}", std::process::id());
    let created = SandboxCgroup::create(&name, &limits).and_then(|cg| cg.remove());
    match created {
        Ok(()) => check(
            id,
            &title,
            Status::Ok,
            format!("{where_}; a test cgroup with a {controller} limit was created and removed"),
            None,
        ),
        Err(CgroupError::NotPermitted { fix, source, path }) => check(
            id,
            &title,
            Status::Missing,
            format!("{where_}, but cannot create {}: {source}", path.display()),
            Some(fix),
        ),
        Err(CgroupError::ControllerMissing { fix, .. }) => {
            check(id, &title, Status::Missing, where_, Some(fix))
        }
        Err(e) => check(
            id,
            &title,
            Status::Missing,
            format!("{where_}, but a test cgroup failed: {e}"),
            Some("run `airlock gc`, then retry; report a bug if it persists".to_owned()),
        ),
    }
}

const DISK_QUOTA_STEPS: &[&str] = &[
    "create a mount namespace",
    "make mounts private",
    "mount a size-limited tmpfs",
    "statfs the tmpfs",
    "check the tmpfs size (it was not limited)",
];

fn check_disk_quota(root: bool) -> Check {
    const ID: &str = "disk-quota";
    const TITLE: &str = "size limit for the writable layer";
    if !root {
        return check(
            ID,
            TITLE,
            Status::Missing,
            "the workspace's writable layer cannot be size-limited without root".to_owned(),
            Some("run airlock as root to cap the writable layer's size".to_owned()),
        );
    }
    let Ok(dir) = CString::new(std::env::temp_dir().as_os_str().as_bytes()) else {
        return check(
            ID,
            TITLE,
            Status::Missing,
            "the temporary directory path contains a NUL byte".to_owned(),
            Some("set TMPDIR to a plain path".to_owned()),
        );
    };
    const LIMIT: u64 = 1 << 20;
    let result = in_child(|| {
        sys::unshare(libc::CLONE_NEWNS).map_err(|e| (1, e))?;
        sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None).map_err(|e| (2, e))?;
        sys::mount(Some(c"tmpfs"), &dir, Some(c"tmpfs"), 0, Some(c"size=1m")).map_err(|e| (3, e))?;
        let bytes = sys::fs_bytes(&dir).map_err(|e| (4, e))?;
        if bytes > LIMIT {
            return Err((5, 0));
        }
        Ok(())
    });
    match result {
        Ok(Ok(())) => check(
            ID,
            TITLE,
            Status::Ok,
            "a child mounted a 1 MiB tmpfs in its own mount namespace and the kernel \
             enforced the size"
                .to_owned(),
            None,
        ),
        Ok(Err(f)) => check(
            ID,
            TITLE,
            Status::Missing,
            f.describe(DISK_QUOTA_STEPS),
            Some("use a kernel with tmpfs (CONFIG_TMPFS=y)".to_owned()),
        ),
        Err(e) => child_broken(ID, TITLE, &e),
    }
}

fn check_kvm() -> Check {
    const ID: &str = "kvm";
    const TITLE: &str = "KVM for the microVM tier";
    const LATER: &str = "the microVM tier is not in this version, so nothing uses it yet";
    let path = Path::new("/dev/kvm");
    if !path.exists() {
        return check(
            ID,
            TITLE,
            Status::Missing,
            format!("/dev/kvm does not exist; {LATER}"),
            Some(
                "enable virtualization in the firmware and load kvm_intel or kvm_amd \
                 (on a cloud VM: pick an instance type with nested virtualization)"
                    .to_owned(),
            ),
        );
    }
    match fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => check(ID, TITLE, Status::Ok, format!("/dev/kvm opens read-write; {LATER}"), None),
        Err(e) => check(
            ID,
            TITLE,
            Status::Limited,
            format!("/dev/kvm exists but cannot be opened read-write: {e}; {LATER}"),
            Some(
                "add your user to the kvm group (`sudo usermod -aG kvm $USER`), then log in again".to_owned(),
            ),
        ),
    }
}

// ---------------------------------------------------------------------------
// Child processes

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

fn child_broken(id: &'static str, title: &str, e: &io::Error) -> Check {
    check(
        id,
        title,
        Status::Missing,
        format!("the probe could not run: {e}"),
        Some("check process limits (ulimit -u) and retry".to_owned()),
    )
}

/// Runs `f` in a forked child and returns its verdict. `f` must only make
/// raw system calls on data prepared before the fork (no allocation, no
/// locks, no panics), since the child of a multi-threaded process inherits
/// other threads' locks in whatever state they were.
fn in_child<F>(f: F) -> io::Result<Result<(), ChildFailure>>
where
    F: FnOnce() -> Result<(), (u8, i32)>,
{
    let (read_end, write_end) = sys::pipe()?;
    let write_raw = write_end.as_raw_fd();
    let pid = sys::fork(|| {
        let (step, errno) = match f() {
            Ok(()) => (0u8, 0i32),
            Err(e) => e,
        };
        let e = errno.to_ne_bytes();
        let msg = [step, e[0], e[1], e[2], e[3]];
        sys::write_all(write_raw, &msg).map_err(|e| (0, e))
    })?;
    drop(write_end);
    let mut msg = [0u8; 5];
    let read = fs::File::from(read_end).read_exact(&mut msg);
    let status = sys::wait(pid)?;
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

/// The raw system calls the probes use, each unsafe block in its own small
/// function. Functions used in children neither allocate nor lock.
mod sys {
    use super::*;

    fn errno() -> i32 {
        io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
    }

    fn check(ret: libc::c_int) -> Result<(), i32> {
        if ret < 0 { Err(errno()) } else { Ok(()) }
    }

    pub(super) fn unshare(flags: libc::c_int) -> Result<(), i32> {
        // SAFETY: unshare only changes this process's namespaces; probes call
        // it in forked children, never in the caller.
        check(unsafe { libc::unshare(flags) })
    }

    pub(super) fn prctl(option: libc::c_int, arg: libc::c_ulong) -> Result<(), i32> {
        // SAFETY: the options used (PR_SET_NO_NEW_PRIVS) take integer
        // arguments only; called in probe children.
        check(unsafe { libc::prctl(option, arg, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) })
    }

    pub(super) fn seccomp_filter(prog: &libc::sock_fprog) -> Result<(), i32> {
        // SAFETY: prog points at a valid program that outlives the call; the
        // kernel copies it.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0 as libc::c_uint,
                prog as *const libc::sock_fprog,
            )
        };
        if ret < 0 { Err(errno()) } else { Ok(()) }
    }

    pub(super) fn landlock_abi() -> io::Result<i64> {
        const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
        // SAFETY: with a null attribute pointer, size 0 and the VERSION flag
        // the kernel only returns the ABI number; no memory is touched.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<libc::c_void>(),
                0usize,
                LANDLOCK_CREATE_RULESET_VERSION,
            )
        };
        if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
    }

    pub(super) fn mount_setattr(tree: RawFd, attr: &MountAttr) -> io::Result<()> {
        // SAFETY: tree is an open detached-mount fd, the empty path with
        // AT_EMPTY_PATH names it, and attr is a valid struct of the size passed.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree,
                c"".as_ptr(),
                libc::AT_EMPTY_PATH as libc::c_uint,
                attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    pub(super) fn mount(
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> Result<(), i32> {
        let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
        // SAFETY: every pointer is null or a NUL-terminated string alive for
        // the call; called only in probe children with their own mount
        // namespace, so the host's mounts are unaffected.
        check(unsafe { libc::mount(ptr(source), target.as_ptr(), ptr(fstype), flags, ptr(data).cast()) })
    }

    pub(super) fn mkdir(path: &CStr) -> Result<(), i32> {
        // SAFETY: path is NUL-terminated and alive for the call.
        check(unsafe { libc::mkdir(path.as_ptr(), 0o755) })
    }

    fn open(path: &CStr, flags: libc::c_int) -> Result<RawFd, i32> {
        // SAFETY: path is NUL-terminated and alive for the call.
        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0o644 as libc::c_uint) };
        if fd < 0 { Err(errno()) } else { Ok(fd) }
    }

    fn close(fd: RawFd) {
        // SAFETY: fd was opened by the caller and is not used afterwards.
        unsafe { libc::close(fd) };
    }

    pub(super) fn write_all(fd: RawFd, mut data: &[u8]) -> Result<(), i32> {
        while !data.is_empty() {
            // SAFETY: data is a valid buffer of the length passed.
            let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
            if n < 0 {
                let e = errno();
                if e == libc::EINTR {
                    continue;
                }
                return Err(e);
            }
            let n = usize::try_from(n).unwrap_or(0);
            if n == 0 {
                return Err(libc::EIO);
            }
            data = data.get(n..).unwrap_or_default();
        }
        Ok(())
    }

    pub(super) fn write_byte(fd: RawFd) -> Result<(), i32> {
        write_all(fd, b"r")
    }

    /// Writes a whole /proc control file in one go.
    pub(super) fn write_file(path: &CStr, data: &[u8]) -> Result<(), i32> {
        let fd = open(path, libc::O_WRONLY)?;
        let r = write_all(fd, data);
        close(fd);
        r
    }

    pub(super) fn create_file(path: &CStr) -> Result<(), i32> {
        let fd = open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL)?;
        let r = write_all(fd, b"ok");
        close(fd);
        r
    }

    /// Total size in bytes of the filesystem at `path`.
    pub(super) fn fs_bytes(path: &CStr) -> Result<u64, i32> {
        // SAFETY: statfs64 is plain old data; all-zero is a valid value.
        let mut st: libc::statfs64 = unsafe { std::mem::zeroed() };
        // SAFETY: path is NUL-terminated; st is a valid out-pointer.
        check(unsafe { libc::statfs64(path.as_ptr(), &mut st) })?;
        // f_blocks is u64 in statfs64; f_bsize is a signed word but positive.
        let blocks: u64 = st.f_blocks;
        Ok(blocks.saturating_mul(st.f_bsize as u64))
    }

    pub(super) fn pause_forever() -> ! {
        loop {
            // SAFETY: pause has no preconditions.
            unsafe { libc::pause() };
        }
    }

    pub(super) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds is a valid array of two ints for the kernel to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    }

    /// Forks; the child runs `f` and `_exit`s (0 when `f` succeeded, 1
    /// otherwise) without returning into the caller's code.
    pub(super) fn fork<F, T>(f: F) -> io::Result<libc::pid_t>
    where
        F: FnOnce() -> Result<T, (u8, i32)>,
    {
        // SAFETY: the child only runs `f`, which callers restrict to raw
        // system calls on pre-built data, then _exit; it never unwinds or
        // returns into code that might use locks held by other threads.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            let code = if f().is_ok() { 0 } else { 1 };
            // SAFETY: _exit skips atexit handlers and destructors, which is
            // what a forked child of a multi-threaded process must do.
            unsafe { libc::_exit(code) };
        }
        Ok(pid)
    }

    /// Waits for `pid`; returns the raw wait status.
    pub(super) fn wait(pid: libc::pid_t) -> io::Result<libc::c_int> {
        let mut status = 0;
        loop {
            // SAFETY: status is a valid out-pointer for the call.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
            if r == pid {
                return Ok(status);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    pub(super) fn kill_and_reap(pid: libc::pid_t) {
        // SAFETY: pid is our own child that has not been reaped, so it cannot
        // have been reused by another process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = wait(pid);
    }
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
            in_child(|| sys::mkdir(missing).map_err(|e| (7, e))).unwrap(),
            Err(ChildFailure { step: 7, errno: libc::ENOENT })
        );
        let f = ChildFailure { step: 2, errno: libc::EACCES };
        assert!(f.describe(&["a", "do b"]).starts_with("failed to do b: Permission denied"));
    }

    #[test]
    fn host_report_on_this_machine() {
        let report = probe_host();
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
                "disk-quota",
                "kvm"
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
        assert!(report.get("kvm").unwrap().detail.contains("microVM tier"));
        assert!(report.get("no-such-check").is_none());
        // The doctor's test cgroups are gone again.
        let pid = std::process::id().to_string();
        assert!(SandboxCgroup::list().iter().all(|n| !n.starts_with(&format!("doctor-{pid}-"))));
    }
}
