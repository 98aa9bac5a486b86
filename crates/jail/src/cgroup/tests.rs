#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

/// Root tests need root; elsewhere they explain and skip, except in CI
/// where a skip would hide a regression.
fn require_root(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} needs root and CI=true");
    }
    eprintln!("skipping {test}: needs root to create cgroups");
    false
}

/// A parent segment unique to this test process and test, so parallel tests
/// and real sandboxes never see each other's cgroups.
fn test_parent(test: &str) -> String {
    format!("airlock-test-{}-{test}", std::process::id())
}

/// remove() also removes the parent once the last sandbox is gone.
fn assert_parents_removed(paths: &[PathBuf]) {
    for p in paths {
        let parent = p.parent().unwrap();
        assert!(!parent.exists(), "{} left behind", parent.display());
    }
}

/// Forks a child that sleeps in pause() until killed. The child makes only
/// the pause syscall, so forking from the multi-threaded test harness is safe.
fn fork_sleeper() -> i32 {
    // SAFETY: the child only calls async-signal-safe pause() and never
    // returns into Rust code that could touch locks held by other threads.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed: {}", io::Error::last_os_error());
    if pid == 0 {
        loop {
            // SAFETY: pause has no preconditions.
            unsafe { libc::pause() };
        }
    }
    pid
}

/// Waits for `pid` and returns the signal that ended it, if any.
fn wait_signal(pid: i32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: status points at a valid c_int for the duration of the call.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", io::Error::last_os_error());
    libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
}

/// The file holding `controller`'s limit for the cgroup at `paths`, in
/// whichever hierarchy the host places it.
fn limit_file(placement: &Placement, paths: &[PathBuf], v1: &str, v2: &str) -> PathBuf {
    let dir = paths
        .iter()
        .find(|p| p.starts_with(placement.mount()))
        .expect("a directory in the controller's hierarchy");
    match placement {
        Placement::V1(_) => dir.join(v1),
        Placement::V2(_) => dir.join(v2),
    }
}

fn read_trimmed(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())).trim().to_owned()
}

#[test]
fn limits_are_written_and_kill_all_and_remove_clean_up() {
    if !require_root("limits_are_written_and_kill_all_and_remove_clean_up") {
        return;
    }
    let support = probe();
    assert!(support.writable, "{}", support.detail);
    let parent = test_parent("limits");
    let limits = CgroupLimits { memory: Some(64 << 20), pids: Some(32), cpus: Some(0.5) };
    let cg = SandboxCgroup::create_in(&parent, "sbx-1", &limits).unwrap();
    assert_eq!(cg.name(), "sbx-1");
    let paths = cg.paths();
    assert!(!paths.is_empty());
    for p in &paths {
        assert!(p.is_dir(), "{} missing", p.display());
        assert!(p.ends_with(format!("{parent}/sbx-1")));
    }

    let mem = support.memory.clone().unwrap();
    let (v1_mem, v2_mem) = ("memory.limit_in_bytes", "memory.max");
    assert_eq!(read_trimmed(&limit_file(&mem, &paths, v1_mem, v2_mem)), (64u64 << 20).to_string());
    let pids = support.pids.clone().unwrap();
    assert_eq!(read_trimmed(&limit_file(&pids, &paths, "pids.max", "pids.max")), "32");
    let cpu = support.cpu.clone().unwrap();
    let cpu_value = read_trimmed(&limit_file(&cpu, &paths, "cpu.cfs_quota_us", "cpu.max"));
    match cpu {
        Placement::V1(_) => assert_eq!(cpu_value, "50000"),
        Placement::V2(_) => assert_eq!(cpu_value, "50000 100000"),
    }

    // A second sandbox of the same name is refused, not merged.
    assert!(matches!(
        SandboxCgroup::create_in(&parent, "sbx-1", &limits),
        Err(CgroupError::AlreadyExists { .. })
    ));

    let child = fork_sleeper();
    cg.add_pid(child).unwrap();
    assert_eq!(cg.pids(), vec![child]);
    assert_eq!(SandboxCgroup::list_in(&parent), vec!["sbx-1".to_owned()]);
    let reopened = SandboxCgroup::open_in(&parent, "sbx-1").unwrap();
    assert_eq!(reopened.paths(), paths);
    assert_eq!(reopened.pids(), vec![child]);

    reopened.kill_all().unwrap();
    assert_eq!(wait_signal(child), Some(libc::SIGKILL));
    assert!(cg.pids().is_empty());

    cg.remove().unwrap();
    for p in &paths {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    assert!(SandboxCgroup::open_in(&parent, "sbx-1").is_none());
    assert!(SandboxCgroup::list_in(&parent).is_empty());
    assert_parents_removed(&paths);
}

#[test]
fn memory_limit_oom_kills_and_is_counted() {
    if !require_root("memory_limit_oom_kills_and_is_counted") {
        return;
    }
    let parent = test_parent("oom");
    let limit: u64 = 32 << 20;
    let cg = SandboxCgroup::create_in(
        &parent,
        "oom",
        &CgroupLimits { memory: Some(limit), ..CgroupLimits::default() },
    )
    .unwrap();
    assert_eq!(cg.oom_kills(), 0);

    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two c_ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let [read_fd, write_fd] = fds;
    let size: usize = 256 << 20;
    // SAFETY: the child uses only read, mmap, volatile stores and _exit, all
    // safe after fork in a multi-threaded process (no allocator, no locks).
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        let mut byte = 0u8;
        // SAFETY: raw syscalls on our own fds and a fresh private mapping;
        // every store stays inside the mapping.
        unsafe {
            // Wait until the parent moved us into the cgroup.
            libc::read(read_fd, (&raw mut byte).cast(), 1);
            let mem = libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if mem == libc::MAP_FAILED {
                libc::_exit(2);
            }
            let base = mem.cast::<u8>();
            let mut off = 0;
            while off < size {
                base.add(off).write_volatile(1);
                off += 4096;
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the read end, which we own.
    unsafe { libc::close(read_fd) };
    cg.add_pid(child).unwrap();
    // SAFETY: writing one byte from a valid buffer to our pipe.
    assert_eq!(unsafe { libc::write(write_fd, b"g".as_ptr().cast(), 1) }, 1);
    // SAFETY: closing the write end, which we own.
    unsafe { libc::close(write_fd) };

    assert_eq!(wait_signal(child), Some(libc::SIGKILL));
    assert!(cg.oom_kills() >= 1, "oom_kills = {}", cg.oom_kills());
    let peak = cg.memory_peak().unwrap();
    assert!(peak > limit / 2 && peak <= limit, "peak {peak}");

    let paths = cg.paths();
    cg.remove().unwrap();
    assert_parents_removed(&paths);
}

#[test]
fn names_are_validated() {
    for ok in ["a", "sbx-1", "0abc", "a.b_c-d", &"a".repeat(63)] {
        validate_name(ok).unwrap();
    }
    for bad in
        ["", "-a", ".a", "A", "a/b", "..", "a..b", "a b", "cgroup.procs", "memory.max", &"a".repeat(64)]
    {
        assert!(matches!(validate_name(bad), Err(CgroupError::InvalidName { .. })), "{bad:?} accepted");
    }
}

#[test]
fn bad_names_and_limits_fail_before_touching_cgroupfs() {
    let limits = CgroupLimits::default();
    assert!(matches!(
        SandboxCgroup::create_in("airlock", "../escape", &limits),
        Err(CgroupError::InvalidName { .. })
    ));
    assert!(matches!(SandboxCgroup::create_in("a/b", "x", &limits), Err(CgroupError::InvalidParent { .. })));
    for limits in [
        CgroupLimits { cpus: Some(0.0), ..CgroupLimits::default() },
        CgroupLimits { cpus: Some(f64::NAN), ..CgroupLimits::default() },
        CgroupLimits { pids: Some(0), ..CgroupLimits::default() },
        CgroupLimits { memory: Some(1), ..CgroupLimits::default() },
    ] {
        assert!(matches!(
            SandboxCgroup::create_in("airlock", "x", &limits),
            Err(CgroupError::InvalidLimit { .. })
        ));
    }
    assert!(SandboxCgroup::open_in("airlock", "../x").is_none());
}

#[test]
fn keyed_values_and_cpu_quota() {
    let events = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 0\n";
    assert_eq!(keyed_value(events, "oom_kill"), Some(2));
    assert_eq!(keyed_value(events, "oom"), Some(1));
    assert_eq!(keyed_value(events, "missing"), None);
    assert_eq!(cpu_quota_us(1.0), 100_000);
    assert_eq!(cpu_quota_us(2.5), 250_000);
    assert_eq!(cpu_quota_us(0.001), 1000);
}

#[test]
fn without_cgroup_kill_the_v1_freezer_is_used() {
    if !require_root("without_cgroup_kill_the_v1_freezer_is_used") {
        return;
    }
    // Pretend the v2 tree is absent, as on a pure-v1 host: kill_all must then
    // freeze through the v1 freezer and signal each process.
    let mut layout = Layout::discover().unwrap();
    layout.v2 = None;
    let Some(freezer) = layout.v1_mount("freezer").map(|m| m.path.clone()) else {
        eprintln!("skipping: no v1 freezer mounted on this host");
        return;
    };
    let parent = test_parent("freezer");
    let limits = CgroupLimits { pids: Some(16), ..CgroupLimits::default() };
    let cg = SandboxCgroup::create_with(&layout, &parent, "frz", &limits).unwrap();
    let paths = cg.paths();
    assert!(paths.iter().any(|p| p.starts_with(&freezer)));
    assert!(cg.parts.iter().all(|p| matches!(p, Hierarchy::V1(_))));

    let children = [fork_sleeper(), fork_sleeper(), fork_sleeper()];
    for child in children {
        cg.add_pid(child).unwrap();
    }
    let mut expected = children.to_vec();
    expected.sort_unstable();
    assert_eq!(cg.pids(), expected);

    cg.kill_all().unwrap();
    for child in children {
        assert_eq!(wait_signal(child), Some(libc::SIGKILL));
    }
    let state = read_trimmed(&freezer.join(&parent).join("frz").join("freezer.state"));
    assert_eq!(state, "THAWED", "the sandbox must not be left frozen");
    cg.remove().unwrap();
    for p in &paths {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    assert_parents_removed(&paths);
}

const HYBRID_MOUNTS: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";

/// The probe's report for a host mounted as `mountinfo`, whose v2 root
/// offers `v2_controllers`.
fn report_for(mountinfo: &str, v2_controllers: &[&str]) -> CgroupSupport {
    let mut layout = layout::parse_mountinfo(mountinfo);
    if let Some(v2) = layout.v2.as_mut() {
        v2.controllers = v2_controllers.iter().map(|c| c.to_string()).collect();
    }
    support_of(layout)
}

#[test]
fn a_sandbox_cgroup_goes_where_the_probe_report_says() {
    let v1 = |p: &str| Placement::V1(PathBuf::from(p));
    let v2 = |p: &str| Placement::V2(PathBuf::from(p));

    // Hybrid: limits in v1, the empty v2 tree for cgroup.kill; no freezer.
    let hybrid = report_for(HYBRID_MOUNTS, &[]);
    assert_eq!(hybrid.memory, Some(v1("/sys/fs/cgroup/memory")));
    assert_eq!(
        hybrid.sandbox_dirs("airlock", "box"),
        vec![
            v2("/sys/fs/cgroup/unified/airlock/box"),
            v1("/sys/fs/cgroup/cpu,cpuacct/airlock/box"),
            v1("/sys/fs/cgroup/memory/airlock/box"),
            v1("/sys/fs/cgroup/pids/airlock/box"),
        ]
    );

    // The same mounts with pids offered by v2: pids moves there.
    let moved = report_for(HYBRID_MOUNTS, &["pids"]);
    assert_eq!(moved.pids, Some(v2("/sys/fs/cgroup/unified")));
    assert!(!moved.sandbox_dirs("airlock", "box").contains(&v1("/sys/fs/cgroup/pids/airlock/box")));

    // Pure v2: one directory.
    let pure = report_for(
        "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n",
        &["cpu", "memory", "pids"],
    );
    assert_eq!(pure.sandbox_dirs("airlock", "box"), vec![v2("/sys/fs/cgroup/airlock/box")]);

    // Pure v1: no v2 tree to kill or freeze with, so the v1 freezer joins.
    let pure_v1: String =
        HYBRID_MOUNTS.lines().filter(|l| !l.contains("cgroup2")).map(|l| format!("{l}\n")).collect();
    let dirs = report_for(&pure_v1, &[]).sandbox_dirs("airlock", "box");
    assert!(dirs.contains(&v1("/sys/fs/cgroup/freezer/airlock/box")), "{dirs:?}");

    // Nothing mounted: nothing to create, and nothing is writable.
    let none = report_for("", &[]);
    assert!(none.sandbox_dirs("airlock", "box").is_empty());
    assert!(!none.writable);
}

/// Creation uses the hierarchies of the report it is given, not a second
/// look at the host: a report naming a v2 tree in a temporary directory
/// gets the sandbox's directory there (no root needed, nothing written to
/// the real cgroupfs).
#[test]
fn creation_follows_the_report_it_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("cgroup2");
    fs::create_dir(&tree).unwrap();
    let mountinfo = format!("30 23 0:26 / {} rw - cgroup2 cgroup2 rw\n", tree.display());
    let report = report_for(&mountinfo, &[]);
    let name = format!("report-{}", std::process::id());
    let cgroup = SandboxCgroup::create_on(&report, &name, &CgroupLimits::default()).unwrap();
    let parent = parent_from_env().unwrap();
    assert_eq!(cgroup.paths(), vec![tree.join(&parent).join(&name)]);
    assert!(tree.join(&parent).join(&name).is_dir());
    cgroup.remove().unwrap();
    assert!(!tree.join(&parent).join(&name).exists());
    // The shared default parent stays; a named one goes with it.
    assert_eq!(tree.join(&parent).exists(), parent == DEFAULT_PARENT, "{parent}");

    // A limit the report's hierarchies cannot serve is refused up front.
    let limits = CgroupLimits { memory: Some(64 << 20), ..CgroupLimits::default() };
    let err = SandboxCgroup::create_on(&report, &name, &limits).unwrap_err();
    assert!(matches!(err, CgroupError::ControllerMissing { controller: "memory", .. }), "{err}");
}

/// The shared default parent stays when its last sandbox goes (the next
/// `run` would only make it again); a named parent goes with its last one.
#[test]
fn the_default_parent_stays_and_a_named_one_goes_with_its_last_sandbox() {
    if !require_root("the_default_parent_stays_and_a_named_one_goes_with_its_last_sandbox") {
        return;
    }
    let limits = CgroupLimits { pids: Some(16), ..CgroupLimits::default() };
    let name = format!("parent-kept-{}", std::process::id());
    let cg = SandboxCgroup::create_in(DEFAULT_PARENT, &name, &limits).unwrap();
    let paths = cg.paths();
    assert!(!paths.is_empty());
    cg.remove().unwrap();
    for p in &paths {
        assert!(!p.exists(), "{} left behind", p.display());
        let parent = p.parent().unwrap();
        assert_eq!(parent.file_name().unwrap(), DEFAULT_PARENT);
        assert!(parent.is_dir(), "{} removed", parent.display());
    }
    let named = SandboxCgroup::create_in(&test_parent("named"), &name, &limits).unwrap();
    let paths = named.paths();
    named.remove().unwrap();
    assert_parents_removed(&paths);
}
