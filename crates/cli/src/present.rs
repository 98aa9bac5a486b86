//! Everything the person at the terminal reads: results, notices, errors.
//! Output that scripts read (--json) goes to stdout; airlock's own remarks
//! during `run` go to stderr so they never mix with the command's output.

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use airlock_jail::probe::{Feature, HostReport, Status};
use airlock_runtime::ops::{DiffView, GcReport, Inspection, NetLogEntry, SandboxSummary};
use airlock_runtime::{Notice, RunOutcome};

/// Prints an error and its whole chain of causes, once.
pub fn error(err: &dyn std::error::Error) {
    let mut msg = format!("airlock: error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(&format!("\n  caused by: {text}"));
        }
        source = cause.source();
    }
    eprintln!("{msg}");
}

pub fn notice(n: Notice) {
    match n {
        Notice::Warning(text) => eprintln!("airlock: warning: {text}"),
        Notice::Info(text) => eprintln!("airlock: {text}"),
    }
}

pub fn run_summary(o: &RunOutcome) {
    let mut parts = Vec::new();
    if o.timed_out {
        parts.push("time limit reached, command killed".to_string());
    }
    if o.oom_killed {
        parts.push("memory limit reached, a process was killed".to_string());
    }
    if let Some(stat) = &o.changes {
        let files = stat.files_added + stat.files_modified + stat.files_deleted + stat.type_changed;
        if files == 0 {
            parts.push("no changes".to_string());
        } else if !o.removed {
            parts.push(format!(
                "{files} file{} changed. Review: airlock diff {} · Apply: airlock apply {}",
                if files == 1 { "" } else { "s" },
                o.name,
                o.name
            ));
        } else {
            parts.push(format!("{files} file{} changed (discarded)", if files == 1 { "" } else { "s" }));
        }
    }
    if !o.artifacts.is_empty() {
        parts.push(format!("{} artifact(s) captured", o.artifacts.len()));
    }
    if o.removed {
        parts.push("removed".to_string());
    }
    let detail = if parts.is_empty() { "done".to_string() } else { parts.join("; ") };
    eprintln!("airlock: sandbox {}: {detail}", o.name);
}

pub fn diff(view: &DiffView, stat: bool, json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &view.diff.to_json())?;
        writeln!(out)?;
    } else if stat {
        view.diff.render_stat(&mut out)?;
    } else {
        view.diff.render_unified(&view.lower, &view.upper, &mut out)?;
    }
    out.flush()
}

pub fn list(items: &[SandboxSummary], json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, items)?;
        return writeln!(out);
    }
    writeln!(out, "{:<24} {:<8} {:<12} {:<5} {:<8} WORKSPACE", "NAME", "STATE", "POLICY", "EXIT", "MODE")?;
    for s in items {
        let exit = s.exit_code.map_or("-".to_string(), |c| c.to_string());
        let ws = s.workspace.as_ref().map_or("-".to_string(), |p| p.display().to_string());
        writeln!(
            out,
            "{:<24} {:<8} {:<12} {:<5} {:<8} {ws}",
            s.name, s.state, s.policy, exit, s.workspace_mode
        )?;
    }
    Ok(())
}

pub fn gc(report: &GcReport, json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, report)?;
        return writeln!(out);
    }
    for name in &report.lost {
        writeln!(out, "sandbox {name}: supervisor gone, marked failed")?;
    }
    for name in &report.removed {
        writeln!(out, "sandbox {name}: removed (cleanup rule)")?;
    }
    for what in &report.released {
        writeln!(out, "released {what}")?;
    }
    if report.lost.is_empty() && report.removed.is_empty() && report.released.is_empty() {
        writeln!(out, "nothing to clean up")?;
    }
    Ok(())
}

pub fn doctor(report: &HostReport, json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &doctor_json(report)?)?;
        return writeln!(out);
    }
    render_doctor(report, &mut out)
}

/// The report with what it means for policies: `enforces` holds, per
/// feature a policy may require, the verdict `run` and `create` plan by.
fn doctor_json(report: &HostReport) -> io::Result<serde_json::Value> {
    let mut value = serde_json::to_value(report)?;
    let enforces: serde_json::Map<String, serde_json::Value> =
        Feature::ALL.iter().map(|f| (f.as_str().to_owned(), report.enforces(*f).into())).collect();
    if let Some(fields) = value.as_object_mut() {
        fields.insert("enforces".to_owned(), enforces.into());
    }
    Ok(value)
}

fn render_doctor(report: &HostReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(out, "kernel: {}", report.kernel)?;
    writeln!(
        out,
        "running as: {}",
        if report.running_as_root { "root" } else { "an unprivileged user (rootless)" }
    )?;
    for c in &report.checks {
        let mark = match c.status {
            Status::Ok => "ok     ",
            Status::Limited => "limited",
            Status::Missing => "MISSING",
        };
        writeln!(out, "[{mark}] {:<22} {}", c.id, c.detail)?;
        if let Some(fix) = &c.fix {
            writeln!(out, "          fix: {fix}")?;
        }
    }
    writeln!(
        out,
        "features a policy may require (a policy refuses to run without one unless it lists it in \
         isolation.allow_weaker):"
    )?;
    for feature in Feature::ALL {
        let verdict = if report.enforces(feature) { "enforced" } else { "MISSING" };
        writeln!(out, "  {:<12} {verdict} ({})", feature.as_str(), feature.checks().join(", "))?;
    }
    Ok(())
}

pub fn net_log(entries: &[NetLogEntry], json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, entries)?;
        return writeln!(out);
    }
    if entries.is_empty() {
        return writeln!(out, "no network activity recorded");
    }
    for e in entries {
        let ev = &e.event;
        let verdict = if ev.allowed { "allow" } else { "DENY " };
        let request = match (&ev.method, &ev.path) {
            (Some(m), Some(p)) => format!(" {m} {p}"),
            _ => String::new(),
        };
        writeln!(
            out,
            "{} {verdict} {:<5} {}:{}{request}  [{}] out={}B in={}B {}ms",
            e.ts, ev.via, ev.host, ev.port, ev.rule, ev.bytes_out, ev.bytes_in, ev.duration_ms
        )?;
    }
    Ok(())
}

/// How a sandbox ended, for `inspect`: "code 0", "signal 9, out of memory"…
pub fn exit_summary(code: Option<i64>, signal: Option<i64>, timed_out: bool, oom_killed: bool) -> String {
    let mut parts = Vec::new();
    if let Some(code) = code {
        parts.push(format!("code {code}"));
    }
    if let Some(signal) = signal {
        parts.push(format!("signal {signal}"));
    }
    if timed_out {
        parts.push("timed out".to_owned());
    }
    if oom_killed {
        parts.push("out of memory".to_owned());
    }
    parts.join(", ")
}

pub fn inspect(i: &Inspection, json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, i)?;
        return writeln!(out);
    }
    let m = &i.meta;
    writeln!(out, "name:       {}", i.name)?;
    writeln!(out, "state:      {}", i.state)?;
    writeln!(out, "policy:     {}", m.policy)?;
    let ws = m.workspace.as_ref().map_or("-".to_string(), |p| p.display().to_string());
    writeln!(out, "workspace:  {ws} ({})", m.workspace_mode)?;
    writeln!(out, "created:    {}", m.created_at)?;
    if let Some(f) = &m.finished_at {
        writeln!(out, "finished:   {f}")?;
    }
    if let Some(d) = m.deadline_unix {
        writeln!(out, "deadline:   {d} (unix seconds)")?;
    }
    if let Some(idle) = m.idle_timeout_secs {
        writeln!(out, "idle after: {idle}s")?;
    }
    if !m.labels.is_empty() {
        let labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        writeln!(out, "labels:     {}", labels.join(", "))?;
    }
    if !m.degraded.is_empty() {
        writeln!(out, "running without: {}", m.degraded.join(", "))?;
    }
    if let Some(e) = &m.exit {
        let summary = exit_summary(e.code.map(i64::from), e.signal.map(i64::from), e.timed_out, e.oom_killed);
        writeln!(out, "exit:       {summary}")?;
    }
    writeln!(out, "state dir:  {}", i.path.display())?;
    Ok(())
}

/// A one-line count on stderr while long work goes on (a diff or an apply
/// of many files), for a person at a terminal: it appears only once the
/// work has taken a moment, changes at most ten times a second, and is
/// wiped when done. Nothing when stderr is not a terminal.
pub struct ProgressLine<W: Write = io::Stderr> {
    what: &'static str,
    out: Option<W>,
    started: Instant,
    shown: Option<Instant>,
}

/// How long work runs before its progress is shown, and how often it changes.
const PROGRESS_AFTER: Duration = Duration::from_millis(300);
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

impl ProgressLine {
    pub fn stderr(what: &'static str) -> ProgressLine {
        let err = io::stderr();
        let out = err.is_terminal().then_some(err);
        ProgressLine { what, out, started: Instant::now(), shown: None }
    }
}

impl<W: Write> ProgressLine<W> {
    pub fn update(&mut self, entries: u64) {
        self.update_at(entries, Instant::now());
    }

    fn update_at(&mut self, entries: u64, now: Instant) {
        let Some(out) = self.out.as_mut() else { return };
        let due = match self.shown {
            None => now.duration_since(self.started) >= PROGRESS_AFTER,
            Some(last) => now.duration_since(last) >= PROGRESS_EVERY,
        };
        if due {
            let _ = write!(out, "\r\x1b[Kairlock: {}: {entries} entries…", self.what);
            let _ = out.flush();
            self.shown = Some(now);
        }
    }
}

impl<W: Write> Drop for ProgressLine<W> {
    fn drop(&mut self) {
        if let (Some(out), Some(_)) = (self.out.as_mut(), self.shown) {
            let _ = write!(out, "\r\x1b[K");
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn progress_appears_late_changes_seldom_and_is_wiped() {
        let mut buf = Vec::new();
        let start = Instant::now();
        {
            let mut line = ProgressLine { what: "diff", out: Some(&mut buf), started: start, shown: None };
            line.update_at(10, start + Duration::from_millis(100));
            line.update_at(20, start + Duration::from_millis(350));
            line.update_at(30, start + Duration::from_millis(400));
            line.update_at(40, start + Duration::from_millis(460));
        }
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(
            text, "\r\x1b[Kairlock: diff: 20 entries…\r\x1b[Kairlock: diff: 40 entries…\r\x1b[K",
            "{text:?}"
        );
        // Work that ends quickly leaves nothing behind.
        let mut quiet = Vec::new();
        {
            let mut line = ProgressLine { what: "apply", out: Some(&mut quiet), started: start, shown: None };
            line.update_at(5, start + Duration::from_millis(10));
        }
        assert!(quiet.is_empty());
    }
    /// A report from the probe's own verdict function, on a made-up host.
    fn report(root: bool, cgroups_writable: bool, landlock: bool) -> HostReport {
        use airlock_jail::cgroup::{CgroupSupport, Placement};
        let v1 = |c: &str| Some(Placement::V1(format!("/sys/fs/cgroup/{c}").into()));
        airlock_jail::probe::launch_report(&airlock_jail::probe::HostFacts {
            running_as_root: root,
            kernel: "6.1.0".into(),
            cgroups: CgroupSupport {
                memory: v1("memory"),
                pids: v1("pids"),
                cpu: v1("cpu"),
                writable: cgroups_writable,
                detail: String::new(),
            },
            landlock_abi: if landlock { Ok(3) } else { Err(38) },
        })
    }

    #[test]
    fn doctor_shows_what_the_plan_decides() {
        let dev = airlock_policy::Policy::builtin("dev").unwrap();
        for (root, cgroups, landlock) in
            [(true, true, true), (false, false, true), (false, true, false), (true, false, false)]
        {
            let report = report(root, cgroups, landlock);
            let mut text = Vec::new();
            render_doctor(&report, &mut text).unwrap();
            let text = String::from_utf8(text).unwrap();
            let json = doctor_json(&report).unwrap();
            let missing: Vec<String> = airlock_runtime::plan::shortfalls(&dev, &report)
                .iter()
                .map(|s| s.feature.to_string())
                .collect();
            for feature in Feature::ALL {
                let name = feature.as_str();
                let line = text.lines().find(|l| l.trim_start().starts_with(&format!("{name} "))).unwrap();
                let lacks = missing.iter().any(|m| m == name);
                assert_eq!(line.contains("MISSING"), lacks, "{name}: {text}\nplan: {missing:?}");
                assert_eq!(json["enforces"][name], !lacks, "{name}: {json}");
                // And every check behind a missing feature says why, with a fix.
                for id in feature.checks() {
                    let check = report.get(id).unwrap();
                    if lacks && check.status != Status::Ok {
                        assert!(text.contains(&format!("[MISSING] {id}")), "{id}: {text}");
                    }
                }
            }
            assert_eq!(missing.is_empty(), (root && cgroups && landlock), "{missing:?}");
        }
    }
}
