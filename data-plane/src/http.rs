//! The data plane's HTTP surface: liveness, readiness, and the MCP endpoint's gate.
//!
//! `/mcp` refuses traffic with 503 until a snapshot has been accepted (fail closed: never
//! "allow all"), and authenticates every request from the snapshot. The MCP protocol itself
//! is not served by this build: an authenticated request gets a JSON-RPC error saying so.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::json;

use crate::auth::authenticate;
use crate::state::SnapshotState;

/// JSON-RPC error codes used before a request reaches a method.
const SERVER_ERROR: i64 = -32000;
const UNAUTHORIZED: i64 = -32001;
const METHOD_NOT_FOUND: i64 = -32601;

fn rpc_error(status: StatusCode, code: i64, message: &str) -> Response {
    let body = json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}});
    (status, Json(body)).into_response()
}

pub fn router(state: Arc<SnapshotState>) -> Router {
    Router::new().route("/ready", get(ready)).route("/mcp", any(mcp)).route("/mcp/{*rest}", any(mcp)).with_state(state)
}

/// 200 with the snapshot version when serving; 503 before the first snapshot.
async fn ready(State(state): State<Arc<SnapshotState>>) -> Response {
    match state.version() {
        Some(version) => (StatusCode::OK, Json(json!({"status": "ready", "version": version}))).into_response(),
        None => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "waiting for the first snapshot"}))).into_response()
        }
    }
}

async fn mcp(State(state): State<Arc<SnapshotState>>, request: Request) -> Response {
    let Some(snapshot) = state.load() else {
        let mut response = rpc_error(
            StatusCode::SERVICE_UNAVAILABLE,
            SERVER_ERROR,
            "this gateway has no configuration snapshot yet; try again shortly",
        );
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return response;
    };
    if let Err(failure) = authenticate(&snapshot.view, request.headers(), request.uri().query()) {
        let mut response = rpc_error(StatusCode::UNAUTHORIZED, UNAUTHORIZED, failure.0);
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"reflow\""));
        return response;
    }
    rpc_error(StatusCode::NOT_IMPLEMENTED, METHOD_NOT_FOUND, "MCP methods are not served by this data plane build")
}
