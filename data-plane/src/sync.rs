//! Snapshot distribution, data-plane side: keep one stream open to the control plane,
//! apply each update whole or reject it, acknowledge, and keep the cache current.
//!
//! Reconnection uses capped exponential backoff with jitter. A refused token is logged as an
//! error naming the cause, and retried (an operator may fix the control plane's side).
//! Updates arrive in parts ([`reflow_proto::parts`]) and are applied once whole. A data plane
//! that is connected but cannot apply what it receives is *stale* ([`SnapshotState::health`]):
//! it keeps serving its last snapshot, and `/ready` and `/metrics` say since when and why.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use reflow_common::crypto::DeterministicSealer;
use reflow_proto::snapshot::v1::snapshot_service_client::SnapshotServiceClient;
use reflow_proto::snapshot::v1::{sync_request, Ack, Hello, Nack, Status, SyncRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::cache::Cache;
use crate::snapshot::apply;
use crate::state::SnapshotState;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(4);

/// Who this data plane is and where its control plane is.
#[derive(Clone)]
pub struct SyncConfig {
    pub control_plane: String,
    pub token: String,
    pub node_id: String,
    pub group: String,
    pub labels: HashMap<String, String>,
    /// TLS to the control plane; `None` for plain `http://`.
    pub tls: Option<ClientTls>,
    /// The largest update (all its parts together) this data plane assembles.
    pub max_snapshot_bytes: usize,
}

/// The default of `data_plane.max_snapshot_bytes`.
pub const DEFAULT_MAX_SNAPSHOT_BYTES: usize = 1024 * 1024 * 1024;

/// PEM material for TLS to the control plane.
#[derive(Clone)]
pub struct ClientTls {
    /// Verifies the control plane's certificate.
    pub ca_pem: Vec<u8>,
    /// This data plane's client certificate and key, for mTLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("client_certificate", &self.identity.is_some()).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SyncConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncConfig")
            .field("control_plane", &self.control_plane)
            .field("node_id", &self.node_id)
            .field("group", &self.group)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

fn jittered(delay: Duration) -> Duration {
    let factor = rand::thread_rng().gen_range(0.5..1.0);
    delay.mul_f64(factor)
}

/// What the data plane tells its control plane, and hears of each applied snapshot.
pub trait Observer: Send + Sync {
    /// A snapshot was applied; called before its Ack is sent.
    fn applied(&self, snapshot: &crate::snapshot::DataSnapshot);
    /// The status to report: running processes, recycles and restarts done.
    fn status(&self) -> Status;
    /// Sessions ended on other data planes, as the control plane relays them.
    fn ended_elsewhere(&self, _ended: &[reflow_proto::snapshot::v1::EndedSession]) {}
}

pub type Report = Arc<dyn Observer>;

/// How often the status is compared with what was last reported.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// Runs until `shutdown`: connect, stream, apply, reconnect.
pub async fn run(
    config: SyncConfig,
    state: Arc<SnapshotState>,
    sealer: DeterministicSealer,
    cache: Option<Cache>,
    report: Option<Report>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_START;
    while !shutdown.is_cancelled() {
        match stream_once(&config, &state, &sealer, cache.as_ref(), report.as_ref(), &shutdown).await {
            Ok(()) => backoff = BACKOFF_START,
            Err(StreamEnd::Refused(message)) => {
                tracing::error!(control_plane = %config.control_plane, %message, "the control plane refused this data plane's token; check --token");
                backoff = BACKOFF_CAP;
            }
            Err(StreamEnd::Failed(message)) => {
                tracing::warn!(control_plane = %config.control_plane, %message, version = ?state.version(), "snapshot stream unavailable; serving the current snapshot");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jittered(backoff)) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// The control plane's gRPC endpoint, with TLS when configured; the reason when it cannot be.
pub fn endpoint(config: &SyncConfig) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(config.control_plane.clone())
        .map_err(|e| format!("bad control-plane address: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    match &config.tls {
        Some(tls) => {
            use tonic::transport::{Certificate, ClientTlsConfig, Identity};
            let mut tls_config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                tls_config = tls_config.identity(Identity::from_pem(cert, key));
            }
            endpoint.tls_config(tls_config).map_err(|e| format!("TLS configuration: {e}"))
        }
        None => Ok(endpoint),
    }
}

enum StreamEnd {
    Refused(String),
    Failed(String),
}

/// One connection. `Ok` when it was established and later ended.
async fn stream_once(
    config: &SyncConfig,
    state: &SnapshotState,
    sealer: &DeterministicSealer,
    cache: Option<&Cache>,
    report: Option<&Report>,
    shutdown: &CancellationToken,
) -> Result<(), StreamEnd> {
    let endpoint = endpoint(config).map_err(StreamEnd::Failed)?;
    let channel = endpoint.connect().await.map_err(|e| StreamEnd::Failed(format!("cannot connect: {e}")))?;
    let limit = reflow_proto::parts::MAX_MESSAGE_BYTES;
    let mut client =
        SnapshotServiceClient::new(channel).max_decoding_message_size(limit).max_encoding_message_size(limit);
    let (tx, rx) = mpsc::channel::<SyncRequest>(8);
    let hello = Hello {
        node_id: config.node_id.clone(),
        group: config.group.clone(),
        labels: config.labels.clone(),
        build_version: env!("CARGO_PKG_VERSION").to_string(),
        have_version: state.version().unwrap_or_default(),
    };
    let _ = tx.send(SyncRequest { kind: Some(sync_request::Kind::Hello(hello)) }).await;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    let bearer = format!("Bearer {}", config.token)
        .parse()
        .map_err(|_| StreamEnd::Refused("the token is not valid header text".into()))?;
    request.metadata_mut().insert("authorization", bearer);
    let mut updates = match client.sync(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == tonic::Code::Unauthenticated => {
            return Err(StreamEnd::Refused(status.message().into()))
        }
        Err(status) => return Err(StreamEnd::Failed(format!("{}: {}", status.code(), status.message()))),
    };
    tracing::info!(control_plane = %config.control_plane, "snapshot stream open");
    state.set_connected(true);
    // Marks the stream closed however this function returns.
    struct Connected<'a>(&'a SnapshotState);
    impl Drop for Connected<'_> {
        fn drop(&mut self) {
            self.0.set_connected(false);
        }
    }
    let _connected = Connected(state);
    let mut parts = reflow_proto::parts::Assembler::default();
    // The status last sent on this stream (a new stream starts with nothing reported on the
    // control plane's side): sent again only when it changed.
    let reported = Arc::new(tokio::sync::Mutex::new(Status::default()));
    // Reports the status when it changes, for as long as this stream lives.
    let _reporter = report.map(|report| {
        let (report, tx, reported) = (report.clone(), tx.clone(), reported.clone());
        AbortOnDrop(tokio::spawn(async move {
            loop {
                if !send_status(&report, &tx, &reported).await {
                    return;
                }
                tokio::time::sleep(STATUS_EVERY).await;
            }
        }))
    });
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            message = updates.message() => message,
        };
        let part = match message {
            Ok(Some(part)) => part,
            Ok(None) => return Err(StreamEnd::Failed("the control plane closed the stream".into())),
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                return Err(StreamEnd::Refused(status.message().into()))
            }
            Err(status) => {
                // Reachable, but what it sends cannot be taken (too large, malformed): stale,
                // not merely disconnected.
                if !matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown) {
                    state.set_stale(format!("the snapshot stream failed: {}: {}", status.code(), status.message()));
                }
                return Err(StreamEnd::Failed(format!("{}: {}", status.code(), status.message())));
            }
        };
        let version = part.version.clone();
        let update = match parts.push(part, config.max_snapshot_bytes) {
            Ok(Some(update)) => update,
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(%version, %error, "snapshot update refused; keeping the current version");
                state.set_stale(error.to_string());
                let nack = Nack { version, reason: error.to_string(), want_full: false };
                if tx.send(SyncRequest { kind: Some(sync_request::Kind::Nack(nack)) }).await.is_err() {
                    return Err(StreamEnd::Failed("stream closed".into()));
                }
                continue;
            }
        };
        let current = state.load();
        if !update.ended_sessions.is_empty() {
            if let Some(report) = report {
                report.ended_elsewhere(&update.ended_sessions);
            }
        }
        // Only news of ended sessions: nothing to apply.
        if update.upserts.is_empty() && update.removals.is_empty() && update.version == update.base_version {
            if current.as_ref().is_some_and(|c| c.version == update.version) {
                let ack = sync_request::Kind::Ack(Ack { version: update.version.clone() });
                if tx.send(SyncRequest { kind: Some(ack) }).await.is_err() {
                    return Err(StreamEnd::Failed("stream closed".into()));
                }
            }
            continue;
        }
        let reply = match apply(current.as_deref(), &update, sealer) {
            Ok(snapshot) => {
                tracing::info!(
                    version = %snapshot.version,
                    full = update.base_version.is_empty(),
                    upserts = update.upserts.len(),
                    removals = update.removals.len(),
                    from = %update.control_plane_id,
                    "snapshot applied"
                );
                let snapshot = Arc::new(snapshot);
                if let Some(cache) = cache {
                    let (cache, snapshot) = (cache.clone(), snapshot.clone());
                    let saved = tokio::task::spawn_blocking(move || cache.save(&snapshot)).await;
                    if let Ok(Err(error)) = saved {
                        tracing::warn!(%error, "cannot write the snapshot cache");
                    }
                }
                state.store_arc(snapshot.clone());
                state.applied();
                if let Some(report) = report {
                    // Recycles and restarts this update caused are reported before its Ack, so
                    // a control plane that sees the Ack knows what this data plane did.
                    report.applied(&snapshot);
                    if !send_status(report, &tx, &reported).await {
                        return Err(StreamEnd::Failed("stream closed".into()));
                    }
                }
                sync_request::Kind::Ack(Ack { version: update.version.clone() })
            }
            Err(rejection) => {
                tracing::warn!(version = %update.version, reason = %rejection.reason, "snapshot update rejected; keeping the current version");
                state.set_stale(rejection.reason.clone());
                sync_request::Kind::Nack(Nack {
                    version: update.version.clone(),
                    reason: rejection.reason,
                    want_full: rejection.want_full,
                })
            }
        };
        if tx.send(SyncRequest { kind: Some(reply) }).await.is_err() {
            return Err(StreamEnd::Failed("stream closed".into()));
        }
    }
}

/// Sends the observer's status when it differs from the one last sent; `false` when the
/// stream is closed. The lock keeps the reporter and the apply path from interleaving.
async fn send_status(report: &Report, tx: &mpsc::Sender<SyncRequest>, reported: &tokio::sync::Mutex<Status>) -> bool {
    let mut last = reported.lock().await;
    let now = report.status();
    if now == *last {
        return true;
    }
    if tx.send(SyncRequest { kind: Some(sync_request::Kind::Status(now.clone())) }).await.is_err() {
        return false;
    }
    *last = now;
    true
}

/// Aborts a task when dropped: the status reporter ends with its stream, a listen stream's
/// producer with its client.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
