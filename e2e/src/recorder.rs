//! A recording upstream: a Streamable HTTP MCP server that writes down every request it gets
//! (method, MCP method, headers), so a test can prove that nothing reached it, or exactly what
//! did (the URI a `resources/read` was forwarded with, the credentials injected).
//!
//! It answers just enough MCP for a gateway to use it: `initialize` (with a session id), every
//! list (one tool `echo` and `huge`, one prompt, one resource and template), `tools/call`,
//! `prompts/get`, `resources/read`, `completion/complete`, `logging/setLevel`, `ping`.
//! `tools/call` of `huge` streams a reply of `huge_bytes` (no `Content-Length`), for the tests of
//! the gateway's byte cap. GET answers 405 (no stream), after being recorded too.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde_json::{json, Value};

/// One request the upstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub http_method: Method,
    /// The JSON-RPC method, when the body was one.
    pub method: Option<String>,
    pub params: Value,
    pub headers: HeaderMap,
}

/// A running recorder: its URL and what it received.
#[derive(Debug, Clone)]
pub struct Recorder {
    pub url: String,
    pub received: Arc<Mutex<Vec<Recorded>>>,
}

impl Recorder {
    /// Starts one on a fresh loopback port, in this process.
    pub async fn start(huge_bytes: usize) -> anyhow::Result<Recorder> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/mcp", listener.local_addr()?);
        let received: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let state = (received.clone(), huge_bytes);
        let router = axum::Router::new().fallback(answer).with_state(state);
        tokio::spawn(async move { axum::serve(listener, router).await });
        Ok(Recorder { url, received })
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// The requests with JSON-RPC method `method`.
    pub fn calls(&self, method: &str) -> Vec<Recorded> {
        self.received.lock().unwrap().iter().filter(|r| r.method.as_deref() == Some(method)).cloned().collect()
    }
}

type Shared = (Arc<Mutex<Vec<Recorded>>>, usize);

async fn answer(State((received, huge_bytes)): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20).await.unwrap_or_default();
    let message: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let method = message.get("method").and_then(Value::as_str).map(str::to_string);
    received.lock().unwrap().push(Recorded {
        http_method: parts.method.clone(),
        method: method.clone(),
        params: message.get("params").cloned().unwrap_or(Value::Null),
        headers: parts.headers.clone(),
    });
    if parts.method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let Some(id) = message.get("id").cloned() else { return StatusCode::ACCEPTED.into_response() };
    let params = message.get("params").cloned().unwrap_or(Value::Null);
    let result = match method.as_deref().unwrap_or_default() {
        "initialize" => json!({
            "protocolVersion": params["protocolVersion"].as_str().unwrap_or("2025-11-25"),
            "capabilities": {"tools": {}, "prompts": {}, "resources": {"subscribe": true}, "completions": {}, "logging": {}},
            "serverInfo": {"name": "recorder", "version": "0"},
        }),
        "tools/list" => json!({"tools": [
            {"name": "echo", "inputSchema": {"type": "object"}},
            {"name": "huge", "inputSchema": {"type": "object"}},
        ]}),
        "prompts/list" => json!({"prompts": [{"name": "greet"}]}),
        "resources/list" => json!({"resources": [{"uri": "file:///home/bob/notes.txt", "name": "notes"}]}),
        "resources/templates/list" => {
            json!({"resourceTemplates": [{"uriTemplate": "file:///home/{user}/{file}", "name": "files"}]})
        }
        "tools/call" if params["name"] == "huge" => return huge(id, huge_bytes),
        "tools/call" => json!({"content": [{"type": "text", "text": format!("echo: {}", params["arguments"])}]}),
        "prompts/get" => json!({"messages": []}),
        "resources/read" => json!({"contents": [{"uri": params["uri"], "text": "contents"}]}),
        "completion/complete" => json!({"completion": {"values": []}}),
        _ => json!({}),
    };
    let mut response = axum::Json(json!({"jsonrpc": "2.0", "id": id, "result": result})).into_response();
    if method.as_deref() == Some("initialize") {
        response.headers_mut().insert("mcp-session-id", "recorded-session".parse().expect("a header value"));
    }
    response
}

/// A reply of `size` bytes, streamed in 1 MiB chunks with no length announced: the start of a
/// JSON-RPC response whose text never ends in time.
fn huge(id: Value, size: usize) -> Response {
    let head = format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[{{"type":"text","text":""#);
    let chunk = axum::body::Bytes::from(vec![b'x'; 1 << 20]);
    let chunks = size / chunk.len();
    let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(axum::body::Bytes::from(head)) })
        .chain(futures::stream::iter((0..chunks).map(move |_| Ok(chunk.clone()))));
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("a streamed response builds")
}
