//! A port inside a sandbox, through the E2B listener: a request whose Host
//! is `PORT-ID.<domain>` (what the SDKs' `get_host(PORT)` names) or that
//! carries `E2b-Sandbox-Port: PORT` is relayed as HTTP/1.1 to PORT on the
//! sandbox's loopback.
//!
//! Each request gets its own connection into the sandbox, made by the
//! sandbox's supervisor (`SupervisorClient::connect_port`, the path of
//! `airlock create -p`), so every request is a `port_accepted` /
//! `port_closed` pair in the sandbox's audit log and the sandbox still
//! has no route out. The caller must hold the sandbox's envd access token
//! (`X-Access-Token`), which is not passed on; the policy must allow
//! ports. Protocol upgrades (WebSocket) are refused.

use std::net::SocketAddr;
use std::sync::Arc;

use airlock_runtime::ports::{self, PortError};
use airlock_runtime::supervisor::SupervisorClient;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode, Uri, Version, header};
use hyper_util::rt::TokioIo;

use super::E2b;
use super::access::{self, Refusal};
use super::files::plain_error;

/// Headers that belong to one hop (RFC 9110 §7.6.1), never relayed.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Credentials for airlock, which the server inside never sees.
const CREDENTIALS: [&str; 2] = ["x-access-token", "x-api-key"];

/// Relays `request` to `port` of the sandbox `sandbox_id`; the uid it was
/// served for, when it was.
pub(crate) async fn relay(
    state: &Arc<E2b>,
    request: Request<Body>,
    sandbox_id: &str,
    port: u16,
    remote: SocketAddr,
) -> (Option<u32>, Response<Body>) {
    let caller = match access::envd_caller(state, request.headers(), sandbox_id).await {
        Ok(caller) => caller,
        // Whether the id is another sandbox's (another tenant's) is not told.
        Err(Refusal::OtherSandbox(id)) => {
            let e = super::control::not_found(&id);
            return (None, plain_error(e.status, &e.message));
        }
        Err(refusal) => return (None, refusal.into_response()),
    };
    let uid = caller.peer.uid;
    if is_upgrade(&request) {
        let message = format!(
            "sandbox {sandbox_id}, port {port}: WebSocket and other protocol upgrades are not relayed by \
             airlock's E2B listener; plain HTTP requests are"
        );
        return (Some(uid), plain_error(StatusCode::NOT_IMPLEMENTED, &message));
    }
    let id = sandbox_id.to_owned();
    let connected = state
        .app
        .blocking(move |app| {
            let loaded = crate::sandbox::authorize(app, &caller.peer, &caller.sandbox_id)?;
            // The supervisor refuses too; asking first tells a policy's
            // refusal (403) from a port nothing listens on (502).
            if let Ok(policy) = airlock_policy::Policy::load_file(&loaded.dir.policy_path())
                && let Err(why) = ports::reachable(&policy)
            {
                return Ok(Err(plain_error(StatusCode::FORBIDDEN, &forbidden(&id, &why))));
            }
            let peer = format!("{remote} (E2B listener)");
            Ok(SupervisorClient::at(&loaded.dir).connect_port(port, &peer).map_err(|e| {
                let message = format!("sandbox {id}: nothing answered on port {port} inside: {e}");
                plain_error(StatusCode::BAD_GATEWAY, &message)
            }))
        })
        .await;
    let stream = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(refused)) => return (Some(uid), refused),
        Err(e) => return (Some(uid), plain_error(e.status, &e.message)),
    };
    let response = match forward(stream, request).await {
        Ok(response) => response,
        Err(e) => {
            let message = format!("sandbox {sandbox_id}, port {port}: no HTTP answer: {e}");
            plain_error(StatusCode::BAD_GATEWAY, &message)
        }
    };
    (Some(uid), response)
}

fn forbidden(id: &str, why: &PortError) -> String {
    match why {
        PortError::Forbidden { policy } => format!(
            "sandbox {id}: its policy {policy} does not let anything outside reach its ports ([network] \
             ports = false); create it from a template (policy) that sets ports = true"
        ),
        other => format!("sandbox {id}: {other}"),
    }
}

/// Why a request could not be relayed after the sandbox answered.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("the connection into the sandbox could not be used: {0}")]
    Stream(#[source] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

fn is_upgrade(request: &Request<Body>) -> bool {
    let connection_upgrade = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    request.method() == Method::CONNECT
        || request.headers().contains_key(header::UPGRADE)
        || connection_upgrade
}

/// Sends `request` over `stream` (one HTTP/1.1 connection, closed after
/// its answer) and returns the answer, its body streamed as it comes.
async fn forward(
    stream: std::os::unix::net::UnixStream,
    request: Request<Body>,
) -> Result<Response<Body>, RelayError> {
    stream.set_nonblocking(true).map_err(RelayError::Stream)?;
    let stream = tokio::net::UnixStream::from_std(stream).map_err(RelayError::Stream)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "a relayed port connection ended with an error");
        }
    });
    let response = sender.send_request(outgoing(request)).await?;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// The request as the server inside gets it: origin-form, HTTP/1.1, its
/// own headers (Host included) without this hop's or airlock's.
fn outgoing(request: Request<Body>) -> Request<Body> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = path.parse::<Uri>().unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    for name in CREDENTIALS {
        parts.headers.remove(name);
    }
    Request::from_parts(parts, body)
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_relayed_request_keeps_its_own_headers_only() {
        let request = Request::builder()
            .method(Method::POST)
            .uri("http://8000-web.localhost:3000/a/b?c=d")
            .header(header::HOST, "8000-web.localhost:3000")
            .header(header::CONNECTION, "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("x-access-token", "secret")
            .header("x-app", "kept")
            .body(Body::empty())
            .unwrap();
        assert!(!is_upgrade(&request));
        let out = outgoing(request);
        assert_eq!(out.uri(), "/a/b?c=d");
        assert_eq!(out.method(), Method::POST);
        let names: Vec<&str> = out.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["host", "x-app"]);
    }

    #[test]
    fn websocket_requests_are_upgrades() {
        let request = Request::builder()
            .uri("/ws")
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(Body::empty())
            .unwrap();
        assert!(is_upgrade(&request));
    }
}
