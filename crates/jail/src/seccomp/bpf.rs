//! Turns the parsed deny rules into a classic-BPF seccomp program.
//!
//! seccompiler's own compiler gives every rule of a filter the same action and
//! matches only exact syscall numbers. airlock needs two things it cannot
//! express: a per-rule errno (EPERM for most rules, ENOSYS for `clone3` and
//! `io_uring_setup`) and a range check that closes the x32 syscall table on
//! x86_64, without which a denylist can be bypassed by adding bit 30 to any
//! syscall number. The program is emitted here as seccompiler's `sock_filter`
//! type and installed with seccompiler; it only uses loads, ALU `and`, forward
//! conditional jumps and returns, and every jump offset is range-checked.

use seccompiler::sock_filter;

use super::{ArgCondition, ArgOp, ArgWidth, SeccompError};

// Opcodes from linux/filter.h (class | size | mode, class | op | source).
/// BPF_LD | BPF_W | BPF_ABS: load 32 bits of `seccomp_data` at offset k.
const LD_W_ABS: u16 = 0x20;
/// BPF_JMP | BPF_JEQ | BPF_K
const JMP_JEQ_K: u16 = 0x15;
/// BPF_JMP | BPF_JGE | BPF_K
const JMP_JGE_K: u16 = 0x35;
/// BPF_ALU | BPF_AND | BPF_K
const ALU_AND_K: u16 = 0x54;
/// BPF_RET | BPF_K
const RET_K: u16 = 0x06;

// Offsets into `struct seccomp_data` (linux/seccomp.h).
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARGS: u32 = 16;

/// The kernel refuses longer programs (BPF_MAXINSNS).
pub(crate) const MAX_INSNS: usize = 4096;

/// x86_64 marks x32-ABI syscalls by setting this bit in the number.
pub(crate) const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// One deny rule ready for emission: its argument conditions (ANDed; empty means
/// "always") and the seccomp return value when they all hold.
pub(crate) struct CompiledRule {
    pub conditions: Vec<ArgCondition>,
    pub ret: u32,
}

/// All rules of one syscall; a call matches if any rule matches.
pub(crate) struct SyscallRules {
    pub name: String,
    pub nr: u32,
    pub rules: Vec<CompiledRule>,
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Which branch of an instruction must later be pointed at the rule's end
/// ("condition failed, try the next rule").
enum Branch {
    True,
    False,
}

/// Offsets of the low and high 32-bit halves of syscall argument `arg`
/// (little-endian: the low half comes first).
fn arg_offsets(arg: u8) -> (u32, u32) {
    let base = DATA_ARGS + 8 * u32::from(arg);
    (base, base + 4)
}

fn low(v: u64) -> u32 {
    (v & 0xFFFF_FFFF) as u32
}

fn high(v: u64) -> u32 {
    (v >> 32) as u32
}

/// Emits one condition; branches that mean "condition false" are recorded in
/// `fails` to be patched once the rule's length is known.
fn emit_condition(c: &ArgCondition, out: &mut Vec<sock_filter>, fails: &mut Vec<(usize, Branch)>) {
    let (lo, hi) = arg_offsets(c.arg);
    let mut fail_unless_eq = |out: &mut Vec<sock_filter>, k: u32| {
        fails.push((out.len(), Branch::False));
        out.push(jump(JMP_JEQ_K, k, 0, 0));
    };
    match (c.width, c.op) {
        (ArgWidth::Dword, ArgOp::Eq(v)) => {
            out.push(stmt(LD_W_ABS, lo));
            fail_unless_eq(out, low(v));
        }
        (ArgWidth::Qword, ArgOp::Eq(v)) => {
            out.push(stmt(LD_W_ABS, hi));
            fail_unless_eq(out, high(v));
            out.push(stmt(LD_W_ABS, lo));
            fail_unless_eq(out, low(v));
        }
        (ArgWidth::Dword, ArgOp::MaskedEq { mask, value }) => {
            out.push(stmt(LD_W_ABS, lo));
            out.push(stmt(ALU_AND_K, low(mask)));
            fail_unless_eq(out, low(value));
        }
        (ArgWidth::Qword, ArgOp::MaskedEq { mask, value }) => {
            out.push(stmt(LD_W_ABS, hi));
            out.push(stmt(ALU_AND_K, high(mask)));
            fail_unless_eq(out, high(value));
            out.push(stmt(LD_W_ABS, lo));
            out.push(stmt(ALU_AND_K, low(mask)));
            fail_unless_eq(out, low(value));
        }
        (ArgWidth::Dword, ArgOp::Ne(v)) => {
            out.push(stmt(LD_W_ABS, lo));
            fails.push((out.len(), Branch::True));
            out.push(jump(JMP_JEQ_K, low(v), 0, 0));
        }
        (ArgWidth::Qword, ArgOp::Ne(v)) => {
            // High halves differ: the condition holds, skip the low-half test.
            out.push(stmt(LD_W_ABS, hi));
            out.push(jump(JMP_JEQ_K, high(v), 0, 2));
            out.push(stmt(LD_W_ABS, lo));
            fails.push((out.len(), Branch::True));
            out.push(jump(JMP_JEQ_K, low(v), 0, 0));
        }
    }
}

/// Emits a rule: its conditions, then `ret` of its action. A failed condition
/// jumps to the first instruction after the rule.
fn emit_rule(name: &str, rule: &CompiledRule) -> Result<Vec<sock_filter>, SeccompError> {
    let mut out = Vec::new();
    let mut fails = Vec::new();
    for c in &rule.conditions {
        emit_condition(c, &mut out, &mut fails);
    }
    out.push(stmt(RET_K, rule.ret));
    let len = out.len();
    for (idx, branch) in fails {
        let off =
            u8::try_from(len - idx - 1).map_err(|_| SeccompError::JumpTooFar { syscall: name.into() })?;
        if let Some(insn) = out.get_mut(idx) {
            match branch {
                Branch::True => insn.jt = off,
                Branch::False => insn.jf = off,
            }
        }
    }
    Ok(out)
}

/// Builds the whole program of a denylist: every call no rule matches is
/// allowed. See [`emit_with_default`].
pub(crate) fn emit(
    audit_arch: u32,
    x32_guard: bool,
    syscalls: &[SyscallRules],
) -> Result<Vec<sock_filter>, SeccompError> {
    emit_with_default(audit_arch, x32_guard, syscalls, libc::SECCOMP_RET_ALLOW)
}

/// Builds the whole program.
///
/// Layout: check the audit architecture (foreign ABI → kill the process), load
/// the syscall number, optionally answer x32 numbers with ENOSYS, then one block
/// per syscall (`jeq nr` → its rules, each block ending in `ret`), then
/// `ret default_ret`. A call whose syscall has rules but none of whose
/// conditions hold also gets `default_ret`: ALLOW for a denylist, the
/// refusal for an allowlist.
pub(crate) fn emit_with_default(
    audit_arch: u32,
    x32_guard: bool,
    syscalls: &[SyscallRules],
    default_ret: u32,
) -> Result<Vec<sock_filter>, SeccompError> {
    let mut prog = vec![
        stmt(LD_W_ABS, DATA_ARCH),
        jump(JMP_JEQ_K, audit_arch, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(LD_W_ABS, DATA_NR),
    ];
    if x32_guard {
        prog.push(jump(JMP_JGE_K, X32_SYSCALL_BIT, 0, 1));
        prog.push(stmt(RET_K, errno_ret(libc::ENOSYS)));
    }
    for sc in syscalls {
        let mut body = Vec::new();
        for rule in &sc.rules {
            body.extend(emit_rule(&sc.name, rule)?);
        }
        // Conditional rules fall through when none matched: the default.
        if sc.rules.iter().any(|r| !r.conditions.is_empty()) {
            body.push(stmt(RET_K, default_ret));
        }
        let skip =
            u8::try_from(body.len()).map_err(|_| SeccompError::JumpTooFar { syscall: sc.name.clone() })?;
        prog.push(jump(JMP_JEQ_K, sc.nr, 0, skip));
        prog.extend(body);
    }
    prog.push(stmt(RET_K, default_ret));
    if prog.len() > MAX_INSNS {
        return Err(SeccompError::TooLong { len: prog.len() });
    }
    Ok(prog)
}

/// The seccomp return value that fails a syscall with `errno`.
pub(crate) fn errno_ret(errno: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (errno.unsigned_abs() & libc::SECCOMP_RET_DATA)
}

/// A classic-BPF interpreter for exactly the instructions `emit` produces, so
/// tests can hold the compiled program to its source without installing it.
#[cfg(test)]
pub(crate) fn run(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_le_bytes());
    data[4..8].copy_from_slice(&arch.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    let mut acc: u32 = 0;
    let mut pc = 0usize;
    loop {
        let insn = &prog[pc];
        pc += 1;
        match insn.code {
            LD_W_ABS => {
                let k = insn.k as usize;
                acc = u32::from_le_bytes([data[k], data[k + 1], data[k + 2], data[k + 3]]);
            }
            ALU_AND_K => acc &= insn.k,
            JMP_JEQ_K | JMP_JGE_K => {
                let taken = if insn.code == JMP_JEQ_K { acc == insn.k } else { acc >= insn.k };
                pc += usize::from(if taken { insn.jt } else { insn.jf });
            }
            RET_K => return insn.k,
            other => panic!("unexpected opcode {other:#x} at {}", pc - 1),
        }
    }
}
