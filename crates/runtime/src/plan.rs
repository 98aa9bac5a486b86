//! From a resolved policy to a launch: a pure function, so every decision
//! about what the sandbox gets is unit-tested without starting anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use airlock_jail::cgroup::CgroupLimits;
use airlock_jail::plan::{
    FileBind, JailPlan, LandlockPlan, RlimitPlan, WorkspaceMount, WorkspaceMountMode, WorkspaceSource,
};
use airlock_jail::probe::{Feature, HostReport};
use airlock_jail::spawn::AGENT_WORKSPACE_FD;
use airlock_policy::{Policy, Weakening, WorkspaceMode};
use airlock_proto::Launch;

/// A host feature the policy needs and the host lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub feature: Weakening,
    pub allowed: bool,
}

/// The probe's name for a feature a policy may do without; `kvm` is the
/// microVM engine's (`airlock_vm::engine`), not the process tier's.
pub fn host_feature(w: Weakening) -> Option<Feature> {
    match w {
        Weakening::Cgroups => Some(Feature::Cgroups),
        Weakening::Landlock => Some(Feature::Landlock),
        Weakening::DiskQuota => Some(Feature::DiskQuota),
        Weakening::Kvm => None,
    }
}

/// Which required features the host does not enforce (by the same rule
/// `airlock doctor` summarises with), and whether the policy tolerates it.
pub fn shortfalls(policy: &Policy, host: &HostReport) -> Vec<Shortfall> {
    let mut needed = vec![Weakening::Cgroups, Weakening::Landlock];
    if policy.workspace.mode == WorkspaceMode::Overlay {
        needed.push(Weakening::DiskQuota);
    }
    needed
        .into_iter()
        .filter(|w| host_feature(*w).is_some_and(|f| !host.enforces(f)))
        .map(|feature| Shortfall { allowed: policy.allows_weaker(feature), feature })
        .collect()
}

/// What to set up around a sandbox on this host: the decisions of a launch
/// that depend on the host, apart from the launch itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Provisions {
    /// As root: the sandbox's ids are a block of its own, its directory is
    /// searchable by that block's root, and the workspace is seen through an
    /// id-mapped mount.
    pub own_ids: bool,
    /// The sandbox's cgroup and its limits, when the host enforces cgroups.
    pub cgroup: Option<CgroupLimits>,
    /// A writable layer over the workspace (overlay mode).
    pub layer: Option<LayerProvision>,
}

/// The writable layer of an overlay workspace.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerProvision {
    /// Its size cap, when the host can enforce one (a tmpfs of that size).
    pub size_limit: Option<u64>,
}

pub fn provisions(policy: &Policy, has_workspace: bool, host: &HostReport) -> Provisions {
    Provisions {
        own_ids: host.running_as_root,
        cgroup: host.enforces(Feature::Cgroups).then_some(CgroupLimits {
            memory: Some(policy.limits.memory),
            pids: Some(policy.limits.pids),
            cpus: Some(policy.limits.cpus),
        }),
        layer: (has_workspace && policy.workspace.mode == WorkspaceMode::Overlay).then(|| LayerProvision {
            size_limit: host.enforces(Feature::DiskQuota).then_some(policy.limits.disk),
        }),
    }
}

/// Where the sandbox's host-side pieces live.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxPaths {
    pub rootfs: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// airlock's own `/etc/hosts` and `/etc/resolv.conf` for the sandbox
    /// (`network::write_name_files`), bound over the host's.
    pub hosts: PathBuf,
    pub resolv_conf: PathBuf,
}

/// Everything the plan depends on besides the policy.
pub struct LaunchInput<'a> {
    pub name: &'a str,
    pub command: &'a [String],
    pub workspace: Option<&'a Path>,
    /// The caller's working directory, kept when it lies in the workspace.
    pub cwd: &'a Path,
    pub paths: &'a SandboxPaths,
    pub host: &'a HostReport,
    /// The workspace arrives as an id-mapped tree (root only).
    pub idmapped_workspace: bool,
    pub tty: bool,
    /// The image the root comes from: its layers, Env and WorkingDir.
    pub image: Option<&'a crate::image::ResolvedImage>,
    /// Who the command runs as ([`crate::image::run_as`]); None: root inside.
    pub user: Option<&'a str>,
    pub host_env: &'a dyn Fn(&str) -> Option<String>,
    /// The egress proxy, when the policy gives the sandbox network.
    pub network: Option<NetworkInput<'a>>,
}

/// What the sandbox needs to reach the egress proxy.
pub struct NetworkInput<'a> {
    pub ports: airlock_proto::EgressPorts,
    /// Proxy settings, CA paths and secret placeholders.
    pub env: &'a [(String, String)],
    /// The trust bundle on the host, and where it goes inside.
    pub bundle: &'a Path,
    pub bundle_targets: &'a [&'a str],
    /// Transparent egress: the redirection the agent installs.
    pub redirect: Option<airlock_jail::plan::Redirect>,
}

/// Standard search path inside the sandbox.
pub const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn launch(policy: &Policy, input: &LaunchInput<'_>) -> Launch {
    let workspace = match (policy.workspace.mode, input.workspace) {
        (WorkspaceMode::None, _) | (_, None) => None,
        (mode, Some(path)) => Some(WorkspaceMount {
            path: path.to_path_buf(),
            mode: match mode {
                WorkspaceMode::Ro => WorkspaceMountMode::ReadOnly,
                WorkspaceMode::Rw => WorkspaceMountMode::ReadWrite,
                _ => WorkspaceMountMode::Overlay {
                    upper: input.paths.upper.clone(),
                    work: input.paths.work.clone(),
                },
            },
            source: if input.idmapped_workspace {
                WorkspaceSource::MountFd(AGENT_WORKSPACE_FD)
            } else {
                WorkspaceSource::Path
            },
        }),
    };
    let cwd = match &workspace {
        Some(ws) if input.cwd.starts_with(&ws.path) => input.cwd.to_path_buf(),
        Some(ws) => ws.path.clone(),
        // Without a workspace, the image's WorkingDir when it names one.
        None => input
            .image
            .and_then(|i| i.config.working_dir.as_deref())
            .filter(|d| d.starts_with('/'))
            .map_or_else(|| PathBuf::from(airlock_jail::mounts::SANDBOX_HOME), PathBuf::from),
    };
    let jail = JailPlan {
        hostname: input.name.to_string(),
        root_mountpoint: input.paths.rootfs.clone(),
        read_only: policy.filesystem.read_only.clone(),
        hidden: policy.filesystem.hidden.clone(),
        tmp_size: policy.filesystem.tmp_size,
        workspace,
        files: name_files(input.paths)
            .into_iter()
            .chain(input.network.iter().flat_map(|n| {
                n.bundle_targets
                    .iter()
                    .map(|t| FileBind { source: n.bundle.to_path_buf(), target: PathBuf::from(t) })
            }))
            .collect(),
        rlimits: RlimitPlan {
            nofile: Some(policy.limits.nofile),
            // Counted per user namespace on current kernels: a second fence
            // against fork bombs besides the pids cgroup.
            nproc: Some(policy.limits.pids),
            fsize: Some(policy.limits.disk),
        },
        landlock: LandlockPlan {
            enabled: input.host.enforces(Feature::Landlock),
            required: !policy.allows_weaker(Weakening::Landlock),
        },
        seccomp: true,
        redirect: input.network.as_ref().and_then(|n| n.redirect),
        exec_trace: policy.audit.exec_trace,
        // Overlayfs lists the top layer first.
        image_layers: input.image.map(|i| i.layers.iter().rev().cloned().collect()).unwrap_or_default(),
    };
    Launch {
        jail,
        command: input.command.to_vec(),
        env: environment(policy, input).into_iter().collect(),
        cwd,
        tty: input.tty,
        egress: input.network.as_ref().map(|n| n.ports),
        user: input.user.map(str::to_owned),
    }
}

/// The sandbox's own name files over the host's: which names and
/// addresses the host knows is none of the sandbox's business, and its
/// resolver is airlock's.
fn name_files(paths: &SandboxPaths) -> Vec<FileBind> {
    vec![
        FileBind { source: paths.hosts.clone(), target: PathBuf::from("/etc/hosts") },
        FileBind { source: paths.resolv_conf.clone(), target: PathBuf::from("/etc/resolv.conf") },
    ]
}

/// The command's environment: a fixed base, the host variables the policy
/// passes through, then the policy's (and the command line's) fixed values.
fn environment(policy: &Policy, input: &LaunchInput<'_>) -> BTreeMap<String, String> {
    let network = input.network.as_ref().map_or(&[][..], |n| n.env);
    let image_env = input.image.map_or(&[][..], |i| &i.config.env[..]);
    environment_of(policy, input.name, input.host_env, image_env, network)
}

/// The variables of the base environment that name root as the user:
/// left out of a guest's exec that runs as another user, whose agent sets
/// them from that user's passwd entry.
const ROOTS_OWN_VARS: &[&str] = &["HOME", "USER", "LOGNAME"];

/// A microVM exec's base environment for `user` (None: root inside).
pub(crate) fn base_env_for<'a>(
    base: &'a [(String, String)],
    user: Option<&str>,
) -> impl Iterator<Item = &'a (String, String)> {
    let as_other = user.is_some();
    base.iter().filter(move |(k, _)| !(as_other && ROOTS_OWN_VARS.contains(&k.as_str())))
}

/// [`environment`] from its parts; the microVM tier's too.
pub(crate) fn environment_of(
    policy: &Policy,
    name: &str,
    host_env: &dyn Fn(&str) -> Option<String>,
    image_env: &[String],
    network: &[(String, String)],
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let base = [
        ("PATH", SANDBOX_PATH),
        ("HOME", airlock_jail::mounts::SANDBOX_HOME),
        ("USER", "root"),
        ("LOGNAME", "root"),
        ("SHELL", "/bin/sh"),
    ];
    for (k, v) in base {
        env.insert(k.to_string(), v.to_string());
    }
    // The image's Env (its PATH included) over the base; the policy's
    // values and airlock's own (proxy, CA paths) over the image's.
    for entry in image_env {
        if let Some((k, v)) = entry.split_once('=')
            && !k.is_empty()
        {
            env.insert(k.to_string(), v.to_string());
        }
    }
    env.insert("AIRLOCK_SANDBOX".to_string(), name.to_string());
    for var in &policy.env.pass {
        if let Some(value) = host_env(var) {
            env.insert(var.clone(), value);
        }
    }
    for (k, v) in network {
        env.insert(k.clone(), v.clone());
    }
    for (k, v) in &policy.env.set {
        env.insert(k.clone(), v.clone());
    }
    env
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use airlock_jail::cgroup::{CgroupSupport, Placement};
    use airlock_jail::probe::{HostFacts, launch_report};

    fn paths() -> SandboxPaths {
        SandboxPaths {
            rootfs: "/s/rootfs".into(),
            upper: "/s/layer/upper".into(),
            work: "/s/layer/work".into(),
            hosts: "/s/hosts".into(),
            resolv_conf: "/s/resolv.conf".into(),
        }
    }

    /// A report made by the probe's own verdict function from made-up facts.
    fn report(root: bool, cgroups_writable: bool, landlock: bool) -> HostReport {
        let v2 = || Some(Placement::V2("/sys/fs/cgroup".into()));
        launch_report(&HostFacts {
            running_as_root: root,
            kernel: "6.1.0".into(),
            cgroups: CgroupSupport {
                memory: v2(),
                pids: v2(),
                cpu: v2(),
                writable: cgroups_writable,
                detail: String::new(),
                hierarchies: Default::default(),
            },
            landlock_abi: if landlock { Ok(4) } else { Err(libc::EOPNOTSUPP) },
        })
    }

    fn host() -> HostReport {
        report(true, true, true)
    }

    fn plan_for(policy: &Policy, cwd: &str, idmapped: bool) -> Launch {
        let command = vec!["make".to_string(), "test".to_string()];
        let paths = paths();
        let host = host();
        let env = |name: &str| match name {
            "TERM" => Some("xterm".to_string()),
            "SSH_AUTH_SOCK" => Some("/run/user/1000/ssh".to_string()),
            _ => None,
        };
        launch(
            policy,
            &LaunchInput {
                name: "brave-otter",
                command: &command,
                workspace: Some(Path::new("/home/u/repo")),
                cwd: Path::new(cwd),
                paths: &paths,
                host: &host,
                idmapped_workspace: idmapped,
                tty: false,
                image: None,
                user: None,
                host_env: &env,
                network: None,
            },
        )
    }

    #[test]
    fn the_sandbox_gets_airlocks_name_files_and_the_redirection_asked_for() {
        let policy = Policy::builtin("dev").unwrap();
        let l = plan_for(&policy, "/home/u/repo", false);
        let bound: Vec<(&Path, &Path)> =
            l.jail.files.iter().map(|f| (f.source.as_path(), f.target.as_path())).collect();
        assert_eq!(
            bound,
            [
                (Path::new("/s/hosts"), Path::new("/etc/hosts")),
                (Path::new("/s/resolv.conf"), Path::new("/etc/resolv.conf"))
            ]
        );
        // Without network there is nothing to redirect to.
        assert_eq!(l.jail.redirect, None);

        let redirect = crate::network::redirect_of(&policy.network);
        assert_eq!(
            redirect,
            Some(airlock_jail::plan::Redirect {
                tcp_port: airlock_egress::TRANSPARENT_PORT,
                dns_port: airlock_egress::RESOLVER_PORT,
                ipv6: false
            })
        );
        let mut v6 = policy.clone();
        v6.network.allow = vec![airlock_policy::HostPattern::parse("[2001:db8::7]:443").unwrap()];
        assert!(crate::network::redirect_of(&v6.network).unwrap().ipv6);
        let mut off = policy.clone();
        off.network.transparent = false;
        assert_eq!(crate::network::redirect_of(&off.network), None);
        let plugin = Policy::builtin("plugin").unwrap();
        assert_eq!(crate::network::redirect_of(&plugin.network), None);

        let paths = paths();
        let host = host();
        let env = |_: &str| None;
        let no_env: Vec<(String, String)> = Vec::new();
        let with_network = launch(
            &policy,
            &LaunchInput {
                name: "brave-otter",
                command: &[],
                workspace: None,
                cwd: Path::new("/"),
                paths: &paths,
                host: &host,
                idmapped_workspace: false,
                tty: false,
                image: None,
                user: None,
                host_env: &env,
                network: Some(NetworkInput {
                    ports: airlock_proto::EgressPorts { http: 3128, socks: 1080 },
                    env: &no_env,
                    bundle: Path::new("/s/ca-bundle.pem"),
                    bundle_targets: &["/run/airlock/ca-bundle.pem"],
                    redirect,
                }),
            },
        );
        assert_eq!(with_network.jail.redirect, redirect);
        assert_eq!(with_network.jail.files.len(), 3);
    }

    #[test]
    fn dev_overlays_the_workspace_at_the_same_path() {
        let policy = Policy::builtin("dev").unwrap();
        let l = plan_for(&policy, "/home/u/repo/src", true);
        let ws = l.jail.workspace.unwrap();
        assert_eq!(ws.path, Path::new("/home/u/repo"));
        assert_eq!(ws.source, WorkspaceSource::MountFd(AGENT_WORKSPACE_FD));
        assert!(matches!(ws.mode, WorkspaceMountMode::Overlay { .. }));
        assert_eq!(l.cwd, Path::new("/home/u/repo/src"));
    }

    #[test]
    fn cwd_outside_the_workspace_starts_at_its_root() {
        let policy = Policy::builtin("dev").unwrap();
        let l = plan_for(&policy, "/etc", false);
        assert_eq!(l.cwd, Path::new("/home/u/repo"));
        assert_eq!(l.jail.workspace.unwrap().source, WorkspaceSource::Path);
    }

    #[test]
    fn plugin_gets_a_read_only_workspace() {
        let policy = Policy::builtin("plugin").unwrap();
        let l = plan_for(&policy, "/home/u/repo", false);
        assert_eq!(l.jail.workspace.unwrap().mode, WorkspaceMountMode::ReadOnly);
        assert_eq!(l.jail.rlimits.nproc, Some(policy.limits.pids));
    }

    #[test]
    fn a_guests_exec_as_another_user_gets_no_roots_home_or_name() {
        let base: Vec<(String, String)> =
            [("HOME", "/root"), ("USER", "root"), ("LOGNAME", "root"), ("PATH", "/bin")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into();
        let keys = |user| base_env_for(&base, user).map(|(k, _)| k.as_str()).collect::<Vec<_>>();
        assert_eq!(keys(None), ["HOME", "USER", "LOGNAME", "PATH"]);
        assert_eq!(keys(Some("1000:1000")), ["PATH"]);
    }

    #[test]
    fn environment_passes_only_what_the_policy_names() {
        let policy = Policy::builtin("dev").unwrap();
        let l = plan_for(&policy, "/", false);
        let env: BTreeMap<_, _> = l.env.into_iter().collect();
        assert_eq!(env.get("TERM").map(String::as_str), Some("xterm"));
        assert!(!env.contains_key("SSH_AUTH_SOCK"));
        assert_eq!(env.get("HOME").map(String::as_str), Some("/root"));
        assert_eq!(env.get("AIRLOCK_SANDBOX").map(String::as_str), Some("brave-otter"));
    }

    #[test]
    fn missing_features_are_reported_with_the_policy_verdict() {
        // Rootless, no delegated cgroups: no cgroups, no size limit.
        let weak = report(false, false, true);
        let dev = shortfalls(&Policy::builtin("dev").unwrap(), &weak);
        assert!(dev.iter().all(|s| s.allowed), "{dev:?}");
        assert_eq!(dev.len(), 2);
        let ci = shortfalls(&Policy::builtin("ci").unwrap(), &weak);
        assert!(ci.iter().all(|s| !s.allowed));
        assert!(shortfalls(&Policy::builtin("ci").unwrap(), &host()).is_empty());
        let no_landlock = shortfalls(&Policy::builtin("ci").unwrap(), &report(true, true, false));
        assert_eq!(no_landlock, [Shortfall { feature: Weakening::Landlock, allowed: false }]);
        // Without an overlay there is no layer to size-limit.
        let plugin = Policy::builtin("plugin").unwrap();
        assert_ne!(plugin.workspace.mode, WorkspaceMode::Overlay);
        assert!(shortfalls(&plugin, &weak).iter().all(|s| s.feature != Weakening::DiskQuota));
    }

    #[test]
    fn provisions_follow_the_host() {
        let dev = Policy::builtin("dev").unwrap();
        let full = provisions(&dev, true, &host());
        assert!(full.own_ids);
        assert_eq!(
            full.cgroup,
            Some(CgroupLimits {
                memory: Some(dev.limits.memory),
                pids: Some(dev.limits.pids),
                cpus: Some(dev.limits.cpus)
            })
        );
        assert_eq!(full.layer, Some(LayerProvision { size_limit: Some(dev.limits.disk) }));

        let rootless = provisions(&dev, true, &report(false, false, true));
        assert_eq!(
            rootless,
            Provisions { own_ids: false, cgroup: None, layer: Some(LayerProvision { size_limit: None }) }
        );
        // Delegated cgroups without root: limits, but an unlimited layer.
        let delegated = provisions(&dev, true, &report(false, true, true));
        assert!(delegated.cgroup.is_some() && delegated.layer == Some(LayerProvision { size_limit: None }));

        assert_eq!(provisions(&dev, false, &host()).layer, None);
        assert_eq!(provisions(&Policy::builtin("plugin").unwrap(), true, &host()).layer, None);
    }

    #[test]
    fn landlock_follows_the_report() {
        let ci = Policy::builtin("ci").unwrap();
        assert!(plan_for(&ci, "/", false).jail.landlock.enabled);
        let command = vec!["true".to_string()];
        let paths = paths();
        let host = report(true, true, false);
        let l = launch(
            &ci,
            &LaunchInput {
                name: "n",
                command: &command,
                workspace: None,
                cwd: Path::new("/"),
                paths: &paths,
                host: &host,
                idmapped_workspace: false,
                tty: false,
                image: None,
                user: None,
                host_env: &|_| None,
                network: None,
            },
        );
        assert!(!l.jail.landlock.enabled && l.jail.landlock.required);
    }

    #[test]
    fn landlock_is_required_unless_the_policy_allows_weaker() {
        let ci = Policy::builtin("ci").unwrap();
        assert!(plan_for(&ci, "/", false).jail.landlock.required);
        let dev = Policy::builtin("dev").unwrap();
        assert!(!plan_for(&dev, "/", false).jail.landlock.required);
    }
}
