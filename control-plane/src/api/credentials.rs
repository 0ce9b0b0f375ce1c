//! Per-scope credentials of a target: the token (`/tokens`, `/token`) and env values
//! (`/env`). Values are sealed before they reach the store and are write-only: listings
//! show scopes and keys, and only an admin who asks with `reveal=true` sees values.
//!
//! Both spellings of the surface are served over one implementation: the original gateway's
//! (`PUT /token`, `PUT /tokens/role {role, token}`, `PUT /tokens/group {group_name, token}`,
//! `PUT /tokens/default {token}`, bulk `PUT /env/{scope}[/{value}]`) and this project's
//! (`POST /tokens/{scope}/{value}`, …). Answers carry the original's fields and this
//! project's side by side.
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

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use reflow_common::credentials::{resolve, Principal, Scope, ScopeKind};
use reflow_common::names::{
    changes_execution, is_forbidden_env_key, is_reserved_destination, validate_env_key_syntax, validate_header_name,
    validate_principal_name,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::targets::{check_url, find};
use super::{AppState, Message};
use crate::store::{SecretEntry, SecretKind, Target};

const MAX_TOKEN_LEN: usize = 16 * 1024;
const MAX_ENV_VALUE_LEN: usize = 32 * 1024;
const MAX_DESCRIPTION_LEN: usize = 1024;
/// Most entries one bulk `PUT` of env entries sets.
const MAX_BULK_ENTRIES: usize = 256;

pub use crate::store::secret_aad;

/// A stable id for an env entry (its row has a composite key): the same target, scope and key
/// always give the same id.
fn entry_id(entry: &SecretEntry) -> Uuid {
    let name = format!("{}/{}/{}/{}", entry.target_id, entry.kind.as_str(), entry.scope, entry.name);
    Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())
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
    /// The env entry's description; absent for tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub key_version: i32,
    pub updated_at: DateTime<Utc>,
    /// Present only with `reveal=true`, for admins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// What a write stored: the original's `{message}` and this project's [`SecretInfo`].
#[derive(Debug, Serialize, ToSchema)]
pub struct Stored {
    pub message: String,
    #[serde(flatten)]
    pub info: SecretInfo,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RevealQuery {
    /// Admins only: include values.
    #[serde(default)]
    pub reveal: bool,
}

/// A token to store. The scope's value comes from the path (`/tokens/role/{role}`) or, in the
/// original's spelling, from the body: `role` for `PUT /tokens/role`, `group_name` for
/// `PUT /tokens/group`, `user_id` for `PUT /tokens/user`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    pub token: String,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub group_name: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvBody {
    pub key: String,
    pub value: String,
    /// What the value is for; omitted: an existing entry keeps its description.
    #[serde(default)]
    pub description: Option<String>,
}

pub(crate) fn open(state: &AppState, entry: &SecretEntry) -> ApiResult<String> {
    let aad = secret_aad(entry.target_id, entry.kind, &entry.scope, &entry.name);
    state.keyring.open_string(&entry.ciphertext, &aad).map(|v| v.to_string()).map_err(|e| {
        tracing::error!(target_id = %entry.target_id, scope = %entry.scope, error = %e, "stored secret does not open");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "a stored secret could not be decrypted")
    })
}

fn info(state: &AppState, entry: &SecretEntry, reveal: bool) -> ApiResult<SecretInfo> {
    let env = entry.kind == SecretKind::Env;
    Ok(SecretInfo {
        scope_type: entry.scope.kind(),
        scope_value: entry.scope.value().to_string(),
        key: env.then(|| entry.name.clone()),
        description: env.then(|| entry.description.clone()),
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

/// Parses a scope from the URL (and, for the original's token bodies, the value the body
/// names) and checks the caller may write it.
async fn scope_for_write(state: &AppState, caller: &Caller, kind: &str, value: Option<&str>) -> ApiResult<Scope> {
    let scope = parse_scope(kind, value)?;
    if !matches!(&scope, Scope::User(id) if *id == caller.user.id.to_string()) {
        caller.require_admin()?;
    }
    // Looked up only once the caller may name the scope: nobody else learns which users exist.
    if let Scope::User(id) = &scope {
        let uuid: Uuid = id.parse().expect("parse_scope checked the id");
        state
            .store
            .get_user(uuid)
            .await?
            .ok_or_else(|| ApiError::bad_request(format!("user scope: no user with id {id}")))?;
    }
    Ok(scope)
}

/// A scope the caller may read: any for admins, their own user scope for everyone else.
async fn scope_for_read(state: &AppState, caller: &Caller, kind: &str, value: Option<&str>) -> ApiResult<Scope> {
    scope_for_write(state, caller, kind, value).await
}

pub(crate) fn parse_scope(kind: &str, value: Option<&str>) -> ApiResult<Scope> {
    let kind = ScopeKind::parse(kind)
        .ok_or_else(|| ApiError::bad_request(format!("scope {kind:?} is not one of default, role, group, user")))?;
    Ok(match (kind, value) {
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
            Scope::User(id.to_string())
        }
    })
}

/// The scope value a token body names in the original's spelling, checked against the scope
/// in the path and against a value the path already gives.
fn body_scope_value<'a>(kind: &str, path_value: Option<&'a str>, body: &'a TokenBody) -> ApiResult<Option<&'a str>> {
    let fields = [("role", &body.role), ("group_name", &body.group_name), ("user_id", &body.user_id)];
    let wanted = match kind {
        "role" => Some("role"),
        "group" => Some("group_name"),
        "user" => Some("user_id"),
        _ => None,
    };
    let mut from_body = None;
    for (field, value) in fields {
        let Some(value) = value else { continue };
        if Some(field) != wanted {
            return Err(ApiError::bad_request(format!("{field}: not a field of the {kind} scope's token")));
        }
        from_body = Some(value.as_str());
    }
    match (path_value, from_body) {
        (Some(path), Some(body)) if path != body => Err(ApiError::bad_request(format!(
            "{}: {body:?} differs from the scope value {path:?} in the path",
            wanted.unwrap_or("scope value")
        ))),
        (Some(path), _) => Ok(Some(path)),
        (None, Some(body)) => Ok(Some(body)),
        (None, None) => match wanted {
            Some(field) => Err(ApiError::bad_request(format!("{field}: required for the {kind} scope"))),
            None => Ok(None),
        },
    }
}
/// Decides whether `caller` may store a value at `scope` of `target`: the token (`key` `None`)
/// or env `key`. The one place these rules live (see the module documentation).
pub(crate) async fn check_write(
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
        if matches!(scope, Scope::User(_)) && target.transport_type.runs_a_process() && changes_execution(key) {
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

/// Refuses writes that would take a user scope over `limits.values_per_user` or
/// `limits.value_bytes_per_user`: `entries` are the values about to be stored at one scope of
/// `target`, replacing any stored under the same names.
async fn check_usage(state: &AppState, target: &Target, scope: &Scope, entries: &[SecretEntry]) -> ApiResult<()> {
    let Scope::User(user) = scope else { return Ok(()) };
    let Ok(user) = user.parse::<Uuid>() else { return Ok(()) };
    let limits = &state.settings.limits;
    // Everything the user holds, less what these writes replace.
    let (mut count, mut bytes) = state.store.user_secret_usage(user).await?;
    for stored in state.store.list_secrets(target.id, None).await? {
        if stored.scope == *scope && entries.iter().any(|e| e.kind == stored.kind && e.name == stored.name) {
            count = count.saturating_sub(1);
            bytes = bytes.saturating_sub(stored.ciphertext.len() as u64);
        }
    }
    let added: u64 = entries.iter().map(|e| e.ciphertext.len() as u64).sum();
    if count as usize + entries.len() > limits.values_per_user {
        return Err(ApiError::limit(format!(
            "this user scope holds {count} values; {} more would pass the most allowed, {} (limits.values_per_user)",
            entries.len(),
            limits.values_per_user
        )));
    }
    if (bytes + added) as usize > limits.value_bytes_per_user {
        return Err(ApiError::limit(format!(
            "these values would take the user scope past {} bytes (limits.value_bytes_per_user)",
            limits.value_bytes_per_user
        )));
    }
    Ok(())
}

/// Seals one value for `scope` of `target`.
pub(crate) fn seal(
    state: &AppState,
    target: &Target,
    kind: SecretKind,
    scope: &Scope,
    name: &str,
    value: &str,
) -> SecretEntry {
    let aad = secret_aad(target.id, kind, scope, name);
    SecretEntry {
        target_id: target.id,
        kind,
        scope: scope.clone(),
        name: name.to_string(),
        ciphertext: state.keyring.seal(value.as_bytes(), &aad),
        key_version: state.keyring.current_version() as i32,
        description: String::new(),
        updated_at: crate::store::now(),
    }
}

/// Stores sealed values of one scope of `target`, all or none, within the caller's limits.
async fn put_all(state: &AppState, target: &Target, scope: &Scope, entries: Vec<SecretEntry>) -> ApiResult<()> {
    check_usage(state, target, scope, &entries).await?;
    state.store.put_secrets(entries.clone()).await?;
    for entry in &entries {
        tracing::info!(target = %target.name, kind = entry.kind.as_str(), scope = %entry.scope, key = %entry.name, "credential set");
    }
    Ok(())
}

pub(crate) fn check_token(token: &str) -> ApiResult<()> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN || token.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "token: must be 1 to {MAX_TOKEN_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

pub(crate) fn check_env(body: &EnvBody) -> ApiResult<()> {
    validate_env_key_syntax(&body.key).map_err(|e| ApiError::bad_request(format!("key: {e}")))?;
    if let Some(description) = &body.description {
        if description.len() > MAX_DESCRIPTION_LEN || description.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "description: at most {MAX_DESCRIPTION_LEN} bytes without control characters"
            )));
        }
    }
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

/// A user scope that holds a token.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserToken {
    pub user_id: Uuid,
    /// `null` when the user no longer exists.
    pub user_email: Option<String>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RoleToken {
    pub role: String,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupToken {
    pub group_name: String,
    pub updated_at: DateTime<Utc>,
}

/// Which scopes of a target hold a token, never the token (the original's
/// `TargetTokenConfig`), and the same as [`SecretInfo`] entries (values with `reveal=true`).
#[derive(Debug, Serialize, ToSchema)]
pub struct TargetTokenConfig {
    pub target_id: Uuid,
    pub target_name: String,
    pub has_default: bool,
    pub user_tokens: Vec<UserToken>,
    pub role_tokens: Vec<RoleToken>,
    pub group_tokens: Vec<GroupToken>,
    pub entries: Vec<SecretInfo>,
}

/// The target's tokens at every scope.
#[utoipa::path(get, path = "/api/targets/{id}/tokens", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), RevealQuery),
    responses((status = 200, body = TargetTokenConfig), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<RevealQuery>,
) -> ApiResult<Json<TargetTokenConfig>> {
    caller.require_admin()?;
    let target = find(&state, id).await?;
    check_reveal(&caller, &target, query.reveal)?;
    let stored = state.store.list_secrets(id, Some(SecretKind::Token)).await?;
    let emails: BTreeMap<String, String> =
        state.store.list_users().await?.into_iter().map(|u| (u.id.to_string(), u.email)).collect();
    let mut config = TargetTokenConfig {
        target_id: target.id,
        target_name: target.name.clone(),
        has_default: false,
        user_tokens: Vec::new(),
        role_tokens: Vec::new(),
        group_tokens: Vec::new(),
        entries: Vec::new(),
    };
    for entry in &stored {
        let updated_at = entry.updated_at;
        match &entry.scope {
            Scope::Default => config.has_default = true,
            Scope::Role(role) => config.role_tokens.push(RoleToken { role: role.clone(), updated_at }),
            Scope::Group(group) => config.group_tokens.push(GroupToken { group_name: group.clone(), updated_at }),
            Scope::User(user) => config.user_tokens.push(UserToken {
                user_id: user.parse().unwrap_or_default(),
                user_email: emails.get(user).cloned(),
                updated_at,
            }),
        }
        config.entries.push(info(&state, entry, query.reveal)?);
    }
    Ok(Json(config))
}

/// Whether the caller has a token of their own for a target.
#[derive(Debug, Serialize, ToSchema)]
pub struct HasToken {
    pub has_token: bool,
    /// When it was last set; absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
}

/// Whether the caller has their own token for this target.
#[utoipa::path(get, path = "/api/targets/{id}/token", tag = "credentials", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = HasToken), (status = 404, body = ErrorBody)))]
pub async fn get_own_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<HasToken>> {
    find(&state, id).await?;
    let mine = Scope::User(caller.user.id.to_string());
    let entries = state.store.list_secrets(id, Some(SecretKind::Token)).await?;
    let updated_at = entries.iter().find(|e| e.scope == mine).map(|e| e.updated_at);
    Ok(Json(HasToken { has_token: updated_at.is_some(), updated_at }))
}

/// Set the caller's own token for this target (the original's spelling; answers 200).
#[utoipa::path(put, path = "/api/targets/{id}/token", tag = "credentials", security(("bearer" = [])), params(("id" = Uuid, Path)),
    request_body = TokenBody,
    responses((status = 200, body = Stored), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn put_own_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<TokenBody>,
) -> ApiResult<Json<Stored>> {
    let value = caller.user.id.to_string();
    set_token_at(&state, &caller, id, "user", Some(&value), body).await.map(Json)
}

/// Set the caller's own token for this target (answers 201).
#[utoipa::path(post, path = "/api/targets/{id}/token", tag = "credentials", security(("bearer" = [])), params(("id" = Uuid, Path)),
    request_body = TokenBody,
    responses((status = 201, body = Stored), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_own_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<TokenBody>,
) -> ApiResult<(StatusCode, Json<Stored>)> {
    let value = caller.user.id.to_string();
    Ok((StatusCode::CREATED, Json(set_token_at(&state, &caller, id, "user", Some(&value), body).await?)))
}

/// Remove the caller's own token for this target.
#[utoipa::path(delete, path = "/api/targets/{id}/token", tag = "credentials", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = Message), (status = 404, body = ErrorBody)))]
pub async fn delete_own_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Message>> {
    let value = caller.user.id.to_string();
    delete_token_at(&state, &caller, id, "user", Some(&value)).await
}

/// Set a token: `PUT /tokens/default {token}`, `PUT /tokens/role {role, token}`,
/// `PUT /tokens/group {group_name, token}` or `PUT /tokens/user {user_id, token}`.
#[utoipa::path(put, path = "/api/targets/{id}/tokens/{scope}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "default, role, group or user")), request_body = TokenBody,
    responses((status = 200, body = Stored), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn put_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope)): ApiPath<(Uuid, String)>,
    ApiJson(body): ApiJson<TokenBody>,
) -> ApiResult<Json<Stored>> {
    set_token_at(&state, &caller, id, &scope, None, body).await.map(Json)
}

/// Set a token, the scope value in the path or the body as for `PUT` (answers 201).
#[utoipa::path(post, path = "/api/targets/{id}/tokens/{scope}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "default, role, group or user")), request_body = TokenBody,
    responses((status = 201, body = Stored), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope)): ApiPath<(Uuid, String)>,
    ApiJson(body): ApiJson<TokenBody>,
) -> ApiResult<(StatusCode, Json<Stored>)> {
    Ok((StatusCode::CREATED, Json(set_token_at(&state, &caller, id, &scope, None, body).await?)))
}

/// Set the target's token for a role, group or user (answers 201).
#[utoipa::path(post, path = "/api/targets/{id}/tokens/{scope}/{value}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "role, group or user"), ("value" = String, Path)),
    request_body = TokenBody,
    responses((status = 201, body = Stored), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_scoped_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope, value)): ApiPath<(Uuid, String, String)>,
    ApiJson(body): ApiJson<TokenBody>,
) -> ApiResult<(StatusCode, Json<Stored>)> {
    Ok((StatusCode::CREATED, Json(set_token_at(&state, &caller, id, &scope, Some(&value), body).await?)))
}

/// Set the target's token for a role, group or user (answers 200).
#[utoipa::path(put, path = "/api/targets/{id}/tokens/{scope}/{value}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "role, group or user"), ("value" = String, Path)),
    request_body = TokenBody,
    responses((status = 200, body = Stored), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn put_scoped_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope, value)): ApiPath<(Uuid, String, String)>,
    ApiJson(body): ApiJson<TokenBody>,
) -> ApiResult<Json<Stored>> {
    set_token_at(&state, &caller, id, &scope, Some(&value), body).await.map(Json)
}

/// The one implementation behind every spelling of "store a token".
async fn set_token_at(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    scope: &str,
    value: Option<&str>,
    body: TokenBody,
) -> ApiResult<Stored> {
    let value = body_scope_value(scope, value, &body)?;
    let scope = scope_for_write(state, caller, scope, value).await?;
    let target = find(state, id).await?;
    check_write(state, caller, &target, &scope, None).await?;
    check_token(&body.token)?;
    let entry = seal(state, &target, SecretKind::Token, &scope, "", &body.token);
    put_all(state, &target, &scope, vec![entry.clone()]).await?;
    Ok(Stored { message: format!("token set for the {} scope", describe(&scope)), info: info(state, &entry, false)? })
}

/// `default`, `role developer`, … for messages.
fn describe(scope: &Scope) -> String {
    match scope {
        Scope::Default => "default".into(),
        other => format!("{} {}", other.kind().as_str(), other.value()),
    }
}

/// Remove the target's default token (`/tokens/default`).
#[utoipa::path(delete, path = "/api/targets/{id}/tokens/{scope}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "default")),
    responses((status = 200, body = Message), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope)): ApiPath<(Uuid, String)>,
) -> ApiResult<Json<Message>> {
    delete_token_at(&state, &caller, id, &scope, None).await
}

/// Remove the target's token for a role, group or user.
#[utoipa::path(delete, path = "/api/targets/{id}/tokens/{scope}/{value}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "role, group or user"), ("value" = String, Path)),
    responses((status = 200, body = Message), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_scoped_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope, value)): ApiPath<(Uuid, String, String)>,
) -> ApiResult<Json<Message>> {
    delete_token_at(&state, &caller, id, &scope, Some(&value)).await
}

async fn delete_token_at(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    scope: &str,
    value: Option<&str>,
) -> ApiResult<Json<Message>> {
    let scope = scope_for_write(state, caller, scope, value).await?;
    find(state, id).await?;
    state.store.delete_secret(id, SecretKind::Token, &scope, "").await?;
    Ok(Message::json(format!("token removed from the {} scope", describe(&scope))))
}
/// One env entry as listed: its key and description, never its value.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnvItem {
    /// Stable for the same target, scope and key.
    pub id: Uuid,
    pub key: String,
    pub description: String,
    pub updated_at: DateTime<Utc>,
}

fn env_item(entry: &SecretEntry) -> EnvItem {
    EnvItem {
        id: entry_id(entry),
        key: entry.name.clone(),
        description: entry.description.clone(),
        updated_at: entry.updated_at,
    }
}

/// A target's env entries by scope (the original's `TargetEnvConfigList`), and the same as
/// [`SecretInfo`] entries (values with `reveal=true`).
#[derive(Debug, Serialize, ToSchema)]
pub struct TargetEnvConfigList {
    pub target_id: Uuid,
    pub target_name: String,
    pub default_configs: Vec<EnvItem>,
    pub role_configs: BTreeMap<String, Vec<EnvItem>>,
    pub group_configs: BTreeMap<String, Vec<EnvItem>>,
    /// By user id.
    pub user_configs: BTreeMap<String, Vec<EnvItem>>,
    pub entries: Vec<SecretInfo>,
}

/// The target's env keys at every scope (admins), or the caller's own user-scope keys.
#[utoipa::path(get, path = "/api/targets/{id}/env", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), RevealQuery),
    responses((status = 200, body = TargetEnvConfigList), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<RevealQuery>,
) -> ApiResult<Json<TargetEnvConfigList>> {
    let target = find(&state, id).await?;
    check_reveal(&caller, &target, query.reveal)?;
    let mine = Scope::User(caller.user.id.to_string());
    let entries = state.store.list_secrets(id, Some(SecretKind::Env)).await?;
    let mut list = TargetEnvConfigList {
        target_id: target.id,
        target_name: target.name.clone(),
        default_configs: Vec::new(),
        role_configs: BTreeMap::new(),
        group_configs: BTreeMap::new(),
        user_configs: BTreeMap::new(),
        entries: Vec::new(),
    };
    for entry in entries.iter().filter(|e| caller.user.is_admin() || e.scope == mine) {
        let item = env_item(entry);
        match &entry.scope {
            Scope::Default => list.default_configs.push(item),
            Scope::Role(role) => list.role_configs.entry(role.clone()).or_default().push(item),
            Scope::Group(group) => list.group_configs.entry(group.clone()).or_default().push(item),
            Scope::User(user) => list.user_configs.entry(user.clone()).or_default().push(item),
        }
        list.entries.push(info(&state, entry, query.reveal)?);
    }
    Ok(Json(list))
}

/// The entries of one scope: keys, descriptions and times, no values.
async fn scope_entries(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    scope: &str,
    value: Option<&str>,
) -> ApiResult<Json<Vec<EnvItem>>> {
    // `/env/default/{key}`: the one default entry.
    let (value, key) = if scope == "default" { (None, value) } else { (value, None) };
    let scope = scope_for_read(state, caller, scope, value).await?;
    find(state, id).await?;
    let entries = state.store.list_secrets(id, Some(SecretKind::Env)).await?;
    let items: Vec<EnvItem> =
        entries.iter().filter(|e| e.scope == scope && key.is_none_or(|key| e.name == key)).map(env_item).collect();
    if let (Some(key), true) = (key, items.is_empty()) {
        return Err(ApiError::not_found(format!("env key {key:?} for scope default")));
    }
    Ok(Json(items))
}

/// The default scope's env entries.
#[utoipa::path(get, path = "/api/targets/{id}/env/{scope}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "default")),
    responses((status = 200, body = [EnvItem]), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope)): ApiPath<(Uuid, String)>,
) -> ApiResult<Json<Vec<EnvItem>>> {
    scope_entries(&state, &caller, id, &scope, None).await
}

/// The env entries of a role, group or user (users: their own).
#[utoipa::path(get, path = "/api/targets/{id}/env/{scope}/{value}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "role, group or user"), ("value" = String, Path)),
    responses((status = 200, body = [EnvItem]), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_scoped_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope, value)): ApiPath<(Uuid, String, String)>,
) -> ApiResult<Json<Vec<EnvItem>>> {
    scope_entries(&state, &caller, id, &scope, Some(&value)).await
}

/// Set a default env value.
#[utoipa::path(post, path = "/api/targets/{id}/env/{scope}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "default")), request_body = EnvBody,
    responses((status = 200, body = Stored), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope)): ApiPath<(Uuid, String)>,
    ApiJson(body): ApiJson<EnvBody>,
) -> ApiResult<Json<Stored>> {
    set_env_at(&state, &caller, id, &scope, None, vec![body]).await.map(|mut stored| Json(stored.remove(0)))
}

/// Set an env value for a role, group or user.
#[utoipa::path(post, path = "/api/targets/{id}/env/{scope}/{value}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "role, group or user"), ("value" = String, Path)),
    request_body = EnvBody,
    responses((status = 200, body = Stored), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_scoped_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope, value)): ApiPath<(Uuid, String, String)>,
    ApiJson(body): ApiJson<EnvBody>,
) -> ApiResult<Json<Stored>> {
    set_env_at(&state, &caller, id, &scope, Some(&value), vec![body]).await.map(|mut stored| Json(stored.remove(0)))
}

/// What a bulk `PUT` of env entries stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoredMany {
    pub message: String,
    pub entries: Vec<SecretInfo>,
}

/// Set several default env values at once: every entry is checked first, then all are stored
/// in one transaction, or none.
#[utoipa::path(put, path = "/api/targets/{id}/env/{scope}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "default")), request_body = Vec<EnvBody>,
    responses((status = 200, body = StoredMany), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn put_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope)): ApiPath<(Uuid, String)>,
    ApiJson(body): ApiJson<Vec<EnvBody>>,
) -> ApiResult<Json<StoredMany>> {
    bulk(set_env_at(&state, &caller, id, &scope, None, body).await?)
}

/// Set several env values of a role, group or user at once, all or none.
#[utoipa::path(put, path = "/api/targets/{id}/env/{scope}/{value}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path, description = "role, group or user"), ("value" = String, Path)),
    request_body = Vec<EnvBody>,
    responses((status = 200, body = StoredMany), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn put_scoped_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope, value)): ApiPath<(Uuid, String, String)>,
    ApiJson(body): ApiJson<Vec<EnvBody>>,
) -> ApiResult<Json<StoredMany>> {
    bulk(set_env_at(&state, &caller, id, &scope, Some(&value), body).await?)
}

fn bulk(stored: Vec<Stored>) -> ApiResult<Json<StoredMany>> {
    Ok(Json(StoredMany {
        message: format!("{} env entries set", stored.len()),
        entries: stored.into_iter().map(|s| s.info).collect(),
    }))
}

/// The one implementation behind every spelling of "store env values": each entry is checked
/// (who may write comes first, so a refused writer learns nothing about the value's checks),
/// then all are stored together.
async fn set_env_at(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    scope: &str,
    value: Option<&str>,
    bodies: Vec<EnvBody>,
) -> ApiResult<Vec<Stored>> {
    let scope = scope_for_write(state, caller, scope, value).await?;
    if bodies.is_empty() || bodies.len() > MAX_BULK_ENTRIES {
        return Err(ApiError::bad_request(format!("body: 1 to {MAX_BULK_ENTRIES} env entries")));
    }
    let target = find(state, id).await?;
    let existing = state.store.list_secrets(id, Some(SecretKind::Env)).await?;
    let mut entries = Vec::with_capacity(bodies.len());
    for (i, body) in bodies.iter().enumerate() {
        let at =
            |e: ApiError| if bodies.len() > 1 { ApiError { message: format!("[{i}] {}", e.message), ..e } } else { e };
        validate_env_key_syntax(&body.key).map_err(|e| at(ApiError::bad_request(format!("key: {e}"))))?;
        if bodies[..i].iter().any(|other| other.key == body.key) {
            return Err(at(ApiError::bad_request(format!("key: {:?} is listed twice", body.key))));
        }
        check_write(state, caller, &target, &scope, Some(&body.key)).await.map_err(at)?;
        check_env(body).map_err(at)?;
        let mut entry = seal(state, &target, SecretKind::Env, &scope, &body.key, &body.value);
        entry.description = match &body.description {
            Some(description) => description.clone(),
            None => existing
                .iter()
                .find(|e| e.scope == scope && e.name == body.key)
                .map(|e| e.description.clone())
                .unwrap_or_default(),
        };
        entries.push(entry);
    }
    put_all(state, &target, &scope, entries.clone()).await?;
    entries
        .iter()
        .map(|entry| {
            Ok(Stored {
                message: format!("env {} set for the {} scope", entry.name, describe(&scope)),
                info: info(state, entry, false)?,
            })
        })
        .collect()
}

/// `default/{key}`: remove one default env value. `{role|group|user}/{value}`: remove every
/// env value of that scope.
#[utoipa::path(delete, path = "/api/targets/{id}/env/{scope}/{value}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path), ("value" = String, Path, description = "the key for default, else the scope value")),
    responses((status = 200, body = Message), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope, value)): ApiPath<(Uuid, String, String)>,
) -> ApiResult<Json<Message>> {
    if scope == "default" {
        return delete_env_at(&state, &caller, id, &scope, None, &value).await;
    }
    let scope = scope_for_write(&state, &caller, &scope, Some(&value)).await?;
    find(&state, id).await?;
    let removed = state.store.delete_scope_secrets(id, SecretKind::Env, &scope).await?;
    if removed == 0 {
        return Err(ApiError::not_found(format!("env for scope {scope}")));
    }
    Ok(Message::json(format!("{removed} env entries removed from the {} scope", describe(&scope))))
}

/// Remove one env value of a role, group or user.
#[utoipa::path(delete, path = "/api/targets/{id}/env/{scope}/{value}/{key}", tag = "credentials", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("scope" = String, Path), ("value" = String, Path), ("key" = String, Path)),
    responses((status = 200, body = Message), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_scoped_env(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, scope, value, key)): ApiPath<(Uuid, String, String, String)>,
) -> ApiResult<Json<Message>> {
    delete_env_at(&state, &caller, id, &scope, Some(&value), &key).await
}

async fn delete_env_at(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    scope: &str,
    value: Option<&str>,
    key: &str,
) -> ApiResult<Json<Message>> {
    let scope = scope_for_write(state, caller, scope, value).await?;
    find(state, id).await?;
    state.store.delete_secret(id, SecretKind::Env, &scope, key).await?;
    Ok(Message::json(format!("env {key} removed from the {} scope", describe(&scope))))
}

/// Where `user`'s token for `target` comes from, named as audit lines name it (`user`,
/// `group:<name>`, `role:<name>`, `default`): an env `AUTH_TOKEN` that resolves wins over the
/// token, as data planes inject it.
pub async fn token_source(state: &AppState, target: &Target, user: &crate::store::User) -> ApiResult<Option<String>> {
    let entries = state.store.list_secrets(target.id, None).await?;
    let user_id = user.id.to_string();
    let principal = Principal { user_id: &user_id, role: &user.role, groups: &user.groups };
    let boundary = target.isolation_boundary.limiting(target.transport_type);
    let pick = |env: bool| {
        let candidates = entries.iter().filter(|e| {
            if env {
                e.kind == SecretKind::Env && e.name == "AUTH_TOKEN"
            } else {
                e.kind == SecretKind::Token
            }
        });
        resolve(candidates.map(|e| (&e.scope, e)), &principal, boundary).map(|(scope, _)| match scope {
            Scope::Default => "default".to_string(),
            Scope::User(_) => "user".to_string(),
            Scope::Group(group) => format!("group:{group}"),
            Scope::Role(role) => format!("role:{role}"),
        })
    };
    Ok(pick(true).or_else(|| pick(false)))
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

/// One resolved env key, as the original names it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResolvedConfig {
    pub key: String,
    /// `user`, `group`, `role` or `default`.
    pub source: ScopeKind,
    /// The group or role name, or the user id; `null` for `default`.
    pub scope_value: Option<String>,
    pub description: String,
    /// Present only with `reveal=true`, for admins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// What a user's requests to a target would carry: the source of the token and of each env
/// key, after precedence (user > group > role > default) and, for STDIO and Kubernetes targets,
/// the isolation boundary. `configs` is the original's `ResolvedEnvConfig`; `token` and `env`
/// are this project's spelling of the same.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResolvedCredentials {
    pub target_id: Uuid,
    pub target_name: String,
    pub user_id: Uuid,
    pub isolation_boundary: reflow_common::credentials::Isolation,
    pub configs: Vec<ResolvedConfig>,
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
    let boundary = target.isolation_boundary.limiting(target.transport_type);
    let entries = state.store.list_secrets(id, None).await?;
    let value = |entry: &SecretEntry| -> ApiResult<Option<String>> {
        if query.reveal {
            open(&state, entry).map(Some)
        } else {
            Ok(None)
        }
    };
    let resolved = |entry: &SecretEntry| -> ApiResult<ResolvedValue> {
        Ok(ResolvedValue {
            key: (entry.kind == SecretKind::Env).then(|| entry.name.clone()),
            scope_type: entry.scope.kind(),
            scope_value: entry.scope.value().to_string(),
            value: value(entry)?,
        })
    };
    let tokens = entries.iter().filter(|e| e.kind == SecretKind::Token).map(|e| (&e.scope, e));
    let token = resolve(tokens, &principal, boundary).map(|(_, e)| resolved(e)).transpose()?;
    let mut keys: Vec<&str> = entries.iter().filter(|e| e.kind == SecretKind::Env).map(|e| e.name.as_str()).collect();
    keys.sort();
    keys.dedup();
    let (mut env, mut configs) = (Vec::new(), Vec::new());
    for key in keys {
        let candidates = entries.iter().filter(|e| e.kind == SecretKind::Env && e.name == key).map(|e| (&e.scope, e));
        if let Some((_, entry)) = resolve(candidates, &principal, boundary) {
            env.push(resolved(entry)?);
            configs.push(ResolvedConfig {
                key: entry.name.clone(),
                source: entry.scope.kind(),
                scope_value: (entry.scope != Scope::Default).then(|| entry.scope.value().to_string()),
                description: entry.description.clone(),
                value: value(entry)?,
            });
        }
    }
    Ok(Json(ResolvedCredentials {
        target_id: id,
        target_name: target.name,
        user_id: user.id,
        isolation_boundary: target.isolation_boundary,
        configs,
        token,
        env,
    }))
}
