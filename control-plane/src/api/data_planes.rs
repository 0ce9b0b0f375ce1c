//! `/api/data-planes`: which data planes are connected, which snapshot version each has
//! acknowledged, and the last version each rejected; and the version every control-plane
//! replica serves.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiResult, ErrorBody};
use super::extract::Caller;
use super::AppState;
use crate::store::{ControlPlaneStatus, DataPlaneStatus};

#[derive(Debug, Serialize, ToSchema)]
pub struct DistributionStatus {
    /// The replica answering this request.
    pub control_plane_id: String,
    /// The snapshot version this replica serves; `null` before its first compilation.
    pub current_version: Option<String>,
    pub control_planes: Vec<ControlPlaneStatus>,
    pub data_planes: Vec<DataPlaneStatus>,
}

/// Snapshot distribution status.
#[utoipa::path(get, path = "/api/data-planes", tag = "data-planes", security(("bearer" = [])),
    responses((status = 200, body = DistributionStatus), (status = 403, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<DistributionStatus>> {
    caller.require_admin()?;
    Ok(Json(DistributionStatus {
        control_plane_id: state.hub.id().to_string(),
        current_version: state.hub.current().map(|s| s.version.clone()),
        control_planes: state.store.list_control_planes().await?,
        data_planes: state.store.list_data_planes().await?,
    }))
}

/// How long a recycle or restart waits for the connected data planes to apply it.
const APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the connected data planes did with a recycle or restart.
#[derive(Debug, Serialize, ToSchema)]
pub struct Fleet {
    /// Data planes connected when it was asked for.
    pub data_planes: usize,
    /// Those that had not applied it within the wait (their counts are missing from the total);
    /// they apply it when they next receive the snapshot.
    pub pending: Vec<String>,
}

/// [`await_applied`] for a generation the snapshot carries in the `field` of resource `id` of
/// type `kind`, which data planes report in the list `reports` picks from their report.
pub async fn await_generation(
    state: &AppState,
    kind: reflow_proto::snapshot::v1::ResourceType,
    id: &str,
    field: &str,
    generation: i64,
    reports: impl Fn(&crate::store::PlaneReport) -> &[crate::store::Applied],
) -> ApiResult<(u32, Fleet)> {
    await_applied(
        state,
        |snapshot| {
            let payload = snapshot.payload::<serde_json::Value>(kind, id);
            payload.and_then(|p| p[field].as_i64()).is_some_and(|carried| carried >= generation)
        },
        |plane| reports(&plane.report).iter().find(|d| d.id == id && d.generation >= generation).map(|d| d.count),
    )
    .await
}

/// After a write that bumped a generation, waits until the snapshot carries it
/// (`in_snapshot`) and every connected data plane has either reported it (`reported`: the
/// count it reported for that generation or a later one) or acknowledged a snapshot that
/// carries it; returns the summed counts. Data planes report before they acknowledge, so one
/// that acknowledged without reporting had nothing to recycle or restart.
pub(super) async fn await_applied(
    state: &AppState,
    in_snapshot: impl Fn(&crate::compile::Snapshot) -> bool,
    reported: impl Fn(&DataPlaneStatus) -> Option<u32>,
) -> ApiResult<(u32, Fleet)> {
    state.hub.changed();
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    let mut asked: Option<Vec<String>> = None;
    loop {
        let current = state.hub.current().filter(|s| in_snapshot(s));
        let planes: Vec<DataPlaneStatus> = state.store.list_data_planes().await?;
        let asked =
            asked.get_or_insert_with(|| planes.iter().filter(|p| p.connected).map(|p| p.node_id.clone()).collect());
        let mut total = 0;
        let mut pending = Vec::new();
        for node in asked.iter() {
            let plane = planes.iter().find(|p| p.node_id == *node);
            match (plane.and_then(&reported), plane, &current) {
                (Some(count), _, _) => total += count,
                (None, Some(plane), Some(current)) if plane.acked_version.as_deref() == Some(&current.version) => {}
                _ => pending.push(node.clone()),
            }
        }
        if pending.is_empty() || tokio::time::Instant::now() >= deadline {
            if !pending.is_empty() {
                tracing::warn!(pending = ?pending, "data planes did not apply a recycle or restart in time");
            }
            return Ok((total, Fleet { data_planes: asked.len(), pending }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
