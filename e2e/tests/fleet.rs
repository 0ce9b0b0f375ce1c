//! A fleet without sticky sessions: three data planes (separate processes) behind a plain
//! round-robin balancer ([`reflow_e2e::balancer`], the stand-in for nginx or a cloud balancer),
//! and one long session of the official Python SDK client whose requests land on all three. One
//! data plane is killed mid-session and another drained; the client sees no error, and the
//! upstream (server-everything) sees one session. Session ids answer only to their user, stay
//! deleted on every replica, and stop opening when tampered with or when their key retires.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use reflow_e2e::balancer::Balancer;
use reflow_e2e::harness::{everything, python, workspace, Gateway, Mode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// `e2e/peers/fleet_client.py`: one session, one command at a time.
struct FleetClient {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl FleetClient {
    async fn connect(url: &str, token: &str) -> FleetClient {
        reflow_e2e::harness::ensure_peers();
        let mut child = tokio::process::Command::new(python())
            .arg(workspace().join("e2e/peers/fleet_client.py"))
            .args([url, token])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the Python client starts");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut client = FleetClient { child, stdin, stdout };
        assert_eq!(client.next().await, json!({"connected": true}));
        client
    }

    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(90), self.stdout.next_line()).await;
        let line = line.expect("the client answers in time").unwrap().expect("the client is alive");
        serde_json::from_str(&line).unwrap()
    }

    async fn send(&mut self, command: &str) {
        self.stdin.as_mut().unwrap().write_all(format!("{command}\n").as_bytes()).await.unwrap();
    }

    async fn run(&mut self, command: &str) -> Value {
        self.send(command).await;
        let answer = self.next().await;
        assert!(answer.get("error").is_none(), "{command}: {answer}");
        answer
    }

    /// Ends input: the client closes its session (DELETE) and exits.
    async fn close(mut self) {
        drop(self.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "the client exited with {status}");
    }
}

/// A `tools/call` of echo in session `session`, straight to one data plane: (status, body).
async fn call_direct(port: u16, token: &str, session: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/mcp/everything"))
        .bearer_auth(token)
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", "2025-11-25")
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "echo", "arguments": {"message": "direct"}}}))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Opens a session through `url` with a bare `initialize`: its id.
async fn initialize(url: &str, token: &str) -> String {
    let response = reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "fleet", "version": "1"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.headers()["mcp-session-id"].to_str().unwrap().to_string()
}

fn upstream_initializations(upstream: &Balancer) -> usize {
    upstream.routed().iter().filter(|r| r.body.contains(r#""method":"initialize""#)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_session_goes_on_across_a_round_robin_fleet_through_a_kill_and_a_drain() {
    let gateway = Gateway::start().await.unwrap();
    let server = everything(Mode::StreamableHttp, None).await.unwrap();
    // Counts what the upstream receives: one initialize means one upstream session.
    let upstream = Balancer::start(vec![format!("127.0.0.1:{}", server.port)]).await.unwrap();
    gateway.target("everything", "streamable-http", &format!("{}/mcp", upstream.url)).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let (_, bob) = gateway.user("bob@example.com").await.unwrap();
    let mut planes = Vec::new();
    for n in 0..3 {
        planes.push(gateway.data_plane_process(&format!("fleet-{n}")).await.unwrap());
    }
    let ports: Vec<u16> = planes.iter().map(|(_, port)| *port).collect();
    let balancer = Balancer::start(ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()).await.unwrap();
    let url = format!("{}/mcp/everything", balancer.url);

    let token = gateway.admin_token.clone();
    let mut client = FleetClient::connect(&url, &token).await;
    let lists = client.run("lists").await;
    assert!(lists["tools"].as_u64().unwrap() > 5, "{lists}");
    assert!(lists["prompts"].as_u64().unwrap() > 0 && lists["resources"].as_u64().unwrap() > 0, "{lists}");
    let session = client.run("session").await;
    let id = session["session"].as_str().unwrap().to_string();
    assert_eq!(session["seen"], json!([id]), "one session id for the whole session");
    let echoed = client.run("echo 100").await;
    assert_eq!(echoed["errors"], json!([]), "{echoed}");
    let served: BTreeSet<usize> = balancer.routed().iter().map(|r| r.backend).collect();
    assert_eq!(served, BTreeSet::from([0, 1, 2]), "the session's requests land on every data plane");

    // The session answers only to its user, on every replica; a tampered id opens nowhere.
    for port in &ports {
        let (status, body) = call_direct(*port, &bob, &id).await;
        assert_eq!(status, 404, "another user's request: {body}");
        let mut tampered = id.clone().into_bytes();
        let at = tampered.len() - 10;
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        let (status, body) = call_direct(*port, &token, std::str::from_utf8(&tampered).unwrap()).await;
        assert_eq!(status, 404, "a tampered id: {body}");
        assert!(body.contains("session not found"), "{body}");
    }

    // One data plane dies without warning: the next requests go to the others.
    let (mut killed, _) = planes.remove(0);
    killed.kill();
    let _ = killed.child.wait().await;
    let echoed = client.run("echo 50").await;
    assert_eq!(echoed["errors"], json!([]), "{echoed}");

    // Another is drained while a progress-reporting call is in flight on it: the call
    // finishes, and the session goes on on the last one.
    let before = balancer.routed().len();
    client.send("progress").await;
    let on = loop {
        let routed = balancer.routed();
        if let Some(r) = routed[before..].iter().find(|r| r.body.contains("trigger-long-running-operation")) {
            break r.backend;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(on, 0, "the killed data plane got no request");
    let (draining, _) = &planes[on - 1];
    let pid = nix::unistd::Pid::from_raw(draining.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let progress = client.next().await;
    assert!(progress.get("error").is_none(), "the call in flight on the drained data plane: {progress}");
    assert_eq!(progress["progress"].as_array().map(Vec::len), Some(6), "{progress}");
    let (mut drained, _) = planes.remove(on - 1);
    let status = tokio::time::timeout(Duration::from_secs(20), drained.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "a drained data plane exits cleanly: {status}");
    let (_, last) = &planes[0];
    let last = *last;

    // A server→client request and the rest of the calls, on the last data plane.
    let sampled = client.run("sample").await;
    assert_eq!(sampled["samplings"], 1, "{sampled}");
    assert!(sampled["text"].as_str().unwrap().contains("sampled reply"), "{sampled}");
    let echoed = client.run("echo 50").await;
    assert_eq!(echoed["errors"], json!([]), "{echoed}");
    assert_eq!(client.run("session").await["seen"], json!([id]), "the client never had to start over");
    assert_eq!(upstream_initializations(&upstream), 1, "the upstream saw one session, not one per replica");

    // Deleted through the balancer: every replica answers 404, a restarted one too.
    client.close().await;
    let (status, body) = call_direct(last, &token, &id).await;
    assert_eq!(status, 404, "after DELETE: {body}");
    let (_fresh, fresh_port) = gateway.data_plane_process("fleet-fresh").await.unwrap();
    let (status, body) = call_direct(fresh_port, &token, &id).await;
    assert_eq!(status, 404, "after DELETE, on a replica that never saw the session: {body}");

    // A session whose key is retired opens nowhere: rotated with no grace, its id is refused.
    let second = initialize(&format!("http://127.0.0.1:{last}/mcp/everything"), &token).await;
    assert_eq!(call_direct(fresh_port, &token, &second).await.0, 200, "the new session resumes on another replica");
    let rotated =
        gateway.post("/api/session-keys/rotate", json!({"grace_seconds": 0})).await.expect("rotate the session key");
    assert_eq!(rotated["pending"], json!([]), "{rotated}");
    for port in [last, fresh_port] {
        let (status, body) = call_direct(port, &token, &second).await;
        assert_eq!(status, 404, "a retired key: {body}");
    }
    let (status, body) = call_direct(fresh_port, &token, "r1.AAAAAAAAAAAAAAAAAAAAAA.AQAAAAE").await;
    assert_eq!(status, 404, "{body}");
}

/// An upstream that closes a call's stream before the result (SEP-1699 polling, the
/// conformance suite's `test_reconnection`): the gateway comes back for the rest with GET +
/// `Last-Event-ID` and the client gets the result, and the progress sent on both streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_stream_closed_mid_call_is_resumed_with_last_event_id() {
    let gateway = Gateway::start().await.unwrap();
    let server = reflow_e2e::harness::python_server("polling_server.py", &[]).await.unwrap();
    let upstream = Balancer::start(vec![format!("127.0.0.1:{}", server.port)]).await.unwrap();
    gateway.target("polling", "streamable-http", &format!("{}/mcp", upstream.url)).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let url = format!("{}/mcp/polling", gateway.mcp);
    let session = initialize(&url, &gateway.admin_token).await;
    let http = reqwest::Client::new();
    let initialized = http
        .post(&url)
        .bearer_auth(&gateway.admin_token)
        .header("mcp-session-id", &session)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .send()
        .await
        .unwrap();
    assert_eq!(initialized.status().as_u16(), 202);
    let call = http
        .post(&url)
        .bearer_auth(&gateway.admin_token)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-11-25")
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                       "params": {"name": "test_reconnection", "arguments": {}, "_meta": {"progressToken": "p"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(call.status().as_u16(), 200);
    let body = call.text().await.unwrap();
    assert!(body.contains("reconnected: the result arrived after the stream closed"), "{body}");
    assert!(body.contains("before the stream closes") && body.contains("after the stream closed"), "{body}");
    let resumed = upstream.routed().iter().filter(|r| r.method == "GET" && r.last_event_id.is_some()).count();
    assert!(resumed >= 1, "the gateway asked for the rest with GET + Last-Event-ID: {:?}", upstream.routed());
}

/// The conformance suite's server scenarios give the same results through the round-robin
/// balancer in front of three data planes as through one data plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_through_the_balancer_is_conformance_through_one_data_plane() {
    let gateway = Gateway::start().await.unwrap();
    let server = everything(Mode::StreamableHttp, None).await.unwrap();
    gateway.target("everything", "streamable-http", &server.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let mut backends = vec![gateway.mcp.trim_start_matches("http://").to_string()];
    let mut planes = Vec::new();
    for n in 1..3 {
        let (plane, url) = gateway.another_data_plane(&format!("conformance-{n}")).await.unwrap();
        backends.push(url.trim_start_matches("http://").to_string());
        planes.push(plane);
    }
    let balancer = Balancer::start_preserving_host(backends).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (token, mcp) = (&gateway.admin_token, &gateway.mcp);
    let one = reflow_e2e::harness::authorizing_forwarder(mcp, token, &shutdown).await.unwrap();
    let alone = reflow_e2e::harness::run_conformance(&format!("{one}/mcp/everything")).await;
    let fleet = reflow_e2e::harness::authorizing_forwarder(&balancer.url, token, &shutdown).await.unwrap();
    let through = reflow_e2e::harness::run_conformance(&format!("{fleet}/mcp/everything")).await;
    shutdown.cancel();
    let served: BTreeSet<usize> = balancer.routed().iter().map(|r| r.backend).collect();
    assert_eq!(served, BTreeSet::from([0, 1, 2]), "the suite's requests landed on every data plane");
    assert!(alone.values().filter(|ok| **ok).count() >= 8, "too little passes to compare: {alone:?}");
    assert_eq!(through, alone, "through the balancer vs one data plane");
}

/// A reply stream cut by a data plane that dies mid-call resumes on another one: the client
/// sends the last event id it saw to any replica, which fetches the rest from the upstream
/// session (its event store) and relays it, the response included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_stream_cut_by_a_killed_data_plane_resumes_on_another_with_last_event_id() {
    use futures::StreamExt as _;
    let gateway = Gateway::start().await.unwrap();
    let server = reflow_e2e::harness::python_server("polling_server.py", &[]).await.unwrap();
    gateway.target("polling", "streamable-http", &server.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let (mut first, first_port) = gateway.data_plane_process("resume-a").await.unwrap();
    let (_second, second_port) = gateway.data_plane_process("resume-b").await.unwrap();
    let token = &gateway.admin_token;
    let url = |port: u16| format!("http://127.0.0.1:{port}/mcp/polling");
    let session = initialize(&url(first_port), token).await;
    let http = reqwest::Client::new();
    let post = |port: u16, body: Value| {
        http.post(url(port))
            .bearer_auth(token)
            .header("mcp-session-id", &session)
            .header("mcp-protocol-version", "2025-11-25")
            .header("accept", "application/json, text/event-stream")
            .json(&body)
            .send()
    };
    post(first_port, json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await.unwrap();
    let call = post(
        first_port,
        json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": "slow_steps", "arguments": {"steps": 5}, "_meta": {"progressToken": "p"}}}),
    )
    .await
    .unwrap();
    assert_eq!(call.status().as_u16(), 200);
    // Read up to the first event that has an id, then the data plane dies.
    let mut body = call.bytes_stream();
    let mut seen = String::new();
    let last = loop {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next()).await.unwrap().unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(id) = seen.lines().find_map(|l| l.strip_prefix("id:")).map(|id| id.trim().to_string()) {
            break id;
        }
    };
    assert!(seen.contains(r#""progress":1"#), "the first event is the first progress: {seen}");
    first.kill();
    let _ = first.child.wait().await;
    drop(body);

    let resumed = http
        .get(url(second_port))
        .bearer_auth(token)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-11-25")
        .header("accept", "text/event-stream")
        .header("last-event-id", &last)
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status().as_u16(), 200);
    let mut stream = resumed.bytes_stream();
    let mut rest = String::new();
    while !rest.contains("finished 5 steps") {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
        let chunk = next.expect("the rest of the stream arrives").expect("the stream goes on").unwrap();
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    let messages: Vec<Value> = rest
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str(data.trim()).ok())
        .collect();
    let progress: Vec<f64> = messages.iter().filter_map(|m| m.pointer("/params/progress")?.as_f64()).collect();
    assert_eq!(progress, [2.0, 3.0, 4.0, 5.0], "the progress after the last event id, once each: {rest}");
    let response = messages.iter().find(|m| m.get("result").is_some()).expect("the response");
    assert_eq!(response["id"], 9, "the response answers the client's request: {rest}");
    assert!(rest.lines().filter(|l| l.starts_with("id:")).count() >= 4, "resumable again: {rest}");
}

/// An aggregated session resumes on every replica too. Its upstream sessions open on first use
/// (after its id was issued, so the id cannot carry them): one per replica that used the target,
/// never one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregated_session_resumes_on_every_replica_with_an_upstream_session_per_replica() {
    let gateway = Gateway::start().await.unwrap();
    let server = everything(Mode::StreamableHttp, None).await.unwrap();
    let upstream = Balancer::start(vec![format!("127.0.0.1:{}", server.port)]).await.unwrap();
    gateway.target("everything", "streamable-http", &format!("{}/mcp", upstream.url)).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let (_b, second) = gateway.another_data_plane("aggregate-b").await.unwrap();
    let (_c, third) = gateway.another_data_plane("aggregate-c").await.unwrap();
    let token = &gateway.admin_token;
    let session = initialize(&format!("{}/mcp", gateway.mcp), token).await;
    for _ in 0..2 {
        for base in [&second, &third, &gateway.mcp] {
            let mut client = reflow_e2e::client::McpClient::new(&format!("{base}/mcp"), token);
            client.session = Some(session.clone());
            let answer = client.call("everything_echo", json!({"message": "here"})).await.unwrap();
            assert!(answer.to_string().contains("here"), "{base}: {answer}");
        }
    }
    assert_eq!(upstream_initializations(&upstream), 3, "one upstream session per replica that used it");
}

/// A session with nothing upstream to tell its end (a STDIO server, local to each replica) is
/// deleted on every replica all the same: the deleting one reports it, the control plane tells
/// every data plane, one that connects later too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stdio_session_is_deleted_on_every_replica() {
    let gateway = Gateway::start().await.unwrap();
    let script = reflow_e2e::harness::node_package("@modelcontextprotocol/server-everything/dist/index.js");
    gateway
        .post(
            "/api/targets",
            json!({"name": "local", "transport_type": "stdio", "command": "node", "args": [script.to_string_lossy(), "stdio"]}),
        )
        .await
        .unwrap();
    gateway.allow_everyone().await.unwrap();
    let (_b, second) = gateway.another_data_plane("stdio-b").await.unwrap();
    let token = &gateway.admin_token;
    let session = initialize(&format!("{}/mcp/local", gateway.mcp), token).await;
    let call = |base: String| {
        let session = session.clone();
        async move {
            let mut client = reflow_e2e::client::McpClient::new(&format!("{base}/mcp/local"), token);
            client.session = Some(session);
            client.request("tools/call", json!({"name": "echo", "arguments": {"message": "hi"}})).await.unwrap()
        }
    };
    let resumed = call(second.clone()).await;
    assert_eq!(resumed.status, 200, "resumed against the other replica's process: {:?}", resumed.messages);
    assert!(format!("{:?}", resumed.messages).contains("hi"), "{:?}", resumed.messages);

    let deleted = reqwest::Client::new()
        .delete(format!("{}/mcp/local", gateway.mcp))
        .bearer_auth(token)
        .header("mcp-session-id", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = call(second.clone()).await;
        if answer.status == 404 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still served after DELETE: {:?}", answer.messages);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_c, third) = gateway.another_data_plane("stdio-c").await.unwrap();
    let late = call(third).await;
    assert_eq!(late.status, 404, "a data plane that connected after the DELETE: {:?}", late.messages);
}
