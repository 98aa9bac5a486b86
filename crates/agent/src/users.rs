//! The `user` an exec runs as: `UID[:GID]` or `NAME[:GROUP]`, names looked
//! up in the sandbox's own /etc/passwd and /etc/group. Those files are the
//! sandbox's view (possibly changed by code inside), which is fine: they
//! only choose among ids of the sandbox's user namespace, none of which is
//! privileged on the host.

use std::path::PathBuf;

/// Who an exec runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// From the passwd entry of `uid`, if there is one.
    pub name: Option<String>,
    pub home: Option<PathBuf>,
}

impl ExecUser {
    /// Makes `cmd` run as this user, with its USER, LOGNAME and HOME.
    pub fn apply(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        // std sets the group, drops supplementary groups (where the user
        // namespace allows setgroups) and then the user, in the child; the
        // change of uid takes the agent's id-switching capabilities with it.
        cmd.uid(self.uid).gid(self.gid);
        if let Some(name) = &self.name {
            cmd.env("USER", name).env("LOGNAME", name);
        }
        if let Some(home) = &self.home {
            cmd.env("HOME", home);
        }
    }
}

/// Resolves `spec` against the sandbox's /etc/passwd and /etc/group.
pub fn resolve(spec: &str) -> Result<ExecUser, String> {
    resolve_in(spec, &read_small("/etc/passwd"), &read_small("/etc/group"))
}

/// The most of /etc/passwd or /etc/group read.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// A regular file's text, at most [`MAX_FILE_BYTES`] of it; empty for
/// anything else. An image's /etc/passwd could be a link to /dev/zero,
/// which would otherwise be read until the agent runs out of memory.
fn read_small(path: &str) -> String {
    use std::io::Read;
    let Ok(file) = std::fs::File::open(path) else { return String::new() };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.take(MAX_FILE_BYTES).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One /etc/passwd line: name, uid, gid, home.
struct Entry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = Entry<'_>> {
    passwd.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 {
            return None;
        }
        Some(Entry {
            name: fields[0],
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5],
        })
    })
}

fn resolve_in(spec: &str, passwd: &str, group: &str) -> Result<ExecUser, String> {
    let (user, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group_part.is_some_and(str::is_empty) {
        return Err(format!("user {spec:?}: give UID[:GID] or NAME[:GROUP]"));
    }
    let (uid, entry) = match user.parse::<u32>() {
        Ok(uid) => (uid, passwd_entries(passwd).find(|e| e.uid == uid)),
        Err(_) => {
            let entry = passwd_entries(passwd)
                .find(|e| e.name == user)
                .ok_or_else(|| format!("no user {user:?} in the sandbox's /etc/passwd"))?;
            (entry.uid, Some(entry))
        }
    };
    let gid = match group_part {
        None => entry.as_ref().map_or(uid, |e| e.gid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .filter_map(|line| {
                    let mut fields = line.split(':');
                    let name = fields.next()?;
                    let gid = fields.nth(1)?.parse::<u32>().ok()?;
                    Some((name, gid))
                })
                .find(|(name, _)| *name == g)
                .map(|(_, gid)| gid)
                .ok_or_else(|| format!("no group {g:?} in the sandbox's /etc/group"))?,
        },
    };
    Ok(ExecUser {
        uid,
        gid,
        name: entry.as_ref().map(|e| e.name.to_owned()),
        home: entry.as_ref().filter(|e| e.home.starts_with('/')).map(|e| PathBuf::from(e.home)),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
                          dev:x:1000:1000::/home/dev:/bin/sh\n\
                          broken line\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:dev\nnogroup:x:65534:\n";

    #[test]
    fn numbers_names_and_groups_resolve() {
        let dev = resolve_in("dev", PASSWD, GROUP).unwrap();
        assert_eq!((dev.uid, dev.gid), (1000, 1000));
        assert_eq!(dev.name.as_deref(), Some("dev"));
        assert_eq!(dev.home, Some(PathBuf::from("/home/dev")));
        let by_number = resolve_in("1000", PASSWD, GROUP).unwrap();
        assert_eq!(by_number, dev);
        assert_eq!(resolve_in("dev:staff", PASSWD, GROUP).unwrap().gid, 50);
        assert_eq!(resolve_in("dev:7", PASSWD, GROUP).unwrap().gid, 7);
        let nobody = resolve_in("nobody", PASSWD, GROUP).unwrap();
        assert_eq!((nobody.uid, nobody.gid), (65534, 65534));
        // A number without an entry is taken as is, its group the same number.
        let bare = resolve_in("4242", PASSWD, GROUP).unwrap();
        assert_eq!((bare.uid, bare.gid, bare.name, bare.home), (4242, 4242, None, None));
    }

    #[test]
    fn only_a_regular_file_is_read_and_only_so_much() {
        assert_eq!(read_small("/dev/zero"), "");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("passwd");
        std::fs::write(&big, vec![b'x'; (MAX_FILE_BYTES + 10) as usize]).unwrap();
        assert_eq!(read_small(big.to_str().unwrap()).len() as u64, MAX_FILE_BYTES);
    }

    #[test]
    fn unknown_or_malformed_users_are_refused() {
        assert!(resolve_in("ghost", PASSWD, GROUP).unwrap_err().contains("no user \"ghost\""));
        assert!(resolve_in("dev:ghosts", PASSWD, GROUP).unwrap_err().contains("no group \"ghosts\""));
        for bad in ["", ":", "dev:", ":50"] {
            assert!(resolve_in(bad, PASSWD, GROUP).is_err(), "{bad:?}");
        }
    }
}
