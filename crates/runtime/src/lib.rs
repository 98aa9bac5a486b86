//! The sandbox lifecycle: resolve policy, create the state directory, start the
//! jail, stream output, enforce limits, finalize (diff, artifacts, audit) and
//! clean up. Used in-process by `airlock run`; the other subcommands' work on
//! existing sandboxes lives in [`ops`].

pub mod audit;
pub mod bundle;
pub mod caps;
pub mod containers;
pub mod create_failure;
pub mod exec_trace;
mod file_relay;
pub mod files;
pub mod idblocks;
pub mod image;
mod layer;
mod lifecycle;
pub mod microvm;
pub use lifecycle::UndoFailed;
pub mod names;
pub mod network;
pub mod ops;
pub mod plan;
pub mod ports;
pub mod proxy_process;
pub mod pull_gate;
pub mod report;
mod role_process;
pub mod run;
mod signals;
pub mod state;
mod stdio;
pub mod supervisor;
pub mod view;

use std::io;
use std::path::PathBuf;

use airlock_policy::Policy;

pub use run::{Notice, RunOutcome, RunRequest, run};

/// argv[1] that makes the airlock binary act as the in-sandbox agent.
pub const AGENT_ROLE: &str = "__agent";

/// Exit codes shared with `docker run` and `timeout`.
pub mod exit_codes {
    pub const TIMED_OUT: i32 = 124;
    pub const AIRLOCK_FAILED: i32 = 125;
    pub const CANNOT_EXECUTE: i32 = 126;
    pub const NOT_FOUND: i32 = 127;
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Policy(Box<airlock_policy::PolicyError>),
    #[error(transparent)]
    StateDir(#[from] state::StateError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error(transparent)]
    IdBlocks(#[from] idblocks::IdBlockError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] airlock_jail::cgroup::CgroupError),
    #[error(transparent)]
    Spawn(#[from] airlock_jail::spawn::SpawnError),
    #[error(transparent)]
    Control(#[from] airlock_proto::ProtoError),
    #[error(transparent)]
    Workspace(#[from] airlock_workspace::WorkspaceError),
    #[error("the sandbox could not be set up: {0}")]
    SetupFailed(String),
    #[error(
        "this host lacks {feature}, which policy {policy} requires; run `airlock doctor` for how to fix it, or use a policy that lists \"{feature}\" in isolation.allow_weaker"
    )]
    HostLacks { feature: String, policy: String },
    /// The microVM tier: the host lacks what it needs, or the guest failed.
    #[error(transparent)]
    Vm(#[from] airlock_vm::VmError),
    #[error("no command given: put it after `--`, e.g. `airlock run -- make test`")]
    NoCommand,
    #[error("workspace {0}: {1}")]
    WorkspaceDir(PathBuf, #[source] io::Error),
    #[error("refusing / as the workspace: pick the project directory with --workspace")]
    WorkspaceIsRoot,
    #[error("writable layer {0}: {1}")]
    Layer(PathBuf, #[source] io::Error),
    #[error("image: {0}")]
    Image(#[source] Box<airlock_image::source::SourceError>),
    #[error("image store: {0}")]
    ImageStore(#[from] airlock_image::store::StoreError),
    #[error("{0}")]
    ImageRefused(String),
    #[error("AIRLOCK_IMAGE_BUDGET={value:?} is not a size (e.g. 10G, 512MiB): {reason}")]
    ImageBudget { value: String, reason: String },
    #[error("registry CA file {0}: {1}")]
    ImageCa(PathBuf, #[source] io::Error),
    #[error(transparent)]
    ImageAuth(#[from] airlock_image::auth::AuthError),
    /// The policy's password for a registry could not be read from its
    /// source (the message names the source, never a value).
    #[error("the policy's credentials for registry {registry} (image.credentials): {source}")]
    ImageCredential {
        registry: String,
        #[source]
        source: airlock_egress::secrets::SecretError,
    },
    #[error(
        "the policy's credentials for registry {registry} (image.credentials): the password {from} gave is not \
         UTF-8 text"
    )]
    ImageCredentialNotText { registry: String, from: String },
    /// The image store's disk budget would be exceeded, as a sandbox's
    /// supervisor reported it (the message is the original error's).
    #[error("{0}")]
    ImageStoreFull(String),
    /// A user (`--user`) the sandbox cannot run its processes as.
    #[error("{0}")]
    UserRefused(String),
    #[error(transparent)]
    PullGate(#[from] crate::pull_gate::PullGateError),
    #[error("state directory {0}: {1}")]
    State(PathBuf, #[source] io::Error),
    #[error(
        "state directory {0} must be searchable by the sandbox's unprivileged uid (mode o+x on it and every parent): {1}"
    )]
    StateNotTraversable(PathBuf, String),
    #[error("cannot find airlock's own executable: {0}")]
    SelfExe(#[source] io::Error),
    #[error("sandbox supervisor: {0}")]
    Supervisor(String),
    /// The host cannot give what the policy requires, as a sandbox's
    /// supervisor reported it (the message is the original error's).
    #[error("{0}")]
    HostUnsupported(String),
    /// An invalid policy, as a sandbox's supervisor reported it.
    #[error("{0}")]
    PolicyRefused(String),
    /// An unusable workspace, as a sandbox's supervisor reported it.
    #[error("{0}")]
    WorkspaceRefused(String),
    /// Any other failure a sandbox's supervisor reported while starting it.
    #[error("{0}")]
    CreateFailed(String),
    #[error("egress proxy: {0}")]
    Egress(String),
    /// A published port that cannot be, or its connector failed to start.
    #[error(transparent)]
    Ports(#[from] ports::PortError),
    /// A host address for a published port that could not be listened on,
    /// as a sandbox's supervisor reported it.
    #[error("{0}")]
    PortUnavailable(String),
    #[error("exec trace: {0}")]
    ExecTrace(String),
    #[error("cannot connect the sandbox's terminal: {0}")]
    Terminal(#[source] io::Error),
    #[error("cannot forward signals to the sandbox: {0}")]
    Signals(#[source] io::Error),
    #[error("waiting for the sandbox: {0}")]
    Wait(#[source] io::Error),
    /// A launch (or the sandbox's owner after it) failed half-way, and
    /// releasing what the sandbox held failed too.
    #[error(transparent)]
    LaunchUndo(Box<lifecycle::UndoFailed>),
    /// A failure injected by a test (`AIRLOCK_TEST_FAIL_AT`, debug builds
    /// only) at a launch phase or a later step.
    #[error("failure injected for a test at {0}")]
    InjectedFailure(String),
}

impl RunError {
    /// Whether a pull was refused because the image store's disk budget
    /// (`AIRLOCK_IMAGE_BUDGET`) would be exceeded: nothing is wrong with
    /// the request, the host lacks room for it.
    pub fn is_image_store_full(&self) -> bool {
        use airlock_image::source::SourceError;
        use airlock_image::store::StoreError;
        match self {
            RunError::ImageStoreFull(_) | RunError::ImageStore(StoreError::OverBudget { .. }) => true,
            RunError::Image(e) => matches!(**e, SourceError::Store(StoreError::OverBudget { .. })),
            _ => false,
        }
    }
}

impl From<airlock_policy::PolicyError> for RunError {
    fn from(e: airlock_policy::PolicyError) -> Self {
        RunError::Policy(Box::new(e))
    }
}

/// The sandbox's cgroup name: its own name plus a hash of its state
/// directory, because the cgroup parent is shared by every state directory
/// on the host and two of them may hold sandboxes of the same name.
pub fn cgroup_name(sandbox: &state::SandboxDir) -> String {
    cgroup_name_at(sandbox.path(), sandbox.name())
}

/// [`cgroup_name`] for the sandbox `name` whose directory is (or was) `path`.
pub fn cgroup_name_at(path: &std::path::Path, name: &str) -> String {
    let path = path.as_os_str().as_encoded_bytes();
    let hash =
        path.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    let prefix = &name[..name.len().min(48)];
    format!("{prefix}-{:012x}", hash & 0xffff_ffff_ffff)
}

/// Current time, RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    audit::rfc3339_utc(std::time::SystemTime::now())
}

fn limits_json(policy: &Policy) -> serde_json::Value {
    serde_json::json!({
        "timeout_secs": policy.limits.timeout.as_secs(),
        "memory": policy.limits.memory,
        "pids": policy.limits.pids,
        "cpus": policy.limits.cpus,
        "disk": policy.limits.disk,
        "nofile": policy.limits.nofile,
        "log_size": policy.limits.log_size,
        "audit_size": policy.limits.audit_size,
    })
}

/// As root, the sandbox's root is an unprivileged host uid that must still
/// reach its own mount points in the state directory: the state root and its
/// parents need o+x (never o+r: names stay unlisted).
fn prepare_state_root(root: &state::StateRoot, is_root: bool) -> Result<(), RunError> {
    use std::os::unix::fs::PermissionsExt;
    if !is_root {
        return Ok(());
    }
    let path = root.path();
    let meta = std::fs::metadata(path).map_err(|e| RunError::State(path.to_path_buf(), e))?;
    let mode = meta.permissions().mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode((mode & 0o7777) | 0o711))
            .map_err(|e| RunError::State(path.to_path_buf(), e))?;
    }
    for ancestor in path.ancestors().skip(1) {
        let mode = std::fs::metadata(ancestor).map(|m| m.permissions().mode()).unwrap_or(0);
        if mode & 0o001 == 0 {
            return Err(RunError::StateNotTraversable(
                path.to_path_buf(),
                format!(
                    "{} has mode {:o}; run `chmod o+x {}`",
                    ancestor.display(),
                    mode & 0o7777,
                    ancestor.display()
                ),
            ));
        }
    }
    Ok(())
}
