//! airlock's resolver for a sandbox with transparent egress.
//!
//! Every DNS query the sandbox sends, over UDP or TCP, to any address, is
//! redirected inside its network namespace to the agent, which hands the
//! socket (or the stream) here. No query ever leaves: the answers are
//! airlock's own, so a query cannot carry data out.
//!
//! - A name the policy allows (an allow entry names it, on any port) gets
//!   an `A` record with an address from [`POOL`], a block private to the
//!   sandbox: one address per name, kept for the sandbox's life (the
//!   oldest is reused only after [`POOL_SIZE`] others). A transparent
//!   connection to such an address is then known to be for that name, and
//!   is decided and resolved on the host like a proxy connection to it.
//!   `AAAA` and every other type get an empty answer (the name exists,
//!   with no such record), so clients go on with the `A` record at once.
//! - Any other name (or an address, or something that is no host name)
//!   gets NXDOMAIN at once, and the refusal goes to the net log. (Silence
//!   would make every client wait out its timeouts and retries; REFUSED
//!   sends glibc on to the next server and ends in "temporary failure".)
//! - What is not a plain query (a response, another opcode, more than one
//!   question, records in the answer sections, anything over
//!   [`MAX_QUERY`]) is answered with FORMERR or NOTIMP when its header can
//!   be read, and not at all otherwise.
//!
//! Parsing uses `simple-dns`, after the header's counts are checked so
//! that no count a sandbox writes sizes an allocation.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use simple_dns::rdata::{A, RData};
use simple_dns::{CLASS, Packet, PacketFlag, QCLASS, QTYPE, RCODE, ResourceRecord, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::event::{Handling, NetEvent};
use crate::proxy::{EventBuilder, Port, Shared};
use crate::rules::{Decision, NetRules};

/// The sandbox's mapped addresses: 198.18.0.0/16, part of the benchmarking
/// block 198.18.0.0/15 that no one routes, so an address from it names
/// nothing outside; the proxy refuses it as a literal destination anyway
/// (reserved space) unless it was handed out for a name.
pub const POOL: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 16);
/// Addresses in the pool (198.18.0.1 to 198.18.255.254).
pub const POOL_SIZE: u32 = (1 << 16) - 2;
/// The largest query read; a DNS name is at most 255 bytes, so a real
/// query with an EDNS record is far below this.
pub const MAX_QUERY: usize = 1024;
/// How long a client may keep an answer: the mapping outlives it.
const TTL: u32 = 60;
/// How long a DNS stream may stay idle.
const STREAM_IDLE: Duration = Duration::from_secs(10);

/// The names airlock's resolver gave addresses for, both ways.
#[derive(Debug)]
pub struct NamePool {
    by_name: HashMap<String, Ipv4Addr>,
    by_address: HashMap<Ipv4Addr, String>,
    /// Oldest first: the address reused when the pool is full.
    order: VecDeque<Ipv4Addr>,
    capacity: u32,
}

/// What an address a sandbox connected to stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    /// The resolver gave it out for this name.
    Name(String),
    /// In the pool, but given to no name (now): nothing may be reached there.
    Unassigned,
    /// Not a pool address: the sandbox connected to a literal address.
    Outside,
}

impl Default for NamePool {
    fn default() -> Self {
        NamePool::new()
    }
}

impl NamePool {
    pub fn new() -> NamePool {
        NamePool::with_capacity(POOL_SIZE)
    }

    /// A pool of at most `capacity` addresses (tests use small ones).
    pub fn with_capacity(capacity: u32) -> NamePool {
        NamePool {
            by_name: HashMap::new(),
            by_address: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.clamp(1, POOL_SIZE),
        }
    }

    /// The address of `name` (normalized), and whether it was given out
    /// just now.
    pub fn address_for(&mut self, name: &str) -> (Ipv4Addr, bool) {
        if let Some(ip) = self.by_name.get(name) {
            return (*ip, false);
        }
        let used = u32::try_from(self.order.len()).unwrap_or(u32::MAX);
        let ip = if used < self.capacity {
            Ipv4Addr::from(u32::from(POOL.0) + used + 1)
        } else {
            // Full: the oldest name loses its address. A connection to it
            // from now on is decided as the new name's (whose TLS name and
            // Host the proxy checks), never as the old one's.
            match self.order.pop_front() {
                Some(oldest) => {
                    if let Some(old_name) = self.by_address.remove(&oldest) {
                        self.by_name.remove(&old_name);
                    }
                    oldest
                }
                None => Ipv4Addr::from(u32::from(POOL.0) + 1),
            }
        };
        self.by_name.insert(name.to_string(), ip);
        self.by_address.insert(ip, name.to_string());
        self.order.push_back(ip);
        (ip, true)
    }

    pub fn lookup(&self, ip: IpAddr) -> Mapped {
        let IpAddr::V4(v4) = ip.to_canonical() else { return Mapped::Outside };
        if !in_pool(v4) {
            return Mapped::Outside;
        }
        match self.by_address.get(&v4) {
            Some(name) => Mapped::Name(name.clone()),
            None => Mapped::Unassigned,
        }
    }
}

fn in_pool(ip: Ipv4Addr) -> bool {
    let mask = u32::MAX << (32 - u32::from(POOL.1));
    u32::from(ip) & mask == u32::from(POOL.0)
}

/// What one query came to, for the net log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub name: String,
    pub allowed: bool,
    /// The allow entry, or why the name was refused.
    pub rule: String,
    /// The address given out, when it was given out by this query.
    pub mapped: Option<Ipv4Addr>,
}

/// An answer (or none) and what to record.
#[derive(Debug, Default)]
pub struct Response {
    pub reply: Option<Vec<u8>>,
    pub note: Option<Note>,
}

const HEADER: usize = 12;

/// Answers one query (the bytes of a DNS message) under `rules`, giving
/// addresses from `pool`.
pub fn respond(rules: &NetRules, pool: &Mutex<NamePool>, query: &[u8]) -> Response {
    let Some(header) = query.get(..HEADER) else { return Response::default() };
    let id = u16::from_be_bytes([header[0], header[1]]);
    let flags = u16::from_be_bytes([header[2], header[3]]);
    let count = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
    if flags & 0x8000 != 0 {
        // A response: answering it could start a loop between resolvers.
        return Response::default();
    }
    let recursion_desired = flags & 0x0100 != 0;
    let error = |rcode: RCODE| Response { reply: error_reply(id, rcode, recursion_desired), note: None };
    if (flags >> 11) & 0xf != 0 {
        return error(RCODE::NotImplemented);
    }
    // One question, no answers or authority, at most the EDNS record.
    if query.len() > MAX_QUERY || count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
        return error(RCODE::FormatError);
    }
    let Ok(packet) = Packet::parse(query) else { return error(RCODE::FormatError) };
    let Some(question) = packet.questions.first() else { return error(RCODE::FormatError) };
    if !matches!(question.qclass, QCLASS::CLASS(CLASS::IN)) {
        return error(RCODE::NotImplemented);
    }
    let name = name_text(&question.qname);
    let decision = if is_plain_name(&name) {
        rules.decide_name(&name)
    } else {
        Decision::Deny { reason: format!("{name:?} is not a host name") }
    };
    let mut reply = Packet::new_reply(id);
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER | PacketFlag::RECURSION_AVAILABLE);
    if recursion_desired {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    reply.questions.push(question.clone());
    let note = match decision {
        Decision::Deny { reason } => {
            *reply.rcode_mut() = RCODE::NameError;
            Note { name, allowed: false, rule: reason, mapped: None }
        }
        Decision::Allow { rule } => {
            let mut mapped = None;
            if question.qtype == QTYPE::TYPE(TYPE::A) {
                let (ip, new) = match pool.lock() {
                    Ok(mut pool) => pool.address_for(&name),
                    Err(poisoned) => poisoned.into_inner().address_for(&name),
                };
                reply.answers.push(ResourceRecord::new(
                    question.qname.clone(),
                    CLASS::IN,
                    TTL,
                    RData::A(A { address: u32::from(ip) }),
                ));
                mapped = new.then_some(ip);
            }
            Note { name, allowed: true, rule, mapped }
        }
    };
    Response { reply: reply.build_bytes_vec().ok(), note: Some(note) }
}

/// A header-only answer with `rcode` (no question echoed: the query could
/// not be read as one).
fn error_reply(id: u16, rcode: RCODE, recursion_desired: bool) -> Option<Vec<u8>> {
    let mut reply = Packet::new_reply(id);
    reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
    if recursion_desired {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    *reply.rcode_mut() = rcode;
    if let Ok(mut bytes) = reply.build_bytes_vec() {
        // simple-dns writes the opcode of a standard query; keep it so.
        if let Some(b) = bytes.get_mut(2) {
            *b &= !0x78;
        }
        return Some(bytes);
    }
    None
}

/// The queried name as text: labels joined by dots, lowercase; bytes a
/// host name never has are kept as `\xNN` so the log shows what was asked.
fn name_text(name: &simple_dns::Name<'_>) -> String {
    let mut out = String::new();
    for label in name.as_bytes() {
        if !out.is_empty() {
            out.push('.');
        }
        for &b in label {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                out.push(char::from(b.to_ascii_lowercase()));
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    out
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('\\')
}

/// Records what a query came to: every refusal, and each name the first
/// time it is given an address.
fn record(shared: &Shared, note: Note) {
    if note.allowed && note.mapped.is_none() {
        return;
    }
    let ev = EventBuilder::new(Port::Dns, &note.name, 53);
    let handling = if note.allowed { Handling::Answered } else { Handling::Refused };
    let mut event: NetEvent = ev.event(note.allowed, &note.rule, handling);
    event.address = note.mapped.map(|ip| ip.to_string());
    shared.sink.record(event);
}

/// Answers the datagrams arriving on the resolver's UDP socket (bound
/// inside the sandbox) until it fails for good.
pub(crate) async fn serve_datagrams(shared: Arc<Shared>, socket: UdpSocket) {
    let mut buf = vec![0u8; MAX_QUERY + 1];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            // An ICMP error for an earlier answer, or a signal: go on.
            Err(e) if matches!(e.raw_os_error(), Some(libc_errno::ECONNREFUSED | libc_errno::EINTR)) => {
                continue;
            }
            Err(e) => {
                tracing::debug!("the resolver's socket failed: {e}");
                return;
            }
        };
        let response = respond(&shared.rules, &shared.names, &buf[..n]);
        if let Some(note) = response.note {
            record(&shared, note);
        }
        if let Some(reply) = response.reply {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

/// Answers queries on a stream in RFC 1035 §4.2.2 framing (two-byte
/// length, then the message), one after another, until the client closes,
/// idles past [`STREAM_IDLE`], or sends something unanswerable.
pub(crate) async fn serve_stream(shared: Arc<Shared>, mut stream: TcpStream) {
    let mut buf = vec![0u8; MAX_QUERY];
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(STREAM_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len == 0 || len > MAX_QUERY {
            return;
        }
        match tokio::time::timeout(STREAM_IDLE, stream.read_exact(&mut buf[..len])).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let response = respond(&shared.rules, &shared.names, &buf[..len]);
        if let Some(note) = response.note {
            record(&shared, note);
        }
        let Some(reply) = response.reply else { return };
        let Ok(reply_len) = u16::try_from(reply.len()) else { return };
        let framed = [reply_len.to_be_bytes().as_slice(), &reply].concat();
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// The two errno values the datagram loop tells apart (Linux numbers;
/// the egress crate has no libc of its own).
mod libc_errno {
    pub const EINTR: i32 = 4;
    pub const ECONNREFUSED: i32 = 111;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use airlock_policy::Policy;
    use simple_dns::{Name, Question};

    use super::*;

    fn rules() -> NetRules {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "extends = \"dev\"\n[network]\nallow = [\"api.example.com\", \"*.example.org:443\", \"203.0.113.9:22\"]\n\
             deny = [\"uploads.example.org\"]\n",
        )
        .unwrap();
        NetRules::from_policy(&Policy::load_file(Path::new(&path)).unwrap())
    }

    fn query(id: u16, name: &str, qtype: TYPE) -> Vec<u8> {
        let mut packet = Packet::new_query(id);
        packet.set_flags(PacketFlag::RECURSION_DESIRED);
        packet.questions.push(Question::new(
            Name::new_unchecked(name),
            qtype.into(),
            CLASS::IN.into(),
            false,
        ));
        packet.build_bytes_vec().unwrap()
    }

    fn ask(pool: &Mutex<NamePool>, bytes: &[u8]) -> (Packet<'static>, Option<Note>) {
        let response = respond(&rules(), pool, bytes);
        let reply = response.reply.expect("an answer");
        let leaked: &'static [u8] = Box::leak(reply.into_boxed_slice());
        (Packet::parse(leaked).unwrap(), response.note)
    }

    fn address(packet: &Packet<'_>) -> Option<Ipv4Addr> {
        packet.answers.iter().find_map(|rr| match &rr.rdata {
            RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
    }

    #[test]
    fn an_allowed_name_gets_one_mapped_address_for_good() {
        let pool = Mutex::new(NamePool::new());
        let (reply, note) = ask(&pool, &query(7, "api.example.com", TYPE::A));
        assert_eq!(reply.id(), 7);
        assert_eq!(reply.rcode(), RCODE::NoError);
        assert!(reply.has_flags(PacketFlag::RESPONSE | PacketFlag::RECURSION_DESIRED));
        let ip = address(&reply).unwrap();
        assert_eq!(ip, Ipv4Addr::new(198, 18, 0, 1));
        let note = note.unwrap();
        assert!(note.allowed && note.mapped == Some(ip), "{note:?}");
        assert_eq!(note.rule, "allow \"api.example.com\"");
        // Asked again (any case): the same address, not news.
        let (again, note) = ask(&pool, &query(8, "API.Example.COM", TYPE::A));
        assert_eq!(address(&again), Some(ip));
        assert_eq!(note.unwrap().mapped, None);
        // A wildcard entry with a port names the name too.
        let (other, _) = ask(&pool, &query(9, "a.example.org", TYPE::A));
        assert_eq!(address(&other), Some(Ipv4Addr::new(198, 18, 0, 2)));
        let pool = pool.lock().unwrap();
        assert_eq!(pool.lookup(ip.into()), Mapped::Name("api.example.com".into()));
        assert_eq!(pool.lookup("198.18.7.7".parse().unwrap()), Mapped::Unassigned);
        assert_eq!(pool.lookup("203.0.113.9".parse().unwrap()), Mapped::Outside);
        assert_eq!(pool.lookup("::ffff:198.18.0.1".parse().unwrap()), Mapped::Name("api.example.com".into()));
    }

    #[test]
    fn other_types_of_an_allowed_name_get_an_empty_answer() {
        let pool = Mutex::new(NamePool::new());
        for qtype in [TYPE::AAAA, TYPE::TXT, TYPE::MX, TYPE::CNAME] {
            let (reply, note) = ask(&pool, &query(1, "api.example.com", qtype));
            assert_eq!(reply.rcode(), RCODE::NoError);
            assert!(reply.answers.is_empty());
            assert!(note.unwrap().allowed);
        }
        assert!(pool.lock().unwrap().by_name.is_empty(), "only A gives out an address");
    }

    #[test]
    fn any_other_name_gets_nxdomain_and_a_note() {
        let pool = Mutex::new(NamePool::new());
        for (name, why) in [
            ("elsewhere.example.net", "no allow entry names elsewhere.example.net"),
            ("uploads.example.org", "deny \"uploads.example.org\""),
            ("example.org", "no allow entry names example.org"),
            ("9.113.0.203.in-addr.arpa", "no allow entry names"),
            ("203.0.113.9", "is an address, not a name"),
        ] {
            for qtype in [TYPE::A, TYPE::AAAA, TYPE::TXT] {
                let (reply, note) = ask(&pool, &query(3, name, qtype));
                assert_eq!(reply.rcode(), RCODE::NameError, "{name}");
                assert!(reply.answers.is_empty());
                let note = note.unwrap();
                assert!(!note.allowed && note.rule.contains(why), "{name}: {note:?}");
            }
        }
        assert!(pool.lock().unwrap().by_name.is_empty());
    }

    #[test]
    fn a_name_no_host_has_is_refused_and_shown_escaped() {
        let pool = Mutex::new(NamePool::new());
        let mut bytes = query(5, "api.example.com", TYPE::A);
        // "api" becomes "a\0i".
        bytes[HEADER + 2] = 0;
        let (reply, note) = ask(&pool, &bytes);
        assert_eq!(reply.rcode(), RCODE::NameError);
        let note = note.unwrap();
        assert_eq!(note.name, "a\\x00i.example.com");
        assert!(!note.allowed);
    }

    #[test]
    fn what_is_not_a_plain_query_gets_an_error_or_nothing() {
        let pool = Mutex::new(NamePool::new());
        let good = query(0x1234, "api.example.com", TYPE::A);
        let rcode = |bytes: &[u8]| {
            let response = respond(&rules(), &pool, bytes);
            assert!(response.note.is_none());
            response.reply.map(|r| {
                assert_eq!(&r[..2], &[0x12, 0x34]);
                RCODE::from(u16::from(r[3] & 0xf))
            })
        };
        // A response is never answered.
        let mut response = good.clone();
        response[2] |= 0x80;
        assert_eq!(rcode(&response), None);
        // Another opcode (here NOTIFY).
        let mut notify = good.clone();
        notify[2] |= 4 << 3;
        assert_eq!(rcode(&notify), Some(RCODE::NotImplemented));
        // Two questions, or answer records, or too long.
        for (at, value) in [(5, 2u8), (5, 0), (7, 1), (9, 1), (11, 2)] {
            let mut bad = good.clone();
            bad[at] = value;
            assert_eq!(rcode(&bad), Some(RCODE::FormatError), "count at {at} = {value}");
        }
        let mut long = good.clone();
        long.resize(MAX_QUERY + 1, 0);
        assert_eq!(rcode(&long), Some(RCODE::FormatError));
        // Cut short, or a header alone.
        assert_eq!(rcode(&good[..good.len() - 3]), Some(RCODE::FormatError));
        assert_eq!(rcode(&good[..HEADER]), Some(RCODE::FormatError));
        assert_eq!(respond(&rules(), &pool, &good[..5]).reply, None);
        // Class CHAOS.
        let mut chaos = good.clone();
        let at = chaos.len() - 1;
        chaos[at] = 3;
        assert_eq!(rcode(&chaos), Some(RCODE::NotImplemented));
    }

    /// A name that points at itself (compression loop) and random bytes:
    /// no panic, no hang, never an address.
    #[test]
    fn hostile_bytes_never_panic_or_map() {
        let pool = Mutex::new(NamePool::new());
        let mut looped = query(1, "a", TYPE::A)[..HEADER].to_vec();
        looped.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        let response = respond(&rules(), &pool, &looped);
        assert!(response.note.is_none_or(|n| !n.allowed));
        // A deterministic generator: the test is the same every run.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let good = query(2, "api.example.com", TYPE::A);
        for round in 0..20_000 {
            let mut bytes = if round % 2 == 0 {
                let len = (next() % 80) as usize;
                (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                // A real query with a few bytes changed.
                let mut b = good.clone();
                for _ in 0..(next() % 4 + 1) {
                    let at = (next() as usize) % b.len();
                    b[at] = next() as u8;
                }
                b
            };
            if round % 7 == 0 {
                bytes.truncate((next() as usize) % (bytes.len() + 1));
            }
            let response = respond(&rules(), &pool, &bytes);
            if let Some(reply) = &response.reply {
                assert!(reply.len() <= 512, "{} bytes", reply.len());
            }
            if let Some(Note { allowed: true, name, .. }) = &response.note {
                assert_eq!(name, "api.example.com");
            }
        }
        let pool = pool.lock().unwrap();
        assert!(pool.by_name.keys().all(|n| n == "api.example.com"), "{:?}", pool.by_name);
    }

    #[test]
    fn a_full_pool_reuses_its_oldest_address() {
        let mut pool = NamePool::with_capacity(2);
        let (a, _) = pool.address_for("a.example.com");
        let (b, _) = pool.address_for("b.example.com");
        let (c, new) = pool.address_for("c.example.com");
        assert!(new);
        assert_eq!(c, a);
        assert_eq!(pool.lookup(a.into()), Mapped::Name("c.example.com".into()));
        assert_eq!(pool.lookup(b.into()), Mapped::Name("b.example.com".into()));
        assert!(!pool.by_name.contains_key("a.example.com"));
        // The full pool's last address is 198.18.255.254.
        let mut full = NamePool::new();
        let mut last = Ipv4Addr::UNSPECIFIED;
        for i in 0..POOL_SIZE {
            last = full.address_for(&format!("n{i}.example.com")).0;
        }
        assert_eq!(last, Ipv4Addr::new(198, 18, 255, 254));
    }
}
