//! `/api/observability`: the live activity feed over a WebSocket and the current activity
//! (admins). Both read [`crate::observe`]: events come from every data plane, through the
//! audit records they ship here.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::Json;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::Caller;
use super::AppState;
use crate::observe::{ActivityEvent, ErrorRates};
use crate::store::InstanceStatus;

/// The caller's bearer token as sent (the [`Caller`] extractor has checked it).
#[derive(Debug)]
pub struct BearerToken(String);

impl BearerToken {
    fn token(&self) -> &str {
        &self.0
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for BearerToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        let authorization = parts.headers.get(axum::http::header::AUTHORIZATION).map(|v| v.as_bytes());
        let token = reflow_common::bearer::bearer_token(authorization, parts.uri.query())
            .map_err(|e| ApiError::unauthorized(reflow_common::bearer::AuthFailure::Header(e).to_string()))?;
        Ok(BearerToken(token.to_string()))
    }
}

/// Recent requests in the snapshot.
const SNAPSHOT_RECENT: usize = 100;

/// Live activity: one JSON text message per MCP request (`{"type":"request", user_id, method,
/// target, tool, duration_ms, status, outcome, decision, trace_id, …}`), and
/// `{"type":"lagged","missed":N}` when this viewer fell behind and lost `N` events. The token is
/// checked again every few seconds: a caller revoked, expired or no longer admin is sent a
/// close (1008) and let go.
#[utoipa::path(get, path = "/api/observability/ws", tag = "observability", security(("bearer" = [])),
    responses((status = 101, description = "WebSocket of activity events"),
        (status = 400, description = "Not a WebSocket upgrade", body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn feed(
    State(state): State<AppState>,
    caller: Caller,
    bearer: BearerToken,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "websocket_required",
            format!("this endpoint is a WebSocket (GET with Upgrade: websocket): {rejection}"),
        )
    })?;
    let token = bearer.token().to_string();
    Ok(upgrade.on_upgrade(move |socket| view(socket, state, token)))
}

/// How often a viewer's token is checked again (revoked, expired, demoted: the feed ends).
const RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Sends events to one viewer until it goes away or may no longer watch. Only this task waits
/// on a slow viewer: the broadcast keeps at most its capacity of events for it, then it loses
/// the oldest.
async fn view(mut socket: WebSocket, state: AppState, token: String) {
    let observe: Arc<crate::observe::Observe> = state.hub.observe.clone();
    let mut events = observe.feed.subscribe();
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    recheck.tick().await;
    loop {
        let text = tokio::select! {
            _ = recheck.tick() => {
                let allowed = Caller::authenticate(&state, &token).await.is_ok_and(|c| c.user.is_admin());
                if allowed {
                    continue;
                }
                let close = axum::extract::ws::CloseFrame { code: 1008, reason: "no longer allowed to watch".into() };
                let _ = tokio::time::timeout(RECHECK, socket.send(Message::Close(Some(close)))).await;
                return;
            }
            received = events.recv() => match received {
                Ok(text) => text.to_string(),
                Err(RecvError::Lagged(missed)) => {
                    observe.feed.lost(missed);
                    serde_json::json!({"type": "lagged", "missed": missed}).to_string()
                }
                Err(RecvError::Closed) => return,
            },
            incoming = socket.recv() => match incoming {
                // A viewer says nothing we act on; pings are answered by the library.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            },
        };
        if socket.send(Message::Text(text.into())).await.is_err() {
            return;
        }
    }
}

/// One data plane's current activity, as it last reported.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlaneActivity {
    pub node_id: String,
    pub connected: bool,
    pub acked_version: Option<String>,
    pub sessions: u32,
    pub stdio_processes: usize,
    pub instances: Vec<InstanceStatus>,
    pub audit_spool_bytes: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActivitySnapshot {
    /// The replica answering (recent requests and error rates are the ones it received).
    pub control_plane_id: String,
    pub current_version: Option<String>,
    pub data_planes: Vec<PlaneActivity>,
    /// Over the connected data planes.
    pub sessions: u64,
    pub stdio_processes: usize,
    /// The newest first.
    pub recent_requests: Vec<ActivityEvent>,
    pub error_rates: ErrorRates,
    pub feed_viewers: usize,
    pub feed_dropped_events: u64,
}

/// Current activity: sessions and processes per data plane, recent requests, error rates.
#[utoipa::path(get, path = "/api/observability/snapshot", tag = "observability", security(("bearer" = [])),
    responses((status = 200, body = ActivitySnapshot), (status = 403, body = ErrorBody)))]
pub async fn snapshot(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<ActivitySnapshot>> {
    caller.require_admin()?;
    let observe = &state.hub.observe;
    let data_planes: Vec<PlaneActivity> = state
        .store
        .list_data_planes()
        .await?
        .into_iter()
        .map(|plane| PlaneActivity {
            stdio_processes: plane.instances.len(),
            sessions: plane.report.sessions,
            audit_spool_bytes: plane.report.audit_spool_bytes,
            node_id: plane.node_id,
            connected: plane.connected,
            acked_version: plane.acked_version,
            instances: plane.instances,
        })
        .collect();
    let connected = data_planes.iter().filter(|p| p.connected);
    let (sessions, stdio_processes) =
        connected.fold((0u64, 0usize), |(s, p), plane| (s + u64::from(plane.sessions), p + plane.stdio_processes));
    Ok(Json(ActivitySnapshot {
        control_plane_id: state.hub.id().to_string(),
        current_version: state.hub.current().map(|s| s.version.clone()),
        sessions,
        stdio_processes,
        data_planes,
        recent_requests: observe.feed.recent(SNAPSHOT_RECENT).iter().map(|e| e.as_ref().clone()).collect(),
        error_rates: observe.feed.error_rates(),
        feed_viewers: observe.feed.viewers(),
        feed_dropped_events: observe.feed.dropped(),
    }))
}
