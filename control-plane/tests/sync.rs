//! Snapshot distribution over real gRPC and HTTP, in one process: control planes on both
//! backends, data planes syncing from them, and hand-driven gRPC peers for fault injection.

mod support;

use std::time::Duration;

use reflow_proto::snapshot::v1::snapshot_service_client::SnapshotServiceClient;
use reflow_proto::snapshot::v1::{sync_request, Hello, Nack, SnapshotUpdate, SyncRequest};
use serde_json::{json, Value};
use support::*;
use tokio::sync::mpsc;

const CONVERGE: Duration = Duration::from_secs(10);

async fn post(url: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(url).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

async fn mcp_status(data_plane: &TestDataPlane, token: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{}/mcp", data_plane.http))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                      "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn converged(cp: &TestControlPlane, dps: &[&TestDataPlane]) -> bool {
    let current = cp.control_plane.hub().current().map(|s| s.version.clone());
    current.is_some() && dps.iter().all(|dp| dp.version() == current)
}

async fn changes_reach_every_data_plane(backend: &str) {
    let db = test_db(backend).await;
    let cp = spawn_control_plane(&db.url(), "cp-a").await;
    let dps = [
        spawn_data_plane(&cp.grpc, DATA_PLANE_TOKEN, "dp-1").await,
        spawn_data_plane(&cp.grpc, DATA_PLANE_TOKEN, "dp-2").await,
        spawn_data_plane(&cp.grpc, DATA_PLANE_TOKEN, "dp-3").await,
    ];
    let all: Vec<&TestDataPlane> = dps.iter().collect();
    eventually(CONVERGE, "first snapshot everywhere", || converged(&cp, &all)).await;

    let (_, admin) = post(
        &format!("{}/api/auth/register", cp.api),
        None,
        json!({"email": "a@example.com", "password": "password123"}),
    )
    .await;
    let admin_token = admin["token"].as_str().unwrap().to_string();
    let (_, dev) = post(
        &format!("{}/api/auth/register", cp.api),
        None,
        json!({"email": "d@example.com", "password": "password123"}),
    )
    .await;
    let dev_token = dev["token"].as_str().unwrap().to_string();
    let dev_id = dev["user"]["id"].as_str().unwrap().to_string();
    for dp in &dps {
        eventually(CONVERGE, "users reach the data plane", || async { mcp_status(dp, &dev_token).await == 200 }).await;
        assert_eq!(mcp_status(dp, "not-a-token").await, 401);
    }

    // A user change is enforced by every data plane.
    let response = reqwest::Client::new()
        .put(format!("{}/api/users/{dev_id}", cp.api))
        .bearer_auth(&admin_token)
        .json(&json!({"active": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    for dp in &dps {
        eventually(CONVERGE, "deactivation reaches the data plane", || async {
            mcp_status(dp, &dev_token).await == 401
        })
        .await;
    }

    // An API token created on the control plane works on the data planes.
    let (_, created) = post(&format!("{}/api/auth/tokens", cp.api), Some(&admin_token), json!({"name": "ci"})).await;
    let api_token = created["token"].as_str().unwrap().to_string();
    for dp in &dps {
        eventually(CONVERGE, "the API token reaches the data plane", || async {
            mcp_status(dp, &api_token).await == 200
        })
        .await;
    }

    // Status: every data plane acknowledged the current version.
    let current = cp.control_plane.hub().current().unwrap().version.clone();
    eventually(CONVERGE, "acknowledgements recorded", || async {
        let status: Value = reqwest::Client::new()
            .get(format!("{}/api/data-planes", cp.api))
            .bearer_auth(&admin_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let planes = status["data_planes"].as_array().cloned().unwrap_or_default();
        status["current_version"] == current.as_str()
            && planes.len() == 3
            && planes.iter().all(|p| p["acked_version"] == current.as_str() && p["connected"] == true)
    })
    .await;
}

async fn wrong_token_is_refused(backend: &str) {
    let db = test_db(backend).await;
    let cp = spawn_control_plane(&db.url(), "cp-a").await;
    let intruder = spawn_data_plane(&cp.grpc, "not-the-data-plane-token", "intruder").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(intruder.version().is_none());
    let response = reqwest::Client::new().post(format!("{}/mcp", intruder.http)).json(&json!({})).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 503, "no snapshot: fail closed");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], -32000);
    let ready = reqwest::get(format!("{}/ready", intruder.http)).await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    assert!(cp.control_plane.store().list_data_planes().await.unwrap().is_empty());

    let mut client = SnapshotServiceClient::connect(cp.grpc.clone()).await.unwrap();
    let (_tx, rx) = mpsc::channel::<SyncRequest>(1);
    let status = client.sync(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
}

fn shipped(node: &str, n: u32) -> Vec<u8> {
    let record = reflow_proto::audit::AuditRecord {
        user_id: Some("u".into()),
        target: Some("github".into()),
        name: Some("create_issue".into()),
        decision: "allowed".into(),
        credential_source: Some("user".into()),
        ..reflow_proto::audit::AuditRecord::new(
            format!("{node}-{n}"),
            node.into(),
            chrono::Utc::now(),
            "/mcp".into(),
            "tools/call".into(),
        )
    };
    serde_json::to_vec(&record).unwrap()
}

async fn audit_batches_are_stored_once_all_or_none_and_only_in_the_shippers_chain(backend: &str) {
    use reflow_proto::snapshot::v1::AuditBatch;
    let db = test_db(backend).await;
    let cp = spawn_control_plane(&db.url(), "cp-a").await;
    let mut client = SnapshotServiceClient::connect(cp.grpc.clone()).await.unwrap();
    let ship = |records: Vec<Vec<u8>>, token: &str| {
        let mut request = tonic::Request::new(AuditBatch { node_id: "dp-1".into(), records });
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    let batch: Vec<Vec<u8>> = (1..=3).map(|n| shipped("dp-1", n)).collect();
    let ack = client.ship_audit(ship(batch.clone(), DATA_PLANE_TOKEN)).await.unwrap().into_inner();
    assert_eq!((ack.stored, ack.duplicates), (3, 0));
    // The answer was lost and the batch comes again: nothing twice.
    let ack = client.ship_audit(ship(batch, DATA_PLANE_TOKEN)).await.unwrap().into_inner();
    assert_eq!((ack.stored, ack.duplicates), (0, 3));
    let refused = client.ship_audit(ship(vec![shipped("dp-1", 9)], "not-the-token")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    // One bad record refuses the batch whole, naming it: nothing of it is stored.
    let mixed = vec![shipped("dp-1", 4), shipped("dp-2", 5)];
    let refused = client.ship_audit(ship(mixed, DATA_PLANE_TOKEN)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("records[1].data_plane"), "{}", refused.message());
    let garbage = vec![shipped("dp-1", 6), b"{\"id\": 1}".to_vec()];
    let refused = client.ship_audit(ship(garbage, DATA_PLANE_TOKEN)).await.unwrap_err();
    assert!(refused.message().contains("records[1]"), "{}", refused.message());
    let store = cp.control_plane.store();
    let all = reflow_control_plane::store::AuditFilter { limit: 100, ..Default::default() };
    assert_eq!(store.list_audit(&all).await.unwrap().len(), 3);
    let (records, anchors) = store.audit_chains().await.unwrap();
    let verified = reflow_control_plane::audit::verify(&records, |p| anchors.get(p).cloned().unwrap_or_default());
    assert_eq!(verified, Ok(3));
}

async fn spooled_audit_waits_while_the_control_plane_is_away_and_drains_after_a_restart(backend: &str) {
    use reflow_data_plane::spool::{OnFull, Spool};
    let db = test_db(backend).await;
    let cp = spawn_control_plane(&db.url(), "cp-a").await;
    let dir = tempfile::tempdir().unwrap();
    let config = |address: &str| reflow_data_plane::sync::SyncConfig {
        control_plane: address.into(),
        token: DATA_PLANE_TOKEN.into(),
        node_id: "dp-1".into(),
        group: "g".into(),
        labels: Default::default(),
        tls: None,
        max_snapshot_bytes: reflow_data_plane::sync::DEFAULT_MAX_SNAPSHOT_BYTES,
    };
    let stored = || async {
        let all = reflow_control_plane::store::AuditFilter { limit: 1000, ..Default::default() };
        cp.control_plane.store().list_audit(&all).await.unwrap().len()
    };

    // The control plane is unreachable: batches wait in the spool.
    let spool = std::sync::Arc::new(Spool::open(dir.path(), DATA_PLANE_TOKEN, 1 << 20, OnFull::Refuse).unwrap());
    let pushed = std::sync::Arc::new(tokio::sync::Notify::new());
    let away = tokio_util::sync::CancellationToken::new();
    let dead = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    let shipping =
        tokio::spawn(reflow_data_plane::shipper::run(config(&dead), spool.clone(), pushed.clone(), away.clone()));
    for batch in 0..4 {
        spool.push((1..=25).map(|n| shipped("dp-1", batch * 100 + n)).collect()).unwrap();
        pushed.notify_one();
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(spool.usage().1, 4, "nothing leaves while the control plane is away");
    away.cancel();
    shipping.await.unwrap();
    drop(spool);

    // The data plane restarts on the same spool and reaches its control plane: all drain, once.
    let spool = std::sync::Arc::new(Spool::open(dir.path(), DATA_PLANE_TOKEN, 1 << 20, OnFull::Refuse).unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(reflow_data_plane::shipper::run(config(&cp.grpc), spool.clone(), pushed.clone(), shutdown.clone()));
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while spool.usage().1 > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the spool did not drain: {:?}", spool.usage());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored().await, 100);
    assert_eq!(spool.dropped(), 0);
    shutdown.cancel();
    let (records, anchors) = cp.control_plane.store().audit_chains().await.unwrap();
    let verified = reflow_control_plane::audit::verify(&records, |p| anchors.get(p).cloned().unwrap_or_default());
    assert_eq!(verified, Ok(100));
}

/// A hand-driven data plane: says Hello, then lets the test read updates and answer.
struct RawPeer {
    tx: mpsc::Sender<SyncRequest>,
    updates: tonic::Streaming<SnapshotUpdate>,
}

impl RawPeer {
    async fn connect(grpc: &str, node_id: &str, have_version: &str) -> RawPeer {
        let mut client = SnapshotServiceClient::connect(grpc.to_string()).await.unwrap();
        let (tx, rx) = mpsc::channel(8);
        let hello = Hello { node_id: node_id.into(), have_version: have_version.into(), ..Default::default() };
        tx.send(SyncRequest { kind: Some(sync_request::Kind::Hello(hello)) }).await.unwrap();
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request.metadata_mut().insert("authorization", format!("Bearer {DATA_PLANE_TOKEN}").parse().unwrap());
        let updates = client.sync(request).await.unwrap().into_inner();
        RawPeer { tx, updates }
    }

    async fn next(&mut self, within: Duration) -> Option<SnapshotUpdate> {
        tokio::time::timeout(within, self.updates.message()).await.ok().and_then(|m| m.unwrap())
    }
}

async fn rejections_are_recorded_and_answered(backend: &str) {
    let db = test_db(backend).await;
    let cp = spawn_control_plane(&db.url(), "cp-a").await;
    let mut peer = RawPeer::connect(&cp.grpc, "raw", "").await;
    let first = peer.next(CONVERGE).await.expect("full state");
    assert!(first.base_version.is_empty());
    assert!(!first.upserts.is_empty());

    let nack = Nack { version: first.version.clone(), reason: "injected rejection".into(), want_full: true };
    peer.tx.send(SyncRequest { kind: Some(sync_request::Kind::Nack(nack)) }).await.unwrap();
    let resent = peer.next(CONVERGE).await.expect("a full resend after want_full");
    assert!(resent.base_version.is_empty());
    assert_eq!(resent.version, first.version);
    eventually(CONVERGE, "the rejection is recorded", || async {
        let planes = cp.control_plane.store().list_data_planes().await.unwrap();
        planes.first().and_then(|p| p.last_rejection.as_ref()).is_some_and(|r| r.reason == "injected rejection")
    })
    .await;
}

async fn data_plane_keeps_its_version_when_an_update_is_bad(backend: &str) {
    // A fake control plane: a real gRPC server that sends a good full state and then an
    // update with a corrupted payload.
    use reflow_proto::snapshot::v1::snapshot_service_server::{SnapshotService, SnapshotServiceServer};
    let db = test_db(backend).await;
    let real = spawn_control_plane(&db.url(), "cp-real").await;
    let good = real.control_plane.hub().current().unwrap();
    let full = SnapshotUpdate { version: good.version.clone(), upserts: good.full(), ..Default::default() };
    let mut bad = full.clone();
    bad.upserts[0].payload = b"{}".to_vec();

    #[derive(Clone)]
    struct Fake {
        updates: Vec<SnapshotUpdate>,
        replies: mpsc::Sender<SyncRequest>,
    }
    #[tonic::async_trait]
    impl SnapshotService for Fake {
        type SyncStream = tokio_stream::wrappers::ReceiverStream<Result<SnapshotUpdate, tonic::Status>>;
        async fn sync(
            &self,
            request: tonic::Request<tonic::Streaming<SyncRequest>>,
        ) -> Result<tonic::Response<Self::SyncStream>, tonic::Status> {
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::channel(8);
            let (updates, replies) = (self.updates.clone(), self.replies.clone());
            tokio::spawn(async move {
                let _hello = inbound.message().await;
                for update in updates {
                    let _ = tx.send(Ok(update)).await;
                    if let Ok(Some(reply)) = inbound.message().await {
                        let _ = replies.send(reply).await;
                    }
                }
                std::future::pending::<()>().await;
                drop(tx);
            });
            Ok(tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
        }

        async fn ship_audit(
            &self,
            _request: tonic::Request<reflow_proto::snapshot::v1::AuditBatch>,
        ) -> Result<tonic::Response<reflow_proto::snapshot::v1::AuditAck>, tonic::Status> {
            Err(tonic::Status::unimplemented("this fake serves snapshots only"))
        }
    }
    let (replies_tx, mut replies) = mpsc::channel(8);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let fake = Fake { updates: vec![full, bad], replies: replies_tx };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SnapshotServiceServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dp = spawn_data_plane(&address, DATA_PLANE_TOKEN, "dp").await;
    let ack = tokio::time::timeout(CONVERGE, replies.recv()).await.unwrap().unwrap();
    assert!(matches!(ack.kind, Some(sync_request::Kind::Ack(ref a)) if a.version == good.version), "{ack:?}");
    let nack = tokio::time::timeout(CONVERGE, replies.recv()).await.unwrap().unwrap();
    match nack.kind {
        Some(sync_request::Kind::Nack(nack)) => {
            assert!(nack.reason.contains("payload does not match"), "{}", nack.reason)
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(dp.version(), Some(good.version.clone()), "the previous version stays active");
    // Connected, but the control plane's snapshot does not apply: it says so.
    let ready = reqwest::get(format!("{}/ready", dp.http)).await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "stale", "{ready}");
    assert_eq!(ready["version"], good.version.as_str());
    assert!(ready["stale"]["reason"].as_str().unwrap().contains("payload does not match"), "{ready}");
    assert!(ready["stale"]["since"].is_string());
    let metrics = reqwest::get(format!("{}/metrics", dp.http)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("\nreflow_snapshot_stale 1\n"), "{metrics}");
    assert!(metrics.contains("\nreflow_snapshot_rejections_total 1\n"), "{metrics}");
}

/// A state far past gRPC's default 4 MiB message limit (20 MB of admin-created values) reaches
/// a data plane that joins afterwards, in parts, and what it then holds is enforced.
async fn a_large_snapshot_reaches_a_new_data_plane(backend: &str) {
    let db = test_db(backend).await;
    let cp = spawn_control_plane(&db.url(), "cp-a").await;
    let api = |path: &str| format!("{}{path}", cp.api);
    let (_, admin) =
        post(&api("/api/auth/register"), None, json!({"email": "a@example.com", "password": "password123"})).await;
    let admin = admin["token"].as_str().unwrap().to_string();
    let (_, user) =
        post(&api("/api/auth/register"), None, json!({"email": "u@example.com", "password": "password123"})).await;
    let user_token = user["token"].as_str().unwrap().to_string();
    let (_, api_token) = post(&api("/api/auth/tokens"), Some(&user_token), json!({"name": "laptop"})).await;
    let api_token = api_token["token"].as_str().unwrap().to_string();
    let (_, target) = post(
        &api("/api/targets"),
        Some(&admin),
        json!({"name": "big", "transport_type": "streamable-http", "url": "http://127.0.0.1:9/mcp"}),
    )
    .await;
    let target = target["id"].as_str().unwrap().to_string();
    // 640 values of 30 KB, each sealed and base64-encoded in the snapshot: over 20 MB.
    let value: String = (0..30_000).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
    let writes = (0..640).map(|i| {
        let (url, admin, value) = (api(&format!("/api/targets/{target}/env/default")), admin.clone(), value.clone());
        async move {
            let (status, body) = post(&url, Some(&admin), json!({"key": format!("VALUE_{i}"), "value": value})).await;
            assert_eq!(status, 200, "{body}");
        }
    });
    // A few at a time: the test store's connection pool is small.
    futures::StreamExt::collect::<Vec<()>>(futures::StreamExt::buffer_unordered(futures::stream::iter(writes), 4))
        .await;
    eventually(Duration::from_secs(30), "the large snapshot compiled", || async {
        cp.control_plane.hub().current().is_some_and(|s| s.resources.len() > 640)
    })
    .await;
    let size: usize = cp.control_plane.hub().current().unwrap().full().iter().map(|r| r.payload.len()).sum();
    assert!(size > 20_000_000, "only {size} bytes");
    let dp = spawn_data_plane(&cp.grpc, DATA_PLANE_TOKEN, "late").await;
    let planes = [&dp];
    eventually(Duration::from_secs(60), "the new data plane holds the large snapshot", || converged(&cp, &planes))
        .await;
    let ready = reqwest::get(format!("{}/ready", dp.http)).await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(mcp_status(&dp, &api_token).await, 200, "the user's API token works");
    // Deactivated: refused wherever the data plane holds the deactivation.
    let (_, me) = get_json(&api("/api/auth/me"), &user_token).await;
    let before = cp.control_plane.hub().current().map(|s| s.version.clone());
    let response = reqwest::Client::new()
        .put(api(&format!("/api/users/{}", me["id"].as_str().unwrap())))
        .bearer_auth(&admin)
        .json(&json!({"active": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Compiling and applying 20 MB (every value opened and sealed again, every resource checked)
    // takes seconds in a debug build.
    let reached = tokio::time::timeout(Duration::from_secs(60), async {
        while !(cp.control_plane.hub().current().map(|s| s.version.clone()) != before && converged(&cp, &planes).await)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if reached.is_err() {
        let ready: Value = reqwest::get(format!("{}/ready", dp.http)).await.unwrap().json().await.unwrap();
        panic!(
            "the deactivation did not reach the data plane: {ready}; hub {:?}, before {before:?}",
            cp.control_plane.hub().current().map(|s| s.version.clone())
        );
    }
    assert_eq!(mcp_status(&dp, &api_token).await, 401, "a deactivated user's token is refused");
}

both_backends!(
    changes_reach_every_data_plane,
    wrong_token_is_refused,
    rejections_are_recorded_and_answered,
    data_plane_keeps_its_version_when_an_update_is_bad,
    explain_names_the_deciding_policy,
    audit_batches_are_stored_once_all_or_none_and_only_in_the_shippers_chain,
    spooled_audit_waits_while_the_control_plane_is_away_and_drains_after_a_restart,
);

/// The transport of a large state does not depend on the store: run once, on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_snapshot_reaches_a_new_data_plane_on_sqlite() {
    a_large_snapshot_reaches_a_new_data_plane("sqlite").await;
}

/// Two replicas on one PostgreSQL learn of each other's writes through LISTEN/NOTIFY and
/// serve the same version; a data plane fails over without a full resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_and_data_planes_fail_over_without_resync() {
    let db = postgres_db().await;
    let a = spawn_control_plane(&db.url(), "cp-a").await;
    let b = spawn_control_plane(&db.url(), "cp-b").await;
    let initial = a.control_plane.hub().current().unwrap().version.clone();
    let (status, _) = post(
        &format!("{}/api/auth/register", a.api),
        None,
        json!({"email": "a@example.com", "password": "password123"}),
    )
    .await;
    assert_eq!(status, 201);
    eventually(CONVERGE, "replica b compiles replica a's write", || async {
        let (va, vb) = (a.control_plane.hub().current().unwrap(), b.control_plane.hub().current().unwrap());
        va.version != initial && va.version == vb.version
    })
    .await;
    let version = a.control_plane.hub().current().unwrap().version.clone();

    // The data plane holds `version` (from replica a) and connects to replica b.
    let mut peer = RawPeer::connect(&b.grpc, "failover", &version).await;
    assert!(peer.next(Duration::from_millis(500)).await.is_none(), "nothing to send: same version");
    let (status, _) = post(
        &format!("{}/api/auth/register", a.api),
        None,
        json!({"email": "b@example.com", "password": "password123"}),
    )
    .await;
    assert_eq!(status, 201);
    let update = peer.next(CONVERGE).await.expect("a diff from replica b");
    assert_eq!(update.base_version, version, "a diff, not a full resync");
    assert_eq!(update.upserts.len(), 1);
    assert_eq!(update.control_plane_id, "cp-b");
}

/// Test PKI: a CA, a server certificate for localhost, and client certificates.
struct Pki {
    ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "reflow test CA");
        let ca = params.self_signed(&key).unwrap();
        Pki { ca_pem: ca.pem(), issuer: rcgen::Issuer::new(params, key) }
    }

    /// A certificate and key for `name`, signed by this CA.
    fn issue(&self, name: &str) -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec![name.to_string()]).unwrap().signed_by(&key, &self.issuer).unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }
}

/// With mTLS on, a data plane with a client certificate from the right CA syncs; one with
/// no client certificate or one from another CA gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_data_planes_with_a_trusted_certificate() {
    let db = sqlite_db().await;
    let pki = Pki::new();
    let (cert_pem, key_pem) = pki.issue("localhost");
    let tls = reflow_control_plane::GrpcTls { cert_pem, key_pem, client_ca_pem: Some(pki.ca_pem.clone().into_bytes()) };
    let cp = spawn_control_plane_with(&db.url(), "cp-tls", Some(tls)).await;
    assert!(cp.grpc.starts_with("https://"));
    let client = |identity| reflow_data_plane::sync::ClientTls { ca_pem: pki.ca_pem.clone().into_bytes(), identity };

    let trusted =
        spawn_data_plane_with(&cp.grpc, DATA_PLANE_TOKEN, "trusted", Some(client(Some(pki.issue("dp-trusted"))))).await;
    let anonymous = spawn_data_plane_with(&cp.grpc, DATA_PLANE_TOKEN, "anonymous", Some(client(None))).await;
    let stranger =
        spawn_data_plane_with(&cp.grpc, DATA_PLANE_TOKEN, "stranger", Some(client(Some(Pki::new().issue("dp-x")))))
            .await;
    let plain = spawn_data_plane(&cp.grpc.replace("https://", "http://"), DATA_PLANE_TOKEN, "plain").await;
    let synced = [&trusted];
    eventually(CONVERGE, "the trusted data plane syncs over mTLS", || converged(&cp, &synced)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for refused in [&anonymous, &stranger, &plain] {
        assert!(refused.version().is_none(), "a data plane without a trusted certificate got a snapshot");
    }
    let planes = cp.control_plane.store().list_data_planes().await.unwrap();
    assert_eq!(planes.iter().map(|p| p.node_id.as_str()).collect::<Vec<_>>(), vec!["trusted"]);
}

async fn get_json(url: &str, token: &str) -> (u16, Value) {
    let response = reqwest::Client::new().get(url).bearer_auth(token).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

/// The explain endpoint answers from the current snapshot with the deciding policy.
async fn explain_names_the_deciding_policy(backend: &str) {
    let db = test_db(backend).await;
    let cp = spawn_control_plane(&db.url(), "cp-a").await;
    let (_, admin) = post(
        &format!("{}/api/auth/register", cp.api),
        None,
        json!({"email": "a@example.com", "password": "password123"}),
    )
    .await;
    let admin = admin["token"].as_str().unwrap().to_string();
    let (_, dev) = post(
        &format!("{}/api/auth/register", cp.api),
        None,
        json!({"email": "d@example.com", "password": "password123"}),
    )
    .await;
    let dev_id = dev["user"]["id"].as_str().unwrap().to_string();
    let (_, ops) = post(
        &format!("{}/api/auth/register", cp.api),
        None,
        json!({"email": "o@example.com", "password": "password123"}),
    )
    .await;
    let ops_id = ops["user"]["id"].as_str().unwrap().to_string();
    reqwest::Client::new()
        .put(format!("{}/api/users/{dev_id}", cp.api))
        .bearer_auth(&admin)
        .json(&json!({"role": "developer"}))
        .send()
        .await
        .unwrap();
    let (_, target) = post(
        &format!("{}/api/targets", cp.api),
        Some(&admin),
        json!({"name": "github", "transport_type": "streamable-http", "url": "http://127.0.0.1:9/mcp"}),
    )
    .await;
    let t = target["id"].as_str().unwrap().to_string();
    for body in [
        json!({"name": "developers use github", "target_id": t, "effect": "allow", "priority": 10,
               "subjects": [{"subject_type": "role", "subject_value": "developer"}]}),
        json!({"name": "nobody deletes", "target_id": t, "resource_type": "tool", "pattern": "delete_*", "effect": "deny",
               "priority": 10, "subjects": [{"subject_type": "everyone"}]}),
    ] {
        assert_eq!(post(&format!("{}/api/policies", cp.api), Some(&admin), body).await.0, 201);
    }
    let explain = |user: &str, kind: &str, name: &str| {
        format!("{}/api/policies/explain?user_id={user}&target_id={t}&kind={kind}&name={name}", cp.api)
    };
    eventually(CONVERGE, "both policies are compiled", || async {
        let version = cp.control_plane.hub().current().map(|s| s.version.clone()).unwrap_or_default();
        let (_, read) = get_json(&explain(&dev_id, "tool", "read_file"), &admin).await;
        let (_, delete) = get_json(&explain(&dev_id, "tool", "delete_repo"), &admin).await;
        read["allowed"] == true
            && delete["policy_name"] == "nobody deletes"
            && read["snapshot_version"] == version.as_str()
    })
    .await;
    let (_, read) = get_json(&explain(&dev_id, "tool", "read_file"), &admin).await;
    assert_eq!(read["policy_name"], "developers use github");
    assert_eq!(read["snapshot_version"], cp.control_plane.hub().current().unwrap().version.as_str());
    let (_, delete) = get_json(&explain(&dev_id, "tool", "delete_repo"), &admin).await;
    assert_eq!(
        (delete["allowed"].as_bool(), delete["policy_name"].as_str()),
        (Some(false), Some("nobody deletes")),
        "deny wins the tie"
    );
    let (_, prompt) = get_json(&explain(&dev_id, "prompt", "delete_repo"), &admin).await;
    assert_eq!(prompt["allowed"], true, "the deny is for tools only");
    let (_, other) = get_json(&explain(&ops_id, "tool", "read_file"), &admin).await;
    assert_eq!((other["allowed"].as_bool(), other["policy_id"].is_null()), (Some(false), true));
    assert_eq!(other["reason"], "no policy applies: denied by default");
    assert_eq!(get_json(&explain(&dev_id, "widget", "x"), &admin).await.0, 400);
    assert_eq!(get_json(&explain(&uuid::Uuid::new_v4().to_string(), "tool", "x"), &admin).await.0, 404);
    let dev_token = dev["token"].as_str().unwrap();
    assert_eq!(get_json(&explain(&dev_id, "tool", "x"), dev_token).await.0, 403);
}

/// A TCP proxy in front of PostgreSQL that the test can cut and restore: fault injection
/// for a database outage.
struct DatabaseProxy {
    port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl DatabaseProxy {
    async fn start(upstream: String) -> DatabaseProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (flag, tasks) = (up.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    continue;
                }
                let upstream = upstream.clone();
                tasks.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        });
        DatabaseProxy { port, up, connections }
    }

    /// Refuses new connections and drops the open ones.
    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// PostgreSQL goes away: admin writes answer 503 within about a second, data planes keep
/// serving, nothing is half-written; when it returns, writes and propagation resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_fails_writes_fast_and_spares_data_planes() {
    let db = postgres_db().await;
    let direct = url::Url::parse(&db.url()).unwrap();
    let proxy = DatabaseProxy::start(format!("{}:{}", direct.host_str().unwrap(), direct.port().unwrap_or(5432))).await;
    let mut through_proxy = direct.clone();
    through_proxy.set_port(Some(proxy.port)).unwrap();
    let cp = spawn_control_plane(through_proxy.as_str(), "cp-a").await;
    let dp = spawn_data_plane(&cp.grpc, DATA_PLANE_TOKEN, "dp").await;
    let (_, admin) = post(
        &format!("{}/api/auth/register", cp.api),
        None,
        json!({"email": "a@example.com", "password": "password123"}),
    )
    .await;
    let admin = admin["token"].as_str().unwrap().to_string();
    eventually(CONVERGE, "the admin reaches the data plane", || async { mcp_status(&dp, &admin).await == 200 }).await;

    proxy.cut();
    let target = json!({"name": "web", "transport_type": "streamable-http", "url": "http://127.0.0.1:9/mcp"});
    let started = std::time::Instant::now();
    let (status, body) = post(&format!("{}/api/targets", cp.api), Some(&admin), target.clone()).await;
    let elapsed = started.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "unavailable");
    assert!(elapsed < Duration::from_millis(2500), "the write took {elapsed:?} to fail");
    let health = reqwest::get(format!("{}/health", cp.api)).await.unwrap();
    assert_eq!(health.status().as_u16(), 503);
    for _ in 0..20 {
        assert_eq!(mcp_status(&dp, &admin).await, 200, "the data plane keeps serving");
    }

    proxy.restore();
    eventually(CONVERGE, "writes resume", || async {
        post(&format!("{}/api/targets", cp.api), Some(&admin), target.clone()).await.0 == 201
    })
    .await;
    let all = [&dp];
    eventually(CONVERGE, "the new target reaches the data plane", || async {
        converged(&cp, &all).await && dp.data_plane.state().load().is_some_and(|s| s.view.targets.contains_key("web"))
    })
    .await;
    let targets = cp.control_plane.store().list_targets().await.unwrap();
    assert_eq!(targets.len(), 1, "the failed write left nothing behind");
}
