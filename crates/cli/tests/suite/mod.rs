pub mod support;

mod cli;
mod escape;
mod lifecycle;
mod rootless;
mod workspace;
