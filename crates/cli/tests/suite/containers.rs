//! A container engine inside a microVM sandbox (`--containers`): the
//! host's `docker` CLI through the sandbox's socket runs containers in the
//! guest's own dockerd, from an image loaded from a tarball built here from
//! the host's static busybox and from one the engine pulls through the
//! sandbox's egress proxy from a real docker-registry in the test's network
//! (`suite::transparent`'s), while a registry the policy does not allow is
//! refused with the proxy's reason in the engine's error; a container's own
//! traffic on the engine's bridge gets airlock's DNS and the policy; a bind mount of
//! the workspace's path writes through the sandbox's copy-on-write layer
//! (`airlock diff`); the audit log has the engine's start and each
//! container created; a second sandbox's engine sees nothing of the
//! first's; a killed supervisor leaves nothing after `gc`, `rm` nothing at
//! all; the process tier and a policy that forbids it refuse
//! `--containers`. The daemon's create answers with the socket.
//!
//! Few guests (boots and dockerd's start cost tens of seconds of software
//! emulation), under the microVM tests' emulation policy and guest cache.
//! The host's own dockerd, if any, is neither started nor touched: every
//! `docker` command names a sandbox's socket, and the test checks the
//! host's engine's state and socket are as they were.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::egress::{event, is, net_log};
use super::image_registry::{Auth, Registry, make_ca_for};
use super::microvm::{qemus_of, supervisor_pid};
use super::support::*;
use super::transparent::{
    DENIED_HOST, DENIED_PORT, REGISTRY_HOST, TUNNEL_HOST, TestNet, run_with_hosts, start_servers,
};

/// A policy on the microVM tier under emulation, with room for dockerd.
const POLICY: &str = "extends = \"dev\"\n[isolation]\ntier = \"microvm\"\n\
    allow_weaker = [\"kvm\", \"cgroups\", \"disk-quota\", \"landlock\"]\n\
    [limits]\ntimeout = \"20m\"\ncpus = 1\nmemory = \"1G\"\ndisk = \"2G\"\n";

/// The test registry's port, on the test network's servers' address.
const REGISTRY_PORT: u16 = 5000;

/// [`POLICY`] allowing the test registry and plain HTTP to the test
/// network's web server (by name, and their documentation address with the
/// port, as the private-range guard wants), trusting the
/// test's CA upstream; the rule (pulls only: GET and HEAD below /v2/)
/// makes the proxy see each request, so the engine trusts the sandbox's
/// CA, which its guest's system bundle holds.
fn registry_policy(net: &TestNet, ca: &Path) -> String {
    format!(
        "{POLICY}[network]\nallow = [\"{REGISTRY_HOST}:{REGISTRY_PORT}\", \"{0}:{REGISTRY_PORT}\", \
         \"{TUNNEL_HOST}:80\", \"{0}:80\"]\n\
         extra_roots = [{ca:?}]\n[[network.rule]]\nhost = \"{REGISTRY_HOST}\"\n\
         methods = [\"GET\", \"HEAD\"]\npaths = [\"/v2/**\"]\n",
        net.server
    )
}

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
    for applet in ["sh", "echo", "true", "cat", "sleep", "wget", "nslookup"] {
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

/// Waits until the engine behind `socket` answers.
fn await_engine(socket: &str) {
    let started = Instant::now();
    loop {
        let o = docker(socket, &["version", "--format", "{{.Server.Version}}"]);
        if o.status.success() {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "the engine did not answer\n{}", show(&o));
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// What a `docker ps -a` / `docker images` through `socket` lists, one
/// name a line.
fn engine_holds(socket: &str) -> String {
    let names = docker(socket, &["ps", "-a", "--format", "{{.Names}}"]);
    let images = docker(socket, &["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(names.status.success() && images.status.success(), "{}\n{}", show(&names), show(&images));
    format!("{}{}", stdout(&names), stdout(&images))
}

/// Whether and when the host's own engine's state and socket last
/// changed: the test must leave them as they were.
fn host_engine_traces() -> Vec<(String, Option<std::time::SystemTime>)> {
    ["/var/lib/docker", "/run/docker.sock", "/var/run/docker.sock"]
        .into_iter()
        .map(|p| (p.to_owned(), std::fs::symlink_metadata(p).and_then(|m| m.modified()).ok()))
        .collect()
}

/// The host's dockerd processes (the guests' run in their own kernels).
fn host_dockerds() -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "dockerd"))
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    pids.sort_unstable();
    pids
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
        || !super::image_registry::tools_or_skip()
    {
        return;
    }
    let Some(net) = TestNet::new() else { return };
    let env = Env::new();
    let archive = env.dir.path().join("busybox.tar");
    if !require(busybox_archive(&archive, "airlock-test/busybox:v1"), "/bin/busybox (busybox-static)") {
        return;
    }
    let servers = start_servers(&net);
    let host_engine = host_engine_traces();
    let dockerds_before = host_dockerds();

    // A real registry in the test network, under a name the proxy resolves
    // (the supervisor's /etc/hosts), holding a busybox pushed from here.
    let work = env.dir.path().to_path_buf();
    let tls = make_ca_for(&work, &[REGISTRY_HOST], &[net.server.into()]);
    let registry = Registry::start_at(
        &work,
        "registry",
        Some(&tls),
        Auth::Anonymous,
        net.command("/usr/bin/docker-registry"),
        (net.server, REGISTRY_PORT).into(),
    );
    registry.push_from(&format!("docker-archive:{}", archive.display()), Some(&tls), false, &work);

    let policy = env.dir.path().join("containers.toml");
    std::fs::write(&policy, registry_policy(&net, &tls.ca)).unwrap();
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
    await_engine(&socket);
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

    // Limits: the engine and every container run inside the guest's
    // workload cgroup, under the policy's pids and memory limits there.
    let o = docker(&socket, &["run", "-d", "--name", "held", "airlock-test/busybox:v1", "sleep", "600"]);
    assert!(o.status.success(), "{}", show(&o));
    let o = airlock(&[
        "exec",
        "d1",
        "--",
        "sh",
        "-c",
        "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = dockerd ] && echo \"engine $(cat $p/cgroup)\"; done; \
         echo \"container $(cat /proc/$(docker inspect -f '{{.State.Pid}}' held)/cgroup)\"; \
         echo \"pids $(cat /sys/fs/cgroup/workload/pids.max)\"; echo \"memory $(cat /sys/fs/cgroup/workload/memory.max)\"",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = stdout(&o);
    let line = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} line\n{}", show(&o)))
            .to_owned()
    };
    assert_eq!(line("engine"), "0::/workload/engine", "{}", show(&o));
    assert!(line("container").starts_with("0::/workload/containers/"), "{}", show(&o));
    for limit in ["pids", "memory"] {
        let value = line(limit);
        assert!(
            value != "max" && value.parse::<u64>().is_ok_and(|v| v > 0),
            "{limit}.max {value}\n{}",
            show(&o)
        );
    }
    let o = docker(&socket, &["rm", "-f", "held"]);
    assert!(o.status.success(), "{}", show(&o));

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

    // The engine is the guest's own: the sandbox's docker CLI reaches the
    // same engine.
    let inside = airlock(&["exec", "d1", "--", "docker", "images", "--format", "{{.Repository}}"]);
    assert!(stdout(&inside).contains("airlock-test/busybox"), "{}", show(&inside));

    // A second sandbox, whose supervisor (and so its egress proxy)
    // resolves the registry's name through the test's /etc/hosts, in a
    // mount namespace of its own (where `airlock diff` could not see its
    // layer: the workspace checks are d1's). Its engine sees nothing of
    // d1's, nor d1's of it.
    let o = docker(&socket, &["create", "--name", "made-in-d1", "airlock-test/busybox:v1", "true"]);
    assert!(o.status.success(), "{}", show(&o));
    let o = run_with_hosts(
        &env,
        &net,
        &["create", "--name", "d2", "--policy", policy.to_str().unwrap(), "--containers"],
        &[("AIRLOCK_VM_CACHE", cache.to_str().unwrap())],
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let socket2 = env.state.join("d2/containers.sock").to_str().unwrap().to_owned();
    await_engine(&socket2);
    let held = engine_holds(&socket2);
    for of_d1 in ["made-in-d1", "airlock-test/busybox"] {
        assert!(!held.contains(of_d1), "d2's engine sees d1's {of_d1}:\n{held}");
    }

    // A pull from the allowed registry goes through the sandbox's proxy
    // (each request in the net log), and its image runs.
    let image = format!("{REGISTRY_HOST}:{REGISTRY_PORT}/team/bb:1");
    let o = docker(&socket2, &["pull", &image]);
    assert!(o.status.success(), "{}", show(&o));
    let o = docker(&socket2, &["run", "--rm", &image, "echo", "pulled"]);
    assert_eq!(stdout(&o), "pulled\n", "{}", show(&o));
    // A registry the policy does not allow: the engine's error carries
    // the proxy's reason.
    let denied = format!("{DENIED_HOST}:{REGISTRY_PORT}/team/bb:1");
    let o = docker(&socket2, &["pull", &denied]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    let reason = format!("no allow entry matches {DENIED_HOST}:{REGISTRY_PORT}");
    assert!(stderr(&o).contains(&reason), "the proxy's reason is not in the engine's error\n{}", show(&o));
    let log = net_log(&env, "d2");
    let manifest = event(&log, "the pulled manifest", |e| {
        is(e, "host", REGISTRY_HOST)
            && is(e, "port", REGISTRY_PORT)
            && is(e, "path", "/v2/team/bb/manifests/1")
            && is(e, "allowed", true)
    });
    assert!(is(manifest, "handling", "intercepted"), "{manifest}");
    event(&log, "a pulled layer", |e| {
        is(e, "host", REGISTRY_HOST)
            && e["path"].as_str().is_some_and(|p| p.starts_with("/v2/team/bb/blobs/sha256:"))
            && is(e, "allowed", true)
    });
    let refused = event(&log, "the refused registry", |e| {
        is(e, "host", DENIED_HOST) && is(e, "port", REGISTRY_PORT) && is(e, "allowed", false)
    });
    assert!(refused["rule"].as_str().is_some_and(|r| r.contains(&reason)), "{refused}");

    // A container's own traffic, on the engine's default bridge, goes
    // through the policy and shows in the net log: its DNS is airlock's
    // (an allowed name resolves into airlock's pool, a denied one does
    // not), plain HTTP to an allowed address and port reaches the server,
    // a port the policy does not allow is refused. (The static busybox
    // resolves nothing itself: without NSS modules its wget takes addresses.)
    let server_text = net.server.to_string();
    let script = format!(
        "nslookup {TUNNEL_HOST}; echo \"lookup=$?\"; nslookup {DENIED_HOST}; echo \"denied=$?\"; \
         wget -q -O - http://{server_text}/from-a-container; echo \"allowed=$?\"; \
         wget -q -O - http://{server_text}:{DENIED_PORT}/; echo \"refused=$?\""
    );
    let o = docker(&socket2, &["run", "--rm", &image, "sh", "-c", &script]);
    let out = stdout(&o);
    assert!(out.contains("198.18.") && out.contains("lookup=0"), "{}", show(&o));
    assert!(out.contains("denied=1"), "{}", show(&o));
    assert!(out.contains("GET /from-a-container HTTP/1.1") && out.contains("allowed=0"), "{}", show(&o));
    assert!(out.contains("refused=1"), "{}", show(&o));
    assert!(
        servers.http.seen().iter().any(|r| r.starts_with("GET /from-a-container")),
        "{:?}",
        servers.http.seen()
    );
    let log = net_log(&env, "d2");
    event(&log, "the container's lookup", |e| {
        is(e, "via", "dns") && is(e, "host", TUNNEL_HOST) && is(e, "allowed", true)
    });
    event(&log, "the container's denied lookup", |e| {
        is(e, "via", "dns") && is(e, "host", DENIED_HOST) && is(e, "allowed", false)
    });
    event(&log, "the container's request", |e| {
        is(e, "via", "transparent")
            && is(e, "host", server_text.as_str())
            && is(e, "port", 80)
            && is(e, "allowed", true)
    });
    let refused = event(&log, "the container's refused port", |e| {
        is(e, "via", "transparent") && is(e, "host", server_text.as_str()) && is(e, "port", DENIED_PORT)
    });
    assert!(is(refused, "allowed", false), "{refused}");

    let o = docker(&socket2, &["create", "--name", "made-in-d2", &image, "true"]);
    assert!(o.status.success(), "{}", show(&o));
    let held = engine_holds(&socket);
    assert!(held.contains("made-in-d1"), "{held}");
    for of_d2 in ["made-in-d2", REGISTRY_HOST] {
        assert!(!held.contains(of_d2), "d1's engine sees d2's {of_d2}:\n{held}");
    }

    // d2's supervisor SIGKILLed: its QEMU dies with it; gc leaves no
    // engine disk and no socket.
    let supervisor = supervisor_pid(&env, "d2");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(supervisor as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    assert!(
        wait_until(30, || qemus_of(supervisor).is_empty()),
        "QEMU outlived its supervisor: {:?}",
        qemus_of(supervisor)
    );
    let gc = airlock(&["gc"]);
    assert!(gc.status.success() && stdout(&gc).contains("d2"), "{}", show(&gc));
    for left in ["engine.img", "containers.sock"] {
        assert!(!env.state.join("d2").join(left).exists(), "gc left d2's {left}\n{}", show(&gc));
    }
    let o = airlock(&["rm", "d2"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    // rm: the VM, the socket and the disk go. (Other tests' guests share
    // the cache: only d1's supervisor's QEMU counts.)
    let d1_supervisor = supervisor_pid(&env, "d1");
    assert_eq!(qemus_of(d1_supervisor).len(), 1, "d1's QEMU");
    let o = airlock(&["stop", "d1"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!env.state.join("d1/engine.img").exists(), "the engine's disk outlived its guest");
    let o = airlock(&["rm", "d1"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!Path::new(&socket).exists() && !env.state.join("d1").exists());
    let left = qemus_of(d1_supervisor);
    assert!(left.is_empty(), "a QEMU is left: {left:?}");

    // The host's own engine: not started, its state and socket unchanged.
    assert_eq!(host_dockerds(), dockerds_before, "a dockerd started or ended on the host");
    assert_eq!(host_engine_traces(), host_engine, "the host's engine's state or socket changed");
    drop(registry);
}

/// The daemon's create with `"containers": true` answers with the socket
/// of the sandbox's own engine, its caller's alone (0600, the caller's
/// uid), and the engine answers the caller through it. The caller is root:
/// without working KVM (here) only a policy file allows emulation, and only
/// root may name one.
#[test]
fn the_daemons_create_answers_with_the_socket_of_the_sandboxs_own_engine() {
    let docker_cli = Command::new("docker").arg("--version").output().is_ok_and(|o| o.status.success());
    if !super::egress::tier_ready(super::egress::Tier::Microvm)
        || !require(Path::new("/usr/sbin/dockerd").exists(), "Debian's docker.io (dockerd) on the host")
        || !require(docker_cli, "a docker CLI on the host")
    {
        return;
    }
    let d = super::daemon_harness::TestDaemon::start_with("containers", |cmd| {
        cmd.env("AIRLOCK_VM_CACHE", super::microvm::shared_cache());
    });
    // The process tier refuses, saying why.
    let (status, refused) =
        d.json("POST", "/v1/sandboxes", Some(serde_json::json!({ "name": "dp", "containers": true })));
    assert_eq!((status, refused["error"]["code"].as_str()), (400, Some("invalid_policy")), "{refused}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("nested containers need their own kernel"), "{refused}");

    let policy = d.env.dir.path().join("containers.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let (status, created) = d.json(
        "POST",
        "/v1/sandboxes",
        Some(serde_json::json!({
            "name": "dd", "policy": policy, "tier": "microvm", "containers": true,
        })),
    );
    assert_eq!(status, 201, "{created}\n{}", d.log());
    let socket = created["containers"]["socket"].as_str().unwrap_or_else(|| panic!("{created}")).to_owned();
    assert_eq!(Path::new(&socket), d.env.state.join("dd/containers.sock"));
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&socket).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "the socket is its owner's alone");
        assert_eq!(meta.uid(), rustix::process::geteuid().as_raw(), "the caller owns the socket");
    }
    await_engine(&socket);
    let (_, inspected) = d.json("GET", "/v1/sandboxes/dd", None);
    assert_eq!(inspected["containers"]["socket"], socket.as_str(), "{inspected}");
    let (status, removed) = d.json("DELETE", "/v1/sandboxes/dd", None);
    assert_eq!(status, 200, "{removed}");
    assert!(!Path::new(&socket).exists() && !d.env.sandbox_dir("dd").exists());
}
