//! The sandbox's seccomp filter: a reviewed denylist, compiled at run time for
//! the architecture airlock runs on. (airlock's own host-side processes that
//! read hostile bytes get allowlists instead: [`allowlist`].)
//!
//! Why a denylist with default ALLOW: the command is arbitrary developer
//! tooling (compilers, package managers, language runtimes), so an allowlist
//! would break real programs in ways nobody can predict, while namespaces,
//! dropped capabilities and Landlock already confine what ordinary syscalls can
//! reach. The filter closes the kernel interfaces that stay reachable despite
//! those layers or carry outsized kernel risk. Each entry lives in `deny.toml`
//! with the reason it is there, and the tests hold the compiled program to that
//! file.
//!
//! The filter is installed last, right before the command is executed: it still
//! allows everything the agent needs to start and reap the command (fork,
//! execve, wait, kill, read, write) and the Landlock syscalls, so the order
//! "Landlock, drop capabilities, no_new_privs, seccomp" works.

pub mod allowlist;
mod bpf;
mod syscalls;

pub use allowlist::{AllowRule, Allowlist, DefaultAction, RuleAction, egress_proxy};

use serde::Deserialize;

/// The reviewed rules, embedded so the binary cannot run with a different list.
const DENY_TOML: &str = include_str!("deny.toml");
/// Setting the setuid and setgid bits: added where files land in the host's
/// tree as written (see the file's header).
const NO_SETID_TOML: &str = include_str!("no_setid.toml");

/// A list of reviewed rules a filter is compiled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleSet {
    /// The sandbox's own (`deny.toml`).
    Sandbox,
    /// No setuid or setgid bit set on any file (`no_setid.toml`): for a
    /// sandbox writing the host's workspace directly, and for the virtiofsd
    /// that serves one to a microVM.
    NoSetIdBits,
}

impl RuleSet {
    fn data(self) -> &'static str {
        match self {
            RuleSet::Sandbox => DENY_TOML,
            RuleSet::NoSetIdBits => NO_SETID_TOML,
        }
    }
}

/// What a denied syscall returns to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyAction {
    /// Fail with EPERM: "not allowed here".
    Eperm,
    /// Fail with ENOSYS: "this kernel lacks the call", so libc and libraries
    /// fall back to an older interface (clone3 → clone).
    Enosys,
    /// Fail with EAFNOSUPPORT: "this kernel has no such address family", the
    /// answer programs already expect when probing for a socket family.
    Eafnosupport,
}

impl DenyAction {
    /// The errno the caller sees.
    pub fn errno(self) -> i32 {
        match self {
            DenyAction::Eperm => libc::EPERM,
            DenyAction::Enosys => libc::ENOSYS,
            DenyAction::Eafnosupport => libc::EAFNOSUPPORT,
        }
    }
}

/// How much of a 64-bit syscall argument a condition compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgWidth {
    /// The low 32 bits: for arguments the kernel reads as `int`/`unsigned int`,
    /// which ignores the high half (so comparing it would be bypassable).
    Dword,
    /// All 64 bits: for `long`/pointer-sized arguments.
    Qword,
}

/// A comparison against one syscall argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgOp {
    /// The argument equals the value.
    Eq(u64),
    /// The argument differs from the value.
    Ne(u64),
    /// `argument & mask == value`.
    MaskedEq {
        /// Bits of the argument that are compared.
        mask: u64,
        /// Expected value of those bits.
        value: u64,
    },
}

/// One condition on a syscall argument; a rule's conditions are ANDed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgCondition {
    /// Argument index, 0 to 5.
    pub arg: u8,
    /// How many bits are compared.
    pub width: ArgWidth,
    /// The comparison.
    pub op: ArgOp,
}

/// One entry of the reviewed filter data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompRule {
    /// Syscall name as in the kernel's table.
    pub syscall: String,
    /// What the call returns when the rule matches.
    pub action: DenyAction,
    /// Argument conditions, all of which must hold; empty means every call.
    pub conditions: Vec<ArgCondition>,
    /// Architectures the rule applies to; empty means all.
    pub arches: Vec<String>,
    /// Why the call is denied.
    pub reason: String,
}

impl SeccompRule {
    /// Whether this rule is part of the filter on the architecture airlock was
    /// built for.
    pub fn applies_here(&self) -> bool {
        applies_here(&self.arches)
    }
}

/// Why the filter could not be read, compiled or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The embedded data is not valid TOML or has unknown fields.
    #[error("the embedded seccomp rules (crates/jail/src/seccomp/deny.toml) do not parse: {0}")]
    Parse(#[source] toml::de::Error),
    /// An entry parses but makes no sense.
    #[error("seccomp rule #{index} (`{syscall}`) in deny.toml is invalid: {problem}; fix the entry")]
    InvalidRule {
        /// Position of the entry in the file, from 0.
        index: usize,
        /// The entry's syscall.
        syscall: String,
        /// What is wrong with it.
        problem: String,
    },
    /// An allowlist's embedded data is not valid TOML or has unknown fields.
    #[error("the embedded seccomp allowlist {file} does not parse: {source}")]
    AllowlistParse {
        /// The data file, as named in the source tree.
        file: &'static str,
        /// The parser's error.
        #[source]
        source: toml::de::Error,
    },
    /// An allowlist entry parses but makes no sense.
    #[error("seccomp rule #{index} (`{syscall}`) in {file} is invalid: {problem}; fix the entry")]
    AllowlistRule {
        /// The data file, as named in the source tree.
        file: &'static str,
        /// Position of the entry in the file, from 0.
        index: usize,
        /// The entry's syscall.
        syscall: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The syscall name has no number on this architecture.
    #[error(
        "seccomp rule #{index}: syscall `{syscall}` is not known on {arch}; add it to \
         seccomp/syscalls.rs or limit the rule with `arches`"
    )]
    UnknownSyscall {
        /// Position of the entry in the file, from 0.
        index: usize,
        /// The unknown name.
        syscall: String,
        /// The architecture airlock was built for.
        arch: &'static str,
    },
    /// airlock has no syscall table for this architecture.
    #[error(
        "seccomp filtering is not available for this architecture ({arch}); airlock supports \
         x86_64 and aarch64"
    )]
    UnsupportedArch {
        /// `std::env::consts::ARCH`.
        arch: &'static str,
    },
    /// A syscall's rules are too long for BPF's 8-bit jump offsets.
    #[error(
        "the seccomp rules for `{syscall}` are too long for one BPF jump; split them across \
         fewer conditions"
    )]
    JumpTooFar {
        /// The syscall whose block is too long.
        syscall: String,
    },
    /// The program exceeds the kernel's instruction limit.
    #[error("the seccomp program has {len} instructions; the kernel accepts at most 4096")]
    TooLong {
        /// Instruction count.
        len: usize,
    },
    /// The kernel refused the filter.
    #[error(
        "installing the seccomp filter failed: {0}; the kernel needs CONFIG_SECCOMP_FILTER \
         (run `airlock doctor`)"
    )]
    Install(#[source] seccompiler::Error),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    deny: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    syscall: String,
    errno: String,
    #[serde(default)]
    when: Vec<RawCondition>,
    #[serde(default)]
    arches: Vec<String>,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCondition {
    arg: u8,
    width: u8,
    op: String,
    value: u64,
    mask: Option<u64>,
}

const KNOWN_ARCHES: &[&str] = &["x86_64", "aarch64"];

fn parse_condition(raw: &RawCondition) -> Result<ArgCondition, String> {
    if raw.arg > 5 {
        return Err(format!("argument index {} is not in 0..=5", raw.arg));
    }
    let width = match raw.width {
        32 => ArgWidth::Dword,
        64 => ArgWidth::Qword,
        w => return Err(format!("width {w} is neither 32 nor 64")),
    };
    let op = match (raw.op.as_str(), raw.mask) {
        ("eq", None) => ArgOp::Eq(raw.value),
        ("ne", None) => ArgOp::Ne(raw.value),
        ("masked_eq", Some(mask)) => {
            if raw.value & !mask != 0 {
                return Err(format!(
                    "value {:#x} has bits outside mask {mask:#x}, so it can never match",
                    raw.value
                ));
            }
            ArgOp::MaskedEq { mask, value: raw.value }
        }
        ("masked_eq", None) => return Err("op `masked_eq` needs a `mask`".into()),
        ("eq" | "ne", Some(_)) => return Err(format!("op `{}` takes no `mask`", raw.op)),
        (other, _) => return Err(format!("unknown op `{other}` (use eq, ne or masked_eq)")),
    };
    if width == ArgWidth::Dword {
        let too_wide = match op {
            ArgOp::Eq(v) | ArgOp::Ne(v) => v > u64::from(u32::MAX),
            ArgOp::MaskedEq { mask, .. } => mask > u64::from(u32::MAX),
        };
        if too_wide {
            return Err("a 32-bit condition has a value or mask wider than 32 bits".into());
        }
    }
    Ok(ArgCondition { arg: raw.arg, width, op })
}

/// Whether an entry for `arches` (empty: every one) is part of a filter on
/// the architecture airlock was built for.
fn applies_here(arches: &[String]) -> bool {
    match syscalls::ARCH {
        Some((arch, _)) => arches.is_empty() || arches.iter().any(|a| a == arch),
        None => false,
    }
}

/// What every reviewed entry must hold, denylist or allowlist: a syscall
/// name, a reason (`why` says what it must explain), known architectures
/// and well-formed conditions, which it returns parsed.
fn check_entry(
    syscall: &str,
    reason: &str,
    why: &str,
    arches: &[String],
    when: &[RawCondition],
) -> Result<Vec<ArgCondition>, String> {
    if syscall.trim().is_empty() {
        return Err("empty syscall name".into());
    }
    if reason.trim().is_empty() {
        return Err(format!("empty reason; every entry must say {why}"));
    }
    if let Some(a) = arches.iter().find(|a| !KNOWN_ARCHES.contains(&a.as_str())) {
        return Err(format!("unknown architecture `{a}` in `arches`"));
    }
    when.iter().map(parse_condition).collect()
}

fn parse_rule(raw: RawRule) -> Result<SeccompRule, String> {
    let conditions = check_entry(&raw.syscall, &raw.reason, "why it is denied", &raw.arches, &raw.when)?;
    let action = match raw.errno.as_str() {
        "EPERM" => DenyAction::Eperm,
        "ENOSYS" => DenyAction::Enosys,
        "EAFNOSUPPORT" => DenyAction::Eafnosupport,
        other => return Err(format!("errno `{other}` is not EPERM, ENOSYS or EAFNOSUPPORT")),
    };
    Ok(SeccompRule { syscall: raw.syscall, action, conditions, arches: raw.arches, reason: raw.reason })
}

/// The rules of the sandbox's embedded filter data, for every architecture
/// (see [`SeccompRule::applies_here`]); `airlock doctor` and reviews print
/// them.
pub fn rules() -> Result<Vec<SeccompRule>, SeccompError> {
    rules_of(RuleSet::Sandbox)
}

/// The rules of one embedded list, for every architecture.
pub fn rules_of(set: RuleSet) -> Result<Vec<SeccompRule>, SeccompError> {
    let file: RawFile = toml::from_str(set.data()).map_err(SeccompError::Parse)?;
    file.deny
        .into_iter()
        .enumerate()
        .map(|(index, raw)| {
            let syscall = raw.syscall.clone();
            parse_rule(raw).map_err(|problem| SeccompError::InvalidRule { index, syscall, problem })
        })
        .collect()
}

/// Compiles the sandbox's embedded rules into a BPF program for the
/// architecture airlock was built for: foreign syscall ABIs kill the
/// process, x32 syscalls get ENOSYS, listed calls get their errno,
/// everything else is allowed.
pub fn compile() -> Result<seccompiler::BpfProgram, SeccompError> {
    compile_sets(&[RuleSet::Sandbox])
}

/// [`compile`] for the rules of several lists together.
pub fn compile_sets(sets: &[RuleSet]) -> Result<seccompiler::BpfProgram, SeccompError> {
    let (arch, audit_arch) =
        syscalls::ARCH.ok_or(SeccompError::UnsupportedArch { arch: std::env::consts::ARCH })?;
    let mut all = Vec::new();
    for set in sets {
        all.extend(rules_of(*set)?);
    }
    let mut grouped: Vec<bpf::SyscallRules> = Vec::new();
    for (index, rule) in all.into_iter().enumerate() {
        if !rule.applies_here() {
            continue;
        }
        let nr = syscalls::number(&rule.syscall)
            .and_then(|nr| u32::try_from(nr).ok())
            .ok_or_else(|| SeccompError::UnknownSyscall { index, syscall: rule.syscall.clone(), arch })?;
        let compiled =
            bpf::CompiledRule { conditions: rule.conditions, ret: bpf::errno_ret(rule.action.errno()) };
        match grouped.iter_mut().find(|g| g.nr == nr) {
            Some(group) => {
                // An unconditional rule already covers every call; a second rule
                // for the same syscall would be dead or contradict it.
                if group.rules.iter().chain([&compiled]).any(|r| r.conditions.is_empty()) {
                    return Err(SeccompError::InvalidRule {
                        index,
                        syscall: rule.syscall,
                        problem: "another entry for this syscall has no `when`, so one of \
                                  them is redundant"
                            .into(),
                    });
                }
                group.rules.push(compiled);
            }
            None => grouped.push(bpf::SyscallRules { name: rule.syscall, nr, rules: vec![compiled] }),
        }
    }
    bpf::emit(audit_arch, cfg!(target_arch = "x86_64"), &grouped)
}

/// A filter under which `setgroups` succeeds and does nothing, every other
/// call allowed. For a program that insists on dropping its supplementary
/// groups (virtiofsd exits when it cannot) started rootless: in a user
/// namespace an ordinary user made, setgroups is denied for good, so the
/// groups cannot go; the program keeps the caller's, as every rootless
/// process of a sandbox does (they give it nothing the caller has not).
pub fn setgroups_noop() -> Result<seccompiler::BpfProgram, SeccompError> {
    let (arch, audit_arch) =
        syscalls::ARCH.ok_or(SeccompError::UnsupportedArch { arch: std::env::consts::ARCH })?;
    let syscall = "setgroups";
    let nr = syscalls::number(syscall)
        .and_then(|nr| u32::try_from(nr).ok())
        .ok_or_else(|| SeccompError::UnknownSyscall { index: 0, syscall: syscall.into(), arch })?;
    // SECCOMP_RET_ERRNO with 0: the call returns 0 without running.
    let rule = bpf::CompiledRule { conditions: Vec::new(), ret: bpf::errno_ret(0) };
    let rules = [bpf::SyscallRules { name: syscall.into(), nr, rules: vec![rule] }];
    bpf::emit(audit_arch, cfg!(target_arch = "x86_64"), &rules)
}

/// Installs `prog` on every thread of the calling process (seccomp TSYNC), so
/// no thread of the agent stays unfiltered and every child inherits it.
///
/// Sets no_new_privs itself (seccompiler does so before installing; it is
/// idempotent), because an unprivileged filter install requires it and the
/// filter must never be skipped for lack of it.
pub fn install(prog: &seccompiler::BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter_all_threads(prog).map_err(SeccompError::Install)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::privileges::test_fork::run_in_child;

    fn current_audit_arch() -> u32 {
        syscalls::ARCH.unwrap().1
    }

    fn nr(name: &str) -> u32 {
        u32::try_from(syscalls::number(name).unwrap()).unwrap()
    }

    /// Runs the compiled program in the test interpreter.
    fn verdict(prog: &[seccompiler::sock_filter], name: &str, args: [u64; 6]) -> u32 {
        bpf::run(prog, nr(name), current_audit_arch(), args)
    }

    fn eperm() -> u32 {
        bpf::errno_ret(libc::EPERM)
    }

    const SETS: [RuleSet; 2] = [RuleSet::Sandbox, RuleSet::NoSetIdBits];

    #[test]
    fn data_parses_and_every_entry_has_a_reason() {
        let rules = rules().unwrap();
        assert!(rules.len() > 50, "only {} rules", rules.len());
        for set in SETS {
            for r in &rules_of(set).unwrap() {
                assert!(!r.reason.trim().is_empty(), "{} has no reason", r.syscall);
            }
        }
    }

    #[test]
    fn every_rule_resolves_on_this_arch() {
        for set in SETS {
            for r in rules_of(set).unwrap().iter().filter(|r| r.applies_here()) {
                assert!(syscalls::number(&r.syscall).is_some(), "{} does not resolve", r.syscall);
            }
        }
    }

    /// Both lists compile together (no syscall unconditional in one and
    /// narrowed in the other).
    #[test]
    fn the_sandbox_and_the_setid_lists_compile_together() {
        compile_sets(&SETS).unwrap();
    }

    /// Every way to set the setuid or setgid bit is refused, and modes
    /// without them, or a mode the kernel ignores (no O_CREAT), are not.
    #[test]
    fn no_setid_refuses_both_bits_and_only_them() {
        let prog = compile_sets(&[RuleSet::NoSetIdBits]).unwrap();
        let allow = libc::SECCOMP_RET_ALLOW;
        let creat = libc::O_CREAT as u64 | libc::O_WRONLY as u64;
        let tmpfile = libc::O_TMPFILE as u64 | libc::O_RDWR as u64;
        let cases: &[(&str, [u64; 6], u32)] = &[
            ("fchmod", [3, 0o4755, 0, 0, 0, 0], eperm()),
            ("fchmod", [3, 0o2755, 0, 0, 0, 0], eperm()),
            ("fchmod", [3, 0o6755, 0, 0, 0, 0], eperm()),
            ("fchmod", [3, 0o1777, 0, 0, 0, 0], allow),
            ("fchmod", [3, 0o755, 0, 0, 0, 0], allow),
            // The high half of an `int` mode is ignored by the kernel.
            ("fchmod", [3, 0xffff_ffff_0000_0000 | 0o755, 0, 0, 0, 0], allow),
            ("fchmodat", [3, 0, 0o4700, 0, 0, 0], eperm()),
            ("fchmodat", [3, 0, 0o644, 0, 0, 0], allow),
            ("fchmodat2", [3, 0, 0o2700, 0, 0, 0], eperm()),
            ("openat", [3, 0, creat, 0o4755, 0, 0], eperm()),
            ("openat", [3, 0, creat, 0o2755, 0, 0], eperm()),
            ("openat", [3, 0, creat, 0o755, 0, 0], allow),
            ("openat", [3, 0, tmpfile, 0o4755, 0, 0], eperm()),
            ("openat", [3, 0, tmpfile, 0o6755, 0, 0], eperm()),
            ("openat", [3, 0, libc::O_RDONLY as u64, 0o4755, 0, 0], allow),
            ("mknodat", [3, 0, libc::S_IFREG as u64 | 0o4755, 0, 0, 0], eperm()),
            ("openat2", [3, 0, 0, 24, 0, 0], bpf::errno_ret(libc::ENOSYS)),
        ];
        for (name, args, want) in cases {
            assert_eq!(verdict(&prog, name, *args), *want, "{name} {args:?}");
        }
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(verdict(&prog, "chmod", [0, 0o4755, 0, 0, 0, 0]), eperm());
            assert_eq!(verdict(&prog, "creat", [0, 0o2755, 0, 0, 0, 0]), eperm());
            assert_eq!(verdict(&prog, "open", [0, creat, 0o4755, 0, 0, 0]), eperm());
            assert_eq!(verdict(&prog, "open", [0, creat, 0o755, 0, 0, 0]), allow);
            assert_eq!(verdict(&prog, "mknod", [0, libc::S_IFREG as u64 | 0o2755, 0, 0, 0, 0]), eperm());
        }
    }

    /// Under the installed list, a file can be made executable but not
    /// setuid, and keeps its mode.
    #[test]
    fn installed_no_setid_keeps_the_bit_off_a_real_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"#!/bin/sh\n").unwrap();
        let prog = compile_sets(&[RuleSet::NoSetIdBits]).unwrap();
        let child_path = path.clone();
        let code = run_in_child(move || {
            if install(&prog).is_err() {
                return 200;
            }
            if std::fs::set_permissions(&child_path, std::fs::Permissions::from_mode(0o755)).is_err() {
                return 1;
            }
            match std::fs::set_permissions(&child_path, std::fs::Permissions::from_mode(0o4755)) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => 0,
                _ => 2,
            }
        });
        assert_eq!(code, 0);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o755);
    }

    #[test]
    fn required_syscalls_are_denied_unconditionally() {
        let required = [
            "init_module",
            "finit_module",
            "delete_module",
            "kexec_load",
            "kexec_file_load",
            "bpf",
            "perf_event_open",
            "add_key",
            "request_key",
            "keyctl",
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "move_mount",
            "open_tree",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "mount_setattr",
            "unshare",
            "setns",
            "process_vm_readv",
            "process_vm_writev",
            "open_by_handle_at",
            "name_to_handle_at",
            "userfaultfd",
            "swapon",
            "swapoff",
            "reboot",
            "syslog",
            "acct",
            "settimeofday",
            "clock_settime",
            "clock_adjtime",
            "adjtimex",
            "quotactl",
            "lookup_dcookie",
            "io_uring_enter",
            "io_uring_register",
            "vhangup",
            "sethostname",
            "setdomainname",
            "nfsservctl",
            "kcmp",
        ];
        let prog = compile().unwrap();
        for name in required {
            assert_eq!(verdict(&prog, name, [0; 6]), eperm(), "{name}");
            assert_eq!(verdict(&prog, name, [u64::MAX; 6]), eperm(), "{name}");
        }
        for name in ["clone3", "io_uring_setup"] {
            assert_eq!(verdict(&prog, name, [0; 6]), bpf::errno_ret(libc::ENOSYS), "{name}");
        }
        #[cfg(target_arch = "x86_64")]
        for name in ["iopl", "ioperm"] {
            assert_eq!(verdict(&prog, name, [0; 6]), eperm(), "{name}");
        }
    }

    #[test]
    fn compiled_program_matches_each_rule_of_the_data() {
        let prog = compile().unwrap();
        for rule in rules().unwrap().iter().filter(|r| r.applies_here()) {
            // Build arguments that satisfy every condition of the rule.
            let mut args = [0u64; 6];
            let mut satisfiable = true;
            for c in &rule.conditions {
                let a = &mut args[usize::from(c.arg)];
                match c.op {
                    ArgOp::Eq(v) => *a = v,
                    ArgOp::MaskedEq { mask, value } => *a = (*a & !mask) | value,
                    // Pick a value different from every `ne` operand.
                    ArgOp::Ne(_) => {
                        let avoid: Vec<u64> = rule
                            .conditions
                            .iter()
                            .filter_map(|o| match o.op {
                                ArgOp::Ne(v) if o.arg == c.arg => Some(v),
                                _ => None,
                            })
                            .collect();
                        match (1u64..).find(|v| !avoid.contains(v)) {
                            Some(v) => *a = v,
                            None => satisfiable = false,
                        }
                    }
                }
            }
            assert!(satisfiable);
            assert_eq!(
                verdict(&prog, &rule.syscall, args),
                bpf::errno_ret(rule.action.errno()),
                "{} with {:?}",
                rule.syscall,
                rule.conditions
            );
        }
    }

    #[test]
    fn clone_filter_allows_fork_and_threads_but_no_namespace_flag() {
        let prog = compile().unwrap();
        let allow = libc::SECCOMP_RET_ALLOW;
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        let fork = libc::SIGCHLD as u64;
        let vfork = (libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as u64;
        for flags in [thread, fork, vfork] {
            assert_eq!(verdict(&prog, "clone", [flags, 0, 0, 0, 0, 0]), allow);
        }
        let namespace_flags = [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWCGROUP,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
        ];
        for ns in namespace_flags {
            let flags = fork | ns as u64;
            assert_eq!(verdict(&prog, "clone", [flags, 0, 0, 0, 0, 0]), eperm());
            // High bits must not hide the flag: the kernel ignores them.
            let padded = flags | 0xffff_ffff_0000_0000;
            assert_eq!(verdict(&prog, "clone", [padded, 0, 0, 0, 0, 0]), eperm());
        }
        // The data covers exactly the namespace flags libc knows for clone().
        let masks: Vec<u64> = rules()
            .unwrap()
            .iter()
            .filter(|r| r.syscall == "clone")
            .flat_map(|r| r.conditions.iter())
            .filter_map(|c| match c.op {
                ArgOp::MaskedEq { mask, .. } => Some(mask),
                _ => None,
            })
            .collect();
        let mut expected: Vec<u64> = namespace_flags.iter().map(|f| *f as u64).collect();
        let mut got = masks.clone();
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected);
    }

    #[test]
    fn argument_filters_match_libc_constants() {
        let prog = compile().unwrap();
        let allow = libc::SECCOMP_RET_ALLOW;
        // libc's ioctl request type is u64 on glibc and i32 on musl.
        #[allow(clippy::unnecessary_cast)]
        let req = |r: libc::Ioctl| r as u64;
        let ioctl = |cmd: u64| verdict(&prog, "ioctl", [0, cmd, 0, 0, 0, 0]);
        assert_eq!(ioctl(req(libc::TIOCSTI)), eperm());
        assert_eq!(ioctl(req(libc::TIOCLINUX)), eperm());
        assert_eq!(ioctl(req(libc::TIOCSTI) | 0x1_0000_0000), eperm());
        assert_eq!(ioctl(req(libc::TCGETS)), allow);
        assert_eq!(ioctl(req(libc::TIOCGWINSZ)), allow);

        let ptrace = |req: u64| verdict(&prog, "ptrace", [req, 0, 0, 0, 0, 0]);
        assert_eq!(ptrace(libc::PTRACE_ATTACH as u64), eperm());
        assert_eq!(ptrace(libc::PTRACE_SEIZE as u64), eperm());
        assert_eq!(ptrace(libc::PTRACE_TRACEME as u64), allow);
        assert_eq!(ptrace(libc::PTRACE_PEEKDATA as u64), allow);
        assert_eq!(ptrace(libc::PTRACE_CONT as u64), allow);

        let personality = |p: u64| verdict(&prog, "personality", [p, 0, 0, 0, 0, 0]);
        assert_eq!(personality(0xffff_ffff), allow);
        assert_eq!(personality(0), allow);
        assert_eq!(personality(libc::ADDR_NO_RANDOMIZE as u64), eperm());
        assert_eq!(personality(0x0040_0000), eperm()); // READ_IMPLIES_EXEC

        let socket =
            |family: i32, proto: i32| verdict(&prog, "socket", [family as u64, 3, proto as u64, 0, 0, 0]);
        assert_eq!(socket(libc::AF_NETLINK, libc::NETLINK_ROUTE), allow);
        assert_eq!(socket(libc::AF_NETLINK, libc::NETLINK_AUDIT), eperm());
        assert_eq!(socket(libc::AF_NETLINK, libc::NETLINK_NETFILTER), eperm());
        assert_eq!(socket(libc::AF_UNIX, 0), allow);
        assert_eq!(socket(libc::AF_INET, 6), allow);
        assert_eq!(socket(libc::AF_INET6, 6), allow);
        let no_family = bpf::errno_ret(libc::EAFNOSUPPORT);
        for family in [libc::AF_VSOCK, libc::AF_PACKET, libc::AF_ALG, libc::AF_TIPC, libc::AF_XDP, 0, 4096] {
            assert_eq!(socket(family, 0), no_family, "family {family}");
        }
        // The family is an `int`: garbage in the high half changes nothing.
        assert_eq!(verdict(&prog, "socket", [(1 << 32) | libc::AF_VSOCK as u64, 1, 0, 0, 0, 0]), no_family);
        assert_eq!(verdict(&prog, "socket", [(1 << 32) | libc::AF_UNIX as u64, 1, 0, 0, 0, 0]), allow);

        let socketpair = |family: i32| verdict(&prog, "socketpair", [family as u64, 1, 0, 0, 0, 0]);
        assert_eq!(socketpair(libc::AF_UNIX), allow);
        assert_eq!(socketpair(libc::AF_TIPC), no_family);
        assert_eq!(socketpair(libc::AF_INET), no_family);
    }

    #[test]
    fn unlisted_syscalls_are_allowed_and_foreign_abis_are_not() {
        let prog = compile().unwrap();
        let allow = libc::SECCOMP_RET_ALLOW;
        let unlisted = [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_execve,
            libc::SYS_wait4,
            libc::SYS_kill,
            libc::SYS_landlock_create_ruleset,
            libc::SYS_landlock_restrict_self,
            libc::SYS_seccomp,
        ];
        for n in unlisted {
            let n = u32::try_from(n).unwrap();
            assert_eq!(bpf::run(&prog, n, current_audit_arch(), [0; 6]), allow);
        }
        // A 32-bit ABI (i386 on x86_64, arm on aarch64) would use other numbers.
        assert_eq!(bpf::run(&prog, 21, 0x4000_0003, [0; 6]), libc::SECCOMP_RET_KILL_PROCESS);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            bpf::run(&prog, nr("mount") | bpf::X32_SYSCALL_BIT, current_audit_arch(), [0; 6]),
            bpf::errno_ret(libc::ENOSYS)
        );
        assert!(prog.len() < bpf::MAX_INSNS);
    }

    /// A raw syscall with integer (or null) arguments, for the behavioural tests.
    fn raw_syscall(nr: libc::c_long, args: [libc::c_long; 5]) -> i32 {
        // SAFETY: every caller passes only integers or null pointers; the kernel
        // validates them and nothing in this process's memory is written.
        let rc = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4]) };
        if rc == -1 { std::io::Error::last_os_error().raw_os_error().unwrap_or(255) } else { 0 }
    }

    /// Forks, installs the filter in the child, runs `call` there and returns
    /// the errno it saw (0 for success, 200 if the install failed).
    fn errno_under_filter(call: impl FnOnce() -> i32) -> i32 {
        let prog = compile().unwrap();
        run_in_child(|| {
            if install(&prog).is_err() {
                return 200;
            }
            call()
        })
    }

    /// A pid above the kernel's maximum, so an unfiltered ptrace or
    /// process_vm_readv would fail with ESRCH instead of touching a process.
    const NO_SUCH_PID: libc::c_long = 0x3fff_fff0;

    #[test]
    fn setgroups_succeeds_without_effect_under_its_noop_filter() {
        let prog = setgroups_noop().unwrap();
        assert_eq!(verdict(&prog, "setgroups", [0; 6]), libc::SECCOMP_RET_ERRNO);
        assert_eq!(verdict(&prog, "getpid", [0; 6]), libc::SECCOMP_RET_ALLOW);
        assert_eq!(verdict(&prog, "setresuid", [0; 6]), libc::SECCOMP_RET_ALLOW);
        // Installed in a child: asked for a group it is not in, the call
        // answers 0 and the groups stay what they were.
        let code = run_in_child(|| {
            let before = rustix::process::getgroups().ok();
            if install(&prog).is_err() {
                return 1;
            }
            let wanted: [libc::gid_t; 1] = [4242];
            // SAFETY: the kernel reads one gid from a live array (were the
            // call not filtered; it is) and writes nothing.
            if unsafe { libc::syscall(libc::SYS_setgroups, 1, wanted.as_ptr()) } != 0 {
                return 2;
            }
            if rustix::process::getgroups().ok() != before {
                return 3;
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn installed_filter_denies_with_eperm() {
        let null = 0;
        let cases: [(&str, libc::c_long, [libc::c_long; 5]); 8] = [
            ("mount", libc::SYS_mount, [null, null, null, 0, null]),
            ("unshare(CLONE_NEWUSER)", libc::SYS_unshare, [libc::CLONE_NEWUSER as libc::c_long, 0, 0, 0, 0]),
            ("keyctl", libc::SYS_keyctl, [libc::KEYCTL_GET_KEYRING_ID as libc::c_long, -1, 0, 0, 0]),
            ("bpf", libc::SYS_bpf, [0, null, 0, 0, 0]),
            (
                "ptrace(PTRACE_ATTACH)",
                libc::SYS_ptrace,
                [libc::PTRACE_ATTACH as libc::c_long, NO_SUCH_PID, 0, 0, 0],
            ),
            (
                "ptrace(PTRACE_SEIZE)",
                libc::SYS_ptrace,
                [libc::PTRACE_SEIZE as libc::c_long, NO_SUCH_PID, 0, 0, 0],
            ),
            ("ioctl(TIOCSTI)", libc::SYS_ioctl, [0, libc::TIOCSTI as libc::c_long, null, 0, 0]),
            ("process_vm_readv", libc::SYS_process_vm_readv, [NO_SUCH_PID, null, 0, null, 0]),
        ];
        for (what, nr, args) in cases {
            assert_eq!(errno_under_filter(move || raw_syscall(nr, args)), libc::EPERM, "{what}");
        }
    }

    #[test]
    fn installed_filter_denies_clone_with_new_namespace() {
        let got = errno_under_filter(|| {
            let flags = (libc::CLONE_NEWNS | libc::SIGCHLD) as libc::c_long;
            // SAFETY: clone without CLONE_VM and with a null stack behaves like
            // fork; if the filter failed to deny it, the child leaves at once.
            let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
            match rc {
                // SAFETY: _exit is async-signal-safe and ends only this child.
                0 => unsafe { libc::_exit(0) },
                -1 => std::io::Error::last_os_error().raw_os_error().unwrap_or(255),
                _ => 0,
            }
        });
        assert_eq!(got, libc::EPERM);
    }

    #[test]
    fn installed_filter_returns_enosys_for_clone3_and_x32() {
        assert_eq!(errno_under_filter(|| raw_syscall(libc::SYS_clone3, [0; 5])), libc::ENOSYS);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            errno_under_filter(|| raw_syscall(
                libc::SYS_getpid | libc::c_long::from(bpf::X32_SYSCALL_BIT),
                [0; 5]
            )),
            libc::ENOSYS
        );
    }

    #[test]
    fn installed_filter_refuses_socket_families_outside_the_allowlist() {
        let socket = |family: libc::c_int, kind: libc::c_int| {
            errno_under_filter(move || raw_syscall(libc::SYS_socket, [family.into(), kind.into(), 0, 0, 0]))
        };
        assert_eq!(socket(libc::AF_VSOCK, libc::SOCK_STREAM), libc::EAFNOSUPPORT);
        assert_eq!(socket(libc::AF_ALG, libc::SOCK_SEQPACKET), libc::EAFNOSUPPORT);
        assert_eq!(socket(libc::AF_UNIX, libc::SOCK_STREAM), 0);
        assert_eq!(socket(libc::AF_INET, libc::SOCK_STREAM), 0);
        let pair = |family: libc::c_int| {
            errno_under_filter(move || {
                let mut fds = [0 as libc::c_int; 2];
                let out = fds.as_mut_ptr() as libc::c_long;
                raw_syscall(libc::SYS_socketpair, [family.into(), libc::SOCK_STREAM.into(), 0, out, 0])
            })
        };
        assert_eq!(pair(libc::AF_UNIX), 0);
        assert_eq!(pair(libc::AF_TIPC), libc::EAFNOSUPPORT);
    }

    #[test]
    fn installed_filter_still_runs_threads_and_fork_exec() {
        let got = errno_under_filter(|| {
            // glibc tries clone3 first and must fall back to clone on ENOSYS.
            let thread_ok = std::thread::spawn(|| 7).join().map(|v| v == 7);
            if thread_ok.ok() != Some(true) {
                return 1;
            }
            match std::process::Command::new("/bin/true").status() {
                Ok(s) if s.success() => 0,
                Ok(_) => 2,
                Err(e) => e.raw_os_error().unwrap_or(3),
            }
        });
        assert_eq!(got, 0);
    }
}
