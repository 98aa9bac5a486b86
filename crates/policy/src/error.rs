//! Errors from loading, layering and overriding policies.
//!
//! File errors carry `path:line:column` so an editor can jump to the key, and
//! every message says what to change.

use std::path::PathBuf;

use thiserror::Error;

/// Maximum number of policy files in one `extends` chain.
pub const MAX_EXTENDS_DEPTH: usize = 8;

/// Why loading or refining a policy failed.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// The policy file could not be read from disk.
    #[error("cannot read policy file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A problem at a known position inside a policy file.
    #[error("{}:{line}:{column}: {kind}", path.display())]
    File { path: PathBuf, line: usize, column: usize, kind: FileErrorKind },

    /// `resolve` got something that is neither a built-in name nor a file.
    #[error(
        "no built-in profile or policy file named {name:?} \
         (built-in profiles: dev, ci, plugin, remediation; a file path must exist)"
    )]
    NotFound { name: String },

    /// Files extend each other in a loop.
    #[error("policy files extend each other in a cycle: {}", display_chain(.chain))]
    ExtendsCycle { chain: Vec<PathBuf> },

    /// The `extends` chain is longer than [`MAX_EXTENDS_DEPTH`] files.
    #[error(
        "{}: extends chain is deeper than {max} files; flatten some of the files into one",
        path.display()
    )]
    ExtendsTooDeep { path: PathBuf, max: usize },

    /// A CLI override asked for more than the policy grants.
    #[error(
        "{flag} {requested} would raise limits.{limit} above {current} set by policy \
         {policy:?}, which has allow_raise = false; choose a value of at most {current}, \
         or write a policy file that extends {policy:?} and sets [limits] {limit}"
    )]
    LimitRaise { limit: &'static str, flag: &'static str, policy: String, current: String, requested: String },

    /// A CLI override value is out of range or malformed.
    #[error("{flag} {value}: {reason}")]
    InvalidOverride { flag: &'static str, value: String, reason: String },

    /// `--allow` was given for a policy whose sandbox has no network at all.
    #[error(
        "--allow {entry}: policy {policy:?} has egress = \"none\": the sandbox has no network \
         at all, so no host can be allowed; use a policy with egress = \"proxy\" (dev, ci, remediation)"
    )]
    AllowWithoutEgress { policy: String, entry: String },

    /// `--allow` was given for a policy that keeps its allow list in files.
    #[error(
        "--allow {entry}: policy {policy:?} has allow_flag = false, so hosts can only be allowed \
         in a policy file; write one that extends {policy:?} and lists the host in [network] allow"
    )]
    AllowFlagDisabled { policy: String, entry: String },

    /// `--containers` on a policy that neither runs a container engine nor
    /// lets the flag ask for one.
    #[error(
        "--containers: policy {policy:?} has no container engine and does not let --containers ask for one \
         ([isolation] containers_flag = false); use a policy that allows it, or write one that extends \
         {policy:?} with [isolation] containers = true"
    )]
    ContainersFlagDisabled { policy: String },

    /// `--env` named a variable the policy reserves for a secret's placeholder.
    #[error(
        "--env {name}: {name} is secret [secrets.{name}] of policy {policy:?}; inside the sandbox \
         it holds a placeholder that the egress proxy replaces, and it cannot be set directly"
    )]
    EnvIsSecret { policy: String, name: String },

    /// A read-write workspace was requested where nothing may be written back.
    #[error(
        "workspace mode \"rw\" is not allowed by policy {policy:?}: it has \
         writeback = \"never\", and rw would write to the host workspace directly; \
         use \"overlay\" (changes are discarded) or a policy with writeback = \"review\""
    )]
    RwWithoutWriteback { policy: String },
}

/// What is wrong at a position inside a policy file.
#[derive(Debug, Error, PartialEq)]
pub enum FileErrorKind {
    /// The text is not valid TOML.
    #[error("{0}")]
    Syntax(String),

    /// A key the schema does not know (often a typo).
    #[error("unknown key `{key}` {} (expected one of: {})", section_label(.section), .expected.join(", "))]
    UnknownKey { section: String, key: String, expected: &'static [&'static str] },

    /// A value of the wrong TOML type, e.g. a string where a list belongs.
    #[error("{}: expected {expected}, found {found}", key_label(.section, .key))]
    WrongType { section: String, key: String, expected: &'static str, found: &'static str },

    /// A value of the right type that is not acceptable.
    #[error("{}: {reason}", key_label(.section, .key))]
    InvalidValue { section: String, key: String, reason: String },

    /// A required key is absent from a table that is present.
    #[error("{}: missing key `{key}`: {hint}", section_title(.section))]
    MissingKey { section: String, key: &'static str, hint: &'static str },
}

impl FileErrorKind {
    /// The dotted key the error is about ("limits.memory"), for tests and tooling.
    pub fn key(&self) -> Option<String> {
        match self {
            Self::Syntax(_) => None,
            Self::UnknownKey { section, key, .. }
            | Self::WrongType { section, key, .. }
            | Self::InvalidValue { section, key, .. } => {
                Some(if section.is_empty() { key.clone() } else { format!("{section}.{key}") })
            }
            Self::MissingKey { section, key, .. } => Some(format!("{section}.{key}")),
        }
    }
}

/// Sections written as arrays of tables (`[[...]]`) in policy files.
const ARRAY_SECTIONS: &[&str] = &["network.rule"];

/// A section as its header is written in a policy file.
fn section_title(section: &str) -> String {
    if ARRAY_SECTIONS.contains(&section) { format!("[[{section}]]") } else { format!("[{section}]") }
}

fn section_label(section: &str) -> String {
    if section.is_empty() { "at the top level".to_string() } else { format!("in {}", section_title(section)) }
}

fn key_label(section: &str, key: &str) -> String {
    if section.is_empty() { key.to_string() } else { format!("{} {key}", section_title(section)) }
}

fn display_chain(chain: &[PathBuf]) -> String {
    chain.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" -> ")
}
