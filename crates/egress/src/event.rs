//! What the proxy tells the rest of airlock: one event per decision.

use serde::{Deserialize, Serialize};

/// How the proxy handled a connection or request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Handling {
    /// CONNECT/SOCKS bytes passed through untouched (TLS stays end to end).
    Tunnel,
    /// TLS terminated with the sandbox's CA to apply rules or inject secrets.
    Intercepted,
    /// Plain HTTP through the proxy.
    Plain,
    /// Refused before any upstream connection.
    Refused,
    /// A DNS question answered by airlock's resolver (with a mapped address).
    Answered,
}

/// One decision, for the audit log and `airlock net log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetEvent {
    /// Which path the sandbox took: "http" (the HTTP proxy port), "socks",
    /// "transparent" (a connection redirected inside the sandbox) or "dns"
    /// (a question to airlock's resolver).
    pub via: String,
    pub host: String,
    pub port: u16,
    /// The address actually connected to, when a connection was made.
    pub address: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub allowed: bool,
    /// The policy entry that decided, or why nothing allowed it.
    pub rule: String,
    pub handling: Handling,
    /// Bytes from the sandbox to upstream, and back.
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub duration_ms: u64,
    /// Names of secrets substituted into this request.
    pub secrets: Vec<String>,
    /// Transparent connections: the address and port the sandbox itself
    /// connected to (for a name, the address airlock's resolver gave it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
}

/// Where events go. Implemented by the runtime (audit log) and by tests.
pub trait EventSink: Send + Sync + 'static {
    fn record(&self, event: NetEvent);
}

impl<F: Fn(NetEvent) + Send + Sync + 'static> EventSink for F {
    fn record(&self, event: NetEvent) {
        self(event)
    }
}
