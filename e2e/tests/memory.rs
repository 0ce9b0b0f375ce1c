//! What one client can make the gateway hold, measured: each bound below is a figure this test
//! prints and checks. One test function, so the process's memory is this scenario's alone.

use std::io::{Read, Write};
use std::time::Duration;

use reflow_e2e::client::McpClient;
use reflow_e2e::harness::*;
use reflow_e2e::measure::peak_resident_bytes;
use reflow_e2e::recorder::Recorder;
use serde_json::{json, Value};

const MIB: u64 = 1024 * 1024;

fn peak() -> u64 {
    peak_resident_bytes(std::process::id()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_client_can_make_the_gateway_hold_is_bounded() {
    let huge = Recorder::start(700 * 1024 * 1024).await.unwrap();
    // No rate limit here: what is measured is what a client makes the gateway hold.
    let gateway = Gateway::start_with(reflow_data_plane::mcp::McpSettings::default().without_shares()).await.unwrap();
    gateway.target("rec", "streamable-http", &huge.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let url = format!("{}/mcp", gateway.mcp);

    // 100 sessions whose initialize carries 3 MB of capabilities: refused, nothing kept.
    let before = peak();
    let capabilities = json!({"experimental": {"blob": "x".repeat(3 * 1024 * 1024)}});
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                      "params": {"protocolVersion": "2025-11-25", "capabilities": capabilities,
                                 "clientInfo": {"name": "big", "version": "0"}}})
    .to_string();
    let client = McpClient::new(&url, &gateway.admin_token);
    let mut refused = 0;
    for _ in 0..100 {
        let answer = client.send(body.clone()).await.unwrap();
        assert!(answer.headers.get("mcp-session-id").is_none(), "a session was kept");
        if answer.error_code() == Some(-32602) {
            refused += 1;
        }
    }
    let grown = peak().saturating_sub(before);
    println!(
        "figure: 100 initialize requests with 3 MB capabilities: {refused} refused, peak memory +{} MiB",
        grown / MIB
    );
    assert_eq!(refused, 100);
    assert_eq!(gateway.data_plane().gateway().sessions.len(), 0);
    assert!(grown < 64 * MIB, "peak memory grew {} MiB (100 × 3 MB would be 300)", grown / MIB);

    // A legacy SSE client that never reads its stream, and posts 6,000 requests.
    let before = peak();
    let address = gateway.mcp.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    write!(
        stream,
        "GET /mcp HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
        gateway.admin_token
    )
    .unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = vec![0u8; 4096];
    let mut read = 0;
    let endpoint = loop {
        read += stream.read(&mut head[read..]).unwrap();
        let text = String::from_utf8_lossy(&head[..read]).to_string();
        if let Some(at) = text.find("sessionId=") {
            if let Some(end) = text[at..].find(['\r', '\n']) {
                break format!("/mcp?{}", &text[at..at + end]);
            }
        }
    };
    // From here on the client reads nothing.
    let post = |body: Value| {
        let request = gateway
            .http
            .post(format!("{}{endpoint}", gateway.mcp))
            .bearer_auth(&gateway.admin_token)
            .header("content-type", "application/json")
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let initialize = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "deaf", "version": "0"}}});
    assert_eq!(post(initialize).await.0, 202);
    // Replies of 16 KiB (the echo of the arguments), so the socket's own buffers fill soon.
    let padding = "p".repeat(16 * 1024);
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut refusal = None;
    for i in 0..6000 {
        let call = json!({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call",
                          "params": {"name": "rec_echo", "arguments": {"message": padding}}});
        let (status, body) = post(call).await;
        if status != 202 && refusal.is_none() {
            refusal = Some(body);
        }
        *statuses.entry(status).or_default() += 1;
    }
    let accepted = statuses.get(&202).copied().unwrap_or(0);
    let grown = peak().saturating_sub(before);
    println!("figure: legacy client that never reads, 6,000 posts: {statuses:?}, peak memory +{} MiB", grown / MIB);
    assert!(accepted < 6000, "every reply was queued: {statuses:?}");
    let refusal = refusal.expect("the session was closed");
    assert!(refusal.contains("not being read"), "a clear error: {refusal}");
    assert!(statuses.get(&404).copied().unwrap_or(0) > 5000, "and then it was gone: {statuses:?}");
    assert!(grown < 64 * MIB, "peak memory grew {} MiB", grown / MIB);
    drop(stream);

    // An upstream whose reply is 700 MB (streamed, no length announced): cut at 16 MiB.
    let before = peak();
    let mut client = McpClient::new(&url, &gateway.admin_token);
    client.initialize().await.unwrap();
    let answer = client.call("rec_huge", json!({})).await.unwrap();
    let grown = peak().saturating_sub(before);
    println!("figure: a 700 MB upstream reply: {}, peak memory +{} MiB", answer["error"]["message"], grown / MIB);
    assert_eq!(answer["error"]["code"], -32000, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("max_response_bytes"), "{answer}");
    assert!(grown < 128 * MIB, "peak memory grew {} MiB", grown / MIB);
    gateway.stop().await;
}
