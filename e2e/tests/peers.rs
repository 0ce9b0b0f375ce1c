//! The gateway between real MCP clients and servers others wrote: the official Python SDK
//! client, the MCP Inspector CLI and the conformance suite, in front of server-everything
//! (Streamable HTTP and legacy SSE) and Python SDK servers.

use std::collections::BTreeSet;
use std::time::Duration;

use reflow_data_plane::mcp::McpSettings;
use reflow_e2e::client::McpClient;
use reflow_e2e::harness::*;
use serde_json::{json, Value};
use tokio::process::Command;

fn strings(value: &Value) -> Vec<String> {
    value.as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_string)).collect()
}

/// What the Python client must have seen of server-everything through the gateway, with
/// names prefixed by `prefix` and URIs by `uri_prefix`.
fn check_everything_report(report: &Value, prefix: &str, uri_prefix: &str) {
    let tools = strings(&report["tools"]);
    for tool in
        ["echo", "get-sum", "trigger-long-running-operation", "trigger-elicitation-request", "trigger-sampling-request"]
    {
        assert!(tools.contains(&format!("{prefix}{tool}")), "{tool} missing from {tools:?}");
    }
    assert_eq!(report["echo_schema"]["required"], json!(["message"]), "the input schema passes unchanged");
    assert_eq!(report["echo"], json!(["Echo: hello"]));
    assert_eq!(report["progress"], json!([[1.0, 3.0], [2.0, 3.0], [3.0, 3.0]]), "progress is relayed in order");
    assert!(report["long_running"].as_str().unwrap().contains("completed"));
    assert_eq!(report["elicitations"], json!(["Please provide inputs for the following fields:"]));
    assert!(report["elicitation_result"].as_str().unwrap().contains("provided the requested information"));
    assert_eq!(report["samplings"], json!(["Resource trigger-sampling-request context: Say hi"]));
    assert!(
        report["sampling_result"].as_str().unwrap().contains("sampled reply"),
        "the client's answer reached the upstream"
    );
    let resources = strings(&report["resources"]);
    let mine: Vec<&String> = resources.iter().filter(|r| r.starts_with(uri_prefix)).collect();
    assert_eq!(mine.len(), 7, "{resources:?}");
    assert!(strings(&report["templates"]).contains(&format!("{uri_prefix}demo://resource/dynamic/text/{{resourceId}}")));
    assert_eq!(report["read"]["uri"], format!("{uri_prefix}demo://resource/dynamic/text/1"));
    assert!(report["read"]["text"].as_str().unwrap().starts_with("Resource 1:"));
    let link = strings(&report["resource_links"]);
    assert_eq!(link.len(), 1);
    assert!(link[0].starts_with(uri_prefix), "resource links are mapped: {link:?}");
    assert_eq!(report["read_link"], link[0], "a mapped link reads back through the gateway");
    assert!(strings(&report["prompts"]).contains(&format!("{prefix}args-prompt")));
    assert_eq!(report["prompt"], "What's weather in Paris?");
    if !prefix.is_empty() {
        // Aggregated: a name that names no target is the gateway's to refuse. (On a single
        // target the upstream answers for its own namespace.)
        assert!(report["unknown_tool"].as_str().unwrap().contains("unknown tool"), "{}", report["unknown_tool"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_client_through_the_aggregated_endpoint() {
    let gateway = Gateway::start().await.unwrap();
    let streamable = everything(Mode::StreamableHttp, None).await.unwrap();
    let sse = everything(Mode::Sse, None).await.unwrap();
    gateway.target("everything", "streamable-http", &streamable.url).await.unwrap();
    gateway.target("legacy", "sse", &sse.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let url = format!("{}/mcp", gateway.mcp);
    // A Streamable HTTP client, and a client of the legacy HTTP+SSE transport, each using the
    // tools of the upstream of the other transport too.
    for (transport, target) in
        [(None, "everything"), (None, "legacy"), (Some("--sse"), "legacy"), (Some("--sse"), "everything")]
    {
        let (prefix, uri_prefix) = (format!("{target}_"), format!("reflow+{target}+"));
        let mut args = vec![url.as_str(), &gateway.admin_token, "--prefix", &prefix, "--uri-prefix", &uri_prefix];
        args.extend(transport);
        let report = python_client(&args).await.unwrap();
        assert_eq!(report["server"], "reflow-gateway");
        assert_eq!(report["protocol_version"], "2025-11-25");
        check_everything_report(&report, &prefix, &uri_prefix);
        let tools = strings(&report["tools"]);
        assert!(tools.iter().any(|t| t.starts_with("everything_")) && tools.iter().any(|t| t.starts_with("legacy_")));
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_client_through_the_single_target_endpoint() {
    let gateway = Gateway::start().await.unwrap();
    let streamable = everything(Mode::StreamableHttp, None).await.unwrap();
    gateway.target("everything", "streamable-http", &streamable.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let url = format!("{}/mcp/everything", gateway.mcp);
    let report = python_client(&[&url, &gateway.admin_token]).await.unwrap();
    assert_eq!(report["server"], "mcp-servers/everything", "the upstream's own identity passes through");
    check_everything_report(&report, "", "");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_of_every_upstream_is_merged_and_paged_again() {
    // Upstream pages of 10, gateway pages of 7: the client must see all 25 tools of the paged
    // server plus server-everything's, in pages the gateway makes.
    let gateway = Gateway::start_with(McpSettings { page_size: 7, ..McpSettings::default() }).await.unwrap();
    let paged = python_server("paged_server.py", &["25", "10"]).await.unwrap();
    let streamable = everything(Mode::StreamableHttp, None).await.unwrap();
    gateway.target("paged", "streamable-http", &paged.url).await.unwrap();
    gateway.target("everything", "streamable-http", &streamable.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let mut client = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    client.initialize().await.unwrap();
    let first = client.request("tools/list", json!({})).await.unwrap();
    assert_eq!(first.message()["result"]["tools"].as_array().unwrap().len(), 7);
    let names = client.tool_names().await.unwrap();
    let paged_tools: BTreeSet<&String> = names.iter().filter(|n| n.starts_with("paged_tool-")).collect();
    assert_eq!(paged_tools.len(), 25, "{names:?}");
    assert!(names.contains(&"everything_echo".to_string()));
    assert_eq!(names.len(), names.iter().collect::<BTreeSet<_>>().len(), "no duplicates across pages");
    let bad = client.request("tools/list", json!({"cursor": "not-a-cursor"})).await.unwrap();
    assert_eq!(bad.error_code(), Some(-32602));
    let call = client.call("paged_tool-024", json!({"x": "y"})).await.unwrap();
    assert_eq!(call["result"]["content"][0]["text"], "tool-024: {\"x\": \"y\"}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspector_cli_lists_and_calls() {
    let gateway = Gateway::start().await.unwrap();
    let streamable = everything(Mode::StreamableHttp, None).await.unwrap();
    gateway.target("everything", "streamable-http", &streamable.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let inspector = node_package("@modelcontextprotocol/inspector/cli/build/index.js");
    let url = format!("{}/mcp", gateway.mcp);
    let header = format!("Authorization: Bearer {}", gateway.admin_token);
    let (code, stdout, stderr) = run(
        Command::new(node()).arg(&inspector).arg(&url).args(["--method", "tools/list", "--header", &header]),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    let names: Vec<&str> = listed["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"everything_echo"), "{names:?}");
    let (code, stdout, stderr) = run(
        Command::new(node()).arg(&inspector).arg(&url).args([
            "--method",
            "tools/call",
            "--tool-name",
            "everything_get-sum",
            "--tool-arg",
            "a=2",
            "b=3",
            "--header",
            &header,
        ]),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{stderr}");
    let called: Value = serde_json::from_str(&stdout).unwrap();
    assert!(called["content"][0]["text"].as_str().unwrap().contains('5'), "{called}");
    // Without a token the Inspector is refused.
    let (code, _, _) =
        run(Command::new(node()).arg(&inspector).arg(&url).args(["--method", "tools/list"]), Duration::from_secs(60))
            .await
            .unwrap();
    assert_ne!(code, 0);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_through_the_gateway_what_it_passes_alone() {
    ensure_peers();
    let alone = everything(Mode::StreamableHttp, None).await.unwrap();
    let direct = run_conformance(&alone.url).await;
    drop(alone);

    // The suite sends no Authorization header: a forwarder adds the user's token, as a
    // configured client would. Host and Origin pass through, so the DNS-rebinding scenario
    // meets the gateway's own checks, at their defaults (no mcp.allowed_hosts).
    let gateway = Gateway::start().await.unwrap();
    let upstream = everything(Mode::StreamableHttp, None).await.unwrap();
    gateway.target("everything", "streamable-http", &upstream.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let forwarder = authorizing_forwarder(&gateway.mcp, &gateway.admin_token, &shutdown).await.unwrap();
    let through = run_conformance(&format!("{forwarder}/mcp/everything")).await;
    shutdown.cancel();

    eprintln!("conformance, server-everything alone: {direct:?}\nthrough the gateway: {through:?}");
    let passed_alone: Vec<&String> = direct.iter().filter(|(_, ok)| **ok).map(|(name, _)| name).collect();
    assert!(passed_alone.len() >= 8, "server-everything alone passes too little to compare: {direct:?}");
    let lost: Vec<&&String> = passed_alone.iter().filter(|name| through.get(**name) != Some(&true)).collect();
    assert!(
        lost.is_empty(),
        "scenarios that pass alone but fail through the gateway: {lost:?}\nalone: {direct:?}\nthrough: {through:?}"
    );
    assert_eq!(through.get("dns-rebinding-protection"), Some(&true), "{through:?}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_client_and_server_through_the_gateway() {
    let gateway = Gateway::start().await.unwrap();
    let server = python_server("example_server.py", &[]).await.unwrap();
    gateway.target("py", "streamable-http", &server.url).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let url = format!("{}/mcp", gateway.mcp);
    let report = python_client(&[
        &url,
        &gateway.admin_token,
        "--python-server",
        "--prefix",
        "py_",
        "--uri-prefix",
        "reflow+py+",
    ])
    .await
    .unwrap();
    assert_eq!(report["tools"], json!(["py_add", "py_ask", "py_echo", "py_grow", "py_sample", "py_slow"]));
    assert_eq!(report["add"], "5");
    assert_eq!(report["slow"], "done 3 steps");
    assert_eq!(report["progress"], json!([[1.0, 3.0], [2.0, 3.0], [3.0, 3.0]]));
    assert_eq!(report["elicitations"], json!(["What is your name?"]));
    assert_eq!(report["ask"], "accept: Ada Lovelace");
    assert_eq!(report["sample"], "sampled: sampled reply");
    assert_eq!(report["greeting"], "Hello from the example server");
    assert_eq!(report["item"], "item 42");
    assert!(report["prompt"].as_str().unwrap().contains("x = 1"));
    gateway.stop().await;
}
