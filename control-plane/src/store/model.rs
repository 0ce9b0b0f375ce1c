//! The records the store keeps. Types that carry no secret double as REST responses.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use reflow_common::credentials::{Isolation, Scope};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The role that may administer the gateway.
pub const ADMIN_ROLE: &str = "admin";
/// The role new users get unless an admin says otherwise.
pub const DEFAULT_ROLE: &str = "user";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    /// `admin` administers the gateway; any other role is a name policies and credentials
    /// can refer to.
    pub role: String,
    /// Sorted group names.
    pub groups: Vec<String>,
    pub active: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Bumped by a recycle: data planes recycle the user's sessions when it changes.
    #[serde(skip)]
    pub session_generation: i64,
}

impl User {
    pub fn is_admin(&self) -> bool {
        self.role == ADMIN_ROLE
    }
}

#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: String,
    pub password_hash: String,
    pub role: String,
    pub groups: Vec<String>,
    pub active: bool,
}

/// Fields of a user to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserUpdate {
    pub role: Option<String>,
    pub groups: Option<Vec<String>>,
    pub active: Option<bool>,
    pub password_hash: Option<String>,
}

/// An API token's metadata. The token itself is shown once, at creation; only its hash is
/// stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ApiToken {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    /// The first characters of the token, to recognise it by.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct NewApiToken {
    pub user_id: Uuid,
    pub name: String,
    pub hash: Vec<u8>,
    pub prefix: String,
    pub expires_at: Option<DateTime<Utc>>,
}

pub use reflow_common::model::{AuthType, Effect, ResourceType, SecretKind, Statefulness, SubjectType, TransportType};

/// An env key a target declares: what it is for, which scopes may hold a value for it, and
/// whether a user may set their own value. Users may write declared, user-settable keys only;
/// admins may also write keys no declaration names, at any scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvKey {
    /// The variable's name (`[A-Za-z_][A-Za-z0-9_]*`).
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The scopes that may hold a value: `default`, `role`, `group`, `user`. Default: all.
    #[serde(default = "EnvKey::all_scopes")]
    pub scopes: Vec<reflow_common::credentials::ScopeKind>,
    /// Whether a user may set their own value (at their user scope). Never for keys that
    /// choose where requests go (`BASE_URL`, `AUTH_HEADER`, `TIMEOUT`) or, for STDIO and
    /// Kubernetes targets, what the process runs.
    #[serde(default)]
    pub user_settable: bool,
}

impl EnvKey {
    pub fn all_scopes() -> Vec<reflow_common::credentials::ScopeKind> {
        use reflow_common::credentials::ScopeKind::*;
        vec![Default, Role, Group, User]
    }
}

/// A validated target definition, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    pub name: String,
    pub description: String,
    pub transport_type: TransportType,
    pub url: Option<String>,
    pub command: Option<String>,
    pub args: Vec<String>,
    pub image: Option<String>,
    pub port: Option<i32>,
    pub health_path: Option<String>,
    pub statefulness: Statefulness,
    pub isolation_boundary: Isolation,
    pub auth_type: AuthType,
    pub auth_header_name: Option<String>,
    pub enabled: bool,
    pub env_keys: Vec<EnvKey>,
    pub audit_arguments: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Target {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub transport_type: TransportType,
    pub url: Option<String>,
    pub command: Option<String>,
    pub args: Vec<String>,
    pub image: Option<String>,
    pub port: Option<i32>,
    pub health_path: Option<String>,
    pub statefulness: Statefulness,
    pub isolation_boundary: Isolation,
    pub auth_type: AuthType,
    pub auth_header_name: Option<String>,
    pub enabled: bool,
    /// The env keys the target declares.
    pub env_keys: Vec<EnvKey>,
    /// Audit records of its calls keep their arguments (secrets masked).
    pub audit_arguments: bool,
    /// Bumped by `restart-instances`: data planes restart the target's processes.
    pub restart_generation: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Target {
    pub fn spec(&self) -> TargetSpec {
        TargetSpec {
            name: self.name.clone(),
            description: self.description.clone(),
            transport_type: self.transport_type,
            url: self.url.clone(),
            command: self.command.clone(),
            args: self.args.clone(),
            image: self.image.clone(),
            port: self.port,
            health_path: self.health_path.clone(),
            statefulness: self.statefulness,
            isolation_boundary: self.isolation_boundary,
            auth_type: self.auth_type,
            auth_header_name: self.auth_header_name.clone(),
            enabled: self.enabled,
            env_keys: self.env_keys.clone(),
            audit_arguments: self.audit_arguments,
        }
    }

    /// The declaration of env key `name`, if the target has one.
    pub fn env_key(&self, name: &str) -> Option<&EnvKey> {
        self.env_keys.iter().find(|k| k.name == name)
    }
}

/// The associated data binding a sealed secret to its row: a ciphertext copied to another
/// target, scope, key or kind does not open.
pub fn secret_aad(
    target_id: Uuid,
    kind: reflow_common::model::SecretKind,
    scope: &Scope,
    name: &str,
) -> reflow_common::crypto::Aad {
    reflow_common::crypto::Aad::new(
        "target_secret",
        &[&target_id.to_string(), kind.as_str(), scope.kind().as_str(), scope.value(), name],
    )
}

/// A sealed secret of a target at one scope. `name` is the env key, or empty for the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEntry {
    pub target_id: Uuid,
    pub kind: SecretKind,
    pub scope: Scope,
    pub name: String,
    pub ciphertext: Vec<u8>,
    pub key_version: i32,
    /// What the value is for (env entries; empty for tokens).
    pub description: String,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    pub name: String,
    pub description: String,
    pub target_id: Option<Uuid>,
    pub resource_type: ResourceType,
    pub pattern: Option<String>,
    pub effect: Effect,
    pub priority: i32,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubjectSpec {
    pub subject_type: SubjectType,
    /// User id, role or group name; absent, `null` or empty for `everyone`.
    #[serde(default, deserialize_with = "null_as_empty")]
    #[schema(value_type = Option<String>)]
    pub subject_value: String,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Option::<String>::deserialize(deserializer).map(Option::unwrap_or_default)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct PolicySubject {
    pub id: Uuid,
    pub policy_id: Uuid,
    pub subject_type: SubjectType,
    /// User id, role or group name; `null` for `everyone`.
    #[serde(serialize_with = "empty_as_null")]
    #[schema(value_type = Option<String>)]
    pub subject_value: String,
    pub created_at: DateTime<Utc>,
}

fn empty_as_null<S: serde::Serializer>(value: &str, serializer: S) -> Result<S::Ok, S::Error> {
    if value.is_empty() {
        serializer.serialize_none()
    } else {
        serializer.serialize_str(value)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Policy {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    /// The target the policy applies to; `null` for every target.
    pub target_id: Option<Uuid>,
    pub resource_type: ResourceType,
    /// Anchored glob on the unprefixed tool, prompt or resource name; `null` matches all.
    pub pattern: Option<String>,
    pub effect: Effect,
    /// Higher is evaluated first; at equal priority deny wins.
    pub priority: i32,
    pub enabled: bool,
    pub subjects: Vec<PolicySubject>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Everything snapshots are compiled from, read in one consistent transaction.
#[derive(Debug, Clone, Default)]
pub struct StoreState {
    pub users: Vec<User>,
    pub targets: Vec<Target>,
    pub policies: Vec<Policy>,
    /// Tokens with the SHA-256 of their secret.
    pub api_tokens: Vec<(ApiToken, Vec<u8>)>,
    pub secrets: Vec<SecretEntry>,
    /// The keys that seal MCP session ids, oldest first.
    pub session_keys: Vec<SessionKeyEntry>,
}

/// A key that seals MCP session ids (32 random bytes, stored sealed with the store keyring).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKeyEntry {
    pub generation: i64,
    pub ciphertext: Vec<u8>,
    pub created_at: DateTime<Utc>,
    /// When ids sealed with it stop opening; unset for the newest key.
    pub retire_at: Option<DateTime<Utc>>,
}

/// The associated data of a stored session key.
pub fn session_key_aad() -> reflow_common::crypto::Aad {
    reflow_common::crypto::Aad::new("session_key", &[])
}

/// A rejected snapshot version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Rejection {
    pub version: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// What the control plane knows of a data plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct DataPlaneStatus {
    pub node_id: String,
    pub group: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub build_version: String,
    /// The control-plane replica it is (or was last) connected to.
    pub control_plane_id: String,
    /// Connected now: its stream is open and it was seen within the last minute.
    pub connected: bool,
    pub connected_since: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub acked_version: Option<String>,
    pub acked_at: Option<DateTime<Utc>>,
    pub last_rejection: Option<Rejection>,
    /// The upstream processes it runs, as it last reported them.
    pub instances: Vec<InstanceStatus>,
    /// Recycles, restarts and target health, as it last reported them.
    #[serde(flatten)]
    pub report: PlaneReport,
}

/// What a data plane reports beyond its processes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlaneReport {
    /// MCP client sessions it holds.
    #[serde(default)]
    pub sessions: u32,
    /// Bytes of audit records waiting in its spool for the control plane.
    #[serde(default)]
    pub audit_spool_bytes: u64,
    /// Per user: the latest session generation applied, and how many sessions it recycled.
    #[serde(default)]
    pub recycled: Vec<Applied>,
    /// Per target: the latest restart generation applied, and how many processes it stopped.
    #[serde(default)]
    pub restarted: Vec<Applied>,
    /// Per target: its health on this data plane.
    #[serde(default)]
    pub targets: Vec<TargetHealth>,
}

/// A recycle or restart a data plane applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Applied {
    /// The user id or target id.
    pub id: String,
    pub generation: i64,
    pub count: u32,
}

/// A target's health on one data plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TargetHealth {
    pub target_id: String,
    /// Client sessions holding an upstream session to it.
    pub sessions: u32,
    /// Its running processes.
    pub processes: u32,
    pub last_ok_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    /// Why the last failure happened; for a STDIO server that exited, the tail of its stderr
    /// with credentials masked.
    pub last_failure: Option<String>,
    /// Failed exchanges since the data plane started.
    pub failures: u64,
}

/// One upstream process a data plane runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceStatus {
    pub target_id: String,
    /// The isolation scope it serves: empty (shared), `role:…`, `groups:…` or `user:…`.
    pub scope: String,
    pub pid: u32,
    pub started_at: DateTime<Utc>,
    /// To the minute.
    pub last_used_at: DateTime<Utc>,
}

/// A control-plane replica and the snapshot version it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ControlPlaneStatus {
    pub id: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

/// What names a stored secret: target, kind, scope and name (the env key; empty for a token).
pub type SecretKey = (Uuid, SecretKind, Scope, String);

impl SecretEntry {
    pub fn key(&self) -> SecretKey {
        (self.target_id, self.kind, self.scope.clone(), self.name.clone())
    }
}

/// The owner labels of resources managed from declarative configuration.
#[derive(Debug, Clone, Default)]
pub struct Owners {
    pub targets: HashMap<Uuid, String>,
    pub policies: HashMap<Uuid, String>,
    pub secrets: HashMap<SecretKey, String>,
}

/// One write of a declarative apply ([`super::Store::apply_writes`]). An `owner` of `None`
/// leaves the resource's label as it is.
#[derive(Debug, Clone)]
pub enum Write {
    CreateTarget {
        id: Uuid,
        spec: TargetSpec,
        owner: Option<String>,
    },
    UpdateTarget {
        id: Uuid,
        spec: TargetSpec,
        owner: Option<String>,
    },
    DeleteTarget(Uuid),
    CreatePolicy {
        id: Uuid,
        spec: PolicySpec,
        subjects: Vec<SubjectSpec>,
        owner: Option<String>,
    },
    UpdatePolicy {
        id: Uuid,
        spec: PolicySpec,
        subjects: Vec<SubjectSpec>,
        owner: Option<String>,
    },
    DeletePolicy(Uuid),
    /// A user's role and groups.
    SetUser {
        id: Uuid,
        role: String,
        groups: Vec<String>,
    },
    /// Stores (or replaces) a sealed value.
    PutSecret {
        entry: SecretEntry,
        owner: Option<String>,
    },
    SetSecretOwner {
        key: SecretKey,
        owner: String,
    },
    DeleteSecret(SecretKey),
}
