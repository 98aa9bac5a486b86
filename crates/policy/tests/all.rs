//! Policy loading through the public API: built-ins, files on disk, the
//! extends chain, layering rules and CLI overrides.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_policy::{
    CleanupAction, FileErrorKind, Overrides, Policy, PolicyError, Tier, Weakening, WorkspaceMode, Writeback,
    parse_size,
};

const GIB: u64 = 1024 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The raw value of `key` in `[section]` of a built-in's TOML source.
fn source_value(source: &str, section: &str, key: &str) -> toml::Value {
    let table: toml::Table = toml::from_str(source).unwrap();
    table[section][key].clone()
}

#[test]
fn builtin_names_are_the_four_profiles() {
    assert_eq!(Policy::builtin_names(), ["dev", "ci", "plugin", "remediation"]);
    for name in Policy::builtin_names() {
        assert!(Policy::builtin(name).is_some(), "{name}");
        assert!(Policy::builtin_source(name).is_some(), "{name}");
    }
    assert!(Policy::builtin("prod").is_none());
    assert!(Policy::builtin_source("prod").is_none());
}

#[test]
fn every_builtin_round_trips_and_matches_its_source() {
    let dir = tempfile::tempdir().unwrap();
    for name in Policy::builtin_names() {
        let policy = Policy::builtin(name).unwrap();
        let source = Policy::builtin_source(name).unwrap();

        // A few values held against the TOML text itself.
        let memory = source_value(source, "limits", "memory");
        assert_eq!(policy.limits.memory, parse_size(memory.as_str().unwrap()).unwrap(), "{name}");
        let pids = source_value(source, "limits", "pids");
        assert_eq!(policy.limits.pids, u64::try_from(pids.as_integer().unwrap()).unwrap(), "{name}");
        let mode = source_value(source, "workspace", "mode");
        assert_eq!(policy.workspace.mode.as_str(), mode.as_str().unwrap(), "{name}");
        let capture = source_value(source, "artifacts", "capture");
        let capture: Vec<&str> = capture.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(policy.artifacts.capture, capture, "{name}");
        // Every section carries a comment saying why.
        for section in [
            "[isolation]",
            "[filesystem]",
            "[workspace]",
            "[limits]",
            "[network]",
            "[artifacts]",
            "[cleanup]",
            "[env]",
        ] {
            let at = source.find(section).unwrap_or_else(|| panic!("{name}: no {section}"));
            let before = source[..at].trim_end();
            assert!(before.lines().last().unwrap().starts_with('#'), "{name}: {section} has no comment");
        }
        assert!(source.contains("example.com"), "{name}: no commented egress example");

        let path = write(dir.path(), &format!("{name}-copy.toml"), &policy.to_toml());
        let back = Policy::load_file(&path).unwrap_or_else(|e| panic!("{name}: {e}\n{}", policy.to_toml()));
        assert_eq!(back.extends_chain, vec![name.to_string(), path.display().to_string()]);
        assert_eq!(back.name, format!("{name}-copy"));
        let normalized =
            Policy { name: policy.name.clone(), extends_chain: policy.extends_chain.clone(), ..back };
        assert_eq!(normalized, policy, "{name} changed in the round trip");
    }
}

#[test]
fn builtin_values_match_the_brief() {
    let dev = Policy::builtin("dev").unwrap();
    assert_eq!(dev.isolation.tier, Tier::Process);
    assert!(dev.allows_weaker(Weakening::Cgroups));
    assert!(dev.allows_weaker(Weakening::Landlock));
    assert!(dev.allows_weaker(Weakening::DiskQuota));
    assert_eq!((dev.workspace.mode, dev.workspace.writeback), (WorkspaceMode::Overlay, Writeback::Review));
    assert_eq!(dev.limits.timeout, Duration::from_secs(2 * 3600));
    assert_eq!((dev.limits.memory, dev.limits.pids, dev.limits.cpus), (4 * GIB, 4096, 2.0));
    assert_eq!((dev.limits.disk, dev.limits.nofile), (10 * GIB, 4096));
    assert!(dev.limits.allow_raise);
    assert!(dev.artifacts.capture.is_empty());
    assert_eq!(dev.env.pass, ["TERM", "LANG", "LC_ALL", "COLORTERM"]);
    assert!(dev.allows_writeback());

    let ci = Policy::builtin("ci").unwrap();
    assert!(ci.isolation.allow_weaker.is_empty());
    assert_eq!(ci.workspace.writeback, Writeback::Never);
    assert!(!ci.allows_writeback());
    assert_eq!(
        (ci.limits.timeout, ci.limits.memory, ci.limits.pids),
        (Duration::from_secs(3600), 8 * GIB, 8192)
    );
    assert_eq!(ci.limits.disk, 20 * GIB);
    assert!(!ci.limits.allow_raise);
    assert_eq!(ci.artifacts.capture, ["**/junit*.xml", "**/test-results/**"]);
    assert_eq!((ci.cleanup.on_success, ci.cleanup.on_failure), (CleanupAction::Remove, CleanupAction::Keep));
    assert_eq!(ci.env.set.get("CI").map(String::as_str), Some("true"));

    let plugin = Policy::builtin("plugin").unwrap();
    assert_eq!((plugin.workspace.mode, plugin.workspace.writeback), (WorkspaceMode::Ro, Writeback::Never));
    assert_eq!(plugin.limits.timeout, Duration::from_secs(300));
    assert_eq!((plugin.limits.memory, plugin.limits.pids, plugin.limits.cpus), (512 * MIB, 256, 1.0));
    assert_eq!((plugin.limits.disk, plugin.limits.nofile), (256 * MIB, 1024));
    assert_eq!(plugin.filesystem.tmp_size, 64 * MIB);
    assert_eq!(
        (plugin.cleanup.on_success, plugin.cleanup.on_failure),
        (CleanupAction::Remove, CleanupAction::Remove)
    );
    assert_eq!(plugin.env.pass, ["LANG"]);

    let rem = Policy::builtin("remediation").unwrap();
    assert_eq!((rem.workspace.mode, rem.workspace.writeback), (WorkspaceMode::Overlay, Writeback::Review));
    assert_eq!(
        (rem.limits.timeout, rem.limits.memory, rem.limits.pids),
        (Duration::from_secs(1800), 2 * GIB, 1024)
    );
    assert_eq!(rem.limits.disk, 2 * GIB);
    assert_eq!(rem.artifacts.capture, ["**/*.log"]);
    assert_eq!((rem.cleanup.on_success, rem.cleanup.on_failure), (CleanupAction::Keep, CleanupAction::Keep));

    for p in [&dev, &ci, &plugin, &rem] {
        for g in [
            ".git/hooks/**",
            ".git/config",
            ".bashrc",
            ".envrc",
            ".claude/**",
            ".github/workflows/**",
            "**/.git/hooks/**",
        ] {
            assert!(p.workspace.protected.iter().any(|x| x == g), "{}: {g}", p.name);
        }
        assert!(p.filesystem.hidden.is_empty());
        assert_eq!(p.filesystem.read_only.first().map(PathBuf::as_path), Some(Path::new("/usr")));
        if p.name != "plugin" {
            assert_eq!(p.filesystem.tmp_size, 512 * MIB);
        }
    }
}

#[test]
fn file_without_extends_refines_dev_and_sets_only_what_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "mine.toml", "[limits]\nmemory = \"1G\"\n");
    let p = Policy::load_file(&path).unwrap();
    let dev = Policy::builtin("dev").unwrap();
    assert_eq!(p.name, "mine");
    assert_eq!(p.extends_chain, vec!["dev".to_string(), path.display().to_string()]);
    assert_eq!(p.limits.memory, GIB);
    assert_eq!(p.limits.timeout, dev.limits.timeout);
    assert_eq!(p.workspace, dev.workspace);
    assert_eq!(p.description, dev.description);
}

#[test]
fn extends_chain_through_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("team")).unwrap();
    write(
        dir.path(),
        "team/base.toml",
        "extends = \"ci\"\ndescription = \"team base\"\n[limits]\ntimeout = \"20m\"\n[env]\nset = { TEAM = \"a\" }\n",
    );
    let leaf = write(
        dir.path(),
        "leaf.toml",
        "extends = \"team/base.toml\"\n[limits]\npids = 100\n[env]\nset = { TEAM = \"b\", EXTRA = \"1\" }\n",
    );
    let p = Policy::load_file(&leaf).unwrap();
    assert_eq!(
        p.extends_chain,
        vec![
            "ci".to_string(),
            dir.path().join("team/base.toml").display().to_string(),
            leaf.display().to_string()
        ]
    );
    assert_eq!(p.description, "team base");
    assert_eq!(p.limits.timeout, Duration::from_secs(1200));
    assert_eq!(p.limits.pids, 100);
    assert_eq!(p.limits.memory, 8 * GIB, "untouched keys come from ci");
    // env.set merges: ci's CI, base's TEAM overwritten by the leaf, leaf's EXTRA.
    let set: Vec<(&str, &str)> = p.env.set.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(set, [("CI", "true"), ("EXTRA", "1"), ("TEAM", "b")]);
}

#[test]
fn extends_of_a_missing_file_points_at_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "p.toml", "# x\nextends = \"nope.toml\"\n");
    let err = Policy::load_file(&path).unwrap_err();
    let PolicyError::File { line, column, kind, .. } = &err else { panic!("{err}") };
    assert_eq!((*line, *column), (2, 11));
    assert_eq!(kind.key().as_deref(), Some("extends"));
    assert!(err.to_string().contains("neither a built-in profile"), "{err}");
}

#[test]
fn extends_cycle_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "extends = \"b.toml\"\n");
    write(dir.path(), "b.toml", "extends = \"./a.toml\"\n");
    let err = Policy::load_file(&dir.path().join("a.toml")).unwrap_err();
    let PolicyError::ExtendsCycle { chain } = &err else { panic!("{err}") };
    assert_eq!(chain.len(), 3);
    assert!(err.to_string().contains("cycle"), "{err}");

    let selfish = write(dir.path(), "self.toml", "extends = \"self.toml\"\n");
    assert!(matches!(Policy::load_file(&selfish), Err(PolicyError::ExtendsCycle { .. })));
}

#[test]
fn extends_depth_is_limited() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "f0.toml", "extends = \"ci\"\n");
    for i in 1..=9 {
        write(dir.path(), &format!("f{i}.toml"), &format!("extends = \"f{}.toml\"\n", i - 1));
    }
    // f7 → f0 is eight files: allowed. f8 is the ninth: refused.
    assert_eq!(Policy::load_file(&dir.path().join("f7.toml")).unwrap().extends_chain.len(), 9);
    let err = Policy::load_file(&dir.path().join("f8.toml")).unwrap_err();
    assert!(matches!(err, PolicyError::ExtendsTooDeep { max: 8, .. }), "{err}");
}

#[test]
fn deny_lists_are_unioned_and_grant_lists_replaced() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        "extends = \"remediation\"\n[filesystem]\nhidden = [\"/srv/secrets\"]\n[workspace]\nprotected = [\"deploy/**\"]\n",
    );
    let leaf = write(
        dir.path(),
        "leaf.toml",
        "extends = \"base.toml\"\n\
         [filesystem]\nhidden = []\nread_only = [\"/usr\"]\n\
         [workspace]\nprotected = [\"docs/**\"]\n\
         [artifacts]\ncapture = [\"out/**\"]\n\
         [env]\npass = [\"LANG\"]\n",
    );
    let p = Policy::load_file(&leaf).unwrap();
    // An empty hidden list cannot remove what the base hid.
    assert_eq!(p.filesystem.hidden, [PathBuf::from("/srv/secrets")]);
    let builtin = Policy::builtin("remediation").unwrap().workspace.protected;
    assert!(builtin.iter().all(|g| p.workspace.protected.contains(g)));
    assert!(p.workspace.protected.contains(&"deploy/**".to_string()));
    assert!(p.workspace.protected.contains(&"docs/**".to_string()));
    assert_eq!(p.workspace.protected.len(), builtin.len() + 2);
    // Grants are replaced.
    assert_eq!(p.filesystem.read_only, [PathBuf::from("/usr")]);
    assert_eq!(p.artifacts.capture, ["out/**"]);
    assert_eq!(p.env.pass, ["LANG"]);
}

#[test]
fn rw_workspace_with_never_writeback_is_refused_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "p.toml", "extends = \"ci\"\n[workspace]\nmode = \"rw\"\n");
    let err = Policy::load_file(&path).unwrap_err();
    let PolicyError::File { line, column, kind, .. } = &err else { panic!("{err}") };
    assert_eq!((*line, *column), (3, 8));
    assert!(matches!(kind, FileErrorKind::InvalidValue { .. }));
    assert!(err.to_string().contains("writeback = \"never\""), "{err}");

    let ok = write(dir.path(), "ok.toml", "extends = \"dev\"\n[workspace]\nmode = \"rw\"\n");
    assert_eq!(Policy::load_file(&ok).unwrap().workspace.mode, WorkspaceMode::Rw);
    // A conflict created by the refining layer's writeback points at writeback.
    let leaf = write(dir.path(), "leaf.toml", "extends = \"ok.toml\"\n[workspace]\nwriteback = \"never\"\n");
    let err = Policy::load_file(&leaf).unwrap_err();
    let PolicyError::File { line, kind, .. } = &err else { panic!("{err}") };
    assert_eq!(*line, 3);
    assert_eq!(kind.key().as_deref(), Some("workspace.writeback"));
    let ro = write(dir.path(), "ro.toml", "extends = \"ci\"\n[workspace]\nmode = \"none\"\n");
    assert_eq!(Policy::load_file(&ro).unwrap().workspace.mode, WorkspaceMode::None);
}

#[test]
fn file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "my-policy.toml", "[limits]\ntimout = \"1h\"\n");
    let msg = Policy::load_file(&path).unwrap_err().to_string();
    assert!(msg.starts_with(&format!("{}:2:1: unknown key `timout` in [limits]", path.display())), "{msg}");

    let missing = dir.path().join("absent.toml");
    let err = Policy::load_file(&missing).unwrap_err();
    assert!(matches!(err, PolicyError::Read { .. }));
    assert!(err.to_string().contains("absent.toml"), "{err}");
}

#[test]
fn resolve_takes_builtin_names_and_paths() {
    assert_eq!(Policy::resolve("ci").unwrap().name, "ci");
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "x.toml", "extends = \"plugin\"\n");
    assert_eq!(Policy::resolve(path.to_str().unwrap()).unwrap().name, "x");
    let err = Policy::resolve("devv").unwrap_err();
    assert!(matches!(err, PolicyError::NotFound { .. }));
    assert!(err.to_string().contains("built-in profiles: dev, ci, plugin, remediation"), "{err}");
}

#[test]
fn overrides_can_tighten_without_allow_raise() {
    let ci = Policy::builtin("ci").unwrap();
    let o = Overrides {
        timeout: Some(Duration::from_secs(600)),
        memory: Some(GIB),
        pids: Some(ci.limits.pids),
        cpus: Some(0.5),
        ..Overrides::default()
    };
    let p = ci.apply_overrides(&o).unwrap();
    assert_eq!(p.limits.timeout, Duration::from_secs(600));
    assert_eq!(p.limits.memory, GIB);
    assert_eq!(p.limits.pids, ci.limits.pids);
    assert_eq!(p.limits.cpus, 0.5);
    assert_eq!(ci.apply_overrides(&Overrides::default()).unwrap(), ci);
}

#[test]
fn overrides_cannot_raise_without_allow_raise() {
    let ci = Policy::builtin("ci").unwrap();
    let cases = [
        (Overrides { timeout: Some(Duration::from_secs(7200)), ..Overrides::default() }, "timeout", "1h"),
        (Overrides { memory: Some(16 * GIB), ..Overrides::default() }, "memory", "8G"),
        (Overrides { pids: Some(10_000), ..Overrides::default() }, "pids", "8192"),
        (Overrides { cpus: Some(4.0), ..Overrides::default() }, "cpus", "2"),
    ];
    for (o, limit, current_value) in cases {
        let err = ci.apply_overrides(&o).unwrap_err();
        let PolicyError::LimitRaise { limit: l, policy, current, .. } = &err else { panic!("{err}") };
        assert_eq!((*l, policy.as_str(), current.as_str()), (limit, "ci", current_value));
        let msg = err.to_string();
        assert!(msg.contains(&format!("limits.{limit}")) && msg.contains("\"ci\""), "{msg}");
    }
}

#[test]
fn overrides_may_raise_with_allow_raise() {
    let dev = Policy::builtin("dev").unwrap();
    let o = Overrides {
        timeout: Some(Duration::from_secs(5 * 3600)),
        memory: Some(32 * GIB),
        pids: Some(100_000),
        cpus: Some(16.0),
        ..Overrides::default()
    };
    let p = dev.apply_overrides(&o).unwrap();
    assert_eq!(p.limits.memory, 32 * GIB);
    assert_eq!(p.limits.cpus, 16.0);

    // A file can turn allow_raise on for a profile that has it off.
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "big.toml", "extends = \"ci\"\n[limits]\nallow_raise = true\n");
    let big = Policy::load_file(&path).unwrap();
    assert_eq!(big.apply_overrides(&o).unwrap().limits.pids, 100_000);
}

#[test]
fn overrides_reject_out_of_range_values() {
    let dev = Policy::builtin("dev").unwrap();
    for o in [
        Overrides { timeout: Some(Duration::ZERO), ..Overrides::default() },
        Overrides { memory: Some(MIB), ..Overrides::default() },
        Overrides { pids: Some(0), ..Overrides::default() },
        Overrides { cpus: Some(0.0), ..Overrides::default() },
        Overrides { cpus: Some(f64::NAN), ..Overrides::default() },
    ] {
        let err = dev.apply_overrides(&o).unwrap_err();
        assert!(matches!(err, PolicyError::InvalidOverride { .. }), "{err}");
    }
}

#[test]
fn env_overrides_add_to_set_and_reject_bad_names() {
    let ci = Policy::builtin("ci").unwrap();
    let o = Overrides {
        env: vec![("FOO".into(), "bar".into()), ("CI".into(), "1".into())],
        ..Overrides::default()
    };
    let p = ci.apply_overrides(&o).unwrap();
    assert_eq!(p.env.set.get("FOO").map(String::as_str), Some("bar"));
    assert_eq!(p.env.set.get("CI").map(String::as_str), Some("1"));
    for name in ["", "A=B", "NUL\0"] {
        let o = Overrides { env: vec![(name.into(), "v".into())], ..Overrides::default() };
        let err = ci.apply_overrides(&o).unwrap_err();
        assert!(matches!(err, PolicyError::InvalidOverride { flag: "--env", .. }), "{name:?}: {err}");
    }
}

#[test]
fn workspace_mode_override_rules() {
    let ci = Policy::builtin("ci").unwrap();
    for mode in [WorkspaceMode::Ro, WorkspaceMode::None, WorkspaceMode::Overlay] {
        let o = Overrides { workspace_mode: Some(mode), ..Overrides::default() };
        assert_eq!(ci.apply_overrides(&o).unwrap().workspace.mode, mode);
    }
    let rw = Overrides { workspace_mode: Some(WorkspaceMode::Rw), ..Overrides::default() };
    let err = ci.apply_overrides(&rw).unwrap_err();
    assert!(matches!(err, PolicyError::RwWithoutWriteback { .. }), "{err}");
    let dev = Policy::builtin("dev").unwrap();
    assert_eq!(dev.apply_overrides(&rw).unwrap().workspace.mode, WorkspaceMode::Rw);
}

#[test]
fn microvm_tier_parses() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "vm.toml", "extends = \"plugin\"\n[isolation]\ntier = \"microvm\"\n");
    assert_eq!(Policy::load_file(&path).unwrap().isolation.tier, Tier::Microvm);
}

#[test]
fn enums_display_as_toml_and_serialize_kebab_case() {
    assert_eq!(Weakening::DiskQuota.to_string(), "disk-quota");
    assert_eq!("disk-quota".parse::<Weakening>().unwrap(), Weakening::DiskQuota);
    assert_eq!(serde_json::to_string(&Weakening::DiskQuota).unwrap(), "\"disk-quota\"");
    let dev = Policy::builtin("dev").unwrap();
    let json = serde_json::to_string(&dev).unwrap();
    let back: Policy = serde_json::from_str(&json).unwrap();
    assert_eq!(back, dev);
}
