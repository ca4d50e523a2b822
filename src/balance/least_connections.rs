//! Weighted least connections: the server with the fewest requests in flight for its weight.
//! Ties go round the list rather than always to the first server.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balancer, PickContext, lighter};

#[derive(Debug)]
pub struct LeastConnections {
    weights: Box<[u32]>,
    /// Where the next scan starts, so that equally loaded servers take turns.
    start: AtomicUsize,
}

impl LeastConnections {
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        LeastConnections {
            weights: weights.into_iter().collect(),
            start: AtomicUsize::new(0),
        }
    }
}

impl Balancer for LeastConnections {
    fn pick(&self, cx: &PickContext<'_>) -> Option<usize> {
        let n = self.weights.len();
        if n == 0 {
            return None;
        }
        let start = self
            .start
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(cx.attempt);
        let mut best = start % n;
        for k in 1..n {
            let i = (start + k) % n;
            if lighter(cx.loads, &self.weights, i, best) {
                best = i;
            }
        }
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pick(lc: &LeastConnections, loads: &[usize]) -> usize {
        let loads = loads.to_vec();
        lc.pick(&PickContext {
            attempt: 0,
            client_ip: "10.0.0.1".parse().unwrap(),
            loads: &loads,
            key: None,
        })
        .unwrap()
    }

    proptest! {
        #[test]
        fn always_picks_a_least_loaded_server_for_its_weight(
            servers in prop::collection::vec((1u32..20, 0usize..50), 1..12),
        ) {
            let (weights, loads): (Vec<u32>, Vec<usize>) = servers.into_iter().unzip();
            let lc = LeastConnections::new(weights.clone());
            let chosen = pick(&lc, &loads);
            for other in 0..weights.len() {
                prop_assert!(!lighter(&loads, &weights, other, chosen), "{other} is lighter than {chosen}");
            }
        }
    }

    #[test]
    fn ties_take_turns() {
        let lc = LeastConnections::new([1, 1, 1]);
        let picks: Vec<usize> = (0..6).map(|_| pick(&lc, &[0, 0, 0])).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weight_counts_against_load() {
        // 4 in flight on a weight-4 server is lighter than 2 on a weight-1 server.
        let lc = LeastConnections::new([4, 1]);
        assert_eq!(pick(&lc, &[4, 2]), 0);
    }
}
