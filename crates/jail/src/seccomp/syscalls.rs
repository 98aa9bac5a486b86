//! Syscall names the filter data may use, resolved to numbers for the
//! architecture airlock was built for.
//!
//! The numbers come from libc's `SYS_*` constants, so a name that libc does not
//! know for this architecture fails to compile here instead of silently
//! producing a filter that matches the wrong call. The tables only list what
//! `deny.toml`, `no_setid.toml` and `egress_proxy.toml` need (plus what the tests exercise);
//! adding an entry to the data means adding its name here, which keeps both
//! under review together.

use libc::c_long;

/// Name and audit architecture value (`AUDIT_ARCH_*` from linux/audit.h) of the
/// architecture this build targets; the filter checks it first.
#[cfg(target_arch = "x86_64")]
pub(crate) const ARCH: Option<(&str, u32)> = Some(("x86_64", 0xC000_003E));
#[cfg(target_arch = "aarch64")]
pub(crate) const ARCH: Option<(&str, u32)> = Some(("aarch64", 0xC000_00B7));
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(crate) const ARCH: Option<(&str, u32)> = None;

/// `open_tree_attr` (Linux 6.15) is newer than libc's tables; syscalls added
/// since Linux 5.1 share one number on every architecture.
const SYS_OPEN_TREE_ATTR: c_long = 467;
/// `fchmodat2` (Linux 6.6), likewise.
const SYS_FCHMODAT2: c_long = 452;

/// Syscalls present on every architecture airlock supports.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const COMMON: &[(&str, c_long)] = &[
    ("acct", libc::SYS_acct),
    ("add_key", libc::SYS_add_key),
    ("adjtimex", libc::SYS_adjtimex),
    ("bpf", libc::SYS_bpf),
    ("chroot", libc::SYS_chroot),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("clock_settime", libc::SYS_clock_settime),
    ("clone", libc::SYS_clone),
    ("clone3", libc::SYS_clone3),
    ("delete_module", libc::SYS_delete_module),
    ("fchmod", libc::SYS_fchmod),
    ("fchmodat2", SYS_FCHMODAT2),
    ("finit_module", libc::SYS_finit_module),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fsopen", libc::SYS_fsopen),
    ("fspick", libc::SYS_fspick),
    ("init_module", libc::SYS_init_module),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("ioctl", libc::SYS_ioctl),
    ("kcmp", libc::SYS_kcmp),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("kexec_load", libc::SYS_kexec_load),
    ("keyctl", libc::SYS_keyctl),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("mount", libc::SYS_mount),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("move_mount", libc::SYS_move_mount),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("nfsservctl", libc::SYS_nfsservctl),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("open_tree", libc::SYS_open_tree),
    ("open_tree_attr", SYS_OPEN_TREE_ATTR),
    ("openat2", libc::SYS_openat2),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("personality", libc::SYS_personality),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("pivot_root", libc::SYS_pivot_root),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("ptrace", libc::SYS_ptrace),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    ("reboot", libc::SYS_reboot),
    ("request_key", libc::SYS_request_key),
    ("setdomainname", libc::SYS_setdomainname),
    ("sethostname", libc::SYS_sethostname),
    ("setns", libc::SYS_setns),
    ("settimeofday", libc::SYS_settimeofday),
    ("socket", libc::SYS_socket),
    ("socketpair", libc::SYS_socketpair),
    ("swapoff", libc::SYS_swapoff),
    ("swapon", libc::SYS_swapon),
    ("syslog", libc::SYS_syslog),
    ("umount2", libc::SYS_umount2),
    ("unshare", libc::SYS_unshare),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("vhangup", libc::SYS_vhangup),
];

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const COMMON: &[(&str, c_long)] = &[];

/// Further syscalls on every architecture airlock supports, for the
/// allowlists of airlock's own processes (`allowlist.rs`) and their tests.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const PROCESS: &[(&str, c_long)] = &[
    ("accept4", libc::SYS_accept4),
    ("bind", libc::SYS_bind),
    ("brk", libc::SYS_brk),
    ("capset", libc::SYS_capset),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("close", libc::SYS_close),
    ("connect", libc::SYS_connect),
    ("epoll_create1", libc::SYS_epoll_create1),
    ("epoll_ctl", libc::SYS_epoll_ctl),
    ("epoll_pwait", libc::SYS_epoll_pwait),
    ("eventfd2", libc::SYS_eventfd2),
    ("execve", libc::SYS_execve),
    ("execveat", libc::SYS_execveat),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
    ("fchmodat", libc::SYS_fchmodat),
    ("fchownat", libc::SYS_fchownat),
    ("fcntl", libc::SYS_fcntl),
    ("fstat", libc::SYS_fstat),
    ("futex", libc::SYS_futex),
    ("getpid", libc::SYS_getpid),
    ("getrandom", libc::SYS_getrandom),
    ("getsockname", libc::SYS_getsockname),
    ("getsockopt", libc::SYS_getsockopt),
    ("gettid", libc::SYS_gettid),
    ("kill", libc::SYS_kill),
    ("linkat", libc::SYS_linkat),
    ("listen", libc::SYS_listen),
    ("lseek", libc::SYS_lseek),
    ("madvise", libc::SYS_madvise),
    ("memfd_create", libc::SYS_memfd_create),
    ("mkdirat", libc::SYS_mkdirat),
    ("mknodat", libc::SYS_mknodat),
    ("mmap", libc::SYS_mmap),
    ("mprotect", libc::SYS_mprotect),
    ("mremap", libc::SYS_mremap),
    ("munmap", libc::SYS_munmap),
    ("newfstatat", libc::SYS_newfstatat),
    ("openat", libc::SYS_openat),
    ("pidfd_open", libc::SYS_pidfd_open),
    ("ppoll", libc::SYS_ppoll),
    ("prctl", libc::SYS_prctl),
    ("read", libc::SYS_read),
    ("recvfrom", libc::SYS_recvfrom),
    ("recvmsg", libc::SYS_recvmsg),
    ("renameat2", libc::SYS_renameat2),
    ("restart_syscall", libc::SYS_restart_syscall),
    ("rseq", libc::SYS_rseq),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("sched_yield", libc::SYS_sched_yield),
    ("seccomp", libc::SYS_seccomp),
    ("sendmmsg", libc::SYS_sendmmsg),
    ("sendto", libc::SYS_sendto),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("setgid", libc::SYS_setgid),
    ("setgroups", libc::SYS_setgroups),
    ("setresuid", libc::SYS_setresuid),
    ("setsockopt", libc::SYS_setsockopt),
    ("setuid", libc::SYS_setuid),
    ("shutdown", libc::SYS_shutdown),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("socketpair", libc::SYS_socketpair),
    ("symlinkat", libc::SYS_symlinkat),
    ("tgkill", libc::SYS_tgkill),
    ("truncate", libc::SYS_truncate),
    ("uname", libc::SYS_uname),
    ("unlinkat", libc::SYS_unlinkat),
    ("write", libc::SYS_write),
    ("writev", libc::SYS_writev),
];

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const PROCESS: &[(&str, c_long)] = &[];

/// Syscalls that exist only on x86_64.
#[cfg(target_arch = "x86_64")]
const ARCH_ONLY: &[(&str, c_long)] = &[
    ("chmod", libc::SYS_chmod),
    ("creat", libc::SYS_creat),
    ("epoll_wait", libc::SYS_epoll_wait),
    ("ioperm", libc::SYS_ioperm),
    ("iopl", libc::SYS_iopl),
    ("mknod", libc::SYS_mknod),
    ("modify_ldt", libc::SYS_modify_ldt),
    ("open", libc::SYS_open),
    ("poll", libc::SYS_poll),
    ("stat", libc::SYS_stat),
    ("uselib", libc::SYS_uselib),
];

#[cfg(not(target_arch = "x86_64"))]
const ARCH_ONLY: &[(&str, c_long)] = &[];

/// The number of `name` on this build's architecture, if the table knows it.
pub(crate) fn number(name: &str) -> Option<c_long> {
    COMMON.iter().chain(PROCESS).chain(ARCH_ONLY).find(|(n, _)| *n == name).map(|(_, nr)| *nr)
}
