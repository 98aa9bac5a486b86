pub mod support;

mod cgroup_v2;
mod cli;
mod cli_daemon;
mod daemon;
mod daemon_attach;
mod daemon_files;
mod daemon_flood;
mod daemon_fuzz;
mod daemon_harness;
mod daemon_scale;
mod daemon_tcp;
mod egress;
mod escape;
mod lifecycle;
mod longlived;
mod rootless;
mod workspace;
