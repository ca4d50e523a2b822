//! Passive outlier detection: what real requests meet at a server (5xx responses, timeouts,
//! broken connections), counted in a row with atomics so that every worker adds to the
//! same count without a lock, and how long an ejection lasts: longer each time a server is
//! ejected again, shorter again once it has stayed healthy.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::Observed;
use crate::config::OutlierDetection;

/// A server's counts, kept across reloads with the server.
#[derive(Debug, Default)]
pub struct Outlier {
    consecutive_5xx: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Times ejected since the server was first listed.
    ejections: AtomicU64,
    /// What the next ejection's length is a multiple of, less the decay since `ended_at`.
    level: AtomicU32,
    /// When the latest ejection ends, in `now_ms` time.
    ended_at: AtomicU64,
}

/// Why a server is ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Consecutive5xx(u32),
    ConsecutiveFailures(u32),
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Consecutive5xx(n) => write!(f, "{n} 5xx responses in a row"),
            Trigger::ConsecutiveFailures(n) => {
                write!(f, "{n} timeouts or broken connections in a row")
            }
        }
    }
}

impl Outlier {
    /// Counts one outcome. Returns what calls for an ejection, once per run of errors
    /// reaching its threshold (the count starts over then, ejected or not).
    pub fn count(&self, observed: Observed, config: &OutlierDetection) -> Option<Trigger> {
        let (counter, threshold, trigger): (_, _, fn(u32) -> Trigger) = match observed {
            Observed::Success => {
                // Read first: a healthy server's counts stay 0, and the cache line they
                // share with other workers stays unwritten.
                for counter in [&self.consecutive_5xx, &self.consecutive_failures] {
                    if counter.load(Ordering::Relaxed) != 0 {
                        counter.store(0, Ordering::Relaxed);
                    }
                }
                return None;
            }
            Observed::ServerError => (
                &self.consecutive_5xx,
                config.consecutive_5xx,
                Trigger::Consecutive5xx,
            ),
            Observed::Timeout | Observed::Broken => (
                &self.consecutive_failures,
                config.consecutive_failures,
                Trigger::ConsecutiveFailures,
            ),
        };
        if threshold == 0 {
            return None;
        }
        let seen = counter.fetch_add(1, Ordering::Relaxed) + 1;
        // Of workers crossing the threshold at once, the one that takes the count ejects.
        (seen >= threshold && counter.swap(0, Ordering::Relaxed) >= threshold)
            .then(|| trigger(threshold))
    }

    /// Starts an ejection at `now`; returns how long it lasts.
    pub fn eject(&self, now: u64, config: &OutlierDetection) -> Duration {
        let base = config.base_ejection_time;
        let ended_at = self.ended_at.load(Ordering::Relaxed);
        let level = decayed(
            self.level.load(Ordering::Relaxed),
            now.saturating_sub(ended_at),
            base,
        ) + 1;
        self.level.store(level, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        let time = ejection_time(base, config.max_ejection_time, level);
        self.ended_at
            .store(now + time.as_millis() as u64, Ordering::Relaxed);
        time
    }

    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// The errors counted in a row now: 5xx responses, then timeouts and broken connections.
    pub fn streaks(&self) -> (u32, u32) {
        (
            self.consecutive_5xx.load(Ordering::Relaxed),
            self.consecutive_failures.load(Ordering::Relaxed),
        )
    }
}

/// The length of ejection number `level` in a run: `base` × `level`, at most `max`.
pub fn ejection_time(base: Duration, max: Duration, level: u32) -> Duration {
    base.saturating_mul(level.max(1)).min(max)
}

/// What is left of `level` after a server stayed healthy for `healthy_ms`: one step less
/// for each `base` that passed, as Envoy lowers its multiplier while a host behaves.
pub fn decayed(level: u32, healthy_ms: u64, base: Duration) -> u32 {
    let steps = healthy_ms / (base.as_millis() as u64).max(1);
    level.saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX))
}

/// How many of `servers` may be ejected at once: `percent` of them, and always one.
pub fn ejection_cap(servers: usize, percent: u32) -> usize {
    (servers * percent as usize / 100).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 3,
            consecutive_failures: 2,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(100),
            ..OutlierDetection::default()
        }
    }

    #[test]
    fn errors_in_a_row_trigger_once_and_a_success_starts_over() {
        let o = Outlier::default();
        let c = config();
        assert_eq!(o.count(Observed::ServerError, &c), None);
        assert_eq!(o.count(Observed::ServerError, &c), None);
        assert_eq!(o.count(Observed::Success, &c), None);
        assert_eq!(o.streaks(), (0, 0));
        assert_eq!(o.count(Observed::ServerError, &c), None);
        assert_eq!(o.count(Observed::ServerError, &c), None);
        assert_eq!(
            o.count(Observed::ServerError, &c),
            Some(Trigger::Consecutive5xx(3))
        );
        // Counted afresh after a trigger.
        assert_eq!(o.streaks(), (0, 0));
        assert_eq!(o.count(Observed::Timeout, &c), None);
        assert_eq!(
            o.count(Observed::Broken, &c),
            Some(Trigger::ConsecutiveFailures(2))
        );
        let off = OutlierDetection {
            consecutive_5xx: 0,
            ..c
        };
        for _ in 0..10 {
            assert_eq!(o.count(Observed::ServerError, &off), None);
        }
    }

    #[test]
    fn ejections_grow_to_the_cap_and_shrink_while_healthy() {
        let base = Duration::from_secs(30);
        let max = Duration::from_secs(100);
        assert_eq!(ejection_time(base, max, 1), base);
        assert_eq!(ejection_time(base, max, 3), Duration::from_secs(90));
        assert_eq!(ejection_time(base, max, 4), max);
        assert_eq!(ejection_time(base, max, u32::MAX), max);
        assert_eq!(decayed(3, 29_999, base), 3);
        assert_eq!(decayed(3, 30_000, base), 2);
        assert_eq!(decayed(3, u64::MAX, base), 0);

        let o = Outlier::default();
        let c = config();
        let mut now = 1_000;
        assert_eq!(o.eject(now, &c), Duration::from_secs(30));
        // Ejected again as soon as it is back: longer each time, up to the cap.
        now += 30_000;
        assert_eq!(o.eject(now, &c), Duration::from_secs(60));
        now += 60_000;
        assert_eq!(o.eject(now, &c), Duration::from_secs(90));
        now += 90_000;
        assert_eq!(o.eject(now, &c), Duration::from_secs(100));
        // Healthy for two bases after the last one ended: two steps down, then one up.
        now += 100_000 + 60_000;
        assert_eq!(o.eject(now, &c), Duration::from_secs(90));
        assert_eq!(o.ejections(), 5);
    }

    #[test]
    fn the_cap_lets_one_server_go_always() {
        assert_eq!(ejection_cap(1, 50), 1);
        assert_eq!(ejection_cap(2, 50), 1);
        assert_eq!(ejection_cap(3, 50), 1);
        assert_eq!(ejection_cap(4, 50), 2);
        assert_eq!(ejection_cap(10, 100), 10);
        assert_eq!(ejection_cap(10, 1), 1);
    }
}
