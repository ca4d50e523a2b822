//! The retry budget: retries an upstream may make, as a share of its recent requests plus a
//! small floor (as Linkerd's), so that retries cannot multiply the load on servers that are
//! already failing. Counted in one-second buckets over a ten-second window. Every request
//! counts, so requests are counted in per-worker shards that no other worker writes; the
//! rare retries share one set of buckets.

use std::sync::atomic::{AtomicU64, Ordering};

/// Seconds the budget looks back over, one bucket each.
pub const WINDOW_SECONDS: u64 = 10;

/// Shards of the request counts: workers beyond this many share one (worker `i` counts
/// in shard `i % SHARDS`).
const SHARDS: usize = 16;

/// Requests and retries of the last `WINDOW_SECONDS` seconds.
#[derive(Debug, Default)]
pub struct RetryBudget {
    requests: [Shard; SHARDS],
    retries: Buckets,
}

/// Each bucket packs the second it counts for (high 32 bits) and its count (low 32), so that
/// moving a bucket on to a new second and counting in it is one atomic update.
type Buckets = [AtomicU64; WINDOW_SECONDS as usize];

/// One worker's request counts, on cache lines of their own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(Buckets);

const COUNT: u64 = 0xffff_ffff;

impl RetryBudget {
    /// Counts a request (its first try) made in second `now`.
    pub fn record_request(&self, now: u64) {
        add(&self.requests[crate::server::worker() % SHARDS].0, now);
    }

    /// Whether a retry may be made in second `now`: the window's retries stay within
    /// `percent` of its requests plus `min_per_second` for each of its seconds. A retry that
    /// may be made is counted. Workers deciding at the same instant may each take the last
    /// retry left: the budget is kept to within the number of workers.
    pub fn try_retry(&self, percent: u32, min_per_second: u32, now: u64) -> bool {
        let requests: u64 = self.requests.iter().map(|shard| sum(&shard.0, now)).sum();
        let allowed =
            requests * u64::from(percent) / 100 + u64::from(min_per_second) * WINDOW_SECONDS;
        if sum(&self.retries, now) >= allowed {
            return false;
        }
        add(&self.retries, now);
        true
    }
}

fn add(buckets: &Buckets, now: u64) {
    let second = now & COUNT;
    let bucket = &buckets[(now % WINDOW_SECONDS) as usize];
    let _ = bucket.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |packed| {
        Some(if packed >> 32 == second {
            // A count that has reached its top stays there rather than wrapping to zero.
            packed + u64::from(packed & COUNT != COUNT)
        } else {
            second << 32 | 1
        })
    });
}

fn sum(buckets: &Buckets, now: u64) -> u64 {
    let second = now & COUNT;
    buckets
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .filter(|packed| second.wrapping_sub(packed >> 32) & COUNT < WINDOW_SECONDS)
        .map(|packed| packed & COUNT)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_requests_plus_the_floor() {
        let budget = RetryBudget::default();
        for _ in 0..100 {
            budget.record_request(1000);
        }
        let granted = (0..100).filter(|_| budget.try_retry(20, 0, 1000)).count();
        assert_eq!(granted, 20);
        let budget = RetryBudget::default();
        for _ in 0..100 {
            budget.record_request(1000);
        }
        // Plus one a second over the window.
        let granted = (0..100).filter(|_| budget.try_retry(20, 1, 1000)).count();
        assert_eq!(granted, 20 + WINDOW_SECONDS as usize);
    }

    #[test]
    fn a_quiet_upstream_may_still_retry_at_the_floor() {
        let budget = RetryBudget::default();
        let granted = (0..1000).filter(|_| budget.try_retry(20, 2, 5)).count();
        assert_eq!(granted, 2 * WINDOW_SECONDS as usize);
        assert!(!budget.try_retry(100, 0, 5));
    }

    #[test]
    fn old_seconds_leave_the_window() {
        let budget = RetryBudget::default();
        for _ in 0..50 {
            budget.record_request(100);
        }
        assert!((0..10).all(|_| budget.try_retry(20, 0, 100)));
        assert!(!budget.try_retry(20, 0, 100));
        // Still within the window nine seconds on; gone at ten, requests and retries alike.
        assert!(!budget.try_retry(20, 0, 109));
        assert!(!budget.try_retry(20, 0, 110));
        for _ in 0..10 {
            budget.record_request(110);
        }
        assert!(budget.try_retry(20, 0, 110));
        assert!(budget.try_retry(20, 0, 111));
        assert!(!budget.try_retry(20, 0, 111));
    }
}
