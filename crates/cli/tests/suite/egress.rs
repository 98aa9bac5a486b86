//! (egress tests: being written)
