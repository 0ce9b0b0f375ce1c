//! Snapshot distribution, control-plane side.
//!
//! - The **compiler loop** recompiles when woken: by the admin API after a write, by
//!   PostgreSQL `NOTIFY` when another replica wrote, and by a periodic safety tick. A new
//!   version is published to the [`SnapshotHub`] (a `watch` channel plus a short history to
//!   diff from).
//! - The **gRPC service** authenticates each data plane by its token, reads its `Hello`, and
//!   streams the full state or a diff from the version it holds, then a diff per new version.
//!   It records acknowledgements and rejections as the data plane's status. Updates travel in
//!   parts of bounded size ([`reflow_proto::parts`]), so a state of any size reaches them.
//!
//! A store that is down stops compilation only: streams stay open and keep the last version.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use reflow_common::crypto::{DeterministicSealer, Keyring};
use reflow_proto::snapshot::v1::snapshot_service_server::{SnapshotService, SnapshotServiceServer};
use reflow_proto::snapshot::v1::{
    sync_request, AuditAck, AuditBatch, EndedSession, Hello, SnapshotUpdate, SyncRequest,
};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::compile::{compile, CompileKeys, Snapshot};
use crate::store::{now, ControlPlaneStatus, DataPlaneStatus, DynStore, Rejection};

/// How many past versions are kept to diff from.
const HISTORY: usize = 64;
/// How long a new stream may take to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often stream status (last seen) and replica status are refreshed.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// Safety recompilation when no change notification arrived.
const SAFETY_TICK: Duration = Duration::from_secs(30);
/// Changes arriving together are compiled once.
const DEBOUNCE: Duration = Duration::from_millis(2);

/// The latest compiled snapshot and recent history, shared by the compiler and streams.
#[derive(Debug)]
pub struct SnapshotHub {
    id: String,
    started_at: chrono::DateTime<chrono::Utc>,
    /// Wakes the compiler loop; the API signals it after every successful write.
    changes: Arc<Notify>,
    /// The current snapshot; streams wait on it for new versions.
    current: watch::Sender<Option<Arc<Snapshot>>>,
    /// Recent versions, newest last, so a data plane holding one of them gets a diff.
    history: Mutex<VecDeque<Arc<Snapshot>>>,
    /// Metrics and the activity feed.
    pub observe: Arc<crate::observe::Observe>,
    /// Travelling sessions deleted on some data plane (nonce → until when), told to every data
    /// plane this replica streams to.
    ended: Mutex<std::collections::HashMap<String, i64>>,
    ended_tx: tokio::sync::broadcast::Sender<Vec<EndedSession>>,
}

/// The most ended sessions a hub remembers (the oldest are forgotten first; their ids expire).
const MAX_ENDED: usize = 100_000;

/// A session nonce as data planes make them (22 characters of URL-safe base64), with room to
/// spare: anything else a data plane reports is not stored.
fn plausible_nonce(nonce: &str) -> bool {
    (1..=64).contains(&nonce.len()) && nonce.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Sessions ended through another control-plane replica, or before this one started, reach
/// this replica's data planes too: read from the store, then as the store announces them.
async fn learn_ended_sessions(hub: Arc<SnapshotHub>, store: DynStore, shutdown: CancellationToken) {
    let (tx, mut rx) = mpsc::channel(64);
    let listening = store.listen_for_ended_sessions(tx, shutdown);
    let learning = async {
        while let Some(recorded) = rx.recv().await {
            let ended: Vec<EndedSession> =
                recorded.into_iter().map(|(nonce, until_unix)| EndedSession { nonce, until_unix }).collect();
            hub.sessions_ended(&ended);
        }
    };
    tokio::join!(listening, learning);
}

impl SnapshotHub {
    pub fn new(id: String) -> Arc<Self> {
        Arc::new(SnapshotHub {
            id,
            started_at: now(),
            changes: Arc::new(Notify::new()),
            current: watch::channel(None).0,
            history: Mutex::new(VecDeque::new()),
            observe: crate::observe::Observe::new(),
            ended: Mutex::new(Default::default()),
            ended_tx: tokio::sync::broadcast::channel(64).0,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Notes sessions a data plane (or another replica) reports ended, and tells every stream
    /// of this replica about those it did not know yet; returns those.
    pub fn sessions_ended(&self, reported: &[EndedSession]) -> Vec<EndedSession> {
        let now = now().timestamp();
        let fresh: Vec<EndedSession> = {
            let mut ended = self.ended.lock().unwrap();
            ended.retain(|_, until| *until > now);
            let fresh: Vec<EndedSession> = reported
                .iter()
                .filter(|e| e.until_unix > now && plausible_nonce(&e.nonce) && !ended.contains_key(&e.nonce))
                .cloned()
                .collect();
            for e in &fresh {
                if ended.len() >= MAX_ENDED {
                    if let Some(oldest) = ended.iter().min_by_key(|(_, until)| **until).map(|(n, _)| n.clone()) {
                        ended.remove(&oldest);
                    }
                }
                ended.insert(e.nonce.clone(), e.until_unix);
            }
            fresh
        };
        if !fresh.is_empty() {
            let _ = self.ended_tx.send(fresh.clone());
        }
        fresh
    }

    /// Every session ended and not yet expired, for a data plane that connects.
    fn ended_sessions(&self) -> Vec<EndedSession> {
        let now = now().timestamp();
        let ended = self.ended.lock().unwrap();
        ended
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(nonce, until)| EndedSession { nonce: nonce.clone(), until_unix: *until })
            .collect()
    }

    /// Asks for a recompilation.
    pub fn changed(&self) {
        self.changes.notify_one();
    }

    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.current.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.current.subscribe()
    }

    fn find(&self, version: &str) -> Option<Arc<Snapshot>> {
        if version.is_empty() {
            return None;
        }
        self.history.lock().expect("history lock").iter().rev().find(|s| s.version == version).cloned()
    }

    /// Publishes `snapshot` if its version is new. Returns whether it was.
    pub fn publish(&self, snapshot: Snapshot) -> bool {
        if self.current.borrow().as_ref().is_some_and(|c| c.version == snapshot.version) {
            return false;
        }
        let snapshot = Arc::new(snapshot);
        {
            let mut history = self.history.lock().expect("history lock");
            history.push_back(snapshot.clone());
            while history.len() > HISTORY {
                history.pop_front();
            }
        }
        self.observe.published(&snapshot.version);
        self.current.send_replace(Some(snapshot));
        true
    }

    fn status(&self) -> Option<ControlPlaneStatus> {
        self.current().map(|snapshot| ControlPlaneStatus {
            id: self.id.clone(),
            version: snapshot.version.clone(),
            started_at: self.started_at,
            last_seen: now(),
        })
    }
}

/// What the compiler needs to seal and sign, owned.
#[derive(Debug, Clone)]
pub struct CompilerSecrets {
    pub store_keyring: Arc<Keyring>,
    pub sealer: DeterministicSealer,
    pub jwt_public_key: [u8; 32],
    pub jwt_issuer: String,
    pub jwt_audience: String,
}

/// Loads the state and compiles it once. Errors are logged; the previous version stays.
pub async fn compile_once(hub: &SnapshotHub, store: &DynStore, secrets: &CompilerSecrets) -> bool {
    let started = std::time::Instant::now();
    let published = compile_and_publish(hub, store, secrets).await;
    let result = match published {
        Some(true) => "published",
        Some(false) => "unchanged",
        None => "failed",
    };
    hub.observe.compiled(result, started.elapsed().as_secs_f64());
    published.unwrap_or(false)
}

/// Whether a new version was published; `None` when compiling failed.
async fn compile_and_publish(hub: &SnapshotHub, store: &DynStore, secrets: &CompilerSecrets) -> Option<bool> {
    let state = match store.load_state().await {
        Ok(state) => state,
        Err(error) => {
            tracing::warn!(%error, "cannot load state to compile a snapshot; keeping the current version");
            return None;
        }
    };
    let keys = CompileKeys {
        store_keyring: &secrets.store_keyring,
        sealer: &secrets.sealer,
        jwt_public_key: &secrets.jwt_public_key,
        jwt_issuer: &secrets.jwt_issuer,
        jwt_audience: &secrets.jwt_audience,
    };
    match compile(&state, keys) {
        Ok(snapshot) => {
            let version = snapshot.version.clone();
            let resources = snapshot.resources.len();
            let published = hub.publish(snapshot);
            if published {
                tracing::info!(%version, resources, "snapshot published");
                if let Some(status) = hub.status() {
                    if let Err(error) = store.put_control_plane(&status).await {
                        tracing::debug!(%error, "cannot record control-plane status");
                    }
                }
            }
            Some(published)
        }
        Err(error) => {
            tracing::error!(%error, "snapshot compilation failed; keeping the current version");
            None
        }
    }
}

/// Recompiles on every change notification until `shutdown`.
pub async fn run_compiler(
    hub: Arc<SnapshotHub>,
    store: DynStore,
    secrets: CompilerSecrets,
    shutdown: CancellationToken,
) {
    let listener = {
        let (store, changes, shutdown) = (store.clone(), hub.changes.clone(), shutdown.clone());
        tokio::spawn(async move { store.listen_for_changes(changes, shutdown).await })
    };
    let learner = tokio::spawn(learn_ended_sessions(hub.clone(), store.clone(), shutdown.clone()));
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut safety = tokio::time::interval(SAFETY_TICK);
    safety.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = hub.changes.notified() => {
                tokio::time::sleep(DEBOUNCE).await;
                compile_once(&hub, &store, &secrets).await;
            }
            _ = safety.tick() => {
                compile_once(&hub, &store, &secrets).await;
            }
            _ = heartbeat.tick() => {
                if let Some(status) = hub.status() {
                    let _ = store.put_control_plane(&status).await;
                }
            }
        }
    }
    let _ = listener.await;
    let _ = learner.await;
}

/// The gRPC snapshot service.
#[derive(Debug, Clone)]
pub struct SnapshotGrpc {
    hub: Arc<SnapshotHub>,
    store: DynStore,
    /// SHA-256 of the data-plane token; compared instead of the token itself.
    token_hash: [u8; 32],
    shutdown: CancellationToken,
}

impl SnapshotGrpc {
    pub fn new(hub: Arc<SnapshotHub>, store: DynStore, data_plane_token: &str, shutdown: CancellationToken) -> Self {
        SnapshotGrpc { hub, store, token_hash: Sha256::digest(data_plane_token.as_bytes()).into(), shutdown }
    }

    pub fn into_server(self) -> SnapshotServiceServer<Self> {
        let limit = reflow_proto::parts::MAX_MESSAGE_BYTES;
        SnapshotServiceServer::new(self).max_decoding_message_size(limit).max_encoding_message_size(limit)
    }

    fn authenticate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| <[u8; 32]>::from(Sha256::digest(t.as_bytes())));
        if presented == Some(self.token_hash) {
            return Ok(());
        }
        tracing::warn!(remote = ?request.remote_addr(), "refused a data plane: missing or wrong data-plane token");
        Err(Status::unauthenticated("data-plane token missing or wrong"))
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<SnapshotUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotService for SnapshotGrpc {
    type SyncStream = UpdateStream;

    async fn sync(&self, request: Request<Streaming<SyncRequest>>) -> Result<Response<Self::SyncStream>, Status> {
        self.authenticate(&request)?;
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(SyncRequest { kind: Some(sync_request::Kind::Hello(hello)) }))) => hello,
            Ok(Ok(_)) => return Err(Status::invalid_argument("the first message must be Hello")),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10 seconds")),
        };
        if hello.node_id.is_empty() || hello.node_id.len() > 253 {
            return Err(Status::invalid_argument("Hello.node_id must be 1 to 253 characters"));
        }
        let (tx, rx) = mpsc::channel(8);
        let session = Session::new(self.hub.clone(), self.store.clone(), &hello, tx);
        tokio::spawn(session.run(hello.have_version, inbound, self.shutdown.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// Stores a batch of audit records in its data plane's chain, all or none: a batch with one
    /// bad record is refused whole, naming the record and field, so the data plane keeps it.
    async fn ship_audit(&self, request: Request<AuditBatch>) -> Result<Response<AuditAck>, Status> {
        self.authenticate(&request)?;
        let batch = request.into_inner();
        if batch.node_id.is_empty() || batch.node_id.len() > 253 {
            return Err(Status::invalid_argument("AuditBatch.node_id must be 1 to 253 characters"));
        }
        if batch.records.len() > reflow_proto::audit::MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "AuditBatch.records: at most {} records per batch",
                reflow_proto::audit::MAX_BATCH
            )));
        }
        let mut records = Vec::with_capacity(batch.records.len());
        for (i, bytes) in batch.records.iter().enumerate() {
            let record: crate::audit::AuditRecord = serde_json::from_slice(bytes)
                .map_err(|e| Status::invalid_argument(format!("AuditBatch.records[{i}]: not an audit record: {e}")))?;
            reflow_proto::audit::check(&record)
                .map_err(|(field, why)| Status::invalid_argument(format!("AuditBatch.records[{i}].{field}: {why}")))?;
            if record.data_plane != batch.node_id {
                return Err(Status::invalid_argument(format!(
                    "AuditBatch.records[{i}].data_plane: {:?} is not the shipping data plane {:?}",
                    record.data_plane, batch.node_id
                )));
            }
            records.push(record);
        }
        let stored = self.store.append_audit(&records).await.map_err(|e| {
            tracing::warn!(node = %batch.node_id, error = %e, "cannot store audit records; the data plane keeps them");
            Status::unavailable("the audit trail cannot be written now; send the batch again")
        })?;
        let total = records.len() as u64;
        self.hub.observe.ingested(stored, &records);
        Ok(Response::new(AuditAck { stored, duplicates: total - stored }))
    }
}

/// One data plane's stream.
struct Session {
    hub: Arc<SnapshotHub>,
    /// Where sessions the data plane reports ended are recorded, for every other replica.
    store: DynStore,
    tx: mpsc::Sender<Result<SnapshotUpdate, Status>>,
    /// Latest status; a writer task persists it so a slow or absent store never stalls
    /// the stream.
    status: watch::Sender<DataPlaneStatus>,
    _writer: tokio::task::JoinHandle<()>,
    /// Shows the stream in the control plane's metrics while it lasts.
    _following: crate::observe::Following,
    /// The snapshot the data plane holds after applying everything sent so far.
    sent: Option<Arc<Snapshot>>,
    /// The snapshot it acknowledged last.
    acked: Option<Arc<Snapshot>>,
}

impl Session {
    fn new(
        hub: Arc<SnapshotHub>,
        store: DynStore,
        hello: &Hello,
        tx: mpsc::Sender<Result<SnapshotUpdate, Status>>,
    ) -> Self {
        let at = now();
        let status = DataPlaneStatus {
            node_id: hello.node_id.clone(),
            group: hello.group.clone(),
            labels: hello.labels.clone().into_iter().collect(),
            build_version: hello.build_version.clone(),
            control_plane_id: hub.id.clone(),
            connected: true,
            connected_since: at,
            last_seen: at,
            acked_version: None,
            acked_at: None,
            last_rejection: None,
            instances: Vec::new(),
            report: Default::default(),
        };
        let (status, mut updates) = watch::channel(status);
        let writer_store = store.clone();
        let writer = tokio::spawn(async move {
            let store = writer_store;
            loop {
                let current = updates.borrow_and_update().clone();
                if let Err(error) = store.put_data_plane(&current).await {
                    tracing::debug!(%error, node = %current.node_id, "cannot record data-plane status");
                }
                if updates.changed().await.is_err() {
                    break;
                }
            }
        });
        tracing::info!(node = %hello.node_id, group = %hello.group, build = %hello.build_version, have = %hello.have_version, "data plane connected");
        let following = hub.observe.follow(status.subscribe());
        Session { hub, store, tx, status, _writer: writer, _following: following, sent: None, acked: None }
    }

    /// Notes sessions the data plane ended, and records those new to this replica for the
    /// others (in the background: a slow store never stalls the stream).
    fn record_ended(&self, reported: &[EndedSession]) {
        let fresh = self.hub.sessions_ended(reported);
        if fresh.is_empty() {
            return;
        }
        let store = self.store.clone();
        let ended: Vec<(String, i64)> = fresh.into_iter().map(|e| (e.nonce, e.until_unix)).collect();
        tokio::spawn(async move {
            if let Err(error) = store.end_sessions(&ended).await {
                tracing::warn!(%error, sessions = ended.len(), "cannot record ended sessions for the other control-plane replicas");
            }
        });
    }

    /// Tells the data plane of sessions ended elsewhere: an update that changes nothing of the
    /// version it was last sent (skipped until it was sent one).
    async fn tell_ended(&mut self, ended_sessions: Vec<EndedSession>) -> bool {
        let Some(sent) = &self.sent else { return true };
        let update = SnapshotUpdate {
            version: sent.version.clone(),
            base_version: sent.version.clone(),
            upserts: Vec::new(),
            removals: Vec::new(),
            control_plane_id: self.hub.id.clone(),
            more: false,
            ended_sessions,
        };
        self.tx.send(Ok(update)).await.is_ok()
    }

    /// Sends what turns the data plane's state into `target`: a diff from what it will hold,
    /// or the full state.
    async fn send(&mut self, target: Arc<Snapshot>, force_full: bool) -> bool {
        let base = if force_full { None } else { self.sent.clone() };
        if base.as_ref().is_some_and(|b| b.version == target.version) {
            return true;
        }
        let update = match &base {
            Some(base) => {
                let diff = target.diff_from(base);
                SnapshotUpdate {
                    version: target.version.clone(),
                    base_version: base.version.clone(),
                    upserts: diff.upserts,
                    removals: diff.removals,
                    control_plane_id: self.hub.id.clone(),
                    more: false,
                    ended_sessions: Vec::new(),
                }
            }
            None => SnapshotUpdate {
                version: target.version.clone(),
                base_version: String::new(),
                upserts: target.full(),
                removals: Vec::new(),
                control_plane_id: self.hub.id.clone(),
                more: false,
                // A data plane that (re)connects learns what ended while it was away.
                ended_sessions: self.hub.ended_sessions(),
            },
        };
        self.sent = Some(target);
        // In parts of bounded size, so no state is too large for a data plane to receive.
        for part in reflow_proto::parts::split(update, reflow_proto::parts::PART_BYTES) {
            if self.tx.send(Ok(part)).await.is_err() {
                return false;
            }
        }
        true
    }

    async fn run(mut self, have_version: String, mut inbound: Streaming<SyncRequest>, shutdown: CancellationToken) {
        let node = self.status.borrow().node_id.clone();
        // A data plane that holds a version this replica knows gets a diff (or nothing).
        if let Some(known) = self.hub.find(&have_version) {
            self.sent = Some(known.clone());
            self.acked = Some(known);
            self.status.send_modify(|s| {
                s.acked_version = Some(have_version.clone());
                s.acked_at = Some(now());
            });
        }
        let mut current = self.hub.subscribe();
        let mut ended = self.hub.ended_tx.subscribe();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let initial = current.borrow_and_update().clone();
        if let Some(snapshot) = initial {
            if !self.send(snapshot, false).await {
                return self.close(&node, "stream closed");
            }
        }
        let reason = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break "control plane shutting down",
                changed = current.changed() => {
                    if changed.is_err() {
                        break "snapshot hub closed";
                    }
                    let latest = current.borrow_and_update().clone();
                    if let Some(snapshot) = latest {
                        if !self.send(snapshot, false).await {
                            break "stream closed";
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    self.status.send_modify(|s| s.last_seen = now());
                }
                notice = ended.recv() => {
                    let sessions = match notice {
                        Ok(sessions) => sessions,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.hub.ended_sessions(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => continue,
                    };
                    if !self.tell_ended(sessions).await {
                        break "stream closed";
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(SyncRequest { kind: Some(sync_request::Kind::Ack(ack)) })) => {
                        if self.sent.as_ref().is_some_and(|s| s.version == ack.version) {
                            self.acked = self.sent.clone();
                        } else if let Some(known) = self.hub.find(&ack.version) {
                            self.acked = Some(known);
                        }
                        tracing::debug!(%node, version = %ack.version, "data plane acknowledged");
                        self.status.send_modify(|s| {
                            s.acked_version = Some(ack.version.clone());
                            s.acked_at = Some(now());
                            s.last_seen = now();
                        });
                    }
                    Ok(Some(SyncRequest { kind: Some(sync_request::Kind::Nack(nack)) })) => {
                        tracing::warn!(%node, version = %nack.version, reason = %nack.reason, want_full = nack.want_full, "data plane rejected a snapshot");
                        self.status.send_modify(|s| {
                            s.last_rejection = Some(Rejection { version: nack.version.clone(), reason: nack.reason.clone(), at: now() });
                            s.last_seen = now();
                        });
                        // The data plane kept what it acknowledged last.
                        self.sent = self.acked.clone();
                        if nack.want_full {
                            let latest = current.borrow().clone();
                            if let Some(snapshot) = latest {
                                if !self.send(snapshot, true).await {
                                    break "stream closed";
                                }
                            }
                        }
                    }
                    Ok(Some(SyncRequest { kind: Some(sync_request::Kind::Status(report)) })) => {
                        self.record_ended(&report.ended_sessions);
                        let instances = report.instances.iter().map(instance_status).collect();
                        let plane_report = plane_report(&report);
                        self.status.send_modify(|s| {
                            s.instances = instances;
                            s.report = plane_report;
                            s.last_seen = now();
                        });
                    }
                    Ok(Some(_)) => break "unexpected message",
                    Ok(None) => break "data plane closed the stream",
                    Err(_) => break "stream error",
                }
            }
        };
        self.close(&node, reason)
    }

    fn close(self, node: &str, reason: &str) {
        tracing::info!(%node, %reason, "data plane disconnected");
        self.status.send_modify(|s| {
            s.connected = false;
            s.last_seen = now();
        });
    }
}

fn plane_report(report: &reflow_proto::snapshot::v1::Status) -> crate::store::PlaneReport {
    use crate::store::{Applied, TargetHealth};
    let applied = |done: &[reflow_proto::snapshot::v1::Done]| {
        done.iter().map(|d| Applied { id: d.id.clone(), generation: d.generation, count: d.count }).collect()
    };
    let at = |secs: i64| (secs > 0).then(|| chrono::DateTime::from_timestamp(secs, 0)).flatten();
    crate::store::PlaneReport {
        sessions: report.sessions,
        audit_spool_bytes: report.audit_spool_bytes,
        recycled: applied(&report.recycled),
        restarted: applied(&report.restarted),
        targets: report
            .targets
            .iter()
            .map(|t| TargetHealth {
                target_id: t.target_id.clone(),
                sessions: t.sessions,
                processes: t.processes,
                last_ok_at: at(t.last_ok_unix),
                last_failure_at: at(t.last_failure_unix),
                last_failure: (!t.last_failure.is_empty()).then(|| t.last_failure.clone()),
                failures: t.failures,
            })
            .collect(),
    }
}

fn instance_status(instance: &reflow_proto::snapshot::v1::Instance) -> crate::store::InstanceStatus {
    let at = |secs: i64| chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default();
    crate::store::InstanceStatus {
        target_id: instance.target_id.clone(),
        scope: instance.scope.clone(),
        pid: instance.pid,
        started_at: at(instance.started_at_unix),
        last_used_at: at(instance.last_used_unix),
    }
}
