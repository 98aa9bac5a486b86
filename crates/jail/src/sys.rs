//! Thin wrappers over the system calls that neither rustix nor the standard
//! library cover. Every `unsafe` block in the jail's core lives here.
//!
//! The `raw_*` functions are meant for a child between `clone` and `execve`
//! (or `_exit`), where only async-signal-safe calls are allowed: they make
//! the system call directly and never touch libc's internal state (locks,
//! thread lists) or allocate. Their errors are plain errno values, which
//! carry no heap data either.

use std::ffi::{CStr, c_char, c_int};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

// ---------------------------------------------------------------------------
// Processes

/// `clone(2)` with fork semantics (no new stack) into new namespaces.
/// Returns `Some(pid)` in the parent and `None` in the child.
///
/// # Safety
/// The caller must, in the child, use only async-signal-safe operations (the
/// `raw_*` helpers here) until it calls `execve` or `_exit`: other threads of
/// the parent do not exist in the child and may have held locks.
pub unsafe fn clone_into_namespaces(flags: c_int) -> io::Result<Option<i32>> {
    let flags = (flags | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: with a null stack pointer, clone behaves like fork: the child
    // continues on a copy of the parent's stack. The other arguments are null
    // because no CLONE_*TID/SETTLS flag is passed. The caller upholds the
    // async-signal-safety contract above.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
            0 as libc::c_ulong,
        )
    };
    match check(ret)? {
        0 => Ok(None),
        pid => Ok(Some(pid as i32)),
    }
}

/// `clone3`'s flag that starts the child in the cgroup v2 directory given
/// by descriptor (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The arguments of `clone3`, up to the cgroup field (`CLONE_ARGS_SIZE_VER2`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// [`clone_into_namespaces`] with the child started in the cgroup v2
/// directory `cgroup` (an open descriptor of it), so that it never has to
/// be moved there: a move waits for an RCU grace period on a quiet host.
/// Fails (and no child exists) on kernels without `clone3` or
/// `CLONE_INTO_CGROUP`, or when the caller may not place a process there.
///
/// # Safety
/// As for [`clone_into_namespaces`].
pub unsafe fn clone_into_namespaces_and_cgroup(
    flags: c_int,
    cgroup: BorrowedFd<'_>,
) -> io::Result<Option<i32>> {
    let args = CloneArgs {
        flags: flags as u32 as u64 | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a live, initialized clone_args of the size passed;
    // with no stack the child continues on a copy of the parent's, like
    // fork, and no flag makes the kernel write through a pointer in it. The
    // caller upholds the async-signal-safety contract above.
    let ret = unsafe {
        libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>())
    };
    match check(ret)? {
        0 => Ok(None),
        pid => Ok(Some(pid as i32)),
    }
}

/// Forks a child that runs `body` and `_exit`s with the code it returns,
/// never returning into the caller's code. Returns the child's pid.
///
/// # Safety
/// As for [`clone_into_namespaces`]: `body` may use only async-signal-safe
/// operations (the `raw_*` helpers, on data prepared before the call), must
/// not allocate and must not panic.
pub unsafe fn fork_child(body: impl FnOnce() -> c_int) -> io::Result<i32> {
    // SAFETY: the child runs only `body`, which the caller restricts as
    // documented above, and then leaves with _exit.
    match unsafe { clone_into_namespaces(0) }? {
        Some(pid) => Ok(pid),
        None => raw_exit(body()),
    }
}

/// Leaves the process immediately without running destructors or atexit
/// handlers (which may take locks the parent's other threads held).
pub fn raw_exit(code: c_int) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Reaps a child, retrying on EINTR; returns the raw wait status.
pub fn wait_pid(pid: i32) -> io::Result<c_int> {
    let mut status: c_int = 0;
    loop {
        // SAFETY: status is a valid out-pointer for waitpid.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret >= 0 {
            return Ok(status);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Sends SIGKILL to an unreaped child of ours and reaps it.
pub fn kill_and_reap(pid: i32) {
    // SAFETY: kill has no memory-safety requirements. The caller passes its
    // own child that has not been reaped, so the pid cannot have been reused
    // by another process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = wait_pid(pid);
}

/// `unshare(2)`: moves this process into new namespaces.
pub fn raw_unshare(flags: c_int) -> io::Result<()> {
    // SAFETY: unshare takes integer flags only.
    check(unsafe { libc::syscall(libc::SYS_unshare, flags) }).map(drop)
}

/// `prctl(2)` with one integer argument.
fn raw_prctl(option: c_int, arg: libc::c_ulong) -> io::Result<()> {
    let zero: libc::c_ulong = 0;
    // SAFETY: every option passed here takes integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_prctl, option, arg, zero, zero, zero) }).map(drop)
}

/// Sets the parent-death signal so the child dies with its supervisor.
pub fn raw_set_pdeathsig(sig: c_int) -> io::Result<()> {
    raw_prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong)
}

/// Sets no_new_privs, which an unprivileged process needs before it may
/// install a seccomp filter.
pub fn raw_set_no_new_privs() -> io::Result<()> {
    raw_prctl(libc::PR_SET_NO_NEW_PRIVS, 1)
}

/// `prctl(2)` with up to two integer arguments (the others zero); its
/// non-negative result. For the options that take integers only (no_new_privs,
/// dumpable, the bounding and ambient capability sets).
pub fn prctl_ints(option: c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> io::Result<c_int> {
    let zero: libc::c_ulong = 0;
    // SAFETY: the options this is used with take integer arguments only; no
    // memory is handed to the kernel. All variadic arguments are full-width
    // longs, as the kernel reads them (PR_CAP_AMBIENT rejects non-zero
    // unused ones).
    let rc = unsafe { libc::prctl(option, arg2, arg3, zero, zero) };
    if rc == -1 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// `struct __user_cap_header_struct` (linux/capability.h).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

/// `struct __user_cap_data_struct`; version 3 uses two of them (caps 0-31, 32-63).
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `capset(2)` for the calling thread: its effective and permitted sets
/// become `held` (bit masks: capabilities 0-31, then 32-63), its
/// inheritable set empty.
pub fn capset_thread(held: [u32; 2]) -> io::Result<()> {
    let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = held.map(|mask| CapData { effective: mask, permitted: mask, inheritable: 0 });
    // SAFETY: `header` and `data` are valid, correctly laid out (repr(C)) and
    // live for the whole call; version 3 reads exactly two data structs.
    check(unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) }).map(drop)
}

/// Sets `signal`'s disposition to ignored (SIGXFSZ, say, so that a write
/// past RLIMIT_FSIZE fails with EFBIG instead of killing the process).
pub fn set_signal_ignored(signal: c_int) -> io::Result<()> {
    // SAFETY: SIG_IGN installs no handler code; `signal` is an integer.
    if unsafe { libc::signal(signal, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, prog)`: installs a seccomp filter.
pub fn raw_seccomp_set_filter(prog: &libc::sock_fprog) -> io::Result<()> {
    // SAFETY: prog points at a valid program that outlives the call; the
    // kernel copies it.
    check(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_uint,
            prog as *const libc::sock_fprog,
        )
    })
    .map(drop)
}

/// Sleeps until a signal kills the process.
pub fn raw_pause_forever() -> ! {
    loop {
        // SAFETY: with no descriptors, no timeout and no signal mask, ppoll
        // only blocks until a signal; the kernel accepts the null pointers.
        unsafe {
            libc::syscall(
                libc::SYS_ppoll,
                std::ptr::null_mut::<libc::pollfd>(),
                0 as libc::nfds_t,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
    }
}

/// Becomes root of the current user namespace and drops supplementary groups.
/// `drop_groups` must be false where setgroups is denied (rootless).
pub fn raw_become_namespace_root(drop_groups: bool) -> io::Result<()> {
    if drop_groups {
        // SAFETY: setgroups with size 0 never reads the (null) list.
        check(unsafe { libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) })?;
    }
    // SAFETY: plain integer arguments; raw syscalls so that libc does not try
    // to broadcast the change to threads that do not exist in this child.
    check(unsafe { libc::syscall(libc::SYS_setresgid, 0, 0, 0) })?;
    // SAFETY: as above.
    check(unsafe { libc::syscall(libc::SYS_setresuid, 0, 0, 0) })?;
    Ok(())
}

/// `execveat(fd, "", …, AT_EMPTY_PATH)`: executes the already-open binary,
/// so the child needs no permission to walk the path it was found at.
/// Returns only on failure.
pub fn raw_execveat(fd: RawFd, argv: &[*const c_char], envp: &[*const c_char]) -> io::Error {
    debug_assert!(argv.last().is_some_and(|p| p.is_null()));
    debug_assert!(envp.last().is_some_and(|p| p.is_null()));
    let empty: &CStr = c"";
    // SAFETY: empty is a valid C string; argv and envp are null-terminated
    // arrays of pointers to C strings that the caller keeps alive.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            empty.as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    io::Error::last_os_error()
}

// ---------------------------------------------------------------------------
// Descriptors and files

/// Blocks until one byte arrives or the pipe closes; `true` if a byte arrived.
pub fn raw_read_byte(fd: RawFd) -> bool {
    let mut byte = 0u8;
    loop {
        // SAFETY: reads at most one byte into a valid, owned local buffer.
        let n = unsafe { libc::syscall(libc::SYS_read, fd, &mut byte as *mut u8, 1usize) };
        if n == 1 {
            return true;
        }
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return false;
    }
}

/// Writes a whole buffer with raw `write` calls, retrying on EINTR. A write
/// that makes no progress fails with EIO.
pub fn raw_write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: the pointer and length describe a live slice.
        match check(unsafe { libc::syscall(libc::SYS_write, fd, buf.as_ptr(), buf.len()) }) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => buf = buf.get(n as usize..).unwrap_or_default(),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `openat(AT_FDCWD, path, flags | O_CLOEXEC, 0o644)`.
fn raw_open(path: &CStr, flags: c_int) -> io::Result<RawFd> {
    // SAFETY: path is a NUL-terminated string alive for the call.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags | libc::O_CLOEXEC,
            0o644 as libc::c_uint,
        )
    })?;
    Ok(fd as RawFd)
}

/// Opens `path` write-only (plus `flags`), writes all of `data`, closes it.
fn raw_write_path(path: &CStr, flags: c_int, data: &[u8]) -> io::Result<()> {
    let fd = raw_open(path, libc::O_WRONLY | flags)?;
    let written = raw_write_all(fd, data);
    raw_close(fd);
    written
}

/// Writes `data` to an existing file, such as a /proc control file (which
/// takes a short value in one write).
pub fn raw_write_file(path: &CStr, data: &[u8]) -> io::Result<()> {
    raw_write_path(path, 0, data)
}

/// Creates `path`, which must not exist yet, with `data` in it.
pub fn raw_create_file(path: &CStr, data: &[u8]) -> io::Result<()> {
    raw_write_path(path, libc::O_CREAT | libc::O_EXCL, data)
}

/// `close(2)` without libc's bookkeeping, for the child after clone.
pub fn raw_close(fd: RawFd) {
    // SAFETY: closing a descriptor number has no memory-safety requirements.
    unsafe { libc::syscall(libc::SYS_close, fd) };
}

/// Closes every descriptor from `first` up, so nothing the supervisor
/// inherited from its own parent leaks into the sandbox.
pub fn raw_close_from(first: c_int) {
    // SAFETY: close_range only closes descriptors; no memory is involved.
    unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, libc::c_uint::MAX, 0) };
}

/// Duplicates `fd` to a close-on-exec descriptor numbered at least `min`.
pub fn dup_above(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    rustix::io::fcntl_dupfd_cloexec(fd, min).map_err(io::Error::from)
}

/// `dup3(from, to, 0)`: the copy at `to` survives `execve`.
pub fn raw_dup_to(from: RawFd, to: RawFd) -> io::Result<()> {
    raw_dup3(from, to, 0)
}

/// `dup3(from, to, flags)`.
pub fn raw_dup3(from: RawFd, to: RawFd, flags: c_int) -> io::Result<()> {
    if from == to {
        // dup3 refuses equal fds; clear close-on-exec instead.
        // SAFETY: F_SETFD with 0 only changes the fd's flags.
        return check(unsafe { libc::syscall(libc::SYS_fcntl, from, libc::F_SETFD, 0) }).map(drop);
    }
    // SAFETY: duplicating an fd has no memory-safety requirements.
    check(unsafe { libc::syscall(libc::SYS_dup3, from, to, flags) }).map(drop)
}

// ---------------------------------------------------------------------------
// Filesystems and mounts

/// `mount(2)`; `None` passes a null pointer.
pub fn raw_mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is null or a NUL-terminated string alive for the
    // call.
    check(unsafe {
        libc::syscall(libc::SYS_mount, ptr(source), target.as_ptr(), ptr(fstype), flags, ptr(data))
    })
    .map(drop)
}

/// `mkdirat(AT_FDCWD, path, mode)`.
pub fn raw_mkdir(path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: path is a NUL-terminated string alive for the call.
    check(unsafe { libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, path.as_ptr(), mode) }).map(drop)
}

/// Total size in bytes of the filesystem at `path`, from `statfs(2)`.
pub fn raw_fs_size(path: &CStr) -> io::Result<u64> {
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: path is NUL-terminated; st is a valid out-pointer. On 64-bit
    // Linux, libc's `struct statfs` is the kernel's layout.
    check(unsafe { libc::syscall(libc::SYS_statfs, path.as_ptr(), &mut st as *mut libc::statfs) })?;
    // f_blocks is unsigned; f_bsize is a signed word but positive.
    let blocks: u64 = st.f_blocks;
    Ok(blocks.saturating_mul(st.f_bsize as u64))
}

/// `mount_setattr(2)`: changes mount attributes, recursively if asked.
/// Unlike a bind remount it leaves flags the kernel locked (nosuid, nodev in
/// a user namespace) alone instead of failing on them.
pub fn mount_setattr(
    dirfd: Option<BorrowedFd<'_>>,
    path: &CStr,
    flags: libc::c_uint,
    attr_set: u64,
    attr_clr: u64,
    userns_fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let attr = MountAttr {
        attr_set,
        attr_clr,
        propagation: 0,
        userns_fd: userns_fd.map_or(0, |fd| fd.as_raw_fd() as u64),
    };
    let dirfd = dirfd.map_or(libc::AT_FDCWD, |fd| fd.as_raw_fd());
    // SAFETY: attr is a live, correctly laid out `struct mount_attr` and its
    // size is passed; path is a valid C string.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// A detached copy of the mount at `path` (`open_tree` with
/// OPEN_TREE_CLONE): nothing sees it until it is attached, and closing the
/// descriptor without attaching it discards it.
/// Like [`clone_tree`], but resolves `path` without following any symlink
/// and, when `owner` is given, refuses a directory some other uid owns. The
/// mount is made from the descriptor that was checked, so swapping the path
/// for something else after a check gets nowhere.
pub fn clone_tree_checked(path: &Path, owner: Option<u32>) -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use rustix::mount::OpenTreeFlags;
    let dir = rustix::fs::openat2(
        rustix::fs::CWD,
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS,
    )?;
    if let Some(uid) = owner {
        let found = rustix::fs::fstat(&dir)?.st_uid;
        if found != uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the workspace is owned by uid {found}, not by the requesting uid {uid}"),
            ));
        }
    }
    let flags =
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_EMPTY_PATH;
    Ok(rustix::mount::open_tree(&dir, c"", flags)?)
}

pub fn clone_tree(path: &Path) -> io::Result<OwnedFd> {
    use rustix::mount::OpenTreeFlags;
    let flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    Ok(rustix::mount::open_tree(rustix::fs::CWD, path, flags)?)
}

/// Id-maps the detached mount `tree` with the id maps of the user namespace
/// `userns` (`mount_setattr` with MOUNT_ATTR_IDMAP).
pub fn idmap_tree(tree: BorrowedFd<'_>, userns: BorrowedFd<'_>) -> io::Result<()> {
    mount_setattr(
        Some(tree),
        c"",
        libc::AT_EMPTY_PATH as libc::c_uint,
        libc::MOUNT_ATTR_IDMAP,
        0,
        Some(userns),
    )
}

// ---------------------------------------------------------------------------
// Network and LSMs

/// Brings the loopback interface up (the only interface in a new network
/// namespace, created down).
pub fn set_loopback_up() -> io::Result<()> {
    // SAFETY: socket() has no memory-safety requirements.
    let sock = check(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) } as libc::c_long
    )? as RawFd;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as c_char;
    }
    let result = (|| {
        // SAFETY: SIOCGIFFLAGS fills the ifreq we own.
        check(unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) } as libc::c_long)?;
        // SAFETY: the kernel filled ifru_flags for SIOCGIFFLAGS.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
        check(unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) } as libc::c_long)?;
        Ok(())
    })();
    // SAFETY: sock is an fd we opened and nobody else owns.
    unsafe { libc::close(sock) };
    result
}

/// Where a connection the kernel redirected (DNAT on the OUTPUT hook) was
/// first addressed, from conntrack: `SO_ORIGINAL_DST` for an IPv4 socket,
/// `IP6T_SO_ORIGINAL_DST` for IPv6 (both option 80). A connection that was
/// not translated reads as its own local address. ENOENT when conntrack
/// has no entry for it.
pub fn original_destination(fd: BorrowedFd<'_>) -> io::Result<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    const SO_ORIGINAL_DST: c_int = 80;
    let local = rustix::net::getsockname(fd)?;
    let v6 = local.address_family() == rustix::net::AddressFamily::INET6;
    // SAFETY: sockaddr_in6 is plain old data (larger than sockaddr_in);
    // zeroed is a valid value.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    let level = if v6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    // SAFETY: the kernel writes at most `len` bytes into `addr`, which we
    // own, and stores the length it wrote in `len`.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in6).cast(),
            &mut len,
        )
    } as libc::c_long)?;
    if v6 {
        let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
        Ok(SocketAddr::new(ip.into(), u16::from_be(addr.sin6_port)))
    } else {
        // SAFETY: for an IPv4 socket the kernel wrote a sockaddr_in, which
        // fits in (and is laid out at the start of) the buffer.
        let v4: libc::sockaddr_in = unsafe { std::ptr::read((&addr as *const libc::sockaddr_in6).cast()) };
        let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
        Ok(SocketAddr::new(ip.into(), u16::from_be(v4.sin_port)))
    }
}

/// The Landlock ABI version the kernel offers; EOPNOTSUPP when Landlock is
/// built in but not enabled at boot.
pub fn landlock_abi() -> io::Result<libc::c_long> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag the
    // kernel only returns the ABI number; no memory is touched.
    check(unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    })
}

/// Loads a shared library (by name, as the dynamic loader finds it) for the
/// rest of the process's life; false if it cannot be loaded. A process
/// about to lose its view of the host's files loads now what glibc would
/// load later (its name-service modules, which glibc then finds already
/// loaded by name).
pub fn load_library_for_good(name: &CStr) -> bool {
    // SAFETY: `name` is a valid C string for the call. Loading runs the
    // library's initialisers in this process; callers load only glibc's
    // name-service modules, which glibc itself loads into any process that
    // resolves a name. RTLD_NODELETE: the handle is never closed anyway.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NODELETE) };
    !handle.is_null()
}

/// Marks every descriptor from `first` up close-on-exec
/// (`close_range(first, ~0, CLOSE_RANGE_CLOEXEC)`).
pub fn cloexec_from(first: c_int) -> io::Result<()> {
    // SAFETY: changes descriptor flags only; no memory is involved.
    check(unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    })
    .map(drop)
}

/// `fork(2)` through libc, which keeps its own state consistent in the
/// child. Returns `Some(pid)` in the parent, `None` in the child.
///
/// # Safety
/// The calling process must be single-threaded: the child continues with
/// ordinary code, which may take locks another thread held.
pub unsafe fn fork() -> io::Result<Option<i32>> {
    // SAFETY: the caller guarantees there is no other thread.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Some(pid)),
    }
}

// ---------------------------------------------------------------------------
// Signals and children (PID 1 inside the sandbox)

/// A set of signals (`sigset_t`), for blocking and waiting.
#[derive(Clone, Copy)]
pub struct SignalSet(libc::sigset_t);

impl SignalSet {
    /// The empty set. Async-signal-safe (no allocation).
    pub fn empty() -> SignalSet {
        // SAFETY: sigset_t is plain data; sigemptyset initializes it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: set is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        SignalSet(set)
    }

    /// The set of `signals`.
    pub fn of(signals: &[c_int]) -> SignalSet {
        let mut set = SignalSet::empty();
        for &sig in signals {
            // SAFETY: set.0 is a valid, initialized sigset_t.
            unsafe { libc::sigaddset(&mut set.0, sig) };
        }
        set
    }
}

/// Adds `set` to this thread's blocked signals (`sigprocmask(SIG_BLOCK)`).
pub fn block_signals(set: &SignalSet) -> io::Result<()> {
    // SAFETY: the set is initialized; the old mask is not needed.
    check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set.0, std::ptr::null_mut()) }.into()).map(drop)
}

/// Unblocks every signal (`sigprocmask(SIG_SETMASK, empty)`).
/// Async-signal-safe: usable between fork and exec.
pub fn unblock_all_signals() -> io::Result<()> {
    let empty = SignalSet::empty();
    // SAFETY: the set is initialized; the old mask is not needed.
    check(unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty.0, std::ptr::null_mut()) }.into()).map(drop)
}

extern "C" fn ignore_signal(_: c_int) {}

/// Installs a handler for `sig` that does nothing (with `SA_RESTART`): the
/// kernel drops signals to a namespace's init that has no handler.
pub fn install_noop_handler(sig: c_int) -> io::Result<()> {
    // SAFETY: sigaction is plain data; zeroed is a valid empty action.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = ignore_signal as *const () as usize;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: action is initialized; the handler does nothing and is
    // async-signal-safe.
    check(unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) }.into()).map(drop)
}

/// Waits for a signal of `set` (which must be blocked): `sigwaitinfo`.
pub fn wait_signal(set: &SignalSet) -> io::Result<c_int> {
    // SAFETY: siginfo_t is plain data written by the kernel.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: the set and the out-pointer are valid.
    check(unsafe { libc::sigwaitinfo(&set.0, &mut info) }.into()).map(|sig| sig as c_int)
}

/// Waits up to `timeout` for a signal of `set` (which must be blocked):
/// `sigtimedwait`. Returns the signal and its sender's pid as the kernel
/// reports it (0 for a sender outside this PID namespace), or `None` on
/// timeout or interruption.
pub fn wait_signal_timeout(set: &SignalSet, timeout: std::time::Duration) -> Option<(c_int, i32)> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: siginfo_t is plain data written by the kernel.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: the set, the out-pointer and the timeout are valid.
    let sig = unsafe { libc::sigtimedwait(&set.0, &mut info, &ts) };
    if sig <= 0 {
        return None;
    }
    // SAFETY: the kernel filled `info` for the signal just taken; si_pid is
    // valid to read for every signal (0 where it carries no sender).
    let sender = unsafe { info.si_pid() };
    Some((sig, sender))
}

/// `kill(2)`: sends `sig` to `pid` (a negative pid names a process group).
pub fn send_signal(pid: i32, sig: c_int) -> io::Result<()> {
    // SAFETY: kill takes plain integers; it has no memory-safety requirements.
    check(unsafe { libc::kill(pid, sig) }.into()).map(drop)
}

/// Reaps one exited child without blocking (`waitpid(-1, WNOHANG)`): its pid
/// and wait status, or `None` when no child has exited (or none is left).
pub fn try_reap_any() -> Option<(i32, c_int)> {
    let mut status: c_int = 0;
    // SAFETY: status is a valid out-pointer.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    (pid > 0).then_some((pid, status))
}

// ---------------------------------------------------------------------------
// Resource limits

/// libc's type for `RLIMIT_*` differs between glibc and musl.
#[cfg(target_env = "gnu")]
pub type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
pub type RlimitResource = libc::c_int;

/// `getrlimit(2)`: the soft and hard limit of `resource`.
pub fn get_rlimit(resource: RlimitResource) -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    check(unsafe { libc::getrlimit(resource, &mut lim) }.into())?;
    Ok(lim)
}

/// `setrlimit(2)`: sets the soft and hard limit of `resource`.
pub fn set_rlimit(resource: RlimitResource, lim: libc::rlimit) -> io::Result<()> {
    // SAFETY: `lim` is a valid rlimit the kernel only reads.
    check(unsafe { libc::setrlimit(resource, &lim) }.into()).map(drop)
}

// ---------------------------------------------------------------------------
// Exec trace: seccomp user notifications, another process's memory, pidfds

/// `seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER | TSYNC | TSYNC_ESRCH,
/// prog)`: installs a filter on every thread of the calling process and
/// returns its notification listener (close-on-exec). TSYNC_ESRCH lets
/// TSYNC and a listener go together (Linux ≥ 5.7).
pub fn seccomp_filter_with_listener(prog: &libc::sock_fprog) -> io::Result<OwnedFd> {
    let flags = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER
        | libc::SECCOMP_FILTER_FLAG_TSYNC
        | libc::SECCOMP_FILTER_FLAG_TSYNC_ESRCH;
    // SAFETY: prog points at a valid program that outlives the call; the
    // kernel copies it and returns a new descriptor, owned from here on.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags as libc::c_uint,
            prog as *const libc::sock_fprog,
        )
    })?;
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just created this descriptor for us alone.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// One system call a seccomp filter handed to its listener.
#[derive(Debug, Clone, Copy)]
pub struct NotifiedCall {
    /// The notification's cookie, for [`seccomp_notif_id_valid`] and
    /// [`seccomp_notif_continue`].
    pub id: u64,
    /// The calling thread, in the listener's PID namespace (0 when it is
    /// not visible there).
    pub pid: u32,
    /// The system call number.
    pub nr: i32,
    /// `AUDIT_ARCH_*` of the call.
    pub arch: u32,
    /// Its six arguments as the caller passed them.
    pub args: [u64; 6],
}

/// Bytes the kernel writes for `SECCOMP_IOCTL_NOTIF_RECV`
/// (`SECCOMP_GET_NOTIF_SIZES`): it may be larger than the struct this
/// build knows, so the receive buffer is sized from it.
pub fn seccomp_notif_size() -> io::Result<usize> {
    let mut sizes = libc::seccomp_notif_sizes { seccomp_notif: 0, seccomp_notif_resp: 0, seccomp_data: 0 };
    // SAFETY: `sizes` is a valid, writable struct of the layout the kernel fills.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_NOTIF_SIZES,
            0 as libc::c_uint,
            &mut sizes as *mut libc::seccomp_notif_sizes,
        )
    };
    check(rc)?;
    Ok(usize::from(sizes.seccomp_notif).max(std::mem::size_of::<libc::seccomp_notif>()))
}

/// Receives the next notification (`SECCOMP_IOCTL_NOTIF_RECV`), blocking
/// unless the listener has one pending. `buffer` holds at least
/// [`seccomp_notif_size`] bytes, in 8-byte words for alignment; it is
/// zeroed first, as the kernel requires. ENOENT: the caller went away
/// before it could be received.
pub fn seccomp_notif_recv(listener: BorrowedFd<'_>, buffer: &mut [u64]) -> io::Result<NotifiedCall> {
    let needed = std::mem::size_of::<libc::seccomp_notif>().div_ceil(8);
    if buffer.len() < needed {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    buffer.fill(0);
    // SAFETY: the buffer is zeroed, 8-byte aligned and at least as large as
    // the kernel's struct (the caller sized it from SECCOMP_GET_NOTIF_SIZES);
    // the kernel writes one `struct seccomp_notif` into it.
    let rc =
        unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, buffer.as_mut_ptr()) };
    check(rc.into())?;
    // SAFETY: the kernel filled the start of the buffer with a
    // `seccomp_notif`, a plain-data struct; the buffer is aligned for it.
    let notif = unsafe { std::ptr::read(buffer.as_ptr().cast::<libc::seccomp_notif>()) };
    Ok(NotifiedCall {
        id: notif.id,
        pid: notif.pid,
        nr: notif.data.nr,
        arch: notif.data.arch,
        args: notif.data.args,
    })
}

/// `SECCOMP_IOCTL_NOTIF_ID_VALID`: Ok while the call `id` still waits for
/// its answer (its caller has not died, and so its pid cannot have been
/// reused since it was received); ENOENT otherwise.
pub fn seccomp_notif_id_valid(listener: BorrowedFd<'_>, id: u64) -> io::Result<()> {
    // SAFETY: the kernel reads one u64 from a valid pointer.
    let rc =
        unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &id as *const u64) };
    check(rc.into()).map(drop)
}

/// Answers call `id` with `SECCOMP_USER_NOTIF_FLAG_CONTINUE`: the kernel
/// carries the call out as if no filter had stopped it.
pub fn seccomp_notif_continue(listener: BorrowedFd<'_>, id: u64) -> io::Result<()> {
    let response = libc::seccomp_notif_resp {
        id,
        val: 0,
        error: 0,
        flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
    };
    // SAFETY: the kernel reads one `seccomp_notif_resp` from a valid pointer.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND,
            &response as *const libc::seccomp_notif_resp,
        )
    };
    check(rc.into()).map(drop)
}

/// Asks the kernel to wake the listener's reader synchronously, on the
/// CPU the caller leaves (`SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`, Linux ≥
/// 6.6): a traced call then costs fewer scheduler round trips. Older
/// kernels answer EINVAL, and the listener works as before.
pub fn seccomp_notif_sync_wake_up(listener: BorrowedFd<'_>) -> io::Result<()> {
    const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;
    // SAFETY: the kernel reads the flags as the ioctl's integer argument.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS,
            SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP,
        )
    };
    check(rc.into()).map(drop)
}

/// Copies up to `buf.len()` bytes at `address` in process `pid`'s memory
/// (`process_vm_readv`); returns how many arrived, fewer where the range
/// runs into unmapped memory. Needs ptrace-attach rights over `pid`.
pub fn process_vm_read(pid: i32, address: u64, buf: &mut [u8]) -> io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // The remote address is only a number to this process: the kernel
    // reads it in the other process's address space.
    let remote = libc::iovec { iov_base: address as usize as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: `local` describes `buf`, valid and writable for its length;
    // `remote` is never dereferenced here.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// `struct pidfd_info` (linux/pidfd.h), its first published size.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
}

/// `PIDFD_GET_INFO`: `_IOWR(0xFF, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: libc::Ioctl =
    ((3 << 30) | ((std::mem::size_of::<PidfdInfo>() as u32) << 16) | (0xFF << 8) | 11) as libc::Ioctl;
const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// How a process ended, as its pidfd tells once it has been reaped (by
/// whoever reaped it): its wait status. `Ok(None)` while it has not been
/// reaped yet (running, or a zombie). ENOTTY or EINVAL: this kernel keeps
/// no exit status for pidfds (before Linux 6.15).
pub fn pidfd_exit_status(pidfd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    let mut info = PidfdInfo { mask: PIDFD_INFO_EXIT, ..PidfdInfo::default() };
    // SAFETY: `info` is a valid, writable struct of the size the request
    // number encodes; the kernel fills at most that many bytes.
    let rc = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, &mut info as *mut PidfdInfo) };
    check(rc.into())?;
    Ok((info.mask & PIDFD_INFO_EXIT != 0).then_some(info.exit_code))
}

/// Whether the process behind `pidfd` has not been reaped yet (it may be a
/// zombie): `pidfd_send_signal` with signal 0, which delivers nothing.
pub fn pidfd_not_reaped(pidfd: BorrowedFd<'_>) -> bool {
    // SAFETY: signal 0 with a null siginfo and no flags only checks that
    // the process exists and may be signalled; no memory is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0 as c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    rc == 0
}
