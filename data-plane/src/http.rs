//! The data plane's HTTP surface: readiness, and the MCP endpoints of [`crate::mcp`].

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::mcp::gateway::Gateway;

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new().route("/ready", get(ready)).with_state(gateway.clone()).merge(crate::mcp::http::routes(gateway))
}

/// 200 with the snapshot version when serving; 503 before the first snapshot. Also reports
/// the sessions held and upstream failures by target.
async fn ready(State(gateway): State<Arc<Gateway>>) -> Response {
    match gateway.state.version() {
        Some(version) => {
            let failures = gateway.upstream_failures.lock().unwrap().clone();
            let body = json!({
                "status": "ready",
                "version": version,
                "sessions": gateway.sessions.len(),
                "upstream_failures": failures,
            });
            (StatusCode::OK, Json(body)).into_response()
        }
        None => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "waiting for the first snapshot"}))).into_response()
        }
    }
}
