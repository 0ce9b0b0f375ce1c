//! Forged and invalid credentials: every one is answered 401 with a `WWW-Authenticate`
//! challenge, and the admin API and the MCP endpoint give the same answer (the same status and
//! message) for each, since both run the same checks (the data plane from its snapshot alone,
//! holding only the public key of the control plane's Ed25519 signing key).

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use reflow_e2e::harness::Gateway;
use serde_json::{json, Value};
use sha2::Sha256;

/// The harness's JWT secret, issuer and audience (the config defaults).
const SECRET: &[u8] = b"e2e-jwt-secret-e2e-jwt-secret-e2e!";

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWT with any header and claims, HMAC-SHA256-signed with `key` (whatever `alg` says).
fn forge(header: Value, claims: Value, key: &[u8]) -> String {
    let signing_input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()))
}

/// A JWT with any claims (malformed ones too), signed with the Ed25519 key the control plane
/// derives from `secret` (the gateway's own key when `secret` is [`SECRET`]).
fn signed(claims: Value, secret: &[u8]) -> String {
    reflow_common::jwt::Signer::from_secret(secret).sign(&claims)
}

fn claims(sub: &str) -> Value {
    let t = now();
    json!({"sub": sub, "email": "x@example.com", "role": "admin", "groups": [], "iss": "reflow", "aud": "reflow",
           "iat": t, "nbf": t, "exp": t + 600, "jti": "e2e"})
}

fn with(mut value: Value, key: &str, replacement: Value) -> Value {
    if replacement.is_null() {
        value.as_object_mut().unwrap().remove(key);
    } else {
        value[key] = replacement;
    }
    value
}

fn hs(alg: &str, claims: Value, secret: &[u8]) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret);
    let algorithm = match alg {
        "HS384" => jsonwebtoken::Algorithm::HS384,
        "HS512" => jsonwebtoken::Algorithm::HS512,
        _ => jsonwebtoken::Algorithm::HS256,
    };
    jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), &claims, &key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_are_refused_alike_by_the_admin_api_and_the_mcp_endpoint() {
    let gateway = Gateway::start().await.unwrap();
    let admin = gateway.user_id(&gateway.admin_token).await.unwrap();
    let (gone_id, _) = gateway.user("gone@example.com").await.unwrap();
    gateway
        .admin(reqwest::Method::PUT, &format!("/api/users/{gone_id}"), Some(json!({"active": false})))
        .await
        .unwrap();
    let api_token: Value = gateway.post("/api/auth/tokens", json!({"name": "revoked"})).await.unwrap();
    gateway
        .admin(reqwest::Method::DELETE, &format!("/api/auth/tokens/{}", api_token["id"].as_str().unwrap()), None)
        .await
        .unwrap();
    let revoked = api_token["token"].as_str().unwrap().to_string();

    let valid = signed(claims(&admin), SECRET);
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let parts: Vec<&str> = valid.split('.').collect();
    let t = now();
    let mut tampered_claims = claims(&admin);
    tampered_claims["role"] = json!("superuser");
    let tampered = format!("{}.{}.{}", parts[0], b64(tampered_claims.to_string().as_bytes()), parts[2]);
    let public_key = reflow_common::jwt::public_key(SECRET);
    let public_b64 = reflow_common::jwt::encode_public_key(&public_key);
    let eddsa_header_hmac = forge(json!({"alg": "EdDSA", "typ": "JWT"}), claims(&admin), SECRET);

    let cases: Vec<(&str, Option<String>)> = vec![
        ("no header", None),
        ("empty bearer", Some("Bearer ".into())),
        ("basic scheme", Some(format!("Basic {}", b64(b"admin@example.com:e2e-admin-password")))),
        ("alg none, unsigned", Some(format!("Bearer {}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), parts[1]))),
        ("alg none, signed", Some(format!("Bearer {}", forge(json!({"alg": "none"}), claims(&admin), SECRET)))),
        ("alg None", Some(format!("Bearer {}", forge(json!({"alg": "None"}), claims(&admin), SECRET)))),
        ("lowercase alg", Some(format!("Bearer {}", forge(json!({"alg": "hs256"}), claims(&admin), SECRET)))),
        ("HS384 with the right secret", Some(format!("Bearer {}", hs("HS384", claims(&admin), SECRET)))),
        ("HS512 with the right secret", Some(format!("Bearer {}", hs("HS512", claims(&admin), SECRET)))),
        (
            "RS256 header, HMAC signature",
            Some(format!("Bearer {}", forge(json!({"alg": "RS256"}), claims(&admin), SECRET))),
        ),
        (
            "ES256 header, HMAC signature",
            Some(format!("Bearer {}", forge(json!({"alg": "ES256"}), claims(&admin), SECRET))),
        ),
        ("stripped signature", Some(format!("Bearer {}.{}.", parts[0], parts[1]))),
        ("two parts", Some(format!("Bearer {}.{}", parts[0], parts[1]))),
        ("HS256 with the JWT secret (the old scheme)", Some(format!("Bearer {}", hs("HS256", claims(&admin), SECRET)))),
        (
            "HS256 with the public key as the secret",
            Some(format!("Bearer {}", hs("HS256", claims(&admin), &public_key))),
        ),
        (
            "HS256 with the encoded public key as the secret",
            Some(format!("Bearer {}", hs("HS256", claims(&admin), public_b64.as_bytes()))),
        ),
        ("EdDSA header, HMAC signature", Some(format!("Bearer {eddsa_header_hmac}"))),
        (
            "Ed25519 with another key",
            Some(format!("Bearer {}", signed(claims(&admin), b"another-secret-another-secret!!!!!"))),
        ),
        ("empty secret", Some(format!("Bearer {}", forge(hs256.clone(), claims(&admin), b"")))),
        ("tampered payload", Some(format!("Bearer {tampered}"))),
        (
            "kid path injection",
            Some(format!("Bearer {}", forge(json!({"alg": "HS256", "kid": "../../dev/null"}), claims(&admin), b""))),
        ),
        (
            "jku elsewhere",
            Some(format!(
                "Bearer {}",
                forge(json!({"alg": "HS256", "jku": "http://evil.example/jwks"}), claims(&admin), b"evil")
            )),
        ),
        ("expired", Some(format!("Bearer {}", signed(with(claims(&admin), "exp", json!(t - 60)), SECRET)))),
        ("future nbf", Some(format!("Bearer {}", signed(with(claims(&admin), "nbf", json!(t + 600)), SECRET)))),
        ("wrong issuer", Some(format!("Bearer {}", signed(with(claims(&admin), "iss", json!("evil")), SECRET)))),
        ("wrong audience", Some(format!("Bearer {}", signed(with(claims(&admin), "aud", json!("other")), SECRET)))),
        ("no exp", Some(format!("Bearer {}", signed(with(claims(&admin), "exp", Value::Null), SECRET)))),
        ("no nbf", Some(format!("Bearer {}", signed(with(claims(&admin), "nbf", Value::Null), SECRET)))),
        ("no iss", Some(format!("Bearer {}", signed(with(claims(&admin), "iss", Value::Null), SECRET)))),
        ("no aud", Some(format!("Bearer {}", signed(with(claims(&admin), "aud", Value::Null), SECRET)))),
        ("no sub", Some(format!("Bearer {}", signed(with(claims(&admin), "sub", Value::Null), SECRET)))),
        ("no iat", Some(format!("Bearer {}", signed(with(claims(&admin), "iat", Value::Null), SECRET)))),
        ("no jti", Some(format!("Bearer {}", signed(with(claims(&admin), "jti", Value::Null), SECRET)))),
        ("no email", Some(format!("Bearer {}", signed(with(claims(&admin), "email", Value::Null), SECRET)))),
        ("no groups", Some(format!("Bearer {}", signed(with(claims(&admin), "groups", Value::Null), SECRET)))),
        ("exp as a string", Some(format!("Bearer {}", signed(with(claims(&admin), "exp", json!("never")), SECRET)))),
        ("unknown user", Some(format!("Bearer {}", signed(claims("00000000-0000-0000-0000-000000000000"), SECRET)))),
        ("deactivated user", Some(format!("Bearer {}", signed(claims(&gone_id), SECRET)))),
        ("subject not a user id", Some(format!("Bearer {}", signed(claims("not-a-uuid"), SECRET)))),
        ("oversized", Some(format!("Bearer {}", "a".repeat(20_000)))),
        ("garbage", Some("Bearer abc.def.ghi".into())),
        ("unknown API token", Some("Bearer rfl_0000000000000000000000000000000000000000".into())),
        ("revoked API token", Some(format!("Bearer {revoked}"))),
    ];
    assert!(cases.len() >= 30);

    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                      "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    // The MCP endpoint: (status, challenge, message).
    let mcp = |authorization: Option<String>, query: String| {
        let mut request = gateway
            .http
            .post(format!("{}/mcp{query}", gateway.mcp))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(init.to_string());
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let challenge = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if status == 401 {
                assert_eq!(body["error"]["code"], -32001, "{body}");
            }
            (status, challenge.is_some_and(|c| c.starts_with("Bearer")), body["error"]["message"].clone())
        }
    };
    // The admin API, the same credential: (status, challenge, message).
    let api = |authorization: Option<String>, query: String| {
        let mut request = gateway.http.get(format!("{}/api/auth/me{query}", gateway.api));
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let challenge = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, challenge.is_some_and(|c| c.starts_with("Bearer")), body["error"].clone())
        }
    };
    let control = Some(format!("Bearer {valid}"));
    assert_eq!(mcp(control.clone(), String::new()).await.0, 200, "the control case: a correctly signed token");
    assert_eq!(api(control, String::new()).await.0, 200, "the control case on the admin API");
    for (name, authorization) in cases {
        let at_mcp = mcp(authorization.clone(), String::new()).await;
        let at_api = api(authorization, String::new()).await;
        assert_eq!(at_mcp.0, 401, "{name}: {at_mcp:?}");
        assert!(at_mcp.1, "{name}: no challenge");
        assert!(at_mcp.2.is_string(), "{name}: {at_mcp:?}");
        assert_eq!(at_api, at_mcp, "{name}: the admin API and the MCP endpoint answer alike");
    }
    // Tokens in the query string are refused, even next to a valid header, on both.
    for (authorization, query) in
        [(None, format!("?access_token={valid}")), (Some(format!("Bearer {valid}")), format!("?token={valid}"))]
    {
        let at_mcp = mcp(authorization.clone(), query.clone()).await;
        assert_eq!(at_mcp.0, 401);
        assert_eq!(api(authorization, query).await, at_mcp);
    }
    gateway.stop().await;
}
