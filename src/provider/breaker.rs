//! A circuit breaker per upstream: after `threshold` consecutive failures (requests or health
//! probes) the upstream is skipped — requests go straight to the next provider in their chain
//! instead of waiting out timeouts — until a health probe succeeds.
//!
//! Closing only on a probe (not on a trial request) keeps clients off an upstream that is still
//! down: the probe is the one that pays the connect timeout.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests go through.
    Closed,
    /// Requests skip this upstream until a probe succeeds.
    Open,
}

impl BreakerState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    last_error: Option<String>,
    /// When the state last changed.
    since: Instant,
    last_success: Option<Instant>,
    opened_total: u64,
}

/// Thread-safe: requests and the probe task report into it concurrently.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    inner: Mutex<Inner>,
}

/// A copy of the breaker's state for /health and /metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub in_state_for: Duration,
    pub since_success: Option<Duration>,
    pub opened_total: u64,
}

impl Breaker {
    pub fn new(threshold: u32) -> Self {
        Self {
            threshold: threshold.max(1),
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                last_error: None,
                since: Instant::now(),
                last_success: None,
                opened_total: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain counters: still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests may be sent.
    pub fn allows(&self) -> bool {
        self.lock().state == BreakerState::Closed
    }

    /// A request got its first byte, or a probe answered.
    pub fn success(&self) {
        let mut g = self.lock();
        g.consecutive_failures = 0;
        g.last_success = Some(Instant::now());
        if g.state == BreakerState::Open {
            g.state = BreakerState::Closed;
            g.since = Instant::now();
            tracing::info!("circuit closed: the upstream answers again");
        }
    }

    /// A request or probe failed before any answer; returns true if this opened the breaker.
    pub fn failure(&self, why: &str) -> bool {
        let mut g = self.lock();
        g.consecutive_failures = g.consecutive_failures.saturating_add(1);
        g.last_error = Some(why.to_owned());
        if g.state == BreakerState::Closed && g.consecutive_failures >= self.threshold {
            g.state = BreakerState::Open;
            g.since = Instant::now();
            g.opened_total += 1;
            tracing::warn!(failures = g.consecutive_failures, error = why, "circuit opened: the upstream is skipped");
            return true;
        }
        false
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let g = self.lock();
        BreakerSnapshot {
            state: g.state,
            consecutive_failures: g.consecutive_failures,
            last_error: g.last_error.clone(),
            in_state_for: g.since.elapsed(),
            since_success: g.last_success.map(|t| t.elapsed()),
            opened_total: g.opened_total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_closes_on_success() {
        let b = Breaker::new(3);
        assert!(b.allows());
        assert!(!b.failure("refused"));
        assert!(!b.failure("refused"));
        b.success();
        // Consecutive only: the success reset the count.
        assert!(!b.failure("refused"));
        assert!(!b.failure("refused"));
        assert!(b.allows());
        assert!(b.failure("timed out"), "the third consecutive failure opens it");
        assert!(!b.allows());
        assert!(!b.failure("still down"), "already open");
        let s = b.snapshot();
        assert_eq!((s.state, s.consecutive_failures, s.opened_total), (BreakerState::Open, 4, 1));
        assert_eq!(s.last_error.as_deref(), Some("still down"));
        b.success();
        assert!(b.allows());
        assert_eq!(b.snapshot().consecutive_failures, 0);
    }
}
