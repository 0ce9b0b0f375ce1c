//! Telemetry through the real gateway: spans received by an OTLP collector (a gRPC service
//! built on the published OpenTelemetry protobufs) with the client's trace id, which the
//! upstream (the Python SDK's server) receives too; `/metrics` parsed as Prometheus text,
//! counting exactly and staying bounded with 1,000 users; every metric the shipped dashboards
//! and alerts query; and the live feed over a WebSocket, with a viewer that never reads.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use reflow_common::config::{OtlpProtocol, TelemetryConfig};
use reflow_common::crypto::to_hex as hex;
use reflow_common::telemetry::ExportSettings;
use reflow_data_plane::mcp::McpSettings;
use reflow_e2e::client::McpClient;
use reflow_e2e::harness::{python_server, workspace, Gateway};
use serde_json::{json, Value};

/// What the collector received.
#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    metric_names: Arc<Mutex<BTreeSet<String>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource.resource.as_ref().and_then(|r| {
                r.attributes.iter().find(|a| a.key == "service.name").and_then(|a| text(a.value.as_ref()))
            });
            assert_eq!(service.as_deref(), Some("reflow-e2e"), "the resource names the service");
            spans.extend(resource.scope_spans.into_iter().flat_map(|s| s.spans));
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut names = self.metric_names.lock().unwrap();
        for resource in request.into_inner().resource_metrics {
            names.extend(resource.scope_metrics.into_iter().flat_map(|s| s.metrics).map(|m| m.name));
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> Option<String> {
    match value?.value.as_ref()? {
        any_value::Value::StringValue(text) => Some(text.clone()),
        any_value::Value::IntValue(n) => Some(n.to_string()),
        _ => None,
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| text(a.value.as_ref()))
}

async fn collector() -> (Collector, String) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .add_service(MetricsServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    (collector, address)
}

fn export_to(endpoint: &str) -> ExportSettings {
    let config = TelemetryConfig {
        enabled: true,
        endpoint: endpoint.to_string(),
        protocol: OtlpProtocol::Grpc,
        service_name: "reflow-e2e".into(),
        export_interval: Duration::from_secs(1),
        ..TelemetryConfig::default()
    };
    ExportSettings::from_config(&config, "data-plane", "e2e").unwrap().unwrap()
}

/// The spans of trace `trace_id` once there are at least `n`.
async fn spans_of(collector: &Collector, trace_id: &str, n: usize) -> Vec<Span> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let spans: Vec<Span> =
            collector.spans.lock().unwrap().iter().filter(|s| hex(&s.trace_id) == trace_id).cloned().collect();
        if spans.len() >= n || Instant::now() > deadline {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `body` on the client's session with a `traceparent` header.
async fn traced(client: &McpClient, body: &Value, traceparent: &str) -> reflow_e2e::client::Answer {
    let request = client
        .post()
        .header("content-type", "application/json")
        .header("traceparent", traceparent)
        .body(body.to_string());
    McpClient::read(request).await.unwrap()
}

fn tool_text(reply: &Value) -> Value {
    let text = reply["result"]["content"][0]["text"].as_str().unwrap_or_else(|| panic!("a text result: {reply}"));
    serde_json::from_str(text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_traced_from_the_client_through_the_gateway_to_the_upstream() {
    let (collector, endpoint) = collector().await;
    let gateway = Gateway::start_exporting(McpSettings::default(), export_to(&endpoint), false).await.unwrap();
    let upstream = python_server("headers_server.py", &[]).await.unwrap();
    let target = gateway.target("hdr", "streamable-http", &upstream.url).await.unwrap();
    gateway.target("other", "streamable-http", &upstream.url).await.unwrap();
    let policy = gateway.allow_everyone().await.unwrap();
    let mut client = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    client.initialize().await.unwrap();
    let session = client.session.clone().unwrap();

    // The client's context in the traceparent header.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let body = json!({"jsonrpc": "2.0", "id": "call-1", "method": "tools/call",
                      "params": {"name": "hdr_headers", "arguments": {}}});
    let answer = traced(&client, &body, &format!("00-{trace}-{parent}-01")).await;
    let received = tool_text(answer.message());
    let upstream_parent = received["traceparent"].as_str().expect("the upstream received a traceparent").to_string();
    assert!(upstream_parent.starts_with(&format!("00-{trace}-")), "the same trace id upstream: {upstream_parent}");

    let spans = spans_of(&collector, trace, 2).await;
    assert_eq!(spans.len(), 2, "a server span and its upstream child: {spans:#?}");
    let server = spans.iter().find(|s| s.kind == SpanKind::Server as i32).expect("a server span");
    let client_span = spans.iter().find(|s| s.kind == SpanKind::Client as i32).expect("a client span");
    assert_eq!(server.name, "tools/call headers");
    assert_eq!(hex(&server.parent_span_id), parent, "the server span continues the client's");
    assert_eq!(client_span.parent_span_id, server.span_id, "the upstream call is the server span's child");
    assert_eq!(server.flags & 0x301, 0x301, "sampled, with a remote parent");
    assert_eq!(client_span.flags & 0x301, 0x101, "sampled, with a local parent");
    assert_eq!(
        upstream_parent,
        format!("00-{trace}-{}-01", hex(&client_span.span_id)),
        "upstream sees the client span"
    );
    for (key, value) in [
        ("mcp.method.name", "tools/call"),
        ("gen_ai.tool.name", "headers"),
        ("gen_ai.operation.name", "execute_tool"),
        ("jsonrpc.request.id", "call-1"),
        // A travelling session id is named by its nonce, the same on every replica.
        ("mcp.session.id", reflow_data_plane::mcp::ticket::nonce_of(&session).unwrap_or(&session)),
        ("mcp.protocol.version", "2025-11-25"),
        ("reflow.target", "hdr"),
        ("reflow.decision", "allowed"),
        ("reflow.policy.id", policy.as_str()),
        ("reflow.policy.name", "everyone"),
        ("reflow.outcome", "answered"),
    ] {
        assert_eq!(attribute(server, key).as_deref(), Some(value), "server span {key}: {server:#?}");
    }
    assert_eq!(attribute(server, "error.type"), None);
    assert_eq!(attribute(client_span, "mcp.method.name").as_deref(), Some("tools/call"));
    assert_eq!(attribute(client_span, "reflow.target").as_deref(), Some("hdr"));
    assert!(server.start_time_unix_nano <= client_span.start_time_unix_nano);
    assert!(client_span.end_time_unix_nano <= server.end_time_unix_nano);

    // The context in params._meta instead; arguments are no attribute without the target's opt-in.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let parent = "b7ad6b7169203331";
    let body = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                      "params": {"name": "hdr_meta", "arguments": {},
                                 "_meta": {"traceparent": format!("00-{trace}-{parent}-01"), "progressToken": "p-1"}}});
    let answer = client.send(body.to_string()).await.unwrap();
    let meta = tool_text(answer.message());
    let upstream_parent = meta["traceparent"].as_str().expect("the upstream's _meta carries the trace").to_string();
    assert!(upstream_parent.starts_with(&format!("00-{trace}-")), "{meta}");
    // (The SDK hands the server its own spelling of the progress token.)
    assert_eq!(meta["progress_token"], "p-1", "the client's own _meta is kept: {meta}");
    let spans = spans_of(&collector, trace, 2).await;
    let server = spans.iter().find(|s| s.kind == SpanKind::Server as i32).expect("a server span");
    assert_eq!(hex(&server.parent_span_id), parent);
    assert_eq!(attribute(server, "jsonrpc.request.id").as_deref(), Some("2"));
    assert_eq!(attribute(server, "gen_ai.tool.call.arguments"), None);

    // A target that opts in to arguments has them (masked) on its spans, as in its audit records.
    gateway
        .admin(reqwest::Method::PUT, &format!("/api/targets/{target}"), Some(json!({"audit_arguments": true})))
        .await
        .unwrap();
    let trace = "1af7651916cd43dd8448eb211c80319d";
    let body = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                      "params": {"name": "hdr_add", "arguments": {"a": 1, "b": 2, "api_key": "sk-canary-1234"}}});
    let answer = traced(&client, &body, &format!("00-{trace}-{parent}-01")).await;
    assert!(answer.message().get("result").is_some(), "{:?}", answer.messages);
    let spans = spans_of(&collector, trace, 2).await;
    let server = spans.iter().find(|s| s.kind == SpanKind::Server as i32).expect("a server span");
    let arguments = attribute(server, "gen_ai.tool.call.arguments").expect("opted-in arguments");
    assert!(arguments.contains("\"a\":1") && !arguments.contains("sk-canary"), "{arguments}");

    // A fan-out: one client span per target asked.
    let trace = "2af7651916cd43dd8448eb211c80319e";
    let body = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/list", "params": {}});
    let answer = traced(&client, &body, &format!("00-{trace}-{parent}-01")).await;
    assert!(answer.message()["result"]["tools"].as_array().is_some_and(|t| t.len() == 6), "{:?}", answer.messages);
    let spans = spans_of(&collector, trace, 3).await;
    let legs: BTreeSet<String> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .filter_map(|s| attribute(s, "reflow.target"))
        .collect();
    assert_eq!(legs, BTreeSet::from(["hdr".to_string(), "other".to_string()]), "{spans:#?}");

    // A request without a context starts a trace of its own (sample_ratio 1), and the
    // metrics reach the collector too.
    let before = collector.spans.lock().unwrap().len();
    client.call("hdr_add", json!({"a": 2, "b": 3})).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while collector.spans.lock().unwrap().len() < before + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let spans = collector.spans.lock().unwrap().clone();
    let own = spans[before..].iter().find(|s| s.kind == SpanKind::Server as i32).expect("a new trace");
    assert!(own.parent_span_id.is_empty(), "a root span");
    while !collector.metric_names.lock().unwrap().contains("mcp.tool.calls.total") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let names = collector.metric_names.lock().unwrap().clone();
    for name in
        ["mcp.requests.total", "mcp.tool.calls.total", "mcp.server.operation.duration", "mcp.client.operation.duration"]
    {
        assert!(names.contains(name), "{name} pushed over OTLP: {names:?}");
    }
    gateway.stop().await;
}

/// Samples of `/metrics` by metric name and (sorted) labels.
type Samples = HashMap<(String, Vec<(String, String)>), f64>;

fn samples(text: &str) -> Samples {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    scrape
        .samples
        .into_iter()
        .filter_map(|sample| {
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let mut labels: Vec<(String, String)> =
                sample.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            labels.sort();
            Some(((sample.metric, labels), value))
        })
        .collect()
}

/// Whether `/metrics` has any sample of `metric` (a zero is only a zero when it does).
fn exists(samples: &Samples, metric: &str) -> bool {
    samples.keys().any(|(name, _)| name == metric)
}

fn value(samples: &Samples, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let mut labels: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    labels.sort();
    samples.get(&(metric.to_string(), labels)).copied().unwrap_or(0.0)
}

/// Label sets of a family whose name starts with `prefix`, as the text has them.
fn series(text: &str, prefix: &str) -> usize {
    text.lines().filter(|l| !l.starts_with('#') && l.starts_with(prefix)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_call_exactly_and_stay_bounded_with_a_thousand_users() {
    let gateway = Gateway::start().await.unwrap();
    let upstream = python_server("headers_server.py", &[]).await.unwrap();
    gateway.target("hdr", "streamable-http", &upstream.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let url = format!("{}/mcp", gateway.mcp);
    let mut client = McpClient::new(&url, &gateway.admin_token);
    client.initialize().await.unwrap();

    let call = [("target", "hdr"), ("method", "tools/call"), ("decision", "allowed"), ("outcome", "answered")];
    let tool = [("target", "hdr"), ("tool", "add"), ("decision", "allowed"), ("outcome", "answered")];
    let upstream_ok = [("target", "hdr"), ("method", "tools/call"), ("outcome", "ok")];
    let duration = [("target", "hdr"), ("method", "tools/call"), ("outcome", "answered")];
    let before = samples(&gateway.metrics().await.unwrap());
    const CALLS: u64 = 37;
    for i in 0..CALLS {
        let reply = client.call("hdr_add", json!({"a": i, "b": 1})).await.unwrap();
        assert!(reply.get("result").is_some(), "{reply}");
    }
    // One the gateway answers itself: a target that does not exist.
    let ghost = client.call("ghost_tool", json!({})).await.unwrap();
    assert!(ghost.get("error").is_some(), "{ghost}");
    let after = samples(&gateway.metrics().await.unwrap());
    let moved = |metric: &str, labels: &[(&str, &str)]| value(&after, metric, labels) - value(&before, metric, labels);
    assert_eq!(moved("mcp_requests_total", &call), CALLS as f64);
    assert_eq!(moved("mcp_tool_calls_total", &tool), CALLS as f64);
    assert_eq!(moved("mcp_upstream_requests_total", &upstream_ok), CALLS as f64);
    assert_eq!(moved("mcp_request_duration_seconds_count", &duration), CALLS as f64);
    assert_eq!(moved("mcp_authz_decisions_total", &[("target", "hdr"), ("decision", "allowed")]), CALLS as f64);
    let unknown = [("target", ""), ("method", "tools/call"), ("decision", "none"), ("outcome", "error")];
    assert_eq!(moved("mcp_requests_total", &unknown), 1.0, "an unknown target is no label");
    let tool_calls_before = value(&after, "mcp_tool_calls_total", &tool);
    assert_eq!(value(&after, "mcp_sessions_active", &[]), 1.0);

    // 1,000 users, each with a session and a call: the series do not grow with them.
    let text = gateway.metrics().await.unwrap();
    let families =
        ["mcp_requests_total", "mcp_tool_calls_total", "mcp_request_duration_seconds_bucket", "mcp_server_operation"];
    let counts: Vec<usize> = families.iter().map(|f| series(&text, f)).collect();
    let keys = reflow_control_plane::auth::JwtKeys::new(
        b"e2e-jwt-secret-e2e-jwt-secret-e2e!",
        Duration::from_secs(3600),
        "reflow",
        "reflow",
    );
    let before = gateway.control_plane().hub().current().map(|s| s.version.clone());
    let mut tokens = Vec::new();
    let mut ids = Vec::new();
    for i in 0..1000 {
        let user = gateway
            .control_plane()
            .store()
            .create_user(reflow_control_plane::store::NewUser {
                email: format!("user-{i}@example.com"),
                password_hash: "unused".into(),
                role: "user".into(),
                groups: Vec::new(),
                active: true,
            })
            .await
            .unwrap();
        ids.push(user.id.to_string());
        tokens.push(keys.issue(&user).0);
    }
    gateway.control_plane().hub().changed();
    gateway.settled(before).await.unwrap();
    let calls = futures::stream::iter(tokens.iter().map(|token| {
        let url = url.clone();
        async move {
            let mut client = McpClient::new(&url, token);
            client.initialize().await.unwrap();
            let reply = client.call("hdr_add", json!({"a": 1, "b": 1})).await.unwrap();
            assert!(reply.get("result").is_some(), "{reply}");
            client.delete().await.unwrap();
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<()>>();
    calls.await;
    let text = gateway.metrics().await.unwrap();
    let now = samples(&text);
    assert_eq!(value(&now, "mcp_tool_calls_total", &tool) - tool_calls_before, 1000.0, "every user's call counted");
    for (family, count) in families.iter().zip(counts) {
        assert_eq!(series(&text, family), count, "{family}: no series per user");
    }
    for id in &ids {
        assert!(!text.contains(id.as_str()), "a user id in /metrics");
    }
    assert!(value(&now, "mcp_server_session_duration_seconds_count", &[]) >= 1000.0, "ended sessions observed");
    gateway.stop().await;
}

/// The metric names a PromQL expression (or any text) refers to.
fn metric_names(expression: &str) -> BTreeSet<String> {
    const LABELS: [&str; 1] = ["mcp_method_name"];
    let mut names = BTreeSet::new();
    let bytes = expression.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
            && (expression[i..].starts_with("mcp_") || expression[i..].starts_with("reflow_"));
        if starts {
            let end = expression[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expression.len(), |n| i + n);
            let name = &expression[i..end];
            if !LABELS.contains(&name) {
                names.insert(name.to_string());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

fn queried(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query" | "definition", Value::String(text)) => out.push(text.clone()),
                    _ => queried(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| queried(item, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboards_and_alerts_query_exists() {
    let gateway = Gateway::start_audited(McpSettings::default()).await.unwrap();
    let text = gateway.metrics().await.unwrap();
    let exposed: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .flat_map(|l| {
            let mut parts = l.split(' ');
            let name = parts.next().unwrap_or_default().to_string();
            match parts.next() {
                Some("histogram") => vec![format!("{name}_bucket"), format!("{name}_sum"), format!("{name}_count")],
                _ => vec![name],
            }
        })
        .collect();
    let dir = workspace().join("deploy/observability");
    let mut checked = 0;
    let dashboards = std::fs::read_dir(dir.join("grafana/dashboards")).unwrap();
    let mut files: Vec<_> = dashboards.map(|entry| entry.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 4, "overview, targets, users, control plane: {files:?}");
    for path in &files {
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut expressions = Vec::new();
        queried(&dashboard, &mut expressions);
        for name in expressions.iter().flat_map(|e| metric_names(e)) {
            assert!(exposed.contains(&name), "{} queries {name}, which /metrics does not have", path.display());
            checked += 1;
        }
    }
    let alerts: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("prometheus/alerts.yml")).unwrap()).unwrap();
    let alerts: Value = serde_json::to_value(alerts).unwrap();
    let rules = alerts["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap().clone());
    let mut alert_count = 0;
    for rule in rules {
        alert_count += 1;
        for name in metric_names(rule["expr"].as_str().unwrap()) {
            assert!(exposed.contains(&name), "alert {} queries {name}, which /metrics does not have", rule["alert"]);
            checked += 1;
        }
    }
    assert!(alert_count >= 10 && checked >= 100, "{alert_count} alerts, {checked} references");
    gateway.stop().await;
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn viewer(gateway: &Gateway, token: &str) -> Result<Socket, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}/api/observability/ws", gateway.api.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(error) => panic!("{error}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_feed_shows_every_call_within_a_second_beside_a_viewer_that_never_reads() {
    let gateway = Gateway::start_audited(McpSettings::default()).await.unwrap();
    let upstream = python_server("headers_server.py", &[]).await.unwrap();
    gateway.target("hdr", "streamable-http", &upstream.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let (user_id, user_token) = gateway.user("viewer@example.com").await.unwrap();
    assert_eq!(viewer(&gateway, &user_token).await.err(), Some(403), "admins only");
    let mut watching = viewer(&gateway, &gateway.admin_token).await.unwrap();
    // Connected and never read.
    let _stalled = viewer(&gateway, &gateway.admin_token).await.unwrap();

    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = watching.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                    let event: Value = serde_json::from_str(&text).unwrap();
                    if let Some(trace) = event["trace_id"].as_str() {
                        seen.lock().unwrap().insert(trace.to_string(), Instant::now());
                    }
                }
            }
            let _ = watching.close(None).await;
        })
    };
    let mut client = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    client.initialize().await.unwrap();
    let mut done = Vec::new();
    for i in 0..100u32 {
        let trace = format!("{:032x}", 0xfeed_0000_u128 + u128::from(i));
        let body = json!({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": "hdr_add", "arguments": {"a": i, "b": 1}}});
        let answer = traced(&client, &body, &format!("00-{trace}-00f067aa0ba902b7-01")).await;
        assert!(answer.message().get("result").is_some(), "{:?}", answer.messages);
        done.push((trace, Instant::now()));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.lock().unwrap().len() < 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().unwrap().clone();
    for (trace, answered) in &done {
        let at = seen.get(trace).unwrap_or_else(|| panic!("call {trace} never reached the feed"));
        let delay = at.saturating_duration_since(*answered);
        assert!(delay < Duration::from_secs(1), "call {trace} reached the feed after {delay:?}");
    }

    let snapshot = gateway.get("/api/observability/snapshot").await.unwrap();
    let recent = snapshot["recent_requests"].as_array().unwrap();
    assert_eq!(recent.len(), 100, "the newest hundred");
    assert!(recent.iter().all(|e| e["method"] == "tools/call" && e["target"] == "hdr" && e["outcome"] == "answered"));
    assert!(snapshot["error_rates"]["by_target"]["hdr"]["requests"].as_u64() >= Some(100), "{snapshot}");
    assert_eq!(snapshot["error_rates"]["by_target"]["hdr"]["errors"], 0);
    assert_eq!(snapshot["feed_viewers"], 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snapshot = gateway.get("/api/observability/snapshot").await.unwrap();
        let plane = snapshot["data_planes"].as_array().unwrap().iter().find(|p| p["node_id"] == "e2e").cloned();
        if plane.as_ref().is_some_and(|p| p["sessions"] == 1 && p["connected"] == true) {
            break;
        }
        assert!(Instant::now() < deadline, "the data plane's sessions: {snapshot}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = samples(&gateway.metrics().await.unwrap());
    assert_eq!(value(&metrics, "reflow_feed_viewers", &[]), 2.0);
    assert!(value(&metrics, "reflow_audit_ingested_records_total", &[]) >= 101.0);
    assert_eq!(value(&metrics, "reflow_data_planes_connected", &[]), 1.0);
    assert!(exists(&metrics, "reflow_data_planes_behind"));
    assert_eq!(value(&metrics, "reflow_data_planes_behind", &[]), 0.0);
    let created = [("method", "POST"), ("route", "/api/targets"), ("status", "2xx")];
    assert_eq!(value(&metrics, "reflow_admin_write_duration_seconds_count", &created), 1.0, "the target created");
    assert!(value(&metrics, "reflow_snapshot_compiles_total", &[("result", "published")]) >= 2.0);

    // An admin who is demoted stops watching (the token is checked again while connected).
    let users = format!("/api/users/{user_id}");
    gateway.admin(reqwest::Method::PUT, &users, Some(json!({"role": "admin"}))).await.unwrap();
    let mut demoted = viewer(&gateway, &user_token).await.expect("an admin now");
    gateway.admin(reqwest::Method::PUT, &users, Some(json!({"role": "user"}))).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match demoted.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => return frame.map(|f| f.code),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("the feed ends for a demoted viewer");
    assert_eq!(ended, Some(tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Policy));
    reader.abort();
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_loses_spans_not_calls() {
    // Connections are taken and held; nothing is ever answered.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", hole.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = hole.accept().await {
            connections.push(connection);
        }
    });
    let export = reflow_e2e::harness::otlp_settings(&endpoint, "e2e");
    let gateway = Gateway::start_exporting(McpSettings::default(), export, false).await.unwrap();
    let upstream = python_server("headers_server.py", &[]).await.unwrap();
    gateway.target("hdr", "streamable-http", &upstream.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let mut client = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    client.initialize().await.unwrap();
    for i in 0..50 {
        let reply = client.call("hdr_add", json!({"a": i, "b": 1})).await.unwrap();
        assert!(reply.get("result").is_some(), "{reply}");
    }
    // The exports time out (telemetry.export_timeout: 1s) and their spans are counted as lost.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = samples(&gateway.metrics().await.unwrap());
        let (dropped, failures) = (
            value(&metrics, "reflow_telemetry_spans_dropped_total", &[]),
            value(&metrics, "reflow_telemetry_export_failures_total", &[]),
        );
        assert!(exists(&metrics, "reflow_telemetry_spans_exported_total"));
        assert_eq!(value(&metrics, "reflow_telemetry_spans_exported_total", &[]), 0.0);
        if dropped >= 100.0 && failures >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "dropped {dropped}, failures {failures}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    held.abort();
    gateway.stop().await;
}

/// An OTLP/HTTP collector (protobuf bodies on `/v1/traces` and `/v1/metrics`).
async fn http_collector() -> (Collector, String) {
    use axum::body::Bytes;
    use prost::Message as _;
    let collector = Collector::default();
    let (spans, names) = (collector.spans.clone(), collector.metric_names.clone());
    let router = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| async move {
                assert_eq!(headers["content-type"], "application/x-protobuf");
                let request = ExportTraceServiceRequest::decode(body).unwrap();
                let received = request.resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans);
                spans.lock().unwrap().extend(received);
                ExportTraceServiceResponse::default().encode_to_vec()
            }),
        )
        .route(
            "/v1/metrics",
            axum::routing::post(move |body: Bytes| async move {
                let request = ExportMetricsServiceRequest::decode(body).unwrap();
                let received =
                    request.resource_metrics.into_iter().flat_map(|r| r.scope_metrics).flat_map(|s| s.metrics);
                names.lock().unwrap().extend(received.map(|m| m.name));
                ExportMetricsServiceResponse::default().encode_to_vec()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (collector, address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_also_travel_over_otlp_http() {
    let (collector, endpoint) = http_collector().await;
    let mut export = reflow_e2e::harness::otlp_settings(&endpoint, "e2e");
    export.protocol = OtlpProtocol::Http;
    let gateway = Gateway::start_exporting(McpSettings::default(), export, false).await.unwrap();
    let upstream = python_server("headers_server.py", &[]).await.unwrap();
    gateway.target("hdr", "streamable-http", &upstream.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let mut client = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    client.initialize().await.unwrap();
    let trace = "3af7651916cd43dd8448eb211c80319f";
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "hdr_add", "arguments": {"a": 1, "b": 2}}});
    let answer = traced(&client, &body, &format!("00-{trace}-b7ad6b7169203331-01")).await;
    assert!(answer.message().get("result").is_some(), "{:?}", answer.messages);
    let spans = spans_of(&collector, trace, 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    assert!(spans.iter().any(|s| s.kind == SpanKind::Server as i32 && s.name == "tools/call add"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !collector.metric_names.lock().unwrap().contains("mcp.requests.total") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(collector.metric_names.lock().unwrap().contains("mcp.requests.total"));
    gateway.stop().await;
}
