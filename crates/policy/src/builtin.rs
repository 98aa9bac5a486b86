//! The built-in profiles: reviewed, commented TOML embedded in the binary and
//! parsed by the same code as user files, so `airlock policy show dev` prints
//! exactly what runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{FileErrorKind, PolicyError};
use crate::layer::{apply, check_combined};
use crate::parse::{SCHEMA, Source, parse_layer};
use crate::{
    Artifacts, AuditPolicy, Cleanup, CleanupAction, Egress, EnvPolicy, Filesystem, Isolation, Limits,
    Network, Policy, Tier, WorkspaceMode, WorkspacePolicy, Writeback,
};

pub(crate) const NAMES: &[&str] = &["dev", "ci", "plugin", "remediation"];

pub(crate) fn source(name: &str) -> Option<&'static str> {
    match name {
        "dev" => Some(include_str!("../profiles/dev.toml")),
        "ci" => Some(include_str!("../profiles/ci.toml")),
        "plugin" => Some(include_str!("../profiles/plugin.toml")),
        "remediation" => Some(include_str!("../profiles/remediation.toml")),
        _ => None,
    }
}

/// `None` for an unknown name. The profiles are checked by tests, so the
/// error branch is only reachable by editing a profile badly.
pub(crate) fn load(name: &str) -> Option<Policy> {
    source(name)?;
    load_checked(name).ok()
}

/// Parses a built-in profile; every key must be present and `extends` absent,
/// so a profile never silently depends on another one's values.
pub(crate) fn load_checked(name: &str) -> Result<Policy, PolicyError> {
    let text = source(name).ok_or_else(|| PolicyError::NotFound { name: name.to_string() })?;
    let shown = PathBuf::from(format!("<built-in profile {name}>"));
    let src = Source { path: Path::new(&shown), text };
    let layer = parse_layer(&src)?;
    if let Some(extends) = &layer.extends {
        return Err(src.invalid(
            extends.span(),
            "",
            "extends",
            "built-in profiles are complete and must not extend another profile".to_string(),
        ));
    }
    let mut missing: Vec<String> = SCHEMA
        .iter()
        .flat_map(|(section, keys)| keys.iter().map(move |k| format!("{section}.{k}")))
        .filter(|k| !layer.keys_set.contains_key(k))
        .collect();
    if layer.description.is_none() {
        missing.push("description".to_string());
    }
    if !missing.is_empty() {
        return Err(src.error(
            0..0,
            FileErrorKind::InvalidValue {
                section: String::new(),
                key: missing.join(", "),
                reason: "built-in profile must set every key".to_string(),
            },
        ));
    }
    let mut policy = apply(&blank(), &layer);
    check_combined(&src, &layer, &policy)?;
    policy.name = name.to_string();
    policy.extends_chain = vec![name.to_string()];
    Ok(policy)
}

/// The starting point a built-in overwrites completely (checked above).
fn blank() -> Policy {
    Policy {
        name: String::new(),
        description: String::new(),
        extends_chain: Vec::new(),
        isolation: Isolation {
            tier: Tier::Process,
            allow_weaker: BTreeSet::new(),
            weaker_tier_than: None,
            containers: false,
            containers_flag: false,
        },
        filesystem: Filesystem { read_only: Vec::new(), hidden: Vec::new(), tmp_size: 0 },
        workspace: WorkspacePolicy {
            mode: WorkspaceMode::None,
            writeback: Writeback::Never,
            protected: Vec::new(),
        },
        limits: Limits {
            timeout: Duration::ZERO,
            memory: 0,
            pids: 0,
            cpus: 0.0,
            disk: 0,
            nofile: 0,
            log_size: 0,
            audit_size: 0,
            stop_grace: crate::DEFAULT_STOP_GRACE,
            allow_raise: false,
        },
        network: Network {
            egress: Egress::None,
            transparent: false,
            ports: false,
            allow: Vec::new(),
            deny: Vec::new(),
            allow_flag: false,
            extra_roots: Vec::new(),
            rules: Vec::new(),
        },
        artifacts: Artifacts { capture: Vec::new(), max_bytes: 0 },
        cleanup: Cleanup { on_success: CleanupAction::Keep, on_failure: CleanupAction::Keep },
        env: EnvPolicy { pass: Vec::new(), set: BTreeMap::new() },
        audit: AuditPolicy { exec_trace: false },
        secrets: Vec::new(),
        image: crate::ImagePolicy::default(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn every_builtin_parses_completely() {
        for name in NAMES {
            let policy = load_checked(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(policy.name, *name);
            assert_eq!(policy.extends_chain, vec![name.to_string()]);
            assert!(!policy.description.is_empty());
        }
        assert!(load("nope").is_none());
    }

    /// No built-in reaches a registry over plain HTTP or carries credentials.
    #[test]
    fn no_builtin_marks_a_registry_insecure_or_names_credentials() {
        for name in NAMES {
            let policy = load_checked(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(policy.image.insecure.is_empty(), "{name}");
            assert!(policy.image.credentials.is_empty(), "{name}");
        }
    }

    /// Transparent egress is on where the proxy is (dev, ci, remediation);
    /// plugin has no network at all.
    #[test]
    fn transparent_egress_where_the_proxy_is() {
        for name in NAMES {
            let policy = load_checked(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            let expected = *name != "plugin";
            assert_eq!(policy.network.transparent, expected, "{name}");
            assert_eq!(policy.network.has_egress(), expected, "{name}");
        }
    }
}
