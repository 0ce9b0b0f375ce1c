//! One identity's floods leave everyone else served, and half-sent requests hold nothing.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reflow_e2e::client::McpClient;
use reflow_e2e::harness::*;
use serde_json::json;

fn text(response: &serde_json::Value) -> String {
    response.pointer("/result/content/0/text").and_then(serde_json::Value::as_str).unwrap_or_default().to_string()
}

/// Runs `count` requests `concurrency` at a time; the number of each status.
async fn flood<F, Fut>(count: usize, concurrency: usize, request: F) -> std::collections::BTreeMap<u16, usize>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let statuses: Vec<u16> =
        futures::stream::iter((0..count).map(request)).buffer_unordered(concurrency).collect().await;
    let mut counted = std::collections::BTreeMap::new();
    for status in statuses {
        *counted.entry(status).or_default() += 1;
    }
    counted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_by_one_identity_leave_another_users_calls_working() {
    ensure_peers();
    let mut settings = reflow_data_plane::mcp::McpSettings { max_sessions_per_user: 200, ..Default::default() };
    settings.stdio.max_processes_per_user = 4;
    let gateway = Gateway::start_with(settings).await.unwrap();
    let (fast, _) = fast_upstream(1).await.unwrap();
    gateway.target("fast", "streamable-http", &fast).await.unwrap();
    let marker_dir = tempfile::tempdir().unwrap();
    let starts = marker_dir.path().join("starts");
    let script = workspace().join("e2e/peers/stdio_server.py");
    gateway
        .post(
            "/api/targets",
            json!({"name": "cmd", "transport_type": "stdio", "command": "python3", "isolation_boundary": "per_user",
                   "args": [script.to_string_lossy(), "--touch", starts.to_string_lossy()]}),
        )
        .await
        .unwrap();
    gateway.allow_everyone().await.unwrap();
    // One flooding account per flood (the first keeps its 200 sessions).
    let (_, mallory) = gateway.user("mallory@example.com").await.unwrap();
    let (_, mallory2) = gateway.user("mallory2@example.com").await.unwrap();
    let (_, mallory3) = gateway.user("mallory3@example.com").await.unwrap();
    let (_, alice) = gateway.user("alice@example.com").await.unwrap();
    let url = format!("{}/mcp", gateway.mcp);
    let mut victim = McpClient::new(&url, &alice);
    victim.initialize().await.unwrap();
    let victim_calls = |mut victim: McpClient, until: std::sync::Arc<std::sync::atomic::AtomicBool>| async move {
        let (mut ok, mut failed) = (0, Vec::new());
        while !until.load(std::sync::atomic::Ordering::Relaxed) {
            for tool in ["fast_echo", "cmd_echo"] {
                let answer = victim.call(tool, json!({"message": "still served"})).await.unwrap();
                if text(&answer).contains("still served") {
                    ok += 1;
                } else {
                    failed.push(answer);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (ok, failed)
    };

    // 100,000 session openings.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watching = tokio::spawn(victim_calls(victim.clone(), done.clone()));
    let http = reqwest::Client::new();
    let started = Instant::now();
    let sessions = flood(100_000, 32, |_| {
        let client = McpClient::with_http(http.clone(), &url, &mallory);
        async move {
            client
                .send(
                    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                           "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "m", "version": "0"}}})
                    .to_string(),
                )
                .await
                .unwrap()
                .status
        }
    })
    .await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failed) = watching.await.unwrap();
    println!("figure: 100,000 session openings by one user in {:?}: {sessions:?}; another user's calls: {served} served, {} failed", started.elapsed(), failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    assert!(served >= 2);
    assert!(sessions.get(&200).copied().unwrap_or(0) <= 200, "one user holds at most 200 sessions: {sessions:?}");
    assert!(sessions.get(&429).copied().unwrap_or(0) > 90_000, "{sessions:?}");
    assert!(gateway.data_plane().gateway().sessions.count_of(&gateway.user_id(&mallory).await.unwrap()) <= 200);

    // 10,000 requests as fast as they go, from sessions the flooder holds.
    let mut flooder = McpClient::new(&url, &mallory2);
    flooder.initialize().await.unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watching = tokio::spawn(victim_calls(victim.clone(), done.clone()));
    let started = Instant::now();
    let requests = flood(10_000, 32, |_| {
        let flooder = flooder.clone();
        async move {
            flooder
                .send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "fast_echo", "arguments": {}}}).to_string())
                .await
                .unwrap()
                .status
        }
    })
    .await;
    let elapsed = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failed) = watching.await.unwrap();
    println!("figure: 10,000 requests by one user in {elapsed:?}: {requests:?}; another user's calls: {served} served, {} failed", failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    let limited = requests.get(&429).copied().unwrap_or(0);
    assert!(limited > 5_000, "the flood is refused past its rate: {requests:?}");
    let retry = flooder.send(json!({"jsonrpc": "2.0", "id": 3, "method": "ping"}).to_string()).await.unwrap();
    if retry.status == 429 {
        assert!(retry.headers.contains_key("retry-after"));
    }

    // 1,000 process starts: a per-user STDIO server made to exit on every call.
    let mut crasher = McpClient::new(&url, &mallory3);
    crasher.initialize().await.unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watching = tokio::spawn(victim_calls(victim.clone(), done.clone()));
    let mut refused = 0;
    for _ in 0..1000 {
        let answer = crasher.call("cmd_exit", json!({})).await.unwrap();
        if answer.to_string().contains("restarts in") || answer.to_string().contains("too many requests") {
            refused += 1;
        }
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failed) = watching.await.unwrap();
    let started_processes = std::fs::read_to_string(&starts).unwrap().lines().count();
    println!("figure: 1,000 attempts to restart a crashing STDIO server: {started_processes} processes started ({refused} refused); another user's calls: {served} served, {} failed", failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    assert!(started_processes < 30, "{started_processes} starts");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_within_the_timeout_and_hold_nothing() {
    let gateway = Gateway::start().await.unwrap();
    // The data plane's router on a listener with short timeouts.
    let limits = reflow_common::server::Limits {
        header_timeout: Duration::from_secs(2),
        body_timeout: Duration::from_secs(2),
        max_connections: 5_000,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = gateway.data_plane().router();
    tokio::spawn(reflow_common::server::serve(listener, router, limits, std::future::pending()));

    // 1,000 connections that send half a request head and stop; each is watched on its own.
    let watchers: Vec<_> = (0..1000)
        .map(|_| {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
                socket.write_all(b"POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: applic").await.unwrap();
                let sent = Instant::now();
                let mut buffer = [0u8; 256];
                let read = tokio::time::timeout(Duration::from_secs(15), socket.read(&mut buffer)).await;
                (matches!(read, Ok(Ok(0))), sent.elapsed())
            })
        })
        .collect();
    // The listener still answers meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready = reqwest::get(format!("http://{address}/ready")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let mut closed = Vec::new();
    for watcher in watchers {
        closed.push(watcher.await.unwrap());
    }
    let latest = closed.iter().map(|(_, after)| *after).max().unwrap();
    println!("figure: 1,000 half-sent request heads: each closed by the gateway at most {latest:?} after it was sent (header_timeout 2 s)");
    assert!(closed.iter().all(|(closed, _)| *closed), "some connections were left open");
    assert!(latest < Duration::from_secs(5), "one was closed only after {latest:?}");

    // A request whose body never arrives whole: 408 after the body timeout.
    let mut socket = std::net::TcpStream::connect(address).unwrap();
    write!(
        socket,
        "POST /mcp HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: 1000\r\n\r\n{{\"jsonrpc\"",
        gateway.admin_token
    )
    .unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    let _ = socket.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
    gateway.stop().await;
}
