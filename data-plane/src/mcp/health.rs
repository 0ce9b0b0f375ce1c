//! How each target fares on this data plane, for admins: when it last worked, its last
//! failure and why, and how many client sessions hold an upstream session to it. Reported to
//! the control plane with the status (see [`crate::sync::Observer`]), which shows it per data
//! plane in `GET /api/targets/{id}/status`.
//!
//! Successes are recorded on the request path, so recording one is an atomic store behind a
//! read lock; the map is keyed by target id (a renamed target keeps its counts) and bounded by
//! the targets the snapshot holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// The longest failure reason kept.
const MAX_REASON: usize = 2048;

#[derive(Debug, Default)]
pub struct Health {
    targets: RwLock<HashMap<String, Arc<Stats>>>,
}

#[derive(Debug, Default)]
pub struct Stats {
    /// Unix seconds; 0: never.
    last_ok: AtomicI64,
    failures: AtomicU64,
    last_failure: Mutex<Option<(i64, String)>>,
    /// Client sessions holding an upstream session to the target.
    held: AtomicU32,
}

/// Counts one client session's upstream session to a target while it lives.
#[derive(Debug)]
pub struct Held(Arc<Stats>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

use reflow_common::text::unix_now as now;

/// A target's health as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub sessions: u32,
    pub last_ok: i64,
    pub failures: u64,
    pub last_failure: Option<(i64, String)>,
}

impl Health {
    fn stats(&self, target: &str) -> Arc<Stats> {
        if let Some(stats) = self.targets.read().unwrap().get(target) {
            return stats.clone();
        }
        self.targets.write().unwrap().entry(target.to_string()).or_default().clone()
    }

    /// An exchange with `target` succeeded.
    pub fn ok(&self, target: &str) {
        let stats = self.stats(target);
        let now = now();
        if stats.last_ok.load(Ordering::Relaxed) != now {
            stats.last_ok.store(now, Ordering::Relaxed);
        }
    }

    /// An exchange with `target` failed, for `reason`.
    pub fn failed(&self, target: &str, reason: &str) {
        let stats = self.stats(target);
        stats.failures.fetch_add(1, Ordering::Relaxed);
        let mut reason = reason.to_string();
        reflow_common::text::keep_tail(&mut reason, MAX_REASON);
        *stats.last_failure.lock().unwrap() = Some((now(), reason));
    }

    /// Counts a client session's upstream session to `target` until the guard drops.
    pub fn hold(&self, target: &str) -> Held {
        let stats = self.stats(target);
        stats.held.fetch_add(1, Ordering::Relaxed);
        Held(stats)
    }

    /// Failed exchanges by target id (for `/ready`).
    pub fn failures(&self) -> std::collections::BTreeMap<String, u64> {
        let targets = self.targets.read().unwrap();
        targets
            .iter()
            .map(|(name, stats)| (name.clone(), stats.failures.load(Ordering::Relaxed)))
            .filter(|(_, failures)| *failures > 0)
            .collect()
    }

    /// Every target with something to say, by id; targets the snapshot no longer holds
    /// (`keep` says no) are forgotten once nothing holds them.
    pub fn snapshot(&self, keep: impl Fn(&str) -> bool) -> Vec<(String, Snapshot)> {
        let mut targets = self.targets.write().unwrap();
        targets.retain(|name, stats| keep(name) || stats.held.load(Ordering::Relaxed) > 0);
        targets
            .iter()
            .map(|(name, stats)| {
                let snapshot = Snapshot {
                    sessions: stats.held.load(Ordering::Relaxed),
                    last_ok: stats.last_ok.load(Ordering::Relaxed),
                    failures: stats.failures.load(Ordering::Relaxed),
                    last_failure: stats.last_failure.lock().unwrap().clone(),
                };
                (name.clone(), snapshot)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_sessions_count_while_their_guard_lives() {
        let health = Health::default();
        let a = health.hold("t");
        let b = health.hold("t");
        health.ok("t");
        health.failed("t", "boom");
        let snapshot = health.snapshot(|_| true);
        assert_eq!(snapshot.len(), 1);
        let (_, t) = &snapshot[0];
        assert_eq!((t.sessions, t.failures), (2, 1));
        assert!(t.last_ok > 0);
        assert_eq!(t.last_failure.as_ref().map(|(_, r)| r.as_str()), Some("boom"));
        drop((a, b));
        assert_eq!(health.snapshot(|_| true)[0].1.sessions, 0);
        assert!(health.snapshot(|_| false).is_empty(), "a removed target is forgotten when unheld");
    }

    #[test]
    fn long_reasons_keep_their_end() {
        let mut text = format!("{}the end", "x".repeat(5000));
        reflow_common::text::keep_tail(&mut text, 100);
        assert!(text.ends_with("the end") && text.len() <= 100 + '…'.len_utf8());
    }
}
