//! The daemon's process: pick and secure the socket, open the index,
//! reconcile it with the state directories, then serve HTTP/1.1 on the Unix
//! socket until SIGINT/SIGTERM. Sandboxes are owned by their supervisors, so
//! stopping the daemon stops none of them. SIGHUP re-reads the TCP
//! listener's tokens file (and does nothing else).
//!
//! Every connection is attributed to its peer's uid (SO_PEERCRED), which the
//! handlers find as a [`Peer`] extension on each request.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use airlock_runtime::state::StateRoot;
use axum::body::Body;
use axum::http::{Request, Response, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustix::fs::{FlockOperation, flock};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::app::App;
use crate::auth::Peer;
use crate::error::{ApiError, DaemonError};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 1024;
/// A client must send its request head within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the daemon looks for sandboxes whose supervisor died.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// What `airlock daemon` was given.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// The socket to listen on; default per [`default_socket`].
    pub socket: Option<PathBuf>,
    /// A group (name or gid) whose members may connect: the socket becomes
    /// `root:GROUP 0660`. Without it the socket is `root:root 0660` for root
    /// and `0600` for anyone else.
    pub group: Option<String>,
    /// The state root; default `StateRoot::from_env()`.
    pub state_dir: Option<PathBuf>,
    /// Also serve the API over TLS on TCP, for bearer-token tenants.
    pub tcp: Option<crate::tcp::TcpOptions>,
    /// Also serve the E2B-compatible API (`e2b`).
    pub e2b: Option<crate::e2b::E2bOptions>,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run_daemon(opts: DaemonOptions) -> Result<(), DaemonError> {
    raise_nofile_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(256)
        .enable_all()
        .thread_name("airlockd")
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(serve(opts))
}

/// Raises the soft limit on open files to the hard limit: every connection
/// holds a descriptor, and a daemon left at the usual soft limit of 1024
/// would run out (EMFILE) with [`MAX_CONNECTIONS`] clients connected, failing
/// their requests and its own work (the index, supervisor sockets) alike.
/// Best effort: on failure the daemon runs with the limit it has. The
/// supervisors it starts inherit the raised limit; sandboxed commands get
/// their policy's `nofile` regardless.
fn raise_nofile_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    if current == maximum {
        tracing::debug!(soft = ?current, hard = ?maximum, "RLIMIT_NOFILE: soft limit already at the hard limit");
        return;
    }
    match setrlimit(Resource::Nofile, Rlimit { current: maximum, maximum }) {
        Ok(()) => tracing::debug!(
            from = ?current,
            to = ?maximum,
            "RLIMIT_NOFILE: raised the soft limit to the hard limit"
        ),
        Err(e) => tracing::warn!(
            soft = ?current,
            hard = ?maximum,
            error = %e,
            "cannot raise RLIMIT_NOFILE's soft limit; many concurrent clients may exhaust descriptors"
        ),
    }
}

/// The socket path when none is given: `/run/airlock/airlock.sock` for
/// root, `$XDG_RUNTIME_DIR/airlock/airlock.sock` for anyone else.
pub fn default_socket() -> Result<PathBuf, DaemonError> {
    socket_for(rustix::process::geteuid().is_root(), std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from))
}

fn socket_for(is_root: bool, runtime_dir: Option<PathBuf>) -> Result<PathBuf, DaemonError> {
    if is_root {
        return Ok(PathBuf::from("/run/airlock/airlock.sock"));
    }
    match runtime_dir.filter(|d| d.is_absolute()) {
        Some(dir) => Ok(dir.join("airlock/airlock.sock")),
        None => Err(DaemonError::NoSocketPath("XDG_RUNTIME_DIR is not set to an absolute path".into())),
    }
}

async fn serve(opts: DaemonOptions) -> Result<(), DaemonError> {
    let root = match &opts.state_dir {
        Some(dir) => StateRoot::at(dir.clone()),
        None => StateRoot::from_env()?,
    };
    create_private_dir(root.path())?;
    let socket = match opts.socket.clone() {
        Some(path) => path,
        None => default_socket()?,
    };
    let gid = opts.group.as_deref().map(resolve_group).transpose()?;
    let app = Arc::new(App::open(root)?);
    let summary = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || crate::reconcile::startup(&app))
            .await
            .map_err(|e| DaemonError::Runtime(std::io::Error::other(e)))?
    };
    tracing::info!(
        known = summary.known,
        lost = summary.lost,
        forgotten = summary.forgotten,
        adopted = summary.adopted,
        "reconciled the index with the state directories"
    );

    // Before the daemon announces itself: from then on a SIGHUP must find
    // this handler, not the default action (exit).
    let hangup = hangup_signal();
    let tcp = match &opts.tcp {
        Some(tcp) => Some(crate::tcp::bind(tcp).await?),
        None => None,
    };
    let shared = tcp.as_ref().map(|server| server.tokens.clone());
    let e2b = match &opts.e2b {
        Some(e2b) => Some(crate::e2b::bind(e2b, shared.clone()).await?),
        None => None,
    };
    // One reload per tokens file: the two listeners share a store when they
    // name the same file.
    let mut stores: Vec<Arc<crate::tcp::TokenStore>> = shared.into_iter().collect();
    if let Some(server) = &e2b
        && !stores.iter().any(|s| Arc::ptr_eq(s, &server.tokens))
    {
        stores.push(server.tokens.clone());
    }
    let reloader = tokio::spawn(reload_on_hangup(hangup, stores));
    let bound = bind(&socket, gid)?;
    tracing::info!(socket = %socket.display(), state = %app.root.path().display(), "airlock daemon listening");
    eprintln!("airlock daemon: listening on {}", socket.display());

    let tcp = tcp.map(|server| {
        tracing::info!(listen = %server.local, "airlock daemon listening on TCP (TLS, bearer tokens)");
        eprintln!("airlock daemon: listening on https://{} (TLS, bearer tokens)", server.local);
        tokio::spawn(crate::tcp::accept_loop(server, app.clone(), MAX_CONNECTIONS, HEADER_TIMEOUT))
    });
    let e2b = e2b.map(|server| {
        let scheme = if server.tls() { "https" } else { "http" };
        tracing::info!(listen = %server.local, scheme, "airlock daemon serving the E2B API");
        eprintln!("airlock daemon: E2B API on {scheme}://{}", server.local);
        tokio::spawn(crate::e2b::accept_loop(server, app.clone(), MAX_CONNECTIONS, HEADER_TIMEOUT))
    });
    let reconciler = tokio::spawn(reconcile_loop(app.clone()));
    let result = accept_loop(&bound.listener, &socket, app.clone()).await;
    reconciler.abort();
    reloader.abort();
    for task in tcp.into_iter().chain(e2b) {
        task.abort();
    }
    // Best effort: a stale socket is replaced at the next start anyway.
    let _ = std::fs::remove_file(&socket);
    drop(bound);
    result
}

fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    signal(SignalKind::hangup())
        .map_err(
            |e| tracing::warn!(error = %e, "cannot install a SIGHUP handler; SIGHUP will stop the daemon"),
        )
        .ok()
}

/// On each SIGHUP, re-reads the tokens files of the TCP and E2B listeners.
async fn reload_on_hangup(
    hangup: Option<tokio::signal::unix::Signal>,
    stores: Vec<Arc<crate::tcp::TokenStore>>,
) {
    let Some(mut hangup) = hangup else { return };
    while hangup.recv().await.is_some() {
        if stores.is_empty() {
            tracing::info!("SIGHUP: no TCP or E2B listener, so no tokens file to reload; nothing to do");
        }
        for tokens in &stores {
            let tokens = tokens.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || tokens.reload_and_log()).await {
                tracing::warn!(error = %e, "SIGHUP: the reload task failed; the previous tokens stay in force");
            }
        }
    }
}

async fn reconcile_loop(app: Arc<App>) {
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let app = app.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || crate::reconcile::periodic(&app)).await {
            tracing::warn!(error = %e, "reconcile task failed");
        }
    }
}

async fn accept_loop(listener: &UnixListener, socket: &Path, app: Arc<App>) -> Result<(), DaemonError> {
    let router = crate::routes::router(app.clone());
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return Ok(()),
            },
        };
        let stream = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors or a connection reset before accept:
                // keep serving the others.
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(source) => return Err(DaemonError::Accept { path: socket.to_path_buf(), source }),
            },
        };
        let router = router.clone();
        let app = app.clone();
        tokio::spawn(async move {
            serve_connection(stream, router, app).await;
            drop(permit);
        });
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || [
            rustix::io::Errno::MFILE,
            rustix::io::Errno::NFILE,
            rustix::io::Errno::NOBUFS,
            rustix::io::Errno::NOMEM,
        ]
        .iter()
        .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()))
}

async fn serve_connection(stream: UnixStream, router: axum::Router, app: Arc<App>) {
    let peer = match stream.peer_cred() {
        Ok(cred) => Some(Peer { uid: cred.uid(), gid: cred.gid(), pid: cred.pid() }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the peer's credentials; refusing its requests");
            None
        }
    };
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let router = router.clone();
        let app = app.clone();
        async move {
            let response = match admit(peer, &app) {
                Ok(peer) => {
                    request.extensions_mut().insert(peer);
                    match router.oneshot(request.map(Body::new)).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    }
                }
                Err(e) => refusal(&e),
            };
            app.metrics.count_response(peer.map(|p| p.uid), response.status());
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(64 * 1024);
    // Upgrades: the interactive exec's `Upgrade: airlock-exec-stream` form.
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).with_upgrades().await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Who may use this daemon at all: anyone who can open the socket when the
/// daemon is root (tenancy then confines them to their own sandboxes); only
/// its own user (and root) when it is not, since every sandbox it starts runs
/// as that user.
pub(crate) fn admit(peer: Option<Peer>, app: &App) -> Result<Peer, ApiError> {
    let Some(peer) = peer else {
        return Err(ApiError::forbidden("the daemon could not identify the caller (SO_PEERCRED failed)"));
    };
    if app.daemon_uid != 0 && peer.uid != 0 && peer.uid != app.daemon_uid {
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, "denied: a rootless daemon serves only its own user");
        return Err(ApiError::forbidden(format!(
            "this airlock daemon runs as uid {} and serves only that user; start your own with `airlock daemon`",
            app.daemon_uid
        )));
    }
    Ok(peer)
}

pub(crate) fn refusal(e: &ApiError) -> Response<Body> {
    let mut response = Response::new(Body::from(e.body()));
    *response.status_mut() = e.status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::warn!("cannot install signal handlers; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down (sandboxes keep running)"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down (sandboxes keep running)"),
    }
}

/// The listening socket and the lock that makes it ours.
struct Bound {
    listener: UnixListener,
    _lock: std::fs::File,
}

/// Binds the socket: parent directory created 0755 (and refused if others
/// can write it), a lock beside the socket so two daemons never fight over
/// it, a stale socket replaced, and the new one 0660 (root, or with
/// `--group`) or 0600 (a user's daemon) before anyone can connect (the umask covers the moment between bind
/// and chmod).
fn bind(socket: &Path, gid: Option<u32>) -> Result<Bound, DaemonError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| DaemonError::Io { action, path, source }
    };
    let dir = socket.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        DirBuilder::new().recursive(true).mode(0o755).create(dir).map_err(io("create", dir))?;
    }
    let meta = std::fs::metadata(dir).map_err(io("inspect", dir))?;
    let mode = meta.permissions().mode() & 0o7777;
    // World-writable without the sticky bit: anyone could swap our socket.
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(DaemonError::InsecureDir { path: dir.to_path_buf(), mode });
    }

    let lock_path = lock_path(socket);
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc_o_nofollow())
        .open(&lock_path)
        .map_err(io("open", &lock_path))?;
    match flock(&lock, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            return Err(DaemonError::AlreadyRunning { socket: socket.to_path_buf(), lock: lock_path });
        }
        Err(e) => return Err(DaemonError::Io { action: "lock", path: lock_path, source: e.into() }),
    }

    match std::fs::symlink_metadata(socket) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            // Ours by the lock: whoever made it is gone.
            std::fs::remove_file(socket).map_err(io("remove stale socket", socket))?;
        }
        Ok(_) => return Err(DaemonError::NotASocket(socket.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(DaemonError::Io { action: "inspect", path: socket.to_path_buf(), source }),
    }

    let previous = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let listener = UnixListener::bind(socket);
    rustix::process::umask(previous);
    let listener = listener.map_err(io("bind", socket))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(socket, None, Some(gid)).map_err(io("chown", socket))?;
    }
    // Root's socket is root:root (or root:GROUP) 0660; a user's is theirs alone.
    let mode = if gid.is_some() || rustix::process::geteuid().is_root() { 0o660 } else { 0o600 };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", socket))?;
    Ok(Bound { listener, _lock: lock })
}

fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    socket.with_file_name(name)
}

fn libc_o_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// The state root holds the index and the sandboxes: private to the daemon's
/// user (the runtime widens it to 0711 as root when a sandbox needs that).
fn create_private_dir(path: &Path) -> Result<(), DaemonError> {
    DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(|source| DaemonError::Io {
        action: "create",
        path: path.to_path_buf(),
        source,
    })
}

/// A group for `--group`: a numeric gid, or a name from /etc/group.
fn resolve_group(group: &str) -> Result<u32, DaemonError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group").map_err(|source| DaemonError::Io {
        action: "read",
        path: "/etc/group".into(),
        source,
    })?;
    group_in(&text, group).ok_or_else(|| DaemonError::UnknownGroup(group.to_owned()))
}

fn group_in(etc_group: &str, name: &str) -> Option<u32> {
    etc_group.lines().find_map(|line| {
        let mut fields = line.split(':');
        let found = fields.next()?;
        let gid = fields.nth(1)?;
        (found == name).then(|| gid.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn socket_mode(path: &Path) -> std::io::Result<(u32, u32, u32)> {
        let m = std::fs::metadata(path)?;
        Ok((m.uid(), m.gid(), m.permissions().mode() & 0o7777))
    }

    #[test]
    fn default_socket_paths() {
        assert_eq!(socket_for(true, None).unwrap(), Path::new("/run/airlock/airlock.sock"));
        assert_eq!(
            socket_for(false, Some("/run/user/1000".into())).unwrap(),
            Path::new("/run/user/1000/airlock/airlock.sock")
        );
        assert!(socket_for(false, None).is_err());
        assert!(socket_for(false, Some("relative".into())).is_err());
    }

    #[test]
    fn groups_by_name_or_number() {
        let etc = "root:x:0:\nwheel:x:10:alice,bob\nbad-line\nairlock:x:997:\n";
        assert_eq!(group_in(etc, "wheel"), Some(10));
        assert_eq!(group_in(etc, "airlock"), Some(997));
        assert_eq!(group_in(etc, "nope"), None);
        assert_eq!(resolve_group("1234").unwrap(), 1234);
    }

    #[test]
    fn lock_sits_beside_the_socket() {
        assert_eq!(
            lock_path(Path::new("/run/airlock/airlock.sock")),
            Path::new("/run/airlock/airlock.sock.lock")
        );
    }

    #[tokio::test]
    async fn bind_secures_the_socket_and_refuses_a_second_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sub/airlock.sock");
        let bound = bind(&socket, None).unwrap();
        let (_, _, mode) = socket_mode(&socket).unwrap();
        assert_eq!(mode, if rustix::process::geteuid().is_root() { 0o660 } else { 0o600 });
        let parent = std::fs::metadata(dir.path().join("sub")).unwrap().permissions().mode() & 0o777;
        assert_eq!(parent, 0o755);
        let err = bind(&socket, None).err().unwrap();
        assert!(matches!(err, DaemonError::AlreadyRunning { .. }), "{err}");
        drop(bound);
        // A stale socket (no lock holder) is replaced.
        let bound = bind(&socket, Some(rustix::process::getgid().as_raw())).unwrap();
        assert_eq!(socket_mode(&socket).unwrap().2, 0o660);
        drop(bound);
        // Something that is not a socket is left alone.
        std::fs::remove_file(&socket).unwrap();
        std::fs::write(&socket, b"precious").unwrap();
        assert!(matches!(bind(&socket, None).err().unwrap(), DaemonError::NotASocket(_)));
        assert_eq!(std::fs::read(&socket).unwrap(), b"precious");
    }

    #[test]
    fn refuses_a_world_writable_socket_directory() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = bind(&open.join("s.sock"), None).err().unwrap();
        assert!(matches!(err, DaemonError::InsecureDir { .. }), "{err}");
    }
}
