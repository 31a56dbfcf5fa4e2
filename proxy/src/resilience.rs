//! Resilience policies that keep state between requests: the retry budget, backoff, and
//! passive outlier detection (ejection of endpoints that fail in a row).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::Rng;
use sidemesh_api::config::OutlierDetection;

use crate::balance::{Endpoint, now_ms};

/// Seconds of history the retry budget looks at.
const BUDGET_WINDOW_SECONDS: usize = 10;

/// Bounds the extra load retries add: at most `percent` of the requests of the last ten
/// seconds, plus a floor of `min_per_second` retries per second.
#[derive(Debug)]
pub struct RetryBudget {
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    origin: Instant,
    /// (second index, requests, retries) per slot.
    slots: [(u64, u64, u64); BUDGET_WINDOW_SECONDS],
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            window: Mutex::new(Window {
                origin: Instant::now(),
                slots: [(0, 0, 0); BUDGET_WINDOW_SECONDS],
            }),
        }
    }
}

impl Window {
    fn slot(&mut self, now: Instant) -> &mut (u64, u64, u64) {
        let sec = now.saturating_duration_since(self.origin).as_secs();
        let i = (sec % BUDGET_WINDOW_SECONDS as u64) as usize;
        let slot = &mut self.slots[i];
        if slot.0 != sec {
            *slot = (sec, 0, 0);
        }
        slot
    }

    fn totals(&self, now: Instant) -> (u64, u64) {
        let sec = now.saturating_duration_since(self.origin).as_secs();
        self.slots
            .iter()
            .filter(|s| sec.saturating_sub(s.0) < BUDGET_WINDOW_SECONDS as u64)
            .fold((0, 0), |(a, b), s| (a + s.1, b + s.2))
    }
}

impl RetryBudget {
    /// Counts an original request.
    pub fn deposit(&self) {
        if let Ok(mut w) = self.window.lock() {
            w.slot(Instant::now()).1 += 1;
        }
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn withdraw(&self, percent: u32, min_per_second: u32) -> bool {
        let now = Instant::now();
        let Ok(mut w) = self.window.lock() else {
            return false;
        };
        let (requests, retries) = w.totals(now);
        let allowed = requests * u64::from(percent) / 100
            + u64::from(min_per_second) * BUDGET_WINDOW_SECONDS as u64;
        if retries >= allowed {
            return false;
        }
        w.slot(now).2 += 1;
        true
    }
}

/// The backoff before retry number `retry` (1-based): full jitter over an exponentially
/// growing window, capped.
pub fn backoff(retry: u32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << retry.saturating_sub(1).min(16));
    let cap = exp.min(max);
    if cap.is_zero() {
        return cap;
    }
    let ms = cap.as_micros() as u64;
    Duration::from_micros(rand::rng().random_range(0..=ms))
}

/// What one try at an endpoint came to, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response that was not 5xx (or a TCP connection that was made).
    Success,
    /// A 5xx response.
    ServerError,
    /// The connection could not be made.
    ConnectFailure,
}

/// Records an outcome on an endpoint and ejects it when it has failed often enough in a
/// row, unless that would eject more than the allowed share of `peers` (the backend's
/// endpoints). Returns whether the endpoint was ejected now.
pub fn record(
    endpoint: &Endpoint,
    outcome: Outcome,
    policy: Option<&OutlierDetection>,
    peers: &[Arc<Endpoint>],
) -> bool {
    let s = &endpoint.stats;
    let (count, threshold) = match outcome {
        Outcome::Success => {
            s.consecutive_5xx.store(0, Ordering::Relaxed);
            s.consecutive_connect_failures.store(0, Ordering::Relaxed);
            return false;
        }
        Outcome::ServerError => (
            s.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1,
            policy.map(|p| p.consecutive_5xx),
        ),
        Outcome::ConnectFailure => (
            s.consecutive_connect_failures
                .fetch_add(1, Ordering::Relaxed)
                + 1,
            policy.map(|p| p.consecutive_connect_failures),
        ),
    };
    let (Some(policy), Some(threshold)) = (policy, threshold) else {
        return false;
    };
    if threshold == 0 || count < threshold {
        return false;
    }
    let now = now_ms();
    if s.ejected_until_ms.load(Ordering::Relaxed) > now {
        return false;
    }
    let ejected = peers
        .iter()
        .filter(|p| p.stats.ejected_until_ms.load(Ordering::Relaxed) > now)
        .count();
    let max = peers.len() * usize::from(policy.max_ejection_percent) / 100;
    if ejected + 1 > max {
        return false;
    }
    let times = s.ejections.fetch_add(1, Ordering::Relaxed) + 1;
    let duration = policy
        .base_ejection_ms
        .saturating_mul(u64::from(times))
        .min(policy.max_ejection_ms);
    s.ejected_until_ms.store(now + duration, Ordering::Relaxed);
    s.consecutive_5xx.store(0, Ordering::Relaxed);
    s.consecutive_connect_failures.store(0, Ordering::Relaxed);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                let addr: std::net::SocketAddr = format!("10.0.0.{}:80", i + 1).parse().unwrap();
                Arc::new(Endpoint {
                    addr,
                    authority: crate::balance::authority_of(addr),
                    weight: 100,
                    local: false,
                    meshed: false,
                    stats: Arc::default(),
                })
            })
            .collect()
    }

    #[test]
    fn budget_allows_percent_plus_floor() {
        let b = RetryBudget::default();
        for _ in 0..100 {
            b.deposit();
        }
        // 20 % of 100 plus a floor of 0.
        let granted = (0..50).filter(|_| b.withdraw(20, 0)).count();
        assert_eq!(granted, 20);
        let b = RetryBudget::default();
        // No requests: only the floor (1 per second over 10 s).
        let granted = (0..50).filter(|_| b.withdraw(20, 1)).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        for retry in 1..20 {
            let d = backoff(retry, Duration::from_millis(25), Duration::from_millis(250));
            assert!(d <= Duration::from_millis(250));
        }
        assert_eq!(
            backoff(1, Duration::ZERO, Duration::from_millis(250)),
            Duration::ZERO
        );
    }

    #[test]
    fn ejection_grows_and_respects_max_percent() {
        let peers = eps(4);
        let policy = OutlierDetection {
            consecutive_5xx: 3,
            consecutive_connect_failures: 2,
            base_ejection_ms: 1000,
            max_ejection_ms: 5000,
            max_ejection_percent: 50,
        };
        let p = Some(&policy);
        assert!(!record(&peers[0], Outcome::ServerError, p, &peers));
        assert!(!record(&peers[0], Outcome::ServerError, p, &peers));
        assert!(record(&peers[0], Outcome::ServerError, p, &peers));
        let until = peers[0].stats.ejected_until_ms.load(Ordering::Relaxed);
        assert!(until >= now_ms() + 900);
        // A success in between resets the count.
        record(&peers[1], Outcome::ConnectFailure, p, &peers);
        record(&peers[1], Outcome::Success, p, &peers);
        assert!(!record(&peers[1], Outcome::ConnectFailure, p, &peers));
        assert!(record(&peers[1], Outcome::ConnectFailure, p, &peers));
        // Two of four ejected = 50 %: the third may not be.
        record(&peers[2], Outcome::ConnectFailure, p, &peers);
        assert!(!record(&peers[2], Outcome::ConnectFailure, p, &peers));
        // The second ejection of an endpoint lasts twice as long.
        peers[0].stats.ejected_until_ms.store(1, Ordering::Relaxed);
        for _ in 0..3 {
            record(&peers[0], Outcome::ServerError, p, &peers);
        }
        let until = peers[0].stats.ejected_until_ms.load(Ordering::Relaxed);
        assert!(until >= now_ms() + 1900, "{until}");
    }

    #[test]
    fn no_policy_never_ejects() {
        let peers = eps(2);
        for _ in 0..100 {
            assert!(!record(&peers[0], Outcome::ServerError, None, &peers));
        }
    }
}
