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
