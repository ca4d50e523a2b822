//! Source IP hash: a client address always reaches the same server while the server list
//! is unchanged, with clients spread in proportion to the weights. (Consistent hashing,
//! which moves few clients when the list changes, is a separate algorithm.)

use super::{Balancer, PickContext, Thinning, hash, smooth_schedule};

#[derive(Debug)]
pub struct IpHash {
    /// One weighted cycle of server indices; a client's hash picks a slot in it.
    schedule: Box<[u32]>,
}

impl IpHash {
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let weights: Vec<u32> = weights.into_iter().collect();
        IpHash {
            schedule: smooth_schedule(&weights).into_boxed_slice(),
        }
    }
}

impl Balancer for IpHash {
    fn thinning(&self) -> Thinning {
        Thinning::ByKey
    }

    fn pick(&self, cx: &PickContext<'_>) -> Option<usize> {
        if self.schedule.is_empty() {
            return None;
        }
        let slot = hash(&cx.client_ip) as usize;
        // A retry moves on through the cycle, past the server that just failed.
        Some(self.schedule[slot.wrapping_add(cx.attempt) % self.schedule.len()] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::cx;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_client_always_reaches_the_same_server(weights in prop::collection::vec(1u32..10, 1..8), ip in any::<u32>()) {
            let hash = IpHash::new(weights);
            let client = std::net::Ipv4Addr::from(ip).to_string();
            let first = hash.pick(&cx(0, &client));
            for _ in 0..10 {
                prop_assert_eq!(hash.pick(&cx(0, &client)), first);
            }
        }
    }

    #[test]
    fn clients_spread_in_proportion_to_the_weights() {
        let hash = IpHash::new([3, 1]);
        let mut counts = [0u32; 2];
        for i in 0..20_000u32 {
            let client = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            counts[hash.pick(&cx(0, &client)).unwrap()] += 1;
        }
        let share = f64::from(counts[0]) / 20_000.0;
        assert!((0.72..0.78).contains(&share), "{counts:?}");
    }

    #[test]
    fn a_retry_moves_to_another_slot() {
        let hash = IpHash::new([1, 1, 1]);
        let first = hash.pick(&cx(0, "10.1.2.3"));
        assert_ne!(hash.pick(&cx(1, "10.1.2.3")), first);
    }
}
