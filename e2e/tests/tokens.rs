//! Forged and invalid credentials at the MCP endpoint: every one is answered 401 with a
//! `WWW-Authenticate` challenge and a JSON-RPC error body, decided from the snapshot alone.

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

fn claims(sub: &str) -> Value {
    let t = now();
    json!({"sub": sub, "email": "x@example.com", "role": "admin", "groups": [], "iss": "reflow", "aud": "reflow",
           "iat": t, "nbf": t, "exp": t + 600})
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
async fn forged_tokens_are_all_refused_with_a_challenge() {
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

    let valid = forge(json!({"alg": "HS256", "typ": "JWT"}), claims(&admin), SECRET);
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let parts: Vec<&str> = valid.split('.').collect();
    let t = now();
    let mut tampered_claims = claims(&admin);
    tampered_claims["role"] = json!("superuser");
    let tampered = format!("{}.{}.{}", parts[0], b64(tampered_claims.to_string().as_bytes()), parts[2]);

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
        (
            "wrong secret",
            Some(format!("Bearer {}", forge(hs256.clone(), claims(&admin), b"another-secret-another-secret!!"))),
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
        (
            "expired",
            Some(format!("Bearer {}", forge(hs256.clone(), with(claims(&admin), "exp", json!(t - 60)), SECRET))),
        ),
        (
            "future nbf",
            Some(format!("Bearer {}", forge(hs256.clone(), with(claims(&admin), "nbf", json!(t + 600)), SECRET))),
        ),
        (
            "wrong issuer",
            Some(format!("Bearer {}", forge(hs256.clone(), with(claims(&admin), "iss", json!("evil")), SECRET))),
        ),
        (
            "wrong audience",
            Some(format!("Bearer {}", forge(hs256.clone(), with(claims(&admin), "aud", json!("other")), SECRET))),
        ),
        ("no exp", Some(format!("Bearer {}", forge(hs256.clone(), with(claims(&admin), "exp", Value::Null), SECRET)))),
        ("no nbf", Some(format!("Bearer {}", forge(hs256.clone(), with(claims(&admin), "nbf", Value::Null), SECRET)))),
        ("no iss", Some(format!("Bearer {}", forge(hs256.clone(), with(claims(&admin), "iss", Value::Null), SECRET)))),
        ("no aud", Some(format!("Bearer {}", forge(hs256.clone(), with(claims(&admin), "aud", Value::Null), SECRET)))),
        ("no sub", Some(format!("Bearer {}", forge(hs256.clone(), with(claims(&admin), "sub", Value::Null), SECRET)))),
        (
            "unknown user",
            Some(format!("Bearer {}", forge(hs256.clone(), claims("00000000-0000-0000-0000-000000000000"), SECRET))),
        ),
        ("deactivated user", Some(format!("Bearer {}", forge(hs256.clone(), claims(&gone_id), SECRET)))),
        ("oversized", Some(format!("Bearer {}", "a".repeat(20_000)))),
        ("garbage", Some("Bearer abc.def.ghi".into())),
        ("unknown API token", Some("Bearer rfl_0000000000000000000000000000000000000000".into())),
        ("revoked API token", Some(format!("Bearer {revoked}"))),
    ];
    assert!(cases.len() >= 25);

    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                      "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let attempt = |authorization: Option<String>, query: &str| {
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
            (status, challenge, body)
        }
    };
    let (status, _, _) = attempt(Some(format!("Bearer {valid}")), "").await;
    assert_eq!(status, 200, "the control case: a correctly signed token is accepted");
    for (name, authorization) in cases {
        let (status, challenge, body) = attempt(authorization, "").await;
        assert_eq!(status, 401, "{name}: {body}");
        assert!(challenge.is_some_and(|c| c.starts_with("Bearer")), "{name}: no challenge");
        assert_eq!(body["error"]["code"], -32001, "{name}: {body}");
    }
    // Tokens in the query string are refused, even next to a valid header.
    let (status, _, _) = attempt(None, &format!("?access_token={valid}")).await;
    assert_eq!(status, 401);
    let (status, _, body) = attempt(Some(format!("Bearer {valid}")), &format!("?token={valid}")).await;
    assert_eq!(status, 401, "{body}");
    gateway.stop().await;
}
