//! What an upstream does when its servers fail or cannot keep up, as the request path asks
//! it: how often a request may be tried again (retries and their budget), whether it may go
//! in at all (the circuit breaker), why no server can take it, and the counts the metrics
//! show. The budget, the breaker's line and the counts outlive a reload.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::Upstream;
use super::admission::{Admission, Admitted, Refused};
use super::budget::RetryBudget;
use super::state::{ms_at, now_ms};
use crate::config::ResilienceConfig;

#[derive(Debug)]
pub(super) struct Resilience {
    config: ResilienceConfig,
    budget: Arc<RetryBudget>,
    admission: Option<Arc<Admission>>,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    retries: AtomicU64,
    budget_exhausted: AtomicU64,
    queue_rejected: AtomicU64,
    queue_timeouts: AtomicU64,
}

/// What the metrics show of an upstream's retries and circuit breaker. The counts run from
/// the start of the process; `active` and `pending` are now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResilienceStats {
    /// Tries made after a first one failed.
    pub retries: u64,
    /// Failed tries not retried because the retry budget was spent.
    pub budget_exhausted: u64,
    /// Requests refused because `max_pending_requests` were waiting already.
    pub queue_rejected: u64,
    /// Requests refused after waiting `queue_timeout` in line.
    pub queue_timeouts: u64,
    /// Requests in flight (admitted past the circuit breaker, or tracked at servers when
    /// there is no limit).
    pub active: u64,
    /// Requests waiting in line.
    pub pending: u64,
}

impl Resilience {
    /// Keeps the budget, the counts and (when its limits stay the same) the breaker of the
    /// upstream being replaced. A breaker with new limits starts empty: requests still in
    /// flight under the old ones are not counted against the new.
    pub(super) fn build(config: &ResilienceConfig, previous: Option<&Resilience>) -> Self {
        let admission = config.circuit.map(|limits| {
            previous
                .and_then(|p| p.admission.as_ref())
                .filter(|a| a.limits == limits)
                .cloned()
                .unwrap_or_else(|| Arc::new(Admission::new(limits)))
        });
        Resilience {
            config: config.clone(),
            budget: previous.map_or_else(Default::default, |p| p.budget.clone()),
            admission,
            counters: previous.map_or_else(Default::default, |p| p.counters.clone()),
        }
    }
}

/// Why no server of an upstream can take a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Every server failed its active health checks.
    AllDown,
    /// Outlier detection ejected every server.
    AllEjected,
    /// Every server refused or dropped connections.
    AllUnreachable,
    /// Every server is out, for a mix of those reasons.
    NoneUp,
}

impl Unavailable {
    /// Short enough for the client, in a 503's body.
    pub fn reason(self) -> &'static str {
        match self {
            Unavailable::AllDown => "every upstream server is down",
            Unavailable::AllEjected => "every upstream server is ejected for failing requests",
            Unavailable::AllUnreachable => "every upstream server is unreachable",
            Unavailable::NoneUp => "no upstream server is up",
        }
    }
}

impl Upstream {
    /// Tries a request may make after its first, each to a server not tried yet.
    pub fn retries(&self) -> usize {
        self.resilience.config.retries
    }

    /// How long one try of a request that may be retried waits for the response head, if
    /// the upstream sets it.
    pub fn try_timeout(&self) -> Option<Duration> {
        self.resilience.config.try_timeout
    }

    /// How long a request waits in line at the circuit breaker, if there is one.
    pub fn queue_timeout(&self) -> Option<Duration> {
        let admission = self.resilience.admission.as_ref()?;
        Some(admission.limits.queue_timeout)
    }

    /// Whether the upstream has a circuit breaker: a request may have to wait for a turn.
    pub fn limits_requests(&self) -> bool {
        self.resilience.admission.is_some()
    }

    /// Lets a request in under `max_active_requests`, after a wait in line if need be, or
    /// refuses it (counted).
    pub async fn admit(&self) -> Result<Admitted<'_>, Refused> {
        let Some(admission) = &self.resilience.admission else {
            return Ok(Admitted::unlimited());
        };
        let admitted = admission.admit().await;
        if let Err(refused) = admitted {
            let counter = match refused {
                Refused::QueueFull => &self.resilience.counters.queue_rejected,
                Refused::QueueTimeout => &self.resilience.counters.queue_timeouts,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    /// Counts a request's first try, which the retry budget is a share of.
    pub fn count_request(&self, started: std::time::Instant) {
        // The request's own start, rather than another read of the clock.
        if self.resilience.config.retries > 0 {
            self.resilience.budget.record_request(ms_at(started) / 1000);
        }
    }

    /// Whether the retry budget allows one more retry now; counts the retry, or the failure
    /// that could not be retried.
    pub fn allow_retry(&self) -> bool {
        let config = &self.resilience.config;
        let allowed = self.resilience.budget.try_retry(
            config.retry_budget_percent,
            config.retry_budget_min_per_second,
            now_ms() / 1000,
        );
        let counters = &self.resilience.counters;
        let counter = if allowed {
            &counters.retries
        } else {
            &counters.budget_exhausted
        };
        counter.fetch_add(1, Ordering::Relaxed);
        allowed
    }

    /// Why no server can take a request now, if none can: every server that takes new
    /// requests (drained and disabled ones do not) is out, for the reasons its health
    /// report gives.
    pub fn unavailable(&self) -> Option<Unavailable> {
        let mut states = self
            .servers
            .iter()
            .zip(self.placement.iter())
            .filter(|(_, placed)| placed.is_some())
            .map(|(server, _)| server);
        let first = states.next()?;
        if first.share() != 0 {
            return None;
        }
        let kind = |state: &str| match state {
            "down" => Unavailable::AllDown,
            "ejected" => Unavailable::AllEjected,
            "unreachable" => Unavailable::AllUnreachable,
            _ => Unavailable::NoneUp,
        };
        let mut found = kind(first.health_state());
        for server in states {
            if server.share() != 0 {
                return None;
            }
            if kind(server.health_state()) != found {
                found = Unavailable::NoneUp;
            }
        }
        Some(found)
    }

    /// Counts of retries and of the circuit breaker, for the metrics.
    pub fn resilience_stats(&self) -> ResilienceStats {
        let counters = &self.resilience.counters;
        let (active, pending) = match &self.resilience.admission {
            Some(a) => (a.active(), a.pending()),
            None => (self.servers.iter().map(|s| s.active()).sum(), 0),
        };
        ResilienceStats {
            retries: counters.retries.load(Ordering::Relaxed),
            budget_exhausted: counters.budget_exhausted.load(Ordering::Relaxed),
            queue_rejected: counters.queue_rejected.load(Ordering::Relaxed),
            queue_timeouts: counters.queue_timeouts.load(Ordering::Relaxed),
            active: active as u64,
            pending: pending as u64,
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::config::{BalanceKind, CircuitBreaker, UpstreamConfig};

    fn config(resilience: ResilienceConfig) -> UpstreamConfig {
        let servers = [(1, false), (2, false)];
        UpstreamConfig {
            resilience,
            ..crate::upstream::tests::config(BalanceKind::RoundRobin, &servers)
        }
    }

    fn limited(max_active_requests: usize) -> ResilienceConfig {
        ResilienceConfig {
            retry_budget_percent: 0,
            retry_budget_min_per_second: 1,
            circuit: Some(CircuitBreaker {
                max_active_requests,
                max_pending_requests: 0,
                queue_timeout: Duration::from_secs(1),
            }),
            ..ResilienceConfig::default()
        }
    }

    #[tokio::test]
    async fn stats_count_and_survive_a_reload() {
        let old = Upstream::build(&config(limited(1)), 1, Duration::from_secs(1), None);
        let admitted = old.admit().await.unwrap();
        assert_eq!(old.admit().await.unwrap_err(), Refused::QueueFull);
        let granted = (0..20).filter(|_| old.allow_retry()).count();
        assert_eq!(granted, 10);
        let stats = old.resilience_stats();
        assert_eq!(
            stats,
            ResilienceStats {
                retries: 10,
                budget_exhausted: 10,
                queue_rejected: 1,
                queue_timeouts: 0,
                active: 1,
                pending: 0,
            }
        );
        // The same limits: the request in flight still holds the only place.
        let same = Upstream::build(&config(limited(1)), 1, Duration::from_secs(1), Some(&old));
        assert_eq!(same.resilience_stats(), stats);
        assert!(
            !same.allow_retry(),
            "the budget spent before the reload is still spent"
        );
        // New limits: a new line, the counts kept.
        let wider = Upstream::build(&config(limited(2)), 1, Duration::from_secs(1), Some(&same));
        assert_eq!(wider.resilience_stats().active, 0);
        assert_eq!(wider.resilience_stats().budget_exhausted, 11);
        drop(admitted);
        assert_eq!(same.resilience_stats().active, 0);
    }

    #[test]
    fn no_server_up_is_told_apart_from_some_up() {
        // Every server may be marked down at once here: no ejection cap.
        let mut config = config(ResilienceConfig::default());
        config.outlier_detection.max_ejection_percent = 100;
        let upstream = Upstream::build(&config, 1, Duration::from_secs(1), None);
        assert_eq!(upstream.unavailable(), None);
        upstream.unreachable(0);
        assert_eq!(upstream.unavailable(), None);
        upstream.unreachable(1);
        assert_eq!(upstream.unavailable(), Some(Unavailable::AllUnreachable));
        upstream.reached(1);
        assert_eq!(upstream.unavailable(), None);
    }
}
