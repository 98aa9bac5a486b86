//! The protocol between a sandbox's supervisor and its clients (the daemon,
//! the CLI): one Unix-socket connection per operation, the same framing as
//! the agent protocol. The supervisor is the only peer that talks to the
//! agent; clients never reach inside the sandbox directly.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::Stream;
pub use crate::file::{FileOp, FileReply};

/// What a client asks a supervisor, first message on a connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Run a process; the connection then carries its events until it ends.
    Exec(ExecSpec),
    /// Stop the sandbox (its processes are killed; it is finalized).
    Stop,
    /// Move the deadline later by this many seconds.
    Extend { seconds: u64 },
    /// Set the deadline to this time (Unix seconds), earlier or later: what
    /// an E2B client's `set_timeout` asks. Never past the policy's maximum
    /// runtime; a time already past stops the sandbox at once.
    Deadline { unix: u64 },
    /// How the sandbox is doing.
    Status,
    /// After Exec, on the same connection: input for the process's stdin.
    Stdin {
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    /// After Exec: the client's input ended.
    CloseStdin,
    /// After Exec: a signal for the process's group (SIGINT, SIGTERM, …).
    Signal { signal: i32 },
    /// After Exec: the client's terminal changed size.
    Resize { rows: u16, cols: u16 },
    /// A file operation inside the sandbox; the connection then carries
    /// `Reply::File` answers until `Done` or `Failed`. For a write, the
    /// client sends `FileData` after `Ready`, as the socket takes them.
    File(FileOp),
    /// A connection to `port` on the sandbox's loopback: answered `Ok` once
    /// it is made (or `Error`), after which this connection carries its
    /// bytes both ways. `peer` says for the audit log whom it is for.
    ConnectPort { port: u16, peer: String },
    /// After `File(Write)`: the next bytes of the file.
    FileData {
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    /// These texts with the sandbox's secret values redacted, as its audit
    /// log redacts every string of its events: for a record kept outside
    /// the sandbox (the daemon's index), by a client that never holds the
    /// values. Answered `Redacted`, one text for each, in order.
    Redact { texts: Vec<String> },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Kill the process (and its group) after this many seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Run on a terminal of this size (rows, columns).
    #[serde(default)]
    pub tty: Option<(u16, u16)>,
    /// Run as this user of the sandbox (see `ExecRequest::user`).
    #[serde(default)]
    pub user: Option<String>,
}

/// What a supervisor sends back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Exec(ExecEvent),
    Ok,
    Status { running: bool, deadline_unix: u64, idle_timeout_secs: Option<u64>, execs_running: u32 },
    Error { message: String },
    File(FileReply),
    Redacted { texts: Vec<String> },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ExecEvent {
    Started {
        pid: i32,
    },
    Output {
        stream: Stream,
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    /// The last event of an exec. Exit codes follow `airlock run`: 126/127
    /// when it could not start, 124 when its timeout killed it.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
}
