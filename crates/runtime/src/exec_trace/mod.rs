//! The exec trace of the process tier: every execve and execveat inside a
//! sandbox, by any of its processes, recorded in its audit log with what
//! the process claimed (program, arguments, working directory), its pid
//! and parent inside, and, once it ends, how and after how long.
//!
//! No ptrace. The agent installs a seccomp filter that hands both calls to
//! a listener (SECCOMP_RET_USER_NOTIF) as the last step of its confinement
//! and sends the listener to its supervisor, keeping no copy. The
//! supervisor passes it to a process of its own (`airlock __exectrace
//! NAME`, [`tracer`]): that process, not the supervisor, reads the
//! sandbox's memory, so the bytes a hostile sandbox chose are parsed by a
//! process that can do little (its own uid as root, CAP_SYS_PTRACE in the
//! sandbox's user namespace alone, an empty mount view, no network, its
//! seccomp allowlist `exec_trace.toml`). It answers each call with
//! SECCOMP_USER_NOTIF_FLAG_CONTINUE once it has read it: the sandbox waits
//! for that reading, no longer. Its events reach the supervisor over a
//! pipe, as size-capped frames of a closed enum; the supervisor redacts
//! secret values and records them (`AuditEvent::ProcessExec`, …).
//!
//! The listener process starts before the sandbox's agent ([`prepare`]):
//! its program's start, its own network and IPC namespaces and its filter
//! are made while the supervisor makes the sandbox's cgroup and network,
//! not after (on two cores, about 1 ms off every launch). It confines
//! itself once it has the sandbox's user namespace ([`PreparedTracer::start`]).
//!
//! The descriptors of the listener process:
//! - fd 3, a socket from the supervisor: its setup ([`TraceSetup`]), then
//!   the sandbox's user namespace (`/proc/AGENT/ns/user`, SCM_RIGHTS) once
//!   the agent exists, then the seccomp listener once the agent sent it;
//! - fd 4, the report pipe: ready (or why not), then [`TraceReport`]s.
//!
//! If the listener process dies, nobody answers the filter: the sandbox's
//! exec calls fail (ENOSYS) from then on, which is failing closed, and the
//! supervisor records `exec_trace_ended`.

pub(crate) mod event;
mod lookup;
mod tracer;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::RunError;
use crate::audit::AuditEvent;
pub use airlock_proto::exec_record::{Claimed, ProcessExec, ProcessExecSummary, ProcessExit, ProgramCount};
pub use tracer::main;

/// argv[1] of the listener process's role.
pub const TRACE_ROLE: &str = "__exectrace";

const CONTROL_FD: i32 = 3;
const REPORT_FD: i32 = 4;

/// The listeners' own ids, below the proxies' (999,000,000 + k) and above
/// every ordinary, system and subordinate id: one per sandbox id block.
const TRACER_IDS_START: u32 = 997_000_000;
const SANDBOX_IDS_START: u32 = 1_000_000_000;
const SANDBOX_BLOCK: u32 = 65_536;
/// Block indexes that have a listener id (the registry hands out fewer).
const TRACER_IDS: u32 = 1_000_000;

/// How long the listener may take to confine itself and say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the listener may take to record the last ends and exit once
/// the sandbox is gone, before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What the supervisor tells the listener process before it confines itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TraceSetup {
    /// As root: its uid and gid. None rootless (it stays the caller).
    pub run_as: Option<(u32, u32)>,
}

/// What the listener process tells its supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum TraceReport {
    Ready,
    Failed { message: String },
    Exec(ProcessExec),
    Exit(ProcessExit),
    Summary(ProcessExecSummary),
}

/// The uid (and gid) of the listener of the sandbox whose id block starts
/// at host uid `block_first_uid` (as root).
pub fn tracer_id(block_first_uid: u32) -> Result<u32, RunError> {
    let offset = block_first_uid.checked_sub(SANDBOX_IDS_START);
    match offset {
        Some(offset) if offset % SANDBOX_BLOCK == 0 && offset / SANDBOX_BLOCK < TRACER_IDS => {
            Ok(TRACER_IDS_START + offset / SANDBOX_BLOCK)
        }
        _ => Err(RunError::ExecTrace(format!(
            "host uid {block_first_uid} does not start a sandbox id block, so the exec trace has no id of its own \
             to run as"
        ))),
    }
}

/// What the supervisor hears from its listener process besides readiness.
pub(crate) enum TraceNotice {
    /// An event to redact and record.
    Event(Box<AuditEvent>),
    /// The listener ended while the sandbox could still exec: its execs
    /// fail from now on.
    Ended { status: ExitStatus },
}

/// A running listener process. Dropping it kills the process.
pub(crate) struct ExecTracer {
    pidfd: Option<OwnedFd>,
    /// Where the seccomp listener goes once the agent sent it.
    control: Option<UnixStream>,
    ready: mpsc::Receiver<Result<(), String>>,
    /// Closed when the report reader has reaped the process.
    done: mpsc::Receiver<()>,
    /// Its end is expected (the launch failed, or it was killed at stop).
    ending: Arc<AtomicBool>,
}

/// A listener process started ahead of its sandbox, waiting for the
/// sandbox's user namespace. Dropping it kills and reaps the process.
pub(crate) struct PreparedTracer {
    process: Unstarted,
    control: UnixStream,
    reports: OwnedFd,
}

/// The listener process until its report reader owns it: killed and
/// reaped when dropped (a launch that failed before its agent existed).
struct Unstarted {
    child: Option<std::process::Child>,
    pidfd: Option<OwnedFd>,
}

/// Starts the listener process for sandbox `name`, before its agent: it
/// gets ready to confine itself and waits for [`PreparedTracer::start`].
pub(crate) fn prepare(name: &str, run_as: Option<(u32, u32)>) -> Result<PreparedTracer, RunError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| RunError::ExecTrace(format!("{what}: {e}"));
    let exe = crate::role_process::helper_exe()?;
    let (control, child_control) = UnixStream::pair().map_err(|e| fail("creating its channel", &e))?;
    let (report_read, report_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| fail("creating its report pipe", &e))?;
    let placed = [(child_control.as_fd(), CONTROL_FD), (report_write.as_fd(), REPORT_FD)];
    let started =
        crate::role_process::spawn(&exe, TRACE_ROLE, name, &placed).map_err(|e| fail("starting it", &e))?;
    drop((child_control, report_write));
    let crate::role_process::Started { child, pidfd, .. } = started;
    let process = Unstarted { child: Some(child), pidfd };
    let mut prepared = PreparedTracer { process, control, reports: report_read };
    airlock_proto::send(&mut prepared.control, &TraceSetup { run_as })
        .map_err(|e| fail("sending its setup", &e))?;
    Ok(prepared)
}

impl PreparedTracer {
    /// Gives the listener process the user namespace of the sandbox whose
    /// agent is `agent_pid`, in which it confines itself, and starts
    /// reading its reports. `notice` runs on the report reader's thread.
    pub(crate) fn start(
        self,
        agent_pid: i32,
        notice: impl FnMut(TraceNotice) + Send + 'static,
    ) -> Result<ExecTracer, RunError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| RunError::ExecTrace(format!("{what}: {e}"));
        // The agent is our child and not reaped: its pid is still its own.
        let userns = File::open(format!("/proc/{agent_pid}/ns/user"))
            .map_err(|e| fail("opening the sandbox's user namespace", &e))?;
        airlock_proto::send_tagged_fd(&self.control, airlock_proto::SANDBOX_USERNS_TAG, userns.as_fd())
            .map_err(|e| fail("handing it the sandbox's user namespace", &e))?;
        drop(userns);
        let PreparedTracer { mut process, control, reports } = self;
        let pidfd = process.pidfd.take();
        let mut child = process
            .child
            .take()
            .ok_or_else(|| RunError::ExecTrace("the listener was started already".into()))?;
        let (ready_tx, ready) = mpsc::channel();
        let (done_tx, done) = mpsc::channel::<()>();
        let ending = Arc::new(AtomicBool::new(false));
        let ending_seen = ending.clone();
        let mut notice = notice;
        std::thread::Builder::new()
            .name("exec-trace".into())
            .spawn(move || {
                let mut reports = File::from(reports);
                let mut ready_tx = Some(ready_tx);
                // The listener reads hostile bytes: its reports are size-capped
                // frames of a closed enum, and end the reading otherwise.
                while let Ok(Some(report)) = airlock_proto::recv::<_, TraceReport>(&mut reports) {
                    let event = match report {
                        TraceReport::Ready => {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(Ok(()));
                            }
                            continue;
                        }
                        TraceReport::Failed { message } => {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(Err(message));
                            }
                            continue;
                        }
                        _ if ready_tx.is_some() => continue,
                        // The host's own listener: never marked as another's report.
                        TraceReport::Exec(e) => {
                            AuditEvent::ProcessExec(ProcessExec { reported_by: None, ..e })
                        }
                        TraceReport::Exit(e) => {
                            AuditEvent::ProcessExit(ProcessExit { reported_by: None, ..e })
                        }
                        TraceReport::Summary(s) => {
                            AuditEvent::ProcessExecSummary(ProcessExecSummary { reported_by: None, ..s })
                        }
                    };
                    notice(TraceNotice::Event(Box::new(event)));
                }
                drop(reports);
                let status = child.wait();
                match (ready_tx.take(), status) {
                    (Some(tx), status) => {
                        let how =
                            status.map_or_else(|e| e.to_string(), |s| crate::proxy_process::describe(&s));
                        let _ = tx.send(Err(format!("it ended before it was ready ({how})")));
                    }
                    (None, Ok(status)) if !status.success() && !ending_seen.load(Ordering::SeqCst) => {
                        notice(TraceNotice::Ended { status })
                    }
                    (None, _) => {}
                }
                drop(done_tx);
            })
            .map_err(|e| fail("starting its report reader", &e))?;
        Ok(ExecTracer { pidfd, control: Some(control), ready, done, ending })
    }
}

impl Drop for Unstarted {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else { return };
        match &self.pidfd {
            Some(pidfd) => {
                let _ = rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL);
            }
            None => {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }
}

impl ExecTracer {
    /// Waits until the listener process has confined itself.
    pub(crate) fn wait_ready(&self) -> Result<(), RunError> {
        let answer = match self.ready.recv_timeout(READY_TIMEOUT) {
            Ok(answer) => answer,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.kill();
                Err(format!("it did not get ready within {} s", READY_TIMEOUT.as_secs()))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("it ended".to_string()),
        };
        answer.map_err(|e| RunError::ExecTrace(format!("its listener process did not start: {e}")))
    }

    /// Hands the sandbox's seccomp listener over; the supervisor keeps no
    /// copy, so only the listener process can answer the sandbox's execs.
    pub(crate) fn hand_over(&mut self, listener: OwnedFd) -> Result<(), RunError> {
        let control = self
            .control
            .take()
            .ok_or_else(|| RunError::ExecTrace("the listener was handed over already".into()))?;
        airlock_proto::send_tagged_fd(&control, airlock_proto::EXEC_LISTENER_TAG, listener.as_fd())
            .map_err(|e| RunError::ExecTrace(format!("handing the sandbox's exec listener over: {e}")))
    }

    /// Once the sandbox is gone: the listener records the last ends and
    /// exits; it is killed if it does not within a few seconds. Returns
    /// when its last events are recorded.
    pub(crate) fn stop(mut self) {
        // A listener never handed over (a launch that failed) has nothing to wait for.
        drop(self.control.take());
        if matches!(self.done.recv_timeout(STOP_TIMEOUT), Err(mpsc::RecvTimeoutError::Timeout)) {
            self.ending.store(true, Ordering::SeqCst);
            self.kill();
            let _ = self.done.recv();
        }
        self.pidfd = None;
    }

    /// A launch failed: killed at once, reaped before this returns.
    pub(crate) fn abort(mut self) {
        self.ending.store(true, Ordering::SeqCst);
        self.kill();
        let _ = self.done.recv();
        self.pidfd = None;
    }

    fn kill(&self) {
        if let Some(pidfd) = &self.pidfd {
            let _ = rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for ExecTracer {
    fn drop(&mut self) {
        if self.pidfd.is_some() {
            self.ending.store(true, Ordering::SeqCst);
            self.kill();
        }
    }
}

/// What the supervisor records of a notice (the audit log redacts secret
/// values from it): the listener's events as they are, its end as
/// `exec_trace_ended`.
pub(crate) fn audit_event(notice: TraceNotice) -> AuditEvent {
    match notice {
        TraceNotice::Event(event) => *event,
        TraceNotice::Ended { status } => {
            let how = crate::proxy_process::describe(&status);
            tracing::error!("the exec trace ended ({how}); the sandbox's execs fail from now on");
            AuditEvent::ExecTraceEnded {
                code: status.code(),
                signal: status.signal(),
                detail: format!("{how}; the sandbox's execs fail from now on"),
                reported_by: None,
            }
        }
    }
}

/// How long the host waits for a microVM guest's agent to kill what is
/// left in the guest and report those ends (the guest waits 2 s for them)
/// before QEMU is killed.
pub(crate) const GUEST_LAST_ENDS: Duration = Duration::from_secs(5);

/// What a microVM guest's agent reported of its exec trace, as the audit
/// log records it: marked as the guest's claim, whatever the guest set.
pub(crate) fn guest_event(trace: airlock_proto::exec_record::TraceRecord) -> AuditEvent {
    use airlock_proto::exec_record::{REPORTED_BY_GUEST, TraceRecord};
    let by = Some(REPORTED_BY_GUEST.to_owned());
    match trace {
        TraceRecord::Exec(e) => AuditEvent::ProcessExec(ProcessExec { reported_by: by, ..e }),
        TraceRecord::Exit(e) => AuditEvent::ProcessExit(ProcessExit { reported_by: by, ..e }),
        TraceRecord::Summary(s) => {
            AuditEvent::ProcessExecSummary(ProcessExecSummary { reported_by: by, ..s })
        }
        TraceRecord::Ended { detail } => {
            tracing::error!("the guest's exec trace ended ({detail}); its execs fail from now on");
            AuditEvent::ExecTraceEnded {
                code: None,
                signal: None,
                detail: format!(
                    "the guest's trace thread ended: {detail}; the guest's execs fail from now on"
                ),
                reported_by: by,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn listener_ids_are_one_per_block_and_apart_from_the_proxies() {
        assert_eq!(tracer_id(1_000_000_000).unwrap(), 997_000_000);
        assert_eq!(tracer_id(1_000_000_000 + 14_999 * 65_536).unwrap(), 997_014_999);
        assert!(tracer_id(1_000_000_000 + 14_999 * 65_536).unwrap() < 999_000_000, "below every proxy id");
        for bad in [0, 1000, 999_999_999, 1_000_000_001] {
            assert!(tracer_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_guests_records_are_marked_as_its_own_whatever_it_claims() {
        use airlock_proto::exec_record::{ProcessExit, TraceRecord};
        let exit = ProcessExit {
            at: String::new(),
            pid: 5,
            code: Some(0),
            signal: None,
            duration_ms: 1,
            unknown: None,
            reported_by: Some("host".into()),
        };
        match guest_event(TraceRecord::Exit(exit)) {
            AuditEvent::ProcessExit(e) => assert_eq!(e.reported_by.as_deref(), Some("guest")),
            other => panic!("{other:?}"),
        }
        // Its trace's end is the process tier's `exec_trace_ended`, marked.
        match guest_event(TraceRecord::Ended { detail: "poll failed".into() }) {
            AuditEvent::ExecTraceEnded { code: None, signal: None, detail, reported_by } => {
                assert_eq!(reported_by.as_deref(), Some("guest"));
                assert!(detail.contains("poll failed") && detail.contains("execs fail"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }
}
