//! `/v1/sandboxes`: create, list, inspect, stop, extend, diff, apply, remove.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use airlock_policy::{Overrides, Policy, WorkspaceMode};
use airlock_runtime::ops;
use airlock_runtime::ports::{PortError, PortMapping};
use airlock_runtime::supervisor::{self, CreateRequest, SupervisorClient};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{DurationArg, SizeArg, check_env, check_labels, label_filter};
use crate::app::{App, Op};
use crate::auth::{Peer, check_workspace};
use crate::body::{ChannelBody, ChannelWriter};
use crate::error::ApiError;
use crate::extract::{JsonBody, QueryPairs, SandboxName};
use crate::sandbox::{self, ApiState, Loaded, SandboxView};

/// Longest single extension of a deadline.
const MAX_EXTEND_SECS: u64 = 7 * 24 * 3600;

/// `POST /v1/sandboxes`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub name: Option<String>,
    pub policy: Option<String>,
    pub workspace: Option<PathBuf>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub timeout: Option<DurationArg>,
    pub idle_timeout: Option<DurationArg>,
    pub memory: Option<SizeArg>,
    pub pids: Option<u64>,
    pub cpus: Option<f64>,
    #[serde(default)]
    pub allow: Vec<String>,
    /// overlay, ro, rw or none; the policy's mode when absent (none
    /// without a workspace). The policy decides which it permits.
    pub workspace_mode: Option<String>,
    /// process or microvm; the policy's tier when absent. A policy that
    /// requires microvm refuses process.
    pub tier: Option<String>,
    /// Ports to publish, each `[HOST_ADDR:]HOST_PORT:SANDBOX_PORT` as
    /// `airlock create -p` takes it.
    #[serde(default)]
    pub ports: Vec<String>,
    /// The OCI image the root comes from (`airlock create --image`).
    pub image: Option<String>,
    /// A container engine inside the sandbox's microVM (`airlock create
    /// --containers`), where the policy allows it.
    pub containers: Option<bool>,
    /// `UID[:GID]` every exec that names no user runs as, over the
    /// image's `User` (`airlock create --user`).
    pub user: Option<String>,
}

/// A create request checked against the caller's rights, ready for the
/// runtime.
pub struct PreparedCreate {
    pub request: CreateRequest,
    /// The resolved workspace a non-root caller was allowed; checked again
    /// against what the sandbox actually got.
    pub checked_workspace: Option<PathBuf>,
}

/// A caller who is not root names images by registry reference only: a
/// local layout or archive would be read by the daemon, as root, from a
/// path the caller may not be allowed to read.
fn check_image(peer: &Peer, image: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(image) = image else { return Ok(None) };
    if let Err(reason) = airlock_runtime::image::check_reference(&image) {
        return Err(ApiError::bad_request("invalid_request", format!("image: {reason}")));
    }
    let local = ["oci:", "oci-archive:", "docker-archive:"].iter().any(|p| image.starts_with(p));
    if local && peer.uid != 0 {
        return Err(ApiError::forbidden(
            "only root may name a local image (oci:, oci-archive:, docker-archive:); use a registry reference",
        ));
    }
    Ok(Some(image))
}

/// The most ports one create may publish.
const MAX_PORTS: usize = 64;

/// Parses the ports to publish. The daemon listens as root on the caller's
/// behalf, so a caller who is not root gets what it could bind itself and
/// no more than loopback: no port below 1024, no other address.
fn check_ports(peer: &Peer, ports: &[String]) -> Result<Vec<PortMapping>, ApiError> {
    if ports.len() > MAX_PORTS {
        return Err(ApiError::bad_request("invalid_request", format!("ports: at most {MAX_PORTS} entries")));
    }
    let mut mappings = Vec::with_capacity(ports.len());
    for text in ports {
        let mapping: PortMapping =
            text.parse().map_err(|e: PortError| ApiError::bad_request("invalid_request", e.to_string()))?;
        if !peer.is_root() && (mapping.host.port() < 1024 || !mapping.host.ip().is_loopback()) {
            return Err(ApiError::forbidden(format!(
                "port {text}: only root may publish on a host port below 1024 or on an address other than loopback"
            )));
        }
        mappings.push(mapping);
    }
    Ok(mappings)
}

pub fn prepare_create(peer: &Peer, body: CreateBody) -> Result<PreparedCreate, ApiError> {
    if let Some(name) = &body.name {
        airlock_runtime::state::validate_name(name)?;
    }
    // `name` stays the caller's; `create_sandbox` stores it in their scope.
    let policy = body.policy.unwrap_or_else(|| "dev".to_owned());
    let builtin = Policy::builtin_names().contains(&policy.as_str());
    if !builtin {
        let is_file = policy.starts_with('/');
        if !peer.is_root() {
            tracing::warn!(uid = peer.uid, policy, "denied: policy file requested by a non-root caller");
            return Err(ApiError::forbidden(format!(
                "policy {policy:?}: only the built-in policies ({}) are available through the daemon to \
                 non-root callers",
                Policy::builtin_names().join(", ")
            )));
        }
        if !is_file {
            return Err(ApiError::bad_request(
                "invalid_policy",
                format!(
                    "unknown policy {policy:?}: give a built-in name ({}) or an absolute path to a policy file",
                    Policy::builtin_names().join(", ")
                ),
            ));
        }
    }
    let workspace = match &body.workspace {
        Some(path) => Some(check_workspace(peer, path)?),
        None => None,
    };
    check_labels(&body.labels)?;
    let env = check_env(&body.env)?;
    if body.allow.len() > 256 || body.allow.iter().any(|a| a.is_empty() || a.len() > 300) {
        return Err(ApiError::bad_request(
            "invalid_request",
            "allow: at most 256 entries of HOST[:PORT], each 1-300 characters",
        ));
    }
    if let Some(cpus) = body.cpus
        && !(cpus.is_finite() && cpus > 0.0)
    {
        return Err(ApiError::bad_request("invalid_request", "cpus must be a positive number"));
    }
    let tier = match &body.tier {
        None => None,
        Some(text) => Some(
            text.parse::<airlock_policy::Tier>()
                .map_err(|e| ApiError::bad_request("invalid_request", format!("tier: {e}")))?,
        ),
    };
    let workspace_mode = match &body.workspace_mode {
        None => workspace.is_none().then_some(WorkspaceMode::None),
        Some(text) => {
            let mode: WorkspaceMode = text.parse().map_err(|e: String| {
                ApiError::bad_request("invalid_request", format!("workspace_mode: {e}"))
            })?;
            if mode != WorkspaceMode::None && workspace.is_none() {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    format!("workspace_mode {text} needs a workspace: give its absolute path"),
                ));
            }
            Some(mode)
        }
    };
    let ports = check_ports(peer, &body.ports)?;
    if let Some(user) = &body.user {
        airlock_runtime::image::parse_user(user).map_err(|e| ApiError::bad_request("invalid_request", e))?;
    }
    let overrides = Overrides {
        timeout: body.timeout.as_ref().map(|t| t.get("timeout")).transpose()?,
        memory: body.memory.as_ref().map(|m| m.get("memory")).transpose()?,
        pids: body.pids,
        cpus: body.cpus,
        env,
        // An API call has no current directory to fall back on: without a
        // workspace, nothing is mounted.
        workspace_mode,
        allow: body.allow,
        tier,
        image: check_image(peer, body.image)?,
        containers: body.containers.unwrap_or(false),
    };
    let request = CreateRequest {
        name: body.name,
        policy,
        overrides,
        workspace: workspace.clone(),
        labels: body.labels,
        idle_timeout: body.idle_timeout.as_ref().map(|t| t.get("idle_timeout")).transpose()?,
        env: Vec::new(),
        owner_uid: Some(peer.uid),
        ports,
        user: body.user,
    };
    let checked_workspace = workspace.filter(|_| !peer.is_root());
    Ok(PreparedCreate { request, checked_workspace })
}

pub async fn create(
    State(app): State<Arc<App>>,
    peer: Peer,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<(StatusCode, Json<SandboxView>), ApiError> {
    let prepared = prepare_create(&peer, body)?;
    let view = app
        .blocking(move |app| {
            create_sandbox(app, &peer, prepared).map(|l| sandbox::view(&l, &app.scope(&peer)))
        })
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Creates a sandbox for `peer` and indexes it. Blocks until it runs. The
/// name (given or generated) is in the caller's own namespace (`scope`):
/// another user's sandbox of the same name neither blocks it nor shows.
pub fn create_sandbox(app: &Arc<App>, peer: &Peer, prepared: PreparedCreate) -> Result<Loaded, ApiError> {
    let PreparedCreate { mut request, checked_workspace } = prepared;
    let scope = app.scope(peer);
    let shown = match (&request.name, scope.tenant()) {
        (Some(name), _) => Some(name.clone()),
        // Generated here, in the caller's namespace (the runtime would
        // generate one in the shared one).
        (None, Some(_)) => Some(unused_name(app, &scope)?),
        (None, None) => None,
    };
    let _guard = match &shown {
        Some(name) => {
            let stored = scope.creatable(name)?;
            let guard = app.claim(&stored, Op::Create).map_err(|op| {
                ApiError::conflict("conflict", format!("a sandbox named {name} is {}", op.doing()))
            })?;
            // A sandbox the caller made before names were per owner holds
            // the name too; one in the state directory is the runtime's to
            // refuse (it answers "name taken" across the supervisor's fork).
            let legacy_own = scope
                .legacy(name)
                .and_then(|legacy| app.db.sandbox(&legacy).ok().flatten())
                .is_some_and(|row| row.owner_uid == peer.uid);
            if legacy_own {
                return Err(ApiError::conflict(
                    "conflict",
                    format!("a sandbox named {name} already exists; choose another name"),
                ));
            }
            request.name = Some(stored);
            Some(guard)
        }
        None => None,
    };
    let reword = |e: ApiError| match (&request.name, &shown) {
        (Some(stored), Some(shown)) => scope.reword(e, stored, shown),
        _ => e,
    };
    create_claimed(app, peer, request.clone(), checked_workspace).map_err(reword)
}

/// A generated name free in `scope`'s namespace.
fn unused_name(app: &App, scope: &crate::scope::Scope) -> Result<String, ApiError> {
    for attempt in 0..64 {
        let name = if attempt < 32 {
            airlock_runtime::names::generate()
        } else {
            format!(
                "{}-{}",
                airlock_runtime::names::generate(),
                airlock_runtime::names::random_u32() % 10_000
            )
        };
        if app.root.open(&scope.stored(&name)?).is_err() {
            return Ok(name);
        }
    }
    Err(ApiError::conflict("conflict", "no unused sandbox name found; pass a name"))
}

/// [`create_sandbox`] once the stored name is claimed.
fn create_claimed(
    app: &Arc<App>,
    peer: &Peer,
    request: CreateRequest,
    checked_workspace: Option<PathBuf>,
) -> Result<Loaded, ApiError> {
    let started = Instant::now();
    let created = match supervisor::create(&app.root, &request) {
        Ok(created) => created,
        Err(e) => {
            let err = ApiError::from(e);
            app.record_event(
                request.name.as_deref(),
                Some(peer.uid),
                "create_failed",
                serde_json::json!({ "error": err.message, "policy": request.policy }),
            );
            // A named sandbox that got as far as a state directory stays
            // for inspection: index it so its owner can see and remove it
            // (unless the name was taken: that directory is another sandbox).
            if let Some(name) = &request.name
                && err.status != StatusCode::CONFLICT
                && let Ok(dir) = app.root.open(name)
                && let Ok(mut loaded) = sandbox::load(app, dir, None)
            {
                loaded.owner_uid = peer.uid;
                loaded.labels = request.labels.clone();
                let _ = app.db.upsert_sandbox(&sandbox::row_for(&loaded));
            }
            return Err(err);
        }
    };
    let dir = app.root.open(&created.name)?;
    let mut loaded = sandbox::load(app, dir, None)?;
    loaded.owner_uid = peer.uid;
    loaded.labels = request.labels.clone();
    // The runtime resolved the workspace again when it mounted it: if the
    // path changed in between (a directory swapped for a symlink), the
    // sandbox may see something the caller was not allowed; end it.
    if let Some(expected) = checked_workspace {
        let got = loaded.meta.as_ref().and_then(|m| m.workspace.clone());
        if got.as_ref() != Some(&expected) {
            tracing::warn!(
                uid = peer.uid,
                sandbox = created.name,
                expected = %expected.display(),
                got = ?got,
                "denied: the workspace changed while the sandbox was created; removing it"
            );
            if let Ok(client) = SupervisorClient::connect(&loaded.dir) {
                let _ = client.stop();
            }
            let _ = ops::remove(&app.root, &created.name);
            return Err(ApiError::forbidden(format!(
                "workspace {} changed while the sandbox was being created; nothing was kept",
                expected.display()
            )));
        }
    }
    app.db.upsert_sandbox(&sandbox::row_for(&loaded))?;
    app.record_event(
        Some(&created.name),
        Some(peer.uid),
        "created",
        serde_json::json!({
            "policy": loaded.policy(),
            "workspace": loaded.meta.as_ref().and_then(|m| m.workspace.as_ref()).map(|p| p.to_string_lossy()),
            "labels": loaded.labels,
            "millis": started.elapsed().as_millis() as u64,
        }),
    );
    Ok(loaded)
}

#[derive(serde::Serialize)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxView>,
}

/// `GET /v1/sandboxes?label=k=v&state=running`.
pub async fn list(
    State(app): State<Arc<App>>,
    peer: Peer,
    query: QueryPairs,
) -> Result<Json<SandboxList>, ApiError> {
    query.only(&["label", "state"])?;
    let labels = query.all("label").map(label_filter).collect::<Result<Vec<_>, _>>()?;
    let states = query.all("state").map(sandbox::parse_state).collect::<Result<Vec<_>, _>>()?;
    let sandboxes = app
        .blocking(move |app| {
            let scope = app.scope(&peer);
            Ok(sandbox::visible(app, &peer)?
                .iter()
                .filter(|l| states.is_empty() || states.contains(&l.state))
                .filter(|l| labels.iter().all(|(k, v)| l.labels.get(k) == Some(v)))
                .map(|l| sandbox::view(l, &scope))
                .collect())
        })
        .await?;
    Ok(Json(SandboxList { sandboxes }))
}

/// `GET /v1/sandboxes/{name}`.
pub async fn inspect(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
) -> Result<Json<SandboxView>, ApiError> {
    let view = app
        .blocking(move |app| {
            let loaded = sandbox::authorize(app, &peer, &name)?;
            Ok(sandbox::inspect(app, &loaded, &app.scope(&peer)))
        })
        .await?;
    Ok(Json(view))
}

/// `loaded`'s supervisor; `name` is what the caller calls it.
fn client_for(loaded: &Loaded, name: &str) -> Result<SupervisorClient, ApiError> {
    if loaded.state != ApiState::Running {
        return Err(ApiError::conflict(
            "not_running",
            format!("sandbox {name} is not running (state: {})", loaded.state.as_str()),
        ));
    }
    SupervisorClient::connect(&loaded.dir).map_err(|e| {
        ApiError::conflict(
            "not_managed",
            format!(
                "sandbox {name} has no supervisor to talk to ({e}); a sandbox of `airlock run` ends with its \
                 command or with `airlock rm`"
            ),
        )
    })
}

/// The runtime's one stop: SIGTERM, the policy's grace period, SIGKILL;
/// returns once the sandbox is finalized.
fn stop_and_wait(app: &App, stored: &str, name: &str) -> Result<(), ApiError> {
    ops::stop(&app.root, stored).map_err(|e| ApiError::internal(format!("stopping sandbox {name}: {e}")))
}

/// `POST /v1/sandboxes/{name}/stop`. Stopping a sandbox that is not running
/// is not an error: the answer is its state.
pub async fn stop(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
) -> Result<Json<SandboxView>, ApiError> {
    let view = app.blocking(move |app| stop_sandbox(app, &peer, &name)).await?;
    Ok(Json(view))
}

fn stop_sandbox(app: &Arc<App>, peer: &Peer, name: &str) -> Result<SandboxView, ApiError> {
    let scope = app.scope(peer);
    let loaded = sandbox::authorize(app, peer, name)?;
    if matches!(loaded.state, ApiState::Stopped | ApiState::Failed) {
        return Ok(sandbox::view(&loaded, &scope));
    }
    let stored = loaded.name().to_owned();
    let _guard = app
        .claim(&stored, Op::Stop)
        .map_err(|op| ApiError::conflict("busy", format!("sandbox {name} is {}", op.doing())))?;
    stop_and_wait(app, &stored, name)?;
    let after = sandbox::authorize(app, peer, name)?;
    app.db.set_state(&stored, after.state.as_str())?;
    record_stopped(app, &after, after.state.as_str(), "requested");
    Ok(sandbox::view(&after, &scope))
}

/// The daemon's `stopped` event, with the reason the sandbox's own audit
/// log recorded, whoever stopped it (`fallback` when it recorded none).
pub(crate) fn record_stopped(app: &App, loaded: &Loaded, state: &str, fallback: &'static str) {
    let (reason, message) = airlock_runtime::supervisor::last_stop(&loaded.dir)
        .map_or((fallback, None), |(code, text)| (code, Some(text)));
    app.record_event(
        Some(loaded.name()),
        Some(loaded.owner_uid),
        "stopped",
        serde_json::json!({ "reason": reason, "message": message, "state": state }),
    );
}

#[derive(serde::Serialize)]
pub struct Removed {
    pub name: String,
    pub removed: bool,
}

/// `DELETE /v1/sandboxes/{name}`: stops it if it runs, then removes it.
pub async fn remove(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
) -> Result<Json<Removed>, ApiError> {
    let removed = app.blocking(move |app| remove_sandbox(app, &peer, &name)).await?;
    Ok(Json(removed))
}

pub fn remove_sandbox(app: &Arc<App>, peer: &Peer, name: &str) -> Result<Removed, ApiError> {
    let loaded = sandbox::authorize(app, peer, name)?;
    let stored = loaded.name().to_owned();
    let _guard = app
        .claim(&stored, Op::Remove)
        .map_err(|op| ApiError::conflict("busy", format!("sandbox {name} is {}", op.doing())))?;
    if loaded.state == ApiState::Running {
        match stop_and_wait(app, &stored, name) {
            Ok(()) => {
                let _ = app.db.set_state(&stored, ApiState::Stopped.as_str());
                record_stopped(app, &loaded, ApiState::Stopped.as_str(), "requested");
            }
            // `ops::remove` kills what is still live.
            Err(e) => tracing::debug!("orderly stop before removal failed: {e}"),
        }
    }
    ops::remove(&app.root, &stored).map_err(|e| app.scope(peer).reword(e.into(), &stored, name))?;
    app.db.delete_sandbox(&stored)?;
    app.record_event(
        Some(&stored),
        Some(loaded.owner_uid),
        "destroyed",
        serde_json::json!({ "reason": "requested" }),
    );
    Ok(Removed { name: name.to_owned(), removed: true })
}

/// `POST /v1/sandboxes/{name}/extend`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendBody {
    pub seconds: u64,
}

pub async fn extend(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    JsonBody(body): JsonBody<ExtendBody>,
) -> Result<Json<SandboxView>, ApiError> {
    if body.seconds == 0 || body.seconds > MAX_EXTEND_SECS {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("seconds must be between 1 and {MAX_EXTEND_SECS}"),
        ));
    }
    let view = app
        .blocking(move |app| {
            let loaded = sandbox::authorize(app, &peer, &name)?;
            let client = client_for(&loaded, &name)?;
            client
                .extend(body.seconds)
                .map_err(|e| ApiError::conflict("extend_refused", format!("extending {name}: {e}")))?;
            app.record_event(
                Some(loaded.name()),
                Some(loaded.owner_uid),
                "extended",
                serde_json::json!({ "seconds": body.seconds }),
            );
            Ok(sandbox::inspect(app, &loaded, &app.scope(&peer)))
        })
        .await?;
    Ok(Json(view))
}

/// The response header naming the change's digest (`sha256:…`), on every
/// form of the diff: what `apply`'s `expect` takes.
pub const DIGEST_HEADER: &str = "x-airlock-change-digest";

/// `GET /v1/sandboxes/{name}/diff[?format=json|stat|patch]`: the changes as
/// JSON (the default), or as `airlock diff --stat` / `airlock diff` print
/// them (text, streamed while it is rendered, ending with the digest line).
pub async fn diff(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    query.only(&["format"])?;
    let format = query.get("format").unwrap_or("json").to_owned();
    if !matches!(format.as_str(), "json" | "stat" | "patch") {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("format must be json, stat or patch, got {format:?}"),
        ));
    }
    let view = app
        .blocking(move |app| {
            let stored = sandbox::authorize(app, &peer, &name)?.name().to_owned();
            ops::diff(&app.root, &stored, &mut |_| {})
                .map_err(|e| app.scope(&peer).reword(e.into(), &stored, &name))
        })
        .await?;
    let digest = axum::http::HeaderValue::try_from(view.diff.digest().to_string())
        .map_err(|e| ApiError::internal(format!("digest header: {e}")))?;
    let mut response = if format == "json" {
        Json(view.diff.to_json()).into_response()
    } else {
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        tokio::task::spawn_blocking(move || {
            let mut out = ChannelWriter::new(tx);
            let rendered = if format == "stat" {
                view.diff.render_stat(&mut out)
            } else {
                view.diff.render_unified(&view.lower, &view.upper, &mut out)
            };
            if let Err(e) = rendered {
                // Too late for a status: the text ends without its digest
                // line, and says why (unless the client is gone).
                tracing::debug!(error = %e, "rendering a diff stopped");
                let _ = std::io::Write::write_all(&mut out, format!("\nairlock: {e}\n").as_bytes());
            }
        });
        crate::body::streamed("text/plain; charset=utf-8", ChannelBody::new(rx))
    };
    response.headers_mut().insert(DIGEST_HEADER, digest);
    Ok(response)
}

/// `GET /v1/sandboxes/{name}/logs?stream=stdout|stderr`: the sandbox's
/// captured output as it was written (redacted of secrets), streamed from
/// its state directory. Empty while nothing has been written.
pub async fn logs(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    query.only(&["stream"])?;
    let stderr = match query.get("stream") {
        None | Some("stdout") => false,
        Some("stderr") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("stream must be stdout or stderr, got {other:?}"),
            ));
        }
    };
    let file = app
        .blocking(move |app| {
            let stored = sandbox::authorize(app, &peer, &name)?.name().to_owned();
            let (stdout, stderr_log) = ops::log_paths(&app.root, &stored)?;
            sandbox::open_state_file(if stderr { &stderr_log } else { &stdout })
        })
        .await?;
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    if let Some(mut file) = file {
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; 64 * 1024];
            // Ends at the end of the file, on an error, or when the client
            // hangs up (the send fails).
            while let Ok(n @ 1..) = file.read(&mut buf) {
                if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                    break;
                }
            }
        });
    }
    Ok(crate::body::streamed("application/octet-stream", ChannelBody::new(rx)))
}

/// `POST /v1/sandboxes/{name}/apply`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyBody {
    #[serde(default)]
    pub allow_protected: bool,
    /// The digest of the reviewed change (`sha256:…`, from the diff):
    /// apply writes only if the change is still exactly that.
    pub expect: Option<String>,
}

pub async fn apply(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    JsonBody(body): JsonBody<ApplyBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let json = app
        .blocking(move |app| {
            let loaded = sandbox::authorize(app, &peer, &name)?;
            if !peer.is_root() && peer.uid != app.daemon_uid {
                // The daemon writes as itself (root); files it wrote into a
                // user's workspace would be root's. Until apply can run as
                // the owner, users apply with their own `airlock apply`.
                tracing::warn!(
                    uid = peer.uid,
                    sandbox = name,
                    "denied: apply through the daemon by a non-root caller"
                );
                return Err(ApiError::forbidden(format!(
                    "apply through the daemon is available to root only for now; run `airlock apply {name}`"
                )));
            }
            let expect = body
                .expect
                .as_deref()
                .map(str::parse::<ops::ChangeDigest>)
                .transpose()
                .map_err(|e| ApiError::bad_request("invalid_request", format!("expect: {e}")))?;
            let stored = loaded.name().to_owned();
            let reword = |e: ops::OpError| app.scope(&peer).reword(e.into(), &stored, &name);
            let pending = ops::prepare_apply(&app.root, &stored, body.allow_protected, expect, &mut |_| {})
                .map_err(reword)?;
            let digest = pending.digest();
            if pending.view.diff.is_empty() {
                return Ok(serde_json::json!({
                    "applied": false, "written": [], "deleted": [], "digest": digest,
                }));
            }
            let report = ops::apply(pending, &mut |_| {}).map_err(reword)?;
            let paths =
                |v: &[PathBuf]| v.iter().map(|p| p.to_string_lossy().into_owned()).collect::<Vec<_>>();
            let digest = report.digest.unwrap_or(digest);
            let json = serde_json::json!({
                "applied": true,
                "written": paths(&report.written),
                "deleted": paths(&report.deleted),
                "digest": digest,
            });
            app.record_event(
                Some(&stored),
                Some(loaded.owner_uid),
                "applied",
                serde_json::json!({
                    "written": report.written.len(),
                    "deleted": report.deleted.len(),
                    "allow_protected": body.allow_protected,
                    "digest": digest,
                }),
            );
            Ok(json)
        })
        .await?;
    Ok(Json(json))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    fn peer(uid: u32) -> Peer {
        Peer { uid, gid: uid, pid: None }
    }

    #[test]
    fn create_requests_are_checked() {
        let ok = prepare_create(&peer(0), CreateBody::default()).unwrap();
        assert_eq!(ok.request.policy, "dev");
        assert_eq!(ok.request.overrides.workspace_mode, Some(WorkspaceMode::None));

        let bad_name = CreateBody { name: Some("Bad Name!".into()), ..CreateBody::default() };
        assert_eq!(prepare_create(&peer(0), bad_name).err().unwrap().code, "invalid_name");

        let file = CreateBody { policy: Some("/etc/shadow".into()), ..CreateBody::default() };
        assert_eq!(prepare_create(&peer(1000), file).err().unwrap().code, "forbidden");
        let unknown = CreateBody { policy: Some("nope".into()), ..CreateBody::default() };
        assert_eq!(prepare_create(&peer(0), unknown).err().unwrap().code, "invalid_policy");

        let relative = CreateBody { workspace: Some("repo".into()), ..CreateBody::default() };
        assert_eq!(prepare_create(&peer(0), relative).err().unwrap().code, "invalid_workspace");

        let cpus = CreateBody { cpus: Some(f64::NAN), ..CreateBody::default() };
        assert!(prepare_create(&peer(0), cpus).is_err());

        let mode = |m: &str, ws: Option<&str>| CreateBody {
            workspace_mode: Some(m.into()),
            workspace: ws.map(Into::into),
            ..CreateBody::default()
        };
        let ro = prepare_create(&peer(0), mode("ro", Some("/tmp"))).unwrap().request;
        assert_eq!(ro.overrides.workspace_mode, Some(WorkspaceMode::Ro));
        let none = prepare_create(&peer(0), mode("none", None)).unwrap().request;
        assert_eq!(none.overrides.workspace_mode, Some(WorkspaceMode::None));
        assert_eq!(prepare_create(&peer(0), mode("rw", None)).err().unwrap().code, "invalid_request");
        assert_eq!(
            prepare_create(&peer(0), mode("sideways", Some("/tmp"))).err().unwrap().code,
            "invalid_request"
        );
        // With a workspace and no mode, the policy's mode applies.
        let ws = CreateBody { workspace: Some("/tmp".into()), ..CreateBody::default() };
        assert_eq!(prepare_create(&peer(0), ws).unwrap().request.overrides.workspace_mode, None);

        let full = CreateBody {
            timeout: Some(DurationArg::Text("10m".into())),
            idle_timeout: Some(DurationArg::Seconds(30)),
            memory: Some(SizeArg::Text("256M".into())),
            env: BTreeMap::from([("A".into(), "1".into())]),
            labels: BTreeMap::from([("team".into(), "x".into())]),
            ..CreateBody::default()
        };
        let req = prepare_create(&peer(0), full).unwrap().request;
        assert_eq!(req.overrides.timeout, Some(Duration::from_secs(600)));
        assert_eq!(req.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(req.overrides.memory, Some(256 << 20));
        assert_eq!(req.overrides.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(req.labels["team"], "x");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<CreateBody>(r#"{"nmae": "x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        assert!(serde_json::from_str::<ExtendBody>(r#"{"seconds": 5, "x": 1}"#).is_err());
        assert!(serde_json::from_str::<ApplyBody>(r#"{"allow": true}"#).is_err());
        let body: ApplyBody = serde_json::from_str(r#"{"expect": "sha256:00"}"#).unwrap();
        assert_eq!(body.expect.as_deref(), Some("sha256:00"));
    }
}
