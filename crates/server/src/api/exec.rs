//! `POST /v1/sandboxes/{name}/exec`: runs a process in a running sandbox
//! and streams its events as NDJSON, one JSON object per line:
//!
//! ```text
//! {"type":"started","pid":12}
//! {"type":"stdout","data":"aGkK"}          base64, as the process wrote it
//! {"type":"stderr","data":"..."}
//! {"type":"exit","code":0,"signal":null,"timed_out":false}
//! {"type":"error","message":"..."}         only if the exec broke off
//! ```
//!
//! The supervisor client blocks, so the exec runs on a blocking thread and
//! hands each line to the response body through a bounded channel: a slow
//! reader slows the exec's output down rather than growing memory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use airlock_proto::Stream;
use airlock_proto::supervisor::{ExecEvent, ExecSpec};
use airlock_runtime::supervisor::SupervisorClient;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{DurationArg, check_env};
use crate::app::App;
use crate::auth::Peer;
use crate::body::{ChannelBody, base64};
use crate::db::ExecEnd;
use crate::error::ApiError;
use crate::extract::{JsonBody, SandboxName};
use crate::sandbox::{self, ApiState};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    #[serde(default)]
    pub tty: bool,
    pub timeout: Option<DurationArg>,
}

pub fn exec_spec(body: ExecBody) -> Result<ExecSpec, ApiError> {
    let invalid = |m: String| ApiError::bad_request("invalid_request", m);
    if body.argv.is_empty() || body.argv[0].is_empty() {
        return Err(invalid("argv must name a program: [\"echo\", \"hi\"]".into()));
    }
    if body.argv.len() > 4096 || body.argv.iter().any(|a| a.contains('\0')) {
        return Err(invalid("argv: at most 4096 arguments, none containing NUL".into()));
    }
    if body.tty {
        return Err(ApiError::bad_request(
            "unsupported",
            "tty exec is not available through the API yet; send tty: false",
        ));
    }
    if let Some(cwd) = &body.cwd
        && (!cwd.is_absolute() || cwd.as_os_str().as_encoded_bytes().contains(&0))
    {
        return Err(invalid(format!("cwd {} must be an absolute path", cwd.display())));
    }
    Ok(ExecSpec {
        argv: body.argv,
        env: check_env(&body.env)?,
        cwd: body.cwd,
        timeout_secs: body
            .timeout
            .as_ref()
            .map(|t| t.get("timeout"))
            .transpose()?
            .map(|d| d.as_secs().max(1)),
        ..ExecSpec::default()
    })
}

pub async fn exec(
    State(app): State<Arc<App>>,
    peer: Peer,
    SandboxName(name): SandboxName,
    JsonBody(body): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let spec = exec_spec(body)?;
    let target = name.clone();
    let (client, owner) = app
        .blocking(move |app| {
            let loaded = sandbox::authorize(app, &peer, &target)?;
            if loaded.state != ApiState::Running {
                return Err(ApiError::conflict(
                    "not_running",
                    format!("sandbox {target} is not running (state: {})", loaded.state.as_str()),
                ));
            }
            let client = SupervisorClient::connect(&loaded.dir).map_err(|e| {
                ApiError::conflict(
                    "not_managed",
                    format!("sandbox {target} has no supervisor to run processes ({e})"),
                )
            })?;
            Ok((client, loaded.owner_uid))
        })
        .await?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let worker = app.clone();
    tokio::task::spawn_blocking(move || run(&worker, &client, &spec, &name, owner, &tx));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::new(ChannelBody::new(rx)))
        .map_err(|e| ApiError::internal(format!("building the exec response: {e}")))
}

/// The blocking half: runs the exec, sends its lines, records it.
fn run(
    app: &App,
    client: &SupervisorClient,
    spec: &ExecSpec,
    name: &str,
    owner: u32,
    tx: &mpsc::Sender<Bytes>,
) {
    app.metrics.count_exec();
    let ts = airlock_runtime::now_rfc3339();
    let id = app
        .db
        .exec_started(name, &spec.argv, None, &ts)
        .map_err(|e| tracing::warn!(error = %e, "could not index an exec"))
        .ok();
    app.record_event(Some(name), Some(owner), "exec_started", serde_json::json!({ "argv": spec.argv }));
    let mut end = ExecEnd { code: None, signal: None, timed_out: false };
    let mut reader_gone = false;
    let mut send = |value: serde_json::Value| {
        if reader_gone {
            return;
        }
        let mut line = value.to_string().into_bytes();
        line.push(b'\n');
        // The reader hung up: the process runs on to its end (there is no
        // way to cancel it from here yet), its output is dropped.
        if tx.blocking_send(Bytes::from(line)).is_err() {
            reader_gone = true;
        }
    };
    let result = client.exec(spec, &mut |event| match event {
        ExecEvent::Started { pid } => {
            if let Some(id) = id {
                let _ = app.db.exec_pid(id, pid);
            }
            send(serde_json::json!({ "type": "started", "pid": pid }));
        }
        ExecEvent::Output { stream, data } => {
            let kind = match stream {
                Stream::Stdout => "stdout",
                Stream::Stderr => "stderr",
            };
            send(serde_json::json!({ "type": kind, "data": base64(&data) }));
        }
        ExecEvent::Exited { code, signal, timed_out } => {
            end = ExecEnd { code, signal, timed_out };
            send(
                serde_json::json!({ "type": "exit", "code": code, "signal": signal, "timed_out": timed_out }),
            );
        }
    });
    let error = result.err().map(|e| e.to_string());
    if let Some(message) = &error {
        send(serde_json::json!({ "type": "error", "message": message }));
    }
    let ended = airlock_runtime::now_rfc3339();
    if let Some(id) = id
        && let Err(e) = app.db.exec_ended(id, end, &ended)
    {
        tracing::warn!(error = %e, "could not index the end of an exec");
    }
    app.record_event(
        Some(name),
        Some(owner),
        "exec_ended",
        serde_json::json!({
            "argv": spec.argv,
            "code": end.code,
            "signal": end.signal,
            "timed_out": end.timed_out,
            "error": error,
        }),
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn body(json: &str) -> Result<ExecSpec, ApiError> {
        exec_spec(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn exec_requests_are_checked() {
        let spec = body(r#"{"argv":["echo","hi"],"env":{"A":"1"},"cwd":"/tmp","timeout":"5s"}"#).unwrap();
        assert_eq!(spec.argv, ["echo", "hi"]);
        assert_eq!(spec.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(spec.timeout_secs, Some(5));
        assert_eq!(body(r#"{"argv":[]}"#).unwrap_err().code, "invalid_request");
        assert_eq!(body(r#"{"argv":[""]}"#).unwrap_err().code, "invalid_request");
        assert_eq!(body(r#"{"argv":["a\u0000b"]}"#).unwrap_err().code, "invalid_request");
        assert_eq!(body(r#"{"argv":["sh"],"cwd":"rel"}"#).unwrap_err().code, "invalid_request");
        assert_eq!(body(r#"{"argv":["sh"],"tty":true}"#).unwrap_err().code, "unsupported");
        assert!(serde_json::from_str::<ExecBody>(r#"{"argv":["sh"],"stdin":"x"}"#).is_err());
    }
}
