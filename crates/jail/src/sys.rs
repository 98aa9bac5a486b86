//! Thin wrappers over the system calls that neither rustix nor the standard
//! library cover. Every `unsafe` block in the jail's core lives here.
//!
//! The `raw_*` functions are meant for the child between `clone` and
//! `execve`, where only async-signal-safe calls are allowed: they make the
//! system call directly and never touch libc's internal state (locks,
//! thread lists).

use std::ffi::{CStr, c_char, c_int};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

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

/// Writes a whole buffer with raw `write` calls (async-signal-safe).
pub fn raw_write_all(fd: RawFd, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: the pointer and length describe a live slice.
        let n = unsafe { libc::syscall(libc::SYS_write, fd, buf.as_ptr(), buf.len()) };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        buf = &buf[n as usize..];
    }
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

/// Sets the parent-death signal so the child dies with its supervisor.
pub fn raw_set_pdeathsig(sig: c_int) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes an integer signal number.
    check(unsafe { libc::syscall(libc::SYS_prctl, libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) })
        .map(drop)
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

/// Leaves the process immediately without running destructors or atexit
/// handlers (which may take locks the parent's other threads held).
pub fn raw_exit(code: c_int) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
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

/// Closes every descriptor from `first` up, so nothing the supervisor
/// inherited from its own parent leaks into the sandbox.
pub fn raw_close_from(first: c_int) {
    // SAFETY: close_range only closes descriptors; no memory is involved.
    unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, libc::c_uint::MAX, 0) };
}

/// Duplicates `fd` to a close-on-exec descriptor numbered at least `min`.
pub fn dup_above(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<std::os::fd::OwnedFd> {
    rustix::io::fcntl_dupfd_cloexec(fd, min).map_err(io::Error::from)
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

/// `close(2)` without libc's bookkeeping, for the child after clone.
pub fn raw_close(fd: RawFd) {
    // SAFETY: closing a descriptor number has no memory-safety requirements.
    unsafe { libc::syscall(libc::SYS_close, fd) };
}
