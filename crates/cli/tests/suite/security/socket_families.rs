//! Socket families are an allowlist. A family the network namespace does not
//! confine (AF_VSOCK reaches the hypervisor and other VMs on a VM host) would
//! be a way past the egress proxy; most others are kernel code a loopback-only
//! sandbox never needs. Inside, only Unix, IPv4, IPv6 and route netlink exist.

use crate::suite::support::*;

/// For every family number up to 63 and the usual socket types, prints
/// `family errno` for the first type whose socket() did not fail with
/// EAFNOSUPPORT ("0" for success), or `family EAFNOSUPPORT`; then the same
/// for socketpair(). Run on the host and inside the sandbox.
const PROBE: &str = r#"
import errno, socket
def probe(make):
    seen = None
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET, socket.SOCK_RAW):
        try:
            make(kind)
            return "0"
        except OSError as e:
            if e.errno != errno.EAFNOSUPPORT:
                seen = seen or errno.errorcode.get(e.errno, str(e.errno))
    return seen or "EAFNOSUPPORT"
for family in range(64):
    print("socket", family, probe(lambda kind: socket.socket(family, kind, 0).close()))
    print("socketpair", family, probe(lambda kind: [s.close() for s in socket.socketpair(family, kind, 0)]))
"#;

fn parse(out: &str) -> Vec<(String, u32, String)> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((f.next()?.to_string(), f.next()?.parse().ok()?, f.next()?.to_string()))
        })
        .collect()
}

// Linux's family numbers (stable ABI).
const AF_UNIX: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const AF_NETLINK: u32 = 16;
const AF_VSOCK: u32 = 40;
const ALLOWED: [u32; 4] = [AF_UNIX, AF_INET, AF_INET6, AF_NETLINK];

#[test]
fn only_the_socket_families_a_sandbox_needs_exist_inside() {
    if !require(std::path::Path::new("/usr/bin/python3").exists(), "python3 on the host") {
        return;
    }
    // Which families this kernel has (probing may load a family's module, as
    // any process's socket() call can).
    let host = std::process::Command::new("python3").args(["-c", PROBE]).output().unwrap();
    assert!(host.status.success(), "{}", show(&host));
    let host = parse(&stdout(&host));
    assert_eq!(host.len(), 128, "host probe: {host:?}");

    let env = Env::new();
    let o = env.airlock(["run", "--name", "families", "--", "python3", "-c", PROBE]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let inside = parse(&stdout(&o));
    assert_eq!(inside.len(), 128, "{}", show(&o));

    let mut refused = Vec::new();
    for ((call, family, on_host), (_, _, in_sandbox)) in host.iter().zip(&inside) {
        let allowed = ALLOWED.contains(family) && (call == "socket" || *family == AF_UNIX);
        if allowed {
            assert_eq!(in_sandbox, "0", "{call}({family}) must work inside");
            continue;
        }
        // Refused as if the kernel lacked it, whatever the kernel has.
        assert_eq!(in_sandbox, "EAFNOSUPPORT", "{call}({family}) inside (host: {on_host})");
        if on_host != "EAFNOSUPPORT" {
            refused.push(format!("{call}({family})"));
        }
    }
    // The family the issue found open: present in every kernel this suite
    // runs on (vsock is built into Debian's), refused inside.
    let vsock = format!("socket({AF_VSOCK})");
    assert!(refused.contains(&vsock), "AF_VSOCK is not in this kernel? refused: {refused:?}");
    eprintln!("families this kernel has that the sandbox is refused: {}", refused.join(" "));
}
