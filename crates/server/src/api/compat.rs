//! The seed's sandboxd primitives, for tools written against Docker's
//! sandbox daemon: `GET /vm`, `POST /vm`, `DELETE /vm/{name}`. A "VM" is an
//! airlock sandbox (policy `dev` on the process tier unless the request
//! names another policy or the microVM tier), its `vm_id` and `vm_name` the
//! sandbox's name, its `agent_name` the `agent_name` label. This surface is
//! frozen but for choosing the policy and tier; new features go to `/v1`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::sandboxes::{CreateBody, create_sandbox, prepare_create, remove_sandbox};
use crate::app::App;
use crate::auth::Peer;
use crate::error::ApiError;
use crate::extract::{JsonBody, SandboxName};
use crate::sandbox::{self, Loaded};
use crate::scope::Scope;

pub const AGENT_LABEL: &str = "agent_name";

#[derive(Debug, Serialize)]
pub struct Vm {
    pub vm_id: String,
    pub vm_name: String,
    pub agent_name: String,
    pub workspace_dir: String,
}

/// What `POST /vm` answers: the VM, plus where its egress CA bundle is
/// and, for a microVM with a container engine (`"containers": true`), the
/// engine's socket on the host (`docker_socket`, and `vm_config.socketPath`
/// as Docker's sandbox daemon names it); null without one.
#[derive(Debug, Serialize)]
pub struct CreatedVm {
    #[serde(flatten)]
    pub vm: Vm,
    pub docker_socket: Option<String>,
    pub ca_cert_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_config: Option<VmConfig>,
}

/// The VM's engine socket, under Docker's sandbox daemon's name for it.
#[derive(Debug, Serialize)]
pub struct VmConfig {
    #[serde(rename = "socketPath")]
    pub socket_path: String,
}

/// `loaded` as a VM, under the name its caller knows it by.
fn vm(loaded: &Loaded, scope: &Scope) -> Vm {
    let name = scope.shown(loaded.name(), loaded.owner_uid).unwrap_or_else(|| loaded.name().to_owned());
    Vm {
        vm_id: name.clone(),
        vm_name: name,
        agent_name: loaded.labels.get(AGENT_LABEL).cloned().unwrap_or_default(),
        workspace_dir: loaded
            .meta
            .as_ref()
            .and_then(|m| m.workspace.as_ref())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// `GET /vm`: the caller's sandboxes.
pub async fn list(State(app): State<Arc<App>>, peer: Peer) -> Result<Json<Vec<Vm>>, ApiError> {
    let vms = app
        .blocking(move |app| {
            let scope = app.scope(&peer);
            Ok(sandbox::visible(app, &peer)?.iter().map(|l| vm(l, &scope)).collect())
        })
        .await?;
    Ok(Json(vms))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub agent_name: String,
    pub workspace_dir: PathBuf,
    /// A built-in policy or (root only) a policy file, as in `POST
    /// /v1/sandboxes`; default `dev`. Its tier applies unless `tier` says.
    #[serde(default)]
    pub policy: Option<String>,
    /// `process` or `microvm`, as in `POST /v1/sandboxes`: a real VM, a
    /// guest with its own kernel, for callers that expect one.
    #[serde(default)]
    pub tier: Option<String>,
    /// A container engine inside the VM (microvm tier), as `POST
    /// /v1/sandboxes` takes it.
    #[serde(default)]
    pub containers: Option<bool>,
}

/// `POST /vm`.
pub async fn create(
    State(app): State<Arc<App>>,
    peer: Peer,
    JsonBody(body): JsonBody<CreateVm>,
) -> Result<(StatusCode, Json<CreatedVm>), ApiError> {
    let request = CreateBody {
        policy: Some(body.policy.unwrap_or_else(|| "dev".to_owned())),
        tier: body.tier,
        containers: body.containers,
        workspace: Some(body.workspace_dir),
        labels: BTreeMap::from([(AGENT_LABEL.to_owned(), body.agent_name)]),
        ..CreateBody::default()
    };
    let prepared = prepare_create(&peer, request)?;
    let created = app
        .blocking(move |app| {
            let loaded = create_sandbox(app, &peer, prepared)?;
            let bundle = loaded.dir.path().join("ca-bundle.pem");
            let socket = loaded
                .meta
                .as_ref()
                .and_then(|m| m.containers_socket.as_ref())
                .map(|s| s.to_string_lossy().into_owned());
            Ok(CreatedVm {
                vm: vm(&loaded, &app.scope(&peer)),
                docker_socket: socket.clone(),
                ca_cert_path: bundle.exists().then(|| bundle.to_string_lossy().into_owned()),
                vm_config: socket.map(|socket_path| VmConfig { socket_path }),
            })
        })
        .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[derive(Debug, Serialize)]
pub struct DeletedVm {
    pub vm_name: String,
    pub removed: bool,
}

/// `DELETE /vm/{name}`.
pub async fn remove(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
) -> Result<Json<DeletedVm>, ApiError> {
    let removed = app.blocking(move |app| remove_sandbox(app, &peer, &name)).await?;
    Ok(Json(DeletedVm { vm_name: removed.name, removed: removed.removed }))
}
