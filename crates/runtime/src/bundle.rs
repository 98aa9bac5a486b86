//! Export bundles: everything a reviewer needs about one sandbox in one
//! file (`airlock export NAME -o NAME.tar.zst`), checkable on another host
//! without the state directory (`airlock audit --bundle`, `airlock audit
//! verify --bundle`).
//!
//! A bundle is a zstd-compressed tar of regular files. Its first member is
//! `manifest.json` (the sandbox, when, the host key, the audit log's head,
//! and every other member's path, size and SHA-256), its second
//! `manifest.sig` (an Ed25519 signature of the manifest's exact bytes by
//! the exporting host's key, [`host_key`]). Then, as far as the sandbox has
//! them: `meta.json`, `policy.toml` (the resolved policy), `audit.jsonl`
//! and `audit.head`, `net.jsonl` (the network decisions, one per line, as
//! `airlock net log --json` gives them), `logs/stdout.log`,
//! `logs/stderr.log`, `diff.json` and `diff.patch`, and `artifacts/…`.
//!
//! Reading never unpacks: the archive is streamed, each member checked
//! (a regular file, a relative path without `..`, listed in the signed
//! manifest once, of the size listed and at most [`MAX_MEMBER_BYTES`]) and
//! hashed as it passes; only the manifest, its signature and the audit
//! log are kept in memory, each under its own cap. A bundle that breaks
//! any rule is refused as a whole before anything of it is shown.
//!
//! Secret values stay out because they are kept out of the state
//! directory the bundle is made from (redacted logs and audit events, the
//! scrubbed layer and artifacts, the command line and policy rewritten at
//! launch, the diff of a sandbox with secrets kept redacted at finalize).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::audit::chain::{self, Anchor, AnchorSource, ChainReport, Head};
use crate::audit::{AuditEvent, AuditLog};
use crate::state::{SandboxDir, StateRoot};

/// The manifest, first in every bundle.
pub const MANIFEST: &str = "manifest.json";
/// The manifest's signature, second.
pub const SIGNATURE: &str = "manifest.sig";
/// The audit log's member.
pub const AUDIT: &str = "audit.jsonl";
const AUDIT_HEAD: &str = "audit.head";
const FORMAT: &str = "airlock-bundle";
const FORMAT_VERSION: u32 = 1;
/// The host key's file in the state root.
const KEY_FILE: &str = "host-key.pk8";

/// Most members a bundle may list.
pub const MAX_MEMBERS: usize = 65_536;
/// Most bytes of one member.
pub const MAX_MEMBER_BYTES: u64 = 16 << 30;
/// Most bytes of all members together.
pub const MAX_TOTAL_BYTES: u64 = 64 << 30;
/// Most bytes of the manifest, the signature and the audit log, which are
/// held in memory.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
const MAX_SIGNATURE_BYTES: u64 = 4096;
pub const MAX_AUDIT_BYTES: u64 = 1 << 30;
/// Longest member path.
pub const MAX_PATH_BYTES: usize = 4096;

/// Why a bundle could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The bundle breaks a rule a bundle airlock writes never breaks: it
    /// is refused, nothing of it is shown or written anywhere.
    #[error("refusing bundle {path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    /// A signature or a hash does not match: the bundle was changed after
    /// it was signed, or signed by another key than the one required.
    #[error("bundle {path} fails verification: {reason}")]
    Tampered { path: PathBuf, reason: String },
    #[error(
        "sandbox {0} is running: its logs and audit log still grow and its layer is not final; \
         stop it first (`airlock stop {0}`), then export"
    )]
    Running(String),
    #[error("the host key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub sandbox: String,
    /// RFC 3339, UTC.
    pub exported_at: String,
    pub airlock_version: String,
    /// The signing key: `ed25519:` and the public key's 64 hex digits.
    pub host_key: String,
    /// The audit log's last record when exported (the log must end there).
    pub audit_head: Option<HeadRecord>,
    pub members: Vec<Member>,
    /// What was left out and why (a diff whose workspace is gone, an
    /// artifact that is not a regular file).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A head as the manifest writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadRecord {
    pub seq: u64,
    pub hash: String,
}

/// One member: its path in the archive, size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    #[serde(with = "crate::audit::path_repr::plain")]
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// `manifest.sig`.
#[derive(Debug, Serialize, Deserialize)]
struct Signature {
    algorithm: String,
    public_key: String,
    signature: String,
}

/// This host's signing key: `<state root>/host-key.pk8` (PKCS#8, 0600),
/// created on first use. Its public half (`ed25519:<hex>`) is what
/// [`open`] reports as a bundle's signer.
pub fn host_key(root: &StateRoot) -> Result<Ed25519KeyPair, BundleError> {
    let path = root.path().join(KEY_FILE);
    let bad = |reason: String| BundleError::Key { path: path.clone(), reason };
    let read = |path: &Path| -> io::Result<Vec<u8>> {
        let mut file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
        let mut bytes = Vec::new();
        Read::by_ref(&mut file).take(4096).read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    let bytes = match read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_key(root, &path)?,
        Err(e) => return Err(bad(e.to_string())),
    };
    Ed25519KeyPair::from_pkcs8(&bytes).map_err(|e| bad(format!("not an Ed25519 key ({e})")))
}

/// Writes a new key beside its final name and links it there, so two
/// first users never end up with two keys: the second takes the first's.
fn create_key(root: &StateRoot, path: &Path) -> Result<Vec<u8>, BundleError> {
    let io = |action, source| BundleError::Io { action, path: path.to_path_buf(), source };
    std::fs::create_dir_all(root.path()).map_err(|e| io("create the directory of", e))?;
    let rng = ring::rand::SystemRandom::new();
    let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| BundleError::Key {
        path: path.to_path_buf(),
        reason: format!("could not generate ({e})"),
    })?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    file.write_all(doc.as_ref()).and_then(|()| file.sync_all()).map_err(|e| io("write", e))?;
    drop(file);
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created this host's key for signing export bundles");
            Ok(doc.as_ref().to_vec())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => std::fs::read(path).map_err(|e| io("read", e)),
        Err(e) => Err(io("create", e)),
    }
}

/// A key's public half as bundles name it.
pub fn public_key_text(key: &Ed25519KeyPair) -> String {
    format!("ed25519:{}", chain::hex(key.public_key().as_ref()))
}

/// What [`export`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub path: PathBuf,
    pub members: usize,
    /// Bytes of the members, uncompressed.
    pub bytes: u64,
    pub host_key: String,
    pub notes: Vec<String>,
}

/// Where a member's bytes come from.
enum Content {
    /// A file of the state directory, read without following links.
    File(PathBuf),
    Bytes(Vec<u8>),
}

struct Source {
    path: PathBuf,
    content: Content,
}

/// Writes the bundle of sandbox `name` to `out` (replacing it once
/// complete). The sandbox must not be running.
pub fn export(root: &StateRoot, name: &str, out: &Path) -> Result<ExportReport, BundleError> {
    let io = |action, source| BundleError::Io { action, path: out.to_path_buf(), source };
    // An unknown sandbox is the first thing to say, before any file is made.
    root.open(name)?;
    let tmp = temp_beside(out);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| BundleError::Io { action: "create", path: tmp.clone(), source: e })?;
    let result = export_into(root, name, name, file, out).and_then(|(file, report)| {
        file.sync_all().map_err(|e| io("sync", e))?;
        std::fs::rename(&tmp, out).map_err(|e| io("write", e))?;
        Ok(report)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes the bundle of sandbox `name` into `sink`, the manifest naming
/// the sandbox `shown` (a daemon's caller knows it by a name of their
/// own); errors call the bundle `bundle`. The sandbox must not be
/// running. Returns `sink` once everything is written to it (and flushed);
/// the report's `path` is `bundle`. A failure may leave part of a bundle in
/// `sink`: the caller discards it.
pub fn export_into<W: Write>(
    root: &StateRoot,
    name: &str,
    shown: &str,
    sink: W,
    bundle: &Path,
) -> Result<(W, ExportReport), BundleError> {
    let sandbox = root.open(name)?;
    if sandbox.is_live() {
        return Err(BundleError::Running(shown.to_owned()));
    }
    let key = host_key(root)?;
    let mut notes = Vec::new();
    let (sources, head) = gather(&sandbox, &mut notes)?;
    if sources.len() > MAX_MEMBERS {
        return Err(BundleError::Refused {
            path: bundle.to_path_buf(),
            reason: format!(
                "the sandbox has {} files to export, more than a bundle holds ({MAX_MEMBERS})",
                sources.len()
            ),
        });
    }
    // First pass: the hashes, for the manifest that comes first.
    let mut members = Vec::with_capacity(sources.len());
    for source in &sources {
        let (size, hash) = hash_content(&source.content)?;
        members.push(Member { path: source.path.clone(), size, sha256: chain::hex(&hash) });
    }
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        version: FORMAT_VERSION,
        sandbox: shown.to_owned(),
        exported_at: crate::now_rfc3339(),
        airlock_version: env!("CARGO_PKG_VERSION").to_owned(),
        host_key: public_key_text(&key),
        audit_head: head.map(|h| HeadRecord { seq: h.seq, hash: chain::hex(&h.hash) }),
        members,
        notes: notes.clone(),
    };
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| BundleError::Io {
        action: "encode the manifest of",
        path: bundle.to_path_buf(),
        source: e.into(),
    })?;
    let signature = Signature {
        algorithm: "ed25519".to_owned(),
        public_key: chain::hex(key.public_key().as_ref()),
        signature: chain::hex(key.sign(&manifest_bytes).as_ref()),
    };
    let signature_bytes = serde_json::to_vec_pretty(&signature).map_err(|e| BundleError::Io {
        action: "encode the signature of",
        path: bundle.to_path_buf(),
        source: e.into(),
    })?;
    let sink = write_archive(sink, bundle, &manifest_bytes, &signature_bytes, &sources, &manifest.members)?;
    let report = ExportReport {
        path: bundle.to_path_buf(),
        members: manifest.members.len(),
        bytes: manifest.members.iter().map(|m| m.size).sum(),
        host_key: manifest.host_key,
        notes,
    };
    Ok((sink, report))
}

fn temp_beside(out: &Path) -> PathBuf {
    let base = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parent.join(format!(".{base}.airlock-export-{}", std::process::id()))
}

/// Everything the bundle holds, and the audit log's head.
fn gather(sandbox: &SandboxDir, notes: &mut Vec<String>) -> Result<(Vec<Source>, Option<Head>), BundleError> {
    let mut sources = Vec::new();
    let file = |member: &str, path: PathBuf, sources: &mut Vec<Source>| {
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            sources.push(Source { path: PathBuf::from(member), content: Content::File(path) });
        }
    };
    file("meta.json", sandbox.meta_path(), &mut sources);
    file("policy.toml", sandbox.policy_path(), &mut sources);
    // The log and its head as one writer left them (under its lock).
    let audit_path = sandbox.audit_path();
    let mut head = None;
    if audit_path.exists() {
        let (log, recorded) = AuditLog::snapshot(&audit_path)?;
        match recorded {
            Ok(Some(h)) => {
                head = Some(h);
                sources.push(Source { path: AUDIT_HEAD.into(), content: Content::Bytes(h.encode()) });
            }
            Ok(None) => {}
            Err(e) => notes.push(format!("audit.head left out: it cannot be read ({e})")),
        }
        let net: Vec<u8> = match AuditLog::entries_of(&log, &audit_path) {
            Ok(entries) => entries
                .into_iter()
                .filter_map(|e| match e.record.event {
                    AuditEvent::Network(event) => {
                        let line = crate::ops::NetLogEntry { ts: e.record.ts, event };
                        serde_json::to_vec(&line).ok().map(|mut l| {
                            l.push(b'\n');
                            l
                        })
                    }
                    _ => None,
                })
                .flatten()
                .collect(),
            Err(e) => {
                notes.push(format!("net.jsonl left out: the audit log cannot be read as events ({e})"));
                Vec::new()
            }
        };
        sources.push(Source { path: AUDIT.into(), content: Content::Bytes(log) });
        sources.push(Source { path: "net.jsonl".into(), content: Content::Bytes(net) });
    }
    file("logs/stdout.log", sandbox.stdout_log(), &mut sources);
    file("logs/stderr.log", sandbox.stderr_log(), &mut sources);
    diff_members(sandbox, &mut sources, notes);
    artifact_members(&sandbox.artifacts_dir(), Path::new(""), &mut sources, notes, 0);
    Ok((sources, head))
}

/// `diff.json` and `diff.patch` of a sandbox with an overlay workspace.
fn diff_members(sandbox: &SandboxDir, sources: &mut Vec<Source>, notes: &mut Vec<String>) {
    let Ok(meta) = sandbox.read_meta() else { return };
    let (Some(lower), true) = (meta.workspace.clone(), meta.workspace_mode == "overlay") else { return };
    let upper = sandbox.upper_dir();
    if std::fs::symlink_metadata(&upper).is_err() {
        return;
    }
    let diff = match airlock_workspace::compute_diff(&lower, &upper) {
        Ok(diff) => diff,
        Err(e) => {
            notes.push(format!("diff left out: {e}"));
            return;
        }
    };
    if let Ok(json) = serde_json::to_vec_pretty(&diff.to_json()) {
        sources.push(Source { path: "diff.json".into(), content: Content::Bytes(json) });
    }
    // A sandbox with secrets kept its patch redacted at finalize: the
    // workspace's side may hold a value this process does not know.
    let redacted = sandbox.redacted_patch_path();
    if std::fs::symlink_metadata(&redacted).is_ok_and(|m| m.is_file()) {
        sources.push(Source { path: "diff.patch".into(), content: Content::File(redacted) });
        return;
    }
    let mut patch = Vec::new();
    match diff.render_unified(&lower, &upper, &mut patch) {
        Ok(()) => sources.push(Source { path: "diff.patch".into(), content: Content::Bytes(patch) }),
        Err(e) => notes.push(format!("diff.patch left out: {e}")),
    }
}

/// Every regular file below `artifacts/`, never following a link.
fn artifact_members(
    dir: &Path,
    rel: &Path,
    sources: &mut Vec<Source>,
    notes: &mut Vec<String>,
    depth: usize,
) {
    if depth > airlock_workspace::MAX_DEPTH {
        notes.push(format!("artifacts below artifacts/{} left out: too deep", rel.display()));
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let rel = rel.join(entry.file_name());
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else { continue };
        if meta.is_dir() {
            artifact_members(&entry.path(), &rel, sources, notes, depth + 1);
        } else if meta.is_file() {
            let member = Path::new("artifacts").join(&rel);
            if member.as_os_str().len() > MAX_PATH_BYTES {
                notes.push("an artifact with a path too long for a bundle left out".to_owned());
                continue;
            }
            sources.push(Source { path: member, content: Content::File(entry.path()) });
        } else {
            notes.push(format!(
                "artifacts/{} left out: not a regular file",
                String::from_utf8_lossy(rel.as_os_str().as_bytes())
            ));
        }
    }
}

fn open_nofollow(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)
}

fn hash_content(content: &Content) -> Result<(u64, [u8; 32]), BundleError> {
    match content {
        Content::Bytes(bytes) => Ok((bytes.len() as u64, chain::sha256(bytes))),
        Content::File(path) => {
            let io = |source| BundleError::Io { action: "read", path: path.clone(), source };
            let mut file = open_nofollow(path).map_err(io)?;
            if !file.metadata().map_err(io)?.is_file() {
                return Err(io(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")));
            }
            let mut hasher = Hasher::new();
            let size = io::copy(&mut file, &mut hasher).map_err(io)?;
            Ok((size, hasher.finish()))
        }
    }
}

/// SHA-256 of what is written to it.
struct Hasher(ring::digest::Context);

impl Hasher {
    fn new() -> Hasher {
        Hasher(ring::digest::Context::new(&ring::digest::SHA256))
    }

    fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

impl Write for Hasher {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.update(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    read: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.0.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

fn header(size: u64, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

/// Writes the archive into `sink`; `bundle` names it in errors.
fn write_archive<W: Write>(
    sink: W,
    bundle: &Path,
    manifest: &[u8],
    signature: &[u8],
    sources: &[Source],
    members: &[Member],
) -> Result<W, BundleError> {
    let io = |action, source| BundleError::Io { action, path: bundle.to_path_buf(), source };
    let mut encoder =
        zstd::stream::write::Encoder::new(BufWriter::new(sink), 3).map_err(|e| io("compress", e))?;
    // A damaged frame is told apart from a changed member before any is read.
    encoder.include_checksum(true).map_err(|e| io("compress", e))?;
    let mut tar = tar::Builder::new(encoder);
    let mtime = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    for (name, bytes) in [(MANIFEST, manifest), (SIGNATURE, signature)] {
        tar.append_data(&mut header(bytes.len() as u64, mtime), name, bytes).map_err(|e| io("write", e))?;
    }
    for (source, member) in sources.iter().zip(members) {
        let reader: Box<dyn Read> = match &source.content {
            Content::Bytes(bytes) => Box::new(&bytes[..]),
            Content::File(path) => Box::new(open_nofollow(path).map_err(|source| BundleError::Io {
                action: "read",
                path: path.clone(),
                source,
            })?),
        };
        let mut reader = HashingReader { inner: reader.take(member.size), hasher: Hasher::new(), read: 0 };
        tar.append_data(&mut header(member.size, mtime), &member.path, &mut reader)
            .map_err(|e| io("write", e))?;
        if reader.read != member.size || chain::hex(&reader.hasher.finish()) != member.sha256 {
            return Err(io(
                "write",
                io::Error::other(format!(
                    "{} changed while it was exported; export again",
                    member.path.display()
                )),
            ));
        }
    }
    let encoder = tar.into_inner().map_err(|e| io("write", e))?;
    let writer = encoder.finish().map_err(|e| io("compress", e))?;
    writer.into_inner().map_err(|e| io("write", e.into_error()))
}

/// A bundle that passed every check.
#[derive(Debug)]
pub struct Opened {
    pub manifest: Manifest,
    /// Who signed it: `ed25519:<hex>`.
    pub signer: String,
    /// `audit.jsonl`, when the bundle has one.
    pub audit: Option<Vec<u8>>,
    /// The audit log's chain, held to the manifest's head.
    pub chain: Option<ChainReport>,
}

/// Reads and checks the bundle at `path`: the signature (by `trusted`,
/// `ed25519:<hex>`, when given), every member against the manifest, the
/// audit chain. Nothing is written anywhere.
pub fn open(path: &Path, trusted: Option<&str>) -> Result<Opened, BundleError> {
    let refuse = |reason: String| BundleError::Refused { path: path.to_path_buf(), reason };
    let tampered = |reason: String| BundleError::Tampered { path: path.to_path_buf(), reason };
    let io = |source| BundleError::Io { action: "read", path: path.to_path_buf(), source };
    let file = File::open(path).map_err(io)?;
    if !file.metadata().map_err(io)?.is_file() {
        return Err(refuse("it is not a regular file".into()));
    }
    let decoder = zstd::stream::read::Decoder::new(BufReader::new(file))
        .map_err(|e| refuse(format!("it is not zstd-compressed ({e})")))?;
    let mut archive = tar::Archive::new(decoder);
    // Raw entries: GNU long names are read here, under a cap, and PAX
    // headers (which airlock does not write) are refused.
    let entries = archive.entries().map_err(|e| refuse(format!("it is not a tar archive ({e})")))?.raw(true);

    let mut manifest: Option<(Manifest, HashMap<Vec<u8>, usize>)> = None;
    let mut manifest_bytes: Option<Vec<u8>> = None;
    let mut signer = String::new();
    let mut seen: Vec<bool> = Vec::new();
    let mut audit = None;
    let mut head_member = None;
    let mut long_name: Option<Vec<u8>> = None;
    let mut raw_entries = 0usize;
    let mut members = 0usize;
    let mut total = 0u64;
    for entry in entries {
        let mut entry = entry.map_err(|e| refuse(format!("a damaged archive ({e})")))?;
        raw_entries += 1;
        if raw_entries > 2 * (MAX_MEMBERS + 2) {
            return Err(refuse(format!("it has more than {MAX_MEMBERS} members")));
        }
        let kind = entry.header().entry_type();
        let size = entry.header().size().map_err(|e| refuse(format!("a damaged header ({e})")))?;
        if kind.is_gnu_longname() {
            if long_name.is_some() || size > MAX_PATH_BYTES as u64 + 1 {
                return Err(refuse("a member's long name is too long or repeated".into()));
            }
            let mut name = Vec::new();
            entry.by_ref().take(size).read_to_end(&mut name).map_err(io)?;
            while name.last() == Some(&0) {
                name.pop();
            }
            long_name = Some(name);
            continue;
        }
        let name = long_name.take().unwrap_or_else(|| entry.header().path_bytes().into_owned());
        let shown = airlock_workspace::quote_bytes(&name);
        if kind != tar::EntryType::Regular {
            let what = match kind {
                tar::EntryType::Symlink => "a symbolic link",
                tar::EntryType::Link => "a hard link",
                tar::EntryType::Directory => "a directory",
                tar::EntryType::XHeader | tar::EntryType::XGlobalHeader => "a PAX header",
                _ => "not a regular file",
            };
            return Err(refuse(format!("member {shown} is {what}: a bundle holds regular files only")));
        }
        if let Some(reason) = bad_member_path(&name) {
            return Err(refuse(format!("member {shown}: {reason}")));
        }
        if size > MAX_MEMBER_BYTES {
            return Err(refuse(format!(
                "member {shown} is {size} bytes, more than a member may be ({MAX_MEMBER_BYTES})"
            )));
        }
        total += size;
        if total > MAX_TOTAL_BYTES {
            return Err(refuse(format!("its members add up to more than {MAX_TOTAL_BYTES} bytes")));
        }
        members += 1;
        match members {
            1 | 2 => {
                let (want, cap) = if members == 1 {
                    (MANIFEST, MAX_MANIFEST_BYTES)
                } else {
                    (SIGNATURE, MAX_SIGNATURE_BYTES)
                };
                if name != want.as_bytes() {
                    return Err(refuse(format!("member {members} is {shown}, not {want}")));
                }
                if size > cap {
                    return Err(refuse(format!("{want} is {size} bytes, more than {cap}")));
                }
                let mut bytes = Vec::new();
                entry.by_ref().take(size).read_to_end(&mut bytes).map_err(io)?;
                if members == 1 {
                    manifest_bytes = Some(bytes);
                    continue;
                }
                let signed = manifest_bytes.take().unwrap_or_default();
                signer = check_signature(&signed, &bytes, trusted).map_err(&tampered)?;
                let parsed: Manifest = serde_json::from_slice(&signed)
                    .map_err(|e| refuse(format!("the manifest is not one ({e})")))?;
                let index = check_manifest(&parsed, &signer).map_err(&refuse)?;
                seen = vec![false; parsed.members.len()];
                manifest = Some((parsed, index));
            }
            _ => {
                let Some((parsed, index)) = &manifest else {
                    return Err(refuse("no manifest".into()));
                };
                let Some(&i) = index.get(&name) else {
                    return Err(refuse(format!("member {shown} is not in the manifest")));
                };
                if std::mem::replace(&mut seen[i], true) {
                    return Err(refuse(format!("member {shown} appears twice")));
                }
                let listed = &parsed.members[i];
                if size != listed.size {
                    return Err(tampered(format!(
                        "member {shown} is {size} bytes, the manifest says {}",
                        listed.size
                    )));
                }
                let keep = name == AUDIT.as_bytes() || name == AUDIT_HEAD.as_bytes();
                if name == AUDIT.as_bytes() && size > MAX_AUDIT_BYTES {
                    return Err(refuse(format!(
                        "its audit log is {size} bytes, more than {MAX_AUDIT_BYTES}"
                    )));
                }
                let mut kept = Vec::new();
                let mut hasher = Hasher::new();
                let mut buf = vec![0u8; 64 * 1024];
                let mut left = size;
                while left > 0 {
                    let want = left.min(buf.len() as u64) as usize;
                    let n = entry.read(&mut buf[..want]).map_err(io)?;
                    if n == 0 {
                        return Err(refuse(format!("member {shown} ends early")));
                    }
                    hasher.0.update(&buf[..n]);
                    if keep {
                        kept.extend_from_slice(&buf[..n]);
                    }
                    left -= n as u64;
                }
                if chain::hex(&hasher.finish()) != listed.sha256.to_ascii_lowercase() {
                    return Err(tampered(format!(
                        "member {shown} does not match its SHA-256 in the manifest"
                    )));
                }
                if name == AUDIT.as_bytes() {
                    audit = Some(kept);
                } else if keep {
                    head_member = Head::decode(&kept);
                }
            }
        }
    }
    if long_name.is_some() {
        return Err(refuse("a long name without its member".into()));
    }
    let Some((manifest, _)) = manifest else {
        return Err(refuse("it has no signed manifest".into()));
    };
    if let Some(i) = seen.iter().position(|s| !s) {
        let missing = airlock_workspace::quote_bytes(manifest.members[i].path.as_os_str().as_bytes());
        return Err(tampered(format!("member {missing}, listed in the manifest, is missing")));
    }
    let chain = audit.as_deref().map(|log| {
        let mut anchors = Vec::new();
        if let Some(h) = &manifest.audit_head
            && let Some(hash) = chain::parse_hash(&h.hash)
        {
            anchors.push(Anchor { head: Head { seq: h.seq, hash }, source: AnchorSource::Bundle });
        }
        if let Some(head) = head_member {
            anchors.push(Anchor { head, source: AnchorSource::HeadFile });
        }
        chain::verify(log, &anchors, false)
    });
    Ok(Opened { manifest, signer, audit, chain })
}

/// The signer (`ed25519:<hex>`) when `signature` is a valid signature of
/// `manifest` (by `trusted`, when given).
fn check_signature(manifest: &[u8], signature: &[u8], trusted: Option<&str>) -> Result<String, String> {
    let sig: Signature =
        serde_json::from_slice(signature).map_err(|e| format!("{SIGNATURE} is not a signature ({e})"))?;
    if sig.algorithm != "ed25519" {
        return Err(format!("{SIGNATURE} uses {:?}, not ed25519", sig.algorithm));
    }
    let key = chain::decode_hex(&sig.public_key)
        .filter(|k| k.len() == 32)
        .ok_or("the signing key is not an Ed25519 key")?;
    let value = chain::decode_hex(&sig.signature).ok_or("the signature is not hex")?;
    let signer = format!("ed25519:{}", chain::hex(&key));
    UnparsedPublicKey::new(&ED25519, &key).verify(manifest, &value).map_err(|_| {
        format!("the manifest's signature is not valid for key {signer}: the manifest was changed")
    })?;
    if let Some(trusted) = trusted {
        let want = trusted.strip_prefix("ed25519:").unwrap_or(trusted).to_ascii_lowercase();
        if want != chain::hex(&key) {
            return Err(format!("it is signed by {signer}, not by the key required ({trusted})"));
        }
    }
    Ok(signer)
}

/// The manifest's own rules; its member index by path.
fn check_manifest(manifest: &Manifest, signer: &str) -> Result<HashMap<Vec<u8>, usize>, String> {
    if manifest.format != FORMAT || manifest.version != FORMAT_VERSION {
        return Err(format!(
            "format {:?} version {}, not {FORMAT} {FORMAT_VERSION}",
            manifest.format, manifest.version
        ));
    }
    if manifest.host_key != signer {
        return Err(format!("the manifest names key {}, but {signer} signed it", manifest.host_key));
    }
    if manifest.members.len() > MAX_MEMBERS {
        return Err(format!(
            "the manifest lists {} members, more than {MAX_MEMBERS}",
            manifest.members.len()
        ));
    }
    let mut index = HashMap::with_capacity(manifest.members.len());
    for (i, member) in manifest.members.iter().enumerate() {
        let name = member.path.as_os_str().as_bytes().to_vec();
        let shown = airlock_workspace::quote_bytes(&name);
        if let Some(reason) = bad_member_path(&name) {
            return Err(format!("the manifest lists {shown}: {reason}"));
        }
        if name == MANIFEST.as_bytes() || name == SIGNATURE.as_bytes() {
            return Err(format!("the manifest lists {shown}, which is its own"));
        }
        if member.size > MAX_MEMBER_BYTES {
            return Err(format!(
                "the manifest lists {shown} of {} bytes, more than a member may be",
                member.size
            ));
        }
        if index.insert(name, i).is_some() {
            return Err(format!("the manifest lists {shown} twice"));
        }
    }
    Ok(index)
}

/// Why a member's path is not one a bundle may hold.
fn bad_member_path(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        return Some("an empty path");
    }
    if name.len() > MAX_PATH_BYTES {
        return Some("a path too long");
    }
    if name.contains(&0) {
        return Some("a NUL byte in its path");
    }
    if name[0] == b'/' {
        return Some("an absolute path");
    }
    for part in name.split(|&b| b == b'/') {
        match part {
            b"" => return Some("an empty component in its path"),
            b"." | b".." => return Some("a `.` or `..` in its path"),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::audit::chain::Verdict;

    /// A state root with one finished sandbox: an audit log, a log file, an
    /// artifact.
    fn exported(dir: &Path) -> (StateRoot, PathBuf) {
        std::fs::create_dir_all(dir.join("state")).unwrap();
        let root = StateRoot::at(dir.join("state"));
        let sandbox = root.create_sandbox(Some("box")).unwrap();
        let mut log = AuditLog::open(&sandbox.audit_path()).unwrap();
        log.record(AuditEvent::CommandStarted { argv: vec!["make".into()], pid: Some(3) }).unwrap();
        log.record(AuditEvent::Removed { reason: "test".into() }).unwrap();
        std::fs::create_dir_all(sandbox.path().join("logs")).unwrap();
        std::fs::write(sandbox.stdout_log(), "built\n").unwrap();
        std::fs::create_dir_all(sandbox.artifacts_dir().join("out")).unwrap();
        std::fs::write(sandbox.artifacts_dir().join("out/report.txt"), "ok\n").unwrap();
        let out = dir.join("box.tar.zst");
        export(&root, "box", &out).unwrap();
        (root, out)
    }

    /// Every raw entry of a bundle: (type, name, data).
    fn unpack_raw(path: &Path) -> Vec<(tar::EntryType, Vec<u8>, Vec<u8>)> {
        let decoder = zstd::stream::read::Decoder::new(File::open(path).unwrap()).unwrap();
        let mut archive = tar::Archive::new(decoder);
        let mut out = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            out.push((entry.header().entry_type(), entry.path_bytes().into_owned(), data));
        }
        out
    }

    /// Writes entries as given, names unchecked (a hostile bundle's maker
    /// does not ask the tar crate for permission). `size` overrides the
    /// header's size (and no data follows then).
    fn pack_raw(path: &Path, entries: &[(tar::EntryType, Vec<u8>, Vec<u8>)], size: Option<(usize, u64)>) {
        let file = File::create(path).unwrap();
        let encoder = zstd::stream::write::Encoder::new(file, 1).unwrap();
        let mut tar = tar::Builder::new(encoder);
        for (i, (kind, name, data)) in entries.iter().enumerate() {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_mode(0o644);
            h.set_entry_type(*kind);
            if *kind == tar::EntryType::Symlink {
                h.set_link_name("/etc/passwd").unwrap();
            }
            match size {
                Some((at, claimed)) if at == i => {
                    h.set_size(claimed);
                    h.set_cksum();
                    tar.get_mut().write_all(h.as_bytes()).unwrap();
                }
                _ => {
                    h.set_size(data.len() as u64);
                    h.set_cksum();
                    tar.append(&h, &data[..]).unwrap();
                }
            }
        }
        tar.into_inner().unwrap().finish().unwrap();
    }

    fn refused(path: &Path) -> String {
        match open(path, None) {
            Err(e @ BundleError::Refused { .. }) => e.to_string(),
            other => panic!("not refused: {other:?}"),
        }
    }

    fn tampered(path: &Path) -> String {
        match open(path, None) {
            Err(e @ BundleError::Tampered { .. }) => e.to_string(),
            other => panic!("not found tampered: {other:?}"),
        }
    }

    #[test]
    fn an_export_verifies_without_its_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (root, out) = exported(dir.path());
        let key = public_key_text(&host_key(&root).unwrap());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.path().join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(root.path()).unwrap();

        let opened = open(&out, Some(&key)).unwrap();
        assert_eq!(opened.signer, key);
        assert_eq!(opened.manifest.sandbox, "box");
        let names: Vec<String> =
            opened.manifest.members.iter().map(|m| m.path.to_string_lossy().into_owned()).collect();
        for want in ["audit.jsonl", "audit.head", "net.jsonl", "logs/stdout.log", "artifacts/out/report.txt"]
        {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        let chain = opened.chain.unwrap();
        assert_eq!(chain.verdict, Verdict::Intact, "{chain:#?}");
        assert_eq!(chain.last_seq, Some(2));
        assert!(chain.anchors.iter().any(|a| a.source == AnchorSource::Bundle && a.held));
        // Another key is not the one required.
        let other = format!("ed25519:{}", "ab".repeat(32));
        assert!(matches!(open(&out, Some(&other)), Err(BundleError::Tampered { .. })));
    }

    #[test]
    fn a_changed_member_or_signature_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let (_root, out) = exported(dir.path());
        let entries = unpack_raw(&out);
        let changed = dir.path().join("changed.tar.zst");

        let mut e = entries.clone();
        let at = e.iter().position(|(_, n, _)| n == b"logs/stdout.log").unwrap();
        e[at].2 = b"bUilt\n".to_vec();
        pack_raw(&changed, &e, None);
        assert!(tampered(&changed).contains("logs/stdout.log does not match its SHA-256"));

        // The audit log edited and its hash in the manifest changed to
        // match: the signature no longer holds.
        let mut e = entries.clone();
        let manifest = String::from_utf8(e[0].2.clone()).unwrap();
        e[0].2 = manifest.replace("\"box\"", "\"other\"").into_bytes();
        pack_raw(&changed, &e, None);
        assert!(tampered(&changed).contains("signature is not valid"), "{}", tampered(&changed));

        // A signature by another key of the same manifest, with the key
        // swapped in it: valid, but by whom is reported, and --key refuses.
        let mut e = entries.clone();
        let sig = String::from_utf8(e[1].2.clone()).unwrap();
        let flipped = sig.replacen("\"signature\": \"", "\"signature\": \"00", 1);
        e[1].2 = flipped.into_bytes();
        pack_raw(&changed, &e, None);
        assert!(matches!(open(&changed, None), Err(BundleError::Tampered { .. })));

        // A member removed.
        let mut e = entries.clone();
        e.retain(|(_, n, _)| n != b"net.jsonl");
        pack_raw(&changed, &e, None);
        assert!(tampered(&changed).contains("net.jsonl, listed in the manifest, is missing"));
    }

    #[test]
    fn hostile_bundles_are_refused_not_unpacked() {
        let dir = tempfile::tempdir().unwrap();
        let (_root, out) = exported(dir.path());
        let entries = unpack_raw(&out);
        let hostile = dir.path().join("hostile.tar.zst");
        let regular = tar::EntryType::Regular;

        let mut e = entries.clone();
        e.push((regular, b"../../etc/cron.d/evil".to_vec(), b"* * * * * root sh\n".to_vec()));
        pack_raw(&hostile, &e, None);
        assert!(refused(&hostile).contains("a `.` or `..` in its path"), "{}", refused(&hostile));

        let mut e = entries.clone();
        e.push((regular, b"/etc/evil".to_vec(), Vec::new()));
        pack_raw(&hostile, &e, None);
        assert!(refused(&hostile).contains("an absolute path"));

        let mut e = entries.clone();
        e.insert(2, (tar::EntryType::Symlink, b"artifacts/passwd".to_vec(), Vec::new()));
        pack_raw(&hostile, &e, None);
        assert!(refused(&hostile).contains("is a symbolic link"));

        let mut e = entries.clone();
        e.insert(2, (tar::EntryType::Link, b"artifacts/hard".to_vec(), Vec::new()));
        pack_raw(&hostile, &e, None);
        assert!(refused(&hostile).contains("is a hard link"));

        // A member claiming 100 GiB: refused on its header, nothing read.
        let mut e = entries.clone();
        e.insert(2, (regular, b"logs/stdout.log".to_vec(), Vec::new()));
        pack_raw(&hostile, &e, Some((2, 100 << 30)));
        assert!(refused(&hostile).contains("more than a member may be"), "{}", refused(&hostile));

        // A member the manifest does not list, and many of them.
        let mut e = entries.clone();
        e.push((regular, b"extra".to_vec(), b"x".to_vec()));
        pack_raw(&hostile, &e, None);
        assert!(refused(&hostile).contains("extra is not in the manifest"));
        // Too many members: a manifest (validly signed, by some key) that
        // lists more than a bundle may hold is refused before any of them.
        let key = Ed25519KeyPair::from_pkcs8(
            Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap().as_ref(),
        )
        .unwrap();
        let empty = chain::hex(&chain::sha256(b""));
        let manifest = Manifest {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            sandbox: "many".into(),
            exported_at: crate::now_rfc3339(),
            airlock_version: "0".into(),
            host_key: public_key_text(&key),
            audit_head: None,
            members: (0..MAX_MEMBERS + 1)
                .map(|i| Member { path: format!("m{i}").into(), size: 0, sha256: empty.clone() })
                .collect(),
            notes: vec![],
        };
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let sig = Signature {
            algorithm: "ed25519".into(),
            public_key: chain::hex(key.public_key().as_ref()),
            signature: chain::hex(key.sign(&bytes).as_ref()),
        };
        let e = vec![
            (regular, MANIFEST.as_bytes().to_vec(), bytes),
            (regular, SIGNATURE.as_bytes().to_vec(), serde_json::to_vec(&sig).unwrap()),
        ];
        pack_raw(&hostile, &e, None);
        assert!(refused(&hostile).contains("lists 65537 members, more than 65536"), "{}", refused(&hostile));

        // The manifest first, or nothing.
        let mut e = entries.clone();
        e.swap(0, 1);
        pack_raw(&hostile, &e, None);
        assert!(refused(&hostile).contains("not manifest.json"));
        std::fs::write(&hostile, b"not a bundle").unwrap();
        let why = refused(&hostile);
        assert!(why.contains("damaged") || why.contains("not"), "{why}");
    }
}
