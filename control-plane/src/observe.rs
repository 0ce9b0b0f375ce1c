//! What the control plane shows of itself and of the fleet: its metrics (snapshots, connected
//! data planes and their lag, admin writes, audit ingest), and the live activity feed.
//!
//! The feed is made of the audit records data planes ship: each stored batch becomes
//! activity events, broadcast to `GET /api/observability/ws` viewers and kept (the last
//! [`RECENT`]) for `GET /api/observability/snapshot`. Broadcasting never waits: a viewer that
//! falls [`FEED_CAPACITY`] events behind loses the oldest and is told how many.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use reflow_common::telemetry::metrics::{Counter, Family, Histogram, Registry, DURATION_BUCKETS};
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use utoipa::ToSchema;

use crate::store::DataPlaneStatus;

/// Events a viewer may fall behind before it loses the oldest.
pub const FEED_CAPACITY: usize = 1024;

/// Recent events kept for the snapshot endpoint.
pub const RECENT: usize = 1000;

/// The window error rates are computed over.
pub const ERROR_WINDOW: Duration = Duration::from_secs(300);

/// One MCP request as the feed shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ActivityEvent {
    /// Always `request`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub at: chrono::DateTime<chrono::Utc>,
    pub data_plane: String,
    pub user_id: Option<String>,
    pub method: String,
    pub target: Option<String>,
    /// The tool, prompt or resource.
    pub tool: Option<String>,
    pub duration_ms: u64,
    /// The HTTP status answered.
    pub status: u16,
    pub outcome: String,
    pub decision: String,
    pub error_code: Option<i64>,
    pub trace_id: Option<String>,
    pub session_id: Option<String>,
}

impl ActivityEvent {
    pub fn from_record(record: &reflow_proto::audit::AuditRecord) -> ActivityEvent {
        ActivityEvent {
            kind: "request",
            at: record.at,
            data_plane: record.data_plane.clone(),
            user_id: record.user_id.clone(),
            method: record.method.clone(),
            target: record.target.clone(),
            tool: record.name.clone(),
            duration_ms: record.duration_ms,
            status: record.status,
            outcome: record.outcome.clone(),
            decision: record.decision.clone(),
            error_code: record.error_code,
            trace_id: record.trace_id.clone(),
            session_id: record.session_id.clone(),
        }
    }

    fn failed(&self) -> bool {
        !matches!(self.outcome.as_str(), "answered" | "client_gone")
    }
}

/// The live feed.
#[derive(Debug)]
pub struct Feed {
    events: broadcast::Sender<Arc<str>>,
    recent: Mutex<VecDeque<Arc<ActivityEvent>>>,
    dropped: AtomicU64,
}

impl Default for Feed {
    fn default() -> Self {
        Feed { events: broadcast::channel(FEED_CAPACITY).0, recent: Mutex::default(), dropped: AtomicU64::new(0) }
    }
}

impl Feed {
    /// Publishes `events` to every viewer, without waiting for any.
    pub fn publish(&self, events: Vec<ActivityEvent>) {
        let viewers = self.events.receiver_count() > 0;
        let mut recent = self.recent.lock().unwrap();
        for event in events {
            if viewers {
                let text: Arc<str> = serde_json::to_string(&event).expect("an event serialises").into();
                let _ = self.events.send(text);
            }
            recent.push_back(Arc::new(event));
            if recent.len() > RECENT {
                recent.pop_front();
            }
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.events.subscribe()
    }

    pub fn viewers(&self) -> usize {
        self.events.receiver_count()
    }

    /// A viewer lost `n` events.
    pub fn lost(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The newest `n` events, newest first.
    pub fn recent(&self, n: usize) -> Vec<Arc<ActivityEvent>> {
        self.recent.lock().unwrap().iter().rev().take(n).cloned().collect()
    }

    /// Requests and failures within [`ERROR_WINDOW`], overall and by target.
    pub fn error_rates(&self) -> ErrorRates {
        let since = chrono::Utc::now() - chrono::Duration::from_std(ERROR_WINDOW).unwrap_or_default();
        let mut rates = ErrorRates { window_seconds: ERROR_WINDOW.as_secs(), ..Default::default() };
        for event in self.recent.lock().unwrap().iter().filter(|e| e.at >= since) {
            let failed = u64::from(event.failed());
            rates.overall.add(failed);
            if let Some(target) = &event.target {
                rates.by_target.entry(target.clone()).or_default().add(failed);
            }
        }
        rates
    }
}

#[derive(Debug, Default, Clone, Serialize, ToSchema)]
pub struct Rate {
    pub requests: u64,
    pub errors: u64,
    /// errors / requests; 0 without requests.
    pub ratio: f64,
}

impl Rate {
    fn add(&mut self, failed: u64) {
        self.requests += 1;
        self.errors += failed;
        self.ratio = self.errors as f64 / self.requests as f64;
    }
}

/// Error rates over the recent requests this replica received.
#[derive(Debug, Default, Clone, Serialize, ToSchema)]
pub struct ErrorRates {
    pub window_seconds: u64,
    pub overall: Rate,
    pub by_target: std::collections::BTreeMap<String, Rate>,
}

/// The control plane's metric families and the feed.
pub struct Observe {
    pub registry: Arc<Registry>,
    compiles: Arc<Family<Counter>>,
    compile_duration: Arc<Family<Histogram>>,
    admin_writes: Arc<Family<Histogram>>,
    audit_ingested: Arc<Family<Counter>>,
    pub feed: Feed,
    /// The streams of the data planes connected to this replica, by stream number.
    planes: Mutex<HashMap<u64, watch::Receiver<DataPlaneStatus>>>,
    next_stream: AtomicU64,
    /// The current snapshot's version, its sequence number here and when it was published.
    published: Mutex<(String, u64, SystemTime)>,
}

impl std::fmt::Debug for Observe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observe").field("registry", &self.registry).finish_non_exhaustive()
    }
}

impl Observe {
    pub fn new() -> Arc<Observe> {
        let registry = Arc::new(Registry::default());
        let r = &registry;
        let observe = Arc::new(Observe {
            compiles: r.counter("reflow.snapshot.compiles_total", "Snapshot compilations, by result.", &["result"]),
            compile_duration: r.histogram(
                "reflow.snapshot.compile.duration",
                "Time to load the state and compile a snapshot.",
                &[],
                DURATION_BUCKETS,
            ),
            admin_writes: r.histogram(
                "reflow.admin.write.duration",
                "Admin API writes, by method, route and status class.",
                &["method", "route", "status"],
                DURATION_BUCKETS,
            ),
            audit_ingested: r.counter(
                "reflow.audit.ingested_records_total",
                "Audit records stored from data planes (duplicates not counted).",
                &[],
            ),
            feed: Feed::default(),
            planes: Mutex::default(),
            next_stream: AtomicU64::new(0),
            published: Mutex::new((String::new(), 0, SystemTime::now())),
            registry: registry.clone(),
        });
        let version = r.gauge(
            "reflow.snapshot.version",
            "How many snapshot versions this replica has published (versions are content hashes: see reflow_snapshot_info).",
            &[],
        );
        let info =
            r.gauge("reflow.snapshot.info", "The snapshot version served (1 for the current one).", &["version"]);
        let connected = r.gauge("reflow.data_planes.connected", "Data planes connected to this replica.", &[]);
        let behind = r.gauge(
            "reflow.data_planes.behind",
            "Connected data planes that have not acknowledged the current snapshot.",
            &[],
        );
        let lag = r.gauge(
            "reflow.data_plane.lag_seconds",
            "How long a connected data plane has not acknowledged the current snapshot (0 when current).",
            &["node_id"],
        );
        let backlog =
            r.gauge("reflow.audit.backlog_bytes", "Audit bytes waiting in the spools of connected data planes.", &[]);
        let viewers = r.gauge("reflow.feed.viewers", "Live activity feed viewers.", &[]);
        let dropped = r.counter("reflow.feed.dropped_events_total", "Feed events slow viewers lost.", &[]);
        let weak = Arc::downgrade(&observe);
        registry.on_collect(Box::new(move || {
            let Some(observe) = weak.upgrade() else { return };
            let (current, sequence, published_at) = observe.published.lock().unwrap().clone();
            version.with(&[]).set(sequence as f64);
            info.clear();
            if !current.is_empty() {
                info.with(&[&current]).set(1.0);
            }
            let planes = observe.connected();
            connected.with(&[]).set(planes.len() as f64);
            let mut lagging = 0;
            lag.clear();
            let mut spooled = 0u64;
            for plane in &planes {
                let current_here = plane.acked_version.as_deref() == Some(current.as_str());
                let seconds = if current_here || current.is_empty() {
                    0.0
                } else {
                    let connected_at = SystemTime::from(plane.connected_since);
                    let from = published_at.max(connected_at);
                    from.elapsed().unwrap_or_default().as_secs_f64()
                };
                lagging += usize::from(!current_here && !current.is_empty());
                lag.with(&[&plane.node_id]).set(seconds);
                spooled += plane.report.audit_spool_bytes;
            }
            behind.with(&[]).set(lagging as f64);
            backlog.with(&[]).set(spooled as f64);
            viewers.with(&[]).set(observe.feed.viewers() as f64);
            dropped.with(&[]).set(observe.feed.dropped());
        }));
        observe
    }

    /// A compilation took `seconds`; `result` is `published`, `unchanged` or `failed`.
    pub fn compiled(&self, result: &str, seconds: f64) {
        self.compiles.with(&[result]).add(1);
        self.compile_duration.with(&[]).observe(seconds);
    }

    /// `version` is the current snapshot.
    pub fn published(&self, version: &str) {
        let mut published = self.published.lock().unwrap();
        if published.0 != version {
            *published = (version.to_string(), published.1 + 1, SystemTime::now());
        }
    }

    pub fn admin_write(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.admin_writes.with(&[method, route, class]).observe(seconds);
    }

    /// Records stored from a data plane: counted and shown on the feed.
    pub fn ingested(&self, stored: u64, records: &[reflow_proto::audit::AuditRecord]) {
        self.audit_ingested.with(&[]).add(stored);
        if stored > 0 {
            self.feed.publish(records.iter().map(ActivityEvent::from_record).collect());
        }
    }

    /// Follows a data plane's stream until it ends (the returned guard is dropped).
    pub fn follow(self: &Arc<Self>, status: watch::Receiver<DataPlaneStatus>) -> Following {
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.planes.lock().unwrap().insert(stream, status);
        Following { observe: self.clone(), stream }
    }

    /// The data planes connected to this replica, as they last reported.
    pub fn connected(&self) -> Vec<DataPlaneStatus> {
        let planes = self.planes.lock().unwrap();
        let mut all: Vec<DataPlaneStatus> =
            planes.values().map(|status| status.borrow().clone()).filter(|s| s.connected).collect();
        all.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        all
    }
}

/// Removes a data plane's stream from [`Observe`] when dropped.
#[derive(Debug)]
pub struct Following {
    observe: Arc<Observe>,
    stream: u64,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.observe.planes.lock().unwrap().remove(&self.stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64) -> reflow_proto::audit::AuditRecord {
        let mut record = reflow_proto::audit::AuditRecord::new(
            format!("{i:032x}"),
            "dp".into(),
            chrono::Utc::now(),
            "/mcp".into(),
            "tools/call".into(),
        );
        record.target = Some(if i.is_multiple_of(4) { "flaky" } else { "steady" }.into());
        record.outcome = if i.is_multiple_of(4) { "upstream_failed" } else { "answered" }.into();
        record
    }

    #[test]
    fn a_viewer_that_never_reads_holds_a_bounded_backlog_and_learns_what_it_lost() {
        let observe = Observe::new();
        let mut stalled = observe.feed.subscribe();
        for i in 0..10_000 {
            observe.ingested(1, &[record(i)]);
        }
        // The channel is a ring of FEED_CAPACITY slots: the viewer is told what it lost, and no
        // more than the capacity is left waiting for it.
        match stalled.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(missed)) => assert_eq!(missed, 10_000 - FEED_CAPACITY as u64),
            other => panic!("expected a lag: {other:?}"),
        }
        assert_eq!(stalled.len(), FEED_CAPACITY, "no more than the capacity waits for it");
        // What is left is the newest events, in order.
        let first: serde_json::Value = serde_json::from_str(&stalled.try_recv().unwrap()).unwrap();
        assert_eq!(first["type"], "request");
        assert_eq!(observe.feed.recent(usize::MAX).len(), RECENT);

        let rates = observe.feed.error_rates();
        assert_eq!(rates.overall.requests, RECENT as u64);
        assert_eq!(rates.by_target["flaky"].errors, rates.by_target["flaky"].requests);
        assert_eq!(rates.by_target["steady"].errors, 0);
        let text = observe.registry.prometheus();
        assert!(text.contains("reflow_audit_ingested_records_total 10000\n"), "{text}");
        assert!(text.contains("reflow_feed_viewers 1\n"), "{text}");
    }
}
