//! The current snapshot, swapped atomically: a request takes one `Arc` at its start and
//! sees that version throughout, never a mix of two.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use crate::snapshot::DataSnapshot;

#[derive(Debug)]
pub struct SnapshotState {
    current: ArcSwapOption<DataSnapshot>,
    /// Tells watchers (the gateway's list-change notifier) that a new snapshot is active.
    changed: watch::Sender<u64>,
}

impl SnapshotState {
    pub fn new() -> Arc<Self> {
        Arc::new(SnapshotState { current: ArcSwapOption::empty(), changed: watch::Sender::new(0) })
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
        self.changed.send_modify(|n| *n += 1);
    }

    /// A receiver that wakes after each swap.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
