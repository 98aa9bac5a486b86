//! Where the tools' operations go: to `airlock daemon` when one answered at
//! start, else straight to the state directory. Either way they are the
//! operations the CLI calls (`runtime::ops`, `runtime::files`, the
//! supervisor's exec, the daemon's API through the shared client); this
//! file only puts the answers into one shape per tool. Every call blocks:
//! the tools run them on tokio's blocking threads.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use airlock_daemon_client::{Daemon, DaemonError, encode};
use airlock_policy::{Overrides, Policy, WorkspaceMode};
use airlock_proto::Stream;
use airlock_proto::supervisor::{ExecEvent, ExecSpec};
use airlock_runtime::files::{self, view};
use airlock_runtime::state::StateRoot;
use airlock_runtime::{ops, supervisor};
use hyper::Method;
use serde::Serialize;
use serde_json::{Value, json};

use crate::capped::Capped;

/// Why an operation failed; its text is airlock's message, which the tool
/// returns as an error result.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Op(#[from] ops::OpError),
    #[error(transparent)]
    Files(#[from] files::FilesError),
    #[error(transparent)]
    Run(#[from] airlock_runtime::RunError),
    #[error(transparent)]
    State(#[from] airlock_runtime::state::StateError),
    #[error(transparent)]
    Audit(#[from] airlock_runtime::audit::AuditError),
    #[error("sandbox {name} is not running ({source}); list sandboxes with list_sandboxes, or create one")]
    NotRunning {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("exec in {name} broke off: {source}")]
    Exec {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("exec in {name} broke off: {message}")]
    ExecEnded { name: String, message: String },
    #[error("workspace {path}: {source}")]
    Workspace {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("policy file {path}: {source}")]
    PolicyFile {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("rendering the diff of {name}: {source}")]
    Render {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("workspace_mode {0} needs a workspace: give the host directory's path")]
    ModeNeedsWorkspace(WorkspaceMode),
    #[error("the daemon answered something unexpected: {0}")]
    Answer(#[from] serde_json::Error),
}

/// What creating a sandbox takes; `None` is the policy's (or airlock's) default.
#[derive(Debug, Default)]
pub struct CreateSpec {
    pub name: Option<String>,
    pub policy: String,
    pub workspace: Option<PathBuf>,
    pub workspace_mode: Option<WorkspaceMode>,
    pub timeout: Option<Duration>,
    pub allow: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// A finished exec, with each stream cut at the caller's cap.
#[derive(Debug, Serialize)]
pub struct ExecOutcome {
    /// As `airlock exec` exits: the process's code, 128+N for signal N,
    /// 124 when the timeout killed it.
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// Where the operations go.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The daemon on this socket (a connection, and a small runtime, per call).
    Daemon(PathBuf),
    Direct(StateRoot),
}

impl Backend {
    /// The daemon when one answers on its socket (unless `direct`), else
    /// the state directory, as the CLI decides. Call it outside any async
    /// runtime: the health check runs one of its own.
    pub fn choose(direct: bool) -> Result<Backend, BackendError> {
        if !direct && let Some(daemon) = Daemon::detect() {
            return Ok(Backend::Daemon(daemon.socket().to_path_buf()));
        }
        Ok(Backend::Direct(StateRoot::from_env()?))
    }

    pub fn describe(&self) -> String {
        match self {
            Backend::Daemon(socket) => format!("through the daemon on {}", socket.display()),
            Backend::Direct(root) => format!("directly on {}", root.path().display()),
        }
    }

    fn daemon(socket: &std::path::Path) -> Result<Daemon, BackendError> {
        Ok(Daemon::at(socket.to_path_buf())?)
    }

    /// Creates a long-lived sandbox; answers its view (as `airlock inspect --json`).
    pub fn create(&self, spec: CreateSpec) -> Result<Value, BackendError> {
        let policy = policy_argument(&spec.policy)?;
        let workspace = spec
            .workspace
            .map(|path| {
                std::fs::canonicalize(&path)
                    .map_err(|source| BackendError::Workspace { path: path.display().to_string(), source })
            })
            .transpose()?;
        // Without a workspace nothing is mounted, as through the API: not
        // the directory this server happens to run in.
        let workspace_mode = match (spec.workspace_mode, &workspace) {
            (None, None) => Some(WorkspaceMode::None),
            (Some(mode), None) if mode != WorkspaceMode::None => {
                return Err(BackendError::ModeNeedsWorkspace(mode));
            }
            (mode, _) => mode,
        };
        match self {
            Backend::Daemon(socket) => {
                let mut body = json!({ "policy": policy });
                if let Some(name) = &spec.name {
                    body["name"] = json!(name);
                }
                if let Some(workspace) = &workspace {
                    body["workspace"] = json!(workspace);
                }
                if let Some(mode) = workspace_mode {
                    body["workspace_mode"] = json!(mode.to_string());
                }
                if let Some(timeout) = spec.timeout {
                    body["timeout"] = json!(timeout.as_secs().max(1));
                }
                if !spec.allow.is_empty() {
                    body["allow"] = json!(spec.allow);
                }
                if !spec.env.is_empty() {
                    body["env"] = json!(spec.env);
                }
                Ok(Backend::daemon(socket)?.json(Method::POST, "/v1/sandboxes", Some(&body))?)
            }
            Backend::Direct(root) => {
                let request = supervisor::CreateRequest {
                    name: spec.name,
                    policy,
                    overrides: Overrides {
                        timeout: spec.timeout,
                        env: spec.env.into_iter().collect(),
                        workspace_mode,
                        allow: spec.allow,
                        ..Overrides::default()
                    },
                    workspace,
                    ..supervisor::CreateRequest::default()
                };
                let created = supervisor::create(root, &request)?;
                Ok(serde_json::to_value(ops::inspect(root, &created.name)?)?)
            }
        }
    }

    /// Every sandbox the caller may see, as `airlock ls --json`.
    pub fn list(&self) -> Result<Value, BackendError> {
        match self {
            Backend::Daemon(socket) => {
                Ok(Backend::daemon(socket)?.json(Method::GET, "/v1/sandboxes", None)?["sandboxes"].take())
            }
            Backend::Direct(root) => Ok(serde_json::to_value(ops::list(root)?)?),
        }
    }

    /// Runs `argv` in a running sandbox, its stdin closed, and waits for it
    /// (at most `timeout`, after which it is killed). Each output stream is
    /// kept up to `cap` bytes; the rest is counted, not kept.
    pub fn exec(
        &self,
        name: &str,
        argv: Vec<String>,
        cwd: Option<String>,
        env: BTreeMap<String, String>,
        timeout: Duration,
        cap: usize,
    ) -> Result<ExecOutcome, BackendError> {
        let mut stdout = Capped::new(cap);
        let mut stderr = Capped::new(cap);
        let (code, signal, timed_out) = match self {
            Backend::Daemon(socket) => {
                use airlock_proto::exec_stream as frames;
                let body = json!({
                    "argv": argv, "env": env, "cwd": cwd, "timeout": timeout.as_secs().max(1),
                });
                let path = format!("/v1/sandboxes/{}/exec?stream=raw", encode(name));
                // Nothing to send: the process reads end-of-file.
                let (input, frames_in) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
                let _ = input.try_send(frames::encode(frames::CLOSE_STDIN, &[]));
                let end =
                    Backend::daemon(socket)?.exec_stream(&path, &body, frames_in, |kind, payload| {
                        match kind {
                            frames::STDOUT => stdout.push(payload),
                            frames::STDERR => stderr.push(payload),
                            _ => {}
                        }
                        Ok(())
                    })?;
                drop(input);
                let end: Value = serde_json::from_slice(&end)?;
                if end["type"] == "error" {
                    let message = end["message"].as_str().unwrap_or("the exec broke off").to_owned();
                    return Err(BackendError::ExecEnded { name: name.to_owned(), message });
                }
                let number = |key: &str| end[key].as_i64().and_then(|n| i32::try_from(n).ok());
                (number("code"), number("signal"), end["timed_out"] == true)
            }
            Backend::Direct(root) => {
                let client = supervisor::SupervisorClient::at(&root.open(name)?);
                let spec = ExecSpec {
                    argv,
                    env: env.into_iter().collect(),
                    cwd: cwd.map(PathBuf::from),
                    timeout_secs: Some(timeout.as_secs().max(1)),
                    tty: None,
                    user: None,
                };
                let mut ended = (None, None, false);
                let result = client.exec(&spec, &mut |event| match event {
                    ExecEvent::Output { stream: Stream::Stdout, data } => stdout.push(&data),
                    ExecEvent::Output { stream: Stream::Stderr, data } => stderr.push(&data),
                    ExecEvent::Exited { code, signal, timed_out } => ended = (code, signal, timed_out),
                    ExecEvent::Started { .. } => {}
                });
                match result {
                    Err(source)
                        if matches!(
                            source.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                        ) =>
                    {
                        return Err(BackendError::NotRunning { name: name.to_owned(), source });
                    }
                    Err(source) => return Err(BackendError::Exec { name: name.to_owned(), source }),
                    Ok(()) => ended,
                }
            }
        };
        let exit_code = if timed_out {
            airlock_runtime::exit_codes::TIMED_OUT
        } else {
            code.or(signal.map(|s| 128 + s)).unwrap_or(airlock_runtime::exit_codes::AIRLOCK_FAILED)
        };
        Ok(ExecOutcome {
            exit_code,
            signal,
            timed_out,
            stdout_bytes: stdout.total(),
            stderr_bytes: stderr.total(),
            stdout_truncated: stdout.truncated(),
            stderr_truncated: stderr.truncated(),
            stdout: stdout.text(),
            stderr: stderr.text(),
        })
    }

    /// The first `cap` bytes of a regular file in the sandbox, and its whole size.
    pub fn read_file(&self, name: &str, path: &str, cap: usize) -> Result<Capped, BackendError> {
        let mut sink = Capped::new(cap);
        match self {
            Backend::Daemon(socket) => {
                let route = format!("/v1/sandboxes/{}/files?path={}", encode(name), encode(path));
                Backend::daemon(socket)?.download(&route, &mut sink)?;
            }
            Backend::Direct(root) => {
                files::read_file(&running(root, name)?, path, None, &mut |_| Ok(()), &mut sink)?;
            }
        }
        Ok(sink)
    }

    /// Writes `content` to `path` in the sandbox (replaced only once all of
    /// it arrived; a new file gets `mode`, default 0644).
    pub fn write_file(
        &self,
        name: &str,
        path: &str,
        content: Vec<u8>,
        mode: Option<u32>,
    ) -> Result<Value, BackendError> {
        let size = content.len() as u64;
        match self {
            Backend::Daemon(socket) => {
                let mut route = format!("/v1/sandboxes/{}/files?path={}", encode(name), encode(path));
                if let Some(mode) = mode {
                    route.push_str(&format!("&mode={mode:o}"));
                }
                Ok(Backend::daemon(socket)?.put(&route, size, io::Cursor::new(content))?)
            }
            Backend::Direct(root) => {
                let client = running(root, name)?;
                let written = files::write_file(&client, path, size, mode, &mut io::Cursor::new(content))?;
                Ok(json!({ "path": path, "size": written }))
            }
        }
    }

    /// A directory's entries (`depth` levels), as `airlock files ls --json`.
    pub fn list_files(
        &self,
        name: &str,
        path: &str,
        depth: u32,
        max_entries: Option<u32>,
    ) -> Result<Value, BackendError> {
        match self {
            Backend::Daemon(socket) => {
                let mut route =
                    format!("/v1/sandboxes/{}/files/list?path={}&depth={depth}", encode(name), encode(path));
                if let Some(max) = max_entries {
                    route.push_str(&format!("&max_entries={max}"));
                }
                Ok(Backend::daemon(socket)?.json(Method::GET, &route, None)?)
            }
            Backend::Direct(root) => {
                let listing = files::list(&running(root, name)?, path, depth, max_entries)?;
                let entries: Vec<view::Entry> =
                    listing.entries.into_iter().map(|e| view::entry(&e.name, e.info)).collect();
                Ok(json!({ "path": path, "entries": entries, "truncated": listing.truncated }))
            }
        }
    }

    /// The sandbox's change to its workspace as a unified diff (cut at
    /// `cap` bytes) and the change's digest, which `apply` takes.
    pub fn diff(&self, name: &str, cap: usize) -> Result<(Capped, Option<String>), BackendError> {
        let mut patch = Capped::new(cap);
        match self {
            Backend::Daemon(socket) => {
                let route = format!("/v1/sandboxes/{}/diff?format=patch", encode(name));
                Backend::daemon(socket)?.download(&route, &mut patch)?;
                // The text ends with `change sha256:…` only when all of it
                // was rendered and matched that digest.
                let digest = patch.last_line().and_then(|l| l.strip_prefix("change ").map(str::to_owned));
                Ok((patch, digest))
            }
            Backend::Direct(root) => {
                let view = ops::diff(root, name, &mut |_| {})?;
                view.diff
                    .render_unified(&view.lower, &view.upper, &mut patch)
                    .map_err(|source| BackendError::Render { name: name.to_owned(), source })?;
                Ok((patch, Some(view.diff.digest().to_string())))
            }
        }
    }

    /// Every egress decision recorded for the sandbox, as `airlock net log --json`.
    pub fn network_log(&self, name: &str) -> Result<Vec<ops::NetLogEntry>, BackendError> {
        match self {
            Backend::Daemon(socket) => {
                let mut log = Vec::new();
                Backend::daemon(socket)?
                    .download(&format!("/v1/sandboxes/{}/audit", encode(name)), &mut log)?;
                let origin = PathBuf::from(format!("the daemon's audit log of {name}"));
                let entries = airlock_runtime::audit::AuditLog::entries_of(&log, &origin)?;
                Ok(ops::network_events(entries.into_iter().map(|e| e.record)))
            }
            Backend::Direct(root) => Ok(ops::net_log(root, name)?),
        }
    }

    /// Stops a running sandbox (its workspace changes stay for diff and apply).
    pub fn stop(&self, name: &str) -> Result<Value, BackendError> {
        match self {
            Backend::Daemon(socket) => {
                let route = format!("/v1/sandboxes/{}/stop", encode(name));
                Ok(Backend::daemon(socket)?.json(Method::POST, &route, None)?)
            }
            Backend::Direct(root) => {
                let sandbox = root.open(name)?;
                if !sandbox.is_live() {
                    return Err(BackendError::NotRunning {
                        name: name.to_owned(),
                        source: io::Error::other("it already stopped"),
                    });
                }
                ops::stop(root, name)?;
                Ok(serde_json::to_value(ops::inspect(root, name)?)?)
            }
        }
    }

    /// Stops the sandbox if it runs, then removes it and everything it kept.
    pub fn destroy(&self, name: &str) -> Result<Value, BackendError> {
        match self {
            Backend::Daemon(socket) => {
                let route = format!("/v1/sandboxes/{}", encode(name));
                Ok(Backend::daemon(socket)?.json(Method::DELETE, &route, None)?)
            }
            Backend::Direct(root) => {
                ops::remove(root, name)?;
                Ok(json!({ "name": name, "removed": true }))
            }
        }
    }

    /// Writes a stopped sandbox's change into its workspace, only if it is
    /// still exactly the change `expect` names.
    pub fn apply(
        &self,
        name: &str,
        expect: ops::ChangeDigest,
        allow_protected: bool,
    ) -> Result<Value, BackendError> {
        if let Backend::Daemon(socket) = self {
            let route = format!("/v1/sandboxes/{}/apply", encode(name));
            let body = json!({ "allow_protected": allow_protected, "expect": expect.to_string() });
            match Backend::daemon(socket)?.json(Method::POST, &route, Some(&body)) {
                // A root daemon applies for root only: a user applies the
                // same change as themself, as `airlock apply` does.
                Err(e) if e.code() == Some("forbidden") => {}
                other => return Ok(other?),
            }
        }
        let root = match self {
            Backend::Direct(root) => root.clone(),
            Backend::Daemon(_) => StateRoot::from_env()?,
        };
        let pending = ops::prepare_apply(&root, name, allow_protected, Some(expect), &mut |_| {})?;
        let digest = pending.digest();
        if pending.view.diff.is_empty() {
            return Ok(
                json!({ "applied": false, "written": [], "deleted": [], "digest": digest.to_string() }),
            );
        }
        let report = ops::apply(pending, &mut |_| {})?;
        let paths = |v: &[PathBuf]| v.iter().map(|p| p.to_string_lossy().into_owned()).collect::<Vec<_>>();
        Ok(json!({
            "applied": true,
            "written": paths(&report.written),
            "deleted": paths(&report.deleted),
            "digest": report.digest.unwrap_or(digest).to_string(),
        }))
    }
}

/// The supervisor of a running sandbox, or why there is none.
fn running(root: &StateRoot, name: &str) -> Result<supervisor::SupervisorClient, BackendError> {
    supervisor::SupervisorClient::connect(&root.open(name)?)
        .map_err(|source| BackendError::NotRunning { name: name.to_owned(), source })
}

/// A built-in policy's name as it is; a policy file by its absolute path
/// (the daemon, and a supervisor, do not share the server's directory).
fn policy_argument(policy: &str) -> Result<String, BackendError> {
    if Policy::builtin_names().contains(&policy) || !std::path::Path::new(policy).exists() {
        return Ok(policy.to_owned());
    }
    let path = std::fs::canonicalize(policy)
        .map_err(|source| BackendError::PolicyFile { path: policy.to_owned(), source })?;
    Ok(path.to_string_lossy().into_owned())
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
