//! The exec trace of a microVM guest: the guest's agent (its PID 1, root in
//! the guest's own kernel) installs the exec trace's filter on itself
//! before it starts anything, so that every process in the guest inherits
//! it, and a thread of its own answers each call: it reads what the caller
//! claims (the jail crate's bounded reading), lets the call go on, and
//! hands the record to a second thread that sends it to the host
//! ([`AgentMessage::ExecTrace`]). The same thread records how each process
//! whose exec it recorded ended, and how long after that exec, from the
//! kernel's process events. The calls never wait for the host: past a
//! small queue, records are counted as lost in the next summary, and a
//! flood is itemized up to the process tier's rate and summarized beyond
//! (only an itemized exec's process has its end recorded, as there).
//!
//! The host records these as the guest's claims (`reported_by: guest`):
//! the guest's kernel is not trusted. If this thread ends, nobody answers
//! the filter (the guest's execs fail from then on) and the host is told
//! why ([`TraceRecord::Ended`]).
//!
//! Why process events and not a pidfd per process, as the process tier's
//! listener: the guest runs the host's distribution kernel (Debian's 6.1
//! today), and before Linux 6.15 a pidfd keeps no exit status: a parent
//! that reaps its child first (every shell does, at once) would leave the
//! status unknown. The kernel sends a process's exit event from `do_exit`,
//! with the status, before any parent can reap it; PID 1 (root in the
//! guest's initial namespaces) may listen. What it cannot say is which
//! events it dropped in a burst: then every awaited process is looked up
//! in /proc instead.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime};

use airlock_jail::exec_claim::{self, ProcessMemory};
use airlock_jail::exec_ends::{Awaited, EndStatus, Tracked, exit_record};
use airlock_jail::exec_rate::{ITEMIZED_PER_SECOND, Rate};
use airlock_jail::proc_events::ProcEvents;
use airlock_jail::sys;
use airlock_proto::AgentMessage;
use airlock_proto::exec_record::{Claimed, ProcessExec, TraceRecord};
use airlock_proto::time::rfc3339_utc;

use crate::service::{Writer, send_frames};

/// Records waiting for the host; past them, records are lost (counted).
const QUEUE: usize = 1024;
/// Records sent in one write at most (after the first).
const SEND_BATCH: usize = 63;
/// Once every process left was killed (the guest is about to be stopped),
/// how long their ends are waited for.
const LAST_ENDS: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub(crate) enum InstallError {
    #[error("cannot install the exec trace's filter: {0}")]
    Filter(#[from] airlock_jail::seccomp::SeccompError),
    #[error("cannot listen to the kernel's process events (for the ends of processes): {0}")]
    Events(#[source] io::Error),
}

/// What [`install`] sets up, for [`start`].
pub(crate) struct Installed {
    listener: OwnedFd,
    events: ProcEvents,
}

/// Listens to the kernel's process events, then installs the exec trace's
/// filter on every thread of this process (the guest's PID 1). Every
/// process started from here on inherits the filter.
pub(crate) fn install() -> Result<Installed, InstallError> {
    let events = ProcEvents::subscribe().map_err(InstallError::Events)?;
    let filter = airlock_jail::seccomp::exec_notify()?;
    let listener = airlock_jail::seccomp::install_with_listener(&filter)?;
    Ok(Installed { listener, events })
}

/// The running trace, as the agent's request reader holds it.
pub(crate) struct GuestTrace {
    /// A byte here asks the trace to wait for the last ends, then answer
    /// [`AgentMessage::ProcessesEnded`] after their records.
    end_processes: OwnedFd,
}

impl GuestTrace {
    /// Every process left was just killed: the trace records their ends
    /// (within [`LAST_ENDS`]), then answers. False if the trace has ended
    /// (the caller answers itself).
    pub(crate) fn processes_killed(&self) -> bool {
        rustix::io::write(&self.end_processes, &[1]).is_ok()
    }
}

/// What the sending thread sends, in order.
enum Outgoing {
    Record(TraceRecord),
    ProcessesEnded,
}

/// Starts the thread that answers the guest's exec calls and records the
/// ends of their processes, and the one that sends the records to the host.
pub(crate) fn start(installed: Installed, writer: Writer) -> io::Result<GuestTrace> {
    let (tx, rx) = mpsc::sync_channel::<Outgoing>(QUEUE);
    let (asked, ask) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    std::thread::Builder::new().name("exec-trace-send".into()).spawn(move || {
        // What waits goes in one write: each write to the guest's port is
        // a costly exit to QEMU, and the trace shares the guest's CPUs.
        let mut frames = Vec::new();
        while let Ok(first) = rx.recv() {
            frames.clear();
            for outgoing in std::iter::once(first).chain(rx.try_iter().take(SEND_BATCH)) {
                let msg = match outgoing {
                    Outgoing::Record(trace) => AgentMessage::ExecTrace { trace },
                    Outgoing::ProcessesEnded => AgentMessage::ProcessesEnded,
                };
                let _ = airlock_proto::send(&mut frames, &msg);
            }
            send_frames(&writer, &frames);
        }
    })?;
    let notif_words = sys::seccomp_notif_size()?.div_ceil(8);
    let Installed { listener, events } = installed;
    let mut tracer = Tracer {
        listener,
        events,
        asked: Some(asked),
        notif: vec![0u64; notif_words],
        rate: Rate::new(ITEMIZED_PER_SECOND, rfc3339_utc),
        awaited: Awaited::default(),
        last_ends_until: None,
        tx,
    };
    std::thread::Builder::new().name("exec-trace".into()).spawn(move || {
        let detail = match tracer.serve() {
            Ok(()) => "its listener closed".to_owned(),
            Err(e) => e.to_string(),
        };
        // Nobody answers the filter once the listener is closed: the
        // guest's execs fail from then on (closed, not unseen).
        eprintln!("airlock guest agent: the exec trace ended: {detail}");
        let _ = tracer.tx.send(Outgoing::Record(TraceRecord::Ended { detail }));
    })?;
    Ok(GuestTrace { end_processes: ask })
}

/// The start time of a process whose end is awaited (None if it could not
/// be read): with its pid, it tells that process from a later one.
type StartTime = Option<u64>;

struct Tracer {
    listener: OwnedFd,
    events: ProcEvents,
    /// The read end of [`GuestTrace::end_processes`]; None once closed.
    asked: Option<OwnedFd>,
    notif: Vec<u64>,
    rate: Rate,
    awaited: Awaited<StartTime>,
    /// Asked for the last ends: until when they are waited for.
    last_ends_until: Option<Instant>,
    tx: SyncSender<Outgoing>,
}

impl Tracer {
    fn serve(&mut self) -> io::Result<()> {
        use rustix::event::{PollFd, PollFlags};
        let _ = sys::seccomp_notif_sync_wake_up(self.listener.as_fd());
        loop {
            let now = Instant::now();
            if let Some(summary) = self.rate.close_if_over(now, SystemTime::now()) {
                self.queue(TraceRecord::Summary(summary));
            }
            if let Some(until) = self.last_ends_until
                && (self.awaited.is_empty() || now >= until)
            {
                self.last_ends_until = None;
                self.last_ends_recorded();
            }
            // Wakes up to close a window with something to summarize, or
            // to stop waiting for the last ends.
            let deadline = [self.rate.deadline(), self.last_ends_until].into_iter().flatten().min();
            let timeout = deadline.map(|d| {
                let left = d.saturating_duration_since(now) + Duration::from_millis(1);
                rustix::event::Timespec::try_from(left)
                    .unwrap_or(rustix::event::Timespec { tv_sec: 1, tv_nsec: 0 })
            });
            let (listener, ends, asked) = {
                let mut fds = vec![
                    PollFd::new(&self.listener, PollFlags::IN),
                    PollFd::from_borrowed_fd(self.events.fd(), PollFlags::IN),
                ];
                if let Some(asked) = &self.asked {
                    fds.push(PollFd::new(asked, PollFlags::IN));
                }
                match rustix::event::poll(&mut fds, timeout.as_ref()) {
                    Ok(0) => continue,
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
                (fds[0].revents(), fds[1].revents(), fds.get(2).map(|f| f.revents()))
            };
            if !ends.is_empty() {
                self.read_ends()?;
            }
            if let Some(asked) = asked
                && !asked.is_empty()
            {
                self.asked_for_last_ends();
            }
            if listener.contains(PollFlags::IN) {
                self.one_call()?;
            } else if !listener.is_empty() {
                // No process can make a call any more.
                return Ok(());
            }
        }
    }

    fn queue(&mut self, record: TraceRecord) {
        match self.tx.try_send(Outgoing::Record(record)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.rate.lost(),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Receives one exec call, reads it (or counts it), lets it go on.
    fn one_call(&mut self) -> io::Result<()> {
        let Ok(call) = sys::seccomp_notif_recv(self.listener.as_fd(), &mut self.notif) else {
            // The caller died before it could be received.
            return Ok(());
        };
        let now = Instant::now();
        let wall = SystemTime::now();
        let (itemize, closed) = self.rate.admit(now, wall);
        if let Some(summary) = closed {
            self.queue(TraceRecord::Summary(summary));
        }
        let pid = i32::try_from(call.pid).unwrap_or(0);
        let execveat = i64::from(call.nr) == libc::SYS_execveat;
        // execve(path, argv, …); execveat(dirfd, path, argv, envp, flags).
        let (path_at, argv_at) =
            if execveat { (call.args[1], call.args[2]) } else { (call.args[0], call.args[1]) };
        let memory = ProcessMemory(pid);
        let listener = self.listener.as_fd();
        if !itemize {
            let mut budget = 4096;
            let program = exec_claim::read_string(&memory, path_at, 256, &mut budget).map(|(b, _, _)| b);
            if sys::seccomp_notif_id_valid(listener, call.id).is_ok()
                && sys::seccomp_notif_continue(listener, call.id).is_ok()
            {
                self.rate.count(Claimed(program.unwrap_or_default()));
            }
            return Ok(());
        }
        let status =
            fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|t| exec_claim::parse_status(&t));
        let ppid = status.as_ref().map_or(0, |s| s.ppid);
        let tgid = status.as_ref().map_or(pid, |s| s.tgid);
        let cwd = read_link(&format!("/proc/{pid}/cwd"));
        let claim = exec_claim::read_claim(&memory, path_at, argv_at);
        let path = claim.program.as_ref().map(|named| {
            exec_claim::program_path(execveat, &call.args, named, cwd.as_deref(), |fd| {
                read_link(&format!("/proc/{pid}/fd/{fd}"))
            })
        });
        // Seen from the caller's root: a name that is not there (a shell's
        // PATH search) is refused by the kernel, no program runs.
        let no_such_file = path.as_ref().is_some_and(|p| {
            let mut at = format!("/proc/{pid}/root").into_bytes();
            at.extend_from_slice(p.as_bytes());
            matches!(
                fs::symlink_metadata(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&at)),
                Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
            )
        });
        // Only for a process not awaited yet (a process that execs again
        // keeps its first).
        let started = if self.awaited.wants(tgid) { start_time(tgid) } else { None };
        // Read while the call was pending, or it is not the caller's.
        if sys::seccomp_notif_id_valid(listener, call.id).is_err()
            || sys::seccomp_notif_continue(listener, call.id).is_err()
        {
            return Ok(());
        }
        if !self.awaited.wants(tgid) {
            // A pid awaited already is this process's second exec, or a
            // new process whose pid an unread end freed: that end was sent
            // before this call was made, so reading the ends tells which.
            self.read_ends()?;
        }
        self.awaited.track(tgid, Tracked { watch: started, inner: tgid, first_exec: now });
        let exec = ProcessExec {
            at: rfc3339_utc(wall),
            pid: tgid,
            ppid,
            syscall: if execveat { "execveat" } else { "execve" }.into(),
            path,
            argv: claim.argv,
            argc: claim.argc,
            cwd: cwd.map(Claimed),
            unreadable: claim.unreadable,
            no_such_file,
            reported_by: None,
        };
        self.queue(TraceRecord::Exec(exec));
        Ok(())
    }

    /// Records the ends the kernel reported of awaited processes.
    fn read_ends(&mut self) -> io::Result<()> {
        let mut ended = Vec::new();
        // A thread's end is its process's when it leads the thread group.
        // (A process whose leading thread ends before its other threads is
        // reported ended then.)
        let dropped = self.events.drain(|exit| {
            if exit.pid == exit.tgid {
                ended.push(exit);
            }
        })?;
        let (now, wall) = (Instant::now(), SystemTime::now());
        for exit in ended {
            if let Some(tracked) = self.awaited.ended(exit.tgid) {
                let record = exit_record(&tracked, now, rfc3339_utc(wall), EndStatus::Known(exit.status));
                self.queue(TraceRecord::Exit(record));
            }
        }
        if dropped {
            self.look_up_awaited(now, wall);
        }
        Ok(())
    }

    /// The kernel dropped events (a burst): every awaited process that is
    /// gone, or a zombie, has ended; a zombie still has its status.
    fn look_up_awaited(&mut self, now: Instant, wall: SystemTime) {
        let gone: Vec<(i32, EndStatus)> = self
            .awaited
            .iter()
            .filter_map(|(pid, tracked)| {
                let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok();
                let state = stat.as_deref().and_then(exec_claim::stat_start_and_end);
                let same = |start: u64| tracked.watch.is_none_or(|s| s == start);
                match state {
                    Some((start, false)) if same(start) => None,
                    Some((start, true)) if same(start) => Some((
                        pid,
                        match stat.as_deref().and_then(exec_claim::stat_exit_code) {
                            Some(status) => EndStatus::Known(status),
                            None => EndStatus::Unknown(DROPPED.into()),
                        },
                    )),
                    _ => Some((pid, EndStatus::Unknown(DROPPED.into()))),
                }
            })
            .collect();
        for (pid, status) in gone {
            if let Some(tracked) = self.awaited.ended(pid) {
                let record = exit_record(&tracked, now, rfc3339_utc(wall), status);
                self.queue(TraceRecord::Exit(record));
            }
        }
    }

    /// The agent killed every process left: their ends are waited for.
    fn asked_for_last_ends(&mut self) {
        let mut byte = [0u8; 16];
        let Some(asked) = &self.asked else { return };
        match rustix::io::read(asked, &mut byte) {
            Ok(0) | Err(_) => self.asked = None,
            Ok(_) => self.last_ends_until = Some(Instant::now() + LAST_ENDS),
        }
    }

    /// The last ends are recorded (or waited for long enough): the window
    /// counted so far is summarized now, then the agent's answer follows
    /// the records.
    fn last_ends_recorded(&mut self) {
        if let Some(summary) =
            self.rate.close_if_over(Instant::now() + Duration::from_secs(3600), SystemTime::now())
        {
            self.queue(TraceRecord::Summary(summary));
        }
        let _ = self.tx.send(Outgoing::ProcessesEnded);
    }
}

/// Why an end has no status: its event was among those dropped.
const DROPPED: &str = "the guest's kernel dropped its exit event in a burst of process events";

fn start_time(pid: i32) -> StartTime {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    exec_claim::stat_start_and_end(&stat).map(|(start, _)| start)
}

fn read_link(path: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;
    fs::read_link(path).ok().map(|p| p.into_os_string().into_vec())
}
