//! Published ports: `airlock create -p [HOST_ADDR:]HOST_PORT:SANDBOX_PORT`.
//!
//! The supervisor binds each host address before the sandbox exists (a
//! taken port fails the create, and nothing is left behind), accepts on it,
//! and relays each connection to the port on the sandbox's loopback. The
//! sandbox has a network namespace of its own with only loopback, so the
//! socket inside must be made there: a small process, the port connector
//! (`airlock __ports NAME`, started with `role_process` like the egress
//! proxy), enters the sandbox's network namespace, drops every capability,
//! and from then on answers "connect to port P" with a connected socket
//! over a channel of its own (`proto::port_connect`, the egress hand-over's
//! descriptor passing). The supervisor keeps both ends and copies bytes
//! between them; the sandbox gets no route out, and the connector never
//! reads a byte of a connection.
//!
//! A microVM guest has no network namespace on the host: its ports are
//! reached over a virtio-serial port of their own
//! ([`airlock_vm::ports_port`]), where the guest's PID 1 makes the
//! connection to its loopback and relays the bytes. The supervisor relays
//! and records them the same way.
//!
//! One path leads into a sandbox's port, for the listeners here and for
//! any other front end: [`PortAccess::serve`]. Other processes reach it
//! through the supervisor's socket ([`crate::supervisor::SupervisorClient::connect_port`],
//! e.g. the daemon routing a request by its Host name): after the answer,
//! that connection carries the port's bytes.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::audit::{AuditEvent, AuditLog};
use crate::role_process::{self, Started};

/// argv[1] of the port connector role.
pub const CONNECTOR_ROLE: &str = "__ports";

/// Where the connector finds its descriptors.
const CHANNEL_FD: i32 = 3;
const NET_NS_FD: i32 = 4;
const USER_NS_FD: i32 = 5;

/// How long a connection to a port inside may take: on loopback it is
/// made or refused at once, unless the listener's queue is full.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One published port: a host address (loopback unless given) and the
/// port inside the sandbox its connections go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub host: SocketAddr,
    pub sandbox_port: u16,
}

impl FromStr for PortMapping {
    type Err = PortError;

    /// `HOST_PORT:SANDBOX_PORT`, `ADDR:HOST_PORT:SANDBOX_PORT`, with an
    /// IPv6 address in brackets (`[::1]:8080:3000`).
    fn from_str(text: &str) -> Result<PortMapping, PortError> {
        let bad = |reason: &'static str| PortError::Syntax { given: text.to_owned(), reason };
        let (rest, sandbox) = text.rsplit_once(':').ok_or_else(|| bad("it needs HOST_PORT:SANDBOX_PORT"))?;
        let sandbox_port = port_number(sandbox).ok_or_else(|| bad("the sandbox port is not 1-65535"))?;
        let (addr, host_port) = match rest.rsplit_once(':') {
            Some((addr, port)) => (Some(addr), port),
            None => (None, rest),
        };
        let host_port = port_number(host_port).ok_or_else(|| bad("the host port is not 1-65535"))?;
        let ip = match addr {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(addr) => {
                let bare = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(addr);
                if bare.contains(':') && !addr.starts_with('[') {
                    return Err(bad("write an IPv6 address in brackets, e.g. [::1]:8080:3000"));
                }
                bare.parse().map_err(|_| bad("the host address is not an IP address"))?
            }
        };
        Ok(PortMapping { host: SocketAddr::new(ip, host_port), sandbox_port })
    }
}

impl PortMapping {
    /// Stands for "some port" where only whether ports may be published at
    /// all is asked.
    pub(crate) const ANY: PortMapping =
        PortMapping { host: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1), sandbox_port: 1 };
}

fn port_number(text: &str) -> Option<u16> {
    text.parse::<u16>().ok().filter(|p| *p != 0)
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.sandbox_port)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(
        "port {given:?}: {reason}; expected [HOST_ADDR:]HOST_PORT:SANDBOX_PORT, e.g. 8080:3000 or 127.0.0.1:8080:3000"
    )]
    Syntax { given: String, reason: &'static str },
    #[error(
        "policy {policy} does not allow publishing ports (its [network] ports = false); create the sandbox without -p, or with a policy that sets ports = true"
    )]
    Forbidden { policy: String },
    #[error("host address {0} is published twice")]
    Duplicate(SocketAddr),
    #[error("cannot listen on host address {addr} (is the port taken?): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the port connector: {0}")]
    Start(#[source] io::Error),
    #[error("cannot connect to port {port} inside the sandbox: {source}")]
    Connect {
        port: u16,
        #[source]
        source: io::Error,
    },
}

/// Whether anything outside may reach the sandbox's ports under `policy`
/// (a published port, or a front end through the supervisor).
pub fn reachable(policy: &airlock_policy::Policy) -> Result<(), PortError> {
    check(&[PortMapping::ANY], policy)
}

/// Whether `mappings` may be published under `policy`: the policy allows
/// ports, and no host address is given twice.
pub fn check(mappings: &[PortMapping], policy: &airlock_policy::Policy) -> Result<(), PortError> {
    if mappings.is_empty() {
        return Ok(());
    }
    if !policy.network.ports {
        return Err(PortError::Forbidden { policy: policy.name.clone() });
    }
    for (i, m) in mappings.iter().enumerate() {
        if mappings[..i].iter().any(|earlier| earlier.host == m.host) {
            return Err(PortError::Duplicate(m.host));
        }
    }
    Ok(())
}

/// Binds every host address now, before the sandbox exists; on an error,
/// the ones already bound close as the vector drops.
pub(crate) fn bind_all(mappings: &[PortMapping]) -> Result<Vec<(PortMapping, TcpListener)>, PortError> {
    mappings
        .iter()
        .map(|m| {
            TcpListener::bind(m.host)
                .map(|listener| (*m, listener))
                .map_err(|source| PortError::Bind { addr: m.host, source })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The supervisor's side

/// A sandbox's way into its ports: on the process tier its port
/// connector, started with the sandbox when it publishes ports and
/// otherwise at the first connection; on the microVM tier its guest's
/// ports port. And the host listeners of its published ports.
/// [`PortAccess::close`] ends them.
pub(crate) struct PortAccess {
    name: String,
    agent_pid: i32,
    /// A microVM guest's way in; None on the process tier.
    guest: Option<airlock_vm::ports_port::HostPorts>,
    /// Why this sandbox's ports cannot be reached (the policy, the tier),
    /// or None.
    refused: Option<String>,
    audit: Arc<Mutex<AuditLog>>,
    connector: Mutex<Option<Connector>>,
    /// Clones of the listening sockets, shut down at the end so that their
    /// accept threads return and the host ports are free at once.
    listening: Mutex<Vec<TcpListener>>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Connector {
    channel: UnixStream,
    started: Started,
    /// Keeps the thread that started the connector (its parent, for the
    /// parent-death signal) alive.
    _alive: std::sync::mpsc::Sender<()>,
}

/// Where a connection into the sandbox came from, for its audit record.
pub(crate) struct Origin {
    pub peer: String,
    /// The published host address it was accepted on; None when a client
    /// of the supervisor asked for it (`ConnectPort`).
    pub listen: Option<SocketAddr>,
}

impl PortAccess {
    /// The access of the sandbox whose agent is `agent_pid` (or whose
    /// guest is reached through `guest`); `refused` says why it has none.
    pub(crate) fn new(
        name: &str,
        agent_pid: i32,
        guest: Option<airlock_vm::ports_port::HostPorts>,
        refused: Option<String>,
        audit: Arc<Mutex<AuditLog>>,
    ) -> Arc<PortAccess> {
        Arc::new(PortAccess {
            name: name.to_owned(),
            agent_pid,
            guest,
            refused,
            audit,
            connector: Mutex::new(None),
            listening: Mutex::new(Vec::new()),
            next_id: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// Starts the connector and serves `listeners` (bound by [`bind_all`])
    /// from a thread each, every connection relayed and recorded.
    pub(crate) fn publish(
        self: &Arc<Self>,
        listeners: Vec<(PortMapping, TcpListener)>,
    ) -> Result<(), PortError> {
        if listeners.is_empty() {
            return Ok(());
        }
        if self.guest.is_none() {
            self.with_connector(|_| Ok(()))?;
        }
        for (mapping, listener) in listeners {
            let clone = listener.try_clone().map_err(PortError::Start)?;
            if let Ok(mut listening) = self.listening.lock() {
                listening.push(clone);
            }
            let access = self.clone();
            std::thread::Builder::new()
                .name("port".into())
                .spawn(move || access.accept_loop(mapping, listener))
                .map_err(PortError::Start)?;
        }
        Ok(())
    }

    fn with_connector<T>(&self, f: impl FnOnce(&Connector) -> io::Result<T>) -> Result<T, PortError> {
        let mut connector =
            self.connector.lock().map_err(|_| PortError::Start(io::Error::other("lock poisoned")))?;
        if connector.is_none() {
            *connector = Some(self.start_connector()?);
        }
        let Some(connector) = connector.as_ref() else {
            return Err(PortError::Start(io::Error::other("no connector")));
        };
        f(connector).map_err(PortError::Start)
    }

    fn start_connector(&self) -> Result<Connector, PortError> {
        let exe = std::env::current_exe().map_err(PortError::Start)?;
        let agent_pid = self.agent_pid;
        let open_ns = |kind: &str| {
            std::fs::File::open(format!("/proc/{agent_pid}/ns/{kind}"))
                .map(OwnedFd::from)
                .map_err(PortError::Start)
        };
        let (net_ns, user_ns) = (open_ns("net")?, open_ns("user")?);
        let (host_end, connector_end) = UnixStream::pair().map_err(PortError::Start)?;
        // The connector's parent-death signal follows the thread that
        // started it, and a supervisor client's `ConnectPort` is served on
        // a thread that ends with that connection: a thread of its own,
        // alive until the connector is dropped, starts it.
        let name = self.name.clone();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (alive, dropped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("port-connector".into())
            .spawn(move || {
                let fds = [
                    (connector_end.as_fd(), CHANNEL_FD),
                    (net_ns.as_fd(), NET_NS_FD),
                    (user_ns.as_fd(), USER_NS_FD),
                ];
                let started = role_process::spawn(&exe, CONNECTOR_ROLE, &name, &fds);
                drop((connector_end, net_ns, user_ns));
                let spawned = started.is_ok();
                if started_tx.send(started).is_ok() && spawned {
                    // Returns once the `Connector` (its sender) is dropped.
                    let _ = dropped.recv();
                }
            })
            .map_err(PortError::Start)?;
        let started = started_rx
            .recv()
            .map_err(|_| PortError::Start(io::Error::other("the port connector's thread ended")))?
            .map_err(PortError::Start)?;
        Ok(Connector { channel: host_end, started, _alive: alive })
    }

    /// A connection to `port` on the sandbox's loopback, made by its
    /// connector, or by a guest's PID 1 (which resets it when nothing
    /// listens there).
    fn connect_inside(&self, port: u16) -> Result<Inside, PortError> {
        if let Some(why) = &self.refused {
            return Err(PortError::Connect { port, source: io::Error::other(why.clone()) });
        }
        if let Some(guest) = &self.guest {
            return guest
                .connect(port)
                .map(Inside::Guest)
                .map_err(|source| PortError::Connect { port, source });
        }
        let answer = self.with_connector(|c| {
            airlock_proto::port_connect::send_request(&c.channel, port)?;
            Ok(airlock_proto::port_connect::recv_answer(&c.channel))
        })?;
        answer
            .map(|fd| Inside::Namespace(TcpStream::from(fd)))
            .map_err(|source| PortError::Connect { port, source })
    }

    /// Relays `outside` to `port` inside the sandbox until both ends are
    /// done, recording the connection's start and end; `answer` first tells
    /// `outside` whether the port could be reached (a published port's
    /// client is told nothing: it is closed).
    pub(crate) fn serve<S: Duplex>(
        &self,
        mut outside: S,
        port: u16,
        origin: Origin,
        answer: impl FnOnce(&mut S, Option<&PortError>),
    ) -> Result<(), PortError> {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        record(
            &self.audit,
            AuditEvent::PortAccepted {
                id,
                peer: origin.peer,
                listen: origin.listen.map(|a| a.to_string()),
                sandbox_port: port,
            },
        );
        let started = Instant::now();
        let inside = self.connect_inside(port);
        answer(&mut outside, inside.as_ref().err());
        let (bytes_in, bytes_out, result) = match inside {
            Ok(Inside::Namespace(inside)) => {
                let (into, out_of) = relay(outside, inside);
                (into, out_of, Ok(()))
            }
            Ok(Inside::Guest(inside)) => {
                let (into, out_of) = relay(outside, inside);
                (into, out_of, Ok(()))
            }
            Err(e) => (0, 0, Err(e)),
        };
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let error = result.as_ref().err().map(ToString::to_string);
        record(&self.audit, AuditEvent::PortClosed { id, bytes_in, bytes_out, duration_ms, error });
        result
    }

    fn accept_loop(self: Arc<Self>, mapping: PortMapping, listener: TcpListener) {
        loop {
            let (client, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                // Shut down at the end of the sandbox.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
                Err(_) => {
                    // Out of descriptors or memory: the connection stays
                    // queued; do not spin meanwhile.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let access = self.clone();
            std::thread::spawn(move || {
                let origin = Origin { peer: peer.to_string(), listen: Some(mapping.host) };
                if let Err(e) = access.serve(client, mapping.sandbox_port, origin, |_, _| {}) {
                    tracing::debug!("published port {mapping}: {e}");
                }
            });
        }
    }

    /// Closes the host listeners (their ports are free once this returns
    /// and their threads have woken) and ends the connector.
    pub(crate) fn close(&self) {
        if let Ok(mut listening) = self.listening.lock() {
            for listener in listening.drain(..) {
                // Wakes its accept thread with EINVAL.
                let _ = rustix::net::shutdown(&listener, rustix::net::Shutdown::Read);
            }
        }
        if let Ok(mut connector) = self.connector.lock()
            && let Some(mut connector) = connector.take()
        {
            let _ = connector.channel.shutdown(Shutdown::Both);
            let _ = connector.started.child.kill();
            let _ = connector.started.child.wait();
        }
    }
}

/// A connection to a port inside: a TCP connection made in the sandbox's
/// network namespace, or a stream a guest relays.
enum Inside {
    Namespace(TcpStream),
    Guest(UnixStream),
}

/// A byte stream the relay can copy to and from: a TCP connection, or a
/// supervisor client's socket.
pub(crate) trait Duplex: io::Read + io::Write + Send + Sized + 'static {
    fn another(&self) -> io::Result<Self>;
    fn end_writes(&self);
}

impl Duplex for TcpStream {
    fn another(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn end_writes(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Duplex for UnixStream {
    fn another(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn end_writes(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

fn record(audit: &Mutex<AuditLog>, event: AuditEvent) {
    if let Ok(mut audit) = audit.lock()
        && let Err(e) = audit.record(event)
    {
        tracing::warn!("recording a port connection: {e}");
    }
}

/// Copies bytes both ways until both directions have ended; what went into
/// the sandbox and what came out of it.
pub(crate) fn relay<S: Duplex, I: Duplex>(mut outside: S, mut inside: I) -> (u64, u64) {
    let Ok(mut outside_reader) = outside.another() else { return (0, 0) };
    let Ok(mut inside_writer) = inside.another() else { return (0, 0) };
    let into = std::thread::spawn(move || {
        let copied = io::copy(&mut outside_reader, &mut inside_writer).unwrap_or(0);
        // The sandbox's side learns the caller is done sending.
        inside_writer.end_writes();
        copied
    });
    let out_of = io::copy(&mut inside, &mut outside).unwrap_or(0);
    outside.end_writes();
    let into = into.join().unwrap_or(0);
    (into, out_of)
}

// ---------------------------------------------------------------------------
// The connector process

/// The connector role's entry point: enter the sandbox's network namespace,
/// give up every privilege, then answer connection requests until the
/// supervisor is gone.
pub fn connector_main() -> i32 {
    let parent = rustix::process::getppid();
    // SAFETY: the supervisor placed these three descriptors for this role
    // alone (see `Ports::start`); nothing else in this process owns them.
    let (channel, net_ns, user_ns) = unsafe {
        (
            UnixStream::from_raw_fd(CHANNEL_FD),
            OwnedFd::from_raw_fd(NET_NS_FD),
            OwnedFd::from_raw_fd(USER_NS_FD),
        )
    };
    if let Err(e) = confine(parent, net_ns.as_fd(), user_ns.as_fd()) {
        tracing::error!("port connector: {e}");
        return 1;
    }
    drop((net_ns, user_ns));
    loop {
        let port = match airlock_proto::port_connect::recv_request(&channel) {
            Ok(port) => port,
            Err(_) => return 0,
        };
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let connected = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map(OwnedFd::from);
        if airlock_proto::port_connect::send_answer(&channel, connected.as_ref()).is_err() {
            return 0;
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConfineError {
    #[error("the supervisor is already gone")]
    ParentGone,
    #[error("{step}: {source}")]
    Step {
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Dies with the supervisor, enters the sandbox's network namespace (as an
/// unprivileged user, through the sandbox's user namespace, which that
/// user owns: the kernel wants privilege over the network namespace in the
/// caller's own user namespace too), and drops every capability, so what
/// is left can only make loopback connections in there.
fn confine(
    parent: Option<rustix::process::Pid>,
    net_ns: BorrowedFd<'_>,
    user_ns: BorrowedFd<'_>,
) -> Result<(), ConfineError> {
    use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
    let step = |step: &'static str| move |source: io::Error| ConfineError::Step { step, source };
    airlock_jail::sys::raw_set_pdeathsig(libc::SIGKILL).map_err(step("parent-death signal"))?;
    if rustix::process::getppid() != parent {
        return Err(ConfineError::ParentGone);
    }
    if !rustix::process::geteuid().is_root() {
        move_into_link_name_space(user_ns, Some(LinkNameSpaceType::User))
            .map_err(|e| step("entering the sandbox's user namespace")(e.into()))?;
    }
    move_into_link_name_space(net_ns, Some(LinkNameSpaceType::Network))
        .map_err(|e| step("entering the sandbox's network namespace")(e.into()))?;
    airlock_jail::sys::prctl_ints(libc::PR_SET_DUMPABLE, 0, 0).map_err(step("non-dumpable"))?;
    airlock_jail::sys::raw_set_no_new_privs().map_err(step("no_new_privs"))?;
    airlock_jail::sys::capset_thread([0, 0]).map_err(step("dropping capabilities"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn mappings_parse_with_loopback_by_default() {
        let m: PortMapping = "8080:3000".parse().unwrap();
        assert_eq!(m.host, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(m.sandbox_port, 3000);
        let m: PortMapping = "0.0.0.0:80:8000".parse().unwrap();
        assert_eq!(m.host, "0.0.0.0:80".parse().unwrap());
        let m: PortMapping = "[::1]:8080:3000".parse().unwrap();
        assert_eq!(m.host, "[::1]:8080".parse().unwrap());
        assert_eq!(m.to_string(), "[::1]:8080:3000");
        assert_eq!("127.0.0.1:8080:3000".parse::<PortMapping>().unwrap().to_string(), "127.0.0.1:8080:3000");
    }

    #[test]
    fn malformed_mappings_say_what_is_wrong() {
        for (text, why) in [
            ("3000", "HOST_PORT:SANDBOX_PORT"),
            ("8080:0", "sandbox port"),
            ("x:3000", "host port"),
            ("8080:70000", "sandbox port"),
            ("nohost:8080:3000", "not an IP address"),
            ("::1:8080:3000", "brackets"),
        ] {
            let e = text.parse::<PortMapping>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(text), "{text}: {e}");
        }
    }

    #[test]
    fn the_policy_and_the_tier_decide() {
        let mappings: Vec<PortMapping> = vec!["8080:3000".parse().unwrap()];
        let dev = airlock_policy::Policy::resolve("dev").unwrap();
        check(&mappings, &dev).unwrap();
        check(&[], &airlock_policy::Policy::resolve("plugin").unwrap()).unwrap();
        let plugin = airlock_policy::Policy::resolve("plugin").unwrap();
        assert!(
            matches!(check(&mappings, &plugin), Err(PortError::Forbidden { policy }) if policy == "plugin")
        );
        let mut vm = dev.clone();
        vm.isolation.tier = airlock_policy::Tier::Microvm;
        check(&mappings, &vm).unwrap();
        let twice = vec![mappings[0], "127.0.0.1:8080:4000".parse().unwrap()];
        assert!(matches!(check(&twice, &dev), Err(PortError::Duplicate(_))));
    }

    /// A taken host port fails the bind whole, and what was bound before
    /// it is free again.
    #[test]
    fn a_taken_port_fails_and_frees_the_others() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let free = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap();
        let mappings = vec![
            PortMapping { host: free, sandbox_port: 1 },
            PortMapping { host: taken.local_addr().unwrap(), sandbox_port: 2 },
        ];
        let err = bind_all(&mappings).unwrap_err();
        assert!(
            matches!(&err, PortError::Bind { addr, .. } if *addr == taken.local_addr().unwrap()),
            "{err}"
        );
        TcpListener::bind(free).unwrap();
    }

    #[test]
    fn a_relay_counts_both_directions() {
        use std::io::{Read, Write};
        let pair = || {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            (c, l.accept().unwrap().0)
        };
        let (mut client, outside) = pair();
        let (inside, mut server) = pair();
        let relaying = std::thread::spawn(move || relay(outside, inside));
        client.write_all(b"hello").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello");
        server.write_all(b"hi!").unwrap();
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"hi!");
        assert_eq!(relaying.join().unwrap(), (5, 3));
    }
}
