//! The frames of an interactive exec through the daemon's API
//! (`POST /v1/sandboxes/{name}/exec?stream=raw`, docs/api.md): the daemon
//! and the CLI both speak them, so they are defined once, here.
//!
//! A frame is one type byte, a 4-byte big-endian payload length and the
//! payload. The request body starts with the exec request as one line of
//! JSON, then carries client frames; the response body carries server
//! frames, the last of them [`END`].

/// Client → daemon: bytes for the process's stdin.
pub const STDIN: u8 = 0;
/// Daemon → client: the process's stdout (with a terminal, all its output).
pub const STDOUT: u8 = 1;
/// Daemon → client: the process's stderr.
pub const STDERR: u8 = 2;
/// Daemon → client, always last: the exec API's `exit` or `error` JSON object.
pub const END: u8 = 3;
/// Client → daemon: the terminal's new size, rows then columns (u16 each, big-endian).
pub const RESIZE: u8 = 4;
/// Client → daemon: a signal for the process group (i32, big-endian).
pub const SIGNAL: u8 = 5;
/// Client → daemon: no more stdin (the body stays open for resizes and signals).
pub const CLOSE_STDIN: u8 = 6;

/// The largest payload either side sends or accepts.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// One frame, ready to send. Payloads over [`MAX_PAYLOAD`] must be split by
/// the caller ([`encode_chunked`] does).
pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(kind);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Data of any size as frames of one kind.
pub fn encode_chunked(kind: u8, data: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    data.chunks(MAX_PAYLOAD).map(move |piece| encode(kind, piece))
}

/// A [`RESIZE`] frame.
pub fn resize(rows: u16, cols: u16) -> Vec<u8> {
    let mut payload = rows.to_be_bytes().to_vec();
    payload.extend_from_slice(&cols.to_be_bytes());
    encode(RESIZE, &payload)
}

/// A [`SIGNAL`] frame.
pub fn signal(signal: i32) -> Vec<u8> {
    encode(SIGNAL, &signal.to_be_bytes())
}

/// Takes the first complete frame off the front of `buf`: `Ok(None)` while
/// more bytes are needed; an error for a length over [`MAX_PAYLOAD`] (the
/// peer is broken or hostile, and nothing after it can be trusted).
pub fn take(buf: &mut Vec<u8>) -> Result<Option<(u8, Vec<u8>)>, String> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(format!("a frame of {len} bytes is larger than {MAX_PAYLOAD}"));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    let kind = buf[0];
    let payload = buf[5..5 + len].to_vec();
    buf.drain(..5 + len);
    Ok(Some((kind, payload)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn frames_round_trip_across_partial_reads() {
        let mut wire = encode(STDIN, b"abc");
        wire.extend(resize(30, 100));
        wire.extend(signal(2));
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for byte in wire {
            buf.push(byte);
            while let Some(frame) = take(&mut buf).unwrap() {
                got.push(frame);
            }
        }
        assert_eq!(
            got,
            [(STDIN, b"abc".to_vec()), (RESIZE, vec![0, 30, 0, 100]), (SIGNAL, 2i32.to_be_bytes().to_vec())]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_frames_are_refused_before_they_are_buffered() {
        let mut buf = vec![STDOUT, 0xff, 0xff, 0xff, 0xff];
        assert!(take(&mut buf).is_err());
    }

    #[test]
    fn large_data_is_split() {
        let data = vec![7u8; MAX_PAYLOAD + 10];
        let frames: Vec<_> = encode_chunked(STDOUT, &data).collect();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1].len(), 5 + 10);
    }
}
