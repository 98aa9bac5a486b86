//! TLS interception, only for destinations whose policy needs to see
//! requests (method/path rules) or receive secrets. The sandbox's client is
//! served a certificate from the sandbox's own CA; upstream is verified
//! against the host's roots (plus the policy's). Each request is decided on
//! its own and gets its secrets substituted here, at the edge.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::event::Handling;
use crate::http::{ProxyBody, names_only, refuse_request, to_origin_form};
use crate::proxy::{EventBuilder, Shared};
use crate::rules::Decision;

pub(crate) async fn run<C>(
    shared: Arc<Shared>,
    client: C,
    upstream: TcpStream,
    addr: SocketAddr,
    ev: EventBuilder,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let fail = |reason: String| {
        let mut event = ev.event(false, &reason, Handling::Refused);
        event.address = Some(addr.to_string());
        shared.sink.record(event);
    };
    let server_config = match shared.ca.server_config(&ev.host) {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot issue a certificate for {}: {e}", ev.host)),
    };
    let client_tls = match tokio_rustls::TlsAcceptor::from(server_config).accept(client).await {
        Ok(s) => s,
        Err(e) => return fail(format!("TLS with the sandbox's client failed: {e}")),
    };
    let Ok(name) = ServerName::try_from(ev.host.clone()) else {
        return fail(format!("{} is not a valid TLS server name", ev.host));
    };
    let upstream_config = match shared.upstream_tls() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot load trust roots for upstream TLS: {e}")),
    };
    let upstream_tls = match tokio_rustls::TlsConnector::from(upstream_config).connect(name, upstream).await {
        Ok(s) => s,
        Err(e) => return fail(format!("upstream {} failed TLS verification: {e}", ev.host)),
    };
    serve_requests(shared, client_tls, upstream_tls, addr, ev, Scheme::Https).await;
}

/// Whether the requests served are TLS the proxy terminated or plain HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// Intercepted TLS: secrets may be substituted.
    Https,
    /// Plain HTTP (a transparent connection to port 80): decided per
    /// request as the HTTP proxy port decides one; never given secrets,
    /// which could be read on the way.
    Http,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Scheme::Https => "https",
            Scheme::Http => "http",
        }
    }
}

/// Serves the client's HTTP/1 requests one by one over `upstream`, each
/// decided on its own (host named, method and path rules), with one event
/// per request.
pub(crate) async fn serve_requests<C, U>(
    shared: Arc<Shared>,
    client: C,
    upstream: U,
    addr: SocketAddr,
    ev: EventBuilder,
    scheme: Scheme,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
        Ok(pair) => pair,
        Err(e) => {
            let mut event = ev.event(false, &format!("upstream {}: {e}", ev.host), Handling::Refused);
            event.address = Some(addr.to_string());
            shared.sink.record(event);
            return;
        }
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let sender = Arc::new(Mutex::new(sender));
    let ev = Arc::new(ev);
    let service = service_fn(move |req| {
        let (shared, sender, ev) = (shared.clone(), sender.clone(), ev.clone());
        async move { Ok::<_, Infallible>(request(shared, sender, ev, addr, req, scheme).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .serve_connection(TokioIo::new(client), service)
        .await;
}

async fn request(
    shared: Arc<Shared>,
    sender: Arc<Mutex<SendRequest<crate::count::Counted<Incoming>>>>,
    ev: Arc<EventBuilder>,
    addr: SocketAddr,
    req: Request<Incoming>,
    scheme: Scheme,
) -> Response<ProxyBody> {
    let (host, port) = (ev.host.clone(), ev.port);
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let what = format!("{method} {}://{host}:{port}{path}", scheme.name());
    if req.method() == http::Method::CONNECT {
        let reason = "CONNECT inside an intercepted connection";
        return refuse_request(&shared, &ev, &what, reason, &method, &path);
    }
    // Every request on the connection, not only the first: each names its
    // own host, and only the destination's passes.
    let (named_host, named_port) = match names_only(&req, &host, port, scheme.name()) {
        Ok(named) => named,
        Err(reason) => return refuse_request(&shared, &ev, &what, &reason, &method, &path),
    };
    let rule = match shared.rules.decide_request(&host, port, &method, &path) {
        Decision::Allow { rule } => rule,
        Decision::Deny { reason } => return refuse_request(&shared, &ev, &what, &reason, &method, &path),
    };
    let mut req = to_origin_form(req, &host, port, scheme == Scheme::Https);
    // The request's own Host decides which secrets it may carry (checked
    // above to be the destination); plain HTTP carries none.
    let secrets = match scheme {
        Scheme::Https => shared.secrets_for(&named_host, named_port),
        Scheme::Http => Vec::new(),
    };
    let mut used = Vec::new();
    if !secrets.is_empty() {
        for value in req.headers_mut().values_mut() {
            let (new, changed) = crate::secrets::substitute(value.as_bytes(), &secrets);
            if changed && let Ok(v) = HeaderValue::from_bytes(&new) {
                *value = v;
            }
        }
        // Which secrets went out, by name, for the audit log.
        used = secrets.iter().map(|s| s.name.clone()).collect();
    }
    let handling = match scheme {
        Scheme::Https => Handling::Intercepted,
        Scheme::Http => Handling::Plain,
    };
    let mut event = ev.event(true, &rule, handling);
    event.address = Some(addr.to_string());
    event.method = Some(method);
    event.path = Some(path);
    event.secrets = used;
    let mut sender = sender.lock().await;
    crate::http::forward(&shared, &mut sender, req, event, &ev, &host).await
}
