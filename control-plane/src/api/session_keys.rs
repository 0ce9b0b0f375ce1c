//! `/api/session-keys/rotate`: a new key seals MCP session ids from now on; ids sealed with the
//! keys it replaces keep opening, on every data plane, until the grace period ends.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::data_planes::{await_applied, Fleet};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::Caller;
use super::AppState;
use crate::store::session_key_aad;

/// How long ids sealed with a replaced key keep opening, unless the request says otherwise.
pub const DEFAULT_GRACE_SECONDS: u64 = 24 * 3600;
/// The longest grace a rotation may give.
pub const MAX_GRACE_SECONDS: u64 = 30 * 24 * 3600;
/// Keys retired this long ago are deleted at the next rotation.
const FORGET_AFTER: chrono::Duration = chrono::Duration::days(7);

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// Seconds that session ids sealed with the replaced keys keep opening: 0 refuses them at
    /// once (every open session must initialise again). Default 86400.
    pub grace_seconds: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Rotated {
    /// The new key's generation.
    pub generation: i64,
    /// When ids sealed with the replaced keys stop opening.
    pub previous_retire_at: DateTime<Utc>,
    #[serde(flatten)]
    pub fleet: Fleet,
}

/// Rotate the key that seals MCP session ids.
#[utoipa::path(post, path = "/api/session-keys/rotate", tag = "data-planes", security(("bearer" = [])),
    request_body(content = RotateRequest, content_type = "application/json"),
    responses((status = 200, body = Rotated), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn rotate(
    State(state): State<AppState>,
    caller: Caller,
    body: axum::body::Bytes,
) -> ApiResult<Json<Rotated>> {
    caller.require_admin()?;
    // The body is optional: an empty one rotates with the default grace.
    let request: RotateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RotateRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?
    };
    let grace = request.grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS);
    if grace > MAX_GRACE_SECONDS {
        return Err(ApiError::bad_request(format!("grace_seconds must be at most {MAX_GRACE_SECONDS}")));
    }
    let key = reflow_common::crypto::Key::generate();
    let ciphertext = state.keyring.seal(key.as_bytes(), &session_key_aad());
    let now = Utc::now();
    let retire_at = now + chrono::Duration::seconds(grace as i64);
    let rotated = state.store.rotate_session_key(ciphertext, retire_at, now - FORGET_AFTER).await?;
    tracing::info!(target: "reflow::audit", generation = rotated.generation, grace, "session key rotated");
    let generation = u32::try_from(rotated.generation).unwrap_or(u32::MAX);
    let (_, fleet) = await_applied(
        &state,
        |snapshot| {
            snapshot
                .payload::<reflow_proto::resources::Settings>(
                    reflow_proto::snapshot::v1::ResourceType::Settings,
                    reflow_proto::resources::SETTINGS_ID,
                )
                .is_some_and(|s| s.session_keys.iter().any(|k| k.generation == generation))
        },
        |_| None,
    )
    .await?;
    Ok(Json(Rotated { generation: rotated.generation, previous_retire_at: retire_at, fleet }))
}
