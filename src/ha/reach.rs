//! Reach checks: whether this node may hold the role, judged by TCP connections to the
//! configured targets (a gateway, say) and, if asked, by its upstreams' health. A node cut
//! off from the network must not claim the virtual addresses from a node that serves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::HaConfig;
use crate::runtime::Shared;

/// The least a probe waits for an answer: a target a few hops away answers in tens of
/// milliseconds, and a busy one later.
const MIN_TIMEOUT: Duration = Duration::from_millis(250);

/// The checks' cadence and patience for a heartbeat interval. A round takes one timeout at
/// most and the next starts after it ends (missed ticks are skipped), so rounds never
/// overlap even where the timeout is longer than the cadence.
pub fn timing(interval: Duration) -> (Duration, Duration) {
    let every = interval.max(Duration::from_millis(100));
    let timeout = (interval * 2).max(MIN_TIMEOUT);
    (every, timeout)
}

/// Whether `target` answers within `timeout`. A refused connection answers too: the host
/// is there, only the port is closed. A timeout or an unreachable network does not.
pub async fn probe(target: SocketAddr, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}

/// Turns each round's result into eligibility: lost only after `needed` failed rounds in a
/// row, so that one slow answer does not move the role; regained at the first pass.
#[derive(Debug)]
pub struct Debounce {
    needed: u32,
    failures: u32,
    eligible: bool,
}

impl Debounce {
    pub fn new(needed: u32, eligible: bool) -> Debounce {
        Debounce {
            needed: needed.max(1),
            failures: 0,
            eligible,
        }
    }

    /// The verdict after a round that passed or not.
    pub fn record(&mut self, passed: bool) -> bool {
        if passed {
            self.failures = 0;
            self.eligible = true;
        } else {
            self.failures += 1;
            if self.failures >= self.needed {
                self.eligible = false;
            }
        }
        self.eligible
    }
}

/// One round: any target answers (or there are none), and, with `reach_upstreams`, some
/// upstream server is up. Returns the verdict and what failed, in words.
pub async fn round(
    config: &HaConfig,
    shared: &Shared,
    timeout: Duration,
) -> (bool, Option<String>) {
    let mut problem = None;
    if !config.reach.is_empty() {
        // Concurrently, so that a round takes one timeout at most.
        let mut probes = tokio::task::JoinSet::new();
        for &target in &config.reach {
            probes.spawn(probe(target, timeout));
        }
        let mut answered = false;
        while let Some(done) = probes.join_next().await {
            answered |= done.unwrap_or(false);
        }
        if !answered {
            problem = Some(format!(
                "no reach target answered within {timeout:?}: {}",
                config
                    .reach
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if problem.is_none() && config.reach_upstreams {
        let runtime = shared.load();
        let any_up = runtime
            .upstreams
            .iter()
            .any(|u| u.servers.iter().any(|s| s.is_healthy()));
        if !any_up {
            problem = Some("no upstream server is up".into());
        }
    }
    (problem.is_none(), problem)
}

/// Runs rounds every `timing(interval).0` until shutdown, publishing eligibility on
/// `verdict` (and logging each change with why).
pub async fn run(
    config: HaConfig,
    shared: Arc<Shared>,
    verdict: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    if config.reach.is_empty() && !config.reach_upstreams {
        return;
    }
    let (every, timeout) = timing(config.heartbeat_interval);
    let mut debounce = Debounce::new(config.dead_after, *verdict.borrow());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            biased;
            _ = crate::server::stopping(&mut shutdown) => return,
            _ = tick.tick() => {}
        }
        let (passed, problem) = round(&config, &shared, timeout).await;
        let eligible = debounce.record(passed);
        verdict.send_if_modified(|current| {
            if *current == eligible {
                return false;
            }
            match &problem {
                Some(problem) if !eligible => {
                    tracing::warn!(
                        problem,
                        "HA: reach checks fail: this node may not hold the role"
                    )
                }
                _ => tracing::info!("HA: reach checks pass: this node may hold the role"),
            }
            *current = eligible;
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eligibility_is_lost_after_a_run_of_failures_and_back_at_one_pass() {
        let mut d = Debounce::new(3, true);
        assert!(d.record(false));
        assert!(d.record(false));
        assert!(d.record(true), "a pass resets the run");
        assert!(d.record(false));
        assert!(d.record(false));
        assert!(!d.record(false));
        assert!(d.record(true));
    }

    #[test]
    fn timing_has_floors() {
        assert_eq!(
            timing(Duration::from_millis(10)),
            (Duration::from_millis(100), Duration::from_millis(250))
        );
        assert_eq!(
            timing(Duration::from_millis(50)),
            (Duration::from_millis(100), Duration::from_millis(250))
        );
        assert_eq!(
            timing(Duration::from_millis(200)),
            (Duration::from_millis(200), Duration::from_millis(400))
        );
    }

    #[tokio::test]
    async fn a_listening_or_refusing_port_answers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        assert!(probe(open, Duration::from_secs(2)).await);
        drop(listener);
        assert!(
            probe(open, Duration::from_secs(2)).await,
            "refused is reachable"
        );
    }
}
