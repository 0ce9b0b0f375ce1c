//! The encrypted on-disk copy of the last accepted snapshot, so a data plane can restart
//! and serve while the control plane is unreachable.
//!
//! The file is the full snapshot (protobuf) sealed with AES-256-GCM under a key derived from
//! the data-plane token. It is written whole to a temporary file, synced and renamed, so a
//! crash never leaves half a cache. A file that does not open (tampered, truncated, written
//! with another token) or does not validate is refused: the data plane then starts with no
//! snapshot and refuses traffic until the control plane answers.
//!
//! So is a cache older than one already applied (a copy put back, or a write that failed after
//! a newer snapshot was served): every save numbers the snapshot, and the number is written to
//! `snapshot.seq` *before* the cache itself, so the mark is never behind what was served. A
//! cache whose number is below the mark is refused, since serving it would undo changes (a
//! deactivated user, a revoked token) the data plane already enforced.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prost::Message;
use reflow_common::crypto::{derive_key, Aad, DeterministicSealer, Keyring};
use reflow_proto::resources::CACHE_KEY_PURPOSE;
use reflow_proto::snapshot::v1::SnapshotUpdate;

use crate::snapshot::{apply, as_full_update, DataSnapshot};

const FILE_NAME: &str = "snapshot.bin";
const SEQUENCE_FILE: &str = "snapshot.seq";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache file {path} does not decrypt (tampered, truncated or written with another data-plane token)")]
    Undecryptable { path: PathBuf },
    #[error("cache file {path} is not a valid snapshot: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cache file {path} holds snapshot #{cached}, older than #{applied} this data plane already applied")]
    Older { path: PathBuf, cached: u64, applied: u64 },
}

/// The cache file of one data plane.
#[derive(Debug, Clone)]
pub struct Cache {
    path: PathBuf,
    sequence_path: PathBuf,
    keyring: Keyring,
    /// The number of the last snapshot saved (or found).
    sequence: Arc<AtomicU64>,
}

fn aad() -> Aad {
    Aad::new("snapshot_cache", &[])
}

impl Cache {
    pub fn new(dir: &Path, data_plane_token: &str) -> Self {
        let cache = Cache {
            path: dir.join(FILE_NAME),
            sequence_path: dir.join(SEQUENCE_FILE),
            keyring: Keyring::single(0, derive_key(data_plane_token.as_bytes(), CACHE_KEY_PURPOSE)),
            sequence: Arc::default(),
        };
        cache.sequence.store(cache.mark().unwrap_or(0), Ordering::SeqCst);
        cache
    }

    /// The number of the newest snapshot saved, from `snapshot.seq`.
    fn mark(&self) -> Option<u64> {
        std::fs::read_to_string(&self.sequence_path).ok()?.trim().parse().ok()
    }

    /// Writes `bytes` to `path` whole or not at all: a temporary file, synced, renamed.
    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
        use std::io::Write;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        let tmp = path.with_extension("tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp).map_err(|e| self.io(e))?;
        file.write_all(bytes).and_then(|_| file.sync_all()).map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, path).map_err(|e| self.io(e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> CacheError {
        CacheError::Io { path: self.path.clone(), source }
    }

    /// Writes `snapshot` atomically, numbered after every snapshot saved before it.
    pub fn save(&self, snapshot: &DataSnapshot) -> Result<(), CacheError> {
        let sequence = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        // The mark first: if the cache write fails, the older cache left behind is refused.
        self.write_atomically(&self.sequence_path, sequence.to_string().as_bytes())?;
        let mut bytes = sequence.to_be_bytes().to_vec();
        bytes.extend_from_slice(&as_full_update(snapshot).encode_to_vec());
        let sealed = self.keyring.seal(&bytes, &aad());
        self.write_atomically(&self.path, &sealed)
    }

    /// Reads the cache: `Ok(None)` when there is none, an error when it is unusable.
    pub fn load(&self, sealer: &DeterministicSealer) -> Result<Option<DataSnapshot>, CacheError> {
        let sealed = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let bytes =
            self.keyring.open(&sealed, &aad()).map_err(|_| CacheError::Undecryptable { path: self.path.clone() })?;
        let invalid = |reason: String| CacheError::Invalid { path: self.path.clone(), reason };
        let (number, update) = bytes.split_at_checked(8).ok_or_else(|| invalid("too short".into()))?;
        let cached = u64::from_be_bytes(number.try_into().expect("8 bytes"));
        if let Some(applied) = self.mark().filter(|applied| cached < *applied) {
            return Err(CacheError::Older { path: self.path.clone(), cached, applied });
        }
        self.sequence.fetch_max(cached, Ordering::SeqCst);
        let update = SnapshotUpdate::decode(update).map_err(|e| invalid(e.to_string()))?;
        apply(None, &update, sealer)
            .map(Some)
            .map_err(|rejection| CacheError::Invalid { path: self.path.clone(), reason: rejection.reason })
    }
}
