//! The exec trace's cost: one sandbox runs a `sh -c` loop of `/bin/true`,
//! with every exec traced (the built-in `dev` policy) and with the trace
//! off (a policy extending `dev` with `[audit] exec_trace = false`),
//! interleaved; the ratio of the medians is what tracing costs the loop.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::report::{self, LABEL_W};
use crate::{BenchError, Case, Options, Outcome, Slot, fixtures};

/// Traced over untraced, at most.
pub const MAX_TRACE_RATIO: f64 = 1.5;

pub struct ExecTraceResults {
    pub execs: usize,
    pub traced: Outcome,
    pub untraced: Outcome,
}

impl ExecTraceResults {
    pub fn failed(&self) -> bool {
        matches!(self.traced, Outcome::Failed(_)) || matches!(self.untraced, Outcome::Failed(_))
    }

    fn ratio(&self) -> Option<f64> {
        let (a, b) = (self.traced.summary()?, self.untraced.summary()?);
        let b = b.median.as_secs_f64();
        (b > 0.0).then(|| a.median.as_secs_f64() / b)
    }
}

fn case(airlock: &Path, state: &Path, cwd: &Path, policy: Option<&Path>, execs: usize) -> Case {
    let (airlock, state, cwd) = (airlock.to_path_buf(), state.to_path_buf(), cwd.to_path_buf());
    let policy: Option<PathBuf> = policy.map(Path::to_path_buf);
    let label = match policy {
        None => format!("traced: sh -c loop of {execs} /bin/true"),
        Some(_) => "untraced (exec_trace = false): the same loop".to_string(),
    };
    let script = format!("i=0; while [ $i -lt {execs} ]; do /bin/true; i=$((i+1)); done");
    Case {
        label,
        make: Box::new(move |_| {
            let mut c = Command::new(&airlock);
            c.env("AIRLOCK_STATE_DIR", &state).current_dir(&cwd).args(["run", "--rm", "--mode", "none"]);
            if let Some(p) = &policy {
                c.arg("--policy").arg(p);
            }
            c.args(["--", "/bin/sh", "-c", &script]);
            c
        }),
        after: None,
    }
}

pub fn run(airlock: &Path, scratch: &Path, opts: &Options) -> Result<ExecTraceResults, BenchError> {
    eprintln!("airlock-bench: exec trace, 2 cases interleaved");
    fixtures::make_dir_0755(scratch)?;
    let policy = scratch.join("untraced.toml");
    std::fs::write(&policy, "extends = \"dev\"\n\n[audit]\nexec_trace = false\n")
        .map_err(|e| BenchError::new(format!("{}: {e}", policy.display())))?;
    let state = scratch.join("state");
    let execs = opts.exec_loop;
    let slots = vec![
        Slot::Run(case(airlock, &state, scratch, None, execs)),
        Slot::Run(case(airlock, &state, scratch, Some(&policy), execs)),
    ];
    let measured = Options { iterations: opts.exec_iterations, ..opts.clone() };
    let mut outcomes = crate::measure_interleaved(slots, &measured).into_iter();
    let mut next = || outcomes.next().unwrap_or_else(|| Outcome::Failed("not measured".into()));
    Ok(ExecTraceResults { execs, traced: next(), untraced: next() })
}

pub fn print(r: &ExecTraceResults, problems: &mut Vec<String>) {
    println!();
    println!(
        "== exec trace: `airlock run --rm --mode none -- sh -c` looping {} /bin/true; wall time, ms",
        r.execs
    );
    report::time_header("", false);
    let ratio = r.ratio().map_or_else(|| "-".into(), |x| format!("{x:.2}x"));
    let traced = format!("traced: sh -c loop of {} /bin/true", r.execs);
    report::time_row(&traced, &r.traced, ratio, String::new(), problems);
    report::time_row("untraced (exec_trace = false)", &r.untraced, String::new(), String::new(), problems);
    if let (Some(t), Some(u)) = (r.traced.summary(), r.untraced.summary()) {
        let per_exec = t.median.saturating_sub(u.median).as_secs_f64() / r.execs as f64;
        println!(
            "  {:<LABEL_W$} {:.1} µs per exec (median difference / execs)",
            "tracing costs",
            per_exec * 1e6
        );
    }
}

pub fn targets(r: &ExecTraceResults, target: &mut dyn FnMut(Option<bool>, String)) {
    match r.ratio() {
        Some(x) => target(
            Some(x <= MAX_TRACE_RATIO),
            format!("exec trace: traced loop / untraced loop = {x:.2} (≤ {MAX_TRACE_RATIO})"),
        ),
        None => target(None, "exec trace: not measured".into()),
    }
}
