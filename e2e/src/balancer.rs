//! A small round-robin HTTP load balancer, the stand-in for the plain balancer in front of a
//! data-plane fleet: each request goes to the next backend in turn (no stickiness of any kind:
//! not by connection, client or header). Like nginx's default, a request a backend refused to
//! connect is passed to the next one (it was never sent, so it is safe to resend) and that
//! backend is left out for a while; a request that reached a backend gets whatever happened
//! there, a broken response included.
//!
//! It records which backend served each request and the start of its body, so a test can see
//! where a session's requests landed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, HOST};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;

/// How long a backend that refused a connection is left out.
const LEFT_OUT: Duration = Duration::from_secs(5);

/// One request as the balancer passed it on.
#[derive(Debug, Clone)]
pub struct Routed {
    /// Index of the backend that got it.
    pub backend: usize,
    pub method: String,
    /// The first bytes of the body (lossy UTF-8).
    pub body: String,
    /// The request's `Last-Event-ID`, if any.
    pub last_event_id: Option<String>,
}

#[derive(Debug)]
struct Inner {
    backends: Vec<String>,
    preserve_host: bool,
    next: AtomicUsize,
    down_until: Mutex<Vec<Option<Instant>>>,
    routed: Mutex<Vec<Routed>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A running balancer.
#[derive(Debug, Clone)]
pub struct Balancer {
    /// `http://127.0.0.1:port`.
    pub url: String,
    inner: Arc<Inner>,
}

impl Balancer {
    /// Balances over `backends` (`host:port` each) on a fresh loopback port, sending each the
    /// backend's own `Host`.
    pub async fn start(backends: Vec<String>) -> anyhow::Result<Balancer> {
        Balancer::launch(backends, false).await
    }

    /// [`Balancer::start`], passing the client's `Host` through (as `proxy_set_header Host
    /// $host` does), so the backends' DNS-rebinding checks see what the client sent.
    pub async fn start_preserving_host(backends: Vec<String>) -> anyhow::Result<Balancer> {
        Balancer::launch(backends, true).await
    }

    async fn launch(backends: Vec<String>, preserve_host: bool) -> anyhow::Result<Balancer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let inner = Arc::new(Inner {
            down_until: Mutex::new(vec![None; backends.len()]),
            backends,
            preserve_host,
            next: AtomicUsize::new(0),
            routed: Mutex::new(Vec::new()),
            client: Client::builder(TokioExecutor::new()).build(connector),
        });
        let serving = inner.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let inner = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let inner = inner.clone();
                        async move { Ok::<_, std::convert::Infallible>(inner.forward(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Balancer { url, inner })
    }

    /// Every request passed on so far.
    pub fn routed(&self) -> Vec<Routed> {
        self.inner.routed.lock().unwrap().clone()
    }
}

impl Inner {
    async fn forward(&self, request: Request<Incoming>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        // Request bodies are small JSON-RPC messages here: buffered, so one can be resent.
        let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else { return status(StatusCode::BAD_REQUEST) };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        for _ in 0..self.backends.len() {
            let index = self.pick();
            let backend = &self.backends[index];
            let Ok(uri) = format!("http://{backend}{path}").parse::<Uri>() else {
                return status(StatusCode::BAD_GATEWAY);
            };
            let mut request = Request::from_parts(parts.clone(), Full::new(body.clone()));
            *request.uri_mut() = uri;
            if !self.preserve_host {
                request.headers_mut().insert(HOST, HeaderValue::from_str(backend).expect("a host:port"));
            }
            match self.client.request(request).await {
                Ok(response) => {
                    let start = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                    self.routed.lock().unwrap().push(Routed {
                        backend: index,
                        method: parts.method.to_string(),
                        body: start,
                        last_event_id: parts
                            .headers
                            .get("last-event-id")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string),
                    });
                    return response.map(BodyExt::boxed);
                }
                Err(error) if error.is_connect() => {
                    self.down_until.lock().unwrap()[index] = Some(Instant::now() + LEFT_OUT);
                }
                Err(_) => return status(StatusCode::BAD_GATEWAY),
            }
        }
        status(StatusCode::BAD_GATEWAY)
    }

    /// The next backend in turn that is not left out (any, when all are).
    fn pick(&self) -> usize {
        let down = self.down_until.lock().unwrap();
        let n = self.backends.len();
        for _ in 0..n {
            let index = self.next.fetch_add(1, Ordering::Relaxed) % n;
            if down[index].is_none_or(|until| until <= Instant::now()) {
                return index;
            }
        }
        self.next.fetch_add(1, Ordering::Relaxed) % n
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
    *response.status_mut() = code;
    response
}
