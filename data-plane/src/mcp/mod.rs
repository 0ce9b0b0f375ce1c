//! The client-facing MCP gateway.
//!
//! # Layout
//! - [`http`]: the endpoints (`/mcp`, `/mcp/{target}`): edge checks, authentication, session
//!   headers, JSON or SSE replies, and the legacy HTTP+SSE transport.
//! - [`gateway`]: the methods: initialize, lists merged over targets, routed calls with the
//!   policy decision, relaying of notifications and server→client requests.
//! - [`health`]: how each target fares here (last success, last failure, sessions).
//! - [`merged`]: merged lists shared by the sessions of one user, per snapshot.
//! - [`session`]: client sessions and the upstream sessions they own.
//! - [`recycle`]: what a snapshot that changes who a user is does to their sessions.
//! - [`shares`]: what one identity may take: request rate, requests in flight, sessions.
//! - [`origin`]: DNS-rebinding and cross-origin protection: which Host and Origin headers are served.
//! - [`names`]: prefixed names and mapped URIs on the aggregated endpoint.
//! - [`modern`]: the 2026-07-28 protocol (no sessions), bridged to session-era upstreams.

pub mod error;
pub mod exchange;
pub mod gateway;
pub mod health;
pub mod http;
pub mod lists;
pub mod merged;
pub mod modern;
pub mod names;
pub mod origin;
pub mod recycle;
pub mod resume;
pub mod route;
pub mod session;
pub mod shares;
pub mod ticket;

use std::time::Duration;

use reflow_common::config::{Config, StdioConfig};

/// Which endpoint a session was opened on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `/mcp`: every reachable target, names prefixed.
    Aggregate,
    /// `/mcp/{target}`: one target, names as the upstream gives them.
    Target(String),
}

/// How the MCP endpoint behaves; from the `mcp`, `session` and `cors` config sections.
#[derive(Debug, Clone)]
pub struct McpSettings {
    pub max_body_bytes: usize,
    /// The most bytes one upstream message may take.
    pub max_response_bytes: usize,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub list_timeout: Duration,
    pub page_size: usize,
    /// Host names the endpoint answers to; empty: the names the connection's local address
    /// serves (see [`origin`]); `*`: any.
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed (`*`: any); on loopback connections loopback origins too.
    pub allowed_origins: Vec<String>,
    pub max_sessions: usize,
    /// Per-identity shares: sessions, requests in flight, request rate and burst (0: no limit).
    pub max_sessions_per_user: usize,
    pub max_inflight_per_user: usize,
    pub requests_per_second: u32,
    pub request_burst: u32,
    /// How long a merged list is reused (0: never).
    pub list_cache_ttl: Duration,
    /// Idle time after which a session ends (a session that travels is let go here, and may
    /// go on elsewhere).
    pub session_timeout: Duration,
    /// The age past which a travelling session id no longer resumes.
    pub session_max_age: Duration,
    pub cleanup_interval: Duration,
    /// The STDIO process pool's limits and command allowlist.
    pub stdio: StdioConfig,
    /// The binary STDIO servers start through (see [`crate::upstream::launch`]): the `reflow`
    /// binary itself. Without one, no STDIO server starts.
    pub stdio_launcher: Option<std::path::PathBuf>,
    /// The cluster's instances, when `kubernetes.enabled`: without them no kubernetes target
    /// is served.
    pub kubernetes: Option<std::sync::Arc<crate::upstream::kubernetes::Instances>>,
}

impl McpSettings {
    pub fn from_config(config: &Config) -> Self {
        let mcp = &config.mcp;
        if mcp.allowed_hosts.iter().any(|h| h == "*") {
            tracing::warn!("mcp.allowed_hosts contains \"*\": any Host is served, so DNS-rebinding protection is off");
        }
        if config.cors.allowed_origins.iter().any(|o| o == "*") {
            tracing::warn!("cors.allowed_origins contains \"*\": a page on any site may call the MCP endpoint with a user's credentials");
        }
        McpSettings {
            max_body_bytes: mcp.max_body_bytes,
            max_response_bytes: mcp.max_response_bytes,
            request_timeout: mcp.request_timeout,
            connect_timeout: mcp.connect_timeout,
            list_timeout: mcp.list_timeout,
            page_size: mcp.page_size,
            allowed_hosts: mcp.allowed_hosts.clone(),
            allowed_origins: config.cors.allowed_origins.clone(),
            max_sessions: mcp.max_sessions,
            max_sessions_per_user: mcp.max_sessions_per_user,
            max_inflight_per_user: mcp.max_inflight_per_user,
            requests_per_second: mcp.rate_limit.requests_per_second,
            request_burst: mcp.rate_limit.burst,
            list_cache_ttl: mcp.list_cache_ttl,
            session_timeout: config.session.timeout,
            session_max_age: config.session.max_age,
            cleanup_interval: config.session.cleanup_interval,
            stdio: config.stdio.clone(),
            stdio_launcher: None,
            kubernetes: None,
        }
    }

    /// These settings with shares no single user reaches (benchmarks that drive one user at
    /// full speed, and still pay for every check).
    pub fn without_shares(mut self) -> Self {
        self.max_sessions_per_user = usize::MAX;
        self.max_inflight_per_user = usize::MAX;
        self.requests_per_second = 1_000_000_000;
        self.request_burst = 1_000_000_000;
        self
    }

    /// These settings with kubernetes targets served through `instances`.
    pub fn with_kubernetes(mut self, instances: std::sync::Arc<crate::upstream::kubernetes::Instances>) -> Self {
        self.kubernetes = Some(instances);
        self
    }

    /// These settings with STDIO servers started through `launcher`.
    pub fn with_stdio_launcher(mut self, launcher: std::path::PathBuf) -> Self {
        self.stdio_launcher = Some(launcher);
        self
    }
}

impl Default for McpSettings {
    fn default() -> Self {
        McpSettings::from_config(&Config::default())
    }
}
