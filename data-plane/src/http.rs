//! The data plane's HTTP surface: readiness, metrics, and the MCP endpoints of [`crate::mcp`].

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::mcp::gateway::Gateway;

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(gateway.clone())
        .merge(crate::mcp::http::routes(gateway))
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
            let status = if stale.is_some() { "stale" } else { "ready" };
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
            let code = if stale.is_some() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
            (code, Json(body)).into_response()
        }
        None => {
            let body =
                json!({"status": "waiting for the first snapshot", "connected": health.connected, "stale": stale});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// The data plane's state in the Prometheus text format.
async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    use std::fmt::Write as _;
    let health = gateway.state.health();
    let stale_seconds =
        health.stale.as_ref().map_or(0.0, |(since, _)| since.elapsed().unwrap_or_default().as_secs_f64());
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    metric(
        "reflow_snapshot_loaded",
        "gauge",
        "Whether a snapshot is being served.",
        u8::from(gateway.state.version().is_some()).to_string(),
    );
    metric(
        "reflow_snapshot_connected",
        "gauge",
        "Whether the stream to the control plane is open.",
        u8::from(health.connected).to_string(),
    );
    metric(
        "reflow_snapshot_stale",
        "gauge",
        "Whether the control plane's snapshot cannot be applied (the served one lags).",
        u8::from(health.stale.is_some()).to_string(),
    );
    metric(
        "reflow_snapshot_stale_seconds",
        "gauge",
        "How long the data plane has been stale.",
        format!("{stale_seconds:.3}"),
    );
    metric("reflow_snapshot_rejections_total", "counter", "Snapshot updates rejected.", health.rejections.to_string());
    metric("reflow_sessions", "gauge", "MCP client sessions held.", gateway.sessions.len().to_string());
    metric("reflow_stdio_processes", "gauge", "STDIO servers running.", gateway.pool.instances().len().to_string());
    metric(
        "reflow_stdio_failed_starts_total",
        "counter",
        "STDIO server starts that failed, timed out or were abandoned.",
        gateway.pool.failed_starts.load(std::sync::atomic::Ordering::Relaxed).to_string(),
    );
    metric(
        "reflow_refused_total",
        "counter",
        "MCP requests refused for exceeding a per-identity share (rate, sessions, in flight).",
        gateway.shares.refused().to_string(),
    );
    if let Some(recorder) = gateway.audit() {
        let audit = recorder.status();
        metric("reflow_audit_records_total", "counter", "Audit records written.", audit.written.to_string());
        metric(
            "reflow_audit_dropped_total",
            "counter",
            "Audit records dropped (spool full under drop_oldest, or unreadable).",
            audit.dropped.to_string(),
        );
        metric(
            "reflow_audit_spool_bytes",
            "gauge",
            "Bytes of audit records waiting on disk for the control plane.",
            audit.spool_bytes.to_string(),
        );
        metric(
            "reflow_audit_refusing",
            "gauge",
            "Whether MCP requests are refused because audit records cannot be kept (on_full: refuse).",
            u8::from(audit.refusing).to_string(),
        );
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
