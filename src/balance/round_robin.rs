//! Weighted round robin with a precomputed smooth schedule: the interleaving nginx's smooth
//! weighted round robin produces, computed once at build time so that a pick is one atomic
//! increment and one array read.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balancer, PickContext, smooth_schedule};

#[derive(Debug)]
pub struct RoundRobin {
    /// One cycle of server indices; each server appears `weight / gcd` times, spread out.
    schedule: Box<[u32]>,
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let weights: Vec<u32> = weights.into_iter().collect();
        RoundRobin {
            schedule: smooth_schedule(&weights).into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }
}

impl Balancer for RoundRobin {
    fn pick(&self, _cx: &PickContext<'_>) -> Option<usize> {
        if self.schedule.is_empty() {
            return None;
        }
        // Relaxed is enough: the counter only spreads load, it orders nothing.
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.schedule[n % self.schedule.len()] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{cx, gcd};
    use proptest::prelude::*;

    #[test]
    fn equal_weights_rotate_in_order() {
        let rr = RoundRobin::new([1, 1, 1]);
        let picks: Vec<_> = (0..6)
            .map(|_| rr.pick(&cx(0, "127.0.0.1")).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn heavy_server_is_interleaved_not_bursted() {
        let rr = RoundRobin::new([5, 1, 1]);
        let picks: Vec<_> = (0..7)
            .map(|_| rr.pick(&cx(0, "127.0.0.1")).unwrap())
            .collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn no_servers_picks_nothing() {
        assert_eq!(RoundRobin::new([]).pick(&cx(0, "127.0.0.1")), None);
    }

    proptest! {
        #[test]
        fn each_cycle_gives_every_server_its_weight(weights in prop::collection::vec(1u32..50, 1..12)) {
            let rr = RoundRobin::new(weights.clone());
            let divisor = weights.iter().copied().fold(0, gcd);
            let cycle: u32 = weights.iter().map(|w| w / divisor).sum();
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..cycle * 3 {
                counts[rr.pick(&cx(0, "127.0.0.1")).unwrap()] += 1;
            }
            for (i, w) in weights.iter().enumerate() {
                prop_assert_eq!(counts[i], 3 * w / divisor);
            }
        }
    }
}
