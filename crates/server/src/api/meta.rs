//! The daemon about itself: health, the OpenAPI document, Prometheus
//! metrics, and the JSON answers for routes that do not exist.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::IntoResponse;

use crate::app::App;
use crate::auth::Peer;
use crate::error::ApiError;
use crate::sandbox::{self, ApiState};

/// The committed OpenAPI document; a test keeps it and the router in sync.
pub const OPENAPI: &str = include_str!("../../openapi.json");

pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION"), "api": "v1" }))
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// `GET /metrics`, Prometheus text format. Every total is the caller's
/// own: their sandboxes, the execs in them, the responses to their
/// requests; root's cover everyone. A user learns nothing of the others'
/// activity from it.
pub async fn metrics(State(app): State<Arc<App>>, peer: Peer) -> Result<impl IntoResponse, ApiError> {
    let owner = peer.owner_filter();
    let by_state = app
        .blocking(move |app| {
            let mut counts: BTreeMap<&'static str, u64> =
                ApiState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
            for loaded in sandbox::visible(app, &peer)? {
                *counts.entry(loaded.state.as_str()).or_default() += 1;
            }
            Ok(counts)
        })
        .await?;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP airlock_sandboxes Sandboxes by state.");
    let _ = writeln!(out, "# TYPE airlock_sandboxes gauge");
    for (state, n) in &by_state {
        let _ = writeln!(out, "airlock_sandboxes{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP airlock_execs_total Processes started in your sandboxes through this daemon since it started."
    );
    let _ = writeln!(out, "# TYPE airlock_execs_total counter");
    let _ = writeln!(out, "airlock_execs_total {}", app.metrics.execs(owner));
    let _ = writeln!(
        out,
        "# HELP airlock_http_requests_total API responses to your requests by status since the daemon started."
    );
    let _ = writeln!(out, "# TYPE airlock_http_requests_total counter");
    for (status, n) in app.metrics.responses(owner) {
        let _ = writeln!(out, "airlock_http_requests_total{{status=\"{status}\"}} {n}");
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out))
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!("no API route {}; see /v1/openapi.json", uri.path()),
    )
}

pub async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not take this method; see /v1/openapi.json", uri.path()),
    )
}
