//! Where the cgroup hierarchies are mounted on this host.
//!
//! Read from `/proc/self/mountinfo` rather than assumed: hybrid hosts mount
//! v1 controllers under `/sys/fs/cgroup/<controller>` and an empty v2 tree at
//! `/sys/fs/cgroup/unified`, pure-v2 hosts mount v2 at `/sys/fs/cgroup`, and
//! containers may mount either anywhere.

use std::fs;
use std::path::{Path, PathBuf};

use super::{Controller, Placement};

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The v2 hierarchy: its mount point and the controllers its root offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct V2Mount {
    pub(crate) path: PathBuf,
    pub(crate) controllers: Vec<String>,
}

/// One v1 hierarchy: its mount point and the controllers bound to it (more
/// than one when co-mounted, e.g. `cpu,cpuacct`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct V1Mount {
    pub(crate) path: PathBuf,
    pub(crate) controllers: Vec<String>,
}

/// Every cgroup hierarchy visible to this process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) v2: Option<V2Mount>,
    pub(crate) v1: Vec<V1Mount>,
}

impl Layout {
    /// Reads the live layout. An unreadable mountinfo yields an empty layout,
    /// which every caller reports as "controller missing" with a fix.
    pub(crate) fn discover() -> Result<Layout, std::io::Error> {
        let text = fs::read_to_string(MOUNTINFO)?;
        let mut layout = parse_mountinfo(&text);
        if let Some(v2) = layout.v2.as_mut() {
            // A v2 root with no readable cgroup.controllers offers nothing we
            // can use for limits; it still tracks processes.
            v2.controllers = fs::read_to_string(v2.path.join("cgroup.controllers"))
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default();
        }
        Ok(layout)
    }

    /// Where `controller` lives: v2 when the v2 root offers it, else its v1
    /// mount. A controller is bound to one hierarchy at a time, so at most
    /// one of the two can really work.
    pub(crate) fn placement(&self, controller: Controller) -> Option<Placement> {
        let name = controller.name();
        let in_v2 = self.v2.as_ref().filter(|v2| v2.controllers.iter().any(|c| c == name));
        if let Some(v2) = in_v2 {
            return Some(Placement::V2(v2.path.clone()));
        }
        self.v1_mount(name).map(|m| Placement::V1(m.path.clone()))
    }

    /// The first v1 mount that carries `controller`.
    pub(crate) fn v1_mount(&self, controller: &str) -> Option<&V1Mount> {
        self.v1.iter().find(|m| m.controllers.iter().any(|c| c == controller))
    }
}

/// Parses mountinfo text into a layout. Pure, so it is unit-tested with
/// hybrid, pure-v2 and pure-v1 samples.
pub(crate) fn parse_mountinfo(text: &str) -> Layout {
    let mut layout = Layout::default();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        // pre: id parent major:minor root mount_point options [optional...]
        // post: fstype source super_options
        let (Some(mount_point), Some(fstype)) = (pre.get(4), post.first()) else {
            continue;
        };
        let path = PathBuf::from(unescape(mount_point));
        match *fstype {
            "cgroup2" => {
                // Prefer the conventional mount when a tree is mounted twice
                // (a bind mount elsewhere sees the same hierarchy).
                let better = match &layout.v2 {
                    None => true,
                    Some(existing) => !is_conventional(&existing.path) && is_conventional(&path),
                };
                if better {
                    layout.v2 = Some(V2Mount { path, controllers: Vec::new() });
                }
            }
            "cgroup" => {
                let controllers: Vec<String> = post
                    .get(2)
                    .map(|opts| opts.split(',').filter(|o| is_v1_controller(o)).map(str::to_owned).collect())
                    .unwrap_or_default();
                let already = layout.v1.iter().any(|m| m.controllers.iter().any(|c| controllers.contains(c)));
                if !controllers.is_empty() && !already {
                    layout.v1.push(V1Mount { path, controllers });
                }
            }
            _ => {}
        }
    }
    layout
}

fn is_conventional(path: &Path) -> bool {
    path == Path::new("/sys/fs/cgroup") || path == Path::new("/sys/fs/cgroup/unified")
}

/// Super options of a v1 mount mix controllers with flags (`rw`,
/// `name=systemd`, `clone_children`); only the plain controller names count.
fn is_v1_controller(opt: &str) -> bool {
    matches!(
        opt,
        "cpu"
            | "cpuacct"
            | "cpuset"
            | "memory"
            | "devices"
            | "freezer"
            | "net_cls"
            | "net_prio"
            | "blkio"
            | "perf_event"
            | "hugetlb"
            | "pids"
            | "rdma"
            | "misc"
    )
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(rest) = bytes.get(i..).filter(|r| !r.is_empty()) {
        if let Some(byte) = octal_escape(rest) {
            out.push(byte);
            i += 4;
        } else {
            out.push(rest[0]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The byte encoded by a leading `\ooo`, if `s` starts with one.
fn octal_escape(s: &[u8]) -> Option<u8> {
    let [b'\\', a, b, c, ..] = s else {
        return None;
    };
    let digit = |d: &u8| (b'0'..=b'7').contains(d).then(|| u32::from(d - b'0'));
    u8::try_from((digit(a)? << 6) | (digit(b)? << 3) | digit(c)?).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_places_controllers_in_v1_when_v2_has_none() {
        let layout = parse_mountinfo(HYBRID);
        assert_eq!(layout.v2.as_ref().unwrap().path, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(layout.placement(Controller::Memory), Some(Placement::V1("/sys/fs/cgroup/memory".into())));
        assert_eq!(
            layout.placement(Controller::Cpu),
            Some(Placement::V1("/sys/fs/cgroup/cpu,cpuacct".into()))
        );
        assert!(layout.v1_mount("freezer").is_some());
        // name=systemd is not a controller and must not appear.
        assert!(layout.v1.iter().all(|m| !m.controllers.is_empty()));
        assert_eq!(layout.v1.len(), 4);
    }

    #[test]
    fn v2_controllers_win_over_v1() {
        let mut layout = parse_mountinfo(HYBRID);
        layout.v2.as_mut().unwrap().controllers = vec!["pids".into()];
        assert_eq!(layout.placement(Controller::Pids), Some(Placement::V2("/sys/fs/cgroup/unified".into())));
        assert_eq!(layout.placement(Controller::Memory), Some(Placement::V1("/sys/fs/cgroup/memory".into())));
    }

    #[test]
    fn pure_v2() {
        let text = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
                    99 23 0:26 / /mnt/other\\040dir rw - cgroup2 cgroup2 rw\n";
        let mut layout = parse_mountinfo(text);
        assert!(layout.v1.is_empty());
        let v2 = layout.v2.as_mut().unwrap();
        assert_eq!(v2.path, PathBuf::from("/sys/fs/cgroup"));
        v2.controllers = vec!["cpu".into(), "memory".into()];
        assert_eq!(layout.placement(Controller::Memory), Some(Placement::V2("/sys/fs/cgroup".into())));
        assert_eq!(layout.placement(Controller::Pids), None);
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/trailing\\04"), "/trailing\\04");
    }
}
