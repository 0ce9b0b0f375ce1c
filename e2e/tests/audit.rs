//! Every ending of a request through the gateway leaves one audit record saying how it ended,
//! against server-everything: answered, an error the gateway answered, denied by a policy (with
//! that policy), a client that went away mid-call (recorded when the call ends), a cancelled
//! call, an upstream that did not answer in time, one that cannot be reached, and a request
//! refused at the HTTP level.

use std::time::Duration;

use reflow_data_plane::mcp::McpSettings;
use reflow_e2e::client::McpClient;
use reflow_e2e::harness::{everything, free_port, Gateway, Mode};
use reflow_proto::audit::AuditRecord;
use serde_json::{json, Value};

fn long_call(id: &str, seconds: u64) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": "everything_trigger-long-running-operation",
                      "arguments": {"duration": seconds, "steps": seconds}, "_meta": {"progressToken": id}}})
    .to_string()
}

fn find<'r>(records: &'r [AuditRecord], what: &str, matches: impl Fn(&AuditRecord) -> bool) -> &'r AuditRecord {
    let found: Vec<&AuditRecord> = records.iter().filter(|r| matches(r)).collect();
    assert_eq!(found.len(), 1, "{what}: {found:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ending_of_a_request_is_recorded_once_with_how_it_ended() {
    let settings = McpSettings { request_timeout: Duration::from_secs(4), ..McpSettings::default() };
    let gateway = Gateway::start_audited(settings).await.unwrap();
    let upstream = everything(Mode::StreamableHttp, None).await.unwrap();
    let target = gateway.target("everything", "streamable-http", &upstream.url).await.unwrap();
    gateway.target("dead", "streamable-http", &format!("http://127.0.0.1:{}/mcp", free_port())).await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let deny = gateway.deny_tools(&target, "get-sum").await.unwrap();
    let url = format!("{}/mcp", gateway.mcp);
    let mut client = McpClient::new(&url, &gateway.admin_token);
    client.initialize().await.unwrap();
    let session = client.session.clone().unwrap();

    // Answered, and answered with the gateway's own errors.
    let echo = client.call("everything_echo", json!({"message": "hi"})).await.unwrap();
    assert!(echo.get("result").is_some(), "{echo}");
    let denied = client.call("everything_get-sum", json!({"a": 1, "b": 2})).await.unwrap();
    assert_eq!(denied["error"]["code"], -32003, "{denied}");
    let unknown = client.request("no/such-method", json!({})).await.unwrap();
    assert_eq!(unknown.error_code(), Some(-32601));
    // An upstream that is not there.
    let dead = client.call("dead_anything", json!({})).await.unwrap();
    assert_eq!(dead["error"]["code"], -32000, "{dead}");

    // A client that goes away after the first progress notification: the call goes on upstream.
    let mut response =
        client.post().header("content-type", "application/json").body(long_call("gone-1", 2)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().expect("the first event");
    assert!(String::from_utf8_lossy(&first).contains("notifications/progress"));
    drop(response);

    // A cancelled call.
    let pending = tokio::spawn(McpClient::read(
        client.post().header("content-type", "application/json").body(long_call("cancel-1", 30)),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cancel = client.notify("notifications/cancelled", json!({"requestId": "cancel-1"})).await.unwrap();
    assert_eq!(cancel.status, 202);
    tokio::time::timeout(Duration::from_secs(5), pending).await.unwrap().unwrap().unwrap();

    // An upstream that does not answer within mcp.request_timeout.
    let slow = McpClient::read(client.post().header("content-type", "application/json").body(long_call("slow-1", 8)))
        .await
        .unwrap();
    assert_eq!(slow.error_code(), Some(-32000), "{:?}", slow.messages);

    // Refused at the HTTP level: a session that does not exist.
    let mut stranger = McpClient::new(&url, &gateway.admin_token);
    stranger.session = Some("no-such-session".into());
    let refused = stranger.request("tools/list", json!({})).await.unwrap();
    assert_eq!(refused.status, 404);

    // initialize, echo, get-sum, the unknown method, dead, gone, cancel, slow, the refusal;
    // the notifications (initialized, cancelled) have none.
    let records = gateway.audit_records(9).await;
    let calls = |name: &'static str| move |r: &AuditRecord| r.name.as_deref() == Some(name);
    let answered = find(&records, "echo", calls("echo"));
    assert_eq!((answered.outcome.as_str(), answered.decision.as_str(), answered.status), ("answered", "allowed", 200));
    // A travelling session id is recorded by its nonce: the same on every replica, and the
    // sealed rest of the id stays out of the trail.
    let nonce = reflow_data_plane::mcp::ticket::nonce_of(&session).expect("a travelling session id");
    assert_eq!(answered.session_id.as_deref(), Some(nonce));
    assert_eq!(answered.transport.as_deref(), Some("streamable-http"));
    let refused_by_policy = find(&records, "get-sum", calls("get-sum"));
    assert_eq!((refused_by_policy.outcome.as_str(), refused_by_policy.decision.as_str()), ("error", "denied"));
    assert_eq!(refused_by_policy.policy_id.as_deref(), deny["id"].as_str(), "the deciding policy");
    assert_eq!(refused_by_policy.error_code, Some(-32003));
    let method = find(&records, "unknown method", |r| r.method == "no/such-method");
    assert_eq!((method.outcome.as_str(), method.error_code), ("error", Some(-32601)));
    let unreachable = find(&records, "dead", |r| r.target.as_deref() == Some("dead"));
    assert_eq!(unreachable.outcome, "upstream_failed", "{unreachable:?}");
    let long = |r: &AuditRecord| r.name.as_deref() == Some("trigger-long-running-operation");
    let long: Vec<&AuditRecord> = records.iter().filter(|r| long(r)).collect();
    let mut endings: Vec<&str> = long.iter().map(|r| r.outcome.as_str()).collect();
    endings.sort();
    assert_eq!(endings, ["cancelled", "client_gone", "timeout"], "{long:#?}");
    let gone = long.iter().find(|r| r.outcome == "client_gone").unwrap();
    assert!(gone.duration_ms >= 1500, "recorded when the call ended upstream, not when the client left: {gone:?}");
    let timed_out = long.iter().find(|r| r.outcome == "timeout").unwrap();
    assert_eq!(timed_out.error_code, Some(-32000));
    let http = find(&records, "the refusal", |r| r.outcome == "refused");
    assert_eq!((http.status, http.method.as_str(), http.error_code), (404, "tools/list", Some(-32600)));
    assert_eq!(records.iter().filter(|r| r.method == "initialize").count(), 1);
    assert!(
        records.iter().all(|r| r.method != "notifications/initialized" && r.method != "notifications/cancelled"),
        "notifications are not requests"
    );
    let value: Value = serde_json::to_value(answered).unwrap();
    assert!(value["arguments"].is_null(), "arguments are kept only by a target's opt-in");

    // The same endings in the metrics, upstream exchanges included.
    let metrics = gateway.metrics().await.unwrap();
    for line in [
        r#"mcp_requests_total{target="everything",method="tools/call",decision="allowed",outcome="cancelled"} 1"#,
        r#"mcp_requests_total{target="everything",method="tools/call",decision="allowed",outcome="client_gone"} 1"#,
        r#"mcp_requests_total{target="everything",method="tools/call",decision="allowed",outcome="timeout"} 1"#,
        r#"mcp_requests_total{target="everything",method="tools/call",decision="denied",outcome="error"} 1"#,
        r#"mcp_upstream_requests_total{target="everything",method="tools/call",outcome="cancelled"} 1"#,
        r#"mcp_upstream_requests_total{target="everything",method="tools/call",outcome="timeout"} 1"#,
        r#"mcp_upstream_requests_total{target="dead",method="tools/call",outcome="failed"} 1"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    gateway.stop().await;
}
