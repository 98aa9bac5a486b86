//! The sandbox's side of the egress proxy: listeners on loopback for the
//! HTTP proxy and SOCKS ports. Each accepted connection is handed, as a file
//! descriptor, to the host's proxy; the agent never reads a byte of it. A
//! program that ignores the proxy settings finds nothing else: the network
//! namespace has only loopback.

use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd};

use airlock_jail::spawn::AGENT_EGRESS_FD;
use airlock_proto::EgressPorts;

const HTTP: u8 = b'h';
const SOCKS: u8 = b's';

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
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        // The supervisor gone means the sandbox is going too.
        if airlock_proto::send_tagged_fd(channel, tag, conn.as_fd()).is_err() {
            return;
        }
    }
}
