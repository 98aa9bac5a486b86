//! A container engine inside a microVM sandbox (`--containers`): the
//! host's `docker` CLI through the sandbox's socket runs containers in the
//! guest's own dockerd, from an image loaded from a tarball built here from
//! the host's static busybox; a bind mount of the workspace's path writes
//! through the sandbox's copy-on-write layer (`airlock diff`); the audit log
//! has the engine's start and each container created; `rm` leaves nothing;
//! the process tier and a policy that forbids it refuse `--containers`.
//!
//! One guest (boots and dockerd's start cost tens of seconds of software
//! emulation), under the microVM tests' emulation policy and guest cache.
//! The host's own dockerd, if any, is neither started nor touched: every
//! `docker` command names the sandbox's socket.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::support::*;

/// A policy on the microVM tier under emulation, with room for dockerd.
const POLICY: &str = "extends = \"dev\"\n[isolation]\ntier = \"microvm\"\n\
    allow_weaker = [\"kvm\", \"cgroups\", \"disk-quota\", \"landlock\"]\n\
    [limits]\ntimeout = \"20m\"\ncpus = 1\nmemory = \"1G\"\ndisk = \"2G\"\n";

/// A `docker save`-style archive of one busybox layer, tagged `tag`.
fn busybox_archive(path: &Path, tag: &str) -> bool {
    let Ok(busybox) = std::fs::read("/bin/busybox") else { return false };
    let mut layer = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    layer.append_data(&mut dir, "bin", &[][..]).unwrap();
    let mut file = tar::Header::new_gnu();
    file.set_mode(0o755);
    file.set_size(busybox.len() as u64);
    layer.append_data(&mut file, "bin/busybox", &busybox[..]).unwrap();
    for applet in ["sh", "echo", "true", "cat"] {
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_mode(0o777);
        link.set_size(0);
        layer.append_link(&mut link, format!("bin/{applet}"), "busybox").unwrap();
    }
    let layer = layer.into_inner().unwrap();
    let hex = |bytes: &[u8]| -> String {
        ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", hex(&layer))]},
    }))
    .unwrap();
    let config_name = format!("{}.json", hex(&config));
    let manifest = serde_json::to_vec(
        &serde_json::json!([{"Config": config_name, "RepoTags": [tag], "Layers": ["layer.tar"]}]),
    )
    .unwrap();
    let mut archive = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, bytes) in
        [(config_name.as_str(), &config), ("layer.tar", &layer), ("manifest.json", &manifest)]
    {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(bytes.len() as u64);
        archive.append_data(&mut header, name, &bytes[..]).unwrap();
    }
    archive.into_inner().unwrap().flush().unwrap();
    true
}

fn docker(socket: &str, args: &[&str]) -> Output {
    Command::new("docker").env("DOCKER_HOST", format!("unix://{socket}")).args(args).output().unwrap()
}

fn audit_events(env: &Env, name: &str, kind: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(env.state.join(name).join("audit.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == kind)
        .collect()
}

#[test]
fn a_microvm_sandbox_runs_containers_in_its_own_engine_through_its_socket() {
    let docker_cli = Command::new("docker").arg("--version").output().is_ok_and(|o| o.status.success());
    if !super::egress::tier_ready(super::egress::Tier::Microvm)
        || !require(Path::new("/usr/sbin/dockerd").exists(), "Debian's docker.io (dockerd) on the host")
        || !require(docker_cli, "a docker CLI on the host")
    {
        return;
    }
    let env = Env::new();
    let archive = env.dir.path().join("busybox.tar");
    if !require(busybox_archive(&archive, "airlock-test/busybox:v1"), "/bin/busybox (busybox-static)") {
        return;
    }
    let policy = env.dir.path().join("containers.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let cache = super::microvm::shared_cache();
    let airlock = |args: &[&str]| env.airlock(args).env("AIRLOCK_VM_CACHE", &cache).output().unwrap();

    // The process tier refuses, saying why; a policy that forbids the
    // flag refuses it too.
    let o = airlock(&["create", "--name", "proc", "--containers"]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("nested containers need their own kernel"), "{}", show(&o));
    let o = airlock(&["create", "--name", "plug", "--policy", "plugin", "--containers"]);
    assert!(stderr(&o).contains("containers_flag = false"), "{}", show(&o));

    let o = airlock(&["create", "--name", "d1", "--policy", policy.to_str().unwrap(), "--containers"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let inspect: serde_json::Value =
        serde_json::from_slice(&airlock(&["inspect", "d1", "--json"]).stdout).unwrap();
    let socket = inspect["containers"]["socket"].as_str().unwrap().to_owned();
    assert_eq!(Path::new(&socket), env.state.join("d1/containers.sock"));
    {
        use std::os::unix::fs::MetadataExt;
        let mode = std::fs::metadata(&socket).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "the socket is its owner's alone");
    }

    // The engine answers once the guest has started it.
    let started = Instant::now();
    loop {
        let o = docker(&socket, &["version", "--format", "{{.Server.Version}}"]);
        if o.status.success() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "the engine did not answer\n{}", show(&o));
        std::thread::sleep(Duration::from_secs(2));
    }
    let ready = audit_events(&env, "d1", "container_engine");
    assert!(ready.iter().any(|e| e["ready"] == true && e["reported_by"] == "guest"), "{ready:?}");

    // An image loaded from a tarball runs; its container is in the audit log.
    let o = docker(&socket, &["load", "-i", archive.to_str().unwrap()]);
    assert!(o.status.success(), "{}", show(&o));
    let o = docker(&socket, &["run", "--rm", "airlock-test/busybox:v1", "echo", "hi"]);
    assert_eq!(stdout(&o), "hi\n", "{}", show(&o));
    let created = audit_events(&env, "d1", "container_created");
    assert!(
        created.iter().any(|e| e["image"] == "airlock-test/busybox:v1"
            && e["command"] == serde_json::json!(["echo", "hi"])
            && e["reported_by"] == "guest"),
        "{created:?}"
    );

    // A bind mount of the workspace's path writes through the sandbox's
    // layer: the host's workspace is untouched until apply, diff shows it.
    let ws = env.workspace.to_str().unwrap().to_owned();
    let o = docker(
        &socket,
        &[
            "run",
            "--rm",
            "-v",
            &format!("{ws}:/w"),
            "airlock-test/busybox:v1",
            "sh",
            "-c",
            "echo from-a-container > /w/made.txt",
        ],
    );
    assert!(o.status.success(), "{}", show(&o));
    assert!(!env.workspace.join("made.txt").exists(), "the container wrote the host's workspace");
    let diff = airlock(&["diff", "d1"]);
    assert!(stdout(&diff).contains("+from-a-container"), "{}", show(&diff));

    // The engine is the guest's own: the host sees none of its containers
    // or images, and the sandbox's docker CLI reaches the same engine.
    let inside = airlock(&["exec", "d1", "--", "docker", "images", "--format", "{{.Repository}}"]);
    assert!(stdout(&inside).contains("airlock-test/busybox"), "{}", show(&inside));

    // rm: the VM, the socket and the disk go. (Other tests' guests share
    // the cache: only this supervisor's QEMU counts.)
    let supervisor = super::microvm::supervisor_pid(&env, "d1");
    assert_eq!(super::microvm::qemus_of(supervisor).len(), 1, "d1's QEMU");
    let o = airlock(&["stop", "d1"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!env.state.join("d1/engine.img").exists(), "the engine's disk outlived its guest");
    let o = airlock(&["rm", "d1"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!Path::new(&socket).exists() && !env.state.join("d1").exists());
    let left = super::microvm::qemus_of(supervisor);
    assert!(left.is_empty(), "a QEMU is left: {left:?}");
}
