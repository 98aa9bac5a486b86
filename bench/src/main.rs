//! airlock-bench: how fast airlock starts a sandbox, how long `airlock diff`
//! takes as the workspace grows, how much memory a run needs, beside
//! bubblewrap and runc doing the same job; what the egress proxy costs a
//! download and a request against going direct; and how `airlock daemon`
//! creates, execs in and holds many sandboxes; and what a microVM sandbox
//! costs to boot, to exec in and to keep; and what recording every exec
//! costs a loop of execs; and how long a first image pull takes against
//! skopeo + umoci, and what a cached image adds to a sandbox's start; and
//! create → first output through E2B's Python SDK beside the native API.
//! See bench/README.md.

mod containers;
mod daemon;
mod e2b;
mod egress;
mod exectrace;
mod fixtures;
mod images;
mod measure;
mod microvm;
mod procmem;
mod report;

use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use measure::{Sample, Summary};

/// Everything that goes wrong here is reported as a sentence.
#[derive(Debug)]
pub struct BenchError(String);

impl BenchError {
    pub fn new(msg: impl Into<String>) -> BenchError {
        BenchError(msg.into())
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

const USAGE: &str = "\
usage: airlock-bench --airlock PATH [options]

Runs airlock's startup, diff and memory benchmarks, and the same startup with
bubblewrap and runc where they are installed, and the egress benchmarks
(a download and small requests through airlock's proxy and direct, with curl),
and the daemon benchmarks (create → first exec, exec round trip, concurrent
creates and memory per idle sandbox, against its own `airlock daemon`), and
the microVM benchmarks (boot to first exec, exec round trip, host memory per
idle VM, with KVM where it works and under emulation otherwise), the exec
trace's cost, the image benchmarks (first pull of a built ~100 MiB image
from a local registry against skopeo copy + umoci unpack, and a sandbox
start on the cached image against one on the host root), and create →
first output through E2B's Python SDK beside the native API's create →
first exec, against one daemon serving both; prints medians, p90 and ratios.

options:
  --airlock PATH       the airlock binary to measure (build it with --release)
  -n, --iterations N   timed runs per case (default 30)
  --warmup N           untimed runs before each case (default 3)
  --work-dir DIR       where trees and state directories go; every parent must
                       be o+x (default: $CARGO_TARGET_DIR/bench-work, else
                       bench-work beside the airlock binary's target directory)
  --workspace-files N  files in the startup benchmark's workspace (default 10000)
  --diff-small N       files in the small diff workspace (default 1000)
  --diff-large N       files in the large diff workspace (default 100000)
  --no-bwrap           skip bubblewrap even if installed
  --no-runc            skip runc even if installed
  --only LIST          run only these sections, comma-separated: startup, diff,
                       egress, daemon, microvm, containers, exectrace, images,
                       e2b (startup includes peak memory)
  --egress-runs N      timed runs per egress case (default 5)
  --egress-requests N  small requests per latency run (default 200)
  --download-mib N     size of the egress download in MiB (default 256)
  --daemon-execs N     execs of `true` per route in the daemon's round-trip
                       benchmark (default 200)
  --daemon-counts LIST sandboxes held at once by the daemon, comma-separated
                       (default 1,10,200)
  --vm-iterations N    timed rounds of the microVM boot cases, and guests of the
                       containers section (default 3)
  --vm-warmup N        untimed rounds (guests) before them (default 1)
  --vm-execs N         execs of `true` per route into a running microVM
                       (default 20)
  --vm-cache DIR       the guest cache (default: $AIRLOCK_VM_CACHE, else
                       vm-cache in the work directory, kept between runs)
  --exec-loop N        /bin/true execs per run of the exec trace's loop
                       (default 1000)
  --exec-iterations N  timed runs per exec trace case (default 10)
  --image-mib N        size of the image the images section builds, in MiB
                       (default 100)
  --pull-iterations N  timed first pulls per case (default 5; the start cases
                       use --iterations)
  --e2b-python PATH    a Python with e2b==2.64.0 installed, for the e2b
                       section (default: $CARGO_TARGET_DIR/bench-deps/py-e2b/
                       bin/python, else bench-deps beside the airlock binary's
                       target directory; bench/run.sh installs it there)
  --keep               keep the scratch directory afterwards
  --strict             exit 2 when a target is missed
  -h, --help           this text";

#[derive(Debug, Clone)]
pub struct Options {
    pub airlock: PathBuf,
    pub iterations: usize,
    pub warmup: usize,
    pub work_dir: Option<PathBuf>,
    pub workspace_files: usize,
    pub diff_small: usize,
    pub diff_large: usize,
    pub bwrap: bool,
    pub runc: bool,
    pub keep: bool,
    pub strict: bool,
    pub sections: Sections,
    pub egress_runs: usize,
    pub egress_requests: usize,
    pub download_mib: u64,
    pub daemon_execs: usize,
    pub daemon_counts: Vec<usize>,
    pub vm_iterations: usize,
    pub vm_warmup: usize,
    pub vm_execs: usize,
    pub vm_cache: Option<PathBuf>,
    pub exec_loop: usize,
    pub exec_iterations: usize,
    pub image_mib: u64,
    pub pull_iterations: usize,
    pub e2b_python: Option<PathBuf>,
}

/// Which groups of benchmarks to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sections {
    /// Startup and its peak memory.
    pub startup: bool,
    pub diff: bool,
    pub egress: bool,
    pub daemon: bool,
    pub microvm: bool,
    pub containers: bool,
    pub exectrace: bool,
    pub images: bool,
    pub e2b: bool,
}

impl Sections {
    const ALL: Sections = Sections {
        startup: true,
        diff: true,
        egress: true,
        daemon: true,
        microvm: true,
        containers: true,
        exectrace: true,
        images: true,
        e2b: true,
    };
    const NONE: Sections = Sections {
        startup: false,
        diff: false,
        egress: false,
        daemon: false,
        microvm: false,
        containers: false,
        exectrace: false,
        images: false,
        e2b: false,
    };

    fn parse(list: &str) -> Result<Sections, BenchError> {
        let mut s = Sections::NONE;
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "startup" | "memory" => s.startup = true,
                "diff" => s.diff = true,
                "egress" => s.egress = true,
                "daemon" => s.daemon = true,
                "microvm" => s.microvm = true,
                "containers" => s.containers = true,
                "exectrace" => s.exectrace = true,
                "images" => s.images = true,
                "e2b" => s.e2b = true,
                other => {
                    return Err(BenchError::new(format!(
                        "--only: unknown section {other:?} (startup, diff, egress, daemon, microvm, containers, exectrace, images, e2b)"
                    )));
                }
            }
        }
        if s == Sections::NONE {
            return Err(BenchError::new(
                "--only needs at least one section (startup, diff, egress, daemon, microvm, containers, exectrace, images, e2b)",
            ));
        }
        Ok(s)
    }
}

enum Parsed {
    Run(Box<Options>),
    Help,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Parsed, BenchError> {
    let mut airlock = None;
    let mut o = Options {
        airlock: PathBuf::new(),
        iterations: 30,
        warmup: 3,
        work_dir: None,
        workspace_files: 10_000,
        diff_small: 1_000,
        diff_large: 100_000,
        bwrap: true,
        runc: true,
        keep: false,
        strict: false,
        sections: Sections::ALL,
        egress_runs: 5,
        egress_requests: 200,
        download_mib: 256,
        daemon_execs: 200,
        daemon_counts: vec![1, 10, 200],
        vm_iterations: 3,
        vm_warmup: 1,
        vm_execs: 20,
        vm_cache: None,
        exec_loop: 1000,
        exec_iterations: 10,
        image_mib: 100,
        pull_iterations: 5,
        e2b_python: None,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, BenchError> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| BenchError::new(format!("{name} needs a value")))
        };
        let number = |name: &str, v: String, min: usize| -> Result<usize, BenchError> {
            match v.parse::<usize>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(BenchError::new(format!("{name}: expected a whole number ≥ {min}, got {v:?}"))),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--airlock" => airlock = Some(PathBuf::from(value("--airlock")?)),
            "-n" | "--iterations" => o.iterations = number("--iterations", value("--iterations")?, 1)?,
            "--warmup" => o.warmup = number("--warmup", value("--warmup")?, 0)?,
            "--work-dir" => o.work_dir = Some(PathBuf::from(value("--work-dir")?)),
            "--workspace-files" => {
                o.workspace_files = number("--workspace-files", value("--workspace-files")?, 1)?;
            }
            "--diff-small" => {
                o.diff_small = number("--diff-small", value("--diff-small")?, fixtures::TOUCHED)?;
            }
            "--diff-large" => {
                o.diff_large = number("--diff-large", value("--diff-large")?, fixtures::TOUCHED)?;
            }
            "--no-bwrap" => o.bwrap = false,
            "--no-runc" => o.runc = false,
            "--keep" => o.keep = true,
            "--strict" => o.strict = true,
            "--only" => o.sections = Sections::parse(&value("--only")?)?,
            "--egress-runs" => o.egress_runs = number("--egress-runs", value("--egress-runs")?, 1)?,
            "--egress-requests" => {
                o.egress_requests = number("--egress-requests", value("--egress-requests")?, 1)?;
            }
            "--download-mib" => {
                o.download_mib = number("--download-mib", value("--download-mib")?, 1)? as u64;
            }
            "--daemon-execs" => o.daemon_execs = number("--daemon-execs", value("--daemon-execs")?, 1)?,
            "--daemon-counts" => o.daemon_counts = daemon::parse_counts(&value("--daemon-counts")?)?,
            "--vm-iterations" => o.vm_iterations = number("--vm-iterations", value("--vm-iterations")?, 1)?,
            "--vm-warmup" => o.vm_warmup = number("--vm-warmup", value("--vm-warmup")?, 0)?,
            "--vm-execs" => o.vm_execs = number("--vm-execs", value("--vm-execs")?, 1)?,
            "--vm-cache" => o.vm_cache = Some(PathBuf::from(value("--vm-cache")?)),
            "--exec-loop" => o.exec_loop = number("--exec-loop", value("--exec-loop")?, 1)?,
            "--exec-iterations" => {
                o.exec_iterations = number("--exec-iterations", value("--exec-iterations")?, 1)?;
            }
            "--image-mib" => o.image_mib = number("--image-mib", value("--image-mib")?, 1)? as u64,
            "--pull-iterations" => {
                o.pull_iterations = number("--pull-iterations", value("--pull-iterations")?, 1)?;
            }
            "--e2b-python" => o.e2b_python = Some(PathBuf::from(value("--e2b-python")?)),
            other => return Err(BenchError::new(format!("unknown argument {other:?}; see --help"))),
        }
    }
    o.airlock = airlock.ok_or_else(|| BenchError::new("--airlock PATH is required; see --help"))?;
    Ok(Parsed::Run(Box::new(o)))
}

fn main() {
    let code = match parse_args(std::env::args().skip(1)) {
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            0
        }
        Ok(Parsed::Run(opts)) => match run(&opts) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("airlock-bench: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("airlock-bench: {e}");
            2
        }
    };
    std::process::exit(code);
}

/// One thing to measure: how to build its command for iteration `i`, and what
/// to tidy (untimed) after each run.
pub struct Case {
    pub label: String,
    make: Box<dyn Fn(usize) -> Command>,
    after: Option<Box<dyn Fn(usize)>>,
}

/// A case's outcome.
pub enum Outcome {
    Measured(Summary),
    Failed(String),
    Skipped(String),
}

impl Outcome {
    pub fn summary(&self) -> Option<&Summary> {
        match self {
            Outcome::Measured(s) => Some(s),
            _ => None,
        }
    }
}

/// A case to measure, or one whose outcome is already known (skipped, or
/// failed while being set up).
pub enum Slot {
    Run(Case),
    Done(Outcome),
}

/// Measures cases side by side: each gets `warmup` untimed runs with output
/// captured (so a failure is shown in full); then `iterations` rounds run
/// every case once, in turn, so that a burst of load elsewhere on the machine
/// lands on all of them alike rather than on whichever ran at the time. A
/// case that fails is dropped from later rounds.
fn measure_interleaved(slots: Vec<Slot>, opts: &Options) -> Vec<Outcome> {
    struct Live {
        case: Case,
        samples: Vec<Sample>,
        failed: Option<String>,
    }
    let mut live: Vec<Result<Live, Outcome>> = slots
        .into_iter()
        .map(|slot| match slot {
            Slot::Run(case) => Ok(Live { case, samples: Vec::with_capacity(opts.iterations), failed: None }),
            Slot::Done(outcome) => Err(outcome),
        })
        .collect();
    let run_once = |case: &Case, i: usize, warm: bool| -> Result<Option<Sample>, BenchError> {
        let r = if warm {
            measure::checked((case.make)(i), &case.label).map(|_| None)
        } else {
            measure::timed((case.make)(i), &case.label).map(Some)
        };
        if let Some(after) = &case.after {
            after(i);
        }
        r
    };
    for l in live.iter_mut().flatten() {
        eprint!("  warm-up  {:<52} ", l.case.label);
        for i in 0..opts.warmup {
            if let Err(e) = run_once(&l.case, i, true) {
                l.failed = Some(e.to_string());
                break;
            }
        }
        eprintln!("{}", if l.failed.is_some() { "FAILED" } else { "ok" });
    }
    let tty = std::io::stderr().is_terminal();
    if !tty {
        eprint!("  measure  {} rounds …", opts.iterations);
    }
    for round in 0..opts.iterations {
        if tty {
            eprint!("\r  measure  round {}/{}", round + 1, opts.iterations);
        }
        let i = opts.warmup + round;
        for l in live.iter_mut().flatten().filter(|l| l.failed.is_none()) {
            match run_once(&l.case, i, false) {
                Ok(Some(sample)) => l.samples.push(sample),
                Ok(None) => {}
                Err(e) => l.failed = Some(format!("timed run {}: {e}", round + 1)),
            }
        }
    }
    eprintln!("{}", if tty { "" } else { " done" });
    live.into_iter()
        .map(|slot| match slot {
            Err(outcome) => outcome,
            Ok(Live { failed: Some(why), .. }) => Outcome::Failed(why),
            Ok(Live { samples, .. }) => match Summary::of(&samples) {
                Some(s) => Outcome::Measured(s),
                None => Outcome::Failed("no samples".into()),
            },
        })
        .collect()
}

/// Results, keyed by what was measured.
pub struct Results {
    pub opts: Options,
    pub header: Vec<String>,
    pub notes: Vec<String>,
    pub airlock_none: Outcome,
    pub airlock_ws: Outcome,
    pub bwrap_none: Outcome,
    pub bwrap_ws: Outcome,
    pub runc_none: Outcome,
    pub runc_ws: Outcome,
    pub diff_small: Outcome,
    pub diff_large: Outcome,
    pub diff_stats: Vec<String>,
    /// None when the section was not selected.
    pub egress: Option<EgressResults>,
    /// None when the section was not selected.
    pub daemon: Option<daemon::DaemonResults>,
    /// None when the section was not selected.
    pub microvm: Option<microvm::MicrovmResults>,
    /// None when the section was not selected.
    pub containers: Option<containers::ContainersResults>,
    /// None when the section was not selected.
    pub exectrace: Option<exectrace::ExecTraceResults>,
    /// None when the section was not selected.
    pub images: Option<images::ImageResults>,
    pub e2b: Option<e2b::E2bResults>,
}

/// The egress section's outcome: per case, the pooled values of all timed
/// runs (MiB/s for downloads, seconds per request for latency), or why there
/// are none.
pub struct EgressResults {
    /// Why nothing was measured (no curl), if so.
    pub skipped: Option<String>,
    pub download: Vec<(egress::Route, Result<Vec<f64>, String>)>,
    pub latency: Vec<(egress::Route, Result<Vec<f64>, String>)>,
}

impl EgressResults {
    fn failed(&self) -> bool {
        self.download.iter().chain(&self.latency).any(|(_, r)| r.is_err())
    }
}

/// The startup group's six outcomes, in the order of [`Results`].
type StartupOutcomes = (Outcome, Outcome, Outcome, Outcome, Outcome, Outcome);

fn not_selected() -> Outcome {
    Outcome::Skipped("not selected (--only)".into())
}

fn run(opts: &Options) -> Result<i32, BenchError> {
    let airlock = std::fs::canonicalize(&opts.airlock)
        .map_err(|e| BenchError::new(format!("--airlock {}: {e}", opts.airlock.display())))?;
    let version = {
        let mut v = Command::new(&airlock);
        v.arg("--version");
        measure::checked(v, "airlock --version")?.trim().to_string()
    };

    let (work_root, mut notes) = fixtures::choose_work_root(opts.work_dir.as_deref(), &airlock)?;
    fixtures::make_dir_0755(&work_root)?;
    let scratch = work_root.join(format!("run-{}", std::process::id()));
    if scratch.exists() {
        return Err(BenchError::new(format!("{} already exists; remove it", scratch.display())));
    }
    fixtures::make_dir_0755(&scratch)?;

    let sections = opts.sections;
    let bwrap = if opts.bwrap && sections.startup { fixtures::find_in_path("bwrap") } else { None };
    let runc = if opts.runc && sections.startup { fixtures::find_in_path("runc") } else { None };
    let curl = if sections.egress { fixtures::find_in_path("curl") } else { None };
    let socat = if sections.egress { fixtures::find_in_path("socat") } else { None };
    let tinyproxy = if sections.egress { fixtures::find_in_path("tinyproxy") } else { None };
    let mut header = vec![format!("airlock:    {} ({version})", airlock.display())];
    if sections.startup {
        header.push(format!("bubblewrap: {}", peer_line(bwrap.as_deref(), opts.bwrap, "--version")));
        header.push(format!("runc:       {}", peer_line(runc.as_deref(), opts.runc, "--version")));
    }
    if sections.egress {
        header.push(format!("curl:       {}", peer_line(curl.as_deref(), true, "--version")));
        header.push(format!("socat:      {}", peer_line(socat.as_deref(), true, "-V")));
        header.push(format!("tinyproxy:  {}", peer_line(tinyproxy.as_deref(), true, "-v")));
    }
    header.push(format!(
        "host:       Linux {}, {} cores, {}",
        kernel(),
        cores(),
        if fixtures::is_root() { "root" } else { "not root" }
    ));
    if sections.startup || sections.diff {
        header.push(format!("runs:       {} timed after {} warm-up per case", opts.iterations, opts.warmup));
    }
    if sections.egress {
        header.push(format!(
            "egress:     {} timed runs after {} warm-up per case; {} MiB download, {} requests per latency run",
            opts.egress_runs, opts.warmup, opts.download_mib, opts.egress_requests
        ));
    }
    if sections.daemon {
        header.push(format!(
            "daemon:     {} create → first exec runs after {} warm-up; {} execs per route; {} sandboxes at once",
            opts.iterations,
            opts.warmup,
            opts.daemon_execs,
            opts.daemon_counts.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
        ));
    }
    // The guest cache outlives the run's scratch directory, so a guest is
    // built once per airlock build, not once per run.
    let vm_cache = opts
        .vm_cache
        .clone()
        .or_else(|| std::env::var_os("AIRLOCK_VM_CACHE").filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| work_root.join("vm-cache"));
    if sections.microvm {
        header.push(format!(
            "microvm:    {} boot rounds after {} warm-up; {} execs per route; guest cache {}",
            opts.vm_iterations,
            opts.vm_warmup,
            opts.vm_execs,
            vm_cache.display()
        ));
    }
    if sections.containers {
        header.push(format!(
            "containers: {} guests after {} warm-up, each: create --containers, /_ping, docker run --rm ×3; guest cache {}",
            opts.vm_iterations,
            opts.vm_warmup,
            vm_cache.display()
        ));
    }
    if sections != Sections::ALL {
        let names: Vec<&str> = [
            (sections.startup, "startup"),
            (sections.diff, "diff"),
            (sections.egress, "egress"),
            (sections.daemon, "daemon"),
            (sections.microvm, "microvm"),
            (sections.containers, "containers"),
            (sections.exectrace, "exectrace"),
            (sections.images, "images"),
            (sections.e2b, "e2b"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        header.push(format!("sections:   {} (--only)", names.join(", ")));
    }
    let e2b_python = opts
        .e2b_python
        .clone()
        .unwrap_or_else(|| e2b::default_python(std::env::var_os("CARGO_TARGET_DIR").as_deref(), &airlock));
    if sections.e2b {
        header.push(format!(
            "e2b:        {} create → first output runs per route after {} warm-up; SDK python {}",
            opts.iterations,
            opts.warmup,
            e2b_python.display()
        ));
    }
    header.push(format!("scratch:    {}", scratch.display()));

    let ws = scratch.join(format!("ws-{}", opts.workspace_files));
    let small = scratch.join(format!("diff-{}", opts.diff_small));
    let large = scratch.join(format!("diff-{}", opts.diff_large));
    if sections.startup || sections.diff {
        eprintln!("airlock-bench: building workspace trees in {}", scratch.display());
        let started = Instant::now();
        if sections.startup {
            fixtures::make_tree(&ws, opts.workspace_files)?;
        }
        if sections.diff {
            fixtures::make_tree(&small, opts.diff_small)?;
            fixtures::make_tree(&large, opts.diff_large)?;
        }
        // Write the new trees out now, so that their writeback does not compete
        // with the runs being timed.
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        header.push(format!("trees:      built and synced in {}", report::secs(started.elapsed())));
    }

    let idle_busy = cpu_busy(Duration::from_secs(1));
    if let Some(busy) = idle_busy {
        header.push(format!("cpu busy:   {busy:.0}% of all cores in the second before measuring"));
        if busy > 20.0 {
            notes.push(format!(
                "the machine was not idle ({busy:.0}% CPU busy before measuring): absolute times are noisier \
                 than on an idle machine; ratios suffer less, since the cases run interleaved"
            ));
        }
    }

    let (airlock_none, bwrap_none, runc_none, airlock_ws, bwrap_ws, runc_ws) = if sections.startup {
        startup(opts, &airlock, &scratch, &ws, bwrap.as_deref(), runc.as_deref(), &mut header, &mut notes)?
    } else {
        (not_selected(), not_selected(), not_selected(), not_selected(), not_selected(), not_selected())
    };

    let mut diff_stats = Vec::new();
    let (diff_small, diff_large) = if sections.diff {
        eprintln!("airlock-bench: diff");
        let state_diff = scratch.join("state-diff");
        let sizes = [(&small, opts.diff_small), (&large, opts.diff_large)];
        let slots = sizes
            .iter()
            .map(|(tree, files)| diff_slot(&airlock, &state_diff, tree, *files, &mut diff_stats))
            .collect();
        let mut diffs = measure_interleaved(slots, opts).into_iter();
        let mut next = || diffs.next().unwrap_or_else(|| Outcome::Failed("not measured".into()));
        let pair = (next(), next());
        for (_, files) in sizes {
            let mut rm = Command::new(&airlock);
            rm.env("AIRLOCK_STATE_DIR", &state_diff).args(["rm", &diff_name(files)]);
            if let Err(e) = measure::checked(rm, "airlock rm") {
                notes.push(format!("could not remove the diff sandbox: {e}"));
            }
        }
        pair
    } else {
        (not_selected(), not_selected())
    };

    let egress = if sections.egress {
        // The first sample was taken before the other sections ran: take another.
        if sections.startup || sections.diff {
            note_cpu_busy("egress", &mut header, &mut notes);
        }
        let tools =
            EgressTools { curl: curl.as_deref(), socat: socat.as_deref(), tinyproxy: tinyproxy.as_deref() };
        Some(egress_section(opts, &airlock, &scratch, tools, &mut notes)?)
    } else {
        None
    };

    let daemon = if sections.daemon {
        if sections.startup || sections.diff || sections.egress {
            note_cpu_busy("daemon", &mut header, &mut notes);
        }
        let plan = daemon::Plan {
            iterations: opts.iterations,
            warmup: opts.warmup,
            execs: opts.daemon_execs,
            counts: opts.daemon_counts.clone(),
        };
        Some(daemon::run(&airlock, &scratch.join("daemon"), &plan, &mut notes))
    } else {
        None
    };

    let microvm = if sections.microvm {
        if sections.startup || sections.diff || sections.egress || sections.daemon {
            note_cpu_busy("microvm", &mut header, &mut notes);
        }
        let plan = microvm::Plan {
            iterations: opts.vm_iterations,
            warmup: opts.vm_warmup,
            execs: opts.vm_execs,
            cache: vm_cache.clone(),
        };
        Some(microvm::run(&airlock, &scratch.join("microvm"), &plan, &mut notes))
    } else {
        None
    };

    let containers = if sections.containers {
        if sections.startup || sections.diff || sections.egress || sections.daemon || sections.microvm {
            note_cpu_busy("containers", &mut header, &mut notes);
        }
        let plan =
            containers::Plan { iterations: opts.vm_iterations, warmup: opts.vm_warmup, cache: vm_cache };
        Some(containers::run(&airlock, &scratch.join("containers"), &plan, &mut notes))
    } else {
        None
    };

    let exectrace = if sections.exectrace {
        if sections.startup
            || sections.diff
            || sections.egress
            || sections.daemon
            || sections.microvm
            || sections.containers
        {
            note_cpu_busy("exectrace", &mut header, &mut notes);
        }
        Some(exectrace::run(&airlock, &scratch.join("exectrace"), opts)?)
    } else {
        None
    };

    let images = if sections.images {
        if sections.startup
            || sections.diff
            || sections.egress
            || sections.daemon
            || sections.microvm
            || sections.containers
            || sections.exectrace
        {
            note_cpu_busy("images", &mut header, &mut notes);
        }
        let plan = images::Plan {
            image_mib: opts.image_mib,
            pull_iterations: opts.pull_iterations,
            warmup: opts.warmup,
            iterations: opts.iterations,
        };
        Some(images::run(&airlock, &scratch.join("images"), &plan, opts, &mut notes))
    } else {
        None
    };
    let e2b = if sections.e2b {
        if sections.startup
            || sections.diff
            || sections.egress
            || sections.daemon
            || sections.microvm
            || sections.containers
            || sections.exectrace
            || sections.images
        {
            note_cpu_busy("e2b", &mut header, &mut notes);
        }
        let plan = e2b::Plan { iterations: opts.iterations, warmup: opts.warmup, python: e2b_python };
        Some(e2b::run(&airlock, &scratch.join("e2b"), &plan, &mut notes))
    } else {
        None
    };

    let results = Results {
        opts: opts.clone(),
        header,
        notes,
        airlock_none,
        airlock_ws,
        bwrap_none,
        bwrap_ws,
        runc_none,
        runc_ws,
        diff_small,
        diff_large,
        diff_stats,
        egress,
        daemon,
        microvm,
        containers,
        exectrace,
        images,
        e2b,
    };
    let verdict = report::print(&results);

    if opts.keep {
        println!("\nkept {}", scratch.display());
    } else {
        cleanup(&scratch);
    }

    let airlock_failed =
        [&results.airlock_none, &results.airlock_ws, &results.diff_small, &results.diff_large]
            .iter()
            .any(|o| matches!(o, Outcome::Failed(_)))
            || results.egress.as_ref().is_some_and(EgressResults::failed)
            || results.daemon.as_ref().is_some_and(daemon::DaemonResults::failed)
            || results.microvm.as_ref().is_some_and(microvm::MicrovmResults::failed)
            || results.containers.as_ref().is_some_and(containers::ContainersResults::failed)
            || results.exectrace.as_ref().is_some_and(exectrace::ExecTraceResults::failed)
            || results.images.as_ref().is_some_and(images::ImageResults::failed)
            || results.e2b.as_ref().is_some_and(e2b::E2bResults::failed);
    Ok(if airlock_failed {
        1
    } else if opts.strict && !verdict.all_met {
        2
    } else {
        0
    })
}

/// The startup group: airlock, bubblewrap and runc, each without and with a
/// workspace, interleaved.
#[allow(clippy::too_many_arguments)]
fn startup(
    opts: &Options,
    airlock: &Path,
    scratch: &Path,
    ws: &Path,
    bwrap: Option<&Path>,
    runc: Option<&Path>,
    header: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Result<StartupOutcomes, BenchError> {
    eprintln!("airlock-bench: startup, {} cases interleaved", 6);
    let state_none = scratch.join("state-run-none");
    let state_ws = scratch.join("state-run-workspace");
    let peer = |found: Option<&Path>, wanted: bool, name: &str, make: &dyn Fn(&Path) -> Slot| match found {
        Some(p) => make(p),
        None => Slot::Done(skipped(wanted, name)),
    };
    let runc_root = scratch.join("runc-root");
    fixtures::make_dir_0755(&runc_root)?;
    let runc_case = |ws: Option<&Path>, tag: &'static str| match runc {
        Some(r) => runc_slot(r, &runc_root, &scratch.join(format!("bundle-{tag}")), ws, tag),
        None => (Slot::Done(skipped(opts.runc, "runc")), None),
    };
    let (runc_none, runc_ws) = (runc_case(None, "plain"), runc_case(Some(ws), "ws"));
    let slots = vec![
        Slot::Run(airlock_run_case(airlock, &state_none, scratch, None)),
        peer(bwrap, opts.bwrap, "bwrap", &|b| Slot::Run(bwrap_case(b, scratch, None))),
        runc_none.0,
        Slot::Run(airlock_run_case(airlock, &state_ws, scratch, Some(ws))),
        peer(bwrap, opts.bwrap, "bwrap", &|b| Slot::Run(bwrap_case(b, scratch, Some(ws)))),
        runc_ws.0,
    ];
    if let Some(kind) = runc_none.1 {
        header.push(format!("runc rootfs: {kind}"));
    }
    let mut startup = measure_interleaved(slots, opts).into_iter();
    let mut next = || startup.next().unwrap_or_else(|| Outcome::Failed("not measured".into()));
    let outcomes = (next(), next(), next(), next(), next(), next());
    for state in [&state_none, &state_ws] {
        let left = std::fs::read_dir(state).map(|d| d.count()).unwrap_or(0);
        if left > 0 {
            notes.push(format!("{left} entries left in {} after --rm runs", state.display()));
        }
    }
    Ok(outcomes)
}

/// The programs the egress section runs: the client, and the peers on the
/// host (None when not installed).
struct EgressTools<'a> {
    curl: Option<&'a Path>,
    socat: Option<&'a Path>,
    tinyproxy: Option<&'a Path>,
}

/// The egress group: a server on loopback, and the peers in front of it;
/// the download over each route, interleaved; then the small requests over
/// each route, interleaved.
fn egress_section(
    opts: &Options,
    airlock: &Path,
    scratch: &Path,
    tools: EgressTools,
    notes: &mut Vec<String>,
) -> Result<EgressResults, BenchError> {
    use egress::{EgressCase, Job};
    let Some(curl) = tools.curl else {
        return Ok(EgressResults {
            skipped: Some("curl is not installed".into()),
            download: Vec::new(),
            latency: Vec::new(),
        });
    };
    let bytes = opts
        .download_mib
        .checked_mul(1024 * 1024)
        .ok_or_else(|| BenchError::new(format!("--download-mib {} is too large", opts.download_mib)))?;
    let server = egress::Server::start(bytes)?;
    // A peer that does not start loses its rows, not the section.
    let mut peer = |started: Result<egress::PeerProcess, BenchError>| match started {
        Ok(p) => Some(p),
        Err(e) => {
            notes.push(format!("{e}: its egress rows are skipped"));
            None
        }
    };
    let relay = tools.socat.and_then(|s| peer(egress::start_relay(s, server.port())));
    let peer_proxy = tools.tinyproxy.and_then(|t| peer(egress::start_peer_proxy(t, scratch)));
    // Transparent egress needs a destination that is not the sandbox's own
    // loopback: the same server on an address added to the host's.
    let beside = if fixtures::is_root() {
        match egress::LoopbackAddress::add(egress::TRANSPARENT_ADDRESS)
            .and_then(|alias| Ok((egress::Server::start_on(egress::TRANSPARENT_ADDRESS, bytes)?, alias)))
        {
            Ok(pair) => Some(pair),
            Err(e) => {
                notes.push(format!("{e}: the transparent egress rows are skipped"));
                None
            }
        }
    } else {
        notes.push("not root: no address beside loopback, so the transparent egress rows are skipped".into());
        None
    };
    let ends = egress::Endpoints {
        curl: curl.to_path_buf(),
        server: server.port(),
        sandbox: egress::Sandbox {
            airlock: airlock.to_path_buf(),
            state: scratch.join("state-egress"),
            cwd: scratch.to_path_buf(),
        },
        relay: relay.as_ref().map(|p| p.port),
        peer_proxy: peer_proxy.as_ref().map(|p| p.port),
        transparent: beside.as_ref().map(|(s, _)| s.addr),
    };
    let routes = ends.routes();
    let group = |job: Job, what: &str| {
        eprintln!(
            "airlock-bench: egress, {what} on 127.0.0.1:{}, {} cases interleaved",
            server.port(),
            routes.len()
        );
        let cases: Vec<EgressCase> = routes.iter().map(|&route| EgressCase { route, job }).collect();
        let results = egress::measure(&cases, &ends, opts.warmup, opts.egress_runs);
        routes.iter().copied().zip(results).collect::<Vec<_>>()
    };
    let download = group(Job::Download { bytes }, &format!("{} MiB download", opts.download_mib));
    let latency = group(
        Job::Requests { requests: opts.egress_requests },
        &format!("{} small requests", opts.egress_requests),
    );
    // The server on the added address goes before the address.
    drop((relay, peer_proxy, server, beside));
    let state = &ends.sandbox.state;
    let left = std::fs::read_dir(state).map(|d| d.count()).unwrap_or(0);
    if left > 0 {
        notes.push(format!("{left} entries left in {} after --rm runs", state.display()));
    }
    Ok(EgressResults { skipped: None, download, latency })
}

fn skipped(wanted: bool, name: &str) -> Outcome {
    Outcome::Skipped(if wanted { format!("{name} is not installed") } else { format!("--no-{name}") })
}

fn peer_line(path: Option<&Path>, wanted: bool, version_flag: &str) -> String {
    match path {
        None if !wanted => "skipped (flag)".into(),
        None => "not installed: its rows are skipped".into(),
        Some(p) => {
            let mut c = Command::new(p);
            c.arg(version_flag);
            let v = measure::checked(c, "version").unwrap_or_default();
            // socat names its authors first: take its version line.
            let first = v.lines().find(|l| l.contains(" version ")).or_else(|| v.lines().next());
            let first = first.unwrap_or("version unknown");
            // curl's first line goes on to list its libraries: keep "curl 7.88.1".
            let first = first.split_once(" (").map_or(first, |(name, _)| name);
            let first = first.split_once(" on ").map_or(first, |(name, _)| name);
            format!("{} ({})", p.display(), first.trim())
        }
    }
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Samples how busy the CPUs are just before `section` runs (other
/// sections ran before it) and says so, with a note when it is too busy to
/// trust the numbers.
fn note_cpu_busy(section: &str, header: &mut Vec<String>, notes: &mut Vec<String>) {
    let Some(busy) = cpu_busy(Duration::from_secs(1)) else { return };
    header.push(format!("cpu busy:   {busy:.0}% of all cores in the second before the {section} section"));
    if busy > 20.0 {
        notes.push(format!(
            "the machine was not idle before the {section} section ({busy:.0}% CPU busy): its numbers are noisy"
        ));
    }
}

/// How busy the CPUs are over `window` while we sleep, in percent of all
/// cores, from /proc/stat; None where that cannot be read.
fn cpu_busy(window: Duration) -> Option<f64> {
    fn sample() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> =
            stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal …
        let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
        Some((fields.iter().take(8).sum(), idle))
    }
    let (total0, idle0) = sample()?;
    std::thread::sleep(window);
    let (total1, idle1) = sample()?;
    let total = total1.checked_sub(total0)?;
    let idle = idle1.checked_sub(idle0)?;
    (total > 0).then(|| 100.0 * total.saturating_sub(idle) as f64 / total as f64)
}

fn cores() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

fn airlock_run_case(airlock: &Path, state: &Path, cwd: &Path, workspace: Option<&Path>) -> Case {
    let (airlock, state, cwd) = (airlock.to_path_buf(), state.to_path_buf(), cwd.to_path_buf());
    let ws = workspace.map(Path::to_path_buf);
    let label = match &ws {
        None => "airlock run --rm --mode none -- /bin/true".to_string(),
        Some(_) => "airlock run --rm (overlay workspace) -- /bin/true".to_string(),
    };
    Case {
        label,
        make: Box::new(move |_| {
            let mut c = Command::new(&airlock);
            c.env("AIRLOCK_STATE_DIR", &state).current_dir(&cwd).args(["run", "--rm"]);
            match &ws {
                None => c.args(["--mode", "none"]),
                Some(ws) => c.args(["--mode", "overlay", "--workspace"]).arg(ws),
            };
            c.args(["--", "/bin/true"]);
            c
        }),
        after: None,
    }
}

fn bwrap_case(bwrap: &Path, cwd: &Path, workspace: Option<&Path>) -> Case {
    let (bwrap, cwd) = (bwrap.to_path_buf(), cwd.to_path_buf());
    let ws = workspace.map(Path::to_path_buf);
    let label = match &ws {
        None => "bwrap --ro-bind / / --unshare-all /bin/true".to_string(),
        Some(_) => "bwrap … --bind WORKSPACE WORKSPACE /bin/true".to_string(),
    };
    Case {
        label,
        make: Box::new(move |_| {
            let mut c = Command::new(&bwrap);
            c.current_dir(&cwd).args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]);
            if let Some(ws) = &ws {
                c.arg("--bind").arg(ws).arg(ws);
            }
            c.args(["--unshare-all", "--die-with-parent", "/bin/true"]);
            c
        }),
        after: None,
    }
}

/// A runc case, with its OCI bundle built in `bundle`; also says how the
/// bundle's root filesystem was made.
fn runc_slot(
    runc: &Path,
    root: &Path,
    bundle: &Path,
    workspace: Option<&Path>,
    tag: &'static str,
) -> (Slot, Option<fixtures::RootfsKind>) {
    let label = match workspace {
        None => "runc run (minimal rootfs) /bin/true".to_string(),
        Some(_) => "runc run + bind WORKSPACE /bin/true".to_string(),
    };
    let kind = match fixtures::make_runc_bundle(runc, bundle, workspace) {
        Ok(kind) => kind,
        Err(e) => {
            eprintln!("  setup    {label:<52} FAILED");
            return (Slot::Done(Outcome::Failed(format!("cannot build the OCI bundle: {e}"))), None);
        }
    };
    let id = move |i: usize| format!("airlock-bench-{}-{tag}-{i}", std::process::id());
    let (r1, root1, b1) = (runc.to_path_buf(), root.to_path_buf(), bundle.to_path_buf());
    let (r2, root2) = (runc.to_path_buf(), root.to_path_buf());
    let case = Case {
        label,
        make: Box::new(move |i| {
            let mut c = Command::new(&r1);
            c.arg("--root").arg(&root1).arg("run").arg("--bundle").arg(&b1).arg(id(i));
            c
        }),
        // `runc run` without --detach deletes the container when it exits;
        // this catches one left behind by a failed run.
        after: Some(Box::new(move |i| {
            let mut c = Command::new(&r2);
            c.arg("--root").arg(&root2).args(["delete", "--force"]).arg(id(i));
            c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
            let _ = c.status();
        })),
    };
    (Slot::Run(case), Some(kind))
}

fn diff_name(files: usize) -> String {
    format!("bench-diff-{files}")
}

/// Makes a sandbox over `tree` that appends to ten files, checks that
/// `airlock diff --stat` shows it, and returns the case that times that.
fn diff_slot(airlock: &Path, state: &Path, tree: &Path, files: usize, stats: &mut Vec<String>) -> Slot {
    let name = diff_name(files);
    let label = format!("airlock diff --stat ({} files, 10 changed)", report::count(files));
    let with_state = |args: &[&str]| {
        let mut c = Command::new(airlock);
        c.env("AIRLOCK_STATE_DIR", state).current_dir(tree).args(args);
        c
    };
    let mut make = with_state(&["run", "--name", &name, "--mode", "overlay", "--workspace"]);
    make.arg(tree).args(["--", "sh", "-c", "for i in $(seq 10); do echo x >> f$i; done"]);
    if let Err(e) = measure::checked(make, &format!("airlock run --name {name}")) {
        eprintln!("  setup    {label:<52} FAILED");
        return Slot::Done(Outcome::Failed(e.to_string()));
    }
    match measure::checked(with_state(&["diff", &name, "--stat"]), "airlock diff --stat") {
        Ok(out) => {
            let last = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no output)");
            stats.push(format!("{}-file workspace: {}", report::count(files), last.trim()));
        }
        Err(e) => {
            eprintln!("  setup    {label:<52} FAILED");
            return Slot::Done(Outcome::Failed(e.to_string()));
        }
    }
    let (airlock, state, tree) = (airlock.to_path_buf(), state.to_path_buf(), tree.to_path_buf());
    Slot::Run(Case {
        label,
        make: Box::new(move |_| {
            let mut c = Command::new(&airlock);
            c.env("AIRLOCK_STATE_DIR", &state).current_dir(&tree).args(["diff", &name, "--stat"]);
            c
        }),
        after: None,
    })
}

/// Removes the scratch directory, unless something is still mounted below it
/// (then deleting could reach into the mounted filesystem).
fn cleanup(scratch: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = scratch.to_string_lossy();
    let busy: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|mp| mp.starts_with(prefix.as_ref()))
        .collect();
    if !busy.is_empty() {
        eprintln!(
            "airlock-bench: not removing {}: still mounted below it: {}",
            scratch.display(),
            busy.join(", ")
        );
        return;
    }
    let started = Instant::now();
    if let Err(e) = std::fs::remove_dir_all(scratch) {
        eprintln!("airlock-bench: could not remove {}: {e}", scratch.display());
    } else if started.elapsed() > Duration::from_secs(5) {
        eprintln!("airlock-bench: removed {} in {}", scratch.display(), report::secs(started.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, BenchError> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_and_flags() {
        let Parsed::Run(o) = parse(&["--airlock", "/x/airlock"]).unwrap() else { panic!("help") };
        assert_eq!((o.iterations, o.warmup, o.diff_large), (30, 3, 100_000));
        let Parsed::Run(o) = parse(&["--airlock=/a", "-n", "5", "--warmup=0", "--no-runc"]).unwrap() else {
            panic!("help")
        };
        assert_eq!((o.iterations, o.warmup, o.runc, o.bwrap), (5, 0, false, true));
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--airlock", "/a", "-n", "0"]).is_err());
        assert!(parse(&["--airlock", "/a", "--frobnicate"]).is_err());
        assert!(parse(&["--airlock", "/a", "--diff-small", "3"]).is_err());
        assert!(matches!(parse(&["--help"]).unwrap(), Parsed::Help));
        assert!(parse(&["--airlock", "/a", "--only", "network"]).is_err());
        assert!(parse(&["--airlock", "/a", "--only", ","]).is_err());
        assert!(parse(&["--airlock", "/a", "--egress-runs", "0"]).is_err());
    }

    #[test]
    fn sections_and_egress_options() {
        let Parsed::Run(o) = parse(&["--airlock", "/a"]).unwrap() else { panic!("help") };
        assert_eq!(o.sections, Sections::ALL);
        assert_eq!((o.egress_runs, o.egress_requests, o.download_mib), (5, 200, 256));
        let Parsed::Run(o) =
            parse(&["--airlock", "/a", "--only=egress,diff", "--egress-requests", "50", "--download-mib=64"])
                .unwrap()
        else {
            panic!("help")
        };
        assert_eq!(o.sections, Sections { diff: true, egress: true, ..Sections::NONE });
        assert_eq!((o.egress_requests, o.download_mib), (50, 64));
        let Parsed::Run(o) =
            parse(&["--airlock", "/a", "--only", "daemon", "--daemon-counts=1,5", "--daemon-execs", "20"])
                .unwrap()
        else {
            panic!("help")
        };
        assert_eq!(o.sections, Sections { daemon: true, ..Sections::NONE });
        assert_eq!((o.daemon_counts, o.daemon_execs), (vec![1, 5], 20));
        let Parsed::Run(o) =
            parse(&["--airlock", "/a", "--only", "microvm", "--vm-iterations=5", "--vm-execs", "7"]).unwrap()
        else {
            panic!("help")
        };
        assert_eq!(o.sections, Sections { microvm: true, ..Sections::NONE });
        assert_eq!((o.vm_iterations, o.vm_warmup, o.vm_execs, o.vm_cache), (5, 1, 7, None));
        assert!(parse(&["--airlock", "/a", "--vm-iterations", "0"]).is_err());
        let Parsed::Run(o) =
            parse(&["--airlock", "/a", "--only", "images", "--image-mib=20", "--pull-iterations", "3"])
                .unwrap()
        else {
            panic!("help")
        };
        assert_eq!(o.sections, Sections { images: true, ..Sections::NONE });
        assert_eq!((o.image_mib, o.pull_iterations), (20, 3));
        assert!(parse(&["--airlock", "/a", "--pull-iterations", "0"]).is_err());
        let Parsed::Run(o) =
            parse(&["--airlock", "/a", "--only", "e2b,daemon", "--e2b-python=/v/bin/python"]).unwrap()
        else {
            panic!("help")
        };
        assert_eq!(o.sections, Sections { e2b: true, daemon: true, ..Sections::NONE });
        assert_eq!(o.e2b_python, Some(PathBuf::from("/v/bin/python")));
    }
}
