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

/// Why a request was not authenticated, on either plane: the same credential gets the same
/// message from the admin API and from the MCP endpoint. Messages are safe to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// The `Authorization` header is missing or malformed (see [`bearer_token`]).
    #[error("{0}")]
    Header(&'static str),
    #[error(transparent)]
    Token(#[from] crate::jwt::TokenError),
    #[error("API token is invalid or revoked")]
    UnknownApiToken,
    #[error("API token has expired")]
    ExpiredApiToken,
    #[error("the token's user does not exist")]
    UnknownUser,
    #[error("account is deactivated")]
    Deactivated,
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
