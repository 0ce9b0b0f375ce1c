//! Running the `reflow` binary in tests: free ports, processes stopped on drop, HTTP helpers.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `reflow` process, stopped with SIGTERM when dropped.
pub struct Running {
    pub child: Child,
    pub base: String,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

impl Running {
    pub fn start(args: &[&str], port: u16, logs: &Path, env: &[(&str, &str)]) -> Running {
        // Numbered, so a process restarted on the same port keeps the earlier one's logs.
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stdout_path = logs.join(format!("stdout-{port}-{n}.log"));
        let stderr_path = logs.join(format!("stderr-{port}-{n}.log"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_reflow"));
        command
            .args(args)
            .args(["--port", &port.to_string()])
            .env_remove("DATABASE_URL")
            // Parallel `reflow up`s each take a free gRPC port.
            .env("REFLOW_GRPC_PORT", "0")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path).unwrap())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("start reflow");
        let running =
            Running { child, base: format!("http://localhost:{port}"), stdout_path, stderr_path: stderr_path.clone() };
        running.wait_healthy(&stderr_path);
        running
    }

    fn wait_healthy(&self, stderr_path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = reqwest::blocking::Client::new();
        while Instant::now() < deadline {
            if let Ok(response) = client.get(format!("{}/health", self.base)).send() {
                if response.status().is_success() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("reflow did not become healthy: {}", std::fs::read_to_string(stderr_path).unwrap_or_default());
    }

    /// SIGKILL: the process dies without any chance to clean up.
    pub fn kill_hard(mut self) {
        self.kill_hard_in_place();
    }

    /// [`Running::kill_hard`], keeping the value (to be replaced by a restarted process).
    pub fn kill_hard_in_place(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGTERM, then wait: a clean shutdown exits 0.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.stop_in_place()
    }

    /// [`Running::stop`], keeping the value (to be replaced by a restarted process).
    pub fn stop_in_place(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("reflow did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn login(base: &str, email: &str, password: &str) -> String {
    let response = reqwest::blocking::Client::new()
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.json::<Value>().unwrap()["token"].as_str().unwrap().to_string()
}

pub fn get(base: &str, path: &str, token: &str) -> Value {
    let response = reqwest::blocking::Client::new().get(format!("{base}{path}")).bearer_auth(token).send().unwrap();
    assert_eq!(response.status().as_u16(), 200, "{path}");
    response.json().unwrap()
}

pub fn file_bytes(path: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        file.read_to_end(&mut bytes).unwrap();
    }
    bytes
}

#[cfg(unix)]
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A fresh PostgreSQL database on the server named by `DATABASE_URL`, dropped on drop.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

fn run_sql(admin_url: &str, sql: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(admin_url).await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    });
}

impl TestDatabase {
    pub fn create(prefix: &str) -> TestDatabase {
        let admin_url =
            std::env::var("DATABASE_URL").expect("DATABASE_URL names a PostgreSQL server (scripts/test starts one)");
        let name = format!("{prefix}_{}_{}", std::process::id(), free_port());
        run_sql(&admin_url, &format!("CREATE DATABASE {name}"));
        let mut url = url::Url::parse(&admin_url).unwrap();
        url.set_path(&name);
        TestDatabase { admin_url, name, url: url.to_string() }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        run_sql(&self.admin_url, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

/// Waits until `condition` holds, or panics naming `what`.
pub fn eventually(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The status of an MCP `initialize` at `{base}/mcp` with `token` (200 when it is accepted).
pub fn mcp_status(base: &str, token: &str) -> u16 {
    reqwest::blocking::Client::new()
        .post(format!("{base}/mcp"))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                      "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}}))
        .timeout(Duration::from_secs(5))
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

pub fn ready_status(base: &str) -> u16 {
    reqwest::blocking::get(format!("{base}/ready")).map(|r| r.status().as_u16()).unwrap_or(0)
}

/// One MCP request to `{base}{path}` (a JSON or SSE answer): the session id the answer names
/// (or the one sent) and the JSON-RPC message answering `body`.
pub fn mcp_request(base: &str, path: &str, token: &str, session: Option<&str>, body: Value) -> (Option<String>, Value) {
    let mut request = reqwest::blocking::Client::new()
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .timeout(Duration::from_secs(180))
        .json(&body);
    if let Some(session) = session {
        request = request.header("mcp-session-id", session);
    }
    let response = request.send().expect("the MCP endpoint answers");
    let session = response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(session.map(str::to_string));
    let text = response.text().unwrap();
    let messages: Vec<Value> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .chain(std::iter::once(text.as_str()))
        .filter_map(|json| serde_json::from_str::<Value>(json.trim()).ok())
        .collect();
    // The answer to `body`, or a refusal that could not name it (`id: null`).
    let answer = messages
        .iter()
        .find(|message| message.get("id") == body.get("id"))
        .or_else(|| messages.iter().find(|message| message.get("error").is_some()))
        .cloned()
        .unwrap_or_else(|| panic!("no answer to {body} in {text}"));
    (session, answer)
}

/// The data-plane token the split-deployment tests share.
pub const DATA_PLANE_TOKEN: &str = "split-test-data-plane-token-0123";
pub const SECRETS: [(&str, &str); 2] =
    [("JWT_SECRET", "0123456789abcdef0123456789abcdef"), ("ENCRYPTION_KEY", "fedcba9876543210fedcba9876543210")];

/// `reflow control-plane` on `db`, with `extra` arguments.
pub fn start_control_plane(db: &TestDatabase, port: u16, grpc_port: u16, logs: &Path, extra: &[&str]) -> Running {
    let grpc = grpc_port.to_string();
    let mut args = vec![
        "control-plane",
        "--database-url",
        &db.url,
        "--host",
        "127.0.0.1",
        "--grpc-port",
        &grpc,
        "--data-plane-token",
        DATA_PLANE_TOKEN,
    ];
    args.extend_from_slice(extra);
    Running::start(&args, port, logs, &SECRETS)
}

/// `reflow data-plane` named `node`, keeping its cache (and audit spool) in `cache`.
pub fn start_data_plane(grpc_port: u16, token: &str, node: &str, port: u16, cache: &Path, logs: &Path) -> Running {
    start_data_plane_with(grpc_port, token, node, port, cache, logs, &[])
}

/// [`start_data_plane`] with `extra` arguments.
pub fn start_data_plane_with(
    grpc_port: u16,
    token: &str,
    node: &str,
    port: u16,
    cache: &Path,
    logs: &Path,
    extra: &[&str],
) -> Running {
    let control_plane = format!("http://127.0.0.1:{grpc_port}");
    let cache = cache.to_str().unwrap();
    let mut args = vec![
        "data-plane",
        "--control-plane",
        &control_plane,
        "--token",
        token,
        "--cache-dir",
        cache,
        "--node-id",
        node,
        "--host",
        "127.0.0.1",
    ];
    args.extend_from_slice(extra);
    Running::start(&args, port, logs, &[])
}

/// A new API token of the user `jwt` belongs to.
pub fn create_api_token(base: &str, jwt: &str, name: &str) -> String {
    let response: Value = reqwest::blocking::Client::new()
        .post(format!("{base}/api/auth/tokens"))
        .bearer_auth(jwt)
        .json(&json!({"name": name}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    response["token"].as_str().unwrap().to_string()
}

/// The fields of the original gateway's `RequestLog` (`GET /api/logs`).
pub const REQUEST_LOG: &[&str] = &[
    "id",
    "session_id",
    "user_id",
    "method",
    "target_name",
    "request_body",
    "response_status",
    "duration_ms",
    "created_at",
];
