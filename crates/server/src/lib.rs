//! `airlock daemon`: the HTTP/JSON API on a Unix socket through which
//! agents and platforms create, list, exec in, inspect, stop and destroy
//! sandboxes.
//!
//! The daemon owns no sandbox: each one has its own supervisor process
//! (`airlock_runtime::supervisor`), so the daemon can restart, or die,
//! while sandboxes run on and keep their deadlines. What it adds is the API,
//! tenancy (each request acts for the peer uid of its connection), an index
//! in SQLite (owners, labels, execs, events) and recovery: it reconciles the
//! index with the state directories at start and cleans up after
//! supervisors that died.
//!
//! ```text
//! serve     socket, peer credentials, accept loop, signals
//! tcp       the optional TLS listener, bearer tokens → uid
//! e2b/*     the optional E2B-compatible API: control plane and envd on one listener
//! routes    the one route table (router + OpenAPI sync test)
//! api/*     handlers, one file per resource (exec_session: the interactive exec)
//! sandbox   state dir + index row → what the API shows; tenancy checks
//! auth      the caller (Peer), and what a user may name on the host
//! scope     sandbox names per owner (stored `u<UID>-NAME` for other users)
//! db        SQLite schema, migrations, queries
//! redact    secret values out of what the index keeps (the supervisor redacts)
//! reconcile index ↔ state directories, dead supervisors
//! ```

mod api;
mod app;
mod auth;
mod body;
pub mod db;
mod e2b;
mod error;
mod extract;
mod reconcile;
mod redact;
pub mod routes;
mod sandbox;
mod scope;
mod serve;
mod tcp;

pub use e2b::E2bOptions;
pub use error::{ApiError, DaemonError};
pub use serve::{DaemonOptions, default_socket, run_daemon};
pub use tcp::TcpOptions;
