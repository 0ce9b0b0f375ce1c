//! `tools/call` measured three ways in one run against the same upstream: directly, through a
//! bare pass-through proxy, and through the gateway (JWT, policy, session and credential
//! injection on). Throughput and latency at several concurrency levels, and latency at a fixed
//! rate of half the gateway's saturation, as ratios; the gateway's and the proxy's CPU per call
//! read from their own processes.
//!
//! Every server is a separate process (the fast upstream, the proxy and the data plane run
//! from this benchmark's own binary: see `serve-*` in `reflow-bench`); the load generator is
//! this process. All share the machine, as the targets assume.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio::process::Command;

use crate::client::McpClient;
use crate::harness::{everything, free_port, Gateway, Mode, Process};
use crate::measure::cpu_during;
use crate::percentile;

/// The credential the gateway injects for the fast upstream, which refuses calls without it.
pub const UPSTREAM_SECRET: &str = "bench-upstream-secret";

/// Runs `concurrency` sessions against `url`, each calling `tool` back to back for `duration`.
/// Returns (calls per second, sorted latencies in ms).
pub async fn drive(
    url: &str,
    token: &str,
    tool: &str,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<(f64, Vec<f64>)> {
    drive_with(url, token, tool, concurrency, duration, None).await
}

/// Like [`drive`], but when `rate` is set the calls are scheduled at that many per second in
/// all (spread over the sessions) and each latency counts from the call's scheduled time, so
/// a stall shows in the figures instead of silently lowering the load.
pub async fn drive_with(
    url: &str,
    token: &str,
    tool: &str,
    concurrency: usize,
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let mut client = McpClient::new(url, token);
        client.initialize().await?;
        clients.push(client);
    }
    let started = Instant::now();
    let mut workers = Vec::new();
    for (index, mut client) in clients.into_iter().enumerate() {
        let tool = tool.to_string();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u32;
            while started.elapsed() < duration {
                let scheduled = match rate {
                    Some(rate) => {
                        let at =
                            started + Duration::from_secs_f64((index as f64 + (n * concurrency as u32) as f64) / rate);
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    None => Instant::now(),
                };
                n += 1;
                let answer = client.call(&tool, json!({"message": "bench"})).await?;
                anyhow::ensure!(answer.get("result").is_some(), "call failed: {answer}");
                latencies.push(scheduled.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    crate::gather(workers, duration).await
}

/// One upstream reached three ways.
struct Paths {
    label: &'static str,
    direct: String,
    proxy: String,
    gateway: String,
    /// The token the upstream expects from direct and proxied clients.
    upstream_token: String,
    /// The tool's name directly and through the gateway.
    tool: &'static str,
    gateway_tool: String,
}

/// One path's run: calls per second, sorted latencies, CPU per call of the gateway or proxy.
struct Run {
    rps: f64,
    latencies: Vec<f64>,
    cpu_us_per_call: Option<f64>,
}

/// One path's load: where, as whom, which tool, how much.
struct Load<'a> {
    url: &'a str,
    token: &'a str,
    tool: &'a str,
    concurrency: usize,
    duration: Duration,
    rate: Option<f64>,
}

/// Drives `load`, reading the CPU `pid` (the gateway or proxy) uses meanwhile.
async fn run(load: Load<'_>, pid: Option<u32>) -> anyhow::Result<Run> {
    let work = drive_with(load.url, load.token, load.tool, load.concurrency, load.duration, load.rate);
    let ((rps, latencies), cpu) = match pid {
        Some(pid) => {
            let (result, cpu) = cpu_during(pid, work).await?;
            (result?, Some(cpu))
        }
        None => (work.await?, None),
    };
    let calls = latencies.len().max(1) as f64;
    Ok(Run { rps, cpu_us_per_call: cpu.map(|cpu| cpu.as_secs_f64() * 1e6 / calls), latencies })
}

/// A process of this benchmark's binary (`program serve-… --listen …`) on a fresh port.
pub async fn spawn_server(program: &Path, name: &str, args: &[&str]) -> anyhow::Result<(Process, u16)> {
    let port = free_port();
    let mut process =
        Process::spawn(name, Command::new(program).args(args).args(["--listen", &format!("127.0.0.1:{port}")]))?;
    process.wait_for_port(port, Duration::from_secs(30)).await?;
    Ok((process, port))
}

/// The fast upstream (one tool, refusing calls without [`UPSTREAM_SECRET`]) as a process, and
/// the target `fast` for it on `gateway`, with the secret as its credential.
pub async fn fast_target(program: &Path, gateway: &Gateway) -> anyhow::Result<(Process, u16)> {
    let authorization = format!("Bearer {UPSTREAM_SECRET}");
    let (process, port) = spawn_server(
        program,
        "fast upstream",
        &["serve-fast-upstream", "--tools", "1", "--authorization", &authorization],
    )
    .await?;
    let fast_id = gateway.target("fast", "streamable-http", &format!("http://127.0.0.1:{port}/mcp")).await?;
    gateway
        .post(&format!("/api/targets/{fast_id}/env/default"), json!({"key": "AUTH_TOKEN", "value": UPSTREAM_SECRET}))
        .await?;
    Ok((process, port))
}

/// The report of one level: the gateway's figures, the proxy's and the direct path's.
fn report(paths: &Paths, scenario: &str, concurrency: usize, gateway: &Run, proxy: &Run, direct: &Run) -> Value {
    let p = |run: &Run, q: f64| percentile(&run.latencies, q);
    json!({
        "scenario": scenario,
        "upstream": paths.label,
        "concurrency": concurrency,
        "gateway_rps": gateway.rps,
        "proxy_rps": proxy.rps,
        "direct_rps": direct.rps,
        "ratio_vs_proxy": gateway.rps / proxy.rps,
        "ratio_vs_direct": gateway.rps / direct.rps,
        "gateway_cpu_us_per_call": gateway.cpu_us_per_call,
        "proxy_cpu_us_per_call": proxy.cpu_us_per_call,
        "p50_ms": p(gateway, 50.0),
        "p99_ms": p(gateway, 99.0),
        "proxy_p50_ms": p(proxy, 50.0),
        "proxy_p99_ms": p(proxy, 99.0),
        "direct_p50_ms": p(direct, 50.0),
        "direct_p99_ms": p(direct, 99.0),
        "added_p50_ms": p(gateway, 50.0) - p(direct, 50.0),
        "added_p50_vs_proxy_ms": p(gateway, 50.0) - p(proxy, 50.0),
    })
}

/// Measures every level for each upstream (the fast in-repo one, then server-everything),
/// then the fixed rate of half the gateway's best throughput on the fast upstream.
/// `program` is the benchmark's binary, for the separate processes.
pub async fn tools_call(program: &Path, levels: &[usize], duration: Duration) -> anyhow::Result<Vec<Value>> {
    let gateway = Gateway::start_external(program).await?;
    let gateway_pid = gateway.data_plane_pid().context("the data plane's pid")?;
    let (_fast, fast_port) = fast_target(program, &gateway).await?;
    let real = everything(Mode::StreamableHttp, None).await?;
    gateway.target("everything", "streamable-http", &real.url).await?;
    gateway.allow_everyone().await?;

    let mut results = Vec::new();
    let through = format!("{}/mcp", gateway.mcp);
    for (label, upstream_port, upstream_token, tool, gateway_tool) in [
        ("fast", fast_port, UPSTREAM_SECRET, "echo", "fast_echo"),
        ("server-everything", real.port, "unused", "echo", "everything_echo"),
    ] {
        let upstream = format!("127.0.0.1:{upstream_port}");
        let (proxy_process, proxy_port) =
            spawn_server(program, "proxy", &["serve-proxy", "--upstream", &upstream]).await?;
        let paths = Paths {
            label,
            direct: format!("http://{upstream}/mcp"),
            proxy: format!("http://127.0.0.1:{proxy_port}/mcp"),
            gateway: through.clone(),
            upstream_token: upstream_token.to_string(),
            tool,
            gateway_tool: gateway_tool.to_string(),
        };
        let proxy_pid = proxy_process.pid();
        let mut best_gateway_rps: f64 = 0.0;
        for &concurrency in levels {
            let (gateway_run, proxy_run, direct_run) =
                three_ways(&paths, &gateway.admin_token, concurrency, duration, None, gateway_pid, proxy_pid).await?;
            best_gateway_rps = best_gateway_rps.max(gateway_run.rps);
            results.push(report(&paths, "tools_call", concurrency, &gateway_run, &proxy_run, &direct_run));
        }
        if label == "fast" {
            let rate = best_gateway_rps / 2.0;
            let concurrency = levels.iter().copied().max().unwrap_or(8);
            let (gateway_run, proxy_run, direct_run) =
                three_ways(&paths, &gateway.admin_token, concurrency, duration, Some(rate), gateway_pid, proxy_pid)
                    .await?;
            let mut fixed = report(&paths, "tools_call_fixed_rate", concurrency, &gateway_run, &proxy_run, &direct_run);
            fixed["rate"] = json!(rate);
            results.push(fixed);
        }
    }
    gateway.stop().await;
    Ok(results)
}

async fn three_ways(
    paths: &Paths,
    gateway_token: &str,
    concurrency: usize,
    duration: Duration,
    rate: Option<f64>,
    gateway_pid: u32,
    proxy_pid: Option<u32>,
) -> anyhow::Result<(Run, Run, Run)> {
    let load = |url, token, tool| Load { url, token, tool, concurrency, duration, rate };
    let direct = run(load(&paths.direct, &paths.upstream_token, paths.tool), None).await?;
    let proxy = run(load(&paths.proxy, &paths.upstream_token, paths.tool), proxy_pid).await?;
    let gateway = run(load(&paths.gateway, gateway_token, &paths.gateway_tool), Some(gateway_pid)).await?;
    Ok((gateway, proxy, direct))
}

/// `tools/call` through two gateways alike but for the audit trail: off, and on (every call
/// recorded, spooled and shipped to the control plane). At each level both are driven in turn
/// (their order alternating), so the ratios come from one run; then what one record costs in
/// the spool, from the audited data plane's `/ready`.
pub async fn audit_cost(program: &Path, levels: &[usize], duration: Duration) -> anyhow::Result<Vec<Value>> {
    let on = Gateway::start_external_audited(program).await?;
    let (mut results, on) = on_off(program, "audit", on, levels, duration).await?;
    let ready: Value = reqwest::get(format!("{}/ready", on.mcp)).await?.json().await?;
    let audit = &ready["audit"];
    let (bytes, records) =
        (audit["spooled_bytes"].as_f64().unwrap_or(0.0), audit["spooled_records"].as_f64().unwrap_or(0.0));
    anyhow::ensure!(records > 0.0, "the audited data plane spooled no record: {ready}");
    results.push(json!({
        "scenario": "audit_spool",
        "records": records,
        "bytes_per_record": bytes / records,
        "dropped": audit["dropped"],
    }));
    on.stop().await;
    Ok(results)
}

/// tools/call through a data plane exporting telemetry (every trace sampled) to a collector
/// that accepts connections and never answers, against one without telemetry: the exporter
/// must cost calls nothing while it waits and drops. Then what the exporter counted.
pub async fn telemetry_cost(program: &Path, levels: &[usize], duration: Duration) -> anyhow::Result<Vec<Value>> {
    // A black hole: connections are taken and held, nothing is ever read or answered.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", hole.local_addr()?);
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = hole.accept().await {
            connections.push(connection);
        }
    });
    let on = Gateway::start_external_exporting(program, &endpoint).await?;
    let (mut results, on) = on_off(program, "telemetry", on, levels, duration).await?;
    let metrics = reqwest::get(format!("{}/metrics", on.mcp)).await?.text().await?;
    let read =
        |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(f64::NAN);
    let (dropped, failures) =
        (read("reflow_telemetry_spans_dropped_total "), read("reflow_telemetry_export_failures_total "));
    anyhow::ensure!(read("reflow_telemetry_spans_exported_total ") == 0.0, "a black hole took spans");
    results.push(json!({"scenario": "telemetry_export", "spans_dropped": dropped, "export_failures": failures}));
    on.stop().await;
    held.abort();
    Ok(results)
}

/// Drives the fast upstream's `echo` through a plain data plane ("off") and `on` at each
/// concurrency level in turn (their order alternating), so the ratios come from one run;
/// returns a row per level, and `on` for what the scenario reads of it after.
pub async fn on_off(
    program: &Path,
    scenario: &str,
    on: Gateway,
    levels: &[usize],
    duration: Duration,
) -> anyhow::Result<(Vec<Value>, Gateway)> {
    let (_fast, fast_port) = spawn_server(program, "fast upstream", &["serve-fast-upstream", "--tools", "1"]).await?;
    let fast = format!("http://127.0.0.1:{fast_port}/mcp");
    let off = Gateway::start_external(program).await?;
    for gateway in [&off, &on] {
        gateway.target("fast", "streamable-http", &fast).await?;
        gateway.allow_everyone().await?;
    }
    let (off_url, on_url) = (format!("{}/mcp", off.mcp), format!("{}/mcp", on.mcp));
    let mut results = Vec::new();
    for (i, &concurrency) in levels.iter().enumerate() {
        let load = |url| Load { url, token: "", tool: "fast_echo", concurrency, duration, rate: None };
        let drive = |gateway: &Gateway, url| {
            let pid = gateway.data_plane_pid();
            let token = gateway.admin_token.clone();
            async move { run(Load { token: &token, ..load(url) }, pid).await }
        };
        let (off_run, on_run) = if i % 2 == 0 {
            let off_run = drive(&off, &off_url).await?;
            (off_run, drive(&on, &on_url).await?)
        } else {
            let on_run = drive(&on, &on_url).await?;
            (drive(&off, &off_url).await?, on_run)
        };
        let cpu = |run: &Run| run.cpu_us_per_call.unwrap_or(f64::NAN);
        results.push(json!({
            "scenario": scenario,
            "concurrency": concurrency,
            "off_rps": off_run.rps,
            "on_rps": on_run.rps,
            "rps_ratio": on_run.rps / off_run.rps,
            "off_cpu_us_per_call": cpu(&off_run),
            "on_cpu_us_per_call": cpu(&on_run),
            "cpu_ratio": cpu(&off_run) / cpu(&on_run),
            "on_p50_ms": percentile(&on_run.latencies, 50.0),
            "off_p50_ms": percentile(&off_run.latencies, 50.0),
        }));
    }
    off.stop().await;
    Ok((results, on))
}
