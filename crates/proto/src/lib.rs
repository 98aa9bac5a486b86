//! The host ↔ agent protocol: typed messages, one enum per direction, sent as
//! length-prefixed JSON frames. The transport is any byte stream (a socketpair
//! for the process tier; a virtio-serial port will do for a VM).
//!
//! Everything the agent sends comes from inside the sandbox and is untrusted:
//! frames are size-limited and decoded into closed types only.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::plan::JailPlan;

/// Largest frame either side accepts. A plan is a few KiB; anything near this
/// is a bug or an attack.
pub const MAX_FRAME: usize = 1 << 20;

/// Host → agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMessage {
    /// Build the sandbox and run the command. Sent once, first.
    Launch(Box<Launch>),
    /// The agent is in its cgroup: confine and start the command. Sent once,
    /// after Launch.
    Proceed,
    /// Service mode (a Launch without a command): start another process.
    Exec(Box<ExecRequest>),
    /// Input for an exec's stdin; empty data closes it. At most
    /// [`window::STDIN_WINDOW`] chunks may be on their way ahead of the
    /// agent's [`AgentMessage::StdinAck`]s, so a process that does not read
    /// its input holds up no more than that (and nothing else the agent does).
    Stdin {
        id: u32,
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    /// Send a signal to an exec's process group.
    Signal { id: u32, signal: i32 },
    /// Resize an exec's terminal.
    Resize { id: u32, rows: u16, cols: u16 },
    /// Service mode: a file operation (`file::FileOp`), answered by
    /// `AgentMessage::File` messages with the same id.
    File { id: u32, op: file::FileOp },
    /// The host passed on one more windowed answer (data chunk, list batch,
    /// watch event) of file operation `id`: the agent may send another (see
    /// `file::FILE_WINDOW`).
    FileAck { id: u32 },
    /// The next bytes of write `id`; at most `file::FILE_WINDOW` chunks
    /// ahead of the agent's `file::FileReply::Ack`.
    FileData {
        id: u32,
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    /// Stop file operation `id` (its client went away); no answer follows.
    FileCancel { id: u32 },
    /// A microVM guest about to be stopped: kill every process left in it
    /// and report their ends, then answer [`AgentMessage::ProcessesEnded`].
    EndProcesses,
}

/// One process to start in a sandbox in service mode.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecRequest {
    /// Chosen by the host; echoed on every message about this exec.
    pub id: u32,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    /// Run on a pseudo-terminal of this size (rows, columns); its output
    /// arrives as stdout.
    #[serde(default)]
    pub tty: Option<(u16, u16)>,
    /// Run as this user of the sandbox: `UID[:GID]` or `NAME[:GROUP]`, names
    /// looked up in the sandbox's own /etc/passwd and /etc/group. Root
    /// inside when absent.
    #[serde(default)]
    pub user: Option<String>,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Launch {
    pub jail: JailPlan,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// stdin is a terminal: make it the command's controlling terminal.
    pub tty: bool,
    /// Listen on these loopback ports and hand each accepted connection to
    /// the host's egress proxy. None: the sandbox has no network at all.
    pub egress: Option<EgressPorts>,
    /// Run the command as this user (see [`ExecRequest::user`]): an
    /// image's `User`, as `UID:GID`. Root inside when absent.
    #[serde(default)]
    pub user: Option<String>,
}

/// The agent's loopback listeners for the egress proxy.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct EgressPorts {
    pub http: u16,
    pub socks: u16,
}

/// Agent → host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// The sandbox is built and confined; the command is about to start.
    /// With `exec_trace`, the listener of the exec trace's filter follows
    /// at once as a descriptor tagged [`EXEC_LISTENER_TAG`] (before the
    /// terminal's, when there is one).
    Confined {
        landlock: String,
        #[serde(default)]
        exec_trace: bool,
    },
    /// A setup step failed; nothing untrusted ran.
    SetupFailed { step: String, message: String },
    /// The command runs as this pid (inside the sandbox's PID namespace).
    Started { pid: i32 },
    /// The command could not be executed: 127 not found, 126 not executable.
    ExecFailed { exit_code: i32, message: String },
    /// The command ended.
    Exited { code: Option<i32>, signal: Option<i32> },
    /// Service mode: the agent is ready for Exec requests.
    Serving,
    /// Service mode: an exec's process started.
    ExecStarted { id: u32, pid: i32 },
    /// Service mode: output of an exec (at most 64 KiB per message).
    ExecOutput {
        id: u32,
        stream: Stream,
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    /// Service mode: an exec could not start (126/127 like a shell).
    ExecRefused { id: u32, exit_code: i32, message: String },
    /// Service mode: an exec ended; all its output was sent before this.
    ExecEnded { id: u32, code: Option<i32>, signal: Option<i32> },
    /// Service mode: one stdin chunk of exec `id` was written to its process
    /// (or dropped, its input being closed): the host may send another.
    StdinAck { id: u32 },
    /// Service mode: an answer to file operation `id`.
    File { id: u32, reply: file::FileReply },
    /// A microVM guest's exec trace: one exec, end or flood summary its
    /// agent saw inside the guest (what the guest claims; the host marks
    /// it so). A process-tier agent never sends it, and its host ignores it.
    ExecTrace { trace: exec_record::TraceRecord },
    /// The answer to [`HostMessage::EndProcesses`]: every process left was
    /// killed, and the exec trace's records of their ends were sent before
    /// this (as far as they came within its wait).
    ProcessesEnded,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("control channel: {0}")]
    Io(#[from] io::Error),
    #[error("control channel: frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("control channel: malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Writes one frame: a 4-byte big-endian length, then JSON.
pub fn send<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), ProtoError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(ProtoError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| ProtoError::TooLarge(body.len()))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream.
pub fn recv<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, ProtoError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(serde_json::from_slice(&body)?))
}

/// Passes a file descriptor (the sandbox's terminal) across the control
/// channel, as one marker byte carrying SCM_RIGHTS. Sent between frames: the
/// receiver reads frames with exact lengths, so it never swallows the byte.
pub fn send_fd(socket: impl AsFd, fd: BorrowedFd<'_>) -> io::Result<()> {
    send_tagged_fd(socket, 0xfd, fd)
}

/// Receives the descriptor sent by [`send_fd`].
pub fn recv_fd(socket: impl AsFd) -> io::Result<OwnedFd> {
    let (tag, fd) = recv_tagged_fd(socket)?;
    if tag != 0xfd {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "expected a descriptor on the control channel",
        ));
    }
    Ok(fd)
}

/// The tag of the exec trace's seccomp listener on the control channel.
pub const EXEC_LISTENER_TAG: u8 = 0xe7;
/// The tag of the sandbox's user namespace, which the supervisor sends to
/// the exec trace's listener process once the agent exists.
pub const SANDBOX_USERNS_TAG: u8 = 0x05;

/// Passes a descriptor with a one-byte tag (which listener it came from).
pub fn send_tagged_fd(socket: impl AsFd, tag: u8, fd: BorrowedFd<'_>) -> io::Result<()> {
    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    if !control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("control message buffer too small"));
    }
    rustix::net::sendmsg(socket, &[IoSlice::new(&[tag])], &mut control, rustix::net::SendFlags::empty())?;
    Ok(())
}

/// Receives a descriptor and its tag; end of stream is `UnexpectedEof`.
pub fn recv_tagged_fd(socket: impl AsFd) -> io::Result<(u8, OwnedFd)> {
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )?;
    if msg.bytes == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    for message in control.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(mut fds) = message
            && let Some(fd) = fds.next()
        {
            return Ok((byte[0], fd));
        }
    }
    Err(io::Error::new(io::ErrorKind::InvalidData, "no descriptor arrived on the control channel"))
}

pub mod bytes;
pub mod exec_record;
pub mod exec_stream;
pub mod file;
pub mod handover;
pub mod plan;
pub mod port_connect;
pub mod supervisor;
pub mod time;
pub mod window;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn descriptors_pass_between_frames() {
        use std::os::unix::net::UnixStream;
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let (r, mut w) = std::io::pipe().unwrap();
        send(&mut a, &AgentMessage::Started { pid: 2 }).unwrap();
        send_fd(&a, r.as_fd()).unwrap();
        send(&mut a, &AgentMessage::Exited { code: Some(0), signal: None }).unwrap();
        let first: AgentMessage = recv(&mut b).unwrap().unwrap();
        assert_eq!(first, AgentMessage::Started { pid: 2 });
        let fd = recv_fd(&b).unwrap();
        let last: AgentMessage = recv(&mut b).unwrap().unwrap();
        assert_eq!(last, AgentMessage::Exited { code: Some(0), signal: None });
        w.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        std::fs::File::from(fd).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
    }

    /// The protocol is plain data: a guest agent built on it must not link
    /// the jail's machinery (seccompiler, landlock, cgroups).
    #[test]
    fn the_protocol_does_not_depend_on_the_jail() {
        let manifest = include_str!("../Cargo.toml");
        for crate_name in ["airlock-jail", "seccompiler", "landlock"] {
            assert!(!manifest.contains(crate_name), "proto depends on {crate_name}");
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        let msg = AgentMessage::Exited { code: Some(3), signal: None };
        send(&mut buf, &msg).unwrap();
        let back: AgentMessage = recv(&mut buf.as_slice()).unwrap().unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn clean_eof_is_none() {
        let r: Option<AgentMessage> = recv(&mut [].as_slice()).unwrap();
        assert!(r.is_none());
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let frame = u32::MAX.to_be_bytes();
        let r: Result<Option<AgentMessage>, _> = recv(&mut frame.as_slice());
        assert!(matches!(r, Err(ProtoError::TooLarge(_))));
    }

    #[test]
    fn unknown_message_type_is_malformed() {
        let body = br#"{"type":"give_me_root"}"#;
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        let r: Result<Option<AgentMessage>, _> = recv(&mut frame.as_slice());
        assert!(matches!(r, Err(ProtoError::Malformed(_))));
    }
}
