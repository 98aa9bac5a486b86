//! airlock-workspace
