//! The Connect protocol with its JSON codec, as E2B's SDKs speak it to envd
//! (connect-web with `useBinaryFormat: false`; connect-python with a JSON
//! codec):
//!
//! - unary: `POST /<package.Service>/<Method>`, `Content-Type:
//!   application/json`, the message in protobuf's canonical JSON (camelCase
//!   names, 64-bit integers as strings, bytes as base64, enums by name); an
//!   error is a non-200 status with `{"code": "not_found", "message": …}`.
//! - server streaming: `Content-Type: application/connect+json`, the request
//!   and each answer enveloped as one flag byte, a 4-byte big-endian length
//!   and the JSON; the last envelope has flag 0x02 and holds `{}` or
//!   `{"error": {"code": …, "message": …}}`.
//!
//! Requests are hostile input: bodies are capped, envelopes checked, and
//! only the fields each message declares are read.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body::Frame;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::error::ApiError;

/// Largest request message read (envd's requests are small; file bodies go
/// over `/files`).
pub(crate) const MESSAGE_LIMIT: usize = 1 << 20;
/// The flag of the envelope that ends a stream.
const END_STREAM: u8 = 0x02;
/// Longest gap between keepalive events a client may ask for, and the gap
/// when it asks for none.
const MAX_KEEPALIVE: Duration = Duration::from_secs(300);
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(50);

/// A Connect error: one of the protocol's codes and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectError {
    pub code: &'static str,
    pub message: String,
}

impl ConnectError {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> ConnectError {
        ConnectError { code, message: message.into() }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> ConnectError {
        ConnectError::new("invalid_argument", message)
    }

    /// The HTTP status of a unary answer with this code (the protocol's
    /// table).
    fn status(&self) -> StatusCode {
        match self.code {
            "canceled" => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "permission_denied" => StatusCode::FORBIDDEN,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code, "message": self.message })
    }
}

/// The daemon's own errors in Connect's words.
impl From<ApiError> for ConnectError {
    fn from(e: ApiError) -> ConnectError {
        let code = match (e.status.as_u16(), e.code) {
            (_, "file_not_found" | "not_found") => "not_found",
            (_, "file_exists") => "already_exists",
            (_, "not_running" | "not_managed") => "unavailable",
            (_, "payload_too_large" | "file_too_large") => "resource_exhausted",
            (_, "wrong_file_type" | "not_empty") => "failed_precondition",
            (400, _) => "invalid_argument",
            (401, _) => "unauthenticated",
            (403, _) => "permission_denied",
            (404, _) => "not_found",
            (409, _) => "failed_precondition",
            (413 | 429, _) => "resource_exhausted",
            (422, _) => "failed_precondition",
            _ => "internal",
        };
        ConnectError::new(code, e.message)
    }
}

impl IntoResponse for ConnectError {
    fn into_response(self) -> Response {
        if self.code == "internal" {
            tracing::error!(code = self.code, "{}", self.message);
        } else {
            tracing::debug!(code = self.code, "{}", self.message);
        }
        (self.status(), [(header::CONTENT_TYPE, "application/json")], self.json().to_string()).into_response()
    }
}

/// A unary answer.
pub(crate) fn unary<T: Serialize>(message: &T) -> Response {
    match serde_json::to_vec(message) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ConnectError::new("internal", format!("encoding the answer: {e}")).into_response(),
    }
}

/// The fallback of envd's routes: an unknown method.
pub(crate) async fn no_route(request: Request) -> Response {
    ConnectError::new("unimplemented", format!("{} is not served by this envd", request.uri().path()))
        .into_response()
}

/// A request message, from a unary JSON body or a streaming call's single
/// enveloped one. The handler learns which (`streaming`), to answer in kind.
pub(crate) struct Message<T> {
    pub value: T,
    pub streaming: bool,
    /// The client's `Keepalive-Ping-Interval` (seconds), for streams.
    pub keepalive: Duration,
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Message<T> {
    /// Refused in the form of the call (a stream ends with the error).
    type Rejection = Response;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Response> {
        let headers = request.headers();
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let streaming = match content_type.as_str() {
            "application/json" => false,
            "application/connect+json" => true,
            other => {
                return Err(ConnectError::new(
                    "unimplemented",
                    format!(
                        "content type {other:?} is not served: use the JSON codec \
                         (application/json or application/connect+json)"
                    ),
                )
                .into_response());
            }
        };
        let keepalive = keepalive_of(headers);
        let limit = if streaming { MESSAGE_LIMIT + 5 } else { MESSAGE_LIMIT };
        let decoded = async {
            let body = axum::body::to_bytes(request.into_body(), limit).await.map_err(|_| {
                ConnectError::new(
                    "resource_exhausted",
                    format!("the request message is larger than {MESSAGE_LIMIT} bytes"),
                )
            })?;
            let json: &[u8] = if streaming { single_envelope(&body)? } else { &body };
            let json: &[u8] = if json.iter().all(u8::is_ascii_whitespace) { b"{}" } else { json };
            serde_json::from_slice(json)
                .map_err(|e| ConnectError::invalid(format!("the request is not a valid message: {e}")))
        };
        match decoded.await {
            Ok(value) => Ok(Message { value, streaming, keepalive }),
            Err(e) => Err(refuse(streaming, e)),
        }
    }
}

fn keepalive_of(headers: &axum::http::HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(DEFAULT_KEEPALIVE, |s| Duration::from_secs(s).min(MAX_KEEPALIVE))
}

/// The one message of a server-streaming request: exactly one envelope,
/// uncompressed.
fn single_envelope(body: &[u8]) -> Result<&[u8], ConnectError> {
    let bad = |why: &str| ConnectError::invalid(format!("malformed stream envelope: {why}"));
    let [flag, a, b, c, d, rest @ ..] = body else { return Err(bad("shorter than its 5-byte header")) };
    if *flag != 0 {
        return Err(bad("compressed or unknown flags (send uncompressed messages)"));
    }
    let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
    if rest.len() != len {
        return Err(bad("its length does not match the body"));
    }
    Ok(rest)
}

/// One enveloped message.
pub(crate) fn envelope(flag: u8, json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + json.len());
    out.push(flag);
    out.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(json);
    Bytes::from(out)
}

pub(crate) fn stream_message(value: &serde_json::Value) -> Bytes {
    envelope(0, value.to_string().as_bytes())
}

/// The envelope that ends a stream, with its error if it failed.
pub(crate) fn stream_end(error: Option<&ConnectError>) -> Bytes {
    let body = match error {
        None => serde_json::json!({}),
        Some(e) => serde_json::json!({ "error": e.json() }),
    };
    envelope(END_STREAM, body.to_string().as_bytes())
}

/// A streaming answer that ends at once with `error` (Connect puts a
/// stream's errors in its last envelope, under a 200).
pub(crate) fn stream_error(error: ConnectError) -> Response {
    tracing::debug!(code = error.code, "{}", error.message);
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(stream_end(Some(&error)));
    streamed(rx, None)
}

/// An error answered in the form of the call: unary or streamed.
pub(crate) fn refuse(streaming: bool, error: ConnectError) -> Response {
    if streaming { stream_error(error) } else { error.into_response() }
}

/// A streaming answer fed by `rx` (whole envelopes); `keepalive` adds the
/// given envelope whenever the stream has been quiet that long.
pub(crate) fn streamed(rx: mpsc::Receiver<Bytes>, keepalive: Option<(Duration, Bytes)>) -> Response {
    let ticker = keepalive.map(|(every, frame)| {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        (interval, frame)
    });
    let mut response = Response::new(Body::new(StreamBody { rx, ticker }));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/connect+json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

struct StreamBody {
    rx: mpsc::Receiver<Bytes>,
    ticker: Option<(tokio::time::Interval, Bytes)>,
}

impl http_body::Body for StreamBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::convert::Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(bytes)) => {
                if let Some((interval, _)) = &mut self.ticker {
                    interval.reset();
                }
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        if let Some((interval, frame)) = &mut self.ticker
            && interval.poll_tick(cx).is_ready()
        {
            return Poll::Ready(Some(Ok(Frame::data(frame.clone()))));
        }
        Poll::Pending
    }
}

/// A 64-bit integer as protobuf's JSON writes it: a string.
pub(crate) fn int64(n: i64) -> String {
    n.to_string()
}

/// Bytes as protobuf's JSON writes them: standard base64.
pub(crate) fn bytes(data: &[u8]) -> String {
    crate::body::base64(data)
}

/// Bytes from protobuf's JSON: standard or URL-safe base64, padded or not.
pub(crate) fn from_bytes(text: &str) -> Result<Vec<u8>, ConnectError> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .ok_or_else(|| ConnectError::invalid("a bytes field is not base64"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn envelopes_are_framed_and_checked() {
        let frame = envelope(0, b"{\"a\":1}");
        assert_eq!(&frame[..5], &[0, 0, 0, 0, 7]);
        assert_eq!(single_envelope(&frame).unwrap(), b"{\"a\":1}");
        assert!(single_envelope(&frame[..6]).is_err(), "cut short");
        assert!(single_envelope(&[1, 0, 0, 0, 0]).is_err(), "compressed");
        assert!(single_envelope(&[0, 0, 0]).is_err());
        let end = stream_end(Some(&ConnectError::new("not_found", "gone")));
        assert_eq!(end[0], END_STREAM);
        let json: serde_json::Value = serde_json::from_slice(&end[5..]).unwrap();
        assert_eq!(json["error"]["code"], "not_found");
        assert_eq!(&stream_end(None)[5..], b"{}");
    }

    #[test]
    fn daemon_errors_get_connect_codes() {
        let code = |status: u16, code: &'static str| {
            ConnectError::from(ApiError::new(StatusCode::from_u16(status).unwrap(), code, "m")).code
        };
        assert_eq!(code(404, "file_not_found"), "not_found");
        assert_eq!(code(409, "file_exists"), "already_exists");
        assert_eq!(code(400, "invalid_path"), "invalid_argument");
        assert_eq!(code(500, "internal"), "internal");
        assert_eq!(ConnectError::new("not_found", "").status(), StatusCode::NOT_FOUND);
        assert_eq!(ConnectError::new("unauthenticated", "").status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn bytes_and_keepalive() {
        assert_eq!(from_bytes("aGkK").unwrap(), b"hi\n");
        assert_eq!(from_bytes("aGk").unwrap(), b"hi");
        assert!(from_bytes("***").is_err());
        let mut headers = axum::http::HeaderMap::new();
        assert_eq!(keepalive_of(&headers), DEFAULT_KEEPALIVE);
        headers.insert("Keepalive-Ping-Interval", "5".parse().unwrap());
        assert_eq!(keepalive_of(&headers), Duration::from_secs(5));
        headers.insert("Keepalive-Ping-Interval", "99999".parse().unwrap());
        assert_eq!(keepalive_of(&headers), MAX_KEEPALIVE);
    }
}
