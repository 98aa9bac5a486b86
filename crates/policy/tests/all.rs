//! Policy loading through the public API: built-ins, files on disk, the
//! extends chain, layering rules and CLI overrides.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_policy::{
    CleanupAction, Egress, FileErrorKind, HostMatch, HostPattern, Overrides, Policy, PolicyError,
    SecretSource, Tier, Weakening, WorkspaceMode, Writeback, parse_size,
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
    assert_eq!((dev.limits.log_size, dev.limits.audit_size), (32 * MIB, 32 * MIB));
    assert_eq!(dev.limits.stop_grace, Duration::from_secs(10));
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
    assert_eq!((plugin.limits.log_size, plugin.limits.audit_size), (4 * MIB, 4 * MIB));
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
        // Past what the kernel's pids.max takes (found by fuzzing the API).
        Overrides { pids: Some(122_249_543_541), ..Overrides::default() },
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
fn running_microvms_without_kvm_is_a_weakening_no_builtin_allows() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "tcg.toml", "[isolation]\ntier = \"microvm\"\nallow_weaker = [\"kvm\"]\n");
    let policy = Policy::load_file(&path).unwrap();
    assert!(policy.allows_weaker(Weakening::Kvm));
    for name in ["dev", "ci", "plugin", "remediation"] {
        assert!(!Policy::builtin(name).unwrap().allows_weaker(Weakening::Kvm), "{name}");
    }
}

#[test]
fn plugin_and_remediation_require_the_microvm_tier_and_a_file_may_lower_it_on_the_record() {
    for name in ["plugin", "remediation"] {
        let policy = Policy::builtin(name).unwrap();
        assert_eq!(policy.isolation.tier, Tier::Microvm, "{name}");
        assert_eq!(policy.isolation.weaker_tier_than, None, "{name}");
    }
    for name in ["dev", "ci"] {
        assert_eq!(Policy::builtin(name).unwrap().isolation.tier, Tier::Process, "{name}");
    }
    let dir = tempfile::tempdir().unwrap();
    let lowered =
        write(dir.path(), "lowered.toml", "extends = \"plugin\"\n[isolation]\ntier = \"process\"\n");
    let policy = Policy::load_file(&lowered).unwrap();
    assert_eq!(policy.isolation.tier, Tier::Process);
    assert_eq!(policy.isolation.weaker_tier_than.as_deref(), Some("plugin"));
    // Further layers keep the record, unless one goes back to the microvm tier.
    let path = lowered.to_str().unwrap();
    let child = write(dir.path(), "child.toml", &format!("extends = {path:?}\n[limits]\npids = 100\n"));
    assert_eq!(Policy::load_file(&child).unwrap().isolation.weaker_tier_than.as_deref(), Some("plugin"));
    let back =
        write(dir.path(), "back.toml", &format!("extends = {path:?}\n[isolation]\ntier = \"microvm\"\n"));
    assert_eq!(Policy::load_file(&back).unwrap().isolation.weaker_tier_than, None);
    // A file that only keeps the tier records nothing.
    let kept = write(dir.path(), "kept.toml", "extends = \"plugin\"\n[limits]\npids = 100\n");
    assert_eq!(Policy::load_file(&kept).unwrap().isolation.weaker_tier_than, None);
}

#[test]
fn the_tier_flag_strengthens_but_never_weakens() {
    let ci = Policy::builtin("ci").unwrap();
    let vm = ci.apply_overrides(&Overrides { tier: Some(Tier::Microvm), ..Overrides::default() }).unwrap();
    assert_eq!(vm.isolation.tier, Tier::Microvm);
    let err =
        vm.apply_overrides(&Overrides { tier: Some(Tier::Process), ..Overrides::default() }).unwrap_err();
    assert!(err.to_string().contains("requires the microvm tier"), "{err}");
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

fn sources(patterns: &[HostPattern]) -> Vec<&str> {
    patterns.iter().map(|p| p.source.as_str()).collect()
}

fn file_error(err: &PolicyError) -> (usize, usize, String) {
    let PolicyError::File { line, column, kind, .. } = err else { panic!("expected a file error: {err}") };
    (*line, *column, kind.key().unwrap_or_default())
}

#[test]
fn builtin_network_sections_match_the_brief() {
    for name in ["dev", "ci", "remediation"] {
        let p = Policy::builtin(name).unwrap();
        assert_eq!(p.network.egress, Egress::Proxy, "{name}");
        assert!(p.network.has_egress());
        assert!(p.network.allow.is_empty() && p.network.deny.is_empty(), "{name}: deny by default");
        assert!(p.network.rules.is_empty() && p.network.extra_roots.is_empty(), "{name}");
        assert_eq!(p.network.allow_flag, name == "dev", "{name}");
        assert!(p.secrets.is_empty(), "{name}");
    }
    let plugin = Policy::builtin("plugin").unwrap();
    assert_eq!(plugin.network.egress, Egress::None);
    assert!(!plugin.network.allow_flag);
    assert!(plugin.network.allow.is_empty());
    // The commented examples are valid policy text: uncommenting them works.
    let rem = Policy::builtin_source("remediation").unwrap();
    assert!(rem.contains("#   [secrets.EXAMPLE_TOKEN]"), "remediation documents secrets");
    let dir = tempfile::tempdir().unwrap();
    for name in Policy::builtin_names() {
        let source = Policy::builtin_source(name).unwrap();
        let at = source.find("# Network:").unwrap();
        let example: String = source[at..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter_map(|l| l.strip_prefix("#   "))
            .map(|l| format!("{l}\n"))
            .collect();
        let text = format!("extends = \"{name}\"\n{example}");
        let path = write(dir.path(), &format!("{name}-example.toml"), &text);
        let p = Policy::load_file(&path).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
        assert!(!p.network.allow.is_empty(), "{name}: {text}");
    }
}

#[test]
fn network_layering_unions_denies_and_rules_and_replaces_grants() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        "extends = \"ci\"\n\
         [network]\n\
         allow = [\"api.example.com\", \"*.example.org:443\"]\n\
         deny = [\"uploads.example.org\"]\n\
         extra_roots = [\"/etc/airlock/base.pem\"]\n\
         [[network.rule]]\nhost = \"api.example.com\"\nmethods = [\"GET\"]\n",
    );
    let leaf = write(
        dir.path(),
        "leaf.toml",
        "extends = \"base.toml\"\n\
         [network]\n\
         allow = [\"api.example.com:443\"]\n\
         deny = []\n\
         allow_flag = true\n\
         extra_roots = []\n\
         [[network.rule]]\nhost = \"api.example.com\"\npaths = [\"/repos/**\"]\n\
         [[network.rule]]\nhost = \"api.example.com\"\nmethods = [\"GET\"]\n",
    );
    let p = Policy::load_file(&leaf).unwrap();
    // A deny and a rule cannot be removed, even by an empty list.
    assert_eq!(sources(&p.network.deny), ["uploads.example.org"]);
    assert_eq!(p.network.rules.len(), 2, "the repeated rule is not duplicated");
    assert_eq!(p.network.rules[0].methods, ["GET"]);
    assert_eq!(p.network.rules[1].paths, ["/repos/**"]);
    // Grants are replaced.
    assert_eq!(sources(&p.network.allow), ["api.example.com:443"]);
    assert!(p.network.extra_roots.is_empty());
    assert!(p.network.allow_flag);
    assert_eq!(p.network.egress, Egress::Proxy, "egress comes from ci");

    // A layer that adds a deny keeps the ones it inherited.
    let more =
        write(dir.path(), "more.toml", "extends = \"base.toml\"\n[network]\ndeny = [\"10.0.0.0/8\"]\n");
    let p = Policy::load_file(&more).unwrap();
    assert_eq!(sources(&p.network.deny), ["uploads.example.org", "10.0.0.0/8"]);
    assert_eq!(p.network.deny[1].host, HostMatch::Cidr("10.0.0.0/8".parse().unwrap()));
    assert_eq!(
        sources(&p.network.allow),
        ["api.example.com", "*.example.org:443"],
        "untouched allow is inherited"
    );
}

#[test]
fn secrets_merge_by_name_and_a_redefinition_replaces_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        "extends = \"remediation\"\n\
         [secrets.B_TOKEN]\nfrom = \"env:B\"\nhosts = [\"b.example.com\", \"*.example.org\"]\n\
         [secrets.A_TOKEN]\nfrom = \"file:/run/keys/a\"\nhosts = [\"a.example.com\"]\n",
    );
    let leaf = write(
        dir.path(),
        "leaf.toml",
        "extends = \"base.toml\"\n\
         [secrets.B_TOKEN]\nfrom = \"cmd:print-token b\"\nhosts = [\"b.example.com:443\"]\n\
         [secrets.C_TOKEN]\nfrom = \"env:C\"\nhosts = [\"c.example.net\"]\n",
    );
    let p = Policy::load_file(&leaf).unwrap();
    let names: Vec<&str> = p.secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["A_TOKEN", "B_TOKEN", "C_TOKEN"]);
    let a = p.secret("A_TOKEN").unwrap();
    assert_eq!(a.from, SecretSource::File("/run/keys/a".into()));
    let b = p.secret("B_TOKEN").unwrap();
    assert_eq!(b.from, SecretSource::Cmd("print-token b".into()));
    assert_eq!(sources(&b.hosts), ["b.example.com:443"], "the whole entry is replaced, hosts included");
    assert!(p.secret("D").is_none());
}

#[test]
fn allow_entries_need_egress() {
    let dir = tempfile::tempdir().unwrap();
    // Listing hosts on top of "plugin" without turning the proxy on.
    let path =
        write(dir.path(), "p.toml", "extends = \"plugin\"\n[network]\nallow = [\"api.example.com\"]\n");
    let err = Policy::load_file(&path).unwrap_err();
    assert_eq!(file_error(&err), (3, 9, "network.allow".to_string()));
    assert!(err.to_string().contains("set egress = \"proxy\""), "{err}");
    let ok = write(
        dir.path(),
        "ok.toml",
        "extends = \"plugin\"\n[network]\negress = \"proxy\"\nallow = [\"api.example.com\"]\n",
    );
    assert_eq!(sources(&Policy::load_file(&ok).unwrap().network.allow), ["api.example.com"]);
    // Turning egress off under inherited allow entries must say so explicitly.
    let off = write(dir.path(), "off.toml", "extends = \"ok.toml\"\n[network]\negress = \"none\"\n");
    let err = Policy::load_file(&off).unwrap_err();
    assert_eq!(file_error(&err), (3, 10, "network.egress".to_string()));
    assert!(err.to_string().contains("api.example.com") && err.to_string().contains("allow = []"), "{err}");
    let off =
        write(dir.path(), "off2.toml", "extends = \"ok.toml\"\n[network]\negress = \"none\"\nallow = []\n");
    assert!(!Policy::load_file(&off).unwrap().network.has_egress());
}

#[test]
fn a_secret_cannot_also_be_passed_or_set() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "[secrets.TOKEN]\nfrom = \"env:TOKEN\"\nhosts = [\"api.example.com\"]\n";
    let path = write(dir.path(), "p.toml", &format!("[env]\npass = [\"TERM\", \"TOKEN\"]\n{secret}"));
    let err = Policy::load_file(&path).unwrap_err();
    assert_eq!(file_error(&err), (3, 1, "secrets.TOKEN".to_string()));
    assert!(err.to_string().contains("remove it from env.pass"), "{err}");

    let base = write(dir.path(), "base.toml", secret);
    let leaf = write(dir.path(), "leaf.toml", "extends = \"base.toml\"\n[env]\nset = { TOKEN = \"x\" }\n");
    let err = Policy::load_file(&leaf).unwrap_err();
    assert_eq!(file_error(&err), (3, 7, "env.set".to_string()));
    assert!(err.to_string().contains("env.set"), "{err}");
    assert_eq!(Policy::load_file(&base).unwrap().secrets.len(), 1);
}

#[test]
fn allow_flag_adds_entries_where_the_policy_permits() {
    let dev = Policy::builtin("dev").unwrap();
    let o = Overrides {
        allow: vec!["api.example.com".into(), "127.0.0.1:8080".into(), "api.example.com".into()],
        ..Overrides::default()
    };
    let p = dev.apply_overrides(&o).unwrap();
    assert_eq!(sources(&p.network.allow), ["api.example.com", "127.0.0.1:8080"]);

    let err =
        dev.apply_overrides(&Overrides { allow: vec!["*.com".into()], ..Overrides::default() }).unwrap_err();
    assert!(matches!(err, PolicyError::InvalidOverride { flag: "--allow", .. }), "{err}");
    assert!(err.to_string().contains("bare TLD"), "{err}");

    for name in ["ci", "remediation"] {
        let p = Policy::builtin(name).unwrap();
        let err = p.apply_overrides(&o).unwrap_err();
        assert!(matches!(err, PolicyError::AllowFlagDisabled { .. }), "{name}: {err}");
        let msg = err.to_string();
        assert!(msg.contains("allow_flag = false") && msg.contains(&format!("{name:?}")), "{msg}");
    }
    let plugin = Policy::builtin("plugin").unwrap();
    let err = plugin.apply_overrides(&o).unwrap_err();
    assert!(matches!(err, PolicyError::AllowWithoutEgress { .. }), "{err}");
    assert!(err.to_string().contains("egress = \"none\""), "{err}");
    // Without --allow nothing changes, whatever allow_flag says.
    assert_eq!(plugin.apply_overrides(&Overrides::default()).unwrap(), plugin);
}

#[test]
fn env_flag_cannot_set_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path =
        write(dir.path(), "s.toml", "[secrets.TOKEN]\nfrom = \"env:T\"\nhosts = [\"api.example.com\"]\n");
    let p = Policy::load_file(&path).unwrap();
    let o = Overrides { env: vec![("TOKEN".into(), "x".into())], ..Overrides::default() };
    let err = p.apply_overrides(&o).unwrap_err();
    assert!(matches!(err, PolicyError::EnvIsSecret { .. }), "{err}");
    assert!(err.to_string().contains("placeholder"), "{err}");
}

#[test]
fn network_and_secrets_survive_json_and_toml() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "net.toml",
        "extends = \"dev\"\n\
         [network]\nallow = [\"API.example.com\", \"[fd00::/8]:443\"]\ndeny = [\"uploads.example.org\"]\n\
         [[network.rule]]\nhost = \"api.example.com\"\nmethods = [\"GET\", \"HEAD\"]\npaths = [\"/repos/**\"]\n\
         [secrets.TOKEN]\nfrom = \"env:TOKEN\"\nhosts = [\"api.example.com\"]\n",
    );
    let p = Policy::load_file(&path).unwrap();
    let json = serde_json::to_string(&p).unwrap();
    assert!(json.contains("\"API.example.com\"") && json.contains("\"env:TOKEN\""), "{json}");
    let back: Policy = serde_json::from_str(&json).unwrap();
    assert_eq!(back, p);

    let again = write(dir.path(), "again.toml", &p.to_toml());
    let back = Policy::load_file(&again).unwrap_or_else(|e| panic!("{e}\n{}", p.to_toml()));
    assert_eq!(back.network, p.network);
    assert_eq!(back.secrets, p.secrets);
}

#[test]
fn limits_beyond_what_the_kernel_takes_are_refused_where_written() {
    let dir = tempfile::tempdir().unwrap();
    let pids = write(dir.path(), "pids.toml", "[limits]\npids = 5000000\n");
    let err = Policy::load_file(&pids).unwrap_err();
    assert_eq!(file_error(&err), (2, 8, "limits.pids".to_string()));
    assert!(err.to_string().contains("at most 4194304"), "{err}");
    let nofile = write(dir.path(), "nofile.toml", "[limits]\nnofile = 2000000\n");
    let err = Policy::load_file(&nofile).unwrap_err();
    assert!(err.to_string().contains("at most 1048576"), "{err}");
    let ok = write(dir.path(), "ok.toml", "[limits]\npids = 4194304\nnofile = 1048576\n");
    assert_eq!(Policy::load_file(&ok).unwrap().limits.pids, 4_194_304);
}

#[test]
fn host_file_caps_are_sizes_with_a_floor_and_survive_a_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let small = write(dir.path(), "small.toml", "[limits]\nlog_size = \"1K\"\n");
    let err = Policy::load_file(&small).unwrap_err();
    assert_eq!(file_error(&err).2, "limits.log_size");
    let small = write(dir.path(), "audit.toml", "[limits]\naudit_size = 1000\n");
    assert_eq!(file_error(&Policy::load_file(&small).unwrap_err()).2, "limits.audit_size");
    let bad = write(dir.path(), "bad.toml", "[limits]\nlog_size = \"lots\"\n");
    assert_eq!(file_error(&Policy::load_file(&bad).unwrap_err()).2, "limits.log_size");

    let ok =
        write(dir.path(), "ok.toml", "extends = \"ci\"\n[limits]\nlog_size = \"64K\"\naudit_size = \"2M\"\n");
    let p = Policy::load_file(&ok).unwrap();
    assert_eq!((p.limits.log_size, p.limits.audit_size), (64 * 1024, 2 * MIB));
    let again = write(dir.path(), "again.toml", &p.to_toml());
    assert_eq!(Policy::load_file(&again).unwrap().limits, p.limits);
}

#[test]
fn stop_grace_is_a_bounded_duration_and_survives_a_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("zero.toml", "stop_grace = 0"),
        ("long.toml", "stop_grace = \"1h\""),
        ("bad.toml", "stop_grace = \"soon\""),
    ] {
        let file = write(dir.path(), name, &format!("[limits]\n{text}\n"));
        assert_eq!(file_error(&Policy::load_file(&file).unwrap_err()).2, "limits.stop_grace", "{text}");
    }
    let ok = write(dir.path(), "ok.toml", "extends = \"ci\"\n[limits]\nstop_grace = \"1500ms\"\n");
    let p = Policy::load_file(&ok).unwrap();
    assert_eq!(p.limits.stop_grace, Duration::from_millis(1500));
    let again = write(dir.path(), "again.toml", &p.to_toml());
    assert_eq!(Policy::load_file(&again).unwrap().limits.stop_grace, Duration::from_millis(1500));
}

#[test]
fn every_builtin_traces_execs_and_a_file_may_turn_it_off() {
    for name in Policy::builtin_names() {
        assert!(Policy::builtin(name).unwrap().audit.exec_trace, "{name}");
    }
    let dir = tempfile::tempdir().unwrap();
    let off = write(dir.path(), "off.toml", "extends = \"dev\"\n[audit]\nexec_trace = false\n");
    let p = Policy::load_file(&off).unwrap();
    assert!(!p.audit.exec_trace);
    let again = write(dir.path(), "again.toml", &p.to_toml());
    assert!(!Policy::load_file(&again).unwrap().audit.exec_trace, "survives a round trip");
    let bad = write(dir.path(), "bad.toml", "[audit]\nexec_trace = \"sometimes\"\n");
    assert_eq!(file_error(&Policy::load_file(&bad).unwrap_err()).2, "audit.exec_trace");
    let unknown = write(dir.path(), "unknown.toml", "[audit]\nexec_rate = 5\n");
    assert!(
        Policy::load_file(&unknown).unwrap_err().to_string().contains("unknown key `exec_rate` in [audit]")
    );
    // A form stored before the setting existed reads as traced.
    let stored: Policy = serde_json::from_value(
        serde_json::to_value(Policy::builtin("ci").unwrap())
            .map(|mut v| {
                v.as_object_mut().unwrap().remove("audit");
                v
            })
            .unwrap(),
    )
    .unwrap();
    assert!(stored.audit.exec_trace);
}

#[test]
fn ci_and_remediation_refuse_image_tags_and_a_file_can_name_an_image() {
    let pinned = format!("registry.example.com/team/py@sha256:{}", "a".repeat(64));
    for name in ["ci", "remediation"] {
        let policy = Policy::resolve(name).unwrap();
        assert!(policy.image.require_digest, "{name}");
        let refusal = policy.image.refusal("registry.example.com/team/py:3.12", Some("registry.example.com"));
        assert!(refusal.unwrap().contains("require_digest"), "{name}");
        assert_eq!(policy.image.refusal(&pinned, Some("registry.example.com")), None, "{name}");
    }
    for name in ["dev", "plugin"] {
        let policy = Policy::resolve(name).unwrap();
        assert_eq!(policy.image.refusal("oci:./layout:v1", None), None, "{name}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "img.toml",
        &format!("extends = \"dev\"\n[image]\nref = \"{pinned}\"\nregistries = [\"registry.example.com\"]\n"),
    );
    let policy = Policy::resolve(file.to_str().unwrap()).unwrap();
    assert_eq!(policy.image.reference.as_deref(), Some(pinned.as_str()));
    let refusal = policy.image.refusal("registry.example.org/x:1", Some("registry.example.org")).unwrap();
    assert!(refusal.contains("image.registries"), "{refusal}");
    // `--image` replaces the file's image; the rules stay.
    let overridden =
        policy.apply_overrides(&Overrides { image: Some("oci:/l".into()), ..Overrides::default() }).unwrap();
    assert_eq!(overridden.image.reference.as_deref(), Some("oci:/l"));
    assert_eq!(overridden.image.registries, ["registry.example.com"]);
    // What `policy show` prints reads back the same.
    assert!(policy.to_toml().contains("[image]\nref = "), "{}", policy.to_toml());
}

/// `image.insecure` is a grant (replaced by a refining file, so one can
/// narrow it); `image.credentials` are merged registry by registry, a
/// refining file's entry replacing the one for the same registry. Both
/// read back from `policy show`'s form.
#[test]
fn image_insecure_is_replaced_and_credentials_merge_by_registry() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "team.toml",
        "extends = \"ci\"\n[image]\ninsecure = [\"127.0.0.1:5000\"]\n\
         [image.credentials.\"registry.example.com\"]\nusername = \"team\"\npassword = \"env:TEAM_PASSWORD\"\n\
         [image.credentials.\"registry.example.org:5000\"]\nusername = \"bot\"\npassword = \"file:/run/keys/bot\"\n",
    );
    let team = Policy::resolve(dir.path().join("team.toml").to_str().unwrap()).unwrap();
    assert!(team.image.is_insecure(&["127.0.0.1:5000"]));
    assert!(team.image.require_digest, "the rest comes from ci");
    let project = write(
        dir.path(),
        "project.toml",
        "extends = \"team.toml\"\n[image]\ninsecure = []\n\
         [image.credentials.\"Registry.Example.com\"]\nusername = \"project\"\npassword = \"cmd:print-token\"\n",
    );
    let policy = Policy::resolve(project.to_str().unwrap()).unwrap();
    assert!(policy.image.insecure.is_empty(), "a refining file narrows the insecure list");
    assert!(!policy.image.is_insecure(&["127.0.0.1:5000"]));
    let (registry, credential) = policy.image.credential_for(&["registry.example.com"]).unwrap();
    assert_eq!((registry, credential.username.as_str()), ("Registry.Example.com", "project"));
    assert_eq!(credential.password, SecretSource::Cmd("print-token".into()));
    assert_eq!(policy.image.credentials.len(), 2, "{:?}", policy.image.credentials);
    let (_, bot) = policy.image.credential_for(&["registry.example.org:5000"]).unwrap();
    assert_eq!(bot.password, SecretSource::File("/run/keys/bot".into()));

    let shown = write(dir.path(), "shown.toml", &team.to_toml());
    let back = Policy::resolve(shown.to_str().unwrap()).unwrap();
    assert_eq!(back.image, team.image, "{}", team.to_toml());
}
