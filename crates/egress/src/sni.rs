//! Reading the server name (SNI) from a TLS ClientHello without terminating
//! TLS.
//!
//! A tunnelled CONNECT is relayed untouched, but the proxy first looks at the
//! client's opening bytes: a ClientHello naming a different server than the
//! CONNECT host is domain fronting and is refused. Everything here parses
//! bytes chosen by the sandbox, so it is bounded, allocation-light and never
//! panics; anything that is not a well-formed ClientHello is
//! [`ClientHelloPeek::NotTls`].

/// The most input examined. A ClientHello (with its record headers) that has
/// not completed within this many bytes is given up on as
/// [`ClientHelloPeek::NotTls`]; callers buffer at most this much.
pub const MAX_PEEK: usize = 16 * 1024;

/// TLS record content type "handshake".
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type "client_hello".
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Extension type "server_name" (RFC 6066).
const EXT_SERVER_NAME: u16 = 0;
/// ServerName name type "host_name".
const NAME_TYPE_HOST: u8 = 0;
/// Largest plaintext record fragment (RFC 8446 §5.1).
const MAX_FRAGMENT: usize = 1 << 14;
/// Record header: type (1), legacy version (2), length (2).
const RECORD_HEADER: usize = 5;
/// Handshake header: type (1), length (3).
const HANDSHAKE_HEADER: usize = 4;
/// Largest DNS name, and so the largest host_name accepted.
const MAX_HOST_NAME: usize = 253;

/// What the first bytes of a connection say about its ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHelloPeek {
    /// A whole, well-formed ClientHello; `sni` is its host_name, lowercased,
    /// or `None` when it names no server.
    Complete { sni: Option<String> },
    /// So far a plausible ClientHello; more bytes are needed.
    NeedMore,
    /// Not a well-formed TLS ClientHello (or longer than [`MAX_PEEK`]).
    NotTls,
}

/// Parses the first bytes a client sent after CONNECT: TLS handshake records
/// (the ClientHello may span any number of them), the ClientHello body and
/// its server_name extension. Only the first [`MAX_PEEK`] bytes are looked
/// at; bytes after the ClientHello are ignored.
pub fn peek_client_hello(buf: &[u8]) -> ClientHelloPeek {
    let window = &buf[..buf.len().min(MAX_PEEK)];
    match reassemble(window) {
        Reassembled::Hello(body) => match parse_client_hello(&body) {
            Some(sni) => ClientHelloPeek::Complete { sni },
            None => ClientHelloPeek::NotTls,
        },
        Reassembled::NeedMore if buf.len() >= MAX_PEEK => ClientHelloPeek::NotTls,
        Reassembled::NeedMore => ClientHelloPeek::NeedMore,
        Reassembled::NotTls => ClientHelloPeek::NotTls,
    }
}

enum Reassembled {
    /// The ClientHello body (after the handshake header).
    Hello(Vec<u8>),
    NeedMore,
    NotTls,
}

/// Collects the handshake bytes carried by consecutive handshake records
/// until the first handshake message (which must be a ClientHello) is whole.
/// Every header field is checked as soon as its byte arrives, so plain HTTP
/// or other protocols are told apart after one or two bytes.
fn reassemble(mut input: &[u8]) -> Reassembled {
    let mut handshake: Vec<u8> = Vec::new();
    loop {
        if input.len() < RECORD_HEADER {
            return if record_header_prefix_ok(input) { Reassembled::NeedMore } else { Reassembled::NotTls };
        }
        if !record_header_prefix_ok(&input[..3]) {
            return Reassembled::NotTls;
        }
        let fragment_len = usize::from(u16::from_be_bytes([input[3], input[4]]));
        // Zero-length handshake fragments are forbidden (RFC 8446 §5.1).
        if fragment_len == 0 || fragment_len > MAX_FRAGMENT {
            return Reassembled::NotTls;
        }
        let body = &input[RECORD_HEADER..];
        let available = body.len().min(fragment_len);
        handshake.extend_from_slice(&body[..available]);

        if let Some(&msg_type) = handshake.first()
            && msg_type != HANDSHAKE_CLIENT_HELLO
        {
            return Reassembled::NotTls;
        }
        if handshake.len() >= HANDSHAKE_HEADER {
            let hello_len = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if HANDSHAKE_HEADER + hello_len > MAX_PEEK {
                return Reassembled::NotTls;
            }
            if handshake.len() >= HANDSHAKE_HEADER + hello_len {
                handshake.truncate(HANDSHAKE_HEADER + hello_len);
                handshake.drain(..HANDSHAKE_HEADER);
                return Reassembled::Hello(handshake);
            }
        }
        if available < fragment_len {
            return Reassembled::NeedMore;
        }
        input = &body[fragment_len..];
    }
}

/// Whether the bytes present of a record header can begin a handshake
/// record: content type 22, legacy version 3.0 to 3.4.
fn record_header_prefix_ok(prefix: &[u8]) -> bool {
    let type_ok = prefix.first().is_none_or(|&t| t == CONTENT_HANDSHAKE);
    let major_ok = prefix.get(1).is_none_or(|&major| major == 3);
    let minor_ok = prefix.get(2).is_none_or(|&minor| minor <= 4);
    type_ok && major_ok && minor_ok
}

/// Parses a ClientHello body; `None` when malformed, otherwise the host_name
/// (if any).
fn parse_client_hello(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader::new(body);
    let (major, _minor) = (r.u8()?, r.u8()?);
    if major != 3 {
        return None;
    }
    r.skip(32)?; // random
    let session_id = r.u8_prefixed()?;
    if session_id.len() > 32 {
        return None;
    }
    let suites = r.u16_prefixed()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return None;
    }
    if r.u8_prefixed()?.is_empty() {
        return None; // compression methods: at least "null"
    }
    if r.is_empty() {
        return Some(None); // an old hello without extensions
    }
    let mut extensions = Reader::new(r.u16_prefixed()?);
    if !r.is_empty() {
        return None;
    }

    let mut sni = None;
    let mut seen_server_name = false;
    while !extensions.is_empty() {
        let ext_type = extensions.u16()?;
        let data = extensions.u16_prefixed()?;
        if ext_type != EXT_SERVER_NAME {
            continue;
        }
        if seen_server_name {
            return None; // duplicate extensions are forbidden
        }
        seen_server_name = true;
        sni = parse_server_name(data)?;
    }
    Some(sni)
}

/// Parses the server_name extension's data: a list of (type, name); the one
/// host_name, if present, must be a plausible DNS name.
fn parse_server_name(data: &[u8]) -> Option<Option<String>> {
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.u16_prefixed()?);
    if !outer.is_empty() || list.is_empty() {
        return None;
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8()?;
        let name = list.u16_prefixed()?;
        if name_type != NAME_TYPE_HOST {
            continue;
        }
        // At most one name per type (RFC 6066 §3).
        if host.is_some() || name.is_empty() || name.len() > MAX_HOST_NAME {
            return None;
        }
        if !name.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')) {
            return None;
        }
        // Checked ASCII above, so this conversion cannot fail.
        host = Some(String::from_utf8(name.to_ascii_lowercase()).ok()?);
    }
    Some(host)
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u8_prefixed(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    fn u16_prefixed(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
}
