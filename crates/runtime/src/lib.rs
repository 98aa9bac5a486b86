//! The sandbox lifecycle: resolve policy, create the state directory, start the
//! jail, stream output, enforce limits, finalize (diff, artifacts, audit) and
//! clean up. Used in-process by `airlock run`.

pub mod audit;
pub mod names;
pub mod state;
