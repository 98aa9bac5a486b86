//! Allowlist filters for airlock's own host-side processes that read
//! hostile bytes (today: the egress proxy, `egress_proxy.toml`).
//!
//! The sandbox's filter is a denylist because the command is arbitrary
//! tooling. airlock's own processes are not: they run known code, so their
//! filter lists what that code calls and refuses everything else. The data
//! is reviewed like `deny.toml` (a reason per entry) and compiled by the same
//! BPF emitter; the default action for unlisted calls is part of the data.

use serde::Deserialize;

use super::{ArgCondition, DenyAction, RawCondition, SeccompError, bpf, check_entry, syscalls};

/// The egress proxy's rules, embedded so the binary cannot run with another list.
const EGRESS_PROXY_TOML: &str = include_str!("egress_proxy.toml");
const EGRESS_PROXY_FILE: &str = "crates/jail/src/seccomp/egress_proxy.toml";
/// The exec trace's listener's rules.
const EXEC_TRACE_TOML: &str = include_str!("exec_trace.toml");
const EXEC_TRACE_FILE: &str = "crates/jail/src/seccomp/exec_trace.toml";

/// What every system call that no rule allows gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAction {
    /// The whole process dies with SIGSYS (SECCOMP_RET_KILL_PROCESS).
    KillProcess,
    /// The call fails with EPERM and the process goes on.
    Eperm,
}

impl DefaultAction {
    fn ret(self) -> u32 {
        match self {
            DefaultAction::KillProcess => libc::SECCOMP_RET_KILL_PROCESS,
            DefaultAction::Eperm => bpf::errno_ret(libc::EPERM),
        }
    }
}

/// What a listed call gets when the rule's conditions hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAction {
    /// The call runs.
    Allow,
    /// The call fails with this errno (ENOSYS, so libc falls back to an
    /// older call whose arguments the filter can see).
    Errno(DenyAction),
}

impl RuleAction {
    fn ret(self) -> u32 {
        match self {
            RuleAction::Allow => libc::SECCOMP_RET_ALLOW,
            RuleAction::Errno(action) => bpf::errno_ret(action.errno()),
        }
    }
}

/// One entry of an allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    /// Syscall name as in the kernel's table.
    pub syscall: String,
    pub action: RuleAction,
    /// Argument conditions, all of which must hold; empty means every call.
    pub conditions: Vec<ArgCondition>,
    /// Architectures the rule applies to; empty means all.
    pub arches: Vec<String>,
    /// Why the process needs the call (or why it gets an errno).
    pub reason: String,
}

impl AllowRule {
    /// Whether the rule is part of the filter on this build's architecture.
    pub fn applies_here(&self) -> bool {
        super::applies_here(&self.arches)
    }
}

/// A parsed allowlist: its default and its rules, for every architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    /// The file the data came from, for messages.
    pub file: &'static str,
    pub default: DefaultAction,
    pub rules: Vec<AllowRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllowlist {
    default: String,
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    syscall: String,
    action: String,
    #[serde(default)]
    when: Vec<RawCondition>,
    #[serde(default)]
    arches: Vec<String>,
    reason: String,
}

fn parse_rule(raw: RawRule) -> Result<AllowRule, String> {
    let conditions =
        check_entry(&raw.syscall, &raw.reason, "why the process needs it", &raw.arches, &raw.when)?;
    let action = match raw.action.as_str() {
        "allow" => RuleAction::Allow,
        "EPERM" => RuleAction::Errno(DenyAction::Eperm),
        "ENOSYS" => RuleAction::Errno(DenyAction::Enosys),
        other => return Err(format!("action `{other}` is not allow, EPERM or ENOSYS")),
    };
    Ok(AllowRule { syscall: raw.syscall, action, conditions, arches: raw.arches, reason: raw.reason })
}

fn parse(file: &'static str, text: &str) -> Result<Allowlist, SeccompError> {
    let raw: RawAllowlist =
        toml::from_str(text).map_err(|source| SeccompError::AllowlistParse { file, source })?;
    let default = match raw.default.as_str() {
        "kill" => DefaultAction::KillProcess,
        "EPERM" => DefaultAction::Eperm,
        other => {
            return Err(SeccompError::AllowlistRule {
                file,
                index: 0,
                syscall: String::new(),
                problem: format!("`default = {other:?}` is neither \"kill\" nor \"EPERM\""),
            });
        }
    };
    let rules = raw
        .rule
        .into_iter()
        .enumerate()
        .map(|(index, raw)| {
            let syscall = raw.syscall.clone();
            parse_rule(raw).map_err(|problem| SeccompError::AllowlistRule { file, index, syscall, problem })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Allowlist { file, default, rules })
}

/// The egress proxy process's allowlist (`egress_proxy.toml`).
pub fn egress_proxy() -> Result<Allowlist, SeccompError> {
    parse(EGRESS_PROXY_FILE, EGRESS_PROXY_TOML)
}

/// The exec trace's listener process's allowlist (`exec_trace.toml`).
pub fn exec_trace() -> Result<Allowlist, SeccompError> {
    parse(EXEC_TRACE_FILE, EXEC_TRACE_TOML)
}

impl Allowlist {
    /// Compiles the rules that apply on this build's architecture: foreign
    /// syscall ABIs kill the process, x32 syscalls get ENOSYS, listed calls
    /// get their action when their conditions hold, everything else the
    /// default.
    pub fn compile(&self) -> Result<seccompiler::BpfProgram, SeccompError> {
        let (arch, audit_arch) =
            syscalls::ARCH.ok_or(SeccompError::UnsupportedArch { arch: std::env::consts::ARCH })?;
        let mut grouped: Vec<bpf::SyscallRules> = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            if !rule.applies_here() {
                continue;
            }
            let nr = syscalls::number(&rule.syscall)
                .and_then(|nr| u32::try_from(nr).ok())
                .ok_or_else(|| SeccompError::UnknownSyscall { index, syscall: rule.syscall.clone(), arch })?;
            let compiled = bpf::CompiledRule { conditions: rule.conditions.clone(), ret: rule.action.ret() };
            match grouped.iter_mut().find(|g| g.nr == nr) {
                Some(group) => {
                    // An unconditional rule covers every call: a second rule
                    // for the syscall would be dead or contradict it.
                    if group.rules.iter().chain([&compiled]).any(|r| r.conditions.is_empty()) {
                        return Err(SeccompError::AllowlistRule {
                            file: self.file,
                            index,
                            syscall: rule.syscall.clone(),
                            problem: "another entry for this syscall has no `when`, so one of them is \
                                      redundant"
                                .into(),
                        });
                    }
                    group.rules.push(compiled);
                }
                None => {
                    grouped.push(bpf::SyscallRules { name: rule.syscall.clone(), nr, rules: vec![compiled] })
                }
            }
        }
        bpf::emit_with_default(audit_arch, cfg!(target_arch = "x86_64"), &grouped, self.default.ret())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::privileges::test_fork::run_in_child;
    use crate::seccomp::{ArgOp, install};

    fn audit_arch() -> u32 {
        syscalls::ARCH.unwrap().1
    }

    fn nr(name: &str) -> u32 {
        u32::try_from(syscalls::number(name).unwrap()).unwrap()
    }

    fn verdict(prog: &[seccompiler::sock_filter], name: &str, args: [u64; 6]) -> u32 {
        bpf::run(prog, nr(name), audit_arch(), args)
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const KILL: u32 = libc::SECCOMP_RET_KILL_PROCESS;

    /// The exec trace's listener: its requests are the kernel's numbers,
    /// and what a taken-over listener would reach for kills it.
    #[test]
    // libc's ioctl request type is u64 on glibc and i32 on musl.
    #[allow(clippy::unnecessary_cast)]
    fn the_exec_trace_list_allows_its_requests_and_nothing_it_does_not_need() {
        let list = exec_trace().unwrap();
        assert_eq!(list.default, DefaultAction::KillProcess);
        for r in &list.rules {
            assert!(r.reason.trim().len() > 10, "{} has no real reason", r.syscall);
        }
        let prog = list.compile().unwrap();
        for rule in list.rules.iter().filter(|r| r.applies_here()) {
            assert_eq!(
                verdict(&prog, &rule.syscall, satisfying(rule)),
                rule.action.ret(),
                "{}",
                rule.syscall
            );
        }
        let ioctl = |req: u64| verdict(&prog, "ioctl", [3, req, 0, 0, 0, 0]);
        for req in [
            libc::SECCOMP_IOCTL_NOTIF_RECV as u64,
            libc::SECCOMP_IOCTL_NOTIF_SEND as u64,
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID as u64,
        ] {
            assert_eq!(ioctl(req), ALLOW, "{req:#x}");
        }
        assert_eq!(ioctl(libc::SECCOMP_IOCTL_NOTIF_ADDFD as u64), KILL, "no descriptor into the sandbox");
        assert_eq!(ioctl(libc::TIOCSTI as u64), KILL);
        assert_eq!(verdict(&prog, "pidfd_send_signal", [3, 9, 0, 0, 0, 0]), KILL, "no signal but 0");
        assert_eq!(verdict(&prog, "openat", [0, 0, libc::O_RDWR as u64, 0, 0, 0]), KILL);
        for name in [
            "execve",
            "execveat",
            "ptrace",
            "process_vm_writev",
            "openat2",
            "socket",
            "connect",
            "clone",
            "clone3",
            "unshare",
            "setns",
            "mount",
            "kill",
            "pidfd_getfd",
            "setuid",
            "capset",
            "seccomp",
            "mkdirat",
            "unlinkat",
            "memfd_create",
            "bpf",
            "io_uring_setup",
        ] {
            assert_eq!(verdict(&prog, name, [0; 6]), KILL, "{name}");
        }
    }

    #[test]
    fn data_parses_with_a_reason_per_entry_and_kills_by_default() {
        let list = egress_proxy().unwrap();
        assert_eq!(list.default, DefaultAction::KillProcess);
        assert!(list.rules.len() > 30, "only {} rules", list.rules.len());
        for r in &list.rules {
            assert!(r.reason.trim().len() > 10, "{} has no real reason", r.syscall);
            assert!(syscalls::number(&r.syscall).is_some() || !r.applies_here(), "{} unknown", r.syscall);
        }
    }

    /// Arguments that satisfy every condition of `rule`.
    fn satisfying(rule: &AllowRule) -> [u64; 6] {
        let mut args = [0u64; 6];
        for c in &rule.conditions {
            let a = &mut args[usize::from(c.arg)];
            match c.op {
                ArgOp::Eq(v) => *a = v,
                ArgOp::MaskedEq { mask, value } => *a = (*a & !mask) | value,
                ArgOp::Ne(v) => {
                    let avoid: Vec<u64> = rule
                        .conditions
                        .iter()
                        .filter_map(|o| match o.op {
                            ArgOp::Ne(v) if o.arg == c.arg => Some(v),
                            _ => None,
                        })
                        .collect();
                    *a = (v + 1..).find(|x| !avoid.contains(x)).unwrap();
                }
            }
        }
        args
    }

    #[test]
    fn compiled_program_matches_each_rule_of_the_data() {
        let list = egress_proxy().unwrap();
        let prog = list.compile().unwrap();
        for rule in list.rules.iter().filter(|r| r.applies_here()) {
            assert_eq!(
                verdict(&prog, &rule.syscall, satisfying(rule)),
                rule.action.ret(),
                "{} with {:?}",
                rule.syscall,
                rule.conditions
            );
        }
        assert!(prog.len() < bpf::MAX_INSNS);
    }

    #[test]
    fn calls_the_data_does_not_list_kill_the_process() {
        let list = egress_proxy().unwrap();
        let prog = list.compile().unwrap();
        let listed: Vec<&str> =
            list.rules.iter().filter(|r| r.applies_here()).map(|r| r.syscall.as_str()).collect();
        // What a process that took over the proxy would reach for first.
        let unlisted = [
            "execve",
            "execveat",
            "ptrace",
            "process_vm_readv",
            "mount",
            "umount2",
            "pivot_root",
            "open_tree",
            "move_mount",
            "unshare",
            "setns",
            "bpf",
            "perf_event_open",
            "keyctl",
            "io_uring_setup",
            "userfaultfd",
            "listen",
            "accept4",
            "kill",
            "pidfd_open",
            "pidfd_getfd",
            "setuid",
            "setgid",
            "setresuid",
            "setgroups",
            "capset",
            "chroot",
            "mknodat",
            "unlinkat",
            "renameat2",
            "mkdirat",
            "symlinkat",
            "linkat",
            "fchmodat",
            "fchownat",
            "truncate",
            "memfd_create",
            "seccomp",
            "kcmp",
            "name_to_handle_at",
            "open_by_handle_at",
            "init_module",
            "finit_module",
            "kexec_load",
            "reboot",
        ];
        for name in unlisted {
            assert!(!listed.contains(&name), "{name} is listed; update this test if that is intended");
            assert_eq!(verdict(&prog, name, [0; 6]), KILL, "{name}");
        }
        // A 32-bit ABI would use other numbers.
        assert_eq!(bpf::run(&prog, 3, 0x4000_0003, [0; 6]), KILL);
    }

    #[test]
    fn argument_conditions_keep_only_what_the_proxy_needs() {
        let prog = egress_proxy().unwrap().compile().unwrap();
        let socket = |family: i32, kind: i32, proto: i32| {
            verdict(&prog, "socket", [family as u64, kind as u64, proto as u64, 0, 0, 0])
        };
        assert_eq!(socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0), ALLOW);
        assert_eq!(socket(libc::AF_INET6, libc::SOCK_DGRAM, 0), ALLOW);
        assert_eq!(socket(libc::AF_UNIX, libc::SOCK_STREAM, 0), ALLOW);
        assert_eq!(socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE), ALLOW);
        assert_eq!(socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_AUDIT), KILL);
        assert_eq!(socket(libc::AF_PACKET, libc::SOCK_RAW, 0), KILL);
        assert_eq!(socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0), KILL);
        assert_eq!(socket(libc::AF_ALG, libc::SOCK_SEQPACKET, 0), KILL);
        assert_eq!(socket(libc::AF_INET, libc::SOCK_RAW, 0), KILL);

        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        assert_eq!(verdict(&prog, "clone", [thread, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(verdict(&prog, "clone", [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]), KILL, "fork");
        for ns in [libc::CLONE_NEWUSER, libc::CLONE_NEWNS, libc::CLONE_NEWNET, libc::CLONE_NEWPID] {
            assert_eq!(verdict(&prog, "clone", [thread | ns as u64, 0, 0, 0, 0, 0]), KILL);
        }
        assert_eq!(verdict(&prog, "clone3", [0; 6]), bpf::errno_ret(libc::ENOSYS));

        let openat = |flags: i32| verdict(&prog, "openat", [0, 0, flags as u64, 0, 0, 0]);
        assert_eq!(openat(libc::O_RDONLY | libc::O_CLOEXEC), ALLOW);
        assert_eq!(openat(libc::O_WRONLY), KILL);
        assert_eq!(openat(libc::O_RDWR), KILL);
        assert_eq!(openat(libc::O_RDONLY | libc::O_CREAT), KILL);

        #[allow(clippy::unnecessary_cast)]
        let ioctl = |req: libc::Ioctl| verdict(&prog, "ioctl", [2, req as u64, 0, 0, 0, 0]);
        assert_eq!(ioctl(libc::FIONBIO), ALLOW);
        assert_eq!(ioctl(libc::TIOCSTI), KILL);
        assert_eq!(ioctl(libc::TIOCLINUX), KILL);
        assert_eq!(ioctl(libc::TIOCSCTTY), KILL);

        let socketpair = |family: i32| verdict(&prog, "socketpair", [family as u64, 1, 0, 0, 0, 0]);
        assert_eq!(socketpair(libc::AF_UNIX), ALLOW);
        assert_eq!(socketpair(libc::AF_INET), KILL);

        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let exec = libc::PROT_EXEC as u64;
        for call in ["mmap", "mprotect"] {
            assert_eq!(verdict(&prog, call, [0, 4096, rw, 0, 0, 0]), ALLOW, "{call}");
            assert_eq!(verdict(&prog, call, [0, 4096, rw | exec, 0, 0, 0]), KILL, "{call}");
            assert_eq!(
                verdict(&prog, call, [0, 4096, libc::PROT_READ as u64 | exec, 0, 0, 0]),
                KILL,
                "{call}"
            );
        }

        let fcntl = |cmd: i32| verdict(&prog, "fcntl", [3, cmd as u64, 0, 0, 0, 0]);
        for cmd in [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL, libc::F_DUPFD_CLOEXEC] {
            assert_eq!(fcntl(cmd), ALLOW, "{cmd}");
        }
        for cmd in [
            libc::F_SETOWN,
            10, /* F_SETSIG */
            libc::F_SETLEASE,
            libc::F_NOTIFY,
            libc::F_SETLK,
            libc::F_DUPFD,
        ] {
            assert_eq!(fcntl(cmd), KILL, "{cmd}");
        }

        let prctl = |op: i32| verdict(&prog, "prctl", [op as u64, 0, 0, 0, 0, 0]);
        assert_eq!(prctl(libc::PR_SET_NAME), ALLOW);
        assert_eq!(prctl(libc::PR_SET_DUMPABLE), KILL);
        assert_eq!(prctl(libc::PR_SET_PDEATHSIG), KILL);
        assert_eq!(prctl(libc::PR_CAP_AMBIENT), KILL);
    }

    /// The filter installed in a forked child: threads and sockets work,
    /// and an unlisted call ends the process with SIGSYS.
    #[test]
    fn installed_filter_runs_threads_and_kills_on_exec() {
        let prog = egress_proxy().unwrap().compile().unwrap();
        let code = run_in_child(|| {
            if crate::privileges::set_no_new_privs().is_err() || install(&prog).is_err() {
                return 200;
            }
            if std::thread::spawn(|| 7).join().ok() != Some(7) {
                return 1;
            }
            // mkdirat is not listed: the process dies in the call.
            let _ = std::fs::create_dir("/airlock-seccomp-test-never-created");
            3
        });
        assert_eq!(code, 128 + libc::SIGSYS);
        let code = run_in_child(|| {
            if crate::privileges::set_no_new_privs().is_err() || install(&prog).is_err() {
                return 200;
            }
            let _ = std::process::Command::new("/bin/true").status();
            4
        });
        // std forks (clone without CLONE_THREAD) before it execs: killed there.
        assert_eq!(code, 128 + libc::SIGSYS);
    }
}
