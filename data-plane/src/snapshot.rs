//! The snapshot as the data plane holds it: the raw resources (for diffs, hashing and the
//! cache) and a decoded, validated view (for serving).
//!
//! [`apply`] turns the current snapshot and an update into a new snapshot, or a rejection.
//! It checks everything before anything is used: the base version, each resource's hash,
//! the resulting content hash, every payload's shape, references between resources, and
//! that every sealed secret opens. A rejected update leaves the current snapshot as it was.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::Engine as _;
use reflow_common::crypto::DeterministicSealer;
use reflow_proto::resources::{self, Credential, Settings, SETTINGS_ID};
use reflow_proto::snapshot::v1::{Resource, ResourceType, SnapshotUpdate};

use reflow_proto::policy::CompiledPolicy;

/// Resources keyed by (type, id).
pub type ResourceMap = BTreeMap<(i32, String), Arc<Resource>>;

/// Why an update was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
    /// Our state does not match what the control plane diffed against: ask for everything.
    pub want_full: bool,
}

impl Rejection {
    fn diverged(reason: String) -> Self {
        Rejection { reason, want_full: true }
    }

    fn invalid(reasons: Vec<String>) -> Self {
        const SHOWN: usize = 10;
        let mut reason = reasons.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; ");
        if reasons.len() > SHOWN {
            reason.push_str(&format!("; and {} more", reasons.len() - SHOWN));
        }
        Rejection { reason, want_full: false }
    }
}

/// JWT verification: the control plane's public key (a data plane cannot mint tokens), built
/// once per snapshot.
pub struct JwtSettings {
    pub issuer: String,
    pub audience: String,
    pub verifier: reflow_common::jwt::Verifier,
    /// Tokens verified under this key.
    pub verified: VerifiedTokens,
}

impl std::fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSettings")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// The decoded view a request is served from.
#[derive(Debug)]
pub struct View {
    pub jwt: JwtSettings,
    pub users: HashMap<String, resources::User>,
    /// API tokens by the hex SHA-256 of the token.
    pub tokens_by_hash: HashMap<String, resources::ApiToken>,
    /// Targets by name.
    pub targets: BTreeMap<String, resources::Target>,
    /// Enabled policies with compiled patterns, highest priority first.
    pub policies: Vec<CompiledPolicy>,
    /// Sealed credentials; opened when a request needs them.
    pub credentials: Vec<Credential>,
    /// The keys session ids are sealed with; unset when the control plane sent none.
    pub session_seal: Option<crate::mcp::ticket::SessionSeal>,
}

/// One accepted snapshot.
#[derive(Debug)]
pub struct DataSnapshot {
    pub version: String,
    pub resources: ResourceMap,
    pub view: View,
}

fn kind_name(kind: i32) -> String {
    ResourceType::try_from(kind).map(|k| k.as_str_name().to_string()).unwrap_or_else(|_| format!("type {kind}"))
}

/// Applies `update` on top of `current`.
pub fn apply(
    current: Option<&DataSnapshot>,
    update: &SnapshotUpdate,
    sealer: &DeterministicSealer,
) -> Result<DataSnapshot, Rejection> {
    let mut map = if update.base_version.is_empty() {
        ResourceMap::new()
    } else {
        match current {
            Some(current) if current.version == update.base_version => current.resources.clone(),
            Some(current) => {
                return Err(Rejection::diverged(format!(
                    "update is based on {} but this data plane holds {}",
                    update.base_version, current.version
                )))
            }
            None => {
                return Err(Rejection::diverged(format!(
                    "update is based on {} but this data plane holds no snapshot",
                    update.base_version
                )))
            }
        }
    };
    let mut errors = Vec::new();
    for removal in &update.removals {
        map.remove(&(removal.r#type, removal.id.clone()));
    }
    for resource in &update.upserts {
        // A type this build does not know is kept (it counts toward the version) and ignored;
        // one it must understand says so in `requires`.
        if resource.r#type == ResourceType::Unspecified as i32 {
            errors.push(format!("resource {:?} has no type", resource.id));
            continue;
        }
        let missing: Vec<&str> = resource
            .requires
            .iter()
            .map(String::as_str)
            .filter(|feature| !resources::UNDERSTOOD.contains(feature))
            .collect();
        if !missing.is_empty() {
            errors.push(format!(
                "{} {:?} requires {} which this data plane (build {}) does not implement: upgrade it",
                kind_name(resource.r#type),
                resource.id,
                missing.join(", "),
                env!("CARGO_PKG_VERSION")
            ));
            continue;
        }
        if resources::resource_version(&resource.payload) != resource.version {
            errors.push(format!(
                "{} {:?}: payload does not match its version",
                kind_name(resource.r#type),
                resource.id
            ));
            continue;
        }
        map.insert((resource.r#type, resource.id.clone()), Arc::new(resource.clone()));
    }
    if !errors.is_empty() {
        return Err(Rejection::invalid(errors));
    }
    let version = resources::snapshot_version(map.values().map(|r| (r.r#type, r.id.as_str(), r.version.as_str())));
    if version != update.version {
        return Err(Rejection::diverged(format!(
            "the resulting state hashes to {version}, not the announced {}",
            update.version
        )));
    }
    let view = decode(&map, sealer).map_err(Rejection::invalid)?;
    Ok(DataSnapshot { version, resources: map, view })
}

fn decode(map: &ResourceMap, sealer: &DeterministicSealer) -> Result<View, Vec<String>> {
    let mut errors = Vec::new();
    let mut settings: Option<Settings> = None;
    let mut users = HashMap::new();
    let mut tokens = Vec::new();
    let mut targets_by_id = HashMap::new();
    let mut policies = Vec::new();
    let mut credentials = Vec::new();
    fn parse<T: serde::de::DeserializeOwned>(resource: &Resource, errors: &mut Vec<String>) -> Option<T> {
        serde_json::from_slice(&resource.payload)
            .map_err(|e| errors.push(format!("{} {:?}: {e}", kind_name(resource.r#type), resource.id)))
            .ok()
    }
    for ((kind, id), resource) in map {
        match ResourceType::try_from(*kind) {
            Ok(ResourceType::Settings) if id == SETTINGS_ID => settings = parse(resource, &mut errors),
            Ok(ResourceType::User) => {
                if let Some(user) = parse::<resources::User>(resource, &mut errors) {
                    users.insert(user.id.clone(), user);
                }
            }
            Ok(ResourceType::ApiToken) => tokens.extend(parse::<resources::ApiToken>(resource, &mut errors)),
            Ok(ResourceType::Target) => {
                if let Some(target) = parse::<resources::Target>(resource, &mut errors) {
                    targets_by_id.insert(target.id.clone(), target);
                }
            }
            Ok(ResourceType::Policy) => policies.extend(parse::<resources::Policy>(resource, &mut errors)),
            Ok(ResourceType::Credential) => credentials.extend(parse::<Credential>(resource, &mut errors)),
            Ok(ResourceType::Settings) => errors.push(format!("unexpected settings resource {id:?}")),
            Ok(ResourceType::Unspecified) => errors.push(format!("resource {id:?} has no type")),
            // From a newer control plane, and nothing this build needs (see `requires`).
            Err(_) => tracing::debug!(kind, id, "a resource of a type this data plane does not know is ignored"),
        }
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut session_seal = None;
    let jwt = match settings {
        None => {
            errors.push("the settings resource is missing".into());
            None
        }
        Some(settings) if settings.jwt_algorithm != reflow_common::jwt::ALGORITHM => {
            errors.push(format!(
                "settings: unsupported JWT algorithm {:?} (this data plane verifies {} tokens only)",
                settings.jwt_algorithm,
                reflow_common::jwt::ALGORITHM
            ));
            None
        }
        Some(settings) => {
            match crate::mcp::ticket::SessionSeal::from_settings(&settings, sealer) {
                Ok(seal) => session_seal = seal,
                Err(error) => errors.push(format!("settings: {error}")),
            }
            match reflow_common::jwt::Verifier::from_encoded(
                &settings.jwt_public_key,
                &settings.jwt_issuer,
                &settings.jwt_audience,
            ) {
                Ok(verifier) => Some(JwtSettings {
                    issuer: settings.jwt_issuer,
                    audience: settings.jwt_audience,
                    verifier,
                    verified: Default::default(),
                }),
                Err(error) => {
                    errors.push(format!("settings: {error}"));
                    None
                }
            }
        }
    };
    let mut tokens_by_hash = HashMap::new();
    for token in tokens {
        if !users.contains_key(&token.user_id) {
            errors.push(format!("API token {:?} belongs to unknown user {:?}", token.id, token.user_id));
        }
        tokens_by_hash.insert(token.hash.clone(), token);
    }
    for policy in &policies {
        if let Some(target_id) = &policy.target_id {
            if !targets_by_id.contains_key(target_id) {
                errors.push(format!("policy {:?} names unknown target {target_id:?}", policy.name));
            }
        }
    }
    let mut compiled = Vec::with_capacity(policies.len());
    for policy in policies {
        let name = policy.name.clone();
        match CompiledPolicy::new(policy) {
            Ok(policy) => compiled.push(policy),
            Err(e) => errors.push(format!("policy {name:?}: {e}")),
        }
    }
    for credential in &credentials {
        if !targets_by_id.contains_key(&credential.target_id) {
            errors.push(format!("credential for unknown target {:?}", credential.target_id));
        }
        let aad = Credential::aad(&credential.target_id, credential.kind, &credential.scope, &credential.name);
        let opens = b64.decode(&credential.sealed).ok().is_some_and(|sealed| sealer.open(&sealed, &aad).is_ok());
        if !opens {
            errors.push(format!(
                "credential {:?} of target {:?} does not open with this data plane's token",
                credential.name, credential.target_id
            ));
        }
    }
    let mut targets = BTreeMap::new();
    for target in targets_by_id.into_values() {
        if let Some(previous) = targets.insert(target.name.clone(), target) {
            errors.push(format!("two targets are named {:?}", previous.name));
        }
    }
    compiled.sort_by(|a, b| b.policy.priority.cmp(&a.policy.priority).then_with(|| a.policy.name.cmp(&b.policy.name)));
    match jwt {
        Some(jwt) if errors.is_empty() => {
            Ok(View { jwt, users, tokens_by_hash, targets, policies: compiled, credentials, session_seal })
        }
        _ => Err(errors),
    }
}

/// The full state as an update with no base, for the cache.
pub fn as_full_update(snapshot: &DataSnapshot) -> SnapshotUpdate {
    SnapshotUpdate {
        version: snapshot.version.clone(),
        base_version: String::new(),
        upserts: snapshot.resources.values().map(|r| Resource::clone(r)).collect(),
        removals: Vec::new(),
        control_plane_id: String::new(),
        more: false,
        ended_sessions: Vec::new(),
    }
}
/// At most this many verified JWTs are remembered per snapshot; the memory is cleared when full.
const VERIFIED_CAPACITY: usize = 65_536;

/// JWTs already verified under one snapshot's key (a new snapshot starts empty): verifying
/// (an HMAC and two JSON decodes) is most of what authenticating a request costs, and a client
/// sends the same token with every request. A remembered token still has its time bounds
/// checked at every use, and its user looked up in the snapshot. Only tokens that verified are
/// remembered, so a client cannot fill this with garbage.
#[derive(Debug, Default)]
pub struct VerifiedTokens(std::sync::RwLock<std::collections::HashMap<String, Verified>>);

#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub(crate) sub: String,
    pub(crate) not_before: i64,
    pub(crate) expires: i64,
}

impl VerifiedTokens {
    pub(crate) fn get(&self, token: &str) -> Option<Verified> {
        self.0.read().unwrap().get(token).cloned()
    }

    pub(crate) fn remember(&self, token: &str, verified: Verified) {
        let mut tokens = self.0.write().unwrap();
        if tokens.len() >= VERIFIED_CAPACITY {
            tokens.clear();
        }
        tokens.insert(token.to_string(), verified);
    }
}
