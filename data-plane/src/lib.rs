//! The Reflow data plane: it holds the latest snapshot from the control plane in memory
//! (and, encrypted, on disk) and decides everything from it, with no database connection.
//!
//! # Layout
//! - [`snapshot`]: applying an update (validate everything, then swap) and the decoded view.
//! - [`state`]: the atomically swapped current snapshot.
//! - [`sync`]: the stream to the control plane: reconnect, apply, acknowledge or reject.
//! - [`cache`]: the encrypted on-disk copy used to restart while the control plane is away.
//! - [`auth`]: authenticating clients from the snapshot.
//! - [`jsonrpc`]: JSON-RPC 2.0 messages, shared by both sides of the gateway.
//! - [`mcp`]: the client-facing MCP gateway (`/mcp`, `/mcp/{target}`, legacy SSE).
//! - [`upstream`]: sessions with upstream MCP servers over Streamable HTTP and legacy SSE.
//! - [`credentials`]: what is injected into upstream requests, resolved per user.
//! - [`http`]: `/ready` and the MCP routes.
//! - [`audit`]: one record per MCP request; [`spool`] keeps them on disk until [`shipper`]
//!   has them stored by the control plane.

pub mod audit;
pub mod auth;
pub mod cache;
pub mod credentials;
pub mod http;
pub mod jsonrpc;
pub mod mcp;
pub mod shipper;
pub mod snapshot;
pub mod spool;
pub mod state;
pub mod sync;
pub mod telemetry;
pub mod upstream;

use std::path::PathBuf;
use std::sync::Arc;

use reflow_common::crypto::DeterministicSealer;
use tokio_util::sync::CancellationToken;

use cache::Cache;
use mcp::gateway::Gateway;
use mcp::McpSettings;
use state::SnapshotState;
use sync::SyncConfig;

/// A data plane: its snapshot state, how it syncs, and its cache.
#[derive(Debug, Clone)]
pub struct DataPlane {
    state: Arc<SnapshotState>,
    sealer: DeterministicSealer,
    cache: Option<Cache>,
    sync: SyncConfig,
    gateway: Arc<Gateway>,
    audit: Option<Arc<audit::Recorder>>,
    export: Option<Box<reflow_common::telemetry::ExportSettings>>,
    /// Whether [`DataPlane::router`] serves `/metrics` (not when it has a port of its own).
    metrics_route: bool,
}

impl DataPlane {
    /// Builds a data plane and, when `cache_dir` holds a valid cache, starts serving from it
    /// at once. An unusable cache is refused and logged; the data plane then waits for the
    /// control plane.
    pub fn new(sync: SyncConfig, cache_dir: Option<PathBuf>) -> Self {
        let sealer = reflow_proto::resources::snapshot_sealer(&sync.token);
        let state = SnapshotState::new();
        let cache = cache_dir.map(|dir| Cache::new(&dir, &sync.token));
        if let Some(cache) = &cache {
            match cache.load(&sealer) {
                Ok(Some(snapshot)) => {
                    tracing::info!(version = %snapshot.version, path = %cache.path().display(), "serving from the cached snapshot until the control plane answers");
                    state.store(snapshot);
                }
                Ok(None) => tracing::info!(path = %cache.path().display(), "no snapshot cache yet"),
                Err(error) => {
                    tracing::error!(%error, "refusing the snapshot cache; MCP traffic is refused until the control plane sends a snapshot")
                }
            }
        }
        let gateway = Gateway::new(state.clone(), sealer.clone(), McpSettings::default());
        DataPlane { state, sealer, cache, sync, gateway, audit: None, export: None, metrics_route: true }
    }

    /// Replaces the MCP endpoint's settings (before serving).
    pub fn with_mcp(mut self, settings: McpSettings) -> Self {
        self.gateway = Gateway::new(self.state.clone(), self.sealer.clone(), settings);
        if let Some(recorder) = &self.audit {
            self.gateway.set_audit(recorder.clone());
        }
        self
    }

    /// Audits every MCP request: records go to the spool in `settings.spool_dir` (what an
    /// earlier run left there is shipped too) and, from [`DataPlane::start_sync`] on, to the
    /// control plane.
    pub fn with_audit(mut self, settings: &audit::AuditSettings) -> Result<Self, spool::SpoolError> {
        let spool = spool::Spool::open(&settings.spool_dir, &self.sync.token, settings.spool_bytes, settings.on_full)?;
        let recorder = audit::Recorder::new(self.sync.node_id.clone(), Arc::new(spool), settings);
        self.gateway.set_audit(recorder.clone());
        self.audit = Some(recorder);
        Ok(self)
    }

    /// Exports traces and metrics over OTLP, once [`DataPlane::start_export`] is called.
    pub fn with_export(mut self, settings: Option<reflow_common::telemetry::ExportSettings>) -> Self {
        self.export = settings.map(Box::new);
        self
    }

    /// Starts the OTLP exporter of [`DataPlane::with_export`] (nothing without one), until
    /// `shutdown`: a token of its own, cancelled after serving stopped, so the spans of the
    /// last requests go out too. The handle ends once the last export did.
    pub fn start_export(
        &self,
        shutdown: CancellationToken,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, reflow_common::config::ConfigError> {
        let Some(settings) = &self.export else { return Ok(None) };
        let registry = self.gateway.telemetry.registry.clone();
        let (exporter, running) =
            reflow_common::telemetry::Exporter::start(settings.as_ref().clone(), registry, shutdown)?;
        self.gateway.telemetry.set_exporter(exporter);
        Ok(Some(running))
    }

    /// Moves every finished request's record into the spool: after serving stopped, so a
    /// graceful restart loses none. Blocking.
    pub fn flush_audit(&self) {
        if let Some(recorder) = &self.audit {
            if let Err(error) = recorder.flush() {
                tracing::error!(%error, buffered = recorder.status().buffered, "audit records could not be spooled before exit");
            }
        }
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    pub fn state(&self) -> &Arc<SnapshotState> {
        &self.state
    }

    /// `/ready`, `/metrics`, `/mcp` and `/mcp/{target}`.
    pub fn router(&self) -> axum::Router {
        http::router(self.gateway.clone(), self.metrics_route)
    }

    /// Serves `router` on `listener` until `shutdown` completes, then drains: new sessions are
    /// refused and `/ready` fails, open streams end (their clients reconnect through another
    /// replica), requests in flight finish (within [`reflow_common::server::DRAIN`]), and
    /// sessions stay resumable elsewhere. Stop the background work ([`DataPlane::start_sync`])
    /// after this returns.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        router: axum::Router,
        limits: reflow_common::server::Limits,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let gateway = self.gateway.clone();
        let draining = async move {
            shutdown.await;
            gateway.drain();
        };
        reflow_common::server::serve(listener, router, limits, draining).await
    }

    /// Leaves `/metrics` out of [`DataPlane::router`]: it is served elsewhere (a port of its
    /// own, or beside the control plane's, from [`DataPlane::registry`]).
    pub fn without_metrics_route(mut self) -> Self {
        self.metrics_route = false;
        self
    }

    /// The data plane's metrics.
    pub fn registry(&self) -> Arc<reflow_common::telemetry::metrics::Registry> {
        self.gateway.telemetry.registry.clone()
    }

    /// Keeps the snapshot in sync until `shutdown`, and runs the gateway's housekeeping:
    /// session expiry, and list-change notifications when a snapshot changes what a session's
    /// user may see. The returned handle is the sync task's.
    pub fn start_sync(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let gateway = self.gateway.clone();
        let every = gateway.settings.cleanup_interval;
        tokio::spawn(gateway.clone().expire_sessions(every, shutdown.clone()));
        tokio::spawn(gateway.clone().collect_processes(gateway.settings.stdio.gc_interval, shutdown.clone()));
        if let Some(instances) = &gateway.settings.kubernetes {
            instances.start_reporting(shutdown.clone());
        }
        tokio::spawn(gateway.clone().announce_started(shutdown.clone()));
        let mut changes = self.state.subscribe();
        let watch_shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = watch_shutdown.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
                if let Some(snapshot) = gateway.state.load() {
                    gateway.snapshot_changed(&snapshot);
                }
            }
        });
        if let Some(recorder) = &self.audit {
            tokio::spawn(recorder.clone().run(shutdown.clone()));
            tokio::spawn(shipper::run(
                self.sync.clone(),
                recorder.spool().clone(),
                recorder.pushed.clone(),
                shutdown.clone(),
            ));
        }
        let report: sync::Report = self.gateway.clone();
        tokio::spawn(sync::run(
            self.sync.clone(),
            self.state.clone(),
            self.sealer.clone(),
            self.cache.clone(),
            Some(report),
            shutdown,
        ))
    }
}
