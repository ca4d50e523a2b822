//! Consistent hashing on a ring with virtual nodes (ketama-style): a request key (client
//! address, a header, a cookie or the path) maps to the next server point clockwise. When a
//! server leaves, only the keys it held move; when one joins, only keys it takes move.

use super::{Balancer, PickContext, Thinning, hash};

/// Points per unit of weight: enough for shares within a few percent of the weights.
const POINTS_PER_WEIGHT: u32 = 160;

#[derive(Debug)]
pub struct ConsistentHash {
    /// (point, server index), sorted by point.
    ring: Box<[(u64, u32)]>,
    servers: usize,
}

impl ConsistentHash {
    /// `servers` are (identity, weight); the identity (the address) places a server's
    /// points, so a server keeps its place on the ring whatever the others do.
    pub fn new<'a>(servers: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        let mut ring = Vec::new();
        let mut count = 0;
        for (index, (identity, weight)) in servers.into_iter().enumerate() {
            // Point number `point` of a server hashes its identity's bytes followed by the
            // point's 4 bytes, little-endian: fixed width, so no two (identity, point) pairs
            // share their bytes.
            let mut bytes = identity.as_bytes().to_vec();
            for point in 0..weight * POINTS_PER_WEIGHT {
                bytes.truncate(identity.len());
                bytes.extend_from_slice(&point.to_le_bytes());
                ring.push((hash(&bytes[..]), index as u32));
            }
            count += 1;
        }
        ring.sort_unstable();
        ConsistentHash {
            ring: ring.into_boxed_slice(),
            servers: count,
        }
    }
}

impl Balancer for ConsistentHash {
    fn thinning(&self) -> Thinning {
        Thinning::ByKey
    }

    fn pick(&self, cx: &PickContext<'_>) -> Option<usize> {
        if self.ring.is_empty() {
            return None;
        }
        let key = cx.key.unwrap_or_else(|| hash(&cx.client_ip));
        let mut at = self.ring.partition_point(|&(point, _)| point < key);
        // A retry walks on clockwise to the next different server.
        let mut server = self.ring[at % self.ring.len()].1;
        let mut moved = 0;
        while moved < cx.attempt.min(self.servers - 1) {
            at += 1;
            let next = self.ring[at % self.ring.len()].1;
            if next != server {
                server = next;
                moved += 1;
            }
        }
        Some(server as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::cx;
    use proptest::prelude::*;

    fn pick(ring: &ConsistentHash, key: u64) -> usize {
        let mut c = cx(0, "10.0.0.1");
        c.key = Some(key);
        ring.pick(&c).unwrap()
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn removing_a_server_moves_only_its_keys(n in 2usize..8, removed in 0usize..8, keys in prop::collection::vec(any::<u64>(), 200)) {
            let removed = removed % n;
            let all = names(n);
            let full = ConsistentHash::new(all.iter().map(|s| (s.as_str(), 1)));
            let rest: Vec<&str> = all.iter().enumerate().filter(|&(i, _)| i != removed).map(|(_, s)| s.as_str()).collect();
            let smaller = ConsistentHash::new(rest.iter().map(|s| (*s, 1)));
            for key in keys {
                let before = pick(&full, key);
                let after = rest[pick(&smaller, key)];
                if before != removed {
                    prop_assert_eq!(after, all[before].as_str());
                }
            }
        }

        #[test]
        fn adding_a_server_moves_keys_only_onto_it(n in 1usize..7, keys in prop::collection::vec(any::<u64>(), 200)) {
            let all = names(n + 1);
            let before = ConsistentHash::new(all[..n].iter().map(|s| (s.as_str(), 1)));
            let after = ConsistentHash::new(all.iter().map(|s| (s.as_str(), 1)));
            for key in keys {
                let (b, a) = (pick(&before, key), pick(&after, key));
                prop_assert!(a == b || a == n, "key moved from {} to {}, not to the new server", b, a);
            }
        }
    }

    #[test]
    fn shares_follow_the_weights_and_about_one_in_n_keys_move() {
        let all = names(4);
        let ring = ConsistentHash::new(all.iter().zip([1, 1, 1, 3]).map(|(s, w)| (s.as_str(), w)));
        let mut counts = [0u32; 4];
        for key in 0..60_000u64 {
            counts[pick(&ring, hash(&key.to_le_bytes()[..]))] += 1;
        }
        let heavy = f64::from(counts[3]) / 60_000.0;
        assert!((0.44..0.56).contains(&heavy), "{counts:?}");

        let five = names(5);
        let before = ConsistentHash::new(five.iter().map(|s| (s.as_str(), 1)));
        let after = ConsistentHash::new(five[..4].iter().map(|s| (s.as_str(), 1)));
        let moved = (0..20_000u64)
            .filter(|k| {
                let key = hash(&k.to_le_bytes()[..]);
                pick(&before, key) != pick(&after, key)
            })
            .count();
        let share = moved as f64 / 20_000.0;
        assert!(
            (0.14..0.26).contains(&share),
            "removing 1 of 5 moved {share:.3} of keys"
        );
    }

    /// The ring's layout is part of what a build promises: a change moves keys.
    #[test]
    fn a_key_reaches_the_same_server_in_every_build() {
        let all = names(3);
        let ring = ConsistentHash::new(all.iter().map(|s| (s.as_str(), 1)));
        let users = (0..12).map(|i| format!("user-{i}"));
        let picked: Vec<usize> = users.map(|u| pick(&ring, hash(u.as_str()))).collect();
        assert_eq!(picked, [2, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 0]);
    }

    #[test]
    fn a_retry_walks_to_another_server() {
        let all = names(3);
        let ring = ConsistentHash::new(all.iter().map(|s| (s.as_str(), 1)));
        let mut c = cx(0, "10.0.0.1");
        c.key = Some(12345);
        let first = ring.pick(&c);
        c.attempt = 1;
        assert_ne!(ring.pick(&c), first);
    }
}
