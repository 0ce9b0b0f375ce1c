//! The payloads of snapshot resources and their hashes.
//!
//! Each resource travels as JSON inside a [`Resource`]: the control plane serialises these
//! structs, the data plane decodes them and validates the whole set before applying it.
//! Secrets inside (credential values, the JWT secret) are sealed with a
//! [`DeterministicSealer`] derived from the data-plane token, so equal state gives equal
//! bytes on every control-plane replica, and the snapshot version is a content hash.
//!
//! # Compatibility between releases
//!
//! A control plane and its data planes may be a release apart, either way round, while a fleet
//! upgrades:
//! - a payload's unknown fields are ignored, and every field added later has a default
//!   (`#[serde(default)]`), so an older payload reads in a newer data plane;
//! - a resource of a type a data plane does not know is kept (its hash counts toward the
//!   snapshot version) and otherwise ignored;
//! - a change an older data plane must not ignore — a field whose absence would allow more, a
//!   new enum value — names a feature in [`Resource::requires`]; a data plane that lacks one
//!   rejects the update with that name and keeps serving its snapshot (static stability).
//!   [`UNDERSTOOD`] lists what this build implements.

use reflow_common::credentials::{Isolation, Scope};
use reflow_common::crypto::{to_hex, Aad, DeterministicSealer};
use reflow_common::model::{
    AuthType, Effect, ResourceType as PolicyResourceType, SecretKind, Statefulness, SubjectType, TransportType,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::snapshot::v1::{Resource, ResourceType};

/// The features of [`Resource::requires`] this build implements (none are defined yet).
pub const UNDERSTOOD: &[&str] = &[];

/// HKDF purpose of the key that seals secrets inside snapshots.
pub const SNAPSHOT_SEAL_PURPOSE: &str = "reflow/snapshot/v1";
/// HKDF purpose of the key that encrypts a data plane's on-disk snapshot cache.
pub const CACHE_KEY_PURPOSE: &str = "reflow/snapshot-cache/v1";
/// The id of the single settings resource.
pub const SETTINGS_ID: &str = "settings";

/// The sealer both ends derive from the data-plane token.
pub fn snapshot_sealer(data_plane_token: &str) -> DeterministicSealer {
    DeterministicSealer::from_secret(data_plane_token.as_bytes(), SNAPSHOT_SEAL_PURPOSE)
}

/// Gateway-wide settings: how to verify the JWTs the control plane issues. Only the public
/// key travels: a data plane can verify tokens, never mint one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub jwt_issuer: String,
    pub jwt_audience: String,
    /// Always `EdDSA` (Ed25519) for the control plane's own tokens.
    pub jwt_algorithm: String,
    /// The Ed25519 public key, base64url.
    pub jwt_public_key: String,
    /// The keys MCP session ids are sealed with, oldest first (absent from a control plane
    /// that predates them: session ids then stay on the data plane that issued them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub session_keys: Vec<SessionKey>,
}

/// A key that seals MCP session ids: the newest seals new ids, and each one opens ids until its
/// `retire_at`. The key is sealed for the data planes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionKey {
    pub generation: u32,
    /// 32 bytes, sealed (base64).
    pub sealed: String,
    /// Unix seconds from which it seals new ids, so that every data plane holds it before an
    /// id needs it; unset: at once.
    #[serde(default)]
    pub active_at: Option<i64>,
    /// Unix seconds from which its ids no longer open; unset for the newest key.
    #[serde(default)]
    pub retire_at: Option<i64>,
}

impl SessionKey {
    pub fn aad(generation: u32) -> Aad {
        Aad::new("snapshot_session_key", &[&generation.to_string()])
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub email: String,
    pub role: String,
    pub groups: Vec<String>,
    pub active: bool,
    /// Bumped by a recycle: the data plane recycles the user's sessions when it changes.
    #[serde(default)]
    pub session_generation: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub id: String,
    pub user_id: String,
    /// SHA-256 of the token, hex.
    pub hash: String,
    /// Unix seconds; `None` never expires.
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub id: String,
    pub name: String,
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
    /// Changes when an admin asks for the target's processes to be restarted.
    #[serde(default)]
    pub restart_generation: i64,
    /// Audit records of calls to this target keep their arguments, secrets masked.
    #[serde(default)]
    pub audit_arguments: bool,
}

impl Target {
    /// A hash of everything in a kubernetes target that shapes its pods, and of its restart
    /// generation. Data planes label the instances they start with it; when it changes (the
    /// target was edited or restarted), instances of other revisions are deleted, by data planes
    /// and by a control plane with cluster access alike.
    pub fn pod_revision(&self) -> String {
        let parts = serde_json::json!([
            self.image,
            self.port,
            self.command,
            self.args,
            self.health_path,
            self.isolation_boundary,
            self.restart_generation
        ]);
        to_hex(&Sha256::digest(parts.to_string().as_bytes()))[..16].to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    pub subject_type: SubjectType,
    pub subject_value: String,
}

/// An enabled policy. Disabled policies are not compiled into snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub id: String,
    pub name: String,
    pub target_id: Option<String>,
    pub resource_type: PolicyResourceType,
    pub pattern: Option<String>,
    pub effect: Effect,
    pub priority: i32,
    pub subjects: Vec<Subject>,
}

/// A target's token or env value at one scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub target_id: String,
    pub kind: SecretKind,
    pub scope: Scope,
    /// The env key; empty for the token.
    pub name: String,
    /// The value, sealed (base64).
    pub sealed: String,
}

impl Credential {
    pub fn resource_id(target_id: &str, kind: SecretKind, scope: &Scope, name: &str) -> String {
        format!("{target_id}/{}/{}/{}/{name}", kind.as_str(), scope.kind().as_str(), scope.value())
    }

    pub fn aad(target_id: &str, kind: SecretKind, scope: &Scope, name: &str) -> Aad {
        Aad::new("snapshot_credential", &[target_id, kind.as_str(), scope.kind().as_str(), scope.value(), name])
    }
}

/// The hash of one payload: hex SHA-256.
pub fn resource_version(payload: &[u8]) -> String {
    to_hex(&Sha256::digest(payload))
}

/// Builds a resource from its payload.
pub fn resource<T: Serialize>(kind: ResourceType, id: &str, payload: &T) -> Resource {
    let payload = serde_json::to_vec(payload).expect("resource payloads serialise");
    Resource { r#type: kind as i32, id: id.to_string(), version: resource_version(&payload), payload, requires: vec![] }
}

/// The version of a whole snapshot: a hash over every resource's (type, id, version), in
/// (type, id) order. Both ends compute it; a data plane compares its own result with the
/// version it was told, which catches any divergence.
pub fn snapshot_version<'a>(resources: impl IntoIterator<Item = (i32, &'a str, &'a str)>) -> String {
    let mut entries: Vec<(i32, &str, &str)> = resources.into_iter().collect();
    entries.sort_unstable();
    let mut hasher = Sha256::new();
    for (kind, id, version) in entries {
        hasher.update(kind.to_be_bytes());
        hasher.update((id.len() as u64).to_be_bytes());
        hasher.update(id.as_bytes());
        hasher.update(version.as_bytes());
    }
    to_hex(&hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ignores_order_and_sees_every_change() {
        let a = snapshot_version([(1, "a", "v1"), (2, "b", "v2")]);
        assert_eq!(a, snapshot_version([(2, "b", "v2"), (1, "a", "v1")]));
        assert_ne!(a, snapshot_version([(1, "a", "v1"), (2, "b", "v3")]));
        assert_ne!(a, snapshot_version([(1, "a", "v1")]));
        assert_ne!(snapshot_version([(1, "ab", "c")]), snapshot_version([(1, "a", "bc")]));
    }

    #[test]
    fn resource_hash_is_of_the_payload() {
        let user = User {
            id: "u".into(),
            email: "e".into(),
            role: "r".into(),
            groups: vec![],
            active: true,
            session_generation: 0,
        };
        let r = resource(ResourceType::User, "u", &user);
        assert_eq!(r.version, resource_version(&r.payload));
        assert_eq!(serde_json::from_slice::<User>(&r.payload).unwrap(), user);
    }
}
