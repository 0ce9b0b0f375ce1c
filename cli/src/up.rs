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

use crate::{init_logging, load_config, shutdown_signal, CommonArgs, Failure};

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Directory for the database and generated secrets.
    #[arg(long, default_value = "./reflow-data", env = "REFLOW_DATA_DIR")]
    data_dir: PathBuf,
}

/// Creates `dir` readable only by its owner.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
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
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(value.as_bytes())
        .and_then(|_| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(value)
}

pub async fn run(args: UpArgs) -> Result<(), Failure> {
    let mut config = load_config(&args.common)?;
    if args.common.host.is_none() && args.common.config.is_none() {
        // Zero setup listens on loopback only; pass --host 0.0.0.0 to expose it.
        config.server.host = "127.0.0.1".into();
    }
    init_logging(&config)?;
    let dir = &args.data_dir;
    create_private_dir(dir)?;
    if config.jwt.secret.is_none() {
        config.jwt.secret = Some(secret_file(&dir.join("jwt-secret"), || {
            let mut bytes = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        })?);
    }
    if config.encryption.key.is_none() {
        config.encryption.key = Some(secret_file(&dir.join("encryption-key"), || {
            Key::generate().to_hex()
        })?);
    }
    let database_path = dir.join("reflow.db");
    let url = match config.database.connection_url() {
        Some(url) => url,
        None => format!("sqlite://{}", database_path.display()),
    };
    config.validate().map_err(|e| {
        ConfigError::new(
            e.key.clone(),
            format!(
                "{} (from the config or the files in {})",
                e.message,
                dir.display()
            ),
        )
    })?;
    let store = store::connect(&url, config.database.max_connections)
        .await
        .map_err(StartError::from)?;
    let backend = store.backend();
    let control_plane = ControlPlane::new(&config, store)?;
    let listener = bind(&config.server.host, config.server.port).await?;
    let local = listener.local_addr().map_err(anyhow::Error::from)?;
    let shown_host = if local.ip().is_unspecified() {
        "localhost".to_string()
    } else {
        local.ip().to_string()
    };
    let base = format!("http://{shown_host}:{}", local.port());
    let storage = if backend == "sqlite" {
        format!("SQLite at {}", database_path.display())
    } else {
        "PostgreSQL".into()
    };
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
         \n    -H \"Content-Type: application/json\" -d '{{\"name\":\"my-laptop\"}}' | jq -r .token\n",
        dir = dir.display()
    );
    tracing::info!(address = %local, "listening");
    control_plane
        .serve(listener, shutdown_signal())
        .await
        .map_err(anyhow::Error::from)?;
    Ok(())
}
