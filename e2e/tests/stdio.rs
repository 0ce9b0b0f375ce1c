//! STDIO targets: server-everything run as a child of the data plane, shared or isolated per
//! user, with a cleared environment, multiplexing concurrent sessions on one process.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use reflow_data_plane::mcp::McpSettings;
use reflow_e2e::client::McpClient;
use reflow_e2e::harness::*;
use serde_json::{json, Value};

fn text(response: &Value) -> String {
    response.pointer("/result/content/0/text").and_then(Value::as_str).unwrap_or_default().to_string()
}

fn env_of(response: &Value) -> Value {
    serde_json::from_str(&text(response)).unwrap_or_else(|_| panic!("get-env answered {response}"))
}

async fn stdio_target(gateway: &Gateway, name: &str, isolation: &str) -> String {
    let script = node_package("@modelcontextprotocol/server-everything/dist/index.js");
    let target = gateway
        .post(
            "/api/targets",
            json!({"name": name, "transport_type": "stdio", "command": "node",
                   "args": [script.to_string_lossy(), "stdio"], "isolation_boundary": isolation}),
        )
        .await
        .unwrap();
    target["id"].as_str().unwrap().to_string()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| stat.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_processes_are_shared_or_isolated_with_their_own_env() {
    ensure_peers();
    // Something the data plane's own environment holds must never reach a child.
    std::env::set_var("REFLOW_PARENT_CANARY", "parent-secret-5e5e");
    let gateway = Gateway::start().await.unwrap();
    let shared = stdio_target(&gateway, "shared", "shared").await;
    let own = stdio_target(&gateway, "own", "per_user").await;
    gateway.allow_everyone().await.unwrap();
    let (bob, bob_token) = gateway.user("bob@example.com").await.unwrap();
    for target in [&shared, &own] {
        gateway
            .post(&format!("/api/targets/{target}/env/default"), json!({"key": "GREETING", "value": "default"}))
            .await
            .unwrap();
        gateway
            .post(&format!("/api/targets/{target}/env/user/{bob}"), json!({"key": "GREETING", "value": "bob's"}))
            .await
            .unwrap();
        gateway
            .post(&format!("/api/targets/{target}/env/default"), json!({"key": "LD_PRELOAD", "value": "/tmp/evil.so"}))
            .await
            .unwrap_or_default();
    }
    let url = format!("{}/mcp", gateway.mcp);
    let mut admin = McpClient::new(&url, &gateway.admin_token);
    admin.initialize().await.unwrap();
    let mut bobs = McpClient::new(&url, &bob_token);
    bobs.initialize().await.unwrap();

    let names = admin.tool_names().await.unwrap();
    assert!(names.contains(&"shared_echo".to_string()) && names.contains(&"own_get-env".to_string()), "{names:?}");
    let admin_shared = env_of(&admin.call("shared_get-env", json!({})).await.unwrap());
    let bob_shared = env_of(&bobs.call("shared_get-env", json!({})).await.unwrap());
    assert_eq!(admin_shared["GREETING"], "default");
    assert_eq!(bob_shared["GREETING"], "default", "a shared process gets default values only");
    let admin_own = env_of(&admin.call("own_get-env", json!({})).await.unwrap());
    let bob_own = env_of(&bobs.call("own_get-env", json!({})).await.unwrap());
    assert_eq!(admin_own["GREETING"], "default");
    assert_eq!(bob_own["GREETING"], "bob's", "per_user: bob's own value");
    for env in [&admin_shared, &bob_own] {
        let keys: BTreeSet<&str> = env.as_object().unwrap().keys().map(String::as_str).collect();
        assert!(
            env.get("REFLOW_PARENT_CANARY").is_none() && env.get("DATABASE_URL").is_none(),
            "the environment is cleared: {keys:?}"
        );
        assert!(env.get("LD_PRELOAD").is_none(), "LD_PRELOAD cannot be set through env config");
        assert!(env.get("PATH").is_some() && env.get("HOME").is_some());
    }

    let processes = gateway.data_plane().gateway().pool.processes();
    let by_target = |id: &str| processes.iter().filter(|p| p.key.target_id == id).count();
    assert_eq!(by_target(&shared), 1, "one shared process for both users");
    assert_eq!(by_target(&own), 2, "one process per user");
    // The control plane lists them, as the data plane reports them over its sync stream.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = gateway.get(&format!("/api/targets/{own}/instances")).await.unwrap();
        let listed = listed.as_array().unwrap().clone();
        let pids: BTreeSet<u64> = listed.iter().filter_map(|i| i["pid"].as_u64()).collect();
        let expected: BTreeSet<u64> =
            processes.iter().filter(|p| p.key.target_id == own).map(|p| u64::from(p.pid)).collect();
        if pids == expected {
            assert!(listed
                .iter()
                .all(|i| i["data_plane"] == "e2e" && i["connected"] == true && i["started_at"].is_string()));
            assert!(listed.iter().any(|i| i["scope"] == format!("user:{bob}")), "{listed:?}");
            break;
        }
        assert!(Instant::now() < deadline, "instances listed {listed:?}, running {expected:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Concurrent calls from two sessions on the shared process come back to their callers.
    let calls = (0..20).map(|i| {
        let (mut a, mut b) = (admin.clone(), bobs.clone());
        async move {
            let (x, y) = tokio::join!(
                a.call("shared_echo", json!({"message": format!("admin-{i}")})),
                b.call("shared_echo", json!({"message": format!("bob-{i}")}))
            );
            (i, text(&x.unwrap()), text(&y.unwrap()))
        }
    });
    for (i, from_admin, from_bob) in futures::future::join_all(calls).await {
        assert_eq!(from_admin, format!("Echo: admin-{i}"));
        assert_eq!(from_bob, format!("Echo: bob-{i}"));
    }
    assert_eq!(gateway.data_plane().gateway().pool.processes().iter().filter(|p| p.key.target_id == shared).count(), 1);

    // An env change for bob's key recycles bob's process only.
    let pid_of = |user: &str| {
        gateway
            .data_plane()
            .gateway()
            .pool
            .processes()
            .iter()
            .find(|p| p.key.target_id == own && p.key.scope == format!("user:{user}") && !p.closed.is_cancelled())
            .map(|p| p.pid)
    };
    let admin_id = gateway.user_id(&gateway.admin_token).await.unwrap();
    let (bob_before, admin_before) = (pid_of(&bob).unwrap(), pid_of(&admin_id).unwrap());
    gateway
        .post(&format!("/api/targets/{own}/env/user/{bob}"), json!({"key": "GREETING", "value": "bob's new"}))
        .await
        .unwrap();
    assert_eq!(env_of(&bobs.call("own_get-env", json!({})).await.unwrap())["GREETING"], "bob's new");
    assert_eq!(env_of(&admin.call("own_get-env", json!({})).await.unwrap())["GREETING"], "default");
    assert_ne!(pid_of(&bob).unwrap(), bob_before, "bob's process was recycled");
    assert_eq!(pid_of(&admin_id).unwrap(), admin_before, "the admin's process was not");

    // restart-instances reaches the running processes through the snapshot.
    let before: Vec<u32> = gateway
        .data_plane()
        .gateway()
        .pool
        .processes()
        .iter()
        .filter(|p| p.key.target_id == shared)
        .map(|p| p.pid)
        .collect();
    let restarted = gateway.post(&format!("/api/targets/{shared}/restart-instances"), json!({})).await.unwrap();
    assert_eq!(restarted["restart_generation"], 1);
    // The answer waited for the data plane and counts what it stopped (the original's shape).
    assert_eq!(restarted["restarted"], before.len(), "{restarted}");
    assert_eq!((restarted["data_planes"].as_u64(), restarted["pending"].clone()), (Some(1), json!([])));
    assert_eq!(restarted["target"]["id"], shared);
    let deadline = Instant::now() + Duration::from_secs(10);
    while before.iter().any(|pid| alive(*pid)) {
        assert!(Instant::now() < deadline, "restarted processes still run: {before:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(text(&admin.call("shared_echo", json!({"message": "fresh"})).await.unwrap()), "Echo: fresh");
    let after = gateway.data_plane().gateway().pool.processes();
    assert!(after.iter().any(|p| p.key.target_id == shared && !before.contains(&p.pid)), "a new process serves");

    // On shutdown every child (and its group) is stopped.
    let pids: Vec<u32> = gateway.data_plane().gateway().pool.processes().iter().map(|p| p.pid).collect();
    assert!(pids.len() >= 3);
    gateway.stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|pid| alive(*pid)) {
        assert!(Instant::now() < deadline, "STDIO servers outlived the gateway: {pids:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_stdio_server_fails_its_call_and_restarts_on_next_use() {
    ensure_peers();
    let gateway = Gateway::start().await.unwrap();
    stdio_target(&gateway, "ev", "shared").await;
    gateway.allow_everyone().await.unwrap();
    let mut client = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    client.initialize().await.unwrap();
    assert_eq!(text(&client.call("ev_echo", json!({"message": "one"})).await.unwrap()), "Echo: one");
    let first = gateway.data_plane().gateway().pool.processes()[0].pid;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(first) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The next call finds the process gone and starts a new one.
    let started = Instant::now();
    let mut answer = client.call("ev_echo", json!({"message": "two"})).await.unwrap();
    if answer.get("error").is_some() {
        answer = client.call("ev_echo", json!({"message": "two"})).await.unwrap();
    }
    assert_eq!(text(&answer), "Echo: two", "{answer}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let second = gateway.data_plane().gateway().pool.processes()[0].pid;
    assert_ne!(first, second);
    gateway.stop().await;
}

async fn python_target(gateway: &Gateway, name: &str, isolation: &str) {
    let script = workspace().join("e2e/peers/stdio_server.py");
    gateway
        .post(
            "/api/targets",
            json!({"name": name, "transport_type": "stdio", "command": "python3", "args": [script.to_string_lossy()],
                   "isolation_boundary": isolation}),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_stdio_server_gets_clear_errors_and_spares_the_others() {
    let mut settings = reflow_data_plane::mcp::McpSettings {
        request_timeout: Duration::from_secs(3),
        ..reflow_data_plane::mcp::McpSettings::default()
    };
    // bad and good, and one more: carol's per-user process is one too many.
    settings.stdio.max_processes = 2;
    let gateway = Gateway::start_with(settings).await.unwrap();
    python_target(&gateway, "bad", "shared").await;
    python_target(&gateway, "good", "shared").await;
    python_target(&gateway, "solo", "per_user").await;
    gateway.allow_everyone().await.unwrap();
    let mut client = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    client.initialize().await.unwrap();

    assert_eq!(
        text(&client.call("bad_garbage", json!({})).await.unwrap()),
        "after garbage",
        "garbage lines are skipped"
    );
    assert_eq!(
        text(&client.call("bad_flood", json!({})).await.unwrap()),
        "after flood",
        "a flood does not wedge the process"
    );

    let started = Instant::now();
    let hung = client.call("bad_hang", json!({})).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "answered within the timeout + 1 s");
    assert_eq!(hung["error"]["code"], -32000, "{hung}");
    assert!(hung["error"]["message"].as_str().unwrap().contains("did not answer"), "{hung}");

    let mut other = client.clone();
    let pending = tokio::spawn(async move { other.call("bad_hang", json!({})).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let exited = client.call("bad_exit", json!({})).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "a child that exits fails its request at once");
    assert!(exited["error"]["message"].as_str().unwrap().contains("\"bad\""), "{exited}");
    let pending = pending.await.unwrap().unwrap();
    assert_eq!(pending["error"]["code"], -32000, "every request pending on the dead child fails: {pending}");

    assert_eq!(text(&client.call("good_echo", json!({"message": "fine"})).await.unwrap()), "Echo: fine");
    assert_eq!(
        text(&client.call("bad_echo", json!({"message": "back"})).await.unwrap()),
        "Echo: back",
        "restarted on next use"
    );
    // Over the process limit: a clear error, not a hang.
    let (_, carol) = gateway.user("carol@example.com").await.unwrap();
    let mut carols = McpClient::new(&format!("{}/mcp", gateway.mcp), &carol);
    carols.initialize().await.unwrap();
    let started = Instant::now();
    let refused = carols.call("solo_echo", json!({"message": "x"})).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("maximum")), "{refused}");
    gateway.stop().await;
}

/// Processes left behind: any whose command line holds `marker`, and zombies of this process.
fn leftovers(marker: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let after_name = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or_default();
        let mut fields = after_name.split(' ');
        let (state, parent) = (fields.next().unwrap_or_default(), fields.next().unwrap_or_default());
        if String::from_utf8_lossy(&cmdline).contains(marker) || (state == "Z" && parent == me) {
            found.push(format!("{name}: {stat}"));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_spawn_teardown_and_crash_cycles_leave_no_process_behind() {
    use reflow_data_plane::upstream::stdio::{Pool, ProcessKey};
    let marker = format!("reflow-leak-{}", std::process::id());
    let target = raw_target("leak", &["--grandchild", &marker], reflow_common::credentials::Isolation::PerUser);
    let settings = reflow_common::config::StdioConfig { max_processes: 64, ..Default::default() };
    let pool = std::sync::Arc::new(Pool::new(settings).with_launcher(stdio_launcher()));
    let initialize = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let cycles = |from: usize, to: usize, crash: bool| {
        let (pool, target, initialize) = (pool.clone(), target.clone(), initialize.clone());
        async move {
            for i in from..to {
                let key = ProcessKey { target_id: target.id.clone(), scope: format!("user:{i}") };
                let process =
                    pool.get(&target, key, Default::default(), &initialize, Duration::from_secs(20)).await.unwrap();
                if crash {
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(process.pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    )
                    .unwrap();
                    process.closed.cancelled().await;
                } else {
                    process.stop();
                    process.closed.cancelled().await;
                }
                pool.collect();
            }
        }
    };
    // 1,000 start/initialize/stop cycles and 100 children killed outright, four at a time.
    let mut workers = Vec::new();
    for w in 0..4 {
        workers.push(tokio::spawn(cycles(w * 250, (w + 1) * 250, false)));
        workers.push(tokio::spawn(cycles(1000 + w * 25, 1000 + (w + 1) * 25, true)));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = leftovers(&marker);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} processes left behind, e.g. {:?}",
            left.len(),
            &left[..left.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_stdio_servers_work_through_the_gateway() {
    ensure_peers();
    // The venv's Python runs mcp-server-time (a Python SDK server): allow it by absolute path.
    let python = python().to_string_lossy().into_owned();
    let mut settings = reflow_data_plane::mcp::McpSettings::default();
    settings.stdio.allowed_commands.push(python.clone());
    let gateway = Gateway::start_with(settings).await.unwrap();
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("hello.txt"), "hello from a file").unwrap();
    let filesystem = node_package("@modelcontextprotocol/server-filesystem/dist/index.js");
    gateway
        .post(
            "/api/targets",
            json!({"name": "fs", "transport_type": "stdio", "command": "node",
                   "args": [filesystem.to_string_lossy(), files.path().to_string_lossy()]}),
        )
        .await
        .unwrap();
    gateway
        .post(
            "/api/targets",
            json!({"name": "time", "transport_type": "stdio", "command": python,
                   "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]}),
        )
        .await
        .unwrap();
    gateway.allow_everyone().await.unwrap();
    let mut client = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    client.initialize().await.unwrap();
    let names = client.tool_names().await.unwrap();
    assert!(names.contains(&"time_get_current_time".to_string()), "{names:?}");
    let now = client.call("time_get_current_time", json!({"timezone": "UTC"})).await.unwrap();
    assert!(text(&now).contains("UTC"), "{now}");
    let read_tool = ["fs_read_text_file", "fs_read_file"].into_iter().find(|t| names.contains(&t.to_string()));
    let read_tool = read_tool.unwrap_or_else(|| panic!("no read tool in {names:?}"));
    let path = files.path().join("hello.txt");
    let read = client.call(read_tool, json!({"path": path.to_string_lossy()})).await.unwrap();
    assert!(text(&read).contains("hello from a file"), "{read}");
    // Outside its allowed directory the server itself refuses.
    let outside = client.call(read_tool, json!({"path": "/etc/hostname"})).await.unwrap();
    assert!(
        !text(&outside).is_empty() && (outside.get("error").is_some() || outside["result"]["isError"] == true),
        "{outside}"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_server_that_keeps_crashing_restarts_with_backoff() {
    use reflow_data_plane::upstream::stdio::{Pool, ProcessKey};
    let target = raw_target("crashy", &[], reflow_common::credentials::Isolation::Shared);
    let pool = std::sync::Arc::new(Pool::new(Default::default()).with_launcher(stdio_launcher()));
    let key = ProcessKey { target_id: "crashy".into(), scope: String::new() };
    let initialize = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let start = || pool.get(&target, key.clone(), Default::default(), &initialize, Duration::from_secs(20));
    let crash = |pid: u32| async move {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    };
    let first = start().await.unwrap();
    crash(first.pid).await;
    first.closed.cancelled().await;
    let second = start().await.expect("the first crash restarts at once");
    crash(second.pid).await;
    second.closed.cancelled().await;
    let refused = start().await.expect_err("a second crash in a row waits");
    assert!(refused.to_string().contains("restarts in"), "{refused}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = start().await.expect("after the backoff it starts again");
    assert!(third.pid != first.pid && third.pid != second.pid);
    pool.stop_all();
}

/// A STDIO target running `e2e/peers/stdio_server.py` with `extra` arguments.
fn raw_target(
    name: &str,
    extra: &[&str],
    isolation: reflow_common::credentials::Isolation,
) -> reflow_proto::resources::Target {
    let script = workspace().join("e2e/peers/stdio_server.py");
    let mut args = vec![script.to_string_lossy().into_owned()];
    args.extend(extra.iter().map(|a| a.to_string()));
    reflow_proto::resources::Target {
        id: name.into(),
        name: name.into(),
        transport_type: reflow_common::model::TransportType::Stdio,
        url: None,
        command: Some("python3".into()),
        args,
        image: None,
        port: None,
        health_path: None,
        statefulness: reflow_common::model::Statefulness::Stateful,
        isolation_boundary: isolation,
        auth_type: reflow_common::model::AuthType::None,
        auth_header_name: None,
        enabled: true,
        restart_generation: 0,
        audit_arguments: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_old_stdio_servers_are_stopped() {
    use reflow_data_plane::upstream::stdio::{Pool, ProcessKey};
    let initialize = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let target = raw_target("aging", &[], reflow_common::credentials::Isolation::PerUser);
    let key = |user: &str| ProcessKey { target_id: "aging".into(), scope: format!("user:{user}") };
    // idle_ttl: unused for longer than it → stopped; in use → kept.
    let idle = std::sync::Arc::new(
        Pool::new(reflow_common::config::StdioConfig { idle_ttl: Duration::from_millis(800), ..Default::default() })
            .with_launcher(stdio_launcher()),
    );
    let quiet =
        idle.get(&target, key("quiet"), Default::default(), &initialize, Duration::from_secs(20)).await.unwrap();
    let busy = idle.get(&target, key("busy"), Default::default(), &initialize, Duration::from_secs(20)).await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        busy.request(1, &json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}), None).await.unwrap();
    }
    idle.collect();
    tokio::time::timeout(Duration::from_secs(10), quiet.closed.cancelled()).await.expect("the idle process is stopped");
    assert!(!busy.closed.is_cancelled(), "a process in use is kept");
    // max_lifetime: older than it → stopped, however busy.
    let aging = std::sync::Arc::new(
        Pool::new(reflow_common::config::StdioConfig {
            max_lifetime: Duration::from_millis(500),
            ..Default::default()
        })
        .with_launcher(stdio_launcher()),
    );
    let old = aging.get(&target, key("old"), Default::default(), &initialize, Duration::from_secs(20)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    old.request(1, &json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}), None).await.unwrap();
    aging.collect();
    tokio::time::timeout(Duration::from_secs(10), old.closed.cancelled()).await.expect("the old process is stopped");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(quiet.pid) || alive(old.pid) {
        assert!(Instant::now() < deadline, "stopped processes still run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    idle.stop_all();
}

/// Initialised sessions on `/mcp` of the admin and of a new user, bob.
async fn admin_and_bob(gateway: &Gateway) -> (McpClient, McpClient) {
    let (_, bob_token) = gateway.user("bob@example.com").await.unwrap();
    let url = format!("{}/mcp", gateway.mcp);
    let (mut admin, mut bob) = (McpClient::new(&url, &gateway.admin_token), McpClient::new(&url, &bob_token));
    admin.initialize().await.unwrap();
    bob.initialize().await.unwrap();
    (admin, bob)
}

/// The settings of a gateway whose STDIO servers run under `work_dir` with small limits.
fn confined(work_dir: &std::path::Path, run_as: Option<&str>) -> reflow_data_plane::mcp::McpSettings {
    // Children of another user pass through it to their own directories.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(work_dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let mut settings = reflow_data_plane::mcp::McpSettings::default();
    settings.stdio.work_dir = Some(work_dir.to_string_lossy().into_owned());
    settings.stdio.run_as = run_as.map(str::to_string);
    settings.stdio.limits =
        reflow_common::config::StdioLimits { memory_bytes: 1 << 30, open_files: 256, processes: 24 };
    settings
}

fn limit_of(limits: &str, name: &str) -> String {
    let line = limits.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {limits}"));
    line[name.len()..].split_whitespace().next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stdio_server_runs_in_a_private_directory_with_limits() {
    let work = tempfile::tempdir().unwrap();
    let gateway = Gateway::start_with(confined(work.path(), None)).await.unwrap();
    python_target(&gateway, "room", "per_user").await;
    gateway.allow_everyone().await.unwrap();
    let (mut admin, mut bob) = admin_and_bob(&gateway).await;
    let secret = std::env::current_dir().unwrap().join("Cargo.toml");
    let mut rooms = Vec::new();
    for client in [&mut admin, &mut bob] {
        let answer = client.call("room_whereami", json!({"path": "Cargo.toml"})).await.unwrap();
        let room: Value = serde_json::from_str(&text(&answer)).unwrap();
        let cwd = std::path::PathBuf::from(room["cwd"].as_str().unwrap());
        assert!(cwd.starts_with(work.path()), "{room}: under stdio.work_dir");
        assert_ne!(cwd, std::env::current_dir().unwrap(), "never the gateway's own directory");
        assert_eq!(room["home"], room["cwd"], "{room}");
        assert_eq!(room["tmpdir"], room["cwd"], "{room}");
        assert_eq!(room["readable"], false, "the gateway's files are not a relative path away: {room}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&cwd).unwrap().permissions().mode() & 0o777, 0o700);
        let limits = text(&client.call("room_limits", json!({})).await.unwrap());
        assert_eq!(limit_of(&limits, "Max address space"), (1u64 << 30).to_string(), "{limits}");
        assert_eq!(limit_of(&limits, "Max open files"), "256", "{limits}");
        assert_eq!(limit_of(&limits, "Max core file size"), "0", "{limits}");
        rooms.push(cwd);
    }
    assert_ne!(rooms[0], rooms[1], "each process has its own directory");
    assert!(secret.exists());
    // Stopped, a process's directory goes with it.
    gateway.stop().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while rooms.iter().any(|room| room.exists()) {
        assert!(Instant::now() < deadline, "directories left behind: {rooms:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Processes whose owner is `uid`, by /proc.
fn processes_of(uid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let owner = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|v| v.split_whitespace().next());
        if owner.and_then(|v| v.parse::<u32>().ok()) == Some(uid) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_as_another_user_stays_in_its_limit_and_the_gateway_serves_on() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: running STDIO servers as another user needs root");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a nobody user");
    assert!(processes_of(nobody.uid.as_raw()).is_empty(), "nothing runs as nobody before the test");
    let work = tempfile::tempdir().unwrap();
    // A root-only file the server must not read.
    let private = work.path().join("root-only");
    std::fs::write(&private, "root's secret").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    let gateway = Gateway::start_with(confined(work.path(), Some("nobody"))).await.unwrap();
    python_target(&gateway, "bomb", "per_user").await;
    python_target(&gateway, "calm", "shared").await;
    gateway.allow_everyone().await.unwrap();
    let (mut admin, mut bob) = admin_and_bob(&gateway).await;

    let answer = bob.call("bomb_whereami", json!({"path": private})).await.unwrap();
    let room: Value = serde_json::from_str(&text(&answer)).unwrap_or_else(|_| panic!("{answer}"));
    assert_eq!(room["uid"], nobody.uid.as_raw(), "{room}");
    assert_eq!(room["readable"], false, "{room}");
    let limits = text(&bob.call("bomb_limits", json!({})).await.unwrap());
    assert_eq!(limit_of(&limits, "Max processes"), "24", "{limits}");

    // The bomb gets at most its limit of processes (the server itself is one of them).
    let forked: u32 = text(&bob.call("bomb_forkbomb", json!({"count": 500})).await.unwrap()).parse().unwrap();
    assert!(forked < 24, "forked {forked} processes past a limit of 24");
    assert!(processes_of(nobody.uid.as_raw()).len() <= 24);
    // Everyone else is served meanwhile.
    assert_eq!(text(&admin.call("calm_echo", json!({"message": "still here"})).await.unwrap()), "Echo: still here");
    gateway.stop().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !processes_of(nobody.uid.as_raw()).is_empty() {
        assert!(Instant::now() < deadline, "left running as nobody: {:?}", processes_of(nobody.uid.as_raw()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_wait_per_key_go_on_when_their_caller_stops_waiting_and_end_at_the_start_timeout() {
    use reflow_data_plane::upstream::stdio::{Pool, ProcessKey};
    let marker = format!("reflow-slow-{}", std::process::id());
    let slow = raw_target("slow", &["--slow-start", "30", &marker], reflow_common::credentials::Isolation::PerUser);
    let late = raw_target("late", &["--slow-start", "2", &marker], reflow_common::credentials::Isolation::PerUser);
    let fast = raw_target("fast", &[], reflow_common::credentials::Isolation::PerUser);
    let settings = reflow_common::config::StdioConfig { start_timeout: Duration::from_secs(4), ..Default::default() };
    let pool = std::sync::Arc::new(Pool::new(settings).with_launcher(stdio_launcher()));
    let initialize = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let key = |target: &str, user: &str| ProcessKey { target_id: target.into(), scope: format!("user:{user}") };
    // A slow start holds up no other key.
    let waiting = {
        let (pool, slow, initialize) = (pool.clone(), slow.clone(), initialize.clone());
        tokio::spawn(async move {
            pool.get(&slow, key("slow", "a"), Default::default(), &initialize, Duration::from_secs(2)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    pool.get(&fast, key("fast", "b"), Default::default(), &initialize, Duration::from_secs(20)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "a start waited on another key's: {:?}", started.elapsed());
    // The caller stops waiting after 2 s; the start goes on, and ends at stdio.start_timeout:
    // killed with its group, and counted.
    let gave_up = waiting.await.unwrap().expect_err("the caller stops waiting");
    assert!(gave_up.to_string().contains("still starting"), "{gave_up}");
    assert!(!leftovers(&marker).is_empty(), "the start goes on after its caller stopped waiting");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !leftovers(&marker).is_empty() || pool.failed_starts.load(std::sync::atomic::Ordering::Relaxed) < 1 {
        assert!(Instant::now() < deadline, "a start past stdio.start_timeout left running: {:?}", leftovers(&marker));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pool.failed_starts.load(std::sync::atomic::Ordering::Relaxed), 1);

    // A start that comes up after its caller stopped waiting is announced, and serves the next
    // caller without starting again.
    let mut announced = pool.subscribe_started();
    let early = pool.get(&late, key("late", "c"), Default::default(), &initialize, Duration::from_millis(300)).await;
    assert!(early.is_err(), "the caller stops waiting before the server is up");
    let up = tokio::time::timeout(Duration::from_secs(10), announced.recv()).await.expect("announced").unwrap();
    assert_eq!(up, "late");
    let process = pool.get(&late, key("late", "c"), Default::default(), &initialize, Duration::from_millis(300)).await;
    let process = process.expect("the started process serves at once");
    assert_eq!(pool.processes().iter().filter(|p| p.key.target_id == "late").count(), 1);
    assert!(leftovers(&marker).len() <= 2, "one process (and its launcher) for the late key");
    // Shutdown stops starts in progress too.
    let (pool2, slow2, initialize2) = (pool.clone(), slow.clone(), initialize.clone());
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        pool2.get(&slow2, key("slow", "d"), Default::default(), &initialize2, Duration::from_secs(60)),
    )
    .await;
    pool.shutdown().await;
    drop(process);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !leftovers(&marker).is_empty() {
        assert!(Instant::now() < deadline, "left running after shutdown: {:?}", leftovers(&marker));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_sharing_a_stdio_process_never_cancel_or_see_each_others_requests() {
    ensure_peers();
    let gateway = Gateway::start().await.unwrap();
    python_target(&gateway, "shared", "shared").await;
    gateway.allow_everyone().await.unwrap();
    let (_, bob_token) = gateway.user("bob@example.com").await.unwrap();
    let url = format!("{}/mcp/shared", gateway.mcp);
    let (mut admin, mut bob) = (McpClient::new(&url, &gateway.admin_token), McpClient::new(&url, &bob_token));
    admin.initialize().await.unwrap();
    bob.initialize().await.unwrap();
    // On the process's side, request ids are numbers the gateway chose; the server says which
    // one a call got. Bob will use, as his own request id, the number the admin's next request
    // gets there, so a cancellation passed on as it came would name the admin's request.
    let warm = admin.call("slow", json!({"ms": 0})).await.unwrap();
    let last: u64 = text(&warm).trim_start_matches("slow done ").parse().unwrap();
    let admins_id = last + 1;
    // Both use the same progress token too.
    let call = |id: u64| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": "slow", "arguments": {"ms": 1500}, "_meta": {"progressToken": "tok"}}})
        .to_string()
    };
    let admin_call = admin.send(call(1));
    let bob_again = bob.clone();
    let bob_call_and_cancel = async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut canceller = bob_again.clone();
        let cancel = async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            canceller.notify("notifications/cancelled", json!({"requestId": admins_id, "reason": "bob"})).await
        };
        let (answer, cancelled) = tokio::join!(bob_again.send(call(admins_id)), cancel);
        assert_eq!(cancelled.unwrap().status, 202);
        answer
    };
    let (admin_answer, bob_answer) = tokio::join!(admin_call, bob_call_and_cancel);
    let (admin_answer, bob_answer) = (admin_answer.unwrap(), bob_answer.unwrap());
    assert_eq!(text(admin_answer.message()), format!("slow done {admins_id}"), "{:?}", admin_answer.messages);
    // The admin's request was not cancelled by bob's notification naming the same id.
    assert_eq!(admin_answer.message()["id"], 1);
    // Each saw exactly its own three progress notifications, with its own token.
    for answer in [&admin_answer, &bob_answer] {
        let progress: Vec<&Value> =
            answer.messages.iter().filter(|m| m["method"] == "notifications/progress").collect();
        assert_eq!(progress.len(), 3, "{:?}", answer.messages);
        assert!(progress.iter().all(|p| p["params"]["progressToken"] == "tok"), "{progress:?}");
    }
    // Bob's own request was cancelled: no answer reached him.
    assert!(!bob_answer.messages.iter().any(|m| text(m).starts_with("slow done")), "{:?}", bob_answer.messages);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_slower_than_the_list_timeout_goes_on_starting_and_sessions_are_told_when_it_is_up() {
    ensure_peers();
    let settings = McpSettings { list_timeout: Duration::from_secs(1), ..McpSettings::default() };
    let gateway = Gateway::start_with(settings).await.unwrap();
    let script = workspace().join("e2e/peers/stdio_server.py");
    gateway
        .post(
            "/api/targets",
            json!({"name": "late", "transport_type": "stdio", "command": "python3",
                   "args": [script.to_string_lossy(), "--slow-start", "4"]}),
        )
        .await
        .unwrap();
    gateway.allow_everyone().await.unwrap();
    let mut client = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    client.initialize().await.unwrap();
    let listed = Instant::now();
    let first = client.tool_names().await.unwrap();
    assert!(listed.elapsed() < Duration::from_secs(4), "the list did not wait for the slow server");
    assert!(!first.iter().any(|n| n.starts_with("late_")), "{first:?}");
    let stream = client.open_stream().await.unwrap();
    let mut body = stream.bytes_stream();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    while !seen.contains("notifications/tools/list_changed") {
        let chunk = tokio::time::timeout_at(deadline.into(), futures::StreamExt::next(&mut body)).await;
        let chunk = chunk.expect("list_changed within 20 s").expect("the stream stays open").unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let now = client.tool_names().await.unwrap();
    assert!(now.iter().any(|n| n.starts_with("late_")), "the server's tools are there once it is up: {now:?}");
    let pool = &gateway.data_plane().gateway().pool;
    assert_eq!(pool.failed_starts.load(std::sync::atomic::Ordering::Relaxed), 0, "one start, not abandoned");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_status_shows_each_data_planes_last_failure_with_the_stderr_tail_masked() {
    ensure_peers();
    let gateway = Gateway::start().await.unwrap();
    python_target(&gateway, "py", "shared").await;
    let targets = gateway.get("/api/targets").await.unwrap();
    let id = targets[0]["id"].as_str().unwrap().to_string();
    let canary = "CANARY-key-5d1e";
    gateway.post(&format!("/api/targets/{id}/env/default"), json!({"key": "API_KEY", "value": canary})).await.unwrap();
    let gone = gateway.target("gone", "streamable-http", "http://127.0.0.1:9/mcp").await.unwrap();
    gateway.allow_everyone().await.unwrap();
    let mut client = McpClient::new(&format!("{}/mcp", gateway.mcp), &gateway.admin_token);
    client.initialize().await.unwrap();
    assert_eq!(text(&client.call("py_echo", json!({"message": "up"})).await.unwrap()), "Echo: up");
    let status = |target: String| {
        let gateway = &gateway;
        async move { gateway.get(&format!("/api/targets/{target}/status")).await.unwrap() }
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let healthy = loop {
        let now = status(id.clone()).await;
        if now["data_planes"][0]["last_ok_at"].is_string() && now["processes"] == 1 {
            break now;
        }
        assert!(Instant::now() < deadline, "no report of the working target: {now}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (healthy["sessions"].as_u64(), healthy["data_planes"][0]["data_plane"].as_str()),
        (Some(1), Some("e2e"))
    );
    assert!(healthy["data_planes"][0]["last_failure"].is_null(), "{healthy}");

    // The server exits: the status says so with its last stderr line, its API_KEY masked.
    let crashed = client.call("py_exit", json!({})).await.unwrap();
    assert!(crashed.get("error").is_some(), "{crashed}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let failed = loop {
        let now = status(id.clone()).await;
        if now["data_planes"][0]["last_failure"].as_str().is_some_and(|f| f.contains("exited")) {
            break now;
        }
        assert!(Instant::now() < deadline, "no report of the exit: {now}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reason = failed["data_planes"][0]["last_failure"].as_str().unwrap();
    assert!(reason.contains("fatal: giving up (API_KEY=[masked])"), "{reason}");
    assert!(!failed.to_string().contains(canary), "{failed}");
    assert!(failed["data_planes"][0]["last_failure_at"].is_string());

    // An HTTP target that cannot be reached: the reason names it.
    let answer = client.call("gone_anything", json!({})).await.unwrap();
    assert!(answer.get("error").is_some());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = status(gone.clone()).await;
        if let Some(reason) = now["data_planes"][0]["last_failure"].as_str() {
            assert!(now["data_planes"][0]["last_ok_at"].is_null(), "{now}");
            assert!(now["data_planes"][0]["failures"].as_u64() >= Some(1), "{now}");
            assert!(!reason.is_empty());
            break;
        }
        assert!(Instant::now() < deadline, "no report of the unreachable target: {now}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gateway.stop().await;
}
