//! Per-scope credentials of a target: the token (`/tokens`, `/token`) and env values
//! (`/env`). Values are sealed before they reach the store and are write-only: listings
//! show scopes and keys, and only an admin who asks with `reveal=true` sees values.
//!
//! Who may write what is decided in one place, [`check_write`]:
//!
//! - admins write every scope; a key the target declares only at the scopes it names;
//! - a user writes only their own user scope (`/token`, `/env/user/<own id>`), only for targets
//!   some policy grants them something on, and only env keys the target declares user-settable;
//! - `BASE_URL`, `AUTH_HEADER` and `TIMEOUT` (where requests go, and for how long) are admins'
//!   alone, and their values are validated as a target's own URL and limits are;
//! - keys that change what a process runs (`NODE_OPTIONS`, `PYTHONSTARTUP`, `npm_config_*`,
//!   proxies, CA files, …) are never stored at a user scope of a STDIO or Kubernetes target;
//! - what one user's scope holds is bounded (`limits.values_per_user`, `limits.value_bytes_per_user`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use reflow_common::credentials::{resolve, Principal, Scope, ScopeKind};
use reflow_common::crypto::Aad;
use reflow_common::names::{
    changes_execution, is_forbidden_env_key, is_reserved_destination, validate_env_key_syntax, validate_header_name,
    validate_principal_name,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::targets::{check_url, find, runs_a_process};
use super::AppState;
use crate::store::{SecretEntry, SecretKind, Target};

const MAX_TOKEN_LEN: usize = 16 * 1024;
const MAX_ENV_VALUE_LEN: usize = 32 * 1024;

/// The associated data binding a sealed secret to its row: a ciphertext copied to another
/// target, scope, key or kind does not open.
pub fn secret_aad(target_id: Uuid, kind: SecretKind, scope: &Scope, name: &str) -> Aad {
    Aad::new("target_secret", &[&target_id.to_string(), kind.as_str(), scope.kind().as_str(), scope.value(), name])
}

/// A stored credential as listed: where it is and when it changed, never its value unless
/// an admin asked for it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretInfo {
    pub scope_type: ScopeKind,
    /// Role or group name, or user id; empty for `default`.
    pub scope_value: String,
    /// The env key; absent for tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub key_version: i32,
    pub updated_at: DateTime<Utc>,
    /// Present only with `reveal=true`, for admins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RevealQuery {
    /// Admins only: include values.
    #[serde(default)]
    pub reveal: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    pub token: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvBody {
    pub key: String,
    pub value: String,
}

fn open(state: &AppState, entry: &SecretEntry) -> ApiResult<String> {
    let aad = secret_aad(entry.target_id, entry.kind, &entry.scope, &entry.name);
    state.keyring.open_string(&entry.ciphertext, &aad).map(|v| v.to_string()).map_err(|e| {
        tracing::error!(target_id = %entry.target_id, scope = %entry.scope, error = %e, "stored secret does not open");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "a stored secret could not be decrypted")
    })
}

fn info(state: &AppState, entry: &SecretEntry, reveal: bool) -> ApiResult<SecretInfo> {
    Ok(SecretInfo {
        scope_type: entry.scope.kind(),
        scope_value: entry.scope.value().to_string(),
        key: (entry.kind == SecretKind::Env).then(|| entry.name.clone()),
        key_version: entry.key_version,
        updated_at: entry.updated_at,
        value: if reveal { Some(open(state, entry)?) } else { None },
    })
}

fn check_reveal(caller: &Caller, target: &Target, reveal: bool) -> ApiResult<()> {
    if reveal {
        caller.require_admin()?;
        tracing::warn!(admin = %caller.user.id, target = %target.name, "credential values revealed to an admin");
    }
    Ok(())
}

/// Parses a scope from the URL and checks the caller may write it.
async fn scope_for_write(state: &AppState, caller: &Caller, kind: &str, value: Option<&str>) -> ApiResult<Scope> {
    let kind = ScopeKind::parse(kind)
        .ok_or_else(|| ApiError::bad_request(format!("scope {kind:?} is not one of default, role, group, user")))?;
    let scope = match (kind, value) {
        (ScopeKind::Default, None) => Scope::Default,
        (ScopeKind::Default, Some(_)) => return Err(ApiError::bad_request("the default scope takes no value")),
        (_, None) => {
            return Err(ApiError::bad_request(format!("the {} scope needs a value in the path", kind.as_str())))
        }
        (ScopeKind::Role, Some(role)) => {
            validate_principal_name("role", role).map_err(ApiError::bad_request)?;
            Scope::Role(role.to_string())
        }
        (ScopeKind::Group, Some(group)) => {
            validate_principal_name("group", group).map_err(ApiError::bad_request)?;
            Scope::Group(group.to_string())
        }
        (ScopeKind::User, Some(user)) => {
            let id: Uuid =
                user.parse().map_err(|_| ApiError::bad_request(format!("user scope: {user:?} is not a user id")))?;
            if id != caller.user.id {
                caller.require_admin()?;
            }
            state
                .store
                .get_user(id)
                .await?
                .ok_or_else(|| ApiError::bad_request(format!("user scope: no user with id {id}")))?;
            Scope::User(id.to_string())
        }
    };
    if !matches!(&scope, Scope::User(id) if *id == caller.user.id.to_string()) {
        caller.require_admin()?;
    }
    Ok(scope)
}

/// Decides whether `caller` may store a value at `scope` of `target`: the token (`key` `None`)
/// or env `key`. The one place these rules live (see the module documentation).
async fn check_write(
    state: &AppState,
    caller: &Caller,
    target: &Target,
    scope: &Scope,
    key: Option<&str>,
) -> ApiResult<()> {
    let admin = caller.user.is_admin();
    if let Some(key) = key {
        if is_forbidden_env_key(key) {
            return Err(ApiError::forbidden(format!(
                "env key {key}: reserved at every scope, since it would change how the server process loads code"
            )));
        }
        let declared = target.env_key(key);
        if let Some(declaration) = declared {
            if !declaration.scopes.contains(&scope.kind()) {
                let scopes: Vec<&str> = declaration.scopes.iter().map(|s| s.as_str()).collect();
                return Err(ApiError::forbidden(format!(
                    "env key {key}: target {:?} declares it for the {} scope(s) only",
                    target.name,
                    scopes.join(", ")
                )));
            }
        }
        if matches!(scope, Scope::User(_)) && runs_a_process(target.transport_type) && changes_execution(key) {
            return Err(ApiError::forbidden(format!(
                "env key {key}: it changes what target {:?}'s server process runs, so it is never stored at a user scope",
                target.name
            )));
        }
        if !admin && is_reserved_destination(key) {
            return Err(ApiError::forbidden(format!(
                "env key {key}: it decides where target {:?}'s requests go; only admins set it",
                target.name
            )));
        }
        if !admin && !declared.is_some_and(|d| d.user_settable) {
            return Err(ApiError::forbidden(format!(
                "env key {key}: target {:?} does not declare it as one users may set",
                target.name
            )));
        }
    }
    if !admin && !super::policies::granted(state, &caller.user, target.id).await? {
        let what = key.map_or_else(|| "token".to_string(), |key| format!("env key {key}"));
        return Err(ApiError::forbidden(format!(
            "{what}: no policy grants you anything on target {:?}, so no values are stored for it",
            target.name
        )));
    }
    Ok(())
}

/// Refuses a write that would take a user scope over `limits.values_per_user` or
/// `limits.value_bytes_per_user`.
async fn check_usage(
    state: &AppState,
    target: &Target,
    kind: SecretKind,
    scope: &Scope,
    name: &str,
    sealed: usize,
) -> ApiResult<()> {
    let Scope::User(user) = scope else { return Ok(()) };
    let Ok(user) = user.parse::<Uuid>() else { return Ok(()) };
    let limits = &state.settings.limits;
    let (count, bytes) = state.store.user_secret_usage(user, (target.id, kind, name)).await?;
    if count as usize >= limits.values_per_user {
        return Err(ApiError::limit(format!(
            "this user scope already holds {count} values, the most allowed (limits.values_per_user)"
        )));
    }
    if bytes as usize + sealed > limits.value_bytes_per_user {
        return Err(ApiError::limit(format!(
            "this value would take the user scope past {} bytes (limits.value_bytes_per_user)",
            limits.value_bytes_per_user
        )));
    }
    Ok(())
}

async fn put(
    state: &AppState,
    target: &Target,
    kind: SecretKind,
    scope: Scope,
    name: &str,
    value: &str,
) -> ApiResult<SecretInfo> {
    let aad = secret_aad(target.id, kind, &scope, name);
    let ciphertext = state.keyring.seal(value.as_bytes(), &aad);
    check_usage(state, target, kind, &scope, name, ciphertext.len()).await?;
    let entry = SecretEntry {
        target_id: target.id,
        kind,
        scope,
        name: name.to_string(),
        ciphertext,
        key_version: state.keyring.current_version() as i32,
        updated_at: crate::store::now(),
    };
    state.store.put_secret(entry.clone()).await?;
    tracing::info!(target = %target.name, kind = kind.as_str(), scope = %entry.scope, key = %name, "credential set");
    info(state, &entry, false)
}

fn check_token(token: &str) -> ApiResult<()> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN || token.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "token: must be 1 to {MAX_TOKEN_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

fn check_env(body: &EnvBody) -> ApiResult<()> {
    validate_env_key_syntax(&body.key).map_err(|e| ApiError::bad_request(format!("key: {e}")))?;
    if body.value.len() > MAX_ENV_VALUE_LEN || body.value.contains('\0') {
        return Err(ApiError::bad_request(format!("value: must be at most {MAX_ENV_VALUE_LEN} bytes without NUL")));
    }
    // The reserved keys are validated as what they stand for.
    match body.key.to_ascii_uppercase().as_str() {
        "BASE_URL" => check_url("value (BASE_URL)", &body.value)?,
        "TIMEOUT" if reflow_common::credentials::parse_target_timeout(&body.value).is_none() => {
            return Err(ApiError::bad_request("value (TIMEOUT): seconds or a duration (such as 90s) from 1 s to 1 h"));
        }
        "AUTH_HEADER" => {
            validate_header_name(&body.value).map_err(|e| ApiError::bad_request(format!("value (AUTH_HEADER): {e}")))?
        }
        "AUTH_TOKEN" => check_token(&body.value).map_err(|_| {
            ApiError::bad_request(format!(
                "value (AUTH_TOKEN): must be 1 to {MAX_TOKEN_LEN} bytes without control characters"
            ))
        })?,
        _ => {}
    }
    Ok(())
}

/// The target's tokens at every scope.
#[utoipa::path(get, path = "/api/targets/{id}/tokens", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), RevealQuery),
    responses((status = 200, body = [SecretInfo]), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<RevealQuery>,
) -> ApiResult<Json<Vec<SecretInfo>>> {
    caller.require_admin()?;
    let target = find(&state, id).await?;
    check_reveal(&caller, &target, query.reveal)?;
    let entries = state.store.list_secrets(id, Some(SecretKind::Token)).await?;
    Ok(Json(entries.iter().map(|e| info(&state, e, query.reveal)).collect::<ApiResult<_>>()?))
}

/// Whether the caller has their own token for this target.
#[utoipa::path(get, path = "/api/targets/{id}/token", tag = "credentials", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = SecretInfo), (status = 404, body = ErrorBody)))]
pub async fn get_own_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<SecretInfo>> {
    find(&state, id).await?;
    let mine = Scope::User(caller.user.id.to_string());
    let entries = state.store.list_secrets(id, Some(SecretKind::Token)).await?;
    let entry = entries.iter().find(|e| e.scope == mine).ok_or_else(|| ApiError::not_found("token for the caller"))?;
    Ok(Json(info(&state, entry, false)?))
}

/// Set the caller's own token for this target.
#[utoipa::path(post, path = "/api/targets/{id}/token", tag = "credentials", security(("bearer" = [])), params(("id" = Uuid, Path)),
    request_body = TokenBody,
    responses((status = 201, body = SecretInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_own_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<TokenBody>,
) -> ApiResult<(StatusCode, Json<SecretInfo>)> {
    let target = find(&state, id).await?;
    let scope = Scope::User(caller.user.id.to_string());
    check_write(&state, &caller, &target, &scope, None).await?;
    check_token(&body.token)?;
    Ok((StatusCode::CREATED, Json(put(&state, &target, SecretKind::Token, scope, "", &body.token).await?)))
}

/// Remove the caller's own token for this target.
#[utoipa::path(delete, path = "/api/targets/{id}/token", tag = "credentials", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_own_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    find(&state, id).await?;
    let scope = Scope::User(caller.user.id.to_string());
    state.store.delete_secret(id, SecretKind::Token, &scope, "").await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Set the target's default token (`scope` is `default`).
#[utoipa::path(post, path = "/api/targets/{id}/tokens/{scope}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "default")), request_body = TokenBody,
    responses((status = 201, body = SecretInfo), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope)): ApiPath<(Uuid, String)>,
    ApiJson(body): ApiJson<TokenBody>,
) -> ApiResult<(StatusCode, Json<SecretInfo>)> {
    set_token_at(state, caller, id, &scope, None, body).await
}

/// Set the target's token for a role, group or user.
#[utoipa::path(post, path = "/api/targets/{id}/tokens/{scope}/{value}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "role, group or user"), ("value" = String, Path)),
    request_body = TokenBody,
    responses((status = 201, body = SecretInfo), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_scoped_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope, value)): ApiPath<(Uuid, String, String)>,
    ApiJson(body): ApiJson<TokenBody>,
) -> ApiResult<(StatusCode, Json<SecretInfo>)> {
    set_token_at(state, caller, id, &scope, Some(&value), body).await
}

async fn set_token_at(
    state: AppState,
    caller: Caller,
    id: Uuid,
    scope: &str,
    value: Option<&str>,
    body: TokenBody,
) -> ApiResult<(StatusCode, Json<SecretInfo>)> {
    let scope = scope_for_write(&state, &caller, scope, value).await?;
    let target = find(&state, id).await?;
    check_write(&state, &caller, &target, &scope, None).await?;
    check_token(&body.token)?;
    Ok((StatusCode::CREATED, Json(put(&state, &target, SecretKind::Token, scope, "", &body.token).await?)))
}

/// Remove the target's default token.
#[utoipa::path(delete, path = "/api/targets/{id}/tokens/{scope}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "default")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope)): ApiPath<(Uuid, String)>,
) -> ApiResult<StatusCode> {
    let scope = scope_for_write(&state, &caller, &scope, None).await?;
    find(&state, id).await?;
    state.store.delete_secret(id, SecretKind::Token, &scope, "").await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Remove the target's token for a role, group or user.
#[utoipa::path(delete, path = "/api/targets/{id}/tokens/{scope}/{value}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "role, group or user"), ("value" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_scoped_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope, value)): ApiPath<(Uuid, String, String)>,
) -> ApiResult<StatusCode> {
    let scope = scope_for_write(&state, &caller, &scope, Some(&value)).await?;
    find(&state, id).await?;
    state.store.delete_secret(id, SecretKind::Token, &scope, "").await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The target's env keys at every scope (admins), or the caller's own user-scope keys.
#[utoipa::path(get, path = "/api/targets/{id}/env", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), RevealQuery),
    responses((status = 200, body = [SecretInfo]), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<RevealQuery>,
) -> ApiResult<Json<Vec<SecretInfo>>> {
    let target = find(&state, id).await?;
    check_reveal(&caller, &target, query.reveal)?;
    let mine = Scope::User(caller.user.id.to_string());
    let entries = state.store.list_secrets(id, Some(SecretKind::Env)).await?;
    let visible = entries.iter().filter(|e| caller.user.is_admin() || e.scope == mine);
    Ok(Json(visible.map(|e| info(&state, e, query.reveal)).collect::<ApiResult<_>>()?))
}

/// Set a default env value.
#[utoipa::path(post, path = "/api/targets/{id}/env/{scope}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "default")), request_body = EnvBody,
    responses((status = 201, body = SecretInfo), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope)): ApiPath<(Uuid, String)>,
    ApiJson(body): ApiJson<EnvBody>,
) -> ApiResult<(StatusCode, Json<SecretInfo>)> {
    set_env_at(state, caller, id, &scope, None, body).await
}

/// Set an env value for a role, group or user.
#[utoipa::path(post, path = "/api/targets/{id}/env/{scope}/{value}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "role, group or user"), ("value" = String, Path)),
    request_body = EnvBody,
    responses((status = 201, body = SecretInfo), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_scoped_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope, value)): ApiPath<(Uuid, String, String)>,
    ApiJson(body): ApiJson<EnvBody>,
) -> ApiResult<(StatusCode, Json<SecretInfo>)> {
    set_env_at(state, caller, id, &scope, Some(&value), body).await
}

async fn set_env_at(
    state: AppState,
    caller: Caller,
    id: Uuid,
    scope: &str,
    value: Option<&str>,
    body: EnvBody,
) -> ApiResult<(StatusCode, Json<SecretInfo>)> {
    let scope = scope_for_write(&state, &caller, scope, value).await?;
    validate_env_key_syntax(&body.key).map_err(|e| ApiError::bad_request(format!("key: {e}")))?;
    let target = find(&state, id).await?;
    // Who may write comes first: a refused writer learns nothing about the value's checks.
    check_write(&state, &caller, &target, &scope, Some(&body.key)).await?;
    check_env(&body)?;
    Ok((StatusCode::CREATED, Json(put(&state, &target, SecretKind::Env, scope, &body.key, &body.value).await?)))
}

/// `default/{key}`: remove one default env value. `{role|group|user}/{value}`: remove every
/// env value of that scope.
#[utoipa::path(delete, path = "/api/targets/{id}/env/{scope}/{value}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path), ("value" = String, Path, description = "the key for default, else the scope value")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope, value)): ApiPath<(Uuid, String, String)>,
) -> ApiResult<StatusCode> {
    find(&state, id).await?;
    if scope == "default" {
        let scope = scope_for_write(&state, &caller, &scope, None).await?;
        state.store.delete_secret(id, SecretKind::Env, &scope, &value).await?;
    } else {
        let scope = scope_for_write(&state, &caller, &scope, Some(&value)).await?;
        if state.store.delete_scope_secrets(id, SecretKind::Env, &scope).await? == 0 {
            return Err(ApiError::not_found(format!("env for scope {scope}")));
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Remove one env value of a role, group or user.
#[utoipa::path(delete, path = "/api/targets/{id}/env/{scope}/{value}/{key}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path), ("value" = String, Path), ("key" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_scoped_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope, value, key)): ApiPath<(Uuid, String, String, String)>,
) -> ApiResult<StatusCode> {
    let scope = scope_for_write(&state, &caller, &scope, Some(&value)).await?;
    find(&state, id).await?;
    state.store.delete_secret(id, SecretKind::Env, &scope, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ResolveQuery {
    /// Admins only: resolve for this user instead of the caller.
    #[serde(default)]
    pub user_id: Option<Uuid>,
    /// Admins only: include values.
    #[serde(default)]
    pub reveal: bool,
}

/// Where one resolved value comes from.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResolvedValue {
    /// The env key; absent for the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub scope_type: ScopeKind,
    pub scope_value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// What a user's requests to a target would carry: the source of the token and of each env
/// key, after precedence (user > group > role > default) and the isolation boundary.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResolvedCredentials {
    pub target_id: Uuid,
    pub user_id: Uuid,
    pub isolation_boundary: reflow_common::credentials::Isolation,
    pub token: Option<ResolvedValue>,
    pub env: Vec<ResolvedValue>,
}

/// The credentials a user would receive for this target: sources, not values (admins may
/// ask for values with `reveal=true`).
#[utoipa::path(get, path = "/api/targets/{id}/env/resolve", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ResolveQuery),
    responses((status = 200, body = ResolvedCredentials), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn resolve_view(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<ResolveQuery>,
) -> ApiResult<Json<ResolvedCredentials>> {
    let target = find(&state, id).await?;
    check_reveal(&caller, &target, query.reveal)?;
    let user = match query.user_id {
        Some(user_id) if user_id != caller.user.id => {
            caller.require_admin()?;
            state.store.get_user(user_id).await?.ok_or_else(|| ApiError::not_found("user"))?
        }
        _ => caller.user.clone(),
    };
    let user_id = user.id.to_string();
    let principal = Principal { user_id: &user_id, role: &user.role, groups: &user.groups };
    let entries = state.store.list_secrets(id, None).await?;
    let resolved = |entry: &SecretEntry| -> ApiResult<ResolvedValue> {
        Ok(ResolvedValue {
            key: (entry.kind == SecretKind::Env).then(|| entry.name.clone()),
            scope_type: entry.scope.kind(),
            scope_value: entry.scope.value().to_string(),
            value: if query.reveal { Some(open(&state, entry)?) } else { None },
        })
    };
    let tokens = entries.iter().filter(|e| e.kind == SecretKind::Token).map(|e| (&e.scope, e));
    let token = resolve(tokens, &principal, target.isolation_boundary).map(|(_, e)| resolved(e)).transpose()?;
    let mut keys: Vec<&str> = entries.iter().filter(|e| e.kind == SecretKind::Env).map(|e| e.name.as_str()).collect();
    keys.sort();
    keys.dedup();
    let mut env = Vec::new();
    for key in keys {
        let candidates = entries.iter().filter(|e| e.kind == SecretKind::Env && e.name == key).map(|e| (&e.scope, e));
        if let Some((_, entry)) = resolve(candidates, &principal, target.isolation_boundary) {
            env.push(resolved(entry)?);
        }
    }
    Ok(Json(ResolvedCredentials {
        target_id: id,
        user_id: user.id,
        isolation_boundary: target.isolation_boundary,
        token,
        env,
    }))
}
