//! The sandbox's network as the supervisor sets it up: the egress proxy
//! process with this sandbox's CA, rules and secrets (`proxy_process`),
//! started at the sandbox's first connection; the channel over which the
//! agent hands it connections; and what the sandbox needs to use it
//! (environment, trust bundle, secret placeholders).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use airlock_egress::ca::{self, RootSources, SandboxCa};
use airlock_egress::secrets::{self, SecretSourceSpec};
use airlock_egress::setup::{ProxySetup, SecretSetup};
use airlock_egress::{HTTP_PROXY_PORT, RESOLVER_PORT, SOCKS_PROXY_PORT, TRANSPARENT_PORT};
use airlock_jail::plan::Redirect;
use airlock_policy::{Egress, HostMatch, HostPattern, Policy, SecretSource};
use airlock_proto::EgressPorts;

use crate::RunError;
use crate::audit::{AuditEvent, AuditLog};
use crate::proxy_process::{self, ProxyNotice, ProxyProcess};

/// Where the trust bundle appears inside the sandbox.
pub const SANDBOX_CA_BUNDLE: &str = "/run/airlock/ca-bundle.pem";
/// The host's usual bundle path, overlaid inside with the same bundle so
/// tools that ignore the environment trust the sandbox's CA too.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A running egress setup for one sandbox.
pub struct Network {
    /// The proxy, whose process starts at the sandbox's first connection;
    /// stopped once the sandbox is gone.
    proxy: Option<ProxyProcess>,
    /// The agent's end of the egress channel (placed at fd 5 in the agent).
    pub agent_end: Option<OwnedFd>,
    pub ports: EgressPorts,
    pub bundle: PathBuf,
    /// (variable, placeholder) for the sandbox's environment.
    placeholders: Vec<(String, String)>,
    /// (name, value) for redaction; the values never leave this process
    /// and the proxy's.
    redactions: Vec<(String, Vec<u8>)>,
    /// The policy allows some host loopback address explicitly.
    host_loopback_allowed: bool,
    /// Transparent egress: what the agent redirects, and where to.
    pub redirect: Option<Redirect>,
}

impl Network {
    /// Sets up the egress of `policy`, or returns None when the policy
    /// gives the sandbox no network at all. What the supervisor can check
    /// is checked here, failing the launch (the secrets, the roots, the
    /// CA); the proxy process itself starts when the sandbox first hands a
    /// connection over (`proxy_process::start_on_first_use`).
    /// `block_first_uid` is the first host uid of the sandbox's id block
    /// (as root, the proxy's own uid derives from it).
    pub fn start(
        policy: &Policy,
        name: &str,
        state_dir: &Path,
        audit_path: &Path,
        block_first_uid: u32,
        cgroup: Option<&airlock_jail::cgroup::SandboxCgroup>,
    ) -> Result<Option<Network>, RunError> {
        if policy.network.egress == Egress::None {
            return Ok(None);
        }
        let fail = |what: &str, e: &dyn std::fmt::Display| RunError::Egress(format!("{what}: {e}"));
        let ids = if rustix::process::geteuid().is_root() {
            let id = proxy_process::proxy_id(block_first_uid)?;
            Some((id, id))
        } else {
            None
        };
        let specs: Vec<(String, SecretSourceSpec, Vec<String>)> = policy
            .secrets
            .iter()
            .map(|s| {
                (s.name.clone(), source_spec(&s.from), s.hosts.iter().map(|h| h.source.clone()).collect())
            })
            .collect();
        let secrets = secrets::resolve(&specs).map_err(|e| fail("reading the policy's secrets", &e))?;
        let placeholders = secrets.iter().map(|s| (s.name.clone(), s.placeholder.clone())).collect();
        let redactions = redactions_of(&secrets);
        let roots = RootSources::read(&policy.network.extra_roots)
            .map_err(|e| fail("reading the roots for upstream TLS", &e))?;
        let sandbox_ca = SandboxCa::generate(name).map_err(|e| fail("creating the sandbox's CA", &e))?;
        let bundle_pem = ca::sandbox_trust_bundle_from(&roots, &sandbox_ca.cert_pem());
        let bundle = state_dir.join("ca-bundle.pem");
        write_public(&bundle, &bundle_pem).map_err(|e| RunError::State(bundle.clone(), e))?;
        let setup = ProxySetup {
            run_as: ids,
            policy_name: policy.name.clone(),
            network: policy.network.clone(),
            // The key leaves with the setup, which the proxy's thread holds
            // (zeroized when dropped) until the proxy starts and reads it;
            // this process keeps no other copy.
            ca: sandbox_ca.material(),
            secrets: secrets.iter().map(SecretSetup::of).collect(),
            roots,
        };
        drop(sandbox_ca);
        drop(secrets);

        let mut audit =
            AuditLog::open(audit_path)?.with_limit(policy.limits.audit_size).redacting(&redactions);
        let scrub = redactions.clone();
        let notice = move |notice: ProxyNotice| {
            let _ = audit.record(audit_event(notice, &scrub));
        };
        let (host_end, agent_end) =
            UnixStream::pair().map_err(|e| fail("creating the egress channel", &e))?;
        // The proxy's memory, CPU and threads are the sandbox's traffic:
        // they count against its limits, so that opening connections
        // cannot grow the host beyond them.
        let join = cgroup.cloned().map(|cg| -> proxy_process::JoinBudget {
            Box::new(move |pid| cg.add_pid(pid).map_err(|e| e.to_string()))
        });
        let proxy = proxy_process::start_on_first_use(name, setup, host_end.into(), join, notice)?;
        Ok(Some(Network {
            proxy: Some(proxy),
            agent_end: Some(agent_end.into()),
            ports: EgressPorts { http: HTTP_PROXY_PORT, socks: SOCKS_PROXY_PORT },
            bundle,
            placeholders,
            redactions,
            host_loopback_allowed: policy.network.allow.iter().any(names_loopback),
            redirect: redirect_of(&policy.network),
        }))
    }

    /// Variables that point tools at the proxy and the trust bundle, and
    /// the secrets' placeholders.
    pub fn environment(&self) -> Vec<(String, String)> {
        let http = format!("http://127.0.0.1:{}", self.ports.http);
        let socks = format!("socks5h://127.0.0.1:{}", self.ports.socks);
        // Loopback normally means the sandbox's own (its test servers). When
        // the policy names a host loopback service, loopback goes through
        // the proxy instead, which is the only way to reach the host's.
        let no_proxy =
            if self.host_loopback_allowed { String::new() } else { "localhost,127.0.0.1,::1".to_string() };
        let mut env = Vec::new();
        for (k, v) in
            [("HTTP_PROXY", &http), ("HTTPS_PROXY", &http), ("ALL_PROXY", &socks), ("NO_PROXY", &no_proxy)]
        {
            env.push((k.to_string(), v.clone()));
            env.push((k.to_ascii_lowercase(), v.clone()));
        }
        let tools = [
            ("NODE_USE_ENV_PROXY", "1".to_string()),
            ("npm_config_proxy", http.clone()),
            ("npm_config_https_proxy", http.clone()),
            ("PIP_PROXY", http.clone()),
            ("CARGO_HTTP_PROXY", http.clone()),
            ("GIT_CONFIG_COUNT", "1".to_string()),
            ("GIT_CONFIG_KEY_0", "http.proxy".to_string()),
            ("GIT_CONFIG_VALUE_0", http.clone()),
        ];
        env.extend(tools.into_iter().map(|(k, v)| (k.to_string(), v)));
        for var in [
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
            "CURL_CA_BUNDLE",
            "GIT_SSL_CAINFO",
            "PIP_CERT",
            "CARGO_HTTP_CAINFO",
        ] {
            env.push((var.to_string(), SANDBOX_CA_BUNDLE.to_string()));
        }
        env.extend(self.placeholders.iter().cloned());
        env
    }

    /// (name, value) of every secret, for redacting output and files.
    pub fn secret_values(&self) -> Vec<(String, Vec<u8>)> {
        self.redactions.clone()
    }

    /// Says the sandbox is being ended with everything in its cgroup, the
    /// proxy among it: that the proxy is killed is then expected, not an
    /// event, and one not started yet never starts. Call before killing
    /// the cgroup.
    pub fn ending(&self) {
        if let Some(proxy) = &self.proxy {
            proxy.expect_end();
        }
    }

    /// Kills the proxy of a sandbox whose launch failed, if it started,
    /// without waiting for it to finish by itself; returns once it is
    /// reaped (at once when it never started).
    pub fn abort(mut self) {
        drop(self.agent_end.take());
        if let Some(proxy) = self.proxy.take() {
            proxy.expect_end();
            proxy.abort();
        }
    }

    /// Stops the proxy once the sandbox is gone; its last events are
    /// recorded before this returns (at once when it never started).
    pub fn stop(mut self) {
        if let Some(proxy) = self.proxy.take() {
            proxy.stop();
        }
    }
}

/// What the supervisor records of what its proxy told it. Events are
/// redacted: a request line or host name can carry a value the sandbox got
/// echoed back.
fn audit_event(notice: ProxyNotice, secrets: &[(String, Vec<u8>)]) -> AuditEvent {
    match notice {
        ProxyNotice::Event(event) => {
            let mut event = *event;
            event.path = event.path.map(|p| redact_str(&p, secrets));
            event.host = redact_str(&event.host, secrets);
            event.rule = redact_str(&event.rule, secrets);
            AuditEvent::Network(event)
        }
        ProxyNotice::Ended { status, killed_by_us } => {
            use std::os::unix::process::ExitStatusExt;
            let how = proxy_process::describe(&status);
            let detail = if killed_by_us {
                format!("{how}: killed by the supervisor, as it did not exit once the sandbox was gone")
            } else {
                tracing::error!(
                    "the egress proxy ended ({how}); the sandbox's connections are refused from now on"
                );
                format!("{how}; the sandbox's connections are refused from now on")
            };
            AuditEvent::EgressProxyEnded { code: status.code(), signal: status.signal(), detail }
        }
        ProxyNotice::NotStarted { reason, status } => {
            use std::os::unix::process::ExitStatusExt;
            tracing::error!(
                "the egress proxy did not start for the sandbox's first connection ({reason}); the sandbox's \
                 connections are refused from now on"
            );
            AuditEvent::EgressProxyEnded {
                code: status.and_then(|s| s.code()),
                signal: status.and_then(|s| s.signal()),
                detail: format!(
                    "it did not start for the sandbox's first connection: {}; the sandbox's connections are \
                     refused from now on",
                    redact_str(&reason, secrets)
                ),
            }
        }
    }
}

/// The redirection a policy asks for: with transparent egress, TCP to the
/// transparent port and DNS to the resolver's; IPv6 only where an allow
/// entry names an IPv6 address (names are answered with IPv4 addresses).
pub fn redirect_of(network: &airlock_policy::Network) -> Option<Redirect> {
    network.redirects().then(|| Redirect {
        tcp_port: TRANSPARENT_PORT,
        dns_port: RESOLVER_PORT,
        ipv6: network.allows_ipv6(),
    })
}

/// Writes the sandbox's own `/etc/hosts` (loopback names and its
/// hostname) and `/etc/resolv.conf` (airlock's resolver) into its state
/// directory; returns their paths. The microVM tier's guest writes the
/// same text itself. Without transparent egress nothing answers on port
/// 53, so a lookup fails at once (the port is closed).
pub fn write_name_files(state_dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), RunError> {
    let hosts = state_dir.join("hosts");
    let resolv = state_dir.join("resolv.conf");
    let hosts_text = airlock_jail::names::hosts(Some(hostname));
    let resolv_text = airlock_jail::names::resolv_conf();
    write_public(&hosts, hosts_text.as_bytes()).map_err(|e| RunError::State(hosts.clone(), e))?;
    write_public(&resolv, resolv_text.as_bytes()).map_err(|e| RunError::State(resolv.clone(), e))?;
    Ok((hosts, resolv))
}

fn names_loopback(pattern: &HostPattern) -> bool {
    let v4 = std::net::IpAddr::from([127, 0, 0, 1]);
    let v6 = std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
    match &pattern.host {
        HostMatch::Ip(ip) => ip.is_loopback(),
        HostMatch::Cidr(net) => net.contains(&v4) || net.contains(&v6),
        _ => false,
    }
}

/// World-readable (the sandbox's unprivileged root reads it through a bind
/// mount), written atomically.
fn write_public(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path)
}

fn redactions_of(secrets: &[airlock_egress::secrets::ResolvedSecret]) -> Vec<(String, Vec<u8>)> {
    secrets.iter().map(|s| (s.name.clone(), s.value.expose().to_vec())).collect()
}

/// `text` with every secret value replaced by its redaction label.
pub fn redact_str(text: &str, secrets: &[(String, Vec<u8>)]) -> String {
    if secrets.is_empty() {
        return text.to_string();
    }
    String::from_utf8_lossy(&airlock_egress::redact::redact_all(text.as_bytes(), secrets)).into_owned()
}

/// Removes secret values from everything below `dir` that the sandbox
/// wrote (the writable layer, the artifacts): file contents, file and
/// directory names, symlink targets. A server that echoes a credential back
/// must not leave it in the state directory. Never follows symlinks (`dir`
/// itself being one is an error); keeps going past entries it cannot read,
/// and reports how many it changed.
pub fn scrub_tree(dir: &Path, secrets: &[(String, Vec<u8>)]) -> std::io::Result<usize> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    fn redact_bytes(data: &[u8], secrets: &[(String, Vec<u8>)]) -> Option<Vec<u8>> {
        let clean = airlock_egress::redact::redact_all(data, secrets);
        (clean != data).then_some(clean)
    }
    fn walk(dir: &Path, secrets: &[(String, Vec<u8>)], depth: usize, changed: &mut usize) {
        if depth > 512 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let mut path = entry.path();
            if let Some(name) = redact_bytes(entry.file_name().as_bytes(), secrets) {
                let renamed = dir.join(std::ffi::OsString::from_vec(name));
                if std::fs::rename(&path, &renamed).is_ok() {
                    path = renamed;
                    *changed += 1;
                }
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if meta.is_dir() {
                walk(&path, secrets, depth + 1, changed);
            } else if meta.file_type().is_symlink() {
                if let Ok(target) = std::fs::read_link(&path)
                    && let Some(clean) = redact_bytes(target.as_os_str().as_bytes(), secrets)
                    && std::fs::remove_file(&path).is_ok()
                    && std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&clean), &path).is_ok()
                {
                    *changed += 1;
                }
            } else if meta.is_file()
                && let Ok(data) = std::fs::read(&path)
                && let Some(clean) = redact_bytes(&data, secrets)
                && std::fs::write(&path, clean).is_ok()
            {
                *changed += 1;
            }
        }
    }
    if secrets.is_empty() {
        return Ok(0);
    }
    // A microVM's guest can replace its upper layer by a link (it sees the
    // directory holding it): the tree's own name is not followed either.
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is a symbolic link, not a layer", dir.display()),
        ));
    }
    let mut changed = 0;
    walk(dir, secrets, 0, &mut changed);
    Ok(changed)
}

/// Where the egress side reads a value the policy names by its source.
pub(crate) fn source_spec(source: &SecretSource) -> SecretSourceSpec {
    match source {
        SecretSource::Env(v) => SecretSourceSpec::Env(v.clone()),
        SecretSource::File(p) => SecretSourceSpec::File(p.clone()),
        SecretSource::Cmd(c) => SecretSourceSpec::Cmd(c.clone()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A layer whose own name is a link (a microVM's guest can put one in
    /// its place) is refused; a link inside it is rewritten, never entered.
    #[test]
    fn scrubbing_never_follows_a_link_not_even_the_trees_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        std::fs::create_dir(&host).unwrap();
        std::fs::write(host.join("file"), "token=s3cret\n").unwrap();
        let secrets = vec![("TOKEN".to_owned(), b"s3cret".to_vec())];
        let swapped = dir.path().join("upper");
        std::os::unix::fs::symlink(&host, &swapped).unwrap();
        assert!(scrub_tree(&swapped, &secrets).is_err());
        assert_eq!(std::fs::read_to_string(host.join("file")).unwrap(), "token=s3cret\n");

        let layer = dir.path().join("layer");
        std::fs::create_dir(&layer).unwrap();
        std::fs::write(layer.join("out"), "s3cret").unwrap();
        std::os::unix::fs::symlink(&host, layer.join("link")).unwrap();
        assert_eq!(scrub_tree(&layer, &secrets).unwrap(), 1);
        assert!(!std::fs::read_to_string(layer.join("out")).unwrap().contains("s3cret"));
        assert_eq!(std::fs::read_to_string(host.join("file")).unwrap(), "token=s3cret\n");
        // Nothing to scrub where there is nothing.
        assert_eq!(scrub_tree(&dir.path().join("missing"), &secrets).unwrap(), 0);
    }
}
