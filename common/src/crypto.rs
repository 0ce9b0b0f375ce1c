//! The envelope every secret is stored in.
//!
//! Layout of a sealed value (all integers big-endian):
//!
//! ```text
//! [format: u8 = 1][key version: u32][nonce: 12 bytes][AES-256-GCM ciphertext + 16-byte tag]
//! ```
//!
//! The associated data fed to AES-GCM is the 5-byte header followed by the caller's
//! [`Aad`], which names the row and field the value belongs to. A ciphertext copied into
//! another row, another field, or relabelled with another key version fails to open.
//! Key versions let keys rotate: new values are sealed with the current key, old values
//! open with whichever key their header names until they are re-sealed.

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::Engine as _;
use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

const FORMAT_V1: u8 = 1;
/// Format of values sealed by [`DeterministicSealer`].
const FORMAT_DETERMINISTIC: u8 = 2;
const HEADER_LEN: usize = 1 + 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Why a sealed value could not be opened. Messages never include key or plaintext bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("sealed value is truncated")]
    Truncated,
    #[error("sealed value has unknown format {0}")]
    UnknownFormat(u8),
    #[error("no key with version {0} is configured")]
    UnknownKeyVersion(u32),
    #[error("sealed value failed authentication (wrong key, tampered data or moved between rows)")]
    Authentication,
    #[error("invalid key: {0}")]
    InvalidKey(String),
}

/// A 256-bit key. Zeroed on drop, never printed.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl Key {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Key(bytes)
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Key(bytes)
    }

    /// Parses a key as configured: exactly 32 characters used as raw bytes (the original
    /// gateway's format), 64 hex digits, or standard base64 of 32 bytes.
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        if text.len() == 32 {
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(text.as_bytes());
            return Ok(Key(bytes));
        }
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut bytes = [0u8; 32];
            for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
                let hex = std::str::from_utf8(chunk).map_err(|_| CryptoError::InvalidKey("not hex".into()))?;
                bytes[i] = u8::from_str_radix(hex, 16).map_err(|_| CryptoError::InvalidKey("not hex".into()))?;
            }
            return Ok(Key(bytes));
        }
        if let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(text) {
            let decoded = Zeroizing::new(decoded);
            if decoded.len() == 32 {
                let mut bytes = [0u8; 32];
                bytes.copy_from_slice(&decoded);
                return Ok(Key(bytes));
            }
        }
        Err(CryptoError::InvalidKey(format!(
            "expected 32 characters, 64 hex digits or base64 of 32 bytes, got {} characters",
            text.len()
        )))
    }

    /// The key's bytes, to seal it for storage or transport.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as 64 hex digits, for writing a generated key to a file.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Associated data: which row and field a sealed value belongs to.
///
/// Parts are length-prefixed, so `["a:b", "c"]` and `["a", "b:c"]` differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aad(Vec<u8>);

impl Aad {
    /// `context` names the kind of value (for example `"target_secret"`); `parts` identify
    /// the row and field.
    pub fn new(context: &str, parts: &[&str]) -> Self {
        let mut out = Vec::with_capacity(64);
        for part in std::iter::once(context).chain(parts.iter().copied()) {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        Aad(out)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The set of keys a process can open values with, and the version new values use.
#[derive(Clone)]
pub struct Keyring {
    current: u32,
    keys: BTreeMap<u32, Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// A keyring with one key, which is also the current one.
    pub fn single(version: u32, key: Key) -> Self {
        let mut keys = BTreeMap::new();
        keys.insert(version, key);
        Keyring { current: version, keys }
    }

    /// Adds an older key that can still open values but is not used to seal.
    pub fn with_previous(mut self, version: u32, key: Key) -> Result<Self, CryptoError> {
        if self.keys.contains_key(&version) {
            return Err(CryptoError::InvalidKey(format!("key version {version} is configured twice")));
        }
        self.keys.insert(version, key);
        Ok(self)
    }

    pub fn current_version(&self) -> u32 {
        self.current
    }

    /// The key version a sealed value names, without opening it.
    pub fn version_of(sealed: &[u8]) -> Result<u32, CryptoError> {
        if sealed.len() < HEADER_LEN {
            return Err(CryptoError::Truncated);
        }
        if sealed[0] != FORMAT_V1 {
            return Err(CryptoError::UnknownFormat(sealed[0]));
        }
        Ok(u32::from_be_bytes([sealed[1], sealed[2], sealed[3], sealed[4]]))
    }

    /// Seals `plaintext` with the current key, bound to `aad`.
    pub fn seal(&self, plaintext: &[u8], aad: &Aad) -> Vec<u8> {
        let key = &self.keys[&self.current];
        let cipher = Aes256Gcm::new_from_slice(&key.0).expect("32-byte key");
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);

        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.push(FORMAT_V1);
        out.extend_from_slice(&self.current.to_be_bytes());
        let full_aad = [&out[..HEADER_LEN], aad.as_bytes()].concat();
        out.extend_from_slice(&nonce);
        let ciphertext = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: &full_aad })
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Opens a value sealed by [`Keyring::seal`] with the same `aad`.
    pub fn open(&self, sealed: &[u8], aad: &Aad) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let version = Self::version_of(sealed)?;
        if sealed.len() < HEADER_LEN + NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Truncated);
        }
        let key = self.keys.get(&version).ok_or(CryptoError::UnknownKeyVersion(version))?;
        let cipher = Aes256Gcm::new_from_slice(&key.0).expect("32-byte key");
        let (header, rest) = sealed.split_at(HEADER_LEN);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let full_aad = [header, aad.as_bytes()].concat();
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: &full_aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Authentication)
    }

    /// Opens a value and decodes it as UTF-8 text.
    pub fn open_string(&self, sealed: &[u8], aad: &Aad) -> Result<Zeroizing<String>, CryptoError> {
        let bytes = self.open(sealed, aad)?;
        String::from_utf8(bytes.to_vec()).map(Zeroizing::new).map_err(|_| CryptoError::Authentication)
    }
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Derives a 256-bit key from a shared secret (a data-plane token) with HKDF-SHA256.
/// Different `purpose` strings give independent keys.
pub fn derive_key(secret: &[u8], purpose: &str) -> Key {
    let hkdf = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"reflow key derivation v1"), secret);
    let mut bytes = [0u8; 32];
    hkdf.expand(purpose.as_bytes(), &mut bytes).expect("32 bytes is a valid HKDF-SHA256 output length");
    Key(bytes)
}

/// Seals values so that equal inputs give equal outputs: the nonce is an HMAC of the
/// associated data and plaintext (a synthetic IV). Used for snapshots, whose version is a
/// content hash that every control-plane replica must compute identically. It reveals only
/// whether two sealed values are equal; a nonce never repeats for different messages.
///
/// Layout: `[format: u8 = 2][nonce: 12 bytes][ciphertext + tag]`.
#[derive(Clone)]
pub struct DeterministicSealer {
    enc: Key,
    mac: Key,
}

impl fmt::Debug for DeterministicSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeterministicSealer(<redacted>)")
    }
}

impl DeterministicSealer {
    /// The sealer both ends derive from a shared secret.
    pub fn from_secret(secret: &[u8], purpose: &str) -> Self {
        DeterministicSealer {
            enc: derive_key(secret, &format!("{purpose}/enc")),
            mac: derive_key(secret, &format!("{purpose}/mac")),
        }
    }

    fn nonce(&self, plaintext: &[u8], aad: &Aad) -> [u8; NONCE_LEN] {
        use hmac::Mac;
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.mac.0).expect("HMAC takes any key length");
        mac.update(&(aad.as_bytes().len() as u64).to_be_bytes());
        mac.update(aad.as_bytes());
        mac.update(plaintext);
        let tag = mac.finalize().into_bytes();
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&tag[..NONCE_LEN]);
        nonce
    }

    pub fn seal(&self, plaintext: &[u8], aad: &Aad) -> Vec<u8> {
        let cipher = Aes256Gcm::new_from_slice(&self.enc.0).expect("32-byte key");
        let nonce = self.nonce(plaintext, aad);
        let full_aad = [&[FORMAT_DETERMINISTIC][..], aad.as_bytes()].concat();
        let ciphertext = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: &full_aad })
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        out.push(FORMAT_DETERMINISTIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    pub fn open(&self, sealed: &[u8], aad: &Aad) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < 1 + NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Truncated);
        }
        if sealed[0] != FORMAT_DETERMINISTIC {
            return Err(CryptoError::UnknownFormat(sealed[0]));
        }
        let cipher = Aes256Gcm::new_from_slice(&self.enc.0).expect("32-byte key");
        let (nonce, ciphertext) = sealed[1..].split_at(NONCE_LEN);
        let full_aad = [&[FORMAT_DETERMINISTIC][..], aad.as_bytes()].concat();
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: &full_aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Authentication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring(version: u32, byte: u8) -> Keyring {
        Keyring::single(version, Key::from_bytes([byte; 32]))
    }

    proptest! {
        #[test]
        fn round_trip(plain in proptest::collection::vec(any::<u8>(), 0..512),
                      parts in proptest::collection::vec(".{0,12}", 0..4),
                      version in any::<u32>()) {
            let keyring = ring(version, 7);
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            let aad = Aad::new("test", &parts);
            let sealed = keyring.seal(&plain, &aad);
            prop_assert_eq!(Keyring::version_of(&sealed).unwrap(), version);
            prop_assert_eq!(&keyring.open(&sealed, &aad).unwrap()[..], &plain[..]);
        }

        #[test]
        fn any_flipped_bit_fails(plain in proptest::collection::vec(any::<u8>(), 0..128),
                                 position in any::<proptest::sample::Index>(),
                                 bit in 0u8..8) {
            let keyring = ring(1, 7);
            let aad = Aad::new("test", &["row", "field"]);
            let mut sealed = keyring.seal(&plain, &aad);
            let i = position.index(sealed.len());
            sealed[i] ^= 1 << bit;
            prop_assert!(keyring.open(&sealed, &aad).is_err());
        }

        #[test]
        fn other_associated_data_fails(plain in proptest::collection::vec(any::<u8>(), 0..128),
                                       a in "[a-z:]{0,10}", b in "[a-z:]{0,10}") {
            prop_assume!(a != b);
            let keyring = ring(1, 7);
            let sealed = keyring.seal(&plain, &Aad::new("test", &[&a]));
            prop_assert_eq!(keyring.open(&sealed, &Aad::new("test", &[&b])).unwrap_err(), CryptoError::Authentication);
        }

        #[test]
        fn truncated_values_fail(plain in proptest::collection::vec(any::<u8>(), 0..64), cut in any::<proptest::sample::Index>()) {
            let keyring = ring(1, 7);
            let aad = Aad::new("test", &[]);
            let sealed = keyring.seal(&plain, &aad);
            let cut = cut.index(sealed.len());
            prop_assert!(keyring.open(&sealed[..cut], &aad).is_err());
        }
    }

    proptest! {
        #[test]
        fn deterministic_round_trip(plain in proptest::collection::vec(any::<u8>(), 0..256), part in ".{0,12}") {
            let sealer = DeterministicSealer::from_secret(b"token", "test");
            let aad = Aad::new("test", &[&part]);
            let sealed = sealer.seal(&plain, &aad);
            prop_assert_eq!(&sealed, &sealer.seal(&plain, &aad));
            prop_assert_eq!(&sealer.open(&sealed, &aad).unwrap()[..], &plain[..]);
            prop_assert!(sealer.open(&sealed, &Aad::new("other", &[&part])).is_err());
            prop_assert!(DeterministicSealer::from_secret(b"other token", "test").open(&sealed, &aad).is_err());
        }
    }

    #[test]
    fn deterministic_sealing_differs_by_message() {
        let sealer = DeterministicSealer::from_secret(b"token", "test");
        let aad = Aad::new("test", &[]);
        assert_ne!(sealer.seal(b"a", &aad), sealer.seal(b"b", &aad));
        assert_ne!(sealer.seal(b"a", &aad)[1..13], sealer.seal(b"a", &Aad::new("test", &["x"]))[1..13]);
        assert_ne!(derive_key(b"s", "a").0, derive_key(b"s", "b").0);
    }

    #[test]
    fn parts_are_length_prefixed() {
        assert_ne!(Aad::new("c", &["a:b", "c"]), Aad::new("c", &["a", "b:c"]));
        assert_ne!(Aad::new("ab", &[]), Aad::new("a", &["b"]));
    }

    #[test]
    fn wrong_key_fails() {
        let aad = Aad::new("test", &["x"]);
        let sealed = ring(1, 7).seal(b"secret", &aad);
        assert_eq!(ring(1, 8).open(&sealed, &aad).unwrap_err(), CryptoError::Authentication);
    }

    #[test]
    fn relabelled_key_version_fails() {
        // Both keyrings hold the same key under versions 1 and 2: rewriting the header's
        // version must still fail because the header is authenticated.
        let keyring = ring(1, 7).with_previous(2, Key::from_bytes([7; 32])).unwrap();
        let aad = Aad::new("test", &["x"]);
        let mut sealed = keyring.seal(b"secret", &aad);
        sealed[4] = 2;
        assert_eq!(keyring.open(&sealed, &aad).unwrap_err(), CryptoError::Authentication);
    }

    #[test]
    fn unknown_key_version_is_named() {
        let aad = Aad::new("test", &[]);
        let sealed = ring(3, 7).seal(b"secret", &aad);
        assert_eq!(ring(1, 7).open(&sealed, &aad).unwrap_err(), CryptoError::UnknownKeyVersion(3));
    }

    #[test]
    fn rotation_opens_old_values_and_seals_with_new() {
        let old = ring(1, 1);
        let aad = Aad::new("test", &["row"]);
        let sealed_old = old.seal(b"value", &aad);
        let rotated = Keyring::single(2, Key::from_bytes([2; 32])).with_previous(1, Key::from_bytes([1; 32])).unwrap();
        assert_eq!(&rotated.open(&sealed_old, &aad).unwrap()[..], b"value");
        let resealed = rotated.seal(b"value", &aad);
        assert_eq!(Keyring::version_of(&resealed).unwrap(), 2);
        assert!(old.open(&resealed, &aad).is_err());
    }

    #[test]
    fn key_formats() {
        let raw = "0123456789abcdef0123456789abcdef";
        assert_eq!(Key::parse(raw).unwrap().0, *raw.as_bytes());
        let hex = "00".repeat(31) + "ff";
        assert_eq!(Key::parse(&hex).unwrap().0[31], 0xff);
        let b64 = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        assert_eq!(Key::parse(&b64).unwrap().0, [9u8; 32]);
        assert!(Key::parse("short").is_err());
        let generated = Key::generate();
        assert_eq!(Key::parse(&generated.to_hex()).unwrap().0, generated.0);
        assert_eq!(format!("{generated:?}"), "Key(<redacted>)");
    }
}
