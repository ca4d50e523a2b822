//! Weighted least connections: the server with the fewest requests in flight for its weight.
//!
//! A scan over every server (as nginx does) costs microseconds at a thousand servers, so the
//! servers' scores live in a tournament tree instead: each inner node holds the least score
//! below it, a load change walks one path up (stopping where no minimum moved), and a pick
//! walks one path down. Ties are broken at random in proportion to the number of servers on
//! each side, so equally loaded servers share evenly. The tree wins at three servers too:
//! a pick writes nothing shared, where a scan's rotating start is written by every pick
//! (measured with two threads: bench/README.md).

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Balancer, FULL_SHARE, Loads, PickContext, Thinning, tie_break};

#[derive(Debug)]
pub struct LeastConnections {
    weights: Box<[u32]>,
    tree: MinTree,
}

impl LeastConnections {
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let weights: Box<[u32]> = weights.into_iter().collect();
        let tree = MinTree::new(weights.len());
        for (i, &w) in weights.iter().enumerate() {
            tree.set(i, || score(0, w, FULL_SHARE));
        }
        LeastConnections { weights, tree }
    }
}

impl Balancer for LeastConnections {
    fn pick(&self, _cx: &PickContext<'_>) -> Option<usize> {
        self.tree.least()
    }

    fn ordered_by_load(&self) -> bool {
        true
    }

    fn load_changed(&self, server: usize, loads: &dyn Loads) {
        let weight = self.weights[server];
        self.tree.set(server, || {
            score(loads.active(server), weight, loads.share(server))
        });
    }

    fn thinning(&self) -> Thinning {
        Thinning::Weighed
    }
}

/// The score of a server that takes nothing (down), and of the tree's padding leaves.
const UNAVAILABLE: u64 = u64::MAX;

/// `(active + 1) / (weight × share)` in fixed point, as HAProxy orders its servers: the load
/// the server would have after taking the request, so that weight matters even between idle
/// servers. 2^20 steps per unit keep every two different ratios apart for weights up to 1000.
pub(crate) fn score(active: usize, weight: u32, share: u32) -> u64 {
    if share == 0 {
        return UNAVAILABLE;
    }
    // Past 2^24 requests in flight a server counts as that busy, so the numerator stays
    // within 2^54 and the division is a machine one.
    let in_flight = (active as u64).min((1 << 24) - 1) + 1;
    (in_flight << 20) * u64::from(FULL_SHARE) / (u64::from(weight.max(1)) * u64::from(share))
}

/// A complete binary tree over a power-of-two number of leaves, stored as an array with the
/// root at 1 and node `n`'s children at `2n` and `2n + 1`. Leaves past the real servers hold
/// `UNAVAILABLE`.
///
/// A node is written only when it differs from what it is computed from (its children, or
/// for a leaf the server's load), and every writer checks again after its write until it
/// sees the node agree: a writer that computed from figures that have since changed
/// therefore repairs its own write, and whoever changed them reads the node after changing
/// them. So, without locks, once updates stop every node is the least of its children, and
/// an update that moves no minimum writes nothing shared.
#[derive(Debug)]
struct MinTree {
    nodes: Box<[AtomicU64]>,
    leaves: usize,
    servers: usize,
}

impl MinTree {
    fn new(servers: usize) -> Self {
        let leaves = servers.max(1).next_power_of_two();
        let nodes = (0..2 * leaves)
            .map(|_| AtomicU64::new(UNAVAILABLE))
            .collect();
        MinTree {
            nodes,
            leaves,
            servers,
        }
    }

    /// Sets leaf `server` to `score()` and carries the change up as far as it moves a
    /// minimum.
    fn set(&self, server: usize, score: impl Fn() -> u64) {
        let mut node = self.leaves + server;
        if !settle(&self.nodes[node], score) {
            return;
        }
        while node > 1 {
            node /= 2;
            let (left, right) = (&self.nodes[2 * node], &self.nodes[2 * node + 1]);
            let least = || {
                left.load(Ordering::SeqCst)
                    .min(right.load(Ordering::SeqCst))
            };
            if !settle(&self.nodes[node], least) {
                return;
            }
        }
    }

    /// A server with the least score: down the tree towards the smaller child, and between
    /// equal children at random, weighted by how many servers each side holds.
    fn least(&self) -> Option<usize> {
        if self.servers == 0 {
            return None;
        }
        let mut node = 1;
        let mut width = self.leaves;
        while node < self.leaves {
            width /= 2;
            let left = self.nodes[2 * node].load(Ordering::Relaxed);
            let right = self.nodes[2 * node + 1].load(Ordering::Relaxed);
            node = 2 * node
                + usize::from(
                    right < left
                        || (right == left && {
                            let first = (node * 2) * width - self.leaves;
                            let on_left = self.servers.saturating_sub(first).min(width);
                            let on_right = self.servers.saturating_sub(first + width).min(width);
                            tie_break(on_left, on_right)
                        }),
                );
        }
        let server = node - self.leaves;
        // Only with every server down (or a racing update) can the walk end on padding.
        Some(if server < self.servers {
            server
        } else {
            fastrand::usize(..self.servers)
        })
    }
}

/// Writes `value()` into `node` until a read of both agrees. Returns whether it wrote.
fn settle(node: &AtomicU64, value: impl Fn() -> u64) -> bool {
    let mut wrote = false;
    loop {
        let current = node.load(Ordering::SeqCst);
        let wanted = value();
        if wanted == current {
            return wrote;
        }
        wrote |= node
            .compare_exchange(current, wanted, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Fixed {
        active: Vec<usize>,
        share: Vec<u32>,
    }

    impl Loads for Fixed {
        fn active(&self, server: usize) -> usize {
            self.active[server]
        }
        fn share(&self, server: usize) -> u32 {
            self.share[server]
        }
    }

    fn with_loads(weights: &[u32], active: &[usize]) -> (LeastConnections, Fixed) {
        let lc = LeastConnections::new(weights.iter().copied());
        let loads = Fixed {
            active: active.to_vec(),
            share: vec![FULL_SHARE; weights.len()],
        };
        for i in 0..weights.len() {
            lc.load_changed(i, &loads);
        }
        (lc, loads)
    }

    fn pick(lc: &LeastConnections, loads: &Fixed) -> usize {
        lc.pick(&PickContext {
            attempt: 0,
            client_ip: "10.0.0.1".parse().unwrap(),
            loads,
            key: None,
        })
        .unwrap()
    }

    proptest! {
        #[test]
        fn always_picks_a_least_loaded_server_for_its_weight(
            servers in prop::collection::vec((1u32..1000, 0usize..50), 1..40),
            changes in prop::collection::vec((0usize..40, 0usize..50), 0..40),
        ) {
            let (weights, active): (Vec<u32>, Vec<usize>) = servers.into_iter().unzip();
            let (lc, mut loads) = with_loads(&weights, &active);
            // Loads then move about, as requests start and finish.
            for (server, active) in changes {
                let server = server % weights.len();
                loads.active[server] = active;
                lc.load_changed(server, &loads);
            }
            let chosen = pick(&lc, &loads);
            let best = (0..weights.len())
                .map(|i| score(loads.active[i], weights[i], FULL_SHARE))
                .min()
                .unwrap();
            prop_assert_eq!(score(loads.active[chosen], weights[chosen], FULL_SHARE), best);
        }

        #[test]
        fn different_loads_for_weight_never_score_the_same(
            a in 0usize..100_000, wa in 1u32..1000, b in 0usize..100_000, wb in 1u32..1000,
        ) {
            let exact = ((a as u64 + 1) * u64::from(wb)).cmp(&((b as u64 + 1) * u64::from(wa)));
            prop_assert_eq!(score(a, wa, FULL_SHARE).cmp(&score(b, wb, FULL_SHARE)), exact);
        }
    }

    #[test]
    fn ties_are_shared_evenly() {
        // 3 servers fill 3 of 4 leaves, 20 fill 20 of 32: an even split needs the
        // tie-break to count servers, not halves.
        for n in [3, 20] {
            let (lc, loads) = with_loads(&vec![1; n], &vec![0; n]);
            let mut counts = vec![0usize; n];
            for _ in 0..1000 * n {
                counts[pick(&lc, &loads)] += 1;
            }
            for &c in &counts {
                assert!((800..1200).contains(&c), "{counts:?}");
            }
        }
    }

    #[test]
    fn weight_counts_against_load() {
        // 4 in flight on a weight-4 server is lighter than 2 on a weight-1 server.
        let (lc, loads) = with_loads(&[4, 1], &[4, 2]);
        assert_eq!(pick(&lc, &loads), 0);
        // Idle servers: the heavier one takes the first request.
        let (lc, loads) = with_loads(&[1, 3], &[0, 0]);
        assert_eq!(pick(&lc, &loads), 1);
    }

    #[test]
    fn a_server_that_is_down_is_passed_over_and_one_ramping_up_counts_for_less() {
        // Small and large trees (the other servers busier still).
        for n in [3, 40] {
            let mut active = vec![9; n];
            active[..3].copy_from_slice(&[5, 0, 3]);
            let (lc, mut loads) = with_loads(&vec![1; n], &active);
            assert_eq!(pick(&lc, &loads), 1);
            loads.share[1] = 0;
            lc.load_changed(1, &loads);
            assert_eq!(pick(&lc, &loads), 2);
            // At a tenth of its share, 0 in flight counts as 10: more than 3 + 1.
            loads.share[1] = FULL_SHARE / 10;
            lc.load_changed(1, &loads);
            assert_eq!(pick(&lc, &loads), 2);
            loads.share[1] = FULL_SHARE / 2;
            lc.load_changed(1, &loads);
            assert_eq!(pick(&lc, &loads), 1);
        }
    }

    #[test]
    fn concurrent_updates_settle_on_the_true_minimum() {
        let n = 100;
        let lc = std::sync::Arc::new(LeastConnections::new(std::iter::repeat_n(1, n)));
        let active: std::sync::Arc<Vec<std::sync::atomic::AtomicUsize>> =
            std::sync::Arc::new((0..n).map(|_| Default::default()).collect());
        struct Shared<'a>(&'a [std::sync::atomic::AtomicUsize]);
        impl Loads for Shared<'_> {
            fn active(&self, server: usize) -> usize {
                self.0[server].load(Ordering::Relaxed)
            }
        }
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (lc, active) = (lc.clone(), active.clone());
                std::thread::spawn(move || {
                    for k in 0..20_000usize {
                        let server = (k * 7 + t * 13) % n;
                        let _ = active[server].fetch_update(
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                            |a| {
                                if k % 3 == 0 {
                                    a.checked_sub(1)
                                } else {
                                    Some(a + 1)
                                }
                            },
                        );
                        lc.load_changed(server, &Shared(&active));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let loads = Shared(&active);
        let best = (0..n).map(|i| loads.active(i)).min().unwrap();
        for _ in 0..100 {
            let chosen = lc
                .pick(&PickContext {
                    attempt: 0,
                    client_ip: "10.0.0.1".parse().unwrap(),
                    loads: &loads,
                    key: None,
                })
                .unwrap();
            assert_eq!(loads.active(chosen), best);
        }
    }
}
