//! Authentication of MCP clients from the snapshot alone: no database on the request path.
//!
//! `Authorization: Bearer` with a control-plane JWT (verified with the snapshot's Ed25519 public
//! key by [`reflow_common::jwt::Verifier`], the same check the control plane runs) or an
//! `rfl_` API token (looked up by SHA-256). The user must exist in the snapshot and be active.
//! Tokens in the query string are refused. The refusals are [`AuthFailure`]s, whose messages
//! the admin API returns for the same credentials.

use axum::http::{header, HeaderMap};
use reflow_common::bearer::bearer_token;
use reflow_common::crypto::to_hex;
use reflow_proto::resources;
use sha2::{Digest, Sha256};

use crate::snapshot::View;

use crate::snapshot::Verified;
use reflow_common::text::unix_now;

/// A JWT's subject: from the remembered verification when there is one (time bounds checked
/// as jsonwebtoken checks them, with the same leeway), verified and remembered otherwise.
fn jwt_subject(view: &View, token: &str) -> Result<String, AuthFailure> {
    use reflow_common::jwt::TokenError;
    let leeway = view.jwt.verifier.leeway();
    if let Some(known) = view.jwt.verified.get(token) {
        let now = unix_now();
        if known.expires < now - leeway {
            return Err(AuthFailure::Token(TokenError::Expired));
        }
        if known.not_before > now + leeway {
            return Err(AuthFailure::Token(TokenError::NotYetValid));
        }
        return Ok(known.sub);
    }
    let claims = view.jwt.verifier.verify(token).map_err(AuthFailure::Token)?;
    view.jwt
        .verified
        .remember(token, Verified { sub: claims.sub.clone(), not_before: claims.nbf, expires: claims.exp });
    Ok(claims.sub)
}

pub use reflow_common::bearer::AuthFailure;

/// The authenticated user.
pub fn authenticate<'v>(
    view: &'v View,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<&'v resources::User, AuthFailure> {
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    let token = bearer_token(authorization, query).map_err(AuthFailure::Header)?;
    let user_id = if token.starts_with("rfl_") {
        let hash = to_hex(&Sha256::digest(token.as_bytes()));
        let api_token = view.tokens_by_hash.get(&hash).ok_or(AuthFailure::UnknownApiToken)?;
        if api_token.expires_at.is_some_and(|at| at <= unix_now()) {
            return Err(AuthFailure::ExpiredApiToken);
        }
        api_token.user_id.as_str()
    } else {
        return lookup(view, &jwt_subject(view, token)?);
    };
    lookup(view, user_id)
}

fn lookup<'v>(view: &'v View, user_id: &str) -> Result<&'v resources::User, AuthFailure> {
    let user = view.users.get(user_id).ok_or(AuthFailure::UnknownUser)?;
    if !user.active {
        return Err(AuthFailure::Deactivated);
    }
    Ok(user)
}
