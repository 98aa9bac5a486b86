//! Registry credentials from a Docker-style `config.json`: the file
//! `docker login`, `skopeo login` and `podman login` write. Its `auths`
//! map a registry (as `host[:port]`, or an old-style URL such as
//! `https://host/v1/`) to `auth`, the base64 of `user:password`, or to
//! separate `username` and `password` fields.
//!
//! Where it is found: the file the caller names (`--authfile`), else
//! `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`. Only
//! `auths` are read; credential helpers (`credsStore`, `credHelpers`) run
//! programs and are not used.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("registry credentials {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("registry credentials {path}: not a Docker config.json: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("registry credentials {path}: the entry for {registry} {why}")]
    Entry { path: PathBuf, registry: String, why: &'static str },
}

#[derive(Debug, Default, serde::Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// The config file to read: `explicit`, else `$DOCKER_CONFIG/config.json`,
/// else `$HOME/.docker/config.json`; None when there is none of these.
pub fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_path_buf());
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(Path::new(&dir).join("config.json"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(Path::new(&home).join(".docker/config.json"))
}

/// The `host[:port]` an `auths` key names: old-style keys are URLs.
fn key_host(key: &str) -> &str {
    let bare = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    bare.split('/').next().unwrap_or(bare)
}

/// `user:password` for `registry` (any of `names`, e.g. `docker.io` and
/// `index.docker.io`) from the config file at `path`. A file that is
/// missing holds no credentials (unless it was named explicitly); one that
/// is there but unreadable or malformed is an error, not anonymous access.
pub fn credentials(
    path: &Path,
    explicit: bool,
    names: &[&str],
) -> Result<Option<(String, String)>, AuthError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !explicit => return Ok(None),
        Err(source) => return Err(AuthError::Read { path: path.into(), source }),
    };
    let config: ConfigFile =
        serde_json::from_slice(&bytes).map_err(|source| AuthError::Parse { path: path.into(), source })?;
    let Some((key, entry)) = config.auths.iter().find(|(key, _)| names.contains(&key_host(key))) else {
        return Ok(None);
    };
    let bad = |why| AuthError::Entry { path: path.into(), registry: key.clone(), why };
    if let Some(encoded) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| bad("has an auth that is not base64"))?;
        let text = String::from_utf8(decoded).map_err(|_| bad("has an auth that is not UTF-8"))?;
        let (user, password) =
            text.split_once(':').ok_or_else(|| bad("has an auth without user:password"))?;
        return Ok(Some((user.to_owned(), password.to_owned())));
    }
    match (&entry.username, &entry.password) {
        (Some(user), Some(password)) => Ok(Some((user.clone(), password.clone()))),
        _ => Err(bad("has neither auth nor username and password")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("config.json");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn auth_entries_are_found_by_host_in_either_key_style() {
        let tmp = tempfile::tempdir().unwrap();
        let path = write(
            tmp.path(),
            r#"{"auths": {
                "registry.example.com:5000": {"auth": "dXNlcjpwYTpzcw=="},
                "https://index.docker.io/v1/": {"username": "u2", "password": "p2"}
            }, "credsStore": "desktop"}"#,
        );
        assert_eq!(
            credentials(&path, false, &["registry.example.com:5000"]).unwrap(),
            Some(("user".into(), "pa:ss".into()))
        );
        assert_eq!(
            credentials(&path, false, &["docker.io", "index.docker.io"]).unwrap(),
            Some(("u2".into(), "p2".into()))
        );
        assert_eq!(credentials(&path, false, &["registry.example.com"]).unwrap(), None);
    }

    #[test]
    fn a_missing_file_is_anonymous_unless_named_and_a_bad_one_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("none.json");
        assert_eq!(credentials(&missing, false, &["h"]).unwrap(), None);
        assert!(matches!(credentials(&missing, true, &["h"]), Err(AuthError::Read { .. })));
        let path = write(tmp.path(), "not json");
        assert!(matches!(credentials(&path, false, &["h"]), Err(AuthError::Parse { .. })));
        let path = write(tmp.path(), r#"{"auths": {"h": {"auth": "!!"}}}"#);
        assert!(matches!(credentials(&path, false, &["h"]), Err(AuthError::Entry { .. })));
    }
}
