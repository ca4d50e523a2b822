//! Circuit breaking for an upstream: at most `max_active_requests` in flight from every
//! worker together; more wait their turn in a bounded first-come-first-served line for up to
//! `queue_timeout`, and the rest are refused at once rather than piling up on servers that
//! cannot keep up.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::CircuitBreaker;

#[derive(Debug)]
pub struct Admission {
    /// One permit per request in flight. Tokio's semaphore hands a freed permit to the
    /// longest waiting request (it works across the workers' runtimes), which makes it the
    /// line as well.
    slots: Semaphore,
    /// Requests in line now.
    pending: AtomicUsize,
    pub limits: CircuitBreaker,
}

/// Why a request was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_pending_requests` were waiting already.
    QueueFull,
    /// No request in flight ended within `queue_timeout`.
    QueueTimeout,
}

/// A request's place among those in flight; dropping it lets the next one in.
#[derive(Debug)]
pub struct Admitted<'a>(#[allow(dead_code)] Option<SemaphorePermit<'a>>);

impl Admitted<'_> {
    /// For upstreams without a limit.
    pub fn unlimited() -> Self {
        Admitted(None)
    }
}

/// Leaves the line however the wait ends, a client that gives up included.
struct InLine<'a>(&'a AtomicUsize);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(limits: CircuitBreaker) -> Self {
        Admission {
            slots: Semaphore::new(limits.max_active_requests.min(Semaphore::MAX_PERMITS)),
            pending: AtomicUsize::new(0),
            limits,
        }
    }

    /// Lets a request through now, or once one in flight ends, or refuses it.
    pub async fn admit(&self) -> Result<Admitted<'_>, Refused> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(Admitted(Some(permit)));
        }
        let max = self.limits.max_pending_requests;
        if self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(Refused::QueueFull);
        }
        let _in_line = InLine(&self.pending);
        match tokio::time::timeout(self.limits.queue_timeout, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(Admitted(Some(permit))),
            // The semaphore is never closed; a wait that ends otherwise is a timeout.
            Ok(Err(_)) | Err(_) => Err(Refused::QueueTimeout),
        }
    }

    /// Requests in flight now.
    pub fn active(&self) -> usize {
        self.limits
            .max_active_requests
            .saturating_sub(self.slots.available_permits())
    }

    /// Requests waiting for their turn now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn admission(active: usize, pending: usize, timeout_ms: u64) -> Admission {
        Admission::new(CircuitBreaker {
            max_active_requests: active,
            max_pending_requests: pending,
            queue_timeout: Duration::from_millis(timeout_ms),
        })
    }

    #[tokio::test]
    async fn over_the_limit_requests_wait_in_line_and_the_rest_are_refused() {
        let a = admission(1, 1, 10_000);
        let first = a.admit().await.unwrap();
        assert_eq!(a.active(), 1);
        let mut second = Box::pin(a.admit());
        assert!(futures_util::poll!(&mut second).is_pending());
        assert_eq!(a.pending(), 1);
        assert_eq!(a.admit().await.unwrap_err(), Refused::QueueFull);
        drop(first);
        let second = second.await.unwrap();
        assert_eq!((a.active(), a.pending()), (1, 0));
        drop(second);
        assert_eq!(a.active(), 0);
    }

    #[tokio::test]
    async fn a_wait_ends_at_the_queue_timeout() {
        let a = admission(1, 5, 50);
        let _first = a.admit().await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(a.admit().await.unwrap_err(), Refused::QueueTimeout);
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(a.pending(), 0);
    }

    #[tokio::test]
    async fn a_request_that_gives_up_leaves_the_line() {
        let a = admission(1, 1, 10_000);
        let _first = a.admit().await.unwrap();
        let gave_up = tokio::time::timeout(Duration::from_millis(20), a.admit()).await;
        assert!(gave_up.is_err());
        assert_eq!(a.pending(), 0);
        // Its place is free for another.
        let mut next = Box::pin(a.admit());
        assert!(futures_util::poll!(&mut next).is_pending());
        assert_eq!(a.pending(), 1);
    }
}
