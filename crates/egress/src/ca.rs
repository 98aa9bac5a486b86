//! The per-sandbox certificate authority, used where the policy needs to see
//! inside a TLS connection (method/path rules, secret injection).
//!
//! Each sandbox gets a CA generated for it alone: a fresh ECDSA P-256 key, a
//! certificate valid for a week, and leaf certificates issued on demand for
//! the hosts the sandbox connects to. The supervisor generates it and hands
//! it to the proxy process ([`CaMaterial`]), whose memory is the only place
//! it stays; it is never written anywhere. The CA certificate (never the
//! key) goes into the sandbox's trust store.
//!
//! Upstream connections are verified against the host's own roots plus the
//! roots the policy adds, read by the supervisor ([`RootSources`]) because
//! the proxy's mount view has no certificate store; see
//! [`upstream_client_config_from`].
//!
//! Everything here uses rustls's ring provider explicitly, so nothing depends
//! on a process-wide default provider being installed.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::setup::{base64_bytes, secret_bytes};

/// Where the host's CA bundle is looked for, in order; the first that exists
/// is used. `SSL_CERT_FILE`, when set for the airlock process, comes first.
pub const HOST_BUNDLE_PATHS: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// How far before "now" certificates become valid, so that a guest clock a
/// little behind the host's still accepts them.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// How long a sandbox CA (and every leaf it issues) stays valid.
const LIFETIME: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Upper bound on cached leaf configurations per sandbox. A wildcard allow
/// entry lets a sandbox name any number of hosts; past this bound an
/// arbitrary entry is evicted (connections holding it keep their `Arc`).
const LEAF_CACHE_LIMIT: usize = 1024;

/// The only application protocol the intercepting proxy speaks.
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Errors from the sandbox CA and the TLS configurations built here.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot generate the certificate authority for sandbox {sandbox:?}: {source}")]
    Generate { sandbox: String, source: rcgen::Error },

    #[error(
        "the system clock ({secs_since_epoch}s since 1970) is outside the range a certificate can carry; \
         fix the host clock"
    )]
    Clock { secs_since_epoch: u64 },

    #[error("cannot issue a certificate for {host:?}: {reason}")]
    InvalidHost { host: String, reason: &'static str },

    #[error("cannot issue a certificate for {host}: {source}")]
    Leaf { host: String, source: rcgen::Error },

    #[error("cannot build the TLS configuration for {what}: {source}")]
    Tls { what: String, source: rustls::Error },

    #[error("cannot read the CA bundle {}: {source}", path.display())]
    ReadBundle { path: PathBuf, source: io::Error },

    #[error("the sandbox's CA key handed to the proxy does not parse: {0}")]
    Key(#[source] rcgen::Error),

    #[error("{} contains no PEM certificate (expected a -----BEGIN CERTIFICATE----- block)", path.display())]
    EmptyBundle { path: PathBuf },

    #[error("{}: certificate #{index} cannot be used as a trusted root: {source}", path.display())]
    BadRoot { path: PathBuf, index: usize, source: rustls::Error },

    #[error(
        "no trusted roots for verifying upstream TLS: none of {searched} exists and the policy adds no CA \
         file; install the host's CA bundle (the ca-certificates package) or add roots to the policy"
    )]
    NoRoots { searched: String },
}

/// A certificate authority that exists for one sandbox only.
///
/// The key is generated in memory by [`SandboxCa::generate`] and never
/// written anywhere; dropping the value forgets it. Leaf configurations are
/// cached per host, so repeated connections to one host reuse one leaf.
pub struct SandboxCa {
    sandbox: String,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    leaves: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of every debug print.
        f.debug_struct("SandboxCa").field("sandbox", &self.sandbox).finish_non_exhaustive()
    }
}

impl SandboxCa {
    /// Generates a fresh CA for `sandbox_name`: a new ECDSA P-256 key, a
    /// self-signed certificate with CN `airlock sandbox <name> CA`, valid
    /// from one hour ago for seven days. Two calls never share a key.
    pub fn generate(sandbox_name: &str) -> Result<SandboxCa, CaError> {
        let generate_err = |source| CaError::Generate { sandbox: sandbox_name.to_owned(), source };

        // Whole seconds, as a certificate carries them, so that the proxy
        // process rebuilds exactly these parameters from [`CaMaterial`].
        let now = UNIX_EPOCH + Duration::from_secs(unix_secs(SystemTime::now()));
        let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
        let not_after = now.checked_add(LIFETIME).unwrap_or(now);

        let params = ca_params(sandbox_name, not_before, not_after)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_err)?;
        let cert = params.self_signed(&key).map_err(generate_err)?;
        let issuer = Issuer::new(params, key);

        Ok(SandboxCa {
            sandbox: sandbox_name.to_owned(),
            issuer,
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            not_before,
            not_after,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// What the proxy process needs to act as this CA, key included: the
    /// supervisor generates the CA and hands this over its setup channel.
    pub fn material(&self) -> CaMaterial {
        CaMaterial {
            sandbox: self.sandbox.clone(),
            not_before_unix: unix_secs(self.not_before),
            not_after_unix: unix_secs(self.not_after),
            cert_pem: self.cert_pem.clone(),
            cert_der: self.cert_der.to_vec(),
            key_pkcs8: Zeroizing::new(self.issuer.key().serialized_der().to_vec()),
        }
    }

    /// The CA again, from what [`SandboxCa::material`] gave: the same
    /// subject, validity and key, so its leaves chain to the certificate
    /// the sandbox trusts.
    pub fn from_material(material: &CaMaterial) -> Result<SandboxCa, CaError> {
        let not_before = UNIX_EPOCH + Duration::from_secs(material.not_before_unix);
        let not_after = UNIX_EPOCH + Duration::from_secs(material.not_after_unix);
        let params = ca_params(&material.sandbox, not_before, not_after)?;
        let key = KeyPair::try_from(material.key_pkcs8.as_slice()).map_err(CaError::Key)?;
        Ok(SandboxCa {
            sandbox: material.sandbox.clone(),
            issuer: Issuer::new(params, key),
            cert_pem: material.cert_pem.clone(),
            cert_der: CertificateDer::from(material.cert_der.clone()),
            not_before,
            not_after,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate in PEM form, for the sandbox's trust store.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA certificate in DER form.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A TLS server configuration presenting a leaf for `host` signed by this
    /// CA: a DNS name (case-insensitive, trailing dot ignored) or an IP
    /// literal (`[::1]` brackets accepted). ALPN offers http/1.1 only.
    /// Cached per host.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        let name = LeafName::parse(host)?;
        let key = name.canonical();
        if let Some(config) = self.lock_leaves().get(&key) {
            return Ok(Arc::clone(config));
        }

        // Issue outside the lock; a concurrent first connection to the same
        // host may issue twice, and the first one inserted wins.
        let config = Arc::new(self.issue(&name, &key)?);
        let mut leaves = self.lock_leaves();
        if !leaves.contains_key(&key) && leaves.len() >= LEAF_CACHE_LIMIT {
            let victim = leaves.keys().next().cloned();
            if let Some(victim) = victim {
                leaves.remove(&victim);
            }
        }
        Ok(Arc::clone(leaves.entry(key).or_insert(config)))
    }

    fn lock_leaves(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ServerConfig>>> {
        // The map holds only finished configurations, so a panic elsewhere
        // while it was locked cannot have left it half-updated.
        self.leaves.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn issue(&self, name: &LeafName, key: &str) -> Result<ServerConfig, CaError> {
        let leaf_err = |source| CaError::Leaf { host: key.to_owned(), source };

        let mut params = CertificateParams::default();
        set_validity(&mut params, self.not_before, self.not_after)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, key);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match name {
            LeafName::Dns(dns) => SanType::DnsName(Ia5String::try_from(dns.as_str()).map_err(leaf_err)?),
            LeafName::Ip(ip) => SanType::IpAddress(*ip),
        }];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;

        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(leaf_err)?;
        let leaf = params.signed_by(&leaf_key, &self.issuer).map_err(leaf_err)?;
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));

        let tls_err = |source| CaError::Tls { what: format!("the intercepted host {key}"), source };
        let mut config = ServerConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], private)
            .map_err(tls_err)?;
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        Ok(config)
    }
}

/// A sandbox CA as it travels from the supervisor to the proxy process.
/// The key is overwritten when this is dropped.
#[derive(Serialize, Deserialize)]
pub struct CaMaterial {
    pub sandbox: String,
    pub not_before_unix: u64,
    pub not_after_unix: u64,
    pub cert_pem: String,
    #[serde(with = "base64_bytes")]
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    #[serde(with = "secret_bytes")]
    pub key_pkcs8: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaMaterial").field("sandbox", &self.sandbox).finish_non_exhaustive()
    }
}

/// The CA certificate's parameters; a pure function of its inputs, so the
/// proxy process rebuilds the issuer the supervisor generated.
fn ca_params(
    sandbox_name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    set_validity(&mut params, not_before, not_after)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("airlock sandbox {sandbox_name} CA"));
    dn.push(DnType::OrganizationName, "airlock");
    params.distinguished_name = dn;
    // Path length 0: this CA signs leaves only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn unix_secs(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A PEM file's bytes, read on the host side, with its path for messages.
/// The bytes travel to the proxy process after the setup's JSON, not in it
/// (see `setup`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PemFile {
    pub path: PathBuf,
    #[serde(skip)]
    pub pem: Vec<u8>,
}

impl fmt::Debug for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemFile").field("path", &self.path).field("bytes", &self.pem.len()).finish()
    }
}

impl PemFile {
    fn read(path: &Path) -> Result<PemFile, CaError> {
        let pem =
            std::fs::read(path).map_err(|source| CaError::ReadBundle { path: path.to_path_buf(), source })?;
        Ok(PemFile { path: path.to_path_buf(), pem })
    }
}

/// The roots upstream TLS is verified against: the host's bundle (see
/// [`HOST_BUNDLE_PATHS`]) and the PEM files the policy adds, read by the
/// supervisor and handed to the proxy process as bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSources {
    pub host: Option<PemFile>,
    pub extra: Vec<PemFile>,
    /// Where the host bundle was looked for, for messages.
    pub searched: String,
}

impl RootSources {
    /// Reads the host's bundle (the first of [`HOST_BUNDLE_PATHS`] that
    /// exists, `SSL_CERT_FILE` first when set) and every extra root file.
    /// A policy's root file that cannot be read is an error naming it; the
    /// certificates are parsed when the proxy first needs them.
    pub fn read(extra_roots: &[PathBuf]) -> Result<RootSources, CaError> {
        RootSources::read_from(&host_bundle_candidates(), extra_roots)
    }

    /// The host bundle (if any), then the extra root files.
    pub fn files(&self) -> impl Iterator<Item = &PemFile> {
        self.host.iter().chain(&self.extra)
    }

    pub(crate) fn files_mut(&mut self) -> impl Iterator<Item = &mut PemFile> {
        self.host.iter_mut().chain(self.extra.iter_mut())
    }

    fn read_from(candidates: &[PathBuf], extra_roots: &[PathBuf]) -> Result<RootSources, CaError> {
        let host = find_host_bundle(candidates).map(|path| PemFile::read(&path)).transpose()?;
        let extra = extra_roots.iter().map(|path| PemFile::read(path)).collect::<Result<_, _>>()?;
        Ok(RootSources { host, extra, searched: display_paths(candidates) })
    }
}

/// The rustls client configuration for the proxy's upstream connections:
/// the host's roots plus the PEM root files the policy adds. ALPN offers
/// http/1.1 only.
///
/// Every extra root file must hold at least one usable certificate. A
/// missing host bundle is tolerated when extra roots are given; with
/// neither, this fails rather than trust nothing silently.
pub fn upstream_client_config_from(roots: &RootSources) -> Result<Arc<ClientConfig>, CaError> {
    client_config_with_roots(load_roots(roots)?)
}

/// [`upstream_client_config_from`] with the roots read from the host now.
pub fn upstream_client_config(extra_roots: &[PathBuf]) -> Result<Arc<ClientConfig>, CaError> {
    upstream_client_config_from(&RootSources::read(extra_roots)?)
}

/// A PEM bundle for inside the sandbox: the host's bundle followed by the
/// sandbox CA, so that tools reading one file trust both. Without a host
/// bundle, the CA alone. The host's bytes are passed on as they are (PEM
/// readers skip what lies outside the blocks): checking a few hundred KiB
/// as UTF-8 cost about 0.4 ms of every sandbox's start.
pub fn sandbox_trust_bundle_from(roots: &RootSources, ca_pem: &str) -> Vec<u8> {
    let host: &[u8] = match &roots.host {
        Some(host) => &host.pem,
        None => {
            tracing::warn!(
                searched = %roots.searched,
                "no host CA bundle found; the sandbox will trust only its own CA"
            );
            &[]
        }
    };
    let mut bundle = Vec::with_capacity(host.len() + ca_pem.len() + 2);
    bundle.extend_from_slice(host);
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(ca_pem.as_bytes());
    if !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle
}

/// [`sandbox_trust_bundle_from`] with the host's bundle read now.
pub fn sandbox_trust_bundle(ca_pem: &str) -> Result<Vec<u8>, CaError> {
    Ok(sandbox_trust_bundle_from(&RootSources::read(&[])?, ca_pem))
}

/// The ring crypto provider, passed explicitly to every config builder.
fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config_with_roots(roots: RootCertStore) -> Result<Arc<ClientConfig>, CaError> {
    let mut config = ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| CaError::Tls { what: "upstream connections".to_owned(), source })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// `SSL_CERT_FILE` (when set and non-empty) followed by [`HOST_BUNDLE_PATHS`].
fn host_bundle_candidates() -> Vec<PathBuf> {
    let mut candidates = Vec::with_capacity(HOST_BUNDLE_PATHS.len() + 1);
    if let Some(file) = std::env::var_os("SSL_CERT_FILE").filter(|f| !f.is_empty()) {
        candidates.push(PathBuf::from(file));
    }
    candidates.extend(HOST_BUNDLE_PATHS.iter().map(PathBuf::from));
    candidates
}

fn find_host_bundle(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|path| path.is_file()).cloned()
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Builds the upstream root store: the host bundle (unparseable entries
/// skipped, as distributions ship a few) and every certificate of every
/// extra file (strict: the policy named them, so a bad one is an error).
fn load_roots(sources: &RootSources) -> Result<RootCertStore, CaError> {
    let mut roots = RootCertStore::empty();

    match &sources.host {
        Some(host) => {
            let (certs, malformed) = pem_certs(host)?;
            let (added, ignored) = roots.add_parsable_certificates(certs);
            let bundle = host.path.display();
            tracing::debug!(%bundle, added, ignored, malformed, "loaded host CA bundle");
            if added == 0 {
                tracing::warn!(%bundle, "the host CA bundle holds no usable root");
            }
        }
        None => {
            if sources.extra.is_empty() {
                return Err(CaError::NoRoots { searched: sources.searched.clone() });
            }
            tracing::warn!(searched = %sources.searched, "no host CA bundle found");
        }
    }

    for file in &sources.extra {
        let (certs, malformed) = pem_certs(file)?;
        let path = &file.path;
        if malformed > 0 || certs.is_empty() {
            return Err(CaError::EmptyBundle { path: path.clone() });
        }
        for (index, cert) in certs.into_iter().enumerate() {
            roots.add(cert).map_err(|source| CaError::BadRoot { path: path.clone(), index, source })?;
        }
    }

    if roots.is_empty() {
        return Err(CaError::NoRoots { searched: sources.searched.clone() });
    }
    Ok(roots)
}

/// Every CERTIFICATE block of a PEM file's bytes; returns the certificates
/// and how many blocks could not be decoded.
fn pem_certs(file: &PemFile) -> Result<(Vec<CertificateDer<'static>>, usize), CaError> {
    let mut reader = BufReader::new(file.pem.as_slice());
    let mut certs = Vec::new();
    let mut malformed = 0;
    for item in rustls_pemfile::certs(&mut reader) {
        match item {
            Ok(cert) => certs.push(cert),
            Err(err) if err.kind() == io::ErrorKind::InvalidData => malformed += 1,
            Err(source) => return Err(CaError::ReadBundle { path: file.path.clone(), source }),
        }
    }
    Ok((certs, malformed))
}

/// Sets a certificate's validity window, refusing clocks outside what X.509
/// (and the date conversion, which would panic) can represent.
fn set_validity(params: &mut CertificateParams, from: SystemTime, to: SystemTime) -> Result<(), CaError> {
    // Year 9000: far inside GeneralizedTime and the conversion's range.
    const MAX_SECS: u64 = 221_845_392_000;
    for at in [from, to] {
        match at.duration_since(UNIX_EPOCH) {
            Ok(since) if since.as_secs() < MAX_SECS => {}
            Ok(since) => return Err(CaError::Clock { secs_since_epoch: since.as_secs() }),
            Err(_) => return Err(CaError::Clock { secs_since_epoch: 0 }),
        }
    }
    params.not_before = from.into();
    params.not_after = to.into();
    Ok(())
}

/// The name a leaf certificate is issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LeafName {
    Dns(String),
    Ip(IpAddr),
}

impl LeafName {
    fn parse(host: &str) -> Result<LeafName, CaError> {
        let invalid = |reason| CaError::InvalidHost { host: host.to_owned(), reason };
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(LeafName::Ip(ip));
        }
        let name = bare.strip_suffix('.').unwrap_or(bare).to_ascii_lowercase();
        if name.is_empty() {
            return Err(invalid("the host name is empty"));
        }
        if name.len() > 253 {
            return Err(invalid("the host name is longer than 253 characters"));
        }
        for label in name.split('.') {
            if label.is_empty() {
                return Err(invalid("the host name has an empty label"));
            }
            if label.len() > 63 {
                return Err(invalid("a label of the host name is longer than 63 characters"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(invalid("a label of the host name starts or ends with '-'"));
            }
            if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(invalid("the host name may hold only letters, digits, '-', '_' and '.'"));
            }
        }
        Ok(LeafName::Dns(name))
    }

    fn canonical(&self) -> String {
        match self {
            LeafName::Dns(name) => name.clone(),
            LeafName::Ip(ip) => ip.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    fn roots_from_pem(pem: &str) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    }

    fn client_trusting(pem: &str) -> Arc<ClientConfig> {
        client_config_with_roots(roots_from_pem(pem)).unwrap()
    }

    /// A full handshake over an in-memory pipe, then one exchange each way.
    /// Returns the negotiated ALPN protocol, or the client's error.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: &str,
    ) -> Result<Option<Vec<u8>>, String> {
        let (client_io, server_io) = tokio::io::duplex(16 * 1024);
        let server_side = async move {
            let mut tls = TlsAcceptor::from(server).accept(server_io).await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"ping");
            tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())
        };
        let name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
        let client_side = async move {
            let mut tls =
                TlsConnector::from(client).connect(name, client_io).await.map_err(|e| e.to_string())?;
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"pong");
            Ok::<_, String>(alpn)
        };
        let both = async { tokio::join!(server_side, client_side) };
        let (server_result, client_result) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .map_err(|_| "handshake hung".to_owned())?;
        let alpn = client_result?;
        server_result?;
        Ok(alpn)
    }

    #[tokio::test]
    async fn leaves_for_names_and_addresses_complete_a_handshake() {
        let ca = SandboxCa::generate("t1").unwrap();
        let client = client_trusting(&ca.cert_pem());

        let alpn = handshake(ca.server_config("api.example.com").unwrap(), client.clone(), "api.example.com")
            .await
            .unwrap();
        assert_eq!(alpn.as_deref(), Some(ALPN_HTTP11));

        handshake(ca.server_config("127.0.0.1").unwrap(), client.clone(), "127.0.0.1").await.unwrap();
        handshake(ca.server_config("[::1]").unwrap(), client, "::1").await.unwrap();
    }

    #[tokio::test]
    async fn a_leaf_is_refused_for_any_other_name() {
        let ca = SandboxCa::generate("t2").unwrap();
        let client = client_trusting(&ca.cert_pem());
        let server = ca.server_config("api.example.com").unwrap();

        let err = handshake(server.clone(), client.clone(), "other.example.com").await.unwrap_err();
        assert!(err.contains("not valid for name") || err.contains("NotValidForName"), "{err}");
        handshake(server, client.clone(), "example.com").await.unwrap_err();
        handshake(ca.server_config("127.0.0.1").unwrap(), client, "127.0.0.2").await.unwrap_err();
    }

    #[tokio::test]
    async fn another_sandboxes_ca_is_not_trusted() {
        let ca = SandboxCa::generate("same-name").unwrap();
        let other = SandboxCa::generate("same-name").unwrap();
        assert_ne!(ca.cert_pem(), other.cert_pem());
        assert_ne!(ca.cert_der(), other.cert_der());

        let client_of_other = client_trusting(&other.cert_pem());
        let err = handshake(ca.server_config("api.example.com").unwrap(), client_of_other, "api.example.com")
            .await
            .unwrap_err();
        // Same sandbox name, same subject: found as issuer, refused by signature.
        assert!(err.contains("invalid peer certificate"), "{err}");
    }

    #[test]
    fn ca_certificate_names_the_sandbox() {
        let ca = SandboxCa::generate("build-42").unwrap();
        let cn = b"airlock sandbox build-42 CA";
        assert!(ca.cert_der().windows(cn.len()).any(|w| w == cn));
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    #[test]
    fn leaf_configs_are_cached_per_normalised_host() {
        let ca = SandboxCa::generate("t3").unwrap();
        let first = ca.server_config("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&first, &ca.server_config("api.example.com").unwrap()));
        assert!(Arc::ptr_eq(&first, &ca.server_config("API.Example.com.").unwrap()));
        assert!(!Arc::ptr_eq(&first, &ca.server_config("www.example.com").unwrap()));
        assert_eq!(first.alpn_protocols, vec![ALPN_HTTP11.to_vec()]);
    }

    #[test]
    fn hosts_that_are_not_names_are_refused() {
        let ca = SandboxCa::generate("t4").unwrap();
        for bad in ["", ".", "a..example.com", "*.example.com", "-x.example.com", "a b.example.com", "x/y"] {
            let err = ca.server_config(bad).unwrap_err();
            assert!(matches!(err, CaError::InvalidHost { .. }), "{bad:?}: {err:?}");
        }
        let long = format!("{}.example.com", "a".repeat(64));
        assert!(matches!(ca.server_config(&long), Err(CaError::InvalidHost { .. })));
    }

    fn default_candidates() -> Vec<PathBuf> {
        HOST_BUNDLE_PATHS.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn host_bundle_provides_roots() {
        let candidates = default_candidates();
        if find_host_bundle(&candidates).is_none() {
            eprintln!("no host CA bundle at {}; skipping", display_paths(&candidates));
            return;
        }
        let roots = load_roots(&RootSources::read_from(&candidates, &[]).unwrap()).unwrap();
        assert!(!roots.is_empty());
        upstream_client_config(&[]).unwrap();
    }

    /// An independent test CA (as a policy would add) and a server whose
    /// leaf it signed.
    fn test_ca_and_server(host: &str) -> (String, Arc<ServerConfig>) {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        ca_params.distinguished_name.push(DnType::CommonName, "test upstream CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf =
            CertificateParams::new(vec![host.to_owned()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
        let server = ServerConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
        (ca_cert.pem(), Arc::new(server))
    }

    #[tokio::test]
    async fn extra_root_files_are_trusted_upstream() {
        let (ca_pem, server) = test_ca_and_server("upstream.example.net");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extra-ca.pem");
        std::fs::write(&path, &ca_pem).unwrap();

        // With the host bundle (if any) as in production…
        if find_host_bundle(&host_bundle_candidates()).is_some() {
            let client = upstream_client_config(std::slice::from_ref(&path)).unwrap();
            let alpn = handshake(server.clone(), client, "upstream.example.net").await.unwrap();
            assert_eq!(alpn, None, "the test server offers no ALPN");
        }

        // …and with the extra root alone.
        let missing = vec![dir.path().join("no-bundle.pem")];
        let roots =
            load_roots(&RootSources::read_from(&missing, std::slice::from_ref(&path)).unwrap()).unwrap();
        assert_eq!(roots.len(), 1);
        let client = client_config_with_roots(roots).unwrap();
        handshake(server.clone(), client.clone(), "upstream.example.net").await.unwrap();
        handshake(server, client, "elsewhere.example.net").await.unwrap_err();
    }

    #[test]
    fn bad_root_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let none = vec![dir.path().join("no-bundle.pem")];

        let load = |extra: &PathBuf| load_roots(&RootSources::read_from(&none, std::slice::from_ref(extra))?);
        let err = load_roots(&RootSources::read_from(&none, &[]).unwrap()).unwrap_err();
        assert!(matches!(err, CaError::NoRoots { .. }), "{err:?}");

        // Read on the host side: a missing file is an error at once.
        let absent = dir.path().join("absent.pem");
        let err = RootSources::read_from(&none, std::slice::from_ref(&absent)).unwrap_err();
        assert!(matches!(err, CaError::ReadBundle { .. }) && err.to_string().contains("absent.pem"), "{err}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let err = load(&garbage).unwrap_err();
        assert!(
            matches!(err, CaError::EmptyBundle { .. }) && err.to_string().contains("garbage.pem"),
            "{err}"
        );

        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n").unwrap();
        assert!(load(&broken).is_err());
    }

    /// The proxy process rebuilds the CA from what the supervisor sent:
    /// its leaves chain to the certificate the sandbox trusts.
    #[tokio::test]
    async fn a_ca_rebuilt_from_its_material_issues_leaves_the_sandbox_trusts() {
        let ca = SandboxCa::generate("handed-over").unwrap();
        let material = ca.material();
        assert!(!format!("{material:?}").contains(&format!("{:?}", &material.key_pkcs8[..8])));
        let json = serde_json::to_string(&material).unwrap();
        let back: CaMaterial = serde_json::from_str(&json).unwrap();
        let rebuilt = SandboxCa::from_material(&back).unwrap();
        assert_eq!(rebuilt.cert_der(), ca.cert_der());
        assert_eq!(rebuilt.cert_pem(), ca.cert_pem());
        let client = client_trusting(&ca.cert_pem());
        handshake(rebuilt.server_config("api.example.com").unwrap(), client.clone(), "api.example.com")
            .await
            .unwrap();
        // Another sandbox's material does not pass for this one.
        let other =
            SandboxCa::from_material(&SandboxCa::generate("handed-over").unwrap().material()).unwrap();
        handshake(other.server_config("api.example.com").unwrap(), client, "api.example.com")
            .await
            .unwrap_err();

        let mut broken = ca.material();
        broken.key_pkcs8 = Zeroizing::new(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(SandboxCa::from_material(&broken), Err(CaError::Key(_))));
    }

    #[test]
    fn trust_bundle_keeps_the_hosts_bytes_as_they_are_and_ends_each_part_with_a_newline() {
        // A comment in Latin-1 outside the PEM blocks, no final newline.
        let host = b"# Zertifikat f\xfcr Test\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"
            .to_vec();
        let roots = RootSources {
            host: Some(PemFile { path: "/etc/ssl/h.pem".into(), pem: host.clone() }),
            extra: Vec::new(),
            searched: "/etc/ssl/h.pem".into(),
        };
        let bundle = sandbox_trust_bundle_from(&roots, "CA PEM");
        assert_eq!(bundle, [host.as_slice(), b"\nCA PEM\n"].concat());
        let alone = RootSources { host: None, ..roots };
        assert_eq!(sandbox_trust_bundle_from(&alone, "CA PEM\n"), b"CA PEM\n");
    }

    #[test]
    fn trust_bundle_ends_with_the_sandbox_ca() {
        let ca = SandboxCa::generate("t5").unwrap();
        let bundle = sandbox_trust_bundle(&ca.cert_pem()).unwrap();
        let bundle = String::from_utf8(bundle).unwrap();
        assert!(bundle.ends_with(&ca.cert_pem()) || bundle.ends_with(&format!("{}\n", ca.cert_pem())));
        if let Some(host) = find_host_bundle(&host_bundle_candidates()) {
            let host = std::fs::read_to_string(host).unwrap();
            assert!(bundle.starts_with(host.trim_end()));
            assert!(roots_from_pem(&bundle).len() > 1);
        }
    }
}
