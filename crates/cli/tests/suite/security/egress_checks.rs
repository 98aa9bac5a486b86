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

use crate::suite::egress::{TestTls, echo_one, event, is, needs_clients, net_log, run_in, test_tls};
use crate::suite::support::*;

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// A server on 127.0.0.1 that records every byte each connection sent it,
/// then answers: TLS (with the test certificate) when the first byte is a
/// TLS handshake record, plain otherwise, echoing one HTTP request either
/// way. It shows whether a tunnel carried anything upstream.
struct RecordingServer {
    port: u16,
    /// Bytes received, one entry per accepted connection.
    received: Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RecordingServer {
    fn start(tls: &TestTls) -> RecordingServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let received: Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>> = Arc::default();
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
    record: Arc<Mutex<Vec<u8>>>,
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
    record: Arc<Mutex<Vec<u8>>>,
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
