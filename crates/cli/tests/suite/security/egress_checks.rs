//! Egress checks fail closed. A hostile sandbox tries to reach something
//! other than what the policy allowed through a destination it did allow:
//! by sending its TLS ClientHello late, in pieces, larger than one record,
//! without a server name, or naming another server; by naming another host
//! in a Host header or request target (a shared front end routes by it), on
//! the first request of a connection or a later one; by getting a secret
//! substituted into a request for another host; and by having a server
//! reflect a secret's value back into the sandbox. Real sandboxes, the real
//! proxy, real servers on 127.0.0.1 (named `localhost` where a name is
//! needed); names under example.org are only ever refused.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use crate::suite::egress::{
    MICROVM_POLICY, TestTls, Tier, after_connect, echo_one, event, is, needs_clients, net_log, run_in,
    run_on, secret_value, section, test_tls, tier_ready, write_ca, write_policy,
};
use crate::suite::support::*;

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// The bytes one connection sent, filled in as they arrive.
type ConnectionBytes = Arc<Mutex<Vec<u8>>>;

/// A server on 127.0.0.1 that records every byte each connection sent it,
/// then answers: TLS (with the test certificate) when the first byte is a
/// TLS handshake record, plain otherwise, echoing one HTTP request either
/// way. It shows whether a tunnel carried anything upstream.
struct RecordingServer {
    port: u16,
    /// Bytes received, one entry per accepted connection.
    received: Arc<Mutex<Vec<ConnectionBytes>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RecordingServer {
    fn start(tls: &TestTls) -> RecordingServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let received: Arc<Mutex<Vec<ConnectionBytes>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stop, config) = (received.clone(), stop.clone(), tls.server.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((conn, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let record = Arc::new(Mutex::new(Vec::new()));
                    received.lock().unwrap().push(record.clone());
                    let config = config.clone();
                    std::thread::spawn(move || {
                        let _ = serve_recorded(conn, record, config);
                    });
                }
            })
        };
        RecordingServer { port, received, stop, thread: Some(thread) }
    }

    /// What each connection sent, in the order they were accepted.
    fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap().iter().map(|r| r.lock().unwrap().clone()).collect()
    }
}

impl Drop for RecordingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A stream that keeps a copy of everything read from it.
struct Recorded {
    inner: TcpStream,
    record: ConnectionBytes,
}

impl Read for Recorded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.record.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Write for Recorded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn serve_recorded(
    conn: TcpStream,
    record: ConnectionBytes,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut first = [0u8; 1];
    let tls = conn.peek(&mut first)? == 1 && first[0] == 0x16;
    let stream = Recorded { inner: conn, record };
    let seen = Mutex::new(Vec::new());
    if !tls {
        return echo_one(stream, &seen);
    }
    let session = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(session, stream);
    echo_one(&mut stream, &seen)?;
    stream.conn.send_close_notify();
    stream.flush()
}

/// An HTTP or HTTPS server on 127.0.0.1 that serves any number of requests
/// per connection (so a proxy can send it a second request on one
/// connection) and remembers each. `/reflect…` paths send the request's
/// Authorization value back, as a reflecting server would: in the status
/// line, in headers and in the body (`/reflect`: chunked, the value split
/// between two chunks written 100 ms apart; `/reflect-length`: with a
/// Content-Length; `/reflect-gzip`: labelled gzip-encoded). Other paths
/// answer with the request itself.
struct KeepAliveServer {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KeepAliveServer {
    fn start(tls: Option<Arc<rustls::ServerConfig>>) -> KeepAliveServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((conn, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let (seen, tls) = (seen.clone(), tls.clone());
                    std::thread::spawn(move || {
                        let _ = serve_keep_alive(conn, tls, &seen);
                    });
                }
            })
        };
        KeepAliveServer { port, seen, stop, thread: Some(thread) }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// The request lines seen.
    fn request_lines(&self) -> Vec<String> {
        self.seen().iter().map(|r| r.lines().next().unwrap_or_default().to_string()).collect()
    }
}

impl Drop for KeepAliveServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_keep_alive(
    conn: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    seen: &Mutex<Vec<String>>,
) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    match tls {
        None => answer_each(conn, seen),
        Some(config) => {
            let session = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
            answer_each(rustls::StreamOwned::new(session, conn), seen)
        }
    }
}

fn answer_each(mut stream: impl Read + Write, seen: &Mutex<Vec<String>>) -> io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let length: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        while buf.len() < head_end + length {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let request = String::from_utf8_lossy(&buf[..head_end + length]).into_owned();
        buf.drain(..head_end + length);
        seen.lock().unwrap().push(request.clone());
        let path = request.split_whitespace().nth(1).unwrap_or_default().to_string();
        let value = header("authorization").unwrap_or_default();
        let value = value.strip_prefix("Bearer ").unwrap_or(&value).to_string();
        let reflected = format!("X-Reflected: {value}\r\nSet-Cookie: token={value}; Path=/\r\n");
        match path.as_str() {
            "/reflect" => {
                let (a, b) = value.split_at(value.len() / 2);
                write!(stream, "HTTP/1.1 200 OK {value}\r\n{reflected}Transfer-Encoding: chunked\r\n\r\n")?;
                let first = format!("first half: {a}");
                write!(stream, "{:x}\r\n{first}\r\n", first.len())?;
                stream.flush()?;
                std::thread::sleep(Duration::from_millis(100));
                let second = format!("{b} (second half)\n");
                write!(stream, "{:x}\r\n{second}\r\n0\r\n\r\n", second.len())?;
            }
            "/reflect-length" | "/reflect-gzip" => {
                let body = format!("value={value}\n");
                let encoding = if path == "/reflect-gzip" { "Content-Encoding: gzip\r\n" } else { "" };
                write!(
                    stream,
                    "HTTP/1.1 200 OK\r\n{reflected}{encoding}Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )?;
            }
            _ => {
                let body = format!("seen:\n{request}\n");
                write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
            }
        }
        stream.flush()?;
    }
}

// ---------------------------------------------------------------------------
// Clients inside the sandbox
// ---------------------------------------------------------------------------

/// The sandbox's side: opens a tunnel through the proxy (HTTP CONNECT or
/// SOCKS5) and sends a first flight built byte by byte, or does a real TLS
/// handshake with Python's ssl module. Prints one `label=…` line.
const CHECKS: &str = r#"
import os, socket, ssl, struct, sys, time

def tunnel(via, host, port):
    s = socket.create_connection(("127.0.0.1", 3128 if via == "http" else 1080), timeout=15)
    if via == "http":
        s.sendall(("CONNECT %s:%s HTTP/1.1\r\nHost: %s:%s\r\n\r\n" % (host, port, host, port)).encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            b = s.recv(1)
            if not b:
                raise ConnectionError("proxy closed: %r" % head)
            head += b
        if b" 200" not in head.split(b"\r\n")[0]:
            raise ConnectionError("CONNECT refused: %r" % head)
    else:
        s.sendall(b"\x05\x01\x00")
        s.recv(2)
        name = host.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + int(port).to_bytes(2, "big"))
        reply = s.recv(10)
        if reply[1] != 0:
            raise ConnectionError("SOCKS reply %d" % reply[1])
    return s

def ext(kind, data):
    return struct.pack(">HH", kind, len(data)) + data

def client_hello(names, marker, extra=b"", fragment=16384, first=b""):
    # A TLS 1.3 ClientHello a real server answers: x25519 key share,
    # ECDSA/RSA signatures; `marker` as its session id (so the server's
    # recording shows which case reached it).
    exts = b""
    if names:
        entries = b"".join(b"\x00" + struct.pack(">H", len(n)) + n.encode() for n in names)
        exts += ext(0, struct.pack(">H", len(entries)) + entries)
    exts += ext(43, b"\x04\x03\x04\x03\x03")                     # supported_versions
    exts += ext(10, b"\x00\x02\x00\x1d")                         # supported_groups: x25519
    exts += ext(13, b"\x00\x08\x04\x03\x08\x04\x04\x01\x08\x07") # signature_algorithms
    exts += ext(45, b"\x01\x01")                                 # psk_key_exchange_modes
    exts += ext(51, struct.pack(">HHH", 36, 0x1d, 32) + os.urandom(32))  # key_share
    exts += extra
    body = b"\x03\x03" + os.urandom(32) + bytes([len(marker)]) + marker
    body += b"\x00\x06\x13\x01\x13\x02\x13\x03" + b"\x01\x00" + struct.pack(">H", len(exts)) + exts
    message = b"\x01" + struct.pack(">I", len(body))[1:] + body
    records = [b"\x16\x03\x01" + struct.pack(">H", len(message[i:i + fragment])) + message[i:i + fragment]
               for i in range(0, len(message), fragment)]
    return [first] + records if first else records

def answer(s):
    # "closed" when nothing came back; "answered tls" for a ServerHello;
    # for the plain echo server, the first line it saw.
    s.settimeout(8)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data[0] == 0x16:
                return "answered tls"
    except OSError as e:
        if not data:
            return "closed " + type(e).__name__
    if not data:
        return "closed"
    text = data.decode(errors="replace")
    seen = text.split("saw:\n", 1)[-1].split("\n")[0].strip()
    return "answered " + seen

def crafted(label, via, host, port, delay, pause, names, extra_hex, fragment, first_hex):
    s = tunnel(via, host, port)
    time.sleep(float(delay))
    pieces = client_hello([n for n in names.split(",") if n], ("case:" + label).encode(),
                          bytes.fromhex(extra_hex), int(fragment), bytes.fromhex(first_hex))
    try:
        for piece in pieces:
            s.sendall(piece)
            time.sleep(float(pause))
        print(label + "=" + answer(s), flush=True)
    except OSError as e:
        print(label + "=closed " + type(e).__name__, flush=True)

def raw(label, via, host, port, text):
    s = tunnel(via, host, port)
    try:
        s.sendall(text.encode().decode("unicode_escape").encode())
        print(label + "=" + answer(s), flush=True)
    except OSError as e:
        print(label + "=closed " + type(e).__name__, flush=True)

def real(label, via, host, port, delay, sni):
    s = tunnel(via, host, port)
    time.sleep(float(delay))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        t = ctx.wrap_socket(s, server_hostname=sni or None)
        t.sendall(("GET /%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % label).encode())
        data = t.recv(4096)
        print(label + "=ok " + data.split(b"\r\n")[0].decode(errors="replace"), flush=True)
    except OSError as e:
        print(label + "=failed " + type(e).__name__, flush=True)

{"crafted": crafted, "raw": raw, "real": real}[sys.argv[1]](*sys.argv[2:])
"#;

/// The hex of a TLS extension of `kind` carrying `len` zero bytes.
fn extension_hex(kind: u16, len: usize) -> String {
    let mut bytes = kind.to_be_bytes().to_vec();
    bytes.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
    bytes.resize(4 + len, 0);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of `label=` in the output.
fn result<'a>(out: &'a str, label: &str) -> &'a str {
    let prefix = format!("{label}=");
    out.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no result for {label} in:\n{out}"))
}

fn refusals(log: &[Value]) -> Vec<String> {
    log.iter()
        .filter(|e| is(e, "allowed", false))
        .map(|e| e["rule"].as_str().unwrap_or_default().to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// ClientHello checks on tunnels
// ---------------------------------------------------------------------------

/// Every way of sending a ClientHello that the proxy cannot match with the
/// destination is refused, however late, large or fragmented it is; the
/// same hellos naming the destination go through. To a name (`localhost`)
/// only TLS naming it, or SSH, passes; to an address, a hello naming no
/// server (or any other protocol) passes and one naming a server does not.
#[test]
fn tunnels_carry_only_a_whole_client_hello_that_names_the_destination() {
    if !needs_clients() {
        return;
    }
    let env = Env::new();
    std::fs::write(env.workspace.join("checks.py"), CHECKS).unwrap();
    let tls = test_tls();
    let server = RecordingServer::start(&tls);
    let p = server.port;
    let other = "other.example.org";
    let padding = extension_hex(21, 20_000);
    let ech = extension_hex(0xfe0d, 64);
    let ccs = "140303000101";
    // label, command, expected answer; refused ones are "closed".
    let cases: Vec<(&str, String, &str)> = vec![
        ("name-real", format!("real name-real http localhost {p} 0 localhost"), "ok HTTP/1.1 200"),
        (
            "name-real-late",
            format!("real name-real-late http localhost {p} 2.5 localhost"),
            "ok HTTP/1.1 200",
        ),
        (
            "name-real-late-other",
            format!("real name-real-late-other http localhost {p} 2.5 {other}"),
            "failed",
        ),
        ("name-real-no-sni", format!("real name-real-no-sni http localhost {p} 0 ''"), "failed"),
        (
            "name-late-other",
            format!("crafted name-late-other http localhost {p} 2.5 0 {other} '' 16384 ''"),
            "closed",
        ),
        (
            "name-late",
            format!("crafted name-late http localhost {p} 2.5 0 localhost '' 16384 ''"),
            "answered tls",
        ),
        (
            "name-big-other",
            format!("crafted name-big-other http localhost {p} 0 0 {other} {padding} 16384 ''"),
            "closed",
        ),
        (
            "name-big",
            format!("crafted name-big http localhost {p} 0 0 localhost {padding} 16384 ''"),
            "answered tls",
        ),
        ("name-no-sni", format!("crafted name-no-sni http localhost {p} 0 0 '' '' 16384 ''"), "closed"),
        (
            "name-pieces-other",
            format!("crafted name-pieces-other http localhost {p} 0 0.01 {other} '' 40 ''"),
            "closed",
        ),
        (
            "name-pieces",
            format!("crafted name-pieces http localhost {p} 0 0.01 localhost '' 40 ''"),
            "answered tls",
        ),
        (
            "name-ccs-first",
            format!("crafted name-ccs-first http localhost {p} 0 0 localhost '' 16384 {ccs}"),
            "closed",
        ),
        ("name-ech", format!("crafted name-ech http localhost {p} 0 0 localhost {ech} 16384 ''"), "closed"),
        (
            "name-two",
            format!("crafted name-two http localhost {p} 0 0 localhost,{other} '' 16384 ''"),
            "closed",
        ),
        (
            "name-case-dot",
            format!("crafted name-case-dot http localhost {p} 0 0 LocalHost. '' 16384 ''"),
            "answered tls",
        ),
        (
            "name-http",
            format!("raw name-http http localhost {p} 'GET / HTTP/1.1\\r\\nHost: {other}\\r\\n\\r\\n'"),
            "closed",
        ),
        (
            "name-ssh",
            format!("raw name-ssh http localhost {p} 'SSH-2.0-probe\\r\\n\\r\\n'"),
            "answered SSH-2.0-probe",
        ),
        ("addr-no-sni", format!("crafted addr-no-sni http 127.0.0.1 {p} 0 0 '' '' 16384 ''"), "answered tls"),
        (
            "addr-late-other",
            format!("crafted addr-late-other http 127.0.0.1 {p} 2.5 0 {other} '' 16384 ''"),
            "closed",
        ),
        (
            "addr-http",
            format!("raw addr-http http 127.0.0.1 {p} 'GET /addr HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'"),
            "answered GET /addr",
        ),
        (
            "socks-late-other",
            format!("crafted socks-late-other socks localhost {p} 2.5 0 {other} '' 16384 ''"),
            "closed",
        ),
        ("socks-real", format!("real socks-real socks localhost {p} 0 localhost"), "ok HTTP/1.1 200"),
    ];
    // All at once (the late ones wait 2.5 s each), each into its own file.
    let mut script = String::from("mkdir -p out; ");
    for (label, command, _) in &cases {
        script.push_str(&format!("python3 checks.py {command} > out/{label} 2>&1 & "));
    }
    script.push_str("wait; cat out/*");
    let allow = ["--allow", "localhost", "--allow", &format!("127.0.0.1:{p}")];
    let o = run_in(&env, "hello", &allow, &[], &script);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|(label, _, expected)| {
            let got = result(&out, label);
            (!got.starts_with(expected)).then(|| format!("{label}: expected {expected:?}, got {got:?}"))
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}\n{}", show(&o));

    // Refused hellos never reached the server: exactly one connection per
    // refused case carried nothing, and no refused case's marker is there.
    let refused: Vec<&str> =
        cases.iter().filter(|(_, _, e)| *e == "closed" || *e == "failed").map(|(l, _, _)| *l).collect();
    let received = server.received();
    let empty = received.iter().filter(|r| r.is_empty()).count();
    assert_eq!(empty, refused.len(), "connections that carried nothing upstream, for {refused:?}");
    let contains =
        |needle: &str| received.iter().any(|r| r.windows(needle.len()).any(|w| w == needle.as_bytes()));
    for label in &refused {
        assert!(!contains(&format!("case:{label}")), "{label} reached the server");
    }
    for label in ["name-late", "name-big", "name-case-dot", "addr-no-sni"] {
        assert!(contains(&format!("case:{label}")), "{label} did not reach the server");
    }

    // Each refusal is in the audit log with its reason.
    let log = net_log(&env, "hello");
    let reasons = refusals(&log);
    assert_eq!(reasons.len(), refused.len(), "{reasons:#?}");
    for why in [
        "TLS server name other.example.org differs from the requested host localhost",
        "TLS server name other.example.org differs from the requested host 127.0.0.1",
        "names no server, but the tunnel was opened to localhost",
        "the first TLS record is not a handshake record",
        "hides its server name",
        "names more than one server",
        "does not start with TLS (or SSH)",
    ] {
        assert!(reasons.iter().any(|r| r.contains(why)), "no refusal {why:?} in {reasons:#?}");
    }
    let refusal = event(&log, "a refused tunnel", |e| is(e, "allowed", false));
    assert!(is(refusal, "handling", "refused") && is(refusal, "port", p), "{refusal}");
    assert_eq!(refusal["address"], format!("127.0.0.1:{p}"), "{refusal}");
}

// ---------------------------------------------------------------------------
// Host names in requests
// ---------------------------------------------------------------------------

/// The sandbox's side of the request checks: one connection through the
/// proxy (plain: absolute-form requests to the proxy port; tls: CONNECT,
/// then TLS trusting the sandbox's CA) carrying the given requests one
/// after the other. A request is `METHOD TARGET|Header: value|…`, with
/// `{token}` standing for $EXAMPLE_TOKEN. Prints `label#N=STATUS DENIED`.
const REQUESTS: &str = r#"
import http.client, os, socket, ssl, sys

def connection(kind, host, port):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
    if kind == "plain":
        return s
    s.sendall(("CONNECT %s:%s HTTP/1.1\r\nHost: %s:%s\r\n\r\n" % (host, port, host, port)).encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        b = s.recv(1)
        if not b:
            raise ConnectionError("proxy closed: %r" % head)
        head += b
    return ssl.create_default_context().wrap_socket(s, server_hostname=host)

def exchange(label, kind, host, port, *requests):
    s = connection(kind, host, port)
    for i, spec in enumerate(requests, 1):
        line, *headers = spec.replace("{token}", os.environ.get("EXAMPLE_TOKEN", "")).split("|")
        try:
            s.sendall((line + " HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode())
            r = http.client.HTTPResponse(s)
            r.begin()
            r.read()
            print("%s#%d=%d %s" % (label, i, r.status, r.getheader("x-airlock-denied") or ""), flush=True)
        except Exception as e:
            print("%s#%d=failed %s" % (label, i, type(e).__name__), flush=True)
            return

exchange(*sys.argv[1:])
"#;

/// Runs each `(label, arguments)` exchange of [`REQUESTS`] in one sandbox,
/// one after the other, and returns the output.
fn exchanges(
    env: &Env,
    name: &str,
    extra: &[&str],
    vars: &[(&str, &str)],
    runs: &[(&str, String)],
) -> String {
    std::fs::write(env.workspace.join("requests.py"), REQUESTS).unwrap();
    let script: String =
        runs.iter().map(|(label, args)| format!("python3 requests.py {label} {args}; ")).collect();
    let o = run_in(env, name, extra, vars, &format!("{script}echo done"));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains("done"), "{}", show(&o));
    stdout(&o)
}

/// Whether every expected `label#N` result (`label` alone: its first
/// request) holds; lists those that do not.
fn check_results(out: &str, expected: &[(&str, &str)]) {
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|(label, want)| {
            let label = if label.contains('#') { label.to_string() } else { format!("{label}#1") };
            let got = result(out, &label);
            (!got.starts_with(want)).then(|| format!("{label}: expected {want:?}, got {got:?}"))
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}\n{out}");
}

/// A request naming another host than the one connected to — in its Host
/// header (another name, another port, none where the port is not the
/// default, twice), in an absolute target (also with user information), in
/// X-Forwarded-Host — is refused with a 403 and the proxy's header, on
/// plain HTTP and intercepted HTTPS alike, and on every request of a
/// keep-alive connection, not only the first. Case, a trailing dot and an
/// explicit default port pass.
#[test]
fn requests_naming_another_host_are_refused_on_every_request() {
    if !needs_clients() {
        return;
    }
    let env = Env::new();
    let tls = test_tls();
    let plain = KeepAliveServer::start(None);
    let https = KeepAliveServer::start(Some(tls.server.clone()));
    let (h, s) = (plain.port, https.port);
    let ca = write_ca(&env, &tls);
    let policy = write_policy(
        &env,
        "hosts.toml",
        &format!(
            "extends = \"dev\"\n\
             [network]\nallow = [\"localhost\", \"127.0.0.1:{h}\", \"127.0.0.1:{s}\"]\nextra_roots = [{ca:?}]\n\
             [[network.rule]]\nhost = \"127.0.0.1\"\nmethods = [\"GET\"]\n\
             [[network.rule]]\nhost = \"localhost\"\nmethods = [\"GET\"]\n"
        ),
    );
    let other = "other.example.org";
    let ok = |path: &str, port: u16| format!("'GET {path}|Host: 127.0.0.1:{port}'");
    let abs = |path: &str, host: &str| format!("'GET http://127.0.0.1:{h}{path}|Host: {host}'");
    let runs = vec![
        (
            "plain-keepalive",
            format!(
                "plain - - 'GET http://127.0.0.1:{h}/one|Host: 127.0.0.1:{h}' {} 'GET http://127.0.0.1:{h}/three'",
                abs("/two", other)
            ),
        ),
        ("plain-port", format!("plain - - {}", abs("/port", "127.0.0.1:1"))),
        ("plain-no-port", format!("plain - - {}", abs("/no-port", "127.0.0.1"))),
        ("plain-name", format!("plain - - {}", abs("/name", &format!("localhost:{h}")))),
        ("plain-dup", format!("plain - - 'GET http://127.0.0.1:{h}/dup|Host: 127.0.0.1:{h}|Host: {other}'")),
        (
            "plain-userinfo",
            format!("plain - - 'GET http://{other}@127.0.0.1:{h}/userinfo|Host: 127.0.0.1:{h}'"),
        ),
        ("plain-xfh", format!("plain - - 'GET http://127.0.0.1:{h}/xfh|X-Forwarded-Host: {other}'")),
        ("plain-case-dot", format!("plain - - 'GET http://localhost:{h}/case-dot|Host: LocalHost.:{h}'")),
        (
            "tls-keepalive",
            format!("tls 127.0.0.1 {s} {} 'GET /two|Host: {other}' {}", ok("/one", s), ok("/three", s)),
        ),
        ("tls-absolute", format!("tls 127.0.0.1 {s} 'GET https://{other}/absolute|Host: 127.0.0.1:{s}'")),
        ("tls-no-port", format!("tls 127.0.0.1 {s} 'GET /no-port|Host: 127.0.0.1'")),
        ("tls-dup", format!("tls 127.0.0.1 {s} 'GET /dup|Host: 127.0.0.1:{s}|Host: 127.0.0.1:{s}'")),
        ("tls-connect", format!("tls 127.0.0.1 {s} 'CONNECT {other}:443|Host: {other}:443'")),
        ("tls-case-dot", format!("tls localhost {s} 'GET /case-dot|Host: LOCALHOST.:{s}'")),
    ];
    let out = exchanges(&env, "hosts", &["--policy", policy.to_str().unwrap()], &[], &runs);
    let denied = "403 the Host header";
    check_results(
        &out,
        &[
            ("plain-keepalive#1", "200"),
            (
                "plain-keepalive#2",
                &format!("{denied} \"{other}\" names another host than the destination 127.0.0.1:{h}"),
            ),
            ("plain-keepalive#3", "200"),
            ("plain-port", denied),
            ("plain-no-port", denied),
            ("plain-name", denied),
            ("plain-dup", "403 the request has 2 Host headers"),
            ("plain-userinfo", "403 the request target carries user information"),
            ("plain-xfh", "403 the X-Forwarded-Host header"),
            ("plain-case-dot", "200"),
            ("tls-keepalive#1", "200"),
            (
                "tls-keepalive#2",
                &format!("{denied} \"{other}\" names another host than the destination 127.0.0.1:{s}"),
            ),
            ("tls-keepalive#3", "200"),
            ("tls-absolute", "403 the request target"),
            ("tls-no-port", denied),
            ("tls-dup", "403 the request has 2 Host headers"),
            ("tls-connect", "403 CONNECT inside an intercepted connection"),
            ("tls-case-dot", "200"),
        ],
    );

    // Only the requests naming their destination reached the servers.
    let paths = |server: &KeepAliveServer| -> Vec<String> {
        server
            .request_lines()
            .iter()
            .map(|l| l.split_whitespace().nth(1).unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(paths(&plain), ["/one", "/three", "/case-dot"]);
    assert_eq!(paths(&https), ["/one", "/three", "/case-dot"]);
    let everything: String = plain.seen().concat() + &https.seen().concat();
    assert!(!everything.contains(other), "{everything}");

    // Each refusal is audited, with the request and the reason.
    let log = net_log(&env, "hosts");
    let refused = event(&log, "the keep-alive refusal", |e| is(e, "path", "/two") && is(e, "port", s));
    assert!(is(refused, "allowed", false) && is(refused, "handling", "refused"), "{refused}");
    assert!(refused["rule"].as_str().unwrap().contains("names another host"), "{refused}");
    assert_eq!(refusals(&log).len(), 12, "{:#?}", refusals(&log));
}

/// A secret is substituted only into requests whose own Host is one of the
/// secret's hosts: a request on a connection to the secret's host that
/// names another host gets no value (it is refused), nor does one on a
/// connection to another host that names the secret's host.
#[test]
fn secrets_go_only_to_requests_whose_host_is_the_secrets_host() {
    if !needs_clients() {
        return;
    }
    let env = Env::new();
    let tls = test_tls();
    let a = KeepAliveServer::start(Some(tls.server.clone()));
    let b = KeepAliveServer::start(Some(tls.server.clone()));
    let (pa, pb) = (a.port, b.port);
    let policy = secret_policy(&env, &tls, &[pa, pb], pa);
    let value = secret_value();
    let auth = "Authorization: Bearer {token}";
    let runs = vec![
        (
            "to-a",
            format!(
                "tls 127.0.0.1 {pa} 'GET /a|Host: 127.0.0.1:{pa}|{auth}' 'GET /a-naming-b|Host: 127.0.0.1:{pb}|{auth}' \
             'GET /a-forwarded-b|Host: 127.0.0.1:{pa}|X-Forwarded-Host: 127.0.0.1:{pb}|{auth}'"
            ),
        ),
        (
            "to-b",
            format!(
                "tls 127.0.0.1 {pb} 'GET /b-naming-a|Host: 127.0.0.1:{pa}|{auth}' 'GET /b|Host: 127.0.0.1:{pb}|{auth}'"
            ),
        ),
    ];
    let out = exchanges(&env, "secret-hosts", &["--policy", &policy], &[("EXAMPLE_TOKEN", &value)], &runs);
    check_results(
        &out,
        &[("to-a#1", "200"), ("to-a#2", "403"), ("to-a#3", "403"), ("to-b#1", "403"), ("to-b#2", "200")],
    );
    assert!(!out.contains(&value), "{out}");

    let seen_a = a.seen();
    assert_eq!(seen_a.len(), 1, "{seen_a:#?}");
    assert!(
        seen_a[0].starts_with("GET /a ") && seen_a[0].contains(&format!("Bearer {value}\r\n")),
        "{seen_a:#?}"
    );
    let seen_b = b.seen();
    assert_eq!(seen_b.len(), 1, "{seen_b:#?}");
    assert!(
        seen_b[0].starts_with("GET /b ") && seen_b[0].contains("Bearer airlock-placeholder-EXAMPLE_TOKEN-")
    );
    assert!(!seen_b[0].contains(&value), "B got the value: {seen_b:#?}");

    let log = net_log(&env, "secret-hosts");
    let sent = event(&log, "the request to A", |e| is(e, "path", "/a"));
    assert_eq!(sent["secrets"], serde_json::json!(["EXAMPLE_TOKEN"]), "{sent}");
    for path in ["/a-naming-b", "/a-forwarded-b", "/b-naming-a"] {
        let refused = event(&log, path, |e| is(e, "path", path));
        assert!(is(refused, "allowed", false) && refused["secrets"] == serde_json::json!([]), "{refused}");
    }
}

/// A policy allowing the given HTTPS ports on 127.0.0.1, all intercepted (a
/// rule on the host), with the test CA trusted upstream and EXAMPLE_TOKEN a
/// secret for 127.0.0.1:`secret_port`.
fn secret_policy(env: &Env, tls: &TestTls, ports: &[u16], secret_port: u16) -> String {
    let ca = write_ca(env, tls);
    let allow: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let path = write_policy(
        env,
        "secret.toml",
        &format!(
            "extends = \"dev\"\n\
             [network]\nallow = [{}]\nextra_roots = [{ca:?}]\n\
             [[network.rule]]\nhost = \"127.0.0.1\"\nmethods = [\"GET\", \"HEAD\"]\n\
             [secrets.EXAMPLE_TOKEN]\nfrom = \"env:EXAMPLE_TOKEN\"\nhosts = [\"127.0.0.1:{secret_port}\"]\n",
            allow.join(", ")
        ),
    );
    path.to_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------
// Secrets reflected by a server
// ---------------------------------------------------------------------------

/// A server that sends the secret's value back — in its status line, a
/// header, a cookie, and a chunked body with the value split between two
/// chunks written apart, or a body with a Content-Length — hands the
/// sandbox only the placeholder, and the bodies arrive whole. A response
/// the proxy cannot read (gzip, although it asked for identity) is refused.
#[test]
fn a_reflected_secret_reaches_the_sandbox_only_as_its_placeholder() {
    reflected_secret(Tier::Process);
}

/// The same in a microVM guest: the proxy's replacement keeps the value
/// out of the guest, not only out of airlock's (redacted) output.
#[test]
fn a_reflected_secret_reaches_a_microvm_guest_only_as_its_placeholder() {
    reflected_secret(Tier::Microvm);
}

fn reflected_secret(tier: Tier) {
    if !tier_ready(tier) {
        return;
    }
    let env = Env::new();
    let tls = test_tls();
    let a = KeepAliveServer::start(Some(tls.server.clone()));
    let pa = a.port;
    let policy = secret_policy(&env, &tls, &[pa], pa);
    if tier == Tier::Microvm {
        let mut text = std::fs::read_to_string(&policy).unwrap();
        text.push_str(MICROVM_POLICY);
        std::fs::write(&policy, text).unwrap();
    }
    let value = secret_value();
    let get = format!("c -D - -H \"Authorization: Bearer $EXAMPLE_TOKEN\" https://127.0.0.1:{pa}");
    let o = run_on(
        tier,
        &env,
        "reflect",
        &["--policy", &policy],
        &[("EXAMPLE_TOKEN", &value)],
        &format!(
            "sec placeholder; echo \"$EXAMPLE_TOKEN\"; \
             sec chunked; {get}/reflect; echo \"curl=$?\"; \
             sec length; {get}/reflect-length --compressed; echo \"curl=$?\"; \
             sec gzip; {get}/reflect-gzip; echo \"curl=$?\"; \
             sec file; {get}/reflect -o reflected.txt >/dev/null; grep -o \"$EXAMPLE_TOKEN\" reflected.txt | wc -l; \
             sec end"
        ),
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    let placeholder = section(&out, "placeholder").trim().to_string();
    assert!(placeholder.starts_with("airlock-placeholder-EXAMPLE_TOKEN-"), "{}", show(&o));
    // Nothing for the output redaction to catch: the value never arrived.
    assert!(!out.contains(&value) && !out.contains("[REDACTED"), "{}", show(&o));

    let chunked = after_connect(section(&out, "chunked"));
    for expected in [
        format!("HTTP/1.1 200 OK {placeholder}\r\n"),
        format!("x-reflected: {placeholder}\r\n"),
        format!("set-cookie: token={placeholder}; Path=/\r\n"),
        "transfer-encoding: chunked\r\n".to_string(),
        format!("first half: {placeholder} (second half)\ncurl=0"),
    ] {
        assert!(chunked.contains(&expected), "missing {expected:?}\n{}", show(&o));
    }
    let length = after_connect(section(&out, "length"));
    assert!(length.contains(&format!("x-reflected: {placeholder}\r\n")), "{}", show(&o));
    assert!(!length.to_ascii_lowercase().contains("content-length"), "{}", show(&o));
    assert!(length.contains(&format!("\r\n\r\nvalue={placeholder}\ncurl=0")), "{}", show(&o));
    let gzip = after_connect(section(&out, "gzip"));
    assert!(gzip.starts_with("HTTP/1.1 502"), "{}", show(&o));
    assert!(gzip.contains("x-airlock-denied: the response from 127.0.0.1 is encoded (gzip)"), "{}", show(&o));
    assert!(!gzip.contains(&placeholder), "the refused body was relayed\n{}", show(&o));
    assert_eq!(section(&out, "file").trim(), "1", "{}", show(&o));

    // The server did get the value each time, and was asked for identity.
    let seen = a.seen();
    assert_eq!(seen.len(), 4, "{seen:#?}");
    for request in &seen {
        assert!(request.contains(&format!("Bearer {value}\r\n")), "{request}");
        assert!(request.to_ascii_lowercase().contains("accept-encoding: identity\r\n"), "{request}");
    }
    let log = net_log(&env, "reflect");
    let refused = event(&log, "the gzip refusal", |e| is(e, "path", "/reflect-gzip"));
    assert!(is(refused, "allowed", false) && is(refused, "handling", "refused"), "{refused}");
    assert!(refused["rule"].as_str().unwrap().contains("encoded (gzip)"), "{refused}");
}
