//! The one place the MCP endpoints choose what a failure looks like to the client: every
//! JSON-RPC error the gateway itself produces is an [`McpError`] (its code and message in
//! [`McpError::code`] and its `Display`), and every HTTP-level refusal a [`Refusal`] (status,
//! JSON-RPC body, and the `Retry-After` or `WWW-Authenticate` that goes with it). Errors an
//! upstream sends are relayed as they are, not rewritten.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use crate::jsonrpc::{self, FORBIDDEN, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, SERVER_ERROR};
use crate::upstream::UpstreamError;

/// Why the gateway answers a request with an error.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("the session is not initialised: send initialize first")]
    NotInitialized,
    #[error("the session is already initialised")]
    AlreadyInitialized,
    #[error("method {0:?} is not supported by this gateway")]
    MethodNotFound(String),
    /// Params that do not have the shape the method needs (the message names the field).
    #[error("{0}")]
    InvalidParams(String),
    /// A tool, prompt or resource no target the user may reach offers (or a typo).
    #[error("unknown {kind} {name:?}")]
    Unknown { kind: &'static str, name: String },
    /// A policy (or the default deny) refuses this user the tool, prompt or resource.
    #[error("{kind} {name:?} is not allowed for this user")]
    Denied { kind: &'static str, name: String },
    /// The session's target did not initialise.
    #[error("target {target:?} is unavailable: {error}")]
    Unavailable { target: String, error: UpstreamError },
    /// The upstream exchange failed (unreachable, HTTP error, timeout, broken reply).
    #[error("target {target:?}: {error}")]
    Upstream { target: String, error: UpstreamError },
    /// A response from the client that no server→client request of its session waits for.
    #[error("no request of this session is waiting for this response")]
    NoWaitingRequest,
    #[error("the cursor is invalid or has expired; list again without one")]
    BadCursor,
    /// The client cancelled the request before an answer; the reply it will ignore.
    #[error("the request was cancelled")]
    Cancelled,
}

impl McpError {
    /// The JSON-RPC error code: the table every gateway error is answered from.
    pub fn code(&self) -> i64 {
        match self {
            McpError::NotInitialized | McpError::AlreadyInitialized | McpError::NoWaitingRequest => INVALID_REQUEST,
            McpError::MethodNotFound(_) => METHOD_NOT_FOUND,
            McpError::InvalidParams(_) | McpError::Unknown { .. } | McpError::BadCursor => INVALID_PARAMS,
            McpError::Denied { .. } => FORBIDDEN,
            McpError::Unavailable { .. } | McpError::Upstream { .. } | McpError::Cancelled => SERVER_ERROR,
        }
    }

    /// The JSON-RPC error response to request `id`.
    pub fn into_jsonrpc(self, id: Value) -> Value {
        jsonrpc::error(id, self.code(), self.to_string())
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        McpError::InvalidParams(message.into())
    }
}

/// A request refused at the HTTP level: the status, a JSON-RPC error body naming the problem,
/// and the headers that go with it. Every refusal of the MCP endpoints is one of these.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: i64,
    pub message: String,
    /// The id of the request refused, when it could be read.
    pub id: Value,
    /// The JSON-RPC error's `data`.
    pub data: Option<Value>,
    /// `Retry-After`, in seconds.
    retry_after: Option<u64>,
    /// `WWW-Authenticate` for a bearer token that did not authenticate.
    challenge: bool,
}

impl Refusal {
    pub fn new(status: StatusCode, code: i64, message: impl Into<String>) -> Self {
        Refusal {
            status,
            code,
            message: message.into(),
            id: Value::Null,
            data: None,
            retry_after: None,
            challenge: false,
        }
    }

    /// Names the request refused in the error (unless it names one already).
    pub fn for_request(mut self, id: &Value) -> Self {
        if self.id.is_null() {
            self.id = id.clone();
        }
        self
    }

    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// 400 with `INVALID_REQUEST`: the request itself is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Refusal::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, message)
    }

    /// 503, retry in `seconds`.
    pub fn unavailable(message: impl Into<String>, seconds: u64) -> Self {
        Refusal::new(StatusCode::SERVICE_UNAVAILABLE, SERVER_ERROR, message).retry_after(seconds)
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 401 with a bearer challenge.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        let mut refusal = Refusal::new(StatusCode::UNAUTHORIZED, jsonrpc::UNAUTHORIZED, message);
        refusal.challenge = true;
        refusal
    }

    /// 429 with `Retry-After`: the caller is over one of its shares.
    pub fn over_share(over: super::shares::OverShare) -> Self {
        Refusal::new(StatusCode::TOO_MANY_REQUESTS, SERVER_ERROR, over.message).retry_after(over.retry_after)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut body = jsonrpc::error(self.id, self.code, self.message);
        if let Some(data) = self.data {
            body["error"]["data"] = data;
        }
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"reflow\", error=\"invalid_token\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_error_has_its_code_and_a_message_naming_the_problem() {
        let timeout = || UpstreamError::Timeout(std::time::Duration::from_secs(3));
        let cases = [
            (McpError::NotInitialized, -32600, "send initialize first"),
            (McpError::AlreadyInitialized, -32600, "already initialised"),
            (McpError::MethodNotFound("x/y".into()), -32601, "\"x/y\" is not supported"),
            (McpError::invalid_params("params.name must be a string"), -32602, "params.name"),
            (McpError::Unknown { kind: "tool", name: "gh_nope".into() }, -32602, "unknown tool \"gh_nope\""),
            (McpError::Denied { kind: "tool", name: "gh_rm".into() }, -32003, "tool \"gh_rm\" is not allowed"),
            (McpError::Unavailable { target: "gh".into(), error: timeout() }, -32000, "\"gh\" is unavailable"),
            (McpError::Upstream { target: "gh".into(), error: timeout() }, -32000, "did not answer within 3s"),
            (McpError::NoWaitingRequest, -32600, "no request"),
            (McpError::BadCursor, -32602, "cursor"),
            (McpError::Cancelled, -32000, "cancelled"),
        ];
        for (error, code, says) in cases {
            let answer = error.into_jsonrpc(json!(7));
            assert_eq!(answer["id"], 7);
            assert_eq!(answer["error"]["code"], code, "{answer}");
            assert!(answer["error"]["message"].as_str().unwrap().contains(says), "{answer}");
        }
    }

    #[test]
    fn refusals_carry_their_headers() {
        let response = Refusal::unavailable("no snapshot yet", 5).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        let response = Refusal::unauthenticated("bad token").into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers()[header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Bearer"));
        assert!(!Refusal::bad_request("x").into_response().headers().contains_key(header::RETRY_AFTER));
    }
}
