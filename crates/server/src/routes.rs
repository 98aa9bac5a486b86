//! The one list of routes. The router is built from it, and a test holds
//! it and the committed OpenAPI document (`openapi.json`) to each other, so
//! neither can gain or lose a route alone.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::routing::{MethodFilter, MethodRouter, on};

use crate::api::{audit, compat, events, exec, files, meta, sandboxes};
use crate::app::App;
use crate::extract::BODY_LIMIT;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Put => "put",
            Method::Delete => "delete",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Method::Get => MethodFilter::GET,
            Method::Post => MethodFilter::POST,
            Method::Put => MethodFilter::PUT,
            Method::Delete => MethodFilter::DELETE,
        }
    }
}

pub struct Route {
    pub method: Method,
    /// In OpenAPI (and axum 0.8) template syntax: `/v1/sandboxes/{name}`.
    pub path: &'static str,
    handler: MethodRouter<Arc<App>>,
}

fn route<H, T>(method: Method, path: &'static str, handler: H) -> Route
where
    H: Handler<T, Arc<App>>,
    T: 'static,
{
    Route { method, path, handler: on(method.filter(), handler) }
}

/// Every route the daemon serves.
pub fn table() -> Vec<Route> {
    use Method::*;
    vec![
        route(Get, "/v1/health", meta::health),
        route(Get, "/v1/openapi.json", meta::openapi),
        route(Get, "/v1/sandboxes", sandboxes::list),
        route(Post, "/v1/sandboxes", sandboxes::create),
        route(Get, "/v1/sandboxes/{name}", sandboxes::inspect),
        route(Delete, "/v1/sandboxes/{name}", sandboxes::remove),
        route(Post, "/v1/sandboxes/{name}/exec", exec::exec),
        route(Post, "/v1/sandboxes/{name}/stop", sandboxes::stop),
        route(Post, "/v1/sandboxes/{name}/extend", sandboxes::extend),
        route(Get, "/v1/sandboxes/{name}/diff", sandboxes::diff),
        route(Get, "/v1/sandboxes/{name}/logs", sandboxes::logs),
        route(Get, "/v1/sandboxes/{name}/audit", audit::audit),
        route(Get, "/v1/sandboxes/{name}/report", audit::report),
        route(Get, "/v1/sandboxes/{name}/export", audit::export),
        route(Post, "/v1/sandboxes/{name}/apply", sandboxes::apply),
        route(Get, "/v1/sandboxes/{name}/files", files::read),
        route(Put, "/v1/sandboxes/{name}/files", files::write),
        route(Delete, "/v1/sandboxes/{name}/files", files::remove),
        route(Get, "/v1/sandboxes/{name}/files/list", files::list),
        route(Get, "/v1/sandboxes/{name}/files/stat", files::stat),
        route(Post, "/v1/sandboxes/{name}/files/mkdir", files::mkdir),
        route(Post, "/v1/sandboxes/{name}/files/rename", files::rename),
        route(Get, "/v1/sandboxes/{name}/files/watch", files::watch),
        route(Get, "/v1/sandboxes/{name}/artifacts", files::artifacts),
        route(Get, "/v1/events", events::events),
        route(Get, "/metrics", meta::metrics),
        route(Get, "/vm", compat::list),
        route(Post, "/vm", compat::create),
        route(Delete, "/vm/{name}", compat::remove),
    ]
}

/// The `(method, path)` pairs of [`table`], sorted.
pub fn signatures() -> Vec<(Method, &'static str)> {
    let mut out: Vec<_> = table().iter().map(|r| (r.method, r.path)).collect();
    out.sort_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)));
    out
}

pub fn router(app: Arc<App>) -> Router {
    let mut by_path: BTreeMap<&'static str, MethodRouter<Arc<App>>> = BTreeMap::new();
    for r in table() {
        let merged = match by_path.remove(r.path) {
            Some(existing) => existing.merge(r.handler),
            None => r.handler,
        };
        by_path.insert(r.path, merged);
    }
    let mut router = Router::new();
    for (path, handler) in by_path {
        router = router.route(path, handler.fallback(meta::method_not_allowed));
    }
    router.fallback(meta::not_found).layer(DefaultBodyLimit::max(BODY_LIMIT)).with_state(app)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeSet;

    use airlock_runtime::state::StateRoot;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::auth::Peer;
    use crate::db::Db;

    /// A router over a state root holding one stopped sandbox of root's.
    fn fixture() -> (tempfile::TempDir, Router) {
        let tmp = tempfile::tempdir().unwrap();
        let root = StateRoot::at(tmp.path().to_path_buf());
        let dir = root.create_sandbox(Some("roots")).unwrap();
        let meta = serde_json::json!({
            "name": "roots", "created_at": "2026-01-01T00:00:00.000Z", "policy": "dev", "workspace": null,
            "workspace_mode": "none", "command": [], "state": "exited", "supervisor_pid": null,
            "host_uid": null, "cgroup": null, "started_at": null, "finished_at": null,
            "exit": null, "applied_at": null, "degraded": [], "owner_uid": 0, "labels": {"team": "a"}
        });
        std::fs::write(dir.meta_path(), meta.to_string()).unwrap();
        let app = Arc::new(App::with_db(root, Db::in_memory().unwrap()));
        (tmp, router(app))
    }

    async fn call(
        router: &Router,
        uid: Option<u32>,
        method: &str,
        uri: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let mut request =
            Request::builder().method(method).uri(uri).body(Body::from(body.to_owned())).unwrap();
        if let Some(uid) = uid {
            request.extensions_mut().insert(Peer { uid, gid: uid, pid: None });
        }
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    #[tokio::test]
    async fn tenancy_and_json_errors_through_the_router() {
        let (_tmp, router) = fixture();
        let (status, health) = call(&router, Some(1000), "GET", "/v1/health", "").await;
        assert_eq!((status, health["status"].as_str()), (StatusCode::OK, Some("ok")));

        let (_, list) = call(&router, Some(0), "GET", "/v1/sandboxes", "").await;
        assert_eq!(list["sandboxes"][0]["name"], "roots");
        assert_eq!(list["sandboxes"][0]["state"], "stopped");
        assert_eq!(list["sandboxes"][0]["labels"]["team"], "a");
        let (_, list) = call(&router, Some(1000), "GET", "/v1/sandboxes", "").await;
        assert_eq!(list["sandboxes"], serde_json::json!([]));
        let (_, vms) = call(&router, Some(1000), "GET", "/vm", "").await;
        assert_eq!(vms, serde_json::json!([]));

        let (status, _) = call(&router, Some(0), "GET", "/v1/sandboxes/roots", "").await;
        assert_eq!(status, StatusCode::OK);
        for (method, uri) in [
            ("GET", "/v1/sandboxes/roots"),
            ("GET", "/v1/sandboxes/roots/diff"),
            ("GET", "/v1/sandboxes/roots/audit"),
            ("GET", "/v1/sandboxes/roots/audit?follow=true"),
            ("GET", "/v1/sandboxes/roots/report"),
            ("GET", "/v1/sandboxes/roots/export"),
            ("POST", "/v1/sandboxes/roots/stop"),
            ("DELETE", "/v1/sandboxes/roots"),
            ("DELETE", "/vm/roots"),
            ("GET", "/v1/sandboxes/absent"),
        ] {
            let (status, body) = call(&router, Some(1000), method, uri, "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {uri}: {body}");
            assert_eq!(body["error"]["code"], "not_found", "{method} {uri}");
        }
        let (status, body) =
            call(&router, Some(1000), "POST", "/v1/sandboxes/roots/exec", r#"{"argv":["id"]}"#).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));

        let (status, body) = call(&router, None, "GET", "/v1/sandboxes", "").await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")));
        let (status, body) = call(&router, Some(0), "POST", "/v1/sandboxes", "{garbage").await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_json")));
        let (status, body) =
            call(&router, Some(0), "POST", "/v1/sandboxes/roots/extend", r#"{"seconds":1,"x":2}"#).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_json")));
        let (status, body) = call(&router, Some(0), "GET", "/v1/sandboxes/NOPE", "").await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_name")));
        let (status, body) = call(&router, Some(0), "PATCH", "/v1/sandboxes", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
        let (status, body) = call(&router, Some(0), "GET", "/nowhere", "").await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("no_route")));
        let (status, body) =
            call(&router, Some(0), "POST", "/v1/sandboxes/roots/exec", r#"{"argv":["id"]}"#).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("not_running")));
        let big = format!("{{\"name\":\"{}\"}}", "a".repeat(2 << 20));
        let (status, body) = call(&router, Some(0), "POST", "/v1/sandboxes", &big).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
        );
        let (status, body) = call(&router, Some(0), "GET", "/v1/events?follow=maybe", "").await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_query"))
        );
    }

    /// (status, headers, body) of one request as `uid`.
    async fn raw(router: &Router, uid: u32, uri: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let mut request = Request::builder().uri(uri).body(Body::empty()).unwrap();
        request.extensions_mut().insert(Peer { uid, gid: uid, pid: None });
        let response = router.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        (parts.status, parts.headers, axum::body::to_bytes(body, 1 << 24).await.unwrap().to_vec())
    }

    #[tokio::test]
    async fn the_audit_log_is_sent_as_written_and_the_report_as_html() {
        let (tmp, router) = fixture();
        // No log yet: an empty answer.
        let (status, headers, body) = raw(&router, 0, "/v1/sandboxes/roots/audit").await;
        assert_eq!((status, body.len()), (StatusCode::OK, 0));
        assert_eq!(headers["content-type"], "application/x-ndjson");

        let first = r#"{"ts":"2026-01-01T00:00:00.000Z","seq":1,"event":"created","policy":"dev","x":"<b>"}"#;
        let second = r#"{"ts":"2026-01-01T00:00:01.000Z","seq":2,"event":"stopped","reason":"r"}   "#;
        let torn = r#"{"ts":"2026-01-01T00:00:02.000Z","seq":3,"ev"#;
        let log = tmp.path().join("roots/audit.jsonl");
        std::fs::write(&log, format!("{first}\n{second}\n{torn}")).unwrap();
        let (status, _, body) = raw(&router, 0, "/v1/sandboxes/roots/audit").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            format!("{first}\n{second}\n"),
            "complete lines, byte for byte"
        );

        let (status, body) =
            call(&router, Some(0), "GET", "/v1/sandboxes/roots/audit?follow=perhaps", "").await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_query"))
        );
        let (status, body) = call(&router, Some(0), "GET", "/v1/sandboxes/roots/report?x=1", "").await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_query"))
        );

        let (status, headers, body) = raw(&router, 0, "/v1/sandboxes/roots/report").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.starts_with("default-src 'none';") && csp.ends_with("frame-ancestors 'none'"), "{csp}");
        let page = String::from_utf8(body).unwrap();
        assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
        assert!(page.contains("Sandbox <span class=\"mono\">roots</span>"));
        assert!(page.contains("created with policy dev") && page.contains("stopped: r"));
        assert!(page.contains("&lt;b&gt;") && !page.contains("<b>"), "event fields are escaped");
    }

    #[tokio::test]
    async fn the_export_is_a_bundle_that_checks_out() {
        let (tmp, router) = fixture();
        std::fs::write(tmp.path().join("roots/logs/stdout.log"), "exported-output\n").unwrap();
        let (status, headers, body) = raw(&router, 0, "/v1/sandboxes/roots/export").await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert_eq!(headers["content-type"], "application/zstd");
        assert_eq!(headers["content-disposition"], "attachment; filename=\"roots.tar.zst\"");
        assert_eq!(headers["content-length"], body.len().to_string().as_str());
        let file = tmp.path().join("got.tar.zst");
        std::fs::write(&file, &body).unwrap();
        let opened = airlock_runtime::bundle::open(&file, None).unwrap();
        assert_eq!(opened.manifest.sandbox, "roots");
        assert!(opened.manifest.members.iter().any(|m| m.path == std::path::Path::new("logs/stdout.log")));
        let (status, body) = call(&router, Some(0), "GET", "/v1/sandboxes/roots/export?x=1", "").await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_query"))
        );
        // Nothing of it is left in the state root.
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("export"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// The OpenAPI document and the router describe the same API.
    #[test]
    fn openapi_document_matches_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(meta::OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"), "bump info.version in openapi.json");
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "post", "put", "delete", "patch", "head", "options"].contains(&method.as_str()) {
                    documented.insert((method.clone(), path.clone()));
                }
            }
        }
        let served: BTreeSet<(String, String)> =
            signatures().into_iter().map(|(m, p)| (m.as_str().to_owned(), p.to_owned())).collect();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(undocumented.is_empty(), "routes missing from openapi.json: {undocumented:?}");
        assert!(unserved.is_empty(), "openapi.json documents routes the daemon lacks: {unserved:?}");
        assert_eq!(served.len(), table().len(), "a route is registered twice");
    }

    /// Every operation documents its error answer and has an id.
    #[test]
    fn openapi_operations_are_complete() {
        let doc: serde_json::Value = serde_json::from_str(meta::OPENAPI).unwrap();
        let mut ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if method == "parameters" {
                    continue;
                }
                let id =
                    op["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path}: no operationId"));
                assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
                let responses = op["responses"].as_object().unwrap();
                assert!(responses.keys().any(|k| k.starts_with('2')), "{method} {path}: no success response");
                if path.contains("{name}") {
                    assert!(responses.contains_key("404"), "{method} {path}: 404 not documented");
                }
                assert_eq!(
                    responses.get("401").and_then(|r| r["$ref"].as_str()),
                    Some("#/components/responses/Unauthorized"),
                    "{method} {path}: the TCP listener's 401 not documented"
                );
            }
        }
    }
}
