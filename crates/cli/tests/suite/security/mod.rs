//! The security group: each test is an attack a hostile sandbox (or a
//! hostile neighbour) made, with its variants, and what airlock must hold
//! against it. One module per promise; SECURITY.md names each test.

mod agent_signals;
mod apply_digest;
mod budgets;
mod egress_checks;
mod host_ids;
mod hostile_output;
mod proxy_process;
mod socket_families;
mod tenancy;
