//! airlock's integration tests: real sandboxes started through the real
//! binary. One test binary (faster to link); one module per concern.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;
