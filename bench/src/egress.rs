//! The egress benchmarks: a large download and a run of small requests, each
//! through airlock's egress proxy from inside a sandbox and directly on the
//! host, against an HTTP/1.1 server the harness itself runs on loopback.
//!
//! Every number comes from curl's own `--write-out` timers, so sandbox
//! startup is never in them: `speed_download` for the download (bytes over
//! the transfer's total time) and `time_total` per request for latency.
//!
//! Two peers on the host, where installed, put the proxy's numbers in
//! context: socat forwarding one TCP port to the server (a bare relay: what
//! any proxy that copies bytes between two sockets costs on this machine,
//! with no proxy protocol, policy or sandbox) and tinyproxy (an HTTP proxy
//! with CONNECT, no sandbox).
//!
//! Transparent egress (as root): a second listener of the same server on
//! [`TRANSPARENT_ADDRESS`], an address the harness puts on the host's
//! loopback for the run ([`LoopbackAddress`]), so that a connection from
//! inside a sandbox to it is not the sandbox's own loopback and is
//! redirected to airlock; curl inside ignores the proxy settings. Its
//! bytes then take the same path as the CONNECT tunnel's (the proxy relays
//! a tunnel to an address), from a redirected connection instead of a
//! CONNECT.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{BenchError, measure};

/// What the small-request benchmark fetches: a short body, so that the time
/// is the round trip and not the transfer.
pub const SMALL_PATH: &str = "/small";
const SMALL_BODY: &[u8] = b"airlock-bench: a small response\n";
/// The download.
pub const BIG_PATH: &str = "/big";
const CHUNK: usize = 1 << 20;
pub const MIB: f64 = 1024.0 * 1024.0;

/// curl's `--write-out` for every transfer: one line each.
const WRITE_OUT: &str = "%{http_code} %{size_download} %{speed_download} %{time_total}\\n";

/// Proxy settings a direct run on the host must not pick up.
const PROXY_VARS: [&str; 8] = [
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
];

/// An HTTP/1.1 server on 127.0.0.1 with keep-alive: `GET /big` answers
/// `big_bytes` zero bytes, `GET /small…` a 32-byte body, anything else 404.
/// One thread per connection. Stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(big_bytes: u64) -> Result<Server, BenchError> {
        Server::start_on(Ipv4Addr::LOCALHOST, big_bytes)
    }

    /// The same server on another local address.
    pub fn start_on(ip: Ipv4Addr, big_bytes: u64) -> Result<Server, BenchError> {
        let listener =
            TcpListener::bind((ip, 0)).map_err(|e| BenchError::new(format!("cannot listen on {ip}: {e}")))?;
        let addr = listener.local_addr().map_err(|e| BenchError::new(format!("listener address: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_seen = stop.clone();
        let acceptor = std::thread::Builder::new()
            .name("bench-http".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop_seen.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let _ = std::thread::Builder::new()
                        .name("bench-http-conn".into())
                        .spawn(move || serve_connection(conn, big_bytes));
                }
            })
            .map_err(|e| BenchError::new(format!("cannot start the server thread: {e}")))?;
        Ok(Server { addr, stop, acceptor: Some(acceptor) })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor so it sees the flag; wait for it only if that
        // worked, so a failure here cannot hang the harness.
        let woke = TcpStream::connect_timeout(&self.addr, std::time::Duration::from_secs(1)).is_ok();
        if let Some(t) = self.acceptor.take()
            && woke
        {
            let _ = t.join();
        }
    }
}

/// A parsed request head: the target, and whether the client keeps the
/// connection open after the response.
struct Head {
    target: String,
    keep_alive: bool,
}

fn read_head(reader: &mut impl BufRead) -> Option<Head> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (_method, target, version) = (parts.next()?, parts.next()?.to_string(), parts.next()?);
    let mut keep_alive = version.eq_ignore_ascii_case("HTTP/1.1");
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.trim().eq_ignore_ascii_case("connection")
        {
            let value = value.trim();
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        }
    }
    Some(Head { target, keep_alive })
}

fn serve_connection(conn: TcpStream, big_bytes: u64) {
    let _ = conn.set_nodelay(true);
    let Ok(read_half) = conn.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut out = conn;
    let zeros = vec![0u8; CHUNK];
    while let Some(head) = read_head(&mut reader) {
        let path = head.target.split('?').next().unwrap_or("");
        let connection = if head.keep_alive { "keep-alive" } else { "close" };
        let ok = match path {
            BIG_PATH => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                     Content-Length: {big_bytes}\r\nConnection: {connection}\r\n\r\n"
                );
                out.write_all(head.as_bytes()).is_ok() && write_zeros(&mut out, &zeros, big_bytes)
            }
            SMALL_PATH => {
                // Head and body in one write: one segment each way per request.
                let mut resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: {connection}\r\n\r\n",
                    SMALL_BODY.len()
                )
                .into_bytes();
                resp.extend_from_slice(SMALL_BODY);
                out.write_all(&resp).is_ok()
            }
            _ => {
                let resp = format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: {connection}\r\n\r\n"
                );
                out.write_all(resp.as_bytes()).is_ok()
            }
        };
        if !ok || !head.keep_alive {
            break;
        }
    }
    let _ = out.shutdown(Shutdown::Both);
}

fn write_zeros(out: &mut TcpStream, zeros: &[u8], mut left: u64) -> bool {
    while left > 0 {
        let n = usize::try_from(left).map_or(zeros.len(), |l| l.min(zeros.len()));
        if out.write_all(&zeros[..n]).is_err() {
            return false;
        }
        left -= n as u64;
    }
    true
}

/// Where a case's curl runs, and how it reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// On the host, straight to the server.
    Direct,
    /// On the host, through socat forwarding a port to the server.
    Relay,
    /// On the host, through tinyproxy with CONNECT (`curl -p`).
    PeerProxy,
    /// Inside a sandbox, through the proxy with CONNECT (`curl -p`): the
    /// proxy opens one upstream connection and relays bytes untouched.
    Tunnel,
    /// Inside a sandbox, through the proxy as plain HTTP (absolute-form
    /// requests): the proxy decides each request and forwards it.
    Plain,
    /// Inside a sandbox, no proxy settings: the connection to an address
    /// is redirected by the sandbox's kernel and relayed by the proxy as a
    /// tunnel to that address.
    Transparent,
}

impl Route {
    pub fn describe(self) -> &'static str {
        match self {
            Route::Direct => "direct, on the host",
            Route::Relay => "host, socat TCP forward (a bare relay)",
            Route::PeerProxy => "host, tinyproxy CONNECT tunnel (curl -p)",
            Route::Tunnel => "sandbox, proxy CONNECT tunnel (curl -p)",
            Route::Plain => "sandbox, proxy plain HTTP (absolute URL)",
            Route::Transparent => "sandbox, transparent (redirected, no proxy)",
        }
    }
}

/// What one curl invocation fetches, and what each of its transfers yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// One download of `bytes`; yields MiB/s.
    Download { bytes: u64 },
    /// `requests` small GETs on one connection; yields seconds per request.
    Requests { requests: usize },
}

/// How to run airlock for the sandboxed cases.
#[derive(Clone)]
pub struct Sandbox {
    pub airlock: PathBuf,
    pub state: PathBuf,
    pub cwd: PathBuf,
}

/// Everything a case's command needs: the client, the server's port, and
/// how to reach each route.
pub struct Endpoints {
    pub curl: PathBuf,
    pub server: u16,
    pub sandbox: Sandbox,
    /// socat's listening port, when it runs.
    pub relay: Option<u16>,
    /// tinyproxy's listening port, when it runs.
    pub peer_proxy: Option<u16>,
    /// The server's listener on a non-loopback local address, when the
    /// harness could make one (root).
    pub transparent: Option<SocketAddr>,
}

impl Endpoints {
    /// The routes this machine can measure: direct and airlock's always,
    /// the peers where they run.
    pub fn routes(&self) -> Vec<Route> {
        let mut routes = vec![Route::Direct];
        if self.relay.is_some() {
            routes.push(Route::Relay);
        }
        if self.peer_proxy.is_some() {
            routes.push(Route::PeerProxy);
        }
        routes.extend([Route::Tunnel, Route::Plain]);
        if self.transparent.is_some() {
            routes.push(Route::Transparent);
        }
        routes
    }
}

/// The command for one run of `job` over `route`.
pub fn command(ends: &Endpoints, route: Route, job: Job) -> Result<Command, BenchError> {
    let missing = |what: &str| BenchError::new(format!("{what} is not running"));
    // The relay is the only route whose URL names another port: curl
    // believes it talks to the server.
    let target = match route {
        Route::Relay => SocketAddr::from((Ipv4Addr::LOCALHOST, ends.relay.ok_or_else(|| missing("socat"))?)),
        Route::Transparent => {
            ends.transparent.ok_or_else(|| missing("the server's listener beside loopback"))?
        }
        _ => SocketAddr::from((Ipv4Addr::LOCALHOST, ends.server)),
    };
    let url = match job {
        Job::Download { .. } => format!("http://{target}{BIG_PATH}"),
        // curl's URL globbing: N transfers in one process, reusing the
        // connection (to the server, or to the proxy and through it).
        Job::Requests { requests } => format!("http://{target}{SMALL_PATH}?[1-{requests}]"),
    };
    // -sS: no progress meter, but an error still says what went wrong.
    let mut curl_args: Vec<String> = vec!["-sS".into(), "-o".into(), "/dev/null".into()];
    match route {
        // No proxy from the environment, whatever the caller's is.
        // Transparent: curl inside ignores the sandbox's proxy settings.
        Route::Direct | Route::Relay | Route::Transparent => {
            curl_args.extend(["--noproxy".into(), "*".into()])
        }
        Route::PeerProxy => {
            let proxy = ends.peer_proxy.ok_or_else(|| missing("tinyproxy"))?;
            curl_args.extend(["-p".into(), "-x".into(), format!("http://127.0.0.1:{proxy}")]);
        }
        // The sandbox's http_proxy points at airlock's proxy; -p makes curl
        // CONNECT even for http://.
        Route::Tunnel => curl_args.push("-p".into()),
        Route::Plain => {}
    }
    curl_args.extend(["-w".into(), WRITE_OUT.into(), url]);
    Ok(match route {
        Route::Direct | Route::Relay | Route::PeerProxy => {
            let mut c = Command::new(&ends.curl);
            for v in PROXY_VARS {
                c.env_remove(v);
            }
            c.args(curl_args);
            c
        }
        Route::Tunnel | Route::Plain | Route::Transparent => {
            let sandbox = &ends.sandbox;
            let mut c = Command::new(&sandbox.airlock);
            // dev: transparent egress on, and --allow takes the address
            // with its port (which the private-range guard requires).
            c.env("AIRLOCK_STATE_DIR", &sandbox.state)
                .current_dir(&sandbox.cwd)
                .args(["run", "--rm", "--mode", "none", "--allow"])
                .arg(target.to_string())
                .arg("--")
                .arg(&ends.curl)
                .args(curl_args);
            c
        }
    })
}

/// The address the transparent case's server listens on: documentation
/// space, put on the host's loopback device for the run only.
pub const TRANSPARENT_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 80);

/// An address added to the host's loopback device (`ip addr add … dev
/// lo`), removed when dropped. Traffic to it never leaves the machine.
pub struct LoopbackAddress {
    ip: Ipv4Addr,
}

impl LoopbackAddress {
    /// Needs root; refuses an address the host already has.
    pub fn add(ip: Ipv4Addr) -> Result<LoopbackAddress, BenchError> {
        if TcpListener::bind((ip, 0)).is_ok() {
            return Err(BenchError::new(format!("{ip} is already one of this host's addresses")));
        }
        let o = Command::new("ip")
            .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| BenchError::new(format!("ip: {e}")))?;
        if !o.status.success() {
            return Err(BenchError::new(format!(
                "cannot add {ip} to loopback: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        Ok(LoopbackAddress { ip })
    }
}

impl Drop for LoopbackAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.ip), "dev", "lo"])
            .stdin(Stdio::null())
            .output();
    }
}

/// A peer process serving on a loopback port; killed when dropped.
pub struct PeerProcess {
    child: Child,
    pub port: u16,
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port on 127.0.0.1 that nothing listens on now, for a peer to take.
fn free_port() -> Result<u16, BenchError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| BenchError::new(format!("cannot find a free port on 127.0.0.1: {e}")))?;
    l.local_addr().map(|a| a.port()).map_err(|e| BenchError::new(format!("listener address: {e}")))
}

/// Starts `cmd` (which must listen on `port`) and waits until it accepts a
/// connection, or says why it did not.
fn start_peer(mut cmd: Command, name: &str, port: u16) -> Result<PeerProcess, BenchError> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| BenchError::new(format!("cannot start {name}: {e}")))?;
    let mut peer = PeerProcess { child, port };
    let deadline = Instant::now() + Duration::from_secs(5);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    loop {
        if let Ok(Some(status)) = peer.child.try_wait() {
            return Err(BenchError::new(format!("{name} exited before listening ({status})")));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(peer);
        }
        if Instant::now() > deadline {
            return Err(BenchError::new(format!("{name} did not listen on 127.0.0.1:{port} within 5 s")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// socat forwarding a fresh port to `server`, a process per connection
/// (`fork`), with a 1 MiB transfer buffer (its default, 8 KiB, would make
/// it slower than it needs to be).
pub fn start_relay(socat: &Path, server: u16) -> Result<PeerProcess, BenchError> {
    let port = free_port()?;
    let mut c = Command::new(socat);
    c.args(["-b", "1048576"])
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
        .arg(format!("TCP:127.0.0.1:{server}"));
    start_peer(c, "socat", port)
}

/// tinyproxy in the foreground on a fresh port, with a configuration in
/// `dir`: loopback only, no log file, every CONNECT port allowed (it allows
/// all when the configuration names none).
pub fn start_peer_proxy(tinyproxy: &Path, dir: &Path) -> Result<PeerProcess, BenchError> {
    let port = free_port()?;
    let conf = dir.join("tinyproxy.conf");
    let text = format!(
        "Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 600\nMaxClients 64\nLogLevel Critical\n"
    );
    std::fs::write(&conf, text)
        .map_err(|e| BenchError::new(format!("cannot write {}: {e}", conf.display())))?;
    let mut c = Command::new(tinyproxy);
    c.arg("-d").arg("-c").arg(&conf);
    start_peer(c, "tinyproxy", port)
}

/// Reads curl's `--write-out` lines for `job`: checks that every transfer
/// got a 200 with the expected size, and returns one value per transfer
/// (MiB/s for a download, seconds for a request).
pub fn parse_write_out(out: &str, job: Job) -> Result<Vec<f64>, BenchError> {
    let (count, size) = match job {
        Job::Download { bytes } => (1, bytes),
        Job::Requests { requests } => (requests, SMALL_BODY.len() as u64),
    };
    let mut values = Vec::with_capacity(count);
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [code, got, speed, total] = f.as_slice() else {
            return Err(BenchError::new(format!("unexpected curl --write-out line {line:?}")));
        };
        if *code != "200" {
            return Err(BenchError::new(format!("HTTP status {code} (expected 200)")));
        }
        let num =
            |s: &str| s.parse::<f64>().map_err(|_| BenchError::new(format!("not a number in {line:?}")));
        let got = num(got)?;
        if got != size as f64 {
            return Err(BenchError::new(format!("got {got} bytes, expected {size}")));
        }
        values.push(match job {
            Job::Download { .. } => num(speed)? / MIB,
            Job::Requests { .. } => num(total)?,
        });
    }
    if values.len() != count {
        return Err(BenchError::new(format!("curl reported {} transfers, expected {count}", values.len())));
    }
    Ok(values)
}

/// One case: a route and a job.
pub struct EgressCase {
    pub route: Route,
    pub job: Job,
}

/// Runs the cases side by side: `warmup` untimed runs each, then `rounds`
/// rounds of every case in turn (as the other groups do), pooling each
/// case's values. A case that fails is dropped from later rounds.
pub fn measure(
    cases: &[EgressCase],
    ends: &Endpoints,
    warmup: usize,
    rounds: usize,
) -> Vec<Result<Vec<f64>, String>> {
    let once = |c: &EgressCase| -> Result<Vec<f64>, BenchError> {
        let what = match c.route {
            Route::Direct | Route::Relay | Route::PeerProxy => "curl",
            Route::Tunnel | Route::Plain | Route::Transparent => "airlock run … -- curl",
        };
        let out = measure::checked(command(ends, c.route, c.job)?, what)?;
        parse_write_out(&out, c.job).map_err(|e| BenchError::new(format!("{what}: {e}")))
    };
    let mut results: Vec<Result<Vec<f64>, String>> = Vec::with_capacity(cases.len());
    for c in cases {
        eprint!("  warm-up  {:<52} ", c.route.describe());
        let mut r = Ok(Vec::new());
        for _ in 0..warmup {
            if let Err(e) = once(c) {
                r = Err(e.to_string());
                break;
            }
        }
        eprintln!("{}", if r.is_err() { "FAILED" } else { "ok" });
        results.push(r);
    }
    eprint!("  measure  {rounds} rounds …");
    for round in 0..rounds {
        for (c, r) in cases.iter().zip(results.iter_mut()) {
            let Ok(values) = r else { continue };
            match once(c) {
                Ok(v) => values.extend(v),
                Err(e) => *r = Err(format!("timed run {}: {e}", round + 1)),
            }
        }
    }
    eprintln!(" done");
    results
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Read;

    use super::*;

    #[test]
    fn write_out_is_checked_and_converted() {
        let job = Job::Download { bytes: 2 * 1024 * 1024 };
        let v = parse_write_out("200 2097152 104857600 0.02\n", job).unwrap();
        assert_eq!(v, vec![100.0]);
        assert!(parse_write_out("403 2097152 1 0.02\n", job).is_err());
        assert!(parse_write_out("200 100 1 0.02\n", job).is_err());
        assert!(parse_write_out("", job).is_err());
        let job = Job::Requests { requests: 2 };
        let v = parse_write_out("200 32 100 0.000250\n200 32 100 0.000750\n", job).unwrap();
        assert_eq!(v, vec![0.00025, 0.00075]);
        assert!(parse_write_out("200 32 100 0.000250\n", job).is_err());
    }

    fn ends(relay: Option<u16>, peer_proxy: Option<u16>) -> Endpoints {
        Endpoints {
            curl: "/usr/bin/curl".into(),
            server: 8000,
            sandbox: Sandbox { airlock: "/bin/airlock".into(), state: "/s".into(), cwd: "/".into() },
            relay,
            peer_proxy,
            transparent: Some("203.0.113.80:8001".parse().unwrap()),
        }
    }

    fn args(c: &Command) -> Vec<String> {
        c.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn each_route_reaches_the_server_its_own_way() {
        let job = Job::Download { bytes: 1 };
        let e = ends(Some(9001), Some(9002));
        assert_eq!(
            e.routes(),
            [Route::Direct, Route::Relay, Route::PeerProxy, Route::Tunnel, Route::Plain, Route::Transparent]
        );

        // The relay: curl talks to socat's port as if it were the server.
        let relay = command(&e, Route::Relay, job).unwrap();
        assert_eq!(relay.get_program(), "/usr/bin/curl");
        let a = args(&relay);
        assert!(a.contains(&"http://127.0.0.1:9001/big".to_string()), "{a:?}");
        assert!(a.windows(2).any(|w| w == ["--noproxy", "*"]), "{a:?}");

        // tinyproxy: a CONNECT to the server's port through the proxy's.
        let a = args(&command(&e, Route::PeerProxy, job).unwrap());
        assert!(a.windows(3).any(|w| w == ["-p", "-x", "http://127.0.0.1:9002"]), "{a:?}");
        assert!(a.contains(&"http://127.0.0.1:8000/big".to_string()), "{a:?}");

        // airlock's tunnel: the server's port, allowed, from inside a sandbox.
        let tunnel = command(&e, Route::Tunnel, job).unwrap();
        assert_eq!(tunnel.get_program(), "/bin/airlock");
        let a = args(&tunnel);
        assert!(a.windows(2).any(|w| w == ["--allow", "127.0.0.1:8000"]), "{a:?}");
        assert!(a.contains(&"-p".to_string()) && a.contains(&"http://127.0.0.1:8000/big".to_string()));

        // Transparent: no proxy for curl, the address beside loopback allowed.
        let a = args(&command(&e, Route::Transparent, job).unwrap());
        assert!(a.windows(2).any(|w| w == ["--allow", "203.0.113.80:8001"]), "{a:?}");
        assert!(a.windows(2).any(|w| w == ["--noproxy", "*"]), "{a:?}");
        assert!(a.contains(&"http://203.0.113.80:8001/big".to_string()), "{a:?}");
    }

    #[test]
    fn a_peer_that_is_not_running_has_no_route() {
        let mut e = ends(None, None);
        e.transparent = None;
        assert_eq!(e.routes(), [Route::Direct, Route::Tunnel, Route::Plain]);
        let job = Job::Requests { requests: 2 };
        assert!(command(&e, Route::Relay, job).is_err());
        assert!(command(&e, Route::PeerProxy, job).is_err());
    }

    #[test]
    fn server_keeps_the_connection_and_sizes_the_download() {
        let server = Server::start(3 * CHUNK as u64 + 5).unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        for _ in 0..2 {
            s.write_all(b"GET /small?1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut line = String::new();
            let mut len = 0;
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.strip_prefix("Content-Length: ") {
                    len = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            assert_eq!(body, SMALL_BODY);
        }
        s.write_all(b"GET /big HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut all = Vec::new();
        reader.read_to_end(&mut all).unwrap();
        let text = String::from_utf8_lossy(&all[..200]);
        assert!(text.contains(&format!("Content-Length: {}", 3 * CHUNK + 5)), "{text}");
        let head_end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(all.len() - head_end, 3 * CHUNK + 5);
    }
}
