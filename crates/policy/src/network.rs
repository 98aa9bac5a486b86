//! The network and secrets model: which destinations the egress proxy may
//! connect a sandbox to, which requests it may pass, and which credentials it
//! injects on the way out.
//!
//! Host patterns are parsed once, here, and matched by the egress proxy with
//! the query methods below, so the policy file and the proxy cannot disagree
//! on what an entry means.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::Egress;
use crate::parse::{check_host_path, check_portable_env_name};

/// Network access of a sandbox. The sandbox itself has only loopback; with
/// `egress = "proxy"` its one way out is airlock's egress proxy, which lets a
/// connection through only when an `allow` entry matches, no `deny` entry
/// does, and every `rules` entry for the host accepts the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub egress: Egress,
    /// Transparent egress: with `egress = "proxy"`, every TCP connection the
    /// sandbox opens (and every DNS query it sends) is redirected to airlock
    /// inside its network namespace and decided as a proxy connection to
    /// the same destination, so programs that ignore the proxy settings get
    /// the policy rather than no network. Off: only the proxy ports lead out.
    #[serde(default)]
    pub transparent: bool,
    /// Whether a long-lived sandbox may publish ports (`airlock create -p`):
    /// a listener on the host whose connections the supervisor relays to a
    /// port inside. Inbound only: the sandbox gains no route out.
    #[serde(default)]
    pub ports: bool,
    /// Destinations the proxy may connect to (replaced by a refining layer).
    #[serde(default)]
    pub allow: Vec<HostPattern>,
    /// Destinations always refused, whatever `allow` says (unioned across layers).
    #[serde(default)]
    pub deny: Vec<HostPattern>,
    /// Whether `airlock run --allow HOST[:PORT]` may add `allow` entries.
    #[serde(default)]
    pub allow_flag: bool,
    /// PEM files with additional CA roots the proxy trusts for upstream TLS.
    #[serde(default)]
    pub extra_roots: Vec<PathBuf>,
    /// Method and path restrictions per host (unioned across layers; a
    /// request must satisfy every rule whose host matches).
    #[serde(default)]
    pub rules: Vec<HostRule>,
}

impl Network {
    /// Whether the sandbox has any way out at all.
    pub fn has_egress(&self) -> bool {
        self.egress == Egress::Proxy
    }

    /// Whether the sandbox's connections are redirected to the proxy
    /// (`transparent`, which means nothing without egress).
    pub fn redirects(&self) -> bool {
        self.has_egress() && self.transparent
    }

    /// Whether an allow entry names an IPv6 address or network: only then
    /// does a transparent sandbox get an IPv6 route out.
    pub fn allows_ipv6(&self) -> bool {
        self.allow.iter().any(|a| match &a.host {
            HostMatch::Ip(ip) => ip.is_ipv6() && ip.to_canonical().is_ipv6(),
            HostMatch::Cidr(net) => matches!(net, IpNet::V6(_)),
            HostMatch::Exact(_) | HostMatch::Suffix(_) => false,
        })
    }
}

/// One `allow`/`deny` entry (or a rule's or secret's host): a host or address
/// pattern with an optional port.
///
/// Two patterns are equal when they match the same destinations, whatever
/// their spelling (`Example.com` and `example.com.` are equal); `source`
/// keeps the spelling for messages. Serialized as the source string.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPattern {
    pub host: HostMatch,
    /// `None` matches every port.
    pub port: Option<u16>,
    /// The entry as written in the policy, for messages and logs.
    pub source: String,
}

/// What a [`HostPattern`] matches, before the port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    /// One DNS name, lowercase, without a trailing dot.
    Exact(String),
    /// Every name strictly below this suffix (`*.example.org` is stored as
    /// `example.org` and matches `a.example.org`, not `example.org`).
    Suffix(String),
    /// One IP address.
    Ip(IpAddr),
    /// An IP network; host bits are always zero.
    Cidr(IpNet),
}

/// Finer restrictions for the requests to one host pattern. A rule does not
/// allow anything by itself: the host must also be allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRule {
    /// The host the rule is for; never has a port.
    pub host: HostPattern,
    /// Uppercase HTTP methods; empty means any method.
    pub methods: Vec<String>,
    /// Globs on the URL path ('*' within a segment, '**' across); empty means any path.
    pub paths: Vec<String>,
}

/// A credential that never enters the sandbox: inside, the variable `name`
/// holds a placeholder, and the proxy swaps in the real value on requests to
/// `hosts` only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    /// The environment variable name inside the sandbox.
    pub name: String,
    pub from: SecretSource,
    /// Hosts whose requests get the real value; never empty.
    pub hosts: Vec<HostPattern>,
}

/// Where the host side reads a secret's value from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SecretSource {
    /// `env:NAME`: a variable of the airlock process's environment.
    Env(String),
    /// `file:/abs/path`: a file's contents, trailing newline trimmed.
    File(PathBuf),
    /// `cmd:COMMAND`: a command run by the host side, its stdout trimmed.
    Cmd(String),
}

impl HostPattern {
    /// Parses an entry: `name`, `*.suffix`, IPv4, IPv6, CIDR, each with an
    /// optional `:port` (`[IPv6]:port`, `[IPv6/len]:port` for IPv6).
    ///
    /// The error reads well after a `key: ` prefix.
    pub fn parse(s: &str) -> Result<HostPattern, String> {
        let (host, port, bracketed) = split_port(s)?;
        let host = parse_host(host, bracketed, s)?;
        Ok(HostPattern { host, port, source: s.to_string() })
    }

    /// Whether this entry matches a destination named `host` (a DNS name or
    /// an IP literal, any case, trailing dot ignored, IPv6 with or without
    /// brackets) on `port`. Name entries match names and address entries
    /// match IP literals; a name is never matched against an address entry.
    pub fn matches_name(&self, host: &str, port: u16) -> bool {
        if !self.port_matches(port) {
            return false;
        }
        let host = normalize_host(host);
        match &self.host {
            HostMatch::Exact(name) => host == *name,
            HostMatch::Suffix(suffix) => {
                host.strip_suffix(suffix.as_str()).is_some_and(|head| head.len() > 1 && head.ends_with('.'))
            }
            HostMatch::Ip(_) | HostMatch::Cidr(_) => {
                parse_ip_literal(&host).is_some_and(|ip| self.covers_ip(ip))
            }
        }
    }

    /// Whether this entry matches the address `ip` on `port`. Only `Ip` and
    /// `Cidr` entries match addresses. IPv4-mapped IPv6 addresses match the
    /// IPv4 entries for the same address.
    pub fn matches_ip(&self, ip: IpAddr, port: u16) -> bool {
        self.port_matches(port) && self.covers_ip(ip)
    }

    /// Whether this is an `Ip` or `Cidr` entry **with a port** that covers
    /// `ip:port`: the only kind of entry that opens a private, loopback or
    /// otherwise special address.
    pub fn names_address_explicitly(&self, ip: IpAddr, port: u16) -> bool {
        self.port == Some(port) && self.covers_ip(ip)
    }

    /// Whether the entry is an address (`Ip` or `Cidr`) rather than a name.
    pub fn is_address(&self) -> bool {
        matches!(self.host, HostMatch::Ip(_) | HostMatch::Cidr(_))
    }

    fn port_matches(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    fn covers_ip(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        match &self.host {
            HostMatch::Ip(own) => own.to_canonical() == canonical,
            HostMatch::Cidr(net) => net.contains(&ip) || net.contains(&canonical),
            HostMatch::Exact(_) | HostMatch::Suffix(_) => false,
        }
    }
}

impl PartialEq for HostPattern {
    fn eq(&self, other: &Self) -> bool {
        self.host == other.host && self.port == other.port
    }
}

impl Eq for HostPattern {}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl TryFrom<String> for HostPattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<HostPattern> for String {
    fn from(p: HostPattern) -> String {
        p.source
    }
}

impl HostRule {
    /// Compiles `paths` with the glob semantics rules use: `*` and `?` stay
    /// within one path segment, `**` crosses segments. `None` when the rule
    /// does not restrict paths. The policy loader checks every glob with this
    /// same function, so it only fails for a policy built in code.
    pub fn compile_paths(&self) -> Result<Option<globset::GlobSet>, String> {
        if self.paths.is_empty() {
            return Ok(None);
        }
        let mut set = globset::GlobSetBuilder::new();
        for p in &self.paths {
            set.add(path_glob(p)?);
        }
        set.build().map(Some).map_err(|e| format!("path globs of the rule for {}: {e}", self.host))
    }
}

/// Checks a rule's path glob and builds it; shared by the loader and
/// [`HostRule::compile_paths`].
pub(crate) fn path_glob(p: &str) -> Result<globset::Glob, String> {
    if !p.starts_with('/') {
        return Err(format!("path glob {p:?} must start with '/', e.g. \"/v1/**\""));
    }
    if p.contains(['?', '#']) {
        // '?' is a glob wildcard, but in a URL it starts the query, which
        // rules never see; refuse it so nobody expects it to match a query.
        return Err(format!(
            "path glob {p:?} must not contain '?' or '#': rules match the URL path only, \
             without the query string"
        ));
    }
    globset::GlobBuilder::new(p)
        .literal_separator(true)
        .build()
        .map_err(|e| format!("path glob {p:?} is invalid: {}", e.kind()))
}

/// Checks an HTTP method name for a rule: an uppercase token.
pub(crate) fn check_method(m: &str) -> Result<(), String> {
    if m.is_empty() {
        return Err("method is empty".to_string());
    }
    if m.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(format!(
            "method {m:?} must be uppercase, e.g. {:?}: HTTP methods are case-sensitive",
            m.to_ascii_uppercase()
        ));
    }
    if !m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_') {
        return Err(format!("method {m:?} is not an HTTP method name (letters only, e.g. \"GET\")"));
    }
    Ok(())
}

impl SecretSource {
    /// Parses `env:NAME`, `file:/abs/path` or `cmd:COMMAND`.
    pub fn parse(s: &str) -> Result<SecretSource, String> {
        let expected = "expected \"env:NAME\", \"file:/absolute/path\" or \"cmd:COMMAND\"";
        let Some((kind, rest)) = s.split_once(':') else {
            return Err(format!("secret source {s:?} has no kind: {expected}"));
        };
        match kind {
            "env" => {
                check_portable_env_name(rest).map_err(|e| format!("secret source {s:?}: {e}"))?;
                Ok(SecretSource::Env(rest.to_string()))
            }
            "file" => {
                check_host_path(rest).map(SecretSource::File).map_err(|e| format!("secret source {s:?}: {e}"))
            }
            "cmd" => {
                if rest.trim().is_empty() {
                    Err(format!("secret source {s:?}: the command is empty"))
                } else if rest.contains('\0') {
                    Err(format!("secret source {s:?}: the command contains a NUL byte"))
                } else {
                    Ok(SecretSource::Cmd(rest.to_string()))
                }
            }
            _ => Err(format!("secret source {s:?} has unknown kind {kind:?}: {expected}")),
        }
    }
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(name) => write!(f, "env:{name}"),
            SecretSource::File(path) => write!(f, "file:{}", path.display()),
            SecretSource::Cmd(cmd) => write!(f, "cmd:{cmd}"),
        }
    }
}

impl FromStr for SecretSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SecretSource {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<SecretSource> for String {
    fn from(s: SecretSource) -> String {
        s.to_string()
    }
}

/// Lowercase, without a trailing dot or IPv6 brackets: the form patterns
/// store and compare against.
pub(crate) fn normalize_host(host: &str) -> String {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// An IP literal as a client may name it (IPv6 with or without brackets).
pub(crate) fn parse_ip_literal(host: &str) -> Option<IpAddr> {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.parse().ok()
}

/// Splits `host[:port]` / `[v6]:port`; the flag says the host was bracketed.
fn split_port(s: &str) -> Result<(&str, Option<u16>, bool), String> {
    if s.is_empty() {
        return Err("host pattern is empty".to_string());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("host pattern {s:?} contains whitespace or control characters"));
    }
    if s.contains("://") {
        return Err(format!(
            "host pattern {s:?} has a URL scheme; write the host only, e.g. \"example.com:443\""
        ));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let Some((inner, after)) = rest.split_once(']') else {
            return Err(format!("host pattern {s:?} has '[' without a closing ']'"));
        };
        if !inner.contains(':') {
            return Err(format!(
                "host pattern {s:?}: brackets are only for IPv6 addresses, e.g. \"[::1]:8080\""
            ));
        }
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(p) => Some(parse_port(p, s)?),
                None => {
                    return Err(format!(
                        "host pattern {s:?}: unexpected {after:?} after ']', expected \":PORT\""
                    ));
                }
            },
        };
        return Ok((inner, port, true));
    }
    match s.split_once(':') {
        Some((host, port)) if !port.contains(':') => Ok((host, Some(parse_port(port, s)?), false)),
        // Two or more colons: an IPv6 literal or network without a port.
        _ => Ok((s, None, false)),
    }
}

fn parse_port(p: &str, whole: &str) -> Result<u16, String> {
    let bad = || format!("host pattern {whole:?}: port {p:?} must be a number from 1 to 65535");
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(n) => Ok(n),
    }
}

fn parse_host(h: &str, bracketed: bool, whole: &str) -> Result<HostMatch, String> {
    if h.is_empty() {
        return Err(format!("host pattern {whole:?} has no host before the port"));
    }
    if bracketed || h.contains(':') {
        return parse_v6(h, bracketed, whole);
    }
    if let Some((addr, _)) = h.split_once('/') {
        if addr.parse::<Ipv4Addr>().is_err() {
            return Err(format!(
                "host pattern {whole:?} has a path; patterns name hosts only, and \
                 [[network.rule]] paths restrict the URL paths of a host"
            ));
        }
        return parse_cidr(h, whole).and_then(|net| match net {
            IpNet::V4(_) => Ok(HostMatch::Cidr(net)),
            IpNet::V6(_) => Err(format!("host pattern {whole:?} is not a valid IPv4 network")),
        });
    }
    // A name whose last label is numeric can only be meant as an IPv4 address.
    let last = h.strip_suffix('.').unwrap_or(h).rsplit('.').next().unwrap_or(h);
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return h
            .parse::<Ipv4Addr>()
            .map(|ip| HostMatch::Ip(IpAddr::V4(ip)))
            .map_err(|_| format!("host pattern {whole:?}: {h:?} is not a valid IPv4 address"));
    }
    if h == "*" || h == "*." {
        return Err(bare_tld(whole));
    }
    if let Some(suffix) = h.strip_prefix("*.") {
        let name = check_dns_name(suffix, whole)?;
        if !name.contains('.') {
            return Err(bare_tld(whole));
        }
        return Ok(HostMatch::Suffix(name));
    }
    if h.contains('*') {
        return Err(format!(
            "host pattern {whole:?}: '*' is only allowed as a whole leading label, as in \"*.example.com\""
        ));
    }
    check_dns_name(h, whole).map(HostMatch::Exact)
}

fn bare_tld(whole: &str) -> String {
    format!(
        "host pattern {whole:?} is a bare TLD wildcard, which would allow almost every host; \
         a wildcard needs at least two labels after \"*.\", e.g. \"*.example.com\""
    )
}

fn parse_v6(h: &str, bracketed: bool, whole: &str) -> Result<HostMatch, String> {
    let hint = if bracketed {
        String::new()
    } else {
        " (to give a port with an IPv6 address, put the address in brackets: \"[::1]:8080\")".to_string()
    };
    if h.contains('/') {
        return match parse_cidr(h, whole).map_err(|e| format!("{e}{hint}"))? {
            net @ IpNet::V6(_) => Ok(HostMatch::Cidr(net)),
            IpNet::V4(_) => Err(format!("host pattern {whole:?} is not a valid IPv6 network{hint}")),
        };
    }
    h.parse::<Ipv6Addr>()
        .map(|ip| HostMatch::Ip(IpAddr::V6(ip)))
        .map_err(|_| format!("host pattern {whole:?} is not a valid IPv6 address{hint}"))
}

fn parse_cidr(h: &str, whole: &str) -> Result<IpNet, String> {
    let net: IpNet = h.parse().map_err(|_| {
        format!("host pattern {whole:?}: {h:?} is not a valid network, expected ADDRESS/PREFIX such as \"10.0.0.0/8\"")
    })?;
    if net.addr() != net.network() {
        return Err(format!(
            "host pattern {whole:?}: {h:?} has bits set after the /{} prefix; write {:?}",
            net.prefix_len(),
            net.trunc().to_string()
        ));
    }
    Ok(net)
}

/// Checks a DNS name (letters, digits, '-', '_'; labels of 1 to 63; at most
/// 253 in all) and returns it lowercase without a trailing dot.
fn check_dns_name(name: &str, whole: &str) -> Result<String, String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(format!("host pattern {whole:?} has an empty host name"));
    }
    if !name.is_ascii() {
        return Err(format!(
            "host pattern {whole:?} is not ASCII; write internationalized names in their \
             \"xn--\" (punycode) form"
        ));
    }
    if name.len() > 253 {
        return Err(format!("host pattern {whole:?}: the name is longer than 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("host pattern {whole:?} has an empty label (\"..\" or a leading dot)"));
        }
        if label.len() > 63 {
            return Err(format!("host pattern {whole:?} has a label longer than 63 characters"));
        }
        if let Some(c) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
            return Err(format!(
                "host pattern {whole:?} contains {c:?}; a host name has letters, digits, '-', '_' and '.' only"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("host pattern {whole:?}: a label must not start or end with '-'"));
        }
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> HostMatch {
        HostMatch::Cidr(s.parse().unwrap())
    }

    #[test]
    fn valid_patterns_parse() {
        let ex = |s: &str| HostMatch::Exact(s.to_string());
        let cases: &[(&str, HostMatch, Option<u16>)] = &[
            ("api.example.com", ex("api.example.com"), None),
            ("API.Example.COM.", ex("api.example.com"), None),
            ("api.example.com:443", ex("api.example.com"), Some(443)),
            ("localhost", ex("localhost"), None),
            ("my_svc.example.com", ex("my_svc.example.com"), None),
            ("xn--bcher-kva.example", ex("xn--bcher-kva.example"), None),
            ("*.example.org", HostMatch::Suffix("example.org".into()), None),
            ("*.example.org:443", HostMatch::Suffix("example.org".into()), Some(443)),
            ("*.co.example", HostMatch::Suffix("co.example".into()), None),
            ("127.0.0.1", HostMatch::Ip(ip("127.0.0.1")), None),
            ("127.0.0.1:8080", HostMatch::Ip(ip("127.0.0.1")), Some(8080)),
            ("10.1.0.0/16:5432", net("10.1.0.0/16"), Some(5432)),
            ("10.0.0.0/8", net("10.0.0.0/8"), None),
            ("::1", HostMatch::Ip(ip("::1")), None),
            ("[::1]", HostMatch::Ip(ip("::1")), None),
            ("[::1]:8080", HostMatch::Ip(ip("::1")), Some(8080)),
            ("fd00::/8", net("fd00::/8"), None),
            ("[fd00::/8]:443", net("fd00::/8"), Some(443)),
            ("example.com:65535", ex("example.com"), Some(65535)),
            ("example.com:1", ex("example.com"), Some(1)),
        ];
        for (text, host, port) in cases {
            let pat = p(text);
            assert_eq!(&pat.host, host, "{text}");
            assert_eq!(pat.port, *port, "{text}");
            assert_eq!(pat.source, *text);
        }
    }

    #[test]
    fn invalid_patterns_say_why() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("*", "bare TLD"),
            ("*.", "bare TLD"),
            ("*.com", "bare TLD"),
            ("*.com:443", "bare TLD"),
            ("a.*.example.com", "whole leading label"),
            ("*example.com", "whole leading label"),
            ("**.example.com", "whole leading label"),
            ("example.com:0", "from 1 to 65535"),
            ("example.com:65536", "from 1 to 65535"),
            ("example.com:", "from 1 to 65535"),
            ("example.com:https", "from 1 to 65535"),
            ("example.com:+443", "from 1 to 65535"),
            (":443", "no host"),
            ("exa mple.com", "whitespace"),
            ("example..com", "empty label"),
            (".example.com", "empty label"),
            ("-a.example.com", "start or end with '-'"),
            ("a-.example.com", "start or end with '-'"),
            ("ex!ample.com", "contains '!'"),
            ("https://example.com", "URL scheme"),
            ("example.com/path", "has a path"),
            ("bücher.example", "punycode"),
            ("256.1.1.1", "not a valid IPv4 address"),
            ("10.1", "not a valid IPv4 address"),
            ("10.0.0.0/33", "not a valid network"),
            ("10.1.2.3/16", "write \"10.1.0.0/16\""),
            ("fd00::1/8", "write \"fd00::/8\""),
            ("::1:8080:zz", "put the address in brackets"),
            ("fd00::/8:443", "put the address in brackets"),
            ("[::1", "closing ']'"),
            ("[10.0.0.1]:80", "only for IPv6"),
            ("[::1]8080", "expected \":PORT\""),
            ("[::1]:0", "from 1 to 65535"),
            ("[10.0.0.0/8]", "only for IPv6"),
            ("[::ffff:10.0.0.0/8]:1", "bits set after the /8 prefix"),
        ];
        for (text, needle) in cases {
            let err = HostPattern::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let long = format!("{}.example.com", "a".repeat(64));
        assert!(HostPattern::parse(&long).unwrap_err().contains("63"));
        let longer = vec!["abcdefgh"; 30].join(".");
        assert!(HostPattern::parse(&longer).unwrap_err().contains("253"));
    }

    #[test]
    fn name_matching() {
        let cases: &[(&str, &str, u16, bool)] = &[
            ("api.example.com", "api.example.com", 443, true),
            ("api.example.com", "API.Example.com.", 80, true),
            ("api.example.com", "x.api.example.com", 443, false),
            ("api.example.com", "example.com", 443, false),
            ("api.example.com:443", "api.example.com", 443, true),
            ("api.example.com:443", "api.example.com", 80, false),
            ("*.example.org", "a.example.org", 443, true),
            ("*.example.org", "a.b.example.org", 8443, true),
            ("*.example.org", "A.Example.Org.", 443, true),
            ("*.example.org", "example.org", 443, false),
            ("*.example.org", "badexample.org", 443, false),
            ("*.example.org", ".example.org", 443, false),
            ("*.example.org:443", "a.example.org", 80, false),
            // Addresses match IP literals, names never match addresses.
            ("127.0.0.1:8080", "127.0.0.1", 8080, true),
            ("127.0.0.1:8080", "127.0.0.1", 8081, false),
            ("127.0.0.1", "localhost", 80, false),
            ("10.1.0.0/16:5432", "10.1.200.3", 5432, true),
            ("10.1.0.0/16:5432", "10.2.0.3", 5432, false),
            ("[::1]:8080", "[::1]", 8080, true),
            ("[::1]:8080", "::1", 8080, true),
            ("127.0.0.1", "[::ffff:127.0.0.1]", 80, true),
            ("fd00::/8", "fd12::1", 1, true),
            ("api.example.com", "127.0.0.1", 80, false),
        ];
        for (pattern, host, port, expected) in cases {
            assert_eq!(p(pattern).matches_name(host, *port), *expected, "{pattern} vs {host}:{port}");
        }
    }

    #[test]
    fn address_matching_and_explicit_naming() {
        let cases: &[(&str, &str, u16, bool, bool)] = &[
            // pattern, ip, port, matches_ip, names_address_explicitly
            ("127.0.0.1:8080", "127.0.0.1", 8080, true, true),
            ("127.0.0.1:8080", "127.0.0.1", 80, false, false),
            ("127.0.0.1", "127.0.0.1", 80, true, false),
            ("10.1.0.0/16:5432", "10.1.0.9", 5432, true, true),
            ("10.1.0.0/16", "10.1.0.9", 5432, true, false),
            ("[::1]:8080", "::1", 8080, true, true),
            ("127.0.0.1:8080", "::ffff:127.0.0.1", 8080, true, true),
            ("[::ffff:127.0.0.1]:8080", "127.0.0.1", 8080, true, true),
            ("10.0.0.0/8:1", "::ffff:10.9.9.9", 1, true, true),
            ("api.example.com:443", "93.184.215.14", 443, false, false),
            ("*.example.org", "93.184.215.14", 443, false, false),
        ];
        for (pattern, addr, port, matches, explicit) in cases {
            let pat = p(pattern);
            assert_eq!(pat.matches_ip(ip(addr), *port), *matches, "{pattern} vs {addr}:{port}");
            assert_eq!(
                pat.names_address_explicitly(ip(addr), *port),
                *explicit,
                "{pattern} vs {addr}:{port}"
            );
        }
    }

    #[test]
    fn equality_ignores_spelling_and_serde_uses_the_source() {
        assert_eq!(p("Example.com."), p("example.com"));
        assert_ne!(p("example.com"), p("example.com:443"));
        let json = serde_json::to_string(&p("*.Example.org:443")).unwrap();
        assert_eq!(json, "\"*.Example.org:443\"");
        let back: HostPattern = serde_json::from_str(&json).unwrap();
        assert_eq!(back.source, "*.Example.org:443");
        assert!(serde_json::from_str::<HostPattern>("\"*.com\"").is_err());
    }

    #[test]
    fn secret_sources() {
        assert_eq!(SecretSource::parse("env:TOKEN").unwrap(), SecretSource::Env("TOKEN".into()));
        assert_eq!(SecretSource::parse("file:/run/t").unwrap(), SecretSource::File("/run/t".into()));
        assert_eq!(SecretSource::parse("cmd:pass show x").unwrap(), SecretSource::Cmd("pass show x".into()));
        for s in ["env:TOKEN", "file:/run/t", "cmd:pass show x:y"] {
            assert_eq!(SecretSource::parse(s).unwrap().to_string(), s);
        }
        for (s, needle) in [
            ("TOKEN", "has no kind"),
            ("vault:x", "unknown kind \"vault\""),
            ("env:", "empty"),
            ("env:1X", "start with a letter"),
            ("file:rel/path", "must be absolute"),
            ("file:/a/../b", "\"..\""),
            ("cmd:  ", "command is empty"),
        ] {
            let err = SecretSource::parse(s).unwrap_err();
            assert!(err.contains(needle), "{s}: {err}");
        }
    }

    #[test]
    fn rule_path_globs_stay_within_segments() {
        let rule = HostRule {
            host: p("api.example.com"),
            methods: vec![],
            paths: vec!["/repos/**".into(), "/v1/*/info".into()],
        };
        let set = rule.compile_paths().unwrap().unwrap();
        assert!(set.is_match("/repos/a/b/c"));
        assert!(set.is_match("/v1/x/info"));
        assert!(!set.is_match("/v1/x/y/info"));
        assert!(!set.is_match("/other"));
        let none = HostRule { paths: vec![], ..rule.clone() };
        assert!(none.compile_paths().unwrap().is_none());
        for (g, needle) in [("repos/**", "start with '/'"), ("/a?b", "query"), ("/{a", "invalid")] {
            let err = path_glob(g).unwrap_err();
            assert!(err.contains(needle), "{g}: {err}");
        }
        for (m, ok) in [("GET", true), ("get", false), ("GE T", false), ("", false), ("PROPFIND", true)] {
            assert_eq!(check_method(m).is_ok(), ok, "{m}");
        }
    }
}
