//! `/api/users`: accounts, their role, groups and active flag. Admin only, except that a
//! user may read their own record.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use reflow_common::names::validate_principal_name;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::{check_password, normalize_email};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{ApiJson, ApiPath, Caller};
use super::{AppState, Message};
use crate::auth::hash_password;
use crate::store::{NewUser, User, UserUpdate, DEFAULT_ROLE};

pub(crate) fn check_role(role: &str) -> ApiResult<()> {
    validate_principal_name("role", role).map_err(|e| ApiError::bad_request(format!("role: {e}")))
}

pub(crate) fn check_groups(groups: &[String]) -> ApiResult<()> {
    if groups.len() > 256 {
        return Err(ApiError::bad_request("groups: at most 256 groups"));
    }
    for group in groups {
        validate_principal_name("group", group).map_err(|e| ApiError::bad_request(format!("groups: {e}")))?;
    }
    Ok(())
}

/// All users.
#[utoipa::path(get, path = "/api/users", tag = "users", security(("bearer" = [])),
    responses((status = 200, body = [User]), (status = 403, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<User>>> {
    caller.require_admin()?;
    Ok(Json(state.store.list_users().await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub email: String,
    pub password: String,
    /// Default `user`.
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default = "yes")]
    pub active: bool,
}

fn yes() -> bool {
    true
}

/// Create a user (for closed registration).
#[utoipa::path(post, path = "/api/users", tag = "users", security(("bearer" = [])), request_body = CreateUser,
    responses((status = 201, body = User), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateUser>,
) -> ApiResult<(StatusCode, Json<User>)> {
    caller.require_admin()?;
    let email = normalize_email(&body.email)?;
    check_password(&body.password)?;
    let role = body.role.unwrap_or_else(|| DEFAULT_ROLE.to_string());
    check_role(&role)?;
    check_groups(&body.groups)?;
    let password_hash = hash_password(body.password).await;
    let user = state
        .store
        .create_user(NewUser { email, password_hash, role, groups: body.groups, active: body.active })
        .await?;
    Ok((StatusCode::CREATED, Json(user)))
}

/// One user: admins may read anyone, users themselves.
#[utoipa::path(get, path = "/api/users/{id}", tag = "users", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = User), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get(State(state): State<AppState>, caller: Caller, ApiPath(id): ApiPath<Uuid>) -> ApiResult<Json<User>> {
    if caller.user.id != id {
        caller.require_admin()?;
    }
    state.store.get_user(id).await?.map(Json).ok_or_else(|| ApiError::not_found("user"))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    #[serde(default)]
    pub role: Option<String>,
    /// Replaces the user's groups.
    #[serde(default)]
    pub groups: Option<Vec<String>>,
    #[serde(default)]
    pub active: Option<bool>,
    /// Sets a new password.
    #[serde(default)]
    pub password: Option<String>,
}

/// Change a user's role, groups, active flag or password. The last active admin cannot be
/// demoted or deactivated.
#[utoipa::path(put, path = "/api/users/{id}", tag = "users", security(("bearer" = [])), params(("id" = Uuid, Path)),
    request_body = UpdateUser,
    responses((status = 200, body = User), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateUser>,
) -> ApiResult<Json<User>> {
    caller.require_admin()?;
    if let Some(role) = &body.role {
        check_role(role)?;
    }
    if let Some(groups) = &body.groups {
        check_groups(groups)?;
    }
    let password_hash = match body.password {
        Some(password) => {
            check_password(&password)?;
            Some(hash_password(password).await)
        }
        None => None,
    };
    let update = UserUpdate { role: body.role, groups: body.groups, active: body.active, password_hash };
    Ok(Json(state.store.update_user(id, update).await?))
}

/// Delete a user with their API tokens, user-scoped credentials and policy subjects.
#[utoipa::path(delete, path = "/api/users/{id}", tag = "users", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = Message), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Message>> {
    caller.require_admin()?;
    state.store.delete_user(id).await?;
    Ok(Message::json("user deleted"))
}

/// What a recycle did: the original's `{recycled, user_id}` and which data planes took part.
#[derive(Debug, Serialize, ToSchema)]
pub struct Recycled {
    /// The user's MCP sessions recycled across every connected data plane.
    pub recycled: u32,
    pub user_id: Uuid,
    /// The user's new session generation.
    pub session_generation: i64,
    #[serde(flatten)]
    pub fleet: super::data_planes::Fleet,
}

/// Recycles every MCP session of `user` on every data plane: upstream sessions and `per_user`
/// processes opened for the user end, the client sessions stay and reopen them on next use.
async fn recycle(state: &AppState, user: Uuid) -> ApiResult<Json<Recycled>> {
    let session_generation = state.store.recycle_user(user).await?;
    tracing::info!(user_id = %user, session_generation, "recycle of a user's sessions requested");
    let (recycled, fleet) = super::data_planes::await_generation(
        state,
        reflow_proto::snapshot::v1::ResourceType::User,
        &user.to_string(),
        "session_generation",
        session_generation,
        |report| &report.recycled,
    )
    .await?;
    Ok(Json(Recycled { recycled, user_id: user, session_generation, fleet }))
}

/// Recycle a user's MCP sessions on every data plane (admin).
#[utoipa::path(post, path = "/api/users/{id}/recycle", tag = "users", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = Recycled), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn recycle_user(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Recycled>> {
    caller.require_admin()?;
    recycle(&state, id).await
}

/// Recycle the caller's own MCP sessions on every data plane.
#[utoipa::path(post, path = "/api/sessions/recycle", tag = "users", security(("bearer" = [])),
    responses((status = 200, body = Recycled), (status = 401, body = ErrorBody)))]
pub async fn recycle_own(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Recycled>, axum::response::Response> {
    use axum::response::IntoResponse;
    // Each recycle recompiles and ships a snapshot to every data plane: one per user per
    // cooldown (admins recycling others are not limited).
    {
        let mut recycles = state.recycles.lock().unwrap();
        recycles.retain(|_, at| at.elapsed() < RECYCLE_COOLDOWN);
        if let Some(at) = recycles.get(&caller.user.id) {
            let wait = (RECYCLE_COOLDOWN - at.elapsed()).as_secs() + 1;
            let error = ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!("you recycled your sessions moments ago; try again in {wait} s"),
            );
            let mut response = error.into_response();
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(wait));
            return Err(response);
        }
        recycles.insert(caller.user.id, std::time::Instant::now());
    }
    recycle(&state, caller.user.id).await.map_err(IntoResponse::into_response)
}

/// How often one user may recycle their own sessions.
const RECYCLE_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(5);
