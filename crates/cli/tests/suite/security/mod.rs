//! The security group: each test is an attack a hostile sandbox (or a
//! hostile neighbour) made, with its variants, and what airlock must hold
//! against it. One module per promise; SECURITY.md names each test.

mod hostile_output;
mod tenancy;
