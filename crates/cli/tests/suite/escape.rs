//! Attempts to get out: every test runs real untrusted-style code in a real
//! sandbox and checks the host side.

use super::support::*;

fn sandboxed(env: &Env, name: &str, script: &str) -> std::process::Output {
    env.run_sh(name, &["--rm"], script)
}

/// Looks up example.com with Python and prints `resolve:` and `resolved`
/// or the name of the lookup's error.
const RESOLVE_PROBE: &str = r#"python3 -c 'import socket
try:
    socket.getaddrinfo("example.com", 443)
    print("resolve:resolved")
except socket.gaierror as e:
    names = {v: k for k, v in vars(socket).items() if k.startswith("EAI_")}
    print("resolve:" + names.get(e.errno, str(e)))'"#;

/// Calls unshare(CLONE_NEWUSER) and mount(tmpfs on /mnt) directly, with
/// Python, and prints each call's outcome: `ok` or the errno's name.
const PRIVILEGE_PROBE: &str = r#"python3 -c 'import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER = 0x10000000
calls = [("unshare", lambda: libc.unshare(CLONE_NEWUSER)),
         ("mount", lambda: libc.mount(b"x", b"/mnt", b"tmpfs", 0, None))]
for name, call in calls:
    ok = call() == 0
    print(name + ":" + ("ok" if ok else errno.errorcode[ctypes.get_errno()]))'"#;

#[test]
fn cannot_write_outside_the_workspace() {
    let env = Env::new();
    let outside = env.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let script = format!(
        "for p in /etc/airlock-evil /usr/airlock-evil /airlock-evil {o}/evil; do \
           (echo pwned > $p) 2>/dev/null && echo WROTE $p; done; \
         mkdir -p {o} 2>/dev/null && (echo pwned > {o}/evil) 2>/dev/null; true",
        o = outside.display()
    );
    let o = sandboxed(&env, "write-out", &script);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!stdout(&o).contains("WROTE /etc") && !stdout(&o).contains("WROTE /usr"), "{}", show(&o));
    for p in ["/etc/airlock-evil", "/usr/airlock-evil", "/airlock-evil"] {
        assert!(!std::path::Path::new(p).exists(), "{p} was created on the host");
    }
    assert!(!outside.join("evil").exists(), "wrote to a host directory outside the workspace");
}

#[test]
fn workspace_writes_wait_for_review() {
    let env = Env::new();
    let o = env.run_sh("review", &[], "echo patched >> src/lib.c; rm README; echo new > added.txt");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(std::fs::read_to_string(env.workspace.join("src/lib.c")).unwrap(), "int x;\n");
    assert!(env.workspace.join("README").exists());
    assert!(!env.workspace.join("added.txt").exists());
    assert!(stderr(&o).contains("airlock diff review"), "{}", show(&o));
}

#[test]
fn host_secrets_and_sockets_are_hidden() {
    let env = Env::new();
    let script = format!(
        "echo shadow:$(cat /etc/shadow 2>/dev/null | wc -c); \
         echo root:$(ls -A /root | wc -l); echo home:$(ls -A /home | wc -l); \
         echo run:$(ls -A /run | grep -v '^airlock$' | wc -l); \
         echo sockets:$(find /run /tmp /var /etc /home /root /dev /opt -type s 2>/dev/null | wc -l); \
         for s in /run/docker.sock /var/run/docker.sock /run/dbus/system_bus_socket; do [ -e $s ] && echo FOUND $s; done; \
         echo ssh:${{SSH_AUTH_SOCK:-none}}; echo kcore:$(head -c 16 /proc/kcore 2>/dev/null | wc -c); \
         echo state:$(ls -A {} 2>/dev/null | wc -l)",
        env.state.display()
    );
    let o = sandboxed(&env, "secrets", &script);
    let out = stdout(&o);
    for expected in ["shadow:0", "root:0", "home:0", "run:0", "sockets:0", "ssh:none", "kcore:0", "state:0"] {
        assert!(out.contains(expected), "expected {expected}\n{}", show(&o));
    }
    assert!(!out.contains("FOUND"), "{}", show(&o));
}

#[test]
fn host_network_is_unreachable() {
    let env = Env::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let o = sandboxed(
        &env,
        "network",
        &format!(
            "{connect}; {resolve}; \
             echo ifaces:$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ,)",
            connect = connect_probe(port),
            resolve = RESOLVE_PROBE,
        ),
    );
    assert!(listener.accept().is_err(), "the sandbox reached a host listener");
    // Refused: the sandbox's own loopback, where nothing listens.
    assert!(stdout(&o).contains("connect:ECONNREFUSED\n"), "{}", show(&o));
    // The only name server is airlock's, which knows no name the policy
    // does not allow (dev allows none): no such name, not an address.
    assert!(stdout(&o).contains("resolve:EAI_NONAME\n"), "{}", show(&o));
    assert!(stdout(&o).contains("ifaces:lo,"), "{}", show(&o));
}

#[test]
fn host_processes_are_invisible_and_pid1_is_the_agent() {
    let env = Env::new();
    let me = std::process::id();
    let o = sandboxed(
        &env,
        "pids",
        &format!(
            "echo count:$(ls -d /proc/[0-9]* | wc -l); [ -e /proc/{me} ] && echo SEE-HOST; \
             echo init:$(tr '\\0' ' ' < /proc/1/cmdline); \
             cat /proc/1/environ >/dev/null 2>&1 && echo READ-AGENT-ENV; \
             echo procmount:$(awk '$5 == \"/proc\" {{print $6}}' /proc/self/mountinfo); true"
        ),
    );
    let out = stdout(&o);
    // Read-only as mounted, not only through Landlock: what a process could
    // write there (its OOM score, say) stays as the agent set it.
    let proc_opts = out.lines().find_map(|l| l.strip_prefix("procmount:")).unwrap_or_default();
    assert!(proc_opts.split(',').any(|o| o == "ro"), "{}", show(&o));
    let count: usize = out.lines().find_map(|l| l.strip_prefix("count:")).unwrap().trim().parse().unwrap();
    assert!(count < 10, "{}", show(&o));
    assert!(out.contains("init:airlock-agent"), "{}", show(&o));
    assert!(!out.contains("READ-AGENT-ENV"), "{}", show(&o));
    if me > 10 {
        assert!(!out.contains("SEE-HOST"), "{}", show(&o));
    }
}

#[test]
fn no_privileges_inside() {
    let env = Env::new();
    let o = sandboxed(
        &env,
        "privs",
        &format!(
            "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; {PRIVILEGE_PROBE}; \
             echo uidmap:$(cat /proc/self/uid_map); echo host:$(hostname); true"
        ),
    );
    let out = stdout(&o);
    assert!(out.contains("CapEff:\t0000000000000000"), "{}", show(&o));
    assert!(out.contains("CapBnd:\t0000000000000000"), "{}", show(&o));
    assert!(out.contains("NoNewPrivs:\t1"), "{}", show(&o));
    assert!(out.contains("Seccomp:\t2"), "{}", show(&o));
    // Both refused as not permitted, not failed for want of a tool or a
    // path.
    assert!(out.contains("unshare:EPERM\n") && out.contains("mount:EPERM\n"), "{}", show(&o));
    assert!(out.contains("host:privs"), "{}", show(&o));
    // Root inside is never root outside.
    let map = out.lines().find_map(|l| l.strip_prefix("uidmap:")).unwrap();
    let fields: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(fields[0], "0");
    assert_ne!(fields[1], "0", "root inside maps to host root: {map}");
}
