//! A minimal Streamable HTTP MCP server built for speed: the upstream the benchmark measures
//! the gateway's own cost against, so that the upstream is never the bottleneck.
//!
//! It speaks just enough of the protocol for a gateway or client to use it: `initialize`
//! (with an `Mcp-Session-Id`), notifications (202), `ping`, `tools/list` (a fixed list of
//! `tools` tools, `echo` first; a `?tools=N` query on the URL asks for N instead, so one
//! process can serve many targets of different sizes) and `tools/call` of any listed tool (echoes
//! `arguments.message`). Replies are JSON, never SSE; there is no GET stream (405). When
//! `authorization` is set, every POST must carry exactly that `Authorization` value (401
//! otherwise): the benchmark uses it to prove the gateway injected the target's credential.
//!
//! Written on hyper directly rather than on an MCP SDK: the point is the least work per
//! request, and the tool list is serialised once.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

const SESSION_HEADER: &str = "mcp-session-id";

/// What the server offers and expects.
#[derive(Debug, Clone, Default)]
pub struct FastUpstream {
    /// Tools in `tools/list`.
    pub tools: usize,
    /// The `Authorization` value every POST must carry.
    pub authorization: Option<String>,
    /// Counts the `tools/list` requests answered.
    pub listed: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Shared {
    /// The serialised `tools/list` result.
    tools_result: String,
    authorization: Option<HeaderValue>,
    sessions: AtomicU64,
    listed: Arc<AtomicU64>,
}

impl FastUpstream {
    /// Serves on `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener) -> anyhow::Result<()> {
        let shared = Arc::new(Shared {
            tools_result: tools_result(self.tools),
            authorization: self.authorization.as_deref().map(HeaderValue::from_str).transpose()?,
            sessions: AtomicU64::new(0),
            listed: self.listed.clone(),
        });
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| answer(shared.clone(), request));
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    }
}

fn tools_result(count: usize) -> String {
    let tools: Vec<Value> = (0..count.max(1))
        .map(|i| {
            let name = if i == 0 { "echo".to_string() } else { format!("tool{i}") };
            json!({
                "name": name,
                "description": "Echoes arguments.message back.",
                "inputSchema": {"type": "object", "properties": {"message": {"type": "string"}}},
            })
        })
        .collect();
    json!({ "tools": tools }).to_string()
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, id: &Value, code: i64, message: &str) -> Response<Full<Bytes>> {
    reply(status, json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}).to_string())
}

async fn answer(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let none = Value::Null;
    match *request.method() {
        Method::POST => {}
        Method::DELETE => return Ok(reply(StatusCode::OK, Bytes::new())),
        _ => return Ok(error(StatusCode::METHOD_NOT_ALLOWED, &none, -32000, "only POST and DELETE are served")),
    }
    if let Some(expected) = &shared.authorization {
        if request.headers().get(AUTHORIZATION) != Some(expected) {
            return Ok(error(StatusCode::UNAUTHORIZED, &none, -32001, "missing or wrong Authorization"));
        }
    }
    let has_session = request.headers().contains_key(SESSION_HEADER);
    let tools_asked = request.uri().query().and_then(|q| q.strip_prefix("tools=")).and_then(|n| n.parse().ok());
    let Ok(body) = request.into_body().collect().await else {
        return Ok(error(StatusCode::BAD_REQUEST, &none, -32700, "the body could not be read"));
    };
    let Ok(message) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return Ok(error(StatusCode::BAD_REQUEST, &none, -32700, "the body is not JSON"));
    };
    let method = message.get("method").and_then(Value::as_str).unwrap_or_default();
    let Some(id) = message.get("id") else {
        return Ok(reply(StatusCode::ACCEPTED, Bytes::new())); // a notification or a response
    };
    if method == "initialize" {
        let version = message.pointer("/params/protocolVersion").and_then(Value::as_str).unwrap_or("2025-11-25");
        let result = json!({
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": {"name": "reflow-fast-upstream", "version": "1"},
        });
        let mut response = reply(StatusCode::OK, json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string());
        let session = format!("fast-{}", shared.sessions.fetch_add(1, Ordering::Relaxed));
        response.headers_mut().insert(SESSION_HEADER, HeaderValue::from_str(&session).expect("a plain header value"));
        return Ok(response);
    }
    if !has_session {
        return Ok(error(StatusCode::BAD_REQUEST, id, -32600, "Mcp-Session-Id header is required"));
    }
    let id_text = id.to_string();
    Ok(match method {
        "ping" => reply(StatusCode::OK, format!(r#"{{"jsonrpc":"2.0","id":{id_text},"result":{{}}}}"#)),
        "tools/list" => {
            shared.listed.fetch_add(1, Ordering::Relaxed);
            let result = match tools_asked {
                Some(count) => tools_result(count),
                None => shared.tools_result.clone(),
            };
            reply(StatusCode::OK, format!(r#"{{"jsonrpc":"2.0","id":{id_text},"result":{result}}}"#))
        }
        "tools/call" => {
            let text = message.pointer("/params/arguments/message").and_then(Value::as_str).unwrap_or_default();
            let result = json!({"content": [{"type": "text", "text": text}]});
            reply(StatusCode::OK, json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string())
        }
        _ => error(StatusCode::OK, id, -32601, "method not found"),
    })
}
