//! Which server `Upstream::pick` chooses as servers go down, come back and ramp up.

use std::collections::HashMap;

use super::state::race;
use super::*;
use crate::config::{BalanceKind, ServerConfig};

fn upstream(balance: BalanceKind, servers: &[(u16, bool)]) -> Upstream {
    Upstream::build(&config(balance, servers), 1, Duration::from_secs(1), None)
}

/// An upstream's config as the tests of this module use it: `servers` are (port, backup).
pub(super) fn config(balance: BalanceKind, servers: &[(u16, bool)]) -> UpstreamConfig {
    UpstreamConfig {
        name: "app".into(),
        balance,
        hash_key: (balance == BalanceKind::ConsistentHash).then_some(HashKey::ClientIp),
        sticky_cookie: None,
        sticky_secret: None,
        latency_decay: Duration::from_secs(10),
        slow_start: Duration::from_secs(60),
        fail_timeout: Duration::from_secs(60),
        servers: servers
            .iter()
            .map(|&(port, backup)| ServerConfig {
                address: SocketAddr::from(([127, 0, 0, 1], port)),
                weight: 1,
                backup,
                drain: false,
                disabled: false,
                max_connections: 100,
            })
            .collect(),
        named: vec![],
        preserve_host: true,
        pool_max_idle_per_server: 0,
        pool_idle_timeout: Duration::from_secs(1),
        tls: None,
        health_check: None,
        outlier_detection: Default::default(),
        panic_threshold: 0,
        proxy_protocol: None,
        resilience: Default::default(),
    }
}

/// The port of the server picked for a first try from `client`.
fn chosen(upstream: &Upstream, client: u32) -> u16 {
    let client_ip = IpAddr::from(client.to_be_bytes());
    let affinity = Affinity {
        client_ip,
        key: Some(balance::hash(&client_ip)),
        pinned: None,
    };
    upstream.pick(0, &affinity, &[]).unwrap().1.address.port()
}

/// How often each server (by port) is picked for `n` requests from different clients.
fn picks(upstream: &Upstream, n: u32) -> HashMap<u16, u32> {
    let mut counts = HashMap::new();
    for client in 0..n {
        *counts.entry(chosen(upstream, client)).or_insert(0) += 1;
    }
    counts
}

const ALL: [BalanceKind; 7] = [
    BalanceKind::RoundRobin,
    BalanceKind::Random,
    BalanceKind::IpHash,
    BalanceKind::LeastConnections,
    BalanceKind::TwoChoices,
    BalanceKind::LeastTime,
    BalanceKind::ConsistentHash,
];

#[test]
fn a_server_marked_down_gets_nothing_from_any_algorithm() {
    for balance in ALL {
        let up = upstream(balance, &[(1, false), (2, false), (3, false)]);
        up.unreachable(1);
        let counts = picks(&up, 3000);
        assert_eq!(counts.get(&2), None, "{balance:?}: {counts:?}");
        assert!(
            counts[&1] > 900 && counts[&3] > 900,
            "{balance:?}: {counts:?}"
        );
    }
}

#[test]
fn with_every_primary_down_the_backups_share_the_requests() {
    for balance in ALL {
        let up = upstream(balance, &[(1, false), (2, false), (3, true), (4, true)]);
        up.unreachable(0);
        up.unreachable(1);
        let counts = picks(&up, 2000);
        assert!(
            counts[&3] > 600 && counts[&4] > 600,
            "{balance:?}: {counts:?}"
        );
        // Everything down: still tried rather than refused.
        up.unreachable(2);
        up.unreachable(3);
        assert_eq!(picks(&up, 10).values().sum::<u32>(), 10);
    }
}

#[test]
fn a_ramping_server_takes_a_sliver_of_its_share() {
    for balance in ALL {
        let up = upstream(balance, &[(1, false), (2, false), (3, false)]);
        // Back from being down: it starts its ramp at 1% of its weight.
        up.unreachable(1);
        up.reached(1);
        let counts = picks(&up, 6000);
        let ramping = counts.get(&2).copied().unwrap_or(0);
        // A third at full weight would be 2000.
        assert!(ramping < 200, "{balance:?}: {counts:?}");
        assert_eq!(counts.values().sum::<u32>(), 6000);
    }
}

#[test]
fn hashing_passes_the_same_keys_over_while_a_server_ramps() {
    for balance in [BalanceKind::IpHash, BalanceKind::ConsistentHash] {
        let up = upstream(balance, &[(1, false), (2, false), (3, false)]);
        up.unreachable(1);
        up.reached(1);
        let once: Vec<u16> = (0..500).map(|c| chosen(&up, c)).collect();
        let again: Vec<u16> = (0..500).map(|c| chosen(&up, c)).collect();
        assert_eq!(once, again, "{balance:?}");
    }
}

#[test]
fn a_reload_ramps_up_servers_that_join_and_keeps_the_state_of_those_that_stay() {
    let build = |config: &UpstreamConfig, previous: Option<&Upstream>| {
        Upstream::build(config, 1, Duration::from_secs(1), previous)
    };
    let mut before = config(
        BalanceKind::RoundRobin,
        &[(1, false), (2, false), (3, false)],
    );
    before.servers[2].drain = true;
    let old = build(&before, None);
    // A brand-new upstream starts at full weight: there is nothing to protect yet.
    assert!(old.servers.iter().all(|s| s.share() == FULL_SHARE));
    old.unreachable(1);

    let mut after = config(
        BalanceKind::RoundRobin,
        &[(1, false), (2, false), (3, false), (4, false)],
    );
    after.servers[2].drain = false;
    let new = build(&after, Some(&old));
    assert_eq!(new.servers[0].share(), FULL_SHARE, "stayed");
    assert!(
        Arc::ptr_eq(&new.servers[0], &old.servers[0]),
        "kept with its pool"
    );
    assert_eq!(new.servers[1].share(), 0, "still marked down");
    assert!(new.servers[2].share() < FULL_SHARE, "re-enabled: ramps");
    assert!(new.servers[3].share() < FULL_SHARE, "added: ramps");
}

#[test]
fn a_server_marked_down_through_the_replaced_snapshot_is_still_passed_over() {
    // A request that began before a reload fails to connect afterwards: it marks the
    // server down through the old upstream, whose count of unsettled servers is not the
    // new one's.
    let config = config(BalanceKind::RoundRobin, &[(1, false), (2, false)]);
    let old = Upstream::build(&config, 1, Duration::from_secs(1), None);
    let new = Upstream::build(&config, 1, Duration::from_secs(1), Some(&old));
    old.unreachable(0);
    let counts = picks(&new, 100);
    assert_eq!(counts.get(&1), None, "{counts:?}");
    assert_eq!(new.unsettled.load(Ordering::Relaxed), 1);
}

#[test]
fn a_server_marked_down_while_picks_settle_is_picked_again_after_fail_timeout() {
    // As `state`'s own race test, through the upstream: a request's connect fails (and
    // marks its server down) while another request's pick settles the shares.
    let mut config = config(BalanceKind::RoundRobin, &[(1, false), (2, false)]);
    config.slow_start = Duration::ZERO;
    let up = Upstream::build(&config, 1, Duration::from_secs(1), None);
    // Settling as if `fail_timeout` (60 s) had passed: a server down is due back.
    let later = || now_ms() + 120_000;
    race(
        100_000,
        |_| up.unreachable(0),
        |_| up.settle(later()),
        |_| up.unreachable(0),
        |round| {
            up.settle(later());
            let counts = picks(&up, 2);
            assert_eq!(counts.get(&1), Some(&1), "round {round}: {counts:?}");
        },
    );
}

fn upstream_with(balance: BalanceKind, n: u16, panic_threshold: u32) -> Upstream {
    let servers: Vec<(u16, bool)> = (1..=n).map(|port| (port, false)).collect();
    let config = UpstreamConfig {
        panic_threshold,
        ..config(balance, &servers)
    };
    Upstream::build(&config, 1, Duration::from_secs(1), None)
}

#[test]
fn below_the_panic_threshold_every_primary_is_picked_by_every_algorithm() {
    for balance in ALL {
        let up = upstream_with(balance, 4, 50);
        for i in 1..4 {
            up.checks_failed(i, "test");
        }
        assert!(up.is_panicking(), "{balance:?}");
        let counts = picks(&up, 4000);
        for port in 1..=4 {
            assert!(
                counts.get(&port).copied().unwrap_or(0) > 300,
                "{balance:?}: {counts:?}"
            );
        }
        // Two of four healthy (one ramping) is not below half: the down ones get nothing.
        up.checks_passed(1, "test");
        assert!(!up.is_panicking(), "{balance:?}");
        let counts = picks(&up, 4000);
        assert_eq!(counts.get(&3), None, "{balance:?}: {counts:?}");
        assert_eq!(counts.get(&4), None, "{balance:?}: {counts:?}");
    }
}

#[test]
fn without_a_panic_threshold_down_servers_stay_out() {
    let up = upstream_with(BalanceKind::RoundRobin, 4, 0);
    for i in 1..4 {
        up.checks_failed(i, "test");
    }
    assert!(!up.is_panicking());
    assert_eq!(picks(&up, 100).get(&1), Some(&100));
}

#[test]
fn unreachable_servers_are_all_marked_and_leave_the_ejection_cap_to_outliers() {
    // Four servers, at most half ejected for their errors.
    let up = upstream(
        BalanceKind::RoundRobin,
        &[(1, false), (2, false), (3, false), (4, false)],
    );
    // A refused connection is certain: every such server is marked, whatever the cap.
    for i in 0..3 {
        up.unreachable(i);
    }
    let states: Vec<_> = up.servers.iter().map(|s| s.health_state()).collect();
    assert_eq!(states, ["unreachable", "unreachable", "unreachable", "up"]);
    // Outlier detection still ejects within its own cap, unreachable servers not counted.
    for _ in 0..10 {
        up.record_outcome(3, Observed::ServerError);
    }
    assert_eq!(up.servers[3].health_state(), "ejected");
    // An ejection is not cut short by a refused connection's shorter mark.
    up.unreachable(3);
    assert_eq!(up.servers[3].health_state(), "ejected");
}

#[test]
fn consecutive_errors_eject_and_a_success_between_them_does_not() {
    let up = upstream(
        BalanceKind::RoundRobin,
        &[(1, false), (2, false), (3, false)],
    );
    for _ in 0..4 {
        up.record_outcome(0, Observed::ServerError);
    }
    up.record_outcome(0, Observed::Success);
    for _ in 0..4 {
        up.record_outcome(0, Observed::Timeout);
    }
    assert_eq!(up.servers[0].health_state(), "up");
    up.record_outcome(0, Observed::Broken);
    assert_eq!(up.servers[0].health_state(), "ejected");
    let report = up.servers[0].health_report();
    assert_eq!(report.ejections, 1);
    assert_eq!(report.history[0].state, "ejected");
    assert!(!picks(&up, 300).contains_key(&1));
    // A connection made to it (everything else down, say) does not cut the ejection short.
    up.reached(0);
    assert_eq!(up.servers[0].health_state(), "ejected");
}

#[test]
fn least_connections_hears_of_requests_a_replaced_upstream_tracked() {
    let old = Arc::new(upstream(BalanceKind::LeastConnections, &[(1, false)]));
    let long: Vec<InFlight> = (0..6).map(|_| old.track(0)).collect();
    // A reload adds a server (taking its whole share at once) while six tunnels to the
    // first are open.
    let mut reloaded = config(BalanceKind::LeastConnections, &[(1, false), (2, false)]);
    reloaded.slow_start = Duration::ZERO;
    let new = Arc::new(Upstream::build(
        &reloaded,
        1,
        Duration::from_secs(1),
        Some(&old),
    ));
    assert!(Arc::ptr_eq(&old.servers[0], &new.servers[0]));
    drop(long);
    // Both servers are idle now: the next six are shared, not all sent to the new one.
    let mut counts = HashMap::new();
    let mut open = Vec::new();
    for client in 0..6u32 {
        let affinity = Affinity {
            client_ip: IpAddr::from(client.to_be_bytes()),
            key: None,
            pinned: None,
        };
        let (index, server) = new.pick(0, &affinity, &[]).unwrap();
        *counts.entry(server.address.port()).or_insert(0) += 1;
        open.push(new.track(index));
    }
    assert_eq!(counts.get(&1), Some(&3), "{counts:?}");
    assert_eq!(counts.get(&2), Some(&3), "{counts:?}");
}
