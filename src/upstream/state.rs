//! Whether a server takes requests now, and how much of its weight: marked down for
//! `fail_timeout` after a connection to it fails, then (or when a reload adds or re-enables
//! it) ramping from a small share to its whole weight over `slow_start`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::balance::FULL_SHARE;

/// The share a server starts its ramp with: small, but enough to be tried now and then.
const FIRST_SHARE: u32 = FULL_SHARE / 100;

#[derive(Debug)]
pub struct ServerState {
    /// Thousandths of the weight the server takes now; 0 while it is down.
    share: AtomicU32,
    /// While down: when it may be tried again, in `now_ms` time.
    down_until: AtomicU64,
    /// While ramping: when the ramp began, in `now_ms` time.
    ramp_from: AtomicU64,
    /// Down or ramping: counted in the upstream's `unsettled` until back to its whole share.
    unsettled: AtomicBool,
}

/// What `settle` did to a server.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled {
    Unchanged,
    /// Its share moved; the balancer should hear of it.
    Changed,
    /// Back to its whole share: no longer unsettled.
    Done,
}

impl ServerState {
    pub fn new() -> Self {
        ServerState {
            share: AtomicU32::new(FULL_SHARE),
            down_until: AtomicU64::new(0),
            ramp_from: AtomicU64::new(0),
            unsettled: AtomicBool::new(false),
        }
    }

    pub fn share(&self) -> u32 {
        self.share.load(Ordering::Relaxed)
    }

    pub fn is_unsettled(&self) -> bool {
        self.unsettled.load(Ordering::Acquire)
    }

    /// Marks the server down until `fail_timeout` from now. Returns whether it has just
    /// become unsettled.
    pub fn mark_down(&self, fail_timeout: Duration) -> bool {
        self.down_until.store(
            now_ms() + fail_timeout.as_millis() as u64,
            Ordering::Relaxed,
        );
        self.share.store(0, Ordering::Relaxed);
        !self.unsettled.swap(true, Ordering::AcqRel)
    }

    /// Starts the climb back to the whole weight (or skips it without `slow_start`).
    /// Returns whether the server has just become unsettled.
    pub fn ramp_up(&self, slow_start: Duration) -> bool {
        if slow_start.is_zero() {
            self.share.store(FULL_SHARE, Ordering::Relaxed);
            return false;
        }
        self.ramp_from.store(now_ms(), Ordering::Relaxed);
        self.share.store(FIRST_SHARE, Ordering::Relaxed);
        !self.unsettled.swap(true, Ordering::AcqRel)
    }

    /// Brings the share up to date with the clock: a server whose `fail_timeout` is over
    /// starts ramping (is tried again), a ramping one takes more.
    pub fn settle(&self, now: u64, slow_start: Duration) -> Settled {
        if !self.unsettled.load(Ordering::Acquire) {
            return Settled::Unchanged;
        }
        let share = self.share();
        let next = if share == 0 {
            if now < self.down_until.load(Ordering::Relaxed) {
                return Settled::Unchanged;
            }
            self.ramp_from.store(now, Ordering::Relaxed);
            if slow_start.is_zero() {
                FULL_SHARE
            } else {
                FIRST_SHARE
            }
        } else {
            let elapsed = now.saturating_sub(self.ramp_from.load(Ordering::Relaxed));
            let window = (slow_start.as_millis() as u64).max(1);
            (elapsed.saturating_mul(u64::from(FULL_SHARE)) / window)
                .clamp(u64::from(FIRST_SHARE), u64::from(FULL_SHARE)) as u32
        };
        // A failure marked meanwhile wins over the ramp.
        if self
            .share
            .compare_exchange(share, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return Settled::Unchanged;
        }
        if next == FULL_SHARE {
            self.unsettled.store(false, Ordering::Release);
            Settled::Done
        } else if next != share {
            Settled::Changed
        } else {
            Settled::Unchanged
        }
    }
}

/// Milliseconds since the process first asked, never 0.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_then_ramping_then_whole() {
        let state = ServerState::new();
        let slow_start = Duration::from_secs(10);
        assert!(state.mark_down(Duration::from_secs(5)));
        let now = now_ms();
        assert_eq!(state.settle(now + 1_000, slow_start), Settled::Unchanged);
        assert_eq!(state.share(), 0);
        // fail_timeout over: tried again with a small share, then more as time passes.
        assert_eq!(state.settle(now + 5_000, slow_start), Settled::Changed);
        assert_eq!(state.share(), FIRST_SHARE);
        assert_eq!(state.settle(now + 10_000, slow_start), Settled::Changed);
        assert_eq!(state.share(), FULL_SHARE / 2);
        assert_eq!(state.settle(now + 15_000, slow_start), Settled::Done);
        assert_eq!(state.share(), FULL_SHARE);
        assert_eq!(state.settle(now + 20_000, slow_start), Settled::Unchanged);
    }

    #[test]
    fn without_slow_start_a_recovered_server_takes_its_whole_share_at_once() {
        let state = ServerState::new();
        state.mark_down(Duration::ZERO);
        assert_eq!(state.settle(now_ms(), Duration::ZERO), Settled::Done);
        assert_eq!(state.share(), FULL_SHARE);
        assert!(!state.ramp_up(Duration::ZERO));
    }
}
