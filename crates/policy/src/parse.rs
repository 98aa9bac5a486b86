//! One policy file's text → a [`Layer`]: the keys it sets, type-checked and
//! range-checked, each error pinned to the line and column of the key or value.
//!
//! The file is walked through toml's spanned document tree rather than serde
//! derive so that every message (unknown key, bad enum, bad size) is ours and
//! names the section and key the way the documentation does.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::error::{FileErrorKind, PolicyError};
use crate::image::{check_registry, check_username};
use crate::network::{check_method, path_glob};
use crate::{
    CleanupAction, Egress, HostPattern, HostRule, RegistryCredential, Secret, SecretSource, Tier, Weakening,
    WorkspaceMode, Writeback, parse_duration, parse_size,
};

pub(crate) type Span = Range<usize>;

const MIB: u64 = 1024 * 1024;

const TOP_KEYS: &[&str] = &[
    "extends",
    "description",
    "isolation",
    "filesystem",
    "workspace",
    "limits",
    "network",
    "artifacts",
    "cleanup",
    "env",
    "secrets",
    "audit",
    "image",
];
const ISOLATION_KEYS: &[&str] = &["tier", "allow_weaker", "containers", "containers_flag"];
const FILESYSTEM_KEYS: &[&str] = &["read_only", "hidden", "tmp_size"];
const WORKSPACE_KEYS: &[&str] = &["mode", "writeback", "protected"];
const LIMITS_KEYS: &[&str] = &[
    "timeout",
    "memory",
    "pids",
    "cpus",
    "disk",
    "nofile",
    "log_size",
    "audit_size",
    "stop_grace",
    "allow_raise",
];
const NETWORK_KEYS: &[&str] =
    &["egress", "transparent", "ports", "allow", "deny", "allow_flag", "extra_roots", "rule"];
/// The `[network]` keys a built-in must set; `rule` is an array of tables a
/// profile may leave out.
const NETWORK_REQUIRED: &[&str] =
    &["egress", "transparent", "ports", "allow", "deny", "allow_flag", "extra_roots"];
const RULE_KEYS: &[&str] = &["host", "methods", "paths"];
const SECRET_KEYS: &[&str] = &["from", "hosts"];
const ARTIFACTS_KEYS: &[&str] = &["capture", "max_bytes"];
const CLEANUP_KEYS: &[&str] = &["on_success", "on_failure"];
const ENV_KEYS: &[&str] = &["pass", "set"];
const AUDIT_KEYS: &[&str] = &["exec_trace"];
const IMAGE_KEYS: &[&str] = &["ref", "require_digest", "registries", "insecure", "credentials"];
/// The `[image]` keys a built-in must set: no built-in names an image or
/// credentials.
const IMAGE_REQUIRED: &[&str] = &["require_digest", "registries", "insecure"];
const CREDENTIAL_KEYS: &[&str] = &["username", "password"];

/// Every section and its keys; a built-in profile must set all of them.
pub(crate) const SCHEMA: &[(&str, &[&str])] = &[
    ("isolation", ISOLATION_KEYS),
    ("filesystem", FILESYSTEM_KEYS),
    ("workspace", WORKSPACE_KEYS),
    ("limits", LIMITS_KEYS),
    ("network", NETWORK_REQUIRED),
    ("artifacts", ARTIFACTS_KEYS),
    ("cleanup", CLEANUP_KEYS),
    ("env", ENV_KEYS),
    ("audit", AUDIT_KEYS),
    ("image", IMAGE_REQUIRED),
];

/// The keys one policy file sets; `None` means "inherit from the base".
#[derive(Debug, Default)]
pub(crate) struct Layer {
    pub extends: Option<Spanned<String>>,
    pub description: Option<String>,
    pub tier: Option<Tier>,
    pub allow_weaker: Option<BTreeSet<Weakening>>,
    pub containers: Option<bool>,
    pub containers_flag: Option<bool>,
    pub read_only: Option<Vec<PathBuf>>,
    pub hidden: Option<Vec<PathBuf>>,
    pub tmp_size: Option<u64>,
    pub mode: Option<Spanned<WorkspaceMode>>,
    pub writeback: Option<Spanned<Writeback>>,
    pub protected: Option<Vec<String>>,
    pub timeout: Option<Duration>,
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    pub cpus: Option<f64>,
    pub disk: Option<u64>,
    pub nofile: Option<u64>,
    pub log_size: Option<u64>,
    pub audit_size: Option<u64>,
    pub stop_grace: Option<Duration>,
    pub allow_raise: Option<bool>,
    pub egress: Option<Egress>,
    pub transparent: Option<bool>,
    pub ports: Option<bool>,
    pub allow: Option<Vec<HostPattern>>,
    pub deny: Option<Vec<HostPattern>>,
    pub allow_flag: Option<bool>,
    pub extra_roots: Option<Vec<PathBuf>>,
    pub rules: Option<Vec<HostRule>>,
    pub capture: Option<Vec<String>>,
    pub max_bytes: Option<u64>,
    pub on_success: Option<CleanupAction>,
    pub on_failure: Option<CleanupAction>,
    pub pass: Option<Vec<String>>,
    pub set: Option<BTreeMap<String, String>>,
    pub exec_trace: Option<bool>,
    pub image_ref: Option<String>,
    pub require_digest: Option<bool>,
    pub registries: Option<Vec<String>>,
    pub insecure: Option<Vec<String>>,
    /// Registry credentials this file defines, by registry.
    pub credentials: BTreeMap<String, RegistryCredential>,
    /// Secrets this file defines, each with the span of its table.
    pub secrets: Vec<(Span, Secret)>,
    /// "section.key" for every key present, with the span of its value: to
    /// check built-ins are complete and to point at keys in cross-key errors.
    pub keys_set: BTreeMap<String, Span>,
}

/// The file being parsed, for turning byte spans into `path:line:column`.
pub(crate) struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    pub fn error(&self, span: Span, kind: FileErrorKind) -> PolicyError {
        let (line, column) = line_column(self.text, span.start);
        PolicyError::File { path: self.path.to_path_buf(), line, column, kind }
    }

    pub fn invalid(&self, span: Span, section: &str, key: &str, reason: String) -> PolicyError {
        self.error(
            span,
            FileErrorKind::InvalidValue { section: section.to_string(), key: key.to_string(), reason },
        )
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// Parses one policy file into the keys it sets.
pub(crate) fn parse_layer(src: &Source<'_>) -> Result<Layer, PolicyError> {
    let doc = DeTable::parse(src.text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        src.error(span, FileErrorKind::Syntax(e.message().trim().to_string()))
    })?;
    let top = Section { src, name: String::new(), table: doc.get_ref(), allowed: TOP_KEYS };
    top.check_unknown()?;

    let mut layer = Layer {
        extends: top.string("extends")?,
        description: top.string("description")?.map(Spanned::into_inner),
        ..Layer::default()
    };

    if let Some(s) = top.section("isolation", ISOLATION_KEYS)? {
        layer.tier = s.keyword::<Tier>("tier")?.map(Spanned::into_inner);
        layer.allow_weaker = s.keyword_list::<Weakening>("allow_weaker")?.map(|v| v.into_iter().collect());
        layer.containers = s.boolean("containers")?;
        layer.containers_flag = s.boolean("containers_flag")?;
        layer.keys_set.extend(s.present());
    }
    if let Some(s) = top.section("filesystem", FILESYSTEM_KEYS)? {
        layer.read_only = s.path_list("read_only")?;
        layer.hidden = s.path_list("hidden")?;
        layer.tmp_size = s.size_at_least("tmp_size", MIB)?;
        layer.keys_set.extend(s.present());
    }
    if let Some(s) = top.section("workspace", WORKSPACE_KEYS)? {
        layer.mode = s.keyword::<WorkspaceMode>("mode")?;
        layer.writeback = s.keyword::<Writeback>("writeback")?;
        layer.protected = s.glob_list("protected")?;
        layer.keys_set.extend(s.present());
    }
    if let Some(s) = top.section("limits", LIMITS_KEYS)? {
        layer.timeout = s.duration_positive("timeout")?;
        layer.memory = s.size_at_least("memory", 16 * MIB)?;
        layer.pids = s.integer_between("pids", crate::MIN_PIDS, crate::MAX_PIDS)?;
        layer.cpus = s.cpus("cpus")?;
        layer.disk = s.size_at_least("disk", MIB)?;
        // The kernel refuses more than fs.nr_open (1048576 by default).
        layer.nofile = s.integer_between("nofile", 16, 1 << 20)?;
        // Room for a useful log and the marker saying it was cut.
        layer.log_size = s.size_at_least("log_size", 64 * 1024)?;
        layer.audit_size = s.size_at_least("audit_size", MIB)?;
        layer.stop_grace = s.duration_at_most("stop_grace", crate::MAX_STOP_GRACE)?;
        layer.allow_raise = s.boolean("allow_raise")?;
        layer.keys_set.extend(s.present());
    }
    if let Some(s) = top.section("network", NETWORK_KEYS)? {
        layer.egress = s.keyword::<Egress>("egress")?.map(Spanned::into_inner);
        layer.transparent = s.boolean("transparent")?;
        layer.ports = s.boolean("ports")?;
        layer.allow = s.host_list("allow", true)?;
        layer.deny = s.host_list("deny", true)?;
        layer.allow_flag = s.boolean("allow_flag")?;
        layer.extra_roots = s.path_list("extra_roots")?;
        layer.rules = s.rules("rule")?;
        layer.keys_set.extend(s.present());
    }
    if let Some(s) = top.section("artifacts", ARTIFACTS_KEYS)? {
        layer.capture = s.glob_list("capture")?;
        layer.max_bytes = s.size_at_least("max_bytes", 0)?;
        layer.keys_set.extend(s.present());
    }
    if let Some(s) = top.section("cleanup", CLEANUP_KEYS)? {
        layer.on_success = s.keyword::<CleanupAction>("on_success")?.map(Spanned::into_inner);
        layer.on_failure = s.keyword::<CleanupAction>("on_failure")?.map(Spanned::into_inner);
        layer.keys_set.extend(s.present());
    }
    if let Some(s) = top.section("env", ENV_KEYS)? {
        layer.pass = s.env_names("pass")?;
        layer.set = s.env_map("set")?;
        layer.keys_set.extend(s.present());
    }
    if let Some(s) = top.section("audit", AUDIT_KEYS)? {
        layer.exec_trace = s.boolean("exec_trace")?;
        layer.keys_set.extend(s.present());
    }
    if let Some(s) = top.section("image", IMAGE_KEYS)? {
        layer.image_ref = s.string("ref")?.map(Spanned::into_inner);
        layer.require_digest = s.boolean("require_digest")?;
        layer.registries =
            s.string_list("registries")?.map(|l| l.into_iter().map(Spanned::into_inner).collect());
        layer.insecure = s.registry_list("insecure")?;
        layer.credentials = s.registry_credentials("credentials")?;
        layer.keys_set.extend(s.present());
    }
    layer.secrets = top.secrets("secrets")?;
    Ok(layer)
}

/// A registry password's secret source. A value of no known kind is likely
/// the password itself, written where its source belongs: the message does
/// not repeat it.
fn password_source(text: &str) -> Result<SecretSource, String> {
    let known = ["env:", "file:", "cmd:"].iter().any(|kind| text.starts_with(kind));
    if !known {
        return Err("is not a secret source: write \"env:NAME\", \"file:/absolute/path\" or \
                    \"cmd:COMMAND\" (the password itself never goes in a policy file)"
            .to_string());
    }
    SecretSource::parse(text)
}

/// Checks an environment variable name; shared with CLI overrides.
pub(crate) fn check_env_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("environment variable name is empty".to_string())
    } else if name.contains('=') || name.contains('\0') {
        Err(format!("environment variable name {name:?} must not contain '=' or NUL"))
    } else {
        Ok(())
    }
}

/// Checks a variable name that a shell can use: letters, digits and '_', not
/// starting with a digit. Secrets need this because their placeholder is read
/// by whatever tool runs inside.
pub(crate) fn check_portable_env_name(name: &str) -> Result<(), String> {
    check_env_name(name)?;
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!(
            "environment variable name {name:?} must start with a letter or '_' and contain \
             only letters, digits and '_'"
        ));
    }
    Ok(())
}

/// Host paths must be absolute and free of `..` so what is hidden or bound is
/// exactly what the policy author sees.
pub(crate) fn check_host_path(p: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(p);
    if p.contains('\0') {
        return Err(format!("path {p:?} contains a NUL byte"));
    }
    if !path.is_absolute() {
        return Err(format!("path {p:?} must be absolute, e.g. \"/opt/tools\""));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("path {p:?} must not contain \"..\""));
    }
    Ok(path)
}

/// Workspace globs must stay inside the workspace and compile.
fn check_glob(g: &str) -> Result<(), String> {
    if g.is_empty() {
        return Err("glob is empty".to_string());
    }
    if g.starts_with('/') {
        return Err(format!("glob {g:?} must be relative to the workspace root, e.g. \"**/*.log\""));
    }
    if g.split(['/', '\\']).any(|part| part == "..") {
        return Err(format!("glob {g:?} must not contain \"..\""));
    }
    globset::Glob::new(g).map(|_| ()).map_err(|e| format!("glob {g:?} is invalid: {}", e.kind()))
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

type Entry<'t, 'i> = (&'t Spanned<std::borrow::Cow<'i, str>>, &'t Spanned<DeValue<'i>>);

/// One TOML table being read against its list of allowed keys.
struct Section<'s, 't, 'i> {
    src: &'s Source<'s>,
    name: String,
    table: &'t DeTable<'i>,
    allowed: &'static [&'static str],
}

impl<'s, 't, 'i> Section<'s, 't, 'i> {
    /// Rejects keys not in the schema, reporting the first one in the file.
    fn check_unknown(&self) -> Result<(), PolicyError> {
        let mut unknown: Vec<Entry<'t, 'i>> =
            self.table.iter().filter(|(k, _)| !self.allowed.contains(&k.get_ref().as_ref())).collect();
        unknown.sort_by_key(|(k, _)| k.span().start);
        match unknown.first() {
            Some((key, _)) => Err(self.src.error(
                key.span(),
                FileErrorKind::UnknownKey {
                    section: self.name.clone(),
                    key: key.get_ref().to_string(),
                    expected: self.allowed,
                },
            )),
            None => Ok(()),
        }
    }

    fn entry(&self, key: &str) -> Option<Entry<'t, 'i>> {
        self.table.iter().find(|(k, _)| k.get_ref().as_ref() == key)
    }

    /// "section.key" and the value's span for each key present in this table.
    fn present(&self) -> Vec<(String, Span)> {
        self.table.iter().map(|(k, v)| (format!("{}.{}", self.name, k.get_ref()), v.span())).collect()
    }

    fn wrong_type(&self, key: &str, value: &Spanned<DeValue<'_>>, expected: &'static str) -> PolicyError {
        self.src.error(
            value.span(),
            FileErrorKind::WrongType {
                section: self.name.clone(),
                key: key.to_string(),
                expected,
                found: type_name(value.get_ref()),
            },
        )
    }

    fn invalid(&self, span: Span, key: &str, reason: String) -> PolicyError {
        self.src.invalid(span, &self.name, key, reason)
    }

    fn section(
        &self,
        key: &'static str,
        allowed: &'static [&'static str],
    ) -> Result<Option<Section<'s, 't, 'i>>, PolicyError> {
        let Some((_, value)) = self.entry(key) else {
            return Ok(None);
        };
        let DeValue::Table(table) = value.get_ref() else {
            return Err(self.wrong_type(key, value, "a table"));
        };
        let section = Section { src: self.src, name: key.to_string(), table, allowed };
        section.check_unknown()?;
        Ok(Some(section))
    }

    fn string(&self, key: &str) -> Result<Option<Spanned<String>>, PolicyError> {
        match self.entry(key) {
            None => Ok(None),
            Some((_, v)) => match v.get_ref() {
                DeValue::String(s) => Ok(Some(Spanned::new(v.span(), s.to_string()))),
                _ => Err(self.wrong_type(key, v, "a string")),
            },
        }
    }

    fn string_list(&self, key: &str) -> Result<Option<Vec<Spanned<String>>>, PolicyError> {
        let Some((_, v)) = self.entry(key) else {
            return Ok(None);
        };
        let DeValue::Array(items) = v.get_ref() else {
            return Err(self.wrong_type(key, v, "an array of strings"));
        };
        items
            .iter()
            .map(|item| match item.get_ref() {
                DeValue::String(s) => Ok(Spanned::new(item.span(), s.to_string())),
                _ => Err(self.wrong_type(key, item, "a string")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn keyword<T: FromStr<Err = String>>(&self, key: &str) -> Result<Option<Spanned<T>>, PolicyError> {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        let span = s.span();
        T::from_str(s.get_ref())
            .map(|v| Some(Spanned::new(span.clone(), v)))
            .map_err(|reason| self.invalid(span, key, reason))
    }

    fn keyword_list<T: FromStr<Err = String>>(&self, key: &str) -> Result<Option<Vec<T>>, PolicyError> {
        let Some(items) = self.string_list(key)? else {
            return Ok(None);
        };
        items
            .into_iter()
            .map(|s| T::from_str(s.get_ref()).map_err(|reason| self.invalid(s.span(), key, reason)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn path_list(&self, key: &str) -> Result<Option<Vec<PathBuf>>, PolicyError> {
        let Some(items) = self.string_list(key)? else {
            return Ok(None);
        };
        items
            .into_iter()
            .map(|s| check_host_path(s.get_ref()).map_err(|reason| self.invalid(s.span(), key, reason)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn glob_list(&self, key: &str) -> Result<Option<Vec<String>>, PolicyError> {
        let Some(items) = self.string_list(key)? else {
            return Ok(None);
        };
        items
            .into_iter()
            .map(|s| {
                check_glob(s.get_ref())
                    .map_err(|reason| self.invalid(s.span(), key, reason))
                    .map(|()| s.into_inner())
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn env_names(&self, key: &str) -> Result<Option<Vec<String>>, PolicyError> {
        let Some(items) = self.string_list(key)? else {
            return Ok(None);
        };
        items
            .into_iter()
            .map(|s| {
                check_env_name(s.get_ref())
                    .map_err(|reason| self.invalid(s.span(), key, reason))
                    .map(|()| s.into_inner())
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn env_map(&self, key: &str) -> Result<Option<BTreeMap<String, String>>, PolicyError> {
        let Some((_, v)) = self.entry(key) else {
            return Ok(None);
        };
        let DeValue::Table(table) = v.get_ref() else {
            return Err(self.wrong_type(key, v, "a table of strings, e.g. { CI = \"true\" }"));
        };
        let mut out = BTreeMap::new();
        for (name, value) in table.iter() {
            check_env_name(name.get_ref()).map_err(|reason| self.invalid(name.span(), key, reason))?;
            let DeValue::String(text) = value.get_ref() else {
                return Err(self.wrong_type(key, value, "a string value"));
            };
            if text.contains('\0') {
                return Err(self.invalid(
                    value.span(),
                    key,
                    format!("value of {} contains a NUL byte", name.get_ref()),
                ));
            }
            out.insert(name.get_ref().to_string(), text.to_string());
        }
        Ok(Some(out))
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, PolicyError> {
        match self.entry(key) {
            None => Ok(None),
            Some((_, v)) => match v.get_ref() {
                DeValue::Boolean(b) => Ok(Some(*b)),
                _ => Err(self.wrong_type(key, v, "true or false")),
            },
        }
    }

    /// A non-negative integer value, or `None` with the span when the value
    /// is not an integer at all (callers decide what else they accept).
    fn unsigned(&self, key: &str, v: &Spanned<DeValue<'_>>) -> Result<Option<u64>, PolicyError> {
        let DeValue::Integer(int) = v.get_ref() else {
            return Ok(None);
        };
        let n = i128::from_str_radix(int.as_str(), int.radix())
            .map_err(|_| self.invalid(v.span(), key, format!("integer {int} is out of range")))?;
        u64::try_from(n)
            .map(Some)
            .map_err(|_| self.invalid(v.span(), key, format!("{int} must not be negative")))
    }

    fn integer_between(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, PolicyError> {
        let Some((_, v)) = self.entry(key) else {
            return Ok(None);
        };
        let Some(n) = self.unsigned(key, v)? else {
            return Err(self.wrong_type(key, v, "an integer"));
        };
        if n < min {
            return Err(self.invalid(v.span(), key, format!("{n} is too small: must be at least {min}")));
        }
        if n > max {
            return Err(self.invalid(v.span(), key, format!("{n} is too large: must be at most {max}")));
        }
        Ok(Some(n))
    }

    fn size_at_least(&self, key: &str, min: u64) -> Result<Option<u64>, PolicyError> {
        let Some((_, v)) = self.entry(key) else {
            return Ok(None);
        };
        let n = match v.get_ref() {
            DeValue::String(s) => parse_size(s).map_err(|reason| self.invalid(v.span(), key, reason))?,
            _ => match self.unsigned(key, v)? {
                Some(n) => n,
                None => {
                    return Err(self.wrong_type(key, v, "a size such as \"512M\" or a number of bytes"));
                }
            },
        };
        if n < min {
            return Err(self.invalid(
                v.span(),
                key,
                format!(
                    "{} is too small: must be at least {}",
                    crate::format_size(n),
                    crate::format_size(min)
                ),
            ));
        }
        Ok(Some(n))
    }

    fn duration_positive(&self, key: &str) -> Result<Option<Duration>, PolicyError> {
        let Some((_, v)) = self.entry(key) else {
            return Ok(None);
        };
        let d = match v.get_ref() {
            DeValue::String(s) => parse_duration(s).map_err(|reason| self.invalid(v.span(), key, reason))?,
            _ => match self.unsigned(key, v)? {
                Some(n) => Duration::from_secs(n),
                None => {
                    return Err(self.wrong_type(key, v, "a duration such as \"10m\" or a number of seconds"));
                }
            },
        };
        if d.is_zero() {
            return Err(self.invalid(v.span(), key, "must be longer than zero".to_string()));
        }
        Ok(Some(d))
    }

    /// A positive duration no longer than `max`.
    fn duration_at_most(&self, key: &str, max: Duration) -> Result<Option<Duration>, PolicyError> {
        let Some(d) = self.duration_positive(key)? else { return Ok(None) };
        if d > max {
            let span = self.entry(key).map(|(_, v)| v.span()).unwrap_or(0..0);
            let reason = format!("must be at most {}", crate::units::format_duration(max));
            return Err(self.invalid(span, key, reason));
        }
        Ok(Some(d))
    }

    fn cpus(&self, key: &str) -> Result<Option<f64>, PolicyError> {
        let Some((_, v)) = self.entry(key) else {
            return Ok(None);
        };
        let n = match v.get_ref() {
            DeValue::Float(f) => f
                .as_str()
                .parse::<f64>()
                .map_err(|_| self.invalid(v.span(), key, format!("{f} is not a number")))?,
            DeValue::Integer(i) => i
                .as_str()
                .parse::<i64>()
                .map(|n| n as f64)
                .map_err(|_| self.invalid(v.span(), key, format!("{i} is out of range")))?,
            _ => return Err(self.wrong_type(key, v, "a number such as 2 or 0.5")),
        };
        if !(n.is_finite() && n > 0.0 && n <= crate::MAX_CPUS) {
            return Err(self.invalid(
                v.span(),
                key,
                format!("{n} must be a number greater than 0, e.g. 0.5 or 2"),
            ));
        }
        Ok(Some(n))
    }

    fn missing(&self, span: Span, key: &'static str, hint: &'static str) -> PolicyError {
        self.src.error(span, FileErrorKind::MissingKey { section: self.name.clone(), key, hint })
    }

    /// A list of host patterns; `ports` says whether `:port` is accepted.
    fn host_list(&self, key: &str, ports: bool) -> Result<Option<Vec<HostPattern>>, PolicyError> {
        let Some(items) = self.string_list(key)? else {
            return Ok(None);
        };
        items.iter().map(|s| self.host_pattern(key, s, ports)).collect::<Result<Vec<_>, _>>().map(Some)
    }

    fn host_pattern(&self, key: &str, s: &Spanned<String>, ports: bool) -> Result<HostPattern, PolicyError> {
        let pattern =
            HostPattern::parse(s.get_ref()).map_err(|reason| self.invalid(s.span(), key, reason))?;
        if !ports && pattern.port.is_some() {
            return Err(self.invalid(
                s.span(),
                key,
                format!(
                    "{:?} has a port; a rule applies to every port of its host, so write the host only",
                    s.get_ref()
                ),
            ));
        }
        Ok(pattern)
    }

    /// A list that must not be empty when present, because empty would mean
    /// something nobody wants (`why` says what).
    fn nonempty_list(&self, key: &str, why: &str) -> Result<Option<Vec<Spanned<String>>>, PolicyError> {
        let Some(items) = self.string_list(key)? else {
            return Ok(None);
        };
        if items.is_empty() {
            let span = self.entry(key).map_or(0..0, |(_, v)| v.span());
            return Err(self.invalid(span, key, why.to_string()));
        }
        Ok(Some(items))
    }

    fn methods(&self, key: &str) -> Result<Option<Vec<String>>, PolicyError> {
        let why = "an empty list would refuse every request; leave `methods` out to allow every method";
        let Some(items) = self.nonempty_list(key, why)? else {
            return Ok(None);
        };
        items
            .into_iter()
            .map(|m| {
                check_method(m.get_ref())
                    .map_err(|reason| self.invalid(m.span(), key, reason))
                    .map(|()| m.into_inner())
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn path_globs(&self, key: &str) -> Result<Option<Vec<String>>, PolicyError> {
        let why = "an empty list would refuse every request; leave `paths` out to allow every path";
        let Some(items) = self.nonempty_list(key, why)? else {
            return Ok(None);
        };
        items
            .into_iter()
            .map(|p| {
                path_glob(p.get_ref())
                    .map_err(|reason| self.invalid(p.span(), key, reason))
                    .map(|_| p.into_inner())
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// `[[network.rule]]`: an array of tables, each one [`HostRule`].
    fn rules(&self, key: &str) -> Result<Option<Vec<HostRule>>, PolicyError> {
        let Some((_, v)) = self.entry(key) else {
            return Ok(None);
        };
        let DeValue::Array(items) = v.get_ref() else {
            return Err(self.wrong_type(key, v, "an array of tables, written [[network.rule]]"));
        };
        let mut rules = Vec::with_capacity(items.len());
        for item in items {
            let DeValue::Table(table) = item.get_ref() else {
                return Err(self.wrong_type(key, item, "a table, written [[network.rule]]"));
            };
            let rule =
                Section { src: self.src, name: format!("{}.{key}", self.name), table, allowed: RULE_KEYS };
            rule.check_unknown()?;
            let Some(host) = rule.string("host")? else {
                return Err(rule.missing(
                    item.span(),
                    "host",
                    "name the host pattern the rule is for, e.g. host = \"api.example.com\"",
                ));
            };
            let pattern = rule.host_pattern("host", &host, false)?;
            let methods = rule.methods("methods")?;
            let paths = rule.path_globs("paths")?;
            if methods.is_none() && paths.is_none() {
                return Err(rule.invalid(
                    host.span(),
                    "host",
                    "the rule has neither `methods` nor `paths`, so it restricts nothing; \
                     add one of them, or remove the rule"
                        .to_string(),
                ));
            }
            rules.push(HostRule {
                host: pattern,
                methods: methods.unwrap_or_default(),
                paths: paths.unwrap_or_default(),
            });
        }
        Ok(Some(rules))
    }

    /// A list of registries, each `host` or `host:port`.
    fn registry_list(&self, key: &str) -> Result<Option<Vec<String>>, PolicyError> {
        let Some(items) = self.string_list(key)? else {
            return Ok(None);
        };
        items
            .into_iter()
            .map(|s| {
                check_registry(s.get_ref())
                    .map_err(|reason| self.invalid(s.span(), key, reason))
                    .map(|()| s.into_inner())
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// `[image.credentials."REGISTRY"]` tables: a user name and the secret
    /// source of the password.
    fn registry_credentials(&self, key: &str) -> Result<BTreeMap<String, RegistryCredential>, PolicyError> {
        let Some((_, v)) = self.entry(key) else {
            return Ok(BTreeMap::new());
        };
        let DeValue::Table(table) = v.get_ref() else {
            return Err(self.wrong_type(
                key,
                v,
                "a table of registries, written [image.credentials.\"HOST:PORT\"]",
            ));
        };
        // The keys of [image.credentials] are registries, not schema keys.
        let all = Section { src: self.src, name: format!("{}.{key}", self.name), table, allowed: &[] };
        let mut out = BTreeMap::new();
        // In file order, so a registry named twice is reported where it is
        // named again.
        let mut entries: Vec<Entry<'t, 'i>> = table.iter().collect();
        entries.sort_by_key(|(registry, _)| registry.span().start);
        for (registry, value) in entries {
            let registry_text = registry.get_ref().to_string();
            check_registry(&registry_text)
                .map_err(|reason| all.invalid(registry.span(), &registry_text, reason))?;
            if out.keys().any(|known: &String| known.eq_ignore_ascii_case(&registry_text)) {
                return Err(all.invalid(
                    registry.span(),
                    &registry_text,
                    "names a registry that has credentials already (registries are compared without case)"
                        .to_string(),
                ));
            }
            let DeValue::Table(fields) = value.get_ref() else {
                return Err(all.wrong_type(&registry_text, value, "a table with `username` and `password`"));
            };
            let credential = Section {
                src: self.src,
                name: format!("{}.{key}.{}", self.name, crate::render::quote(&registry_text)),
                table: fields,
                allowed: CREDENTIAL_KEYS,
            };
            credential.check_unknown()?;
            let Some(username) = credential.string("username")? else {
                return Err(credential.missing(
                    value.span(),
                    "username",
                    "name the registry user, e.g. username = \"ci\"",
                ));
            };
            check_username(username.get_ref())
                .map_err(|reason| credential.invalid(username.span(), "username", reason))?;
            let Some(password) = credential.string("password")? else {
                return Err(credential.missing(
                    value.span(),
                    "password",
                    "say where the password comes from: \"env:NAME\", \"file:/absolute/path\" or \"cmd:COMMAND\" \
                     (never the password itself)",
                ));
            };
            let source = password_source(password.get_ref())
                .map_err(|reason| credential.invalid(password.span(), "password", reason))?;
            out.insert(
                registry_text,
                RegistryCredential { username: username.into_inner(), password: source },
            );
        }
        Ok(out)
    }

    /// `[secrets.NAME]` tables, sorted by name, each with its table's span.
    fn secrets(&self, key: &'static str) -> Result<Vec<(Span, Secret)>, PolicyError> {
        let Some((_, v)) = self.entry(key) else {
            return Ok(Vec::new());
        };
        let DeValue::Table(table) = v.get_ref() else {
            return Err(self.wrong_type(key, v, "a table of secrets, written [secrets.NAME]"));
        };
        // The keys of [secrets] are variable names, not schema keys.
        let all = Section { src: self.src, name: key.to_string(), table, allowed: &[] };
        let mut out = Vec::with_capacity(table.len());
        for (name, value) in table.iter() {
            let name_text = name.get_ref().to_string();
            check_portable_env_name(&name_text)
                .map_err(|reason| all.invalid(name.span(), &name_text, reason))?;
            let DeValue::Table(fields) = value.get_ref() else {
                return Err(all.wrong_type(&name_text, value, "a table with `from` and `hosts`"));
            };
            let secret = Section {
                src: self.src,
                name: format!("{key}.{name_text}"),
                table: fields,
                allowed: SECRET_KEYS,
            };
            secret.check_unknown()?;
            let Some(from) = secret.string("from")? else {
                return Err(secret.missing(
                    value.span(),
                    "from",
                    "say where the value comes from: \"env:NAME\", \"file:/absolute/path\" or \"cmd:COMMAND\"",
                ));
            };
            let source = SecretSource::parse(from.get_ref())
                .map_err(|reason| secret.invalid(from.span(), "from", reason))?;
            let Some(hosts) = secret.host_list("hosts", true)? else {
                return Err(secret.missing(
                    value.span(),
                    "hosts",
                    "name the hosts whose requests get the value, e.g. hosts = [\"api.example.com\"]",
                ));
            };
            if hosts.is_empty() {
                let span = secret.entry("hosts").map_or(0..0, |(_, v)| v.span());
                return Err(secret.invalid(
                    span,
                    "hosts",
                    "an empty list sends the secret to no host; name the hosts that need it".to_string(),
                ));
            }
            out.push((value.span(), Secret { name: name_text, from: source, hosts }));
        }
        out.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn parse(text: &str) -> Result<Layer, PolicyError> {
        parse_layer(&Source { path: Path::new("my-policy.toml"), text })
    }

    fn err(text: &str) -> (String, usize, usize, FileErrorKind) {
        match parse(text).unwrap_err() {
            e @ PolicyError::File { .. } => {
                let msg = e.to_string();
                let PolicyError::File { line, column, kind, .. } = e else { unreachable!() };
                (msg, line, column, kind)
            }
            other => panic!("expected a file error, got {other}"),
        }
    }

    #[test]
    fn line_column_counts_characters() {
        let text = "a\nbé = 1\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 2), (2, 1));
        // byte offset of " = 1" after the two-byte é
        assert_eq!(line_column(text, 5), (2, 3));
    }

    #[test]
    fn unknown_key_names_line_column_and_expected_keys() {
        let text = "extends = \"ci\"\n\n[limits]\nmemory = \"1G\"\n  timout = \"1h\"\n";
        let (msg, line, column, kind) = err(text);
        assert_eq!((line, column), (5, 3));
        assert_eq!(kind.key().as_deref(), Some("limits.timout"));
        assert_eq!(
            msg,
            "my-policy.toml:5:3: unknown key `timout` in [limits] \
             (expected one of: timeout, memory, pids, cpus, disk, nofile, log_size, audit_size, stop_grace, allow_raise)"
        );
    }

    #[test]
    fn first_unknown_key_in_file_order_is_reported() {
        let (_, line, _, kind) = err("zzz = 1\naaa = 2\n");
        assert_eq!(line, 1);
        assert_eq!(kind.key().as_deref(), Some("zzz"));
        assert!(err("[limitz]\n").0.contains("unknown key `limitz` at the top level"));
    }

    #[test]
    fn unknown_key_in_dotted_and_inline_forms() {
        let (_, line, column, kind) = err("description = \"x\"\nlimits.pidz = 3\n");
        assert_eq!((line, column), (2, 8));
        assert_eq!(kind.key().as_deref(), Some("limits.pidz"));
        let (_, line, column, _) = err("cleanup = { on_succes = \"keep\" }\n");
        assert_eq!((line, column), (1, 13));
    }

    #[test]
    fn bad_size_points_at_value() {
        let (msg, line, column, kind) = err("# c\n[limits]\npids = 10\nmemory = \"lots\"\n");
        assert_eq!((line, column), (4, 10));
        assert_eq!(kind.key().as_deref(), Some("limits.memory"));
        assert_eq!(
            msg,
            "my-policy.toml:4:10: [limits] memory: invalid size \"lots\": \
             expected a number with an optional K/M/G/T suffix, e.g. \"512M\""
        );
    }

    #[test]
    fn bad_duration_points_at_value() {
        let (msg, line, column, kind) = err("[limits]\ntimeout = \"forever\"\n");
        assert_eq!((line, column), (2, 11));
        assert_eq!(kind.key().as_deref(), Some("limits.timeout"));
        assert!(msg.contains("[limits] timeout: invalid duration \"forever\""), "{msg}");
    }

    #[test]
    fn bad_enum_value_lists_choices() {
        let (msg, line, column, kind) = err("[isolation]\ntier = \"vm\"\n");
        assert_eq!((line, column), (2, 8));
        assert_eq!(kind.key().as_deref(), Some("isolation.tier"));
        assert!(
            msg.ends_with("[isolation] tier: invalid value \"vm\": expected one of \"process\", \"microvm\""),
            "{msg}"
        );

        let (msg, line, column, _) = err("[isolation]\nallow_weaker = [\"cgroups\", \"seccomp\"]\n");
        assert_eq!((line, column), (2, 28));
        assert!(msg.contains("\"seccomp\""), "{msg}");
    }

    #[test]
    fn wrong_type_is_reported() {
        let (msg, line, _, _) = err("[limits]\npids = \"many\"\n");
        assert_eq!(line, 2);
        assert!(msg.ends_with("[limits] pids: expected an integer, found a string"), "{msg}");
        let (msg, _, _, _) = err("limits = 3\n");
        assert!(msg.ends_with("limits: expected a table, found an integer"), "{msg}");
        let (msg, _, _, _) = err("[env]\npass = \"TERM\"\n");
        assert!(msg.contains("expected an array of strings"), "{msg}");
    }

    #[test]
    fn ranges_are_enforced() {
        for (text, needle) in [
            ("[limits]\npids = 0\n", "at least 8"),
            ("[limits]\npids = -3\n", "must not be negative"),
            ("[limits]\nmemory = \"8M\"\n", "at least 16M"),
            ("[limits]\ncpus = 0\n", "greater than 0"),
            ("[limits]\ncpus = -1.5\n", "greater than 0"),
            ("[limits]\ncpus = nan\n", "greater than 0"),
            ("[limits]\ntimeout = 0\n", "longer than zero"),
            ("[limits]\ntimeout = \"0s\"\n", "longer than zero"),
            ("[limits]\nstop_grace = 0\n", "longer than zero"),
            ("[limits]\nstop_grace = \"11m\"\n", "at most 10m"),
            ("[filesystem]\ntmp_size = \"512K\"\n", "at least 1M"),
        ] {
            let (msg, _, _, _) = err(text);
            assert!(msg.contains(needle), "{text:?}: {msg}");
        }
    }

    #[test]
    fn numbers_accept_integer_forms() {
        let layer = parse("[limits]\ntimeout = 90\nmemory = 33554432\ncpus = 2\npids = 1_000\n").unwrap();
        assert_eq!(layer.timeout, Some(Duration::from_secs(90)));
        assert_eq!(layer.memory, Some(32 * MIB));
        assert_eq!(layer.cpus, Some(2.0));
        assert_eq!(layer.pids, Some(1000));
        let layer = parse("[limits]\nstop_grace = \"1500ms\"\n").unwrap();
        assert_eq!(layer.stop_grace, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn paths_and_globs_are_checked() {
        for (text, needle) in [
            ("[filesystem]\nread_only = [\"usr\"]\n", "must be absolute"),
            ("[filesystem]\nhidden = [\"/home/../root\"]\n", "must not contain \"..\""),
            ("[workspace]\nprotected = [\"/etc/**\"]\n", "must be relative"),
            ("[workspace]\nprotected = [\"../x\"]\n", "must not contain \"..\""),
            ("[artifacts]\ncapture = [\"out/{a,b\"]\n", "is invalid"),
            ("[artifacts]\ncapture = [\"\"]\n", "empty"),
        ] {
            let (msg, line, _, _) = err(text);
            assert_eq!(line, 2, "{text:?}");
            assert!(msg.contains(needle), "{text:?}: {msg}");
        }
    }

    #[test]
    fn env_names_are_checked() {
        let (msg, _, _, _) = err("[env]\npass = [\"A=B\"]\n");
        assert!(msg.contains("must not contain '='"), "{msg}");
        let (msg, _, _, _) = err("[env]\npass = [\"\"]\n");
        assert!(msg.contains("empty"), "{msg}");
        let (msg, _, _, _) = err("[env]\nset = { A = 1 }\n");
        assert!(msg.contains("expected a string value"), "{msg}");
        let layer = parse("[env]\nset = { CI = \"true\", \"X Y\" = \"z\" }\n").unwrap();
        assert_eq!(layer.set.unwrap().get("CI").map(String::as_str), Some("true"));
    }

    #[test]
    fn egress_values_are_none_and_proxy() {
        let (msg, line, column, _) = err("[network]\negress = \"allowlist\"\n");
        assert_eq!((line, column), (2, 10));
        assert!(
            msg.ends_with(
                "[network] egress: invalid value \"allowlist\": expected one of \"none\", \"proxy\""
            ),
            "{msg}"
        );
        assert_eq!(parse("[network]\negress = \"proxy\"\n").unwrap().egress, Some(Egress::Proxy));
    }

    #[test]
    fn full_network_and_secrets_example_parses() {
        let text = r#"
[network]
egress = "proxy"
transparent = false
allow = ["api.example.com", "*.example.org:443", "127.0.0.1:8080", "10.1.0.0/16:5432", "[::1]:8080"]
deny  = ["uploads.example.org"]
allow_flag = true
extra_roots = ["/etc/airlock/roots.pem"]

[[network.rule]]
host = "api.example.com"
methods = ["GET", "HEAD"]
paths = ["/repos/**"]

[[network.rule]]
host = "*.example.org"
paths = ["/v1/*"]

[secrets.EXAMPLE_TOKEN]
from = "env:EXAMPLE_TOKEN"
hosts = ["api.example.com"]

[secrets.A_KEY]
from = "file:/run/keys/a"
hosts = ["*.example.org:443", "10.0.0.0/8"]
"#;
        let layer = parse(text).unwrap();
        assert_eq!(layer.egress, Some(Egress::Proxy));
        assert_eq!(layer.transparent, Some(false));
        let allow: Vec<String> = layer.allow.unwrap().into_iter().map(String::from).collect();
        assert_eq!(
            allow,
            ["api.example.com", "*.example.org:443", "127.0.0.1:8080", "10.1.0.0/16:5432", "[::1]:8080"]
        );
        assert_eq!(layer.deny.unwrap()[0].source, "uploads.example.org");
        assert_eq!(layer.allow_flag, Some(true));
        assert_eq!(layer.extra_roots, Some(vec![PathBuf::from("/etc/airlock/roots.pem")]));
        let rules = layer.rules.unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].methods, ["GET", "HEAD"]);
        assert_eq!(rules[0].paths, ["/repos/**"]);
        assert!(rules[1].methods.is_empty());
        let names: Vec<&str> = layer.secrets.iter().map(|(_, s)| s.name.as_str()).collect();
        assert_eq!(names, ["A_KEY", "EXAMPLE_TOKEN"], "sorted by name");
        assert_eq!(layer.secrets[1].1.from, SecretSource::Env("EXAMPLE_TOKEN".into()));
        assert_eq!(layer.secrets[0].1.hosts.len(), 2);
        assert!(layer.keys_set.contains_key("network.rule"));

        // Inline forms work as well.
        let inline = "network = { egress = \"proxy\", rule = [{ host = \"a.example.com\", methods = [\"GET\"] }] }\n\
                      secrets = { T = { from = \"cmd:echo x\", hosts = [\"a.example.com\"] } }\n";
        let layer = parse(inline).unwrap();
        assert_eq!(layer.rules.unwrap()[0].host.source, "a.example.com");
        assert_eq!(layer.secrets[0].1.from, SecretSource::Cmd("echo x".into()));
    }

    /// Every network and secrets error: (file, line, column, dotted key, text in the message).
    #[test]
    fn network_and_secrets_errors_point_at_the_key() {
        let cases: &[(&str, (usize, usize), &str, &str)] = &[
            ("[network]\nallow = [\"api.example.com\", \"*.com\"]\n", (2, 29), "network.allow", "bare TLD"),
            ("[network]\nallow = [\"*\"]\n", (2, 10), "network.allow", "bare TLD"),
            ("[network]\ndeny = [\"a.example.com:0\"]\n", (2, 9), "network.deny", "from 1 to 65535"),
            (
                "[network]\nallow = \"api.example.com\"\n",
                (2, 9),
                "network.allow",
                "expected an array of strings",
            ),
            ("[network]\nallow = [443]\n", (2, 10), "network.allow", "expected a string"),
            ("[network]\nallow_flag = \"yes\"\n", (2, 14), "network.allow_flag", "expected true or false"),
            (
                "[network]\nextra_roots = [\"roots.pem\"]\n",
                (2, 16),
                "network.extra_roots",
                "must be absolute",
            ),
            (
                "[network]\negres = \"proxy\"\n",
                (2, 1),
                "network.egres",
                "expected one of: egress, transparent, ports, allow, deny",
            ),
            ("[network]\nrule = { host = \"a.example.com\" }\n", (2, 8), "network.rule", "[[network.rule]]"),
            ("[network]\nrule = [\"a.example.com\"]\n", (2, 9), "network.rule", "expected a table"),
            ("[[network.rule]]\nmethods = [\"GET\"]\n", (1, 1), "network.rule.host", "missing key `host`"),
            (
                "[[network.rule]]\nhost = \"a.example.com:443\"\nmethods = [\"GET\"]\n",
                (2, 8),
                "network.rule.host",
                "has a port",
            ),
            (
                "[[network.rule]]\nhost = \"*.com\"\nmethods = [\"GET\"]\n",
                (2, 8),
                "network.rule.host",
                "bare TLD",
            ),
            (
                "[[network.rule]]\nhost = \"a.example.com\"\n",
                (2, 8),
                "network.rule.host",
                "restricts nothing",
            ),
            (
                "[[network.rule]]\nhost = \"a.example.com\"\nmethods = []\n",
                (3, 11),
                "network.rule.methods",
                "refuse every request",
            ),
            (
                "[[network.rule]]\nhost = \"a.example.com\"\nmethods = [\"get\"]\n",
                (3, 12),
                "network.rule.methods",
                "must be uppercase",
            ),
            (
                "[[network.rule]]\nhost = \"a.example.com\"\npaths = []\n",
                (3, 9),
                "network.rule.paths",
                "refuse every request",
            ),
            (
                "[[network.rule]]\nhost = \"a.example.com\"\npaths = [\"v1/**\"]\n",
                (3, 10),
                "network.rule.paths",
                "start with '/'",
            ),
            (
                "[[network.rule]]\nhost = \"a.example.com\"\npaths = [\"/a?b=1\"]\n",
                (3, 10),
                "network.rule.paths",
                "query string",
            ),
            (
                "[[network.rule]]\nhost = \"a.example.com\"\npaths = [\"/{a\"]\n",
                (3, 10),
                "network.rule.paths",
                "is invalid",
            ),
            (
                "[[network.rule]]\nhost = \"a.example.com\"\nmethod = [\"GET\"]\n",
                (3, 1),
                "network.rule.method",
                "in [[network.rule]] (expected one of: host, methods, paths)",
            ),
            ("secrets = 1\n", (1, 11), "secrets", "expected a table of secrets"),
            (
                "[secrets]\nTOKEN = \"env:X\"\n",
                (2, 9),
                "secrets.TOKEN",
                "expected a table with `from` and `hosts`",
            ),
            (
                "[secrets.\"MY-TOKEN\"]\nfrom = \"env:X\"\nhosts = [\"a.example.com\"]\n",
                (1, 10),
                "secrets.MY-TOKEN",
                "only letters, digits and '_'",
            ),
            ("[secrets.T]\nhosts = [\"a.example.com\"]\n", (1, 1), "secrets.T.from", "missing key `from`"),
            ("[secrets.T]\nfrom = \"env:X\"\n", (1, 1), "secrets.T.hosts", "missing key `hosts`"),
            (
                "[secrets.T]\nfrom = \"env:X\"\nhosts = []\n",
                (3, 9),
                "secrets.T.hosts",
                "sends the secret to no host",
            ),
            (
                "[secrets.T]\nfrom = \"vault:x\"\nhosts = [\"a.example.com\"]\n",
                (2, 8),
                "secrets.T.from",
                "unknown kind",
            ),
            (
                "[secrets.T]\nfrom = \"file:keys/t\"\nhosts = [\"a.example.com\"]\n",
                (2, 8),
                "secrets.T.from",
                "must be absolute",
            ),
            ("[secrets.T]\nfrom = \"env:X\"\nhosts = [\"*.org\"]\n", (3, 10), "secrets.T.hosts", "bare TLD"),
            (
                "[secrets.T]\nfrom = \"env:X\"\nhost = [\"a.example.com\"]\n",
                (3, 1),
                "secrets.T.host",
                "in [secrets.T] (expected one of: from, hosts)",
            ),
        ];
        for (text, position, key, needle) in cases {
            let (msg, line, column, kind) = err(text);
            assert_eq!((line, column), *position, "{text:?}: {msg}");
            assert_eq!(kind.key().as_deref(), Some(*key), "{text:?}: {msg}");
            assert!(msg.contains(needle), "{text:?}: {msg}");
        }
    }

    #[test]
    fn image_insecure_registries_and_credentials_parse() {
        let text = r#"
[image]
insecure = ["127.0.0.1:5000", "[::1]:5001"]

[image.credentials."registry.example.com:5000"]
username = "ci"
password = "env:REGISTRY_PASSWORD"

[image.credentials."registry.example.org"]
username = "bot"
password = "cmd:print-token registry"
"#;
        let layer = parse(text).unwrap();
        assert_eq!(layer.insecure.unwrap(), ["127.0.0.1:5000", "[::1]:5001"]);
        let ci = &layer.credentials["registry.example.com:5000"];
        assert_eq!(ci.username, "ci");
        assert_eq!(ci.password, SecretSource::Env("REGISTRY_PASSWORD".into()));
        assert_eq!(
            layer.credentials["registry.example.org"].password,
            SecretSource::Cmd("print-token registry".into())
        );
        assert!(layer.keys_set.contains_key("image.credentials"));
    }

    /// Every `[image]` insecure and credentials error: (file, line, dotted key, text in the message).
    #[test]
    fn image_insecure_and_credentials_errors_point_at_the_key() {
        let table = "[image.credentials.\"r.example.com\"]\n";
        let cases: &[(String, usize, &str, &str)] = &[
            ("[image]\ninsecure = [\"http://r.example.com\"]\n".into(), 2, "image.insecure", "has a scheme"),
            (
                "[image]\ninsecure = [\"r.example.com:99999\"]\n".into(),
                2,
                "image.insecure",
                "from 1 to 65535",
            ),
            ("[image]\ninsecure = \"r.example.com\"\n".into(), 2, "image.insecure", "an array of strings"),
            ("[image]\ncredentials = 3\n".into(), 2, "image.credentials", "a table of registries"),
            (
                "[image.credentials.\"r.example.com/team\"]\nusername = \"u\"\npassword = \"env:P\"\n".into(),
                1,
                "image.credentials.r.example.com/team",
                "not a host[:port]",
            ),
            (
                "[image.credentials]\n\"r.example.com\" = \"env:P\"\n".into(),
                2,
                "image.credentials.r.example.com",
                "`username` and `password`",
            ),
            (
                format!("{table}password = \"env:P\"\n"),
                1,
                "image.credentials.\"r.example.com\".username",
                "missing key `username`",
            ),
            (
                format!("{table}username = \"u\"\n"),
                1,
                "image.credentials.\"r.example.com\".password",
                "never the password itself",
            ),
            (
                format!("{table}username = \"u:v\"\npassword = \"env:P\"\n"),
                2,
                "image.credentials.\"r.example.com\".username",
                "':'",
            ),
            (
                format!("{table}username = \"u\"\npassword = \"hunter2\"\n"),
                3,
                "image.credentials.\"r.example.com\".password",
                "is not a secret source",
            ),
            (
                format!("{table}username = \"u\"\npassword = \"env:A-B\"\n"),
                3,
                "image.credentials.\"r.example.com\".password",
                "must start with a letter",
            ),
            (
                format!("{table}username = \"u\"\npassword = \"file:keys/p\"\n"),
                3,
                "image.credentials.\"r.example.com\".password",
                "must be absolute",
            ),
            (
                format!("{table}username = \"u\"\npassword = \"env:P\"\ntoken = \"env:T\"\n"),
                4,
                "image.credentials.\"r.example.com\".token",
                "expected one of: username, password",
            ),
            (
                format!(
                    "{table}username = \"u\"\npassword = \"env:P\"\n[image.credentials.\"R.example.com\"]\nusername = \"u\"\npassword = \"env:P\"\n"
                ),
                4,
                "image.credentials.R.example.com",
                "has credentials already",
            ),
        ];
        for (text, line, key, needle) in cases {
            let (msg, at, _, kind) = err(text);
            assert_eq!(at, *line, "{text:?}: {msg}");
            assert_eq!(kind.key().as_deref(), Some(*key), "{text:?}: {msg}");
            assert!(msg.contains(needle), "{text:?}: {msg}");
        }
        // A password given as a value is never echoed in the message.
        let (msg, ..) = err(&format!("{table}username = \"u\"\npassword = \"vault:s3cret\"\n"));
        assert!(msg.contains("[image.credentials.\"r.example.com\"] password"), "{msg}");
        assert!(!msg.contains("s3cret"), "{msg}");
    }

    #[test]
    fn error_messages_name_the_section_as_written() {
        let (msg, ..) = err("[[network.rule]]\nhost = \"a.example.com\"\nmethods = [\"get\"]\n");
        assert!(
            msg.starts_with(
                "my-policy.toml:3:12: [[network.rule]] methods: method \"get\" must be uppercase"
            ),
            "{msg}"
        );
        let (msg, ..) = err("[secrets.T]\nfrom = \"env:X\"\n");
        assert!(
            msg.starts_with("my-policy.toml:1:1: [secrets.T]: missing key `hosts`: name the hosts"),
            "{msg}"
        );
        let (msg, ..) = err("[network]\nallow = [\"*.com\"]\n");
        assert!(
            msg.starts_with("my-policy.toml:2:10: [network] allow: host pattern \"*.com\" is a bare TLD"),
            "{msg}"
        );
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let (msg, line, _, kind) = err("[limits]\nmemory = \n");
        assert_eq!(line, 2);
        assert!(matches!(kind, FileErrorKind::Syntax(_)), "{msg}");
        let (_, line, _, kind) = err("[limits]\npids = 1\npids = 2\n");
        assert_eq!(line, 3);
        assert!(matches!(kind, FileErrorKind::Syntax(_)));
    }

    #[test]
    fn keys_set_tracks_what_the_file_named() {
        let layer = parse("extends = \"ci\"\n[limits]\nmemory = \"1G\"\n[env]\nset = {}\n").unwrap();
        let keys: Vec<&str> = layer.keys_set.keys().map(String::as_str).collect();
        assert_eq!(keys, ["env.set", "limits.memory"]);
        assert_eq!(layer.extends.map(Spanned::into_inner).as_deref(), Some("ci"));
        assert!(layer.timeout.is_none());
    }
}
