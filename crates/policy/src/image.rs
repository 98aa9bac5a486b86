//! `[image]`: the image a sandbox runs on, and what a pull of one may use —
//! which registries, which of them over plain HTTP, and whose credentials.
//!
//! Registries are named as image references name them: `host` or
//! `host:port` (`registry.example.com`, `127.0.0.1:5000`, `[::1]:5000`),
//! compared without regard to case.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::SecretSource;

/// `[image]`: the image a sandbox runs on, and what a pull may use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePolicy {
    /// The image the sandbox's root comes from (`--image` replaces it);
    /// None: the host's own system directories, read-only.
    #[serde(default, rename = "ref")]
    pub reference: Option<String>,
    /// Refuse references that do not pin a manifest digest (`@sha256:…`).
    #[serde(default)]
    pub require_digest: bool,
    /// Registries a pull may come from (host or host:port); empty: any.
    #[serde(default)]
    pub registries: Vec<String>,
    /// Registries pulled from over plain HTTP, as `--insecure` does for one
    /// pull; every other registry needs TLS. No built-in lists any.
    #[serde(default)]
    pub insecure: Vec<String>,
    /// Credentials for pulls, by registry: read on the host from their
    /// secret source only when a pull from that registry needs them.
    #[serde(default)]
    pub credentials: BTreeMap<String, RegistryCredential>,
}

/// `[image.credentials."REGISTRY"]`: the user name, and where the host side
/// reads the password (or token) from. Used for basic auth, and to get a
/// bearer token from the registry's token service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryCredential {
    pub username: String,
    pub password: SecretSource,
}

impl ImagePolicy {
    /// Why this policy refuses `reference` (pinning and the registry
    /// allowlist; `registry` is the reference's registry host, None for a
    /// local layout or archive).
    pub fn refusal(&self, reference: &str, registry: Option<&str>) -> Option<String> {
        if self.require_digest && !reference.contains("@sha256:") {
            return Some(format!(
                "image {reference} is not pinned by digest and the policy requires one (image.require_digest): \
                 name it as REF@sha256:…"
            ));
        }
        match registry {
            Some(host) if !self.registries.is_empty() && !self.registries.iter().any(|r| r == host) => {
                Some(format!(
                    "registry {host} is not in the policy's image.registries ({})",
                    self.registries.join(", ")
                ))
            }
            _ => None,
        }
    }

    /// Whether the policy marks the registry known by `names` (its name in
    /// the reference and the host it resolves to) as plain HTTP.
    pub fn is_insecure(&self, names: &[&str]) -> bool {
        self.insecure.iter().any(|entry| names.iter().any(|n| n.eq_ignore_ascii_case(entry)))
    }

    /// The credentials the policy gives for the registry known by `names`,
    /// with the registry as the policy names it.
    pub fn credential_for(&self, names: &[&str]) -> Option<(&str, &RegistryCredential)> {
        self.credentials
            .iter()
            .find(|(registry, _)| names.iter().any(|n| n.eq_ignore_ascii_case(registry)))
            .map(|(registry, credential)| (registry.as_str(), credential))
    }
}

/// Checks a registry as references name it: `host` or `host:port`, the host
/// a DNS name, an IPv4 address or a bracketed IPv6 address. No scheme, path,
/// user or wildcard: an entry names one registry.
pub(crate) fn check_registry(text: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "registry {text:?} {why}: write it as references name it, host or host:port \
             (e.g. \"registry.example.com\", \"127.0.0.1:5000\")"
        ))
    };
    if text.is_empty() {
        return bad("is empty");
    }
    if text.len() > 255 {
        return bad("is longer than 255 characters");
    }
    if text.contains("://") {
        return bad("has a scheme");
    }
    if text.contains(['/', '@', '*', '?', '#']) || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("is not a host[:port]");
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let Some((address, after)) = rest.split_once(']') else { return bad("has an unclosed '['") };
        if address.parse::<std::net::Ipv6Addr>().is_err() {
            return bad("has no IPv6 address within its brackets");
        }
        match after {
            "" => (None, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return bad("has something after ']' that is not :port"),
            },
        }
    } else {
        match text.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(text), None),
        }
    };
    if let Some(port) = port
        && !(port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p > 0))
    {
        return bad("has a port that is not a number from 1 to 65535");
    }
    if let Some(host) = host {
        let label_ok = |label: &str| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        if !host.split('.').all(label_ok) {
            return bad("has a host that is not a DNS name or an IP address");
        }
    }
    Ok(())
}

/// Checks a registry user name: Basic auth joins it to the password with a
/// ':', so it cannot hold one.
pub(crate) fn check_username(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the user name is empty".to_string());
    }
    if name.len() > 256 {
        return Err("the user name is longer than 256 characters".to_string());
    }
    if name.contains(':') || name.chars().any(char::is_control) {
        return Err(format!("user name {name:?} must not contain ':' or control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn registries_are_host_or_host_and_port() {
        for good in [
            "registry.example.com",
            "registry.example.com:5000",
            "127.0.0.1:5000",
            "localhost",
            "[::1]:5000",
            "[fd00::1]",
        ] {
            assert!(check_registry(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "is empty"),
            ("https://registry.example.com", "has a scheme"),
            ("registry.example.com/team", "not a host[:port]"),
            ("*.example.com", "not a host[:port]"),
            ("user@registry.example.com", "not a host[:port]"),
            ("registry.example.com:0", "from 1 to 65535"),
            ("registry.example.com:http", "from 1 to 65535"),
            ("registry.example.com:", "from 1 to 65535"),
            ("a..example.com", "not a DNS name"),
            ("-a.example.com", "not a DNS name"),
            ("[::1", "unclosed"),
            ("[nope]:5000", "no IPv6 address"),
            ("[::1]5000", "not :port"),
        ] {
            let err = check_registry(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn insecure_and_credentials_match_any_name_of_the_registry_in_any_case() {
        let mut policy = ImagePolicy { insecure: vec!["127.0.0.1:5000".into()], ..ImagePolicy::default() };
        policy.credentials.insert(
            "Registry.Example.com".into(),
            RegistryCredential { username: "ci".into(), password: SecretSource::Env("PASSWORD".into()) },
        );
        assert!(policy.is_insecure(&["127.0.0.1:5000"]));
        assert!(!policy.is_insecure(&["127.0.0.1:5001"]));
        assert!(!policy.is_insecure(&["127.0.0.1"]), "a port is part of the registry's name");
        let (registry, credential) = policy.credential_for(&["docker.io", "registry.example.com"]).unwrap();
        assert_eq!((registry, credential.username.as_str()), ("Registry.Example.com", "ci"));
        assert!(policy.credential_for(&["registry.example.com:5000"]).is_none());
    }

    #[test]
    fn user_names_cannot_hold_a_colon() {
        assert!(check_username("ci-bot").is_ok());
        assert!(check_username("").is_err());
        assert!(check_username("a:b").unwrap_err().contains("':'"));
        assert!(check_username("a\nb").is_err());
    }
}
