//! The gateway as an attacker meets it: one self-registered account, no policy naming it, and
//! recording upstreams behind every transport. Whatever the account stores or sends, on either
//! endpoint and over either client transport, nothing is accepted, nothing reaches an upstream,
//! and no process starts. A second account that *is* granted shows the same upstreams answer.

use std::time::Duration;

use futures::StreamExt;
use reflow_data_plane::upstream::event_stream::EventParser;
use reflow_e2e::client::McpClient;
use reflow_e2e::harness::*;
use reflow_e2e::recorder::Recorder;
use serde_json::{json, Value};

/// Interpreter, loader, package-runner, shell, proxy, CA and destination keys an attacker would
/// set to run its own code in a STDIO child or send a target's credentials elsewhere.
const ATTACK_KEYS: &[&str] = &[
    "NODE_OPTIONS",
    "NODE_PATH",
    "NODE_EXTRA_CA_CERTS",
    "NODE_TLS_REJECT_UNAUTHORIZED",
    "NPM_CONFIG_REGISTRY",
    "npm_config_userconfig",
    "npm_config_prefix",
    "NPX_PACKAGE",
    "YARN_REGISTRY",
    "PNPM_HOME",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "PYTHONUSERBASE",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "UV_INDEX_URL",
    "UV_PYTHON",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
    "DYLD_INSERT_LIBRARIES",
    "PERL5OPT",
    "PERL5LIB",
    "RUBYOPT",
    "RUBYLIB",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "CLASSPATH",
    "BASH_ENV",
    "ENV",
    "PATH",
    "HOME",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSH_COMMAND",
    "XDG_CONFIG_HOME",
    "TMPDIR",
    "GLIBC_TUNABLES",
    "DENO_DIR",
    "COREPACK_NPM_REGISTRY",
    "BASE_URL",
    "AUTH_HEADER",
    "TIMEOUT",
    // Declared user-settable by the admin, still refused without a grant.
    "GITHUB_PERSONAL_ACCESS_TOKEN",
];

fn is_error(message: &Value) -> bool {
    message.get("error").is_some() || message["result"]["isError"] == true
}

fn listed(message: &Value) -> usize {
    let result = &message["result"];
    ["tools", "prompts", "resources", "resourceTemplates"]
        .iter()
        .map(|field| result[*field].as_array().map_or(0, Vec::len))
        .sum()
}

/// Every request an MCP client can make of the aggregated endpoint, as `(method, params)`.
fn requests() -> Vec<(&'static str, Value)> {
    vec![
        ("tools/list", json!({})),
        ("prompts/list", json!({})),
        ("resources/list", json!({})),
        ("resources/templates/list", json!({})),
        ("tools/call", json!({"name": "rec_echo", "arguments": {"message": "x"}})),
        ("tools/call", json!({"name": "sse_echo", "arguments": {}})),
        ("tools/call", json!({"name": "cmd_echo", "arguments": {"message": "x"}})),
        ("prompts/get", json!({"name": "rec_greet"})),
        ("resources/read", json!({"uri": "reflow+rec+file:///home/bob/notes.txt"})),
        ("resources/read", json!({"uri": "reflow+cmd+file:///etc/passwd"})),
        ("resources/subscribe", json!({"uri": "reflow+rec+file:///home/bob/notes.txt"})),
        (
            "completion/complete",
            json!({"ref": {"type": "ref/prompt", "name": "rec_greet"}, "argument": {"name": "a", "value": "b"}}),
        ),
        (
            "completion/complete",
            json!({"ref": {"type": "ref/resource", "uri": "reflow+cmd+file:///{x}"}, "argument": {"name": "x", "value": ""}}),
        ),
        ("logging/setLevel", json!({"level": "debug"})),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_with_no_grant_reaches_nothing_stores_nothing_and_starts_nothing() {
    ensure_peers();
    let gateway = Gateway::start().await.unwrap();
    let (rec, sse) = (Recorder::start(0).await.unwrap(), Recorder::start(0).await.unwrap());
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("started");
    let script = workspace().join("e2e/peers/stdio_server.py");
    let declared = json!([{"name": "GITHUB_PERSONAL_ACCESS_TOKEN", "user_settable": true}]);
    let mut targets = Vec::new();
    for body in [
        json!({"name": "rec", "transport_type": "streamable-http", "url": rec.url, "env_keys": declared}),
        json!({"name": "sse", "transport_type": "sse", "url": sse.url, "env_keys": declared}),
        json!({"name": "cmd", "transport_type": "stdio", "command": "python3", "isolation_boundary": "per_user",
               "args": [script.to_string_lossy(), "--touch", marker.to_string_lossy()], "env_keys": declared}),
    ] {
        let target = gateway.post("/api/targets", body).await.unwrap();
        let id = target["id"].as_str().unwrap().to_string();
        // Shared credentials an attacker would like to see.
        gateway
            .post(&format!("/api/targets/{id}/tokens/default"), json!({"token": "CANARY-default-token"}))
            .await
            .unwrap();
        gateway
            .post(&format!("/api/targets/{id}/env/default"), json!({"key": "API_KEY", "value": "CANARY-default-env"}))
            .await
            .unwrap();
        targets.push(id);
    }
    // Someone else is granted everything; the attacker nothing.
    let (friend_id, friend_token) = gateway.user("friend@example.com").await.unwrap();
    gateway
        .post(
            "/api/policies",
            json!({"name": "friend", "effect": "allow", "priority": 1,
                   "subjects": [{"subject_type": "user", "subject_value": friend_id}]}),
        )
        .await
        .unwrap();
    let (attacker_id, attacker_jwt) = gateway.user("mallory@example.com").await.unwrap();
    let (_, created) = gateway
        .api_as(reqwest::Method::POST, "/api/auth/tokens", &attacker_jwt, Some(json!({"name": "attack"})))
        .await
        .unwrap();
    let attacker_api_token = created["token"].as_str().unwrap().to_string();

    // What it may store: nothing, for any key, on any target; not even a token.
    let mut accepted = Vec::new();
    for target in &targets {
        for key in ATTACK_KEYS {
            let path = format!("/api/targets/{target}/env/user/{attacker_id}");
            let body = json!({"key": key, "value": "http://attacker.example/evil"});
            let (status, body) = gateway.api_as(reqwest::Method::POST, &path, &attacker_jwt, Some(body)).await.unwrap();
            if status != 403 {
                accepted.push(format!("{target} {key}: {status} {body}"));
            }
            assert!(
                body["error"].as_str().unwrap().contains(key) || body["error"].as_str().unwrap().contains("no policy")
            );
        }
        let path = format!("/api/targets/{target}/token");
        let (status, _) = gateway
            .api_as(reqwest::Method::POST, &path, &attacker_jwt, Some(json!({"token": "attacker"})))
            .await
            .unwrap();
        if status != 403 {
            accepted.push(format!("{target} token: {status}"));
        }
    }
    assert!(ATTACK_KEYS.len() >= 30);
    assert!(accepted.is_empty(), "accepted: {accepted:#?}");
    // What it sees of the targets: not where they run.
    let (_, listed_targets) = gateway.api_as(reqwest::Method::GET, "/api/targets", &attacker_jwt, None).await.unwrap();
    let shown = listed_targets.to_string();
    assert!(!shown.contains(&rec.url) && !shown.contains("stdio_server.py") && !shown.contains("python3"), "{shown}");

    // What it may do over MCP, with its JWT and its API token, on both endpoints.
    let mut answered = Vec::new();
    for token in [&attacker_jwt, &attacker_api_token] {
        for name in ["rec", "sse", "cmd"] {
            let mut single = McpClient::new(&format!("{}/mcp/{name}", gateway.mcp), token);
            let refused = single
                .request(
                    "initialize",
                    json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "m", "version": "0"}}),
                )
                .await
                .unwrap();
            assert_eq!(refused.status, 404, "/mcp/{name}: {:?}", refused.messages);
            let legacy = gateway
                .http
                .get(format!("{}/mcp/{name}", gateway.mcp))
                .bearer_auth(token)
                .header("accept", "text/event-stream")
                .send()
                .await
                .unwrap();
            assert_eq!(legacy.status(), 404, "legacy GET /mcp/{name}");
        }
        let mut aggregate = McpClient::new(&format!("{}/mcp", gateway.mcp), token);
        aggregate.initialize().await.unwrap();
        for (method, params) in requests() {
            let answer = aggregate.request(method, params.clone()).await.unwrap();
            let message = answer.message();
            let got_something = if method.ends_with("/list") { listed(message) > 0 } else { !is_error(message) };
            if got_something && method != "logging/setLevel" {
                answered.push(format!("{method} {params}: {message}"));
            }
        }
        for (method, params) in [
            ("notifications/roots/list_changed", json!({})),
            ("notifications/cancelled", json!({"requestId": 1})),
            ("notifications/initialized", json!({})),
        ] {
            assert_eq!(aggregate.notify(method, params).await.unwrap().status, 202);
        }
        // The legacy HTTP+SSE transport: the same requests, the answers on the stream.
        answered.extend(legacy_session(&gateway, token).await);
    }
    assert!(answered.is_empty(), "answered: {answered:#?}");

    // Nothing reached an upstream, and no process started.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rec.count(), 0, "the streamable upstream was contacted: {:?}", rec.received.lock().unwrap());
    assert_eq!(sse.count(), 0, "the SSE upstream was contacted");
    assert!(!marker.exists(), "a STDIO process started");
    assert!(gateway.data_plane().gateway().pool.processes().is_empty());

    // The control: the granted account reaches all three, so the recorders and marker work.
    let mut friend = McpClient::new(&format!("{}/mcp", gateway.mcp), &friend_token);
    friend.initialize().await.unwrap();
    let echoed = friend.call("rec_echo", json!({"message": "hi"})).await.unwrap();
    assert!(!is_error(&echoed), "{echoed}");
    let echoed = friend.call("cmd_echo", json!({"message": "hi"})).await.unwrap();
    assert!(!is_error(&echoed), "{echoed}");
    assert!(rec.count() > 0 && marker.exists());
    // The default token reached the upstream the friend used, as a header, never the client's.
    let calls = rec.calls("tools/call");
    assert_eq!(calls[0].headers["authorization"], "Bearer CANARY-default-token");
    gateway.stop().await;
}

/// Runs [`requests`] over the legacy HTTP+SSE transport on `/mcp`; what was answered without an
/// error (or listed something).
async fn legacy_session(gateway: &Gateway, token: &str) -> Vec<String> {
    let stream = gateway
        .http
        .get(format!("{}/mcp", gateway.mcp))
        .bearer_auth(token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut events =
        Events { body: Box::pin(stream.bytes_stream()), parser: EventParser::new(1 << 20), ready: Vec::new() };
    let endpoint = events.next().await;
    assert_eq!(endpoint.event, "endpoint");
    let post = |message: Value| {
        let request = gateway
            .http
            .post(format!("{}{}", gateway.mcp, endpoint.data))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .json(&message);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let initialize = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "m", "version": "0"}}});
    assert_eq!(post(initialize).await, 202);
    assert!(events.next().await.data.contains("\"result\""));
    let mut answered = Vec::new();
    for (i, (method, params)) in requests().into_iter().enumerate() {
        let id = i + 1;
        assert_eq!(post(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})).await, 202);
        let message: Value = loop {
            let event = events.next().await;
            let message: Value = serde_json::from_str(&event.data).unwrap();
            if message["id"] == id {
                break message;
            }
        };
        let got_something = if method.ends_with("/list") { listed(&message) > 0 } else { !is_error(&message) };
        if got_something && method != "logging/setLevel" {
            answered.push(format!("legacy {method} {params}: {message}"));
        }
    }
    answered
}

/// The events of an SSE response, one at a time.
struct Events {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    parser: EventParser,
    ready: Vec<reflow_data_plane::upstream::event_stream::Event>,
}

impl Events {
    async fn next(&mut self) -> reflow_data_plane::upstream::event_stream::Event {
        loop {
            if !self.ready.is_empty() {
                return self.ready.remove(0);
            }
            let chunk =
                tokio::time::timeout(Duration::from_secs(10), self.body.next()).await.unwrap().unwrap().unwrap();
            self.parser.feed(&chunk, &mut self.ready).unwrap();
        }
    }
}
