//! `/api/logs`: the audit trail, one record per MCP request, as data planes shipped it.
//!
//! `GET /api/logs` keeps the original gateway's `limit`/`offset` and its `RequestLog` fields
//! (`request_body` is the masked arguments of targets that opt in, `response_status` the real
//! status), adds every field of the record, filters (user, target, method, name, decision, time
//! range) and a cursor: when more records follow, the `X-Next-Cursor` header names the last one
//! returned; passing it as `cursor` continues after it, unaffected by records arriving
//! meanwhile. `GET /api/logs/export` streams every matching record as NDJSON. Admins read
//! everything; other users only their own requests.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{ApiQuery, Caller};
use super::AppState;
use crate::audit::AuditRecord;
use crate::store::AuditFilter;

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 1000;
/// Records read per page while exporting.
const EXPORT_PAGE: u32 = 500;
const NEXT_CURSOR: &str = "x-next-cursor";

/// Which records to read.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// At most this many (default 50, at most 1000; ignored by the export).
    pub limit: Option<u32>,
    /// Skip this many first (the original's paging; prefer `cursor`).
    pub offset: Option<u32>,
    /// Continue after this record id (the `X-Next-Cursor` of the previous page).
    pub cursor: Option<String>,
    /// Only this user's requests (admins; others always read their own).
    pub user_id: Option<String>,
    /// Only requests to this target (by name).
    pub target: Option<String>,
    /// Only this JSON-RPC method, e.g. `tools/call`.
    pub method: Option<String>,
    /// Only this tool or prompt name, or resource URI.
    pub name: Option<String>,
    /// `allowed`, `denied` or `none`.
    pub decision: Option<String>,
    /// Only records at or after this time (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Only records before this time (RFC 3339).
    pub until: Option<DateTime<Utc>>,
}

/// One MCP request. The first fields are the original gateway's `RequestLog`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RequestLog {
    pub id: String,
    pub session_id: Option<String>,
    pub user_id: Option<String>,
    pub method: String,
    pub target_name: Option<String>,
    /// The call's arguments, only for targets with `audit_arguments`, secrets masked.
    #[schema(value_type = Option<Object>)]
    pub request_body: Option<serde_json::Value>,
    /// The HTTP status the client was answered with.
    pub response_status: u16,
    pub duration_ms: u64,
    pub created_at: DateTime<Utc>,
    /// The data plane that served it.
    pub data_plane: String,
    /// `/mcp` or `/mcp/{target}`.
    pub endpoint: String,
    pub protocol_version: Option<String>,
    pub client_name: Option<String>,
    pub client_version: Option<String>,
    /// The tool or prompt name, or the resource URI.
    pub name: Option<String>,
    /// `allowed`, `denied`, or `none` (nothing to decide: initialize, lists, ping).
    pub decision: String,
    /// The deciding policy; `null` with `denied` is the default deny.
    pub policy_id: Option<String>,
    pub policy_name: Option<String>,
    /// Where the injected credential came from (`user`, `group:…`, `role:…`, `default`).
    pub credential_source: Option<String>,
    pub transport: Option<String>,
    /// `answered`, `error`, `upstream_failed`, `timeout`, `client_gone`, `cancelled` or `refused`.
    pub outcome: String,
    pub upstream_status: Option<u16>,
    /// The JSON-RPC error code the client got.
    pub error_code: Option<i64>,
    pub snapshot_version: Option<String>,
    pub trace_id: Option<String>,
}

impl From<AuditRecord> for RequestLog {
    fn from(r: AuditRecord) -> Self {
        RequestLog {
            id: r.id,
            session_id: r.session_id,
            user_id: r.user_id,
            method: r.method,
            target_name: r.target,
            request_body: r.arguments,
            response_status: r.status,
            duration_ms: r.duration_ms,
            created_at: r.at,
            data_plane: r.data_plane,
            endpoint: r.endpoint,
            protocol_version: r.protocol_version,
            client_name: r.client_name,
            client_version: r.client_version,
            name: r.name,
            decision: r.decision,
            policy_id: r.policy_id,
            policy_name: r.policy_name,
            credential_source: r.credential_source,
            transport: r.transport,
            outcome: r.outcome,
            upstream_status: r.upstream_status,
            error_code: r.error_code,
            snapshot_version: r.snapshot_version,
            trace_id: r.trace_id,
        }
    }
}

/// The store filter for `query` as `caller` may read it.
fn filter(caller: &Caller, query: LogQuery) -> ApiResult<AuditFilter> {
    let own = caller.user.id.to_string();
    let user_id = match query.user_id {
        Some(other) if !caller.user.is_admin() && other != own => {
            return Err(ApiError::forbidden("user_id: only admins read other users' requests"))
        }
        _ if !caller.user.is_admin() => Some(own),
        user_id => user_id,
    };
    if let Some(decision) = &query.decision {
        if !matches!(decision.as_str(), "allowed" | "denied" | "none") {
            return Err(ApiError::bad_request("decision: one of allowed, denied, none"));
        }
    }
    if let (Some(since), Some(until)) = (query.since, query.until) {
        if since >= until {
            return Err(ApiError::bad_request("since: must be before until"));
        }
    }
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!("limit: between 1 and {MAX_LIMIT}")));
    }
    // No longer than what a record can hold.
    for (field, value, max) in [
        ("cursor", &query.cursor, 128),
        ("user_id", &user_id, 512),
        ("target", &query.target, 512),
        ("method", &query.method, 256),
        ("name", &query.name, 4096),
    ] {
        if value.as_ref().is_some_and(|v| v.len() > max) {
            return Err(ApiError::bad_request(format!("{field}: at most {max} bytes")));
        }
    }
    Ok(AuditFilter {
        user_id,
        target: query.target,
        method: query.method,
        name: query.name,
        decision: query.decision,
        since: query.since,
        until: query.until,
        limit,
        offset: query.offset.unwrap_or(0),
        after: query.cursor,
    })
}

/// Audit records, newest first.
#[utoipa::path(get, path = "/api/logs", tag = "logs", security(("bearer" = [])), params(LogQuery),
    responses(
        (status = 200, body = [RequestLog], headers(("x-next-cursor" = String, description = "Pass as `cursor` for the next page; absent on the last"))),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<LogQuery>,
) -> ApiResult<Response> {
    let filter = filter(&caller, query)?;
    let records = state.store.list_audit(&filter).await?;
    let next = (records.len() == filter.limit as usize).then(|| records.last().map(|r| r.id.clone())).flatten();
    let logs: Vec<RequestLog> = records.into_iter().map(RequestLog::from).collect();
    let mut response = Json(logs).into_response();
    if let Some(next) = next.and_then(|id| HeaderValue::from_str(&id).ok()) {
        response.headers_mut().insert(NEXT_CURSOR, next);
    }
    Ok(response)
}

/// Every matching audit record, newest first, as NDJSON (one `RequestLog` per line), read
/// page by page while it streams.
#[utoipa::path(get, path = "/api/logs/export", tag = "logs", security(("bearer" = [])), params(LogQuery),
    responses((status = 200, content_type = "application/x-ndjson", body = RequestLog),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn export(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(mut query): ApiQuery<LogQuery>,
) -> ApiResult<Response> {
    query.limit = None;
    let mut filter = filter(&caller, query)?;
    filter.limit = EXPORT_PAGE;
    // The first page is read before answering, so a store that is away is a clear 503.
    let first = state.store.list_audit(&filter).await?;
    let state_store = state.store.clone();
    // State: the page to write next, or the store's failure to end the body with.
    let pages = futures::stream::unfold(Some(Ok((first, filter))), move |state| {
        let store = state_store.clone();
        async move {
            let (records, mut filter) = match state? {
                Ok(page) => page,
                // The body is cut short: an NDJSON reader sees the stream end in an error.
                Err(error) => return Some((Err(std::io::Error::other(error)), None)),
            };
            if records.is_empty() {
                return None;
            }
            let mut text = String::new();
            for record in &records {
                let line = serde_json::to_string(&RequestLog::from(record.clone())).expect("a log serialises");
                text.push_str(&line);
                text.push('\n');
            }
            let next = if records.len() < filter.limit as usize {
                None
            } else {
                filter.after = records.last().map(|r| r.id.clone());
                filter.offset = 0;
                Some(store.list_audit(&filter).await.map(|records| (records, filter)).map_err(|error| {
                    tracing::error!(%error, "audit export stopped: the store failed");
                    error.to_string()
                }))
            };
            Some((Ok::<_, std::io::Error>(text), next))
        }
    });
    let mut response = Body::from_stream(pages).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    Ok(response)
}
