//! The egress proxy in a process of its own (`airlock __egress NAME`).
//!
//! The proxy parses what a hostile sandbox writes (HTTP, SOCKS, TLS), so it
//! does not run in the supervisor, which is root and owns the sandbox's
//! cgroups, mounts and state directory. The supervisor starts one proxy
//! process per sandbox with egress, when the sandbox first hands a
//! connection over (a sandbox that makes none never has one), and hands it
//! three descriptors and nothing else:
//!
//! - fd 3, a pipe it reads its setup from, once (`ProxySetup`: rules, the
//!   sandbox's CA with its key, the secret values, the bytes of the roots
//!   for upstream TLS, and which ids to run as);
//! - fd 4, a pipe it writes [`ProxyReport`]s to: ready (or why not), then
//!   one event per decision, which the supervisor redacts and records;
//! - fd 5, the host end of the egress channel: the agent inside the sandbox
//!   sends each connection it accepts straight here, so a tunnel's bytes
//!   take one relay (this process), as before the move; each descriptor
//!   comes with a `HandOver` (which listener, and for a redirected
//!   connection its destination), and with transparent egress the
//!   resolver's UDP socket comes once.
//!
//! The process confines itself before it reads a byte from the sandbox
//! (`airlock_jail::service`): its own unprivileged uid and gid (as root:
//! [`proxy_id`]; rootless: the calling user in a user namespace of its own),
//! no capabilities, a mount view holding only the resolver's files,
//! non-dumpable, dying with the supervisor, and its seccomp allowlist
//! (`crates/jail/src/seccomp/egress_proxy.toml`).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use airlock_egress::NetEvent;
use airlock_egress::proxy::Proxy;
use airlock_egress::setup::{ProxyReport, ProxySetup, SetupError, read_setup, write_setup};
use airlock_jail::service::{ServiceJail, ServiceJailError};

use crate::RunError;

/// argv[1] of the egress proxy role.
pub const EGRESS_ROLE: &str = "__egress";

/// Where the proxy process finds its descriptors.
const SETUP_FD: i32 = 3;
const REPORT_FD: i32 = 4;
const CHANNEL_FD: i32 = 5;

/// Sandbox id blocks (see `lifecycle`): 65536 host ids each, the first
/// starting here.
const SANDBOX_IDS_START: u32 = 1_000_000_000;
const SANDBOX_BLOCK: u32 = 65_536;
/// The proxies' own range, below every sandbox block and far above
/// ordinary users, system users and the usual subordinate-id ranges: one
/// uid (and gid of the same number) per sandbox block.
const PROXY_IDS_START: u32 = 999_000_000;
const PROXY_IDS: u32 = SANDBOX_IDS_START - PROXY_IDS_START;

/// How long the proxy may take, once started, to confine itself and say
/// it is ready; the sandbox's connections wait in the channel meanwhile.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the proxy may take to finish its last connections and exit
/// once the sandbox is gone, before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Files the proxy reads after it has confined itself: glibc's resolver
/// configuration. Everything else of the host is out of its view.
const RESOLVER_FILES: [&str; 5] =
    ["/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf"];

/// The existing directory the proxy's empty root is mounted over, in its
/// own mount namespace only.
const ROOT_MOUNTPOINT: &str = "/tmp";

/// The uid (and gid) of the egress proxy of the sandbox whose id block
/// starts at host uid `block_first_uid` (root only). A block that is not
/// one of the sandbox blocks gets no id: the proxy does not start rather
/// than share an id with anything else.
pub fn proxy_id(block_first_uid: u32) -> Result<u32, RunError> {
    let offset = block_first_uid.checked_sub(SANDBOX_IDS_START);
    match offset {
        Some(offset) if offset % SANDBOX_BLOCK == 0 && offset / SANDBOX_BLOCK < PROXY_IDS => {
            Ok(PROXY_IDS_START + offset / SANDBOX_BLOCK)
        }
        _ => Err(RunError::Egress(format!(
            "host uid {block_first_uid} does not start a sandbox id block, so the egress proxy has no id of \
             its own to run as"
        ))),
    }
}

#[derive(Debug, thiserror::Error)]
enum RoleError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("cannot build its seccomp filter: {0}")]
    Seccomp(#[from] airlock_jail::seccomp::SeccompError),
    #[error("cannot confine itself: {0}")]
    Jail(#[from] ServiceJailError),
    #[error(transparent)]
    Proxy(#[from] airlock_egress::ProxyError),
}

// ---------------------------------------------------------------------------
// The proxy process

/// The role's entry point: confine, serve until the sandbox is gone, exit.
pub fn main() -> i32 {
    // Taken first: the supervisor that started us, which we must not outlive.
    let parent = rustix::process::getppid();
    // SAFETY: the supervisor placed these three descriptors for this role
    // alone (see `start`); nothing else in this process owns them.
    let (setup, reports, channel) = unsafe {
        (OwnedFd::from_raw_fd(SETUP_FD), OwnedFd::from_raw_fd(REPORT_FD), OwnedFd::from_raw_fd(CHANNEL_FD))
    };
    let reports = Arc::new(Mutex::new(File::from(reports)));
    match serve(parent, setup, &reports, channel) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("egress proxy: {e}");
            report(&reports, &ProxyReport::Failed { message: e.to_string() });
            1
        }
    }
}

fn report(reports: &Mutex<File>, message: &ProxyReport) {
    // One frame per write under the lock, so frames never interleave. A
    // supervisor that is gone cannot be told anything.
    if let Ok(mut file) = reports.lock() {
        let _ = airlock_proto::send(&mut *file, message);
    }
}

fn serve(
    parent: Option<rustix::process::Pid>,
    setup: OwnedFd,
    reports: &Arc<Mutex<File>>,
    channel: OwnedFd,
) -> Result<(), RoleError> {
    let setup = read_setup(&mut File::from(setup))?;
    tracing::debug!("egress proxy: setup read");
    let run_as = setup.run_as;
    let config = setup.into_config()?;
    let filter = airlock_jail::seccomp::egress_proxy()?.compile()?;
    let files: Vec<PathBuf> = RESOLVER_FILES.iter().map(PathBuf::from).collect();
    let nsswitch = std::fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
    let libraries = name_service_modules(&nsswitch);
    let parent = parent.ok_or(ServiceJailError::ParentGone(0))?;
    airlock_jail::service::confine(&ServiceJail {
        files: &files,
        libraries: &libraries,
        mountpoint: Path::new(ROOT_MOUNTPOINT),
        ids: run_as,
        parent,
        filter: &filter,
    })?;

    tracing::debug!("egress proxy: confined");
    // From here on, everything runs under the allowlist.
    let sink_reports = reports.clone();
    let sink = move |event: NetEvent| report(&sink_reports, &ProxyReport::Event(event));
    let proxy = Proxy::start(config, Arc::new(sink))?;
    report(reports, &ProxyReport::Ready);
    // Ends when the agent (and with it the sandbox) is gone; a malformed
    // message is dropped, not fatal.
    loop {
        match airlock_proto::handover::recv(&channel) {
            Ok((what, fd)) => proxy.serve(fd, what),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => continue,
            Err(_) => break,
        }
    }
    // Lets connections still open finish their last events, briefly.
    drop(proxy);
    Ok(())
}

/// The shared libraries glibc loads for the `hosts` line of nsswitch.conf
/// (`libnss_NAME.so.2` per service; `[…]` actions skipped). glibc's
/// default when the line is missing: dns, files.
fn name_service_modules(nsswitch: &str) -> Vec<CString> {
    let line = nsswitch
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .find_map(|l| l.trim_start().strip_prefix("hosts:"));
    let services: Vec<&str> = match line {
        Some(rest) => {
            let mut out = Vec::new();
            let mut in_action = false;
            for word in rest.split_whitespace() {
                if word.starts_with('[') {
                    in_action = true;
                }
                if !in_action && word.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                    out.push(word);
                }
                if word.ends_with(']') {
                    in_action = false;
                }
            }
            out
        }
        None => vec!["dns", "files"],
    };
    services.iter().filter_map(|s| CString::new(format!("libnss_{s}.so.2")).ok()).collect()
}

// ---------------------------------------------------------------------------
// The supervisor's side

/// What the supervisor hears of its proxy.
pub(crate) enum ProxyNotice {
    /// One decision, to redact and record.
    Event(Box<NetEvent>),
    /// The proxy ended while the sandbox was running (or was killed when it
    /// would not stop): the sandbox's connections fail from now on.
    Ended { status: ExitStatus, killed_by_us: bool },
    /// The sandbox's first connection was to start the proxy, but it never
    /// served (it could not be started, put into the sandbox's budgets or
    /// confine itself, or was not ready in time): the sandbox's connections
    /// fail from now on. `status` is how its process ended, if it had one.
    NotStarted { reason: String, status: Option<ExitStatus> },
}

/// Puts the proxy process (by pid) into the sandbox's resource budgets.
pub(crate) type JoinBudget = Box<dyn FnOnce(i32) -> Result<(), String> + Send>;

/// A sandbox's egress proxy, whose process its own thread starts at the
/// sandbox's first connection. Dropping it kills the process, if any.
pub(crate) struct ProxyProcess {
    shared: Arc<Shared>,
    /// Closed to wake the thread while it waits for the first connection.
    wake: Option<OwnedFd>,
    /// Closed when the thread has ended (the process, if any, reaped).
    done: mpsc::Receiver<()>,
}

/// What the proxy's thread and the sandbox's teardown share.
#[derive(Default)]
struct Shared {
    process: Mutex<Process>,
    /// Killed by the supervisor (a failed launch, or it would not stop).
    stopping: AtomicBool,
    /// The sandbox is being ended with everything in its cgroup: the
    /// proxy's end is part of that end, not news.
    ending_with_sandbox: AtomicBool,
}

/// The process as the teardown sees it. Changed under the lock only, so
/// that a teardown either finds the process to kill or keeps it from
/// starting.
#[derive(Default)]
struct Process {
    pidfd: Option<OwnedFd>,
    /// Nothing may start any more: the sandbox is gone or going.
    refused: bool,
}

impl Shared {
    fn process(&self) -> std::sync::MutexGuard<'_, Process> {
        self.process.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// No process starts from now on; with `kill`, a running one is killed.
    fn refuse_start(&self, kill: bool) {
        let mut process = self.process();
        process.refused = true;
        if kill && let Some(pidfd) = &process.pidfd {
            let _ = rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL);
        }
    }
}

/// Sets up sandbox `name`'s proxy around `channel` (the host's end of its
/// egress channel) without starting its process: a thread of its own waits
/// until the sandbox hands the first connection over, starts the process
/// with the channel then, and reads its reports until it is reaped.
/// Until then the supervisor only polls the channel, reading no byte of
/// it: connections wait in its queue, and a sandbox that makes none costs
/// no proxy process. `notice` runs on that thread.
///
/// The thread that starts the process also reaps it, and so outlives it:
/// the proxy's parent-death signal follows the thread that forked it.
///
/// `join` (the sandbox's cgroup) runs on that thread first, with the
/// process's pid, before any report is read: only that thread reaps the
/// process, so the pid cannot have been reused yet, and the proxy is in the
/// sandbox's budgets before it reports ready. If it fails, the proxy is
/// killed and the sandbox's connections fail.
pub(crate) fn start_on_first_use(
    name: &str,
    setup: ProxySetup,
    channel: OwnedFd,
    join: Option<JoinBudget>,
    notice: impl FnMut(ProxyNotice) + Send + 'static,
) -> Result<ProxyProcess, RunError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| RunError::Egress(format!("{what}: {e}"));
    let exe = std::env::current_exe().map_err(RunError::SelfExe)?;
    let (wake_read, wake) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| fail("creating the proxy's wake-up pipe", &e))?;
    let shared = Arc::new(Shared::default());
    let (done_tx, done) = mpsc::channel::<()>();
    let waiting = Waiting { name: name.to_owned(), exe, setup, channel, wake: wake_read, join };
    let thread_shared = shared.clone();
    let mut notice = notice;
    std::thread::Builder::new()
        .name("egress-watch".into())
        .spawn(move || {
            waiting.run(&thread_shared, &mut notice);
            drop(done_tx);
        })
        .map_err(|e| fail("starting the proxy's thread", &e))?;
    Ok(ProxyProcess { shared, wake: Some(wake), done })
}

/// A proxy waiting for its sandbox's first connection.
struct Waiting {
    name: String,
    exe: PathBuf,
    setup: ProxySetup,
    channel: OwnedFd,
    /// Readable (closed) when the teardown wants the thread's attention.
    wake: OwnedFd,
    join: Option<JoinBudget>,
}

impl Waiting {
    /// The thread's life: wait for the first connection, start the
    /// process, then read its reports until it is reaped.
    fn run(self, shared: &Shared, notice: &mut dyn FnMut(ProxyNotice)) {
        let Waiting { name, exe, setup, channel, wake, join } = self;
        match first_connection(&channel, &wake) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let reason = format!("waiting for the sandbox's first connection: {e}");
                return notice(ProxyNotice::NotStarted { reason, status: None });
            }
        }
        drop(wake);
        let mut process = shared.process();
        if process.refused {
            return;
        }
        match spawn(&exe, &name, channel) {
            Ok((started, setup_write, report_read)) => {
                let crate::role_process::Started { child, pid, pidfd } = started;
                process.pidfd = pidfd;
                drop(process);
                let running = Running { child, pid, reports: File::from(report_read) };
                running.watch(setup, setup_write, join, shared, notice);
            }
            Err(reason) => {
                drop(process);
                notice(ProxyNotice::NotStarted { reason, status: None });
            }
        }
    }
}

/// A started proxy process, on the thread that started it.
struct Running {
    child: std::process::Child,
    pid: i32,
    reports: File,
}

impl Running {
    /// Sends the setup, joins the sandbox's budgets, then records what the
    /// proxy reports until it ends, and how it ended; returns once it is
    /// reaped.
    fn watch(
        mut self,
        setup: ProxySetup,
        setup_write: OwnedFd,
        join: Option<JoinBudget>,
        shared: &Shared,
        notice: &mut dyn FnMut(ProxyNotice),
    ) {
        // Written from a thread of its own, so that the cgroup join below
        // goes on while the proxy reads it.
        let writer = std::thread::Builder::new().name("egress-setup".into()).spawn(move || {
            let mut pipe = File::from(setup_write);
            if let Err(e) = write_setup(&mut pipe, &setup) {
                // The proxy reports why it ended, or the reader sees it end.
                tracing::debug!("writing the egress proxy's setup: {e}");
            }
        });
        let mut failed = match (writer, join) {
            (Err(e), _) => Some(format!("starting its setup writer: {e}")),
            (Ok(_), Some(join)) => {
                join(self.pid).err().map(|e| format!("could not put it into the sandbox's cgroup: {e}"))
            }
            (Ok(_), None) => None,
        };
        if failed.is_none() && !reported_within(&self.reports, READY_TIMEOUT) {
            failed = Some(format!("it did not get ready within {} s", READY_TIMEOUT.as_secs()));
        }
        if failed.is_some() {
            let _ = self.child.kill();
        }
        // The proxy is untrusted once it serves: frames are size-capped and
        // decode into a closed enum; anything else ends the reading.
        let mut ready = false;
        while failed.is_none()
            && let Ok(Some(message)) = airlock_proto::recv::<_, ProxyReport>(&mut self.reports)
        {
            match message {
                ProxyReport::Ready => ready = true,
                ProxyReport::Failed { message } if !ready => failed = Some(message),
                ProxyReport::Event(event) if ready => notice(ProxyNotice::Event(Box::new(event))),
                ProxyReport::Failed { .. } | ProxyReport::Event(_) => {}
            }
        }
        let Running { mut child, reports, .. } = self;
        drop(reports);
        let status = child.wait();
        shared.process().pidfd = None;
        if shared.ending_with_sandbox.load(Ordering::SeqCst) {
            return;
        }
        let killed_by_us = shared.stopping.load(Ordering::SeqCst);
        match status {
            status if !ready && !killed_by_us => {
                let how = status.as_ref().map_or_else(|e| e.to_string(), describe);
                let reason =
                    failed.unwrap_or_else(|| format!("the proxy process ended before it was ready ({how})"));
                notice(ProxyNotice::NotStarted { reason, status: status.ok() });
            }
            Ok(status) if ready && !status.success() => notice(ProxyNotice::Ended { status, killed_by_us }),
            _ => {}
        }
    }
}

/// Waits for the sandbox's first connection on `channel`: true once a
/// hand-over is queued there (also when the sandbox's side closed after
/// sending it), false when none will come (the sandbox's side closed with
/// nothing queued, or the teardown woke us with nothing queued). Polls
/// and counts the queued bytes only; reads none.
fn first_connection(channel: &impl AsFd, wake: &impl AsFd) -> io::Result<bool> {
    use rustix::event::{PollFd, PollFlags};
    loop {
        let mut fds = [PollFd::new(channel, PollFlags::IN), PollFd::new(wake, PollFlags::IN)];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        if rustix::io::ioctl_fionread(channel)? > 0 {
            return Ok(true);
        }
        if fds.iter().any(|fd| !fd.revents().is_empty()) {
            return Ok(false);
        }
    }
}

/// Starts the proxy process with its descriptors in place (see the
/// module's documentation); the write end of its setup pipe and the read
/// end of its report pipe.
fn spawn(
    exe: &Path,
    name: &str,
    channel: OwnedFd,
) -> Result<(crate::role_process::Started, OwnedFd, OwnedFd), String> {
    let (setup_read, setup_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("creating its setup pipe: {e}"))?;
    let (report_read, report_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("creating its report pipe: {e}"))?;
    let placed =
        [(setup_read.as_fd(), SETUP_FD), (report_write.as_fd(), REPORT_FD), (channel.as_fd(), CHANNEL_FD)];
    let started = crate::role_process::spawn(exe, EGRESS_ROLE, name, &placed)
        .map_err(|e| format!("starting its process: {e}"))?;
    Ok((started, setup_write, report_read))
}

/// Whether the proxy's first report (or its end) arrives within `limit`.
fn reported_within(reports: &File, limit: Duration) -> bool {
    use rustix::event::{PollFd, PollFlags};
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let timeout = rustix::event::Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(reports, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(rustix::io::Errno::INTR) => continue,
            // Reading will tell.
            Err(_) => return true,
        }
    }
}

/// How a process ended, for messages.
pub(crate) fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(libc::SIGSYS)) => {
            "killed by signal 31 (SIGSYS): a system call outside its seccomp allowlist".to_string()
        }
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("{status}"),
    }
}

impl ProxyProcess {
    /// Once the sandbox is gone. A proxy never started starts now only if
    /// a connection was handed over before the end, to serve and record it.
    /// A running one sees its egress channel close, finishes and exits; it
    /// is killed if it does not within a few seconds. Returns when the
    /// thread has ended: the process reaped and its last events recorded.
    pub(crate) fn stop(mut self) {
        drop(self.wake.take());
        if matches!(self.done.recv_timeout(STOP_TIMEOUT), Err(mpsc::RecvTimeoutError::Timeout)) {
            self.shared.stopping.store(true, Ordering::SeqCst);
            self.shared.refuse_start(true);
            let _ = self.done.recv();
        }
    }

    /// A launch failed before the sandbox ran: no proxy starts any more, a
    /// running one is killed at once; returns when the thread has ended.
    pub(crate) fn abort(mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.refuse_start(true);
        drop(self.wake.take());
        let _ = self.done.recv();
    }

    /// The sandbox is being ended, proxy included (a cgroup kill): no
    /// proxy starts any more, and the end of a running one is not news for
    /// the audit log.
    pub(crate) fn expect_end(&self) {
        self.shared.ending_with_sandbox.store(true, Ordering::SeqCst);
        self.shared.refuse_start(false);
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // Not ended through `stop` or `abort` (a launch that failed): it
        // must not outlive the sandbox it served. Its thread reaps it and
        // ends by itself.
        if self.wake.is_some() {
            self.shared.stopping.store(true, Ordering::SeqCst);
            self.shared.refuse_start(true);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn proxy_ids_are_one_per_block_below_every_block() {
        assert_eq!(proxy_id(1_000_000_000).unwrap(), 999_000_000);
        assert_eq!(proxy_id(1_000_000_000 + 65_536).unwrap(), 999_000_001);
        assert_eq!(proxy_id(1_000_000_000 + 14_999 * 65_536).unwrap(), 999_014_999);
        let highest = 1_000_000_000 + (u32::MAX - 1_000_000_000) / 65_536 * 65_536;
        assert!(proxy_id(highest).unwrap() < 1_000_000_000);
        for bad in [0, 1000, 999_999_999, 1_000_000_001, 1_000_000_000 + 65_535] {
            assert!(proxy_id(bad).is_err(), "{bad}");
        }
    }

    /// The proxy starts for a queued hand-over, also one sent just before
    /// the sandbox's side closed; not for a closed side or a teardown's
    /// wake-up with nothing queued; and nothing queued is consumed.
    #[test]
    fn only_a_queued_hand_over_starts_the_proxy() {
        use std::os::unix::net::UnixStream;
        let pipe = || rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let tagged = |agent: &UnixStream| {
            airlock_proto::handover::send(agent, &airlock_proto::handover::HandOver::Http, agent.as_fd())
                .unwrap()
        };

        let (host, agent) = UnixStream::pair().unwrap();
        let (wake, _waker) = pipe();
        tagged(&agent);
        assert!(first_connection(&host, &wake).unwrap());
        let (what, _fd) = airlock_proto::handover::recv(&host).unwrap();
        assert_eq!(what, airlock_proto::handover::HandOver::Http, "the hand-over was consumed");

        let (host, agent) = UnixStream::pair().unwrap();
        tagged(&agent);
        drop(agent);
        assert!(first_connection(&host, &wake).unwrap());

        let (host, agent) = UnixStream::pair().unwrap();
        drop(agent);
        assert!(!first_connection(&host, &wake).unwrap());

        let (host, _agent) = UnixStream::pair().unwrap();
        let (wake, waker) = pipe();
        drop(waker);
        assert!(!first_connection(&host, &wake).unwrap());
    }

    #[test]
    fn readiness_waits_for_a_first_report_or_the_end() {
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let reports = File::from(read);
        assert!(!reported_within(&reports, Duration::from_millis(20)));
        drop(write);
        assert!(reported_within(&reports, Duration::from_millis(20)));
    }

    #[test]
    fn name_service_modules_follow_the_hosts_line() {
        let names = |text: &str| -> Vec<String> {
            name_service_modules(text).into_iter().map(|c| c.into_string().unwrap()).collect()
        };
        assert_eq!(
            names("passwd: files\nhosts:          files dns\n"),
            ["libnss_files.so.2", "libnss_dns.so.2"]
        );
        assert_eq!(
            names(
                "hosts: files mdns4_minimal [NOTFOUND=return] resolve [!UNAVAIL=return] dns myhostname # x\n"
            ),
            [
                "libnss_files.so.2",
                "libnss_mdns4_minimal.so.2",
                "libnss_resolve.so.2",
                "libnss_dns.so.2",
                "libnss_myhostname.so.2"
            ]
        );
        assert_eq!(names("# hosts: nis\n"), ["libnss_dns.so.2", "libnss_files.so.2"]);
        assert_eq!(names("hosts: files ../../evil dns\n"), ["libnss_files.so.2", "libnss_dns.so.2"]);
    }
}
