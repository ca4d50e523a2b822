//! How long one pick takes for each balancing algorithm, with 3 and with 1,000 servers,
//! alone and while another thread picks from the same balancer.
//!
//! `cargo bench --bench balance`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fulcrum::balance::{self, Balancer, PickContext};
use fulcrum::config::{BalanceKind, ServerConfig};

const KINDS: [(&str, BalanceKind); 7] = [
    ("round_robin", BalanceKind::RoundRobin),
    ("random", BalanceKind::Random),
    ("ip_hash", BalanceKind::IpHash),
    ("least_connections", BalanceKind::LeastConnections),
    ("two_choices", BalanceKind::TwoChoices),
    ("least_time", BalanceKind::LeastTime),
    ("consistent_hash", BalanceKind::ConsistentHash),
];

fn servers(n: usize) -> Vec<ServerConfig> {
    (0..n)
        .map(|i| ServerConfig {
            address: format!("10.{}.{}.1:80", i / 250, i % 250).parse().unwrap(),
            weight: 1 + (i % 3) as u32,
            backup: false,
            drain: false,
        })
        .collect()
}

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for n in [3usize, 1000] {
        let loads: Vec<usize> = (0..n).map(|i| i % 7).collect();
        for (name, kind) in KINDS {
            let balancer = balance::build(kind, &servers(n));
            let mut client = 0u32;
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    client = client.wrapping_add(1);
                    let cx = PickContext {
                        attempt: 0,
                        client_ip: IpAddr::V4(Ipv4Addr::from(client)),
                        loads: &loads,
                        key: None,
                    };
                    black_box(balancer.pick(&cx))
                })
            });
        }
    }
    group.finish();
}

/// The same picks while a second thread picks from the same balancer as fast as it can,
/// so shared counters are contended as they are with two workers.
fn contended_picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick_contended");
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for n in [3usize, 1000] {
        let loads = Arc::new((0..n).map(|i| i % 7).collect::<Vec<usize>>());
        for (name, kind) in KINDS {
            let balancer: Arc<dyn Balancer> = Arc::from(balance::build(kind, &servers(n)));
            let stop = Arc::new(AtomicBool::new(false));
            let rival = {
                let (balancer, loads, stop) = (balancer.clone(), loads.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut client = 1u32 << 31;
                    while !stop.load(Ordering::Relaxed) {
                        client = client.wrapping_add(1);
                        let cx = PickContext {
                            attempt: 0,
                            client_ip: IpAddr::V4(Ipv4Addr::from(client)),
                            loads: &*loads,
                            key: None,
                        };
                        black_box(balancer.pick(&cx));
                    }
                })
            };
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    for i in 0..iters {
                        let cx = PickContext {
                            attempt: 0,
                            client_ip: IpAddr::V4(Ipv4Addr::from(i as u32)),
                            loads: &*loads,
                            key: None,
                        };
                        black_box(balancer.pick(&cx));
                    }
                    started.elapsed()
                })
            });
            stop.store(true, Ordering::Relaxed);
            rival.join().unwrap();
        }
    }
    group.finish();
}

criterion_group!(benches, picks, contended_picks);
criterion_main!(benches);
