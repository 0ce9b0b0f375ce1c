//! The control plane's JWTs, issued by the control plane and verified by every role the same
//! way.
//!
//! Tokens are signed with Ed25519 (`EdDSA`). The signing key is derived from `jwt.secret` with
//! HKDF-SHA256, so control-plane replicas that share the secret share the key pair and no new
//! setting is needed; only the **public** key travels in snapshots. A data plane, its cache or
//! its token therefore let nobody mint a token: verifying is all they can do.
//!
//! [`Verifier`] is the one verification both planes run: EdDSA only (never `none`, HMAC or
//! another curve), every claim of [`Claims`] required (`iat` and `jti` included, which
//! `jsonwebtoken`'s own required-claims list cannot express), issuer and audience pinned, `exp`
//! and `nbf` checked with [`LEEWAY_SECS`] of leeway (set explicitly: the library's defaults skip
//! `nbf` and allow 60 s). Its errors are the messages both planes return.

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 5;
/// Longest bearer credential examined at all; anything longer is refused before parsing.
pub const MAX_TOKEN_LEN: usize = crate::bearer::MAX_BEARER_LEN;
/// The JWS algorithm of every token the control plane issues.
pub const ALGORITHM: &str = "EdDSA";
/// HKDF purpose of the Ed25519 seed derived from `jwt.secret`.
const SEED_PURPOSE: &[u8] = b"reflow/jwt-ed25519/v1";
/// PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410): this prefix, then the 32 seed bytes.
const PKCS8_ED25519_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// The claims of a token the control plane issues. Every field is required.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    pub email: String,
    pub role: String,
    pub groups: Vec<String>,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    /// Unique token id.
    pub jti: String,
}

/// Why a JWT was refused. The messages are what both planes return to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is too long")]
    TooLong,
    #[error("token has expired")]
    Expired,
    #[error("token is not yet valid")]
    NotYetValid,
    #[error("token is invalid")]
    Invalid,
}

fn seed(secret: &[u8]) -> [u8; 32] {
    let mut seed = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(None, secret)
        .expand(SEED_PURPOSE, &mut seed)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    seed
}

/// The public half of the key pair derived from `secret`: what snapshots carry.
pub fn public_key(secret: &[u8]) -> [u8; 32] {
    use ring::signature::KeyPair as _;
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed(secret)).expect("any 32 bytes are a seed");
    pair.public_key().as_ref().try_into().expect("an Ed25519 public key is 32 bytes")
}

/// Signs tokens (the control plane only).
pub struct Signer {
    key: EncodingKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// The signer of the key pair derived from `secret`.
    pub fn from_secret(secret: &[u8]) -> Self {
        let mut pkcs8 = PKCS8_ED25519_PREFIX.to_vec();
        pkcs8.extend_from_slice(&seed(secret));
        Signer { key: EncodingKey::from_ed_der(&pkcs8) }
    }

    /// Signs `claims` (normally [`Claims`]; tests sign malformed ones too).
    pub fn sign<T: Serialize>(&self, claims: &T) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &self.key).expect("Ed25519 signing does not fail")
    }
}

/// Verifies tokens: the same check on every role.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("issuer", &self.validation.iss).finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for tokens signed by `public_key` for `issuer` and `audience`.
    pub fn new(public_key: &[u8; 32], issuer: &str, audience: &str) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.algorithms = vec![Algorithm::EdDSA];
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        Verifier { key: DecodingKey::from_ed_der(public_key), validation }
    }

    /// A verifier from the base64url public key a snapshot carries.
    pub fn from_encoded(public_key: &str, issuer: &str, audience: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(public_key)
            .map_err(|e| format!("the JWT public key is not base64url: {e}"))?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| "the JWT public key is not 32 bytes (Ed25519)".to_string())?;
        Ok(Verifier::new(&key, issuer, audience))
    }

    /// The leeway on time claims, in seconds.
    pub fn leeway(&self) -> i64 {
        self.validation.leeway as i64
    }

    /// Checks signature, algorithm and every claim.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map(|data| data.claims).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
            jsonwebtoken::errors::ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            _ => TokenError::Invalid,
        })
    }
}

/// The base64url form of a public key, as snapshots carry it.
pub fn encode_public_key(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: i64) -> Claims {
        Claims {
            sub: "u1".into(),
            email: "a@example.com".into(),
            role: "admin".into(),
            groups: vec![],
            iss: "reflow".into(),
            aud: "reflow".into(),
            iat: now,
            nbf: now,
            exp: now + 60,
            jti: "j".into(),
        }
    }

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[test]
    fn signed_tokens_verify_with_the_public_key_only() {
        let secret = b"a secret of at least thirty-two bytes!";
        let token = Signer::from_secret(secret).sign(&claims(now()));
        let verifier = Verifier::from_encoded(&encode_public_key(&public_key(secret)), "reflow", "reflow").unwrap();
        assert_eq!(verifier.verify(&token).unwrap().sub, "u1");
        let other = Verifier::new(&public_key(b"another secret of thirty-two bytes!!"), "reflow", "reflow");
        assert_eq!(other.verify(&token), Err(TokenError::Invalid));
        assert_eq!(Verifier::new(&public_key(secret), "other", "reflow").verify(&token), Err(TokenError::Invalid));
        assert_eq!(Verifier::new(&public_key(secret), "reflow", "other").verify(&token), Err(TokenError::Invalid));
    }

    #[test]
    fn hmac_tokens_are_refused_even_with_the_public_key_as_secret() {
        let secret = b"a secret of at least thirty-two bytes!";
        let public = public_key(secret);
        let verifier = Verifier::new(&public, "reflow", "reflow");
        for key in [&secret[..], &public[..], encode_public_key(&public).as_bytes()] {
            let token =
                jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims(now()), &EncodingKey::from_secret(key))
                    .unwrap();
            assert_eq!(verifier.verify(&token), Err(TokenError::Invalid));
        }
    }

    #[test]
    fn every_claim_is_required_and_time_is_checked() {
        let secret = b"a secret of at least thirty-two bytes!";
        let verifier = Verifier::new(&public_key(secret), "reflow", "reflow");
        let signer = Signer::from_secret(secret);
        let full = serde_json::to_value(claims(now())).unwrap();
        for missing in ["sub", "email", "role", "groups", "iss", "aud", "iat", "nbf", "exp", "jti"] {
            let mut partial = full.clone();
            partial.as_object_mut().unwrap().remove(missing);
            let token = signer.sign(&partial);
            assert_eq!(verifier.verify(&token), Err(TokenError::Invalid), "without {missing}");
        }
        let mut expired = claims(now() - 120);
        expired.exp = now() - 60;
        assert_eq!(verifier.verify(&signer.sign(&expired)), Err(TokenError::Expired));
        let mut future = claims(now());
        future.nbf = now() + 60;
        assert_eq!(verifier.verify(&signer.sign(&future)), Err(TokenError::NotYetValid));
        assert_eq!(verifier.verify(&"a".repeat(MAX_TOKEN_LEN + 1)), Err(TokenError::TooLong));
    }

    #[test]
    fn the_key_pair_is_the_same_for_the_same_secret() {
        assert_eq!(
            public_key(b"s1 s1 s1 s1 s1 s1 s1 s1 s1 s1 s1 s1"),
            public_key(b"s1 s1 s1 s1 s1 s1 s1 s1 s1 s1 s1 s1")
        );
        assert_ne!(
            public_key(b"s1 s1 s1 s1 s1 s1 s1 s1 s1 s1 s1 s1"),
            public_key(b"s2 s2 s2 s2 s2 s2 s2 s2 s2 s2 s2 s2")
        );
    }
}
