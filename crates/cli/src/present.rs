//! Everything the person at the terminal reads: results, notices, errors.
//! Output that scripts read (--json) goes to stdout; airlock's own remarks
//! during `run` go to stderr so they never mix with the command's output.
//!
//! Much of what is shown was chosen inside a sandbox (host names it asked
//! for, paths, labels and arguments an agent picked, its output): every
//! such value goes through `airlock_workspace::quote_bytes` (one token,
//! quoted when odd) or `printable` (running text), so no escape sequence,
//! carriage return, bidi control or forged line reaches the terminal.
//! `--json` output stays JSON: serde escapes what JSON must.

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use airlock_jail::probe::{Feature, HostReport, Status};
use airlock_runtime::audit::chain::{AnchorSource, ChainReport, Verdict};
use airlock_runtime::bundle::{BundleError, ExportReport, Opened};
use airlock_runtime::ops::{DiffView, GcReport, NetLogEntry};
use airlock_runtime::view::DaemonFacts;
use airlock_runtime::view::SandboxView;
use airlock_runtime::{Notice, RunOutcome};
use airlock_workspace::{printable, quote_bytes};

/// A value that may come from a sandbox, as one token for a table or a line.
pub fn shown(text: &str) -> String {
    quote_bytes(text.as_bytes())
}

/// Prints an error and its whole chain of causes, once. Messages can quote
/// what a sandbox said; they are made printable.
pub fn error(err: &dyn std::error::Error) {
    let mut msg = format!("airlock: error: {}", printable(err.to_string().as_bytes()));
    let mut source = err.source();
    while let Some(cause) = source {
        let text = printable(cause.to_string().as_bytes());
        if !msg.contains(&text) {
            msg.push_str(&format!("\n  caused by: {text}"));
        }
        source = cause.source();
    }
    eprintln!("{msg}");
}

pub fn notice(n: Notice) {
    match n {
        Notice::Warning(text) => eprintln!("airlock: warning: {}", printable(text.as_bytes())),
        Notice::Info(text) => eprintln!("airlock: {}", printable(text.as_bytes())),
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

/// `airlock ls`, whether the runtime or a daemon answered: JSON as it
/// came (the one view, which a daemon extends), or a table.
pub fn list<T: serde::Serialize>(items: &[T], views: &[SandboxView], json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, items)?;
        return writeln!(out);
    }
    render_list(views, &mut out)
}

fn state_text(v: &SandboxView) -> &'static str {
    if v.lost { "lost" } else { v.state.as_str() }
}

fn render_list(views: &[SandboxView], out: &mut dyn Write) -> io::Result<()> {
    writeln!(out, "{:<24} {:<8} {:<12} {:<5} {:<8} WORKSPACE", "NAME", "STATE", "POLICY", "EXIT", "MODE")?;
    for s in views {
        // As `airlock run` would have exited: 124 for a time limit, 128+N
        // for signal N.
        let exit = match &s.exit {
            Some(e) if e.timed_out => airlock_runtime::exit_codes::TIMED_OUT.to_string(),
            Some(e) => e.code.or(e.signal.map(|n| 128 + n)).map_or("-".to_owned(), |c| c.to_string()),
            None => "-".to_owned(),
        };
        let opt = |v: &Option<String>| v.as_deref().map_or("-".to_owned(), shown);
        writeln!(
            out,
            "{:<24} {:<8} {:<12} {:<5} {:<8} {}",
            shown(&s.name),
            state_text(s),
            shown(&s.policy),
            exit,
            opt(&s.workspace_mode),
            opt(&s.workspace)
        )?;
    }
    Ok(())
}

/// `image pull`'s progress, on stderr (stdout carries the digest alone).
pub struct PullProgress;

impl airlock_image::source::Progress for PullProgress {
    fn blob(&mut self, digest: &airlock_image::store::Digest, size: u64, cached: bool) {
        let what = if cached { "cached" } else { "fetched" };
        eprintln!(
            "airlock: layer {} {} ({what})",
            &digest.as_str()[..19],
            airlock_image::store::human_size(size)
        );
    }
}

/// What `image ls` says of the store as a whole.
pub struct StoreSize {
    pub usage: u64,
    pub budget: Option<u64>,
}

/// `image ls`: one line per image and a line on the store's size against
/// its budget, or the store's records as JSON (an array, as before budgets).
pub fn images(images: &[airlock_image::store::ImageRecord], size: &StoreSize, json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, images)?;
        return writeln!(out);
    }
    writeln!(out, "{:<19}  {:>10}  {:>6}  NAMES", "DIGEST", "SIZE", "LAYERS")?;
    for image in images {
        let names: Vec<String> = image.names.iter().map(|n| printable(n.as_bytes())).collect();
        writeln!(
            out,
            "{:<19}  {:>10}  {:>6}  {}",
            &image.manifest.as_str()[..19],
            airlock_image::store::human_size(image.size),
            image.layers.len(),
            names.join(", ")
        )?;
    }
    let used = airlock_image::store::human_size(size.usage);
    match size.budget {
        Some(budget) => writeln!(
            out,
            "store: {used} on disk of a {} budget ({})",
            airlock_image::store::human_size(budget),
            airlock_runtime::image::BUDGET_VAR
        ),
        None => {
            writeln!(out, "store: {used} on disk, no budget ({} unset)", airlock_runtime::image::BUDGET_VAR)
        }
    }
}

pub fn gc(report: &GcReport, json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, report)?;
        return writeln!(out);
    }
    for name in &report.lost {
        writeln!(out, "sandbox {}: supervisor gone, marked failed", shown(name))?;
    }
    for name in &report.removed {
        writeln!(out, "sandbox {}: removed (cleanup rule)", shown(name))?;
    }
    for what in &report.released {
        writeln!(out, "released {}", printable(what.as_bytes()))?;
    }
    if report.lost.is_empty() && report.removed.is_empty() && report.released.is_empty() {
        writeln!(out, "nothing to clean up")?;
    }
    Ok(())
}

/// The microVM tier's part of `airlock doctor`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MicrovmReport {
    pub engine: airlock_vm::engine::EngineReport,
    /// The guest kernel's release, when one is installed.
    pub kernel: Option<String>,
    pub cache: Option<std::path::PathBuf>,
    /// The cached guest, when it is current.
    pub guest: Option<airlock_vm::guest::Guest>,
}

impl MicrovmReport {
    /// The check `kvm` in doctor's list.
    fn check(&self) -> airlock_jail::probe::Check {
        use airlock_vm::engine::Kvm;
        let status = match &self.engine.kvm {
            Kvm::Usable { .. } => Status::Ok,
            Kvm::NoPermission { .. } => Status::Limited,
            Kvm::Missing | Kvm::Unusable { .. } | Kvm::Untested { .. } => Status::Missing,
        };
        airlock_jail::probe::Check {
            id: "kvm",
            title: "KVM for the microVM tier".into(),
            status,
            detail: format!("{} (tried in {} ms)", self.engine.kvm.describe(), self.engine.trial_ms),
            fix: self.engine.kvm.fix(),
        }
    }

    /// How a microVM would run here, for people.
    fn verdict(&self) -> String {
        let accel = match (&self.engine.qemu, &self.engine.kvm) {
            (None, _) => format!("cannot run: {} is not installed", airlock_vm::engine::QEMU),
            (Some(_), airlock_vm::engine::Kvm::Usable { .. }) => "runs with KVM".to_owned(),
            (Some(_), _) => "runs only under software emulation (TCG), for policies that list \"kvm\" in \
                             isolation.allow_weaker; refused otherwise"
                .to_owned(),
        };
        let guest = match (&self.guest, &self.kernel) {
            (Some(g), _) => format!("guest built (kernel {})", g.kernel_release),
            (None, Some(k)) => format!("guest not built yet for kernel {k}: `airlock vm setup`"),
            (None, None) => "no guest kernel: install linux-image-amd64".to_owned(),
        };
        format!("{accel}; {guest}")
    }
}

pub fn doctor(report: &HostReport, microvm: &MicrovmReport, json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &doctor_json(report, microvm)?)?;
        return writeln!(out);
    }
    render_doctor(report, microvm, &mut out)
}

/// The report with what it means for policies: `enforces` holds, per
/// feature a policy may require, the verdict `run` and `create` plan by;
/// `microvm` the engine's state.
fn doctor_json(report: &HostReport, microvm: &MicrovmReport) -> io::Result<serde_json::Value> {
    let mut report = report.clone();
    report.checks.push(microvm.check());
    let mut value = serde_json::to_value(&report)?;
    let enforces: serde_json::Map<String, serde_json::Value> =
        Feature::ALL.iter().map(|f| (f.as_str().to_owned(), report.enforces(*f).into())).collect();
    if let Some(fields) = value.as_object_mut() {
        fields.insert("enforces".to_owned(), enforces.into());
        fields.insert("microvm".to_owned(), serde_json::to_value(microvm)?);
    }
    Ok(value)
}

fn render_doctor(report: &HostReport, microvm: &MicrovmReport, out: &mut dyn Write) -> io::Result<()> {
    let mut report = report.clone();
    report.checks.push(microvm.check());
    let report = &report;
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
    writeln!(out, "microvm tier: {}", microvm.verdict())?;
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
    // The host, method, path and the rule's wording (which can repeat the
    // host) are the sandbox's choice: each is one quoted token when odd.
    for e in entries {
        let ev = &e.event;
        let verdict = if ev.allowed { "allow" } else { "DENY " };
        let mut request = match (&ev.method, &ev.path) {
            (Some(m), Some(p)) => format!(" {} {}", shown(m), shown(p)),
            _ => String::new(),
        };
        // A transparent connection: the address the sandbox itself used.
        if let Some(destination) = &ev.destination {
            request.push_str(&format!(" (to {})", shown(destination)));
        }
        writeln!(
            out,
            "{} {verdict} {:<5} {}:{}{request}  [{}] out={}B in={}B {}ms",
            shown(&e.ts),
            shown(&ev.via),
            shown(&ev.host),
            ev.port,
            shown(&ev.rule),
            ev.bytes_out,
            ev.bytes_in,
            ev.duration_ms
        )?;
    }
    Ok(())
}

/// `airlock audit`: one line per event (time, seq, kind, summary, every
/// value the sandbox may have chose escaped), or with `--json` each
/// record exactly as written.
pub fn audit_timeline(entries: &[airlock_runtime::audit::Entry], json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        for e in entries {
            writeln!(out, "{}", e.raw)?;
        }
        return out.flush();
    }
    if entries.is_empty() {
        return writeln!(out, "no events recorded");
    }
    for e in entries {
        let value = serde_json::to_value(&e.record.event).unwrap_or_default();
        let kind = e.record.event.kind();
        writeln!(
            out,
            "{} {:>5} {kind:<18} {}",
            shown(&e.record.ts),
            e.record.seq,
            event_summary(kind, &value)
        )?;
    }
    out.flush()
}

/// A field's value as one printable token: strings (and paths that are
/// not UTF-8) escaped, `-` for nothing.
fn token(value: Option<&serde_json::Value>) -> String {
    use serde_json::Value;
    match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => shown(s),
        Some(Value::Object(map)) if map.len() == 1 && map.contains_key("non_utf8_hex") => {
            let hex = map.get("non_utf8_hex").and_then(Value::as_str).unwrap_or_default();
            let bytes: Vec<u8> = hex
                .as_bytes()
                .chunks(2)
                .filter_map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
                .collect();
            quote_bytes(&bytes)
        }
        Some(Value::Array(items)) => items.iter().map(argument).collect::<Vec<_>>().join(" "),
        Some(other) => printable(other.to_string().as_bytes()),
    }
}

/// One item of a list (an argument, a path) as a token that a space inside
/// it cannot split: quoted when odd, as `shown` does, or when it holds a
/// space or a quote.
fn argument(item: &serde_json::Value) -> String {
    let token = token(Some(item));
    match item.as_str() {
        Some(s) if !token.starts_with('"') && (s.is_empty() || s.contains([' ', '"', '\'', '\\'])) => {
            format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
        }
        _ => token,
    }
}

/// What one event says, in a line. Read from the event's JSON, so an event
/// kind this list does not know is still shown, field by field.
fn event_summary(kind: &str, v: &serde_json::Value) -> String {
    let mut line = event_text(kind, v);
    // What a microVM guest reported is its claim, not what the host saw.
    if let Some(by) = v.get("reported_by").filter(|b| !b.is_null()) {
        line.push_str(&format!(" (reported by the {})", token(Some(by))));
    }
    line
}

fn event_text(kind: &str, v: &serde_json::Value) -> String {
    let f = |key: &str| token(v.get(key));
    let n = |key: &str| v.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let refused = || match v.get("refused") {
        Some(serde_json::Value::String(why)) => format!(" REFUSED: {}", shown(why)),
        _ => String::new(),
    };
    let ended = || {
        exit_summary(
            v.get("code").and_then(|c| c.as_i64()),
            v.get("signal").and_then(|c| c.as_i64()),
            v.get("timed_out").and_then(|t| t.as_bool()).unwrap_or(false),
            v.get("oom_killed").and_then(|t| t.as_bool()).unwrap_or(false),
        )
    };
    match kind {
        "created" => format!(
            "policy {} workspace {} ({}) degraded [{}]",
            f("policy"),
            f("workspace"),
            f("workspace_mode"),
            f("degraded")
        ),
        "command_started" => format!("pid {}: {}", f("pid"), f("argv")),
        "exec_started" => format!("exec #{} pid {}: {}", f("id"), f("pid"), f("argv")),
        "exited" => format!("{} after {} ms", ended(), n("duration_ms")),
        "exec_ended" => format!("exec #{} {} after {} ms", f("id"), ended(), n("duration_ms")),
        "time_limit_hit" => format!("after {} s", n("limit_secs")),
        "diff_summary" => format!(
            "{} added, {} modified, {} deleted; change {}",
            n("added"),
            n("modified"),
            n("deleted"),
            f("digest")
        ),
        "workspace_changed" => format!(
            "{} {} ({} → {}) size {} sha256 {}",
            f("kind"),
            f("path"),
            f("old_type"),
            f("new_type"),
            f("size"),
            f("sha256")
        ),
        "artifacts_captured" => format!(
            "{} files, {} bytes: {}",
            v.get("files").and_then(|l| l.as_array()).map_or(0, Vec::len),
            n("bytes"),
            f("files")
        ),
        "applied" => format!(
            "written [{}] deleted [{}] change {} by uid {}{}",
            f("written"),
            f("deleted"),
            f("digest"),
            n("by_uid"),
            if v.get("allow_protected").and_then(|b| b.as_bool()) == Some(true) {
                " (protected paths allowed)"
            } else {
                ""
            }
        ),
        "apply_refused" | "removed" | "stopped" => f("reason"),
        "supervisor_lost" | "egress_proxy_ended" => f("detail"),
        "error" => format!("{}: {}", f("stage"), f("message")),
        "audit_capped" => f("message"),
        "network" => {
            let verdict =
                if v.get("allowed").and_then(|a| a.as_bool()) == Some(true) { "allow" } else { "DENY" };
            let request = match (v.get("method"), v.get("path")) {
                (Some(m), Some(p)) if !m.is_null() => format!(" {} {}", token(Some(m)), token(Some(p))),
                _ => String::new(),
            };
            format!("{verdict} {} {}:{}{request} [{}]", f("via"), f("host"), n("port"), f("rule"))
        }
        "file_read" => format!("{} {} bytes{}", f("path"), n("bytes"), refused()),
        "file_changed" => {
            let to = v
                .get("to")
                .filter(|t| !t.is_null())
                .map(|t| format!(" → {}", token(Some(t))))
                .unwrap_or_default();
            format!("{} {}{to} {} bytes{}", f("op"), f("path"), n("bytes"), refused())
        }
        "file_inspected" => format!("{} {} {} entries{}", f("op"), f("path"), n("entries"), refused()),
        "container_engine" => {
            if v.get("ready").and_then(|b| b.as_bool()) == Some(true) {
                format!("ready after {} ms", n("ms"))
            } else {
                format!("not ready after {} ms: {}", n("ms"), f("detail"))
            }
        }
        "container_created" => format!("{} image {}: {}", f("id"), f("image"), f("command")),
        "port_accepted" => {
            let on = v
                .get("listen")
                .filter(|l| !l.is_null())
                .map_or_else(|| "supervisor".to_owned(), |l| token(Some(l)));
            format!("#{} {} via {on} → port {}", n("id"), f("peer"), n("sandbox_port"))
        }
        "port_closed" => {
            let why = v
                .get("error")
                .filter(|e| !e.is_null())
                .map(|e| format!(" ({})", token(Some(e))))
                .unwrap_or_default();
            format!(
                "#{} {} bytes in, {} out, {} ms{why}",
                n("id"),
                n("bytes_in"),
                n("bytes_out"),
                n("duration_ms")
            )
        }
        // The exec trace: what a process claimed when it called exec.
        "process_exec" => {
            // A path or directory with a space stays one token.
            let one =
                |key: &str| v.get(key).filter(|x| !x.is_null()).map_or_else(|| "-".to_owned(), argument);
            let mut line = format!("pid {} (parent {}) {}", f("pid"), f("ppid"), one("path"));
            if v.get("no_such_file").and_then(|b| b.as_bool()) == Some(true) {
                line.push_str(" (no such file)");
            } else {
                line.push_str(&format!(": {} in {}", f("argv"), one("cwd")));
            }
            if let Some(serde_json::Value::String(why)) = v.get("unreadable") {
                line.push_str(&format!(" (unreadable: {})", shown(why)));
            }
            if v.get("syscall").and_then(|s| s.as_str()) != Some("execve") {
                line.push_str(&format!(" [{}]", f("syscall")));
            }
            line
        }
        "process_exit" => {
            let how = match v.get("unknown") {
                Some(serde_json::Value::String(why))
                    if v.get("code").is_none_or(|c| c.is_null())
                        && v.get("signal").is_none_or(|c| c.is_null()) =>
                {
                    format!("status unknown: {}", shown(why))
                }
                _ => ended(),
            };
            format!("pid {} {how} after {} ms", f("pid"), n("duration_ms"))
        }
        "process_exec_summary" => {
            let programs: Vec<String> = v
                .get("programs")
                .and_then(|p| p.as_array())
                .map(|list| {
                    list.iter()
                        .map(|p| format!("{} ×{}", argument(&p["path"]), token(p.get("count"))))
                        .collect()
                })
                .unwrap_or_default();
            let mut line = format!(
                "{} more execs from {} to {}, beyond {} a second, counted: {}",
                n("execs"),
                f("from"),
                f("until"),
                n("itemized_per_second"),
                programs.join(", ")
            );
            if n("other") > 0 {
                line.push_str(&format!(", {} others", n("other")));
            }
            if n("lost") > 0 {
                line.push_str(&format!("; {} events lost (the supervisor fell behind)", n("lost")));
            }
            line
        }
        "exec_trace_ended" => f("detail"),
        _ => match v.as_object() {
            Some(map) => map
                .iter()
                .filter(|(k, _)| k.as_str() != "event")
                .map(|(k, val)| format!("{}={}", shown(k), token(Some(val))))
                .collect::<Vec<_>>()
                .join(" "),
            None => String::new(),
        },
    }
}

/// `airlock audit verify`: what the chain check found; the exit code (0
/// intact, 1 not, 2 nothing to check).
pub fn chain_report(name: &str, report: &ChainReport, json: bool) -> io::Result<i32> {
    let code = match report.verdict {
        Verdict::Intact => 0,
        Verdict::Broken => 1,
        Verdict::PredatesChain => 2,
    };
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, report)?;
        writeln!(out)?;
        return Ok(code);
    }
    render_chain(&format!("audit log of {}", shown(name)), report, &mut out)?;
    Ok(code)
}

fn render_chain(what: &str, report: &ChainReport, out: &mut dyn Write) -> io::Result<()> {
    match report.verdict {
        Verdict::Intact => {
            write!(out, "{what}: intact: {} events", report.events)?;
            if let Some(seq) = report.last_seq {
                write!(out, ", the last seq {seq}")?;
            }
            writeln!(out)?;
            if report.unchained > 0 {
                writeln!(
                    out,
                    "  the first {} events were written before the chain (not covered by it)",
                    report.unchained
                )?;
            }
        }
        Verdict::PredatesChain => writeln!(
            out,
            "{what}: written before airlock chained its audit logs ({} events): there is nothing to check",
            report.events
        )?,
        Verdict::Broken => {
            writeln!(out, "{what}: NOT INTACT")?;
            for p in &report.problems {
                writeln!(out, "  {}", printable(p.what.as_bytes()))?;
            }
        }
    }
    for a in &report.anchors {
        let source = match a.source {
            AnchorSource::HeadFile => "the head beside it (audit.head)",
            AnchorSource::DaemonIndex => "the daemon's index",
            AnchorSource::Bundle => "the bundle's signed manifest",
        };
        let verdict = if a.held { "holds" } else { "does NOT hold" };
        writeln!(out, "  head seq {} recorded by {source}: {verdict}", a.seq)?;
    }
    if report.torn_tail {
        writeln!(out, "  its last line is incomplete (a writer stopped mid-record); not an event")?;
    }
    Ok(())
}

/// `airlock audit verify --bundle`: the bundle passed its checks; the
/// chain's verdict decides the exit code.
pub fn bundle_verified(opened: &Opened, json: bool) -> io::Result<i32> {
    let code = match opened.chain.as_ref().map(|c| c.verdict) {
        Some(Verdict::Broken) => 1,
        Some(Verdict::PredatesChain) => 2,
        _ => 0,
    };
    let mut out = io::stdout().lock();
    if json {
        let value = serde_json::json!({
            "verified": code == 0,
            "signer": opened.signer,
            "manifest": opened.manifest,
            "chain": opened.chain,
        });
        serde_json::to_writer_pretty(&mut out, &value)?;
        writeln!(out)?;
        return Ok(code);
    }
    let m = &opened.manifest;
    writeln!(
        out,
        "bundle of sandbox {}, exported {}: signature valid, by {}",
        shown(&m.sandbox),
        shown(&m.exported_at),
        opened.signer
    )?;
    writeln!(out, "  {} members, each matching its SHA-256 in the signed manifest", m.members.len())?;
    for note in &m.notes {
        writeln!(out, "  note: {}", printable(note.as_bytes()))?;
    }
    match &opened.chain {
        Some(chain) => render_chain("  its audit log", chain, &mut out)?,
        None => writeln!(out, "  it holds no audit log")?,
    }
    writeln!(
        out,
        "  (the signature says which key signed it; compare {} with `airlock audit key` on the host it came \
         from, or pass --key)",
        opened.signer
    )?;
    Ok(code)
}

/// Before a bundle's timeline, on stderr: whose it is and that it checked.
pub fn bundle_header(opened: &Opened, json: bool) {
    if json {
        return;
    }
    let chain = match opened.chain.as_ref().map(|c| c.verdict) {
        Some(Verdict::Intact) => "its audit chain is intact",
        Some(Verdict::Broken) => "its audit chain is NOT intact (airlock audit verify --bundle says where)",
        Some(Verdict::PredatesChain) => "its audit log predates the chain",
        None => "it holds no audit log",
    };
    eprintln!(
        "airlock: bundle of sandbox {}, exported {}, signed by {}; {chain}",
        shown(&opened.manifest.sandbox),
        shown(&opened.manifest.exported_at),
        opened.signer
    );
}

/// A bundle refused or found changed: said, exit code 1.
pub fn bundle_refused(err: &BundleError, json: bool) -> io::Result<i32> {
    if json {
        let mut out = io::stdout().lock();
        let kind = if matches!(err, BundleError::Refused { .. }) { "refused" } else { "tampered" };
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({ "verified": false, kind: err.to_string() }),
        )?;
        writeln!(out)?;
    } else {
        eprintln!("airlock: {}", printable(err.to_string().as_bytes()));
    }
    Ok(1)
}

/// What `airlock export` wrote.
pub fn exported(report: &ExportReport) {
    println!(
        "exported {} ({} members, {} bytes before compression), signed by {}",
        report.path.display(),
        report.members,
        report.bytes,
        report.host_key
    );
    for note in &report.notes {
        eprintln!("airlock: note: {}", printable(note.as_bytes()));
    }
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

/// `airlock inspect`, whether the runtime or a daemon answered: JSON as it
/// came, or the view (and what a daemon adds) as lines.
pub fn inspect<T: serde::Serialize>(
    item: &T,
    view: &SandboxView,
    facts: &DaemonFacts,
    json: bool,
) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, item)?;
        return writeln!(out);
    }
    render_inspect(view, facts, &mut out)
}

fn render_inspect(v: &SandboxView, facts: &DaemonFacts, out: &mut dyn Write) -> io::Result<()> {
    let opt = |v: &Option<String>| v.as_deref().map_or("-".to_owned(), shown);
    writeln!(out, "name:       {}", shown(&v.name))?;
    let lost = if v.lost { " (supervisor lost)" } else { "" };
    writeln!(out, "state:      {}{lost}", v.state.as_str())?;
    writeln!(out, "policy:     {}", shown(&v.policy))?;
    writeln!(out, "workspace:  {} ({})", opt(&v.workspace), opt(&v.workspace_mode))?;
    if let Some(image) = &v.image {
        writeln!(out, "image:      {} ({})", printable(image.reference.as_bytes()), image.digest)?;
    }
    writeln!(out, "created:    {}", shown(&v.created_at))?;
    if let Some(f) = &v.finished_at {
        writeln!(out, "finished:   {}", shown(f))?;
    }
    let detail = v.detail.clone().unwrap_or_default();
    if let Some(d) = &detail.deadline {
        writeln!(out, "deadline:   {}", shown(d))?;
    }
    if let Some(idle) = detail.idle_timeout_secs {
        writeln!(out, "idle after: {idle}s")?;
    }
    if !facts.labels.is_empty() {
        let labels: Vec<String> =
            facts.labels.iter().map(|(k, v)| format!("{}={}", shown(k), shown(v))).collect();
        writeln!(out, "labels:     {}", labels.join(", "))?;
    }
    if !detail.degraded.is_empty() {
        let degraded: Vec<String> = detail.degraded.iter().map(|d| shown(d)).collect();
        writeln!(out, "running without: {}", degraded.join(", "))?;
    }
    if let Some(e) = &v.exit {
        let summary = exit_summary(e.code.map(i64::from), e.signal.map(i64::from), e.timed_out, e.oom_killed);
        writeln!(out, "exit:       {summary}")?;
    }
    if let Some(pid) = detail.supervisor_pid {
        writeln!(out, "supervisor: pid {pid}")?;
    }
    if let Some(total) = facts.execs_total {
        writeln!(out, "execs:      {total} ({} running)", facts.execs_running.unwrap_or(0))?;
    }
    Ok(())
}

/// Where a sandbox's captured output goes (`airlock logs`): the bytes as
/// they are into a pipe or a file (or with `--raw`), made [`printable`] at
/// a terminal. A character split across two writes is held back until it is
/// whole, so it is not escaped as if it were broken.
pub struct SandboxOutput<W: Write = io::Stdout> {
    out: W,
    escape: bool,
    pending: Vec<u8>,
}

impl SandboxOutput {
    pub fn stdout(raw: bool) -> SandboxOutput {
        let out = io::stdout();
        let escape = !raw && out.is_terminal();
        SandboxOutput { out, escape, pending: Vec::new() }
    }
}

impl<W: Write> SandboxOutput<W> {
    /// Where the incomplete UTF-8 sequence at the end of `bytes` starts, if
    /// it ends with the beginning of a multibyte character.
    fn incomplete_tail(bytes: &[u8]) -> usize {
        for back in 1..=bytes.len().min(3) {
            let at = bytes.len() - back;
            let b = bytes[at];
            if b & 0xC0 == 0x80 {
                continue;
            }
            let needs = match b {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF4 => 4,
                _ => return bytes.len(),
            };
            return if back < needs { at } else { bytes.len() };
        }
        bytes.len()
    }
}

impl<W: Write> Write for SandboxOutput<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if !self.escape {
            return self.out.write(data);
        }
        self.pending.extend_from_slice(data);
        let whole = Self::incomplete_tail(&self.pending);
        let text = printable(&self.pending[..whole]);
        self.out.write_all(text.as_bytes())?;
        self.pending.drain(..whole);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            let text = printable(&std::mem::take(&mut self.pending));
            self.out.write_all(text.as_bytes())?;
        }
        self.out.flush()
    }
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
    fn sandbox_output_is_escaped_for_a_terminal_across_writes() {
        let mut out = SandboxOutput { out: Vec::new(), escape: true, pending: Vec::new() };
        let text = "ok \u{2713}\n\x1b[2Jfake\rline\n".as_bytes();
        // One byte at a time: the check mark is split over three writes.
        for byte in text {
            out.write_all(std::slice::from_ref(byte)).unwrap();
        }
        out.flush().unwrap();
        assert_eq!(String::from_utf8(out.out).unwrap(), "ok \u{2713}\n\\033[2Jfake\\rline\n");
        // A sequence that never completes is escaped at the end.
        let mut out = SandboxOutput { out: Vec::new(), escape: true, pending: Vec::new() };
        out.write_all(b"x\xe2\x9c").unwrap();
        out.flush().unwrap();
        assert_eq!(String::from_utf8(out.out).unwrap(), "x\\342\\234");
        let mut raw = SandboxOutput { out: Vec::new(), escape: false, pending: Vec::new() };
        raw.write_all(b"\x1b[31m").unwrap();
        assert_eq!(raw.out, b"\x1b[31m");
    }

    #[test]
    fn net_log_lines_cannot_be_forged() {
        let hostile = "evil.example.com\x1b[2K\r2024-01-01T00:00:00Z allow http  bank.example.com:443\n";
        let line = format!("{} {}", shown(hostile), shown("GET"));
        assert!(!line.contains('\n') && !line.contains('\r') && !line.contains('\x1b'), "{line:?}");
        assert!(line.starts_with('"'), "an odd value is quoted: {line}");
    }

    #[test]
    fn timeline_lines_escape_what_a_sandbox_chose_and_keep_arguments_apart() {
        let event = serde_json::json!({
            "event": "exec_started", "id": 1, "pid": 9,
            "argv": ["sh", "-c", "echo a b", "\u{1b}]0;owned\u{7}\n{\"seq\":9}", "x\u{202e}y", ""],
        });
        let line = event_summary("exec_started", &event);
        for raw in ['\n', '\r', '\x1b', '\x07', '\u{202e}'] {
            assert!(!line.contains(raw), "{raw:?} in {line:?}");
        }
        assert!(line.contains(r#"sh -c "echo a b" "\033]0;owned\007\n{\"seq\":9}""#), "{line}");
        assert!(line.ends_with(r#""x\342\200\256y" """#), "{line}");
        // A path that is not UTF-8, and an event kind this airlock does not
        // know: shown field by field, escaped all the same.
        let path = serde_json::json!({ "non_utf8_hex": "61ff0a62" });
        assert_eq!(token(Some(&path)), r#""a\377\nb""#);
        let unknown = serde_json::json!({ "event": "from_the_future", "name": "a\u{1b}[2Jb" });
        assert_eq!(event_summary("from_the_future", &unknown), r#"name="a\033[2Jb""#);
    }

    /// The exec trace's records as lines: what the process claimed,
    /// escaped; a PATH miss, an end with or without its status, a flood.
    #[test]
    fn exec_trace_records_read_as_lines_with_what_a_process_claimed_escaped() {
        let exec = serde_json::json!({
            "event": "process_exec", "pid": 7, "ppid": 6, "syscall": "execveat",
            "path": {"non_utf8_hex": "2f746d702fff"}, "cwd": "/w s",
            "argv": ["x", "\u{1b}[2J\nforged", {"non_utf8_hex": "fffe"}, "two words"], "argc": 4,
        });
        let line = event_summary("process_exec", &exec);
        assert_eq!(
            line,
            r#"pid 7 (parent 6) "/tmp/\377": x "\033[2J\nforged" "\377\376" "two words" in "/w s" [execveat]"#
        );
        let miss = serde_json::json!({
            "event": "process_exec", "pid": 7, "ppid": 6, "syscall": "execve",
            "path": "/usr/local/bin/git", "argv": ["git"], "no_such_file": true,
        });
        assert_eq!(
            event_summary("process_exec", &miss),
            "pid 7 (parent 6) /usr/local/bin/git (no such file)"
        );
        let exit = serde_json::json!({"event": "process_exit", "pid": 7, "code": 3, "signal": null, "duration_ms": 12});
        assert_eq!(event_summary("process_exit", &exit), "pid 7 code 3 after 12 ms");
        let guest = serde_json::json!({
            "event": "process_exec", "pid": 9, "ppid": 1, "syscall": "execve",
            "path": "/bin/sh", "argv": ["sh"], "cwd": "/", "reported_by": "guest",
        });
        assert_eq!(
            event_summary("process_exec", &guest),
            "pid 9 (parent 1) /bin/sh: sh in / (reported by the guest)"
        );
        let lost = serde_json::json!({
            "event": "process_exit", "pid": 7, "code": null, "signal": null, "duration_ms": 1,
            "unknown": "reaped\u{1b}"
        });
        assert_eq!(event_summary("process_exit", &lost), r#"pid 7 status unknown: "reaped\033" after 1 ms"#);
        let flood = serde_json::json!({
            "event": "process_exec_summary", "from": "a", "until": "b", "execs": 900,
            "programs": [{"path": "/bin/true", "count": 899}], "other": 1, "itemized_per_second": 200, "lost": 0,
        });
        assert_eq!(
            event_summary("process_exec_summary", &flood),
            "900 more execs from a to b, beyond 200 a second, counted: /bin/true ×899, 1 others"
        );
    }

    #[test]
    fn ls_and_inspect_escape_what_a_sandbox_chose_whoever_answered() {
        let hostile = "x\x1b[2J\rforged\n";
        // As a daemon's answer reads back: the one view plus its facts.
        let answer = serde_json::json!({
            "name": hostile, "state": "failed", "lost": true, "policy": hostile,
            "workspace": hostile, "workspace_mode": "none", "created_at": hostile,
            "started_at": null, "finished_at": hostile,
            "exit": {"code": null, "signal": 9, "timed_out": false, "oom_killed": false},
            "degraded": [hostile], "owner_uid": 0, "labels": {hostile: hostile},
            "execs_total": 2, "execs_running": 0
        });
        let view: SandboxView = serde_json::from_value(answer.clone()).unwrap();
        let facts: DaemonFacts = serde_json::from_value(answer).unwrap();
        let mut out = Vec::new();
        render_list(std::slice::from_ref(&view), &mut out).unwrap();
        render_inspect(&view, &facts, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains('\x1b') && !text.contains('\r') && !text.contains("\nforged"), "{text:?}");
        assert!(text.contains(" lost ") && text.contains(" 137 "), "lost and 128+signal: {text}");
        assert!(text.contains("state:      failed (supervisor lost)"), "{text}");
        assert!(text.contains("execs:      2 (0 running)"), "{text}");
        assert_eq!(text.lines().count(), 2 + 10, "one line per row and field: {text}");
    }

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
                hierarchies: Default::default(),
            },
            landlock_abi: if landlock { Ok(3) } else { Err(38) },
        })
    }

    /// A host like the development machine: KVM there runs only guests
    /// built for its hypervisor.
    fn nested_kvm() -> MicrovmReport {
        MicrovmReport {
            engine: airlock_vm::engine::EngineReport {
                qemu: Some("/usr/bin/qemu-system-x86_64".into()),
                kvm: airlock_vm::engine::Kvm::Unusable { reason: "printed nothing within 5 s".into() },
                trial_ms: 5000,
            },
            kernel: Some("6.1.0-57-amd64".into()),
            cache: None,
            guest: None,
        }
    }

    #[test]
    fn doctor_shows_what_the_plan_decides() {
        let dev = airlock_policy::Policy::builtin("dev").unwrap();
        for (root, cgroups, landlock) in
            [(true, true, true), (false, false, true), (false, true, false), (true, false, false)]
        {
            let report = report(root, cgroups, landlock);
            let microvm = nested_kvm();
            let mut text = Vec::new();
            render_doctor(&report, &microvm, &mut text).unwrap();
            let text = String::from_utf8(text).unwrap();
            let json = doctor_json(&report, &microvm).unwrap();
            // The microVM engine's case, its fix, and what it means for policies.
            assert!(
                text.contains("[MISSING] kvm") && text.contains("cannot run an ordinary guest"),
                "{text}"
            );
            assert!(text.contains("microvm tier: runs only under software emulation"), "{text}");
            assert_eq!(json["microvm"]["engine"]["kvm"]["state"], "unusable", "{json}");
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
