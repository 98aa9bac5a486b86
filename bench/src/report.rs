//! The printed report: tables of medians, p90 and ratios, peak memory, and
//! each target beside the number it judges.

use std::time::Duration;

use crate::egress::Route;
use crate::measure::Stats;
use crate::{EgressResults, Outcome, Results};

/// airlock's startup may take at most this many times bubblewrap's median.
pub const MAX_RATIO_VS_BWRAP: f64 = 3.0;
/// …and must stay well under this, in absolute terms.
pub const STARTUP_BUDGET: Duration = Duration::from_millis(50);
/// diff(large)/diff(small) at or below this counts as "close to 1": the time
/// does not grow with the tree.
pub const MAX_DIFF_GROWTH: f64 = 1.5;
/// A download through a CONNECT tunnel must reach at least this share of the
/// direct download's throughput.
pub const MIN_TUNNEL_SHARE: f64 = 0.80;
/// A transparent connection is relayed as a CONNECT tunnel is: its download
/// must reach the tunnel's, less what runs of one case vary by here.
pub const MIN_TRANSPARENT_SHARE: f64 = 0.95;
/// The proxy may add at most this much to the median time of a request.
pub const MAX_ADDED_LATENCY: Duration = Duration::from_millis(1);

pub struct Verdict {
    pub all_met: bool,
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// 1000 → "1k", 100000 → "100k", 1234 → "1234".
pub fn count(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) { format!("{}k", n / 1000) } else { n.to_string() }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn ratio(a: Duration, b: Duration) -> Option<f64> {
    let b = b.as_secs_f64();
    (b > 0.0).then(|| a.as_secs_f64() / b)
}

fn ratio_cell(ours: &Outcome, peer: &Outcome) -> String {
    match (ours.summary(), peer.summary()) {
        (Some(a), Some(b)) => ratio(a.median, b.median).map_or_else(|| "-".into(), |r| format!("{r:.2}x")),
        _ => "-".into(),
    }
}

pub const LABEL_W: usize = 52;

pub fn time_row(
    label: &str,
    outcome: &Outcome,
    vs_bwrap: String,
    vs_runc: String,
    problems: &mut Vec<String>,
) {
    let f = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
    match outcome {
        Outcome::Measured(s) => println!(
            "  {label:<LABEL_W$} {:>8} {:>8} {:>8} {:>8} {vs_bwrap:>8} {vs_runc:>8}",
            f(s.median),
            f(s.p90),
            f(s.min),
            f(s.max)
        ),
        Outcome::Skipped(why) => println!("  {label:<LABEL_W$} skipped: {why}"),
        Outcome::Failed(why) => {
            println!("  {label:<LABEL_W$} FAILED (see below)");
            problems.push(format!("{label}: {why}"));
        }
    }
}

pub fn time_header(first: &str, ratios: bool) {
    let (b, r) = if ratios { ("×bwrap", "×runc") } else { ("", "") };
    println!("  {first:<LABEL_W$} {:>8} {:>8} {:>8} {:>8} {b:>8} {r:>8}", "median", "p90", "min", "max");
}

/// Prints the whole report to stdout and says whether every target was met.
pub fn print(r: &Results) -> Verdict {
    let mut problems = Vec::new();
    println!();
    println!("airlock-bench");
    for line in &r.header {
        println!("  {line}");
    }

    let sections = r.opts.sections;
    if sections.startup {
        print_startup(r, &mut problems);
    }
    let growth = if sections.diff { print_diff(r, &mut problems) } else { None };
    let egress = r.egress.as_ref().map(|e| print_egress(e, &r.opts, &mut problems));
    if let Some(d) = &r.daemon {
        crate::daemon::print(d, &mut problems);
    }
    if let Some(m) = &r.microvm {
        crate::microvm::print(m, &mut problems);
    }
    if let Some(c) = &r.containers {
        crate::containers::print(c, &mut problems);
    }
    if let Some(x) = &r.exectrace {
        crate::exectrace::print(x, &mut problems);
    }
    if let Some(x) = &r.images {
        crate::images::print(x, &mut problems);
    }
    if let Some(e) = &r.e2b {
        crate::e2b::print(e, &mut problems);
    }

    println!();
    println!("== targets");
    let mut all_met = true;
    let mut target = |met: Option<bool>, text: String| {
        let tag = match met {
            Some(true) => "[met]   ",
            Some(false) => {
                all_met = false;
                "[MISSED]"
            }
            None => {
                all_met = false;
                "[n/a]   "
            }
        };
        println!("  {tag} {text}");
    };
    if sections.startup {
        startup_targets(r, &mut target);
    }
    if sections.diff {
        let (small_label, large_label) = diff_labels(r);
        match growth {
            Some(g) => target(
                Some(g <= MAX_DIFF_GROWTH),
                format!(
                    "diff --stat time does not grow with the tree: {large_label} / {small_label} = {g:.2} \
                     (close to 1: ≤ {MAX_DIFF_GROWTH})"
                ),
            ),
            None => target(None, "diff --stat growth: not measured".into()),
        }
    }
    if let Some(e) = &egress {
        egress_targets(e, &mut target);
    }
    if let Some(d) = &r.daemon {
        if d.skipped.is_some() {
            target(None, "daemon targets: the daemon did not start".into());
        } else {
            crate::daemon::targets(d, &mut target);
        }
    }
    if let Some(m) = &r.microvm {
        crate::microvm::targets(m, &mut target);
    }
    if let Some(c) = &r.containers {
        crate::containers::targets(c, &mut target);
    }
    if let Some(x) = &r.exectrace {
        crate::exectrace::targets(x, &mut target);
    }
    if let Some(x) = &r.images {
        crate::images::targets(x, &mut target);
    }
    if let Some(e) = &r.e2b {
        crate::e2b::targets(e, &mut target);
    }

    if !r.notes.is_empty() || !problems.is_empty() {
        println!();
        println!("== notes");
        for n in &r.notes {
            println!("  {n}");
        }
        for p in &problems {
            println!("  FAILED {p}");
        }
    }
    Verdict { all_met }
}

fn print_startup(r: &Results, problems: &mut Vec<String>) {
    println!();
    println!("== startup: one sandbox runs /bin/true; wall time from spawn to reap, ms");
    println!("   (×bwrap, ×runc: airlock's median divided by that peer's, same workspace setup)");
    time_header("without a workspace", true);
    time_row(
        "airlock run --rm --mode none -- /bin/true",
        &r.airlock_none,
        ratio_cell(&r.airlock_none, &r.bwrap_none),
        ratio_cell(&r.airlock_none, &r.runc_none),
        problems,
    );
    time_row(
        "bwrap --ro-bind / / --unshare-all /bin/true",
        &r.bwrap_none,
        String::new(),
        String::new(),
        problems,
    );
    time_row("runc run (minimal rootfs) /bin/true", &r.runc_none, String::new(), String::new(), problems);
    println!("  with a {}-file workspace", count(r.opts.workspace_files));
    time_row(
        "airlock run --rm (overlay) -- /bin/true",
        &r.airlock_ws,
        ratio_cell(&r.airlock_ws, &r.bwrap_ws),
        ratio_cell(&r.airlock_ws, &r.runc_ws),
        problems,
    );
    time_row(
        "bwrap … --bind WORKSPACE WORKSPACE /bin/true",
        &r.bwrap_ws,
        String::new(),
        String::new(),
        problems,
    );
    time_row(
        "runc run + bind mount of WORKSPACE /bin/true",
        &r.runc_ws,
        String::new(),
        String::new(),
        problems,
    );

    println!();
    println!("== peak memory: ru_maxrss of the reaped child from wait4, MiB (median over runs, max)");
    println!("  {:<LABEL_W$} {:>8} {:>8} {:>8}", "", "median", "max", "×bwrap");
    let mem_rows: [(&str, &Outcome, Option<&Outcome>); 6] = [
        ("airlock run --rm --mode none -- /bin/true", &r.airlock_none, Some(&r.bwrap_none)),
        ("airlock run --rm (overlay) -- /bin/true", &r.airlock_ws, Some(&r.bwrap_ws)),
        ("bwrap (no workspace)", &r.bwrap_none, None),
        ("bwrap --bind WORKSPACE", &r.bwrap_ws, None),
        ("runc run (minimal rootfs)", &r.runc_none, None),
        ("runc run + bind mount", &r.runc_ws, None),
    ];
    for (label, outcome, peer) in mem_rows {
        let Some(s) = outcome.summary() else {
            println!("  {label:<LABEL_W$} -");
            continue;
        };
        let vs =
            peer.and_then(Outcome::summary).filter(|p| p.rss_median_kib > 0).map_or_else(String::new, |p| {
                format!("{:.2}x", s.rss_median_kib as f64 / p.rss_median_kib as f64)
            });
        println!("  {label:<LABEL_W$} {:>8} {:>8} {vs:>8}", mib(s.rss_median_kib), mib(s.rss_max_kib));
    }
    println!("  note: Linux reports the largest single process among the child and the descendants");
    println!("  reaped beneath it, not a sum. For airlock that is in practice the supervisor (the");
    println!("  `airlock` process itself); the sandboxed processes are not added on top, and neither");
    println!("  is kernel memory (namespaces, mounts, page cache).");
}

fn diff_labels(r: &Results) -> (String, String) {
    (format!("{} files", count(r.opts.diff_small)), format!("{} files", count(r.opts.diff_large)))
}

/// Prints the diff table; returns diff(large) / diff(small) of the medians.
fn print_diff(r: &Results, problems: &mut Vec<String>) -> Option<f64> {
    println!();
    println!("== airlock diff NAME --stat, on a sandbox that appended to 10 files; ms");
    time_header("workspace size", false);
    let (small_label, large_label) = diff_labels(r);
    time_row(&small_label, &r.diff_small, String::new(), String::new(), problems);
    time_row(&large_label, &r.diff_large, String::new(), String::new(), problems);
    let growth = match (r.diff_small.summary(), r.diff_large.summary()) {
        (Some(s), Some(l)) => ratio(l.median, s.median),
        _ => None,
    };
    if let Some(g) = growth {
        println!("  ratio {large_label} / {small_label} (medians): {g:.2}");
    }
    for line in &r.diff_stats {
        println!("  stat of the {line}");
    }
    growth
}

fn startup_targets(r: &Results, target: &mut impl FnMut(Option<bool>, String)) {
    for (what, ours, peer) in [
        ("airlock run --mode none", &r.airlock_none, &r.bwrap_none),
        ("airlock run (overlay workspace)", &r.airlock_ws, &r.bwrap_ws),
    ] {
        match (ours.summary(), peer.summary()) {
            (Some(a), Some(b)) => {
                let limit = b.median.mul_f64(MAX_RATIO_VS_BWRAP);
                target(
                    Some(a.median <= limit),
                    format!(
                        "{what}: median {} within {MAX_RATIO_VS_BWRAP}x of bwrap's {} (limit {})",
                        ms(a.median),
                        ms(b.median),
                        ms(limit)
                    ),
                );
            }
            _ => target(None, format!("{what} within {MAX_RATIO_VS_BWRAP}x of bwrap: not measured")),
        }
        match ours.summary() {
            Some(a) => target(
                Some(a.median < STARTUP_BUDGET),
                format!(
                    "{what}: median {} well under {} ({:.0}% of it)",
                    ms(a.median),
                    ms(STARTUP_BUDGET),
                    100.0 * a.median.as_secs_f64() / STARTUP_BUDGET.as_secs_f64()
                ),
            ),
            None => target(None, format!("{what} under {}: not measured", ms(STARTUP_BUDGET))),
        }
    }
}

/// The egress medians the targets judge, per route.
struct EgressMedians {
    /// MiB/s.
    download: Vec<(Route, Option<f64>)>,
    /// Seconds per request.
    latency: Vec<(Route, Option<f64>)>,
}

fn median_of(rows: &[(Route, Option<f64>)], route: Route) -> Option<f64> {
    rows.iter().find(|(r, _)| *r == route).and_then(|(_, m)| *m)
}

fn print_egress(e: &EgressResults, opts: &crate::Options, problems: &mut Vec<String>) -> EgressMedians {
    let mut failed = |route: Route, what: &str, why: &str| {
        println!("  {:<LABEL_W$} FAILED (see below)", route.describe());
        problems.push(format!("egress {what}, {}: {why}", route.describe()));
    };

    println!();
    println!(
        "== egress: one {} MiB download from a server on 127.0.0.1; curl's speed_download, MiB/s",
        opts.download_mib
    );
    if let Some(why) = &e.skipped {
        println!("  skipped: {why} (and so is the small-request benchmark)");
        return EgressMedians { download: Vec::new(), latency: Vec::new() };
    }
    println!("  {:<LABEL_W$} {:>8} {:>8} {:>8} {:>8}", "", "median", "min", "max", "×direct");
    let stats: Vec<(Route, Option<Stats>)> =
        e.download.iter().map(|(route, r)| (*route, r.as_ref().ok().and_then(|v| Stats::of(v)))).collect();
    let direct = stats.iter().find(|(r, _)| *r == Route::Direct).and_then(|(_, s)| *s);
    let mut runs = 0;
    for ((route, result), (_, s)) in e.download.iter().zip(&stats) {
        match (result, s) {
            (Err(why), _) => failed(*route, "download", why),
            (Ok(_), None) => failed(*route, "download", "no samples"),
            (Ok(_), Some(s)) => {
                runs = runs.max(s.n);
                let vs = match (route, direct) {
                    (Route::Direct, _) | (_, None) => String::new(),
                    (_, Some(d)) => format!("{:.2}", s.median / d.median),
                };
                println!(
                    "  {:<LABEL_W$} {:>8.1} {:>8.1} {:>8.1} {vs:>8}",
                    route.describe(),
                    s.median,
                    s.min,
                    s.max
                );
            }
        }
    }
    println!("  ({runs} runs per route; ×direct: the median over the direct median)");
    let download = stats.iter().map(|(r, s)| (*r, s.map(|s| s.median))).collect();

    println!();
    println!(
        "== egress: {} small GETs per curl process, one connection (to the server, or to the proxy);",
        opts.egress_requests
    );
    println!("   curl's time_total per request, ms, over all requests of all runs");
    println!("  {:<LABEL_W$} {:>8} {:>8} {:>8} {:>8} {:>8}", "", "median", "p90", "min", "max", "added");
    let stats: Vec<(Route, Option<Stats>)> =
        e.latency.iter().map(|(route, r)| (*route, r.as_ref().ok().and_then(|v| Stats::of(v)))).collect();
    let direct = stats.iter().find(|(r, _)| *r == Route::Direct).and_then(|(_, s)| *s);
    let mut requests = 0;
    for ((route, result), (_, s)) in e.latency.iter().zip(&stats) {
        match (result, s) {
            (Err(why), _) => failed(*route, "requests", why),
            (Ok(_), None) => failed(*route, "requests", "no samples"),
            (Ok(_), Some(s)) => {
                requests = requests.max(s.n);
                let added = match (route, direct) {
                    (Route::Direct, _) | (_, None) => String::new(),
                    (_, Some(d)) => format!("{:+.3}", (s.median - d.median) * 1e3),
                };
                println!(
                    "  {:<LABEL_W$} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {added:>8}",
                    route.describe(),
                    s.median * 1e3,
                    s.p90 * 1e3,
                    s.min * 1e3,
                    s.max * 1e3
                );
            }
        }
    }
    println!("  ({requests} requests per route; added: the median minus the direct median)");
    let latency = stats.iter().map(|(r, s)| (*r, s.map(|s| s.median))).collect();
    EgressMedians { download, latency }
}

fn egress_targets(e: &EgressMedians, target: &mut impl FnMut(Option<bool>, String)) {
    let direct = median_of(&e.download, Route::Direct);
    match (median_of(&e.download, Route::Tunnel), direct) {
        (Some(t), Some(d)) if d > 0.0 => {
            let share = t / d;
            // What one bare relay reaches here bounds any proxy that copies
            // bytes: say it beside the verdict, which stays the target's.
            let ceiling = median_of(&e.download, Route::Relay).map_or(String::new(), |r| {
                format!("; a bare relay (socat) reaches {:.0}% of direct on this machine", r / d * 100.0)
            });
            target(
                Some(share >= MIN_TUNNEL_SHARE),
                format!(
                    "download through a CONNECT tunnel: {t:.0} MiB/s, {:.0}% of direct's {d:.0} MiB/s \
                     (≥ {:.0}%){ceiling}",
                    share * 100.0,
                    MIN_TUNNEL_SHARE * 100.0
                ),
            );
        }
        _ => target(None, "download through a CONNECT tunnel vs direct: not measured".into()),
    }
    // A redirected connection is relayed as a tunnel is: it should cost no
    // more (within what runs of the same case vary by here).
    match (median_of(&e.download, Route::Transparent), median_of(&e.download, Route::Tunnel)) {
        (Some(t), Some(c)) if c > 0.0 => target(
            Some(t >= c * MIN_TRANSPARENT_SHARE),
            format!(
                "download through a transparent connection: {t:.0} MiB/s, {:.0}% of the CONNECT tunnel's {c:.0} MiB/s (≥ {:.0}%)",
                t / c * 100.0,
                MIN_TRANSPARENT_SHARE * 100.0
            ),
        ),
        _ => target(None, "download through a transparent connection vs the tunnel: not measured".into()),
    }
    let limit_ms = MAX_ADDED_LATENCY.as_secs_f64() * 1e3;
    let direct = median_of(&e.latency, Route::Direct);
    for (route, what) in [
        (Route::Tunnel, "a CONNECT tunnel"),
        (Route::Plain, "plain HTTP proxying"),
        (Route::Transparent, "a transparent connection"),
    ] {
        match (median_of(&e.latency, route), direct) {
            (Some(p), Some(d)) => {
                let added = p - d;
                target(
                    Some(added <= MAX_ADDED_LATENCY.as_secs_f64()),
                    format!(
                        "request latency through {what}: median {:.3} ms, {:+.3} ms over direct's \
                         {:.3} ms (≤ {limit_ms} ms added)",
                        p * 1e3,
                        added * 1e3,
                        d * 1e3
                    ),
                );
            }
            _ => target(None, format!("request latency through {what} vs direct: not measured")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_as_people_write_them() {
        assert_eq!(count(1000), "1k");
        assert_eq!(count(100_000), "100k");
        assert_eq!(count(1234), "1234");
        assert_eq!(count(10), "10");
    }

    /// The transparent route is judged against the CONNECT tunnel's
    /// download, and its latency like the other proxied routes'.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_transparent_connection_is_held_to_the_tunnels_speed() {
        let judged = |transparent: f64| {
            let e = EgressMedians {
                download: vec![
                    (Route::Direct, Some(1000.0)),
                    (Route::Tunnel, Some(800.0)),
                    (Route::Transparent, Some(transparent)),
                ],
                latency: vec![
                    (Route::Direct, Some(0.0001)),
                    (Route::Tunnel, Some(0.0002)),
                    (Route::Transparent, Some(0.0003)),
                ],
            };
            let mut lines = Vec::new();
            egress_targets(&e, &mut |ok, line| lines.push((ok, line)));
            lines
        };
        let lines = judged(790.0);
        let (ok, line) = lines.iter().find(|(_, l)| l.contains("transparent connection:")).unwrap();
        assert_eq!(*ok, Some(true), "{line}");
        assert!(line.contains("99% of the CONNECT tunnel's 800 MiB/s"), "{line}");
        assert!(lines.iter().any(|(ok, l)| l.contains("latency through a transparent") && *ok == Some(true)));
        let lines = judged(700.0);
        let (ok, _) = lines.iter().find(|(_, l)| l.contains("transparent connection:")).unwrap();
        assert_eq!(*ok, Some(false));
    }

    #[test]
    fn ratio_of_zero_is_none() {
        assert_eq!(ratio(Duration::from_millis(3), Duration::ZERO), None);
        assert_eq!(ratio(Duration::from_millis(3), Duration::from_millis(2)), Some(1.5));
    }
}
