//! Secrets: held by the host side, represented by placeholders inside.
//!
//! Each secret the policy names is read on the host when the sandbox starts
//! (from an environment variable of the airlock process, a file, or a
//! command's output). The sandbox's environment gets a placeholder instead
//! of the value; the egress proxy swaps the value in, in request headers
//! only, on requests to that secret's hosts ([`substitute`]), and back to
//! the placeholder in the responses it relays (`response.rs`).
//!
//! A value only ever travels in an HTTP header, so values that a header
//! cannot carry (line breaks, NUL and other control characters) are refused
//! when read: substituting one would let the sandbox inject headers.

use std::fmt;
use std::io::{self, Read};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{Ordering, compiler_fence};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Every placeholder starts with this, followed by `<NAME>-<32 hex digits>`.
pub const PLACEHOLDER_PREFIX: &str = "airlock-placeholder-";

/// The largest value accepted; a header larger than this is refused by most
/// servers anyway.
pub const MAX_VALUE_LEN: usize = 16 * 1024;

/// The longest a `cmd:` source may run before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// How much of a failed command's error output is quoted in the error.
const STDERR_QUOTE_LEN: usize = 300;

/// Where random placeholder bits come from.
const URANDOM: &str = "/dev/urandom";

/// Attempts at drawing a placeholder that does not collide with any value.
const PLACEHOLDER_ATTEMPTS: usize = 16;

/// A secret's value. Its `Debug` prints `<redacted>`, and the bytes are
/// overwritten when it is dropped (best effort: copies made while reading it
/// may remain in freed memory).
pub struct SecretValue(Vec<u8>);

impl SecretValue {
    /// Wraps bytes that are a secret.
    pub fn new(bytes: Vec<u8>) -> SecretValue {
        SecretValue(bytes)
    }

    /// The value itself, for substitution at the edge and for redaction.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        self.0.fill(0);
        // Keep the writes: the buffer is observed after being zeroed, so the
        // compiler cannot treat the fill as dead.
        std::hint::black_box(&mut self.0);
        compiler_fence(Ordering::SeqCst);
    }
}

/// A secret read on the host, with its per-sandbox placeholder.
#[derive(Debug)]
pub struct ResolvedSecret {
    /// The secret's name, as in the policy (an environment variable name).
    pub name: String,
    /// What the sandbox sees instead of the value.
    pub placeholder: String,
    pub value: SecretValue,
    /// Host patterns as written in the policy; substitution happens only on
    /// requests to hosts they match.
    pub hosts: Vec<String>,
}

impl ResolvedSecret {
    /// The `(name, value)` pair a [`crate::redact::Redactor`] takes.
    pub fn redaction_entry(&self) -> (String, Vec<u8>) {
        (self.name.clone(), self.value.expose().to_vec())
    }
}

/// Where a secret's value comes from on the host (mirrors the policy's
/// `from = "env:…" | "file:…" | "cmd:…"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSourceSpec {
    /// An environment variable of the airlock process, taken as is.
    Env(String),
    /// A file's content, trailing line breaks removed.
    File(PathBuf),
    /// The standard output of `/bin/sh -c COMMAND`, surrounding whitespace
    /// removed; a non-zero exit is an error.
    Cmd(String),
}

impl fmt::Display for SecretSourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSourceSpec::Env(var) => write!(f, "env:{var}"),
            SecretSourceSpec::File(path) => write!(f, "file:{}", path.display()),
            SecretSourceSpec::Cmd(command) => write!(f, "cmd:{command}"),
        }
    }
}

/// Errors reading secrets. Each names the secret and its source, never the
/// value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret name {name:?} is invalid: {reason}")]
    InvalidName { name: String, reason: &'static str },

    #[error("secret {name} is declared twice")]
    Duplicate { name: String },

    #[error("secret {name}: environment variable {var} is not set for the airlock process")]
    EnvMissing { name: String, var: String },

    #[error("secret {name}: cannot read {}: {source}", path.display())]
    ReadFile { name: String, path: PathBuf, source: io::Error },

    #[error("secret {name}: cannot run `{command}` with /bin/sh: {source}")]
    Spawn { name: String, command: String, source: io::Error },

    #[error("secret {name}: `{command}` failed ({status}){}", quote_stderr(.stderr))]
    CommandFailed { name: String, command: String, status: ExitStatus, stderr: String },

    #[error("secret {name}: `{command}` did not finish within {} s and was killed", .timeout.as_secs())]
    CommandTimeout { name: String, command: String, timeout: Duration },

    #[error("secret {name}: {source_spec} gave an empty value; an empty secret is a configuration error")]
    Empty { name: String, source_spec: String },

    #[error(
        "secret {name}: {source_spec} gave more than {MAX_VALUE_LEN} bytes, too large for an HTTP header"
    )]
    TooLarge { name: String, source_spec: String },

    #[error(
        "secret {name}: {source_spec} gave a value with a control character (line break, NUL, …) at byte \
         {offset}; secrets are only placed in HTTP headers, which cannot carry one"
    )]
    NotHeaderSafe { name: String, source_spec: String, offset: usize },

    #[error(
        "secret {name}: its value is so short or plain that it occurs in the placeholders themselves; \
         use the real credential"
    )]
    Collision { name: String },

    #[error("cannot read random bytes from {URANDOM} for secret placeholders: {source}")]
    Random { source: io::Error },
}

fn quote_stderr(stderr: &str) -> String {
    if stderr.is_empty() { String::new() } else { format!(": {stderr}") }
}

/// Reads each secret from its source on the host and gives it a fresh
/// placeholder `airlock-placeholder-<NAME>-<32 hex>` that neither contains
/// nor occurs in any secret's value.
pub fn resolve(
    specs: &[(String, SecretSourceSpec, Vec<String>)],
) -> Result<Vec<ResolvedSecret>, SecretError> {
    resolve_with_timeout(specs, COMMAND_TIMEOUT)
}

fn resolve_with_timeout(
    specs: &[(String, SecretSourceSpec, Vec<String>)],
    timeout: Duration,
) -> Result<Vec<ResolvedSecret>, SecretError> {
    let mut values = Vec::with_capacity(specs.len());
    for (index, (name, spec, _)) in specs.iter().enumerate() {
        validate_name(name)?;
        if specs[..index].iter().any(|(other, _, _)| other == name) {
            return Err(SecretError::Duplicate { name: name.clone() });
        }
        values.push(read_value(name, spec, timeout)?);
    }

    let mut urandom = std::fs::File::open(URANDOM).map_err(|source| SecretError::Random { source })?;
    let mut placeholders: Vec<String> = Vec::with_capacity(specs.len());
    for (name, _, _) in specs {
        let placeholder = draw_placeholder(name, &values, &mut urandom)?;
        placeholders.push(placeholder);
    }

    Ok(specs
        .iter()
        .zip(values)
        .zip(placeholders)
        .map(|(((name, _, hosts), value), placeholder)| ResolvedSecret {
            name: name.clone(),
            placeholder,
            value,
            hosts: hosts.clone(),
        })
        .collect())
}

/// Reads one value from `spec` on the host, checked as every secret's is
/// (not empty, at most [`MAX_VALUE_LEN`], no control character) but given
/// no placeholder: for a credential the host side uses itself. `name`
/// names it in errors.
pub fn read_one(name: &str, spec: &SecretSourceSpec) -> Result<SecretValue, SecretError> {
    read_value(name, spec, COMMAND_TIMEOUT)
}

/// Replaces every placeholder of `secrets` in one header value with the
/// secret's value, in a single left-to-right pass (a substituted value is
/// never scanned again). Returns the new value and whether anything changed.
/// Placeholders of secrets not passed stay as they are.
pub fn substitute(value: &[u8], secrets: &[&ResolvedSecret]) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(value.len());
    let mut replaced = false;
    let mut rest = value;
    while let Some(&first) = rest.first() {
        let hit = secrets.iter().find(|secret| {
            let placeholder = secret.placeholder.as_bytes();
            !placeholder.is_empty() && rest.starts_with(placeholder)
        });
        match hit {
            Some(secret) => {
                out.extend_from_slice(secret.value.expose());
                rest = &rest[secret.placeholder.len()..];
                replaced = true;
            }
            None => {
                out.push(first);
                rest = &rest[1..];
            }
        }
    }
    (out, replaced)
}

/// Secret names become environment variable names inside the sandbox and
/// part of the placeholder, so they are restricted to `[A-Za-z_][A-Za-z0-9_]*`.
fn validate_name(name: &str) -> Result<(), SecretError> {
    let invalid = |reason| Err(SecretError::InvalidName { name: name.to_owned(), reason });
    let Some(first) = name.bytes().next() else {
        return invalid("it is empty");
    };
    if name.len() > 128 {
        return invalid("it is longer than 128 characters");
    }
    if first.is_ascii_digit() {
        return invalid("it starts with a digit");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return invalid("it may hold only letters, digits and '_' (it becomes an environment variable)");
    }
    Ok(())
}

fn read_value(name: &str, spec: &SecretSourceSpec, timeout: Duration) -> Result<SecretValue, SecretError> {
    let mut value = SecretValue::new(Vec::new());
    match spec {
        SecretSourceSpec::Env(var) => match std::env::var_os(var) {
            Some(os) => value.0 = os.into_vec(),
            None => return Err(SecretError::EnvMissing { name: name.to_owned(), var: var.clone() }),
        },
        SecretSourceSpec::File(path) => {
            read_file(name, path, &mut value.0)?;
            trim_end(&mut value.0, |b| b == b'\n' || b == b'\r');
        }
        SecretSourceSpec::Cmd(command) => {
            run_command(name, command, timeout, &mut value.0)?;
            trim_end(&mut value.0, |b| b.is_ascii_whitespace());
            trim_start(&mut value.0, |b| b.is_ascii_whitespace());
        }
    }
    check_value(name, spec, value.expose())?;
    Ok(value)
}

fn check_value(name: &str, spec: &SecretSourceSpec, value: &[u8]) -> Result<(), SecretError> {
    if value.is_empty() {
        return Err(SecretError::Empty { name: name.to_owned(), source_spec: spec.to_string() });
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(SecretError::TooLarge { name: name.to_owned(), source_spec: spec.to_string() });
    }
    // An HTTP field value is visible ASCII, space, tab and obs-text (RFC 9110 §5.5).
    if let Some(offset) = value.iter().position(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(SecretError::NotHeaderSafe {
            name: name.to_owned(),
            source_spec: spec.to_string(),
            offset,
        });
    }
    Ok(())
}

/// Reads at most one byte more than [`MAX_VALUE_LEN`] (so an oversized file
/// is detected without reading all of it).
fn read_file(name: &str, path: &Path, into: &mut Vec<u8>) -> Result<(), SecretError> {
    let err = |source| SecretError::ReadFile { name: name.to_owned(), path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(err)?;
    into.reserve(MAX_VALUE_LEN + 1);
    file.take(limit_plus_one()).read_to_end(into).map_err(err)?;
    Ok(())
}

fn limit_plus_one() -> u64 {
    u64::try_from(MAX_VALUE_LEN).unwrap_or(u64::MAX).saturating_add(1)
}

/// Runs `/bin/sh -c command` with stdin closed, collecting stdout (bounded)
/// and the end of stderr, killing it after `timeout`.
fn run_command(name: &str, command: &str, timeout: Duration, into: &mut Vec<u8>) -> Result<(), SecretError> {
    let timed_out =
        || SecretError::CommandTimeout { name: name.to_owned(), command: command.to_owned(), timeout };
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| SecretError::Spawn {
            name: name.to_owned(),
            command: command.to_owned(),
            source,
        })?;

    // Both pipes are drained on their own threads so that neither can fill
    // up and stall the command; results come back over channels so that a
    // background process keeping a pipe open cannot block us past the
    // deadline.
    let (out_tx, out_rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut buf = Vec::with_capacity(256);
            let mut stdout = stdout;
            let result = (&mut stdout).take(limit_plus_one()).read_to_end(&mut buf).map(|_| ());
            // Keep draining past the limit so the command is not blocked on
            // a full pipe; the excess is discarded.
            let _ = io::copy(&mut stdout, &mut io::sink());
            let _ = out_tx.send(result.map(|()| SecretValue::new(buf)));
        });
    }
    let (err_tx, err_rx) = mpsc::channel();
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.take(64 * 1024).read_to_end(&mut buf);
            let _ = err_tx.send(buf);
        });
    }

    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(timed_out());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SecretError::Spawn {
                    name: name.to_owned(),
                    command: command.to_owned(),
                    source,
                });
            }
        }
    };

    let remaining = deadline.saturating_duration_since(Instant::now());
    if !status.success() {
        let stderr = err_rx.recv_timeout(remaining.min(Duration::from_secs(1))).unwrap_or_default();
        return Err(SecretError::CommandFailed {
            name: name.to_owned(),
            command: command.to_owned(),
            status,
            stderr: stderr_excerpt(&stderr),
        });
    }
    match out_rx.recv_timeout(remaining) {
        Ok(Ok(mut output)) => {
            std::mem::swap(into, &mut output.0);
            Ok(())
        }
        Ok(Err(source)) => {
            Err(SecretError::Spawn { name: name.to_owned(), command: command.to_owned(), source })
        }
        Err(_) => Err(timed_out()),
    }
}

/// The last non-empty line of a failed command's error output, printable
/// characters only, shortened.
fn stderr_excerpt(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text.lines().map(str::trim).rfind(|line| !line.is_empty()).unwrap_or("");
    let mut excerpt: String = line.chars().filter(|c| !c.is_control()).take(STDERR_QUOTE_LEN).collect();
    if line.chars().count() > STDERR_QUOTE_LEN {
        excerpt.push('…');
    }
    excerpt
}

fn trim_end(bytes: &mut Vec<u8>, strip: impl Fn(u8) -> bool) {
    let keep = bytes.iter().rposition(|&b| !strip(b)).map_or(0, |last| last + 1);
    bytes[keep..].fill(0);
    bytes.truncate(keep);
}

fn trim_start(bytes: &mut Vec<u8>, strip: impl Fn(u8) -> bool) {
    let skip = bytes.iter().position(|&b| !strip(b)).unwrap_or(bytes.len());
    if skip > 0 {
        bytes.copy_within(skip.., 0);
        let keep = bytes.len() - skip;
        bytes[keep..].fill(0);
        bytes.truncate(keep);
    }
}

/// Draws `airlock-placeholder-<name>-<32 hex>` until it neither contains
/// nor is contained in any of `values`.
fn draw_placeholder(
    name: &str,
    values: &[SecretValue],
    urandom: &mut impl Read,
) -> Result<String, SecretError> {
    for _ in 0..PLACEHOLDER_ATTEMPTS {
        let mut random = [0u8; 16];
        urandom.read_exact(&mut random).map_err(|source| SecretError::Random { source })?;
        let mut placeholder = String::with_capacity(PLACEHOLDER_PREFIX.len() + name.len() + 33);
        placeholder.push_str(PLACEHOLDER_PREFIX);
        placeholder.push_str(name);
        placeholder.push('-');
        for byte in random {
            placeholder.push(hex_digit(byte >> 4));
            placeholder.push(hex_digit(byte & 0x0f));
        }
        let collides = values.iter().any(|value| {
            contains(value.expose(), placeholder.as_bytes())
                || contains(placeholder.as_bytes(), value.expose())
        });
        if !collides {
            return Ok(placeholder);
        }
    }
    Err(SecretError::Collision { name: name.to_owned() })
}

fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(nibble & 0x0f)])
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn spec(name: &str, source: SecretSourceSpec) -> (String, SecretSourceSpec, Vec<String>) {
        (name.to_owned(), source, vec!["api.example.com".to_owned()])
    }

    fn resolve_one(source: SecretSourceSpec) -> Result<ResolvedSecret, SecretError> {
        let mut all = resolve(&[spec("TOKEN", source)])?;
        Ok(all.remove(0))
    }

    fn is_placeholder_for(placeholder: &str, name: &str) -> bool {
        let Some(rest) = placeholder.strip_prefix(PLACEHOLDER_PREFIX) else { return false };
        let Some(hex) = rest.strip_prefix(name).and_then(|r| r.strip_prefix('-')) else { return false };
        hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    #[test]
    fn env_source_reads_the_airlock_process_environment() {
        // PATH is set for any test run and is header-safe.
        let expected = std::env::var_os("PATH").unwrap().into_vec();
        let secret = resolve_one(SecretSourceSpec::Env("PATH".into())).unwrap();
        assert_eq!(secret.value.expose(), expected.as_slice());
        assert_eq!(secret.hosts, vec!["api.example.com".to_owned()]);
        assert!(is_placeholder_for(&secret.placeholder, "TOKEN"), "{}", secret.placeholder);
    }

    #[test]
    fn missing_env_var_is_an_error_naming_secret_and_variable() {
        let err = resolve_one(SecretSourceSpec::Env("AIRLOCK_TEST_SURELY_UNSET_4F1D".into())).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SecretError::EnvMissing { .. }));
        assert!(msg.contains("TOKEN") && msg.contains("AIRLOCK_TEST_SURELY_UNSET_4F1D"), "{msg}");
    }

    #[test]
    fn file_source_trims_trailing_line_breaks_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, b"  tok en-123\r\n\n").unwrap();
        let secret = resolve_one(SecretSourceSpec::File(path)).unwrap();
        assert_eq!(secret.value.expose(), b"  tok en-123");
    }

    #[test]
    fn file_errors_name_the_path_and_refuse_bad_values_without_showing_them() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent");
        let err = resolve_one(SecretSourceSpec::File(missing.clone())).unwrap_err();
        assert!(err.to_string().contains(&missing.display().to_string()), "{err}");

        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"\n").unwrap();
        assert!(matches!(resolve_one(SecretSourceSpec::File(empty)), Err(SecretError::Empty { .. })));

        let multiline = dir.path().join("multi");
        std::fs::write(&multiline, b"first-line-secret\nsecond-line\n").unwrap();
        let err = resolve_one(SecretSourceSpec::File(multiline)).unwrap_err();
        assert!(matches!(err, SecretError::NotHeaderSafe { offset: 17, .. }), "{err:?}");
        assert!(!err.to_string().contains("first-line-secret"), "{err}");

        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; MAX_VALUE_LEN + 10]).unwrap();
        assert!(matches!(resolve_one(SecretSourceSpec::File(big)), Err(SecretError::TooLarge { .. })));
    }

    #[test]
    fn command_source_trims_stdout() {
        let secret = resolve_one(SecretSourceSpec::Cmd("printf '  tok-from-cmd \\n\\n'".into())).unwrap();
        assert_eq!(secret.value.expose(), b"tok-from-cmd");
    }

    #[test]
    fn failing_command_names_the_secret_and_quotes_its_error() {
        let err = resolve_one(SecretSourceSpec::Cmd("echo not logged in >&2; exit 3".into())).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SecretError::CommandFailed { .. }), "{err:?}");
        assert!(msg.contains("TOKEN") && msg.contains("not logged in") && msg.contains('3'), "{msg}");

        // Output before a failure is never reported.
        let err =
            resolve_one(SecretSourceSpec::Cmd("printf 'half-%s' printed-value; exit 1".into())).unwrap_err();
        assert!(!err.to_string().contains("half-printed-value"), "{err}");

        let err = resolve_one(SecretSourceSpec::Cmd("true".into())).unwrap_err();
        assert!(matches!(err, SecretError::Empty { .. }), "{err:?}");
    }

    #[test]
    fn hanging_command_is_killed_at_the_deadline() {
        let start = Instant::now();
        let specs = [spec("SLOW", SecretSourceSpec::Cmd("sleep 5; echo late".into()))];
        let err = resolve_with_timeout(&specs, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, SecretError::CommandTimeout { .. }), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn names_are_validated_and_unique() {
        let ok = SecretSourceSpec::Cmd("echo value-long-enough".into());
        for bad in ["", "9LIVES", "HAS-DASH", "a b"] {
            let err = resolve(&[spec(bad, ok.clone())]).unwrap_err();
            assert!(matches!(err, SecretError::InvalidName { .. }), "{bad:?}: {err:?}");
        }
        let err = resolve(&[spec("A", ok.clone()), spec("A", ok)]).unwrap_err();
        assert!(matches!(err, SecretError::Duplicate { .. }));
    }

    #[test]
    fn placeholders_are_fresh_per_resolve_and_distinct_per_secret() {
        let specs = [
            spec("ONE", SecretSourceSpec::Cmd("echo first-secret-value".into())),
            spec("TWO", SecretSourceSpec::Cmd("echo second-secret-value".into())),
        ];
        let a = resolve(&specs).unwrap();
        let b = resolve(&specs).unwrap();
        assert!(is_placeholder_for(&a[0].placeholder, "ONE"));
        assert!(is_placeholder_for(&a[1].placeholder, "TWO"));
        assert_ne!(a[0].placeholder, b[0].placeholder);
        assert_ne!(a[0].placeholder, a[1].placeholder);
    }

    #[test]
    fn a_value_inside_every_placeholder_is_refused() {
        let err = resolve_one(SecretSourceSpec::Cmd("echo airlock".into())).unwrap_err();
        assert!(matches!(err, SecretError::Collision { .. }), "{err:?}");
    }

    #[test]
    fn debug_never_shows_the_value() {
        let secret = resolve_one(SecretSourceSpec::Cmd("echo very-secret-value".into())).unwrap();
        let shown = format!("{secret:?} {:?}", secret.value);
        assert!(!shown.contains("very-secret-value"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert_eq!(secret.redaction_entry(), ("TOKEN".to_owned(), b"very-secret-value".to_vec()));
    }

    fn fixed(name: &str, placeholder: &str, value: &[u8]) -> ResolvedSecret {
        ResolvedSecret {
            name: name.to_owned(),
            placeholder: placeholder.to_owned(),
            value: SecretValue::new(value.to_vec()),
            hosts: Vec::new(),
        }
    }

    #[test]
    fn substitute_replaces_only_the_given_placeholders() {
        let one = fixed("ONE", "airlock-placeholder-ONE-00112233445566778899aabbccddeeff", b"v1");
        let two = fixed("TWO", "airlock-placeholder-TWO-ffeeddccbbaa99887766554433221100", b"value-two");
        let header = format!("Bearer {} x {} {}", one.placeholder, two.placeholder, one.placeholder);

        let (out, changed) = substitute(header.as_bytes(), &[&one, &two]);
        assert!(changed);
        assert_eq!(out, b"Bearer v1 x value-two v1");

        let (out, changed) = substitute(header.as_bytes(), &[&two]);
        assert!(changed);
        assert_eq!(out, format!("Bearer {} x value-two {}", one.placeholder, one.placeholder).as_bytes());

        let (out, changed) = substitute(b"no placeholder here", &[&one, &two]);
        assert!(!changed);
        assert_eq!(out, b"no placeholder here");

        // A truncated placeholder is left alone.
        let cut = &one.placeholder[..one.placeholder.len() - 1];
        assert_eq!(substitute(cut.as_bytes(), &[&one]), (cut.as_bytes().to_vec(), false));
    }

    #[test]
    fn substituted_values_are_not_scanned_again() {
        let two = fixed("TWO", "airlock-placeholder-TWO-ffeeddccbbaa99887766554433221100", b"two");
        let one = fixed(
            "ONE",
            "airlock-placeholder-ONE-00112233445566778899aabbccddeeff",
            two.placeholder.as_bytes(),
        );
        let (out, _) = substitute(one.placeholder.as_bytes(), &[&one, &two]);
        assert_eq!(out, two.placeholder.as_bytes());
    }

    #[test]
    fn empty_placeholders_are_ignored() {
        let odd = fixed("ODD", "", b"x");
        assert_eq!(substitute(b"abc", &[&odd]), (b"abc".to_vec(), false));
    }
}
