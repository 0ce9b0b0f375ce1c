//! The MCP endpoints over HTTP: Streamable HTTP (session era) and the legacy HTTP+SSE
//! transport, on `/mcp` (every target) and `/mcp/{target}` (one target).
//!
//! The request path, in order: edge checks (Host, Origin, content type, body size) →
//! snapshot present → authenticate → session → [`Gateway::handle`] → JSON, SSE or 202.
//! Every refusal carries a JSON-RPC error body with the status the specification prescribes.
//!
//! Legacy clients `GET` the same URL without a session header: they receive an `endpoint`
//! event naming `?sessionId=…` on the same path, POST there, and read every reply from the
//! stream. The session ends when that stream closes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::Stream;
use serde_json::Value;
use tokio::sync::mpsc;

use super::error::{McpError, Refusal};
use super::exchange::Forwarding;
use super::gateway::{Caller, Gateway, Reply};
use super::session::ClientSession;
use super::Scope;
use crate::audit::Trail;
use crate::auth::authenticate;
use crate::jsonrpc::{self, Message, INVALID_REQUEST, PARSE_ERROR, SERVER_ERROR};
use reflow_common::server::{read_body, BodyError, BodyTimeout};
use reflow_common::telemetry::trace::SpanContext;

/// The body timeout when the listener did not set one (a router served by other means).
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub fn routes(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/mcp", post(post_all).get(get_all).delete(delete_all))
        .route("/mcp/{target}", post(post_one).get(get_one).delete(delete_one))
        .with_state(gateway)
}

async fn post_all(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    post_mcp(gateway, Scope::Aggregate, request).await.unwrap_or_else(IntoResponse::into_response)
}

async fn post_one(State(gateway): State<Arc<Gateway>>, Path(target): Path<String>, request: Request) -> Response {
    post_mcp(gateway, Scope::Target(target), request).await.unwrap_or_else(IntoResponse::into_response)
}

async fn get_all(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    get_mcp(gateway, Scope::Aggregate, request).await.unwrap_or_else(IntoResponse::into_response)
}

async fn get_one(State(gateway): State<Arc<Gateway>>, Path(target): Path<String>, request: Request) -> Response {
    get_mcp(gateway, Scope::Target(target), request).await.unwrap_or_else(IntoResponse::into_response)
}

async fn delete_all(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    delete_mcp(gateway, Scope::Aggregate, request).await.unwrap_or_else(IntoResponse::into_response)
}

async fn delete_one(State(gateway): State<Arc<Gateway>>, Path(target): Path<String>, request: Request) -> Response {
    delete_mcp(gateway, Scope::Target(target), request).await.unwrap_or_else(IntoResponse::into_response)
}

/// Edge checks, snapshot and authentication: the caller, or the response refusing them.
fn admit(gateway: &Gateway, parts: &Parts) -> Result<Caller, Refusal> {
    check_host_and_origin(gateway, parts)?;
    let Some(snapshot) = gateway.state.load() else {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            SERVER_ERROR,
            "this gateway has no configuration snapshot yet; try again shortly",
        )
        .retry_after(5));
    };
    let user = match authenticate(&snapshot.view, &parts.headers, parts.uri.query()) {
        Ok(user) => user.clone(),
        Err(failure) => {
            return Err(Refusal::unauthenticated(failure.to_string()));
        }
    };
    // Before any work for the request: one user's flood costs everyone else nothing more.
    gateway.shares.admit(&user.id).map_err(Refusal::over_share)?;
    Ok(Caller { snapshot, user, kubernetes: gateway.settings.kubernetes.is_some() })
}

/// DNS-rebinding and cross-origin protection (see [`super::origin`]).
fn check_host_and_origin(gateway: &Gateway, parts: &Parts) -> Result<(), Refusal> {
    let headers = &parts.headers;
    let local = parts.extensions.get::<reflow_common::server::LocalAddr>().map(|a| a.0.ip());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if !super::origin::host_allowed(&gateway.settings.allowed_hosts, host, local) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            INVALID_REQUEST,
            "this host name is not served here (mcp.allowed_hosts names the host names clients may use)",
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        if !super::origin::origin_allowed(&gateway.settings.allowed_origins, origin, local) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                INVALID_REQUEST,
                "requests from this Origin are not allowed (cors.allowed_origins names the allowed ones)",
            ));
        }
    }
    Ok(())
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, needle: &str) -> bool {
    headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).any(|v| v.to_ascii_lowercase().contains(needle))
}

fn session_of(
    gateway: &Gateway,
    scope: &Scope,
    caller: &Caller,
    parts: &Parts,
) -> Result<Option<Arc<ClientSession>>, Refusal> {
    let from_header = parts.headers.get(SESSION_HEADER).map(|v| v.to_str().unwrap_or_default().to_string());
    let from_query = legacy_session_id(parts);
    let Some(id) = from_header.or(from_query) else { return Ok(None) };
    // A travelling id is held under its nonce; any other under itself.
    let key = super::ticket::nonce_of(&id);
    let held = gateway.sessions.get(key.unwrap_or(&id), &caller.user.id);
    match held.filter(|s| s.scope == *scope && s.answers_to(&id)) {
        Some(session) if key.is_some() => gateway.still_accepted(session, caller).map(Some),
        Some(session) => Ok(Some(session)),
        None if key.is_some() => gateway.resume(&id, caller, scope).map(Some),
        None => {
            let why = gateway.sessions.closed_because(&id).unwrap_or(super::resume::GONE);
            Err(super::resume::session_not_found(why))
        }
    }
}

fn legacy_session_id(parts: &Parts) -> Option<String> {
    parts.uri.query()?.split('&').find_map(|pair| pair.strip_prefix("sessionId=")).map(str::to_string)
}

async fn post_mcp(gateway: Arc<Gateway>, scope: Scope, request: Request) -> Result<Response, Refusal> {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let caller = admit(&gateway, &parts)?;
    if gateway.audit().is_some_and(|recorder| recorder.refusing()) {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            SERVER_ERROR,
            "this gateway cannot keep audit records right now (its audit spool is full and audit.on_full is refuse); \
             requests resume once the control plane has taken the waiting records",
        )
        .retry_after(5));
    }
    if !header_has(&parts.headers, header::CONTENT_TYPE, "application/json") {
        return Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            INVALID_REQUEST,
            "Content-Type must be application/json",
        ));
    }
    let accept_any = !parts.headers.contains_key(header::ACCEPT) || header_has(&parts.headers, header::ACCEPT, "*/*");
    let accepts_sse = accept_any || header_has(&parts.headers, header::ACCEPT, "text/event-stream");
    let accepts_json = accept_any || header_has(&parts.headers, header::ACCEPT, "application/json");
    if !accepts_sse && !accepts_json {
        return Err(Refusal::new(
            StatusCode::NOT_ACCEPTABLE,
            INVALID_REQUEST,
            "Accept must include application/json and text/event-stream",
        ));
    }
    let limit = gateway.settings.max_body_bytes;
    let too_large = || {
        Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, INVALID_REQUEST, format!("the request body exceeds {limit} bytes"))
    };
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    let timeout = parts.extensions.get::<BodyTimeout>().map_or(BodyTimeout(DEFAULT_BODY_TIMEOUT).0, |t| t.0);
    let bytes = read_body(body, limit, timeout).await.map_err(|error| match error {
        BodyError::TooLarge(_) => too_large(),
        BodyError::Timeout(_) => Refusal::new(StatusCode::REQUEST_TIMEOUT, INVALID_REQUEST, error.to_string()),
        BodyError::Broken => Refusal::bad_request(error.to_string()),
    })?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, PARSE_ERROR, format!("the body is not valid JSON: {e}")))?;
    // Its version header (or, without one, its `_meta`) says which era the request is of.
    let modern = super::modern::is_modern(&parts.headers, &value);
    let request_id = value.get("id").filter(|id| id.is_string() || id.is_i64() || id.is_u64()).cloned();
    let message = Message::classify(value)
        .map_err(|why| Refusal::bad_request(why).for_request(request_id.as_ref().unwrap_or(&Value::Null)))?;

    // From here on, a request has its record: counted, traced and audited when the trail is
    // dropped.
    let mut trail = match &message {
        Message::Request { id, method, params } => {
            let from_meta = params.as_ref().and_then(|p| p.pointer("/_meta/traceparent")).and_then(Value::as_str);
            let from_header = || parts.headers.get("traceparent").and_then(|v| v.to_str().ok());
            let parent = from_meta.and_then(SpanContext::parse).or_else(|| from_header().and_then(SpanContext::parse));
            let request_id = Some(match id {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            });
            let recorder = gateway.audit();
            let mut trail =
                Trail::begin(&gateway.telemetry, recorder, parts.uri.path(), method, started, parent, request_id);
            if let Some(record) = trail.record() {
                record.user_id = Some(caller.user.id.clone());
                record.snapshot_version = Some(caller.snapshot.version.clone());
                if let Scope::Target(name) = &scope {
                    record.target = Some(name.clone());
                }
            }
            let authorization = parts.headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
            if let Ok(token) = reflow_common::bearer::bearer_token(authorization, None) {
                trail.mask_token(token);
            }
            trail
        }
        _ => Trail::off(),
    };
    let span = trail.trace_id().map(|trace_id| tracing::info_span!("mcp", trace_id = %trace_id));
    let exchanging = async {
        if modern {
            super::modern::exchange(&gateway, scope, caller, &parts, message, accepts_sse, &mut trail).await
        } else {
            exchange(&gateway, scope, caller, &parts, message, (accepts_sse, accepts_json), &mut trail).await
        }
    };
    let exchanged = match span {
        Some(span) => tracing::Instrument::instrument(exchanging, span).await,
        None => exchanging.await,
    };
    // Every refusal of a request names it.
    let exchanged = exchanged.map_err(|refusal| refusal.for_request(request_id.as_ref().unwrap_or(&Value::Null)));
    if let Err(refusal) = &exchanged {
        trail.refused(refusal.status.as_u16(), refusal.code);
    }
    exchanged
}

/// What the audit record learns of the session a request belongs to.
fn note_session(trail: &mut Trail, session: &ClientSession) {
    if let Some(record) = trail.record() {
        record.session_id = Some(session.id.clone());
        record.protocol_version = session.protocol_version.get().cloned();
        if let Some((name, version)) = session.client.get() {
            record.client_name = Some(name.to_string());
            record.client_version = Some(version.to_string());
        }
    }
}

/// A classified message with an authenticated caller: its session, then the gateway's answer.
async fn exchange(
    gateway: &Arc<Gateway>,
    scope: Scope,
    caller: Caller,
    parts: &Parts,
    message: Message,
    (accepts_sse, accepts_json): (bool, bool),
    trail: &mut Trail,
) -> Result<Response, Refusal> {
    let session = match session_of(gateway, &scope, &caller, parts)? {
        Some(session) => session,
        None => {
            let Message::Request { method, .. } = &message else {
                return Err(Refusal::bad_request("Mcp-Session-Id header is required"));
            };
            if method != "initialize" {
                return Err(Refusal::bad_request("Mcp-Session-Id header is required"));
            }
            return open_session(gateway.clone(), scope, caller, message, trail).await;
        }
    };
    note_session(trail, &session);
    let request_id = match &message {
        Message::Request { id, .. } => id.clone(),
        _ => Value::Null,
    };
    if session.legacy && session.stream_full() {
        close_unread(gateway, &session).await;
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            SERVER_ERROR,
            format!("this session's SSE stream is not being read, so {}", UNREAD.trim_start_matches("it ")),
        ));
    }
    let share = gateway.shares.begin(&caller.user.id).map_err(Refusal::over_share)?;
    let mut reply = gateway.handle(&session, &caller, message, trail).await;
    if let (Some(why), Reply::Now(_) | Reply::Serialized(_) | Reply::Invalid(_)) = (session.gone.get(), &reply) {
        return Err(super::resume::session_not_found(why));
    }
    if let Reply::Stream(forwarding) = &mut reply {
        forwarding.hold(share);
    } else {
        drop(share);
    }
    if session.legacy {
        // Every reply of a legacy session travels on its SSE stream, whose queue is bounded: a
        // client that stops reading has its session closed, instead of replies piling up.
        let delivered = match reply {
            Reply::Now(message) | Reply::Invalid(message) => {
                trail.answered(202, &message);
                session.push(message)
            }
            Reply::Serialized(text) => {
                trail.answered(202, &Value::Null);
                session.push_text(text)
            }
            Reply::Stream(forwarding) => {
                let mut messages = forwarding.detach();
                let (gateway, session) = (gateway.clone(), session.clone());
                tokio::spawn(async move {
                    while let Some((message, _)) = messages.recv().await {
                        if !session.push(message) {
                            close_unread(&gateway, &session).await;
                            break;
                        }
                    }
                });
                true
            }
            Reply::Accepted => true,
        };
        if !delivered {
            close_unread(gateway, &session).await;
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                SERVER_ERROR,
                "this session's SSE stream is not being read; the session is closed",
            ));
        }
        return Ok((StatusCode::ACCEPTED, "Accepted").into_response());
    }
    Ok(match reply {
        Reply::Accepted => StatusCode::ACCEPTED.into_response(),
        Reply::Invalid(message) => {
            trail.answered(400, &message);
            (StatusCode::BAD_REQUEST, Json(message)).into_response()
        }
        Reply::Now(message) => {
            trail.answered(200, &message);
            Json(message).into_response()
        }
        Reply::Serialized(text) => {
            trail.answered(200, &Value::Null);
            ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], text).into_response()
        }
        Reply::Stream(forwarding) => stream_reply(session, request_id, forwarding, accepts_sse, accepts_json).await,
    })
}

const UNREAD: &str = "it was closed because its SSE stream was not being read";

/// Ends a legacy session whose client stopped reading its stream.
async fn close_unread(gateway: &Gateway, session: &ClientSession) {
    if gateway.sessions.close_because(&session.id, UNREAD).is_some() {
        tracing::warn!(session = %super::session::short(&session.id), "closing a legacy SSE session whose client is not reading");
    }
    session.close().await;
}

/// The refusal of a new session by a data plane that is shutting down.
fn draining() -> Refusal {
    Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        SERVER_ERROR,
        "this data plane is shutting down and opens no new sessions; retry (another replica will serve you)",
    )
    .retry_after(1)
}

/// `initialize` without a session: a new session, kept only when initialisation succeeds.
async fn open_session(
    gateway: Arc<Gateway>,
    scope: Scope,
    caller: Caller,
    message: Message,
    trail: &mut Trail,
) -> Result<Response, Refusal> {
    if let Scope::Target(name) = &scope {
        // A target the user has no grant on is answered like one that does not exist.
        if Gateway::granted(&caller, name).is_none() {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                INVALID_REQUEST,
                format!("no target named {name:?} is served here"),
            ));
        }
    }
    if gateway.draining.is_cancelled() {
        return Err(draining());
    }
    // The slot is taken before `initialize` is awaited, so concurrent openings cannot pass the
    // user's share.
    let reservation = gateway
        .sessions
        .reserve(&caller.user.id, |held| gateway.shares.may_open_session(held))
        .map_err(Refusal::over_share)?;
    if gateway.sessions.len() >= gateway.settings.max_sessions {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            SERVER_ERROR,
            "this gateway holds its maximum of sessions; retry later",
        ));
    }
    // With session keys in the snapshot the session travels: its id is a ticket any replica
    // can resume, and its nonce names it here.
    let id = match caller.snapshot.view.session_seal {
        Some(_) => super::ticket::new_nonce(),
        None => super::session::new_session_id(),
    };
    let session = Arc::new(ClientSession::with_id(id, caller.user.id.clone(), scope, false, Default::default()));
    session.identity.store(super::recycle::identity(&caller.user), std::sync::atomic::Ordering::Relaxed);
    let reply = match gateway.handle(&session, &caller, message, trail).await {
        Reply::Now(reply) => reply,
        _ => unreachable!("initialize is answered at once"),
    };
    note_session(trail, &session);
    trail.answered(200, &reply);
    if reply.get("result").is_none() {
        if let Some(record) = trail.record() {
            record.session_id = None;
        }
        session.close().await;
        return Ok(Json(reply).into_response());
    }
    gateway.issue_ticket(&session, &caller).await;
    reservation.fill(session.clone());
    let mut response = Json(reply).into_response();
    response
        .headers_mut()
        .insert(SESSION_HEADER, HeaderValue::from_str(session.header_id()).expect("session ids are header-safe"));
    Ok(response)
}

/// Answers with JSON when the response comes first (the common case, and the cheaper one),
/// and switches to SSE when the request relays messages first and the client accepts SSE.
/// A request the client cancelled ends without an upstream response; a JSON reply still needs a
/// body, so it gets an error the client will ignore.
fn cancelled(id: Value) -> Response {
    Json(McpError::Cancelled.into_jsonrpc(id)).into_response()
}

async fn stream_reply(
    session: Arc<ClientSession>,
    id: Value,
    mut forwarding: Forwarding,
    accepts_sse: bool,
    accepts_json: bool,
) -> Response {
    let Some((first, first_event)) = forwarding.next_event().await else {
        return cancelled(id);
    };
    if let Some(why) = session.gone.get() {
        return super::resume::session_not_found(why).into_response();
    }
    if jsonrpc::is_response(&first) && accepts_json {
        return Json(first).into_response();
    }
    if accepts_sse {
        // The response body drives the rest of the exchange.
        let rest = futures::stream::unfold(forwarding, |mut forwarding| async move {
            forwarding.next_event().await.map(|relayed| (relayed, forwarding))
        });
        let first = futures::stream::once(async { (first, first_event) });
        let events = futures::StreamExt::map(futures::StreamExt::chain(first, rest), |(message, id)| {
            Ok::<_, Infallible>(with_id(event(&message), id))
        });
        return sse(events);
    }
    // JSON only: what comes before the response goes to the session's stream.
    let mut next = Some(first);
    while let Some(message) = next {
        if jsonrpc::is_response(&message) {
            return Json(message).into_response();
        }
        session.push(message);
        next = forwarding.next().await;
    }
    cancelled(id)
}

/// An SSE event with its id, when it has one a client can resume after.
fn with_id(event: Event, id: Option<String>) -> Event {
    match id {
        Some(id) => event.id(id),
        None => event,
    }
}

fn event(message: &Value) -> Event {
    Event::default().event("message").data(message.to_string())
}

fn text_event(text: String) -> Event {
    Event::default().event("message").data(text)
}

pub(super) fn sse(events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response()
}

/// Holds a session's outbound receiver while a stream reads it, and gives it back (or ends a
/// legacy session) when the stream is dropped.
struct Lease {
    session: Arc<ClientSession>,
    messages: Option<mpsc::Receiver<String>>,
    /// Set for legacy sessions, which live exactly as long as their stream.
    ends: Option<Arc<Gateway>>,
    /// Ends the stream when the data plane drains.
    draining: tokio_util::sync::CancellationToken,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // A legacy session ends with its stream: its messages have nowhere left to go, and
        // dropping them lets whatever is still sending stop.
        if let (Some(messages), None) = (self.messages.take(), &self.ends) {
            *self.session.outbound().receiver.lock().unwrap() = Some(messages);
        }
        if let Some(gateway) = self.ends.take() {
            gateway.sessions.remove(&self.session.id);
            let session = self.session.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { session.close().await });
            }
        }
    }
}

fn lease_stream(lease: Lease, first: Option<Event>) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    let rest = futures::stream::unfold(lease, |mut lease| async move {
        let cancelled = lease.session.cancel.clone();
        let draining = lease.draining.clone();
        let text = tokio::select! {
            _ = cancelled.cancelled() => None,
            // A client's stream ends when its data plane drains; it reconnects elsewhere.
            _ = draining.cancelled() => None,
            text = lease.messages.as_mut()?.recv() => text,
        }?;
        lease.session.taken(&text);
        lease.session.touch();
        Some((Ok(text_event(text)), lease))
    });
    futures::StreamExt::chain(futures::stream::iter(first.map(Ok)), rest)
}

/// A GET or DELETE of a client of the stateless era, which has neither streams nor sessions.
fn of_the_stateless_era(parts: &Parts) -> bool {
    parts
        .headers
        .get(VERSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| super::modern::MODERN_VERSIONS.contains(&v))
}

async fn get_mcp(gateway: Arc<Gateway>, scope: Scope, request: Request) -> Result<Response, Refusal> {
    let (parts, _) = request.into_parts();
    let caller = admit(&gateway, &parts)?;
    if of_the_stateless_era(&parts) {
        return Ok(super::modern::no_streams());
    }
    if !header_has(&parts.headers, header::ACCEPT, "text/event-stream") {
        return Err(Refusal::new(StatusCode::NOT_ACCEPTABLE, INVALID_REQUEST, "Accept must include text/event-stream"));
    }
    if let Some(session) = session_of(&gateway, &scope, &caller, &parts)? {
        let last = parts.headers.get("last-event-id").and_then(|v| v.to_str().ok());
        if let Some((target, upstream_event)) = last.and_then(super::resume::parse_event_id) {
            let events = gateway.resume_stream(&session, &caller, &target, upstream_event).await?;
            return Ok(sse(events));
        }
        let Some(messages) = session.outbound().receiver.lock().unwrap().take() else {
            return Err(Refusal::new(StatusCode::CONFLICT, INVALID_REQUEST, "this session already has an open stream"));
        };
        session.touch();
        return Ok(sse(lease_stream(
            Lease { session, messages: Some(messages), ends: None, draining: gateway.draining.clone() },
            None,
        )));
    }
    // The legacy HTTP+SSE transport.
    if gateway.draining.is_cancelled() {
        return Err(draining());
    }
    if let Scope::Target(name) = &scope {
        if Gateway::granted(&caller, name).is_none() {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                INVALID_REQUEST,
                format!("no target named {name:?} is served here"),
            ));
        }
    }
    gateway.shares.may_open_session(gateway.sessions.count_of(&caller.user.id)).map_err(Refusal::over_share)?;
    if gateway.sessions.len() >= gateway.settings.max_sessions {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            SERVER_ERROR,
            "this gateway holds its maximum of sessions",
        ));
    }
    let session = Arc::new(ClientSession::new(caller.user.id.clone(), scope, true, Default::default()));
    session.identity.store(super::recycle::identity(&caller.user), std::sync::atomic::Ordering::Relaxed);
    let messages = session.outbound().receiver.lock().unwrap().take();
    gateway.sessions.insert(session.clone());
    let endpoint = Event::default().event("endpoint").data(format!("{}?sessionId={}", parts.uri.path(), session.id));
    Ok(sse(lease_stream(
        Lease { session, messages, ends: Some(gateway.clone()), draining: gateway.draining.clone() },
        Some(endpoint),
    )))
}

async fn delete_mcp(gateway: Arc<Gateway>, scope: Scope, request: Request) -> Result<Response, Refusal> {
    let (parts, _) = request.into_parts();
    let caller = admit(&gateway, &parts)?;
    if of_the_stateless_era(&parts) {
        return Ok(super::modern::no_streams());
    }
    let Some(session) = session_of(&gateway, &scope, &caller, &parts)? else {
        return Err(Refusal::bad_request("Mcp-Session-Id header is required"));
    };
    gateway.end_session(&session, &caller).await;
    Ok(Response::builder().status(StatusCode::NO_CONTENT).body(Body::empty()).expect("a static response builds"))
}
