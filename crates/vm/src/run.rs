//! One command in a fresh microVM (`airlock run --tier microvm`): choose
//! the accelerator, make sure the guest is built, boot, run the command
//! through the agent with output streamed and stdin passed on, and return
//! its exit code. The VM is gone when this returns.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use airlock_proto::{AgentMessage, ExecRequest, HostMessage, Stream};

use crate::boot::{BootSpec, Vm};
use crate::egress_port::HostEgress;
use crate::engine::{self, Accel};
use crate::{VmError, guest};

/// What to run, and within which limits.
#[derive(Debug, Clone)]
pub struct VmRun {
    pub policy: String,
    /// The policy lists "kvm" in `isolation.allow_weaker`.
    pub allow_emulation: bool,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub memory: u64,
    pub cpus: f64,
    pub timeout: Duration,
    /// What of the host the guest sees, read-only.
    pub root: Vec<crate::init::RootEntry>,
}

/// How it ended.
#[derive(Debug, Clone)]
pub struct VmOutcome {
    pub exit_code: i32,
    pub timed_out: bool,
    pub accel: Accel,
    /// From starting QEMU to the agent's first word.
    pub boot_time: Duration,
}

/// What the guest's output passes through before it reaches the caller:
/// the runtime redacts the sandbox's secret values from it, as it does the
/// process tier's output.
pub trait OutputFilter: Send {
    /// The bytes of `stream` that may be written now.
    fn filter(&mut self, stream: Stream, data: &[u8]) -> Vec<u8>;
    /// What is still held back at the end of `stream`.
    fn finish(&mut self, stream: Stream) -> Vec<u8>;
}

/// Something for the person at the terminal.
pub enum Note {
    Warning(String),
    Progress(String),
}

/// `timeout`'s exit code, as the process tier gives it.
const TIMED_OUT: i32 = 124;

/// The guest's RAM: the policy's memory limit, but enough to boot.
const MIN_GUEST_MIB: u64 = 256;

/// `egress`: the egress proxy's channel and trust bundle, when the policy
/// gives the guest a way out (its only one: the guest has no network device).
pub fn run(
    req: &VmRun,
    mut egress: Option<HostEgress>,
    notify: &mut dyn FnMut(Note),
) -> Result<VmOutcome, VmError> {
    let mut filter = egress.as_mut().and_then(|e| e.output.take());
    let cache = crate::cache_dir()?;
    let kernel = guest::find_kernel().ok_or(VmError::NoKernel)?;
    let report = engine::probe_cached(&cache, Some(&kernel.vmlinuz));
    let choice = engine::choose(&report, req.allow_emulation, &req.policy)?;
    if let Some(warning) = choice.warning {
        notify(Note::Warning(warning));
    }
    let setup =
        guest::setup(&cache, &mut |step| notify(Note::Progress(format!("building the guest: {step}"))))?;
    let spec = BootSpec {
        accel: choice.accel,
        memory_mib: (req.memory >> 20).max(MIN_GUEST_MIB),
        cpus: (req.cpus.ceil() as u32).clamp(1, 64),
        deadline: match choice.accel {
            Accel::Kvm => Duration::from_secs(30),
            Accel::Tcg => Duration::from_secs(300),
        },
        root: req.root.clone(),
        egress: egress.is_some(),
    };
    let dir = cache.join("run").join(format!("{}-{}", std::process::id(), unique()));
    let started = Instant::now();
    let mut vm = Vm::boot(setup.guest(), &spec, &dir, egress)?;
    let remaining = req.timeout.saturating_sub(started.elapsed());
    let ended = exec(&mut vm, req, remaining, &mut filter);
    if let Some(filter) = filter.as_deref_mut() {
        for stream in [Stream::Stdout, Stream::Stderr] {
            write_out(stream, &filter.finish(stream));
        }
    }
    let (exit_code, timed_out) = ended?;
    Ok(VmOutcome { exit_code, timed_out, accel: choice.accel, boot_time: vm.boot_time })
}

fn unique() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// Runs the command as exec 1 of the guest's agent; (exit code, timed out).
/// Writes output of the guest to ours; a reader that went away (`| head`)
/// stops the output, not the run.
fn write_out(stream: Stream, data: &[u8]) {
    let _ = match stream {
        Stream::Stdout => io::stdout().lock().write_all(data).and_then(|()| io::stdout().flush()),
        Stream::Stderr => io::stderr().lock().write_all(data),
    };
}

fn exec(
    vm: &mut Vm,
    req: &VmRun,
    timeout: Duration,
    filter: &mut Option<Box<dyn OutputFilter>>,
) -> Result<(i32, bool), VmError> {
    const ID: u32 = 1;
    let request = ExecRequest {
        id: ID,
        argv: req.argv.clone(),
        env: req.env.clone(),
        cwd: req.cwd.clone(),
        tty: None,
        user: None,
    };
    airlock_proto::send(&mut vm.channel, &HostMessage::Exec(Box::new(request)))?;
    // stdin goes in from a thread of its own; its end closes the process's.
    let mut input = vm.channel.try_clone().map_err(|e| VmError::Boot(format!("channel: {e}")))?;
    std::thread::Builder::new()
        .name("vm-stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut stdin = io::stdin().lock();
            loop {
                let data = match stdin.read(&mut buf) {
                    Ok(n) => buf[..n].to_vec(),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => Vec::new(),
                };
                let done = data.is_empty();
                if airlock_proto::send(&mut input, &HostMessage::Stdin { id: ID, data }).is_err() || done {
                    return;
                }
            }
        })
        .map_err(|e| VmError::Boot(format!("stdin thread: {e}")))?;
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Ok((TIMED_OUT, true));
        }
        vm.channel.set_read_timeout(Some(remaining)).map_err(|e| VmError::Boot(format!("channel: {e}")))?;
        let message = match airlock_proto::recv::<_, AgentMessage>(&mut vm.channel) {
            Ok(Some(m)) => m,
            Ok(None) => return Err(vm.ended("while the command ran")),
            Err(airlock_proto::ProtoError::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
            {
                return Ok((TIMED_OUT, true));
            }
            Err(e) => return Err(e.into()),
        };
        match message {
            AgentMessage::ExecOutput { id: ID, stream, data } => match filter.as_deref_mut() {
                Some(filter) => write_out(stream, &filter.filter(stream, &data)),
                None => write_out(stream, &data),
            },
            AgentMessage::ExecRefused { id: ID, exit_code, message } => {
                let shown: String = message.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
                eprintln!("airlock: {shown}");
                return Ok((exit_code, false));
            }
            AgentMessage::ExecEnded { id: ID, code, signal } => {
                let exit_code = match (code, signal) {
                    (Some(code), _) => code,
                    (None, Some(signal)) => 128 + signal,
                    (None, None) => 125,
                };
                return Ok((exit_code, false));
            }
            _ => {}
        }
    }
}
