//! The snapshot compiler: store state in, snapshot out. A pure function (no I/O: no sqlx,
//! tonic or axum here), so every control-plane replica that reads the same state compiles
//! the same snapshot, with the same content-hash version.
//!
//! Secrets are opened with the store's keyring and sealed again for the data planes with a
//! deterministic sealer derived from the data-plane token; no value appears in clear in a
//! payload, and equal state gives equal bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use reflow_common::crypto::{DeterministicSealer, Keyring};
use reflow_proto::resources::{self, Credential, Settings, SETTINGS_ID};
use reflow_proto::snapshot::v1::{Resource, ResourceRef, ResourceType};

use crate::store::secret_aad;
use crate::store::StoreState;

/// What the compiler needs besides the store state.
#[derive(Debug, Clone, Copy)]
pub struct CompileKeys<'a> {
    /// Opens secrets as stored.
    pub store_keyring: &'a Keyring,
    /// Seals secrets for the data planes.
    pub sealer: &'a DeterministicSealer,
    /// The Ed25519 key data planes verify tokens with.
    pub jwt_public_key: &'a [u8; 32],
    pub jwt_issuer: &'a str,
    pub jwt_audience: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("credential {id} cannot be opened with the configured encryption keys: {reason}")]
    Credential { id: String, reason: String },
}

/// Resources keyed by (type, id).
pub type ResourceMap = BTreeMap<(i32, String), Arc<Resource>>;

/// A compiled, immutable snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub version: String,
    pub resources: ResourceMap,
}

/// The changes that turn one snapshot into another.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diff {
    pub upserts: Vec<Resource>,
    pub removals: Vec<ResourceRef>,
}

impl Snapshot {
    /// The payload of one resource, decoded; `None` when absent or not of that shape.
    pub fn payload<T: serde::de::DeserializeOwned>(&self, kind: ResourceType, id: &str) -> Option<T> {
        let resource = self.resources.get(&(kind as i32, id.to_string()))?;
        serde_json::from_slice(&resource.payload).ok()
    }

    fn from_resources(resources: ResourceMap) -> Self {
        let version =
            resources::snapshot_version(resources.values().map(|r| (r.r#type, r.id.as_str(), r.version.as_str())));
        Snapshot { version, resources }
    }

    /// Every resource, for a data plane that has nothing to diff against.
    pub fn full(&self) -> Vec<Resource> {
        self.resources.values().map(|r| Resource::clone(r)).collect()
    }

    /// What changed from `base` to `self`: resources new or with another version, and
    /// resources gone.
    pub fn diff_from(&self, base: &Snapshot) -> Diff {
        let upserts = self
            .resources
            .iter()
            .filter(|(key, resource)| base.resources.get(*key).is_none_or(|old| old.version != resource.version))
            .map(|(_, resource)| Resource::clone(resource))
            .collect();
        let removals = base
            .resources
            .keys()
            .filter(|key| !self.resources.contains_key(*key))
            .map(|(kind, id)| ResourceRef { r#type: *kind, id: id.clone() })
            .collect();
        Diff { upserts, removals }
    }
}

fn insert<T: serde::Serialize>(map: &mut ResourceMap, kind: ResourceType, id: String, payload: &T) {
    map.insert((kind as i32, id.clone()), Arc::new(resources::resource(kind, &id, payload)));
}

/// A stored policy as snapshots carry it (and as [`reflow_proto::policy`] decides with it).
pub fn policy_payload(policy: &crate::store::Policy) -> resources::Policy {
    resources::Policy {
        id: policy.id.to_string(),
        name: policy.name.clone(),
        target_id: policy.target_id.map(|id| id.to_string()),
        resource_type: policy.resource_type,
        pattern: policy.pattern.clone(),
        effect: policy.effect,
        priority: policy.priority,
        subjects: policy
            .subjects
            .iter()
            .map(|s| resources::Subject { subject_type: s.subject_type, subject_value: s.subject_value.clone() })
            .collect(),
    }
}

/// A stored user as snapshots carry it.
pub fn user_payload(user: &crate::store::User) -> resources::User {
    resources::User {
        id: user.id.to_string(),
        email: user.email.clone(),
        role: user.role.clone(),
        groups: user.groups.clone(),
        active: user.active,
        session_generation: user.session_generation,
    }
}

/// Compiles `state` into a snapshot.
pub fn compile(state: &StoreState, keys: CompileKeys<'_>) -> Result<Snapshot, CompileError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut map = ResourceMap::new();
    let settings = Settings {
        jwt_issuer: keys.jwt_issuer.to_string(),
        jwt_audience: keys.jwt_audience.to_string(),
        jwt_algorithm: reflow_common::jwt::ALGORITHM.into(),
        jwt_public_key: reflow_common::jwt::encode_public_key(keys.jwt_public_key),
        session_keys: session_keys(state, keys)?,
    };
    insert(&mut map, ResourceType::Settings, SETTINGS_ID.into(), &settings);

    for user in &state.users {
        let payload = user_payload(user);
        insert(&mut map, ResourceType::User, payload.id.clone(), &payload);
    }
    for (token, hash) in &state.api_tokens {
        let payload = resources::ApiToken {
            id: token.id.to_string(),
            user_id: token.user_id.to_string(),
            hash: reflow_common::crypto::to_hex(hash),
            expires_at: token.expires_at.map(|at| at.timestamp()),
        };
        insert(&mut map, ResourceType::ApiToken, payload.id.clone(), &payload);
    }
    for target in &state.targets {
        let payload = target_payload(target);
        insert(&mut map, ResourceType::Target, payload.id.clone(), &payload);
    }
    for policy in state.policies.iter().filter(|p| p.enabled) {
        let payload = policy_payload(policy);
        insert(&mut map, ResourceType::Policy, payload.id.clone(), &payload);
    }
    for secret in &state.secrets {
        let target_id = secret.target_id.to_string();
        let id = Credential::resource_id(&target_id, secret.kind, &secret.scope, &secret.name);
        let value = keys
            .store_keyring
            .open(&secret.ciphertext, &secret_aad(secret.target_id, secret.kind, &secret.scope, &secret.name))
            .map_err(|e| CompileError::Credential { id: id.clone(), reason: e.to_string() })?;
        let sealed = keys.sealer.seal(&value, &Credential::aad(&target_id, secret.kind, &secret.scope, &secret.name));
        let payload = Credential {
            target_id,
            kind: secret.kind,
            scope: secret.scope.clone(),
            name: secret.name.clone(),
            sealed: b64.encode(sealed),
        };
        insert(&mut map, ResourceType::Credential, id, &payload);
    }
    Ok(Snapshot::from_resources(map))
}

/// Seconds after a rotation before data planes seal session ids with the new key: until then
/// they seal with the previous one, which every replica holds.
pub const SESSION_KEY_ACTIVATION_SECS: i64 = 10;

/// The session keys, opened with the store keyring and sealed for the data planes.
fn session_keys(state: &StoreState, keys: CompileKeys<'_>) -> Result<Vec<resources::SessionKey>, CompileError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    state
        .session_keys
        .iter()
        .map(|key| {
            let id = format!("session key {}", key.generation);
            let generation = u32::try_from(key.generation)
                .map_err(|_| CompileError::Credential { id: id.clone(), reason: "generation out of range".into() })?;
            let value = keys
                .store_keyring
                .open(&key.ciphertext, &crate::store::session_key_aad())
                .map_err(|e| CompileError::Credential { id, reason: e.to_string() })?;
            Ok(resources::SessionKey {
                generation,
                sealed: b64.encode(keys.sealer.seal(&value, &resources::SessionKey::aad(generation))),
                // The first key seals at once; a rotated one once data planes have had time to
                // receive it.
                active_at: (key.generation > 1).then(|| key.created_at.timestamp() + SESSION_KEY_ACTIVATION_SECS),
                retire_at: key.retire_at.map(|at| at.timestamp()),
            })
        })
        .collect()
}

/// A target as snapshots carry it.
pub fn target_payload(target: &crate::store::Target) -> resources::Target {
    resources::Target {
        id: target.id.to_string(),
        name: target.name.clone(),
        transport_type: target.transport_type,
        url: target.url.clone(),
        command: target.command.clone(),
        args: target.args.clone(),
        image: target.image.clone(),
        port: target.port,
        health_path: target.health_path.clone(),
        statefulness: target.statefulness,
        isolation_boundary: target.isolation_boundary,
        auth_type: target.auth_type,
        auth_header_name: target.auth_header_name.clone(),
        enabled: target.enabled,
        restart_generation: target.restart_generation,
        audit_arguments: target.audit_arguments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        ApiToken, AuthType, Effect, Policy, PolicySubject, SecretEntry, SecretKind, Statefulness, SubjectType, Target,
        TransportType, User,
    };
    use chrono::TimeZone;
    use reflow_common::credentials::{Isolation, Scope};
    use reflow_common::crypto::Key;
    use reflow_common::model::ResourceType as PolicyOn;
    use uuid::Uuid;

    fn at() -> chrono::DateTime<chrono::Utc> {
        chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    struct Fixture {
        keyring: Keyring,
        sealer: DeterministicSealer,
        state: StoreState,
    }

    impl Fixture {
        fn new() -> Self {
            let keyring = Keyring::single(1, Key::from_bytes([3; 32]));
            let sealer = DeterministicSealer::from_secret(b"data-plane-token", resources::SNAPSHOT_SEAL_PURPOSE);
            let user = User {
                id: id(1),
                email: "dev@example.com".into(),
                role: "developer".into(),
                groups: vec!["eng".into()],
                active: true,
                created_at: at(),
                updated_at: at(),
                session_generation: 0,
            };
            let target = Target {
                id: id(2),
                name: "github".into(),
                description: String::new(),
                transport_type: TransportType::StreamableHttp,
                url: Some("https://example.com/mcp".into()),
                command: None,
                args: vec![],
                image: None,
                port: None,
                health_path: None,
                statefulness: Statefulness::Stateless,
                isolation_boundary: Isolation::PerUser,
                auth_type: AuthType::Bearer,
                auth_header_name: None,
                enabled: true,
                env_keys: vec![],
                restart_generation: 0,
                audit_arguments: false,
                created_at: at(),
                updated_at: at(),
            };
            let policy = |n: u128, enabled: bool| Policy {
                id: id(n),
                name: format!("p{n}"),
                description: String::new(),
                target_id: Some(id(2)),
                resource_type: PolicyOn::Tool,
                pattern: Some("read_*".into()),
                effect: Effect::Allow,
                priority: 10,
                enabled,
                subjects: vec![PolicySubject {
                    id: id(n + 100),
                    policy_id: id(n),
                    subject_type: SubjectType::Role,
                    subject_value: "developer".into(),
                    created_at: at(),
                }],
                created_at: at(),
                updated_at: at(),
            };
            let scope = Scope::User(id(1).to_string());
            let session_key = keyring.seal(b"SESSIONKEY-CANARY-0123456789abcd", &crate::store::session_key_aad());
            let secret = SecretEntry {
                target_id: id(2),
                kind: SecretKind::Env,
                scope: scope.clone(),
                name: "GITHUB_TOKEN".into(),
                ciphertext: keyring.seal(b"ghp_CANARY", &secret_aad(id(2), SecretKind::Env, &scope, "GITHUB_TOKEN")),
                key_version: 1,
                description: String::new(),
                updated_at: at(),
            };
            let token = ApiToken {
                id: id(4),
                user_id: id(1),
                name: "laptop".into(),
                prefix: "rfl_x".into(),
                created_at: at(),
                expires_at: None,
                last_used_at: None,
            };
            Fixture {
                keyring,
                sealer,
                state: StoreState {
                    users: vec![user],
                    targets: vec![target],
                    policies: vec![policy(10, true), policy(11, false)],
                    api_tokens: vec![(token, vec![0xab; 32])],
                    secrets: vec![secret],
                    session_keys: vec![crate::store::SessionKeyEntry {
                        generation: 3,
                        ciphertext: session_key,
                        created_at: at(),
                        retire_at: None,
                    }],
                },
            }
        }

        fn compile(&self) -> Snapshot {
            compile(
                &self.state,
                CompileKeys {
                    store_keyring: &self.keyring,
                    sealer: &self.sealer,
                    jwt_public_key: &reflow_common::jwt::public_key(b"jwt-secret-jwt-secret-jwt-secret!"),
                    jwt_issuer: "reflow",
                    jwt_audience: "reflow",
                },
            )
            .unwrap()
        }
    }

    #[test]
    fn compiles_every_resource_type() {
        let snapshot = Fixture::new().compile();
        let kinds: Vec<(i32, &str)> = snapshot.resources.keys().map(|(k, id)| (*k, id.as_str())).collect();
        let credential_id = format!("{}/env/user/{}/GITHUB_TOKEN", id(2), id(1));
        assert_eq!(
            kinds,
            vec![
                (ResourceType::Settings as i32, "settings"),
                (ResourceType::User as i32, &*id(1).to_string()),
                (ResourceType::ApiToken as i32, &*id(4).to_string()),
                (ResourceType::Target as i32, &*id(2).to_string()),
                (ResourceType::Policy as i32, &*id(10).to_string()),
                (ResourceType::Credential as i32, credential_id.as_str()),
            ],
            "the disabled policy is left out"
        );
        let token = &snapshot.resources[&(ResourceType::ApiToken as i32, id(4).to_string())];
        let token: resources::ApiToken = serde_json::from_slice(&token.payload).unwrap();
        assert_eq!(token.hash, "ab".repeat(32));
    }

    #[test]
    fn same_state_same_version_and_bytes() {
        let fixture = Fixture::new();
        assert_eq!(fixture.compile(), fixture.compile());
    }

    #[test]
    fn secrets_are_sealed_for_data_planes() {
        let fixture = Fixture::new();
        let snapshot = fixture.compile();
        for resource in snapshot.resources.values() {
            let text = String::from_utf8_lossy(&resource.payload);
            assert!(!text.contains("CANARY") && !text.contains("jwt-secret"), "{text}");
        }
        let key = (ResourceType::Credential as i32, format!("{}/env/user/{}/GITHUB_TOKEN", id(2), id(1)));
        let credential: Credential = serde_json::from_slice(&snapshot.resources[&key].payload).unwrap();
        let sealed = base64::engine::general_purpose::STANDARD.decode(&credential.sealed).unwrap();
        let aad = Credential::aad(&credential.target_id, credential.kind, &credential.scope, &credential.name);
        assert_eq!(&fixture.sealer.open(&sealed, &aad).unwrap()[..], b"ghp_CANARY");
        let other = DeterministicSealer::from_secret(b"another token", resources::SNAPSHOT_SEAL_PURPOSE);
        assert!(other.open(&sealed, &aad).is_err());

        let settings: Settings = snapshot.payload(ResourceType::Settings, SETTINGS_ID).unwrap();
        let [key] = &settings.session_keys[..] else { panic!("one session key: {settings:?}") };
        let sealed = base64::engine::general_purpose::STANDARD.decode(&key.sealed).unwrap();
        let opened = fixture.sealer.open(&sealed, &resources::SessionKey::aad(3)).unwrap();
        assert_eq!(&opened[..], b"SESSIONKEY-CANARY-0123456789abcd");
        assert!(fixture.sealer.open(&sealed, &resources::SessionKey::aad(4)).is_err(), "bound to its generation");
    }

    #[test]
    fn one_policy_change_is_one_upsert() {
        let mut fixture = Fixture::new();
        let before = fixture.compile();
        fixture.state.policies[0].priority = 20;
        let after = fixture.compile();
        assert_ne!(before.version, after.version);
        let diff = after.diff_from(&before);
        assert_eq!(diff.upserts.len(), 1);
        assert_eq!(diff.upserts[0].id, id(10).to_string());
        assert!(diff.removals.is_empty());
        assert_eq!(after.diff_from(&after), Diff::default());
    }

    #[test]
    fn removals_and_disabling_are_diffs() {
        let mut fixture = Fixture::new();
        let before = fixture.compile();
        fixture.state.users.clear();
        fixture.state.policies[0].enabled = false;
        let diff = fixture.compile().diff_from(&before);
        let mut removed: Vec<i32> = diff.removals.iter().map(|r| r.r#type).collect();
        removed.sort();
        assert_eq!(removed, vec![ResourceType::User as i32, ResourceType::Policy as i32]);
        assert!(diff.upserts.is_empty());
    }

    #[test]
    fn undecryptable_credential_fails_the_compile() {
        let mut fixture = Fixture::new();
        fixture.keyring = Keyring::single(1, Key::from_bytes([4; 32]));
        let result = compile(
            &fixture.state,
            CompileKeys {
                store_keyring: &fixture.keyring,
                sealer: &fixture.sealer,
                jwt_public_key: &[7; 32],
                jwt_issuer: "i",
                jwt_audience: "a",
            },
        );
        assert!(matches!(result, Err(CompileError::Credential { .. })));
    }
}
