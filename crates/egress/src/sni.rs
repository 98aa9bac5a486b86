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
            let hello_len =
                usize::from(handshake[1]) << 16 | usize::from(handshake[2]) << 8 | usize::from(handshake[3]);
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
    if suites.is_empty() || !suites.len().is_multiple_of(2) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;

    /// The first flight of a real rustls client for `name`.
    fn rustls_hello(name: &str, enable_sni: bool) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.enable_sni = enable_sni;
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), server_name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    /// Re-frames a single-record hello into records carrying at most
    /// `max_fragment` bytes each.
    fn split_records(hello: &[u8], max_fragment: usize) -> Vec<u8> {
        assert_eq!(hello[0], CONTENT_HANDSHAKE);
        let len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
        assert_eq!(hello.len(), RECORD_HEADER + len, "expected one record");
        let mut out = Vec::new();
        for fragment in hello[RECORD_HEADER..].chunks(max_fragment) {
            out.extend_from_slice(&hello[..3]);
            out.extend_from_slice(&u16::try_from(fragment.len()).unwrap().to_be_bytes());
            out.extend_from_slice(fragment);
        }
        out
    }

    fn complete(name: &str) -> ClientHelloPeek {
        ClientHelloPeek::Complete { sni: Some(name.to_owned()) }
    }

    /// xorshift64: deterministic, no dependency.
    fn rng(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    #[test]
    fn rustls_client_hello_gives_its_server_name() {
        let hello = rustls_hello("api.example.com", true);
        assert_eq!(peek_client_hello(&hello), complete("api.example.com"));
    }

    #[test]
    fn name_is_lowercased_and_trailing_bytes_are_ignored() {
        let mut hello = rustls_hello("API.Example.COM", true);
        assert_eq!(peek_client_hello(&hello), complete("api.example.com"));
        hello.extend_from_slice(b"\x17\x03\x03\x00\x05early");
        assert_eq!(peek_client_hello(&hello), complete("api.example.com"));
    }

    #[test]
    fn every_truncation_needs_more() {
        let hello = rustls_hello("api.example.com", true);
        for cut in 0..hello.len() {
            assert_eq!(peek_client_hello(&hello[..cut]), ClientHelloPeek::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn hello_split_across_records_is_reassembled() {
        let hello = rustls_hello("api.example.com", true);
        let body_len = hello.len() - RECORD_HEADER;
        // Two records (split mid-way), many small ones, and one per byte.
        for max in [body_len / 2 + 1, 100, 7, 1] {
            let split = split_records(&hello, max);
            assert_eq!(peek_client_hello(&split), complete("api.example.com"), "fragments of {max}");
            for cut in 0..split.len() {
                let got = peek_client_hello(&split[..cut]);
                assert_eq!(got, ClientHelloPeek::NeedMore, "fragments of {max}, cut at {cut}");
            }
        }
    }

    #[test]
    fn hello_without_server_name_is_complete_with_none() {
        let hello = rustls_hello("api.example.com", false);
        assert_eq!(peek_client_hello(&hello), ClientHelloPeek::Complete { sni: None });
        // An IP address is never sent as SNI.
        let hello = rustls_hello("192.0.2.7", true);
        assert_eq!(peek_client_hello(&hello), ClientHelloPeek::Complete { sni: None });
    }

    #[test]
    fn other_protocols_are_not_tls() {
        for input in [
            b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n".as_slice(),
            b"SSH-2.0-OpenSSH\r\n",
            b"\x16\x02",                             // SSL 2 record version
            b"\x16\x03\x09",                         // unknown minor version
            b"\x16\x03\x01\x00\x00",                 // empty record
            b"\x16\x03\x01\x40\x01",                 // record over 16 KiB
            b"\x15\x03\x03\x00\x02\x02\x28",         // an alert
            b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", // a ServerHello
            b"\x80\x2e\x01\x00\x02",                 // SSLv2-compatible hello
        ] {
            assert_eq!(peek_client_hello(input), ClientHelloPeek::NotTls, "{input:?}");
        }
    }

    #[test]
    fn oversized_or_endless_hellos_are_given_up() {
        // A handshake header announcing more than the peek limit.
        let huge = b"\x16\x03\x01\x40\x00\x01\x00\x40\x00";
        assert_eq!(peek_client_hello(huge), ClientHelloPeek::NotTls);

        // A plausible length, but carried in records of one byte each, so it
        // cannot complete within the limit.
        let mut input = Vec::new();
        for byte in [HANDSHAKE_CLIENT_HELLO, 0x00, 0x3f, 0xf0] {
            input.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1, 0, 1, byte]);
        }
        while input.len() < MAX_PEEK + 10 {
            input.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1, 0, 1, 0]);
        }
        assert_eq!(peek_client_hello(&input[..MAX_PEEK - 1]), ClientHelloPeek::NeedMore);
        assert_eq!(peek_client_hello(&input), ClientHelloPeek::NotTls);
    }

    /// Builds a minimal ClientHello around the given extensions block.
    fn hello_with_extensions(extensions: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0u8; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&u16::try_from(extensions.len()).unwrap().to_be_bytes());
        body.extend_from_slice(extensions);
        let mut handshake = vec![HANDSHAKE_CLIENT_HELLO];
        handshake.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut record = vec![CONTENT_HANDSHAKE, 3, 1];
        record.extend_from_slice(&u16::try_from(handshake.len()).unwrap().to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    fn server_name_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in entries {
            list.push(*kind);
            list.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        let mut ext = EXT_SERVER_NAME.to_be_bytes().to_vec();
        ext.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        ext.extend_from_slice(&data);
        ext
    }

    #[test]
    fn hand_built_hellos() {
        let ok = server_name_ext(&[(0, b"www.example.org")]);
        assert_eq!(peek_client_hello(&hello_with_extensions(&ok)), complete("www.example.org"));

        // Other name types are skipped.
        let other = server_name_ext(&[(7, b"ignored"), (0, b"www.example.org")]);
        assert_eq!(peek_client_hello(&hello_with_extensions(&other)), complete("www.example.org"));

        // Malformed: two host names, a duplicate extension, odd characters,
        // an empty name, an empty list.
        let two = server_name_ext(&[(0, b"a.example.org"), (0, b"b.example.org")]);
        let dup = [ok.clone(), ok.clone()].concat();
        let odd = server_name_ext(&[(0, b"api.example.com\0.evil.example.net")]);
        let slash = server_name_ext(&[(0, b"api.example.com/x")]);
        let empty = server_name_ext(&[(0, b"")]);
        let no_list = server_name_ext(&[]);
        for (what, ext) in [
            ("two", two),
            ("dup", dup),
            ("odd", odd),
            ("slash", slash),
            ("empty", empty),
            ("no list", no_list),
        ] {
            assert_eq!(peek_client_hello(&hello_with_extensions(&ext)), ClientHelloPeek::NotTls, "{what}");
        }

        // Extensions block length disagreeing with the body.
        let mut short = hello_with_extensions(&ok);
        let last = short.len() - 1;
        short.truncate(last);
        let hs_len = short.len() - RECORD_HEADER - HANDSHAKE_HEADER;
        let record_len = u16::try_from(short.len() - RECORD_HEADER).unwrap();
        short[3..5].copy_from_slice(&record_len.to_be_bytes());
        short[6..9].copy_from_slice(&u32::try_from(hs_len).unwrap().to_be_bytes()[1..]);
        assert_eq!(peek_client_hello(&short), ClientHelloPeek::NotTls);
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut next = rng(0x9e37_79b9_7f4a_7c15);
        let hello = rustls_hello("api.example.com", true);
        let two_records = split_records(&hello, 200);
        for _ in 0..20_000 {
            // Pure noise, sometimes starting like a handshake record.
            let len = (next() % 600) as usize;
            let mut noise: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next().is_multiple_of(2) && noise.len() >= 3 {
                noise[..3].copy_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
            }
            let _ = peek_client_hello(&noise);

            // A real hello with a few bytes flipped, then cut anywhere.
            let base = if next().is_multiple_of(2) { &hello } else { &two_records };
            let mut mutated = base.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % mutated.len();
                mutated[at] = next() as u8;
            }
            let cut = (next() as usize) % (mutated.len() + 1);
            let _ = peek_client_hello(&mutated[..cut]);
            let _ = peek_client_hello(&mutated);
        }
        // Every prefix of noise long enough to hit the limit.
        let big: Vec<u8> = (0..MAX_PEEK + 100).map(|_| next() as u8).collect();
        for cut in (0..big.len()).step_by(97) {
            let _ = peek_client_hello(&big[..cut]);
        }
    }
}
