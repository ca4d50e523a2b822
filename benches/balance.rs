//! How long one pick takes for each balancing algorithm, with 3 and with 1,000 servers,
//! alone and while another thread picks from the same balancer.
//!
//! `cargo bench --bench balance`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fulcrum::balance::{self, Balancer, Loads, PickContext};
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
            for i in 0..n {
                balancer.load_changed(i, &loads);
            }
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
            for i in 0..n {
                balancer.load_changed(i, &*loads);
            }
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

/// Requests in flight that change as picks are made.
struct Counting(Vec<AtomicUsize>);

impl Loads for Counting {
    fn active(&self, server: usize) -> usize {
        self.0[server].load(Ordering::Relaxed)
    }
}

/// What balancing costs a request on two threads at once: the pick, then the load change
/// when the request starts and again when it ends (which least_connections pays for in its
/// tree), as the proxy does.
fn requests(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_contended");
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    fn request(balancer: &dyn Balancer, loads: &Counting, client: u32) {
        let cx = PickContext {
            attempt: 0,
            client_ip: IpAddr::V4(Ipv4Addr::from(client)),
            loads,
            key: None,
        };
        let server = balancer.pick(&cx).unwrap();
        loads.0[server].fetch_add(1, Ordering::Relaxed);
        balancer.load_changed(server, loads);
        loads.0[server].fetch_sub(1, Ordering::Relaxed);
        balancer.load_changed(server, loads);
    }
    for n in [3usize, 1000] {
        for (name, kind) in KINDS {
            // A few requests stay in flight everywhere, so loads differ as they would.
            let loads = Arc::new(Counting((0..n).map(|i| AtomicUsize::new(i % 7)).collect()));
            let balancer: Arc<dyn Balancer> = Arc::from(balance::build(kind, &servers(n)));
            for i in 0..n {
                balancer.load_changed(i, &*loads);
            }
            let stop = Arc::new(AtomicBool::new(false));
            let rival = {
                let (balancer, loads, stop) = (balancer.clone(), loads.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut client = 1u32 << 31;
                    while !stop.load(Ordering::Relaxed) {
                        client = client.wrapping_add(1);
                        request(&*balancer, &loads, client);
                    }
                })
            };
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    for i in 0..iters {
                        request(&*balancer, &loads, i as u32);
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

criterion_group!(benches, picks, contended_picks, requests);
criterion_main!(benches);
