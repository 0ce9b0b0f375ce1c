//! Streamable HTTP upstreams: one POST per message, replies as JSON or as an SSE stream that
//! may carry the request's notifications and server→client requests before its response, and
//! an optional GET stream for messages unrelated to any request.
//!
//! An upstream of the stateless era (2026-07-28) has no session: found by `server/discover`
//! ([`Connection::discover`]), every request then carries the protocol version, the client's
//! capabilities and the client in `_meta`, and `MCP-Protocol-Version`, `Mcp-Method` and
//! `Mcp-Name` headers that repeat the body.

use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::event_stream::EventParser;
use super::{describe, Sink, UpstreamError};
use crate::jsonrpc;

const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
const ACCEPT_BOTH: &str = "application/json, text/event-stream";
/// How many times one request's stream is resumed after ending early.
const MAX_RECONNECTIONS: usize = 8;
/// The reconnection delay when the stream named none, and the longest one honoured, in ms.
const DEFAULT_RETRY_MS: u64 = 100;
const MAX_RETRY_MS: u64 = 5_000;

/// A live upstream session (or a session-less server when it issued no id).
#[derive(Debug, Clone)]
pub struct Connection {
    http: reqwest::Client,
    url: reqwest::Url,
    /// Injected credentials plus the session and version headers.
    headers: HeaderMap,
    max_message_bytes: usize,
    /// For an upstream of the stateless era: the `_meta` fields every request carries.
    stateless: Option<std::sync::Arc<serde_json::Map<String, Value>>>,
}

/// The stateless era's version, spoken to upstreams that offer it.
const MODERN_VERSION: &str = "2026-07-28";

/// What a POST produced.
struct Posted {
    session_id: Option<String>,
    reply: Option<Value>,
}

impl Connection {
    pub fn new(http: reqwest::Client, url: reqwest::Url, headers: HeaderMap, max_message_bytes: usize) -> Self {
        Connection { http, url, headers, max_message_bytes, stateless: None }
    }

    /// Asks the upstream `server/discover` as a client of the stateless era whose capabilities
    /// and identity are `client` (`initialize` params): the connection and what the upstream
    /// says of itself (shaped as an `initialize` result) when it speaks that era; `None` when
    /// it refuses (a server of the session era).
    pub async fn discover(mut self, client: &Value) -> Result<Option<(Connection, Value)>, UpstreamError> {
        let mut meta = serde_json::Map::new();
        meta.insert("io.modelcontextprotocol/protocolVersion".into(), Value::String(MODERN_VERSION.into()));
        let capabilities = client.get("capabilities").cloned().unwrap_or_else(|| serde_json::json!({}));
        meta.insert("io.modelcontextprotocol/clientCapabilities".into(), capabilities);
        if let Some(info) = client.get("clientInfo") {
            meta.insert("io.modelcontextprotocol/clientInfo".into(), info.clone());
        }
        self.stateless = Some(std::sync::Arc::new(meta));
        let discover = jsonrpc::request(serde_json::json!("reflow-discover"), "server/discover", None);
        let reply = match self.post(&discover, None).await {
            Ok(posted) => posted.reply,
            Err(UpstreamError::Status(_) | UpstreamError::Protocol(_)) => None,
            Err(error) => return Err(error),
        };
        let Some(result) = reply.as_ref().and_then(|r| r.get("result")) else { return Ok(None) };
        let speaks = result
            .get("supportedVersions")
            .and_then(Value::as_array)
            .is_some_and(|versions| versions.iter().any(|v| v == MODERN_VERSION));
        if !speaks {
            return Ok(None);
        }
        let server_info = result
            .pointer("/_meta/io.modelcontextprotocol~1serverInfo")
            .or_else(|| result.get("serverInfo"))
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"name": "unknown", "version": "0"}));
        let mut described = serde_json::json!({
            "protocolVersion": MODERN_VERSION,
            "capabilities": result.get("capabilities").cloned().unwrap_or_else(|| serde_json::json!({})),
            "serverInfo": server_info,
        });
        if let Some(instructions) = result.get("instructions").filter(|i| i.is_string()) {
            described["instructions"] = instructions.clone();
        }
        Ok(Some((self, described)))
    }

    /// Whether the upstream is of the stateless era.
    pub fn is_stateless(&self) -> bool {
        self.stateless.is_some()
    }

    /// The connection to an upstream session opened before (by this replica or another one),
    /// without a new `initialize`.
    pub fn adopt(mut self, session_id: &str, protocol_version: Option<&str>) -> Result<Connection, UpstreamError> {
        let value = HeaderValue::from_str(session_id)
            .map_err(|_| UpstreamError::Protocol("the session id is not a valid header value".into()))?;
        self.headers.insert(SESSION_HEADER, value);
        if let Some(version) = protocol_version.and_then(|v| HeaderValue::from_str(v).ok()) {
            self.headers.insert(VERSION_HEADER, version);
        }
        Ok(self)
    }

    /// The upstream's session id and protocol version, when it issued an id.
    pub fn session(&self) -> Option<(String, Option<String>)> {
        let id = self.headers.get(SESSION_HEADER)?.to_str().ok()?.to_string();
        let version = self.headers.get(VERSION_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        Some((id, version))
    }

    /// Runs `initialize` + `notifications/initialized` and returns the session's connection
    /// with the initialize result.
    pub async fn initialize(mut self, initialize: Value) -> Result<(Connection, Value), UpstreamError> {
        let posted = self.post(&initialize, None).await?;
        let reply = posted.reply.ok_or_else(|| UpstreamError::Protocol("initialize got no response".into()))?;
        let result = reply.get("result").cloned().ok_or_else(|| UpstreamError::Refused(error_text(&reply)))?;
        if let Some(id) = posted.session_id {
            let value = HeaderValue::from_str(&id)
                .map_err(|_| UpstreamError::Protocol("the session id is not a valid header value".into()))?;
            self.headers.insert(SESSION_HEADER, value);
        }
        if let Some(version) = result.get("protocolVersion").and_then(Value::as_str) {
            if let Ok(value) = HeaderValue::from_str(version) {
                self.headers.insert(VERSION_HEADER, value);
            }
        }
        self.post(&jsonrpc::notification("notifications/initialized", None), None).await?;
        Ok((self, result))
    }

    /// Sends a request; intermediate messages go to `sink`; returns the response.
    pub async fn request(&self, message: &Value, sink: Option<&Sink>) -> Result<Value, UpstreamError> {
        self.post(message, sink).await?.reply.ok_or(UpstreamError::Disconnected)
    }

    /// Sends a notification or a response to a server→client request (neither exists over
    /// HTTP in the stateless era: nothing is sent).
    pub async fn send(&self, message: &Value) -> Result<(), UpstreamError> {
        if self.stateless.is_some() {
            return Ok(());
        }
        self.post(message, None).await.map(|_| ())
    }

    /// Ends the upstream session (best effort).
    pub async fn close(&self) {
        if self.headers.contains_key(SESSION_HEADER) {
            let _ = self.http.delete(self.url.clone()).headers(self.headers.clone()).send().await;
        }
    }

    async fn post(&self, message: &Value, sink: Option<&Sink>) -> Result<Posted, UpstreamError> {
        let stateless = self.stateless.as_ref().map(|meta| stateless_request(message, meta));
        let (message, extra) = match &stateless {
            Some((message, headers)) => (message, headers.clone()),
            None => (message, HeaderMap::new()),
        };
        let body = serde_json::to_vec(message).expect("a JSON value serialises");
        let request = self
            .http
            .post(self.url.clone())
            .headers(self.headers.clone())
            .headers(extra)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, ACCEPT_BOTH);
        let response = super::with_traceparent(request, message)
            .body(body)
            .send()
            .await
            .map_err(|e| UpstreamError::Unreachable(describe(&e)))?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND && self.headers.contains_key(SESSION_HEADER) {
            return Err(UpstreamError::SessionExpired);
        }
        let session_id = response.headers().get(SESSION_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        if status == StatusCode::ACCEPTED || (status.is_success() && message.get("id").is_none()) {
            return Ok(Posted { session_id, reply: None });
        }
        let is_sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !status.is_success() {
            let bytes = super::read_error_body(response).await;
            // Some servers answer a forgotten session with 400 instead of the 404 the
            // specification prescribes; a 400 that names the session is treated alike.
            if status == StatusCode::BAD_REQUEST
                && self.headers.contains_key(SESSION_HEADER)
                && String::from_utf8_lossy(&bytes).to_ascii_lowercase().contains("session")
            {
                return Err(UpstreamError::SessionExpired);
            }
            // A JSON-RPC error answering our request is passed on as the response.
            return match serde_json::from_slice::<Value>(&bytes) {
                Ok(reply) if reply.get("error").is_some() && message.get("id").is_some() => {
                    Ok(Posted { session_id, reply: Some(with_id(reply, message)) })
                }
                _ => Err(UpstreamError::Status(status.as_u16())),
            };
        }
        if !is_sse {
            let bytes = super::read_capped(response, self.max_message_bytes).await?;
            let reply: Value = serde_json::from_slice(&bytes)
                .map_err(|e| UpstreamError::Protocol(format!("the reply is not JSON: {e}")))?;
            return Ok(Posted { session_id, reply: Some(reply) });
        }
        let id = message.get("id");
        let mut parser = EventParser::new(self.max_message_bytes);
        if let Some(reply) = self.read_stream(response, &mut parser, id, sink).await? {
            return Ok(Posted { session_id, reply: Some(reply) });
        }
        for _ in 0..MAX_RECONNECTIONS {
            // The stream ended before the response, after an event id: the server means to go
            // on (SEP-1699 polling, or a broken connection), so ask for the rest with `GET` +
            // `Last-Event-ID`, after the delay it asked for.
            let Some(last) = parser.last_event_id().map(str::to_string) else { break };
            if !self.headers.contains_key(SESSION_HEADER) {
                break;
            }
            let delay = parser.retry().unwrap_or(DEFAULT_RETRY_MS).min(MAX_RETRY_MS);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let response = self.resume_from(&last).await?;
            if let Some(reply) = self.read_stream(response, &mut parser, id, sink).await? {
                return Ok(Posted { session_id, reply: Some(reply) });
            }
        }
        Err(UpstreamError::Disconnected)
    }

    /// `GET` + `Last-Event-ID`: the stream after the event `last_event_id`, or why not.
    async fn resume_from(&self, last_event_id: &str) -> Result<reqwest::Response, UpstreamError> {
        let response = self
            .http
            .get(self.url.clone())
            .headers(self.headers.clone())
            .header(header::ACCEPT, "text/event-stream")
            .header("last-event-id", last_event_id)
            .send()
            .await
            .map_err(|e| UpstreamError::Unreachable(describe(&e)))?;
        match response.status() {
            StatusCode::NOT_FOUND => return Err(UpstreamError::SessionExpired),
            status if !status.is_success() => return Err(UpstreamError::Status(status.as_u16())),
            _ => {}
        }
        Ok(response)
    }

    /// The rest of a stream after the event `last_event_id`, from the upstream's event store
    /// (`GET` + `Last-Event-ID`): every message into `sink` with its event id, until the upstream
    /// ends the stream.
    pub async fn replay(&self, last_event_id: &str, sink: &Sink) -> Result<(), UpstreamError> {
        let response = self.resume_from(last_event_id).await?;
        let mut parser = EventParser::new(self.max_message_bytes);
        let mut events = Vec::new();
        let mut body = response.bytes_stream();
        while let Some(Ok(chunk)) = body.next().await {
            parser.feed(&chunk, &mut events).map_err(|e| UpstreamError::TooLarge(e.limit))?;
            for event in events.drain(..) {
                if let Some(message) = parse_event_data(&event.data) {
                    if !sink.send_event(message, event.id) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads one SSE response until the response to `id` (returned) or the end of the stream
    /// (`None`); other messages go to `sink`. A connection that breaks counts as an end.
    async fn read_stream(
        &self,
        response: reqwest::Response,
        parser: &mut EventParser,
        id: Option<&Value>,
        sink: Option<&Sink>,
    ) -> Result<Option<Value>, UpstreamError> {
        let mut events = Vec::new();
        let mut body = response.bytes_stream();
        while let Some(Ok(chunk)) = body.next().await {
            parser.feed(&chunk, &mut events).map_err(|e| UpstreamError::TooLarge(e.limit))?;
            for event in events.drain(..) {
                let Some(relayed) = parse_event_data(&event.data) else { continue };
                if jsonrpc::is_response(&relayed) && relayed.get("id") == id {
                    return Ok(Some(relayed));
                }
                if let Some(sink) = sink {
                    let _ = sink.send_event(relayed, event.id);
                }
            }
        }
        Ok(None)
    }

    /// The request for messages unrelated to any request: the session's GET stream, or, of the
    /// stateless era, a `subscriptions/listen` for every list change.
    fn listening(&self) -> reqwest::RequestBuilder {
        let Some(meta) = &self.stateless else {
            return self
                .http
                .get(self.url.clone())
                .headers(self.headers.clone())
                .header(header::ACCEPT, "text/event-stream");
        };
        let every = serde_json::json!({"notifications": {
            "toolsListChanged": true, "promptsListChanged": true, "resourcesListChanged": true}});
        let listen = jsonrpc::request(serde_json::json!("reflow-listen"), "subscriptions/listen", Some(every));
        let (listen, headers) = stateless_request(&listen, meta);
        self.http
            .post(self.url.clone())
            .headers(self.headers.clone())
            .headers(headers)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, ACCEPT_BOTH)
            .body(serde_json::to_vec(&listen).expect("a JSON value serialises"))
    }

    /// Relays messages from the session's GET stream (or the stateless era's subscription) to
    /// `out` until `cancel`, reopening it when it ends. Returns when the upstream offers no
    /// such stream.
    pub async fn listen(self, out: mpsc::Sender<Value>, cancel: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let response = tokio::select! {
                _ = cancel.cancelled() => return,
                response = self.listening().send() => response,
            };
            match response {
                Ok(response) if response.status().is_success() => {
                    failures = 0;
                    let mut parser = EventParser::new(self.max_message_bytes);
                    let mut events = Vec::new();
                    let mut body = response.bytes_stream();
                    loop {
                        let chunk = tokio::select! {
                            _ = cancel.cancelled() => return,
                            chunk = body.next() => chunk,
                        };
                        let Some(Ok(chunk)) = chunk else { break };
                        if parser.feed(&chunk, &mut events).is_err() {
                            break;
                        }
                        for event in events.drain(..) {
                            let Some(message) = parse_event_data(&event.data) else { continue };
                            // A subscription's acknowledgement and its end are for this listener.
                            let method = message.get("method").and_then(Value::as_str);
                            if method.is_none() || method == Some("notifications/subscriptions/acknowledged") {
                                continue;
                            }
                            if out.send(message).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                // 405: no GET stream offered; 404: the session is gone (the next request
                // re-initialises and starts a new listener).
                Ok(response) if response.status().is_client_error() => return,
                _ => failures += 1,
            }
            let delay = Duration::from_millis(250 * u64::from(failures.min(20) + 1));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// A request as the stateless era has it: the per-request `_meta` fields added to what it
/// carries already (progress token, trace context), and the headers repeating the body.
fn stateless_request(message: &Value, meta: &serde_json::Map<String, Value>) -> (Value, HeaderMap) {
    let mut message = message.clone();
    let mut headers = HeaderMap::new();
    headers.insert(VERSION_HEADER, HeaderValue::from_static(MODERN_VERSION));
    let Some(method) = message.get("method").and_then(Value::as_str).map(str::to_string) else {
        return (message, headers);
    };
    if let Some(value) = header_safe(&method) {
        headers.insert("mcp-method", value);
    }
    let named = match method.as_str() {
        "tools/call" | "prompts/get" => message.pointer("/params/name"),
        "resources/read" => message.pointer("/params/uri"),
        _ => None,
    };
    if let Some(value) = named.and_then(Value::as_str).and_then(header_safe) {
        headers.insert("mcp-name", value);
    }
    if let Some(object) = message.as_object_mut() {
        let params = object.entry("params").or_insert_with(|| Value::Object(Default::default()));
        if let Some(params) = params.as_object_mut() {
            let fields = params.entry("_meta").or_insert_with(|| Value::Object(Default::default()));
            if let Some(fields) = fields.as_object_mut() {
                for (key, value) in meta {
                    fields.entry(key.clone()).or_insert_with(|| value.clone());
                }
            }
        }
    }
    (message, headers)
}

/// A header value for `text`: as it is when plain printable ASCII without surrounding spaces,
/// otherwise `=?base64?…?=` as the stateless era has it.
fn header_safe(text: &str) -> Option<HeaderValue> {
    let plain = text.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !text.starts_with(' ')
        && !text.ends_with(' ')
        && !text.starts_with("=?base64?");
    if plain {
        return HeaderValue::from_str(text).ok();
    }
    use base64::Engine as _;
    HeaderValue::from_str(&format!("=?base64?{}?=", base64::engine::general_purpose::STANDARD.encode(text))).ok()
}

/// A JSON-RPC message from an event's data; other data (keep-alives, garbage) is skipped.
pub(super) fn parse_event_data(data: &str) -> Option<Value> {
    if data.trim().is_empty() {
        return None;
    }
    match serde_json::from_str::<Value>(data) {
        Ok(message) if message.is_object() => Some(message),
        _ => {
            tracing::debug!("skipping an upstream event that is not a JSON-RPC message");
            None
        }
    }
}

fn with_id(mut reply: Value, request: &Value) -> Value {
    if reply.get("id").is_none_or(Value::is_null) {
        reply["id"] = request["id"].clone();
    }
    reply
}

pub(super) fn error_text(reply: &Value) -> String {
    reply
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| "the upstream answered without a result".into())
}
