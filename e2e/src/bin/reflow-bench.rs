//! `reflow-bench`: Reflow's benchmarks, measured in one run on this machine.
//!
//! ```text
//! cargo run --release -p reflow-e2e --bin reflow-bench -- [--quick] [--json FILE] [--database-url URL]
//! ```
//!
//! Prints a table and, with `--json`, writes one JSON object per scenario.

use clap::Parser;
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(name = "reflow-bench", about = "Reflow's benchmarks")]
struct Args {
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let iterations = if args.quick { 30 } else { 200 };
    let mut results: Vec<Value> = Vec::new();

    println!("snapshot propagation: admin write returned -> every data plane holds the new version");
    println!("{:>12} {:>10} {:>10} {:>10}", "data planes", "p50 ms", "p99 ms", "max ms");
    for data_planes in [1, 10, 100] {
        let result = reflow_e2e::snapshot::propagation(data_planes, iterations, args.database_url.as_deref()).await?;
        println!(
            "{:>12} {:>10.2} {:>10.2} {:>10.2}",
            data_planes,
            result["p50_ms"].as_f64().unwrap_or(f64::NAN),
            result["p99_ms"].as_f64().unwrap_or(f64::NAN),
            result["max_ms"].as_f64().unwrap_or(f64::NAN)
        );
        results.push(result);
    }

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

    println!("\ntools/call through the gateway vs directly (server-everything, Streamable HTTP, one process)");
    println!(
        "{:>12} {:>12} {:>12} {:>8} {:>10} {:>10} {:>14}",
        "concurrency", "gateway/s", "direct/s", "ratio", "p50 ms", "p99 ms", "added p50 ms"
    );
    let duration = std::time::Duration::from_secs(if args.quick { 3 } else { 10 });
    for result in reflow_e2e::calls::tools_call(&[1, 8, 32], duration).await? {
        let f = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>12} {:>12.0} {:>12.0} {:>8.2} {:>10.2} {:>10.2} {:>14.3}",
            result["concurrency"].as_u64().unwrap_or(0),
            f("gateway_rps"),
            f("direct_rps"),
            f("ratio_vs_direct"),
            f("p50_ms"),
            f("p99_ms"),
            f("added_p50_ms")
        );
        results.push(result);
    }

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

    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}
