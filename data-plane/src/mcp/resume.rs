//! Sessions that travel between replicas: a ticket sealed into the session id when a session
//! opens, and a session resumed from its ticket on a replica that has never seen it.

use std::sync::Arc;

use axum::http::StatusCode;

use super::error::Refusal;
use super::gateway::Caller;
use super::gateway::Gateway;
use super::merged::client_hash;
use super::session::ClientSession;
use super::ticket::{self, Ticket};
use super::Scope;
use crate::jsonrpc::{INVALID_REQUEST, SERVER_ERROR};

/// The answer to a request in a session this gateway does not serve (any more), saying why.
pub fn session_not_found(why: &str) -> Refusal {
    Refusal::new(StatusCode::NOT_FOUND, INVALID_REQUEST, format!("session not found: {why}; initialize a new one"))
}

/// Why a session is not found, when nothing more can be said.
pub const GONE: &str = "it ended or never existed";

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl Gateway {
    /// Seals what another replica needs to continue `session` into its id, once `initialize`
    /// succeeded, when the snapshot carries session keys.
    pub(super) async fn issue_ticket(&self, session: &ClientSession, caller: &Caller) {
        let Some(seal) = caller.snapshot.view.session_seal.as_ref() else { return };
        let Some(protocol_version) = session.protocol_version.get() else { return };
        let upstream_entries: Vec<_> = session.upstreams.lock().await.values().map(|e| e.upstream.clone()).collect();
        let mut upstreams = Vec::new();
        for upstream in upstream_entries {
            upstreams.extend(upstream.resumable().await);
        }
        let ticket = Ticket {
            user_id: session.user_id.clone(),
            target: match &session.scope {
                Scope::Aggregate => None,
                Scope::Target(name) => Some(name.clone()),
            },
            protocol_version: protocol_version.clone(),
            upstream_params: session.upstream_params.get().map(|(p, _)| p.to_string()).unwrap_or_default(),
            client: session.client.get().map(|(name, version)| (name.to_string(), version.to_string())),
            upstreams,
            issued_at: now(),
            identity: ticket::identity(&caller.user),
        };
        let _ = session.ticket.set(seal.seal(&session.id, &ticket, now()));
    }

    /// The session `id` names, resumed from its ticket on this replica (which does not hold
    /// it). Anything but a ticket of this user, for this endpoint, under a key still accepted,
    /// and not since deleted or recycled, is refused as an unknown session.
    pub(super) fn resume(&self, id: &str, caller: &Caller, scope: &Scope) -> Result<Arc<ClientSession>, Refusal> {
        let not_found = session_not_found;
        let nonce = ticket::nonce_of(id).ok_or_else(|| not_found(GONE))?;
        if let Some(why) = self.sessions.closed_because(nonce) {
            return Err(not_found(why));
        }
        if self.ended.lock().unwrap().contains_key(nonce) {
            return Err(not_found(DELETED));
        }
        let seal = caller.snapshot.view.session_seal.as_ref().ok_or_else(|| not_found(GONE))?;
        let max_age = self.settings.session_max_age.as_secs() as i64;
        let ticket = seal.open(id, now(), max_age).map_err(|refused| {
            tracing::info!(session = %super::session::short(id), %refused, "a session id was refused");
            not_found(&refused.to_string())
        })?;
        // Someone else's session, or another endpoint's, is not disclosed as such.
        let target = match scope {
            Scope::Aggregate => None,
            Scope::Target(name) => Some(name),
        };
        if ticket.user_id != caller.user.id || ticket.target.as_ref() != target {
            return Err(not_found(GONE));
        }
        if let Some(name) = target {
            if Gateway::granted(caller, name).is_none() {
                return Err(not_found(GONE));
            }
        }
        if self.sessions.len() >= self.settings.max_sessions {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                SERVER_ERROR,
                "this gateway holds its maximum of sessions; retry later",
            )
            .retry_after(1));
        }
        let session =
            ClientSession::with_id(nonce.to_string(), caller.user.id.clone(), scope.clone(), false, Default::default());
        session.identity.store(super::recycle::identity(&caller.user), std::sync::atomic::Ordering::Relaxed);
        let _ = session.protocol_version.set(ticket.protocol_version);
        let hash = client_hash(&ticket.upstream_params);
        let _ = session.upstream_params.set((ticket.upstream_params.into_boxed_str(), hash));
        if let Some((name, version)) = ticket.client {
            let _ = session.client.set((name.into_boxed_str(), version.into_boxed_str()));
        }
        let _ = session.ticket.set(id.to_string());
        // Upstream sessions opened before the user's role, groups or session generation changed
        // were opened with what the user was then: the session goes on with new ones, as a
        // recycle does on the replica that held it.
        if ticket.identity == ticket::identity(&caller.user) {
            *session.resume.lock().unwrap() = ticket.upstreams.into_iter().map(|u| (u.target.clone(), u)).collect();
        }
        let session = self.sessions.insert_if_absent(Arc::new(session));
        tracing::info!(session = %super::session::short(id), user = %caller.user.id, "MCP session resumed on this replica");
        Ok(session)
    }

    /// `session` (held here, and travelling) if its id is still sealed with a key the snapshot
    /// accepts; one whose key was retired since is ended.
    pub(super) fn still_accepted(
        &self,
        session: Arc<ClientSession>,
        caller: &Caller,
    ) -> Result<Arc<ClientSession>, Refusal> {
        let generation = session.ticket.get().and_then(|id| ticket::generation_of(id));
        let (Some(generation), Some(seal)) = (generation, caller.snapshot.view.session_seal.as_ref()) else {
            return Ok(session);
        };
        if seal.accepts(generation, now()) {
            return Ok(session);
        }
        let why = "it was sealed with a key that has been retired";
        self.sessions.close_because(&session.id, why);
        let closing = session.clone();
        tokio::spawn(async move { closing.detach().await });
        Err(session_not_found(why))
    }

    /// The rest of a reply stream the client lost (its `Last-Event-ID` names `target` and the
    /// upstream's event): fetched from the upstream session, which any replica can address,
    /// and relayed as the exchange would have (server→client requests get their routable ids).
    pub(super) async fn resume_stream(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        target: &str,
        upstream_event: String,
    ) -> Result<impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>, Refusal>
    {
        let in_scope = match &session.scope {
            Scope::Target(name) => name == target,
            Scope::Aggregate => true,
        };
        let granted = Gateway::granted(caller, target).filter(|_| in_scope && session.ticket.get().is_some());
        let Some(granted) = granted else {
            return Err(Refusal::bad_request("Last-Event-ID names no stream of this session"));
        };
        let upstream = self.upstream(session, caller, granted).await;
        if !upstream.shared() {
            return Err(Refusal::bad_request("Last-Event-ID names no stream of this session"));
        }
        let (sink, relayed) = crate::upstream::Sink::channel();
        let target_name = target.to_string();
        let replaying = upstream.clone();
        tokio::spawn(async move {
            if let Err(error) = replaying.replay(&upstream_event, &sink).await {
                tracing::info!(target = %replaying.target.name, %error, "the upstream could not resume a stream");
            }
        });
        let state = (relayed, self.clone(), session.clone(), target_name);
        Ok(futures::stream::unfold(state, |(mut relayed, gateway, session, target)| async move {
            loop {
                let (message, event) = relayed.recv().await?;
                // The response answers the client's own request id (forwarded unchanged);
                // anything else is relayed as the exchange relays it.
                let message = if crate::jsonrpc::is_response(&message) {
                    Some(message)
                } else {
                    gateway.relay(&session, &target, message)
                };
                if let Some(message) = message {
                    let mut sse = axum::response::sse::Event::default().event("message").data(message.to_string());
                    if let Some(event) = event {
                        sse = sse.id(event_id(&target, &event));
                    }
                    return Some((Ok(sse), (relayed, gateway, session, target)));
                }
            }
        }))
    }

    /// An upstream session the ticket carries is gone upstream: every replica using it finds
    /// the same, so the client session ends (404 to its client, who initialises a new one)
    /// rather than each replica opening an upstream session of its own.
    pub(super) fn upstream_session_ended(&self, session: &ClientSession) {
        if session.gone.set(UPSTREAM_ENDED).is_ok() {
            tracing::info!(session = %super::session::short(&session.id), "the session's upstream session ended; ending the session");
        }
        self.sessions.close_because(&session.id, UPSTREAM_ENDED);
        session.cancel.cancel();
    }

    /// Ends `session` for good, as its client's DELETE asks: its upstream sessions are closed,
    /// those it carried from another replica too, and its id is not resumed here again.
    pub(super) async fn end_session(self: &Arc<Self>, session: &Arc<ClientSession>, caller: &Caller) {
        self.sessions.close_because(&session.id, DELETED);
        if session.ticket.get().is_some() {
            // Reported to the control plane, which tells every other replica.
            let until = now() + self.settings.session_max_age.as_secs() as i64;
            self.remember_ended(&session.id, until, true);
        }
        let carried: Vec<String> = session.resume.lock().unwrap().keys().cloned().collect();
        for name in carried {
            if let Some(target) = Gateway::granted(caller, &name) {
                self.upstream(session, caller, target).await;
            }
        }
        session.close().await;
    }
}

/// The most ended sessions a data plane remembers (the soonest to expire are forgotten first).
const MAX_ENDED: usize = 100_000;

impl Gateway {
    fn remember_ended(&self, nonce: &str, until: i64, here: bool) {
        let now = now();
        let mut ended = self.ended.lock().unwrap();
        if ended.len() >= MAX_ENDED {
            ended.retain(|_, (until, _)| *until > now);
        }
        if ended.len() >= MAX_ENDED {
            if let Some(first) = ended.iter().min_by_key(|(_, (until, _))| *until).map(|(n, _)| n.clone()) {
                ended.remove(&first);
            }
        }
        let entry = ended.entry(nonce.to_string()).or_insert((until, here));
        entry.1 |= here;
    }

    /// Travelling sessions deleted here and not yet expired: reported to the control plane.
    pub(super) fn ended_here(&self) -> Vec<reflow_proto::snapshot::v1::EndedSession> {
        let now = now();
        let mut ended = self.ended.lock().unwrap();
        ended.retain(|_, (until, _)| *until > now);
        let mut here: Vec<_> = ended
            .iter()
            .filter(|(_, (_, here))| *here)
            .map(|(nonce, (until, _))| reflow_proto::snapshot::v1::EndedSession {
                nonce: nonce.clone(),
                until_unix: *until,
            })
            .collect();
        here.sort_by(|a, b| a.nonce.cmp(&b.nonce));
        here
    }

    /// Sessions deleted on other replicas: never resumed here, and let go if held.
    pub(super) fn sessions_ended_elsewhere(&self, ended: &[reflow_proto::snapshot::v1::EndedSession]) {
        for session in ended {
            self.remember_ended(&session.nonce, session.until_unix, false);
            if let Some(held) = self.sessions.close_because(&session.nonce, DELETED) {
                tracing::info!(session = %super::session::short(&held.id), "the session was deleted on another replica");
                // The replica that deleted it closed its upstream sessions.
                tokio::spawn(async move { held.detach().await });
            }
        }
    }
}

/// Why a session whose carried upstream session ended is not found.
pub const UPSTREAM_ENDED: &str =
    "its upstream session ended (deleted through another replica, or the upstream server restarted)";

/// Why a session deleted by its client is not found.
pub const DELETED: &str = "it was deleted";

const SERVER_REQUEST: &str = "reflow-srv~";

/// The id a server→client request of a travelling session gets: the target and the upstream's
/// id, so that the client's answer finds its way from any replica.
pub fn server_request_id(target: &str, upstream_id: &serde_json::Value) -> String {
    use base64::Engine as _;
    let text = serde_json::json!([target, upstream_id]).to_string();
    format!("{SERVER_REQUEST}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text))
}

/// The target and upstream id of a [`server_request_id`].
pub fn parse_server_request_id(id: &str) -> Option<(String, serde_json::Value)> {
    use base64::Engine as _;
    let encoded = id.strip_prefix(SERVER_REQUEST)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded).ok()?;
    let (target, upstream_id): (String, serde_json::Value) = serde_json::from_slice(&bytes).ok()?;
    (upstream_id.is_string() || upstream_id.is_number()).then_some((target, upstream_id))
}

const EVENT: &str = "r1e.";

/// The id a client sees for an upstream's event `upstream_event` of a shared upstream session:
/// the target and the upstream's id, so that a `Last-Event-ID` finds the rest of the stream
/// from any replica.
pub fn event_id(target: &str, upstream_event: &str) -> String {
    use base64::Engine as _;
    let text = serde_json::json!([target, upstream_event]).to_string();
    format!("{EVENT}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text))
}

/// The target and upstream event id of an [`event_id`].
pub fn parse_event_id(id: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(id.strip_prefix(EVENT)?).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_request_ids_name_their_target_and_upstream_id() {
        for upstream_id in [serde_json::json!(7), serde_json::json!("a-b")] {
            let id = server_request_id("everything", &upstream_id);
            assert_eq!(parse_server_request_id(&id), Some(("everything".to_string(), upstream_id)));
        }
        assert_eq!(parse_server_request_id("reflow-srv-1"), None);
        let event = event_id("everything", "stream-1_42");
        assert_eq!(parse_event_id(&event), Some(("everything".to_string(), "stream-1_42".to_string())));
        assert_eq!(parse_event_id("42"), None);
        assert_eq!(parse_server_request_id(&format!("{SERVER_REQUEST}bm90IGpzb24")), None);
    }
}
