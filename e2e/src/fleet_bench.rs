//! A fleet without sticky sessions, measured: `tools/call` to the fast upstream through the
//! round-robin [`crate::balancer`] in front of three data planes, beside one data plane
//! directly and the balancer in front of that one data plane (what the hop costs by itself);
//! and the first request of a session on a replica that has never seen it (it resumes the
//! session from its id and adopts the upstream session) beside a warm request.
//!
//! The data planes are separate processes of this benchmark's binary; the balancer and the load
//! generator share this process.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::balancer::Balancer;
use crate::calls::{drive, fast_target};
use crate::client::McpClient;
use crate::harness::Gateway;
use crate::percentile;

/// Every row: the three paths at each concurrency level, then the cold/warm comparison over
/// `sessions` sessions.
pub async fn fleet(
    program: &Path,
    levels: &[usize],
    duration: Duration,
    sessions: usize,
) -> anyhow::Result<Vec<Value>> {
    let gateway = Gateway::start_external(program).await?;
    let _fast = fast_target(program, &gateway).await?;
    gateway.allow_everyone().await?;
    let mut planes = Vec::new();
    let mut backends = vec![gateway.mcp.trim_start_matches("http://").to_string()];
    for n in 1..3 {
        let (process, port) = gateway.data_plane_process(&format!("bench-fleet-{n}")).await?;
        backends.push(format!("127.0.0.1:{port}"));
        planes.push(process);
    }
    let one = Balancer::start(backends[..1].to_vec()).await?;
    let three = Balancer::start(backends.clone()).await?;
    let token = gateway.admin_token.clone();

    let mut results = Vec::new();
    for &concurrency in levels {
        let direct = drive(&format!("{}/mcp/fast", gateway.mcp), &token, "echo", concurrency, duration).await?;
        let hop = drive(&format!("{}/mcp/fast", one.url), &token, "echo", concurrency, duration).await?;
        let fleet = drive(&format!("{}/mcp/fast", three.url), &token, "echo", concurrency, duration).await?;
        results.push(json!({
            "scenario": "fleet_tools_call",
            "concurrency": concurrency,
            "one_direct_rps": direct.0,
            "balancer_one_rps": hop.0,
            "balancer_three_rps": fleet.0,
            "three_vs_one_direct": fleet.0 / direct.0,
            "three_vs_balancer_one": fleet.0 / hop.0,
            "one_direct_p50_ms": percentile(&direct.1, 50.0),
            "balancer_three_p50_ms": percentile(&fleet.1, 50.0),
            "balancer_three_p99_ms": percentile(&fleet.1, 99.0),
        }));
    }

    // A session opened on the first data plane, then called on the second: its first request
    // there resumes it, the next is warm.
    let (first, second) = (format!("http://{}/mcp/fast", backends[0]), format!("http://{}/mcp/fast", backends[1]));
    let (mut cold, mut warm) = (Vec::with_capacity(sessions), Vec::with_capacity(sessions));
    for _ in 0..sessions {
        let mut opener = McpClient::new(&first, &token);
        opener.initialize().await?;
        let mut elsewhere = McpClient::new(&second, &token);
        elsewhere.session = opener.session.clone();
        for latencies in [&mut cold, &mut warm] {
            let started = Instant::now();
            let answer = elsewhere.call("echo", json!({"message": "bench"})).await?;
            anyhow::ensure!(answer.get("result").is_some(), "call failed: {answer}");
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    cold.sort_by(f64::total_cmp);
    warm.sort_by(f64::total_cmp);
    results.push(json!({
        "scenario": "fleet_first_request_elsewhere",
        "sessions": sessions,
        "cold_p50_ms": percentile(&cold, 50.0),
        "cold_p99_ms": percentile(&cold, 99.0),
        "warm_p50_ms": percentile(&warm, 50.0),
        "warm_p99_ms": percentile(&warm, 99.0),
        "cold_vs_warm_p50": percentile(&cold, 50.0) / percentile(&warm, 50.0),
    }));
    drop(planes);
    gateway.stop().await;
    Ok(results)
}
