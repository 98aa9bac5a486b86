//! The egress proxy in a process of its own (`airlock __egress NAME`).
//!
//! The proxy parses what a hostile sandbox writes (HTTP, SOCKS, TLS), so it
//! does not run in the supervisor, which is root and owns the sandbox's
//! cgroups, mounts and state directory. The supervisor starts one proxy
//! process per sandbox with egress and hands it three descriptors and
//! nothing else:
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

/// How long the proxy may take to confine itself and say it is ready.
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

/// What the supervisor hears of its proxy besides readiness.
pub(crate) enum ProxyNotice {
    /// One decision, to redact and record.
    Event(Box<NetEvent>),
    /// The proxy ended while the sandbox was running (or was killed when it
    /// would not stop): the sandbox's connections fail from now on.
    Ended { status: ExitStatus, killed_by_us: bool },
}

/// Puts the proxy process (by pid) into the sandbox's resource budgets.
pub(crate) type JoinBudget = Box<dyn FnOnce(i32) -> Result<(), String> + Send>;

/// A running proxy process. Dropping it kills the process.
pub(crate) struct ProxyProcess {
    pidfd: Option<OwnedFd>,
    ready: mpsc::Receiver<Result<(), String>>,
    /// Closed when the report reader has reaped the process.
    done: mpsc::Receiver<()>,
    stopping: Arc<AtomicBool>,
    /// Set when the sandbox is ended with everything in its cgroup: the
    /// proxy's death is then part of that end, not news.
    ending_with_sandbox: Arc<AtomicBool>,
}

/// Starts the proxy process for sandbox `name` with the host end of its
/// egress channel; the setup is written from a thread so that the sandbox's
/// own start goes on in parallel. `notice` runs on the report reader's
/// thread.
///
/// `join` (the sandbox's cgroup) runs on that thread first, with the
/// process's pid, before any report is read: only that thread reaps the
/// process, so the pid cannot have been reused yet, and the proxy is in the
/// sandbox's budgets before it reports ready. If it fails, the proxy is
/// killed and the sandbox does not start.
pub(crate) fn start(
    name: &str,
    setup: ProxySetup,
    channel: OwnedFd,
    join: Option<JoinBudget>,
    notice: impl FnMut(ProxyNotice) + Send + 'static,
) -> Result<ProxyProcess, RunError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| RunError::Egress(format!("{what}: {e}"));
    let exe = std::env::current_exe().map_err(RunError::SelfExe)?;
    let (setup_read, setup_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| fail("creating the proxy's setup pipe", &e))?;
    let (report_read, report_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| fail("creating the proxy's report pipe", &e))?;
    let placed =
        [(setup_read.as_fd(), SETUP_FD), (report_write.as_fd(), REPORT_FD), (channel.as_fd(), CHANNEL_FD)];
    let started = crate::role_process::spawn(&exe, EGRESS_ROLE, name, &placed)
        .map_err(|e| fail("starting the proxy process", &e))?;
    drop((setup_read, report_write, channel));
    let crate::role_process::Started { mut child, pid, pidfd } = started;

    std::thread::Builder::new()
        .name("egress-setup".into())
        .spawn(move || {
            let mut pipe = File::from(setup_write);
            if let Err(e) = write_setup(&mut pipe, &setup) {
                // The proxy reports why it ended, or the reader sees it end.
                tracing::debug!("writing the egress proxy's setup: {e}");
            }
        })
        .map_err(|e| fail("starting the proxy's setup writer", &e))?;

    let (ready_tx, ready) = mpsc::channel();
    let (done_tx, done) = mpsc::channel::<()>();
    let stopping = Arc::new(AtomicBool::new(false));
    let stopping_seen = stopping.clone();
    let ending_with_sandbox = Arc::new(AtomicBool::new(false));
    let ending_seen = ending_with_sandbox.clone();
    let mut notice = notice;
    std::thread::Builder::new()
        .name("egress-reports".into())
        .spawn(move || {
            let mut reports = File::from(report_read);
            let mut ready_tx = Some(ready_tx);
            if let Some(join) = join
                && let Err(e) = join(pid)
            {
                let _ = child.kill();
                drop(reports);
                let _ = child.wait();
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(Err(format!("could not put it into the sandbox's cgroup: {e}")));
                }
                drop(done_tx);
                return;
            }
            // The proxy is untrusted once it serves: frames are size-capped
            // and decode into a closed enum; anything else ends the reading.
            while let Ok(Some(message)) = airlock_proto::recv::<_, ProxyReport>(&mut reports) {
                match message {
                    ProxyReport::Ready => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    ProxyReport::Failed { message } => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(Err(message));
                        }
                    }
                    ProxyReport::Event(event) if ready_tx.is_none() => {
                        notice(ProxyNotice::Event(Box::new(event)))
                    }
                    ProxyReport::Event(_) => {}
                }
            }
            drop(reports);
            let status = child.wait();
            match (ready_tx.take(), status) {
                (Some(tx), status) => {
                    let how = status.map_or_else(|e| e.to_string(), |s| describe(&s));
                    let _ = tx.send(Err(format!("the proxy process ended before it was ready ({how})")));
                }
                (None, Ok(status)) if !status.success() && !ending_seen.load(Ordering::SeqCst) => {
                    notice(ProxyNotice::Ended { status, killed_by_us: stopping_seen.load(Ordering::SeqCst) })
                }
                (None, _) => {}
            }
            drop(done_tx);
        })
        .map_err(|e| fail("starting the proxy's report reader", &e))?;

    Ok(ProxyProcess { pidfd, ready, done, stopping, ending_with_sandbox })
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
    /// Waits until the proxy has confined itself and serves; its error
    /// says why it did not.
    pub(crate) fn wait_ready(&self) -> Result<(), String> {
        match self.ready.recv_timeout(READY_TIMEOUT) {
            Ok(answer) => answer,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.kill();
                Err(format!("the proxy process did not get ready within {} s", READY_TIMEOUT.as_secs()))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("the proxy process ended".to_string()),
        }
    }

    /// Once the sandbox is gone: the proxy sees its egress channel close,
    /// finishes and exits; it is killed if it does not within a few seconds.
    /// Returns when it has been reaped and its last events recorded.
    pub(crate) fn stop(mut self) {
        if matches!(self.done.recv_timeout(STOP_TIMEOUT), Err(mpsc::RecvTimeoutError::Timeout)) {
            self.stopping.store(true, Ordering::SeqCst);
            self.kill();
            let _ = self.done.recv();
        }
        self.pidfd = None;
    }

    /// A launch failed before the sandbox ran: the proxy is killed at once
    /// and reaped before this returns.
    pub(crate) fn abort(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.kill();
        let _ = self.done.recv();
        self.pidfd = None;
    }

    /// The sandbox is being ended, proxy included (a cgroup kill): its end
    /// is then not news for the audit log.
    pub(crate) fn expect_end(&self) {
        self.ending_with_sandbox.store(true, Ordering::SeqCst);
    }

    fn kill(&self) {
        if let Some(pidfd) = &self.pidfd {
            let _ = rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // Not stopped through `stop` (a launch that failed): it must not
        // outlive the sandbox it served.
        if self.pidfd.is_some() {
            self.stopping.store(true, Ordering::SeqCst);
            self.kill();
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
