//! The audit trail's record and its tamper evidence.
//!
//! Data planes ship one [`AuditRecord`] per MCP request. The control plane stores each as its
//! canonical JSON body, chained to the previous record of the same data plane: `hash =
//! SHA-256(previous hash, "\n", body)`, the first record of a chain starting from the empty
//! hash. [`verify`] walks every chain and names the first record that does not fit: a body or a
//! filter column changed, a record removed (a gap in `seq`) or records reordered (a broken
//! link). Pruning keeps, per data plane, the seq and hash of the last record it removed (the
//! anchor), so what remains still verifies.
//!
//! No argument, result or credential value is ever part of a record unless a target opts in to
//! arguments, and then masked by the data plane before it ships.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

pub use reflow_proto::audit::AuditRecord;

/// The link from `previous` (a hash, empty for the first record) to a record's `body`.
pub fn chain_hash(previous: &str, body: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(previous.as_bytes());
    hasher.update(b"\n");
    hasher.update(body.as_bytes());
    reflow_common::crypto::to_hex(&hasher.finalize())
}

/// A stored record with its place in the chain, as verification reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub id: String,
    pub data_plane: String,
    pub seq: i64,
    /// The filter columns, as stored beside the body.
    pub at: DateTime<Utc>,
    pub user_id: Option<String>,
    pub method: String,
    pub target: Option<String>,
    pub name: Option<String>,
    pub decision: String,
    pub body: String,
    pub prev_hash: String,
    pub hash: String,
}

/// Where a data plane's chain starts after pruning: the last removed record's seq and hash.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Anchor {
    pub seq: i64,
    pub hash: String,
}

/// The first record that breaks a chain, and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("data plane {data_plane:?}, record {seq} ({id}): {why}")]
pub struct Broken {
    pub data_plane: String,
    pub seq: i64,
    pub id: String,
    pub why: String,
}

/// Verifies every chain: `records` ordered by data plane, then seq; `anchor` gives each data
/// plane's pruning anchor. Returns how many records were checked.
pub fn verify<'r>(
    records: impl IntoIterator<Item = &'r StoredRecord>,
    anchor: impl Fn(&str) -> Anchor,
) -> Result<u64, Broken> {
    let mut checked = 0;
    let mut previous: Option<(&str, i64, &str)> = None;
    let mut anchors: std::collections::HashMap<String, Anchor> = std::collections::HashMap::new();
    for record in records {
        let broken =
            |why: String| Broken { data_plane: record.data_plane.clone(), seq: record.seq, id: record.id.clone(), why };
        let (expected_seq, expected_prev) = match previous {
            Some((plane, seq, hash)) if plane == record.data_plane => (seq + 1, hash.to_string()),
            _ => {
                let start = anchors.entry(record.data_plane.clone()).or_insert_with(|| anchor(&record.data_plane));
                (start.seq + 1, start.hash.clone())
            }
        };
        if record.seq != expected_seq {
            return Err(broken(format!("expected record {expected_seq} here: records are missing or out of order")));
        }
        if record.prev_hash != expected_prev {
            return Err(broken("its link to the previous record is broken (removed or reordered)".into()));
        }
        if chain_hash(&record.prev_hash, &record.body) != record.hash {
            return Err(broken("its body does not match its hash (changed)".into()));
        }
        let body: AuditRecord =
            serde_json::from_str(&record.body).map_err(|e| broken(format!("its body is not an audit record: {e}")))?;
        let columns_match = body.id == record.id
            && body.data_plane == record.data_plane
            && body.at == record.at
            && body.user_id == record.user_id
            && body.method == record.method
            && body.target == record.target
            && body.name == record.name
            && body.decision == record.decision;
        if !columns_match {
            return Err(broken("its filter columns differ from its body (changed)".into()));
        }
        previous = Some((&record.data_plane, record.seq, &record.hash));
        checked += 1;
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u32) -> AuditRecord {
        let at = DateTime::from_timestamp(1_800_000_000 + i64::from(n), 0).unwrap();
        AuditRecord {
            user_id: Some("u".into()),
            target: Some("t".into()),
            name: Some("echo".into()),
            decision: "allowed".into(),
            duration_ms: 1,
            ..AuditRecord::new(format!("r{n}"), "dp".into(), at, "/mcp".into(), "tools/call".into())
        }
    }

    fn chain(n: u32) -> Vec<StoredRecord> {
        let mut previous = String::new();
        (1..=n)
            .map(|i| {
                let r = record(i);
                let body = r.body();
                let hash = chain_hash(&previous, &body);
                let stored = StoredRecord {
                    id: r.id.clone(),
                    data_plane: r.data_plane.clone(),
                    seq: i64::from(i),
                    at: r.at,
                    user_id: r.user_id.clone(),
                    method: r.method.clone(),
                    target: r.target.clone(),
                    name: r.name.clone(),
                    decision: r.decision.clone(),
                    body,
                    prev_hash: previous.clone(),
                    hash: hash.clone(),
                };
                previous = hash;
                stored
            })
            .collect()
    }

    #[test]
    fn a_chain_verifies_and_each_kind_of_tampering_is_named() {
        let good = chain(5);
        assert_eq!(verify(&good, |_| Anchor::default()), Ok(5));

        let mut changed = good.clone();
        changed[2].body = changed[2].body.replace("echo", "rm_rf");
        assert_eq!(verify(&changed, |_| Anchor::default()).unwrap_err().seq, 3);

        let mut column = good.clone();
        column[1].decision = "denied".into();
        assert!(verify(&column, |_| Anchor::default()).unwrap_err().why.contains("filter columns"));

        let mut removed = good.clone();
        removed.remove(3);
        assert_eq!(verify(&removed, |_| Anchor::default()).unwrap_err().seq, 5);

        let mut reordered = good.clone();
        reordered.swap(1, 2);
        assert_eq!(verify(&reordered, |_| Anchor::default()).unwrap_err().id, "r3");

        // After pruning the first two, the anchor carries the chain on.
        let pruned: Vec<StoredRecord> = good[2..].to_vec();
        assert!(verify(&pruned, |_| Anchor::default()).is_err());
        let anchor = Anchor { seq: 2, hash: good[1].hash.clone() };
        assert_eq!(verify(&pruned, |_| anchor.clone()), Ok(3));
    }
}
