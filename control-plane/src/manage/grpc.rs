//! The gRPC management service, `reflow.admin.v1.ManagementService`.
//!
//! Every method with a `route` option *is* the REST operation it names: the request message is
//! turned into that operation's path, query and JSON body and handed to the REST router in
//! process, and the JSON answer is read back into the response message, both through the
//! message descriptors (`prost-reflect`). So the two APIs share every handler, extractor and
//! middleware — authentication, authorisation, validation, the recompile after a write, the
//! write metrics — and no rule is written twice. `Apply` and `Dump` (declarative configuration)
//! have no REST twin and are served by [`super::declare`].
//!
//! The service is a hand-written tower service rather than the generated server trait: the
//! generated trait would need one method per operation repeating what the `.proto` already
//! says, while the descriptors let one function serve them all.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{self, header, HeaderValue, StatusCode};
use bytes::Bytes;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, ExtensionDescriptor, MessageDescriptor, Value};
use serde_json::{Map, Value as Json};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::ServiceExt;

use crate::api::extract::Caller;
use crate::api::AppState;

/// The service's full name, as clients address it.
pub const SERVICE: &str = "reflow.admin.v1.ManagementService";

/// The largest request or answer the service takes (a declarative document of thousands of
/// resources fits).
const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// The REST operation behind a method, read from its `route` option.
#[derive(Debug, Clone)]
struct Route {
    method: http::Method,
    /// Path template, `{field}` standing for a request field.
    path: String,
    body: BodyRule,
    /// The response field a JSON array answer fills.
    reply: Option<String>,
}

#[derive(Debug, Clone)]
enum BodyRule {
    /// The fields not in the path, as a JSON object.
    All,
    /// One field's value.
    Field(String),
    /// The fields not in the path, as query parameters.
    Query,
}

#[derive(Debug, Clone)]
struct Method {
    input: MessageDescriptor,
    output: MessageDescriptor,
    /// `None`: served natively (`Apply`, `Dump`).
    route: Option<Route>,
}

/// The management service; cheap to clone.
#[derive(Debug, Clone)]
pub struct ManagementGrpc {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: AppState,
    router: axum::Router,
    methods: HashMap<String, Method>,
}

impl ManagementGrpc {
    /// The service over `state`, whose REST operations it serves through `router`.
    pub fn new(state: AppState, router: axum::Router) -> Self {
        let methods = methods().expect("the management API's descriptors are built in and valid");
        ManagementGrpc { inner: Arc::new(Inner { state, router, methods }) }
    }
}

/// Reads every method and its route from the built-in descriptors.
fn methods() -> Result<HashMap<String, Method>, String> {
    let pool = DescriptorPool::decode(reflow_proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())?;
    let service = pool.get_service_by_name(SERVICE).ok_or("no management service")?;
    let extension = pool.get_extension_by_name("reflow.admin.v1.route").ok_or("no route option")?;
    let mut methods = HashMap::new();
    for method in service.methods() {
        let route = route_of(&method.options(), &extension)?;
        methods.insert(method.name().to_string(), Method { input: method.input(), output: method.output(), route });
    }
    Ok(methods)
}

fn route_of(options: &DynamicMessage, extension: &ExtensionDescriptor) -> Result<Option<Route>, String> {
    if !options.has_extension(extension) {
        return Ok(None);
    }
    let Value::Message(route) = options.get_extension(extension).into_owned() else {
        return Err("route option is not a message".into());
    };
    let text = |name: &str| match route.get_field_by_name(name).as_deref() {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let verbs = [
        ("get", http::Method::GET),
        ("post", http::Method::POST),
        ("put", http::Method::PUT),
        ("delete", http::Method::DELETE),
    ];
    let (method, path) = verbs
        .into_iter()
        .find_map(|(name, method)| text(name).map(|path| (method, path)))
        .ok_or("route names no path")?;
    let body = match text("body").as_deref() {
        Some("*") => BodyRule::All,
        Some(field) => BodyRule::Field(field.to_string()),
        None => BodyRule::Query,
    };
    Ok(Some(Route { method, path, body, reply: text("reply") }))
}

impl tonic::server::NamedService for ManagementGrpc {
    const NAME: &'static str = SERVICE;
}

impl tower::Service<http::Request<tonic::body::Body>> for ManagementGrpc {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let name = request.uri().path().rsplit('/').next().unwrap_or_default().to_string();
            let Some(method) = inner.methods.get(&name).cloned() else {
                return Ok(Status::unimplemented(format!("{SERVICE} has no method {name:?}")).into_http());
            };
            let handler = tower::service_fn(move |request: tonic::Request<Bytes>| {
                let inner = inner.clone();
                let method = method.clone();
                let name = name.clone();
                async move { inner.serve(&name, &method, request).await.map(tonic::Response::new) }
            });
            let mut grpc = tonic::server::Grpc::new(reflow_proto::raw::RawCodec)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            Ok(grpc.unary(handler, request).await)
        })
    }
}

impl Inner {
    async fn serve(&self, name: &str, method: &Method, request: tonic::Request<Bytes>) -> Result<Bytes, Status> {
        let authorization = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        let peer = request.remote_addr();
        let bytes = request.into_inner();
        match &method.route {
            Some(route) => {
                let message = DynamicMessage::decode(method.input.clone(), bytes).map_err(|e| {
                    Status::invalid_argument(format!("the request is not a valid {}: {e}", method.input.name()))
                })?;
                self.transcode(route, method, message, authorization, peer).await
            }
            None => {
                let caller = self.caller(authorization.as_deref()).await?;
                super::declare::serve_native(&self.state, &caller, name, &bytes).await.map_err(status_of)
            }
        }
    }

    async fn caller(&self, authorization: Option<&str>) -> Result<Caller, Status> {
        let token = reflow_common::bearer::bearer_token(authorization.map(str::as_bytes), None).map_err(|e| {
            status_of(crate::api::error::ApiError::unauthorized(
                reflow_common::bearer::AuthFailure::Header(e).to_string(),
            ))
        })?;
        Caller::authenticate(&self.state, token).await.map_err(status_of)
    }

    async fn transcode(
        &self,
        route: &Route,
        method: &Method,
        message: DynamicMessage,
        authorization: Option<String>,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<Bytes, Status> {
        let mut fields = to_json(&message)?;
        apply_clear(&method.input, &mut fields)?;
        let path = fill_path(&route.path, &mut fields)?;
        let (uri, body) = match &route.body {
            BodyRule::All => (path, Some(Json::Object(fields))),
            BodyRule::Field(field) => (path, Some(fields.remove(field).unwrap_or(Json::Array(Vec::new())))),
            BodyRule::Query => (with_query(path, &fields), None),
        };
        let mut request = http::Request::builder().method(route.method.clone()).uri(uri);
        if let Some(value) = authorization.and_then(|v| HeaderValue::from_str(&v).ok()) {
            request = request.header(header::AUTHORIZATION, value);
        }
        let body = match body {
            Some(json) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                axum::body::Body::from(serde_json::to_vec(&json).expect("JSON values serialise"))
            }
            None => axum::body::Body::empty(),
        };
        let mut request = request.body(body).map_err(|e| Status::invalid_argument(format!("bad request: {e}")))?;
        request.extensions_mut().insert(axum::extract::ConnectInfo(
            peer.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        ));
        let response = self.router.clone().oneshot(request).await.unwrap_or_else(|e: Infallible| match e {});
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let bytes = axum::body::to_bytes(response.into_body(), MAX_MESSAGE_BYTES)
            .await
            .map_err(|e| Status::internal(format!("reading the answer: {e}")))?;
        if !status.is_success() {
            return Err(rest_failure(status, &bytes, retry_after));
        }
        let mut json: Json = serde_json::from_slice(&bytes)
            .map_err(|e| Status::internal(format!("the REST answer is not JSON: {e}")))?;
        if let Some(field) = &route.reply {
            json = Json::Object(Map::from_iter([(field.clone(), json)]));
        }
        from_json(&method.output, json).map(|m| Bytes::from(m.encode_to_vec()))
    }
}

/// A message as the REST API's JSON: its field names, 64-bit integers as numbers, fields not
/// set left out.
fn to_json(message: &DynamicMessage) -> Result<Map<String, Json>, Status> {
    let options = prost_reflect::SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true)
        .stringify_64_bit_integers(false);
    match message.serialize_with_options(serde_json::value::Serializer, &options) {
        Ok(Json::Object(map)) => Ok(map),
        Ok(_) => Ok(Map::new()),
        Err(e) => Err(Status::internal(format!("encoding the request: {e}"))),
    }
}

/// A JSON answer read into `descriptor`; fields the message does not have are ignored.
fn from_json(descriptor: &MessageDescriptor, json: Json) -> Result<DynamicMessage, Status> {
    let options = prost_reflect::DeserializeOptions::new().deny_unknown_fields(false);
    DynamicMessage::deserialize_with_options(descriptor.clone(), json, &options)
        .map_err(|e| Status::internal(format!("the REST answer does not fit {}: {e}", descriptor.name())))
}

/// Turns the `clear` list into the JSON that empties each field it names: `[]` for a list,
/// `null` for anything else.
fn apply_clear(descriptor: &MessageDescriptor, fields: &mut Map<String, Json>) -> Result<(), Status> {
    let Some(Json::Array(names)) = fields.remove("clear") else {
        return Ok(());
    };
    for name in names {
        let name = name.as_str().unwrap_or_default().to_string();
        let field = descriptor
            .get_field_by_name(&name)
            .filter(|f| f.name() != "clear" && f.name() != "id")
            .ok_or_else(|| invalid("clear", format!("{name:?} is not a field of {}", descriptor.name())))?;
        let empty = if field.is_list() { Json::Array(Vec::new()) } else { Json::Null };
        fields.insert(name, empty);
    }
    Ok(())
}

/// The path with each `{field}` replaced by that field's value (percent-encoded), the fields
/// used taken out of `fields`.
fn fill_path(template: &str, fields: &mut Map<String, Json>) -> Result<String, Status> {
    let mut path = String::with_capacity(template.len() + 40);
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let end = rest[start..].find('}').map(|e| start + e).unwrap_or(rest.len());
        path.push_str(&rest[..start]);
        let field = &rest[start + 1..end];
        let value = match fields.remove(field) {
            Some(Json::String(s)) if !s.is_empty() => s,
            _ => return Err(invalid(field, format!("{field}: required"))),
        };
        path.extend(percent_encoding::utf8_percent_encode(&value, percent_encoding::NON_ALPHANUMERIC));
        rest = &rest[(end + 1).min(rest.len())..];
    }
    path.push_str(rest);
    Ok(path)
}

fn with_query(path: String, fields: &Map<String, Json>) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in fields {
        match value {
            Json::String(s) => query.append_pair(name, s),
            Json::Null | Json::Array(_) | Json::Object(_) => continue,
            other => query.append_pair(name, &other.to_string()),
        };
    }
    let query = query.finish();
    if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    }
}

/// An INVALID_ARGUMENT naming `field`.
fn invalid(field: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    Status::with_error_details(
        Code::InvalidArgument,
        message.clone(),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}

/// A REST refusal as the gRPC status that means the same.
fn rest_failure(status: StatusCode, body: &[u8], retry_after: Option<u64>) -> Status {
    #[derive(serde::Deserialize)]
    struct Body {
        error: String,
        code: String,
    }
    let (message, code) = match serde_json::from_slice::<Body>(body) {
        Ok(body) => (body.error, body.code),
        Err(_) => (String::from_utf8_lossy(body).into_owned(), "internal".to_string()),
    };
    failure(status, &code, message, retry_after)
}

/// An API error as a gRPC status (for the natively served methods).
pub fn status_of(error: crate::api::error::ApiError) -> Status {
    failure(error.status, error.code, error.message, None)
}

fn failure(status: StatusCode, code: &str, message: String, retry_after: Option<u64>) -> Status {
    let grpc = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE => Code::InvalidArgument,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::CONFLICT if message.contains("already exists") => Code::AlreadyExists,
        StatusCode::CONFLICT => Code::FailedPrecondition,
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => Code::DeadlineExceeded,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        _ => Code::Internal,
    };
    let mut details = ErrorDetails::new();
    details.set_error_info(
        code,
        "reflow.io",
        HashMap::from([("http_status".to_string(), status.as_u16().to_string())]),
    );
    if grpc == Code::InvalidArgument {
        details.add_bad_request_violation(field_of(&message), message.clone());
    }
    if let Some(seconds) = retry_after {
        details.set_retry_info(Some(std::time::Duration::from_secs(seconds)));
    }
    Status::with_error_details(grpc, message, details)
}

/// The field a validation message names: the REST API writes `field: problem`, and a body that
/// does not parse names it as ``unknown field `x` `` or ``missing field `x` ``.
pub fn field_of(message: &str) -> String {
    for marker in ["unknown field `", "missing field `"] {
        if let Some(at) = message.find(marker) {
            let rest = &message[at + marker.len()..];
            return rest.split('`').next().unwrap_or_default().to_string();
        }
    }
    let Some((field, _)) = message.split_once(": ") else {
        return String::new();
    };
    let path_like =
        !field.is_empty() && field.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.[]".contains(c));
    if path_like {
        field.to_string()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_a_route_but_the_declarative_ones() {
        let methods = methods().unwrap();
        assert!(methods.len() > 40);
        for (name, method) in &methods {
            assert_eq!(method.route.is_none(), matches!(name.as_str(), "Apply" | "Dump"), "{name}");
        }
        let route = methods["SetScopedEnv"].route.clone().unwrap();
        assert_eq!(route.method, http::Method::PUT);
        assert_eq!(route.path, "/api/targets/{id}/env/{scope}/{value}");
        assert!(matches!(route.body, BodyRule::Field(ref f) if f == "entries"));
        assert_eq!(methods["ListUsers"].route.clone().unwrap().reply.as_deref(), Some("users"));
    }

    #[test]
    fn paths_take_their_fields_and_encode_them() {
        let mut fields = Map::new();
        fields.insert("id".into(), Json::from("a b"));
        fields.insert("scope".into(), Json::from("role"));
        fields.insert("value".into(), Json::from("x/y"));
        fields.insert("token".into(), Json::from("t"));
        let path = fill_path("/api/targets/{id}/tokens/{scope}/{value}", &mut fields).unwrap();
        assert_eq!(path, "/api/targets/a%20b/tokens/role/x%2Fy");
        assert_eq!(fields.keys().collect::<Vec<_>>(), ["token"]);
        let missing = fill_path("/api/users/{id}", &mut Map::new()).unwrap_err();
        assert_eq!(missing.code(), Code::InvalidArgument);
        assert_eq!(missing.get_details_bad_request().unwrap().field_violations[0].field, "id");
    }

    #[test]
    fn validation_messages_name_their_field() {
        assert_eq!(field_of("role: must be 1 to 64 characters"), "role");
        assert_eq!(field_of("env_keys[0].name: bad"), "env_keys[0].name");
        assert_eq!(field_of("invalid request body: unknown field `colour`, expected one of"), "colour");
        assert_eq!(field_of("invalid request body: missing field `email` at line 1"), "email");
        assert_eq!(field_of("The thing: broke"), "");
    }
}
