//! The Reflow control plane: it owns every piece of durable state (users, groups, roles,
//! API tokens, targets, sealed credentials, policies) and serves the admin REST API.
//!
//! # Layout
//! - [`store`]: the [`store::Store`] interface and its PostgreSQL and SQLite backends,
//!   with migrations applied on connect.
//! - [`api`]: the axum router, one module per resource, the OpenAPI document and `/docs`.
//! - [`auth`]: password hashing, issued JWTs and API tokens.
//! - [`compile`]: the pure snapshot compiler (store state → versioned snapshot).
//! - [`sync`]: the compiler loop, the snapshot hub and the gRPC snapshot service.
//! - [`observe`]: the control plane's metrics and the live activity feed.
//!
//! [`ControlPlane`] wires these from a [`reflow_common::config::Config`]; the `reflow`
//! binary runs it.

pub mod api;
pub mod audit;
pub mod auth;
pub mod cluster;
pub mod compile;
pub mod manage;
pub mod observe;
pub mod store;
pub mod sync;

use std::future::Future;
use std::sync::Arc;

use reflow_common::config::Config;
use reflow_common::crypto::Keyring;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
    #[error("gRPC server failed: {0}")]
    Grpc(String),
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
    /// The compiler's inputs besides the store.
    secrets: sync::CompilerSecrets,
    data_plane_token: Option<String>,
    grpc_tls: Option<GrpcTls>,
    /// The HTTP listener's limits (`server.*`).
    server_limits: reflow_common::server::Limits,
    /// `audit.retention`: records older than this are pruned.
    audit_retention: Option<std::time::Duration>,
}

/// TLS for the gRPC snapshot service, as PEM.
#[derive(Clone)]
pub struct GrpcTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// When set, data planes must present a client certificate signed by this CA.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for GrpcTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTls").field("mutual", &self.client_ca_pem.is_some()).finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Builds the control plane from a validated config and an open store. The config must
    /// carry `jwt.secret` and `encryption.key`.
    pub fn new(config: &Config, store: DynStore) -> Result<Self, StartError> {
        use reflow_common::config::ConfigError;
        let secret = config.jwt.secret.as_ref().ok_or_else(|| ConfigError::new("jwt.secret", "required"))?;
        let keyring: Keyring =
            config.encryption.keyring()?.ok_or_else(|| ConfigError::new("encryption.key", "required"))?;
        let keyring = Arc::new(keyring);
        let jwt = JwtKeys::new(secret.as_bytes(), config.jwt.expiry, &config.jwt.issuer, &config.jwt.audience);
        let settings = ApiSettings {
            allow_registration: config.auth.allow_registration,
            login_max_failures: config.auth.login_max_failures,
            login_lockout: config.auth.login_lockout,
            stdio: config.stdio.clone(),
            max_body_bytes: config.server.max_body_bytes,
            cors_allowed_origins: config.cors.allowed_origins.clone(),
            limits: config.limits.clone(),
            trusted_proxies: reflow_common::net::parse_trusted(&config.server.trusted_proxies)
                .map_err(|e| ConfigError::new("server.trusted_proxies", e))?,
            metrics_route: true,
        };
        let data_plane_token = config.control_plane.data_plane_token.clone();
        let secrets = sync::CompilerSecrets {
            store_keyring: keyring.clone(),
            // Without a token no data plane can connect; the sealer still needs a key.
            sealer: reflow_proto::resources::snapshot_sealer(data_plane_token.as_deref().unwrap_or_default()),
            jwt_public_key: *jwt.public_key(),
            jwt_issuer: config.jwt.issuer.clone(),
            jwt_audience: config.jwt.audience.clone(),
        };
        let id = config.control_plane.id.clone().unwrap_or_else(default_instance_id);
        Ok(ControlPlane {
            state: AppState {
                store,
                keyring,
                jwt: Arc::new(jwt),
                settings: Arc::new(settings),
                hub: sync::SnapshotHub::new(id),
                login_throttle: Arc::new(api::auth::LoginThrottle::new(config.auth.password_hash_concurrency)),
                recycles: Default::default(),
                cluster: None,
            },
            secrets,
            data_plane_token,
            grpc_tls: None,
            server_limits: reflow_common::server::Limits::from_config(&config.server),
            audit_retention: config.audit.retention,
        })
    }

    /// Serves the snapshot service over TLS (and mTLS when a client CA is given).
    pub fn with_grpc_tls(mut self, tls: GrpcTls) -> Self {
        self.grpc_tls = Some(tls);
        self
    }

    /// Gives the API access to the cluster kubernetes targets run in (see [`cluster`]).
    pub fn with_cluster(mut self, cluster: Arc<cluster::Cluster>) -> Self {
        self.state.cluster = Some(cluster);
        self
    }

    pub fn store(&self) -> &DynStore {
        &self.state.store
    }

    pub fn hub(&self) -> &Arc<sync::SnapshotHub> {
        &self.state.hub
    }

    /// Leaves `/metrics` out of [`ControlPlane::router`]: it is served elsewhere (a port of its
    /// own, or beside a data plane's, from [`ControlPlane::registry`]).
    pub fn without_metrics_route(mut self) -> Self {
        let mut settings = self.state.settings.as_ref().clone();
        settings.metrics_route = false;
        self.state.settings = Arc::new(settings);
        self
    }

    /// The control plane's metrics.
    pub fn registry(&self) -> Arc<reflow_common::telemetry::metrics::Registry> {
        self.state.hub.observe.registry.clone()
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
        reflow_common::server::serve(listener, self.router(), self.server_limits, shutdown).await
    }

    /// Compiles the first snapshot, then keeps compiling on every change until `shutdown`.
    /// With `audit.retention` set, also prunes older audit records (see [`prune_audit`]).
    pub async fn start_compiler(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        if let Some(retention) = self.audit_retention {
            tokio::spawn(prune_audit(self.state.store.clone(), retention, shutdown.clone()));
        }
        // The first key that seals MCP session ids; without one, sessions stay on the data plane
        // that opened them.
        let key = reflow_common::crypto::Key::generate();
        let sealed = self.state.keyring.seal(key.as_bytes(), &store::session_key_aad());
        if let Err(error) = self.state.store.ensure_session_key(sealed).await {
            tracing::warn!(%error, "cannot store the first session key; MCP sessions will not travel between data planes");
        }
        sync::compile_once(&self.state.hub, &self.state.store, &self.secrets).await;
        tokio::spawn(sync::run_compiler(
            self.state.hub.clone(),
            self.state.store.clone(),
            self.secrets.clone(),
            shutdown,
        ))
    }

    /// Serves the gRPC snapshot service on `listener` until `shutdown`. Needs a data-plane
    /// token in the config.
    pub async fn serve_grpc(&self, listener: TcpListener, shutdown: CancellationToken) -> Result<(), StartError> {
        let token = self.data_plane_token.as_deref().ok_or_else(|| {
            reflow_common::config::ConfigError::new("control_plane.data_plane_token", "required to serve data planes")
        })?;
        let service =
            sync::SnapshotGrpc::new(self.state.hub.clone(), self.state.store.clone(), token, shutdown.clone());
        let incoming = limited_incoming(listener, self.server_limits.max_connections);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.grpc_tls {
            use tonic::transport::{Certificate, Identity, ServerTlsConfig};
            let mut config = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            if let Some(ca) = &tls.client_ca_pem {
                config = config.client_ca_root(Certificate::from_pem(ca));
            }
            builder = builder.tls_config(config).map_err(|e| StartError::Grpc(format!("TLS configuration: {e}")))?;
        }
        let management = manage::grpc::ManagementGrpc::new(self.state.clone(), self.router());
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(reflow_proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Grpc(format!("gRPC reflection: {e}")))?;
        let (health, health_service) = tonic_health::server::health_reporter();
        tokio::spawn(report_health(health, self.state.store.clone(), shutdown.clone()));
        builder
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            // One Sync stream per data plane, a few management calls at once per client.
            .max_concurrent_streams(Some(8))
            .add_service(service.into_server())
            .add_service(management)
            .add_service(reflection)
            .add_service(health_service)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
            .map_err(|e| StartError::Grpc(e.to_string()))
    }
}

/// Keeps the standard gRPC health service true: the management service is `SERVING` while the
/// database answers, `NOT_SERVING` while it does not (the snapshot service keeps serving from
/// the last compiled snapshot either way).
async fn report_health(
    health: tonic_health::server::HealthReporter,
    store: store::DynStore,
    shutdown: CancellationToken,
) {
    use tonic_health::ServingStatus;
    health.set_service_status("reflow.snapshot.v1.SnapshotService", ServingStatus::Serving).await;
    let mut last = None;
    loop {
        let up = matches!(tokio::time::timeout(store::ACQUIRE_TIMEOUT, store.ping()).await, Ok(Ok(())));
        if last != Some(up) {
            let status = if up { ServingStatus::Serving } else { ServingStatus::NotServing };
            health.set_service_status(manage::grpc::SERVICE, status).await;
            health.set_service_status("", status).await;
            last = Some(up);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
        }
    }
}

/// The gRPC listener's connections, at most `max` open at once: past it a new connection is
/// closed at once (as [`reflow_common::server::serve`] does for HTTP), so a flood of
/// connections cannot exhaust the control plane's files.
fn limited_incoming(
    listener: TcpListener,
    max: usize,
) -> impl futures::Stream<Item = std::io::Result<LimitedConnection>> {
    let open = Arc::new(tokio::sync::Semaphore::new(max));
    futures::stream::unfold((listener, open), |(listener, open)| async move {
        loop {
            let accepted = listener.accept().await.map(|(stream, _)| stream);
            let stream = match accepted {
                Ok(stream) => stream,
                Err(error) => return Some((Err(error), (listener, open))),
            };
            match open.clone().try_acquire_owned() {
                Ok(permit) => {
                    let _ = stream.set_nodelay(true);
                    return Some((Ok(LimitedConnection { stream, _permit: permit }), (listener, open)));
                }
                Err(_) => {
                    tracing::warn!("gRPC connection limit reached (server.max_connections); closing a new connection")
                }
            }
        }
    })
}

/// A gRPC connection holding its share of the connection limit.
#[derive(Debug)]
struct LimitedConnection {
    stream: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for LimitedConnection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl tokio::io::AsyncRead for LimitedConnection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LimitedConnection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// `host-pid`: distinct per process, stable enough to read in status listings.
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let host = if host.is_empty() { "reflow".to_string() } else { host };
    format!("{host}-{}", std::process::id())
}

/// Removes records older than `retention` now and then until `shutdown`: every tenth of the
/// retention, between a minute and an hour apart. Pruning moves each chain's anchor, so
/// `reflow audit verify` still passes; replicas pruning at once serialise on the chains' rows.
async fn prune_audit(
    store: crate::store::DynStore,
    retention: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let every = (retention / 10).clamp(std::time::Duration::from_secs(60), std::time::Duration::from_secs(3600));
    loop {
        let Ok(age) = chrono::Duration::from_std(retention) else { return };
        match store.prune_audit(chrono::Utc::now() - age).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "audit records past audit.retention pruned"),
            Err(error) => tracing::warn!(%error, "audit pruning failed; retrying later"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Binds `host:port`, naming the address when that fails.
pub async fn bind(host: &str, port: u16) -> Result<TcpListener, StartError> {
    let address = format!("{host}:{port}");
    TcpListener::bind(&address).await.map_err(|source| StartError::Bind { address, source })
}
