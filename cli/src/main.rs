//! `reflow`: one binary for every Reflow role.
//!
//! - `reflow up`: the zero-setup gateway on an embedded SQLite file with generated secrets.
//! - `reflow control-plane`: the control plane alone, against PostgreSQL.
//! - `reflow data-plane`: a data plane, fed by a control plane's snapshot stream.
//! - `reflow openapi`: prints the admin API's OpenAPI document.
//! - `reflow admin`: the management API (gRPC) from a terminal or a pipeline; its own exit
//!   codes (0 done, 1 `diff` found changes, 2 error).
//!
//! Exit codes: 0 after a clean shutdown, 2 for a configuration problem (the message names
//! the key), 1 for any other failure to start or serve.

mod admin;
mod data_plane;
mod operator;
mod up;

/// The allocator: glibc's malloc spends more on the data plane's many small, short-lived
/// allocations (JSON values, headers) across threads than mimalloc does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use reflow_common::config::{Config, ConfigError};
use reflow_control_plane::{bind, store, ControlPlane, StartError};

#[derive(Debug, Parser)]
#[command(
    name = "reflow",
    version,
    about = "Reflow Gateway: an MCP gateway with policies, credential injection and audit"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway with zero setup: embedded SQLite and generated secrets in a data directory.
    Up(up::UpArgs),
    /// Run the control plane against PostgreSQL.
    ControlPlane(ControlPlaneArgs),
    /// Run a data plane fed by a control plane.
    DataPlane(data_plane::DataPlaneArgs),
    /// Print the admin API's OpenAPI document (JSON).
    Openapi,
    /// The audit trail.
    Audit(AuditArgs),
    /// Manage a gateway over its gRPC management API: resources, status, declarative files.
    Admin(admin::AdminArgs),
    /// The Kubernetes operator that runs kubernetes targets' MCPInstances as pods.
    Operator(operator::OperatorArgs),
}

#[derive(Debug, Args)]
struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify every data plane's hash chain; names the first record changed, removed or out of
    /// order (exit code 1).
    Verify(AuditVerifyArgs),
}

#[derive(Debug, Args)]
struct AuditVerifyArgs {
    /// YAML config file (its `database` section); `${VAR}` references are expanded.
    #[arg(long, short, env = "REFLOW_CONFIG")]
    config: Option<PathBuf>,
    /// The database: postgres://… or, for `reflow up`, sqlite://<data dir>/reflow.db.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

/// Options every serving role accepts.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// YAML config file; `${VAR}` references are expanded from the environment.
    #[arg(long, short, env = "REFLOW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides server.host).
    #[arg(long, env = "REFLOW_HOST")]
    pub host: Option<String>,
    /// Port to listen on (overrides server.port).
    #[arg(long, env = "REFLOW_PORT")]
    pub port: Option<u16>,
}

#[derive(Debug, Args)]
struct ControlPlaneArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// PostgreSQL URL (overrides database.url).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Secret for the JWTs the control plane issues, at least 32 bytes (overrides jwt.secret).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Key for secrets at rest: 32 characters, 64 hex digits or base64 of 32 bytes (overrides encryption.key).
    #[arg(long, env = "ENCRYPTION_KEY", hide_env_values = true)]
    encryption_key: Option<String>,
    /// Port of the gRPC snapshot service (overrides control_plane.grpc_port).
    #[arg(long, env = "REFLOW_GRPC_PORT")]
    grpc_port: Option<u16>,
    /// The token data planes present, at least 16 bytes (overrides control_plane.data_plane_token).
    #[arg(long, env = "REFLOW_DATA_PLANE_TOKEN", hide_env_values = true)]
    data_plane_token: Option<String>,
    /// PEM certificate of the snapshot service (overrides control_plane.tls.cert).
    #[arg(long)]
    grpc_tls_cert: Option<String>,
    /// PEM key of the snapshot service (overrides control_plane.tls.key).
    #[arg(long)]
    grpc_tls_key: Option<String>,
    /// PEM CA that data planes' client certificates must chain to: mTLS (overrides control_plane.tls.ca).
    #[arg(long)]
    grpc_client_ca: Option<String>,
}

/// Reads a PEM file named by config key `key`.
pub fn read_pem(key: &str, path: &str) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::new(key, format!("cannot read {path}: {e}")))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(ConfigError::new(key, format!("{path} is not a PEM file")));
    }
    Ok(bytes)
}

/// A failure to start, split by exit code.
#[derive(Debug)]
pub enum Failure {
    Config(ConfigError),
    Other(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e)
    }
}

impl From<StartError> for Failure {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Config(e) => Failure::Config(e),
            other => Failure::Other(other.into()),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

fn main() -> ExitCode {
    // A STDIO server's launcher: this binary, started by the data plane as the server's child,
    // sets its limits and becomes the server (see reflow_data_plane::upstream::launch).
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == reflow_data_plane::upstream::launch::SUBCOMMAND) {
        return ExitCode::from(reflow_data_plane::upstream::launch::main(&args[2..]).clamp(0, 255) as u8);
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("reflow: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let command = match cli.command {
        Command::Admin(args) => return runtime.block_on(admin::run(args)),
        other => other,
    };
    let result = runtime.block_on(async move {
        match command {
            Command::Up(args) => up::run(args).await,
            Command::ControlPlane(args) => control_plane(args).await,
            Command::DataPlane(args) => data_plane::run(args).await,
            Command::Audit(AuditArgs { command: AuditCommand::Verify(args) }) => audit_verify(args).await,
            Command::Admin(_) => unreachable!("run above"),
            Command::Operator(args) => operator::run(args).await,
            Command::Openapi => {
                let document = reflow_control_plane::api::openapi();
                println!("{}", serde_json::to_string_pretty(&document).map_err(anyhow::Error::from)?);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("reflow: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("reflow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the config file (or defaults) and applies the common flags.
pub fn load_config(common: &CommonArgs) -> Result<Config, ConfigError> {
    let mut config = match &common.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(host) = &common.host {
        config.server.host = Some(host.clone());
    }
    if let Some(port) = common.port {
        config.server.port = port;
    }
    Ok(config)
}

/// The data plane's MCP settings from `config`, with STDIO servers launched through this
/// binary and, with `kubernetes.enabled`, kubernetes targets served through the cluster the
/// `kubernetes` section names; a `stdio` section that names an unusable user or directory, or
/// a kubeconfig that cannot be read, is a config error.
pub async fn mcp_settings(config: &Config) -> Result<reflow_data_plane::mcp::McpSettings, ConfigError> {
    reflow_data_plane::upstream::stdio::Sandbox::from_config(&config.stdio)?;
    let launcher = std::env::current_exe()
        .map_err(|e| ConfigError::new("stdio", format!("cannot find this binary to launch STDIO servers: {e}")))?;
    let mut settings = reflow_data_plane::mcp::McpSettings::from_config(config).with_stdio_launcher(launcher);
    if config.kubernetes.enabled {
        let instances = reflow_data_plane::upstream::kubernetes::Instances::connect(&config.kubernetes).await?;
        tracing::info!(namespace = %config.kubernetes.namespace, "kubernetes targets run as MCPInstances");
        settings = settings.with_kubernetes(instances);
    }
    Ok(settings)
}

/// How the data plane keeps its audit trail, or `None` when `audit.enabled` is false. The spool
/// lives in `audit.spool_dir`, else beside the snapshot cache, else under the system temp.
pub fn audit_settings(
    config: &Config,
    node_id: &str,
    cache_dir: Option<&std::path::Path>,
) -> Option<reflow_data_plane::audit::AuditSettings> {
    let audit = &config.audit;
    if !audit.enabled {
        tracing::warn!("audit.enabled is false: MCP requests leave no audit record");
        return None;
    }
    let spool_dir = match (&audit.spool_dir, cache_dir) {
        (Some(dir), _) => std::path::PathBuf::from(dir),
        (None, Some(cache)) => cache.join("audit"),
        (None, None) => {
            let name: String =
                node_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
            let dir = std::env::temp_dir().join(format!("reflow-audit-{name}"));
            tracing::warn!(dir = %dir.display(), "audit records wait in a spool under the system temp; set audit.spool_dir (or data_plane.cache_dir) so they survive a restart under another node id");
            dir
        }
    };
    let on_full = match audit.on_full {
        reflow_common::config::AuditOnFull::DropOldest => reflow_data_plane::spool::OnFull::DropOldest,
        reflow_common::config::AuditOnFull::Refuse => reflow_data_plane::spool::OnFull::Refuse,
    };
    Some(reflow_data_plane::audit::AuditSettings {
        spool_dir,
        spool_bytes: audit.spool_bytes,
        on_full,
        flush_interval: audit.flush_interval,
    })
}

/// Serves `/metrics` over `registries` on a port of its own (`telemetry.metrics_port`) until
/// `shutdown`.
pub async fn serve_metrics(
    host: &str,
    port: u16,
    registries: Vec<std::sync::Arc<reflow_common::telemetry::metrics::Registry>>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, Failure> {
    let listener = reflow_control_plane::bind(host, port).await?;
    tracing::info!(address = %listener.local_addr().map_err(anyhow::Error::from)?, "metrics listening");
    let router = reflow_common::telemetry::metrics::router(registries);
    Ok(tokio::spawn(async move {
        if let Err(error) =
            reflow_common::server::serve(listener, router, Default::default(), shutdown.cancelled_owned()).await
        {
            tracing::error!(%error, "the metrics listener failed");
        }
    }))
}

/// Pushes `registry` over OTLP when `telemetry.enabled`, until `shutdown`; the handle ends
/// after the last push.
pub fn export_metrics(
    config: &Config,
    role: &'static str,
    instance: &str,
    registry: std::sync::Arc<reflow_common::telemetry::metrics::Registry>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, ConfigError> {
    match reflow_common::telemetry::ExportSettings::from_config(&config.telemetry, role, instance)? {
        Some(settings) => Ok(Some(reflow_common::telemetry::Exporter::start(settings, registry, shutdown)?.1)),
        None => Ok(None),
    }
}

/// Ends an exporter started with its own token: cancels it and waits for its last export
/// (bounded by `telemetry.export_timeout`, and a second for the rest).
pub async fn stop_export(
    config: &Config,
    stop: tokio_util::sync::CancellationToken,
    running: impl IntoIterator<Item = Option<tokio::task::JoinHandle<()>>>,
) {
    stop.cancel();
    let wait = config.telemetry.export_timeout * 2 + std::time::Duration::from_secs(1);
    for handle in running.into_iter().flatten() {
        let _ = tokio::time::timeout(wait, handle).await;
    }
}

/// Starts logging to stderr (see [`reflow_common::logging`]); keep the guard until exit.
pub fn init_logging(config: &Config) -> Result<reflow_common::logging::LogGuard, ConfigError> {
    reflow_common::logging::init(config)
}

/// A token cancelled on Ctrl-C or SIGTERM; every long-lived task takes a clone.
pub fn shutdown_token() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        trigger.cancel();
    });
    token
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}

/// `reflow audit verify`: reads every audit chain and checks it link by link.
async fn audit_verify(args: AuditVerifyArgs) -> Result<(), Failure> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let url = args.database_url.or_else(|| config.database.connection_url()).ok_or_else(|| {
        ConfigError::new("database.url", "required: pass --database-url, set DATABASE_URL, or configure database.url")
    })?;
    let store = store::connect(&url, 2).await.map_err(StartError::from)?;
    let (records, anchors) =
        store.audit_chains().await.map_err(|e| anyhow::anyhow!("cannot read the audit trail: {e}"))?;
    let planes = anchors.len();
    match reflow_control_plane::audit::verify(&records, |plane| anchors.get(plane).cloned().unwrap_or_default()) {
        Ok(checked) => {
            println!("audit trail verified: {checked} records over {planes} data planes");
            Ok(())
        }
        Err(broken) => Err(anyhow::anyhow!("audit trail broken at {broken}").into()),
    }
}

async fn control_plane(args: ControlPlaneArgs) -> Result<(), Failure> {
    let mut config = load_config(&args.common)?;
    if let Some(url) = args.database_url {
        config.database.url = Some(url);
    }
    if let Some(secret) = args.jwt_secret {
        config.jwt.secret = Some(secret);
    }
    if let Some(key) = args.encryption_key {
        config.encryption.key = Some(key);
    }
    if let Some(port) = args.grpc_port {
        config.control_plane.grpc_port = port;
    }
    if let Some(token) = args.data_plane_token {
        config.control_plane.data_plane_token = Some(token);
    }
    let tls = &mut config.control_plane.tls;
    tls.cert = args.grpc_tls_cert.or(tls.cert.take());
    tls.key = args.grpc_tls_key.or(tls.key.take());
    tls.ca = args.grpc_client_ca.or(tls.ca.take());
    config.validate()?;
    let grpc_tls = match (&config.control_plane.tls.cert, &config.control_plane.tls.key) {
        (Some(cert), Some(key)) => Some(reflow_control_plane::GrpcTls {
            cert_pem: read_pem("control_plane.tls.cert", cert)?,
            key_pem: read_pem("control_plane.tls.key", key)?,
            client_ca_pem: config
                .control_plane
                .tls
                .ca
                .as_deref()
                .map(|ca| read_pem("control_plane.tls.ca", ca))
                .transpose()?,
        }),
        _ => None,
    };
    if config.jwt.secret.is_none() {
        return Err(ConfigError::new(
            "jwt.secret",
            "required: pass --jwt-secret, set JWT_SECRET, or configure jwt.secret",
        )
        .into());
    }
    if config.encryption.key.is_none() {
        return Err(ConfigError::new(
            "encryption.key",
            "required: pass --encryption-key, set ENCRYPTION_KEY, or configure encryption.key",
        )
        .into());
    }
    let _logs = init_logging(&config)?;
    let url = config.database.connection_url().ok_or_else(|| {
        ConfigError::new("database.url", "required: pass --database-url, set DATABASE_URL, or configure database.host")
    })?;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(ConfigError::new(
            "database.url",
            "the control plane runs on PostgreSQL; use `reflow up` for SQLite",
        )
        .into());
    }
    let store = store::connect(&url, config.database.max_connections).await.map_err(StartError::from)?;
    let mut control_plane = ControlPlane::new(&config, store)?;
    if config.kubernetes.enabled {
        let cluster = reflow_control_plane::cluster::Cluster::connect(&config.kubernetes).await?;
        tracing::info!(namespace = %config.kubernetes.namespace, "kubernetes targets' instances are listed and retired from the cluster");
        control_plane = control_plane.with_cluster(cluster);
    }
    let grpc_has_tls = grpc_tls.is_some();
    if let Some(tls) = grpc_tls {
        control_plane = control_plane.with_grpc_tls(tls);
    }
    let host = config.server.host.clone().unwrap_or_else(|| "0.0.0.0".into());
    let listener = bind(&host, config.server.port).await?;
    let shutdown = shutdown_token();
    let instance = config.control_plane.id.clone().unwrap_or_else(reflow_control_plane::default_instance_id);
    let export_stop = tokio_util::sync::CancellationToken::new();
    let exporting = export_metrics(&config, "control-plane", &instance, control_plane.registry(), export_stop.clone())?;
    if let Some(port) = config.telemetry.metrics_port {
        serve_metrics(&host, port, vec![control_plane.registry()], shutdown.clone()).await?;
        control_plane = control_plane.without_metrics_route();
    }
    let compiler = control_plane.start_compiler(shutdown.clone()).await;
    let grpc = if config.control_plane.data_plane_token.is_some() {
        let grpc_listener = bind(&host, config.control_plane.grpc_port).await?;
        if !grpc_has_tls && !reflow_common::config::is_loopback_host(&host) {
            tracing::warn!(%host, "the snapshot service listens beyond this machine without TLS: data planes must opt in with data_plane.insecure, and the data-plane token and snapshots cross the network in clear (set control_plane.tls)");
        }
        tracing::info!(address = %grpc_listener.local_addr().map_err(anyhow::Error::from)?, "snapshot service listening");
        let (control_plane, shutdown) = (control_plane.clone(), shutdown.clone());
        Some(tokio::spawn(async move { control_plane.serve_grpc(grpc_listener, shutdown).await }))
    } else {
        tracing::warn!("no data-plane token configured (--data-plane-token); the snapshot service is off");
        None
    };
    tracing::info!(address = %listener.local_addr().map_err(anyhow::Error::from)?, "control plane listening");
    control_plane.serve(listener, shutdown.clone().cancelled_owned()).await.map_err(anyhow::Error::from)?;
    shutdown.cancel();
    if let Some(grpc) = grpc {
        grpc.await.map_err(anyhow::Error::from)?.map_err(anyhow::Error::from)?;
    }
    compiler.await.map_err(anyhow::Error::from)?;
    stop_export(&config, export_stop, [exporting]).await;
    Ok(())
}
