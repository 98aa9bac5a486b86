//! E2B's control plane: create (`POST /sandboxes`, `/v2/sandboxes`),
//! connect, list (`GET /sandboxes`, `/v2/sandboxes`, with metadata and
//! state filters), info, set timeout, kill and metrics, with E2B's status
//! codes and `{"code": STATUS, "message": …}` errors.
//!
//! An E2B sandbox is an airlock sandbox of the caller's: its id is its
//! name (in the caller's own namespace), its template the policy it runs
//! under (`base` is the daemon's default), its metadata its labels. It is
//! created, stopped and removed by the native API's own functions; its
//! timeout is its deadline, and at the deadline it stops as any sandbox
//! does. A sandbox that stopped is no longer an E2B sandbox (E2B has no
//! stopped state): it is not listed, and answers 404, until it is killed
//! (removed).

use std::collections::BTreeMap;
use std::sync::Arc;

use airlock_policy::Policy;
use airlock_runtime::supervisor::SupervisorClient;
use axum::extract::{Extension, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::E2b;
use crate::api::sandboxes::{CreateBody, create_sandbox, prepare_create, remove_sandbox};
use crate::api::{DurationArg, label_filter};
use crate::auth::Peer;
use crate::db::E2bAccess;
use crate::error::ApiError;
use crate::extract::{JsonBody, QueryPairs};
use crate::sandbox::{self, ApiState, Loaded};

/// The template that means "the daemon's default policy".
const DEFAULT_TEMPLATE: &str = "base";
/// Longest timeout accepted, as E2B's (24 hours on its largest plans).
const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
/// Page size of the v2 listing when the client names none, and the most.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

pub(crate) fn router(state: Arc<E2b>) -> axum::Router {
    axum::Router::new()
        .route("/sandboxes", post(create).get(list_v1))
        .route("/v2/sandboxes", post(create).get(list_v2))
        .route("/sandboxes/{id}", get(info).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .fallback(no_route)
        .with_state(state)
}

/// An error as E2B's API words it.
pub(crate) struct ControlError(ApiError);

impl From<ApiError> for ControlError {
    fn from(e: ApiError) -> ControlError {
        ControlError(e)
    }
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        if self.0.status.is_server_error() {
            tracing::error!(code = self.0.code, "{}", self.0.message);
        } else {
            tracing::debug!(status = self.0.status.as_u16(), code = self.0.code, "{}", self.0.message);
        }
        error_response(&self.0)
    }
}

pub(crate) fn error_response(e: &ApiError) -> Response {
    super::files::plain_error(e.status, &e.message)
}

async fn no_route(request: Request) -> ControlError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!("{} {} is not served by airlock's E2B API", request.method(), request.uri().path()),
    )
    .into()
}

/// A JSON body, refused in E2B's words.
struct Body<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ControlError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ControlError> {
        JsonBody::<T>::from_request(request, state).await.map(|JsonBody(v)| Body(v)).map_err(ControlError)
    }
}

/// A sandbox id as a name: anything else is a sandbox that does not exist.
fn sandbox_id(id: &str) -> Result<String, ApiError> {
    airlock_runtime::state::validate_name(id).map_err(|_| not_found(id))?;
    Ok(id.to_owned())
}

pub(crate) fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("sandbox \"{id}\" doesn't exist or you don't have access to it"),
    )
}

/// The caller's running sandbox `id`: a stopped one is not found either.
fn running(app: &crate::app::App, peer: &Peer, id: &str) -> Result<Loaded, ApiError> {
    let loaded = sandbox::authorize(app, peer, id)
        .map_err(|e| if e.status == StatusCode::NOT_FOUND { not_found(id) } else { e })?;
    if loaded.state != ApiState::Running {
        return Err(not_found(id));
    }
    Ok(loaded)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    #[serde(default)]
    network: Option<NetworkConfig>,
    #[serde(default)]
    cpu_count: Option<u32>,
    #[serde(default)]
    auto_pause: Option<bool>,
    #[serde(default)]
    auto_resume: Option<serde_json::Value>,
    #[serde(default)]
    mcp: Option<serde_json::Value>,
    #[serde(default)]
    volume_mounts: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetworkConfig {
    #[serde(default)]
    allow_out: Vec<String>,
    #[serde(default)]
    deny_out: Vec<String>,
    #[serde(default)]
    allow_public_traffic: Option<bool>,
    /// Anything else E2B's network config has: refused when set.
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

fn refused(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("unsupported", message)
}

/// The native create request an E2B one maps to: what airlock cannot honour
/// is refused, never ignored.
fn create_body(request: NewSandbox) -> Result<CreateBody, ApiError> {
    let policy = match request.template_id.as_str() {
        DEFAULT_TEMPLATE | "" => None,
        other => Some(other.to_owned()),
    };
    if request.auto_pause == Some(true) || request.auto_resume.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(refused(
            "airlock sandboxes cannot be paused or resumed: leave autoPause/autoResume unset",
        ));
    }
    if request.mcp.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(refused("mcp: airlock does not run an MCP gateway inside sandboxes (see `airlock mcp`)"));
    }
    if request.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(refused("volumeMounts: airlock mounts a workspace, not E2B volumes"));
    }
    let mut allow = Vec::new();
    if let Some(network) = request.network {
        if !network.deny_out.is_empty() {
            return Err(refused(
                "network.denyOut: airlock's egress is an allowlist; name what to allow (allowOut)",
            ));
        }
        if network.allow_public_traffic == Some(false) {
            return Err(refused("network.allowPublicTraffic: airlock serves no sandbox traffic publicly"));
        }
        if let Some((key, _)) = network.other.iter().find(|(_, v)| !v.is_null()) {
            return Err(refused(format!("network.{key} is not supported by airlock")));
        }
        allow = network.allow_out;
    }
    if let Some(internet) = request.allow_internet_access {
        check_internet(policy.as_deref(), internet, !allow.is_empty())?;
    }
    let timeout = match request.timeout {
        None => None,
        Some(0) => return Err(ApiError::bad_request("invalid_request", "timeout must be at least 1 second")),
        Some(secs) if secs > MAX_TIMEOUT_SECS => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("timeout must be at most {MAX_TIMEOUT_SECS} seconds"),
            ));
        }
        Some(secs) => Some(DurationArg::Seconds(secs)),
    };
    Ok(CreateBody {
        policy,
        env: request.env_vars.unwrap_or_default(),
        labels: request.metadata.unwrap_or_default(),
        timeout,
        cpus: request.cpu_count.map(f64::from),
        allow,
        ..CreateBody::default()
    })
}

/// `allow_internet_access` only where the policy already says so: airlock
/// does not widen (or narrow) a policy's egress behind its back.
fn check_internet(policy: Option<&str>, wanted: bool, allowing: bool) -> Result<(), ApiError> {
    let name = policy.unwrap_or("dev");
    // A policy file (root only) is judged when it is loaded, by the runtime.
    let Some(resolved) = Policy::builtin(name) else { return Ok(()) };
    let has = resolved.network.has_egress();
    match (wanted, has) {
        (true, false) if !allowing => Err(refused(format!(
            "allow_internet_access: policy {name} gives sandboxes no internet access; choose a template (policy) \
             whose egress allows it, or name hosts in network.allowOut"
        ))),
        (false, true) => Err(refused(format!(
            "allow_internet_access=false: policy {name} allows egress; choose a template (policy) without it"
        ))),
        _ => Ok(()),
    }
}

/// The `domain` a sandbox's ports are named under: the SDKs' `get_host(P)`
/// is `P-ID.<domain>`, a name this listener routes to port P. It is the
/// name the caller reached this listener by, with `localhost` for a
/// loopback address (`*.localhost` resolves to loopback); `None` when the
/// caller used another IP address, under which no name can be made.
fn sandbox_domain(headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?.trim();
    let (name, port_suffix) = match host.strip_prefix('[') {
        Some(v6) => v6.split_once(']')?,
        None => match host.rsplit_once(':') {
            Some((name, _)) => (name, &host[name.len()..]),
            None => (host, ""),
        },
    };
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        return Some(format!("localhost{port_suffix}"));
    }
    if name.is_empty() || name.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    Some(host.to_owned())
}

/// The `Sandbox` answer to create and connect.
fn created(loaded: &Loaded, id: &str, token: &str, domain: Option<String>) -> serde_json::Value {
    serde_json::json!({
        "templateID": loaded.policy(),
        "sandboxID": id,
        "clientID": "airlock",
        "envdVersion": super::ENVD_VERSION,
        "envdAccessToken": token,
        "alias": loaded.policy(),
        "domain": domain,
    })
}

fn access_of(loaded: &Loaded) -> E2bAccess {
    E2bAccess {
        sandbox: loaded.name().to_owned(),
        owner_uid: loaded.owner_uid,
        created_at: loaded.created_at(),
    }
}

async fn create(
    State(e2b): State<Arc<E2b>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Body(request): Body<NewSandbox>,
) -> Result<Response, ControlError> {
    let domain = sandbox_domain(&headers);
    let prepared = prepare_create(&peer, create_body(request)?)?;
    let answer = e2b
        .app
        .blocking(move |app| {
            let loaded = create_sandbox(app, &peer, prepared)?;
            let id = app
                .scope(&peer)
                .shown(loaded.name(), loaded.owner_uid)
                .unwrap_or_else(|| loaded.name().to_owned());
            let token = super::access::issue(app, &access_of(&loaded))?;
            Ok(created(&loaded, &id, &token, domain))
        })
        .await?;
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct TimeoutBody {
    #[serde(default)]
    timeout: Option<u64>,
}

/// Sets the sandbox's deadline to `secs` from now: E2B's timeout.
fn set_deadline(loaded: &Loaded, id: &str, secs: u64) -> Result<(), ApiError> {
    if secs > MAX_TIMEOUT_SECS {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("timeout must be at most {MAX_TIMEOUT_SECS} seconds"),
        ));
    }
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    SupervisorClient::at(&loaded.dir).set_deadline(now + secs).map_err(|e| {
        ApiError::bad_request("invalid_request", format!("setting the timeout of sandbox {id}: {e}"))
    })
}

async fn set_timeout(
    State(e2b): State<Arc<E2b>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    Body(body): Body<TimeoutBody>,
) -> Result<StatusCode, ControlError> {
    let id = sandbox_id(&id)?;
    let Some(secs) = body.timeout else {
        return Err(ApiError::bad_request("invalid_request", "timeout (seconds) is required").into());
    };
    e2b.app
        .blocking(move |app| {
            let loaded = running(app, &peer, &id)?;
            set_deadline(&loaded, &id, secs)?;
            app.record_event(
                Some(loaded.name()),
                Some(loaded.owner_uid),
                "timeout_set",
                serde_json::json!({ "seconds": secs }),
            );
            Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn connect(
    State(e2b): State<Arc<E2b>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body<TimeoutBody>,
) -> Result<Response, ControlError> {
    let id = sandbox_id(&id)?;
    let domain = sandbox_domain(&headers);
    let answer = e2b
        .app
        .blocking(move |app| {
            let loaded = running(app, &peer, &id)?;
            if let Some(secs) = body.timeout {
                // Connecting extends the timeout, never shortens it (E2B).
                let (detail, _) = airlock_runtime::view::Detail::read(
                    &loaded.dir,
                    loaded.meta.as_ref(),
                    loaded.state,
                    loaded.live,
                );
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                if detail.deadline_unix.is_none_or(|d| d < now + secs) {
                    set_deadline(&loaded, &id, secs)?;
                }
            }
            let token = super::access::issue(app, &access_of(&loaded))?;
            Ok(created(&loaded, &id, &token, domain))
        })
        .await?;
    Ok(axum::Json(answer).into_response())
}

async fn kill(
    State(e2b): State<Arc<E2b>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> Result<StatusCode, ControlError> {
    let id = sandbox_id(&id)?;
    e2b.app
        .blocking(move |app| {
            remove_sandbox(app, &peer, &id)
                .map_err(|e| if e.status == StatusCode::NOT_FOUND { not_found(&id) } else { e })
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A `ListedSandbox` (and with `detail`, a `SandboxDetail`).
fn listed(loaded: &Loaded, id: &str) -> serde_json::Value {
    let (detail, _) =
        airlock_runtime::view::Detail::read(&loaded.dir, loaded.meta.as_ref(), loaded.state, loaded.live);
    let limits = detail.limits.unwrap_or_default();
    let mb = |key: &str| limits.get(key).and_then(|v| v.as_u64()).map_or(0, |b| b >> 20);
    let cpus = limits.get("cpus").and_then(|v| v.as_f64()).map_or(1, |c| c.ceil().max(1.0) as u64);
    serde_json::json!({
        "templateID": loaded.policy(),
        "alias": loaded.policy(),
        "sandboxID": id,
        "clientID": "airlock",
        "startedAt": loaded.created_at(),
        "endAt": detail.deadline.unwrap_or_else(|| loaded.created_at()),
        "cpuCount": cpus,
        "memoryMB": mb("memory"),
        "diskSizeMB": mb("disk"),
        "state": "running",
        "envdVersion": super::ENVD_VERSION,
        "metadata": loaded.labels,
    })
}

async fn info(
    State(e2b): State<Arc<E2b>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ControlError> {
    let id = sandbox_id(&id)?;
    let domain = sandbox_domain(&headers);
    let answer = e2b
        .app
        .blocking(move |app| {
            let loaded = running(app, &peer, &id)?;
            let mut detail = listed(&loaded, &id);
            detail["domain"] = serde_json::json!(domain);
            Ok(detail)
        })
        .await?;
    Ok(axum::Json(answer).into_response())
}

/// The `metadata` filter: `k=v&k2=v2`, each key and value percent-encoded
/// once more inside the query's own encoding.
fn metadata_filter(query: &QueryPairs) -> Result<Vec<(String, String)>, ApiError> {
    let Some(text) = query.get("metadata") else { return Ok(Vec::new()) };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(text)
        .map_err(|e| ApiError::bad_request("invalid_query", format!("metadata: {e}")))?;
    pairs
        .into_iter()
        .map(|(k, v)| {
            let decode = |s: &str| {
                serde_urlencoded::from_str::<Vec<(String, String)>>(&format!("x={s}"))
                    .ok()
                    .and_then(|mut p| p.pop())
                    .map(|(_, v)| v)
                    .unwrap_or_else(|| s.to_owned())
            };
            label_filter(&format!("{}={}", decode(&k), decode(&v)))
        })
        .collect()
}

fn matching(
    app: &crate::app::App,
    peer: &Peer,
    filter: &[(String, String)],
) -> Result<Vec<serde_json::Value>, ApiError> {
    let scope = app.scope(peer);
    Ok(sandbox::visible(app, peer)?
        .iter()
        .filter(|l| l.state == ApiState::Running)
        .filter(|l| filter.iter().all(|(k, v)| l.labels.get(k) == Some(v)))
        .map(|l| {
            let id = scope.shown(l.name(), l.owner_uid).unwrap_or_else(|| l.name().to_owned());
            listed(l, &id)
        })
        .collect())
}

async fn list_v1(
    State(e2b): State<Arc<E2b>>,
    Extension(peer): Extension<Peer>,
    query: QueryPairs,
) -> Result<Response, ControlError> {
    query.only(&["metadata"])?;
    let filter = metadata_filter(&query)?;
    let all = e2b.app.blocking(move |app| matching(app, &peer, &filter)).await?;
    Ok(axum::Json(all).into_response())
}

async fn list_v2(
    State(e2b): State<Arc<E2b>>,
    Extension(peer): Extension<Peer>,
    query: QueryPairs,
) -> Result<Response, ControlError> {
    query.only(&["metadata", "state", "limit", "nextToken", "order", "startedAfter", "template"])?;
    let filter = metadata_filter(&query)?;
    // Every sandbox that runs is "running"; none is ever "paused".
    let states: Vec<String> = query.all("state").flat_map(|s| s.split(',')).map(str::to_owned).collect();
    if let Some(bad) = states.iter().find(|s| !matches!(s.as_str(), "running" | "paused")) {
        return Err(
            ApiError::bad_request("invalid_query", format!("state {bad:?}: running or paused")).into()
        );
    }
    let wants_running = states.is_empty() || states.iter().any(|s| s == "running");
    let limit = match query.get("limit") {
        None => DEFAULT_PAGE,
        Some(text) => {
            text.parse::<usize>().ok().filter(|n| (1..=MAX_PAGE).contains(n)).ok_or_else(|| {
                ApiError::bad_request("invalid_query", format!("limit must be 1-{MAX_PAGE}"))
            })?
        }
    };
    let offset = match query.get("nextToken") {
        None => 0,
        Some(token) => token
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("invalid_query", "nextToken is not one this API gave"))?,
    };
    let template = query.get("template").map(str::to_owned);
    let descending = query.get("order") == Some("desc");
    let mut all = if wants_running {
        e2b.app.blocking(move |app| matching(app, &peer, &filter)).await?
    } else {
        Vec::new()
    };
    if let Some(template) = template {
        all.retain(|s| s["templateID"] == template.as_str());
    }
    if descending {
        all.reverse();
    }
    let page: Vec<serde_json::Value> = all.iter().skip(offset).take(limit).cloned().collect();
    let mut response = axum::Json(page).into_response();
    if offset + limit < all.len()
        && let Ok(value) = HeaderValue::from_str(&(offset + limit).to_string())
    {
        response.headers_mut().insert("x-next-token", value);
    }
    Ok(response)
}

/// One sample of the sandbox's use, from its cgroup: memory now, CPU as the
/// average since it started.
async fn metrics(
    State(e2b): State<Arc<E2b>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> Result<Response, ControlError> {
    let id = sandbox_id(&id)?;
    let sample = e2b
        .app
        .blocking(move |app| {
            let loaded = running(app, &peer, &id)?;
            let (detail, _) = airlock_runtime::view::Detail::read(
                &loaded.dir,
                loaded.meta.as_ref(),
                loaded.state,
                loaded.live,
            );
            let limits = detail.limits.unwrap_or_default();
            let usage = airlock_runtime::ops::usage(&loaded.dir);
            let (mem_used, usage_usec) = usage.map_or((0, 0), |u| (u.memory_bytes, u.cpu_usec));
            let cpus = limits.get("cpus").and_then(|v| v.as_f64()).unwrap_or(1.0).max(0.01);
            let now = std::time::SystemTime::now();
            // The sandbox's directory was made when it was created.
            let born = std::fs::metadata(loaded.dir.path())
                .and_then(|m| m.created().or_else(|_| m.modified()))
                .unwrap_or(now);
            let elapsed_usec = now.duration_since(born).map_or(1, |d| d.as_micros().max(1)) as u64;
            let unix = now.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            Ok(serde_json::json!([{
                "timestamp": airlock_proto::time::rfc3339_utc(now),
                "timestampUnix": unix,
                "cpuCount": cpus.ceil() as u64,
                "cpuUsedPct": (usage_usec as f64 / elapsed_usec as f64 / cpus * 100.0).min(100.0),
                "memUsed": mem_used,
                "memTotal": limits.get("memory").and_then(|v| v.as_u64()).unwrap_or(0),
                "memCache": 0,
                "diskUsed": 0,
                "diskTotal": limits.get("disk").and_then(|v| v.as_u64()).unwrap_or(0),
            }]))
        })
        .await?;
    Ok(axum::Json(sample).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn body(json: &str) -> Result<CreateBody, ApiError> {
        create_body(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn create_requests_map_onto_the_policy_or_are_refused() {
        let b = body(r#"{"templateID":"base","timeout":30,"metadata":{"team":"a"},"envVars":{"A":"1"},"autoPause":false}"#).unwrap();
        assert_eq!(b.policy, None);
        assert_eq!(b.labels["team"], "a");
        assert_eq!(b.env["A"], "1");
        assert!(matches!(b.timeout, Some(DurationArg::Seconds(30))));
        assert_eq!(body(r#"{"templateID":"ci"}"#).unwrap().policy.as_deref(), Some("ci"));
        for refused in [
            r#"{"templateID":"base","autoPause":true}"#,
            r#"{"templateID":"base","volumeMounts":[{"name":"v","path":"/v"}]}"#,
            r#"{"templateID":"base","network":{"denyOut":["0.0.0.0/0"]}}"#,
            r#"{"templateID":"base","network":{"maskRequestHost":"x"}}"#,
            r#"{"templateID":"base","timeout":0}"#,
        ] {
            assert!(body(refused).is_err(), "{refused}");
        }
        let allowed = body(r#"{"templateID":"base","network":{"allowOut":["example.com"]}}"#).unwrap();
        assert_eq!(allowed.allow, ["example.com"]);
    }

    #[test]
    fn the_domain_is_the_name_the_listener_was_reached_by() {
        let domain = |host: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, host.parse().unwrap());
            sandbox_domain(&headers)
        };
        assert_eq!(domain("127.0.0.1:3000").as_deref(), Some("localhost:3000"));
        assert_eq!(domain("[::1]:3000").as_deref(), Some("localhost:3000"));
        assert_eq!(domain("localhost").as_deref(), Some("localhost"));
        assert_eq!(domain("airlock.example.com:3000").as_deref(), Some("airlock.example.com:3000"));
        assert_eq!(domain("192.0.2.7:3000"), None);
        assert_eq!(sandbox_domain(&HeaderMap::new()), None);
    }

    #[test]
    fn metadata_filters_are_decoded_twice() {
        let query = QueryPairs(serde_urlencoded::from_str("metadata=team%3Da%26owner%3Dme%2520you").unwrap());
        assert_eq!(
            metadata_filter(&query).unwrap(),
            [("team".to_string(), "a".to_string()), ("owner".to_string(), "me you".to_string())]
        );
    }
}
