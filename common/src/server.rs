//! Every HTTP listener of every role serves through [`serve`]: HTTP/1.1 with limits at the edge
//! that `axum::serve` does not set.
//!
//! - **Header read timeout** (`server.header_timeout`): a connection that has not sent a whole
//!   request head within it is closed, and so is a keep-alive connection idle that long, so
//!   half-sent requests cannot hold connections open (slowloris).
//! - **Connection limit** (`server.max_connections`): past it a new connection is closed at once,
//!   so a flood of connections cannot exhaust the process's files or memory.
//! - **Body read timeout** (`server.body_timeout`): [`BodyTimeout`], an extension each handler
//!   that reads a body applies to its read (the answer is a 408 in that endpoint's own format).
//! - Each request carries the peer's address ([`axum::extract::ConnectInfo`]) and the local
//!   address it arrived on ([`LocalAddr`]: which names and origins it may claim depends on it).
//! - On shutdown the listener stops accepting and open connections finish what they were doing,
//!   for at most [`DRAIN`].
//!
//! Written on hyper-util rather than taken from axum because `axum::serve` exposes neither the
//! header timeout (it sets no timer) nor a connection limit.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::ServerConfig;

/// How long open connections get to finish after shutdown begins.
pub const DRAIN: Duration = Duration::from_secs(10);

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    pub fn from_config(server: &ServerConfig) -> Self {
        Limits {
            header_timeout: server.header_timeout,
            body_timeout: server.body_timeout,
            max_connections: server.max_connections,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::from_config(&ServerConfig::default())
    }
}

/// How long a handler may take to read a request body (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub Duration);

/// The local address a request's connection was accepted on.
#[derive(Debug, Clone, Copy)]
pub struct LocalAddr(pub SocketAddr);

/// Serves `router` on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router.layer(axum::Extension(BodyTimeout(limits.body_timeout)));
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let draining = tokio_util::sync::CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of files, say: back off a moment rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = limits.max_connections, "connection limit reached (server.max_connections); closing a new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let service = hyper_util::service::TowerToHyperService::new(tower::util::MapRequest::new(
            router.clone(),
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                if let Some(local) = local {
                    request.extensions_mut().insert(LocalAddr(local));
                }
                request
            },
        ));
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let draining = draining.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = draining.cancelled() => {
                    // Finish the request in progress, then close.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    draining.cancel();
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, connections.acquire_many(all)).await.is_err() {
        tracing::warn!("connections still open after {DRAIN:?} of shutdown; leaving them");
    }
    Ok(())
}

/// Reads a whole body of at most `limit` bytes within `timeout`.
pub async fn read_body(
    body: axum::body::Body,
    limit: usize,
    timeout: Duration,
) -> Result<axum::body::Bytes, BodyError> {
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(BodyError::Timeout(timeout)),
        Ok(Err(error)) => match error.into_inner().is::<http_body_util::LengthLimitError>() {
            true => Err(BodyError::TooLarge(limit)),
            false => Err(BodyError::Broken),
        },
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the request body was not received within {0:?} (server.body_timeout)")]
    Timeout(Duration),
    #[error("the request body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("the request body broke off")]
    Broken,
}
