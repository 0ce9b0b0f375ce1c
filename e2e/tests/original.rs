//! What users of the original gateway rely on, end to end: HTTP targets resolve credentials at
//! every scope whatever their isolation boundary, and a user's sessions follow changes to who
//! the user is (groups, a recycle) without the client reconnecting, on every data plane.
//!
//! The client is the official MCP Python SDK (`e2e/peers/session_client.py`, one session held
//! open and driven line by line); the upstream is the Python SDK's server `headers_server.py`,
//! whose `headers` tool echoes the HTTP headers it received.

use std::time::Duration;

use reflow_e2e::harness::{python_server, Gateway, SessionClient};
use serde_json::{json, Value};

/// Waits (up to 5 s) until the upstream at `url` no longer knows session `id`: the gateway
/// closed it.
async fn eventually_gone(url: &str, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let probe = reqwest::Client::new()
            .post(url)
            .header("mcp-session-id", id)
            .header("accept", "application/json, text/event-stream")
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
            .send()
            .await
            .unwrap();
        if probe.status().as_u16() == 404 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "upstream session {id} is still open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn bearer(headers: &Value) -> String {
    headers["authorization"].as_str().unwrap_or("none").trim_start_matches("Bearer ").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_targets_resolve_user_group_role_default_at_the_default_isolation() {
    let gateway = Gateway::start().await.unwrap();
    let server = python_server("headers_server.py", &[]).await.unwrap();
    // No isolation_boundary: the target is `shared`, which limits processes, not HTTP sessions.
    let target = gateway.target("hdr", "streamable-http", &server.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let (dev, dev_token) = gateway.user("dev@example.com").await.unwrap();
    let put = |path: String, body: Value| {
        let gateway = &gateway;
        async move { gateway.admin(reqwest::Method::PUT, &path, Some(body)).await.unwrap() }
    };
    put(format!("/api/users/{dev}"), json!({"role": "developer", "groups": ["ops"]})).await;
    let mut client = SessionClient::connect(&format!("{}/mcp", gateway.mcp), &dev_token).await;
    let first = client.headers("hdr_headers").await;
    assert_eq!(bearer(&first), "none");
    let mut upstream_session = first["mcp-session-id"].as_str().unwrap().to_string();

    // Each narrower scope wins over the one before, in the same client session.
    let steps = [
        (format!("/api/targets/{target}/tokens/default"), json!({"token": "tok-default"}), "tok-default", "default"),
        (
            format!("/api/targets/{target}/tokens/role"),
            json!({"role": "developer", "token": "tok-role"}),
            "tok-role",
            "role",
        ),
        (
            format!("/api/targets/{target}/tokens/group"),
            json!({"group_name": "ops", "token": "tok-group"}),
            "tok-group",
            "group",
        ),
        (format!("/api/targets/{target}/tokens/user/{dev}"), json!({"token": "tok-user"}), "tok-user", "user"),
    ];
    for (path, body, token, source) in steps {
        put(path, body).await;
        // The upstream session opened with the old credentials is closed at once, before the
        // client's next request.
        eventually_gone(&server.url, &upstream_session).await;
        let headers = client.headers("hdr_headers").await;
        assert_eq!(bearer(&headers), token, "after setting the {source} token");
        upstream_session = headers["mcp-session-id"].as_str().unwrap().to_string();
        let resolved = gateway.get(&format!("/api/targets/{target}/env/resolve?user_id={dev}")).await.unwrap();
        assert_eq!(resolved["token"]["scope_type"], source, "{resolved}");
    }
    // Env values follow the same precedence, as X-Env- headers.
    put(format!("/api/targets/{target}/env/role/developer"), json!([{"key": "REGION", "value": "role-eu"}])).await;
    assert_eq!(client.headers("hdr_headers").await["x-env-region"], "role-eu");
    put(format!("/api/targets/{target}/env/user/{dev}"), json!([{"key": "REGION", "value": "mine"}])).await;
    assert_eq!(client.headers("hdr_headers").await["x-env-region"], "mine");
    let resolved = gateway.get(&format!("/api/targets/{target}/env/resolve?user_id={dev}")).await.unwrap();
    assert_eq!(resolved["configs"][0]["source"], "user", "{resolved}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_user_recycles_their_sessions_on_every_data_plane() {
    let gateway = Gateway::start().await.unwrap();
    let server = python_server("headers_server.py", &[]).await.unwrap();
    let target = gateway.target("hdr", "streamable-http", &server.url).await.unwrap();
    let (bob, bob_token) = gateway.user("bob@example.com").await.unwrap();
    let admin = |method: reqwest::Method, path: String, body: Value| {
        let gateway = &gateway;
        async move { gateway.admin(method, &path, Some(body)).await.unwrap() }
    };
    use reqwest::Method;
    admin(Method::PUT, format!("/api/users/{bob}"), json!({"groups": ["alpha"]})).await;
    // alpha may use every tool of the target; beta only `headers`.
    admin(
        Method::POST,
        "/api/policies".into(),
        json!({"name": "alpha", "target_id": target, "effect": "allow",
        "priority": 1, "subjects": [{"subject_type": "group", "subject_value": "alpha"}]}),
    )
    .await;
    admin(
        Method::POST,
        "/api/policies".into(),
        json!({"name": "beta", "target_id": target, "effect": "allow",
        "resource_type": "tool", "resource_pattern": "headers", "priority": 1,
        "subjects": [{"subject_type": "group", "subject_value": "beta"}]}),
    )
    .await;
    for (group, token) in [("alpha", "tok-alpha"), ("beta", "tok-beta")] {
        admin(Method::PUT, format!("/api/targets/{target}/tokens/group"), json!({"group_name": group, "token": token}))
            .await;
    }

    let mut client = SessionClient::connect(&format!("{}/mcp", gateway.mcp), &bob_token).await;
    assert_eq!(client.call("hdr_add", json!({"a": 2, "b": 3})).await, json!({"text": "5"}));
    let before = client.headers("hdr_headers").await;
    assert_eq!(bearer(&before), "tok-alpha");
    let old_upstream = before["mcp-session-id"].as_str().expect("the gateway holds an upstream session").to_string();

    // The admin moves bob to beta; the same client session is decided and credentialed as beta.
    admin(Method::PUT, format!("/api/users/{bob}"), json!({"groups": ["beta"]})).await;
    let after = client.headers("hdr_headers").await;
    assert_eq!(bearer(&after), "tok-beta");
    assert_ne!(after["mcp-session-id"], old_upstream, "a new upstream session for the new identity");
    let refused = client.call("hdr_add", json!({"a": 2, "b": 3})).await;
    assert!(refused.get("error").is_some(), "beta may not use add: {refused}");
    // The old upstream session is gone: the upstream no longer knows it.
    eventually_gone(&server.url, &old_upstream).await;

    // A recycle counts bob's sessions on every data plane: one here, one on a second plane.
    let (_second, second_mcp) = gateway.another_data_plane("e2e-second").await.unwrap();
    let mut there = SessionClient::connect(&format!("{second_mcp}/mcp"), &bob_token).await;
    assert_eq!(bearer(&there.headers("hdr_headers").await), "tok-beta");
    let recycled = gateway.post(&format!("/api/users/{bob}/recycle"), json!({})).await.unwrap();
    assert_eq!(
        (recycled["recycled"].as_u64(), recycled["user_id"].as_str()),
        (Some(2), Some(bob.as_str())),
        "{recycled}"
    );
    assert_eq!((recycled["data_planes"].as_u64(), recycled["pending"].clone()), (Some(2), json!([])), "{recycled}");
    let planes = gateway.get("/api/data-planes").await.unwrap();
    for plane in planes["data_planes"].as_array().unwrap() {
        let done = plane["recycled"].as_array().unwrap().iter().find(|d| d["id"] == bob.as_str()).cloned();
        assert_eq!(done.map(|d| d["count"].clone()), Some(json!(1)), "each plane recycled its one session: {plane}");
    }
    // Both clients keep their sessions and are served after the recycle.
    assert_eq!(bearer(&client.headers("hdr_headers").await), "tok-beta");
    assert_eq!(bearer(&there.headers("hdr_headers").await), "tok-beta");
    // Bob recycles his own sessions; a user without sessions recycles none.
    let (status, own) = gateway.api_as(Method::POST, "/api/sessions/recycle", &bob_token, None).await.unwrap();
    assert_eq!((status, own["recycled"].as_u64()), (200, Some(2)), "{own}");
    // Each recycle ships a snapshot everywhere: one per user per cooldown.
    let (status, again) = gateway.api_as(Method::POST, "/api/sessions/recycle", &bob_token, None).await.unwrap();
    assert_eq!((status, again["code"].as_str()), (429, Some("too_many_requests")), "{again}");
    let (_, carol_token) = gateway.user("carol@example.com").await.unwrap();
    let (status, none) = gateway.api_as(Method::POST, "/api/sessions/recycle", &carol_token, None).await.unwrap();
    assert_eq!((status, none["recycled"].as_u64()), (200, Some(0)), "{none}");
    let (status, _) =
        gateway.api_as(Method::POST, &format!("/api/users/{bob}/recycle"), &carol_token, None).await.unwrap();
    assert_eq!(status, 403);
    gateway.stop().await;
}
