//! Connections the sandbox's kernel redirected to airlock (transparent
//! egress): programs that know nothing of proxies.
//!
//! Each is decided exactly as a CONNECT or SOCKS connect to the same
//! destination would be. The destination is the name airlock's resolver
//! gave the address for (see [`crate::dns`]) or, for any other address, the
//! address itself; then the same path: policy on the name, resolution on
//! the host, the private-range guard on every address, a connection to the
//! address checked (so rebinding gets nowhere), and
//!
//! - on port 80, the requests served as the HTTP proxy port serves plain
//!   requests (each request's Host must name the destination; method and
//!   path rules apply; never secrets);
//! - on any other port, the tunnel's checks of the client's first flight
//!   (a ClientHello naming the host for a name, so SNI must name the host
//!   on 443), or interception where the policy must see requests or
//!   substitute secrets.
//!
//! A refused connection is reset at once (never left to hang), with the
//! reason in the net log; every event carries the path (`transparent`) and
//! the address the sandbox connected to.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::dns::Mapped;
use crate::event::Handling;
use crate::intercept::Scheme;
use crate::proxy::{EventBuilder, Port, Refusal, Shared, open_upstream};

/// The plain HTTP port: its requests are read, as the proxy port's are.
const HTTP_PORT: u16 = 80;

pub(crate) async fn serve(shared: Arc<Shared>, client: TcpStream, destination: SocketAddr) {
    let port = destination.port();
    let ip = destination.ip().to_canonical();
    let mapped = match shared.names.lock() {
        Ok(names) => names.lookup(ip),
        Err(poisoned) => poisoned.into_inner().lookup(ip),
    };
    let host = match &mapped {
        Mapped::Name(name) => name.clone(),
        Mapped::Outside | Mapped::Unassigned => ip.to_string(),
    };
    let mut ev = EventBuilder::new(Port::Transparent, &host, port);
    ev.destination = Some(destination);
    let refusal = match mapped {
        Mapped::Unassigned => Some(format!(
            "{ip} is an address of airlock's resolver that it gave to no name (any more); look the name up again"
        )),
        // The agent hands over only connections its kernel redirected,
        // which never go to loopback; a channel that says otherwise is not
        // believed.
        _ if ip.is_loopback() => Some(format!("{ip} is the sandbox's own loopback, never redirected")),
        _ => None,
    };
    if let Some(reason) = refusal {
        shared.sink.record(ev.event(false, &reason, Handling::Refused));
        return reset(client);
    }
    let (upstream, addr, rule) = match open_upstream(&shared, &host, port).await {
        Ok(opened) => opened,
        Err(refusal) => {
            let unreachable = matches!(refusal, Refusal::Unreachable(_));
            shared.sink.record(ev.event(unreachable, refusal.reason(), Handling::Refused));
            return reset(client);
        }
    };
    if port == HTTP_PORT {
        crate::intercept::serve_requests(shared, client, upstream, addr, ev, Scheme::Http).await;
        return;
    }
    if let Some(refused) = crate::tunnel::relay(shared, client, upstream, addr, rule, ev).await {
        reset(refused);
    }
}

/// Ends a refused connection with a reset (SO_LINGER 0), so the program
/// inside fails at once with ECONNRESET instead of reading an end of
/// stream it could take for an answer.
fn reset(stream: TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        // A socket pair (the microVM tier's hand-over) has no reset: it
        // is closed.
        tracing::debug!("cannot reset a refused transparent connection: {e}");
    }
    drop(stream);
}
