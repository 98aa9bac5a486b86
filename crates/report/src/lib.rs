//! airlock-report: one self-contained HTML page about a sandbox, for the
//! person reviewing what it did: its timeline (every audit event, with
//! filters by kind), the process tree, the workspace diff with simple
//! syntax highlighting, the network decisions with allowed and denied
//! counts and the rules that decided, its limits and its resolved policy.
//!
//! The page fetches nothing: its style and script are inline, no font,
//! image or script comes from elsewhere, and its own Content-Security-Policy
//! (`default-src 'none'`, the inline style and script allowed by hash
//! only) holds it to that. It works offline, from a file or from the
//! daemon.
//!
//! Almost every string on the page came from the sandbox (arguments,
//! paths, host names, file contents, rule texts quoting them). They reach
//! the page only through the template engine (maud), which escapes every
//! value it is given; none is ever put inside the script, the style or an
//! event handler, and the script reads nothing but `data-` attributes and
//! text. Control characters and bidi controls are made visible first
//! (`airlock_workspace::printable`), as everywhere else airlock shows
//! sandbox text.
//!
//! This crate only renders: the runtime gathers a [`ReportInput`] from a
//! sandbox's state directory (`airlock_runtime::report`).

mod events;
mod highlight;
mod page;
mod text;
mod tree;

use serde_json::Value;

/// Everything the page shows.
#[derive(Debug, Clone)]
pub struct ReportInput {
    pub sandbox: SandboxFacts,
    /// The audit log, one JSON object per record, oldest first, as the
    /// file holds them (any kind, known to this build or not).
    pub events: Vec<Value>,
    /// What was wrong with the audit log (a damaged line, a log that could
    /// not be read), shown at the top of the page.
    pub problems: Vec<String>,
    pub diff: DiffSection,
    /// The resolved policy; `None` when it could not be read (`problems`
    /// says why).
    pub policy: Option<PolicySection>,
    /// When the page was made (RFC 3339).
    pub generated_at: String,
    /// What made it, e.g. `airlock 0.1.0`.
    pub generator: String,
}

/// What the sandbox is, from its metadata.
#[derive(Debug, Clone, Default)]
pub struct SandboxFacts {
    pub name: String,
    /// `running`, `stopped`, `failed`, … (with `lost` when its supervisor died).
    pub state: String,
    pub policy: String,
    pub tier: String,
    pub workspace: Option<String>,
    pub workspace_mode: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// How its command ended, in words (`exit 0`, `killed by signal 9`, …).
    pub exit: Option<String>,
    /// Host features it ran without.
    pub degraded: Vec<String>,
}

/// The workspace's changes.
#[derive(Debug, Clone)]
pub enum DiffSection {
    /// Nothing to show, and why (no copy-on-write workspace, a layer that
    /// could not be read).
    Unavailable(String),
    Changes {
        files: Vec<FileChange>,
        /// `sha256:…`, as `airlock diff` ends with it.
        digest: String,
    },
}

/// One changed path.
#[derive(Debug, Clone)]
pub struct FileChange {
    /// The path as airlock shows paths (`airlock_workspace::quote`).
    pub path: String,
    /// added, modified, deleted, type_changed.
    pub kind: String,
    /// file, dir, symlink, other.
    pub entry: String,
    pub lines_added: Option<u64>,
    pub lines_removed: Option<u64>,
    pub binary: bool,
    pub content: FileContent,
}

/// A change's unified diff, or why it is not on the page.
#[derive(Debug, Clone)]
pub enum FileContent {
    /// The unified diff, as `airlock diff` prints it for this path.
    Shown(String),
    NotShown(String),
    /// Nothing to show (a directory).
    Empty,
}

/// The policy the sandbox ran under, resolved.
#[derive(Debug, Clone)]
pub struct PolicySection {
    /// (limit, value) as a person reads them: `memory` → `2 GiB`.
    pub limits: Vec<(String, String)>,
    /// The resolved policy as TOML.
    pub toml: String,
}

/// How much diff text a page carries; past it, files are listed without
/// their content (`airlock diff` has all of it).
pub const DIFF_TEXT_BUDGET: usize = 4 << 20;
/// At most this many timeline rows of the events a sandbox causes in
/// numbers (network decisions, processes); the others are always shown.
pub const MAX_BULK_ROWS: usize = 10_000;
/// At most this many processes in the tree, and rows in the network table.
pub const MAX_PROCESSES: usize = 5_000;
pub const MAX_NETWORK_ROWS: usize = 5_000;

/// The page.
pub fn render(input: &ReportInput) -> String {
    page::render(input)
}

/// The Content-Security-Policy the page carries in its `<meta>`, for a
/// server to send as a header too (with `frame-ancestors`, which only a
/// header can carry).
pub fn content_security_policy() -> String {
    page::csp()
}
