//! Power of two random choices: draw two different servers at random (by weight) and take
//! the one that looks better for its weight. On requests in flight (`two_choices`) it is
//! nearly as good as least connections with no scan; on response time × requests in flight
//! (`least_time`, as Finagle and linkerd balance) a slow server gets little traffic while it
//! is slow, and since its estimate fades when unused, it wins its share back once recovered.

use super::{Balancer, PickContext, Random, Thinning, lighter};

/// What the two candidates are compared on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    InFlight,
    ResponseTime,
}

#[derive(Debug)]
pub struct TwoChoices {
    weights: Box<[u32]>,
    draw: Random,
    measure: Measure,
}

impl TwoChoices {
    pub fn new(weights: impl IntoIterator<Item = u32>, measure: Measure) -> Self {
        let weights: Box<[u32]> = weights.into_iter().collect();
        let draw = Random::new(weights.iter().copied());
        TwoChoices {
            weights,
            draw,
            measure,
        }
    }

    /// Whether server `a` is the better choice than `b`.
    fn better(&self, cx: &PickContext<'_>, a: usize, b: usize) -> bool {
        match self.measure {
            Measure::InFlight => lighter(cx.loads, &self.weights, a, b),
            Measure::ResponseTime => self.cost(cx, a) < self.cost(cx, b),
        }
    }

    fn cost(&self, cx: &PickContext<'_>, server: usize) -> f64 {
        let share = cx.loads.share(server);
        if share == 0 {
            return f64::INFINITY;
        }
        // One nanosecond at least, so servers with no history still compare by load.
        (cx.loads.latency_ns(server) + 1.0) * (cx.loads.active(server) as f64 + 1.0)
            / (f64::from(self.weights[server]) * f64::from(share))
    }
}

impl Balancer for TwoChoices {
    fn thinning(&self) -> Thinning {
        Thinning::Weighed
    }

    fn pick(&self, cx: &PickContext<'_>) -> Option<usize> {
        let first = self.draw.pick(cx)?;
        let n = self.weights.len();
        if n == 1 {
            return Some(first);
        }
        // A few draws for a different second server; a heavily weighted first may keep
        // coming back, so fall back to its neighbour.
        let second = (0..4)
            .filter_map(|_| self.draw.pick(cx))
            .find(|&s| s != first)
            .unwrap_or((first + 1) % n);
        Some(if self.better(cx, second, first) {
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
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn never_picks_the_single_busiest_server(
            loads in prop::collection::vec(0usize..100, 2..10),
        ) {
            let weights = vec![1u32; loads.len()];
            let max = *loads.iter().max().unwrap();
            prop_assume!(loads.iter().filter(|&&l| l == max).count() == 1);
            let busiest = loads.iter().position(|&l| l == max).unwrap();
            let tc = TwoChoices::new(weights, Measure::InFlight);
            for _ in 0..50 {
                let cx = PickContext { attempt: 0, client_ip: "10.0.0.1".parse().unwrap(), loads: &loads, key: None };
                prop_assert_ne!(tc.pick(&cx).unwrap(), busiest);
            }
        }
    }

    struct Latencies(Vec<f64>);

    impl Loads for Latencies {
        fn active(&self, _server: usize) -> usize {
            0
        }
        fn latency_ns(&self, server: usize) -> f64 {
            self.0[server]
        }
    }

    #[test]
    fn on_response_time_the_slow_server_is_never_chosen_over_a_fast_one() {
        let loads = Latencies(vec![1e6, 50e6, 1e6]);
        let lt = TwoChoices::new([1, 1, 1], Measure::ResponseTime);
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
