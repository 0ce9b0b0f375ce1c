//! The kubernetes transport: a target whose MCP server runs as a pod per isolation key, through
//! the operator's `MCPInstance`s.
//!
//! The isolation key (the same [`ProcessKey`] as STDIO's) names one instance cluster-wide, so
//! every data plane shares one pod per key. The first request for a key writes the key's env
//! Secret (the resolved credentials: never in the custom resource), applies the instance, and
//! waits (bounded by `kubernetes.start_timeout`) until the operator reports it `Verified` with
//! that Secret's content; then the session speaks Streamable HTTP to the pod. What a data plane
//! learnt is remembered, so a warm request touches no API server. Use is reported in batches
//! (`status.lastUsedAt`, at most once per `kubernetes.last_used_interval` per instance), never
//! per request.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use reflow_common::config::{KubernetesAddress, KubernetesConfig};
use reflow_operator::crd::{condition, MCPInstance};
use reflow_proto::resources::Target;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::stdio::ProcessKey;
use super::UpstreamError;

/// The field manager of what data planes write.
pub const MANAGER: &str = "reflow-data-plane";
use reflow_operator::objects::{INSTANCE_LABEL, TARGET_LABEL, TARGET_REVISION_LABEL as REVISION_LABEL};

/// A data plane's view of the cluster's instances.
pub struct Instances {
    client: kube::Client,
    config: KubernetesConfig,
    /// What this data plane knows running: instance name → (hash of its env, its URL).
    known: Mutex<HashMap<String, (String, String)>>,
    /// Instances used since the last report.
    used: Mutex<std::collections::HashSet<String>>,
    /// One start per instance at a time in this data plane.
    starting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The revision of every kubernetes target in the last snapshot: target id → revision.
    revisions: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Instances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instances").field("namespace", &self.config.namespace).finish_non_exhaustive()
    }
}

/// Where a kubernetes target's server comes from: the instances, the key, and the env it gets.
#[derive(Debug, Clone)]
pub struct KubernetesBinding {
    pub instances: Arc<Instances>,
    pub key: ProcessKey,
    /// The instance's name ([`instance_name`]).
    pub name: String,
    pub env: BTreeMap<String, String>,
}

impl KubernetesBinding {
    pub fn new(instances: Arc<Instances>, target: &Target, key: ProcessKey, env: BTreeMap<String, String>) -> Self {
        let name = instance_name(target, &key);
        KubernetesBinding { instances, key, name, env }
    }

    /// The URL of the running, verified instance; see [`Instances::ensure`].
    pub async fn ensure(&self, target: &Target) -> Result<String, UpstreamError> {
        self.instances.ensure(target, &self.key, &self.name, &self.env).await
    }

    /// The instance did not answer: the next request looks it up again.
    pub fn forget(&self) {
        self.instances.known.lock().unwrap().remove(&self.name);
    }

    /// Notes a use, reported with the next batch.
    pub fn used(&self) {
        self.instances.used(&self.name);
    }
}

impl PartialEq for KubernetesBinding {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.instances, &other.instances) && self.key == other.key && self.env == other.env
    }
}

/// The instance's name: the target's name and a hash of its id and the key (DNS-1123, at most
/// 63 characters), the same on every data plane.
pub fn instance_name(target: &Target, key: &ProcessKey) -> String {
    let mut hasher = Sha256::new();
    hasher.update(target.id.as_bytes());
    hasher.update([0]);
    hasher.update(key.scope.as_bytes());
    let hash = &reflow_common::crypto::to_hex(&hasher.finalize())[..12];
    let base: String = target
        .name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    format!("{}-{hash}", base.trim_matches('-'))
}

/// The subject key as the custom resource writes it.
fn subject_key(key: &ProcessKey) -> String {
    if key.scope.is_empty() {
        "shared".into()
    } else {
        key.scope.clone()
    }
}

fn unavailable(what: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Instance(what.to_string())
}

impl Instances {
    /// A client from `kubernetes.kubeconfig` (else in cluster, or `KUBECONFIG`).
    pub async fn connect(config: &KubernetesConfig) -> Result<Arc<Instances>, reflow_common::config::ConfigError> {
        let client = reflow_operator::client(config.kubeconfig.as_deref().map(std::path::Path::new))
            .await
            .map_err(|e| reflow_common::config::ConfigError::new("kubernetes.kubeconfig", format!("{e:#}")))?;
        Ok(Arc::new(Instances {
            client,
            config: config.clone(),
            known: Mutex::default(),
            used: Mutex::default(),
            starting: Mutex::default(),
            revisions: Mutex::default(),
        }))
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    /// The URL of the running, verified instance for `key` with `env`; starting it first if
    /// needed, within `kubernetes.start_timeout`.
    pub async fn ensure(
        &self,
        target: &Target,
        key: &ProcessKey,
        name: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<String, UpstreamError> {
        let name = name.to_string();
        let data: BTreeMap<String, k8s_openapi::ByteString> =
            env.iter().map(|(k, v)| (k.clone(), k8s_openapi::ByteString(v.clone().into_bytes()))).collect();
        let hash = reflow_operator::objects::secret_hash(&data);
        if let Some((known, url)) = self.known.lock().unwrap().get(&name) {
            if *known == hash {
                return Ok(url.clone());
            }
        }
        let lock = self.starting.lock().unwrap().entry(name.clone()).or_default().clone();
        let _one = lock.lock().await;
        if let Some((known, url)) = self.known.lock().unwrap().get(&name) {
            if *known == hash {
                return Ok(url.clone());
            }
        }
        let timeout = self.config.start_timeout;
        let url =
            tokio::time::timeout(timeout, self.start(target, key, &name, data, &hash)).await.map_err(|_| {
                unavailable(format!(
                    "instance {name} of target {} did not become ready within {timeout:?}",
                    target.name
                ))
            })??;
        self.known.lock().unwrap().insert(name, (hash, url.clone()));
        Ok(url)
    }

    async fn start(
        &self,
        target: &Target,
        key: &ProcessKey,
        name: &str,
        data: BTreeMap<String, k8s_openapi::ByteString>,
        hash: &str,
    ) -> Result<String, UpstreamError> {
        let instances: Api<MCPInstance> = self.api();
        let api_error = |e: kube::Error| unavailable(format!("the Kubernetes API: {e}"));
        if instances.get_opt(name).await.map_err(api_error)?.is_none() {
            let count = instances
                .list_metadata(&ListParams::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}")))
                .await
                .map_err(api_error)?
                .items
                .len();
            if count >= self.config.max_instances as usize {
                return Err(unavailable(format!(
                    "kubernetes.max_instances ({}) instances run already",
                    self.config.max_instances
                )));
            }
        }
        let labels = json!({
            INSTANCE_LABEL: name,
            TARGET_LABEL: target.id,
            REVISION_LABEL: target.pod_revision(),
            "app.kubernetes.io/managed-by": MANAGER,
            "app.kubernetes.io/part-of": "reflow",
        });
        let apply = PatchParams::apply(MANAGER).force();
        // The Secret first, so the operator finds it when the instance appears.
        let secret_name = format!("{name}-env");
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": secret_name, "labels": labels},
            "type": "Opaque",
            "data": data,
        });
        let secrets: Api<Secret> = self.api();
        secrets.patch(&secret_name, &apply, &Patch::Apply(&secret)).await.map_err(api_error)?;
        let image = target.image.clone().ok_or(UpstreamError::BadUrl)?;
        let mut spec = json!({
            "image": image,
            "port": target.port.unwrap_or(8080),
            "subjectKey": subject_key(key),
            "targetName": target.name,
            "targetID": target.id,
            "secretRef": secret_name,
            "idleTTL": humantime::format_duration(self.config.idle_ttl).to_string().replace(' ', ""),
            "maxLifetime": humantime::format_duration(self.config.max_lifetime).to_string().replace(' ', ""),
        });
        if let Some(path) = &target.health_path {
            spec["healthPath"] = json!(path);
        }
        if let Some(command) = &target.command {
            spec["command"] = json!([command]);
        }
        if !target.args.is_empty() {
            spec["args"] = json!(target.args);
        }
        let instance = json!({
            "apiVersion": "mcp.reflow.io/v1alpha1", "kind": "MCPInstance",
            "metadata": {"name": name, "labels": labels},
            "spec": spec,
        });
        instances.patch(name, &apply, &Patch::Apply(&instance)).await.map_err(api_error)?;

        // Verified, with this env: the pod serving now was started from this Secret.
        loop {
            let current = instances.get(name).await.map_err(api_error)?;
            let status = current.status.unwrap_or_default();
            let verified = status.conditions.iter().any(|c| c.type_ == condition::VERIFIED && c.status == "True");
            if verified && status.secret_hash.as_deref() == Some(hash) {
                let url = match self.config.address {
                    KubernetesAddress::Pod => {
                        status.pod_ip.map(|ip| format!("http://{ip}:{}/mcp", target.port.unwrap_or(8080)))
                    }
                    KubernetesAddress::Service => status.service_url,
                };
                return url.ok_or_else(|| unavailable(format!("instance {name} is verified but has no address")));
            }
            if status.phase.as_deref() == Some("Failed") {
                return Err(unavailable(format!(
                    "instance {name} failed: {}",
                    status.message.unwrap_or_else(|| "no reason given".into())
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The settings it was made with.
    pub fn config(&self) -> &KubernetesConfig {
        &self.config
    }

    /// How long a first request may wait for its instance.
    pub fn start_timeout(&self) -> Duration {
        self.config.start_timeout
    }

    /// Notes a use, reported with the next batch.
    pub fn used(&self, name: &str) {
        // Called per request: no allocation once the instance is in this interval's batch.
        let mut used = self.used.lock().unwrap();
        if !used.contains(name) {
            used.insert(name.to_string());
        }
    }

    /// A new snapshot: deletes the instances of kubernetes targets that were removed or
    /// disabled, and those of an older revision of targets that were changed or restarted (only
    /// those, so a data plane late to the snapshot never deletes an instance another one just
    /// started for the new definition). The next request starts a new one.
    pub fn retire<'t>(self: &Arc<Self>, targets: impl IntoIterator<Item = &'t Target>) {
        let current: HashMap<String, String> = targets
            .into_iter()
            .filter(|t| t.enabled && t.transport_type == reflow_common::model::TransportType::Kubernetes)
            .map(|t| (t.id.clone(), t.pod_revision()))
            .collect();
        let previous = std::mem::replace(&mut *self.revisions.lock().unwrap(), current.clone());
        let mut selectors = Vec::new();
        for (target_id, revision) in &previous {
            match current.get(target_id) {
                None => selectors.push(format!("{TARGET_LABEL}={target_id}")),
                Some(now) if now != revision => {
                    selectors.push(format!("{TARGET_LABEL}={target_id},{REVISION_LABEL}!={now}"))
                }
                Some(_) => {}
            }
        }
        if selectors.is_empty() {
            return;
        }
        self.known.lock().unwrap().clear();
        let instances = self.clone();
        tokio::spawn(async move {
            let api: Api<MCPInstance> = instances.api();
            for selector in selectors {
                let list = ListParams::default().labels(&selector);
                if let Err(error) = api.delete_collection(&DeleteParams::default(), &list).await {
                    tracing::warn!(%selector, %error, "could not delete a changed target's kubernetes instances");
                }
            }
        });
    }

    /// Reports use every `kubernetes.last_used_interval` until `cancel`.
    pub fn start_reporting(self: &Arc<Self>, cancel: CancellationToken) {
        let instances = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(instances.config.last_used_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                instances.report().await;
            }
        });
    }

    async fn report(&self) {
        let used: Vec<String> = self.used.lock().unwrap().drain().collect();
        let api: Api<MCPInstance> = self.api();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        for name in used {
            let patch =
                json!({"apiVersion": "mcp.reflow.io/v1alpha1", "kind": "MCPInstance", "status": {"lastUsedAt": now}});
            if let Err(error) =
                api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await
            {
                tracing::debug!(instance = %name, %error, "last use not reported");
            }
        }
    }
}
