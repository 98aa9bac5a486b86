//! airlock-proto
