//! The 2026-07-28 protocol (the stateless era) through the gateway to a session-era upstream
//! (server-everything): the official Python SDK client in its `2026-07-28` and `auto` modes does
//! everything a client does, sampling and elicitation included (bridged to `input_required`
//! results), with no session; the session era still works on the same endpoint; and requests are
//! checked and answered as the revision says (headers against the body, versions, removed
//! methods, `resultType`, ids in every error, policy as in the session era), and list changes
//! reach `subscriptions/listen` streams.

use std::time::Duration;

use reflow_data_plane::mcp::McpSettings;
use reflow_e2e::harness::{
    authorizing_forwarder, everything, python, python_server, run_conformance_of, workspace, Gateway, Mode,
};
use serde_json::{json, Value};

/// `e2e/peers/modern_client.py` in `mode`: its report.
async fn modern_client(url: &str, token: &str, mode: &str) -> Value {
    peer_client("modern_client.py", &[url, token, mode]).await
}

/// One of the client scripts in `e2e/peers` with `args`: the JSON line it printed last.
async fn peer_client(script: &str, args: &[&str]) -> Value {
    reflow_e2e::harness::ensure_peers();
    let run = tokio::process::Command::new(python())
        .arg(workspace().join("e2e/peers").join(script))
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run).await.expect("the client ends in time").unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|_| panic!("no report: {stdout}\n{}", String::from_utf8_lossy(&output.stderr)))
}

fn check_report(report: &Value, mode: &str) {
    assert!(report.get("error").is_none(), "{mode}: {report}");
    assert!(report["tools"].as_u64().unwrap() >= 10, "{mode}: {report}");
    assert!(report["echo"].as_str().unwrap().contains("hello modern"), "{mode}: {report}");
    assert!(!report["prompt"].as_str().unwrap().is_empty(), "{mode}: {report}");
    assert!(report["read"].as_u64().unwrap() >= 1, "{mode}: {report}");
    let progress = report["progress"].as_array().unwrap();
    assert!(progress.len() >= 3, "{mode}: progress reaches the client: {report}");
    let values: Vec<f64> = progress.iter().map(|p| p[0].as_f64().unwrap()).collect();
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{mode}: progress in order: {values:?}");
    assert!(report["sampled"].as_str().unwrap().contains("sampled reply"), "{mode}: {report}");
    assert_eq!(report["samplings"], 1, "{mode}: {report}");
    assert!(report["elicited"].as_str().unwrap().contains("Ada Lovelace"), "{mode}: {report}");
    assert_eq!(report["elicitations"], 1, "{mode}: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_in_both_eras_reaches_a_session_era_upstream() {
    let gateway = Gateway::start().await.unwrap();
    let upstream = everything(Mode::StreamableHttp, None).await.unwrap();
    gateway.target("everything", "streamable-http", &upstream.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let url = format!("{}/mcp/everything", gateway.mcp);
    for mode in ["2026-07-28", "auto"] {
        let report = modern_client(&url, &gateway.admin_token, mode).await;
        check_report(&report, mode);
        assert_eq!(report["version"], "2026-07-28", "{mode}: {report}");
        assert_eq!(report["headers"], json!([]), "{mode}: the stateless era has no session ids");
    }
    let legacy = modern_client(&url, &gateway.admin_token, "legacy").await;
    check_report(&legacy, "legacy");
    assert_eq!(legacy["version"], "2025-11-25");
    assert!(!legacy["headers"].as_array().unwrap().is_empty(), "the session era still has sessions");
    gateway.stop().await;
}

/// A stateless-era POST of `method` with `params` (the `_meta` fields added unless `meta` is
/// given), headers as `headers` say: (status, headers, body).
async fn post(
    url: &str,
    token: &str,
    method: &str,
    params: Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 41, "method": method, "params": params}));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .ok()
        .or_else(|| {
            text.lines().rev().filter_map(|l| l.strip_prefix("data:")).find_map(|d| serde_json::from_str(d.trim()).ok())
        })
        .unwrap_or(Value::Null);
    (status, headers, body)
}

fn meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
    })
}

fn modern_headers(method: &str) -> Vec<(&'static str, String)> {
    vec![("mcp-protocol-version", "2026-07-28".to_string()), ("mcp-method", method.to_string())]
}

async fn call(url: &str, token: &str, method: &str, mut params: Value, name: Option<&str>) -> (u16, Value) {
    params["_meta"] = meta();
    let mut headers = modern_headers(method);
    if let Some(name) = name {
        headers.push(("mcp-name", name.to_string()));
    }
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let (status, _, body) = post(url, token, method, params, &headers).await;
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_requests_are_checked_and_answered_as_the_revision_says() {
    let gateway = Gateway::start().await.unwrap();
    let upstream = everything(Mode::StreamableHttp, None).await.unwrap();
    let target = gateway.target("everything", "streamable-http", &upstream.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    gateway.deny_tools(&target, "get-env").await.unwrap();
    let url = format!("{}/mcp/everything", gateway.mcp);
    let token = gateway.admin_token.clone();

    let (status, discovered) = call(&url, &token, "server/discover", json!({}), None).await;
    assert_eq!(status, 200, "{discovered}");
    let result = &discovered["result"];
    assert_eq!(result["resultType"], "complete");
    let versions = result["supportedVersions"].as_array().unwrap();
    assert!(versions.contains(&json!("2026-07-28")) && versions.contains(&json!("2025-11-25")), "{result}");
    assert!(result["capabilities"]["tools"].is_object(), "the upstream's capabilities: {result}");
    assert_eq!(result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"], "mcp-servers/everything");

    let (status, headers, listed) = {
        let mut params = json!({});
        params["_meta"] = meta();
        post(
            &url,
            &token,
            "tools/list",
            params,
            &[("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/list")],
        )
        .await
    };
    assert_eq!(status, 200, "{listed}");
    assert!(!headers.contains_key("mcp-session-id"), "no session in the stateless era");
    let result = &listed["result"];
    assert_eq!(
        (&result["resultType"], &result["ttlMs"], &result["cacheScope"]),
        (&json!("complete"), &json!(0), &json!("private"))
    );
    let names: Vec<&str> = result["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"echo") && !names.contains(&"get-env"),
        "policy filters the list as in the session era: {names:?}"
    );

    let (status, echoed) =
        call(&url, &token, "tools/call", json!({"name": "echo", "arguments": {"message": "hi"}}), Some("echo")).await;
    assert_eq!(status, 200, "{echoed}");
    assert_eq!(echoed["id"], 41);
    assert_eq!(echoed["result"]["resultType"], "complete");
    assert!(echoed["result"]["content"][0]["text"].as_str().unwrap().contains("hi"));
    // Stateless clients choose their ids alone; several at once with the same id, through one
    // bridge to one upstream session, each get their own answer.
    let concurrent = (0..8).map(|n| {
        let (url, token) = (url.clone(), token.clone());
        async move {
            let params = json!({"name": "trigger-long-running-operation", "arguments": {"duration": 1, "steps": 2}});
            let message = format!("m{n}");
            let (_, echoed) = call(
                &url,
                &token,
                "tools/call",
                json!({"name": "echo", "arguments": {"message": message}}),
                Some("echo"),
            )
            .await;
            let (_, slow) = call(&url, &token, "tools/call", params, Some("trigger-long-running-operation")).await;
            (message, echoed, slow)
        }
    });
    for (message, echoed, slow) in futures::future::join_all(concurrent).await {
        assert_eq!(echoed["id"], 41);
        assert!(echoed["result"]["content"][0]["text"].as_str().unwrap().ends_with(&message), "{message}: {echoed}");
        assert_eq!(slow["result"]["resultType"], "complete", "{slow}");
    }
    let (_, denied) =
        call(&url, &token, "tools/call", json!({"name": "get-env", "arguments": {}}), Some("get-env")).await;
    assert_eq!(denied["error"]["code"], -32003, "a denied tool is denied in this era too: {denied}");
    assert_eq!(denied["id"], 41);

    // Checks, each answered with the request's id.
    let expect = |(status, body): (u16, Value), want_status: u16, want_code: i64, what: &str| {
        assert_eq!(status, want_status, "{what}: {body}");
        assert_eq!(body["error"]["code"], want_code, "{what}: {body}");
        assert_eq!(body["id"], 41, "{what}: the error names the request: {body}");
    };
    let hdrs = |method: &str, name: Option<&str>| {
        let mut headers = modern_headers(method);
        if let Some(name) = name {
            headers.push(("mcp-name", name.to_string()));
        }
        headers
    };
    let send = |method: &'static str, params: Value, headers: Vec<(&'static str, String)>| {
        let (url, token) = (url.clone(), token.clone());
        async move {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let (status, _, body) = post(&url, &token, method, params, &headers).await;
            (status, body)
        }
    };
    expect(send("tools/list", json!({}), hdrs("tools/list", None)).await, 400, -32602, "no _meta");
    let mut no_capabilities = json!({"_meta": meta()});
    no_capabilities["_meta"].as_object_mut().unwrap().remove("io.modelcontextprotocol/clientCapabilities");
    expect(send("tools/list", no_capabilities, hdrs("tools/list", None)).await, 400, -32602, "no capabilities");
    let with_meta = |mut params: Value| {
        params["_meta"] = meta();
        params
    };
    expect(send("tools/list", with_meta(json!({})), hdrs("tools/call", None)).await, 400, -32020, "Mcp-Method");
    let echo = json!({"name": "echo", "arguments": {"message": "x"}});
    expect(send("tools/call", with_meta(echo.clone()), hdrs("tools/call", None)).await, 400, -32020, "no Mcp-Name");
    expect(send("tools/call", with_meta(echo.clone()), hdrs("tools/call", Some("add"))).await, 400, -32020, "Mcp-Name");
    let mut future = with_meta(json!({}));
    future["_meta"]["io.modelcontextprotocol/protocolVersion"] = json!("v999");
    let future_headers = vec![("mcp-protocol-version", "v999".to_string()), ("mcp-method", "tools/list".to_string())];
    let (status, refused) = send("tools/list", future.clone(), future_headers).await;
    expect((status, refused.clone()), 400, -32022, "unsupported version");
    assert_eq!(refused["error"]["data"]["requested"], "v999");
    assert!(refused["error"]["data"]["supported"].as_array().unwrap().contains(&json!("2026-07-28")));
    expect(send("tools/list", future, hdrs("tools/list", None)).await, 400, -32020, "header and _meta disagree");
    for removed in
        ["initialize", "ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe", "unknown/method"]
    {
        expect(send(removed, with_meta(json!({})), hdrs(removed, None)).await, 404, -32601, removed);
    }
    let get = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .send()
        .await
        .unwrap();
    assert_eq!(get.status().as_u16(), 405, "no GET streams in the stateless era");
    gateway.stop().await;
}

/// The messages of an SSE response, one at a time.
struct Frames {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl Frames {
    /// A `subscriptions/listen` with id `id` for the notifications `asked`, its stream.
    async fn listen(url: &str, token: &str, id: Value, asked: Value) -> Frames {
        let mut params = json!({"notifications": asked});
        params["_meta"] = meta();
        let response = reqwest::Client::new()
            .post(url)
            .bearer_auth(token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "subscriptions/listen")
            .json(&json!({"jsonrpc": "2.0", "id": id, "method": "subscriptions/listen", "params": params}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        Frames { stream: Box::pin(response.bytes_stream()), buffer: String::new() }
    }

    async fn next(&mut self) -> Value {
        use futures::StreamExt;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")) {
                    return serde_json::from_str(data.trim()).unwrap();
                }
                continue;
            }
            let chunk =
                tokio::time::timeout(Duration::from_secs(20), self.stream.next()).await.expect("a frame in time");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_changes_reach_subscriptions_listen_streams() {
    let gateway = Gateway::start().await.unwrap();
    let upstream = everything(Mode::StreamableHttp, None).await.unwrap();
    let target = gateway.target("everything", "streamable-http", &upstream.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let url = format!("{}/mcp/everything", gateway.mcp);
    let token = gateway.admin_token.clone();
    let (status, _) = call(&url, &token, "tools/list", json!({}), None).await;
    assert_eq!(status, 200);

    let asked = json!({"toolsListChanged": true, "promptsListChanged": false});
    let mut frames = Frames::listen(&url, &token, json!("listen-1"), asked).await;
    let ack = frames.next().await;
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged", "{ack}");
    assert_eq!(ack["params"]["notifications"], json!({"toolsListChanged": true}), "only what was asked and honoured");
    assert_eq!(ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "listen-1");

    // A policy change takes a tool away: the list changed.
    gateway.deny_tools(&target, "echo").await.unwrap();
    let changed = frames.next().await;
    assert_eq!(changed["method"], "notifications/tools/list_changed", "{changed}");
    assert_eq!(changed["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "listen-1");
    gateway.stop().await;
}

/// The conformance suite's server scenarios of both revisions against the project's fixture
/// (`e2e/peers/conformance_server.py`, both eras on one endpoint) alone, then through
/// `/mcp/{target}`: every scenario that passes alone passes through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_of_both_revisions_through_the_gateway_is_conformance_alone() {
    let fixture = python_server("conformance_server.py", &[]).await.unwrap();
    let gateway = Gateway::start().await.unwrap();
    gateway.target("fixture", "streamable-http", &fixture.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    // The suite sends no Authorization header: a forwarder adds the user's token.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let forwarder = authorizing_forwarder(&gateway.mcp, &gateway.admin_token, &shutdown).await.unwrap();
    for requirements in ["2026-07-28", "2025-11-25"] {
        let alone = run_conformance_of(&fixture.url, requirements).await;
        let through = run_conformance_of(&format!("{forwarder}/mcp/fixture"), requirements).await;
        eprintln!("conformance {requirements}, the fixture alone: {alone:?}\nthrough the gateway: {through:?}");
        let passed_alone: Vec<&String> = alone.iter().filter(|(_, ok)| **ok).map(|(name, _)| name).collect();
        assert!(passed_alone.len() >= 20, "{requirements}: the fixture alone passes too little to compare: {alone:?}");
        let lost: Vec<&&String> = passed_alone.iter().filter(|name| through.get(**name) != Some(&true)).collect();
        assert!(
            lost.is_empty(),
            "{requirements}: pass alone, fail through the gateway: {lost:?}\nthrough: {through:?}"
        );
    }
    shutdown.cancel();
    gateway.stop().await;
}

/// An upstream of the stateless era alone (the fixture with `--modern-only`, which refuses
/// `initialize`): clients of both eras reach it, the session-era ones through a session the
/// gateway plays for them (its questions asked as server→client requests); and `/mcp` merges it with a session-era upstream for a stateless
/// client, each spoken to in its own era.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_both_eras_reach_an_upstream_of_the_stateless_era_alone() {
    let modern = python_server("conformance_server.py", &["--modern-only"]).await.unwrap();
    let legacy = everything(Mode::StreamableHttp, None).await.unwrap();
    let gateway = Gateway::start().await.unwrap();
    gateway.target("modern", "streamable-http", &modern.url).await.unwrap();
    gateway.target("everything", "streamable-http", &legacy.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let token = gateway.admin_token.clone();
    let url = format!("{}/mcp/modern", gateway.mcp);
    for (mode, args) in
        [("legacy", vec!["--input-required"]), ("2026-07-28", vec!["--input-required"]), ("auto", vec![])]
    {
        let mut all = vec![url.as_str(), token.as_str(), mode];
        all.extend(args);
        let report = peer_client("fixture_client.py", &all).await;
        assert!(report.get("error").is_none(), "{mode}: {report}");
        assert!(report["tools"].as_u64().unwrap() >= 20, "{mode}: {report}");
        assert_eq!(report["text"], "This is a simple text response for testing.", "{mode}: {report}");
        assert_eq!(report["progress"], json!([0.0, 50.0, 100.0]), "{mode}: progress reaches the client: {report}");
        assert_eq!(report["resource"], "This is the content of the static text resource.", "{mode}");
        assert_eq!(report["prompt"], "This is a simple prompt for testing.", "{mode}");
        assert_eq!(report["cancelled"], 1, "{mode}: the call the client gave up on is cancelled upstream: {report}");
        if mode != "auto" {
            // The upstream's own input_required results: passed through to a stateless client,
            // asked as elicitation requests of a session-era one (the upstream asked again with
            // its answers and its requestState), over two rounds too.
            assert_eq!(report["elicited"], "Hello, Ada!", "{mode}: {report}");
            assert_eq!(report["rounds"], "Multi-round complete", "{mode}: {report}");
        }
    }

    // The MCP Inspector's CLI, a session-era client, lists and calls.
    let inspector = reflow_e2e::harness::node_package("@modelcontextprotocol/inspector/cli/build/index.js");
    let header = format!("Authorization: Bearer {token}");
    let inspect = |args: Vec<&str>| {
        let mut command = tokio::process::Command::new(reflow_e2e::harness::node());
        command.arg(&inspector).arg(&url).args(args).args(["--header", &header]);
        async move { reflow_e2e::harness::run(&mut command, Duration::from_secs(60)).await.unwrap() }
    };
    let (code, stdout, stderr) = inspect(vec!["--method", "tools/list"]).await;
    assert_eq!(code, 0, "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    assert!(listed["tools"].as_array().unwrap().iter().any(|t| t["name"] == "test_simple_text"), "{listed}");
    let (code, stdout, stderr) = inspect(vec!["--method", "tools/call", "--tool-name", "test_simple_text"]).await;
    assert_eq!(code, 0, "{stderr}");
    let called: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(called["content"][0]["text"], "This is a simple text response for testing.", "{called}");

    // What the upstream says of its list beside the items (caching, `_meta`) is kept.
    let (_, alone) = call(&modern.url, "unused", "tools/list", json!({}), None).await;
    let (_, through) = call(&url, &token, "tools/list", json!({}), None).await;
    for field in ["ttlMs", "cacheScope"] {
        assert!(alone["result"].get(field).is_some(), "the fixture sends {field}: {alone}");
        assert_eq!(through["result"][field], alone["result"][field], "{field} as the upstream sent it");
    }
    assert_eq!((&through["result"]["ttlMs"], &through["result"]["cacheScope"]), (&json!(60_000), &json!("public")));

    // `/mcp` for a stateless client: each upstream in its own era, one merged list.
    let all = format!("{}/mcp", gateway.mcp);
    let (status, listed) = call(&all, &token, "tools/list", json!({}), None).await;
    assert_eq!(status, 200, "{listed}");
    let names: Vec<&str> =
        listed["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"modern_test_simple_text") && names.contains(&"everything_echo"), "{names:?}");
    let (_, text) =
        call(&all, &token, "tools/call", json!({"name": "modern_test_simple_text"}), Some("modern_test_simple_text"))
            .await;
    assert_eq!(text["result"]["content"][0]["text"], "This is a simple text response for testing.", "{text}");
    let (_, echoed) = call(
        &all,
        &token,
        "tools/call",
        json!({"name": "everything_echo", "arguments": {"message": "both"}}),
        Some("everything_echo"),
    )
    .await;
    assert!(echoed["result"]["content"][0]["text"].as_str().unwrap().contains("both"), "{echoed}");
    gateway.stop().await;
}

/// Policy, credentials and the audit trail in the stateless era, to an upstream spoken to in it
/// (`e2e/peers/headers_server.py` shows what reached it): the user's credential is injected and
/// the client's token is not; a denied tool is denied; each request has its audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_credentials_and_audit_are_those_of_the_session_era() {
    let gateway = Gateway::start_audited(McpSettings::default()).await.unwrap();
    let upstream = python_server("headers_server.py", &[]).await.unwrap();
    let target = gateway.target("hdr", "streamable-http", &upstream.url).await.unwrap();
    gateway
        .post(&format!("/api/targets/{target}/env/default"), json!({"key": "AUTH_TOKEN", "value": "upstream-secret"}))
        .await
        .unwrap();
    gateway.allow_everyone().await.unwrap();
    gateway.deny_tools(&target, "add").await.unwrap();
    let url = format!("{}/mcp/hdr", gateway.mcp);
    let token = gateway.admin_token.clone();

    let (status, answered) = call(&url, &token, "tools/call", json!({"name": "headers"}), Some("headers")).await;
    assert_eq!(status, 200, "{answered}");
    let seen: Value = serde_json::from_str(answered["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(seen["authorization"], "Bearer upstream-secret", "the user's credential, injected: {seen}");
    assert!(!seen.to_string().contains(&token), "the client's token never goes upstream: {seen}");
    assert_eq!(seen["mcp-protocol-version"], "2026-07-28", "spoken to in the stateless era: {seen}");
    assert_eq!(seen["mcp-name"], "headers", "{seen}");
    assert!(seen.get("mcp-session-id").is_none(), "{seen}");
    let (_, denied) =
        call(&url, &token, "tools/call", json!({"name": "add", "arguments": {"a": 1, "b": 2}}), Some("add")).await;
    assert_eq!(denied["error"]["code"], -32003, "{denied}");

    let records = gateway.audit_records(2).await;
    let find = |name: &str| {
        records
            .iter()
            .find(|r| r.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no record of {name}: {records:?}"))
    };
    let allowed = find("headers");
    assert_eq!((allowed.decision.as_str(), allowed.outcome.as_str(), allowed.status), ("allowed", "answered", 200));
    assert_eq!(allowed.protocol_version.as_deref(), Some("2026-07-28"));
    assert_eq!(allowed.client_name.as_deref(), Some("raw"));
    assert_eq!(allowed.target.as_deref(), Some("hdr"));
    assert_eq!(allowed.session_id, None, "no session in the stateless era");
    assert!(allowed.credential_source.is_some(), "{allowed:?}");
    let refused = find("add");
    assert_eq!(refused.decision, "denied", "{refused:?}");
    assert_eq!(refused.protocol_version.as_deref(), Some("2026-07-28"));
    gateway.stop().await;
}

/// Closing the stream cancels, the stateless era's way: through the gateway, an upstream of that
/// era sees its request's connection close, and one of the session era gets
/// `notifications/cancelled`; either stops the work (the fixture counts it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_stream_cancels_the_request_upstream_in_either_era() {
    let modern = python_server("conformance_server.py", &["--modern-only"]).await.unwrap();
    let session = python_server("conformance_server.py", &["--session-only"]).await.unwrap();
    let gateway = Gateway::start().await.unwrap();
    gateway.target("modern", "streamable-http", &modern.url).await.unwrap();
    gateway.target("session", "streamable-http", &session.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let token = gateway.admin_token.clone();
    for target in ["modern", "session"] {
        let url = format!("{}/mcp/{target}", gateway.mcp);
        let mut params = json!({"name": "test_slow_operation", "arguments": {}});
        params["_meta"] = meta();
        let slow = reqwest::Client::new()
            .post(&url)
            .bearer_auth(&token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "test_slow_operation")
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}))
            .send();
        // The client gives up after a second: its connection closes.
        assert!(tokio::time::timeout(Duration::from_secs(1), slow).await.is_err(), "{target}: the call is slow");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, counted) =
                call(&url, &token, "tools/call", json!({"name": "test_cancelled_count"}), Some("test_cancelled_count"))
                    .await;
            if counted["result"]["content"][0]["text"] == "1" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{target}: the upstream was not cancelled: {counted}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    gateway.stop().await;
}

/// List changes of an upstream of the stateless era, which it tells only `subscriptions/listen`
/// streams: the gateway listens to it, and its own listeners hear them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_changes_of_a_stateless_upstream_reach_listeners() {
    let modern = python_server("conformance_server.py", &["--modern-only"]).await.unwrap();
    let gateway = Gateway::start().await.unwrap();
    gateway.target("modern", "streamable-http", &modern.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let url = format!("{}/mcp/modern", gateway.mcp);
    let token = gateway.admin_token.clone();
    let mut frames = Frames::listen(&url, &token, json!(7), json!({"toolsListChanged": true})).await;
    assert_eq!(frames.next().await["method"], "notifications/subscriptions/acknowledged");
    // The gateway's own subscription upstream may still be starting: trigger until heard.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let trigger = json!({"name": "test_trigger_tool_change"});
        let (_, triggered) = call(&url, &token, "tools/call", trigger, Some("test_trigger_tool_change")).await;
        assert_eq!(triggered["result"]["content"][0]["text"], "Mutation triggered", "{triggered}");
        let heard = tokio::time::timeout(Duration::from_secs(1), frames.next()).await;
        if let Ok(frame) = heard {
            assert_eq!(frame["method"], "notifications/tools/list_changed", "{frame}");
            assert_eq!(frame["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], 7, "{frame}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the upstream's list change never reached the listener");
    }
    gateway.stop().await;
}

/// Stateless clients and an upstream of the stateless era need no stickiness: three data planes
/// behind a round-robin balancer serve the Python SDK client's whole pass, the upstream's own
/// `input_required` rounds and cancellation included, wherever each request lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateless_client_and_upstream_go_through_a_round_robin_fleet() {
    let modern = python_server("conformance_server.py", &["--modern-only"]).await.unwrap();
    let gateway = Gateway::start().await.unwrap();
    gateway.target("modern", "streamable-http", &modern.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let mut backends = vec![gateway.mcp.trim_start_matches("http://").to_string()];
    let mut planes = Vec::new();
    for n in 1..3 {
        let (plane, url) = gateway.another_data_plane(&format!("stateless-{n}")).await.unwrap();
        backends.push(url.trim_start_matches("http://").to_string());
        planes.push(plane);
    }
    let balancer = reflow_e2e::balancer::Balancer::start(backends).await.unwrap();
    let url = format!("{}/mcp/modern", balancer.url);
    let report =
        peer_client("fixture_client.py", &[&url, &gateway.admin_token, "2026-07-28", "--input-required"]).await;
    assert!(report.get("error").is_none(), "{report}");
    assert_eq!(report["elicited"], "Hello, Ada!", "{report}");
    assert_eq!(report["rounds"], "Multi-round complete", "{report}");
    assert_eq!(report["cancelled"], 1, "{report}");
    let served: std::collections::BTreeSet<usize> = balancer.routed().iter().map(|r| r.backend).collect();
    assert_eq!(served.len(), 3, "the client's requests landed on every data plane");
    gateway.stop().await;
}

/// What one identity may hold of the stateless era's long-lived state: parked exchanges count
/// among its requests in flight (`mcp.max_inflight_per_user`, 2 here), listen streams at most
/// 16 per bridge, and an upstream asking a session-era client more than 16 things at once is
/// refused rather than passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_exchanges_listen_streams_and_questions_are_bounded() {
    let settings = McpSettings { max_inflight_per_user: 2, ..McpSettings::default() };
    let gateway = Gateway::start_with(settings).await.unwrap();
    let upstream = everything(Mode::StreamableHttp, None).await.unwrap();
    let modern = python_server("conformance_server.py", &["--modern-only"]).await.unwrap();
    gateway.target("everything", "streamable-http", &upstream.url).await.unwrap();
    gateway.target("modern", "streamable-http", &modern.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let token = gateway.admin_token.clone();
    let url = format!("{}/mcp/everything", gateway.mcp);

    let sample = || {
        let mut params = json!({"name": "trigger-sampling-request", "arguments": {"prompt": "hi", "maxTokens": 5}});
        params["_meta"] = meta();
        params["_meta"]["io.modelcontextprotocol/clientCapabilities"] = json!({"sampling": {}});
        params
    };
    let headers = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "trigger-sampling-request"),
    ];
    let mut states = Vec::new();
    for _ in 0..2 {
        let (status, _, asked) = post(&url, &token, "tools/call", sample(), &headers).await;
        assert_eq!(status, 200, "{asked}");
        assert_eq!(asked["result"]["resultType"], "input_required", "{asked}");
        states.push(asked["result"].clone());
    }
    let (status, _, refused) = post(&url, &token, "tools/call", sample(), &headers).await;
    assert_eq!(status, 429, "two parked exchanges are the user's two requests in flight: {refused}");
    // One answered: it completes, and its share is free again.
    let first = &states[0];
    let key = first["inputRequests"].as_object().unwrap().keys().next().unwrap().clone();
    let mut retry = sample();
    retry["requestState"] = first["requestState"].clone();
    retry["inputResponses"] =
        json!({key: {"role": "assistant", "content": {"type": "text", "text": "hello"}, "model": "m"}});
    let (status, _, done) = post(&url, &token, "tools/call", retry, &headers).await;
    assert_eq!((status, &done["result"]["resultType"]), (200, &json!("complete")), "{done}");
    let (status, _, again) = post(&url, &token, "tools/call", sample(), &headers).await;
    assert_eq!(status, 200, "{again}");

    // Listen streams: 16 on one bridge, the 17th refused until one closes.
    let listening = format!("{}/mcp/modern", gateway.mcp);
    let mut open = Vec::new();
    for n in 0..16 {
        open.push(Frames::listen(&listening, &token, json!(n), json!({"toolsListChanged": true})).await);
    }
    let mut params = json!({"notifications": {"toolsListChanged": true}});
    params["_meta"] = meta();
    let listen_headers = [("mcp-protocol-version", "2026-07-28"), ("mcp-method", "subscriptions/listen")];
    let (status, _, refused) = post(&listening, &token, "subscriptions/listen", params.clone(), &listen_headers).await;
    assert_eq!(status, 429, "{refused}");
    drop(open.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let response = reqwest::Client::new()
            .post(&listening)
            .bearer_auth(&token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "subscriptions/listen")
            .json(&json!({"jsonrpc": "2.0", "id": 99, "method": "subscriptions/listen", "params": params}))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "a closed stream frees its place");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A session-era client is asked at most 16 things at once (another user: the first still
    // holds two parked exchanges).
    let (_, other) = gateway.user("other@example.com").await.unwrap();
    let mut client = reflow_e2e::client::McpClient::new(&listening, &other);
    client.initialize().await.unwrap();
    let refused = client.call("test_many_inputs", json!({})).await.unwrap();
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("17 things at once"), "{refused}");
    gateway.stop().await;
}

/// An account with no grant reaches nothing in the stateless era either: `/mcp/{target}` is a
/// target that does not exist for it (no bridge, nothing sent upstream), `/mcp` lists nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_with_no_grant_reaches_nothing_in_the_stateless_era() {
    let gateway = Gateway::start().await.unwrap();
    let modern = python_server("conformance_server.py", &["--modern-only"]).await.unwrap();
    gateway.target("modern", "streamable-http", &modern.url).await.unwrap();
    let admin = gateway.user_id(&gateway.admin_token).await.unwrap();
    gateway
        .post(
            "/api/policies",
            json!({"name": "admin only", "effect": "allow", "priority": 1,
                   "subjects": [{"subject_type": "user", "subject_value": admin}]}),
        )
        .await
        .unwrap();
    let (_, stranger) = gateway.user("stranger@example.com").await.unwrap();
    let one = format!("{}/mcp/modern", gateway.mcp);
    for method in ["server/discover", "tools/list"] {
        let (status, body) = call(&one, &stranger, method, json!({}), None).await;
        assert_eq!(status, 404, "{method}: {body}");
        assert_eq!(body["id"], 41, "{body}");
    }
    let (status, body) =
        call(&one, &stranger, "tools/call", json!({"name": "test_simple_text"}), Some("test_simple_text")).await;
    assert_eq!(status, 404, "{body}");
    let (status, listed) = call(&format!("{}/mcp", gateway.mcp), &stranger, "tools/list", json!({}), None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["result"]["tools"], json!([]), "{listed}");
    // The admin, granted, is served.
    let (status, body) = call(&one, &gateway.admin_token, "tools/list", json!({}), None).await;
    assert_eq!(status, 200, "{body}");
    gateway.stop().await;
}
