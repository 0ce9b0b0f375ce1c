//! The audit spool: batches of audit records the control plane has not acknowledged yet, on
//! disk, so a data plane that restarts or loses its control plane for a while loses none.
//!
//! Each batch is one file, `<seq>.batch`: an `AuditBatch` (protobuf) sealed with AES-256-GCM
//! under a key derived from the data-plane token and bound to its sequence number (a file
//! renamed to another number does not open), written to a temporary file, synced and renamed.
//! Batches leave in order: the oldest is shipped, and removed once acknowledged. The spool is
//! bounded in bytes (`audit.spool_bytes`); when a batch would not fit, `audit.on_full` decides:
//! `drop_oldest` removes the oldest batches (counted in [`Spool::dropped`]), `refuse` keeps
//! them and refuses the new one, so the caller can fail closed until the control plane drains
//! the spool. A batch file that does not open (written with another token, or damaged) is set
//! aside as `<seq>.bad`, counted as dropped, and never sent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prost::Message;
use reflow_common::crypto::{derive_key, Aad, Keyring};
use reflow_proto::snapshot::v1::AuditBatch;

/// The key purpose the spool's key is derived for from the data-plane token.
const SPOOL_KEY_PURPOSE: &str = "reflow audit spool v1";
const SUFFIX: &str = "batch";
/// The most record bytes kept in memory beside their files, for the shipper.
const MAX_RECENT_BYTES: u64 = 32 * 1024 * 1024;

/// What a full spool does with a new batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    /// Remove the oldest batches to make room (counted as dropped).
    DropOldest,
    /// Keep what is there and refuse the new batch.
    Refuse,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot read or write the audit spool at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the audit spool is full ({bytes} of {max} bytes) and audit.on_full is refuse")]
    Full { bytes: u64, max: u64 },
    #[error("a batch of {bytes} bytes is larger than the whole audit spool ({max} bytes)")]
    TooLarge { bytes: u64, max: u64 },
}

/// A batch waiting: its sequence number and its records (each an audit record's JSON).
pub type Batch = (u64, Vec<Vec<u8>>);

/// One data plane's spool.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    keyring: Keyring,
    max_bytes: u64,
    on_full: OnFull,
    state: Mutex<State>,
    dropped: AtomicU64,
    /// The records of batches written by this process and not yet handed to the shipper: it
    /// ships them without reading and opening their files again. Bounded by [`MAX_RECENT_BYTES`].
    recent: Mutex<Recent>,
    /// Bytes and records written into the spool since it was opened.
    spooled_bytes: AtomicU64,
    spooled_records: AtomicU64,
}

/// Batches' records by sequence number, and their bytes in all.
type Recent = (BTreeMap<u64, Vec<Vec<u8>>>, u64);

#[derive(Debug, Default)]
struct State {
    /// Batches by sequence number: (file bytes, records).
    batches: BTreeMap<u64, (u64, u64)>,
    bytes: u64,
    next: u64,
}

fn aad(seq: u64) -> Aad {
    Aad::new("audit_spool", &[&seq.to_string()])
}

impl Spool {
    /// Opens (creating it when missing) the spool in `dir`, with what an earlier run left there.
    pub fn open(dir: &Path, data_plane_token: &str, max_bytes: u64, on_full: OnFull) -> Result<Spool, SpoolError> {
        let io = |source| SpoolError::Io { path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut state = State::default();
        for entry in std::fs::read_dir(dir).map_err(io)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let parsed = name
                .strip_suffix(&format!(".{SUFFIX}"))
                .and_then(|n| n.split_once('-'))
                .and_then(|(seq, records)| Some((seq.parse::<u64>().ok()?, records.parse::<u64>().ok()?)));
            let Some((seq, records)) = parsed else { continue };
            let bytes = entry.metadata().map_err(io)?.len();
            state.batches.insert(seq, (bytes, records));
            state.bytes += bytes;
            state.next = state.next.max(seq + 1);
        }
        let keyring = Keyring::single(0, derive_key(data_plane_token.as_bytes(), SPOOL_KEY_PURPOSE));
        Ok(Spool {
            dir: dir.to_path_buf(),
            keyring,
            max_bytes,
            on_full,
            state: Mutex::new(state),
            dropped: AtomicU64::new(0),
            recent: Mutex::new((BTreeMap::new(), 0)),
            spooled_bytes: AtomicU64::new(0),
            spooled_records: AtomicU64::new(0),
        })
    }

    fn path(&self, seq: u64, records: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}-{records}.{SUFFIX}"))
    }

    /// Stores a batch of records (each an audit record's JSON); returns its sequence number, or
    /// the error with the records, which are still the caller's.
    pub fn push(&self, records: Vec<Vec<u8>>) -> Result<u64, (SpoolError, Vec<Vec<u8>>)> {
        let count = records.len() as u64;
        let mut state = self.state.lock().unwrap();
        let seq = state.next;
        let batch = AuditBatch { node_id: String::new(), records };
        let sealed = self.keyring.seal(&batch.encode_to_vec(), &aad(seq));
        let records = batch.records;
        let bytes = sealed.len() as u64;
        if bytes > self.max_bytes {
            return Err((SpoolError::TooLarge { bytes, max: self.max_bytes }, records));
        }
        while state.bytes + bytes > self.max_bytes {
            match self.on_full {
                OnFull::Refuse => return Err((SpoolError::Full { bytes: state.bytes, max: self.max_bytes }, records)),
                OnFull::DropOldest => {
                    let (&oldest, &(size, records)) =
                        state.batches.iter().next().expect("a spool over its size holds a batch");
                    let _ = std::fs::remove_file(self.path(oldest, records));
                    state.batches.remove(&oldest);
                    state.bytes -= size;
                    self.forget_recent(oldest);
                    self.dropped.fetch_add(records, Ordering::Relaxed);
                    tracing::warn!(
                        records,
                        "audit spool full: dropped its oldest batch (audit.on_full is drop_oldest)"
                    );
                }
            }
        }
        let path = self.path(seq, count);
        if let Err(source) = write_atomically(&path, &sealed) {
            return Err((SpoolError::Io { path, source }, records));
        }
        state.batches.insert(seq, (bytes, count));
        state.bytes += bytes;
        state.next = seq + 1;
        self.spooled_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.spooled_records.fetch_add(count, Ordering::Relaxed);
        let size: u64 = records.iter().map(|r| r.len() as u64).sum();
        let mut recent = self.recent.lock().unwrap();
        if recent.1 + size <= MAX_RECENT_BYTES {
            recent.0.insert(seq, records);
            recent.1 += size;
        }
        Ok(seq)
    }

    fn forget_recent(&self, seq: u64) -> Option<Vec<Vec<u8>>> {
        let mut recent = self.recent.lock().unwrap();
        let records = recent.0.remove(&seq)?;
        recent.1 -= records.iter().map(|r| r.len() as u64).sum::<u64>();
        Some(records)
    }

    /// The oldest batch still waiting: its sequence number and records. A batch that does not
    /// open is set aside (counted as dropped) and the next one is tried.
    pub fn oldest(&self) -> Result<Option<Batch>, SpoolError> {
        loop {
            let Some((seq, (_, records))) = self.state.lock().unwrap().batches.iter().next().map(|(s, v)| (*s, *v))
            else {
                return Ok(None);
            };
            // Written by this process: its records are still at hand (handed over once; a batch
            // sent again is read from its file).
            if let Some(records) = self.forget_recent(seq) {
                return Ok(Some((seq, records)));
            }
            let path = self.path(seq, records);
            let sealed = std::fs::read(&path).map_err(|source| SpoolError::Io { path: path.clone(), source })?;
            let batch =
                self.keyring.open(&sealed, &aad(seq)).ok().and_then(|plain| AuditBatch::decode(plain.as_slice()).ok());
            match batch {
                Some(batch) => return Ok(Some((seq, batch.records))),
                None => {
                    tracing::error!(path = %path.display(), "an audit spool batch does not open (another data-plane token, or damaged); set aside");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                    self.forget(seq, true);
                }
            }
        }
    }

    /// The control plane stored batch `seq`: it leaves the spool.
    pub fn ack(&self, seq: u64) -> Result<(), SpoolError> {
        let Some(&(_, records)) = self.state.lock().unwrap().batches.get(&seq) else { return Ok(()) };
        let path = self.path(seq, records);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SpoolError::Io { path, source }),
        }
        self.forget(seq, false);
        Ok(())
    }

    /// Sets batch `seq` aside as `.bad` (the control plane refused it as invalid): counted as
    /// dropped, never sent again.
    pub fn set_aside(&self, seq: u64) {
        let Some(&(_, records)) = self.state.lock().unwrap().batches.get(&seq) else { return };
        let path = self.path(seq, records);
        let _ = std::fs::rename(&path, path.with_extension("bad"));
        self.forget(seq, true);
    }

    fn forget(&self, seq: u64, dropped: bool) {
        self.forget_recent(seq);
        let mut state = self.state.lock().unwrap();
        if let Some((bytes, records)) = state.batches.remove(&seq) {
            state.bytes -= bytes;
            if dropped {
                self.dropped.fetch_add(records, Ordering::Relaxed);
            }
        }
    }

    /// Records dropped (spool full under `drop_oldest`, or a batch that did not open).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Bytes and records written since the spool was opened (what a record costs on disk).
    pub fn spooled(&self) -> (u64, u64) {
        (self.spooled_bytes.load(Ordering::Relaxed), self.spooled_records.load(Ordering::Relaxed))
    }

    /// Bytes on disk, and batches waiting.
    pub fn usage(&self) -> (u64, usize) {
        let state = self.state.lock().unwrap();
        (state.bytes, state.batches.len())
    }
}

/// Writes `bytes` to `path` whole or not at all: a temporary file, synced, renamed.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(from: u32, n: u32) -> Vec<Vec<u8>> {
        (from..from + n).map(|i| format!("{{\"id\":\"r{i:04}\",\"note\":\"CANARY-spool\"}}").into_bytes()).collect()
    }

    #[test]
    fn batches_leave_in_order_survive_a_restart_and_hold_no_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), "token-token-token", 1 << 20, OnFull::Refuse).unwrap();
        let first = spool.push(records(0, 3)).unwrap();
        let second = spool.push(records(3, 2)).unwrap();
        assert!(second > first);
        drop(spool);
        // A restart finds both, in order.
        let spool = Spool::open(dir.path(), "token-token-token", 1 << 20, OnFull::Refuse).unwrap();
        let (seq, batch) = spool.oldest().unwrap().unwrap();
        assert_eq!((seq, batch), (first, records(0, 3)));
        spool.ack(seq).unwrap();
        assert_eq!(spool.oldest().unwrap().unwrap().1, records(3, 2));
        assert_eq!(spool.push(records(5, 1)).unwrap(), second + 1, "numbers go on after a restart");
        for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let bytes = std::fs::read(entry.path()).unwrap();
            assert!(!bytes.windows(6).any(|w| w == b"CANARY"), "{} holds a record in clear", entry.path().display());
        }
        // Another token's data plane cannot read them: set aside, counted, never sent.
        let stranger = Spool::open(dir.path(), "another-token-here", 1 << 20, OnFull::Refuse).unwrap();
        assert!(stranger.oldest().unwrap().is_none());
        assert_eq!(stranger.dropped(), 3, "two records and one record, set aside");
    }

    #[test]
    fn a_full_spool_drops_its_oldest_or_refuses_as_configured() {
        let dir = tempfile::tempdir().unwrap();
        let probe = Spool::open(&dir.path().join("probe"), "t", 1 << 20, OnFull::Refuse).unwrap();
        probe.push(records(0, 10)).unwrap();
        let one = probe.usage().0;
        let dropping = Spool::open(&dir.path().join("drop"), "t", one * 3, OnFull::DropOldest).unwrap();
        for i in 0..5 {
            dropping.push(records(i * 10, 10)).unwrap();
        }
        assert_eq!(dropping.usage(), (one * 3, 3));
        assert_eq!(dropping.dropped(), 20);
        assert_eq!(dropping.oldest().unwrap().unwrap().1, records(20, 10), "the newest kept");

        let refusing = Spool::open(&dir.path().join("refuse"), "t", one * 2, OnFull::Refuse).unwrap();
        let kept = refusing.push(records(0, 10)).unwrap();
        refusing.push(records(10, 10)).unwrap();
        assert!(matches!(refusing.push(records(20, 10)), Err((SpoolError::Full { .. }, _))));
        assert_eq!(refusing.dropped(), 0, "nothing lost");
        refusing.ack(kept).unwrap();
        refusing.push(records(20, 10)).expect("room again once the control plane took a batch");
        assert!(matches!(refusing.push(records(0, 1000)), Err((SpoolError::TooLarge { .. }, _))));
    }
}
