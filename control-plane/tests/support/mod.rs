//! Test databases on both backends: a fresh SQLite file, or a fresh database on the
//! PostgreSQL server named by `DATABASE_URL` (dropped again when the guard goes away).

#![allow(dead_code)]

use std::str::FromStr;

use reflow_control_plane::store::{self, DynStore};
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;

/// Keeps a test database alive; dropping it removes the database.
pub enum TestDb {
    Sqlite { dir: tempfile::TempDir },
    Postgres { admin_url: String, name: String },
}

impl TestDb {
    /// The database URL a process should connect to.
    pub fn url(&self) -> String {
        match self {
            TestDb::Sqlite { dir } => {
                format!("sqlite://{}", dir.path().join("reflow.db").display())
            }
            TestDb::Postgres { admin_url, name } => {
                let mut url = url::Url::parse(admin_url).expect("DATABASE_URL is a URL");
                url.set_path(name);
                url.to_string()
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { admin_url, name } = self {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs inside the test's runtime; use a thread with its own runtime.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async {
                    if let Ok(mut conn) = PgConnectOptions::from_str(&admin_url).unwrap().connect().await {
                        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut conn)
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL must name a PostgreSQL server for the PostgreSQL half of the suite; \
         scripts/test starts a throwaway one when it is not set",
    )
}

pub async fn sqlite_db() -> TestDb {
    TestDb::Sqlite { dir: tempfile::tempdir().unwrap() }
}

pub async fn postgres_db() -> TestDb {
    let admin_url = database_url();
    let name = format!("reflow_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnectOptions::from_str(&admin_url)
        .expect("DATABASE_URL parses")
        .connect()
        .await
        .expect("connect to DATABASE_URL");
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await.expect("create test database");
    TestDb::Postgres { admin_url, name }
}

/// A fresh, empty database of the named backend.
pub async fn test_db(backend: &str) -> TestDb {
    match backend {
        "sqlite" => sqlite_db().await,
        "postgres" => postgres_db().await,
        other => panic!("unknown backend {other}"),
    }
}

/// A fresh database of the named backend with migrations applied.
pub async fn store(backend: &str) -> (DynStore, TestDb) {
    let db = test_db(backend).await;
    let store = store::connect(&db.url(), 5).await.expect("connect and migrate");
    (store, db)
}

/// Runs each named async test function against both backends:
/// `both_backends!(my_test);` with `async fn my_test(backend: &'static str)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name("sqlite").await })+
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name("postgres").await })+
        }
    };
}

/// A control plane serving real HTTP on a loopback port, on a fresh database.
pub struct TestApi {
    pub base: String,
    pub http: reqwest::Client,
    pub store: DynStore,
    pub db: TestDb,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestApi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The config tests run with; `tweak` adjusts it.
pub fn test_config(tweak: impl FnOnce(&mut reflow_common::config::Config)) -> reflow_common::config::Config {
    let mut config = reflow_common::config::Config::default();
    config.jwt.secret = Some("test-secret-test-secret-test-secret!".into());
    config.encryption.key = Some(reflow_common::crypto::Key::generate().to_hex());
    config.server.max_body_bytes = 64 * 1024;
    tweak(&mut config);
    config
}

pub async fn spawn_api(backend: &str, tweak: impl FnOnce(&mut reflow_common::config::Config)) -> TestApi {
    let (store, db) = store(backend).await;
    let config = test_config(tweak);
    let control_plane = reflow_control_plane::ControlPlane::new(&config, store.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(control_plane.serve(listener, async move {
        let _ = rx.await;
    }));
    TestApi { base, http: reqwest::Client::new(), store, db, shutdown: Some(tx) }
}

impl TestApi {
    /// Sends a request and returns the status and the JSON body (`null` when empty).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let json = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON body for {path}: {text}"))
        };
        (status, json)
    }

    pub async fn get(&self, path: &str, token: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::POST, path, token, Some(body)).await
    }

    pub async fn put(&self, path: &str, token: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::PUT, path, Some(token), Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::DELETE, path, Some(token), None).await
    }

    /// Registers a user and returns their JWT and id.
    pub async fn register(&self, email: &str) -> (String, String) {
        let (status, body) =
            self.post("/api/auth/register", None, serde_json::json!({"email": email, "password": "password123"})).await;
        assert_eq!(status, 201, "{body}");
        (body["token"].as_str().unwrap().to_string(), body["user"]["id"].as_str().unwrap().to_string())
    }
}

/// Polls `condition` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: std::time::Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub const DATA_PLANE_TOKEN: &str = "test-data-plane-token-0123456789";

/// A control plane with its API, compiler and gRPC snapshot service running.
pub struct TestControlPlane {
    pub api: String,
    pub grpc: String,
    pub control_plane: reflow_control_plane::ControlPlane,
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl Drop for TestControlPlane {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn spawn_control_plane(url: &str, id: &str) -> TestControlPlane {
    spawn_control_plane_with(url, id, None).await
}

pub async fn spawn_control_plane_with(
    url: &str,
    id: &str,
    tls: Option<reflow_control_plane::GrpcTls>,
) -> TestControlPlane {
    let store = store::connect(url, 5).await.expect("connect");
    let mut config = test_config(|c| {
        c.control_plane.data_plane_token = Some(DATA_PLANE_TOKEN.into());
        c.control_plane.id = Some(id.into());
    });
    // Replicas of one deployment share their secrets.
    config.jwt.secret = Some("test-secret-test-secret-test-secret!".into());
    config.encryption.key = Some("0123456789abcdef0123456789abcdef".into());
    let mut control_plane = reflow_control_plane::ControlPlane::new(&config, store).unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    if let Some(tls) = tls {
        control_plane = control_plane.with_grpc_tls(tls);
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    control_plane.start_compiler(shutdown.clone()).await;
    let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = format!("{scheme}://localhost:{}", grpc_listener.local_addr().unwrap().port());
    {
        let (control_plane, shutdown) = (control_plane.clone(), shutdown.clone());
        tokio::spawn(async move { control_plane.serve_grpc(grpc_listener, shutdown).await });
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    {
        let (router, shutdown) = (control_plane.router(), shutdown.clone());
        tokio::spawn(
            async move { axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await },
        );
    }
    TestControlPlane { api, grpc, control_plane, shutdown }
}

/// A data plane syncing from `grpc`, its `/ready` and `/mcp` served on a loopback port.
pub struct TestDataPlane {
    pub http: String,
    pub data_plane: reflow_data_plane::DataPlane,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub cache_dir: tempfile::TempDir,
}

impl Drop for TestDataPlane {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestDataPlane {
    pub fn version(&self) -> Option<String> {
        self.data_plane.state().version()
    }
}

pub async fn spawn_data_plane(grpc: &str, token: &str, node_id: &str) -> TestDataPlane {
    spawn_data_plane_with(grpc, token, node_id, None).await
}

pub async fn spawn_data_plane_with(
    grpc: &str,
    token: &str,
    node_id: &str,
    tls: Option<reflow_data_plane::sync::ClientTls>,
) -> TestDataPlane {
    let cache_dir = tempfile::tempdir().unwrap();
    let sync = reflow_data_plane::sync::SyncConfig {
        control_plane: grpc.to_string(),
        token: token.to_string(),
        node_id: node_id.to_string(),
        group: "test".into(),
        labels: Default::default(),
        tls,
        max_snapshot_bytes: reflow_data_plane::sync::DEFAULT_MAX_SNAPSHOT_BYTES,
    };
    let data_plane = reflow_data_plane::DataPlane::new(sync, Some(cache_dir.path().to_path_buf()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    data_plane.start_sync(shutdown.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = format!("http://{}", listener.local_addr().unwrap());
    {
        let (router, shutdown) = (data_plane.router(), shutdown.clone());
        tokio::spawn(
            async move { axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await },
        );
    }
    TestDataPlane { http, data_plane, shutdown, cache_dir }
}
