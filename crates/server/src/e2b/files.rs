//! envd's plain HTTP routes: `GET /files?path=…` (a file's bytes), `POST
//! /files[?path=…]` (an upload, `multipart/form-data` with one part per
//! file or `application/octet-stream` for the one `path` names) and `GET
//! /health`. Errors are `{"code": STATUS, "message": …}`, as envd answers.
//!
//! Reads and writes go through the native files API's own streaming
//! (`api::files::stream_file`, `write_body`): the sandbox's agent does the
//! work, a write replaces its target only once complete. As envd does, an
//! upload makes the directories above its target first.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::E2b;
use super::access::EnvdCaller;
use crate::error::ApiError;
use crate::extract::QueryPairs;

/// The largest upload held in memory: a multipart body, or an octet-stream
/// one without a declared length. One with a length is streamed, up to the
/// native API's limit.
pub(crate) const BUFFERED_UPLOAD_LIMIT: usize = 64 << 20;

pub(crate) fn routes() -> axum::Router<Arc<E2b>> {
    axum::Router::new().route("/files", get(read).post(upload)).route("/health", get(health))
}

/// An envd-style error answer.
pub(crate) fn plain_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The daemon's error as envd words it.
struct FilesRefusal(ApiError);

impl From<ApiError> for FilesRefusal {
    fn from(e: ApiError) -> FilesRefusal {
        FilesRefusal(e)
    }
}

impl IntoResponse for FilesRefusal {
    fn into_response(self) -> Response {
        tracing::debug!(status = self.0.status.as_u16(), code = self.0.code, "{}", self.0.message);
        plain_error(self.0.status, &self.0.message)
    }
}

async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

fn path_of(query: &QueryPairs) -> Result<Option<String>, ApiError> {
    query.only(&["path", "username", "signature", "signature_expiration"])?;
    query.get("path").map(checked_path).transpose()
}

fn checked_path(path: &str) -> Result<String, ApiError> {
    super::filesystem::absolute(path).map_err(|e| ApiError::bad_request("invalid_path", e.message))
}

async fn read(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    query: QueryPairs,
) -> Result<Response, FilesRefusal> {
    let Some(path) = path_of(&query)? else {
        return Err(ApiError::bad_request("invalid_path", "the path query parameter is required").into());
    };
    let target = crate::api::exec::connect(&e2b.app, caller.peer, &caller.sandbox_id).await?;
    Ok(crate::api::files::stream_file(&e2b.app, target, path).await?)
}

async fn upload(
    State(e2b): State<Arc<E2b>>,
    Extension(caller): Extension<EnvdCaller>,
    query: QueryPairs,
    request: Request,
) -> Result<Response, FilesRefusal> {
    use http_body::Body as _;
    let path = path_of(&query)?;
    let content_type =
        request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    if request.headers().get(header::CONTENT_ENCODING).is_some() {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "compressed uploads are not accepted; send the file uncompressed",
        )
        .into());
    }
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let mut written = Vec::new();
    if essence == "multipart/form-data" {
        let boundary = boundary(&content_type)?;
        let body = buffered(request.into_body()).await?;
        let parts = multipart(&body, &boundary)?;
        if parts.len() > 1 && path.is_some() {
            return Err(ApiError::bad_request(
                "invalid_request",
                "path names one file; this upload has several",
            )
            .into());
        }
        for part in parts {
            let target_path = match (&path, &part.filename) {
                (Some(path), _) => path.clone(),
                (None, Some(name)) => checked_path(name)?,
                (None, None) => {
                    return Err(ApiError::bad_request(
                        "invalid_request",
                        "a file part has no filename to write to",
                    )
                    .into());
                }
            };
            let size = part.data.len() as u64;
            write_one(&e2b, &caller, &target_path, size, Body::from(part.data)).await?;
            written.push(target_path);
        }
    } else {
        let Some(path) = path else {
            return Err(ApiError::bad_request("invalid_path", "the path query parameter is required").into());
        };
        let body = request.into_body();
        match body.size_hint().exact() {
            Some(size) => write_one(&e2b, &caller, &path, size, body).await?,
            None => {
                let data = buffered(body).await?;
                write_one(&e2b, &caller, &path, data.len() as u64, Body::from(data)).await?;
            }
        }
        written.push(path);
    }
    let infos: Vec<serde_json::Value> = written
        .iter()
        .map(|p| {
            let name = p.rsplit('/').next().unwrap_or("");
            serde_json::json!({ "name": name, "type": "file", "path": p })
        })
        .collect();
    Ok(axum::Json(infos).into_response())
}

/// Makes the directories above `path`, then writes the file.
async fn write_one(
    e2b: &Arc<E2b>,
    caller: &EnvdCaller,
    path: &str,
    size: u64,
    body: Body,
) -> Result<(), ApiError> {
    if size > crate::api::files::FILE_LIMIT {
        return Err(too_large(crate::api::files::FILE_LIMIT));
    }
    if let Some((parent, _)) = path.rsplit_once('/').filter(|(parent, _)| !parent.is_empty()) {
        let parent = parent.to_owned();
        super::filesystem::on_files(e2b, caller, move |client| {
            airlock_runtime::files::mkdir(client, &parent, true, None)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", e.message))?;
        // Making the directories is part of the write, which is recorded.
    }
    let target = crate::api::exec::connect(&e2b.app, caller.peer, &caller.sandbox_id).await?;
    crate::api::files::write_body(&e2b.app, target, path, None, size, body).await.map(drop)
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the upload is larger than {limit} bytes"),
    )
}

async fn buffered(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, BUFFERED_UPLOAD_LIMIT)
        .await
        .map_err(|_| too_large(BUFFERED_UPLOAD_LIMIT as u64))
}

fn boundary(content_type: &str) -> Result<String, ApiError> {
    content_type
        .split(';')
        .skip(1)
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .ok_or_else(|| {
            ApiError::bad_request("invalid_body", "multipart/form-data needs a boundary of 1-70 characters")
        })
}

/// One part of a multipart body.
#[derive(Debug, PartialEq, Eq)]
struct Part {
    filename: Option<String>,
    data: Bytes,
}

/// The parts of a `multipart/form-data` body (RFC 7578); only each part's
/// `Content-Disposition` filename is read of its headers.
fn multipart(body: &Bytes, boundary: &str) -> Result<Vec<Part>, ApiError> {
    let bad = |why: &str| ApiError::bad_request("invalid_body", format!("malformed multipart body: {why}"));
    let delimiter = format!("--{boundary}");
    let next_delimiter = format!("\r\n--{boundary}");
    let Some(first) = find(body, delimiter.as_bytes(), 0) else { return Err(bad("no boundary")) };
    let mut at = first + delimiter.len();
    let mut parts = Vec::new();
    loop {
        if body[at..].starts_with(b"--") {
            return Ok(parts);
        }
        if !body[at..].starts_with(b"\r\n") {
            return Err(bad("a boundary is not followed by a line end"));
        }
        at += 2;
        let Some(head_end) = find(body, b"\r\n\r\n", at) else {
            return Err(bad("a part has no end of headers"));
        };
        let head = std::str::from_utf8(&body[at..head_end]).map_err(|_| bad("part headers are not UTF-8"))?;
        let filename = head.lines().find_map(disposition_filename);
        let data_start = head_end + 4;
        let Some(data_end) = find(body, next_delimiter.as_bytes(), data_start) else {
            return Err(bad("a part is not closed by a boundary"));
        };
        parts.push(Part { filename, data: body.slice(data_start..data_end) });
        if parts.len() > 1000 {
            return Err(bad("more than 1000 parts"));
        }
        at = data_end + next_delimiter.len();
    }
}

/// The `filename` of a `Content-Disposition: form-data; …` header line.
fn disposition_filename(line: &str) -> Option<String> {
    let (name, value) = line.split_once(':')?;
    if !name.trim().eq_ignore_ascii_case("content-disposition") {
        return None;
    }
    value.split(';').skip(1).find_map(|param| {
        let (key, value) = param.trim().split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("filename")
            .then(|| value.trim().trim_matches('"').replace("\\\"", "\""))
    })
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|i| i + from)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn multipart_bodies_are_split_into_files() {
        let body = Bytes::from_static(
            b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/tmp/a.txt\"\r\n\
              Content-Type: application/octet-stream\r\n\r\nhello\r\n--xyz\r\n\
              Content-Disposition: form-data; name=\"file\"; filename=\"/tmp/b\"\r\n\r\n\r\n--x\r\n--xyz--\r\n",
        );
        let parts = multipart(&body, "xyz").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            parts[0],
            Part { filename: Some("/tmp/a.txt".into()), data: Bytes::from_static(b"hello") }
        );
        assert_eq!(parts[1].data, Bytes::from_static(b"\r\n--x"));
        for bad in [&b"no boundary"[..], b"--xyz\r\nheaders without end", b"--xyz\r\nA: b\r\n\r\nunclosed"] {
            assert!(multipart(&Bytes::copy_from_slice(bad), "xyz").is_err(), "{bad:?}");
        }
        assert_eq!(boundary("multipart/form-data; boundary=\"abc\"").unwrap(), "abc");
        assert!(boundary("multipart/form-data").is_err());
    }
}
