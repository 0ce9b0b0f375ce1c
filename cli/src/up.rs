//! `reflow up`: the zero-setup path. Everything lives in one data directory: the SQLite
//! database and the generated secrets (files readable only by their owner). Restarting with
//! the same directory keeps all data; secrets set in the config file win over the files.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use rand::RngCore;
use reflow_common::config::ConfigError;
use reflow_common::crypto::Key;
use reflow_control_plane::{bind, store, ControlPlane, StartError};

use reflow_data_plane::sync::SyncConfig;
use reflow_data_plane::DataPlane;

use crate::{init_logging, load_config, shutdown_token, CommonArgs, Failure};

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Directory for the database and generated secrets.
    #[arg(long, default_value = "./reflow-data", env = "REFLOW_DATA_DIR")]
    data_dir: PathBuf,
    /// Loopback port of the gRPC services: the management API `reflow admin` talks to, and the
    /// snapshot stream of the in-process data plane (0: any free port).
    #[arg(long, default_value_t = 50051, env = "REFLOW_GRPC_PORT")]
    grpc_port: u16,
}

/// Creates `dir` readable only by its owner.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict permissions of {}", dir.display()))?;
    }
    Ok(())
}

/// Reads a secret file, or creates it with `generate()` (mode 0600, written whole or not at
/// all: a temporary file renamed into place).
fn secret_file(path: &Path, generate: impl FnOnce() -> String) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => return Ok(text.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let value = generate();
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(value.as_bytes())
        .and_then(|_| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(value)
}

/// 32 random bytes as 64 hex digits.
fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    reflow_common::crypto::to_hex(&bytes)
}

pub async fn run(args: UpArgs) -> Result<(), Failure> {
    let config = load_config(&args.common)?;
    let _logs = init_logging(&config)?;
    // Zero setup listens on loopback only, whatever a config file leaves out; --host or
    // server.host exposes it.
    let host = config.server.host.clone().unwrap_or_else(|| "127.0.0.1".into());
    if !reflow_common::config::is_loopback_host(&host) && config.auth.allow_registration {
        tracing::warn!(%host, "listening beyond this machine with open registration: anyone who reaches it can create an account (auth.allow_registration: false closes it)");
    }
    let mut config = config;
    let dir = &args.data_dir;
    create_private_dir(dir)?;
    if config.jwt.secret.is_none() {
        config.jwt.secret = Some(secret_file(&dir.join("jwt-secret"), random_hex)?);
    }
    if config.encryption.key.is_none() {
        config.encryption.key = Some(secret_file(&dir.join("encryption-key"), || Key::generate().to_hex())?);
    }
    if config.control_plane.data_plane_token.is_none() {
        config.control_plane.data_plane_token = Some(secret_file(&dir.join("data-plane-token"), random_hex)?);
    }
    let database_path = dir.join("reflow.db");
    let url = match config.database.connection_url() {
        Some(url) => url,
        None => format!("sqlite://{}", database_path.display()),
    };
    config.validate().map_err(|e| {
        ConfigError::new(e.key.clone(), format!("{} (from the config or the files in {})", e.message, dir.display()))
    })?;
    let store = store::connect(&url, config.database.max_connections).await.map_err(StartError::from)?;
    let backend = store.backend();
    let mut control_plane = ControlPlane::new(&config, store)?;
    if config.kubernetes.enabled {
        let cluster = reflow_control_plane::cluster::Cluster::connect(&config.kubernetes).await?;
        control_plane = control_plane.with_cluster(cluster);
    }
    let listener = bind(&host, config.server.port).await?;
    let shutdown = shutdown_token();

    // The same path as a split deployment, in one process: the compiler, the gRPC snapshot
    // service on a loopback port, and a data plane that syncs from it and keeps its cache.
    let compiler = control_plane.start_compiler(shutdown.clone()).await;
    let grpc_listener = bind("127.0.0.1", args.grpc_port).await?;
    let grpc_address = grpc_listener.local_addr().map_err(anyhow::Error::from)?;
    tracing::info!(address = %format!("http://{grpc_address}"), "management API (gRPC) listening; reflow admin --server http://{grpc_address}");
    let grpc = {
        let (control_plane, shutdown) = (control_plane.clone(), shutdown.clone());
        tokio::spawn(async move { control_plane.serve_grpc(grpc_listener, shutdown).await })
    };
    let sync = SyncConfig {
        control_plane: format!("http://{grpc_address}"),
        token: config.control_plane.data_plane_token.clone().unwrap_or_default(),
        node_id: "local".into(),
        group: "default".into(),
        labels: Default::default(),
        tls: None,
        max_snapshot_bytes: config.data_plane.max_snapshot_bytes,
    };
    let audit = crate::audit_settings(&config, &sync.node_id, Some(&dir.join("cache")));
    let mut data_plane = DataPlane::new(sync, Some(dir.join("cache"))).with_mcp(crate::mcp_settings(&config).await?);
    if let Some(audit) = audit {
        data_plane = data_plane
            .with_audit(&audit)
            .map_err(|e| ConfigError::new("audit.spool_dir", format!("cannot open the audit spool: {e}")))?;
    }
    // One process, one /metrics: both planes' families (their names do not overlap).
    let control_plane = control_plane.without_metrics_route();
    let registries = vec![data_plane.registry(), control_plane.registry()];
    data_plane = data_plane.without_metrics_route().with_export(reflow_common::telemetry::ExportSettings::from_config(
        &config.telemetry,
        "data-plane",
        "local",
    )?);
    let export_stop = tokio_util::sync::CancellationToken::new();
    let exporting = [
        data_plane.start_export(export_stop.clone())?,
        crate::export_metrics(&config, "control-plane", "local", control_plane.registry(), export_stop.clone())?,
    ];
    let metrics = match config.telemetry.metrics_port {
        Some(port) => {
            crate::serve_metrics(&host, port, registries, shutdown.clone()).await?;
            axum::Router::new()
        }
        None => reflow_common::telemetry::metrics::router(registries),
    };
    let syncing = data_plane.start_sync(shutdown.clone());
    let router = data_plane.router().merge(control_plane.router()).merge(metrics);
    let local = listener.local_addr().map_err(anyhow::Error::from)?;
    let shown_host = if local.ip().is_unspecified() { "localhost".to_string() } else { local.ip().to_string() };
    let base = format!("http://{shown_host}:{}", local.port());
    let storage =
        if backend == "sqlite" { format!("SQLite at {}", database_path.display()) } else { "PostgreSQL".into() };
    println!(
        "\nReflow Gateway is up ({storage}; secrets in {dir})\n\
         \n  Admin API      {base}/api\
         \n  API reference  {base}/docs\
         \n  Health         {base}/health\n\
         \nRegister the first user (it becomes admin):\
         \n  curl -X POST {base}/api/auth/register -H \"Content-Type: application/json\" \\\
         \n    -d '{{\"email\":\"admin@example.com\",\"password\":\"change-me-please\"}}'\
         \nLog in:\
         \n  TOKEN=$(curl -s -X POST {base}/api/auth/login -H \"Content-Type: application/json\" \\\
         \n    -d '{{\"email\":\"admin@example.com\",\"password\":\"change-me-please\"}}' | jq -r .token)\
         \nCreate an API token for an MCP client (shown once):\
         \n  curl -s -X POST {base}/api/auth/tokens -H \"Authorization: Bearer $TOKEN\" \\\
         \n    -H \"Content-Type: application/json\" -d '{{\"name\":\"my-laptop\"}}' | jq -r .token\
         \nConnect an MCP client (after adding a target and a policy that allows it):\
         \n  URL {base}/mcp   (a single target: {base}/mcp/<target>)\
         \n  Header Authorization: Bearer <the API token>\n",
        dir = dir.display()
    );
    tracing::info!(address = %local, "listening");
    let limits = reflow_common::server::Limits::from_config(&config.server);
    reflow_common::server::serve(listener, router, limits, shutdown.clone().cancelled_owned())
        .await
        .map_err(anyhow::Error::from)?;
    shutdown.cancel();
    data_plane.flush_audit();
    grpc.await.map_err(anyhow::Error::from)?.map_err(anyhow::Error::from)?;
    syncing.await.map_err(anyhow::Error::from)?;
    compiler.await.map_err(anyhow::Error::from)?;
    crate::stop_export(&config, export_stop, exporting).await;
    Ok(())
}
