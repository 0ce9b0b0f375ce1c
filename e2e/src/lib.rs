//! Reflow's end-to-end harness and benchmarks.
//!
//! # Layout
//! - [`calls`]: `tools/call` through the gateway vs a bare proxy vs directly, against the fast
//!   upstream and server-everything.
//! - [`fast_upstream`]: a minimal Streamable HTTP MCP server built for speed.
//! - [`proxy`]: a bare pass-through HTTP proxy (the limit of one extra hop).
//! - [`recorder`]: an upstream that records every request, to prove what reached it.
//! - [`sessions`]: aggregated lists over 1/10/50 targets, new sessions per second, memory per
//!   idle session.
//! - [`measure`]: a process's CPU time and resident memory, from `/proc`.
//! - [`client`]: a raw Streamable HTTP MCP client for exact status and header checks.
//! - [`harness`]: a gateway in this process plus real MCP peers as child processes, for the
//!   end-to-end tests in `tests/`.
//! - [`stdio_bench`]: calls through a warm shared STDIO process vs the same server driven directly.
//! - [`cluster`]: a real Kubernetes API server (etcd, kube-apiserver, kube-controller-manager)
//!   and the test node agent that plays the kubelet.
//! - [`kube_bench`]: a kubernetes target's cold start and warm calls through the gateway vs
//!   directly to its pod.
//! - [`declare_bench`]: a declarative apply of 1,000 resources vs the same written call by call.
//! - [`snapshot`]: snapshot distribution benchmarks (propagation time to N data planes,
//!   bytes of a one-policy change on a large snapshot).
//!
//! The `reflow-bench` binary runs the scenarios and prints a table and a JSON report.

pub mod balancer;
pub mod calls;
pub mod client;
pub mod cluster;
pub mod declare_bench;
pub mod eras_bench;
pub mod fast_upstream;
pub mod fleet_bench;
pub mod harness;
pub mod kube_bench;
pub mod measure;
pub mod proxy;
pub mod recorder;
pub mod sessions;
pub mod snapshot;
pub mod stdio_bench;

/// Percentile of sorted samples (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Waits for load workers (each returning its latencies in ms) and returns (calls per second
/// over at least `duration`, the sorted latencies).
pub async fn gather(
    workers: Vec<tokio::task::JoinHandle<anyhow::Result<Vec<f64>>>>,
    duration: std::time::Duration,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let started = std::time::Instant::now();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await??);
    }
    let elapsed = started.elapsed().as_secs_f64().max(duration.as_secs_f64());
    all.sort_by(|a, b| a.total_cmp(b));
    Ok((all.len() as f64 / elapsed, all))
}
