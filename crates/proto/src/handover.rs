//! What a descriptor handed to the egress proxy is, as one small message
//! sent with it over the egress channel (SCM_RIGHTS).
//!
//! The agent (process tier) or the microVM tier's host relay sends each
//! connection the sandbox opened with a [`HandOver`] saying which of
//! airlock's listeners took it and, for a connection the kernel redirected,
//! where the sandbox meant it to go. The destination travels in the message
//! rather than being read from the descriptor by the proxy: the microVM
//! tier hands over socket pairs with a destination it read in the guest.
//!
//! Wire form: a tag byte, then the tag's fixed payload.
//!
//! | tag | what | payload |
//! |-----|------|---------|
//! | `h` | HTTP proxy port | none |
//! | `s` | SOCKS5 port | none |
//! | `t` | transparent (redirected) TCP | family `4` or `6`, 4 or 16 address bytes, port (big-endian) |
//! | `d` | DNS over a stream (RFC 1035 §4.2.2 two-byte length framing) | none |
//! | `u` | a UDP socket the proxy answers DNS datagrams on | none |
//! | `c` | a microVM's container engine's socket (host → guest only) | none |
//!
//! Every message carries exactly one descriptor. A message of a length its
//! tag does not have is refused whole, so a channel can never be read out
//! of step.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// The longest message: tag, family, IPv6 address, port.
pub const MAX_HANDOVER: usize = 1 + 1 + 16 + 2;

const HTTP: u8 = b'h';
const SOCKS: u8 = b's';
const TRANSPARENT: u8 = b't';
const DNS_STREAM: u8 = b'd';
const DNS_DATAGRAM: u8 = b'u';
const CONTAINER_ENGINE: u8 = b'c';

/// One descriptor's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    /// Accepted on the HTTP proxy port.
    Http,
    /// Accepted on the SOCKS5 port.
    Socks,
    /// A TCP connection the sandbox opened to `destination`, which the
    /// kernel (or the guest) redirected to airlock.
    Transparent { destination: SocketAddr },
    /// A stream of DNS queries in RFC 1035 TCP framing.
    DnsStream,
    /// A datagram socket bound inside the sandbox: the proxy reads queries
    /// from it and answers each to its sender. Handed over once.
    DnsDatagram,
    /// Not the proxy's: a connection the host opens into a microVM guest
    /// (over its ports port) to the container engine's socket, a path
    /// fixed by airlock that the host does not name.
    ContainerEngine,
}

impl HandOver {
    /// The message bytes (at most [`MAX_HANDOVER`]).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            HandOver::Http => vec![HTTP],
            HandOver::Socks => vec![SOCKS],
            HandOver::DnsStream => vec![DNS_STREAM],
            HandOver::DnsDatagram => vec![DNS_DATAGRAM],
            HandOver::ContainerEngine => vec![CONTAINER_ENGINE],
            HandOver::Transparent { destination } => {
                let mut out = vec![TRANSPARENT];
                match destination.ip() {
                    IpAddr::V4(ip) => {
                        out.push(4);
                        out.extend_from_slice(&ip.octets());
                    }
                    IpAddr::V6(ip) => {
                        out.push(6);
                        out.extend_from_slice(&ip.octets());
                    }
                }
                out.extend_from_slice(&destination.port().to_be_bytes());
                out
            }
        }
    }

    /// Parses a whole message; `None` for anything that is not exactly one
    /// of the forms above.
    pub fn decode(bytes: &[u8]) -> Option<HandOver> {
        match bytes {
            [HTTP] => Some(HandOver::Http),
            [SOCKS] => Some(HandOver::Socks),
            [DNS_STREAM] => Some(HandOver::DnsStream),
            [DNS_DATAGRAM] => Some(HandOver::DnsDatagram),
            [CONTAINER_ENGINE] => Some(HandOver::ContainerEngine),
            [TRANSPARENT, 4, rest @ ..] if rest.len() == 4 + 2 => {
                let ip = Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3]);
                let port = u16::from_be_bytes([rest[4], rest[5]]);
                Some(HandOver::Transparent { destination: SocketAddr::new(ip.into(), port) })
            }
            [TRANSPARENT, 6, rest @ ..] if rest.len() == 16 + 2 => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&rest[..16]);
                let port = u16::from_be_bytes([rest[16], rest[17]]);
                Some(HandOver::Transparent {
                    destination: SocketAddr::new(Ipv6Addr::from(octets).into(), port),
                })
            }
            _ => None,
        }
    }
}

/// Sends `fd` with its meaning over the egress channel.
pub fn send(socket: impl AsFd, what: &HandOver, fd: BorrowedFd<'_>) -> io::Result<()> {
    send_bytes(socket, &what.encode(), Some(fd))
}

/// Sends one small message, with at most one descriptor, whole: the form
/// of a hand-over, also used by the port connector's answers
/// (`port_connect`).
pub fn send_bytes(socket: impl AsFd, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("control message buffer too small"));
    }
    let sent =
        rustix::net::sendmsg(socket, &[IoSlice::new(bytes)], &mut control, rustix::net::SendFlags::empty())?;
    if sent != bytes.len() {
        // A stream socket takes small messages whole; anything else would
        // leave the channel out of step.
        return Err(io::Error::other("the channel took part of a message"));
    }
    Ok(())
}

/// Receives one hand-over. End of stream is `UnexpectedEof`; a message
/// that is not one of the forms (or came without a descriptor) is
/// `InvalidData`, its descriptor (if any) closed: the caller goes on with
/// the next one.
pub fn recv(socket: impl AsFd) -> io::Result<(HandOver, OwnedFd)> {
    let mut buf = [0u8; MAX_HANDOVER + 1];
    let (len, fd) = recv_bytes(socket, &mut buf)?;
    let Some(fd) = fd else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a hand-over arrived without a descriptor"));
    };
    match HandOver::decode(&buf[..len]) {
        Some(what) => Ok((what, fd)),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, "a hand-over of no known form")),
    }
}

/// Receives one message sent by [`send_bytes`] into `buf`: its length and
/// its descriptor, if one came. End of stream is `UnexpectedEof`.
pub fn recv_bytes(socket: impl AsFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    // The kernel ends a read of a stream socket after the bytes that came
    // with descriptors, so one read is one sender's message.
    let msg = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )?;
    if msg.bytes == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut received = None;
    for message in control.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(mut fds) = message
            && let Some(fd) = fds.next()
        {
            received = Some(fd);
        }
    }
    Ok((msg.bytes, received))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::net::UnixStream;

    use super::*;

    fn all() -> Vec<HandOver> {
        vec![
            HandOver::Http,
            HandOver::Socks,
            HandOver::DnsStream,
            HandOver::DnsDatagram,
            HandOver::ContainerEngine,
            HandOver::Transparent { destination: "203.0.113.9:22".parse().unwrap() },
            HandOver::Transparent { destination: "[2001:db8::7]:443".parse().unwrap() },
            HandOver::Transparent { destination: "0.0.0.0:0".parse().unwrap() },
        ]
    }

    #[test]
    fn every_form_round_trips_and_fits() {
        for what in all() {
            let bytes = what.encode();
            assert!(bytes.len() <= MAX_HANDOVER, "{what:?}");
            assert_eq!(HandOver::decode(&bytes), Some(what));
        }
        // The process tier's and the microVM tier's one-byte tags are these.
        assert_eq!(HandOver::decode(b"h"), Some(HandOver::Http));
        assert_eq!(HandOver::decode(b"s"), Some(HandOver::Socks));
    }

    #[test]
    fn anything_else_is_refused_whole() {
        let v4 = HandOver::Transparent { destination: "203.0.113.9:22".parse().unwrap() }.encode();
        let bad: Vec<Vec<u8>> = vec![
            vec![],
            b"x".to_vec(),
            b"hh".to_vec(),
            b"hs".to_vec(),
            b"t".to_vec(),
            vec![b't', 5, 1, 2, 3, 4, 0, 80],
            v4[..v4.len() - 1].to_vec(),
            [v4.as_slice(), &[0]].concat(),
            vec![b't', 6, 1, 2, 3, 4, 0, 80],
        ];
        for bytes in bad {
            assert_eq!(HandOver::decode(&bytes), None, "{bytes:?}");
        }
        // Every byte string up to two bytes: only the five single tags parse.
        for a in 0..=255u8 {
            let parsed = HandOver::decode(&[a]);
            assert_eq!(parsed.is_some(), b"hsduc".contains(&a), "{a}");
            for b in 0..=255u8 {
                assert_eq!(HandOver::decode(&[a, b]), None);
            }
        }
    }

    /// Messages sent back to back arrive one by one, each with its own
    /// descriptor, however the reader's buffer lines up.
    #[test]
    fn back_to_back_messages_stay_apart() {
        let (host, agent) = UnixStream::pair().unwrap();
        let (r, _w) = std::io::pipe().unwrap();
        for what in all() {
            send(&agent, &what, r.as_fd()).unwrap();
        }
        // The microVM tier's relay still sends bare tags.
        crate::send_tagged_fd(&agent, b's', r.as_fd()).unwrap();
        for what in all() {
            let (got, _fd) = recv(&host).unwrap();
            assert_eq!(got, what);
        }
        assert_eq!(recv(&host).unwrap().0, HandOver::Socks);
        drop(agent);
        assert_eq!(recv(&host).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_malformed_message_costs_only_itself() {
        let (host, agent) = UnixStream::pair().unwrap();
        let (r, _w) = std::io::pipe().unwrap();
        crate::send_tagged_fd(&agent, b'?', r.as_fd()).unwrap();
        send(&agent, &HandOver::DnsStream, r.as_fd()).unwrap();
        assert_eq!(recv(&host).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(recv(&host).unwrap().0, HandOver::DnsStream);
    }
}
