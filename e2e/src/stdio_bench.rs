//! `tools/call` through the gateway to a warm shared STDIO process, against driving the same
//! server over its own stdin/stdout directly, in one run.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::oneshot;

use crate::client::McpClient;
use crate::harness::{workspace, Gateway};
use crate::percentile;

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<(Value, Instant)>>>>;

/// The test server driven directly: one writer, one reader matching replies by id.
async fn direct(concurrency: usize, duration: Duration) -> anyhow::Result<(f64, Vec<f64>)> {
    let script = workspace().join("e2e/peers/stdio_server.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start the STDIO server")?;
    let stdin = Arc::new(tokio::sync::Mutex::new(child.stdin.take().context("stdin")?));
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let waiting: Waiting = Arc::default();
    let reader_waiting = waiting.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(message) = serde_json::from_str::<Value>(&line) else { continue };
            if let Some(waiter) = message["id"].as_u64().and_then(|id| reader_waiting.lock().unwrap().remove(&id)) {
                let _ = waiter.send((message, Instant::now()));
            }
        }
    });
    let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let call = {
        let (stdin, waiting, next) = (stdin.clone(), waiting.clone(), next.clone());
        move |method: &'static str, params: Value| {
            let (stdin, waiting, next) = (stdin.clone(), waiting.clone(), next.clone());
            async move {
                let id = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                waiting.lock().unwrap().insert(id, tx);
                let mut line = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
                line.push('\n');
                stdin.lock().await.write_all(line.as_bytes()).await?;
                let (reply, _) = rx.await.context("the server closed")?;
                anyhow::Ok(reply)
            }
        }
    };
    call(
        "initialize",
        json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}),
    )
    .await?;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let call = call.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let started = Instant::now();
            while started.elapsed() < duration {
                let at = Instant::now();
                let reply = call("tools/call", json!({"name": "echo", "arguments": {"message": "bench"}})).await?;
                anyhow::ensure!(reply.get("result").is_some(), "call failed: {reply}");
                latencies.push(at.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(latencies)
        }));
    }
    crate::gather(workers, duration).await
}

/// Sessions through the gateway, all on one shared process, warmed first.
async fn through(gateway: &Gateway, concurrency: usize, duration: Duration) -> anyhow::Result<(f64, Vec<f64>)> {
    let url = format!("{}/mcp", gateway.mcp);
    let mut warm = McpClient::new(&url, &gateway.admin_token);
    warm.initialize().await?;
    warm.call("fast_echo", json!({"message": "warm"})).await?;
    crate::calls::drive(&url, &gateway.admin_token, "fast_echo", concurrency, duration).await
}

/// One JSON object per concurrency level.
pub async fn stdio_warm_call(levels: &[usize], duration: Duration) -> anyhow::Result<Vec<Value>> {
    let gateway = Gateway::start_with(reflow_data_plane::mcp::McpSettings::default().without_shares()).await?;
    let script = workspace().join("e2e/peers/stdio_server.py");
    gateway
        .post(
            "/api/targets",
            json!({"name": "fast", "transport_type": "stdio", "command": "python3", "args": [script.to_string_lossy()]}),
        )
        .await?;
    gateway.allow_everyone().await?;
    let mut results = Vec::new();
    for &concurrency in levels {
        let (direct_rps, direct_latencies) = direct(concurrency, duration).await?;
        let (gateway_rps, latencies) = through(&gateway, concurrency, duration).await?;
        results.push(json!({
            "scenario": "stdio_warm_call",
            "concurrency": concurrency,
            "gateway_rps": gateway_rps,
            "direct_rps": direct_rps,
            "ratio_vs_direct": gateway_rps / direct_rps,
            "p50_ms": percentile(&latencies, 50.0),
            "p99_ms": percentile(&latencies, 99.0),
            "direct_p50_ms": percentile(&direct_latencies, 50.0),
        }));
    }
    gateway.stop().await;
    Ok(results)
}
