//! The page itself: the template, its style and its script.
//!
//! Every value from the input goes through maud's `(…)` splices, which
//! escape it for HTML text or a double-quoted attribute; `PreEscaped`
//! appears only for this file's own constants (the style and the script).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use base64::Engine;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::Value;

use crate::events::{self, Tone};
use crate::highlight::{self, LineKind};
use crate::text::{bytes, millis, time_of_day, value_text, visible};
use crate::tree::Tree;
use crate::{
    DiffSection, FileChange, FileContent, MAX_BULK_ROWS, MAX_NETWORK_ROWS, MAX_PROCESSES, ReportInput,
};

/// Deepest indentation the tree draws; deeper processes say their depth.
const MAX_INDENT: usize = 24;

const BASE_CSS: &str = r#"
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg2: #f6f8fa;
  --good: #1a7f37; --bad: #cf222e; --warn: #9a6700; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); }
header.top { padding: 16px 24px 8px; border-bottom: 1px solid var(--line); background: var(--bg2); }
h1 { margin: 0 0 8px; font-size: 22px; }
h2 { margin: 28px 0 10px; font-size: 18px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
main { padding: 0 24px 24px; }
nav a { margin-right: 16px; }
a { color: #0969da; text-decoration: none; }
a:hover { text-decoration: underline; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0 0 8px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 16px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 150px; }
.card .big { font-size: 22px; font-weight: 600; }
.card .small { color: var(--muted); }
.notice { border: 1px solid var(--warn); background: #fff8c5; border-radius: 6px; padding: 8px 12px; margin: 12px 0; }
.notice.bad { border-color: var(--bad); background: #ffebe9; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: 3px 8px; border-bottom: 1px solid var(--line); }
th { background: var(--bg2); position: sticky; top: 0; }
td.num, th.num { text-align: right; white-space: nowrap; }
td.nowrap { white-space: nowrap; }
.mono, td.what, pre, code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px; }
td.what { overflow-wrap: anywhere; }
tr.good td.tone, span.good { color: var(--good); }
tr.bad td.tone, span.bad { color: var(--bad); }
tr.warn td.tone, span.warn { color: var(--warn); }
tr.bad td.what { color: var(--bad); }
tr.warn td.what { color: var(--warn); }
details.raw summary { color: var(--muted); cursor: pointer; font-size: 12px; }
details.raw pre { margin: 4px 0; white-space: pre-wrap; overflow-wrap: anywhere; background: var(--bg2); padding: 6px; }
#filters { display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center; margin: 8px 0; }
#filters label { white-space: nowrap; }
#filters input[type=search] { min-width: 240px; padding: 3px 6px; }
.count { color: var(--muted); }
td.proc { white-space: pre-wrap; overflow-wrap: anywhere; }
td.proc .guide { color: var(--line); }
.depth { color: var(--muted); font-size: 11px; }
.file { border: 1px solid var(--line); border-radius: 6px; margin: 12px 0; }
.file > summary { background: var(--bg2); padding: 6px 10px; cursor: pointer; overflow-wrap: anywhere; }
.file .why { padding: 6px 10px; color: var(--muted); }
pre.diff { margin: 0; padding: 4px 0; overflow-x: auto; }
pre.diff span.l { display: block; padding: 0 10px; white-space: pre-wrap; overflow-wrap: anywhere; }
span.l.add { background: #e6ffec; }
span.l.del { background: #ffebe9; }
span.l.hunk { background: #ddf4ff; color: var(--muted); }
span.l.hdr { color: var(--muted); font-weight: 600; }
span.k { color: #cf222e; }
span.s { color: #0a3069; }
span.c { color: #6e7781; font-style: italic; }
span.n { color: #0550ae; }
pre.policy { background: var(--bg2); padding: 10px; overflow-x: auto; border-radius: 6px; }
footer { color: var(--muted); padding: 16px 24px; border-top: 1px solid var(--line); font-size: 12px; }
"#;

/// The page's only script: filters the timeline by kind and by text. It
/// reads `data-kind` attributes and row text, writes `hidden` and one
/// count, and keeps the chosen kinds in the address's fragment
/// (`#kinds=exec_started,network`) so a view can be linked or reloaded.
const SCRIPT: &str = r##"
(function () {
  "use strict";
  var doc = document;
  var bar = doc.getElementById("filters");
  var boxes = [].slice.call(bar.querySelectorAll("input[data-kind]"));
  var rows = [].slice.call(doc.querySelectorAll("#timeline-rows > tr"));
  var search = doc.getElementById("search");
  var count = doc.getElementById("shown-count");
  function kindOf(el) { return el.getAttribute("data-kind"); }
  function apply() {
    var on = {};
    boxes.forEach(function (b) { on[kindOf(b)] = b.checked; });
    var needle = search.value.trim().toLowerCase();
    var shown = 0;
    rows.forEach(function (r) {
      var show = on[kindOf(r)] !== false &&
        (needle === "" || r.textContent.toLowerCase().indexOf(needle) !== -1);
      r.hidden = !show;
      if (show) { shown += 1; }
    });
    count.textContent = String(shown);
  }
  function readHash() {
    var m = /(?:^#|&)kinds=([^&]*)/.exec(window.location.hash);
    if (!m) { return; }
    var kinds = decodeURIComponent(m[1]).split(",");
    boxes.forEach(function (b) { b.checked = kinds.indexOf(kindOf(b)) !== -1; });
  }
  function writeHash() {
    var on = boxes.filter(function (b) { return b.checked; }).map(kindOf);
    var hash = on.length === boxes.length ? "" : "#kinds=" + encodeURIComponent(on.join(","));
    try {
      window.history.replaceState(null, "", hash === "" ? window.location.pathname + window.location.search : hash);
    } catch (e) {
      /* Some browsers refuse this for a page opened from a file; the filter works all the same. */
    }
  }
  function setAll(value) {
    boxes.forEach(function (b) { b.checked = value; });
    writeHash();
    apply();
  }
  boxes.forEach(function (b) { b.addEventListener("change", function () { writeHash(); apply(); }); });
  doc.getElementById("kinds-all").addEventListener("click", function () { setAll(true); });
  doc.getElementById("kinds-none").addEventListener("click", function () { setAll(false); });
  search.addEventListener("input", apply);
  window.addEventListener("hashchange", function () { readHash(); apply(); });
  readHash();
  apply();
  bar.hidden = false;
  doc.documentElement.setAttribute("data-ready", "1");
}());
"##;

/// The style: the constant part and one indentation rule per tree depth.
fn css() -> &'static str {
    static CSS: OnceLock<String> = OnceLock::new();
    CSS.get_or_init(|| {
        let mut css = BASE_CSS.to_owned();
        for d in 0..=MAX_INDENT {
            css.push_str(&format!("td.proc.d{d} {{ padding-left: {}em; }}\n", 0.5 + 1.25 * d as f64));
        }
        css
    })
}

fn sha256_source(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(digest.as_ref()))
}

/// Nothing may load; only this page's own style and script may apply.
pub(crate) fn csp() -> String {
    format!(
        "default-src 'none'; script-src {}; style-src {}; base-uri 'none'; form-action 'none'",
        sha256_source(SCRIPT),
        sha256_source(css())
    )
}

pub(crate) fn render(input: &ReportInput) -> String {
    let s = &input.sandbox;
    let net: Vec<&Value> = input.events.iter().filter(|v| events::kind(v) == "network").collect();
    let allowed = net.iter().filter(|v| v.get("allowed").and_then(Value::as_bool) == Some(true)).count();
    let denied = net.len() - allowed;
    let tree = Tree::build(&input.events, MAX_PROCESSES);
    let processes = tree.len() + tree.omitted;
    let (files_changed, lines_added, lines_removed) = match &input.diff {
        DiffSection::Changes { files, .. } => (
            files.iter().filter(|f| f.entry != "dir").count(),
            files.iter().filter_map(|f| f.lines_added).sum::<u64>(),
            files.iter().filter_map(|f| f.lines_removed).sum::<u64>(),
        ),
        DiffSection::Unavailable(_) => (0, 0, 0),
    };
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="Content-Security-Policy" content=(csp());
                meta name="referrer" content="no-referrer";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "airlock report: " (s.name) }
                style { (PreEscaped(css())) }
            }
            body {
                header.top {
                    h1 { "Sandbox " span.mono { (s.name) } }
                    (facts(input))
                    @for problem in &input.problems {
                        p.notice.bad { (problem) }
                    }
                    @if !s.degraded.is_empty() {
                        p.notice {
                            "This sandbox ran without: " (s.degraded.join(", "))
                            " (the policy allowed running weaker on this host)."
                        }
                    }
                    nav {
                        a href="#timeline" { "Timeline (" (input.events.len()) ")" }
                        a href="#processes" { "Processes (" (processes) ")" }
                        a href="#changes" { "Changes (" (files_changed) ")" }
                        a href="#network" { "Network (" (net.len()) ")" }
                        a href="#policy" { "Limits and policy" }
                    }
                }
                main {
                    div.cards {
                        div.card { div.big { (input.events.len()) } div.small { "audit events" } }
                        div.card { div.big { (processes) } div.small { "processes" } }
                        div.card {
                            div.big { (files_changed) }
                            div.small { "files changed, +" (lines_added) " −" (lines_removed) " lines" }
                        }
                        div.card {
                            div.big { span.good { (allowed) } " / " span.bad { (denied) } }
                            div.small { "connections allowed / denied" }
                        }
                    }
                    (timeline(&input.events))
                    (process_tree(&tree))
                    (changes(&input.diff))
                    (network(&net, allowed, denied))
                    (policy(input))
                }
                footer {
                    "Made by " (input.generator) " at " (input.generated_at) ". "
                    "Arguments, paths, host names and file contents on this page were written by the sandbox: "
                    "they are shown as text, with control characters made visible, and never run."
                }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    };
    page.into_string()
}

fn facts(input: &ReportInput) -> Markup {
    let s = &input.sandbox;
    html! {
        dl.facts {
            dt { "state" } dd { (s.state) }
            dt { "policy" } dd { (s.policy) }
            dt { "tier" } dd { (s.tier) }
            dt { "workspace" } dd {
                @match &s.workspace {
                    Some(w) => { span.mono { (w) } " (" (s.workspace_mode.as_deref().unwrap_or("-")) ")" }
                    None => { "none" }
                }
            }
            dt { "created" } dd { (s.created_at) }
            @if let Some(t) = &s.started_at { dt { "started" } dd { (t) } }
            @if let Some(t) = &s.finished_at { dt { "finished" } dd { (t) } }
            @if let Some(exit) = &s.exit { dt { "command" } dd { (exit) } }
        }
    }
}

/// Events a sandbox causes in numbers; the rest mark its life.
fn is_bulk(v: &Value) -> bool {
    events::kind(v) == "network" || v.get("pid").is_some() || v.get("argv").is_some() || v.get("id").is_some()
}

fn timeline(all: &[Value]) -> Markup {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for v in all {
        *counts.entry(events::kind(v)).or_default() += 1;
    }
    let mut bulk_shown = 0usize;
    let mut left_out = 0usize;
    let shown: Vec<&Value> = all
        .iter()
        .filter(|v| {
            if !is_bulk(v) {
                return true;
            }
            bulk_shown += 1;
            let keep = bulk_shown <= MAX_BULK_ROWS;
            left_out += usize::from(!keep);
            keep
        })
        .collect();
    html! {
        section #timeline {
            h2 { "Timeline" }
            p {
                "Every event of the sandbox's audit log, oldest first. Times are UTC."
            }
            @if left_out > 0 {
                p.notice {
                    (left_out) " network and process events after the first " (MAX_BULK_ROWS)
                    " are not on this page; the audit log itself has them."
                }
            }
            div #filters hidden {
                strong { "Show:" }
                @for (kind, n) in &counts {
                    label {
                        input type="checkbox" checked data-kind=(kind);
                        " " (kind) " " span.count { "(" (n) ")" }
                    }
                }
                button #kinds-all type="button" { "all" }
                button #kinds-none type="button" { "none" }
                input #search type="search" placeholder="filter by text" aria-label="filter by text";
                span.count { span #shown-count { (shown.len()) } " shown" }
            }
            table {
                thead { tr { th.num { "#" } th { "time" } th { "kind" } th { "what happened" } } }
                tbody #timeline-rows {
                    @for v in &shown {
                        @let (text, tone) = events::summary(v);
                        @let id = events::seq(v).map(|n| format!("ev-{n}"));
                        tr id=[id] class=(tone.class()) data-kind=(events::kind(v)) {
                            td.num { (events::seq(v).map(|n| n.to_string()).unwrap_or_default()) }
                            td.nowrap title=(events::ts(v)) { (time_of_day(&events::ts(v))) }
                            td.tone.nowrap { (events::kind(v)) }
                            td.what {
                                (text)
                                details.raw {
                                    summary { "event" }
                                    pre { (pretty(v)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// An event as indented JSON, made visible (JSON escapes control
/// characters already; bidi controls and the like it leaves as they are).
fn pretty(v: &Value) -> String {
    visible(&serde_json::to_string_pretty(v).unwrap_or_default())
}

fn process_tree(tree: &Tree) -> Markup {
    let rows = tree.rows();
    html! {
        section #processes {
            h2 { "Processes" }
            p {
                "Each process the log records, under the one that started it; a program that replaced "
                "its process's program (exec) is shown under the one it replaced. "
                "Arguments, directories and paths are what the process claimed when it ran."
            }
            @if tree.omitted > 0 {
                p.notice { (tree.omitted) " more processes are not in this tree (it shows the first " (MAX_PROCESSES) ")." }
            }
            @if rows.is_empty() {
                p { "No processes were recorded." }
            } @else {
                table.tree {
                    thead { tr {
                        th { "process" } th.num { "pid" } th { "event" } th { "started" } th { "ended" } th.num { "ran for" }
                    } }
                    tbody {
                        @for (depth, process) in &rows {
                            @let indent = (*depth).min(MAX_INDENT);
                            tr {
                                td class=(format!("proc mono d{indent}")) {
                                    @if *depth > 0 { span.guide { "└ " } }
                                    @if *depth > MAX_INDENT { span.depth { "[depth " (depth) "] " } }
                                    @match process.seq {
                                        Some(n) => { a href=(format!("#ev-{n}")) { (process.command) } }
                                        None => { (process.command) }
                                    }
                                    @if let Some(cwd) = &process.cwd { " " span.depth { "in " (cwd) } }
                                    @if let Some(path) = &process.path { " " span.depth { "(" (path) ")" } }
                                }
                                td.num { (process.pid.map(|n| n.to_string()).unwrap_or_default()) }
                                td.nowrap { (process.kind) }
                                td.nowrap title=(process.ts) { (time_of_day(&process.ts)) }
                                td.nowrap {
                                    @match &process.ended {
                                        Some((how, true)) => span.good { (how) },
                                        Some((how, false)) => span.bad { (how) },
                                        None => span.count { "not recorded" },
                                    }
                                }
                                td.num { (process.duration_ms.map(millis).unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn changes(diff: &DiffSection) -> Markup {
    html! {
        section #changes {
            h2 { "Workspace changes" }
            @match diff {
                DiffSection::Unavailable(why) => p { (why) },
                DiffSection::Changes { files, digest } => {
                    @if files.is_empty() {
                        p { "The sandbox changed nothing in its workspace." }
                    } @else {
                        p { "What " code { "airlock apply" } " would write, as " code { "airlock diff" } " shows it: change " code { (digest) } "." }
                        table {
                            thead { tr { th { "path" } th { "change" } th.num { "+" } th.num { "−" } } }
                            tbody {
                                @for (i, f) in files.iter().enumerate() {
                                    tr {
                                        td.mono { a href=(format!("#file-{i}")) { (f.path) } }
                                        td { (f.kind) " " (f.entry) @if f.binary { " (binary)" } }
                                        td.num { span.good { (f.lines_added.map(|n| n.to_string()).unwrap_or_default()) } }
                                        td.num { span.bad { (f.lines_removed.map(|n| n.to_string()).unwrap_or_default()) } }
                                    }
                                }
                            }
                        }
                        @for (i, f) in files.iter().enumerate() {
                            (file_diff(i, f))
                        }
                    }
                }
            }
        }
    }
}

fn file_diff(i: usize, f: &FileChange) -> Markup {
    let lang = highlight::language(&f.path);
    html! {
        details.file id=(format!("file-{i}")) open {
            summary.mono { (f.path) " — " (f.kind) " " (f.entry) }
            @match &f.content {
                FileContent::Shown(text) => {
                    pre.diff { code {
                        @for (kind, sign, code) in highlight::classify(text) {
                            @if kind == LineKind::Header || kind == LineKind::Hunk {
                                span class=(format!("l {}", kind.class())) { (sign) }
                            } @else {
                                span class=(format!("l {}", kind.class())) {
                                    (sign)
                                    @match lang {
                                        Some(lang) => {
                                            @for (token, piece) in highlight::tokens(lang, code) {
                                                @match token.class() {
                                                    Some(class) => span class=(class) { (piece) },
                                                    None => (piece),
                                                }
                                            }
                                        }
                                        None => (code),
                                    }
                                }
                            }
                        }
                    } }
                }
                FileContent::NotShown(why) => div.why { (why) },
                FileContent::Empty => div.why { "Nothing to show for a " (f.entry) "." },
            }
        }
    }
}

fn network(net: &[&Value], allowed: usize, denied: usize) -> Markup {
    // rule → (allowed, denied)
    let mut rules: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for v in net {
        let rule = events::field(v, "rule").unwrap_or_else(|| "-".to_owned());
        let entry = rules.entry(rule).or_default();
        if v.get("allowed").and_then(Value::as_bool) == Some(true) {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
    }
    let mut rules: Vec<(String, (usize, usize))> = rules.into_iter().collect();
    rules.sort_by(|a, b| (b.1.0 + b.1.1).cmp(&(a.1.0 + a.1.1)).then_with(|| a.0.cmp(&b.0)));
    html! {
        section #network {
            h2 { "Network" }
            @if net.is_empty() {
                p { "The sandbox made no connection and no request through airlock's egress proxy." }
            } @else {
                p {
                    "Every connection and request the egress proxy decided: "
                    span.good { (allowed) " allowed" } ", " span.bad { (denied) " denied" } "."
                }
                h3 { "Rules that decided" }
                table {
                    thead { tr { th { "rule" } th.num { "allowed" } th.num { "denied" } } }
                    tbody {
                        @for (rule, (a, d)) in &rules {
                            tr { td.what { (rule) } td.num { (a) } td.num { (d) } }
                        }
                    }
                }
                h3 { "Connections and requests" }
                @if net.len() > MAX_NETWORK_ROWS {
                    p.notice { "The first " (MAX_NETWORK_ROWS) " of " (net.len()) " are shown; the audit log has all of them." }
                }
                table #network-rows {
                    thead { tr {
                        th.num { "#" } th { "time" } th { "decision" } th { "via" } th { "destination" }
                        th { "request" } th { "handling" } th { "rule" } th.num { "out" } th.num { "in" } th.num { "took" }
                    } }
                    tbody {
                        @for v in net.iter().take(MAX_NETWORK_ROWS) {
                            @let ok = v.get("allowed").and_then(Value::as_bool) == Some(true);
                            tr class=(if ok { Tone::Good.class() } else { Tone::Bad.class() }) {
                                td.num {
                                    @if let Some(n) = events::seq(v) { a href=(format!("#ev-{n}")) { (n) } }
                                }
                                td.nowrap title=(events::ts(v)) { (time_of_day(&events::ts(v))) }
                                td.tone { @if ok { "allowed" } @else { "denied" } }
                                td { (events::field(v, "via").unwrap_or_default()) }
                                td.what {
                                    (events::destination(v))
                                    @if let Some(address) = events::field(v, "address") { br; span.count { "→ " (address) } }
                                    @if let Some(dest) = events::field(v, "destination") { br; span.count { "asked for " (dest) } }
                                }
                                td.what {
                                    (events::field(v, "method").unwrap_or_default()) " " (events::field(v, "path").unwrap_or_default())
                                    @if let Some(secrets) = v.get("secrets").and_then(Value::as_array).filter(|s| !s.is_empty()) {
                                        br; span.count { "secrets: " (secrets.iter().map(value_text).collect::<Vec<_>>().join(", ")) }
                                    }
                                }
                                td { (events::field(v, "handling").unwrap_or_default()) }
                                td.what { (events::field(v, "rule").unwrap_or_default()) }
                                td.num { (v.get("bytes_out").and_then(Value::as_u64).map(bytes).unwrap_or_default()) }
                                td.num { (v.get("bytes_in").and_then(Value::as_u64).map(bytes).unwrap_or_default()) }
                                td.num { (v.get("duration_ms").and_then(Value::as_u64).map(millis).unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn policy(input: &ReportInput) -> Markup {
    html! {
        section #policy {
            h2 { "Limits and policy" }
            @match &input.policy {
                None => p { "The sandbox's policy could not be read." },
                Some(policy) => {
                    table.limits {
                        thead { tr { th { "limit" } th { "value" } } }
                        tbody {
                            @for (name, value) in &policy.limits { tr { td { (name) } td.mono { (value) } } }
                        }
                    }
                    @if !input.sandbox.degraded.is_empty() {
                        p.notice { "Not enforced on this host: " (input.sandbox.degraded.join(", ")) "." }
                    }
                    h3 { "Resolved policy" }
                    pre.policy { (policy.toml) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;
    use crate::{PolicySection, SandboxFacts};

    const HOSTILE: &str = "<script>alert(1)</script>";

    fn input() -> ReportInput {
        let evil = |s: &str| format!("{s}{HOSTILE}\"'><img src=x onerror=alert(2)>");
        ReportInput {
            sandbox: SandboxFacts {
                name: "demo".into(),
                state: "stopped".into(),
                policy: "dev".into(),
                tier: "process".into(),
                workspace: Some(evil("/w/")),
                workspace_mode: Some("overlay".into()),
                created_at: "2026-01-01T00:00:00.000Z".into(),
                exit: Some("exit 0".into()),
                degraded: vec!["cgroups".into()],
                ..SandboxFacts::default()
            },
            events: vec![
                json!({"ts": "2026-01-01T00:00:00.000Z", "seq": 1, "event": "created", "policy": "dev"}),
                json!({"ts": "2026-01-01T00:00:01.000Z", "seq": 2, "event": "exec_started", "id": 1,
                       "argv": ["sh", "-c", evil("echo ")], "pid": 4}),
                json!({"ts": "2026-01-01T00:00:02.000Z", "seq": 3, "event": "network", "via": "http",
                       "host": evil("h"), "port": 80, "method": "GET", "path": evil("/"), "allowed": false,
                       "rule": evil("no allow entry matches "), "handling": "refused", "bytes_out": 0,
                       "bytes_in": 0, "duration_ms": 0, "secrets": []}),
                json!({"ts": "2026-01-01T00:00:03.000Z", "seq": 4, "event": evil("future_"), "x": evil("")}),
            ],
            problems: vec![evil("line 9: ")],
            diff: DiffSection::Changes {
                files: vec![FileChange {
                    path: format!("{HOSTILE}.txt"),
                    kind: "added".into(),
                    entry: "file".into(),
                    lines_added: Some(1),
                    lines_removed: Some(0),
                    binary: false,
                    content: FileContent::Shown(format!(
                        "diff --git a/{HOSTILE}.txt b/{HOSTILE}.txt\n@@ -0,0 +1 @@\n+{}\n",
                        evil("")
                    )),
                }],
                digest: "sha256:00".into(),
            },
            policy: Some(PolicySection {
                limits: vec![("memory".into(), "2 GiB".into())],
                toml: evil("name = \"x\" # "),
            }),
            generated_at: "2026-01-01T00:01:00.000Z".into(),
            generator: "airlock test".into(),
        }
    }

    /// The elements of a page as maud writes it (every value quoted, and
    /// `"` in values escaped): each one's name and attributes.
    fn tags(html: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut out = Vec::new();
        for piece in html.split('<').skip(1) {
            let mut rest = piece;
            let name: String = rest.chars().take_while(|c| !c.is_whitespace() && *c != '>').collect();
            rest = &rest[name.len()..];
            let mut attributes = Vec::new();
            loop {
                rest = rest.trim_start();
                if rest.is_empty() || rest.starts_with('>') {
                    break;
                }
                let attribute: String =
                    rest.chars().take_while(|c| !c.is_whitespace() && !"=>".contains(*c)).collect();
                rest = &rest[attribute.len()..];
                let mut value = String::new();
                if let Some(quoted) = rest.strip_prefix("=\"") {
                    let end = quoted.find('"').unwrap();
                    value = quoted[..end].to_owned();
                    rest = &quoted[end + 1..];
                }
                attributes.push((attribute, value));
            }
            out.push((name, attributes));
        }
        out
    }

    #[test]
    fn hostile_strings_are_text_and_the_only_script_is_ours() {
        let html = render(&input());
        assert_eq!(html.matches("<script").count(), 1, "one script element, the page's own");
        // Every element and attribute is the page's own: none came from the input.
        for (name, attributes) in tags(&html) {
            assert!(!["img", "iframe", "object", "embed", "svg"].contains(&name.as_str()), "<{name}>");
            for (attribute, _) in attributes {
                assert!(!attribute.starts_with("on"), "<{name} {attribute}>");
            }
        }
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;.txt"));
        // Every place a value lands: facts, problems, timeline (and its raw
        // event), filters, processes, diff, network, policy.
        let escaped = "&lt;img src=x onerror=alert(2)&gt;";
        assert!(html.matches(escaped).count() >= 10, "{}", html.matches(escaped).count());
        // An unknown kind is in the filters and the timeline.
        assert!(html.contains("data-kind=\"future_&lt;script&gt;"), "{html}");
    }

    #[test]
    fn the_page_allows_exactly_its_own_style_and_script() {
        let html = render(&input());
        let inner = |open: &str, close: &str| {
            let start = html.find(open).unwrap() + open.len();
            let end = start + html[start..].find(close).unwrap();
            html[start..end].to_owned()
        };
        let policy = csp();
        assert!(policy.starts_with("default-src 'none';"), "{policy}");
        assert!(policy.contains(&format!("script-src {};", sha256_source(&inner("<script>", "</script>")))));
        assert!(policy.contains(&format!("style-src {};", sha256_source(&inner("<style>", "</style>")))));
        assert!(
            html.contains(&format!("<meta http-equiv=\"Content-Security-Policy\" content=\"{policy}\">"))
        );
        // Nothing to fetch: no source, and links only within the page.
        for (name, attributes) in tags(&html) {
            for (attribute, value) in attributes {
                assert!(
                    !["src", "srcset", "action", "poster", "data"].contains(&attribute.as_str()),
                    "<{name} {attribute}>"
                );
                assert!(attribute != "href" || value.starts_with('#'), "<{name} href={value}>");
            }
        }
        assert!(!css().contains("url("));
    }

    #[test]
    fn the_timeline_caps_bulk_events_but_keeps_the_sandboxs_life() {
        let mut input = input();
        input.events = (0..MAX_BULK_ROWS + 5)
            .map(|i| json!({"seq": i + 1, "event": "network", "host": "h", "port": 1, "allowed": true}))
            .collect();
        input.events.push(json!({"seq": MAX_BULK_ROWS + 6, "event": "removed", "reason": "done"}));
        let html = render(&input);
        assert!(html.contains("5 network and process events after the first 10000"), "cap notice");
        assert!(html.contains(&format!("id=\"ev-{}\"", MAX_BULK_ROWS + 6)), "the last lifecycle event");
        assert!(!html.contains(&format!("id=\"ev-{}\"", MAX_BULK_ROWS + 1)));
    }
}
