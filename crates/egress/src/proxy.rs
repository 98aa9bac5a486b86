//! The proxy server: a tokio runtime of its own, fed with connections that
//! the agent accepted inside the sandbox (on its loopback HTTP and SOCKS
//! ports) and handed over as file descriptors.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_policy::HostPattern;
pub use airlock_proto::handover::HandOver;
use tokio::net::TcpStream;

use crate::ca::{RootSources, SandboxCa};
use crate::event::{EventSink, Handling, NetEvent};
use crate::rules::{Decision, NetRules};
use crate::secrets::ResolvedSecret;

/// Which of the agent's listeners a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Http,
    Socks,
    /// A connection the sandbox's kernel redirected (transparent egress).
    Transparent,
    /// airlock's resolver.
    Dns,
}

impl Port {
    /// The proxy port a one-byte hand-over tag names (the microVM tier's
    /// relay sends these).
    pub fn from_tag(tag: u8) -> Option<Port> {
        match HandOver::decode(&[tag])? {
            HandOver::Http => Some(Port::Http),
            HandOver::Socks => Some(Port::Socks),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Port::Http => "http",
            Port::Socks => "socks",
            Port::Transparent => "transparent",
            Port::Dns => "dns",
        }
    }
}

/// Everything the proxy decides with.
pub struct ProxyConfig {
    /// For messages: "policy dev refused …".
    pub policy_name: String,
    pub rules: NetRules,
    pub ca: Arc<SandboxCa>,
    /// The host's roots and the policy's extra ones, for upstream TLS.
    pub roots: RootSources,
    pub secrets: Vec<ResolvedSecret>,
    /// Transparent egress (`network.transparent`): redirected connections
    /// and DNS are served; without it such hand-overs are closed.
    pub transparent: bool,
}

/// A secret and the host patterns it may be sent to.
pub(crate) struct ScopedSecret {
    pub secret: ResolvedSecret,
    pub hosts: Vec<HostPattern>,
}

pub(crate) struct Shared {
    pub policy_name: String,
    pub rules: NetRules,
    pub ca: Arc<SandboxCa>,
    roots: RootSources,
    /// Built on first use: parsing the host's roots costs more than most
    /// sandboxes' whole network use, and many never intercept anything.
    upstream_tls: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
    pub secrets: Vec<ScopedSecret>,
    pub sink: Arc<dyn EventSink>,
    pub transparent: bool,
    /// The names airlock's resolver gave addresses for.
    pub names: std::sync::Mutex<crate::dns::NamePool>,
}

impl Shared {
    pub fn upstream_tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.upstream_tls
            .get_or_init(|| crate::ca::upstream_client_config_from(&self.roots).map_err(|e| e.to_string()))
            .clone()
    }

    /// The secrets that may be injected into requests to `host:port`.
    pub fn secrets_for(&self, host: &str, port: u16) -> Vec<&ResolvedSecret> {
        self.secrets
            .iter()
            .filter(|s| s.hosts.iter().any(|h| h.matches_name(host, port)))
            .map(|s| &s.secret)
            .collect()
    }

    /// Whether the proxy must terminate TLS for this destination.
    pub fn must_intercept(&self, host: &str, port: u16) -> bool {
        self.rules.needs_inspection(host, port) || !self.secrets_for(host, port).is_empty()
    }

    pub fn refusal_text(&self, what: &str, reason: &str) -> String {
        format!("airlock: policy {} refused {what}: {reason}", self.policy_name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot start the egress proxy's runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("secret {name} has an invalid host pattern {pattern:?}: {reason}")]
    SecretHost { name: String, pattern: String, reason: String },
}

/// The running proxy. Dropping it stops it.
pub struct Proxy {
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn start(config: ProxyConfig, sink: Arc<dyn EventSink>) -> Result<Proxy, ProxyError> {
        let mut secrets = Vec::new();
        for secret in config.secrets {
            let mut hosts = Vec::new();
            for pattern in &secret.hosts {
                let parsed = HostPattern::parse(pattern).map_err(|reason| ProxyError::SecretHost {
                    name: secret.name.clone(),
                    pattern: pattern.clone(),
                    reason,
                })?;
                hosts.push(parsed);
            }
            secrets.push(ScopedSecret { secret, hosts });
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("airlock-egress")
            .enable_all()
            .build()
            .map_err(ProxyError::Runtime)?;
        let shared = Arc::new(Shared {
            policy_name: config.policy_name,
            rules: config.rules,
            ca: config.ca,
            roots: config.roots,
            upstream_tls: std::sync::OnceLock::new(),
            secrets,
            sink,
            transparent: config.transparent,
            names: std::sync::Mutex::new(crate::dns::NamePool::new()),
        });
        Ok(Proxy { runtime: Some(runtime), shared })
    }

    /// Serves one descriptor handed over from the sandbox.
    pub fn serve(&self, fd: OwnedFd, what: HandOver) {
        if let Some(handle) = self.handle() {
            handle.serve(fd, what);
        }
    }

    /// A handle for serving from other threads.
    pub fn handle(&self) -> Option<ProxyHandle> {
        Some(ProxyHandle { runtime: self.runtime.as_ref()?.handle().clone(), shared: self.shared.clone() })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Cloneable access to a running proxy.
#[derive(Clone)]
pub struct ProxyHandle {
    runtime: tokio::runtime::Handle,
    shared: Arc<Shared>,
}

impl ProxyHandle {
    /// Serves one descriptor handed over from the sandbox: a connection
    /// (any stream socket: the process tier's TCP, the microVM tier's
    /// socket pairs) or, once, the resolver's datagram socket.
    pub fn serve(&self, fd: OwnedFd, what: HandOver) {
        let shared = self.shared.clone();
        let redirected =
            matches!(what, HandOver::Transparent { .. } | HandOver::DnsStream | HandOver::DnsDatagram);
        if redirected && !shared.transparent {
            // Only an agent planned without transparent egress, or one
            // that lies, sends these: closed unread.
            tracing::debug!("a {what:?} hand-over without transparent egress: closed");
            return;
        }
        if what == HandOver::ContainerEngine {
            // The host's way into a guest's engine, never a sandbox's
            // connection out: closed unread.
            tracing::debug!("a container engine hand-over reached the proxy: closed");
            return;
        }
        if what == HandOver::DnsDatagram {
            let socket = std::net::UdpSocket::from(fd);
            self.runtime.spawn(async move {
                if socket.set_nonblocking(true).is_err() {
                    return;
                }
                let Ok(socket) = tokio::net::UdpSocket::from_std(socket) else { return };
                crate::dns::serve_datagrams(shared, socket).await;
            });
            return;
        }
        let std_stream = std::net::TcpStream::from(fd);
        self.runtime.spawn(async move {
            if std_stream.set_nonblocking(true).is_err() {
                return;
            }
            let Ok(stream) = TcpStream::from_std(std_stream) else { return };
            match what {
                HandOver::Http => crate::http::serve(shared, stream).await,
                HandOver::Socks => crate::socks::serve(shared, stream).await,
                HandOver::Transparent { destination } => {
                    crate::transparent::serve(shared, stream, destination).await
                }
                HandOver::DnsStream => crate::dns::serve_stream(shared, stream).await,
                HandOver::DnsDatagram | HandOver::ContainerEngine => {}
            }
        });
    }
}

/// The first steps every connection shares: policy on the name, then on
/// each resolved address, then a TCP connection to the first address that
/// is allowed and answers. Connecting to the checked address itself (never
/// re-resolving) is what makes DNS rebinding useless.
pub(crate) async fn open_upstream(
    shared: &Shared,
    host: &str,
    port: u16,
) -> Result<(TcpStream, SocketAddr, String), Refusal> {
    let rule = match shared.rules.decide_target(host, port) {
        Decision::Allow { rule } => rule,
        Decision::Deny { reason } => return Err(Refusal::Policy(reason)),
    };
    let rules_host = host.to_string();
    let addrs = {
        let shared_rules = &shared.rules;
        // Name resolution blocks; the resolver is the host's.
        let result =
            tokio::task::block_in_place(|| crate::addr::resolve_allowed(shared_rules, &rules_host, port));
        match result {
            Ok(addrs) => addrs,
            Err(Decision::Deny { reason }) => return Err(Refusal::Policy(reason)),
            Err(Decision::Allow { .. }) => {
                return Err(Refusal::Unreachable(format!("{host} has no usable address")));
            }
        }
    };
    let mut last_error = format!("{host} did not resolve");
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, addr, rule));
            }
            Ok(Err(e)) => last_error = format!("{addr}: {e}"),
            Err(_) => last_error = format!("{addr}: no answer within {}s", CONNECT_TIMEOUT.as_secs()),
        }
    }
    Err(Refusal::Unreachable(last_error))
}

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection did not go through.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The policy said no (403 / SOCKS "not allowed by ruleset").
    Policy(String),
    /// Allowed, but the destination could not be reached (502 / host unreachable).
    Unreachable(String),
}

impl Refusal {
    pub fn reason(&self) -> &str {
        match self {
            Refusal::Policy(r) | Refusal::Unreachable(r) => r,
        }
    }
}

/// Builds an event with the fields every path fills the same way.
pub(crate) struct EventBuilder {
    pub via: Port,
    pub host: String,
    pub port: u16,
    pub started: Instant,
    /// Transparent connections: where the sandbox connected.
    pub destination: Option<SocketAddr>,
}

impl EventBuilder {
    pub fn new(via: Port, host: &str, port: u16) -> EventBuilder {
        EventBuilder { via, host: host.to_string(), port, started: Instant::now(), destination: None }
    }

    pub fn event(&self, allowed: bool, rule: &str, handling: Handling) -> NetEvent {
        NetEvent {
            via: self.via.name().to_string(),
            host: self.host.clone(),
            port: self.port,
            address: None,
            method: None,
            path: None,
            allowed,
            rule: rule.to_string(),
            handling,
            bytes_out: 0,
            bytes_in: 0,
            duration_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            secrets: Vec::new(),
            destination: self.destination.map(|d| d.to_string()),
        }
    }
}
