//! `tools/call` through the gateway against the same upstream called directly, measured in one
//! run: throughput and latency at several concurrency levels, as ratios.
//!
//! The upstream is server-everything over Streamable HTTP (a real server, not one built for
//! speed; the in-repo fast upstream, a bare pass-through proxy and the gateway's CPU per call
//! measured from a separate process are the benchmark issue's next steps). The load generator
//! and the gateway share this process, so the ratios understate what a separate gateway does.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::McpClient;
use crate::harness::{everything, Gateway, Mode};
use crate::percentile;

/// Runs `concurrency` sessions against `url`, each calling `tool` back to back for `duration`.
/// Returns (calls per second, sorted latencies in ms).
pub async fn drive(
    url: &str,
    token: &str,
    tool: &str,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let mut client = McpClient::new(url, token);
        client.initialize().await?;
        let tool = tool.to_string();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let started = Instant::now();
            while started.elapsed() < duration {
                let at = Instant::now();
                let answer = client.call(&tool, json!({"message": "bench"})).await?;
                anyhow::ensure!(answer.get("result").is_some(), "call failed: {answer}");
                latencies.push(at.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    crate::gather(workers, duration).await
}

/// One JSON object per concurrency level.
pub async fn tools_call(levels: &[usize], duration: Duration) -> anyhow::Result<Vec<Value>> {
    let gateway = Gateway::start().await?;
    let upstream = everything(Mode::StreamableHttp, None).await?;
    gateway.target("everything", "streamable-http", &upstream.url).await?;
    gateway.allow_everyone().await?;
    let through = format!("{}/mcp", gateway.mcp);
    let mut results = Vec::new();
    for &concurrency in levels {
        let (direct_rps, direct) = drive(&upstream.url, "unused", "echo", concurrency, duration).await?;
        let (gateway_rps, via) =
            drive(&through, &gateway.admin_token, "everything_echo", concurrency, duration).await?;
        results.push(json!({
            "scenario": "tools_call_server_everything",
            "concurrency": concurrency,
            "gateway_rps": gateway_rps,
            "direct_rps": direct_rps,
            "ratio_vs_direct": gateway_rps / direct_rps,
            "p50_ms": percentile(&via, 50.0),
            "p99_ms": percentile(&via, 99.0),
            "direct_p50_ms": percentile(&direct, 50.0),
            "direct_p99_ms": percentile(&direct, 99.0),
            "added_p50_ms": percentile(&via, 50.0) - percentile(&direct, 50.0),
        }));
    }
    gateway.stop().await;
    Ok(results)
}
