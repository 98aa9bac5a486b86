//! The sandbox's standard streams as the supervisor sees them: piped and
//! copied to both the caller and the sandbox's log files, or, when the caller
//! sits at a terminal, a fresh pseudo-terminal relayed in raw mode.
//!
//! The sandbox never gets the caller's terminal itself: a terminal shared
//! with the host is a way to inject keystrokes into the host shell.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::thread::JoinHandle;

use airlock_egress::redact::Redactor;
use rustix::termios::{self, OptionalActions, Termios};

use crate::caps::{self, SharedLog};

/// The sandbox's side of its streams plus the threads copying them.
pub struct SandboxStdio {
    /// stdin, stdout, stderr for the agent (closed by the supervisor after spawn).
    child: [OwnedFd; 3],
    copiers: Vec<JoinHandle<()>>,
    pub tty: Option<Pty>,
    secrets: Vec<(String, Vec<u8>)>,
    stdout_log: SharedLog,
}

/// A pseudo-terminal relayed to the caller's terminal.
pub struct Pty {
    /// The sandbox's terminal's master end; None when it is in a microVM
    /// guest, whose agent relays it as messages.
    master: Option<OwnedFd>,
    saved: Option<Termios>,
}

impl SandboxStdio {
    /// Whether the caller sits at a terminal (stdin and stdout both are one).
    pub fn caller_has_terminal() -> bool {
        io::stdin().is_terminal() && io::stdout().is_terminal()
    }

    /// Pipes for the agent's stdout and stderr, copied to the caller and the
    /// logs. Without a terminal the caller's stdin is passed as it is; with
    /// one, the agent gets /dev/null and the command gets a pseudo-terminal
    /// later ([`SandboxStdio::attach_terminal`]).
    /// Secret values in `secrets` are redacted from both the caller's copy
    /// and the logs. The logs stop at their cap; the caller gets everything.
    pub fn new(
        stdout_log: SharedLog,
        stderr_log: SharedLog,
        terminal: bool,
        secrets: &[(String, Vec<u8>)],
    ) -> io::Result<SandboxStdio> {
        let stdin = if terminal {
            File::open("/dev/null")?.into()
        } else {
            rustix::io::fcntl_dupfd_cloexec(io::stdin().as_fd(), 3)?
        };
        let (out_read, out_write) = pipe()?;
        let (err_read, err_write) = pipe()?;
        let copiers = vec![
            tee(out_read, Box::new(io::stdout()), stdout_log.clone(), redactor(secrets)),
            tee(err_read, Box::new(io::stderr()), stderr_log, redactor(secrets)),
        ];
        Ok(SandboxStdio {
            child: [stdin, out_write, err_write],
            copiers,
            tty: None,
            secrets: secrets.to_vec(),
            stdout_log,
        })
    }

    /// Relays the sandbox's terminal (its master end, opened inside the
    /// sandbox) to the caller's terminal, in raw mode until the run ends.
    pub fn attach_terminal(&mut self, master: OwnedFd) -> io::Result<()> {
        if let Ok(size) = termios::tcgetwinsize(io::stdin()) {
            let _ = termios::tcsetwinsize(&master, size);
        }
        let log = self.stdout_log.clone();
        let output = File::from(master.try_clone()?);
        let mut input = File::from(master.try_clone()?);
        let saved = enter_raw_mode();
        self.copiers.push(tee(output.into(), Box::new(io::stdout()), log, redactor(&self.secrets)));
        // Not joined: it blocks reading the caller's stdin and ends with the process.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut stdin = io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || input.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        self.tty = Some(Pty { master: Some(master), saved });
        Ok(())
    }

    /// The command's terminal is in a microVM guest: its agent opens it,
    /// its output arrives as the exec's output (written to the stdout end,
    /// so it reaches the caller and the log as a relayed terminal's does),
    /// and its input and size changes go to the agent as messages. Here,
    /// as for a terminal relayed from a process-tier sandbox, the caller's
    /// terminal is put in raw mode until the run ends. Returns its size
    /// (rows, columns), 24x80 where it has none.
    pub fn attach_guest_terminal(&mut self) -> (u16, u16) {
        let size = caller_window_size().unwrap_or((24, 80));
        self.tty = Some(Pty { master: None, saved: enter_raw_mode() });
        size
    }

    pub fn child_fds(&self) -> [BorrowedFd<'_>; 3] {
        [self.child[0].as_fd(), self.child[1].as_fd(), self.child[2].as_fd()]
    }

    /// Closes the supervisor's copies of the sandbox's ends, so that the
    /// copiers see end-of-file when the sandbox is gone.
    pub fn release_child_ends(&mut self) {
        let devnull = |_: &OwnedFd| File::open("/dev/null").map(OwnedFd::from);
        if let (Ok(a), Ok(b), Ok(c)) =
            (devnull(&self.child[0]), devnull(&self.child[1]), devnull(&self.child[2]))
        {
            self.child = [a, b, c];
        }
    }

    /// Waits until all output has been copied.
    pub fn finish(&mut self) {
        for copier in self.copiers.drain(..) {
            let _ = copier.join();
        }
        if let Some(pty) = &mut self.tty {
            pty.restore();
        }
    }
}

impl Pty {
    /// A descriptor of the terminal for copying window size changes to it.
    pub fn resize_handle(&self) -> io::Result<OwnedFd> {
        match &self.master {
            Some(master) => master.try_clone(),
            None => Err(io::Error::other("the terminal is in a microVM guest")),
        }
    }

    fn restore(&mut self) {
        if let Some(saved) = self.saved.take() {
            let _ = termios::tcsetattr(io::stdin(), OptionalActions::Now, &saved);
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        self.restore();
    }
}

fn enter_raw_mode() -> Option<Termios> {
    let saved = termios::tcgetattr(io::stdin()).ok()?;
    let mut raw = saved.clone();
    raw.make_raw();
    termios::tcsetattr(io::stdin(), OptionalActions::Now, &raw).ok()?;
    Some(saved)
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

fn redactor(secrets: &[(String, Vec<u8>)]) -> Option<Redactor> {
    (!secrets.is_empty()).then(|| Redactor::new(secrets))
}

/// Copies everything from `source` to the caller and to the log, with
/// secret values redacted. A caller that stops reading (a closed pipe) does
/// not stop the log, and a full log does not stop the caller's copy.
fn tee(
    source: OwnedFd,
    mut caller: Box<dyn Write + Send>,
    log: SharedLog,
    mut redactor: Option<Redactor>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut source = File::from(source);
        let mut buf = vec![0u8; 64 * 1024];
        let mut caller_open = true;
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EIO is how a pty master reports that the last slave closed.
                Err(_) => break,
            };
            let chunk = match redactor.as_mut() {
                Some(r) => r.feed(&buf[..n]),
                None => buf[..n].to_vec(),
            };
            if caller_open && (caller.write_all(&chunk).is_err() || caller.flush().is_err()) {
                caller_open = false;
            }
            let _ = caps::lock(&log).write(&chunk);
        }
        if let Some(r) = redactor.as_mut() {
            let rest = r.finish();
            if caller_open {
                let _ = caller.write_all(&rest);
                let _ = caller.flush();
            }
            let _ = caps::lock(&log).write(&rest);
        }
    })
}

/// The caller's window size (rows, columns), when stdin is a terminal that
/// knows it (a terminal whose size was never set says 0x0).
pub fn caller_window_size() -> Option<(u16, u16)> {
    termios::tcgetwinsize(io::stdin())
        .ok()
        .map(|w| (w.ws_row, w.ws_col))
        .filter(|&(rows, cols)| rows > 0 && cols > 0)
}

/// Copies the caller's window size to the sandbox's terminal.
pub fn sync_window_size(master: BorrowedFd<'_>) {
    if let Ok(size) = termios::tcgetwinsize(io::stdin()) {
        let _ = termios::tcsetwinsize(master, size);
    }
}
