//! Published ports into a guest: the host's connections to ports the
//! guest's programs listen on, over a virtio-serial port of their own.
//!
//! The egress port's multiplexer ([`crate::egress_port::mux`]) in the other
//! direction: here the host opens connections and the guest accepts them.
//! Each open names its destination as a redirected egress connection does
//! (`HandOver::Transparent`), and the guest takes only 127.0.0.1: its PID 1
//! connects there and relays the bytes. The host reads what the guest
//! sends with the egress port's bounds (frames checked before anything is
//! allocated, a window per connection, a cap on connections); an open from
//! the guest is ignored, since the host has no opener.
//!
//! A connection the guest cannot make (nothing listens) is reset: the
//! host's end of it reads as closed before any byte.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use airlock_proto::handover::HandOver;

use crate::egress_port::mux::{LIMITS, Mux, Opener};

/// The ports port's virtio-serial name.
pub const PORT_NAME: &str = "airlock.ports";

/// The word on the guest's kernel command line that says it has the port.
pub const PORTS_ARG: &str = "ports";

/// How long the guest waits for a connection to its loopback: made or
/// refused at once, unless the listener's queue is full (the process
/// tier's connector waits as long).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The host's end: connections into the guest's loopback.
#[derive(Clone)]
pub struct HostPorts {
    mux: Mux,
}

impl std::fmt::Debug for HostPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPorts").field("open", &self.mux.open_connections()).finish()
    }
}

impl HostPorts {
    /// Serves the host's end of the port (QEMU's socket) from now on.
    pub fn serve(port: UnixStream) -> io::Result<HostPorts> {
        Ok(HostPorts { mux: Mux::start(port.into(), LIMITS, None)? })
    }

    /// A stream to the guest's container engine's socket
    /// ([`crate::containers::ENGINE_SOCKET`]); it reads as closed when the
    /// guest has no engine or it does not listen.
    pub fn connect_engine(&self) -> io::Result<UnixStream> {
        let (ours, relayed) = UnixStream::pair()?;
        self.mux.connect(HandOver::ContainerEngine, relayed.into()).map_err(io::Error::other)?;
        Ok(ours)
    }

    /// A stream whose bytes go to `port` on the guest's loopback and back;
    /// it reads as closed (or reset) when the guest could not connect.
    pub fn connect(&self, port: u16) -> io::Result<UnixStream> {
        let (ours, relayed) = UnixStream::pair()?;
        let to = HandOver::Transparent { destination: guest_loopback(port) };
        self.mux.connect(to, relayed.into()).map_err(io::Error::other)?;
        Ok(ours)
    }
}

fn guest_loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// Whether the host's command line gives the guest the port.
pub fn requested() -> bool {
    std::env::args().any(|a| a == PORTS_ARG)
}

/// The guest's end: each open from the host becomes a connection to the
/// guest's loopback. Relays from threads that inherit the caller's signal
/// mask (call it once the agent has blocked its signals).
pub fn serve_guest(device: &Path) -> io::Result<()> {
    let port = std::fs::OpenOptions::new().read(true).write(true).open(device)?;
    let engine = crate::containers::requested().then_some(Path::new(crate::containers::ENGINE_SOCKET));
    Mux::start(OwnedFd::from(port), LIMITS, Some(guest_opener(engine)))?;
    Ok(())
}

/// Connects to what the host asks for, where it is the guest's own
/// loopback, or the container engine's socket (`engine`, airlock's fixed
/// path, when the guest has one); anything else is refused.
fn guest_opener(engine: Option<&'static Path>) -> Opener {
    Box::new(move |to| match to {
        HandOver::Transparent { destination } if destination.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST) => {
            TcpStream::connect_timeout(&destination, CONNECT_TIMEOUT).map(OwnedFd::from)
        }
        HandOver::ContainerEngine => match engine {
            Some(socket) => UnixStream::connect(socket).map(OwnedFd::from),
            None => Err(io::Error::new(io::ErrorKind::NotFound, "the guest has no container engine")),
        },
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "not a port on the guest's loopback")),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// Both ends over a socket pair standing for the virtio-serial port: a
    /// listener on this loopback answers through the host's end, and a
    /// port nothing listens on reads as closed at once.
    #[test]
    fn a_host_connection_reaches_the_guests_loopback() {
        let (host_end, guest_end) = UnixStream::pair().unwrap();
        Mux::start(guest_end.into(), LIMITS, Some(guest_opener(None))).unwrap();
        let ports = HostPorts::serve(host_end).unwrap();

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut asked = [0u8; 4];
            conn.read_exact(&mut asked).unwrap();
            conn.write_all(b"pong").unwrap();
            asked
        });
        let mut conn = ports.connect(port).unwrap();
        conn.write_all(b"ping").unwrap();
        let mut answer = [0u8; 4];
        conn.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"pong");
        assert_eq!(&server.join().unwrap(), b"ping");

        let unused = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port();
        let mut refused = ports.connect(unused).unwrap();
        refused.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let read = refused.read_to_end(&mut got);
        assert!(got.is_empty(), "{read:?}");
    }

    #[test]
    fn the_guest_connects_only_to_its_own_loopback() {
        let open = guest_opener(None);
        let elsewhere = HandOver::Transparent { destination: "192.0.2.1:80".parse().unwrap() };
        assert_eq!(open(elsewhere).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(open(HandOver::Http).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(open(HandOver::ContainerEngine).unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
