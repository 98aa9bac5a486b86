//! The egress port's frames: a 9-byte header (kind, connection id, length)
//! and at most [`MAX_DATA`] bytes of payload. The host reads them from a
//! guest it does not trust, so a frame is checked before anything is
//! allocated for it: an unknown kind or a length its kind does not allow
//! ends the channel (a byte stream cannot be resynchronised), and so does
//! an open that says nothing the host knows.

use std::io::{self, Read, Write};

use airlock_proto::handover::{HandOver, MAX_HANDOVER};

/// The most payload one data frame carries.
pub const MAX_DATA: usize = 16 * 1024;

const OPEN: u8 = 1;
const DATA: u8 = 2;
const WINDOW: u8 = 3;
const EOF: u8 = 4;
const RESET: u8 = 5;
const BUNDLE: u8 = 6;
const BUNDLE_END: u8 = 7;

const HEADER: usize = 9;

/// One frame of the egress port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Guest → host: a connection was accepted, and what it is: the
    /// process tier's hand-over message (which listener took it and, for
    /// a redirected connection, where the guest's program sent it), at most
    /// [`MAX_HANDOVER`] bytes.
    Open { id: u32, to: HandOver },
    /// Bytes of connection `id`, in order; never empty.
    Data { id: u32, data: Vec<u8> },
    /// The receiver consumed `credit` more bytes of `id`: the sender may
    /// send that many more.
    Window { id: u32, credit: u32 },
    /// The sender sends no more bytes of `id` (a half-close).
    Eof { id: u32 },
    /// Connection `id` is gone, both ways.
    Reset { id: u32 },
    /// Host → guest, before anything else: a piece of the sandbox's trust
    /// bundle (host roots and its CA's certificate).
    Bundle { data: Vec<u8> },
    /// Host → guest: the bundle is complete.
    BundleEnd,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("egress port: {0}")]
    Io(#[from] io::Error),
    #[error("egress port: frame of unknown kind {0}")]
    UnknownKind(u8),
    #[error("egress port: frame of kind {kind} with a length of {len}, which that kind does not allow")]
    BadLength { kind: u8, len: u32 },
    #[error("egress port: an open of no known form")]
    BadOpen,
}

impl Frame {
    /// The frame as bytes on the port.
    pub fn encode(&self) -> Vec<u8> {
        let open;
        let (kind, id, len, payload): (u8, u32, u32, &[u8]) = match self {
            Frame::Open { id, to } => {
                open = to.encode();
                (OPEN, *id, open.len() as u32, &open)
            }
            Frame::Data { id, data } => (DATA, *id, data.len() as u32, data),
            Frame::Window { id, credit } => (WINDOW, *id, *credit, &[]),
            Frame::Eof { id } => (EOF, *id, 0, &[]),
            Frame::Reset { id } => (RESET, *id, 0, &[]),
            Frame::Bundle { data } => (BUNDLE, 0, data.len() as u32, data),
            Frame::BundleEnd => (BUNDLE_END, 0, 0, &[]),
        };
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.push(kind);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    pub fn write_to(&self, to: &mut impl Write) -> io::Result<()> {
        to.write_all(&self.encode())
    }

    /// Reads one frame; `None` at a clean end of the stream (between frames).
    pub fn read_from(from: &mut impl Read) -> Result<Option<Frame>, FrameError> {
        let mut header = [0u8; HEADER];
        let mut got = 0;
        while got < HEADER {
            match from.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let kind = header[0];
        let id = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let len = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
        let bad = FrameError::BadLength { kind, len };
        let mut payload = |len: u32| -> Result<Vec<u8>, FrameError> {
            let mut data = vec![0u8; len as usize];
            from.read_exact(&mut data)?;
            Ok(data)
        };
        Ok(Some(match kind {
            OPEN if len >= 1 && len as usize <= MAX_HANDOVER => {
                let to = HandOver::decode(&payload(len)?).ok_or(FrameError::BadOpen)?;
                Frame::Open { id, to }
            }
            DATA if len >= 1 && len as usize <= MAX_DATA => Frame::Data { id, data: payload(len)? },
            WINDOW if len >= 1 => Frame::Window { id, credit: len },
            EOF if len == 0 => Frame::Eof { id },
            RESET if len == 0 => Frame::Reset { id },
            BUNDLE if len as usize <= MAX_DATA => Frame::Bundle { data: payload(len)? },
            BUNDLE_END if len == 0 => Frame::BundleEnd,
            OPEN | DATA | WINDOW | EOF | RESET | BUNDLE | BUNDLE_END => return Err(bad),
            other => return Err(FrameError::UnknownKind(other)),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_frame_survives_the_round_trip() {
        let frames = [
            Frame::Open { id: 7, to: HandOver::Http },
            Frame::Open {
                id: 8,
                to: HandOver::Transparent { destination: "203.0.113.9:22".parse().unwrap() },
            },
            Frame::Open {
                id: 9,
                to: HandOver::Transparent { destination: "[2001:db8::7]:443".parse().unwrap() },
            },
            Frame::Open { id: 10, to: HandOver::DnsStream },
            Frame::Data { id: u32::MAX, data: vec![1, 2, 3] },
            Frame::Data { id: 1, data: vec![0xAB; MAX_DATA] },
            Frame::Window { id: 3, credit: 65_536 },
            Frame::Eof { id: 4 },
            Frame::Reset { id: 5 },
            Frame::Bundle { data: b"-----BEGIN CERTIFICATE-----".to_vec() },
            Frame::BundleEnd,
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let mut reader = &bytes[..];
        for frame in &frames {
            assert_eq!(&Frame::read_from(&mut reader).unwrap().unwrap(), frame);
        }
        assert!(Frame::read_from(&mut reader).unwrap().is_none(), "a clean end between frames");
    }

    #[test]
    fn hostile_headers_are_refused_before_anything_is_allocated() {
        let header = |kind: u8, len: u32| {
            let mut h = vec![kind];
            h.extend_from_slice(&9u32.to_be_bytes());
            h.extend_from_slice(&len.to_be_bytes());
            h
        };
        for (kind, len) in [
            (DATA, u32::MAX),
            (DATA, MAX_DATA as u32 + 1),
            (DATA, 0),
            (OPEN, 0),
            (OPEN, MAX_HANDOVER as u32 + 1),
            (EOF, 1),
            (RESET, 4),
            (WINDOW, 0),
            (BUNDLE, u32::MAX),
            (BUNDLE_END, 3),
        ] {
            let bytes = header(kind, len);
            let err = Frame::read_from(&mut &bytes[..]).unwrap_err();
            assert!(matches!(err, FrameError::BadLength { .. }), "{kind} {len}: {err}");
        }
        let err = Frame::read_from(&mut &header(0x42, 0)[..]).unwrap_err();
        assert!(matches!(err, FrameError::UnknownKind(0x42)), "{err}");
        // An open whose payload is no hand-over: a tag nobody knows, an
        // address of the wrong length.
        for payload in [&b"x"[..], b"hh", &[b't', 4, 203, 0, 113, 9, 0]] {
            let mut bytes = header(OPEN, payload.len() as u32);
            bytes.extend_from_slice(payload);
            let err = Frame::read_from(&mut &bytes[..]).unwrap_err();
            assert!(matches!(err, FrameError::BadOpen), "{payload:?}: {err}");
        }
        // Cut inside a header or a payload: an error, not a clean end.
        assert!(Frame::read_from(&mut &header(DATA, 5)[..4]).is_err());
        assert!(Frame::read_from(&mut &header(DATA, 5)[..]).is_err());
    }
}
