//! Running one command and measuring it: wall time from spawn to reap, and
//! the peak resident set size the kernel reports through `wait4`.

use std::io;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::BenchError;

/// One timed run.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub wall: Duration,
    /// `ru_maxrss` from `wait4`, in KiB.
    pub max_rss_kib: u64,
}

/// How a command ended, as `wait4` reported it.
struct Reaped {
    status: libc::c_int,
    usage: libc::rusage,
}

/// Spawns `cmd` with its output discarded, waits for it with `wait4`, and
/// returns the sample. A non-zero exit is an error naming `what`.
pub fn timed(mut cmd: Command, what: &str) -> Result<Sample, BenchError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let start = Instant::now();
    let child = cmd.spawn().map_err(|e| BenchError::new(format!("{what}: cannot start: {e}")))?;
    let reaped = reap(child.id())?;
    let wall = start.elapsed();
    check_status(reaped.status, what)?;
    Ok(Sample { wall, max_rss_kib: u64::try_from(reaped.usage.ru_maxrss).unwrap_or(0) })
}

/// Runs `cmd` once, untimed, with its output captured, so a failure can be
/// shown in full. Used for warm-up runs and setup steps.
pub fn checked(mut cmd: Command, what: &str) -> Result<String, BenchError> {
    cmd.stdin(Stdio::null());
    let out = cmd.output().map_err(|e| BenchError::new(format!("{what}: cannot start: {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let code = out.status.code().map_or_else(|| "a signal".to_string(), |c| format!("exit code {c}"));
        return Err(BenchError::new(format!("{what}: failed with {code}: {}", stderr.trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn reap(pid: u32) -> Result<Reaped, BenchError> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| BenchError::new(format!("pid {pid} out of range")))?;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a plain C struct of integers, for which all-zero is a
    // valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `usage` are valid, exclusive, properly aligned
        // pointers for the duration of the call. `pid` is our own child, which
        // std has not waited for (we never call `Child::wait`), so reaping it
        // here cannot race with another waiter.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            return Ok(Reaped { status, usage });
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(BenchError::new(format!("wait4({pid}): {err}")));
        }
    }
}

fn check_status(status: libc::c_int, what: &str) -> Result<(), BenchError> {
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        return Ok(());
    }
    let how = if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status:#x}")
    };
    Err(BenchError::new(format!("{what}: failed with {how}")))
}

/// Order statistics over a set of samples.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub median: Duration,
    pub p90: Duration,
    pub min: Duration,
    pub max: Duration,
    /// Median and largest `ru_maxrss` over the runs, in KiB.
    pub rss_median_kib: u64,
    pub rss_max_kib: u64,
}

impl Summary {
    pub fn of(samples: &[Sample]) -> Option<Summary> {
        let mut walls: Vec<Duration> = samples.iter().map(|s| s.wall).collect();
        let mut rss: Vec<u64> = samples.iter().map(|s| s.max_rss_kib).collect();
        walls.sort_unstable();
        rss.sort_unstable();
        Some(Summary {
            n: walls.len(),
            median: median_duration(&walls)?,
            p90: *walls.get(nearest_rank(walls.len(), 90)?)?,
            min: *walls.first()?,
            max: *walls.last()?,
            rss_median_kib: *rss.get(rss.len().checked_sub(1)? / 2)?,
            rss_max_kib: *rss.last()?,
        })
    }
}

/// Median of sorted durations: the middle one, or the mean of the two middle ones.
fn median_duration(sorted: &[Duration]) -> Option<Duration> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    if n % 2 == 1 {
        return sorted.get(n / 2).copied();
    }
    let (a, b) = (sorted.get(n / 2 - 1)?, sorted.get(n / 2)?);
    Some((*a + *b) / 2)
}

/// Order statistics over plain numbers (rates, per-request times): median
/// (mean of the two middle values for an even count), p90 by nearest rank,
/// min and max. None for no values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub median: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Option<Stats> {
        let mut v = values.to_vec();
        v.sort_unstable_by(f64::total_cmp);
        let n = v.len();
        let median =
            if n % 2 == 1 { *v.get(n / 2)? } else { (v.get((n / 2).checked_sub(1)?)? + v.get(n / 2)?) / 2.0 };
        Some(Stats { n, median, p90: *v.get(nearest_rank(n, 90)?)?, min: *v.first()?, max: *v.last()? })
    }
}

/// Index of the `pct`th percentile by the nearest-rank method.
fn nearest_rank(n: usize, pct: usize) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let rank = (pct * n).div_ceil(100).max(1);
    Some(rank - 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ms(v: u64) -> Sample {
        Sample { wall: Duration::from_millis(v), max_rss_kib: v }
    }

    #[test]
    fn summary_of_ten() {
        let samples: Vec<Sample> = [10, 1, 9, 2, 8, 3, 7, 4, 6, 5].into_iter().map(ms).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!(s.n, 10);
        assert_eq!(s.median, Duration::from_micros(5500));
        assert_eq!(s.p90, Duration::from_millis(9));
        assert_eq!(s.min, Duration::from_millis(1));
        assert_eq!(s.max, Duration::from_millis(10));
        assert_eq!(s.rss_max_kib, 10);
    }

    #[test]
    fn summary_of_one_and_none() {
        let s = Summary::of(&[ms(4)]).unwrap();
        assert_eq!((s.median, s.p90), (Duration::from_millis(4), Duration::from_millis(4)));
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn stats_of_numbers() {
        let s = Stats::of(&[3.0, 1.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.n, s.median, s.p90, s.min, s.max), (4, 2.5, 4.0, 1.0, 4.0));
        assert_eq!(Stats::of(&[5.0]).unwrap().median, 5.0);
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn p90_of_thirty_is_the_27th() {
        assert_eq!(nearest_rank(30, 90), Some(26));
        assert_eq!(nearest_rank(1, 90), Some(0));
    }

    #[test]
    fn timed_reports_failure_and_success() {
        assert!(timed(Command::new("true"), "true").is_ok());
        let err = timed(Command::new("false"), "false").unwrap_err();
        assert!(err.to_string().contains("exit code 1"), "{err}");
    }
}
