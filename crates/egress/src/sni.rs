//! Reading a TLS ClientHello without terminating TLS: its server name (SNI)
//! and whether it hides the real one.
//!
//! A tunnelled CONNECT (or SOCKS connection) is relayed untouched, but only
//! after the proxy has read the client's whole ClientHello and checked the
//! server it names against the destination (`tunnel.rs`): a shared front end
//! routes by that name, so a different one is domain fronting. Everything
//! here parses bytes chosen by the sandbox, so it is bounded and never
//! panics, and anything that starts like TLS but is not a well-formed
//! ClientHello is [`ClientHelloPeek::Malformed`]: the caller refuses it
//! rather than guessing.

/// The most input examined: a ClientHello (with its record headers) larger
/// than this is [`ClientHelloPeek::TooLarge`]. Real ones are a few hundred
/// bytes to a few KiB (post-quantum key shares included); the cap leaves
/// room for many records of padding without letting a client make the
/// proxy buffer without end.
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// TLS record content types: change_cipher_spec (20) to heartbeat (24).
const CONTENT_TYPES: std::ops::RangeInclusive<u8> = 20..=24;
/// TLS record content type "handshake".
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type "client_hello".
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Extension type "server_name" (RFC 6066).
const EXT_SERVER_NAME: u16 = 0;
/// Extension types that carry an encrypted server name: encrypted_client_hello
/// (0xfe0d, and the draft code points 0xfe08 to 0xfe0c before it) and the
/// older encrypted_server_name (0xffce). With them the visible name is only
/// the front end's; the real one is sealed for it.
const EXT_HIDDEN_NAME: [u16; 7] = [0xfe08, 0xfe09, 0xfe0a, 0xfe0b, 0xfe0c, 0xfe0d, 0xffce];
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

/// What a whole ClientHello says about the server it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The host_name of its server_name extension, lowercased, or `None`
    /// when it names no server.
    pub sni: Option<String>,
    /// The type of an extension that carries an encrypted server name
    /// (ECH, ESNI), if it has one.
    pub hidden_name: Option<u16>,
}

/// What the first bytes of a connection say about its ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHelloPeek {
    /// A whole, well-formed ClientHello.
    Complete(ClientHello),
    /// So far a plausible ClientHello; more bytes are needed: the input
    /// must be at least `at_least` bytes long before the answer can change
    /// (so a caller fed in small pieces need not parse after each one).
    NeedMore { at_least: usize },
    /// Does not start like TLS: the first bytes are not a TLS record header.
    NotTls,
    /// Starts like TLS but is not a well-formed ClientHello; why.
    Malformed(&'static str),
    /// A ClientHello (or what claims to be one) over [`MAX_CLIENT_HELLO`].
    TooLarge,
}

/// Parses the first bytes a client sent on a tunnel: TLS handshake records
/// (the ClientHello may span any number of them), the ClientHello body and
/// its extensions. Only the first [`MAX_CLIENT_HELLO`] bytes are looked at;
/// bytes after the ClientHello are ignored.
pub fn peek_client_hello(buf: &[u8]) -> ClientHelloPeek {
    // "Starts like TLS": a record content type, then major version 3.
    let starts_like_tls = match buf {
        [] => return ClientHelloPeek::NeedMore { at_least: 1 },
        [content] if CONTENT_TYPES.contains(content) => return ClientHelloPeek::NeedMore { at_least: 2 },
        [content, ..] => CONTENT_TYPES.contains(content) && buf.get(1) == Some(&3),
    };
    if !starts_like_tls {
        return ClientHelloPeek::NotTls;
    }
    if buf[0] != CONTENT_HANDSHAKE {
        return ClientHelloPeek::Malformed("the first TLS record is not a handshake record");
    }
    let window = &buf[..buf.len().min(MAX_CLIENT_HELLO)];
    match reassemble(window) {
        Reassembled::Hello(body) => match parse_client_hello(&body) {
            Ok(hello) => ClientHelloPeek::Complete(hello),
            Err(why) => ClientHelloPeek::Malformed(why),
        },
        Reassembled::NeedMore { missing } => {
            let at_least = window.len() + missing;
            // It cannot be whole within the cap, however it is framed.
            if at_least > MAX_CLIENT_HELLO {
                ClientHelloPeek::TooLarge
            } else {
                ClientHelloPeek::NeedMore { at_least }
            }
        }
        Reassembled::TooLarge => ClientHelloPeek::TooLarge,
        Reassembled::Malformed(why) => ClientHelloPeek::Malformed(why),
    }
}

enum Reassembled {
    /// The ClientHello body (after the handshake header).
    Hello(Vec<u8>),
    /// At least `missing` more bytes are needed (handshake bytes still
    /// missing once its length is known, otherwise 1).
    NeedMore {
        missing: usize,
    },
    TooLarge,
    Malformed(&'static str),
}

/// Collects the handshake bytes carried by consecutive handshake records
/// until the first handshake message (which must be a ClientHello) is whole.
/// Every header field is checked as soon as its byte arrives.
fn reassemble(mut input: &[u8]) -> Reassembled {
    let mut handshake: Vec<u8> = Vec::new();
    loop {
        if let Err(why) = check_record_header(&input[..input.len().min(RECORD_HEADER)]) {
            return Reassembled::Malformed(why);
        }
        if input.len() < RECORD_HEADER {
            return Reassembled::NeedMore { missing: missing_handshake_bytes(&handshake) };
        }
        let fragment_len = usize::from(u16::from_be_bytes([input[3], input[4]]));
        // Zero-length handshake fragments are forbidden (RFC 8446 §5.1).
        if fragment_len == 0 {
            return Reassembled::Malformed("a TLS record is empty");
        }
        if fragment_len > MAX_FRAGMENT {
            return Reassembled::Malformed("a TLS record is longer than 16 KiB");
        }
        let body = &input[RECORD_HEADER..];
        let available = body.len().min(fragment_len);
        handshake.extend_from_slice(&body[..available]);

        if let Some(&msg_type) = handshake.first()
            && msg_type != HANDSHAKE_CLIENT_HELLO
        {
            return Reassembled::Malformed("the first handshake message is not a ClientHello");
        }
        if handshake.len() >= HANDSHAKE_HEADER {
            let hello_len =
                usize::from(handshake[1]) << 16 | usize::from(handshake[2]) << 8 | usize::from(handshake[3]);
            if HANDSHAKE_HEADER + hello_len > MAX_CLIENT_HELLO {
                return Reassembled::TooLarge;
            }
            if handshake.len() >= HANDSHAKE_HEADER + hello_len {
                handshake.truncate(HANDSHAKE_HEADER + hello_len);
                handshake.drain(..HANDSHAKE_HEADER);
                return Reassembled::Hello(handshake);
            }
        }
        if available < fragment_len {
            return Reassembled::NeedMore { missing: missing_handshake_bytes(&handshake) };
        }
        input = &body[fragment_len..];
    }
}

/// How many handshake bytes the ClientHello still lacks, once its header
/// says how long it is (at least 1).
fn missing_handshake_bytes(handshake: &[u8]) -> usize {
    if handshake.len() < HANDSHAKE_HEADER {
        return 1;
    }
    let hello_len =
        usize::from(handshake[1]) << 16 | usize::from(handshake[2]) << 8 | usize::from(handshake[3]);
    (HANDSHAKE_HEADER + hello_len).saturating_sub(handshake.len()).max(1)
}

/// Checks the bytes present of a record header that must carry the
/// ClientHello: content type handshake, legacy version 3.0 to 3.4.
fn check_record_header(prefix: &[u8]) -> Result<(), &'static str> {
    if prefix.first().is_some_and(|&t| t != CONTENT_HANDSHAKE) {
        return Err("a TLS record other than a handshake record interrupts the ClientHello");
    }
    let major_ok = prefix.get(1).is_none_or(|&major| major == 3);
    let minor_ok = prefix.get(2).is_none_or(|&minor| minor <= 4);
    if major_ok && minor_ok { Ok(()) } else { Err("a TLS record has an unknown version") }
}

/// Parses a ClientHello body.
fn parse_client_hello(body: &[u8]) -> Result<ClientHello, &'static str> {
    const TRUNCATED: &str = "the ClientHello is cut short";
    let mut r = Reader::new(body);
    let major = r.u8().ok_or(TRUNCATED)?;
    r.skip(1).ok_or(TRUNCATED)?; // minor version
    if major != 3 {
        return Err("the ClientHello has an unknown version");
    }
    r.skip(32).ok_or(TRUNCATED)?; // random
    let session_id = r.u8_prefixed().ok_or(TRUNCATED)?;
    if session_id.len() > 32 {
        return Err("the ClientHello's session id is longer than 32 bytes");
    }
    let suites = r.u16_prefixed().ok_or(TRUNCATED)?;
    if suites.is_empty() || !suites.len().is_multiple_of(2) {
        return Err("the ClientHello's cipher suite list is malformed");
    }
    if r.u8_prefixed().ok_or(TRUNCATED)?.is_empty() {
        return Err("the ClientHello offers no compression method"); // at least "null"
    }
    let mut hello = ClientHello { sni: None, hidden_name: None };
    if r.is_empty() {
        return Ok(hello); // an old hello without extensions
    }
    let mut extensions = Reader::new(r.u16_prefixed().ok_or(TRUNCATED)?);
    if !r.is_empty() {
        return Err("the ClientHello has bytes after its extensions");
    }

    let mut seen: Vec<u16> = Vec::new();
    while !extensions.is_empty() {
        let ext_type = extensions.u16().ok_or(TRUNCATED)?;
        let data = extensions.u16_prefixed().ok_or(TRUNCATED)?;
        // Duplicate extensions are forbidden (RFC 8446 §4.2); a server and
        // the proxy could each read a different copy.
        if seen.contains(&ext_type) {
            return Err("the ClientHello repeats an extension");
        }
        seen.push(ext_type);
        if ext_type == EXT_SERVER_NAME {
            hello.sni = parse_server_name(data)?;
        } else if EXT_HIDDEN_NAME.contains(&ext_type) {
            hello.hidden_name = Some(ext_type);
        }
    }
    Ok(hello)
}

/// Parses the server_name extension's data: a list of (type, name); the one
/// host_name, if present, must be a plausible DNS name.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    const MALFORMED: &str = "the ClientHello's server_name extension is malformed";
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.u16_prefixed().ok_or(MALFORMED)?);
    if !outer.is_empty() || list.is_empty() {
        return Err(MALFORMED);
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8().ok_or(MALFORMED)?;
        let name = list.u16_prefixed().ok_or(MALFORMED)?;
        if name_type != NAME_TYPE_HOST {
            continue;
        }
        // At most one name per type (RFC 6066 §3): a server might use either.
        if host.is_some() {
            return Err("the ClientHello names more than one server");
        }
        if name.is_empty() || name.len() > MAX_HOST_NAME {
            return Err(MALFORMED);
        }
        if !name.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')) {
            return Err("the ClientHello's server name has characters a host name cannot have");
        }
        // Checked ASCII above, so this conversion cannot fail.
        host = Some(String::from_utf8(name.to_ascii_lowercase()).map_err(|_| MALFORMED)?);
    }
    Ok(host)
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

    fn needs_more(input: &[u8]) -> bool {
        matches!(peek_client_hello(input), ClientHelloPeek::NeedMore { .. })
    }

    fn named(name: &str) -> ClientHelloPeek {
        ClientHelloPeek::Complete(ClientHello { sni: Some(name.to_owned()), hidden_name: None })
    }

    fn unnamed() -> ClientHelloPeek {
        ClientHelloPeek::Complete(ClientHello { sni: None, hidden_name: None })
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
        assert_eq!(peek_client_hello(&hello), named("api.example.com"));
    }

    #[test]
    fn name_is_lowercased_and_trailing_bytes_are_ignored() {
        let mut hello = rustls_hello("API.Example.COM", true);
        assert_eq!(peek_client_hello(&hello), named("api.example.com"));
        hello.extend_from_slice(b"\x17\x03\x03\x00\x05early");
        assert_eq!(peek_client_hello(&hello), named("api.example.com"));
    }

    #[test]
    fn every_truncation_needs_more() {
        let hello = rustls_hello("api.example.com", true);
        for cut in 0..hello.len() {
            assert!(needs_more(&hello[..cut]), "cut at {cut}");
        }
    }

    #[test]
    fn need_more_says_how_much_at_least() {
        let hello = rustls_hello("api.example.com", true);
        // In one record: once the handshake header is in, all of it.
        for cut in RECORD_HEADER + HANDSHAKE_HEADER..hello.len() {
            let got = peek_client_hello(&hello[..cut]);
            assert_eq!(got, ClientHelloPeek::NeedMore { at_least: hello.len() }, "cut at {cut}");
        }
        // In records of 7 bytes: a lower bound that moves forward.
        let split = split_records(&hello, 7);
        let mut last = 0;
        for cut in 0..split.len() {
            let ClientHelloPeek::NeedMore { at_least } = peek_client_hello(&split[..cut]) else { panic!() };
            assert!(
                at_least > cut && at_least <= split.len() && at_least >= last,
                "cut at {cut}: {at_least}"
            );
            last = at_least;
        }
    }

    #[test]
    fn hello_split_across_records_is_reassembled() {
        let hello = rustls_hello("api.example.com", true);
        let body_len = hello.len() - RECORD_HEADER;
        // Two records (split mid-way), many small ones, and one per byte.
        for max in [body_len / 2 + 1, 100, 7, 1] {
            let split = split_records(&hello, max);
            assert_eq!(peek_client_hello(&split), named("api.example.com"), "fragments of {max}");
            for cut in 0..split.len() {
                assert!(needs_more(&split[..cut]), "fragments of {max}, cut at {cut}");
            }
        }
    }

    #[test]
    fn hello_without_server_name_is_complete_with_none() {
        let hello = rustls_hello("api.example.com", false);
        assert_eq!(peek_client_hello(&hello), unnamed());
        // An IP address is never sent as SNI.
        let hello = rustls_hello("192.0.2.7", true);
        assert_eq!(peek_client_hello(&hello), unnamed());
    }

    #[test]
    fn other_protocols_do_not_start_like_tls() {
        for input in [
            b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n".as_slice(),
            b"SSH-2.0-OpenSSH\r\n",
            b"\x16\x02",                         // SSL 2 record version
            b"\x80\x2e\x01\x00\x02",             // SSLv2-compatible hello
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // PostgreSQL's SSLRequest
        ] {
            assert_eq!(peek_client_hello(input), ClientHelloPeek::NotTls, "{input:?}");
        }
        assert!(needs_more(b"\x16") && needs_more(b"\x17"));
    }

    #[test]
    fn tls_that_is_not_a_clienthello_first_is_malformed() {
        for (input, why) in [
            (b"\x16\x03\x09".as_slice(), "unknown version"),
            (b"\x16\x03\x01\x00\x00", "empty"),
            (b"\x16\x03\x01\x40\x01", "longer than 16 KiB"),
            (b"\x15\x03\x03\x00\x02\x02\x28", "not a handshake record"), // an alert
            (b"\x14\x03\x03\x00\x01\x01", "not a handshake record"),     // change_cipher_spec
            (b"\x17\x03\x03\x00\x05hello", "not a handshake record"),    // application data
            (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not a ClientHello"), // a ServerHello
        ] {
            match peek_client_hello(input) {
                ClientHelloPeek::Malformed(reason) => assert!(reason.contains(why), "{input:?}: {reason}"),
                other => panic!("{input:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_record_of_another_type_inside_the_hello_is_malformed() {
        // A change_cipher_spec record between two fragments of the hello.
        let hello = split_records(&rustls_hello("api.example.com", true), 100);
        let second = RECORD_HEADER + 100;
        let mut input = hello[..second].to_vec();
        input.extend_from_slice(b"\x14\x03\x03\x00\x01\x01");
        input.extend_from_slice(&hello[second..]);
        let ClientHelloPeek::Malformed(reason) = peek_client_hello(&input) else { panic!() };
        assert!(reason.contains("interrupts the ClientHello"), "{reason}");
    }

    #[test]
    fn oversized_or_endless_hellos_are_too_large() {
        // A handshake header announcing more than the limit.
        let huge = b"\x16\x03\x01\x40\x00\x01\x01\x00\x00";
        assert_eq!(peek_client_hello(huge), ClientHelloPeek::TooLarge);

        // A plausible length, but carried in records of one byte each, so it
        // cannot complete within the limit.
        let mut input = Vec::new();
        for byte in [HANDSHAKE_CLIENT_HELLO, 0x00, 0xf0, 0x00] {
            input.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1, 0, 1, byte]);
        }
        while input.len() < MAX_CLIENT_HELLO + 10 {
            input.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1, 0, 1, 0]);
        }
        // Known as soon as what is left cannot fit in what the cap leaves.
        assert!(needs_more(&input[..100]));
        assert_eq!(peek_client_hello(&input[..MAX_CLIENT_HELLO / 2]), ClientHelloPeek::TooLarge);
        assert_eq!(peek_client_hello(&input), ClientHelloPeek::TooLarge);
    }

    /// A minimal ClientHello handshake message around the given extensions.
    fn hello_message(extensions: &[u8]) -> Vec<u8> {
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
        handshake
    }

    /// The handshake message in records of at most `max_fragment` bytes.
    fn records(handshake: &[u8], max_fragment: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for fragment in handshake.chunks(max_fragment) {
            out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&u16::try_from(fragment.len()).unwrap().to_be_bytes());
            out.extend_from_slice(fragment);
        }
        out
    }

    /// A minimal ClientHello in one record.
    fn hello_with_extensions(extensions: &[u8]) -> Vec<u8> {
        records(&hello_message(extensions), MAX_FRAGMENT)
    }

    fn extension(ext_type: u16, data: &[u8]) -> Vec<u8> {
        let mut ext = ext_type.to_be_bytes().to_vec();
        ext.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        ext.extend_from_slice(data);
        ext
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
        extension(EXT_SERVER_NAME, &data)
    }

    #[test]
    fn hand_built_hellos() {
        let ok = server_name_ext(&[(0, b"www.example.org")]);
        assert_eq!(peek_client_hello(&hello_with_extensions(&ok)), named("www.example.org"));

        // Other name types are skipped; case is folded; a trailing dot is
        // kept (the caller compares names without it).
        let other = server_name_ext(&[(7, b"ignored"), (0, b"www.example.org")]);
        assert_eq!(peek_client_hello(&hello_with_extensions(&other)), named("www.example.org"));
        let dotted = server_name_ext(&[(0, b"WWW.Example.ORG.")]);
        assert_eq!(peek_client_hello(&hello_with_extensions(&dotted)), named("www.example.org."));

        // Malformed: two host names, a duplicate extension, odd characters,
        // an empty name, an empty list, an extension repeated.
        let two = server_name_ext(&[(0, b"a.example.org"), (0, b"b.example.org")]);
        let dup = [ok.clone(), ok.clone()].concat();
        let odd = server_name_ext(&[(0, b"api.example.com\0.evil.example.net")]);
        let slash = server_name_ext(&[(0, b"api.example.com/x")]);
        let empty = server_name_ext(&[(0, b"")]);
        let no_list = server_name_ext(&[]);
        let padding_twice = [extension(21, &[0; 4]), ok.clone(), extension(21, &[0; 4])].concat();
        for (what, ext, why) in [
            ("two", two, "more than one server"),
            ("dup", dup, "repeats an extension"),
            ("odd", odd, "characters"),
            ("slash", slash, "characters"),
            ("empty", empty, "server_name extension is malformed"),
            ("no list", no_list, "server_name extension is malformed"),
            ("padding twice", padding_twice, "repeats an extension"),
        ] {
            match peek_client_hello(&hello_with_extensions(&ext)) {
                ClientHelloPeek::Malformed(reason) => assert!(reason.contains(why), "{what}: {reason}"),
                other => panic!("{what}: {other:?}"),
            }
        }

        // Extensions block length disagreeing with the body.
        let mut short = hello_with_extensions(&ok);
        let last = short.len() - 1;
        short.truncate(last);
        let hs_len = short.len() - RECORD_HEADER - HANDSHAKE_HEADER;
        let record_len = u16::try_from(short.len() - RECORD_HEADER).unwrap();
        short[3..5].copy_from_slice(&record_len.to_be_bytes());
        short[6..9].copy_from_slice(&u32::try_from(hs_len).unwrap().to_be_bytes()[1..]);
        assert!(matches!(peek_client_hello(&short), ClientHelloPeek::Malformed(_)));
    }

    #[test]
    fn a_hello_larger_than_one_record_is_read_whole() {
        // 40 KiB of padding (extension 21) after the name: three records of
        // 16 KiB, and in 1000-byte records, complete only at the last byte.
        let ext = [extension(21, &vec![0; 40 * 1024]), server_name_ext(&[(0, b"www.example.org")])].concat();
        let message = hello_message(&ext);
        for max in [MAX_FRAGMENT, 1000] {
            let input = records(&message, max);
            assert!(input.len() > 2 * MAX_FRAGMENT && input.len() < MAX_CLIENT_HELLO);
            assert_eq!(peek_client_hello(&input), named("www.example.org"), "records of {max}");
            for cut in (0..input.len()).step_by(997) {
                assert!(needs_more(&input[..cut]), "cut at {cut}");
            }
        }
        // Past the cap once framed in small records: too large.
        let ext = [extension(21, &vec![0; 65_000]), server_name_ext(&[(0, b"www.example.org")])].concat();
        let input = records(&hello_message(&ext), 500);
        assert!(input.len() > MAX_CLIENT_HELLO);
        assert!(needs_more(&input[..100]));
        assert_eq!(peek_client_hello(&input), ClientHelloPeek::TooLarge);
    }

    #[test]
    fn encrypted_server_names_are_reported() {
        let name = server_name_ext(&[(0, b"public.example.org")]);
        for ext_type in [0xfe0d, 0xfe0a, 0xffce] {
            let ext = [name.clone(), extension(ext_type, &[0; 40])].concat();
            let got = peek_client_hello(&hello_with_extensions(&ext));
            let want = ClientHello { sni: Some("public.example.org".into()), hidden_name: Some(ext_type) };
            assert_eq!(got, ClientHelloPeek::Complete(want), "{ext_type:#x}");
        }
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
        let mut big: Vec<u8> = (0..MAX_CLIENT_HELLO + 100).map(|_| next() as u8).collect();
        big[..3].copy_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
        for cut in (0..big.len()).step_by(97) {
            let _ = peek_client_hello(&big[..cut]);
        }
    }
}
