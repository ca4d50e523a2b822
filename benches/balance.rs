//! How long one pick takes for each balancing algorithm, with 3 and with 1,000 servers,
//! alone and while another thread picks from the same balancer; and a whole request's
//! balancing (pick, start, end) on two threads at once.
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

fn servers(n: usize) -> Vec<ServerConfig> {
    (0..n)
        .map(|i| ServerConfig {
            address: format!("10.{}.{}.1:80", i / 250, i % 250).parse().unwrap(),
            weight: 1 + (i % 3) as u32,
            backup: false,
            drain: false,
            disabled: false,
            max_connections: 100,
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
        for &(name, kind) in BalanceKind::ALL {
            let balancer = built(kind, n, &loads);
            let mut client = 0u32;
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    client = client.wrapping_add(1);
                    black_box(balancer.pick(&context(&loads, client)))
                })
            });
        }
    }
    group.finish();
}

/// Benchmarks `work` while a second thread does the same work on the same balancer as fast
/// as it can, so that shared state is contended as it is with two workers.
fn contended<L: Loads + Send + Sync + 'static>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    balancer: Arc<dyn Balancer>,
    loads: Arc<L>,
    work: fn(&dyn Balancer, &L, u32),
) {
    let stop = Arc::new(AtomicBool::new(false));
    let rival = {
        let (balancer, loads, stop) = (balancer.clone(), loads.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut client = 1u32 << 31;
            while !stop.load(Ordering::Relaxed) {
                client = client.wrapping_add(1);
                work(&*balancer, &loads, client);
            }
        })
    };
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            for i in 0..iters {
                work(&*balancer, &loads, i as u32);
            }
            started.elapsed()
        })
    });
    stop.store(true, Ordering::Relaxed);
    rival.join().unwrap();
}

/// A balancer of `kind` over `n` servers that has been told of every server's load.
fn built(kind: BalanceKind, n: usize, loads: &dyn Loads) -> Arc<dyn Balancer> {
    let balancer: Arc<dyn Balancer> = Arc::from(balance::build(kind, &servers(n)));
    for i in 0..n {
        balancer.load_changed(i, loads);
    }
    balancer
}

fn context(loads: &dyn Loads, client: u32) -> PickContext<'_> {
    PickContext {
        attempt: 0,
        client_ip: IpAddr::V4(Ipv4Addr::from(client)),
        loads,
        key: None,
    }
}

/// The same picks while a second thread picks from the same balancer.
fn contended_picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick_contended");
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for n in [3usize, 1000] {
        let loads = Arc::new((0..n).map(|i| i % 7).collect::<Vec<usize>>());
        for &(name, kind) in BalanceKind::ALL {
            let balancer = built(kind, n, &*loads);
            contended(
                &mut group,
                BenchmarkId::new(name, n),
                balancer,
                loads.clone(),
                |balancer, loads, client| {
                    black_box(balancer.pick(&context(loads, client)));
                },
            );
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
    for n in [3usize, 1000] {
        for &(name, kind) in BalanceKind::ALL {
            // A few requests stay in flight everywhere, so loads differ as they would.
            let loads = Arc::new(Counting((0..n).map(|i| AtomicUsize::new(i % 7)).collect()));
            let balancer = built(kind, n, &*loads);
            contended(
                &mut group,
                BenchmarkId::new(name, n),
                balancer,
                loads,
                |balancer, loads, client| {
                    let server = balancer.pick(&context(loads, client)).unwrap();
                    loads.0[server].fetch_add(1, Ordering::Relaxed);
                    balancer.load_changed(server, loads);
                    loads.0[server].fetch_sub(1, Ordering::Relaxed);
                    balancer.load_changed(server, loads);
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, picks, contended_picks, requests);
criterion_main!(benches);
