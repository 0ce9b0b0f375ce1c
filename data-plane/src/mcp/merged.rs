//! Merged lists shared by the sessions of one identity.
//!
//! An aggregated `tools/list` asks every reachable upstream; a client asks it at every start,
//! and many clients of one user ask the same. A merged list is kept under what decides its
//! content: the snapshot version (targets, policies, credentials), the user, the endpoint, the
//! list method, and the client's `initialize` parameters (servers may offer different tools to
//! different client capabilities). It is reused until
//! - a `list_changed` notification from any upstream it came from (each target has an epoch,
//!   bumped by such a notification; an entry holds the epochs it was merged at), or
//! - the snapshot changes (every entry is dropped), or
//! - it is older than `mcp.list_cache_ttl` (upstreams that cannot notify still change).
//!
//! A merge some upstream failed is not kept: the next request asks again.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Scope;

/// Most entries held, and most list items over all entries: past either, expired entries
/// are dropped, and everything if that is not enough.
const CAPACITY: usize = 10_000;
const MAX_ITEMS: usize = 200_000;

/// What a merged list's content depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListKey {
    pub version: String,
    pub user_id: String,
    pub scope: Scope,
    pub method: &'static str,
    /// A hash of the client's `initialize` parameters.
    pub client: u64,
}

/// A merged list, as sessions page over it.
#[derive(Debug)]
pub struct Merged {
    pub items: Vec<Value>,
    /// What each upstream offered (target id, the name or URI policies match), allowed or
    /// not: re-evaluated when the snapshot changes, to tell the client its list changed.
    pub offered: Vec<(String, String, bool)>,
    /// The ids of the targets whose items are in the merge (not those that failed).
    pub sources: Vec<String>,
    /// The result's other fields the upstreams sent (`ttlMs`, `cacheScope`, `_meta`, anything
    /// newer), kept on every page: see [`super::lists::result_fields`].
    pub fields: serde_json::Map<String, Value>,
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<ListKey, Entry>,
    /// Items over all entries.
    items: usize,
}

#[derive(Debug)]
struct Entry {
    merged: Arc<Merged>,
    /// The epoch of each target it was merged from.
    epochs: Vec<(String, u64)>,
    made: Instant,
}

#[derive(Debug, Default)]
pub struct MergedLists {
    entries: Mutex<Entries>,
    /// By target name; bumped by the target's `list_changed`.
    epochs: Mutex<HashMap<String, u64>>,
}

/// A hash of a client's serialised `initialize` parameters, for [`ListKey::client`].
pub fn client_hash(params: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    params.hash(&mut hasher);
    hasher.finish()
}

impl MergedLists {
    /// The current epochs of `targets`, to hand to [`MergedLists::keep`] after merging: a
    /// change notified while the merge runs makes the result stale at once.
    pub fn epochs<'t>(&self, targets: impl Iterator<Item = &'t str>) -> Vec<(String, u64)> {
        let epochs = self.epochs.lock().unwrap();
        targets.map(|t| (t.to_string(), epochs.get(t).copied().unwrap_or(0))).collect()
    }

    /// The kept merge for `key`, if it is younger than `ttl` and none of its targets changed.
    pub fn get(&self, key: &ListKey, ttl: Duration) -> Option<Arc<Merged>> {
        let entries = self.entries.lock().unwrap();
        let entry = entries.map.get(key)?;
        if entry.made.elapsed() >= ttl {
            return None;
        }
        let epochs = self.epochs.lock().unwrap();
        entry
            .epochs
            .iter()
            .all(|(target, epoch)| epochs.get(target).copied().unwrap_or(0) == *epoch)
            .then(|| entry.merged.clone())
    }

    pub fn keep(&self, key: ListKey, merged: Arc<Merged>, epochs: Vec<(String, u64)>, ttl: Duration) {
        let mut entries = self.entries.lock().unwrap();
        let size = merged.items.len();
        if entries.map.len() >= CAPACITY || entries.items + size > MAX_ITEMS {
            entries.map.retain(|_, e| e.made.elapsed() < ttl);
            entries.items = entries.map.values().map(|e| e.merged.items.len()).sum();
            if entries.map.len() >= CAPACITY || entries.items + size > MAX_ITEMS {
                *entries = Entries::default();
            }
        }
        if size > MAX_ITEMS {
            return;
        }
        entries.items += size;
        if let Some(replaced) = entries.map.insert(key, Entry { merged, epochs, made: Instant::now() }) {
            entries.items -= replaced.merged.items.len();
        }
    }

    /// `target` notified a list change: every merge that includes it is stale.
    pub fn changed(&self, target: &str) {
        *self.epochs.lock().unwrap().entry(target.to_string()).or_default() += 1;
    }

    /// A new snapshot: every key names an old version.
    pub fn clear(&self) {
        *self.entries.lock().unwrap() = Entries::default();
    }
}

/// The merged list a session was last served for a method, kept so cursors page over a
/// stable result (`generation` names it in cursors).
#[derive(Debug)]
pub struct CachedList {
    pub generation: u64,
    pub merged: Arc<Merged>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(user: &str) -> ListKey {
        ListKey { version: "v1".into(), user_id: user.into(), scope: Scope::Aggregate, method: "tools/list", client: 7 }
    }

    fn merged(n: usize) -> Arc<Merged> {
        Arc::new(Merged {
            items: vec![Value::Null; n],
            offered: Vec::new(),
            sources: Vec::new(),
            fields: Default::default(),
        })
    }

    #[test]
    fn a_merge_is_reused_until_a_source_changes_or_it_ages() {
        let lists = MergedLists::default();
        let ttl = Duration::from_secs(60);
        let epochs = lists.epochs(["a", "b"].into_iter());
        lists.keep(key("u1"), merged(2), epochs, ttl);
        assert_eq!(lists.get(&key("u1"), ttl).unwrap().items.len(), 2);
        assert!(lists.get(&key("u2"), ttl).is_none(), "another user has a list of their own");
        lists.changed("c");
        assert!(lists.get(&key("u1"), ttl).is_some(), "a target it did not come from changed");
        lists.changed("b");
        assert!(lists.get(&key("u1"), ttl).is_none(), "one of its targets changed");

        let epochs = lists.epochs(["a", "b"].into_iter());
        lists.keep(key("u1"), merged(3), epochs, ttl);
        assert_eq!(lists.get(&key("u1"), ttl).unwrap().items.len(), 3);
        assert!(lists.get(&key("u1"), Duration::ZERO).is_none(), "older than the time to live");
        lists.clear();
        assert!(lists.get(&key("u1"), ttl).is_none(), "a new snapshot drops everything");
    }

    #[test]
    fn the_items_held_are_bounded() {
        let lists = MergedLists::default();
        let ttl = Duration::from_secs(60);
        for user in 0..3 {
            lists.keep(key(&user.to_string()), merged(MAX_ITEMS / 2), Vec::new(), ttl);
        }
        let held = lists.entries.lock().unwrap().items;
        assert!(held <= MAX_ITEMS, "{held} items held");
        assert!(lists.get(&key("2"), ttl).is_some(), "the newest is kept");
        lists.keep(key("huge"), merged(MAX_ITEMS + 1), Vec::new(), ttl);
        assert!(lists.get(&key("huge"), ttl).is_none(), "a merge larger than the bound is not kept");
    }

    #[test]
    fn a_change_during_the_merge_makes_it_stale_at_once() {
        let lists = MergedLists::default();
        let epochs = lists.epochs(["a"].into_iter());
        lists.changed("a");
        lists.keep(key("u1"), merged(1), epochs, Duration::from_secs(60));
        assert!(lists.get(&key("u1"), Duration::from_secs(60)).is_none());
    }
}
