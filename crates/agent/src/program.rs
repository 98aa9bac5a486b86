//! Finding a command's program on its PATH before the command is started.
//!
//! Given a bare name, the C library's `execvp` calls `execve` in each PATH
//! directory until one succeeds. Inside a sandbox every such call is one the
//! exec trace stops, reads and records: `true` on a usual PATH was four
//! recorded execs, three of them of files that do not exist, and four round
//! trips to the trace's listener before the program ran. The agent looks the
//! name up once instead and starts the program by its path, with the name as
//! given kept as `argv[0]`.
//!
//! The lookup picks what `execve` would accept: the first regular file with
//! the execute bit that applies to the process that will run it, on a mount
//! that allows execution. When it finds nothing, the caller leaves the search
//! to `execvp`, so a missing or unrunnable program fails exactly as before.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::users::ExecUser;

/// Who will run the program: its ids as the sandbox sees them. The command
/// holds no capabilities (root inside included), so the ordinary owner,
/// group and other bits decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runner {
    pub uid: u32,
    pub gid: u32,
}

impl Runner {
    /// The agent's own ids, which a command started without a user keeps.
    fn agent() -> Runner {
        Runner { uid: rustix::process::getuid().as_raw(), gid: rustix::process::getgid().as_raw() }
    }
}

/// A `Command` for `program` as run in `cwd` by `user` (the agent's ids
/// without one): by its path on the PATH the command gets (the last of
/// `envs`), keeping `program` as its `argv[0]`; by the name alone when the
/// lookup finds nothing, so that `execvp` reports the failure as it always
/// has.
pub fn command(program: &str, envs: &[&[(String, String)]], cwd: &Path, user: Option<&ExecUser>) -> Command {
    let runner = user.map_or_else(Runner::agent, |u| Runner { uid: u.uid, gid: u.gid });
    match on_path(program, path_of(envs), cwd, runner) {
        Some(found) => {
            let mut cmd = Command::new(found);
            cmd.arg0(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// The file `program` names on `path` (a PATH value) for a process that runs
/// in `cwd` as `runner`. None when `program` is empty or holds a slash (it is
/// a path already), when there is no PATH, or when no directory holds a file
/// `runner` may execute.
pub fn on_path(program: &str, path: Option<&str>, cwd: &Path, runner: Runner) -> Option<PathBuf> {
    if program.is_empty() || program.contains('/') {
        return None;
    }
    path?.split(':').find_map(|dir| {
        // An empty entry is the working directory, as for execvp; a relative
        // one is relative to it (the child changes there before it execs).
        let dir = if dir.is_empty() { Path::new(".") } else { Path::new(dir) };
        let candidate = cwd.join(dir).join(program);
        may_execute(&candidate, runner).then_some(candidate)
    })
}

/// The last PATH in `envs` (later lists override earlier ones, as they are
/// applied to the command in that order).
pub fn path_of<'a>(envs: &[&'a [(String, String)]]) -> Option<&'a str> {
    envs.iter().rev().find_map(|env| env.iter().rev().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()))
}

fn may_execute(file: &Path, runner: Runner) -> bool {
    let Ok(meta) = std::fs::metadata(file) else { return false };
    if !meta.is_file() {
        return false;
    }
    let bit = if meta.uid() == runner.uid {
        0o100
    } else if meta.gid() == runner.gid {
        0o010
    } else {
        0o001
    };
    if meta.mode() & bit == 0 {
        return false;
    }
    rustix::fs::statvfs(file).is_ok_and(|fs| !fs.f_flag.contains(rustix::fs::StatVfsMountFlags::NOEXEC))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn me() -> Runner {
        Runner::agent()
    }

    #[test]
    fn the_first_executable_file_on_the_path_is_chosen() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
        for d in [&a, &b, &c] {
            std::fs::create_dir(d).unwrap();
        }
        // Not executable, then a directory of that name, then the one.
        file(&a, "tool", 0o644);
        std::fs::create_dir(b.join("tool")).unwrap();
        let wanted = file(&c, "tool", 0o755);
        let path = format!("{}:{}:/nonexistent:{}", a.display(), b.display(), c.display());
        assert_eq!(on_path("tool", Some(&path), Path::new("/"), me()), Some(wanted));
        assert_eq!(on_path("other", Some(&path), Path::new("/"), me()), None);
    }

    #[test]
    fn names_with_a_slash_and_a_missing_path_are_left_to_execvp() {
        assert_eq!(on_path("./tool", Some("/usr/bin"), Path::new("/"), me()), None);
        assert_eq!(on_path("/usr/bin/true", Some("/usr/bin"), Path::new("/"), me()), None);
        assert_eq!(on_path("true", None, Path::new("/"), me()), None);
        assert_eq!(on_path("", Some("/usr/bin"), Path::new("/"), me()), None);
    }

    #[test]
    fn empty_and_relative_entries_are_relative_to_the_working_directory() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("bin")).unwrap();
        let here = file(tmp.path(), "here", 0o755);
        let there = file(&tmp.path().join("bin"), "there", 0o755);
        assert_eq!(on_path("here", Some("/nonexistent::"), tmp.path(), me()), Some(here));
        assert_eq!(on_path("there", Some("bin"), tmp.path(), me()), Some(there));
    }

    #[test]
    fn the_bit_that_applies_to_the_runner_decides() {
        let tmp = tempfile::tempdir().unwrap();
        let owner_only = file(tmp.path(), "owner-only", 0o700);
        let others_only = file(tmp.path(), "others-only", 0o701);
        let path = tmp.path().display().to_string();
        let stranger = Runner { uid: 4242, gid: 4242 };
        assert_eq!(on_path("owner-only", Some(&path), Path::new("/"), me()), Some(owner_only));
        assert_eq!(on_path("owner-only", Some(&path), Path::new("/"), stranger), None);
        assert_eq!(on_path("others-only", Some(&path), Path::new("/"), stranger), Some(others_only));
    }

    #[test]
    fn the_last_path_given_wins() {
        let base = vec![("PATH".to_string(), "/a".to_string()), ("HOME".to_string(), "/".to_string())];
        let request = vec![("PATH".to_string(), "/b".to_string())];
        assert_eq!(path_of(&[&base, &request]), Some("/b"));
        assert_eq!(path_of(&[&base, &[]]), Some("/a"));
        assert_eq!(path_of(&[&[], &[]]), None);
    }
}
