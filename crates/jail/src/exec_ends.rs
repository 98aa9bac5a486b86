//! The ends of traced processes: which processes' ends are awaited (one
//! per process, from its first recorded exec), and the record of an end.
//! Shared by the process tier's listener process, which waits on a pidfd
//! per process, and a microVM guest's agent, which reads the guest
//! kernel's process events ([`crate::proc_events`]): the watch `W` is what
//! each keeps per process.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use airlock_proto::exec_record::ProcessExit;

use crate::exec_claim::decode_wait_status;

/// Processes whose end is awaited at once; execs of more are recorded
/// without their end.
pub const MAX_TRACKED: usize = 4096;

/// A process whose exec was recorded, until its end is.
pub struct Tracked<W> {
    pub watch: W,
    /// Its pid as the sandbox (or guest) sees it.
    pub inner: i32,
    pub first_exec: Instant,
}

/// Awaited ends, by the process's pid in the reader's view.
pub struct Awaited<W> {
    by_pid: HashMap<i32, Tracked<W>>,
}

impl<W> Default for Awaited<W> {
    fn default() -> Self {
        Awaited { by_pid: HashMap::new() }
    }
}

impl<W> Awaited<W> {
    /// Whether an exec of process `pid` starts waiting for its end: not
    /// when it is awaited already (a process that execs again keeps its
    /// first exec's time), nor past [`MAX_TRACKED`].
    pub fn wants(&self, pid: i32) -> bool {
        !self.by_pid.contains_key(&pid) && self.by_pid.len() < MAX_TRACKED
    }

    pub fn track(&mut self, pid: i32, tracked: Tracked<W>) {
        if self.wants(pid) {
            self.by_pid.insert(pid, tracked);
        }
    }

    /// Process `pid` ended: no longer awaited.
    pub fn ended(&mut self, pid: i32) -> Option<Tracked<W>> {
        self.by_pid.remove(&pid)
    }

    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_pid.len()
    }

    /// The awaited processes' pids and watches.
    pub fn iter(&self) -> impl Iterator<Item = (i32, &Tracked<W>)> {
        self.by_pid.iter().map(|(pid, tracked)| (*pid, tracked))
    }
}

/// How a traced process ended, as far as it is known.
pub enum EndStatus {
    /// Its wait status.
    Known(i32),
    /// Why it is not known.
    Unknown(String),
}

/// The record of the end of `tracked`, seen at `seen` (`at`: the same
/// moment on the wall clock, as the audit log writes it).
pub fn exit_record<W>(tracked: &Tracked<W>, seen: Instant, at: String, status: EndStatus) -> ProcessExit {
    let ((code, signal), unknown) = match status {
        EndStatus::Known(status) => (decode_wait_status(status), None),
        EndStatus::Unknown(why) => ((None, None), Some(why)),
    };
    let lived: Duration = seen.saturating_duration_since(tracked.first_exec);
    ProcessExit {
        at,
        pid: tracked.inner,
        code,
        signal,
        duration_ms: u64::try_from(lived.as_millis()).unwrap_or(u64::MAX),
        unknown,
        reported_by: None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_process_is_awaited_once_from_its_first_exec_and_within_the_bound() {
        let start = Instant::now();
        let mut awaited = Awaited::default();
        awaited.track(10, Tracked { watch: (), inner: 3, first_exec: start });
        assert!(!awaited.wants(10), "a second exec keeps the first");
        awaited.track(10, Tracked { watch: (), inner: 3, first_exec: start + Duration::from_secs(5) });
        let tracked = awaited.ended(10).unwrap();
        assert_eq!(tracked.first_exec, start);
        assert!(awaited.ended(10).is_none() && awaited.is_empty());
        for pid in 0..MAX_TRACKED as i32 + 10 {
            awaited.track(pid, Tracked { watch: (), inner: pid, first_exec: start });
        }
        assert_eq!(awaited.len(), MAX_TRACKED);
    }

    #[test]
    fn an_end_is_recorded_with_its_code_or_signal_and_how_long_it_lived() {
        let start = Instant::now();
        let tracked = Tracked { watch: (), inner: 7, first_exec: start };
        let seen = start + Duration::from_millis(1500);
        let exited = exit_record(&tracked, seen, "t".into(), EndStatus::Known(3 << 8));
        assert_eq!((exited.pid, exited.code, exited.signal, exited.duration_ms), (7, Some(3), None, 1500));
        let killed = exit_record(&tracked, seen, "t".into(), EndStatus::Known(libc::SIGKILL));
        assert_eq!((killed.code, killed.signal), (None, Some(libc::SIGKILL)));
        let unknown = exit_record(&tracked, start, "t".into(), EndStatus::Unknown("why".into()));
        assert_eq!((unknown.code, unknown.signal, unknown.unknown.as_deref()), (None, None, Some("why")));
    }
}
