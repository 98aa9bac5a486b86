//! A sandbox's image: the policy's `image.ref` (or `--image`) checked
//! against the policy's rules, found in the store under the state root or
//! pulled into it, and turned into what the launch needs: the unpacked
//! layers and the image's config.

use std::path::{Path, PathBuf};

use airlock_image::auth;
use airlock_image::source::{self, BasicAuth, ImageSource, RegistryOptions};
use airlock_image::store::{Digest, RunConfig, Store};
use airlock_policy::Policy;
use serde::{Deserialize, Serialize};

use crate::RunError;
use crate::pull_gate::PullGate;

/// What a sandbox records of its image (meta.json, the view, the audit log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// The reference as the policy or `--image` gave it.
    pub reference: String,
    /// The manifest digest it resolved to.
    pub digest: String,
}

/// An image ready to run on.
pub struct ResolvedImage {
    pub meta: ImageMeta,
    /// Unpacked layers, bottom first.
    pub layers: Vec<PathBuf>,
    pub config: RunConfig,
}

impl ResolvedImage {
    /// The image's own command (Entrypoint then Cmd), for a run that
    /// names none.
    pub fn command(&self) -> Vec<String> {
        self.config.entrypoint.iter().chain(&self.config.cmd).cloned().collect()
    }
}

/// The environment variable that bounds the image store's size on disk,
/// host-wide like the state directory it lives in (`10G`, `512MiB`; unset
/// or empty: no budget).
pub const BUDGET_VAR: &str = "AIRLOCK_IMAGE_BUDGET";

/// The image store under a state root, with the budget from
/// [`BUDGET_VAR`].
pub fn store(state_root: &Path) -> Result<Store, RunError> {
    let budget = parse_budget(std::env::var(BUDGET_VAR).ok().as_deref())?;
    Ok(Store::open(state_root.join(crate::state::IMAGE_STORE_DIR))?.with_budget(budget))
}

fn parse_budget(value: Option<&str>) -> Result<Option<u64>, RunError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => airlock_policy::parse_size(text)
            .map(Some)
            .map_err(|reason| RunError::ImageBudget { value: text.to_owned(), reason }),
    }
}

/// The name a reference is recorded under: local paths made absolute, so
/// the same layout is one name wherever it was named from.
pub fn canonical_name(reference: &str) -> String {
    let absolute = |path: &Path| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let with_tag = |path: &Path, tag: &Option<String>| match tag {
        Some(tag) if Digest::parse(tag).is_ok() => format!("{}@{tag}", absolute(path).display()),
        Some(tag) => format!("{}:{tag}", absolute(path).display()),
        None => absolute(path).display().to_string(),
    };
    match ImageSource::parse(reference) {
        ImageSource::Layout { dir, tag } => format!("oci:{}", with_tag(&dir, &tag)),
        ImageSource::OciArchive { file, tag } => format!("oci-archive:{}", with_tag(&file, &tag)),
        ImageSource::DockerArchive { file } => format!("docker-archive:{}", absolute(&file).display()),
        ImageSource::Registry { reference } => reference,
    }
}

/// Whether `reference` can name an image at all (a registry reference the
/// distribution grammar reads, or a local source naming a path), before
/// any policy or store is consulted: a caller's typo is its own error.
pub fn check_reference(reference: &str) -> Result<(), String> {
    let named = |path: &Path| !path.as_os_str().is_empty();
    let ok = match ImageSource::parse(reference) {
        ImageSource::Registry { reference } => {
            return source::parse_registry_reference(&reference).map_err(|e| e.to_string());
        }
        ImageSource::Layout { dir, .. } => named(&dir),
        ImageSource::OciArchive { file, .. } | ImageSource::DockerArchive { file } => named(&file),
    };
    if ok { Ok(()) } else { Err(format!("image {reference:?} names no path")) }
}

/// Refuses what the policy does not allow of `reference`.
pub fn check(policy: &Policy, reference: &str) -> Result<ImageSource, RunError> {
    let source = ImageSource::parse(reference);
    let registry = source.registry().map_err(image_error)?;
    if let Some(reason) = policy.image.refusal(reference, registry.as_deref()) {
        return Err(RunError::ImageRefused(reason));
    }
    Ok(source)
}

fn image_error(e: source::SourceError) -> RunError {
    RunError::Image(Box::new(e))
}

/// What the caller adds to a pull from a registry.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Plain HTTP for the reference's registry (`--insecure`).
    pub insecure: bool,
    /// CA files (PEM) trusted for the registry's certificate besides the
    /// host's roots and the policy's `network.extra_roots` (`--ca`).
    pub ca: Vec<PathBuf>,
    /// The Docker-style config.json with credentials (`--authfile`);
    /// default `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub authfile: Option<PathBuf>,
}

/// Pulls (or imports) `reference` into the store as `policy` allows: its
/// image rules (pinning, the registry allowlist) first, then, for a
/// registry, every connection through airlock's egress proxy with the
/// policy's network rules.
pub fn pull(
    store: &Store,
    policy: &Policy,
    reference: &str,
    options: &PullOptions,
    progress: &mut dyn source::Progress,
) -> Result<airlock_image::store::ImageRecord, RunError> {
    let source = check(policy, reference)?;
    let name = canonical_name(reference);
    if !matches!(source, ImageSource::Registry { .. }) {
        return source::pull(store, &source, &name, &RegistryOptions::default(), progress)
            .map_err(image_error);
    }
    let names = source.registry_names().map_err(image_error)?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let roots: Vec<PathBuf> = options.ca.iter().chain(&policy.network.extra_roots).cloned().collect();
    let insecure = options.insecure || policy.image.is_insecure(&names);
    let mut registry = RegistryOptions { insecure, ..Default::default() };
    for path in &roots {
        let pem = std::fs::read(path).map_err(|e| RunError::ImageCa(path.clone(), e))?;
        registry.extra_roots_pem.push(pem);
    }
    let (basic_auth, with) = credentials(policy, options, &names)?;
    registry.basic_auth = basic_auth;
    let gate = PullGate::start(policy, &roots)?;
    registry.extra_roots_pem.push(gate.ca_pem().as_bytes().to_vec());
    registry.proxy = Some(gate.url());
    source::pull(store, &source, &name, &registry, progress).map_err(|e| match gate.refusal() {
        // The client only sees a refused tunnel; the proxy knows why.
        Some(refusal) => RunError::ImageRefused(format!(
            "policy {} refused the pull's connection to {refusal} (image pulls go through the policy's \
             network rules: allow the registry, e.g. --allow HOST:PORT)",
            policy.name
        )),
        None if e.is_unauthorized() => RunError::ImageRefused(format!(
            "registry refused {with}: {e}; give credentials in the policy's image.credentials or with \
             --authfile FILE"
        )),
        None => image_error(e),
    })
}

/// The credentials of a pull from the registry known by `names`, and how a
/// refusal names them: the policy's `image.credentials` for it first (the
/// password read from its secret source now, on the host, because this
/// pull needs it), else the Docker config.json's, else none.
fn credentials(
    policy: &Policy,
    options: &PullOptions,
    names: &[&str],
) -> Result<(Option<BasicAuth>, String), RunError> {
    if let Some((registry, credential)) = policy.image.credential_for(names) {
        let spec = crate::network::source_spec(&credential.password);
        let refused = |source| RunError::ImageCredential { registry: registry.to_owned(), source };
        let value = airlock_egress::secrets::read_one("password", &spec).map_err(refused)?;
        // The registry client takes the password as text.
        let password = String::from_utf8(value.expose().to_vec()).map_err(|_| {
            RunError::ImageCredentialNotText { registry: registry.to_owned(), from: spec.to_string() }
        })?;
        let with = format!(
            "the credentials of {} from policy {} (image.credentials.{registry:?})",
            credential.username, policy.name
        );
        return Ok((Some(BasicAuth { user: credential.username.clone(), password }), with));
    }
    let config = auth::config_path(options.authfile.as_deref());
    let found = match &config {
        Some(path) => auth::credentials(path, options.authfile.is_some(), names)?,
        None => None,
    };
    Ok(match (found, &config) {
        (Some((user, password)), Some(path)) => {
            let with = format!("the credentials of {user} from {}", path.display());
            (Some(BasicAuth { user, password }), with)
        }
        _ => (
            None,
            "anonymous access (no credentials for it in the policy's image.credentials or a Docker \
             config.json)"
                .to_owned(),
        ),
    })
}

struct Quiet;

impl source::Progress for Quiet {
    fn blob(&mut self, digest: &Digest, size: u64, cached: bool) {
        tracing::debug!(%digest, size, cached, "image blob");
    }
}

/// The policy's image, if it names one: checked, then taken from the store
/// (a registry reference already pulled) or pulled. A local layout or
/// archive is imported again each time (cheap: its blobs are cached), so a
/// layout changed under the same tag is seen.
pub fn resolve(state_root: &Path, policy: &Policy) -> Result<Option<ResolvedImage>, RunError> {
    let Some(reference) = &policy.image.reference else { return Ok(None) };
    let source = check(policy, reference)?;
    let store = store(state_root)?;
    let name = canonical_name(reference);
    let found = match source {
        ImageSource::Registry { .. } => store.find(&name).ok(),
        _ => None,
    };
    let record = match found {
        Some(record) => record,
        None => pull(&store, policy, reference, &PullOptions::default(), &mut Quiet)?,
    };
    if record.layers.is_empty() {
        return Err(RunError::ImageRefused(format!("image {reference} has no layers")));
    }
    let config = store.run_config(&record)?;
    let layers: Vec<PathBuf> = record.layers.iter().map(|l| store.layer_path(l)).collect();
    Ok(Some(ResolvedImage {
        meta: ImageMeta { reference: reference.clone(), digest: record.manifest.to_string() },
        layers,
        config,
    }))
}

/// Who the sandbox's command, and every exec that names no user of its
/// own, runs as, as the launch passes it on (None: root inside):
/// `requested` (`--user UID[:GID]`) when given, else the image's `User`
/// (names looked up in the image's own files).
pub fn run_as(requested: Option<&str>, image: Option<&ResolvedImage>) -> Result<Option<String>, RunError> {
    match (requested, image) {
        (Some(spec), image) => requested_user(spec, image).map(Some),
        (None, Some(image)) => match &image.config.user {
            Some(spec) => user_within_ids(&image.meta.reference, spec, &image.layers),
            None => Ok(None),
        },
        (None, None) => Ok(None),
    }
}

/// `--user UID[:GID]`: numbers, as the sandbox's own ids (a name would be
/// looked up in files the sandbox's root may not yet have; `exec --user`
/// takes names, inside). Returns the uid and the gid if given.
pub fn parse_user(spec: &str) -> Result<(u32, Option<u32>), String> {
    let number = |text: &str| {
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse::<u32>().ok())
            .flatten()
    };
    let parsed = match spec.split_once(':') {
        Some((uid, gid)) => number(uid).zip(number(gid)).map(|(u, g)| (u, Some(g))),
        None => number(spec).map(|u| (u, None)),
    };
    parsed.ok_or_else(|| {
        format!(
            "user {spec:?}: give UID or UID:GID, numbers among the sandbox's ids (e.g. 1000 or 1000:1000)"
        )
    })
}

/// [`parse_user`], then the ids held against those the sandbox's user
/// namespace maps; for a check before anything is started.
pub fn check_user(spec: &str) -> Result<(), RunError> {
    let (uid, gid) = parse_user(spec).map_err(RunError::UserRefused)?;
    within_ids(spec, uid, gid)
}

fn within_ids(spec: &str, uid: u32, gid: Option<u32>) -> Result<(), RunError> {
    let mapped = mapped_ids();
    if uid < mapped && gid.is_none_or(|g| g < mapped) {
        return Ok(());
    }
    let why = if mapped == 1 {
        "without root airlock maps only the caller's own id, which is root (0) inside".to_owned()
    } else {
        format!("the sandbox's ids are 0-{}", mapped - 1)
    };
    Err(RunError::UserRefused(format!("user {spec:?} is outside the sandbox's ids: {why}")))
}

/// A requested user as the launch passes it on: `UID:GID`, where a UID
/// alone takes its group from the image's /etc/passwd (else the same
/// number), as the image's own `User` would; without an image, a UID alone
/// is left to the agent, which looks it up in the sandbox's /etc/passwd
/// as `exec --user` does.
fn requested_user(spec: &str, image: Option<&ResolvedImage>) -> Result<String, RunError> {
    let (uid, gid) = parse_user(spec).map_err(RunError::UserRefused)?;
    let gid = match (gid, image) {
        (Some(gid), _) => Some(gid),
        (None, Some(image)) => Some(
            airlock_image::user::resolve(spec, &image.layers)
                .map_err(|e| {
                    RunError::UserRefused(format!("user {spec:?} in image {}: {e}", image.meta.reference))
                })?
                .gid,
        ),
        (None, None) => None,
    };
    within_ids(spec, uid, gid)?;
    Ok(match gid {
        Some(gid) => format!("{uid}:{gid}"),
        None => uid.to_string(),
    })
}

/// The ids a sandbox's user namespace maps: as root, 0–65535 (a block of
/// host ids of its own); rootless, root alone (the caller).
fn mapped_ids() -> u32 {
    if rustix::process::geteuid().is_root() { 65_536 } else { 1 }
}

/// The image's `User`, resolved in its layers, as `UID:GID` when the
/// sandbox's ids hold it. As root an id outside the block is refused;
/// rootless, where root inside is the only id, a user other than root
/// runs as root inside (said in the log: the caller is that one id anyway).
fn user_within_ids(reference: &str, spec: &str, layers: &[PathBuf]) -> Result<Option<String>, RunError> {
    let user = airlock_image::user::resolve(spec, layers)
        .map_err(|e| RunError::ImageRefused(format!("image {reference}: {e}")))?;
    let mapped = mapped_ids();
    if user.uid < mapped && user.gid < mapped {
        return Ok(Some(format!("{}:{}", user.uid, user.gid)));
    }
    if mapped == 1 {
        tracing::warn!(
            image = reference,
            user = spec,
            "the image's user runs as root inside: without root airlock maps only the caller's own id"
        );
        return Ok(None);
    }
    Err(RunError::ImageRefused(format!(
        "image {reference}: its user {spec:?} is {}:{}, outside the sandbox's ids (0-{})",
        user.uid,
        user.gid,
        mapped - 1
    )))
}

/// [`resolve`] under a state root; an image of more layers than overlayfs
/// stacks (on either tier: both make its root an overlay of its layers) is
/// refused before anything starts.
pub fn resolve_for(
    root: &crate::state::StateRoot,
    policy: &Policy,
) -> Result<Option<ResolvedImage>, RunError> {
    let image = resolve(root.path(), policy)?;
    if let Some(image) = &image {
        check_layer_count(image)?;
    }
    Ok(image)
}

fn check_layer_count(image: &ResolvedImage) -> Result<(), RunError> {
    let most = airlock_jail::mounts::MAX_IMAGE_LAYERS;
    if image.layers.len() > most {
        return Err(RunError::ImageRefused(format!(
            "image {} has {} layers; a sandbox's root stacks at most {most} (the kernel's overlayfs limit): \
             flatten it",
            image.meta.reference,
            image.layers.len(),
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_requested_user_is_numbers() {
        assert_eq!(parse_user("1000").unwrap(), (1000, None));
        assert_eq!(parse_user("0:0").unwrap(), (0, Some(0)));
        assert_eq!(parse_user("1000:1001").unwrap(), (1000, Some(1001)));
        for bad in ["", "dev", "1000:", ":1000", "-1", "+5", "1000:staff", "1:2:3", "99999999999", " 1"] {
            let err = parse_user(bad).unwrap_err();
            assert!(err.contains("give UID or UID:GID"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_requested_user_must_be_among_the_sandboxs_ids() {
        assert!(check_user("0").is_ok(), "root inside exists rootless too");
        let err = check_user("70000").unwrap_err().to_string();
        assert!(err.contains("outside the sandbox's ids"), "{err}");
        let err = check_user("0:70000").unwrap_err().to_string();
        assert!(err.contains("outside the sandbox's ids"), "{err}");
        assert!(matches!(check_user("x"), Err(RunError::UserRefused(_))));
        // Without an image a UID alone goes to the agent as it is.
        assert_eq!(run_as(Some("0"), None).unwrap().as_deref(), Some("0"));
        assert_eq!(run_as(Some("0:0"), None).unwrap().as_deref(), Some("0:0"));
        assert_eq!(run_as(None, None).unwrap(), None);
    }

    #[test]
    fn an_image_of_more_layers_than_an_overlay_stacks_is_refused() {
        let image = |layers: usize| ResolvedImage {
            meta: ImageMeta { reference: "example.com/deep:1".into(), digest: "sha256:00".into() },
            layers: vec![PathBuf::from("/s/l"); layers],
            config: RunConfig::default(),
        };
        assert!(check_layer_count(&image(499)).is_ok());
        let err = check_layer_count(&image(500)).unwrap_err().to_string();
        assert!(err.contains("500 layers") && err.contains("at most 499"), "{err}");
    }

    #[test]
    fn the_budget_is_a_size_or_nothing() {
        assert_eq!(parse_budget(None).unwrap(), None);
        assert_eq!(parse_budget(Some(" ")).unwrap(), None);
        assert_eq!(parse_budget(Some("10G")).unwrap(), Some(10 << 30));
        assert_eq!(parse_budget(Some("512MiB")).unwrap(), Some(512 << 20));
        let err = parse_budget(Some("lots")).unwrap_err();
        assert!(
            err.to_string().contains("AIRLOCK_IMAGE_BUDGET") && err.to_string().contains("lots"),
            "{err}"
        );
    }
}
