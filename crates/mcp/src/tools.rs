//! The MCP tools: each one's input (its JSON schema comes from these
//! types, its descriptions from their doc comments) and how its answer or
//! airlock's refusal becomes a tool result. The work is done by
//! [`Backend`], on a blocking thread.

use std::collections::BTreeMap;
use std::time::Duration;

use airlock_policy::WorkspaceMode;
use airlock_runtime::ops::ChangeDigest;
use base64::Engine;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ErrorData, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::backend::{Backend, BackendError, CreateSpec};

/// An exec's timeout when the call gives none.
const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 60;
/// How much of each output stream an exec keeps by default.
const DEFAULT_OUTPUT_CAP: usize = 64 * 1024;
/// How much of a file `read_file` returns by default.
const DEFAULT_READ_CAP: usize = 256 * 1024;
/// How much of a diff `diff` returns by default.
const DEFAULT_DIFF_CAP: usize = 256 * 1024;
/// The most any call may ask to have returned: results go into a model's context.
const MAX_CAP: usize = 16 * 1024 * 1024;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    /// The policy: a built-in name (dev, ci, plugin, remediation) or the
    /// path of a policy file on the host. Default: dev.
    #[serde(default)]
    pub policy: Option<String>,
    /// A directory on the host the sandbox works on, mounted at the same
    /// path inside. With the usual overlay mode the sandbox's changes are
    /// held back: read them with diff. Without it nothing is mounted.
    #[serde(default)]
    pub workspace: Option<String>,
    /// How the workspace is mounted: overlay (changes held for review),
    /// ro, rw (writes go straight to the host) or none. Default: the policy's.
    #[serde(default)]
    pub workspace_mode: Option<Mode>,
    /// How long the sandbox may live, e.g. "30m", "2h" (within the
    /// policy's limit). Default: the policy's. It is stopped then.
    #[serde(default)]
    pub timeout: Option<String>,
    /// A name for the sandbox (letters, digits, '-'); default: generated.
    #[serde(default)]
    pub name: Option<String>,
    /// Extra egress, HOST[:PORT] each, where the policy allows adding it.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Environment variables for every process in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Overlay,
    Ro,
    Rw,
    None,
}

impl From<Mode> for WorkspaceMode {
    fn from(mode: Mode) -> WorkspaceMode {
        match mode {
            Mode::Overlay => WorkspaceMode::Overlay,
            Mode::Ro => WorkspaceMode::Ro,
            Mode::Rw => WorkspaceMode::Rw,
            Mode::None => WorkspaceMode::None,
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxParams {
    /// The sandbox's name, as create_sandbox or list_sandboxes gave it.
    pub sandbox: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    /// The sandbox's name.
    pub sandbox: String,
    /// The program and its arguments, run as given (no shell). Give this
    /// or `command`, not both.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// A shell command line, run with /bin/sh -c. Give this or `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// The working directory inside (default: the workspace, else /).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables for this process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Seconds before the process is killed (exit code 124). Default 60.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// The most bytes of stdout, and of stderr, returned (default 65536);
    /// the rest is counted and marked as truncated.
    #[serde(default)]
    pub max_output_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileParams {
    /// The sandbox's name.
    pub sandbox: String,
    /// An absolute path in the sandbox's own view (a symlink at the end is not followed).
    pub path: String,
    /// The most bytes returned (default 262144); a longer file is cut, and marked so.
    #[serde(default)]
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// The content is the file's text (UTF-8).
    #[default]
    Text,
    /// The content is the file's bytes in standard base64.
    Base64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileParams {
    /// The sandbox's name.
    pub sandbox: String,
    /// An absolute path in the sandbox; its directory must exist. The file
    /// is replaced only once all of it arrived.
    pub path: String,
    /// The file's new content.
    pub content: String,
    /// How `content` is written: text (default) or base64.
    #[serde(default)]
    pub encoding: Encoding,
    /// Permission bits for a new file, in octal text such as "755" (default 644).
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFilesParams {
    /// The sandbox's name.
    pub sandbox: String,
    /// An absolute directory path in the sandbox.
    pub path: String,
    /// Levels to descend (1: the directory's own entries). Default 1.
    #[serde(default)]
    pub depth: Option<u32>,
    /// At most this many entries (the rest is reported as truncated).
    #[serde(default)]
    pub max_entries: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiffParams {
    /// The sandbox's name (it needs an overlay workspace).
    pub sandbox: String,
    /// The most bytes of the diff returned (default 262144).
    #[serde(default)]
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplyParams {
    /// The sandbox's name; it must be stopped.
    pub sandbox: String,
    /// The digest the diff tool returned ("sha256:…"): only exactly that
    /// change is written, so what was reviewed is what lands.
    pub expect: String,
    /// Also write protected paths (.git/hooks, shell rc files, editor config).
    #[serde(default)]
    pub allow_protected: bool,
}

/// The MCP server: one per client session, all sharing one backend.
#[derive(Clone)]
pub struct AirlockTools {
    backend: Backend,
    tool_router: ToolRouter<AirlockTools>,
}

impl AirlockTools {
    /// The tools; `apply` only with `allow_apply` (otherwise it is not
    /// listed, and calling it is an unknown tool).
    pub fn new(backend: Backend, allow_apply: bool) -> AirlockTools {
        let mut tool_router = Self::tool_router();
        if !allow_apply {
            tool_router.remove_route("apply");
        }
        AirlockTools { backend, tool_router }
    }

    /// Runs `op` on a blocking thread; its refusal becomes an error result
    /// carrying airlock's message.
    async fn call<T, F>(&self, op: F) -> Result<CallToolResult, ErrorData>
    where
        T: Into<Value> + Send + 'static,
        F: FnOnce(Backend) -> Result<T, BackendError> + Send + 'static,
    {
        let backend = self.backend.clone();
        match tokio::task::spawn_blocking(move || op(backend)).await {
            Ok(Ok(value)) => Ok(CallToolResult::structured(value.into())),
            Ok(Err(e)) => {
                tracing::debug!("tool refused: {e}");
                Ok(refused(&message(&e)))
            }
            Err(e) => Err(ErrorData::internal_error(format!("the operation failed: {e}"), None)),
        }
    }
}

/// An error result: the tool ran and airlock said no.
fn refused(message: &str) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.to_owned())])
}

/// The error's text and its causes not already in it.
fn message(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

fn cap(asked: Option<usize>, default: usize) -> usize {
    asked.unwrap_or(default).min(MAX_CAP)
}

fn to_value<T: serde::Serialize>(value: T) -> Result<Value, BackendError> {
    Ok(serde_json::to_value(value)?)
}

#[tool_router]
impl AirlockTools {
    #[tool(description = "Create a long-lived sandbox and start it. Returns the sandbox (name, state, \
        policy, workspace). Processes inside are isolated from the host; with an overlay workspace \
        their changes are held back until reviewed with diff. The sandbox lives until destroy_sandbox, \
        or until its timeout stops it.")]
    async fn create_sandbox(
        &self,
        Parameters(p): Parameters<CreateParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let timeout = match p.timeout.as_deref().map(airlock_policy::parse_duration).transpose() {
            Ok(t) => t,
            Err(why) => return Ok(refused(&format!("timeout: {why}"))),
        };
        let spec = CreateSpec {
            name: p.name,
            policy: p.policy.unwrap_or_else(|| "dev".to_owned()),
            workspace: p.workspace.map(Into::into),
            workspace_mode: p.workspace_mode.map(Into::into),
            timeout,
            allow: p.allow,
            env: p.env,
        };
        self.call(move |b| b.create(spec)).await
    }

    #[tool(description = "List the sandboxes (name, state, policy, workspace, exit once stopped).")]
    async fn list_sandboxes(&self) -> Result<CallToolResult, ErrorData> {
        self.call(|b| b.list().map(|sandboxes| json!({ "sandboxes": sandboxes }))).await
    }

    #[tool(description = "Run a process in a running sandbox and wait for it to end. Give argv (no \
        shell) or command (run by /bin/sh -c). Returns exit_code (124 when timeout_secs killed it, \
        128+N for signal N), stdout and stderr, each cut at max_output_bytes with a marker saying so. \
        A non-zero exit is a normal result, not an error. stdin is empty.")]
    async fn exec(&self, Parameters(p): Parameters<ExecParams>) -> Result<CallToolResult, ErrorData> {
        let argv = match (p.argv, p.command) {
            (Some(argv), None) if !argv.is_empty() => argv,
            (None, Some(command)) => vec!["/bin/sh".to_owned(), "-c".to_owned(), command],
            (Some(_), None) => return Ok(refused("argv: give the program and its arguments")),
            _ => return Ok(refused("give either argv or command (exactly one)")),
        };
        let timeout = Duration::from_secs(p.timeout_secs.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS).max(1));
        let output_cap = cap(p.max_output_bytes, DEFAULT_OUTPUT_CAP);
        self.call(move |b| b.exec(&p.sandbox, argv, p.cwd, p.env, timeout, output_cap).and_then(to_value))
            .await
    }

    #[tool(description = "Read a regular file inside a running sandbox. Returns content (text; \
        content_base64 instead when it is not UTF-8), size and whether it was cut at max_bytes.")]
    async fn read_file(
        &self,
        Parameters(p): Parameters<ReadFileParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let read_cap = cap(p.max_bytes, DEFAULT_READ_CAP);
        self.call(move |b| {
            let read = b.read_file(&p.sandbox, &p.path, read_cap)?;
            let mut answer = json!({
                "path": p.path, "size": read.total(), "truncated": read.truncated(),
            });
            match std::str::from_utf8(read.bytes()) {
                Ok(text) => answer["content"] = json!(text),
                Err(_) => {
                    answer["content_base64"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(read.bytes()))
                }
            }
            Ok(answer)
        })
        .await
    }

    #[tool(description = "Write a file inside a running sandbox (created, or replaced whole once all of \
        it arrived). Returns the path and the size written.")]
    async fn write_file(
        &self,
        Parameters(p): Parameters<WriteFileParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let content = match p.encoding {
            Encoding::Text => p.content.into_bytes(),
            Encoding::Base64 => match base64::engine::general_purpose::STANDARD.decode(p.content.trim()) {
                Ok(bytes) => bytes,
                Err(e) => return Ok(refused(&format!("content: not base64 ({e})"))),
            },
        };
        let mode = match p.mode.as_deref().map(|m| u32::from_str_radix(m.trim_start_matches("0o"), 8)) {
            None => None,
            Some(Ok(mode)) if mode <= 0o7777 => Some(mode),
            Some(_) => return Ok(refused("mode: expected permission bits in octal, such as \"644\"")),
        };
        self.call(move |b| b.write_file(&p.sandbox, &p.path, content, mode)).await
    }

    #[tool(description = "List a directory inside a running sandbox: each entry's name (a path below \
        the directory when depth > 1), type (file, dir, symlink, other), size, mode, mtime. Symlinks \
        are listed, not followed.")]
    async fn list_files(
        &self,
        Parameters(p): Parameters<ListFilesParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let depth = p.depth.unwrap_or(1);
        self.call(move |b| b.list_files(&p.sandbox, &p.path, depth, p.max_entries)).await
    }

    #[tool(description = "What the sandbox changed in its overlay workspace, as a unified diff, and \
        the change's digest (pass it to apply to write exactly this change to the host). Works while \
        it runs and after it stopped.")]
    async fn diff(&self, Parameters(p): Parameters<DiffParams>) -> Result<CallToolResult, ErrorData> {
        let diff_cap = cap(p.max_bytes, DEFAULT_DIFF_CAP);
        self.call(move |b| {
            let (patch, digest) = b.diff(&p.sandbox, diff_cap)?;
            Ok(json!({ "diff": patch.text(), "digest": digest, "truncated": patch.truncated() }))
        })
        .await
    }

    #[tool(description = "The sandbox's network log: every connection, request and DNS question its \
        egress proxy decided, with host, port, allowed or refused, and the policy rule that decided.")]
    async fn network_log(
        &self,
        Parameters(p): Parameters<SandboxParams>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(move |b| {
            b.network_log(&p.sandbox).and_then(|entries| Ok(json!({ "entries": to_value(entries)? })))
        })
        .await
    }

    #[tool(description = "Stop a running sandbox: its processes end, its workspace changes stay for \
        diff (and apply). Returns the stopped sandbox.")]
    async fn stop_sandbox(
        &self,
        Parameters(p): Parameters<SandboxParams>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(move |b| b.stop(&p.sandbox)).await
    }

    #[tool(description = "Destroy a sandbox: stop it if it runs, then remove it and everything it \
        kept, its unapplied changes included.")]
    async fn destroy_sandbox(
        &self,
        Parameters(p): Parameters<SandboxParams>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(move |b| b.destroy(&p.sandbox)).await
    }

    #[tool(description = "Write a stopped sandbox's workspace changes into the host's workspace \
        directory, all or nothing, only if the change is still exactly the one whose digest diff \
        returned (expect).")]
    async fn apply(&self, Parameters(p): Parameters<ApplyParams>) -> Result<CallToolResult, ErrorData> {
        let expect: ChangeDigest = match p.expect.parse() {
            Ok(digest) => digest,
            Err(e) => return Ok(refused(&format!("expect: {e}"))),
        };
        self.call(move |b| b.apply(&p.sandbox, expect, p.allow_protected)).await
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for AirlockTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("airlock", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "airlock sandboxes as tools: create_sandbox, then exec, read_file, write_file, \
                 list_files in it; diff shows what it changed in its workspace; network_log what it \
                 reached; stop_sandbox and destroy_sandbox end it. Sandboxes outlive this session \
                 until their timeout.",
            )
    }
}
