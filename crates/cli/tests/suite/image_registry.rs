//! Registry pulls against a real registry on loopback: Debian's
//! `docker-registry` (distribution 2.8), started here with its own storage,
//! TLS from a CA made by the test and htpasswd basic auth, and a busybox
//! image built by the test pushed into it with `skopeo copy`.
//!
//! Token auth runs against a token service started here: it checks basic
//! credentials and answers with ES256 JWTs the registry verifies against
//! the service's certificate (its `auth.token.rootcertbundle`).

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;

use super::image::busybox_layout;
use super::support::*;

const USER: &str = "puller";
const PASSWORD: &str = "right-password";

/// What the tests need on the host; missing: a loud failure in CI.
pub(crate) fn tools_or_skip() -> bool {
    let have = |bin: &str| Path::new(bin).is_file();
    require(
        have("/usr/bin/docker-registry") && have("/usr/bin/skopeo") && have("/usr/bin/htpasswd"),
        "docker-registry, skopeo and htpasswd (Debian: docker-registry, skopeo, apache2-utils)",
    ) && require(
        Path::new("/bin/busybox").is_file(),
        "a static busybox at /bin/busybox (Debian: busybox-static)",
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A test CA and a registry certificate for 127.0.0.1 it signed, as files.
pub(crate) struct TestCa {
    pub(crate) ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// The same certificate and key for a server in the test (the token service).
    server: Arc<rustls::ServerConfig>,
}

fn make_ca(dir: &Path) -> TestCa {
    make_ca_for(dir, &[], &[std::net::Ipv4Addr::LOCALHOST.into()])
}

/// [`make_ca`] with a registry certificate for `names` and `ips`.
pub(crate) fn make_ca_for(dir: &Path, names: &[&str], ips: &[std::net::IpAddr]) -> TestCa {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.distinguished_name.push(DnType::CommonName, "airlock registry test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params.subject_alt_names = ips
        .iter()
        .map(|ip| SanType::IpAddress(*ip))
        .chain(names.iter().map(|n| SanType::DnsName((*n).try_into().unwrap())))
        .collect();
    let common_name = names.first().map(|n| n.to_string()).or_else(|| ips.first().map(|ip| ip.to_string()));
    leaf_params.distinguished_name.push(DnType::CommonName, common_name.unwrap_or_default());
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    // skopeo's --dest-cert-dir reads CAs from *.crt files and takes a
    // *.key there for a client key: the CA gets a directory of its own.
    let (trust, server) = (dir.join("tls/trust"), dir.join("tls/server"));
    fs::create_dir_all(&trust).unwrap();
    fs::create_dir_all(&server).unwrap();
    fs::write(trust.join("ca.crt"), ca_cert.pem()).unwrap();
    fs::write(server.join("registry.pem"), leaf.pem()).unwrap();
    fs::write(server.join("registry.key"), leaf_key.serialize_pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls_server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    TestCa {
        ca: trust.join("ca.crt"),
        cert: server.join("registry.pem"),
        key: server.join("registry.key"),
        server: Arc::new(tls_server),
    }
}

const TOKEN_SERVICE: &str = "airlock-test-registry";
const TOKEN_ISSUER: &str = "airlock-test-token-issuer";

/// A token service as distribution's token auth expects one, over HTTPS
/// with the test CA's certificate: `GET /token?service=S&scope=...` with
/// USER:PASSWORD gets a JWT granting the scopes asked for; no credentials
/// get one granting nothing (as public token services answer); other
/// credentials get 401. The JWT is signed with ES256 by a key whose
/// self-signed certificate the registry trusts, named in the `x5c` header.
pub(crate) struct TokenServer {
    port: u16,
    /// The signing key's certificate: the registry's rootcertbundle.
    signer_cert: PathBuf,
    /// "USER SCOPE" for every token issued with the right credentials.
    issued: Arc<Mutex<Vec<String>>>,
}

impl TokenServer {
    fn start(dir: &Path, tls: &TestCa) -> TokenServer {
        use rcgen::{CertificateParams, DnType, KeyPair};
        let signer_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "airlock test token issuer");
        let signer = params.self_signed(&signer_key).unwrap();
        let root = dir.join("token");
        fs::create_dir_all(&root).unwrap();
        let signer_cert = root.join("signer.pem");
        fs::write(&signer_cert, signer.pem()).unwrap();
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &signer_key.serialize_der(),
            &rng,
        )
        .unwrap();
        let x5c = base64::engine::general_purpose::STANDARD.encode(signer.der());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let issued = Arc::new(Mutex::new(Vec::new()));
        let (config, log) = (tls.server.clone(), issued.clone());
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(conn) = conn else { continue };
                let Ok(session) = rustls::ServerConnection::new(config.clone()) else { continue };
                let mut stream = rustls::StreamOwned::new(session, conn);
                let Some(head) = read_head(&mut stream) else { continue };
                let response = token_response(&head, &key, &rng, &x5c, n, &log);
                let _ = stream.write_all(response.as_bytes());
                stream.conn.send_close_notify();
                let _ = stream.flush();
            }
        });
        TokenServer { port, signer_cert, issued }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn issued(&self) -> Vec<String> {
        self.issued.lock().unwrap().clone()
    }
}

/// A request's head (request line and headers), or None when the client
/// went away first.
fn read_head(stream: &mut impl Read) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    String::from_utf8(head).ok()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// The HTTP response to one token request.
fn token_response(
    head: &str,
    key: &ring::signature::EcdsaKeyPair,
    rng: &ring::rand::SystemRandom,
    x5c: &str,
    serial: usize,
    log: &Mutex<Vec<String>>,
) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let target = head.split(' ').nth(1).unwrap_or("");
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut scopes = Vec::new();
    for pair in query.split('&') {
        if let Some(("scope", value)) = pair.split_once('=') {
            scopes.push(percent_decode(value));
        }
    }
    let basic = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("authorization")))
        .map(|(_, value)| value.trim().to_owned());
    let subject = match basic.as_deref().and_then(|v| v.strip_prefix("Basic ")) {
        None => "",
        Some(encoded) if b64.decode(encoded).ok() == Some(format!("{USER}:{PASSWORD}").into_bytes()) => USER,
        Some(_) => {
            let body = r#"{"details":"incorrect username or password"}"#;
            return format!(
                "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    };
    let mut access = Vec::new();
    if !subject.is_empty() {
        for scope in &scopes {
            let (kind, rest) = scope.split_once(':').unwrap();
            let (name, actions) = rest.rsplit_once(':').unwrap();
            let actions: Vec<&str> = actions.split(',').collect();
            access.push(serde_json::json!({"type": kind, "name": name, "actions": actions}));
            log.lock().unwrap().push(format!("{subject} {scope}"));
        }
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER,
        "sub": subject,
        "aud": TOKEN_SERVICE,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("airlock-test-{now}-{serial}"),
        "access": access,
    });
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signing_input = format!(
        "{}.{}",
        url.encode(serde_json::to_vec(&header).unwrap()),
        url.encode(serde_json::to_vec(&claims).unwrap())
    );
    let signature = key.sign(rng, signing_input.as_bytes()).unwrap();
    let jwt = format!("{signing_input}.{}", url.encode(signature.as_ref()));
    let body = serde_json::json!({"token": jwt, "access_token": jwt, "expires_in": 300}).to_string();
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// How a test registry checks who pulls and pushes.
pub(crate) enum Auth<'a> {
    Anonymous,
    Htpasswd,
    Token(&'a TokenServer),
}

/// A running docker-registry; stopped (and its storage removed with the
/// test's directory) when dropped.
pub(crate) struct Registry {
    child: Child,
    addr: SocketAddr,
    port: u16,
    storage: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Starts a registry in `dir/NAME`: HTTPS with `tls` when given, and
    /// `auth`'s checks.
    fn start(dir: &Path, name: &str, tls: Option<&TestCa>, auth: Auth) -> Registry {
        let addr = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, free_port()));
        Registry::start_at(dir, name, tls, auth, Command::new("/usr/bin/docker-registry"), addr)
    }

    /// [`Registry::start`] listening on `addr`, run by `command`
    /// (docker-registry, or it inside a test's network namespace).
    pub(crate) fn start_at(
        dir: &Path,
        name: &str,
        tls: Option<&TestCa>,
        auth: Auth,
        mut command: Command,
        addr: SocketAddr,
    ) -> Registry {
        let root = dir.join(name);
        let storage = root.join("storage");
        fs::create_dir_all(&storage).unwrap();
        let port = addr.port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            storage.display()
        );
        if let Some(tls) = tls {
            config +=
                &format!("  tls:\n    certificate: {}\n    key: {}\n", tls.cert.display(), tls.key.display());
        }
        match auth {
            Auth::Anonymous => {}
            Auth::Htpasswd => {
                let o = Command::new("htpasswd").args(["-nbB", USER, PASSWORD]).output().unwrap();
                assert!(o.status.success(), "{}", show(&o));
                fs::write(root.join("htpasswd"), &o.stdout).unwrap();
                config += &format!(
                    "auth:\n  htpasswd:\n    realm: airlock-test\n    path: {}\n",
                    root.join("htpasswd").display()
                );
            }
            Auth::Token(tokens) => {
                config += &format!(
                    "auth:\n  token:\n    realm: https://{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                    tokens.host(),
                    tokens.signer_cert.display()
                );
            }
        }
        fs::write(root.join("config.yml"), config).unwrap();
        let child = command
            .args(["serve", &root.join("config.yml").display().to_string()])
            .stdout(Stdio::null())
            .stderr(fs::File::create(root.join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        let registry = Registry { child, addr, port, storage };
        assert!(
            wait_until(20, || TcpStream::connect(addr).is_ok()),
            "the registry did not listen: {}",
            fs::read_to_string(root.join("registry.log")).unwrap_or_default()
        );
        registry
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Pushes the busybox layout's `v1` to `team/bb:1` with skopeo and
    /// returns the pushed manifest's digest.
    fn push(&self, layout: &Path, tls: Option<&TestCa>, auth: bool, work: &Path) -> String {
        self.push_from(&format!("oci:{}:v1", layout.display()), tls, auth, work)
    }

    /// [`Registry::push`] of the image skopeo names `source`.
    pub(crate) fn push_from(&self, source: &str, tls: Option<&TestCa>, auth: bool, work: &Path) -> String {
        let digest_file = work.join(format!("pushed-{}", self.port));
        let policy = work.join("skopeo-policy.json");
        fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
        let mut cmd = Command::new("skopeo");
        cmd.arg("--policy").arg(&policy).arg("copy").arg("--digestfile").arg(&digest_file);
        match tls {
            Some(tls) => cmd.arg("--dest-cert-dir").arg(tls.ca.parent().unwrap()),
            None => cmd.arg("--dest-tls-verify=false"),
        };
        if auth {
            cmd.arg("--dest-creds").arg(format!("{USER}:{PASSWORD}"));
        }
        cmd.arg(source).arg(format!("docker://{}/team/bb:1", self.host()));
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "skopeo copy: {}", show(&o));
        fs::read_to_string(&digest_file).unwrap().trim().to_owned()
    }

    /// The file the registry keeps a blob's bytes in.
    fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage.join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

/// A Docker config.json at `dir/config.json` with `auths` for `host`.
fn docker_config(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let json = serde_json::json!({"auths": {host: {"auth": auth}}});
    fs::write(dir.join("config.json"), serde_json::to_vec(&json).unwrap()).unwrap();
    dir.to_path_buf()
}

fn layers_of_manifest(registry: &Registry, manifest: &str) -> Vec<String> {
    let bytes = fs::read(registry.blob_data(manifest)).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_owned()).collect()
}

/// Nothing in the store that looks complete: no image, none of `blobs`.
fn assert_nothing_complete(env: &Env, blobs: &[String], what: &str) {
    let o = env.airlock(["image", "ls", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list, serde_json::json!([]), "{what}: no image recorded");
    for digest in blobs {
        let hex = digest.strip_prefix("sha256:").unwrap();
        assert!(
            !env.state.join("images/blobs/sha256").join(hex).exists(),
            "{what}: blob {digest} not stored"
        );
        assert!(
            !env.state.join("images/layers/sha256").join(hex).exists(),
            "{what}: layer {digest} not unpacked"
        );
    }
}

#[test]
fn a_registry_image_pulls_by_tag_and_digest_with_tls_auth_and_the_policy() {
    if !tools_or_skip() {
        return;
    }
    let env = Env::new();
    let work = env.dir.path().to_path_buf();
    let layout = work.join("layout");
    busybox_layout(&layout).unwrap();
    let ca = make_ca(&work);
    let registry = Registry::start(&work, "registry", Some(&ca), Auth::Htpasswd);
    let digest = registry.push(&layout, Some(&ca), true, &work);
    let host = registry.host();
    let by_tag = format!("{host}/team/bb:1");
    let by_digest = format!("{host}/team/bb@{digest}");
    let allow = host.clone();
    let ca_path = ca.ca.display().to_string();
    let good = docker_config(&work.join("docker-good"), &host, USER, PASSWORD);
    let bad = docker_config(&work.join("docker-bad"), &host, USER, "wrong-password");
    let pull = |args: &[&str], config: &Path| {
        let mut cmd = env.airlock(["image", "pull"]);
        cmd.args(args).env("DOCKER_CONFIG", config);
        cmd.output().unwrap()
    };

    // The egress rules decide first: no allow entry, then a loopback
    // address allowed without its port (the private-address guard).
    let o = pull(&[&by_tag, "--ca", &ca_path], &good);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains(&format!("no allow entry matches {host}")), "{}", show(&o));
    let o = pull(&[&by_tag, "--ca", &ca_path, "--allow", "127.0.0.1"], &good);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("loopback"), "the private-address guard: {}", show(&o));

    // The test CA is trusted only when named.
    let o = pull(&[&by_tag, "--allow", &allow], &good);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).to_lowercase().contains("certificate"), "{}", show(&o));

    // Wrong credentials: a clear refusal, nothing stored.
    let o = pull(&[&by_tag, "--allow", &allow, "--ca", &ca_path], &bad);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains(&format!("registry refused the credentials of {USER} from")), "{}", show(&o));
    assert_nothing_complete(&env, &[], "wrong credentials");

    // By tag: progress on stderr, the manifest's digest on stdout.
    let o = pull(&[&by_tag, "--allow", &allow, "--ca", &ca_path], &good);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), digest, "{}", show(&o));
    assert!(stderr(&o).contains("layer sha256:"), "progress: {}", show(&o));

    // By digest, and a digest that is not the manifest's.
    let o = pull(&[&by_digest, "--allow", &allow, "--ca", &ca_path], &good);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), digest, "{}", show(&o));
    let other = format!("{host}/team/bb@sha256:{}", "0".repeat(64));
    let o = pull(&[&other, "--allow", &allow, "--ca", &ca_path], &good);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));

    // A sandbox on the pulled image.
    let o = env
        .airlock(["run", "--mode", "none", "--image", &by_tag, "--", "cat", "/etc/image-release"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains("airlock-test-image 1"), "{}", show(&o));

    // The policy's image rules: another registry refused, a tag refused
    // where a digest is required.
    let policy = work.join("only-example.toml");
    fs::write(&policy, "extends = \"dev\"\n[image]\nregistries = [\"registry.example.com\"]\n").unwrap();
    let policy = policy.display().to_string();
    let o = pull(&[&by_tag, "--allow", &allow, "--ca", &ca_path, "--policy", &policy], &good);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("is not in the policy's image.registries"), "{}", show(&o));
    let pinned = work.join("pinned.toml");
    fs::write(&pinned, "extends = \"dev\"\n[image]\nrequire_digest = true\n").unwrap();
    let pinned = pinned.display().to_string();
    let o = pull(&[&by_tag, "--allow", &allow, "--ca", &ca_path, "--policy", &pinned], &good);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("require_digest"), "{}", show(&o));
    let o = pull(&[&by_digest, "--allow", &allow, "--ca", &ca_path, "--policy", &pinned], &good);
    assert_eq!(o.status.code(), Some(0), "a digest passes: {}", show(&o));
}

#[test]
fn a_registry_with_token_auth_pulls_with_a_bearer_token_from_its_token_service() {
    if !tools_or_skip() {
        return;
    }
    let env = Env::new();
    let work = env.dir.path().to_path_buf();
    let layout = work.join("layout");
    busybox_layout(&layout).unwrap();
    let ca = make_ca(&work);
    let tokens = TokenServer::start(&work, &ca);
    let registry = Registry::start(&work, "registry", Some(&ca), Auth::Token(&tokens));
    // skopeo does the token dance itself: the push proves the registry
    // takes the service's tokens.
    let digest = registry.push(&layout, Some(&ca), true, &work);
    let pushed = format!("{USER} repository:team/bb:pull,push");
    assert!(tokens.issued().contains(&pushed), "skopeo's push token: {:?}", tokens.issued());
    let (host, token_host) = (registry.host(), tokens.host());
    let by_tag = format!("{host}/team/bb:1");
    let ca_path = ca.ca.display().to_string();
    let authfile = |dir: &str, password: &str| {
        docker_config(&work.join(dir), &host, USER, password).join("config.json").display().to_string()
    };
    let (good, bad) = (authfile("docker-good", PASSWORD), authfile("docker-bad", "wrong-password"));
    // No config.json of the host's: the default place is an empty directory.
    let empty = work.join("docker-empty");
    fs::create_dir_all(&empty).unwrap();
    let pull = |args: &[&str]| {
        let mut cmd = env.airlock(["image", "pull", &by_tag, "--ca", &ca_path, "--allow", &host]);
        cmd.args(args).env("DOCKER_CONFIG", &empty);
        cmd.output().unwrap()
    };

    // The token service is a connection of the pull's too: without an
    // allow entry for it, the policy refuses it by name.
    let o = pull(&["--authfile", &good]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains(&format!("refused the pull's connection to {token_host}")), "{}", show(&o));
    assert_nothing_complete(&env, &[], "token service not allowed");

    // Wrong credentials: the token service answers 401, the registry then
    // refuses the request without a token; nothing stored.
    let o = pull(&["--allow", &token_host, "--authfile", &bad]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains(&format!("registry refused the credentials of {USER} from")), "{}", show(&o));
    assert_nothing_complete(&env, &[], "wrong credentials");

    // No credentials: an anonymous token grants nothing here.
    let o = pull(&["--allow", &token_host]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("registry refused anonymous access"), "{}", show(&o));
    assert_nothing_complete(&env, &[], "no credentials");

    // The right credentials: a pull token from the service, then the
    // image. The registry answers nothing without a token it verified, and
    // the service saw airlock ask for exactly the pull scope.
    let before = tokens.issued().len();
    let o = pull(&["--allow", &token_host, "--authfile", &good]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), digest, "{}", show(&o));
    let asked = tokens.issued()[before..].to_vec();
    let pull_scope = format!("{USER} repository:team/bb:pull");
    assert!(
        !asked.is_empty() && asked.iter().all(|a| *a == pull_scope),
        "airlock's token requests: {asked:?}"
    );

    // The policy's credentials get a token the same way (no config.json
    // at all: the default place is empty).
    let o = env.airlock(["image", "rm", &by_tag]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let policy = credentials_policy(&work, "token-creds", &host, &format!("env:{PASSWORD_VAR}"), "");
    let before = tokens.issued().len();
    let o = pull(&["--allow", &token_host, "--policy", &policy]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains(PASSWORD_VAR), "{}", show(&o));
    let o = {
        let mut cmd = env.airlock(["image", "pull", &by_tag, "--ca", &ca_path, "--allow", &host]);
        cmd.args(["--allow", &token_host, "--policy", &policy]).env("DOCKER_CONFIG", &empty);
        cmd.env(PASSWORD_VAR, PASSWORD).output().unwrap()
    };
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), digest, "{}", show(&o));
    let asked = tokens.issued()[before..].to_vec();
    assert!(!asked.is_empty() && asked.iter().all(|a| *a == pull_scope), "with the policy's: {asked:?}");
}

/// The environment variable the tests' policies read a registry password from.
const PASSWORD_VAR: &str = "AIRLOCK_TEST_REGISTRY_PASSWORD";

/// A policy file `dir/NAME.toml` that extends dev, gives `registry` the
/// test user with its password from `source`, and adds `extra` (TOML).
fn credentials_policy(dir: &Path, name: &str, registry: &str, source: &str, extra: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "extends = \"dev\"\n{extra}\n[image.credentials.\"{registry}\"]\nusername = \"{USER}\"\npassword = \"{source}\"\n"
    );
    fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Every file below `dir` that holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        let Ok(entries) = fs::read_dir(&at) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            {
                found.push(path);
            }
        }
    }
    found
}

/// The policy's `image.credentials`: the password read from its secret
/// source (env, file, cmd) on the host, only when a pull needs it, and
/// used before a Docker config.json's; a source that cannot be read names
/// the registry and the source; the password reaches neither the sandbox
/// nor anything airlock writes.
#[test]
fn the_policys_registry_credentials_come_from_their_source_and_before_a_docker_config() {
    if !tools_or_skip() {
        return;
    }
    let env = Env::new();
    let work = env.dir.path().to_path_buf();
    let layout = work.join("layout");
    busybox_layout(&layout).unwrap();
    let ca = make_ca(&work);
    let registry = Registry::start(&work, "registry", Some(&ca), Auth::Htpasswd);
    let digest = registry.push(&layout, Some(&ca), true, &work);
    let host = registry.host();
    let by_tag = format!("{host}/team/bb:1");
    let ca_path = ca.ca.display().to_string();
    let good = docker_config(&work.join("docker-good"), &host, USER, PASSWORD);
    let bad = docker_config(&work.join("docker-bad"), &host, USER, "wrong-password");
    let from_env = credentials_policy(&work, "from-env", &host, &format!("env:{PASSWORD_VAR}"), "");
    let pull = |policy: &str, config: &Path, password: Option<&str>| {
        let mut cmd = env.airlock(["image", "pull", &by_tag, "--allow", &host, "--ca", &ca_path]);
        cmd.args(["--policy", policy]).env("DOCKER_CONFIG", config);
        match password {
            Some(password) => cmd.env(PASSWORD_VAR, password),
            None => cmd.env_remove(PASSWORD_VAR),
        };
        cmd.output().unwrap()
    };

    // The source cannot be read: said with the registry and the source.
    let o = pull(&from_env, &good, None);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("credentials for registry {host} (image.credentials)"))
            && err.contains(&format!("environment variable {PASSWORD_VAR} is not set")),
        "{}",
        show(&o)
    );
    assert_nothing_complete(&env, &[], "an unreadable source");

    // The policy's first: its right password over the config.json's wrong
    // one, then its wrong password (a file) over the config.json's right one.
    let o = pull(&from_env, &bad, Some(PASSWORD));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), digest, "{}", show(&o));
    let wrong = work.join("wrong-password");
    fs::write(&wrong, "wrong-password\n").unwrap();
    let from_file = credentials_policy(&work, "from-file", &host, &format!("file:{}", wrong.display()), "");
    let o = pull(&from_file, &good, None);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        stderr(&o).contains(&format!(
            "registry refused the credentials of {USER} from policy from-file (image.credentials.{host:?})"
        )),
        "{}",
        show(&o)
    );

    // A sandbox that pulls its image with a `cmd:` source (the test CA
    // through the policy's extra_roots, as `run` takes no --ca).
    let o = env.airlock(["image", "rm", &by_tag]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let right = work.join("password-file");
    fs::write(&right, format!("{PASSWORD}\n")).unwrap();
    let roots = format!("[network]\nextra_roots = [\"{ca_path}\"]\n");
    let from_cmd =
        credentials_policy(&work, "from-cmd", &host, &format!("cmd:cat {}", right.display()), &roots);
    let run = |policy: &str| {
        let args = ["run", "--name", "creds", "--mode", "none", "--policy", policy, "--allow", &host];
        let mut cmd = env.airlock(args);
        cmd.args(["--image", &by_tag, "--", "sh", "-c", "env; cat /etc/image-release"]);
        cmd.env("DOCKER_CONFIG", &bad).env_remove(PASSWORD_VAR).output().unwrap()
    };
    let o = run(&from_cmd);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains("airlock-test-image 1"), "{}", show(&o));
    assert!(!stdout(&o).contains(PASSWORD), "the password is not in the sandbox: {}", show(&o));
    // Read only when a pull needs it: the image is in the store now, and
    // a sandbox on it starts with the variable unset.
    let o = env.airlock(["rm", "creds"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = run(&from_env);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let holding = files_holding(&env.state, PASSWORD.as_bytes());
    assert!(holding.is_empty(), "the password is in nothing airlock wrote: {holding:?}");
}

/// Forwards 127.0.0.1:<its port> to `upstream` and, while armed, cuts
/// every connection once `budget` bytes have come back from upstream in
/// all; after the cut it forwards everything.
struct CuttingProxy {
    port: u16,
    armed: Arc<AtomicBool>,
}

impl CuttingProxy {
    fn start(upstream: u16, budget: u64) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(true));
        let sent = Arc::new(AtomicU64::new(0));
        let flag = armed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(Shutdown::Write);
                });
                let (flag, sent) = (flag.clone(), sent.clone());
                std::thread::spawn(move || {
                    let (mut server, mut client) = (server, client);
                    let mut buf = [0u8; 16384];
                    loop {
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let total = sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                        if flag.load(Ordering::SeqCst) && total > budget {
                            flag.store(false, Ordering::SeqCst);
                            let _ = client.shutdown(Shutdown::Both);
                            let _ = server.shutdown(Shutdown::Both);
                            break;
                        }
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(Shutdown::Write);
                });
            }
        });
        CuttingProxy { port, armed }
    }
}

#[test]
fn a_corrupted_or_interrupted_registry_pull_leaves_nothing_complete_and_a_retry_works() {
    if !tools_or_skip() {
        return;
    }
    let env = Env::new();
    let work = env.dir.path().to_path_buf();
    let layout = work.join("layout");
    busybox_layout(&layout).unwrap();
    let ca = make_ca(&work);
    let registry = Registry::start(&work, "registry", Some(&ca), Auth::Anonymous);
    let digest = registry.push(&layout, Some(&ca), false, &work);
    let layers = layers_of_manifest(&registry, &digest);
    let ca_path = ca.ca.display().to_string();
    let pull = |host: &str| {
        let reference = format!("{host}/team/bb:1");
        env.airlock(["image", "pull", &reference, "--allow", host, "--ca", &ca_path]).output().unwrap()
    };

    // A layer corrupted in the registry's storage (same size): refused.
    let data = registry.blob_data(&layers[0]);
    let original = fs::read(&data).unwrap();
    let mut corrupted = original.clone();
    let middle = corrupted.len() / 2;
    corrupted[middle] ^= 0xff;
    fs::write(&data, &corrupted).unwrap();
    let o = pull(&registry.host());
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stderr(&o).contains("digest"), "{}", show(&o));
    assert_nothing_complete(&env, &layers, "corrupted blob");
    fs::write(&data, &original).unwrap();

    // The connection cut in the middle of the big layer (the manifest and
    // config are a few KiB; the busybox layer is about a megabyte or more).
    let proxy = CuttingProxy::start(registry.port, 256 * 1024);
    let host = format!("127.0.0.1:{}", proxy.port);
    let o = pull(&host);
    assert!(!proxy.armed.load(Ordering::SeqCst), "the proxy cut a connection");
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert_nothing_complete(&env, &layers, "interrupted pull");

    // The retry, now uncut, completes.
    let o = pull(&host);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), digest, "{}", show(&o));
}

#[test]
fn a_plain_http_registry_is_refused_unless_insecure() {
    if !tools_or_skip() {
        return;
    }
    let env = Env::new();
    let work = env.dir.path().to_path_buf();
    let layout = work.join("layout");
    busybox_layout(&layout).unwrap();
    let registry = Registry::start(&work, "plain", None, Auth::Anonymous);
    let digest = registry.push(&layout, None, false, &work);
    let host = registry.host();
    let reference = format!("{host}/team/bb:1");
    let o = env.airlock(["image", "pull", &reference, "--allow", &host]).output().unwrap();
    assert_ne!(o.status.code(), Some(0), "HTTPS is the default: {}", show(&o));
    assert_nothing_complete(&env, &[], "plain HTTP without --insecure");
    let o = env.airlock(["image", "pull", &reference, "--allow", &host, "--insecure"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), digest, "{}", show(&o));

    // The policy's `image.insecure` does the same for the registries it
    // lists, and for those only; a refining file that empties it narrows
    // it. A sandbox pulls its image with it too.
    let o = env.airlock(["image", "rm", &reference]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let write = |name: &str, text: String| {
        let path = work.join(name);
        fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let other = write("other.toml", "extends = \"dev\"\n[image]\ninsecure = [\"127.0.0.1:1\"]\n".into());
    let listed = write("listed.toml", format!("extends = \"dev\"\n[image]\ninsecure = [\"{host}\"]\n"));
    let narrowed = write("narrowed.toml", "extends = \"listed.toml\"\n[image]\ninsecure = []\n".into());
    for (policy, what) in
        [(&other, "another registry listed"), (&narrowed, "a refining file emptied the list")]
    {
        let o = env
            .airlock(["image", "pull", &reference, "--allow", &host, "--policy", policy])
            .output()
            .unwrap();
        assert_ne!(o.status.code(), Some(0), "{what}: TLS still: {}", show(&o));
        assert_nothing_complete(&env, &[], what);
    }
    let o = env
        .airlock(["run", "--mode", "none", "--policy", &listed, "--allow", &host, "--image", &reference])
        .args(["--", "cat", "/etc/image-release"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(stdout(&o).contains("airlock-test-image 1"), "{}", show(&o));
    let o =
        env.airlock(["image", "pull", &reference, "--allow", &host, "--policy", &listed]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), digest, "{}", show(&o));
}
