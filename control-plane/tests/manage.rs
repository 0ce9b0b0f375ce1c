//! The gRPC management API over real gRPC against a control plane on PostgreSQL: every
//! operation, refusals identical to REST's, field-level validation, health and reflection, and
//! declarative configuration (apply, diff, prune, dump, all-or-nothing, one recompile).

mod support;

use std::time::Duration;

use reflow_proto::admin::v1 as pb;
use reflow_proto::admin::v1::management_service_client::ManagementServiceClient;
use serde_json::{json, Value};
use support::*;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_types::StatusExt;

const CONVERGE: Duration = Duration::from_secs(10);

struct Api {
    client: ManagementServiceClient<Channel>,
}

impl Api {
    async fn connect(grpc: &str) -> Api {
        let channel = tonic::transport::Endpoint::from_shared(grpc.to_string()).unwrap().connect().await.unwrap();
        Api { client: ManagementServiceClient::new(channel) }
    }
}

fn authed<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

async fn rest(method: reqwest::Method, url: String, token: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

async fn register(api: &str, email: &str) -> (String, String) {
    let response = reqwest::Client::new()
        .post(format!("{api}/api/auth/register"))
        .json(&json!({"email": email, "password": "password123"}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    (body["token"].as_str().unwrap().to_string(), body["user"]["id"].as_str().unwrap().to_string())
}

fn field(status: &tonic::Status) -> String {
    status.get_details_bad_request().expect("BadRequest details").field_violations[0].field.clone()
}

#[tokio::test]
async fn every_operation_over_grpc_as_over_rest() {
    let db = postgres_db().await;
    let cp = spawn_control_plane(&db.url(), "cp-manage").await;
    let (admin, admin_id) = register(&cp.api, "admin@example.com").await;
    let (dev, dev_id) = register(&cp.api, "dev@example.com").await;
    let mut api = Api::connect(&cp.grpc).await;
    let c = &mut api.client;

    // Accounts and API tokens.
    let me = c.who_am_i(authed(&admin, pb::Empty {})).await.unwrap().into_inner();
    assert_eq!((me.id.as_str(), me.role.as_str()), (admin_id.as_str(), "admin"));
    let login = c
        .login(pb::Credentials { email: "dev@example.com".into(), password: "password123".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(login.user.unwrap().id, dev_id);
    assert!(!login.token.is_empty());
    let wrong = c.login(pb::Credentials { email: "dev@example.com".into(), password: "wrong-password".into() }).await;
    assert_eq!(wrong.unwrap_err().code(), Code::Unauthenticated);
    let created = c
        .create_api_token(authed(&dev, pb::CreateApiTokenRequest { name: "ci".into(), expires_in: Some("30d".into()) }))
        .await
        .unwrap()
        .into_inner();
    assert!(created.token.starts_with("rfl_"));
    let api_token = created.api_token.unwrap();
    assert!(api_token.expires_at.is_some());
    // The API token authenticates gRPC calls as well.
    let as_token = c.who_am_i(authed(&created.token, pb::Empty {})).await.unwrap().into_inner();
    assert_eq!(as_token.email, "dev@example.com");
    let tokens = c.list_api_tokens(authed(&dev, pb::Empty {})).await.unwrap().into_inner().tokens;
    assert_eq!(tokens.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["ci"]);
    c.delete_api_token(authed(&dev, pb::IdRequest { id: api_token.id.clone() })).await.unwrap();
    assert_eq!(c.who_am_i(authed(&created.token, pb::Empty {})).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(c.who_am_i(Request::new(pb::Empty {})).await.unwrap_err().code(), Code::Unauthenticated);

    // Users.
    let user = c
        .create_user(authed(
            &admin,
            pb::CreateUserRequest {
                email: "ops@example.com".into(),
                password: "password123".into(),
                role: Some("ops".into()),
                groups: vec!["oncall".into(), "platform".into()],
                active: Some(false),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((user.role.as_str(), user.active), ("ops", false));
    assert_eq!(user.groups, ["oncall", "platform"]);
    let updated = c
        .update_user(authed(
            &admin,
            pb::UpdateUserRequest {
                id: user.id.clone(),
                active: Some(true),
                clear: vec!["groups".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(updated.active && updated.groups.is_empty() && updated.role == "ops");
    let got = c.get_user(authed(&admin, pb::IdRequest { id: user.id.clone() })).await.unwrap().into_inner();
    assert_eq!(got, updated);
    let users = c.list_users(authed(&admin, pb::Empty {})).await.unwrap().into_inner().users;
    assert_eq!(users.len(), 3);
    let missing = c.get_user(authed(&admin, pb::IdRequest { id: uuid::Uuid::new_v4().to_string() })).await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    let duplicate = c
        .create_user(authed(
            &admin,
            pb::CreateUserRequest {
                email: "ops@example.com".into(),
                password: "password123".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    let short = c
        .create_user(authed(&admin, pb::CreateUserRequest { email: "x@example.com".into(), ..Default::default() }))
        .await
        .unwrap_err();
    assert_eq!((short.code(), field(&short).as_str()), (Code::InvalidArgument, "password"));
    let last_admin = c
        .update_user(authed(
            &admin,
            pb::UpdateUserRequest { id: admin_id.clone(), role: Some("user".into()), ..Default::default() },
        ))
        .await
        .unwrap_err();
    assert_eq!(last_admin.code(), Code::FailedPrecondition);

    // Targets.
    let target = c
        .create_target(authed(
            &admin,
            pb::TargetInput {
                name: Some("github".into()),
                url: Some("https://mcp.example.com/mcp".into()),
                env_keys: vec![pb::EnvKey { name: "REGION".into(), user_settable: true, ..Default::default() }],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((target.transport_type.as_str(), target.enabled), ("streamable-http", true));
    assert_eq!(target.env_keys[0].scopes, ["default", "role", "group", "user"]);
    let bad_url = c
        .create_target(authed(
            &admin,
            pb::TargetInput { name: Some("bad".into()), url: Some("ftp://x".into()), ..Default::default() },
        ))
        .await
        .unwrap_err();
    assert_eq!((bad_url.code(), field(&bad_url).as_str()), (Code::InvalidArgument, "url"));
    let bad_key = c
        .create_target(authed(
            &admin,
            pb::TargetInput {
                name: Some("bad".into()),
                url: Some("https://x.example.com".into()),
                env_keys: vec![pb::EnvKey { name: "1X".into(), ..Default::default() }],
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(field(&bad_key), "env_keys[0].name");
    let same_name = c
        .create_target(authed(
            &admin,
            pb::TargetInput {
                name: Some("github".into()),
                url: Some("https://x.example.com".into()),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(same_name.code(), Code::AlreadyExists);
    let changed = c
        .update_target(authed(
            &admin,
            pb::TargetInput {
                id: target.id.clone(),
                description: Some("code".into()),
                clear: vec!["env_keys".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(changed.description == "code" && changed.env_keys.is_empty() && changed.url == target.url);
    let bad_clear = c
        .update_target(authed(
            &admin,
            pb::TargetInput { id: target.id.clone(), clear: vec!["colour".into()], ..Default::default() },
        ))
        .await
        .unwrap_err();
    assert_eq!(field(&bad_clear), "clear");
    // Non-admins see the summary only, as over REST.
    let seen = c.get_target(authed(&dev, pb::IdRequest { id: target.id.clone() })).await.unwrap().into_inner();
    assert!(seen.url.is_none() && seen.name == "github");
    assert_eq!(c.list_targets(authed(&admin, pb::Empty {})).await.unwrap().into_inner().targets.len(), 1);

    // Policies and explain.
    let policy = c
        .create_policy(authed(
            &admin,
            pb::PolicyInput {
                name: Some("devs".into()),
                target_id: Some(target.id.clone()),
                resource_type: Some("tool".into()),
                pattern: Some("read_*".into()),
                effect: Some("allow".into()),
                priority: Some(5),
                subjects: vec![pb::SubjectInput { subject_type: "user".into(), subject_value: Some(dev_id.clone()) }],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((policy.effect.as_str(), policy.priority, policy.subjects.len()), ("allow", 5, 1));
    let subject = c
        .add_subject(authed(
            &admin,
            pb::AddSubjectRequest {
                id: policy.id.clone(),
                subject_type: "role".into(),
                subject_value: Some("ops".into()),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let policy = c.get_policy(authed(&admin, pb::IdRequest { id: policy.id.clone() })).await.unwrap().into_inner();
    assert_eq!(policy.subjects.len(), 2);
    c.remove_subject(authed(&admin, pb::RemoveSubjectRequest { id: policy.id.clone(), subject_id: subject.id }))
        .await
        .unwrap();
    let policy = c
        .update_policy(authed(
            &admin,
            pb::PolicyInput { id: policy.id.clone(), clear: vec!["pattern".into()], ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(policy.pattern.is_none() && policy.subjects.len() == 1);
    assert_eq!(c.list_policies(authed(&admin, pb::Empty {})).await.unwrap().into_inner().policies.len(), 1);
    eventually(CONVERGE, "the policy is compiled", || async {
        let request = pb::ExplainRequest {
            user_id: dev_id.clone(),
            target_id: target.id.clone(),
            kind: "tool".into(),
            name: "write_x".into(),
        };
        c.clone().explain(authed(&admin, request)).await.is_ok_and(|e| e.into_inner().allowed)
    })
    .await;

    // Credentials: tokens and env at every scope, values write-only.
    let token_request = |scope: &str, value: &str, token: &str| pb::ScopedTokenRequest {
        id: target.id.clone(),
        scope: scope.into(),
        value: value.into(),
        token: token.into(),
    };
    c.set_default_token(authed(&admin, pb::TokenRequest { id: target.id.clone(), token: "default-token".into() }))
        .await
        .unwrap();
    let stored =
        c.set_scoped_token(authed(&admin, token_request("role", "ops", "ops-token"))).await.unwrap().into_inner();
    assert_eq!((stored.scope_type.as_str(), stored.scope_value.as_str()), ("role", "ops"));
    c.set_own_token(authed(&dev, pb::TokenRequest { id: target.id.clone(), token: "dev-token".into() })).await.unwrap();
    assert!(
        c.get_own_token(authed(&dev, pb::IdRequest { id: target.id.clone() })).await.unwrap().into_inner().has_token
    );
    let tokens =
        c.list_tokens(authed(&admin, pb::RevealRequest { id: target.id.clone(), reveal: false })).await.unwrap();
    let tokens = tokens.into_inner();
    assert!(tokens.has_default && tokens.entries.len() == 3 && tokens.entries.iter().all(|e| e.value.is_none()));
    let revealed =
        c.list_tokens(authed(&admin, pb::RevealRequest { id: target.id.clone(), reveal: true })).await.unwrap();
    assert!(revealed.into_inner().entries.iter().any(|e| e.value.as_deref() == Some("ops-token")));
    let entry = |key: &str, value: &str| pb::EnvEntry { key: key.into(), value: value.into(), description: None };
    c.set_default_env(authed(&admin, pb::EnvRequest { id: target.id.clone(), entries: vec![entry("REGION", "eu")] }))
        .await
        .unwrap();
    let many = c
        .set_scoped_env(authed(
            &admin,
            pb::ScopedEnvRequest {
                id: target.id.clone(),
                scope: "group".into(),
                value: "oncall".into(),
                entries: vec![entry("REGION", "us"), entry("LEVEL", "debug")],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(many.entries.len(), 2);
    let items = c.get_default_env(authed(&admin, pb::IdRequest { id: target.id.clone() })).await.unwrap().into_inner();
    assert_eq!(items.items.iter().map(|i| i.key.as_str()).collect::<Vec<_>>(), ["REGION"]);
    let scope =
        |scope: &str, value: &str| pb::ScopeRequest { id: target.id.clone(), scope: scope.into(), value: value.into() };
    let group = c.get_scoped_env(authed(&admin, scope("group", "oncall"))).await.unwrap().into_inner();
    assert_eq!(group.items.len(), 2);
    assert_eq!(
        c.list_env(authed(&admin, pb::RevealRequest { id: target.id.clone(), reveal: false }))
            .await
            .unwrap()
            .into_inner()
            .entries
            .len(),
        3
    );
    let resolved = c
        .resolve_credentials(authed(
            &admin,
            pb::ResolveRequest { id: target.id.clone(), user_id: Some(dev_id.clone()), reveal: true },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.token.unwrap().value.as_deref(), Some("dev-token"));
    assert_eq!(resolved.env.iter().find(|e| e.key.as_deref() == Some("REGION")).unwrap().value.as_deref(), Some("eu"));
    let reserved = c
        .set_default_env(authed(
            &admin,
            pb::EnvRequest { id: target.id.clone(), entries: vec![entry("BASE_URL", "ftp://x")] },
        ))
        .await
        .unwrap_err();
    assert_eq!(reserved.code(), Code::InvalidArgument);
    c.delete_scoped_env_key(authed(
        &admin,
        pb::ScopedEnvKeyRequest {
            id: target.id.clone(),
            scope: "group".into(),
            value: "oncall".into(),
            key: "LEVEL".into(),
        },
    ))
    .await
    .unwrap();
    c.delete_scoped_env(authed(&admin, scope("group", "oncall"))).await.unwrap();
    c.delete_default_env_key(authed(&admin, pb::DefaultEnvKeyRequest { id: target.id.clone(), key: "REGION".into() }))
        .await
        .unwrap();
    c.delete_scoped_token(authed(&admin, scope("role", "ops"))).await.unwrap();
    c.delete_default_token(authed(&admin, pb::IdRequest { id: target.id.clone() })).await.unwrap();
    c.delete_own_token(authed(&dev, pb::IdRequest { id: target.id.clone() })).await.unwrap();
    assert_eq!(
        c.list_env(authed(&admin, pb::RevealRequest { id: target.id.clone(), reveal: false }))
            .await
            .unwrap()
            .into_inner()
            .entries
            .len(),
        0
    );

    // The fleet, instances, recycles and the audit query.
    let _dp = spawn_data_plane(&cp.grpc, DATA_PLANE_TOKEN, "dp-manage").await;
    eventually(CONVERGE, "the data plane acknowledges", || async {
        let status = c.clone().get_status(authed(&admin, pb::Empty {})).await.unwrap().into_inner();
        status.data_planes.iter().any(|d| d.connected && d.acked_version == status.current_version)
    })
    .await;
    let recycled = c.recycle_user(authed(&admin, pb::IdRequest { id: dev_id.clone() })).await.unwrap().into_inner();
    assert_eq!((recycled.user_id.as_str(), recycled.data_planes), (dev_id.as_str(), 1));
    let own = c.recycle_own_sessions(authed(&dev, pb::Empty {})).await.unwrap().into_inner();
    assert!(own.session_generation > recycled.session_generation);
    let restarted =
        c.restart_instances(authed(&admin, pb::IdRequest { id: target.id.clone() })).await.unwrap().into_inner();
    assert_eq!(restarted.restart_generation, 1);
    assert!(c
        .list_instances(authed(&admin, pb::IdRequest { id: target.id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .instances
        .is_empty());
    let target_status = c.get_target_status(authed(&admin, pb::IdRequest { id: target.id.clone() })).await.unwrap();
    assert_eq!(target_status.into_inner().target_name, "github");
    let logs =
        c.list_logs(authed(&admin, pb::ListLogsRequest { limit: Some(10), ..Default::default() })).await.unwrap();
    assert!(logs.into_inner().records.is_empty());
    let bad_limit =
        c.list_logs(authed(&admin, pb::ListLogsRequest { limit: Some(0), ..Default::default() })).await.unwrap_err();
    assert_eq!(bad_limit.code(), Code::InvalidArgument);

    // A non-admin is refused exactly where REST answers 403, with the same message.
    let refusals: Vec<(tonic::Status, reqwest::Method, String)> = vec![
        (c.list_users(authed(&dev, pb::Empty {})).await.unwrap_err(), reqwest::Method::GET, "/api/users".into()),
        (
            c.create_target(authed(&dev, pb::TargetInput { name: Some("x".into()), ..Default::default() }))
                .await
                .unwrap_err(),
            reqwest::Method::POST,
            "/api/targets".into(),
        ),
        (
            c.delete_policy(authed(&dev, pb::IdRequest { id: policy.id.clone() })).await.unwrap_err(),
            reqwest::Method::DELETE,
            format!("/api/policies/{}", policy.id),
        ),
        (c.get_status(authed(&dev, pb::Empty {})).await.unwrap_err(), reqwest::Method::GET, "/api/data-planes".into()),
        (
            c.get_user(authed(&dev, pb::IdRequest { id: admin_id.clone() })).await.unwrap_err(),
            reqwest::Method::GET,
            format!("/api/users/{admin_id}"),
        ),
        (
            c.apply(authed(&dev, pb::ApplyRequest::default())).await.unwrap_err(),
            reqwest::Method::GET,
            "/api/users".into(),
        ),
    ];
    for (status, method, path) in refusals {
        let body = (method == reqwest::Method::POST).then(|| json!({"name": "x"}));
        let (code, rest_body) = rest(method, format!("{}{path}", cp.api), &dev, body).await;
        assert_eq!(code, 403, "{path}");
        assert_eq!(status.code(), Code::PermissionDenied, "{path}");
        assert_eq!(status.message(), rest_body["error"].as_str().unwrap(), "{path}");
        assert_eq!(status.get_details_error_info().unwrap().reason, "forbidden");
    }

    // Deletes.
    c.delete_policy(authed(&admin, pb::IdRequest { id: policy.id.clone() })).await.unwrap();
    c.delete_target(authed(&admin, pb::IdRequest { id: target.id.clone() })).await.unwrap();
    c.delete_user(authed(&admin, pb::IdRequest { id: user.id.clone() })).await.unwrap();
    assert_eq!(c.get_target(authed(&admin, pb::IdRequest { id: target.id })).await.unwrap_err().code(), Code::NotFound);
    let unknown = c.get_user(authed(&admin, pb::IdRequest { id: String::new() })).await.unwrap_err();
    assert_eq!((unknown.code(), field(&unknown).as_str()), (Code::InvalidArgument, "id"));
}

#[tokio::test]
async fn health_and_reflection() {
    let db = postgres_db().await;
    let cp = spawn_control_plane(&db.url(), "cp-health").await;
    let channel = tonic::transport::Endpoint::from_shared(cp.grpc.clone()).unwrap().connect().await.unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    eventually(CONVERGE, "the management service reports serving", || async {
        let request = tonic_health::pb::HealthCheckRequest { service: "reflow.admin.v1.ManagementService".into() };
        health.clone().check(request).await.is_ok_and(|r| r.into_inner().status == 1)
    })
    .await;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else { panic!("no service list") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"reflow.admin.v1.ManagementService".to_string()), "{names:?}");
    assert!(names.contains(&"reflow.snapshot.v1.SnapshotService".to_string()), "{names:?}");
}

/// The same state gives the same snapshot version, whichever API wrote it, and it reaches the
/// data planes alike.
#[tokio::test]
async fn a_change_through_grpc_reaches_data_planes_as_one_through_rest() {
    let db = postgres_db().await;
    let cp = spawn_control_plane(&db.url(), "cp-same").await;
    let (admin, _) = register(&cp.api, "admin@example.com").await;
    let dp = spawn_data_plane(&cp.grpc, DATA_PLANE_TOKEN, "dp-same").await;
    let mut api = Api::connect(&cp.grpc).await;
    let target = api
        .client
        .create_target(authed(
            &admin,
            pb::TargetInput { name: Some("t".into()), url: Some("https://t.example.com".into()), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner();
    let settle = |hub: std::sync::Arc<reflow_control_plane::sync::SnapshotHub>, before: Option<String>| async move {
        eventually(CONVERGE, "a new snapshot", || async { hub.current().map(|s| s.version.clone()) != before }).await;
        // Past any compilation still catching up with an earlier write.
        tokio::time::sleep(Duration::from_millis(400)).await;
        hub.current().map(|s| s.version.clone()).unwrap()
    };
    let hub = cp.control_plane.hub().clone();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut versions = Vec::new();
    for (via_grpc, host) in [(true, "a"), (false, "b"), (false, "a"), (true, "b")] {
        let url = format!("https://{host}.example.com/mcp");
        let before = hub.current().map(|s| s.version.clone());
        if via_grpc {
            let input = pb::TargetInput { id: target.id.clone(), url: Some(url), ..Default::default() };
            api.client.update_target(authed(&admin, input)).await.unwrap();
        } else {
            let path = format!("{}/api/targets/{}", cp.api, target.id);
            let (code, _) = rest(reqwest::Method::PUT, path, &admin, Some(json!({"url": url}))).await;
            assert_eq!(code, 200);
        }
        let version = settle(hub.clone(), before).await;
        eventually(CONVERGE, "the data plane applies it", || async { dp.version().as_ref() == Some(&version) }).await;
        versions.push(version);
    }
    assert_eq!(versions[0], versions[2], "url a via gRPC and via REST");
    assert_eq!(versions[1], versions[3], "url b via REST and via gRPC");
    assert_ne!(versions[0], versions[1]);
}

fn published(cp: &TestControlPlane) -> u64 {
    let text = cp.control_plane.registry().prometheus();
    text.lines()
        .find(|l| l.starts_with("reflow_snapshot_compiles_total{") && l.contains("result=\"published\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn document(owner: &str, targets: usize, with_policies: bool) -> pb::Document {
    let mut document = pb::Document { owner: owner.into(), ..Default::default() };
    for i in 0..targets {
        document.targets.push(pb::DeclaredTarget {
            name: format!("{owner}-t{i}"),
            url: Some(format!("https://t{i}.example.com/mcp")),
            env_keys: vec![pb::EnvKey { name: "REGION".into(), ..Default::default() }],
            ..Default::default()
        });
        if with_policies {
            document.policies.push(pb::DeclaredPolicy {
                name: format!("{owner}-p{i}"),
                target: format!("{owner}-t{i}"),
                effect: "allow".into(),
                resource_type: Some("tool".into()),
                subjects: vec![
                    pb::DeclaredSubject { r#type: "role".into(), value: "dev".into() },
                    pb::DeclaredSubject { r#type: "user".into(), value: "dev@example.com".into() },
                ],
                ..Default::default()
            });
        }
        document.credentials.push(pb::DeclaredCredential {
            target: format!("{owner}-t{i}"),
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

fn count(answer: &pb::ApplyResponse, action: &str) -> usize {
    answer.changes.iter().filter(|c| c.action == action).count()
}

async fn apply(api: &mut Api, token: &str, document: pb::Document, prune: bool, dry_run: bool) -> pb::ApplyResponse {
    let request = pb::ApplyRequest { document: Some(document), prune, dry_run };
    api.client.apply(authed(token, request)).await.unwrap().into_inner()
}

#[tokio::test]
async fn declarative_configuration_applies_whole_and_once() {
    let db = postgres_db().await;
    let cp = spawn_control_plane(&db.url(), "cp-declare").await;
    let (admin, _) = register(&cp.api, "admin@example.com").await;
    let (_, dev_id) = register(&cp.api, "dev@example.com").await;
    let mut api = Api::connect(&cp.grpc).await;
    let hub = cp.control_plane.hub().clone();
    eventually(CONVERGE, "the first snapshots", || async { hub.current().is_some() }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 501 resources: 167 targets, 167 policies, 167 credentials, one user.
    let doc = document("team-a", 167, true);
    let compiles = published(&cp);
    let first = apply(&mut api, &admin, doc.clone(), false, false).await;
    assert!(first.applied);
    assert_eq!((count(&first, "create"), count(&first, "update")), (501, 1));
    eventually(CONVERGE, "the apply is compiled", || async { published(&cp) > compiles }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(published(&cp), compiles + 1, "one recompile for the whole apply");
    assert_eq!(first.snapshot_version, hub.current().map(|s| s.version.clone()));
    let (_, user) = rest(reqwest::Method::GET, format!("{}/api/users/{dev_id}", cp.api), &admin, None).await;
    assert_eq!((user["role"].as_str(), user["groups"][0].as_str()), (Some("dev"), Some("oncall")));

    // Again: nothing changes, and it says so.
    let second = apply(&mut api, &admin, doc.clone(), false, false).await;
    assert!(!second.applied);
    assert_eq!(count(&second, "unchanged"), 502);

    // A hand edit through REST shows as exactly that edit, and apply undoes it.
    let (_, targets) = rest(reqwest::Method::GET, format!("{}/api/targets", cp.api), &admin, None).await;
    let t5 = targets.as_array().unwrap().iter().find(|t| t["name"] == "team-a-t5").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("{}/api/targets/{t5}", cp.api);
    assert_eq!(rest(reqwest::Method::PUT, url.clone(), &admin, Some(json!({"description": "by hand"}))).await.0, 200);
    let diff = apply(&mut api, &admin, doc.clone(), false, true).await;
    let edits: Vec<&pb::Change> = diff.changes.iter().filter(|c| c.action != "unchanged").collect();
    assert_eq!(edits.len(), 1);
    assert_eq!(
        (edits[0].kind.as_str(), edits[0].name.as_str(), edits[0].fields.clone()),
        ("target", "team-a-t5", vec!["description".to_string()])
    );
    assert!(!diff.applied);
    assert_eq!(
        rest(reqwest::Method::GET, url.clone(), &admin, None).await.1["description"],
        "by hand",
        "a dry run writes nothing"
    );
    let env_url = format!("{}/api/targets/{t5}/env/group/oncall", cp.api);
    assert_eq!(
        rest(reqwest::Method::PUT, env_url, &admin, Some(json!([{"key": "REGION", "value": "moved"}]))).await.0,
        200
    );
    let diff = apply(&mut api, &admin, doc.clone(), false, true).await;
    let edits: Vec<String> = diff.changes.iter().filter(|c| c.action != "unchanged").map(|c| c.name.clone()).collect();
    assert_eq!(edits, ["team-a-t5", "team-a-t5/env/group/oncall/REGION"]);
    assert!(apply(&mut api, &admin, doc.clone(), false, false).await.applied);
    assert_eq!(rest(reqwest::Method::GET, url, &admin, None).await.1["description"], "");

    // A file with one bad resource changes nothing at all.
    let before = cp.control_plane.hub().current().map(|s| s.version.clone());
    let mut bad = document("team-a", 200, true);
    bad.targets[150].url = Some("ftp://nope".into());
    let refused =
        api.client.apply(authed(&admin, pb::ApplyRequest { document: Some(bad), prune: false, dry_run: false })).await;
    let refused = refused.unwrap_err();
    assert_eq!((refused.code(), field(&refused).as_str()), (Code::InvalidArgument, "targets[150].url"));
    let mut bad = document("team-a", 200, true);
    bad.policies[199].subjects[1].value = "nobody@example.com".into();
    let refused =
        api.client.apply(authed(&admin, pb::ApplyRequest { document: Some(bad), prune: false, dry_run: false })).await;
    assert_eq!(field(&refused.unwrap_err()), "policies[199].subjects[1].value");
    let (_, targets) = rest(reqwest::Method::GET, format!("{}/api/targets", cp.api), &admin, None).await;
    assert_eq!(targets.as_array().unwrap().len(), 167);
    assert_eq!(cp.control_plane.hub().current().map(|s| s.version.clone()), before);

    // sync --prune removes only what the owner label marks: another team's and hand-made
    // resources stay.
    let other = document("team-b", 3, false);
    assert!(apply(&mut api, &admin, other.clone(), false, false).await.applied);
    let hand = json!({"name": "hand-made", "url": "https://hand.example.com"});
    assert_eq!(rest(reqwest::Method::POST, format!("{}/api/targets", cp.api), &admin, Some(hand)).await.0, 201);
    let smaller = document("team-a", 160, true);
    let pruned = apply(&mut api, &admin, smaller.clone(), true, false).await;
    assert!(pruned.applied);
    assert_eq!(count(&pruned, "delete"), 21, "7 targets with their policies and credentials");
    assert!(pruned
        .changes
        .iter()
        .filter(|c| c.action == "delete")
        .all(|c| c.name.starts_with("team-a-t16") || c.name.starts_with("team-a-p16")));
    let (_, targets) = rest(reqwest::Method::GET, format!("{}/api/targets", cp.api), &admin, None).await;
    let names: Vec<&str> = targets.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 160 + 3 + 1);
    assert!(names.contains(&"hand-made") && names.contains(&"team-b-t2") && !names.contains(&"team-a-t165"));
    let (_, policies) = rest(reqwest::Method::GET, format!("{}/api/policies", cp.api), &admin, None).await;
    assert_eq!(policies.as_array().unwrap().len(), 160);
    // Pruning needs an owner; a plain apply never deletes.
    let mut unowned = smaller.clone();
    unowned.owner.clear();
    let refused = api
        .client
        .apply(authed(&admin, pb::ApplyRequest { document: Some(unowned), prune: true, dry_run: false }))
        .await;
    assert_eq!(field(&refused.unwrap_err()), "owner");
    assert_eq!(count(&apply(&mut api, &admin, document("team-a", 1, true), false, true).await, "delete"), 0);

    // dump, then apply of the dump, changes nothing; the dump carries no value.
    let dump = api.client.dump(authed(&admin, pb::Empty {})).await.unwrap().into_inner();
    assert_eq!(dump.targets.len(), 164);
    assert!(dump.credentials.iter().all(|c| c.value.is_none()) && dump.credentials.len() == 163);
    assert_eq!(dump.targets.iter().find(|t| t.name == "team-b-t0").unwrap().owner.as_deref(), Some("team-b"));
    assert!(dump.targets.iter().find(|t| t.name == "hand-made").unwrap().owner.is_none());
    let again = apply(&mut api, &admin, dump, false, false).await;
    assert!(!again.applied);
    assert!(
        again.changes.iter().all(|c| c.action == "unchanged"),
        "{:?}",
        again.changes.iter().find(|c| c.action != "unchanged")
    );
}
