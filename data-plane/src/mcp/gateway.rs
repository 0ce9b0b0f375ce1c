//! The MCP methods: what the gateway answers itself, what it merges from every reachable
//! target, and what it routes to one target after a policy decision.
//!
//! Every request runs against one snapshot (taken once by the HTTP layer), so listing and
//! calling decide with the same policies and the same function.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use reflow_common::crypto::DeterministicSealer;
use reflow_common::model::TransportType;
use reflow_proto::policy::{decide, may_allow_any, Kind};
use reflow_proto::resources::{Target, User};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::McpError;
use super::exchange::Forwarding;
use super::lists::LISTS;
use super::merged::{client_hash, MergedLists};
use super::session::{short, ClientSession, Sessions, UpstreamEntry};
use super::McpSettings;
use super::Scope;
use crate::audit::Trail;
use crate::credentials::{resolve_env, resolve_injection};
use crate::jsonrpc::{self, Message};
use crate::snapshot::DataSnapshot;
use crate::state::SnapshotState;
use crate::upstream::kubernetes::KubernetesBinding;
use crate::upstream::stdio::{Pool, ProcessKey};
use crate::upstream::{StdioBinding, Upstream, UpstreamError, UpstreamSettings};

/// Protocol versions of the session era this gateway speaks, newest first.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
pub const LATEST_VERSION: &str = SUPPORTED_VERSIONS[0];
/// The most bytes of a client's `initialize` capabilities a session keeps (real clients send a
/// few hundred).
pub const MAX_CLIENT_CAPABILITIES: usize = 64 * 1024;

/// Who is asking, and the snapshot the whole request is decided with.
#[derive(Debug, Clone)]
pub struct Caller {
    pub snapshot: Arc<DataSnapshot>,
    pub user: User,
    /// The data plane serves kubernetes targets (it has a cluster).
    pub kubernetes: bool,
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

/// The gateway: sessions, the upstream HTTP client, and the snapshot they are served from.
#[derive(Debug)]
pub struct Gateway {
    pub state: Arc<SnapshotState>,
    pub(super) sealer: DeterministicSealer,
    pub sessions: Sessions,
    /// One pooled client for every upstream.
    pub(super) http: reqwest::Client,
    pub settings: McpSettings,
    pub(super) upstream: UpstreamSettings,
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
    pub(super) audit: std::sync::OnceLock<Arc<crate::audit::Recorder>>,
    /// Metrics and traces of the traffic.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Cancelled when the data plane begins shutting down: no new sessions, streams end.
    pub draining: CancellationToken,
    /// Travelling sessions ended for good (nonce → until when, and whether here), so that no
    /// replica resumes them: see [`super::resume`].
    pub(super) ended: std::sync::Mutex<HashMap<String, (i64, bool)>>,
    /// Exchanges of stateless-era clients waiting for their `inputResponses`, by
    /// `requestState` (see [`super::modern`]).
    pub(super) parked: std::sync::Mutex<HashMap<String, super::modern::Parked>>,
    /// Questions asked of session-era clients for stateless upstreams, waiting for their
    /// answers, by session and gateway id (see `Gateway::ask_client`).
    pub(super) asked: std::sync::Mutex<HashMap<String, tokio::sync::oneshot::Sender<serde_json::Map<String, Value>>>>,
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
        let telemetry = Arc::new(crate::telemetry::Telemetry::new());
        let sessions = Sessions::default();
        sessions.observe_durations(telemetry.session_duration.with(&[]));
        let gateway = Arc::new(Gateway {
            state,
            sealer,
            sessions,
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
            telemetry,
            settings,
            draining: CancellationToken::new(),
            ended: Default::default(),
            parked: Default::default(),
            asked: Default::default(),
        });
        crate::telemetry::collect_state(&gateway);
        gateway
    }

    /// Begins shutting down: `/ready` fails, new sessions are refused, and open streams end
    /// (their clients reconnect through another replica); requests in flight finish.
    pub fn drain(&self) {
        if !self.draining.is_cancelled() {
            tracing::info!(sessions = self.sessions.len(), "draining: no new sessions; requests in flight finish");
        }
        self.draining.cancel();
    }

    /// Audits every MCP request into `recorder` (set once, before serving).
    pub fn set_audit(&self, recorder: Arc<crate::audit::Recorder>) {
        let _ = self.audit.set(recorder);
    }

    pub fn audit(&self) -> Option<&Arc<crate::audit::Recorder>> {
        self.audit.get()
    }

    /// Whether `name` is a target this gateway serves: HTTP, SSE, STDIO, and kubernetes when
    /// `kubernetes` (the data plane has a cluster).
    pub fn servable<'s>(snapshot: &'s DataSnapshot, name: &str, kubernetes: bool) -> Option<&'s Target> {
        snapshot.view.targets.get(name).filter(|t| {
            t.enabled
                && match t.transport_type {
                    TransportType::StreamableHttp | TransportType::Sse | TransportType::Stdio => true,
                    TransportType::Kubernetes => kubernetes,
                }
        })
    }

    /// The target `name` if `caller` may reach it: servable, and some policy could allow the
    /// user something there. Any other target is treated as unknown: no upstream session is
    /// opened, no process started and nothing sent for a user without a grant.
    pub fn granted<'s>(caller: &'s Caller, name: &str) -> Option<&'s Target> {
        Gateway::servable(&caller.snapshot, name, caller.kubernetes)
            .filter(|t| may_allow_any(&caller.snapshot.view.policies, &caller.user, &t.id))
    }

    pub(super) fn stdio_binding(&self, caller: &Caller, target: &Target) -> Option<StdioBinding> {
        (target.transport_type == TransportType::Stdio).then(|| StdioBinding {
            pool: self.pool.clone(),
            key: ProcessKey::new(target, &caller.user),
            env: resolve_env(&caller.snapshot.view, &self.sealer, target, &caller.user),
        })
    }

    pub(super) fn kubernetes_binding(&self, caller: &Caller, target: &Target) -> Option<KubernetesBinding> {
        let instances = self.settings.kubernetes.as_ref()?;
        (target.transport_type == TransportType::Kubernetes).then(|| {
            KubernetesBinding::new(
                instances.clone(),
                target,
                ProcessKey::new(target, &caller.user),
                resolve_env(&caller.snapshot.view, &self.sealer, target, &caller.user),
            )
        })
    }

    pub(super) fn count_failure(&self, target: &Target, error: &UpstreamError) {
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
            Message::Response { id, body } => self.client_response(session, caller, id, body).await,
        }
    }

    pub(super) async fn request(
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
            return Reply::Now(McpError::NotInitialized.into_jsonrpc(id));
        }
        if let Some(spec) = LISTS.iter().find(|s| s.method == method) {
            return self.list(session, caller, spec, id, params.as_ref(), trail).await;
        }
        let routed = match method {
            "tools/call" => self.route_named(session, caller, params, Kind::Tool, trail),
            "prompts/get" => self.route_named(session, caller, params, Kind::Prompt, trail),
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                self.route_named(session, caller, params, Kind::Resource, trail)
            }
            "completion/complete" => self.route_completion(session, caller, params, trail),
            "logging/setLevel" => return Reply::Now(self.set_level(session, caller, id, params).await),
            _ => return Reply::Now(McpError::MethodNotFound(method.to_string()).into_jsonrpc(id)),
        };
        match routed {
            Ok((target, params)) => {
                let message = jsonrpc::request(id, method, Some(params));
                self.forward(session, caller, &target, method, message, trail.take()).await
            }
            Err(error) => Reply::Now(error.into_jsonrpc(id)),
        }
    }

    pub(super) async fn initialize(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        id: Value,
        params: Option<Value>,
    ) -> Value {
        if session.protocol_version.get().is_some() {
            return McpError::AlreadyInitialized.into_jsonrpc(id);
        }
        let params = params.unwrap_or_default();
        let Some(requested) = params.get("protocolVersion").and_then(Value::as_str) else {
            return McpError::invalid_params("initialize needs params.protocolVersion").into_jsonrpc(id);
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
            return McpError::invalid_params(format!(
                "initialize params.capabilities is too large: at most {MAX_CLIENT_CAPABILITIES} bytes"
            ))
            .into_jsonrpc(id);
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
            Scope::Aggregate => aggregate_description(&version),
            Scope::Target(name) => {
                let Some(target) = Gateway::granted(caller, name) else {
                    return McpError::Unknown { kind: "target", name: name.clone() }.into_jsonrpc(id);
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
                        return McpError::Unavailable { target: name.clone(), error }.into_jsonrpc(id);
                    }
                }
            }
        };
        tracing::info!(session = %short(&session.id), user = %caller.user.id, %version, "MCP session initialised");
        let _ = session.protocol_version.set(version);
        jsonrpc::result(id, result)
    }

    /// Params for `initialize` upstream: the client's version and capabilities, our identity.
    pub(super) fn upstream_initialize_params(session: &ClientSession) -> Value {
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
            let kubernetes = self.kubernetes_binding(caller, target);
            if entry.upstream.target == *target
                && entry.upstream.injection == injection
                && entry.upstream.stdio == stdio
                && entry.upstream.kubernetes == kubernetes
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
        let resume = session.resume.lock().unwrap().remove(&target.name);
        tracing::info!(
            target: "reflow::audit",
            session = %short(&session.id),
            user = %caller.user.id,
            target = %target.name,
            credential = injection.token_source.as_deref().unwrap_or("none"),
            resumed = resume.is_some(),
            "upstream session opened"
        );
        let (inbox, mut unrelated) = mpsc::channel::<Value>(64);
        let cancel = session.cancel.child_token();
        let upstream = Arc::new(
            Upstream::new(
                target.clone(),
                injection,
                self.stdio_binding(caller, target),
                self.kubernetes_binding(caller, target),
                self.http.clone(),
                self.upstream.clone(),
                Gateway::upstream_initialize_params(session),
                inbox,
                cancel.clone(),
            )
            .resuming(resume)
            .preferring_stateless(session.bridged),
        );
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
        if let Some(instances) = &self.settings.kubernetes {
            instances.retire(snapshot.view.targets.values());
        }
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
                    Gateway::reachable(&session.scope, snapshot, user, self.settings.kubernetes.is_some())
                        .into_iter()
                        .map(|t| t.id.as_str())
                        .collect();
                reachable.sort_unstable();
                let mut lists = session.lists.lock().unwrap();
                lists.retain(|method, list| {
                    let spec = LISTS.iter().find(|s| s.method == *method).expect("cached lists are of known methods");
                    let mut sources: Vec<&str> = list.merged.sources.iter().map(String::as_str).collect();
                    sources.sort_unstable();
                    let same = sources == reachable
                        && list.merged.offered.iter().all(|(target_id, key, allowed)| {
                            let target = snapshot.view.targets.values().find(|t| t.id == *target_id);
                            let servable = target.is_some_and(|t| {
                                Gateway::servable(snapshot, &t.name, self.settings.kubernetes.is_some()).is_some()
                            });
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
    pub(super) fn drop_rotated(
        &self,
        session: &ClientSession,
        snapshot: &DataSnapshot,
        user: &User,
        rotated: &HashSet<String>,
    ) {
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
    pub(super) fn recycle(&self, session: &Arc<ClientSession>) {
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
                // One that travels may be in use on another replica: only this copy ends.
                tracing::info!(session = %short(&session.id), "session expired");
                session.detach().await;
            }
            self.shares.forget_quiet();
        }
        // Sessions that travel go on elsewhere: their upstream sessions stay open.
        for session in self.sessions.all() {
            self.sessions.remove(&session.id);
            session.detach().await;
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

    pub(super) fn target_came_up(&self, target_id: &str) {
        let Some(snapshot) = self.state.load() else { return };
        self.merged.clear();
        for session in self.sessions.all() {
            let Some(user) = snapshot.view.users.get(&session.user_id) else { continue };
            let reachable = Gateway::reachable(&session.scope, &snapshot, user, self.settings.kubernetes.is_some());
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

/// What `/mcp` says of itself (the `initialize` result of protocol `version`).
pub(super) fn aggregate_description(version: &str) -> Value {
    json!({
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
    })
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
        // Rounded to the KiB, so a spool that merely breathes does not make every check a report.
        let audit_spool_bytes = self.audit().map_or(0, |recorder| recorder.status().spool_bytes / 1024 * 1024);
        let sessions = self.sessions.len() as u32;
        let ended_sessions = self.ended_here();
        reflow_proto::snapshot::v1::Status {
            instances,
            recycled,
            restarted,
            targets,
            sessions,
            audit_spool_bytes,
            ended_sessions,
        }
    }

    fn ended_elsewhere(&self, ended: &[reflow_proto::snapshot::v1::EndedSession]) {
        self.sessions_ended_elsewhere(ended);
    }
}
