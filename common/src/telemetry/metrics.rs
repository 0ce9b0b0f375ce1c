//! Counters, gauges and histograms in families with fixed label names and a bounded number
//! of series, rendered in the Prometheus text format for scrapes and as OTLP for pushes.
//!
//! One registry serves both so a scrape and a push never disagree. A family holds at most
//! [`MAX_SERIES`] label sets: past that, new ones are counted in a single overflow series
//! whose every label is [`OVERFLOW`], so no client can grow memory or a dashboard's cardinality
//! by sending new names.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1 as otlp;

/// The most label sets one family keeps.
pub const MAX_SERIES: usize = 1000;

/// The value of every label of the overflow series.
pub const OVERFLOW: &str = "_other";

/// Histogram bounds for request durations, in seconds (the semantic conventions' advice).
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 300.0,
];

/// Histogram bounds for session lifetimes, in seconds.
pub const SESSION_BUCKETS: &[f64] = &[1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0];

/// What a family's series hold.
pub trait Cell: Send + Sync + 'static {
    const KIND: &'static str;
    fn new(buckets: &'static [f64]) -> Self;
}

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// For a count kept elsewhere (read when collected): it only ever grows there.
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Cell for Counter {
    const KIND: &'static str = "counter";
    fn new(_: &'static [f64]) -> Self {
        Counter::default()
    }
}

/// A gauge, kept in millionths so fractional values (seconds) fit an atomic integer.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, value: f64) {
        self.0.store((value * 1e6).round() as i64, Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 / 1e6
    }
}

impl Cell for Gauge {
    const KIND: &'static str = "gauge";
    fn new(_: &'static [f64]) -> Self {
        Gauge::default()
    }
}

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), the last one above every bound.
    counts: Box<[AtomicU64]>,
    /// The sum in microseconds (durations are what these measure).
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        let bucket = self.bounds.iter().position(|bound| seconds <= *bound).unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn sum(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    fn buckets(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }
}

impl Cell for Histogram {
    const KIND: &'static str = "histogram";
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }
}

type Labels = Box<[Box<str>]>;

/// Series by the hash of their label values (the values are compared on a hit).
type Series<C> = HashMap<u64, Vec<(Labels, Arc<C>)>>;

/// A metric and its series, one per label set.
pub struct Family<C: Cell> {
    /// The OpenTelemetry name (`mcp.requests.total`); Prometheus's is derived from it.
    name: &'static str,
    help: &'static str,
    /// `s` for durations, `1` otherwise.
    unit: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
    series: RwLock<Series<C>>,
    count: AtomicU64,
    overflow: Arc<C>,
}

impl<C: Cell> std::fmt::Debug for Family<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family").field("name", &self.name).field("series", &self.series_count()).finish()
    }
}

fn hash_labels(values: &[&str]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    values.hash(&mut hasher);
    hasher.finish()
}

impl<C: Cell> Family<C> {
    /// The series for `values` (one per label name, in order); the overflow series once the
    /// family holds [`MAX_SERIES`].
    pub fn with(&self, values: &[&str]) -> Arc<C> {
        debug_assert_eq!(values.len(), self.labels.len(), "{}: label values", self.name);
        let hash = hash_labels(values);
        let same = |labels: &Labels| labels.iter().map(AsRef::as_ref).eq(values.iter().copied());
        if let Some(found) = self.series.read().unwrap().get(&hash).and_then(|v| v.iter().find(|(l, _)| same(l))) {
            return found.1.clone();
        }
        let mut series = self.series.write().unwrap();
        if let Some(found) = series.get(&hash).and_then(|v| v.iter().find(|(l, _)| same(l))) {
            return found.1.clone();
        }
        if self.count.load(Ordering::Relaxed) as usize >= MAX_SERIES {
            return self.overflow.clone();
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let cell = Arc::new(C::new(self.buckets));
        let labels: Labels = values.iter().map(|v| Box::<str>::from(*v)).collect();
        series.entry(hash).or_default().push((labels, cell.clone()));
        cell
    }

    /// Label sets held (the overflow series not counted).
    pub fn series_count(&self) -> usize {
        self.count.load(Ordering::Relaxed) as usize
    }

    /// Drops every series: for gauges rebuilt whole at each collection.
    pub fn clear(&self) {
        self.series.write().unwrap().clear();
        self.count.store(0, Ordering::Relaxed);
    }

    /// The Prometheus name: dots become underscores, and durations say their unit.
    pub fn prometheus_name(&self) -> String {
        let base = self.name.replace('.', "_");
        if self.unit == "s" && !base.ends_with("_seconds") {
            format!("{base}_seconds")
        } else {
            base
        }
    }

    fn each(&self, mut f: impl FnMut(&[Box<str>], &C)) {
        let series = self.series.read().unwrap();
        let mut all: Vec<&(Labels, Arc<C>)> = series.values().flatten().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        for (labels, cell) in all {
            f(labels, cell);
        }
        if self.count.load(Ordering::Relaxed) as usize >= MAX_SERIES {
            let overflow: Vec<Box<str>> = self.labels.iter().map(|_| Box::<str>::from(OVERFLOW)).collect();
            f(&overflow, &self.overflow);
        }
    }
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn label_text(names: &[&str], values: &[Box<str>], extra: Option<(&str, &str)>) -> String {
    let mut pairs: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(name, value)| format!("{}=\"{}\"", name.replace('.', "_"), escape(value)))
        .collect();
    if let Some((name, value)) = extra {
        pairs.push(format!("{name}=\"{value}\""));
    }
    if pairs.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", pairs.join(","))
    }
}

fn attributes(names: &[&str], values: &[Box<str>]) -> Vec<KeyValue> {
    names
        .iter()
        .zip(values)
        .map(|(name, value)| KeyValue {
            key: (*name).to_string(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_string())) }),
        })
        .collect()
}

/// What the registry collects: any family, whatever its cells.
trait Collect: Send + Sync {
    fn prometheus(&self, out: &mut String);
    fn otlp(&self, start: u64, now: u64) -> otlp::Metric;
}

impl<C: Cell> Family<C> {
    /// A counter's or gauge's text: a line per series (a counter without labels shows 0 before
    /// its first count).
    fn scalar_text(&self, out: &mut String, value: impl Fn(&C) -> String) {
        let name = self.prometheus_name();
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {}", self.help, C::KIND);
        if C::KIND == "counter" && self.labels.is_empty() && self.series_count() == 0 {
            let _ = writeln!(out, "{name} 0");
        }
        self.each(|labels, cell| {
            let _ = writeln!(out, "{name}{} {}", label_text(self.labels, labels, None), value(cell));
        });
    }

    fn number_points(
        &self,
        start: u64,
        now: u64,
        value: impl Fn(&C) -> otlp::number_data_point::Value,
    ) -> Vec<otlp::NumberDataPoint> {
        let mut points = Vec::new();
        self.each(|labels, cell| {
            points.push(otlp::NumberDataPoint {
                attributes: attributes(self.labels, labels),
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(value(cell)),
                ..Default::default()
            });
        });
        points
    }
}

impl Collect for Family<Counter> {
    fn prometheus(&self, out: &mut String) {
        self.scalar_text(out, |cell| cell.get().to_string());
    }

    fn otlp(&self, start: u64, now: u64) -> otlp::Metric {
        let points = self.number_points(start, now, |cell| otlp::number_data_point::Value::AsInt(cell.get() as i64));
        metric(
            self,
            otlp::metric::Data::Sum(otlp::Sum {
                data_points: points,
                aggregation_temporality: otlp::AggregationTemporality::Cumulative as i32,
                is_monotonic: true,
            }),
        )
    }
}

impl Collect for Family<Gauge> {
    fn prometheus(&self, out: &mut String) {
        self.scalar_text(out, |cell| cell.get().to_string());
    }

    fn otlp(&self, _start: u64, now: u64) -> otlp::Metric {
        let points = self.number_points(0, now, |cell| otlp::number_data_point::Value::AsDouble(cell.get()));
        metric(self, otlp::metric::Data::Gauge(otlp::Gauge { data_points: points }))
    }
}

impl Collect for Family<Histogram> {
    fn prometheus(&self, out: &mut String) {
        let name = self.prometheus_name();
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", self.help);
        self.each(|labels, cell| {
            let mut cumulative = 0;
            let counts = cell.buckets();
            for (i, count) in counts.iter().enumerate() {
                cumulative += count;
                let le = self.buckets.get(i).map_or_else(|| "+Inf".to_string(), f64::to_string);
                let _ =
                    writeln!(out, "{name}_bucket{} {cumulative}", label_text(self.labels, labels, Some(("le", &le))));
            }
            let text = label_text(self.labels, labels, None);
            let _ = writeln!(out, "{name}_sum{text} {}\n{name}_count{text} {cumulative}", cell.sum());
        });
    }

    fn otlp(&self, start: u64, now: u64) -> otlp::Metric {
        let mut points = Vec::new();
        self.each(|labels, cell| {
            let counts = cell.buckets();
            points.push(otlp::HistogramDataPoint {
                attributes: attributes(self.labels, labels),
                start_time_unix_nano: start,
                time_unix_nano: now,
                count: counts.iter().sum(),
                sum: Some(cell.sum()),
                bucket_counts: counts,
                explicit_bounds: self.buckets.to_vec(),
                ..Default::default()
            });
        });
        metric(
            self,
            otlp::metric::Data::Histogram(otlp::Histogram {
                data_points: points,
                aggregation_temporality: otlp::AggregationTemporality::Cumulative as i32,
            }),
        )
    }
}

fn metric<C: Cell>(family: &Family<C>, data: otlp::metric::Data) -> otlp::Metric {
    otlp::Metric {
        name: family.name.to_string(),
        description: family.help.to_string(),
        unit: family.unit.to_string(),
        data: Some(data),
        ..Default::default()
    }
}

/// Brings gauges (and counts kept elsewhere) up to date just before a collection.
pub type Refresh = Box<dyn Fn() + Send + Sync>;

/// Every family of one process.
#[derive(Default)]
pub struct Registry {
    families: Mutex<Vec<Arc<dyn Collect>>>,
    refresh: Mutex<Vec<Refresh>>,
    /// One collection at a time: a refresh rebuilding a gauge whole never meets another's render.
    collecting: Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("families", &self.families.lock().unwrap().len()).finish()
    }
}

impl Registry {
    fn family<C: Cell>(
        &self,
        name: &'static str,
        help: &'static str,
        unit: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Arc<Family<C>>
    where
        Family<C>: Collect,
    {
        let family = Arc::new(Family {
            name,
            help,
            unit,
            labels,
            buckets,
            series: RwLock::default(),
            count: AtomicU64::new(0),
            overflow: Arc::new(C::new(buckets)),
        });
        self.families.lock().unwrap().push(family.clone());
        family
    }

    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Arc<Family<Counter>> {
        self.family(name, help, "1", labels, &[])
    }

    pub fn gauge(&self, name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Arc<Family<Gauge>> {
        self.family(name, help, "1", labels, &[])
    }

    /// A histogram of durations in seconds.
    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Arc<Family<Histogram>> {
        self.family(name, help, "s", labels, buckets)
    }

    /// Runs `refresh` before every collection.
    pub fn on_collect(&self, refresh: Refresh) {
        self.refresh.lock().unwrap().push(refresh);
    }

    fn refreshed(&self) -> Vec<Arc<dyn Collect>> {
        for refresh in self.refresh.lock().unwrap().iter() {
            refresh();
        }
        self.families.lock().unwrap().clone()
    }

    /// Every family in the Prometheus text format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let _one = self.collecting.lock().unwrap();
        let mut out = String::with_capacity(16 * 1024);
        for family in self.refreshed() {
            family.prometheus(&mut out);
        }
        out
    }

    /// Every family as OTLP metrics, cumulative since `start` (Unix nanoseconds).
    pub fn otlp(&self, start: u64) -> Vec<otlp::Metric> {
        let _one = self.collecting.lock().unwrap();
        let now = crate::telemetry::unix_nanos(std::time::SystemTime::now());
        self.refreshed().iter().map(|family| family.otlp(start, now)).collect()
    }
}

/// `GET /metrics` over `registries`, in order (one process may hold both planes').
pub fn router(registries: Vec<Arc<Registry>>) -> axum::Router {
    let registries = Arc::new(registries);
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registries = registries.clone();
            async move {
                let text: String = registries.iter().map(|r| r.prometheus()).collect();
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_and_overflow() {
        let registry = Registry::default();
        let calls = registry.counter("mcp.tool.calls.total", "Tool calls.", &["target", "tool"]);
        let duration = registry.histogram("mcp.request.duration", "Durations.", &["method"], &[0.1, 1.0]);
        calls.with(&["a", "x\"y"]).add(2);
        calls.with(&["a", "x\"y"]).add(1);
        duration.with(&["tools/call"]).observe(0.05);
        duration.with(&["tools/call"]).observe(0.5);
        duration.with(&["tools/call"]).observe(5.0);
        let text = registry.prometheus();
        assert!(text.contains("# TYPE mcp_tool_calls_total counter\n"), "{text}");
        assert!(text.contains("mcp_tool_calls_total{target=\"a\",tool=\"x\\\"y\"} 3\n"), "{text}");
        assert!(text.contains("mcp_request_duration_seconds_bucket{method=\"tools/call\",le=\"0.1\"} 1\n"), "{text}");
        assert!(text.contains("mcp_request_duration_seconds_bucket{method=\"tools/call\",le=\"1\"} 2\n"), "{text}");
        assert!(text.contains("mcp_request_duration_seconds_bucket{method=\"tools/call\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("mcp_request_duration_seconds_count{method=\"tools/call\"} 3\n"), "{text}");

        for i in 0..MAX_SERIES + 50 {
            calls.with(&["b", &format!("tool-{i}")]).add(1);
        }
        assert_eq!(calls.series_count(), MAX_SERIES);
        let text = registry.prometheus();
        assert!(text.contains("mcp_tool_calls_total{target=\"_other\",tool=\"_other\"} 51\n"), "overflow series");

        let metrics = registry.otlp(1);
        let sum = metrics.iter().find(|m| m.name == "mcp.tool.calls.total").unwrap();
        let Some(otlp::metric::Data::Sum(sum)) = &sum.data else { panic!("a sum") };
        assert_eq!(sum.data_points.len(), MAX_SERIES + 1);
        assert!(sum.is_monotonic);
    }
}
