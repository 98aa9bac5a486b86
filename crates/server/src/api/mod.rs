//! The handlers, one file per resource. Each turns a request into calls on
//! the runtime (on a blocking thread) and the result into JSON.

pub mod audit;
pub mod compat;
pub mod events;
pub mod exec;
mod exec_session;
pub mod files;
pub mod meta;
pub mod sandboxes;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::error::ApiError;

/// What ends an exec nobody waits for any more (its process group).
pub(crate) const SIGKILL: i32 = 9;

/// A duration: seconds as a number, or text like "30s", "10m", "2h".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DurationArg {
    Seconds(u64),
    Text(String),
}

impl DurationArg {
    pub fn get(&self, field: &str) -> Result<Duration, ApiError> {
        let d = match self {
            DurationArg::Seconds(s) => Duration::from_secs(*s),
            DurationArg::Text(t) => airlock_policy::parse_duration(t)
                .map_err(|e| ApiError::bad_request("invalid_request", format!("{field}: {e}")))?,
        };
        if d.is_zero() {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("{field} must be longer than zero"),
            ));
        }
        // Far beyond any sensible lifetime, and safe from overflow when
        // added to the clock.
        if d > Duration::from_secs(365 * 24 * 3600) {
            return Err(ApiError::bad_request("invalid_request", format!("{field} must be at most a year")));
        }
        Ok(d)
    }
}

/// A size: bytes as a number, or text like "512M", "2G".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeArg {
    Bytes(u64),
    Text(String),
}

impl SizeArg {
    pub fn get(&self, field: &str) -> Result<u64, ApiError> {
        match self {
            SizeArg::Bytes(b) => Ok(*b),
            SizeArg::Text(t) => airlock_policy::parse_size(t)
                .map_err(|e| ApiError::bad_request("invalid_request", format!("{field}: {e}"))),
        }
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", message)
}

/// Environment variables: names without '=' or NUL, values without NUL.
pub fn check_env(env: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, ApiError> {
    if env.len() > 1024 {
        return Err(invalid("env: at most 1024 variables"));
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(invalid(format!("env: invalid variable name {k:?} (empty, or contains '=' or NUL)")));
        }
        if v.contains('\0') {
            return Err(invalid(format!("env: the value of {k} contains a NUL byte")));
        }
    }
    Ok(env.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Labels: keys of 1-63 characters from `[A-Za-z0-9._/-]` starting with a
/// letter or digit, values of at most 255 characters without control
/// characters; at most 64 labels.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > 64 {
        return Err(invalid("labels: at most 64 labels"));
    }
    for (k, v) in labels {
        let key_ok = (1..=63).contains(&k.len())
            && k.starts_with(|c: char| c.is_ascii_alphanumeric())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
        if !key_ok {
            return Err(invalid(format!(
                "labels: invalid key {k:?}; keys are 1-63 characters of A-Z, a-z, 0-9, '.', '_', '/', '-' \
                 starting with a letter or digit"
            )));
        }
        if v.len() > 255 || v.chars().any(char::is_control) {
            return Err(invalid(format!(
                "labels: the value of {k} must be at most 255 characters without control characters"
            )));
        }
    }
    Ok(())
}

/// Parses a `k=v` label filter.
pub fn label_filter(s: &str) -> Result<(String, String), ApiError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(ApiError::bad_request("invalid_query", format!("label={s:?}: expected label=KEY=VALUE"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(DurationArg::Seconds(30).get("t").unwrap(), Duration::from_secs(30));
        assert_eq!(DurationArg::Text("2m".into()).get("t").unwrap(), Duration::from_secs(120));
        assert!(DurationArg::Seconds(0).get("t").is_err());
        assert!(DurationArg::Text("soon".into()).get("t").is_err());
        assert!(DurationArg::Seconds(u64::MAX).get("t").is_err());
        assert_eq!(SizeArg::Bytes(5).get("m").unwrap(), 5);
        assert_eq!(SizeArg::Text("1M".into()).get("m").unwrap(), 1 << 20);
        assert!(SizeArg::Text("lots".into()).get("m").is_err());
    }

    #[test]
    fn env_and_labels() {
        let ok = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(check_env(&ok).unwrap(), [("A".to_string(), "1".to_string())]);
        for bad in ["", "A=B", "A\0"] {
            assert!(check_env(&BTreeMap::from([(bad.to_string(), String::new())])).is_err(), "{bad:?}");
        }
        assert!(check_env(&BTreeMap::from([("A".to_string(), "x\0".to_string())])).is_err());
        assert!(check_labels(&BTreeMap::from([("team/x.y-z_1".to_string(), "v".to_string())])).is_ok());
        for bad in ["", "-x", "a b", "ä", &"k".repeat(64)] {
            assert!(check_labels(&BTreeMap::from([(bad.to_string(), String::new())])).is_err(), "{bad:?}");
        }
        assert!(check_labels(&BTreeMap::from([("k".to_string(), "\n".to_string())])).is_err());
        assert_eq!(label_filter("a=b=c").unwrap(), ("a".to_string(), "b=c".to_string()));
        assert!(label_filter("=x").is_err() && label_filter("x").is_err());
    }
}
