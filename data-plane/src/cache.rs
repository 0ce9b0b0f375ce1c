//! The encrypted on-disk copy of the last accepted snapshot, so a data plane can restart
//! and serve while the control plane is unreachable.
//!
//! The file is the full snapshot (protobuf) sealed with AES-256-GCM under a key derived from
//! the data-plane token. It is written whole to a temporary file, synced and renamed, so a
//! crash never leaves half a cache. A file that does not open (tampered, truncated, written
//! with another token) or does not validate is refused: the data plane then starts with no
//! snapshot and refuses traffic until the control plane answers.

use std::path::{Path, PathBuf};

use prost::Message;
use reflow_common::crypto::{derive_key, Aad, DeterministicSealer, Keyring};
use reflow_proto::resources::CACHE_KEY_PURPOSE;
use reflow_proto::snapshot::v1::SnapshotUpdate;

use crate::snapshot::{apply, as_full_update, DataSnapshot};

const FILE_NAME: &str = "snapshot.bin";

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
}

/// The cache file of one data plane.
#[derive(Debug, Clone)]
pub struct Cache {
    path: PathBuf,
    keyring: Keyring,
}

fn aad() -> Aad {
    Aad::new("snapshot_cache", &[])
}

impl Cache {
    pub fn new(dir: &Path, data_plane_token: &str) -> Self {
        Cache {
            path: dir.join(FILE_NAME),
            keyring: Keyring::single(0, derive_key(data_plane_token.as_bytes(), CACHE_KEY_PURPOSE)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> CacheError {
        CacheError::Io { path: self.path.clone(), source }
    }

    /// Writes `snapshot` atomically.
    pub fn save(&self, snapshot: &DataSnapshot) -> Result<(), CacheError> {
        use std::io::Write;
        let bytes = as_full_update(snapshot).encode_to_vec();
        let sealed = self.keyring.seal(&bytes, &aad());
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        let tmp = self.path.with_extension("tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp).map_err(|e| self.io(e))?;
        file.write_all(&sealed).and_then(|_| file.sync_all()).map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        Ok(())
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
        let update = SnapshotUpdate::decode(&bytes[..])
            .map_err(|e| CacheError::Invalid { path: self.path.clone(), reason: e.to_string() })?;
        apply(None, &update, sealer)
            .map(Some)
            .map_err(|rejection| CacheError::Invalid { path: self.path.clone(), reason: rejection.reason })
    }
}
