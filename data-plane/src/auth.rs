//! Authentication of MCP clients from the snapshot alone: no database on the request path.
//!
//! `Authorization: Bearer` with a control-plane JWT (HS256 only; `exp`, `nbf`, `iat`, `iss`,
//! `aud`, `sub` required and checked) or an `rfl_` API token (looked up by SHA-256). The
//! user must exist in the snapshot and be active. Tokens in the query string are refused.

use axum::http::{header, HeaderMap};
use reflow_common::bearer::bearer_token;
use reflow_common::crypto::to_hex;
use reflow_proto::resources;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::snapshot::View;

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
}

/// Why a request was not authenticated; the message is safe to return.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuthFailure(pub &'static str);

/// The authenticated user.
pub fn authenticate<'v>(
    view: &'v View,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<&'v resources::User, AuthFailure> {
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    let token = bearer_token(authorization, query).map_err(AuthFailure)?;
    let user_id = if token.starts_with("rfl_") {
        let hash = to_hex(&Sha256::digest(token.as_bytes()));
        let api_token = view.tokens_by_hash.get(&hash).ok_or(AuthFailure("API token is invalid or revoked"))?;
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        if api_token.expires_at.is_some_and(|at| at <= now) {
            return Err(AuthFailure("API token has expired"));
        }
        api_token.user_id.as_str()
    } else {
        let claims =
            jsonwebtoken::decode::<Claims>(token, &view.jwt.key, &view.jwt.validation).map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthFailure("token has expired"),
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthFailure("token is not yet valid"),
                _ => AuthFailure("token is invalid"),
            })?;
        return lookup(view, &claims.claims.sub);
    };
    lookup(view, user_id)
}

fn lookup<'v>(view: &'v View, user_id: &str) -> Result<&'v resources::User, AuthFailure> {
    let user = view.users.get(user_id).ok_or(AuthFailure("the token's user does not exist"))?;
    if !user.active {
        return Err(AuthFailure("account is deactivated"));
    }
    Ok(user)
}
