//! The launch plan: everything the in-sandbox side needs to build the
//! sandbox's view of the world. The runtime computes it from a resolved policy
//! with a pure function; the jail only carries it out. Plain data, kept in
//! the protocol crate so that the protocol (and a guest agent built on it)
//! links none of the jail's machinery (seccomp, Landlock, cgroups).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What the agent builds before it starts the command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JailPlan {
    /// Hostname inside the sandbox's UTS namespace.
    pub hostname: String,
    /// A host directory the agent mounts the new root's tmpfs on. It must
    /// exist and must not be inside any path the plan mounts.
    pub root_mountpoint: PathBuf,
    /// Host paths bound read-only at the same place (missing ones are skipped).
    pub read_only: Vec<PathBuf>,
    /// Host paths masked inside, on top of the jail's own always-hidden list (`airlock_jail::mounts::ALWAYS_HIDDEN`).
    pub hidden: Vec<PathBuf>,
    /// Size of each private tmpfs (/tmp, /var/tmp, /run, $HOME, /dev/shm).
    pub tmp_size: u64,
    /// The workspace, at the same absolute path as on the host.
    pub workspace: Option<WorkspaceMount>,
    /// Host files bound read-only at a path inside (the egress proxy's trust
    /// bundle), after everything else is mounted.
    pub files: Vec<FileBind>,
    pub rlimits: RlimitPlan,
    pub landlock: LandlockPlan,
    /// Install the seccomp filter (always true outside of tests of the jail itself).
    pub seccomp: bool,
    /// Transparent egress: the kernel redirection the agent installs in the
    /// sandbox's network namespace before anything untrusted runs. None:
    /// only the proxy ports lead out.
    #[serde(default)]
    pub redirect: Option<Redirect>,
    /// Hand every execve and execveat of the sandbox to a listener on the
    /// host (a seccomp user-notification filter the agent installs last,
    /// sending the listener to its supervisor), which records each one.
    #[serde(default)]
    pub exec_trace: bool,
    /// An OCI image's unpacked layers, top first. When there are any, the
    /// root is these layers as read-only overlayfs lower layers (under a
    /// skeleton of airlock's mount points) instead of `read_only`'s host
    /// directories; the stored layers are never written.
    #[serde(default)]
    pub image_layers: Vec<PathBuf>,
}

/// Where the sandbox's own network namespace sends what it did not address
/// to loopback: every TCP connection to the agent's transparent listener,
/// every DNS query (UDP or TCP, port 53, any address, loopback included) to
/// its resolver port; other UDP and ICMP are rejected at once.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Redirect {
    /// The loopback port TCP connections are redirected to.
    pub tcp_port: u16,
    /// The loopback port (UDP and TCP) DNS queries are redirected to.
    pub dns_port: u16,
    /// Route and redirect IPv6 too (the policy names an IPv6 address);
    /// otherwise IPv6 beyond loopback has no route and is rejected.
    pub ipv6: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileBind {
    pub source: PathBuf,
    pub target: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkspaceMount {
    /// The host path, which is also the path inside.
    pub path: PathBuf,
    pub mode: WorkspaceMountMode,
    /// The host directory that is the source of the workspace: the plain
    /// host path, or (as root) an id-mapped view of it passed as a file
    /// descriptor number that the agent inherited.
    pub source: WorkspaceSource,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum WorkspaceSource {
    Path,
    /// A detached, id-mapped mount (open_tree + MOUNT_ATTR_IDMAP) at this fd.
    MountFd(i32),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum WorkspaceMountMode {
    /// Read-only lower layer; writes land in `upper` (host paths, visible
    /// before pivot_root).
    Overlay {
        upper: PathBuf,
        work: PathBuf,
    },
    ReadOnly,
    ReadWrite,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RlimitPlan {
    pub nofile: Option<u64>,
    pub nproc: Option<u64>,
    pub fsize: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LandlockPlan {
    /// Apply Landlock at all.
    pub enabled: bool,
    /// Fail the launch when the kernel cannot enforce it fully.
    pub required: bool,
}
