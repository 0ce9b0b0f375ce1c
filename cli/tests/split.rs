//! Static stability with real processes: a control plane on PostgreSQL and data planes as
//! separate `reflow` processes. Killing the control plane leaves the data planes serving;
//! a data plane restarted while it is down serves from its encrypted cache; when it returns
//! they reconnect and converge. Bad tokens and tampered caches fail closed.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

#[test]
fn data_planes_outlive_the_control_plane_and_converge_when_it_returns() {
    let db = TestDatabase::create("reflow_split");
    let work = tempfile::tempdir().unwrap();
    let logs = work.path();
    let (cp_port, grpc_port, dp1_port, dp2_port) = (free_port(), free_port(), free_port(), free_port());
    let (cache1, cache2) = (work.path().join("cache-1"), work.path().join("cache-2"));

    let cp = start_control_plane(&db, cp_port, grpc_port, logs, &[]);
    let dp1 = start_data_plane(grpc_port, DATA_PLANE_TOKEN, "dp-1", dp1_port, &cache1, logs);
    let dp2 = start_data_plane(grpc_port, DATA_PLANE_TOKEN, "dp-2", dp2_port, &cache2, logs);
    let register = reqwest::blocking::Client::new()
        .post(format!("{}/api/auth/register", cp.base))
        .json(&json!({"email": "admin@example.com", "password": "secure123"}))
        .send()
        .unwrap();
    assert_eq!(register.status().as_u16(), 201);
    let jwt = login(&cp.base, "admin@example.com", "secure123");
    let api_token = create_api_token(&cp.base, &jwt, "client");
    for dp in [&dp1, &dp2] {
        eventually(Duration::from_secs(10), "the API token reaches the data plane", || {
            mcp_status(&dp.base, &api_token) == 200
        });
        assert_eq!(mcp_status(&dp.base, "rfl_wrong"), 401);
    }
    let status = get(&cp.base, "/api/data-planes", &jwt);
    let version = status["current_version"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "both acknowledgements recorded", || {
        let status = get(&cp.base, "/api/data-planes", &jwt);
        status["data_planes"]
            .as_array()
            .is_some_and(|planes| planes.len() == 2 && planes.iter().all(|p| p["acked_version"] == version.as_str()))
    });

    // The control plane dies: data planes keep serving from memory.
    cp.kill_hard();
    let mut failures = 0;
    for _ in 0..50 {
        for dp in [&dp1, &dp2] {
            if mcp_status(&dp.base, &api_token) != 200 || ready_status(&dp.base) != 200 {
                failures += 1;
            }
        }
    }
    assert_eq!(failures, 0, "requests failed while the control plane was down");

    // A data plane restarted while the control plane is down serves from its cache.
    assert!(dp1.stop().success());
    let restarted = Instant::now();
    let dp1 = start_data_plane(grpc_port, DATA_PLANE_TOKEN, "dp-1", dp1_port, &cache1, logs);
    eventually(Duration::from_secs(2), "serving from the cache", || ready_status(&dp1.base) == 200);
    let from_cache = restarted.elapsed();
    assert_eq!(mcp_status(&dp1.base, &api_token), 200);
    let ready: Value = reqwest::blocking::get(format!("{}/ready", dp1.base)).unwrap().json().unwrap();
    assert_eq!(ready["version"], version.as_str());
    eprintln!("data plane restart to serving from cache: {from_cache:?}");

    // The control plane returns: both reconnect, and a new change reaches both.
    let cp = start_control_plane(&db, cp_port, grpc_port, logs, &[]);
    let jwt = login(&cp.base, "admin@example.com", "secure123");
    let second_token = create_api_token(&cp.base, &jwt, "second");
    let returned = Instant::now();
    for dp in [&dp1, &dp2] {
        eventually(Duration::from_secs(10), "convergence after the control plane returns", || {
            mcp_status(&dp.base, &second_token) == 200
        });
    }
    eprintln!("control plane back to both data planes converged: {:?}", returned.elapsed());

    // A data plane with the wrong token is refused and says so; it serves nothing.
    let intruder_cache = work.path().join("cache-intruder");
    let intruder =
        start_data_plane(grpc_port, "a-wrong-data-plane-token-000", "intruder", free_port(), &intruder_cache, logs);
    eventually(Duration::from_secs(10), "the refusal is logged", || {
        intruder.stderr().contains("refused this data plane's token")
    });
    assert_eq!(ready_status(&intruder.base), 503);
    assert_eq!(mcp_status(&intruder.base, &api_token), 503);
    drop(intruder);

    // A tampered cache is refused: with the control plane down, the data plane fails closed.
    assert!(dp2.stop().success());
    cp.kill_hard();
    let cache_file = cache2.join("snapshot.bin");
    let mut bytes = std::fs::read(&cache_file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&cache_file, &bytes).unwrap();
    let dp2 = start_data_plane(grpc_port, DATA_PLANE_TOKEN, "dp-2", dp2_port, &cache2, logs);
    assert_eq!(ready_status(&dp2.base), 503);
    assert_eq!(mcp_status(&dp2.base, &api_token), 503);
    eventually(Duration::from_secs(5), "the refused cache is logged", || {
        dp2.stderr().contains("refusing the snapshot cache")
    });
    assert_eq!(mcp_status(&dp1.base, &api_token), 200, "the other data plane is unaffected");
}

/// `tools/list` on `/mcp` in `session`, straight to one data plane: the HTTP status.
fn list_status(base: &str, token: &str, session: &str) -> u16 {
    reqwest::blocking::Client::new()
        .post(format!("{base}/mcp"))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", session)
        .json(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Two control-plane replicas on one PostgreSQL, each with its own data plane, and a session on
/// `/mcp` with no upstream that could tell it ended: deleted through one replica's data plane,
/// it is refused by the other replica's, and by a data plane of a replica started afterwards.
#[test]
fn a_session_deleted_behind_one_control_plane_replica_is_refused_behind_every_other() {
    let db = TestDatabase::create("reflow_ended");
    let work = tempfile::tempdir().unwrap();
    let logs = work.path();
    let grpc_a = free_port();
    let cp_a = start_control_plane(&db, free_port(), grpc_a, logs, &[]);
    let register = reqwest::blocking::Client::new()
        .post(format!("{}/api/auth/register", cp_a.base))
        .json(&json!({"email": "admin@example.com", "password": "secure123"}))
        .send()
        .unwrap();
    assert_eq!(register.status().as_u16(), 201);
    let jwt = login(&cp_a.base, "admin@example.com", "secure123");
    let token = create_api_token(&cp_a.base, &jwt, "client");
    let grpc_b = free_port();
    let _cp_b = start_control_plane(&db, free_port(), grpc_b, logs, &[]);
    let dp_a = start_data_plane(grpc_a, DATA_PLANE_TOKEN, "dp-a", free_port(), &work.path().join("a"), logs);
    let dp_b = start_data_plane(grpc_b, DATA_PLANE_TOKEN, "dp-b", free_port(), &work.path().join("b"), logs);
    for dp in [&dp_a, &dp_b] {
        eventually(Duration::from_secs(10), "the API token reaches the data plane", || {
            mcp_status(&dp.base, &token) == 200
        });
    }
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "split", "version": "1"}}});
    let (session, answer) = mcp_request(&dp_a.base, "/mcp", &token, None, initialize);
    assert!(answer.get("result").is_some(), "{answer}");
    let session = session.expect("a session id");
    assert_eq!(list_status(&dp_b.base, &token, &session), 200, "the other replica's data plane resumes the session");

    let deleted = reqwest::blocking::Client::new()
        .delete(format!("{}/mcp", dp_a.base))
        .bearer_auth(&token)
        .header("mcp-session-id", &session)
        .send()
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    eventually(Duration::from_secs(10), "the other replica's data plane refuses the deleted session", || {
        list_status(&dp_b.base, &token, &session) == 404
    });
    let grpc_c = free_port();
    let _cp_c = start_control_plane(&db, free_port(), grpc_c, logs, &[]);
    let dp_c = start_data_plane(grpc_c, DATA_PLANE_TOKEN, "dp-c", free_port(), &work.path().join("c"), logs);
    eventually(Duration::from_secs(10), "the late data plane has its snapshot", || {
        mcp_status(&dp_c.base, &token) == 200
    });
    assert_eq!(list_status(&dp_c.base, &token, &session), 404, "a data plane of a replica started after the DELETE");
}
