//! Extractors that turn every malformed request into an [`ApiError`] with a JSON body
//! (axum's own rejections answer in plain text), and the [`Caller`] extractor that
//! authenticates a request.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::error::ApiError;
use super::AppState;
use reflow_common::bearer::{bearer_token, AuthFailure};

use crate::auth::{hash_api_token, API_TOKEN_PREFIX};
use crate::store::User;

/// A JSON body. Unknown fields, wrong types, bad syntax, a missing content type and an
/// oversized body each get a 4xx naming the problem.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // The listener's body timeout (server.body_timeout): a body that does not arrive in
        // time is a 408, not a connection held open.
        let timeout = req
            .extensions()
            .get::<reflow_common::server::BodyTimeout>()
            .map_or(std::time::Duration::from_secs(30), |t| t.0);
        match tokio::time::timeout(timeout, axum::Json::<T>::from_request(req, state)).await {
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the request body was not received within {timeout:?} (server.body_timeout)"),
            )),
            Ok(Ok(axum::Json(value))) => Ok(ApiJson(value)),
            Ok(Err(rejection)) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match &rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected a body with Content-Type: application/json",
        ),
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::bad_request(format!("malformed JSON: {}", rejection.body_text()))
        }
        JsonRejection::JsonDataError(_) => {
            ApiError::bad_request(format!("invalid request body: {}", rejection.body_text()))
        }
        _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "request body is too large")
        }
        _ => ApiError::bad_request(rejection.body_text()),
    }
}

/// Path parameters; a malformed id is a 400 naming it.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e: PathRejection| ApiError::bad_request(format!("invalid path: {}", e.body_text())))
    }
}

/// Query parameters; unknown or malformed ones are a 400.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
    }
}

/// The authenticated user making a request, loaded fresh from the store so role, group and
/// active changes apply to tokens already issued.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: User,
}

impl Caller {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.user.is_admin() {
            Ok(())
        } else {
            Err(ApiError::admin_only())
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let authorization = parts.headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
        let token = bearer_token(authorization, parts.uri.query())
            .map_err(|e| ApiError::unauthorized(AuthFailure::Header(e).to_string()))?;
        Caller::authenticate(state, token).await
    }
}

impl Caller {
    /// Who `token` (a JWT or an API token) is now: for requests, and again for long-lived
    /// connections (the live feed) so that a revoked, expired or demoted caller is let go.
    pub async fn authenticate(state: &AppState, token: &str) -> Result<Caller, ApiError> {
        // The same refusals, with the same messages, as the data plane's MCP endpoint.
        let refuse = |failure: AuthFailure| ApiError::unauthorized(failure.to_string());

        let user = if token.starts_with(API_TOKEN_PREFIX) {
            let (api_token, user) = state
                .store
                .api_token_by_hash(&hash_api_token(token))
                .await?
                .ok_or_else(|| refuse(AuthFailure::UnknownApiToken))?;
            let now = chrono::Utc::now();
            if api_token.expires_at.is_some_and(|at| at <= now) {
                return Err(refuse(AuthFailure::ExpiredApiToken));
            }
            // Recording use costs a write; once a minute per token is enough to answer
            // "is this token still used".
            if api_token.last_used_at.is_none_or(|at| now - at > chrono::Duration::seconds(60)) {
                state.store.touch_api_token(api_token.id, crate::store::now()).await?;
            }
            user
        } else {
            let claims = state.jwt.verify(token).map_err(|e| refuse(AuthFailure::Token(e)))?;
            let id = claims.sub.parse().map_err(|_| refuse(AuthFailure::UnknownUser))?;
            state.store.get_user(id).await?.ok_or_else(|| refuse(AuthFailure::UnknownUser))?
        };
        if !user.active {
            return Err(refuse(AuthFailure::Deactivated));
        }
        Ok(Caller { user })
    }
}

/// The client's address: the peer, or, when the peer is one of `server.trusted_proxies`, the
/// nearest address before it in `X-Forwarded-For` that is not a trusted proxy.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress(pub std::net::IpAddr);

impl FromRequestParts<AppState> for ClientAddress {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |info| info.0.ip());
        let trusted = &state.settings.trusted_proxies;
        Ok(ClientAddress(reflow_common::net::client_address(peer, &parts.headers, trusted)))
    }
}

/// For `#[serde(deserialize_with = "present")]` on an `Option<Option<T>>` field:
/// tells a field sent as `null` (`Some(None)`: clear it) from a field not sent (`None`: keep
/// it), which partial updates need.
pub fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}
