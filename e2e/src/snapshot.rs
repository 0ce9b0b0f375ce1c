//! Snapshot distribution benchmarks.

use std::time::{Duration, Instant};

use anyhow::Context;
use prost::Message;
use reflow_common::credentials::{Isolation, Scope};
use reflow_common::crypto::{DeterministicSealer, Key, Keyring};
use reflow_control_plane::api::credentials::secret_aad;
use reflow_control_plane::compile::{compile, CompileKeys};
use reflow_control_plane::store::*;
use reflow_data_plane::sync::SyncConfig;
use reflow_data_plane::DataPlane;
use reflow_proto::resources::snapshot_sealer;
use reflow_proto::snapshot::v1::SnapshotUpdate;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::harness::ScratchDatabase;
use crate::percentile;

pub(crate) const TOKEN: &str = "benchmark-data-plane-token-0123";

/// A benchmark's control plane in this process: on a scratch PostgreSQL database on the server
/// `database_url` names, or on a temporary SQLite file.
pub(crate) struct BenchControlPlane {
    pub dir: tempfile::TempDir,
    scratch: Option<ScratchDatabase>,
    pub url: String,
    pub shutdown: CancellationToken,
    pub control_plane: reflow_control_plane::ControlPlane,
    /// The gRPC address (data planes, the management API).
    pub grpc: String,
    /// The REST API's base URL.
    pub base: String,
}

impl BenchControlPlane {
    pub async fn start(database_url: Option<&str>) -> anyhow::Result<BenchControlPlane> {
        let dir = tempfile::tempdir()?;
        let scratch = match database_url {
            Some(server) => Some(ScratchDatabase::create(server).await?),
            None => None,
        };
        let url = match &scratch {
            Some(db) => db.url.clone(),
            None => format!("sqlite://{}", dir.path().join("bench.db").display()),
        };
        let shutdown = CancellationToken::new();
        let (control_plane, grpc, base) = crate::harness::start_control_plane(
            &url,
            "benchmark-secret-benchmark-secret!",
            TOKEN,
            &Default::default(),
            None,
            &shutdown,
        )
        .await?;
        Ok(BenchControlPlane { dir, scratch, url, shutdown, control_plane, grpc, base })
    }

    pub fn backend(&self) -> &'static str {
        if self.url.starts_with("sqlite") {
            "sqlite"
        } else {
            "postgres"
        }
    }

    /// Stops everything and drops the scratch database.
    pub async fn finish(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        drop(self.control_plane);
        if let Some(scratch) = self.scratch {
            scratch.drop_database().await?;
        }
        Ok(())
    }
}

/// Propagation time from an admin write's response to every data plane holding the new
/// version, for `data_planes` in-process data planes (each with its own gRPC stream and
/// encrypted cache).
pub async fn propagation(data_planes: usize, iterations: usize, database_url: Option<&str>) -> anyhow::Result<Value> {
    let bench = BenchControlPlane::start(database_url).await?;
    let (dir, shutdown, control_plane, grpc_address, base) =
        (&bench.dir, &bench.shutdown, &bench.control_plane, &bench.grpc, &bench.base);
    let mut planes = Vec::with_capacity(data_planes);
    for i in 0..data_planes {
        let cache = dir.path().join(format!("cache-{i}"));
        let sync = SyncConfig {
            control_plane: grpc_address.clone(),
            token: TOKEN.into(),
            node_id: format!("bench-{i}"),
            group: "bench".into(),
            labels: Default::default(),
            tls: None,
            max_snapshot_bytes: reflow_data_plane::sync::DEFAULT_MAX_SNAPSHOT_BYTES,
        };
        let plane = DataPlane::new(sync, Some(cache));
        plane.start_sync(shutdown.clone());
        planes.push(plane);
    }

    let http = reqwest::Client::new();
    let admin: Value = http
        .post(format!("{base}/api/auth/register"))
        .json(&json!({"email": "bench@example.com", "password": "benchmark-password"}))
        .send()
        .await?
        .json()
        .await?;
    let token = admin["token"].as_str().context("register")?.to_string();
    let policy: Value = http
        .post(format!("{base}/api/policies"))
        .bearer_auth(&token)
        .json(&json!({"name": "bench", "effect": "allow", "subjects": [{"subject_type": "everyone"}]}))
        .send()
        .await?
        .json()
        .await?;
    let policy_id = policy["id"].as_str().context("create policy")?.to_string();
    let all_current = |hub_version: &str| planes.iter().all(|p| p.state().version().as_deref() == Some(hub_version));
    wait_until(Duration::from_secs(30), || {
        let hub = control_plane.hub().current().map(|s| s.version.clone()).unwrap_or_default();
        all_current(&hub)
    })
    .await
    .context("initial convergence")?;

    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let before = control_plane.hub().current().map(|s| s.version.clone()).unwrap_or_default();
        let response = http
            .put(format!("{base}/api/policies/{policy_id}"))
            .bearer_auth(&token)
            .json(&json!({"priority": i as i32 + 1}))
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "policy update failed: {}", response.status());
        let written = Instant::now();
        wait_until(Duration::from_secs(30), || {
            let hub = control_plane.hub().current().map(|s| s.version.clone()).unwrap_or_default();
            hub != before && all_current(&hub)
        })
        .await
        .context("propagation")?;
        samples.push(written.elapsed().as_secs_f64() * 1000.0);
    }
    shutdown.cancel();
    drop(planes);
    let backend = bench.backend();
    bench.finish().await?;
    samples.sort_by(f64::total_cmp);
    Ok(json!({
        "scenario": "snapshot_propagation",
        "data_planes": data_planes,
        "iterations": iterations,
        "backend": backend,
        "p50_ms": percentile(&samples, 50.0),
        "p99_ms": percentile(&samples, 99.0),
        "max_ms": samples.last().copied().unwrap_or(f64::NAN),
    }))
}

async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !condition() {
        anyhow::ensure!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(())
}

/// A large state: `users` users in 20 groups, `targets` targets each with a default token,
/// `policies` policies.
fn large_state(users: usize, targets: usize, policies: usize, keyring: &Keyring) -> StoreState {
    let at = chrono::Utc::now();
    let id = |kind: u128, n: usize| Uuid::from_u128((kind << 64) | n as u128);
    let users = (0..users)
        .map(|n| User {
            id: id(1, n),
            email: format!("user{n}@example.com"),
            role: if n % 3 == 0 { "developer".into() } else { "user".into() },
            groups: vec![format!("group-{}", n % 20)],
            active: true,
            created_at: at,
            updated_at: at,
            session_generation: 0,
        })
        .collect();
    let target_list: Vec<Target> = (0..targets)
        .map(|n| Target {
            id: id(2, n),
            name: format!("target-{n}"),
            description: String::new(),
            transport_type: TransportType::StreamableHttp,
            url: Some(format!("https://mcp-{n}.example.com/mcp")),
            command: None,
            args: vec![],
            image: None,
            port: None,
            health_path: None,
            statefulness: Statefulness::Stateless,
            isolation_boundary: Isolation::PerUser,
            auth_type: AuthType::Bearer,
            auth_header_name: None,
            enabled: true,
            env_keys: vec![],
            restart_generation: 0,
            audit_arguments: false,
            created_at: at,
            updated_at: at,
        })
        .collect();
    let secrets = target_list
        .iter()
        .map(|t| SecretEntry {
            target_id: t.id,
            kind: SecretKind::Token,
            scope: Scope::Default,
            name: String::new(),
            ciphertext: keyring
                .seal(b"upstream-token-value", &secret_aad(t.id, SecretKind::Token, &Scope::Default, "")),
            key_version: 1,
            description: String::new(),
            updated_at: at,
        })
        .collect();
    let policies = (0..policies)
        .map(|n| Policy {
            id: id(3, n),
            name: format!("policy-{n}"),
            description: String::new(),
            target_id: Some(id(2, n % targets.max(1))),
            resource_type: reflow_common::model::ResourceType::Tool,
            pattern: Some(format!("tool_{n}_*")),
            effect: if n % 7 == 0 { Effect::Deny } else { Effect::Allow },
            priority: (n % 100) as i32,
            enabled: true,
            subjects: vec![PolicySubject {
                id: id(4, n),
                policy_id: id(3, n),
                subject_type: SubjectType::Group,
                subject_value: format!("group-{}", n % 20),
                created_at: at,
            }],
            created_at: at,
            updated_at: at,
        })
        .collect();
    StoreState { users, targets: target_list, policies, api_tokens: vec![], secrets, session_keys: vec![] }
}

/// Bytes a data plane receives for a one-policy change on a large snapshot, against the
/// full state, and how long compiling that snapshot takes.
pub fn one_policy_change(users: usize, targets: usize, policies: usize) -> anyhow::Result<Value> {
    let keyring = Keyring::single(1, Key::generate());
    let sealer: DeterministicSealer = snapshot_sealer(TOKEN);
    let mut state = large_state(users, targets, policies, &keyring);
    let keys = CompileKeys {
        store_keyring: &keyring,
        sealer: &sealer,
        jwt_public_key: &reflow_common::jwt::public_key(b"benchmark-secret-benchmark-secret!"),
        jwt_issuer: "reflow",
        jwt_audience: "reflow",
    };
    let started = Instant::now();
    let before = compile(&state, keys)?;
    let compile_ms = started.elapsed().as_secs_f64() * 1000.0;
    state.policies[policies / 2].priority += 1000;
    let after = compile(&state, keys)?;
    let diff = after.diff_from(&before);
    let update = SnapshotUpdate {
        version: after.version.clone(),
        base_version: before.version.clone(),
        upserts: diff.upserts,
        removals: diff.removals,
        control_plane_id: "bench".into(),
        more: false,
        ended_sessions: vec![],
    };
    let full = SnapshotUpdate { version: after.version.clone(), upserts: after.full(), ..Default::default() };
    Ok(json!({
        "scenario": "snapshot_one_policy_change",
        "users": users,
        "targets": targets,
        "policies": policies,
        "resources": after.resources.len(),
        "compile_ms": compile_ms,
        "full_bytes": full.encoded_len(),
        "update_bytes": update.encoded_len(),
        "upserts": update.upserts.len(),
    }))
}
