//! A registry pull goes out through airlock's own egress proxy, not around
//! it: the proxy's code (the same `Proxy` a sandbox's connections reach)
//! runs in this process for the length of the pull, with the policy's
//! `[network]` rules, and the registry client is pointed at it as its HTTP
//! and HTTPS proxy. Every connection the pull makes (the registry, its
//! token service, a host a blob is redirected to) is decided by the same
//! rules, resolved by the proxy and checked against the private-address
//! guards before it is made.
//!
//! The proxy listens on an ephemeral loopback port while the pull runs.
//! Nothing is injected: the policy's secrets are for the sandbox's own
//! requests, and registry credentials travel inside the client's TLS.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use airlock_egress::ca::{CaError, RootSources, SandboxCa};
use airlock_egress::rules::NetRules;
use airlock_egress::{HandOver, NetEvent, Proxy, ProxyConfig, ProxyError};
use airlock_policy::Policy;

#[derive(Debug, thiserror::Error)]
pub enum PullGateError {
    #[error("the pull's egress proxy: {0}")]
    Ca(#[from] CaError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("the pull's egress proxy cannot listen on loopback: {0}")]
    Listen(#[source] std::io::Error),
}

/// The running proxy and its loopback listener; dropping it stops both.
pub struct PullGate {
    addr: SocketAddr,
    ca_pem: String,
    refusals: Arc<Mutex<Vec<NetEvent>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    // Dropped last: connections still open finish first.
    _proxy: Proxy,
}

impl PullGate {
    /// Starts the proxy with `policy`'s network rules; upstream TLS (only
    /// where the rules make the proxy look inside) trusts the host's roots
    /// and `extra_roots`.
    pub fn start(policy: &Policy, extra_roots: &[PathBuf]) -> Result<PullGate, PullGateError> {
        let ca = SandboxCa::generate("image-pull")?;
        let ca_pem = ca.cert_pem();
        let config = ProxyConfig {
            policy_name: policy.name.clone(),
            rules: NetRules::from_policy(policy),
            ca: Arc::new(ca),
            roots: RootSources::read(extra_roots)?,
            secrets: Vec::new(),
            transparent: false,
        };
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let seen = refusals.clone();
        let sink = move |event: NetEvent| {
            tracing::debug!(host = %event.host, port = event.port, allowed = event.allowed, rule = %event.rule, "image pull connection");
            if !event.allowed
                && let Ok(mut seen) = seen.lock()
            {
                seen.push(event);
            }
        };
        let proxy = Proxy::start(config, Arc::new(sink))?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(PullGateError::Listen)?;
        let addr = listener.local_addr().map_err(PullGateError::Listen)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = match proxy.handle() {
            Some(handle) => {
                let stop = stop.clone();
                Some(std::thread::spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        if let Ok(stream) = stream {
                            handle.serve(OwnedFd::from(stream), HandOver::Http);
                        }
                    }
                }))
            }
            None => None,
        };
        Ok(PullGate { addr, ca_pem, refusals, stop, thread, _proxy: proxy })
    }

    /// The proxy's URL for the registry client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The proxy's own CA (PEM): the client must trust it for a registry
    /// the rules make the proxy look inside (method/path rules). Its key
    /// exists only in this process, for this pull.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The first connection the rules refused, as "HOST:PORT: REASON".
    pub fn refusal(&self) -> Option<String> {
        let seen = self.refusals.lock().ok()?;
        seen.first().map(|e| format!("{}:{}: {}", e.host, e.port, e.rule))
    }
}

impl Drop for PullGate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
