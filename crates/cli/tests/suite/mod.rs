pub mod support;

mod cli;
mod egress;
mod escape;
mod lifecycle;
mod rootless;
mod workspace;
