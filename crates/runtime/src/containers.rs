//! A container engine inside a microVM sandbox (`[isolation] containers`,
//! `--containers`): the host's side.
//!
//! The guest runs its own dockerd on a disk of its own (`airlock_vm::
//! containers`); the host gives it that disk — a sparse raw file of the
//! policy's disk limit in the sandbox's directory, which the host never
//! mounts or reads, removed with the sandbox — and the sandbox's supervisor
//! serves `<state dir>/<name>/containers.sock` (0600, the sandbox's owner's),
//! relaying each connection to the engine's socket in the guest over the
//! ports port (`HandOver::ContainerEngine`: the guest connects to a path of
//! airlock's, never one the host or a client names). Nothing else is
//! reachable through it.
//!
//! The supervisor also watches the engine through that socket: when it
//! first answers (`container_engine`), and each container it creates, with
//! its image and command (`container_created`), both recorded as the guest
//! reported them. What the engine says is the guest's, so it is read with
//! bounds: a line of at most [`MAX_EVENT_LINE`], an answer of at most
//! [`MAX_ANSWER`], an id of hex digits only before it goes into a path.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_policy::{Policy, Tier};
use airlock_vm::ports_port::HostPorts;

use crate::RunError;
use crate::audit::{AuditEvent, AuditLog};
use crate::state::SandboxDir;

/// The host's socket, in the sandbox's directory.
pub const SOCKET: &str = "containers.sock";

/// The engine's disk, in the sandbox's directory.
pub const DISK: &str = "engine.img";

/// How long the engine may take to answer after the guest serves: dockerd
/// and its containerd start in seconds with KVM, much longer under
/// emulation.
const READY_WITHIN: Duration = Duration::from_secs(300);

/// The longest event line the host reads from the engine.
const MAX_EVENT_LINE: usize = 64 * 1024;

/// The longest answer (headers and body) the host reads to one request.
const MAX_ANSWER: u64 = 1 << 20;

/// The reason a policy's container engine cannot be had, if it cannot.
pub(crate) fn check(policy: &Policy, image: bool) -> Result<(), RunError> {
    if !policy.isolation.containers {
        return Ok(());
    }
    if policy.isolation.tier != Tier::Microvm {
        return Err(RunError::PolicyRefused(
            "containers: a container engine runs only on the microvm tier (--tier microvm): nested containers \
             need their own kernel here, and the process tier shares the host's"
                .into(),
        ));
    }
    if image {
        return Err(RunError::PolicyRefused(
            "containers: a container engine on an image's root is not supported yet; the engine comes from \
             the host's system directories (Debian's docker.io)"
                .into(),
        ));
    }
    Ok(())
}

/// The engine's disk: a sparse file of `size` bytes in the sandbox's
/// directory (its blocks are taken only as the guest writes).
pub(crate) fn create_disk(sandbox: &SandboxDir, size: u64) -> Result<PathBuf, RunError> {
    let path = sandbox.path().join(DISK);
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| RunError::State(path.clone(), e))?;
    file.set_len(size).map_err(|e| RunError::State(path.clone(), e))?;
    Ok(path)
}

/// The host's socket, served from threads of the supervisor's until the
/// process ends (or the guest, whose engine then no longer answers).
pub(crate) fn serve(
    sandbox: &SandboxDir,
    owner_uid: u32,
    ports: HostPorts,
    audit: Arc<Mutex<AuditLog>>,
) -> Result<PathBuf, RunError> {
    let socket = sandbox.path().join(SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| RunError::State(socket.clone(), e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| RunError::State(socket.clone(), e))?;
    }
    if rustix::process::geteuid().is_root() {
        rustix::fs::chown(&socket, Some(rustix::fs::Uid::from_raw(owner_uid)), None)
            .map_err(|e| RunError::State(socket.clone(), e.into()))?;
    }
    let relay_ports = ports.clone();
    std::thread::Builder::new()
        .name("containers".into())
        .spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                match relay_ports.connect_engine() {
                    Ok(engine) => relay(client, engine),
                    Err(e) => tracing::debug!("container engine: {e}"),
                }
            }
        })
        .map_err(|e| RunError::Supervisor(e.to_string()))?;
    std::thread::Builder::new()
        .name("containers-watch".into())
        .spawn(move || watch(&ports, &audit))
        .map_err(|e| RunError::Supervisor(e.to_string()))?;
    Ok(socket)
}

/// Copies both ways between a client and the engine until each side ends.
fn relay(client: UnixStream, engine: UnixStream) {
    let pair = || Ok::<_, io::Error>((client.try_clone()?, engine.try_clone()?));
    let Ok((mut client_in, mut engine_out)) = pair() else { return };
    let _ = std::thread::Builder::new().name("containers-in".into()).spawn(move || {
        let _ = io::copy(&mut client_in, &mut engine_out);
        let _ = engine_out.shutdown(std::net::Shutdown::Write);
    });
    let (mut engine_in, mut client_out) = (engine, client);
    let _ = std::thread::Builder::new().name("containers-out".into()).spawn(move || {
        let _ = io::copy(&mut engine_in, &mut client_out);
        let _ = client_out.shutdown(std::net::Shutdown::Write);
    });
}

/// Waits for the engine to answer, records it, then records each
/// container it creates, for as long as its event stream lasts.
fn watch(ports: &HostPorts, audit: &Mutex<AuditLog>) {
    let record = |event: AuditEvent| {
        if let Ok(mut audit) = audit.lock() {
            let _ = audit.record(event);
        }
    };
    let started = Instant::now();
    let mut last_error;
    loop {
        match request(ports, "/_ping") {
            Ok((200, _)) => break,
            Ok((status, _)) => last_error = format!("it answered /_ping with status {status}"),
            Err(e) => last_error = e.to_string(),
        }
        if started.elapsed() > READY_WITHIN {
            record(AuditEvent::ContainerEngine {
                ready: false,
                ms: started.elapsed().as_millis() as u64,
                detail: Some(format!(
                    "{last_error}; its log is {} in the sandbox",
                    airlock_vm::containers::ENGINE_LOG
                )),
                reported_by: "guest".into(),
            });
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    record(AuditEvent::ContainerEngine {
        ready: true,
        ms: started.elapsed().as_millis() as u64,
        detail: None,
        reported_by: "guest".into(),
    });
    let Ok(stream) = open(ports, EVENTS_PATH) else { return };
    let mut reader = BufReader::new(stream);
    if skip_headers(&mut reader).is_err() {
        return;
    }
    while let Ok(Some(line)) = read_line(&mut reader) {
        let Some(created) = created_container(&line) else { continue };
        let (image, command) = match request(ports, &format!("/containers/{}/json", created.id)) {
            Ok((200, body)) => describe(&body).unwrap_or((created.image.clone(), Vec::new())),
            _ => (created.image.clone(), Vec::new()),
        };
        record(AuditEvent::ContainerCreated { id: created.id, image, command, reported_by: "guest".into() });
    }
}

/// The engine's events, containers created only (a JSON object a line;
/// HTTP/1.0, so the stream is not chunked).
const EVENTS_PATH: &str =
    "/events?filters=%7B%22type%22%3A%5B%22container%22%5D%2C%22event%22%3A%5B%22create%22%5D%7D";

/// A connection to the engine with a request for `path` sent.
fn open(ports: &HostPorts, path: &str) -> io::Result<UnixStream> {
    let mut stream = ports.connect_engine()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: engine\r\n\r\n").as_bytes())?;
    Ok(stream)
}

/// One request's status and body (at most [`MAX_ANSWER`] read).
fn request(ports: &HostPorts, path: &str) -> io::Result<(u16, Vec<u8>)> {
    let stream = open(ports, path)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut answer = Vec::new();
    stream.take(MAX_ANSWER).read_to_end(&mut answer)?;
    parse_answer(&answer).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP answer"))
}

/// An HTTP/1.x answer's status and body.
fn parse_answer(answer: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..end]).ok()?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, answer[end + 4..].to_vec()))
}

fn skip_headers(reader: &mut impl BufRead) -> io::Result<()> {
    loop {
        match read_line(reader)? {
            Some(line) if line.trim().is_empty() => return Ok(()),
            Some(_) => {}
            None => return Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// A line of at most [`MAX_EVENT_LINE`] bytes (a longer one is read past
/// and returned empty); None at the end.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let read = reader.by_ref().take(MAX_EVENT_LINE as u64).read_until(b'\n', &mut line)?;
    if read == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\n") && read == MAX_EVENT_LINE {
        // Too long: skip to its end.
        let mut rest = Vec::new();
        loop {
            rest.clear();
            let n = reader.by_ref().take(MAX_EVENT_LINE as u64).read_until(b'\n', &mut rest)?;
            if n == 0 || rest.ends_with(b"\n") {
                return Ok(Some(String::new()));
            }
        }
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// A container the engine said it created.
#[derive(Debug, PartialEq, Eq)]
struct Created {
    id: String,
    image: String,
}

/// The container an event line reports created, if it is one, with an id
/// of hex digits only.
fn created_container(line: &str) -> Option<Created> {
    let event: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let kind = event.get("Type").or_else(|| event.get("type")).and_then(|t| t.as_str());
    let action = event.get("Action").or_else(|| event.get("status")).and_then(|a| a.as_str());
    if kind != Some("container") || action != Some("create") {
        return None;
    }
    let actor = event.get("Actor");
    let id = actor.and_then(|a| a.get("ID")).or_else(|| event.get("id")).and_then(|i| i.as_str())?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let image = actor
        .and_then(|a| a.get("Attributes"))
        .and_then(|a| a.get("image"))
        .or_else(|| event.get("from"))
        .and_then(|i| i.as_str())
        .unwrap_or_default();
    Some(Created { id: id.to_owned(), image: image.to_owned() })
}

/// A container's image and command from the engine's inspection of it.
fn describe(body: &[u8]) -> Option<(String, Vec<String>)> {
    let container: serde_json::Value = serde_json::from_slice(body).ok()?;
    let image = container.get("Config")?.get("Image")?.as_str()?.to_owned();
    let mut command: Vec<String> =
        container.get("Path").and_then(|p| p.as_str()).map(str::to_owned).into_iter().collect();
    if let Some(args) = container.get("Args").and_then(|a| a.as_array()) {
        command.extend(args.iter().filter_map(|a| a.as_str()).map(str::to_owned));
    }
    Some((image, command))
}

/// The host's socket of a sandbox's directory, where it would be.
pub fn socket_of(dir: &Path) -> PathBuf {
    dir.join(SOCKET)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_a_created_containers_event_with_a_hex_id_is_taken() {
        let line = r#"{"status":"create","id":"0a1b2c","from":"registry.example.com/team/busybox","Type":"container","Action":"create","Actor":{"ID":"0a1b2c","Attributes":{"image":"registry.example.com/team/busybox","name":"x"}}}"#;
        assert_eq!(
            created_container(line),
            Some(Created { id: "0a1b2c".into(), image: "registry.example.com/team/busybox".into() })
        );
        let start = line.replace("\"create\"", "\"start\"");
        assert_eq!(created_container(&start), None);
        let hostile = line.replace("0a1b2c", "../../x");
        assert_eq!(created_container(&hostile), None, "an id that is not hex never goes into a path");
        assert_eq!(created_container("not json"), None);
    }

    #[test]
    fn a_containers_image_and_command_come_from_its_inspection() {
        let body = br#"{"Id":"0a","Path":"echo","Args":["hi","there"],"Config":{"Image":"busybox"}}"#;
        assert_eq!(
            describe(body),
            Some(("busybox".into(), vec!["echo".into(), "hi".into(), "there".into()]))
        );
        assert_eq!(parse_answer(b"HTTP/1.0 200 OK\r\nA: b\r\n\r\nOK"), Some((200, b"OK".to_vec())));
        assert_eq!(parse_answer(b"garbage"), None);
    }

    #[test]
    fn an_overlong_event_line_is_skipped_not_held() {
        let mut input = vec![b'x'; MAX_EVENT_LINE * 2 + 10];
        input.push(b'\n');
        input.extend_from_slice(b"{\"a\":1}\n");
        let mut reader = BufReader::new(&input[..]);
        assert_eq!(read_line(&mut reader).unwrap(), Some(String::new()));
        assert_eq!(read_line(&mut reader).unwrap().as_deref(), Some("{\"a\":1}\n"));
        assert_eq!(read_line(&mut reader).unwrap(), None);
    }

    #[test]
    fn the_process_tier_refuses_a_container_engine_saying_why() {
        let mut policy = Policy::builtin("dev").unwrap();
        assert!(check(&policy, false).is_ok(), "no engine asked for");
        policy.isolation.containers = true;
        let refused = check(&policy, false).unwrap_err().to_string();
        assert!(refused.contains("nested containers need their own kernel"), "{refused}");
        policy.isolation.tier = Tier::Microvm;
        assert!(check(&policy, false).is_ok());
        assert!(check(&policy, true).is_err(), "not on an image's root yet");
    }
}
