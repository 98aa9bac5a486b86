//! The optional TCP listener: the same router as the Unix socket, over TLS,
//! for callers on other hosts. TCP has no peer credentials, so every request
//! carries `Authorization: Bearer TOKEN`; the daemon hashes the token
//! (SHA-256) and finds the tenant's uid in the tokens file, which holds
//! only digests:
//!
//! ```text
//! # uid  sha256-hex-of-token                                               comment
//! 1000   9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  alice's CI
//! ```
//!
//! That uid is then the caller, exactly as a Unix-socket peer's would be.
//! The file must be private to the daemon's user (or root); a listener
//! without TLS or without tokens is refused at start. `SIGHUP` re-reads it:
//! a valid file replaces the whole set at once (a removed line revokes its
//! token for every request from then on, on open connections too), and an
//! invalid one is logged and ignored, the previous set staying in force.

use std::io::BufReader;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::app::App;
use crate::auth::Peer;
use crate::error::{ApiError, DaemonError};

/// The TLS handshake must finish within this time.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What `airlock daemon --listen` was given: all of it is required.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// Address and port to listen on, e.g. `0.0.0.0:8443`.
    pub listen: SocketAddr,
    /// PEM certificate chain presented to clients.
    pub cert: PathBuf,
    /// PEM private key of the certificate (not readable by others).
    pub key: PathBuf,
    /// The tokens file: `<uid> <sha256-hex> [comment]` per line.
    pub tokens: PathBuf,
}

/// Why the TCP listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("it is accessible to other users (mode {mode:o}); it holds secrets: run `chmod 600` on it")]
    NotPrivate { mode: u32 },
    #[error("it is owned by uid {owner}, not by the daemon's user or root")]
    WrongOwner { owner: u32 },
    #[error("line {line}: {reason}")]
    BadLine { line: usize, reason: String },
    #[error("it has no tokens; add lines `<uid> <sha256-hex-of-token>` (printf %s TOKEN | sha256sum)")]
    NoTokens,
    #[error("it holds no PEM certificate")]
    NoCertificate,
    #[error("it holds no PEM private key")]
    NoKey,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Tls(#[from] rustls::Error),
}

pub(crate) fn failed(action: &'static str, path: &Path) -> impl FnOnce(TcpError) -> DaemonError {
    let path = path.to_path_buf();
    move |e| DaemonError::Io { action, path, source: std::io::Error::other(e) }
}

/// The tenants: SHA-256 digests of their tokens and the uid each acts as.
#[derive(Debug)]
pub(crate) struct Tokens {
    entries: Vec<([u8; 32], u32)>,
}

impl Tokens {
    /// Reads the tokens file, refusing one that others could read or write.
    fn load(path: &Path) -> Result<Tokens, TcpError> {
        check_private(path)?;
        Tokens::parse(&std::fs::read_to_string(path)?)
    }

    fn parse(text: &str) -> Result<Tokens, TcpError> {
        let mut entries: Vec<([u8; 32], u32)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| TcpError::BadLine { line: n + 1, reason: reason.to_owned() };
            let mut fields = line.split_whitespace();
            let uid = fields
                .next()
                .and_then(|f| f.parse::<u32>().ok())
                .ok_or_else(|| bad("the first field must be a numeric uid"))?;
            let digest = fields
                .next()
                .and_then(parse_digest)
                .ok_or_else(|| bad("the second field must be 64 hex digits (the token's SHA-256)"))?;
            if entries.iter().any(|(d, _)| *d == digest) {
                return Err(bad("this digest is listed twice"));
            }
            entries.push((digest, uid));
        }
        if entries.is_empty() {
            return Err(TcpError::NoTokens);
        }
        Ok(Tokens { entries })
    }

    /// The uid whose token this is. Every entry is compared, each in
    /// constant time, so timing tells nothing about which digest is close.
    pub(crate) fn lookup(&self, token: &str) -> Option<u32> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut found = None;
        for (known, uid) in &self.entries {
            if constant_time_eq(known, digest.as_ref()) {
                found = Some(*uid);
            }
        }
        found
    }
}

/// The tokens in force and the file they came from. Each request takes the
/// current set; a reload swaps in a new one whole, so a request sees either
/// the old set or the new one, never a mix.
#[derive(Debug)]
pub(crate) struct TokenStore {
    path: PathBuf,
    current: RwLock<Arc<Tokens>>,
}

impl TokenStore {
    pub(crate) fn load(path: &Path) -> Result<TokenStore, TcpError> {
        Ok(TokenStore { path: path.to_path_buf(), current: RwLock::new(Arc::new(Tokens::load(path)?)) })
    }

    /// The tokens file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The set in force now.
    pub(crate) fn current(&self) -> Arc<Tokens> {
        // A writer cannot panic while holding the lock (it only assigns),
        // but a poisoned lock still holds a complete set.
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Re-reads the file: on success its tokens replace the current set;
    /// on failure the current set stays and the error says what is wrong.
    /// Returns the number of tokens now in force.
    pub(crate) fn reload(&self) -> Result<usize, TcpError> {
        let tokens = Tokens::load(&self.path)?;
        let count = tokens.entries.len();
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(tokens);
        Ok(count)
    }

    /// [`TokenStore::reload`] with the outcome logged, for `SIGHUP`.
    pub(crate) fn reload_and_log(&self) {
        match self.reload() {
            Ok(count) => tracing::info!(
                path = %self.path.display(),
                tokens = count,
                "SIGHUP: reloaded the tokens file; the new set is in force"
            ),
            Err(e) => tracing::error!(
                path = %self.path.display(),
                error = %e,
                "SIGHUP: the tokens file is not usable; the previous tokens stay in force \
                 (fix the file and send SIGHUP again)"
            ),
        }
    }
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A secret file must be the daemon user's (or root's) and closed to others.
fn check_private(path: &Path) -> Result<(), TcpError> {
    let meta = std::fs::metadata(path)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TcpError::NotPrivate { mode });
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(TcpError::WrongOwner { owner: meta.uid() });
    }
    Ok(())
}

pub(crate) fn tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, DaemonError> {
    let certs = (|| {
        let mut reader = BufReader::new(std::fs::File::open(cert)?);
        let certs = rustls_pemfile::certs(&mut reader).collect::<Result<Vec<_>, _>>()?;
        if certs.is_empty() {
            return Err(TcpError::NoCertificate);
        }
        Ok(certs)
    })()
    .map_err(failed("load the TLS certificate from", cert))?;
    let private = (|| {
        check_private(key)?;
        let mut reader = BufReader::new(std::fs::File::open(key)?);
        rustls_pemfile::private_key(&mut reader)?.ok_or(TcpError::NoKey)
    })()
    .map_err(failed("load the TLS key from", key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, private))
        .map_err(|e| failed("use the TLS certificate and key", cert)(TcpError::Tls(e)))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The bound TCP listener, ready to serve.
pub(crate) struct TcpServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    pub(crate) tokens: Arc<TokenStore>,
    pub(crate) local: SocketAddr,
}

/// Loads TLS material and tokens and binds the address: every mistake is
/// reported here, before the daemon announces itself.
pub(crate) async fn bind(opts: &TcpOptions) -> Result<TcpServer, DaemonError> {
    let config = tls_config(&opts.cert, &opts.key)?;
    let tokens = TokenStore::load(&opts.tokens).map_err(failed("use the tokens file", &opts.tokens))?;
    let listener = TcpListener::bind(opts.listen).await.map_err(|source| DaemonError::Io {
        action: "listen on",
        path: PathBuf::from(opts.listen.to_string()),
        source,
    })?;
    let local = listener.local_addr().unwrap_or(opts.listen);
    Ok(TcpServer { listener, acceptor: TlsAcceptor::from(Arc::new(config)), tokens: Arc::new(tokens), local })
}

/// Accepts TLS connections until the task is aborted.
pub(crate) async fn accept_loop(
    server: TcpServer,
    app: Arc<App>,
    max_connections: usize,
    header_timeout: Duration,
) {
    let router = crate::routes::router(app.clone());
    accept_each(&server.listener, max_connections, "TCP", |stream, remote| {
        let acceptor = server.acceptor.clone();
        let tokens = server.tokens.clone();
        let (router, app) = (router.clone(), app.clone());
        async move { serve_connection(stream, remote, acceptor, tokens, router, app, header_timeout).await }
    })
    .await
}

/// The accept loop of a TCP listener (the API's and the E2B one): at most
/// `max_connections` served at once, each by `serve` in a task of its own;
/// a failed accept (descriptors exhausted) is retried after a pause.
/// Every connection gets TCP_NODELAY: streamed answers (exec output, a
/// process's events) go out in small writes, and with Nagle's algorithm
/// each one after the first waits for the client's delayed ACK, about
/// 40 ms on Linux.
pub(crate) async fn accept_each<F, Fut>(listener: &TcpListener, max_connections: usize, what: &str, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "{what} accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(%remote, error = %e, "{what} connection: cannot set TCP_NODELAY");
        }
        let served = serve(stream, remote);
        tokio::spawn(async move {
            served.await;
            drop(permit);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    tokens: Arc<TokenStore>,
    router: axum::Router,
    app: Arc<App>,
    header_timeout: Duration,
) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::warn!(%remote, error = %e, "denied: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, "denied: TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let router = router.clone();
        let app = app.clone();
        let tokens = tokens.clone();
        async move {
            let admitted = authenticate(&tokens.current(), request.headers(), remote)
                .and_then(|peer| crate::serve::admit(Some(peer), &app));
            let caller = admitted.as_ref().ok().map(|peer| peer.uid);
            let response = match admitted {
                Ok(peer) => {
                    request.extensions_mut().insert(peer);
                    match router.oneshot(request.map(Body::new)).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    }
                }
                Err(e) => {
                    let mut response = crate::serve::refusal(&e);
                    if e.status == StatusCode::UNAUTHORIZED {
                        response.headers_mut().insert(
                            header::WWW_AUTHENTICATE,
                            header::HeaderValue::from_static("Bearer realm=\"airlock\""),
                        );
                    }
                    response
                }
            };
            app.metrics.count_response(caller, response.status());
            Ok::<Response<Body>, std::convert::Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).max_buf_size(64 * 1024);
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).with_upgrades().await {
        tracing::debug!(%remote, error = %e, "TCP connection ended with an error");
    }
}

/// The caller named by the request's bearer token. The token itself is
/// never logged.
fn authenticate(tokens: &Tokens, headers: &HeaderMap, remote: SocketAddr) -> Result<Peer, ApiError> {
    let unauthorized = |reason: &'static str, message: &str| {
        tracing::warn!(%remote, reason, "denied: TCP request without a valid bearer token");
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized(
            "no Authorization header",
            "this listener needs `Authorization: Bearer TOKEN`",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty());
    let Some(token) = token else {
        return Err(unauthorized("not a bearer token", "this listener needs `Authorization: Bearer TOKEN`"));
    };
    let Some(uid) = tokens.lookup(token) else {
        return Err(unauthorized("unknown token", "the bearer token is not valid"));
    };
    Ok(Peer { uid, gid: primary_gid(uid), pid: None })
}

/// The uid's primary group from /etc/passwd; for a uid with no entry, a gid
/// that matches no file's group.
pub(crate) fn primary_gid(uid: u32) -> u32 {
    std::fs::read_to_string("/etc/passwd").ok().and_then(|text| gid_in(&text, uid)).unwrap_or(u32::MAX)
}

fn gid_in(etc_passwd: &str, uid: u32) -> Option<u32> {
    etc_passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let found = fields.nth(2)?.parse::<u32>().ok()?;
        let gid = fields.next()?.parse::<u32>().ok()?;
        (found == uid).then_some(gid)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    // printf %s test | sha256sum
    const TEST_DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn remote() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    #[test]
    fn tokens_parse_and_look_up_by_digest() {
        let tokens =
            Tokens::parse(&format!("# tenants\n\n1000 {TEST_DIGEST} alice's CI\n0 {}\n", "ab".repeat(32)))
                .unwrap();
        assert_eq!(tokens.lookup("test"), Some(1000));
        assert_eq!(tokens.lookup("tes"), None);
        assert_eq!(tokens.lookup(""), None);
    }

    #[test]
    fn bad_token_files_are_refused() {
        for text in [
            "",
            "# only a comment\n",
            "alice abc\n",
            "1000 abc\n",
            &format!("1 {TEST_DIGEST}\n2 {TEST_DIGEST}\n"),
        ] {
            assert!(Tokens::parse(text).is_err(), "{text:?}");
        }
        assert!(parse_digest(&"zz".repeat(32)).is_none());
        assert!(parse_digest(&"é".repeat(32)).is_none());
    }

    #[test]
    fn a_readable_tokens_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("0 {TEST_DIGEST}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Tokens::load(&path), Err(TcpError::NotPrivate { mode: 0o644 })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Tokens::load(&path).unwrap().lookup("test"), Some(0));
    }

    #[test]
    fn reload_replaces_the_tokens_or_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("1000 {TEST_DIGEST}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let store = TokenStore::load(&path).unwrap();
        let before = store.current();
        assert_eq!(before.lookup("test"), Some(1000));

        // An invalid file (or one others can read) changes nothing.
        std::fs::write(&path, "1000 not-a-digest\n").unwrap();
        assert!(matches!(store.reload(), Err(TcpError::BadLine { line: 1, .. })));
        assert_eq!(store.current().lookup("test"), Some(1000));
        std::fs::write(&path, "").unwrap();
        assert!(matches!(store.reload(), Err(TcpError::NoTokens)));
        std::fs::write(&path, format!("7 {TEST_DIGEST}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(store.reload(), Err(TcpError::NotPrivate { .. })));
        assert_eq!(store.current().lookup("test"), Some(1000));

        // A valid one replaces the set; a set already taken is unchanged.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, format!("0 {}\n", "ab".repeat(32))).unwrap();
        assert_eq!(store.reload().unwrap(), 1);
        assert_eq!(store.current().lookup("test"), None);
        assert_eq!(before.lookup("test"), Some(1000));
    }

    #[test]
    fn bearer_header_decides_the_caller() {
        let tokens = Tokens::parse(&format!("1000 {TEST_DIGEST}\n")).unwrap();
        let mut headers = HeaderMap::new();
        let err = authenticate(&tokens, &headers, remote()).unwrap_err();
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
        headers.insert(header::AUTHORIZATION, "Basic dGVzdA==".parse().unwrap());
        assert!(authenticate(&tokens, &headers, remote()).is_err());
        headers.insert(header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert!(authenticate(&tokens, &headers, remote()).is_err());
        headers.insert(header::AUTHORIZATION, "bearer test".parse().unwrap());
        let peer = authenticate(&tokens, &headers, remote()).unwrap();
        assert_eq!((peer.uid, peer.pid), (1000, None));
    }

    #[test]
    fn primary_group_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nbad\nalice:x:1000:1001::/home/alice:/bin/sh\n";
        assert_eq!(gid_in(passwd, 0), Some(0));
        assert_eq!(gid_in(passwd, 1000), Some(1001));
        assert_eq!(gid_in(passwd, 7), None);
    }
}
