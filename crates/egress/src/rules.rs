//! The policy's `[network]` section as decisions the proxy asks for: per
//! connection (the name the client gave, then each address it resolves to)
//! and per request (method and path, where the proxy sees them).
//!
//! Everything here is a pure function of the policy. Order of checks, at
//! every level: no egress → invalid destination → `deny` (always wins) →
//! `allow` → special addresses (loopback, private, metadata, …) → per-host
//! method/path rules. Every answer names the entry as the policy wrote it,
//! so a refusal tells the user which line to change.

use std::fmt;
use std::net::IpAddr;

use airlock_policy::{Egress, HostMatch, HostPattern, HostRule, Network, Policy};
use globset::GlobSet;

use crate::addr::{AddressClass, classify};

/// The answer to one question: allowed by which entry, or refused and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `rule` names the entry that allowed it, e.g. `allow "*.example.org:443"`.
    Allow { rule: String },
    /// `reason` names the entry or the missing one, e.g. `deny "uploads.example.org"`.
    Deny { reason: String },
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    fn deny(reason: impl Into<String>) -> Decision {
        Decision::Deny { reason: reason.into() }
    }

    fn allowed_by(entry: &HostPattern) -> Decision {
        Decision::Allow { rule: format!("allow {:?}", entry.source) }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow { rule } => write!(f, "allowed by {rule}"),
            Decision::Deny { reason } => write!(f, "denied: {reason}"),
        }
    }
}

/// The network section of a policy, ready for matching.
#[derive(Debug, Clone)]
pub struct NetRules {
    egress: Egress,
    allow: Vec<HostPattern>,
    deny: Vec<HostPattern>,
    rules: Vec<CompiledRule>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    host: HostPattern,
    methods: Vec<String>,
    paths: Paths,
}

#[derive(Debug, Clone)]
enum Paths {
    Any,
    Globs {
        set: GlobSet,
        written: Vec<String>,
    },
    /// A glob that does not compile (only possible for a policy built in
    /// code; the loader checks them): the host's requests are refused.
    Invalid(String),
}

impl CompiledRule {
    fn new(rule: &HostRule) -> CompiledRule {
        let paths = match rule.compile_paths() {
            Ok(None) => Paths::Any,
            Ok(Some(set)) => Paths::Globs { set, written: rule.paths.clone() },
            Err(e) => Paths::Invalid(e),
        };
        CompiledRule { host: rule.host.clone(), methods: rule.methods.clone(), paths }
    }

    fn restricts(&self) -> bool {
        !self.methods.is_empty() || !matches!(self.paths, Paths::Any)
    }

    /// `None` when the request passes this rule, else why not.
    fn refuses(&self, method: &str, path: &str) -> Option<String> {
        let host = &self.host.source;
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method) {
            return Some(format!("rule for {host} allows methods {}", self.methods.join(", ")));
        }
        match &self.paths {
            Paths::Any => None,
            Paths::Invalid(e) => Some(format!("rule for {host} cannot be checked: {e}")),
            Paths::Globs { set, written } => match normalize_path(path) {
                Err(why) => Some(format!("rule for {host} restricts paths, and path {path:?} {why}")),
                Ok(clean) if set.is_match(&clean) => None,
                Ok(_) => Some(format!("rule for {host} allows paths {}", written.join(", "))),
            },
        }
    }
}

impl NetRules {
    pub fn from_policy(p: &Policy) -> NetRules {
        NetRules::from_network(&p.network)
    }

    /// The rules of a policy's `[network]` section alone (what the proxy
    /// process receives).
    pub fn from_network(n: &Network) -> NetRules {
        NetRules {
            egress: n.egress,
            allow: n.allow.clone(),
            deny: n.deny.clone(),
            rules: n.rules.iter().map(CompiledRule::new).collect(),
        }
    }

    /// Connection-level decision before DNS, for a CONNECT/SOCKS/plain-HTTP
    /// target as the client named it. `host` is a name or an IP literal (IPv6
    /// with or without brackets); case and a trailing dot do not matter. An
    /// IP literal also gets the address checks of [`Self::decide_address`].
    pub fn decide_target(&self, host: &str, port: u16) -> Decision {
        let name = normalize_host(host);
        if let Some(refusal) = self.precheck(&name, host, port) {
            return refusal;
        }
        if let Some(entry) = self.deny.iter().find(|d| d.matches_name(&name, port)) {
            return Decision::deny(format!("deny {:?}", entry.source));
        }
        if let Ok(ip) = name.parse::<IpAddr>() {
            return self.decide_address(&name, ip, port);
        }
        match self.allow.iter().find(|a| a.matches_name(&name, port)) {
            Some(entry) => Decision::allowed_by(entry),
            None => Decision::deny(format!("no allow entry matches {}", host_port(&name, port))),
        }
    }

    /// May airlock's resolver give the sandbox an address for `host`? Yes
    /// when an allow entry names it (on whatever port: which ports it may
    /// be reached on is decided per connection) and no deny entry without a
    /// port does. Addresses are not names, and no query for one is answered.
    pub fn decide_name(&self, host: &str) -> Decision {
        let name = normalize_host(host);
        if name.parse::<IpAddr>().is_ok() {
            return Decision::deny(format!("{name} is an address, not a name"));
        }
        // Any port passes the port checks; 53 is what was asked on.
        if let Some(refusal) = self.precheck(&name, host, 53) {
            return refusal;
        }
        if let Some(entry) = self.deny.iter().find(|d| d.port.is_none() && d.matches_name(&name, 53)) {
            return Decision::deny(format!("deny {:?}", entry.source));
        }
        let named = |a: &&HostPattern| !a.is_address() && a.matches_name(&name, a.port.unwrap_or(53));
        match self.allow.iter().find(named) {
            Some(entry) => Decision::allowed_by(entry),
            None => Decision::deny(format!("no allow entry names {name}")),
        }
    }

    /// After resolving `host`: may the proxy connect to `ip:port`?
    ///
    /// A deny entry matching the address or the name wins; the name (or the
    /// literal address) must be allowed; and loopback, private, link-local,
    /// CGNAT, metadata, unspecified, multicast, broadcast, documentation and
    /// reserved addresses, IPv4-mapped forms included, are refused unless an
    /// allow entry names that address with that port (for metadata,
    /// unspecified, multicast and broadcast: the single address, not a
    /// network containing it).
    pub fn decide_address(&self, host: &str, ip: IpAddr, port: u16) -> Decision {
        let name = normalize_host(host);
        if let Some(refusal) = self.precheck(&name, host, port) {
            return refusal;
        }
        let shown = host_port(&ip.to_canonical().to_string(), port);
        if let Some(entry) = self.deny.iter().find(|d| d.matches_ip(ip, port) || d.matches_name(&name, port))
        {
            return Decision::deny(format!("deny {:?}", entry.source));
        }
        let is_literal = name.parse::<IpAddr>().is_ok();
        let allowed_by = if is_literal {
            self.allow.iter().find(|a| a.matches_ip(ip, port))
        } else {
            self.allow.iter().find(|a| a.matches_name(&name, port))
        };
        let Some(allowed_by) = allowed_by else {
            let target = if is_literal { shown } else { host_port(&name, port) };
            return Decision::deny(format!("no allow entry matches {target}"));
        };
        let class = classify(ip);
        if class == AddressClass::Public {
            return Decision::allowed_by(allowed_by);
        }
        let explicit = self.allow.iter().find(|a| {
            a.names_address_explicitly(ip, port) && (!class.needs_exact_entry() || names_single_address(a))
        });
        if let Some(entry) = explicit {
            return Decision::allowed_by(entry);
        }
        let ip_text = ip.to_canonical().to_string();
        let what = if is_literal {
            format!("{ip_text} is {}", class.describe())
        } else {
            format!("{name} resolves to {ip_text}, {}", class.describe())
        };
        Decision::deny(format!("{what}; name it with its port in network.allow to reach it"))
    }

    /// Whether the proxy must look inside this destination's traffic because
    /// a method/path rule applies to it. (Secrets are the proxy's own
    /// concern.)
    pub fn needs_inspection(&self, host: &str, port: u16) -> bool {
        let name = normalize_host(host);
        self.rules.iter().any(|r| r.restricts() && r.host.matches_name(&name, port))
    }

    /// Request-level decision for an inspected or plain-HTTP request: the
    /// target must be allowed, and every rule whose host matches must accept
    /// the method (exact, case-sensitive) and the path. `path` is the
    /// request target's path; a query string or fragment is ignored. Where a
    /// rule restricts paths, percent-escapes are decoded before matching, and
    /// paths that servers could resolve differently from the glob (dot
    /// segments, encoded '/' or '\', backslashes, NUL, non-UTF-8) are refused.
    pub fn decide_request(&self, host: &str, port: u16, method: &str, path: &str) -> Decision {
        let rule = match self.decide_target(host, port) {
            Decision::Allow { rule } => rule,
            deny => return deny,
        };
        let name = normalize_host(host);
        let mut applied: Vec<&str> = Vec::new();
        for r in self.rules.iter().filter(|r| r.host.matches_name(&name, port)) {
            if let Some(reason) = r.refuses(method, path) {
                return Decision::deny(reason);
            }
            if !applied.contains(&r.host.source.as_str()) {
                applied.push(&r.host.source);
            }
        }
        if applied.is_empty() {
            Decision::Allow { rule }
        } else {
            Decision::Allow { rule: format!("{rule} and rule for {}", applied.join(", ")) }
        }
    }

    /// Refusals that do not depend on the entries: no egress at all, port 0,
    /// or something that is not a host name.
    fn precheck(&self, name: &str, as_given: &str, port: u16) -> Option<Decision> {
        if self.egress == Egress::None {
            return Some(Decision::deny("the policy has egress = \"none\": the sandbox has no network"));
        }
        if port == 0 {
            return Some(Decision::deny("port 0 is not a destination"));
        }
        if name.parse::<IpAddr>().is_err() && !is_host_name(name) {
            return Some(Decision::deny(format!("{as_given:?} is not a valid host name")));
        }
        None
    }
}

/// A single-address entry: an IP, or a network of one address.
fn names_single_address(entry: &HostPattern) -> bool {
    match &entry.host {
        HostMatch::Ip(_) => true,
        HostMatch::Cidr(net) => net.prefix_len() == net.max_prefix_len(),
        HostMatch::Exact(_) | HostMatch::Suffix(_) => false,
    }
}

/// Lowercase, without a trailing dot or IPv6 brackets.
pub(crate) fn normalize_host(host: &str) -> String {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// `host:port`, with IPv6 addresses in brackets.
pub(crate) fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// A DNS name as a client may send it (already normalized): labels of
/// letters, digits, '-' and '_'.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The path a rule's globs are matched against: query and fragment cut off,
/// percent-escapes decoded. Refuses what a server might map to a different
/// path than the one matched.
fn normalize_path(path: &str) -> Result<String, &'static str> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err("is not an absolute path");
    }
    let mut bytes = Vec::with_capacity(path.len());
    let mut rest = path.bytes();
    while let Some(b) = rest.next() {
        let byte = if b == b'%' {
            let hi = rest.next().and_then(|h| char::from(h).to_digit(16));
            let lo = rest.next().and_then(|l| char::from(l).to_digit(16));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err("has a malformed percent-escape");
            };
            let decoded = u8::try_from(hi * 16 + lo).map_err(|_| "has a malformed percent-escape")?;
            if decoded == b'/' || decoded == b'\\' {
                return Err("has an encoded '/' or '\\'");
            }
            decoded
        } else {
            b
        };
        if byte == b'\\' {
            return Err("has a backslash");
        }
        if byte == 0 {
            return Err("has a NUL byte");
        }
        bytes.push(byte);
    }
    let clean = String::from_utf8(bytes).map_err(|_| "is not UTF-8 once decoded")?;
    // "/a/../b", and the "..;" form some servers read as "..".
    let dot_segment = clean.split('/').any(|seg| {
        let seg = seg.split(';').next().unwrap_or(seg);
        seg == "." || seg == ".."
    });
    if dot_segment {
        return Err("has a '.' or '..' segment");
    }
    Ok(clean)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::path::Path;

    /// A policy file on top of `dev`, loaded the way the runtime loads one.
    fn rules(network: &str) -> NetRules {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, network).unwrap();
        NetRules::from_policy(&Policy::load_file(Path::new(&path)).unwrap_or_else(|e| panic!("{e}")))
    }

    const EXAMPLE: &str = r#"
[network]
egress = "proxy"
allow = ["api.example.com", "*.example.org:443", "127.0.0.1:8080", "10.1.0.0/16:5432", "[::1]:8080",
         "169.254.169.254:80", "169.254.0.0/16:8080", "93.184.215.14", "192.168.0.0/16"]
deny  = ["uploads.example.org", "10.1.9.0/24"]

[[network.rule]]
host = "api.example.com"
methods = ["GET", "HEAD"]
paths = ["/repos/**"]

[[network.rule]]
host = "*.example.org"
methods = ["GET", "POST"]

[[network.rule]]
host = "a.example.org"
paths = ["/v1/*"]
"#;

    fn allow(rule: &str) -> Decision {
        Decision::Allow { rule: rule.to_string() }
    }

    fn deny(reason: &str) -> Decision {
        Decision::Deny { reason: reason.to_string() }
    }

    #[test]
    fn names_the_resolver_answers() {
        let r = rules(EXAMPLE);
        let cases: &[(&str, Decision)] = &[
            ("api.example.com", allow("allow \"api.example.com\"")),
            ("API.Example.com.", allow("allow \"api.example.com\"")),
            // An entry with a port still names the name.
            ("a.example.org", allow("allow \"*.example.org:443\"")),
            ("example.org", deny("no allow entry names example.org")),
            ("uploads.example.org", deny("deny \"uploads.example.org\"")),
            ("elsewhere.example.net", deny("no allow entry names elsewhere.example.net")),
            ("93.184.215.14", deny("93.184.215.14 is an address, not a name")),
            ("::1", deny("::1 is an address, not a name")),
        ];
        for (name, expected) in cases {
            assert_eq!(&r.decide_name(name), expected, "{name}");
        }
        assert!(!r.decide_name("a b").is_allow());
        assert!(!r.decide_name("").is_allow());
        // A deny entry with a port refuses that port only: the name resolves.
        let ported = rules(
            "[network]\negress = \"proxy\"\nallow = [\"db.example.com\"]\ndeny = [\"db.example.com:22\"]\n",
        );
        assert!(ported.decide_name("db.example.com").is_allow());
        assert!(!ported.decide_target("db.example.com", 22).is_allow());
        let none = rules("[network]\negress = \"none\"\n");
        assert!(!none.decide_name("db.example.com").is_allow());
    }

    #[test]
    fn targets() {
        let r = rules(EXAMPLE);
        let cases: &[(&str, u16, Decision)] = &[
            ("api.example.com", 443, allow("allow \"api.example.com\"")),
            ("API.Example.com.", 80, allow("allow \"api.example.com\"")),
            ("x.api.example.com", 443, deny("no allow entry matches x.api.example.com:443")),
            ("a.example.org", 443, allow("allow \"*.example.org:443\"")),
            ("a.b.example.org", 443, allow("allow \"*.example.org:443\"")),
            ("a.example.org", 80, deny("no allow entry matches a.example.org:80")),
            ("example.org", 443, deny("no allow entry matches example.org:443")),
            ("uploads.example.org", 443, deny("deny \"uploads.example.org\"")),
            ("Uploads.Example.Org.", 443, deny("deny \"uploads.example.org\"")),
            ("api.example.net", 443, deny("no allow entry matches api.example.net:443")),
            ("127.0.0.1", 8080, allow("allow \"127.0.0.1:8080\"")),
            ("127.0.0.1", 8081, deny("no allow entry matches 127.0.0.1:8081")),
            ("::1", 8080, allow("allow \"[::1]:8080\"")),
            ("[::1]", 8080, allow("allow \"[::1]:8080\"")),
            ("10.1.2.3", 5432, allow("allow \"10.1.0.0/16:5432\"")),
            ("10.1.9.3", 5432, deny("deny \"10.1.9.0/24\"")),
            ("93.184.215.14", 443, allow("allow \"93.184.215.14\"")),
            (
                "192.168.1.1",
                22,
                deny("192.168.1.1 is a private address; name it with its port in network.allow to reach it"),
            ),
            ("169.254.169.254", 80, allow("allow \"169.254.169.254:80\"")),
            (
                "169.254.169.254",
                8080,
                deny(
                    "169.254.169.254 is a cloud metadata address; name it with its port in network.allow \
                     to reach it",
                ),
            ),
            ("169.254.1.1", 8080, allow("allow \"169.254.0.0/16:8080\"")),
            ("api.example.com", 0, deny("port 0 is not a destination")),
            ("", 443, deny("\"\" is not a valid host name")),
            ("bad host", 443, deny("\"bad host\" is not a valid host name")),
            ("*.example.org", 443, deny("\"*.example.org\" is not a valid host name")),
            ("a..example.org", 443, deny("\"a..example.org\" is not a valid host name")),
        ];
        for (host, port, expected) in cases {
            assert_eq!(&r.decide_target(host, *port), expected, "{host}:{port}");
        }
    }

    #[test]
    fn no_egress_refuses_everything() {
        let r = rules("extends = \"plugin\"\n");
        let d = r.decide_target("api.example.com", 443);
        assert_eq!(d, deny("the policy has egress = \"none\": the sandbox has no network"));
        assert!(!r.decide_address("api.example.com", "93.184.215.14".parse().unwrap(), 443).is_allow());
        assert!(!r.decide_request("api.example.com", 443, "GET", "/").is_allow());
        // Default-deny: dev has egress but no allow entry.
        let dev = NetRules::from_policy(&Policy::builtin("dev").unwrap());
        assert_eq!(
            dev.decide_target("api.example.com", 443),
            deny("no allow entry matches api.example.com:443")
        );
    }

    #[test]
    fn addresses() {
        let r = rules(EXAMPLE);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let cases: &[(&str, &str, u16, Decision)] = &[
            ("api.example.com", "93.184.215.14", 443, allow("allow \"api.example.com\"")),
            ("a.example.org", "2606:4700::1111", 443, allow("allow \"*.example.org:443\"")),
            // Permitted names that resolve to special addresses (DNS rebinding).
            (
                "api.example.com",
                "127.0.0.1",
                443,
                deny(
                    "api.example.com resolves to 127.0.0.1, a loopback address; name it with its port in \
                     network.allow to reach it",
                ),
            ),
            (
                "api.example.com",
                "::ffff:127.0.0.1",
                443,
                deny(
                    "api.example.com resolves to 127.0.0.1, a loopback address; name it with its port in \
                     network.allow to reach it",
                ),
            ),
            (
                "a.example.org",
                "10.0.0.5",
                443,
                deny(
                    "a.example.org resolves to 10.0.0.5, a private address; name it with its port in \
                     network.allow to reach it",
                ),
            ),
            (
                "a.example.org",
                "fd00:ec2::254",
                443,
                deny(
                    "a.example.org resolves to fd00:ec2::254, a cloud metadata address; name it with its \
                     port in network.allow to reach it",
                ),
            ),
            (
                "a.example.org",
                "100.64.1.1",
                443,
                deny(
                    "a.example.org resolves to 100.64.1.1, a carrier-grade NAT address; name it with its \
                     port in network.allow to reach it",
                ),
            ),
            (
                "api.example.com",
                "0.0.0.0",
                443,
                deny(
                    "api.example.com resolves to 0.0.0.0, an unspecified address; name it with its port in \
                     network.allow to reach it",
                ),
            ),
            // Named explicitly, with the port: allowed, by that entry.
            ("api.example.com", "127.0.0.1", 8080, allow("allow \"127.0.0.1:8080\"")),
            ("api.example.com", "::ffff:127.0.0.1", 8080, allow("allow \"127.0.0.1:8080\"")),
            ("api.example.com", "10.1.3.4", 5432, allow("allow \"10.1.0.0/16:5432\"")),
            ("api.example.com", "169.254.169.254", 80, allow("allow \"169.254.169.254:80\"")),
            // A network entry does not open metadata, even with the port.
            (
                "api.example.com",
                "169.254.169.254",
                8080,
                deny(
                    "api.example.com resolves to 169.254.169.254, a cloud metadata address; name it with \
                     its port in network.allow to reach it",
                ),
            ),
            // An entry without a port does not open a special address.
            (
                "192.168.4.4",
                "192.168.4.4",
                443,
                deny("192.168.4.4 is a private address; name it with its port in network.allow to reach it"),
            ),
            // Deny on the address or the name wins over everything.
            ("api.example.com", "10.1.9.9", 5432, deny("deny \"10.1.9.0/24\"")),
            ("api.example.com", "::ffff:10.1.9.9", 5432, deny("deny \"10.1.9.0/24\"")),
            ("uploads.example.org", "93.184.215.14", 443, deny("deny \"uploads.example.org\"")),
            // The name must still be allowed.
            ("api.example.net", "93.184.215.14", 443, deny("no allow entry matches api.example.net:443")),
            ("93.184.215.15", "93.184.215.15", 443, deny("no allow entry matches 93.184.215.15:443")),
        ];
        for (host, addr, port, expected) in cases {
            assert_eq!(&r.decide_address(host, ip(addr), *port), expected, "{host} -> {addr}:{port}");
        }
    }

    #[test]
    fn deny_wins_over_explicit_address_entries() {
        let r = rules("[network]\nallow = [\"127.0.0.1:8080\", \"localhost\"]\ndeny = [\"127.0.0.1\"]\n");
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(r.decide_target("127.0.0.1", 8080), deny("deny \"127.0.0.1\""));
        assert_eq!(r.decide_address("localhost", lo, 8080), deny("deny \"127.0.0.1\""));
        let r = rules("[network]\nallow = [\"*.example.org\"]\ndeny = [\"*.internal.example.org:443\"]\n");
        assert_eq!(
            r.decide_target("db.internal.example.org", 443),
            deny("deny \"*.internal.example.org:443\"")
        );
        assert!(r.decide_target("db.internal.example.org", 80).is_allow());
    }

    #[test]
    fn requests() {
        let r = rules(EXAMPLE);
        let cases: &[(&str, u16, &str, &str, Decision)] = &[
            (
                "api.example.com",
                443,
                "GET",
                "/repos/x/y",
                allow("allow \"api.example.com\" and rule for api.example.com"),
            ),
            (
                "api.example.com",
                443,
                "HEAD",
                "/repos/x?page=2",
                allow("allow \"api.example.com\" and rule for api.example.com"),
            ),
            (
                "api.example.com",
                443,
                "DELETE",
                "/repos/x",
                deny("rule for api.example.com allows methods GET, HEAD"),
            ),
            (
                "api.example.com",
                443,
                "get",
                "/repos/x",
                deny("rule for api.example.com allows methods GET, HEAD"),
            ),
            ("api.example.com", 443, "GET", "/user", deny("rule for api.example.com allows paths /repos/**")),
            (
                "api.example.com",
                443,
                "GET",
                "/repos",
                deny("rule for api.example.com allows paths /repos/**"),
            ),
            (
                "api.example.com",
                443,
                "GET",
                "/reposx/a",
                deny("rule for api.example.com allows paths /repos/**"),
            ),
            (
                "api.example.com",
                443,
                "GET",
                "/repos/../admin",
                deny(
                    "rule for api.example.com restricts paths, and path \"/repos/../admin\" has a '.' or '..' segment",
                ),
            ),
            (
                "api.example.com",
                443,
                "GET",
                "/repos/%2e%2E/admin",
                deny(
                    "rule for api.example.com restricts paths, and path \"/repos/%2e%2E/admin\" has a '.' or \
                     '..' segment",
                ),
            ),
            (
                "api.example.com",
                443,
                "GET",
                "/repos/..;/admin",
                deny(
                    "rule for api.example.com restricts paths, and path \"/repos/..;/admin\" has a '.' or '..' segment",
                ),
            ),
            (
                "api.example.com",
                443,
                "GET",
                "/repos/a%2f..%2f..%2fadmin",
                deny(
                    "rule for api.example.com restricts paths, and path \"/repos/a%2f..%2f..%2fadmin\" has an \
                     encoded '/' or '\\'",
                ),
            ),
            (
                "api.example.com",
                443,
                "GET",
                "/repos\\..\\admin",
                deny(
                    "rule for api.example.com restricts paths, and path \"/repos\\\\..\\\\admin\" has a backslash",
                ),
            ),
            (
                "api.example.com",
                443,
                "GET",
                "/repos/%zz",
                deny(
                    "rule for api.example.com restricts paths, and path \"/repos/%zz\" has a malformed percent-escape",
                ),
            ),
            (
                "api.example.com",
                443,
                "GET",
                "http://api.example.com/repos/x",
                deny(
                    "rule for api.example.com restricts paths, and path \"http://api.example.com/repos/x\" is \
                     not an absolute path",
                ),
            ),
            // Percent-escapes of ordinary characters are decoded before matching.
            (
                "api.example.com",
                443,
                "GET",
                "/%72epos/x",
                allow("allow \"api.example.com\" and rule for api.example.com"),
            ),
            // Every matching rule applies: a.example.org has both the wildcard and its own rule.
            (
                "a.example.org",
                443,
                "POST",
                "/v1/items",
                allow("allow \"*.example.org:443\" and rule for *.example.org, a.example.org"),
            ),
            (
                "a.example.org",
                443,
                "PUT",
                "/v1/items",
                deny("rule for *.example.org allows methods GET, POST"),
            ),
            ("a.example.org", 443, "GET", "/v1/items/3", deny("rule for a.example.org allows paths /v1/*")),
            (
                "b.example.org",
                443,
                "GET",
                "/anything/at/all",
                allow("allow \"*.example.org:443\" and rule for *.example.org"),
            ),
            // Hosts without rules: any method, any path (even odd ones).
            ("127.0.0.1", 8080, "DELETE", "/../x", allow("allow \"127.0.0.1:8080\"")),
            // The target decision comes first.
            ("uploads.example.org", 443, "GET", "/", deny("deny \"uploads.example.org\"")),
            ("api.example.net", 443, "GET", "/", deny("no allow entry matches api.example.net:443")),
        ];
        for (host, port, method, path, expected) in cases {
            assert_eq!(
                &r.decide_request(host, *port, method, path),
                expected,
                "{method} {host}:{port}{path}"
            );
        }
    }

    #[test]
    fn inspection_is_needed_only_where_rules_restrict() {
        let r = rules(EXAMPLE);
        assert!(r.needs_inspection("api.example.com", 443));
        assert!(r.needs_inspection("API.example.com.", 8443));
        assert!(r.needs_inspection("b.example.org", 443));
        assert!(!r.needs_inspection("example.org", 443));
        assert!(!r.needs_inspection("127.0.0.1", 8080));
        assert!(!r.needs_inspection("api.example.net", 443));
    }

    #[test]
    fn an_invalid_glob_built_in_code_fails_closed() {
        let mut p = Policy::builtin("dev").unwrap();
        p.network.allow = vec![HostPattern::parse("api.example.com").unwrap()];
        p.network.rules = vec![HostRule {
            host: HostPattern::parse("api.example.com").unwrap(),
            methods: vec![],
            paths: vec!["/{unclosed".into()],
        }];
        let r = NetRules::from_policy(&p);
        let d = r.decide_request("api.example.com", 443, "GET", "/x");
        assert!(matches!(&d, Decision::Deny { reason } if reason.contains("cannot be checked")), "{d}");
        assert!(r.needs_inspection("api.example.com", 443));
    }

    #[test]
    fn path_normalization() {
        for (path, expected) in [
            ("/", Ok("/")),
            ("/a/b", Ok("/a/b")),
            ("/a%20b", Ok("/a b")),
            ("/a?x=/../", Ok("/a")),
            ("/a#frag", Ok("/a")),
            ("/caf%C3%A9", Ok("/café")),
            ("/a/./b", Err("has a '.' or '..' segment")),
            ("/a/%2E/b", Err("has a '.' or '..' segment")),
            ("/a/..", Err("has a '.' or '..' segment")),
            ("/a/..;x=1/b", Err("has a '.' or '..' segment")),
            ("/a/...", Ok("/a/...")),
            ("/a/%5c", Err("has an encoded '/' or '\\'")),
            ("/a/%00", Err("has a NUL byte")),
            ("/a/%", Err("has a malformed percent-escape")),
            ("/a/%4", Err("has a malformed percent-escape")),
            ("/a/%ff", Err("is not UTF-8 once decoded")),
            ("*", Err("is not an absolute path")),
            ("", Err("is not an absolute path")),
        ] {
            assert_eq!(normalize_path(path).as_deref().map_err(|e| *e), expected, "{path:?}");
        }
    }

    #[test]
    fn decisions_display() {
        assert_eq!(allow("allow \"x.example.com\"").to_string(), "allowed by allow \"x.example.com\"");
        assert_eq!(deny("deny \"x.example.com\"").to_string(), "denied: deny \"x.example.com\"");
        assert_eq!(host_port("::1", 80), "[::1]:80");
        assert_eq!(normalize_host("[::1]"), "::1");
    }
}
