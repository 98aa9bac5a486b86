//! Two live sandboxes never share host ids. Blocks of 65536 host ids were
//! once picked by hashing the sandbox's name into 15,000 slots: names that
//! collided shared a host uid, and with it the kernel's per-uid accounting,
//! which a neighbour exhausted (descriptors in flight) to cut the other's
//! egress for good. Now blocks are allocated from one host-wide registry,
//! freed on removal, and running out is a clear error. And the agent's
//! egress listeners survive a hand-over the sandbox itself made fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use crate::suite::daemon_harness::TestDaemon;
use crate::suite::support::*;

const REGISTRY: &str = "/run/airlock/id-blocks";
const FIRST_BLOCK_UID: u64 = 1_000_000_000;
const BLOCK_SIZE: u64 = 65_536;

/// The block the old scheme derived from a name (FNV-1a into 15,000 slots).
fn old_hashed_block(name: &str) -> u64 {
    let hash =
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    hash % 15_000
}

/// Two names the old scheme put on the same block.
fn colliding_names(prefix: &str) -> (String, String) {
    let mut seen: BTreeMap<u64, String> = BTreeMap::new();
    for i in 0.. {
        let name = format!("{prefix}-{i}");
        if let Some(first) = seen.insert(old_hashed_block(&name), name.clone()) {
            return (first, name);
        }
    }
    unreachable!()
}

fn create(env: &Env, name: &str, extra: &[(&str, &str)]) -> Output {
    let mut cmd = env.airlock(["create", "--name", name, "--memory", "64M"]);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn meta(state: &Path, name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(state.join(name).join("meta.json")).unwrap()).unwrap()
}

/// (block, first host uid) a sandbox recorded.
fn recorded_block(state: &Path, name: &str) -> (u64, u64) {
    let m = meta(state, name);
    (m["id_block"].as_u64().unwrap_or_else(|| panic!("no id_block: {m}")), m["host_uid"].as_u64().unwrap())
}

/// The host uid root inside maps to, from the uid_map of the sandbox's
/// agent (the supervisor's child).
fn agent_host_uid(state: &Path, name: &str) -> u64 {
    let supervisor = meta(state, name)["supervisor_pid"].as_i64().unwrap() as i32;
    let agent = children_of(supervisor)
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default().starts_with(b"airlock-agent")
        })
        .unwrap_or_else(|| panic!("no agent under supervisor {supervisor} of {name}"));
    let map = std::fs::read_to_string(format!("/proc/{agent}/uid_map")).unwrap();
    parse_uid_map(&map)
}

/// The host id of inside uid 0 in a uid_map: `0 HOST 65536`.
fn parse_uid_map(map: &str) -> u64 {
    let fields: Vec<u64> = map.split_whitespace().map(|f| f.parse().unwrap()).collect();
    assert_eq!((fields.len(), fields[0], fields[2]), (3, 0, BLOCK_SIZE), "uid_map {map:?}");
    fields[1]
}

/// Registry entries (block → sandbox directory) naming a directory below
/// `state`.
fn registry_entries_below(state: &Path) -> BTreeMap<u64, String> {
    let needle = state.display().to_string();
    let Ok(entries) = std::fs::read_dir(REGISTRY) else { return BTreeMap::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let block = e.file_name().to_str()?.parse::<u64>().ok()?;
            let text = std::fs::read_to_string(e.path()).ok()?;
            let entry: serde_json::Value = serde_json::from_str(&text).ok()?;
            let dir = entry["sandbox"].as_str()?.to_string();
            dir.starts_with(&needle).then_some((block, dir))
        })
        .collect()
}

fn root_required() -> bool {
    require(is_root(), "root (host id blocks are mapped only as root)")
}

/// Names the old hash put on one block, created at once by the daemon (its
/// own state root) and directly (another state root), plus a one-shot
/// `airlock run` of the first name beside them: three live sandboxes on
/// three different blocks, as recorded and as the kernel maps them.
#[test]
fn names_that_collided_under_the_old_hash_get_different_blocks() {
    if !root_required() {
        return;
    }
    let (first, second) = colliding_names("ids");
    assert_eq!(old_hashed_block(&first), old_hashed_block(&second));

    let daemon = TestDaemon::start("ids");
    let body = serde_json::json!({ "name": first, "policy": "dev" }).to_string();
    let (status, answer) = daemon.request("POST", "/v1/sandboxes", Some(&body));
    assert_eq!(status, 201, "{answer}\n{}", daemon.log());
    let env = Env::new();
    let o = create(&env, &second, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    let (block_a, uid_a) = recorded_block(&daemon.env.state, &first);
    let (block_b, uid_b) = recorded_block(&env.state, &second);
    assert_ne!(block_a, block_b, "{first} and {second} share block {block_a}");
    for (block, uid) in [(block_a, uid_a), (block_b, uid_b)] {
        assert_eq!(uid, FIRST_BLOCK_UID + block * BLOCK_SIZE);
    }
    assert_eq!(agent_host_uid(&daemon.env.state, &first), uid_a);
    assert_eq!(agent_host_uid(&env.state, &second), uid_b);

    // The first name again, in a third sandbox run from the direct state
    // root while both are live: its map, read from inside.
    let o = env.run_sh(&first, &["--rm"], "cat /proc/self/uid_map");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let uid_c = parse_uid_map(&stdout(&o));
    assert!(uid_c != uid_a && uid_c != uid_b, "run got host uid {uid_c}, taken by a live sandbox");

    // Removal frees both blocks; the run's was freed by --rm.
    let (status, answer) = daemon.request("DELETE", &format!("/v1/sandboxes/{first}"), None);
    assert_eq!(status, 200, "{answer}");
    let o = env.airlock(["rm", &second]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(registry_entries_below(&env.state), BTreeMap::new());
    assert_eq!(registry_entries_below(&daemon.env.state), BTreeMap::new());
}

/// 100 long-lived sandboxes created at once all hold distinct blocks (among
/// their names, the old hash put several pairs together), the kernel maps
/// each to its own, and removing them frees every block.
#[test]
fn a_hundred_live_sandboxes_hold_distinct_blocks_and_free_them() {
    if !root_required() {
        return;
    }
    const WORKERS: usize = 10;
    const EACH: usize = 10;
    let env = Arc::new(Env::new());
    let names: Vec<String> = (0..WORKERS * EACH).map(|i| format!("hundred-{i}")).collect();
    let old_collisions =
        names.len() - names.iter().map(|n| old_hashed_block(n)).collect::<BTreeSet<_>>().len();

    let threads: Vec<_> = (0..WORKERS)
        .map(|w| {
            let env = env.clone();
            let mine: Vec<String> = names[w * EACH..(w + 1) * EACH].to_vec();
            std::thread::spawn(move || {
                mine.iter().map(|name| (name.clone(), create(&env, name, &[]))).collect::<Vec<_>>()
            })
        })
        .collect();
    for (name, o) in threads.into_iter().flat_map(|t| t.join().unwrap()) {
        assert_eq!(o.status.code(), Some(0), "{name}: {}", show(&o));
    }

    let mut blocks = BTreeMap::new();
    for name in &names {
        let (block, uid) = recorded_block(&env.state, name);
        assert_eq!(agent_host_uid(&env.state, name), uid, "{name}");
        if let Some(other) = blocks.insert(block, name.clone()) {
            panic!("{name} and {other} both hold block {block}");
        }
    }
    assert_eq!(blocks.len(), 100);
    let registered = registry_entries_below(&env.state);
    assert_eq!(registered.keys().collect::<Vec<_>>(), blocks.keys().collect::<Vec<_>>());
    eprintln!(
        "100 sandboxes on 100 blocks; the old hash would have put {old_collisions} of them on a taken one"
    );

    let o = env.airlock(["rm"]).args(&names).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(registry_entries_below(&env.state), BTreeMap::new(), "blocks still held after rm");
}

/// With the pool cut to two blocks (a test-only setting on the real
/// registry): a third sandbox is refused with an error that says what to
/// do; a stopped sandbox keeps its block; a removed one's block is taken
/// again; a block whose sandbox directory vanished is reclaimed by `gc`.
#[test]
fn running_out_is_a_clear_error_and_blocks_come_back() {
    if !root_required() {
        return;
    }
    const RANGE: &str = "14990-14991";
    let pool = [("AIRLOCK_TEST_ID_BLOCKS", RANGE)];
    let env = Env::new();
    // Entries left by an earlier run whose directories are gone are stale
    // (reclaimed by the first allocation); live holders would be a clash.
    for block in ["14990", "14991"] {
        let Ok(text) = std::fs::read_to_string(Path::new(REGISTRY).join(block)) else { continue };
        let entry: serde_json::Value = serde_json::from_str(&text).unwrap();
        let holder = entry["sandbox"].as_str().unwrap_or_default();
        assert!(
            !Path::new(holder).exists(),
            "block {block} is held by {holder}; this test needs {RANGE} free"
        );
    }

    for name in ["one", "two"] {
        let o = create(&env, name, &pool);
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    }
    assert_eq!((recorded_block(&env.state, "one").0, recorded_block(&env.state, "two").0), (14990, 14991));

    let refused = |what: &Output| {
        assert_eq!(what.status.code(), Some(125), "{}", show(what));
        let err = stderr(what);
        for needed in ["no host id block is free", "airlock rm", "airlock gc"] {
            assert!(err.contains(needed), "{needed:?} missing from the error:\n{err}");
        }
    };
    refused(&create(&env, "three", &pool));
    // The refused sandbox is listed, failed, holding no block.
    let o = env.airlock(["ls", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let three = list.as_array().unwrap().iter().find(|s| s["name"] == "three").expect("three is listed");
    assert_eq!(three["state"], "failed", "{three}");
    assert!(meta(&env.state, "three")["id_block"].is_null());
    let mut run = env.airlock(["run", "--rm", "--", "true"]);
    refused(&run.envs(pool).output().unwrap());

    // Stopped but kept: its files are owned by its block, which it keeps.
    let o = env.airlock(["stop", "two"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = env.airlock(["rm", "three"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    refused(&create(&env, "three", &pool));

    // Removed: its block is the next one given out.
    let o = env.airlock(["rm", "one", "three"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = create(&env, "three", &pool);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(recorded_block(&env.state, "three").0, 14990);

    // Its directory deleted behind airlock's back: gc reclaims the block.
    // Any allocation on the host reclaims stale entries too (tests running
    // meanwhile allocate from their own ranges), so gc may find it done.
    std::fs::remove_dir_all(env.sandbox_dir("two")).unwrap();
    let o = env.airlock(["gc", "--json"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        stdout(&o).contains("id block 14991") || !Path::new(REGISTRY).join("14991").exists(),
        "gc left the stale block 14991: {}",
        show(&o)
    );
    assert!(!Path::new(REGISTRY).join("14991").exists(), "block 14991 is still registered");
    let o = create(&env, "four", &pool);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(recorded_block(&env.state, "four").0, 14991);

    let o = env.airlock(["rm", "three", "four"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(registry_entries_below(&env.state), BTreeMap::new());
}

/// Inside the sandbox, code puts more descriptors in flight than its uid
/// may (ETOOMANYREFS for every further send by that uid, the agent's
/// hand-overs included): connections to the proxy ports fail meanwhile.
/// Once it lets go, both listeners serve again — they used to end at the
/// first failed hand-over, cutting the sandbox's egress for good.
#[test]
fn egress_listeners_survive_a_failed_hand_over() {
    if !require(Path::new("/usr/bin/python3").exists(), "python3 in /usr/bin (inside the sandbox)") {
        return;
    }
    let env = Env::new();
    std::fs::write(env.workspace.join("inflight.py"), INFLIGHT_PROBE).unwrap();
    let o = env.airlock(["run", "--rm", "--timeout", "2m", "--", "python3", "inflight.py"]).output().unwrap();
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let line =
        |tag: &str| out.lines().find(|l| l.starts_with(tag)).unwrap_or_else(|| panic!("no {tag}:\n{out}"));
    assert!(line("full ").ends_with(" errno 109"), "the in-flight limit was not reached:\n{out}");
    for port in ["http", "socks"] {
        assert!(line(&format!("during {port} ")).ends_with("no answer"), "{out}");
        assert!(line(&format!("after {port} ")).ends_with("proxy answered"), "{out}");
    }
}

/// Fills the uid's in-flight descriptor budget, tries both proxy ports,
/// lets go, tries again. "proxy answered": the connection reached the host
/// proxy (a 403 or a SOCKS method reply); "no answer": it did not.
const INFLIGHT_PROBE: &str = r#"
import array, os, socket

def probe(port):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if port == 3128:
            s.sendall(b"GET http://example.net/ HTTP/1.1\r\nHost: example.net\r\n\r\n")
            ok = lambda data: data.startswith(b"HTTP/1.1 403")
        else:
            s.sendall(b"\x05\x01\x00")
            ok = lambda data: data == b"\x05\x00"
        data = s.recv(12)
        s.close()
        return "proxy answered" if ok(data) else "no answer"
    except OSError:
        return "no answer"

ports = {"http": 3128, "socks": 1080}
a, b = socket.socketpair()
null = os.open("/dev/null", os.O_RDONLY)
fds = array.array("i", [null] * 250)
sent = 0
try:
    while True:
        a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        sent += 250
except OSError as e:
    print("full", sent, "errno", e.errno, flush=True)
for name, port in ports.items():
    print("during", name, probe(port), flush=True)
# More failed hand-overs in a row: each fails its connection only.
for _ in range(3):
    probe(3128)
a.close()
b.close()
for name, port in ports.items():
    print("after", name, probe(port), flush=True)
"#;
