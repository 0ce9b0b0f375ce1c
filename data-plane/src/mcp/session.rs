//! Client sessions: who owns them, what they negotiated, and the upstream sessions opened on
//! their behalf.
//!
//! A session id is 256 random bits (base64url) and is not a credential: every request still
//! authenticates, and a session answers only to the user who created it (anyone else gets the
//! same 404 as for an unknown id).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use base64::Engine as _;
use rand::RngCore;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::merged::CachedList;
use super::Scope;
use crate::upstream::Upstream;

/// Messages the client has not yet taken from its GET (or legacy SSE) stream, at most: past
/// this (or [`OUTBOUND_MAX_BYTES`]), messages unrelated to a request are dropped with a warning,
/// and a legacy session, whose every reply travels there, is closed.
pub const OUTBOUND_CAPACITY: usize = 256;
/// Bytes of those messages, at most.
pub const OUTBOUND_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Server→client requests one session may have waiting for its answer.
pub const MAX_PENDING: usize = 64;

#[derive(Debug)]
pub struct UpstreamEntry {
    /// The snapshot version the entry was checked against.
    pub version: String,
    pub upstream: Arc<Upstream>,
    /// Counts the entry among the target's sessions while it lives.
    pub held: super::health::Held,
}

/// A session's stream to the client: the GET stream, or the legacy SSE stream. Messages wait
/// there serialised, so what they hold is known and bounded.
#[derive(Debug)]
pub struct Outbound {
    pub sender: mpsc::Sender<String>,
    /// The receiving end, leased by the one open stream and returned when it closes.
    pub receiver: Mutex<Option<mpsc::Receiver<String>>>,
    /// Bytes sent and not yet taken by the stream.
    pub queued: AtomicUsize,
}

#[derive(Debug)]
pub struct ClientSession {
    pub id: String,
    pub user_id: String,
    pub scope: Scope,
    /// Opened through the legacy HTTP+SSE transport: every reply goes to the stream.
    pub legacy: bool,
    /// The protocol version `initialize` settled; unset until the session is initialised.
    pub protocol_version: OnceLock<String>,
    /// The `initialize` params upstream sessions are opened with (the client's requested
    /// version and capabilities), set when the client's `initialize` arrives: serialised (a
    /// JSON tree would cost an idle session more than everything else it holds), with its
    /// hash for merged-list keys.
    pub upstream_params: OnceLock<(Box<str>, u64)>,
    /// The client's `clientInfo` name and version, for audit records.
    pub client: OnceLock<(Box<str>, Box<str>)>,
    last_used: Mutex<Instant>,
    /// When the session was opened.
    pub opened: Instant,
    /// Messages for the client outside any POST stream; made on first use (most sessions
    /// never need one, and its buffer is most of an idle session's memory).
    outbound: OnceLock<Outbound>,
    /// Upstream sessions by target name. An async lock: creating one may close another.
    pub upstreams: tokio::sync::Mutex<HashMap<String, UpstreamEntry>>,
    /// Server→client requests awaiting the client's answer: gateway id → (target, upstream id,
    /// since when). At most [`MAX_PENDING`], none older than the request timeout.
    pub pending: Mutex<HashMap<String, (String, Value, Instant)>>,
    /// Client requests in flight: id key → (target name, what aborts the exchange), to route
    /// a cancellation upstream and stop waiting.
    pub inflight: Mutex<HashMap<String, (String, futures::future::AbortHandle)>>,
    /// Merged lists by method.
    pub lists: Mutex<HashMap<&'static str, CachedList>>,
    next_id: AtomicU64,
    /// The user's identity (role, groups, session generation) the upstream sessions were
    /// opened for, as [`super::recycle::identity`]; 0 until known.
    pub identity: AtomicU64,
    /// Ends the session's upstream sessions and relay tasks.
    pub cancel: CancellationToken,
    /// The `Mcp-Session-Id` of a session that travels ([`super::ticket`]): `id` is then its
    /// nonce. Unset for a session that lives on this replica only.
    pub ticket: OnceLock<String>,
    /// Upstream sessions the ticket carried that this replica has not used yet, by target.
    pub resume: Mutex<HashMap<String, super::ticket::UpstreamTicket>>,
    /// Why the session ended while a request was being answered (its client gets 404).
    pub gone: OnceLock<&'static str>,
    /// Held by the gateway for stateless-era clients ([`super::modern`]): no client names it,
    /// and what it would push to a client goes to its `subscriptions/listen` streams.
    pub bridged: bool,
    /// The `subscriptions/listen` streams of a bridge session, made on the first one.
    pub listeners: OnceLock<tokio::sync::broadcast::Sender<Arc<str>>>,
}

pub fn new_session_id() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl ClientSession {
    pub fn new(user_id: String, scope: Scope, legacy: bool, cancel: CancellationToken) -> Self {
        Self::with_id(new_session_id(), user_id, scope, legacy, cancel)
    }

    pub fn with_id(id: String, user_id: String, scope: Scope, legacy: bool, cancel: CancellationToken) -> Self {
        ClientSession {
            id,
            user_id,
            scope,
            legacy,
            protocol_version: OnceLock::new(),
            upstream_params: OnceLock::new(),
            client: OnceLock::new(),
            last_used: Mutex::new(Instant::now()),
            opened: Instant::now(),
            outbound: OnceLock::new(),
            upstreams: tokio::sync::Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            lists: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            identity: AtomicU64::new(0),
            cancel,
            ticket: OnceLock::new(),
            resume: Mutex::new(HashMap::new()),
            gone: OnceLock::new(),
            bridged: false,
            listeners: OnceLock::new(),
        }
    }

    /// Whether `header` (an `Mcp-Session-Id` or legacy `sessionId`) names this session: its
    /// ticket when it travels, its id otherwise.
    pub fn answers_to(&self, header: &str) -> bool {
        !self.bridged && self.ticket.get().map_or(self.id == header, |ticket| ticket == header)
    }

    /// The `Mcp-Session-Id` the client presents.
    pub fn header_id(&self) -> &str {
        self.ticket.get().unwrap_or(&self.id)
    }

    pub fn touch(&self) {
        *self.last_used.lock().unwrap() = Instant::now();
    }

    pub fn idle_for(&self) -> std::time::Duration {
        self.last_used.lock().unwrap().elapsed()
    }

    /// A fresh id for a request the gateway itself makes.
    pub fn next_id(&self, prefix: &str) -> String {
        format!("reflow-{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    pub fn next_number(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn outbound(&self) -> &Outbound {
        self.outbound.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(OUTBOUND_CAPACITY);
            Outbound { sender, receiver: Mutex::new(Some(receiver)), queued: AtomicUsize::new(0) }
        })
    }

    /// Remembers a server→client request handed to the client, forgetting expired ones and, past
    /// [`MAX_PENDING`], the oldest.
    pub fn remember_pending(&self, gateway_id: String, target: String, upstream_id: Value, ttl: std::time::Duration) {
        let mut pending = self.pending.lock().unwrap();
        pending.retain(|_, (_, _, at)| at.elapsed() < ttl);
        if pending.len() >= MAX_PENDING {
            if let Some(oldest) = pending.iter().min_by_key(|(_, (_, _, at))| *at).map(|(id, _)| id.clone()) {
                tracing::warn!(session = %short(&self.id), "the client leaves server requests unanswered; the oldest is forgotten");
                pending.remove(&oldest);
            }
        }
        pending.insert(gateway_id, (target, upstream_id, Instant::now()));
    }

    /// Whether a client stream is reading the session's messages now.
    pub fn streaming(&self) -> bool {
        self.outbound.get().is_some_and(|o| o.receiver.lock().unwrap().is_none())
    }

    /// Queues a message for the client's stream; `false` (the message dropped, with a warning)
    /// when the client is not reading: the queue holds [`OUTBOUND_CAPACITY`] messages or
    /// [`OUTBOUND_MAX_BYTES`] already.
    pub fn push(&self, message: Value) -> bool {
        self.push_text(message.to_string())
    }

    /// [`ClientSession::push`] for a message already serialised.
    pub fn push_text(&self, text: String) -> bool {
        if self.bridged {
            // Whoever listens now hears it; a stateless client has no stream to queue for.
            if let Some(listeners) = self.listeners.get() {
                let _ = listeners.send(text.into());
            }
            return true;
        }
        let outbound = self.outbound();
        let len = text.len();
        let queued = outbound.queued.fetch_add(len, Ordering::Relaxed);
        let sent = queued + len <= OUTBOUND_MAX_BYTES && outbound.sender.try_send(text).is_ok();
        if !sent {
            outbound.queued.fetch_sub(len, Ordering::Relaxed);
            tracing::warn!(session = %short(&self.id), "the client is not reading its stream; a message was dropped");
        }
        sent
    }

    /// Whether the client's stream has no room left (the client is not reading it).
    pub fn stream_full(&self) -> bool {
        let outbound = self.outbound();
        outbound.sender.capacity() == 0 || outbound.queued.load(Ordering::Relaxed) >= OUTBOUND_MAX_BYTES
    }

    /// A message taken off the stream's queue by the stream.
    pub fn taken(&self, text: &str) {
        self.outbound().queued.fetch_sub(text.len(), Ordering::Relaxed);
    }

    /// Ends the session: background tasks stop and upstream sessions are closed.
    pub async fn close(&self) {
        self.cancel.cancel();
        let upstreams: Vec<_> = self.upstreams.lock().await.drain().map(|(_, e)| e.upstream).collect();
        for upstream in upstreams {
            upstream.close().await;
        }
    }

    /// Lets go of the session here without ending it: a session that travels may go on on
    /// another replica, so its upstream sessions stay open there (STDIO processes, local to
    /// this replica, are let go). A session that does not travel is closed.
    pub async fn detach(&self) {
        if self.ticket.get().is_none() {
            return self.close().await;
        }
        self.cancel.cancel();
        let upstreams: Vec<_> = self.upstreams.lock().await.drain().map(|(_, e)| e.upstream).collect();
        for upstream in upstreams {
            upstream.detach().await;
        }
    }
}

/// The first characters of a session id (of a travelling id, its nonce's), enough to correlate
/// logs without logging the id.
pub fn short(id: &str) -> &str {
    let id = super::ticket::nonce_of(id).unwrap_or(id);
    &id[..id.len().min(8)]
}

/// The sessions this data plane holds, and how many each user holds (for
/// `mcp.max_sessions_per_user`), under one lock so the two always agree.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<SessionMap>,
}

impl Sessions {
    /// Observes each session's lifetime into `durations` when it is removed.
    pub fn observe_durations(&self, durations: Arc<reflow_common::telemetry::metrics::Histogram>) {
        self.map.lock().unwrap().durations = Some(durations);
    }
}

#[derive(Debug, Default)]
struct SessionMap {
    /// Session lifetimes, observed on removal.
    durations: Option<Arc<reflow_common::telemetry::metrics::Histogram>>,
    by_id: HashMap<String, Arc<ClientSession>>,
    per_user: HashMap<String, usize>,
    /// Why recently closed sessions were closed by the gateway (the last [`MAX_CLOSED`]), so
    /// their client's next request is told why rather than only that the session is gone.
    closed: std::collections::VecDeque<(String, &'static str)>,
}

/// A session slot taken by [`Sessions::reserve`]: filled with the session once it is open, or
/// given back when dropped unfilled.
#[derive(Debug)]
pub struct Reservation<'a> {
    sessions: &'a Sessions,
    user_id: String,
    filled: bool,
}

impl Reservation<'_> {
    /// Adds the opened session in the slot taken for it.
    pub fn fill(mut self, session: Arc<ClientSession>) {
        debug_assert_eq!(session.user_id, self.user_id);
        Sessions::put(&mut self.sessions.map.lock().unwrap(), session);
        self.filled = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.filled {
            self.sessions.release(&self.user_id);
        }
    }
}

/// Closed sessions whose reason is remembered.
const MAX_CLOSED: usize = 1024;

impl SessionMap {
    fn remove(&mut self, id: &str) -> Option<Arc<ClientSession>> {
        let session = self.by_id.remove(id)?;
        if let Some(durations) = &self.durations {
            durations.observe(session.opened.elapsed().as_secs_f64());
        }
        if let Some(count) = self.per_user.get_mut(&session.user_id) {
            *count -= 1;
            if *count == 0 {
                self.per_user.remove(&session.user_id);
            }
        }
        Some(session)
    }
}

impl Sessions {
    pub fn len(&self) -> usize {
        self.map.lock().unwrap().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many sessions `user_id` holds.
    pub fn count_of(&self, user_id: &str) -> usize {
        self.map.lock().unwrap().per_user.get(user_id).copied().unwrap_or(0)
    }

    pub fn insert(&self, session: Arc<ClientSession>) {
        let mut map = self.map.lock().unwrap();
        *map.per_user.entry(session.user_id.clone()).or_default() += 1;
        Sessions::put(&mut map, session);
    }

    /// Takes one of `user_id`'s session slots now, if `allowed` (told how many the user holds,
    /// reservations included) says so: opening a session awaits its `initialize`, and slots
    /// checked before and filled after that would let concurrent openings pass the share.
    pub fn reserve<E>(
        &self,
        user_id: &str,
        allowed: impl FnOnce(usize) -> Result<(), E>,
    ) -> Result<Reservation<'_>, E> {
        let mut map = self.map.lock().unwrap();
        allowed(map.per_user.get(user_id).copied().unwrap_or(0))?;
        *map.per_user.entry(user_id.to_string()).or_default() += 1;
        Ok(Reservation { sessions: self, user_id: user_id.to_string(), filled: false })
    }

    fn put(map: &mut SessionMap, session: Arc<ClientSession>) {
        if let Some(replaced) = map.by_id.insert(session.id.clone(), session) {
            // Ids are 256 random bits: never in practice, but the counts stay right.
            if let Some(count) = map.per_user.get_mut(&replaced.user_id) {
                *count -= 1;
            }
        }
    }

    fn release(&self, user_id: &str) {
        let mut map = self.map.lock().unwrap();
        if let Some(count) = map.per_user.get_mut(user_id) {
            *count -= 1;
            if *count == 0 {
                map.per_user.remove(user_id);
            }
        }
    }

    /// Adds `session` unless a session with its id is held already (two requests resuming it at
    /// once): returns the one held.
    pub fn insert_if_absent(&self, session: Arc<ClientSession>) -> Arc<ClientSession> {
        let mut map = self.map.lock().unwrap();
        if let Some(held) = map.by_id.get(&session.id) {
            return held.clone();
        }
        *map.per_user.entry(session.user_id.clone()).or_default() += 1;
        Sessions::put(&mut map, session.clone());
        session
    }

    /// The session with `id` if `user_id` owns it.
    pub fn get(&self, id: &str, user_id: &str) -> Option<Arc<ClientSession>> {
        let session = self.map.lock().unwrap().by_id.get(id).cloned()?;
        (session.user_id == user_id).then_some(session)
    }

    pub fn remove(&self, id: &str) -> Option<Arc<ClientSession>> {
        self.map.lock().unwrap().remove(id)
    }

    /// Removes a session the gateway closes itself, remembering `why` for its client.
    pub fn close_because(&self, id: &str, why: &'static str) -> Option<Arc<ClientSession>> {
        let mut map = self.map.lock().unwrap();
        let removed = map.remove(id);
        if removed.is_some() {
            if map.closed.len() >= MAX_CLOSED {
                map.closed.pop_front();
            }
            map.closed.push_back((id.to_string(), why));
        }
        removed
    }

    /// Why the gateway closed session `id`, if it did so recently.
    pub fn closed_because(&self, id: &str) -> Option<&'static str> {
        self.map.lock().unwrap().closed.iter().find(|(closed, _)| closed == id).map(|(_, why)| *why)
    }

    pub fn all(&self) -> Vec<Arc<ClientSession>> {
        self.map.lock().unwrap().by_id.values().cloned().collect()
    }

    /// Removes and returns sessions idle longer than `timeout` (a session with an open stream
    /// is not idle).
    pub fn expire(&self, timeout: std::time::Duration) -> Vec<Arc<ClientSession>> {
        let mut map = self.map.lock().unwrap();
        let expired: Vec<String> = map
            .by_id
            .iter()
            .filter(|(_, s)| s.idle_for() > timeout && !s.streaming())
            .map(|(id, _)| id.clone())
            .collect();
        expired.into_iter().filter_map(|id| map.remove(&id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_long_random_and_unique() {
        let ids: std::collections::HashSet<String> = (0..100_000).map(|_| new_session_id()).collect();
        assert_eq!(ids.len(), 100_000);
        assert!(ids.iter().all(|id| id.len() == 43));
    }

    #[test]
    fn a_session_answers_only_to_its_owner() {
        let sessions = Sessions::default();
        let session = Arc::new(ClientSession::new("alice".into(), Scope::Aggregate, false, CancellationToken::new()));
        sessions.insert(session.clone());
        assert!(sessions.get(&session.id, "alice").is_some());
        assert!(sessions.get(&session.id, "bob").is_none());
        assert!(sessions.get("unknown", "alice").is_none());
    }
}
