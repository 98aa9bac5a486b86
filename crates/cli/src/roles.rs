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

/// Logs to stderr, filtered by `AIRLOCK_LOG`: a level (`debug`) and/or
/// `target=level` pairs (`airlock_runtime=debug,warn`), warnings by default.
/// A target list rather than tracing's full filter language: the latter
/// links a regular expression engine whose tables the dynamic loader
/// relocates at every start of every helper, two per sandbox.
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = log_filter(std::env::var("AIRLOCK_LOG").ok().as_deref());
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false))
        .with(filter)
        .init();
}

/// The filter `AIRLOCK_LOG`'s value asks for; warnings when it is unset or
/// cannot be read (said on stderr, as logging is not up yet).
fn log_filter(value: Option<&str>) -> tracing_subscriber::filter::Targets {
    let warn = || tracing_subscriber::filter::Targets::new().with_default(tracing::Level::WARN);
    match value.map(str::trim) {
        None | Some("") => warn(),
        Some(value) => value.parse().unwrap_or_else(|e| {
            eprintln!("airlock: AIRLOCK_LOG={value:?} is not a log filter ({e}); logging warnings");
            warn()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn log_filter_takes_a_level_or_targets_and_falls_back_to_warnings() {
        let debug = log_filter(Some("debug"));
        assert!(debug.would_enable("airlock_runtime::lifecycle", &Level::DEBUG));
        let pairs = log_filter(Some("airlock_runtime=debug,info"));
        assert!(pairs.would_enable("airlock_runtime::lifecycle", &Level::DEBUG));
        assert!(!pairs.would_enable("airlock_egress::proxy", &Level::DEBUG));
        assert!(pairs.would_enable("airlock_egress::proxy", &Level::INFO));
        for unset in [None, Some(""), Some("no such=level=x")] {
            let filter = log_filter(unset);
            assert!(filter.would_enable("airlock_runtime", &Level::WARN), "{unset:?}");
            assert!(!filter.would_enable("airlock_runtime", &Level::INFO), "{unset:?}");
        }
    }
}
