//! `tools/call` by clients of the two protocol eras through one data plane to the fast upstream
//! (a session-era server): the session era (initialize once, `Mcp-Session-Id` on every call)
//! against the stateless era (no session; `_meta` and `Mcp-Method`/`Mcp-Name` on every call,
//! the gateway holding the upstream session in a bridge). At each level both are driven in turn,
//! their order alternating, so the ratios come from one run; CPU per call is the data plane's.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::calls::{drive, fast_target};
use crate::harness::Gateway;
use crate::measure::cpu_during;
use crate::percentile;

/// `concurrency` stateless-era clients calling `tool` at `url` back to back for `duration`:
/// (calls per second, sorted latencies in ms).
pub async fn drive_stateless(
    url: &str,
    token: &str,
    tool: &str,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (http, url, token, tool) = (http.clone(), url.to_string(), token.to_string(), tool.to_string());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut id = 0u64;
            while started.elapsed() < duration {
                id += 1;
                let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
                "name": tool, "arguments": {"message": "bench"},
                "_meta": {
                    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                    "io.modelcontextprotocol/clientCapabilities": {},
                    "io.modelcontextprotocol/clientInfo": {"name": "reflow-bench", "version": "1"},
                }}});
                let at = Instant::now();
                let answer: Value = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("accept", "application/json, text/event-stream")
                    .header("mcp-protocol-version", "2026-07-28")
                    .header("mcp-method", "tools/call")
                    .header("mcp-name", &tool)
                    .json(&body)
                    .send()
                    .await?
                    .json()
                    .await?;
                anyhow::ensure!(answer.pointer("/result/resultType").is_some(), "call failed: {answer}");
                latencies.push(at.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    crate::gather(workers, duration).await
}

/// One row per level: calls per second, CPU per call and p50 of each era, and their ratios.
pub async fn eras(program: &Path, levels: &[usize], duration: Duration) -> anyhow::Result<Vec<Value>> {
    let gateway = Gateway::start_external(program).await?;
    let pid = gateway.data_plane_pid().ok_or_else(|| anyhow::anyhow!("the data plane's pid"))?;
    let (_fast, _) = fast_target(program, &gateway).await?;
    gateway.allow_everyone().await?;
    let url = format!("{}/mcp", gateway.mcp);
    let token = gateway.admin_token.clone();
    // The bridge and its upstream session are opened before measuring, as the session era's
    // clients initialise before theirs.
    drive_stateless(&url, &token, "fast_echo", 1, Duration::from_millis(200)).await?;
    let mut results = Vec::new();
    for (i, &concurrency) in levels.iter().enumerate() {
        let session = || cpu_during(pid, drive(&url, &token, "fast_echo", concurrency, duration));
        let stateless = || cpu_during(pid, drive_stateless(&url, &token, "fast_echo", concurrency, duration));
        let ((session_run, session_cpu), (stateless_run, stateless_cpu)) = if i % 2 == 0 {
            let first = session().await?;
            (first, stateless().await?)
        } else {
            let first = stateless().await?;
            (session().await?, first)
        };
        let ((session_rps, session_latencies), (stateless_rps, stateless_latencies)) = (session_run?, stateless_run?);
        let per_call = |cpu: Duration, latencies: &[f64]| cpu.as_secs_f64() * 1e6 / latencies.len().max(1) as f64;
        let session_cpu = per_call(session_cpu, &session_latencies);
        let stateless_cpu = per_call(stateless_cpu, &stateless_latencies);
        results.push(json!({
            "scenario": "eras_tools_call",
            "concurrency": concurrency,
            "session_rps": session_rps,
            "stateless_rps": stateless_rps,
            "stateless_vs_session": stateless_rps / session_rps,
            "session_cpu_us_per_call": session_cpu,
            "stateless_cpu_us_per_call": stateless_cpu,
            "session_p50_ms": percentile(&session_latencies, 50.0),
            "stateless_p50_ms": percentile(&stateless_latencies, 50.0),
        }));
    }
    gateway.stop().await;
    Ok(results)
}
