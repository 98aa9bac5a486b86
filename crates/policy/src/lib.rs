//! airlock-policy: what a sandbox may do, as plain data.
//!
//! A [`Policy`] is resolved from layers — a built-in profile, then policy
//! files that `extend` it, then CLI [`Overrides`] — and validated at every
//! step. It starts nothing: the runtime turns a resolved policy into a launch
//! plan. Deny-like lists (`hidden`, `protected`, `network.deny`,
//! `network.rule`) only ever grow across layers, and CLI flags can only
//! tighten limits unless the policy says otherwise.

mod builtin;
mod error;
mod image;
mod layer;
mod network;
mod overrides;
mod parse;
mod render;
mod units;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use error::{FileErrorKind, MAX_EXTENDS_DEPTH, PolicyError};
pub use image::{ImagePolicy, RegistryCredential};
pub use network::{HostMatch, HostPattern, HostRule, Network, Secret, SecretSource};
pub use overrides::Overrides;
pub use units::{format_duration, format_size, parse_duration, parse_size};

/// A fully resolved sandbox policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Built-in profile name, or the file stem of the last policy file.
    pub name: String,
    pub description: String,
    /// Every layer that contributed, root first: `["dev", "/path/my.toml"]`.
    pub extends_chain: Vec<String>,
    pub isolation: Isolation,
    pub filesystem: Filesystem,
    pub workspace: WorkspacePolicy,
    pub limits: Limits,
    pub network: Network,
    pub artifacts: Artifacts,
    pub cleanup: Cleanup,
    /// What the sandbox's audit log records beyond its life and network.
    #[serde(default)]
    pub audit: AuditPolicy,
    pub env: EnvPolicy,
    /// Credentials injected by the egress proxy, sorted by name.
    #[serde(default)]
    pub secrets: Vec<Secret>,
    /// The OCI image a sandbox's root comes from, and which images may be used.
    #[serde(default)]
    pub image: ImagePolicy,
}

/// Which isolation mechanism runs the sandbox, and which host features may be
/// missing without refusing to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    pub tier: Tier,
    pub allow_weaker: BTreeSet<Weakening>,
    /// The policy this one extends that requires the microvm tier, when a
    /// layer moved it back to the process tier: allowed, since the file says
    /// so, and printed at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weaker_tier_than: Option<String>,
    /// A container engine inside each microVM sandbox of this policy (its
    /// own dockerd, reached through a socket of the sandbox's). The process
    /// tier refuses it: nested containers need their own kernel here.
    #[serde(default)]
    pub containers: bool,
    /// Whether `--containers` (the API's `"containers": true`) may ask for
    /// one where `containers` is false.
    #[serde(default)]
    pub containers_flag: bool,
}

/// The host filesystem as seen from inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filesystem {
    /// Host paths bound read-only; the runtime skips ones that do not exist.
    pub read_only: Vec<PathBuf>,
    /// Host paths masked inside, on top of the jail's own fixed list.
    pub hidden: Vec<PathBuf>,
    /// Size of the private /tmp in bytes.
    pub tmp_size: u64,
}

/// How the sandbox sees the workspace and whether its changes may come back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspacePolicy {
    pub mode: WorkspaceMode,
    pub writeback: Writeback,
    /// Globs relative to the workspace root that `apply` refuses to write
    /// without `--allow-protected`.
    pub protected: Vec<String>,
}

/// Resource and lifetime limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub timeout: Duration,
    /// Memory limit in bytes.
    pub memory: u64,
    pub pids: u64,
    pub cpus: f64,
    /// Budget in bytes for the workspace's writable layer.
    pub disk: u64,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// Bytes each of the sandbox's output logs (`logs/stdout.log`,
    /// `logs/stderr.log`) may take on the host; later output still reaches
    /// the caller, it is not logged.
    #[serde(default = "default_host_file_size")]
    pub log_size: u64,
    /// Bytes the sandbox's audit log may take before events the sandbox can
    /// cause in numbers (network decisions, execs) are no longer recorded.
    #[serde(default = "default_host_file_size")]
    pub audit_size: u64,
    /// How long a stopping sandbox's processes get between SIGTERM and
    /// SIGKILL.
    #[serde(default = "default_stop_grace")]
    pub stop_grace: Duration,
    /// Whether CLI flags may raise limits above these values.
    pub allow_raise: bool,
}

/// For limits deserialized from a form written before they existed.
fn default_host_file_size() -> u64 {
    32 << 20
}

/// The grace period of a policy written before `stop_grace` existed.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// The longest `stop_grace` a policy may set: a stop must end.
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(600);

fn default_stop_grace() -> Duration {
    DEFAULT_STOP_GRACE
}

/// Files copied out of the workspace after the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifacts {
    /// Globs relative to the workspace root.
    pub capture: Vec<String>,
    /// Total bytes copied; the rest is skipped with a warning.
    pub max_bytes: u64,
}

/// What the audit log records of what runs inside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPolicy {
    /// Record every execve and execveat inside the sandbox (the process
    /// tier: a seccomp user-notification filter whose listener is on the
    /// host). On in every built-in profile; off only to measure its cost.
    pub exec_trace: bool,
}

impl Default for AuditPolicy {
    /// A form written before the setting existed: traced, as built-ins are.
    fn default() -> AuditPolicy {
        AuditPolicy { exec_trace: true }
    }
}

/// What happens to the sandbox's state after it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cleanup {
    pub on_success: CleanupAction,
    pub on_failure: CleanupAction,
}

/// The environment the command starts with; nothing else from the host leaks in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvPolicy {
    /// Host variable names passed through when set on the host.
    pub pass: Vec<String>,
    /// Fixed values.
    pub set: BTreeMap<String, String>,
}

/// Generates the string mapping shared by TOML, Display, FromStr and serde
/// for a unit-variant enum.
macro_rules! keyword_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The spelling used in policy files.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }

            /// All spellings, for "expected one of" messages.
            pub(crate) const NAMES: &'static [&'static str] = &[$($text),+];
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        let names: Vec<String> = Self::NAMES.iter().map(|n| format!("{n:?}")).collect();
                        format!("invalid value {s:?}: expected one of {}", names.join(", "))
                    })
            }
        }
    };
}

keyword_enum! {
    /// Isolation mechanism.
    Tier {
        /// Namespaces, seccomp, Landlock and cgroups on the host kernel.
        Process => "process",
        /// Own guest kernel under QEMU's microvm machine.
        Microvm => "microvm",
    }
}

keyword_enum! {
    /// A host feature the policy lets the runtime do without (with a printed warning).
    Weakening {
        Cgroups => "cgroups",
        Landlock => "landlock",
        DiskQuota => "disk-quota",
        /// The microVM tier without KVM: QEMU's software emulation (TCG).
        Kvm => "kvm",
    }
}

keyword_enum! {
    /// How the workspace appears inside the sandbox.
    WorkspaceMode {
        /// Copy-on-write layer over the host directory; changes are reviewed and applied.
        Overlay => "overlay",
        /// Read-only bind of the host directory.
        Ro => "ro",
        /// Writable bind: changes land on the host immediately.
        Rw => "rw",
        /// No workspace at all.
        None => "none",
    }
}

keyword_enum! {
    /// Whether changes from the sandbox may be applied back to the host.
    Writeback {
        /// `airlock apply` is allowed after the user reviews the diff.
        Review => "review",
        /// `airlock apply` is refused.
        Never => "never",
    }
}

keyword_enum! {
    /// Network egress mode.
    Egress {
        /// No network at all: the sandbox has only loopback and no proxy.
        None => "none",
        /// Only through airlock's egress proxy, to destinations the policy allows.
        Proxy => "proxy",
    }
}

keyword_enum! {
    /// What to do with a finished sandbox's state.
    CleanupAction {
        Keep => "keep",
        Remove => "remove",
    }
}

impl Policy {
    /// Names of the built-in profiles, from most to least trusted use.
    pub fn builtin_names() -> &'static [&'static str] {
        builtin::NAMES
    }

    /// A built-in profile, parsed from its embedded TOML.
    pub fn builtin(name: &str) -> Option<Policy> {
        builtin::load(name)
    }

    /// The commented TOML of a built-in profile, for `airlock policy show`.
    pub fn builtin_source(name: &str) -> Option<&'static str> {
        builtin::source(name)
    }

    /// Loads a policy file, following its `extends` chain (a built-in name or
    /// a path relative to the file) down to a built-in profile.
    pub fn load_file(path: &Path) -> Result<Policy, PolicyError> {
        layer::load_file(path)
    }

    /// A stored policy from `text` rather than a file of this host (an
    /// export bundle's): it may extend only a built-in profile.
    pub fn load_text(text: &str, shown_as: &Path) -> Result<Policy, PolicyError> {
        layer::load_text(text, shown_as)
    }

    /// A built-in profile by name, else a policy file at that path.
    pub fn resolve(name_or_path: &str) -> Result<Policy, PolicyError> {
        if let Some(policy) = Self::builtin(name_or_path) {
            return Ok(policy);
        }
        let path = Path::new(name_or_path);
        if path.exists() {
            Self::load_file(path)
        } else {
            Err(PolicyError::NotFound { name: name_or_path.to_string() })
        }
    }

    /// Applies the CLI layer; limits can only be tightened unless
    /// `limits.allow_raise` is set.
    pub fn apply_overrides(&self, o: &Overrides) -> Result<Policy, PolicyError> {
        overrides::apply(self, o)
    }

    /// The resolved policy as a TOML file that [`Policy::load_file`] reads
    /// back to an equal policy.
    pub fn to_toml(&self) -> String {
        render::to_toml(self)
    }

    /// Whether the runtime may run without host feature `w` (and warn).
    pub fn allows_weaker(&self, w: Weakening) -> bool {
        self.isolation.allow_weaker.contains(&w)
    }

    /// The secret injected as environment variable `name`, if any.
    pub fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets.iter().find(|s| s.name == name)
    }

    /// Whether `airlock apply` may write the sandbox's changes back.
    pub fn allows_writeback(&self) -> bool {
        self.workspace.writeback == Writeback::Review && self.workspace.mode == WorkspaceMode::Overlay
    }
}

/// The fewest processes a sandbox may be limited to: its agent (PID 1 and
/// its threads for the egress listeners) counts against the limit.
pub const MIN_PIDS: u64 = 8;
/// The most processes a limit may name: the kernel's own ceiling on pids
/// (PID_MAX_LIMIT on 64-bit); `pids.max` refuses anything above it.
pub const MAX_PIDS: u64 = 4_194_304;
/// The most CPUs a limit may name; beyond it the kernel's quota arithmetic
/// overflows.
pub const MAX_CPUS: f64 = 1024.0;
