//! The `reflow` binary as a user runs it: `reflow up` with the README's usage section run by
//! bash and curl, a restart that keeps everything, bad configs, and `reflow control-plane`
//! on PostgreSQL.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// The bash blocks of the README's usage section.
fn readme_usage() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme.find("<!-- usage:start -->").expect("usage start marker");
    let end = readme.find("<!-- usage:end -->").expect("usage end marker");
    let section = &readme[start..end];
    let mut script = String::new();
    let mut in_block = false;
    for line in section.lines() {
        match (in_block, line.trim()) {
            (false, "```bash") => in_block = true,
            (true, "```") => in_block = false,
            (true, _) => {
                script.push_str(line);
                script.push('\n');
            }
            _ => {}
        }
    }
    assert!(script.contains("/api/policies"), "usage section has the policy example");
    script
}

#[test]
fn readme_usage_works_against_reflow_up_and_survives_a_restart() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let data_arg = data.to_str().unwrap();
    let port = free_port();
    // npm told never to install without asking, in the gateway's environment and (below) in
    // the npm configuration the STDIO child reads: the README's npx example works regardless.
    let running = Running::start(&["up", "--data-dir", data_arg], port, work.path(), &[("npm_config_yes", "false")]);

    let banner = std::fs::read_to_string(&running.stdout_path).unwrap();
    assert!(banner.contains("/api/auth/register") && banner.contains("/docs"), "banner: {banner}");

    let script = readme_usage().replace("localhost:3000", &format!("localhost:{port}"));
    let script = format!("set -euo pipefail\n{script}\necho\necho \"TARGET=$TARGET\"\necho \"USER_ID=$USER_ID\"\n");
    let output = Command::new("bash").arg("-c").arg(&script).output().expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "usage script failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let target = stdout.lines().find_map(|l| l.strip_prefix("TARGET=")).unwrap().to_string();
    let user_id = stdout.lines().find_map(|l| l.strip_prefix("USER_ID=")).unwrap().to_string();
    assert!(stdout.contains("\"name\":\"Developers can use GitHub\""), "policy response: {stdout}");
    assert!(stdout.contains("\"role\":\"admin\""), "the first user is admin: {stdout}");

    let token = login(&running.base, "admin@example.com", "secure123");
    let created = get(&running.base, &format!("/api/targets/{target}"), &token);
    assert_eq!((created["name"].as_str(), created["transport_type"].as_str()), (Some("github"), Some("stdio")));
    assert_eq!(created["isolation_boundary"], "per_user");
    let env = get(&running.base, &format!("/api/targets/{target}/env"), &token);
    assert_eq!(env["user_configs"][&user_id][0]["key"], "GITHUB_PERSONAL_ACCESS_TOKEN", "{env}");
    assert_eq!(env["entries"][0]["scope_value"], user_id.as_str());
    assert!(!env.to_string().contains("ghp_xxxx"));
    let policies = get(&running.base, "/api/policies", &token);
    assert_eq!(policies[0]["subjects"][0]["subject_value"], "developer");
    assert_eq!(policies[0]["target_id"], target.as_str());

    // The server runs: npx fetches it on first use, with npm's configuration saying yes=false.
    let npmrc = work.path().join("npmrc");
    std::fs::write(&npmrc, "yes=false\n").unwrap();
    let client = reqwest::blocking::Client::new();
    let put = client
        .put(format!("{}/api/targets/{target}/env/default", running.base))
        .bearer_auth(&token)
        .json(
            &json!([{"key": "NPM_CONFIG_USERCONFIG", "value": npmrc.to_str().unwrap(), "description": "npm settings"}]),
        )
        .send()
        .unwrap();
    assert_eq!(put.status().as_u16(), 200);
    let policy = policies[0]["id"].as_str().unwrap();
    let added = client
        .post(format!("{}/api/policies/{policy}/subjects", running.base))
        .bearer_auth(&token)
        .json(&json!({"subject_type": "user", "subject_value": user_id}))
        .send()
        .unwrap();
    assert_eq!(added.status().as_u16(), 201);
    eventually(Duration::from_secs(10), "the admin may use github", || {
        let (_, answer) = mcp_request(&running.base, "/mcp/github", &token, None, initialize());
        answer.get("result").is_some()
    });
    let (session, _) = mcp_request(&running.base, "/mcp/github", &token, None, initialize());
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let (_, tools) = mcp_request(&running.base, "/mcp/github", &token, session.as_deref(), list);
    let names: Vec<&str> =
        tools["result"]["tools"].as_array().map_or(vec![], |t| t.iter().filter_map(|t| t["name"].as_str()).collect());
    assert!(names.contains(&"create_issue"), "server-github's tools through the gateway: {tools}");

    assert!(running.stop().success(), "SIGTERM is a clean shutdown");

    // Secrets: owner-only files; the database holds no value in clear.
    #[cfg(unix)]
    {
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("jwt-secret")), 0o600);
        assert_eq!(mode(&data.join("encryption-key")), 0o600);
    }
    for file in ["reflow.db", "reflow.db-wal"] {
        let bytes = file_bytes(&data.join(file));
        assert!(!bytes.windows(9).any(|w| w == b"ghp_xxxx\""), "{file} holds a secret in clear");
        assert!(!bytes.windows(8).any(|w| w == b"ghp_xxxx"), "{file} holds a secret in clear");
    }

    // Restart on the same directory: same users, targets and (decryptable) credentials.
    let running = Running::start(&["up", "--data-dir", data_arg], port, work.path(), &[]);
    let token = login(&running.base, "admin@example.com", "secure123");
    let resolved =
        get(&running.base, &format!("/api/targets/{target}/env/resolve?user_id={user_id}&reveal=true"), &token);
    assert_eq!(resolved["env"][0]["value"], "ghp_xxxx");
    assert_eq!(resolved["env"][0]["scope_type"], "user");
    // Log lines are written out in batches (every 50 ms).
    eventually(Duration::from_secs(5), "revealing is logged", || {
        running.stderr().contains("credential values revealed")
    });
    assert!(running.stop().success());
    for log in
        std::fs::read_dir(work.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
    {
        let text = std::fs::read_to_string(log.path()).unwrap();
        for secret in ["ghp_xxxx", "secure123"] {
            assert!(!text.contains(secret), "{} contains {secret}", log.path().display());
        }
    }
}

fn initialize() -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
           "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "readme", "version": "0"}}})
}

fn run_expecting_failure(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_reflow"));
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("JWT_SECRET")
        .env_remove("ENCRYPTION_KEY")
        .env("REFLOW_GRPC_PORT", "0");
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).to_string())
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let cases = [
        ("server:\n  prot: 1\n", "prot"),
        ("encryption:\n  key: short\n", "encryption.key"),
        ("jwt:\n  secret: ${REFLOW_TEST_UNSET_VARIABLE}\n", "REFLOW_TEST_UNSET_VARIABLE"),
        ("logging:\n  format: xml\n", "logging.format"),
        ("telemetry:\n  sample_ratio: 2\n", "telemetry.sample_ratio"),
        ("telemetry:\n  enabled: true\n  ca: /nonexistent/ca.pem\n", "telemetry.ca"),
    ];
    for (text, needle) in cases {
        let path = work.path().join("config.yaml");
        std::fs::write(&path, text).unwrap();
        let (code, stderr) = run_expecting_failure(
            &["up", "--config", path.to_str().unwrap(), "--data-dir", data.to_str().unwrap()],
            &[],
        );
        assert_eq!(code, 2, "{text}: {stderr}");
        assert!(stderr.contains(needle), "{text}: expected {needle} in {stderr}");
    }
    let (code, stderr) = run_expecting_failure(&["control-plane", "--database-url", "postgres://127.0.0.1:1/x"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("jwt.secret"), "{stderr}");
    let (code, stderr) = run_expecting_failure(
        &["control-plane"],
        &[("JWT_SECRET", &"s".repeat(32)), ("ENCRYPTION_KEY", &"k".repeat(32))],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("database.url"), "{stderr}");
    let (code, stderr) = run_expecting_failure(
        &["control-plane", "--database-url", "sqlite://x.db"],
        &[("JWT_SECRET", &"s".repeat(32)), ("ENCRYPTION_KEY", &"k".repeat(32))],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("PostgreSQL"), "{stderr}");
}

#[test]
fn control_plane_serves_from_postgres() {
    let db = TestDatabase::create("reflow_cli");
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let env =
        [("JWT_SECRET", "0123456789abcdef0123456789abcdef"), ("ENCRYPTION_KEY", "fedcba9876543210fedcba9876543210")];
    let args = ["control-plane", "--database-url", db.url.as_str(), "--host", "127.0.0.1"];
    let running = Running::start(&args, port, work.path(), &env);
    let client = reqwest::blocking::Client::new();
    let health: Value = client.get(format!("{}/health", running.base)).send().unwrap().json().unwrap();
    assert_eq!(health["backend"], "postgres");
    let response = client
        .post(format!("{}/api/auth/register", running.base))
        .json(&json!({"email": "admin@example.com", "password": "secure123"}))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    assert!(running.stop().success());

    // A second start applies no migration twice and keeps the data.
    let running = Running::start(&args, port, work.path(), &env);
    login(&running.base, "admin@example.com", "secure123");
    assert!(running.stop().success());
}

#[test]
fn committed_openapi_document_matches_the_code() {
    let output = Command::new(env!("CARGO_BIN_EXE_reflow")).arg("openapi").output().unwrap();
    assert!(output.status.success());
    let generated = String::from_utf8(output.stdout).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        generated == committed,
        "docs/openapi.json is out of date: run `cargo run -p reflow -- openapi > docs/openapi.json`"
    );
}

#[test]
fn metrics_of_both_planes_are_served_on_the_main_port_or_a_port_of_their_own() {
    let work = tempfile::tempdir().unwrap();
    let client = reqwest::blocking::Client::new();
    let families = |text: &str| {
        for family in ["# TYPE mcp_requests_total counter", "# TYPE reflow_snapshot_compiles_total counter"] {
            assert!(text.contains(family), "{family} in {text}");
        }
    };

    let port = free_port();
    let data = work.path().join("one");
    let running = Running::start(&["up", "--data-dir", data.to_str().unwrap()], port, work.path(), &[]);
    let response = client.get(format!("{}/metrics", running.base)).send().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    families(&response.text().unwrap());
    assert!(running.stop().success());

    let (port, metrics_port) = (free_port(), free_port());
    let config = work.path().join("metrics.yaml");
    std::fs::write(&config, format!("telemetry: {{ metrics_port: {metrics_port} }}\n")).unwrap();
    let data = work.path().join("two");
    let args = ["up", "--config", config.to_str().unwrap(), "--data-dir", data.to_str().unwrap()];
    let running = Running::start(&args, port, work.path(), &[]);
    assert_eq!(client.get(format!("{}/metrics", running.base)).send().unwrap().status().as_u16(), 404);
    let response = client.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    families(&response.text().unwrap());
    assert!(running.stop().success());
}

#[test]
fn log_lines_of_a_request_carry_its_trace_id() {
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = work.path().join("data");
    let running = Running::start(&["up", "--data-dir", data.to_str().unwrap()], port, work.path(), &[]);
    let client = reqwest::blocking::Client::new();
    let base = &running.base;
    let registered: Value = client
        .post(format!("{base}/api/auth/register"))
        .json(&json!({"email": "admin@example.com", "password": "secure123"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let token = registered["token"].as_str().unwrap().to_string();
    // Port 1: nothing listens there (a free port could be handed to this gateway itself).
    let dead = "http://127.0.0.1:1/mcp";
    for (path, body) in [
        ("/api/targets", json!({"name": "dead", "transport_type": "streamable-http", "url": dead})),
        ("/api/policies", json!({"name": "all", "effect": "allow", "subjects": [{"subject_type": "everyone"}]})),
    ] {
        let response = client.post(format!("{base}{path}")).bearer_auth(&token).json(&body).send().unwrap();
        assert!(response.status().is_success(), "{path}: {}", response.text().unwrap());
    }
    // The data plane knows the new account once its snapshot has it.
    let mut session = None;
    eventually(Duration::from_secs(10), "a session", || {
        session = mcp_request(base, "/mcp", &token, None, initialize()).0;
        session.is_some()
    });
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                      "params": {"name": "dead_anything", "arguments": {},
                                 "_meta": {"traceparent": format!("00-{trace}-00f067aa0ba902b7-01")}}});
    eventually(Duration::from_secs(10), "the call reaches the (dead) upstream", || {
        let (_, answer) = mcp_request(base, "/mcp", &token, session.as_deref(), call.clone());
        answer["error"]["code"] == -32000
    });
    eventually(Duration::from_secs(5), "log lines with the trace id", || {
        let logs = running.stderr();
        logs.lines().any(|l| l.contains("policy decision") && l.contains(trace))
            && logs.lines().any(|l| l.contains("upstream request failed") && l.contains(trace))
    });
    assert!(running.stop().success());
}
