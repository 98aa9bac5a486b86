//! The exec trace of a microVM guest: the guest's agent (its PID 1, root in
//! the guest's own kernel) installs the exec trace's filter on itself
//! before it starts anything, so that every process in the guest inherits
//! it, and a thread of its own answers each call: it reads what the caller
//! claims (the jail crate's bounded reading), lets the call go on, and
//! hands the record to a second thread that sends it to the host
//! ([`AgentMessage::ExecTrace`]). The calls never wait for the host: past
//! a small queue, records are counted as lost in the next summary, and a
//! flood is itemized up to the process tier's rate and summarized beyond.
//!
//! The host records these as the guest's claims (`reported_by: guest`):
//! the guest's kernel is not trusted. Ends of processes are not reported
//! yet: the guest's agent reaps its own children, and tracking every
//! traced process's end inside the guest is left for later.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime};

use airlock_jail::exec_claim::{self, ProcessMemory};
use airlock_jail::exec_rate::{ITEMIZED_PER_SECOND, Rate};
use airlock_jail::sys;
use airlock_proto::AgentMessage;
use airlock_proto::exec_record::{Claimed, ProcessExec, TraceRecord};
use airlock_proto::time::rfc3339_utc;

use crate::service::{Writer, send};

/// Records waiting for the host; past them, records are lost (counted).
const QUEUE: usize = 1024;

/// Installs the exec trace's filter on every thread of this process (the
/// guest's PID 1) and returns its listener. Every process started from
/// here on inherits the filter.
pub(crate) fn install() -> Result<OwnedFd, airlock_jail::seccomp::SeccompError> {
    let filter = airlock_jail::seccomp::exec_notify()?;
    airlock_jail::seccomp::install_with_listener(&filter)
}

/// Starts the thread that answers the guest's exec calls and the one that
/// sends their records to the host.
pub(crate) fn start(listener: OwnedFd, writer: Writer) -> io::Result<()> {
    let (tx, rx) = mpsc::sync_channel::<TraceRecord>(QUEUE);
    std::thread::Builder::new().name("exec-trace-send".into()).spawn(move || {
        for trace in rx {
            send(&writer, AgentMessage::ExecTrace { trace });
        }
    })?;
    std::thread::Builder::new().name("exec-trace".into()).spawn(move || {
        if let Err(e) = serve(&listener, &tx) {
            // Nobody answers the filter once the listener is closed: the
            // guest's execs fail from then on (closed, not unseen).
            eprintln!("airlock guest agent: the exec trace ended: {e}");
        }
    })?;
    Ok(())
}

fn serve(listener: &OwnedFd, tx: &SyncSender<TraceRecord>) -> io::Result<()> {
    let words = sys::seccomp_notif_size()?.div_ceil(8);
    let mut notif = vec![0u64; words];
    let mut rate = Rate::new(ITEMIZED_PER_SECOND, rfc3339_utc);
    let _ = sys::seccomp_notif_sync_wake_up(listener.as_fd());
    loop {
        let now = Instant::now();
        if let Some(summary) = rate.close_if_over(now, SystemTime::now()) {
            queue(tx, TraceRecord::Summary(summary), &mut rate);
        }
        // Wakes up to close a window with something to summarize.
        let timeout = rate.deadline().map(|d| {
            let left = d.saturating_duration_since(now) + Duration::from_millis(1);
            rustix::event::Timespec::try_from(left)
                .unwrap_or(rustix::event::Timespec { tv_sec: 1, tv_nsec: 0 })
        });
        let mut fds = [rustix::event::PollFd::new(listener, rustix::event::PollFlags::IN)];
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        if !fds[0].revents().contains(rustix::event::PollFlags::IN) {
            // No process can make a call any more.
            return Ok(());
        }
        one_call(listener, &mut notif, &mut rate, tx);
    }
}

fn queue(tx: &SyncSender<TraceRecord>, record: TraceRecord, rate: &mut Rate) {
    match tx.try_send(record) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => rate.lost(),
        Err(TrySendError::Disconnected(_)) => {}
    }
}

/// Receives one exec call, reads it (or counts it), lets it go on.
fn one_call(listener: &OwnedFd, notif: &mut [u64], rate: &mut Rate, tx: &SyncSender<TraceRecord>) {
    let Ok(call) = sys::seccomp_notif_recv(listener.as_fd(), notif) else {
        // The caller died before it could be received.
        return;
    };
    let wall = SystemTime::now();
    let (itemize, closed) = rate.admit(Instant::now(), wall);
    if let Some(summary) = closed {
        queue(tx, TraceRecord::Summary(summary), rate);
    }
    let pid = i32::try_from(call.pid).unwrap_or(0);
    let execveat = i64::from(call.nr) == libc::SYS_execveat;
    // execve(path, argv, …); execveat(dirfd, path, argv, envp, flags).
    let (path_at, argv_at) =
        if execveat { (call.args[1], call.args[2]) } else { (call.args[0], call.args[1]) };
    let memory = ProcessMemory(pid);
    if !itemize {
        let mut budget = 4096;
        let program = exec_claim::read_string(&memory, path_at, 256, &mut budget).map(|(b, _, _)| b);
        if sys::seccomp_notif_id_valid(listener.as_fd(), call.id).is_ok()
            && sys::seccomp_notif_continue(listener.as_fd(), call.id).is_ok()
        {
            rate.count(Claimed(program.unwrap_or_default()));
        }
        return;
    }
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|t| exec_claim::parse_status(&t));
    let ppid = status.as_ref().map_or(0, |s| s.ppid);
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
    // Read while the call was pending, or it is not the caller's.
    if sys::seccomp_notif_id_valid(listener.as_fd(), call.id).is_err()
        || sys::seccomp_notif_continue(listener.as_fd(), call.id).is_err()
    {
        return;
    }
    let exec = ProcessExec {
        at: rfc3339_utc(wall),
        pid: status.as_ref().map_or(pid, |s| s.tgid),
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
    queue(tx, TraceRecord::Exec(exec), rate);
}

fn read_link(path: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;
    fs::read_link(path).ok().map(|p| p.into_os_string().into_vec())
}
