//! Request extractors whose every rejection is an [`ApiError`]: JSON bodies
//! (unknown fields refused, size-limited), sandbox names from the path, and
//! query strings.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest request body the API reads.
pub const BODY_LIMIT: usize = 1 << 20;

/// A JSON body. An empty body reads as `{}`, so requests whose fields are
/// all optional can be sent without one. The content type, when given, must
/// be JSON (or curl's default for `-d`, form-encoded: the body is parsed as
/// JSON all the same).
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if let Some(content_type) = req.headers().get(CONTENT_TYPE) {
            let essence = content_type.to_str().unwrap_or("").split(';').next().unwrap_or("").trim();
            let essence_lower = essence.to_ascii_lowercase();
            // curl's `-d` labels its body form-encoded unless told otherwise;
            // the body must still be JSON.
            let json = essence_lower == "application/json"
                || essence_lower.ends_with("+json")
                || essence_lower == "application/x-www-form-urlencoded";
            if !json {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    format!("expected a JSON body (Content-Type: application/json), got {essence:?}"),
                ));
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    "payload_too_large",
                    format!("the request body is larger than {} bytes", BODY_LIMIT),
                )
            } else {
                ApiError::bad_request("invalid_body", rejection.body_text())
            }
        })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &bytes };
        serde_json::from_slice(bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))
    }
}

/// The `{name}` of a sandbox route, validated as a sandbox name.
pub struct SandboxName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for SandboxName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))?;
        airlock_runtime::state::validate_name(&name)?;
        Ok(SandboxName(name))
    }
}

/// The query string as key/value pairs (repeated keys kept, in order).
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str::<Vec<(String, String)>>(query)
            .map(QueryPairs)
            .map_err(|e| ApiError::bad_request("invalid_query", format!("invalid query string: {e}")))
    }
}

impl QueryPairs {
    /// Refuses keys other than `known`.
    pub fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        match self.0.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => Err(ApiError::bad_request(
                "invalid_query",
                format!("unknown query parameter {k:?}; known: {}", known.join(", ")),
            )),
            None => Ok(()),
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None | Some("false" | "0" | "no") => Ok(false),
            Some("" | "true" | "1" | "yes") => Ok(true),
            Some(other) => Err(ApiError::bad_request(
                "invalid_query",
                format!("{key}={other:?}: expected true or false"),
            )),
        }
    }
}
