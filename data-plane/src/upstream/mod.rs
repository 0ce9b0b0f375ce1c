//! Upstream MCP servers, one enum over transports.
//!
//! An [`Upstream`] is the gateway's session with one target on behalf of one client session:
//! initialised lazily on first use with the client's capabilities, re-initialised when the
//! upstream forgets the session (404), and reconnected after the connection is lost. HTTP
//! connections are pooled by the shared `reqwest::Client`.
//!
//! # Layout
//! - [`streamable`]: Streamable HTTP (POST per message, JSON or SSE replies, GET stream).
//! - [`sse`]: the legacy HTTP+SSE transport.
//! - [`stdio`]: child processes, pooled by target and isolation key.
//! - [`kubernetes`]: a pod per isolation key through the operator's `MCPInstance`s, spoken to
//!   over Streamable HTTP.
//! - [`multiplex`]: how sessions share one STDIO process without touching each other's requests.
//! - [`launch`]: the launcher that sets a STDIO server's resource limits and becomes it.
//! - [`event_stream`]: the incremental `text/event-stream` parser both HTTP transports use.
//!
//! Every message an upstream sends is read with a byte cap (`mcp.max_response_bytes`): a JSON
//! body, an SSE event or a STDIO line past it is refused with [`UpstreamError::TooLarge`]
//! rather than held in memory whole.

pub mod event_stream;
pub mod kubernetes;
pub mod launch;
pub mod multiplex;
pub mod sse;
pub mod stdio;
pub mod streamable;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use axum::http::HeaderMap;
use reflow_common::model::TransportType;
use reflow_proto::resources::Target;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::credentials::Injection;
use crate::jsonrpc;

/// Where a request's intermediate messages (its progress, its server→client requests) go:
/// bounded, because the reader that fills it (a shared STDIO process's, an SSE stream's) must
/// never wait on one slow client, nor hold without limit what that client does not read.
#[derive(Debug, Clone)]
pub struct Sink(mpsc::Sender<Relayed>);

/// A relayed message and the upstream's event id for it (Streamable HTTP streams may name
/// their events, so that a reader can resume after one).
pub type Relayed = (Value, Option<String>);

/// Messages a request's stream holds before more are dropped.
pub const RELAY_CAPACITY: usize = 256;

impl Sink {
    pub fn channel() -> (Sink, mpsc::Receiver<Relayed>) {
        let (sender, receiver) = mpsc::channel(RELAY_CAPACITY);
        (Sink(sender), receiver)
    }

    /// Passes `message` on; drops it (with a warning) when the request's stream is full or gone.
    pub fn send(&self, message: Value) -> bool {
        self.send_event(message, None)
    }

    /// [`Sink::send`] for a message the upstream sent as the event `event_id`.
    pub fn send_event(&self, message: Value, event_id: Option<String>) -> bool {
        match self.0.try_send((message, event_id)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("a request's client is {RELAY_CAPACITY} messages behind; a relayed message was dropped");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Why an upstream exchange failed. Messages never carry URLs or credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream session expired")]
    SessionExpired,
    #[error("could not reach the upstream ({0})")]
    Unreachable(String),
    #[error("the upstream answered HTTP {0}")]
    Status(u16),
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the upstream closed the connection before answering")]
    Disconnected,
    #[error("the upstream sent an invalid message: {0}")]
    Protocol(String),
    #[error("the upstream refused to initialise: {0}")]
    Refused(String),
    #[error("the target's URL or command is missing or invalid")]
    BadUrl,
    #[error("the upstream's reply exceeds {0} bytes (mcp.max_response_bytes)")]
    TooLarge(usize),
    #[error("the target's kubernetes instance is not available: {0}")]
    Instance(String),
    /// An upstream session a session ticket carries is gone: not replaced, because other
    /// replicas share it (see [`Upstream::carried`]).
    #[error("the upstream session ended")]
    SharedSessionEnded,
}

/// The default of `mcp.max_response_bytes`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// How much of an error body (a non-2xx reply) is read.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Reads a response body whole, but never more than `limit` bytes.
/// The trace context a message carries in `params._meta.traceparent`, also as the HTTP header
/// (W3C Trace Context), for upstreams that trace at the transport.
pub(crate) fn with_traceparent(request: reqwest::RequestBuilder, message: &Value) -> reqwest::RequestBuilder {
    let context = message.pointer("/params/_meta/traceparent").and_then(Value::as_str);
    match context.and_then(reflow_common::telemetry::trace::SpanContext::parse) {
        Some(context) => request.header("traceparent", context.traceparent()),
        None => request,
    }
}

pub(crate) async fn read_capped(response: reqwest::Response, limit: usize) -> Result<Vec<u8>, UpstreamError> {
    if response.content_length().is_some_and(|length| length > limit as u64) {
        return Err(UpstreamError::TooLarge(limit));
    }
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| UpstreamError::Unreachable(describe(&e)))?;
        if body.len() + chunk.len() > limit {
            return Err(UpstreamError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The start of an error body: enough to tell a JSON-RPC error or a forgotten session.
pub(crate) async fn read_error_body(response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(Ok(chunk)) = chunks.next().await {
        let room = MAX_ERROR_BODY - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    body
}

/// Gives each [`Upstream`] (one per client session and target) its own owner id, which a
/// shared STDIO process routes by.
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// Which waiting request a message from an upstream that is not a reply belongs to, given each
/// waiting request's progress token and sink. Progress goes to the request holding its token. A
/// server→client request (sampling, elicitation) made while exactly one request is in flight
/// belongs to that request, so the client sees it on the same stream. Anything else is
/// unrelated to a request (`None`).
pub(crate) fn owner_of<'w>(
    message: &Value,
    waiting: impl ExactSizeIterator<Item = (Option<&'w Value>, Option<&'w Sink>)>,
) -> Option<Sink> {
    let mut waiting = waiting;
    if message.get("method").and_then(Value::as_str) == Some("notifications/progress") {
        let token = message.pointer("/params/progressToken");
        return waiting.find(|(t, _)| t.is_some() && *t == token).and_then(|(_, sink)| sink.cloned());
    }
    if message.get("id").is_some() && waiting.len() == 1 {
        return waiting.next().and_then(|(_, sink)| sink.cloned());
    }
    None
}

/// A reqwest error without its URL (which may carry a `BASE_URL` credential).
fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection refused or unreachable"
    } else if error.is_body() || error.is_decode() {
        "the response body broke off"
    } else {
        "request failed"
    };
    kind.to_string()
}

/// Settings shared by every upstream.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// The most bytes one message from the upstream may take (`mcp.max_response_bytes`).
    pub max_message_bytes: usize,
}

/// A connected transport.
#[derive(Debug, Clone)]
enum Transport {
    Streamable(streamable::Connection),
    Sse(sse::Connection),
    Stdio(Arc<stdio::Process>),
}

/// Where a STDIO target's process comes from: the pool, the key it is shared under, and the
/// env it gets.
#[derive(Debug, Clone)]
pub struct StdioBinding {
    pub pool: Arc<stdio::Pool>,
    pub key: stdio::ProcessKey,
    pub env: std::collections::BTreeMap<String, String>,
}

impl PartialEq for StdioBinding {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.pool, &other.pool) && self.key == other.key && self.env == other.env
    }
}

#[derive(Debug)]
struct Live {
    transport: Transport,
    initialize_result: Value,
}

/// The gateway's session with one target for one client session.
#[derive(Debug)]
pub struct Upstream {
    pub target: Target,
    pub injection: Injection,
    /// Set for STDIO targets.
    pub stdio: Option<StdioBinding>,
    /// Set for kubernetes targets.
    pub kubernetes: Option<kubernetes::KubernetesBinding>,
    http: reqwest::Client,
    settings: UpstreamSettings,
    /// `initialize` params sent upstream: the client's protocol version and capabilities.
    initialize_params: Value,
    /// Messages unrelated to a request go here (the client session's inbox).
    inbox: mpsc::Sender<Value>,
    /// The connection once initialised. The lock is held while connecting, so concurrent
    /// first requests share one `initialize`.
    live: tokio::sync::Mutex<Option<Arc<Live>>>,
    /// Ends this upstream's background tasks (GET listener, SSE reader); a child of the
    /// client session's token.
    cancel: CancellationToken,
    /// Who this session is to a shared STDIO process.
    owner: multiplex::Owner,
    /// An upstream session opened before, on this replica or another, to adopt instead of
    /// initialising a new one.
    resume: std::sync::Mutex<Option<crate::mcp::ticket::UpstreamTicket>>,
    /// The upstream session is carried in a session ticket, so other replicas may use it too:
    /// when it expires it is not replaced behind their backs (the client session ends instead).
    carried: std::sync::atomic::AtomicBool,
    /// Speak the stateless era to an upstream that offers it (for a client of that era);
    /// otherwise the session era first, the stateless one only when the upstream refuses it.
    prefer_stateless: bool,
}

impl Upstream {
    #[allow(clippy::too_many_arguments)] // one constructor, called from one place
    pub fn new(
        target: Target,
        injection: Injection,
        stdio: Option<StdioBinding>,
        kubernetes: Option<kubernetes::KubernetesBinding>,
        http: reqwest::Client,
        settings: UpstreamSettings,
        initialize_params: Value,
        inbox: mpsc::Sender<Value>,
        cancel: CancellationToken,
    ) -> Self {
        Upstream {
            target,
            injection,
            stdio,
            kubernetes,
            http,
            settings,
            initialize_params,
            inbox,
            live: tokio::sync::Mutex::new(None),
            cancel,
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            resume: std::sync::Mutex::new(None),
            carried: std::sync::atomic::AtomicBool::new(false),
            prefer_stateless: false,
        }
    }

    /// Speaks the stateless era to the upstream when it offers it (see `prefer_stateless`).
    pub fn preferring_stateless(mut self, prefer: bool) -> Self {
        self.prefer_stateless = prefer;
        self
    }

    /// Whether the upstream session is carried in a session ticket (see [`Upstream::resumable`]).
    pub fn carried(&self) -> bool {
        self.carried.load(Ordering::Relaxed)
    }

    /// Whether the upstream session is carried in a session ticket or about to be adopted from
    /// one: other replicas can address it.
    pub fn shared(&self) -> bool {
        self.carried() || self.resume.lock().unwrap().is_some()
    }

    /// Adopts the upstream session `hint` names on first use instead of initialising one (a
    /// STDIO target has no such session to adopt: its process is local).
    pub fn resuming(self, hint: Option<crate::mcp::ticket::UpstreamTicket>) -> Self {
        if self.stdio.is_none() {
            *self.resume.lock().unwrap() = hint;
        }
        self
    }

    /// The upstream session, for a ticket: a Streamable HTTP session with an id, which another
    /// replica can address.
    pub async fn resumable(&self) -> Option<crate::mcp::ticket::UpstreamTicket> {
        let live = self.live.lock().await.clone()?;
        let Transport::Streamable(connection) = &live.transport else { return None };
        let (session_id, protocol_version) = connection.session()?;
        let capabilities = live.initialize_result.get("capabilities").cloned().unwrap_or_default();
        self.carried.store(true, Ordering::Relaxed);
        Some(crate::mcp::ticket::UpstreamTicket {
            target: self.target.name.clone(),
            session_id,
            protocol_version,
            capabilities,
        })
    }

    pub fn timeout(&self) -> Duration {
        self.injection.timeout.unwrap_or(self.settings.request_timeout)
    }

    fn url(&self) -> Result<reqwest::Url, UpstreamError> {
        let url = self.injection.base_url.as_deref().or(self.target.url.as_deref()).ok_or(UpstreamError::BadUrl)?;
        reqwest::Url::parse(url).map_err(|_| UpstreamError::BadUrl)
    }

    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in &self.injection.headers {
            headers.append(name.clone(), value.clone());
        }
        headers
    }

    /// The upstream's `initialize` result, connecting first if needed.
    pub async fn initialize_result(&self) -> Result<Value, UpstreamError> {
        Ok(self.connect().await?.initialize_result.clone())
    }

    async fn connect(&self) -> Result<Arc<Live>, UpstreamError> {
        let mut live = self.live.lock().await;
        if let Some(current) = live.as_ref() {
            let usable = match &current.transport {
                Transport::Sse(connection) => !connection.is_closed(),
                Transport::Stdio(process) => !process.closed.is_cancelled(),
                Transport::Streamable(_) => true,
            };
            if usable {
                return Ok(current.clone());
            }
        }
        // A pod's start is bounded by its own timeout, on top of the handshake's.
        let budget = self.settings.connect_timeout
            + self.timeout()
            + self.kubernetes.as_ref().map_or(Duration::ZERO, |k| k.instances.start_timeout());
        let connected =
            tokio::time::timeout(budget, self.handshake()).await.map_err(|_| UpstreamError::Timeout(budget))??;
        let connected = Arc::new(connected);
        *live = Some(connected.clone());
        Ok(connected)
    }

    async fn handshake(&self) -> Result<Live, UpstreamError> {
        let resume = self.resume.lock().unwrap().take();
        if let Some(hint) = resume {
            let url = match &self.kubernetes {
                Some(binding) => {
                    reqwest::Url::parse(&binding.ensure(&self.target).await?).map_err(|_| UpstreamError::BadUrl)?
                }
                None => self.url()?,
            };
            let headers = if self.kubernetes.is_some() { HeaderMap::new() } else { self.headers() };
            if self.kubernetes.is_some() || self.target.transport_type != TransportType::Sse {
                let connection =
                    streamable::Connection::new(self.http.clone(), url, headers, self.settings.max_message_bytes)
                        .adopt(&hint.session_id, hint.protocol_version.as_deref())?;
                tracing::debug!(target = %self.target.name, "adopting an upstream session opened before");
                self.carried.store(true, Ordering::Relaxed);
                tokio::spawn(connection.clone().listen(self.inbox.clone(), self.cancel.child_token()));
                let initialize_result =
                    json!({"protocolVersion": hint.protocol_version, "capabilities": hint.capabilities});
                return Ok(Live { transport: Transport::Streamable(connection), initialize_result });
            }
        }
        let initialize =
            jsonrpc::request(json!("reflow-initialize"), "initialize", Some(self.initialize_params.clone()));
        if let Some(binding) = &self.stdio {
            // One initialize per process: a shared process keeps the first session's result.
            let process = binding
                .pool
                .get(
                    &self.target,
                    binding.key.clone(),
                    binding.env.clone(),
                    &initialize,
                    self.settings.connect_timeout + self.timeout(),
                )
                .await?;
            process.subscribe(self.owner, self.inbox.clone());
            let initialize_result = process.initialize_result.lock().unwrap().clone().unwrap_or_default();
            return Ok(Live { transport: Transport::Stdio(process), initialize_result });
        }
        if let Some(binding) = &self.kubernetes {
            // Credentials reached the pod through its Secret: nothing is injected here.
            let url = binding.ensure(&self.target).await?;
            let url = reqwest::Url::parse(&url).map_err(|_| UpstreamError::BadUrl)?;
            let connection =
                streamable::Connection::new(self.http.clone(), url, HeaderMap::new(), self.settings.max_message_bytes);
            let (connection, initialize_result) =
                connection.initialize(initialize.clone()).await.inspect_err(|_| binding.forget())?;
            tokio::spawn(connection.clone().listen(self.inbox.clone(), self.cancel.child_token()));
            return Ok(Live { transport: Transport::Streamable(connection), initialize_result });
        }
        let url = self.url()?;
        if self.target.transport_type != TransportType::Sse {
            let connection = streamable::Connection::new(
                self.http.clone(),
                url.clone(),
                self.headers(),
                self.settings.max_message_bytes,
            );
            if self.prefer_stateless {
                if let Some((connection, initialize_result)) =
                    connection.clone().discover(&self.initialize_params).await?
                {
                    return Ok(self.stateless(connection, initialize_result));
                }
            }
            match connection.clone().initialize(initialize.clone()).await {
                Ok((connection, initialize_result)) => {
                    tokio::spawn(connection.clone().listen(self.inbox.clone(), self.cancel.child_token()));
                    return Ok(Live { transport: Transport::Streamable(connection), initialize_result });
                }
                // A server of the stateless era only refuses `initialize`: it is spoken to as
                // such. A server that only speaks the legacy transport refuses the POST: fall
                // back, as the specification's backwards-compatibility section describes.
                Err(error @ (UpstreamError::Status(400 | 404 | 405) | UpstreamError::Refused(_))) => {
                    if !self.prefer_stateless {
                        if let Some((connection, initialize_result)) =
                            connection.discover(&self.initialize_params).await?
                        {
                            return Ok(self.stateless(connection, initialize_result));
                        }
                    }
                    if let UpstreamError::Refused(_) = error {
                        return Err(error);
                    }
                    tracing::info!(target = %self.target.name, "upstream refused streamable HTTP; trying the legacy SSE transport");
                }
                Err(error) => return Err(error),
            }
        }
        let connection = sse::Connection::open(
            self.http.clone(),
            url,
            self.headers(),
            self.inbox.clone(),
            self.cancel.clone(),
            self.settings.max_message_bytes,
            self.settings.connect_timeout,
        )
        .await?;
        let reply = connection.request(&initialize, None).await?;
        let initialize_result =
            reply.get("result").cloned().ok_or_else(|| UpstreamError::Refused(streamable::error_text(&reply)))?;
        connection.send(&jsonrpc::notification("notifications/initialized", None)).await?;
        Ok(Live { transport: Transport::Sse(connection), initialize_result })
    }

    /// A connection to an upstream of the stateless era, listening for its list changes.
    fn stateless(&self, connection: streamable::Connection, initialize_result: Value) -> Live {
        tokio::spawn(connection.clone().listen(self.inbox.clone(), self.cancel.child_token()));
        Live { transport: Transport::Streamable(connection), initialize_result }
    }

    async fn forget(&self, stale: &Arc<Live>) {
        let mut live = self.live.lock().await;
        if live.as_ref().is_some_and(|current| Arc::ptr_eq(current, stale)) {
            *live = None;
        }
    }

    /// Sends a request and returns its response; intermediate messages go to `sink`. A
    /// forgotten session is re-initialised and the request retried once. Bounded by the
    /// target's timeout; on timeout the upstream is told the request is cancelled.
    pub async fn request(&self, message: &Value, sink: Option<&Sink>) -> Result<Value, UpstreamError> {
        let timeout = self.timeout();
        match tokio::time::timeout(timeout, self.request_once(message, sink, true)).await {
            Ok(result) => result,
            Err(_) => {
                if let Some(id) = message.get("id") {
                    let reason = format!("the gateway gave up after {timeout:?}");
                    let cancel = jsonrpc::notification(
                        "notifications/cancelled",
                        Some(json!({"requestId": id, "reason": reason})),
                    );
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.send(&cancel)).await;
                }
                Err(UpstreamError::Timeout(timeout))
            }
        }
    }

    async fn request_once(&self, message: &Value, sink: Option<&Sink>, retry: bool) -> Result<Value, UpstreamError> {
        if let Some(binding) = &self.kubernetes {
            binding.used();
        }
        let live = self.connect().await?;
        let result = match &live.transport {
            Transport::Streamable(connection) => connection.request(message, sink).await,
            Transport::Sse(connection) => connection.request(message, sink).await,
            Transport::Stdio(process) => process.request(self.owner, message, sink).await,
        };
        match result {
            Err(UpstreamError::SessionExpired) if retry && !self.carried() => {
                tracing::info!(target = %self.target.name, "upstream session expired; initialising a new one");
                self.forget(&live).await;
                Box::pin(self.request_once(message, sink, false)).await
            }
            Err(
                error @ (UpstreamError::Unreachable(_) | UpstreamError::Disconnected | UpstreamError::SessionExpired),
            ) => {
                if let Some(binding) = &self.kubernetes {
                    binding.forget();
                }
                self.forget(&live).await;
                match error {
                    UpstreamError::SessionExpired if self.carried() => Err(UpstreamError::SharedSessionEnded),
                    error => Err(error),
                }
            }
            other => other,
        }
    }

    /// The rest of the upstream stream after its event `last_event_id`, into `sink` (see
    /// [`streamable::Connection::replay`]); only a Streamable HTTP session keeps such streams.
    pub async fn replay(&self, last_event_id: &str, sink: &Sink) -> Result<(), UpstreamError> {
        let live = self.connect().await?;
        match &live.transport {
            Transport::Streamable(connection) => connection.replay(last_event_id, sink).await,
            _ => Err(UpstreamError::Status(405)),
        }
    }

    /// Sends a notification or a response, if connected (nothing to tell an upstream that was
    /// never initialised).
    pub async fn send(&self, message: &Value) -> Result<(), UpstreamError> {
        let live = self.live.lock().await.clone();
        let live = match live {
            Some(live) => live,
            // An adopted session is connected: it may be waiting for this very answer.
            None if self.resume.lock().unwrap().is_some() => self.connect().await?,
            None => return Ok(()),
        };
        match &live.transport {
            Transport::Streamable(connection) => connection.send(message).await,
            Transport::Sse(connection) => connection.send(message).await,
            Transport::Stdio(process) => process.send(self.owner, message).await,
        }
    }

    /// Lets go of the upstream session without ending it (another replica may go on using
    /// it): background tasks stop; a legacy SSE session, bound to this replica's stream, ends.
    pub async fn detach(&self) {
        self.cancel.cancel();
        let live = self.live.lock().await.take();
        if let Some(live) = live {
            match &live.transport {
                Transport::Streamable(_) => {}
                Transport::Sse(connection) => connection.close(),
                Transport::Stdio(process) => process.unsubscribe(self.owner),
            }
        }
    }

    /// Ends the upstream session and its background tasks.
    pub async fn close(&self) {
        if self.resume.lock().unwrap().is_some() && self.live.lock().await.is_none() {
            // An adopted session this replica never used: it is ended all the same.
            let _ = tokio::time::timeout(self.settings.connect_timeout, self.connect()).await;
        }
        self.cancel.cancel();
        let live = self.live.lock().await.take();
        if let Some(live) = live {
            match &live.transport {
                Transport::Streamable(connection) => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), connection.close()).await;
                }
                Transport::Sse(connection) => connection.close(),
                // Shared by other sessions: the pool stops it when idle or expired.
                Transport::Stdio(process) => process.unsubscribe(self.owner),
            }
        }
    }
}
