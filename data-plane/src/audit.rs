//! The audit trail on the data plane: one record per MCP request, written exactly once when the
//! request ends, whatever the ending, then batched into the encrypted spool ([`crate::spool`])
//! that the shipper ([`crate::shipper`]) drains to the control plane.
//!
//! A request's [`Trail`] travels with it: the HTTP layer opens it once the message is
//! classified, each phase fills in what it learned (who, which session, which target and name,
//! the decision and its policy, the credential's source, the upstream's failure), and whoever
//! holds it last drops it: the HTTP layer for an answer known at once, the upstream exchange
//! for a forwarded call (so a client that went away still gets its call recorded, as
//! `client_gone`, when the exchange finishes). Dropping writes the record into the
//! [`Recorder`]'s buffer: a lock and a push, nothing on disk. The recorder's task moves the
//! buffer into the spool every `audit.flush_interval` (or sooner, when a batch is full).
//!
//! When the spool is full, `audit.on_full` decides: `drop_oldest` makes room (the spool counts
//! what it dropped), `refuse` keeps every record and the gateway refuses new MCP requests
//! ([`Recorder::refusing`]) until the control plane has taken enough of the spool.
//!
//! What a record keeps of arguments, only for targets that opt in, goes through [`mask`]: values
//! under keys that look like secrets, and every stored credential value wherever it appears,
//! are replaced. Client tokens and credential values are never put in a record otherwise.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use reflow_proto::audit::{AuditRecord, MAX_BATCH};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::spool::{OnFull, Spool, SpoolError};
use crate::telemetry::{Leg, Telemetry, Trace};

/// The most record bytes the in-memory buffer holds while the spool cannot take them
/// (`drop_oldest` drops the oldest beyond it; `refuse` refuses new requests long before).
const MAX_BUFFERED_BYTES: usize = 64 * 1024 * 1024;

/// The most upstream exchanges one request keeps spans of (a fan-out over many targets).
const MAX_LEGS: usize = 256;

/// The most of a JSON-RPC id a span keeps.
const MAX_REQUEST_ID: usize = 256;

/// What replaces a masked value.
pub const MASKED: &str = "[masked]";

/// The shortest stored credential value masked by value (shorter ones would mask ordinary text).
const MIN_MASKED_VALUE: usize = 4;

/// How the data plane keeps its audit trail.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub spool_dir: std::path::PathBuf,
    pub spool_bytes: u64,
    pub on_full: OnFull,
    pub flush_interval: Duration,
}

/// Collects finished records and moves them into the spool.
#[derive(Debug)]
pub struct Recorder {
    data_plane: String,
    spool: Arc<Spool>,
    on_full: OnFull,
    flush_interval: Duration,
    /// Finished records not yet in the spool, and their bytes.
    buffer: Mutex<Buffer>,
    /// Held while moving the buffer into the spool, so records enter it in order.
    flushing: Mutex<()>,
    /// A batch's worth is waiting: flush now.
    batch_ready: tokio::sync::Notify,
    /// Wakes the shipper when a batch entered the spool.
    pub pushed: Arc<tokio::sync::Notify>,
    refusing: AtomicBool,
    /// Records dropped before they reached the spool (buffer over its bound, or a single record
    /// larger than the whole spool).
    dropped: AtomicU64,
    written: AtomicU64,
}

#[derive(Debug, Default)]
struct Buffer {
    records: VecDeque<Vec<u8>>,
    bytes: usize,
}

/// What `/ready` and `/metrics` show of the trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditStatus {
    pub written: u64,
    pub buffered: usize,
    pub spool_bytes: u64,
    pub spool_batches: usize,
    /// Bytes and records written into the spool since start.
    pub spooled_bytes: u64,
    pub spooled_records: u64,
    pub dropped: u64,
    pub refusing: bool,
}

impl Recorder {
    pub fn new(data_plane: String, spool: Arc<Spool>, settings: &AuditSettings) -> Arc<Recorder> {
        Arc::new(Recorder {
            data_plane,
            spool,
            on_full: settings.on_full,
            flush_interval: settings.flush_interval,
            buffer: Mutex::new(Buffer::default()),
            flushing: Mutex::new(()),
            batch_ready: tokio::sync::Notify::new(),
            pushed: Arc::new(tokio::sync::Notify::new()),
            refusing: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
        })
    }

    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }

    /// A trail for a request to `endpoint` calling `method`, started at `started`, recorded here.
    #[cfg(test)]
    pub fn begin(self: &Arc<Self>, endpoint: &str, method: &str, started: Instant) -> Trail {
        Trail::begin(&Arc::new(Telemetry::new()), Some(self), endpoint, method, started, None, None)
    }

    /// Whether new MCP requests are refused: `audit.on_full` is `refuse` and the records of
    /// earlier requests cannot be kept yet.
    pub fn refusing(&self) -> bool {
        self.refusing.load(Ordering::Relaxed)
    }

    fn write(&self, record: &AuditRecord) {
        let bytes = serde_json::to_vec(record).expect("an audit record serialises");
        let ready = {
            let mut buffer = self.buffer.lock().unwrap();
            buffer.bytes += bytes.len();
            buffer.records.push_back(bytes);
            while self.on_full == OnFull::DropOldest && buffer.bytes > MAX_BUFFERED_BYTES {
                let Some(oldest) = buffer.records.pop_front() else { break };
                buffer.bytes -= oldest.len();
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            buffer.records.len() >= MAX_BATCH
        };
        self.written.fetch_add(1, Ordering::Relaxed);
        if ready {
            self.batch_ready.notify_one();
        }
    }

    /// Moves every buffered record into the spool, a batch at a time. Blocking (each batch is
    /// synced to disk). A spool that is full (`refuse`) or cannot be written keeps the rest in
    /// the buffer, in order, and, with `refuse`, makes the gateway refuse new requests.
    pub fn flush(&self) -> Result<(), SpoolError> {
        let _order = self.flushing.lock().unwrap();
        let mut size = MAX_BATCH;
        loop {
            let chunk: Vec<Vec<u8>> = {
                let mut buffer = self.buffer.lock().unwrap();
                let n = buffer.records.len().min(size);
                if n == 0 {
                    self.refusing.store(false, Ordering::Relaxed);
                    return Ok(());
                }
                let chunk: Vec<Vec<u8>> = buffer.records.drain(..n).collect();
                buffer.bytes -= chunk.iter().map(Vec::len).sum::<usize>();
                chunk
            };
            let put_back = |chunk: Vec<Vec<u8>>| {
                let mut buffer = self.buffer.lock().unwrap();
                for record in chunk.into_iter().rev() {
                    buffer.bytes += record.len();
                    buffer.records.push_front(record);
                }
            };
            match self.spool.push(chunk) {
                Ok(_) => {
                    self.pushed.notify_one();
                    size = MAX_BATCH;
                }
                Err((SpoolError::TooLarge { .. }, chunk)) if chunk.len() > 1 => {
                    size = chunk_len_half(chunk.len());
                    put_back(chunk);
                }
                Err((error @ SpoolError::TooLarge { .. }, _)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%error, "an audit record larger than the whole spool was dropped (raise audit.spool_bytes)");
                }
                Err((error, chunk)) => {
                    put_back(chunk);
                    if self.on_full == OnFull::Refuse && !self.refusing.swap(true, Ordering::Relaxed) {
                        tracing::error!(%error, "audit records cannot be kept: refusing MCP requests until the control plane takes the spool (audit.on_full is refuse)");
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Moves the buffer into the spool every flush interval, or as soon as a batch is full,
    /// until `shutdown` (then once more).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut warned = None::<Instant>;
        loop {
            let stopping = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = self.batch_ready.notified() => false,
                _ = tokio::time::sleep(self.flush_interval) => false,
            };
            let recorder = self.clone();
            let result = tokio::task::spawn_blocking(move || recorder.flush()).await;
            if let Ok(Err(error)) = result {
                // Once a minute is enough while the spool stays full.
                if warned.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(%error, buffered = self.buffer.lock().unwrap().records.len(), "audit records wait in memory");
                    warned = Some(Instant::now());
                }
            }
            if stopping {
                return;
            }
        }
    }

    pub fn status(&self) -> AuditStatus {
        let (spool_bytes, spool_batches) = self.spool.usage();
        let (spooled_bytes, spooled_records) = self.spool.spooled();
        AuditStatus {
            spooled_bytes,
            spooled_records,
            written: self.written.load(Ordering::Relaxed),
            buffered: self.buffer.lock().unwrap().records.len(),
            spool_bytes,
            spool_batches,
            dropped: self.dropped.load(Ordering::Relaxed) + self.spool.dropped(),
            refusing: self.refusing(),
        }
    }
}

fn chunk_len_half(size: usize) -> usize {
    (size / 2).max(1)
}

/// One request's record on its way: written into the audit trail (when on) and counted and
/// traced ([`crate::telemetry`]) when dropped. Off (not a request) it does nothing.
#[derive(Debug, Default)]
pub struct Trail(Option<Box<Open>>);

#[derive(Debug)]
struct Open {
    record: AuditRecord,
    started: Instant,
    /// The same instant on the wall clock, for spans.
    wall: SystemTime,
    recorder: Option<Arc<Recorder>>,
    telemetry: Arc<Telemetry>,
    /// Whether the ending (status, outcome) was set; a trail dropped before is `cancelled`.
    ended: bool,
    /// Set when the client stopped waiting for the answer.
    gone: Option<Arc<AtomicBool>>,
    /// The client's own token, masked wherever recorded arguments carry it.
    mask: Option<Box<str>>,
    trace: Option<Trace>,
    /// The JSON-RPC id, for the span.
    request_id: Option<String>,
    /// The answer was a tool result with `isError`.
    tool_error: bool,
    /// Upstream exchanges made for the request, for their client spans (sampled traces only).
    legs: Vec<Leg>,
    /// The forwarded exchange under way: counted as `cancelled` if the trail ends first (the
    /// exchange was aborted by `notifications/cancelled`).
    forwarding: Option<(LegStart, String, &'static str, String)>,
}

/// An upstream exchange starting: what to send upstream as `traceparent`, and since when.
#[derive(Debug)]
pub struct LegStart {
    span_id: [u8; 8],
    /// Set when the request is part of a trace.
    pub traceparent: Option<String>,
    wall: SystemTime,
    started: Instant,
}

/// Tells a forwarded request's trail that its client went away before the answer.
#[derive(Debug, Clone)]
pub struct ClientGone(Arc<AtomicBool>);

impl ClientGone {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Trail {
    /// A trail for a request to `endpoint` calling `method`, started at `started`: counted by
    /// `telemetry`, recorded by `recorder` when auditing is on, in the trace continuing
    /// `parent` (the client's context).
    pub fn begin(
        telemetry: &Arc<Telemetry>,
        recorder: Option<&Arc<Recorder>>,
        endpoint: &str,
        method: &str,
        started: Instant,
        parent: Option<reflow_common::telemetry::trace::SpanContext>,
        request_id: Option<String>,
    ) -> Trail {
        let id = if recorder.is_some() { format!("{:032x}", rand::random::<u128>()) } else { String::new() };
        let data_plane = recorder.map(|r| r.data_plane.clone()).unwrap_or_default();
        let mut record = AuditRecord::new(id, data_plane, chrono::Utc::now(), endpoint.to_string(), method.to_string());
        let trace = telemetry.trace(parent);
        // A client's id can be any JSON: a span keeps no more than this of it.
        let request_id = request_id.map(|mut id| {
            if id.len() > MAX_REQUEST_ID {
                let end = (0..=MAX_REQUEST_ID).rev().find(|i| id.is_char_boundary(*i)).unwrap_or(0);
                id.truncate(end);
            }
            id
        });
        record.trace_id = trace.map(|t| t.context.trace_id_hex());
        Trail(Some(Box::new(Open {
            record,
            started,
            wall: SystemTime::now() - started.elapsed(),
            recorder: recorder.cloned(),
            telemetry: telemetry.clone(),
            ended: false,
            gone: None,
            mask: None,
            trace,
            request_id,
            tool_error: false,
            legs: Vec::new(),
            forwarding: None,
        })))
    }

    /// A trail that records nothing.
    pub fn off() -> Trail {
        Trail(None)
    }

    /// The record being filled in (none when off).
    pub fn record(&mut self) -> Option<&mut AuditRecord> {
        self.0.as_mut().map(|open| &mut open.record)
    }

    /// The request's trace id, for log lines.
    pub fn trace_id(&self) -> Option<&str> {
        self.0.as_ref().and_then(|open| open.record.trace_id.as_deref())
    }

    /// Starts an upstream exchange for this request.
    pub fn leg(&self) -> LegStart {
        let span_id = reflow_common::telemetry::trace::new_span_id();
        let trace = self.0.as_ref().and_then(|open| open.trace);
        let traceparent = trace.map(|trace| {
            if trace.own {
                reflow_common::telemetry::trace::SpanContext { span_id, ..trace.context }.traceparent()
            } else {
                trace.context.traceparent()
            }
        });
        LegStart { span_id, traceparent, wall: SystemTime::now(), started: Instant::now() }
    }

    /// Starts the forwarded exchange of this request (one at most): ended by
    /// [`Trail::forwarded`], or counted as cancelled when the trail is dropped before.
    pub fn forwarding(&mut self, target: &str, transport: &'static str, method: &str) -> Option<String> {
        let leg = self.leg();
        let traceparent = leg.traceparent.clone();
        if let Some(open) = &mut self.0 {
            open.forwarding = Some((leg, target.to_string(), transport, method.to_string()));
        }
        traceparent
    }

    /// The forwarded exchange ended; `error` is its `error.type` when it failed.
    pub fn forwarded(&mut self, error: Option<String>) {
        let Some((leg, target, transport, method)) = self.0.as_mut().and_then(|open| open.forwarding.take()) else {
            return;
        };
        self.leg_done(leg, &target, transport, &method, error);
    }

    /// An upstream exchange ended; `error` is its `error.type` when it failed.
    pub fn leg_done(
        &mut self,
        leg: LegStart,
        target: &str,
        transport: &'static str,
        method: &str,
        error: Option<String>,
    ) {
        let Some(open) = &mut self.0 else { return };
        open.telemetry.upstream(target, method, leg.started.elapsed().as_secs_f64(), error.as_deref());
        let exported = open.trace.is_some_and(|t| t.own && t.context.sampled) && open.telemetry.exporter().is_some();
        if exported && open.legs.len() < MAX_LEGS {
            open.legs.push(Leg {
                span_id: leg.span_id,
                target: target.to_string(),
                method: method.to_string(),
                start: leg.wall,
                end: SystemTime::now(),
                transport,
                error,
            });
        }
    }

    /// Hands the trail on (to the exchange that finishes the request), leaving this one off.
    pub fn take(&mut self) -> Trail {
        Trail(self.0.take())
    }

    /// Masks `token` (the caller's own credential) in any arguments this trail records.
    pub fn mask_token(&mut self, token: &str) {
        if let Some(open) = &mut self.0 {
            open.mask = Some(token.into());
        }
    }

    /// What marks this trail's client as gone.
    pub fn client_gone(&mut self) -> Option<ClientGone> {
        let open = self.0.as_mut()?;
        Some(ClientGone(open.gone.get_or_insert_with(Default::default).clone()))
    }

    /// The request was answered with HTTP `status` and `reply` (a JSON-RPC message).
    pub fn answered(&mut self, status: u16, reply: &Value) {
        let Some(open) = &mut self.0 else { return };
        let record = &mut open.record;
        record.status = status;
        open.tool_error = reply.pointer("/result/isError") == Some(&Value::Bool(true));
        if let Some(code) = reply.pointer("/error/code").and_then(Value::as_i64) {
            record.error_code = Some(code);
            if record.outcome == "answered" {
                record.outcome = "error".into();
            }
        }
        open.ended = true;
    }

    /// The request was refused at the HTTP level with `status` and JSON-RPC `code`.
    pub fn refused(&mut self, status: u16, code: i64) {
        let Some(open) = &mut self.0 else { return };
        open.record.status = status;
        open.record.error_code = Some(code);
        open.record.outcome = "refused".into();
        open.ended = true;
    }

    /// Records `arguments` (masked) for a target that opted in; `stored` are the target's stored
    /// credential values.
    pub fn arguments(&mut self, arguments: &Value, stored: &[String]) {
        let Some(open) = &mut self.0 else { return };
        let mut secrets: Vec<&str> = stored.iter().map(String::as_str).collect();
        if let Some(token) = &open.mask {
            secrets.push(token);
        }
        open.record.arguments = Some(mask(arguments, &secrets));
    }
}

impl Drop for Trail {
    fn drop(&mut self) {
        if self.0.as_ref().is_some_and(|open| open.forwarding.is_some()) {
            self.forwarded(Some("cancelled".to_string()));
        }
        let Some(mut open) = self.0.take() else { return };
        let record = &mut open.record;
        if !open.ended {
            record.outcome = "cancelled".into();
        } else if open.gone.as_ref().is_some_and(|gone| gone.load(Ordering::Relaxed)) {
            record.outcome = "client_gone".into();
        }
        let elapsed = open.started.elapsed();
        record.duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        // Before anything reads it: what the client sent is cut to the record's limits.
        record.fit();
        let error_type = match (record.error_code, open.tool_error, record.outcome.as_str()) {
            (Some(code), _, _) => Some(code.to_string()),
            (None, true, _) => Some("tool_error".to_string()),
            (None, false, "answered") => None,
            (None, false, outcome) => Some(outcome.to_string()),
        };
        open.telemetry.finish(record, elapsed.as_secs_f64(), error_type.as_deref());
        if let (Some(trace), Some(exporter)) = (open.trace, open.telemetry.exporter()) {
            if trace.own && trace.context.sampled {
                let (start, end, legs) = (open.wall, open.wall + elapsed, &open.legs);
                let request_id = open.request_id.as_deref();
                let error = error_type.as_deref();
                exporter.record(1 + legs.len(), || {
                    crate::telemetry::spans(record, &trace, start, end, error, request_id, legs)
                });
            }
        }
        if let Some(recorder) = &open.recorder {
            recorder.write(record);
        }
    }
}

/// Whether an argument's key names something secret (`password`, `api_key`, `Authorization`,
/// `client-secret`, `accessToken`…): compared without case, `-` or `_`.
pub fn secret_key(key: &str) -> bool {
    const WORDS: [&str; 11] = [
        "password",
        "passwd",
        "secret",
        "token",
        "apikey",
        "authorization",
        "credential",
        "privatekey",
        "accesskey",
        "cookie",
        "signature",
    ];
    let folded: String = key.chars().filter(|c| *c != '-' && *c != '_').flat_map(char::to_lowercase).collect();
    folded == "auth" || folded == "key" || folded == "pin" || WORDS.iter().any(|word| folded.contains(word))
}

/// `value` with every value under a secret-looking key, and every occurrence of a value of
/// `secrets`, replaced by [`MASKED`].
pub fn mask(value: &Value, secrets: &[&str]) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, value)| {
                    let masked = if secret_key(key) { Value::String(MASKED.into()) } else { mask(value, secrets) };
                    (key.clone(), masked)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|item| mask(item, secrets)).collect()),
        Value::String(text) => {
            let mut text = text.clone();
            for secret in secrets.iter().filter(|s| s.len() >= MIN_MASKED_VALUE) {
                if text.contains(secret) {
                    text = text.replace(secret, MASKED);
                }
            }
            Value::String(text)
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_masked_by_key_and_by_value() {
        let arguments = json!({
            "query": "select 1 -- with sk-live-canary inside",
            "apiKey": "anything",
            "client_secret": {"nested": "x"},
            "Authorization": "Bearer abc",
            "pages": [1, "sk-live-canary", {"password": 7}],
            "monkey": "not a key",
            "limit": 3,
        });
        let masked = mask(&arguments, &["sk-live-canary", "abc"]);
        assert_eq!(
            masked,
            json!({
                "query": "select 1 -- with [masked] inside",
                "apiKey": MASKED,
                "client_secret": MASKED,
                "Authorization": MASKED,
                "pages": [1, MASKED, {"password": MASKED}],
                "monkey": "not a key",
                "limit": 3,
            })
        );
        assert!(!masked.to_string().contains("canary"));
        // Too short to mask by value without masking ordinary words.
        assert_eq!(mask(&json!("a b c"), &["b"]), json!("a b c"));
    }

    fn recorder(dir: &std::path::Path, bytes: u64, on_full: OnFull) -> Arc<Recorder> {
        let settings = AuditSettings {
            spool_dir: dir.to_path_buf(),
            spool_bytes: bytes,
            on_full,
            flush_interval: Duration::from_millis(50),
        };
        let spool = Arc::new(Spool::open(dir, "token-token-token-token", bytes, on_full).unwrap());
        Recorder::new("dp-test".into(), spool, &settings)
    }

    fn spooled(recorder: &Recorder) -> Vec<AuditRecord> {
        let mut records = Vec::new();
        while let Some((seq, batch)) = recorder.spool().oldest().unwrap() {
            records.extend(batch.iter().map(|r| serde_json::from_slice::<AuditRecord>(r).unwrap()));
            recorder.spool().ack(seq).unwrap();
        }
        records
    }

    #[test]
    fn every_ending_writes_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = recorder(dir.path(), 1 << 20, OnFull::Refuse);
        let started = Instant::now();
        let mut answered = recorder.begin("/mcp", "tools/call", started);
        answered.answered(200, &json!({"jsonrpc": "2.0", "id": 1, "result": {}}));
        drop(answered);
        let mut failed = recorder.begin("/mcp", "tools/call", started);
        failed.answered(200, &json!({"jsonrpc": "2.0", "id": 2, "error": {"code": -32003, "message": "no"}}));
        drop(failed);
        let mut refused = recorder.begin("/mcp/x", "tools/list", started);
        refused.refused(404, -32600);
        drop(refused);
        drop(recorder.begin("/mcp", "tools/call", started));
        let mut gone = recorder.begin("/mcp", "tools/call", started);
        let mark = gone.client_gone().unwrap();
        let mut handed_on = gone.take();
        drop(gone);
        mark.mark();
        handed_on.answered(200, &json!({"jsonrpc": "2.0", "id": 5, "result": {}}));
        drop(handed_on);
        drop(Trail::off());
        recorder.flush().unwrap();
        let records = spooled(&recorder);
        let outcomes: Vec<(&str, u16, Option<i64>)> =
            records.iter().map(|r| (r.outcome.as_str(), r.status, r.error_code)).collect();
        assert_eq!(
            outcomes,
            [
                ("answered", 200, None),
                ("error", 200, Some(-32003)),
                ("refused", 404, Some(-32600)),
                ("cancelled", 200, None),
                ("client_gone", 200, None),
            ]
        );
        let ids: std::collections::HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), 5, "ids are unique");
        assert!(records.iter().all(|r| reflow_proto::audit::check(r).is_ok()));
    }

    #[test]
    fn memory_held_for_records_is_bounded_in_bytes_under_drop_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = recorder(dir.path(), 1 << 20, OnFull::DropOldest);
        // Records as large as a client can make them (recorded arguments at their bound).
        let arguments = json!({"blob": "x".repeat(reflow_proto::audit::MAX_ARGUMENTS_BYTES - 20)});
        let mut n = 0;
        while recorder.status().dropped == 0 {
            let mut trail = recorder.begin("/mcp", "tools/call", Instant::now());
            trail.arguments(&arguments, &[]);
            trail.answered(200, &json!({"result": {}}));
            drop(trail);
            n += 1;
            assert!(n < 10_000, "{MAX_BUFFERED_BYTES} bytes fill within 10,000 records of 16 KiB");
        }
        let buffered = recorder.buffer.lock().unwrap().bytes;
        assert!(buffered <= MAX_BUFFERED_BYTES, "{buffered}");
        assert_eq!(recorder.status().buffered + 1, n, "the oldest one dropped");
    }

    #[test]
    fn a_full_spool_under_refuse_keeps_every_record_and_refuses_until_it_drains() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = recorder(dir.path(), 4096, OnFull::Refuse);
        let mut n = 0;
        while !recorder.refusing() {
            for _ in 0..10 {
                let mut trail = recorder.begin("/mcp", "tools/call", Instant::now());
                trail.answered(200, &json!({"result": {}}));
                n += 1;
            }
            let _ = recorder.flush();
            assert!(n < 10_000, "a 4 KiB spool fills");
        }
        assert_eq!(recorder.status().dropped, 0);
        // The control plane takes everything: the buffer follows, and requests are accepted.
        let mut got = spooled(&recorder);
        while recorder.status().buffered > 0 {
            let _ = recorder.flush();
            got.extend(spooled(&recorder));
        }
        recorder.flush().unwrap();
        assert!(!recorder.refusing());
        assert_eq!(got.len(), n, "none lost");
    }
}
