//! A bare pass-through HTTP proxy: each request is forwarded to one upstream with its bytes,
//! method, path and headers unchanged (Host rewritten), and the response streamed back. No
//! MCP logic at all: the physical limit of one extra hop, which the benchmark holds the
//! gateway against.
//!
//! Built on hyper and hyper-util's pooled client directly: a framework would add work the
//! comparison is meant to leave out.

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

/// Forwards everything `listener` receives to `upstream` (`host:port`) until dropped.
pub async fn serve(listener: TcpListener, upstream: String) -> anyhow::Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new()).build(connector);
    let host = HeaderValue::from_str(&upstream)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, upstream, host) = (client.clone(), upstream.clone(), host.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (client, upstream, host) = (client.clone(), upstream.clone(), host.clone());
                async move { Ok::<_, std::convert::Infallible>(forward(&client, &upstream, host, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    upstream: &str,
    host: HeaderValue,
    request: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("http://{upstream}{path}").parse::<Uri>() else {
        return bad_gateway();
    };
    parts.uri = uri;
    parts.headers.insert(HOST, host);
    match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => response.map(BodyExt::boxed),
        Err(_) => bad_gateway(),
    }
}

fn bad_gateway() -> Response<Body> {
    let mut response =
        Response::new(Full::new(Bytes::from_static(b"bad gateway")).map_err(|never| match never {}).boxed());
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
