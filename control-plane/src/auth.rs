//! Identity primitives: password hashing, the JWTs the control plane issues, and API tokens.
//!
//! - Passwords are hashed with Argon2id (memory-hard) on a blocking thread.
//! - JWTs are Ed25519-signed with a key pair derived from `jwt.secret`, and verified by
//!   [`reflow_common::jwt::Verifier`], the check data planes run too (they hold only the
//!   public key).
//! - API tokens are `rfl_` + 43 random URL-safe characters. Only their SHA-256 is stored.

use std::time::Duration;

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use rand::RngCore;
use reflow_common::jwt::{Signer, Verifier};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::store::User;

/// Prefix of every API token, so a token is recognisable in a leak scanner and is never
/// mistaken for a JWT.
pub const API_TOKEN_PREFIX: &str = "rfl_";
pub use reflow_common::bearer::MAX_BEARER_LEN;

/// Hashes a password with Argon2id and a random salt.
pub async fn hash_password(password: String) -> String {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default().hash_password(password.as_bytes(), &salt).expect("argon2 with default parameters").to_string()
    })
    .await
    .expect("password hashing task")
}

/// Verifies a password against a stored hash. With no hash (unknown user) it still does the
/// work of one verification, so response time does not reveal whether an email exists.
pub async fn verify_password(password: String, hash: Option<String>) -> bool {
    tokio::task::spawn_blocking(move || {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(dummy_hash);
        let Ok(parsed) = PasswordHash::new(&hash) else {
            return false;
        };
        let matches = Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok();
        known && matches
    })
    .await
    .unwrap_or(false)
}

/// A hash of a fixed string, computed once, to verify against when the email is unknown.
fn dummy_hash() -> String {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY
        .get_or_init(|| {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default().hash_password(b"reflow-timing-equaliser", &salt).expect("argon2").to_string()
        })
        .clone()
}

pub use reflow_common::jwt::{Claims, TokenError};

/// Issues and verifies the control plane's JWTs.
pub struct JwtKeys {
    signer: Signer,
    verifier: Verifier,
    public_key: [u8; 32],
    expiry: Duration,
    issuer: String,
    audience: String,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl JwtKeys {
    pub fn new(secret: &[u8], expiry: Duration, issuer: &str, audience: &str) -> Self {
        let public_key = reflow_common::jwt::public_key(secret);
        JwtKeys {
            signer: Signer::from_secret(secret),
            verifier: Verifier::new(&public_key, issuer, audience),
            public_key,
            expiry,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
        }
    }

    /// Issues a token for `user`, valid from now for the configured expiry.
    pub fn issue(&self, user: &User) -> (String, DateTime<Utc>) {
        let now = Utc::now();
        let expires = now + chrono::Duration::from_std(self.expiry).unwrap_or(chrono::Duration::hours(24));
        let claims = Claims {
            sub: user.id.to_string(),
            email: user.email.clone(),
            role: user.role.clone(),
            groups: user.groups.clone(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now.timestamp(),
            nbf: now.timestamp(),
            exp: expires.timestamp(),
            jti: Uuid::new_v4().to_string(),
        };
        (self.signer.sign(&claims), expires)
    }

    /// The public key data planes verify with.
    pub fn public_key(&self) -> &[u8; 32] {
        &self.public_key
    }

    /// Verifies signature, algorithm and every claim, exactly as data planes do.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        self.verifier.verify(token)
    }
}

/// A freshly generated API token: the secret (shown once) and what is stored.
#[derive(Debug)]
pub struct GeneratedToken {
    pub secret: String,
    pub hash: Vec<u8>,
    pub prefix: String,
}

pub fn generate_api_token() -> GeneratedToken {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = format!("{API_TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash_api_token(&secret);
    let prefix = secret[..API_TOKEN_PREFIX.len() + 8].to_string();
    GeneratedToken { secret, hash, prefix }
}

pub fn hash_api_token(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            id: Uuid::new_v4(),
            email: "a@example.com".into(),
            role: "admin".into(),
            groups: vec!["eng".into()],
            active: true,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            session_generation: 0,
        }
    }

    #[test]
    fn issued_tokens_verify_and_carry_exp() {
        let keys = JwtKeys::new(&[1; 32], Duration::from_secs(60), "reflow", "reflow");
        let u = user();
        let (token, expires) = keys.issue(&u);
        let claims = keys.verify(&token).unwrap();
        assert_eq!(claims.sub, u.id.to_string());
        assert_eq!(claims.exp, expires.timestamp());
        assert!(claims.exp > claims.iat);
    }

    #[test]
    fn other_secret_issuer_or_audience_fail() {
        let keys = JwtKeys::new(&[1; 32], Duration::from_secs(60), "reflow", "reflow");
        let (token, _) = keys.issue(&user());
        for other in [
            JwtKeys::new(&[2; 32], Duration::from_secs(60), "reflow", "reflow"),
            JwtKeys::new(&[1; 32], Duration::from_secs(60), "other", "reflow"),
            JwtKeys::new(&[1; 32], Duration::from_secs(60), "reflow", "other"),
        ] {
            assert_eq!(other.verify(&token), Err(TokenError::Invalid));
        }
        assert_eq!(keys.verify(&"a".repeat(MAX_BEARER_LEN + 1)), Err(TokenError::TooLong));
    }

    #[test]
    fn api_tokens_are_random_and_hashed() {
        let a = generate_api_token();
        let b = generate_api_token();
        assert_ne!(a.secret, b.secret);
        assert!(a.secret.starts_with(API_TOKEN_PREFIX));
        assert_eq!(a.secret.len(), API_TOKEN_PREFIX.len() + 43);
        assert_eq!(hash_api_token(&a.secret), a.hash);
        assert!(a.secret.starts_with(&a.prefix));
    }

    #[tokio::test]
    async fn passwords_verify() {
        let hash = hash_password("correct horse".into()).await;
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse".into(), Some(hash.clone())).await);
        assert!(!verify_password("wrong".into(), Some(hash)).await);
        assert!(!verify_password("reflow-timing-equaliser".into(), None).await);
    }
}
