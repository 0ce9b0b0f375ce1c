//! Recycling: what a data plane does when a snapshot changes who a user is.
//!
//! A user's identity here is their role, groups and session generation (bumped by the recycle
//! endpoints). When a snapshot changes it, each of the user's client sessions drops its
//! upstream sessions (they were opened with the old identity's credentials) and gets
//! `list_changed` notifications; the client keeps its session, and its next request opens
//! upstream sessions as the new identity. An explicit recycle also stops the user's `per_user`
//! STDIO processes. A restart generation works the same way for a target's processes.
//!
//! What was done is kept per user and per target (the latest generation and how many sessions
//! or processes it took) and reported to the control plane before the update's Ack, so the
//! recycle and restart endpoints can answer with counts from every data plane.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use reflow_proto::resources::User;
use reflow_proto::snapshot::v1::Done;

/// The most users and targets whose last recycle or restart is remembered.
const MAX_REMEMBERED: usize = 4096;

/// The part of a user that, when it changes, recycles their sessions.
pub fn identity(user: &User) -> u64 {
    let mut groups: Vec<&str> = user.groups.iter().map(String::as_str).collect();
    groups.sort_unstable();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (&user.role, groups, user.session_generation).hash(&mut hasher);
    // 0 is "not yet known" on a session.
    hasher.finish().max(1)
}

#[derive(Debug, Default)]
pub struct Recycling {
    inner: Mutex<Inner>,
    /// Held while a snapshot is handled.
    handling: Mutex<()>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The snapshot version last handled.
    version: Option<String>,
    users: HashMap<String, i64>,
    targets: HashMap<String, i64>,
    recycled: HashMap<String, (i64, u32)>,
    restarted: HashMap<String, (i64, u32)>,
    /// A hash of each target's credentials (sealed values included), by target id; `None`
    /// before the first snapshot.
    credentials: Option<HashMap<String, u64>>,
}

impl Recycling {
    /// Held for the whole handling of a snapshot, so two callers never interleave.
    pub fn handling(&self) -> std::sync::MutexGuard<'_, ()> {
        self.handling.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `version` is new here (each snapshot is handled once).
    pub fn begin(&self, version: &str) -> bool {
        let mut inner = self.inner.lock().unwrap();
        if inner.version.as_deref() == Some(version) {
            return false;
        }
        inner.version = Some(version.to_string());
        true
    }

    /// Records the users' session generations and returns the users whose generation went up
    /// (not those seen for the first time: a data plane that just started has nothing to
    /// recycle).
    pub fn users<'u>(&self, users: impl IntoIterator<Item = &'u User>) -> HashMap<String, i64> {
        let mut inner = self.inner.lock().unwrap();
        let mut raised = HashMap::new();
        let mut seen = HashSet::new();
        for user in users {
            seen.insert(user.id.as_str());
            let previous = inner.users.insert(user.id.clone(), user.session_generation);
            if previous.is_some_and(|p| p < user.session_generation) {
                raised.insert(user.id.clone(), user.session_generation);
            }
        }
        inner.users.retain(|id, _| seen.contains(id.as_str()));
        raised
    }

    /// Records the targets' restart generations; for each target whose generation went up,
    /// remembers how many processes `stopped` says were stopped.
    pub fn targets<'t>(
        &self,
        targets: impl IntoIterator<Item = &'t reflow_proto::resources::Target>,
        stopped: &HashMap<String, u32>,
    ) {
        let mut inner = self.inner.lock().unwrap();
        let mut seen = HashSet::new();
        for target in targets {
            seen.insert(target.id.as_str());
            let previous = inner.targets.insert(target.id.clone(), target.restart_generation);
            if previous.is_some_and(|p| p < target.restart_generation) {
                let count = stopped.get(&target.id).copied().unwrap_or(0);
                remember(&mut inner.restarted, &target.id, target.restart_generation, count);
            }
        }
        inner.targets.retain(|id, _| seen.contains(id.as_str()));
    }

    /// Records each target's credentials and returns the ids of targets whose credentials
    /// changed since the last snapshot (not those seen for the first time).
    pub fn credentials(&self, credentials: &[reflow_proto::resources::Credential]) -> HashSet<String> {
        let mut hashes: HashMap<&str, std::collections::hash_map::DefaultHasher> = HashMap::new();
        for credential in credentials {
            let hasher = hashes.entry(credential.target_id.as_str()).or_default();
            (credential.kind.as_str(), credential.scope.to_string(), &credential.name, &credential.sealed).hash(hasher);
        }
        let now: HashMap<String, u64> = hashes.into_iter().map(|(id, h)| (id.to_string(), h.finish())).collect();
        let mut inner = self.inner.lock().unwrap();
        let changed = match &inner.credentials {
            None => HashSet::new(),
            Some(before) => now
                .iter()
                .filter(|(id, hash)| before.get(*id) != Some(*hash))
                .map(|(id, _)| id.clone())
                .chain(before.keys().filter(|id| !now.contains_key(*id)).cloned())
                .collect(),
        };
        inner.credentials = Some(now);
        changed
    }

    /// Remembers that `user`'s recycle to `generation` took `sessions` sessions.
    pub fn recycled(&self, user: &str, generation: i64, sessions: u32) {
        remember(&mut self.inner.lock().unwrap().recycled, user, generation, sessions);
    }

    /// What to report: recycles and restarts, sorted (equal reports compare equal).
    pub fn report(&self) -> (Vec<Done>, Vec<Done>) {
        let inner = self.inner.lock().unwrap();
        let list = |map: &HashMap<String, (i64, u32)>| {
            let mut done: Vec<Done> = map
                .iter()
                .map(|(id, (generation, count))| Done { id: id.clone(), generation: *generation, count: *count })
                .collect();
            done.sort_by(|a, b| a.id.cmp(&b.id));
            done
        };
        (list(&inner.recycled), list(&inner.restarted))
    }
}

fn remember(map: &mut HashMap<String, (i64, u32)>, id: &str, generation: i64, count: u32) {
    if map.len() >= MAX_REMEMBERED && !map.contains_key(id) {
        // The oldest generation is the least likely to be still awaited.
        if let Some(oldest) = map.iter().min_by_key(|(_, (g, _))| *g).map(|(k, _)| k.clone()) {
            map.remove(&oldest);
        }
    }
    map.insert(id.to_string(), (generation, count));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, role: &str, generation: i64) -> User {
        User {
            id: id.into(),
            email: String::new(),
            role: role.into(),
            groups: vec!["b".into(), "a".into()],
            active: true,
            session_generation: generation,
        }
    }

    #[test]
    fn identity_changes_with_role_groups_and_generation_only() {
        let base = user("u", "dev", 0);
        let mut reordered = base.clone();
        reordered.groups.reverse();
        assert_eq!(identity(&base), identity(&reordered));
        assert_ne!(identity(&base), identity(&user("u", "ops", 0)));
        assert_ne!(identity(&base), identity(&user("u", "dev", 1)));
        let mut regrouped = base.clone();
        regrouped.groups.push("c".into());
        assert_ne!(identity(&base), identity(&regrouped));
    }

    #[test]
    fn only_raised_generations_count_and_first_sight_does_not() {
        let recycling = Recycling::default();
        assert!(recycling.users([&user("u", "dev", 3)]).is_empty(), "first seen: nothing to recycle");
        assert!(recycling.users([&user("u", "dev", 3)]).is_empty());
        assert_eq!(recycling.users([&user("u", "dev", 4)]), HashMap::from([("u".to_string(), 4)]));
        assert!(recycling.begin("v1"));
        assert!(!recycling.begin("v1"), "a version is handled once");
        recycling.recycled("u", 4, 2);
        let (recycled, restarted) = recycling.report();
        assert_eq!(recycled, vec![Done { id: "u".into(), generation: 4, count: 2 }]);
        assert!(restarted.is_empty());
    }

    #[test]
    fn credentials_added_changed_or_removed_after_the_first_snapshot_count_as_changed() {
        use reflow_common::credentials::Scope;
        use reflow_common::model::SecretKind;
        let credential = |target: &str, sealed: &str| reflow_proto::resources::Credential {
            target_id: target.into(),
            kind: SecretKind::Token,
            scope: Scope::Default,
            name: String::new(),
            sealed: sealed.into(),
        };
        let recycling = Recycling::default();
        assert!(recycling.credentials(&[credential("a", "1")]).is_empty(), "the first snapshot changes nothing");
        assert!(recycling.credentials(&[credential("a", "1")]).is_empty());
        let added = recycling.credentials(&[credential("a", "1"), credential("b", "1")]);
        assert_eq!(added, HashSet::from(["b".to_string()]));
        assert_eq!(
            recycling.credentials(&[credential("a", "2"), credential("b", "1")]),
            HashSet::from(["a".to_string()])
        );
        assert_eq!(recycling.credentials(&[credential("a", "2")]), HashSet::from(["b".to_string()]));
    }
}
