//! Weighted round robin with a precomputed smooth schedule: the interleaving nginx's smooth
//! weighted round robin produces, computed once at build time so that a pick is one atomic
//! increment and one array read.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::Balancer;

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
    fn pick(&self, _attempt: usize) -> Option<usize> {
        if self.schedule.is_empty() {
            return None;
        }
        // Relaxed is enough: the counter only spreads load, it orders nothing.
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.schedule[n % self.schedule.len()] as usize)
    }
}

/// nginx's smooth weighted round robin run for one full cycle: each step every server gains
/// its weight, the richest is chosen and pays the total. Weights are first divided by their
/// gcd so the cycle is as short as it can be.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w / divisor)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn equal_weights_rotate_in_order() {
        let rr = RoundRobin::new([1, 1, 1]);
        let picks: Vec<_> = (0..6).map(|_| rr.pick(0).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn heavy_server_is_interleaved_not_bursted() {
        let rr = RoundRobin::new([5, 1, 1]);
        let picks: Vec<_> = (0..7).map(|_| rr.pick(0).unwrap()).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn no_servers_picks_nothing() {
        assert_eq!(RoundRobin::new([]).pick(0), None);
    }

    proptest! {
        #[test]
        fn each_cycle_gives_every_server_its_weight(weights in prop::collection::vec(1u32..50, 1..12)) {
            let rr = RoundRobin::new(weights.clone());
            let divisor = weights.iter().copied().fold(0, gcd);
            let cycle: u32 = weights.iter().map(|w| w / divisor).sum();
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..cycle * 3 {
                counts[rr.pick(0).unwrap()] += 1;
            }
            for (i, w) in weights.iter().enumerate() {
                prop_assert_eq!(counts[i], 3 * w / divisor);
            }
        }
    }
}
