//! The current snapshot, swapped atomically: a request takes one `Arc` at its start and
//! sees that version throughout, never a mix of two.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::snapshot::DataSnapshot;

#[derive(Debug, Default)]
pub struct SnapshotState {
    current: ArcSwapOption<DataSnapshot>,
}

impl SnapshotState {
    pub fn new() -> Arc<Self> {
        Arc::new(SnapshotState::default())
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
    }
}
