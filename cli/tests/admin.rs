//! `reflow admin` as a script runs it, against `reflow up` over gRPC: the login kept owner-only,
//! resources by verb, declarative files with their exit codes (validate, diff, apply, dump),
//! refusals and an unreachable server as exit 2 with a message naming the problem.

mod support;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};
use support::*;

/// `reflow admin ARGS` with `config` as its config directory, `stdin` fed to it.
fn admin(config: &Path, grpc: u16, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    let server = format!("http://127.0.0.1:{grpc}");
    let mut command = Command::new(env!("CARGO_BIN_EXE_reflow"));
    command
        .arg("admin")
        .args(["--server", &server])
        .args(args)
        .env("XDG_CONFIG_HOME", config)
        .env_remove("REFLOW_TOKEN")
        .env_remove("REFLOW_SERVER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("run reflow admin");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited")
}

fn text(output: &Output) -> String {
    format!("stdout: {}\nstderr: {}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn json_out(output: &Output) -> Value {
    assert_eq!(code(output), 0, "{}", text(output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(output)))
}

fn register(base: &str, email: &str) {
    let response = reqwest::blocking::Client::new()
        .post(format!("{base}/api/auth/register"))
        .json(&json!({"email": email, "password": "secure123"}))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 201, "register {email}");
}

const CONFIG: &str = "\
owner: platform
targets:
  - name: github
    url: https://github-mcp.example.com/mcp
    env_keys:
      - name: GITHUB_TOKEN
        description: a token for the GitHub API
  - name: search
    url: https://search.example.com/mcp
policies:
  - name: developers-use-github
    target: github
    effect: allow
    resource_type: tool
    subjects:
      - type: role
        value: user
credentials:
  - target: github
    kind: env
    scope: default
    key: GITHUB_TOKEN
    value_from:
      env: GITHUB_TOKEN_FOR_TEST
";

#[test]
fn reflow_admin_manages_reflow_up_from_a_script() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let port = free_port();
    let grpc = free_port();
    let grpc_arg = grpc.to_string();
    let running = Running::start(
        &["up", "--data-dir", data.to_str().unwrap()],
        port,
        work.path(),
        &[("REFLOW_GRPC_PORT", &grpc_arg)],
    );
    register(&running.base, "admin@example.com");
    register(&running.base, "dev@example.com");
    let config = work.path().join("config");

    // Nothing stored yet: refused before any call, exit 2.
    let refused = admin(&config, grpc, &["users", "list"], "", &[]);
    assert_eq!(code(&refused), 2, "{}", text(&refused));

    // login reads the password from stdin and keeps the token owner-only.
    let wrong = admin(&config, grpc, &["login", "--email", "admin@example.com"], "wrong\n", &[]);
    assert_eq!(code(&wrong), 2, "{}", text(&wrong));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("Unauthenticated"), "{}", text(&wrong));
    let logged_in = admin(&config, grpc, &["login", "--email", "admin@example.com"], "secure123\n", &[]);
    assert_eq!(code(&logged_in), 0, "{}", text(&logged_in));
    let stored = config.join("reflow").join("admin.json");
    assert_eq!(mode(&stored), 0o600);
    assert_eq!(mode(&config.join("reflow")), 0o700);
    let kept: Value = serde_json::from_slice(&file_bytes(&stored)).unwrap();
    assert!(kept["token"].as_str().is_some_and(|t| !t.is_empty()));

    // Resources by verb, with the stored login.
    let users = json_out(&admin(&config, grpc, &["-o", "json", "users", "list"], "", &[]));
    let emails: Vec<&str> = users["users"].as_array().unwrap().iter().filter_map(|u| u["email"].as_str()).collect();
    assert_eq!(emails.len(), 2, "{users}");
    let created = json_out(&admin(
        &config,
        grpc,
        &["-o", "json", "targets", "create", "--set", "name=hand-made", "--set", "url=https://hand.example.com/mcp"],
        "",
        &[],
    ));
    assert_eq!(created["name"], "hand-made");
    let bad = admin(&config, grpc, &["targets", "create", "--set", "name=bad", "--set", "port=eighty"], "", &[]);
    assert_eq!(code(&bad), 2, "{}", text(&bad));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("port"), "the message names the field: {}", text(&bad));
    let table = admin(&config, grpc, &["targets", "list"], "", &[]);
    assert_eq!(code(&table), 0, "{}", text(&table));
    assert!(String::from_utf8_lossy(&table.stdout).contains("hand-made"), "{}", text(&table));
    let yaml = admin(&config, grpc, &["-o", "yaml", "targets", "get", "hand-made"], "", &[]);
    assert!(String::from_utf8_lossy(&yaml.stdout).contains("name: hand-made"), "{}", text(&yaml));
    let status = admin(&config, grpc, &["status"], "", &[]);
    assert_eq!(code(&status), 0, "{}", text(&status));
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("SYNCED"),
        "reflow up's own data plane: {}",
        text(&status)
    );

    // Declarative files: a directory validated offline, diffed, applied, then unchanged.
    let files = work.path().join("gateway");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("gateway.yaml"), CONFIG).unwrap();
    let files_arg = files.to_str().unwrap();
    let valid = admin(&config, 1, &["validate", files_arg], "", &[]);
    assert_eq!(code(&valid), 0, "validate needs no server: {}", text(&valid));
    let secret = [("GITHUB_TOKEN_FOR_TEST", "ghp-from-the-environment")];
    let missing = admin(&config, grpc, &["diff", files_arg], "", &[]);
    assert_eq!(code(&missing), 2, "an unset variable is an error: {}", text(&missing));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("GITHUB_TOKEN_FOR_TEST"), "{}", text(&missing));
    let diff = admin(&config, grpc, &["diff", files_arg], "", &secret);
    assert_eq!(code(&diff), 1, "changes to make: {}", text(&diff));
    let dry = admin(&config, grpc, &["apply", "--dry-run", files_arg], "", &secret);
    assert_eq!(code(&dry), 0, "{}", text(&dry));
    assert_eq!(code(&admin(&config, grpc, &["diff", files_arg], "", &secret)), 1, "a dry run writes nothing");
    let applied = admin(&config, grpc, &["apply", files_arg], "", &secret);
    assert_eq!(code(&applied), 0, "{}", text(&applied));
    assert!(String::from_utf8_lossy(&applied.stderr).contains("applied in one transaction"), "{}", text(&applied));
    let again = admin(&config, grpc, &["apply", files_arg], "", &secret);
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to change"), "{}", text(&again));
    assert_eq!(code(&admin(&config, grpc, &["diff", files_arg], "", &secret)), 0, "applied, nothing differs");
    let targets = json_out(&admin(&config, grpc, &["-o", "json", "targets", "list"], "", &[]));
    let github = targets["targets"].as_array().unwrap().iter().find(|t| t["name"] == "github").unwrap().clone();

    // A directory of 500 resources (50 files of 5 targets and 5 policies): applied in one
    // transaction, then again with nothing to change.
    let many = work.path().join("many");
    std::fs::create_dir(&many).unwrap();
    for file in 0..50 {
        let mut text = String::from("owner: fleet\ntargets:\n");
        for i in 0..5 {
            text.push_str(&format!("  - name: fleet-{file}-{i}\n    url: https://fleet-{file}-{i}.example.com/mcp\n"));
        }
        text.push_str("policies:\n");
        for i in 0..5 {
            text.push_str(&format!(
                "  - name: fleet-{file}-{i}\n    target: fleet-{file}-{i}\n    effect: allow\n    subjects:\n      - type: everyone\n"
            ));
        }
        std::fs::write(many.join(format!("part-{file:02}.yaml")), text).unwrap();
    }
    let many_arg = many.to_str().unwrap();
    let first = admin(&config, grpc, &["apply", many_arg], "", &[]);
    assert_eq!(code(&first), 0, "{}", text(&first));
    assert!(String::from_utf8_lossy(&first.stdout).contains("500 to create"), "{}", text(&first));
    let second = admin(&config, grpc, &["apply", many_arg], "", &[]);
    assert_eq!(code(&second), 0, "{}", text(&second));
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("0 to create, 0 to update, 0 to delete, 500 unchanged"),
        "{}",
        text(&second)
    );
    assert!(String::from_utf8_lossy(&second.stderr).contains("nothing to change"), "{}", text(&second));

    // A hand edit through REST shows in diff as exactly that field.
    let jwt = login(&running.base, "admin@example.com", "secure123");
    let response = reqwest::blocking::Client::new()
        .put(format!("{}/api/targets/{}", running.base, github["id"].as_str().unwrap()))
        .bearer_auth(&jwt)
        .json(&json!({"description": "edited by hand"}))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let edited = admin(&config, grpc, &["-o", "json", "diff", files_arg], "", &secret);
    assert_eq!(code(&edited), 1, "{}", text(&edited));
    let changes: Value = serde_json::from_slice(&edited.stdout).unwrap();
    let changes: Vec<&Value> =
        changes["changes"].as_array().unwrap().iter().filter(|c| c["action"] != "unchanged").collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["name"], "github");
    assert_eq!(changes[0]["fields"], json!(["description"]));

    // dump, then diff of the dump: nothing; the dump holds no credential value.
    let dump = admin(&config, grpc, &["dump"], "", &[]);
    assert_eq!(code(&dump), 0, "{}", text(&dump));
    let dumped = String::from_utf8_lossy(&dump.stdout).to_string();
    assert!(!dumped.contains("ghp-from-the-environment") && dumped.contains("GITHUB_TOKEN"), "{dumped}");
    let dump_file = work.path().join("dump.yaml");
    std::fs::write(&dump_file, &dumped).unwrap();
    let round = admin(&config, grpc, &["diff", dump_file.to_str().unwrap()], "", &[]);
    assert_eq!(code(&round), 0, "apply of a dump changes nothing: {}", text(&round));

    // A file with one bad resource: validate names it, apply changes nothing.
    let broken = work.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(
        broken.join("a.yaml"),
        "owner: platform\ntargets:\n  - name: fresh\n    url: https://fresh.example.com/mcp\n",
    )
    .unwrap();
    std::fs::write(broken.join("b.yaml"), "policies:\n  - name: p\n    target: fresh\n    effect: permit\n").unwrap();
    let invalid = admin(&config, 1, &["validate", broken.to_str().unwrap()], "", &[]);
    assert_eq!(code(&invalid), 2, "{}", text(&invalid));
    assert!(String::from_utf8_lossy(&invalid.stderr).contains("effect"), "names the field: {}", text(&invalid));
    let refused = admin(&config, grpc, &["apply", broken.to_str().unwrap()], "", &[]);
    assert_eq!(code(&refused), 2, "{}", text(&refused));
    let names = json_out(&admin(&config, grpc, &["-o", "json", "targets", "list"], "", &[]));
    assert!(names["targets"].as_array().unwrap().iter().all(|t| t["name"] != "fresh"), "nothing of it landed: {names}");
    let plain_value =
        "credentials:\n  - target: fresh\n    kind: env\n    scope: default\n    key: K\n    value: plain\n";
    std::fs::write(broken.join("c.yaml"), plain_value).unwrap();
    let plain = admin(&config, 1, &["validate", broken.to_str().unwrap()], "", &[]);
    assert!(String::from_utf8_lossy(&plain.stderr).contains("values never go in the file"), "{}", text(&plain));

    // A non-admin is refused with the same words REST uses, exit 2.
    let dev_config = work.path().join("dev-config");
    let dev = admin(&dev_config, grpc, &["login", "--email", "dev@example.com"], "secure123\n", &[]);
    assert_eq!(code(&dev), 0, "{}", text(&dev));
    let denied = admin(&dev_config, grpc, &["users", "list"], "", &[]);
    assert_eq!(code(&denied), 2, "{}", text(&denied));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("PermissionDenied"), "{}", text(&denied));
    let denied = admin(&dev_config, grpc, &["apply", files_arg], "", &secret);
    assert_eq!(code(&denied), 2, "{}", text(&denied));

    // logout forgets the token; a stopped server is exit 2 naming the address.
    assert_eq!(code(&admin(&config, grpc, &["logout"], "", &[])), 0);
    let kept: Value = serde_json::from_slice(&file_bytes(&stored)).unwrap();
    assert!(kept["token"].is_null(), "{kept}");
    drop(running);
    let gone = admin(&dev_config, grpc, &["users", "list"], "", &[]);
    assert_eq!(code(&gone), 2, "{}", text(&gone));
    assert!(String::from_utf8_lossy(&gone.stderr).contains(&format!("127.0.0.1:{grpc}")), "{}", text(&gone));
}
