//! The processes every sandbox's launch starts and waits for, named by
//! argv[1] and taking no flags. `airlock-helper` serves these alone, so
//! that each starts fast; `airlock` serves them too (where the helper is not
//! installed) besides the roles only it has. The egress proxy is not one of
//! them: it starts at a sandbox's first connection, and its code (TLS, HTTP,
//! an async runtime) would double the helper's start.

use airlock_runtime::{AGENT_ROLE, exec_trace};

/// Runs the role `name` to its end and returns its exit status; None when
/// `name` is not one of these roles.
pub fn run(name: &str) -> Option<i32> {
    Some(match name {
        AGENT_ROLE => airlock_agent::main(),
        // The listener that records the sandbox's execs.
        exec_trace::TRACE_ROLE => {
            init_logging();
            exec_trace::main()
        }
        _ => return None,
    })
}

/// Logs to stderr, filtered by `AIRLOCK_LOG` (warnings by default).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
