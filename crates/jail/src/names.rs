//! The name files every sandbox sees in place of the host's, in both tiers:
//! `/etc/hosts` with loopback names only (and the sandbox's own name), and
//! `/etc/resolv.conf` naming airlock's resolver. The host's names and
//! addresses are none of the sandbox's business.

/// The address the sandbox's resolv.conf names. With transparent egress
/// every query to port 53 is redirected to airlock's resolver whatever its
/// address; this one is where glibc looks when nothing else is named.
/// Without it nothing answers there, so a lookup fails at once.
pub const NAMESERVER: &str = "127.0.0.1";

/// The sandbox's `/etc/hosts`; `hostname`, when it has one, on 127.0.1.1.
pub fn hosts(hostname: Option<&str>) -> String {
    let mut text = String::from(
        "# airlock: this sandbox's own names; the host's are not its business.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    if let Some(name) = hostname {
        text.push_str(&format!("127.0.1.1\t{name}\n"));
    }
    text
}

/// The sandbox's `/etc/resolv.conf`.
pub fn resolv_conf() -> String {
    format!(
        "# airlock: every DNS query, to any address, is answered by airlock's resolver\n\
         # (names the policy allows) or not at all; none leaves the sandbox.\n\
         nameserver {NAMESERVER}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_and_airlocks_resolver() {
        let with = hosts(Some("brave-otter"));
        assert!(with.ends_with("127.0.1.1\tbrave-otter\n"), "{with}");
        let without = hosts(None);
        assert!(!without.contains("127.0.1.1"), "{without}");
        for text in [with, without, resolv_conf()] {
            let addresses: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split_whitespace().find(|w| w.parse::<std::net::IpAddr>().is_ok()))
                .collect();
            assert!(
                addresses.iter().all(|a| a.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())),
                "{text}"
            );
        }
        assert!(resolv_conf().lines().any(|l| l == "nameserver 127.0.0.1"));
    }
}
