//! The store suite: every test runs on SQLite and on PostgreSQL.

mod support;

use reflow_common::credentials::{Isolation, Scope};
use reflow_control_plane::store::*;
use support::store;
use uuid::Uuid;

fn new_user(email: &str) -> NewUser {
    NewUser {
        email: email.into(),
        password_hash: "hash".into(),
        role: DEFAULT_ROLE.into(),
        groups: vec![],
        active: true,
    }
}

fn http_target(name: &str) -> TargetSpec {
    TargetSpec {
        name: name.into(),
        description: String::new(),
        transport_type: TransportType::StreamableHttp,
        url: Some("http://127.0.0.1:9/mcp".into()),
        command: None,
        args: vec![],
        image: None,
        port: None,
        health_path: None,
        statefulness: Statefulness::Stateless,
        isolation_boundary: Isolation::Shared,
        auth_type: AuthType::Bearer,
        auth_header_name: None,
        enabled: true,
        env_keys: vec![],
        audit_arguments: false,
    }
}

fn secret(target_id: Uuid, kind: SecretKind, scope: Scope, name: &str, bytes: &[u8]) -> SecretEntry {
    SecretEntry {
        target_id,
        kind,
        scope,
        name: name.into(),
        ciphertext: bytes.to_vec(),
        key_version: 1,
        description: String::new(),
        updated_at: now(),
    }
}

fn policy(name: &str, target_id: Option<Uuid>, priority: i32) -> PolicySpec {
    PolicySpec {
        name: name.into(),
        description: String::new(),
        target_id,
        resource_type: ResourceType::Tool,
        pattern: Some("read_*".into()),
        effect: Effect::Allow,
        priority,
        enabled: true,
    }
}

fn role(value: &str) -> SubjectSpec {
    SubjectSpec { subject_type: SubjectType::Role, subject_value: value.into() }
}

async fn first_registered_user_is_admin(backend: &str) {
    let (store, _db) = store(backend).await;
    let first = store.register_user(new_user("a@example.com")).await.unwrap();
    let second = store.register_user(new_user("b@example.com")).await.unwrap();
    assert_eq!(first.role, ADMIN_ROLE);
    assert_eq!(second.role, DEFAULT_ROLE);
    assert!(matches!(store.register_user(new_user("a@example.com")).await, Err(StoreError::Conflict(_))));
    assert_eq!(store.list_users().await.unwrap().len(), 2);
}

async fn concurrent_first_registrations_make_one_admin(backend: &str) {
    let (store, _db) = store(backend).await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.register_user(new_user(&format!("u{i}@example.com"))).await.unwrap() })
        })
        .collect();
    let mut admins = 0;
    for task in tasks {
        if task.await.unwrap().role == ADMIN_ROLE {
            admins += 1;
        }
    }
    assert_eq!(admins, 1);
}

async fn users_round_trip(backend: &str) {
    let (store, _db) = store(backend).await;
    let mut spec = new_user("dev@example.com");
    spec.groups = vec!["zeta".into(), "alpha".into(), "alpha".into()];
    spec.role = "developer".into();
    let user = store.create_user(spec).await.unwrap();
    assert_eq!(user.groups, vec!["alpha", "zeta"]);
    assert_eq!(store.get_user(user.id).await.unwrap().unwrap(), user);
    let (found, hash) = store.user_by_email("dev@example.com").await.unwrap().unwrap();
    assert_eq!((found, hash.as_str()), (user.clone(), "hash"));
    assert!(store.get_user(Uuid::new_v4()).await.unwrap().is_none());

    let updated = store
        .update_user(
            user.id,
            UserUpdate { groups: Some(vec!["ops".into()]), active: Some(false), ..Default::default() },
        )
        .await
        .unwrap();
    assert_eq!(updated.groups, vec!["ops"]);
    assert!(!updated.active);
    assert_eq!(updated.role, "developer");
    assert!(updated.updated_at >= user.updated_at);
    assert!(matches!(store.update_user(Uuid::new_v4(), UserUpdate::default()).await, Err(StoreError::NotFound(_))));
}

async fn last_admin_is_kept(backend: &str) {
    let (store, _db) = store(backend).await;
    let admin = store.register_user(new_user("admin@example.com")).await.unwrap();
    let target = store.create_target(http_target("t")).await.unwrap();
    let scope = Scope::User(admin.id.to_string());
    store.put_secret(secret(target.id, SecretKind::Env, scope.clone(), "K", b"sealed")).await.unwrap();

    let demote = UserUpdate { role: Some("user".into()), ..Default::default() };
    assert!(matches!(store.update_user(admin.id, demote.clone()).await, Err(StoreError::Conflict(_))));
    let deactivate = UserUpdate { active: Some(false), ..Default::default() };
    assert!(matches!(store.update_user(admin.id, deactivate).await, Err(StoreError::Conflict(_))));
    // Deleting fails as a whole: the user's secrets, removed earlier in the same
    // transaction, are still there.
    assert!(matches!(store.delete_user(admin.id).await, Err(StoreError::Conflict(_))));
    assert_eq!(store.get_user(admin.id).await.unwrap().unwrap().role, ADMIN_ROLE);
    assert_eq!(store.list_secrets(target.id, None).await.unwrap().len(), 1);

    let second =
        store.create_user(NewUser { role: ADMIN_ROLE.into(), ..new_user("second@example.com") }).await.unwrap();
    store.update_user(admin.id, demote).await.unwrap();
    store.delete_user(admin.id).await.unwrap();
    assert!(store.list_secrets(target.id, None).await.unwrap().is_empty());
    assert!(store.get_user(second.id).await.unwrap().unwrap().is_admin());
}

async fn api_tokens(backend: &str) {
    let (store, _db) = store(backend).await;
    let user = store.register_user(new_user("a@example.com")).await.unwrap();
    let other = store.register_user(new_user("b@example.com")).await.unwrap();
    let token = store
        .create_api_token(NewApiToken {
            user_id: user.id,
            name: "laptop".into(),
            hash: vec![1, 2, 3],
            prefix: "rfl_abcd".into(),
            expires_at: Some(now()),
        })
        .await
        .unwrap();
    let (found, owner) = store.api_token_by_hash(&[1, 2, 3]).await.unwrap().unwrap();
    assert_eq!(found, token);
    assert_eq!(owner.id, user.id);
    assert!(store.api_token_by_hash(&[9]).await.unwrap().is_none());
    let at = now();
    store.touch_api_token(token.id, at).await.unwrap();
    assert_eq!(store.list_api_tokens(user.id).await.unwrap()[0].last_used_at, Some(at));
    assert!(store.list_api_tokens(other.id).await.unwrap().is_empty());
    assert!(matches!(store.delete_api_token(other.id, token.id).await, Err(StoreError::NotFound(_))));
    store.delete_api_token(user.id, token.id).await.unwrap();
    assert!(store.api_token_by_hash(&[1, 2, 3]).await.unwrap().is_none());
}

async fn targets_round_trip(backend: &str) {
    let (store, _db) = store(backend).await;
    let mut spec = http_target("github");
    spec.transport_type = TransportType::Stdio;
    spec.url = None;
    spec.command = Some("npx".into());
    spec.args = vec!["-y".into(), "@modelcontextprotocol/server-github".into()];
    spec.isolation_boundary = Isolation::PerUser;
    let target = store.create_target(spec.clone()).await.unwrap();
    assert_eq!(target.spec(), spec);
    assert_eq!(store.get_target(target.id).await.unwrap().unwrap(), target);
    assert!(matches!(store.create_target(http_target("github")).await, Err(StoreError::Conflict(_))));
    store.create_target(http_target("alpha")).await.unwrap();
    let names: Vec<String> = store.list_targets().await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, vec!["alpha", "github"]);

    let mut changed = spec.clone();
    changed.enabled = false;
    changed.name = "gh".into();
    let updated = store.update_target(target.id, changed.clone()).await.unwrap();
    assert_eq!(updated.spec(), changed);
    assert_eq!(updated.created_at, target.created_at);
    assert!(matches!(store.update_target(target.id, http_target("alpha")).await, Err(StoreError::Conflict(_))));
    assert!(matches!(store.update_target(Uuid::new_v4(), changed).await, Err(StoreError::NotFound(_))));
}

async fn deleting_a_target_removes_its_secrets_and_policies(backend: &str) {
    let (store, _db) = store(backend).await;
    let target = store.create_target(http_target("t")).await.unwrap();
    let other = store.create_target(http_target("u")).await.unwrap();
    store.put_secret(secret(target.id, SecretKind::Token, Scope::Default, "", b"x")).await.unwrap();
    store.create_policy(policy("p", Some(target.id), 1), vec![role("dev")]).await.unwrap();
    store.create_policy(policy("q", Some(other.id), 1), vec![]).await.unwrap();
    store.delete_target(target.id).await.unwrap();
    assert!(store.get_target(target.id).await.unwrap().is_none());
    assert!(store.list_secrets(target.id, None).await.unwrap().is_empty());
    let names: Vec<String> = store.list_policies().await.unwrap().into_iter().map(|p| p.name).collect();
    assert_eq!(names, vec!["q"]);
    assert!(matches!(store.delete_target(target.id).await, Err(StoreError::NotFound(_))));
}

async fn secrets_upsert_and_delete(backend: &str) {
    let (store, _db) = store(backend).await;
    let target = store.create_target(http_target("t")).await.unwrap();
    let dev = Scope::Role("dev".into());
    store.put_secret(secret(target.id, SecretKind::Env, dev.clone(), "A", b"one")).await.unwrap();
    store.put_secret(secret(target.id, SecretKind::Env, dev.clone(), "A", b"two")).await.unwrap();
    store.put_secret(secret(target.id, SecretKind::Env, dev.clone(), "B", b"b")).await.unwrap();
    store.put_secret(secret(target.id, SecretKind::Env, Scope::Default, "A", b"d")).await.unwrap();
    store.put_secret(secret(target.id, SecretKind::Token, dev.clone(), "", b"t")).await.unwrap();

    let env = store.list_secrets(target.id, Some(SecretKind::Env)).await.unwrap();
    assert_eq!(env.len(), 3);
    let a = env.iter().find(|e| e.scope == dev && e.name == "A").unwrap();
    assert_eq!(a.ciphertext, b"two");
    assert_eq!(store.list_secrets(target.id, None).await.unwrap().len(), 4);

    store.delete_secret(target.id, SecretKind::Env, &Scope::Default, "A").await.unwrap();
    assert!(matches!(
        store.delete_secret(target.id, SecretKind::Env, &Scope::Default, "A").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.delete_scope_secrets(target.id, SecretKind::Env, &dev).await.unwrap(), 2);
    assert_eq!(store.list_secrets(target.id, None).await.unwrap().len(), 1);
    let missing = secret(Uuid::new_v4(), SecretKind::Env, Scope::Default, "A", b"x");
    assert!(matches!(store.put_secret(missing).await, Err(StoreError::NotFound(_))));
}

async fn policies_round_trip(backend: &str) {
    let (store, _db) = store(backend).await;
    let target = store.create_target(http_target("t")).await.unwrap();
    let low = store.create_policy(policy("low", None, 1), vec![]).await.unwrap();
    let high = store.create_policy(policy("high", Some(target.id), 10), vec![role("dev"), role("ops")]).await.unwrap();
    assert_eq!(high.subjects.len(), 2);
    assert_eq!(store.get_policy(high.id).await.unwrap().unwrap(), high);
    let order: Vec<String> = store.list_policies().await.unwrap().into_iter().map(|p| p.name).collect();
    assert_eq!(order, vec!["high", "low"]);
    assert!(matches!(store.create_policy(policy("low", None, 1), vec![]).await, Err(StoreError::Conflict(_))));
    assert!(matches!(
        store.create_policy(policy("ghost", Some(Uuid::new_v4()), 1), vec![]).await,
        Err(StoreError::NotFound(_))
    ));

    let mut spec = policy("low", None, 5);
    spec.effect = Effect::Deny;
    spec.pattern = None;
    let updated = store
        .update_policy(
            low.id,
            spec.clone(),
            Some(vec![SubjectSpec { subject_type: SubjectType::Everyone, subject_value: String::new() }]),
        )
        .await
        .unwrap();
    assert_eq!(updated.effect, Effect::Deny);
    assert_eq!(updated.pattern, None);
    assert_eq!(updated.subjects.len(), 1);
    let kept = store.update_policy(low.id, spec, None).await.unwrap();
    assert_eq!(kept.subjects, updated.subjects);

    let added = store.add_policy_subject(high.id, role("qa")).await.unwrap();
    assert!(matches!(store.add_policy_subject(high.id, role("qa")).await, Err(StoreError::Conflict(_))));
    assert!(matches!(store.add_policy_subject(Uuid::new_v4(), role("qa")).await, Err(StoreError::NotFound(_))));
    assert_eq!(store.get_policy(high.id).await.unwrap().unwrap().subjects.len(), 3);
    store.remove_policy_subject(high.id, added.id).await.unwrap();
    assert!(matches!(store.remove_policy_subject(high.id, added.id).await, Err(StoreError::NotFound(_))));
    store.delete_policy(high.id).await.unwrap();
    assert!(store.get_policy(high.id).await.unwrap().is_none());
}

async fn failed_policy_create_writes_nothing(backend: &str) {
    let (store, _db) = store(backend).await;
    let result = store.create_policy(policy("dup", None, 1), vec![role("dev"), role("dev")]).await;
    assert!(matches!(result, Err(StoreError::Conflict(_))));
    assert!(store.list_policies().await.unwrap().is_empty());
}

async fn migrations_are_idempotent(backend: &str) {
    let (store, db) = store(backend).await;
    store.register_user(new_user("a@example.com")).await.unwrap();
    let again = reflow_control_plane::store::connect(&db.url(), 2).await.unwrap();
    assert_eq!(again.list_users().await.unwrap().len(), 1);
    assert_eq!(again.backend(), backend);
    again.ping().await.unwrap();
}

/// Runs one statement on the test database directly, as someone with database access would.
async fn tamper(db: &support::TestDb, sql: &str) {
    let url = db.url();
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
    } else {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
}

fn audit_record(plane: &str, n: u32, at: chrono::DateTime<chrono::Utc>) -> reflow_control_plane::audit::AuditRecord {
    reflow_control_plane::audit::AuditRecord {
        user_id: Some(format!("user-{}", n % 3)),
        session_id: Some("s".into()),
        client_name: Some("claude".into()),
        client_version: Some("1".into()),
        protocol_version: Some("2025-11-25".into()),
        target: Some("github".into()),
        name: Some(if n.is_multiple_of(2) { "create_issue" } else { "list_repos" }.into()),
        decision: if n.is_multiple_of(5) { "denied" } else { "allowed" }.into(),
        credential_source: Some("user".into()),
        transport: Some("stdio".into()),
        duration_ms: u64::from(n),
        snapshot_version: Some("v".into()),
        ..reflow_control_plane::audit::AuditRecord::new(
            format!("{plane}-{n}"),
            plane.into(),
            at,
            "/mcp".into(),
            "tools/call".into(),
        )
    }
}

async fn verified(store: &DynStore) -> Result<u64, reflow_control_plane::audit::Broken> {
    let (records, anchors) = store.audit_chains().await.unwrap();
    reflow_control_plane::audit::verify(&records, |plane| anchors.get(plane).cloned().unwrap_or_default())
}

async fn audit_chains_detect_tampering_and_survive_pruning(backend: &str) {
    let (store, db) = store(backend).await;
    let start = now() - chrono::Duration::hours(10);
    let at = |n: u32| start + chrono::Duration::minutes(i64::from(n));
    let batch: Vec<_> = (1..=20)
        .map(|n| audit_record("dp-a", n, at(n)))
        .chain((1..=5).map(|n| audit_record("dp-b", n, at(n))))
        .collect();
    assert_eq!(store.append_audit(&batch).await.unwrap(), 25);
    // A resend (after a lost acknowledgement) stores nothing twice.
    assert_eq!(store.append_audit(&batch[10..]).await.unwrap(), 0);
    let mut more: Vec<_> = (21..=30).map(|n| audit_record("dp-a", n, at(n))).collect();
    // The same record twice in one batch, and one stored already: each once.
    more.push(more[3].clone());
    more.push(batch[0].clone());
    assert_eq!(store.append_audit(&more).await.unwrap(), 10);
    assert_eq!(verified(&store).await, Ok(35));

    // Filters and paging, newest first.
    let denied = store
        .list_audit(&AuditFilter { decision: Some("denied".into()), limit: 100, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(
        denied.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["dp-a-30", "dp-a-25", "dp-a-20", "dp-a-15", "dp-a-10", "dp-a-5", "dp-b-5"]
    );
    let page = store
        .list_audit(&AuditFilter { target: Some("github".into()), limit: 5, offset: 5, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(page.len(), 5);
    assert_eq!(page[0].id, "dp-a-25");
    let window = AuditFilter {
        since: Some(at(3)),
        until: Some(at(5)),
        name: Some("list_repos".into()),
        limit: 100,
        ..Default::default()
    };
    assert_eq!(store.list_audit(&window).await.unwrap().len(), 2, "dp-a-3 and dp-b-3");
    assert_eq!(store.list_audit(&AuditFilter { limit: 100, ..Default::default() }).await.unwrap()[0], more[9]);

    // Retention: pruning keeps the chain verifiable from its anchor.
    assert_eq!(store.prune_audit(at(8)).await.unwrap(), 7 + 5);
    assert_eq!(verified(&store).await, Ok(35 - 12));

    // Tampering, each kind named.
    tamper(&db, "UPDATE audit_records SET body = REPLACE(body, 'create_issue', 'delete_repo') WHERE id = 'dp-a-12'")
        .await;
    let broken = verified(&store).await.unwrap_err();
    assert_eq!((broken.id.as_str(), broken.why.contains("changed")), ("dp-a-12", true), "{broken}");
    tamper(&db, "UPDATE audit_records SET body = REPLACE(body, 'delete_repo', 'create_issue') WHERE id = 'dp-a-12'")
        .await;
    assert!(verified(&store).await.is_ok());
    tamper(&db, "UPDATE audit_records SET decision = 'allowed' WHERE id = 'dp-a-15'").await;
    assert_eq!(verified(&store).await.unwrap_err().id, "dp-a-15");
    tamper(&db, "UPDATE audit_records SET decision = 'denied' WHERE id = 'dp-a-15'").await;
    tamper(&db, "DELETE FROM audit_records WHERE id = 'dp-a-20'").await;
    let broken = verified(&store).await.unwrap_err();
    assert_eq!((broken.seq, broken.why.contains("missing")), (21, true), "{broken}");
}

async fn audit_batches_larger_than_one_insert_are_stored_whole(backend: &str) {
    let (store, _db) = store(backend).await;
    // More rows than one INSERT writes (500), over two chains, and the data planes' largest batch.
    let batch: Vec<_> = (1..=reflow_proto::audit::MAX_BATCH as u32)
        .map(|n| audit_record(if n % 3 == 0 { "dp-b" } else { "dp-a" }, n, now()))
        .collect();
    assert_eq!(store.append_audit(&batch).await.unwrap(), 1000);
    assert_eq!(store.append_audit(&batch).await.unwrap(), 0, "sent again: stored once");
    assert_eq!(verified(&store).await, Ok(1000));
}

both_backends!(
    audit_batches_larger_than_one_insert_are_stored_whole,
    audit_chains_detect_tampering_and_survive_pruning,
    first_registered_user_is_admin,
    concurrent_first_registrations_make_one_admin,
    users_round_trip,
    last_admin_is_kept,
    api_tokens,
    targets_round_trip,
    deleting_a_target_removes_its_secrets_and_policies,
    secrets_upsert_and_delete,
    policies_round_trip,
    failed_policy_create_writes_nothing,
    migrations_are_idempotent,
);
