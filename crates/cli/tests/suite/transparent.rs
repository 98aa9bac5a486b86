//! Transparent egress: programs that know nothing of proxies (Node's native
//! fetch, a raw Python socket, getent) get the policy, not a dead network.
//!
//! Each test makes its own test network: a network namespace holding the
//! servers at documentation addresses (203.0.113.0/24, for the hosts and
//! for an "outside" resolver), reached from the host,
//! where the egress proxy runs, over a veth pair with addresses from
//! 198.51.100.0/24 and host routes. The test's policy names the servers'
//! addresses with their ports, which the private-range guard requires for
//! documentation space. The names the policy allows are resolved on the
//! host through an /etc/hosts that only airlock's own process sees (a
//! private mount namespace around `airlock run`). Everything is removed
//! when the test ends, failed or not ([`TestNet`]'s drop).

use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

use super::egress::{EchoServer, event, is, net_log, secret_value, section, test_tls_for, write_policy};
use super::support::*;

/// The allowed names: one intercepted (it has a secret), one tunnelled.
pub(crate) const SECRET_HOST: &str = "api.example.com";
pub(crate) const TUNNEL_HOST: &str = "www.example.org";
/// A name for a registry of a test's own on the servers' address.
pub(crate) const REGISTRY_HOST: &str = "registry.example.org";
/// A name the policy does not allow.
pub(crate) const DENIED_HOST: &str = "denied.example.net";
/// The raw socket's allowed and refused ports on the server's address.
pub(crate) const RAW_PORT: u16 = 7000;
pub(crate) const DENIED_PORT: u16 = 7001;
/// A database-like server on an allowed name: it speaks first, then
/// echoes a binary message (no TLS, no HTTP).
const OPAQUE_PORT: u16 = 5432;
const OPAQUE_BANNER: &[u8] = b"db ready\n";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a veth pair to the host and routes to its
/// addresses; all of it removed on drop.
pub(crate) struct TestNet {
    ns: String,
    host_if: String,
    /// The hosts' address (servers listen here).
    pub(crate) server: Ipv4Addr,
    /// An address with a DNS server on it, which the sandbox must never reach.
    pub(crate) resolver: Ipv4Addr,
    routes: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip").args(args).stdin(Stdio::null()).output().map_err(|e| format!("ip: {e}"))?;
    if o.status.success() { Ok(()) } else { Err(format!("ip {}: {}", args.join(" "), stderr(&o))) }
}

impl TestNet {
    /// None (skipped, or a failure under CI) without root or `ip`.
    pub(crate) fn new() -> Option<TestNet> {
        if !require(is_root(), "root, to create a network namespace and a veth pair")
            || !require(Path::new("/usr/sbin/ip").exists() || Path::new("/sbin/ip").exists(), "ip (iproute2)")
        {
            return None;
        }
        // Unique per test and per test process: names and a /30 of their own.
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let k = ((std::process::id() * 7 + n) % 60) as u8;
        let tag = format!("{:x}{n}", std::process::id() % 0xfffff);
        // The test's host routes must shadow nothing of the machine's own
        // networks (documentation ranges are sometimes real lab networks: a
        // route to the gateway through the veth would cut the machine off):
        // no host address in 203.0.113.0/24 or in this test's /30.
        let ours = |a: &Ipv4Addr| {
            let [a0, a1, a2, a3] = a.octets();
            [a0, a1, a2] == [203, 0, 113] || ([a0, a1, a2] == [198, 51, 100] && a3 / 4 == k)
        };
        let clash: Vec<String> = host_addresses()
            .into_iter()
            .filter(|(_, a)| ours(a))
            .map(|(i, a)| format!("{a} on {i}"))
            .collect();
        if !require(
            clash.is_empty(),
            &format!("203.0.113.0/24 free on this host (it has {})", clash.join(", ")),
        ) {
            return None;
        }
        let mut net = TestNet {
            ns: format!("al-tr-{tag}"),
            host_if: format!("alh{tag}"),
            server: Ipv4Addr::new(203, 0, 113, k + 1),
            resolver: Ipv4Addr::new(203, 0, 113, k + 101),
            routes: Vec::new(),
        };
        let ns_if = format!("aln{tag}");
        let host_addr = format!("198.51.100.{}", 4 * u16::from(k) + 1);
        let ns_addr = format!("198.51.100.{}", 4 * u16::from(k) + 2);
        let (ns, host_if) = (net.ns.clone(), net.host_if.clone());
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), ns.clone()],
            vec!["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &ns]
                .into_iter()
                .map(String::from)
                .collect(),
            vec!["addr".into(), "add".into(), format!("{host_addr}/30"), "dev".into(), host_if.clone()],
            vec!["link".into(), "set".into(), host_if.clone(), "up".into()],
            vec![
                "-n".into(),
                ns.clone(),
                "addr".into(),
                "add".into(),
                format!("{ns_addr}/30"),
                "dev".into(),
                ns_if.clone(),
            ],
            vec!["-n".into(), ns.clone(), "link".into(), "set".into(), ns_if.clone(), "up".into()],
            vec!["-n".into(), ns.clone(), "link".into(), "set".into(), "lo".into(), "up".into()],
            vec![
                "-n".into(),
                ns.clone(),
                "addr".into(),
                "add".into(),
                format!("{}/32", net.server),
                "dev".into(),
                "lo".into(),
            ],
            vec![
                "-n".into(),
                ns.clone(),
                "addr".into(),
                "add".into(),
                format!("{}/32", net.resolver),
                "dev".into(),
                "lo".into(),
            ],
        ];
        for step in &steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            if let Err(e) = ip(&args) {
                panic!("setting up the test network: {e}");
            }
        }
        for addr in [net.server, net.resolver] {
            let route = format!("{addr}/32");
            ip(&["route", "add", &route, "via", &ns_addr]).unwrap_or_else(|e| panic!("{e}"));
            net.routes.push(route);
        }
        Some(net)
    }

    /// `program` to be run inside the namespace (a server of a test's own).
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]);
        cmd
    }

    /// Runs `f` on a thread inside the namespace: sockets it makes belong
    /// to the namespace, whatever thread uses them later.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let fd = std::fs::File::open(&path).unwrap();
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&fd),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }
}

/// The IPv4 addresses of the host's interfaces, with the interface.
fn host_addresses() -> Vec<(String, Ipv4Addr)> {
    let o = Command::new("ip").args(["-4", "-o", "addr", "show"]).output().unwrap();
    stdout(&o)
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "inet")?;
            let ip = words.get(at + 1)?.split('/').next()?.parse().ok()?;
            Some((words.get(1)?.to_string(), ip))
        })
        .collect()
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for route in &self.routes {
            let _ = ip(&["route", "del", route]);
        }
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// The servers: HTTPS on 443 (a leaf for both allowed names), HTTP on 80
/// and on [`RAW_PORT`], and a UDP socket on the outside resolver's port 53.
pub(crate) struct Servers {
    pub(crate) https: EchoServer,
    pub(crate) http: EchoServer,
    pub(crate) raw: EchoServer,
    pub(crate) dns: UdpSocket,
    pub(crate) ca_pem: String,
}

pub(crate) fn start_servers(net: &TestNet) -> Servers {
    let tls = test_tls_for(&[SECRET_HOST, TUNNEL_HOST], &[IpAddr::V4(net.server)]);
    let (server, resolver) = (net.server, net.resolver);
    let (l443, l80, lraw, lopaque, dns) = net.enter(|| {
        (
            TcpListener::bind((server, 443)).unwrap(),
            TcpListener::bind((server, 80)).unwrap(),
            TcpListener::bind((server, RAW_PORT)).unwrap(),
            TcpListener::bind((server, OPAQUE_PORT)).unwrap(),
            UdpSocket::bind((resolver, 53)).unwrap(),
        )
    });
    dns.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut conn in lopaque.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(10)));
            let mut buf = [0u8; 64];
            if conn.write_all(OPAQUE_BANNER).is_ok()
                && let Ok(n) = conn.read(&mut buf)
            {
                let _ = conn.write_all(&buf[..n]);
            }
        }
    });
    Servers {
        https: EchoServer::serve_on(l443, Some(tls.server.clone())),
        http: EchoServer::serve_on(l80, None),
        raw: EchoServer::serve_on(lraw, None),
        dns,
        ca_pem: tls.ca_pem,
    }
}

/// The test policy: the two names, the server's address on the ports used
/// (documentation space needs the address and port named), the test CA
/// for upstream TLS, and a secret for [`SECRET_HOST`].
pub(crate) fn policy_text(net: &TestNet, ca: &Path) -> String {
    let s = net.server;
    format!(
        "extends = \"dev\"\n\
         [network]\ntransparent = true\n\
         allow = [\"{SECRET_HOST}\", \"{TUNNEL_HOST}\", \"{s}:443\", \"{s}:80\", \"{s}:{RAW_PORT}\", \"{s}:{OPAQUE_PORT}\"]\n\
         extra_roots = [{ca:?}]\n\
         [secrets.EXAMPLE_TOKEN]\nfrom = \"env:EXAMPLE_TOKEN\"\nhosts = [\"{SECRET_HOST}\"]\n"
    )
}

/// `airlock run` in a mount namespace of its own where /etc/hosts names
/// the test's hosts: the egress proxy (airlock's child) resolves them
/// there, and nothing else on the machine sees that file.
pub(crate) fn run_with_hosts(env: &Env, net: &TestNet, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let hosts = env.dir.path().join("test-hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n{} {SECRET_HOST} {TUNNEL_HOST} {REGISTRY_HOST}\n", net.server),
    )
    .unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
        .arg(&hosts)
        .arg(BIN)
        .args(args)
        .env("AIRLOCK_STATE_DIR", &env.state)
        .env("AIRLOCK_CGROUP_PARENT", cgroup_parent())
        .env("AIRLOCK_SOCKET", env.dir.path().join("no-daemon.sock"))
        .env_remove("AIRLOCK_LOG")
        .current_dir(&env.workspace)
        .stdin(Stdio::null());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Node's fetch, with the proxy variables removed so that only the
/// transparent path can carry it (newer Node versions honour them), and
/// the test CA trusted beside the sandbox's bundle.
pub(crate) const NODE: &str = r#"
const token = process.env.EXAMPLE_TOKEN;
const cases = [
  ["https-tunnel", "https://www.example.org/tunnel", {}],
  ["http", "http://www.example.org/plain", {}],
  ["https-secret", "https://api.example.com/secret", {Authorization: "Bearer " + token}],
  ["denied", "https://denied.example.net/", {}],
];
(async () => {
  for (const [label, url, headers] of cases) {
    try {
      const r = await fetch(url, {headers});
      const body = await r.text();
      const line = body.split(/\r?\n/).find((l) => / HTTP\/1\.1$/.test(l));
      console.log(`${label}=${r.status} ${line}`);
    } catch (e) {
      console.log(`${label}=failed ${e.cause ? (e.cause.code || e.cause.message) : e.message}`);
    }
  }
})();
"#;

/// What a program that knows nothing of proxies gets, in either tier: a raw
/// socket to an allowed and a refused port (with and without having sent
/// anything: a refusal is a reset, never an orderly end), DNS over UDP and
/// TCP to an outside resolver, other UDP and ICMP; with a name and port,
/// a protocol that names no server to a server that speaks first.
pub(crate) const PYTHON: &str = r#"
import errno, socket, struct, sys, time
server, resolver = sys.argv[1], sys.argv[2]
raw, denied = int(sys.argv[3]), int(sys.argv[4])

def timed(label, f):
    t = time.time()
    try:
        print(f"{label}=ok {f()}", end="")
    except OSError as e:
        print(f"{label}=failed {errno.errorcode.get(e.errno, e.errno)}", end="")
    print(f" {time.time() - t:.2f}s", flush=True)

def http(port):
    s = socket.create_connection((server, port), timeout=5)
    s.sendall(b"GET /raw HTTP/1.0\r\nHost: " + server.encode() + b"\r\n\r\n")
    data = s.recv(4096)
    return data.split(b"\r\n")[0].decode() if data else "closed"
timed("raw", lambda: http(raw))
timed("denied-port", lambda: http(denied))

def silent(port):
    s = socket.create_connection((server, port), timeout=5)
    data = s.recv(16)
    return repr(data) if data else "closed"
timed("denied-silent", lambda: silent(denied))

def opaque(name, port):
    s = socket.create_connection((name, port), timeout=5)
    banner = s.recv(64)
    s.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
    echo = s.recv(64)
    return f"{banner.decode().strip()} {echo.hex()}"
if len(sys.argv) > 6:
    timed("opaque-name", lambda: opaque(sys.argv[5], int(sys.argv[6])))

def exactly(s, n):
    data = b""
    while len(data) < n:
        more = s.recv(n - len(data))
        if not more:
            raise OSError(errno.ECONNRESET, "closed")
        data += more
    return data

def query(name, tcp=False):
    q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    if tcp:
        s = socket.create_connection((resolver, 53), timeout=5)
        s.sendall(struct.pack("!H", len(q)) + q)
        data = exactly(s, struct.unpack("!H", exactly(s, 2))[0])
        frm = s.getpeername()
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(q, (resolver, 53))
        data, frm = s.recvfrom(512)
    rcode = data[3] & 0xf
    answer = socket.inet_ntoa(data[-4:]) if struct.unpack("!H", data[6:8])[0] else "-"
    return f"from={frm[0]}:{frm[1]} rcode={rcode} answer={answer}"
timed("dns-outside", lambda: query("www.example.org"))
timed("dns-denied", lambda: query("denied.example.net"))
timed("dns-tcp", lambda: query("www.example.org", tcp=True))

def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", (server, 9))
    s.settimeout(2)
    return s.recv(10)
timed("udp", udp)

def icmp(kind):
    s = socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP)
    s.settimeout(2)
    s.sendto(b"\x08\x00\xf7\xff\x00\x00\x00\x00", (server, 0))
    return s.recv(64)
timed("ping-dgram", lambda: icmp(socket.SOCK_DGRAM))
timed("ping-raw", lambda: icmp(socket.SOCK_RAW))
"#;

/// The one outcome line for `label`.
pub(crate) fn outcome<'a>(out: &'a str, label: &str) -> &'a str {
    let prefix = format!("{label}=");
    out.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {label}= in:\n{out}"))
}

/// Seconds a probe took (its last word).
pub(crate) fn took(line: &str) -> f64 {
    line.rsplit(' ').next().and_then(|t| t.strip_suffix('s')).and_then(|t| t.parse().ok()).unwrap_or(f64::MAX)
}

pub(crate) fn transparent_events<'a>(log: &'a [Value], host: &str, port: u16) -> Vec<&'a Value> {
    log.iter().filter(|e| is(e, "via", "transparent") && is(e, "host", host) && is(e, "port", port)).collect()
}

/// Node's native fetch to allowed names (a tunnel over HTTPS, plain HTTP,
/// and an intercepted request with its secret substituted) and a refused
/// one; getent of an allowed and a denied name; a raw socket to an allowed
/// address and port, and a refused port reset at once; a DNS query to an
/// outside resolver answered by airlock alone; UDP and ICMP refused. Then
/// the net log holds each with its path and the name asked for.
#[test]
fn programs_that_ignore_the_proxy_get_the_policy() {
    let node = Path::new("/usr/bin/node").exists();
    if !super::egress::needs_clients() || !require(node, "node in /usr/bin (Node's native fetch)") {
        return;
    }
    let Some(net) = TestNet::new() else { return };
    let servers = start_servers(&net);
    let env = Env::new();
    let ca = env.dir.path().join("test-ca.pem");
    std::fs::write(&ca, &servers.ca_pem).unwrap();
    let policy = write_policy(&env, "transparent.toml", &policy_text(&net, &ca));
    std::fs::write(env.workspace.join("fetch.js"), NODE).unwrap();
    std::fs::write(env.workspace.join("probe.py"), PYTHON).unwrap();
    std::fs::write(env.workspace.join("test-ca.pem"), &servers.ca_pem).unwrap();
    let value = secret_value();
    let script = format!(
        "sec() {{ echo; echo \"== $1\"; }}; \
         sec getent; getent hosts {TUNNEL_HOST}; echo \"allowed=$?\"; getent hosts {DENIED_HOST}; echo \"denied=$?\"; \
         sec node; cat /run/airlock/ca-bundle.pem test-ca.pem > /tmp/ca.pem; \
         env -u NODE_USE_ENV_PROXY -u HTTP_PROXY -u http_proxy -u HTTPS_PROXY -u https_proxy -u ALL_PROXY -u all_proxy \
           NODE_EXTRA_CA_CERTS=/tmp/ca.pem node fetch.js; \
         sec python; python3 probe.py {} {} {RAW_PORT} {DENIED_PORT} {TUNNEL_HOST} {OPAQUE_PORT}; \
         sec end",
        net.server, net.resolver
    );
    let policy = policy.to_str().unwrap();
    let o = run_with_hosts(
        &env,
        &net,
        &["run", "--name", "transparent", "--timeout", "90s", "--policy", policy, "--", "sh", "-c", &script],
        &[("EXAMPLE_TOKEN", &value)],
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);

    // Names: the allowed one maps into airlock's pool, the other has none.
    let getent = section(&out, "getent");
    assert!(getent.contains("198.18.") && getent.contains(TUNNEL_HOST), "{}", show(&o));
    assert!(getent.contains("allowed=0") && getent.contains("denied=2"), "{}", show(&o));

    let node = section(&out, "node");
    assert!(outcome(node, "https-tunnel").starts_with("200 GET /tunnel HTTP/1.1"), "{}", show(&o));
    assert!(outcome(node, "http").starts_with("200 GET /plain HTTP/1.1"), "{}", show(&o));
    assert!(outcome(node, "https-secret").starts_with("200 GET /secret HTTP/1.1"), "{}", show(&o));
    assert!(outcome(node, "denied").starts_with("failed"), "{}", show(&o));
    // The secret reached its host, and only as the value (never in output).
    let secret_seen = servers.https.seen().iter().any(|r| r.contains(&format!("Bearer {value}")));
    assert!(secret_seen, "the secret's value did not reach {SECRET_HOST}: {:?}", servers.https.seen());
    assert!(!out.contains(&value), "the value reached the sandbox's output\n{}", show(&o));
    assert!(
        servers.http.seen().iter().any(|r| r.starts_with("GET /plain")
            && r.to_ascii_lowercase().contains(&format!("host: {TUNNEL_HOST}"))),
        "{:?}",
        servers.http.seen()
    );

    let python = section(&out, "python");
    assert!(outcome(python, "raw").starts_with("ok HTTP/1.1 200 OK"), "{}", show(&o));
    // A server that speaks first, on an allowed name, with a protocol
    // that names no server: its banner and its echo pass.
    assert_eq!(
        outcome(python, "opaque-name").rsplit_once(' ').unwrap().0,
        "ok db ready 0000000804d2162f",
        "{}",
        show(&o)
    );
    let denied = outcome(python, "denied-port");
    assert!(denied.starts_with("failed ECONNRESET"), "{}", show(&o));
    assert!(took(denied) < 2.0, "the refused port was not reset at once\n{}", show(&o));
    // The outside resolver's address answers with airlock's resolver.
    let dns = outcome(python, "dns-outside");
    assert!(dns.starts_with(&format!("ok from={}:53 rcode=0 answer=198.18.", net.resolver)), "{}", show(&o));
    assert!(
        outcome(python, "dns-denied").starts_with(&format!("ok from={}:53 rcode=3", net.resolver)),
        "{}",
        show(&o)
    );
    let mut buf = [0u8; 512];
    assert!(servers.dns.recv_from(&mut buf).is_err(), "a DNS query left the sandbox");
    for label in ["udp", "ping-dgram", "ping-raw"] {
        let line = outcome(python, label);
        assert!(line.starts_with("failed"), "{label} went out\n{}", show(&o));
        assert!(took(line) < 1.0, "{label} was not refused at once\n{}", show(&o));
    }
    assert!(servers.raw.seen().iter().any(|r| r.starts_with("GET /raw")), "{:?}", servers.raw.seen());

    // The net log: each transparent connection with its path and the name
    // or address the sandbox used; refusals with their reason.
    let log = net_log(&env, "transparent");
    let tunnel = transparent_events(&log, TUNNEL_HOST, 443);
    assert!(
        tunnel.iter().any(|e| is(e, "allowed", true) && is(e, "handling", "tunnel")),
        "{}",
        serde_json::to_string_pretty(&log).unwrap()
    );
    assert!(tunnel.iter().all(|e| e["destination"].as_str().is_some_and(|d| d.starts_with("198.18."))));
    let secret = event(&log, "the intercepted request", |e| {
        is(e, "via", "transparent") && is(e, "host", SECRET_HOST) && is(e, "handling", "intercepted")
    });
    assert_eq!(secret["secrets"], serde_json::json!(["EXAMPLE_TOKEN"]));
    event(&log, "plain HTTP", |e| {
        is(e, "via", "transparent")
            && is(e, "host", TUNNEL_HOST)
            && is(e, "port", 80)
            && is(e, "method", "GET")
    });
    let server_text = net.server.to_string();
    let refused = event(&log, "the refused port", |e| {
        is(e, "via", "transparent") && is(e, "host", server_text.as_str()) && is(e, "port", DENIED_PORT)
    });
    assert!(is(refused, "allowed", false), "{refused}");
    let reason = refused["rule"].as_str().unwrap();
    assert!(reason.contains(&format!("no allow entry matches {server_text}:{DENIED_PORT}")), "{reason}");
    event(&log, "the denied name's lookup", |e| {
        is(e, "via", "dns") && is(e, "host", DENIED_HOST) && is(e, "allowed", false)
    });
    event(&log, "the allowed name's mapping", |e| {
        is(e, "via", "dns") && is(e, "host", TUNNEL_HOST) && is(e, "handling", "answered")
    });

    // The text form says the path and where the sandbox connected.
    let text = env.airlock(["net", "log", "transparent"]).output().unwrap();
    let text = stdout(&text);
    assert!(
        text.contains(&format!("transparent {TUNNEL_HOST}:443")) && text.contains("(to 198.18."),
        "{text}"
    );
}

/// Without `transparent`, a program that ignores the proxy settings still
/// has no way out: nothing is redirected, a connection beyond loopback
/// has no route, and no resolver answers.
#[test]
fn without_transparent_egress_nothing_is_redirected() {
    if !super::egress::needs_clients() {
        return;
    }
    let Some(net) = TestNet::new() else { return };
    let servers = start_servers(&net);
    let env = Env::new();
    let s = net.server;
    let policy = write_policy(
        &env,
        "opaque.toml",
        &format!(
            "extends = \"dev\"\n[network]\ntransparent = false\nallow = [\"{s}:{RAW_PORT}\", \"{TUNNEL_HOST}\"]\n"
        ),
    );
    std::fs::write(env.workspace.join("probe.py"), PYTHON).unwrap();
    let script = format!(
        "getent hosts {TUNNEL_HOST}; echo \"getent=$?\"; python3 probe.py {s} {} {RAW_PORT} {DENIED_PORT}",
        net.resolver
    );
    let o = env.run_sh("opaque", &["--policy", policy.to_str().unwrap(), "--timeout", "60s"], &script);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    assert!(out.contains("getent=2"), "{}", show(&o));
    assert!(outcome(&out, "raw").starts_with("failed ENETUNREACH"), "{}", show(&o));
    assert!(outcome(&out, "dns-outside").starts_with("failed ENETUNREACH"), "{}", show(&o));
    assert_eq!(servers.raw.accepted(), 0);
    let mut buf = [0u8; 512];
    assert!(servers.dns.recv_from(&mut buf).is_err(), "a DNS query left the sandbox");
    assert!(net_log(&env, "opaque").is_empty());
}

/// The same as an ordinary user: the redirection is installed in a
/// network namespace the sandbox's user namespace owns. (Names the host
/// would resolve need the host's /etc/hosts, which the test leaves alone,
/// so the raw socket goes to the allowed address itself.)
#[test]
fn rootless_programs_that_ignore_the_proxy_get_the_policy() {
    if !super::egress::needs_clients() {
        return;
    }
    let Some(net) = TestNet::new() else { return };
    let servers = start_servers(&net);
    let Some(r) = super::rootless::setup() else { return };
    let s = net.server;
    let policy = r.env.dir.path().join("rootless-transparent.toml");
    std::fs::write(
        &policy,
        format!("extends = \"dev\"\n[network]\ntransparent = true\nallow = [\"{s}:{RAW_PORT}\", \"{TUNNEL_HOST}\"]\n"),
    )
    .unwrap();
    std::fs::write(r.env.workspace.join("probe.py"), PYTHON).unwrap();
    let script = format!(
        "getent hosts {TUNNEL_HOST}; echo \"allowed=$?\"; getent hosts {DENIED_HOST}; echo \"denied=$?\"; \
         python3 probe.py {s} {} {RAW_PORT} {DENIED_PORT}",
        net.resolver
    );
    let o = r
        .airlock(&[
            "run",
            "--name",
            "rl-transparent",
            "--timeout",
            "60s",
            "--policy",
            policy.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    assert!(
        out.contains("allowed=0") && out.contains("198.18.0.1") && out.contains("denied=2"),
        "{}",
        show(&o)
    );
    assert!(outcome(&out, "raw").starts_with("ok HTTP/1.1 200 OK"), "{}", show(&o));
    let denied = outcome(&out, "denied-port");
    assert!(denied.starts_with("failed ECONNRESET") && took(denied) < 2.0, "{}", show(&o));
    assert!(outcome(&out, "dns-outside").contains("answer=198.18."), "{}", show(&o));
    for label in ["udp", "ping-dgram", "ping-raw"] {
        assert!(outcome(&out, label).starts_with("failed"), "{label}\n{}", show(&o));
    }
    let mut buf = [0u8; 512];
    assert!(servers.dns.recv_from(&mut buf).is_err(), "a DNS query left the sandbox");
    assert!(servers.raw.seen().iter().any(|r| r.starts_with("GET /raw")), "{:?}", servers.raw.seen());
    let log = r.airlock(&["net", "log", "rl-transparent", "--json"]).output().unwrap();
    let log: Vec<Value> = serde_json::from_slice(&log.stdout).unwrap();
    let refused =
        event(&log, "the refused port", |e| is(e, "via", "transparent") && is(e, "port", DENIED_PORT));
    assert!(is(refused, "allowed", false), "{refused}");
}
