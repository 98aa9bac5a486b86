//! The guest's only way out: airlock's egress proxy, over a virtio-serial
//! port of its own.
//!
//! The guest has no network device. Its PID 1 brings loopback up and
//! listens on 127.0.0.1:3128 (HTTP proxy) and :1080 (SOCKS5), as the
//! process tier's agent does inside its network namespace, and relays each
//! accepted connection over the port named [`PORT_NAME`] ([`mux`], framed by
//! [`frame`]). On the host, each connection becomes one end of a socket
//! pair whose other end is handed to the sandbox's egress proxy process
//! exactly as the process tier's agent hands over what it accepts (a tagged
//! descriptor over the proxy's egress channel): the same proxy, policy,
//! secrets and audit serve both tiers.
//!
//! Before the connections, the host sends the sandbox's trust bundle (the
//! host's roots and the sandbox CA's certificate), which the guest puts
//! where the process tier's sandbox finds it.
//!
//! With transparent egress the guest's kernel redirects as the process
//! tier's sandbox's does ([`airlock_jail::redirect`], installed by PID 1
//! before any command runs): every other TCP connection to a listener whose
//! connections go over with the destination the program asked for (read
//! from conntrack, `SO_ORIGINAL_DST`), DNS over TCP as a stream, and each
//! DNS datagram as a short stream of its own (one query and its answer in
//! RFC 1035 TCP framing), whose answer the guest sends back to the asker.
//! No datagram crosses the port: only the guest's own relay answers UDP.

pub mod frame;
pub mod mux;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use airlock_agent::egress::{Listener, handover_for};
use airlock_jail::plan::Redirect;
use airlock_proto::handover::{self, HandOver};
use frame::{Frame, MAX_DATA};
use mux::{LIMITS, Mux};

/// The egress port's virtio-serial name.
pub const PORT_NAME: &str = "airlock.egress";

/// The proxy ports inside, the process tier's (`airlock_egress`'s).
pub const HTTP_PORT: u16 = 3128;

/// The guest's HTTP proxy listener as a proxy variable's value (what the
/// guest's container engine is given).
pub fn guest_proxy_url() -> String {
    format!("http://127.0.0.1:{HTTP_PORT}")
}
pub const SOCKS_PORT: u16 = 1080;

/// Where the trust bundle is inside, as in the process tier
/// (`runtime::network::SANDBOX_CA_BUNDLE`), and the system bundle it is
/// also placed over (`SYSTEM_CA_BUNDLE`).
pub const GUEST_CA_BUNDLE: &str = "/run/airlock/ca-bundle.pem";
pub const GUEST_SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The largest trust bundle the guest takes.
const MAX_BUNDLE: usize = 16 * 1024 * 1024;

// ---------------------------------------------------------------------------
// The host's side

/// What the host serves a guest's egress port with.
pub struct HostEgress {
    /// The egress proxy's channel: each connection's far end goes over it
    /// with its [`HandOver`], as from the process tier's agent.
    pub handover: OwnedFd,
    /// The sandbox's trust bundle (host roots and its CA's certificate).
    pub bundle: Vec<u8>,
    /// Transparent egress: what the guest's kernel redirects, and where
    /// to. Without it the host takes only the proxy ports' connections.
    pub redirect: Option<Redirect>,
}

impl std::fmt::Debug for HostEgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostEgress")
            .field("bundle_bytes", &self.bundle.len())
            .field("redirect", &self.redirect)
            .finish_non_exhaustive()
    }
}

/// Whether the host hands a connection the guest says is `to` to the
/// proxy: the proxy ports' always, redirected ones (a destination, a DNS
/// stream) only with transparent egress, a datagram socket never (nothing
/// crosses the port but streams).
pub fn host_takes(to: &HandOver, transparent: bool) -> bool {
    match to {
        HandOver::Http | HandOver::Socks => true,
        HandOver::Transparent { .. } | HandOver::DnsStream => transparent,
        // Never the proxy's: the host's own way into the guest's engine.
        HandOver::DnsDatagram | HandOver::ContainerEngine => false,
    }
}

/// Serves the guest's end of the egress port from threads of its own:
/// sends the trust bundle, then turns each connection the guest opens into
/// a socket pair whose far end goes over `handover` (the egress proxy's
/// channel) with what the guest said it is. Ends when the guest does.
pub fn serve_host(port: UnixStream, egress: HostEgress) -> io::Result<()> {
    let HostEgress { handover, bundle, redirect } = egress;
    let transparent = redirect.is_some();
    std::thread::Builder::new().name("egress-port".into()).spawn(move || {
        let mut writer = &port;
        let sent = bundle
            .chunks(MAX_DATA)
            .map(|chunk| Frame::Bundle { data: chunk.to_vec() })
            .chain([Frame::BundleEnd])
            .try_for_each(|frame| frame.write_to(&mut writer));
        if let Err(e) = sent {
            tracing::warn!("egress port: the trust bundle did not reach the guest: {e}");
            return;
        }
        let opener: mux::Opener = Box::new(move |to| {
            if !host_takes(&to, transparent) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a connection this sandbox makes",
                ));
            }
            let (ours, proxys) = UnixStream::pair()?;
            loop {
                match handover::send(&handover, &to, proxys.as_fd()) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => other?,
                }
                break;
            }
            Ok(ours.into())
        });
        if let Err(e) = Mux::start(port.into(), LIMITS, Some(opener)) {
            tracing::warn!("egress port: cannot serve it: {e}");
        }
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The guest's side

/// The guest's egress, set up but not yet serving: the trust bundle in
/// place, loopback up, both proxy ports bound, and with transparent egress
/// the redirection installed and its listeners bound.
pub struct GuestEgress {
    port: fs::File,
    http: TcpListener,
    socks: TcpListener,
    redirected: Vec<Redirected>,
}

/// The listeners of transparent egress on one loopback address (127.0.0.1,
/// and ::1 when IPv6 is redirected too).
struct Redirected {
    /// Redirected TCP: each connection goes over with its destination.
    tcp: TcpListener,
    /// DNS over TCP, redirected from port 53.
    dns_stream: TcpListener,
    /// DNS datagrams, redirected from port 53.
    dns_datagrams: UdpSocket,
}

#[derive(Debug, thiserror::Error)]
pub enum GuestEgressError {
    #[error("{what}: {source}")]
    Step { what: &'static str, source: io::Error },
    #[error("the trust bundle: {0}")]
    Bundle(#[from] frame::FrameError),
    #[error("the trust bundle is larger than {MAX_BUNDLE} bytes")]
    BundleTooLarge,
    #[error("the host ended the egress port before the trust bundle")]
    NoBundle,
    #[error("redirect the guest's connections to airlock: {0}")]
    Redirect(#[from] airlock_jail::redirect::RedirectError),
}

fn step(what: &'static str) -> impl FnOnce(io::Error) -> GuestEgressError {
    move |source| GuestEgressError::Step { what, source }
}

impl GuestEgress {
    /// In the guest's final root: reads the trust bundle from the port at
    /// `device` and installs it, brings loopback up, binds the proxy ports;
    /// with `redirect`, binds the transparent and DNS listeners and installs
    /// the kernel's redirection to them (the process tier's ruleset and
    /// route), before any command runs.
    pub fn prepare(device: &Path, redirect: Option<Redirect>) -> Result<GuestEgress, GuestEgressError> {
        let mut port = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(device)
            .map_err(step("open the egress port"))?;
        let bundle = read_bundle(&mut port)?;
        install_bundle(&bundle).map_err(step("install the trust bundle"))?;
        airlock_jail::sys::set_loopback_up().map_err(step("bring loopback up"))?;
        let http = TcpListener::bind((Ipv4Addr::LOCALHOST, HTTP_PORT))
            .map_err(step("listen on the HTTP proxy port"))?;
        let socks = TcpListener::bind((Ipv4Addr::LOCALHOST, SOCKS_PORT))
            .map_err(step("listen on the SOCKS proxy port"))?;
        let mut redirected = Vec::new();
        if let Some(plan) = redirect {
            for ip in loopbacks(&plan) {
                redirected.push(Redirected {
                    tcp: TcpListener::bind((ip, plan.tcp_port))
                        .map_err(step("listen for redirected connections"))?,
                    dns_stream: TcpListener::bind((ip, plan.dns_port))
                        .map_err(step("listen for DNS over TCP"))?,
                    dns_datagrams: UdpSocket::bind((ip, plan.dns_port))
                        .map_err(step("listen for DNS datagrams"))?,
                });
            }
            // Listening first: nothing redirected ever finds the port closed.
            airlock_jail::redirect::install(&plan)?;
        }
        Ok(GuestEgress { port, http, socks, redirected })
    }

    /// Relays from now on, from threads that inherit the caller's signal
    /// mask (the agent's: call it once the agent has blocked its signals).
    pub fn serve(self) -> io::Result<()> {
        let mux = Mux::start(self.port.into(), LIMITS, None)?;
        let mut listeners: Vec<(TcpListener, Listener)> =
            vec![(self.http, Listener::Http), (self.socks, Listener::Socks)];
        for r in self.redirected {
            listeners.push((r.tcp, Listener::Transparent));
            listeners.push((r.dns_stream, Listener::DnsStream));
            let mux = mux.clone();
            let socket = Arc::new(r.dns_datagrams);
            std::thread::Builder::new()
                .name("egress-dns".into())
                .spawn(move || serve_datagrams(&socket, &mux))?;
        }
        for (listener, kind) in listeners {
            let mux = mux.clone();
            std::thread::Builder::new()
                .name("egress-listen".into())
                .spawn(move || accept_loop(&listener, kind, &mux))?;
        }
        Ok(())
    }
}

/// The loopback addresses redirected connections arrive at.
fn loopbacks(plan: &Redirect) -> Vec<IpAddr> {
    let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    if plan.ipv6 {
        ips.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
    }
    ips
}

fn read_bundle(port: &mut impl Read) -> Result<Vec<u8>, GuestEgressError> {
    let mut bundle = Vec::new();
    loop {
        match Frame::read_from(port)? {
            Some(Frame::Bundle { data }) => {
                if bundle.len() + data.len() > MAX_BUNDLE {
                    return Err(GuestEgressError::BundleTooLarge);
                }
                bundle.extend_from_slice(&data);
            }
            Some(Frame::BundleEnd) => return Ok(bundle),
            Some(_) => {}
            None => return Err(GuestEgressError::NoBundle),
        }
    }
}

/// The bundle at [`GUEST_CA_BUNDLE`] (the guest's own memory) and over the
/// system bundle, so tools that ignore the environment trust it too.
fn install_bundle(bundle: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = Path::new(GUEST_CA_BUNDLE);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut file = fs::File::create(path)?;
    file.write_all(bundle)?;
    file.set_permissions(fs::Permissions::from_mode(0o644))?;
    if Path::new(GUEST_SYSTEM_BUNDLE).is_file() {
        rustix::mount::mount_bind(path, GUEST_SYSTEM_BUNDLE)?;
    }
    Ok(())
}

/// What waits after an accept error that retrying at once cannot fix.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

fn accept_loop(listener: &TcpListener, kind: Listener, mux: &Mux) {
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                // Not relayed: reset at once, as the proxy resets a refusal.
                let Some(to) = handover_for(kind, &conn) else {
                    let _ = rustix::net::connect_unspec(&conn);
                    continue;
                };
                // Refused (the cap, or the port gone): the client is reset.
                if let Err(e) = mux.connect(to, conn.into()) {
                    if mux.is_closed() {
                        return;
                    }
                    tracing::debug!("egress connection refused: {e}");
                }
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ECONNABORTED)) => {}
            Err(_) => std::thread::sleep(ACCEPT_BACKOFF),
        }
    }
}

/// DNS datagrams being answered at once; more are dropped (the asker asks
/// again), so a flood of queries costs the guest a bounded number of
/// threads, within the port's connection cap.
const MAX_DATAGRAM_QUERIES: usize = 32;

/// How long a datagram's query waits for the host's answer.
const DNS_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// Each DNS datagram becomes a stream of its own to the host's resolver
/// (the proxy), and its answer a datagram back to the asker: from the
/// address it asked, as conntrack translates the redirected answer back.
fn serve_datagrams(socket: &Arc<UdpSocket>, mux: &Mux) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, asker) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) if mux.is_closed() => return,
            Err(_) => {
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if mux.is_closed() {
            return;
        }
        if n == 0 || in_flight.load(Ordering::SeqCst) >= MAX_DATAGRAM_QUERIES {
            continue;
        }
        in_flight.fetch_add(1, Ordering::SeqCst);
        let (query, socket, mux, count) = (buf[..n].to_vec(), socket.clone(), mux.clone(), in_flight.clone());
        let started = std::thread::Builder::new()
            .name("egress-dns-query".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                match ask(&mux, &query) {
                    Ok(answer) => {
                        let _ = socket.send_to(&answer, asker);
                    }
                    Err(e) => tracing::debug!("a DNS datagram got no answer: {e}"),
                }
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if started.is_err() {
            in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One query over a stream of its own through the port: the query in TCP
/// framing (a two-byte length), the end of the guest's side, then the
/// first answer.
fn ask(mux: &Mux, query: &[u8]) -> io::Result<Vec<u8>> {
    let len = u16::try_from(query.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let (mut mine, relayed) = UnixStream::pair()?;
    mine.set_read_timeout(Some(DNS_ANSWER_TIMEOUT))?;
    mine.set_write_timeout(Some(DNS_ANSWER_TIMEOUT))?;
    mux.connect(HandOver::DnsStream, relayed.into()).map_err(io::Error::other)?;
    mine.write_all(&[len.to_be_bytes().as_slice(), query].concat())?;
    mine.shutdown(std::net::Shutdown::Write)?;
    let mut len = [0u8; 2];
    mine.read_exact(&mut len)?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    mine.read_exact(&mut answer)?;
    Ok(answer)
}

/// The word on the guest's kernel command line that gives it egress:
/// [`crate::boot::EGRESS_ARG`], or with transparent egress
/// `egress:TCP_PORT:DNS_PORT:4` (`:6` with IPv6). One word either way: the
/// kernel passes its init only so many.
pub fn egress_arg(redirect: Option<&Redirect>) -> String {
    match redirect {
        None => crate::boot::EGRESS_ARG.to_owned(),
        Some(plan) => format!("egress:{}:{}:{}", plan.tcp_port, plan.dns_port, if plan.ipv6 { 6 } else { 4 }),
    }
}

/// What a word of the command line says of egress: `None` when it is not
/// the egress word; `Some(None)` egress through the proxy ports only;
/// `Some(Some(plan))` transparent egress too.
pub fn egress_from_arg(arg: &str) -> Option<Option<Redirect>> {
    if arg == crate::boot::EGRESS_ARG {
        return Some(None);
    }
    let mut parts = arg.strip_prefix("egress:")?.split(':');
    let tcp_port = parts.next()?.parse().ok()?;
    let dns_port = parts.next()?.parse().ok()?;
    let ipv6 = match parts.next()? {
        "4" => false,
        "6" => true,
        _ => return None,
    };
    parts.next().is_none().then_some(Some(Redirect { tcp_port, dns_port, ipv6 }))
}

#[cfg(test)]
mod tests;
