//! JSON-RPC 2.0 messages as the gateway handles them.
//!
//! Messages stay `serde_json::Value`s: a gateway must pass through fields it does not know
//! (`icons`, `_meta`, fields of protocol versions newer than this build), which typed models
//! drop. Only what routing needs is read. Because the gateway re-serialises what it parsed,
//! an upstream receives exactly the message the policy was decided on: duplicate keys in a
//! client's body collapse to the one the gateway saw (the last) before anything is forwarded.

use serde_json::{json, Map, Value};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
/// The gateway could not serve the request (no snapshot, upstream down or slow).
pub const SERVER_ERROR: i64 = -32000;
pub const UNAUTHORIZED: i64 = -32001;
/// A policy denies what the request asks for.
pub const FORBIDDEN: i64 = -32003;

/// A classified message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Request {
        id: Value,
        method: String,
        params: Option<Value>,
    },
    Notification {
        method: String,
        params: Option<Value>,
    },
    /// A response (result or error) to a request the gateway relayed to the client.
    Response {
        id: Value,
        body: Map<String, Value>,
    },
}

impl Message {
    /// Classifies one parsed JSON value, or explains why it is not a JSON-RPC 2.0 message.
    pub fn classify(value: Value) -> Result<Message, &'static str> {
        let Value::Object(mut body) = value else {
            return Err(if value.is_array() {
                "batched messages are not supported: send one JSON-RPC message per request"
            } else {
                "a JSON-RPC message must be an object"
            });
        };
        if body.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Err("\"jsonrpc\" must be \"2.0\"");
        }
        let id = body.get("id").cloned();
        if let Some(id) = &id {
            if !(id.is_string() || id.is_i64() || id.is_u64()) {
                return Err("\"id\" must be a string or an integer");
            }
        }
        match body.remove("method") {
            Some(Value::String(method)) => {
                let params = body.remove("params");
                if params.as_ref().is_some_and(|p| !p.is_object() && !p.is_array()) {
                    return Err("\"params\" must be an object");
                }
                Ok(match id {
                    Some(id) => Message::Request { id, method, params },
                    None => Message::Notification { method, params },
                })
            }
            Some(_) => Err("\"method\" must be a string"),
            None => match id {
                Some(id) if body.contains_key("result") != body.contains_key("error") => {
                    Ok(Message::Response { id, body })
                }
                Some(_) => Err("a response carries exactly one of \"result\" and \"error\""),
                None => Err("a message needs a \"method\" or an \"id\""),
            },
        }
    }
}

pub fn request(id: Value, method: &str, params: Option<Value>) -> Value {
    let mut message = json!({"jsonrpc": "2.0", "id": id, "method": method});
    if let Some(params) = params {
        message["params"] = params;
    }
    message
}

pub fn notification(method: &str, params: Option<Value>) -> Value {
    let mut message = json!({"jsonrpc": "2.0", "method": method});
    if let Some(params) = params {
        message["params"] = params;
    }
    message
}

pub fn result(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

pub fn error(id: Value, code: i64, message: impl Into<String>) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message.into()}})
}

/// Whether `message` is a response (result or error) rather than a request or notification.
/// Sets `params._meta[key]` of a request (params made an object when absent; a request whose
/// params are an array is left alone).
pub fn set_meta(message: &mut Value, key: &str, value: &str) {
    let Some(object) = message.as_object_mut() else { return };
    let params = object.entry("params").or_insert_with(|| Value::Object(Default::default()));
    let Some(params) = params.as_object_mut() else { return };
    let meta = params.entry("_meta").or_insert_with(|| Value::Object(Default::default()));
    if let Some(meta) = meta.as_object_mut() {
        meta.insert(key.to_string(), Value::String(value.to_string()));
    }
}

/// The `error.type` of an answer: its JSON-RPC error code, or `tool_error` for a tool result
/// with `isError`.
pub fn error_type(reply: &Value) -> Option<String> {
    if let Some(code) = reply.pointer("/error/code").and_then(Value::as_i64) {
        return Some(code.to_string());
    }
    (reply.pointer("/result/isError") == Some(&Value::Bool(true))).then(|| "tool_error".to_string())
}

pub fn is_response(message: &Value) -> bool {
    message.get("method").is_none() && message.get("id").is_some()
}

/// A map key for a request id: ids `1` and `"1"` are different requests.
pub fn id_key(id: &Value) -> String {
    id.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_and_refuses_malformed_messages() {
        let req = Message::classify(json!({"jsonrpc": "2.0", "id": 1, "method": "ping"})).unwrap();
        assert!(matches!(req, Message::Request { ref method, .. } if method == "ping"));
        let note = Message::classify(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).unwrap();
        assert!(matches!(note, Message::Notification { .. }));
        let resp = Message::classify(json!({"jsonrpc": "2.0", "id": "r-1", "result": {}})).unwrap();
        assert!(matches!(resp, Message::Response { .. }));
        for bad in [
            json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"}]),
            json!("ping"),
            json!({"id": 1, "method": "ping"}),
            json!({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}),
            json!({"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"}),
            json!({"jsonrpc": "2.0", "id": 1, "method": 7}),
            json!({"jsonrpc": "2.0", "id": 1, "method": "x", "params": "s"}),
            json!({"jsonrpc": "2.0", "id": 1}),
            json!({"jsonrpc": "2.0", "id": 1, "result": {}, "error": {}}),
            json!({"jsonrpc": "2.0"}),
        ] {
            assert!(Message::classify(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn duplicate_keys_collapse_to_the_last_before_anything_is_forwarded() {
        let parsed: Value = serde_json::from_str(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ok","name":"denied"}}"#,
        )
        .unwrap();
        let Message::Request { params, .. } = Message::classify(parsed).unwrap() else { panic!() };
        assert_eq!(params.unwrap()["name"], "denied");
    }
}
