//! The port connector's channel: the supervisor asks for a connection to a
//! port on the sandbox's loopback, and the connector (a small process in
//! the sandbox's network namespace, `runtime::ports`) answers with the
//! connected socket, or with why it could not connect.
//!
//! One request at a time, answered before the next is sent, so a message
//! without a descriptor cannot run into the next one.
//!
//! | direction | bytes | descriptor |
//! |-----------|-------|------------|
//! | request | the port, two bytes big-endian | none |
//! | connected | `c` | the socket |
//! | refused | `e`, then the errno, four bytes big-endian | none |

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use crate::handover::{recv_bytes, send_bytes};

const CONNECTED: u8 = b'c';
const FAILED: u8 = b'e';

/// Asks for a connection to `port`.
pub fn send_request(mut channel: impl Write, port: u16) -> io::Result<()> {
    channel.write_all(&port.to_be_bytes())
}

/// Reads the next request; `UnexpectedEof` once the supervisor is gone.
pub fn recv_request(mut channel: impl Read) -> io::Result<u16> {
    let mut bytes = [0u8; 2];
    channel.read_exact(&mut bytes)?;
    Ok(u16::from_be_bytes(bytes))
}

/// Answers the request just read: the connected socket, or the error.
pub fn send_answer(channel: impl AsFd, answer: Result<&OwnedFd, &io::Error>) -> io::Result<()> {
    match answer {
        Ok(fd) => send_bytes(channel, &[CONNECTED], Some(fd.as_fd())),
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(rustix::io::Errno::IO.raw_os_error());
            let mut bytes = vec![FAILED];
            bytes.extend_from_slice(&errno.to_be_bytes());
            send_bytes(channel, &bytes, None)
        }
    }
}

/// Reads the answer to a request: the connected socket, or the
/// connector's error (as an OS error, so it reads like a local one).
/// A malformed answer is `InvalidData`.
pub fn recv_answer(channel: impl AsFd) -> io::Result<OwnedFd> {
    let mut buf = [0u8; 8];
    let (len, fd) = recv_bytes(channel, &mut buf)?;
    match (&buf[..len], fd) {
        ([CONNECTED], Some(fd)) => Ok(fd),
        ([FAILED, a, b, c, d], None) => {
            Err(io::Error::from_raw_os_error(i32::from_be_bytes([*a, *b, *c, *d])))
        }
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "the port connector answered out of form")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::{Ipv4Addr, TcpListener};
    use std::os::unix::net::UnixStream;

    use super::*;

    /// Over a real channel: a request arrives as sent, a connected socket
    /// comes back as a descriptor, and a failure as its errno.
    #[test]
    fn requests_and_both_answers_cross_a_channel() {
        let (host, connector) = UnixStream::pair().unwrap();
        send_request(&host, 3000).unwrap();
        assert_eq!(recv_request(&connector).unwrap(), 3000);

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let socket = OwnedFd::from(std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap());
        send_answer(&connector, Ok(&socket)).unwrap();
        let got = std::net::TcpStream::from(recv_answer(&host).unwrap());
        assert_eq!(got.peer_addr().unwrap(), listener.local_addr().unwrap());

        let refused = io::Error::from_raw_os_error(rustix::io::Errno::CONNREFUSED.raw_os_error());
        send_answer(&connector, Err(&refused)).unwrap();
        let err = recv_answer(&host).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(rustix::io::Errno::CONNREFUSED.raw_os_error()));

        crate::handover::send_bytes(&connector, b"x", None).unwrap();
        assert_eq!(recv_answer(&host).unwrap_err().kind(), io::ErrorKind::InvalidData);
        drop(connector);
        assert_eq!(recv_request(&host).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
