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
                let refused =
                    crate::tunnel::relay(shared, TokioIo::new(upgraded), upstream, addr, rule, ev).await;
                if let Some(mut refused) = refused {
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut refused).await;
                }
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
    if let Err(reason) = names_only(&req, &host, port, "http") {
        return refuse_request(&shared, &ev, &what, &reason, &method, &path);
    }
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

/// Checks that a request names no host but its destination (`host:port`,
/// reached over `scheme`): neither its target (in absolute form), nor its
/// Host header, nor the forwarding headers some front ends route by. A
/// shared front end picks the server by these, so a request naming another
/// host would reach a server the policy never allowed. Case, a trailing dot
/// and an explicit default port do not matter; a Host without a port means
/// the scheme's default port. Returns the host and port the request names.
pub(crate) fn names_only<B>(
    req: &Request<B>,
    host: &str,
    port: u16,
    scheme: &str,
) -> Result<(String, u16), String> {
    let default_port = if scheme == "https" { 443 } else { 80 };
    let destination = crate::rules::host_port(&crate::rules::normalize_host(host), port);
    let differs = |what: &str, value: &str| {
        format!(
            "{what} {value:?} names another host than the destination {destination} (a shared front end would route it there)"
        )
    };
    let uri = req.uri();
    if let Some(given) = uri.scheme_str()
        && !given.eq_ignore_ascii_case(scheme)
    {
        return Err(format!(
            "the request target's scheme {given:?} is not {scheme} (destination {destination})"
        ));
    }
    if let Some(authority) = uri.authority() {
        if authority.as_str().contains('@') {
            return Err(format!(
                "the request target carries user information before '@'; only the host may be named ({destination})"
            ));
        }
        if !same_authority(authority.as_str(), default_port, host, port) {
            return Err(differs("the request target", authority.as_str()));
        }
    }
    let mut named = (crate::rules::normalize_host(host), port);
    let hosts: Vec<&HeaderValue> = req.headers().get_all(http::header::HOST).iter().collect();
    match hosts.as_slice() {
        [] => {}
        [value] => {
            let text = value.to_str().unwrap_or_default();
            match parse_authority(text, default_port) {
                Some((h, p)) if same_host(&h, host) && p == port => named = (h, p),
                Some(_) => return Err(differs("the Host header", text)),
                None => return Err(format!("the Host header {text:?} is not a host[:port] ({destination})")),
            }
        }
        many => {
            return Err(format!("the request has {} Host headers (destination {destination})", many.len()));
        }
    }
    for value in req.headers().get_all("x-forwarded-host") {
        let text = value.to_str().unwrap_or_default();
        for item in text.split(',') {
            if !same_authority(item.trim(), default_port, host, port) {
                return Err(differs("the X-Forwarded-Host header", text));
            }
        }
    }
    for value in req.headers().get_all(http::header::FORWARDED) {
        let text = value.to_str().unwrap_or_default();
        let named_hosts = text.split([',', ';']).filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            key.trim().eq_ignore_ascii_case("host").then(|| value.trim().trim_matches('"'))
        });
        for item in named_hosts {
            if !same_authority(item, default_port, host, port) {
                return Err(differs("the Forwarded header", text));
            }
        }
    }
    Ok(named)
}

/// Whether `authority` (`host[:port]`, `default_port` when it has none)
/// names `host:port`.
fn same_authority(authority: &str, default_port: u16, host: &str, port: u16) -> bool {
    parse_authority(authority, default_port).is_some_and(|(h, p)| p == port && same_host(&h, host))
}

fn same_host(a: &str, b: &str) -> bool {
    let (a, b) = (crate::rules::normalize_host(a), crate::rules::normalize_host(b));
    match (a.parse::<std::net::IpAddr>(), b.parse::<std::net::IpAddr>()) {
        (Ok(a), Ok(b)) => a == b,
        (Err(_), Err(_)) => a == b,
        _ => false,
    }
}

/// Parses `host[:port]` as a Host header carries it (IPv6 in brackets):
/// the host normalized (lowercase, no trailing dot) and the port
/// (`default_port` when absent or empty). `None` for anything else: user
/// information, spaces, characters no host name has, a bad port.
pub(crate) fn parse_authority(text: &str, default_port: u16) -> Option<(String, u16)> {
    let (host, port) = match text.strip_prefix('[') {
        Some(bracketed) => {
            let (inside, after) = bracketed.split_once(']')?;
            let ip: std::net::Ipv6Addr = inside.parse().ok()?;
            let port = if after.is_empty() { None } else { Some(after.strip_prefix(':')?) };
            (ip.to_string(), port)
        }
        None => {
            let (host, port) = match text.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            };
            let host = crate::rules::normalize_host(host);
            let plausible = !host.is_empty()
                && host.len() <= 253
                && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
            if !plausible {
                return None;
            }
            (host, port)
        }
    };
    let port = match port {
        None | Some("") => default_port,
        Some(digits) if digits.len() <= 5 && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse::<u16>().ok().filter(|&p| p != 0)?
        }
        Some(_) => return None,
    };
    Some((host, port))
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
    let head_request = req.method() == Method::HEAD;
    let mut req = req.map(|b| Counted::new(b, out.clone()));
    // A secret's value can come back from its hosts: their responses must
    // be readable to have it replaced (see response.rs).
    let secret_host = !shared.secrets_for(&ev.host, ev.port).is_empty();
    if secret_host {
        req.headers_mut().insert(http::header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }
    let mut record =
        RecordOnDrop { event, out, inbound: inbound.clone(), started: ev.started, sink: shared.sink.clone() };
    let resp = match sender.send_request(req).await {
        Ok(resp) => resp,
        Err(e) => {
            drop(record);
            return text(StatusCode::BAD_GATEWAY, &format!("airlock: upstream {host}: {e}"), None);
        }
    };
    if secret_host && let Some(reason) = crate::response::unreadable_encoding(resp.headers(), host) {
        record.event.allowed = false;
        record.event.handling = crate::event::Handling::Refused;
        record.event.rule.clone_from(&reason);
        drop(resp);
        drop(record);
        return text(
            StatusCode::BAD_GATEWAY,
            &format!("airlock: refused the response: {reason}"),
            Some(&reason),
        );
    }
    let resp = resp.map(|b| Counted::recording(b, inbound, record));
    let replacements = crate::response::Replacements::of(shared);
    if replacements.is_empty() {
        return resp.map(BodyExt::boxed);
    }
    crate::response::replace_values(&Arc::new(replacements), resp, head_request).map(BodyExt::boxed)
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

/// The longest status line reason the proxy writes.
const MAX_REASON: usize = 512;

/// An answer of the proxy's own: `body` as text, and as the status line's
/// reason too, since some clients show only that (Go's HTTP client, which
/// dockerd pulls with, reports a refused CONNECT by its reason phrase).
pub(crate) fn text(status: StatusCode, body: &str, denied: Option<&str>) -> Response<ProxyBody> {
    let mut resp =
        Response::new(Full::new(Bytes::from(format!("{body}\n"))).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason_phrase(body)) {
        resp.extensions_mut().insert(reason);
    }
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

/// `text` as a status line's reason: printable ASCII only, one line, at
/// most [`MAX_REASON`] bytes.
fn reason_phrase(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .take(MAX_REASON)
        .collect()
}

pub(crate) fn empty() -> ProxyBody {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn request(target: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri(target);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn check(
        target: &str,
        headers: &[(&str, &str)],
        host: &str,
        port: u16,
        scheme: &str,
    ) -> Result<(), String> {
        names_only(&request(target, headers), host, port, scheme).map(|_| ())
    }

    #[test]
    fn a_refusal_carries_its_reason_in_the_status_line_too() {
        let resp = text(
            StatusCode::FORBIDDEN,
            "airlock: policy p refused CONNECT x:1: no\u{1b}[1m entry\nmore",
            None,
        );
        let reason = resp.extensions().get::<hyper::ext::ReasonPhrase>().unwrap();
        assert_eq!(reason.as_bytes(), b"airlock: policy p refused CONNECT x:1: no?[1m entry");
        let long = "x".repeat(MAX_REASON * 2);
        assert_eq!(reason_phrase(&long).len(), MAX_REASON);
    }

    #[test]
    fn a_host_header_naming_the_destination_passes() {
        let dest = ("api.example.com", 8080);
        let plain =
            |host: &str| check("http://api.example.com:8080/x", &[("host", host)], dest.0, dest.1, "http");
        for same in ["api.example.com:8080", "API.Example.COM:8080", "api.example.com.:8080"] {
            assert_eq!(plain(same), Ok(()), "{same}");
        }
        // No Host at all: the target names the host.
        assert_eq!(check("http://api.example.com:8080/x", &[], dest.0, dest.1, "http"), Ok(()));
        // Default ports, explicit or not, and an empty port.
        for same in ["api.example.com", "api.example.com:80", "api.example.com:"] {
            assert_eq!(
                check("http://api.example.com/", &[("host", same)], "api.example.com", 80, "http"),
                Ok(())
            );
        }
        for same in ["api.example.com", "api.example.com:443"] {
            assert_eq!(check("/x", &[("host", same)], "api.example.com", 443, "https"), Ok(()), "{same}");
        }
        // Addresses compare as addresses.
        assert_eq!(check("/", &[("host", "[0:0::1]:8443")], "::1", 8443, "https"), Ok(()));
        assert_eq!(check("/", &[("host", "127.0.0.1:8443")], "127.0.0.1", 8443, "https"), Ok(()));
        // What the request names is returned normalized, for the secrets.
        let named =
            names_only(&request("/", &[("host", "API.example.com.")]), "api.example.com", 443, "https");
        assert_eq!(named, Ok(("api.example.com".to_string(), 443)));
    }

    #[test]
    fn any_other_host_is_refused() {
        let https =
            |target: &str, headers: &[(&str, &str)]| check(target, headers, "api.example.com", 443, "https");
        let refused = [
            ("other host", https("/", &[("host", "other.example.org")])),
            ("suffix", https("/", &[("host", "api.example.com.other.example.org")])),
            ("other port", https("/", &[("host", "api.example.com:8443")])),
            ("two hosts", https("/", &[("host", "api.example.com"), ("host", "other.example.org")])),
            ("same twice", https("/", &[("host", "api.example.com"), ("host", "api.example.com")])),
            ("userinfo in host", https("/", &[("host", "api.example.com@other.example.org")])),
            ("space", https("/", &[("host", "api.example.com other.example.org")])),
            ("comma", https("/", &[("host", "api.example.com,other.example.org")])),
            ("empty", https("/", &[("host", "")])),
            ("bad port", https("/", &[("host", "api.example.com:99999")])),
            ("port 0", https("/", &[("host", "api.example.com:0")])),
            ("two ports", https("/", &[("host", "api.example.com:443:1")])),
            ("absolute target", https("https://other.example.org/x", &[("host", "api.example.com")])),
            ("plain scheme", https("http://api.example.com/x", &[])),
            ("forwarded host", https("/", &[("x-forwarded-host", "other.example.org")])),
            ("forwarded list", https("/", &[("x-forwarded-host", "api.example.com, other.example.org")])),
            ("forwarded header", https("/", &[("forwarded", "for=192.0.2.1;host=other.example.org")])),
            ("address", check("/", &[("host", "127.0.0.2:80")], "127.0.0.1", 80, "http")),
            (
                "no port, not default",
                check(
                    "http://api.example.com:8080/",
                    &[("host", "api.example.com")],
                    "api.example.com",
                    8080,
                    "http",
                ),
            ),
        ];
        for (what, got) in refused {
            assert!(got.is_err(), "{what}: {got:?}");
        }
        let reason = https("/", &[("host", "other.example.org")]).unwrap_err();
        assert!(
            reason.contains("\"other.example.org\"") && reason.contains("api.example.com:443"),
            "{reason}"
        );
        let reason = https("/", &[("host", "a.example.com"), ("host", "b.example.com")]).unwrap_err();
        assert!(reason.contains("2 Host headers"), "{reason}");
        // Forwarding headers naming the destination pass.
        assert_eq!(https("/", &[("x-forwarded-host", "api.example.com:443")]), Ok(()));
        assert_eq!(
            https("/", &[("forwarded", "for=192.0.2.1;host=\"api.example.com\";proto=https")]),
            Ok(())
        );
    }

    #[test]
    fn user_information_in_the_target_is_refused() {
        for target in ["http://user@api.example.com/x", "http://user:pw@api.example.com/x"] {
            let reason = check(target, &[], "api.example.com", 80, "http").unwrap_err();
            assert!(reason.contains("user information"), "{target}: {reason}");
        }
        // The host after '@' is what a client would reach: the proxy decides on it.
        let uri: Uri = "http://api.example.com@other.example.org/".parse().unwrap();
        assert_eq!(target_of(&uri, 80), Some(("other.example.org".to_string(), 80)));
    }

    #[test]
    fn authorities_parse_strictly() {
        assert_eq!(parse_authority("Example.COM.:8080", 80), Some(("example.com".into(), 8080)));
        assert_eq!(parse_authority("[::1]", 443), Some(("::1".into(), 443)));
        assert_eq!(parse_authority("[::1]:1", 443), Some(("::1".into(), 1)));
        for bad in [
            "",
            ":80",
            "[::1",
            "[::1]x",
            "[nope]:80",
            "::1",
            "a b",
            "a%62",
            "é.example.com",
            "a:+80",
            "a:080000",
        ] {
            assert_eq!(parse_authority(bad, 80), None, "{bad:?}");
        }
    }
}
