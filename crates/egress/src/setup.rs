//! What passes between a sandbox's supervisor and its egress proxy process.
//!
//! The proxy runs in a process of its own that can do little, and learns
//! everything from the supervisor: once, at start, a [`ProxySetup`] over a
//! pipe — rules, the sandbox's CA with its key, the secret values, and the
//! bytes of the roots it verifies upstream TLS with. None of it is ever in
//! argv, the environment or a file, so the values exist only in the two
//! processes' memory. The proxy answers on another pipe with
//! [`ProxyReport`]s: ready (or why not), then one event per decision.
//!
//! On the pipe, the setup is an 8-byte length and JSON, then the bytes of
//! each root certificate file, raw, each after its 8-byte length (a host
//! bundle as base64 inside JSON would cost more than the rest of a
//! sandbox's start). The JSON, which holds the secrets, is built in and read
//! into buffers of exactly its size that are overwritten afterwards, so no
//! growing buffer leaves a copy in freed memory; the secret-bearing fields
//! are overwritten when dropped. (Copies that ring and rcgen make of the CA
//! key inside their own types are out of reach.)

use std::io::{self, Read, Write};
use std::sync::Arc;

use airlock_policy::Network;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ca::{CaError, CaMaterial, RootSources, SandboxCa};
use crate::event::NetEvent;
use crate::proxy::ProxyConfig;
use crate::rules::NetRules;
use crate::secrets::{ResolvedSecret, SecretValue};

/// The largest setup accepted (host bundles are a few hundred KiB).
const MAX_SETUP: u64 = 64 << 20;

/// Everything the proxy process decides and connects with.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProxySetup {
    /// As root: the uid and gid the proxy process becomes (its caller
    /// confines it; this crate only carries the value).
    pub run_as: Option<(u32, u32)>,
    /// For messages: "policy dev refused …".
    pub policy_name: String,
    /// The policy's `[network]` section.
    pub network: Network,
    pub ca: CaMaterial,
    pub secrets: Vec<SecretSetup>,
    pub roots: RootSources,
}

/// A secret as the proxy needs it: its placeholder, its value, its hosts.
#[derive(Serialize, Deserialize)]
pub struct SecretSetup {
    pub name: String,
    pub placeholder: String,
    #[serde(with = "secret_bytes")]
    pub value: Zeroizing<Vec<u8>>,
    pub hosts: Vec<String>,
}

impl std::fmt::Debug for SecretSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretSetup").field("name", &self.name).finish_non_exhaustive()
    }
}

impl SecretSetup {
    /// The wire form of a secret the supervisor resolved.
    pub fn of(secret: &ResolvedSecret) -> SecretSetup {
        SecretSetup {
            name: secret.name.clone(),
            placeholder: secret.placeholder.clone(),
            value: Zeroizing::new(secret.value.expose().to_vec()),
            hosts: secret.hosts.clone(),
        }
    }
}

/// What the proxy process tells its supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProxyReport {
    /// Confined and serving: the sandbox may start.
    Ready,
    /// It could not start; the sandbox must not either.
    Failed { message: String },
    /// One decision, for the audit log.
    Event(NetEvent),
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("reading the proxy's setup: {0}")]
    Io(#[from] io::Error),
    #[error("a part of the proxy's setup is {0} bytes, more than the {MAX_SETUP} accepted")]
    TooLarge(u64),
    #[error("the proxy's setup names {named} root files but carries {sent}")]
    Roots { named: usize, sent: usize },
    #[error("the proxy's setup does not parse: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("the sandbox's CA: {0}")]
    Ca(#[from] CaError),
}

/// Counts what serde_json writes, to size its buffer exactly.
struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the setup to `w` (a pipe): the JSON, then each root file's bytes.
pub fn write_setup(w: &mut impl Write, setup: &ProxySetup) -> io::Result<()> {
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, setup).map_err(io::Error::other)?;
    let mut json = Zeroizing::new(Vec::with_capacity(counter.0));
    serde_json::to_writer(&mut *json, setup).map_err(io::Error::other)?;
    write_part(w, &json)?;
    for file in setup.roots.files() {
        write_part(w, &file.pem)?;
    }
    w.flush()
}

fn write_part(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    w.write_all(&(bytes.len() as u64).to_be_bytes())?;
    w.write_all(bytes)
}

/// Reads what [`write_setup`] wrote.
pub fn read_setup(r: &mut impl Read) -> Result<ProxySetup, SetupError> {
    let json = read_part(r)?;
    let mut setup: ProxySetup = serde_json::from_slice(&json)?;
    drop(json);
    let named = setup.roots.files().count();
    for (sent, file) in setup.roots.files_mut().enumerate() {
        file.pem = read_part(r).map(|bytes| bytes.to_vec()).map_err(|e| match e {
            SetupError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                SetupError::Roots { named, sent }
            }
            other => other,
        })?;
    }
    Ok(setup)
}

/// One length-prefixed part, into a buffer of exactly its size that is
/// overwritten when dropped.
fn read_part(r: &mut impl Read) -> Result<Zeroizing<Vec<u8>>, SetupError> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len)?;
    let len = u64::from_be_bytes(len);
    if len > MAX_SETUP {
        return Err(SetupError::TooLarge(len));
    }
    let mut body = Zeroizing::new(vec![0u8; len as usize]);
    r.read_exact(&mut body)?;
    Ok(body)
}

impl ProxySetup {
    /// The proxy's configuration. Secret values move out of the setup
    /// without being copied.
    pub fn into_config(self) -> Result<ProxyConfig, SetupError> {
        let ca = SandboxCa::from_material(&self.ca)?;
        let secrets = self
            .secrets
            .into_iter()
            .map(|mut s| ResolvedSecret {
                value: SecretValue::new(std::mem::take(&mut *s.value)),
                name: std::mem::take(&mut s.name),
                placeholder: std::mem::take(&mut s.placeholder),
                hosts: std::mem::take(&mut s.hosts),
            })
            .collect();
        Ok(ProxyConfig {
            policy_name: self.policy_name,
            rules: NetRules::from_network(&self.network),
            ca: Arc::new(ca),
            roots: self.roots,
            secrets,
            transparent: self.network.redirects(),
        })
    }
}

/// Non-secret bytes (certificates) as base64 text.
pub(crate) mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(data: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        STANDARD.decode(text.as_bytes()).map_err(|e| de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// Secret bytes as base64 text: encoded into a buffer that is overwritten
/// after use, decoded straight from the (overwritten) input buffer.
pub(crate) mod secret_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserializer, Serializer, de};
    use zeroize::Zeroizing;

    pub fn serialize<S: Serializer>(data: &Zeroizing<Vec<u8>>, serializer: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(STANDARD.encode(data.as_slice()));
        serializer.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Zeroizing<Vec<u8>>, D::Error> {
        deserializer.deserialize_str(SecretVisitor)
    }

    struct SecretVisitor;

    impl de::Visitor<'_> for SecretVisitor {
        type Value = Zeroizing<Vec<u8>>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("base64 text")
        }

        // Base64 has no JSON escapes, so serde_json hands over a slice of
        // its input rather than a copy.
        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            let mut out = Zeroizing::new(Vec::with_capacity(text.len() / 4 * 3 + 3));
            STANDARD.decode_vec(text, &mut out).map_err(|_| E::custom("invalid base64 in a secret"))?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn setup() -> ProxySetup {
        let mut network = airlock_policy::Policy::builtin("dev").unwrap().network;
        network.egress = airlock_policy::Egress::Proxy;
        network.allow = vec![airlock_policy::HostPattern::parse("api.example.com:443").unwrap()];
        let ca = SandboxCa::generate("wire").unwrap();
        ProxySetup {
            run_as: Some((999_000_001, 999_000_001)),
            policy_name: "wire-test".into(),
            network,
            ca: ca.material(),
            secrets: vec![SecretSetup {
                name: "TOKEN".into(),
                placeholder: "airlock-placeholder-TOKEN-00".into(),
                value: Zeroizing::new(b"s3cr3t-v4lue".to_vec()),
                hosts: vec!["api.example.com".into()],
            }],
            roots: RootSources {
                host: Some(crate::ca::PemFile { path: "/etc/ssl/b.pem".into(), pem: b"HOST PEM".to_vec() }),
                extra: vec![crate::ca::PemFile { path: "/etc/x.pem".into(), pem: b"PEM".to_vec() }],
                searched: "/etc/ssl/certs/ca-certificates.crt".into(),
            },
        }
    }

    #[test]
    fn the_setup_crosses_a_pipe_whole_and_becomes_a_configuration() {
        let mut wire = Vec::new();
        write_setup(&mut wire, &setup()).unwrap();
        let back = read_setup(&mut wire.as_slice()).unwrap();
        assert_eq!(back.run_as, Some((999_000_001, 999_000_001)));
        assert_eq!(back.secrets[0].value.as_slice(), b"s3cr3t-v4lue");
        assert_eq!(back.roots, setup().roots);
        assert!(!format!("{back:?}").contains("s3cr3t"), "Debug shows a secret value");
        let config = back.into_config().unwrap();
        assert_eq!(config.secrets[0].value.expose(), b"s3cr3t-v4lue");
        assert_eq!(config.secrets[0].hosts, vec!["api.example.com".to_string()]);
        assert_eq!(config.policy_name, "wire-test");
        assert!(config.rules.decide_target("api.example.com", 443).is_allow());
        assert!(!config.rules.decide_target("api.example.com", 80).is_allow());
        assert!(!config.rules.decide_target("other.example.com", 443).is_allow());
    }

    #[test]
    fn cut_or_oversized_setups_are_refused() {
        let mut wire = Vec::new();
        write_setup(&mut wire, &setup()).unwrap();
        let err = read_setup(&mut &wire[..wire.len() - 1]).unwrap_err();
        assert!(matches!(err, SetupError::Roots { named: 2, sent: 1 }), "{err}");
        let err = read_setup(&mut &wire[..20]).unwrap_err();
        assert!(matches!(err, SetupError::Io(_)), "{err}");
        // Cut after the JSON: the root files it names are missing.
        let json_len = u64::from_be_bytes(wire[..8].try_into().unwrap()) as usize;
        let err = read_setup(&mut &wire[..8 + json_len]).unwrap_err();
        assert!(matches!(err, SetupError::Roots { named: 2, sent: 0 }), "{err}");
        let huge = (MAX_SETUP + 1).to_be_bytes();
        assert!(matches!(read_setup(&mut &huge[..]), Err(SetupError::TooLarge(_))));
    }
}
