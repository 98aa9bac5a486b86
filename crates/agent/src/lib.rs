//! airlock-agent
