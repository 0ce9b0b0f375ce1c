//! `/api/targets`: the upstream MCP servers. Admins create, change and delete them (a STDIO
//! target runs a program on the data plane) and see them whole; everyone else sees a target's
//! name, description, transport and the env keys they may set, never where or how it runs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use reflow_common::config::StdioConfig;
use reflow_common::credentials::Isolation;
use reflow_common::names::{
    changes_execution, is_reserved_destination, validate_env_key, validate_header_name, validate_target_name,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{present, ApiJson, ApiPath, Caller};
use super::{AppState, Message};
use crate::store::{AuthType, EnvKey, Statefulness, Target, TargetSpec, TransportType};

const MAX_ARGS: usize = 64;
const MAX_ARG_LEN: usize = 4096;
const MAX_URL_LEN: usize = 2048;
const DEFAULT_POD_PORT: i32 = 8080;
const DEFAULT_HEALTH_PATH: &str = "/";
const MAX_ENV_KEYS: usize = 100;

/// A target definition. On create, only `name` is required (`transport_type` defaults to
/// `streamable-http`); on update, fields not sent keep their value and fields sent as `null`
/// are cleared. An empty string (or a `port` of 0), as forms send for a field that does not
/// apply, counts as `null`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetInput {
    /// `[a-z0-9-]`, 1–63 characters; prefixes this target's tool names.
    pub name: Option<String>,
    pub description: Option<String>,
    pub transport_type: Option<TransportType>,
    /// For `streamable-http` and `sse`: the server's http(s) URL.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub url: Option<Option<String>>,
    /// For `stdio` (required; must be in the data plane's allowlist) and `kubernetes`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub command: Option<Option<String>>,
    pub args: Option<Vec<String>>,
    /// For `kubernetes`: the container image.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub image: Option<Option<String>>,
    /// For `kubernetes`: the container port (default 8080).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i32>)]
    pub port: Option<Option<i32>>,
    /// For `kubernetes`: the readiness probe path (default `/`).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub health_path: Option<Option<String>>,
    /// Default `stateless`.
    pub statefulness: Option<Statefulness>,
    /// Default `shared`.
    pub isolation_boundary: Option<Isolation>,
    /// Default `bearer`.
    pub auth_type: Option<AuthType>,
    /// Required when `auth_type` is `header`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub auth_header_name: Option<Option<String>>,
    /// Default `true`.
    pub enabled: Option<bool>,
    /// The env keys the target declares; users may set only declared, user-settable keys.
    pub env_keys: Option<Vec<EnvKey>>,
    /// Keep the arguments of calls to this target in the audit trail, with values under keys
    /// that look like secrets and every stored credential value masked. Default `false`.
    pub audit_arguments: Option<bool>,
}

fn merge<T: Clone>(input: Option<Option<T>>, current: Option<&Option<T>>) -> Option<T> {
    match input {
        Some(value) => value,
        None => current.cloned().flatten(),
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message)
}

/// The checks every upstream URL passes: a target's `url`, and an env `BASE_URL` replacing it.
/// `field` names it in the message.
pub fn check_url(field: &str, url: &str) -> ApiResult<()> {
    if url.len() > MAX_URL_LEN {
        return Err(bad(format!("{field}: longer than {MAX_URL_LEN} bytes")));
    }
    let parsed = url::Url::parse(url).map_err(|e| bad(format!("{field}: not a valid URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad(format!("{field}: scheme must be http or https")));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad(format!("{field}: must name a host")));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad(format!(
            "{field}: must not carry credentials; set them through the target's token or env endpoints"
        )));
    }
    if parsed.fragment().is_some() {
        return Err(bad(format!("{field}: must not have a fragment")));
    }
    Ok(())
}

fn check_env_keys(keys: &[EnvKey], transport: TransportType) -> ApiResult<()> {
    use reflow_common::credentials::ScopeKind;
    if keys.len() > MAX_ENV_KEYS {
        return Err(bad(format!("env_keys: at most {MAX_ENV_KEYS} keys")));
    }
    for (i, key) in keys.iter().enumerate() {
        let at = format!("env_keys[{i}]");
        validate_env_key(&key.name).map_err(|e| bad(format!("{at}.name: {e}")))?;
        if keys[..i].iter().any(|other| other.name == key.name) {
            return Err(bad(format!("{at}.name: {:?} is declared twice", key.name)));
        }
        if key.description.len() > 1024 || key.description.chars().any(char::is_control) {
            return Err(bad(format!("{at}.description: at most 1024 bytes without control characters")));
        }
        if key.scopes.is_empty() {
            return Err(bad(format!("{at}.scopes: name at least one of default, role, group, user")));
        }
        if key.user_settable && !key.scopes.contains(&ScopeKind::User) {
            return Err(bad(format!("{at}.scopes: a user-settable key needs the user scope")));
        }
        if key.user_settable && is_reserved_destination(&key.name) {
            return Err(bad(format!(
                "{at}: {} decides where requests go; only admins set it, so it cannot be user-settable",
                key.name
            )));
        }
        if key.user_settable && transport.runs_a_process() && changes_execution(&key.name) {
            return Err(bad(format!(
                "{at}: {} changes what the server process runs; a user may never set it",
                key.name
            )));
        }
    }
    Ok(())
}

/// A string field sent empty is a field sent as `null`.
fn blank_as_null(field: Option<Option<String>>) -> Option<Option<String>> {
    field.map(|value| value.filter(|v| !v.is_empty()))
}

/// Merges `input` over `current` (if any) and validates the result as a whole.
pub fn build_spec(mut input: TargetInput, current: Option<&TargetSpec>, stdio: &StdioConfig) -> ApiResult<TargetSpec> {
    input.url = blank_as_null(input.url);
    input.command = blank_as_null(input.command);
    input.image = blank_as_null(input.image);
    input.health_path = blank_as_null(input.health_path);
    input.auth_header_name = blank_as_null(input.auth_header_name);
    input.port = input.port.map(|p| p.filter(|p| *p != 0));
    let name = input.name.or_else(|| current.map(|c| c.name.clone())).ok_or_else(|| bad("name: required"))?;
    validate_target_name(&name).map_err(|e| bad(format!("name: {e}")))?;
    let description = input.description.or_else(|| current.map(|c| c.description.clone())).unwrap_or_default();
    if description.len() > 1024 {
        return Err(bad("description: at most 1024 bytes"));
    }
    let transport_type =
        input.transport_type.or(current.map(|c| c.transport_type)).unwrap_or(TransportType::StreamableHttp);
    let url = merge(input.url, current.map(|c| &c.url));
    let command = merge(input.command, current.map(|c| &c.command));
    let args = input.args.or_else(|| current.map(|c| c.args.clone())).unwrap_or_default();
    let image = merge(input.image, current.map(|c| &c.image));
    let mut port = merge(input.port, current.map(|c| &c.port));
    let mut health_path = merge(input.health_path, current.map(|c| &c.health_path));
    let auth_type = input.auth_type.or(current.map(|c| c.auth_type)).unwrap_or(AuthType::Bearer);
    let auth_header_name = merge(input.auth_header_name, current.map(|c| &c.auth_header_name));

    if args.len() > MAX_ARGS {
        return Err(bad(format!("args: at most {MAX_ARGS} arguments")));
    }
    if let Some(arg) = args.iter().find(|a| a.len() > MAX_ARG_LEN || a.contains('\0')) {
        return Err(bad(format!("args: argument of {} bytes is too long or contains NUL", arg.len())));
    }
    let only_for = |field: &str, present: bool, allowed: &[TransportType]| -> ApiResult<()> {
        if present && !allowed.contains(&transport_type) {
            let names: Vec<&str> = allowed.iter().map(|t| t.as_str()).collect();
            return Err(bad(format!("{field}: only valid for {} targets", names.join(" and "))));
        }
        Ok(())
    };
    use TransportType::*;
    only_for("url", url.is_some(), &[StreamableHttp, Sse])?;
    only_for("command", command.is_some(), &[Stdio, Kubernetes])?;
    only_for("args", !args.is_empty(), &[Stdio, Kubernetes])?;
    only_for("image", image.is_some(), &[Kubernetes])?;
    only_for("port", port.is_some(), &[Kubernetes])?;
    only_for("health_path", health_path.is_some(), &[Kubernetes])?;

    match transport_type {
        StreamableHttp | Sse => {
            check_url("url", url.as_deref().ok_or_else(|| bad("url: required for streamable-http and sse targets"))?)?
        }
        Stdio => {
            let command = command.as_deref().ok_or_else(|| bad("command: required for stdio targets"))?;
            if !stdio.allows(command) {
                return Err(bad(format!(
                    "command: {command:?} is not in the allowed commands (stdio.allowed_commands: {})",
                    stdio.allowed_commands.join(", ")
                )));
            }
        }
        Kubernetes => {
            let image = image.as_deref().ok_or_else(|| bad("image: required for kubernetes targets"))?;
            if image.is_empty() || image.len() > 512 || image.chars().any(char::is_whitespace) {
                return Err(bad("image: must be a container image reference"));
            }
            let p = *port.get_or_insert(DEFAULT_POD_PORT);
            if !(1..=65535).contains(&p) {
                return Err(bad("port: must be between 1 and 65535"));
            }
            let path = health_path.get_or_insert_with(|| DEFAULT_HEALTH_PATH.to_string());
            if !path.starts_with('/') || path.len() > 256 || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad("health_path: must be an absolute path"));
            }
        }
    }
    match (auth_type, &auth_header_name) {
        (AuthType::Header, None) => return Err(bad("auth_header_name: required when auth_type is header")),
        (AuthType::Header, Some(name)) => {
            validate_header_name(name).map_err(|e| bad(format!("auth_header_name: {e}")))?
        }
        (_, Some(_)) => return Err(bad("auth_header_name: only valid when auth_type is header")),
        (_, None) => {}
    }
    let mut env_keys = input.env_keys.or_else(|| current.map(|c| c.env_keys.clone())).unwrap_or_default();
    for key in &mut env_keys {
        key.scopes.sort();
        key.scopes.dedup();
    }
    check_env_keys(&env_keys, transport_type)?;
    Ok(TargetSpec {
        name,
        description,
        transport_type,
        url,
        command,
        args,
        image,
        port,
        health_path,
        statefulness: input.statefulness.or(current.map(|c| c.statefulness)).unwrap_or(Statefulness::Stateless),
        isolation_boundary: input
            .isolation_boundary
            .or(current.map(|c| c.isolation_boundary))
            .unwrap_or(Isolation::Shared),
        auth_type,
        auth_header_name,
        enabled: input.enabled.or(current.map(|c| c.enabled)).unwrap_or(true),
        env_keys,
        audit_arguments: input.audit_arguments.or(current.map(|c| c.audit_arguments)).unwrap_or(false),
    })
}

/// What a user who is not an admin sees of a target: enough to find it and to set their own
/// values, nothing of where or how it runs (URL, command, arguments, image).
#[derive(Debug, Serialize, ToSchema)]
pub struct TargetSummary {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub transport_type: TransportType,
    pub enabled: bool,
    /// The env keys a user may set their own value for.
    pub env_keys: Vec<EnvKey>,
}

/// A target as the caller may see it: whole for admins, a [`TargetSummary`] for others.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum TargetView {
    Full(Target),
    Summary(TargetSummary),
}

impl TargetView {
    fn for_caller(caller: &Caller, target: Target) -> Self {
        if caller.user.is_admin() {
            return TargetView::Full(target);
        }
        TargetView::Summary(TargetSummary {
            id: target.id,
            name: target.name,
            description: target.description,
            transport_type: target.transport_type,
            enabled: target.enabled,
            env_keys: target.env_keys.into_iter().filter(|k| k.user_settable).collect(),
        })
    }
}

/// Loads a target or answers 404.
pub async fn find(state: &AppState, id: Uuid) -> ApiResult<Target> {
    state.store.get_target(id).await?.ok_or_else(|| ApiError::not_found("target"))
}

/// All targets: whole for admins; name, description, transport and user-settable env keys for
/// everyone else.
#[utoipa::path(get, path = "/api/targets", tag = "targets", security(("bearer" = [])),
    responses((status = 200, body = [TargetView]), (status = 401, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<TargetView>>> {
    let targets = state.store.list_targets().await?;
    Ok(Json(targets.into_iter().map(|t| TargetView::for_caller(&caller, t)).collect()))
}

/// Create a target.
#[utoipa::path(post, path = "/api/targets", tag = "targets", security(("bearer" = [])), request_body = TargetInput,
    responses((status = 201, body = Target), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(input): ApiJson<TargetInput>,
) -> ApiResult<(StatusCode, Json<Target>)> {
    caller.require_admin()?;
    let spec = build_spec(input, None, &state.settings.stdio)?;
    let target = state.store.create_target(spec).await?;
    tracing::info!(target_id = %target.id, target = %target.name, transport = target.transport_type.as_str(), "target created");
    Ok((StatusCode::CREATED, Json(target)))
}

/// One target (whole for admins, a summary for everyone else).
#[utoipa::path(get, path = "/api/targets/{id}", tag = "targets", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = TargetView), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<TargetView>> {
    Ok(Json(TargetView::for_caller(&caller, find(&state, id).await?)))
}

/// Change a target: fields sent replace the stored ones, and the result is validated whole.
#[utoipa::path(put, path = "/api/targets/{id}", tag = "targets", security(("bearer" = [])), params(("id" = Uuid, Path)),
    request_body = TargetInput,
    responses((status = 200, body = Target), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<TargetInput>,
) -> ApiResult<Json<Target>> {
    caller.require_admin()?;
    let current = find(&state, id).await?;
    let spec = build_spec(input, Some(&current.spec()), &state.settings.stdio)?;
    let updated = state.store.update_target(id, spec).await?;
    if let Some(cluster) = &state.cluster {
        // Pods of the old definition go; the data planes start the new one on next use.
        if current.transport_type == TransportType::Kubernetes {
            let keep = (updated.enabled && updated.transport_type == TransportType::Kubernetes)
                .then(|| crate::compile::target_payload(&updated).pod_revision());
            cluster.retire_later(id.to_string(), keep);
        }
    }
    Ok(Json(updated))
}

/// What `restart-instances` did: the original's `{restarted, target}`, the restart generation
/// data planes acted on, and which data planes took part.
#[derive(Debug, Serialize, ToSchema)]
pub struct Restarted {
    /// Processes stopped across every connected data plane, plus the target's Kubernetes
    /// instances when the control plane has cluster access; fresh ones start on next use.
    pub restarted: u32,
    pub target: Target,
    /// The target's new restart generation, which the snapshot carries to data planes.
    pub restart_generation: i64,
    #[serde(flatten)]
    pub fleet: super::data_planes::Fleet,
}

/// Restart every running process (STDIO, and Kubernetes instances) of a target, on every data
/// plane. Relayed through the snapshot; the answer waits (up to 10 s) until every connected
/// data plane has applied it, and counts what they stopped.
#[utoipa::path(post, path = "/api/targets/{id}/restart-instances", tag = "targets", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Restarted), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn restart_instances(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Restarted>> {
    caller.require_admin()?;
    let kubernetes = find(&state, id).await?.transport_type == TransportType::Kubernetes;
    let cluster = state.cluster.as_ref().filter(|_| kubernetes);
    // With cluster access the control plane ends the pods itself, so the restart holds while
    // no data plane runs. Every instance there now is older than the generation about to be
    // made; an unreachable cluster refuses the restart before anything changes.
    let pods = match cluster {
        Some(cluster) => cluster.count(&id.to_string()).await?,
        None => 0,
    };
    let restart_generation = state.store.restart_target(id).await?;
    let target = find(&state, id).await?;
    tracing::info!(target_id = %id, restart_generation, "restart of a target's instances requested");
    if let Some(cluster) = cluster {
        let revision = crate::compile::target_payload(&target).pod_revision();
        if let Err(error) = cluster.retire(&id.to_string(), Some(&revision)).await {
            // The data planes retire them when the snapshot reaches them.
            tracing::warn!(target_id = %id, %error, "could not retire a restarted target's kubernetes instances");
        }
    }
    let (processes, fleet) = super::data_planes::await_generation(
        &state,
        reflow_proto::snapshot::v1::ResourceType::Target,
        &id.to_string(),
        "restart_generation",
        restart_generation,
        |report| &report.restarted,
    )
    .await?;
    let restarted = processes + pods;
    Ok(Json(Restarted { restarted, target, restart_generation, fleet }))
}

/// One running server of a target: a process on a data plane (`stdio`), or an instance in the
/// cluster (`kubernetes`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum TargetInstance {
    Process(ProcessInstance),
    Pod(Box<crate::cluster::PodInstance>),
}

/// One running process of a target on a data plane.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessInstance {
    /// The data plane that runs it.
    pub data_plane: String,
    /// Whether that data plane is connected now (otherwise this is its last report).
    pub connected: bool,
    #[serde(flatten)]
    pub instance: crate::store::InstanceStatus,
}

/// The target's running servers. For a `kubernetes` target, its instances and their pods, read
/// from the cluster (the control plane needs `kubernetes.enabled`; 409 otherwise); for the
/// others, the processes every data plane last reported.
#[utoipa::path(get, path = "/api/targets/{id}/instances", tag = "targets", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, body = [TargetInstance]), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn instances(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<TargetInstance>>> {
    caller.require_admin()?;
    let target = find(&state, id).await?;
    if target.transport_type == TransportType::Kubernetes {
        let cluster = state.cluster.as_ref().ok_or_else(|| {
            ApiError::conflict(
                "this control plane has no Kubernetes access: set kubernetes.enabled (and kubernetes.kubeconfig \
                 outside a cluster) on it to list a kubernetes target's pods",
            )
        })?;
        let pods = cluster.instances(&crate::compile::target_payload(&target)).await?;
        return Ok(Json(pods.into_iter().map(|pod| TargetInstance::Pod(Box::new(pod))).collect()));
    }
    let id = id.to_string();
    let instances = state
        .store
        .list_data_planes()
        .await?
        .into_iter()
        .flat_map(|plane| {
            let (node, connected) = (plane.node_id, plane.connected);
            plane.instances.into_iter().filter(|i| i.target_id == id).map(move |instance| {
                TargetInstance::Process(ProcessInstance { data_plane: node.clone(), connected, instance })
            })
        })
        .collect();
    Ok(Json(instances))
}

/// A target's health on one data plane.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlaneHealth {
    pub data_plane: String,
    /// Whether that data plane is connected now (otherwise this is its last report).
    pub connected: bool,
    /// When the report was received.
    pub reported_at: chrono::DateTime<chrono::Utc>,
    /// Client sessions holding an upstream session to the target, and its running processes.
    pub sessions: u32,
    pub processes: u32,
    /// When an exchange with the target last succeeded there; `null`: never.
    pub last_ok_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_failure_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Why the last failure happened; for a STDIO server that exited or did not start, the
    /// tail of its stderr with the values of its env masked.
    pub last_failure: Option<String>,
    /// Failed exchanges since that data plane started.
    pub failures: u64,
    /// Its running processes there.
    pub instances: Vec<crate::store::InstanceStatus>,
}

/// A target's health on every data plane that reported on it.
#[derive(Debug, Serialize, ToSchema)]
pub struct TargetStatus {
    pub target_id: Uuid,
    pub target_name: String,
    pub enabled: bool,
    /// Sessions and processes over every connected data plane.
    pub sessions: u32,
    pub processes: u32,
    pub data_planes: Vec<PlaneHealth>,
}

/// How a target fares on each data plane: its last failure and why, when it last worked, and
/// how many sessions and processes use it.
#[utoipa::path(get, path = "/api/targets/{id}/status", tag = "targets", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, body = TargetStatus), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<TargetStatus>> {
    caller.require_admin()?;
    let target = find(&state, id).await?;
    let key = id.to_string();
    let mut data_planes = Vec::new();
    for plane in state.store.list_data_planes().await? {
        let health = plane.report.targets.iter().find(|t| t.target_id == key);
        let instances: Vec<_> = plane.instances.iter().filter(|i| i.target_id == key).cloned().collect();
        if health.is_none() && instances.is_empty() {
            continue;
        }
        data_planes.push(PlaneHealth {
            data_plane: plane.node_id.clone(),
            connected: plane.connected,
            reported_at: plane.last_seen,
            sessions: health.map_or(0, |h| h.sessions),
            processes: health.map_or(instances.len() as u32, |h| h.processes),
            last_ok_at: health.and_then(|h| h.last_ok_at),
            last_failure_at: health.and_then(|h| h.last_failure_at),
            last_failure: health.and_then(|h| h.last_failure.clone()),
            failures: health.map_or(0, |h| h.failures),
            instances,
        });
    }
    let connected = data_planes.iter().filter(|p| p.connected);
    let (sessions, processes) = connected.fold((0, 0), |(s, p), plane| (s + plane.sessions, p + plane.processes));
    Ok(Json(TargetStatus {
        target_id: target.id,
        target_name: target.name,
        enabled: target.enabled,
        sessions,
        processes,
        data_planes,
    }))
}

/// Delete a target with its credentials and the policies scoped to it.
#[utoipa::path(delete, path = "/api/targets/{id}", tag = "targets", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = Message), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Message>> {
    caller.require_admin()?;
    let target = find(&state, id).await?;
    state.store.delete_target(id).await?;
    if let Some(cluster) = &state.cluster {
        if target.transport_type == TransportType::Kubernetes {
            cluster.retire_later(id.to_string(), None);
        }
    }
    Ok(Message::json("target deleted"))
}
