//! What the operator writes for an `MCPInstance`: pure functions from the instance (and the hash
//! of its env Secret) to the Pod, Service and NetworkPolicy, so every field is tested without an
//! API server.
//!
//! The pod is a bare Pod, not a Deployment: an isolation key must never be served by two pods at
//! once (a rollout would overlap them, and a per-user server may keep state), the operator
//! already decides when a pod ends (idle TTL, lifetime, a credential change), and a bare pod's
//! name can carry its revision, so a restarted operator finds exactly the pod it meant to create.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::crd::{Egress, MCPInstance};

/// The label every object of an instance carries, naming it.
pub const INSTANCE_LABEL: &str = "mcp.reflow.io/instance";
/// The label naming an object's target (its Reflow target id).
pub const TARGET_LABEL: &str = "mcp.reflow.io/target-id";
/// The pod's revision: a hash of everything that shapes it, its env Secret's content included.
pub const REVISION_LABEL: &str = "mcp.reflow.io/revision";
/// On an instance: the revision of the target definition it was made for
/// (`reflow_proto::resources::Target::pod_revision`), written by data planes.
pub const TARGET_REVISION_LABEL: &str = "mcp.reflow.io/target-revision";
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "reflow-operator");
/// The finalizer the operator keeps on instances until their objects are gone.
pub const FINALIZER: &str = "mcp.reflow.io/cleanup";
/// The user pods run as, unless the image says otherwise through `runAsUser` in a later spec.
pub const RUN_AS_USER: i64 = 65532;

/// Which pods may reach MCP servers: the labels of data-plane (and operator) pods.
#[derive(Debug, Clone)]
pub struct Peers {
    pub data_plane: BTreeMap<String, String>,
    pub operator: BTreeMap<String, String>,
}

impl Default for Peers {
    fn default() -> Self {
        let labels = |component: &str| {
            BTreeMap::from([
                ("app.kubernetes.io/part-of".to_string(), "reflow".to_string()),
                ("app.kubernetes.io/component".to_string(), component.to_string()),
            ])
        };
        Peers { data_plane: labels("data-plane"), operator: labels("operator") }
    }
}

fn owner(instance: &MCPInstance) -> OwnerReference {
    instance.controller_owner_ref(&()).expect("an instance read from the API server has a uid")
}

fn labels(instance: &MCPInstance) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (INSTANCE_LABEL.to_string(), instance.name_any()),
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        ("app.kubernetes.io/name".to_string(), "mcp-server".to_string()),
        ("app.kubernetes.io/part-of".to_string(), "reflow".to_string()),
    ]);
    // The target's id (a UUID: a valid label value), so a target's pods can be listed.
    let target = &instance.spec.target_id;
    if !target.is_empty() && target.len() <= 63 && target.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        labels.insert(TARGET_LABEL.to_string(), target.clone());
    }
    labels
}

/// The revision of the pod `instance` should run, given its env Secret's content hash.
pub fn revision(instance: &MCPInstance, secret_hash: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(&instance.spec).expect("a spec serialises"));
    hasher.update(secret_hash.as_bytes());
    reflow_common::crypto::to_hex(&hasher.finalize())[..10].to_string()
}

/// The hash of a Secret's data (keys in order).
pub fn secret_hash(data: &BTreeMap<String, k8s_openapi::ByteString>) -> String {
    let mut hasher = Sha256::new();
    for (key, value) in data {
        hasher.update((key.len() as u64).to_be_bytes());
        hasher.update(key.as_bytes());
        hasher.update((value.0.len() as u64).to_be_bytes());
        hasher.update(&value.0);
    }
    reflow_common::crypto::to_hex(&hasher.finalize())
}

/// The name of the pod for `revision`: at most 63 characters.
pub fn pod_name(instance: &MCPInstance, revision: &str) -> String {
    let base = instance.name_any();
    let base = &base[..base.len().min(63 - revision.len() - 1)];
    format!("{base}-{revision}")
}

/// The Service in front of the instance's pod, and the URL clients use.
pub fn service_url(instance: &MCPInstance) -> String {
    format!(
        "http://{}.{}.svc:{}/mcp",
        instance.name_any(),
        instance.namespace().unwrap_or_default(),
        instance.spec.port
    )
}

pub fn pod(instance: &MCPInstance, revision: &str, secret_hash: &str) -> Pod {
    let spec = &instance.spec;
    let mut pod_labels = labels(instance);
    pod_labels.insert(REVISION_LABEL.to_string(), revision.to_string());
    let mut env = vec![json!({"name": "MCP_PORT", "value": spec.port.to_string()})];
    env.extend(spec.env.iter().map(|e| json!({"name": e.name, "value": e.value})));
    let probe = match &spec.health_path {
        Some(path) => json!({"httpGet": {"path": path, "port": spec.port}, "periodSeconds": 2, "failureThreshold": 3}),
        None => json!({"tcpSocket": {"port": spec.port}, "periodSeconds": 2, "failureThreshold": 3}),
    };
    let mut container = json!({
        "name": "mcp",
        "image": spec.image,
        "ports": [{"name": "mcp", "containerPort": spec.port, "protocol": "TCP"}],
        "env": env,
        "readinessProbe": probe,
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    });
    if let Some(secret) = &spec.secret_ref {
        container["envFrom"] = json!([{"secretRef": {"name": secret}}]);
    }
    if !spec.command.is_empty() {
        container["command"] = json!(spec.command);
    }
    if !spec.args.is_empty() {
        container["args"] = json!(spec.args);
    }
    if let Some(resources) = &spec.resources {
        container["resources"] = serde_json::to_value(resources).expect("resources serialise");
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(instance, revision),
            "namespace": instance.namespace(),
            "labels": pod_labels,
            "annotations": {"mcp.reflow.io/secret-hash": secret_hash},
            "ownerReferences": [owner(instance)],
        },
        "spec": {
            "restartPolicy": "Always",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": RUN_AS_USER,
                "runAsGroup": RUN_AS_USER,
                "fsGroup": RUN_AS_USER,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
        },
    }))
    .expect("the pod is well-formed")
}

pub fn service(instance: &MCPInstance) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": instance.name_any(),
            "namespace": instance.namespace(),
            "labels": labels(instance),
            "ownerReferences": [owner(instance)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": {INSTANCE_LABEL: instance.name_any()},
            "ports": [{"name": "mcp", "port": instance.spec.port, "targetPort": instance.spec.port, "protocol": "TCP"}],
        },
    }))
    .expect("the service is well-formed")
}

/// Ingress only from data-plane and operator pods (any namespace), on the server's port; egress
/// open, or with `Restricted` DNS only.
pub fn network_policy(instance: &MCPInstance, peers: &Peers) -> NetworkPolicy {
    let from =
        |labels: &BTreeMap<String, String>| json!({"namespaceSelector": {}, "podSelector": {"matchLabels": labels}});
    let mut spec = json!({
        "podSelector": {"matchLabels": {INSTANCE_LABEL: instance.name_any()}},
        "policyTypes": ["Ingress"],
        "ingress": [{
            "from": [from(&peers.data_plane), from(&peers.operator)],
            "ports": [{"port": instance.spec.port, "protocol": "TCP"}],
        }],
    });
    if instance.spec.egress == Egress::Restricted {
        spec["policyTypes"] = json!(["Ingress", "Egress"]);
        spec["egress"] = json!([{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]);
    }
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": instance.name_any(),
            "namespace": instance.namespace(),
            "labels": labels(instance),
            "ownerReferences": [owner(instance)],
        },
        "spec": spec,
    }))
    .expect("the network policy is well-formed")
}

/// Whether `instance`'s own uid is among `object`'s owners.
pub fn owned_by<K: Resource>(object: &K, instance: &MCPInstance) -> bool {
    let uid = instance.meta().uid.as_deref();
    object.meta().owner_references.iter().flatten().any(|o| Some(o.uid.as_str()) == uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(name: &str, egress: &str) -> MCPInstance {
        serde_json::from_value(json!({
            "apiVersion": "mcp.reflow.io/v1alpha1", "kind": "MCPInstance",
            "metadata": {"name": name, "namespace": "mcp", "uid": "0000-uid"},
            "spec": {"image": "ghcr.io/x/server:1", "subjectKey": "user:u1", "secretRef": "env-secret",
                     "healthPath": "/health", "egress": egress},
        }))
        .unwrap()
    }

    #[test]
    fn the_pod_is_restricted_owned_and_named_by_its_revision() {
        let instance = instance("github-user-u1", "Open");
        let revision = revision(&instance, "hash-1");
        let pod = serde_json::to_value(pod(&instance, &revision, "hash-1")).unwrap();
        assert_eq!(pod["metadata"]["name"], format!("github-user-u1-{revision}"));
        assert_eq!(pod["metadata"]["ownerReferences"][0]["uid"], "0000-uid");
        assert_eq!(pod["metadata"]["ownerReferences"][0]["controller"], true);
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(container["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["spec"]["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
        assert_eq!(container["envFrom"][0]["secretRef"]["name"], "env-secret");
        assert_eq!(container["env"][0], json!({"name": "MCP_PORT", "value": "8080"}));
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/health");
    }

    #[test]
    fn a_new_secret_or_spec_is_a_new_revision_and_names_stay_valid() {
        let a = instance("a", "Open");
        assert_eq!(revision(&a, "h1"), revision(&a, "h1"));
        assert_ne!(revision(&a, "h1"), revision(&a, "h2"));
        let mut b = a.clone();
        b.spec.image = "ghcr.io/x/server:2".into();
        assert_ne!(revision(&a, "h1"), revision(&b, "h1"));
        let long = instance(&"x".repeat(63), "Open");
        assert!(pod_name(&long, &revision(&long, "h")).len() <= 63);
    }

    #[test]
    fn ingress_only_from_reflow_and_egress_as_the_spec_says() {
        let open = serde_json::to_value(network_policy(&instance("a", "Open"), &Peers::default())).unwrap();
        assert_eq!(open["spec"]["policyTypes"], json!(["Ingress"]));
        let from = &open["spec"]["ingress"][0]["from"];
        assert_eq!(from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "data-plane");
        assert_eq!(from[1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "operator");
        assert_eq!(open["spec"]["ingress"][0]["ports"][0]["port"], 8080);
        let restricted = serde_json::to_value(network_policy(&instance("a", "Restricted"), &Peers::default())).unwrap();
        assert_eq!(restricted["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(restricted["spec"]["egress"][0]["ports"][0]["port"], 53);
        assert!(restricted["spec"]["egress"][0].get("to").is_none(), "DNS to anywhere, nothing else");
    }
}
