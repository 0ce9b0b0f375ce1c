//! The exchange with an upstream: a routed request forwarded and its response relayed, with
//! what the upstream sends meanwhile (notifications, server→client requests) relayed to the
//! client; and the client's own responses, notifications and `logging/setLevel`.

use std::sync::Arc;

use reflow_proto::resources::Target;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::error::McpError;
use super::gateway::{Caller, Gateway, Reply};
use super::lists::invalidate;
use super::names;
use super::route::map_result_uris;
use super::session::ClientSession;
use super::Scope;
use crate::audit::{ClientGone, Trail};
use crate::jsonrpc;
use crate::upstream::{Relayed, Upstream, UpstreamError};

/// How many times one request is asked again with a session-era client's answers, at most (as
/// many rounds as the Python SDK's stateless client allows itself).
const MAX_INPUT_ROUNDS: usize = 10;
/// How many questions of one `input_required` result are asked of a session-era client, at
/// most (each is a server→client request it must answer).
const MAX_INPUT_REQUESTS: usize = 16;

/// The result of an upstream's `input_required` answer.
fn input_required(reply: &Value) -> Option<Value> {
    let result = reply.get("result")?;
    (result.get("resultType").and_then(Value::as_str) == Some("input_required")).then(|| result.clone())
}

/// The request asked again: a new id, the client's answers as `inputResponses`, and the
/// upstream's `requestState` echoed as it was given (left out when it gave none).
fn asked_again(session: &ClientSession, mut message: Value, asked: &Value, answers: Map<String, Value>) -> Value {
    message["id"] = Value::String(session.next_id("again"));
    if let Some(params) = message.get_mut("params").and_then(Value::as_object_mut) {
        params.insert("inputResponses".into(), Value::Object(answers));
        match asked.get("requestState") {
            Some(state) => params.insert("requestState".into(), state.clone()),
            None => params.remove("requestState"),
        };
    }
    message
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
    messages: mpsc::Receiver<Relayed>,
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
        self.next_event().await.map(|(message, _)| message)
    }

    /// [`Forwarding::next`] with the id of the event it may resume after (see
    /// [`super::resume::event_id`]).
    pub async fn next_event(&mut self) -> Option<Relayed> {
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
        if message.as_ref().is_none_or(|(message, _)| jsonrpc::is_response(message)) {
            // The response is the exchange's last act: nothing is left to run.
            self.work = None;
            self.client_gone = None;
        }
        message
    }

    /// Lets the exchange run on its own and returns its messages: for a reader that may wait
    /// on something else (a full client stream) while the upstream still needs answers.
    pub fn detach(mut self) -> mpsc::Receiver<Relayed> {
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

impl Gateway {
    /// Sends `message` to `target` and streams back what it relays, ending with its response.
    ///
    /// The exchange is not a task of its own: the HTTP layer drives it while waiting for the
    /// reply (see [`Forwarding`]), which spares a spawn and two cross-thread wake-ups per call.
    pub(super) async fn forward(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        target: &Target,
        method: &str,
        mut message: Value,
        mut trail: Trail,
    ) -> Reply {
        let upstream = self.upstream(session, caller, target).await;
        if let Some(traceparent) = trail.forwarding(&target.name, target.transport_type.as_str(), method) {
            jsonrpc::set_meta(&mut message, "traceparent", &traceparent);
        }
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
        // Events a client may resume after, on any replica: those of a travelling session's
        // upstream session that other replicas can address.
        let resumable = session.ticket.get().is_some() && upstream.shared();
        let (abort, registration) = futures::future::AbortHandle::new_pair();
        session.inflight.lock().unwrap().insert(key.clone(), (target.name.clone(), abort));
        let work = async move {
            let (sink, mut relayed) = crate::upstream::Sink::channel();
            let mut message = message;
            let mut rounds = 0;
            let result = loop {
                let result = {
                    let request = upstream.request(&message, Some(&sink));
                    tokio::pin!(request);
                    loop {
                        tokio::select! {
                            biased;
                            Some((message, event)) = relayed.recv() => {
                                if let Some(message) = gateway.relay(&session, &target_name, message) {
                                    let event = resumable.then(|| event.map(|e| super::resume::event_id(&target_name, &e))).flatten();
                                    // Waits for the reader (who also drives this exchange).
                                    let _ = tx.send((message, event)).await;
                                }
                            }
                            result = &mut request => break result,
                        }
                    }
                };
                // An upstream of the stateless era asks for input with an `input_required`
                // result: a client of the session era is asked the session era's way, and the
                // upstream asked again with its answers (a stateless client gets the result).
                let asked = match &result {
                    Ok(reply) if !session.bridged && rounds < MAX_INPUT_ROUNDS => input_required(reply),
                    _ => None,
                };
                let Some(asked) = asked else { break result };
                rounds += 1;
                match gateway.ask_client(&session, &asked, &tx).await {
                    Ok(Some(answers)) => message = asked_again(&session, message, &asked, answers),
                    Ok(None) => break result,
                    Err(error) => break Err(error),
                }
            };
            drop(sink);
            while let Ok((message, event)) = relayed.try_recv() {
                if let Some(message) = gateway.relay(&session, &target_name, message) {
                    let event = resumable.then(|| event.map(|e| super::resume::event_id(&target_name, &e))).flatten();
                    let _ = tx.send((message, event)).await;
                }
            }
            session.inflight.lock().unwrap().remove(&key);
            let leg_error = match &result {
                Ok(reply) => jsonrpc::error_type(reply),
                Err(UpstreamError::Timeout(_)) => Some("timeout".to_string()),
                Err(_) => Some("upstream_failed".to_string()),
            };
            trail.forwarded(leg_error);
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
                    if error == UpstreamError::SharedSessionEnded {
                        gateway.upstream_session_ended(&session);
                    }
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
                    McpError::Upstream { target: target_name.clone(), error }.into_jsonrpc(id)
                }
            };
            trail.answered(trail_status, &reply);
            // Written now, not after the reader took the reply: the exchange ended here.
            drop(trail);
            // The last thing the exchange does: once the response is out, nothing remains.
            let _ = tx.send((reply, None)).await;
        };
        let work = futures::FutureExt::map(futures::future::Abortable::new(work, registration), drop);
        Reply::Stream(Forwarding { work: Some(Box::pin(work)), messages: rx, share: None, client_gone })
    }

    /// Asks a session-era client what a stateless upstream's `input_required` result asks, as
    /// server→client requests on the exchange's stream: the answers by the result's keys, once
    /// every one came or timed out (`None` when the client's stream is gone). An upstream that
    /// asks more than [`MAX_INPUT_REQUESTS`] at once is refused.
    async fn ask_client(
        &self,
        session: &ClientSession,
        asked: &Value,
        tx: &mpsc::Sender<crate::upstream::Relayed>,
    ) -> Result<Option<Map<String, Value>>, UpstreamError> {
        let requests = asked.get("inputRequests").and_then(Value::as_object).cloned().unwrap_or_default();
        if requests.len() > MAX_INPUT_REQUESTS {
            return Err(UpstreamError::Protocol(format!(
                "the upstream asks the client {} things at once; at most {MAX_INPUT_REQUESTS} are passed on",
                requests.len()
            )));
        }
        let mut waiting = Vec::new();
        for (key, request) in requests {
            let gateway_id = session.next_id("srv");
            let (answer, answered) = tokio::sync::oneshot::channel();
            self.asked.lock().unwrap().insert(format!("{}/{gateway_id}", session.id), answer);
            let mut message = json!({"jsonrpc": "2.0", "id": gateway_id, "method": request.get("method")});
            if let Some(params) = request.get("params") {
                message["params"] = params.clone();
            }
            if tx.send((message, None)).await.is_err() {
                self.asked.lock().unwrap().remove(&format!("{}/{gateway_id}", session.id));
                return Ok(None);
            }
            waiting.push((key, gateway_id, answered));
        }
        let mut answers = Map::new();
        for (key, gateway_id, answered) in waiting {
            match tokio::time::timeout(self.settings.request_timeout, answered).await {
                Ok(Ok(body)) => {
                    // An error answers nothing: the upstream asks again or gives up.
                    if let Some(result) = body.get("result") {
                        answers.insert(key, result.clone());
                    }
                }
                _ => {
                    self.asked.lock().unwrap().remove(&format!("{}/{gateway_id}", session.id));
                }
            }
        }
        Ok(Some(answers))
    }

    /// Prepares a message an upstream sent for the client: server→client requests get a
    /// gateway id (and are remembered so the answer finds its way back), URIs are mapped,
    /// and list changes drop the merged list they affect.
    pub(super) fn relay(&self, session: &ClientSession, target: &str, mut message: Value) -> Option<Value> {
        let method = message.get("method").and_then(Value::as_str).map(str::to_string);
        let Some(method) = method else {
            return None; // a stray response: nothing waits for it
        };
        if let Some(upstream_id) = message.get("id").cloned() {
            // A session that travels may get the answer on another replica: the id says where
            // it goes.
            let gateway_id = match session.ticket.get() {
                Some(_) => super::resume::server_request_id(target, &upstream_id),
                None => session.next_id("srv"),
            };
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
    pub(super) fn list_changed_elsewhere(
        &self,
        from: &ClientSession,
        target: &str,
        notification: &str,
        methods: &[&str],
    ) {
        self.merged.changed(target);
        let Some(target_id) = self.state.load().and_then(|s| s.view.targets.get(target).map(|t| t.id.clone())) else {
            return;
        };
        for session in self.sessions.all() {
            if session.id == from.id {
                continue;
            }
            // Told even when it holds an upstream session of its own to the target: a server
            // may tell only the session that changed its list (one list_changed too many is
            // harmless, one too few is not).
            let listed = session
                .lists
                .lock()
                .unwrap()
                .iter()
                .any(|(method, list)| methods.contains(method) && list.merged.sources.contains(&target_id));
            if listed {
                invalidate(&session, methods);
                session.push(jsonrpc::notification(notification, None));
            }
        }
    }

    pub(super) async fn client_response(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        id: Value,
        mut body: Map<String, Value>,
    ) -> Reply {
        // The answer to a question the gateway asked for a stateless upstream (see `ask_client`).
        let asked = id
            .as_str()
            .and_then(|gateway_id| self.asked.lock().unwrap().remove(&format!("{}/{gateway_id}", session.id)));
        if let Some(waiting) = asked {
            let _ = waiting.send(body);
            return Reply::Accepted;
        }
        let entry = id.as_str().and_then(|gateway_id| session.pending.lock().unwrap().remove(gateway_id));
        let entry = entry.map(|(target, upstream_id, _)| (target, upstream_id)).or_else(|| {
            // Asked through another replica: the id names the target and the upstream's id.
            session.ticket.get()?;
            let (target, upstream_id) = super::resume::parse_server_request_id(id.as_str()?)?;
            let in_scope = match &session.scope {
                Scope::Target(name) => *name == target,
                Scope::Aggregate => Gateway::granted(caller, &target).is_some(),
            };
            in_scope.then_some((target, upstream_id))
        });
        let Some((target, upstream_id)) = entry else {
            return Reply::Invalid(McpError::NoWaitingRequest.into_jsonrpc(id));
        };
        body.insert("id".into(), upstream_id);
        body.insert("jsonrpc".into(), json!("2.0"));
        let mut upstream = session.upstreams.lock().await.get(&target).map(|e| e.upstream.clone());
        if upstream.is_none() && session.ticket.get().is_some() {
            if let Some(granted) = Gateway::granted(caller, &target) {
                upstream = Some(self.upstream(session, caller, granted).await);
            }
        }
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

    pub(super) async fn notification(
        &self,
        session: &Arc<ClientSession>,
        caller: &Caller,
        method: &str,
        params: Option<Value>,
    ) {
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
    pub(super) async fn set_level(
        &self,
        session: &Arc<ClientSession>,
        caller: &Caller,
        id: Value,
        params: Option<Value>,
    ) -> Value {
        if params.as_ref().and_then(|p| p.get("level")).and_then(Value::as_str).is_none() {
            return McpError::invalid_params("params.level must be a string").into_jsonrpc(id);
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
}
