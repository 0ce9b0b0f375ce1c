//! Legacy HTTP+SSE upstreams (protocol 2024-11-05): a GET stream whose first `endpoint` event
//! names where to POST; every reply arrives on the stream as a `message` event.
//!
//! Replies are matched to waiting requests by id; progress notifications go to the request
//! whose progress token they carry; everything else goes to the client session's inbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, HeaderMap};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::event_stream::EventParser;
use super::streamable::parse_event_data;
use super::{describe, owner_of, Sink, UpstreamError};
use crate::jsonrpc;

struct Waiter {
    reply: oneshot::Sender<Value>,
    sink: Option<Sink>,
    progress_token: Option<Value>,
}

type Waiters = Arc<Mutex<HashMap<String, Waiter>>>;

#[derive(Clone)]
pub struct Connection {
    http: reqwest::Client,
    post_url: reqwest::Url,
    headers: HeaderMap,
    /// Requests awaiting their reply. The reader task removes an entry when the reply comes
    /// and clears them all when the stream ends, which fails every waiter at once.
    waiters: Waiters,
    /// Cancelled when the stream ends or the connection is dropped by its session.
    closed: CancellationToken,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("post_url", &self.post_url.path()).finish_non_exhaustive()
    }
}

impl Connection {
    /// Opens the stream and waits for the `endpoint` event. The endpoint must have the stream's
    /// origin: credentials are never sent where the target's URL does not point.
    pub async fn open(
        http: reqwest::Client,
        url: reqwest::Url,
        headers: HeaderMap,
        inbox: mpsc::Sender<Value>,
        cancel: CancellationToken,
        max_message_bytes: usize,
        connect_timeout: Duration,
    ) -> Result<Connection, UpstreamError> {
        let response = http
            .get(url.clone())
            .headers(headers.clone())
            .header(header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|e| UpstreamError::Unreachable(describe(&e)))?;
        if !response.status().is_success() {
            return Err(UpstreamError::Status(response.status().as_u16()));
        }
        let mut body = response.bytes_stream();
        let mut parser = EventParser::new(max_message_bytes);
        let mut events = Vec::new();
        let endpoint = tokio::time::timeout(connect_timeout, async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| UpstreamError::Unreachable(describe(&e)))?;
                parser.feed(&chunk, &mut events).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                if let Some(at) = events.iter().position(|e| e.event == "endpoint") {
                    return Ok(events.remove(at).data);
                }
            }
            Err(UpstreamError::Disconnected)
        })
        .await
        .map_err(|_| UpstreamError::Timeout(connect_timeout))??;
        let post_url =
            url.join(endpoint.trim()).map_err(|_| UpstreamError::Protocol("the endpoint event is not a URL".into()))?;
        if post_url.origin() != url.origin() {
            return Err(UpstreamError::Protocol("the endpoint event points to another origin; refused".into()));
        }
        let waiters: Waiters = Arc::default();
        let closed = cancel.child_token();
        let reader_waiters = waiters.clone();
        let reader_closed = closed.clone();
        tokio::spawn(async move {
            loop {
                let chunk = tokio::select! {
                    _ = reader_closed.cancelled() => break,
                    chunk = body.next() => chunk,
                };
                let Some(Ok(chunk)) = chunk else { break };
                if parser.feed(&chunk, &mut events).is_err() {
                    tracing::warn!("an upstream SSE event exceeded the size limit; closing the stream");
                    break;
                }
                for event in events.drain(..) {
                    if event.event != "message" {
                        continue;
                    }
                    let Some(message) = parse_event_data(&event.data) else { continue };
                    dispatch(&reader_waiters, &inbox, message).await;
                }
            }
            reader_closed.cancel();
            reader_waiters.lock().unwrap().clear();
        });
        Ok(Connection { http, post_url, headers, waiters, closed })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    pub async fn request(&self, message: &Value, sink: Option<&Sink>) -> Result<Value, UpstreamError> {
        let key = jsonrpc::id_key(&message["id"]);
        let progress_token = message.pointer("/params/_meta/progressToken").cloned();
        let (reply, answered) = oneshot::channel();
        if self.closed.is_cancelled() {
            return Err(UpstreamError::Disconnected);
        }
        self.waiters.lock().unwrap().insert(key.clone(), Waiter { reply, sink: sink.cloned(), progress_token });
        if let Err(error) = self.send(message).await {
            self.waiters.lock().unwrap().remove(&key);
            return Err(error);
        }
        answered.await.map_err(|_| UpstreamError::Disconnected)
    }

    pub async fn send(&self, message: &Value) -> Result<(), UpstreamError> {
        let request = self.http.post(self.post_url.clone()).headers(self.headers.clone());
        let response = super::with_traceparent(request, message)
            .json(message)
            .send()
            .await
            .map_err(|e| UpstreamError::Unreachable(describe(&e)))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(UpstreamError::Status(response.status().as_u16()))
        }
    }

    pub fn close(&self) {
        self.closed.cancel();
    }
}

async fn dispatch(waiters: &Waiters, inbox: &mpsc::Sender<Value>, message: Value) {
    if jsonrpc::is_response(&message) {
        let waiter = waiters.lock().unwrap().remove(&jsonrpc::id_key(&message["id"]));
        match waiter {
            Some(waiter) => {
                let _ = waiter.reply.send(message);
            }
            None => tracing::debug!("an upstream reply matched no waiting request"),
        }
        return;
    }
    let sink = {
        let waiters = waiters.lock().unwrap();
        owner_of(&message, waiters.values().map(|w| (w.progress_token.as_ref(), w.sink.as_ref())))
    };
    if let Some(sink) = sink {
        let _ = sink.send(message);
        return;
    }
    let _ = inbox.send(message).await;
}
