//! Host id blocks: which 65536 host ids a sandbox's user namespace maps to.
//!
//! As root, root inside a sandbox is the first uid of a block of 65536 host
//! ids, block k starting at 1,000,000,000 + 65536·k, for k below 15,000.
//! Two live sandboxes must never share a block: per-uid kernel accounting
//! (descriptors in flight over Unix sockets, pipe buffers, inotify watches,
//! RLIMIT_NPROC) would be shared between them, and one could starve the
//! other. So blocks are allocated, not derived from anything.
//!
//! The registry is host-wide, in `/run/airlock/id-blocks/` (tmpfs: blocks
//! do not outlive a reboot, and neither do the sandboxes using them), so
//! sandboxes of every state root on the host — the daemon's, direct
//! `airlock run`s, tests with their own `AIRLOCK_STATE_DIR` — draw from
//! one pool. One file per taken block, named by its number, says which
//! sandbox directory holds it; every change happens under an exclusive
//! `flock` on `lock` in that directory.
//!
//! A block is held from the sandbox's launch until its directory is
//! removed: a stopped (or failed) sandbox that is kept keeps its block,
//! because the files of its upper layer are owned by ids of that block and
//! `diff`/`apply` still read them; handing those ids to another sandbox
//! would make it the owner of a neighbour's files. An entry whose sandbox
//! directory is gone (removed by hand, a crash between removal and
//! release) is stale and reclaimed by the next allocation or `airlock gc`.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, OFlags, flock};
use serde::{Deserialize, Serialize};

/// Host uid of the first id of block 0.
pub const FIRST_BLOCK_UID: u32 = 1_000_000_000;
/// Ids per block: a whole 16-bit id space inside the sandbox.
pub const BLOCK_SIZE: u32 = 65_536;
/// Number of blocks: the last one ends below 2^31.
pub const BLOCKS: u32 = 15_000;
/// Where the host-wide registry lives.
pub const REGISTRY_DIR: &str = "/run/airlock/id-blocks";
/// For tests only: `FIRST-LAST` restricts allocations to those blocks
/// (inclusive), so that running out can be tested without 15,000
/// sandboxes. The registry stays the host-wide one.
pub const TEST_RANGE_ENV: &str = "AIRLOCK_TEST_ID_BLOCKS";

/// The host uid that root inside a sandbox holding block `index` is.
pub fn first_host_uid(index: u32) -> u32 {
    FIRST_BLOCK_UID + index * BLOCK_SIZE
}

/// The block whose first host uid is `uid`, if it is one.
pub fn index_of_first_uid(uid: u32) -> Option<u32> {
    let offset = uid.checked_sub(FIRST_BLOCK_UID)?;
    (offset % BLOCK_SIZE == 0 && offset / BLOCK_SIZE < BLOCKS).then_some(offset / BLOCK_SIZE)
}

#[derive(Debug, thiserror::Error)]
pub enum IdBlockError {
    #[error(
        "no host id block is free: all {count} blocks of 65536 host ids are held by sandboxes that \
         still exist (registry {dir}). Each sandbox needs a block of its own, and a stopped or failed \
         sandbox keeps its block until it is removed, because its files are owned by those ids. \
         Remove sandboxes you no longer need (`airlock ls`, then `airlock rm NAME…`) and run \
         `airlock gc` to release those whose supervisor died"
    )]
    Exhausted { count: u32, dir: PathBuf },
    #[error("host id block registry: could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{var}={value:?} is not a range FIRST-LAST of block numbers below {BLOCKS} (the variable is for tests only; unset it)"
    )]
    BadTestRange { var: &'static str, value: String },
}

/// What the registry records about a taken block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    /// The sandbox directory holding the block.
    #[serde(with = "crate::audit::path_repr::plain")]
    sandbox: PathBuf,
    /// Identity of that directory when the block was taken: a directory of
    /// the same name made later (the name reused after a removal that never
    /// released its block) is another sandbox.
    dev: u64,
    ino: u64,
    /// Who allocated it, and when (for people reading the registry).
    pid: u32,
    at: String,
}

/// The host-wide registry of id blocks (or one at another place, in unit
/// tests), with the blocks allocations may take.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
    pool: Range<u32>,
}

/// A block taken for a sandbox. Dropped without [`IdBlock::keep`], it is
/// released again: a launch that fails half-way gives its block back.
#[derive(Debug)]
pub struct IdBlock {
    registry: Registry,
    sandbox: PathBuf,
    index: u32,
    kept: bool,
}

impl IdBlock {
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn first_host_uid(&self) -> u32 {
        first_host_uid(self.index)
    }

    /// The sandbox now holds the block until its directory is removed.
    pub fn keep(mut self) -> u32 {
        self.kept = true;
        self.index
    }
}

impl Drop for IdBlock {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if let Err(e) = self.registry.release(&self.sandbox, self.index) {
            tracing::warn!(block = self.index, error = %e, "could not release a host id block; `airlock gc` will");
        }
    }
}

impl Registry {
    /// The host-wide registry, all blocks (or the range [`TEST_RANGE_ENV`]
    /// names).
    pub fn host() -> Result<Registry, IdBlockError> {
        let pool = match std::env::var(TEST_RANGE_ENV) {
            Ok(value) if !value.is_empty() => parse_range(&value)
                .ok_or(IdBlockError::BadTestRange { var: TEST_RANGE_ENV, value: value.clone() })?,
            _ => 0..BLOCKS,
        };
        Ok(Registry { dir: PathBuf::from(REGISTRY_DIR), pool })
    }

    /// A registry in `dir` allocating from `pool` (unit tests).
    pub fn at(dir: PathBuf, pool: Range<u32>) -> Registry {
        Registry { dir, pool }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the lowest free block of the pool for the sandbox whose
    /// directory is `sandbox` (which must exist), reclaiming stale entries
    /// on the way.
    pub fn allocate(&self, sandbox: &Path) -> Result<IdBlock, IdBlockError> {
        let identity = std::fs::symlink_metadata(sandbox).map_err(|source| IdBlockError::Io {
            action: "inspect",
            path: sandbox.to_path_buf(),
            source,
        })?;
        let _lock = self.lock(true)?;
        let mut taken = std::collections::BTreeSet::new();
        for (index, entry) in self.entries()? {
            match entry {
                Some(entry) if is_stale(&entry) => {
                    tracing::info!(block = index, sandbox = %entry.sandbox.display(), "reclaiming the id block of a sandbox that is gone");
                    self.remove_entry(index)?;
                }
                _ => {
                    taken.insert(index);
                }
            }
        }
        let Some(index) = self.pool.clone().find(|i| !taken.contains(i)) else {
            return Err(IdBlockError::Exhausted { count: self.pool.len() as u32, dir: self.dir.clone() });
        };
        let entry = Entry {
            sandbox: sandbox.to_path_buf(),
            dev: identity.dev(),
            ino: identity.ino(),
            pid: std::process::id(),
            at: crate::now_rfc3339(),
        };
        self.write_entry(index, &entry)?;
        Ok(IdBlock { registry: self.clone(), sandbox: sandbox.to_path_buf(), index, kept: false })
    }

    /// Frees block `index` if the sandbox directory `sandbox` holds it;
    /// whether it did. Releasing a block another sandbox holds now (taken
    /// after this one's entry was reclaimed) does nothing.
    pub fn release(&self, sandbox: &Path, index: u32) -> Result<bool, IdBlockError> {
        let Some(_lock) = self.lock_existing()? else { return Ok(false) };
        match self.read_entry(index)? {
            Some(Some(entry)) if entry.sandbox == sandbox => {
                self.remove_entry(index)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Frees every block held by the sandbox directory `sandbox` (for a
    /// sandbox whose metadata does not say which).
    pub fn release_all_of(&self, sandbox: &Path) -> Result<Vec<u32>, IdBlockError> {
        let Some(_lock) = self.lock_existing()? else { return Ok(Vec::new()) };
        let mut freed = Vec::new();
        for (index, entry) in self.entries()? {
            if entry.is_some_and(|e| e.sandbox == sandbox) {
                self.remove_entry(index)?;
                freed.push(index);
            }
        }
        Ok(freed)
    }

    /// Frees the blocks whose sandbox directory is gone; (block, directory)
    /// for each.
    pub fn reclaim_stale(&self) -> Result<Vec<(u32, PathBuf)>, IdBlockError> {
        let Some(_lock) = self.lock_existing()? else { return Ok(Vec::new()) };
        let mut freed = Vec::new();
        for (index, entry) in self.entries()? {
            if let Some(entry) = entry.filter(is_stale) {
                self.remove_entry(index)?;
                freed.push((index, entry.sandbox));
            }
        }
        Ok(freed)
    }

    /// The sandbox directory holding block `index`, if any.
    pub fn holder(&self, index: u32) -> Result<Option<PathBuf>, IdBlockError> {
        Ok(self.read_entry(index)?.flatten().map(|e| e.sandbox))
    }

    fn entry_path(&self, index: u32) -> PathBuf {
        self.dir.join(index.to_string())
    }

    /// Takes the registry's lock, creating the registry when `create`.
    fn lock(&self, create: bool) -> Result<File, IdBlockError> {
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| IdBlockError::Io { action, path, source }
        };
        if create {
            if let Some(parent) = self.dir.parent() {
                DirBuilder::new().recursive(true).mode(0o755).create(parent).map_err(io("create", parent))?;
            }
            match DirBuilder::new().mode(0o700).create(&self.dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("create", &self.dir)(e)),
            }
        }
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags((OFlags::NOFOLLOW | OFlags::CLOEXEC).bits() as i32)
            .open(&path)
            .map_err(io("open", &path))?;
        flock(&file, FlockOperation::LockExclusive).map_err(|e| io("lock", &path)(e.into()))?;
        Ok(file)
    }

    /// The lock, or None when there is no registry (nothing to release).
    fn lock_existing(&self) -> Result<Option<File>, IdBlockError> {
        if !self.dir.is_dir() {
            return Ok(None);
        }
        self.lock(false).map(Some)
    }

    /// Every entry: (block, its record or None when it cannot be read).
    /// An unreadable entry still counts as taken: giving its block out
    /// could put two sandboxes on it.
    fn entries(&self) -> Result<Vec<(u32, Option<Entry>)>, IdBlockError> {
        let listing = std::fs::read_dir(&self.dir).map_err(|source| IdBlockError::Io {
            action: "list",
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for item in listing.flatten() {
            let name = item.file_name();
            let Some(index) = name.to_str().and_then(|n| n.parse::<u32>().ok()).filter(|i| *i < BLOCKS)
            else {
                continue;
            };
            if let Some(entry) = self.read_entry(index)? {
                out.push((index, entry));
            }
        }
        out.sort_by_key(|(index, _)| *index);
        Ok(out)
    }

    /// None: no entry; Some(None): an entry that cannot be parsed.
    fn read_entry(&self, index: u32) -> Result<Option<Option<Entry>>, IdBlockError> {
        let path = self.entry_path(index);
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags((OFlags::NOFOLLOW | OFlags::CLOEXEC).bits() as i32)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IdBlockError::Io { action: "open", path, source }),
        };
        let mut text = Vec::new();
        file.take(64 * 1024).read_to_end(&mut text).map_err(|source| IdBlockError::Io {
            action: "read",
            path: path.clone(),
            source,
        })?;
        match serde_json::from_slice(&text) {
            Ok(entry) => Ok(Some(Some(entry))),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable id block entry; its block stays taken");
                Ok(Some(None))
            }
        }
    }

    /// Written to a temporary file and renamed: an entry is whole or absent.
    fn write_entry(&self, index: u32, entry: &Entry) -> Result<(), IdBlockError> {
        let path = self.entry_path(index);
        let tmp = self.dir.join(format!(".{index}.tmp"));
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| IdBlockError::Io { action, path, source }
        };
        let text = serde_json::to_vec(entry).map_err(|e| io("encode", &path)(io::Error::other(e)))?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags((OFlags::NOFOLLOW | OFlags::CLOEXEC).bits() as i32)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        file.write_all(&text).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename", &path))
    }

    fn remove_entry(&self, index: u32) -> Result<(), IdBlockError> {
        let path = self.entry_path(index);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(IdBlockError::Io { action: "remove", path, source }),
        }
    }
}

/// An entry whose sandbox directory is gone, or is another directory now.
fn is_stale(entry: &Entry) -> bool {
    match std::fs::symlink_metadata(&entry.sandbox) {
        Ok(meta) => !meta.is_dir() || (meta.dev(), meta.ino()) != (entry.dev, entry.ino),
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// `FIRST-LAST` (inclusive) within the block numbers.
fn parse_range(value: &str) -> Option<Range<u32>> {
    let (first, last) = value.split_once('-')?;
    let (first, last): (u32, u32) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    (first <= last && last < BLOCKS).then_some(first..last + 1)
}

/// Releases the block a sandbox held, once its directory is gone. Errors
/// are logged: a block left behind is reclaimed as stale later.
pub(crate) fn release_for(sandbox: &Path, index: Option<u32>) {
    if !rustix::process::geteuid().is_root() {
        return;
    }
    let registry = match Registry::host() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot release the sandbox's host id block");
            return;
        }
    };
    let result = match index {
        Some(index) => registry.release(sandbox, index).map(drop),
        None => registry.release_all_of(sandbox).map(drop),
    };
    if let Err(e) = result {
        tracing::warn!(sandbox = %sandbox.display(), error = %e, "could not release the sandbox's host id block; `airlock gc` will");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    struct Fixture {
        tmp: tempfile::TempDir,
        registry: Registry,
    }

    fn fixture(pool: Range<u32>) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let registry = Registry::at(tmp.path().join("run/id-blocks"), pool);
        Fixture { tmp, registry }
    }

    impl Fixture {
        fn sandbox(&self, name: &str) -> PathBuf {
            let path = self.tmp.path().join("state").join(name);
            std::fs::create_dir_all(&path).unwrap();
            path
        }
    }

    #[test]
    fn uids_of_blocks() {
        assert_eq!(first_host_uid(0), 1_000_000_000);
        assert_eq!(first_host_uid(1), 1_000_065_536);
        let last_id = u64::from(first_host_uid(BLOCKS - 1)) + u64::from(BLOCK_SIZE) - 1;
        assert!(last_id < 1 << 31, "{last_id}");
        assert_eq!(index_of_first_uid(first_host_uid(4711)), Some(4711));
        assert_eq!(index_of_first_uid(first_host_uid(4711) + 1), None);
        assert_eq!(index_of_first_uid(999), None);
        assert_eq!(index_of_first_uid(first_host_uid(BLOCKS - 1) + BLOCK_SIZE), None);
    }

    #[test]
    fn blocks_are_distinct_lowest_first_and_reused_after_release() {
        let f = fixture(0..BLOCKS);
        let a = f.registry.allocate(&f.sandbox("a")).unwrap();
        let b = f.registry.allocate(&f.sandbox("b")).unwrap();
        let c = f.registry.allocate(&f.sandbox("c")).unwrap();
        assert_eq!((a.index(), b.index(), c.index()), (0, 1, 2));
        assert_eq!(f.registry.holder(1).unwrap(), Some(f.sandbox("b")));
        let (a, b, c) = (a.keep(), b.keep(), c.keep());
        assert!(f.registry.release(&f.sandbox("b"), b).unwrap());
        assert!(!f.registry.release(&f.sandbox("b"), b).unwrap(), "released twice");
        // The freed block is the lowest free one again.
        let d = f.registry.allocate(&f.sandbox("d")).unwrap().keep();
        assert_eq!(d, 1);
        assert_eq!(f.registry.allocate(&f.sandbox("e")).unwrap().keep(), 3);
        assert!(f.registry.holder(a).unwrap().is_some() && f.registry.holder(c).unwrap().is_some());
    }

    #[test]
    fn a_block_not_kept_is_given_back() {
        let f = fixture(0..BLOCKS);
        let dropped = f.registry.allocate(&f.sandbox("failed")).unwrap();
        assert_eq!(dropped.index(), 0);
        drop(dropped);
        assert_eq!(f.registry.holder(0).unwrap(), None);
        assert_eq!(f.registry.allocate(&f.sandbox("next")).unwrap().keep(), 0);
    }

    #[test]
    fn release_only_frees_the_holders_block() {
        let f = fixture(0..BLOCKS);
        let a = f.registry.allocate(&f.sandbox("a")).unwrap().keep();
        assert!(!f.registry.release(&f.sandbox("b"), a).unwrap());
        assert_eq!(f.registry.holder(a).unwrap(), Some(f.sandbox("a")));
        assert_eq!(f.registry.release_all_of(&f.sandbox("a")).unwrap(), vec![a]);
        assert_eq!(f.registry.holder(a).unwrap(), None);
    }

    #[test]
    fn exhaustion_is_a_clear_error_and_stale_entries_are_reclaimed() {
        let f = fixture(10..13);
        let held: Vec<u32> =
            ["a", "b", "c"].iter().map(|n| f.registry.allocate(&f.sandbox(n)).unwrap().keep()).collect();
        assert_eq!(held, [10, 11, 12]);
        let err = f.registry.allocate(&f.sandbox("d")).unwrap_err();
        assert!(matches!(err, IdBlockError::Exhausted { count: 3, .. }), "{err}");
        let text = err.to_string();
        for needed in ["no host id block is free", "airlock rm", "airlock gc", "stopped"] {
            assert!(text.contains(needed), "{needed:?} missing from: {text}");
        }
        // b's directory removed by hand: its block is stale.
        std::fs::remove_dir(f.sandbox("b")).unwrap();
        assert_eq!(f.registry.allocate(&f.sandbox("d")).unwrap().keep(), 11);
        // c's directory replaced by another of the same name: stale too.
        // (made before the old one goes, so it cannot get the same inode)
        std::fs::create_dir(f.tmp.path().join("state/c-tmp")).unwrap();
        std::fs::remove_dir(f.sandbox("c")).unwrap();
        std::fs::rename(f.tmp.path().join("state/c-tmp"), f.tmp.path().join("state/c")).unwrap();
        let reclaimed = f.registry.reclaim_stale().unwrap();
        assert_eq!(reclaimed, vec![(12, f.sandbox("c"))]);
        assert_eq!(f.registry.reclaim_stale().unwrap(), vec![]);
    }

    #[test]
    fn unreadable_entries_stay_taken_and_strays_are_ignored() {
        let f = fixture(0..2);
        f.registry.allocate(&f.sandbox("a")).unwrap().keep();
        std::fs::write(f.registry.dir().join("1"), b"{ not json").unwrap();
        std::fs::write(f.registry.dir().join("notes.txt"), b"x").unwrap();
        std::fs::write(f.registry.dir().join("99999"), b"{}").unwrap();
        let err = f.registry.allocate(&f.sandbox("b")).unwrap_err();
        assert!(matches!(err, IdBlockError::Exhausted { .. }), "{err}");
        assert_eq!(f.registry.reclaim_stale().unwrap(), vec![]);
    }

    #[test]
    fn concurrent_allocations_never_share_a_block() {
        let f = fixture(0..BLOCKS);
        let paths: Vec<PathBuf> = (0..32).map(|i| f.sandbox(&format!("s{i}"))).collect();
        let threads: Vec<_> = paths
            .into_iter()
            .map(|path| {
                let registry = f.registry.clone();
                std::thread::spawn(move || registry.allocate(&path).unwrap().keep())
            })
            .collect();
        let mut got: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        got.sort_unstable();
        assert_eq!(got, (0..32).collect::<Vec<u32>>());
    }

    #[test]
    fn test_ranges_parse_strictly() {
        assert_eq!(parse_range("14990-14992"), Some(14990..14993));
        assert_eq!(parse_range("5-5"), Some(5..6));
        for bad in ["", "5", "6-5", "0-15000", "a-b", "-3"] {
            assert_eq!(parse_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_missing_registry_releases_nothing() {
        let f = fixture(0..BLOCKS);
        assert!(!f.registry.release(&f.sandbox("a"), 0).unwrap());
        assert!(f.registry.reclaim_stale().unwrap().is_empty());
        assert!(!f.registry.dir().exists());
    }
}
