//! Which addresses a sandbox may reach, whatever name led to them.
//!
//! The proxy resolves names itself and checks every address it would connect
//! to, so a permitted name that resolves to loopback, a private network or a
//! cloud metadata endpoint (DNS rebinding included) is refused at the address
//! actually connected to. Only an allow entry that names the address and its
//! port opens such an address (see [`crate::rules::NetRules::decide_address`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use crate::rules::{Decision, NetRules, host_port, normalize_host};

/// What kind of destination an IP address is. Everything but `Public` is
/// refused unless the policy names the address and port explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressClass {
    /// Globally routable unicast.
    Public,
    /// 127.0.0.0/8, ::1: the host itself.
    Loopback,
    /// RFC 1918 (10/8, 172.16/12, 192.168/16), unique local fc00::/7,
    /// deprecated site-local fec0::/10, local-use NAT64 64:ff9b:1::/48.
    Private,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// Carrier-grade NAT shared space 100.64.0.0/10.
    Cgnat,
    /// Cloud instance metadata and credential endpoints (169.254.169.254,
    /// 169.254.170.2, 169.254.170.23, 100.100.100.200, fd00:ec2::254,
    /// fd00:ec2::23). Reaching one hands out the host's cloud credentials.
    Metadata,
    /// 0.0.0.0/8 and ::, which Linux connects to the local host.
    Unspecified,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32,
    /// 3fff::/20: never routed on the internet, so only ever a local network.
    Documentation,
    /// Other special-purpose space: 240.0.0.0/4, 192.0.0.0/24, 198.18.0.0/15,
    /// 192.88.99.0/24, 2001::/23, 100::/64, 5f00::/16, IPv4-compatible
    /// ::a.b.c.d, and IPv6 outside the global unicast 2000::/3.
    Reserved,
}

impl AddressClass {
    /// "a loopback address", for messages.
    pub fn describe(self) -> &'static str {
        match self {
            AddressClass::Public => "a public address",
            AddressClass::Loopback => "a loopback address",
            AddressClass::Private => "a private address",
            AddressClass::LinkLocal => "a link-local address",
            AddressClass::Cgnat => "a carrier-grade NAT address",
            AddressClass::Metadata => "a cloud metadata address",
            AddressClass::Unspecified => "an unspecified address",
            AddressClass::Multicast => "a multicast address",
            AddressClass::Broadcast => "a broadcast address",
            AddressClass::Documentation => "a documentation address",
            AddressClass::Reserved => "a reserved address",
        }
    }

    /// Classes that only a single-address entry (an IP, not a network) with
    /// the port can open: a network entry such as "169.254.0.0/16:80" must
    /// not hand out cloud credentials or reach the host through 0.0.0.0 by
    /// accident.
    pub fn needs_exact_entry(self) -> bool {
        matches!(
            self,
            AddressClass::Metadata
                | AddressClass::Unspecified
                | AddressClass::Multicast
                | AddressClass::Broadcast
        )
    }
}

const METADATA_V4: &[Ipv4Addr] = &[
    Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
    Ipv4Addr::new(169, 254, 170, 2),   // AWS ECS task credentials
    Ipv4Addr::new(169, 254, 170, 23),  // AWS EKS pod identity
    Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
];

const METADATA_V6: &[Ipv6Addr] = &[
    Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254), // AWS (IPv6)
    Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23),  // AWS EKS pod identity (IPv6)
];

/// The class of `ip`; IPv6 forms that carry an IPv4 address (mapped,
/// translated, NAT64, 6to4) are classified by that address.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// Whether `ip` is anything but a public address.
pub fn is_special(ip: IpAddr) -> bool {
    classify(ip) != AddressClass::Public
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], prefix: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    use AddressClass::*;
    // Metadata first: its addresses sit inside link-local and CGNAT space.
    if METADATA_V4.contains(&ip) {
        return Metadata;
    }
    let table: &[([u8; 4], u32, AddressClass)] = &[
        ([0, 0, 0, 0], 8, Unspecified),
        ([127, 0, 0, 0], 8, Loopback),
        ([10, 0, 0, 0], 8, Private),
        ([172, 16, 0, 0], 12, Private),
        ([192, 168, 0, 0], 16, Private),
        ([169, 254, 0, 0], 16, LinkLocal),
        ([100, 64, 0, 0], 10, Cgnat),
        ([255, 255, 255, 255], 32, Broadcast),
        ([224, 0, 0, 0], 4, Multicast),
        ([192, 0, 2, 0], 24, Documentation),
        ([198, 51, 100, 0], 24, Documentation),
        ([203, 0, 113, 0], 24, Documentation),
        ([240, 0, 0, 0], 4, Reserved),
        ([192, 0, 0, 0], 24, Reserved),
        ([198, 18, 0, 0], 15, Reserved),
        ([192, 88, 99, 0], 24, Reserved),
    ];
    table.iter().find(|(net, prefix, _)| in_v4(ip, *net, *prefix)).map_or(Public, |(_, _, class)| *class)
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    use AddressClass::*;
    if let Some(class) = classify_embedded_v4(ip) {
        return class;
    }
    if ip.is_unspecified() {
        return Unspecified;
    }
    if ip.is_loopback() {
        return Loopback;
    }
    if METADATA_V6.contains(&ip) {
        return Metadata;
    }
    let table: &[([u16; 8], u32, AddressClass)] = &[
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, Multicast),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, LinkLocal),
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, Private),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, Private),
        ([0x0064, 0xff9b, 0x0001, 0, 0, 0, 0, 0], 48, Private),
        ([0x2001, 0x0db8, 0, 0, 0, 0, 0, 0], 32, Documentation),
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, Documentation),
        ([0x0100, 0, 0, 0, 0, 0, 0, 0], 64, Reserved),
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23, Reserved),
        ([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, Reserved),
    ];
    if let Some((_, _, class)) = table.iter().find(|(net, prefix, _)| in_v6(ip, *net, *prefix)) {
        return *class;
    }
    // Everything outside global unicast is unallocated or special.
    if in_v6(ip, [0x2000, 0, 0, 0, 0, 0, 0, 0], 3) { Public } else { Reserved }
}

/// The class of the IPv4 address an IPv6 address stands for, if it is one
/// of the forms that carry one.
fn classify_embedded_v4(ip: Ipv6Addr) -> Option<AddressClass> {
    let s = ip.segments();
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
    // ::ffff:a.b.c.d (mapped) and ::ffff:0:a.b.c.d (translated, RFC 2765).
    if in_v6(ip, [0, 0, 0, 0, 0, 0xffff, 0, 0], 96) || in_v6(ip, [0, 0, 0, 0, 0xffff, 0, 0, 0], 96) {
        return Some(classify_v4(low32));
    }
    // 64:ff9b::a.b.c.d, the well-known NAT64 prefix (RFC 6052).
    if in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        return Some(classify_v4(low32));
    }
    // 2002:AABB:CCDD::/48, 6to4 (RFC 3056): the IPv4 address is bits 16..48.
    if s[0] == 0x2002 {
        let [a, b] = s[1].to_be_bytes();
        let [c, d] = s[2].to_be_bytes();
        return Some(classify_v4(Ipv4Addr::new(a, b, c, d)));
    }
    // ::a.b.c.d, deprecated IPv4-compatible addresses (not :: or ::1).
    if in_v6(ip, [0; 8], 96) && bits > 1 {
        return Some(AddressClass::Reserved);
    }
    None
}

/// Resolves `host` with the host's resolver (blocking: call it from a
/// blocking context) and returns the addresses `rules` allows, in resolver
/// order without duplicates.
///
/// - `Err(Decision::Deny)`: the name itself is refused (it is then never
///   looked up, so a denied name leaks nothing through DNS), or every address
///   it resolved to is refused; the reason is that of the first refusal.
/// - `Err(Decision::Allow)`: the policy allows the destination but it has no
///   address (the lookup failed or returned none); `rule` names the allow
///   entry and says why there is no address.
///
/// An IP literal is not looked up; it is checked as it is.
pub fn resolve_allowed(rules: &NetRules, host: &str, port: u16) -> Result<Vec<SocketAddr>, Decision> {
    let rule = match rules.decide_target(host, port) {
        Decision::Allow { rule } => rule,
        deny @ Decision::Deny { .. } => return Err(deny),
    };
    let name = normalize_host(host);
    if let Ok(ip) = name.parse::<IpAddr>() {
        return match rules.decide_address(&name, ip, port) {
            Decision::Allow { .. } => Ok(vec![SocketAddr::new(ip, port)]),
            deny => Err(deny),
        };
    }
    let resolved: Vec<SocketAddr> = match (name.as_str(), port).to_socket_addrs() {
        Ok(addrs) => addrs.collect(),
        Err(e) => {
            return Err(Decision::Allow {
                rule: format!("{rule}; {} did not resolve: {e}", host_port(&name, port)),
            });
        }
    };
    if resolved.is_empty() {
        return Err(Decision::Allow { rule: format!("{rule}; {name} resolved to no address") });
    }
    let mut allowed: Vec<SocketAddr> = Vec::with_capacity(resolved.len());
    let mut first_refusal = None;
    for addr in resolved {
        match rules.decide_address(&name, addr.ip(), port) {
            Decision::Allow { .. } => {
                if !allowed.contains(&addr) {
                    allowed.push(addr);
                }
            }
            deny => {
                first_refusal.get_or_insert(deny);
            }
        }
    }
    match (allowed.is_empty(), first_refusal) {
        (true, Some(deny)) => Err(deny),
        (true, None) => Err(Decision::Allow { rule: format!("{rule}; {name} resolved to no address") }),
        (false, _) => Ok(allowed),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::AddressClass::*;
    use super::*;
    use airlock_policy::{HostPattern, Policy};

    #[test]
    fn classification_table() {
        let cases: &[(&str, AddressClass)] = &[
            // IPv4
            ("93.184.215.14", Public),
            ("1.1.1.1", Public),
            ("8.8.8.8", Public),
            ("172.15.255.255", Public),
            ("172.32.0.0", Public),
            ("100.63.255.255", Public),
            ("100.128.0.0", Public),
            ("223.255.255.255", Public),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("10.0.0.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("169.254.0.1", LinkLocal),
            ("169.254.169.123", LinkLocal),
            ("169.254.169.254", Metadata),
            ("169.254.170.2", Metadata),
            ("169.254.170.23", Metadata),
            ("100.100.100.200", Metadata),
            ("100.64.0.1", Cgnat),
            ("100.127.255.255", Cgnat),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Reserved),
            ("255.255.255.254", Reserved),
            ("192.0.0.8", Reserved),
            ("198.18.0.1", Reserved),
            ("198.19.255.255", Reserved),
            ("192.88.99.1", Reserved),
            ("192.0.2.1", Documentation),
            ("198.51.100.7", Documentation),
            ("203.0.113.9", Documentation),
            // IPv6
            ("2606:4700::1111", Public),
            ("2a00:1450:4001::1", Public),
            ("::", Unspecified),
            ("::1", Loopback),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fec0::1", Private),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fd00:ec2::254", Metadata),
            ("fd00:ec2::23", Metadata),
            ("fd00:ec2::1", Private),
            ("ff02::1", Multicast),
            ("ff05::2", Multicast),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            ("100::1", Reserved),
            ("2001::1", Reserved),
            ("5f00::1", Reserved),
            ("4000::1", Reserved),
            ("::2", Reserved),
            ("::10.0.0.1", Reserved),
            ("64:ff9b:1::1", Private),
            // IPv6 forms of IPv4 addresses take the IPv4 address's class.
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.1.2.3", Private),
            ("::ffff:169.254.169.254", Metadata),
            ("::ffff:100.64.0.1", Cgnat),
            ("::ffff:0.0.0.0", Unspecified),
            ("::ffff:255.255.255.255", Broadcast),
            ("::ffff:93.184.215.14", Public),
            ("::ffff:0:127.0.0.1", Loopback),
            ("64:ff9b::127.0.0.1", Loopback),
            ("64:ff9b::169.254.169.254", Metadata),
            ("64:ff9b::93.184.215.14", Public),
            ("2002:7f00:1::1", Loopback),
            ("2002:a9fe:a9fe::1", Metadata),
            ("2002:5db8:d70e::1", Public),
        ];
        for (text, class) in cases {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(classify(ip), *class, "{text}");
            assert_eq!(is_special(ip), *class != Public, "{text}");
        }
    }

    #[test]
    fn descriptions_read_as_a_noun_phrase() {
        assert_eq!(Metadata.describe(), "a cloud metadata address");
        assert_eq!(Unspecified.describe(), "an unspecified address");
        assert!(Metadata.needs_exact_entry() && Broadcast.needs_exact_entry());
        assert!(!Loopback.needs_exact_entry() && !Private.needs_exact_entry());
    }

    fn rules_with(allow: &[&str], deny: &[&str]) -> NetRules {
        let mut p = Policy::builtin("dev").unwrap();
        p.network.allow = allow.iter().map(|s| HostPattern::parse(s).unwrap()).collect();
        p.network.deny = deny.iter().map(|s| HostPattern::parse(s).unwrap()).collect();
        NetRules::from_policy(&p)
    }

    fn reason(d: Decision) -> String {
        match d {
            Decision::Deny { reason } => reason,
            Decision::Allow { rule } => panic!("expected a refusal, got allow {rule}"),
        }
    }

    #[test]
    fn localhost_is_refused_unless_its_address_and_port_are_named() {
        let rules = rules_with(&["localhost"], &[]);
        let err = reason(resolve_allowed(&rules, "localhost", 8080).unwrap_err());
        assert!(err.starts_with("localhost resolves to "), "{err}");
        assert!(err.contains("a loopback address; name it with its port in network.allow"), "{err}");

        let rules = rules_with(&["localhost", "127.0.0.1:8080"], &[]);
        let addrs = resolve_allowed(&rules, "LocalHost.", 8080).unwrap();
        assert!(addrs.contains(&"127.0.0.1:8080".parse().unwrap()), "{addrs:?}");
        assert!(addrs.iter().all(|a| a.ip() == IpAddr::from([127, 0, 0, 1])), "::1 is not named: {addrs:?}");
        // Another port of the same address stays closed.
        assert!(resolve_allowed(&rules, "localhost", 8081).is_err());
        // Naming the address does not allow the name: names are allowed by name.
        let rules = rules_with(&["127.0.0.1:8080"], &[]);
        let err = reason(resolve_allowed(&rules, "localhost", 8080).unwrap_err());
        assert_eq!(err, "no allow entry matches localhost:8080");
        // A deny on the address wins over both allow entries.
        let rules = rules_with(&["localhost", "127.0.0.1:8080", "[::1]:8080"], &["127.0.0.0/8"]);
        let addrs = resolve_allowed(&rules, "localhost", 8080);
        match addrs {
            Ok(addrs) => assert!(addrs.iter().all(|a| a.ip().is_ipv6()), "{addrs:?}"),
            Err(d) => assert!(reason(d).contains("deny \"127.0.0.0/8\"")),
        }
    }

    #[test]
    fn ip_literals_are_checked_without_a_lookup() {
        let rules = rules_with(&["127.0.0.1:8080", "93.184.215.14"], &[]);
        assert_eq!(resolve_allowed(&rules, "127.0.0.1", 8080).unwrap(), ["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(
            resolve_allowed(&rules, "93.184.215.14", 443).unwrap(),
            ["93.184.215.14:443".parse().unwrap()]
        );
        let err = reason(resolve_allowed(&rules, "127.0.0.1", 9090).unwrap_err());
        assert!(err.contains("no allow entry matches 127.0.0.1:9090"), "{err}");
        let rules = rules_with(&["127.0.0.1"], &[]);
        let err = reason(resolve_allowed(&rules, "127.0.0.1", 9090).unwrap_err());
        assert_eq!(
            err,
            "127.0.0.1 is a loopback address; name it with its port in network.allow to reach it"
        );
        let rules = rules_with(&["[::1]:8080"], &[]);
        assert_eq!(resolve_allowed(&rules, "[::1]", 8080).unwrap(), ["[::1]:8080".parse().unwrap()]);
    }

    #[test]
    fn denied_names_are_not_looked_up_and_unresolvable_names_are_allowed_but_empty() {
        let rules = rules_with(&["*.example.org"], &["uploads.example.org"]);
        let err = reason(resolve_allowed(&rules, "uploads.example.org", 443).unwrap_err());
        assert_eq!(err, "deny \"uploads.example.org\"");
        let err = reason(resolve_allowed(&rules, "elsewhere.example.net", 443).unwrap_err());
        assert_eq!(err, "no allow entry matches elsewhere.example.net:443");
        // ".invalid" never resolves (RFC 6761).
        let rules = rules_with(&["*.airlock.invalid"], &[]);
        match resolve_allowed(&rules, "nothing.airlock.invalid", 443) {
            Err(Decision::Allow { rule }) => {
                assert!(rule.starts_with("allow \"*.airlock.invalid\"; nothing.airlock.invalid"), "{rule}")
            }
            other => panic!("expected allowed-but-unresolvable, got {other:?}"),
        }
    }
}
