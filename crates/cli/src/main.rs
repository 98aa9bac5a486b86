//! The `airlock` command: argument parsing and presentation only. Every
//! decision is made in the library crates.

mod cli;
mod present;
mod terminal;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The same binary is the in-sandbox agent, each long-lived sandbox's
    // supervisor and each sandbox's egress proxy; those roles take no flags.
    match std::env::args().nth(1).as_deref() {
        Some(airlock_runtime::AGENT_ROLE) => return code(airlock_agent::main()),
        // PID 1 of a microVM guest, started by its kernel from the initramfs.
        Some(airlock_vm::GUEST_ROLE) => return code(airlock_vm::init::main()),
        // QEMU's jailer: confines itself, then becomes QEMU.
        Some(airlock_vm::jail::JAIL_ROLE) => return code(airlock_vm::jail::main()),
        Some(airlock_runtime::supervisor::SUPERVISOR_ROLE) => {
            return code(airlock_runtime::supervisor::main());
        }
        Some(airlock_runtime::proxy_process::EGRESS_ROLE) => {
            init_logging();
            return code(airlock_runtime::proxy_process::main());
        }
        // The process that connects to a published port inside the sandbox.
        Some(airlock_runtime::ports::CONNECTOR_ROLE) => {
            init_logging();
            return code(airlock_runtime::ports::connector_main());
        }
        // The listener that records the sandbox's execs.
        Some(airlock_runtime::exec_trace::TRACE_ROLE) => {
            init_logging();
            return code(airlock_runtime::exec_trace::main());
        }
        _ => {}
    }
    init_logging();
    let args = cli::Cli::parse();
    match cli::dispatch(args) {
        Ok(status) => code(status),
        // A reader that stops early (`airlock diff x | head`) is not an error.
        Err(err)
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            code(0)
        }
        Err(err) => {
            present::error(err.as_ref());
            code(airlock_runtime::exit_codes::AIRLOCK_FAILED)
        }
    }
}

fn code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
