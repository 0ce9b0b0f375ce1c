//! The 2026-07-28 protocol (the stateless era) on `/mcp` and `/mcp/{target}`, beside the
//! session era on the same endpoints.
//!
//! A stateless-era request names its version, the client's capabilities and the client in
//! `params._meta`, and repeats its method (and tool, prompt or resource) in headers; there is no
//! `initialize` and no session. Upstreams of the session era (most servers today) are reached
//! through a *bridge*: a session the gateway holds itself, one per user, endpoint and set of
//! client capabilities on each replica, which no client can name. Its upstream sessions are
//! opened with the client's capabilities, so an upstream asks of the client only what the
//! client declared.
//!
//! On the way back:
//! - every result gets `resultType` (`complete` unless it is an interim one), and lists and
//!   reads a `ttlMs` and `cacheScope` when the upstream gave none: 0 and `private`, since a
//!   session-era upstream says nothing about caching, so nothing may be shared;
//! - a server→client request of the upstream (sampling, elicitation, roots) ends the client's
//!   request with an `input_required` result, and the exchange waits here ([`Parked`]) until the
//!   client retries with `inputResponses` and the `requestState` it was given; one the client
//!   did not declare the capability for is refused upstream and answered with -32021;
//! - progress reaches the request's own SSE stream, log messages only when the request set a
//!   log level, and nothing else does (list changes go to `subscriptions/listen` streams);
//! - the methods 2026-07-28 removed (`initialize`, `ping`, `logging/setLevel`,
//!   `resources/subscribe` and `unsubscribe`) get 404 and -32601, as unknown ones do.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::error::Refusal;
use super::exchange::Forwarding;
use super::gateway::{Caller, Gateway, Reply, LATEST_VERSION, SUPPORTED_VERSIONS};
use super::lists::LISTS;
use super::session::ClientSession;
use super::Scope;
use crate::audit::Trail;
use crate::jsonrpc::{self, Message, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR};

/// Protocol versions of the stateless era this gateway speaks, newest first.
pub const MODERN_VERSIONS: [&str; 1] = ["2026-07-28"];

/// A header that is missing, repeated, malformed or says something else than the body.
pub const HEADER_MISMATCH: i64 = -32020;
/// The request needs a client capability the client did not declare.
pub const MISSING_CAPABILITY: i64 = -32021;
/// A protocol version this gateway does not speak.
pub const UNSUPPORTED_VERSION: i64 = -32022;

const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
const META_CLIENT: &str = "io.modelcontextprotocol/clientInfo";
const META_LOG_LEVEL: &str = "io.modelcontextprotocol/logLevel";
const META_SERVER: &str = "io.modelcontextprotocol/serverInfo";
const META_SUBSCRIPTION: &str = "io.modelcontextprotocol/subscriptionId";

/// How a `requestState` the gateway made begins.
const STATE_PREFIX: &str = "reflow-rs1.";

/// `subscriptions/listen` streams one bridge serves at once, at most.
pub const MAX_LISTENERS: usize = 16;

/// Exchanges waiting for a client's `inputResponses`, at most (the oldest are let go); each
/// also holds one of its user's requests in flight (`mcp.max_inflight_per_user`).
const MAX_PARKED: usize = 10_000;

/// Every version spoken here, stateless era first: what -32022 and `server/discover` name, so
/// a client of either era finds one it speaks.
pub fn supported_versions() -> Vec<&'static str> {
    MODERN_VERSIONS.iter().chain(SUPPORTED_VERSIONS.iter()).copied().collect()
}

/// Whether a POST is of the stateless era: its `MCP-Protocol-Version` names a version that is
/// not of the session era (a modern one, or one nobody speaks, which is answered with -32022),
/// or it has none and its body carries the stateless era's `_meta` version.
pub fn is_modern(headers: &HeaderMap, body: &Value) -> bool {
    let mut versions = headers.get_all("mcp-protocol-version").iter().peekable();
    if versions.peek().is_some() {
        return !versions.all(|v| v.to_str().is_ok_and(|v| SUPPORTED_VERSIONS.contains(&v)));
    }
    body.pointer("/params/_meta").and_then(|meta| meta.get(META_VERSION)).is_some()
}

/// An exchange whose upstream asked the client something: it waits here for the client's
/// retry, which names it by `requestState`.
pub struct Parked {
    relay: Relay,
    /// The `inputRequests` the client was given.
    asked: Value,
    /// The gateway id of the upstream's request, the key of `asked`.
    key: String,
    at: Instant,
}

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parked").field("key", &self.key).finish_non_exhaustive()
    }
}

/// What a stateless-era request says of itself, checked.
struct Stateless {
    id: Value,
    method: String,
    params: Map<String, Value>,
    capabilities: Value,
    client: Option<Value>,
    log_level: bool,
    /// `params.name` or `params.uri`, for the methods that name something.
    name: Option<String>,
}

fn mismatch(message: impl Into<String>) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, HEADER_MISMATCH, message)
}

fn invalid_params(message: impl Into<String>) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, INVALID_PARAMS, message)
}

fn unsupported(version: &str) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, UNSUPPORTED_VERSION, format!("protocol version {version:?} is not supported"))
        .with_data(json!({"supported": supported_versions(), "requested": version}))
}

fn method_not_found(method: &str) -> Refusal {
    let removed =
        matches!(method, "initialize" | "ping" | "logging/setLevel" | "resources/subscribe" | "resources/unsubscribe");
    let message = if removed {
        format!("{method} was removed in 2026-07-28 (no sessions; use server/discover and subscriptions/listen)")
    } else {
        format!("method {method:?} is not supported by this gateway")
    };
    Refusal::new(StatusCode::NOT_FOUND, METHOD_NOT_FOUND, message)
}

/// The one value of header `name`, decoded (`=?base64?…?=` carries what is not plain ASCII).
fn header_value(headers: &HeaderMap, name: &str) -> Result<Option<String>, Refusal> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(mismatch(format!("the {name} header is given more than once")));
    }
    let text = first.to_str().map_err(|_| mismatch(format!("the {name} header holds characters not allowed")))?;
    match text.strip_prefix("=?base64?").and_then(|rest| rest.strip_suffix("?=")) {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .map(Some)
            .ok_or_else(|| mismatch(format!("the {name} header is not valid base64 of UTF-8"))),
        None => Ok(Some(text.to_string())),
    }
}

/// Checks a request as 2026-07-28 has it: `_meta` first (-32602), then the headers against the
/// body (-32020), then the version (-32022).
fn check(headers: &HeaderMap, id: Value, method: String, params: Option<Value>) -> Result<Stateless, Refusal> {
    let mut params = match params {
        Some(Value::Object(params)) => params,
        None => Map::new(),
        Some(_) => return Err(invalid_params("params must be an object")),
    };
    let header_version = header_value(headers, "mcp-protocol-version")?;
    let meta_version = params.get("_meta").and_then(|meta| meta.get(META_VERSION));
    if let (Some(header), None) = (&header_version, meta_version) {
        if !MODERN_VERSIONS.contains(&header.as_str()) {
            // A version nobody speaks, from a client of either era: it learns which are spoken.
            return Err(unsupported(header));
        }
    }
    let Some(Value::Object(meta)) = params.get("_meta") else {
        return Err(invalid_params(
            "params._meta is required in 2026-07-28: it names the protocol version and the client's capabilities",
        ));
    };
    let Some(version) = meta.get(META_VERSION) else {
        return Err(invalid_params(format!("params._meta[{META_VERSION:?}] is required")));
    };
    let Some(version) = version.as_str().map(str::to_string) else {
        return Err(invalid_params(format!("params._meta[{META_VERSION:?}] must be a string")));
    };
    let capabilities = match meta.get(META_CAPABILITIES) {
        Some(capabilities @ Value::Object(_)) => capabilities.clone(),
        Some(_) => return Err(invalid_params(format!("params._meta[{META_CAPABILITIES:?}] must be an object"))),
        None => return Err(invalid_params(format!("params._meta[{META_CAPABILITIES:?}] is required"))),
    };
    let client = meta.get(META_CLIENT).filter(|c| c.is_object()).cloned();
    let log_level = meta.get(META_LOG_LEVEL).is_some_and(Value::is_string);
    match header_version {
        None => return Err(mismatch("the MCP-Protocol-Version header is required")),
        Some(header) if header != version => {
            return Err(mismatch(format!(
                "the MCP-Protocol-Version header ({header:?}) is not the version in params._meta ({version:?})"
            )))
        }
        Some(_) => {}
    }
    match header_value(headers, "mcp-method")? {
        None => return Err(mismatch("the Mcp-Method header is required")),
        Some(header) if header != method => {
            return Err(mismatch(format!("the Mcp-Method header ({header:?}) is not the method ({method:?})")))
        }
        Some(_) => {}
    }
    let field = match method.as_str() {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    };
    let name = match field {
        Some(field) => {
            let in_body = params.get(field).and_then(Value::as_str).map(str::to_string);
            match (header_value(headers, "mcp-name")?, &in_body) {
                (None, _) => return Err(mismatch(format!("the Mcp-Name header is required for {method}"))),
                (Some(header), Some(body)) if header == *body => {}
                (Some(header), _) => {
                    return Err(mismatch(format!("the Mcp-Name header ({header:?}) is not params.{field}")))
                }
            }
            in_body
        }
        None => None,
    };
    if !MODERN_VERSIONS.contains(&version.as_str()) {
        return Err(unsupported(&version));
    }
    // What the upstream is not told as the client said it: the bridge holds the version, the
    // capabilities and the client (an upstream of the stateless era gets them from the bridge).
    if let Some(Value::Object(meta)) = params.get_mut("_meta") {
        meta.retain(|key, _| ![META_VERSION, META_CAPABILITIES, META_CLIENT].contains(&key.as_str()));
        if meta.is_empty() {
            params.remove("_meta");
        }
    }
    Ok(Stateless { id, method, params, capabilities, client, log_level, name })
}

/// The HTTP status of a JSON-RPC error in the stateless era.
fn status_of(message: &Value) -> StatusCode {
    match message.pointer("/error/code").and_then(Value::as_i64) {
        Some(METHOD_NOT_FOUND) => StatusCode::NOT_FOUND,
        Some(
            PARSE_ERROR | INVALID_REQUEST | INVALID_PARAMS | HEADER_MISMATCH | MISSING_CAPABILITY | UNSUPPORTED_VERSION,
        ) => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    }
}

/// Makes a session-era result one of this era: `resultType`, and for lists and reads what may
/// be cached how (nothing, by anyone else, when the upstream did not say).
fn completed(mut message: Value, cacheable: bool) -> Value {
    if let Some(result) = message.get_mut("result").and_then(Value::as_object_mut) {
        result.entry("resultType").or_insert_with(|| json!("complete"));
        if cacheable {
            result.entry("ttlMs").or_insert_with(|| json!(0));
            result.entry("cacheScope").or_insert_with(|| json!("private"));
        }
    }
    message
}

fn cacheable(method: &str) -> bool {
    method == "resources/read" || LISTS.iter().any(|spec| spec.method == method)
}

fn answer(message: Value) -> Response {
    (status_of(&message), Json(message)).into_response()
}

/// Serves one stateless-era POST, whose body is `message`.
pub(super) async fn exchange(
    gateway: &Arc<Gateway>,
    scope: Scope,
    caller: Caller,
    parts: &Parts,
    message: Message,
    accepts_sse: bool,
    trail: &mut Trail,
) -> Result<Response, Refusal> {
    let (id, method, params) = match message {
        Message::Request { id, method, params } => (id, method, params),
        // The protocol has no client notification over HTTP: taken, and nothing done.
        Message::Notification { .. } => return Ok(StatusCode::ACCEPTED.into_response()),
        Message::Response { .. } => {
            return Err(Refusal::bad_request("clients do not send responses in 2026-07-28: answer with inputResponses"))
        }
    };
    let request = check(&parts.headers, id, method, params)?;
    if let Some(record) = trail.record() {
        record.protocol_version = Some(MODERN_VERSIONS[0].to_string());
        if let Some(client) = &request.client {
            let field = |name: &str| client.get(name).and_then(Value::as_str).map(|t| t.chars().take(256).collect());
            record.client_name = field("name");
            record.client_version = field("version");
        }
    }
    match request.method.as_str() {
        "server/discover"
        | "subscriptions/listen"
        | "completion/complete"
        | "tools/call"
        | "prompts/get"
        | "resources/read" => {}
        method if LISTS.iter().any(|spec| spec.method == method) => {}
        method => return Err(method_not_found(method)),
    }
    let bridge = bridge(gateway, &scope, &caller, &request).await?;
    match request.method.as_str() {
        "server/discover" => discover(gateway, &bridge, &caller, request.id).await.map(answer),
        "subscriptions/listen" => listen(gateway, bridge, &caller, request).await,
        _ => {
            // A state the gateway gave names a parked exchange; any other is the upstream's own,
            // passed on as it is with the client's answers.
            let state = request
                .params
                .get("requestState")
                .and_then(Value::as_str)
                .filter(|state| state.starts_with(STATE_PREFIX))
                .map(str::to_string);
            let relay = match state {
                Some(state) => match retry(gateway, &bridge, &caller, &request, &state).await? {
                    Retried::Going(relay) => *relay,
                    Retried::Asked(message) => return Ok(answer(message)),
                },
                None => {
                    // A new request takes one of the user's requests in flight, held until it
                    // ends (parked ones included); a retry goes on with the share it holds.
                    let share = gateway.shares.begin(&caller.user.id).map_err(Refusal::over_share)?;
                    let Stateless { id, method, params, capabilities, log_level, name, .. } = request;
                    // Clients of one bridge choose their ids alone: upstream, each request has
                    // one of the bridge's, and the client's own comes back in the answer.
                    let upstream_id = Value::String(bridge.next_id("m"));
                    let reply = gateway
                        .request(&bridge, &caller, upstream_id.clone(), &method, Some(Value::Object(params)), trail)
                        .await;
                    let reply_for = |message: Value| {
                        let mut message = completed(message, cacheable(&method));
                        message["id"] = id.clone();
                        Ok(answer(message))
                    };
                    let mut forwarding = match reply {
                        Reply::Stream(forwarding) => forwarding,
                        Reply::Now(message) | Reply::Invalid(message) => return reply_for(message),
                        Reply::Serialized(text) => {
                            return reply_for(serde_json::from_str(&text).unwrap_or(Value::Null))
                        }
                        Reply::Accepted => return Ok(StatusCode::ACCEPTED.into_response()),
                    };
                    forwarding.hold(share);
                    Relay {
                        gateway: gateway.clone(),
                        session: bridge,
                        caller,
                        forwarding,
                        id,
                        upstream_id,
                        method,
                        name,
                        capabilities,
                        log_level,
                        done: false,
                    }
                }
            };
            Ok(relay.respond(accepts_sse).await)
        }
    }
}

/// The bridge session for this user, endpoint and set of capabilities, opened (and its
/// upstream initialised) on first use.
async fn bridge(
    gateway: &Arc<Gateway>,
    scope: &Scope,
    caller: &Caller,
    request: &Stateless,
) -> Result<Arc<ClientSession>, Refusal> {
    let capabilities = request.capabilities.to_string();
    let endpoint = match scope {
        Scope::Aggregate => "",
        Scope::Target(name) => name.as_str(),
    };
    let key = super::merged::client_hash(&format!("{}\n{endpoint}\n{capabilities}", caller.user.id));
    let id = format!("~bridge-{key:016x}");
    if let Some(held) = gateway.sessions.get(&id, &caller.user.id).filter(|s| s.bridged && s.scope == *scope) {
        return Ok(held);
    }
    if let Scope::Target(name) = scope {
        // A target the user has no grant on is answered like one that does not exist.
        if Gateway::granted(caller, name).is_none() {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                INVALID_REQUEST,
                format!("no target named {name:?} is served here"),
            ));
        }
    }
    let reservation = gateway
        .sessions
        .reserve(&caller.user.id, |held| gateway.shares.may_open_session(held))
        .map_err(Refusal::over_share)?;
    if gateway.sessions.len() >= gateway.settings.max_sessions {
        return Err(Refusal::unavailable("this gateway holds its maximum of sessions; retry later", 5));
    }
    let mut session = ClientSession::with_id(id, caller.user.id.clone(), scope.clone(), false, Default::default());
    session.bridged = true;
    let session = Arc::new(session);
    session.identity.store(super::recycle::identity(&caller.user), std::sync::atomic::Ordering::Relaxed);
    let client = request.client.clone().unwrap_or_else(|| json!({"name": "unknown", "version": "0"}));
    let params = json!({"protocolVersion": LATEST_VERSION, "capabilities": request.capabilities, "clientInfo": client});
    let reply = gateway.initialize(&session, caller, Value::Null, Some(params)).await;
    if reply.get("result").is_none() {
        session.close().await;
        let code = reply.pointer("/error/code").and_then(Value::as_i64).unwrap_or(jsonrpc::SERVER_ERROR);
        let message =
            reply.pointer("/error/message").and_then(Value::as_str).unwrap_or("the upstream did not initialise");
        return Err(Refusal::new(StatusCode::OK, code, message));
    }
    // Two first requests at once may both have opened one: the first kept is used.
    if let Some(held) = gateway.sessions.get(&session.id, &caller.user.id).filter(|s| s.bridged) {
        session.close().await;
        return Ok(held);
    }
    reservation.fill(session.clone());
    Ok(session)
}

/// `server/discover`: the versions spoken here, and what the endpoint serves (the upstream's
/// capabilities on `/mcp/{target}`, the gateway's own on `/mcp`).
async fn discover(
    gateway: &Arc<Gateway>,
    bridge: &Arc<ClientSession>,
    caller: &Caller,
    id: Value,
) -> Result<Value, Refusal> {
    let described = match &bridge.scope {
        Scope::Aggregate => super::gateway::aggregate_description(LATEST_VERSION),
        Scope::Target(name) => {
            let Some(target) = Gateway::granted(caller, name) else {
                return Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    INVALID_REQUEST,
                    format!("no target named {name:?} is served here"),
                ));
            };
            let upstream = gateway.upstream(bridge, caller, target).await;
            upstream.initialize_result().await.map_err(|error| {
                gateway.count_failure(target, &error);
                Refusal::new(StatusCode::OK, jsonrpc::SERVER_ERROR, format!("target {name:?} is unavailable: {error}"))
            })?
        }
    };
    let mut result = json!({
        "resultType": "complete",
        "supportedVersions": supported_versions(),
        "capabilities": described.get("capabilities").cloned().unwrap_or_else(|| json!({})),
        "ttlMs": 0,
        "cacheScope": "private",
    });
    if let Some(instructions) = described.get("instructions").filter(|i| i.is_string()) {
        result["instructions"] = instructions.clone();
    }
    if let Some(info) = described.get("serverInfo").filter(|i| i.is_object()) {
        result["_meta"] = json!({ META_SERVER: info });
    }
    Ok(jsonrpc::result(id, result))
}

/// A forwarded request of a stateless-era client: its messages until the response, or until
/// the upstream asks the client something.
struct Relay {
    gateway: Arc<Gateway>,
    session: Arc<ClientSession>,
    caller: Caller,
    forwarding: Forwarding,
    /// The id of the client's request now being answered (a retry has a new one).
    id: Value,
    /// The id the request has upstream (the bridge's).
    upstream_id: Value,
    method: String,
    name: Option<String>,
    capabilities: Value,
    log_level: bool,
    /// The exchange ended with its response: nothing is left to cancel.
    done: bool,
}

impl Drop for Relay {
    /// A relay let go before the response (the client closed its stream, which is how the
    /// stateless era cancels, or a parked exchange nobody came back for) cancels the exchange:
    /// the upstream is told, or its POST closed.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (gateway, session, caller) = (self.gateway.clone(), self.session.clone(), self.caller.clone());
        let params = json!({"requestId": self.upstream_id, "reason": "the client closed its stream"});
        runtime.spawn(async move {
            gateway.notification(&session, &caller, "notifications/cancelled", Some(params)).await;
        });
    }
}

/// What the relay makes of the next message.
enum Step {
    /// A notification of the request (progress, or a log message asked for).
    Notify(Value),
    /// The last message of the client's request: the response, an `input_required` result or
    /// an error.
    Last(Value),
}

enum Retried {
    /// The client answered what was asked: the exchange goes on.
    Going(Box<Relay>),
    /// The client did not answer it: asked again.
    Asked(Value),
}

impl Relay {
    /// The next step, and the relay when the request goes on.
    async fn step(mut self) -> Option<(Step, Option<Relay>)> {
        loop {
            let message = self.forwarding.next().await?;
            if jsonrpc::is_response(&message) {
                self.done = true;
                let mut message = completed(message, cacheable(&self.method));
                message["id"] = self.id.clone();
                return Some((Step::Last(message), None));
            }
            let Some(method) = message.get("method").and_then(Value::as_str).map(str::to_string) else { continue };
            if message.get("id").is_some() {
                return Some((Step::Last(self.ask(method, message).await), None));
            }
            let wanted = match method.as_str() {
                "notifications/progress" => true,
                "notifications/message" => self.log_level,
                _ => false,
            };
            if wanted {
                return Some((Step::Notify(message), Some(self)));
            }
        }
    }

    /// The upstream asks the client something: parked with an `input_required` result for the
    /// client, or refused when the client cannot be asked that.
    async fn ask(self, method: String, request: Value) -> Value {
        let key = request.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
        let capability = match method.as_str() {
            "sampling/createMessage" => Some("sampling"),
            "elicitation/create" => Some("elicitation"),
            "roots/list" => Some("roots"),
            _ => None,
        };
        let declared = capability.is_some_and(|c| self.capabilities.get(c).is_some());
        if !declared {
            let refusal =
                json!({"error": {"code": METHOD_NOT_FOUND, "message": format!("the client cannot be asked {method}")}});
            let Value::Object(body) = refusal else { unreachable!() };
            self.gateway.client_response(&self.session, &self.caller, Value::String(key), body).await;
            let mut error = jsonrpc::error(
                self.id.clone(),
                MISSING_CAPABILITY,
                format!("the server asks the client {method}, which the client did not declare"),
            );
            if let Some(capability) = capability {
                error["error"]["data"] = json!({"requiredCapabilities": {capability: {}}});
            }
            return error;
        }
        let mut asked = Map::new();
        let mut entry = json!({"method": method});
        if let Some(params) = request.get("params") {
            entry["params"] = params.clone();
        }
        asked.insert(key.clone(), entry);
        let asked = Value::Object(asked);
        let id = self.id.clone();
        let gateway = self.gateway.clone();
        let state = gateway.park(Parked { relay: self, asked: asked.clone(), key, at: Instant::now() });
        jsonrpc::result(id, json!({"resultType": "input_required", "inputRequests": asked, "requestState": state}))
    }

    /// The client's answer: JSON when the last message comes first, or when the client takes no
    /// SSE; otherwise an SSE stream of the notifications and then the last message.
    async fn respond(self, accepts_sse: bool) -> Response {
        let id = self.id.clone();
        let mut relay = self;
        loop {
            let Some((step, next)) = relay.step().await else {
                return Json(jsonrpc::error(id, jsonrpc::SERVER_ERROR, "the request was cancelled")).into_response();
            };
            match (step, next) {
                (Step::Last(message), _) => return answer(message),
                (Step::Notify(first), Some(next)) if accepts_sse => {
                    let first = futures::stream::once(async move { first });
                    let rest = futures::stream::unfold(Some(next), |relay| async move {
                        let (step, next) = relay?.step().await?;
                        Some(match step {
                            Step::Notify(message) => (message, next),
                            Step::Last(message) => (message, None),
                        })
                    });
                    let events = futures::StreamExt::map(futures::StreamExt::chain(first, rest), |message| {
                        Ok::<_, Infallible>(Event::default().event("message").data(message.to_string()))
                    });
                    return super::http::sse(events);
                }
                // A client that takes JSON only gets no notifications.
                (Step::Notify(_), Some(next)) => relay = next,
                (Step::Notify(_), None) => unreachable!("a notification leaves the request going"),
            }
        }
    }
}

impl Gateway {
    /// Keeps `parked` until its client retries, and returns the `requestState` naming it.
    fn park(&self, parked: Parked) -> String {
        let state = format!("{STATE_PREFIX}{}", super::session::new_session_id());
        let ttl = self.settings.request_timeout;
        let mut all = self.parked.lock().unwrap();
        // Let go, an exchange finishes on its own (see `Forwarding`'s drop).
        all.retain(|_, p| p.at.elapsed() < ttl);
        if all.len() >= MAX_PARKED {
            if let Some(oldest) = all.iter().min_by_key(|(_, p)| p.at).map(|(k, _)| k.clone()) {
                all.remove(&oldest);
            }
        }
        all.insert(state.clone(), parked);
        state
    }
}

/// A retry with `requestState`: the parked exchange is given the client's answer and goes on.
async fn retry(
    gateway: &Arc<Gateway>,
    bridge: &Arc<ClientSession>,
    caller: &Caller,
    request: &Stateless,
    state: &str,
) -> Result<Retried, Refusal> {
    let parked = gateway.parked.lock().unwrap().remove(state);
    let parked = parked.filter(|p| {
        p.relay.session.user_id == caller.user.id
            && Arc::ptr_eq(&p.relay.session, bridge)
            && p.relay.method == request.method
            && p.relay.name == request.name
    });
    let Some(mut parked) = parked else {
        return Err(invalid_params(
            "requestState names no request waiting here: it expired, belongs to another request, or was given by \
             another replica; call again without it",
        ));
    };
    let answered = request.params.get("inputResponses").and_then(|r| r.get(&parked.key)).cloned();
    let Some(answered) = answered else {
        // Asked again: the exchange waits for an answer to what it asked.
        let asked = parked.asked.clone();
        parked.relay.id = request.id.clone();
        parked.at = Instant::now();
        let state = gateway.park(parked);
        return Ok(Retried::Asked(jsonrpc::result(
            request.id.clone(),
            json!({"resultType": "input_required", "inputRequests": asked, "requestState": state}),
        )));
    };
    let mut body = Map::new();
    body.insert("result".into(), answered);
    gateway.client_response(bridge, caller, Value::String(parked.key.clone()), body).await;
    let mut relay = parked.relay;
    relay.id = request.id.clone();
    relay.capabilities = request.capabilities.clone();
    relay.log_level = request.log_level;
    Ok(Retried::Going(Box::new(relay)))
}

/// `subscriptions/listen`: an SSE stream that acknowledges what it will deliver, then delivers
/// the list changes and resource updates asked for, each naming the subscription.
async fn listen(
    gateway: &Arc<Gateway>,
    bridge: Arc<ClientSession>,
    caller: &Caller,
    request: Stateless,
) -> Result<Response, Refusal> {
    let Some(Value::Object(asked)) = request.params.get("notifications") else {
        return Err(invalid_params("params.notifications is required: name the notifications to deliver"));
    };
    // Each stream holds a connection and a task: a bridge (one per user, endpoint and set of
    // capabilities, themselves bounded by the user's session share) has a few at most.
    if bridge.listeners.get().map_or(0, |l| l.receiver_count()) >= MAX_LISTENERS {
        return Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            jsonrpc::SERVER_ERROR,
            format!("this client already holds {MAX_LISTENERS} subscriptions/listen streams here; close one first"),
        )
        .retry_after(5));
    }
    let mut honoured = Map::new();
    for kind in ["toolsListChanged", "promptsListChanged", "resourcesListChanged"] {
        if asked.get(kind) == Some(&Value::Bool(true)) {
            honoured.insert(kind.into(), Value::Bool(true));
        }
    }
    let mut uris = Vec::new();
    if let Some(Value::Array(wanted)) = asked.get("resourceSubscriptions") {
        for uri in wanted.iter().filter_map(Value::as_str).take(64) {
            let id = Value::String(bridge.next_id("subscribe"));
            let mut trail = Trail::off();
            let reply = gateway
                .request(&bridge, caller, id, "resources/subscribe", Some(json!({"uri": uri})), &mut trail)
                .await;
            let settled = match reply {
                Reply::Stream(mut forwarding) => loop {
                    match forwarding.next().await {
                        Some(message) if jsonrpc::is_response(&message) => break Some(message),
                        Some(_) => continue,
                        None => break None,
                    }
                },
                Reply::Now(message) | Reply::Invalid(message) => Some(message),
                _ => None,
            };
            if settled.is_some_and(|m| m.get("result").is_some()) {
                uris.push(uri.to_string());
            }
        }
        if !uris.is_empty() {
            honoured.insert("resourceSubscriptions".into(), json!(uris));
        }
    }
    let subscription = request.id.clone();
    let mut heard = bridge.listeners.get_or_init(|| tokio::sync::broadcast::channel(256).0).subscribe();
    let ack = jsonrpc::notification(
        "notifications/subscriptions/acknowledged",
        Some(json!({"_meta": {META_SUBSCRIPTION: subscription}, "notifications": honoured})),
    );
    let draining = gateway.draining.clone();
    let cancel = bridge.cancel.clone();
    let events = async_stream_of(move |tx| async move {
        if tx.send(ack).await.is_err() {
            return;
        }
        // A stream listening keeps the bridge in use, so it does not expire under it.
        let mut in_use = tokio::time::interval(std::time::Duration::from_secs(30));
        loop {
            let text = tokio::select! {
                _ = draining.cancelled() => break,
                _ = cancel.cancelled() => break,
                _ = in_use.tick() => {
                    bridge.touch();
                    continue;
                }
                heard = heard.recv() => match heard {
                    Ok(text) => text,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            };
            let Ok(mut message) = serde_json::from_str::<Value>(&text) else { continue };
            let method = message.get("method").and_then(Value::as_str).unwrap_or_default();
            let deliver = match method {
                "notifications/tools/list_changed" => honoured.contains_key("toolsListChanged"),
                "notifications/prompts/list_changed" => honoured.contains_key("promptsListChanged"),
                "notifications/resources/list_changed" => honoured.contains_key("resourcesListChanged"),
                "notifications/resources/updated" => message
                    .pointer("/params/uri")
                    .and_then(Value::as_str)
                    .is_some_and(|uri| uris.iter().any(|wanted| uri.starts_with(wanted.as_str()))),
                _ => false,
            };
            if !deliver {
                continue;
            }
            let params = message.as_object_mut().map(|m| m.entry("params").or_insert_with(|| json!({})));
            if let Some(Value::Object(params)) = params {
                let meta = params.entry("_meta").or_insert_with(|| json!({}));
                if let Some(meta) = meta.as_object_mut() {
                    meta.insert(META_SUBSCRIPTION.into(), subscription.clone());
                }
            }
            if tx.send(message).await.is_err() {
                return;
            }
        }
        // Ended by the gateway: the subscription's result says so.
        let _ = tx
            .send(jsonrpc::result(
                subscription.clone(),
                json!({"resultType": "complete", "_meta": {META_SUBSCRIPTION: subscription}}),
            ))
            .await;
    });
    let events = futures::StreamExt::map(events, |message: Value| {
        Ok::<_, Infallible>(Event::default().event("message").data(message.to_string()))
    });
    let mut response = super::http::sse(events);
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The messages `produce` sends, as a stream that ends when it returns (or when the stream is
/// dropped: the client went away, and the task is aborted).
fn async_stream_of<F, Fut>(produce: F) -> impl futures::Stream<Item = Value> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Value>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let task = crate::sync::AbortOnDrop(tokio::spawn(produce(tx)));
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), move |message| {
        let _held = &task;
        message
    })
}

/// The refusal of a GET or DELETE of the stateless era, which has neither.
pub(super) fn no_streams() -> Response {
    let body =
        jsonrpc::error(Value::Null, METHOD_NOT_FOUND, "2026-07-28 has no GET streams or sessions to delete: POST only");
    let mut response = (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response();
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        headers
    }

    fn meta(version: &str) -> Value {
        json!({"_meta": {META_VERSION: version, META_CAPABILITIES: {}, "progressToken": 7}, "name": "echo"})
    }

    fn code(result: Result<Stateless, Refusal>) -> i64 {
        result.err().map_or(0, |refusal| refusal.code)
    }

    #[test]
    fn the_era_is_the_version_header_or_the_meta_version() {
        assert!(is_modern(&headers(&[("mcp-protocol-version", "2026-07-28")]), &json!({})));
        assert!(is_modern(&headers(&[("mcp-protocol-version", "1900-01-01")]), &json!({})));
        assert!(!is_modern(&headers(&[("mcp-protocol-version", "2025-11-25")]), &json!({})));
        assert!(!is_modern(&headers(&[]), &json!({"params": {}})));
        assert!(is_modern(&headers(&[]), &json!({"params": {"_meta": {META_VERSION: "2026-07-28"}}})));
    }

    #[test]
    fn meta_then_headers_then_version_are_checked() {
        let good = [("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/call"), ("mcp-name", "echo")];
        let checked = check(&headers(&good), json!(1), "tools/call".into(), Some(meta("2026-07-28"))).ok().unwrap();
        assert_eq!(checked.name.as_deref(), Some("echo"));
        // The bridge's fields stay here; the others travel.
        assert_eq!(checked.params["_meta"], json!({"progressToken": 7}));

        let no_meta = check(&headers(&good), json!(1), "tools/call".into(), Some(json!({"name": "echo"})));
        assert_eq!(code(no_meta), INVALID_PARAMS);
        let other_method = [("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/list"), ("mcp-name", "echo")];
        assert_eq!(
            code(check(&headers(&other_method), json!(1), "tools/call".into(), Some(meta("2026-07-28")))),
            HEADER_MISMATCH
        );
        let other_name = [("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/call"), ("mcp-name", "rm")];
        assert_eq!(
            code(check(&headers(&other_name), json!(1), "tools/call".into(), Some(meta("2026-07-28")))),
            HEADER_MISMATCH
        );
        let no_name = [("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/call")];
        assert_eq!(
            code(check(&headers(&no_name), json!(1), "tools/call".into(), Some(meta("2026-07-28")))),
            HEADER_MISMATCH
        );
        // Header and body agree on a version nobody speaks: -32022, naming both eras' versions.
        let future = [("mcp-protocol-version", "v9"), ("mcp-method", "tools/call"), ("mcp-name", "echo")];
        let refused = check(&headers(&future), json!(1), "tools/call".into(), Some(meta("v9"))).err().unwrap();
        assert_eq!(refused.code, UNSUPPORTED_VERSION);
        assert_eq!(refused.data.unwrap()["supported"], json!(supported_versions()));
        // They disagree: the headers are wrong first.
        assert_eq!(code(check(&headers(&good), json!(1), "tools/call".into(), Some(meta("v9")))), HEADER_MISMATCH);
    }

    #[test]
    fn base64_header_values_are_decoded_before_comparing() {
        let encoded = format!("=?base64?{}?=", base64::engine::general_purpose::STANDARD.encode("héllo"));
        let pairs =
            [("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/call"), ("mcp-name", encoded.as_str())];
        let mut params = meta("2026-07-28");
        params["name"] = json!("héllo");
        assert!(check(&headers(&pairs), json!(1), "tools/call".into(), Some(params)).is_ok());
        let broken =
            [("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/call"), ("mcp-name", "=?base64?***?=")];
        assert_eq!(
            code(check(&headers(&broken), json!(1), "tools/call".into(), Some(meta("2026-07-28")))),
            HEADER_MISMATCH
        );
    }

    #[test]
    fn results_say_they_are_complete_and_lists_how_they_may_be_cached() {
        let list = completed(json!({"id": 1, "result": {"tools": []}}), true);
        assert_eq!(list["result"], json!({"tools": [], "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}));
        let kept = completed(json!({"id": 1, "result": {"tools": [], "ttlMs": 5000, "cacheScope": "public"}}), true);
        assert_eq!(kept["result"]["ttlMs"], 5000);
        assert_eq!(kept["result"]["cacheScope"], "public");
        let call = completed(json!({"id": 1, "result": {"content": []}}), false);
        assert_eq!(call["result"], json!({"content": [], "resultType": "complete"}));
        let error = completed(json!({"id": 1, "error": {"code": -32601, "message": "x"}}), false);
        assert!(error.get("result").is_none());
        assert_eq!(status_of(&error), StatusCode::NOT_FOUND);
    }
}
