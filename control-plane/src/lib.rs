//! The Reflow control plane: it owns every piece of durable state (users, groups, roles,
//! API tokens, targets, sealed credentials, policies) and serves the admin REST API.
//!
//! # Layout
//! - [`store`]: the [`store::Store`] interface and its PostgreSQL and SQLite backends,
//!   with migrations applied on connect.
//! - [`api`]: the axum router, one module per resource, the OpenAPI document and `/docs`.
//! - [`auth`]: password hashing, issued JWTs and API tokens.
//!
//! [`ControlPlane`] wires these from a [`reflow_common::config::Config`]; the `reflow`
//! binary runs it.

pub mod api;
pub mod auth;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use reflow_common::config::Config;
use reflow_common::crypto::Keyring;
use tokio::net::TcpListener;

use api::{ApiSettings, AppState};
use auth::JwtKeys;
use store::DynStore;

/// Why the control plane could not start. Each message names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] reflow_common::config::ConfigError),
    #[error("cannot open the database")]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// A control plane ready to serve.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    state: AppState,
}

impl ControlPlane {
    /// Builds the control plane from a validated config and an open store. The config must
    /// carry `jwt.secret` and `encryption.key`.
    pub fn new(config: &Config, store: DynStore) -> Result<Self, StartError> {
        use reflow_common::config::ConfigError;
        let secret = config
            .jwt
            .secret
            .as_ref()
            .ok_or_else(|| ConfigError::new("jwt.secret", "required"))?;
        let keyring: Keyring = config
            .encryption
            .keyring()?
            .ok_or_else(|| ConfigError::new("encryption.key", "required"))?;
        let jwt = JwtKeys::new(
            secret.as_bytes(),
            config.jwt.expiry,
            &config.jwt.issuer,
            &config.jwt.audience,
        );
        let settings = ApiSettings {
            allow_registration: config.auth.allow_registration,
            stdio: config.stdio.clone(),
            max_body_bytes: config.server.max_body_bytes,
            cors_allowed_origins: config.cors.allowed_origins.clone(),
        };
        Ok(ControlPlane {
            state: AppState {
                store,
                keyring: Arc::new(keyring),
                jwt: Arc::new(jwt),
                settings: Arc::new(settings),
            },
        })
    }

    pub fn store(&self) -> &DynStore {
        &self.state.store
    }

    /// The HTTP router of the control plane.
    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    /// Serves the API on `listener` until `shutdown` completes, then drains open requests.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

/// Binds `host:port`, naming the address when that fails.
pub async fn bind(host: &str, port: u16) -> Result<TcpListener, StartError> {
    let address = format!("{host}:{port}");
    TcpListener::bind(&address)
        .await
        .map_err(|source| StartError::Bind { address, source })
}
