//! The current snapshot, swapped atomically: a request takes one `Arc` at its start and
//! sees that version throughout, never a mix of two.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use crate::snapshot::DataSnapshot;

#[derive(Debug)]
pub struct SnapshotState {
    current: ArcSwapOption<DataSnapshot>,
    /// Tells watchers (the gateway's list-change notifier) that a new snapshot is active.
    changed: watch::Sender<u64>,
    /// How the stream to the control plane is doing, for `/ready` and `/metrics`.
    health: Mutex<SyncHealth>,
}

/// The data plane's view of its stream: connected or not, and whether it is stale (connected,
/// but the control plane's snapshot cannot be applied, so what is served lags what was decided).
#[derive(Debug, Clone, Default)]
pub struct SyncHealth {
    pub connected: bool,
    /// Since when, and why, the latest snapshot could not be applied.
    pub stale: Option<(SystemTime, String)>,
    /// Updates rejected since start.
    pub rejections: u64,
    /// When the snapshot served now was stored (from the control plane or the cache).
    pub stored_at: Option<SystemTime>,
}

impl SnapshotState {
    pub fn new() -> Arc<Self> {
        Arc::new(SnapshotState {
            current: ArcSwapOption::empty(),
            changed: watch::Sender::new(0),
            health: Mutex::new(SyncHealth::default()),
        })
    }

    pub fn health(&self) -> SyncHealth {
        self.health.lock().unwrap().clone()
    }

    pub fn set_connected(&self, connected: bool) {
        self.health.lock().unwrap().connected = connected;
    }

    /// The control plane's snapshot could not be applied: stale from now (or from the first
    /// such failure) until one applies.
    pub fn set_stale(&self, reason: String) {
        let mut health = self.health.lock().unwrap();
        health.rejections += 1;
        let since = health.stale.as_ref().map_or_else(SystemTime::now, |(since, _)| *since);
        health.stale = Some((since, reason));
    }

    /// The snapshot to serve from, or `None` before the first one is accepted.
    pub fn load(&self) -> Option<Arc<DataSnapshot>> {
        self.current.load_full()
    }

    pub fn version(&self) -> Option<String> {
        self.current.load().as_ref().map(|s| s.version.clone())
    }

    pub fn store(&self, snapshot: DataSnapshot) {
        self.store_arc(Arc::new(snapshot));
    }

    pub fn store_arc(&self, snapshot: Arc<DataSnapshot>) {
        self.current.store(Some(snapshot));
        self.health.lock().unwrap().stored_at = Some(SystemTime::now());
        self.changed.send_modify(|n| *n += 1);
    }

    /// A snapshot from the control plane was applied: no longer stale.
    pub fn applied(&self) {
        self.health.lock().unwrap().stale = None;
    }

    /// A receiver that wakes after each swap.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
