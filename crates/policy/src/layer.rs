//! Layering: a file refines the profile it extends.
//!
//! Scalars and grant-like lists (`read_only`, `capture`, `env.pass`,
//! `allow_weaker`, `network.allow`, `network.extra_roots`) are replaced when
//! the refining layer names them; deny-like lists (`hidden`, `protected`,
//! `network.deny`, `network.rule`) are unioned so no layer can remove a deny;
//! `env.set` is merged key by key, `secrets` name by name (a layer that
//! defines a secret of the same name replaces the whole entry), and
//! `image.credentials` registry by registry. `image.insecure` is a grant:
//! replaced, so a refining file can narrow it.

use std::path::{Path, PathBuf};

use crate::error::{FileErrorKind, MAX_EXTENDS_DEPTH, PolicyError};
use crate::parse::{Layer, Source, parse_layer};
use crate::{Policy, WorkspaceMode, Writeback, builtin};

/// Appends the items of `extra` not already in `base`, keeping base order.
fn union<T: PartialEq + Clone>(base: &[T], extra: &[T]) -> Vec<T> {
    let mut out = base.to_vec();
    for item in extra {
        if !out.contains(item) {
            out.push(item.clone());
        }
    }
    out
}

/// Returns `base` refined by `layer`. Purely mechanical: cross-key checks are
/// done by the caller, which knows where the keys are in the file.
pub(crate) fn apply(base: &Policy, layer: &Layer) -> Policy {
    let mut p = base.clone();
    macro_rules! replace {
        ($($field:ident => $target:expr),+ $(,)?) => {
            $(if let Some(v) = &layer.$field { $target = v.clone(); })+
        };
    }
    replace! {
        description => p.description,
        tier => p.isolation.tier,
        allow_weaker => p.isolation.allow_weaker,
        containers => p.isolation.containers,
        containers_flag => p.isolation.containers_flag,
        read_only => p.filesystem.read_only,
        tmp_size => p.filesystem.tmp_size,
        timeout => p.limits.timeout,
        memory => p.limits.memory,
        pids => p.limits.pids,
        cpus => p.limits.cpus,
        disk => p.limits.disk,
        nofile => p.limits.nofile,
        log_size => p.limits.log_size,
        audit_size => p.limits.audit_size,
        stop_grace => p.limits.stop_grace,
        allow_raise => p.limits.allow_raise,
        egress => p.network.egress,
        transparent => p.network.transparent,
        ports => p.network.ports,
        allow => p.network.allow,
        allow_flag => p.network.allow_flag,
        extra_roots => p.network.extra_roots,
        capture => p.artifacts.capture,
        max_bytes => p.artifacts.max_bytes,
        on_success => p.cleanup.on_success,
        on_failure => p.cleanup.on_failure,
        pass => p.env.pass,
        exec_trace => p.audit.exec_trace,
        require_digest => p.image.require_digest,
        registries => p.image.registries,
        insecure => p.image.insecure,
    }
    if let Some(reference) = &layer.image_ref {
        p.image.reference = Some(reference.clone());
    }
    // A file may move a policy that requires the microvm tier back to the
    // process tier (its author decided); the runtime says so at every start.
    match layer.tier {
        Some(crate::Tier::Process) if base.isolation.tier == crate::Tier::Microvm => {
            p.isolation.weaker_tier_than = Some(base.name.clone());
        }
        Some(crate::Tier::Microvm) => p.isolation.weaker_tier_than = None,
        _ => {}
    }
    if let Some(mode) = &layer.mode {
        p.workspace.mode = *mode.get_ref();
    }
    if let Some(writeback) = &layer.writeback {
        p.workspace.writeback = *writeback.get_ref();
    }
    if let Some(hidden) = &layer.hidden {
        p.filesystem.hidden = union(&base.filesystem.hidden, hidden);
    }
    if let Some(protected) = &layer.protected {
        p.workspace.protected = union(&base.workspace.protected, protected);
    }
    if let Some(set) = &layer.set {
        p.env.set.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    if let Some(deny) = &layer.deny {
        p.network.deny = union(&base.network.deny, deny);
    }
    if let Some(rules) = &layer.rules {
        p.network.rules = union(&base.network.rules, rules);
    }
    for (_, secret) in &layer.secrets {
        match p.secrets.iter_mut().find(|s| s.name == secret.name) {
            Some(existing) => *existing = secret.clone(),
            None => p.secrets.push(secret.clone()),
        }
    }
    p.secrets.sort_by(|a, b| a.name.cmp(&b.name));
    for (registry, credential) in &layer.credentials {
        p.image.credentials.retain(|known, _| !known.eq_ignore_ascii_case(registry));
        p.image.credentials.insert(registry.clone(), credential.clone());
    }
    p
}

/// Checks rules that involve more than one key, after `layer` was applied.
pub(crate) fn check_combined(src: &Source<'_>, layer: &Layer, p: &Policy) -> Result<(), PolicyError> {
    if p.workspace.mode == WorkspaceMode::Rw && p.workspace.writeback == Writeback::Never {
        // Point at whichever of the two keys this file set; it created the conflict.
        let (span, key, reason) = match (&layer.mode, &layer.writeback) {
            (None, Some(wb)) => (
                wb.span(),
                "writeback",
                "\"never\" cannot be combined with mode = \"rw\", which writes to the host \
                 workspace directly; set mode = \"overlay\" (changes are discarded) as well",
            ),
            (mode, _) => (
                mode.as_ref().map_or(0..0, |m| m.span()),
                "mode",
                "\"rw\" cannot be combined with writeback = \"never\": rw writes to the host \
                 workspace directly; use mode = \"overlay\" (changes are discarded) or \
                 writeback = \"review\"",
            ),
        };
        return Err(src.invalid(span, "workspace", key, reason.to_string()));
    }
    check_network(src, layer, p)?;
    check_secrets(src, layer, p)
}

/// Allow entries are meaningless without egress; a file that lists some but
/// leaves egress "none" (or turns it off under inherited ones) is a mistake
/// worth naming.
fn check_network(src: &Source<'_>, layer: &Layer, p: &Policy) -> Result<(), PolicyError> {
    if p.network.has_egress() || p.network.allow.is_empty() {
        return Ok(());
    }
    let span_of = |key: &str| layer.keys_set.get(key).cloned().unwrap_or(0..0);
    if layer.allow.as_ref().is_some_and(|a| !a.is_empty()) {
        return Err(src.invalid(
            span_of("network.allow"),
            "network",
            "allow",
            "lists destinations, but egress = \"none\" gives the sandbox no network at all; \
             set egress = \"proxy\" to reach them through airlock's egress proxy"
                .to_string(),
        ));
    }
    let inherited: Vec<&str> = p.network.allow.iter().map(|a| a.source.as_str()).collect();
    Err(src.invalid(
        span_of("network.egress"),
        "network",
        "egress",
        format!(
            "\"none\" leaves the inherited allow entries ({}) unreachable; write allow = [] \
             as well to say that nothing is reachable",
            inherited.join(", ")
        ),
    ))
}

/// A secret's variable must hold the placeholder inside: passing the host's
/// variable through or setting it would put the real value (or another one)
/// in its place.
fn check_secrets(src: &Source<'_>, layer: &Layer, p: &Policy) -> Result<(), PolicyError> {
    for secret in &p.secrets {
        let env_key = if p.env.pass.contains(&secret.name) {
            "pass"
        } else if p.env.set.contains_key(&secret.name) {
            "set"
        } else {
            continue;
        };
        let reason = format!(
            "{} is a secret and is also in env.{env_key}; inside the sandbox it must hold the \
             placeholder that the egress proxy replaces, so remove it from env.{env_key}",
            secret.name
        );
        // Point at the secret when this file defined it, else at the env key it set.
        return Err(match layer.secrets.iter().find(|(_, s)| s.name == secret.name) {
            Some((span, _)) => src.invalid(span.clone(), "secrets", &secret.name, reason),
            None => {
                let span = layer.keys_set.get(&format!("env.{env_key}")).cloned().unwrap_or(0..0);
                src.invalid(span, "env", env_key, reason)
            }
        });
    }
    Ok(())
}

pub(crate) fn load_file(path: &Path) -> Result<Policy, PolicyError> {
    let mut visiting = Vec::new();
    load_chain(path, &mut visiting)
}

/// A stored policy's `text` (one airlock wrote: every key set, extending
/// a built-in profile), from somewhere other than a file of this host (an
/// export bundle): it may extend only a built-in profile. `shown_as`
/// names it in errors.
pub(crate) fn load_text(text: &str, shown_as: &Path) -> Result<Policy, PolicyError> {
    let src = Source { path: shown_as, text };
    let layer = parse_layer(&src)?;
    let base = match &layer.extends {
        None => builtin::load_checked("dev")?,
        Some(name) if builtin::source(name.get_ref()).is_some() => builtin::load_checked(name.get_ref())?,
        Some(name) => {
            return Err(src.error(
                name.span(),
                FileErrorKind::InvalidValue {
                    section: String::new(),
                    key: "extends".to_string(),
                    reason: format!(
                        "{:?} is not a built-in profile ({}): a stored policy extends only those",
                        name.get_ref(),
                        builtin::NAMES.join(", ")
                    ),
                },
            ));
        }
    };
    let mut policy = apply(&base, &layer);
    check_combined(&src, &layer, &policy)?;
    policy.name = shown_as
        .file_stem()
        .map_or_else(|| shown_as.display().to_string(), |s| s.to_string_lossy().into_owned());
    policy.extends_chain.push(shown_as.display().to_string());
    Ok(policy)
}

/// Loads `path` and, recursively, what it extends. `visiting` holds the
/// canonical paths of the files above this one, for cycle detection.
fn load_chain(path: &Path, visiting: &mut Vec<(PathBuf, PathBuf)>) -> Result<Policy, PolicyError> {
    let read_error = |source| PolicyError::Read { path: path.to_path_buf(), source };
    let canonical = path.canonicalize().map_err(read_error)?;
    if visiting.iter().any(|(c, _)| *c == canonical) {
        let mut chain: Vec<PathBuf> = visiting.iter().map(|(_, shown)| shown.clone()).collect();
        chain.push(path.to_path_buf());
        return Err(PolicyError::ExtendsCycle { chain });
    }
    if visiting.len() >= MAX_EXTENDS_DEPTH {
        return Err(PolicyError::ExtendsTooDeep { path: path.to_path_buf(), max: MAX_EXTENDS_DEPTH });
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    let src = Source { path, text: &text };
    let layer = parse_layer(&src)?;

    visiting.push((canonical, path.to_path_buf()));
    let base = match &layer.extends {
        None => builtin::load_checked("dev")?,
        Some(name) if builtin::source(name.get_ref()).is_some() => builtin::load_checked(name.get_ref())?,
        Some(name) => {
            let target = path.parent().unwrap_or(Path::new(".")).join(name.get_ref());
            if !target.is_file() {
                return Err(src.error(
                    name.span(),
                    FileErrorKind::InvalidValue {
                        section: String::new(),
                        key: "extends".to_string(),
                        reason: format!(
                            "{:?} is neither a built-in profile ({}) nor a policy file \
                             (looked for {})",
                            name.get_ref(),
                            builtin::NAMES.join(", "),
                            target.display()
                        ),
                    },
                ));
            }
            load_chain(&target, visiting)?
        }
    };
    visiting.pop();

    let mut policy = apply(&base, &layer);
    check_combined(&src, &layer, &policy)?;
    policy.name =
        path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
    policy.extends_chain.push(path.display().to_string());
    Ok(policy)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_stored_policy_extends_only_a_builtin_profile() {
        let stored = Policy::builtin("ci").unwrap().to_toml();
        let policy = load_text(&stored, Path::new("policy.toml")).unwrap();
        assert_eq!(policy.limits, Policy::builtin("ci").unwrap().limits);
        let err = load_text("extends = \"/etc/airlock/other.toml\"\n", Path::new("policy.toml")).unwrap_err();
        assert!(err.to_string().contains("not a built-in profile"), "{err}");
    }

    #[test]
    fn union_keeps_base_order_and_drops_duplicates() {
        assert_eq!(union(&[1, 2], &[3, 2, 1, 4]), vec![1, 2, 3, 4]);
        assert_eq!(union::<u8>(&[], &[]), Vec::<u8>::new());
    }
}
