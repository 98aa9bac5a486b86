//! `airlock-helper`: the processes airlock starts for each sandbox's launch
//! (the agent inside it, the exec trace's listener), in a binary that links
//! only their code. Started by airlock, never by hand;
//! see `role_process::helper_exe` in the runtime crate for why it exists.

#[path = "../roles.rs"]
mod roles;

use std::process::ExitCode;

fn main() -> ExitCode {
    let role = std::env::args().nth(1).unwrap_or_default();
    match roles::run(&role) {
        Some(status) => ExitCode::from(u8::try_from(status).unwrap_or(1)),
        None => {
            eprintln!("airlock-helper: airlock starts this program for its sandboxes; run `airlock` instead");
            ExitCode::from(2)
        }
    }
}
