mod apply;
mod artifacts;
mod common;
mod diff;
mod overlay;
mod persist;
