//! envd access tokens. Each create or connect issues a fresh random secret
//! for one sandbox; the index keeps only its SHA-256, with the sandbox's
//! stored name, owner and creation time. An envd request must carry one
//! (`X-Access-Token`) for the sandbox its `E2b-Sandbox-Id` names, and then
//! acts as that sandbox's owner: without it the answer is 401 and nothing
//! is read or touched.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Response, StatusCode};

use super::E2b;
use crate::auth::Peer;
use crate::db::E2bAccess;
use crate::error::ApiError;

/// Who an envd request acts for, once its token checked out.
#[derive(Debug, Clone)]
pub(crate) struct EnvdCaller {
    /// The sandbox's owner.
    pub peer: Peer,
    /// The sandbox as its owner names it (the E2B sandbox id).
    pub sandbox_id: String,
    /// Its stored name (index, process table).
    pub stored: String,
}

/// Why an envd request was refused before it reached a handler.
pub(crate) enum Refusal {
    /// No token, or one the daemon never issued.
    Unauthorized(&'static str),
    /// A token the daemon issued, but for another sandbox than the one
    /// named: envd answers 401; a port route answers as for a sandbox
    /// that does not exist.
    OtherSandbox(String),
    /// The token was this sandbox's, but the sandbox is gone or stopped:
    /// what E2B's proxy answers (the SDKs read "was not found" as "the
    /// sandbox is not running").
    Gone(String),
    Failed(ApiError),
}

impl Refusal {
    pub(crate) fn into_response(self) -> Response<Body> {
        match self {
            Refusal::Unauthorized(message) => super::files::plain_error(StatusCode::UNAUTHORIZED, message),
            Refusal::OtherSandbox(_) => super::files::plain_error(
                StatusCode::UNAUTHORIZED,
                "the access token is not valid for this sandbox",
            ),
            Refusal::Gone(id) => super::files::plain_error(StatusCode::BAD_GATEWAY, &gone_message(&id)),
            Refusal::Failed(e) => super::files::plain_error(e.status, &e.message),
        }
    }
}

/// What a request to a sandbox that no longer runs is told.
pub(crate) fn gone_message(id: &str) -> String {
    format!("The sandbox {id} was not found: it is not running (stopped, timed out or killed)")
}

/// A fresh token: 32 random bytes, hex.
pub(crate) fn new_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| ApiError::internal("no randomness for an access token"))?;
    Ok(hex(&bytes))
}

pub(crate) fn digest_hex(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Issues a token for the sandbox `access` describes and records its hash.
pub(crate) fn issue(app: &crate::app::App, access: &E2bAccess) -> Result<String, ApiError> {
    let token = new_token()?;
    app.db.e2b_grant(&digest_hex(&token), access)?;
    Ok(token)
}

/// Checks an envd request's token against the sandbox it names.
pub(crate) async fn envd_caller(
    state: &Arc<E2b>,
    headers: &HeaderMap,
    sandbox_id: &str,
) -> Result<EnvdCaller, Refusal> {
    let token =
        headers.get("x-access-token").and_then(|v| v.to_str().ok()).map(str::trim).filter(|t| !t.is_empty());
    let Some(token) = token else {
        tracing::warn!(sandbox = sandbox_id, "denied: envd request without an access token");
        return Err(Refusal::Unauthorized("this sandbox's API needs its access token (X-Access-Token)"));
    };
    let digest = digest_hex(token);
    let id = sandbox_id.to_owned();
    let app = state.app.clone();
    let checked = app
        .blocking(move |app| {
            let Some(access) = app.db.e2b_access(&digest)? else { return Ok(Checked::UnknownToken) };
            let peer =
                Peer { uid: access.owner_uid, gid: crate::tcp::primary_gid(access.owner_uid), pid: None };
            // The token names a sandbox by its stored name; the request by
            // the owner's name for it. They must be the same sandbox.
            let Ok(stored) = app.scope(&peer).stored(&id) else { return Ok(Checked::OtherSandbox) };
            if stored != access.sandbox {
                return Ok(Checked::OtherSandbox);
            }
            let current = match crate::sandbox::authorize(app, &peer, &id) {
                Ok(loaded) => loaded,
                Err(e) if e.status == StatusCode::NOT_FOUND => return Ok(Checked::Gone),
                Err(e) => return Err(e),
            };
            if current.created_at() != access.created_at || current.owner_uid != access.owner_uid {
                // A later sandbox of the same name: the token's is gone.
                return Ok(Checked::Gone);
            }
            if current.state != crate::sandbox::ApiState::Running {
                return Ok(Checked::Gone);
            }
            Ok(Checked::Caller(EnvdCaller { peer, sandbox_id: id, stored }))
        })
        .await;
    let not_issued = |refusal: Refusal| {
        tracing::warn!(
            sandbox = sandbox_id,
            "denied: envd request with an access token not issued for this sandbox"
        );
        Err(refusal)
    };
    match checked {
        Ok(Checked::Caller(caller)) => {
            crate::serve::admit(Some(caller.peer), &state.app).map(|_| caller).map_err(Refusal::Failed)
        }
        Ok(Checked::Gone) => Err(Refusal::Gone(sandbox_id.to_owned())),
        Ok(Checked::UnknownToken) => {
            not_issued(Refusal::Unauthorized("the access token is not valid for this sandbox"))
        }
        Ok(Checked::OtherSandbox) => not_issued(Refusal::OtherSandbox(sandbox_id.to_owned())),
        Err(e) => Err(Refusal::Failed(e)),
    }
}

/// What the index says of a token and the sandbox a request names.
enum Checked {
    Caller(EnvdCaller),
    /// The token's sandbox, but it no longer runs.
    Gone,
    UnknownToken,
    OtherSandbox,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_eq!(digest_hex("test"), "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
    }
}
