//! The E2B-compatible API (`airlock daemon --e2b-listen ADDR:PORT`): one
//! listener serving E2B's control plane and every sandbox's in-sandbox API
//! ("envd"), so that E2B's own SDKs, unmodified, drive airlock sandboxes
//! when `E2B_API_URL` and `E2B_SANDBOX_URL` both name it.
//!
//! ```text
//! mod        listener (plain HTTP on loopback only, else TLS), callers, the one dispatch
//! access     envd access tokens: issued per sandbox, stored hashed, checked per request
//! control    /sandboxes, /v2/sandboxes: create, connect, list, info, timeout, kill, metrics
//! connect    the Connect protocol's JSON codec: unary bodies, stream envelopes, errors
//! process    process.Process: start, connect, list, input, signals, pty
//! filesystem filesystem.Filesystem: stat, list, mkdir, move, remove, watch
//! files      envd's plain HTTP: GET/POST /files, GET /health
//! port       any other port of a sandbox (`get_host`): HTTP relayed into it
//! ```
//!
//! Every operation is one of the daemon's own: a sandbox is created by
//! `api::sandboxes::create_sandbox`, a process runs through `api::exec::run`
//! and a file operation through `runtime::files`, so tenancy, audit, limits
//! and egress policy are exactly those of the native API. Callers are
//! named by the same tokens file as `--listen`: the control plane's
//! `X-API-KEY` is a token and acts as its uid; envd requests carry the
//! sandbox's own access token (`X-Access-Token`), issued when it was
//! created or connected to, and act as the sandbox's owner.

mod access;
mod connect;
mod control;
mod files;
mod filesystem;
mod port;
mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::app::App;
use crate::auth::Peer;
use crate::error::{ApiError, DaemonError};
use crate::tcp::TokenStore;

/// The port E2B's SDKs name for envd (`E2b-Sandbox-Port`).
pub(crate) const ENVD_PORT: u16 = 49983;
/// The envd version the daemon answers with: the SDKs enable features by
/// it (`envd/versions.py`), and everything up to this one is served:
/// recursive watch, stdin, the default user, close-stdin, octet-stream
/// upload. File metadata (0.6.2) and watch entries (0.6.3) are not.
pub(crate) const ENVD_VERSION: &str = "0.5.7";

/// What `airlock daemon --e2b-listen` was given.
#[derive(Debug, Clone)]
pub struct E2bOptions {
    /// Address and port, e.g. `127.0.0.1:3000`.
    pub listen: SocketAddr,
    /// The tokens file (the format of `--listen`'s).
    pub tokens: PathBuf,
    /// Certificate and key: required unless `listen` is a loopback address.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// The bound listener, ready to serve.
pub(crate) struct E2bServer {
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    pub(crate) tokens: Arc<TokenStore>,
    pub(crate) local: SocketAddr,
}

impl E2bServer {
    pub(crate) fn tls(&self) -> bool {
        self.acceptor.is_some()
    }
}

/// Checks the options, loads TLS material and tokens (sharing `--listen`'s
/// store when it reads the same file) and binds: every mistake is reported
/// before the daemon announces itself.
pub(crate) async fn bind(
    opts: &E2bOptions,
    shared: Option<Arc<TokenStore>>,
) -> Result<E2bServer, DaemonError> {
    if opts.tls.is_none() && !opts.listen.ip().is_loopback() {
        return Err(DaemonError::E2bNeedsTls(opts.listen));
    }
    let acceptor = match &opts.tls {
        Some((cert, key)) => Some(TlsAcceptor::from(Arc::new(crate::tcp::tls_config(cert, key)?))),
        None => None,
    };
    let tokens = match shared.filter(|store| same_file(store.path(), &opts.tokens)) {
        Some(store) => store,
        None => Arc::new(
            TokenStore::load(&opts.tokens)
                .map_err(crate::tcp::failed("use the tokens file", &opts.tokens))?,
        ),
    };
    let listener = TcpListener::bind(opts.listen).await.map_err(|source| DaemonError::Io {
        action: "listen on",
        path: PathBuf::from(opts.listen.to_string()),
        source,
    })?;
    let local = listener.local_addr().unwrap_or(opts.listen);
    Ok(E2bServer { listener, acceptor, tokens, local })
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// What every E2B handler shares.
pub(crate) struct E2b {
    pub(crate) app: Arc<App>,
    tokens: Arc<TokenStore>,
    pub(crate) processes: process::Table,
    pub(crate) watchers: filesystem::Watchers,
}

/// Accepts connections until the task is aborted.
pub(crate) async fn accept_loop(
    server: E2bServer,
    app: Arc<App>,
    max_connections: usize,
    header_timeout: Duration,
) {
    let state = Arc::new(E2b {
        app,
        tokens: server.tokens.clone(),
        processes: process::Table::default(),
        watchers: filesystem::Watchers::default(),
    });
    let routers =
        Arc::new(Routers { control: control::router(state.clone()), envd: envd_router(state.clone()) });
    crate::tcp::accept_each(&server.listener, max_connections, "E2B", |stream, remote| {
        let acceptor = server.acceptor.clone();
        let (state, routers) = (state.clone(), routers.clone());
        async move {
            match acceptor {
                None => serve_connection(stream, remote, state, routers, header_timeout).await,
                Some(acceptor) => {
                    match tokio::time::timeout(crate::tcp::HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_connection(tls, remote, state, routers, header_timeout).await,
                        Ok(Err(e)) => tracing::warn!(%remote, error = %e, "denied: E2B TLS handshake failed"),
                        Err(_) => tracing::warn!(%remote, "denied: E2B TLS handshake timed out"),
                    }
                }
            }
        }
    })
    .await
}

struct Routers {
    control: axum::Router,
    envd: axum::Router,
}

fn envd_router(state: Arc<E2b>) -> axum::Router {
    let router = process::routes().merge(filesystem::routes()).merge(files::routes());
    router.fallback(connect::no_route).with_state(state)
}

async fn serve_connection<S>(
    stream: S,
    remote: SocketAddr,
    state: Arc<E2b>,
    routers: Arc<Routers>,
    header_timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (state, routers) = (state.clone(), routers.clone());
        async move {
            let request = request.map(Body::new);
            let response = dispatch(&state, &routers, request, remote).await;
            Ok::<Response<Body>, std::convert::Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).max_buf_size(64 * 1024);
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
        tracing::debug!(%remote, error = %e, "E2B connection ended with an error");
    }
}

/// Which part of the API a request is for. Requests are told apart here
/// and nowhere else.
#[derive(Debug, PartialEq, Eq)]
enum Destination {
    /// E2B's control plane: `X-API-KEY` names the caller.
    Control,
    /// A sandbox's envd, named by the SDK's `E2b-Sandbox-Id` header (or a
    /// Host for envd's port).
    Envd { sandbox_id: String },
    /// Another port of a sandbox: Host `PORT-ID.<domain>` (the SDKs'
    /// `get_host`), or `E2b-Sandbox-Port` other than envd's.
    Port { sandbox_id: String, port: u16 },
    /// An `E2b-Sandbox-Port` that is no port number.
    BadPort(String),
}

impl Destination {
    fn of(headers: &HeaderMap) -> Destination {
        let text = |v: &axum::http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
        if let Some(id) = headers.get("e2b-sandbox-id") {
            let sandbox_id = text(id);
            return match headers.get("e2b-sandbox-port").map(text) {
                None => Destination::Envd { sandbox_id },
                Some(port) => match port_number(&port) {
                    Some(ENVD_PORT) => Destination::Envd { sandbox_id },
                    Some(port) => Destination::Port { sandbox_id, port },
                    None => Destination::BadPort(port),
                },
            };
        }
        match headers.get(header::HOST).and_then(|h| h.to_str().ok()).and_then(sandbox_host) {
            Some((ENVD_PORT, sandbox_id)) => Destination::Envd { sandbox_id },
            Some((port, sandbox_id)) => Destination::Port { sandbox_id, port },
            None => Destination::Control,
        }
    }
}

/// The port and sandbox id of a Host `PORT-ID.<domain>`, as the SDKs'
/// `get_host` builds it; `None` for any other name (the listener's own).
fn sandbox_host(host: &str) -> Option<(u16, String)> {
    let (label, _domain) = host.split_once('.')?;
    let (port, id) = label.split_once('-')?;
    let port = port_number(port)?;
    (!id.is_empty()).then(|| (port, id.to_owned()))
}

/// 1-65535 in plain digits.
fn port_number(text: &str) -> Option<u16> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Routes a request and counts its answer in `/metrics` (a refused one
/// under no caller, as the other listeners count theirs).
async fn dispatch(
    state: &Arc<E2b>,
    routers: &Routers,
    request: Request<Body>,
    remote: SocketAddr,
) -> Response<Body> {
    let (caller, response) = route(state, routers, request, remote).await;
    state.app.metrics.count_response(caller, response.status());
    response
}

async fn route(
    state: &Arc<E2b>,
    routers: &Routers,
    mut request: Request<Body>,
    remote: SocketAddr,
) -> (Option<u32>, Response<Body>) {
    let (router, caller) = match Destination::of(request.headers()) {
        Destination::Control => match control_caller(state, request.headers(), remote) {
            Ok(peer) => {
                request.extensions_mut().insert(peer);
                (&routers.control, Some(peer.uid))
            }
            Err(e) => return (None, control::error_response(&e)),
        },
        Destination::Port { sandbox_id, port } => {
            return port::relay(state, request, &sandbox_id, port, remote).await;
        }
        Destination::BadPort(port) => {
            let message = format!("E2b-Sandbox-Port must be a port number (1-65535), not {port:?}");
            return (None, files::plain_error(StatusCode::BAD_REQUEST, &message));
        }
        Destination::Envd { sandbox_id } => {
            match access::envd_caller(state, request.headers(), &sandbox_id).await {
                Ok(caller) => {
                    let uid = caller.peer.uid;
                    request.extensions_mut().insert(caller);
                    (&routers.envd, Some(uid))
                }
                Err(refusal) => return (None, refusal.into_response()),
            }
        }
    };
    match router.clone().oneshot(request).await {
        Ok(response) => (caller, response),
        Err(never) => match never {},
    }
}

/// The control plane's caller: the uid of the `X-API-KEY` token. The key
/// itself is never logged.
fn control_caller(state: &E2b, headers: &HeaderMap, remote: SocketAddr) -> Result<Peer, ApiError> {
    let unauthorized = |reason: &'static str| {
        tracing::warn!(%remote, reason, "denied: E2B request without a valid API key");
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the X-API-KEY header must hold a valid API key (a token of the daemon's tokens file)",
        )
    };
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim).filter(|k| !k.is_empty());
    let Some(key) = key else { return Err(unauthorized("no X-API-KEY")) };
    let Some(uid) = state.tokens.current().lookup(key) else { return Err(unauthorized("unknown API key")) };
    let peer = Peer { uid, gid: crate::tcp::primary_gid(uid), pid: None };
    crate::serve::admit(Some(peer), &state.app)
}

/// The `Authorization: Basic base64(USER:)` E2B's SDKs send to name the
/// user inside the sandbox: `None` for none, `root` or `user` (both are the
/// sandbox's own user, as airlock runs every process; see the README).
pub(crate) fn e2b_user(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    let invalid = || ApiError::bad_request("invalid_argument", "Authorization must be `Basic base64(USER:)`");
    let text = value.to_str().map_err(|_| invalid())?;
    let Some((scheme, encoded)) = text.split_once(' ') else { return Err(invalid()) };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(invalid());
    }
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| invalid())?;
    let decoded = String::from_utf8(decoded).map_err(|_| invalid())?;
    let user = decoded.split(':').next().unwrap_or("");
    Ok(match user {
        "" | "root" | "user" => None,
        other => Some(other.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn requests_are_told_apart_by_the_sandbox_headers() {
        let mut headers = HeaderMap::new();
        assert_eq!(Destination::of(&headers), Destination::Control);
        headers.insert("E2b-Sandbox-Id", "brave-otter".parse().unwrap());
        let envd = Destination::Envd { sandbox_id: "brave-otter".into() };
        assert_eq!(Destination::of(&headers), envd);
        headers.insert("E2b-Sandbox-Port", "49983".parse().unwrap());
        assert_eq!(Destination::of(&headers), envd);
        headers.insert("E2b-Sandbox-Port", "8000".parse().unwrap());
        assert_eq!(
            Destination::of(&headers),
            Destination::Port { sandbox_id: "brave-otter".into(), port: 8000 }
        );
        headers.insert("E2b-Sandbox-Port", "+80".parse().unwrap());
        assert_eq!(Destination::of(&headers), Destination::BadPort("+80".into()));
    }

    #[test]
    fn a_sandbox_port_is_named_by_its_host() {
        let of = |host: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, host.parse().unwrap());
            Destination::of(&headers)
        };
        let port = |port: u16, id: &str| Destination::Port { sandbox_id: id.into(), port };
        assert_eq!(of("8000-brave-otter.localhost:3000"), port(8000, "brave-otter"));
        assert_eq!(of("8000-brave-otter.airlock.example.com"), port(8000, "brave-otter"));
        assert_eq!(
            of("49983-brave-otter.localhost:3000"),
            Destination::Envd { sandbox_id: "brave-otter".into() }
        );
        for listener in
            ["127.0.0.1:3000", "localhost:3000", "[::1]:3000", "my-airlock.example.com", "0-x.localhost"]
        {
            assert_eq!(of(listener), Destination::Control, "{listener}");
        }
    }

    #[test]
    fn the_user_comes_from_basic_authorization() {
        let mut headers = HeaderMap::new();
        assert_eq!(e2b_user(&headers).unwrap(), None);
        headers.insert(header::AUTHORIZATION, "Basic dXNlcjo=".parse().unwrap());
        assert_eq!(e2b_user(&headers).unwrap(), None, "user: the sandbox's own user");
        headers.insert(header::AUTHORIZATION, "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(e2b_user(&headers).unwrap(), None, "root: the sandbox's own user");
        headers.insert(header::AUTHORIZATION, "Basic bm9ib2R5Og==".parse().unwrap());
        assert_eq!(e2b_user(&headers).unwrap().as_deref(), Some("nobody"));
        headers.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert!(e2b_user(&headers).is_err());
    }
}
