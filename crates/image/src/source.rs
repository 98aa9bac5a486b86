//! Where images come from, named as skopeo and Podman name them:
//! `oci:DIR[:TAG]` (an OCI image layout), `oci-archive:FILE[:TAG]` (the same
//! as a tar), `docker-archive:FILE` (`docker save`), and a plain reference
//! to a registry (OCI distribution API over HTTPS through oci-client;
//! plain HTTP only when the caller says the registry is insecure).
//!
//! Every source hands blobs to the store, which names them only once their
//! bytes match their digests; one importer then walks index → manifest →
//! config and layers, whatever the source.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::{Arch, ImageIndex, ImageManifest, Os};

use crate::store::{Digest, ImageRecord, Store, StoreError, remove_tree};
use crate::unpack::{Limits, unpack_layer};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} is not valid: {detail}")]
    Format { what: String, detail: String },
    #[error("{0}")]
    Choose(String),
    #[error("registry reference {reference:?}: {source}")]
    Reference {
        reference: String,
        #[source]
        source: oci_client::ParseError,
    },
    #[error("registry {registry}: {source}")]
    Registry {
        registry: String,
        #[source]
        source: Box<oci_client::errors::OciDistributionError>,
    },
    #[error("cannot unpack archive {path}: {source}")]
    Archive {
        path: PathBuf,
        #[source]
        source: crate::unpack::UnpackError,
    },
}

impl SourceError {
    /// Whether the registry refused the credentials (or their absence).
    pub fn is_unauthorized(&self) -> bool {
        use oci_client::errors::OciDistributionError as E;
        matches!(self, SourceError::Registry { source, .. }
            if matches!(**source, E::UnauthorizedError { .. } | E::AuthenticationFailure(_)))
    }
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    Layout { dir: PathBuf, tag: Option<String> },
    OciArchive { file: PathBuf, tag: Option<String> },
    DockerArchive { file: PathBuf },
    Registry { reference: String },
}

/// `PATH[:TAG]` or `PATH@sha256:HEX`: a tag is what follows the last ':'
/// when it has no '/'; a digest is kept as the tag `sha256:HEX`.
fn path_and_tag(text: &str) -> (PathBuf, Option<String>) {
    if let Some((path, digest)) = text.rsplit_once('@')
        && digest.starts_with("sha256:")
    {
        return (PathBuf::from(path), Some(digest.to_owned()));
    }
    match text.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') && !tag.is_empty() && !path.is_empty() => {
            (PathBuf::from(path), Some(tag.to_owned()))
        }
        _ => (PathBuf::from(text), None),
    }
}

impl ImageSource {
    pub fn parse(text: &str) -> ImageSource {
        if let Some(rest) = text.strip_prefix("oci:") {
            let (dir, tag) = path_and_tag(rest);
            ImageSource::Layout { dir, tag }
        } else if let Some(rest) = text.strip_prefix("oci-archive:") {
            let (file, tag) = path_and_tag(rest);
            ImageSource::OciArchive { file, tag }
        } else if let Some(rest) = text.strip_prefix("docker-archive:") {
            ImageSource::DockerArchive { file: PathBuf::from(rest) }
        } else {
            ImageSource::Registry { reference: text.strip_prefix("docker://").unwrap_or(text).to_owned() }
        }
    }

    /// The registry's host, for a registry reference (for the policy's
    /// allowlist); None for local sources.
    pub fn registry(&self) -> Result<Option<String>, SourceError> {
        match self {
            ImageSource::Registry { reference } => Ok(Some(registry_of(reference)?.to_owned())),
            _ => Ok(None),
        }
    }

    /// The names credentials for this registry may be filed under: the
    /// reference's registry and the host it resolves to (`docker.io` is
    /// served by `index.docker.io`).
    pub fn registry_names(&self) -> Result<Vec<String>, SourceError> {
        match self {
            ImageSource::Registry { reference } => {
                let parsed = parse_reference(reference)?;
                let mut names = vec![parsed.registry().to_owned()];
                if parsed.resolve_registry() != parsed.registry() {
                    names.push(parsed.resolve_registry().to_owned());
                }
                Ok(names)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Whether the reference pins a digest (a local layout or archive is
    /// pinned by being a file the caller holds; a registry tag is not).
    pub fn pins_digest(&self) -> bool {
        match self {
            ImageSource::Registry { reference } => reference.contains("@sha256:"),
            ImageSource::Layout { tag, .. } | ImageSource::OciArchive { tag, .. } => {
                tag.as_deref().is_some_and(|t| Digest::parse(t).is_ok())
            }
            ImageSource::DockerArchive { .. } => false,
        }
    }
}

/// The registry a reference names, by the distribution reference rule: its
/// first component is a registry when it holds a `.` or a `:` or is
/// `localhost`; otherwise the reference is Docker Hub's. Without the full
/// parse, which compiles a regular expression per process: a start on a
/// cached image needs only this (the full parse runs when pulling). A
/// reference the rule cannot read is refused as the full parse would.
fn registry_of(reference: &str) -> Result<&str, SourceError> {
    let refused = || match parse_reference(reference) {
        Err(e) => e,
        // The rule is stricter than the grammar nowhere it matters here;
        // should they disagree, the full parse decides.
        Ok(_) => SourceError::Reference {
            reference: reference.to_owned(),
            source: oci_client::ParseError::ReferenceInvalidFormat,
        },
    };
    let name = reference.split('@').next().unwrap_or(reference);
    match name.split_once('/') {
        Some((first, rest)) if first.is_empty() || rest.is_empty() => Err(refused()),
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => Ok(first),
        _ if name.is_empty() || reference.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            Err(refused())
        }
        _ => Ok("docker.io"),
    }
}

/// Whether `reference` is a registry reference the distribution grammar
/// reads (the full parse).
pub fn parse_registry_reference(reference: &str) -> Result<(), SourceError> {
    parse_reference(reference).map(drop)
}

fn parse_reference(reference: &str) -> Result<oci_client::Reference, SourceError> {
    reference
        .parse::<oci_client::Reference>()
        .map_err(|source| SourceError::Reference { reference: reference.to_owned(), source })
}

/// How a pull reports what it does.
pub trait Progress {
    fn blob(&mut self, digest: &Digest, size: u64, cached: bool);
}

/// Options of a pull that only matter for registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Plain HTTP for this pull's registry.
    pub insecure: bool,
    /// Extra trust anchors (PEM), e.g. a test or company CA.
    pub extra_roots_pem: Vec<Vec<u8>>,
    /// Credentials for basic auth; bearer tokens are negotiated with them by
    /// the client.
    pub basic_auth: Option<BasicAuth>,
    /// An HTTP proxy every connection of the pull goes through (airlock's
    /// egress proxy, which applies the policy's network rules), as a URL.
    pub proxy: Option<String>,
}

/// A registry user and password. Its `Debug` leaves the password out, so
/// the options of a pull can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth").field("user", &self.user).field("password", &"<redacted>").finish()
    }
}

/// What a fetched digest is: registries serve manifests and indexes from
/// an endpoint of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Manifest,
    Blob,
}

/// Gets blobs by digest into the store.
trait Fetch {
    fn fetch(&mut self, store: &Store, digest: &Digest, kind: Kind) -> Result<(), SourceError>;
}

const INDEX_TYPES: [&str; 2] =
    ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];

/// Pulls or imports `source` into `store`, records it under `name` and
/// returns its record.
pub fn pull(
    store: &Store,
    source: &ImageSource,
    name: &str,
    options: &RegistryOptions,
    progress: &mut dyn Progress,
) -> Result<ImageRecord, SourceError> {
    let _shared = store.shared_lock()?;
    match source {
        ImageSource::Layout { dir, tag } => {
            let top = layout_top(dir, tag.as_deref())?;
            import(store, &mut LayoutFetch { dir: dir.clone() }, &top, name, progress)
        }
        ImageSource::OciArchive { file, tag } => {
            let dir = extract_archive(store, file)?;
            let result = layout_top(&dir, tag.as_deref())
                .and_then(|top| import(store, &mut LayoutFetch { dir: dir.clone() }, &top, name, progress));
            remove_tree(&dir);
            result
        }
        ImageSource::DockerArchive { file } => {
            let dir = extract_archive(store, file)?;
            let result = if dir.join("index.json").is_file() && dir.join("oci-layout").is_file() {
                // `docker save` of Docker 25 and later writes an OCI layout too.
                layout_top(&dir, None).and_then(|top| {
                    import(store, &mut LayoutFetch { dir: dir.clone() }, &top, name, progress)
                })
            } else {
                import_docker_save(store, &dir, name, progress)
            };
            remove_tree(&dir);
            result
        }
        ImageSource::Registry { reference } => {
            let mut fetch = RegistryFetch::new(reference, options)?;
            let top = fetch.manifest_digest()?;
            import(store, &mut fetch, &top, name, progress)
        }
    }
}

/// Fetches `top` (an index or a manifest), then the config and layers of
/// the linux/amd64 manifest, unpacks each layer and records the image.
fn import(
    store: &Store,
    fetch: &mut dyn Fetch,
    top: &Digest,
    name: &str,
    progress: &mut dyn Progress,
) -> Result<ImageRecord, SourceError> {
    fetch.fetch(store, top, Kind::Manifest)?;
    let mut manifest_digest = top.clone();
    let mut bytes = store.read_blob(top)?;
    if is_index(&bytes) {
        let index = ImageIndex::from_reader(&bytes[..])
            .map_err(|e| SourceError::Format { what: format!("image index {top}"), detail: e.to_string() })?;
        manifest_digest = pick_platform(&index, top)?;
        fetch.fetch(store, &manifest_digest, Kind::Manifest)?;
        bytes = store.read_blob(&manifest_digest)?;
    }
    let manifest = ImageManifest::from_reader(&bytes[..]).map_err(|e| SourceError::Format {
        what: format!("image manifest {manifest_digest}"),
        detail: e.to_string(),
    })?;
    let config = Digest::parse(manifest.config().digest().as_ref())?;
    fetch.fetch(store, &config, Kind::Blob)?;
    let mut layers = Vec::new();
    let mut size = 0u64;
    for layer in manifest.layers() {
        let digest = Digest::parse(layer.digest().as_ref())?;
        let cached = store.has_blob(&digest);
        progress.blob(&digest, layer.size(), cached);
        fetch.fetch(store, &digest, Kind::Blob)?;
        store.unpack(&digest)?;
        size = size.saturating_add(layer.size());
        layers.push(digest);
    }
    let record = ImageRecord { manifest: manifest_digest, config, layers, names: Vec::new(), size };
    Ok(store.record(record, Some(name))?)
}

fn is_index(bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    serde_json::from_slice::<Probe>(bytes).is_ok_and(|p| {
        p.manifests.is_some() || p.media_type.is_some_and(|t| INDEX_TYPES.contains(&t.as_str()))
    })
}

/// The linux/amd64 entry of a multi-platform index (the host's platform).
fn pick_platform(index: &ImageIndex, digest: &Digest) -> Result<Digest, SourceError> {
    let found = index.manifests().iter().find(|m| {
        m.platform().as_ref().is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
    });
    let found = match found {
        Some(found) => found,
        // An index of one manifest without a platform (an OCI layout's own
        // index usually is one) names the image itself.
        None if index.manifests().len() == 1 && index.manifests()[0].platform().is_none() => {
            &index.manifests()[0]
        }
        None => return Err(SourceError::Choose(format!("index {digest} has no linux/amd64 image"))),
    };
    Ok(Digest::parse(found.digest().as_ref())?)
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The digest `index.json` names for `tag` (or its only entry).
fn layout_top(dir: &Path, tag: Option<&str>) -> Result<Digest, SourceError> {
    let path = dir.join("index.json");
    let file = open_in(dir, "index.json")?;
    let index = ImageIndex::from_reader(io::BufReader::new(file))
        .map_err(|e| SourceError::Format { what: path.display().to_string(), detail: e.to_string() })?;
    let entries = index.manifests();
    let pinned = tag.and_then(|t| Digest::parse(t).ok());
    let chosen = if let Some(digest) = &pinned {
        entries
            .iter()
            .find(|m| m.digest().as_ref() == digest.as_str())
            .ok_or_else(|| SourceError::Choose(format!("{} has no image {digest}", dir.display())))?
    } else if let Some(tag) = tag {
        entries
            .iter()
            .find(|m| m.annotations().as_ref().and_then(|a| a.get(REF_NAME)).is_some_and(|t| t == tag))
            .ok_or_else(|| SourceError::Choose(format!("{} has no image tagged {tag}", dir.display())))?
    } else if let [only] = entries.as_slice() {
        only
    } else {
        return Err(SourceError::Choose(format!(
            "{} holds {} images: name one with :TAG or @sha256:…",
            dir.display(),
            entries.len()
        )));
    };
    Ok(Digest::parse(chosen.digest().as_ref())?)
}

struct LayoutFetch {
    dir: PathBuf,
}

impl Fetch for LayoutFetch {
    fn fetch(&mut self, store: &Store, digest: &Digest, _kind: Kind) -> Result<(), SourceError> {
        if store.has_blob(digest) {
            return Ok(());
        }
        store.put_blob(digest, open_in(&self.dir, &format!("blobs/sha256/{}", digest.hex()))?)?;
        Ok(())
    }
}

/// Unpacks an archive (as hostile as a layer) into the store's `tmp/`
/// with the layer unpacker and its limits.
fn extract_archive(store: &Store, file: &Path) -> Result<PathBuf, SourceError> {
    let reader = fs::File::open(file).map_err(|source| SourceError::Io { path: file.into(), source })?;
    let dir = store.root().join("tmp").join(format!("archive-{}-{}", std::process::id(), unique()));
    fs::create_dir(&dir).map_err(|source| SourceError::Io { path: dir.clone(), source })?;
    if let Err(source) = unpack_layer(reader, &dir, &Limits::default()) {
        remove_tree(&dir);
        return Err(SourceError::Archive { path: file.into(), source });
    }
    Ok(dir)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// `docker save`'s own format: `manifest.json` names a config file and
/// uncompressed layer tars by path. The blobs are hashed as found and an
/// OCI manifest is written for them, so the store holds one format.
fn import_docker_save(
    store: &Store,
    dir: &Path,
    name: &str,
    progress: &mut dyn Progress,
) -> Result<ImageRecord, SourceError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        layers: Vec<String>,
    }
    let path = dir.join("manifest.json");
    let bytes = fs::read(&path).map_err(|source| SourceError::Io { path: path.clone(), source })?;
    let entries: Vec<Entry> = serde_json::from_slice(&bytes)
        .map_err(|e| SourceError::Format { what: path.display().to_string(), detail: e.to_string() })?;
    let [entry] = entries.as_slice() else {
        return Err(SourceError::Choose(format!(
            "{} holds {} images; one is supported",
            path.display(),
            entries.len()
        )));
    };
    // Names inside the archive were unpacked beneath `dir`; they are read
    // without following links out of it.
    let put = |member: &str| -> Result<(Digest, u64), SourceError> {
        let digest = hash_reader(open_in(dir, member)?, &dir.join(member))?;
        let file = open_in(dir, member)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        store.put_blob(&digest, file)?;
        Ok((digest, size))
    };
    let (config, config_size) = put(&entry.config)?;
    let mut layers = Vec::new();
    for member in &entry.layers {
        let (digest, size) = put(member)?;
        progress.blob(&digest, size, false);
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest.as_str(),
            "size": size,
        }));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.as_str(), "size": config_size },
        "layers": layers,
    });
    let bytes = serde_json::to_vec(&manifest)
        .map_err(|e| SourceError::Format { what: "manifest".into(), detail: e.to_string() })?;
    let digest = Digest::of(&bytes);
    store.put_blob(&digest, &bytes[..])?;
    struct Stored;
    impl Fetch for Stored {
        fn fetch(&mut self, store: &Store, digest: &Digest, _: Kind) -> Result<(), SourceError> {
            match store.has_blob(digest) {
                true => Ok(()),
                false => Err(StoreError::MissingBlob(digest.to_string()).into()),
            }
        }
    }
    import(store, &mut Stored, &digest, name, &mut NoProgress)
}

struct NoProgress;

impl Progress for NoProgress {
    fn blob(&mut self, _: &Digest, _: u64, _: bool) {}
}

/// Opens a regular file named inside `dir` (an unpacked archive or a
/// layout the caller gave), never following a link or `..` out of it.
fn open_in(dir: &Path, name: &str) -> Result<fs::File, SourceError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let path = dir.join(name);
    let io_err = |source: io::Error| SourceError::Io { path: path.clone(), source };
    let root = rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| io_err(e.into()))?;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let fd = rustix::fs::openat2(
        &root,
        name,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        resolve,
    )
    .map_err(|e| io_err(e.into()))?;
    let file = fs::File::from(fd);
    if !file.metadata().map_err(io_err)?.is_file() {
        return Err(io_err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")));
    }
    Ok(file)
}

fn hash_reader(mut file: fs::File, path: &Path) -> Result<Digest, SourceError> {
    let io_err = |source| SourceError::Io { path: path.into(), source };
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest::parse(&format!("sha256:{}", crate::store::hex(hasher.finish().as_ref())))?)
}

/// A registry through oci-client, on a current-thread runtime of its own.
struct RegistryFetch {
    runtime: tokio::runtime::Runtime,
    client: oci_client::Client,
    reference: oci_client::Reference,
    auth: oci_client::secrets::RegistryAuth,
    /// The manifest or index the reference named, downloaded to learn its
    /// digest; handed to the store (which checks it) by the first fetch.
    first: Option<(Digest, Vec<u8>)>,
}

const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    INDEX_TYPES[0],
    INDEX_TYPES[1],
];

impl RegistryFetch {
    fn new(reference: &str, options: &RegistryOptions) -> Result<RegistryFetch, SourceError> {
        // airlock's one crypto provider; an error means one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let reference = parse_reference(reference)?;
        let registry = reference.resolve_registry().to_owned();
        let protocol = if options.insecure {
            oci_client::client::ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            oci_client::client::ClientProtocol::Https
        };
        let config = oci_client::client::ClientConfig {
            protocol,
            extra_root_certificates: options
                .extra_roots_pem
                .iter()
                .map(|pem| oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            // The importer picks the platform from the index itself.
            platform_resolver: None,
            // Both schemes through the proxy (when given): the registry,
            // its token service and any host a blob is redirected to.
            https_proxy: options.proxy.clone(),
            http_proxy: options.proxy.clone(),
            // A registry that stops sending fails the pull instead of
            // holding it forever.
            read_timeout: Some(std::time::Duration::from_secs(60)),
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            ..Default::default()
        };
        let client = oci_client::Client::try_from(config)
            .map_err(|e| SourceError::Registry { registry: registry.clone(), source: Box::new(e) })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| SourceError::Io { path: PathBuf::from("tokio runtime"), source })?;
        let auth = match &options.basic_auth {
            Some(BasicAuth { user, password }) => {
                oci_client::secrets::RegistryAuth::Basic(user.clone(), password.clone())
            }
            None => oci_client::secrets::RegistryAuth::Anonymous,
        };
        Ok(RegistryFetch { runtime, client, reference, auth, first: None })
    }

    fn registry_error(&self, e: oci_client::errors::OciDistributionError) -> SourceError {
        SourceError::Registry { registry: self.reference.resolve_registry().to_owned(), source: Box::new(e) }
    }

    /// Downloads the manifest (or index) the reference names and returns
    /// its digest: the pinned one when the reference has a digest (the
    /// store then refuses bytes that do not match it), else the bytes' own.
    fn manifest_digest(&mut self) -> Result<Digest, SourceError> {
        let (bytes, _) = self
            .runtime
            .block_on(self.client.pull_manifest_raw(&self.reference, &self.auth, &MANIFEST_TYPES))
            .map_err(|e| self.registry_error(e))?;
        let digest = match self.reference.digest() {
            Some(pinned) => Digest::parse(pinned)?,
            None => Digest::of(&bytes),
        };
        self.first = Some((digest.clone(), bytes.to_vec()));
        Ok(digest)
    }
}

impl Fetch for RegistryFetch {
    fn fetch(&mut self, store: &Store, digest: &Digest, kind: Kind) -> Result<(), SourceError> {
        if let Some((first, bytes)) = self.first.take_if(|(first, _)| first == digest) {
            store.put_blob(&first, &bytes[..])?;
            return Ok(());
        }
        if store.has_blob(digest) {
            return Ok(());
        }
        if kind == Kind::Manifest {
            let by_digest = oci_client::Reference::with_digest(
                self.reference.registry().to_owned(),
                self.reference.repository().to_owned(),
                digest.to_string(),
            );
            let (bytes, _) = self
                .runtime
                .block_on(self.client.pull_manifest_raw(&by_digest, &self.auth, &MANIFEST_TYPES))
                .map_err(|e| self.registry_error(e))?;
            store.put_blob(digest, &bytes[..])?;
            return Ok(());
        }
        let stream = self
            .runtime
            .block_on(self.client.pull_blob_stream(&self.reference, digest.as_str()))
            .map_err(|e| self.registry_error(e))?;
        let reader = StreamReader { runtime: &self.runtime, stream: stream.stream, chunk: Vec::new(), at: 0 };
        store.put_blob(digest, reader)?;
        Ok(())
    }
}

/// A blob stream read as `io::Read`, so the store hashes and writes it as
/// it arrives.
struct StreamReader<'a> {
    runtime: &'a tokio::runtime::Runtime,
    stream: futures_util::stream::BoxStream<'static, Result<bytes::Bytes, io::Error>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for StreamReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use futures_util::StreamExt;
        while self.at == self.chunk.len() {
            match self.runtime.block_on(self.stream.next()) {
                Some(chunk) => {
                    self.chunk = chunk?.to_vec();
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_registry_rule_agrees_with_the_full_parse() {
        let digest = format!("sha256:{}", "a".repeat(64));
        for reference in [
            "registry.example.com/team/py:3.12".to_owned(),
            "registry.example.com:5000/team/py".to_owned(),
            "127.0.0.1:5000/team/bb:1".to_owned(),
            "localhost/bb".to_owned(),
            "localhost:5000/a/b/c:tag".to_owned(),
            "busybox".to_owned(),
            "library/busybox:1".to_owned(),
            "team/py:3.12".to_owned(),
            format!("registry.example.com/team/py@{digest}"),
            format!("team/py:1@{digest}"),
        ] {
            let full = parse_reference(&reference).unwrap();
            assert_eq!(registry_of(&reference).unwrap(), full.registry(), "{reference}");
        }
        for bad in ["", "/x", "a b/c", "registry.example.com/"] {
            assert!(parse_reference(bad).is_err(), "{bad:?}");
            assert!(registry_of(bad).is_err(), "{bad:?}");
        }
    }

    struct Count(u32);
    impl Progress for Count {
        fn blob(&mut self, _: &Digest, _: u64, _: bool) {
            self.0 += 1;
        }
    }

    fn layer(name: &str, data: &[u8]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o755);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
        builder.into_inner().unwrap()
    }

    fn put(dir: &Path, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("blobs/sha256").join(digest.hex()), bytes).unwrap();
        digest
    }

    /// An OCI layout whose index.json names a multi-platform index (arm64
    /// first) tagged `v1`, whose amd64 entry is a two-layer image.
    fn layout(dir: &Path) -> Digest {
        let layers: Vec<_> =
            [layer("a", b"one"), layer("b", b"two")].iter().map(|l| (put(dir, l), l.len())).collect();
        let config = br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config_digest = put(dir, config);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.as_str(), "size": config.len()},
            "layers": layers.iter().map(|(d, n)| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d.as_str(), "size": n})).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest).unwrap();
        let manifest_digest = put(dir, &manifest);
        let other = put(dir, b"{}");
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": other.as_str(), "size": 2, "platform": {"architecture": "arm64", "os": "linux"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest.as_str(), "size": manifest.len(), "platform": {"architecture": "amd64", "os": "linux"}},
            ],
        });
        let index = serde_json::to_vec(&index).unwrap();
        let index_digest = put(dir, &index);
        let top = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest.as_str(), "size": index.len(), "annotations": {REF_NAME: "v1"}}],
        });
        fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        manifest_digest
    }

    #[test]
    fn the_options_of_a_pull_print_no_password() {
        let options = RegistryOptions {
            basic_auth: Some(BasicAuth { user: "ci".into(), password: "pa55-w0rd".into() }),
            ..RegistryOptions::default()
        };
        let shown = format!("{options:?}");
        assert!(shown.contains("ci") && !shown.contains("pa55-w0rd"), "{shown}");
    }

    #[test]
    fn references_name_their_source() {
        assert_eq!(
            ImageSource::parse("oci:./dir:v1"),
            ImageSource::Layout { dir: "./dir".into(), tag: Some("v1".into()) }
        );
        assert_eq!(ImageSource::parse("oci:/a/b"), ImageSource::Layout { dir: "/a/b".into(), tag: None });
        let pinned = ImageSource::parse(&format!("oci:/a/b@sha256:{}", "c".repeat(64)));
        assert_eq!(
            pinned,
            ImageSource::Layout { dir: "/a/b".into(), tag: Some(format!("sha256:{}", "c".repeat(64))) }
        );
        assert!(pinned.pins_digest());
        assert_eq!(
            ImageSource::parse("oci-archive:x.tar"),
            ImageSource::OciArchive { file: "x.tar".into(), tag: None }
        );
        assert_eq!(
            ImageSource::parse("docker-archive:/s.tar"),
            ImageSource::DockerArchive { file: "/s.tar".into() }
        );
        let registry = ImageSource::parse("registry.example.com/team/py:3.12");
        assert_eq!(registry.registry().unwrap().as_deref(), Some("registry.example.com"));
        assert!(!registry.pins_digest());
        assert!(
            ImageSource::parse(&format!("registry.example.com/team/py@sha256:{}", "a".repeat(64)))
                .pins_digest()
        );
    }

    #[test]
    fn a_layout_by_tag_imports_the_amd64_image_of_its_index() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("layout");
        let manifest = layout(&dir);
        let store = Store::open(tmp.path().join("images")).unwrap();
        let source = ImageSource::parse(&format!("oci:{}:v1", dir.display()));
        let mut count = Count(0);
        let record = pull(&store, &source, "oci:layout:v1", &RegistryOptions::default(), &mut count).unwrap();
        assert_eq!(record.manifest, manifest);
        assert_eq!(record.layers.len(), 2);
        assert_eq!(count.0, 2);
        assert_eq!(fs::read(store.layer_path(&record.layers[1]).join("b")).unwrap(), b"two");
        let missing = ImageSource::parse(&format!("oci:{}:v2", dir.display()));
        assert!(matches!(
            pull(&store, &missing, "x", &RegistryOptions::default(), &mut count),
            Err(SourceError::Choose(_))
        ));
    }

    #[test]
    fn a_layout_blob_that_does_not_match_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("layout");
        let manifest = layout(&dir);
        fs::write(dir.join("blobs/sha256").join(manifest.hex()), b"{\"tampered\":1}").unwrap();
        let store = Store::open(tmp.path().join("images")).unwrap();
        let source = ImageSource::parse(&format!("oci:{}", dir.display()));
        let err = pull(&store, &source, "x", &RegistryOptions::default(), &mut Count(0)).unwrap_err();
        assert!(matches!(err, SourceError::Store(StoreError::DigestMismatch { .. })), "{err}");
        assert!(store.list().unwrap().is_empty());
    }

    fn tar_dir(dir: &Path, out: &Path) {
        let mut builder = tar::Builder::new(fs::File::create(out).unwrap());
        builder.append_dir_all(".", dir).unwrap();
        builder.finish().unwrap();
    }

    #[test]
    fn an_oci_archive_and_a_docker_save_import() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("layout");
        let manifest = layout(&dir);
        tar_dir(&dir, &tmp.path().join("oci.tar"));
        let store = Store::open(tmp.path().join("images")).unwrap();
        let source = ImageSource::parse(&format!("oci-archive:{}", tmp.path().join("oci.tar").display()));
        let record =
            pull(&store, &source, "from-archive", &RegistryOptions::default(), &mut Count(0)).unwrap();
        assert_eq!(record.manifest, manifest);

        let save = tmp.path().join("save");
        fs::create_dir_all(save.join("l1")).unwrap();
        fs::write(save.join("l1/layer.tar"), layer("bin/tool", b"tool")).unwrap();
        fs::write(save.join("cfg.json"), br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/tool"]},"rootfs":{"type":"layers","diff_ids":[]}}"#).unwrap();
        fs::write(
            save.join("manifest.json"),
            br#"[{"Config":"cfg.json","RepoTags":["t:1"],"Layers":["l1/layer.tar"]}]"#,
        )
        .unwrap();
        tar_dir(&save, &tmp.path().join("save.tar"));
        let source = ImageSource::parse(&format!("docker-archive:{}", tmp.path().join("save.tar").display()));
        let record = pull(&store, &source, "from-save", &RegistryOptions::default(), &mut Count(0)).unwrap();
        assert_eq!(fs::read(store.layer_path(&record.layers[0]).join("bin/tool")).unwrap(), b"tool");
        assert_eq!(store.find("from-save").unwrap().manifest, record.manifest);
        // Nothing of the archives is left behind.
        assert!(fs::read_dir(store.root().join("tmp")).unwrap().next().is_none());
    }

    #[test]
    fn a_docker_save_naming_a_file_outside_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let save = tmp.path().join("save");
        fs::create_dir_all(&save).unwrap();
        fs::write(save.join("manifest.json"), br#"[{"Config":"/etc/passwd","Layers":[]}]"#).unwrap();
        tar_dir(&save, &tmp.path().join("save.tar"));
        let store = Store::open(tmp.path().join("images")).unwrap();
        let source = ImageSource::parse(&format!("docker-archive:{}", tmp.path().join("save.tar").display()));
        let err = pull(&store, &source, "x", &RegistryOptions::default(), &mut Count(0)).unwrap_err();
        assert!(matches!(err, SourceError::Io { .. }), "{err}");
    }
}
