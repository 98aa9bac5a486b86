//! `airlock daemon` at scale: 100 sandboxes created and destroyed
//! concurrently through the API, and nothing left behind afterwards — no
//! supervisor or agent processes, no mounts below the state directory, no
//! cgroups below the test's cgroup parent, no state directories.

use std::sync::{Arc, Barrier};
use std::time::Instant;

use serde_json::json;

use super::daemon_harness::TestDaemon;
use super::support::*;

/// Runs `f(worker, index)` for `workers` × `each` jobs, the workers
/// starting together; the results in worker order.
fn fan_out<T: Send + 'static>(
    workers: usize,
    each: usize,
    f: impl Fn(usize, usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(workers));
    let threads: Vec<_> = (0..workers)
        .map(|w| {
            let (f, barrier) = (f.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                (0..each).map(|i| f(w, i)).collect::<Vec<T>>()
            })
        })
        .collect();
    threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
}

#[test]
fn daemon_creates_and_destroys_100_sandboxes_concurrently_leaving_nothing() {
    const WORKERS: usize = 10;
    const EACH: usize = 10;
    let d = Arc::new(TestDaemon::start("scale"));
    let started = Instant::now();

    let creator = d.clone();
    let created = fan_out(WORKERS, EACH, move |w, i| {
        let name = format!("scale-{w}-{i}");
        let body = json!({ "name": name, "policy": "dev", "labels": { "suite": "scale" } }).to_string();
        let (status, answer) = creator.request("POST", "/v1/sandboxes", Some(&body));
        (name, status, answer)
    });
    let create_time = started.elapsed();
    let failed: Vec<_> = created.iter().filter(|(_, status, _)| *status != 201).collect();
    assert!(failed.is_empty(), "{} of 100 creates failed, e.g. {:?}\n{}", failed.len(), failed[0], d.log());

    // All 100 exist at once, are running, and answer an exec.
    let (status, list) = d.json("GET", "/v1/sandboxes?label=suite=scale&state=running", None);
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), WORKERS * EACH, "{list}");
    for name in ["scale-0-0", "scale-9-9"] {
        let (status, body) =
            d.request("POST", &format!("/v1/sandboxes/{name}/exec"), Some(r#"{"argv":["true"]}"#));
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(r#""type":"exit""#) && body.contains(r#""code":0"#), "{body}");
    }

    // The leftover check sees live sandboxes (so its silence later means
    // something): their supervisors and agents, cgroups and directories.
    let live = d.leftovers();
    for kind in ["process", "cgroup", "state directory"] {
        let n = live.iter().filter(|l| l.starts_with(kind)).count();
        assert!(n >= WORKERS * EACH, "only {n} {kind} entries for 100 live sandboxes:\n{}", live.join("\n"));
    }

    let removing = Instant::now();
    let remover = d.clone();
    let removed = fan_out(WORKERS, EACH, move |w, i| {
        let name = format!("scale-{w}-{i}");
        let (status, answer) = remover.request("DELETE", &format!("/v1/sandboxes/{name}"), None);
        (name, status, answer)
    });
    let remove_time = removing.elapsed();
    let failed: Vec<_> = removed.iter().filter(|(_, status, _)| *status != 200).collect();
    assert!(failed.is_empty(), "{} of 100 removals failed, e.g. {:?}\n{}", failed.len(), failed[0], d.log());

    assert!(d.sandbox_names().is_empty(), "sandboxes still listed: {:?}", d.sandbox_names());
    let mut left = Vec::new();
    let clean = wait_until(20, || {
        left = d.leftovers();
        left.is_empty()
    });
    assert!(clean, "left behind after removing 100 sandboxes:\n{}", left.join("\n"));
    let (status, health) = d.json("GET", "/v1/health", None);
    assert_eq!((status, &health["status"]), (200, &json!("ok")), "{health}");
    eprintln!(
        "100 sandboxes: created in {:.1}s ({:.0}/s), removed in {:.1}s, whole test {:.1}s",
        create_time.as_secs_f64(),
        100.0 / create_time.as_secs_f64(),
        remove_time.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
}
