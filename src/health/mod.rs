//! Active health checks: every server of an upstream with a `health_check` is probed on its
//! own schedule, once per process (not per worker), spread over the interval; `fall`
//! failures in a row take it down and `rise` passes bring it back through slow start. The
//! result lives in the server's shared state, so every worker sees it at once.

mod probe;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

pub use probe::{BODY_LIMIT, Failed, Passed, probe, request};

use crate::config::HealthCheck;
use crate::runtime::{Runtime, Shared};
use crate::server::stopping;
use crate::upstream::{CheckReport, Server, Upstream, unix_ms};

/// How often the running snapshot is looked at for servers added, removed or changed.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// Results in a row as the checks see a server: up until `fall` failures, then down until
/// `rise` passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streak {
    up: bool,
    passes: u32,
    fails: u32,
}

impl Streak {
    pub fn new(up: bool) -> Self {
        Streak {
            up,
            passes: 0,
            fails: 0,
        }
    }

    /// Counts one result; returns the new verdict when this result changes it.
    pub fn record(&mut self, passed: bool, rise: u32, fall: u32) -> Option<bool> {
        if passed {
            self.passes = self.passes.saturating_add(1);
            self.fails = 0;
            if !self.up && self.passes >= rise {
                self.up = true;
                return Some(true);
            }
        } else {
            self.fails = self.fails.saturating_add(1);
            self.passes = 0;
            if self.up && self.fails >= fall {
                self.up = false;
                return Some(false);
            }
        }
        None
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Results in a row alike, the latest included.
    pub fn run(&self) -> u32 {
        self.passes.max(self.fails)
    }
}

/// A server's check task, with what it was started with.
struct Running {
    check: HealthCheck,
    task: AbortHandle,
}

/// A checked server: its upstream's name, and the server object itself (a server whose
/// settings change is a new object, with new state, and is checked afresh).
type Key = (String, usize);

/// Checks the servers of every upstream that has checks, following the running snapshot
/// until shutdown.
pub async fn run_checks(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut running: HashMap<Key, Running> = HashMap::new();
    let mut followed: Option<Arc<Runtime>> = None;
    let mut tick = tokio::time::interval(FOLLOW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            biased;
            _ = stopping(&mut shutdown) => break,
            _ = tick.tick() => {
                let runtime = shared.load();
                if followed.as_ref().is_some_and(|f| Arc::ptr_eq(f, &runtime)) {
                    continue;
                }
                follow(&shared, &runtime, &mut running);
                followed = Some(runtime);
            }
        }
    }
    for (_, r) in running {
        r.task.abort();
    }
}

/// Starts checks for servers new to `runtime` (or whose check changed) and stops those of
/// servers it no longer has. A server left down by checks that no longer apply to it is
/// let back.
fn follow(shared: &Arc<Shared>, runtime: &Runtime, running: &mut HashMap<Key, Running>) {
    let mut wanted = HashMap::new();
    for (config, upstream) in runtime.config.upstreams.iter().zip(&runtime.upstreams) {
        let Some(check) = &config.health_check else {
            for (index, server) in upstream.servers.iter().enumerate() {
                if server.checks_failing() {
                    upstream.checks_passed(index, "health checks were removed from its upstream");
                }
            }
            continue;
        };
        // A disabled server takes nothing: it is checked again once enabled, from where its
        // checks left it.
        let checked: Vec<usize> = (0..upstream.servers.len())
            .filter(|&i| !config.servers[i].disabled)
            .collect();
        for (position, &index) in checked.iter().enumerate() {
            let server = &upstream.servers[index];
            let key = (upstream.name.clone(), Arc::as_ptr(server) as usize);
            if let Some(r) = running.get(&key)
                && r.check == *check
            {
                wanted.insert(key.clone(), ());
                continue;
            }
            // Spread over the interval: the n-th of N servers starts n/N of the way in.
            let offset = check.interval * position as u32 / checked.len() as u32;
            let task = tokio::spawn(check_server(
                shared.clone(),
                upstream.name.clone(),
                server.clone(),
                check.clone(),
                offset,
            ));
            if let Some(old) = running.insert(
                key.clone(),
                Running {
                    check: check.clone(),
                    task: task.abort_handle(),
                },
            ) {
                old.task.abort();
            }
            wanted.insert(key, ());
        }
    }
    running.retain(|key, r| {
        let keep = wanted.contains_key(key);
        if !keep {
            r.task.abort();
        }
        keep
    });
}

/// The upstream named `name` in the running snapshot, with `server`'s index there.
fn current(shared: &Shared, name: &str, server: &Arc<Server>) -> Option<(Arc<Upstream>, usize)> {
    let runtime = shared.load();
    let upstream = runtime.upstreams.iter().find(|u| u.name == name)?.clone();
    let index = upstream
        .servers
        .iter()
        .position(|s| Arc::ptr_eq(s, server))?;
    Some((upstream, index))
}

/// Checks one server every `check.interval` (plus jitter), starting `offset` from now.
async fn check_server(
    shared: Arc<Shared>,
    name: String,
    server: Arc<Server>,
    check: HealthCheck,
    offset: Duration,
) {
    let request = request(&check, server.address);
    let mut streak = Streak::new(!server.checks_failing());
    let mut due = Instant::now() + offset;
    loop {
        tokio::time::sleep_until(due + jitter(check.jitter)).await;
        let Some((upstream, _)) = current(&shared, &name, &server) else {
            return;
        };
        let proxy_header = shared
            .load()
            .config
            .upstreams
            .iter()
            .find(|u| u.name == name)
            .and_then(|u| u.proxy_protocol);
        let result = probe(
            server.address,
            &check,
            &request,
            upstream.tls.as_ref(),
            proxy_header,
        )
        .await;
        drop(upstream);
        let detail = match &result {
            Ok(passed) => passed.to_string(),
            Err(failed) => failed.to_string(),
        };
        let change = streak.record(result.is_ok(), check.rise, check.fall);
        server.record_check(CheckReport {
            at_ms: unix_ms(),
            passed: result.is_ok(),
            detail: detail.clone(),
            streak: streak.run(),
        });
        match change {
            // A reload may have replaced the upstream during the check.
            Some(up) => match current(&shared, &name, &server) {
                Some((upstream, index)) if up => upstream.checks_passed(
                    index,
                    &format!("{} checks in a row passed ({detail})", check.rise),
                ),
                Some((upstream, index)) => upstream.checks_failed(
                    index,
                    &format!("{} checks in a row failed ({detail})", check.fall),
                ),
                None => return,
            },
            None => {
                tracing::debug!(upstream = %name, server = %server.address, passed = result.is_ok(), %detail, "health check");
                // A server marked unreachable by a refused request, whose checks kept
                // passing, is reachable: no need to wait out its `fail_timeout`.
                if result.is_ok()
                    && server.share() == 0
                    && let Some((upstream, index)) = current(&shared, &name, &server)
                {
                    upstream.reached(index);
                }
            }
        }
        due += check.interval;
        // A check that ran long (a stalled runtime) does not make the next ones hurry.
        let now = Instant::now();
        if due < now {
            due = now;
        }
    }
}

/// A random delay up to `most`.
fn jitter(most: Duration) -> Duration {
    if most.is_zero() {
        return Duration::ZERO;
    }
    Duration::from_micros(fastrand::u64(..=most.as_micros() as u64))
}

#[cfg(test)]
mod tests {
    use super::Streak;

    #[test]
    fn fall_failures_take_it_down_and_rise_passes_bring_it_back() {
        let mut s = Streak::new(true);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), None);
        // A pass in between starts the count over.
        assert_eq!(s.record(true, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), Some(false));
        assert!(!s.is_up());
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.run(), 4);
        assert_eq!(s.record(true, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(true, 2, 3), None);
        assert_eq!(s.record(true, 2, 3), Some(true));
        assert_eq!(s.record(true, 2, 3), None);
        assert!(s.is_up());
    }

    #[test]
    fn rise_and_fall_of_one_change_at_once() {
        let mut s = Streak::new(false);
        assert_eq!(s.record(true, 1, 1), Some(true));
        assert_eq!(s.record(false, 1, 1), Some(false));
    }
}
