//! Updates in parts: how the control plane splits a snapshot update into messages of bounded
//! size, and how a data plane puts them back together.
//!
//! gRPC refuses messages past a decode limit, and a full sync of a large state (many users,
//! large credential values) would pass any fixed limit. So an update is sent as parts of at
//! most [`PART_BYTES`] each (a single resource larger than that travels alone), and a data plane
//! decodes messages up to [`MAX_MESSAGE_BYTES`], which any part fits in, while bounding what it
//! assembles by its own `max_bytes`.

use prost::Message;

use crate::snapshot::v1::SnapshotUpdate;

/// The size the control plane aims each part at.
pub const PART_BYTES: usize = 2 * 1024 * 1024;
/// The largest message either end decodes: a part of [`PART_BYTES`] plus its largest resource.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Splits `update` into parts of about `max` bytes; the last has `more == false`. An update that
/// fits is one part.
pub fn split(update: SnapshotUpdate, max: usize) -> Vec<SnapshotUpdate> {
    let header = |update: &SnapshotUpdate| SnapshotUpdate {
        version: update.version.clone(),
        base_version: update.base_version.clone(),
        control_plane_id: update.control_plane_id.clone(),
        upserts: Vec::new(),
        removals: Vec::new(),
        more: true,
        ended_sessions: update.ended_sessions.clone(),
    };
    let empty = header(&update);
    let mut parts = Vec::new();
    let mut current = empty.clone();
    let mut size = 0;
    // Starts a new part when `len` more bytes would take the current one past `max` (a part
    // holds at least one item, however large).
    let mut room_for = |len: usize, current: &mut SnapshotUpdate| {
        if size + len > max && !(current.upserts.is_empty() && current.removals.is_empty()) {
            parts.push(std::mem::replace(current, empty.clone()));
            size = 0;
        }
        size += len;
    };
    for resource in update.upserts {
        room_for(resource.encoded_len() + 8, &mut current);
        current.upserts.push(resource);
    }
    for removal in update.removals {
        room_for(removal.encoded_len() + 8, &mut current);
        current.removals.push(removal);
    }
    current.more = false;
    parts.push(current);
    parts
}

/// Collects the parts of one update.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: Option<SnapshotUpdate>,
    bytes: usize,
}

/// Why parts could not be put together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartError {
    #[error("a part of update {got} arrived while update {expected} was incomplete")]
    Interleaved { expected: String, got: String },
    #[error("update {version} exceeds this data plane's limit of {limit} bytes")]
    TooLarge { version: String, limit: usize },
}

impl Assembler {
    /// Adds a part; the whole update once its last part arrived. Past `max_bytes` the update is
    /// dropped with an error (nothing of it is kept).
    pub fn push(&mut self, part: SnapshotUpdate, max_bytes: usize) -> Result<Option<SnapshotUpdate>, PartError> {
        let size = part.encoded_len();
        let more = part.more;
        let whole = match self.pending.take() {
            None => part,
            Some(mut pending) => {
                if pending.version != part.version || pending.base_version != part.base_version {
                    self.bytes = 0;
                    return Err(PartError::Interleaved { expected: pending.version, got: part.version });
                }
                pending.upserts.extend(part.upserts);
                pending.removals.extend(part.removals);
                pending
            }
        };
        self.bytes += size;
        if self.bytes > max_bytes {
            self.bytes = 0;
            return Err(PartError::TooLarge { version: whole.version, limit: max_bytes });
        }
        if more {
            self.pending = Some(whole);
            return Ok(None);
        }
        self.bytes = 0;
        Ok(Some(SnapshotUpdate { more: false, ..whole }))
    }

    /// Forgets a partly received update (the stream ended).
    pub fn reset(&mut self) {
        self.pending = None;
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::v1::{Resource, ResourceRef};

    fn update(resources: usize, payload: usize) -> SnapshotUpdate {
        SnapshotUpdate {
            version: "v2".into(),
            base_version: "v1".into(),
            upserts: (0..resources)
                .map(|i| Resource {
                    r#type: 2,
                    id: format!("r{i}"),
                    version: "x".into(),
                    payload: vec![7; payload],
                    requires: vec![],
                })
                .collect(),
            removals: (0..3).map(|i| ResourceRef { r#type: 2, id: format!("gone{i}") }).collect(),
            control_plane_id: "cp".into(),
            more: false,
            ended_sessions: vec![],
        }
    }

    #[test]
    fn split_parts_stay_bounded_and_reassemble_to_the_whole() {
        let whole = update(100, 50_000);
        let parts = split(whole.clone(), 400_000);
        assert!(parts.len() >= 12, "{}", parts.len());
        assert!(parts.iter().all(|p| p.encoded_len() <= 400_000 + 60_000));
        assert!(parts[..parts.len() - 1].iter().all(|p| p.more) && !parts.last().unwrap().more);
        let mut assembler = Assembler::default();
        let mut out = None;
        for part in parts {
            assert!(out.is_none());
            out = assembler.push(part, usize::MAX).unwrap();
        }
        assert_eq!(out.unwrap(), whole);
        // A small update is one part; an oversized resource travels alone.
        assert_eq!(split(update(2, 10), PART_BYTES).len(), 1);
        assert_eq!(split(update(3, 1000), 10).len(), 6);
    }

    #[test]
    fn assembly_is_bounded_and_refuses_interleaved_parts() {
        let parts = split(update(10, 1000), 3000);
        let mut assembler = Assembler::default();
        assembler.push(parts[0].clone(), usize::MAX).unwrap();
        let mut other = parts[1].clone();
        other.version = "v3".into();
        assert!(matches!(assembler.push(other, usize::MAX), Err(PartError::Interleaved { .. })));
        let mut assembler = Assembler::default();
        let errors: Vec<_> = parts.into_iter().filter_map(|p| assembler.push(p, 5000).err()).collect();
        assert!(matches!(errors.first(), Some(PartError::TooLarge { .. })), "{errors:?}");
    }
}
