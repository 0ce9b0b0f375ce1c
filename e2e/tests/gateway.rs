//! The gateway's own guarantees, end to end: policy on list and call (crafted names included),
//! credential injection without leaks, upstream failure, list changes, and the answers to bad
//! input the specification prescribes.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reflow_data_plane::mcp::McpSettings;
use reflow_e2e::client::McpClient;
use reflow_e2e::harness::*;
use serde_json::{json, Value};

fn text(response: &Value) -> String {
    response.pointer("/result/content/0/text").and_then(Value::as_str).unwrap_or_default().to_string()
}

/// A gateway in front of server-everything (target `everything`, `mode`), everyone allowed,
/// and an initialised admin session on `/mcp`.
async fn everything_session(mode: Mode) -> (Gateway, Upstream, String, McpClient) {
    let gateway = Gateway::start().await.unwrap();
    let upstream = everything(mode, None).await.unwrap();
    let target = gateway.target("everything", "streamable-http", &upstream.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let mut client = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    client.initialize().await.unwrap();
    (gateway, upstream, target, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_listing_and_calling_alike_and_crafted_names_do_not_bypass_a_deny() {
    let gateway = Gateway::start().await.unwrap();
    let upstream = everything(Mode::StreamableHttp, None).await.unwrap();
    let target = gateway.target("everything", "streamable-http", &upstream.url).await.unwrap();
    let mut client = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    client.initialize().await.unwrap();

    // Default deny: nothing listed, nothing callable; a target without any grant is not even
    // named (its tools are unknown, not "not allowed").
    assert!(client.tool_names().await.unwrap().is_empty());
    let denied = client.call("everything_echo", json!({"message": "x"})).await.unwrap();
    assert_eq!(denied["error"]["code"], -32602, "{denied}");
    assert!(denied["error"]["message"].as_str().unwrap().contains("unknown tool"), "{denied}");

    gateway.allow_everyone().await.unwrap();
    gateway.deny_tools(&target, "echo").await.unwrap();
    let names = client.tool_names().await.unwrap();
    assert!(names.contains(&"everything_get-sum".to_string()), "{names:?}");
    assert!(!names.contains(&"everything_echo".to_string()), "a denied tool is not listed: {names:?}");
    // Everything listed is callable (list = call), and the denied tool is not.
    let sum = client.call("everything_get-sum", json!({"a": 1, "b": 2})).await.unwrap();
    assert!(text(&sum).contains('3'), "{sum}");
    let denied = client.call("everything_echo", json!({"message": "x"})).await.unwrap();
    assert_eq!(denied["error"]["code"], -32003);
    assert!(denied["error"]["message"].as_str().unwrap().contains("not allowed"));

    // Crafted names never reach the denied tool: each is refused by the gateway or unknown
    // upstream, and no answer is the echo tool's.
    for crafted in [
        "everything_ECHO",
        "Everything_echo",
        "everything_\u{435}cho",   // Cyrillic е
        "everything_ec\u{200b}ho", // zero-width space
        "everything_echo ",
        " everything_echo",
        "everything__echo",
        "everything-echo",
        "everything_echo\u{0}",
        "everything_echo/..",
        "everything",
        "_echo",
    ] {
        let answer = client.call(crafted, json!({"message": "bypass"})).await.unwrap();
        assert!(!text(&answer).contains("Echo: bypass"), "{crafted:?} reached the denied tool: {answer}");
    }

    // Duplicate keys: the gateway decides on the name it parsed (the last), and forwards only
    // that one, so the upstream cannot see a different name than the policy did.
    let dup = |first: &str, second: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":77,"method":"tools/call","params":{{"name":"{first}","name":"{second}","arguments":{{"a":1,"b":2,"message":"bypass"}}}}}}"#
        )
    };
    let answer = client.send(dup("everything_get-sum", "everything_echo")).await.unwrap();
    assert_eq!(answer.error_code(), Some(-32003), "{:?}", answer.messages);
    let answer = client.send(dup("everything_echo", "everything_get-sum")).await.unwrap();
    assert!(text(answer.message()).contains('3') && !text(answer.message()).contains("Echo"), "{:?}", answer.messages);

    // Batches are refused whole.
    let batch = json!([{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "everything_echo", "arguments": {"message": "bypass"}}}]);
    let answer = client.send(batch.to_string()).await.unwrap();
    assert_eq!(answer.status, 400);
    assert_eq!(answer.error_code(), Some(-32600));
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_change_tells_open_sessions_their_list_changed() {
    let (gateway, _upstream, target, mut client) = everything_session(Mode::StreamableHttp).await;
    assert!(client.tool_names().await.unwrap().contains(&"everything_get-sum".to_string()));
    let stream = client.open_stream().await.unwrap();
    assert_eq!(stream.status(), 200);
    // A second GET stream on the same session is refused while the first is open.
    assert_eq!(client.open_stream().await.unwrap().status(), 409);
    gateway.deny_tools(&target, "get-sum").await.unwrap();
    wait_for_event(stream, "notifications/tools/list_changed", Duration::from_secs(10)).await;
    assert!(!client.tool_names().await.unwrap().contains(&"everything_get-sum".to_string()));

    // A target added is a change of the list too, though no item it was shown changed.
    let mut other = McpClient::new(&client.url, &client.token);
    other.initialize().await.unwrap();
    assert!(!other.tool_names().await.unwrap().iter().any(|n| n.starts_with("added_")));
    let stream = other.open_stream().await.unwrap();
    let (added, _) = fast_upstream(2).await.unwrap();
    gateway.target("added", "streamable-http", &added).await.unwrap();
    wait_for_event(stream, "notifications/tools/list_changed", Duration::from_secs(10)).await;
    assert!(other.tool_names().await.unwrap().contains(&"added_tool1".to_string()));
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_lists_are_shared_by_a_users_sessions_until_an_upstream_changes_its_list() {
    use std::sync::atomic::Ordering::Relaxed;
    let gateway = Gateway::start().await.unwrap();
    let (fast_url, fast_listed) = fast_upstream(3).await.unwrap();
    gateway.target("fast", "streamable-http", &fast_url).await.unwrap();
    let python = python_server("example_server.py", &[]).await.unwrap();
    gateway.target("py", "streamable-http", &python.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let url = format!("{}/mcp", gateway.mcp);
    let session = |token: &str| {
        let mut client = McpClient::new(&url, token);
        async move {
            client.initialize().await.unwrap();
            client
        }
    };

    let mut first = session(&gateway.admin_token).await;
    let names = first.tool_names().await.unwrap();
    assert!(names.contains(&"fast_tool2".to_string()) && names.contains(&"py_grow".to_string()), "{names:?}");
    assert_eq!(fast_listed.load(Relaxed), 1);
    // Warm: the same session and another session of the same user are served the merge.
    assert_eq!(first.tool_names().await.unwrap(), names);
    let mut second = session(&gateway.admin_token).await;
    assert_eq!(second.tool_names().await.unwrap(), names);
    assert_eq!(fast_listed.load(Relaxed), 1, "no upstream was asked again");
    // Another user has a merge of their own.
    let (_, other_token) = gateway.user("lists@example.com").await.unwrap();
    let mut other = session(&other_token).await;
    assert_eq!(other.tool_names().await.unwrap(), names);
    assert_eq!(fast_listed.load(Relaxed), 2);

    // An upstream's list_changed (sent on its own stream of the first session's upstream
    // session) reaches the sessions of everyone served a merge that included that target, and
    // ends the merge.
    let stream = second.open_stream().await.unwrap();
    assert_eq!(text(&first.call("py_grow", json!({})).await.unwrap()), "grown_1");
    wait_for_event(stream, "notifications/tools/list_changed", Duration::from_secs(10)).await;
    let names = second.tool_names().await.unwrap();
    assert!(names.contains(&"py_grown_1".to_string()), "{names:?}");
    assert_eq!(fast_listed.load(Relaxed), 3, "the merge was made anew");
    gateway.stop().await;
}

/// Collects everything the gateway logs in this test process.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_injected_by_precedence_and_never_leak() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt().with_env_filter("debug").with_writer(move || writer.clone()).with_ansi(false).init();

    let gateway = Gateway::start().await.unwrap();
    let headers = python_server("headers_server.py", &[]).await.unwrap();
    let echo = everything(Mode::StreamableHttp, None).await.unwrap();
    let target = gateway
        .post(
            "/api/targets",
            json!({"name": "hdr", "transport_type": "streamable-http", "url": headers.url, "isolation_boundary": "per_user"}),
        )
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let other = gateway.target("other", "streamable-http", &echo.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let (bob, bob_token) = gateway.user("bob@example.com").await.unwrap();
    let (_carol, carol_token) = gateway.user("carol@example.com").await.unwrap();
    gateway.admin(reqwest::Method::PUT, &format!("/api/users/{bob}"), Some(json!({"groups": ["ops"]}))).await.unwrap();
    gateway
        .post(&format!("/api/targets/{target}/tokens/default"), json!({"token": "canary-default-7c1e"}))
        .await
        .unwrap();
    gateway
        .post(&format!("/api/targets/{target}/tokens/user/{bob}"), json!({"token": "canary-bob-93ad"}))
        .await
        .unwrap();
    gateway
        .post(&format!("/api/targets/{target}/env/default"), json!({"key": "REGION", "value": "eu-canary-55"}))
        .await
        .unwrap();
    gateway
        .post(&format!("/api/targets/{target}/env/group/ops"), json!({"key": "REGION", "value": "ops-canary-66"}))
        .await
        .unwrap();
    gateway.post(&format!("/api/targets/{other}/tokens/default"), json!({"token": "canary-other-4411"})).await.unwrap();

    let seen = |client_token: String| {
        let url = format!("{}/mcp", gateway.mcp);
        async move {
            let mut client = McpClient::new(&url, &client_token);
            client.initialize().await.unwrap();
            let answer = client.call("hdr_headers", json!({})).await.unwrap();
            let headers: Value = serde_json::from_str(&text(&answer)).unwrap_or_else(|_| panic!("{answer}"));
            (client, headers)
        }
    };
    let (_, as_carol) = seen(carol_token.clone()).await;
    assert_eq!(as_carol["authorization"], "Bearer canary-default-7c1e", "{as_carol}");
    assert_eq!(as_carol["x-env-region"], "eu-canary-55");
    let (mut bob_client, as_bob) = seen(bob_token.clone()).await;
    assert_eq!(as_bob["authorization"], "Bearer canary-bob-93ad", "user beats default: {as_bob}");
    assert_eq!(as_bob["x-env-region"], "ops-canary-66", "group beats default");
    let everything_seen = format!("{as_carol}{as_bob}");
    assert!(
        !everything_seen.contains(&carol_token) && !everything_seen.contains(&bob_token),
        "a client token was forwarded"
    );
    assert!(!everything_seen.contains("canary-other"), "another target's credential was sent");

    // A target whose token goes in a header of its own.
    let keyed = gateway
        .post(
            "/api/targets",
            json!({"name": "keyed", "transport_type": "streamable-http", "url": headers.url,
                   "auth_type": "header", "auth_header_name": "X-Api-Key"}),
        )
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    gateway.post(&format!("/api/targets/{keyed}/tokens/default"), json!({"token": "canary-keyed-2b2b"})).await.unwrap();
    let answer = bob_client.call("keyed_headers", json!({})).await.unwrap();
    let keyed_seen: Value = serde_json::from_str(&text(&answer)).unwrap_or_else(|_| panic!("{answer}"));
    assert_eq!(keyed_seen["x-api-key"], "canary-keyed-2b2b", "{keyed_seen}");
    assert!(
        keyed_seen.get("authorization").is_none(),
        "no Authorization when the token has its own header: {keyed_seen}"
    );

    // A credential change reaches the open session's next call.
    gateway
        .post(&format!("/api/targets/{target}/tokens/user/{bob}"), json!({"token": "canary-bob-rotated"}))
        .await
        .unwrap();
    let answer = bob_client.call("hdr_headers", json!({})).await.unwrap();
    let rotated: Value = serde_json::from_str(&text(&answer)).unwrap();
    assert_eq!(rotated["authorization"], "Bearer canary-bob-rotated");

    // Error bodies carry no credential either.
    let error = bob_client.call("hdr_nope", json!({})).await.unwrap();
    let unknown = bob_client.call("missing_tool", json!({})).await.unwrap();
    let bodies = format!("{error}{unknown}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(logged.contains("policy decision"), "the capture works");
    for secret in [
        "canary-default-7c1e",
        "canary-bob-93ad",
        "canary-bob-rotated",
        "eu-canary-55",
        "ops-canary-66",
        "canary-other-4411",
        &bob_token,
        &carol_token,
    ] {
        assert!(!logged.contains(secret), "{secret} appears in the logs");
        assert!(!bodies.contains(secret), "{secret} appears in an error body");
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_going_down_mid_session_fails_its_calls_only_and_recovers() {
    let settings = McpSettings { list_timeout: Duration::from_secs(3), ..McpSettings::default() };
    let gateway = Gateway::start_with(settings).await.unwrap();
    let mut flaky = everything(Mode::StreamableHttp, None).await.unwrap();
    let steady = everything(Mode::Sse, None).await.unwrap();
    gateway.target("flaky", "streamable-http", &flaky.url).await.unwrap();
    gateway.target("steady", "sse", &steady.url).await.unwrap();
    // An upstream that accepts connections and never answers.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_url = format!("http://{}/mcp", hanging.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hanging.accept().await {
            held.push(socket);
        }
    });
    gateway.target("hanging", "streamable-http", &hanging_url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let mut client = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    client.initialize().await.unwrap();
    // The hanging upstream costs the list its time bound, not its answer.
    let started = Instant::now();
    let names = client.tool_names().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(6), "listing waited {:?}", started.elapsed());
    assert!(names.contains(&"flaky_echo".to_string()) && names.contains(&"steady_echo".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("hanging_")));
    assert_eq!(text(&client.call("flaky_echo", json!({"message": "up"})).await.unwrap()), "Echo: up");

    flaky.process.kill();
    let _ = flaky.process.child.wait().await;
    let started = Instant::now();
    let failed = client.call("flaky_echo", json!({"message": "down"})).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "a dead upstream is reported quickly");
    assert_eq!(failed["error"]["code"], -32000, "{failed}");
    assert!(failed["error"]["message"].as_str().unwrap().contains("flaky"), "{failed}");
    // The other target still lists and answers.
    let names = client.tool_names().await.unwrap();
    assert!(names.contains(&"steady_echo".to_string()) && !names.iter().any(|n| n.starts_with("flaky_")), "{names:?}");
    assert_eq!(text(&client.call("steady_echo", json!({"message": "ok"})).await.unwrap()), "Echo: ok");

    // Back on the same port: the gateway opens a new upstream session by itself.
    let _revived = everything(Mode::StreamableHttp, Some(flaky.port)).await.unwrap();
    assert_eq!(text(&client.call("flaky_echo", json!({"message": "again"})).await.unwrap()), "Echo: again");
    let ready: Value = reqwest::get(format!("{}/ready", gateway.mcp)).await.unwrap().json().await.unwrap();
    assert!(ready["upstream_failures"]["flaky"].as_u64().unwrap() >= 1, "failures are counted: {ready}");
    gateway.stop().await;
}

/// Reads an SSE response until `needle` appears, within `limit`.
async fn wait_for_event(response: reqwest::Response, needle: &str, limit: Duration) -> String {
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    let deadline = Instant::now() + limit;
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout_at(deadline.into(), futures::StreamExt::next(&mut body))
            .await
            .unwrap_or_else(|_| panic!("no {needle} within {limit:?}; saw {seen}"))
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_an_upstream_sends_on_its_own_reach_the_client_stream() {
    let (gateway, _upstream, _, mut client) = everything_session(Mode::StreamableHttp).await;
    assert!(!client.tool_names().await.unwrap().is_empty());
    let level = client.request("logging/setLevel", json!({"level": "debug"})).await.unwrap();
    assert_eq!(level.message()["result"], json!({}), "{:?}", level.messages);
    let toggled = client.call("everything_toggle-simulated-logging", json!({})).await.unwrap();
    assert!(toggled.get("result").is_some(), "{toggled}");
    let stream = client.open_stream().await.unwrap();
    assert_eq!(stream.status(), 200);
    // server-everything logs every 5 s on its own stream; the gateway relays it.
    let seen = wait_for_event(stream, "notifications/message", Duration::from_secs(15)).await;
    assert!(seen.contains("\"level\""), "{seen}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamable_target_that_only_speaks_legacy_sse_is_detected() {
    // Declared as Streamable HTTP, but the server only has the legacy transport: its refusal of
    // the POST makes the gateway fall back to SSE.
    let (gateway, _sse, _, mut client) = everything_session(Mode::Sse).await;
    assert!(client.tool_names().await.unwrap().contains(&"everything_echo".to_string()));
    assert_eq!(text(&client.call("everything_echo", json!({"message": "detected"})).await.unwrap()), "Echo: detected");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_stops_at_once() {
    let (gateway, _upstream, _, mut client) = everything_session(Mode::StreamableHttp).await;
    let long = json!({"jsonrpc": "2.0", "id": "slow-1", "method": "tools/call",
                      "params": {"name": "everything_trigger-long-running-operation", "arguments": {"duration": 30, "steps": 30},
                                 "_meta": {"progressToken": "p-1"}}});
    let pending =
        tokio::spawn(McpClient::read(client.post().header("content-type", "application/json").body(long.to_string())));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let cancel = client
        .notify("notifications/cancelled", json!({"requestId": "slow-1", "reason": "changed my mind"}))
        .await
        .unwrap();
    assert_eq!(cancel.status, 202);
    let answer = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the reply ends soon after the cancellation")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        answer.messages.iter().any(|m| m["method"] == "notifications/progress"),
        "progress came first: {:?}",
        answer.messages
    );
    assert!(!answer.messages.iter().any(|m| m.pointer("/result/content").is_some()), "no result after cancelling");
    // The session goes on.
    assert_eq!(
        text(&client.call("everything_echo", json!({"message": "still here"})).await.unwrap()),
        "Echo: still here"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_status_the_specification_prescribes() {
    // mcp.allowed_hosts left at its default: the names a loopback listener serves.
    let settings = McpSettings { max_body_bytes: 2048, ..McpSettings::default() };
    let gateway = Gateway::start_with(settings).await.unwrap();
    let url = format!("{}/mcp", gateway.mcp);
    let mut client = McpClient::new(&url, &gateway.admin_token);
    let init = client.initialize().await.unwrap();
    assert_eq!(init["result"]["protocolVersion"], "2025-11-25");
    let session = client.session.clone().expect("a session id is issued");
    assert!(session.len() >= 32);

    let expect = |answer: reflow_e2e::client::Answer, status: u16, code: i64| {
        assert_eq!(answer.status, status, "{:?}", answer.messages);
        assert_eq!(answer.error_code(), Some(code), "{:?}", answer.messages);
        assert_eq!(answer.message()["jsonrpc"], "2.0");
    };
    expect(client.send("{not json".into()).await.unwrap(), 400, -32700);
    expect(client.send(r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#.into()).await.unwrap(), 400, -32600);
    expect(McpClient::read(client.post().header("content-type", "text/plain").body("{}")).await.unwrap(), 415, -32600);
    let big = json!({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "x".repeat(4096)}}).to_string();
    expect(client.send(big).await.unwrap(), 413, -32600);
    let html_only = client
        .http
        .post(&url)
        .bearer_auth(&client.token)
        .header("mcp-session-id", &session)
        .header("content-type", "application/json")
        .header("accept", "text/html")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#);
    expect(McpClient::read(html_only).await.unwrap(), 406, -32600);
    // A version nobody speaks: -32022, naming those spoken.
    let unsupported = McpClient::read(
        client
            .http
            .post(&url)
            .bearer_auth(&client.token)
            .header("mcp-session-id", &session)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("mcp-protocol-version", "1999-01-01")
            .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
    )
    .await
    .unwrap();
    assert!(format!("{:?}", unsupported.messages).contains("2025-11-25"), "{:?}", unsupported.messages);
    expect(unsupported, 400, -32022);
    // Two versions at once: the headers contradict each other.
    expect(
        McpClient::read(
            client
                .post()
                .header("content-type", "application/json")
                .header("mcp-protocol-version", "1999-01-01")
                .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
        )
        .await
        .unwrap(),
        400,
        -32020,
    );

    // Methods: ping locally, unknown → -32601.
    assert_eq!(client.request("ping", json!({})).await.unwrap().message()["result"], json!({}));
    let unknown = client.request("tools/destroy", json!({})).await.unwrap();
    assert_eq!((unknown.status, unknown.error_code()), (200, Some(-32601)));
    let notification = client.notify("notifications/whatever", json!({})).await.unwrap();
    assert_eq!(notification.status, 202);

    // Sessions: missing → 400; unknown → 404; another user's → 404; after DELETE → 404.
    let mut anonymous = client.clone();
    anonymous.session = None;
    expect(anonymous.request("tools/list", json!({})).await.unwrap(), 400, -32600);
    let mut forged = client.clone();
    forged.session = Some("x".repeat(43));
    expect(forged.request("tools/list", json!({})).await.unwrap(), 404, -32600);
    let (_, other_token) = gateway.user("mallory@example.com").await.unwrap();
    let mut hijacker = McpClient::new(&url, &other_token);
    hijacker.session = Some(session.clone());
    expect(hijacker.request("tools/list", json!({})).await.unwrap(), 404, -32600);
    assert_eq!(hijacker.delete().await.unwrap(), 404, "another user cannot end the session");
    assert_eq!(client.delete().await.unwrap(), 204);
    expect(client.request("tools/list", json!({})).await.unwrap(), 404, -32600);

    // Origin and Host: a foreign page or a rebound host name is refused.
    let mut fresh = McpClient::new(&url, &gateway.admin_token);
    fresh.initialize().await.unwrap();
    let ping = r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;
    expect(
        McpClient::read(
            fresh.post().header("content-type", "application/json").header("origin", "https://evil.example").body(ping),
        )
        .await
        .unwrap(),
        403,
        -32600,
    );
    expect(
        McpClient::read(
            fresh.post().header("content-type", "application/json").header("host", "evil.example").body(ping),
        )
        .await
        .unwrap(),
        403,
        -32600,
    );
    // A rebound request: Host and Origin agree, and both name the foreign site.
    expect(
        McpClient::read(
            fresh
                .post()
                .header("content-type", "application/json")
                .header("host", "evil.example:3000")
                .header("origin", "http://evil.example:3000")
                .body(ping),
        )
        .await
        .unwrap(),
        403,
        -32600,
    );
    let same_origin = gateway.mcp.clone();
    let ok = McpClient::read(
        fresh.post().header("content-type", "application/json").header("origin", same_origin).body(ping),
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200);
    // A single-target endpoint for a target that does not exist.
    let mut nowhere = McpClient::new(&format!("{url}/nowhere"), &gateway.admin_token);
    assert!(nowhere.initialize().await.is_err());
    let answer = nowhere
        .request(
            "initialize",
            json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "x", "version": "0"}}),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 404);
    gateway.stop().await;
}
