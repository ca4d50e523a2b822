//! Power of two random choices: draw two different servers at random (by weight) and take
//! the less loaded for its weight. Nearly as good as least connections, with no scan and no
//! shared counter to contend on.

use super::{Balancer, PickContext, Random, lighter};

#[derive(Debug)]
pub struct TwoChoices {
    weights: Box<[u32]>,
    draw: Random,
}

impl TwoChoices {
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let weights: Box<[u32]> = weights.into_iter().collect();
        let draw = Random::new(weights.iter().copied());
        TwoChoices { weights, draw }
    }
}

impl Balancer for TwoChoices {
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
        Some(if lighter(cx.loads, &self.weights, second, first) {
            second
        } else {
            first
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            let tc = TwoChoices::new(weights);
            for _ in 0..50 {
                let chosen = tc.pick(&PickContext { attempt: 0, client_ip: "10.0.0.1".parse().unwrap(), loads: &loads, key: None }).unwrap();
                prop_assert_ne!(chosen, busiest);
            }
        }
    }
}
