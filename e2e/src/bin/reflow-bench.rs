//! `reflow-bench`: Reflow's benchmarks, measured in one run on this machine.
//!
//! ```text
//! cargo run --release -p reflow-e2e --bin reflow-bench -- [--quick] [--json FILE] [--database-url URL]
//! ```
//!
//! Prints a table and, with `--json`, writes one JSON object per scenario.

use clap::{Parser, Subcommand};

/// The allocator `reflow` runs with, so the data plane measured here allocates as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(name = "reflow-bench", about = "Reflow's benchmarks")]
struct Args {
    /// The benchmark starts its separate server processes from its own binary.
    #[command(subcommand)]
    serve: Option<Server>,
    /// Fewer iterations: finishes in well under two minutes.
    #[arg(long)]
    quick: bool,
    /// Write the results as a JSON array to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Run the control plane on PostgreSQL: each scenario creates (and drops) a scratch
    /// database on the server this URL names, instead of using a temporary SQLite file.
    #[arg(long)]
    database_url: Option<String>,
    /// Run only these scenarios (repeatable): propagation, policy-change, calls, audit,
    /// telemetry, stdio, lists, sessions, apply, kubernetes, fleet, eras.
    #[arg(long, value_parser = ["propagation", "policy-change", "calls", "audit", "telemetry", "stdio", "lists", "sessions", "apply", "kubernetes", "fleet", "eras"])]
    only: Vec<String>,
}

/// The processes the benchmark measures, each started from this binary.
#[derive(Debug, Subcommand)]
#[allow(clippy::enum_variant_names)] // the variants are the subcommands `serve-…`
enum Server {
    /// A data plane synced from a control plane (the gateway under measurement).
    #[command(hide = true)]
    ServeDataPlane {
        #[arg(long)]
        control_plane: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        listen: String,
        /// The data plane's name to its control plane.
        #[arg(long, default_value = "bench")]
        node_id: String,
        /// Keep an audit trail (spooled and shipped).
        #[arg(long)]
        audit: bool,
        /// Export traces and metrics over OTLP/gRPC to this endpoint.
        #[arg(long)]
        otlp: Option<String>,
    },
    /// The in-repo fast MCP upstream.
    #[command(hide = true)]
    ServeFastUpstream {
        #[arg(long)]
        listen: String,
        #[arg(long, default_value_t = 1)]
        tools: usize,
        #[arg(long)]
        authorization: Option<String>,
    },
    /// The bare pass-through proxy.
    #[command(hide = true)]
    ServeProxy {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        upstream: String,
    },
}

/// The rows of an on/off comparison ([`reflow_e2e::calls::on_off`]), and the extra rows some
/// scenarios add.
fn print_on_off(rows: &[serde_json::Value]) {
    println!(
        "{:>6} {:>10} {:>10} {:>8} {:>11} {:>11} {:>8}",
        "conc", "off/s", "on/s", "on/off", "off us/call", "on us/call", "off/on"
    );
    for result in rows {
        let f = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
        match result["scenario"].as_str() {
            Some("audit_spool") => {
                println!("  spool: {:.0} bytes per record ({} records)", f("bytes_per_record"), result["records"])
            }
            Some("telemetry_export") => println!(
                "  export: {} spans dropped, {} exports failed, none sent",
                result["spans_dropped"], result["export_failures"]
            ),
            _ => println!(
                "{:>6} {:>10.0} {:>10.0} {:>8.2} {:>11.1} {:>11.1} {:>8.2}",
                result["concurrency"].as_u64().unwrap_or(0),
                f("off_rps"),
                f("on_rps"),
                f("rps_ratio"),
                f("off_cpu_us_per_call"),
                f("on_cpu_us_per_call"),
                f("cpu_ratio")
            ),
        }
    }
}

async fn serve(server: Server) -> anyhow::Result<()> {
    match server {
        Server::ServeDataPlane { control_plane, token, listen, node_id, audit, otlp } => {
            reflow_e2e::harness::run_data_plane(&control_plane, &token, &listen, &node_id, audit, otlp.as_deref()).await
        }
        Server::ServeFastUpstream { listen, tools, authorization } => {
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            reflow_e2e::fast_upstream::FastUpstream { tools, authorization, ..Default::default() }.serve(listener).await
        }
        Server::ServeProxy { listen, upstream } => {
            reflow_e2e::proxy::serve(tokio::net::TcpListener::bind(&listen).await?, upstream).await
        }
    }
}

fn main() -> anyhow::Result<()> {
    // The STDIO launcher of the gateways this binary runs (and the tests' in-process gateways).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == reflow_data_plane::upstream::launch::SUBCOMMAND) {
        std::process::exit(reflow_data_plane::upstream::launch::main(&argv[2..]));
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(command) = args.serve {
        return serve(command).await;
    }
    let program = std::env::current_exe()?;
    let want = |scenario: &str| args.only.is_empty() || args.only.iter().any(|o| o == scenario);
    let duration = std::time::Duration::from_secs(if args.quick { 2 } else { 10 });
    let iterations = if args.quick { 30 } else { 200 };
    let mut results: Vec<Value> = Vec::new();

    if want("propagation") {
        println!("snapshot propagation: admin write returned -> every data plane holds the new version");
        println!("{:>12} {:>10} {:>10} {:>10}", "data planes", "p50 ms", "p99 ms", "max ms");
        for data_planes in [1, 10, 100] {
            let result =
                reflow_e2e::snapshot::propagation(data_planes, iterations, args.database_url.as_deref()).await?;
            println!(
                "{:>12} {:>10.2} {:>10.2} {:>10.2}",
                data_planes,
                result["p50_ms"].as_f64().unwrap_or(f64::NAN),
                result["p99_ms"].as_f64().unwrap_or(f64::NAN),
                result["max_ms"].as_f64().unwrap_or(f64::NAN)
            );
            results.push(result);
        }
    }

    if want("policy-change") {
        let result = reflow_e2e::snapshot::one_policy_change(10_000, 1_000, 5_000)?;
        println!(
            "\none-policy change on {} resources (10,000 users, 1,000 targets, 5,000 policies):\n  \
             full snapshot {} bytes, incremental update {} bytes ({} upsert), compile {:.1} ms",
            result["resources"],
            result["full_bytes"],
            result["update_bytes"],
            result["upserts"],
            result["compile_ms"].as_f64().unwrap_or(f64::NAN)
        );
        results.push(result);
    }

    if want("apply") {
        let result = reflow_e2e::declare_bench::apply_resources(333, args.database_url.as_deref()).await?;
        let f = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
        println!(
            "\ndeclarative apply of {} resources ({}): {:.0} ms, {} snapshot(s) published; again (no change) \
             {:.0} ms, {} published;\n  the same as {} single calls: {:.0} ms ({:.1}x), {} published",
            result["resources"],
            result["backend"].as_str().unwrap_or(""),
            f("apply_ms"),
            result["apply_compiles"],
            f("reapply_ms"),
            result["reapply_compiles"],
            result["one_by_one_calls"],
            f("one_by_one_ms"),
            f("one_by_one_vs_apply"),
            result["one_by_one_compiles"]
        );
        results.push(result);
    }

    if want("kubernetes") {
        for result in reflow_e2e::kube_bench::kubernetes(if args.quick { 300 } else { 2000 }).await? {
            let f = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
            println!(
                "\nkubernetes target (real API server, pod as a local process): first request to a Verified pod \
                 {:.0} ms;\n  warm tools/call p50 {:.3} ms through the gateway vs {:.3} ms direct (+{:.3} ms), \
                 p99 {:.3} vs {:.3} ms",
                f("cold_start_ms"),
                f("gateway_p50_ms"),
                f("direct_p50_ms"),
                f("added_p50_ms"),
                f("gateway_p99_ms"),
                f("direct_p99_ms")
            );
            results.push(result);
        }
    }

    if want("calls") {
        println!("\ntools/call: gateway (JWT, policy, session, credential injection) vs bare proxy vs direct");
        println!(
            "{:>18} {:>6} {:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>9}",
            "upstream",
            "conc",
            "gateway/s",
            "proxy/s",
            "direct/s",
            "/proxy",
            "/direct",
            "gw us/call",
            "px us/call",
            "p50 ms",
            "p99 ms",
            "+p50 ms"
        );
        for result in reflow_e2e::calls::tools_call(&program, &[1, 8, 32], duration).await? {
            let f = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
            let label = match result["scenario"].as_str() {
                Some("tools_call_fixed_rate") => {
                    format!("{} @{:.0}/s", result["upstream"].as_str().unwrap_or(""), f("rate"))
                }
                _ => result["upstream"].as_str().unwrap_or("").to_string(),
            };
            println!(
                "{:>18} {:>6} {:>10.0} {:>10.0} {:>10.0} {:>8.2} {:>8.2} {:>9.1} {:>9.1} {:>8.3} {:>8.3} {:>9.3}",
                label,
                result["concurrency"].as_u64().unwrap_or(0),
                f("gateway_rps"),
                f("proxy_rps"),
                f("direct_rps"),
                f("ratio_vs_proxy"),
                f("ratio_vs_direct"),
                f("gateway_cpu_us_per_call"),
                f("proxy_cpu_us_per_call"),
                f("p50_ms"),
                f("p99_ms"),
                f("added_p50_ms")
            );
            results.push(result);
        }
    }

    if want("audit") {
        println!("\ntools/call with the audit trail on (recorded, spooled, shipped) vs off, fast upstream");
        let rows = reflow_e2e::calls::audit_cost(&program, &[1, 8, 32], duration).await?;
        print_on_off(&rows);
        results.extend(rows);
    }

    if want("telemetry") {
        println!("\ntools/call with telemetry on, exporting to a collector that never answers, vs off, fast upstream");
        let rows = reflow_e2e::calls::telemetry_cost(&program, &[1, 8, 32], duration).await?;
        print_on_off(&rows);
        results.extend(rows);
    }

    if want("stdio") {
        println!("\ntools/call through the gateway to a warm shared STDIO process vs the same server driven directly");
        println!(
            "{:>12} {:>12} {:>12} {:>8} {:>10} {:>10}",
            "concurrency", "gateway/s", "direct/s", "ratio", "p50 ms", "p99 ms"
        );
        for result in reflow_e2e::stdio_bench::stdio_warm_call(&[1, 8], duration).await? {
            let f = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:>12} {:>12.0} {:>12.0} {:>8.2} {:>10.2} {:>10.2}",
                result["concurrency"].as_u64().unwrap_or(0),
                f("gateway_rps"),
                f("direct_rps"),
                f("ratio_vs_direct"),
                f("p50_ms"),
                f("p99_ms")
            );
            results.push(result);
        }
    }

    if want("lists") {
        println!("\naggregated tools/list, 100 tools over N targets: cold = a user's first list, warm = listed again");
        println!(
            "{:>8} {:>6} {:>12} {:>12} {:>12} {:>12} {:>14}",
            "targets", "tools", "cold p50 ms", "cold p99 ms", "warm p50 ms", "warm p99 ms", "warm us CPU"
        );
        let (cold, warm) = if args.quick { (10, 1000) } else { (30, 5000) };
        for result in reflow_e2e::sessions::lists(&program, cold, warm).await? {
            let f = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:>8} {:>6} {:>12.3} {:>12.3} {:>12.3} {:>12.3} {:>14.1}",
                result["targets"].as_u64().unwrap_or(0),
                result["tools"].as_u64().unwrap_or(0),
                f("cold_p50_ms"),
                f("cold_p99_ms"),
                f("warm_p50_ms"),
                f("warm_p99_ms"),
                f("warm_cpu_us_per_list")
            );
            results.push(result);
        }
        if let Some(last) = results.last() {
            println!(
                "  cold: {:.3} ms per extra target; warm at 50 targets / at 1: {:.2}",
                last["cold_ms_per_extra_target"].as_f64().unwrap_or(f64::NAN),
                last["warm_50_vs_1"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }

    if want("sessions") {
        for result in reflow_e2e::sessions::sessions(&program, 8, duration, 10_000).await? {
            let f = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
            match result["scenario"].as_str() {
                Some("new_sessions") => println!(
                    "\nnew sessions (initialize + first tools/list), 8 at a time: {:.0}/s, {:.0} per gateway CPU-second \
                     ({:.1} us CPU each), p50 {:.3} ms, p99 {:.3} ms",
                    f("sessions_per_s"),
                    f("sessions_per_cpu_s"),
                    f("gateway_cpu_us_per_session"),
                    f("p50_ms"),
                    f("p99_ms")
                ),
                _ => println!(
                    "idle sessions: {} held, data-plane RSS {:.1} -> {:.1} MiB: {:.0} bytes per session",
                    result["sessions"],
                    f("rss_before_bytes") / 1048576.0,
                    f("rss_after_bytes") / 1048576.0,
                    f("bytes_per_session")
                ),
            }
            results.push(result);
        }
    }

    if want("eras") {
        println!("\ntools/call to the fast upstream by clients of each protocol era, one data plane");
        println!(
            "{:>6} {:>12} {:>14} {:>9} {:>12} {:>14} {:>10} {:>12}",
            "conc", "session/s", "stateless/s", "ratio", "sess us/call", "stateless us/c", "sess p50", "stateless p50"
        );
        for result in reflow_e2e::eras_bench::eras(&program, &[1, 8, 32], duration).await? {
            let f = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:>6} {:>12.0} {:>14.0} {:>9.2} {:>12.1} {:>14.1} {:>10.3} {:>12.3}",
                result["concurrency"].as_u64().unwrap_or(0),
                f("session_rps"),
                f("stateless_rps"),
                f("stateless_vs_session"),
                f("session_cpu_us_per_call"),
                f("stateless_cpu_us_per_call"),
                f("session_p50_ms"),
                f("stateless_p50_ms")
            );
            results.push(result);
        }
    }

    if want("fleet") {
        println!("\ntools/call to the fast upstream: round-robin balancer over three data planes vs one data plane");
        println!(
            "{:>6} {:>12} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9}",
            "conc", "one/s", "lb+one/s", "lb+three/s", "/one", "/lb+one", "p50 ms", "p99 ms"
        );
        let sessions = if args.quick { 50 } else { 300 };
        for result in reflow_e2e::fleet_bench::fleet(&program, &[1, 8, 32], duration, sessions).await? {
            let f = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
            match result["scenario"].as_str() {
                Some("fleet_tools_call") => println!(
                    "{:>6} {:>12.0} {:>12.0} {:>12.0} {:>9.2} {:>9.2} {:>9.3} {:>9.3}",
                    result["concurrency"].as_u64().unwrap_or(0),
                    f("one_direct_rps"),
                    f("balancer_one_rps"),
                    f("balancer_three_rps"),
                    f("three_vs_one_direct"),
                    f("three_vs_balancer_one"),
                    f("balancer_three_p50_ms"),
                    f("balancer_three_p99_ms")
                ),
                _ => println!(
                    "first request of a session on a replica that never saw it: p50 {:.3} ms (p99 {:.3}) vs warm \
                     p50 {:.3} ms (p99 {:.3}): {:.2}x",
                    f("cold_p50_ms"),
                    f("cold_p99_ms"),
                    f("warm_p50_ms"),
                    f("warm_p99_ms"),
                    f("cold_vs_warm_p50")
                ),
            }
            results.push(result);
        }
    }

    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}
