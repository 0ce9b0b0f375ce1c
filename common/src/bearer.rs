//! Reading a bearer credential from a request, identically on the control plane's admin API
//! and the data plane's MCP endpoint.

/// Longest bearer credential examined at all; anything longer is refused before parsing.
pub const MAX_BEARER_LEN: usize = 8 * 1024;

/// The token in `Authorization: Bearer <token>`. Tokens in the query string (`token`,
/// `access_token`) are refused even when a header is present, so they never end up in logs
/// or proxies. The error is a message safe to return to the client.
pub fn bearer_token<'a>(authorization: Option<&'a [u8]>, query: Option<&str>) -> Result<&'a str, &'static str> {
    let in_query = query.is_some_and(|q| {
        q.split('&').any(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            name.eq_ignore_ascii_case("token") || name.eq_ignore_ascii_case("access_token")
        })
    });
    if in_query {
        return Err("tokens in the query string are refused; send Authorization: Bearer <token>");
    }
    let value = authorization.ok_or("missing Authorization: Bearer <token> header")?;
    if value.len() > MAX_BEARER_LEN + 16 {
        return Err("token is too long");
    }
    if !value.iter().all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\t') {
        return Err("malformed Authorization header");
    }
    let value = std::str::from_utf8(value).map_err(|_| "malformed Authorization header")?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or("Authorization header must be: Bearer <token>")
}

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const JWT_LEEWAY_SECS: u64 = 5;

/// How every role verifies the control plane's JWTs: HS256 only (never `none` or another
/// algorithm), `exp`, `nbf`, `iat`, `iss`, `aud` and `sub` required, issuer and audience
/// checked, a small fixed leeway. Set explicitly: the library's defaults skip `nbf` and allow
/// 60 s of leeway.
pub fn jwt_validation(issuer: &str, audience: &str) -> jsonwebtoken::Validation {
    use jsonwebtoken::{Algorithm, Validation};
    let mut validation = Validation::new(Algorithm::HS256);
    validation.algorithms = vec![Algorithm::HS256];
    validation.leeway = JWT_LEEWAY_SECS;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
    validation
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_bearer_headers() {
        assert_eq!(bearer_token(Some(b"Bearer abc"), None), Ok("abc"));
        assert_eq!(bearer_token(Some(b"bearer abc "), Some("x=1")), Ok("abc"));
        assert!(bearer_token(None, None).is_err());
        assert!(bearer_token(Some(b"Basic abc"), None).is_err());
        assert!(bearer_token(Some(b"Bearer "), None).is_err());
        assert!(bearer_token(Some(b"Bearer abc"), Some("a=1&Access_Token=abc")).is_err());
        assert!(bearer_token(Some(&[b'a'; MAX_BEARER_LEN + 17]), None).is_err());
    }
}
