//! The original gateway's REST surface against `reflow up`, operation by operation, with the
//! bodies its users' scripts and web UI send, checking each status and answer shape; this
//! project's own spellings of the same operations beside it; and bad input in either spelling.
//!
//! [`ORIGINAL`] lists the original's operations; the walk records every operation it calls and
//! must cover them all.

mod support;

use std::collections::BTreeSet;

use serde_json::{json, Value};
use support::*;

/// Every operation of the original's REST API (method, path template), in its reference's order.
const ORIGINAL: &[(&str, &str)] = &[
    ("POST", "/api/auth/register"),
    ("POST", "/api/auth/login"),
    ("GET", "/api/auth/me"),
    ("GET", "/api/auth/tokens"),
    ("POST", "/api/auth/tokens"),
    ("DELETE", "/api/auth/tokens/{id}"),
    ("GET", "/api/users"),
    ("PUT", "/api/users/{id}"),
    ("POST", "/api/users/{id}/recycle"),
    ("POST", "/api/sessions/recycle"),
    ("GET", "/api/targets"),
    ("POST", "/api/targets"),
    ("GET", "/api/targets/{id}"),
    ("PUT", "/api/targets/{id}"),
    ("DELETE", "/api/targets/{id}"),
    ("POST", "/api/targets/{id}/restart-instances"),
    ("GET", "/api/targets/{id}/tokens"),
    ("GET", "/api/targets/{id}/token"),
    ("PUT", "/api/targets/{id}/token"),
    ("DELETE", "/api/targets/{id}/token"),
    ("PUT", "/api/targets/{id}/tokens/role"),
    ("DELETE", "/api/targets/{id}/tokens/role/{role}"),
    ("PUT", "/api/targets/{id}/tokens/group"),
    ("DELETE", "/api/targets/{id}/tokens/group/{group}"),
    ("PUT", "/api/targets/{id}/tokens/default"),
    ("DELETE", "/api/targets/{id}/tokens/default"),
    ("GET", "/api/policies"),
    ("POST", "/api/policies"),
    ("GET", "/api/policies/{id}"),
    ("PUT", "/api/policies/{id}"),
    ("DELETE", "/api/policies/{id}"),
    ("POST", "/api/policies/{id}/subjects"),
    ("DELETE", "/api/policies/{id}/subjects/{subjectId}"),
    ("GET", "/api/targets/{id}/env/default"),
    ("PUT", "/api/targets/{id}/env/default"),
    ("POST", "/api/targets/{id}/env/default"),
    ("DELETE", "/api/targets/{id}/env/default/{key}"),
    ("GET", "/api/targets/{id}/env/{scope}/{scopeValue}"),
    ("PUT", "/api/targets/{id}/env/{scope}/{scopeValue}"),
    ("POST", "/api/targets/{id}/env/{scope}/{scopeValue}"),
    ("DELETE", "/api/targets/{id}/env/{scope}/{scopeValue}/{key}"),
    ("GET", "/api/targets/{id}/env"),
    ("GET", "/api/targets/{id}/env/resolve"),
    ("GET", "/api/logs"),
    ("GET", "/api/observability/ws"),
    ("GET", "/api/observability/snapshot"),
    ("POST", "/mcp"),
    ("GET", "/mcp"),
    ("DELETE", "/mcp"),
    ("GET", "/health"),
];

/// The API of one running gateway, recording which operations were called.
struct Api {
    base: String,
    http: reqwest::blocking::Client,
    called: BTreeSet<(String, String)>,
}

impl Api {
    fn new(base: &str) -> Api {
        Api { base: base.into(), http: reqwest::blocking::Client::new(), called: BTreeSet::new() }
    }

    /// `method path` (recorded as `template`) with `body`, as `token`: (status, JSON answer).
    fn call(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.called.insert((method.to_string(), template.to_string()));
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        let text = response.text().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Like [`Api::call`], asserting the status.
    fn expect(
        &mut self,
        status: u16,
        method: &str,
        template: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Value {
        let (got, answer) = self.call(method, template, path, Some(token), body);
        assert_eq!(got, status, "{method} {path}: {answer}");
        answer
    }
}

/// `value` is an object holding every one of `fields`.
fn has_fields(value: &Value, fields: &[&str]) {
    for field in fields {
        assert!(value.get(*field).is_some(), "{field} missing from {value}");
    }
}

const USER: &[&str] = &["id", "email", "role", "groups", "created_at", "updated_at"];
const API_TOKEN: &[&str] = &["id", "user_id", "jti", "name", "last_used_at", "created_at", "revoked_at"];
const TARGET: &[&str] = &[
    "id",
    "name",
    "url",
    "transport_type",
    "command",
    "args",
    "image",
    "port",
    "health_path",
    "statefulness",
    "isolation_boundary",
    "auth_type",
    "auth_header_name",
    "enabled",
    "created_at",
    "updated_at",
];
const POLICY: &[&str] = &[
    "id",
    "name",
    "description",
    "target_id",
    "resource_type",
    "resource_pattern",
    "effect",
    "priority",
    "enabled",
    "subjects",
    "created_at",
    "updated_at",
];
const SUBJECT: &[&str] = &["id", "policy_id", "subject_type", "subject_value", "created_at"];

fn deleted(answer: &Value) {
    assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "a delete answers {{message}}: {answer}");
}

#[test]
fn every_operation_of_the_original_works_as_written() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let port = free_port();
    let running = Running::start(&["up", "--data-dir", data.to_str().unwrap()], port, work.path(), &[]);
    let mut api = Api::new(&running.base);
    let admin_body = json!({"email": "admin@example.com", "password": "secure123"});

    // Auth and users.
    let (status, registered) =
        api.call("POST", "/api/auth/register", "/api/auth/register", None, Some(admin_body.clone()));
    assert_eq!(status, 201, "{registered}");
    has_fields(&registered, USER);
    let (status, taken) = api.call("POST", "/api/auth/register", "/api/auth/register", None, Some(admin_body.clone()));
    assert_eq!((status, taken["error"].is_string()), (409, true), "{taken}");
    let (status, login) = api.call("POST", "/api/auth/login", "/api/auth/login", None, Some(admin_body));
    assert_eq!(status, 200);
    has_fields(&login["user"], USER);
    let token = login["token"].as_str().unwrap().to_string();
    let me = api.expect(200, "GET", "/api/auth/me", "/api/auth/me", &token, None);
    has_fields(&me, USER);
    let admin_id = me["id"].as_str().unwrap().to_string();
    assert_eq!(api.expect(200, "GET", "/api/auth/tokens", "/api/auth/tokens", &token, None), json!([]));
    let created = api.expect(201, "POST", "/api/auth/tokens", "/api/auth/tokens", &token, Some(json!({"name": "ci"})));
    has_fields(&created["api_token"], API_TOKEN);
    assert!(created["token"].as_str().is_some_and(|t| t.starts_with("rfl_")), "{created}");
    let listed = api.expect(200, "GET", "/api/auth/tokens", "/api/auth/tokens", &token, None);
    has_fields(&listed[0], API_TOKEN);
    assert!(listed.to_string().find(created["token"].as_str().unwrap()).is_none(), "the token is shown once");
    let token_id = created["api_token"]["id"].as_str().unwrap();
    deleted(&api.expect(200, "DELETE", "/api/auth/tokens/{id}", &format!("/api/auth/tokens/{token_id}"), &token, None));

    let (_, dev) = api.call(
        "POST",
        "/api/auth/register",
        "/api/auth/register",
        None,
        Some(json!({"email": "dev@example.com", "password": "secure123"})),
    );
    let dev_id = dev["id"].as_str().unwrap().to_string();
    let users = api.expect(200, "GET", "/api/users", "/api/users", &token, None);
    assert_eq!(users.as_array().map(Vec::len), Some(2));
    has_fields(&users[1], USER);
    let moved = api.expect(
        200,
        "PUT",
        "/api/users/{id}",
        &format!("/api/users/{dev_id}"),
        &token,
        Some(json!({"role": "developer", "groups": ["ops"]})),
    );
    assert_eq!((moved["role"].as_str(), moved["groups"].clone()), (Some("developer"), json!(["ops"])));
    let recycled =
        api.expect(200, "POST", "/api/users/{id}/recycle", &format!("/api/users/{dev_id}/recycle"), &token, None);
    assert_eq!((recycled["recycled"].as_u64(), recycled["user_id"].as_str()), (Some(0), Some(dev_id.as_str())));
    let own = api.expect(200, "POST", "/api/sessions/recycle", "/api/sessions/recycle", &token, None);
    assert_eq!((own["recycled"].as_u64(), own["user_id"].as_str()), (Some(0), Some(admin_id.as_str())));

    // Targets: a minimal body takes the defaults; a form's body sends every field, empty
    // where one does not apply.
    assert_eq!(api.expect(200, "GET", "/api/targets", "/api/targets", &token, None), json!([]));
    let web = api.expect(
        201,
        "POST",
        "/api/targets",
        "/api/targets",
        &token,
        Some(json!({"name": "web", "url": "https://example.com/mcp"})),
    );
    has_fields(&web, TARGET);
    assert_eq!(
        (web["transport_type"].as_str(), web["statefulness"].as_str(), web["isolation_boundary"].as_str()),
        (Some("streamable-http"), Some("stateless"), Some("shared"))
    );
    let form = api.expect(
        201,
        "POST",
        "/api/targets",
        "/api/targets",
        &token,
        Some(json!({"name": "form", "url": "https://example.org/mcp", "transport_type": "streamable-http",
                    "command": "", "args": [], "image": "", "port": 0, "health_path": "", "statefulness": "stateful",
                    "isolation_boundary": "per_user", "auth_type": "header", "auth_header_name": "X-Api-Key"})),
    );
    assert_eq!((form["command"].clone(), form["auth_header_name"].as_str()), (Value::Null, Some("X-Api-Key")));
    let pod = api.expect(
        201,
        "POST",
        "/api/targets",
        "/api/targets",
        &token,
        Some(json!({"name": "pod", "transport_type": "kubernetes", "image": "ghcr.io/example/mcp:1"})),
    );
    assert_eq!((pod["port"].as_i64(), pod["health_path"].as_str()), (Some(8080), Some("/")));
    let t = web["id"].as_str().unwrap().to_string();
    let one = api.expect(200, "GET", "/api/targets/{id}", &format!("/api/targets/{t}"), &token, None);
    has_fields(&one, TARGET);
    let changed = api.expect(
        200,
        "PUT",
        "/api/targets/{id}",
        &format!("/api/targets/{t}"),
        &token,
        Some(json!({"enabled": false})),
    );
    assert_eq!((changed["enabled"].as_bool(), changed["name"].as_str()), (Some(false), Some("web")));
    api.expect(200, "PUT", "/api/targets/{id}", &format!("/api/targets/{t}"), &token, Some(json!({"enabled": true})));
    let pod_id = pod["id"].as_str().unwrap();
    deleted(&api.expect(200, "DELETE", "/api/targets/{id}", &format!("/api/targets/{pod_id}"), &token, None));
    let restarted = api.expect(
        200,
        "POST",
        "/api/targets/{id}/restart-instances",
        &format!("/api/targets/{t}/restart-instances"),
        &token,
        None,
    );
    assert_eq!((restarted["restarted"].as_u64(), restarted["target"]["id"].as_str()), (Some(0), Some(t.as_str())));

    // Target tokens.
    let tokens_path = format!("/api/targets/{t}/tokens");
    let config = api.expect(200, "GET", "/api/targets/{id}/tokens", &tokens_path, &token, None);
    has_fields(&config, &["target_id", "target_name", "has_default", "user_tokens", "role_tokens", "group_tokens"]);
    let own_path = format!("/api/targets/{t}/token");
    assert_eq!(api.expect(200, "GET", "/api/targets/{id}/token", &own_path, &token, None)["has_token"], false);
    deleted(&api.expect(200, "PUT", "/api/targets/{id}/token", &own_path, &token, Some(json!({"token": "mine"}))));
    assert_eq!(api.expect(200, "GET", "/api/targets/{id}/token", &own_path, &token, None)["has_token"], true);
    let role = json!({"role": "developer", "token": "tok-role"});
    api.expect(200, "PUT", "/api/targets/{id}/tokens/role", &format!("{tokens_path}/role"), &token, Some(role));
    let group = json!({"group_name": "ops", "token": "tok-group"});
    api.expect(200, "PUT", "/api/targets/{id}/tokens/group", &format!("{tokens_path}/group"), &token, Some(group));
    let default = json!({"token": "tok-default"});
    api.expect(
        200,
        "PUT",
        "/api/targets/{id}/tokens/default",
        &format!("{tokens_path}/default"),
        &token,
        Some(default),
    );
    let config = api.expect(200, "GET", "/api/targets/{id}/tokens", &tokens_path, &token, None);
    assert_eq!(config["has_default"], true);
    assert_eq!(config["role_tokens"][0]["role"], "developer");
    assert_eq!(config["group_tokens"][0]["group_name"], "ops");
    assert_eq!(
        (config["user_tokens"][0]["user_id"].as_str(), config["user_tokens"][0]["user_email"].as_str()),
        (Some(admin_id.as_str()), Some("admin@example.com"))
    );
    assert!(!config.to_string().contains("tok-"), "which scopes hold a token, never the token: {config}");
    deleted(&api.expect(200, "DELETE", "/api/targets/{id}/token", &own_path, &token, None));
    deleted(&api.expect(
        200,
        "DELETE",
        "/api/targets/{id}/tokens/role/{role}",
        &format!("{tokens_path}/role/developer"),
        &token,
        None,
    ));
    deleted(&api.expect(
        200,
        "DELETE",
        "/api/targets/{id}/tokens/group/{group}",
        &format!("{tokens_path}/group/ops"),
        &token,
        None,
    ));
    deleted(&api.expect(
        200,
        "DELETE",
        "/api/targets/{id}/tokens/default",
        &format!("{tokens_path}/default"),
        &token,
        None,
    ));
    let config = api.expect(200, "GET", "/api/targets/{id}/tokens", &tokens_path, &token, None);
    assert_eq!((config["has_default"].as_bool(), config["role_tokens"].clone()), (Some(false), json!([])));

    // Policies.
    assert_eq!(api.expect(200, "GET", "/api/policies", "/api/policies", &token, None), json!([]));
    let policy = api.expect(
        201,
        "POST",
        "/api/policies",
        "/api/policies",
        &token,
        Some(json!({"name": "devs read", "description": "read tools", "target_id": t, "resource_type": "tool",
                    "resource_pattern": "read_*", "effect": "allow", "priority": 10, "enabled": true,
                    "subjects": [{"subject_type": "role", "subject_value": "developer"}, {"subject_type": "everyone"}]})),
    );
    has_fields(&policy, POLICY);
    assert_eq!(policy["resource_pattern"], "read_*");
    for subject in policy["subjects"].as_array().unwrap() {
        has_fields(subject, SUBJECT);
    }
    let everyone = policy["subjects"].as_array().unwrap().iter().find(|s| s["subject_type"] == "everyone").unwrap();
    assert_eq!(everyone["subject_value"], Value::Null);
    let p = policy["id"].as_str().unwrap().to_string();
    has_fields(&api.expect(200, "GET", "/api/policies/{id}", &format!("/api/policies/{p}"), &token, None), POLICY);
    let updated = api.expect(
        200,
        "PUT",
        "/api/policies/{id}",
        &format!("/api/policies/{p}"),
        &token,
        Some(json!({"resource_pattern": "list_*", "priority": 5})),
    );
    assert_eq!((updated["resource_pattern"].as_str(), updated["priority"].as_i64()), (Some("list_*"), Some(5)));
    let subject = api.expect(
        201,
        "POST",
        "/api/policies/{id}/subjects",
        &format!("/api/policies/{p}/subjects"),
        &token,
        Some(json!({"subject_type": "group", "subject_value": "ops"})),
    );
    has_fields(&subject, SUBJECT);
    assert_eq!(subject["policy_id"], p.as_str());
    let s = subject["id"].as_str().unwrap();
    deleted(&api.expect(
        200,
        "DELETE",
        "/api/policies/{id}/subjects/{subjectId}",
        &format!("/api/policies/{p}/subjects/{s}"),
        &token,
        None,
    ));
    let listed = api.expect(200, "GET", "/api/policies", "/api/policies", &token, None);
    assert_eq!(listed[0]["subjects"].as_array().map(Vec::len), Some(2));
    let spare = api.expect(
        201,
        "POST",
        "/api/policies",
        "/api/policies",
        &token,
        Some(json!({"name": "spare", "effect": "deny", "priority": 1, "subjects": [{"subject_type": "everyone", "subject_value": null}]})),
    );
    let spare = spare["id"].as_str().unwrap();
    deleted(&api.expect(200, "DELETE", "/api/policies/{id}", &format!("/api/policies/{spare}"), &token, None));
    assert_eq!(
        api.expect(200, "GET", "/api/policies", "/api/policies", &token, None).as_array().map(Vec::len),
        Some(1)
    );

    // Environment configuration, at every scope.
    let env = format!("/api/targets/{t}/env");
    let default_path = format!("{env}/default");
    let bulk = json!([{"key": "REGION", "value": "eu", "description": "where"}, {"key": "LEVEL", "value": "3"}]);
    api.expect(200, "PUT", "/api/targets/{id}/env/default", &default_path, &token, Some(bulk));
    let one = json!({"key": "MODE", "value": "fast", "description": "how"});
    api.expect(200, "POST", "/api/targets/{id}/env/default", &default_path, &token, Some(one));
    let entries = api.expect(200, "GET", "/api/targets/{id}/env/default", &default_path, &token, None);
    let keys: Vec<&str> = entries.as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["LEVEL", "MODE", "REGION"]);
    has_fields(&entries[2], &["key", "description", "updated_at"]);
    assert_eq!(entries[2]["description"], "where");
    assert!(!entries.to_string().contains("\"eu\""), "no values: {entries}");
    deleted(&api.expect(
        200,
        "DELETE",
        "/api/targets/{id}/env/default/{key}",
        &format!("{default_path}/LEVEL"),
        &token,
        None,
    ));
    let template = "/api/targets/{id}/env/{scope}/{scopeValue}";
    let delete_template = "/api/targets/{id}/env/{scope}/{scopeValue}/{key}";
    for (scope, value) in [("role", "developer"), ("group", "ops"), ("user", dev_id.as_str())] {
        let path = format!("{env}/{scope}/{value}");
        let bulk = json!([{"key": "REGION", "value": format!("{scope}-eu")}, {"key": "SCRATCH", "value": "x"}]);
        api.expect(200, "PUT", template, &path, &token, Some(bulk));
        api.expect(200, "POST", template, &path, &token, Some(json!({"key": "TEAM", "value": scope})));
        let entries = api.expect(200, "GET", template, &path, &token, None);
        assert_eq!(entries.as_array().map(Vec::len), Some(3), "{scope}: {entries}");
        deleted(&api.expect(200, "DELETE", delete_template, &format!("{path}/SCRATCH"), &token, None));
    }
    let list = api.expect(200, "GET", "/api/targets/{id}/env", &env, &token, None);
    has_fields(
        &list,
        &["target_id", "target_name", "default_configs", "role_configs", "group_configs", "user_configs"],
    );
    assert_eq!(list["role_configs"]["developer"].as_array().map(Vec::len), Some(2));
    assert_eq!(list["group_configs"]["ops"].as_array().map(Vec::len), Some(2));
    assert_eq!(list["user_configs"][&dev_id].as_array().map(Vec::len), Some(2));
    has_fields(&list["default_configs"][0], &["id", "key", "description", "updated_at"]);
    let resolve = format!("{env}/resolve?user_id={dev_id}");
    let resolved = api.expect(200, "GET", "/api/targets/{id}/env/resolve", &resolve, &token, None);
    has_fields(&resolved, &["target_id", "target_name", "configs"]);
    let source = |key: &str| {
        let config = resolved["configs"].as_array().unwrap().iter().find(|c| c["key"] == key).unwrap().clone();
        has_fields(&config, &["key", "source", "scope_value", "description"]);
        (config["source"].as_str().unwrap().to_string(), config["scope_value"].clone())
    };
    // The target is HTTP at the default isolation: every scope resolves (user > group > role > default).
    assert_eq!(source("REGION"), ("user".into(), json!(dev_id)));
    assert_eq!(source("MODE"), ("default".into(), Value::Null));
    assert!(resolved["configs"][0].get("value").is_none(), "values only when an admin asks");
    let resolve = format!("{env}/resolve?user_id={dev_id}&reveal=true");
    let revealed = api.expect(200, "GET", "/api/targets/{id}/env/resolve", &resolve, &token, None);
    let region = revealed["configs"].as_array().unwrap().iter().find(|c| c["key"] == "REGION").unwrap().clone();
    assert_eq!(region["value"], "user-eu");

    // MCP and health.
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                      "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let response = api
        .http
        .post(format!("{}/mcp", running.base))
        .bearer_auth(&token)
        .header("accept", "application/json, text/event-stream")
        .json(&init)
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let session = response.headers()["mcp-session-id"].to_str().unwrap().to_string();
    api.called.insert(("POST".into(), "/mcp".into()));
    let stream = api
        .http
        .get(format!("{}/mcp", running.base))
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &session)
        .send()
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    drop(stream);
    api.called.insert(("GET".into(), "/mcp".into()));
    let ended = api
        .http
        .delete(format!("{}/mcp", running.base))
        .bearer_auth(&token)
        .header("mcp-session-id", &session)
        .send()
        .unwrap();
    assert!(ended.status().is_success(), "{}", ended.status());
    api.called.insert(("DELETE".into(), "/mcp".into()));
    let (status, health) = api.call("GET", "/health", "/health", None, None);
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));

    // The session's initialize is in the audit trail, in the original's shape, once shipped,
    // under the session id's nonce (the same on every data plane; the sealed rest stays out).
    let session = reflow_data_plane::mcp::ticket::nonce_of(&session).expect("a travelling session id").to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let logged = loop {
        let logs = api.expect(200, "GET", "/api/logs", "/api/logs?limit=50&offset=0", &token, None);
        let found = logs.as_array().unwrap().iter().find(|l| l["session_id"] == session.as_str()).cloned();
        match found {
            Some(log) => break log,
            None if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(100)),
            None => panic!("the initialize was not recorded: {logs}"),
        }
    };
    has_fields(&logged, REQUEST_LOG);
    assert_eq!((logged["method"].as_str(), logged["response_status"].as_u64()), (Some("initialize"), Some(200)));

    // The original's observability endpoints: current activity, and the live feed (a WebSocket,
    // driven in e2e/tests/telemetry.rs; a plain GET is told what it is).
    let path = "/api/observability/snapshot";
    let activity = api.expect(200, "GET", path, path, &token, None);
    has_fields(&activity, &["data_planes", "sessions", "stdio_processes", "recent_requests", "error_rates"]);
    let recent = activity["recent_requests"].as_array().unwrap();
    assert!(recent.iter().any(|r| r["session_id"] == session.as_str() && r["method"] == "initialize"), "{activity}");
    let path = "/api/observability/ws";
    let plain = api.expect(400, "GET", path, path, &token, None);
    assert!(plain.to_string().contains("WebSocket"), "{plain}");

    // The OpenAPI document describes both spellings.
    let (_, openapi) = api.call("GET", "", "/openapi.json", None, None);
    let paths = &openapi["paths"];
    for (path, methods) in [
        ("/api/targets/{id}/token", &["get", "put", "post", "delete"][..]),
        ("/api/targets/{id}/tokens/{scope}", &["put", "post", "delete"]),
        ("/api/targets/{id}/tokens/{scope}/{value}", &["put", "post", "delete"]),
        ("/api/targets/{id}/env/{scope}", &["get", "put", "post"]),
        ("/api/targets/{id}/env/{scope}/{value}", &["get", "put", "post", "delete"]),
        ("/api/users/{id}/recycle", &["post"]),
        ("/api/sessions/recycle", &["post"]),
        ("/api/targets/{id}/status", &["get"]),
        ("/api/logs", &["get"]),
        ("/api/logs/export", &["get"]),
    ] {
        for method in methods {
            assert!(paths[path][method].is_object(), "{method} {path} missing from the OpenAPI document");
        }
    }
    let schemas = &openapi["components"]["schemas"];
    for (schema, field) in [
        ("TokenBody", "group_name"),
        ("PolicyInput", "resource_pattern"),
        ("PolicyInput", "pattern"),
        ("EnvBody", "description"),
    ] {
        assert!(schemas[schema]["properties"][field].is_object(), "{schema}.{field} missing from the OpenAPI document");
    }

    let missing: Vec<_> = ORIGINAL
        .iter()
        .filter(|(method, path)| !api.called.contains(&(method.to_string(), path.to_string())))
        .collect();
    assert!(missing.is_empty(), "operations of the original not walked: {missing:?}");
    assert!(running.stop().success());
}

#[test]
fn this_projects_spellings_still_work_and_bad_input_names_the_field_in_either() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let port = free_port();
    let running = Running::start(&["up", "--data-dir", data.to_str().unwrap()], port, work.path(), &[]);
    let mut api = Api::new(&running.base);
    let admin = json!({"email": "admin@example.com", "password": "secure123"});
    let (_, registered) = api.call("POST", "", "/api/auth/register", None, Some(admin));
    let token = registered["token"].as_str().expect("registration answers a token too").to_string();
    let admin_id = registered["user"]["id"].as_str().unwrap().to_string();
    let created = api.expect(
        201,
        "POST",
        "",
        "/api/targets",
        &token,
        Some(json!({"name": "gh", "transport_type": "stdio", "command": "npx", "isolation_boundary": "per_user"})),
    );
    let t = created["id"].as_str().unwrap().to_string();

    // This project's spellings: POST with the scope value in the path, `pattern`, the flat
    // token answer.
    let stored =
        api.expect(201, "POST", "", &format!("/api/targets/{t}/tokens/role/dev"), &token, Some(json!({"token": "x"})));
    assert_eq!((stored["scope_type"].as_str(), stored["scope_value"].as_str()), (Some("role"), Some("dev")));
    api.expect(201, "POST", "", &format!("/api/targets/{t}/tokens/default"), &token, Some(json!({"token": "d"})));
    api.expect(201, "POST", "", &format!("/api/targets/{t}/token"), &token, Some(json!({"token": "mine"})));
    api.expect(
        200,
        "POST",
        "",
        &format!("/api/targets/{t}/env/user/{admin_id}"),
        &token,
        Some(json!({"key": "K", "value": "v"})),
    );
    let listed = api.expect(200, "GET", "", &format!("/api/targets/{t}/tokens"), &token, None);
    assert_eq!(listed["entries"].as_array().map(Vec::len), Some(3), "{listed}");
    let policy = api.expect(
        201,
        "POST",
        "",
        "/api/policies",
        &token,
        Some(json!({"name": "p", "target_id": t, "pattern": "read_*", "effect": "allow",
                    "subjects": [{"subject_type": "everyone", "subject_value": ""}]})),
    );
    assert_eq!((policy["pattern"].as_str(), policy["resource_pattern"].as_str()), (Some("read_*"), Some("read_*")));
    let explain = format!("/api/policies/explain?user_id={admin_id}&target_id={t}&kind=tool&name=read_file");
    // Explained on the snapshot data planes hold, which carries the policy a moment later.
    eventually(std::time::Duration::from_secs(10), "the policy allows read_file", || {
        api.expect(200, "GET", "", &explain, &token, None)["allowed"] == true
    });
    // The credential the admin's requests carry: their own token (a STDIO target per_user).
    assert_eq!(api.expect(200, "GET", "", &explain, &token, None)["credential_source"], "user");
    let created =
        api.expect(201, "POST", "", "/api/auth/tokens", &token, Some(json!({"name": "ci", "expires_in": "30d"})));
    assert!(created["id"].is_string() && created["prefix"].is_string(), "the flat answer too: {created}");
    deleted(&api.expect(200, "DELETE", "", &format!("/api/targets/{t}/env/user/{admin_id}/K"), &token, None));
    api.expect(200, "GET", "", &format!("/api/targets/{t}/instances"), &token, None);
    api.expect(200, "GET", "", &format!("/api/targets/{t}/status"), &token, None);

    // Another user's scope is refused alike whether that user exists or not.
    let (_, other) = api.call(
        "POST",
        "",
        "/api/auth/register",
        None,
        Some(json!({"email": "other@example.com", "password": "secure123"})),
    );
    let other_token = other["token"].as_str().unwrap().to_string();
    for user in [admin_id.clone(), uuid_like()] {
        let path = format!("/api/targets/{t}/env/user/{user}");
        let (status, answer) =
            api.call("PUT", "", &path, Some(&other_token), Some(json!([{"key": "K", "value": "v"}])));
        assert_eq!(status, 403, "{answer}");
        let (status, _) = api.call("GET", "", &path, Some(&other_token), None);
        assert_eq!(status, 403);
    }

    // Bad input: 400 naming the field, whichever spelling; nothing half-written.
    let cases = [
        ("POST", "/api/targets".to_string(), json!({"name": "x", "bogus": 1}), "bogus"),
        ("POST", "/api/targets".to_string(), json!({"name": 5}), "name"),
        ("POST", "/api/targets".to_string(), json!({"url": "https://example.com"}), "name"),
        ("POST", "/api/policies".to_string(), json!({"name": "q", "priority": 1}), "effect"),
        (
            "POST",
            "/api/policies".to_string(),
            json!({"name": "q", "effect": "allow", "resource_pattern": 3}),
            "resource_pattern",
        ),
        (
            "POST",
            "/api/policies".to_string(),
            json!({"name": "q", "effect": "allow", "pattern": "a", "resource_pattern": "b"}),
            "resource_pattern",
        ),
        (
            "POST",
            "/api/policies".to_string(),
            json!({"name": "q", "effect": "allow", "subjects": [{"subject_type": "everyone", "subject_value": "x"}]}),
            "everyone",
        ),
        ("PUT", format!("/api/targets/{t}/tokens/role"), json!({"token": "x"}), "role"),
        ("PUT", format!("/api/targets/{t}/tokens/group"), json!({"group_name": 7, "token": "x"}), "group_name"),
        ("PUT", format!("/api/targets/{t}/tokens/group"), json!({"role": "dev", "token": "x"}), "role"),
        ("POST", format!("/api/targets/{t}/tokens/role/dev"), json!({"tokn": "x"}), "tokn"),
        ("PUT", format!("/api/targets/{t}/env/default"), json!({"key": "A", "value": "b"}), "sequence"),
        ("POST", format!("/api/targets/{t}/env/default"), json!({"key": "A"}), "value"),
        ("POST", format!("/api/targets/{t}/env/default"), json!({"key": "A", "value": "b", "descr": "c"}), "descr"),
        ("PUT", format!("/api/users/{admin_id}"), json!({"groups": "ops"}), "groups"),
    ];
    for (method, path, body, field) in cases {
        let (status, answer) = api.call(method, "", &path, Some(&token), Some(body.clone()));
        assert_eq!(status, 400, "{method} {path} {body}: {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{method} {path} {body}: {message:?} does not name {field}");
    }
    // A bulk write is bounded: 257 entries are refused whole.
    let many: Vec<Value> = (0..257).map(|i| json!({"key": format!("K{i}"), "value": "v"})).collect();
    let (status, answer) =
        api.call("PUT", "", &format!("/api/targets/{t}/env/default"), Some(&token), Some(json!(many)));
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("1 to 256"), "{answer}");
    // A bulk write with one bad entry writes none of them.
    let bulk = json!([{"key": "GOOD", "value": "1"}, {"key": "bad key", "value": "2"}]);
    let (status, answer) = api.call("PUT", "", &format!("/api/targets/{t}/env/default"), Some(&token), Some(bulk));
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("[1] key"), "{answer}");
    let entries = api.expect(200, "GET", "", &format!("/api/targets/{t}/env/default"), &token, None);
    assert_eq!(entries, json!([]), "nothing half-written");
    let targets = api.expect(200, "GET", "", "/api/targets", &token, None);
    assert_eq!(targets.as_array().map(Vec::len), Some(1), "no target from a refused create");
    assert!(running.stop().success());
}

/// A user id no user has.
fn uuid_like() -> String {
    "7d444840-9dc0-11d1-b245-5ffdce74fad2".to_string()
}
