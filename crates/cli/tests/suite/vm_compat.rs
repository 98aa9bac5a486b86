//! The daemon's sandboxd compatibility routes (`POST /vm`) on the microVM
//! tier: a request or a policy that asks for it gets a guest with its own
//! kernel, as `POST /v1/sandboxes` does. Under software emulation here (see
//! microvm.rs), which the test's policy allows.

use serde_json::json;

use super::daemon_harness::TestDaemon;
use super::microvm::{ready, shared_cache};

/// The kernel release an exec in sandbox `name` reports.
fn uname_in(d: &TestDaemon, name: &str) -> String {
    let (status, body) =
        d.request("POST", &format!("/v1/sandboxes/{name}/exec"), Some(r#"{"argv":["uname","-r"]}"#));
    assert_eq!(status, 200, "{body}");
    let lines: Vec<serde_json::Value> =
        body.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.last().unwrap()["code"], 0, "{body}");
    let out: Vec<u8> = lines
        .iter()
        .filter(|l| l["type"] == "stdout")
        .flat_map(|l| {
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, l["data"].as_str().unwrap())
                .unwrap()
        })
        .collect();
    String::from_utf8(out).unwrap().trim().to_owned()
}

#[test]
fn post_vm_makes_a_microvm_when_the_request_or_the_policy_asks_for_one() {
    if !ready() {
        return;
    }
    let d = TestDaemon::start_with("vmcompat", |cmd| {
        cmd.env("AIRLOCK_VM_CACHE", shared_cache());
    });
    let workspace = d.env.dir.path().join("agent-ws");
    std::fs::create_dir_all(&workspace).unwrap();
    let ws = workspace.to_str().unwrap();
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim().to_owned();

    // The policy asks: its tier is microvm (emulation allowed: no KVM here
    // runs an ordinary guest). One vCPU keeps the emulated boot short.
    let policy = d.env.dir.path().join("vm.toml");
    std::fs::write(
        &policy,
        "extends = \"dev\"\n[isolation]\ntier = \"microvm\"\nallow_weaker = [\"kvm\"]\n\
         [limits]\ncpus = 1\nmemory = \"512M\"\n",
    )
    .unwrap();
    let policy = policy.to_str().unwrap();
    let (status, created) =
        d.json("POST", "/vm", Some(json!({ "agent_name": "coder", "workspace_dir": ws, "policy": policy })));
    assert_eq!(status, 201, "{created}\n{}", d.log());
    let name = created["vm_name"].as_str().unwrap().to_owned();
    assert_eq!(created["agent_name"], "coder", "{created}");
    let (_, inspected) = d.json("GET", &format!("/v1/sandboxes/{name}"), None);
    assert_eq!(inspected["tier"], "microvm", "{inspected}");
    assert_eq!(inspected["labels"]["agent_name"], "coder", "{inspected}");
    let guest_release = uname_in(&d, &name);
    assert!(!guest_release.is_empty() && guest_release != host_release, "guest {guest_release:?}");
    let (status, removed) = d.json("DELETE", &format!("/vm/{name}"), None);
    assert_eq!((status, removed["removed"].as_bool()), (200, Some(true)), "{removed}");
    assert!(!d.env.sandbox_dir(&name).exists());

    // The request asks: `tier` on the policy dev. Where KVM cannot run an
    // ordinary guest, dev (which does not allow emulation) is refused with
    // the microVM tier's own reason; where it can, the VM runs.
    let (status, answer) =
        d.json("POST", "/vm", Some(json!({ "agent_name": "kvm", "workspace_dir": ws, "tier": "microvm" })));
    let doctor =
        d.env.airlock(["doctor", "--json"]).env("AIRLOCK_VM_CACHE", shared_cache()).output().unwrap();
    let doctor: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let kvm_works = doctor["microvm"]["engine"]["kvm"]["state"] == "usable";
    if status == 201 {
        let name = answer["vm_name"].as_str().unwrap();
        assert!(kvm_works, "dev ran a microVM without working KVM: {answer}");
        assert_eq!(d.json("GET", &format!("/v1/sandboxes/{name}"), None).1["tier"], "microvm");
        assert_eq!(d.json("DELETE", &format!("/vm/{name}"), None).0, 200);
    } else {
        assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("host_unsupported")), "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains("microvm tier"), "{answer}");
    }

    // Both at once: the request's tier on a policy that allows emulation.
    let emulated = d.env.dir.path().join("emulated.toml");
    std::fs::write(
        &emulated,
        "extends = \"dev\"\n[isolation]\nallow_weaker = [\"kvm\"]\n[limits]\ncpus = 1\nmemory = \"512M\"\n",
    )
    .unwrap();
    let body = json!({ "agent_name": "both", "workspace_dir": ws, "policy": emulated, "tier": "microvm" });
    let (status, created) = d.json("POST", "/vm", Some(body));
    assert_eq!(status, 201, "{created}\n{}", d.log());
    let name = created["vm_name"].as_str().unwrap().to_owned();
    assert_eq!(d.json("GET", &format!("/v1/sandboxes/{name}"), None).1["tier"], "microvm");
    assert_ne!(uname_in(&d, &name), host_release);
    assert_eq!(d.json("DELETE", &format!("/vm/{name}"), None).0, 200);

    // Asking for nothing keeps the frozen default: policy dev, process tier.
    let (status, created) =
        d.json("POST", "/vm", Some(json!({ "agent_name": "plain", "workspace_dir": ws })));
    assert_eq!(status, 201, "{created}");
    let name = created["vm_name"].as_str().unwrap().to_owned();
    let (_, inspected) = d.json("GET", &format!("/v1/sandboxes/{name}"), None);
    assert_eq!((inspected["tier"].as_str(), inspected["policy"].as_str()), (Some("process"), Some("dev")));
    assert_eq!(uname_in(&d, &name), host_release);
    assert_eq!(d.json("DELETE", &format!("/vm/{name}"), None).0, 200);

    // A tier that is not one is refused before anything starts.
    let (status, bad) =
        d.json("POST", "/vm", Some(json!({ "agent_name": "x", "workspace_dir": ws, "tier": "vm" })));
    assert_eq!((status, bad["error"]["code"].as_str()), (400, Some("invalid_request")), "{bad}");
}
