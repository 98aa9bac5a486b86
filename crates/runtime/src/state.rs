//! Sandbox names and state directories.
//!
//! Every sandbox has a name and a directory under the state root
//! (`$AIRLOCK_STATE_DIR`; else `/var/lib/airlock` for root; else
//! `$XDG_STATE_HOME/airlock` or `~/.local/state/airlock`). The root and each
//! sandbox directory are mode 0700. A sandbox directory has a fixed layout:
//!
//! ```text
//! <root>/<name>/
//!   meta.json       SandboxMeta: what was run, how, and how it ended (replaced atomically)
//!   policy.toml     the resolved policy the sandbox ran under
//!   audit.jsonl     the audit trail (see `audit`)
//!   live.lock       flock held by the supervisor for the sandbox's whole life
//!   logs/stdout.log captured output of the command
//!   logs/stderr.log
//!   layer/          mountpoint of the size-limited tmpfs holding upper/ and work/ while running
//!   upper/          the overlay upper layer: everything the sandbox wrote (persisted)
//!   work/           overlayfs work directory
//!   artifacts/      files collected after the run
//! ```
//!
//! `create_sandbox` makes the directory itself plus `logs/` and `artifacts/`;
//! the lifecycle creates the rest when it needs them.
//!
//! Processes inside a sandbox cannot write here, but what they wrote into the
//! upper layer ends up here (symlinks to `/`, mode-000 directories, files of
//! other uids), and a crash can truncate any file. So nothing read back from a
//! sandbox directory is trusted: corrupt metadata is an error naming the file,
//! and `remove_all` never follows a symlink.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use rustix::fs::{
    AtFlags, FileType, FlockOperation, Mode, OFlags, StatxAttributes, StatxFlags, flock, openat, statx,
    unlinkat,
};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::names;

/// Longest sandbox name: short enough for cgroup, hostname and socket paths.
const MAX_NAME_LEN: usize = 63;

/// Why a state directory or one of its files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "invalid sandbox name {name:?}: {reason}; names are 1-63 characters of \
         a-z, 0-9, '_', '.', '-' and start with a letter or digit"
    )]
    InvalidName { name: String, reason: &'static str },
    #[error("cannot choose a state directory: {reason}; set AIRLOCK_STATE_DIR to an absolute path")]
    NoStateRoot { reason: String },
    #[error(
        "could not create state directory {path}: {source}; set AIRLOCK_STATE_DIR to a writable directory"
    )]
    CreateRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "a sandbox named {name} already exists ({path}); choose another name or \
         remove it with `airlock rm {name}`"
    )]
    Exists { name: String, path: PathBuf },
    #[error("no sandbox named {name}; see `airlock ls`")]
    NotFound { name: String },
    #[error("{path} is not a sandbox directory; move it out of the state directory")]
    NotASandbox { path: PathBuf },
    #[error("no unused sandbox name found in {root} after {tries} tries; pass a name explicitly")]
    NamesExhausted { root: PathBuf, tries: u32 },
    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "sandbox metadata {path} is corrupt: {source}; the sandbox cannot be \
         inspected, remove it with `airlock rm`"
    )]
    CorruptMeta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not encode sandbox metadata for {path}: {source}")]
    EncodeMeta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("sandbox {name} is already running (its supervisor holds {path})")]
    Busy { name: String, path: PathBuf },
    #[error(
        "refusing to remove {path}: it is a mount point, and removing through it \
         would delete files outside the sandbox; stop the sandbox or unmount it first"
    )]
    MountPoint { path: PathBuf },
    #[error(
        "{path} was moved or replaced while it was being removed; nothing \
         outside the sandbox directory was touched, run the removal again"
    )]
    ChangedDuringRemoval { path: PathBuf },
    #[error(
        "sandbox name {name:?} is reserved: names of the form u<UID>-… hold the sandboxes the daemon keeps \
         for user {tenant} (each user's names are their own); choose another name"
    )]
    ReservedName { name: String, tenant: u32 },
}

/// The prefix the daemon gives the sandboxes of a user other than root and
/// itself: user 1000's `ci` is stored as `u1000-ci`, so each user's names
/// are their own (`airlock daemon`, docs/api.md "Names").
pub fn tenant_prefix(uid: u32) -> String {
    format!("u{uid}-")
}

/// The user whose daemon namespace `name` is in (`u<UID>-…`), if any.
pub fn tenant_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('u')?;
    let (digits, tail) = rest.split_once('-')?;
    // One spelling per uid: no leading zeros.
    let canonical = !digits.is_empty() && (digits.len() == 1 || !digits.starts_with('0'));
    (canonical && !tail.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())?
}

/// Refuses a name in another user's daemon namespace for a sandbox owned
/// by `owner`: only the daemon creates `u<UID>-…` names, for user UID.
pub fn check_name_owner(name: &str, owner: u32) -> Result<(), StateError> {
    match tenant_of(name) {
        Some(tenant) if tenant != owner => Err(StateError::ReservedName { name: name.to_owned(), tenant }),
        _ => Ok(()),
    }
}

/// The image store's directory in the state root (`image::store`): a name
/// no sandbox may take, and no sandbox's directory.
pub const IMAGE_STORE_DIR: &str = "images";

/// Checks a sandbox name: `[a-z0-9][a-z0-9_.-]{0,62}`. Names become path
/// components, cgroup names and hostnames, so the alphabet is deliberately
/// small.
pub fn validate_name(name: &str) -> Result<(), StateError> {
    let invalid = |reason| Err(StateError::InvalidName { name: name.to_owned(), reason });
    let Some(&first) = name.as_bytes().first() else {
        return invalid("it is empty");
    };
    if name.len() > MAX_NAME_LEN {
        return invalid("it is longer than 63 characters");
    }
    if name.contains('/') {
        return invalid("it contains '/'");
    }
    if name == "." || name == ".." {
        return invalid("it is a relative path component");
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return invalid("it must start with a lowercase letter or a digit");
    }
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b);
    if !name.bytes().all(allowed) {
        return invalid("it contains a character other than a-z, 0-9, '_', '.', '-'");
    }
    if name == IMAGE_STORE_DIR {
        return invalid("it is the image store's directory in the state directory");
    }
    Ok(())
}

/// The directory holding one subdirectory per sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRoot {
    path: PathBuf,
}

impl StateRoot {
    /// The state root for this process (see the module comment for the
    /// order), created with mode 0700 if missing.
    pub fn from_env() -> Result<StateRoot, StateError> {
        let is_root = rustix::process::geteuid().is_root();
        let path = default_root(|var| std::env::var_os(var), is_root)?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(|source| StateError::CreateRoot { path: path.clone(), source })?;
        Ok(StateRoot { path })
    }

    /// A state root at an explicit path (tests, the daemon's configuration).
    /// Nothing is created until a sandbox is.
    pub fn at(path: PathBuf) -> StateRoot {
        StateRoot { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the directory of a new sandbox. With `None` a name is
    /// generated, retrying until one is unused. The `mkdir` is the claim: two
    /// concurrent creations of one name cannot both succeed.
    pub fn create_sandbox(&self, name: Option<&str>) -> Result<SandboxDir, StateError> {
        if let Some(name) = name {
            validate_name(name)?;
            return self.claim(name);
        }
        const TRIES: u32 = 64;
        for attempt in 0..TRIES {
            // After many collisions the plain names are nearly used up: add a
            // number, which makes a further collision vanishingly unlikely.
            let candidate = if attempt < TRIES / 2 {
                names::generate()
            } else {
                format!("{}-{}", names::generate(), names::random_u32() % 10_000)
            };
            match self.claim(&candidate) {
                Err(StateError::Exists { .. }) => continue,
                other => return other,
            }
        }
        Err(StateError::NamesExhausted { root: self.path.clone(), tries: TRIES })
    }

    /// An existing sandbox by name.
    pub fn open(&self, name: &str) -> Result<SandboxDir, StateError> {
        validate_name(name)?;
        let path = self.path.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => Ok(SandboxDir { name: name.to_owned(), path, durable: true }),
            Ok(_) => Err(StateError::NotASandbox { path }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StateError::NotFound { name: name.to_owned() })
            }
            Err(source) => Err(StateError::Io { action: "inspect", path, source }),
        }
    }

    /// All sandboxes, oldest first. Entries that are not sandbox directories
    /// are skipped with a warning (plain files only at debug level, so the
    /// daemon can keep its own files in the root without noise).
    pub fn list(&self) -> Result<Vec<SandboxDir>, StateError> {
        let entries = match std::fs::read_dir(&self.path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Io { action: "list", path: self.path.clone(), source });
            }
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|source| StateError::Io { action: "list", path: self.path.clone(), source })?;
            let path = entry.path();
            let file_name = entry.file_name();
            if file_name.as_bytes().starts_with(b".") || file_name == IMAGE_STORE_DIR {
                continue;
            }
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                // Removed between readdir and stat: a concurrent `rm`.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable entry in state directory");
                    continue;
                }
            };
            if meta.is_file() {
                tracing::debug!(path = %path.display(), "skipping file in state directory");
                continue;
            }
            let name = match file_name.to_str() {
                Some(name) if meta.is_dir() && validate_name(name).is_ok() => name.to_owned(),
                _ => {
                    tracing::warn!(path = %path.display(), "skipping entry in state directory: not a sandbox directory");
                    continue;
                }
            };
            // Birth time where the filesystem records it; the mtime of a
            // sandbox directory changes rarely (only when top-level entries
            // are added), so it is a fair stand-in.
            let created = meta.created().or_else(|_| meta.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((created, SandboxDir { name, path, durable: true }));
        }
        found.sort_by(|(ta, a), (tb, b)| ta.cmp(tb).then_with(|| a.name.cmp(&b.name)));
        Ok(found.into_iter().map(|(_, dir)| dir).collect())
    }

    fn claim(&self, name: &str) -> Result<SandboxDir, StateError> {
        let path = self.path.join(name);
        match DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StateError::Exists { name: name.to_owned(), path });
            }
            Err(source) => {
                return Err(StateError::Io { action: "create sandbox directory", path, source });
            }
        }
        let dir = SandboxDir { name: name.to_owned(), path, durable: true };
        for sub in [dir.path.join("logs"), dir.artifacts_dir()] {
            if let Err(source) = DirBuilder::new().mode(0o700).create(&sub) {
                if let Err(cleanup) = dir.remove_all() {
                    tracing::warn!(path = %dir.path.display(), error = %cleanup, "could not remove half-created sandbox directory");
                }
                return Err(StateError::Io { action: "create", path: sub, source });
            }
        }
        Ok(dir)
    }
}

/// The state root from the environment; a pure function so the order can be
/// tested without touching the process environment.
fn default_root(var: impl Fn(&str) -> Option<OsString>, is_root: bool) -> Result<PathBuf, StateError> {
    let nonempty = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = nonempty("AIRLOCK_STATE_DIR") {
        if !dir.is_absolute() {
            return Err(StateError::NoStateRoot {
                reason: format!("AIRLOCK_STATE_DIR={} is not absolute", dir.display()),
            });
        }
        return Ok(dir);
    }
    if is_root {
        return Ok(PathBuf::from("/var/lib/airlock"));
    }
    // The XDG spec says to ignore a relative XDG_STATE_HOME.
    if let Some(dir) = nonempty("XDG_STATE_HOME").filter(|d| d.is_absolute()) {
        return Ok(dir.join("airlock"));
    }
    match nonempty("HOME").filter(|d| d.is_absolute()) {
        Some(home) => Ok(home.join(".local/state/airlock")),
        None => Err(StateError::NoStateRoot {
            reason: "neither XDG_STATE_HOME nor HOME is set to an absolute path".to_owned(),
        }),
    }
}

/// Everything known about a sandbox outside its own files; `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxMeta {
    pub name: String,
    /// RFC 3339, UTC (see `audit::rfc3339_utc`).
    pub created_at: String,
    /// Name of the policy (profile) the sandbox was created with.
    pub policy: String,
    #[serde(with = "crate::audit::path_repr::option")]
    pub workspace: Option<PathBuf>,
    pub workspace_mode: String,
    pub command: Vec<String>,
    pub state: SandboxState,
    pub supervisor_pid: Option<i32>,
    /// The host uid that root inside the sandbox is: the first id of its
    /// id block as root, the calling user's uid rootless.
    pub host_uid: Option<u32>,
    /// As root: the host id block the sandbox holds until it is removed
    /// (see `idblocks`).
    #[serde(default)]
    pub id_block: Option<u32>,
    /// cgroup path, when the sandbox got one.
    pub cgroup: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit: Option<ExitInfo>,
    pub applied_at: Option<String>,
    /// Features the sandbox ran without because the policy allowed it and
    /// the host lacked them, e.g. "cgroups".
    pub degraded: Vec<String>,
    /// Who asked for the sandbox (the daemon's tenancy is by uid).
    #[serde(default)]
    pub owner_uid: Option<u32>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Long-lived sandboxes: when the supervisor stops it (Unix seconds),
    /// and after how long without an exec it stops on its own.
    #[serde(default)]
    pub deadline_unix: Option<u64>,
    #[serde(default)]
    pub idle_timeout_secs: Option<u64>,
    /// The isolation tier it runs on (`process` for metadata written
    /// before there was a choice).
    #[serde(default = "process_tier")]
    pub tier: airlock_policy::Tier,
    /// Published ports (`create -p`), while and after it ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<crate::ports::PortMapping>,
    /// The OCI image its root came from: the reference and the manifest
    /// digest it resolved to (what `image prune` keeps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::image::ImageMeta>,
    /// The host's socket into its microVM's container engine, served by
    /// its supervisor while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers_socket: Option<PathBuf>,
}

fn process_tier() -> airlock_policy::Tier {
    airlock_policy::Tier::Process
}

/// Where a sandbox is in its life. Written as a lowercase string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxState {
    Creating,
    Running,
    /// The command ended (by itself, by a signal or by a time limit).
    Exited,
    /// airlock itself failed; the command may never have run.
    Failed,
    /// A long-lived sandbox that was stopped (by request, deadline or idleness).
    Stopped,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub oom_killed: bool,
}

/// One sandbox's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxDir {
    name: String,
    path: PathBuf,
    /// Whether its `meta.json` is forced to disk at each change: not for a
    /// sandbox removed when it ends ([`SandboxDir::removed_when_it_ends`]).
    durable: bool,
}

/// Distinguishes temp files of concurrent `write_meta` calls in one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl SandboxDir {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta_path(&self) -> PathBuf {
        self.path.join("meta.json")
    }

    pub fn policy_path(&self) -> PathBuf {
        self.path.join("policy.toml")
    }

    pub fn audit_path(&self) -> PathBuf {
        self.path.join("audit.jsonl")
    }

    /// The unified diff with the secrets' values redacted, kept at finalize
    /// for a sandbox whose policy has secrets (what an export carries).
    pub fn redacted_patch_path(&self) -> PathBuf {
        self.path.join("diff.patch")
    }

    pub fn stdout_log(&self) -> PathBuf {
        self.path.join("logs/stdout.log")
    }

    pub fn stderr_log(&self) -> PathBuf {
        self.path.join("logs/stderr.log")
    }

    pub fn layer_dir(&self) -> PathBuf {
        self.path.join("layer")
    }

    pub fn upper_dir(&self) -> PathBuf {
        self.path.join("upper")
    }

    pub fn work_dir(&self) -> PathBuf {
        self.path.join("work")
    }

    pub fn artifacts_dir(&self) -> PathBuf {
        self.path.join("artifacts")
    }

    fn live_lock_path(&self) -> PathBuf {
        self.path.join("live.lock")
    }

    pub fn read_meta(&self) -> Result<SandboxMeta, StateError> {
        let path = self.meta_path();
        let bytes = std::fs::read(&path).map_err(|source| StateError::Io {
            action: "read",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| StateError::CorruptMeta { path, source })
    }

    /// Replaces `meta.json` atomically: readers see the old or the new
    /// content, never a mix, even across a crash (temp file in the same
    /// directory, its data synced, then renamed over the old one).
    ///
    /// The directory is not synced after the rename: that would only make
    /// the newest state survive a power cut, and at the cost of a second
    /// journal commit per write, several per launch. What a power cut can
    /// lose is the latest change, leaving the previous complete version; a
    /// sandbox's processes, cgroup, tmpfs and id block (under /run) are
    /// gone after a reboot whatever it says, and `ls`/`gc` treat a
    /// sandbox that claims to run without a live lock as lost.
    ///
    /// Not synced: a sandbox removed when it ends (see
    /// [`SandboxDir::removed_when_it_ends`]), and the states of a launch
    /// under way (`creating`): a power cut then ends a launch that never
    /// finished, so the worst it can leave is a torn record of a sandbox
    /// that holds nothing yet, which `ls` lists as failed and `rm` removes.
    /// Two syncs, about 2 ms, came off every durable launch; its first
    /// state that matters, `running`, is synced.
    pub fn write_meta(&self, meta: &SandboxMeta) -> Result<(), StateError> {
        self.replace_meta(meta, self.durable && meta.state != SandboxState::Creating)
    }

    /// This sandbox's directory is removed when it ends (`run --rm`), so its
    /// `meta.json` is not forced to disk: readers still see whole versions
    /// (temp file and rename), and what a power cut can cost is only the
    /// record of a sandbox that ended with it (its processes, cgroup and id
    /// block die with the host). Three syncs, about 2 ms, came off every
    /// `run --rm` (bench/README.md). A sandbox kept for review, whose layer
    /// holds work to apply, stays durable.
    pub fn removed_when_it_ends(self) -> SandboxDir {
        SandboxDir { durable: false, ..self }
    }

    fn replace_meta(&self, meta: &SandboxMeta, sync: bool) -> Result<(), StateError> {
        let path = self.meta_path();
        let mut bytes = serde_json::to_vec_pretty(meta)
            .map_err(|source| StateError::EncodeMeta { path: path.clone(), source })?;
        bytes.push(b'\n');
        let tmp = self.path.join(format!(
            ".meta.json.{}.{}.tmp",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let io_err = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { action, path, source }
        };
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(OFlags::NOFOLLOW.bits() as i32)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            file.write_all(&bytes).map_err(io_err("write", &tmp))?;
            if sync {
                file.sync_data().map_err(io_err("sync", &tmp))?;
            }
            std::fs::rename(&tmp, &path).map_err(io_err("replace", &path))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Takes the live lock, held by the supervisor for the sandbox's whole
    /// life. The kernel drops it when the returned guard is dropped or the
    /// process dies, so a crashed supervisor never leaves a sandbox looking
    /// alive. Fails with `Busy` if another supervisor holds it.
    pub fn lock_live(&self) -> Result<LiveLock, StateError> {
        let path = self.live_lock_path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .map_err(|source| StateError::Io { action: "open", path: path.clone(), source })?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(LiveLock { _file: file, path }),
            Err(Errno::WOULDBLOCK) => Err(StateError::Busy { name: self.name.clone(), path }),
            Err(e) => Err(StateError::Io { action: "lock", path, source: e.into() }),
        }
    }

    /// Whether some process holds the live lock, i.e. the sandbox has a
    /// supervisor. A lock taken by this process through another `open` also
    /// counts (flock locks belong to open file descriptions). When the lock
    /// file cannot be examined the answer is `false`, with a warning.
    pub fn is_live(&self) -> bool {
        let path = self.live_lock_path();
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot check whether sandbox is live");
                return false;
            }
        };
        // A shared probe conflicts only with the supervisor's exclusive lock,
        // so two concurrent `is_live` calls cannot see each other.
        match flock(&file, FlockOperation::NonBlockingLockShared) {
            Ok(()) => false, // released when `file` closes
            Err(Errno::WOULDBLOCK) => true,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot check whether sandbox is live");
                false
            }
        }
    }

    /// Deletes the sandbox directory and everything in it without following
    /// a single symlink: links are removed, never their targets. Directories
    /// lacking owner rwx are chmod-ed before descending; files of other uids
    /// are fine for root. Refuses to descend into a mount point, so a mount
    /// left behind cannot lead the removal outside the sandbox. Walks with
    /// one directory fd at a time (climbing back with `..`, checked against
    /// the inode it left), so arbitrarily deep trees cost no stack and no fd
    /// table.
    pub fn remove_all(&self) -> Result<(), StateError> {
        let (parent, leaf) = match (self.path.parent(), self.path.file_name()) {
            (Some(parent), Some(leaf)) => (parent, leaf),
            _ => {
                return Err(StateError::NotASandbox { path: self.path.clone() });
            }
        };
        let parent_fd =
            rustix::fs::open(parent, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                .map_err(|e| io_at("open", parent, e))?;
        let leaf =
            CString::new(leaf.as_bytes()).map_err(|_| StateError::NotASandbox { path: self.path.clone() })?;
        let top = match stat_at(&parent_fd, &leaf) {
            Ok(top) => top,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(io_at("inspect", &self.path, e)),
        };
        if top.file_type != FileType::Directory {
            return unlinkat(&parent_fd, &leaf, AtFlags::empty()).map_err(|e| io_at("remove", &self.path, e));
        }
        if top.mount_root {
            return Err(StateError::MountPoint { path: self.path.clone() });
        }
        remove_tree(&parent_fd, &leaf, top, &self.path)
    }

    /// Bytes allocated to everything in the directory, like `du`: symlinks
    /// count as themselves, hard links once. Best effort: entries that cannot
    /// be read are left out rather than failing a listing.
    pub fn disk_usage(&self) -> u64 {
        let mut total = 0u64;
        let mut seen_links = std::collections::HashSet::new();
        let mut pending = vec![self.path.clone()];
        while let Some(path) = pending.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.nlink() > 1 && !meta.is_dir() && !seen_links.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total = total.saturating_add(meta.blocks().saturating_mul(512));
            if !meta.is_dir() {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.flatten().map(|e| e.path()));
            }
        }
        total
    }
}

/// Proof that this process is the sandbox's supervisor; dropping it (or
/// dying) ends the claim.
#[derive(Debug)]
pub struct LiveLock {
    _file: File,
    path: PathBuf,
}

impl LiveLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What `remove_tree` needs to know about an entry, from one `statx`.
#[derive(Clone, Copy)]
struct EntryStat {
    file_type: FileType,
    perm: u32,
    dev: (u32, u32),
    ino: u64,
    mount_root: bool,
}

impl EntryStat {
    fn from_statx(st: &rustix::fs::Statx) -> EntryStat {
        let mode = u32::from(st.stx_mode);
        EntryStat {
            file_type: FileType::from_raw_mode(mode),
            perm: mode & 0o7777,
            dev: (st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            mount_root: st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
                && st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT),
        }
    }
}

fn stat_at(dir: impl AsFd, name: &CStr) -> Result<EntryStat, Errno> {
    statx(dir, name, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::BASIC_STATS).map(|st| EntryStat::from_statx(&st))
}

fn stat_fd(fd: impl AsFd) -> Result<EntryStat, Errno> {
    statx(fd, c"", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS).map(|st| EntryStat::from_statx(&st))
}

/// One directory on the way down: its name in its parent, its identity (to
/// verify the climb back up) and the subdirectories still to remove.
struct Frame {
    name: CString,
    dev: (u32, u32),
    ino: u64,
    subdirs: Vec<CString>,
}

fn remove_tree(parent_fd: &OwnedFd, leaf: &CStr, top: EntryStat, top_path: &Path) -> Result<(), StateError> {
    let mut cur = open_dir_for_removal(parent_fd, leaf, top, top_path)?;
    let mut stack = vec![Frame { name: leaf.to_owned(), dev: top.dev, ino: top.ino, subdirs: Vec::new() }];
    let path_of = |stack: &[Frame]| -> PathBuf {
        let mut path = top_path.to_path_buf();
        for frame in stack.iter().skip(1) {
            path.push(OsStr::from_bytes(frame.name.as_bytes()));
        }
        path
    };
    stack[0].subdirs = clear_files(&cur, top.dev, top_path)?;
    loop {
        let Some(frame) = stack.last_mut() else {
            return Ok(());
        };
        if let Some(child) = frame.subdirs.pop() {
            let child_path = path_of(&stack).join(OsStr::from_bytes(child.as_bytes()));
            let st = stat_at(&cur, &child).map_err(|e| io_at("inspect", &child_path, e))?;
            if st.file_type != FileType::Directory {
                return Err(StateError::ChangedDuringRemoval { path: child_path });
            }
            if st.mount_root || st.dev != top.dev {
                return Err(StateError::MountPoint { path: child_path });
            }
            cur = open_dir_for_removal(&cur, &child, st, &child_path)?;
            let subdirs = clear_files(&cur, top.dev, &child_path)?;
            stack.push(Frame { name: child, dev: st.dev, ino: st.ino, subdirs });
            continue;
        }
        // `cur` is now empty: climb to its parent and remove it there.
        let done_path = path_of(&stack);
        let Some(done) = stack.pop() else {
            return Ok(());
        };
        let Some(parent) = stack.last() else {
            drop(cur);
            return unlinkat(parent_fd, &done.name, AtFlags::REMOVEDIR)
                .map_err(|e| io_at("remove", &done_path, e));
        };
        let up = openat(
            &cur,
            c"..",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_at("open parent of", &done_path, e))?;
        let up_st = stat_fd(&up).map_err(|e| io_at("inspect parent of", &done_path, e))?;
        if (up_st.dev, up_st.ino) != (parent.dev, parent.ino) {
            return Err(StateError::ChangedDuringRemoval { path: done_path });
        }
        unlinkat(&up, &done.name, AtFlags::REMOVEDIR).map_err(|e| io_at("remove", &done_path, e))?;
        cur = up;
    }
}

/// Unlinks every non-directory in `dir` and returns the names of its
/// subdirectories. Names are collected before anything is unlinked so the
/// directory is not modified under an open `readdir`.
fn clear_files(dir: &OwnedFd, dev: (u32, u32), path: &Path) -> Result<Vec<CString>, StateError> {
    let mut entries = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir).map_err(|e| io_at("read", path, e))? {
        let entry = entry.map_err(|e| io_at("read", path, e))?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        entries.push(name.to_owned());
    }
    let mut subdirs = Vec::new();
    for name in entries {
        let entry_path = || path.join(OsStr::from_bytes(name.as_bytes()));
        let st = match stat_at(dir, &name) {
            Ok(st) => st,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(io_at("inspect", &entry_path(), e)),
        };
        if st.file_type == FileType::Directory {
            if st.mount_root || st.dev != dev {
                return Err(StateError::MountPoint { path: entry_path() });
            }
            subdirs.push(name);
        } else {
            match unlinkat(dir, &name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(io_at("remove", &entry_path(), e)),
            }
        }
    }
    Ok(subdirs)
}

/// Opens directory `name` in `parent` for listing and unlinking, never
/// through a symlink. A directory without owner rwx (overlayfs leaves
/// `work/work` at mode 000; a sandbox can chmod its own directories to 0)
/// is first given u+rwx, through an `O_PATH` descriptor of that very
/// directory so the chmod cannot land on a symlink's target.
fn open_dir_for_removal(
    parent: &OwnedFd,
    name: &CStr,
    st: EntryStat,
    path: &Path,
) -> Result<OwnedFd, StateError> {
    let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if st.perm & 0o700 != 0o700 {
        let handle =
            openat(parent, name, flags | OFlags::PATH, Mode::empty()).map_err(|e| io_at("open", path, e))?;
        let proc_path = format!("/proc/self/fd/{}", handle.as_raw_fd());
        let mode = Mode::from_raw_mode(st.perm | 0o700);
        rustix::fs::chmod(proc_path.as_str(), mode).map_err(|e| io_at("chmod u+rwx", path, e))?;
        return openat(&handle, c".", flags | OFlags::RDONLY, Mode::empty())
            .map_err(|e| io_at("open", path, e));
    }
    openat(parent, name, flags | OFlags::RDONLY, Mode::empty()).map_err(|e| io_at("open", path, e))
}

fn io_at(action: &'static str, path: &Path, errno: Errno) -> StateError {
    StateError::Io { action, path: path.to_path_buf(), source: errno.into() }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::time::Duration;

    /// Root-only tests return early (with a note) unless CI=true demands them.
    fn have_root(test: &str) -> bool {
        if rustix::process::geteuid().is_root() {
            return true;
        }
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{test} needs root and CI=true");
        eprintln!("skipping {test}: needs root");
        false
    }

    fn sample_meta(name: &str) -> SandboxMeta {
        SandboxMeta {
            name: name.into(),
            created_at: crate::audit::rfc3339_utc(SystemTime::now()),
            policy: "local-dev".into(),
            workspace: Some("/src/app".into()),
            workspace_mode: "overlay".into(),
            command: vec!["make".into(), "test".into()],
            state: SandboxState::Running,
            supervisor_pid: Some(42),
            host_uid: Some(1000),
            id_block: None,
            cgroup: None,
            started_at: None,
            finished_at: None,
            exit: Some(ExitInfo { code: Some(0), signal: None, timed_out: false, oom_killed: false }),
            applied_at: None,
            degraded: vec!["cgroups".into()],
            owner_uid: None,
            labels: Default::default(),
            deadline_unix: None,
            idle_timeout_secs: None,
            tier: airlock_policy::Tier::Process,
            ports: Vec::new(),
            image: None,
            containers_socket: None,
        }
    }

    fn root() -> (tempfile::TempDir, StateRoot) {
        let tmp = tempfile::tempdir().unwrap();
        let root = StateRoot::at(tmp.path().join("state"));
        std::fs::create_dir(root.path()).unwrap();
        (tmp, root)
    }

    #[test]
    fn name_rules() {
        for ok in ["a", "brave-otter", "0", "x.y_z-1", &"a".repeat(63)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".", "..", ".hidden", "-flag", "_x", "a/b", "Upper", "sp ace", "ü", &"a".repeat(64)]
        {
            let err = validate_name(bad).unwrap_err();
            assert!(matches!(err, StateError::InvalidName { .. }), "{bad:?}");
            assert!(err.to_string().contains("a-z, 0-9"), "{err}");
        }
        let err = validate_name(IMAGE_STORE_DIR).unwrap_err();
        assert!(err.to_string().contains("image store"), "{err}");
    }

    #[test]
    fn state_root_order() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v))
        };
        let all = env(&[
            ("AIRLOCK_STATE_DIR", "/srv/airlock"),
            ("XDG_STATE_HOME", "/home/u/.state"),
            ("HOME", "/home/u"),
        ]);
        assert_eq!(default_root(all, false).unwrap(), Path::new("/srv/airlock"));
        assert_eq!(default_root(all, true).unwrap(), Path::new("/srv/airlock"));
        let user = env(&[("XDG_STATE_HOME", "/home/u/.state"), ("HOME", "/home/u")]);
        assert_eq!(default_root(user, true).unwrap(), Path::new("/var/lib/airlock"));
        assert_eq!(default_root(user, false).unwrap(), Path::new("/home/u/.state/airlock"));
        let relative_xdg = env(&[("XDG_STATE_HOME", "state"), ("HOME", "/home/u")]);
        assert_eq!(default_root(relative_xdg, false).unwrap(), Path::new("/home/u/.local/state/airlock"));
        let empty = env(&[("AIRLOCK_STATE_DIR", ""), ("HOME", "/home/u")]);
        assert_eq!(default_root(empty, false).unwrap(), Path::new("/home/u/.local/state/airlock"));
        let relative = env(&[("AIRLOCK_STATE_DIR", "state")]);
        let err = default_root(relative, true).unwrap_err();
        assert!(err.to_string().contains("AIRLOCK_STATE_DIR"), "{err}");
        assert!(default_root(env(&[]), false).is_err());
    }

    #[test]
    fn create_open_and_collide() {
        let (_tmp, root) = root();
        let dir = root.create_sandbox(Some("brave-otter")).unwrap();
        assert_eq!(dir.name(), "brave-otter");
        assert_eq!(dir.path(), root.path().join("brave-otter"));
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(dir.stdout_log().parent().unwrap().is_dir());
        assert!(dir.artifacts_dir().is_dir());

        let err = root.create_sandbox(Some("brave-otter")).unwrap_err();
        assert!(matches!(err, StateError::Exists { .. }), "{err}");
        assert!(matches!(root.create_sandbox(Some("../escape")), Err(StateError::InvalidName { .. })));

        assert_eq!(root.open("brave-otter").unwrap(), dir);
        let err = root.open("calm-heron").unwrap_err();
        assert_eq!(err.to_string(), "no sandbox named calm-heron; see `airlock ls`");
        std::fs::write(root.path().join("plain"), b"").unwrap();
        assert!(matches!(root.open("plain"), Err(StateError::NotASandbox { .. })));

        let generated = root.create_sandbox(None).unwrap();
        validate_name(generated.name()).unwrap();
        assert!(generated.path().is_dir());
    }

    #[test]
    fn tenant_names_are_recognised_and_reserved() {
        assert_eq!(tenant_of(&format!("{}ci", tenant_prefix(1000))), Some(1000));
        assert_eq!(tenant_of("u0-x"), Some(0));
        for other in ["ci", "u-x", "ux-1", "u1000", "u1000-", "u01-x", "uu1-x", "u99999999999-x"] {
            assert_eq!(tenant_of(other), None, "{other}");
        }
        assert!(check_name_owner("u1000-ci", 1000).is_ok());
        assert!(check_name_owner("ci", 0).is_ok());
        assert!(matches!(
            check_name_owner("u1000-ci", 0),
            Err(StateError::ReservedName { tenant: 1000, .. })
        ));
    }

    #[test]
    fn generated_names_never_reuse_an_existing_sandbox() {
        let (_tmp, root) = root();
        let mut names = std::collections::HashSet::new();
        for _ in 0..300 {
            let dir = root.create_sandbox(None).unwrap();
            assert!(names.insert(dir.name().to_owned()), "{} reused", dir.name());
        }
    }

    #[test]
    fn list_is_oldest_first_and_skips_junk() {
        let (_tmp, root) = root();
        for name in ["zeta", "alpha", "mid"] {
            root.create_sandbox(Some(name)).unwrap();
            // Birth/modification times have coarse granularity on some
            // filesystems; keep the creations apart.
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(root.path().join("airlock.db"), b"").unwrap();
        std::fs::create_dir(root.path().join("Not-Valid")).unwrap();
        std::fs::create_dir(root.path().join(".tmp")).unwrap();
        std::fs::create_dir(root.path().join(IMAGE_STORE_DIR)).unwrap();
        symlink("/", root.path().join("link")).unwrap();
        let names: Vec<String> = root.list().unwrap().iter().map(|d| d.name().to_owned()).collect();
        assert_eq!(names, ["zeta", "alpha", "mid"]);
        assert!(StateRoot::at(root.path().join("missing")).list().unwrap().is_empty());
    }

    #[test]
    fn meta_round_trip_and_layout() {
        let (_tmp, root) = root();
        let dir = root.create_sandbox(Some("m")).unwrap();
        let meta = sample_meta("m");
        dir.write_meta(&meta).unwrap();
        assert_eq!(dir.read_meta().unwrap(), meta);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.meta_path()).unwrap()).unwrap();
        assert_eq!(json["state"], "running");
        assert_eq!(json["exit"]["code"], 0);
        // Only meta.json was added: no temp file is left behind.
        let mut entries: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        entries.sort();
        assert_eq!(entries, ["artifacts", "logs", "meta.json"]);
        for (path, leaf) in [
            (dir.policy_path(), "policy.toml"),
            (dir.audit_path(), "audit.jsonl"),
            (dir.stderr_log(), "logs/stderr.log"),
            (dir.layer_dir(), "layer"),
            (dir.upper_dir(), "upper"),
            (dir.work_dir(), "work"),
        ] {
            assert_eq!(path, dir.path().join(leaf));
        }
    }

    #[test]
    fn meta_writes_are_atomic_for_concurrent_readers_synced_or_not() {
        let (_tmp, root) = root();
        let durable = root.create_sandbox(Some("atomic")).unwrap();
        // Skipping the sync must not skip the temp file and rename.
        let transient = root.create_sandbox(Some("transient")).unwrap().removed_when_it_ends();
        for dir in [durable, transient] {
            dir.write_meta(&sample_meta(dir.name())).unwrap();
            let writer_dir = dir.clone();
            let writer = std::thread::spawn(move || {
                for i in 0..200 {
                    let mut meta = sample_meta(writer_dir.name());
                    // Vary the size so a torn write would show as bad JSON.
                    meta.command = vec!["x".repeat(i * 37 % 5000)];
                    writer_dir.write_meta(&meta).unwrap();
                }
            });
            let mut reads = 0;
            while !writer.is_finished() {
                dir.read_meta().unwrap();
                reads += 1;
            }
            writer.join().unwrap();
            assert!(reads > 0);
            assert_eq!(dir.read_meta().unwrap().command, vec!["x".repeat(199 * 37 % 5000)]);
        }
    }

    #[test]
    fn corrupt_or_truncated_meta_is_an_error_naming_the_file() {
        let (_tmp, root) = root();
        let dir = root.create_sandbox(Some("c")).unwrap();
        dir.write_meta(&sample_meta("c")).unwrap();
        let full = std::fs::read(dir.meta_path()).unwrap();
        std::fs::write(dir.meta_path(), &full[..full.len() / 2]).unwrap();
        let err = dir.read_meta().unwrap_err();
        assert!(matches!(err, StateError::CorruptMeta { .. }), "{err}");
        assert!(err.to_string().contains(&*dir.meta_path().to_string_lossy()), "{err}");
        std::fs::write(dir.meta_path(), b"\0\xff garbage").unwrap();
        assert!(matches!(dir.read_meta(), Err(StateError::CorruptMeta { .. })));
        std::fs::remove_file(dir.meta_path()).unwrap();
        assert!(matches!(dir.read_meta(), Err(StateError::Io { .. })));
    }

    #[test]
    fn live_lock_is_seen_from_another_open_file_description() {
        let (_tmp, root) = root();
        let dir = root.create_sandbox(Some("live")).unwrap();
        assert!(!dir.is_live());
        let lock = dir.lock_live().unwrap();
        assert!(dir.is_live());
        assert!(dir.is_live(), "probing must not disturb the holder");
        let err = dir.lock_live().unwrap_err();
        assert!(matches!(err, StateError::Busy { .. }), "{err}");
        assert_eq!(lock.path(), dir.path().join("live.lock"));
        drop(lock);
        assert!(!dir.is_live());
        let _again = dir.lock_live().unwrap();
    }

    #[test]
    fn live_lock_held_by_another_process_ends_with_it() {
        let (_tmp, root) = root();
        let dir = root.create_sandbox(Some("child")).unwrap();
        let lock_path = dir.path().join("live.lock");
        // The shell opens the lock file as fd 9, flock(1) locks that open
        // file description, and `exec sleep` keeps it: the lock lives exactly
        // as long as the child process.
        let mut child = match std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"exec 9<>"$1" && flock --exclusive 9 && exec sleep 30"#)
            .arg("sh")
            .arg(&lock_path)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                eprintln!("skipping: cannot run sh: {e}");
                return;
            }
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !dir.is_live() {
            assert!(std::time::Instant::now() < deadline, "child never took the lock");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(matches!(dir.lock_live(), Err(StateError::Busy { .. })));
        child.kill().unwrap();
        child.wait().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while dir.is_live() {
            assert!(std::time::Instant::now() < deadline, "lock outlived its holder");
            std::thread::sleep(Duration::from_millis(10));
        }
        dir.lock_live().unwrap();
    }

    /// A tree the way a finished sandbox can leave it, plus an outside
    /// directory that the tree points at in every way it can.
    struct Hostile {
        _tmp: tempfile::TempDir,
        dir: SandboxDir,
        outside: PathBuf,
    }

    fn hostile_tree() -> Hostile {
        let (tmp, root) = root();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("precious"), b"keep me").unwrap();
        std::fs::create_dir(outside.join("sub")).unwrap();
        std::fs::write(outside.join("sub/also"), b"keep me too").unwrap();

        let dir = root.create_sandbox(Some("hostile")).unwrap();
        let upper = dir.upper_dir();
        std::fs::create_dir_all(upper.join("src")).unwrap();
        std::fs::write(upper.join("src/main.rs"), b"fn main() {}").unwrap();
        symlink(&outside, upper.join("link-to-dir")).unwrap();
        symlink(outside.join("precious"), upper.join("link-to-file")).unwrap();
        symlink("/", upper.join("link-to-root")).unwrap();
        symlink("../../../../outside", upper.join("src/relative")).unwrap();
        symlink("dangling-target", upper.join("dangling")).unwrap();
        std::fs::hard_link(outside.join("precious"), upper.join("hard")).unwrap();
        rustix::fs::mkfifoat(rustix::fs::CWD, upper.join("fifo").as_path(), Mode::from_raw_mode(0o600))
            .unwrap();
        // Nested mode-000 directories with content, like overlayfs's
        // work/work or a sandbox that chmod-ed its own tree to 0.
        let locked = upper.join("locked");
        std::fs::create_dir_all(locked.join("inner")).unwrap();
        std::fs::write(locked.join("inner/file"), b"x").unwrap();
        symlink(&outside, locked.join("inner/escape")).unwrap();
        std::fs::set_permissions(locked.join("inner"), PermissionsExt::from_mode(0o000)).unwrap();
        std::fs::set_permissions(&locked, PermissionsExt::from_mode(0o000)).unwrap();
        std::fs::create_dir_all(dir.work_dir().join("work")).unwrap();
        std::fs::set_permissions(dir.work_dir().join("work"), PermissionsExt::from_mode(0o000)).unwrap();
        // Read-only file in a read-only directory.
        std::fs::create_dir(upper.join("ro")).unwrap();
        std::fs::write(upper.join("ro/f"), b"").unwrap();
        std::fs::set_permissions(upper.join("ro/f"), PermissionsExt::from_mode(0o400)).unwrap();
        std::fs::set_permissions(upper.join("ro"), PermissionsExt::from_mode(0o500)).unwrap();
        // The outside directory's mode is a canary: a chmod that followed a
        // link would change it.
        std::fs::set_permissions(&outside, PermissionsExt::from_mode(0o555)).unwrap();
        Hostile { _tmp: tmp, dir, outside }
    }

    fn assert_outside_untouched(outside: &Path) {
        assert_eq!(std::fs::read(outside.join("precious")).unwrap(), b"keep me");
        assert_eq!(std::fs::read(outside.join("sub/also")).unwrap(), b"keep me too");
        let mode = std::fs::metadata(outside).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o555, "outside directory was chmod-ed");
    }

    #[test]
    fn remove_all_removes_links_never_their_targets() {
        let h = hostile_tree();
        let usage = h.dir.disk_usage();
        assert!(usage > 0);
        h.dir.remove_all().unwrap();
        assert!(!h.dir.path().exists());
        assert!(std::fs::symlink_metadata(h.dir.path()).is_err());
        assert_outside_untouched(&h.outside);
        // Removing what is already gone is not an error.
        h.dir.remove_all().unwrap();
    }

    /// Env var through which `remove_all_works_unprivileged` hands its tree
    /// to `unprivileged_remove_helper` running in a child process.
    const HELPER_ENV: &str = "AIRLOCK_TEST_REMOVE_SANDBOX";

    #[test]
    fn unprivileged_remove_helper() {
        let Some(target) = std::env::var_os(HELPER_ENV) else {
            return; // only does something when spawned by the test below
        };
        let target = PathBuf::from(target);
        let root = StateRoot::at(target.parent().unwrap().to_path_buf());
        let name = target.file_name().unwrap().to_str().unwrap();
        root.open(name).unwrap().remove_all().unwrap();
    }

    /// As root, mode-000 directories never stop a removal; an ordinary user
    /// needs the chmod. Runs the removal as `nobody` in a child process
    /// (the test binary itself) on a tree `nobody` owns.
    #[test]
    fn remove_all_works_unprivileged() {
        if !have_root("remove_all_works_unprivileged") {
            return;
        }
        const NOBODY: u32 = 65534;
        let h = hostile_tree();
        let top = h._tmp.path().to_path_buf();
        let mut pending = vec![top.clone()];
        while let Some(path) = pending.pop() {
            std::os::unix::fs::lchown(&path, Some(NOBODY), Some(NOBODY)).unwrap();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            }
        }
        // The removal must chmod to get anywhere: prove the tree is locked.
        let locked = h.dir.upper_dir().join("locked");
        assert_eq!(std::fs::metadata(&locked).unwrap().permissions().mode() & 0o777, 0);

        use std::os::unix::process::CommandExt;
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "state::tests::unprivileged_remove_helper", "--nocapture"])
            .env(HELPER_ENV, h.dir.path())
            .uid(NOBODY)
            .gid(NOBODY)
            .status()
            .unwrap();
        assert!(status.success(), "removal as nobody failed: {status}");
        assert!(std::fs::symlink_metadata(h.dir.path()).is_err());
        assert_outside_untouched(&h.outside);
    }

    #[test]
    fn remove_all_handles_trees_deeper_than_path_max() {
        let (_tmp, root) = root();
        let dir = root.create_sandbox(Some("deep")).unwrap();
        let component = c"a-long-directory-name-0123456789";
        let mut fd = rustix::fs::open(dir.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        // 200 × 33 bytes ≈ 6.6 KB, beyond PATH_MAX (4096): only fd-relative
        // operations can reach the bottom.
        for _ in 0..200 {
            rustix::fs::mkdirat(&fd, component, Mode::from_raw_mode(0o700)).unwrap();
            rustix::fs::symlinkat(c"/", &fd, c"root-link").unwrap();
            fd = openat(&fd, component, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        }
        let file =
            openat(&fd, c"bottom", OFlags::WRONLY | OFlags::CREATE, Mode::from_raw_mode(0o600)).unwrap();
        drop(file);
        dir.remove_all().unwrap();
        assert!(!dir.path().exists());
        assert!(root.path().is_dir());
    }

    #[test]
    fn remove_all_refuses_to_cross_mounts() {
        if !have_root("remove_all_refuses_to_cross_mounts") {
            return;
        }
        let h = hostile_tree();
        let layer = h.dir.layer_dir();
        std::fs::create_dir(&layer).unwrap();
        // Mounts made in a private mount namespace of this test thread vanish
        // with it, even if an assertion fails.
        // SAFETY: only CLONE_NEWNS (which implies CLONE_FS) is unshared; the
        // file descriptor table stays shared with the other threads.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }.unwrap();
        rustix::mount::mount_change(
            "/",
            rustix::mount::MountPropagationFlags::REC | rustix::mount::MountPropagationFlags::PRIVATE,
        )
        .unwrap();
        // A bind mount stays on the same device: only the mount-root
        // attribute gives it away.
        rustix::mount::mount_bind(&h.outside, &layer).unwrap();
        let err = h.dir.remove_all().unwrap_err();
        assert!(matches!(err, StateError::MountPoint { .. }), "{err}");
        assert!(err.to_string().contains("layer"), "{err}");
        assert_outside_untouched(&h.outside);

        rustix::mount::unmount(&layer, rustix::mount::UnmountFlags::DETACH).unwrap();
        h.dir.remove_all().unwrap();
        assert!(!h.dir.path().exists());
        assert_outside_untouched(&h.outside);
    }

    #[test]
    fn disk_usage_counts_links_as_themselves() {
        let (tmp, root) = root();
        let big = tmp.path().join("big");
        std::fs::write(&big, vec![1u8; 4 << 20]).unwrap();
        let dir = root.create_sandbox(Some("du")).unwrap();
        let empty = dir.disk_usage();
        std::fs::write(dir.path().join("data"), vec![1u8; 256 << 10]).unwrap();
        std::fs::hard_link(dir.path().join("data"), dir.path().join("data2")).unwrap();
        symlink(&big, dir.path().join("to-big")).unwrap();
        symlink(tmp.path(), dir.path().join("to-tmp")).unwrap();
        let used = dir.disk_usage() - empty;
        assert!(used >= 256 << 10, "{used}");
        assert!(used < 512 << 10, "hard link counted twice or link followed: {used}");
    }
}
