//! `airlock daemon --listen`: the API over TLS on TCP, where bearer tokens
//! (stored hashed) name the tenant. Driven with curl against a certificate
//! made for 127.0.0.1 by rcgen; each test starts its own daemon.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use super::daemon_harness::TestDaemon;
use super::support::*;

const TEST_USER: &str = "airlock-test";

/// A [`TestDaemon`] that also listens on TLS, with tokens for tenants.
struct TcpDaemon {
    daemon: TestDaemon,
    port: u16,
    cert: PathBuf,
}

impl std::ops::Deref for TcpDaemon {
    type Target = TestDaemon;

    fn deref(&self) -> &TestDaemon {
        &self.daemon
    }
}

/// What one curl request saw: status (0 when the request failed outright),
/// response headers (lowercased) and body.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl TcpDaemon {
    /// Starts a daemon with a Unix socket and a TLS listener whose tokens
    /// file maps each `(uid, token)`.
    fn start(tenants: &[(u32, &str)]) -> TcpDaemon {
        let port = free_port();
        let mut cert = PathBuf::new();
        let daemon = TestDaemon::start_prepared(&format!("tcp-{port}"), |env| {
            let (cert_path, key) = write_cert(env.dir.path());
            let tokens = write_tokens(env.dir.path(), tenants);
            cert = cert_path.clone();
            let path = |p: &Path| p.display().to_string();
            vec![
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--tls-cert".into(),
                path(&cert_path),
                "--tls-key".into(),
                path(&key),
                "--tokens".into(),
                path(&tokens),
            ]
        });
        let d = TcpDaemon { daemon, port, cert };
        let up = wait_until(20, || d.request(Some(tenants[0].1), "GET", "/v1/health", None).status == 200);
        assert!(up, "the TLS listener did not come up on port {port}: {}", d.log());
        d
    }

    /// Sends the daemon SIGHUP (re-read the tokens file).
    fn hangup(&self) {
        let pid = self.pid().and_then(rustix::process::Pid::from_raw).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    }

    fn request(&self, token: Option<&str>, method: &str, path: &str, body: Option<&str>) -> Answer {
        let url = format!("https://127.0.0.1:{}{path}", self.port);
        self.curl(token, method, &url, body)
    }

    fn curl(&self, token: Option<&str>, method: &str, url: &str, body: Option<&str>) -> Answer {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-m", "60", "--cacert"]).arg(&self.cert).args([
            "-D",
            "-",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ]);
        if let Some(token) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        if let Some(body) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary", body]);
        }
        let out = cmd.arg(url).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (rest, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let status = code.trim().parse().unwrap_or(0);
        let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or(("", rest));
        Answer { status, headers: headers.to_ascii_lowercase(), body: body.to_string() }
    }

    fn json(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        let answer = self.request(Some(token), method, path, body.as_deref());
        let value = serde_json::from_str(&answer.body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", answer.body));
        (answer.status, value)
    }
}

/// A self-signed certificate for 127.0.0.1 and its key (mode 0600).
fn write_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (cert, key)
}

/// The tokens file, with digests made the documented way
/// (`printf %s TOKEN | sha256sum`), mode 0600.
fn write_tokens(dir: &Path, tenants: &[(u32, &str)]) -> PathBuf {
    let mut text = String::from("# uid sha256 comment\n");
    for (uid, token) in tenants {
        let out =
            Command::new("sh").args(["-c", "printf %s \"$1\" | sha256sum", "sh", token]).output().unwrap();
        assert!(out.status.success(), "{}", show(&out));
        let digest = stdout(&out).split_whitespace().next().unwrap().to_string();
        text.push_str(&format!("{uid} {digest} tenant {uid}\n"));
    }
    let path = dir.join("tokens");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn my_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn assert_unauthorized(answer: &Answer) {
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert!(answer.headers.contains("www-authenticate: bearer"), "{}", answer.headers);
    let v: Value = serde_json::from_str(&answer.body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {}", answer.body));
    assert_eq!(v["error"]["code"], "unauthorized", "{}", answer.body);
}

#[test]
fn daemon_tcp_needs_tls_and_a_bearer_token() {
    let token = "good-token-3f1c9a";
    let d = TcpDaemon::start(&[(my_uid(), token)]);
    let ok = d.request(Some(token), "GET", "/v1/health", None);
    assert_eq!(ok.status, 200, "{}", ok.body);
    let v: Value = serde_json::from_str(&ok.body).unwrap();
    assert_eq!(v["status"], "ok");

    assert_unauthorized(&d.request(None, "GET", "/v1/health", None));
    assert_unauthorized(&d.request(Some("wrong-token"), "GET", "/v1/sandboxes", None));
    assert_unauthorized(&d.request(Some(&format!("{token}x")), "GET", "/v1/sandboxes", None));

    // Plain HTTP to the TLS port gets no HTTP answer at all.
    let plain = d.curl(Some(token), "GET", &format!("http://127.0.0.1:{}/v1/health", d.port), None);
    assert_eq!(plain.status, 0, "plain HTTP was answered: {} {}", plain.headers, plain.body);

    // The Unix socket still serves as before.
    let out = Command::new("curl")
        .args(["-sS", "-m", "30", "--unix-socket"])
        .arg(&d.socket)
        .args(["-o", "/dev/null", "-w", "%{http_code}", "http://airlock/v1/health"])
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "200", "{}", show(&out));

    // Denials are logged, and no token ever is.
    let log = d.log();
    assert!(log.contains("denied"), "{log}");
    assert!(!log.contains(token) && !log.contains("wrong-token"), "a token reached the log: {log}");
}

#[test]
fn daemon_tcp_refuses_to_start_without_tls_or_with_open_tokens() {
    let env = Env::new();
    let (cert, key) = write_cert(env.dir.path());
    let tokens = write_tokens(env.dir.path(), &[(my_uid(), "t")]);
    let socket = env.dir.path().join("run/airlock.sock");
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = |extra: &[&Path]| {
        let mut cmd = env.airlock(["daemon", "--socket"]);
        cmd.arg(&socket).args(["--listen", &listen]);
        for (flag, value) in ["--tls-cert", "--tls-key", "--tokens"].iter().zip(extra) {
            cmd.arg(flag).arg(value);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output().unwrap()
    };

    // No certificate or no tokens: refused before anything listens.
    let out = daemon(&[]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(stderr(&out).contains("--tls-cert"), "{}", show(&out));
    let out = daemon(&[&cert, &key]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(stderr(&out).contains("--tokens"), "{}", show(&out));

    // A tokens file others can read is refused.
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = daemon(&[&cert, &key, &tokens]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(stderr(&out).contains("chmod 600"), "{}", show(&out));
    assert!(!socket.exists(), "the socket was bound although the daemon refused to start");
}

#[test]
fn daemon_tcp_tokens_are_tenants() {
    if !require(is_root(), "root (to create sandboxes for two uids)") {
        return;
    }
    let id = Command::new("id").args(["-u", TEST_USER]).output().unwrap();
    if !require(id.status.success(), "the user airlock-test (created by scripts/test.sh)") {
        return;
    }
    let other_uid: u32 = stdout(&id).trim().parse().unwrap();
    let (root_token, user_token) = ("root-token-8d2e", "user-token-51b7");
    let d = TcpDaemon::start(&[(0, root_token), (other_uid, user_token)]);
    assert_eq!(d.request(Some(user_token), "GET", "/v1/health", None).status, 200);

    let ws = d.env.workspace.display().to_string();
    let (status, created) =
        d.json(root_token, "POST", "/v1/sandboxes", Some(json!({ "name": "tcp-roots", "workspace": ws })));
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["state"], "running", "{created}");

    let names = |token: &str| -> Vec<String> {
        let (status, list) = d.json(token, "GET", "/v1/sandboxes", None);
        assert_eq!(status, 200, "{list}");
        list["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["name"].as_str().map(String::from))
            .collect()
    };
    assert_eq!(names(root_token), ["tcp-roots"]);
    assert!(names(user_token).is_empty(), "the other tenant sees root's sandbox");
    let (status, body) = d.json(user_token, "GET", "/v1/sandboxes/tcp-roots", None);
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    let (status, body) = d.json(user_token, "DELETE", "/v1/sandboxes/tcp-roots", None);
    assert_eq!(status, 404, "{body}");

    // The token's uid owns what it creates, as a socket peer's would.
    let (status, inspect) = d.json(root_token, "GET", "/v1/sandboxes/tcp-roots", None);
    assert_eq!(status, 200, "{inspect}");
    assert_eq!(inspect["state"], "running", "{inspect}");
}

#[test]
fn daemon_tcp_sighup_reloads_the_tokens() {
    let (keeper, revoked, added) = ("keeper-token-60d1", "revoked-token-2a7c", "added-token-9e04");
    let d = TcpDaemon::start(&[(my_uid(), keeper), (my_uid(), revoked)]);
    let status = |token: &str| d.request(Some(token), "GET", "/v1/sandboxes", None).status;
    assert_eq!(status(revoked), 200);
    assert_unauthorized(&d.request(Some(added), "GET", "/v1/sandboxes", None));

    // Its line removed and SIGHUP sent, a token answers 401 from then on.
    write_tokens(d.env.dir.path(), &[(my_uid(), keeper)]);
    d.hangup();
    assert!(wait_until(10, || status(revoked) == 401), "still accepted after SIGHUP: {}", d.log());
    assert_unauthorized(&d.request(Some(revoked), "GET", "/v1/sandboxes", None));
    assert_eq!(status(keeper), 200);

    // A new line and SIGHUP: the new token works.
    write_tokens(d.env.dir.path(), &[(my_uid(), keeper), (my_uid(), added)]);
    d.hangup();
    assert!(wait_until(10, || status(added) == 200), "new token refused after SIGHUP: {}", d.log());
    assert_eq!(status(keeper), 200);

    // A malformed file is refused with the reason, and the tokens in force stay.
    let path = d.env.dir.path().join("tokens");
    std::fs::write(&path, format!("{} not-a-digest\n", my_uid())).unwrap();
    d.hangup();
    assert!(
        wait_until(10, || d.log().contains("previous tokens stay in force")),
        "no reload error logged: {}",
        d.log()
    );
    let log = d.log();
    assert!(log.contains("line 1") && log.contains("64 hex digits"), "{log}");
    assert!(!log.contains(keeper) && !log.contains(added), "a token reached the log: {log}");
    assert_eq!(status(keeper), 200);
    assert_eq!(status(added), 200);
    assert_unauthorized(&d.request(Some(revoked), "GET", "/v1/sandboxes", None));

    // So is a file others may read; and the daemon is still up throughout.
    write_tokens(d.env.dir.path(), &[(my_uid(), revoked)]);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    d.hangup();
    assert!(wait_until(10, || d.log().contains("chmod 600")), "no reload error logged: {}", d.log());
    assert_eq!(status(keeper), 200);
    assert_eq!(status(revoked), 401);
}
