//! The audit record data planes ship to the control plane (`SnapshotService.ShipAudit`), one
//! per MCP request, as JSON. The control plane chains and stores it (`reflow_control_plane::audit`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How a request can end: answered with a result; answered with a JSON-RPC error (the
/// gateway's or the upstream's); the upstream failed (unreachable, HTTP error, broken reply);
/// the upstream did not answer in time; the client went away before the answer (the exchange
/// still finished, and what it did is recorded); the client cancelled it; refused at the HTTP
/// level (a 4xx/5xx without a JSON-RPC exchange).
pub const OUTCOMES: [&str; 7] =
    ["answered", "error", "upstream_failed", "timeout", "client_gone", "cancelled", "refused"];

/// The most bytes of recorded arguments (as JSON) a record keeps; larger ones are replaced by a
/// note saying how large they were.
pub const MAX_ARGUMENTS_BYTES: usize = 16 * 1024;

/// The most records one `ShipAudit` batch carries.
pub const MAX_BATCH: usize = 1000;

/// One MCP request, as the audit trail keeps it.
/// Unknown fields are ignored: a data plane a release ahead may add some.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// How the request ended: one of [`OUTCOMES`].
    pub outcome: String,
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
            outcome: "answered".into(),
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

impl AuditRecord {
    /// Calls `f` with every text field, its name and its longest length.
    fn texts(&mut self, mut f: impl FnMut(&'static str, &mut String, usize)) {
        f("id", &mut self.id, 128);
        f("data_plane", &mut self.data_plane, 253);
        f("endpoint", &mut self.endpoint, 512);
        f("method", &mut self.method, 256);
        f("decision", &mut self.decision, 16);
        f("outcome", &mut self.outcome, 16);
        for (field, value, max) in [
            ("user_id", &mut self.user_id, 512),
            ("session_id", &mut self.session_id, 512),
            ("client_name", &mut self.client_name, 512),
            ("client_version", &mut self.client_version, 512),
            ("protocol_version", &mut self.protocol_version, 512),
            ("target", &mut self.target, 512),
            ("name", &mut self.name, 4096),
            ("policy_id", &mut self.policy_id, 512),
            ("policy_name", &mut self.policy_name, 512),
            ("credential_source", &mut self.credential_source, 512),
            ("transport", &mut self.transport, 512),
            ("snapshot_version", &mut self.snapshot_version, 512),
            ("trace_id", &mut self.trace_id, 512),
        ] {
            if let Some(value) = value {
                f(field, value, max);
            }
        }
    }

    /// Makes the record pass [`check`] whatever a client sent: control characters go and
    /// overlong texts are cut (at a character boundary, marked with `…`). The data plane fits
    /// every record before spooling it, so one odd request never makes a batch refused.
    pub fn fit(&mut self) {
        if let Some(arguments) = &self.arguments {
            let bytes = arguments.to_string().len();
            if bytes > MAX_ARGUMENTS_BYTES {
                self.arguments = Some(serde_json::json!({
                    "omitted": format!("the arguments take {bytes} bytes, more than the {MAX_ARGUMENTS_BYTES} a record keeps")
                }));
            }
        }
        self.texts(|_, value, max| {
            if value.chars().any(char::is_control) {
                value.retain(|c| !c.is_control());
            }
            if value.len() > max {
                let mut end = max - '…'.len_utf8();
                while !value.is_char_boundary(end) {
                    end -= 1;
                }
                value.truncate(end);
                value.push('…');
            }
        });
    }
}

/// Why a shipped record is refused: the field and what is wrong with it.
pub fn check(record: &AuditRecord) -> Result<(), (&'static str, String)> {
    if record.id.is_empty() {
        return Err(("id", "required".into()));
    }
    let mut refused = None;
    record.clone().texts(|field, value, max| {
        if refused.is_none() && (value.len() > max || value.chars().any(char::is_control)) {
            refused = Some((field, format!("at most {max} bytes without control characters")));
        }
    });
    if let Some(refused) = refused {
        return Err(refused);
    }
    if record.arguments.as_ref().is_some_and(|a| a.to_string().len() > MAX_ARGUMENTS_BYTES) {
        return Err(("arguments", format!("at most {MAX_ARGUMENTS_BYTES} bytes as JSON")));
    }
    if !OUTCOMES.contains(&record.outcome.as_str()) {
        return Err(("outcome", format!("one of {}", OUTCOMES.join(", "))));
    }
    if !matches!(record.decision.as_str(), "allowed" | "denied" | "none") {
        return Err(("decision", "one of allowed, denied, none".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data plane a release ahead may send fields this control plane does not know: the
    /// record is kept (without them) rather than refused, which would stall that data plane's
    /// spool.
    #[test]
    fn a_record_with_fields_from_a_newer_data_plane_reads() {
        let record = AuditRecord::new("r1".into(), "dp".into(), Utc::now(), "/mcp".into(), "tools/call".into());
        let mut json = serde_json::to_value(&record).unwrap();
        json["gen_ai_agent"] = serde_json::json!({"name": "planner"});
        let read: AuditRecord = serde_json::from_value(json).expect("unknown fields are ignored");
        assert_eq!(read, record);
    }

    #[test]
    fn a_fitted_record_passes_the_check() {
        let mut record = AuditRecord::new("r1".into(), "dp".into(), Utc::now(), "/mcp/".into(), "tools/call".into());
        record.endpoint.push_str(&"é".repeat(600));
        record.name = Some(format!("evil\nname{}", "x".repeat(5000)));
        record.client_name = Some("client\u{7}".into());
        assert_eq!(check(&record).map_err(|e| e.0), Err("endpoint"));
        let large = serde_json::json!({"blob": "x".repeat(MAX_ARGUMENTS_BYTES)});
        let only_arguments = AuditRecord {
            arguments: Some(large.clone()),
            ..AuditRecord::new("r2".into(), "dp".into(), Utc::now(), "/mcp".into(), "tools/call".into())
        };
        assert_eq!(check(&only_arguments).map_err(|e| e.0), Err("arguments"));
        record.arguments = Some(large);
        record.fit();
        check(&record).unwrap();
        assert!(record.endpoint.ends_with('…') && record.endpoint.len() <= 512);
        assert!(record.name.as_deref().unwrap().starts_with("evilname"));
        assert_eq!(record.client_name.as_deref(), Some("client"));
        let omitted = record.arguments.as_ref().unwrap()["omitted"].as_str().unwrap();
        assert!(omitted.contains(&format!("{} bytes", MAX_ARGUMENTS_BYTES + 11)), "{omitted}");
    }
}
