//! Peak-EWMA of a server's response times (as Finagle and linkerd measure it): a slower
//! response than the estimate replaces it at once, faster ones pull it down gradually, and
//! with no responses at all it decays toward zero, so a server that was slow is tried again
//! after a while and wins traffic back if it has recovered.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct PeakEwma {
    /// The estimate in nanoseconds, as `f64` bits, as of `updated`.
    estimate: AtomicU64,
    /// The latest time a response was taken in at, in nanoseconds since the process's epoch
    /// (a response taken in late, with an earlier time, does not move it back).
    updated: AtomicU64,
    /// How fast old observations fade: after `decay` they weigh 1/e.
    decay_ns: f64,
}

impl PeakEwma {
    pub fn new(decay: Duration) -> Self {
        PeakEwma {
            estimate: AtomicU64::new(0f64.to_bits()),
            updated: AtomicU64::new(now_ns()),
            decay_ns: decay.as_nanos().max(1) as f64,
        }
    }

    /// The current estimate, decayed for the time since the last observation.
    pub fn estimate_ns(&self) -> f64 {
        let (estimate, weight) = self.load(now_ns());
        estimate * weight
    }

    /// Takes in, at `at`, a response that took `response_time`.
    pub fn observe(&self, response_time: Duration, at: Instant) {
        let now = ns_since_epoch(at);
        let sample = response_time.as_nanos() as f64;
        let (estimate, weight) = self.load(now);
        let next = if sample > estimate {
            sample
        } else {
            estimate * weight + sample * (1.0 - weight)
        };
        // Two workers observing at once may lose one sample; an estimate can afford that.
        self.estimate.store(next.to_bits(), Ordering::Relaxed);
        self.updated.fetch_max(now, Ordering::Relaxed);
    }

    /// The stored estimate and the weight it keeps after the time since it was stored.
    fn load(&self, now: u64) -> (f64, f64) {
        let estimate = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.updated.load(Ordering::Relaxed)) as f64;
        (estimate, (-elapsed / self.decay_ns).exp())
    }
}

fn now_ns() -> u64 {
    ns_since_epoch(Instant::now())
}

/// `at` in nanoseconds since the process's epoch (the first time asked); an instant read
/// before the epoch was taken counts as the epoch.
fn ns_since_epoch(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    at.saturating_duration_since(*EPOCH.get_or_init(Instant::now))
        .as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_taken_in_late_does_not_turn_the_decay_clock_back() {
        let ewma = PeakEwma::new(Duration::from_millis(100));
        let start = Instant::now();
        let later = ns_since_epoch(start + Duration::from_secs(30));
        ewma.observe(Duration::from_millis(50), start + Duration::from_secs(30));
        // One taken in with an earlier time than the last, as a worker that lagged would:
        // it counts as taken in at the last time (and so weighs nothing against it).
        ewma.observe(Duration::from_millis(1), start + Duration::from_secs(1));
        assert_eq!(ewma.updated.load(Ordering::Relaxed), later);
        // As of the last time, the estimate is the slow sample, not decayed over the 29 s
        // the late one would have put between them.
        let (estimate, weight) = ewma.load(later);
        assert!(estimate * weight > 49e6, "estimate {estimate} × {weight}");
    }

    #[test]
    fn a_slow_response_counts_at_once_and_fades_with_time() {
        let ewma = PeakEwma::new(Duration::from_millis(100));
        ewma.observe(Duration::from_millis(1), Instant::now());
        let fast = ewma.estimate_ns();
        ewma.observe(Duration::from_millis(50), Instant::now());
        assert!(ewma.estimate_ns() > 40e6, "the peak was not taken at once");
        std::thread::sleep(Duration::from_millis(400));
        assert!(ewma.estimate_ns() < 5e6, "the estimate did not decay");
        assert!(fast > 0.0);
    }
}
