//! The egress proxy: the sandbox's only way out. It decides per connection
//! and per request against the policy, resolves names itself and refuses
//! private destinations, terminates TLS only where the policy needs to see
//! inside, and injects secrets at the edge so the sandbox never holds them.
//!
//! Connections reach it as file descriptors: the agent accepts them on its
//! loopback ports inside the sandbox and passes each one over a socketpair
//! with a [`HandOver`] saying which listener took it (and, for a connection
//! the sandbox's kernel redirected, where it was going). No host socket is
//! visible inside. With transparent egress the proxy also answers the
//! sandbox's DNS ([`dns`]).

pub mod addr;
pub mod ca;
mod count;
pub mod dns;
pub mod event;
mod http;
mod intercept;
pub mod proxy;
pub mod redact;
mod response;
pub mod rules;
pub mod secrets;
pub mod setup;
pub mod sni;
mod socks;
mod transparent;
mod tunnel;

pub use event::{EventSink, Handling, NetEvent};
pub use http::DENIED_HEADER;
pub use proxy::{HandOver, Port, Proxy, ProxyConfig, ProxyError, ProxyHandle};

/// The agent's listening ports on the sandbox's loopback.
pub const HTTP_PROXY_PORT: u16 = 3128;
pub const SOCKS_PROXY_PORT: u16 = 1080;
/// Transparent egress: the loopback port the sandbox's kernel redirects
/// TCP connections to, and the one (UDP and TCP) DNS queries go to.
pub const TRANSPARENT_PORT: u16 = 3129;
pub const RESOLVER_PORT: u16 = 3053;
