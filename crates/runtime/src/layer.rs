//! The workspace's writable layer (overlayfs upper and work directories).
//!
//! As root it lives on a tmpfs the supervisor mounts with the policy's disk
//! budget as its size: a disk-filling loop inside fills the tmpfs, not the
//! host's disk. When the run ends the upper layer is copied to the state
//! directory (so reviews survive a reboot) and the tmpfs is unmounted;
//! a sandbox's owner that fails unmounts it at once (see `lifecycle::Held`).
//! Without root the layer is a plain directory and the budget is not
//! enforced; the policy must allow that ("disk-quota").

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
        Ok(WritableLayer { upper, work, tmpfs })
    }

    /// Copies the upper layer from its tmpfs to the state directory (a
    /// layer outside a tmpfs is there already). The tmpfs stays mounted
    /// until [`WritableLayer::discard`]: a failed copy loses nothing.
    pub fn copy_to_state(&self, sandbox: &SandboxDir) -> Result<(), RunError> {
        if self.tmpfs.is_some() {
            airlock_workspace::persist_layer(&self.upper, &sandbox.upper_dir())?;
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
        WritableLayer { upper, work, tmpfs: Some(tmpfs) }
    }

    /// Releases the layer's tmpfs, and with it whatever was not copied.
    pub fn discard(self) -> io::Result<()> {
        match &self.tmpfs {
            Some(mount) => release(mount),
            None => Ok(()),
        }
    }
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
