//! The process tier: namespaces, the sandbox's root filesystem view, seccomp,
//! Landlock, cgroups (v2 and v1), rlimits, and probing what the host supports.

pub mod cgroup;
pub mod landlock_rules;
pub mod privileges;
pub mod probe;
pub mod rlimit;
pub mod seccomp;
