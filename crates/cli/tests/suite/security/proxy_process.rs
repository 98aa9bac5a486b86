//! Hostile bytes are parsed by a process that can do little: the egress
//! proxy runs in a process of its own, found here on the host through /proc
//! and held to what SECURITY.md promises of it — its own unprivileged ids,
//! no capabilities, no_new_privs, its seccomp filter, not dumpable, a mount
//! view with only the resolver's files, no secret in its argv or
//! environment — while the supervisor keeps no connection to the network.
//! It starts at the sandbox's first connection (or, with transparent
//! egress, its first name lookup), never before. Killing the proxy closes
//! the sandbox's way out and is recorded; so does a proxy that cannot start.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use super::super::support::*;

fn clients() -> bool {
    require(Path::new("/usr/bin/curl").exists(), "curl in /usr/bin (inside the sandbox)")
}

fn meta(env: &Env, name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(env.sandbox_dir(name).join("meta.json")).unwrap()).unwrap()
}

fn audit(env: &Env, name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(env.sandbox_dir(name).join("audit.jsonl")).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn cmdline(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The field `key` of /proc/PID/status.
fn status(pid: i32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let prefix = format!("{key}:");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().to_string()).unwrap_or_default()
}

/// The egress proxy process of sandbox `name`: `airlock __egress NAME`.
fn proxy_of(name: &str) -> Option<i32> {
    let found: Vec<i32> = pids_running("__egress")
        .into_iter()
        .filter(|pid| cmdline(*pid).get(1..3) == Some(&["__egress".to_string(), name.to_string()][..]))
        .collect();
    assert!(found.len() <= 1, "more than one proxy for {name}: {found:?}");
    found.first().copied()
}

fn parent_of(pid: i32) -> i32 {
    status(pid, "PPid").parse().unwrap()
}

/// Socket inodes among a process's descriptors.
fn socket_inodes(pid: i32) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

/// (local port, remote port, state, inode) of every TCP socket of the
/// host's network namespace, IPv4 and IPv6.
fn tcp_sockets() -> Vec<(u16, u16, String, u64)> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = |field: &str| u16::from_str_radix(field.rsplit_once(':').unwrap().1, 16).unwrap();
            out.push((port(f[1]), port(f[2]), f[3].to_string(), f[9].parse().unwrap()));
        }
    }
    out
}

/// Every inode of an internet socket (TCP or UDP, IPv4 or IPv6) on the host.
fn inet_inodes() -> Vec<u64> {
    let mut out: Vec<u64> = tcp_sockets().into_iter().map(|(_, _, _, inode)| inode).collect();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        out.extend(text.lines().skip(1).filter_map(|l| l.split_whitespace().nth(9)?.parse::<u64>().ok()));
    }
    out.retain(|inode| *inode != 0);
    out
}

/// Mount points of a process's view, relative to its own root.
fn mount_points(pid: i32) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    text.lines().filter_map(|l| l.split(' ').nth(4)).map(str::to_string).collect()
}

/// Every path in a process's view of its root (through /proc/PID/root).
fn visible_paths(pid: i32) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            out.push(format!("/{}", path.strip_prefix(root).unwrap().display()));
            if entry.file_type().unwrap().is_dir() {
                walk(&path, root, out);
            }
        }
    }
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort();
    out
}

const RESOLVER_FILES: [&str; 5] =
    ["/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf"];

/// What every proxy process must show, whoever runs airlock: no
/// capabilities, no_new_privs, a seccomp filter, not dumpable, and a root
/// holding the resolver's files alone.
fn assert_confined(pid: i32, forbidden: &[&Path]) {
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status(pid, set), "0000000000000000", "{set} of the proxy");
    }
    assert_eq!(status(pid, "NoNewPrivs"), "1");
    assert_eq!(status(pid, "Seccomp"), "2", "the proxy runs without its seccomp filter");
    // Not dumpable: the kernel hands its /proc files to root instead of
    // to the process's own uid.
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(format!("/proc/{pid}/status")).unwrap().uid();
    let uid: u32 = status(pid, "Uid").split_whitespace().next().unwrap().parse().unwrap();
    assert!(uid != 0 && owner == 0, "the proxy (uid {uid}) is dumpable: its /proc is owned by {owner}");

    let mounts = mount_points(pid);
    assert!(mounts.iter().all(|m| m == "/" || RESOLVER_FILES.contains(&m.as_str())), "mounts: {mounts:?}");
    let paths = visible_paths(pid);
    let allowed: Vec<&str> = ["/etc"].into_iter().chain(RESOLVER_FILES).collect();
    assert!(paths.iter().all(|p| allowed.contains(&p.as_str())), "the proxy sees {paths:?}");
    assert!(paths.iter().any(|p| p == "/etc/hosts"), "the proxy cannot read /etc/hosts: {paths:?}");
    for path in forbidden {
        let text = path.display().to_string();
        assert!(!mounts.iter().chain(&paths).any(|m| m.contains(&text)), "{text} is in the proxy's view");
        assert!(!Path::new(&format!("/proc/{pid}/root{text}")).exists(), "{text} is in the proxy's view");
    }
    for gone in ["/home", "/root", "/proc", "/usr", "/var", "/tmp", "/dev", "/run"] {
        assert!(!Path::new(&format!("/proc/{pid}/root{gone}")).exists(), "{gone} is in the proxy's view");
    }
}

/// An HTTP server on 127.0.0.1 that holds each request until told to
/// answer, so a connection through the proxy stays open meanwhile.
struct HeldServer {
    port: u16,
    requests: mpsc::Receiver<String>,
    release: mpsc::Sender<()>,
}

impl HeldServer {
    fn start() -> HeldServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen, requests) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let request = String::from_utf8_lossy(&head).into_owned();
                let line = request.lines().next().unwrap_or_default().to_string();
                if seen.send(line).is_err() {
                    return;
                }
                // Answers once released (or at once if nobody holds it).
                let _ = released.recv_timeout(Duration::from_secs(30));
                let body = "held-server answered\n";
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        HeldServer { port, requests, release }
    }

    /// Answers at once from now on.
    fn answer_all(&self) {
        for _ in 0..64 {
            let _ = self.release.send(());
        }
    }
}

fn create(env: &Env, name: &str, extra: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut args = vec!["create", "--name", name];
    args.extend_from_slice(extra);
    let mut cmd = env.airlock(args);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// A server that answers at once, and the `--allow` entry for it.
fn answering_server() -> (HeldServer, String) {
    let server = HeldServer::start();
    server.answer_all();
    let allow = format!("127.0.0.1:{}", server.port);
    (server, allow)
}

/// `airlock create --name NAME --allow ALLOW`, which must succeed.
fn created(env: &Env, name: &str, allow: &str) {
    let o = create(env, name, &["--allow", allow], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

/// `airlock stop NAME`, which only asks, then waits until the supervisor
/// has finished with the sandbox and exited (so the test's directory can go).
fn stop(env: &Env, name: &str) {
    let supervisor = meta(env, name)["supervisor_pid"].as_i64().unwrap();
    let o = env.airlock(["stop", name]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let gone = || {
        std::fs::read_to_string(format!("/proc/{supervisor}/status"))
            .map_or(true, |s| s.contains("State:\tZ"))
    };
    assert!(wait_until(30, gone), "{name}'s supervisor did not finish");
    assert_eq!(meta(env, name)["state"], "stopped");
}

fn exec_background(env: &Env, name: &str, script: &str) -> Child {
    env.airlock(["exec", name, "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn exec(env: &Env, name: &str, script: &str) -> Output {
    env.airlock(["exec", name, "--", "sh", "-c", script]).output().unwrap()
}

/// The sandbox's first connection, through the HTTP proxy port to `server`
/// (which answers at once, and which the sandbox's policy allows): it
/// starts the sandbox's proxy, which then stays for the sandbox's life.
fn connect_once(env: &Env, name: &str, server: &HeldServer) {
    let o = exec(env, name, &format!("curl -sS --max-time 30 http://127.0.0.1:{}/first", server.port));
    assert_eq!(stdout(&o), "held-server answered\n", "{}", show(&o));
    assert_eq!(server.requests.recv_timeout(Duration::from_secs(5)).unwrap(), "GET /first HTTP/1.1");
}

/// As root: the proxy of a long-lived sandbox runs as an id of its own
/// (neither root nor one of the sandbox's), with no group, no capability,
/// no_new_privs, seccomp, not dumpable, seeing only the resolver's files;
/// the secret it injects is in neither its argv nor its environment. The
/// supervisor, which stays root to own cgroups and mounts, has no proxy
/// thread and no network socket at all.
#[test]
fn the_proxy_runs_unprivileged_and_confined_and_the_supervisor_keeps_no_network() {
    if !require(is_root(), "root (the proxy's own ids are a root feature)") || !clients() {
        return;
    }
    let env = Env::new();
    let server = HeldServer::start();
    let secret = format!("proxy-secret-{}-Qx9", std::process::id());
    let policy = env.dir.path().join("secret.toml");
    std::fs::write(
        &policy,
        format!(
            "extends = \"dev\"\n[network]\nallow = [\"127.0.0.1:{p}\"]\n\
             [secrets.EXAMPLE_TOKEN]\nfrom = \"env:EXAMPLE_TOKEN\"\nhosts = [\"api.example.com\"]\n",
            p = server.port
        ),
    )
    .unwrap();
    let o = create(&env, "conf", &["--policy", policy.to_str().unwrap()], &[("EXAMPLE_TOKEN", &secret)]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let meta = meta(&env, "conf");
    let supervisor = meta["supervisor_pid"].as_i64().unwrap() as i32;
    let block: u64 = meta["host_uid"].as_u64().unwrap();
    assert_eq!(proxy_of("conf"), None, "a proxy runs before the sandbox's first connection");

    // A request held open by the server: the sandbox's first connection
    // starts the proxy, and its upstream connection belongs to the proxy.
    let curl = exec_background(
        &env,
        "conf",
        &format!("curl -sS -p --max-time 30 http://127.0.0.1:{}/held", server.port),
    );
    let line = server.requests.recv_timeout(Duration::from_secs(30)).expect("the request never arrived");
    assert_eq!(line, "GET /held HTTP/1.1");
    let proxy = proxy_of("conf").expect("no egress proxy process for the sandbox");
    assert_eq!(parent_of(proxy), supervisor, "the supervisor starts the proxy");

    // Its own ids: not root, not in the sandbox's block, the same in every slot.
    for key in ["Uid", "Gid"] {
        let ids: Vec<u64> = status(proxy, key).split_whitespace().map(|v| v.parse().unwrap()).collect();
        assert_eq!(ids.len(), 4);
        assert!(ids.iter().all(|id| *id == ids[0]), "{key}: {ids:?}");
        assert!(
            ids[0] != 0 && !(block..block + 65_536).contains(&ids[0]),
            "{key} {} (block {block})",
            ids[0]
        );
    }
    assert_eq!(status(proxy, "Groups"), "", "the proxy keeps supplementary groups");
    let state = env.state.canonicalize().unwrap();
    let workspace = env.workspace.canonicalize().unwrap();
    assert_confined(proxy, &[&state, &workspace]);

    // The secret lives in memory only: not in argv, not in the environment
    // (the supervisor reads it from its own, as the policy says).
    for file in ["cmdline", "environ"] {
        let bytes = std::fs::read(format!("/proc/{proxy}/{file}")).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains(&secret), "the secret is in the proxy's {file}");
    }
    let environ = std::fs::read(format!("/proc/{proxy}/environ")).unwrap();
    assert!(environ.is_empty(), "the proxy inherits an environment: {}", String::from_utf8_lossy(&environ));
    // Its descriptors: its pipes and sockets, /dev/null, nothing on disk.
    for entry in std::fs::read_dir(format!("/proc/{proxy}/fd")).unwrap().flatten() {
        let target = std::fs::read_link(entry.path()).unwrap().display().to_string();
        assert!(
            target == "/dev/null"
                || ["pipe:", "socket:", "anon_inode:"].iter().any(|p| target.starts_with(p)),
            "the proxy holds {target}"
        );
    }

    // The held request's upstream connection is the proxy's, and the
    // supervisor has no internet socket at all.
    let upstream: Vec<u64> = tcp_sockets()
        .into_iter()
        .filter(|(_, remote, state, _)| *remote == server.port && state == "01")
        .map(|(_, _, _, inode)| inode)
        .collect();
    assert_eq!(upstream.len(), 1, "one connection to the server: {upstream:?}");
    assert!(socket_inodes(proxy).contains(&upstream[0]), "the proxy does not hold the upstream connection");
    let inet = inet_inodes();
    let supervisor_inet: Vec<u64> =
        socket_inodes(supervisor).into_iter().filter(|i| inet.contains(i)).collect();
    assert!(supervisor_inet.is_empty(), "the supervisor holds internet sockets {supervisor_inet:?}");
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{supervisor}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    // The proxy's runtime threads (and the pump that fed them) are gone; the
    // supervisor keeps one thread that reads the proxy's reports.
    assert!(
        !threads.iter().any(|t| t == "airlock-egress" || t == "egress-pump"),
        "proxy threads in the supervisor: {threads:?}"
    );
    // What the supervisor keeps: root, with its capabilities, because it
    // owns the cgroups, the mounts and the state directory.
    assert_eq!(status(supervisor, "Uid").split_whitespace().next(), Some("0"));
    assert_ne!(status(supervisor, "CapEff"), "0000000000000000");
    server.answer_all();
    let out = curl.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(stdout(&out), "held-server answered\n", "{}", show(&out));
    assert!(!stdout(&out).contains(&secret));

    stop(&env, "conf");
    assert!(wait_until(10, || proxy_of("conf").is_none()), "the proxy outlived its sandbox");
}

/// The proxy process starts at the sandbox's first connection, not with
/// the sandbox: a dev sandbox whose commands connect nowhere has none at
/// any time (found in /proc, or in its cgroup), and its first connection
/// through the HTTP proxy port starts one, a child of the supervisor in
/// the sandbox's cgroup, which serves it, records it and serves the next.
#[test]
fn the_proxy_starts_at_the_first_connection_and_not_before() {
    if !clients() {
        return;
    }
    let env = Env::new();
    let (server, allow) = answering_server();
    created(&env, "lazy", &allow);
    let supervisor = meta(&env, "lazy")["supervisor_pid"].as_i64().unwrap() as i32;
    // The proxies in each of the sandbox's cgroup directories (one per
    // hierarchy).
    let in_cgroup = || -> Vec<Vec<i32>> {
        cgroup_dirs("lazy")
            .iter()
            .map(|dir| {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                procs
                    .lines()
                    .filter_map(|pid| pid.trim().parse().ok())
                    .filter(|pid| cmdline(*pid).get(1).is_some_and(|role| role == "__egress"))
                    .collect()
            })
            .collect()
    };
    for step in ["ls / >/dev/null && echo quiet", "cat /etc/hostname >/dev/null && echo quiet"] {
        let o = exec(&env, "lazy", step);
        assert_eq!(stdout(&o), "quiet\n", "{}", show(&o));
        assert_eq!(proxy_of("lazy"), None, "a proxy runs for a sandbox that made no connection");
        let proxies = in_cgroup();
        assert!(proxies.iter().all(Vec::is_empty), "a proxy is in the sandbox's cgroup: {proxies:?}");
    }
    assert!(
        !audit(&env, "lazy").iter().any(|e| e["event"] == "network" || e["event"] == "egress_proxy_ended")
    );

    connect_once(&env, "lazy", &server);
    let proxy = proxy_of("lazy").expect("the first connection started no proxy");
    assert_eq!(parent_of(proxy), supervisor, "the supervisor starts the proxy");
    if is_root() {
        let proxies = in_cgroup();
        assert!(!proxies.is_empty(), "the sandbox has no cgroup");
        assert!(
            proxies.iter().all(|p| *p == [proxy]),
            "the proxy {proxy} is not in each cgroup: {proxies:?}"
        );
    }
    let served = |path: &str| {
        audit(&env, "lazy").into_iter().any(|e| {
            e["event"] == "network" && e["via"] == "http" && e["path"] == path && e["allowed"] == true
        })
    };
    assert!(wait_until(10, || served("/first")), "the first connection is not in the audit log");
    let o = exec(&env, "lazy", &format!("curl -sS --max-time 30 http://127.0.0.1:{}/second", server.port));
    assert_eq!(stdout(&o), "held-server answered\n", "{}", show(&o));
    assert!(wait_until(10, || served("/second")), "the second connection is not in the audit log");
    assert_eq!(proxy_of("lazy"), Some(proxy), "the second connection started another proxy");
    stop(&env, "lazy");
    assert!(wait_until(10, || proxy_of("lazy").is_none()), "the proxy outlived its sandbox");
    assert!(!audit(&env, "lazy").iter().any(|e| e["event"] == "egress_proxy_ended"));
}

/// With transparent egress, the resolver's socket goes to the proxy at the
/// sandbox's first name lookup, not before: a sandbox that resolves no
/// name has no proxy, and its first lookup (a datagram) starts one, which
/// answers that very query (no resolver timeout and retry) and records it.
#[test]
fn with_transparent_egress_the_first_name_lookup_starts_the_proxy() {
    use crate::suite::transparent::DENIED_HOST;
    if !require(Path::new("/usr/bin/getent").exists(), "getent in /usr/bin (inside the sandbox)") {
        return;
    }
    let env = Env::new();
    let policy = env.dir.path().join("transparent.toml");
    std::fs::write(&policy, "extends = \"dev\"\n[network]\ntransparent = true\n").unwrap();
    let o = create(&env, "lazy-dns", &["--policy", policy.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = exec(&env, "lazy-dns", "ls / >/dev/null && echo quiet");
    assert_eq!(stdout(&o), "quiet\n", "{}", show(&o));
    assert_eq!(proxy_of("lazy-dns"), None, "a proxy runs for a sandbox that resolved no name");

    let started = std::time::Instant::now();
    let o = exec(&env, "lazy-dns", &format!("getent hosts {DENIED_HOST}; echo \"getent=$?\""));
    let took = started.elapsed();
    // Refused by the policy: not found, at once (glibc waits 5 s for an
    // answer before it asks again).
    assert_eq!(stdout(&o), "getent=2\n", "{}", show(&o));
    assert!(took < Duration::from_secs(4), "the first query was not answered: the lookup took {took:?}");
    assert!(proxy_of("lazy-dns").is_some(), "the first lookup started no proxy");
    let answered = || {
        audit(&env, "lazy-dns").into_iter().any(|e| {
            e["event"] == "network" && e["via"] == "dns" && e["host"] == DENIED_HOST && e["allowed"] == false
        })
    };
    assert!(wait_until(10, answered), "the lookup is not in the audit log: {:?}", audit(&env, "lazy-dns"));
    stop(&env, "lazy-dns");
    assert!(wait_until(10, || proxy_of("lazy-dns").is_none()), "the proxy outlived its sandbox");
}

/// Killing the proxy closes the sandbox's way out on both ports, for good,
/// and the audit log says so; the sandbox itself keeps running.
#[test]
fn a_killed_proxy_fails_the_sandboxs_egress_closed_and_is_recorded() {
    if !clients() {
        return;
    }
    let env = Env::new();
    let (server, allow) = answering_server();
    created(&env, "cut", &allow);
    let get = |via: &str| {
        format!(
            "curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}\\n' {via} http://127.0.0.1:{}/ || echo failed",
            server.port
        )
    };
    let o = exec(&env, "cut", &format!("{}; {}", get(""), get("-x socks5h://127.0.0.1:1080")));
    assert_eq!(stdout(&o), "200\n200\n", "egress must work before the kill\n{}", show(&o));
    assert_eq!(server.requests.try_iter().count(), 2);

    let proxy = proxy_of("cut").expect("no egress proxy process for the sandbox");
    assert!(Command::new("kill").args(["-KILL", &proxy.to_string()]).status().unwrap().success());
    let recorded = || audit(&env, "cut").into_iter().find(|e| e["event"] == "egress_proxy_ended");
    assert!(wait_until(10, || recorded().is_some()), "the proxy's death is not in the audit log");
    let record = recorded().unwrap();
    assert_eq!(record["signal"], 9, "{record}");
    assert!(record["detail"].as_str().unwrap().contains("refused from now on"), "{record}");

    for via in ["", "-x socks5h://127.0.0.1:1080"] {
        let o = exec(&env, "cut", &get(via));
        let answer = stdout(&o);
        assert!(!answer.contains("200"), "egress {via:?} still works after the proxy died\n{}", show(&o));
    }
    assert_eq!(server.requests.try_iter().count(), 0, "a request reached the server without a proxy");
    // The sandbox lives on; only its way out is gone.
    let o = exec(&env, "cut", "echo alive");
    assert_eq!(stdout(&o), "alive\n", "{}", show(&o));
    stop(&env, "cut");
}

/// The same from a microVM guest: its connections cross the egress port
/// to the proxy, and with the proxy gone each is refused (the hand-over
/// fails), while the guest's command runs on; the audit log says so.
#[test]
fn a_killed_proxy_fails_a_microvm_guests_egress_closed_and_is_recorded() {
    use crate::suite::egress::{MICROVM_POLICY, Tier, microvm_command, tier_ready};
    use std::io::BufRead;
    if !clients() || !tier_ready(Tier::Microvm) {
        return;
    }
    let env = Env::new();
    let server = HeldServer::start();
    server.answer_all();
    let policy = env.dir.path().join("microvm-dev.toml");
    std::fs::write(&policy, format!("extends = \"dev\"\n{MICROVM_POLICY}")).unwrap();
    let allow = format!("127.0.0.1:{}", server.port);
    let get = |via: &str| {
        format!(
            "curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}\\n' {via} http://127.0.0.1:{}/ || echo failed",
            server.port
        )
    };
    let (http, socks) = (get(""), get("-x socks5h://127.0.0.1:1080"));
    // The guest waits (long enough for the host to kill the proxy) between
    // the requests before and after.
    let script = format!("{http}; {socks}; echo ready; sleep 20; {http}; {socks}");
    let mut cmd = microvm_command(
        &env,
        "vm-cut",
        &["--policy", policy.to_str().unwrap(), "--allow", &allow],
        &[],
        &script,
    );
    let mut run = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = std::io::BufReader::new(run.stdout.take().unwrap()).lines();
    let mut before = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        before.push(line);
    }
    assert_eq!(before, ["200", "200"], "egress must work before the kill");
    assert_eq!(server.requests.try_iter().count(), 2);
    let proxy = proxy_of("vm-cut").expect("no egress proxy process for the microVM run");
    assert!(Command::new("kill").args(["-KILL", &proxy.to_string()]).status().unwrap().success());
    let recorded = || audit(&env, "vm-cut").into_iter().find(|e| e["event"] == "egress_proxy_ended");
    assert!(wait_until(10, || recorded().is_some()), "the proxy's death is not in the audit log");
    assert_eq!(recorded().unwrap()["signal"], 9);
    let after: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(0), "the guest's command ran on: {after:?}");
    assert_eq!(after.iter().filter(|a| *a == "failed").count(), 2, "both requests fail: {after:?}");
    assert!(after.iter().all(|a| !a.contains("200")), "egress still works after the proxy died: {after:?}");
    assert_eq!(server.requests.try_iter().count(), 0, "a request reached the server without a proxy");
}

/// A supervisor killed outright takes its proxy with it (its parent-death
/// signal, and the egress channel closing with the agent), so no proxy
/// outlives the sandbox it served.
#[test]
fn the_proxy_dies_with_its_supervisor() {
    if !clients() {
        return;
    }
    let env = Env::new();
    let server = HeldServer::start();
    server.answer_all();
    let allow = format!("127.0.0.1:{}", server.port);
    let o = create(&env, "orphan", &["--mode", "none", "--allow", &allow], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let supervisor = meta(&env, "orphan")["supervisor_pid"].as_i64().unwrap() as i32;
    // Started by a thread of the supervisor's (its parent-death signal
    // follows that thread), at the first connection.
    connect_once(&env, "orphan", &server);
    let proxy = proxy_of("orphan").expect("no egress proxy process for the sandbox");
    assert!(Command::new("kill").args(["-KILL", &supervisor.to_string()]).status().unwrap().success());
    let gone =
        || std::fs::read_to_string(format!("/proc/{proxy}/status")).map_or(true, |s| s.contains("State:\tZ"));
    assert!(wait_until(10, gone), "the proxy outlived its supervisor");
    let o = env.airlock(["gc"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

/// Runs `script` (sh) as root in a mount namespace of its own, with the
/// test's airlock environment.
fn in_own_mount_namespace(env: &Env, script: &str) -> Output {
    Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", script])
        .env("AIRLOCK_STATE_DIR", &env.state)
        .env("AIRLOCK_CGROUP_PARENT", cgroup_parent())
        .env("AIRLOCK_SOCKET", env.dir.path().join("no-daemon.sock"))
        .env("AIRLOCK", BIN)
        .env_remove("AIRLOCK_LOG")
        .current_dir(&env.workspace)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A proxy that cannot confine itself (here: the host's /etc/host.conf, one
/// of the resolver's files it keeps, is a symlink loop, so its view cannot
/// be built; the sandbox reads its own /etc/resolv.conf and /etc/hosts, so
/// only the proxy is broken) fails the sandbox's
/// connections closed when the first of them starts it: that connection and
/// the next fail, nothing reaches the server, the audit log says why, once,
/// and nothing of the proxy is left running. The sandbox runs on.
#[test]
fn a_proxy_that_cannot_start_fails_the_sandboxs_connections_closed_and_is_recorded() {
    if !require(is_root(), "root (a mount namespace to break /etc/host.conf in)")
        || !require(Path::new("/usr/bin/unshare").exists(), "unshare (util-linux)")
        || !clients()
    {
        return;
    }
    let env = Env::new();
    let server = HeldServer::start();
    server.answer_all();
    let allow = format!("127.0.0.1:{}", server.port);
    let real_etc = env.dir.path().join("real-etc");
    std::fs::create_dir(&real_etc).unwrap();
    // /etc as symlinks to the real one, except a looping host.conf.
    let broken_etc = format!(
        "set -e; mount --bind /etc {real}; mount -t tmpfs tmpfs /etc; \
         for f in {real}/*; do ln -s \"$f\" \"/etc/${{f##*/}}\"; done; \
         rm -f /etc/host.conf; ln -s host.conf /etc/host.conf; ",
        real = real_etc.display()
    );
    let get = format!(
        "curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}\\n' http://127.0.0.1:{}/ || echo failed",
        server.port
    );
    let script = format!("{get}; {get}; echo ran");
    for (name, command) in [
        ("broken-run", format!("\"$AIRLOCK\" run --name broken-run --allow {allow} -- sh -c \"{script}\"")),
        (
            "broken-new",
            format!(
                "\"$AIRLOCK\" create --name broken-new --allow {allow}; \
                 \"$AIRLOCK\" exec broken-new -- sh -c \"{script}\""
            ),
        ),
    ] {
        let o = in_own_mount_namespace(&env, &format!("{broken_etc}{command}"));
        assert_eq!(o.status.code(), Some(0), "{name}: {}", show(&o));
        let out = stdout(&o);
        assert!(out.ends_with("ran\n"), "{name}: the sandbox did not run on: {}", show(&o));
        assert_eq!(out.lines().filter(|l| *l == "failed").count(), 2, "{name}: {}", show(&o));
        assert!(!out.contains("200"), "{name}: a connection went through: {}", show(&o));
        let recorded: Vec<Value> =
            audit(&env, name).into_iter().filter(|e| e["event"] == "egress_proxy_ended").collect();
        assert_eq!(recorded.len(), 1, "{name}: {recorded:?}");
        let detail = recorded[0]["detail"].as_str().unwrap();
        assert!(detail.contains("did not start"), "{name}: {detail}");
        assert!(detail.contains("/etc/host.conf") && detail.contains("symbolic links"), "{name}: {detail}");
        assert!(detail.contains("refused from now on"), "{name}: {detail}");
        assert!(wait_until(10, || proxy_of(name).is_none()), "{name}: its proxy is still running");
    }
    assert_eq!(server.requests.try_iter().count(), 0, "a request reached the server without a proxy");
    assert_eq!(meta(&env, "broken-run")["state"], "exited");
    stop(&env, "broken-new");
}

/// The proxy reads no host file for its roots: airlock reads the policy's
/// extra roots when the sandbox starts, and one it cannot read stops the
/// start with its name (rather than failing each intercepted connection).
#[test]
fn an_unreadable_extra_root_stops_the_start_with_its_name() {
    let env = Env::new();
    let missing = env.dir.path().join("no-such-root.pem");
    let policy = env.dir.path().join("roots.toml");
    std::fs::write(&policy, format!("extends = \"dev\"\n[network]\nextra_roots = [{missing:?}]\n")).unwrap();
    let o = env
        .airlock(["run", "--name", "roots", "--policy", policy.to_str().unwrap(), "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(stderr(&o).contains("no-such-root.pem"), "{}", show(&o));
    assert!(proxy_of("roots").is_none());
}

/// Names resolve in the proxy's view as on the host: /etc/hosts through
/// glibc, and an answer with several addresses sorted (which asks the
/// kernel for the host's addresses over netlink) under the filter.
#[test]
fn names_resolve_in_the_proxys_view_as_on_the_host() {
    if !require(is_root(), "root (a mount namespace with its own /etc/hosts)")
        || !require(Path::new("/usr/bin/unshare").exists(), "unshare (util-linux)")
        || !clients()
    {
        return;
    }
    let env = Env::new();
    let server = HeldServer::start();
    server.answer_all();
    let p = server.port;
    let hosts = env.dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.1 two.example.org\n::1 two.example.org\n").unwrap();
    let policy = env.dir.path().join("names.toml");
    std::fs::write(
        &policy,
        format!("extends = \"dev\"\n[network]\nallow = [\"two.example.org:{p}\", \"127.0.0.1:{p}\", \"[::1]:{p}\"]\n"),
    )
    .unwrap();
    let o = in_own_mount_namespace(
        &env,
        &format!(
            "set -e; mount --bind {hosts} /etc/hosts; \"$AIRLOCK\" run --name names --policy {policy} -- \
             curl -sS --max-time 10 http://two.example.org:{p}/by-name",
            hosts = hosts.display(),
            policy = policy.display()
        ),
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o), "held-server answered\n", "{}", show(&o));
    assert_eq!(server.requests.recv_timeout(Duration::from_secs(5)).unwrap(), "GET /by-name HTTP/1.1");
    assert!(!audit(&env, "names").iter().any(|e| e["event"] == "egress_proxy_ended"), "{}", show(&o));
}

/// Rootless, the proxy is the calling user in a user namespace of its
/// own, and holds no more than as root: no capabilities, no_new_privs,
/// seccomp, not dumpable, the resolver's files alone.
#[test]
fn the_rootless_proxy_is_the_calling_user_in_its_own_namespaces_with_nothing() {
    // Reading a non-dumpable process's /proc takes root.
    if !require(is_root(), "root (to inspect the proxy's /proc)") || !clients() {
        return;
    }
    let Some(r) = super::super::rootless::setup() else { return };
    let server = HeldServer::start();
    let p = server.port;
    let allow = format!("127.0.0.1:{p}");
    let script = format!("curl -sS --max-time 30 http://127.0.0.1:{p}/rootless");
    let child = r
        .airlock(&["run", "--name", "rl-proxy", "--allow", &allow, "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = server.requests.recv_timeout(Duration::from_secs(30));
    let proxy = proxy_of("rl-proxy");
    // Checked while the request is held, so the proxy is surely running.
    let checks = std::panic::catch_unwind(|| {
        assert_eq!(line.as_deref(), Ok("GET /rootless HTTP/1.1"));
        let proxy = proxy.expect("no egress proxy process for the sandbox");
        let uid = r.uid.to_string();
        assert!(status(proxy, "Uid").split_whitespace().all(|id| id == uid), "Uid {}", status(proxy, "Uid"));
        let own = std::fs::read_link(format!("/proc/{proxy}/ns/user")).unwrap();
        let host = std::fs::read_link("/proc/self/ns/user").unwrap();
        assert_ne!(own, host, "the rootless proxy shares the host's user namespace");
        let state = r.env.state.canonicalize().unwrap();
        let workspace = r.env.workspace.canonicalize().unwrap();
        assert_confined(proxy, &[&state, &workspace]);
    });
    server.answer_all();
    let out = child.wait_with_output().unwrap();
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic);
    }
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(stdout(&out), "held-server answered\n", "{}", show(&out));
}

/// The proxy's memory, CPU and threads are the sandbox's traffic: it runs
/// in the sandbox's cgroup (every hierarchy), so opening connections cannot
/// grow the host beyond the sandbox's limits. Ending the sandbox kills it
/// with the rest, which is no news for the audit log.
#[test]
fn the_proxy_counts_against_the_sandboxs_budgets() {
    if !require(is_root(), "root (cgroup limits)") || !clients() {
        return;
    }
    let env = Env::new();
    let server = HeldServer::start();
    server.answer_all();
    let allow = format!("127.0.0.1:{}", server.port);
    let o = create(&env, "budget", &["--mode", "none", "--allow", &allow], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    connect_once(&env, "budget", &server);
    let proxy = proxy_of("budget").expect("no egress proxy process for the sandbox");
    let dirs = cgroup_dirs("budget");
    assert!(!dirs.is_empty(), "the sandbox has no cgroup");
    for dir in &dirs {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l.trim() == proxy.to_string()),
            "the proxy {proxy} is not in {}: {procs:?}",
            dir.display()
        );
    }
    stop(&env, "budget");
    assert!(
        !audit(&env, "budget").iter().any(|e| e["event"] == "egress_proxy_ended"),
        "ending the sandbox recorded its proxy's end as news: {:?}",
        audit(&env, "budget")
    );
}

/// The executable a process runs, as the kernel names it.
fn exe_of(pid: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

/// The processes a sandbox's launch waits for (its agent, its exec trace's
/// listener) run from `airlock-helper`, the small binary beside `airlock`,
/// and its proxy from `airlock`; with no helper installed beside it,
/// `airlock` serves every role itself and the sandbox works the same.
#[test]
fn the_sandboxs_own_processes_run_from_the_helper_binary_or_from_airlock_without_it() {
    if !clients() {
        return;
    }
    let helper = Path::new(BIN).with_file_name("airlock-helper");
    assert!(helper.is_file(), "cargo builds {} beside airlock", helper.display());
    let roles_of = |supervisor: i32| -> Vec<(String, PathBuf)> {
        let mut roles: Vec<(String, PathBuf)> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit(')').next()?.split_whitespace().nth(1)?.parse::<i32>().ok())
                    == Some(supervisor)
            })
            .filter_map(|pid| Some((cmdline(pid).get(1)?.clone(), exe_of(pid))))
            .collect();
        roles.sort();
        roles
    };

    let env = Env::new();
    let (server, allow) = answering_server();
    created(&env, "helped", &allow);
    connect_once(&env, "helped", &server);
    let supervisor = meta(&env, "helped")["supervisor_pid"].as_i64().unwrap() as i32;
    assert!(wait_until(10, || roles_of(supervisor).len() == 3), "{:?}", roles_of(supervisor));
    let roles = roles_of(supervisor);
    let names: Vec<&str> = roles.iter().map(|(role, _)| role.as_str()).collect();
    assert_eq!(names, ["__agent", "__egress", "__exectrace"], "{roles:?}");
    for (role, exe) in &roles {
        let expected = if role == "__egress" { Path::new(BIN) } else { helper.as_path() };
        assert_eq!(exe, expected, "{role} runs from {}", exe.display());
    }
    assert_eq!(exe_of(supervisor), Path::new(BIN));
    stop(&env, "helped");

    // airlock alone in a directory of its own (a hard link: same file).
    let alone = env.dir.path().join("alone");
    std::fs::create_dir(&alone).unwrap();
    let lone = alone.join("airlock");
    std::fs::hard_link(BIN, &lone).unwrap();
    let template = env.airlock(["create", "--name", "unhelped", "--allow", &allow]);
    let mut cmd = Command::new(&lone);
    cmd.args(template.get_args()).current_dir(&env.workspace).stdin(Stdio::null());
    for (key, value) in template.get_envs() {
        match value {
            Some(value) => cmd.env(key, value),
            None => cmd.env_remove(key),
        };
    }
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = exec(&env, "unhelped", &format!("curl -sS --max-time 30 http://127.0.0.1:{}/alone", server.port));
    assert_eq!(stdout(&o), "held-server answered\n", "{}", show(&o));
    let supervisor = meta(&env, "unhelped")["supervisor_pid"].as_i64().unwrap() as i32;
    assert!(wait_until(10, || roles_of(supervisor).len() == 3), "{:?}", roles_of(supervisor));
    for (role, exe) in roles_of(supervisor) {
        assert_eq!(exe, lone, "{role} runs from {}", exe.display());
    }
    stop(&env, "unhelped");
}
