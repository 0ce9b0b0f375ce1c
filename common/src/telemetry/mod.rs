//! Telemetry both planes share: the metrics registry ([`metrics`]), W3C trace context and
//! spans ([`trace`]), and the OTLP exporter that pushes them to a collector.
//!
//! The export is written here on the published OTLP protobufs (`opentelemetry-proto`) rather
//! than through the OpenTelemetry SDK: the data plane's spans are assembled from the finished
//! request record with ids chosen when the request arrived (so upstream calls carry them
//! before any span ends), metrics come from the one registry that also answers Prometheus
//! scrapes (the SDK has no maintained Prometheus exporter), and the exporter must never
//! wait on the request path: spans enter a bounded queue with `try_send`, and what does not
//! fit, or cannot be sent within `telemetry.export_timeout`, is counted as dropped.

pub mod metrics;
pub mod trace;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::metrics::v1::{ResourceMetrics, ScopeMetrics};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, OtlpProtocol, TelemetryConfig};

/// Spans waiting for export; more are dropped (and counted). A span's client-given parts are
/// cut to the audit record's limits first, so this bounds the queue's bytes too.
pub const SPAN_QUEUE: usize = 2048;

/// The most spans in one export.
pub const MAX_EXPORT_BATCH: usize = 512;

/// How long a span waits for its batch to fill.
const SPAN_FLUSH: Duration = Duration::from_secs(1);

pub fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Where and how a process exports.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    /// With its scheme: `http://` (plain) or `https://`.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub service_name: String,
    /// The node or replica id.
    pub instance: String,
    /// `data-plane` or `control-plane`.
    pub role: &'static str,
    pub sample_ratio: f64,
    pub interval: Duration,
    pub timeout: Duration,
    /// The CA (PEM) the collector's certificate must chain to; unset: the public web roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl ExportSettings {
    /// `None` when `telemetry.enabled` is false. A plain-text endpoint is an opt-in, logged.
    /// Fails (naming the key) when `telemetry.ca` cannot be read.
    pub fn from_config(
        config: &TelemetryConfig,
        role: &'static str,
        instance: &str,
    ) -> Result<Option<ExportSettings>, ConfigError> {
        if !config.enabled {
            return Ok(None);
        }
        let ca_pem = match &config.ca {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| ConfigError::new("telemetry.ca", format!("cannot read {path}: {e}")))?,
            ),
            None => None,
        };
        let endpoint = config.endpoint.trim().trim_end_matches('/');
        let endpoint = if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
            endpoint.to_string()
        } else if config.insecure {
            format!("http://{endpoint}")
        } else {
            format!("https://{endpoint}")
        };
        if endpoint.starts_with("http://") {
            tracing::warn!(%endpoint, "telemetry is exported without TLS (telemetry.insecure or an http:// endpoint)");
        }
        Ok(Some(ExportSettings {
            endpoint,
            protocol: config.protocol,
            service_name: config.service_name.clone(),
            instance: instance.to_string(),
            role,
            sample_ratio: config.sample_ratio,
            interval: config.export_interval,
            timeout: config.export_timeout,
            ca_pem,
        }))
    }
}

/// What the exporter has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct ExportCounts {
    pub spans_exported: AtomicU64,
    /// Spans that did not fit the queue or whose export failed.
    pub spans_dropped: AtomicU64,
    pub export_failures: AtomicU64,
}

/// Takes finished spans without waiting and pushes them, and the registry's metrics, to the
/// collector from a task of its own.
#[derive(Debug)]
pub struct Exporter {
    spans: mpsc::Sender<trace::Span>,
    sample_ratio: f64,
    pub counts: Arc<ExportCounts>,
}

// One per exporter, built once: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Client {
    Grpc {
        traces: TraceServiceClient<tonic::transport::Channel>,
        metrics: MetricsServiceClient<tonic::transport::Channel>,
    },
    Http {
        http: reqwest::Client,
        traces: String,
        metrics: String,
    },
}

impl Exporter {
    /// Starts exporting to `settings.endpoint` until `shutdown` (then sends what is queued, once;
    /// the handle ends after that). Must run inside a Tokio runtime. Fails naming the key.
    pub fn start(
        settings: ExportSettings,
        registry: Arc<metrics::Registry>,
        shutdown: CancellationToken,
    ) -> Result<(Arc<Exporter>, tokio::task::JoinHandle<()>), ConfigError> {
        let endpoint_error = |e: &dyn std::fmt::Display| ConfigError::new("telemetry.endpoint", e.to_string());
        let client = match settings.protocol {
            OtlpProtocol::Grpc => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(settings.endpoint.clone())
                    .map_err(|e| endpoint_error(&e))?
                    .connect_timeout(settings.timeout)
                    .timeout(settings.timeout);
                if settings.endpoint.starts_with("https://") {
                    let tls = match &settings.ca_pem {
                        Some(pem) => tonic::transport::ClientTlsConfig::new()
                            .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
                        None => tonic::transport::ClientTlsConfig::new().with_webpki_roots(),
                    };
                    endpoint = endpoint.tls_config(tls).map_err(|e| endpoint_error(&e))?;
                }
                let channel = endpoint.connect_lazy();
                Client::Grpc {
                    traces: TraceServiceClient::new(channel.clone()),
                    metrics: MetricsServiceClient::new(channel),
                }
            }
            OtlpProtocol::Http => Client::Http {
                http: {
                    let mut builder =
                        reqwest::Client::builder().timeout(settings.timeout).connect_timeout(settings.timeout);
                    if let Some(pem) = &settings.ca_pem {
                        let ca = reqwest::Certificate::from_pem(pem)
                            .map_err(|e| ConfigError::new("telemetry.ca", e.to_string()))?;
                        builder = builder.tls_built_in_root_certs(false).add_root_certificate(ca);
                    }
                    builder.build().map_err(|e| ConfigError::new("telemetry.ca", e.to_string()))?
                },
                traces: format!("{}/v1/traces", settings.endpoint),
                metrics: format!("{}/v1/metrics", settings.endpoint),
            },
        };
        let (tx, rx) = mpsc::channel(SPAN_QUEUE);
        let exporter = Arc::new(Exporter { spans: tx, sample_ratio: settings.sample_ratio, counts: Arc::default() });
        let counts = exporter.counts.clone();
        let running = tokio::spawn(run(settings, client, registry, rx, counts, shutdown));
        Ok((exporter, running))
    }

    /// Queues finished spans, made by `spans` only when the queue has room for `n` of them;
    /// what does not fit is dropped and counted (a collector that is away costs a check).
    pub fn record(&self, n: usize, spans: impl FnOnce() -> Vec<trace::Span>) {
        if self.spans.capacity() < n {
            self.counts.spans_dropped.fetch_add(n as u64, Ordering::Relaxed);
            return;
        }
        for span in spans() {
            if self.spans.try_send(span).is_err() {
                self.counts.spans_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether a trace started here is sampled.
    pub fn sample(&self) -> bool {
        self.sample_ratio >= 1.0 || rand::random::<f64>() < self.sample_ratio
    }
}

fn resource(settings: &ExportSettings) -> Resource {
    let attributes = [
        ("service.name", settings.service_name.as_str()),
        ("service.instance.id", settings.instance.as_str()),
        ("service.version", env!("CARGO_PKG_VERSION")),
        ("service.namespace", "reflow"),
        ("reflow.role", settings.role),
    ];
    Resource {
        attributes: attributes.iter().map(|(k, v)| trace::key_value(k, &trace::Value::from(*v))).collect(),
        ..Default::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope { name: "reflow".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() }
}

async fn run(
    settings: ExportSettings,
    mut client: Client,
    registry: Arc<metrics::Registry>,
    mut spans: mpsc::Receiver<trace::Span>,
    counts: Arc<ExportCounts>,
    shutdown: CancellationToken,
) {
    let started = unix_nanos(SystemTime::now());
    let resource = resource(&settings);
    let mut metrics_tick = tokio::time::interval(settings.interval);
    metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<trace::Span> = Vec::with_capacity(MAX_EXPORT_BATCH);
    let mut warned = None::<std::time::Instant>;
    let mut failed = |counts: &ExportCounts, what: &str, error: String| {
        counts.export_failures.fetch_add(1, Ordering::Relaxed);
        // Once a minute is enough while the collector stays away.
        if warned.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
            tracing::warn!(endpoint = %settings.endpoint, %error, "telemetry {what} could not be exported");
            warned = Some(std::time::Instant::now());
        }
    };
    loop {
        let (send_spans, send_metrics, stopping) = tokio::select! {
            _ = shutdown.cancelled() => (true, true, true),
            n = spans.recv_many(&mut batch, MAX_EXPORT_BATCH) => {
                if n == 0 {
                    (true, true, true)
                } else if batch.len() >= MAX_EXPORT_BATCH {
                    (true, false, false)
                } else {
                    // Wait a little for more, without holding a span longer than SPAN_FLUSH.
                    let deadline = tokio::time::sleep(SPAN_FLUSH);
                    tokio::pin!(deadline);
                    loop {
                        let room = MAX_EXPORT_BATCH - batch.len();
                        tokio::select! {
                            () = &mut deadline => break,
                            n = spans.recv_many(&mut batch, room) => {
                                if n == 0 || batch.len() >= MAX_EXPORT_BATCH { break }
                            }
                        }
                    }
                    (true, false, false)
                }
            }
            _ = metrics_tick.tick() => (false, true, false),
        };
        if stopping {
            while let Ok(span) = spans.try_recv() {
                batch.push(span);
            }
        }
        if send_spans && !batch.is_empty() {
            let n = batch.len() as u64;
            let request = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(resource.clone()),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(scope()),
                        spans: batch.drain(..).map(|span| span.to_otlp()).collect(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            let sent = match &mut client {
                Client::Grpc { traces, .. } => {
                    traces.export(request).await.map(|_| ()).map_err(|status| status.message().to_string())
                }
                Client::Http { http, traces, .. } => post(http, traces, request.encode_to_vec()).await,
            };
            match sent {
                Ok(()) => counts.spans_exported.fetch_add(n, Ordering::Relaxed),
                Err(error) => {
                    failed(&counts, "spans", error);
                    counts.spans_dropped.fetch_add(n, Ordering::Relaxed)
                }
            };
        }
        if send_metrics {
            let request = ExportMetricsServiceRequest {
                resource_metrics: vec![ResourceMetrics {
                    resource: Some(resource.clone()),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(scope()),
                        metrics: registry.otlp(started),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            let sent = match &mut client {
                Client::Grpc { metrics, .. } => {
                    metrics.export(request).await.map(|_| ()).map_err(|status| status.message().to_string())
                }
                Client::Http { http, metrics, .. } => post(http, metrics, request.encode_to_vec()).await,
            };
            if let Err(error) = sent {
                failed(&counts, "metrics", error);
            }
        }
        if stopping {
            return;
        }
    }
}

async fn post(http: &reqwest::Client, url: &str, body: Vec<u8>) -> Result<(), String> {
    let response = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("the collector answered {}", response.status()))
    }
}
