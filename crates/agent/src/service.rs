//! Service mode: the agent stays up as PID 1 of a long-lived sandbox and runs
//! processes on request (`airlock exec`), streaming their output back over
//! the control channel. Several may run at once; each is its own session.
//!
//! Threads: one reads the supervisor's requests and starts processes, two
//! per process copy its output, and the main thread reaps children (it owns
//! the signal mask) and reports each end once the output has been sent.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_proto::{AgentMessage, ExecRequest, HostMessage, Launch, Stream};

use crate::files::{self, Files};
use crate::signals::{Waiter, reap_any};

/// Largest output chunk per message.
const CHUNK: usize = 64 * 1024;
/// After a process ends, how long its output may still trail in (a
/// background child can hold the pipe open forever).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

pub(crate) type Writer = Arc<Mutex<UnixStream>>;

struct Running {
    id: u32,
    /// The process's stdin pipe, or its terminal's master end.
    stdin: Input,
    /// The terminal's master end, for resizing.
    terminal: Option<OwnedFd>,
    /// Disconnected once every thread copying the process's output has
    /// ended (each holds a sender), so the end can be reported after them.
    output_done: mpsc::Receiver<()>,
}

/// pid → the exec it belongs to.
type Table = Arc<Mutex<HashMap<i32, Running>>>;

/// `trace`: a microVM guest's exec trace, answered and reported from here
/// on (see `guest_trace`).
pub(crate) fn serve(
    control: UnixStream,
    launch: &Launch,
    waiter: Waiter,
    trace: Option<crate::guest_trace::Installed>,
) -> i32 {
    let writer: Writer = match control.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(_) => return crate::AGENT_FAILED,
    };
    let trace = match trace.map(|installed| crate::guest_trace::start(installed, writer.clone())) {
        Some(Ok(trace)) => Some(trace),
        Some(Err(_)) => return crate::AGENT_FAILED,
        None => None,
    };
    let table: Table = Arc::new(Mutex::new(HashMap::new()));
    let files = Files::default();
    send(&writer, AgentMessage::Serving);

    let (closed_tx, closed_rx) = mpsc::channel::<()>();
    {
        let (writer, table, launch) = (writer.clone(), table.clone(), launch.clone());
        let spawned = std::thread::Builder::new().name("requests".into()).spawn(move || {
            read_requests(control, &writer, &table, &files, &launch, trace.as_ref());
            let _ = closed_tx.send(());
        });
        if spawned.is_err() {
            return crate::AGENT_FAILED;
        }
    }
    loop {
        // The supervisor gone: the sandbox ends with us.
        if !matches!(closed_rx.try_recv(), Err(mpsc::TryRecvError::Empty)) {
            return 0;
        }
        let Some(received) = waiter.next_signal(Duration::from_secs(1)) else { continue };
        match received.signal {
            // Only airlock stops a long-lived sandbox: the supervisor ends
            // the agent itself, and a SIGTERM from the host (outside the PID
            // namespace) is honoured too. From inside — `kill -TERM 1` in one
            // exec — it would end every other exec; execs get their signals
            // by request, so every other signal is dropped as well.
            libc::SIGTERM if !received.from_inside => return 0,
            // Reaping holds the table's lock: a spawn in progress holds it
            // too, and must reap its own child if its exec fails.
            libc::SIGCHLD => {
                let Ok(mut table) = table.lock() else { return crate::AGENT_FAILED };
                for (pid, status) in reap_any() {
                    if let Some(running) = table.remove(&pid) {
                        finish(&writer, running, status);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Reports an exec's end once its output has been sent (bounded wait).
///
/// The threads count against the sandbox's pids limit, which a process
/// inside can exhaust: where one cannot start, the end is reported at once
/// (trailing output may then come after it) rather than taking the agent
/// down with a panic.
fn finish(writer: &Writer, running: Running, status: crate::signals::ExitStatus) {
    let Running { id, stdin, output_done, .. } = running;
    let ended = AgentMessage::ExecEnded { id, code: status.code, signal: status.signal };
    let (report_tx, report_rx) = mpsc::channel::<(AgentMessage, Input)>();
    let reporter = {
        let writer = writer.clone();
        std::thread::Builder::new().name("exec-end".into()).spawn(move || {
            let Ok((ended, stdin)) = report_rx.recv() else { return };
            // Nothing is ever sent: this returns when the last pump has
            // dropped its sender, or after the grace.
            let _ = output_done.recv_timeout(OUTPUT_GRACE);
            drop(stdin);
            send(&writer, ended);
        })
    };
    match reporter {
        Ok(_) => {
            let _ = report_tx.send((ended, stdin));
        }
        Err(_) => {
            drop(stdin);
            send(writer, ended);
        }
    }
}

/// An exec's input. Bytes are written by a thread of their own, started on
/// the first chunk, so a process that does not read its stdin holds up only
/// that thread: never the requests of other execs, file operations or stops.
/// The host sends at most `STDIN_WINDOW` chunks ahead of the
/// acknowledgements, which bounds what waits here.
enum Input {
    /// Not fed yet: no thread.
    Unfed(Box<dyn Write + Send>),
    /// Chunks go to the writing thread.
    Feeding(mpsc::SyncSender<Vec<u8>>),
    /// Closed (by the host, or the process no longer takes input).
    Closed,
}

impl Input {
    /// Passes one chunk on; an empty one closes the input once everything
    /// before it is written.
    fn feed(&mut self, writer: &Writer, id: u32, data: Vec<u8>) {
        if data.is_empty() {
            *self = Input::Closed;
            return;
        }
        if let Input::Unfed(_) = self {
            let Input::Unfed(pipe) = std::mem::replace(self, Input::Closed) else { return };
            match start_input_writer(writer.clone(), id, pipe) {
                Ok(feed) => *self = Input::Feeding(feed),
                Err(e) => {
                    let data = format!(
                        "airlock: cannot pass input to this process ({e}: the sandbox's pids limit?); its stdin is closed\n"
                    )
                    .into_bytes();
                    send(writer, AgentMessage::ExecOutput { id, stream: Stream::Stderr, data });
                }
            }
        }
        let refused = match self {
            Input::Feeding(feed) => match feed.try_send(data) {
                Ok(()) => false,
                // More than the window: the host broke the protocol.
                Err(mpsc::TrySendError::Full(_)) => true,
                Err(mpsc::TrySendError::Disconnected(_)) => true,
            },
            Input::Unfed(_) | Input::Closed => true,
        };
        if refused {
            // Dropped, and acknowledged, so the host's window never stalls
            // on an input that is gone.
            if matches!(self, Input::Feeding(_)) {
                *self = Input::Closed;
            }
            send(writer, AgentMessage::StdinAck { id });
        }
    }
}

/// The thread that writes an exec's input, acknowledging each chunk once it
/// is written (or dropped: a process that closed its stdin takes no more).
fn start_input_writer(
    writer: Writer,
    id: u32,
    pipe: Box<dyn Write + Send>,
) -> io::Result<mpsc::SyncSender<Vec<u8>>> {
    let window = airlock_proto::window::STDIN_WINDOW as usize;
    let (feed, chunks) = mpsc::sync_channel::<Vec<u8>>(window);
    std::thread::Builder::new().name("exec-stdin".into()).spawn(move || {
        let mut pipe = Some(pipe);
        for chunk in chunks {
            if let Some(p) = pipe.as_mut()
                && p.write_all(&chunk).is_err()
            {
                pipe = None;
            }
            send(&writer, AgentMessage::StdinAck { id });
        }
    })?;
    Ok(feed)
}

fn read_requests(
    mut control: UnixStream,
    writer: &Writer,
    table: &Table,
    files: &Files,
    launch: &Launch,
    trace: Option<&crate::guest_trace::GuestTrace>,
) {
    while let Ok(Some(msg)) = airlock_proto::recv::<_, HostMessage>(&mut control) {
        match msg {
            HostMessage::Exec(req) => start(writer, table, launch, &req),
            HostMessage::File { id, op } => files::start(writer, files, id, op),
            HostMessage::FileAck { id } => files.ack(id),
            HostMessage::FileData { id, data } => files.data(id, data),
            HostMessage::FileCancel { id } => files.cancel(id),
            HostMessage::Stdin { id, data } => {
                if let Ok(mut t) = table.lock()
                    && let Some(running) = t.values_mut().find(|r| r.id == id)
                {
                    running.stdin.feed(writer, id, data);
                }
            }
            HostMessage::Signal { id, signal } => {
                let pid = table.lock().ok().and_then(|t| t.iter().find(|(_, r)| r.id == id).map(|(p, _)| *p));
                if let Some(pid) = pid {
                    crate::signals::signal_group(pid, signal);
                }
            }
            HostMessage::Resize { id, rows, cols } => {
                if let Ok(t) = table.lock()
                    && let Some(master) = t.values().find(|r| r.id == id).and_then(|r| r.terminal.as_ref())
                {
                    let size =
                        rustix::termios::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
                    let _ = rustix::termios::tcsetwinsize(master, size);
                }
            }
            HostMessage::EndProcesses => {
                // PID 1's kill(-1) reaches every process but itself; the
                // kernel's threads ignore it.
                let _ = airlock_jail::sys::send_signal(-1, libc::SIGKILL);
                // With a trace, its answer comes after the records of
                // these ends.
                if !trace.is_some_and(|t| t.processes_killed()) {
                    send(writer, AgentMessage::ProcessesEnded);
                }
            }
            HostMessage::Launch(_) | HostMessage::Proceed => {}
        }
    }
}

fn start(writer: &Writer, table: &Table, launch: &Launch, req: &ExecRequest) {
    let Some((program, args)) = req.argv.split_first() else {
        send(
            writer,
            AgentMessage::ExecRefused { id: req.id, exit_code: 127, message: "empty command".into() },
        );
        return;
    };
    let cwd = req.cwd.clone().filter(|p| p.is_dir()).unwrap_or_else(|| launch.cwd.clone());
    let user = match req.user.as_deref().map(crate::users::resolve).transpose() {
        Ok(user) => user,
        Err(message) => {
            send(writer, AgentMessage::ExecRefused { id: req.id, exit_code: 126, message });
            return;
        }
    };
    let mut cmd = crate::program::command(program, &[&launch.env, &req.env], &cwd, user.as_ref());
    cmd.args(args).env_clear().envs(launch.env.iter().cloned());
    if let Some(user) = &user {
        user.apply(&mut cmd);
    }
    cmd.envs(req.env.iter().cloned()).current_dir(&cwd);
    let terminal = match req.tty {
        Some((rows, cols)) => match open_terminal(rows, cols) {
            Ok(pair) => Some(pair),
            Err(e) => {
                let message = format!("cannot open a terminal: {e}");
                send(writer, AgentMessage::ExecRefused { id: req.id, exit_code: 126, message });
                return;
            }
        },
        None => None,
    };
    match &terminal {
        Some((_, slave)) => {
            let (Ok(a), Ok(b), Ok(c)) = (slave.try_clone(), slave.try_clone(), slave.try_clone()) else {
                let message = "cannot share the terminal".to_string();
                send(writer, AgentMessage::ExecRefused { id: req.id, exit_code: 126, message });
                return;
            };
            cmd.stdin(Stdio::from(a)).stdout(Stdio::from(b)).stderr(Stdio::from(c));
        }
        None => {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        }
    }
    crate::in_own_session(&mut cmd, terminal.is_some());
    // Spawn and register under the lock, so the reaper cannot miss the pid.
    let Ok(mut t) = table.lock() else { return };
    let mut child = match crate::oom::spawn_ahead_of_agent(&mut cmd) {
        Ok(child) => child,
        Err(e) => {
            let exit_code = if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 };
            let message = match &user {
                // The kernel refuses ids outside the user namespace's map.
                Some(u) if e.raw_os_error() == Some(libc::EINVAL) => format!(
                    "cannot run as uid {} gid {}: not mapped in this sandbox's user namespace (a rootless \
                     sandbox has only root; others map ids 0-65535)",
                    u.uid, u.gid
                ),
                _ => format!("{program}: {e}"),
            };
            send(writer, AgentMessage::ExecRefused { id: req.id, exit_code, message });
            return;
        }
    };
    drop(cmd);
    let pid = child.id() as i32;
    send(writer, AgentMessage::ExecStarted { id: req.id, pid });
    let (output_tx, output_done) = mpsc::channel::<()>();
    let mut relayed = Ok(());
    let (stdin, master): (Option<Box<dyn Write + Send>>, Option<OwnedFd>) = match terminal {
        Some((master, slave)) => {
            drop(slave);
            let (Ok(reader), Ok(input)) = (master.try_clone(), master.try_clone()) else { return };
            relayed = pump(writer.clone(), req.id, Stream::Stdout, std::fs::File::from(reader), output_tx);
            (Some(Box::new(std::fs::File::from(input))), Some(master))
        }
        None => {
            if let Some(out) = child.stdout.take() {
                relayed = pump(writer.clone(), req.id, Stream::Stdout, out, output_tx.clone());
            }
            if let Some(err) = child.stderr.take()
                && relayed.is_ok()
            {
                relayed = pump(writer.clone(), req.id, Stream::Stderr, err, output_tx);
            }
            (child.stdin.take().map(|s| Box::new(s) as Box<dyn Write + Send>), None)
        }
    };
    if let Err(e) = relayed {
        // No thread to carry its output (the sandbox's pids limit is
        // reached): the process would run unseen, so it is ended and its
        // end reported by the reaper as for any other.
        let data = format!("airlock: cannot relay this process's output ({e}); it was killed\n").into_bytes();
        send(writer, AgentMessage::ExecOutput { id: req.id, stream: Stream::Stderr, data });
        crate::signals::signal_group(pid, libc::SIGKILL);
    }
    let stdin = stdin.map_or(Input::Closed, Input::Unfed);
    t.insert(pid, Running { id: req.id, stdin, terminal: master, output_done });
}

/// A terminal pair from the sandbox's own devpts, of the given size.
pub(crate) fn open_terminal(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let size = rustix::termios::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    rustix::termios::tcsetwinsize(&master, size)?;
    Ok((master, slave))
}

fn pump(
    writer: Writer,
    id: u32,
    stream: Stream,
    mut source: impl Read + Send + 'static,
    done: mpsc::Sender<()>,
) -> io::Result<()> {
    let copy = move || {
        // Dropped when the copy ends: the reporter waits for that.
        let _done = done;
        let mut buf = vec![0u8; CHUNK];
        loop {
            match source.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => send(&writer, AgentMessage::ExecOutput { id, stream, data: buf[..n].to_vec() }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    };
    std::thread::Builder::new().name("exec-pump".into()).spawn(copy).map(drop)
}

pub(crate) fn send(writer: &Writer, msg: AgentMessage) {
    if let Ok(mut w) = writer.lock() {
        let _ = airlock_proto::send(&mut *w, &msg);
    }
}

/// Whole frames (`airlock_proto::send`'s), written at once.
pub(crate) fn send_frames(writer: &Writer, frames: &[u8]) {
    if let Ok(mut w) = writer.lock() {
        let _ = w.write_all(frames);
    }
}
