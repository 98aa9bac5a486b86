//! The sandbox's side of the egress proxy: listeners on loopback for the
//! HTTP proxy and SOCKS ports. Each accepted connection is handed, as a file
//! descriptor, to the host's proxy; the agent never reads a byte of it.
//!
//! With transparent egress (`Redirect` in the plan) the kernel sends every
//! other TCP connection to one more listener, and DNS (UDP and TCP) to a
//! resolver port: a redirected connection goes over with the destination
//! the sandbox asked for (read from conntrack), a DNS stream as such, and
//! the resolver's UDP socket once, when its first query arrives, for the
//! proxy to answer on. The host starts its proxy at the first hand-over, so
//! a sandbox that connects nowhere and resolves no name never has one.
//! Without transparent egress a program that ignores the proxy settings
//! finds nothing else: the network namespace has only loopback.
//!
//! The listeners live as long as the sandbox. Code inside can make a hand-
//! over fail — too many descriptors in flight for the sandbox's uid
//! (ETOOMANYREFS), no buffer memory (ENOBUFS, ENOMEM), no descriptor left
//! for accept (EMFILE) — and then only that connection fails: it is closed
//! and the next one is tried afresh. Only a channel whose host end is closed
//! ends a listener, and then the sandbox is going anyway.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use airlock_jail::plan::Redirect;
use airlock_jail::spawn::AGENT_EGRESS_FD;
use airlock_proto::EgressPorts;
use airlock_proto::handover::{self, HandOver};

/// Which of airlock's listeners inside a sandbox (the agent's, or a
/// microVM guest's) a connection came from, and so how it is handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Http,
    Socks,
    /// Redirected TCP: handed over with its original destination.
    Transparent,
    /// DNS over TCP, redirected from port 53.
    DnsStream,
}

/// How long accept waits before trying again after an error that retrying
/// at once cannot fix (no descriptor or memory left): the connection stays
/// queued meanwhile, and the CPU is not spun.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Binds every port now (so they are ready before the command starts) and
/// serves them from a thread each; with `redirect`, hands each of the
/// resolver's UDP sockets to the proxy at its first query. The threads
/// inherit the agent's blocked signal mask, so signals still reach the
/// main thread's sigwaitinfo.
pub fn listen(ports: EgressPorts, redirect: Option<Redirect>) -> io::Result<()> {
    let mut listeners = vec![
        (TcpListener::bind((Ipv4Addr::LOCALHOST, ports.http))?, Listener::Http),
        (TcpListener::bind((Ipv4Addr::LOCALHOST, ports.socks))?, Listener::Socks),
    ];
    let mut resolvers = Vec::new();
    if let Some(redirect) = redirect {
        let mut loopbacks = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        if redirect.ipv6 {
            loopbacks.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
        }
        for ip in loopbacks {
            listeners.push((TcpListener::bind((ip, redirect.tcp_port))?, Listener::Transparent));
            listeners.push((TcpListener::bind((ip, redirect.dns_port))?, Listener::DnsStream));
            resolvers.push(UdpSocket::bind((ip, redirect.dns_port))?);
        }
    }
    for (listener, kind) in listeners {
        std::thread::Builder::new().name("egress".into()).spawn(move || serve(listener, kind))?;
    }
    for resolver in resolvers {
        // SAFETY: as in `serve`.
        let channel = unsafe { BorrowedFd::borrow_raw(AGENT_EGRESS_FD) };
        std::thread::Builder::new()
            .name("egress-dns".into())
            .spawn(move || hand_over_at_first_query(channel, &resolver))?;
    }
    Ok(())
}

/// Hands the resolver's UDP socket to the proxy once a query waits on it
/// (the query stays queued for the proxy to read); the agent's copy closes
/// when this returns. A hand-over that fails for want of resources is
/// tried again after a pause, the query still queued.
fn hand_over_at_first_query(channel: BorrowedFd<'_>, resolver: &UdpSocket) {
    use rustix::event::{PollFd, PollFlags};
    loop {
        let mut fds = [PollFd::new(resolver, PollFlags::IN)];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => {
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        }
        match hand_over(channel, HandOver::DnsDatagram, resolver.as_fd()) {
            Ok(()) => return,
            Err(e) if channel_gone(&e) => return,
            Err(_) => std::thread::sleep(ACCEPT_BACKOFF),
        }
    }
}

/// What goes over with an accepted connection; `None` when it must not go
/// at all: a transparent connection whose destination is loopback was not
/// redirected (a program connected to the listener itself), and one whose
/// destination cannot be read cannot be decided.
pub fn handover_for(kind: Listener, conn: &TcpStream) -> Option<HandOver> {
    Some(match kind {
        Listener::Http => HandOver::Http,
        Listener::Socks => HandOver::Socks,
        Listener::DnsStream => HandOver::DnsStream,
        Listener::Transparent => {
            let destination = airlock_jail::sys::original_destination(conn.as_fd()).ok()?;
            if destination.ip().to_canonical().is_loopback() {
                return None;
            }
            HandOver::Transparent { destination }
        }
    })
}

fn serve(listener: TcpListener, kind: Listener) {
    // SAFETY: the supervisor placed the egress channel at this descriptor
    // number for the agent's whole life; it is only borrowed here.
    let channel = unsafe { BorrowedFd::borrow_raw(AGENT_EGRESS_FD) };
    loop {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) => {
                if accept_needs_backoff(&e) {
                    std::thread::sleep(ACCEPT_BACKOFF);
                }
                continue;
            }
        };
        let Some(what) = handover_for(kind, &conn) else { continue };
        match hand_over(channel, what, conn.as_fd()) {
            Ok(()) => {}
            Err(e) if channel_gone(&e) => return,
            // This connection fails (closed when `conn` drops); the
            // listener goes on with the next one.
            Err(_) => {}
        }
    }
}

fn hand_over(channel: BorrowedFd<'_>, what: HandOver, fd: BorrowedFd<'_>) -> io::Result<()> {
    loop {
        match handover::send(channel, &what, fd) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The host's end of the egress channel is closed: nothing will ever be
/// handed over again.
fn channel_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN))
}

/// Accept errors other than a connection that went away before it was
/// accepted (or a signal) are retried after a pause, so a sandbox out of
/// descriptors or memory does not make this thread spin.
fn accept_needs_backoff(e: &io::Error) -> bool {
    !matches!(e.raw_os_error(), Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO | libc::EPERM))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn errno(n: i32) -> io::Error {
        io::Error::from_raw_os_error(n)
    }

    #[test]
    fn only_a_closed_channel_ends_a_listener() {
        for gone in [libc::EPIPE, libc::ECONNRESET, libc::ENOTCONN] {
            assert!(channel_gone(&errno(gone)), "{gone}");
        }
        for transient in [libc::ETOOMANYREFS, libc::ENOBUFS, libc::ENOMEM, libc::EAGAIN, libc::EMFILE] {
            assert!(!channel_gone(&errno(transient)), "{transient}");
        }
        assert!(!channel_gone(&io::Error::other("not an errno")));
    }

    #[test]
    fn accept_backs_off_when_out_of_descriptors_or_memory() {
        for pause in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM, libc::EINVAL] {
            assert!(accept_needs_backoff(&errno(pause)), "{pause}");
        }
        for at_once in [libc::EINTR, libc::ECONNABORTED] {
            assert!(!accept_needs_backoff(&errno(at_once)), "{at_once}");
        }
    }

    /// Over a real channel: a hand-over arrives with its tag, and once the
    /// host's end is closed the error is the one that ends the listener.
    #[test]
    fn a_closed_host_end_is_told_apart() {
        use std::os::unix::net::UnixStream;
        let (host, agent) = UnixStream::pair().unwrap();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        hand_over(agent.as_fd(), HandOver::Http, accepted.as_fd()).unwrap();
        let (what, _fd) = handover::recv(&host).unwrap();
        assert_eq!(what, HandOver::Http);
        drop(host);
        let err = hand_over(agent.as_fd(), HandOver::Socks, accepted.as_fd()).unwrap_err();
        assert!(channel_gone(&err), "{err}");
    }

    /// The resolver's socket goes over at its first query, not before,
    /// with that query still queued on it for the proxy to read.
    #[test]
    fn the_resolver_goes_over_at_its_first_query_with_the_query() {
        use std::os::unix::net::UnixStream;
        let (host, agent) = UnixStream::pair().unwrap();
        let resolver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let address = resolver.local_addr().unwrap();
        let waiter = std::thread::spawn(move || hand_over_at_first_query(agent.as_fd(), &resolver));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(rustix::io::ioctl_fionread(&host).unwrap(), 0, "handed over before any query");

        let asker = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        asker.send_to(b"query", address).unwrap();
        waiter.join().unwrap();
        let (what, fd) = handover::recv(&host).unwrap();
        assert_eq!(what, HandOver::DnsDatagram);
        let handed = UdpSocket::from(fd);
        let mut buf = [0u8; 16];
        let (n, from) = handed.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"query"[..], asker.local_addr().unwrap()));
    }

    /// A connection made to the transparent listener itself (not
    /// redirected) reads as going to loopback and is not handed over; the
    /// other listeners' connections always are.
    #[test]
    fn only_redirected_connections_go_over_as_transparent() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(handover_for(Listener::Transparent, &accepted), None);
        assert_eq!(handover_for(Listener::Http, &accepted), Some(HandOver::Http));
        assert_eq!(handover_for(Listener::DnsStream, &accepted), Some(HandOver::DnsStream));
    }
}
