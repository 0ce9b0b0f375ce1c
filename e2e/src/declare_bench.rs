//! Declarative apply benchmark: 1,000 resources in one `Apply`, against the same resources
//! written one call at a time through the management API, on one control plane.

use std::time::{Duration, Instant};

use anyhow::Context;
use reflow_proto::admin::v1 as pb;
use reflow_proto::admin::v1::management_service_client::ManagementServiceClient;
use serde_json::{json, Value};

use crate::snapshot::BenchControlPlane;

/// `targets` targets, each with one policy and one group-scoped env value (3 × `targets`
/// resources, plus one user): applied in one call, applied again (nothing to change), then the
/// same shape under other names written call by call. Reports wall time and the snapshots
/// compiled and published for each.
pub async fn apply_resources(targets: usize, database_url: Option<&str>) -> anyhow::Result<Value> {
    let bench = BenchControlPlane::start(database_url).await?;
    let (control_plane, grpc, base) = (&bench.control_plane, bench.grpc.clone(), &bench.base);
    let http = reqwest::Client::new();
    for email in ["bench@example.com", "dev@example.com"] {
        let response = http
            .post(format!("{base}/api/auth/register"))
            .json(&json!({"email": email, "password": "benchmark-password"}))
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "register {email}: {}", response.status());
    }
    let login: Value = http
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"email": "bench@example.com", "password": "benchmark-password"}))
        .send()
        .await?
        .json()
        .await?;
    let token = login["token"].as_str().context("login")?.to_string();
    let channel = tonic::transport::Endpoint::from_shared(grpc)?.connect().await?;
    let mut client = ManagementServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let published = || published_compiles(control_plane);
    let settle = || tokio::time::sleep(Duration::from_millis(500));
    settle().await;

    let document = document("bench", targets);
    let resources = document.targets.len() + document.policies.len() + document.credentials.len() + 1;
    let before = published();
    let started = Instant::now();
    let first = client
        .apply(authed(&token, pb::ApplyRequest { document: Some(document.clone()), prune: false, dry_run: false }))
        .await?
        .into_inner();
    let apply_ms = started.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(first.applied, "the first apply wrote");
    settle().await;
    let apply_compiles = published() - before;

    let before = published();
    let started = Instant::now();
    let again = client
        .apply(authed(&token, pb::ApplyRequest { document: Some(document), prune: false, dry_run: false }))
        .await?
        .into_inner();
    let again_ms = started.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(!again.applied, "the second apply changed nothing");
    settle().await;
    let again_compiles = published() - before;

    // The same shape, one call per resource.
    let before = published();
    let started = Instant::now();
    for i in 0..targets {
        let target = client
            .create_target(authed(
                &token,
                pb::TargetInput {
                    name: Some(format!("single-t{i}")),
                    url: Some(format!("https://s{i}.example.com/mcp")),
                    env_keys: vec![pb::EnvKey { name: "REGION".into(), ..Default::default() }],
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        client
            .create_policy(authed(
                &token,
                pb::PolicyInput {
                    name: Some(format!("single-p{i}")),
                    target_id: Some(target.id.clone()),
                    resource_type: Some("tool".into()),
                    effect: Some("allow".into()),
                    subjects: vec![pb::SubjectInput { subject_type: "role".into(), subject_value: Some("dev".into()) }],
                    ..Default::default()
                },
            ))
            .await?;
        client
            .set_scoped_env(authed(
                &token,
                pb::ScopedEnvRequest {
                    id: target.id,
                    scope: "group".into(),
                    value: "oncall".into(),
                    entries: vec![pb::EnvEntry {
                        key: "REGION".into(),
                        value: format!("region-{i}"),
                        description: None,
                    }],
                },
            ))
            .await?;
    }
    let single_ms = started.elapsed().as_secs_f64() * 1000.0;
    settle().await;
    let single_compiles = published() - before;

    let backend = bench.backend();
    bench.finish().await?;
    Ok(json!({
        "scenario": "declarative_apply",
        "backend": backend,
        "resources": resources,
        "apply_ms": apply_ms,
        "apply_compiles": apply_compiles,
        "reapply_ms": again_ms,
        "reapply_compiles": again_compiles,
        "one_by_one_ms": single_ms,
        "one_by_one_calls": targets * 3,
        "one_by_one_compiles": single_compiles,
        "one_by_one_vs_apply": single_ms / apply_ms,
    }))
}

fn document(owner: &str, targets: usize) -> pb::Document {
    let mut document = pb::Document { owner: owner.into(), ..Default::default() };
    for i in 0..targets {
        let target = format!("{owner}-t{i}");
        document.targets.push(pb::DeclaredTarget {
            name: target.clone(),
            url: Some(format!("https://t{i}.example.com/mcp")),
            env_keys: vec![pb::EnvKey { name: "REGION".into(), ..Default::default() }],
            ..Default::default()
        });
        document.policies.push(pb::DeclaredPolicy {
            name: format!("{owner}-p{i}"),
            target: target.clone(),
            effect: "allow".into(),
            resource_type: Some("tool".into()),
            subjects: vec![pb::DeclaredSubject { r#type: "role".into(), value: "dev".into() }],
            ..Default::default()
        });
        document.credentials.push(pb::DeclaredCredential {
            target,
            kind: "env".into(),
            scope: "group".into(),
            scope_value: "oncall".into(),
            key: "REGION".into(),
            value: Some(format!("region-{i}")),
            ..Default::default()
        });
    }
    document.users.push(pb::DeclaredUser {
        email: "dev@example.com".into(),
        role: "dev".into(),
        groups: vec!["oncall".into()],
    });
    document
}

fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("a header value"));
    request
}

/// `reflow_snapshot_compiles_total{result="published"}` of `control_plane`.
fn published_compiles(control_plane: &reflow_control_plane::ControlPlane) -> u64 {
    control_plane
        .registry()
        .prometheus()
        .lines()
        .find(|l| l.starts_with("reflow_snapshot_compiles_total{") && l.contains("result=\"published\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
