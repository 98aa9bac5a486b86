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
use crate::{CleanupAction, Egress, Tier, Weakening, WorkspaceMode, Writeback, parse_duration, parse_size};

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
];
const ISOLATION_KEYS: &[&str] = &["tier", "allow_weaker"];
const FILESYSTEM_KEYS: &[&str] = &["read_only", "hidden", "tmp_size"];
const WORKSPACE_KEYS: &[&str] = &["mode", "writeback", "protected"];
const LIMITS_KEYS: &[&str] = &["timeout", "memory", "pids", "cpus", "disk", "nofile", "allow_raise"];
const NETWORK_KEYS: &[&str] = &["egress"];
const ARTIFACTS_KEYS: &[&str] = &["capture", "max_bytes"];
const CLEANUP_KEYS: &[&str] = &["on_success", "on_failure"];
const ENV_KEYS: &[&str] = &["pass", "set"];

/// Every section and its keys; a built-in profile must set all of them.
pub(crate) const SCHEMA: &[(&str, &[&str])] = &[
    ("isolation", ISOLATION_KEYS),
    ("filesystem", FILESYSTEM_KEYS),
    ("workspace", WORKSPACE_KEYS),
    ("limits", LIMITS_KEYS),
    ("network", NETWORK_KEYS),
    ("artifacts", ARTIFACTS_KEYS),
    ("cleanup", CLEANUP_KEYS),
    ("env", ENV_KEYS),
];

/// The keys one policy file sets; `None` means "inherit from the base".
#[derive(Debug, Default)]
pub(crate) struct Layer {
    pub extends: Option<Spanned<String>>,
    pub description: Option<String>,
    pub tier: Option<Tier>,
    pub allow_weaker: Option<BTreeSet<Weakening>>,
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
    pub allow_raise: Option<bool>,
    pub egress: Option<Egress>,
    pub capture: Option<Vec<String>>,
    pub max_bytes: Option<u64>,
    pub on_success: Option<CleanupAction>,
    pub on_failure: Option<CleanupAction>,
    pub pass: Option<Vec<String>>,
    pub set: Option<BTreeMap<String, String>>,
    /// "section.key" for every key present, to check built-ins are complete.
    pub keys_set: BTreeSet<String>,
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

    pub fn invalid(&self, span: Span, section: &'static str, key: &str, reason: String) -> PolicyError {
        self.error(span, FileErrorKind::InvalidValue { section, key: key.to_string(), reason })
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
    let top = Section { src, name: "", table: doc.get_ref(), allowed: TOP_KEYS };
    top.check_unknown()?;

    let mut layer = Layer {
        extends: top.string("extends")?,
        description: top.string("description")?.map(Spanned::into_inner),
        ..Layer::default()
    };

    if let Some(s) = top.section("isolation", ISOLATION_KEYS)? {
        layer.tier = s.keyword::<Tier>("tier")?.map(Spanned::into_inner);
        layer.allow_weaker = s.keyword_list::<Weakening>("allow_weaker")?.map(|v| v.into_iter().collect());
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
        layer.pids = s.integer_at_least("pids", 1)?;
        layer.cpus = s.cpus("cpus")?;
        layer.disk = s.size_at_least("disk", MIB)?;
        layer.nofile = s.integer_at_least("nofile", 16)?;
        layer.allow_raise = s.boolean("allow_raise")?;
        layer.keys_set.extend(s.present());
    }
    if let Some(s) = top.section("network", NETWORK_KEYS)? {
        layer.egress = s.egress("egress")?;
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
    Ok(layer)
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

/// Host paths must be absolute and free of `..` so what is hidden or bound is
/// exactly what the policy author sees.
fn check_host_path(p: &str) -> Result<PathBuf, String> {
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
    name: &'static str,
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
                    section: self.name,
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

    /// "section.key" for each key present in this table.
    fn present(&self) -> Vec<String> {
        self.table.iter().map(|(k, _)| format!("{}.{}", self.name, k.get_ref())).collect()
    }

    fn wrong_type(&self, key: &str, value: &Spanned<DeValue<'_>>, expected: &'static str) -> PolicyError {
        self.src.error(
            value.span(),
            FileErrorKind::WrongType {
                section: self.name,
                key: key.to_string(),
                expected,
                found: type_name(value.get_ref()),
            },
        )
    }

    fn invalid(&self, span: Span, key: &str, reason: String) -> PolicyError {
        self.src.invalid(span, self.name, key, reason)
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
        let section = Section { src: self.src, name: key, table, allowed };
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

    fn integer_at_least(&self, key: &str, min: u64) -> Result<Option<u64>, PolicyError> {
        let Some((_, v)) = self.entry(key) else {
            return Ok(None);
        };
        let Some(n) = self.unsigned(key, v)? else {
            return Err(self.wrong_type(key, v, "an integer"));
        };
        if n < min {
            return Err(self.invalid(v.span(), key, format!("{n} is too small: must be at least {min}")));
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
        if !(n.is_finite() && n > 0.0) {
            return Err(self.invalid(
                v.span(),
                key,
                format!("{n} must be a number greater than 0, e.g. 0.5 or 2"),
            ));
        }
        Ok(Some(n))
    }

    fn egress(&self, key: &str) -> Result<Option<Egress>, PolicyError> {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        Egress::from_str(s.get_ref()).map(Some).map_err(|_| {
            self.invalid(
                s.span(),
                key,
                format!(
                    "{:?} is not supported: only \"none\" is accepted in this version; \
                     per-host egress through the airlock egress proxy arrives in a later release",
                    s.get_ref()
                ),
            )
        })
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
             (expected one of: timeout, memory, pids, cpus, disk, nofile, allow_raise)"
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
            ("[limits]\npids = 0\n", "at least 1"),
            ("[limits]\npids = -3\n", "must not be negative"),
            ("[limits]\nmemory = \"8M\"\n", "at least 16M"),
            ("[limits]\ncpus = 0\n", "greater than 0"),
            ("[limits]\ncpus = -1.5\n", "greater than 0"),
            ("[limits]\ncpus = nan\n", "greater than 0"),
            ("[limits]\ntimeout = 0\n", "longer than zero"),
            ("[limits]\ntimeout = \"0s\"\n", "longer than zero"),
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
    fn egress_other_than_none_says_why() {
        let (msg, line, column, _) = err("[network]\negress = \"allowlist\"\n");
        assert_eq!((line, column), (2, 10));
        assert!(msg.contains("only \"none\" is accepted in this version"), "{msg}");
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
        let keys: Vec<&str> = layer.keys_set.iter().map(String::as_str).collect();
        assert_eq!(keys, ["env.set", "limits.memory"]);
        assert_eq!(layer.extends.map(Spanned::into_inner).as_deref(), Some("ci"));
        assert!(layer.timeout.is_none());
    }
}
