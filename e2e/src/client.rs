//! A small MCP client over Streamable HTTP with exact control of every header and body: for
//! tests that check statuses and error bodies, and for the load generator.

use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use reflow_data_plane::upstream::event_stream::EventParser;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct McpClient {
    pub http: reqwest::Client,
    pub url: String,
    pub token: String,
    pub session: Option<String>,
    next_id: u64,
}

/// What the server answered: status, headers, and the messages of a JSON or SSE body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub messages: Vec<Value>,
}

impl Answer {
    /// The last message (the response of a request).
    pub fn message(&self) -> &Value {
        self.messages.last().unwrap_or(&Value::Null)
    }

    pub fn error_code(&self) -> Option<i64> {
        self.message().pointer("/error/code").and_then(Value::as_i64)
    }
}

impl McpClient {
    pub fn new(url: &str, token: &str) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client builds");
        McpClient::with_http(http, url, token)
    }

    /// A client on a shared HTTP client (its connection pool), for many sessions at once.
    pub fn with_http(http: reqwest::Client, url: &str, token: &str) -> Self {
        McpClient { http, url: url.to_string(), token: token.to_string(), session: None, next_id: 1 }
    }

    /// `initialize` + `notifications/initialized`; keeps the session id.
    pub async fn initialize(&mut self) -> anyhow::Result<Value> {
        let answer = self
            .request(
                "initialize",
                json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "reflow-e2e", "version": "0"}}),
            )
            .await?;
        anyhow::ensure!(answer.status == 200, "initialize answered {}: {:?}", answer.status, answer.messages);
        self.session = answer.headers.get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        self.notify("notifications/initialized", json!({})).await?;
        Ok(answer.message().clone())
    }

    pub async fn request(&mut self, method: &str, params: Value) -> anyhow::Result<Answer> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()).await
    }

    pub async fn notify(&mut self, method: &str, params: Value) -> anyhow::Result<Answer> {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params}).to_string()).await
    }

    /// Calls a tool; the response message.
    pub async fn call(&mut self, name: &str, arguments: Value) -> anyhow::Result<Value> {
        Ok(self.request("tools/call", json!({"name": name, "arguments": arguments})).await?.message().clone())
    }

    /// Every tool name, following cursors.
    pub async fn tool_names(&mut self) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let params = cursor.as_ref().map_or_else(|| json!({}), |c| json!({"cursor": c}));
            let answer = self.request("tools/list", params).await?;
            let result =
                answer.message().get("result").with_context(|| format!("tools/list: {:?}", answer.messages))?;
            for tool in result["tools"].as_array().into_iter().flatten() {
                names.push(tool["name"].as_str().unwrap_or_default().to_string());
            }
            match result.get("nextCursor").and_then(Value::as_str) {
                Some(next) => cursor = Some(next.to_string()),
                None => return Ok(names),
            }
        }
    }

    /// POSTs a raw body with the usual headers.
    pub async fn send(&self, body: String) -> anyhow::Result<Answer> {
        let request = self.post().header("content-type", "application/json").body(body);
        McpClient::read(request).await
    }

    /// A POST with authorization, session and Accept headers, to add to.
    pub fn post(&self) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .post(&self.url)
            .bearer_auth(&self.token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-11-25");
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        request
    }

    pub async fn read(request: reqwest::RequestBuilder) -> anyhow::Result<Answer> {
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let is_sse = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut messages = Vec::new();
        if is_sse {
            let mut parser = EventParser::new(64 << 20);
            let mut events = Vec::new();
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                parser.feed(&chunk?, &mut events)?;
            }
            messages.extend(events.into_iter().filter_map(|e| serde_json::from_str(&e.data).ok()));
        } else {
            let bytes = response.bytes().await?;
            if !bytes.is_empty() {
                messages.push(
                    serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into())),
                );
            }
        }
        Ok(Answer { status, headers, messages })
    }

    /// Opens the session's GET stream (the response, to read events from).
    pub async fn open_stream(&self) -> anyhow::Result<reqwest::Response> {
        let mut request = self.http.get(&self.url).bearer_auth(&self.token).header("accept", "text/event-stream");
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        Ok(request.send().await?)
    }

    /// Ends the session.
    pub async fn delete(&self) -> anyhow::Result<u16> {
        let mut request = self.http.delete(&self.url).bearer_auth(&self.token);
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        Ok(request.send().await?.status().as_u16())
    }
}
