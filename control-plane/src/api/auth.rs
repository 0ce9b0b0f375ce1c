//! `/api/auth`: registration, login, the caller's profile and API tokens.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{ApiJson, ApiPath, Caller};
use super::AppState;
use crate::auth::{generate_api_token, hash_password, verify_password};
use crate::store::{ApiToken, NewApiToken, NewUser, User, DEFAULT_ROLE};

/// Shortest accepted password.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest accepted password (Argon2 input is bounded to keep hashing cost bounded).
pub const MAX_PASSWORD_LEN: usize = 1024;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuthResponse {
    /// A JWT for `Authorization: Bearer`.
    pub token: String,
    pub expires_at: DateTime<Utc>,
    pub user: User,
}

/// Lowercases and checks an email address.
pub fn normalize_email(email: &str) -> ApiResult<String> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.contains('@')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && (domain.contains('.') || domain == "localhost")
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(ApiError::bad_request(format!("email: {email:?} is not a valid email address")))
    }
}

pub fn check_password(password: &str) -> ApiResult<()> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(ApiError::bad_request(format!("password: must be at least {MIN_PASSWORD_LEN} characters")));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(ApiError::bad_request(format!("password: must be at most {MAX_PASSWORD_LEN} bytes")));
    }
    Ok(())
}

/// Register a user. The first user registered becomes admin; later registrations can be
/// turned off with `auth.allow_registration: false`.
#[utoipa::path(post, path = "/api/auth/register", tag = "auth", request_body = Credentials,
    responses((status = 201, body = AuthResponse), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn register(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Credentials>,
) -> ApiResult<(StatusCode, Json<AuthResponse>)> {
    let email = normalize_email(&body.email)?;
    check_password(&body.password)?;
    if !state.settings.allow_registration && !state.store.list_users().await?.is_empty() {
        return Err(ApiError::forbidden("registration is closed; ask an admin to create your account"));
    }
    let password_hash = hash_password(body.password).await;
    let user = state
        .store
        .register_user(NewUser { email, password_hash, role: DEFAULT_ROLE.into(), groups: Vec::new(), active: true })
        .await?;
    tracing::info!(user_id = %user.id, role = %user.role, "user registered");
    let (token, expires_at) = state.jwt.issue(&user);
    Ok((StatusCode::CREATED, Json(AuthResponse { token, expires_at, user })))
}

/// Failed logins per account. Bounded: past [`LoginThrottle::MAX_ENTRIES`] accounts, expired
/// entries are dropped, then the oldest.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    failures: std::sync::Mutex<std::collections::HashMap<String, (u32, std::time::Instant)>>,
}

impl LoginThrottle {
    const MAX_ENTRIES: usize = 100_000;

    /// Seconds until `email` may try again, when it is locked out.
    fn locked_for(&self, email: &str, max: u32, lockout: std::time::Duration) -> Option<u64> {
        let failures = self.failures.lock().expect("throttle lock");
        let (count, since) = failures.get(email)?;
        let elapsed = since.elapsed();
        (*count >= max && elapsed < lockout).then(|| (lockout - elapsed).as_secs().max(1))
    }

    fn failed(&self, email: &str, lockout: std::time::Duration) {
        let mut failures = self.failures.lock().expect("throttle lock");
        if failures.len() >= Self::MAX_ENTRIES {
            failures.retain(|_, (_, since)| since.elapsed() < lockout);
            if failures.len() >= Self::MAX_ENTRIES {
                if let Some(oldest) = failures.iter().min_by_key(|(_, (_, since))| *since).map(|(k, _)| k.clone()) {
                    failures.remove(&oldest);
                }
            }
        }
        let now = std::time::Instant::now();
        let entry = failures.entry(email.to_string()).or_insert((0, now));
        if entry.1.elapsed() >= lockout {
            *entry = (0, now);
        }
        entry.0 += 1;
        entry.1 = now;
    }

    fn succeeded(&self, email: &str) {
        self.failures.lock().expect("throttle lock").remove(email);
    }
}

/// Exchange email and password for a JWT. After `auth.login_max_failures` failed attempts an
/// account is locked for `auth.login_lockout` (429 with `Retry-After`).
#[utoipa::path(post, path = "/api/auth/login", tag = "auth", request_body = Credentials,
    responses((status = 200, body = AuthResponse), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn login(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Credentials>,
) -> Result<Json<AuthResponse>, Response> {
    let invalid = || ApiError::unauthorized("invalid email or password").into_response();
    let email = normalize_email(&body.email).map_err(|_| invalid())?;
    let (max, lockout) = (state.settings.login_max_failures, state.settings.login_lockout);
    if let Some(seconds) = state.login_throttle.locked_for(&email, max, lockout) {
        let error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            format!("too many failed logins for this account; try again in {seconds} s"),
        );
        let mut response = error.into_response();
        response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(seconds));
        return Err(response);
    }
    if body.password.len() > MAX_PASSWORD_LEN {
        return Err(invalid());
    }
    let found = state.store.user_by_email(&email).await.map_err(|e| ApiError::from(e).into_response())?;
    let hash = found.as_ref().map(|(_, hash)| hash.clone());
    if !verify_password(body.password, hash).await {
        state.login_throttle.failed(&email, lockout);
        return Err(invalid());
    }
    state.login_throttle.succeeded(&email);
    let (user, _) = found.ok_or_else(invalid)?;
    if !user.active {
        return Err(ApiError::unauthorized("account is deactivated").into_response());
    }
    let (token, expires_at) = state.jwt.issue(&user);
    Ok(Json(AuthResponse { token, expires_at, user }))
}

/// The authenticated user.
#[utoipa::path(get, path = "/api/auth/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = User), (status = 401, body = ErrorBody)))]
pub async fn me(caller: Caller) -> Json<User> {
    Json(caller.user)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// A label to recognise the token by.
    pub name: String,
    /// Lifetime such as `30d` or `12h`; omitted: the token does not expire.
    #[serde(default)]
    pub expires_in: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// The token itself. It is shown only in this response.
    pub token: String,
    #[serde(flatten)]
    pub info: ApiToken,
}

/// The caller's API tokens (metadata only).
#[utoipa::path(get, path = "/api/auth/tokens", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = [ApiToken]), (status = 401, body = ErrorBody)))]
pub async fn list_tokens(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<ApiToken>>> {
    Ok(Json(state.store.list_api_tokens(caller.user.id).await?))
}

/// Create an API token for the caller. The token is returned once.
#[utoipa::path(post, path = "/api/auth/tokens", tag = "auth", security(("bearer" = [])), request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let name = body.name.trim().to_string();
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::bad_request("name: must be 1 to 128 characters"));
    }
    let expires_at = match body.expires_in.as_deref() {
        None => None,
        Some(text) => {
            let duration = humantime::parse_duration(text)
                .map_err(|e| ApiError::bad_request(format!("expires_in: {e} (examples: 30d, 12h)")))?;
            let duration = chrono::Duration::from_std(duration)
                .ok()
                .filter(|d| *d > chrono::Duration::zero() && *d <= chrono::Duration::days(3660))
                .ok_or_else(|| ApiError::bad_request("expires_in: must be between 1s and 10 years"))?;
            Some(crate::store::now() + duration)
        }
    };
    let limit = state.settings.limits.api_tokens_per_user;
    if state.store.list_api_tokens(caller.user.id).await?.len() >= limit {
        return Err(ApiError::limit(format!(
            "you hold {limit} API tokens, the most allowed (limits.api_tokens_per_user); revoke one first"
        )));
    }
    let generated = generate_api_token();
    let info = state
        .store
        .create_api_token(NewApiToken {
            user_id: caller.user.id,
            name,
            hash: generated.hash,
            prefix: generated.prefix,
            expires_at,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(CreatedToken { token: generated.secret, info })))
}

/// Revoke one of the caller's API tokens.
#[utoipa::path(delete, path = "/api/auth/tokens/{id}", tag = "auth", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    state.store.delete_api_token(caller.user.id, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
