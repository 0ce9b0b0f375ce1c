//! Kubernetes benchmark: a kubernetes target's cold start (first request → a Verified instance
//! answering through the gateway) and warm `tools/call` through the gateway against calling the
//! pod's server directly, in one run, on the test cluster of [`crate::cluster`] (real API server,
//! pods as local processes).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::client::McpClient;
use crate::cluster::{Cluster, NodeAgent, ENV_SERVER_IMAGE};
use crate::harness::Gateway;
use crate::percentile;

const NAMESPACE: &str = "bench";

pub async fn kubernetes(calls: usize) -> anyhow::Result<Vec<Value>> {
    let cluster = Cluster::start().await?;
    cluster.restricted_namespace(NAMESPACE).await?;
    let client = cluster.client().await?;
    let _agent = NodeAgent::start(client.clone()).await?;
    let shutdown = CancellationToken::new();
    let operator = tokio::spawn(reflow_operator::run(
        reflow_operator::OperatorConfig {
            kubeconfig: Some(cluster.kubeconfig.clone()),
            namespace: Some(NAMESPACE.into()),
            lease_namespace: NAMESPACE.into(),
            identity: "bench".into(),
            lease_seconds: 15,
            listen: "127.0.0.1:0".parse()?,
            verify_by_pod_ip: true,
        },
        shutdown.clone(),
    ));
    let config = reflow_common::config::KubernetesConfig {
        enabled: true,
        namespace: NAMESPACE.into(),
        kubeconfig: Some(cluster.kubeconfig.to_string_lossy().into_owned()),
        address: reflow_common::config::KubernetesAddress::Pod,
        ..Default::default()
    };
    let instances = reflow_data_plane::upstream::kubernetes::Instances::connect(&config).await?;
    let settings = reflow_data_plane::mcp::McpSettings::default().with_kubernetes(instances).without_shares();
    let gateway = Gateway::start_with(settings).await?;
    gateway
        .post(
            "/api/targets",
            json!({"name": "pod", "transport_type": "kubernetes", "image": ENV_SERVER_IMAGE, "port": 8080,
                   "health_path": "/health", "isolation_boundary": "shared"}),
        )
        .await?;
    gateway.allow_everyone().await?;

    // Cold: the first call creates the instance, waits for Verified, and is answered.
    let mut through = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    through.initialize().await?;
    let started = Instant::now();
    let first = through.call("pod_whoami", json!({})).await?;
    let cold_ms = started.elapsed().as_secs_f64() * 1000.0;
    let whoami: Value =
        serde_json::from_str(first.pointer("/result/content/0/text").and_then(Value::as_str).unwrap_or("{}"))?;
    let address = whoami["address"].as_str().ok_or_else(|| anyhow::anyhow!("the first call failed: {first}"))?;
    let mut direct = McpClient::new(&format!("http://{address}/mcp"), "unused");
    direct.initialize().await?;

    // Warm: the same call, one at a time, alternating the two paths.
    let mut gateway_ms = Vec::with_capacity(calls);
    let mut direct_ms = Vec::with_capacity(calls);
    for _ in 0..calls {
        // The gateway names the tool with its target's prefix.
        for (client, tool, samples) in
            [(&mut through, "pod_whoami", &mut gateway_ms), (&mut direct, "whoami", &mut direct_ms)]
        {
            let started = Instant::now();
            let answer = client.call(tool, json!({})).await?;
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(answer.get("result").is_some(), "a warm call failed: {answer}");
        }
    }
    gateway_ms.sort_by(f64::total_cmp);
    direct_ms.sort_by(f64::total_cmp);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
    let (g50, d50) = (percentile(&gateway_ms, 50.0), percentile(&direct_ms, 50.0));
    Ok(vec![json!({
        "scenario": "kubernetes",
        "cold_start_ms": cold_ms,
        "calls": calls,
        "gateway_p50_ms": g50,
        "gateway_p99_ms": percentile(&gateway_ms, 99.0),
        "direct_p50_ms": d50,
        "direct_p99_ms": percentile(&direct_ms, 99.0),
        "added_p50_ms": g50 - d50,
    })])
}
