//! The content-addressed image store, under the state root:
//!
//! ```text
//! images/ store.lock                     shared by pulls, exclusive for rm and prune
//!         blobs/sha256/<hex>             every blob, verified against its digest before it is named
//!         layers/sha256/<hex>/           a layer unpacked once, named by its blob's digest, shared
//!         manifests/sha256/<hex>.json    an image: manifest digest → config, ordered layers, names
//!         locks/<hex>.lock               one worker per blob or layer: a second pull waits, then finds it done
//!         tmp/                           work in progress; renamed into place last
//! ```
//!
//! Nothing is named by its final name before it is complete: a pull that
//! fails half-way leaves only `tmp/` entries, which the next pull of the
//! store removes.
//!
//! A store may have a disk budget: the bytes it may hold on disk (blobs,
//! unpacked layers, records and work in progress, counted as `du` does).
//! A blob or layer that would take the store past it is refused while it
//! is written, and nothing is pruned to make room: what to remove is the
//! user's choice (`airlock image rm`, `airlock image prune`). The store's
//! size is measured when a store's first write starts and what it writes
//! is added; a concurrent pull in another process can take it a little past.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::unpack::{Limits, TOTAL_SIZE, UnpackError, unpack_layer};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("not a sha256 digest: {0:?}")]
    BadDigest(String),
    #[error("blob {expected} does not match its digest (got {actual})")]
    DigestMismatch { expected: String, actual: String },
    #[error("blob {0} is not in the store")]
    MissingBlob(String),
    #[error("layer {digest}: {source}")]
    Unpack {
        digest: String,
        #[source]
        source: UnpackError,
    },
    #[error("no image named {0} in the store")]
    NoImage(String),
    #[error("image {name} is used by sandbox {sandbox}")]
    InUse { name: String, sandbox: String },
    #[error(
        "the image store's disk budget of {} would be exceeded: it holds {} and this pull needs at least {} more; \
         remove images with `airlock image rm` or `airlock image prune` (which also removes what interrupted pulls \
         left), or raise the budget (AIRLOCK_IMAGE_BUDGET)",
        human_size(*budget), human_size(*used), human_size(*wanted)
    )]
    OverBudget { budget: u64, used: u64, wanted: u64 },
    #[error("image record {path}: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// A `sha256:<64 lowercase hex>` digest, checked before it becomes part
/// of a path: a hostile manifest's digest could otherwise name `../x`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn parse(text: &str) -> Result<Digest, StoreError> {
        match text.strip_prefix("sha256:") {
            Some(hex)
                if hex.len() == 64
                    && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
            {
                Ok(Digest(text.to_owned()))
            }
            _ => Err(StoreError::BadDigest(text.to_owned())),
        }
    }

    pub fn of(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())))
    }

    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = StoreError;
    fn try_from(text: String) -> Result<Digest, StoreError> {
        Digest::parse(&text)
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> String {
        digest.0
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the store keeps of an image: enough to assemble its root and to
/// honour its config, without reading the manifest again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub manifest: Digest,
    pub config: Digest,
    /// Bottom first, as in the manifest.
    pub layers: Vec<Digest>,
    /// The references it was pulled or imported as (`oci:DIR:TAG`,
    /// `registry.example.com/team/py:3.12`).
    pub names: Vec<String>,
    /// Total size of the layers' blobs.
    pub size: u64,
}

/// What an image's config asks of the process it runs: honoured where
/// the user gives nothing of their own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

pub struct Store {
    root: PathBuf,
    limits: Limits,
    budget: Option<u64>,
    /// The store's size on disk as this handle last knew it: measured at
    /// the first write under a budget, then grown by what it wrote.
    known_usage: Mutex<Option<u64>>,
}

/// A held lock file (released when dropped).
pub struct StoreLock {
    _held: fs::File,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating) the store at `root`, usually `<state root>/images`.
    pub fn open(root: PathBuf) -> Result<Store, StoreError> {
        for dir in ["blobs/sha256", "layers/sha256", "manifests/sha256", "locks", "tmp"] {
            let path = root.join(dir);
            fs::DirBuilder::new().recursive(true).mode(0o711).create(&path).map_err(io_err(&path))?;
        }
        Ok(Store { root, limits: Limits::default(), budget: None, known_usage: Mutex::new(None) })
    }

    pub fn with_limits(mut self, limits: Limits) -> Store {
        self.limits = limits;
        self
    }

    /// Bounds what the store may hold on disk, in bytes (None: unbounded).
    pub fn with_budget(mut self, budget: Option<u64>) -> Store {
        self.budget = budget;
        self
    }

    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// Bytes the store takes on disk, as `du` counts them: allocated blocks
    /// of every file and directory under it, a hardlinked file once.
    /// Entries that cannot be read (a layer's mode-000 directory when not
    /// root) are not counted.
    pub fn usage(&self) -> u64 {
        let mut seen = HashSet::new();
        disk_usage(&self.root, &mut seen)
    }

    /// What may still be written before the budget is reached (None: no
    /// budget), measuring the store on the first call.
    fn headroom(&self) -> Option<(u64, u64, u64)> {
        let budget = self.budget?;
        let mut known = self.known_usage.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let used = *known.get_or_insert_with(|| self.usage());
        Some((budget, used, budget.saturating_sub(used)))
    }

    fn wrote(&self, bytes: u64) {
        if self.budget.is_some() {
            let mut known = self.known_usage.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(used) = known.as_mut() {
                *used = used.saturating_add(bytes);
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self, path: PathBuf, operation: FlockOperation) -> Result<StoreLock, StoreError> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        rustix::fs::flock(&file, operation).map_err(|e| StoreError::Io { path, source: e.into() })?;
        Ok(StoreLock { _held: file })
    }

    /// Held by every pull: rm and prune wait for pulls to finish.
    pub fn shared_lock(&self) -> Result<StoreLock, StoreError> {
        self.lock(self.root.join("store.lock"), FlockOperation::LockShared)
    }

    fn exclusive_lock(&self) -> Result<StoreLock, StoreError> {
        self.lock(self.root.join("store.lock"), FlockOperation::LockExclusive)
    }

    fn item_lock(&self, digest: &Digest) -> Result<StoreLock, StoreError> {
        self.lock(
            self.root.join("locks").join(format!("{}.lock", digest.hex())),
            FlockOperation::LockExclusive,
        )
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!("{what}-{}-{n}", std::process::id()))
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    pub fn layer_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("layers/sha256").join(digest.hex())
    }

    fn record_path(&self, manifest: &Digest) -> PathBuf {
        self.root.join("manifests/sha256").join(format!("{}.json", manifest.hex()))
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Writes a blob from `reader`, hashing as it goes; it is named by its
    /// digest only once the bytes match it. A blob already present is
    /// kept and `reader` is not read.
    pub fn put_blob(&self, expected: &Digest, mut reader: impl Read) -> Result<PathBuf, StoreError> {
        let target = self.blob_path(expected);
        if target.is_file() {
            return Ok(target);
        }
        let _lock = self.item_lock(expected)?;
        if target.is_file() {
            return Ok(target);
        }
        let tmp = self.tmp_path("blob");
        let headroom = self.headroom();
        let mut written = 0u64;
        let result = (|| {
            let mut file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
            let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = reader.read(&mut buf).map_err(io_err(&tmp))?;
                if n == 0 {
                    break;
                }
                written = written.saturating_add(n as u64);
                if let Some((budget, used, left)) = headroom
                    && written > left
                {
                    return Err(StoreError::OverBudget { budget, used, wanted: written });
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).map_err(io_err(&tmp))?;
            }
            let actual = format!("sha256:{}", hex(hasher.finish().as_ref()));
            if actual != expected.as_str() {
                return Err(StoreError::DigestMismatch { expected: expected.to_string(), actual });
            }
            file.sync_all().map_err(io_err(&tmp))?;
            fs::rename(&tmp, &target).map_err(io_err(&target))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        } else {
            self.wrote(written);
        }
        result.map(|()| target)
    }

    /// A blob's bytes, verified again against its digest (a blob is small
    /// enough to read whole only for manifests and configs).
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob(digest.to_string()),
            _ => StoreError::Io { path: path.clone(), source: e },
        })?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(bytes)
    }

    /// The image's config (Env, WorkingDir, User, Entrypoint, Cmd), read
    /// from its verified config blob.
    pub fn run_config(&self, record: &ImageRecord) -> Result<RunConfig, StoreError> {
        let bytes = self.read_blob(&record.config)?;
        let path = self.blob_path(&record.config);
        let parsed =
            oci_spec::image::ImageConfiguration::from_reader(&bytes[..]).map_err(|e| StoreError::Record {
                path,
                source: serde_json::Error::io(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            })?;
        let Some(config) = parsed.config() else { return Ok(RunConfig::default()) };
        Ok(RunConfig {
            env: config.env().clone().unwrap_or_default(),
            working_dir: config.working_dir().clone().filter(|d| !d.is_empty()),
            user: config.user().clone().filter(|u| !u.is_empty()),
            entrypoint: config.entrypoint().clone().unwrap_or_default(),
            cmd: config.cmd().clone().unwrap_or_default(),
        })
    }

    /// Unpacks a layer blob once into `layers/sha256/<hex>`: into `tmp/`
    /// first, renamed when complete, removed on any error.
    pub fn unpack(&self, digest: &Digest) -> Result<PathBuf, StoreError> {
        let target = self.layer_path(digest);
        if target.is_dir() {
            return Ok(target);
        }
        let _lock = self.item_lock(digest)?;
        if target.is_dir() {
            return Ok(target);
        }
        let blob = self.blob_path(digest);
        let file = fs::File::open(&blob).map_err(|_| StoreError::MissingBlob(digest.to_string()))?;
        let tmp = self.tmp_path("layer");
        fs::DirBuilder::new().mode(0o755).create(&tmp).map_err(io_err(&tmp))?;
        let mut reader = HashingReader::new(file);
        // The budget bounds the layer's unpacked size like the total-size
        // limit does, so an unpack that would pass it stops at the header
        // that says so, before the data is written.
        let headroom = self.headroom();
        let mut limits = self.limits;
        if let Some((_, _, left)) = headroom {
            limits.max_total_bytes = limits.max_total_bytes.min(left);
        }
        let result = unpack_layer(&mut reader, &tmp, &limits)
            .map_err(|source| match (source, headroom) {
                (UnpackError::Limit { what: TOTAL_SIZE, limit }, Some((budget, used, left)))
                    if limit == left && left < self.limits.max_total_bytes =>
                {
                    StoreError::OverBudget { budget, used, wanted: left.saturating_add(1) }
                }
                (source, _) => StoreError::Unpack { digest: digest.to_string(), source },
            })
            .and_then(|report| {
                let actual = reader.finish().map_err(io_err(&blob))?;
                if actual != digest.as_str() {
                    return Err(StoreError::DigestMismatch { expected: digest.to_string(), actual });
                }
                tracing::debug!(%digest, ?report, "layer unpacked");
                fs::rename(&tmp, &target).map_err(io_err(&target))?;
                self.wrote(report.bytes);
                Ok(())
            });
        if result.is_err() {
            remove_tree(&tmp);
        }
        result.map(|()| target)
    }

    /// Records an image whose blobs are all present and verified, adding
    /// `name` to its names.
    pub fn record(&self, mut record: ImageRecord, name: Option<&str>) -> Result<ImageRecord, StoreError> {
        let path = self.record_path(&record.manifest);
        if let Ok(existing) = self.read_record(&path) {
            record.names = existing.names;
        }
        if let Some(name) = name {
            // A name points at one image: moved from any other.
            for mut other in self.list()? {
                if other.manifest != record.manifest && other.names.iter().any(|n| n == name) {
                    other.names.retain(|n| n != name);
                    self.write_record(&other)?;
                }
            }
            if !record.names.iter().any(|n| n == name) {
                record.names.push(name.to_owned());
            }
        }
        self.write_record(&record)?;
        Ok(record)
    }

    fn write_record(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let path = self.record_path(&record.manifest);
        let tmp = self.tmp_path("record");
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|source| StoreError::Record { path: path.clone(), source })?;
        fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    fn read_record(&self, path: &Path) -> Result<ImageRecord, StoreError> {
        let bytes = fs::read(path).map_err(io_err(path))?;
        serde_json::from_slice(&bytes)
            .map_err(|source| StoreError::Record { path: path.to_path_buf(), source })
    }

    /// Every recorded image, by manifest digest.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.root.join("manifests/sha256");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = entry.map_err(io_err(&dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                out.push(self.read_record(&path)?);
            }
        }
        out.sort_by(|a, b| a.manifest.cmp(&b.manifest));
        Ok(out)
    }

    /// The image a name or digest (or a unique digest prefix of at least
    /// 12 hex digits) refers to.
    pub fn find(&self, name: &str) -> Result<ImageRecord, StoreError> {
        let images = self.list()?;
        if let Some(found) =
            images.iter().find(|i| i.names.iter().any(|n| n == name) || i.manifest.as_str() == name)
        {
            return Ok(found.clone());
        }
        let prefix = name.strip_prefix("sha256:").unwrap_or(name);
        let by_prefix: Vec<_> =
            images.iter().filter(|i| prefix.len() >= 12 && i.manifest.hex().starts_with(prefix)).collect();
        match by_prefix.as_slice() {
            [one] => Ok((*one).clone()),
            _ => Err(StoreError::NoImage(name.to_owned())),
        }
    }

    /// Removes an image's record; its blobs and layers go with the next
    /// prune once no other image holds them. `in_use` maps manifest
    /// digests to a sandbox using them.
    pub fn remove(
        &self,
        name: &str,
        in_use: &dyn Fn(&Digest) -> Option<String>,
    ) -> Result<ImageRecord, StoreError> {
        let _lock = self.exclusive_lock()?;
        let record = self.find(name)?;
        if let Some(sandbox) = in_use(&record.manifest) {
            return Err(StoreError::InUse { name: name.to_owned(), sandbox });
        }
        let path = self.record_path(&record.manifest);
        fs::remove_file(&path).map_err(io_err(&path))?;
        self.sweep()?;
        Ok(record)
    }

    /// Removes every image no sandbox uses, then whatever blob or layer no
    /// remaining image holds, and leftovers of interrupted pulls.
    pub fn prune(&self, used: &HashSet<Digest>) -> Result<Vec<ImageRecord>, StoreError> {
        let _lock = self.exclusive_lock()?;
        let mut removed = Vec::new();
        for record in self.list()? {
            if !used.contains(&record.manifest) {
                let path = self.record_path(&record.manifest);
                fs::remove_file(&path).map_err(io_err(&path))?;
                removed.push(record);
            }
        }
        self.sweep()?;
        Ok(removed)
    }

    /// Blobs and layers no recorded image holds, and `tmp/`. Runs under
    /// the exclusive lock, so no pull is writing.
    fn sweep(&self) -> Result<(), StoreError> {
        let mut kept = HashSet::new();
        for record in self.list()? {
            kept.insert(record.manifest.hex().to_owned());
            kept.insert(record.config.hex().to_owned());
            kept.extend(record.layers.iter().map(|l| l.hex().to_owned()));
        }
        for dir in ["blobs/sha256", "layers/sha256"] {
            let dir = self.root.join(dir);
            for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let entry = entry.map_err(io_err(&dir))?;
                if !kept.contains(entry.file_name().to_string_lossy().as_ref()) {
                    remove_tree(&entry.path());
                }
            }
        }
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))?.flatten() {
            remove_tree(&entry.path());
        }
        Ok(())
    }
}

/// `du`'s count below `path`: allocated blocks, each inode once.
fn disk_usage(path: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::symlink_metadata(path) else { return 0 };
    if !seen.insert((meta.dev(), meta.ino())) {
        return 0;
    }
    let mut total = meta.blocks().saturating_mul(512);
    if meta.is_dir()
        && let Ok(entries) = fs::read_dir(path)
    {
        for entry in entries.flatten() {
            total = total.saturating_add(disk_usage(&entry.path(), seen));
        }
    }
    total
}

/// A size for people: `512 B`, `3.2 MiB`, `1.5 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Removes a file or a directory tree, making directories writable on the
/// way (a layer may hold read-only ones).
pub fn remove_tree(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::symlink_metadata(path) else { return };
    if !meta.is_dir() {
        let _ = fs::remove_file(path);
        return;
    }
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            remove_tree(&entry.path());
        }
    }
    if let Err(e) = fs::remove_dir(path) {
        tracing::warn!(path = %path.display(), "cannot remove: {e}");
    }
}

/// Hashes what passes through: a layer is checked against its digest
/// again as it is unpacked (the blob on disk could have changed since it
/// was stored), before the unpacked directory is named.
struct HashingReader<R> {
    inner: R,
    hasher: ring::digest::Context,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> HashingReader<R> {
        HashingReader { inner, hasher: ring::digest::Context::new(&ring::digest::SHA256) }
    }

    /// Reads what the unpacker left (tar padding, the compressor's trailer)
    /// and returns the digest of everything.
    fn finish(mut self) -> io::Result<String> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(format!("sha256:{}", hex(self.hasher.finish().as_ref())))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn layer_bytes(name: &str) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(2);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, &b"hi"[..]).unwrap();
        builder.into_inner().unwrap()
    }

    #[test]
    fn a_digest_is_sha256_hex_only() {
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(64))).is_ok());
        for bad in [
            "sha256:../../etc",
            "sha512:aa",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}/", "a".repeat(63)),
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_blob_that_does_not_match_its_digest_is_not_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("images")).unwrap();
        let claimed = Digest::of(b"the real bytes");
        let err = store.put_blob(&claimed, &b"other bytes"[..]).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!store.has_blob(&claimed));
        assert!(fs::read_dir(tmp.path().join("images/tmp")).unwrap().next().is_none());
        store.put_blob(&claimed, &b"the real bytes"[..]).unwrap();
        assert_eq!(store.read_blob(&claimed).unwrap(), b"the real bytes");
    }

    #[test]
    fn a_layer_that_fails_to_unpack_leaves_nothing_that_looks_complete() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("images"))
            .unwrap()
            .with_limits(Limits { max_files: 0, ..Limits::default() });
        let bytes = layer_bytes("f");
        let digest = Digest::of(&bytes);
        store.put_blob(&digest, &bytes[..]).unwrap();
        assert!(store.unpack(&digest).is_err());
        assert!(!store.layer_path(&digest).exists());
        assert!(fs::read_dir(tmp.path().join("images/tmp")).unwrap().next().is_none());
    }

    #[test]
    fn a_layer_blob_changed_on_disk_is_refused_at_unpack() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("images")).unwrap();
        let bytes = layer_bytes("f");
        let digest = Digest::of(&bytes);
        store.put_blob(&digest, &bytes[..]).unwrap();
        fs::write(store.blob_path(&digest), layer_bytes("g")).unwrap();
        let err = store.unpack(&digest).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!store.layer_path(&digest).exists());
    }

    #[test]
    fn concurrent_unpacks_of_one_layer_do_the_work_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(tmp.path().join("images")).unwrap());
        let bytes = layer_bytes("f");
        let digest = Digest::of(&bytes);
        store.put_blob(&digest, &bytes[..]).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (store, digest) = (store.clone(), digest.clone());
                std::thread::spawn(move || store.unpack(&digest).unwrap())
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), store.layer_path(&digest));
        }
        assert_eq!(fs::read(store.layer_path(&digest).join("f")).unwrap(), b"hi");
    }

    #[test]
    fn a_blob_past_the_budget_is_refused_while_it_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("images")).unwrap();
        let used = store.usage();
        let store = store.with_budget(Some(used + 100_000));
        let small = vec![1u8; 10_000];
        store.put_blob(&Digest::of(&small), &small[..]).unwrap();
        let big = vec![2u8; 200_000];
        let err = store.put_blob(&Digest::of(&big), &big[..]).unwrap_err();
        match err {
            StoreError::OverBudget { budget, used: held, wanted } => {
                assert_eq!(budget, used + 100_000);
                assert!(held >= used + 10_000, "what the first blob added is counted: {held}");
                assert!(wanted > budget - held && wanted <= 200_000, "{wanted}");
            }
            other => panic!("{other}"),
        }
        assert!(!store.has_blob(&Digest::of(&big)));
        assert!(fs::read_dir(tmp.path().join("images/tmp")).unwrap().next().is_none());
        assert!(store.usage() <= used + 100_000);
    }

    #[test]
    fn a_layer_whose_files_pass_the_budget_is_refused_before_they_are_written() {
        let tmp = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(300_000);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, "big", &vec![0u8; 300_000][..]).unwrap();
        let compressed = {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            encoder.write_all(&builder.into_inner().unwrap()).unwrap();
            encoder.finish().unwrap()
        };
        let digest = Digest::of(&compressed);
        let store = Store::open(tmp.path().join("images")).unwrap();
        let budget = store.usage() + compressed.len() as u64 + 100_000;
        let store = store.with_budget(Some(budget));
        store.put_blob(&digest, &compressed[..]).unwrap();
        let err = store.unpack(&digest).unwrap_err();
        assert!(matches!(err, StoreError::OverBudget { budget: b, .. } if b == budget), "{err}");
        assert!(err.to_string().contains("airlock image prune"), "{err}");
        assert!(!store.layer_path(&digest).exists());
        assert!(fs::read_dir(tmp.path().join("images/tmp")).unwrap().next().is_none());

        let roomy = Store::open(tmp.path().join("images")).unwrap().with_budget(Some(budget + 400_000));
        assert_eq!(fs::metadata(roomy.unpack(&digest).unwrap().join("big")).unwrap().len(), 300_000);
    }

    #[test]
    fn usage_counts_blocks_on_disk_and_a_hardlinked_file_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("images")).unwrap();
        let before = store.usage();
        let blob = vec![3u8; 64 * 1024];
        let path = store.put_blob(&Digest::of(&blob), &blob[..]).unwrap();
        let after = store.usage();
        assert!(after >= before + 64 * 1024, "{before} → {after}");
        fs::hard_link(&path, store.root().join("tmp/link")).unwrap();
        assert_eq!(store.usage(), after);
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(3 << 20), "3.0 MiB");
        assert_eq!(human_size((3 << 30) / 2), "1.5 GiB");
    }

    #[test]
    fn prune_keeps_what_a_sandbox_uses_and_what_its_image_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("images")).unwrap();
        let mut records = Vec::new();
        for name in ["a", "b"] {
            let layer = layer_bytes(name);
            let layer_digest = Digest::of(&layer);
            store.put_blob(&layer_digest, &layer[..]).unwrap();
            store.unpack(&layer_digest).unwrap();
            let config = format!("{{\"n\":\"{name}\"}}");
            let config_digest = Digest::of(config.as_bytes());
            store.put_blob(&config_digest, config.as_bytes()).unwrap();
            let manifest = format!("{{\"m\":\"{name}\"}}");
            let manifest_digest = Digest::of(manifest.as_bytes());
            store.put_blob(&manifest_digest, manifest.as_bytes()).unwrap();
            let record = ImageRecord {
                manifest: manifest_digest,
                config: config_digest,
                layers: vec![layer_digest],
                names: vec![],
                size: 0,
            };
            records.push(store.record(record, Some(name)).unwrap());
        }
        let used: HashSet<_> = [records[0].manifest.clone()].into();
        let removed = store.prune(&used).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].names, ["b"]);
        assert!(store.layer_path(&records[0].layers[0]).is_dir());
        assert!(!store.layer_path(&records[1].layers[0]).exists());
        assert!(!store.has_blob(&records[1].config));
        assert_eq!(store.find("a").unwrap().manifest, records[0].manifest);
        let err = store.remove("a", &|_| Some("sb1".to_owned())).unwrap_err();
        assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    }
}
