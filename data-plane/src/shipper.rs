//! Ships the audit spool to the control plane: the oldest batch first, over
//! `SnapshotService.ShipAudit` on a connection of its own, removed from the spool once the
//! control plane answers that it stored it. A batch the control plane cannot take now (down,
//! unreachable, its database away) waits and is sent again with backoff; one it refuses as
//! invalid is set aside with the reason, since sending it again would be refused again. A resend
//! after a lost answer stores nothing twice: records carry ids.

use std::sync::Arc;
use std::time::Duration;

use reflow_proto::snapshot::v1::snapshot_service_client::SnapshotServiceClient;
use reflow_proto::snapshot::v1::AuditBatch;
use tokio_util::sync::CancellationToken;

use crate::spool::Spool;
use crate::sync::SyncConfig;

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// Ships until `shutdown`; `pushed` is notified when a batch enters the spool.
pub async fn run(config: SyncConfig, spool: Arc<Spool>, pushed: Arc<tokio::sync::Notify>, shutdown: CancellationToken) {
    let mut client: Option<SnapshotServiceClient<tonic::transport::Channel>> = None;
    let mut backoff = BACKOFF_START;
    while !shutdown.is_cancelled() {
        let next = match spool.oldest() {
            Ok(next) => next,
            Err(error) => {
                tracing::error!(%error, "cannot read the audit spool");
                None
            }
        };
        let Some((seq, records)) = next else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = pushed.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        let count = records.len();
        // A batch goes out under the data plane that wrote it (a restart may bring another
        // node id; the spool it left is still shipped as its own).
        let writer = records
            .first()
            .and_then(|r| serde_json::from_slice::<reflow_proto::audit::AuditRecord>(r).ok())
            .map_or_else(|| config.node_id.clone(), |r| r.data_plane);
        match ship(&config, &writer, &mut client, records).await {
            Ok((stored, duplicates)) => {
                tracing::debug!(seq, stored, duplicates, "audit batch stored by the control plane");
                if let Err(error) = spool.ack(seq) {
                    tracing::error!(%error, "cannot remove a shipped batch from the audit spool");
                }
                backoff = BACKOFF_START;
                continue;
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                tracing::error!(seq, records = count, reason = %status.message(), "the control plane refused an audit batch as invalid; set aside");
                spool.set_aside(seq);
                continue;
            }
            Err(status) => {
                tracing::warn!(seq, code = ?status.code(), reason = %status.message(), "audit batch not shipped; it waits in the spool");
                client = None;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

async fn ship(
    config: &SyncConfig,
    node_id: &str,
    client: &mut Option<SnapshotServiceClient<tonic::transport::Channel>>,
    records: Vec<Vec<u8>>,
) -> Result<(u64, u64), tonic::Status> {
    if client.is_none() {
        let endpoint = crate::sync::endpoint(config).map_err(tonic::Status::unavailable)?;
        let channel =
            endpoint.connect().await.map_err(|e| tonic::Status::unavailable(format!("cannot connect: {e}")))?;
        *client = Some(SnapshotServiceClient::new(channel));
    }
    let client = client.as_mut().expect("connected above");
    let mut request = tonic::Request::new(AuditBatch { node_id: node_id.to_string(), records });
    request.set_timeout(Duration::from_secs(30));
    let bearer = format!("Bearer {}", config.token)
        .parse()
        .map_err(|_| tonic::Status::unauthenticated("the token is not valid header text"))?;
    request.metadata_mut().insert("authorization", bearer);
    let ack = client.ship_audit(request).await?.into_inner();
    Ok((ack.stored, ack.duplicates))
}
