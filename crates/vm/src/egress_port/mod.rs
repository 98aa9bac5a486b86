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

pub mod frame;
pub mod mux;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use frame::{Frame, MAX_DATA};
use mux::{LIMITS, Mux};

/// The egress port's virtio-serial name.
pub const PORT_NAME: &str = "airlock.egress";

/// The proxy ports inside, the process tier's (`airlock_egress`'s).
pub const HTTP_PORT: u16 = 3128;
pub const SOCKS_PORT: u16 = 1080;

/// The hand-over tags the egress proxy knows (`airlock_egress::proxy::Port`).
pub const HTTP_TAG: u8 = b'h';
pub const SOCKS_TAG: u8 = b's';

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
    /// as a tagged descriptor, as from the process tier's agent.
    pub handover: OwnedFd,
    /// The sandbox's trust bundle (host roots and its CA's certificate).
    pub bundle: Vec<u8>,
}

impl std::fmt::Debug for HostEgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostEgress").field("bundle_bytes", &self.bundle.len()).finish_non_exhaustive()
    }
}

/// Serves the guest's end of the egress port from threads of its own:
/// sends the trust bundle, then turns each connection the guest opens into
/// a socket pair whose far end goes over `handover` (the egress proxy's
/// channel) tagged with the guest's port. Ends when the guest does.
pub fn serve_host(port: UnixStream, egress: HostEgress) -> io::Result<()> {
    let HostEgress { handover, bundle } = egress;
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
        let opener: mux::Opener = Box::new(move |tag| {
            if tag != HTTP_TAG && tag != SOCKS_TAG {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "no such proxy port"));
            }
            let (ours, proxys) = UnixStream::pair()?;
            loop {
                match airlock_proto::send_tagged_fd(&handover, tag, std::os::fd::AsFd::as_fd(&proxys)) {
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
/// place, loopback up, both proxy ports bound.
pub struct GuestEgress {
    port: fs::File,
    http: TcpListener,
    socks: TcpListener,
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
}

fn step(what: &'static str) -> impl FnOnce(io::Error) -> GuestEgressError {
    move |source| GuestEgressError::Step { what, source }
}

impl GuestEgress {
    /// In the guest's final root: reads the trust bundle from the port at
    /// `device` and installs it, brings loopback up, binds the proxy ports.
    pub fn prepare(device: &Path) -> Result<GuestEgress, GuestEgressError> {
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
        Ok(GuestEgress { port, http, socks })
    }

    /// Relays from now on, from threads that inherit the caller's signal
    /// mask (the agent's: call it once the agent has blocked its signals).
    pub fn serve(self) -> io::Result<()> {
        let mux = Mux::start(self.port.into(), LIMITS, None)?;
        for (listener, tag) in [(self.http, HTTP_TAG), (self.socks, SOCKS_TAG)] {
            let mux = mux.clone();
            std::thread::Builder::new()
                .name("egress-listen".into())
                .spawn(move || accept_loop(&listener, tag, &mux))?;
        }
        Ok(())
    }
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

fn accept_loop(listener: &TcpListener, tag: u8, mux: &Mux) {
    loop {
        match listener.accept() {
            // Refused (the cap, or the port gone): the client sees it closed.
            Ok((conn, _)) => {
                if let Err(e) = mux.connect(tag, conn.into()) {
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

#[cfg(test)]
mod tests;
