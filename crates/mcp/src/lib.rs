//! `airlock mcp`: airlock's sandboxes as Model Context Protocol tools, on
//! stdio or on streamable HTTP, built on the official Rust SDK (`rmcp`).
//!
//! The tools are the CLI's operations, reached the way the CLI reaches
//! them (tools.rs: the tools; backend.rs: the daemon or the state
//! directory). Sandboxes made here are ordinary ones: `airlock ls` shows
//! them, and they outlive the MCP session until their policy's deadline.

mod backend;
mod capped;
mod tools;

use std::net::SocketAddr;

pub use backend::{Backend, BackendError};
use rmcp::ServiceExt;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
pub use tools::AirlockTools;

/// The path the streamable HTTP transport is served on.
pub const HTTP_PATH: &str = "/mcp";

/// How `airlock mcp` was started.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Offer the `apply` tool (writes a sandbox's changes to the host).
    pub allow_apply: bool,
    /// Serve streamable HTTP on this loopback address instead of stdio.
    pub listen: Option<SocketAddr>,
    /// Work on the state directory even when a daemon answers.
    pub direct: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("cannot start the MCP server's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(
        "--listen {0}: the MCP server has no authentication, so it listens on a loopback address only \
         (127.0.0.1 or ::1); reach it from elsewhere through an SSH tunnel"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving MCP over HTTP: {0}")]
    Http(#[source] std::io::Error),
    #[error("the MCP session on stdio failed: {0}")]
    Session(String),
}

/// Serves until the client goes away (stdio) or the process is ended (HTTP).
pub fn serve(options: Options) -> Result<(), McpError> {
    if let Some(addr) = options.listen
        && !addr.ip().is_loopback()
    {
        return Err(McpError::NotLoopback(addr));
    }
    // Before the runtime: finding the daemon runs a small runtime of its own.
    let backend = Backend::choose(options.direct)?;
    tracing::info!("airlock mcp: working {}", backend.describe());
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(McpError::Runtime)?;
    let tools = AirlockTools::new(backend, options.allow_apply);
    match options.listen {
        None => runtime.block_on(serve_stdio(tools)),
        Some(addr) => runtime.block_on(serve_http(tools, addr)),
    }
}

async fn serve_stdio(tools: AirlockTools) -> Result<(), McpError> {
    let running = tools
        .serve(rmcp::transport::io::stdio_pipes())
        .await
        .map_err(|e| McpError::Session(e.to_string()))?;
    running.waiting().await.map_err(|e| McpError::Session(e.to_string()))?;
    Ok(())
}

async fn serve_http(tools: AirlockTools, addr: SocketAddr) -> Result<(), McpError> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| McpError::Bind { addr, source })?;
    // Loopback hosts only (the default: a DNS-rebinding page cannot name
    // it), and no browser page may call it at all: any Origin is refused.
    let config = StreamableHttpServerConfig::default().enforce_origin_validation();
    let service: StreamableHttpService<AirlockTools, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(tools.clone()), Default::default(), config);
    let router = axum::Router::new().nest_service(HTTP_PATH, service);
    let bound = listener.local_addr().map_err(McpError::Http)?;
    // The address as bound (a port 0 was given a real one), for whoever
    // started us.
    eprintln!("airlock: MCP on http://{bound}{HTTP_PATH}");
    axum::serve(listener, router).await.map_err(McpError::Http)
}
