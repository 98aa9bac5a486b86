//! The process tier: namespaces, the sandbox's root filesystem view, seccomp,
//! Landlock, cgroups (v2 and v1), rlimits, and probing what the host supports.
//!
//! Host side: [`spawn`] (clone into namespaces, id maps, cgroup placement),
//! [`cgroup`], [`probe`]. Sandbox side, run by the agent on itself:
//! [`setup::confine`], which uses [`mounts`], [`rlimit`], [`privileges`],
//! [`landlock_rules`] and [`seccomp`]. airlock's own host-side processes that
//! read hostile bytes (the egress proxy) confine themselves with [`service`].

pub mod cgroup;
pub mod exec_claim;
pub mod exec_ends;
pub mod exec_rate;
pub mod landlock_rules;
pub mod mounts;
pub mod names;
/// The plan's data types live in the protocol crate; re-exported here.
pub use airlock_proto::plan;
pub mod privileges;
pub mod probe;
pub mod proc_events;
pub mod redirect;
pub mod rlimit;
pub mod seccomp;
pub mod service;
pub mod setup;
pub mod spawn;
pub mod sys;

pub use plan::JailPlan;
