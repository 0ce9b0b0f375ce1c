//! `reflow operator`: runs Reflow's `MCPInstance`s as pods.
//!
//! # Layout
//! - [`crd`]: the custom resource and its CRD (generated from these types).
//! - [`objects`]: the Pod, Service and NetworkPolicy of an instance, as pure functions.
//! - [`controller`]: the reconcile loop (finalizer, server-side apply, verification, idle TTL
//!   and lifetime).
//! - [`metrics`]: the operator's Prometheus metrics.
//!
//! Several replicas may run: they elect a leader through a `coordination.k8s.io` Lease, and only
//! the leader reconciles.

pub mod controller;
pub mod crd;
pub mod metrics;
pub mod objects;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kube::Client;
use tokio_util::sync::CancellationToken;

/// How an operator replica runs.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// A kubeconfig file; unset: the in-cluster service account (or `KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    /// Watch only this namespace; unset: every namespace.
    pub namespace: Option<String>,
    /// Where the leader Lease lives.
    pub lease_namespace: String,
    /// This replica's name in the Lease (default: the host name).
    pub identity: String,
    /// How long a leader's lease lasts without renewal, in seconds.
    pub lease_seconds: u64,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub listen: std::net::SocketAddr,
    /// Verify pods at their pod IP (default) rather than through their Service.
    pub verify_by_pod_ip: bool,
}

/// The name of the Lease the replicas share.
pub const LEASE: &str = "reflow-operator";

/// A client from `kubeconfig`, or the environment's (in cluster, or `KUBECONFIG`).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file =
                kube::config::Kubeconfig::read_from(path).with_context(|| format!("kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("no kubeconfig given and no cluster found")?,
    };
    Client::try_from(config).context("a Kubernetes client")
}

/// Runs until `shutdown`: the health server, the leader election, and the controller while
/// this replica leads.
pub async fn run(config: OperatorConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = client(config.kubeconfig.as_deref()).await?;
    let metrics = metrics::Metrics::default();
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("listen on {}", config.listen))?;
    tracing::info!(address = %listener.local_addr()?, "operator health and metrics listening");
    let health = {
        let registry = metrics.registry.clone();
        let router = axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route("/readyz", axum::routing::get(|| async { "ok" }))
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let registry = registry.clone();
                    async move { registry.prometheus() }
                }),
            );
        let shutdown = shutdown.clone();
        tokio::spawn(
            async move { axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await },
        )
    };
    let mut context = controller::Context::new(client.clone(), objects::Peers::default(), metrics.clone());
    context.verify_by_pod_ip = config.verify_by_pod_ip;
    let context = Arc::new(context);

    let lease = kube_lease_manager::LeaseManagerBuilder::new(client, LEASE)
        .with_namespace(config.lease_namespace.clone())
        .with_identity(config.identity.clone())
        .with_duration(config.lease_seconds)
        .with_grace((config.lease_seconds / 3).max(1))
        .with_field_manager(format!("{}-lease", controller::MANAGER))
        .build()
        .await
        .context("the leader lease")?;
    let (mut leading, election) = lease.watch().await;
    loop {
        // Follow until this replica leads (or shuts down).
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = leading.wait_for(|leader| *leader) => {
                if changed.is_err() {
                    anyhow::bail!("the leader election stopped");
                }
            }
        }
        tracing::info!(identity = %config.identity, "leading: reconciling MCPInstances");
        metrics.set_leader(true);
        let mut lost = leading.clone();
        let stop = shutdown.clone();
        let until = async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = lost.wait_for(|leader| !*leader) => {}
            }
        };
        controller::run(context.clone(), config.namespace.as_deref(), until).await;
        metrics.set_leader(false);
        if shutdown.is_cancelled() {
            break;
        }
        tracing::warn!(identity = %config.identity, "lost the leader lease; following");
    }
    // Dropping the receiver releases the lease, so another replica leads at once.
    drop(leading);
    let _ = tokio::time::timeout(Duration::from_secs(5), election).await;
    let _ = health.await;
    Ok(())
}
