//! `reflow data-plane`: serves traffic from the snapshot a control plane streams to it, and
//! from its encrypted cache while the control plane is unreachable.

use std::path::PathBuf;

use axum::routing::get;
use clap::Args;
use reflow_common::config::ConfigError;
use reflow_control_plane::bind;
use reflow_data_plane::sync::{ClientTls, SyncConfig};
use reflow_data_plane::DataPlane;

use crate::{init_logging, load_config, read_pem, shutdown_token, CommonArgs, Failure};

const DEFAULT_PORT: u16 = 8080;

#[derive(Debug, Args)]
pub struct DataPlaneArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The control plane's gRPC address, e.g. http://control-plane:50051 (overrides data_plane.control_plane).
    #[arg(long, env = "REFLOW_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// The data-plane token (overrides data_plane.token).
    #[arg(long, env = "REFLOW_DATA_PLANE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the encrypted snapshot cache lives (overrides data_plane.cache_dir).
    #[arg(long, env = "REFLOW_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// This data plane's id (overrides data_plane.node_id; default: host name and pid).
    #[arg(long, env = "REFLOW_NODE_ID")]
    node_id: Option<String>,
    /// Node group (overrides data_plane.group).
    #[arg(long)]
    group: Option<String>,
    /// PEM CA that verifies an https:// control plane (overrides data_plane.tls.ca).
    #[arg(long)]
    tls_ca: Option<String>,
    /// PEM client certificate for mTLS (overrides data_plane.tls.cert).
    #[arg(long)]
    tls_cert: Option<String>,
    /// PEM client key for mTLS (overrides data_plane.tls.key).
    #[arg(long)]
    tls_key: Option<String>,
    /// Allow plain http:// to a control plane on another machine (sets data_plane.insecure).
    #[arg(long)]
    insecure: bool,
}

pub async fn run(args: DataPlaneArgs) -> Result<(), Failure> {
    let mut config = load_config(&args.common)?;
    if args.common.port.is_none() && args.common.config.is_none() {
        config.server.port = DEFAULT_PORT;
    }
    let dp = &mut config.data_plane;
    if let Some(url) = args.control_plane {
        dp.control_plane = Some(url);
    }
    if let Some(token) = args.token {
        dp.token = Some(token);
    }
    if let Some(dir) = args.cache_dir {
        dp.cache_dir = Some(dir.display().to_string());
    }
    if let Some(node_id) = args.node_id {
        dp.node_id = Some(node_id);
    }
    if let Some(group) = args.group {
        dp.group = group;
    }
    dp.tls.ca = args.tls_ca.or(dp.tls.ca.take());
    dp.tls.cert = args.tls_cert.or(dp.tls.cert.take());
    dp.tls.key = args.tls_key.or(dp.tls.key.take());
    dp.insecure |= args.insecure;
    config.validate()?;
    let dp = config.data_plane.clone();
    let tls = match &dp.tls.ca {
        Some(ca) => Some(ClientTls {
            ca_pem: read_pem("data_plane.tls.ca", ca)?,
            identity: match (&dp.tls.cert, &dp.tls.key) {
                (Some(cert), Some(key)) => {
                    Some((read_pem("data_plane.tls.cert", cert)?, read_pem("data_plane.tls.key", key)?))
                }
                _ => None,
            },
        }),
        None => None,
    };
    let control_plane = dp.control_plane.ok_or_else(|| {
        ConfigError::new("data_plane.control_plane", "required: pass --control-plane http://HOST:50051")
    })?;
    let token = dp.token.ok_or_else(|| ConfigError::new("data_plane.token", "required: pass --token"))?;
    let _logs = init_logging(&config)?;
    if config.data_plane.insecure && control_plane.starts_with("http://") {
        tracing::warn!(%control_plane, "data_plane.insecure: the data-plane token and snapshots cross the network unencrypted");
    }
    let sync = SyncConfig {
        control_plane,
        token,
        node_id: dp.node_id.unwrap_or_else(reflow_control_plane::default_instance_id),
        group: dp.group,
        labels: dp.labels.into_iter().collect(),
        tls,
        max_snapshot_bytes: config.data_plane.max_snapshot_bytes,
    };
    let cache_dir = dp.cache_dir.map(PathBuf::from);
    let audit = crate::audit_settings(&config, &sync.node_id, cache_dir.as_deref());
    let node_id = sync.node_id.clone();
    let mut data_plane = DataPlane::new(sync, cache_dir).with_mcp(crate::mcp_settings(&config).await?);
    if let Some(audit) = audit {
        data_plane = data_plane
            .with_audit(&audit)
            .map_err(|e| ConfigError::new("audit.spool_dir", format!("cannot open the audit spool: {e}")))?;
    }
    let host = config.server.host.as_deref().unwrap_or("0.0.0.0");
    let listener = bind(host, config.server.port).await?;
    let shutdown = shutdown_token();
    let export = reflow_common::telemetry::ExportSettings::from_config(&config.telemetry, "data-plane", &node_id)?;
    data_plane = data_plane.with_export(export);
    let export_stop = tokio_util::sync::CancellationToken::new();
    let exporting = data_plane.start_export(export_stop.clone())?;
    if let Some(port) = config.telemetry.metrics_port {
        crate::serve_metrics(host, port, vec![data_plane.registry()], shutdown.clone()).await?;
        data_plane = data_plane.without_metrics_route();
    }
    // Background work (the snapshot stream, housekeeping) outlives the requests in flight: it
    // stops once serving has drained.
    let stop = tokio_util::sync::CancellationToken::new();
    let syncing = data_plane.start_sync(stop.clone());
    let router =
        data_plane.router().route("/health", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }));
    tracing::info!(address = %listener.local_addr().map_err(anyhow::Error::from)?, "data plane listening");
    let limits = reflow_common::server::Limits::from_config(&config.server);
    data_plane.serve(listener, router, limits, shutdown.cancelled_owned()).await.map_err(anyhow::Error::from)?;
    stop.cancel();
    data_plane.flush_audit();
    syncing.await.map_err(anyhow::Error::from)?;
    crate::stop_export(&config, export_stop, [exporting]).await;
    Ok(())
}
