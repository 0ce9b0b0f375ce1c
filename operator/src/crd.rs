//! The `MCPInstance` custom resource (`mcp.reflow.io/v1alpha1`): one MCP server for one
//! isolation key of one target. Data planes create it; the operator runs it.
//!
//! The spec keeps the original gateway's fields (so its custom resources apply unchanged) and
//! adds the network posture. Credentials never appear in the spec: they live in the env Secret
//! `secretRef` names, which the data plane writes and the operator owns.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "mcp.reflow.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "MCPInstance";

/// The condition types the operator keeps in `status.conditions`.
pub mod condition {
    /// The spec is valid and the operator owns the instance.
    pub const ACCEPTED: &str = "Accepted";
    /// The pod runs and its readiness probe passes.
    pub const AVAILABLE: &str = "Available";
    /// An MCP `initialize` against the pod's Service succeeded; `status.serverInfo` holds what
    /// it answered.
    pub const VERIFIED: &str = "Verified";
}

// Several `printcolumn`s are several columns, not an attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mcp.reflow.io",
    version = "v1alpha1",
    kind = "MCPInstance",
    namespaced,
    status = "MCPInstanceStatus",
    shortname = "mcpi",
    category = "reflow",
    doc = "One MCP server run for one isolation key of a Reflow target",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetName"),
    printcolumn(name = "Subject", type_ = "string", json_path = ".spec.subjectKey"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MCPInstanceSpec {
    /// The container image of the MCP server.
    pub image: String,
    /// The port the server listens on (Streamable HTTP at `/mcp`); also given to it as `MCP_PORT`.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// An HTTP path answering 200 when the server is ready; unset: a TCP check of the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    /// The isolation key the instance serves: `shared`, `role:<r>`, `group:<g>` or `user:<id>`.
    pub subject_key: String,
    #[serde(default)]
    pub target_name: String,
    #[serde(rename = "targetID", default)]
    pub target_id: String,
    /// Plain (non-secret) environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// The Secret in the instance's namespace whose keys become the server's environment (the
    /// resolved credentials). Its content's hash is part of the pod: a change restarts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Deleted after this long without use (a Go-style duration: `30m`, `1h30m`).
    #[serde(rename = "idleTTL", default = "default_idle_ttl")]
    pub idle_ttl: String,
    /// Deleted this long after it started, used or not.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime: String,
    /// Where the server may connect: `Open` (anywhere) or `Restricted` (DNS only).
    #[serde(default)]
    pub egress: Egress,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Egress {
    #[default]
    Open,
    Restricted,
}

fn default_port() -> i32 {
    8080
}

fn default_idle_ttl() -> String {
    "30m".into()
}

fn default_max_lifetime() -> String {
    "24h".into()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MCPInstanceStatus {
    /// `Pending`, `Running`, `Ready` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The pod's address, for clients that reach pods directly rather than through the Service.
    #[serde(rename = "podIP", default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// `http://<service>.<namespace>.svc:<port>/mcp`.
    #[serde(rename = "serviceURL", default, skip_serializing_if = "Option::is_none")]
    pub service_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Written by data planes (their own field manager), at most once a minute per instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The hash of the env Secret's content the current pod runs with
    /// ([`crate::objects::secret_hash`]): a writer of the Secret knows its change is live when
    /// this matches and the instance is Verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_hash: Option<String>,
    /// What the server answered to `initialize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_info: Option<ServerInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerInfo {
    pub name: String,
    #[serde(default)]
    pub version: String,
    pub protocol_version: String,
}

/// The CRD as YAML, as `reflow operator crd` prints it and `deploy/` commits it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt as _;
    let crd = MCPInstance::crd();
    let mut text = String::from("# Generated by `reflow operator crd` from operator/src/crd.rs; do not edit.\n");
    text.push_str(&serde_yaml_ng::to_string(&crd).expect("the CRD serialises"));
    text
}

/// A duration as the spec writes it (`90s`, `30m`, `1h30m`, `24h`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("{text:?}: {e} (a duration like 30m or 1h30m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed CRD is what the types generate (`reflow operator crd > deploy/crds/mcpinstance.yaml`).
    #[test]
    fn the_committed_crd_is_generated_from_the_types() {
        let committed =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds/mcpinstance.yaml"))
                .expect("deploy/crds/mcpinstance.yaml");
        assert!(
            committed == crd_yaml(),
            "deploy/crds/mcpinstance.yaml is stale: run `cargo run -p reflow -- operator crd > deploy/crds/mcpinstance.yaml`"
        );
    }

    #[test]
    fn the_crd_keeps_the_original_fields_and_defaults() {
        let crd: serde_json::Value = serde_yaml_ng::from_str(&crd_yaml()).unwrap();
        assert_eq!(crd["metadata"]["name"], "mcpinstances.mcp.reflow.io");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object());
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        for field in [
            "image",
            "port",
            "healthPath",
            "subjectKey",
            "targetName",
            "targetID",
            "env",
            "secretRef",
            "command",
            "args",
            "resources",
            "idleTTL",
            "maxLifetime",
        ] {
            assert!(spec.get(field).is_some(), "spec.{field}");
        }
        assert_eq!(spec["port"]["default"], 8080);
        assert_eq!(spec["idleTTL"]["default"], "30m");
        assert_eq!(spec["maxLifetime"]["default"], "24h");
        let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
        for field in
            ["phase", "podName", "serviceURL", "startedAt", "lastUsedAt", "message", "conditions", "serverInfo"]
        {
            assert!(status.get(field).is_some(), "status.{field}");
        }
        // An instance in the original's shape reads with its defaults.
        let original: MCPInstanceSpec =
            serde_json::from_value(serde_json::json!({"image": "ghcr.io/x/server:1", "subjectKey": "user:u1", "targetName": "t", "targetID": "id"})).unwrap();
        assert_eq!((original.port, original.idle_ttl.as_str(), original.max_lifetime.as_str()), (8080, "30m", "24h"));
    }

    #[test]
    fn durations_read_as_the_spec_writes_them() {
        assert_eq!(parse_duration("30m").unwrap().as_secs(), 1800);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("24h").unwrap().as_secs(), 86400);
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
    }
}
