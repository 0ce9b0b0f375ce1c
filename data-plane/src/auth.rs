//! Authentication of MCP clients from the snapshot alone: no database on the request path.
//!
//! `Authorization: Bearer` with a control-plane JWT (HS256 only; `exp`, `nbf`, `iat`, `iss`,
//! `aud`, `sub` required and checked) or an `rfl_` API token (looked up by SHA-256). The
//! user must exist in the snapshot and be active. Tokens in the query string are refused.

use std::fmt::Write as _;

use axum::http::{header, HeaderMap};
use jsonwebtoken::{Algorithm, Validation};
use reflow_proto::resources;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::snapshot::View;

/// Longest bearer credential examined.
pub const MAX_BEARER_LEN: usize = 8 * 1024;
const LEEWAY_SECS: u64 = 5;

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
    if query.is_some_and(|q| {
        q.split('&').any(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            name.eq_ignore_ascii_case("token") || name.eq_ignore_ascii_case("access_token")
        })
    }) {
        return Err(AuthFailure("tokens in the query string are refused; send Authorization: Bearer <token>"));
    }
    let value =
        headers.get(header::AUTHORIZATION).ok_or(AuthFailure("missing Authorization: Bearer <token> header"))?;
    if value.len() > MAX_BEARER_LEN + 16 {
        return Err(AuthFailure("token is too long"));
    }
    let value = value.to_str().map_err(|_| AuthFailure("malformed Authorization header"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthFailure("Authorization header must be: Bearer <token>"))?;
    let user_id = if token.starts_with("rfl_") {
        let digest = Sha256::digest(token.as_bytes());
        let mut hash = String::with_capacity(64);
        for byte in digest {
            let _ = write!(hash, "{byte:02x}");
        }
        let api_token = view.tokens_by_hash.get(&hash).ok_or(AuthFailure("API token is invalid or revoked"))?;
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        if api_token.expires_at.is_some_and(|at| at <= now) {
            return Err(AuthFailure("API token has expired"));
        }
        api_token.user_id.as_str()
    } else {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&view.jwt.issuer]);
        validation.set_audience(&[&view.jwt.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &view.jwt.key, &validation).map_err(|e| match e.kind() {
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
