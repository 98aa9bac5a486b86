//! The workspace end to end: overlay, diff, apply, and attacks on apply.

use super::support::*;

fn apply(env: &Env, name: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["apply", name, "--yes"];
    args.extend_from_slice(extra);
    env.airlock(args).output().unwrap()
}

#[test]
fn diff_and_apply_round_trip() {
    let env = Env::new();
    let o = env.run_sh(
        "roundtrip",
        &[],
        "echo patched >> src/lib.c; rm README; echo new > added.txt; mkdir -p docs && echo d > docs/x.md",
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    let o = env.airlock(["diff", "roundtrip"]).output().unwrap();
    let diff = stdout(&o);
    assert!(diff.contains("+patched"), "{}", show(&o));
    assert!(diff.contains("added.txt") && diff.contains("README"), "{}", show(&o));

    let o = env.airlock(["diff", "roundtrip", "--json"]).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(json.to_string().contains("src/lib.c"), "{json}");

    let o = env.airlock(["diff", "roundtrip", "--stat"]).output().unwrap();
    assert!(stdout(&o).contains("src/lib.c"), "{}", show(&o));

    let o = apply(&env, "roundtrip", &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(std::fs::read_to_string(env.workspace.join("src/lib.c")).unwrap(), "int x;\npatched\n");
    assert!(!env.workspace.join("README").exists());
    assert_eq!(std::fs::read_to_string(env.workspace.join("added.txt")).unwrap(), "new\n");
    assert_eq!(std::fs::read_to_string(env.workspace.join("docs/x.md")).unwrap(), "d\n");
    let audit = std::fs::read_to_string(env.sandbox_dir("roundtrip").join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"applied\""), "{audit}");
}

#[test]
fn apply_refuses_symlinks_out_and_writes_nothing() {
    let env = Env::new();
    let o = env.run_sh("links", &[], "echo ok > fine.txt; ln -s /etc/passwd passwd-link; ln -s ../../.. up");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = apply(&env, "links", &[]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!env.workspace.join("fine.txt").exists(), "partial apply");
    assert!(std::fs::symlink_metadata(env.workspace.join("passwd-link")).is_err());
}

#[test]
fn apply_never_writes_through_a_host_symlink() {
    let env = Env::new();
    let target = env.dir.path().join("elsewhere");
    std::fs::create_dir_all(&target).unwrap();
    // The sandbox writes a real directory where the host will have a link.
    let o = env.run_sh("through", &[], "mkdir -p via && echo owned > via/file");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    std::os::unix::fs::symlink(&target, env.workspace.join("via")).unwrap();
    // The review shows the host's link being replaced by the sandbox's
    // directory; applying does exactly that and never follows the link.
    let o = env.airlock(["diff", "through", "--json"]).output().unwrap();
    assert!(stdout(&o).contains("type_changed"), "{}", show(&o));
    let o = apply(&env, "through", &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!target.join("file").exists(), "apply wrote through a host symlink");
    let via = std::fs::symlink_metadata(env.workspace.join("via")).unwrap();
    assert!(via.is_dir());
    assert_eq!(std::fs::read_to_string(env.workspace.join("via/file")).unwrap(), "owned\n");
}

#[test]
fn type_changes_apply_safely() {
    let env = Env::new();
    let o = env.run_sh(
        "types",
        &[],
        "rm -r src && echo now-a-file > src; rm README && mkdir README && echo in > README/x",
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = apply(&env, "types", &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(std::fs::read_to_string(env.workspace.join("src")).unwrap(), "now-a-file\n");
    assert_eq!(std::fs::read_to_string(env.workspace.join("README/x")).unwrap(), "in\n");
}

#[test]
fn protected_paths_need_the_flag() {
    let env = Env::new();
    std::fs::create_dir_all(env.workspace.join(".git/hooks")).unwrap();
    let o = env.run_sh("hooks", &[], "echo 'curl evil' > .git/hooks/pre-commit; echo ok > fine.txt");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = apply(&env, "hooks", &[]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains(".git/hooks/pre-commit"), "{}", show(&o));
    assert!(!env.workspace.join("fine.txt").exists(), "partial apply");
    let o = apply(&env, "hooks", &["--allow-protected"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(env.workspace.join(".git/hooks/pre-commit").exists());
}

#[test]
fn special_files_and_setuid_bits_never_reach_the_host() {
    let env = Env::new();
    let o = env.run_sh("special", &[], "mkfifo pipe");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = apply(&env, "special", &[]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(std::fs::symlink_metadata(env.workspace.join("pipe")).is_err());

    let o = env.run_sh("suid", &[], "echo x > tool; chmod 4755 tool");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = apply(&env, "suid", &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(env.workspace.join("tool")).unwrap().permissions().mode();
    assert_eq!(mode & 0o6000, 0, "setuid bit applied: {mode:o}");
}

#[test]
fn read_only_and_read_write_modes() {
    let env = Env::new();
    let o = env.run_sh("ro", &["--mode", "ro", "--rm"], "echo x > README && echo WROTE; true");
    assert!(!stdout(&o).contains("WROTE"), "{}", show(&o));
    assert_eq!(std::fs::read_to_string(env.workspace.join("README")).unwrap(), "hello\n");

    let o = env.run_sh("rw", &["--mode", "rw", "--rm"], "echo direct > README");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("warning"), "{}", show(&o));
    assert_eq!(std::fs::read_to_string(env.workspace.join("README")).unwrap(), "direct\n");
}

/// A workspace written in place takes no setuid or setgid bit, however the
/// sandbox tries (chmod, a creating open with the bits in its mode), while
/// ordinary modes still work: as root the sandbox's root writes as the
/// host's owners there, so a set-id file would be one for the host.
#[test]
fn a_rw_workspace_takes_no_setuid_or_setgid_bit() {
    let env = Env::new();
    let script = "cp /bin/true tool && chmod 755 tool && echo MODE-OK; \
                  chmod u+s tool && echo SUID-SET; chmod g+s tool && echo SGID-SET; \
                  python3 -c 'import os; os.open(\"made\", os.O_CREAT | os.O_WRONLY, 0o4755)' 2>/dev/null && echo CREATED-SUID; \
                  python3 -c 'import os; os.open(\"plain\", os.O_CREAT | os.O_WRONLY, 0o755)' && echo CREATED-PLAIN; true";
    let o = env.run_sh("rw-setid", &["--mode", "rw", "--rm"], script);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    assert!(out.contains("MODE-OK") && out.contains("CREATED-PLAIN"), "{}", show(&o));
    for refused in ["SUID-SET", "SGID-SET", "CREATED-SUID"] {
        assert!(!out.contains(refused), "{refused}: {}", show(&o));
    }
    use std::os::unix::fs::PermissionsExt;
    for file in ["tool", "plain"] {
        let mode = std::fs::metadata(env.workspace.join(file)).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755, "{file}: {mode:o}");
    }
    assert!(!env.workspace.join("made").exists(), "a set-id file was created on the host");
}

#[test]
fn writeback_never_refuses_apply() {
    let env = Env::new();
    let o = env.run_sh("ci-fail", &["--policy", "ci"], "echo x > new.txt; exit 1");
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let o = apply(&env, "ci-fail", &[]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("writeback"), "{}", show(&o));
    assert!(!env.workspace.join("new.txt").exists());
}

#[test]
fn artifacts_matching_the_policy_are_captured() {
    let env = Env::new();
    let o = env.run_sh(
        "artifacts",
        &["--policy", "ci"],
        "mkdir -p out && echo '<testsuite/>' > out/junit-report.xml; exit 1",
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let captured = env.sandbox_dir("artifacts").join("artifacts/out/junit-report.xml");
    assert_eq!(std::fs::read_to_string(captured).unwrap(), "<testsuite/>\n");
}

/// A worktree's `.git` names a directory outside the workspace, which the
/// sandbox cannot see: airlock says so before git inside says only "not a
/// git repository".
#[test]
fn a_repository_outside_the_workspace_is_pointed_out() {
    let env = Env::new();
    let main_git = env.dir.path().join("main/.git/worktrees/repo");
    std::fs::create_dir_all(&main_git).unwrap();
    std::fs::write(env.workspace.join(".git"), format!("gitdir: {}\n", main_git.display())).unwrap();
    let o = env.run_sh("worktree", &["--rm"], "test -e .git && echo seen");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o), "seen\n");
    assert!(stderr(&o).contains("the workspace's git repository is outside it"), "{}", show(&o));

    std::fs::remove_file(env.workspace.join(".git")).unwrap();
    std::fs::create_dir(env.workspace.join(".git")).unwrap();
    let o = env.run_sh("own-repo", &["--rm"], "true");
    assert!(!stderr(&o).contains("git repository"), "{}", show(&o));
}
