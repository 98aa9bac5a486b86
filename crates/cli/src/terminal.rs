//! The caller's terminal and signals during `airlock exec`: raw mode while
//! an interactive session lasts, its size changes sent to the sandbox's
//! terminal, and the signals `airlock` gets passed on to the process.

use std::io;

use rustix::termios::{self, OptionalActions, Termios};
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGWINCH};
use signal_hook::iterator::Signals;

/// (rows, columns) of the caller's terminal, if stdin is one and knows its
/// size (a pty whose size was never set reports 0x0).
pub fn size() -> Option<(u16, u16)> {
    termios::tcgetwinsize(io::stdin())
        .ok()
        .map(|w| (w.ws_row, w.ws_col))
        .filter(|&(rows, cols)| rows > 0 && cols > 0)
}

/// Puts stdin's terminal in raw mode until dropped.
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    pub fn enter() -> RawMode {
        let saved = termios::tcgetattr(io::stdin()).ok();
        if let Some(saved) = &saved {
            let mut raw = saved.clone();
            raw.make_raw();
            let _ = termios::tcsetattr(io::stdin(), OptionalActions::Now, &raw);
        }
        RawMode { saved }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(io::stdin(), OptionalActions::Now, saved);
        }
    }
}

/// Sends the terminal's size to the exec whenever it changes, until dropped.
pub struct Resizer {
    handle: signal_hook::iterator::Handle,
}

/// Calls `resize` with the terminal's size whenever it changes, until
/// dropped or until `resize` answers false (the session is over).
pub fn forward_resizes(mut resize: impl FnMut(u16, u16) -> bool + Send + 'static) -> io::Result<Resizer> {
    let mut signals = Signals::new([SIGWINCH])?;
    let handle = signals.handle();
    std::thread::spawn(move || {
        for _ in signals.forever() {
            if let Some((rows, cols)) = size()
                && !resize(rows, cols)
            {
                return;
            }
        }
    });
    Ok(Resizer { handle })
}

impl Drop for Resizer {
    fn drop(&mut self) {
        self.handle.close();
    }
}

/// Passes SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to `airlock` on with
/// `send`, until dropped or until `send` answers false (the exec is over).
pub fn forward_signals(mut send: impl FnMut(i32) -> bool + Send + 'static) -> io::Result<Forwarder> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT])?;
    let handle = signals.handle();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if !send(signal) {
                return;
            }
        }
    });
    Ok(Forwarder { handle })
}

/// Stops forwarding signals when dropped.
pub struct Forwarder {
    handle: signal_hook::iterator::Handle,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.handle.close();
    }
}
