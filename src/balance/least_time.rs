//! Least response time: power of two choices on a cost of (recent response time) × (requests
//! in flight + 1) ÷ weight, as Finagle and linkerd balance. A slow server gets little
//! traffic while it is slow; its estimate fades when it is not used, so it is tried again
//! and wins its share back once it has recovered.

use super::{Balancer, PickContext, Random};

#[derive(Debug)]
pub struct LeastTime {
    weights: Box<[u32]>,
    draw: Random,
}

impl LeastTime {
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let weights: Box<[u32]> = weights.into_iter().collect();
        let draw = Random::new(weights.iter().copied());
        LeastTime { weights, draw }
    }

    fn cost(&self, cx: &PickContext<'_>, server: usize) -> f64 {
        // One nanosecond at least, so servers with no history still compare by load.
        (cx.loads.latency_ns(server) + 1.0) * (cx.loads.active(server) as f64 + 1.0)
            / f64::from(self.weights[server])
    }
}

impl Balancer for LeastTime {
    fn pick(&self, cx: &PickContext<'_>) -> Option<usize> {
        let first = self.draw.pick(cx)?;
        let n = self.weights.len();
        if n == 1 {
            return Some(first);
        }
        let second = (0..4)
            .filter_map(|_| self.draw.pick(cx))
            .find(|&s| s != first)
            .unwrap_or((first + 1) % n);
        Some(if self.cost(cx, second) < self.cost(cx, first) {
            second
        } else {
            first
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Loads;

    struct Fixed {
        latency_ns: Vec<f64>,
    }

    impl Loads for Fixed {
        fn active(&self, _server: usize) -> usize {
            0
        }
        fn latency_ns(&self, server: usize) -> f64 {
            self.latency_ns[server]
        }
    }

    #[test]
    fn the_slow_server_is_never_chosen_over_a_fast_one() {
        let loads = Fixed {
            latency_ns: vec![1e6, 50e6, 1e6],
        };
        let lt = LeastTime::new([1, 1, 1]);
        for _ in 0..1000 {
            let cx = PickContext {
                attempt: 0,
                client_ip: "10.0.0.1".parse().unwrap(),
                loads: &loads,
                key: None,
            };
            assert_ne!(lt.pick(&cx), Some(1));
        }
    }
}
