//! The admin REST API (axum) and its OpenAPI document.
//!
//! Handlers are grouped by resource, one module each; every handler's `#[utoipa::path]`
//! feeds the OpenAPI document served at `/openapi.json` and rendered at `/docs`. Errors go
//! through [`error::ApiError`], the one place that maps failures to status and JSON body.

pub mod auth;
pub mod credentials;
pub mod data_planes;
pub mod error;
pub mod extract;
pub mod logs;
pub mod observability;
pub mod policies;
pub mod session_keys;
pub mod targets;
pub mod users;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use reflow_common::config::StdioConfig;
use reflow_common::crypto::Keyring;
use serde::Serialize;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_scalar::{Scalar, Servable};

use crate::auth::JwtKeys;
use crate::store::DynStore;
use crate::sync::SnapshotHub;
use error::ApiError;

/// What the handlers share. Cheap to clone: everything is behind an `Arc`.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: DynStore,
    /// Seals and opens stored secrets.
    pub keyring: Arc<Keyring>,
    pub jwt: Arc<JwtKeys>,
    pub settings: Arc<ApiSettings>,
    /// Told after every successful write, so the snapshot is recompiled and pushed.
    pub hub: Arc<SnapshotHub>,
    /// Counts login attempts per account and client (per replica) and bounds password hashing.
    pub login_throttle: Arc<auth::LoginThrottle>,
    /// When each user last recycled their own sessions (per replica), for the cooldown.
    pub recycles: Arc<std::sync::Mutex<std::collections::HashMap<uuid::Uuid, std::time::Instant>>>,
    /// The cluster kubernetes targets run in, when `kubernetes.enabled` is set here.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// The parts of the configuration the API consults per request.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub allow_registration: bool,
    /// Failed logins per account before a lockout, and its length.
    pub login_max_failures: u32,
    pub login_lockout: std::time::Duration,
    pub stdio: StdioConfig,
    pub max_body_bytes: usize,
    pub cors_allowed_origins: Vec<String>,
    /// What one account may store.
    pub limits: reflow_common::config::LimitsConfig,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<reflow_common::net::Cidr>,
    /// Whether the router serves `/metrics` (not when it has a port of its own).
    pub metrics_route: bool,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Reflow Gateway admin API",
        description = "Users, API tokens, targets, credentials and policies of a Reflow Gateway. \
                       Authenticate with `Authorization: Bearer <JWT or API token>`.",
        license(name = "MIT")
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "auth", description = "Registration, login and API tokens"),
        (name = "users", description = "Accounts, roles and groups (admin)"),
        (name = "targets", description = "Upstream MCP servers"),
        (name = "credentials", description = "Tokens and env per scope, sealed at rest"),
        (name = "policies", description = "Default-deny authorization rules (admin)"),
        (name = "data-planes", description = "Snapshot distribution status (admin)"),
        (name = "logs", description = "The audit trail: one record per MCP request"),
        (name = "observability", description = "Live activity and current state (admin)"),
        (name = "health", description = "Liveness and readiness")
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT or rfl_ API token").build(),
            ),
        );
    }
}

fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(auth::register))
        .routes(routes!(auth::login))
        .routes(routes!(auth::me))
        .routes(routes!(auth::list_tokens, auth::create_token))
        .routes(routes!(auth::delete_token))
        .routes(routes!(users::list, users::create))
        .routes(routes!(users::get, users::update, users::delete))
        .routes(routes!(users::recycle_user))
        .routes(routes!(users::recycle_own))
        .routes(routes!(targets::list, targets::create))
        .routes(routes!(targets::get, targets::update, targets::delete))
        .routes(routes!(targets::restart_instances))
        .routes(routes!(targets::instances))
        .routes(routes!(targets::status))
        .routes(routes!(credentials::list_tokens))
        .routes(routes!(
            credentials::get_own_token,
            credentials::put_own_token,
            credentials::set_own_token,
            credentials::delete_own_token
        ))
        .routes(routes!(credentials::put_token, credentials::set_token, credentials::delete_token))
        .routes(routes!(credentials::put_scoped_token, credentials::set_scoped_token, credentials::delete_scoped_token))
        .routes(routes!(credentials::list_env))
        .routes(routes!(credentials::resolve_view))
        .routes(routes!(credentials::get_env, credentials::put_env, credentials::set_env))
        .routes(routes!(
            credentials::get_scoped_env,
            credentials::put_scoped_env,
            credentials::set_scoped_env,
            credentials::delete_env
        ))
        .routes(routes!(credentials::delete_scoped_env))
        .routes(routes!(policies::list, policies::create))
        .routes(routes!(policies::get, policies::update, policies::delete))
        .routes(routes!(policies::add_subject))
        .routes(routes!(policies::remove_subject))
        .routes(routes!(policies::explain))
        .routes(routes!(data_planes::list))
        .routes(routes!(session_keys::rotate))
        .routes(routes!(logs::list))
        .routes(routes!(logs::export))
        .routes(routes!(observability::feed))
        .routes(routes!(observability::snapshot))
}

/// The OpenAPI document, generated from the handlers.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().into_openapi()
}

/// The whole HTTP surface of the control plane: `/api`, `/health`, `/openapi.json`, `/docs`.
pub fn router(state: AppState) -> Router {
    let settings = state.settings.clone();
    let hub = state.hub.clone();
    let registry = hub.observe.registry.clone();
    let (router, openapi) = api_router().with_state(state).split_for_parts();
    let document = Arc::new(openapi.clone());
    let mut router = router
        .route("/openapi.json", get(move || async move { Json(document.as_ref().clone()) }))
        .merge(Scalar::with_url("/docs", openapi))
        .merge(if settings.metrics_route {
            reflow_common::telemetry::metrics::router(vec![registry])
        } else {
            Router::new()
        })
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
        })
        .layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
            let hub = hub.clone();
            async move {
                let writes = !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
                let started = std::time::Instant::now();
                let (method, route) = if writes {
                    let route = request.extensions().get::<axum::extract::MatchedPath>();
                    // Bounded labels: any request may name any method or path.
                    let method = match *request.method() {
                        Method::POST => "POST",
                        Method::PUT => "PUT",
                        Method::PATCH => "PATCH",
                        Method::DELETE => "DELETE",
                        _ => "other",
                    };
                    (method, route.map_or("unmatched", |r| r.as_str()).to_string())
                } else {
                    Default::default()
                };
                let response = next.run(request).await;
                if writes {
                    let seconds = started.elapsed().as_secs_f64();
                    hub.observe.admin_write(method, &route, response.status().as_u16(), seconds);
                }
                // Every committed write may change the snapshot; recompiling is cheap when it did not.
                if writes && response.status().is_success() {
                    hub.changed();
                }
                response
            }
        }))
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .layer(TraceLayer::new_for_http());
    if !settings.cors_allowed_origins.is_empty() {
        let origins: Vec<HeaderValue> =
            settings.cors_allowed_origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
        router = router.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
                .allow_headers([axum::http::header::AUTHORIZATION, axum::http::header::CONTENT_TYPE]),
        );
    }
    router
}

/// The answer of a delete (and of writes that have nothing else to say): `{"message": "..."}`,
/// as the original gateway answered.
#[derive(Debug, Serialize, ToSchema)]
pub struct Message {
    pub message: String,
}

impl Message {
    pub fn json(message: impl Into<String>) -> Json<Message> {
        Json(Message { message: message.into() })
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `degraded`.
    pub status: String,
    /// `ok` or `unavailable`.
    pub database: String,
    /// `postgres` or `sqlite`.
    pub backend: String,
    pub version: String,
}

/// Liveness and database reachability: 200 when the database answers, 503 otherwise.
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let ping = tokio::time::timeout(crate::store::ACQUIRE_TIMEOUT, state.store.ping()).await;
    let database_ok = matches!(ping, Ok(Ok(())));
    let status = if database_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = Health {
        status: if database_ok { "ok" } else { "degraded" }.into(),
        database: if database_ok { "ok" } else { "unavailable" }.into(),
        backend: state.store.backend().into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    (status, Json(body))
}
