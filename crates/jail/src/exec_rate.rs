//! How many execs the trace records one by one: at most
//! [`ITEMIZED_PER_SECOND`] in each one-second window, the rest of that
//! window counted by program and recorded as one summary when it closes.
//! A flood then costs the audit log one line a second, and the sandbox
//! the least reading the trace can do per exec (its program's name).
//! Shared by the process tier's listener process and a microVM guest's.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use airlock_proto::exec_record::{Claimed, ProcessExecSummary, ProgramCount};

/// Execs recorded one by one per window.
pub const ITEMIZED_PER_SECOND: u32 = 200;
const WINDOW: Duration = Duration::from_secs(1);
/// Programs counted apart per window; the rest are counted together.
const DISTINCT_PROGRAMS: usize = 64;
/// Programs a summary names.
const NAMED_PROGRAMS: usize = 16;

/// How a summary writes its window's bounds (the audit log's own format,
/// which this crate does not link).
pub type Stamp = fn(SystemTime) -> String;

pub struct Rate {
    limit: u32,
    stamp: Stamp,
    /// The current window: when it opened (monotonic and wall clock).
    opened: Option<(Instant, SystemTime)>,
    itemized: u32,
    counted: u64,
    programs: HashMap<Claimed, u64>,
    other: u64,
    /// Events lost since the last summary (a full queue).
    lost: u64,
}

impl Rate {
    pub fn new(limit: u32, stamp: Stamp) -> Rate {
        Rate {
            limit,
            stamp,
            opened: None,
            itemized: 0,
            counted: 0,
            programs: HashMap::new(),
            other: 0,
            lost: 0,
        }
    }

    /// Whether the exec at `now` is recorded on its own (else it is to be
    /// [`Rate::count`]ed). A window that is over is closed first: its
    /// summary, if it has one, is returned too.
    pub fn admit(&mut self, now: Instant, wall: SystemTime) -> (bool, Option<ProcessExecSummary>) {
        let closed = self.close_if_over(now, wall);
        if self.opened.is_none() {
            self.opened = Some((now, wall));
        }
        let itemize = self.itemized < self.limit;
        if itemize {
            self.itemized += 1;
        }
        (itemize, closed)
    }

    /// Counts an exec that is not recorded on its own.
    pub fn count(&mut self, program: Claimed) {
        self.counted += 1;
        let distinct = self.programs.len();
        match self.programs.get_mut(&program) {
            Some(n) => *n += 1,
            None if distinct < DISTINCT_PROGRAMS => {
                self.programs.insert(program, 1);
            }
            None => self.other += 1,
        }
    }

    /// An event the trace could not hand on.
    pub fn lost(&mut self) {
        self.lost += 1;
    }

    /// When the current window closes, if anything waits to be summarized.
    pub fn deadline(&self) -> Option<Instant> {
        let (opened, _) = self.opened?;
        (self.counted > 0 || self.lost > 0).then_some(opened + WINDOW)
    }

    /// The window's summary once it is over (None if it summarized nothing).
    pub fn close_if_over(&mut self, now: Instant, wall: SystemTime) -> Option<ProcessExecSummary> {
        let (opened, opened_wall) = self.opened?;
        if now < opened + WINDOW {
            return None;
        }
        self.opened = None;
        self.itemized = 0;
        let summary = (self.counted > 0 || self.lost > 0).then(|| {
            let mut programs: Vec<ProgramCount> =
                self.programs.drain().map(|(path, count)| ProgramCount { path, count }).collect();
            programs.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.path.0.cmp(&b.path.0)));
            let beyond: u64 = programs.iter().skip(NAMED_PROGRAMS).map(|p| p.count).sum();
            programs.truncate(NAMED_PROGRAMS);
            ProcessExecSummary {
                from: (self.stamp)(opened_wall),
                until: (self.stamp)(wall),
                execs: self.counted,
                programs,
                other: self.other + beyond,
                itemized_per_second: self.limit,
                lost: self.lost,
                reported_by: None,
            }
        });
        self.programs.clear();
        self.counted = 0;
        self.other = 0;
        self.lost = 0;
        summary
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn stamp(t: SystemTime) -> String {
        format!("{:?}", t)
    }

    #[test]
    fn a_flood_is_itemized_up_to_the_limit_then_summarized_per_window() {
        let start = Instant::now();
        let wall = SystemTime::now();
        let mut rate = Rate::new(3, stamp);
        let mut itemized = 0;
        for i in 0..10 {
            let (one_by_one, closed) = rate.admit(start + Duration::from_millis(i), wall);
            assert!(closed.is_none());
            if one_by_one {
                itemized += 1;
            } else {
                rate.count(Claimed::from(if i % 2 == 0 { "/bin/true" } else { "/bin/false" }));
            }
        }
        assert_eq!(itemized, 3);
        assert_eq!(rate.deadline(), Some(start + WINDOW));
        assert!(rate.close_if_over(start + Duration::from_millis(500), wall).is_none());
        let summary = rate.close_if_over(start + WINDOW, wall).unwrap();
        assert_eq!(summary.execs, 7);
        assert_eq!(summary.programs.iter().map(|p| p.count).sum::<u64>() + summary.other, 7);
        assert_eq!(summary.programs[0].count, 4, "most frequent first: {summary:?}");
        // The next window starts afresh: itemized again.
        let (one_by_one, closed) = rate.admit(start + WINDOW + Duration::from_millis(1), wall);
        assert!(one_by_one && closed.is_none());
        assert_eq!(rate.deadline(), None, "nothing to summarize yet");
    }

    #[test]
    fn a_quiet_window_has_no_summary_and_programs_are_bounded() {
        let start = Instant::now();
        let wall = SystemTime::now();
        let mut rate = Rate::new(1, stamp);
        assert!(rate.admit(start, wall).0);
        assert!(rate.close_if_over(start + WINDOW, wall).is_none());
        assert!(rate.admit(start + WINDOW * 2, wall).0);
        for i in 0..1000 {
            rate.count(Claimed(format!("/bin/p{i}").into_bytes()));
        }
        rate.lost();
        let (_, closed) = rate.admit(start + WINDOW * 4, wall);
        let summary = closed.unwrap();
        assert_eq!(summary.execs, 1000);
        assert_eq!(summary.programs.len(), NAMED_PROGRAMS);
        assert_eq!(summary.other, 1000 - NAMED_PROGRAMS as u64);
        assert_eq!(summary.lost, 1);
    }
}
