//! OCI images as a sandbox's root, all local: images built here from the
//! host's static busybox, packed by hand as an OCI image layout (blobs,
//! index.json, oci-layout), a gzip layer over a plain one with a whiteout.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::support::*;

const BUSYBOX: &str = "/bin/busybox";

fn sha256(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A layer as tar entries: (name, kind, mode, link target, data). Names
/// go into the header bytes as given, hostile ones included.
type Entry<'a> = (&'a str, tar::EntryType, u32, &'a str, Vec<u8>);

fn tar_layer(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, mode, link, data) in entries {
        let mut header = tar::Header::new_gnu();
        let gnu = header.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_mode(*mode);
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, &data[..]).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("blobs/sha256").join(&digest["sha256:".len()..]), bytes).unwrap();
    digest
}

/// Writes an OCI image layout at `dir` with one image tagged `tag` and
/// returns its manifest digest.
fn write_layout(dir: &Path, tag: &str, layers: &[(Vec<u8>, &str)], config: serde_json::Value) -> String {
    let layer_descriptors: Vec<_> = layers
        .iter()
        .map(|(bytes, media_type)| {
            serde_json::json!({"mediaType": media_type, "digest": put_blob(dir, bytes), "size": bytes.len()})
        })
        .collect();
    let config = serde_json::to_vec(&config).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put_blob(dir, &config), "size": config.len()},
        "layers": layer_descriptors,
    }))
    .unwrap();
    let digest = put_blob(dir, &manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    digest
}

const DIR: tar::EntryType = tar::EntryType::Directory;
const FILE: tar::EntryType = tar::EntryType::Regular;
const LINK: tar::EntryType = tar::EntryType::Symlink;

/// A busybox image: layer 1 (plain tar) holds busybox, its applet links
/// and `etc/removed`; layer 2 (gzip) adds `etc/image-release` and whites
/// out `etc/removed`. Config: Env, WorkingDir and Cmd.
pub(super) fn busybox_layout(dir: &Path) -> Option<String> {
    busybox_layout_as(dir, None, &[])
}

/// [`busybox_layout`] with a `User` in its config and `extra` entries in
/// its top layer (an /etc/passwd).
fn busybox_layout_as(dir: &Path, user: Option<&str>, extra: &[Entry<'_>]) -> Option<String> {
    let busybox = fs::read(BUSYBOX).ok()?;
    let mut base: Vec<Entry<'_>> = vec![
        ("bin", DIR, 0o755, "", vec![]),
        ("bin/busybox", FILE, 0o755, "", busybox),
        ("etc", DIR, 0o755, "", vec![]),
        ("etc/removed", FILE, 0o644, "", b"should be whited out\n".to_vec()),
        ("srv", DIR, 0o755, "", vec![]),
    ];
    for applet in ["sh", "cat", "echo", "ls", "test", "id", "pwd", "env", "true"] {
        base.push((Box::leak(format!("bin/{applet}").into_boxed_str()), LINK, 0o777, "busybox", vec![]));
    }
    let mut top = vec![
        ("etc/image-release", FILE, 0o644, "", b"airlock-test-image 1\n".to_vec()),
        ("etc/.wh.removed", FILE, 0o644, "", vec![]),
    ];
    top.extend(extra.iter().cloned());
    let top = tar_layer(&top);
    let mut config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "IMAGE_VAR=from-image"],
            "WorkingDir": "/srv",
            "Cmd": ["/bin/sh", "-c", "echo cmd-from-image in $(pwd)"],
        },
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    if let Some(user) = user {
        config["config"]["User"] = user.into();
    }
    Some(write_layout(
        dir,
        "v1",
        &[
            (tar_layer(&base), "application/vnd.oci.image.layer.v1.tar"),
            (gzip(&top), "application/vnd.oci.image.layer.v1.tar+gzip"),
        ],
        config,
    ))
}

fn layout_or_skip(env: &Env) -> Option<(PathBuf, String)> {
    let dir = env.dir.path().join("layout");
    let digest = busybox_layout(&dir);
    if !require(digest.is_some(), "a static busybox at /bin/busybox (Debian: busybox-static)") {
        return None;
    }
    digest.map(|d| (dir, d))
}

#[test]
fn a_sandbox_runs_on_an_image_with_its_layers_env_and_command() {
    let env = Env::new();
    let Some((layout, digest)) = layout_or_skip(&env) else { return };
    let image = format!("oci:{}:v1", layout.display());
    let script = "cat /etc/image-release; echo var=$IMAGE_VAR; \
                  test -e /etc/removed && echo whiteout-failed; \
                  test -e /usr/bin && echo host-usr-visible; \
                  echo written > $AIRLOCK_PROBE/out; pwd";
    let o = env
        .airlock([
            "run",
            "--name",
            "img",
            "--image",
            &image,
            "-e",
            &format!("AIRLOCK_PROBE={}", env.workspace.display()),
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    assert!(out.contains("airlock-test-image 1"), "{out}");
    assert!(out.contains("var=from-image"), "the image's Env: {out}");
    assert!(!out.contains("whiteout-failed"), "layer 2's whiteout hides layer 1's file: {out}");
    assert!(!out.contains("host-usr-visible"), "the root is the image's, not the host's: {out}");
    assert!(out.contains(&env.workspace.display().to_string()), "the workspace at its own path: {out}");

    // The resolved digest in inspect and in the audit log.
    let o = env.airlock(["inspect", "--json", "img"]).output().unwrap();
    let view: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(view["image"]["digest"], digest.as_str(), "{view}");
    let audit = fs::read_to_string(env.sandbox_dir("img").join("audit.jsonl")).unwrap();
    assert!(audit.contains(&digest), "{audit}");

    // Without a command: the image's Cmd, in its WorkingDir (no workspace).
    let o = env.airlock(["run", "--mode", "none", "--image", &image]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains("cmd-from-image in /srv"), "{}", show(&o));

    // The stored layers were not written by either sandbox.
    let store = env.state.join("images/layers/sha256");
    for layer in fs::read_dir(&store).unwrap() {
        let layer = layer.unwrap().path();
        assert!(!layer.join("root").exists() && !layer.join("tmp/out").exists(), "{}", layer.display());
    }
}

#[test]
fn image_pull_ls_rm_and_prune_keep_what_sandboxes_use() {
    let env = Env::new();
    let Some((layout, digest)) = layout_or_skip(&env) else { return };
    let image = format!("oci:{}:v1", layout.display());
    let o = env.airlock(["image", "pull", &image]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), digest, "the digest printed: {}", show(&o));
    assert!(stderr(&o).contains("layer sha256:"), "progress on stderr: {}", show(&o));

    let o = env.airlock(["image", "ls", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list[0]["manifest"], digest.as_str(), "{list}");
    assert_eq!(list[0]["names"][0], image.as_str(), "{list}");

    let o = env.airlock(["run", "--name", "user", "--image", &image, "--", "true"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = env.airlock(["image", "rm", &image]).output().unwrap();
    assert_ne!(o.status.code(), Some(0), "in use by a sandbox: {}", show(&o));
    assert!(stderr(&o).contains("user"), "{}", show(&o));
    let o = env.airlock(["image", "prune"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!stdout(&o).contains(&digest), "kept while a sandbox uses it: {}", show(&o));
    assert_eq!(fs::read_dir(env.state.join("images/layers/sha256")).unwrap().count(), 2);

    let o = env.airlock(["rm", "user"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = env.airlock(["image", "prune"]).output().unwrap();
    assert!(stdout(&o).contains(&digest), "{}", show(&o));
    assert_eq!(fs::read_dir(env.state.join("images/layers/sha256")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(env.state.join("images/blobs/sha256")).unwrap().count(), 0);
}

#[test]
fn a_pull_past_the_store_budget_is_refused_and_ls_shows_the_budget() {
    let env = Env::new();
    let Some((layout, digest)) = layout_or_skip(&env) else { return };
    let image = format!("oci:{}:v1", layout.display());
    // The busybox layer alone is about 1 MiB (2 with it unpacked).
    let o = env.airlock(["image", "pull", &image]).env("AIRLOCK_IMAGE_BUDGET", "256K").output().unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("disk budget of 256.0 KiB would be exceeded"), "{}", show(&o));
    assert!(stderr(&o).contains("airlock image prune"), "says what to do: {}", show(&o));
    assert_eq!(fs::read_dir(env.state.join("images/layers/sha256")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(env.state.join("images/tmp")).unwrap().count(), 0);
    let o = env.airlock(["image", "ls"]).env("AIRLOCK_IMAGE_BUDGET", "256K").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!stdout(&o).contains("sha256:"), "nothing recorded: {}", show(&o));
    assert!(stdout(&o).contains("of a 256.0 KiB budget (AIRLOCK_IMAGE_BUDGET)"), "{}", show(&o));

    let o = env.airlock(["image", "pull", &image]).env("AIRLOCK_IMAGE_BUDGET", "64M").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), digest);
    let o = env.airlock(["image", "ls"]).env("AIRLOCK_IMAGE_BUDGET", "64M").output().unwrap();
    assert!(stdout(&o).contains("of a 64.0 MiB budget"), "{}", show(&o));
    let o = env.airlock(["image", "ls"]).env_remove("AIRLOCK_IMAGE_BUDGET").output().unwrap();
    assert!(stdout(&o).contains("no budget (AIRLOCK_IMAGE_BUDGET unset)"), "{}", show(&o));

    let o = env.airlock(["image", "ls"]).env("AIRLOCK_IMAGE_BUDGET", "lots").output().unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("AIRLOCK_IMAGE_BUDGET=\"lots\" is not a size"), "{}", show(&o));
}

#[test]
fn a_hostile_layer_is_refused_and_leaves_nothing() {
    let env = Env::new();
    let layout = env.dir.path().join("hostile");
    let outside = env.dir.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let target = outside.display().to_string();
    let layer =
        tar_layer(&[("a", LINK, 0o777, &target, vec![]), ("a/x", FILE, 0o644, "", b"escaped".to_vec())]);
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}});
    write_layout(&layout, "v1", &[(layer, "application/vnd.oci.image.layer.v1.tar")], config);
    let o = env.airlock(["image", "pull", &format!("oci:{}:v1", layout.display())]).output().unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("symlink"), "{}", show(&o));
    assert!(!outside.join("x").exists());
    assert_eq!(fs::read_dir(env.state.join("images/layers/sha256")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(env.state.join("images/tmp")).unwrap().count(), 0);
    let o = env.airlock(["image", "ls", "--json"]).output().unwrap();
    assert_eq!(stdout(&o).trim(), "[]", "{}", show(&o));
}

#[test]
fn a_policy_that_requires_digests_refuses_tags() {
    let env = Env::new();
    let Some((layout, digest)) = layout_or_skip(&env) else { return };
    let o = env
        .airlock(["run", "--policy", "ci", "--image", &format!("oci:{}:v1", layout.display()), "--", "true"])
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("require_digest"), "{}", show(&o));
    assert!(
        !env.state.join("images/layers").exists()
            || fs::read_dir(env.state.join("images/layers/sha256")).unwrap().count() == 0
    );
    let pinned = format!("oci:{}@{digest}", layout.display());
    let o = env
        .airlock(["run", "--policy", "ci", "--image", &pinned, "--", "cat", "/etc/image-release"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains("airlock-test-image"), "{}", show(&o));
}

/// The microVM tier on an image: the guest's root is the image's layers
/// (shared read-only, stacked by the guest), not the host's directories;
/// its Env, Cmd and WorkingDir as on the process tier; airlock's own files
/// put over it; the workspace at its own path; the digest recorded.
#[test]
fn a_microvm_sandbox_runs_on_an_image() {
    if !super::microvm::ready() {
        return;
    }
    let env = Env::new();
    let Some((layout, digest)) = layout_or_skip(&env) else { return };
    // Pinned: the tests' microVM policy extends ci, which requires digests.
    let image = format!("oci:{}@{digest}", layout.display());
    let policy = super::microvm::emulation_policy(&env);
    let policy = policy.to_str().unwrap();
    let cache = super::microvm::shared_cache();
    let script = "cat /etc/image-release; echo var=$IMAGE_VAR; \
                  test -e /etc/removed && echo whiteout-failed; \
                  test -e /usr/bin && echo host-usr-visible; \
                  grep -q localhost /etc/hosts && echo airlock-hosts; \
                  echo written > /tmp/t && cat /tmp/t; \
                  touch /etc/new 2>/dev/null && echo image-root-writable; \
                  ls $AIRLOCK_PROBE >/dev/null && echo workspace-seen; pwd";
    let probe = format!("AIRLOCK_PROBE={}", env.workspace.display());
    let run =
        ["run", "--policy", policy, "--name", "vmimg", "--image", &image, "-e", &probe, "--", "sh", "-c"];
    let o = super::microvm::airlock_vm(&env, &cache, &[&run[..], &[script]].concat());
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    assert!(out.contains("airlock-test-image 1"), "{out}");
    assert!(out.contains("var=from-image"), "the image's Env: {out}");
    assert!(!out.contains("whiteout-failed"), "layer 2's whiteout hides layer 1's file: {out}");
    assert!(!out.contains("host-usr-visible"), "the root is the image's, not the host's: {out}");
    assert!(out.contains("airlock-hosts"), "airlock's /etc/hosts where the image has none: {out}");
    assert!(out.contains("written"), "/tmp is the guest's own: {out}");
    assert!(!out.contains("image-root-writable"), "the image's root is read-only: {out}");
    assert!(out.contains("workspace-seen"), "{out}");
    assert!(out.contains(&env.workspace.display().to_string()), "the workspace at its own path: {out}");

    // Long-lived: an exec gets the image's Env and, without a workspace,
    // its WorkingDir; the digest is in inspect.
    let create = ["create", "--policy", policy, "--name", "vmimg", "--mode", "none", "--image", &image];
    let o = super::microvm::airlock_vm(&env, &cache, &create);
    assert!(o.status.success(), "{}", show(&o));
    let o = super::microvm::airlock_vm(
        &env,
        &cache,
        &["exec", "vmimg", "--", "sh", "-c", "echo $IMAGE_VAR; pwd"],
    );
    assert_eq!(stdout(&o), "from-image\n/srv\n", "{}", show(&o));
    let o = env.airlock(["inspect", "--json", "vmimg"]).output().unwrap();
    let view: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(view["image"]["digest"], digest.as_str(), "{view}");
    assert_eq!(view["tier"], "microvm", "{view}");
    let o = env.airlock(["stop", "vmimg"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));

    // Without a command: the image's Cmd, in its WorkingDir (no workspace).
    let o = super::microvm::airlock_vm(
        &env,
        &cache,
        &["run", "--policy", policy, "--mode", "none", "--image", &image],
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains("cmd-from-image in /srv"), "{}", show(&o));

    // The stored layers were not written.
    let store = env.state.join("images/layers/sha256");
    for layer in fs::read_dir(&store).unwrap() {
        let layer = layer.unwrap().path();
        assert!(!layer.join("tmp/t").exists() && !layer.join("etc/new").exists(), "{}", layer.display());
    }
}

/// An image of `count` layers (at least 40): layer 0 holds busybox,
/// `etc/replaced`, `etc/lower-only` and `opt/old/a`; layer n (1 to
/// count-2) adds `layers/n`; layer 10 and then layer 25 replace
/// `etc/replaced`; layer 20 makes `opt/old` opaque and adds `opt/old/b`;
/// layer 30 whites out `etc/lower-only`, layer 35 `layers/5`; the top
/// layer adds `etc/image-release`. Tagged `deep`.
fn deep_layout(dir: &Path, count: usize) -> Option<String> {
    assert!(count >= 40, "the layers named above must exist");
    let busybox = fs::read(BUSYBOX).ok()?;
    let mut base: Vec<Entry<'_>> = vec![
        ("bin", DIR, 0o755, "", vec![]),
        ("bin/busybox", FILE, 0o755, "", busybox),
        ("etc", DIR, 0o755, "", vec![]),
        ("etc/replaced", FILE, 0o644, "", b"from-layer-0".to_vec()),
        ("etc/lower-only", FILE, 0o644, "", b"lower".to_vec()),
        ("opt", DIR, 0o755, "", vec![]),
        ("opt/old", DIR, 0o755, "", vec![]),
        ("opt/old/a", FILE, 0o644, "", b"a".to_vec()),
    ];
    for applet in ["sh", "cat", "echo", "ls", "test", "wc", "true"] {
        base.push((Box::leak(format!("bin/{applet}").into_boxed_str()), LINK, 0o777, "busybox", vec![]));
    }
    let mut layers = vec![(tar_layer(&base), "application/vnd.oci.image.layer.v1.tar")];
    for n in 1..count - 1 {
        let name: &str = Box::leak(format!("layers/{n}").into_boxed_str());
        let mut entries: Vec<Entry<'_>> =
            vec![("layers", DIR, 0o755, "", vec![]), (name, FILE, 0o644, "", n.to_string().into_bytes())];
        match n {
            10 | 25 => {
                entries.push(("etc/replaced", FILE, 0o644, "", format!("from-layer-{n}").into_bytes()))
            }
            20 => {
                entries.push(("opt/old/.wh..wh..opq", FILE, 0o644, "", vec![]));
                entries.push(("opt/old/b", FILE, 0o644, "", b"b".to_vec()));
            }
            30 => entries.push(("etc/.wh.lower-only", FILE, 0o644, "", vec![])),
            35 => entries.push(("layers/.wh.5", FILE, 0o644, "", vec![])),
            _ => {}
        }
        // Half of them compressed, as registries serve most layers.
        layers.push(if n % 2 == 0 {
            (gzip(&tar_layer(&entries)), "application/vnd.oci.image.layer.v1.tar+gzip")
        } else {
            (tar_layer(&entries), "application/vnd.oci.image.layer.v1.tar")
        });
    }
    let top = [("etc/image-release", FILE, 0o644, "", b"deep-image".to_vec())];
    layers.push((tar_layer(&top), "application/vnd.oci.image.layer.v1.tar"));
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    Some(write_layout(dir, "deep", &layers, config))
}

/// What [`deep_layout`]'s merged root shows, in one line: the file of the
/// highest layer that replaced it, every `layers/n` but the whited-out one,
/// the opaque directory's new file alone, the top layer's file; and a word
/// for each whiteout that failed.
const DEEP_SCRIPT: &str = "echo replaced=$(cat /etc/replaced) layers=$(ls /layers | wc -l) \
                           top=$(cat /layers/38) old=$(ls /opt/old) release=$(cat /etc/image-release); \
                           test -e /layers/5 && echo whiteout-5-failed; \
                           test -e /etc/lower-only && echo whiteout-failed; true";
const DEEP_ROOT: &str = "replaced=from-layer-25 layers=37 top=38 old=b release=deep-image\n";

/// An image of 40 layers (more than a guest once took, one device each)
/// runs on the microVM tier, its layers one share: the merged root is the
/// process tier's, whiteouts, an opaque directory and replaced files
/// included. One boot.
#[test]
fn a_microvm_sandbox_runs_on_an_image_of_forty_layers() {
    if !super::microvm::ready() {
        return;
    }
    let env = Env::new();
    let layout = env.dir.path().join("deep");
    let digest = deep_layout(&layout, 40);
    if !require(digest.is_some(), "a static busybox at /bin/busybox (Debian: busybox-static)") {
        return;
    }
    let image = format!("oci:{}@{}", layout.display(), digest.unwrap_or_default());
    let o = env
        .airlock([
            "run",
            "--policy",
            "ci",
            "--mode",
            "none",
            "--image",
            &image,
            "--",
            "sh",
            "-c",
            DEEP_SCRIPT,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o), DEEP_ROOT, "the process tier's root: {}", show(&o));
    let layers = fs::read_dir(env.state.join("images/layers/sha256")).unwrap().count();
    assert_eq!(layers, 40, "each layer unpacked on its own");

    let policy = super::microvm::emulation_policy(&env);
    let run = ["run", "--policy", policy.to_str().unwrap(), "--mode", "none", "--image", &image];
    let cache = super::microvm::shared_cache();
    let o = super::microvm::airlock_vm(&env, &cache, &[&run[..], &["--", "sh", "-c", DEEP_SCRIPT]].concat());
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o), DEEP_ROOT, "the guest's root is the process tier's: {}", show(&o));
}

/// An image of more layers than overlayfs stacks is refused before
/// anything starts, on both tiers, saying why.
#[test]
fn an_image_of_more_layers_than_a_root_stacks_is_refused() {
    let env = Env::new();
    let layout = env.dir.path().join("deeper");
    let digest = deep_layout(&layout, 500);
    if !require(digest.is_some(), "a static busybox at /bin/busybox (Debian: busybox-static)") {
        return;
    }
    let image = format!("oci:{}@{}", layout.display(), digest.unwrap_or_default());
    let mut policies = vec!["ci".to_owned()];
    if super::microvm::ready() {
        policies.push(super::microvm::emulation_policy(&env).display().to_string());
    }
    for tier in &policies {
        let o = env
            .airlock(["run", "--policy", tier, "--mode", "none", "--image", &image, "--", "true"])
            .output()
            .unwrap();
        assert_ne!(o.status.code(), Some(0), "{}", show(&o));
        let err = stderr(&o);
        assert!(
            err.contains("500 layers") && err.contains("at most 499") && err.contains("flatten"),
            "{tier}: {}",
            show(&o)
        );
    }
}

/// The image's `User`, a name looked up in its own /etc/passwd: the
/// command and every exec that names no user run as it; `--user` wins; a
/// passwd that is a link out of the image is not followed (refused).
#[test]
fn the_images_user_runs_the_command_unless_the_caller_names_one() {
    let env = Env::new();
    if !require(is_root(), "root (rootless, the sandbox maps root alone)") {
        return;
    }
    let layout = env.dir.path().join("layout-user");
    let passwd = b"root:x:0:0:root:/root:/bin/sh\ndev:x:1000:1001:dev:/home/dev:/bin/sh\n".to_vec();
    let digest = busybox_layout_as(&layout, Some("dev"), &[("etc/passwd", FILE, 0o644, "", passwd)]);
    if !require(digest.is_some(), "a static busybox at /bin/busybox (Debian: busybox-static)") {
        return;
    }
    let image = format!("oci:{}:v1", layout.display());
    let o = env
        .airlock([
            "run",
            "--mode",
            "none",
            "--image",
            &image,
            "--",
            "sh",
            "-c",
            "echo $(id -u):$(id -g) $USER",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains("1000:1001 dev"), "{}", show(&o));

    let o =
        env.airlock(["create", "--name", "imguser", "--mode", "none", "--image", &image]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let o = env.airlock(["exec", "imguser", "--", "id", "-u"]).output().unwrap();
    assert_eq!(stdout(&o).trim(), "1000", "an exec without --user: {}", show(&o));
    let o = env.airlock(["exec", "--user", "0", "imguser", "--", "id", "-u"]).output().unwrap();
    assert_eq!(stdout(&o).trim(), "0", "--user wins: {}", show(&o));
    let o = env.airlock(["stop", "imguser"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));

    // The same in a guest, whose agent looks the name up in the image's own
    // /etc/passwd (the guest's root).
    if super::microvm::ready() {
        let pinned = format!("oci:{}@{}", layout.display(), digest.as_deref().unwrap_or_default());
        let policy = super::microvm::emulation_policy(&env);
        let run = ["run", "--policy", policy.to_str().unwrap(), "--mode", "none", "--image", &pinned, "--"];
        let o = super::microvm::airlock_vm(
            &env,
            &super::microvm::shared_cache(),
            &[&run[..], &["sh", "-c", "echo $(id -u):$(id -g) $USER"]].concat(),
        );
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        assert!(stdout(&o).contains("1000:1001 dev"), "in a microVM: {}", show(&o));
    }

    // An /etc/passwd that links to the host's is not read.
    let hostile = env.dir.path().join("layout-link");
    busybox_layout_as(&hostile, Some("root"), &[("etc/passwd", LINK, 0o777, "/etc/passwd", vec![])]).unwrap();
    let image = format!("oci:{}:v1", hostile.display());
    let o = env.airlock(["run", "--mode", "none", "--image", &image, "--", "true"]).output().unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("symbolic link"), "{}", show(&o));
}

#[test]
fn a_rootless_sandbox_runs_on_an_image_it_pulled() {
    let Some(r) = super::rootless::setup() else { return };
    let layout = r.env.dir.path().join("layout");
    let digest = busybox_layout(&layout);
    if !require(digest.is_some(), "a static busybox at /bin/busybox (Debian: busybox-static)") {
        return;
    }
    if is_root() {
        let (uid, gid) = (r.uid, r.uid);
        super::rootless::chown_tree(r.env.dir.path(), uid, gid);
    }
    let image = format!("oci:{}:v1", layout.display());
    let o = r
        .airlock(&[
            "run",
            "--image",
            &image,
            "--",
            "sh",
            "-c",
            "cat /etc/image-release; test -e /etc/removed || echo whiteout-ok",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    assert!(out.contains("airlock-test-image 1") && out.contains("whiteout-ok"), "{}", show(&o));
}

/// `run --user` and `create --user` over the image's `User`: numbers only,
/// a UID alone taking its group (and its name, as USER) from the image's
/// /etc/passwd; the command and, for `create`, every exec that names no
/// user run as it, while `exec --user` still wins; without an image, the
/// host root's command runs as it too. A value that is not UID[:GID], or
/// lies outside the sandbox's ids, is refused before any sandbox exists.
#[test]
fn run_and_create_user_overrides_the_images_user() {
    let env = Env::new();
    if !require(is_root(), "root (rootless, the sandbox maps root alone)") {
        return;
    }
    let layout = env.dir.path().join("layout-user");
    let passwd = b"root:x:0:0:root:/root:/bin/sh\ndev:x:1000:1001:dev:/home/dev:/bin/sh\n\
                   ci:x:1002:1003:ci:/home/ci:/bin/sh\n"
        .to_vec();
    let digest = busybox_layout_as(&layout, Some("dev"), &[("etc/passwd", FILE, 0o644, "", passwd)]);
    if !require(digest.is_some(), "a static busybox at /bin/busybox (Debian: busybox-static)") {
        return;
    }
    let image = format!("oci:{}:v1", layout.display());
    let ids = "echo $(id -u):$(id -g) $USER";
    let run = |user: &str| {
        env.airlock(["run", "--mode", "none", "--image", &image, "--user", user, "--", "sh", "-c", ids])
            .output()
            .unwrap()
    };
    for (user, expected) in [("1002", "1002:1003 ci"), ("0", "0:0 root"), ("2000:2001", "2000:2001")] {
        let o = run(user);
        assert_eq!(o.status.code(), Some(0), "--user {user}: {}", show(&o));
        assert!(stdout(&o).starts_with(expected), "--user {user} over the image's dev: {}", show(&o));
    }

    let o = env
        .airlock(["create", "--name", "as-ci", "--mode", "none", "--image", &image, "--user", "1002"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let o = env.airlock(["exec", "as-ci", "--", "sh", "-c", ids]).output().unwrap();
    assert!(stdout(&o).starts_with("1002:1003 ci"), "an exec without --user: {}", show(&o));
    let o = env.airlock(["exec", "--user", "dev", "as-ci", "--", "id", "-u"]).output().unwrap();
    assert_eq!(stdout(&o).trim(), "1000", "exec --user wins: {}", show(&o));
    let o = env.airlock(["stop", "as-ci"]).output().unwrap();
    assert!(o.status.success(), "{}", show(&o));

    // Without an image: the host's root, run as the ids given.
    let o = env
        .airlock(["run", "--mode", "none", "--user", "1234:1235", "--", "sh", "-c", "echo $(id -u):$(id -g)"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), "1234:1235", "{}", show(&o));

    let sandboxes = |env: &Env| {
        let o = env.airlock(["ls", "--json"]).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap().as_array().unwrap().len()
    };
    let before = sandboxes(&env);
    for (user, needle) in [
        ("dev", "give UID or UID:GID"),
        ("1000:", "give UID or UID:GID"),
        ("-1", "give UID or UID:GID"),
        ("70000", "outside the sandbox's ids: the sandbox's ids are 0-65535"),
        ("0:70000", "outside the sandbox's ids"),
    ] {
        let flag = format!("--user={user}");
        for args in [
            vec!["run", "--mode", "none", "--image", &image, &flag, "--", "true"],
            vec!["create", "--mode", "none", "--image", &image, &flag],
        ] {
            let verb = args[0];
            let o = env.airlock(&args).output().unwrap();
            assert_ne!(o.status.code(), Some(0), "{verb} --user {user}: {}", show(&o));
            assert!(stderr(&o).contains(needle), "{verb} --user {user}: {}", show(&o));
        }
    }
    assert_eq!(sandboxes(&env), before, "a refused --user leaves no sandbox");

    // The same over a guest's: its agent looks the ids up in the image's
    // own /etc/passwd (the guest's root).
    if super::microvm::ready() {
        let pinned = format!("oci:{}@{}", layout.display(), digest.as_deref().unwrap_or_default());
        let policy = super::microvm::emulation_policy(&env);
        let run = ["run", "--policy", policy.to_str().unwrap(), "--mode", "none", "--image", &pinned];
        let o = super::microvm::airlock_vm(
            &env,
            &super::microvm::shared_cache(),
            &[&run[..], &["--user", "1002", "--", "sh", "-c", ids]].concat(),
        );
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        assert!(stdout(&o).starts_with("1002:1003 ci"), "in a microVM: {}", show(&o));
    }
}

/// Through the daemon: a create whose image would pass the image store's
/// disk budget answers 507 with its own code, and leaves no sandbox; the
/// create body's `user` runs the sandbox's execs.
#[test]
fn the_daemons_create_answers_507_when_the_image_store_budget_would_be_passed() {
    use super::daemon_harness::TestDaemon;
    if !require(is_root(), "root (the daemon reads a local image layout for root callers only)") {
        return;
    }
    let mut d = TestDaemon::start_with("imgbudget", |cmd| {
        cmd.env("AIRLOCK_IMAGE_BUDGET", "256K");
    });
    let layout = d.env.dir.path().join("layout");
    if !require(
        busybox_layout(&layout).is_some(),
        "a static busybox at /bin/busybox (Debian: busybox-static)",
    ) {
        return;
    }
    let image = format!("oci:{}:v1", layout.display());
    let (status, body) =
        d.json("POST", "/v1/sandboxes", Some(serde_json::json!({"name": "big", "image": image})));
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "image_budget_exceeded", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("disk budget of 256.0 KiB would be exceeded"), "{body}");
    assert!(message.contains("airlock image prune"), "says what to do: {body}");
    assert!(d.sandbox_names().is_empty(), "{:?}", d.sandbox_names());
    let layers = d.env.state.join("images/layers/sha256");
    assert!(!layers.exists() || fs::read_dir(&layers).unwrap().count() == 0, "nothing unpacked");

    // Without the budget (a restart drops it), the same create runs, as
    // the body's user.
    d.restart();
    for (user, code) in [("nobody", "invalid_request"), ("70000", "invalid_request")] {
        let body = serde_json::json!({"name": "refused", "image": image, "user": user});
        let (status, answer) = d.json("POST", "/v1/sandboxes", Some(body));
        assert_eq!((status, answer["error"]["code"].as_str()), (400, Some(code)), "{user}: {answer}");
    }
    let body = serde_json::json!({"name": "fits", "image": image, "user": "1000:1001"});
    let (status, created) = d.json("POST", "/v1/sandboxes", Some(body));
    assert_eq!(status, 201, "{created}");
    let o = d
        .env
        .airlock(["exec", "fits", "--", "sh", "-c", "echo $(id -u):$(id -g)"])
        .env("AIRLOCK_SOCKET", &d.socket)
        .env("AIRLOCK_CGROUP_PARENT", &d.cgroup_parent)
        .output()
        .unwrap();
    assert_eq!(stdout(&o).trim(), "1000:1001", "{}", show(&o));
    let (status, removed) = d.json("DELETE", "/v1/sandboxes/fits", None);
    assert_eq!(status, 200, "{removed}");
}
