//! The data plane's HTTP surface: readiness, metrics ([`crate::telemetry`]), and the MCP
//! endpoints of [`crate::mcp`].

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::mcp::gateway::Gateway;

/// `/ready` and the MCP endpoints; with `metrics`, `/metrics` too.
pub fn router(gateway: Arc<Gateway>, metrics: bool) -> Router {
    let router = Router::new().route("/ready", get(ready)).with_state(gateway.clone());
    let router = if metrics {
        router.merge(reflow_common::telemetry::metrics::router(vec![gateway.telemetry.registry.clone()]))
    } else {
        router
    };
    router.merge(crate::mcp::http::routes(gateway))
}

fn rfc3339(at: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// 200 with the snapshot version when serving. 503 before the first snapshot, and while
/// *stale*: connected to a control plane whose snapshot cannot be applied (MCP traffic is still
/// served from the last snapshot, but it lags what was decided; a control plane that is merely
/// unreachable does not make a data plane stale). Also reports the sessions held, upstream
/// failures by target and failed STDIO starts.
async fn ready(State(gateway): State<Arc<Gateway>>) -> Response {
    let health = gateway.state.health();
    let stale = health.stale.as_ref().map(|(since, reason)| json!({"since": rfc3339(*since), "reason": reason}));
    match gateway.state.version() {
        Some(version) => {
            // By target name, as operators know them.
            let snapshot = gateway.state.load();
            let name_of = |id: &str| {
                let targets = snapshot.as_ref().map(|s| &s.view.targets);
                targets.and_then(|t| t.values().find(|t| t.id == id)).map_or_else(|| id.to_string(), |t| t.name.clone())
            };
            let failures: std::collections::BTreeMap<String, u64> =
                gateway.health.failures().into_iter().map(|(id, n)| (name_of(&id), n)).collect();
            let draining = gateway.draining.is_cancelled();
            let status = if draining {
                "draining"
            } else if stale.is_some() {
                "stale"
            } else {
                "ready"
            };
            let body = json!({
                "status": status,
                "version": version,
                "connected": health.connected,
                "stale": stale,
                "sessions": gateway.sessions.len(),
                "upstream_failures": failures,
                "stdio_failed_starts": gateway.pool.failed_starts.load(std::sync::atomic::Ordering::Relaxed),
                "audit": gateway.audit().map(|recorder| {
                    let audit = recorder.status();
                    json!({
                        "records": audit.written,
                        "buffered": audit.buffered,
                        "spool_bytes": audit.spool_bytes,
                        "spool_batches": audit.spool_batches,
                        "spooled_bytes": audit.spooled_bytes,
                        "spooled_records": audit.spooled_records,
                        "dropped": audit.dropped,
                        "refusing": audit.refusing,
                    })
                }),
            });
            let code = if stale.is_some() || draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
            (code, Json(body)).into_response()
        }
        None => {
            let body =
                json!({"status": "waiting for the first snapshot", "connected": health.connected, "stale": stale});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}
