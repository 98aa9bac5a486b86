//! The workspace's writable layer (overlayfs upper and work directories).
//!
//! As root it lives on a tmpfs the supervisor mounts with the policy's disk
//! budget as its size: a disk-filling loop inside fills the tmpfs, not the
//! host's disk. When the run ends the upper layer is copied to the state
//! directory (so reviews survive a reboot) and the tmpfs is unmounted;
//! a sandbox's owner that fails unmounts it at once (see `lifecycle::Held`).
//! Without root the layer is a plain directory and the budget is not
//! enforced; the policy must allow that ("disk-quota"). A rootless
//! microVM's layer is kept apart from the rest of the sandbox's directory
//! while it runs (`layer/upper`, `layer/work`), since virtiofsd serves the
//! directory that holds them to the guest.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, chown};
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

use crate::RunError;
use crate::state::SandboxDir;

pub struct WritableLayer {
    pub upper: PathBuf,
    pub work: PathBuf,
    /// The tmpfs mount point when the layer is size-limited.
    tmpfs: Option<PathBuf>,
    /// The plain directory holding `upper` and `work` (and nothing else of
    /// the sandbox's) when it is apart ([`WritableLayer::create_apart`]).
    apart: Option<PathBuf>,
}

impl WritableLayer {
    pub fn create(sandbox: &SandboxDir, quota: Option<u64>, owner: u32) -> Result<WritableLayer, RunError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |e: io::Error| RunError::Layer(path, e)
        };
        let is_root = rustix::process::geteuid().is_root();
        let (base, tmpfs) = match quota {
            Some(bytes) => {
                let dir = sandbox.layer_dir();
                fs::DirBuilder::new().mode(0o700).create(&dir).map_err(err(&dir))?;
                let data = std::ffi::CString::new(format!("size={bytes},mode=0700,uid={owner},gid={owner}"))
                    .map_err(|_| RunError::Layer(dir.clone(), io::ErrorKind::InvalidInput.into()))?;
                rustix::mount::mount(
                    "airlock-layer",
                    &dir,
                    "tmpfs",
                    MountFlags::NOSUID | MountFlags::NODEV,
                    Some(data.as_c_str()),
                )
                .map_err(|e| RunError::Layer(dir.clone(), e.into()))?;
                (dir.clone(), Some(dir))
            }
            None => (sandbox.path().to_path_buf(), None),
        };
        let upper = if tmpfs.is_some() { base.join("upper") } else { sandbox.upper_dir() };
        let work = if tmpfs.is_some() { base.join("work") } else { sandbox.work_dir() };
        for dir in [&upper, &work] {
            fs::DirBuilder::new().mode(0o755).create(dir).map_err(err(dir))?;
            if is_root {
                chown(dir, Some(owner), Some(owner)).map_err(err(dir))?;
            }
        }
        Ok(WritableLayer { upper, work, tmpfs, apart: None })
    }

    /// Without root, for a microVM: `upper` and `work` as plain directories
    /// in `layer/`, which alone is given to virtiofsd (the guest then sees
    /// them and nothing else of the sandbox's directory). No size cap, as
    /// for the process tier's rootless layer; moved to where that one lives
    /// when the sandbox ends ([`WritableLayer::copy_to_state`]).
    pub fn create_apart(sandbox: &SandboxDir, owner: u32) -> Result<WritableLayer, RunError> {
        let dir = sandbox.layer_dir();
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        for (path, mode) in [(&dir, 0o700), (&upper, 0o755), (&work, 0o755)] {
            let err = |e| RunError::Layer(path.clone(), e);
            fs::DirBuilder::new().mode(mode).create(path).map_err(err)?;
            if rustix::process::geteuid().is_root() {
                chown(path, Some(owner), Some(owner)).map_err(err)?;
            }
        }
        Ok(WritableLayer { upper, work, tmpfs: None, apart: Some(dir) })
    }

    /// Copies the upper layer from its tmpfs to the state directory (a
    /// layer outside a tmpfs is there already). The tmpfs stays mounted
    /// until [`WritableLayer::discard`]: a failed copy loses nothing.
    pub fn copy_to_state(&self, sandbox: &SandboxDir) -> Result<(), RunError> {
        if self.tmpfs.is_some() {
            airlock_workspace::persist_layer(&self.upper, &sandbox.upper_dir())?;
        }
        if let Some(dir) = &self.apart {
            move_apart(dir, sandbox)?;
        }
        Ok(())
    }

    /// Whether the layer lives on a tmpfs of its own (and so leaves nothing
    /// on disk once released).
    pub fn on_tmpfs(&self) -> bool {
        self.tmpfs.is_some()
    }

    /// A layer said to live on a tmpfs at `tmpfs` (unit tests of its release).
    #[cfg(test)]
    pub(crate) fn on_tmpfs_for_test(upper: PathBuf, work: PathBuf, tmpfs: PathBuf) -> WritableLayer {
        WritableLayer { upper, work, tmpfs: Some(tmpfs), apart: None }
    }

    /// Releases the layer's tmpfs, and with it whatever was not copied.
    pub fn discard(self) -> io::Result<()> {
        match &self.tmpfs {
            Some(mount) => release(mount),
            None => Ok(()),
        }
    }
}

/// Moves a layer kept apart to where a rootless layer lives (`upper/`,
/// `work/`), renaming, never copying. The guest could reach `layer/`: an
/// `upper` or `work` that is no longer a directory (a link to a host path)
/// is refused, not followed; whatever else it left in `layer/` stays there
/// until the sandbox is removed.
fn move_apart(dir: &Path, sandbox: &SandboxDir) -> Result<(), RunError> {
    for (from, to) in [(dir.join("upper"), sandbox.upper_dir()), (dir.join("work"), sandbox.work_dir())] {
        let kind = fs::symlink_metadata(&from).map_err(|e| RunError::Layer(from.clone(), e))?.file_type();
        if !kind.is_dir() {
            let e = io::Error::new(io::ErrorKind::InvalidData, "not a directory: the guest replaced it");
            return Err(RunError::Layer(from, e));
        }
        fs::rename(&from, &to).map_err(|e| RunError::Layer(from.clone(), e))?;
    }
    // Empty unless the guest left something beside them.
    let _ = fs::remove_dir(dir);
    Ok(())
}

/// Unmounts a layer tmpfs left mounted (by a crashed supervisor, for `gc`).
pub fn release(mount: &Path) -> io::Result<()> {
    rustix::mount::unmount(mount, UnmountFlags::DETACH)?;
    fs::remove_dir(mount)
}

/// Whether `path` is a mount point (its device differs from its parent's).
pub fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Some(parent)) = (fs::symlink_metadata(path), path.parent()) else {
        return false;
    };
    fs::symlink_metadata(parent).is_ok_and(|p| p.dev() != me.dev())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::state::StateRoot;

    /// A layer apart holds `upper` and `work` alone in `layer/` while the
    /// sandbox runs, and ends where a rootless layer lives.
    #[test]
    fn a_layer_apart_is_alone_in_its_directory_and_moves_to_the_state() {
        let tmp = tempfile::tempdir().unwrap();
        let root = StateRoot::at(tmp.path().to_path_buf());
        let sandbox = root.create_sandbox(Some("apart")).unwrap();
        let layer = WritableLayer::create_apart(&sandbox, rustix::process::getuid().as_raw()).unwrap();
        assert_eq!(layer.upper, sandbox.layer_dir().join("upper"));
        assert_eq!(layer.work, sandbox.layer_dir().join("work"));
        let mut held: Vec<_> =
            fs::read_dir(sandbox.layer_dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        held.sort();
        assert_eq!(held, ["upper", "work"]);
        assert!(!layer.on_tmpfs());
        fs::write(layer.upper.join("made"), "x").unwrap();
        layer.copy_to_state(&sandbox).unwrap();
        assert_eq!(fs::read_to_string(sandbox.upper_dir().join("made")).unwrap(), "x");
        assert!(sandbox.work_dir().is_dir());
        assert!(!sandbox.layer_dir().exists());
        layer.discard().unwrap();
        assert!(sandbox.upper_dir().join("made").exists(), "discarding leaves the files, as rootless");
    }

    /// The guest put a link where `upper` was: nothing is moved or followed.
    #[test]
    fn a_layer_apart_whose_upper_became_a_link_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = StateRoot::at(tmp.path().to_path_buf());
        let sandbox = root.create_sandbox(Some("swapped")).unwrap();
        let layer = WritableLayer::create_apart(&sandbox, rustix::process::getuid().as_raw()).unwrap();
        fs::remove_dir(&layer.upper).unwrap();
        std::os::unix::fs::symlink("/", &layer.upper).unwrap();
        let err = layer.copy_to_state(&sandbox).unwrap_err().to_string();
        assert!(err.contains("replaced"), "{err}");
        assert!(fs::symlink_metadata(sandbox.upper_dir()).is_err());
    }
}
