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
use super::{AppState, Message};
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

/// What registration answers: the new `User` itself (the original's answer), and a JWT with
/// the user, as login answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Registered {
    #[serde(flatten)]
    pub account: User,
    #[serde(flatten)]
    pub session: AuthResponse,
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
    responses((status = 201, body = Registered), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn register(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Credentials>,
) -> ApiResult<(StatusCode, Json<Registered>)> {
    let email = normalize_email(&body.email)?;
    check_password(&body.password)?;
    if !state.settings.allow_registration && !state.store.list_users().await?.is_empty() {
        return Err(ApiError::forbidden("registration is closed; ask an admin to create your account"));
    }
    let password_hash = {
        let _slot = state.login_throttle.hashing().await.ok_or_else(|| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the gateway is busy; try again shortly")
        })?;
        hash_password(body.password).await
    };
    let user = state
        .store
        .register_user(NewUser { email, password_hash, role: DEFAULT_ROLE.into(), groups: Vec::new(), active: true })
        .await?;
    tracing::info!(user_id = %user.id, role = %user.role, "user registered");
    let (token, expires_at) = state.jwt.issue(&user);
    Ok((
        StatusCode::CREATED,
        Json(Registered { account: user.clone(), session: AuthResponse { token, expires_at, user } }),
    ))
}

/// Password guessing, bounded without letting a stranger lock an owner out.
///
/// Attempts are counted per (account, client address) and per client address, and counted
/// **before** the password is verified: with `auth.login_max_failures` failures or attempts in
/// progress for a key, further attempts are answered 429 without being evaluated, so sixty
/// guesses sent at once evaluate at most that many. A stranger's failures lock only the
/// stranger's own address (for that account, and after ten times as many, for every account),
/// never the owner signing in from elsewhere. Password hashing runs at most
/// `auth.password_hash_concurrency` at a time, for registration and login alike. The table is
/// bounded: past [`LoginThrottle::MAX_ENTRIES`] keys, expired entries are dropped, then the
/// oldest.
#[derive(Debug)]
pub struct LoginThrottle {
    entries: std::sync::Mutex<std::collections::HashMap<ThrottleKey, Attempts>>,
    hashing: tokio::sync::Semaphore,
    /// Hashes running now, and the most seen running at once (for tests and operators).
    active_hashing: std::sync::atomic::AtomicUsize,
    peak_hashing: std::sync::atomic::AtomicUsize,
}

/// A client address, with or without the account it tried.
type ThrottleKey = (Option<String>, std::net::IpAddr);

#[derive(Debug, Clone, Copy)]
struct Attempts {
    failures: u32,
    in_progress: u32,
    since: std::time::Instant,
}

/// An attempt being evaluated; it counts until [`Attempt::finish`] (a request dropped midway
/// counts as a failure).
#[derive(Debug)]
pub struct Attempt<'t> {
    throttle: &'t LoginThrottle,
    keys: [ThrottleKey; 2],
    done: bool,
}

impl Attempt<'_> {
    pub fn finish(mut self, succeeded: bool) {
        self.done = true;
        self.throttle.end(&self.keys, succeeded);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.throttle.end(&self.keys, false);
        }
    }
}

/// Hashing a password: a permit of the limited pool.
#[derive(Debug)]
pub struct Hashing<'t> {
    throttle: &'t LoginThrottle,
    _permit: tokio::sync::SemaphorePermit<'t>,
}

impl Drop for Hashing<'_> {
    fn drop(&mut self) {
        self.throttle.active_hashing.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl LoginThrottle {
    const MAX_ENTRIES: usize = 100_000;
    /// How many more failures lock a client address for every account.
    const PER_CLIENT_FACTOR: u32 = 10;
    /// How long a password check waits for a hashing slot before answering 503.
    const HASHING_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

    pub fn new(hash_concurrency: usize) -> Self {
        LoginThrottle {
            entries: Default::default(),
            hashing: tokio::sync::Semaphore::new(hash_concurrency.max(1)),
            active_hashing: Default::default(),
            peak_hashing: Default::default(),
        }
    }

    /// The most password hashes seen running at once.
    pub fn peak_hashing(&self) -> usize {
        self.peak_hashing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A slot to hash or verify a password in; `None` when none frees up in time.
    pub async fn hashing(&self) -> Option<Hashing<'_>> {
        let permit = tokio::time::timeout(Self::HASHING_WAIT, self.hashing.acquire()).await.ok()?.ok()?;
        let active = self.active_hashing.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.peak_hashing.fetch_max(active, std::sync::atomic::Ordering::SeqCst);
        Some(Hashing { throttle: self, _permit: permit })
    }

    /// Starts an attempt at `email` from `client`, or the seconds until one is allowed again.
    pub fn begin(
        &self,
        email: &str,
        client: std::net::IpAddr,
        max: u32,
        lockout: std::time::Duration,
    ) -> Result<Attempt<'_>, u64> {
        let keys = [(Some(email.to_string()), client), (None, client)];
        let limits = [max, max.saturating_mul(Self::PER_CLIENT_FACTOR)];
        let mut entries = self.entries.lock().expect("throttle lock");
        if entries.len() >= Self::MAX_ENTRIES {
            entries.retain(|_, a| a.in_progress > 0 || a.since.elapsed() < lockout);
            if entries.len() >= Self::MAX_ENTRIES {
                let oldest = entries.iter().filter(|(_, a)| a.in_progress == 0).min_by_key(|(_, a)| a.since);
                if let Some(oldest) = oldest.map(|(k, _)| k.clone()) {
                    entries.remove(&oldest);
                }
            }
        }
        let now = std::time::Instant::now();
        for (key, limit) in keys.iter().zip(limits) {
            let Some(attempts) = entries.get_mut(key) else { continue };
            if attempts.in_progress == 0 && attempts.since.elapsed() >= lockout {
                *attempts = Attempts { failures: 0, in_progress: 0, since: now };
            }
            if attempts.failures + attempts.in_progress >= limit {
                let left = lockout.saturating_sub(attempts.since.elapsed());
                return Err(left.as_secs().max(1));
            }
        }
        for key in &keys {
            entries.entry(key.clone()).or_insert(Attempts { failures: 0, in_progress: 0, since: now }).in_progress += 1;
        }
        Ok(Attempt { throttle: self, keys, done: false })
    }

    fn end(&self, keys: &[ThrottleKey; 2], succeeded: bool) {
        let mut entries = self.entries.lock().expect("throttle lock");
        for (i, key) in keys.iter().enumerate() {
            let Some(attempts) = entries.get_mut(key) else { continue };
            attempts.in_progress = attempts.in_progress.saturating_sub(1);
            if succeeded && i == 0 {
                // The owner got in from here: this address starts afresh for this account.
                entries.remove(key);
            } else if !succeeded {
                attempts.failures += 1;
                attempts.since = std::time::Instant::now();
            }
        }
    }
}

/// Exchange email and password for a JWT. Repeated failures from one client address are
/// refused for `auth.login_lockout` (429 with `Retry-After`) without the password being checked;
/// see [`LoginThrottle`].
#[utoipa::path(post, path = "/api/auth/login", tag = "auth", request_body = Credentials,
    responses((status = 200, body = AuthResponse), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn login(
    State(state): State<AppState>,
    client: super::extract::ClientAddress,
    ApiJson(body): ApiJson<Credentials>,
) -> Result<Json<AuthResponse>, Response> {
    let invalid = || ApiError::unauthorized("invalid email or password").into_response();
    let email = normalize_email(&body.email).map_err(|_| invalid())?;
    let (max, lockout) = (state.settings.login_max_failures, state.settings.login_lockout);
    let attempt = state.login_throttle.begin(&email, client.0, max, lockout).map_err(|seconds| {
        let error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            format!("too many failed logins from this address; try again in {seconds} s"),
        );
        let mut response = error.into_response();
        response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(seconds));
        response
    })?;
    if body.password.len() > MAX_PASSWORD_LEN {
        attempt.finish(false);
        return Err(invalid());
    }
    let found = state.store.user_by_email(&email).await.map_err(|e| ApiError::from(e).into_response())?;
    let hash = found.as_ref().map(|(_, hash)| hash.clone());
    let verified = {
        let _slot = state.login_throttle.hashing().await.ok_or_else(busy)?;
        verify_password(body.password, hash).await
    };
    attempt.finish(verified);
    if !verified {
        return Err(invalid());
    }
    let (user, _) = found.ok_or_else(invalid)?;
    if !user.active {
        return Err(ApiError::unauthorized("account is deactivated").into_response());
    }
    let (token, expires_at) = state.jwt.issue(&user);
    Ok(Json(AuthResponse { token, expires_at, user }))
}

/// Every password-hashing slot stayed busy.
fn busy() -> Response {
    let mut response = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the gateway is busy checking passwords; try again shortly",
    )
    .into_response();
    response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(2));
    response
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

/// An API token as listed: its metadata, with the original's `jti` (the token's id) and
/// `revoked_at` (always `null`: a revoked token is deleted, so it is never listed).
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiTokenView {
    #[serde(flatten)]
    pub token: ApiToken,
    pub jti: String,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiToken> for ApiTokenView {
    fn from(token: ApiToken) -> Self {
        ApiTokenView { jti: token.id.to_string(), revoked_at: None, token }
    }
}

/// A new API token: the token itself (shown only in this answer) with its metadata, both
/// nested as the original answered (`{api_token, token}`) and flat.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// The token itself. It is shown only in this response.
    pub token: String,
    pub api_token: ApiTokenView,
    #[serde(flatten)]
    pub info: ApiToken,
}

/// The caller's API tokens (metadata only).
#[utoipa::path(get, path = "/api/auth/tokens", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = [ApiTokenView]), (status = 401, body = ErrorBody)))]
pub async fn list_tokens(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<ApiTokenView>>> {
    Ok(Json(state.store.list_api_tokens(caller.user.id).await?.into_iter().map(ApiTokenView::from).collect()))
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
    Ok((StatusCode::CREATED, Json(CreatedToken { token: generated.secret, api_token: info.clone().into(), info })))
}

/// Revoke one of the caller's API tokens.
#[utoipa::path(delete, path = "/api/auth/tokens/{id}", tag = "auth", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Message), (status = 404, body = ErrorBody)))]
pub async fn delete_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Message>> {
    state.store.delete_api_token(caller.user.id, id).await?;
    Ok(Message::json("API token revoked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn password_hashing_runs_at_most_the_configured_number_at_once() {
        let throttle = std::sync::Arc::new(LoginThrottle::new(3));
        let tasks = (0..24).map(|_| {
            let throttle = throttle.clone();
            tokio::spawn(async move {
                let _slot = throttle.hashing().await.expect("a slot");
                crate::auth::hash_password("a password of some length".into()).await
            })
        });
        for task in futures::future::join_all(tasks).await {
            assert!(task.unwrap().starts_with("$argon2id$"));
        }
        assert_eq!(throttle.peak_hashing(), 3, "24 hashes, at most 3 at once, and 3 reached");
    }

    #[test]
    fn attempts_count_before_they_are_checked() {
        let throttle = LoginThrottle::new(1);
        let lockout = std::time::Duration::from_secs(60);
        let (stranger, owner): (std::net::IpAddr, std::net::IpAddr) =
            ("203.0.113.9".parse().unwrap(), "198.51.100.7".parse().unwrap());
        let held: Vec<_> = (0..3).map(|_| throttle.begin("a@example.com", stranger, 3, lockout).unwrap()).collect();
        assert!(throttle.begin("a@example.com", stranger, 3, lockout).is_err(), "three in progress: a fourth waits");
        for attempt in held {
            attempt.finish(false);
        }
        assert!(throttle.begin("a@example.com", stranger, 3, lockout).is_err(), "three failures lock the stranger");
        throttle.begin("a@example.com", owner, 3, lockout).expect("not the owner").finish(true);
        // Ten times as many failures lock the stranger's address for every account.
        for n in 0..27 {
            throttle.begin(&format!("u{n}@example.com"), stranger, 3, lockout).unwrap().finish(false);
        }
        assert!(throttle.begin("fresh@example.com", stranger, 3, lockout).is_err());
        assert!(throttle.begin("fresh@example.com", owner, 3, lockout).is_ok());
    }
}
