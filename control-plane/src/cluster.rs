//! The control plane's view of the Kubernetes cluster, when `kubernetes.enabled` is set on it:
//! the `MCPInstance`s of kubernetes targets and their pods.
//!
//! Data planes create instances and retire those of an old target revision as snapshots reach
//! them; with cluster access the control plane does the same itself, so `restart-instances`, a
//! target edit and a target removal take effect even while no data plane runs, and
//! `GET /api/targets/{id}/instances` lists the pods with their phase and conditions.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};
use reflow_common::config::{ConfigError, KubernetesConfig};
use reflow_operator::crd::MCPInstance;
use reflow_operator::objects::{INSTANCE_LABEL, TARGET_LABEL, TARGET_REVISION_LABEL};
use serde::Serialize;
use utoipa::ToSchema;

/// A client for the namespace the data planes start instances in.
pub struct Cluster {
    client: kube::Client,
    namespace: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

/// One condition of an instance or its pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub last_transition_time: Option<String>,
}

/// The pod that serves an instance now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct PodStatus {
    pub name: String,
    /// The pod's phase: `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    pub phase: Option<String>,
    pub pod_ip: Option<String>,
    pub node: Option<String>,
    /// Container restarts.
    pub restarts: i32,
    pub conditions: Vec<PodCondition>,
}

/// One `MCPInstance` of a kubernetes target: one isolation key's server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct PodInstance {
    /// The instance's name (the same on every data plane for this target and key).
    pub name: String,
    /// The isolation key it serves: `shared`, `role:…`, `groups:…` or `user:…`.
    pub subject_key: String,
    /// The operator's phase: `Pending`, `Running`, `Ready` or `Failed`.
    pub phase: Option<String>,
    /// Why, when the operator says more than the phase.
    pub message: Option<String>,
    /// `Accepted`, `Available` and `Verified`.
    pub conditions: Vec<PodCondition>,
    /// What the server answered to `initialize`.
    pub server_info: Option<serde_json::Value>,
    pub started_at: Option<String>,
    /// The last use a data plane reported (they report at most once per interval).
    pub last_used_at: Option<String>,
    /// Made for the target's current definition; `false`: about to be replaced.
    pub current: bool,
    /// Its pod, once the operator has made one.
    pub pod: Option<PodStatus>,
}

/// The cluster did not answer as asked.
#[derive(Debug, thiserror::Error)]
#[error("the Kubernetes API: {0}")]
pub struct ClusterError(#[from] kube::Error);

impl Cluster {
    /// A client from `kubernetes.kubeconfig` (else in cluster, or `KUBECONFIG`).
    pub async fn connect(config: &KubernetesConfig) -> Result<Arc<Cluster>, ConfigError> {
        let client = reflow_operator::client(config.kubeconfig.as_deref().map(std::path::Path::new))
            .await
            .map_err(|e| ConfigError::new("kubernetes.kubeconfig", format!("{e:#}")))?;
        Ok(Arc::new(Cluster { client, namespace: config.namespace.clone() }))
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The instances of `target` and their pods, by name.
    pub async fn instances(&self, target: &reflow_proto::resources::Target) -> Result<Vec<PodInstance>, ClusterError> {
        let selector = format!("{TARGET_LABEL}={}", target.id);
        let list = ListParams::default().labels(&selector);
        let instances = self.api::<MCPInstance>().list(&list).await?;
        let pods = self.api::<Pod>().list(&list).await?;
        let revision = target.pod_revision();
        let mut listed: Vec<PodInstance> = instances
            .items
            .into_iter()
            .map(|instance| {
                let name = instance.metadata.name.clone().unwrap_or_default();
                let labels = instance.metadata.labels.clone().unwrap_or_default();
                let status = instance.status.clone().unwrap_or_default();
                let pod = pods
                    .items
                    .iter()
                    .filter(|p| p.metadata.labels.as_ref().and_then(|l| l.get(INSTANCE_LABEL)) == Some(&name))
                    .find(|p| status.pod_name.is_none() || p.metadata.name == status.pod_name)
                    .map(pod_status);
                PodInstance {
                    subject_key: instance.spec.subject_key.clone(),
                    phase: status.phase,
                    message: status.message,
                    conditions: status
                        .conditions
                        .into_iter()
                        .map(|c| PodCondition {
                            kind: c.type_,
                            status: c.status,
                            reason: Some(c.reason).filter(|r| !r.is_empty()),
                            message: Some(c.message).filter(|m| !m.is_empty()),
                            last_transition_time: Some(c.last_transition_time.0.to_string()),
                        })
                        .collect(),
                    server_info: status.server_info.and_then(|info| serde_json::to_value(info).ok()),
                    started_at: status.started_at,
                    last_used_at: status.last_used_at,
                    current: labels.get(TARGET_REVISION_LABEL) == Some(&revision),
                    pod,
                    name,
                }
            })
            .collect();
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(listed)
    }

    /// How many instances the target `target_id` has.
    pub async fn count(&self, target_id: &str) -> Result<u32, ClusterError> {
        let list = ListParams::default().labels(&format!("{TARGET_LABEL}={target_id}"));
        Ok(self.api::<MCPInstance>().list_metadata(&list).await?.items.len() as u32)
    }

    /// Deletes the instances of the target `target_id` made for another revision than `keep`
    /// (all of them when `None`): the operator's finalizer and the garbage collector remove
    /// their pods, Services, Secrets and NetworkPolicies. Answers how many there were.
    pub async fn retire(&self, target_id: &str, keep: Option<&str>) -> Result<u32, ClusterError> {
        let selector = match keep {
            Some(revision) => format!("{TARGET_LABEL}={target_id},{TARGET_REVISION_LABEL}!={revision}"),
            None => format!("{TARGET_LABEL}={target_id}"),
        };
        let list = ListParams::default().labels(&selector);
        let api = self.api::<MCPInstance>();
        let found = api.list_metadata(&list).await?.items.len();
        if found > 0 {
            api.delete_collection(&DeleteParams::default(), &list).await?;
            tracing::info!(%target_id, instances = found, "retired a target's kubernetes instances");
        }
        Ok(found as u32)
    }

    /// [`Cluster::retire`] in the background, for writes whose answer does not wait for it.
    pub fn retire_later(self: &Arc<Self>, target_id: String, keep: Option<String>) {
        let cluster = self.clone();
        tokio::spawn(async move {
            if let Err(error) = cluster.retire(&target_id, keep.as_deref()).await {
                tracing::warn!(%target_id, %error, "could not retire a target's kubernetes instances");
            }
        });
    }
}

fn pod_status(pod: &Pod) -> PodStatus {
    let status = pod.status.clone().unwrap_or_default();
    PodStatus {
        name: pod.metadata.name.clone().unwrap_or_default(),
        phase: status.phase,
        pod_ip: status.pod_ip,
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        restarts: status.container_statuses.unwrap_or_default().iter().map(|c| c.restart_count).sum(),
        conditions: status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .map(|c| PodCondition {
                kind: c.type_,
                status: c.status,
                reason: c.reason,
                message: c.message,
                last_transition_time: c.last_transition_time.map(|t| t.0.to_string()),
            })
            .collect(),
    }
}
