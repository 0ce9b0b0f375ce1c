//! The reconcile loop: an `MCPInstance` in, its Secret adopted, its Service, NetworkPolicy and
//! Pod applied, its status written, its end decided (idle TTL, lifetime).
//!
//! Every write is idempotent (server-side apply under one field manager, a pod name carrying its
//! revision), so an operator killed anywhere in a reconcile converges on restart without
//! duplicates.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{json, Value};

use crate::crd::{condition, parse_duration, MCPInstance, MCPInstanceStatus, ServerInfo};
use crate::objects::{self, Peers, FINALIZER, INSTANCE_LABEL};

/// The field manager of everything the operator writes.
pub const MANAGER: &str = "reflow-operator";
/// The longest a reconcile waits before looking again (lifetimes and idle TTLs are checked then).
const RESYNC: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Finalizer(String),
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub peers: Peers,
    pub recorder: Recorder,
    pub http: reqwest::Client,
    pub metrics: crate::metrics::Metrics,
    /// How the operator reaches a pod to verify it: its pod IP (the default; the Service's
    /// cluster address when `false`).
    pub verify_by_pod_ip: bool,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("peers", &self.peers)
            .field("verify_by_pod_ip", &self.verify_by_pod_ip)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(client: Client, peers: Peers, metrics: crate::metrics::Metrics) -> Context {
        let reporter = Reporter { controller: MANAGER.into(), instance: std::env::var("HOSTNAME").ok() };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            peers,
            http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("an HTTP client"),
            metrics,
            verify_by_pod_ip: true,
        }
    }
}

/// Runs the controller over every namespace (or `namespace`) until `shutdown` resolves.
pub async fn run(
    context: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = context.client.clone();
    let (instances, pods, services, policies, secrets) = (
        scoped::<MCPInstance>(&client, namespace),
        scoped::<Pod>(&client, namespace),
        scoped::<Service>(&client, namespace),
        scoped::<NetworkPolicy>(&client, namespace),
        scoped::<Secret>(&client, namespace),
    );
    // Each watch keeps its own backoff and its errors stay with it: merged into the
    // controller's one trigger stream, a run of connection errors (the API server restarting)
    // could leave the controller waiting on a joint backoff and reconciling nothing after.
    fn resilient<K>(
        stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    ) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
    where
        K: Send + 'static,
    {
        use kube::runtime::WatchStreamExt as _;
        stream.default_backoff().touched_objects().filter(|item| {
            if let Err(error) = item {
                tracing::debug!(%error, "watch interrupted; it resumes");
            }
            std::future::ready(item.is_ok())
        })
    }
    let owned = watcher::Config::default().labels(&format!("{}={}", objects::MANAGED_BY.0, objects::MANAGED_BY.1));
    let (reader, writer) = kube::runtime::reflector::store();
    let main = resilient(kube::runtime::reflector(writer, watcher(instances, watcher::Config::default())));
    Controller::for_stream(main, reader)
        .owns_stream(resilient(watcher(pods, owned.clone())))
        .owns_stream(resilient(watcher(services, owned.clone())))
        .owns_stream(resilient(watcher(policies, owned)))
        .owns_stream(resilient(watcher(secrets, watcher::Config::default().labels(INSTANCE_LABEL))))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile");
            }
        })
        .await;
}

/// `K` in `namespace`, or in every namespace.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

fn error_policy(instance: Arc<MCPInstance>, error: &Error, context: Arc<Context>) -> Action {
    context.metrics.reconcile_failed();
    tracing::warn!(instance = %instance.name_any(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(instance: Arc<MCPInstance>, context: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let namespace = instance.namespace().unwrap_or_default();
    let api: Api<MCPInstance> = Api::namespaced(context.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, instance, |event| async {
        match event {
            Event::Apply(instance) => apply(&instance, &context).await,
            Event::Cleanup(instance) => cleanup(&instance, &context).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    context.metrics.reconciled(started.elapsed());
    result
}

/// Deletes what the instance owns (owner-reference garbage collection would too, but not at
/// once, and not on a cluster without it), then lets the finalizer go.
async fn cleanup(instance: &MCPInstance, context: &Context) -> Result<Action, Error> {
    let namespace = instance.namespace().unwrap_or_default();
    let name = instance.name_any();
    let selector = format!("{INSTANCE_LABEL}={name}");
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), &namespace);
    for pod in pods.list(&ListParams::default().labels(&selector)).await? {
        if objects::owned_by(&pod, instance) {
            ignore_missing(pods.delete(&pod.name_any(), &DeleteParams::default()).await.map(|_| ()))?;
        }
    }
    let services: Api<Service> = Api::namespaced(context.client.clone(), &namespace);
    ignore_missing(services.delete(&name, &DeleteParams::default()).await.map(|_| ()))?;
    let policies: Api<NetworkPolicy> = Api::namespaced(context.client.clone(), &namespace);
    ignore_missing(policies.delete(&name, &DeleteParams::default()).await.map(|_| ()))?;
    if let Some(secret) = &instance.spec.secret_ref {
        let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &namespace);
        if let Some(found) = secrets.get_opt(secret).await? {
            if objects::owned_by(&found, instance) {
                ignore_missing(secrets.delete(secret, &DeleteParams::default()).await.map(|_| ()))?;
            }
        }
    }
    publish(
        context,
        instance,
        EventType::Normal,
        "Deleted",
        "Cleanup",
        "the instance's pod, service, secret and network policy are deleted",
    )
    .await;
    Ok(Action::await_change())
}

fn ignore_missing(result: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        other => other,
    }
}

async fn publish(context: &Context, instance: &MCPInstance, kind: EventType, reason: &str, action: &str, note: &str) {
    let event = KubeEvent {
        type_: kind,
        reason: reason.into(),
        note: Some(note.into()),
        action: action.into(),
        secondary: None,
    };
    if let Err(error) = context.recorder.publish(&event, &instance.object_ref(&())).await {
        tracing::debug!(%error, "event not recorded");
    }
}

fn parse_time(text: Option<&str>) -> Option<DateTime<Utc>> {
    text.and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.with_timezone(&Utc))
}

async fn apply(instance: &MCPInstance, context: &Context) -> Result<Action, Error> {
    let namespace = instance.namespace().unwrap_or_default();
    let name = instance.name_any();
    let api: Api<MCPInstance> = Api::namespaced(context.client.clone(), &namespace);
    let status = instance.status.clone().unwrap_or_default();

    // The spec's durations: a bad one is not accepted (and nothing is run for it).
    let (idle_ttl, max_lifetime) =
        match (parse_duration(&instance.spec.idle_ttl), parse_duration(&instance.spec.max_lifetime)) {
            (Ok(idle), Ok(max)) => (idle, max),
            (Err(e), _) | (_, Err(e)) => {
                let conditions = vec![condition_of(&status, condition::ACCEPTED, false, "InvalidSpec", &e, instance)];
                write_status(&api, &name, json!({"phase": "Failed", "message": e, "conditions": conditions})).await?;
                return Ok(Action::await_change());
            }
        };

    // Its end: past its lifetime, or idle past its TTL (last use as data planes report it).
    let now = Utc::now();
    let started_at = parse_time(status.started_at.as_deref());
    let last_used = parse_time(status.last_used_at.as_deref()).or(started_at);
    let expired = started_at
        .is_some_and(|s| now - s >= chrono::Duration::from_std(max_lifetime).unwrap_or(chrono::TimeDelta::MAX));
    let idle =
        last_used.is_some_and(|u| now - u >= chrono::Duration::from_std(idle_ttl).unwrap_or(chrono::TimeDelta::MAX));
    if expired || idle {
        let why = if expired {
            ("Expired", "the instance reached its max lifetime")
        } else {
            ("Idle", "the instance was idle past its TTL")
        };
        publish(context, instance, EventType::Normal, why.0, "Delete", why.1).await;
        context.metrics.ended(why.0);
        ignore_missing(api.delete(&name, &DeleteParams::default()).await.map(|_| ()))?;
        return Ok(Action::await_change());
    }

    // The env Secret, adopted so it goes with the instance; its content shapes the pod.
    let mut secret_hash = String::new();
    if let Some(secret_name) = &instance.spec.secret_ref {
        let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &namespace);
        match secrets.get_opt(secret_name).await? {
            Some(secret) => {
                if !objects::owned_by(&secret, instance) {
                    let owner = instance.controller_owner_ref(&()).expect("a stored instance has a uid");
                    let patch = json!({"metadata": {"ownerReferences": [owner], "labels": {INSTANCE_LABEL: name}}});
                    secrets.patch(secret_name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                }
                secret_hash = objects::secret_hash(&secret.data.unwrap_or_default());
            }
            None => {
                let message = format!("waiting for the env secret {secret_name:?}");
                let conditions =
                    vec![condition_of(&status, condition::ACCEPTED, false, "SecretMissing", &message, instance)];
                write_status(&api, &name, json!({"phase": "Pending", "message": message, "conditions": conditions}))
                    .await?;
                return Ok(Action::requeue(Duration::from_secs(5)));
            }
        }
    }

    let apply = PatchParams::apply(MANAGER).force();
    let services: Api<Service> = Api::namespaced(context.client.clone(), &namespace);
    services.patch(&name, &apply, &Patch::Apply(objects::service(instance))).await?;
    let policies: Api<NetworkPolicy> = Api::namespaced(context.client.clone(), &namespace);
    policies.patch(&name, &apply, &Patch::Apply(objects::network_policy(instance, &context.peers))).await?;

    // The pod of this revision; pods of others (an older spec or secret) go.
    let revision = objects::revision(instance, &secret_hash);
    let pod_name = objects::pod_name(instance, &revision);
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), &namespace);
    for old in pods.list(&ListParams::default().labels(&format!("{INSTANCE_LABEL}={name}"))).await? {
        if old.name_any() != pod_name && objects::owned_by(&old, instance) {
            publish(
                context,
                instance,
                EventType::Normal,
                "Restarting",
                "DeletePod",
                &format!("pod {} is of an older revision", old.name_any()),
            )
            .await;
            ignore_missing(pods.delete(&old.name_any(), &DeleteParams::default()).await.map(|_| ()))?;
        }
    }
    let pod = match pods.get_opt(&pod_name).await? {
        Some(pod) => pod,
        None => match pods
            .create(
                &PostParams { field_manager: Some(MANAGER.into()), ..Default::default() },
                &objects::pod(instance, &revision, &secret_hash),
            )
            .await
        {
            Ok(pod) => {
                publish(context, instance, EventType::Normal, "Created", "CreatePod", &format!("pod {pod_name}")).await;
                pod
            }
            Err(kube::Error::Api(refusal)) if refusal.code == 409 => pods.get(&pod_name).await?,
            // Refused by admission or validation (a Pod Security level, a quota): the spec cannot
            // run as it is, and the status says why.
            Err(kube::Error::Api(refusal)) if matches!(refusal.code, 400 | 403 | 422) => {
                let message = format!("the API server refused the pod: {}", refusal.message);
                publish(context, instance, EventType::Warning, "PodRefused", "CreatePod", &message).await;
                let conditions = vec![
                    condition_of(
                        &status,
                        condition::ACCEPTED,
                        true,
                        "Accepted",
                        "the operator runs this instance",
                        instance,
                    ),
                    condition_of(&status, condition::AVAILABLE, false, "PodRefused", &message, instance),
                ];
                write_status(&api, &name, json!({"phase": "Failed", "message": message, "conditions": conditions}))
                    .await?;
                return Ok(Action::requeue(Duration::from_secs(30)));
            }
            Err(e) => return Err(e.into()),
        },
    };

    // Status: phase and conditions from the pod; Verified once an initialize succeeds.
    let pod_status = pod.status.clone().unwrap_or_default();
    let ready = pod_status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
    let pod_ip = pod_status.pod_ip.clone();
    let phase_failed = pod_status.phase.as_deref() == Some("Failed");
    let same_pod = status.pod_name.as_deref() == Some(pod_name.as_str());
    let mut server_info = if same_pod { status.server_info.clone() } else { None };
    let mut verify_error = None;
    if ready && server_info.is_none() {
        let url = match (&pod_ip, context.verify_by_pod_ip) {
            (Some(ip), true) => format!("http://{ip}:{}/mcp", instance.spec.port),
            _ => objects::service_url(instance),
        };
        match verify(&context.http, &url).await {
            Ok(info) => {
                publish(
                    context,
                    instance,
                    EventType::Normal,
                    "Verified",
                    "Initialize",
                    &format!("{} {} speaks MCP {}", info.name, info.version, info.protocol_version),
                )
                .await;
                server_info = Some(info);
            }
            Err(e) => verify_error = Some(e),
        }
    }
    let verified = server_info.is_some();
    let phase = match () {
        _ if phase_failed => "Failed",
        _ if verified => "Ready",
        _ if pod_status.phase.as_deref() == Some("Running") => "Running",
        _ => "Pending",
    };
    let message = match (&verify_error, phase) {
        (Some(e), _) => format!("the pod is ready but does not answer initialize: {e}"),
        (None, "Failed") => pod_status.message.clone().unwrap_or_else(|| "the pod failed".into()),
        (None, _) => String::new(),
    };
    let conditions = vec![
        condition_of(&status, condition::ACCEPTED, true, "Accepted", "the operator runs this instance", instance),
        condition_of(
            &status,
            condition::AVAILABLE,
            ready,
            if ready { "PodReady" } else { "PodNotReady" },
            &format!("pod {pod_name}"),
            instance,
        ),
        condition_of(
            &status,
            condition::VERIFIED,
            verified,
            if verified {
                "InitializeSucceeded"
            } else if verify_error.is_some() {
                "InitializeFailed"
            } else {
                "Waiting"
            },
            verify_error.as_deref().unwrap_or(if verified { "initialize answered" } else { "waiting for the pod" }),
            instance,
        ),
    ];
    let started = status
        .started_at
        .clone()
        .filter(|_| same_pod)
        .unwrap_or_else(|| now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let mut new_status = json!({
        "phase": phase,
        "podName": pod_name,
        "serviceURL": objects::service_url(instance),
        "startedAt": started,
        "conditions": conditions,
        "observedGeneration": instance.meta().generation,
        "secretHash": secret_hash,
    });
    if !message.is_empty() {
        new_status["message"] = json!(message);
    }
    if let Some(ip) = &pod_ip {
        new_status["podIP"] = json!(ip);
    }
    if let Some(info) = &server_info {
        new_status["serverInfo"] = serde_json::to_value(info).expect("server info serialises");
    }
    write_status(&api, &name, new_status).await?;

    // Look again when the pod may have moved on, or when the instance's end comes.
    let next = if !verified { Duration::from_secs(2) } else { RESYNC };
    let until_idle = last_used
        .map(|u| (u + chrono::Duration::from_std(idle_ttl).unwrap_or_default() - now).to_std().unwrap_or_default());
    let until_expired = parse_time(Some(&started))
        .map(|s| (s + chrono::Duration::from_std(max_lifetime).unwrap_or_default() - now).to_std().unwrap_or_default());
    let next = [Some(next), until_idle, until_expired]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(RESYNC)
        .max(Duration::from_millis(200));
    Ok(Action::requeue(next))
}

/// A condition of `instance`, keeping its transition time while its status stays.
fn condition_of(
    status: &MCPInstanceStatus,
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
    instance: &MCPInstance,
) -> Value {
    let value = if ok { "True" } else { "False" };
    let since = status
        .conditions
        .iter()
        .find(|c| c.type_ == kind && c.status == value)
        .map(|c| c.last_transition_time.0.to_string())
        .unwrap_or_else(|| Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    json!({
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": instance.meta().generation,
    })
}

async fn write_status(api: &Api<MCPInstance>, name: &str, status: Value) -> Result<(), kube::Error> {
    let patch = json!({"apiVersion": format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION), "kind": crate::crd::KIND, "status": status});
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await.map(|_| ())
}

/// An MCP `initialize` against `url`: what the server says it is.
pub async fn verify(http: &reqwest::Client, url: &str) -> Result<ServerInfo, String> {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "reflow-operator", "version": env!("CARGO_PKG_VERSION")}}});
    let response = http
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("{e}"))?;
    let status = response.status();
    let session = response.headers().get("mcp-session-id").cloned();
    let text = response.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("initialize answered HTTP {status}"));
    }
    let message = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .chain(std::iter::once(text.as_str()))
        .filter_map(|j| serde_json::from_str::<Value>(j.trim()).ok())
        .find(|m| m.get("id") == Some(&json!(1)))
        .ok_or("initialize got no JSON-RPC answer")?;
    let result = message.get("result").ok_or_else(|| format!("initialize failed: {}", message["error"]))?;
    if let Some(session) = session {
        // Ends the verification session; a server that keeps none answers 405, which is fine.
        let _ = http.delete(url).header("mcp-session-id", session).send().await;
    }
    Ok(ServerInfo {
        name: result["serverInfo"]["name"].as_str().unwrap_or_default().to_string(),
        version: result["serverInfo"]["version"].as_str().unwrap_or_default().to_string(),
        protocol_version: result["protocolVersion"].as_str().unwrap_or_default().to_string(),
    })
}
