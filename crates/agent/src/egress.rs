//! The sandbox's side of the egress proxy: listeners on loopback for the
//! HTTP proxy and SOCKS ports. Each accepted connection is handed, as a file
//! descriptor, to the host's proxy; the agent never reads a byte of it. A
//! program that ignores the proxy settings finds nothing else: the network
//! namespace has only loopback.
//!
//! The listeners live as long as the sandbox. Code inside can make a hand-
//! over fail — too many descriptors in flight for the sandbox's uid
//! (ETOOMANYREFS), no buffer memory (ENOBUFS, ENOMEM), no descriptor left
//! for accept (EMFILE) — and then only that connection fails: it is closed
//! and the next one is tried afresh. Only a channel whose host end is closed
//! ends a listener, and then the sandbox is going anyway.

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use airlock_jail::spawn::AGENT_EGRESS_FD;
use airlock_proto::EgressPorts;

const HTTP: u8 = b'h';
const SOCKS: u8 = b's';

/// How long accept waits before trying again after an error that retrying
/// at once cannot fix (no descriptor or memory left): the connection stays
/// queued meanwhile, and the CPU is not spun.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Binds both ports now (so they are ready before the command starts) and
/// serves them from two threads. The threads inherit the agent's blocked
/// signal mask, so signals still reach the main thread's sigwaitinfo.
pub fn listen(ports: EgressPorts) -> io::Result<()> {
    let http = TcpListener::bind((Ipv4Addr::LOCALHOST, ports.http))?;
    let socks = TcpListener::bind((Ipv4Addr::LOCALHOST, ports.socks))?;
    for (listener, tag) in [(http, HTTP), (socks, SOCKS)] {
        std::thread::Builder::new().name("egress".into()).spawn(move || serve(listener, tag))?;
    }
    Ok(())
}

fn serve(listener: TcpListener, tag: u8) {
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
        match hand_over(channel, tag, &conn) {
            Ok(()) => {}
            Err(e) if channel_gone(&e) => return,
            // This connection fails (closed when `conn` drops); the
            // listener goes on with the next one.
            Err(_) => {}
        }
    }
}

fn hand_over(channel: BorrowedFd<'_>, tag: u8, conn: &TcpStream) -> io::Result<()> {
    loop {
        match airlock_proto::send_tagged_fd(channel, tag, conn.as_fd()) {
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
        hand_over(agent.as_fd(), HTTP, &accepted).unwrap();
        let (tag, _fd) = airlock_proto::recv_tagged_fd(&host).unwrap();
        assert_eq!(tag, HTTP);
        drop(host);
        let err = hand_over(agent.as_fd(), SOCKS, &accepted).unwrap_err();
        assert!(channel_gone(&err), "{err}");
    }
}
