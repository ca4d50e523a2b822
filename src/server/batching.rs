//! Adaptive batching of a worker's wake-ups. Each time the worker's event loop runs out of
//! work it would block in `epoll_wait` and be woken for the next event, one or a few at a
//! time under load; most of a proxy's CPU is the kernel's, and a wake-up per event is a
//! large part of it. Before blocking, this waits a moment when requests are in flight, so
//! that the responses they are about to get (and the requests that follow) are taken in
//! one turn. The wait grows with the requests in flight and is capped; with fewer than a
//! few in flight it is zero, so a lone request never waits.

use std::cell::Cell;
use std::time::Duration;

/// The controller's settings, fixed when a worker starts.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    /// Fewer requests in flight than this: no wait at all.
    pub min_in_flight: u32,
    /// The wait per request in flight.
    pub per_request: Duration,
    /// The longest wait.
    pub max_wait: Duration,
}

impl Batching {
    pub const OFF: Batching = Batching {
        min_in_flight: u32::MAX,
        per_request: Duration::ZERO,
        max_wait: Duration::ZERO,
    };

    /// The wait before blocking with `in_flight` requests under way.
    pub fn wait(&self, in_flight: u32) -> Duration {
        if in_flight < self.min_in_flight {
            return Duration::ZERO;
        }
        (self.per_request * in_flight).min(self.max_wait)
    }

    /// For measuring: `FULCRUM_BATCH=min,per_request_ns,max_wait_us` overrides.
    pub fn from_env(default: Batching) -> Batching {
        let Ok(spec) = std::env::var("FULCRUM_BATCH") else {
            return default;
        };
        let parts: Vec<u64> = spec
            .split(',')
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        match parts[..] {
            [min, per, max] => Batching {
                min_in_flight: min as u32,
                per_request: Duration::from_nanos(per),
                max_wait: Duration::from_micros(max),
            },
            _ => default,
        }
    }
}

thread_local! {
    static IN_FLIGHT: Cell<u32> = const { Cell::new(0) };
    static SETTINGS: Cell<Batching> = const { Cell::new(Batching::OFF) };
}

/// Counts one request as in flight on this worker for as long as it lives.
pub struct InFlight(());

impl InFlight {
    pub fn start() -> InFlight {
        IN_FLIGHT.with(|n| n.set(n.get() + 1));
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// Sets up the calling worker thread: its settings, and a timer slack of a microsecond so
/// that a short wait is not stretched by the default 50 µs.
pub fn init_worker(settings: Batching) {
    SETTINGS.with(|s| s.set(settings));
    if settings.max_wait > Duration::ZERO {
        // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects this thread only.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64, 0, 0, 0) };
    }
}

/// The event loop's hook before it blocks: waits, if the load says so.
pub fn before_park() {
    let wait = SETTINGS.with(|s| s.get().wait(IN_FLIGHT.with(Cell::get)));
    if !wait.is_zero() {
        std::thread::sleep(wait);
    }
}
