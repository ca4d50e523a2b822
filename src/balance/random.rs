//! Weighted random: each pick is independent, with a server's chance proportional to its
//! weight. Spreads load without any shared state between picks.

use super::{Balancer, PickContext};

#[derive(Debug)]
pub struct Random {
    /// Running totals of the weights: server `i` owns the range ending at `cumulative[i]`.
    cumulative: Box<[u64]>,
}

impl Random {
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let mut total = 0u64;
        let cumulative = weights
            .into_iter()
            .map(|w| {
                total += u64::from(w);
                total
            })
            .collect();
        Random { cumulative }
    }
}

impl Balancer for Random {
    fn pick(&self, _cx: &PickContext<'_>) -> Option<usize> {
        let total = *self.cumulative.last()?;
        let ticket = fastrand::u64(..total);
        Some(self.cumulative.partition_point(|&end| end <= ticket))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::cx;
    use proptest::prelude::*;

    #[test]
    fn no_servers_picks_nothing() {
        assert_eq!(Random::new([]).pick(&cx(0, "10.0.0.1")), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn shares_follow_the_weights(weights in prop::collection::vec(1u32..20, 1..8)) {
            let random = Random::new(weights.clone());
            let picks = 40_000;
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..picks {
                counts[random.pick(&cx(0, "10.0.0.1")).unwrap()] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (i, &w) in weights.iter().enumerate() {
                let expected = f64::from(picks) * f64::from(w) / f64::from(total);
                // Six standard deviations of a binomial count: fails by chance about never.
                let sigma = (expected * (1.0 - f64::from(w) / f64::from(total))).sqrt();
                prop_assert!((f64::from(counts[i]) - expected).abs() <= 6.0 * sigma + 1.0,
                    "server {i} weight {w}: {} picks, expected {expected:.0}", counts[i]);
            }
        }
    }
}
