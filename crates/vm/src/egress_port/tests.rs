//! The port's two ends in one process, joined by a socket pair standing in
//! for the virtio-serial port, with real sockets for the connections.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::frame::Frame;
use super::mux::{Limits, Mux};
use super::*;

const SMALL: Limits = Limits { max_conns: 8, window: 4096, outbox_bytes: 16 * 1024 };

/// A guest end and a host end; each connection the host accepts arrives
/// on the receiver as (what the guest said it is, the proxy's end).
fn pair(limits: Limits) -> (Mux, Mux, mpsc::Receiver<(HandOver, UnixStream)>) {
    let (guest_port, host_port) = UnixStream::pair().unwrap();
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let opener: mux::Opener = Box::new(move |tag| {
        let (ours, proxys) = UnixStream::pair()?;
        tx.lock().unwrap().send((tag, proxys)).map_err(io::Error::other)?;
        Ok(ours.into())
    });
    let host = Mux::start(host_port.into(), limits, Some(opener)).unwrap();
    let guest = Mux::start(guest_port.into(), limits, None).unwrap();
    (guest, host, rx)
}

/// A client connection in the guest: (the client's end, what the mux relays).
fn client() -> (UnixStream, OwnedFd) {
    let (client, relayed) = UnixStream::pair().unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (client, relayed.into())
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn bytes_go_both_ways_with_half_closes() {
    let (guest, host, accepted) = pair(SMALL);
    let (mut client, relayed) = client();
    guest.connect(HandOver::Socks, relayed).unwrap();
    let (to, mut proxy) = accepted.recv_timeout(Duration::from_secs(10)).unwrap();
    proxy.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(to, HandOver::Socks);
    // More than a window each way, so credit must come back for it to pass.
    let upload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let sent = upload.clone();
    let mut writer = client.try_clone().unwrap();
    let up = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    proxy.read_to_end(&mut got).unwrap();
    up.join().unwrap();
    assert_eq!(got, upload, "the upload, then the client's half-close");
    let download = vec![7u8; 50_000];
    proxy.write_all(&download).unwrap();
    proxy.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).unwrap();
    assert_eq!(back, download);
    wait_for("both ends to forget the connection", || {
        guest.open_connections() == 0 && host.open_connections() == 0
    });
    assert_eq!(guest.buffered_bytes() + host.buffered_bytes(), 0);
}

#[test]
fn a_connection_nobody_reads_fills_its_window_and_stalls_no_other() {
    let (guest, host, accepted) = pair(SMALL);
    let (stuck_client, relayed) = client();
    guest.connect(HandOver::Http, relayed).unwrap();
    let (_, _stuck_proxy) = accepted.recv_timeout(Duration::from_secs(10)).unwrap();
    // The stuck connection's client writes far more than any buffer holds;
    // its proxy end never reads.
    let mut writer = stuck_client.try_clone().unwrap();
    std::thread::spawn(move || {
        let block = vec![1u8; 64 * 1024];
        while writer.write_all(&block).is_ok() {}
    });
    std::thread::sleep(Duration::from_millis(200));
    // Another connection still goes through, both ways.
    let (mut client, relayed) = client();
    guest.connect(HandOver::Http, relayed).unwrap();
    let (_, mut proxy) = accepted.recv_timeout(Duration::from_secs(10)).unwrap();
    proxy.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    proxy.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    proxy.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    // What the ends hold for the stuck one is at most its window each way
    // (and the socket buffers between), not what its client wrote.
    let held = guest.buffered_bytes() + host.buffered_bytes();
    assert!(held <= 2 * SMALL.window as usize, "{held} bytes buffered");
}

#[test]
fn connections_past_the_cap_are_refused_and_the_rest_still_work() {
    let (guest, host, accepted) = pair(SMALL);
    let mut clients = Vec::new();
    for _ in 0..SMALL.max_conns {
        let (c, relayed) = client();
        guest.connect(HandOver::Http, relayed).unwrap();
        clients.push(c);
    }
    let proxies: Vec<_> =
        (0..SMALL.max_conns).map(|_| accepted.recv_timeout(Duration::from_secs(10)).unwrap().1).collect();
    let (_, relayed) = client();
    assert!(matches!(guest.connect(HandOver::Http, relayed), Err(mux::Refused::TooMany(_))));
    wait_for("the host to hold them all", || host.open_connections() == SMALL.max_conns);
    // Closing one makes room for one more.
    drop(clients.pop());
    drop(proxies.into_iter().last());
    wait_for("a free slot", || guest.open_connections() < SMALL.max_conns);
    let (_, relayed) = client();
    guest.connect(HandOver::Http, relayed).unwrap();
}

/// A hostile guest, speaking frames straight to the host's end.
fn hostile_guest(limits: Limits) -> (UnixStream, Mux, mpsc::Receiver<(HandOver, UnixStream)>) {
    let (guest_port, host_port) = UnixStream::pair().unwrap();
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let opener: mux::Opener = Box::new(move |tag| {
        let (ours, proxys) = UnixStream::pair()?;
        tx.lock().unwrap().send((tag, proxys)).map_err(io::Error::other)?;
        Ok(ours.into())
    });
    let host = Mux::start(host_port.into(), limits, Some(opener)).unwrap();
    guest_port.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (guest_port, host, rx)
}

fn next_reset(port: &mut UnixStream) -> u32 {
    loop {
        match Frame::read_from(port).unwrap().unwrap() {
            Frame::Reset { id } => return id,
            _ => continue,
        }
    }
}

#[test]
fn a_guest_that_breaks_the_rules_loses_that_connection_only() {
    let (mut port, host, accepted) = hostile_guest(SMALL);
    Frame::Open { id: 1, to: HandOver::Http }.write_to(&mut port).unwrap();
    Frame::Open { id: 2, to: HandOver::Http }.write_to(&mut port).unwrap();
    let (_, _first) = accepted.recv_timeout(Duration::from_secs(10)).unwrap();
    let (_, mut second) = accepted.recv_timeout(Duration::from_secs(10)).unwrap();
    // An id already used: refused.
    Frame::Open { id: 1, to: HandOver::Http }.write_to(&mut port).unwrap();
    assert_eq!(next_reset(&mut port), 1);
    // More than its window on connection 1.
    Frame::Data { id: 1, data: vec![0; SMALL.window as usize + 1] }.write_to(&mut port).unwrap();
    wait_for("the connection past its window to be reset", || host.open_connections() == 1);
    // Bytes for a connection that does not exist go nowhere.
    Frame::Data { id: 99, data: vec![1; 10] }.write_to(&mut port).unwrap();
    // Connection 2 still works.
    Frame::Data { id: 2, data: b"still here".to_vec() }.write_to(&mut port).unwrap();
    second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 10];
    second.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
    // Credit beyond a window is not taken: the host never queues more than
    // a window of a connection for a guest that does not read.
    Frame::Window { id: 2, credit: u32::MAX }.write_to(&mut port).unwrap();
    let download = vec![9u8; 1024 * 1024];
    std::thread::spawn(move || {
        let _ = second.write_all(&download);
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(host.buffered_bytes() <= SMALL.outbox_bytes + MAX_DATA, "{}", host.buffered_bytes());
    // A frame that cannot be decoded ends the port, and every connection.
    port.write_all(&[0x42, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    wait_for("the port to close", || host.is_closed() && host.open_connections() == 0);
}

#[test]
fn a_flood_of_opens_past_the_cap_is_refused_without_growing_the_host() {
    let (mut port, host, accepted) = hostile_guest(SMALL);
    let reader = port.try_clone().unwrap();
    // Drain what the host answers, as a guest would.
    std::thread::spawn(move || {
        let mut reader = reader;
        while let Ok(Some(_)) = Frame::read_from(&mut reader) {}
    });
    for id in 1..=1000u32 {
        Frame::Open { id, to: HandOver::Socks }.write_to(&mut port).unwrap();
    }
    wait_for("every open to be answered", || host.refused() == 1000 - SMALL.max_conns as u64);
    wait_for("the host to hold the first ones", || host.open_connections() == SMALL.max_conns);
    assert_eq!(accepted.try_iter().count(), SMALL.max_conns);
}

#[test]
fn the_guest_reads_the_trust_bundle_first() {
    let bundle = vec![b'x'; 3 * MAX_DATA + 5];
    let mut bytes = Vec::new();
    for chunk in bundle.chunks(MAX_DATA) {
        Frame::Bundle { data: chunk.to_vec() }.write_to(&mut bytes).unwrap();
    }
    Frame::BundleEnd.write_to(&mut bytes).unwrap();
    Frame::Open { id: 1, to: HandOver::Http }.write_to(&mut bytes).unwrap();
    let mut reader = &bytes[..];
    assert_eq!(read_bundle(&mut reader).unwrap(), bundle);
    assert_eq!(Frame::read_from(&mut reader).unwrap(), Some(Frame::Open { id: 1, to: HandOver::Http }));
    let cut = &bytes[..bytes.len() / 2];
    assert!(read_bundle(&mut &cut[..]).is_err(), "a bundle cut short");
}

#[test]
fn a_guest_that_opens_without_reading_is_read_no_further() {
    let (port, host, _accepted) = hostile_guest(SMALL);
    let mut writer = port.try_clone().unwrap();
    // Opens past the cap, each refused with a reset the guest never reads:
    // the host stops reading once its queue of refusals is full.
    std::thread::spawn(move || {
        for id in 1..=1_000_000u32 {
            let open = Frame::Open { id, to: HandOver::Http };
            if open.write_to(&mut writer).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let queued = host.queued_control();
    assert!(queued <= 4 * SMALL.max_conns + 64, "{queued} frames queued");
    let refused = host.refused();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        host.refused() - refused < 1000,
        "the host kept reading: {} more refusals",
        host.refused() - refused
    );
    drop(port);
}

/// A TCP connection on loopback standing for a program's in the guest:
/// (the program's end, the accepted end the guest's listener relays).
fn tcp_client() -> (TcpStream, OwnedFd) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    (client, accepted.into())
}

#[test]
fn each_open_says_what_the_connection_is() {
    let (guest, _host, accepted) = pair(SMALL);
    let destination = "203.0.113.9:22".parse().unwrap();
    for to in [HandOver::Transparent { destination }, HandOver::DnsStream, HandOver::Http] {
        let (_client, relayed) = client();
        guest.connect(to, relayed).unwrap();
        let (got, _proxy) = accepted.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got, to);
    }
}

/// Over a socket pair the proxy cannot reset a refused connection; it
/// closes it whole, unanswered, and the guest's program gets the reset.
/// An answer, or a half-close, is passed on as it is.
#[test]
fn a_connection_the_proxy_closes_unanswered_is_reset_in_the_guest() {
    let (guest, host, accepted) = pair(SMALL);
    let destination = "203.0.113.9:7001".parse().unwrap();
    let opened = || {
        let (client, relayed) = tcp_client();
        guest.connect(HandOver::Transparent { destination }, relayed).unwrap();
        let (_, proxy) = accepted.recv_timeout(Duration::from_secs(10)).unwrap();
        (client, proxy)
    };
    // Refused: the proxy drops its end at once.
    let (mut client, proxy) = opened();
    let started = Instant::now();
    drop(proxy);
    let mut buf = [0u8; 16];
    let err = client.read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    // Refused after the program wrote (the request is unread): the same.
    let (mut client, proxy) = opened();
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(proxy);
    assert_eq!(client.read(&mut buf).unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    // Answered, then closed: the answer and an orderly end.
    let (mut client, mut proxy) = opened();
    proxy.write_all(b"hello").unwrap();
    drop(proxy);
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello");
    drop(client);
    // Half-closed unanswered, still reading: an orderly end too.
    let (mut client, proxy) = opened();
    proxy.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    client.write_all(b"late").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut proxy = proxy;
    let mut late = Vec::new();
    proxy.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    proxy.read_to_end(&mut late).unwrap();
    assert_eq!(late, b"late");
    drop((proxy, client));
    wait_for("both ends to forget every connection", || {
        guest.open_connections() == 0 && host.open_connections() == 0
    });
}

/// What the host hands the proxy: each connection with what the guest
/// said it is, redirected ones only when the sandbox is transparent, and
/// never a datagram socket (the guest's program is reset instead).
#[test]
fn the_host_hands_each_connection_to_the_proxy_with_its_meaning() {
    for transparent in [true, false] {
        let (guest_port, host_port) = UnixStream::pair().unwrap();
        let (proxy_channel, handover) = UnixStream::pair().unwrap();
        proxy_channel.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let redirect = transparent.then_some(Redirect { tcp_port: 3129, dns_port: 3053, ipv6: false });
        let egress = HostEgress { handover: handover.into(), bundle: b"roots".to_vec(), redirect };
        serve_host(host_port, egress).unwrap();
        let mut reader = guest_port.try_clone().unwrap();
        assert_eq!(read_bundle(&mut reader).unwrap(), b"roots");
        let guest = Mux::start(guest_port.into(), SMALL, None).unwrap();
        let destination = "203.0.113.9:443".parse().unwrap();
        for to in [
            HandOver::Http,
            HandOver::Transparent { destination },
            HandOver::DnsStream,
            HandOver::DnsDatagram,
        ] {
            let (mut client, relayed) = tcp_client();
            guest.connect(to, relayed).unwrap();
            let handed = handover::recv(&proxy_channel);
            if host_takes(&to, transparent) {
                let (what, _fd) = handed.unwrap();
                assert_eq!(what, to);
            } else {
                assert!(handed.is_err(), "{to:?} was handed over (transparent: {transparent})");
                let mut buf = [0u8; 1];
                let err = client.read(&mut buf).unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{to:?}: {err}");
            }
        }
    }
}

/// A DNS datagram becomes a stream of its own carrying the query in TCP
/// framing, ended by the guest; the proxy's answer goes back to the asker
/// as a datagram. A query the proxy does not answer gets nothing.
#[test]
fn a_dns_datagram_is_asked_over_a_stream_of_its_own() {
    let (guest, _host, accepted) = pair(SMALL);
    let socket = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap());
    let resolver = socket.local_addr().unwrap();
    {
        let (socket, guest) = (socket.clone(), guest.clone());
        std::thread::spawn(move || serve_datagrams(&socket, &guest));
    }
    // The proxy's side: reads the framed query to the guest's end, then
    // answers it with the query's bytes reversed (or not at all).
    std::thread::spawn(move || {
        while let Ok((to, mut stream)) = accepted.recv() {
            assert_eq!(to, HandOver::DnsStream);
            let mut framed = Vec::new();
            stream.read_to_end(&mut framed).unwrap();
            let len = usize::from(u16::from_be_bytes([framed[0], framed[1]]));
            let query = &framed[2..];
            assert_eq!(query.len(), len);
            if query != b"unanswered" {
                let answer: Vec<u8> = query.iter().rev().copied().collect();
                let mut reply = (answer.len() as u16).to_be_bytes().to_vec();
                reply.extend_from_slice(&answer);
                stream.write_all(&reply).unwrap();
            }
        }
    });
    let asker = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    asker.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 600];
    for query in [b"query-1".to_vec(), vec![7u8; 512]] {
        asker.send_to(&query, resolver).unwrap();
        let (n, from) = asker.recv_from(&mut buf).unwrap();
        assert_eq!(from, resolver);
        assert_eq!(buf[..n].to_vec(), query.iter().rev().copied().collect::<Vec<u8>>());
    }
    asker.send_to(b"unanswered", resolver).unwrap();
    asker.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    assert!(asker.recv_from(&mut buf).is_err(), "an answer to a query the proxy left unanswered");
    wait_for("the streams to end", || guest.open_connections() == 0);
}
