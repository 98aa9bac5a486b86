//! Egress: the sandbox reaches the network only through airlock's proxy,
//! which enforces the policy per connection and per request and holds the
//! secrets. Every test starts its own servers on the host's 127.0.0.1 (plain
//! HTTP, and HTTPS with a test CA that the policy trusts), runs real clients
//! (curl, python3) in a real sandbox, and checks both what the clients saw
//! and what the servers received. Names under example.com/.net/.org appear
//! only as destinations that must be refused; nothing is sent anywhere but
//! 127.0.0.1 or the sandbox's own namespace.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use super::support::*;

// ---------------------------------------------------------------------------
// Servers on the host's loopback
// ---------------------------------------------------------------------------

/// An HTTP or HTTPS server on 127.0.0.1 that answers every request with the
/// request itself (request line, headers as received, body) and remembers
/// each one. Stopped when dropped.
pub(crate) struct EchoServer {
    pub(crate) port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub(crate) fn http() -> EchoServer {
        EchoServer::start(None)
    }

    pub(crate) fn https(tls: &TestTls) -> EchoServer {
        EchoServer::start(Some(tls.server.clone()))
    }

    fn start(tls: Option<Arc<rustls::ServerConfig>>) -> EchoServer {
        EchoServer::serve_on(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap(), tls)
    }

    /// Serves on a listener bound elsewhere (in another network namespace).
    pub(crate) fn serve_on(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> EchoServer {
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, accepted, stop) = (seen.clone(), accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            let (seen, tls) = (seen.clone(), tls.clone());
                            std::thread::spawn(move || {
                                let _ = serve_connection(conn, tls, &seen);
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        EchoServer { port, seen, accepted, stop, thread: Some(thread) }
    }

    /// Every request received so far, as text.
    pub(crate) fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// TCP connections accepted so far (handshakes that failed included).
    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_connection(
    conn: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    seen: &Mutex<Vec<String>>,
) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    match tls {
        None => echo_one(conn, seen),
        Some(config) => {
            let session = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
            let mut stream = rustls::StreamOwned::new(session, conn);
            echo_one(&mut stream, seen)?;
            stream.conn.send_close_notify();
            stream.flush()
        }
    }
}

/// Reads one request and answers it with itself; each line reversed when
/// the request has an `X-Echo-Reversed` header (a transformation the proxy
/// cannot see through, so a reflected secret arrives).
pub(crate) fn echo_one(mut stream: impl Read + Write, seen: &Mutex<Vec<String>>) -> io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::other("request head too large"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf).into_owned();
    seen.lock().unwrap().push(request.clone());
    let mut body = format!("echo-server saw:\n{request}\n");
    if head.to_ascii_lowercase().contains("\r\nx-echo-reversed:") {
        body = body
            .split('\n')
            .map(|line| line.chars().rev().collect::<String>())
            .collect::<Vec<_>>()
            .join("\n");
    }
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// A test CA (written where the policy's `extra_roots` can name it) and a
/// server configuration whose leaf, for 127.0.0.1 and localhost, that CA
/// signed.
pub(crate) struct TestTls {
    pub(crate) ca_pem: String,
    pub(crate) server: Arc<rustls::ServerConfig>,
}

pub(crate) fn test_tls() -> TestTls {
    test_tls_for(&["localhost"], &[Ipv4Addr::LOCALHOST.into()])
}

/// [`test_tls`] with a leaf for these names and addresses.
pub(crate) fn test_tls_for(names: &[&str], ips: &[std::net::IpAddr]) -> TestTls {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.distinguished_name.push(DnType::CommonName, "airlock egress test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params.subject_alt_names = ips
        .iter()
        .map(|ip| SanType::IpAddress(*ip))
        .chain(names.iter().map(|n| SanType::DnsName((*n).try_into().unwrap())))
        .collect();
    leaf_params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("airlock test"));
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    TestTls { ca_pem: ca_cert.pem(), server: Arc::new(server) }
}

// ---------------------------------------------------------------------------
// Clients inside the sandbox
// ---------------------------------------------------------------------------

/// Probes run inside with python3, one per sub-command; each prints
/// `label=ok …` or `label=failed …` lines.
const PROBE: &str = r#"
import errno, os, socket, ssl, sys, time

def err(e):
    return errno.errorcode.get(getattr(e, "errno", None) or 0, type(e).__name__)

def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed after %d bytes" % len(data))
        data += chunk
    return data

def read_all(s):
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk

def socks(host, port, path):
    # RFC 1928 CONNECT with a domain name, no authentication.
    s = socket.create_connection(("127.0.0.1", 1080), timeout=5)
    s.sendall(b"\x05\x01\x00")
    print("socks-method=%r" % recv_exact(s, 2), flush=True)
    name = host.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + int(port).to_bytes(2, "big"))
    reply = recv_exact(s, 10)
    print("socks-reply=%d" % reply[1], flush=True)
    if reply[1] == 0:
        s.sendall(("GET %s HTTP/1.0\r\nHost: %s:%s\r\n\r\n" % (path, host, port)).encode())
        print(read_all(s).decode(errors="replace"), flush=True)

def fronting(port, sni):
    # CONNECT to 127.0.0.1:port, then a TLS ClientHello naming `sni`
    # (Python sends no SNI when the name is an IP address).
    s = socket.create_connection(("127.0.0.1", 3128), timeout=5)
    s.sendall(("CONNECT 127.0.0.1:%s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\n\r\n" % (port, port)).encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        b = s.recv(1)
        if not b:
            break
        head += b
    print("connect-status=" + head.split(b"\r\n")[0].decode(), flush=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        t = ctx.wrap_socket(s, server_hostname=sni)
        t.sendall(b"GET /fronted HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = t.recv(4096)
        print("tls=ok " + data.split(b"\r\n")[0].decode(errors="replace"), flush=True)
    except OSError as e:
        print("tls=failed " + err(e), flush=True)

def connect(host, port):
    label = "connect %s:%s" % (host, port)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        print(label + "=ok", flush=True)
    except OSError as e:
        print(label + "=failed " + err(e), flush=True)

def udp(host, port):
    label = "udp %s:%s" % (host, port)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"airlock-udp-probe", (host, int(port)))
        print(label + "=sent", flush=True)
    except OSError as e:
        print(label + "=failed " + err(e), flush=True)

def unix_host(name):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect("\0" + name)
        print("unix-host=ok", flush=True)
    except OSError as e:
        print("unix-host=failed " + err(e), flush=True)

def unix_inside():
    # Two processes of the sandbox talking over Unix sockets, as test suites do.
    for label, addr in (("path", "/tmp/airlock-egress-test.sock"), ("abstract", "\0airlock-egress-inside")):
        try:
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(addr)
            srv.listen(1)
            srv.settimeout(5)
            pid = os.fork()
            if pid == 0:
                srv.close()
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect(addr)
                c.sendall(b"ping")
                c.close()
                os._exit(0)
            conn, _ = srv.accept()
            data = recv_exact(conn, 4)
            os.waitpid(pid, 0)
            print("unix-%s=ok %s" % (label, data.decode()), flush=True)
        except OSError as e:
            print("unix-%s=failed %s" % (label, err(e)), flush=True)

def resolve(name):
    try:
        socket.getaddrinfo(name, 80)
        print("resolve %s=ok" % name, flush=True)
    except OSError as e:
        print("resolve %s=failed %s" % (name, type(e).__name__), flush=True)

def flood(port, count):
    # Many connections to the HTTP proxy port at once, each with an
    # unfinished request so that the proxy holds it; held a few seconds,
    # then counted: still open, or closed by the relay's cap.
    held, failed = [], 0
    for _ in range(int(count)):
        try:
            s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
            s.sendall(("GET http://127.0.0.1:%s/flood HTTP/1.1\r\n" % port).encode())
            held.append(s)
        except OSError:
            failed += 1
    time.sleep(3)
    alive = closed = 0
    for s in held:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed += 1
            else:
                alive += 1
        except BlockingIOError:
            alive += 1
        except OSError:
            closed += 1
    print("flood alive=%d closed=%d failed=%d" % (alive, closed, failed), flush=True)
    for s in held:
        s.close()

cmd, args = sys.argv[1], sys.argv[2:]
{"flood": flood, "socks": socks, "fronting": fronting, "connect": connect, "udp": udp, "unix-host": unix_host,
 "unix-inside": unix_inside, "resolve": resolve}[cmd](*args)
"#;

/// Shell prelude for scripts: `c` is curl with a time limit, `sec NAME`
/// starts a section of the output that [`section`] finds.
const PRELUDE: &str = "c() { curl -sS --max-time 5 \"$@\"; }; sec() { echo; echo \"== $1\"; }; ";

/// Writes the probe into the workspace, where the sandbox sees it.
fn install_probe(env: &Env) {
    std::fs::write(env.workspace.join("probe.py"), PROBE).unwrap();
}

/// The text printed after `sec NAME`, up to the next section.
pub(crate) fn section<'a>(out: &'a str, name: &str) -> &'a str {
    let marker = format!("\n== {name}\n");
    let Some(start) = out.find(&marker) else { panic!("no section {name:?} in:\n{out}") };
    let rest = &out[start + marker.len()..];
    rest.find("\n== ").map_or(rest, |end| &rest[..=end])
}

/// What curl's `-D -` printed for the request itself, after the proxy's
/// answer to its CONNECT (for https:// URLs).
pub(crate) fn after_connect(headers: &str) -> &str {
    match headers.find("\r\n\r\nHTTP/") {
        Some(i) if headers.starts_with("HTTP/1.1 200") => &headers[i + 4..],
        _ => headers,
    }
}

/// `airlock run --name NAME --timeout 60s [extra…] -- sh -c PRELUDE+SCRIPT`
/// with extra variables in airlock's own environment.
pub(crate) fn run_in(env: &Env, name: &str, extra: &[&str], vars: &[(&str, &str)], script: &str) -> Output {
    let mut args: Vec<&str> = vec!["run", "--name", name, "--timeout", "60s"];
    args.extend_from_slice(extra);
    let script = format!("{PRELUDE}{script}");
    args.extend_from_slice(&["--", "sh", "-c", &script]);
    let mut cmd = env.airlock(args);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The isolation tier a test's sandbox runs on: the egress tests hold both
/// to the same proxy and policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    Process,
    Microvm,
}

/// Appended to a policy that extends a built-in, it puts it on the microVM
/// tier, under software emulation where KVM cannot run it (as the microVM
/// suite does; one vCPU boots fastest there).
pub(crate) const MICROVM_POLICY: &str = "[isolation]\ntier = \"microvm\"\nallow_weaker = [\"kvm\"]\n\
     [limits]\ntimeout = \"10m\"\ncpus = 1\nmemory = \"512M\"\n";

/// Whether the tier can run here (the microVM tier needs QEMU and a kernel).
pub(crate) fn tier_ready(tier: Tier) -> bool {
    needs_clients() && (tier == Tier::Process || super::microvm::ready())
}

/// [`run_in`] on `tier`. In a microVM guest the probe is written to its
/// /tmp (its own memory, not the workspace), which the script starts in.
pub(crate) fn run_on(
    tier: Tier,
    env: &Env,
    name: &str,
    extra: &[&str],
    vars: &[(&str, &str)],
    script: &str,
) -> Output {
    match tier {
        Tier::Process => run_in(env, name, extra, vars, script),
        Tier::Microvm => microvm_command(env, name, extra, vars, script).output().unwrap(),
    }
}

/// `airlock run` of `script` on the microVM tier, with the probe in the
/// guest's working directory and the microVM suite's guest cache.
pub(crate) fn microvm_command(
    env: &Env,
    name: &str,
    extra: &[&str],
    vars: &[(&str, &str)],
    script: &str,
) -> Command {
    let mut args: Vec<&str> = vec!["run", "--name", name, "--timeout", "5m"];
    args.extend_from_slice(extra);
    let script =
        format!("cd /tmp && cat > probe.py <<'AIRLOCK_PROBE'\n{PROBE}\nAIRLOCK_PROBE\n{PRELUDE}{script}");
    args.extend_from_slice(&["--", "sh", "-c", &script]);
    let mut cmd = env.airlock(args);
    cmd.env("AIRLOCK_VM_CACHE", super::microvm::shared_cache());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

/// Writes a policy file next to the workspace and returns its path.
pub(crate) fn write_policy(env: &Env, file: &str, text: &str) -> PathBuf {
    let path = env.dir.path().join(file);
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes the test CA where the policy names it, and returns the path.
pub(crate) fn write_ca(env: &Env, tls: &TestTls) -> PathBuf {
    let path = env.dir.path().join("test-ca.pem");
    std::fs::write(&path, &tls.ca_pem).unwrap();
    path
}

/// `airlock net log NAME --json`.
pub(crate) fn net_log(env: &Env, name: &str) -> Vec<Value> {
    let o = env.airlock(["net", "log", name, "--json"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("net log is not JSON: {e}\n{}", show(&o)))
}

/// The first event for which `pred` holds; panics with the whole log if none.
pub(crate) fn event<'a>(log: &'a [Value], what: &str, pred: impl Fn(&Value) -> bool) -> &'a Value {
    let found: Vec<&Value> = log.iter().filter(|e| pred(e)).collect();
    assert!(
        !found.is_empty(),
        "no net log event for {what} in:\n{}",
        serde_json::to_string_pretty(log).unwrap()
    );
    found[0]
}

pub(crate) fn is(e: &Value, key: &str, want: impl Into<Value>) -> bool {
    e[key] == want.into()
}

pub(crate) fn needs_clients() -> bool {
    require(Path::new("/usr/bin/curl").exists(), "curl in /usr/bin (inside the sandbox)")
        && require(Path::new("/usr/bin/python3").exists(), "python3 in /usr/bin (inside the sandbox)")
}

/// A secret value that occurs nowhere by chance.
pub(crate) fn secret_value() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("tok-{:x}-{nanos:x}-Zq7Vw", std::process::id())
}

/// Ports listening (state 0A) in a /proc/net/tcp dump.
fn listening_ports(proc_net_tcp: &str) -> Vec<u16> {
    proc_net_tcp
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let port = fields.get(1)?.rsplit_once(':')?.1;
            (fields.get(3) == Some(&"0A")).then(|| u16::from_str_radix(port, 16).ok())?
        })
        .collect()
}

/// An IPv4 address of one of the host's own interfaces other than loopback.
fn host_non_loopback_v4() -> Option<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/fib_trie").ok()?;
    let lines: Vec<&str> = text.lines().collect();
    lines.windows(2).find_map(|w| {
        let ip: Ipv4Addr = w[0].trim().strip_prefix("|-- ")?.parse().ok()?;
        (w[1].trim() == "/32 host LOCAL" && !ip.is_loopback()).then_some(ip)
    })
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Sections `env`, `allowed`, `post`, `denied`, `connect-denied`,
/// `socks-allowed` and `socks-denied`: plain HTTP and SOCKS to the server
/// on port `p`, and both to a host with no allow entry. The probe is in
/// the working directory.
fn allowed_and_refused_script(p: u16, upload: &str) -> String {
    format!(
        "sec env; echo \"proxy=$http_proxy no_proxy=[$NO_PROXY]\"; env | sort; \
         sec allowed; c -D - http://127.0.0.1:{p}/hello; \
         sec post; c -o /dev/null -w '%{{http_code}}' --data '{upload}' http://127.0.0.1:{p}/upload; \
         sec denied; c -D - http://example.net/x; echo \"curl=$?\"; \
         sec connect-denied; c https://example.net/; echo \"curl=$?\"; \
         sec socks-allowed; python3 probe.py socks 127.0.0.1 {p} /via-socks; \
         sec socks-denied; python3 probe.py socks example.net 80 /; "
    )
}

/// Plain HTTP and SOCKS to an allowed loopback server go through; a host
/// without an allow entry gets a 403 (HTTP) or reply 2 (SOCKS) that names
/// the missing entry; `airlock net log --json` has every decision.
#[test]
fn allowed_requests_reach_the_host_and_others_are_refused_with_the_reason() {
    if !needs_clients() {
        return;
    }
    let env = Env::new();
    install_probe(&env);
    let server = EchoServer::http();
    let p = server.port;
    let allow = format!("127.0.0.1:{p}");
    let upload = "u".repeat(1000);
    let script = format!("{}sec end", allowed_and_refused_script(p, &upload));
    let o = run_on(Tier::Process, &env, "http", &["--allow", &allow], &[], &script);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    check_allowed_and_refused(&env, "http", "dev", &o, &server, &upload);
}

/// A long-lived microVM (`create --tier microvm`) gets the same egress as
/// `run`'s: its exec reaches an allowed server through the sandbox's proxy
/// (started by the one lifecycle, in the sandbox's cgroup), a host without
/// an allow entry is refused, and `net log` has both decisions.
#[test]
fn a_long_lived_microvm_reaches_allowed_hosts_through_its_proxy() {
    if !tier_ready(Tier::Microvm) {
        return;
    }
    let env = Env::new();
    let server = EchoServer::http();
    let p = server.port;
    let policy = write_policy(&env, "microvm-dev.toml", &format!("extends = \"dev\"\n{MICROVM_POLICY}"));
    let allow = format!("127.0.0.1:{p}");
    let vm = |args: &[&str]| {
        env.airlock(args).env("AIRLOCK_VM_CACHE", super::microvm::shared_cache()).output().unwrap()
    };
    let created = vm(&[
        "create",
        "--policy",
        policy.to_str().unwrap(),
        "--name",
        "lvnet",
        "--mode",
        "none",
        "--allow",
        &allow,
    ]);
    assert_eq!(created.status.code(), Some(0), "{}", show(&created));
    let script = format!(
        "{PRELUDE}sec allowed; c -D - http://127.0.0.1:{p}/from-exec; \
         sec denied; c -D - http://example.net/x; echo \"curl=$?\"; sec end"
    );
    let o = vm(&["exec", "lvnet", "--", "sh", "-c", &script]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    let allowed = section(&out, "allowed");
    assert!(allowed.starts_with("HTTP/1.1 200"), "{}", show(&o));
    assert!(allowed.contains("echo-server saw:\nGET /from-exec HTTP/1.1"), "{}", show(&o));
    assert!(section(&out, "denied").starts_with("HTTP/1.1 403"), "{}", show(&o));
    assert!(server.seen().iter().any(|r| r.starts_with("GET /from-exec ")), "{:#?}", server.seen());

    let log = net_log(&env, "lvnet");
    let seen = event(&log, "GET /from-exec", |e| is(e, "path", "/from-exec"));
    assert!(is(seen, "allowed", true) && is(seen, "rule", format!("allow \"{allow}\"")), "{seen}");
    let refused = event(&log, "example.net", |e| is(e, "host", "example.net"));
    assert!(is(refused, "allowed", false), "{refused}");

    // The proxy is the sandbox's: in its cgroup, beside QEMU.
    let meta: Value =
        serde_json::from_slice(&std::fs::read(env.sandbox_dir("lvnet").join("meta.json")).unwrap()).unwrap();
    let cgroup = meta["cgroup"].as_str().expect("the sandbox has a cgroup").to_owned();
    let proxies = pids_running("__egress lvnet");
    assert_eq!(proxies.len(), 1, "one proxy for the sandbox");
    let placed = std::fs::read_to_string(format!("/proc/{}/cgroup", proxies[0])).unwrap();
    assert!(
        placed.lines().any(|l| l.ends_with(&format!("/{cgroup}"))),
        "the proxy is not in {cgroup}: {placed}"
    );

    let stopped = vm(&["stop", "lvnet"]);
    assert_eq!(stopped.status.code(), Some(0), "{}", show(&stopped));
    assert!(pids_running("__egress lvnet").is_empty(), "the proxy outlived the sandbox");
    assert_eq!(vm(&["rm", "lvnet"]).status.code(), Some(0));
}

/// The same from a microVM guest, which has no network device: its
/// connections cross the egress port to the same proxy, policy and audit
/// log; around the proxy it reaches nothing (its loopback is its own, it
/// has no other interface). In the same guest (boots cost seconds of emulation), a flood of
/// connections meets the relay's cap: those past it are closed, the host's
/// side of the relay holds no more threads and memory than the cap allows,
/// and a request after the flood still goes through.
#[test]
fn a_microvm_guest_reaches_allowed_hosts_only_through_the_same_proxy() {
    if !tier_ready(Tier::Microvm) {
        return;
    }
    let env = Env::new();
    let server = EchoServer::http();
    let after = EchoServer::http();
    let p = server.port;
    // The opaque guest: without transparent egress nothing is redirected
    // (with it, `suite::transparent_vm`).
    let policy = write_policy(
        &env,
        "microvm-dev.toml",
        &format!("extends = \"dev\"\n[network]\ntransparent = false\n{MICROVM_POLICY}"),
    );
    let allow = format!("127.0.0.1:{p}");
    let allow_after = format!("127.0.0.1:{}", after.port);
    let upload = "u".repeat(1000);
    const FLOOD: usize = 400;
    // Around the proxy: the guest's loopback is its own, and it has no
    // other interface (the host's own address, if it has one besides
    // loopback, listens here).
    let other = host_non_loopback_v4().map(|ip| TcpListener::bind((ip, 0)).unwrap());
    let other_addr =
        other.as_ref().map_or("10.255.255.1:9".to_string(), |l| l.local_addr().unwrap().to_string());
    let (other_host, other_port) = other_addr.split_once(':').unwrap();
    let script = format!(
        "{}sec bypass; c --noproxy '*' http://127.0.0.1:{p}/direct; echo \"curl=$?\"; \
         python3 probe.py connect 127.0.0.1 {p}; python3 probe.py connect {other_host} {other_port}; \
         python3 probe.py udp {other_host} {other_port}; \
         sec flood; python3 probe.py flood {pa} {FLOOD}; sec after-flood; c http://127.0.0.1:{pa}/after; sec end",
        allowed_and_refused_script(p, &upload),
        pa = after.port,
    );
    let extra = ["--policy", policy.to_str().unwrap(), "--allow", &allow, "--allow", &allow_after];
    let mut cmd = microvm_command(&env, "vm-http", &extra, &[], &script);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The host's side of the relay lives in this process (`airlock run`):
    // its threads and memory, at their highest while the guest floods.
    let status = format!("/proc/{}/status", child.id());
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut threads, mut rss_kib) = (0u64, 0u64);
            while !done.load(Ordering::SeqCst) {
                if let Ok(text) = std::fs::read_to_string(&status) {
                    let field = |name: &str| -> u64 {
                        text.lines()
                            .find_map(|l| l.strip_prefix(name))
                            .and_then(|v| v.split_whitespace().next()?.parse().ok())
                            .unwrap_or(0)
                    };
                    threads = threads.max(field("Threads:"));
                    rss_kib = rss_kib.max(field("VmRSS:"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (threads, rss_kib)
        })
    };
    let o = child.wait_with_output().unwrap();
    done.store(true, Ordering::SeqCst);
    let (threads, rss_kib) = sampler.join().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    check_allowed_and_refused(&env, "vm-http", "microvm-dev", &o, &server, &upload);

    let out = stdout(&o);
    let bypass = section(&out, "bypass");
    assert!(bypass.contains("curl=7"), "curl connected around the proxy\n{}", show(&o));
    assert!(bypass.contains(&format!("connect 127.0.0.1:{p}=failed ECONNREFUSED")), "{}", show(&o));
    assert!(bypass.contains(&format!("connect {other_addr}=failed ENETUNREACH")), "{}", show(&o));
    assert!(bypass.contains(&format!("udp {other_addr}=failed ENETUNREACH")), "{}", show(&o));
    if let Some(listener) = &other {
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "the guest reached the host's own address");
    }
    let flood = section(&out, "flood");
    let count = |key: &str| -> usize {
        flood
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in the flood's result\n{}", show(&o)))
    };
    let (alive, closed, failed) = (count("alive"), count("closed"), count("failed"));
    const CAP: usize = 128;
    assert_eq!(alive + closed + failed, FLOOD, "{flood}");
    assert!(alive <= CAP, "more connections than the cap stayed open: {flood}");
    assert!(closed + failed >= FLOOD - CAP, "connections past the cap were not refused: {flood}");
    assert!(
        section(&out, "after-flood").contains("echo-server saw:\nGET /after HTTP/1.1"),
        "a request after the flood: {}",
        show(&o)
    );
    // Two relay threads per connection within the cap, a few of its own.
    assert!(threads <= (2 * CAP + 40) as u64, "airlock run had {threads} threads during the flood");
    assert!(rss_kib < 256 * 1024, "airlock run grew to {rss_kib} KiB during the flood");
    eprintln!("flood of {FLOOD}: {}; airlock run peaked at {threads} threads, {rss_kib} KiB", flood.trim());
}

/// What either tier must show for [`allowed_and_refused_script`] run as
/// sandbox `name` under policy `policy`, which allows only the server.
pub(crate) fn check_allowed_and_refused(
    env: &Env,
    name: &str,
    policy: &str,
    o: &Output,
    server: &EchoServer,
    upload: &str,
) {
    let p = server.port;
    let allow = format!("127.0.0.1:{p}");
    let out = stdout(o);
    let vars = section(&out, "env");
    assert!(vars.contains("proxy=http://127.0.0.1:3128 no_proxy=[]"), "{}", show(o));
    for expected in [
        "HTTP_PROXY=http://127.0.0.1:3128",
        "HTTPS_PROXY=http://127.0.0.1:3128",
        "ALL_PROXY=socks5h://127.0.0.1:1080",
        "NO_PROXY=",
        "http_proxy=http://127.0.0.1:3128",
        "https_proxy=http://127.0.0.1:3128",
        "all_proxy=socks5h://127.0.0.1:1080",
        "no_proxy=",
        "npm_config_proxy=http://127.0.0.1:3128",
        "npm_config_https_proxy=http://127.0.0.1:3128",
        "PIP_PROXY=http://127.0.0.1:3128",
        "CARGO_HTTP_PROXY=http://127.0.0.1:3128",
        "GIT_CONFIG_VALUE_0=http://127.0.0.1:3128",
        "SSL_CERT_FILE=/run/airlock/ca-bundle.pem",
        "REQUESTS_CA_BUNDLE=/run/airlock/ca-bundle.pem",
        "NODE_EXTRA_CA_CERTS=/run/airlock/ca-bundle.pem",
        "CURL_CA_BUNDLE=/run/airlock/ca-bundle.pem",
        "GIT_SSL_CAINFO=/run/airlock/ca-bundle.pem",
    ] {
        assert!(vars.lines().any(|l| l == expected), "missing {expected}\n{}", show(o));
    }

    let allowed = section(&out, "allowed");
    assert!(allowed.starts_with("HTTP/1.1 200"), "{}", show(o));
    assert!(allowed.contains("echo-server saw:\nGET /hello HTTP/1.1"), "{}", show(o));
    assert_eq!(section(&out, "post").trim(), "200", "{}", show(o));

    let denied = section(&out, "denied");
    assert!(denied.starts_with("HTTP/1.1 403"), "{}", show(o));
    assert!(denied.contains("x-airlock-denied: no allow entry matches example.net:80"), "{}", show(o));
    assert!(
        denied.contains(&format!(
            "airlock: policy {policy} refused GET http://example.net:80/x: no allow entry matches"
        )),
        "the body names the policy and the reason\n{}",
        show(o)
    );
    // curl: "CONNECT tunnel failed" (56) after the proxy's 403.
    assert!(section(&out, "connect-denied").contains("curl=56"), "{}", show(o));

    let socks_ok = section(&out, "socks-allowed");
    assert!(socks_ok.contains("socks-reply=0"), "{}", show(o));
    assert!(socks_ok.contains("GET /via-socks HTTP/1.0"), "{}", show(o));
    assert!(
        section(&out, "socks-denied").contains("socks-reply=2"),
        "SOCKS 'not allowed by ruleset'\n{}",
        show(o)
    );

    let seen = server.seen();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    assert!(seen.iter().any(|r| r.starts_with("GET /hello ")), "{seen:#?}");
    assert!(seen.iter().any(|r| r.starts_with("POST /upload ") && r.ends_with(&upload)), "{seen:#?}");

    let log = net_log(env, name);
    let rule = format!("allow \"{allow}\"");
    let hello = event(&log, "GET /hello", |e| is(e, "path", "/hello"));
    assert!(is(hello, "via", "http") && is(hello, "host", "127.0.0.1") && is(hello, "port", p), "{hello}");
    assert!(is(hello, "method", "GET") && is(hello, "allowed", true), "{hello}");
    assert!(is(hello, "rule", rule.as_str()) && is(hello, "handling", "plain"), "{hello}");
    assert!(is(hello, "address", format!("127.0.0.1:{p}")), "{hello}");
    assert!(hello["bytes_in"].as_u64().unwrap() > 0, "{hello}");

    let refused = event(&log, "GET example.net/x", |e| is(e, "host", "example.net") && is(e, "path", "/x"));
    assert!(is(refused, "port", 80) && is(refused, "method", "GET") && is(refused, "allowed", false));
    assert!(is(refused, "rule", "no allow entry matches example.net:80"), "{refused}");
    assert!(is(refused, "handling", "refused") && is(refused, "bytes_in", 0), "{refused}");

    let connect =
        event(&log, "CONNECT example.net:443", |e| is(e, "host", "example.net") && is(e, "port", 443));
    assert!(is(connect, "allowed", false) && is(connect, "rule", "no allow entry matches example.net:443"));

    let socks = event(&log, "SOCKS to the server", |e| is(e, "via", "socks") && is(e, "port", p));
    assert!(is(socks, "allowed", true) && is(socks, "handling", "tunnel"), "{socks}");
    assert!(socks["bytes_out"].as_u64().unwrap() > 0 && socks["bytes_in"].as_u64().unwrap() > 0, "{socks}");
    let socks_denied =
        event(&log, "SOCKS refusal", |e| is(e, "via", "socks") && is(e, "host", "example.net"));
    assert!(is(socks_denied, "allowed", false), "{socks_denied}");

    // "bytes each way": the 1000-byte upload went out through the proxy.
    let post = event(&log, "POST /upload", |e| is(e, "path", "/upload"));
    assert!(is(post, "method", "POST") && is(post, "allowed", true), "{post}");
    assert!(
        post["bytes_out"].as_u64().unwrap() >= 1000,
        "a 1000-byte request body is not counted in bytes_out: {post}"
    );

    let text = env.airlock(["net", "log", name]).output().unwrap();
    let text = stdout(&text);
    assert!(text.contains("DENY") && text.contains("example.net:80 GET /x"), "{text}");
}

/// HTTPS to a host with method/path rules is decrypted (with the sandbox's
/// CA, which curl inside trusts) and each request is checked; the upstream
/// is verified against the test CA the policy adds.
#[test]
fn https_rules_refuse_by_method_and_path() {
    if !needs_clients() {
        return;
    }
    let env = Env::new();
    let tls = test_tls();
    let server = EchoServer::https(&tls);
    let p = server.port;
    let ca = write_ca(&env, &tls);
    let policy = write_policy(
        &env,
        "rules.toml",
        &format!(
            "extends = \"dev\"\n\
             [network]\nallow = [\"127.0.0.1:{p}\"]\nextra_roots = [{ca:?}]\n\
             [[network.rule]]\nhost = \"127.0.0.1\"\nmethods = [\"GET\"]\npaths = [\"/repos/**\"]\n"
        ),
    );
    let policy = policy.to_str().unwrap();
    let u = format!("https://127.0.0.1:{p}");
    let o = run_in(
        &env,
        "rules",
        &["--policy", policy],
        &[],
        &format!(
            "sec get; c -D - {u}/repos/a/b; echo \"curl=$?\"; \
             sec post; c -D - -X POST {u}/repos/a; \
             sec path; c -D - {u}/admin; \
             sec dotdot; c -D - --path-as-is {u}/repos/../admin; \
             sec no-env; env -u CURL_CA_BUNDLE -u SSL_CERT_FILE curl -sS --max-time 5 {u}/repos/system-bundle; \
             sec python; python3 -c 'import urllib.request as u; print(u.urlopen(\"{u}/repos/py\", timeout=5).read().decode())'; \
             sec python-post; python3 -c 'import urllib.request as u; u.urlopen(u.Request(\"{u}/repos/py\", data=b\"x\"), timeout=5)' 2>&1 | tail -1; \
             sec end"
        ),
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);

    let get = after_connect(section(&out, "get"));
    assert!(get.starts_with("HTTP/1.1 200"), "{}", show(&o));
    assert!(get.contains("GET /repos/a/b HTTP/1.1"), "{}", show(&o));

    let post = after_connect(section(&out, "post"));
    assert!(post.starts_with("HTTP/1.1 403"), "{}", show(&o));
    assert!(post.contains("x-airlock-denied: rule for 127.0.0.1 allows methods GET"), "{}", show(&o));
    assert!(post.contains("policy "), "the body names the policy\n{}", show(&o));

    let path = after_connect(section(&out, "path"));
    assert!(path.starts_with("HTTP/1.1 403"), "{}", show(&o));
    assert!(path.contains("x-airlock-denied: rule for 127.0.0.1 allows paths /repos/**"), "{}", show(&o));

    let dotdot = after_connect(section(&out, "dotdot"));
    assert!(
        dotdot.starts_with("HTTP/1.1 403") && dotdot.contains("x-airlock-denied: rule for"),
        "{}",
        show(&o)
    );

    // Tools that ignore the variables trust the sandbox's CA through the
    // system bundle; Python's urllib follows https_proxy and SSL_CERT_FILE.
    assert!(section(&out, "no-env").contains("GET /repos/system-bundle HTTP/1.1"), "{}", show(&o));
    assert!(section(&out, "python").contains("GET /repos/py HTTP/1.1"), "{}", show(&o));
    assert!(section(&out, "python-post").contains("HTTP Error 403"), "{}", show(&o));

    let seen = server.seen();
    let lines: Vec<&str> = seen.iter().map(|r| r.lines().next().unwrap_or("")).collect();
    assert_eq!(
        lines,
        ["GET /repos/a/b HTTP/1.1", "GET /repos/system-bundle HTTP/1.1", "GET /repos/py HTTP/1.1"],
        "only the allowed requests reach the server"
    );

    let log = net_log(&env, "rules");
    let ok = event(&log, "GET /repos/a/b", |e| is(e, "path", "/repos/a/b"));
    assert!(is(ok, "allowed", true) && is(ok, "handling", "intercepted") && is(ok, "method", "GET"), "{ok}");
    let post = event(&log, "POST", |e| is(e, "method", "POST"));
    assert!(
        is(post, "allowed", false) && is(post, "rule", "rule for 127.0.0.1 allows methods GET"),
        "{post}"
    );
    let admin = event(&log, "GET /admin", |e| is(e, "path", "/admin"));
    assert!(is(admin, "allowed", false) && is(admin, "rule", "rule for 127.0.0.1 allows paths /repos/**"));
}

/// Loopback, private and metadata addresses need an allow entry naming the
/// address with the port; a name that resolves to one is checked at the
/// address (localhost → 127.0.0.1), and a deny on the name wins.
#[test]
fn private_addresses_need_the_address_and_port_named() {
    if !needs_clients() {
        return;
    }
    let env = Env::new();
    install_probe(&env);
    let server = EchoServer::http();
    let p = server.port;
    let addr_entry = format!("127.0.0.1:{p}");
    // Always through the proxy, even where NO_PROXY would say loopback is local.
    let px = "c -x http://127.0.0.1:3128 --noproxy '' -D -";

    // The name is allowed, the address it resolves to is not named.
    let o = run_in(
        &env,
        "name-only",
        &["--allow", "localhost"],
        &[],
        &format!(
            "sec name; {px} http://localhost:{p}/a; sec addr; {px} http://127.0.0.1:{p}/b; \
             sec socks; python3 probe.py socks localhost {p} /c; sec end"
        ),
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    let name = section(&out, "name");
    assert!(name.starts_with("HTTP/1.1 403"), "{}", show(&o));
    assert!(name.contains("x-airlock-denied: localhost resolves to"), "{}", show(&o));
    assert!(name.contains("a loopback address; name it with its port in network.allow"), "{}", show(&o));
    assert!(section(&out, "addr").contains(&format!("no allow entry matches 127.0.0.1:{p}")), "{}", show(&o));
    assert!(section(&out, "socks").contains("socks-reply=2"), "{}", show(&o));

    // The address alone: the name is still not allowed.
    let o = run_in(
        &env,
        "addr-only",
        &["--allow", &addr_entry],
        &[],
        &format!("sec name; {px} http://localhost:{p}/d; sec end"),
    );
    let name = section(&stdout(&o), "name").to_string();
    assert!(
        name.contains(&format!("x-airlock-denied: no allow entry matches localhost:{p}")),
        "{}",
        show(&o)
    );

    // The address without a port, and metadata addresses named without
    // their port or by a network: all refused before any connection.
    let o = run_in(
        &env,
        "no-port",
        &["--allow", "127.0.0.1", "--allow", "169.254.169.254", "--allow", "169.254.0.0/16:80"],
        &[],
        &format!(
            "sec addr; {px} http://127.0.0.1:{p}/e; sec metadata; {px} http://169.254.169.254/latest/; sec end"
        ),
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    assert!(
        section(&out, "addr")
            .contains("x-airlock-denied: 127.0.0.1 is a loopback address; name it with its port"),
        "{}",
        show(&o)
    );
    let metadata = section(&out, "metadata");
    assert!(metadata.starts_with("HTTP/1.1 403"), "{}", show(&o));
    assert!(
        metadata.contains("x-airlock-denied: 169.254.169.254 is a cloud metadata address"),
        "{}",
        show(&o)
    );

    // Name and address with port: the name goes through, resolved by the proxy.
    let o = run_in(
        &env,
        "both",
        &["--allow", "localhost", "--allow", &addr_entry],
        &[],
        &format!("sec name; {px} http://localhost:{p}/f; sec end"),
    );
    let name = section(&stdout(&o), "name").to_string();
    assert!(name.starts_with("HTTP/1.1 200") && name.contains("GET /f HTTP/1.1"), "{}", show(&o));

    // A deny on the name wins over both allow entries.
    let policy = write_policy(
        &env,
        "deny.toml",
        &format!(
            "extends = \"dev\"\n[network]\nallow = [\"localhost\", \"{addr_entry}\"]\ndeny = [\"localhost\"]\n"
        ),
    );
    let o = run_in(
        &env,
        "deny",
        &["--policy", policy.to_str().unwrap()],
        &[],
        &format!("sec name; {px} http://localhost:{p}/g; sec addr; {px} http://127.0.0.1:{p}/h; sec end"),
    );
    let out = stdout(&o);
    assert!(section(&out, "name").contains("x-airlock-denied: deny \"localhost\""), "{}", show(&o));
    assert!(section(&out, "addr").starts_with("HTTP/1.1 200"), "{}", show(&o));

    let paths: Vec<String> =
        server.seen().iter().map(|r| r.split_whitespace().nth(1).unwrap_or("").to_string()).collect();
    assert_eq!(paths, ["/f", "/h"], "only the allowed requests reached the server");
}

/// A tunnelled CONNECT (no rules, no secrets: TLS end to end) is refused
/// when the ClientHello names another server than the CONNECT host.
#[test]
fn tls_server_name_differing_from_the_connect_host_is_refused() {
    if !needs_clients() {
        return;
    }
    let env = Env::new();
    install_probe(&env);
    let tls = test_tls();
    let server = EchoServer::https(&tls);
    let p = server.port;
    std::fs::write(env.workspace.join("test-ca.pem"), &tls.ca_pem).unwrap();
    let o = run_in(
        &env,
        "sni",
        &["--allow", &format!("127.0.0.1:{p}")],
        &[],
        &format!(
            "sec fronted; python3 probe.py fronting {p} other.example.org; \
             sec control; python3 probe.py fronting {p} 127.0.0.1; \
             sec curl; c --cacert test-ca.pem https://127.0.0.1:{p}/tunnelled; \
             sec end"
        ),
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    let fronted = section(&out, "fronted");
    assert!(fronted.contains("connect-status=HTTP/1.1 200"), "{}", show(&o));
    assert!(fronted.contains("tls=failed"), "the fronted handshake must not complete\n{}", show(&o));
    assert!(section(&out, "control").contains("tls=ok HTTP/1.1 200"), "{}", show(&o));
    // Tunnelled untouched: curl verified the server's own certificate
    // against the test CA alone.
    assert!(section(&out, "curl").contains("GET /tunnelled HTTP/1.1"), "{}", show(&o));

    let paths: Vec<String> =
        server.seen().iter().map(|r| r.split_whitespace().nth(1).unwrap_or("").to_string()).collect();
    assert_eq!(paths.iter().filter(|p| *p == "/fronted").count(), 1, "{paths:?}");
    assert!(paths.contains(&"/tunnelled".to_string()), "{paths:?}");

    let log = net_log(&env, "sni");
    let refusal = event(&log, "the fronting refusal", |e| is(e, "allowed", false));
    assert!(is(refusal, "port", p) && is(refusal, "handling", "refused"), "{refusal}");
    let rule = refusal["rule"].as_str().unwrap();
    assert!(rule.contains("other.example.org") && rule.contains("domain fronting"), "{refusal}");
    let tunnels = log.iter().filter(|e| is(e, "allowed", true) && is(e, "handling", "tunnel")).count();
    assert_eq!(tunnels, 2, "{}", serde_json::to_string_pretty(&log).unwrap());
}

/// Without transparent egress, a program that ignores the proxy settings
/// gets nothing: not the host's loopback, not its other addresses, not its
/// abstract Unix sockets, no UDP out. Programs inside still talk to each
/// other over Unix sockets. (With it, such connections go to the proxy:
/// `suite::transparent`.)
#[test]
fn connections_that_bypass_the_proxy_fail() {
    if !needs_clients() {
        return;
    }
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};

    let env = Env::new();
    install_probe(&env);
    let server = EchoServer::http();
    let p = server.port;
    let (other_ip, other_listener) = match host_non_loopback_v4() {
        Some(ip) => {
            let l = TcpListener::bind((ip, 0)).unwrap();
            l.set_nonblocking(true).unwrap();
            (format!("{ip}:{}", l.local_addr().unwrap().port()), Some(l))
        }
        // No other interface: an address the sandbox must not reach anyway.
        None => ("10.255.255.1:9".to_string(), None),
    };
    let (other_host, other_port) = other_ip.split_once(':').unwrap();
    let abstract_name = format!("airlock-test-{}-egress", std::process::id());
    let unix = UnixListener::bind_addr(&SocketAddr::from_abstract_name(&abstract_name).unwrap()).unwrap();
    unix.set_nonblocking(true).unwrap();
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    udp.set_nonblocking(true).unwrap();
    let udp_port = udp.local_addr().unwrap().port();

    let policy = write_policy(&env, "opaque.toml", "extends = \"dev\"\n[network]\ntransparent = false\n");
    // Even with the host server allowed through the proxy.
    let o = run_in(
        &env,
        "bypass",
        &["--policy", policy.to_str().unwrap(), "--allow", &format!("127.0.0.1:{p}")],
        &[],
        &format!(
            "sec noproxy; c --noproxy '*' http://127.0.0.1:{p}/direct; echo \"curl=$?\"; \
             sec raw; python3 probe.py connect 127.0.0.1 {p}; python3 probe.py connect {other_host} {other_port}; \
             python3 probe.py udp 127.0.0.1 {udp_port}; python3 probe.py udp {other_host} {udp_port}; \
             sec unix-host; python3 probe.py unix-host {abstract_name}; \
             sec unix-inside; python3 probe.py unix-inside; \
             sec proxied; c http://127.0.0.1:{p}/proxied; \
             sec end"
        ),
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    assert!(section(&out, "noproxy").contains("curl=7"), "curl could connect directly\n{}", show(&o));
    let raw = section(&out, "raw");
    assert!(raw.contains(&format!("connect 127.0.0.1:{p}=failed ECONNREFUSED")), "{}", show(&o));
    assert!(raw.contains(&format!("connect {other_ip}=failed ENETUNREACH")), "{}", show(&o));
    assert!(raw.contains(&format!("udp {other_host}:{udp_port}=failed ENETUNREACH")), "{}", show(&o));
    assert!(section(&out, "unix-host").contains("unix-host=failed"), "{}", show(&o));
    let inside = section(&out, "unix-inside");
    assert!(inside.contains("unix-path=ok ping") && inside.contains("unix-abstract=ok ping"), "{}", show(&o));
    assert!(
        section(&out, "proxied").contains("GET /proxied HTTP/1.1"),
        "the proxy itself works\n{}",
        show(&o)
    );

    let paths: Vec<String> =
        server.seen().iter().map(|r| r.split_whitespace().nth(1).unwrap_or("").to_string()).collect();
    assert_eq!(paths, ["/proxied"], "only the proxied request reached the host server");
    assert_eq!(server.accepted(), 1);
    if let Some(l) = other_listener {
        assert!(l.accept().is_err(), "the sandbox reached the host's {other_ip}");
    }
    assert!(unix.accept().is_err(), "the sandbox reached the host's abstract socket @{abstract_name}");
    let mut buf = [0u8; 64];
    assert!(udp.recv_from(&mut buf).is_err(), "a UDP datagram from the sandbox reached the host");
}

/// No name the policy does not allow resolves inside (airlock's resolver
/// answers NXDOMAIN), and names given to the proxy are decided before they
/// are resolved.
#[test]
fn dns_lookups_inside_fail() {
    if !needs_clients() {
        return;
    }
    let env = Env::new();
    install_probe(&env);
    let o = run_in(
        &env,
        "dns",
        &[],
        &[],
        "sec noproxy; echo \"[$NO_PROXY] [$no_proxy]\"; \
         sec getent; getent hosts example.com; echo \"getent=$?\"; \
         sec python; python3 probe.py resolve example.com; \
         sec proxy; c -D - http://example.com/; \
         sec socks; python3 probe.py socks example.com 443 /; \
         sec end",
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    // Loopback is the sandbox's own when no host loopback service is allowed.
    let loopback = "[localhost,127.0.0.1,::1]";
    assert!(section(&out, "noproxy").contains(&format!("{loopback} {loopback}")), "{}", show(&o));
    let getent = section(&out, "getent");
    assert!(getent.contains("getent=2") && !getent.contains("example.com\n"), "{}", show(&o));
    assert!(section(&out, "python").contains("resolve example.com=failed"), "{}", show(&o));
    let proxy = section(&out, "proxy");
    assert!(proxy.starts_with("HTTP/1.1 403"), "{}", show(&o));
    assert!(
        proxy.contains(
            "airlock: policy dev refused GET http://example.com:80/: no allow entry matches example.com:80"
        ),
        "{}",
        show(&o)
    );
    assert!(section(&out, "socks").contains("socks-reply=2"), "{}", show(&o));
}

/// Two HTTPS servers (A gets the secret, B does not, both intercepted
/// because of a rule on their host), a plain-HTTP server C on the same
/// address, and the policy that says so.
struct SecretsRig {
    env: Env,
    a: EchoServer,
    b: EchoServer,
    c: EchoServer,
    policy: String,
}

impl SecretsRig {
    fn new() -> SecretsRig {
        let env = Env::new();
        let tls = test_tls();
        let (a, b, c) = (EchoServer::https(&tls), EchoServer::https(&tls), EchoServer::http());
        let policy = secrets_policy(&env, &tls, a.port, b.port, c.port);
        SecretsRig { env, a, b, c, policy }
    }
}

fn secrets_policy(env: &Env, tls: &TestTls, a: u16, b: u16, c: u16) -> String {
    let ca = write_ca(env, tls);
    let path = write_policy(
        env,
        "secrets.toml",
        &format!(
            "extends = \"dev\"\n\
             [network]\nallow = [\"127.0.0.1:{a}\", \"127.0.0.1:{b}\", \"127.0.0.1:{c}\"]\nextra_roots = [{ca:?}]\n\
             [[network.rule]]\nhost = \"127.0.0.1\"\nmethods = [\"GET\", \"POST\"]\n\
             [secrets.EXAMPLE_TOKEN]\nfrom = \"env:EXAMPLE_TOKEN\"\nhosts = [\"127.0.0.1:{a}\"]\n\
             [artifacts]\ncapture = [\"*.txt\"]\n"
        ),
    );
    path.to_str().unwrap().to_string()
}

/// Sections `placeholder`, `a`, `b`, `c`: the secret's placeholder, and
/// a request carrying it to each of the [`SecretsRig`]'s servers.
fn secrets_script(a: u16, b: u16, c: u16) -> String {
    let auth = "-H \"Authorization: Bearer $EXAMPLE_TOKEN\"";
    format!(
        "sec placeholder; echo \"$EXAMPLE_TOKEN\"; \
         sec a; c {auth} -H \"X-Other: x$EXAMPLE_TOKEN\" --data \"body=$EXAMPLE_TOKEN\" \
           \"https://127.0.0.1:{a}/a?q=$EXAMPLE_TOKEN\"; \
         sec b; c {auth} https://127.0.0.1:{b}/b; \
         sec c; c {auth} http://127.0.0.1:{c}/c; "
    )
}

/// The placeholder is replaced with the value in request headers to the
/// secret's hosts only: not in the URL or body, not on another intercepted
/// host, never over plain HTTP.
#[test]
fn secrets_are_substituted_only_in_headers_to_their_hosts() {
    if !needs_clients() {
        return;
    }
    let SecretsRig { env, a, b, c, policy } = SecretsRig::new();
    let value = secret_value();
    let script = format!("{}sec end", secrets_script(a.port, b.port, c.port));
    let o =
        run_on(Tier::Process, &env, "secrets", &["--policy", &policy], &[("EXAMPLE_TOKEN", &value)], &script);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    check_secrets(&env, "secrets", &o, [&a, &b, &c], &value);
}

/// The same from a microVM guest: its only way out is the egress port to
/// the same proxy, and the guest trusts the sandbox's CA as the process
/// tier's sandbox does.
#[test]
fn secrets_are_substituted_only_in_headers_to_their_hosts_from_a_microvm() {
    if !tier_ready(Tier::Microvm) {
        return;
    }
    let SecretsRig { env, a, b, c, policy } = SecretsRig::new();
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(MICROVM_POLICY);
    std::fs::write(&policy, text).unwrap();
    let value = secret_value();
    // A reflects the value reversed, which the proxy cannot see through:
    // the guest then prints the value, and airlock's output has it redacted.
    let script = format!(
        "{}sec reflected; c -H X-Echo-Reversed:1 -H \"Authorization: Bearer $EXAMPLE_TOKEN\" \
         https://127.0.0.1:{pa}/reflect | rev; sec end",
        secrets_script(a.port, b.port, c.port),
        pa = a.port
    );
    let o = run_on(
        Tier::Microvm,
        &env,
        "vm-secrets",
        &["--policy", &policy],
        &[("EXAMPLE_TOKEN", &value)],
        &script,
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    check_secrets(&env, "vm-secrets", &o, [&a, &b, &c], &value);
    let reflected = section(&stdout(&o), "reflected").to_string();
    assert!(reflected.contains("Bearer [REDACTED:EXAMPLE_TOKEN]"), "{}", show(&o));
    assert!(a.seen().iter().any(|r| r.starts_with("GET /reflect ") && r.contains(&value)), "{:#?}", a.seen());
}

/// What either tier must show for [`secrets_script`] run as sandbox `name`
/// with the secret's `value`.
fn check_secrets(env: &Env, name: &str, o: &Output, [a, b, c]: [&EchoServer; 3], value: &str) {
    let out = stdout(o);
    let placeholder = section(&out, "placeholder").trim().to_string();
    assert!(placeholder.starts_with("airlock-placeholder-EXAMPLE_TOKEN-"), "{}", show(o));
    assert!(!out.contains(value) && !stderr(o).contains(value), "the value leaked into output\n{}", show(o));
    // A echoes the substituted header: the proxy put the placeholder back.
    let a_out = section(&out, "a");
    assert!(a_out.contains(&format!("Bearer {placeholder}")), "{}", show(o));

    // (The microVM run also asks A to reflect the value: see there.)
    let seen_a: Vec<String> = a.seen().into_iter().filter(|r| !r.starts_with("GET /reflect ")).collect();
    assert_eq!(seen_a.len(), 1, "{seen_a:#?}");
    let req = &seen_a[0];
    assert!(req.contains(&format!("Bearer {value}\r\n")), "A did not get the value: {req}");
    assert!(req.contains(&format!("x{value}\r\n")), "every header carrying the placeholder: {req}");
    assert!(
        req.starts_with(&format!("POST /a?q={placeholder} HTTP/1.1")),
        "the URL is not a header: it keeps the placeholder: {req}"
    );
    assert!(req.ends_with(&format!("body={placeholder}")), "the body keeps the placeholder: {req}");

    for (server, what) in [(b, "another intercepted host"), (c, "plain HTTP")] {
        let seen = server.seen();
        assert_eq!(seen.len(), 1, "{what}: {seen:#?}");
        assert!(seen[0].contains(&format!("Bearer {placeholder}\r\n")), "{what}: {}", seen[0]);
        assert!(!seen[0].contains(value), "{what} got the secret: {}", seen[0]);
    }

    let log = net_log(env, name);
    let to_a = event(&log, "the request to A", |e| is(e, "path", "/a"));
    assert!(is(to_a, "handling", "intercepted") && to_a["secrets"] == serde_json::json!(["EXAMPLE_TOKEN"]));
    let to_b = event(&log, "the request to B", |e| is(e, "path", "/b"));
    assert!(is(to_b, "handling", "intercepted") && to_b["secrets"] == serde_json::json!([]), "{to_b}");
    let to_c = event(&log, "the request to C", |e| is(e, "path", "/c"));
    assert!(is(to_c, "handling", "plain") && to_c["secrets"] == serde_json::json!([]), "{to_c}");
}

/// After a run whose output, a workspace file and a captured artifact all
/// contain the echoed secret, no file in the state directory holds it. (The
/// proxy replaces a value a server reflects as it is; this server reflects
/// it reversed, which the proxy cannot catch, so the value does arrive.)
#[test]
fn secret_value_is_absent_from_the_state_directory() {
    if !needs_clients() {
        return;
    }
    let SecretsRig { env, a, b: _b, c: _c, policy } = SecretsRig::new();
    let value = secret_value();
    let o = run_in(
        &env,
        "leak",
        &["--policy", &policy],
        &[("EXAMPLE_TOKEN", &value)],
        &format!(
            "r='-H X-Echo-Reversed:1'; \
             c $r -H \"Authorization: Bearer $EXAMPLE_TOKEN\" https://127.0.0.1:{pa}/echo | rev | tee echoed.txt; \
             c $r -H \"Authorization: Bearer $EXAMPLE_TOKEN\" https://127.0.0.1:{pa}/stderr | rev >&2; \
             mkdir -p out && c $r -H \"Authorization: Bearer $EXAMPLE_TOKEN\" https://127.0.0.1:{pa}/nested \
               | rev > out/nested.bin; \
             v=$(c $r -H \"X-Echo: $EXAMPLE_TOKEN\" https://127.0.0.1:{pa}/split | rev | sed -n 's/^[Xx]-[Ee]cho: //p' | tr -d '\\r'); \
             printf 'split:%s' \"$(echo \"$v\" | cut -c1-9)\"; sleep 0.3; echo \"$v\" | cut -c10-; \
             echo done",
            pa = a.port
        ),
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(a.seen().len(), 4);
    assert!(a.seen().iter().all(|r| r.contains(&value)), "the server got the value");
    assert!(stdout(&o).contains("[REDACTED:EXAMPLE_TOKEN]"), "{}", show(&o));
    assert!(!stdout(&o).contains(&value) && !stderr(&o).contains(&value), "{}", show(&o));
    // Written in two pieces with a pause between: still redacted as one.
    assert!(stdout(&o).contains("split:[REDACTED:EXAMPLE_TOKEN]\n"), "{}", show(&o));

    let sandbox = env.sandbox_dir("leak");
    let stdout_log = std::fs::read_to_string(sandbox.join("logs/stdout.log")).unwrap();
    assert!(stdout_log.contains("[REDACTED:EXAMPLE_TOKEN]"), "{stdout_log}");
    let stderr_log = std::fs::read_to_string(sandbox.join("logs/stderr.log")).unwrap();
    assert!(stderr_log.contains("[REDACTED:EXAMPLE_TOKEN]"), "{stderr_log}");

    let mut files = Vec::new();
    walk_files(&env.state, &mut files);
    assert!(files.len() > 3, "{files:?}");
    let mut leaks = Vec::new();
    find_value(&env.state, value.as_bytes(), &mut leaks);
    assert!(leaks.is_empty(), "the secret value is in the state directory: {leaks:#?}");

    // The changed workspace file is in the state directory, redacted.
    let diff = env.airlock(["diff", "leak"]).output().unwrap();
    assert!(
        stdout(&diff).contains("echoed.txt") && stdout(&diff).contains("[REDACTED:EXAMPLE_TOKEN]"),
        "{}",
        show(&diff)
    );
    let log = env.airlock(["net", "log", "leak", "--json"]).output().unwrap();
    assert!(!stdout(&log).contains(&value));
}

/// The same for what is not file contents: a file or directory whose name
/// holds the echoed value, a symlink pointing at it, and an artifact named
/// after it (whose name goes into the audit log).
#[test]
fn secret_value_is_absent_from_names_and_links_in_the_state_directory() {
    if !needs_clients() {
        return;
    }
    let SecretsRig { env, a, b: _b, c: _c, policy } = SecretsRig::new();
    let value = secret_value();
    let o = run_in(
        &env,
        "names",
        &["--policy", &policy],
        &[("EXAMPLE_TOKEN", &value)],
        &format!(
            "v=$(c -H X-Echo-Reversed:1 -H \"X-Echo: $EXAMPLE_TOKEN\" https://127.0.0.1:{pa}/get | rev | sed -n 's/^[Xx]-[Ee]cho: //p' | tr -d '\\r'); \
             [ ${{#v}} -gt 20 ] && [ \"$v\" != \"$EXAMPLE_TOKEN\" ] && echo got-value; \
             echo x > \"$v.txt\"; mkdir \"dir-$v\"; echo y > \"dir-$v/f\"; ln -s \"/target/$v\" link; echo done",
            pa = a.port
        ),
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains("got-value") && stdout(&o).contains("done"), "{}", show(&o));
    assert!(!stdout(&o).contains(&value) && !stderr(&o).contains(&value), "{}", show(&o));

    let mut leaks = Vec::new();
    find_value(&env.state, value.as_bytes(), &mut leaks);
    assert!(leaks.is_empty(), "the secret value is in the state directory: {leaks:#?}");
}

/// Every place below `dir` where `needle` occurs: a name, a symlink's
/// target, a regular file's contents.
pub(crate) fn find_value(dir: &Path, needle: &[u8], out: &mut Vec<String>) {
    use std::os::unix::ffi::OsStrExt;
    let has = |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if has(entry.file_name().as_bytes()) {
            out.push(format!("name of {}", path.display()));
        }
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            find_value(&path, needle, out);
        } else if meta.is_symlink() {
            if has(std::fs::read_link(&path).unwrap().as_os_str().as_bytes()) {
                out.push(format!("target of symlink {}", path.display()));
            }
        } else if meta.is_file() && has(&std::fs::read(&path).unwrap()) {
            out.push(format!("contents of {}", path.display()));
        }
    }
}

fn walk_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            walk_files(&path, out);
        } else if meta.is_file() {
            out.push(path);
        }
    }
}

/// `--allow` only where the policy permits it; a policy without egress gets
/// no proxy at all: no variables, no listeners.
#[test]
fn allow_flag_and_no_egress() {
    let env = Env::new();
    for policy in ["ci", "plugin"] {
        let o = env
            .airlock(["run", "--policy", policy, "--allow", "127.0.0.1:8080", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(125), "{}", show(&o));
        let err = stderr(&o);
        assert!(
            err.contains("--allow 127.0.0.1:8080") && err.contains(&format!("policy \"{policy}\"")),
            "{err}"
        );
        let why = if policy == "ci" { "allow_flag = false" } else { "egress = \"none\"" };
        assert!(err.contains(why), "{err}");
    }
    assert!(
        std::fs::read_dir(&env.state).map_or(true, |mut d| d.next().is_none()),
        "a refused run left state"
    );

    let script = "echo vars:$(env | grep -ciE '_proxy=|^SSL_CERT_FILE=|CA_BUNDLE=' ); cat /proc/net/tcp; \
                  ls /run/airlock 2>/dev/null; echo end";
    // plugin itself runs in a microVM; its process-tier form, on the record.
    let lowered = env.dir.path().join("plugin-process.toml");
    std::fs::write(&lowered, "extends = \"plugin\"\n[isolation]\ntier = \"process\"\n").unwrap();
    let o = env.run_sh("plugin", &["--policy", lowered.to_str().unwrap()], script);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        stderr(&o).contains("runs on the process tier, sharing the host's kernel, although plugin"),
        "the lowered tier is not said\n{}",
        show(&o)
    );
    let out = stdout(&o);
    assert!(out.contains("vars:0"), "{}", show(&o));
    assert!(listening_ports(&out).is_empty(), "something listens inside a plugin sandbox\n{}", show(&o));

    // The same probe under dev sees the proxy.
    let o = env.run_sh("dev", &[], script);
    let out = stdout(&o);
    assert!(!out.contains("vars:0"), "{}", show(&o));
    let mut ports = listening_ports(&out);
    ports.sort_unstable();
    // The proxy ports, and (transparent egress) the resolver's and the
    // redirected connections' listeners.
    assert_eq!(ports, [1080, 3053, 3128, 3129], "{}", show(&o));
}

/// Each sandbox gets its own CA; its key stays on the host (neither inside
/// nor in the state directory), and only its certificate is in the bundle
/// inside, also at the system bundle's path.
#[test]
fn each_sandbox_has_its_own_ca_whose_key_stays_on_the_host() {
    let env = Env::new();
    // The pattern is assembled inside so the command line does not contain it.
    let script = "k=PRIVATE; echo keys:$(cat /run/airlock/* | grep -c \"$k KEY\"); ls /run/airlock; \
                  cmp -s /run/airlock/ca-bundle.pem /etc/ssl/certs/ca-certificates.crt && echo system-bundle-same; \
                  sed -n '/BEGIN CERT/h; /BEGIN CERT/!H; ${x;p}' /run/airlock/ca-bundle.pem";
    let mut last = Vec::new();
    for name in ["ca-one", "ca-two"] {
        let o = env.run_sh(name, &[], script);
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        let out = stdout(&o);
        assert!(out.contains("keys:0\nca-bundle.pem\n"), "{}", show(&o));
        assert!(out.contains("system-bundle-same"), "{}", show(&o));
        let cert = out[out.find("-----BEGIN CERTIFICATE-----").expect("no certificate")..].to_string();
        last.push(cert);
    }
    assert_ne!(last[0], last[1], "two sandboxes share a CA");

    let mut leaks = Vec::new();
    find_value(&env.state, b"PRIVATE KEY-----", &mut leaks);
    assert!(leaks.is_empty(), "a private key is in the state directory: {leaks:#?}");
}

/// The command holds no descriptor of the agent's channels to the host: the
/// egress channel (over which the agent hands connections to the host's
/// proxy) and the control channel are the agent's alone.
#[test]
fn the_command_inherits_no_channel_to_the_host() {
    if !needs_clients() {
        return;
    }
    let env = Env::new();
    let server = EchoServer::http();
    let p = server.port;
    let o = run_in(
        &env,
        "fds",
        &["--allow", &format!("127.0.0.1:{p}")],
        &[],
        &format!(
            "sec fds; for fd in /proc/$$/fd/*; do readlink $fd; done | grep -c socket; \
             sec junk; (printf 'junk' >&5) 2>/dev/null && echo wrote-5; (printf 'junk' >&3) 2>/dev/null && echo wrote-3; \
             sleep 0.2; sec after; c http://127.0.0.1:{p}/after; sec end"
        ),
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    assert_eq!(section(&out, "fds").trim(), "0", "the shell holds sockets it did not open\n{}", show(&o));
    assert!(!section(&out, "junk").contains("wrote"), "{}", show(&o));
    assert!(section(&out, "after").contains("GET /after HTTP/1.1"), "the egress channel broke\n{}", show(&o));
}
