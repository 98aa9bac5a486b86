//! Many TCP connections over one virtio-serial port, both ends the same
//! code: the guest opens connections (one per connection accepted on its
//! proxy ports, or redirected to its transparent and DNS listeners, or per
//! DNS datagram), each open saying what it is; the host accepts them (one
//! socket pair each, handed to the egress proxy with that meaning).
//!
//! Each connection has its own window: a sender may have at most
//! [`Limits::window`] bytes of a connection that the receiver has not yet
//! written to its socket, and the receiver grants more as it writes. So a
//! connection whose reader is slow (or never reads) fills only its own
//! window and stops, while the others go on; and the receiver never holds
//! more than a window per connection. What one end sends but the port has
//! not yet taken is bounded too ([`Limits::outbox_bytes`]), as is the number
//! of connections ([`Limits::max_conns`]). A peer that breaks the rules
//! (more than its window, an id it may not use) gets that connection reset;
//! a frame that cannot be decoded ends the port.
//!
//! A connection ended abnormally — a reset from the other end, a socket
//! error, the port gone — is aborted: a TCP socket (the guest's clients)
//! with a reset, so a program inside fails at once with ECONNRESET as it
//! would in the process tier. On the host, a proxy that closes its end
//! whole without having sent a byte (what a refusal looks like over a
//! socket pair, which carries no reset) resets the guest's connection.
//!
//! Threads: one reads the port, one writes it, and two per connection (its
//! socket to the port, the port to its socket), all waiting on conditions
//! of one lock, never on the port while holding it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use airlock_proto::handover::HandOver;

use super::frame::{Frame, MAX_DATA};

/// The bounds of one port.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; more are refused.
    pub max_conns: usize,
    /// Bytes of one connection in flight, not yet written to its socket.
    pub window: u32,
    /// Bytes of data queued for the port and not yet written to it.
    pub outbox_bytes: usize,
}

/// The bounds both ends use: at most 8 MiB of the host's memory for a
/// guest's connections' windows, and 1 MiB queued for the port.
pub const LIMITS: Limits = Limits { max_conns: 128, window: 64 * 1024, outbox_bytes: 1024 * 1024 };

/// Makes the host's end of a new connection (host side only): given what
/// the guest says it is, a socket whose peer the egress proxy now holds.
pub type Opener = Box<dyn Fn(HandOver) -> io::Result<OwnedFd> + Send>;

/// Relay threads move bytes only; they need little stack.
const CONN_STACK: usize = 128 * 1024;

/// One end of a port.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// The port writer waits here.
    port_wake: Condvar,
    /// The port reader waits here while the control queue is full.
    control_room: Condvar,
    limits: Limits,
    /// This end accepts connections (the host's): its sockets' peers are
    /// the egress proxy's.
    host: bool,
}

/// Control frames (opens, resets) queued for the port at most: a peer that
/// sends opens but reads nothing makes this end stop reading it, rather
/// than queue a refusal for each.
fn control_cap(limits: &Limits) -> usize {
    4 * limits.max_conns + 64
}

#[derive(Default)]
struct State {
    conns: HashMap<u32, Conn>,
    /// Open, Reset: before anything else.
    control: VecDeque<Frame>,
    /// Data and Eof, in the order each connection produced them.
    stream: VecDeque<Frame>,
    stream_bytes: usize,
    /// Credit to grant, per connection (coalesced).
    credits: BTreeMap<u32, u32>,
    closed: bool,
    /// Guest: the id of the next connection. Host: the lowest id a new
    /// connection may have (ids are never reused, so a late frame of an
    /// old connection can never reach a new one).
    next_id: u64,
    /// Connections refused for the cap, for tests and logs.
    refused: u64,
}

struct Conn {
    socket: Arc<OwnedFd>,
    wake: Arc<Condvar>,
    /// Bytes this end may still send.
    credit: u32,
    /// Received, not yet written to the socket.
    inbox: VecDeque<Vec<u8>>,
    inbox_bytes: usize,
    peer_eof: bool,
    halves_done: u8,
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn wait<'a>(condvar: &Condvar, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
    condvar.wait(guard).unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why a connection was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the egress port is closed")]
    Closed,
    #[error("{0} egress connections are open already")]
    TooMany(usize),
    #[error("cannot start a relay thread: {0}")]
    Thread(io::Error),
}

impl Mux {
    /// Serves `port` from now on; `opener` on the host, `None` in the guest.
    pub fn start(port: OwnedFd, limits: Limits, opener: Option<Opener>) -> io::Result<Mux> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { next_id: 1, ..State::default() }),
            port_wake: Condvar::new(),
            control_room: Condvar::new(),
            limits,
            host: opener.is_some(),
        });
        let reader = File::from(port);
        let writer = reader.try_clone()?;
        let for_writer = shared.clone();
        std::thread::Builder::new()
            .name("egress-port-out".into())
            .spawn(move || port_writer(&for_writer, writer))?;
        let for_reader = shared.clone();
        std::thread::Builder::new()
            .name("egress-port-in".into())
            .spawn(move || port_reader(&for_reader, reader, opener))?;
        Ok(Mux { shared })
    }

    /// Guest side: relays `socket` (a connection that is what `to` says)
    /// to the host. A connection refused is aborted (a TCP client is reset).
    pub fn connect(&self, to: HandOver, socket: OwnedFd) -> Result<(), Refused> {
        let shared = &self.shared;
        let mut st = lock(shared);
        if st.closed {
            abort(&socket);
            return Err(Refused::Closed);
        }
        if st.conns.len() >= shared.limits.max_conns {
            st.refused += 1;
            abort(&socket);
            return Err(Refused::TooMany(st.conns.len()));
        }
        let Ok(id) = u32::try_from(st.next_id) else {
            abort(&socket);
            return Err(Refused::Closed);
        };
        st.next_id += 1;
        st.control.push_back(Frame::Open { id, to });
        shared.port_wake.notify_all();
        register(shared, &mut st, id, socket).map_err(Refused::Thread)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        lock(&self.shared).conns.len()
    }

    /// Connections refused for the cap so far.
    pub fn refused(&self) -> u64 {
        lock(&self.shared).refused
    }

    /// Whether the port has ended.
    pub fn is_closed(&self) -> bool {
        lock(&self.shared).closed
    }

    /// Bytes held for the port and in the connections' inboxes.
    pub fn buffered_bytes(&self) -> usize {
        let st = lock(&self.shared);
        st.stream_bytes + st.conns.values().map(|c| c.inbox_bytes).sum::<usize>()
    }

    /// Control frames queued for the port.
    pub fn queued_control(&self) -> usize {
        lock(&self.shared).control.len()
    }
}

/// Adds connection `id` and starts its two relay threads.
fn register(shared: &Arc<Shared>, st: &mut State, id: u32, socket: OwnedFd) -> io::Result<()> {
    let socket = Arc::new(socket);
    let wake = Arc::new(Condvar::new());
    st.conns.insert(
        id,
        Conn {
            socket: socket.clone(),
            wake: wake.clone(),
            credit: shared.limits.window,
            inbox: VecDeque::new(),
            inbox_bytes: 0,
            peer_eof: false,
            halves_done: 0,
        },
    );
    let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new().name(name.into()).stack_size(CONN_STACK).spawn(body)
    };
    let (s, k, w) = (shared.clone(), socket.clone(), wake.clone());
    let started = spawn("egress-conn-out", Box::new(move || socket_to_port(&s, id, &k, &w))).and_then(|_| {
        let s = shared.clone();
        spawn("egress-conn-in", Box::new(move || port_to_socket(&s, id, &socket, &wake)))
    });
    if let Err(e) = started {
        reset_local(shared, st, id);
        return Err(e);
    }
    Ok(())
}

/// Ends connection `id` from this side: tells the peer, wakes its threads.
fn reset_local(shared: &Shared, st: &mut State, id: u32) {
    if forget(st, id) {
        st.control.push_back(Frame::Reset { id });
        shared.port_wake.notify_all();
    }
}

/// Removes connection `id`; its socket is aborted so that a thread
/// blocked on it returns. Whether it was there.
fn forget(st: &mut State, id: u32) -> bool {
    st.credits.remove(&id);
    match st.conns.remove(&id) {
        Some(conn) => {
            abort(&conn.socket);
            conn.wake.notify_all();
            true
        }
        None => false,
    }
}

/// Ends a connection's socket both ways at once. A TCP socket is
/// disconnected (`connect` to AF_UNSPEC), which sends its peer a reset and
/// wakes every thread blocked on it with an error; a socket pair has no
/// reset and is shut down.
fn abort(socket: &OwnedFd) {
    if rustix::net::connect_unspec(socket).is_err() {
        let _ = rustix::net::shutdown(socket, rustix::net::Shutdown::Both);
    }
}

/// Whether the peer of a socket pair's end has closed it both ways (not
/// only shut its writing down): poll says HUP once both directions are
/// shut.
fn closed_both_ways(socket: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(socket, rustix::event::PollFlags::IN)];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    rustix::event::poll(&mut fds, Some(&zero)).is_ok()
        && fds[0].revents().contains(rustix::event::PollFlags::HUP)
}

/// One of the connection's two directions is done; both: it is gone.
fn half_done(st: &mut State, id: u32) {
    if let Some(conn) = st.conns.get_mut(&id) {
        conn.halves_done += 1;
        if conn.halves_done >= 2 {
            st.conns.remove(&id);
            st.credits.remove(&id);
        }
    }
}

fn close(shared: &Shared) {
    let mut st = lock(shared);
    st.closed = true;
    shared.control_room.notify_all();
    let ids: Vec<u32> = st.conns.keys().copied().collect();
    for id in ids {
        forget(&mut st, id);
    }
    shared.port_wake.notify_all();
}

fn port_writer(shared: &Arc<Shared>, mut port: File) {
    loop {
        let frame = {
            let mut st = lock(shared);
            loop {
                if let Some(frame) = st.control.pop_front() {
                    shared.control_room.notify_all();
                    break frame;
                }
                if let Some((id, credit)) = st.credits.pop_first() {
                    break Frame::Window { id, credit };
                }
                if let Some(frame) = st.stream.pop_front() {
                    if let Frame::Data { data, .. } = &frame {
                        let was_full = st.stream_bytes >= shared.limits.outbox_bytes;
                        st.stream_bytes -= data.len();
                        if was_full {
                            // Readers waiting for room in the outbox.
                            for conn in st.conns.values() {
                                conn.wake.notify_all();
                            }
                        }
                    }
                    break frame;
                }
                if st.closed {
                    return;
                }
                st = wait(&shared.port_wake, st);
            }
        };
        if frame.write_to(&mut port).is_err() {
            close(shared);
            return;
        }
    }
}

fn port_reader(shared: &Arc<Shared>, mut port: File, opener: Option<Opener>) {
    loop {
        {
            // Backpressure: the peer is not reading what it asked for.
            let mut st = lock(shared);
            while st.control.len() >= control_cap(&shared.limits) && !st.closed {
                st = wait(&shared.control_room, st);
            }
            if st.closed {
                break;
            }
        }
        let frame = match Frame::read_from(&mut port) {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("{e}; the egress port is closed");
                break;
            }
        };
        match frame {
            // The host never opens a connection into the guest (no opener there).
            Frame::Open { id, to } => {
                if let Some(open) = &opener {
                    accept(shared, id, to, open);
                }
            }
            Frame::Data { id, data } => {
                let mut st = lock(shared);
                let window = shared.limits.window as usize;
                match st.conns.get_mut(&id) {
                    Some(conn) if !conn.peer_eof && conn.inbox_bytes + data.len() <= window => {
                        conn.inbox_bytes += data.len();
                        conn.inbox.push_back(data);
                        conn.wake.notify_all();
                    }
                    // Past its window or its end: the peer broke the rules.
                    Some(_) => reset_local(shared, &mut st, id),
                    // A connection reset meanwhile: its late bytes go nowhere.
                    None => {}
                }
            }
            Frame::Window { id, credit } => {
                let mut st = lock(shared);
                let window = shared.limits.window;
                if let Some(conn) = st.conns.get_mut(&id) {
                    // Never more than a window: a peer granting more would
                    // make this end queue more than it promised to.
                    conn.credit = conn.credit.saturating_add(credit).min(window);
                    conn.wake.notify_all();
                }
            }
            Frame::Eof { id } => {
                let mut st = lock(shared);
                if let Some(conn) = st.conns.get_mut(&id) {
                    conn.peer_eof = true;
                    conn.wake.notify_all();
                }
            }
            Frame::Reset { id } => {
                forget(&mut lock(shared), id);
            }
            // The trust bundle comes only before the port is multiplexed.
            Frame::Bundle { .. } | Frame::BundleEnd => {}
        }
    }
    close(shared);
}

/// Host side: a new connection from the guest, within the cap and with a
/// fresh id, gets a socket whose peer the egress proxy holds.
fn accept(shared: &Arc<Shared>, id: u32, to: HandOver, open: &Opener) {
    {
        let mut st = lock(shared);
        if st.closed {
            return;
        }
        if u64::from(id) < st.next_id || st.conns.len() >= shared.limits.max_conns {
            if u64::from(id) >= st.next_id {
                st.next_id = u64::from(id) + 1;
                st.refused += 1;
            }
            st.control.push_back(Frame::Reset { id });
            shared.port_wake.notify_all();
            return;
        }
        st.next_id = u64::from(id) + 1;
    }
    // Outside the lock: handing the socket over may wait for the proxy.
    let opened = open(to);
    let mut st = lock(shared);
    match opened {
        Ok(socket) if !st.closed => {
            if let Err(e) = register(shared, &mut st, id, socket) {
                tracing::warn!("egress connection from the guest refused: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!("egress connection from the guest refused: {e}");
            st.control.push_back(Frame::Reset { id });
            shared.port_wake.notify_all();
        }
    }
}

/// The connection's socket to the port, within its credit and the
/// outbox's room.
fn socket_to_port(shared: &Arc<Shared>, id: u32, socket: &OwnedFd, wake: &Condvar) {
    let mut buf = vec![0u8; MAX_DATA];
    let mut sent_any = false;
    loop {
        let want = {
            let mut st = lock(shared);
            loop {
                let Some(conn) = st.conns.get(&id) else { return };
                if conn.credit > 0 && st.stream_bytes < shared.limits.outbox_bytes {
                    break (conn.credit as usize).min(MAX_DATA);
                }
                st = wait(wake, st);
            }
        };
        let read = loop {
            match rustix::io::read(socket, &mut buf[..want]) {
                Err(rustix::io::Errno::INTR) => continue,
                other => break other,
            }
        };
        let mut st = lock(shared);
        if !st.conns.contains_key(&id) {
            return;
        }
        match read {
            Ok(0) => {
                // The proxy refused it (closed its end whole, unanswered,
                // while the guest's program still had its say): a reset.
                let guest_done = st.conns.get(&id).is_some_and(|c| c.peer_eof);
                if shared.host && !sent_any && !guest_done && closed_both_ways(socket) {
                    reset_local(shared, &mut st, id);
                    return;
                }
                st.stream.push_back(Frame::Eof { id });
                shared.port_wake.notify_all();
                half_done(&mut st, id);
                return;
            }
            Ok(n) => {
                sent_any = true;
                if let Some(conn) = st.conns.get_mut(&id) {
                    conn.credit -= n as u32;
                }
                st.stream_bytes += n;
                st.stream.push_back(Frame::Data { id, data: buf[..n].to_vec() });
                shared.port_wake.notify_all();
            }
            Err(_) => {
                reset_local(shared, &mut st, id);
                return;
            }
        }
    }
}

/// The port to the connection's socket; credit goes back as bytes are
/// written.
fn port_to_socket(shared: &Arc<Shared>, id: u32, socket: &OwnedFd, wake: &Condvar) {
    loop {
        let chunk = {
            let mut st = lock(shared);
            loop {
                let Some(conn) = st.conns.get_mut(&id) else { return };
                if let Some(chunk) = conn.inbox.pop_front() {
                    break Some(chunk);
                }
                if conn.peer_eof {
                    break None;
                }
                st = wait(wake, st);
            }
        };
        let Some(chunk) = chunk else {
            let _ = rustix::net::shutdown(socket, rustix::net::Shutdown::Write);
            half_done(&mut lock(shared), id);
            return;
        };
        let written = write_all(socket, &chunk);
        let mut st = lock(shared);
        if written.is_err() {
            reset_local(shared, &mut st, id);
            return;
        }
        let Some(conn) = st.conns.get_mut(&id) else { return };
        conn.inbox_bytes -= chunk.len();
        *st.credits.entry(id).or_default() += chunk.len() as u32;
        shared.port_wake.notify_all();
    }
}

fn write_all(socket: &OwnedFd, mut data: &[u8]) -> rustix::io::Result<()> {
    while !data.is_empty() {
        // No SIGPIPE for a peer that is gone: an error for this connection.
        match rustix::net::send(socket, data, rustix::net::SendFlags::NOSIGNAL) {
            Ok(0) => return Err(rustix::io::Errno::PIPE),
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
