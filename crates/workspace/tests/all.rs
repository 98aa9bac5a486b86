//! Integration tests for airlock-workspace, one binary (see `suite/`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;
