//! A head start on the wait of a sandbox's first cgroup move.
//!
//! Moving a process into a cgroup (a write to `cgroup.procs`, in any
//! hierarchy, v1 or v2) takes a lock shared by the whole host. The first
//! taker after a quiet spell waits for an RCU grace period before it gets
//! it: 6–16 ms on the development VM, more under load, and a sandbox's
//! launch made it wait in the middle of its critical path. For a while after
//! one move (about one more grace period), the next does not wait.
//!
//! So the launch starts that wait itself, once the sandbox's cgroup exists,
//! on a thread of its own: it rewrites this process's membership of the
//! cgroup it is already in. That moves nothing (the kernel takes the lock,
//! finds the process where it is and returns), but the grace period then
//! runs while the launch makes the layer, starts the network and the agent,
//! and the agent's move finds it over. Not before the cgroup is created:
//! the write holds the hierarchy's mutex while it waits, which `mkdir` of a
//! cgroup needs too. Any failure is ignored: the move only waits as it
//! would have.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::CgroupSupport;
use super::layout::Layout;

/// Starts the grace period a cgroup move waits for on a thread that ends
/// once it is over; returns at once.
pub fn start_move_wait(support: &CgroupSupport) {
    let Ok(own) = std::fs::read_to_string("/proc/self/cgroup") else { return };
    let Some(procs) = own_procs_file(&support.hierarchies.0, &own) else { return };
    let pid = std::process::id().to_string();
    let rewrite = move || {
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .and_then(|mut f| f.write_all(pid.as_bytes()));
        if let Err(e) = written {
            tracing::debug!(file = %procs.display(), error = %e, "could not start the cgroup move's wait early");
        }
    };
    let _ = std::thread::Builder::new().name("cgroup-warmup".into()).spawn(rewrite);
}

/// The `cgroup.procs` of the cgroup this process is in (`own` is the text of
/// `/proc/self/cgroup`): in the v2 hierarchy when it is mounted, else in
/// the first v1 hierarchy mounted.
fn own_procs_file(layout: &Layout, own: &str) -> Option<PathBuf> {
    // "0::/path" is the v2 line; "N:cpu,cpuacct:/path" a v1 hierarchy's.
    let mut lines = own.lines().filter_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        Some((controllers, path))
    });
    let in_mount = |mount: &Path, path: &str| {
        let relative = path.trim_start_matches('/');
        // A path with ".." (a cgroup namespace's outside) is not ours to write.
        (!relative.split('/').any(|c| c == "..")).then(|| mount.join(relative).join("cgroup.procs"))
    };
    match &layout.v2 {
        Some(v2) => {
            lines.find(|(controllers, _)| controllers.is_empty()).and_then(|(_, p)| in_mount(&v2.path, p))
        }
        None => lines.find_map(|(controllers, path)| {
            let named: Vec<&str> = controllers.split(',').collect();
            let mount = layout.v1.iter().find(|m| {
                !m.controllers.is_empty() && m.controllers.iter().all(|c| named.contains(&c.as_str()))
            })?;
            in_mount(&mount.path, path)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::{V1Mount, V2Mount};
    use super::*;

    fn hybrid() -> Layout {
        Layout {
            v2: Some(V2Mount { path: "/sys/fs/cgroup/unified".into(), controllers: vec![] }),
            v1: vec![
                V1Mount {
                    path: "/sys/fs/cgroup/cpu,cpuacct".into(),
                    controllers: vec!["cpu".into(), "cpuacct".into()],
                },
                V1Mount { path: "/sys/fs/cgroup/pids".into(), controllers: vec!["pids".into()] },
            ],
        }
    }

    #[test]
    fn the_v2_membership_is_rewritten_where_v2_is_mounted() {
        let own = "3:pids:/user.slice\n2:cpu,cpuacct:/\n0::/user.slice/session-1.scope\n";
        assert_eq!(
            own_procs_file(&hybrid(), own),
            Some(PathBuf::from("/sys/fs/cgroup/unified/user.slice/session-1.scope/cgroup.procs"))
        );
        let pure =
            Layout { v2: Some(V2Mount { path: "/sys/fs/cgroup".into(), controllers: vec![] }), v1: vec![] };
        assert_eq!(own_procs_file(&pure, "0::/\n"), Some(PathBuf::from("/sys/fs/cgroup/cgroup.procs")));
    }

    #[test]
    fn a_v1_membership_is_rewritten_without_v2() {
        let mut layout = hybrid();
        layout.v2 = None;
        let own = "3:pids:/a/b\n2:cpu,cpuacct:/\n";
        assert_eq!(own_procs_file(&layout, own), Some(PathBuf::from("/sys/fs/cgroup/pids/a/b/cgroup.procs")));
    }

    #[test]
    fn nothing_is_written_outside_the_mounts_or_without_a_line() {
        let layout = hybrid();
        assert_eq!(own_procs_file(&layout, "0::/../../etc\n"), None);
        assert_eq!(own_procs_file(&layout, "garbage\n"), None);
        assert_eq!(own_procs_file(&Layout::default(), "0::/\n"), None);
    }
}
