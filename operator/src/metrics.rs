//! The operator's metrics (Prometheus text at `/metrics` of its health port).

use std::sync::Arc;
use std::time::Duration;

use reflow_common::telemetry::metrics::{Counter, Family, Gauge, Histogram, Registry, DURATION_BUCKETS};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    reconciles: Arc<Family<Counter>>,
    reconcile_duration: Arc<Family<Histogram>>,
    ended: Arc<Family<Counter>>,
    leader: Arc<Family<Gauge>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Arc::new(Registry::default());
        Metrics {
            reconciles: registry.counter(
                "reflow_operator_reconciles_total",
                "MCPInstance reconciles, by result.",
                &["result"],
            ),
            reconcile_duration: registry.histogram(
                "reflow_operator_reconcile_duration",
                "How long one reconcile of an MCPInstance took.",
                &[],
                DURATION_BUCKETS,
            ),
            ended: registry.counter(
                "reflow_operator_instances_ended_total",
                "Instances the operator deleted, by why: Idle (past the idle TTL) or Expired (past the max lifetime).",
                &["reason"],
            ),
            leader: registry.gauge("reflow_operator_leader", "1 while this replica holds the leader lease.", &[]),
            registry,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.with(&["ok"]).add(1);
        self.reconcile_duration.with(&[]).observe(took.as_secs_f64());
    }

    pub fn reconcile_failed(&self) {
        self.reconciles.with(&["error"]).add(1);
    }

    pub fn ended(&self, reason: &str) {
        self.ended.with(&[reason]).add(1);
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.with(&[]).set(if leader { 1.0 } else { 0.0 });
    }
}
