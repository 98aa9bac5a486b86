pub mod support;

mod cli;
mod daemon;
mod egress;
mod escape;
mod lifecycle;
mod longlived;
mod rootless;
mod workspace;
