//! `/api/policies`: default-deny authorization rules. Admin only.
//!
//! Nothing is allowed until a policy says so. Policies are evaluated highest priority
//! first; at equal priority a deny wins. Patterns are anchored globs (`*`, `?`) on the
//! unprefixed tool, prompt or resource name.

use std::collections::HashSet;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use reflow_common::glob;
use reflow_common::names::validate_principal_name;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{present, ApiJson, ApiPath, Caller};
use super::{AppState, Message};
use crate::store::{Effect, Policy, PolicySpec, PolicySubject, ResourceType, SubjectSpec, SubjectType};

const MAX_SUBJECTS: usize = 1000;

/// A policy definition. On create, `name` and `effect` are required; on update, fields not
/// sent keep their value, and `subjects`, when sent, replaces the subjects.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyInput {
    pub name: Option<String>,
    pub description: Option<String>,
    /// The target the policy applies to; omitted or `null` on create: every target.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Uuid>)]
    pub target_id: Option<Option<Uuid>>,
    /// Default `all`.
    pub resource_type: Option<ResourceType>,
    /// Anchored glob on the unprefixed name; `null` matches every name.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub pattern: Option<Option<String>>,
    /// The original's name for `pattern`; either may be sent (both only if equal).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub resource_pattern: Option<Option<String>>,
    pub effect: Option<Effect>,
    /// Default 0; higher is evaluated first.
    pub priority: Option<i32>,
    /// Default `true`.
    pub enabled: Option<bool>,
    pub subjects: Option<Vec<SubjectSpec>>,
}

/// Whether some enabled policy could allow `user` something on `target_id`: the grant a user
/// needs before storing values for a target, decided as data planes decide whether to open an
/// upstream session at all (`reflow_proto::policy::may_allow_any`, on the stored policies).
pub async fn granted(state: &AppState, user: &crate::store::User, target_id: Uuid) -> ApiResult<bool> {
    use reflow_proto::policy::{may_allow_any, CompiledPolicy};
    let mut policies = Vec::new();
    for policy in state.store.list_policies().await?.iter().filter(|p| p.enabled) {
        policies.push(CompiledPolicy::new(crate::compile::policy_payload(policy)).map_err(ApiError::bad_request)?);
    }
    Ok(may_allow_any(&policies, &crate::compile::user_payload(user), &target_id.to_string()))
}

/// The checks a subject passes that need no lookup: a user's id is looked up by the caller.
pub(crate) fn check_subject_value(subject: &SubjectSpec) -> ApiResult<()> {
    let value = subject.subject_value.as_str();
    match subject.subject_type {
        SubjectType::Everyone if !value.is_empty() => {
            Err(ApiError::bad_request("subjects: everyone takes no subject_value"))
        }
        SubjectType::Everyone => Ok(()),
        SubjectType::Role | SubjectType::Group => validate_principal_name(subject.subject_type.as_str(), value)
            .map_err(|e| ApiError::bad_request(format!("subjects: {e}"))),
        SubjectType::User => value
            .parse::<Uuid>()
            .map(|_| ())
            .map_err(|_| ApiError::bad_request(format!("subjects: {value:?} is not a user id"))),
    }
}

async fn check_subject(state: &AppState, subject: &SubjectSpec) -> ApiResult<()> {
    check_subject_value(subject)?;
    if subject.subject_type == SubjectType::User {
        let id: Uuid = subject.subject_value.parse().expect("checked above");
        state
            .store
            .get_user(id)
            .await?
            .ok_or_else(|| ApiError::bad_request(format!("subjects: no user with id {id}")))?;
    }
    Ok(())
}

/// The checks a list of subjects passes as a whole: its length, and no subject twice.
pub(crate) fn check_subject_list(subjects: &[SubjectSpec]) -> ApiResult<()> {
    if subjects.len() > MAX_SUBJECTS {
        return Err(ApiError::bad_request(format!("subjects: at most {MAX_SUBJECTS}")));
    }
    let mut seen = HashSet::new();
    for subject in subjects {
        if !seen.insert(subject) {
            return Err(ApiError::bad_request(format!(
                "subjects: {} {:?} is listed twice",
                subject.subject_type.as_str(),
                subject.subject_value
            )));
        }
    }
    Ok(())
}

async fn check_subjects(state: &AppState, subjects: &[SubjectSpec]) -> ApiResult<()> {
    check_subject_list(subjects)?;
    for subject in subjects {
        check_subject(state, subject).await?;
    }
    Ok(())
}

async fn build_spec(state: &AppState, input: &PolicyInput, current: Option<&Policy>) -> ApiResult<PolicySpec> {
    let name = input
        .name
        .clone()
        .or_else(|| current.map(|c| c.name.clone()))
        .ok_or_else(|| ApiError::bad_request("name: required"))?;
    let name = name.trim().to_string();
    let description = input.description.clone().or_else(|| current.map(|c| c.description.clone())).unwrap_or_default();
    let target_id = match input.target_id {
        Some(value) => value,
        None => current.and_then(|c| c.target_id),
    };
    if let Some(target_id) = target_id {
        if state.store.get_target(target_id).await?.is_none() {
            return Err(ApiError::bad_request(format!("target_id: no target with id {target_id}")));
        }
    }
    let (sent, field) = match (&input.pattern, &input.resource_pattern) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::bad_request("resource_pattern: differs from pattern; send one of them"))
        }
        (Some(value), _) => (Some(value), "pattern"),
        (None, Some(value)) => (Some(value), "resource_pattern"),
        (None, None) => (None, "pattern"),
    };
    let pattern = match sent {
        // An empty pattern, as the original's forms send for "every name", is no pattern.
        Some(value) => value.clone().filter(|p| !p.is_empty()),
        None => current.and_then(|c| c.pattern.clone()),
    };
    let spec = PolicySpec {
        name,
        description,
        target_id,
        resource_type: input.resource_type.or(current.map(|c| c.resource_type)).unwrap_or(ResourceType::All),
        pattern,
        effect: input
            .effect
            .or(current.map(|c| c.effect))
            .ok_or_else(|| ApiError::bad_request("effect: required (allow or deny)"))?,
        priority: input.priority.or(current.map(|c| c.priority)).unwrap_or(0),
        enabled: input.enabled.or(current.map(|c| c.enabled)).unwrap_or(true),
    };
    check_spec(&spec, field)?;
    Ok(spec)
}

/// The checks a whole policy passes (its target's existence aside); `pattern_field` is the
/// name the pattern was sent under.
pub(crate) fn check_spec(spec: &PolicySpec, pattern_field: &str) -> ApiResult<()> {
    if spec.name.is_empty() || spec.name.len() > 128 {
        return Err(ApiError::bad_request("name: must be 1 to 128 characters"));
    }
    if spec.description.len() > 1024 {
        return Err(ApiError::bad_request("description: at most 1024 bytes"));
    }
    if let Some(pattern) = &spec.pattern {
        glob::validate(pattern).map_err(|e| ApiError::bad_request(format!("{pattern_field}: {e}")))?;
    }
    Ok(())
}

/// A policy as answered: its pattern under both names, `pattern` and the original's
/// `resource_pattern`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyView {
    #[serde(flatten)]
    pub policy: Policy,
    pub resource_pattern: Option<String>,
}

impl From<Policy> for PolicyView {
    fn from(policy: Policy) -> Self {
        PolicyView { resource_pattern: policy.pattern.clone(), policy }
    }
}

/// All policies, highest priority first.
#[utoipa::path(get, path = "/api/policies", tag = "policies", security(("bearer" = [])),
    responses((status = 200, body = [PolicyView]), (status = 403, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<PolicyView>>> {
    caller.require_admin()?;
    Ok(Json(state.store.list_policies().await?.into_iter().map(PolicyView::from).collect()))
}

/// Create a policy with its subjects.
#[utoipa::path(post, path = "/api/policies", tag = "policies", security(("bearer" = [])), request_body = PolicyInput,
    responses((status = 201, body = PolicyView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(input): ApiJson<PolicyInput>,
) -> ApiResult<(StatusCode, Json<PolicyView>)> {
    caller.require_admin()?;
    let spec = build_spec(&state, &input, None).await?;
    let subjects = input.subjects.unwrap_or_default();
    check_subjects(&state, &subjects).await?;
    let policy = state.store.create_policy(spec, subjects).await?;
    tracing::info!(policy_id = %policy.id, policy = %policy.name, effect = policy.effect.as_str(), "policy created");
    Ok((StatusCode::CREATED, Json(policy.into())))
}

/// One policy.
#[utoipa::path(get, path = "/api/policies/{id}", tag = "policies", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = PolicyView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<PolicyView>> {
    caller.require_admin()?;
    state.store.get_policy(id).await?.map(|p| Json(p.into())).ok_or_else(|| ApiError::not_found("policy"))
}

/// Change a policy; `subjects`, when sent, replaces its subjects.
#[utoipa::path(put, path = "/api/policies/{id}", tag = "policies", security(("bearer" = [])), params(("id" = Uuid, Path)),
    request_body = PolicyInput,
    responses((status = 200, body = PolicyView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<PolicyInput>,
) -> ApiResult<Json<PolicyView>> {
    caller.require_admin()?;
    let current = state.store.get_policy(id).await?.ok_or_else(|| ApiError::not_found("policy"))?;
    let spec = build_spec(&state, &input, Some(&current)).await?;
    if let Some(subjects) = &input.subjects {
        check_subjects(&state, subjects).await?;
    }
    Ok(Json(state.store.update_policy(id, spec, input.subjects).await?.into()))
}

/// Delete a policy.
#[utoipa::path(delete, path = "/api/policies/{id}", tag = "policies", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = Message), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Message>> {
    caller.require_admin()?;
    state.store.delete_policy(id).await?;
    Ok(Message::json("policy deleted"))
}

/// Add a subject to a policy.
#[utoipa::path(post, path = "/api/policies/{id}/subjects", tag = "policies", security(("bearer" = [])), params(("id" = Uuid, Path)),
    request_body = SubjectSpec,
    responses((status = 201, body = PolicySubject), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn add_subject(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(subject): ApiJson<SubjectSpec>,
) -> ApiResult<(StatusCode, Json<PolicySubject>)> {
    caller.require_admin()?;
    check_subject(&state, &subject).await?;
    Ok((StatusCode::CREATED, Json(state.store.add_policy_subject(id, subject).await?)))
}

/// Remove a subject from a policy.
#[utoipa::path(delete, path = "/api/policies/{id}/subjects/{subject_id}", tag = "policies", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("subject_id" = Uuid, Path)),
    responses((status = 200, body = Message), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn remove_subject(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, subject_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<Message>> {
    caller.require_admin()?;
    state.store.remove_policy_subject(id, subject_id).await?;
    Ok(Message::json("subject removed from the policy"))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ExplainQuery {
    pub user_id: Uuid,
    pub target_id: Uuid,
    /// `tool`, `resource` or `prompt`.
    pub kind: String,
    /// The unprefixed tool or prompt name, or the resource URI.
    pub name: String,
}

#[derive(Debug, serde::Serialize, ToSchema)]
pub struct Explanation {
    pub allowed: bool,
    /// The policy that decided; `null` when none applies (default deny) or the user is
    /// deactivated.
    pub policy_id: Option<String>,
    pub policy_name: Option<String>,
    /// Why, in words.
    pub reason: String,
    /// The snapshot version the answer was computed on; data planes at this version
    /// enforce exactly this answer.
    pub snapshot_version: String,
    /// Where the token the user's requests to the target carry comes from, as audit lines name
    /// it (`user`, `group:<name>`, `role:<name>`, `default`); `null`: no token.
    pub credential_source: Option<String>,
}

/// Why a user may or may not use a tool, resource or prompt of a target, and which policy
/// decided, computed by the same function data planes enforce, on the current snapshot.
#[utoipa::path(get, path = "/api/policies/explain", tag = "policies", security(("bearer" = [])),
    params(ExplainQuery),
    responses((status = 200, body = Explanation), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn explain(
    State(state): State<AppState>,
    caller: Caller,
    super::extract::ApiQuery(query): super::extract::ApiQuery<ExplainQuery>,
) -> ApiResult<Json<Explanation>> {
    use reflow_proto::policy::{decide, CompiledPolicy, Kind};
    use reflow_proto::resources;
    use reflow_proto::snapshot::v1::ResourceType as Type;
    caller.require_admin()?;
    let kind = match query.kind.as_str() {
        "tool" => Kind::Tool,
        "resource" => Kind::Resource,
        "prompt" => Kind::Prompt,
        other => return Err(ApiError::bad_request(format!("kind: {other:?} is not one of tool, resource, prompt"))),
    };
    // Decided on the snapshot data planes decide on. A user or target written a moment ago may
    // not be compiled yet: the compiler is asked, and given a moment, before it is not found.
    let present = |snapshot: &crate::compile::Snapshot| {
        snapshot.resources.contains_key(&(Type::User as i32, query.user_id.to_string()))
            && snapshot.resources.contains_key(&(Type::Target as i32, query.target_id.to_string()))
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    if !state.hub.current().is_some_and(|s| present(&s)) {
        state.hub.changed();
        while tokio::time::Instant::now() < deadline && !state.hub.current().is_some_and(|s| present(&s)) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let snapshot = state.hub.current().ok_or_else(|| {
        ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "unavailable", "no snapshot has been compiled yet")
    })?;
    let payload =
        |kind: Type, id: &str| snapshot.resources.get(&(kind as i32, id.to_string())).map(|r| r.payload.clone());
    let decode_error =
        |_| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal", "snapshot does not decode");
    let user: resources::User = serde_json::from_slice(
        &payload(Type::User, &query.user_id.to_string()).ok_or_else(|| ApiError::not_found("user"))?,
    )
    .map_err(decode_error)?;
    if payload(Type::Target, &query.target_id.to_string()).is_none() {
        return Err(ApiError::not_found("target"));
    }
    let mut policies = Vec::new();
    for resource in snapshot.resources.values().filter(|r| r.r#type == Type::Policy as i32) {
        let policy: resources::Policy = serde_json::from_slice(&resource.payload).map_err(decode_error)?;
        policies.push(CompiledPolicy::new(policy).map_err(ApiError::bad_request)?);
    }
    policies.sort_by_key(|p| std::cmp::Reverse(p.policy.priority));
    let snapshot_version = snapshot.version.clone();
    if !user.active {
        return Ok(Json(Explanation {
            allowed: false,
            policy_id: None,
            policy_name: None,
            reason: "the user is deactivated; every request is refused before policies apply".into(),
            snapshot_version,
            credential_source: None,
        }));
    }
    // Resources are decided on their normal form, as the data plane decides them.
    let name = match kind {
        Kind::Resource => {
            reflow_common::uri::normalize(&query.name).map_err(|e| ApiError::bad_request(format!("name: {e}")))?
        }
        _ => query.name.clone(),
    };
    let decision = decide(&policies, &user, &query.target_id.to_string(), kind, &name);
    let reason = match (&decision.policy_name, decision.allowed) {
        (None, _) => "no policy applies: denied by default".to_string(),
        (Some(name), true) => format!("allowed by policy {name:?}"),
        (Some(name), false) => format!("denied by policy {name:?}"),
    };
    let target = super::targets::find(&state, query.target_id).await?;
    let stored = state.store.get_user(query.user_id).await?.ok_or_else(|| ApiError::not_found("user"))?;
    let credential_source = super::credentials::token_source(&state, &target, &stored).await?;
    Ok(Json(Explanation {
        allowed: decision.allowed,
        policy_id: decision.policy_id,
        policy_name: decision.policy_name,
        reason,
        snapshot_version,
        credential_source,
    }))
}
