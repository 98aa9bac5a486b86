//! Transparent egress in the microVM tier: the guest's kernel redirects as
//! the process tier's sandbox's does, its PID 1 relays what it redirected
//! over the egress port, and the host hands each connection to the same
//! proxy with the destination the program asked for.
//!
//! One long-lived guest (boots cost seconds of emulation) serves every
//! check, against the servers of `suite::transparent`'s test network
//! (documentation addresses in a network namespace the test makes), under
//! the microVM tests' emulation policy and guest cache.

use std::path::Path;

use super::egress::{
    MICROVM_POLICY, Tier, event, is, net_log, secret_value, section, tier_ready, write_policy,
};
use super::support::*;
use super::transparent::{
    DENIED_HOST, DENIED_PORT, NODE, PYTHON, RAW_PORT, SECRET_HOST, TUNNEL_HOST, TestNet, outcome,
    policy_text, run_with_hosts, start_servers, took, transparent_events,
};

/// In one long-lived guest: airlock's own name files; `getent` of an
/// allowed and a denied name; a raw Python socket to an allowed address
/// and port, and a refused port reset at once with the reason in the net
/// log; DNS to an outside resolver (UDP and TCP) answered by airlock
/// alone; UDP other than DNS and ICMP refused; Node's native fetch over
/// HTTPS (tunnelled, and intercepted with a secret substituted) and HTTP.
#[test]
fn a_microvm_guest_gives_programs_that_ignore_the_proxy_the_policy() {
    let node = Path::new("/usr/bin/node").exists();
    if !tier_ready(Tier::Microvm) || !require(node, "node in /usr/bin (Node's native fetch)") {
        return;
    }
    let Some(net) = TestNet::new() else { return };
    let servers = start_servers(&net);
    let env = Env::new();
    let ca = env.dir.path().join("test-ca.pem");
    std::fs::write(&ca, &servers.ca_pem).unwrap();
    let policy =
        write_policy(&env, "transparent-vm.toml", &format!("{}{MICROVM_POLICY}", policy_text(&net, &ca)));
    std::fs::write(env.workspace.join("fetch.js"), NODE).unwrap();
    std::fs::write(env.workspace.join("probe.py"), PYTHON).unwrap();
    std::fs::write(env.workspace.join("test-ca.pem"), &servers.ca_pem).unwrap();
    let value = secret_value();
    let cache = super::microvm::shared_cache();
    let cache = cache.to_str().unwrap();
    // The proxy (in the supervisor's mount namespace) resolves the test's
    // names; the guest must not see that file.
    let created = run_with_hosts(
        &env,
        &net,
        &["create", "--name", "vmtr", "--mode", "ro", "--policy", policy.to_str().unwrap()],
        &[("EXAMPLE_TOKEN", &value), ("AIRLOCK_VM_CACHE", cache)],
    );
    assert_eq!(created.status.code(), Some(0), "{}", show(&created));
    let exec = |script: &str| {
        let o = env
            .airlock(["exec", "--timeout", "5m", "vmtr", "--", "sh", "-c", script])
            .env("AIRLOCK_VM_CACHE", cache)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        o
    };

    // Names: airlock's own files, the allowed name mapped into airlock's
    // pool, the denied one unknown.
    let o = exec(&format!(
        "sec() {{ echo; echo \"== $1\"; }}; sec files; cat /etc/hosts /etc/resolv.conf; \
         sec getent; getent hosts {TUNNEL_HOST}; echo \"allowed=$?\"; getent hosts {DENIED_HOST}; echo \"denied=$?\"; \
         sec end"
    ));
    let out = stdout(&o);
    let files = section(&out, "files");
    assert!(files.contains("127.0.0.1\tlocalhost") && files.contains("nameserver 127.0.0.1"), "{}", show(&o));
    assert!(
        !files.contains(SECRET_HOST) && !files.contains(&net.server.to_string()),
        "the guest sees the host's /etc/hosts\n{}",
        show(&o)
    );
    let getent = section(&out, "getent");
    assert!(getent.contains("198.18.") && getent.contains(TUNNEL_HOST), "{}", show(&o));
    assert!(getent.contains("allowed=0") && getent.contains("denied=2"), "{}", show(&o));

    // A program's own sockets.
    let o = exec(&format!("python3 probe.py {} {} {RAW_PORT} {DENIED_PORT}", net.server, net.resolver));
    let python = stdout(&o);
    assert!(outcome(&python, "raw").starts_with("ok HTTP/1.1 200 OK"), "{}", show(&o));
    for label in ["denied-port", "denied-silent"] {
        let denied = outcome(&python, label);
        assert!(denied.starts_with("failed ECONNRESET"), "{label}: not reset\n{}", show(&o));
        assert!(took(denied) < 2.0, "{label}: not reset at once\n{}", show(&o));
    }
    let resolver = format!("from={}:53 rcode=", net.resolver);
    for label in ["dns-outside", "dns-tcp"] {
        let answer = outcome(&python, label);
        assert!(answer.starts_with(&format!("ok {resolver}0 answer=198.18.")), "{label}\n{}", show(&o));
    }
    assert!(outcome(&python, "dns-denied").starts_with(&format!("ok {resolver}3")), "{}", show(&o));
    let mut buf = [0u8; 512];
    assert!(servers.dns.recv_from(&mut buf).is_err(), "a DNS query left the guest");
    for label in ["udp", "ping-dgram", "ping-raw"] {
        let line = outcome(&python, label);
        assert!(line.starts_with("failed"), "{label} went out\n{}", show(&o));
        assert!(took(line) < 1.0, "{label} was not refused at once\n{}", show(&o));
    }
    assert!(servers.raw.seen().iter().any(|r| r.starts_with("GET /raw")), "{:?}", servers.raw.seen());

    // Node's native fetch, with the proxy variables removed so that only
    // the transparent path can carry it.
    let o = exec(
        "cat /run/airlock/ca-bundle.pem test-ca.pem > /tmp/ca.pem; \
         env -u NODE_USE_ENV_PROXY -u HTTP_PROXY -u http_proxy -u HTTPS_PROXY -u https_proxy -u ALL_PROXY \
           -u all_proxy NODE_EXTRA_CA_CERTS=/tmp/ca.pem node fetch.js",
    );
    let node = stdout(&o);
    assert!(outcome(&node, "https-tunnel").starts_with("200 GET /tunnel HTTP/1.1"), "{}", show(&o));
    assert!(outcome(&node, "http").starts_with("200 GET /plain HTTP/1.1"), "{}", show(&o));
    assert!(outcome(&node, "https-secret").starts_with("200 GET /secret HTTP/1.1"), "{}", show(&o));
    assert!(outcome(&node, "denied").starts_with("failed"), "{}", show(&o));
    let secret_seen = servers.https.seen().iter().any(|r| r.contains(&format!("Bearer {value}")));
    assert!(secret_seen, "the secret's value did not reach {SECRET_HOST}: {:?}", servers.https.seen());
    assert!(!node.contains(&value), "the value reached the guest's output\n{}", show(&o));

    // The net log: the guest's transparent connections beside its lookups,
    // each with its path and the name or address it used.
    let log = net_log(&env, "vmtr");
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
    let server_text = net.server.to_string();
    let refused = event(&log, "the refused port", |e| {
        is(e, "via", "transparent") && is(e, "host", server_text.as_str()) && is(e, "port", DENIED_PORT)
    });
    assert!(is(refused, "allowed", false), "{refused}");
    let reason = refused["rule"].as_str().unwrap();
    assert!(reason.contains(&format!("no allow entry matches {server_text}:{DENIED_PORT}")), "{reason}");
    event(&log, "the raw socket", |e| {
        is(e, "via", "transparent") && is(e, "host", server_text.as_str()) && is(e, "port", RAW_PORT)
    });
    event(&log, "the denied name's lookup", |e| {
        is(e, "via", "dns") && is(e, "host", DENIED_HOST) && is(e, "allowed", false)
    });

    let stopped = env.airlock(["stop", "vmtr"]).env("AIRLOCK_VM_CACHE", cache).output().unwrap();
    assert_eq!(stopped.status.code(), Some(0), "{}", show(&stopped));
    assert_eq!(env.airlock(["rm", "vmtr"]).output().unwrap().status.code(), Some(0));
}
