//! What the data plane shows of its traffic: metrics under the original gateway's names and
//! the OpenTelemetry MCP conventions, and a server span per MCP request with a client span
//! per upstream exchange.
//!
//! Both are made from the request's record when its [`crate::audit::Trail`] ends (a few
//! atomic additions, and, for a sampled trace, spans queued for the exporter without
//! waiting), so what `/metrics`, the collector and the audit trail say of a request agree.
//! Labels are bounded: target names from the snapshot, MCP methods from a fixed list, the
//! decision and the outcome; never a user id or an argument. Tool names are labels of the
//! tool-call metrics only, and a family stops taking new label sets at
//! [`reflow_common::telemetry::metrics::MAX_SERIES`].

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use reflow_common::telemetry::metrics::{
    Counter, Family, Gauge, Histogram, Registry, DURATION_BUCKETS, SESSION_BUCKETS,
};
use reflow_common::telemetry::trace::{Kind, Span, SpanContext, Value};
use reflow_common::telemetry::Exporter;
use reflow_proto::audit::AuditRecord;

/// The MCP methods that are labels as themselves; any other is `other`.
const METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "completion/complete",
    "logging/setLevel",
];

/// The longest tool name kept as a label (longer ones are `_long`).
const MAX_TOOL_LABEL: usize = 128;

fn tool_label(name: &str) -> &str {
    if name.len() > MAX_TOOL_LABEL {
        "_long"
    } else {
        name
    }
}

pub fn method_label(method: &str) -> &str {
    METHODS.iter().find(|m| **m == method).copied().unwrap_or("other")
}

/// The data plane's metric families, and the exporter once telemetry is on.
#[derive(Debug)]
pub struct Telemetry {
    pub registry: Arc<Registry>,
    requests: Arc<Family<Counter>>,
    request_duration: Arc<Family<Histogram>>,
    tool_calls: Arc<Family<Counter>>,
    tool_call_duration: Arc<Family<Histogram>>,
    decisions: Arc<Family<Counter>>,
    upstream_requests: Arc<Family<Counter>>,
    upstream_duration: Arc<Family<Histogram>>,
    server_operation: Arc<Family<Histogram>>,
    client_operation: Arc<Family<Histogram>>,
    pub session_duration: Arc<Family<Histogram>>,
    pub sessions_active: Arc<Family<Gauge>>,
    exporter: OnceLock<Arc<Exporter>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

impl Telemetry {
    pub fn new() -> Telemetry {
        let registry = Arc::new(Registry::default());
        let r = &registry;
        Telemetry {
            requests: r.counter(
                "mcp.requests.total",
                "MCP requests by target, method, decision and outcome.",
                &["target", "method", "decision", "outcome"],
            ),
            request_duration: r.histogram(
                "mcp.request.duration",
                "MCP request duration.",
                &["target", "method", "outcome"],
                DURATION_BUCKETS,
            ),
            tool_calls: r.counter("mcp.tool.calls.total", "Tool calls.", &["target", "tool", "decision", "outcome"]),
            tool_call_duration: r.histogram(
                "mcp.tool.call.duration",
                "Tool call duration.",
                &["target", "tool", "outcome"],
                DURATION_BUCKETS,
            ),
            decisions: r.counter(
                "mcp.authz.decisions.total",
                "Policy decisions on routed requests.",
                &["target", "decision"],
            ),
            upstream_requests: r.counter(
                "mcp.upstream.requests.total",
                "Requests sent to upstreams, by outcome (ok, error, timeout, cancelled, failed).",
                &["target", "method", "outcome"],
            ),
            upstream_duration: r.histogram(
                "mcp.upstream.request.duration",
                "Upstream request duration.",
                &["target", "method"],
                DURATION_BUCKETS,
            ),
            server_operation: r.histogram(
                "mcp.server.operation.duration",
                "MCP server operation duration (OpenTelemetry MCP conventions).",
                &["mcp.method.name", "error.type", "target"],
                DURATION_BUCKETS,
            ),
            client_operation: r.histogram(
                "mcp.client.operation.duration",
                "MCP client operation duration toward upstreams (OpenTelemetry MCP conventions).",
                &["mcp.method.name", "error.type", "target"],
                DURATION_BUCKETS,
            ),
            session_duration: r.histogram(
                "mcp.server.session.duration",
                "MCP client session lifetime (OpenTelemetry MCP conventions).",
                &[],
                SESSION_BUCKETS,
            ),
            sessions_active: r.gauge("mcp.sessions.active", "MCP client sessions held.", &[]),
            exporter: OnceLock::new(),
            registry,
        }
    }

    /// Exports spans and metrics through `exporter` (set once, when serving starts).
    pub fn set_exporter(&self, exporter: Arc<Exporter>) {
        let _ = self.exporter.set(exporter);
    }

    pub fn exporter(&self) -> Option<&Arc<Exporter>> {
        self.exporter.get()
    }

    /// A request's trace: continuing the client's (`parent`) or, when exporting, a new one.
    /// Without an exporter the client's context passes through unchanged.
    pub fn trace(&self, parent: Option<SpanContext>) -> Option<Trace> {
        match (self.exporter(), parent) {
            (Some(exporter), parent) => {
                let sampled = parent.map_or_else(|| exporter.sample(), |p| p.sampled);
                let trace_id = parent.map_or_else(reflow_common::telemetry::trace::new_trace_id, |p| p.trace_id);
                let span_id = reflow_common::telemetry::trace::new_span_id();
                Some(Trace {
                    context: SpanContext { trace_id, span_id, sampled },
                    parent: parent.map(|p| p.span_id),
                    own: true,
                })
            }
            (None, Some(parent)) => Some(Trace { context: parent, parent: None, own: false }),
            (None, None) => None,
        }
    }

    /// An upstream exchange ended: `error` is its `error.type` (a JSON-RPC code, `timeout`…).
    pub fn upstream(&self, target: &str, method: &str, seconds: f64, error: Option<&str>) {
        let method = method_label(method);
        let outcome = match error {
            None => "ok",
            Some("timeout") => "timeout",
            Some("cancelled") => "cancelled",
            Some(e) if e.parse::<i64>().is_ok() || e == "tool_error" => "error",
            Some(_) => "failed",
        };
        self.upstream_requests.with(&[target, method, outcome]).add(1);
        self.upstream_duration.with(&[target, method]).observe(seconds);
        self.client_operation.with(&[method, error.unwrap_or(""), target]).observe(seconds);
    }

    /// A request ended with `record`, after `seconds`.
    pub fn finish(&self, record: &AuditRecord, seconds: f64, error_type: Option<&str>) {
        let method = method_label(&record.method);
        let decided = record.decision != "none";
        // A target name is a label only once the route found a real target.
        let target = if decided { record.target.as_deref().unwrap_or("") } else { "" };
        let outcome = record.outcome.as_str();
        self.requests.with(&[target, method, &record.decision, outcome]).add(1);
        self.request_duration.with(&[target, method, outcome]).observe(seconds);
        self.server_operation.with(&[method, error_type.unwrap_or(""), target]).observe(seconds);
        if decided {
            self.decisions.with(&[target, &record.decision]).add(1);
            if method == "tools/call" {
                // Only a caller allowed on the target names the tool: anyone else's names are
                // theirs to invent, and would take the family's label sets.
                let tool = match record.decision.as_str() {
                    "allowed" => tool_label(record.name.as_deref().unwrap_or("")),
                    _ => "_denied",
                };
                self.tool_calls.with(&[target, tool, &record.decision, outcome]).add(1);
                self.tool_call_duration.with(&[target, tool, outcome]).observe(seconds);
            }
        }
    }
}

/// A request's place in a trace.
#[derive(Debug, Clone, Copy)]
pub struct Trace {
    /// The request's own span (or, passing through, the client's).
    pub context: SpanContext,
    /// The client's span, when it sent one and this gateway exports.
    pub parent: Option<[u8; 8]>,
    /// Whether the context is this gateway's (spans may be exported) or the client's.
    pub own: bool,
}

/// An upstream exchange that ended, kept for its client span.
#[derive(Debug)]
pub struct Leg {
    pub span_id: [u8; 8],
    pub target: String,
    pub method: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub transport: &'static str,
    pub error: Option<String>,
}

/// The span name the conventions give: `{method} {tool or prompt}`.
fn span_name(method: &str, name: Option<&str>) -> String {
    match (method, name) {
        ("tools/call" | "prompts/get", Some(name)) => format!("{method} {name}"),
        _ => method.to_string(),
    }
}

/// The server span of a finished request, and a client span per upstream leg.
pub fn spans(
    record: &AuditRecord,
    trace: &Trace,
    start: SystemTime,
    end: SystemTime,
    error_type: Option<&str>,
    request_id: Option<&str>,
    legs: &[Leg],
) -> Vec<Span> {
    let method = record.method.as_str();
    let mut attributes: Vec<(&'static str, Value)> = vec![
        ("mcp.method.name", method.into()),
        ("jsonrpc.protocol.version", "2.0".into()),
        ("network.transport", "tcp".into()),
        ("network.protocol.name", "http".into()),
        ("reflow.outcome", record.outcome.as_str().into()),
        ("reflow.decision", record.decision.as_str().into()),
        ("http.response.status_code", i64::from(record.status).into()),
    ];
    let mut optional = |key: &'static str, value: Option<&str>| {
        if let Some(value) = value {
            attributes.push((key, value.into()));
        }
    };
    let name = record.name.as_deref();
    match method {
        "tools/call" => {
            optional("gen_ai.tool.name", name);
            optional("gen_ai.operation.name", Some("execute_tool"));
        }
        "prompts/get" => optional("gen_ai.prompt.name", name),
        m if m.starts_with("resources/") => optional("mcp.resource.uri", name),
        _ => {}
    }
    optional("jsonrpc.request.id", request_id);
    optional("mcp.session.id", record.session_id.as_deref());
    optional("mcp.protocol.version", record.protocol_version.as_deref());
    optional("error.type", error_type);
    optional("reflow.target", record.target.as_deref());
    optional("reflow.policy.id", record.policy_id.as_deref());
    optional("reflow.policy.name", record.policy_name.as_deref());
    optional("reflow.credential.source", record.credential_source.as_deref());
    optional("reflow.transport", record.transport.as_deref());
    optional("enduser.id", record.user_id.as_deref());
    optional("client.name", record.client_name.as_deref());
    if let Some(code) = record.error_code {
        attributes.push(("rpc.response.status_code", code.to_string().into()));
    }
    // Recorded (masked) only for targets that opted in, as for the audit trail.
    if let Some(arguments) = &record.arguments {
        attributes.push(("gen_ai.tool.call.arguments", arguments.to_string().into()));
    }
    let failed = record.outcome != "answered";
    let mut spans = Vec::with_capacity(1 + legs.len());
    spans.push(Span {
        name: span_name(method, name),
        kind: Kind::Server,
        context: trace.context,
        parent: trace.parent,
        remote_parent: trace.parent.is_some(),
        start,
        end,
        attributes,
        error: failed.then(|| error_type.unwrap_or(&record.outcome).to_string()),
    });
    for leg in legs {
        let mut attributes: Vec<(&'static str, Value)> = vec![
            ("mcp.method.name", leg.method.as_str().into()),
            ("jsonrpc.protocol.version", "2.0".into()),
            ("reflow.target", leg.target.as_str().into()),
            ("network.transport", if leg.transport == "stdio" { "pipe" } else { "tcp" }.into()),
        ];
        if leg.method == "tools/call" {
            if let Some(name) = name {
                attributes.push(("gen_ai.tool.name", name.into()));
            }
        }
        if let Some(error) = &leg.error {
            attributes.push(("error.type", error.as_str().into()));
        }
        let leg_name = if leg.method == method { span_name(method, name) } else { leg.method.clone() };
        spans.push(Span {
            name: leg_name,
            kind: Kind::Client,
            context: SpanContext { span_id: leg.span_id, ..trace.context },
            parent: Some(trace.context.span_id),
            remote_parent: false,
            start: leg.start,
            end: leg.end,
            attributes,
            error: leg.error.clone(),
        });
    }
    spans
}

/// Registers the data plane's state (snapshot, sessions, processes, audit, export) as
/// families read at each collection.
pub fn collect_state(gateway: &Arc<crate::mcp::gateway::Gateway>) {
    let r = &gateway.telemetry.registry;
    let gauge = |name, help| r.gauge(name, help, &[]);
    let counter = |name, help| r.counter(name, help, &[]);
    let loaded = gauge("reflow.snapshot.loaded", "Whether a snapshot is being served.");
    let connected = gauge("reflow.snapshot.connected", "Whether the stream to the control plane is open.");
    let stale =
        gauge("reflow.snapshot.stale", "Whether the control plane's snapshot cannot be applied (the served one lags).");
    let stale_seconds = gauge("reflow.snapshot.stale_seconds", "How long the data plane has been stale.");
    let age = gauge("reflow.snapshot.age_seconds", "Seconds since the snapshot served was stored.");
    let rejections = counter("reflow.snapshot.rejections_total", "Snapshot updates rejected.");
    let sessions = gauge("reflow.sessions", "MCP client sessions held.");
    let processes = gauge("reflow.stdio.processes", "STDIO servers running.");
    let failed_starts =
        counter("reflow.stdio.failed_starts_total", "STDIO server starts that failed, timed out or were abandoned.");
    let refused = counter(
        "reflow.refused_total",
        "MCP requests refused for exceeding a per-identity share (rate, sessions, in flight).",
    );
    let failures = r.counter("reflow.upstream.failures_total", "Failed upstream exchanges by target.", &["target"]);
    let records = counter("reflow.audit.records_total", "Audit records written.");
    let dropped =
        counter("reflow.audit.dropped_total", "Audit records dropped (spool full under drop_oldest, or unreadable).");
    let spool = gauge("reflow.audit.spool_bytes", "Bytes of audit records waiting on disk for the control plane.");
    let refusing = gauge(
        "reflow.audit.refusing",
        "Whether MCP requests are refused because audit records cannot be kept (on_full: refuse).",
    );
    let exported = counter("reflow.telemetry.spans_exported_total", "Spans the collector took.");
    let spans_dropped = counter(
        "reflow.telemetry.spans_dropped_total",
        "Spans dropped: the export queue was full or the collector did not take them in time.",
    );
    let export_failures = counter("reflow.telemetry.export_failures_total", "OTLP exports that failed.");
    let weak = Arc::downgrade(gateway);
    r.on_collect(Box::new(move || {
        let Some(gateway) = weak.upgrade() else { return };
        let health = gateway.state.health();
        let since = |at: SystemTime| at.elapsed().unwrap_or_default().as_secs_f64();
        let snapshot = gateway.state.load();
        loaded.with(&[]).set(f64::from(u8::from(snapshot.is_some())));
        connected.with(&[]).set(f64::from(u8::from(health.connected)));
        stale.with(&[]).set(f64::from(u8::from(health.stale.is_some())));
        stale_seconds.with(&[]).set(health.stale.as_ref().map_or(0.0, |(at, _)| since(*at)));
        age.with(&[]).set(health.stored_at.map_or(0.0, since));
        rejections.with(&[]).set(health.rejections);
        let held = gateway.sessions.len() as f64;
        sessions.with(&[]).set(held);
        gateway.telemetry.sessions_active.with(&[]).set(held);
        processes.with(&[]).set(gateway.pool.instances().len() as f64);
        failed_starts.with(&[]).set(gateway.pool.failed_starts.load(std::sync::atomic::Ordering::Relaxed));
        refused.with(&[]).set(gateway.shares.refused());
        for (id, count) in gateway.health.failures() {
            // By target name, as operators know them; a target no longer in the snapshot by id.
            let targets = snapshot.as_ref().map(|s| &s.view.targets);
            let name = targets.and_then(|t| t.values().find(|t| t.id == id)).map_or(id.as_str(), |t| t.name.as_str());
            failures.with(&[name]).set(count);
        }
        if let Some(recorder) = gateway.audit() {
            let audit = recorder.status();
            records.with(&[]).set(audit.written);
            dropped.with(&[]).set(audit.dropped);
            spool.with(&[]).set(audit.spool_bytes as f64);
            refusing.with(&[]).set(f64::from(u8::from(audit.refusing)));
        }
        if let Some(exporter) = gateway.telemetry.exporter() {
            let counts = &exporter.counts;
            exported.with(&[]).set(counts.spans_exported.load(std::sync::atomic::Ordering::Relaxed));
            spans_dropped.with(&[]).set(counts.spans_dropped.load(std::sync::atomic::Ordering::Relaxed));
            export_failures.with(&[]).set(counts.export_failures.load(std::sync::atomic::Ordering::Relaxed));
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(decision: &str, name: &str) -> AuditRecord {
        let mut record =
            AuditRecord::new(String::new(), String::new(), chrono::Utc::now(), "/mcp".into(), "tools/call".into());
        record.target = Some("db".into());
        record.name = Some(name.into());
        record.decision = decision.into();
        record
    }

    #[test]
    fn only_callers_allowed_on_a_target_name_its_tools_and_methods_are_a_fixed_set() {
        let telemetry = Telemetry::new();
        telemetry.finish(&call("allowed", "query"), 0.01, None);
        for i in 0..50 {
            telemetry.finish(&call("denied", &format!("invented-{i}")), 0.01, None);
        }
        telemetry.finish(&call("allowed", &"x".repeat(500)), 0.01, None);
        let mut odd = call("none", "anything");
        odd.method = "made/up".into();
        telemetry.finish(&odd, 0.01, Some("-32601"));
        let text = telemetry.registry.prometheus();
        assert!(
            text.contains(r#"mcp_tool_calls_total{target="db",tool="query",decision="allowed",outcome="answered"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"mcp_tool_calls_total{target="db",tool="_denied",decision="denied",outcome="answered"} 50"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"tool="_long""#), "{text}");
        assert!(!text.contains("invented") && !text.contains("made/up") && !text.contains("xxxx"), "{text}");
        assert!(
            text.contains(r#"mcp_requests_total{target="",method="other",decision="none",outcome="answered"} 1"#),
            "{text}"
        );
    }
}
