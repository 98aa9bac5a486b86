//! After CONNECT or a SOCKS connect: either pass the bytes through
//! untouched once the client's first flight passed the checks below, or,
//! where the policy must see requests, hand over to interception.
//!
//! What a tunnel must start with (fail closed: what cannot be checked is
//! refused, never waved through after a while):
//!
//! - **To a name** (`CONNECT api.example.com:443`): a whole TLS ClientHello
//!   naming that host (case and a trailing dot aside), without an encrypted
//!   server name (ECH/ESNI: the visible name would be the front end's only);
//!   or an SSH client's identification line (`SSH-2.0-`), a protocol that
//!   has no name for a front end to route by. Anything else — a ClientHello
//!   naming another server or none, one over [`MAX_CLIENT_HELLO`], a
//!   malformed one, plain HTTP or any other protocol — is refused: the name
//!   was all the policy decided on.
//! - **To an address** (`CONNECT 192.0.2.7:443`): the policy named the
//!   address, so bytes that do not start like TLS pass; but anything that
//!   does must be a whole, well-formed ClientHello that names no server (or
//!   that address), since a name would pick a virtual host the policy never
//!   saw.
//!
//! The client's first bytes are checked whenever they come: there is no
//! timer after which they pass unchecked. Bytes from upstream are relayed
//! meanwhile, so protocols whose server speaks first work to addresses.
//! A tunnel to a name whose ClientHello is not whole within
//! [`HELLO_TIMEOUT`] is refused.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::event::Handling;
use crate::proxy::{EventBuilder, Shared};
use crate::sni::{ClientHelloPeek, MAX_CLIENT_HELLO, peek_client_hello};

/// How long a client tunnelling to a name has to send its whole
/// ClientHello; real clients send it at once.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Relay buffer per direction: large transfers cost a fraction of the
/// system calls they would with tokio's 8 KiB default, and 1 MiB (what the
/// bench's bare relay uses) gained about 12% over 256 KiB (bench/README.md).
/// Pages are touched only as data fills them, and the proxy process is in
/// the sandbox's memory cgroup, so many tunnels cost the sandbox's budget,
/// not the host's.
const RELAY_BUFFER: usize = 1024 * 1024;
/// The identification lines an SSH client starts with (RFC 4253 §4.2).
const SSH_IDENTIFICATIONS: [&[u8]; 2] = [b"SSH-2.0-", b"SSH-1.99-"];

/// Relays a tunnel to its end. Returns the client when its first flight
/// was refused (or a side closed before it was decided), for the caller to
/// end as its path ends refusals: a CONNECT or SOCKS client with a close, a
/// transparent connection with a reset.
pub(crate) async fn relay<C>(
    shared: Arc<Shared>,
    mut client: C,
    mut upstream: TcpStream,
    addr: SocketAddr,
    rule: String,
    ev: EventBuilder,
) -> Option<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if shared.must_intercept(&ev.host, ev.port) {
        crate::intercept::run(shared, client, upstream, addr, ev).await;
        return None;
    }
    let destination = Destination::of(&ev.host);
    // A program that opened its own socket to a name airlock's resolver
    // gave it may speak any protocol there (a database's, say); what could
    // pick another server behind the same address is still checked.
    let plain =
        if matches!(ev.via, crate::proxy::Port::Transparent) { Plain::Opaque } else { Plain::Refused };
    let (outcome, first_in) =
        first_flight(&mut client, &mut upstream, &destination, plain, HELLO_TIMEOUT).await;
    let mut event = match &outcome {
        FirstFlight::Refused(reason) => ev.event(false, reason, Handling::Refused),
        FirstFlight::Pass(_) | FirstFlight::Closed => ev.event(true, &rule, Handling::Tunnel),
    };
    event.address = Some(addr.to_string());
    event.bytes_in = first_in;
    let first = match outcome {
        FirstFlight::Pass(first) => first,
        FirstFlight::Refused(_) | FirstFlight::Closed => {
            shared.sink.record(event);
            return Some(client);
        }
    };
    let mut out = first.len() as u64;
    if upstream.write_all(&first).await.is_err() {
        out = 0;
    }
    let (more_out, more_in) =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, RELAY_BUFFER, RELAY_BUFFER)
            .await
            .unwrap_or((0, 0));
    event.bytes_out = out + more_out;
    event.bytes_in += more_in;
    shared.sink.record(event);
    None
}

/// What a tunnel to a name may carry besides TLS and SSH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plain {
    /// Nothing: a CONNECT or SOCKS client names the host, and plain bytes
    /// would reach whatever server the front end at that address picks.
    Refused,
    /// A transparent connection: any protocol but those whose bytes name
    /// a server (HTTP/1 requests, whose Host a front end routes by, and
    /// HTTP/2's prior-knowledge preface); a server that speaks first
    /// (SMTP, MySQL) is waited for as it is for an address.
    Opaque,
}

/// The requests a plain-HTTP front end routes by their Host header (and
/// HTTP/2's cleartext preface, `PRI * HTTP/2.0`).
const HTTP_REQUEST_STARTS: [&[u8]; 10] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PRI ",
];

/// What the tunnel was asked for, as the first flight is checked against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Destination {
    /// A host name, normalized (lowercase, no trailing dot).
    Name(String),
    Address(IpAddr),
}

impl Destination {
    pub fn of(host: &str) -> Destination {
        let host = crate::rules::normalize_host(host);
        match host.parse::<IpAddr>() {
            Ok(ip) => Destination::Address(ip),
            Err(_) => Destination::Name(host),
        }
    }

    fn shown(&self) -> String {
        match self {
            Destination::Name(name) => name.clone(),
            Destination::Address(ip) => ip.to_string(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FirstFlight {
    /// Checked: these bytes (the client's so far) go upstream, then the rest.
    Pass(Vec<u8>),
    /// Refused, and why (for the audit log).
    Refused(String),
    /// Either side closed before the client's first bytes were decided.
    Closed,
}

/// Reads the client's first bytes until they can be decided on, relaying
/// what upstream sends meanwhile. Returns the decision and the bytes
/// relayed from upstream.
pub(crate) async fn first_flight<C, U>(
    client: &mut C,
    upstream: &mut U,
    destination: &Destination,
    plain: Plain,
    timeout: Duration,
) -> (FirstFlight, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + Unpin,
{
    let mut first = Vec::new();
    let mut from_client = vec![0u8; 16 * 1024];
    let mut from_upstream = vec![0u8; 16 * 1024];
    let mut relayed_in = 0u64;
    let mut decide_at = 1;
    let started = tokio::time::Instant::now();
    // A name needs a ClientHello from the start; an address only once the
    // client began one.
    let mut deadline =
        (matches!(destination, Destination::Name(_)) && plain == Plain::Refused).then(|| started + timeout);
    loop {
        let until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = client.read(&mut from_client) => {
                let n = match read {
                    Ok(0) | Err(_) => return (FirstFlight::Closed, relayed_in),
                    Ok(n) => n,
                };
                first.extend_from_slice(&from_client[..n]);
                // Parsing again after every small piece would cost the
                // square of the hello's size: wait until it can matter.
                if first.len() < decide_at {
                    continue;
                }
                match decide(&first, destination, plain) {
                    Verdict::Undecided { at_least } => {
                        decide_at = at_least;
                        deadline.get_or_insert(started + timeout);
                    }
                    Verdict::Pass => return (FirstFlight::Pass(first), relayed_in),
                    Verdict::Refuse(reason) => return (FirstFlight::Refused(reason), relayed_in),
                }
            }
            read = upstream.read(&mut from_upstream) => {
                let n = match read {
                    Ok(0) | Err(_) => return (FirstFlight::Closed, relayed_in),
                    Ok(n) => n,
                };
                if client.write_all(&from_upstream[..n]).await.is_err() {
                    return (FirstFlight::Closed, relayed_in);
                }
                relayed_in += n as u64;
            }
            () = until_deadline => {
                let reason = format!(
                    "no whole TLS ClientHello within {} s of opening the tunnel to {}",
                    timeout.as_secs_f32(),
                    destination.shown()
                );
                return (FirstFlight::Refused(reason), relayed_in);
            }
        }
    }
}

enum Verdict {
    /// Ask again once the client sent at least `at_least` bytes.
    Undecided {
        at_least: usize,
    },
    Pass,
    Refuse(String),
}

/// The decision on the client's first bytes (see the module's rules).
fn decide(first: &[u8], destination: &Destination, plain: Plain) -> Verdict {
    let to = destination.shown();
    match peek_client_hello(first) {
        ClientHelloPeek::NeedMore { at_least } => Verdict::Undecided { at_least },
        ClientHelloPeek::TooLarge => Verdict::Refuse(format!(
            "the TLS ClientHello to {to} is larger than {} KiB",
            MAX_CLIENT_HELLO / 1024
        )),
        ClientHelloPeek::Malformed(why) => Verdict::Refuse(format!("{why} (tunnel to {to})")),
        ClientHelloPeek::Complete(hello) => {
            if let Some(ext) = hello.hidden_name {
                return Verdict::Refuse(format!(
                    "the TLS ClientHello to {to} hides its server name (encrypted extension {ext:#06x}, ECH or \
                     ESNI), so the server it reaches cannot be checked"
                ));
            }
            let sni = hello.sni.as_deref().map(|s| s.strip_suffix('.').unwrap_or(s));
            match (destination, sni) {
                (Destination::Name(name), Some(sni)) if sni == name => Verdict::Pass,
                (Destination::Name(_), None) => Verdict::Refuse(format!(
                    "the TLS ClientHello names no server, but the tunnel was opened to {to}: a front end \
                     would pick the server"
                )),
                (Destination::Address(_), None) => Verdict::Pass,
                (Destination::Address(ip), Some(sni)) if sni.parse::<IpAddr>() == Ok(*ip) => Verdict::Pass,
                (_, Some(sni)) => Verdict::Refuse(format!(
                    "TLS server name {sni} differs from the requested host {to} (domain fronting is refused)"
                )),
            }
        }
        ClientHelloPeek::NotTls => match destination {
            Destination::Address(_) => Verdict::Pass,
            Destination::Name(_) if plain == Plain::Opaque => {
                let prefix_of = |start: &[u8]| start.starts_with(&first[..first.len().min(start.len())]);
                if HTTP_REQUEST_STARTS.iter().any(|start| first.starts_with(start)) {
                    Verdict::Refuse(format!(
                        "plain HTTP to {to} on a port other than 80, whose Host a front end could route by, is not \
                         checked: use port 80 or https"
                    ))
                } else if HTTP_REQUEST_STARTS.iter().any(|start| prefix_of(start)) {
                    Verdict::Undecided { at_least: first.len() + 1 }
                } else {
                    Verdict::Pass
                }
            }
            Destination::Name(_) => {
                let prefix_of = |id: &[u8]| id.starts_with(&first[..first.len().min(id.len())]);
                if SSH_IDENTIFICATIONS.iter().any(|id| first.starts_with(id)) {
                    Verdict::Pass
                } else if SSH_IDENTIFICATIONS.iter().any(|id| prefix_of(id)) {
                    Verdict::Undecided { at_least: first.len() + 1 }
                } else {
                    Verdict::Refuse(format!(
                        "the tunnel to {to} does not start with TLS (or SSH), so the server it reaches cannot \
                         be checked; send plain HTTP as a proxy request (http://…), where its Host is checked"
                    ))
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tokio::io::duplex;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(1);

    /// A ClientHello with the given server_name host names (none: no
    /// extension) and extra extensions, in records of `fragment` bytes.
    fn hello(names: &[&str], extra: &[u8], fragment: usize) -> Vec<u8> {
        let mut ext = Vec::new();
        if !names.is_empty() {
            let mut list = Vec::new();
            for name in names {
                list.push(0);
                list.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
                list.extend_from_slice(name.as_bytes());
            }
            ext.extend_from_slice(&[0, 0]);
            ext.extend_from_slice(&u16::try_from(list.len() + 2).unwrap().to_be_bytes());
            ext.extend_from_slice(&u16::try_from(list.len()).unwrap().to_be_bytes());
            ext.extend_from_slice(&list);
        }
        ext.extend_from_slice(extra);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&u16::try_from(ext.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&ext);
        let mut message = vec![1];
        message.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        let mut out = Vec::new();
        for piece in message.chunks(fragment) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&u16::try_from(piece.len()).unwrap().to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    fn padding(len: usize) -> Vec<u8> {
        let mut ext = vec![0, 21];
        ext.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        ext.extend(std::iter::repeat_n(0, len));
        ext
    }

    fn verdict(first: &[u8], to: &str) -> Result<(), String> {
        match decide(first, &Destination::of(to), Plain::Refused) {
            Verdict::Pass => Ok(()),
            Verdict::Refuse(reason) => Err(reason),
            Verdict::Undecided { .. } => Err("undecided".into()),
        }
    }

    #[test]
    fn a_name_needs_a_hello_naming_it() {
        let to = "api.example.com";
        assert_eq!(verdict(&hello(&["api.example.com"], &[], 16384), to), Ok(()));
        // Case and a trailing dot on either side do not matter.
        assert_eq!(verdict(&hello(&["API.Example.com."], &[], 16384), to), Ok(()));
        assert_eq!(verdict(&hello(&["api.example.com"], &[], 16384), "API.EXAMPLE.COM."), Ok(()));
        // Split in records of every size, and over 16 KiB.
        for fragment in [1, 7, 100] {
            assert_eq!(verdict(&hello(&["api.example.com"], &[], fragment), to), Ok(()));
        }
        let big = hello(&["api.example.com"], &padding(30_000), 16384);
        assert!(big.len() > 16 * 1024);
        assert_eq!(verdict(&big, to), Ok(()));

        let refusals = [
            (hello(&["other.example.org"], &[], 16384), "differs from the requested host"),
            (hello(&["other.example.org"], &padding(30_000), 16384), "differs from the requested host"),
            (hello(&["other.example.org"], &[], 3), "differs from the requested host"),
            (hello(&["api.example.com.evil.example.net"], &[], 16384), "differs"),
            (hello(&[], &[], 16384), "names no server"),
            (hello(&["api.example.com", "other.example.org"], &[], 16384), "more than one server"),
            (hello(&["api.example.com"], &[0xfe, 0x0d, 0, 4, 1, 2, 3, 4], 16384), "hides its server name"),
            (hello(&["api.example.com"], &[0xff, 0xce, 0, 1, 0], 16384), "hides its server name"),
            (hello(&["api.example.com"], &padding(65_000), 500), "larger than 64 KiB"),
            ([b"\x14\x03\x03\x00\x01\x01".as_slice(), &hello(&[to], &[], 16384)].concat(), "not a handshake"),
            (b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n".to_vec(), "does not start with TLS"),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f".to_vec(), "does not start with TLS"),
            (b"SSH-3.0-x\r\n".to_vec(), "does not start with TLS"),
        ];
        for (input, why) in refusals {
            let got = verdict(&input, to);
            assert!(got.as_ref().is_err_and(|r| r.contains(why)), "{why}: {got:?}");
        }
        // An SSH client's identification passes; its first bytes wait.
        assert_eq!(verdict(b"SSH-2.0-OpenSSH_9.2\r\n", to), Ok(()));
        assert_eq!(verdict(b"SSH-1.99-x\r\n", to), Ok(()));
        assert_eq!(verdict(b"SSH-2", to), Err("undecided".into()));
    }

    #[test]
    fn an_address_takes_no_name_and_any_other_protocol() {
        let to = "192.0.2.7";
        assert_eq!(verdict(&hello(&[], &[], 16384), to), Ok(()));
        assert_eq!(verdict(&hello(&["192.0.2.7"], &[], 16384), to), Ok(()));
        assert_eq!(verdict(b"GET / HTTP/1.1\r\n\r\n", to), Ok(()));
        assert_eq!(verdict(b"SSH-2.0-x\r\n", "::1"), Ok(()));
        for (input, why) in [
            (hello(&["other.example.org"], &[], 16384), "differs from the requested host 192.0.2.7"),
            (hello(&["192.0.2.8"], &[], 16384), "differs"),
            (hello(&[], &[0xfe, 0x0d, 0, 1, 0], 16384), "hides its server name"),
            (b"\x17\x03\x03\x00\x01x".to_vec(), "not a handshake"),
        ] {
            let got = verdict(&input, to);
            assert!(got.as_ref().is_err_and(|r| r.contains(why)), "{why}: {got:?}");
        }
    }

    fn transparent_verdict(first: &[u8], to: &str) -> Result<(), String> {
        match decide(first, &Destination::of(to), Plain::Opaque) {
            Verdict::Pass => Ok(()),
            Verdict::Refuse(reason) => Err(reason),
            Verdict::Undecided { .. } => Err("undecided".into()),
        }
    }

    /// A transparent connection to a name carries any protocol, but TLS
    /// must still name the host and HTTP requests (and h2c's preface),
    /// which a front end routes by Host, are refused off port 80.
    #[test]
    fn a_transparent_tunnel_to_a_name_carries_opaque_protocols_but_no_other_server_name() {
        let to = "db.example.com";
        // A PostgreSQL startup message, an SSLRequest, a MySQL client's
        // answer, SSH: none names a server.
        for opaque in [
            &b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..],
            b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00app\x00",
            b"SSH-2.0-x\r\n",
            b"EHLO sandbox\r\n",
        ] {
            assert_eq!(transparent_verdict(opaque, to), Ok(()), "{opaque:?}");
        }
        assert_eq!(transparent_verdict(&hello(&["db.example.com"], &[], 16384), to), Ok(()));
        let other = transparent_verdict(&hello(&["other.example.org"], &[], 16384), to);
        assert!(other.as_ref().is_err_and(|r| r.contains("domain fronting")), "{other:?}");
        for http in
            [&b"GET / HTTP/1.1\r\nHost: other.example.org\r\n\r\n"[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]
        {
            let got = transparent_verdict(http, to);
            assert!(got.as_ref().is_err_and(|r| r.contains("plain HTTP")), "{got:?}");
        }
        // What could still become a request waits for more.
        assert_eq!(transparent_verdict(b"GE", to), Err("undecided".into()));
        // The explicit proxy's tunnels keep refusing plain bytes to a name.
        assert!(verdict(b"\x00\x00\x00\x08\x04\xd2\x16\x2f", to).is_err());
    }

    /// A server that speaks first (SMTP, MySQL) is waited for on a
    /// transparent connection to a name, as it is for an address: its
    /// banner reaches the client, and the client's answer passes.
    #[tokio::test]
    async fn a_transparent_tunnel_to_a_name_waits_for_a_server_that_speaks_first() {
        let (mut proxy_side, mut sandbox) = duplex(1 << 16);
        let (mut upstream, mut server) = duplex(1 << 16);
        server.write_all(b"220 mail.example.com ESMTP\r\n").await.unwrap();
        let client = tokio::spawn(async move {
            let mut banner = [0u8; 28];
            sandbox.read_exact(&mut banner).await.unwrap();
            // Longer than the timeout a tunnel to a name otherwise gets.
            tokio::time::sleep(TIMEOUT + Duration::from_millis(200)).await;
            sandbox.write_all(b"EHLO sandbox\r\n").await.unwrap();
            (banner, sandbox)
        });
        let destination = Destination::of("mail.example.com");
        let (outcome, relayed) =
            first_flight(&mut proxy_side, &mut upstream, &destination, Plain::Opaque, TIMEOUT).await;
        let (banner, _sandbox) = client.await.unwrap();
        assert_eq!(&banner, b"220 mail.example.com ESMTP\r\n");
        assert_eq!(relayed, 28);
        assert_eq!(outcome, FirstFlight::Pass(b"EHLO sandbox\r\n".to_vec()));
        drop(server);
    }

    /// Runs `first_flight` with a client that sends `pieces` with `pause`
    /// before each and then reads until the proxy lets go, and an upstream
    /// that sends `banner` at once (and then closes, if `close_upstream`).
    /// Returns the outcome and what the client received.
    async fn flight(
        to: &str,
        pieces: Vec<Vec<u8>>,
        pause: Duration,
        banner: &[u8],
        close_upstream: bool,
    ) -> (FirstFlight, Vec<u8>) {
        let (mut proxy_side, mut sandbox) = duplex(1 << 20);
        let (mut upstream, mut server) = duplex(1 << 20);
        server.write_all(banner).await.unwrap();
        let server = (!close_upstream).then_some(server);
        let sandbox_task = tokio::spawn(async move {
            for piece in pieces {
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                if sandbox.write_all(&piece).await.is_err() {
                    break;
                }
            }
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), sandbox.read_to_end(&mut got)).await;
            got
        });
        let (outcome, _) =
            first_flight(&mut proxy_side, &mut upstream, &Destination::of(to), Plain::Refused, TIMEOUT).await;
        drop(proxy_side);
        drop(server);
        (outcome, sandbox_task.await.unwrap())
    }

    #[tokio::test]
    async fn a_late_hello_is_still_checked() {
        // Sent after a pause (longer than any grace period a proxy might
        // give), in two pieces: checked all the same.
        let good = hello(&["api.example.com"], &[], 16384);
        let (a, b) = good.split_at(20);
        let (outcome, _) =
            flight("api.example.com", vec![a.to_vec(), b.to_vec()], Duration::from_millis(100), b"", false)
                .await;
        assert_eq!(outcome, FirstFlight::Pass(good.clone()));

        // Byte by byte, in records of one byte each.
        let trickled = hello(&["api.example.com"], &padding(100), 1);
        let pieces: Vec<Vec<u8>> = trickled.iter().map(|b| vec![*b]).collect();
        let (outcome, _) = flight("api.example.com", pieces, Duration::ZERO, b"", false).await;
        let passed = matches!(&outcome, FirstFlight::Pass(bytes) if *bytes == trickled);
        assert!(
            passed,
            "{}",
            match outcome {
                FirstFlight::Pass(bytes) => format!("passed {} bytes", bytes.len()),
                other => format!("{other:?}"),
            }
        );

        let bad = hello(&["other.example.org"], &[], 16384);
        let (outcome, _) = flight("api.example.com", vec![bad], Duration::from_millis(100), b"", false).await;
        assert!(matches!(outcome, FirstFlight::Refused(ref r) if r.contains("differs")), "{outcome:?}");
    }

    #[tokio::test]
    async fn a_name_without_a_whole_hello_in_time_is_refused() {
        // Silent, and half a hello.
        let (outcome, _) = flight("api.example.com", vec![], Duration::ZERO, b"", false).await;
        assert!(matches!(outcome, FirstFlight::Refused(ref r) if r.contains("no whole TLS ClientHello")));
        let half = hello(&["api.example.com"], &[], 16384)[..30].to_vec();
        let (outcome, _) = flight("api.example.com", vec![half], Duration::ZERO, b"", false).await;
        assert!(matches!(outcome, FirstFlight::Refused(ref r) if r.contains("no whole TLS ClientHello")));
    }

    #[tokio::test]
    async fn a_server_speaking_first_is_relayed_while_the_client_is_checked() {
        // To an address: the server's banner reaches the client, whose
        // answer (not TLS) then passes.
        let (outcome, got) = flight(
            "192.0.2.7",
            vec![b"HELO x\r\n".to_vec()],
            Duration::from_millis(50),
            b"220 ready\r\n",
            false,
        )
        .await;
        assert_eq!(got, b"220 ready\r\n");
        assert_eq!(outcome, FirstFlight::Pass(b"HELO x\r\n".to_vec()));
        // To a name, the same answer is refused.
        let (outcome, got) = flight(
            "mail.example.com",
            vec![b"HELO x\r\n".to_vec()],
            Duration::from_millis(50),
            b"220 ready\r\n",
            false,
        )
        .await;
        assert_eq!(got, b"220 ready\r\n");
        assert!(matches!(outcome, FirstFlight::Refused(ref r) if r.contains("does not start with TLS")));
        // An address with a silent client has no deadline: it ends when a side closes.
        let (outcome, _) = flight("192.0.2.7", vec![], Duration::ZERO, b"", true).await;
        assert_eq!(outcome, FirstFlight::Closed);
    }
}
