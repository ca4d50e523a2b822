//! Checking an upstream's retry and circuit-breaking keys: how often a failed request may be
//! tried again, and how many requests the upstream takes on at once.

use std::time::Duration;

use super::{Checker, DAY, HOUR, MS, file};
use crate::config::model::{CircuitBreaker, ResilienceConfig};

/// Requests waiting for their turn at a full upstream, unless the config says otherwise.
const MAX_PENDING: i64 = 100;

impl Checker {
    pub(super) fn resilience(&mut self, up: &file::Upstream) -> ResilienceConfig {
        let defaults = ResilienceConfig::default();
        let retries = self.int(
            up.retries.as_ref(),
            "retries",
            0,
            10,
            defaults.retries as i64,
        ) as usize;
        let try_timeout = up
            .try_timeout
            .as_ref()
            .map(|t| self.duration(Some(t), "try_timeout", MS..=DAY, Duration::from_secs(60)));
        let retry_budget_percent = self.int(
            up.retry_budget.as_ref(),
            "retry_budget",
            0,
            100,
            i64::from(defaults.retry_budget_percent),
        ) as u32;
        let retry_budget_min_per_second = self.int(
            up.retry_budget_min_per_second.as_ref(),
            "retry_budget_min_per_second",
            0,
            1_000_000,
            i64::from(defaults.retry_budget_min_per_second),
        ) as u32;
        let circuit = match &up.max_active_requests {
            Some(max_active) => {
                let max_active_requests =
                    self.int(Some(max_active), "max_active_requests", 1, 10_000_000, 1) as usize;
                let max_pending_requests = self.int(
                    up.max_pending_requests.as_ref(),
                    "max_pending_requests",
                    0,
                    10_000_000,
                    MAX_PENDING,
                ) as usize;
                let queue_timeout = self.duration(
                    up.queue_timeout.as_ref(),
                    "queue_timeout",
                    MS..=HOUR,
                    Duration::from_secs(1),
                );
                Some(CircuitBreaker {
                    max_active_requests,
                    max_pending_requests,
                    queue_timeout,
                })
            }
            None => {
                // A queue without a limit to wait for would never hold anyone.
                for (key, span) in [
                    (
                        "max_pending_requests",
                        up.max_pending_requests.as_ref().map(|v| v.span()),
                    ),
                    ("queue_timeout", up.queue_timeout.as_ref().map(|v| v.span())),
                ] {
                    if let Some(span) = span {
                        self.error(
                            span,
                            format!("{key} applies only with max_active_requests: set how many requests may be in flight first"),
                        );
                    }
                }
                None
            }
        };
        ResilienceConfig {
            retries,
            try_timeout,
            retry_budget_percent,
            retry_budget_min_per_second,
            circuit,
        }
    }
}
