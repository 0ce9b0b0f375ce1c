//! Fair shares: how much of a data plane one identity may take, so one account's flood leaves
//! everyone else served.
//!
//! Per user: a request rate (`mcp.rate_limit`, a token bucket per user: `governor`), requests in
//! flight (`mcp.max_inflight_per_user`) and sessions (`mcp.max_sessions_per_user`, counted by
//! [`super::session::Sessions`]). Past a share the request is refused with 429 and
//! `Retry-After` before any work is done for it, and counted for `/metrics`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use reflow_common::config::McpConfig;

/// A request refused for exceeding a share: what to tell the client, and when to come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverShare {
    pub message: String,
    /// Seconds, for `Retry-After`.
    pub retry_after: u64,
}

/// The shares one data plane grants each identity.
pub struct Shares {
    rate: Option<DefaultKeyedRateLimiter<String>>,
    max_inflight: usize,
    max_sessions: usize,
    /// Requests in flight by user.
    inflight: Mutex<HashMap<String, usize>>,
    refused: AtomicU64,
}

impl std::fmt::Debug for Shares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shares")
            .field("max_inflight", &self.max_inflight)
            .field("max_sessions", &self.max_sessions)
            .field("rate_limited", &self.rate.is_some())
            .finish_non_exhaustive()
    }
}

/// One request in flight; the share is returned when it is dropped.
#[derive(Debug)]
pub struct InFlight {
    shares: Arc<Shares>,
    user: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut inflight = self.shares.inflight.lock().unwrap();
        if let Some(count) = inflight.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                inflight.remove(&self.user);
            }
        }
    }
}

impl Shares {
    pub fn new(requests_per_second: u32, burst: u32, max_inflight: usize, max_sessions: usize) -> Arc<Self> {
        let rate = NonZeroU32::new(requests_per_second).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Arc::new(Shares { rate, max_inflight, max_sessions, inflight: Mutex::default(), refused: AtomicU64::new(0) })
    }

    pub fn from_config(config: &McpConfig) -> Arc<Self> {
        Shares::new(
            config.rate_limit.requests_per_second,
            config.rate_limit.burst,
            config.max_inflight_per_user,
            config.max_sessions_per_user,
        )
    }

    /// No share limits at all (benchmarks that drive one identity at full speed).
    pub fn unlimited() -> Arc<Self> {
        Shares::new(0, 0, usize::MAX, usize::MAX)
    }

    fn refuse(&self, message: String, retry_after: u64) -> OverShare {
        self.refused.fetch_add(1, Ordering::Relaxed);
        OverShare { message, retry_after: retry_after.max(1) }
    }

    /// Takes one request of `user`'s rate.
    #[allow(clippy::ptr_arg, reason = "the limiter is keyed by String: a &str would be copied per request")]
    pub fn admit(&self, user: &String) -> Result<(), OverShare> {
        let Some(rate) = &self.rate else { return Ok(()) };
        rate.check_key(user).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            self.refuse(
                "too many requests for this user (mcp.rate_limit); slow down".into(),
                wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            )
        })
    }

    /// A request of `user` begins; refused when the user has `max_inflight` in flight already.
    pub fn begin(self: &Arc<Self>, user: &str) -> Result<InFlight, OverShare> {
        let mut inflight = self.inflight.lock().unwrap();
        let count = inflight.entry(user.to_string()).or_default();
        if *count >= self.max_inflight {
            drop(inflight);
            return Err(self.refuse(
                format!(
                    "this user has {} requests in flight, the most allowed (mcp.max_inflight_per_user)",
                    self.max_inflight
                ),
                1,
            ));
        }
        *count += 1;
        Ok(InFlight { shares: self.clone(), user: user.to_string() })
    }

    /// Whether a user holding `held` sessions may open one more.
    pub fn may_open_session(&self, held: usize) -> Result<(), OverShare> {
        if held >= self.max_sessions {
            return Err(self.refuse(
                format!("this user holds {held} sessions, the most allowed (mcp.max_sessions_per_user); end one first"),
                5,
            ));
        }
        Ok(())
    }

    /// Requests refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Forgets the rate state of users who have been quiet (keeps the limiter's memory bounded).
    pub fn forget_quiet(&self) {
        if let Some(rate) = &self.rate {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_has_a_share_of_its_own() {
        let shares = Shares::new(10, 5, 2, 3);
        let (mallory, alice) = ("mallory".to_string(), "alice".to_string());
        for _ in 0..5 {
            shares.admit(&mallory).unwrap();
        }
        let refused = shares.admit(&mallory).unwrap_err();
        assert!(refused.retry_after >= 1 && refused.message.contains("rate_limit"), "{refused:?}");
        shares.admit(&alice).expect("another user's rate is untouched");
        let (a, _b) = (shares.begin("mallory").unwrap(), shares.begin("mallory").unwrap());
        assert!(shares.begin("mallory").is_err());
        shares.begin("alice").expect("another user's requests are untouched");
        drop(a);
        shares.begin("mallory").expect("a finished request returns its share");
        assert!(shares.may_open_session(2).is_ok() && shares.may_open_session(3).is_err());
        assert_eq!(shares.refused(), 3);
        let unlimited = Shares::unlimited();
        for _ in 0..10_000 {
            unlimited.admit(&"bench".to_string()).unwrap();
        }
    }
}
