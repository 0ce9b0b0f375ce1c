//! Applying snapshot updates and the encrypted cache, against hand-built resources.

use base64::Engine as _;
use reflow_common::credentials::{Isolation, Scope};
use reflow_common::model::{
    AuthType, Effect, ResourceType as On, SecretKind, Statefulness, SubjectType, TransportType,
};
use reflow_data_plane::cache::{Cache, CacheError};
use reflow_data_plane::snapshot::{apply, DataSnapshot};
use reflow_proto::resources::{self, snapshot_sealer, Credential, Settings, SETTINGS_ID};
use reflow_proto::snapshot::v1::{Resource, ResourceRef, ResourceType, SnapshotUpdate};

const TOKEN: &str = "data-plane-token-for-tests";

fn b64(bytes: Vec<u8>) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn settings_with(algorithm: &str, public_key: &str) -> Resource {
    let payload = Settings {
        jwt_issuer: "reflow".into(),
        jwt_audience: "reflow".into(),
        jwt_algorithm: algorithm.into(),
        jwt_public_key: public_key.into(),
        session_keys: vec![],
    };
    resources::resource(ResourceType::Settings, SETTINGS_ID, &payload)
}

fn settings() -> Resource {
    let public = reflow_common::jwt::public_key(b"jwt-secret-jwt-secret-jwt-secret");
    settings_with("EdDSA", &reflow_common::jwt::encode_public_key(&public))
}

fn user(id: &str, active: bool) -> Resource {
    let payload = resources::User {
        id: id.into(),
        email: format!("{id}@example.com"),
        role: "developer".into(),
        groups: vec![],
        active,
        session_generation: 0,
    };
    resources::resource(ResourceType::User, id, &payload)
}

fn target(id: &str, name: &str) -> Resource {
    let payload = resources::Target {
        id: id.into(),
        name: name.into(),
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
        restart_generation: 0,
        audit_arguments: false,
    };
    resources::resource(ResourceType::Target, id, &payload)
}

fn policy(id: &str, target_id: &str, priority: i32) -> Resource {
    let payload = resources::Policy {
        id: id.into(),
        name: format!("policy {id}"),
        target_id: Some(target_id.into()),
        resource_type: On::Tool,
        pattern: Some("read_*".into()),
        effect: Effect::Allow,
        priority,
        subjects: vec![resources::Subject { subject_type: SubjectType::Role, subject_value: "developer".into() }],
    };
    resources::resource(ResourceType::Policy, id, &payload)
}

fn credential(target_id: &str, token: &str) -> Resource {
    let scope = Scope::Default;
    let aad = Credential::aad(target_id, SecretKind::Env, &scope, "API_KEY");
    let payload = Credential {
        target_id: target_id.into(),
        kind: SecretKind::Env,
        scope: scope.clone(),
        name: "API_KEY".into(),
        sealed: b64(snapshot_sealer(token).seal(b"value", &aad)),
    };
    resources::resource(
        ResourceType::Credential,
        &Credential::resource_id(target_id, SecretKind::Env, &scope, "API_KEY"),
        &payload,
    )
}

fn version_of(resources: &[Resource]) -> String {
    resources::snapshot_version(resources.iter().map(|r| (r.r#type, r.id.as_str(), r.version.as_str())))
}

fn full(resources: Vec<Resource>) -> SnapshotUpdate {
    SnapshotUpdate {
        version: version_of(&resources),
        base_version: String::new(),
        upserts: resources,
        removals: vec![],
        control_plane_id: "cp".into(),
        more: false,
        ended_sessions: vec![],
    }
}

fn base() -> Vec<Resource> {
    vec![settings(), user("u1", true), target("t1", "github"), policy("p1", "t1", 10), credential("t1", TOKEN)]
}

fn applied(update: &SnapshotUpdate) -> DataSnapshot {
    apply(None, update, &snapshot_sealer(TOKEN)).unwrap()
}

#[test]
fn full_update_applies_and_decodes() {
    let update = full(base());
    let snapshot = applied(&update);
    assert_eq!(snapshot.version, update.version);
    assert!(snapshot.view.users["u1"].active);
    assert_eq!(snapshot.view.targets["github"].id, "t1");
    assert_eq!(snapshot.view.policies.len(), 1);
    assert_eq!(snapshot.view.credentials.len(), 1);
}

#[test]
fn diffs_apply_on_their_base_only() {
    let sealer = snapshot_sealer(TOKEN);
    let first = applied(&full(base()));
    let mut next = base();
    next[1] = user("u1", false);
    next.push(user("u2", true));
    next.retain(|r| r.id != "p1");
    let diff = SnapshotUpdate {
        version: version_of(&next),
        base_version: first.version.clone(),
        upserts: vec![user("u1", false), user("u2", true)],
        removals: vec![ResourceRef { r#type: ResourceType::Policy as i32, id: "p1".into() }],
        control_plane_id: "cp".into(),
        more: false,
        ended_sessions: vec![],
    };
    let second = apply(Some(&first), &diff, &sealer).unwrap();
    assert!(!second.view.users["u1"].active);
    assert!(second.view.policies.is_empty());
    assert_eq!(second.resources.len(), 5);

    // Applied again, the diff's base no longer matches: ask for the full state.
    let again = apply(Some(&second), &diff, &sealer).unwrap_err();
    assert!(again.want_full, "{again:?}");
    assert!(apply(None, &diff, &sealer).unwrap_err().want_full);
}

#[test]
fn announced_version_must_match_the_result() {
    let mut update = full(base());
    update.version = "0".repeat(64);
    let rejection = apply(None, &update, &snapshot_sealer(TOKEN)).unwrap_err();
    assert!(rejection.want_full);
    assert!(rejection.reason.contains("hashes to"), "{}", rejection.reason);
}

#[test]
fn invalid_resources_are_rejected_with_reasons() {
    let sealer = snapshot_sealer(TOKEN);
    let previous = applied(&full(base()));
    type Corruption = Box<dyn Fn(&mut Vec<Resource>)>;
    let cases: Vec<(Corruption, &str)> = vec![
        (Box::new(|rs| rs[1].payload = b"{\"id\":\"u1\"}".to_vec()), "payload does not match its version"),
        (
            Box::new(|rs| {
                rs[1] = resources::resource(ResourceType::User, "u1", &serde_json::json!({"id": "u1", "surprise": 1}))
            }),
            "USER",
        ),
        (Box::new(|rs| rs[3] = policy("p1", "missing-target", 10)), "unknown target"),
        (Box::new(|rs| rs[4] = credential("t1", "another-token-entirely")), "does not open"),
        (Box::new(|rs| rs[0] = settings_with("HS256", "c2VjcmV0")), "unsupported JWT algorithm"),
        (Box::new(|rs| rs[0] = settings_with("EdDSA", "c2hvcnQ")), "not 32 bytes"),
        (Box::new(|rs| rs.remove(0).r#type = 0), "settings resource is missing"),
        (Box::new(|rs| rs.push(target("t2", "github"))), "two targets"),
        (Box::new(|rs| rs[1].r#type = 0), "has no type"),
        (Box::new(|rs| rs[2].requires = vec!["quota-v2".into()]), "requires quota-v2"),
    ];
    for (corrupt, needle) in cases {
        let mut resources = base();
        corrupt(&mut resources);
        let mut update = full(resources.clone());
        update.version = version_of(&resources);
        let rejection = apply(Some(&previous), &update, &sealer).unwrap_err();
        assert!(rejection.reason.contains(needle), "expected {needle:?} in {:?}", rejection.reason);
    }
}

#[test]
fn cache_round_trips_and_refuses_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let sealer = snapshot_sealer(TOKEN);
    let cache = Cache::new(dir.path(), TOKEN);
    assert!(cache.load(&sealer).unwrap().is_none());
    let snapshot = applied(&full(base()));
    cache.save(&snapshot).unwrap();
    let loaded = cache.load(&sealer).unwrap().unwrap();
    assert_eq!(loaded.version, snapshot.version);
    assert_eq!(loaded.resources, snapshot.resources);
    let on_disk = std::fs::read(cache.path()).unwrap();
    assert!(!on_disk.windows(6).any(|w| w == b"github"), "the cache is encrypted");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(cache.path()).unwrap().permissions().mode() & 0o777, 0o600);
    }

    let other = Cache::new(dir.path(), "some-other-data-plane-token");
    assert!(matches!(
        other.load(&snapshot_sealer("some-other-data-plane-token")),
        Err(CacheError::Undecryptable { .. })
    ));
    for position in [0, on_disk.len() / 2, on_disk.len() - 1] {
        let mut tampered = on_disk.clone();
        tampered[position] ^= 0x01;
        std::fs::write(cache.path(), &tampered).unwrap();
        assert!(matches!(cache.load(&sealer), Err(CacheError::Undecryptable { .. })), "byte {position}");
    }
    std::fs::write(cache.path(), &on_disk[..on_disk.len() / 3]).unwrap();
    assert!(cache.load(&sealer).is_err());
}

#[test]
fn a_cache_older_than_a_snapshot_already_applied_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sealer = snapshot_sealer(TOKEN);
    let cache = Cache::new(dir.path(), TOKEN);
    let first = applied(&full(base()));
    cache.save(&first).unwrap();
    let old_copy = std::fs::read(cache.path()).unwrap();
    // A later snapshot: the deactivation of u1.
    let mut resources = base();
    resources.retain(|r| r.id != "u1");
    resources.push(user("u1", false));
    let second = applied(&full(resources));
    cache.save(&second).unwrap();
    assert_eq!(cache.load(&sealer).unwrap().unwrap().version, second.version);
    // Putting the older file back does not bring the user back.
    std::fs::write(cache.path(), &old_copy).unwrap();
    let refused = Cache::new(dir.path(), TOKEN).load(&sealer);
    assert!(matches!(refused, Err(CacheError::Older { cached: 1, applied: 2, .. })), "{refused:?}");
    // A restarted data plane numbers on from what it found.
    let restarted = Cache::new(dir.path(), TOKEN);
    restarted.save(&first).unwrap();
    assert_eq!(std::fs::read_to_string(dir.path().join("snapshot.seq")).unwrap(), "3");
    assert!(restarted.load(&sealer).unwrap().is_some());
}

fn jwt(secret: &[u8], sub: &str, expires_in: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = reflow_common::jwt::Claims {
        sub: sub.into(),
        email: format!("{sub}@example.com"),
        role: "developer".into(),
        groups: vec![],
        iss: "reflow".into(),
        aud: "reflow".into(),
        iat: now,
        nbf: now,
        exp: now + expires_in,
        jti: "jti".into(),
    };
    reflow_common::jwt::Signer::from_secret(secret).sign(&claims)
}

fn authenticated(snapshot: &DataSnapshot, token: &str) -> Result<String, &'static str> {
    let mut headers = axum::http::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    reflow_data_plane::auth::authenticate(&snapshot.view, &headers, None).map(|u| u.id.clone()).map_err(|f| match f {
        reflow_data_plane::auth::AuthFailure::Token(reflow_common::jwt::TokenError::Expired) => "token has expired",
        reflow_data_plane::auth::AuthFailure::Token(_) => "token is invalid",
        reflow_data_plane::auth::AuthFailure::Deactivated => "account is deactivated",
        _ => "refused",
    })
}

#[test]
fn a_remembered_token_still_expires_and_a_forgery_of_it_is_refused() {
    let snapshot = applied(&full(base()));
    let secret = b"jwt-secret-jwt-secret-jwt-secret";
    let token = jwt(secret, "u1", 1);
    assert_eq!(authenticated(&snapshot, &token), Ok("u1".into()));
    assert_eq!(authenticated(&snapshot, &token), Ok("u1".into()), "served again from the verified tokens");
    // The same claims under another key: a different token, verified on its own and refused.
    let forged = jwt(b"another-secret-another-secret-00", "u1", 1);
    assert_eq!(authenticated(&snapshot, &forged), Err("token is invalid"));
    // Past its expiry plus the leeway, the remembered token is refused as well.
    std::thread::sleep(std::time::Duration::from_secs(reflow_common::jwt::LEEWAY_SECS + 2));
    assert_eq!(authenticated(&snapshot, &token), Err("token has expired"));
    // A user deactivated in a later snapshot is refused even with a remembered token.
    let token = jwt(secret, "u1", 3600);
    assert_eq!(authenticated(&snapshot, &token), Ok("u1".into()));
    let mut resources = base();
    resources.retain(|r| r.id != "u1");
    resources.push(user("u1", false));
    let later = applied(&full(resources));
    assert_eq!(authenticated(&later, &token), Err("account is deactivated"));
}

/// Session keys arrived with travelling sessions: a control plane from before them sends none
/// (sessions then stay on the data plane that opened them), one that sends them has them opened
/// here, and a key sealed for another fleet's token rejects the update.
#[test]
fn session_keys_in_the_settings_are_optional_and_must_open() {
    assert!(applied(&full(base())).view.session_seal.is_none(), "none from an older control plane");
    let with_keys = |sealer: &reflow_common::crypto::DeterministicSealer| {
        let mut settings: serde_json::Value = serde_json::from_slice(&settings().payload).unwrap();
        let sealed = sealer.seal(&[9; 32], &resources::SessionKey::aad(1));
        settings["session_keys"] = serde_json::json!([{"generation": 1, "sealed": b64(sealed)}]);
        let mut resources = base();
        resources[0] = resources::resource(ResourceType::Settings, SETTINGS_ID, &settings);
        full(resources)
    };
    let snapshot = applied(&with_keys(&snapshot_sealer(TOKEN)));
    assert!(snapshot.view.session_seal.as_ref().is_some_and(|seal| seal.accepts(1, 0)));
    let rejection = apply(None, &with_keys(&snapshot_sealer("another fleet's token")), &snapshot_sealer(TOKEN));
    let reason = rejection.unwrap_err().reason;
    assert!(reason.contains("session key 1 does not open"), "{reason}");
}

/// A fleet upgrades one side at a time: payloads from a newer control plane (fields and resource
/// types this build does not know) apply, and so do payloads from an older one (fields added
/// since, absent); only what a resource says it `requires` and this build lacks is refused, and
/// then the previous snapshot stays.
#[test]
fn payloads_from_a_release_ahead_or_behind_apply_and_required_features_are_honoured() {
    let sealer = snapshot_sealer(TOKEN);
    let previous = applied(&full(base()));

    // From the future: an unknown field on a target and on a user, and a resource type
    // this build has never heard of.
    let mut future = base();
    let mut target_json: serde_json::Value = serde_json::from_slice(&future[2].payload).unwrap();
    target_json["session_affinity"] = serde_json::json!({"mode": "sticky", "ttl": "5m"});
    future[2] = resources::resource(ResourceType::Target, "t1", &target_json);
    let mut user_json: serde_json::Value = serde_json::from_slice(&future[1].payload).unwrap();
    user_json["locale"] = "de".into();
    future[1] = resources::resource(ResourceType::User, "u1", &user_json);
    let mut quota = resources::resource(ResourceType::User, "quota-1", &serde_json::json!({"limit": 10}));
    quota.r#type = 99;
    future.push(quota);
    let update = full(future.clone());
    let snapshot = apply(Some(&previous), &update, &sealer).expect("a newer control plane's payloads apply");
    assert_eq!(snapshot.version, update.version, "the unknown resource still counts toward the version");
    assert_eq!(snapshot.view.targets["github"].id, "t1");
    assert_eq!(snapshot.view.users.len(), 1, "the unknown resource is not taken for a user");
    // The cache keeps it too, so a restart from the cache has the same version.
    assert_eq!(reflow_data_plane::snapshot::as_full_update(&snapshot).upserts.len(), future.len());

    // From the past: fields added since (defaults) are absent.
    let mut past = base();
    let mut old_target: serde_json::Value = serde_json::from_slice(&past[2].payload).unwrap();
    old_target.as_object_mut().unwrap().remove("restart_generation");
    old_target.as_object_mut().unwrap().remove("audit_arguments");
    past[2] = resources::resource(ResourceType::Target, "t1", &old_target);
    let mut old_user: serde_json::Value = serde_json::from_slice(&past[1].payload).unwrap();
    old_user.as_object_mut().unwrap().remove("session_generation");
    past[1] = resources::resource(ResourceType::User, "u1", &old_user);
    let snapshot = apply(Some(&previous), &full(past), &sealer).expect("an older control plane's payloads apply");
    assert_eq!(snapshot.view.targets["github"].restart_generation, 0);
    assert!(!snapshot.view.targets["github"].audit_arguments);

    // A feature this build lacks: refused by name, and the caller keeps `previous`.
    let mut must = future;
    must[3].requires = vec!["deny-by-time".into()];
    let rejection = apply(Some(&previous), &full(must), &sealer).unwrap_err();
    assert!(
        rejection.reason.contains("requires deny-by-time") && rejection.reason.contains("upgrade"),
        "{}",
        rejection.reason
    );
    assert!(!rejection.want_full, "a full resend would not help: {rejection:?}");
}
