//! The YAML configuration shared by every role.
//!
//! Keys follow the original gateway's config where they still apply. Loading is split so it
//! can be tested without touching the process: [`Config::from_yaml`] takes the text and an
//! explicit environment map. `${VAR}` and `${VAR:-default}` are expanded before parsing; an
//! unset variable without a default is an error naming it. Unknown keys are errors, and every
//! error names the key it is about.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::crypto::{Key, Keyring};

/// A configuration problem, naming the key (dotted path) it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { key: key.into(), message: message.into() }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub jwt: JwtConfig,
    pub encryption: EncryptionConfig,
    pub auth: AuthConfig,
    pub cors: CorsConfig,
    pub logging: LoggingConfig,
    pub session: SessionConfig,
    pub mcp: McpConfig,
    pub stdio: StdioConfig,
    pub kubernetes: KubernetesConfig,
    pub telemetry: TelemetryConfig,
    pub audit: AuditConfig,
    pub control_plane: ControlPlaneConfig,
    pub data_plane: DataPlaneConfig,
    pub limits: LimitsConfig,
}

/// What one account may store, so that no self-registered user can grow the database or the
/// snapshot every data plane holds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// API tokens one user may hold.
    pub api_tokens_per_user: usize,
    /// Values (tokens and env entries) stored at one user's scope, over all targets.
    pub values_per_user: usize,
    /// Bytes of those values, sealed.
    pub value_bytes_per_user: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig { api_tokens_per_user: 50, values_per_user: 200, value_bytes_per_user: 1024 * 1024 }
    }
}

/// The control plane's snapshot service.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// Port of the gRPC snapshot service (on `server.host`).
    pub grpc_port: u16,
    /// The token data planes present. Without one the snapshot service is not started.
    pub data_plane_token: Option<String>,
    /// This replica's id in status reports; default: host name and process id.
    pub id: Option<String>,
    /// TLS for the snapshot service: `cert` and `key` serve TLS; `ca` also requires data
    /// planes to present a client certificate it signed (mTLS).
    pub tls: TlsFiles,
}

/// PEM files for one end of a TLS connection.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub ca: Option<String>,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig { grpc_port: 50051, data_plane_token: None, id: None, tls: TlsFiles::default() }
    }
}

impl fmt::Debug for ControlPlaneConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlaneConfig")
            .field("grpc_port", &self.grpc_port)
            .field("data_plane_token", &self.data_plane_token.as_ref().map(|_| "<redacted>"))
            .field("id", &self.id)
            .field("tls", &self.tls)
            .finish()
    }
}

/// How a data plane reaches its control plane and where it keeps its snapshot cache.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlaneConfig {
    /// The control plane's gRPC address, `http://host:50051`.
    pub control_plane: Option<String>,
    /// The data-plane token (the same as the control plane's `data_plane_token`).
    pub token: Option<String>,
    /// Where the encrypted last-accepted snapshot is kept.
    pub cache_dir: Option<String>,
    /// This data plane's id; default: host name and process id.
    pub node_id: Option<String>,
    pub group: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// TLS to the control plane: `ca` verifies its certificate (required for https://);
    /// `cert` and `key` are this data plane's client certificate for mTLS.
    pub tls: TlsFiles,
    /// The largest snapshot update this data plane takes in, in bytes (it arrives in parts).
    pub max_snapshot_bytes: usize,
    /// Allows plain `http://` to a control plane that is not on this machine: the data-plane
    /// token and every snapshot then cross the network unencrypted. Off by default; a warning is
    /// logged when on.
    pub insecure: bool,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        DataPlaneConfig {
            control_plane: None,
            token: None,
            cache_dir: None,
            node_id: None,
            group: "default".into(),
            labels: Default::default(),
            tls: TlsFiles::default(),
            max_snapshot_bytes: 1024 * 1024 * 1024,
            insecure: false,
        }
    }
}

impl fmt::Debug for DataPlaneConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataPlaneConfig")
            .field("control_plane", &self.control_plane)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cache_dir", &self.cache_dir)
            .field("node_id", &self.node_id)
            .field("group", &self.group)
            .field("labels", &self.labels)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Whether `host` (a URL's host, or an address to listen on) is this machine only.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host of an `http://` or `https://` URL.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if let Some(bracketed) = authority.strip_prefix('[') {
        return bracketed.split_once(']').map(|(host, _)| host);
    }
    Some(authority.rsplit_once(':').map_or(authority, |(host, _)| host))
}

/// Minimum length of a data-plane token.
pub const MIN_DATA_PLANE_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The address to listen on. Unset: every address for the split roles, loopback only for
    /// `reflow up`.
    pub host: Option<String>,
    pub port: u16,
    /// Largest request body the REST API accepts, in bytes.
    pub max_body_bytes: usize,
    /// How long a connection may take to send a request's head (and stay idle between
    /// requests) before it is closed.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// How long a request's body may take to arrive (408 past it).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Open connections one listener accepts; past it new ones are closed at once.
    pub max_connections: usize,
    /// Proxies (addresses or CIDR blocks) whose `X-Forwarded-For` names the client, for the
    /// per-client login throttle. Empty: the peer is the client.
    pub trusted_proxies: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: None,
            port: 3000,
            max_body_bytes: 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// A full URL (`postgres://…` or `sqlite://…`); wins over the separate fields.
    pub url: Option<String>,
    pub host: Option<String>,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub sslmode: String,
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            host: None,
            port: 5432,
            user: "reflow".into(),
            password: None,
            database: "reflow".into(),
            sslmode: "prefer".into(),
            max_connections: 10,
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.url.as_ref().map(|_| "<set>"))
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("sslmode", &self.sslmode)
            .finish_non_exhaustive()
    }
}

impl DatabaseConfig {
    /// The connection URL: `url` if set, else one built from host/port/user/password.
    pub fn connection_url(&self) -> Option<String> {
        if let Some(url) = &self.url {
            return Some(url.clone());
        }
        let host = self.host.as_ref()?;
        let auth = match &self.password {
            Some(pw) => format!("{}:{}", percent_encode(&self.user), percent_encode(pw)),
            None => percent_encode(&self.user),
        };
        Some(format!(
            "postgres://{auth}@{host}:{}/{}?sslmode={}",
            self.port,
            percent_encode(&self.database),
            self.sslmode
        ))
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// HMAC secret for tokens the control plane issues; at least 32 bytes.
    pub secret: Option<String>,
    /// Lifetime of issued tokens. Every token carries `exp`.
    #[serde(with = "humantime_serde")]
    pub expiry: Duration,
    pub issuer: String,
    pub audience: String,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            secret: None,
            expiry: Duration::from_secs(24 * 3600),
            issuer: "reflow".into(),
            audience: "reflow".into(),
        }
    }
}

impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("expiry", &self.expiry)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// The current key: 32 characters, 64 hex digits or base64 of 32 bytes.
    pub key: Option<String>,
    /// Version stamped on values sealed with `key`.
    pub key_version: u32,
    /// Older keys, still able to open values sealed before a rotation.
    pub previous_keys: Vec<PreviousKey>,
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        EncryptionConfig { key: None, key_version: 1, previous_keys: Vec::new() }
    }
}

impl fmt::Debug for EncryptionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionConfig")
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("key_version", &self.key_version)
            .field("previous_key_versions", &self.previous_keys.iter().map(|k| k.version).collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousKey {
    pub version: u32,
    pub key: String,
}

impl fmt::Debug for PreviousKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreviousKey").field("version", &self.version).finish_non_exhaustive()
    }
}

impl EncryptionConfig {
    /// Builds the keyring, or says which key is wrong. `None` when no key is configured.
    pub fn keyring(&self) -> Result<Option<Keyring>, ConfigError> {
        let Some(key) = &self.key else {
            return Ok(None);
        };
        let key = Key::parse(key).map_err(|e| ConfigError::new("encryption.key", e.to_string()))?;
        let mut ring = Keyring::single(self.key_version, key);
        for (i, previous) in self.previous_keys.iter().enumerate() {
            let name = format!("encryption.previous_keys[{i}]");
            let key = Key::parse(&previous.key).map_err(|e| ConfigError::new(format!("{name}.key"), e.to_string()))?;
            ring = ring
                .with_previous(previous.version, key)
                .map_err(|e| ConfigError::new(format!("{name}.version"), e.to_string()))?;
        }
        Ok(Some(ring))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether anyone may register after the first user (who always can, and becomes admin).
    pub allow_registration: bool,
    /// Failed logins for one account from one client address before that address is refused
    /// for it for `login_lockout` (ten times as many refuse the address for every account).
    pub login_max_failures: u32,
    #[serde(with = "humantime_serde")]
    pub login_lockout: Duration,
    /// Password hashes (registration, login) computed at once; the rest wait.
    pub password_hash_concurrency: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_registration: true,
            login_max_failures: 10,
            login_lockout: Duration::from_secs(300),
            password_hash_concurrency: 4,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed to call the REST API from a browser. Empty: no cross-origin access.
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// A `tracing` filter: `info`, `debug`, `reflow_control_plane=debug,info`, …
    pub level: String,
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { level: "info".into(), format: LogFormat::Text }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
    /// How long an MCP session id keeps resuming on any data plane after it was issued.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            timeout: Duration::from_secs(30 * 60),
            cleanup_interval: Duration::from_secs(60),
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// The data plane's MCP endpoint and its upstream requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// Largest MCP request body, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Largest message an upstream may send (a JSON reply, an SSE event, a STDIO line), in
    /// bytes; past it the request fails with a clear error instead of the reply being held whole.
    pub max_response_bytes: usize,
    /// How long one upstream request may take (a target's `TIMEOUT` env overrides it).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long connecting and initialising an upstream may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long an aggregated list waits for the slowest upstream before answering without it.
    #[serde(with = "humantime_serde")]
    pub list_timeout: Duration,
    /// Items per page of the lists the gateway serves.
    pub page_size: usize,
    /// Host names (without port) the MCP endpoint answers to; empty: any. Guards against DNS
    /// rebinding when the gateway listens on a private address.
    pub allowed_hosts: Vec<String>,
    /// Most client sessions one data plane holds; beyond it new sessions get 503.
    pub max_sessions: usize,
    /// Most sessions one user holds on one data plane; beyond it new ones get 429.
    pub max_sessions_per_user: usize,
    /// Most requests of one user in flight at once on one data plane; beyond it 429.
    pub max_inflight_per_user: usize,
    /// Requests per second one user may send one data plane (a token bucket); beyond it 429
    /// with `Retry-After`.
    pub rate_limit: RateLimitConfig,
    /// How long a merged list (tools, prompts, resources) is reused for the same user, client
    /// capabilities and snapshot before the upstreams are asked again; a `list_changed` from an
    /// upstream ends it sooner. 0 asks the upstreams every time.
    #[serde(with = "humantime_serde")]
    pub list_cache_ttl: Duration,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            max_body_bytes: 4 * 1024 * 1024,
            max_response_bytes: 16 * 1024 * 1024,
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            list_timeout: Duration::from_secs(10),
            page_size: 100,
            allowed_hosts: Vec::new(),
            max_sessions: 100_000,
            max_sessions_per_user: 1000,
            max_inflight_per_user: 64,
            rate_limit: RateLimitConfig::default(),
            list_cache_ttl: Duration::from_secs(60),
        }
    }
}

/// A per-user request rate: `requests_per_second` sustained, `burst` at once; 0 turns it off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub requests_per_second: u32,
    pub burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig { requests_per_second: 100, burst: 200 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StdioConfig {
    #[serde(with = "humantime_serde")]
    pub idle_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// How long a server may take to start and answer `initialize` (a first `npx` run
    /// downloads the package). A start goes on in the background when the request that
    /// caused it stops waiting; one still not up after this is killed.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    pub max_processes: u32,
    /// Most STDIO servers that run for one user at once (their `per_user` processes), so one
    /// account cannot take the whole `max_processes`.
    pub max_processes_per_user: u32,
    /// Programs a STDIO target may run (a bare name or an absolute path). A target whose
    /// command is not listed is rejected by the API. Shells are never run.
    pub allowed_commands: Vec<String>,
    /// Where each process gets its own private working directory, which is also its `HOME`
    /// (removed when it stops); default `<system temp>/reflow-stdio`. Never the data plane's
    /// own directory.
    pub work_dir: Option<String>,
    /// The OS user STDIO servers run as: a name, or `uid[:gid]`. Default: the data plane's own
    /// user. Needs the data plane to run as root; the process-count limit binds only a user
    /// other than root.
    pub run_as: Option<String>,
    /// Resource limits of each process (and what it starts).
    pub limits: StdioLimits,
}

/// Resource limits applied to every STDIO server (0: no limit).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StdioLimits {
    /// Address space, in bytes (RLIMIT_AS).
    pub memory_bytes: u64,
    /// Open files (RLIMIT_NOFILE).
    pub open_files: u64,
    /// Processes and threads it may add (RLIMIT_NPROC, counted for its OS user: with
    /// `run_as`, over every STDIO server of that user; not enforced for root).
    pub processes: u64,
}

impl Default for StdioLimits {
    fn default() -> Self {
        StdioLimits { memory_bytes: 4 * 1024 * 1024 * 1024, open_files: 1024, processes: 512 }
    }
}

impl Default for StdioConfig {
    fn default() -> Self {
        StdioConfig {
            idle_ttl: Duration::from_secs(30 * 60),
            max_lifetime: Duration::from_secs(24 * 3600),
            gc_interval: Duration::from_secs(60),
            start_timeout: Duration::from_secs(180),
            max_processes: 100,
            max_processes_per_user: 16,
            allowed_commands: ["npx", "uvx", "node", "python", "python3", "deno", "bunx"].map(String::from).to_vec(),
            work_dir: None,
            run_as: None,
            limits: StdioLimits::default(),
        }
    }
}

/// Programs that interpret their arguments as shell code; never allowed as STDIO commands.
pub const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "ksh", "csh", "tcsh", "fish", "busybox", "env"];

impl StdioConfig {
    /// Whether `command` may be run as a STDIO target.
    pub fn allows(&self, command: &str) -> bool {
        let base = command.rsplit('/').next().unwrap_or(command);
        !SHELLS.contains(&base) && self.allowed_commands.iter().any(|allowed| allowed == command)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    pub enabled: bool,
    pub namespace: String,
    pub kubeconfig: Option<String>,
    #[serde(with = "humantime_serde")]
    pub idle_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    pub max_instances: u32,
    /// How data planes reach an instance: through its `service` (default) or at its `pod` IP.
    pub address: KubernetesAddress,
    /// How long a first request waits for its instance to be verified.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// How often a data plane reports which instances it used (`status.lastUsedAt`).
    #[serde(with = "humantime_serde")]
    pub last_used_interval: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KubernetesAddress {
    #[default]
    Service,
    Pod,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            enabled: false,
            namespace: "reflow".into(),
            kubeconfig: None,
            idle_ttl: Duration::from_secs(30 * 60),
            max_lifetime: Duration::from_secs(24 * 3600),
            gc_interval: Duration::from_secs(60),
            max_instances: 100,
            address: KubernetesAddress::Service,
            start_timeout: Duration::from_secs(120),
            last_used_interval: Duration::from_secs(60),
        }
    }
}

/// The audit trail: one record per MCP request, spooled on the data plane and shipped to the
/// control plane, which chains, stores and prunes them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Record MCP requests (data plane). Default `true`.
    pub enabled: bool,
    /// Where the data plane's encrypted spool lives; default `<data_plane.cache_dir>/audit`,
    /// or a directory under the system temp named by the node id.
    pub spool_dir: Option<String>,
    /// The spool's bound on disk, in bytes.
    pub spool_bytes: u64,
    /// What a full spool does: `drop_oldest` (count and drop the oldest records) or `refuse`
    /// (keep everything and refuse new MCP requests until the control plane drains it).
    pub on_full: AuditOnFull,
    /// How often finished records are moved into the spool (at the latest).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// How long the control plane keeps records (`90d`); unset keeps them all.
    #[serde(with = "humantime_serde::option")]
    pub retention: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOnFull {
    DropOldest,
    Refuse,
}

/// The smallest `audit.spool_bytes`: room for a few batches.
pub const MIN_AUDIT_SPOOL_BYTES: u64 = 4096;

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            spool_dir: None,
            spool_bytes: 256 * 1024 * 1024,
            on_full: AuditOnFull::DropOldest,
            flush_interval: Duration::from_millis(200),
            retention: None,
        }
    }
}

/// OpenTelemetry export and the Prometheus endpoint (both planes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Export traces and metrics over OTLP. `/metrics` is served either way.
    pub enabled: bool,
    /// The collector: `host:port` (TLS unless `insecure`), `https://…` or `http://…` (plain).
    pub endpoint: String,
    /// `grpc` (OTLP/gRPC, port 4317 by custom) or `http` (OTLP/HTTP with protobuf bodies, 4318).
    pub protocol: OtlpProtocol,
    pub service_name: String,
    /// Send to the collector without TLS. An opt-in: logged as a warning.
    pub insecure: bool,
    /// PEM file of the CA the collector's certificate is checked against (default: the
    /// public web roots).
    pub ca: Option<String>,
    /// The share of traces started here that are exported, 0 to 1; a client's sampled flag
    /// decides for traces it started.
    pub sample_ratio: f64,
    /// How often metrics are pushed over OTLP.
    #[serde(with = "humantime_serde")]
    pub export_interval: Duration,
    /// How long one export may take before it is given up (its spans are counted as dropped).
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
    /// Serve `/metrics` on this port (on `server.host`) instead of the main one.
    pub metrics_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    Grpc,
    #[serde(alias = "http/protobuf")]
    Http,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: false,
            endpoint: "localhost:4317".into(),
            protocol: OtlpProtocol::Grpc,
            service_name: "reflow-gateway".into(),
            insecure: false,
            ca: None,
            sample_ratio: 1.0,
            export_interval: Duration::from_secs(15),
            export_timeout: Duration::from_secs(5),
            metrics_port: None,
        }
    }
}

impl Config {
    /// Parses config text after expanding `${VAR}` from `env`, then validates it.
    pub fn from_yaml(text: &str, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let expanded = expand_env(text, env)?;
        if expanded.trim().is_empty() {
            let config = Config::default();
            config.validate()?;
            return Ok(config);
        }
        let deserializer = serde_yaml_ng::Deserializer::from_str(&expanded);
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let key = if path.is_empty() || path == "." { "(top level)".to_string() } else { path };
            ConfigError::new(key, e.into_inner().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a config file with the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("(file)", format!("cannot read {}: {e}", path.display())))?;
        Config::from_yaml(&text, &std::env::vars().collect())
    }

    /// Checks values whose type alone does not make them valid.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.max_body_bytes < 1024 {
            return Err(ConfigError::new("server.max_body_bytes", "must be at least 1024"));
        }
        if let Some(secret) = &self.jwt.secret {
            if secret.len() < 32 {
                return Err(ConfigError::new("jwt.secret", "must be at least 32 bytes"));
            }
        }
        if self.jwt.expiry.is_zero() || self.jwt.expiry > Duration::from_secs(366 * 24 * 3600) {
            return Err(ConfigError::new("jwt.expiry", "must be between 1s and 366 days"));
        }
        if self.jwt.issuer.is_empty() {
            return Err(ConfigError::new("jwt.issuer", "must not be empty"));
        }
        if self.jwt.audience.is_empty() {
            return Err(ConfigError::new("jwt.audience", "must not be empty"));
        }
        self.encryption.keyring()?;
        if let Some(url) = &self.database.url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://") || url.starts_with("sqlite:")) {
                return Err(ConfigError::new("database.url", "must start with postgres://, postgresql:// or sqlite:"));
            }
        }
        if !["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
            .contains(&self.database.sslmode.as_str())
        {
            return Err(ConfigError::new("database.sslmode", format!("unknown mode {:?}", self.database.sslmode)));
        }
        for (i, entry) in self.server.trusted_proxies.iter().enumerate() {
            if entry.parse::<std::net::IpAddr>().is_err()
                && !entry.split_once('/').is_some_and(|(a, p)| {
                    a.parse::<std::net::IpAddr>().is_ok() && p.parse::<u8>().is_ok_and(|p| p <= 128)
                })
            {
                return Err(ConfigError::new(
                    format!("server.trusted_proxies[{i}]"),
                    format!("{entry:?} is not an IP address or CIDR block"),
                ));
            }
        }
        if self.auth.password_hash_concurrency == 0 {
            return Err(ConfigError::new("auth.password_hash_concurrency", "must be at least 1"));
        }
        if self.auth.login_max_failures == 0 {
            return Err(ConfigError::new("auth.login_max_failures", "must be at least 1"));
        }
        if self.audit.spool_bytes < MIN_AUDIT_SPOOL_BYTES {
            return Err(ConfigError::new("audit.spool_bytes", format!("must be at least {MIN_AUDIT_SPOOL_BYTES}")));
        }
        if self.audit.flush_interval < Duration::from_millis(10) || self.audit.flush_interval > Duration::from_secs(60)
        {
            return Err(ConfigError::new("audit.flush_interval", "must be between 10ms and 60s"));
        }
        if self.audit.retention.is_some_and(|r| r < Duration::from_secs(60)) {
            return Err(ConfigError::new("audit.retention", "must be at least 1m (or unset to keep every record)"));
        }
        let telemetry = &self.telemetry;
        if !(0.0..=1.0).contains(&telemetry.sample_ratio) {
            return Err(ConfigError::new("telemetry.sample_ratio", "must be between 0 and 1"));
        }
        if telemetry.export_interval < Duration::from_secs(1) || telemetry.export_interval > Duration::from_secs(3600) {
            return Err(ConfigError::new("telemetry.export_interval", "must be between 1s and 1h"));
        }
        if telemetry.export_timeout < Duration::from_millis(100) || telemetry.export_timeout > Duration::from_secs(60) {
            return Err(ConfigError::new("telemetry.export_timeout", "must be between 100ms and 60s"));
        }
        if telemetry.enabled {
            let endpoint = telemetry.endpoint.trim();
            let rest =
                endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://")).unwrap_or(endpoint);
            if rest.is_empty() || rest.contains(char::is_whitespace) || rest.contains("://") {
                return Err(ConfigError::new(
                    "telemetry.endpoint",
                    "must be host:port, http://host:port or https://host:port",
                ));
            }
            if endpoint.starts_with("https://") && telemetry.insecure {
                return Err(ConfigError::new("telemetry.insecure", "cannot be true with an https:// endpoint"));
            }
        }
        if telemetry.metrics_port == Some(0) || telemetry.metrics_port.is_some_and(|p| p == self.server.port) {
            return Err(ConfigError::new("telemetry.metrics_port", "must be a port other than server.port"));
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError::new("database.max_connections", "must be at least 1"));
        }
        for (key, token) in [
            ("control_plane.data_plane_token", &self.control_plane.data_plane_token),
            ("data_plane.token", &self.data_plane.token),
        ] {
            if token.as_ref().is_some_and(|t| t.len() < MIN_DATA_PLANE_TOKEN_LEN) {
                return Err(ConfigError::new(key, format!("must be at least {MIN_DATA_PLANE_TOKEN_LEN} bytes")));
            }
        }
        if let Some(url) = &self.data_plane.control_plane {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::new("data_plane.control_plane", "must be an http:// or https:// URL"));
            }
            if url.starts_with("https://") && self.data_plane.tls.ca.is_none() {
                return Err(ConfigError::new("data_plane.tls.ca", "required to verify an https:// control plane"));
            }
            let remote = url_host(url).is_some_and(|host| !is_loopback_host(host));
            if url.starts_with("http://") && remote && !self.data_plane.insecure {
                return Err(ConfigError::new(
                    "data_plane.control_plane",
                    "plain http:// to a control plane on another machine would send the data-plane token and every \
                     snapshot in clear: use https:// (with data_plane.tls.ca), or set data_plane.insecure: true",
                ));
            }
        }
        for (prefix, tls) in [("control_plane.tls", &self.control_plane.tls), ("data_plane.tls", &self.data_plane.tls)]
        {
            if tls.cert.is_some() != tls.key.is_some() {
                return Err(ConfigError::new(format!("{prefix}.key"), "cert and key go together"));
            }
        }
        if self.control_plane.tls.ca.is_some() && self.control_plane.tls.cert.is_none() {
            return Err(ConfigError::new("control_plane.tls.cert", "client certificates (ca) need TLS (cert and key)"));
        }
        for (key, value) in [
            ("mcp.max_body_bytes", self.mcp.max_body_bytes),
            ("mcp.max_response_bytes", self.mcp.max_response_bytes),
            ("mcp.page_size", self.mcp.page_size),
            ("mcp.max_sessions", self.mcp.max_sessions),
            ("mcp.max_sessions_per_user", self.mcp.max_sessions_per_user),
            ("mcp.max_inflight_per_user", self.mcp.max_inflight_per_user),
            ("server.max_connections", self.server.max_connections),
            ("limits.api_tokens_per_user", self.limits.api_tokens_per_user),
            ("limits.values_per_user", self.limits.values_per_user),
            ("limits.value_bytes_per_user", self.limits.value_bytes_per_user),
            ("data_plane.max_snapshot_bytes", self.data_plane.max_snapshot_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
        }
        if self.stdio.max_processes_per_user == 0 {
            return Err(ConfigError::new("stdio.max_processes_per_user", "must be at least 1"));
        }
        if self.stdio.run_as.as_deref().is_some_and(|u| u.trim().is_empty()) {
            return Err(ConfigError::new("stdio.run_as", "must name a user (a name, or uid[:gid])"));
        }
        if self.stdio.work_dir.as_deref().is_some_and(|d| !d.starts_with('/')) {
            return Err(ConfigError::new("stdio.work_dir", "must be an absolute path"));
        }
        for (i, command) in self.stdio.allowed_commands.iter().enumerate() {
            let base = command.rsplit('/').next().unwrap_or(command);
            if command.is_empty() || SHELLS.contains(&base) {
                return Err(ConfigError::new(
                    format!("stdio.allowed_commands[{i}]"),
                    format!("{command:?} may not be allowed"),
                ));
            }
        }
        for (key, value) in [
            ("server.header_timeout", self.server.header_timeout),
            ("server.body_timeout", self.server.body_timeout),
            ("auth.login_lockout", self.auth.login_lockout),
            ("session.timeout", self.session.timeout),
            ("session.cleanup_interval", self.session.cleanup_interval),
            ("mcp.request_timeout", self.mcp.request_timeout),
            ("mcp.connect_timeout", self.mcp.connect_timeout),
            ("mcp.list_timeout", self.mcp.list_timeout),
            ("stdio.idle_ttl", self.stdio.idle_ttl),
            ("stdio.max_lifetime", self.stdio.max_lifetime),
            ("stdio.gc_interval", self.stdio.gc_interval),
            ("kubernetes.idle_ttl", self.kubernetes.idle_ttl),
            ("kubernetes.max_lifetime", self.kubernetes.max_lifetime),
            ("kubernetes.gc_interval", self.kubernetes.gc_interval),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
        }
        Ok(())
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` with values from `env`.
fn expand_env(text: &str, env: &HashMap<String, String>) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let line = text[..text.len() - rest.len() + start].lines().count().max(1);
        let end = after
            .find('}')
            .ok_or_else(|| ConfigError::new(format!("(line {line})"), "unterminated ${ in environment reference"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ConfigError::new(
                format!("(line {line})"),
                format!("invalid environment reference ${{{inner}}}"),
            ));
        }
        match (env.get(name), default) {
            (Some(value), _) => out.push_str(value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err(ConfigError::new(
                    format!("(line {line})"),
                    format!("environment variable {name} is not set"),
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn original_example_config_parses() {
        let text = r#"
server:       { port: 3000, host: "0.0.0.0" }
database:     { host: postgres, port: 5432, user: reflow, password: ${DB_PASSWORD} }
jwt:          { secret: ${JWT_SECRET} }
encryption:   { key: ${ENCRYPTION_KEY} }   # exactly 32 chars
session:      { timeout: 30m }
logging:      { level: info, format: json }
kubernetes:   { enabled: false, namespace: reflow }
telemetry:    { enabled: false, endpoint: "otel-collector:4317" }
"#;
        let config = Config::from_yaml(
            text,
            &env(&[
                ("DB_PASSWORD", "p@ss word"),
                ("JWT_SECRET", &"s".repeat(64)),
                ("ENCRYPTION_KEY", "0123456789abcdef0123456789abcdef"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.port, 3000);
        assert_eq!(config.session.timeout, Duration::from_secs(1800));
        assert_eq!(config.logging.format, LogFormat::Json);
        assert_eq!(
            config.database.connection_url().unwrap(),
            "postgres://reflow:p%40ss%20word@postgres:5432/reflow?sslmode=prefer"
        );
        assert!(config.encryption.keyring().unwrap().is_some());
    }

    #[test]
    fn empty_config_is_defaults() {
        let config = Config::from_yaml("", &HashMap::new()).unwrap();
        assert_eq!(config.server.port, 3000);
        assert!(config.auth.allow_registration);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_yaml("server:\n  prot: 1\n", &HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("server"), "{err}");
        assert!(err.to_string().contains("prot"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::from_yaml("server:\n  port: many\n", &HashMap::new()).unwrap_err();
        assert_eq!(err.key, "server.port");
    }

    #[test]
    fn an_error_always_names_a_key() {
        // Found by the config fuzz target: a flow mapping whose key is itself a mapping.
        let err = Config::from_yaml("{?,Q", &HashMap::new()).unwrap_err();
        assert!(!err.key.is_empty(), "{err}");
    }

    #[test]
    fn unset_variable_is_named() {
        let err = Config::from_yaml("jwt:\n  secret: ${NOPE}\n", &HashMap::new()).unwrap_err();
        assert!(err.message.contains("NOPE"), "{err}");
        assert_eq!(err.key, "(line 2)");
        let ok = Config::from_yaml("logging:\n  level: ${LEVEL:-debug}\n", &HashMap::new()).unwrap();
        assert_eq!(ok.logging.level, "debug");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("jwt: { secret: short }", "jwt.secret"),
            ("encryption: { key: short }", "encryption.key"),
            ("database: { url: 'mysql://x' }", "database.url"),
            ("database: { sslmode: maybe }", "database.sslmode"),
            ("session: { timeout: 0s }", "session.timeout"),
            ("stdio: { allowed_commands: [bash] }", "stdio.allowed_commands[0]"),
            ("session: { timeout: soon }", "session.timeout"),
            ("auth: { login_max_failures: 0 }", "auth.login_max_failures"),
            ("control_plane: { data_plane_token: short }", "control_plane.data_plane_token"),
            ("data_plane: { control_plane: 'https://cp:50051' }", "data_plane.tls.ca"),
            ("data_plane: { control_plane: 'http://cp:50051' }", "data_plane.control_plane"),
            ("data_plane: { control_plane: 'http://10.0.0.2:50051' }", "data_plane.control_plane"),
            ("control_plane: { tls: { cert: a.pem } }", "control_plane.tls.key"),
            ("audit: { on_full: block }", "audit.on_full"),
            ("audit: { spool_bytes: 100 }", "audit.spool_bytes"),
            ("audit: { flush_interval: 5m }", "audit.flush_interval"),
            ("audit: { retention: 5s }", "audit.retention"),
            ("telemetry: { sample_ratio: 1.5 }", "telemetry.sample_ratio"),
            ("telemetry: { protocol: thrift }", "telemetry.protocol"),
            ("telemetry: { enabled: true, endpoint: '' }", "telemetry.endpoint"),
            ("telemetry: { enabled: true, endpoint: 'grpc://c:4317' }", "telemetry.endpoint"),
            ("telemetry: { enabled: true, endpoint: 'httpx://c:4317' }", "telemetry.endpoint"),
            ("telemetry: { enabled: true, endpoint: 'https://c:4317', insecure: true }", "telemetry.insecure"),
            ("telemetry: { export_interval: 10ms }", "telemetry.export_interval"),
            ("telemetry: { metrics_port: 3000 }", "telemetry.metrics_port"),
        ];
        for (text, key) in cases {
            let err = Config::from_yaml(text, &HashMap::new()).unwrap_err();
            assert_eq!(err.key, key, "{text}: {err}");
        }
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let text = "jwt: { secret: SECRETSECRETSECRETSECRETSECRETSECRET }\nencryption: { key: KEYKEYKEYKEYKEYKEYKEYKEYKEYKEYKE }\ndatabase: { url: 'postgres://u:PWPWPW@h/db' }";
        let config = Config::from_yaml(text, &HashMap::new()).unwrap();
        let printed = format!("{config:?}");
        for secret in ["SECRETSECRET", "KEYKEYKEY", "PWPWPW"] {
            assert!(!printed.contains(secret), "{printed}");
        }
    }

    #[test]
    fn plain_http_is_for_loopback_or_an_explicit_opt_in() {
        for ok in ["http://127.0.0.1:50051", "http://localhost:50051", "http://[::1]:50051"] {
            let text = format!("data_plane: {{ control_plane: '{ok}' }}");
            assert!(Config::from_yaml(&text, &HashMap::new()).is_ok(), "{ok}");
        }
        let opted_in = "data_plane: { control_plane: 'http://control-plane:50051', insecure: true }";
        assert!(Config::from_yaml(opted_in, &HashMap::new()).unwrap().data_plane.insecure);
        assert_eq!(url_host("http://user@[fd00::1]:80/x"), Some("fd00::1"));
        assert_eq!(url_host("https://cp.example:443"), Some("cp.example"));
    }

    #[test]
    fn stdio_allowlist() {
        let stdio = StdioConfig::default();
        assert!(stdio.allows("npx"));
        assert!(!stdio.allows("bash"));
        assert!(!stdio.allows("/usr/bin/npx"));
        let custom = StdioConfig { allowed_commands: vec!["/opt/mcp/server".into()], ..StdioConfig::default() };
        assert!(custom.allows("/opt/mcp/server"));
    }
}
