//! Signals sent to the supervisor go to the sandbox: SIGINT, SIGTERM and the
//! like to the agent (which hands them to the command's process group), and
//! terminal size changes to the sandbox's pseudo-terminal.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::thread::JoinHandle;

use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};
use signal_hook::iterator::{Handle, Signals};

pub struct Forwarder {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    pub fn start(agent_pid: i32, pty: Option<OwnedFd>) -> io::Result<Forwarder> {
        let resize = pty.map(|master| -> Box<dyn Fn() + Send> {
            Box::new(move || crate::stdio::sync_window_size(master.as_fd()))
        });
        Forwarder::start_with(resize, move |sig| {
            if let (Some(pid), Some(sig)) =
                (rustix::process::Pid::from_raw(agent_pid), rustix::process::Signal::from_named_raw(sig))
            {
                let _ = rustix::process::kill_process(pid, sig);
            }
        })
    }

    /// Hands each signal but SIGWINCH to `forward`, and calls `resize` on
    /// SIGWINCH, when the command has a terminal (the microVM tier sends
    /// both to the command through the guest's agent).
    pub fn start_with(
        resize: Option<Box<dyn Fn() + Send>>,
        forward: impl Fn(i32) + Send + 'static,
    ) -> io::Result<Forwarder> {
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH])?;
        let handle = signals.handle();
        let thread = std::thread::spawn(move || {
            for sig in signals.forever() {
                if sig == SIGWINCH {
                    if let Some(resize) = &resize {
                        resize();
                    }
                    continue;
                }
                forward(sig);
            }
        });
        Ok(Forwarder { handle, thread: Some(thread) })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
