//! Aggregated `tools/list` over 1, 10 and 50 targets (cold and warm), new sessions per
//! second, and data-plane memory per idle session: measured against a separate data-plane
//! process and the fast upstream (one process serving every target, each on its own path).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use crate::calls::spawn_server;
use crate::client::McpClient;
use crate::harness::Gateway;
use crate::measure::{cpu_during, resident_bytes};
use crate::percentile;

async fn timed_list(client: &mut McpClient, expected: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let names = client.tool_names().await?;
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(names.len() == expected, "listed {} tools, expected {expected}", names.len());
    Ok(elapsed)
}

/// `tools/list` with 1, 10 and 50 targets offering 100 tools in all (one page), so that only
/// the number of targets changes. Cold: a new session of a user with no merged list yet
/// (every upstream asked, in parallel); warm: the same session again.
pub async fn lists(program: &Path, cold_runs: usize, warm_runs: usize) -> anyhow::Result<Vec<Value>> {
    const TOOLS: usize = 100;
    let gateway = Gateway::start_external(program).await?;
    let pid = gateway.data_plane_pid().context("the data plane's pid")?;
    let (_upstream, port) = spawn_server(program, "fast upstream", &["serve-fast-upstream"]).await?;
    gateway.allow_everyone().await?;
    let mut users = Vec::new();
    for i in 0..cold_runs {
        users.push(gateway.user(&format!("lister{i}@example.com")).await?.1);
    }
    let http = reqwest::Client::new();
    let url = format!("{}/mcp", gateway.mcp);
    let mut results = Vec::new();
    let mut generation = 0;
    for count in [1usize, 10, 50] {
        // Each size gets targets of its own, with TOOLS / count tools each; the others are
        // disabled.
        generation += 1;
        for i in 0..count {
            let url = format!("http://127.0.0.1:{port}/g{generation}/t{i}?tools={}", TOOLS / count);
            gateway.target(&format!("g{generation}t{i}"), "streamable-http", &url).await?;
        }
        if generation > 1 {
            disable_generation(&gateway, generation - 1).await?;
        }
        let expected = TOOLS;
        let mut cold = Vec::new();
        for token in &users {
            let mut session = McpClient::with_http(http.clone(), &url, token);
            session.initialize().await?;
            cold.push(timed_list(&mut session, expected).await?);
        }
        let mut session = McpClient::with_http(http.clone(), &url, &gateway.admin_token);
        session.initialize().await?;
        timed_list(&mut session, expected).await?;
        let (warm, cpu) = cpu_during(pid, async {
            let mut warm = Vec::new();
            for _ in 0..warm_runs {
                warm.push(timed_list(&mut session, expected).await?);
            }
            Ok::<_, anyhow::Error>(warm)
        })
        .await?;
        let (mut cold, mut warm) = (cold, warm?);
        cold.sort_by(f64::total_cmp);
        warm.sort_by(f64::total_cmp);
        results.push(json!({
            "scenario": "tools_list",
            "targets": count,
            "tools": TOOLS,
            "cold_p50_ms": percentile(&cold, 50.0),
            "cold_p99_ms": percentile(&cold, 99.0),
            "warm_p50_ms": percentile(&warm, 50.0),
            "warm_p99_ms": percentile(&warm, 99.0),
            "warm_cpu_us_per_list": cpu.as_secs_f64() * 1e6 / warm_runs.max(1) as f64,
        }));
    }
    if let (Some(one), Some(fifty)) = (results.first(), results.last()) {
        let per_target = (fifty["cold_p50_ms"].as_f64().unwrap_or(f64::NAN)
            - one["cold_p50_ms"].as_f64().unwrap_or(f64::NAN))
            / 49.0;
        let warm_ratio =
            fifty["warm_p50_ms"].as_f64().unwrap_or(f64::NAN) / one["warm_p50_ms"].as_f64().unwrap_or(f64::NAN);
        for result in &mut results {
            result["cold_ms_per_extra_target"] = json!(per_target);
            result["warm_50_vs_1"] = json!(warm_ratio);
        }
    }
    gateway.stop().await;
    Ok(results)
}

async fn disable_generation(gateway: &Gateway, generation: usize) -> anyhow::Result<()> {
    let targets = gateway.get("/api/targets").await?;
    let prefix = format!("g{generation}t");
    for target in targets.as_array().into_iter().flatten() {
        if target["name"].as_str().is_some_and(|n| n.starts_with(&prefix)) {
            let id = target["id"].as_str().context("target id")?;
            gateway.admin(reqwest::Method::PUT, &format!("/api/targets/{id}"), Some(json!({"enabled": false}))).await?;
        }
    }
    Ok(())
}

/// New sessions per second (initialize, initialized, first `tools/list`; each session is then
/// deleted so they do not pile up), and the data plane's memory per idle session with
/// `idle` sessions held.
pub async fn sessions(
    program: &Path,
    concurrency: usize,
    duration: Duration,
    idle: usize,
) -> anyhow::Result<Vec<Value>> {
    let gateway = Gateway::start_external(program).await?;
    let pid = gateway.data_plane_pid().context("the data plane's pid")?;
    let (_upstream, port) = spawn_server(program, "fast upstream", &["serve-fast-upstream", "--tools", "10"]).await?;
    gateway.target("fast", "streamable-http", &format!("http://127.0.0.1:{port}/mcp")).await?;
    gateway.allow_everyone().await?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(concurrency * 2).build()?;
    let url = Arc::new(format!("{}/mcp", gateway.mcp));
    let token = Arc::new(gateway.admin_token.clone());

    let churn = |duration: Duration| {
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let started = Instant::now();
                while started.elapsed() < duration {
                    let at = Instant::now();
                    let mut session = McpClient::with_http(http.clone(), &url, &token);
                    session.initialize().await?;
                    session.tool_names().await?;
                    latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                    anyhow::ensure!(session.delete().await? == 204, "the session did not end");
                }
                Ok::<_, anyhow::Error>(latencies)
            }));
        }
        crate::gather(workers, duration)
    };
    churn(Duration::from_millis(500)).await?; // warm-up
    let (churned, cpu) = cpu_during(pid, churn(duration)).await?;
    let (rate, latencies) = churned?;
    let made = latencies.len() as f64;
    let mut results = vec![json!({
        "scenario": "new_sessions",
        "concurrency": concurrency,
        "sessions_per_s": rate,
        "sessions_per_cpu_s": made / cpu.as_secs_f64().max(1e-9),
        "gateway_cpu_us_per_session": cpu.as_secs_f64() * 1e6 / made.max(1.0),
        "p50_ms": percentile(&latencies, 50.0),
        "p99_ms": percentile(&latencies, 99.0),
    })];

    // Idle sessions: initialised, with their first list, then left alone. A first batch (a
    // tenth) takes the one-time growth (allocator pages, the session table's first sizes);
    // the figure is the growth over the `idle` sessions opened after it.
    let open = |count: usize| {
        let per_worker = count.div_ceil(concurrency);
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (http, url, token) = (http.clone(), url.clone(), token.clone());
                tokio::spawn(async move {
                    let mut sessions = Vec::new();
                    for _ in 0..per_worker {
                        let mut session = McpClient::with_http(http.clone(), &url, &token);
                        session.initialize().await?;
                        session.tool_names().await?;
                        sessions.push(session);
                    }
                    Ok::<_, anyhow::Error>(sessions)
                })
            })
            .collect();
        async move {
            let mut opened = Vec::new();
            for worker in workers {
                opened.extend(worker.await??);
            }
            Ok::<_, anyhow::Error>(opened)
        }
    };
    let mut held = open(idle / 10).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = resident_bytes(pid)?;
    let measured = open(idle).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = resident_bytes(pid)?;
    let measured_count = measured.len();
    held.extend(measured);
    let ready: Value = http.get(format!("{}/ready", gateway.mcp)).send().await?.json().await?;
    let count = ready["sessions"].as_u64().unwrap_or(0);
    anyhow::ensure!(count as usize >= held.len(), "the data plane holds {count} sessions, expected {}", held.len());
    results.push(json!({
        "scenario": "idle_session_memory",
        "sessions": measured_count,
        "sessions_held": held.len(),
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_session": after.saturating_sub(before) as f64 / measured_count.max(1) as f64,
    }));
    gateway.stop().await;
    Ok(results)
}
