//! Errors: what the API answers (`ApiError`, always a JSON body with a
//! 4xx/5xx status) and why the daemon could not start (`DaemonError`).

use std::io;
use std::path::PathBuf;

use airlock_runtime::RunError;
use airlock_runtime::bundle::BundleError;
use airlock_runtime::ops::{ApplyError, OpError};
use airlock_runtime::ports::PortError;
use airlock_runtime::state::StateError;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::db::DbError;

/// An API failure: the status, a stable machine-readable code and a message
/// for the person. Rendered as `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// The answer for a sandbox that does not exist *or belongs to someone
    /// else*: the two must be indistinguishable.
    pub fn no_sandbox(name: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no sandbox named {name}"))
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The JSON body, also used outside axum (connection-level refusals).
    pub fn body(&self) -> String {
        serde_json::json!({ "error": { "code": self.code, "message": self.message } }).to_string()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Logged once, here at the boundary: server faults as errors, the
        // caller's mistakes only at debug level.
        if self.status.is_server_error() {
            tracing::error!(code = self.code, "{}", self.message);
        } else {
            tracing::debug!(status = self.status.as_u16(), code = self.code, "{}", self.message);
        }
        let body = self.body();
        (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> ApiError {
        let message = e.to_string();
        match e {
            StateError::InvalidName { .. } | StateError::ReservedName { .. } => {
                ApiError::bad_request("invalid_name", message)
            }
            StateError::NotFound { name } => ApiError::no_sandbox(&name),
            // Without the host path of the state directory: not the API's business.
            StateError::Exists { name, .. } => ApiError::conflict(
                "conflict",
                format!("a sandbox named {name} already exists; choose another name or remove it"),
            ),
            StateError::Busy { .. } => ApiError::conflict("conflict", message),
            StateError::CorruptMeta { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt_state", message)
            }
            _ => ApiError::internal(message),
        }
    }
}

impl From<RunError> for ApiError {
    fn from(e: RunError) -> ApiError {
        let message = e.to_string();
        match e {
            RunError::Policy(_)
            | RunError::PolicyRefused(_)
            | RunError::ImageRefused(_)
            | RunError::Ports(PortError::Forbidden { .. }) => {
                ApiError::bad_request("invalid_policy", message)
            }
            RunError::Ports(PortError::Syntax { .. } | PortError::Duplicate(_)) => {
                ApiError::bad_request("invalid_request", message)
            }
            RunError::Ports(PortError::Bind { .. }) | RunError::PortUnavailable(_) => {
                ApiError::conflict("port_unavailable", message)
            }
            RunError::StateDir(e) => e.into(),
            RunError::HostLacks { .. } | RunError::HostUnsupported(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "host_unsupported", message)
            }
            RunError::Vm(vm) if vm.is_host_unsupported() => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "host_unsupported", message)
            }
            RunError::WorkspaceDir(..) | RunError::WorkspaceIsRoot | RunError::WorkspaceRefused(_) => {
                ApiError::bad_request("invalid_workspace", message)
            }
            RunError::NoCommand | RunError::UserRefused(_) => {
                ApiError::bad_request("invalid_request", message)
            }
            // The request is fine; the host has no room for its image
            // within the budget its operator set.
            e if e.is_image_store_full() => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "image_budget_exceeded", message)
            }
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "create_failed", message),
        }
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> ApiError {
        let message = e.to_string();
        match e {
            OpError::Run(e) => e.into(),
            OpError::State(e) => e.into(),
            OpError::NoOverlay(_) => ApiError::conflict("no_overlay", message),
            OpError::StillRunning { .. } => ApiError::conflict("still_running", message),
            OpError::WritebackForbidden { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "writeback_forbidden", message)
            }
            OpError::Apply(ApplyError::DigestMismatch { .. } | ApplyError::ChangedWhileApplying { .. }) => {
                ApiError::conflict("digest_mismatch", message)
            }
            OpError::Apply(_) => ApiError::conflict("apply_refused", message),
            _ => ApiError::internal(message),
        }
    }
}

impl From<BundleError> for ApiError {
    fn from(e: BundleError) -> ApiError {
        let message = e.to_string();
        match e {
            BundleError::State(e) => e.into(),
            BundleError::Running(_) => ApiError::conflict("still_running", message),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "export_failed", message),
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "database", e.to_string())
    }
}

/// A blocking task that panicked or was cancelled: a bug, reported as 500
/// without taking the daemon down.
impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> ApiError {
        ApiError::internal(format!("a worker task failed: {e}"))
    }
}

/// Why the daemon could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot choose the socket path: {0}; pass --socket PATH")]
    NoSocketPath(String),
    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another airlock daemon is serving {socket} (it holds {lock}); stop it first, or pass another --socket"
    )]
    AlreadyRunning { socket: PathBuf, lock: PathBuf },
    #[error("{0} exists and is not a socket; move it away or pass another --socket")]
    NotASocket(PathBuf),
    #[error(
        "{path} is writable by other users (mode {mode:o}), so the socket in it could be replaced; \
         run `chmod o-w {path}` or pass another --socket"
    )]
    InsecureDir { path: PathBuf, mode: u32 },
    #[error(
        "--e2b-listen {0} is not a loopback address: the E2B API carries API keys and access tokens, so off \
         this host it is served only over TLS; pass --tls-cert and --tls-key, or listen on 127.0.0.1"
    )]
    E2bNeedsTls(std::net::SocketAddr),
    #[error("unknown group {0:?} for --group: give a group name from /etc/group or a numeric gid")]
    UnknownGroup(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("accepting connections on {path}: {source}")]
    Accept {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
