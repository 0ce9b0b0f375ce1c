//! The MCP methods: what the gateway answers itself, what it merges from every reachable
//! target, and what it routes to one target after a policy decision.
//!
//! Every request runs against one snapshot (taken once by the HTTP layer), so listing and
//! calling decide with the same policies and the same function.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use reflow_common::crypto::DeterministicSealer;
use reflow_common::model::TransportType;
use reflow_proto::policy::{decide, may_allow_any, Kind};
use reflow_proto::resources::{Target, User};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::jsonrpc::{self, Message, FORBIDDEN, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, SERVER_ERROR};
use super::merged::{client_hash, ListKey, Merged, MergedLists};
use super::names;
use super::session::{short, CachedList, ClientSession, Scope, Sessions, UpstreamEntry};
use super::McpSettings;
use crate::audit::{ClientGone, Trail};
use crate::credentials::{resolve_env, resolve_injection};
use crate::snapshot::DataSnapshot;
use crate::state::SnapshotState;
use crate::upstream::stdio::{Pool, ProcessKey};
use crate::upstream::{StdioBinding, Upstream, UpstreamError, UpstreamSettings};

/// Protocol versions of the session era this gateway speaks, newest first.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
pub const LATEST_VERSION: &str = SUPPORTED_VERSIONS[0];
/// Upstream list pages fetched at most, against an upstream whose cursors never end.
const MAX_UPSTREAM_PAGES: usize = 1000;
/// The most bytes of a client's `initialize` capabilities a session keeps (real clients send a
/// few hundred).
pub const MAX_CLIENT_CAPABILITIES: usize = 64 * 1024;

/// Who is asking, and the snapshot the whole request is decided with.
#[derive(Debug, Clone)]
pub struct Caller {
    pub snapshot: Arc<DataSnapshot>,
    pub user: User,
}

/// How a message is answered.
#[derive(Debug)]
pub enum Reply {
    /// A notification or response was taken: 202.
    Accepted,
    /// A response known at once.
    Now(Value),
    /// A response known at once, already serialised.
    Serialized(String),
    /// Messages for the client, the last of which is the response.
    Stream(Forwarding),
    /// The message cannot be accepted: 400 with this JSON-RPC error.
    Invalid(Value),
}

/// A request on its way to an upstream: the exchange itself, and the messages it produces for
/// the client (relayed notifications and requests, then the response).
///
/// Whoever reads the messages drives the exchange, so the common case (a JSON answer) runs
/// in the HTTP request's own task. Dropped before the response (the client went away), the
/// exchange is left to finish on its own: a disconnection is not a cancellation, only
/// `notifications/cancelled` is.
pub struct Forwarding {
    work: Option<futures::future::BoxFuture<'static, ()>>,
    /// Bounded: the exchange waits for its reader rather than queueing without limit.
    messages: mpsc::Receiver<Value>,
    /// The user's share of requests in flight, held until the exchange ends (detached or not).
    share: Option<super::shares::InFlight>,
    /// Marks the request's audit record when the client stops waiting before the response.
    client_gone: Option<ClientGone>,
}

impl std::fmt::Debug for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarding").field("running", &self.work.is_some()).finish_non_exhaustive()
    }
}

impl Forwarding {
    /// The next message for the client; `None` once the exchange ended (after the response,
    /// or without one when it was cancelled).
    pub async fn next(&mut self) -> Option<Value> {
        let message = match self.work.as_mut() {
            Some(work) => {
                tokio::select! {
                    biased;
                    message = self.messages.recv() => message,
                    () = work => {
                        self.work = None;
                        self.messages.recv().await
                    }
                }
            }
            None => self.messages.recv().await,
        };
        if message.as_ref().is_none_or(jsonrpc::is_response) {
            // The response is the exchange's last act: nothing is left to run.
            self.work = None;
            self.client_gone = None;
        }
        message
    }

    /// Lets the exchange run on its own and returns its messages: for a reader that may wait
    /// on something else (a full client stream) while the upstream still needs answers.
    pub fn detach(mut self) -> mpsc::Receiver<Value> {
        // Its reader goes on reading: the client has not gone.
        self.client_gone = None;
        if let Some(work) = self.work.take() {
            let share = self.share.take();
            tokio::spawn(async move {
                work.await;
                drop(share);
            });
        }
        let (_, closed) = mpsc::channel(1);
        std::mem::replace(&mut self.messages, closed)
    }
}

impl Forwarding {
    /// Keeps `share` (a request in flight) until the exchange ends.
    pub fn hold(&mut self, share: super::shares::InFlight) {
        self.share = Some(share);
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        if let Some(gone) = self.client_gone.take() {
            gone.mark();
        }
        if let Some(work) = self.work.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let share = self.share.take();
                runtime.spawn(async move {
                    work.await;
                    drop(share);
                });
            }
        }
    }
}

/// A list method and how its items are named.
#[derive(Debug)]
struct ListSpec {
    method: &'static str,
    field: &'static str,
    /// The item field that names it: what policies match and what gets prefixed or mapped.
    key: &'static str,
    capability: &'static str,
    kind: Kind,
    changed: &'static str,
}

const LISTS: [ListSpec; 4] = [
    ListSpec {
        method: "tools/list",
        field: "tools",
        key: "name",
        capability: "tools",
        kind: Kind::Tool,
        changed: "notifications/tools/list_changed",
    },
    ListSpec {
        method: "prompts/list",
        field: "prompts",
        key: "name",
        capability: "prompts",
        kind: Kind::Prompt,
        changed: "notifications/prompts/list_changed",
    },
    ListSpec {
        method: "resources/list",
        field: "resources",
        key: "uri",
        capability: "resources",
        kind: Kind::Resource,
        changed: "notifications/resources/list_changed",
    },
    ListSpec {
        method: "resources/templates/list",
        field: "resourceTemplates",
        key: "uriTemplate",
        capability: "resources",
        kind: Kind::Resource,
        changed: "notifications/resources/list_changed",
    },
];

fn kind_word(kind: Kind) -> &'static str {
    match kind {
        Kind::Tool => "tool",
        Kind::Prompt => "prompt",
        Kind::Resource => "resource",
    }
}

/// The gateway: sessions, the upstream HTTP client, and the snapshot they are served from.
#[derive(Debug)]
pub struct Gateway {
    pub state: Arc<SnapshotState>,
    sealer: DeterministicSealer,
    pub sessions: Sessions,
    /// One pooled client for every upstream.
    http: reqwest::Client,
    pub settings: McpSettings,
    upstream: UpstreamSettings,
    /// STDIO processes, shared across sessions by target and isolation key.
    pub pool: Arc<Pool>,
    /// How each target fares here, for `/ready`, `/metrics` and the control plane.
    pub health: super::health::Health,
    /// Merged lists shared by the sessions of one user.
    pub merged: MergedLists,
    /// What one identity may take of this data plane.
    pub shares: Arc<super::shares::Shares>,
    /// Recycles and restarts applied, for the control plane.
    pub recycling: super::recycle::Recycling,
    /// Where finished requests' audit records go; unset when auditing is off.
    audit: std::sync::OnceLock<Arc<crate::audit::Recorder>>,
}

impl Gateway {
    pub fn new(state: Arc<SnapshotState>, sealer: DeterministicSealer, settings: McpSettings) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            // An upstream's redirect could carry injected credentials elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("the HTTP client builds");
        let upstream = UpstreamSettings {
            request_timeout: settings.request_timeout,
            connect_timeout: settings.connect_timeout,
            max_message_bytes: settings.max_response_bytes,
        };
        let mut pool = Pool::new(settings.stdio.clone()).with_max_message_bytes(settings.max_response_bytes);
        if let Some(launcher) = &settings.stdio_launcher {
            pool = pool.with_launcher(launcher.clone());
        }
        let pool = Arc::new(pool);
        Arc::new(Gateway {
            state,
            sealer,
            sessions: Sessions::default(),
            http,
            upstream,
            pool,
            health: Default::default(),
            merged: MergedLists::default(),
            shares: super::shares::Shares::new(
                settings.requests_per_second,
                settings.request_burst,
                settings.max_inflight_per_user,
                settings.max_sessions_per_user,
            ),
            recycling: Default::default(),
            audit: Default::default(),
            settings,
        })
    }

    /// Audits every MCP request into `recorder` (set once, before serving).
    pub fn set_audit(&self, recorder: Arc<crate::audit::Recorder>) {
        let _ = self.audit.set(recorder);
    }

    pub fn audit(&self) -> Option<&Arc<crate::audit::Recorder>> {
        self.audit.get()
    }

    /// Whether `name` is a target this gateway serves (HTTP, SSE or STDIO).
    pub fn servable<'s>(snapshot: &'s DataSnapshot, name: &str) -> Option<&'s Target> {
        snapshot.view.targets.get(name).filter(|t| {
            t.enabled
                && matches!(t.transport_type, TransportType::StreamableHttp | TransportType::Sse | TransportType::Stdio)
        })
    }

    /// The target `name` if `caller` may reach it: servable, and some policy could allow the
    /// user something there. Any other target is treated as unknown: no upstream session is
    /// opened, no process started and nothing sent for a user without a grant.
    pub fn granted<'s>(caller: &'s Caller, name: &str) -> Option<&'s Target> {
        Gateway::servable(&caller.snapshot, name)
            .filter(|t| may_allow_any(&caller.snapshot.view.policies, &caller.user, &t.id))
    }

    fn stdio_binding(&self, caller: &Caller, target: &Target) -> Option<StdioBinding> {
        (target.transport_type == TransportType::Stdio).then(|| StdioBinding {
            pool: self.pool.clone(),
            key: ProcessKey::new(target, &caller.user),
            env: resolve_env(&caller.snapshot.view, &self.sealer, target, &caller.user),
        })
    }

    fn count_failure(&self, target: &Target, error: &UpstreamError) {
        tracing::warn!(target = %target.name, %error, "upstream request failed");
        // A failing upstream may come back with other tools: merges that include it end.
        self.merged.changed(&target.name);
        self.health.failed(&target.id, &error.to_string());
    }

    /// Answers one message from the client. A request's `trail` is filled in as it goes, and
    /// taken by the exchange when the request is forwarded (which then writes it when it ends).
    pub async fn handle(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        message: Message,
        trail: &mut Trail,
    ) -> Reply {
        session.touch();
        match message {
            Message::Request { id, method, params } => self.request(session, caller, id, &method, params, trail).await,
            Message::Notification { method, params } => {
                self.notification(session, caller, &method, params).await;
                Reply::Accepted
            }
            Message::Response { id, body } => self.client_response(session, id, body).await,
        }
    }

    async fn request(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        id: Value,
        method: &str,
        params: Option<Value>,
        trail: &mut Trail,
    ) -> Reply {
        if method == "initialize" {
            return Reply::Now(self.initialize(session, caller, id, params).await);
        }
        if method == "ping" {
            return Reply::Now(jsonrpc::result(id, json!({})));
        }
        if session.protocol_version.get().is_none() {
            return Reply::Now(jsonrpc::error(
                id,
                INVALID_REQUEST,
                "the session is not initialised: send initialize first",
            ));
        }
        if let Some(spec) = LISTS.iter().find(|s| s.method == method) {
            return self.list(session, caller, spec, id, params.as_ref()).await;
        }
        let routed = match method {
            "tools/call" => self.route_named(session, caller, &id, params, Kind::Tool, trail),
            "prompts/get" => self.route_named(session, caller, &id, params, Kind::Prompt, trail),
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                self.route_named(session, caller, &id, params, Kind::Resource, trail)
            }
            "completion/complete" => self.route_completion(session, caller, &id, params, trail),
            "logging/setLevel" => return Reply::Now(self.set_level(session, caller, id, params).await),
            _ => {
                return Reply::Now(jsonrpc::error(
                    id,
                    METHOD_NOT_FOUND,
                    format!("method {method:?} is not supported by this gateway"),
                ))
            }
        };
        match routed {
            Ok((target, params)) => {
                let message = jsonrpc::request(id, method, Some(params));
                self.forward(session, caller, &target, method, message, trail.take()).await
            }
            Err(error) => Reply::Now(error),
        }
    }

    async fn initialize(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        id: Value,
        params: Option<Value>,
    ) -> Value {
        if session.protocol_version.get().is_some() {
            return jsonrpc::error(id, INVALID_REQUEST, "the session is already initialised");
        }
        let params = params.unwrap_or_default();
        let Some(requested) = params.get("protocolVersion").and_then(Value::as_str) else {
            return jsonrpc::error(id, INVALID_PARAMS, "initialize needs params.protocolVersion");
        };
        let mut version = if SUPPORTED_VERSIONS.contains(&requested) { requested } else { LATEST_VERSION }.to_string();
        let capabilities = params.get("capabilities").cloned().filter(Value::is_object).unwrap_or_else(|| json!({}));
        let upstream_params = json!({
            "protocolVersion": version,
            "capabilities": capabilities,
            "clientInfo": {"name": "reflow-gateway", "version": env!("CARGO_PKG_VERSION")},
        })
        .to_string();
        // Kept for the session's life and sent to every upstream it opens: bounded.
        if upstream_params.len() > MAX_CLIENT_CAPABILITIES {
            return jsonrpc::error(
                id,
                INVALID_PARAMS,
                format!("initialize params.capabilities is too large: at most {MAX_CLIENT_CAPABILITIES} bytes"),
            );
        }
        if let Some(info) = params.get("clientInfo") {
            let field = |name: &str| -> Box<str> {
                let text = info.get(name).and_then(Value::as_str).unwrap_or_default();
                text.chars().filter(|c| !c.is_control()).take(256).collect::<String>().into_boxed_str()
            };
            let _ = session.client.set((field("name"), field("version")));
        }
        let hash = client_hash(&upstream_params);
        let _ = session.upstream_params.set((upstream_params.into_boxed_str(), hash));
        let result = match &session.scope {
            Scope::Aggregate => json!({
                "protocolVersion": version,
                "capabilities": {
                    "tools": {"listChanged": true},
                    "prompts": {"listChanged": true},
                    "resources": {"subscribe": true, "listChanged": true},
                    "completions": {},
                    "logging": {},
                },
                "serverInfo": {"name": "reflow-gateway", "title": "Reflow Gateway", "version": env!("CARGO_PKG_VERSION")},
                "instructions": "Tools, prompts and resources of every MCP server you may use, through Reflow Gateway. \
                    Names are prefixed with the server's name: <server>_<name>.",
            }),
            Scope::Target(name) => {
                let Some(target) = Gateway::granted(caller, name) else {
                    return jsonrpc::error(id, INVALID_PARAMS, format!("unknown target {name:?}"));
                };
                let upstream = self.upstream(session, caller, target).await;
                match upstream.initialize_result().await {
                    Ok(mut result) => {
                        self.health.ok(&target.id);
                        // The client talks to the upstream through us: it gets the upstream's
                        // version when we speak it too.
                        match result.get("protocolVersion").and_then(Value::as_str) {
                            Some(v) if SUPPORTED_VERSIONS.contains(&v) => version = v.to_string(),
                            _ => result["protocolVersion"] = json!(version),
                        }
                        result
                    }
                    Err(error) => {
                        self.count_failure(target, &error);
                        return jsonrpc::error(id, SERVER_ERROR, format!("target {name:?} is unavailable: {error}"));
                    }
                }
            }
        };
        tracing::info!(session = %short(&session.id), user = %caller.user.id, %version, "MCP session initialised");
        let _ = session.protocol_version.set(version);
        jsonrpc::result(id, result)
    }

    /// Params for `initialize` upstream: the client's version and capabilities, our identity.
    fn upstream_initialize_params(session: &ClientSession) -> Value {
        session.upstream_params.get().and_then(|(params, _)| serde_json::from_str(params).ok()).unwrap_or_else(|| {
            json!({
                "protocolVersion": LATEST_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "reflow-gateway", "version": env!("CARGO_PKG_VERSION")},
            })
        })
    }

    /// The session's upstream for `target`, created (or replaced, when the target's definition
    /// or the user's credentials changed in the snapshot) as needed.
    pub async fn upstream(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        target: &Target,
    ) -> Arc<Upstream> {
        let mut upstreams = session.upstreams.lock().await;
        if let Some(entry) = upstreams.get_mut(&target.name) {
            if entry.version == caller.snapshot.version {
                return entry.upstream.clone();
            }
            let injection = resolve_injection(&caller.snapshot.view, &self.sealer, target, &caller.user);
            let stdio = self.stdio_binding(caller, target);
            if entry.upstream.target == *target
                && entry.upstream.injection == injection
                && entry.upstream.stdio == stdio
            {
                entry.version = caller.snapshot.version.clone();
                return entry.upstream.clone();
            }
            if let Some(stale) = upstreams.remove(&target.name) {
                tracing::info!(target = %target.name, "target or credentials changed; opening a new upstream session");
                tokio::spawn(async move { stale.upstream.close().await });
            }
        }
        let injection = resolve_injection(&caller.snapshot.view, &self.sealer, target, &caller.user);
        tracing::info!(
            target: "reflow::audit",
            session = %short(&session.id),
            user = %caller.user.id,
            target = %target.name,
            credential = injection.token_source.as_deref().unwrap_or("none"),
            "upstream session opened"
        );
        let (inbox, mut unrelated) = mpsc::channel::<Value>(64);
        let cancel = session.cancel.child_token();
        let upstream = Arc::new(Upstream::new(
            target.clone(),
            injection,
            self.stdio_binding(caller, target),
            self.http.clone(),
            self.upstream.clone(),
            Gateway::upstream_initialize_params(session),
            inbox,
            cancel.clone(),
        ));
        let gateway = self.clone();
        let owner = Arc::downgrade(session);
        let target_name = target.name.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = cancel.cancelled() => return,
                    message = unrelated.recv() => message,
                };
                let (Some(message), Some(session)) = (message, owner.upgrade()) else { return };
                if let Some(message) = gateway.relay(&session, &target_name, message) {
                    session.push(message);
                }
            }
        });
        upstreams.insert(
            target.name.clone(),
            UpstreamEntry {
                version: caller.snapshot.version.clone(),
                upstream: upstream.clone(),
                held: self.health.hold(&target.id),
            },
        );
        upstream
    }

    /// Resolves `params.name` (`params.uri` for resources) to a target and an allowed, unprefixed name.
    fn route_named(
        &self,
        session: &ClientSession,
        caller: &Caller,
        id: &Value,
        params: Option<Value>,
        kind: Kind,
        trail: &mut Trail,
    ) -> Result<(Target, Value), Value> {
        let field = if kind == Kind::Resource { "uri" } else { "name" };
        let Some(Value::Object(mut params)) = params else {
            return Err(jsonrpc::error(id.clone(), INVALID_PARAMS, "params must be an object"));
        };
        let Some(key) = params.get(field).and_then(Value::as_str).map(str::to_string) else {
            return Err(jsonrpc::error(id.clone(), INVALID_PARAMS, format!("params.{field} must be a string")));
        };
        let (target, inner) = self.route(session, caller, id, kind, &key, trail)?;
        if target.audit_arguments && kind != Kind::Resource {
            if let Some(arguments) = params.get("arguments") {
                let stored = crate::credentials::stored_values(&caller.snapshot.view, &self.sealer, &target);
                trail.arguments(arguments, &stored);
            }
        }
        params.insert(field.to_string(), Value::String(inner));
        Ok((target, Value::Object(params)))
    }

    fn route_completion(
        &self,
        session: &ClientSession,
        caller: &Caller,
        id: &Value,
        params: Option<Value>,
        trail: &mut Trail,
    ) -> Result<(Target, Value), Value> {
        let mut params = params.unwrap_or_default();
        let reference = params.get("ref").cloned().unwrap_or_default();
        let (kind, field) = match reference.get("type").and_then(Value::as_str) {
            Some("ref/prompt") => (Kind::Prompt, "name"),
            Some("ref/resource") => (Kind::Resource, "uri"),
            _ => {
                return Err(jsonrpc::error(
                    id.clone(),
                    INVALID_PARAMS,
                    "params.ref.type must be ref/prompt or ref/resource",
                ))
            }
        };
        let Some(key) = reference.get(field).and_then(Value::as_str) else {
            return Err(jsonrpc::error(id.clone(), INVALID_PARAMS, format!("params.ref.{field} must be a string")));
        };
        let (target, inner) = self.route(session, caller, id, kind, key, trail)?;
        params["ref"][field] = Value::String(inner);
        Ok((target, params))
    }

    /// Finds the target of `key` and decides. Unknown and denied are told apart so users can
    /// tell a typo from a missing grant; the explain endpoint says which policy decided.
    fn route(
        &self,
        session: &ClientSession,
        caller: &Caller,
        id: &Value,
        kind: Kind,
        key: &str,
        trail: &mut Trail,
    ) -> Result<(Target, String), Value> {
        let unknown = || jsonrpc::error(id.clone(), INVALID_PARAMS, format!("unknown {} {key:?}", kind_word(kind)));
        let (target_name, inner) = match &session.scope {
            Scope::Target(name) => (name.as_str(), key),
            Scope::Aggregate if kind == Kind::Resource => names::unmap_uri(key).ok_or_else(unknown)?,
            Scope::Aggregate => names::split(key).ok_or_else(unknown)?,
        };
        if let Some(record) = trail.record() {
            record.target = Some(target_name.to_string());
            record.name = Some(inner.to_string());
        }
        let Some(target) = Gateway::granted(caller, target_name) else {
            // Answered like an unknown target; the trail says what it was.
            if let (Some(record), Some(_)) = (trail.record(), Gateway::servable(&caller.snapshot, target_name)) {
                record.decision = "denied".into();
            }
            return Err(unknown());
        };
        // A resource is decided on, and forwarded as, its normal form: `..` and `%2e%2e`
        // cannot walk out of an allowed prefix.
        let normal;
        let inner = if kind == Kind::Resource {
            normal = reflow_common::uri::normalize(inner)
                .map_err(|e| jsonrpc::error(id.clone(), INVALID_PARAMS, format!("resource {key:?}: {e}")))?;
            normal.as_str()
        } else {
            inner
        };
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
            return Err(jsonrpc::error(
                id.clone(),
                FORBIDDEN,
                format!("{} {key:?} is not allowed for this user", kind_word(kind)),
            ));
        }
        Ok((target.clone(), inner.to_string()))
    }

    /// Sends `message` to `target` and streams back what it relays, ending with its response.
    ///
    /// The exchange is not a task of its own: the HTTP layer drives it while waiting for the
    /// reply (see [`Forwarding`]), which spares a spawn and two cross-thread wake-ups per call.
    async fn forward(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        target: &Target,
        method: &str,
        message: Value,
        mut trail: Trail,
    ) -> Reply {
        let upstream = self.upstream(session, caller, target).await;
        if let Some(record) = trail.record() {
            record.credential_source.clone_from(&upstream.injection.token_source);
        }
        let client_gone = trail.client_gone();
        let (tx, rx) = mpsc::channel(crate::upstream::RELAY_CAPACITY);
        let id = message["id"].clone();
        let key = jsonrpc::id_key(&id);
        let gateway = self.clone();
        let session = session.clone();
        let target_name = target.name.clone();
        let failing = target.clone();
        let method = method.to_string();
        let trail_status = if session.legacy { 202 } else { 200 };
        let (abort, registration) = futures::future::AbortHandle::new_pair();
        session.inflight.lock().unwrap().insert(key.clone(), (target.name.clone(), abort));
        let work = async move {
            let (sink, mut relayed) = crate::upstream::Sink::channel();
            let result = {
                let request = upstream.request(&message, Some(&sink));
                tokio::pin!(request);
                loop {
                    tokio::select! {
                        biased;
                        Some(message) = relayed.recv() => {
                            if let Some(message) = gateway.relay(&session, &target_name, message) {
                                // Waits for the reader (who also drives this exchange).
                                let _ = tx.send(message).await;
                            }
                        }
                        result = &mut request => break result,
                    }
                }
            };
            drop(sink);
            while let Ok(message) = relayed.try_recv() {
                if let Some(message) = gateway.relay(&session, &target_name, message) {
                    let _ = tx.send(message).await;
                }
            }
            session.inflight.lock().unwrap().remove(&key);
            let reply = match result {
                Ok(mut reply) => {
                    gateway.health.ok(&failing.id);
                    reply["id"] = id;
                    if session.scope == Scope::Aggregate {
                        map_result_uris(&target_name, &method, &mut reply);
                    }
                    reply
                }
                Err(error) => {
                    gateway.count_failure(&failing, &error);
                    if let Some(record) = trail.record() {
                        record.outcome = match error {
                            UpstreamError::Timeout(_) => "timeout",
                            _ => "upstream_failed",
                        }
                        .into();
                        if let UpstreamError::Status(status) = error {
                            record.upstream_status = Some(status);
                        }
                    }
                    jsonrpc::error(id, SERVER_ERROR, format!("target {target_name:?}: {error}"))
                }
            };
            trail.answered(trail_status, &reply);
            // Written now, not after the reader took the reply: the exchange ended here.
            drop(trail);
            // The last thing the exchange does: once the response is out, nothing remains.
            let _ = tx.send(reply).await;
        };
        let work = futures::FutureExt::map(futures::future::Abortable::new(work, registration), drop);
        Reply::Stream(Forwarding { work: Some(Box::pin(work)), messages: rx, share: None, client_gone })
    }

    /// Prepares a message an upstream sent for the client: server→client requests get a
    /// gateway id (and are remembered so the answer finds its way back), URIs are mapped,
    /// and list changes drop the merged list they affect.
    fn relay(&self, session: &ClientSession, target: &str, mut message: Value) -> Option<Value> {
        let method = message.get("method").and_then(Value::as_str).map(str::to_string);
        let Some(method) = method else {
            return None; // a stray response: nothing waits for it
        };
        if let Some(upstream_id) = message.get("id").cloned() {
            let gateway_id = session.next_id("srv");
            session.remember_pending(
                gateway_id.clone(),
                target.to_string(),
                upstream_id,
                self.settings.request_timeout,
            );
            message["id"] = Value::String(gateway_id);
            return Some(message);
        }
        let changed: &[&str] = match method.as_str() {
            "notifications/tools/list_changed" => &["tools/list"],
            "notifications/prompts/list_changed" => &["prompts/list"],
            "notifications/resources/list_changed" => &["resources/list", "resources/templates/list"],
            _ => &[],
        };
        if !changed.is_empty() {
            invalidate(session, changed);
            self.list_changed_elsewhere(session, target, &method, changed);
        }
        match method.as_str() {
            "notifications/resources/updated" if session.scope == Scope::Aggregate => {
                if let Some(uri) = message.pointer("/params/uri").and_then(Value::as_str) {
                    message["params"]["uri"] = Value::String(names::map_uri(target, uri));
                }
            }
            "notifications/cancelled" => {
                // The upstream withdraws a request it made of the client.
                let upstream_id = message.pointer("/params/requestId").cloned()?;
                let mut pending = session.pending.lock().unwrap();
                let gateway_id =
                    pending.iter().find(|(_, (t, id, _))| t == target && *id == upstream_id).map(|(g, _)| g.clone())?;
                pending.remove(&gateway_id);
                message["params"]["requestId"] = Value::String(gateway_id);
            }
            _ => {}
        }
        Some(message)
    }

    /// An upstream told one session its list changed. Merges that include the target are
    /// stale for everyone, and sessions that were served such a merge without an upstream
    /// session of their own to that target (so no notification of their own) are told too.
    fn list_changed_elsewhere(&self, from: &ClientSession, target: &str, notification: &str, methods: &[&str]) {
        self.merged.changed(target);
        let Some(target_id) = self.state.load().and_then(|s| s.view.targets.get(target).map(|t| t.id.clone())) else {
            return;
        };
        for session in self.sessions.all() {
            if session.id == from.id {
                continue;
            }
            // Busy: told anyway (one list_changed too many is harmless, one too few is not).
            let has_own = session.upstreams.try_lock().map(|u| u.contains_key(target)).unwrap_or(false);
            let listed = session
                .lists
                .lock()
                .unwrap()
                .iter()
                .any(|(method, list)| methods.contains(method) && list.merged.sources.contains(&target_id));
            if listed && !has_own {
                invalidate(&session, methods);
                session.push(jsonrpc::notification(notification, None));
            }
        }
    }

    async fn client_response(&self, session: &Arc<ClientSession>, id: Value, mut body: Map<String, Value>) -> Reply {
        let entry = id.as_str().and_then(|gateway_id| session.pending.lock().unwrap().remove(gateway_id));
        let Some((target, upstream_id, _)) = entry else {
            return Reply::Invalid(jsonrpc::error(
                id,
                INVALID_REQUEST,
                "no request of this session is waiting for this response",
            ));
        };
        body.insert("id".into(), upstream_id);
        body.insert("jsonrpc".into(), json!("2.0"));
        let upstream = session.upstreams.lock().await.get(&target).map(|e| e.upstream.clone());
        if let Some(upstream) = upstream {
            let message = Value::Object(body);
            tokio::spawn(async move {
                if let Err(error) = upstream.send(&message).await {
                    tracing::warn!(target = %upstream.target.name, %error, "could not pass the client's answer upstream");
                }
            });
        }
        Reply::Accepted
    }

    async fn notification(&self, session: &Arc<ClientSession>, caller: &Caller, method: &str, params: Option<Value>) {
        let targets: Vec<String> = match method {
            "notifications/cancelled" => {
                // The upstream is told, and the gateway stops waiting for it: the client will
                // ignore any late response, and its reply stream ends now.
                let Some(request_id) = params.as_ref().and_then(|p| p.get("requestId")) else { return };
                let entry = session.inflight.lock().unwrap().remove(&jsonrpc::id_key(request_id));
                entry
                    .map(|(target, exchange)| {
                        exchange.abort();
                        target
                    })
                    .into_iter()
                    .collect()
            }
            // Only upstreams the user may still reach hear of it.
            "notifications/roots/list_changed" => session
                .upstreams
                .lock()
                .await
                .keys()
                .filter(|name| Gateway::granted(caller, name).is_some())
                .cloned()
                .collect(),
            _ => return,
        };
        let message = jsonrpc::notification(method, params);
        for target in targets {
            let upstream = session.upstreams.lock().await.get(&target).map(|e| e.upstream.clone());
            if let Some(upstream) = upstream {
                let message = message.clone();
                tokio::spawn(async move {
                    let _ = upstream.send(&message).await;
                });
            }
        }
    }

    /// `logging/setLevel` reaches every upstream the session has opened that the user may
    /// still reach.
    async fn set_level(
        &self,
        session: &Arc<ClientSession>,
        caller: &Caller,
        id: Value,
        params: Option<Value>,
    ) -> Value {
        if params.as_ref().and_then(|p| p.get("level")).and_then(Value::as_str).is_none() {
            return jsonrpc::error(id, INVALID_PARAMS, "params.level must be a string");
        }
        let upstreams: Vec<Arc<Upstream>> = session
            .upstreams
            .lock()
            .await
            .iter()
            .filter(|(name, _)| Gateway::granted(caller, name).is_some())
            .map(|(_, e)| e.upstream.clone())
            .collect();
        let requests = upstreams.iter().map(|upstream| {
            let message = jsonrpc::request(json!(session.next_id("level")), "logging/setLevel", params.clone());
            async move {
                let supports =
                    upstream.initialize_result().await.is_ok_and(|r| r.pointer("/capabilities/logging").is_some());
                if supports {
                    let _ = upstream.request(&message, None).await;
                }
            }
        });
        futures::future::join_all(requests).await;
        jsonrpc::result(id, json!({}))
    }

    /// The targets a list on `scope` asks for `user`: servable, and reachable by some policy.
    fn reachable<'s>(scope: &Scope, snapshot: &'s DataSnapshot, user: &User) -> Vec<&'s Target> {
        let view = &snapshot.view;
        let candidates: Vec<&Target> = match scope {
            Scope::Aggregate => view.targets.keys().filter_map(|name| Gateway::servable(snapshot, name)).collect(),
            Scope::Target(name) => Gateway::servable(snapshot, name).into_iter().collect(),
        };
        candidates.into_iter().filter(|t| may_allow_any(&view.policies, user, &t.id)).collect()
    }

    async fn list(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        spec: &'static ListSpec,
        id: Value,
        params: Option<&Value>,
    ) -> Reply {
        if let Some(cursor) = params.and_then(|p| p.get("cursor")).filter(|c| !c.is_null()) {
            let lists = session.lists.lock().unwrap();
            let page = cursor.as_str().and_then(decode_cursor).and_then(|(generation, offset)| {
                lists
                    .get(spec.method)
                    .filter(|l| l.generation == generation && offset <= l.merged.items.len())
                    .map(|l| (l, offset))
            });
            return match page {
                Some((list, offset)) => Reply::Serialized(self.page(spec, list, offset, &id)),
                None => Reply::Now(jsonrpc::error(
                    id,
                    INVALID_PARAMS,
                    "the cursor is invalid or has expired; list again without one",
                )),
            };
        }
        let targets = Gateway::reachable(&session.scope, &caller.snapshot, &caller.user);
        let ttl = self.settings.list_cache_ttl;
        let key = (!ttl.is_zero()).then(|| ListKey {
            version: caller.snapshot.version.clone(),
            user_id: caller.user.id.clone(),
            scope: session.scope.clone(),
            method: spec.method,
            client: session.upstream_params.get().map_or(0, |(_, hash)| *hash),
        });
        let merged = match key.as_ref().and_then(|key| self.merged.get(key, ttl)) {
            Some(merged) => merged,
            None => {
                let epochs = self.merged.epochs(targets.iter().map(|t| t.name.as_str()));
                let (merged, complete) = self.merge(session, caller, spec, &targets).await;
                let merged = Arc::new(merged);
                // A merge that finished after the snapshot moved on is served, never kept.
                if let (Some(key), true, false) = (key, complete, self.snapshot_moved_on(caller)) {
                    self.merged.keep(key, merged.clone(), epochs, ttl);
                }
                merged
            }
        };
        let generation = session.next_number();
        let list = CachedList { generation, merged };
        let reply = self.page(spec, &list, 0, &id);
        session.lists.lock().unwrap().insert(spec.method, list);
        if self.snapshot_moved_on(caller) {
            // The snapshot changed while this list was made, after its sessions were checked.
            session.push(jsonrpc::notification(spec.changed, None));
        }
        Reply::Serialized(reply)
    }

    /// Whether a newer snapshot than the one `caller` is served from is active now.
    fn snapshot_moved_on(&self, caller: &Caller) -> bool {
        self.state.load().is_some_and(|s| s.version != caller.snapshot.version)
    }

    /// Asks every target in parallel and merges what the user may see; `false` with the merge
    /// when some target failed (its items are missing).
    async fn merge(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        spec: &'static ListSpec,
        targets: &[&Target],
    ) -> (Merged, bool) {
        let fetches = targets.iter().map(|target| async move {
            let fetched =
                tokio::time::timeout(self.settings.list_timeout, self.fetch_all(session, caller, target, spec)).await;
            (*target, fetched.unwrap_or(Err(UpstreamError::Timeout(self.settings.list_timeout))))
        });
        let results = futures::future::join_all(fetches).await;
        let aggregate = session.scope == Scope::Aggregate;
        let mut items = Vec::new();
        let mut offered = Vec::new();
        let mut complete = true;
        // The targets whose items are in the merge: one that failed is not, so sessions are told
        // when it comes up (a STDIO server still starting, say).
        let mut sources = Vec::with_capacity(results.len());
        for (target, result) in results {
            let raw = match result {
                Ok(raw) => {
                    self.health.ok(&target.id);
                    sources.push(target.id.clone());
                    raw
                }
                Err(error) => {
                    self.count_failure(target, &error);
                    complete = false;
                    continue;
                }
            };
            for mut item in raw {
                let Some(key) = item.get(spec.key).and_then(Value::as_str).map(str::to_string) else { continue };
                // Decided as a call on it would be: resources by their normal form (one that
                // cannot be normalised cannot be called, so it is not listed either).
                let decided = match spec.kind {
                    Kind::Resource => reflow_common::uri::normalize(&key).ok(),
                    _ => Some(key.clone()),
                };
                let Some(decided) = decided else { continue };
                let allowed =
                    decide(&caller.snapshot.view.policies, &caller.user, &target.id, spec.kind, &decided).allowed;
                offered.push((target.id.clone(), decided, allowed));
                if !allowed {
                    continue;
                }
                if aggregate {
                    item[spec.key] = Value::String(match spec.kind {
                        Kind::Resource => names::map_uri(&target.name, &key),
                        _ => names::prefixed(&target.name, &key),
                    });
                }
                items.push(item);
            }
        }
        (Merged { items, offered, sources }, complete)
    }

    /// The response carrying one page of a merged list, serialised straight from the shared
    /// items (building a JSON tree of the page would copy every item).
    fn page(&self, spec: &ListSpec, list: &CachedList, offset: usize, id: &Value) -> String {
        let items = &list.merged.items;
        let end = (offset + self.settings.page_size).min(items.len());
        let page = serde_json::to_string(&items[offset..end]).expect("JSON values serialise");
        let cursor = if end < items.len() {
            format!(r#","nextCursor":"{}""#, encode_cursor(list.generation, end))
        } else {
            String::new()
        };
        format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{{"{}":{page}{cursor}}}}}"#, spec.field)
    }

    /// Every page of one upstream list (empty when the upstream lacks the capability).
    async fn fetch_all(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        target: &Target,
        spec: &ListSpec,
    ) -> Result<Vec<Value>, UpstreamError> {
        let upstream = self.upstream(session, caller, target).await;
        let initialized = upstream.initialize_result().await?;
        if initialized.pointer(&format!("/capabilities/{}", spec.capability)).is_none() {
            return Ok(Vec::new());
        }
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_UPSTREAM_PAGES {
            let params = cursor.as_ref().map(|c| json!({"cursor": c}));
            let reply =
                upstream.request(&jsonrpc::request(json!(session.next_id("list")), spec.method, params), None).await?;
            let Some(result) = reply.get("result") else {
                return Err(UpstreamError::Refused(format!("{} failed: {}", spec.method, reply["error"]["message"])));
            };
            if let Some(page) = result.get(spec.field).and_then(Value::as_array) {
                items.extend(page.iter().cloned());
            }
            match result.get("nextCursor").and_then(Value::as_str) {
                Some(next) if !next.is_empty() && Some(next) != cursor.as_deref() => cursor = Some(next.to_string()),
                _ => break,
            }
        }
        Ok(items)
    }

    /// Called when a new snapshot is active: stops STDIO processes of restarted, changed or
    /// removed targets, closes sessions of users who may no longer connect, and tells the
    /// others which of their lists changed.
    pub fn snapshot_changed(&self, snapshot: &DataSnapshot) {
        // One at a time, whole: the sync loop (before its Ack) and the state watcher both call
        // this, and the second must find the first's recycles recorded, not half done.
        let _one = self.recycling.handling();
        if !self.recycling.begin(&snapshot.version) {
            return;
        }
        self.merged.clear();
        let stopped = self.pool.retire(snapshot.view.targets.values());
        self.recycling.targets(snapshot.view.targets.values(), &stopped);
        let raised = self.recycling.users(snapshot.view.users.values());
        let rotated = self.recycling.credentials(&snapshot.view.credentials);
        let mut recycled: HashMap<&str, u32> = raised.keys().map(|user| (user.as_str(), 0)).collect();
        for user in raised.keys() {
            self.pool.stop_user(user);
        }
        for session in self.sessions.all() {
            let user = snapshot.view.users.get(&session.user_id).filter(|u| u.active);
            let Some(user) = user else {
                if let Some(session) = self.sessions.remove(&session.id) {
                    tracing::info!(session = %short(&session.id), "the session's user is gone or deactivated; closing it");
                    tokio::spawn(async move { session.close().await });
                }
                continue;
            };
            let identity = super::recycle::identity(user);
            let before = session.identity.swap(identity, std::sync::atomic::Ordering::Relaxed);
            if before != 0 && before != identity {
                self.recycle(&session);
                if let Some(count) = recycled.get_mut(session.user_id.as_str()) {
                    *count += 1;
                }
                continue;
            }
            if !rotated.is_empty() {
                self.drop_rotated(&session, snapshot, user, &rotated);
            }
            let mut changed = Vec::new();
            {
                // Targets added, removed, enabled, disabled or newly (un)reachable change the
                // list even when no item's decision did.
                let mut reachable: Vec<&str> =
                    Gateway::reachable(&session.scope, snapshot, user).into_iter().map(|t| t.id.as_str()).collect();
                reachable.sort_unstable();
                let mut lists = session.lists.lock().unwrap();
                lists.retain(|method, list| {
                    let spec = LISTS.iter().find(|s| s.method == *method).expect("cached lists are of known methods");
                    let mut sources: Vec<&str> = list.merged.sources.iter().map(String::as_str).collect();
                    sources.sort_unstable();
                    let same = sources == reachable
                        && list.merged.offered.iter().all(|(target_id, key, allowed)| {
                            let target = snapshot.view.targets.values().find(|t| t.id == *target_id);
                            let servable = target.is_some_and(|t| Gateway::servable(snapshot, &t.name).is_some());
                            let now =
                                servable && decide(&snapshot.view.policies, user, target_id, spec.kind, key).allowed;
                            now == *allowed
                        });
                    if !same && !changed.contains(&spec.changed) {
                        changed.push(spec.changed);
                    }
                    same
                });
            }
            for method in changed {
                session.push(jsonrpc::notification(method, None));
            }
        }
        for (user, sessions) in recycled {
            tracing::info!(user = %user, sessions, "a user's sessions were recycled");
            self.recycling.recycled(user, raised[user], sessions);
        }
    }

    /// Closes the session's HTTP and SSE upstream sessions to targets whose credentials changed
    /// when what they would carry for `user` is no longer what they were opened with; the next
    /// request opens them with the new credentials. (A STDIO process whose env changed is
    /// replaced when next used.) A session busy opening an upstream is left to that path.
    fn drop_rotated(&self, session: &ClientSession, snapshot: &DataSnapshot, user: &User, rotated: &HashSet<String>) {
        let Ok(mut upstreams) = session.upstreams.try_lock() else { return };
        let stale: Vec<String> = upstreams
            .iter()
            .filter(|(_, entry)| {
                let target = &entry.upstream.target;
                rotated.contains(&target.id)
                    && entry.upstream.stdio.is_none()
                    && snapshot.view.targets.get(&target.name).is_some_and(|now| {
                        resolve_injection(&snapshot.view, &self.sealer, now, user) != entry.upstream.injection
                    })
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(entry) = upstreams.remove(&name) {
                tracing::info!(session = %short(&session.id), target = %name, "the user's credentials for the target changed; closing its upstream session");
                tokio::spawn(async move { entry.upstream.close().await });
            }
        }
    }

    /// Recycles a client session: its upstream sessions (opened as the user's old identity)
    /// are closed, its lists forgotten, and the client told the lists changed. The client keeps
    /// the session; its next request opens upstream sessions as the user is now.
    fn recycle(&self, session: &Arc<ClientSession>) {
        tracing::info!(target: "reflow::audit", session = %short(&session.id), user = %session.user_id, "session recycled: the user's role, groups or session generation changed");
        session.lists.lock().unwrap().clear();
        let owned = session.clone();
        tokio::spawn(async move {
            let stale: Vec<UpstreamEntry> = owned.upstreams.lock().await.drain().map(|(_, entry)| entry).collect();
            for entry in stale {
                entry.upstream.close().await;
            }
        });
        for spec in LISTS.iter().filter(|s| s.method != "resources/templates/list") {
            session.push(jsonrpc::notification(spec.changed, None));
        }
    }

    /// Ends sessions idle longer than the session timeout, until `shutdown`.
    pub async fn expire_sessions(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            for session in self.sessions.expire(self.settings.session_timeout) {
                tracing::info!(session = %short(&session.id), "session expired");
                session.close().await;
            }
            self.shares.forget_quiet();
        }
        for session in self.sessions.all() {
            self.sessions.remove(&session.id);
            session.close().await;
        }
        self.pool.shutdown().await;
    }

    /// Stops idle and expired STDIO processes every `every`, until `shutdown`.
    pub async fn collect_processes(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => self.pool.collect(),
            }
        }
    }

    /// Tells sessions whose lists were merged without a STDIO server that it is up now (it was
    /// slow to start, and the lists did not wait for it), until `shutdown`.
    pub async fn announce_started(self: Arc<Self>, shutdown: CancellationToken) {
        let mut started = self.pool.subscribe_started();
        loop {
            let target_id = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = started.recv() => match next {
                    Ok(target_id) => target_id,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            };
            self.target_came_up(&target_id);
        }
    }

    fn target_came_up(&self, target_id: &str) {
        let Some(snapshot) = self.state.load() else { return };
        self.merged.clear();
        for session in self.sessions.all() {
            let Some(user) = snapshot.view.users.get(&session.user_id) else { continue };
            let reachable = Gateway::reachable(&session.scope, &snapshot, user);
            if !reachable.iter().any(|t| t.id == target_id) {
                continue;
            }
            let mut changed = Vec::new();
            session.lists.lock().unwrap().retain(|method, list| {
                let without = !list.merged.sources.iter().any(|source| source == target_id);
                if without {
                    let spec = LISTS.iter().find(|s| s.method == *method).expect("cached lists are of known methods");
                    if !changed.contains(&spec.changed) {
                        changed.push(spec.changed);
                    }
                }
                !without
            });
            for method in changed {
                session.push(jsonrpc::notification(method, None));
            }
        }
    }
}

fn invalidate(session: &ClientSession, methods: &[&str]) {
    session.lists.lock().unwrap().retain(|method, _| !methods.contains(method));
}

fn encode_cursor(generation: u64, offset: usize) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{generation}:{offset}"))
}

fn decode_cursor(cursor: &str) -> Option<(u64, usize)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (generation, offset) = text.split_once(':')?;
    Some((generation.parse().ok()?, offset.parse().ok()?))
}

/// Maps the URIs a result carries (read contents, resource links, embedded resources) so the
/// client can use them through the aggregated endpoint.
fn map_result_uris(target: &str, method: &str, reply: &mut Value) {
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

impl crate::sync::Observer for Gateway {
    fn applied(&self, snapshot: &DataSnapshot) {
        self.snapshot_changed(snapshot);
    }

    /// Running processes, recycles, restarts applied and each target's health.
    fn status(&self) -> reflow_proto::snapshot::v1::Status {
        let (recycled, restarted) = self.recycling.report();
        let instances = self.pool.instances();
        let snapshot = self.state.load();
        let known: std::collections::HashSet<&str> =
            snapshot.iter().flat_map(|s| s.view.targets.values().map(|t| t.id.as_str())).collect();
        let mut targets = Vec::new();
        for (target_id, health) in self.health.snapshot(|id| known.contains(id)) {
            if !known.contains(target_id.as_str()) {
                continue;
            }
            let processes = instances.iter().filter(|i| i.target_id == target_id).count() as u32;
            // A STDIO server's own exit or failed start, when it is the latest failure.
            let exit = self.pool.last_exit(&target_id);
            let last_failure = match (health.last_failure, exit) {
                (Some(call), Some(exit)) => Some(if exit.0 >= call.0 { exit } else { call }),
                (call, exit) => call.or(exit),
            };
            targets.push(reflow_proto::snapshot::v1::TargetHealth {
                target_id,
                sessions: health.sessions,
                processes,
                last_ok_unix: health.last_ok,
                last_failure_unix: last_failure.as_ref().map_or(0, |f| f.0),
                last_failure: last_failure.map(|f| f.1).unwrap_or_default(),
                failures: health.failures,
            });
        }
        targets.sort_by(|a, b| a.target_id.cmp(&b.target_id));
        reflow_proto::snapshot::v1::Status { instances, recycled, restarted, targets }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        assert_eq!(decode_cursor(&encode_cursor(7, 100)), Some((7, 100)));
        assert_eq!(decode_cursor("not base64!"), None);
        assert_eq!(decode_cursor(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("x:1")), None);
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
