//! Whether a server takes requests now, and how much of its weight: down for a while after
//! a connection to it fails (`fail_timeout`) or outlier detection ejects it, down while its
//! active checks fail, then (or when a reload adds or re-enables it) ramping from a small
//! share to its whole weight over `slow_start`. Also the record of those changes that the
//! admin API shows.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::balance::FULL_SHARE;

/// The share a server starts its ramp with: small, but enough to be tried now and then.
const FIRST_SHARE: u32 = FULL_SHARE / 100;

#[derive(Debug)]
pub struct ServerState {
    /// The server's [`Status`], packed in one word so that share and unsettled always change
    /// together: a settle that brings the server to its whole share and a failure marked
    /// meanwhile on another worker cannot each do half.
    status: AtomicU64,
    /// While down: when it may be tried again, in `now_ms` time.
    down_until: AtomicU64,
    /// While ramping: when the ramp began, in `now_ms` time.
    ramp_from: AtomicU64,
    /// Why the server was last taken down for a while (unreachable or ejected), as a
    /// [`Down`]; failing checks are `checks_failing`.
    cause: AtomicU8,
    /// Its active checks say it is down: no timer brings it back, only passing checks.
    checks_failing: AtomicBool,
}

/// Why a server is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    /// A connection to it could not be made; down for `fail_timeout`.
    Unreachable = 1,
    /// Outlier detection ejected it for the errors of real requests.
    Ejected = 2,
    /// It failed its active checks.
    Checks = 3,
}

impl Down {
    pub fn name(self) -> &'static str {
        match self {
            Down::Unreachable => "unreachable",
            Down::Ejected => "ejected",
            Down::Checks => "down",
        }
    }

    fn from_u8(v: u8) -> Down {
        match v {
            2 => Down::Ejected,
            _ => Down::Unreachable,
        }
    }
}

/// What `status` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status {
    /// Thousandths of the weight the server takes now; 0 while it is down.
    share: u32,
    /// Down or ramping: counted in the upstream's `unsettled` until back to its whole share.
    unsettled: bool,
    /// Moved on by every `mark_down` and `ramp_up`, so that a settle computed from an older
    /// status fails its compare-exchange even when share and unsettled read the same again.
    generation: u32,
}

impl Status {
    const UNSETTLED: u64 = 1 << 16;

    /// Bits 0–15: the share (at most `FULL_SHARE`); bit 16: unsettled; bits 32–63: the
    /// generation.
    fn pack(self) -> u64 {
        u64::from(self.generation) << 32 | u64::from(self.unsettled) << 16 | u64::from(self.share)
    }

    fn unpack(word: u64) -> Status {
        Status {
            share: (word & 0xffff) as u32,
            unsettled: word & Self::UNSETTLED != 0,
            generation: (word >> 32) as u32,
        }
    }
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
        let status = Status {
            share: FULL_SHARE,
            unsettled: false,
            generation: 0,
        };
        ServerState {
            status: AtomicU64::new(status.pack()),
            down_until: AtomicU64::new(0),
            ramp_from: AtomicU64::new(0),
            cause: AtomicU8::new(Down::Unreachable as u8),
            checks_failing: AtomicBool::new(false),
        }
    }

    /// Why the server takes no requests, if it takes none: failing checks first, as only
    /// checks bring it back from that.
    pub fn down(&self) -> Option<Down> {
        if self.checks_failing() {
            return Some(Down::Checks);
        }
        (self.share() == 0).then(|| Down::from_u8(self.cause.load(Ordering::Relaxed)))
    }

    pub fn checks_failing(&self) -> bool {
        self.checks_failing.load(Ordering::Acquire)
    }

    /// Whether outlier detection has the server out at `now`: what the ejection cap counts.
    /// A server marked unreachable is not counted: a refused connection is certain, not a
    /// statistical guess that a cap guards against.
    pub fn ejected_at(&self, now: u64) -> bool {
        self.share() == 0
            && !self.checks_failing()
            && Down::from_u8(self.cause.load(Ordering::Relaxed)) == Down::Ejected
            && now < self.down_until.load(Ordering::Relaxed)
    }

    /// Its active checks failed `fall` times in a row: down until they pass `rise` times.
    /// Returns whether it has just become unsettled.
    pub fn checks_down(&self) -> bool {
        self.checks_failing.store(true, Ordering::Release);
        let before = self.change(|status| Status {
            share: 0,
            unsettled: true,
            ..status
        });
        !before.unsettled
    }

    /// Its active checks pass again: it ramps up now, or once an ejection for failed
    /// requests still running is over. Returns whether it has just become unsettled.
    pub fn checks_up(&self, slow_start: Duration) -> bool {
        self.checks_failing.store(false, Ordering::Release);
        // A passing check has connected to it: a mark for being unreachable is over, while
        // an ejection for failed requests runs its course.
        let unreachable = Down::from_u8(self.cause.load(Ordering::Relaxed)) == Down::Unreachable;
        if now_ms() < self.down_until.load(Ordering::Relaxed) && !unreachable {
            return false;
        }
        self.ramp_up(slow_start)
    }

    pub fn share(&self) -> u32 {
        Status::unpack(self.status.load(Ordering::Relaxed)).share
    }

    pub fn is_unsettled(&self) -> bool {
        Status::unpack(self.status.load(Ordering::Acquire)).unsettled
    }

    /// Marks the server down for `period` from now, for `cause`. Returns whether it has
    /// just become unsettled.
    pub fn mark_down(&self, period: Duration, cause: Down) -> bool {
        self.down_until
            .store(now_ms() + period.as_millis() as u64, Ordering::Relaxed);
        self.cause.store(cause as u8, Ordering::Relaxed);
        let before = self.change(|status| Status {
            share: 0,
            unsettled: true,
            ..status
        });
        !before.unsettled
    }

    /// Starts the climb back to the whole weight (or skips it without `slow_start`).
    /// Returns whether the server has just become unsettled.
    pub fn ramp_up(&self, slow_start: Duration) -> bool {
        if slow_start.is_zero() {
            self.change(|status| Status {
                share: FULL_SHARE,
                ..status
            });
            return false;
        }
        self.ramp_from.store(now_ms(), Ordering::Relaxed);
        let before = self.change(|status| Status {
            share: FIRST_SHARE,
            unsettled: true,
            ..status
        });
        !before.unsettled
    }

    /// Applies `f` to the status as one step, in a new generation; returns the status before.
    fn change(&self, f: impl Fn(Status) -> Status) -> Status {
        let word = self
            .status
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                let before = Status::unpack(word);
                let after = Status {
                    generation: before.generation.wrapping_add(1),
                    ..f(before)
                };
                Some(after.pack())
            })
            .unwrap_or_else(|word| word);
        Status::unpack(word)
    }

    /// Brings the share up to date with the clock: a server whose `fail_timeout` is over
    /// starts ramping (is tried again), a ramping one takes more.
    pub fn settle(&self, now: u64, slow_start: Duration) -> Settled {
        let word = self.status.load(Ordering::Acquire);
        let status = Status::unpack(word);
        if !status.unsettled {
            return Settled::Unchanged;
        }
        let share = status.share;
        let next = if share == 0 {
            if self.checks_failing() || now < self.down_until.load(Ordering::Relaxed) {
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
        let settled = Status {
            share: next,
            unsettled: next < FULL_SHARE,
            ..status
        };
        // A failure marked or a ramp begun meanwhile wins over what was computed here.
        if self
            .status
            .compare_exchange(word, settled.pack(), Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return Settled::Unchanged;
        }
        if next == FULL_SHARE {
            Settled::Done
        } else if next != share {
            Settled::Changed
        } else {
            Settled::Unchanged
        }
    }
}

/// The latest changes of a server's health, for the admin API. Written only when the
/// server changes state, never per request.
#[derive(Debug, Default)]
pub struct History {
    events: Mutex<VecDeque<HealthEvent>>,
}

/// One change of a server's health.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HealthEvent {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub state: &'static str,
    pub reason: String,
}

/// Changes kept per server.
const HISTORY: usize = 16;

impl History {
    pub fn record(&self, state: &'static str, reason: String) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if events.len() == HISTORY {
            events.pop_front();
        }
        events.push_back(HealthEvent {
            at_ms: unix_ms(),
            state,
            reason,
        });
    }

    /// Oldest first.
    pub fn events(&self) -> Vec<HealthEvent> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.iter().cloned().collect()
    }
}

/// Milliseconds since the Unix epoch, as reports show times.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds since the process first asked, never 0.
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// `instant` in `now_ms` time, for a moment already read off the clock.
pub fn ms_at(instant: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| instant);
    instant.saturating_duration_since(epoch).as_millis() as u64 + 1
}

/// Runs `rounds` rounds of a race, for tests: each round `setup` runs alone, then `settle`
/// and `interfere` at once on two threads, then `check` alone. `settle` starts a little
/// later each round, sweeping across the moment `interfere` acts: the window where they
/// collide is a few nanoseconds wide.
#[cfg(test)]
pub(super) fn race(
    rounds: u64,
    setup: impl Fn(u64),
    settle: impl Fn(u64),
    interfere: impl Fn(u64) + Sync,
    check: impl Fn(u64),
) {
    /// Lets every turn go when dropped, so that should `check` fail, the other thread runs
    /// out its rounds rather than waiting for its turn forever.
    struct Release<'a>(&'a AtomicU64);

    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.store(u64::MAX, Ordering::Release);
        }
    }

    // Spinning rather than blocking: the race needs both threads running.
    fn wait_for(turn: &AtomicU64, until: u64) {
        let mut spins = 0u32;
        while turn.load(Ordering::Acquire) < until {
            spins += 1;
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    let turn = AtomicU64::new(0);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for round in 0..rounds {
                wait_for(&turn, 2 * round + 1);
                interfere(round);
                turn.fetch_max(2 * round + 2, Ordering::Release);
            }
        });
        let _release = Release(&turn);
        for round in 0..rounds {
            setup(round);
            turn.store(2 * round + 1, Ordering::Release);
            for _ in 0..round % 97 {
                std::hint::spin_loop();
            }
            settle(round);
            wait_for(&turn, 2 * round + 2);
            check(round);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_then_ramping_then_whole() {
        let state = ServerState::new();
        let slow_start = Duration::from_secs(10);
        assert!(state.mark_down(Duration::from_secs(5), Down::Unreachable));
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
        state.mark_down(Duration::ZERO, Down::Unreachable);
        assert_eq!(state.settle(now_ms(), Duration::ZERO), Settled::Done);
        assert_eq!(state.share(), FULL_SHARE);
        assert!(!state.ramp_up(Duration::ZERO));
    }

    #[test]
    fn failing_checks_hold_a_server_down_past_any_timer() {
        let state = ServerState::new();
        let far = now_ms() + 86_400_000;
        assert!(state.checks_down());
        assert_eq!(state.down(), Some(Down::Checks));
        assert_eq!(state.settle(far, Duration::ZERO), Settled::Unchanged);
        assert_eq!(state.share(), 0);
        // Unsettled since it went down: not newly so.
        assert!(!state.checks_up(Duration::from_secs(10)));
        assert_eq!(state.down(), None);
        assert_eq!(state.share(), FIRST_SHARE);

        // Passing checks during an ejection: back once the ejection is over, not before.
        state.mark_down(Duration::from_secs(60), Down::Ejected);
        state.checks_down();
        assert!(!state.checks_up(Duration::ZERO));
        assert_eq!(state.down(), Some(Down::Ejected));
        assert!(state.ejected_at(now_ms()));
        assert_eq!(state.settle(now_ms(), Duration::ZERO), Settled::Unchanged);
        assert_eq!(state.settle(far, Duration::ZERO), Settled::Done);
        assert_eq!(state.down(), None);
    }

    #[test]
    fn history_keeps_the_latest_changes_oldest_first() {
        let history = History::default();
        for i in 0..20 {
            history.record("down", format!("change {i}"));
        }
        let events = history.events();
        assert_eq!(events.len(), HISTORY);
        assert_eq!(events[0].reason, "change 4");
        assert_eq!(events[HISTORY - 1].reason, "change 19");
        assert!(events[0].at_ms > 1_600_000_000_000);
    }

    #[test]
    fn a_failure_or_a_ramp_racing_a_settle_is_never_lost() {
        // Round after round, one thread settles a recovered server to its whole share while
        // another marks it down again or starts its ramp. Whichever lands last, a server
        // short of its whole share must stay unsettled, or it is never settled (nor, at
        // share 0, picked) again.
        let state = ServerState::new();
        let far = now_ms() + 86_400_000;
        race(
            200_000,
            // Down, and free to come back at once.
            |_| {
                state.mark_down(Duration::ZERO, Down::Unreachable);
            },
            |_| {
                state.settle(far, Duration::ZERO);
            },
            |round| {
                if round.is_multiple_of(2) {
                    state.mark_down(Duration::from_secs(3600), Down::Unreachable);
                } else {
                    state.ramp_up(Duration::from_secs(3600));
                }
            },
            |round| {
                assert!(
                    state.share() == FULL_SHARE || state.is_unsettled(),
                    "round {round}: share {} and settled",
                    state.share()
                );
            },
        );
    }
}
