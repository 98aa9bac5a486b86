//! The listener process (`airlock __exectrace NAME`): receives every exec
//! call of one sandbox from its seccomp filter, reads what the calling
//! process claims, checks that the call is still pending, lets the kernel
//! carry it out, and reports an event to its supervisor; then reports how
//! each such process ended.
//!
//! One thread, one event loop (epoll) over the listener, the pidfds of the
//! processes it waits for and its report pipe. It never blocks on its
//! supervisor: events wait in a bounded queue while the pipe is full, and
//! past that bound are counted as lost (in the next summary). A sandbox
//! waits on its own exec for the reading of it alone.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use airlock_jail::service::{ServiceJailError, TracerJail};
use airlock_jail::sys;
use rustix::event::epoll;

use super::{CONTROL_FD, REPORT_FD, TraceReport, TraceSetup};
use airlock_jail::exec_claim::{self as claim, ProcessMemory};
use airlock_jail::exec_ends::{Awaited, EndStatus, Tracked, exit_record};
use airlock_jail::exec_rate::{ITEMIZED_PER_SECOND, Rate};
use airlock_proto::exec_record::{Claimed, ProcessExec};

/// The existing directory the listener's empty root is mounted over.
const ROOT_MOUNTPOINT: &str = "/tmp";
/// Bytes of events that may wait for the report pipe; past it, lost.
const MAX_QUEUED: usize = 4 << 20;
/// How long the listener waits for the last ends once the sandbox's
/// processes are all gone.
const LAST_ENDS: Duration = Duration::from_secs(2);
/// How long an end whose status cannot be read yet is retried: a process
/// being reaped leaves /proc a moment before its pidfd has its status.
const STATUS_WAIT: Duration = Duration::from_millis(50);
const STATUS_RETRY: Duration = Duration::from_millis(2);
/// Longest /proc file read (status is about 1.5 KiB, stat 400 bytes).
const PROC_FILE: usize = 8192;

const LISTENER: u64 = 0;
const REPORTS: u64 = 1;
/// Tokens of pidfds: this plus the process's pid (in the listener's view).
const PROCESS: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
enum TracerError {
    #[error("reading its setup: {0}")]
    Setup(#[from] airlock_proto::ProtoError),
    #[error("cannot build its seccomp filter: {0}")]
    Seccomp(#[from] airlock_jail::seccomp::SeccompError),
    #[error("cannot confine itself: {0}")]
    Jail(#[from] ServiceJailError),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn os(what: &'static str) -> impl FnOnce(io::Error) -> TracerError {
    move |source| TracerError::Os { what, source }
}

fn errno(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> TracerError {
    move |e| TracerError::Os { what, source: e.into() }
}

/// The role's entry point.
pub fn main() -> i32 {
    let parent = rustix::process::getppid();
    // SAFETY: the supervisor placed these two descriptors for this role
    // alone (see `super::prepare`); nothing else in this process owns them.
    let (control, reports) =
        unsafe { (UnixStream::from_raw_fd(CONTROL_FD), OwnedFd::from_raw_fd(REPORT_FD)) };
    let mut reports = Reports { pipe: File::from(reports), queue: VecDeque::new(), queued: 0, offset: 0 };
    match serve(parent, control, &mut reports) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("exec trace: {e}");
            reports.push_blocking(&TraceReport::Failed { message: e.to_string() });
            1
        }
    }
}

fn serve(
    parent: Option<rustix::process::Pid>,
    mut control: UnixStream,
    reports: &mut Reports,
) -> Result<(), TracerError> {
    let setup: TraceSetup = airlock_proto::recv(&mut control)?
        .ok_or_else(|| os("reading its setup")(io::ErrorKind::UnexpectedEof.into()))?;
    // Everything it reaches later it opens now: the host's /proc (its view
    // will hold nothing), the event loop, its buffer sizes.
    let proc = rustix::fs::open(
        "/proc",
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(errno("opening /proc"))?;
    let notif_words =
        sys::seccomp_notif_size().map_err(os("asking the kernel's notification size"))?.div_ceil(8);
    let poll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(errno("creating its event loop"))?;
    let flags = rustix::fs::fcntl_getfl(&reports.pipe).map_err(errno("reading the report pipe's flags"))?;
    rustix::fs::fcntl_setfl(&reports.pipe, flags | rustix::fs::OFlags::NONBLOCK)
        .map_err(errno("making the report pipe non-blocking"))?;
    // More room in the pipe: fewer wake-ups of a busy supervisor (best effort).
    let _ = rustix::pipe::fcntl_setpipe_size(&reports.pipe, 1 << 20);
    let filter = airlock_jail::seccomp::exec_trace()?.compile()?;
    let parent = parent.ok_or(ServiceJailError::ParentGone(0))?;
    // As root, the network and IPC namespaces are made now, while the
    // supervisor makes the sandbox; rootless, once in the sandbox's.
    let detached = match setup.run_as {
        Some(_) => Some(airlock_jail::service::detach_network_and_ipc()?),
        None => None,
    };
    // The sandbox's user namespace, once its agent exists; none (the
    // supervisor gave up on the launch) ends the listener.
    let userns = match airlock_proto::recv_tagged_fd(&control) {
        Ok((airlock_proto::SANDBOX_USERNS_TAG, fd)) => fd,
        Ok(_) => return Err(os("receiving the sandbox's user namespace")(io::ErrorKind::InvalidData.into())),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => return Err(os("receiving the sandbox's user namespace")(e)),
    };
    airlock_jail::service::confine_tracer(&TracerJail {
        user_ns: userns.as_fd(),
        ids: setup.run_as,
        mountpoint: Path::new(ROOT_MOUNTPOINT),
        parent,
        filter: &filter,
        detached,
    })?;
    drop(userns);
    reports.push_blocking(&TraceReport::Ready);

    // The listener arrives once the agent has confined the sandbox; none
    // (the supervisor gave up on the launch) ends the listener.
    let listener = match airlock_proto::recv_tagged_fd(&control) {
        Ok((airlock_proto::EXEC_LISTENER_TAG, fd)) => fd,
        Ok(_) => return Err(os("receiving the listener")(io::ErrorKind::InvalidData.into())),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => return Err(os("receiving the listener")(e)),
    };
    drop(control);
    // The caller sleeps while it is read: wake this process on the CPU it
    // leaves (Linux ≥ 6.6; older kernels refuse, and it works as before).
    let _ = sys::seccomp_notif_sync_wake_up(listener.as_fd());
    let mut tracer = Tracer {
        proc,
        listener,
        poll,
        notif: vec![0u64; notif_words],
        rate: Rate::new(ITEMIZED_PER_SECOND, crate::audit::rfc3339_utc),
        tracked: Awaited::default(),
        unsettled: Vec::new(),
        writing: false,
    };
    epoll::add(&tracer.poll, &tracer.listener, epoll::EventData::new_u64(LISTENER), epoll::EventFlags::IN)
        .map_err(errno("watching the listener"))?;
    tracer.run(reports)
}

/// A process that ended, until its status is known (or given up on).
struct Ending {
    tgid: i32,
    /// Its pidfd is the watch.
    tracked: Tracked<OwnedFd>,
    /// When its end was seen.
    seen: Instant,
    wall: SystemTime,
}

struct Tracer {
    proc: OwnedFd,
    listener: OwnedFd,
    poll: OwnedFd,
    notif: Vec<u64>,
    rate: Rate,
    /// By pid in the listener's view, each with its pidfd.
    tracked: Awaited<OwnedFd>,
    /// Ended, status not readable yet.
    unsettled: Vec<Ending>,
    /// The report pipe is in the event loop (events wait for room).
    writing: bool,
}

impl Tracer {
    fn run(&mut self, reports: &mut Reports) -> Result<(), TracerError> {
        let mut sandbox_gone: Option<Instant> = None;
        let mut events = Vec::with_capacity(64);
        loop {
            let now = Instant::now();
            if let Some(summary) = self.rate.close_if_over(now, SystemTime::now()) {
                reports.push(&TraceReport::Summary(summary), &mut self.rate);
            }
            for end in std::mem::take(&mut self.unsettled) {
                self.settle(end, reports);
            }
            if let Some(since) = sandbox_gone
                && ((self.tracked.is_empty() && self.unsettled.is_empty())
                    || now.duration_since(since) > LAST_ENDS)
            {
                break;
            }
            self.want_room(reports)?;
            let retry = (!self.unsettled.is_empty()).then(|| now + STATUS_RETRY);
            let deadline = [self.rate.deadline(), sandbox_gone.map(|t| t + LAST_ENDS), retry]
                .into_iter()
                .flatten()
                .min();
            let timeout = deadline.map(|d| {
                let left = d.saturating_duration_since(now) + Duration::from_millis(1);
                rustix::event::Timespec::try_from(left)
                    .unwrap_or(rustix::event::Timespec { tv_sec: 1, tv_nsec: 0 })
            });
            events.clear();
            match epoll::wait(&self.poll, spare(&mut events), timeout.as_ref()) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(errno("waiting for events")(e)),
            }
            for event in &events {
                let token = event.data.u64();
                let flags = event.flags;
                match token {
                    LISTENER if flags.contains(epoll::EventFlags::IN) => self.one_call(reports),
                    LISTENER => {
                        // Every process of the sandbox is gone: no call will
                        // come; the last ends are collected, then it stops.
                        if sandbox_gone.is_none() {
                            sandbox_gone = Some(Instant::now());
                            let _ = epoll::delete(&self.poll, &self.listener);
                        }
                    }
                    REPORTS => reports.flush(),
                    pid => self.ended(i32::try_from(pid - PROCESS).unwrap_or(0), reports),
                }
            }
        }
        // The rest of the events, then the end of the stream.
        if let Some(summary) =
            self.rate.close_if_over(Instant::now() + Duration::from_secs(3600), SystemTime::now())
        {
            reports.push(&TraceReport::Summary(summary), &mut self.rate);
        }
        reports.drain_blocking();
        Ok(())
    }

    /// Puts the report pipe in the event loop while events wait for room.
    fn want_room(&mut self, reports: &Reports) -> Result<(), TracerError> {
        let want = !reports.queue.is_empty();
        if want && !self.writing {
            epoll::add(&self.poll, &reports.pipe, epoll::EventData::new_u64(REPORTS), epoll::EventFlags::OUT)
                .map_err(errno("watching the report pipe"))?;
        } else if !want && self.writing {
            let _ = epoll::delete(&self.poll, &reports.pipe);
        }
        self.writing = want;
        Ok(())
    }

    /// Receives one exec call, reads it (or counts it), lets it go on.
    fn one_call(&mut self, reports: &mut Reports) {
        let call = match sys::seccomp_notif_recv(self.listener.as_fd(), &mut self.notif) {
            Ok(call) => call,
            // The caller died before it could be received.
            Err(_) => return,
        };
        let now = Instant::now();
        let wall = SystemTime::now();
        let (itemize, closed) = self.rate.admit(now, wall);
        if let Some(summary) = closed {
            reports.push(&TraceReport::Summary(summary), &mut self.rate);
        }
        let pid = i32::try_from(call.pid).unwrap_or(0);
        let execveat = i64::from(call.nr) == libc::SYS_execveat;
        // execve(path, argv, …); execveat(dirfd, path, argv, envp, flags).
        let (path_at, argv_at) =
            if execveat { (call.args[1], call.args[2]) } else { (call.args[0], call.args[1]) };
        let memory = ProcessMemory(pid);
        if !itemize {
            let mut budget = 4096;
            let program = claim::read_string(&memory, path_at, 256, &mut budget).map(|(b, _, _)| b);
            // Read, then checked: a pid reused meanwhile is not counted.
            if sys::seccomp_notif_id_valid(self.listener.as_fd(), call.id).is_ok()
                && sys::seccomp_notif_continue(self.listener.as_fd(), call.id).is_ok()
            {
                self.rate.count(Claimed(program.unwrap_or_default()));
            }
            return;
        }
        let status = self.proc_file(pid, "status").and_then(|t| claim::parse_status(&t));
        let ppid = status.as_ref().map_or(0, |s| self.inner_parent(s));
        let cwd = read_link(&self.proc, &format!("{pid}/cwd"));
        let claim = claim::read_claim(&memory, path_at, argv_at);
        let program = claim.program.as_ref().map(|p| {
            claim::program_path(execveat, &call.args, p, cwd.as_deref(), |fd| {
                read_link(&self.proc, &format!("{pid}/fd/{fd}"))
            })
        });
        let no_such_file = program.as_ref().is_some_and(|p| self.names_no_file(pid, p.as_bytes()));
        let (tgid, inner) = status.as_ref().map_or((pid, 0), |s| (s.tgid, s.inner()));
        let pidfd = self.pidfd_for(tgid);
        // What was read belongs to the caller only if its call is still
        // pending: a process killed meanwhile, its pid taken by another,
        // would otherwise be misattributed. Such a call never runs.
        if sys::seccomp_notif_id_valid(self.listener.as_fd(), call.id).is_err() {
            return;
        }
        if sys::seccomp_notif_continue(self.listener.as_fd(), call.id).is_err() {
            return;
        }
        if let Some(pidfd) = pidfd {
            self.track(tgid, pidfd, inner, now);
        }
        let event = ProcessExec {
            at: crate::audit::rfc3339_utc(wall),
            pid: inner,
            ppid,
            syscall: if execveat { "execveat" } else { "execve" }.into(),
            path: program,
            argv: claim.argv,
            argc: claim.argc,
            cwd: cwd.map(Claimed),
            unreadable: claim.unreadable,
            no_such_file,
            reported_by: None,
        };
        reports.push(&TraceReport::Exec(event), &mut self.rate);
    }

    /// Whether `path` (absolute) names nothing in process `pid`'s view.
    fn names_no_file(&self, pid: i32, path: &[u8]) -> bool {
        let flags = rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC;
        let Ok(root) =
            rustix::fs::openat(&self.proc, format!("{pid}/root"), flags, rustix::fs::Mode::empty())
        else {
            return false;
        };
        super::lookup::lookup(root.as_fd(), path) == super::lookup::Lookup::NoSuchFile
    }

    /// The parent's pid inside the sandbox; 0 when it is outside it (its
    /// pid has fewer levels than the process's).
    fn inner_parent(&self, status: &claim::Status) -> i32 {
        let Some(parent) = self.proc_file(status.ppid, "status").and_then(|t| claim::parse_status(&t)) else {
            return 0;
        };
        if parent.nstgid.len() == status.nstgid.len() { parent.inner() } else { 0 }
    }

    /// A pidfd for process `tgid`, unless its end is awaited already (or
    /// too many are). Opened while its exec call waits, so it is that
    /// process's (the call being still valid afterwards says so).
    fn pidfd_for(&self, tgid: i32) -> Option<OwnedFd> {
        if !self.tracked.wants(tgid) {
            return None;
        }
        let pid = rustix::process::Pid::from_raw(tgid)?;
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
    }

    /// Waits for the end of process `tgid` on its pidfd.
    fn track(&mut self, tgid: i32, pidfd: OwnedFd, inner: i32, now: Instant) {
        let token = epoll::EventData::new_u64(PROCESS + tgid as u64);
        if epoll::add(&self.poll, &pidfd, token, epoll::EventFlags::IN).is_ok() {
            self.tracked.track(tgid, Tracked { watch: pidfd, inner, first_exec: now });
        }
    }

    /// Process `tgid` ended: how, as far as can be known.
    fn ended(&mut self, tgid: i32, reports: &mut Reports) {
        let Some(tracked) = self.tracked.ended(tgid) else { return };
        let _ = epoll::delete(&self.poll, &tracked.watch);
        self.settle(Ending { tgid, tracked, seen: Instant::now(), wall: SystemTime::now() }, reports);
    }

    /// Records an end once its status is known, or once it is given up on.
    fn settle(&mut self, end: Ending, reports: &mut Reports) {
        let status = self.exit_status(end.tgid, end.tracked.watch.as_fd());
        if matches!(status, EndStatus::Unknown(_)) && end.seen.elapsed() < STATUS_WAIT {
            self.unsettled.push(end);
            return;
        }
        let event = exit_record(&end.tracked, end.seen, crate::audit::rfc3339_utc(end.wall), status);
        reports.push(&TraceReport::Exit(event), &mut self.rate);
    }

    /// The wait status of a process that ended: from its pidfd once it has
    /// been reaped (Linux ≥ 6.15), else from /proc while it is a zombie.
    fn exit_status(&self, tgid: i32, pidfd: BorrowedFd<'_>) -> EndStatus {
        match sys::pidfd_exit_status(pidfd) {
            Ok(Some(status)) => return EndStatus::Known(status),
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(_) => {}
        }
        // Not reaped yet (or a kernel that keeps no status): a zombie's
        // /proc/PID/stat has it, and the pidfd says whether that pid was
        // still this process once it was read.
        let from_stat = self.proc_file(tgid, "stat").and_then(|t| claim::stat_exit_code(&t));
        if let Some(status) = from_stat
            && sys::pidfd_not_reaped(pidfd)
        {
            return EndStatus::Known(status);
        }
        match sys::pidfd_exit_status(pidfd) {
            Ok(Some(status)) => EndStatus::Known(status),
            _ => EndStatus::Unknown(
                "its parent reaped it before airlock could read its status (Linux before 6.15 keeps no exit \
                 status for a pidfd)"
                    .into(),
            ),
        }
    }

    /// `/proc/PID/FILE`, bounded.
    fn proc_file(&self, pid: i32, file: &str) -> Option<String> {
        let fd = rustix::fs::openat(
            &self.proc,
            format!("{pid}/{file}"),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ok()?;
        let mut buf = vec![0u8; PROC_FILE];
        let mut len = 0;
        while len < buf.len() {
            match rustix::io::read(&fd, &mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return None,
            }
        }
        buf.truncate(len);
        String::from_utf8(buf).ok()
    }
}

/// The target of a /proc link (a directory), bounded to PATH_MAX.
fn read_link(proc: &OwnedFd, path: &str) -> Option<Vec<u8>> {
    let target = rustix::fs::readlinkat(proc, path, Vec::with_capacity(256)).ok()?;
    let mut bytes = target.into_bytes();
    bytes.truncate(libc::PATH_MAX as usize);
    Some(bytes)
}

/// Room for up to 64 events in `events`, as epoll wants it.
fn spare(events: &mut Vec<epoll::Event>) -> rustix::buffer::SpareCapacity<'_, epoll::Event> {
    rustix::buffer::spare_capacity(events)
}

/// Events on their way to the supervisor.
struct Reports {
    pipe: File,
    queue: VecDeque<Vec<u8>>,
    queued: usize,
    /// Bytes of the first frame already written.
    offset: usize,
}

impl Reports {
    /// Queues an event and writes what the pipe takes now; an event that
    /// does not fit the queue is counted as lost.
    fn push(&mut self, report: &TraceReport, rate: &mut Rate) {
        let mut frame = Vec::new();
        if airlock_proto::send(&mut frame, report).is_err() {
            return;
        }
        if self.queued + frame.len() > MAX_QUEUED {
            rate.lost();
            return;
        }
        self.queued += frame.len();
        self.queue.push_back(frame);
        self.flush();
    }

    /// Writes queued frames until the pipe is full.
    fn flush(&mut self) {
        use std::io::Write;
        while let Some(front) = self.queue.front() {
            match (&self.pipe).write(&front[self.offset..]) {
                Ok(n) => {
                    self.offset += n;
                    if self.offset == front.len() {
                        self.queued -= front.len();
                        self.queue.pop_front();
                        self.offset = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Full (or the supervisor is gone: the kernel ends us then).
                Err(_) => return,
            }
        }
    }

    /// Writes everything queued, waiting for room (the sandbox is gone).
    fn drain_blocking(&mut self) {
        use std::io::Write;
        while let Some(front) = self.queue.pop_front() {
            let mut rest = &front[self.offset..];
            self.offset = 0;
            while !rest.is_empty() {
                match (&self.pipe).write(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let _ = rustix::event::poll(
                            &mut [rustix::event::PollFd::new(&self.pipe, rustix::event::PollFlags::OUT)],
                            None,
                        );
                    }
                    Err(_) => return,
                }
            }
        }
        self.queued = 0;
    }

    /// One report, written at once (before the event loop runs).
    fn push_blocking(&mut self, report: &TraceReport) {
        let mut frame = Vec::new();
        if airlock_proto::send(&mut frame, report).is_ok() {
            self.queue.push_back(frame);
            self.drain_blocking();
        }
    }
}
