//! An image's `User` (`uid`, `uid:gid`, `name`, `name:group`) as numbers,
//! names looked up in the image's own /etc/passwd and /etc/group, read from
//! its unpacked layers on the host as the sandbox's overlay would show
//! them: the top layer that has the file wins, a whiteout or an opaque
//! directory hides what is below. Every name is opened below its layer's
//! root without following a symbolic link (`RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`): a passwd that is a link, or under one, is not
//! read (the user is refused), so a layer cannot point the lookup at a host
//! file. Only a regular file is read, and at most [`MAX_FILE_BYTES`] of it.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// The most of /etc/passwd or /etc/group read.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("the image's user {spec:?}: give UID[:GID] or NAME[:GROUP]")]
    Malformed { spec: String },
    #[error("the image's user {name:?} is not in the image's /etc/passwd")]
    NoUser { name: String },
    #[error("the image's group {name:?} is not in the image's /etc/group")]
    NoGroup { name: String },
    #[error(
        "the image's {path} is a symbolic link or lies under one (in layer {layer}); it is not followed, so the \
         image's user {spec:?} cannot be looked up"
    )]
    Link { path: String, layer: PathBuf, spec: String },
    #[error("the image's {path} is not a regular file (in layer {layer})")]
    NotAFile { path: String, layer: PathBuf },
    #[error("reading the image's {path} in layer {layer}: {source}")]
    Read { path: String, layer: PathBuf, source: std::io::Error },
}

/// The ids an image's `User` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageUser {
    pub uid: u32,
    pub gid: u32,
}

/// Resolves `spec` (the image config's `User`) against the image whose
/// unpacked layers are `layers`, bottom first.
pub fn resolve(spec: &str, layers: &[PathBuf]) -> Result<ImageUser, UserError> {
    let malformed = || UserError::Malformed { spec: spec.to_owned() };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(malformed());
    }
    let read = |path: &str| -> Result<String, UserError> {
        let bytes = read_file(layers, path).map_err(|e| match e {
            UserError::Link { path, layer, .. } => UserError::Link { path, layer, spec: spec.to_owned() },
            other => other,
        })?;
        Ok(String::from_utf8_lossy(&bytes.unwrap_or_default()).into_owned())
    };
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, None),
        Err(_) => {
            let passwd = read("etc/passwd")?;
            passwd_entry(&passwd, user).ok_or_else(|| UserError::NoUser { name: user.to_owned() })?
        }
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = read("etc/group")?;
                group_entry(&groups, g).ok_or_else(|| UserError::NoGroup { name: g.to_owned() })?
            }
        },
        // A number alone: its passwd entry's group, or the same number.
        None => match primary_gid {
            Some(gid) => gid,
            None => {
                let passwd = read("etc/passwd")?;
                passwd_by_uid(&passwd, uid).unwrap_or(uid)
            }
        },
    };
    Ok(ImageUser { uid, gid })
}

/// `name`'s uid and gid in a passwd file.
fn passwd_entry(passwd: &str, name: &str) -> Option<(u32, Option<u32>)> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 7 && fields[0] == name)
            .then(|| Some((fields[2].parse().ok()?, Some(fields[3].parse().ok()?))))
            .flatten()
    })
}

/// The gid of `uid`'s passwd entry.
fn passwd_by_uid(passwd: &str, uid: u32) -> Option<u32> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 7 && fields[2].parse() == Ok(uid)).then(|| fields[3].parse().ok()).flatten()
    })
}

/// `name`'s gid in a group file.
fn group_entry(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then(|| fields.nth(1)?.parse().ok()).flatten()
    })
}

/// The file at `path` (relative, e.g. `etc/passwd`) as the overlay of
/// `layers` (bottom first) shows it; None where no layer has it, or a
/// whiteout or opaque directory hides it.
pub fn read_file(layers: &[PathBuf], path: &str) -> Result<Option<Vec<u8>>, UserError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let Some((name, dirs)) = parts.split_last() else { return Ok(None) };
    for layer in layers.iter().rev() {
        match look_in_layer(layer, dirs, name, path)? {
            Found::File(bytes) => return Ok(Some(bytes)),
            Found::Hidden => return Ok(None),
            Found::Nothing { opaque: true } => return Ok(None),
            Found::Nothing { opaque: false } => {}
        }
    }
    Ok(None)
}

enum Found {
    File(Vec<u8>),
    /// A whiteout, or something that is not a directory where one is needed.
    Hidden,
    /// Not in this layer; `opaque`: a directory on the way hides the layers below.
    Nothing {
        opaque: bool,
    },
}

fn look_in_layer(layer: &Path, dirs: &[&str], name: &str, path: &str) -> Result<Found, UserError> {
    let read_error = |source: std::io::Error| UserError::Read {
        path: path.to_owned(),
        layer: layer.to_path_buf(),
        source,
    };
    let link = || UserError::Link { path: path.to_owned(), layer: layer.to_path_buf(), spec: String::new() };
    let open_dir = |at: Option<&OwnedFd>, name: &str| -> Result<OwnedFd, Errno> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS;
        match at {
            Some(dir) => rustix::fs::openat2(dir, name, flags, Mode::empty(), resolve),
            None => rustix::fs::open(layer, flags, Mode::empty()),
        }
    };
    let mut dir = open_dir(None, "").map_err(|e| read_error(e.into()))?;
    let mut opaque = false;
    for (i, component) in dirs.iter().chain(std::iter::once(&name)).enumerate() {
        let stat = match rustix::fs::statat(&dir, *component, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => return Ok(Found::Nothing { opaque }),
            Err(e) => return Err(read_error(e.into())),
        };
        let last = i == dirs.len();
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Symlink => return Err(link()),
            FileType::CharacterDevice if stat.st_rdev == 0 => return Ok(Found::Hidden),
            FileType::Directory if !last => {
                dir = open_dir(Some(&dir), component).map_err(|e| read_error(e.into()))?;
                let mut value = [0u8; 1];
                opaque |= matches!(rustix::fs::fgetxattr(&dir, "user.overlay.opaque", &mut value), Ok(1) if value[0] == b'y');
            }
            FileType::RegularFile if last => {
                let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
                let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS;
                let file = rustix::fs::openat2(&dir, *component, flags, Mode::empty(), resolve)
                    .map_err(|e| read_error(e.into()))?;
                // Checked again on what was opened: the layer is not
                // expected to change, but the read needs a regular file.
                if FileType::from_raw_mode(
                    rustix::fs::fstat(&file).map_err(|e| read_error(e.into()))?.st_mode,
                ) != FileType::RegularFile
                {
                    return Err(UserError::NotAFile { path: path.to_owned(), layer: layer.to_path_buf() });
                }
                let mut bytes = Vec::new();
                std::fs::File::from(file).take(MAX_FILE_BYTES).read_to_end(&mut bytes).map_err(read_error)?;
                return Ok(Found::File(bytes));
            }
            _ if last => {
                return Err(UserError::NotAFile { path: path.to_owned(), layer: layer.to_path_buf() });
            }
            // A file where a directory is needed hides the path.
            _ => return Ok(Found::Hidden),
        }
    }
    Ok(Found::Nothing { opaque })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::fs;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\ndev:x:1000:1001::/home/dev:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:dev\n";

    fn layer(root: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = root.join(name);
        for (path, text) in files {
            let at = dir.join(path);
            fs::create_dir_all(at.parent().unwrap()).unwrap();
            fs::write(at, text).unwrap();
        }
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn whiteout(at: &Path) {
        rustix::fs::mknodat(rustix::fs::CWD, at, FileType::CharacterDevice, Mode::empty(), 0).unwrap();
    }

    #[test]
    fn numbers_names_and_groups_resolve_from_the_top_layer_that_has_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let base = layer(tmp.path(), "base", &[("etc/passwd", "root:x:0:0::/root:/bin/sh\n")]);
        let top = layer(tmp.path(), "top", &[("etc/passwd", PASSWD), ("etc/group", GROUP)]);
        let layers = [base, top];
        assert_eq!(resolve("dev", &layers).unwrap(), ImageUser { uid: 1000, gid: 1001 });
        assert_eq!(resolve("dev:staff", &layers).unwrap(), ImageUser { uid: 1000, gid: 50 });
        assert_eq!(resolve("1000", &layers).unwrap(), ImageUser { uid: 1000, gid: 1001 });
        assert_eq!(resolve("4242:7", &layers).unwrap(), ImageUser { uid: 4242, gid: 7 });
        assert_eq!(resolve("4242", &layers).unwrap(), ImageUser { uid: 4242, gid: 4242 });
        assert!(matches!(resolve("ghost", &layers), Err(UserError::NoUser { .. })));
        assert!(matches!(resolve("dev:ghosts", &layers), Err(UserError::NoGroup { .. })));
        for bad in ["", ":", "dev:", ":50"] {
            assert!(matches!(resolve(bad, &layers), Err(UserError::Malformed { .. })), "{bad:?}");
        }
    }

    #[test]
    fn a_whiteout_or_an_opaque_directory_hides_the_lower_layers_file() {
        let tmp = tempfile::tempdir().unwrap();
        let base = layer(tmp.path(), "base", &[("etc/passwd", PASSWD)]);
        let top = layer(tmp.path(), "top", &[("etc/other", "")]);
        let layers = [base.clone(), top.clone()];
        assert!(read_file(&layers, "etc/passwd").unwrap().is_some());
        whiteout(&top.join("etc/passwd"));
        assert_eq!(read_file(&layers, "etc/passwd").unwrap(), None);
        fs::remove_file(top.join("etc/passwd")).unwrap();
        rustix::fs::setxattr(top.join("etc"), "user.overlay.opaque", b"y", rustix::fs::XattrFlags::empty())
            .unwrap();
        assert_eq!(read_file(&layers, "etc/passwd").unwrap(), None);
        assert!(matches!(resolve("dev", &layers), Err(UserError::NoUser { .. })));
    }

    #[test]
    fn a_link_is_never_followed_out_of_the_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = layer(tmp.path(), "host", &[("etc/passwd", PASSWD)]);
        let evil = layer(tmp.path(), "evil", &[]);
        fs::create_dir_all(evil.join("etc")).unwrap();
        std::os::unix::fs::symlink(outside.join("etc/passwd"), evil.join("etc/passwd")).unwrap();
        let err = resolve("dev", std::slice::from_ref(&evil)).unwrap_err();
        assert!(matches!(err, UserError::Link { .. }), "{err}");
        // A link on the way (etc -> the host's) is not followed either.
        let evil2 = layer(tmp.path(), "evil2", &[]);
        std::os::unix::fs::symlink(outside.join("etc"), evil2.join("etc")).unwrap();
        assert!(matches!(resolve("dev", &[evil2]), Err(UserError::Link { .. })));
        // Numbers alone need no file.
        assert_eq!(resolve("7:8", &[evil]).unwrap(), ImageUser { uid: 7, gid: 8 });
    }
}
