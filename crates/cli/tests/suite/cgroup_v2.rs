//! Pure cgroup v2, the layout of most real hosts. This machine is hybrid
//! (v1 controllers), so the test boots a real kernel in QEMU where the
//! unified hierarchy holds every controller, and runs airlock there: the
//! host's root filesystem is the guest's, read-only over 9p, so the guest
//! runs this very build. Software emulation (TCG) on purpose: KVM here only
//! runs guests built for the host's nested hypervisor, and a stock kernel
//! hangs under it.
//!
//! The guest hides the host's /tmp, /run, /var/tmp and /root behind its own
//! tmpfs (its root is read-only), so a checkout there would be out of its
//! sight: the binary's directory and the test's directory are shared again
//! explicitly, each as its own 9p mount at its real path.
//!
//! What the guest checks it writes as `CHECK name value` lines to a file in
//! the test's directory (and to its console, for the failure message); the
//! test reads them back.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::support::*;

/// The guest's init: loads 9p over virtio, mounts the host's root
/// read-only, and hands over to the test's script there.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in $(/bin/busybox cat /modules.order); do /bin/busybox insmod /mods/$m.ko || echo "insmod $m failed"; done
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 root /newroot || /bin/busybox poweroff -f
/bin/busybox umount /proc /sys /dev
exec /bin/busybox switch_root /newroot /bin/sh "$SCRIPT"
"#;

/// Modules the guest needs, each after what it depends on.
const MODULES: [&str; 11] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "overlay",
];

/// The newest installed kernel with its modules: (vmlinuz, modules dir).
fn kernel() -> Option<(PathBuf, PathBuf)> {
    let mut found: Vec<(PathBuf, PathBuf)> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name.strip_prefix("vmlinuz-")?.to_owned();
            let modules = Path::new("/lib/modules").join(&version);
            modules.join("kernel/fs/9p/9p.ko").exists().then_some((e.path(), modules))
        })
        .collect();
    found.sort();
    found.pop()
}

fn available(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the initramfs (busybox, the modules, the init) in `dir`.
fn initramfs(dir: &Path, modules: &Path, script: &Path) -> PathBuf {
    let root = dir.join("initrd");
    for sub in ["bin", "mods", "proc", "sys", "dev", "newroot"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for module in MODULES {
        let out =
            Command::new("find").arg(modules).args(["-name", &format!("{module}.ko")]).output().unwrap();
        let path = String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_owned);
        let path = path.unwrap_or_else(|| panic!("module {module} not found below {}", modules.display()));
        std::fs::copy(path, root.join(format!("mods/{module}.ko"))).unwrap();
    }
    std::fs::write(root.join("modules.order"), MODULES.join("\n")).unwrap();
    let init = INIT.replace("\"$SCRIPT\"", &sh_quote(script));
    std::fs::write(root.join("init"), init).unwrap();
    std::fs::set_permissions(root.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let image = dir.join("initrd.gz");
    let packed = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc 2>/dev/null | gzip > '{}'",
            root.display(),
            image.display()
        ))
        .status()
        .unwrap();
    assert!(packed.success(), "packing the initramfs failed");
    image
}

/// A host directory shared into the guest at the same path.
struct Share {
    tag: &'static str,
    path: PathBuf,
    writable: bool,
}

impl Share {
    /// QEMU's `-virtfs` option (a comma in a path is written twice).
    fn virtfs(&self) -> String {
        let path = self.path.to_str().expect("a UTF-8 path for QEMU").replace(',', ",,");
        let access = if self.writable { "" } else { ",readonly=on" };
        format!("local,path={path},mount_tag={},security_model=none,multidevs=remap{access}", self.tag)
    }

    /// The guest's command that mounts it. Read-only shares may be cached
    /// (what runs from them is mapped); the results share is not, so every
    /// line the guest writes reaches the host before it powers off.
    fn guest_mount(&self) -> String {
        let options = if self.writable {
            "trans=virtio,version=9p2000.L,msize=512000"
        } else {
            "trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000"
        };
        let path = sh_quote(&self.path);
        format!("mkdir -p {path} && mount -t 9p -o {options} {} {path}", self.tag)
    }
}

/// The directories the guest needs from the host besides its root: the
/// binary's (read-only) and the test's (for the results). Shallower first,
/// so that one inside another is mounted after it.
fn shares(test_dir: &Path) -> Vec<Share> {
    let bin_dir = Path::new(BIN).parent().expect("the binary has a directory").to_path_buf();
    let mut shares = vec![
        Share { tag: "airlock-bin", path: bin_dir, writable: false },
        Share { tag: "airlock-test", path: test_dir.to_path_buf(), writable: true },
    ];
    shares.sort_by_key(|s| s.path.components().count());
    shares
}

/// `path` as one word for sh, whatever characters it holds.
fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.to_str().expect("a UTF-8 path for the guest's shell").replace('\'', r"'\''"))
}

/// The guest's test: a pure v2 hierarchy with memory, pids and cpu
/// delegated at the root, then airlock's doctor and limits.
fn guest_script(state: &Path, results: &Path, shares: &[Share]) -> String {
    let mounts: Vec<String> = shares.iter().map(Share::guest_mount).collect();
    format!(
        r#"#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
# Writable places of its own on the read-only root, then what it needs of
# the host's below them again.
for d in /tmp /run /var/tmp /root; do mount -t tmpfs tmpfs $d; done
{mounts}
R={results}
check() {{ echo "CHECK $*"; echo "CHECK $*" >> "$R"; }}
mount -t cgroup2 none /sys/fs/cgroup
echo "+memory +pids +cpu" > /sys/fs/cgroup/cgroup.subtree_control
check v1-mounted $(grep -c ' - cgroup ' /proc/self/mountinfo)
export AIRLOCK_STATE_DIR={state}
A={bin}
check binary $(test -x "$A" && echo found || echo missing)
"$A" doctor > /tmp/doctor 2>&1
for c in cgroup-memory cgroup-pids cgroup-cpu; do check $c $(grep -c "^\[ok *\] $c .*v2 at /sys/fs/cgroup" /tmp/doctor); done
"$A" run --rm --policy ci --mode none -- sh -c 'echo inside' > /tmp/out 2>&1
check run $? $(grep -c '^inside$' /tmp/out)
AIRLOCK_LOG=debug NO_COLOR=1 "$A" run --rm --policy ci --mode none -- true > /tmp/out 2>&1
check cloned-into-cgroup $? $(grep -c 'the agent was cloned into its cgroup' /tmp/out)
"$A" run --rm --policy ci --mode none --pids 20 -- sh -c 'for i in $(seq 40); do sleep 5 & done; wait' > /tmp/out 2>&1
check pids $(grep -c 'Cannot fork\|Resource temporarily unavailable' /tmp/out)
"$A" run --rm --policy ci --mode none --memory 32M -- sh -c 'head -c 200M /dev/zero | tail > /dev/null; echo "hog $?"' > /tmp/out 2>&1
check memory $(grep -c 'memory limit reached' /tmp/out) $(grep -c 'hog 0' /tmp/out)
"$A" run --rm --policy ci --mode none --cpus 0.5 -- sh -c 'cat /proc/self/cgroup' > /tmp/out 2>&1
check cpus $?
"$A" run --rm --policy ci --mode none --timeout 2s -- sleep 60 > /tmp/out 2>&1
check timeout $?
check leftovers $(find /sys/fs/cgroup -mindepth 1 -type d | grep -vx /sys/fs/cgroup/airlock | wc -l) $(find /sys/fs/cgroup/airlock -mindepth 1 -type d | wc -l)
check done
sync
echo o > /proc/sysrq-trigger
"#,
        mounts = mounts.join("\n"),
        results = sh_quote(results),
        state = sh_quote(state),
        bin = sh_quote(Path::new(BIN)),
    )
}

#[test]
fn pure_cgroup_v2_host_in_a_vm() {
    let kernel = kernel();
    let ready = kernel.is_some()
        && available("qemu-system-x86_64")
        && available("cpio")
        && Path::new("/bin/busybox").exists();
    if !require(
        ready && is_root(),
        "root, a kernel in /boot with its modules, qemu-system-x86_64, busybox and cpio (scripts/test.sh installs them)",
    ) {
        return;
    }
    let (vmlinuz, modules) = kernel.unwrap();
    // Below /tmp on purpose, one of the directories the guest hides: every
    // run proves that the explicit shares reach what a checkout there holds.
    let dir = tempfile::Builder::new().prefix("airlock-v2-").tempdir_in("/tmp").unwrap();
    let shares = shares(dir.path());
    let script = dir.path().join("guest.sh");
    let results = dir.path().join("checks");
    std::fs::write(&script, guest_script(Path::new("/tmp/state"), &results, &shares)).unwrap();
    let image = initramfs(dir.path(), &modules, &script);
    let mut qemu = Command::new("timeout");
    qemu.args(["600", "qemu-system-x86_64", "-accel", "tcg", "-m", "2048", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&image)
        .args(["-append", "console=ttyS0 loglevel=3 panic=-1 lsm=landlock,yama"])
        .args(["-virtfs", "local,path=/,mount_tag=root,security_model=none,readonly=on,multidevs=remap"]);
    for share in &shares {
        qemu.arg("-virtfs").arg(share.virtfs());
    }
    let out = qemu.stdin(Stdio::null()).output().unwrap();
    let console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let checks = std::fs::read_to_string(&results).unwrap_or_default();
    let check = |name: &str| -> String {
        checks
            .lines()
            .find_map(|l| l.strip_prefix(&format!("CHECK {name} ")).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| {
                panic!("no CHECK {name} in {}; the guest's console:\n{console}", results.display())
            })
    };
    let finished = if console.contains("CHECK done") { "finished" } else { "did not finish" };
    assert!(
        checks.contains("CHECK done"),
        "no results in {} (the guest {finished}):\n{console}",
        results.display()
    );
    assert_eq!(check("binary"), "found", "the guest does not see {BIN}:\n{console}");
    // Nothing of v1: this really is a pure v2 host.
    assert_eq!(check("v1-mounted"), "0", "{console}");
    for controller in ["cgroup-memory", "cgroup-pids", "cgroup-cpu"] {
        assert_eq!(check(controller), "1", "doctor does not find {controller} on v2:\n{console}");
    }
    assert_eq!(check("run"), "0 1", "{console}");
    // Started in its cgroup (clone3), not moved there; the limits below
    // prove it is the right one.
    assert_eq!(check("cloned-into-cgroup"), "0 1", "{console}");
    assert_ne!(check("pids"), "0", "the pids limit did not stop a fork bomb:\n{console}");
    // The hog is killed (or the whole sandbox with it) and airlock says why.
    assert_eq!(check("memory"), "1 0", "the memory limit did not hold:\n{console}");
    assert_eq!(check("cpus"), "0", "{console}");
    assert_eq!(check("timeout"), "124", "{console}");
    // Only the shared parent stays, empty.
    assert_eq!(check("leftovers"), "0 0", "cgroups left behind:\n{console}");
}
