//! The audit record data planes ship to the control plane (`SnapshotService.ShipAudit`), one
//! per MCP request, as JSON. The control plane chains and stores it (`reflow_control_plane::audit`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The most records one `ShipAudit` batch carries.
pub const MAX_BATCH: usize = 1000;

/// One MCP request, as the audit trail keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Chosen by the data plane; a record sent twice is stored once.
    pub id: String,
    pub at: DateTime<Utc>,
    pub data_plane: String,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub client_name: Option<String>,
    pub client_version: Option<String>,
    /// `/mcp` or `/mcp/{target}`.
    pub endpoint: String,
    pub protocol_version: Option<String>,
    /// The JSON-RPC method.
    pub method: String,
    pub target: Option<String>,
    /// The tool or prompt name, or the resource URI.
    pub name: Option<String>,
    /// `allowed`, `denied`, or `none` for requests no policy decides (initialize, ping).
    pub decision: String,
    /// The deciding policy; `null` with `denied` is the default deny.
    pub policy_id: Option<String>,
    pub policy_name: Option<String>,
    /// Where the injected credential came from (`user`, `group:…`, `role:…`, `default`).
    pub credential_source: Option<String>,
    /// `streamable-http`, `sse` or `stdio`.
    pub transport: Option<String>,
    /// The HTTP status the client was answered with.
    pub status: u16,
    /// The upstream's HTTP status, when there was an upstream exchange over HTTP.
    pub upstream_status: Option<u16>,
    /// The JSON-RPC error code the client got, if any.
    pub error_code: Option<i64>,
    pub duration_ms: u64,
    pub snapshot_version: Option<String>,
    pub trace_id: Option<String>,
    /// Only for targets that opt in: the arguments, secrets masked.
    pub arguments: Option<serde_json::Value>,
}

impl AuditRecord {
    /// The canonical body the chain hashes: serde_json of the record (field order is the
    /// struct's, so equal records give equal bodies).
    pub fn body(&self) -> String {
        serde_json::to_string(self).expect("an audit record serialises")
    }
}

impl AuditRecord {
    /// A record with what every record has; the rest is filled in as the request goes.
    pub fn new(id: String, data_plane: String, at: DateTime<Utc>, endpoint: String, method: String) -> Self {
        AuditRecord {
            id,
            at,
            data_plane,
            user_id: None,
            session_id: None,
            client_name: None,
            client_version: None,
            endpoint,
            protocol_version: None,
            method,
            target: None,
            name: None,
            decision: "none".into(),
            policy_id: None,
            policy_name: None,
            credential_source: None,
            transport: None,
            status: 200,
            upstream_status: None,
            error_code: None,
            duration_ms: 0,
            snapshot_version: None,
            trace_id: None,
            arguments: None,
        }
    }
}

/// Why a shipped record is refused: the field and what is wrong with it.
pub fn check(record: &AuditRecord) -> Result<(), (&'static str, String)> {
    let text = |field: &'static str, value: &str, max: usize| {
        if value.len() > max || value.chars().any(char::is_control) {
            Err((field, format!("at most {max} bytes without control characters")))
        } else {
            Ok(())
        }
    };
    if record.id.is_empty() {
        return Err(("id", "required".into()));
    }
    text("id", &record.id, 128)?;
    text("data_plane", &record.data_plane, 253)?;
    text("endpoint", &record.endpoint, 512)?;
    text("method", &record.method, 256)?;
    text("decision", &record.decision, 16)?;
    for (field, value) in [
        ("user_id", &record.user_id),
        ("session_id", &record.session_id),
        ("client_name", &record.client_name),
        ("client_version", &record.client_version),
        ("protocol_version", &record.protocol_version),
        ("target", &record.target),
        ("policy_id", &record.policy_id),
        ("policy_name", &record.policy_name),
        ("credential_source", &record.credential_source),
        ("transport", &record.transport),
        ("snapshot_version", &record.snapshot_version),
        ("trace_id", &record.trace_id),
    ] {
        if let Some(value) = value {
            text(field, value, 512)?;
        }
    }
    if let Some(name) = &record.name {
        text("name", name, 4096)?;
    }
    if !matches!(record.decision.as_str(), "allowed" | "denied" | "none") {
        return Err(("decision", "one of allowed, denied, none".into()));
    }
    Ok(())
}
