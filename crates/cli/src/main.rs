//! The `airlock` command: argument parsing and presentation only. Every
//! decision is made in the library crates.

mod cli;
mod present;
mod roles;
mod terminal;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The same binary is also every process airlock starts for a sandbox
    // (`airlock-helper` serves some of them faster); those roles take no
    // flags.
    let role = std::env::args().nth(1);
    if let Some(status) = role.as_deref().and_then(roles::run) {
        return code(status);
    }
    match role.as_deref() {
        // PID 1 of a microVM guest, started by its kernel from the initramfs.
        Some(airlock_vm::GUEST_ROLE) => return code(airlock_vm::init::main()),
        // QEMU's jailer: confines itself, then becomes QEMU.
        Some(airlock_vm::jail::JAIL_ROLE) => return code(airlock_vm::jail::main()),
        Some(airlock_runtime::supervisor::SUPERVISOR_ROLE) => {
            return code(airlock_runtime::supervisor::main());
        }
        Some(airlock_runtime::proxy_process::EGRESS_ROLE) => {
            roles::init_logging();
            return code(airlock_runtime::proxy_process::main());
        }
        // The process that connects to a published port inside the sandbox.
        Some(airlock_runtime::ports::CONNECTOR_ROLE) => {
            roles::init_logging();
            return code(airlock_runtime::ports::connector_main());
        }
        _ => {}
    }
    roles::init_logging();
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
