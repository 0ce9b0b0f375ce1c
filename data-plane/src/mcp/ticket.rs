//! Session ids that travel: what a data plane needs to continue a client session, sealed into
//! the `Mcp-Session-Id` itself, so any replica behind a plain load balancer can resume it.
//!
//! An id is `r1.<nonce>.<sealed>`: the nonce (128 random bits) is the session's identity on
//! every replica (its map key, its name in logs and audit records), and `<sealed>` is the
//! [`Ticket`] sealed with the newest session key of the snapshot (AES-256-GCM, bound to the
//! nonce). The keys come from the control plane, sealed for the data planes; a rotation keeps
//! the replaced keys opening ids until their `retire_at`. An id that does not open (tampered,
//! truncated, or sealed with a key retired or unknown here) is answered like an unknown session.
//!
//! The ticket is not a credential: every request still authenticates, and a ticket answers only
//! to the user it names.

use base64::Engine as _;
use rand::RngCore;
use reflow_common::crypto::{Aad, DeterministicSealer, Key, Keyring};
use reflow_proto::resources::{SessionKey, Settings};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "r1.";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// What a replica needs to continue a session it has never seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    #[serde(rename = "u")]
    pub user_id: String,
    /// The target of `/mcp/{target}`; unset for the aggregated endpoint.
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The protocol version `initialize` settled.
    #[serde(rename = "v")]
    pub protocol_version: String,
    /// The `initialize` params upstream sessions are opened with, serialised.
    #[serde(rename = "p")]
    pub upstream_params: String,
    /// The client's `clientInfo` name and version.
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub client: Option<(String, String)>,
    /// Upstream sessions opened with the session, to be reused rather than opened again.
    #[serde(rename = "t", default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<UpstreamTicket>,
    /// Unix seconds.
    #[serde(rename = "i")]
    pub issued_at: i64,
    /// The user's role, groups and session generation when the session opened, as
    /// [`identity`]: a ticket from before a recycle no longer resumes.
    #[serde(rename = "g")]
    pub identity: String,
}

/// A digest of what recycles a user's sessions (role, groups, session generation), the same on
/// every replica and build.
pub fn identity(user: &reflow_proto::resources::User) -> String {
    use sha2::Digest as _;
    let mut groups: Vec<&str> = user.groups.iter().map(String::as_str).collect();
    groups.sort_unstable();
    let text = serde_json::json!([user.role, groups, user.session_generation]).to_string();
    reflow_common::crypto::to_hex(&sha2::Sha256::digest(text.as_bytes()))[..16].to_string()
}

/// An upstream session a ticket carries: a Streamable HTTP session (of a URL target or a
/// Kubernetes instance), which any replica may address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamTicket {
    #[serde(rename = "n")]
    pub target: String,
    /// The upstream's `Mcp-Session-Id`.
    #[serde(rename = "id")]
    pub session_id: String,
    /// The protocol version the upstream settled.
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// The upstream's `initialize` capabilities (what the gateway asks of it depends on them).
    #[serde(rename = "c", default)]
    pub capabilities: serde_json::Value,
}

/// Why an id did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("it is not a session id this gateway issued")]
    Malformed,
    #[error("it was sealed with a key that has been retired")]
    Retired,
    #[error("it failed authentication")]
    Tampered,
    #[error("it has passed its maximum age")]
    Expired,
}

/// The nonce of a travelling id, if `id` is one: the session's key in a replica's map.
pub fn nonce_of(id: &str) -> Option<&str> {
    let rest = id.strip_prefix(PREFIX)?;
    let (nonce, _) = rest.split_once('.')?;
    (nonce.len() == 22).then_some(nonce)
}

/// The key generation a travelling id was sealed with, if `id` is one.
pub fn generation_of(id: &str) -> Option<u32> {
    let nonce = nonce_of(id)?;
    let sealed = id.get(PREFIX.len() + nonce.len() + 1..)?;
    // 8 base64 characters are 6 bytes: the format byte and the 4-byte key version.
    let header = B64.decode(sealed.get(..8)?).ok()?;
    Keyring::version_of(&header).ok()
}

/// A fresh nonce.
pub fn new_nonce() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    B64.encode(bytes)
}

fn aad(nonce: &str) -> Aad {
    Aad::new("mcp_session", &[nonce])
}

/// One generation's key and its window.
struct Generation {
    keyring: Keyring,
    /// Unix seconds from which it seals (so every replica holds it before ids use it).
    active_at: i64,
    /// Unix seconds after which ids sealed with it stop opening.
    retire_at: Option<i64>,
}

/// The session keys of one snapshot.
pub struct SessionSeal {
    generations: std::collections::BTreeMap<u32, Generation>,
}

impl std::fmt::Debug for SessionSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSeal").field("generations", &self.generations.keys().collect::<Vec<_>>()).finish()
    }
}

impl SessionSeal {
    /// The keys `settings` carries, opened; `Ok(None)` when it carries none (a control plane
    /// that predates them).
    pub fn from_settings(settings: &Settings, sealer: &DeterministicSealer) -> Result<Option<Self>, String> {
        let mut generations = std::collections::BTreeMap::new();
        for key in &settings.session_keys {
            let sealed = base64::engine::general_purpose::STANDARD
                .decode(&key.sealed)
                .map_err(|_| format!("session key {} is not base64", key.generation))?;
            let bytes = sealer
                .open(&sealed, &SessionKey::aad(key.generation))
                .map_err(|e| format!("session key {} does not open: {e}", key.generation))?;
            let bytes: [u8; 32] =
                bytes[..].try_into().map_err(|_| format!("session key {} is not 32 bytes", key.generation))?;
            let generation = Generation {
                keyring: Keyring::single(key.generation, Key::from_bytes(bytes)),
                active_at: key.active_at.unwrap_or(i64::MIN),
                retire_at: key.retire_at,
            };
            if generations.insert(key.generation, generation).is_some() {
                return Err(format!("session key {} is listed twice", key.generation));
            }
        }
        Ok((!generations.is_empty()).then_some(SessionSeal { generations }))
    }

    /// The id of a session whose identity is `nonce`, sealed with the newest key active at
    /// `now` (the newest of all when none is yet).
    pub fn seal(&self, nonce: &str, ticket: &Ticket, now: i64) -> String {
        let usable = |g: &&Generation| g.retire_at.is_none_or(|at| at > now);
        let generation = self
            .generations
            .values()
            .rev()
            .filter(usable)
            .find(|g| g.active_at <= now)
            .or_else(|| self.generations.values().next_back())
            .expect("a seal has a key");
        let plain = serde_json::to_vec(ticket).expect("a ticket serialises");
        format!("{PREFIX}{nonce}.{}", B64.encode(generation.keyring.seal(&plain, &aad(nonce))))
    }

    /// Whether ids sealed with `generation` still open at `now`.
    pub fn accepts(&self, generation: u32, now: i64) -> bool {
        self.generations.get(&generation).is_some_and(|g| g.retire_at.is_none_or(|at| at > now))
    }

    /// Opens `id`, refusing one older than `max_age_secs` or sealed with a retired key.
    pub fn open(&self, id: &str, now: i64, max_age_secs: i64) -> Result<Ticket, Refused> {
        let nonce = nonce_of(id).ok_or(Refused::Malformed)?;
        let sealed = &id[PREFIX.len() + nonce.len() + 1..];
        let sealed = B64.decode(sealed).map_err(|_| Refused::Malformed)?;
        let version = Keyring::version_of(&sealed).map_err(|_| Refused::Malformed)?;
        let generation = self.generations.get(&version).ok_or(Refused::Retired)?;
        if generation.retire_at.is_some_and(|at| at <= now) {
            return Err(Refused::Retired);
        }
        let plain = generation.keyring.open(&sealed, &aad(nonce)).map_err(|_| Refused::Tampered)?;
        let ticket: Ticket = serde_json::from_slice(&plain).map_err(|_| Refused::Malformed)?;
        if now - ticket.issued_at > max_age_secs {
            return Err(Refused::Expired);
        }
        Ok(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (generation, key, active_at, retire_at)
    type TestKey<'a> = (u32, &'a [u8; 32], Option<i64>, Option<i64>);

    fn settings(keys: &[TestKey<'_>], sealer: &DeterministicSealer) -> Settings {
        Settings {
            jwt_issuer: String::new(),
            jwt_audience: String::new(),
            jwt_algorithm: String::new(),
            jwt_public_key: String::new(),
            session_keys: keys
                .iter()
                .map(|(generation, key, active_at, retire_at)| SessionKey {
                    generation: *generation,
                    sealed: base64::engine::general_purpose::STANDARD
                        .encode(sealer.seal(&key[..], &SessionKey::aad(*generation))),
                    active_at: *active_at,
                    retire_at: *retire_at,
                })
                .collect(),
        }
    }

    fn ticket() -> Ticket {
        Ticket {
            user_id: "alice".into(),
            target: Some("everything".into()),
            protocol_version: "2025-11-25".into(),
            upstream_params: r#"{"protocolVersion":"2025-11-25","capabilities":{}}"#.into(),
            client: Some(("client".into(), "1.0".into())),
            upstreams: vec![UpstreamTicket {
                target: "everything".into(),
                session_id: "abc".into(),
                protocol_version: Some("2025-11-25".into()),
                capabilities: serde_json::json!({"tools": {}}),
            }],
            issued_at: 1_000,
            identity: "0123456789abcdef".into(),
        }
    }

    #[test]
    fn a_ticket_opens_under_its_key_and_refuses_tampering_rotation_and_age() {
        let sealer = DeterministicSealer::from_secret(b"data-plane-token", "test");
        let one =
            SessionSeal::from_settings(&settings(&[(1, &[1; 32], None, None)], &sealer), &sealer).unwrap().unwrap();
        let nonce = new_nonce();
        let id = one.seal(&nonce, &ticket(), 1_000);
        assert_eq!(nonce_of(&id), Some(nonce.as_str()));
        assert_eq!(generation_of(&id), Some(1));
        assert!(one.accepts(1, 1_010) && !one.accepts(2, 1_010));
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)), "header-safe: {id}");
        assert_eq!(one.open(&id, 1_010, 3600), Ok(ticket()));
        assert_eq!(one.open(&id, 1_000 + 3601, 3600), Err(Refused::Expired));

        // Any byte changed, or the nonce swapped, fails authentication.
        let mut bytes = id.clone().into_bytes();
        let last = bytes.len() - 5;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(one.open(&String::from_utf8(bytes).unwrap(), 1_010, 3600), Err(Refused::Tampered));
        let swapped = id.replacen(&nonce, &new_nonce(), 1);
        assert_eq!(one.open(&swapped, 1_010, 3600), Err(Refused::Tampered));
        assert_eq!(one.open("not-a-ticket", 1_010, 3600), Err(Refused::Malformed));

        // Rotated: the old key still opens until it retires; the new one seals once active
        // (before, replicas that have not received it yet could not open its ids).
        let keys = [(1, &[1; 32], None, Some(2_000)), (2, &[2; 32], Some(1_100), None)];
        let two = SessionSeal::from_settings(&settings(&keys, &sealer), &sealer).unwrap().unwrap();
        assert_eq!(two.open(&id, 1_500, 3600), Ok(ticket()));
        assert_eq!(two.open(&id, 2_000, 3600), Err(Refused::Retired));
        let early = two.seal(&nonce, &ticket(), 1_050);
        assert_eq!(one.open(&early, 1_050, 3600), Ok(ticket()), "sealed with the old key until the new one is active");
        let fresh = two.seal(&nonce, &ticket(), 1_100);
        assert_eq!(one.open(&fresh, 1_100, 3600), Err(Refused::Retired), "unknown to a replica without the new key");
        assert_eq!(two.open(&fresh, 1_100, 3600), Ok(ticket()));
        // Dropped from the snapshot altogether.
        let three =
            SessionSeal::from_settings(&settings(&[(2, &[2; 32], None, None)], &sealer), &sealer).unwrap().unwrap();
        assert_eq!(three.open(&id, 1_500, 3600), Err(Refused::Retired));
        assert_eq!(three.open(&fresh, 1_500, 3600), Ok(ticket()));
    }

    #[test]
    fn no_keys_no_travelling_ids_and_a_key_sealed_for_others_is_refused() {
        let sealer = DeterministicSealer::from_secret(b"data-plane-token", "test");
        assert!(SessionSeal::from_settings(&settings(&[], &sealer), &sealer).unwrap().is_none());
        let other = DeterministicSealer::from_secret(b"another token", "test");
        let error = SessionSeal::from_settings(&settings(&[(1, &[1; 32], None, None)], &other), &sealer).unwrap_err();
        assert!(error.contains("session key 1 does not open"), "{error}");
    }
}
