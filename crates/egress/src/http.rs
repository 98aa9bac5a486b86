//! The HTTP proxy port: CONNECT tunnels and plain-HTTP requests in absolute
//! form, as HTTP_PROXY/HTTPS_PROXY clients send them.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::count::{Counted, RecordOnDrop};
use crate::event::Handling;
use crate::proxy::{EventBuilder, Port, Refusal, Shared, open_upstream};
use crate::rules::Decision;

pub(crate) type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Header naming why the proxy refused, on every refusal it answers.
pub const DENIED_HEADER: &str = "x-airlock-denied";

pub(crate) async fn serve(shared: Arc<Shared>, stream: TcpStream) {
    let io = TokioIo::new(stream);
    let service = service_fn(move |req| handle(shared.clone(), req));
    let _ = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(false)
        .serve_connection(io, service)
        .with_upgrades()
        .await;
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    if req.method() == Method::CONNECT {
        Ok(connect(shared, req).await)
    } else {
        Ok(plain(shared, req).await)
    }
}

/// Splits `host:port` (with IPv6 brackets) from a request target.
pub(crate) fn target_of(uri: &Uri, default_port: u16) -> Option<(String, u16)> {
    let authority = uri.authority()?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let host = host.trim_end_matches('.').to_string();
    if host.is_empty() {
        return None;
    }
    Some((host, authority.port_u16().unwrap_or(default_port)))
}

async fn connect(shared: Arc<Shared>, req: Request<Incoming>) -> Response<ProxyBody> {
    let Some((host, port)) = target_of(req.uri(), 443) else {
        return text(StatusCode::BAD_REQUEST, "airlock: CONNECT needs host:port", None);
    };
    let ev = EventBuilder::new(Port::Http, &host, port);
    let what = format!("CONNECT {host}:{port}");
    let (upstream, addr, rule) = match open_upstream(&shared, &host, port).await {
        Ok(ok) => ok,
        Err(refusal) => return refuse(&shared, &ev, &what, &refusal),
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                crate::tunnel::relay(shared, TokioIo::new(upgraded), upstream, addr, rule, ev).await;
            }
            Err(e) => tracing::debug!("CONNECT upgrade failed: {e}"),
        }
    });
    Response::new(empty())
}

/// Plain HTTP: decided per request, forwarded on a fresh upstream
/// connection. Secrets are never injected here: without TLS the request
/// could be read on the way.
async fn plain(shared: Arc<Shared>, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.uri().scheme_str() != Some("http") {
        return text(
            StatusCode::BAD_REQUEST,
            "airlock: this is a proxy; send absolute http:// URLs, or CONNECT for https",
            None,
        );
    }
    let Some((host, port)) = target_of(req.uri(), 80) else {
        return text(StatusCode::BAD_REQUEST, "airlock: request without a host", None);
    };
    let ev = EventBuilder::new(Port::Http, &host, port);
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let what = format!("{method} http://{host}:{port}{path}");
    if let Decision::Deny { reason } = shared.rules.decide_request(&host, port, &method, &path) {
        return refuse_request(&shared, &ev, &what, &reason, &method, &path);
    }
    let (upstream, addr, rule) = match open_upstream(&shared, &host, port).await {
        Ok(ok) => ok,
        Err(refusal) => return refuse(&shared, &ev, &what, &refusal),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
        Ok(pair) => pair,
        Err(e) => return text(StatusCode::BAD_GATEWAY, &format!("airlock: upstream {host}: {e}"), None),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = to_origin_form(req, &host, port, false);
    let mut event = ev.event(true, &rule, Handling::Plain);
    event.address = Some(addr.to_string());
    event.method = Some(method);
    event.path = Some(path);
    forward(&shared, &mut sender, req, event, &ev, &host).await
}

/// Sends one request upstream and streams the response back, counting both
/// bodies; the event is recorded when the response body is done.
pub(crate) async fn forward(
    shared: &Shared,
    sender: &mut hyper::client::conn::http1::SendRequest<Counted<Incoming>>,
    req: Request<Incoming>,
    event: crate::event::NetEvent,
    ev: &EventBuilder,
    host: &str,
) -> Response<ProxyBody> {
    let out = Arc::new(AtomicU64::new(0));
    let inbound = Arc::new(AtomicU64::new(0));
    let req = req.map(|b| Counted::new(b, out.clone()));
    let record =
        RecordOnDrop { event, out, inbound: inbound.clone(), started: ev.started, sink: shared.sink.clone() };
    match sender.send_request(req).await {
        Ok(resp) => resp.map(|b| Counted::recording(b, inbound, record).boxed()),
        Err(e) => {
            drop(record);
            text(StatusCode::BAD_GATEWAY, &format!("airlock: upstream {host}: {e}"), None)
        }
    }
}

/// Rewrites a proxy request for the origin server: origin-form target, a
/// Host header, no hop-by-hop or proxy headers.
pub(crate) fn to_origin_form(
    mut req: Request<Incoming>,
    host: &str,
    port: u16,
    tls: bool,
) -> Request<Incoming> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    if let Ok(uri) = path.parse::<Uri>() {
        *req.uri_mut() = uri;
    }
    let headers = req.headers_mut();
    for name in ["proxy-connection", "proxy-authorization", "keep-alive", "te", "trailer", "upgrade"] {
        headers.remove(name);
    }
    if !headers.contains_key(http::header::HOST) {
        let default = if tls { 443 } else { 80 };
        let value = if port == default { host.to_string() } else { format!("{host}:{port}") };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(http::header::HOST, v);
        }
    }
    req
}

pub(crate) fn refuse(
    shared: &Shared,
    ev: &EventBuilder,
    what: &str,
    refusal: &Refusal,
) -> Response<ProxyBody> {
    let (status, allowed, handling) = match refusal {
        Refusal::Policy(_) => (StatusCode::FORBIDDEN, false, Handling::Refused),
        Refusal::Unreachable(_) => (StatusCode::BAD_GATEWAY, true, Handling::Refused),
    };
    shared.sink.record(ev.event(allowed, refusal.reason(), handling));
    match refusal {
        Refusal::Policy(reason) => text(status, &shared.refusal_text(what, reason), Some(reason)),
        Refusal::Unreachable(reason) => {
            text(status, &format!("airlock: cannot reach {what}: {reason}"), None)
        }
    }
}

pub(crate) fn refuse_request(
    shared: &Shared,
    ev: &EventBuilder,
    what: &str,
    reason: &str,
    method: &str,
    path: &str,
) -> Response<ProxyBody> {
    let mut event = ev.event(false, reason, Handling::Refused);
    event.method = Some(method.to_string());
    event.path = Some(path.to_string());
    shared.sink.record(event);
    text(StatusCode::FORBIDDEN, &shared.refusal_text(what, reason), Some(reason))
}

pub(crate) fn text(status: StatusCode, body: &str, denied: Option<&str>) -> Response<ProxyBody> {
    let mut resp =
        Response::new(Full::new(Bytes::from(format!("{body}\n"))).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Some(reason) = denied {
        let clean: String =
            reason.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
        if let Ok(v) = HeaderValue::from_str(&clean) {
            resp.headers_mut().insert(DENIED_HEADER, v);
        }
    }
    resp
}

pub(crate) fn empty() -> ProxyBody {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}
