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
    exp: i64,
    nbf: i64,
}

/// At most this many verified JWTs are remembered per snapshot; the memory is cleared when full.
const VERIFIED_CAPACITY: usize = 65_536;

/// JWTs already verified under one snapshot's key (a new snapshot starts empty): verifying
/// (an HMAC and two JSON decodes) is most of what authenticating a request costs, and a client
/// sends the same token with every request. A remembered token still has its time bounds
/// checked at every use, and its user looked up in the snapshot. Only tokens that verified are
/// remembered, so a client cannot fill this with garbage.
#[derive(Debug, Default)]
pub struct VerifiedTokens(std::sync::RwLock<std::collections::HashMap<String, Verified>>);

#[derive(Debug, Clone)]
struct Verified {
    sub: String,
    not_before: i64,
    expires: i64,
}

impl VerifiedTokens {
    fn get(&self, token: &str) -> Option<Verified> {
        self.0.read().unwrap().get(token).cloned()
    }

    fn remember(&self, token: &str, verified: Verified) {
        let mut tokens = self.0.write().unwrap();
        if tokens.len() >= VERIFIED_CAPACITY {
            tokens.clear();
        }
        tokens.insert(token.to_string(), verified);
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A JWT's subject: from the remembered verification when there is one (time bounds checked
/// as jsonwebtoken checks them, with the same leeway), verified and remembered otherwise.
fn jwt_subject(view: &View, token: &str) -> Result<String, AuthFailure> {
    let leeway = view.jwt.validation.leeway as i64;
    if let Some(known) = view.jwt.verified.get(token) {
        let now = unix_now();
        if known.expires < now - leeway {
            return Err(AuthFailure("token has expired"));
        }
        if known.not_before > now + leeway {
            return Err(AuthFailure("token is not yet valid"));
        }
        return Ok(known.sub);
    }
    let claims = jsonwebtoken::decode::<Claims>(token, &view.jwt.key, &view.jwt.validation)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthFailure("token has expired"),
            jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthFailure("token is not yet valid"),
            _ => AuthFailure("token is invalid"),
        })?
        .claims;
    view.jwt
        .verified
        .remember(token, Verified { sub: claims.sub.clone(), not_before: claims.nbf, expires: claims.exp });
    Ok(claims.sub)
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
        if api_token.expires_at.is_some_and(|at| at <= unix_now()) {
            return Err(AuthFailure("API token has expired"));
        }
        api_token.user_id.as_str()
    } else {
        return lookup(view, &jwt_subject(view, token)?);
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
