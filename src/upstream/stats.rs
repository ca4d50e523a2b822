//! Request statistics for the metrics and the admin API: requests by listener and status
//! class with a latency histogram, and failed tries (per server), requests by status class
//! alone (per route), and new versus reused upstream connections.
//!
//! Recording is on the request path of every worker, so each worker counts in its own
//! cache-line-aligned shard of plain atomics (picked by `crate::server::worker()`); nothing
//! is shared between workers until a scrape adds the shards up.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::server::worker;

/// The status classes requests are counted by; `none` is a request that ended (the client
/// went away, say) before any response status was settled.
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];
const NO_STATUS: usize = 5;
/// The index of `5xx` in [`CLASSES`]: the requests counted as errors.
pub const SERVER_ERROR: usize = 4;

/// Upper bounds of the latency histogram's buckets, in seconds; one more bucket takes
/// everything slower.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// The same bounds in microseconds, which recording compares with.
const BUCKET_MICROS: [u64; 12] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    10_000_000,
];

/// Requests counted by listener and status class, and how long they took.
#[derive(Debug)]
pub struct RequestStats {
    shards: Box<[Shard]>,
}

/// One worker's counts. Aligned to a cache line so that two workers never write the same
/// line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard {
    /// Per listener slot (`crate::runtime::ListenerRuntime::slot`), per class, in chunks
    /// of growing size made on a slot's first request: slots are never reused, and a
    /// reload may add listeners, so the table grows without a lock on the request path.
    by_listener: [OnceLock<Box<[ListenerCounts]>>; SLOT_CHUNKS],
    /// Not cumulative: each request counts in its one bucket.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
    /// Tries that got no response from the server, whatever became of their request.
    failed_tries: AtomicU64,
}

/// One listener's requests by status class.
type ListenerCounts = [AtomicU64; CLASSES.len()];

/// Chunk `k` of a shard's per-listener table holds `FIRST_CHUNK << k` slots: 12 chunks
/// cover 16,380 listener slots, far more than a process adds in its life; the requests
/// of slots beyond are not counted by listener (they still count in the latency).
const SLOT_CHUNKS: usize = 12;
const FIRST_CHUNK: usize = 4;

/// The chunk holding `slot`, and its place there.
fn chunk_of(slot: usize) -> (usize, usize) {
    let k = (slot / FIRST_CHUNK + 1).ilog2() as usize;
    (k, slot - FIRST_CHUNK * ((1 << k) - 1))
}

/// `RequestStats` added up over the workers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestTotals {
    /// Per listener slot, per class (in the order of [`CLASSES`]).
    pub by_listener: Vec<[u64; CLASSES.len()]>,
    /// Requests per bucket of [`LATENCY_BUCKETS`] (each in the first whose bound it is
    /// within), then those slower than the last bound.
    pub latency_buckets: Vec<u64>,
    pub latency_sum: Duration,
    /// Tries at the server that timed out, broke or could not connect. A request retried
    /// elsewhere is not among the server's requests, so only this shows the server failing;
    /// the last try of a request answered by Fulcrum's own 5xx counts in both.
    pub failed_tries: u64,
}

impl RequestTotals {
    pub fn requests(&self) -> u64 {
        self.by_listener.iter().flatten().sum()
    }

    /// Requests answered with a 5xx status.
    pub fn errors(&self) -> u64 {
        self.by_listener.iter().map(|c| c[SERVER_ERROR]).sum()
    }

    /// Everything that went to the server: its requests, and the failed tries of requests
    /// that went on elsewhere.
    pub fn tries(&self) -> u64 {
        self.requests() + self.failed_tries
    }
}

impl RequestStats {
    /// Counts for `workers` workers (at least one).
    pub fn new(workers: usize) -> Self {
        RequestStats {
            shards: (0..workers.max(1)).map(|_| Shard::default()).collect(),
        }
    }

    /// Counts one request on the listener in slot `listener` that ended with `status`
    /// (`None`: without one) after `elapsed`.
    pub fn record(&self, listener: usize, status: Option<u16>, elapsed: Duration) {
        let shard = &self.shards[worker().min(self.shards.len() - 1)];
        let class = class_index(status);
        let (k, at) = chunk_of(listener);
        if let Some(chunk) = shard.by_listener.get(k) {
            let counts = chunk.get_or_init(|| {
                (0..FIRST_CHUNK << k)
                    .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                    .collect()
            });
            bump(&counts[at][class]);
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = BUCKET_MICROS
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(BUCKET_MICROS.len());
        bump(&shard.latency[bucket]);
        shard.latency_sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    /// Counts one try that got no response (see [`RequestTotals::failed_tries`]).
    pub fn failed_try(&self) {
        bump(&self.shards[worker().min(self.shards.len() - 1)].failed_tries);
    }

    /// Everything counted so far, over all workers.
    pub fn totals(&self) -> RequestTotals {
        let mut totals = RequestTotals {
            latency_buckets: vec![0; LATENCY_BUCKETS.len() + 1],
            ..RequestTotals::default()
        };
        let mut sum_us = 0u64;
        for shard in &self.shards {
            for (k, chunk) in shard.by_listener.iter().enumerate() {
                let Some(counts) = chunk.get() else { continue };
                let first = FIRST_CHUNK * ((1 << k) - 1);
                if totals.by_listener.len() < first + counts.len() {
                    totals
                        .by_listener
                        .resize(first + counts.len(), [0; CLASSES.len()]);
                }
                for (total, counts) in totals.by_listener[first..].iter_mut().zip(counts) {
                    for (t, c) in total.iter_mut().zip(counts) {
                        *t += c.load(Ordering::Relaxed);
                    }
                }
            }
            for (t, c) in totals.latency_buckets.iter_mut().zip(&shard.latency) {
                *t += c.load(Ordering::Relaxed);
            }
            sum_us = sum_us.wrapping_add(shard.latency_sum_us.load(Ordering::Relaxed));
            totals.failed_tries += shard.failed_tries.load(Ordering::Relaxed);
        }
        totals.latency_sum = Duration::from_micros(sum_us);
        totals
    }
}

impl super::Server {
    /// Counts a try at this server that got no response: a refused connection, a timeout,
    /// a connection that broke.
    pub fn count_failed_try(&self) {
        self.stats.failed_try();
    }

    /// Counts the try's outcome if it was a failure without a response; a response, 5xx
    /// or not, is counted as a request when its request ends.
    pub fn count_if_failed(&self, observed: super::Observed) {
        if matches!(observed, super::Observed::Timeout | super::Observed::Broken) {
            self.count_failed_try();
        }
    }
}

/// The index in [`CLASSES`] of a request that ended with `status`.
fn class_index(status: Option<u16>) -> usize {
    match status {
        Some(status @ 100..=599) => usize::from(status / 100 - 1),
        _ => NO_STATUS,
    }
}

/// Requests counted by status class only: a route's. Without the latency histogram and the
/// listener split of [`RequestStats`], which a route has no use for (it belongs to one
/// listener, and its upstream's servers time its requests already).
#[derive(Debug)]
pub struct ClassCounts {
    shards: Box<[ClassShard]>,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct ClassShard([AtomicU64; CLASSES.len()]);

impl ClassCounts {
    /// Counts for `workers` workers (at least one).
    pub fn new(workers: usize) -> Self {
        ClassCounts {
            shards: (0..workers.max(1)).map(|_| ClassShard::default()).collect(),
        }
    }

    /// Counts one request that ended with `status` (`None`: without one).
    pub fn record(&self, status: Option<u16>) {
        let shard = &self.shards[worker().min(self.shards.len() - 1)];
        bump(&shard.0[class_index(status)]);
    }

    /// Requests per class (in the order of [`CLASSES`]), over all workers.
    pub fn totals(&self) -> [u64; CLASSES.len()] {
        let mut totals = [0; CLASSES.len()];
        for shard in &self.shards {
            for (t, c) in totals.iter_mut().zip(&shard.0) {
                *t += c.load(Ordering::Relaxed);
            }
        }
        totals
    }
}

/// Adds one to a counter of the calling worker's shard. Its cache line is the worker's
/// own, so the atomic add costs no waiting on other cores; it stays exact where threads
/// that are not workers (a multi-threaded runtime embedding Fulcrum) share shard 0.
fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Connections a pool handed out, new and reused, per worker.
#[derive(Debug)]
pub struct ConnectionCounts {
    shards: Box<[ConnectionShard]>,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct ConnectionShard {
    opened: AtomicU64,
    reused: AtomicU64,
}

impl ConnectionCounts {
    pub fn new(workers: usize) -> Self {
        ConnectionCounts {
            shards: (0..workers.max(1))
                .map(|_| ConnectionShard::default())
                .collect(),
        }
    }

    fn shard(&self) -> &ConnectionShard {
        &self.shards[worker().min(self.shards.len() - 1)]
    }

    pub fn opened(&self) {
        bump(&self.shard().opened);
    }

    pub fn reused(&self) {
        bump(&self.shard().reused);
    }

    /// Connections opened and connections reused, over all workers.
    pub fn totals(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(o, r), s| {
            (
                o + s.opened.load(Ordering::Relaxed),
                r + s.reused.load(Ordering::Relaxed),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_by_listener_class_and_latency_bucket() {
        let stats = RequestStats::new(2);
        stats.record(0, Some(200), Duration::from_micros(800));
        stats.record(0, Some(204), Duration::from_millis(3));
        stats.record(1, Some(502), Duration::from_secs(30));
        stats.record(1, None, Duration::from_millis(3));
        let totals = stats.totals();
        assert_eq!(
            totals.by_listener[..2],
            [[0, 2, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
        );
        assert_eq!(totals.requests(), 4);
        assert_eq!(totals.errors(), 1);
        // ≤1 ms: 1; ≤5 ms: 2; beyond 10 s: 1.
        let mut expected = vec![0; LATENCY_BUCKETS.len() + 1];
        (expected[0], expected[2], expected[LATENCY_BUCKETS.len()]) = (1, 2, 1);
        assert_eq!(totals.latency_buckets, expected);
        assert_eq!(
            totals.latency_sum,
            Duration::from_micros(800 + 3000 + 30_000_000 + 3000)
        );
    }

    #[test]
    fn a_slot_beyond_the_table_is_not_counted_rather_than_panicking() {
        let stats = RequestStats::new(1);
        stats.record(usize::MAX / 2, Some(200), Duration::ZERO);
        assert_eq!(stats.totals().requests(), 0);
    }

    #[test]
    fn every_slot_has_its_own_place_in_the_chunks() {
        let mut seen = std::collections::HashSet::new();
        for slot in 0..FIRST_CHUNK * ((1 << SLOT_CHUNKS) - 1) {
            let (k, at) = chunk_of(slot);
            assert!(k < SLOT_CHUNKS && at < FIRST_CHUNK << k, "{slot}: {k} {at}");
            assert!(seen.insert((k, at)));
        }
        assert_eq!(
            chunk_of(FIRST_CHUNK * ((1 << SLOT_CHUNKS) - 1)).0,
            SLOT_CHUNKS
        );
    }

    #[test]
    fn slots_added_later_count_apart_from_the_first_ones() {
        let stats = RequestStats::new(1);
        for slot in [0, 3, 4, 11, 12, 700] {
            stats.record(slot, Some(200), Duration::ZERO);
            stats.record(slot, Some(500), Duration::ZERO);
        }
        let totals = stats.totals();
        assert_eq!(totals.requests(), 12);
        for slot in [0, 3, 4, 11, 12, 700] {
            assert_eq!(totals.by_listener[slot], [0, 1, 0, 0, 1, 0], "slot {slot}");
        }
        assert_eq!(totals.by_listener[5], [0; CLASSES.len()]);
    }

    #[test]
    fn failed_tries_add_to_the_tries_but_not_the_requests() {
        let stats = RequestStats::new(2);
        stats.record(0, Some(200), Duration::ZERO);
        stats.failed_try();
        stats.failed_try();
        let totals = stats.totals();
        assert_eq!(
            (totals.requests(), totals.failed_tries, totals.tries()),
            (1, 2, 3)
        );
    }

    #[test]
    fn shards_of_every_worker_are_added_up() {
        let stats = std::sync::Arc::new(RequestStats::new(4));
        let counts = std::sync::Arc::new(ConnectionCounts::new(4));
        let classes = std::sync::Arc::new(ClassCounts::new(4));
        let threads: Vec<_> = (0..4)
            .map(|w| {
                let (stats, counts, classes) = (stats.clone(), counts.clone(), classes.clone());
                std::thread::spawn(move || {
                    crate::server::set_worker_for_tests(w);
                    for _ in 0..1000 {
                        stats.record(0, Some(200), Duration::from_millis(1));
                        classes.record(Some(200));
                        counts.opened();
                        counts.reused();
                        counts.reused();
                        stats.failed_try();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(stats.totals().requests(), 4000);
        assert_eq!(stats.totals().failed_tries, 4000);
        assert_eq!(counts.totals(), (4000, 8000));
        assert_eq!(classes.totals(), [0, 4000, 0, 0, 0, 0]);
    }

    #[test]
    fn class_counts_sort_requests_by_status_class() {
        let counts = ClassCounts::new(1);
        for status in [Some(200), Some(204), Some(301), Some(503), None, Some(42)] {
            counts.record(status);
        }
        assert_eq!(counts.totals(), [0, 2, 1, 0, 1, 2]);
    }
}
