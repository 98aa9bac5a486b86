//! The files API (`/v1/sandboxes/{name}/files…`) and the artifacts tar
//! stream, through a real daemon with curl.

use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::daemon_harness::TestDaemon;
use super::support::*;

/// (status, raw body) of a curl request; `upload` is sent as the body.
fn curl(d: &TestDaemon, method: &str, path: &str, upload: Option<&Path>) -> (u16, Vec<u8>) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-m", "120", "-X", method, "-w", "\n%{http_code}", "--unix-socket"]).arg(&d.socket);
    if let Some(file) = upload {
        cmd.args(["-H", "content-type: application/octet-stream", "--data-binary"])
            .arg(format!("@{}", file.display()));
    }
    let out = cmd.arg(format!("http://airlock{path}")).stdin(Stdio::null()).output().unwrap();
    let text = out.stdout;
    let split = text.iter().rposition(|b| *b == b'\n').unwrap_or(0);
    let code = String::from_utf8_lossy(&text[split..]).trim().parse().unwrap_or(0);
    (code, text[..split].to_vec())
}

fn as_json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

fn assert_error(status: u16, body: &[u8], want_status: u16, want_code: &str) {
    let v = as_json(body);
    assert_eq!((status, v["error"]["code"].as_str()), (want_status, Some(want_code)), "{v}");
}

/// The decoded stdout of an exec.
fn exec_stdout(d: &TestDaemon, name: &str, argv: &[&str]) -> Vec<u8> {
    let (status, body) =
        d.request("POST", &format!("/v1/sandboxes/{name}/exec"), Some(&json!({ "argv": argv }).to_string()));
    assert_eq!(status, 200, "{body}");
    let mut out = Vec::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap();
        if v["type"] == "stdout" {
            out.extend(STANDARD.decode(v["data"].as_str().unwrap()).unwrap());
        }
    }
    out
}

#[test]
fn daemon_files_write_read_list_stat() {
    let d = TestDaemon::start("files");
    let (status, created) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": "fs" })));
    assert_eq!(status, 201, "{created}");

    // Write binary content with PUT, read it back with GET and with cat.
    let content: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    let upload = d.env.dir.path().join("upload.bin");
    std::fs::write(&upload, &content).unwrap();
    let (status, body) = curl(&d, "PUT", "/v1/sandboxes/fs/files?path=/tmp/up.bin", Some(&upload));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(as_json(&body), json!({ "path": "/tmp/up.bin", "size": 200_000 }));
    let (status, read) = curl(&d, "GET", "/v1/sandboxes/fs/files?path=/tmp/up.bin", None);
    assert_eq!(status, 200);
    assert!(read == content, "GET returned {} bytes, not the 200000 written", read.len());
    let via_exec = exec_stdout(&d, "fs", &["sha256sum", "/tmp/up.bin"]);
    let host = Command::new("sha256sum").arg(&upload).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&via_exec).split_whitespace().next(),
        String::from_utf8_lossy(&host.stdout).split_whitespace().next(),
    );
    // The file is the sandbox's, not the host's.
    assert!(!Path::new("/tmp/up.bin").exists() || std::fs::read("/tmp/up.bin").unwrap() != content);

    // An empty file reads as an empty 200.
    let empty = d.env.dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let (status, _) = curl(&d, "PUT", "/v1/sandboxes/fs/files?path=/tmp/dir%20x/../empty", Some(&empty));
    assert_eq!(status, 404, "the directory /tmp/dir x does not exist");
    exec_stdout(&d, "fs", &["sh", "-c", "mkdir -p '/tmp/dir x' && ln -s ../up.bin '/tmp/dir x/link'"]);
    let (status, _) = curl(&d, "PUT", "/v1/sandboxes/fs/files?path=/tmp/dir%20x/empty", Some(&empty));
    assert_eq!(status, 200);
    let (status, read) = curl(&d, "GET", "/v1/sandboxes/fs/files?path=/tmp/dir%20x/empty", None);
    assert_eq!((status, read.len()), (200, 0));

    // A name that is not UTF-8.
    exec_stdout(&d, "fs", &["sh", "-c", "printf x > \"/tmp/dir x/$(printf 'bad\\377')\""]);

    let (status, list) = curl(&d, "GET", "/v1/sandboxes/fs/files/list?path=/tmp/dir%20x", None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&list));
    let list = as_json(&list);
    assert_eq!(list["path"], "/tmp/dir x");
    let entries = list["entries"].as_array().unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["bad\u{fffd}", "empty", "link"], "{list}");
    assert_eq!(entries[0]["name_b64"], "YmFk/w==", "{list}");
    assert_eq!((entries[0]["type"].as_str(), entries[0]["size"].as_u64()), (Some("file"), Some(1)));
    assert_eq!(entries[1]["type"], "file");
    assert!(entries[1].get("name_b64").is_none(), "{list}");
    assert_eq!(entries[2]["type"], "symlink");
    assert!(entries[1]["mtime"].as_str().unwrap().ends_with('Z'), "{list}");

    let (status, stat) = curl(&d, "GET", "/v1/sandboxes/fs/files/stat?path=/tmp/up.bin", None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&stat));
    let stat = as_json(&stat);
    assert_eq!(stat["name"], "up.bin");
    assert_eq!(stat["type"], "file");
    assert_eq!(stat["size"], 200_000);
    assert!(stat["mode"].as_u64().is_some_and(|m| m & 0o600 == 0o600), "{stat}");
    let (_, stat) = curl(&d, "GET", "/v1/sandboxes/fs/files/stat?path=/tmp/dir%20x/link", None);
    assert_eq!(as_json(&stat)["type"], "symlink");
    let (_, stat) = curl(&d, "GET", "/v1/sandboxes/fs/files/stat?path=/tmp", None);
    assert_eq!(as_json(&stat)["type"], "dir");
    // A symlink is not followed (the sandbox could point it anywhere in
    // its view, /dev/zero included): the read names what it found.
    let (status, body) = curl(&d, "GET", "/v1/sandboxes/fs/files?path=/tmp/dir%20x/link", None);
    assert_error(status, &body, 422, "wrong_file_type");
    assert!(String::from_utf8_lossy(&body).contains("symbolic link"), "{}", String::from_utf8_lossy(&body));

    // Missing files, wrong kinds, bad paths.
    for path in ["/files?path=/nope", "/files/stat?path=/nope/x", "/files/list?path=/nope"] {
        let (status, body) = curl(&d, "GET", &format!("/v1/sandboxes/fs{path}"), None);
        assert_error(status, &body, 404, "file_not_found");
    }
    let (status, body) = curl(&d, "GET", "/v1/sandboxes/fs/files?path=/tmp", None);
    assert_error(status, &body, 422, "wrong_file_type");
    let (status, body) = curl(&d, "GET", "/v1/sandboxes/fs/files/list?path=/tmp/up.bin", None);
    assert_error(status, &body, 422, "wrong_file_type");
    for query in ["", "?path=", "?path=tmp/x", "?path=/a%00b", "?path=/x&mode=1"] {
        let (status, body) = curl(&d, "GET", &format!("/v1/sandboxes/fs/files{query}"), None);
        assert_eq!(status, 400, "{query}: {}", String::from_utf8_lossy(&body));
    }
    let (status, body) = curl(&d, "GET", "/v1/sandboxes/absent/files?path=/etc/hostname", None);
    assert_error(status, &body, 404, "not_found");

    // Traversal resolves inside the sandbox: never the host's /etc/shadow.
    let host_first = std::fs::read_to_string("/etc/shadow")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .filter(|l| !l.is_empty());
    for path in ["/../../etc/shadow", "/tmp/../../../etc/shadow", "/etc/../etc/./shadow"] {
        let (status, body) =
            curl(&d, "GET", &format!("/v1/sandboxes/fs/files?path={}", path.replace('/', "%2F")), None);
        if status == 200 {
            let first = String::from_utf8_lossy(&body).lines().next().map(str::to_string);
            if let Some(host_first) = &host_first {
                assert_ne!(first.as_ref(), Some(host_first), "{path}: the host's /etc/shadow leaked");
            }
        } else {
            assert!([404, 422].contains(&status), "{path}: {status} {}", String::from_utf8_lossy(&body));
        }
    }
    // Writing the host's files is just as impossible.
    let marker = d.env.dir.path().join("host-marker");
    std::fs::write(&marker, b"host").unwrap();
    let (status, _) = curl(
        &d,
        "PUT",
        &format!("/v1/sandboxes/fs/files?path=/../..{}", marker.display()).replace(' ', "%20"),
        Some(&upload),
    );
    assert!(status != 200 || std::fs::read(&marker).unwrap() == b"host", "{status}");

    // A stopped sandbox has no files to offer.
    let (status, body) = d.request("POST", "/v1/sandboxes/fs/stop", None);
    assert_eq!(status, 200, "{body}");
    for (method, path) in [
        ("GET", "/files?path=/tmp/up.bin"),
        ("PUT", "/files?path=/tmp/up.bin"),
        ("GET", "/files/list?path=/tmp"),
        ("GET", "/files/stat?path=/tmp"),
    ] {
        let up = (method == "PUT").then_some(upload.as_path());
        let (status, body) = curl(&d, method, &format!("/v1/sandboxes/fs{path}"), up);
        assert_error(status, &body, 409, "not_running");
    }
    assert!(d.remove_all_and_settle(30).is_empty());
}

#[test]
fn daemon_files_artifacts_tar_of_a_ci_sandbox() {
    let d = TestDaemon::start("artifacts");
    let ws = d.env.workspace.display().to_string();
    let (status, created) =
        d.json("POST", "/v1/sandboxes", Some(json!({ "name": "ci1", "policy": "ci", "workspace": ws })));
    assert_eq!(status, 201, "{created}");

    let report = d.env.dir.path().join("report.xml");
    std::fs::write(&report, "<testsuite tests=\"1\"/>\n").unwrap();
    let (status, body) = curl(
        &d,
        "PUT",
        &format!("/v1/sandboxes/ci1/files?path={ws}/junit-report.xml").replace(' ', "%20"),
        Some(&report),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    exec_stdout(
        &d,
        "ci1",
        &["sh", "-c", &format!("mkdir -p {ws}/test-results/deep && echo ok > {ws}/test-results/deep/r.txt")],
    );
    // The workspace is an overlay: the host's copy is untouched.
    assert!(!d.env.workspace.join("junit-report.xml").exists());

    let (status, body) = d.request("POST", "/v1/sandboxes/ci1/stop", None);
    assert_eq!(status, 200, "{body}");

    let (status, tar) = curl(&d, "GET", "/v1/sandboxes/ci1/artifacts", None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&tar));
    assert_eq!(tar.len() % 512, 0);
    let tar_file = d.env.dir.path().join("artifacts.tar");
    std::fs::write(&tar_file, &tar).unwrap();
    let listed = Command::new("tar").arg("-tf").arg(&tar_file).output().unwrap();
    assert!(listed.status.success(), "{}", show(&listed));
    let names = stdout(&listed);
    assert!(names.lines().any(|l| l == "junit-report.xml"), "{names}");
    assert!(names.lines().any(|l| l == "test-results/deep/r.txt"), "{names}");
    let extracted = Command::new("tar").arg("-xOf").arg(&tar_file).arg("junit-report.xml").output().unwrap();
    assert_eq!(stdout(&extracted), "<testsuite tests=\"1\"/>\n", "{}", show(&extracted));

    let (status, body) = curl(&d, "GET", "/v1/sandboxes/nope/artifacts", None);
    assert_error(status, &body, 404, "not_found");
    assert!(d.remove_all_and_settle(30).is_empty());
}

/// A daemon whose socket the group `airlock-test` may reach, for the
/// tenancy test; removes what it created when dropped.
struct GroupDaemon {
    env: Env,
    socket: std::path::PathBuf,
    child: std::process::Child,
}

impl GroupDaemon {
    fn start(group: &str) -> GroupDaemon {
        let env = Env::new();
        let socket = env.dir.path().join("run/airlock.sock");
        let log = std::fs::File::create(env.dir.path().join("daemon.log")).unwrap();
        let child = env
            .airlock(["daemon", "--socket", &socket.display().to_string(), "--group", group])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = GroupDaemon { env, socket, child };
        assert!(
            wait_until(20, || d.curl_as(None, "GET", "/v1/health").0 == 200),
            "the daemon did not come up"
        );
        d
    }

    /// (status, body) of a request as `user` (None: as the test's user).
    fn curl_as(&self, user: Option<&str>, method: &str, path: &str) -> (u16, String) {
        let mut cmd = match user {
            Some(user) => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid", user, "--regid", user, "--init-groups", "--", "curl"]);
                c
            }
            None => Command::new("curl"),
        };
        cmd.args(["-sS", "-m", "60", "-X", method, "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&self.socket)
            .arg(format!("http://airlock{path}"));
        if method == "PUT" {
            cmd.args(["--data-binary", "x"]);
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for GroupDaemon {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.child.wait();
        let _ = self.env.airlock(["rm", "roots"]).output();
    }
}

#[test]
fn daemon_files_of_another_users_sandbox_are_not_found() {
    const TEST_USER: &str = "airlock-test";
    if !require(is_root(), "root (to run requests as another user)") {
        return;
    }
    let has_user = Command::new("id").arg(TEST_USER).output().is_ok_and(|o| o.status.success());
    if !require(has_user, "the user airlock-test (created by scripts/test.sh)") {
        return;
    }
    let d = GroupDaemon::start(TEST_USER);
    let create = Command::new("curl")
        .args(["-sS", "-m", "120", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&d.socket)
        .args(["-H", "content-type: application/json", "--data-binary", r#"{"name":"roots"}"#])
        .arg("http://airlock/v1/sandboxes")
        .output()
        .unwrap();
    assert!(stdout(&create).ends_with("\n201"), "{}", show(&create));
    let (status, _) = d.curl_as(None, "GET", "/v1/sandboxes/roots/files?path=/etc/hostname");
    assert_eq!(status, 200);
    for (method, path) in [
        ("GET", "/files?path=/etc/hostname"),
        ("PUT", "/files?path=/tmp/x"),
        ("GET", "/files/list?path=/"),
        ("GET", "/files/stat?path=/"),
        ("GET", "/artifacts"),
    ] {
        let (status, body) = d.curl_as(Some(TEST_USER), method, &format!("/v1/sandboxes/roots{path}"));
        assert_error(status, body.as_bytes(), 404, "not_found");
    }
    let (status, body) = d.curl_as(None, "DELETE", "/v1/sandboxes/roots");
    assert_eq!(status, 200, "{body}");
}

/// `PUT …/files` streams: a file larger than any in-memory limit arrives
/// whole, an existing file keeps its mode, and an upload that breaks off
/// leaves the old file as it was and no temporary file behind.
#[test]
fn daemon_files_write_streams_and_replaces_atomically() {
    use std::io::{Read, Write};
    let d = TestDaemon::start("files-big");
    let (status, created) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": "big" })));
    assert_eq!(status, 201, "{created}");

    // 96 MiB: more than the daemon ever held in memory for a write before.
    let upload = d.env.dir.path().join("big.bin");
    let mut file = std::fs::File::create(&upload).unwrap();
    let block: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    for _ in 0..96 {
        file.write_all(&block).unwrap();
    }
    drop(file);
    let (status, body) = curl(&d, "PUT", "/v1/sandboxes/big/files?path=/tmp/big.bin", Some(&upload));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(as_json(&body)["size"], 96 << 20);
    let sum = |argv: &[&str]| String::from_utf8(exec_stdout(&d, "big", argv)).unwrap();
    let host_sum = Command::new("sha256sum").arg(&upload).output().unwrap();
    let host_sum = String::from_utf8_lossy(&host_sum.stdout).split_whitespace().next().unwrap().to_owned();
    assert!(sum(&["sha256sum", "/tmp/big.bin"]).starts_with(&host_sum));

    // An executable keeps its mode when it is replaced.
    exec_stdout(&d, "big", &["sh", "-c", "printf old > /tmp/tool; chmod 755 /tmp/tool"]);
    let small = d.env.dir.path().join("new.txt");
    std::fs::write(&small, b"new").unwrap();
    let (status, _) = curl(&d, "PUT", "/v1/sandboxes/big/files?path=/tmp/tool", Some(&small));
    assert_eq!(status, 200);
    assert_eq!(sum(&["sh", "-c", "stat -c %a /tmp/tool; cat /tmp/tool"]), "755\nnew");

    // A body that breaks off halfway: the old content stays.
    let mut conn = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    write!(
        conn,
        "PUT /v1/sandboxes/big/files?path=/tmp/tool HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\npartial"
    )
    .unwrap();
    // Broken off while the upload is under way: its temporary file exists.
    let uploading = || sum(&["sh", "-c", "ls -a /tmp | grep -c airlock-write"]) == "1\n";
    assert!(wait_until(10, uploading), "the upload never started: {}", sum(&["ls", "-a", "/tmp"]));
    conn.shutdown(std::net::Shutdown::Both).unwrap();
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(
        wait_until(10, || sum(&["sh", "-c", "cat /tmp/tool; ls -a /tmp | grep -c airlock-write"])
            == "new0\n"),
        "{}",
        sum(&["sh", "-c", "cat /tmp/tool; ls -a /tmp"])
    );
    // Oversized by its declared length: refused before anything is written.
    let mut conn = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    write!(
        conn,
        "PUT /v1/sandboxes/big/files?path=/tmp/tool HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\nxx"
    )
    .unwrap();
    let mut answer = [0u8; 12];
    conn.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&answer));
    assert_eq!(sum(&["sh", "-c", "cat /tmp/tool; ls -a /tmp | grep -c airlock-write"]), "new0\n");
}

/// The routes beyond read and write — mkdir, remove, rename, watch, and a
/// listing to a depth — each done by the sandbox's agent, answered with
/// the documented codes.
#[test]
fn daemon_files_mkdir_remove_rename_watch_and_deep_listings() {
    use std::io::{BufRead, BufReader};
    let d = TestDaemon::start("files-ops");
    let (status, created) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": "ops" })));
    assert_eq!(status, 201, "{created}");
    let base = "/v1/sandboxes/ops/files";

    let (status, body) =
        curl(&d, "POST", &format!("{base}/mkdir?path=/tmp/m/n&parents=true&mode=0700"), None);
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    assert_eq!(as_json(&body), json!({ "path": "/tmp/m/n" }));
    let (status, body) = curl(&d, "POST", &format!("{base}/mkdir?path=/tmp/m/n"), None);
    assert_error(status, &body, 409, "file_exists");
    let (status, body) = curl(&d, "POST", &format!("{base}/mkdir?path=/tmp/none/x"), None);
    assert_error(status, &body, 404, "file_not_found");
    let (_, stat) = curl(&d, "GET", &format!("{base}/stat?path=/tmp/m/n"), None);
    assert_eq!(as_json(&stat)["mode"], 0o700);

    // A new file gets the mode asked for; a body without a length is refused.
    let small = d.env.dir.path().join("small.txt");
    std::fs::write(&small, b"12345").unwrap();
    let (status, _) = curl(&d, "PUT", &format!("{base}?path=/tmp/m/n/f&mode=0600"), Some(&small));
    assert_eq!(status, 200);
    let (_, stat) = curl(&d, "GET", &format!("{base}/stat?path=/tmp/m/n/f"), None);
    let stat = as_json(&stat);
    assert_eq!((stat["mode"].as_u64(), stat["uid"].as_u64()), (Some(0o600), Some(0)), "{stat}");
    let chunked = Command::new("curl")
        .args([
            "-sS",
            "-m",
            "60",
            "-X",
            "PUT",
            "-w",
            "\n%{http_code}",
            "-H",
            "transfer-encoding: chunked",
            "--data-binary",
            "@-",
            "--unix-socket",
        ])
        .arg(&d.socket)
        .arg(format!("http://airlock{base}?path=/tmp/chunked"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(stdout(&chunked).ends_with("\n411"), "{}", show(&chunked));

    // A deep listing, and a capped one.
    let (status, list) = curl(&d, "GET", &format!("{base}/list?path=/tmp/m&depth=3"), None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&list));
    let list = as_json(&list);
    let names: Vec<&str> =
        list["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!((names, &list["truncated"]), (vec!["n", "n/f"], &json!(false)), "{list}");
    let (_, list) = curl(&d, "GET", &format!("{base}/list?path=/tmp/m&depth=3&max_entries=1"), None);
    assert_eq!(as_json(&list)["truncated"], true);

    // Rename, refusing to replace on request.
    let (status, _) = curl(&d, "PUT", &format!("{base}?path=/tmp/m/g"), Some(&small));
    assert_eq!(status, 200);
    let (status, body) =
        curl(&d, "POST", &format!("{base}/rename?from=/tmp/m/g&to=/tmp/m/n/f&replace=false"), None);
    assert_error(status, &body, 409, "file_exists");
    let (status, body) = curl(&d, "POST", &format!("{base}/rename?from=/tmp/m/g&to=/tmp/m/h"), None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(as_json(&body), json!({ "path": "/tmp/m/g", "to": "/tmp/m/h" }));

    // Remove: a non-empty directory only recursively; a symlink itself.
    exec_stdout(
        &d,
        "ops",
        &["sh", "-c", "mkdir -p /tmp/keep && echo kept > /tmp/keep/x && ln -s /tmp/keep /tmp/m/link"],
    );
    let (status, body) = curl(&d, "DELETE", &format!("{base}?path=/tmp/m"), None);
    assert_error(status, &body, 409, "not_empty");
    let (status, body) = curl(&d, "DELETE", &format!("{base}?path=/tmp/m&recursive=true"), None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(exec_stdout(&d, "ops", &["cat", "/tmp/keep/x"]), b"kept\n", "the link's target is untouched");
    let (status, body) = curl(&d, "DELETE", &format!("{base}?path=/tmp/m"), None);
    assert_error(status, &body, 404, "file_not_found");
    let (status, body) = curl(&d, "DELETE", &format!("{base}?path=/&recursive=true"), None);
    assert_error(status, &body, 400, "invalid_path");

    // Watch: NDJSON, first `watching`, then what an exec does.
    let (status, body) = curl(&d, "GET", &format!("{base}/watch?path=/tmp/keep/x"), None);
    assert_error(status, &body, 422, "wrong_file_type");
    let mut watch = Command::new("curl")
        .args(["-sS", "-N", "-m", "60", "--unix-socket"])
        .arg(&d.socket)
        .arg(format!("http://airlock{base}/watch?path=/tmp/keep"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "watching", "{first}");
    exec_stdout(&d, "ops", &["sh", "-c", "echo y > /tmp/keep/new; rm /tmp/keep/x"]);
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        let done = v["event"] == "removed";
        seen.push(v);
        if done {
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(seen.contains(&json!({ "event": "created", "name": "new" })), "{seen:?}");
    assert!(seen.contains(&json!({ "event": "removed", "name": "x" })), "{seen:?}");
}
