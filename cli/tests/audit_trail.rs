//! The audit trail end to end, with real processes on PostgreSQL: two data planes record every
//! MCP request, spool what the control plane has not taken, and ship it; the control plane
//! dies and returns, a data plane restarts, and still every call is stored exactly once, with
//! every field, chained so `reflow audit verify` passes; secrets appear nowhere; `GET /api/logs`
//! reads it (filters, cursor, users see their own) and `/api/logs/export` streams it. With
//! `audit.on_full: refuse`, a data plane whose spool fills fails closed and resumes when the
//! control plane drains it.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const CANARY_CREDENTIAL: &str = "CANARY-cred-9f3e21";
const CANARY_ARGUMENT: &str = "CANARY-arg-pw-71c4";
const TRACE: &str = "5bd66ef5095369c7b0d1f8f4bd33716a";

/// The benchmark's fast MCP server (echo tools), on a thread of its own: its URL.
fn upstream() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            reflow_e2e::fast_upstream::FastUpstream { tools: 3, ..Default::default() }.serve(listener).await
        })
    });
    format!("http://{address}/mcp")
}

fn send(client: &reqwest::blocking::Client, method: reqwest::Method, url: &str, token: &str, body: Value) -> Value {
    let response = client.request(method.clone(), url).bearer_auth(token).json(&body).send().unwrap();
    let status = response.status();
    let answer: Value = response.json().unwrap_or(Value::Null);
    assert!(status.is_success(), "{method} {url}: {status} {answer}");
    answer
}

/// `initialize` on `base` as client `name`: the session, when it was accepted.
fn initialize(base: &str, token: &str, (name, version): (&str, &str)) -> Option<String> {
    let (session, answer) = mcp_request(
        base,
        "/mcp",
        token,
        None,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25",
               "capabilities": {}, "clientInfo": {"name": name, "version": version}}}),
    );
    answer.get("result").and(session)
}

/// Whether `tools/list` in `session` lists something.
fn lists_tools(base: &str, token: &str, session: &str) -> bool {
    let (_, list) =
        mcp_request(base, "/mcp", token, Some(session), json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    list["result"]["tools"].as_array().is_some_and(|t| !t.is_empty())
}

/// An MCP session on `base`: initialize (as client `audit-test 1.2.3`), initialized, tools/list.
fn open_session(base: &str, token: &str) -> String {
    let session = initialize(base, token, ("audit-test", "1.2.3")).expect("initialize is accepted");
    let accepted = reqwest::blocking::Client::new()
        .post(format!("{base}/mcp"))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &session)
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .send()
        .unwrap();
    assert_eq!(accepted.status().as_u16(), 202);
    assert!(lists_tools(base, token, &session));
    session
}

/// One `tools/call` of `fast_echo` with a canary in its arguments: the JSON-RPC answer and the
/// HTTP status.
fn call(client: &reqwest::blocking::Client, base: &str, token: &str, session: &str, n: usize) -> (u16, Value) {
    let response = client
        .post(format!("{base}/mcp"))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", session)
        .header("traceparent", format!("00-{TRACE}-00f067aa0ba902b7-01"))
        .json(&json!({"jsonrpc": "2.0", "id": n + 10, "method": "tools/call", "params": {"name": "fast_echo",
               "arguments": {"message": format!("call {n} with {CANARY_CREDENTIAL} inside"), "password": CANARY_ARGUMENT}}}))
        .timeout(Duration::from_secs(30))
        .send()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

fn query<T>(db: &TestDatabase, sql: &str, read: impl Fn(&sqlx::postgres::PgRow) -> T) -> Vec<T> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query(sql).fetch_all(&mut conn).await.unwrap().iter().map(read).collect()
    })
}

fn stored_calls(db: &TestDatabase) -> i64 {
    query(db, "SELECT COUNT(*) AS n FROM audit_records WHERE method = 'tools/call'", |row| {
        sqlx::Row::get::<i64, _>(row, "n")
    })[0]
}

/// Every file under `dir`, read whole.
fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push((path.display().to_string(), std::fs::read(&path).unwrap_or_default()));
        }
    }
    found
}

fn verify(db: &TestDatabase) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_reflow"))
        .args(["audit", "verify", "--database-url", &db.url])
        .output()
        .unwrap();
    (
        output.status.success(),
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
    )
}

/// Every page of `GET /api/logs` with `filter`, following `X-Next-Cursor`.
fn all_logs(base: &str, token: &str, filter: &str) -> Vec<Value> {
    let client = reqwest::blocking::Client::new();
    let mut logs = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/api/logs?limit=1000{filter}");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let response = client.get(&url).bearer_auth(token).send().unwrap();
        assert_eq!(response.status().as_u16(), 200, "{url}");
        cursor = response.headers().get("x-next-cursor").map(|v| v.to_str().unwrap().to_string());
        logs.extend(response.json::<Vec<Value>>().unwrap());
        if cursor.is_none() {
            return logs;
        }
    }
}

#[test]
fn ten_thousand_calls_through_two_data_planes_are_each_recorded_once_across_crashes_and_restarts() {
    let db = TestDatabase::create("reflow_audit");
    let work = tempfile::tempdir().unwrap();
    let logs = work.path();
    let (cp_port, grpc_port, dp1_port, dp2_port) = (free_port(), free_port(), free_port(), free_port());
    let (cache1, cache2) = (work.path().join("cache-1"), work.path().join("cache-2"));
    let url = upstream();
    // The test's one client makes calls as fast as it can: above the per-user rate by default.
    let config = work.path().join("reflow.yaml");
    std::fs::write(&config, "mcp:\n  rate_limit:\n    requests_per_second: 100000\n    burst: 100000\n").unwrap();
    let config = ["--config", config.to_str().unwrap()];
    let data_plane = |node: &str, port: u16, cache: &Path| {
        start_data_plane_with(grpc_port, DATA_PLANE_TOKEN, node, port, cache, logs, &config)
    };

    let mut cp = start_control_plane(&db, cp_port, grpc_port, logs, &[]);
    let mut dp1 = data_plane("dp-1", dp1_port, &cache1);
    let dp2 = data_plane("dp-2", dp2_port, &cache2);
    let http = reqwest::blocking::Client::new();
    let registered = send(
        &http,
        reqwest::Method::POST,
        &format!("{}/api/auth/register", cp.base),
        "",
        json!({"email": "admin@example.com", "password": "secure123"}),
    );
    let admin_id = registered["user"]["id"].as_str().or(registered["id"].as_str()).unwrap().to_string();
    let jwt = login(&cp.base, "admin@example.com", "secure123");
    let token = create_api_token(&cp.base, &jwt, "client");
    let target = send(
        &http,
        reqwest::Method::POST,
        &format!("{}/api/targets", cp.base),
        &jwt,
        json!({"name": "fast", "transport_type": "streamable-http", "url": url, "audit_arguments": true}),
    );
    let target_id = target["id"].as_str().unwrap().to_string();
    send(
        &http,
        reqwest::Method::PUT,
        &format!("{}/api/targets/{target_id}/tokens/default", cp.base),
        &jwt,
        json!({"token": CANARY_CREDENTIAL}),
    );
    let policy = send(
        &http,
        reqwest::Method::POST,
        &format!("{}/api/policies", cp.base),
        &jwt,
        json!({"name": "admin uses fast", "target_id": target_id, "resource_type": "tool", "pattern": "*",
               "effect": "allow", "priority": 10, "subjects": [{"subject_type": "user", "subject_value": admin_id}]}),
    );
    let policy_id = policy["id"].as_str().unwrap().to_string();
    // A user with no grant, who tries anyway.
    let other = send(
        &http,
        reqwest::Method::POST,
        &format!("{}/api/auth/register", cp.base),
        "",
        json!({"email": "other@example.com", "password": "secure456"}),
    );
    let other_jwt = other["token"].as_str().unwrap().to_string();
    let other_token = create_api_token(&cp.base, &other_jwt, "other");
    let mut probes = 0;
    for dp in [&dp1, &dp2] {
        eventually(Duration::from_secs(20), "the policy reaches the data plane", || {
            let (granted, taken) = open_probe(&dp.base, &token);
            probes += usize::from(taken);
            granted.is_some() && mcp_status(&dp.base, &other_token) == 200
        });
    }
    let (mut initializes, mut lists) = (probes, probes);
    let mut s1 = open_session(&dp1.base, &token);
    let s2 = open_session(&dp2.base, &token);
    initializes += 2;
    lists += 2;

    let mut calls_per_plane = [0usize; 2];
    for n in 0..5000 {
        match n {
            1500 => cp.kill_hard_in_place(),
            2500 => {
                // A graceful restart while the control plane is away: what was not shipped
                // waits in the spool and goes out later.
                assert!(dp1.stop_in_place().success());
                dp1 = data_plane("dp-1", dp1_port, &cache1);
                eventually(Duration::from_secs(5), "serving from the cache", || ready_status(&dp1.base) == 200);
                s1 = open_session(&dp1.base, &token);
                initializes += 1;
                lists += 1;
            }
            3500 => {
                // What waits in the spools while the control plane is away is sealed.
                let spooled: Vec<_> = [&cache1, &cache2].iter().flat_map(|c| files_under(&c.join("audit"))).collect();
                assert!(!spooled.is_empty(), "records wait in the spools");
                for (path, bytes) in &spooled {
                    for secret in [CANARY_CREDENTIAL, CANARY_ARGUMENT, token.as_str(), "fast_echo", "audit-test"] {
                        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} in {path}");
                    }
                }
                cp = start_control_plane(&db, cp_port, grpc_port, logs, &[]);
            }
            _ => {}
        }
        for (i, (base, session)) in [(&dp1.base, &s1), (&dp2.base, &s2)].into_iter().enumerate() {
            let (status, answer) = call(&http, base, &token, session, n * 2 + i);
            assert_eq!(status, 200, "{answer}");
            assert!(
                answer["result"]["content"][0]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains(&format!("call {}", n * 2 + i))),
                "{answer}"
            );
            calls_per_plane[i] += 1;
        }
    }
    assert_eq!(calls_per_plane, [5000, 5000]);
    // The other user: one session, one call to a target it has no grant on.
    let other_session = initialize(&dp2.base, &other_token, ("other", "9")).expect("initialize is accepted");
    let (status, refused) = call(&http, &dp2.base, &other_token, &other_session, 99_999);
    assert_eq!(status, 200);
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("unknown tool")), "{refused}");

    eventually(Duration::from_secs(60), "every call stored", || stored_calls(&db) >= 10_001);
    // Nothing more arrives: a duplicate would show up as a count above.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(stored_calls(&db), 10_001, "10,000 calls and one refused call, each once");

    let records: Vec<Value> = query(&db, "SELECT body FROM audit_records", |row| {
        serde_json::from_str(&sqlx::Row::get::<String, _>(row, "body")).unwrap()
    });
    let ids: HashSet<&str> = records.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), records.len(), "no id twice");
    let mine: Vec<&Value> = records.iter().filter(|r| r["user_id"] == admin_id.as_str()).collect();
    let count = |method: &str| mine.iter().filter(|r| r["method"] == method).count();
    assert_eq!(count("tools/call"), 10_000);
    assert_eq!((count("initialize"), count("tools/list")), (initializes, lists), "one per initialize and list");
    let calls: Vec<&&Value> = mine.iter().filter(|r| r["method"] == "tools/call").collect();
    let mut per_plane = BTreeMap::new();
    for record in &calls {
        *per_plane.entry(record["data_plane"].as_str().unwrap().to_string()).or_insert(0) += 1;
        for (field, expected) in [
            ("client_name", json!("audit-test")),
            ("client_version", json!("1.2.3")),
            ("endpoint", json!("/mcp")),
            ("protocol_version", json!("2025-11-25")),
            ("target", json!("fast")),
            ("name", json!("echo")),
            ("decision", json!("allowed")),
            ("policy_id", json!(policy_id)),
            ("policy_name", json!("admin uses fast")),
            ("credential_source", json!("default")),
            ("transport", json!("streamable-http")),
            ("status", json!(200)),
            ("outcome", json!("answered")),
            ("error_code", Value::Null),
            ("trace_id", json!(TRACE)),
        ] {
            assert_eq!(record[field], expected, "{field} of {record}");
        }
        for field in ["session_id", "snapshot_version", "at"] {
            assert!(record[field].is_string(), "{field} of {record}");
        }
        assert!(record["duration_ms"].is_u64());
        assert_eq!(record["arguments"]["password"], "[masked]", "{record}");
        assert!(record["arguments"]["message"].as_str().unwrap().contains("[masked]"), "{record}");
    }
    assert_eq!(per_plane, BTreeMap::from([("dp-1".to_string(), 5000), ("dp-2".to_string(), 5000)]));
    let denied: Vec<&Value> = records.iter().filter(|r| r["decision"] == "denied").collect();
    assert_eq!(denied.len(), 1, "the other user's call");
    assert_eq!((denied[0]["target"].as_str(), denied[0]["policy_id"].as_str()), (Some("fast"), None), "default deny");

    let (verified, said) = verify(&db);
    assert!(verified, "{said}");
    assert!(said.contains("over 2 data planes"), "{said}");

    // Reading it back: the original's paging and shape, filters, the cursor, own records only.
    let page: Vec<Value> = get_list(&cp.base, "/api/logs?limit=50&offset=0", &jwt);
    assert_eq!(page.len(), 50);
    for field in REQUEST_LOG.iter().copied().chain(["decision", "policy_id", "credential_source", "outcome"]) {
        assert!(page[0].get(field).is_some(), "{field} missing from {}", page[0]);
    }
    let everything = all_logs(&cp.base, &jwt, "");
    assert_eq!(everything.len(), records.len(), "the cursor walks every record once");
    let walked: HashSet<&str> = everything.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(walked, ids);
    assert_eq!(all_logs(&cp.base, &jwt, "&decision=denied").len(), 1);
    assert_eq!(all_logs(&cp.base, &jwt, "&method=tools/call&target=fast&name=echo").len(), 10_001);
    assert_eq!(all_logs(&cp.base, &jwt, &format!("&user_id={admin_id}&method=tools/call")).len(), 10_000);
    assert!(all_logs(&cp.base, &jwt, "&since=2999-01-01T00:00:00Z").is_empty());
    let own = all_logs(&cp.base, &other_jwt, "");
    assert!(own.iter().all(|l| l["user_id"] != admin_id.as_str()) && own.iter().any(|l| l["method"] == "tools/call"));
    let forbidden =
        http.get(format!("{}/api/logs?user_id={admin_id}", cp.base)).bearer_auth(&other_jwt).send().unwrap();
    assert_eq!(forbidden.status().as_u16(), 403);
    let bad = http.get(format!("{}/api/logs?limit=0", cp.base)).bearer_auth(&jwt).send().unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    assert!(bad.text().unwrap().contains("limit"));
    let long = http.get(format!("{}/api/logs?name={}", cp.base, "n".repeat(5000))).bearer_auth(&jwt).send().unwrap();
    assert_eq!(long.status().as_u16(), 400);
    assert!(long.text().unwrap().contains("name: at most 4096 bytes"));
    let export = http.get(format!("{}/api/logs/export?method=tools/call", cp.base)).bearer_auth(&jwt).send().unwrap();
    assert_eq!(export.headers()["content-type"], "application/x-ndjson");
    let exported = export.text().unwrap();
    assert_eq!(exported.lines().count(), 10_001);
    assert!(exported
        .lines()
        .all(|line| serde_json::from_str::<Value>(line).is_ok_and(|l| l["method"] == "tools/call")));

    // Canaries: the stored credential, the secret argument and the client's tokens appear in
    // no record, no spool file, no log and no API answer.
    let rows: Vec<String> =
        query(&db, "SELECT row_to_json(a)::text AS row FROM audit_records a", |row| sqlx::Row::get(row, "row"));
    let table = rows.join("\n");
    let api = format!("{}{exported}", serde_json::to_string(&everything).unwrap());
    drop(dp1);
    drop(dp2);
    cp.kill_hard_in_place();
    let mut places =
        vec![("the audit table".to_string(), table.into_bytes()), ("GET /api/logs".to_string(), api.into_bytes())];
    places.extend(
        files_under(work.path()).into_iter().filter(|(path, _)| path.ends_with(".log") || path.contains("/audit/")),
    );
    assert!(places.iter().filter(|(path, _)| path.ends_with(".log")).count() >= 6, "every process's log is looked at");
    for secret in [CANARY_CREDENTIAL, CANARY_ARGUMENT, token.as_str(), jwt.as_str(), other_token.as_str()] {
        for (place, bytes) in &places {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} appears in {place}");
        }
    }
}

/// A session whose tool list is not empty (the snapshot grants something), or `None`; and
/// whether the data plane took the probe (an `initialize` and a `tools/list` recorded).
fn open_probe(base: &str, token: &str) -> (Option<String>, bool) {
    match initialize(base, token, ("probe", "0")) {
        Some(session) => (lists_tools(base, token, &session).then_some(session), true),
        None => (None, false),
    }
}

fn get_list(base: &str, path: &str, token: &str) -> Vec<Value> {
    serde_json::from_value(get(base, path, token)).unwrap()
}

#[test]
fn a_full_spool_under_refuse_fails_closed_and_resumes_when_the_control_plane_drains_it() {
    let db = TestDatabase::create("reflow_refuse");
    let work = tempfile::tempdir().unwrap();
    let logs = work.path();
    let (cp_port, grpc_port, dp_port) = (free_port(), free_port(), free_port());
    let cache = work.path().join("cache");
    let config = work.path().join("reflow.yaml");
    std::fs::write(&config, "audit:\n  on_full: refuse\n  spool_bytes: 16384\n  flush_interval: 50ms\n").unwrap();
    let url = upstream();

    let mut cp = start_control_plane(&db, cp_port, grpc_port, logs, &[]);
    let config_arg = config.to_str().unwrap();
    let dp =
        start_data_plane_with(grpc_port, DATA_PLANE_TOKEN, "dp-r", dp_port, &cache, logs, &["--config", config_arg]);
    let http = reqwest::blocking::Client::new();
    send(
        &http,
        reqwest::Method::POST,
        &format!("{}/api/auth/register", cp.base),
        "",
        json!({"email": "admin@example.com", "password": "secure123"}),
    );
    let jwt = login(&cp.base, "admin@example.com", "secure123");
    let token = create_api_token(&cp.base, &jwt, "client");
    send(&http, reqwest::Method::POST, &format!("{}/api/targets", cp.base), &jwt, json!({"name": "fast", "url": url}));
    send(
        &http,
        reqwest::Method::POST,
        &format!("{}/api/policies", cp.base),
        &jwt,
        json!({"name": "everyone", "effect": "allow", "priority": 10, "subjects": [{"subject_type": "everyone"}]}),
    );
    let mut session = None;
    eventually(Duration::from_secs(20), "the policy reaches the data plane", || {
        session = open_probe(&dp.base, &token).0;
        session.is_some()
    });
    let session = session.unwrap();

    cp.kill_hard_in_place();
    let mut answered = 0;
    let mut refusal = None;
    for n in 0..5000 {
        let (status, answer) = call(&http, &dp.base, &token, &session, n);
        if status == 200 {
            answered += 1;
        } else {
            refusal = Some((status, answer));
            break;
        }
    }
    let (status, answer) = refusal.expect("a 16 KiB spool fills within 5000 calls");
    assert_eq!(status, 503, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("audit spool is full") && message.contains("refuse"), "{message}");
    let ready: Value = reqwest::blocking::get(format!("{}/ready", dp.base)).unwrap().json().unwrap();
    assert_eq!(ready["audit"]["refusing"], true, "{ready}");
    assert_eq!(ready["audit"]["dropped"], 0, "{ready}");
    // Still refused while the control plane is away.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(call(&http, &dp.base, &token, &session, 90_000).0, 503);

    let cp = start_control_plane(&db, cp_port, grpc_port, logs, &[]);
    let mut resumed = false;
    eventually(Duration::from_secs(30), "requests resume once the spool drains", || {
        resumed = call(&http, &dp.base, &token, &session, 90_001).0 == 200;
        resumed
    });
    answered += 1;
    eventually(Duration::from_secs(30), "every answered call stored", || stored_calls(&db) >= answered);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(stored_calls(&db), answered, "every answered call once, no refused one");
    let (verified, said) = verify(&db);
    assert!(verified, "{said}");
    drop(dp);
    drop(cp);
}
