//! Authorisation: the target a named request (`tools/call`, `prompts/get`, `resources/*`,
//! `completion/complete`) goes to, the name it has there, and whether the user may make it.
//! Unknown and denied are told apart (a typo is not a missing grant), except for a target the
//! user has no grant on at all, which is answered like one that does not exist.

use reflow_proto::policy::{decide, Kind};
use reflow_proto::resources::Target;
use serde_json::Value;

use super::error::McpError;
use super::gateway::{Caller, Gateway};
use super::names;
use super::session::ClientSession;
use super::Scope;
use crate::audit::Trail;

pub(super) fn kind_word(kind: Kind) -> &'static str {
    match kind {
        Kind::Tool => "tool",
        Kind::Prompt => "prompt",
        Kind::Resource => "resource",
    }
}

impl Gateway {
    /// Resolves `params.name` (`params.uri` for resources) to a target and an allowed, unprefixed name.
    pub(super) fn route_named(
        &self,
        session: &ClientSession,
        caller: &Caller,
        params: Option<Value>,
        kind: Kind,
        trail: &mut Trail,
    ) -> Result<(Target, Value), McpError> {
        let field = if kind == Kind::Resource { "uri" } else { "name" };
        let Some(Value::Object(mut params)) = params else {
            return Err(McpError::invalid_params("params must be an object"));
        };
        let Some(key) = params.get(field).and_then(Value::as_str).map(str::to_string) else {
            return Err(McpError::invalid_params(format!("params.{field} must be a string")));
        };
        let (target, inner) = self.route(session, caller, kind, &key, trail)?;
        if target.audit_arguments && kind != Kind::Resource {
            if let Some(arguments) = params.get("arguments") {
                let stored = crate::credentials::stored_values(&caller.snapshot.view, &self.sealer, &target);
                trail.arguments(arguments, &stored);
            }
        }
        params.insert(field.to_string(), Value::String(inner));
        Ok((target, Value::Object(params)))
    }

    pub(super) fn route_completion(
        &self,
        session: &ClientSession,
        caller: &Caller,
        params: Option<Value>,
        trail: &mut Trail,
    ) -> Result<(Target, Value), McpError> {
        let mut params = params.unwrap_or_default();
        let reference = params.get("ref").cloned().unwrap_or_default();
        let (kind, field) = match reference.get("type").and_then(Value::as_str) {
            Some("ref/prompt") => (Kind::Prompt, "name"),
            Some("ref/resource") => (Kind::Resource, "uri"),
            _ => return Err(McpError::invalid_params("params.ref.type must be ref/prompt or ref/resource")),
        };
        let Some(key) = reference.get(field).and_then(Value::as_str) else {
            return Err(McpError::invalid_params(format!("params.ref.{field} must be a string")));
        };
        let (target, inner) = self.route(session, caller, kind, key, trail)?;
        params["ref"][field] = Value::String(inner);
        Ok((target, params))
    }

    /// Finds the target of `key` and decides. Unknown and denied are told apart so users can
    /// tell a typo from a missing grant; the explain endpoint says which policy decided.
    pub(super) fn route(
        &self,
        session: &ClientSession,
        caller: &Caller,
        kind: Kind,
        key: &str,
        trail: &mut Trail,
    ) -> Result<(Target, String), McpError> {
        let unknown = || McpError::Unknown { kind: kind_word(kind), name: key.to_string() };
        let (target_name, inner) = address(&session.scope, kind, key).ok_or_else(unknown)?;
        if let Some(record) = trail.record() {
            record.target = Some(target_name.to_string());
            record.name = Some(inner.to_string());
        }
        let Some(target) = Gateway::granted(caller, target_name) else {
            // Answered like an unknown target; the trail says what it was.
            if let (Some(record), Some(_)) =
                (trail.record(), Gateway::servable(&caller.snapshot, target_name, caller.kubernetes))
            {
                record.decision = "denied".into();
            }
            return Err(unknown());
        };
        let inner =
            decided_name(kind, inner).map_err(|e| McpError::invalid_params(format!("resource {key:?}: {e}")))?;
        let inner = inner.as_ref();
        let decision = decide(&caller.snapshot.view.policies, &caller.user, &target.id, kind, inner);
        tracing::info!(
            target: "reflow::audit",
            user = %caller.user.id,
            target = %target.name,
            kind = kind_word(kind),
            name = %inner,
            allowed = decision.allowed,
            policy = decision.policy_name.as_deref().unwrap_or("(none: default deny)"),
            "policy decision"
        );
        if let Some(record) = trail.record() {
            record.name = Some(inner.to_string());
            record.transport = Some(target.transport_type.as_str().to_string());
            record.decision = if decision.allowed { "allowed" } else { "denied" }.into();
            record.policy_id = decision.policy_id;
            record.policy_name = decision.policy_name;
        }
        if !decision.allowed {
            return Err(McpError::Denied { kind: kind_word(kind), name: key.to_string() });
        }
        Ok((target.clone(), inner.to_string()))
    }
}

/// The target a name addresses on the session's endpoint and the name it has there: on
/// `/mcp/{target}` names are the upstream's own; on `/mcp`, tools and prompts are
/// `<target>_<name>` and resources carry their target in a mapped URI.
pub(super) fn address<'k>(scope: &'k Scope, kind: Kind, key: &'k str) -> Option<(&'k str, &'k str)> {
    match scope {
        Scope::Target(name) => Some((name.as_str(), key)),
        Scope::Aggregate if kind == Kind::Resource => names::unmap_uri(key),
        Scope::Aggregate => names::split(key),
    }
}

/// The name a policy decides on and the upstream receives: a resource in its normal form (so
/// `..` and `%2e%2e` cannot walk out of an allowed prefix), anything else as it is.
pub(super) fn decided_name(kind: Kind, inner: &str) -> Result<std::borrow::Cow<'_, str>, String> {
    match kind {
        Kind::Resource => reflow_common::uri::normalize(inner).map(std::borrow::Cow::Owned).map_err(|e| e.to_string()),
        _ => Ok(std::borrow::Cow::Borrowed(inner)),
    }
}

/// Maps the URIs a result carries (read contents, resource links, embedded resources) so the
/// client can use them through the aggregated endpoint.
pub(super) fn map_result_uris(target: &str, method: &str, reply: &mut Value) {
    let Some(result) = reply.get_mut("result") else { return };
    let map = |value: &mut Value| {
        if let Some(uri) = value.get("uri").and_then(Value::as_str) {
            value["uri"] = Value::String(names::map_uri(target, uri));
        }
    };
    let map_content = |content: &mut Value| match content.get("type").and_then(Value::as_str) {
        Some("resource_link") => map(content),
        Some("resource") => {
            if let Some(resource) = content.get_mut("resource") {
                map(resource)
            }
        }
        _ => {}
    };
    match method {
        "resources/read" => {
            result.get_mut("contents").and_then(Value::as_array_mut).into_iter().flatten().for_each(map)
        }
        "tools/call" => {
            result.get_mut("content").and_then(Value::as_array_mut).into_iter().flatten().for_each(map_content)
        }
        "prompts/get" => result
            .get_mut("messages")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .filter_map(|m| m.get_mut("content"))
            .for_each(map_content),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_address_their_target_on_each_endpoint() {
        let one = Scope::Target("github".into());
        assert_eq!(address(&one, Kind::Tool, "create_issue"), Some(("github", "create_issue")));
        assert_eq!(address(&one, Kind::Resource, "file:///a"), Some(("github", "file:///a")));
        let all = Scope::Aggregate;
        assert_eq!(address(&all, Kind::Tool, "github_create_issue"), Some(("github", "create_issue")));
        assert_eq!(address(&all, Kind::Prompt, "github_summary"), Some(("github", "summary")));
        assert_eq!(address(&all, Kind::Tool, "unprefixed"), None, "no target prefix: unknown");
        let mapped = names::map_uri("docs", "file:///a/b.txt");
        assert_eq!(address(&all, Kind::Resource, &mapped), Some(("docs", "file:///a/b.txt")));
        assert_eq!(address(&all, Kind::Resource, "file:///a/b.txt"), None, "an unmapped URI names no target");
    }

    #[test]
    fn resources_are_decided_in_their_normal_form() {
        assert_eq!(decided_name(Kind::Tool, "a/../b").unwrap(), "a/../b", "tool names are not paths");
        let walked = decided_name(Kind::Resource, "file:///public/../secret").unwrap();
        assert_eq!(walked, decided_name(Kind::Resource, "file:///secret").unwrap());
        let encoded = decided_name(Kind::Resource, "file:///public/%2e%2e/secret").unwrap();
        assert_eq!(encoded, walked, "an encoded walk is the same walk");
    }

    #[test]
    fn result_uris_are_mapped() {
        let mut reply = json!({"result": {"content": [
            {"type": "text", "text": "hi"},
            {"type": "resource_link", "uri": "test://a"},
            {"type": "resource", "resource": {"uri": "test://b", "text": "x"}},
        ]}});
        map_result_uris("t", "tools/call", &mut reply);
        assert_eq!(reply["result"]["content"][1]["uri"], "reflow+t+test://a");
        assert_eq!(reply["result"]["content"][2]["resource"]["uri"], "reflow+t+test://b");
    }
}
