//! A resolved policy written back as a policy file.
//!
//! Every key is written, so the file means the same whatever it extends; it
//! names the built-in at the root of the original chain so that the unioned
//! deny lists it inherits are already contained in the ones written here.

use std::fmt::Write as _;

use crate::{Policy, builtin, format_duration, format_size};

/// A one-line TOML basic string, so every value sits on its key's line.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A bare key when TOML allows one, otherwise a quoted key.
fn key(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        s.to_string()
    } else {
        quote(s)
    }
}

fn list<I, S>(items: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let quoted: Vec<String> = items.into_iter().map(|s| quote(s.as_ref())).collect();
    // Long lists one item per line, so a diff of two resolved policies is readable.
    if quoted.len() > 4 {
        format!("[\n    {},\n]", quoted.join(",\n    "))
    } else {
        format!("[{}]", quoted.join(", "))
    }
}

fn paths(items: &[std::path::PathBuf]) -> String {
    list(items.iter().map(|p| p.display().to_string()))
}

pub(crate) fn to_toml(p: &Policy) -> String {
    let root =
        p.extends_chain.first().filter(|name| builtin::source(name).is_some()).map_or("dev", String::as_str);
    let chain = p.extends_chain.join(" -> ");
    let set: Vec<String> = p.env.set.iter().map(|(k, v)| format!("{} = {}", key(k), quote(v))).collect();
    let set = if set.is_empty() { "{}".to_string() } else { format!("{{ {} }}", set.join(", ")) };

    let mut out = String::new();
    // Writing to a String cannot fail; `let _` keeps the lints quiet.
    let _ = write!(
        out,
        "# Policy {name:?}, fully resolved from: {chain}\n\
         extends = {root}\n\
         description = {description}\n\
         \n\
         [isolation]\n\
         tier = {tier}\n\
         allow_weaker = {allow_weaker}\n\
         containers = {containers}\n\
         containers_flag = {containers_flag}\n\
         \n\
         [filesystem]\n\
         read_only = {read_only}\n\
         hidden = {hidden}\n\
         tmp_size = {tmp_size}\n\
         \n\
         [workspace]\n\
         mode = {mode}\n\
         writeback = {writeback}\n\
         protected = {protected}\n\
         \n\
         [limits]\n\
         timeout = {timeout}\n\
         memory = {memory}\n\
         pids = {pids}\n\
         cpus = {cpus}\n\
         disk = {disk}\n\
         nofile = {nofile}\n\
         log_size = {log_size}\n\
         audit_size = {audit_size}\n\
         stop_grace = {stop_grace}\n\
         allow_raise = {allow_raise}\n\
         \n\
         [network]\n\
         egress = {egress}\n\
         transparent = {transparent}\n\
         ports = {ports}\n\
         allow = {allow}\n\
         deny = {deny}\n\
         allow_flag = {allow_flag}\n\
         extra_roots = {extra_roots}\n\
         {rules}\
         \n\
         [artifacts]\n\
         capture = {capture}\n\
         max_bytes = {max_bytes}\n\
         \n\
         [cleanup]\n\
         on_success = {on_success}\n\
         on_failure = {on_failure}\n\
         \n\
         [env]\n\
         pass = {pass}\n\
         set = {set}\n\
         \n\
         [audit]\n\
         exec_trace = {exec_trace}\n\
         \n\
         [image]\n\
         {image_ref}\
         require_digest = {require_digest}\n\
         registries = {registries}\n\
         insecure = {insecure}\n\
         {credentials}",
        name = p.name,
        root = quote(root),
        description = quote(&p.description),
        tier = quote(p.isolation.tier.as_str()),
        allow_weaker = list(p.isolation.allow_weaker.iter().map(|w| w.as_str())),
        containers = p.isolation.containers,
        containers_flag = p.isolation.containers_flag,
        read_only = paths(&p.filesystem.read_only),
        hidden = paths(&p.filesystem.hidden),
        tmp_size = quote(&format_size(p.filesystem.tmp_size)),
        mode = quote(p.workspace.mode.as_str()),
        writeback = quote(p.workspace.writeback.as_str()),
        protected = list(&p.workspace.protected),
        timeout = quote(&format_duration(p.limits.timeout)),
        memory = quote(&format_size(p.limits.memory)),
        pids = p.limits.pids,
        cpus = p.limits.cpus,
        disk = quote(&format_size(p.limits.disk)),
        nofile = p.limits.nofile,
        log_size = quote(&format_size(p.limits.log_size)),
        audit_size = quote(&format_size(p.limits.audit_size)),
        stop_grace = quote(&format_duration(p.limits.stop_grace)),
        allow_raise = p.limits.allow_raise,
        egress = quote(p.network.egress.as_str()),
        transparent = p.network.transparent,
        ports = p.network.ports,
        capture = list(&p.artifacts.capture),
        max_bytes = quote(&format_size(p.artifacts.max_bytes)),
        on_success = quote(p.cleanup.on_success.as_str()),
        on_failure = quote(p.cleanup.on_failure.as_str()),
        pass = list(&p.env.pass),
        allow = list(p.network.allow.iter().map(|h| h.source.as_str())),
        deny = list(p.network.deny.iter().map(|h| h.source.as_str())),
        allow_flag = p.network.allow_flag,
        extra_roots = paths(&p.network.extra_roots),
        rules = rules(p),
        exec_trace = p.audit.exec_trace,
        image_ref = p.image.reference.as_ref().map(|r| format!("ref = {}\n", quote(r))).unwrap_or_default(),
        require_digest = p.image.require_digest,
        registries = list(&p.image.registries),
        insecure = list(&p.image.insecure),
        credentials = credentials(p),
    );
    for secret in &p.secrets {
        let _ = write!(
            out,
            "\n[secrets.{name}]\nfrom = {from}\nhosts = {hosts}\n",
            name = key(&secret.name),
            from = quote(&secret.from.to_string()),
            hosts = list(secret.hosts.iter().map(|h| h.source.as_str())),
        );
    }
    out
}

/// `[image.credentials."REGISTRY"]` tables, right under `[image]`: the
/// password's source, never a value.
fn credentials(p: &Policy) -> String {
    let mut out = String::new();
    for (registry, credential) in &p.image.credentials {
        let _ = write!(
            out,
            "\n[image.credentials.{}]\nusername = {}\npassword = {}\n",
            quote(registry),
            quote(&credential.username),
            quote(&credential.password.to_string()),
        );
    }
    out
}

/// `[[network.rule]]` tables, right under `[network]`; a key left out means
/// "any", so empty lists are not written.
fn rules(p: &Policy) -> String {
    let mut out = String::new();
    for rule in &p.network.rules {
        let _ = write!(out, "\n[[network.rule]]\nhost = {}\n", quote(&rule.host.source));
        if !rule.methods.is_empty() {
            let _ = writeln!(out, "methods = {}", list(&rule.methods));
        }
        if !rule.paths.is_empty() {
            let _ = writeln!(out, "paths = {}", list(&rule.paths));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn write_to(p: &Policy, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join(format!("{}-resolved.toml", p.name));
        std::fs::write(&path, to_toml(p)).unwrap();
        path
    }

    #[test]
    fn keys_and_strings_are_escaped() {
        assert_eq!(key("CI"), "CI");
        assert_eq!(key("X Y"), "\"X Y\"");
        assert_eq!(quote("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
        assert_eq!(quote("\u{1b}[0m"), "\"\\u001B[0m\"");
    }

    #[test]
    fn odd_values_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Policy::builtin("dev").unwrap();
        p.description = "line one\nline \"two\" \\ ok \u{7f} é".to_string();
        p.env.set.insert("X Y".to_string(), "tab\there".to_string());
        p.env.set.insert("EMPTY".to_string(), String::new());
        p.limits.cpus = 0.25;
        p.limits.memory = 16 * 1024 * 1024 + 1;
        p.limits.timeout = std::time::Duration::from_millis(90_500);
        p.filesystem.hidden = vec!["/srv/with space".into()];
        let path = write_to(&p, dir.path());
        let back = Policy::load_file(&path).unwrap_or_else(|e| panic!("{e}\n{}", to_toml(&p)));
        assert_eq!(back.description, p.description);
        assert_eq!(back.env, p.env);
        assert_eq!(back.limits, p.limits);
        assert_eq!(back.filesystem, p.filesystem);
    }

    #[test]
    fn network_and_secrets_round_trip() {
        use crate::{HostPattern, HostRule, Secret, SecretSource};
        let h = |s: &str| HostPattern::parse(s).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut p = Policy::builtin("remediation").unwrap();
        p.network.allow =
            ["api.example.com", "*.Example.org:443", "127.0.0.1:8080", "10.1.0.0/16:5432", "[::1]:8080"]
                .into_iter()
                .map(h)
                .collect();
        p.network.deny = vec![h("uploads.example.org"), h("fd00::/8")];
        p.network.allow_flag = true;
        p.network.extra_roots = vec!["/etc/airlock/roots.pem".into()];
        p.network.rules = vec![
            HostRule {
                host: h("api.example.com"),
                methods: vec!["GET".into(), "HEAD".into()],
                paths: vec!["/repos/**".into()],
            },
            HostRule { host: h("*.example.net"), methods: vec!["GET".into()], paths: vec![] },
            HostRule { host: h("10.0.0.0/8"), methods: vec![], paths: vec!["/health".into()] },
        ];
        p.secrets = vec![
            Secret {
                name: "A_TOKEN".into(),
                from: SecretSource::Cmd("printf '%s' \"x\"".into()),
                hosts: vec![h("api.example.com"), h("*.example.org:443")],
            },
            Secret {
                name: "B_TOKEN".into(),
                from: SecretSource::File("/run/keys/b".into()),
                hosts: vec![h("b.example.com")],
            },
            Secret {
                name: "C".into(),
                from: SecretSource::Env("HOST_C".into()),
                hosts: vec![h("[::1]:8080")],
            },
        ];
        let path = write_to(&p, dir.path());
        let back = Policy::load_file(&path).unwrap_or_else(|e| panic!("{e}\n{}", to_toml(&p)));
        assert_eq!(back.network, p.network);
        assert_eq!(back.secrets, p.secrets);
        let sources: Vec<&str> = back.network.allow.iter().map(|a| a.source.as_str()).collect();
        assert_eq!(sources[1], "*.Example.org:443", "entries are written as the author spelled them");
        // And a second time, from the file written the first time.
        let again = write_to(&Policy { name: "again".into(), ..back.clone() }, dir.path());
        assert_eq!(Policy::load_file(&again).unwrap().network, p.network);
    }
}
