//! Declarative configuration: one document of targets, policies, users' roles and groups and
//! credential references, planned against the stored state and applied in one transaction.
//!
//! A document describes resources whole: a field it leaves out takes its default, exactly as a
//! REST create would give it, so planning compares normalised specs and an unchanged resource
//! never shows as changed. Every resource is checked by the REST API's own validation
//! (`targets::build_spec`, `policies::check_spec`, `credentials::check_write` …) before anything
//! is written, and the writes go to [`crate::store::Store::apply_writes`] as one transaction, so
//! a document with one bad resource changes nothing. The compiler is told once, after commit:
//! one apply is one recompile.
//!
//! Names are the stable keys: targets and policies by name, users by email, credentials by
//! (target, kind, scope, scope value, key). Users are only updated (role and groups), never
//! created or deleted here. Credential values never travel in the document files: the client
//! resolves `value_from` (an environment variable or a file) and sends the value; a reference
//! without a value asserts the stored value exists and leaves it as it is.
//!
//! Owner labels: each target, policy and credential the document writes gets its own `owner`
//! or else the document's; with `prune`, resources carrying the document's owner that it no
//! longer lists are deleted — no others.

use std::collections::{BTreeSet, HashMap, HashSet};

use bytes::Bytes;
use prost::Message as _;
use reflow_common::credentials::{Scope, ScopeKind};
use reflow_proto::admin::v1 as pb;
use serde_json::{Map, Value as Json};
use uuid::Uuid;

use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::Caller;
use crate::api::{credentials, policies, targets, users, AppState};
use crate::store::{
    Owners, Policy, PolicySpec, SecretEntry, SecretKey, SecretKind, StoreState, SubjectSpec, SubjectType, Target,
    TargetSpec, User, Write,
};

/// Serves the management methods that have no REST twin.
pub async fn serve_native(state: &AppState, caller: &Caller, method: &str, request: &[u8]) -> ApiResult<Bytes> {
    caller.require_admin()?;
    let bad_message = |e: prost::DecodeError| ApiError::bad_request(format!("malformed request: {e}"));
    match method {
        "Apply" => {
            let request = pb::ApplyRequest::decode(request).map_err(bad_message)?;
            let answer = apply(state, caller, request).await?;
            Ok(answer.encode_to_vec().into())
        }
        "Dump" => Ok(dump(state).await?.encode_to_vec().into()),
        other => Err(ApiError::not_found(format!("method {other}"))),
    }
}

/// Plans `request.document` against the stored state and, unless it is a dry run or nothing
/// changes, writes the plan in one transaction.
pub async fn apply(state: &AppState, caller: &Caller, request: pb::ApplyRequest) -> ApiResult<pb::ApplyResponse> {
    let document = request.document.unwrap_or_default();
    let current = state.store.load_state().await?;
    let owners = state.store.owners().await?;
    let plan = plan(state, caller, &document, &current, &owners, request.prune).await?;
    let mut versions = state.hub.subscribe();
    let before = versions.borrow().as_ref().map(|s| s.version.clone());
    let changed = plan.changes.iter().any(|c| c.action != "unchanged");
    let applied = changed && !request.dry_run;
    if applied {
        let writes = plan.writes.len();
        state.store.apply_writes(plan.writes).await?;
        tracing::info!(admin = %caller.user.id, writes, owner = %document.owner, prune = request.prune, "declarative configuration applied");
        state.hub.changed();
    }
    // The snapshot the apply led to: a change that data planes see gives a new version, which
    // the compiler publishes moments after it is told (an owner label alone gives none).
    if applied {
        let changed = versions.wait_for(|s| s.as_ref().map(|s| &s.version) != before.as_ref());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), changed).await;
    }
    let snapshot_version = state.hub.current().map(|s| s.version.clone());
    Ok(pb::ApplyResponse { changes: plan.changes, applied, snapshot_version })
}

#[derive(Debug, Default)]
struct Plan {
    changes: Vec<pb::Change>,
    writes: Vec<Write>,
}

impl Plan {
    fn note(&mut self, action: &str, kind: &str, name: impl Into<String>, fields: Vec<String>) {
        self.changes.push(pb::Change { action: action.into(), kind: kind.into(), name: name.into(), fields });
    }
}

/// `error`, said of `at` (such as `targets[3]`): its field path grows by the field it names.
fn at(at: &str, error: ApiError) -> ApiError {
    let field = super::grpc::field_of(&error.message);
    let message = if field.is_empty() { format!("{at}: {}", error.message) } else { format!("{at}.{}", error.message) };
    ApiError { message, ..error }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message)
}

/// The owner label a resource gets: its own, else the document's; `None` leaves it as stored.
fn owner_of(own: &Option<String>, document: &pb::Document) -> Option<String> {
    own.clone().filter(|o| !o.is_empty()).or_else(|| Some(document.owner.clone()).filter(|o| !o.is_empty()))
}

fn check_owner(field: &str, owner: &Option<String>) -> ApiResult<()> {
    match owner {
        Some(owner) if owner.len() > 128 || owner.chars().any(char::is_control) => {
            Err(bad(format!("{field}: at most 128 characters without control characters")))
        }
        _ => Ok(()),
    }
}

/// A declared target as the REST API's target input.
pub fn target_spec(target: &pb::DeclaredTarget, stdio: &reflow_common::config::StdioConfig) -> ApiResult<TargetSpec> {
    let mut json = Map::new();
    let mut put = |name: &str, value: Json| {
        json.insert(name.to_string(), value);
    };
    put("name", target.name.clone().into());
    put("description", target.description.clone().into());
    let optional = [
        ("transport_type", &target.transport_type),
        ("url", &target.url),
        ("command", &target.command),
        ("image", &target.image),
        ("health_path", &target.health_path),
        ("statefulness", &target.statefulness),
        ("isolation_boundary", &target.isolation_boundary),
        ("auth_type", &target.auth_type),
        ("auth_header_name", &target.auth_header_name),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            put(name, value.clone().into());
        }
    }
    put("args", target.args.clone().into());
    if let Some(port) = target.port {
        put("port", port.into());
    }
    if let Some(enabled) = target.enabled {
        put("enabled", enabled.into());
    }
    if let Some(audit) = target.audit_arguments {
        put("audit_arguments", audit.into());
    }
    let keys: Vec<Json> = target
        .env_keys
        .iter()
        .map(|k| {
            let mut key = Map::new();
            key.insert("name".into(), k.name.clone().into());
            key.insert("description".into(), k.description.clone().into());
            if !k.scopes.is_empty() {
                key.insert("scopes".into(), k.scopes.clone().into());
            }
            key.insert("user_settable".into(), k.user_settable.into());
            Json::Object(key)
        })
        .collect();
    put("env_keys", keys.into());
    let input: targets::TargetInput =
        serde_json::from_value(Json::Object(json)).map_err(|e| bad(format!("invalid target: {e}")))?;
    targets::build_spec(input, None, stdio)
}

/// The stored state, as the documents name it.
struct Names<'a> {
    users_by_email: HashMap<&'a str, &'a User>,
    users_by_id: HashMap<Uuid, &'a User>,
}

impl<'a> Names<'a> {
    fn new(state: &'a StoreState) -> Self {
        Names {
            users_by_email: state.users.iter().map(|u| (u.email.as_str(), u)).collect(),
            users_by_id: state.users.iter().map(|u| (u.id, u)).collect(),
        }
    }

    fn user(&self, email: &str) -> ApiResult<&'a User> {
        let email = crate::api::auth::normalize_email(email)?;
        self.users_by_email.get(email.as_str()).copied().ok_or_else(|| bad(format!("no user with email {email:?}")))
    }

    fn email(&self, id: &str) -> String {
        id.parse::<Uuid>()
            .ok()
            .and_then(|id| self.users_by_id.get(&id))
            .map_or_else(|| id.to_string(), |u| u.email.clone())
    }
}

/// What differs between two JSON objects, by field.
fn differing(a: &Json, b: &Json) -> Vec<String> {
    let (Json::Object(a), Json::Object(b)) = (a, b) else { return vec![String::new()] };
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).cloned().collect()
}

/// A target as stored from `spec` (what the credential rules and the comparison look at).
fn target_from(id: Uuid, spec: &TargetSpec) -> Target {
    let spec = spec.clone();
    Target {
        id,
        name: spec.name,
        description: spec.description,
        transport_type: spec.transport_type,
        url: spec.url,
        command: spec.command,
        args: spec.args,
        image: spec.image,
        port: spec.port,
        health_path: spec.health_path,
        statefulness: spec.statefulness,
        isolation_boundary: spec.isolation_boundary,
        auth_type: spec.auth_type,
        auth_header_name: spec.auth_header_name,
        enabled: spec.enabled,
        env_keys: spec.env_keys,
        audit_arguments: spec.audit_arguments,
        restart_generation: 0,
        created_at: chrono::DateTime::UNIX_EPOCH,
        updated_at: chrono::DateTime::UNIX_EPOCH,
    }
}

fn target_json(spec: &TargetSpec) -> Json {
    serde_json::to_value(target_from(Uuid::nil(), spec)).expect("targets serialise")
}

fn parse_choice<T: serde::de::DeserializeOwned>(field: &str, value: &str) -> ApiResult<T> {
    serde_json::from_value(Json::String(value.to_string())).map_err(|e| bad(format!("{field}: {e}")))
}

fn policy_json(spec: &PolicySpec, subjects: &[SubjectSpec]) -> Json {
    let mut subjects: Vec<(String, String)> =
        subjects.iter().map(|s| (s.subject_type.as_str().to_string(), s.subject_value.clone())).collect();
    subjects.sort();
    serde_json::json!({
        "name": spec.name, "description": spec.description, "target_id": spec.target_id,
        "resource_type": spec.resource_type, "pattern": spec.pattern, "effect": spec.effect,
        "priority": spec.priority, "enabled": spec.enabled, "subjects": subjects,
    })
}

fn stored_policy_spec(policy: &Policy) -> (PolicySpec, Vec<SubjectSpec>) {
    let spec = PolicySpec {
        name: policy.name.clone(),
        description: policy.description.clone(),
        target_id: policy.target_id,
        resource_type: policy.resource_type,
        pattern: policy.pattern.clone(),
        effect: policy.effect,
        priority: policy.priority,
        enabled: policy.enabled,
    };
    let subjects = policy
        .subjects
        .iter()
        .map(|s| SubjectSpec { subject_type: s.subject_type, subject_value: s.subject_value.clone() })
        .collect();
    (spec, subjects)
}

fn secret_name(target: &str, key: &SecretKey, names: &Names<'_>) -> String {
    let (_, kind, scope, name) = key;
    let mut out = format!("{target}/{}/{}", kind.as_str(), scope.kind().as_str());
    match scope {
        Scope::Default => {}
        Scope::User(id) => out.push_str(&format!("/{}", names.email(id))),
        other => out.push_str(&format!("/{}", other.value())),
    }
    if !name.is_empty() {
        out.push_str(&format!("/{name}"));
    }
    out
}

async fn plan(
    state: &AppState,
    caller: &Caller,
    document: &pb::Document,
    current: &StoreState,
    owners: &Owners,
    prune: bool,
) -> ApiResult<Plan> {
    let names = Names::new(current);
    let user_id = |email: &str| names.user(email).map(|u| u.id.to_string());
    let mut plan = Plan::default();
    let document_owner = Some(document.owner.clone()).filter(|o| !o.is_empty());
    check_owner("owner", &document_owner)?;
    if prune && document_owner.is_none() {
        return Err(bad("owner: required to prune (only resources carrying the document's owner are deleted)"));
    }

    // Targets, by name.
    let stored_targets: HashMap<&str, &Target> = current.targets.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut target_ids: HashMap<String, Uuid> = current.targets.iter().map(|t| (t.name.clone(), t.id)).collect();
    let mut planned: HashMap<Uuid, Target> = current.targets.iter().map(|t| (t.id, t.clone())).collect();
    let mut declared_targets = HashSet::new();
    for (i, declared) in document.targets.iter().enumerate() {
        let here = format!("targets[{i}]");
        let spec = target_spec(declared, &state.settings.stdio).map_err(|e| at(&here, e))?;
        check_owner(&format!("{here}.owner"), &declared.owner)?;
        if !declared_targets.insert(spec.name.clone()) {
            return Err(bad(format!("{here}.name: target {:?} is declared twice", spec.name)));
        }
        let owner = owner_of(&declared.owner, document);
        match stored_targets.get(spec.name.as_str()) {
            None => {
                let id = Uuid::new_v4();
                target_ids.insert(spec.name.clone(), id);
                planned.insert(id, target_from(id, &spec));
                plan.note("create", "target", &spec.name, Vec::new());
                plan.writes.push(Write::CreateTarget { id, spec, owner });
            }
            Some(stored) => {
                let mut fields = differing(&target_json(&stored.spec()), &target_json(&spec));
                if owner.is_some() && owner.as_ref() != owners.targets.get(&stored.id) {
                    fields.push("owner".into());
                }
                planned.insert(stored.id, target_from(stored.id, &spec));
                if fields.is_empty() {
                    plan.note("unchanged", "target", &spec.name, Vec::new());
                } else {
                    plan.note("update", "target", &spec.name, fields);
                    plan.writes.push(Write::UpdateTarget { id: stored.id, spec, owner });
                }
            }
        }
    }

    // What pruning deletes among the targets: nothing the document still names may refer to it.
    let pruned_targets: HashMap<Uuid, &str> = match (&document_owner, prune) {
        (Some(owner), true) => current
            .targets
            .iter()
            .filter(|t| owners.targets.get(&t.id) == Some(owner) && !declared_targets.contains(&t.name))
            .map(|t| (t.id, t.name.as_str()))
            .collect(),
        _ => HashMap::new(),
    };
    let refers = |here: &str, target_id: Option<Uuid>| match target_id.and_then(|id| pruned_targets.get(&id)) {
        Some(name) => Err(bad(format!(
            "{here}.target: target {name:?} is pruned by this document (its owner's, and not declared)"
        ))),
        None => Ok(()),
    };

    // Users: role and groups of existing accounts. Promotions go first, so that handing the
    // admin role from one account to another never leaves the gateway without an admin.
    let mut user_writes = Vec::new();
    let mut declared_users = HashSet::new();
    for (i, declared) in document.users.iter().enumerate() {
        let here = format!("users[{i}]");
        let user = names.user(&declared.email).map_err(|e| at(&format!("{here}.email"), e))?;
        if !declared_users.insert(user.id) {
            return Err(bad(format!("{here}.email: user {:?} is declared twice", user.email)));
        }
        let role =
            if declared.role.is_empty() { crate::store::DEFAULT_ROLE.to_string() } else { declared.role.clone() };
        users::check_role(&role).map_err(|e| at(&here, e))?;
        users::check_groups(&declared.groups).map_err(|e| at(&here, e))?;
        let mut groups = declared.groups.clone();
        groups.sort();
        groups.dedup();
        let mut fields = Vec::new();
        if role != user.role {
            fields.push("role".to_string());
        }
        if groups != user.groups {
            fields.push("groups".to_string());
        }
        if fields.is_empty() {
            plan.note("unchanged", "user", &user.email, fields);
        } else {
            plan.note("update", "user", &user.email, fields);
            let promotes = role == crate::store::ADMIN_ROLE;
            user_writes.push((promotes, Write::SetUser { id: user.id, role, groups }));
        }
    }
    user_writes.sort_by_key(|(promotes, _)| !promotes);

    // Policies, by name.
    let stored_policies: HashMap<&str, &Policy> = current.policies.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut declared_policies = HashSet::new();
    for (i, declared) in document.policies.iter().enumerate() {
        let here = format!("policies[{i}]");
        check_owner(&format!("{here}.owner"), &declared.owner)?;
        let spec = declared_policy(declared, &target_ids).map_err(|e| at(&here, e))?;
        refers(&here, spec.target_id)?;
        if !declared_policies.insert(spec.name.clone()) {
            return Err(bad(format!("{here}.name: policy {:?} is declared twice", spec.name)));
        }
        let subjects = declared_subjects(&declared.subjects, &user_id).map_err(|e| at(&here, e))?;
        let owner = owner_of(&declared.owner, document);
        match stored_policies.get(spec.name.as_str()) {
            None => {
                plan.note("create", "policy", &spec.name, Vec::new());
                plan.writes.push(Write::CreatePolicy { id: Uuid::new_v4(), spec, subjects, owner });
            }
            Some(stored) => {
                let (stored_spec, stored_subjects) = stored_policy_spec(stored);
                let mut fields =
                    differing(&policy_json(&stored_spec, &stored_subjects), &policy_json(&spec, &subjects));
                if owner.is_some() && owner.as_ref() != owners.policies.get(&stored.id) {
                    fields.push("owner".into());
                }
                if fields.is_empty() {
                    plan.note("unchanged", "policy", &spec.name, Vec::new());
                } else {
                    plan.note("update", "policy", &spec.name, fields);
                    plan.writes.push(Write::UpdatePolicy { id: stored.id, spec, subjects, owner });
                }
            }
        }
    }

    // Credentials, by target, kind, scope and key.
    let stored_secrets: HashMap<SecretKey, &SecretEntry> = current.secrets.iter().map(|s| (s.key(), s)).collect();
    let mut declared_secrets = HashSet::new();
    for (i, declared) in document.credentials.iter().enumerate() {
        let here = format!("credentials[{i}]");
        check_owner(&format!("{here}.owner"), &declared.owner)?;
        let target_id = *target_ids
            .get(&declared.target)
            .ok_or_else(|| bad(format!("{here}.target: no target named {:?}", declared.target)))?;
        refers(&here, Some(target_id))?;
        let target = &planned[&target_id];
        let (kind, scope, name) = declared_credential(declared, &user_id).map_err(|e| at(&here, e))?;
        credentials::check_write(state, caller, target, &scope, (kind == SecretKind::Env).then_some(name.as_str()))
            .await
            .map_err(|e| at(&here, e))?;
        let key: SecretKey = (target_id, kind, scope.clone(), name.clone());
        let label = secret_name(&target.name, &key, &names);
        if !declared_secrets.insert(key.clone()) {
            return Err(bad(format!("{here}: {label} is declared twice")));
        }
        let owner = owner_of(&declared.owner, document);
        let stored = stored_secrets.get(&key);
        let owner_changes = owner.is_some() && owner.as_ref() != owners.secrets.get(&key);
        match (&declared.value, stored) {
            (None, None) => {
                return Err(bad(format!("{here}: {label} has no stored value; give it a value_from (env or file)")))
            }
            (Some(value), stored) => {
                check_value(kind, &name, value).map_err(|e| at(&here, e))?;
                let same = match stored {
                    Some(entry) => credentials::open(state, entry)? == *value,
                    None => false,
                };
                if same && !owner_changes {
                    plan.note("unchanged", "credential", label, Vec::new());
                } else if same {
                    plan.note("update", "credential", label, vec!["owner".into()]);
                    plan.writes.push(Write::SetSecretOwner { key, owner: owner.expect("owner changes") });
                } else {
                    let mut entry = credentials::seal(state, target, kind, &scope, &name, value);
                    if let Some(stored) = stored {
                        entry.description = stored.description.clone();
                    }
                    let action = if stored.is_some() { "update" } else { "create" };
                    let fields = if stored.is_some() { vec!["value".to_string()] } else { Vec::new() };
                    plan.note(action, "credential", label, fields);
                    plan.writes.push(Write::PutSecret { entry, owner });
                }
            }
            (None, Some(_)) if owner_changes => {
                plan.note("update", "credential", label, vec!["owner".into()]);
                plan.writes.push(Write::SetSecretOwner { key, owner: owner.expect("owner changes") });
            }
            (None, Some(_)) => plan.note("unchanged", "credential", label, Vec::new()),
        }
    }

    // Users after the targets and policies they may be named in; deletions last.
    plan.writes.extend(user_writes.into_iter().map(|(_, w)| w));
    if let (true, Some(owner)) = (prune, &document_owner) {
        let target_names: HashMap<Uuid, &str> = current.targets.iter().map(|t| (t.id, t.name.as_str())).collect();
        let deleted_targets: HashSet<Uuid> = pruned_targets.keys().copied().collect();
        for target in current.targets.iter().filter(|t| deleted_targets.contains(&t.id)) {
            plan.note("delete", "target", &target.name, Vec::new());
            plan.writes.push(Write::DeleteTarget(target.id));
        }
        for policy in &current.policies {
            let goes_with_target = policy.target_id.is_some_and(|t| deleted_targets.contains(&t));
            if owners.policies.get(&policy.id) == Some(owner) && !declared_policies.contains(&policy.name) {
                plan.note("delete", "policy", &policy.name, Vec::new());
                if !goes_with_target {
                    plan.writes.push(Write::DeletePolicy(policy.id));
                }
            }
        }
        for secret in &current.secrets {
            let key = secret.key();
            if owners.secrets.get(&key) == Some(owner) && !declared_secrets.contains(&key) {
                let target = target_names.get(&secret.target_id).copied().unwrap_or_default();
                plan.note("delete", "credential", secret_name(target, &key, &names), Vec::new());
                // A deleted target takes its credentials with it.
                if !deleted_targets.contains(&secret.target_id) {
                    plan.writes.push(Write::DeleteSecret(key));
                }
            }
        }
    }
    Ok(plan)
}

/// The checks a credential value passes, as the REST API checks a token or an env value.
fn check_value(kind: SecretKind, key: &str, value: &str) -> ApiResult<()> {
    match kind {
        SecretKind::Token => credentials::check_token(value),
        SecretKind::Env => credentials::check_env(&credentials::EnvBody {
            key: key.to_string(),
            value: value.to_string(),
            description: None,
        }),
    }
}

/// Finds a user's id by email.
type UserId<'a> = dyn Fn(&str) -> ApiResult<String> + 'a;

/// Checks `document` without the server: everything but what needs the stored state (users
/// by email, targets it does not declare, the STDIO allowlist). Returns what it could not check.
pub fn validate_offline(document: &pb::Document) -> ApiResult<Vec<String>> {
    let mut unchecked = Vec::new();
    check_owner("owner", &Some(document.owner.clone()))?;
    // The data planes' STDIO allowlist is the server's to check.
    let stdio = reflow_common::config::StdioConfig {
        allowed_commands: document.targets.iter().filter_map(|t| t.command.clone()).collect(),
        ..Default::default()
    };
    let mut target_ids = HashMap::new();
    for (i, declared) in document.targets.iter().enumerate() {
        let here = format!("targets[{i}]");
        let spec = target_spec(declared, &stdio).map_err(|e| at(&here, e))?;
        check_owner(&format!("{here}.owner"), &declared.owner)?;
        if target_ids.insert(spec.name.clone(), Uuid::new_v4()).is_some() {
            return Err(bad(format!("{here}.name: target {:?} is declared twice", spec.name)));
        }
    }
    let mut known = target_ids.clone();
    let named = document.policies.iter().map(|p| &p.target).chain(document.credentials.iter().map(|c| &c.target));
    for name in named.filter(|n| !n.is_empty()) {
        if !target_ids.contains_key(name) && known.insert(name.clone(), Uuid::new_v4()).is_none() {
            unchecked.push(format!("target {name:?} is not declared here; the server must have it"));
        }
    }
    let user_id = |email: &str| crate::api::auth::normalize_email(email).map(|_| Uuid::nil().to_string());
    let mut names = HashSet::new();
    for (i, declared) in document.policies.iter().enumerate() {
        let here = format!("policies[{i}]");
        let spec = declared_policy(declared, &known).map_err(|e| at(&here, e))?;
        declared_subjects(&declared.subjects, &user_id).map_err(|e| at(&here, e))?;
        if !names.insert(spec.name.clone()) {
            return Err(bad(format!("{here}.name: policy {:?} is declared twice", spec.name)));
        }
    }
    for (i, declared) in document.users.iter().enumerate() {
        let here = format!("users[{i}]");
        user_id(&declared.email).map_err(|e| at(&format!("{here}.email"), e))?;
        if !declared.role.is_empty() {
            users::check_role(&declared.role).map_err(|e| at(&here, e))?;
        }
        users::check_groups(&declared.groups).map_err(|e| at(&here, e))?;
    }
    for (i, declared) in document.credentials.iter().enumerate() {
        let here = format!("credentials[{i}]");
        let (kind, _, name) = declared_credential(declared, &user_id).map_err(|e| at(&here, e))?;
        if let Some(value) = &declared.value {
            check_value(kind, &name, value).map_err(|e| at(&here, e))?;
        }
    }
    Ok(unchecked)
}

fn declared_policy(declared: &pb::DeclaredPolicy, target_ids: &HashMap<String, Uuid>) -> ApiResult<PolicySpec> {
    let target_id = match declared.target.as_str() {
        "" => None,
        name => Some(*target_ids.get(name).ok_or_else(|| bad(format!("target: no target named {name:?}")))?),
    };
    if declared.effect.is_empty() {
        return Err(bad("effect: required (allow or deny)"));
    }
    let spec = PolicySpec {
        name: declared.name.trim().to_string(),
        description: declared.description.clone(),
        target_id,
        resource_type: match &declared.resource_type {
            Some(kind) => parse_choice("resource_type", kind)?,
            None => crate::store::ResourceType::All,
        },
        pattern: declared.pattern.clone().filter(|p| !p.is_empty()),
        effect: parse_choice("effect", &declared.effect)?,
        priority: declared.priority,
        enabled: declared.enabled.unwrap_or(true),
    };
    policies::check_spec(&spec, "pattern")?;
    Ok(spec)
}

fn declared_subjects(declared: &[pb::DeclaredSubject], user_id: &UserId<'_>) -> ApiResult<Vec<SubjectSpec>> {
    let mut subjects = Vec::with_capacity(declared.len());
    for (i, subject) in declared.iter().enumerate() {
        let here = format!("subjects[{i}]");
        let subject_type: SubjectType = parse_choice(&format!("{here}.type"), &subject.r#type)?;
        let subject_value = match subject_type {
            SubjectType::User => user_id(&subject.value).map_err(|e| at(&format!("{here}.value"), e))?,
            _ => subject.value.clone(),
        };
        let spec = SubjectSpec { subject_type, subject_value };
        policies::check_subject_value(&spec).map_err(|e| at(&here, e))?;
        subjects.push(spec);
    }
    policies::check_subject_list(&subjects)?;
    Ok(subjects)
}

fn declared_credential(
    declared: &pb::DeclaredCredential,
    user_id: &UserId<'_>,
) -> ApiResult<(SecretKind, Scope, String)> {
    if declared.value_from.is_some() {
        return Err(bad("value_from: the client resolves it into value before applying"));
    }
    let kind = SecretKind::parse(&declared.kind).ok_or_else(|| bad("kind: one of token, env"))?;
    let scope_kind =
        ScopeKind::parse(&declared.scope).ok_or_else(|| bad("scope: one of default, role, group, user"))?;
    let value = match (scope_kind, declared.scope_value.as_str()) {
        (ScopeKind::Default, "") => None,
        (ScopeKind::Default, _) => return Err(bad("scope_value: the default scope takes none")),
        (_, "") => return Err(bad("scope_value: required for this scope")),
        (ScopeKind::User, email) => Some(user_id(email).map_err(|e| at("scope_value", e))?),
        (_, value) => Some(value.to_string()),
    };
    let scope = credentials::parse_scope(scope_kind.as_str(), value.as_deref()).map_err(|e| at("scope_value", e))?;
    let name = match kind {
        SecretKind::Token if !declared.key.is_empty() => return Err(bad("key: a token has none")),
        SecretKind::Token => String::new(),
        SecretKind::Env if declared.key.is_empty() => return Err(bad("key: required for env")),
        SecretKind::Env => declared.key.clone(),
    };
    Ok((kind, scope, name))
}

/// The stored state as a document: `apply` of it changes nothing. Credentials are references
/// (no values); each resource carries its own owner label.
pub async fn dump(state: &AppState) -> ApiResult<pb::Document> {
    let current = state.store.load_state().await?;
    let owners = state.store.owners().await?;
    let names = Names::new(&current);
    let target_names: HashMap<Uuid, &str> = current.targets.iter().map(|t| (t.id, t.name.as_str())).collect();
    let mut document = pb::Document::default();
    let mut targets = current.targets.clone();
    targets.sort_by(|a, b| a.name.cmp(&b.name));
    for t in &targets {
        document.targets.push(pb::DeclaredTarget {
            name: t.name.clone(),
            owner: owners.targets.get(&t.id).cloned(),
            description: t.description.clone(),
            transport_type: Some(choice(&t.transport_type)),
            url: t.url.clone(),
            command: t.command.clone(),
            args: t.args.clone(),
            image: t.image.clone(),
            port: t.port,
            health_path: t.health_path.clone(),
            statefulness: Some(choice(&t.statefulness)),
            isolation_boundary: Some(choice(&t.isolation_boundary)),
            auth_type: Some(choice(&t.auth_type)),
            auth_header_name: t.auth_header_name.clone(),
            enabled: Some(t.enabled),
            env_keys: t
                .env_keys
                .iter()
                .map(|k| pb::EnvKey {
                    name: k.name.clone(),
                    description: k.description.clone(),
                    scopes: k.scopes.iter().map(|s| s.as_str().to_string()).collect(),
                    user_settable: k.user_settable,
                })
                .collect(),
            audit_arguments: Some(t.audit_arguments),
        });
    }
    let mut policies = current.policies.clone();
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    for p in &policies {
        document.policies.push(pb::DeclaredPolicy {
            name: p.name.clone(),
            owner: owners.policies.get(&p.id).cloned(),
            description: p.description.clone(),
            target: p.target_id.and_then(|id| target_names.get(&id)).map(|n| n.to_string()).unwrap_or_default(),
            resource_type: Some(choice(&p.resource_type)),
            pattern: p.pattern.clone(),
            effect: choice(&p.effect),
            priority: p.priority,
            enabled: Some(p.enabled),
            subjects: p
                .subjects
                .iter()
                .map(|s| pb::DeclaredSubject {
                    r#type: choice(&s.subject_type),
                    value: match s.subject_type {
                        SubjectType::User => names.email(&s.subject_value),
                        _ => s.subject_value.clone(),
                    },
                })
                .collect(),
        });
    }
    let mut users = current.users.clone();
    users.sort_by(|a, b| a.email.cmp(&b.email));
    for u in &users {
        document.users.push(pb::DeclaredUser {
            email: u.email.clone(),
            role: u.role.clone(),
            groups: u.groups.clone(),
        });
    }
    for s in &current.secrets {
        let Some(target) = target_names.get(&s.target_id) else { continue };
        document.credentials.push(pb::DeclaredCredential {
            target: target.to_string(),
            owner: owners.secrets.get(&s.key()).cloned(),
            kind: s.kind.as_str().to_string(),
            scope: s.scope.kind().as_str().to_string(),
            scope_value: match &s.scope {
                Scope::Default => String::new(),
                Scope::User(id) => names.email(id),
                other => other.value().to_string(),
            },
            key: s.name.clone(),
            value: None,
            value_from: None,
        });
    }
    document.credentials.sort_by(|a, b| {
        (&a.target, &a.kind, &a.scope, &a.scope_value, &a.key).cmp(&(
            &b.target,
            &b.kind,
            &b.scope,
            &b.scope_value,
            &b.key,
        ))
    });
    Ok(document)
}

/// A choice (an enum the REST API spells) as its JSON string.
fn choice<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Json::String(s)) => s,
        _ => String::new(),
    }
}
