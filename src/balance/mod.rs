//! Balancing: which server of an upstream gets the next request. One small trait, one file
//! per algorithm; a balancer is built once per runtime snapshot and shared by all requests.

mod consistent_hash;
mod ip_hash;
mod least_connections;
mod random;
mod round_robin;
mod two_choices;

use std::net::IpAddr;

use siphasher::sip::SipHasher13;

pub use consistent_hash::ConsistentHash;
pub use ip_hash::IpHash;
pub use least_connections::LeastConnections;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use two_choices::{Measure, TwoChoices};

use crate::config::{BalanceKind, ServerConfig};

/// What a balancer may look at for one pick.
#[derive(Clone, Copy)]
pub struct PickContext<'a> {
    /// Earlier tries of this request, so a retry can move past the server that just failed.
    pub attempt: usize,
    pub client_ip: IpAddr,
    /// How busy each server is now.
    pub loads: &'a dyn Loads,
    /// The hash of the request's key, for upstreams that balance on one (`hash_key`).
    pub key: Option<u64>,
}

/// How busy each server is, indexed like the list the balancer was built from.
pub trait Loads {
    /// Requests in flight.
    fn active(&self, server: usize) -> usize;

    /// The server's recent response time estimate, in nanoseconds (0 when unknown).
    fn latency_ns(&self, _server: usize) -> f64 {
        0.0
    }

    /// How much of its weight the server takes now, in thousandths: `FULL_SHARE` normally,
    /// less while it ramps up after slow start began, 0 while it is marked down.
    fn share(&self, _server: usize) -> u32 {
        FULL_SHARE
    }
}

/// A server's whole weight, as a share in thousandths.
pub const FULL_SHARE: u32 = 1000;

impl Loads for Vec<usize> {
    fn active(&self, server: usize) -> usize {
        self[server]
    }
}

/// Picks a server for a request. Implementations must be cheap and lock-free: `pick` runs
/// once per request on every core.
pub trait Balancer: Send + Sync + std::fmt::Debug {
    /// Index of the chosen server in the list the balancer was built from, or `None` if
    /// that list is empty.
    fn pick(&self, cx: &PickContext<'_>) -> Option<usize>;

    /// Told after a server's requests in flight or share changed, for balancers that keep
    /// servers ordered by load rather than reading `PickContext::loads` at each pick.
    fn load_changed(&self, _server: usize, _loads: &dyn Loads) {}

    /// Whether `load_changed` must hear of every request that starts or ends (otherwise
    /// only of changes in share).
    fn ordered_by_load(&self) -> bool {
        false
    }

    /// How the upstream lets a server ramping up take only its share of requests.
    fn thinning(&self) -> Thinning {
        Thinning::Random
    }
}

/// How a server's share (slow start) is applied to a balancer's picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thinning {
    /// The balancer weighs shares itself, as load-aware ones do.
    Weighed,
    /// A random part of the server's picks is passed on to another server.
    Random,
    /// The same part of the keys is passed on each time, so that clients stay put.
    ByKey,
}

/// Builds the balancer an upstream's config asks for.
pub fn build(kind: BalanceKind, servers: &[ServerConfig]) -> Box<dyn Balancer> {
    let weights = servers.iter().map(|s| s.weight);
    match kind {
        BalanceKind::RoundRobin => Box::new(RoundRobin::new(weights)),
        BalanceKind::Random => Box::new(Random::new(weights)),
        BalanceKind::IpHash => Box::new(IpHash::new(weights)),
        BalanceKind::LeastConnections => Box::new(LeastConnections::new(weights)),
        BalanceKind::TwoChoices => Box::new(TwoChoices::new(weights, Measure::InFlight)),
        BalanceKind::LeastTime => Box::new(TwoChoices::new(weights, Measure::ResponseTime)),
        BalanceKind::ConsistentHash => {
            let names: Vec<String> = servers.iter().map(|s| s.address.to_string()).collect();
            Box::new(ConsistentHash::new(
                names
                    .iter()
                    .map(String::as_str)
                    .zip(servers.iter().map(|s| s.weight)),
            ))
        }
    }
}

/// nginx's smooth weighted round robin run for one full cycle: each step every server gains
/// its weight, the richest is chosen and pays the total. Weights are first divided by their
/// gcd so the cycle is as short as it can be. Each server appears `weight / gcd` times,
/// spread out.
pub(crate) fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
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

pub(crate) fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The hash behind `ip_hash`, `consistent_hash` and request keys: SipHash-1-3 with both keys
/// 0 over the key's bytes as [`Key`] gives them. It is fixed, not std's `DefaultHasher`
/// (whose algorithm may change with a Rust release), so that a key maps to the same server
/// on every worker, after a restart and after an upgrade. It needs no secret: it spreads
/// keys, it does not hide them.
pub fn hash<K: Key + ?Sized>(key: &K) -> u64 {
    key.with_bytes(|bytes| SipHasher13::new_with_keys(0, 0).hash(bytes))
}

/// Something balancers hash, given as bytes spelled out here rather than through
/// `std::hash::Hash`, whose byte stream for a type is not promised to stay the same.
pub trait Key {
    fn with_bytes<R>(&self, hash: impl FnOnce(&[u8]) -> R) -> R;
}

/// An IPv4 address is its 4 octets, an IPv6 address its 16.
impl Key for IpAddr {
    fn with_bytes<R>(&self, hash: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            IpAddr::V4(ip) => hash(&ip.octets()),
            IpAddr::V6(ip) => hash(&ip.octets()),
        }
    }
}

/// A path or cookie value is its UTF-8 bytes.
impl Key for str {
    fn with_bytes<R>(&self, hash: impl FnOnce(&[u8]) -> R) -> R {
        hash(self.as_bytes())
    }
}

impl Key for [u8] {
    fn with_bytes<R>(&self, hash: impl FnOnce(&[u8]) -> R) -> R {
        hash(self)
    }
}

impl<K: Key + ?Sized> Key for &K {
    fn with_bytes<R>(&self, hash: impl FnOnce(&[u8]) -> R) -> R {
        (**self).with_bytes(hash)
    }
}

/// Whether server `a` is less loaded than `b` for its weight and share, on the load each
/// would have with one more request (as least connections orders them).
pub(crate) fn lighter(loads: &dyn Loads, weights: &[u32], a: usize, b: usize) -> bool {
    least_connections::score(loads.active(a), weights[a], loads.share(a))
        < least_connections::score(loads.active(b), weights[b], loads.share(b))
}

/// Between two equally good sides holding `left` and `right` servers: whether to go right,
/// at random in proportion to their sizes.
pub(crate) fn tie_break(left: usize, right: usize) -> bool {
    match (left, right) {
        (_, 0) => false,
        (0, _) => true,
        _ => fastrand::usize(..left + right) >= left,
    }
}

#[cfg(test)]
pub(crate) fn cx(attempt: usize, client_ip: &str) -> PickContext<'static> {
    static IDLE: Vec<usize> = Vec::new();
    PickContext {
        attempt,
        client_ip: client_ip.parse().unwrap(),
        loads: &IDLE,
        key: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change of hash moves every client of `ip_hash` and every key of `consistent_hash`:
    /// it must be a decision, made by changing these values.
    #[test]
    fn the_hash_gives_the_same_values_in_every_build() {
        // The same values come from CPython 3.11+, whose `hash(bytes)` is SipHash-1-3 keyed
        // with zeros under PYTHONHASHSEED=0: `hash(bytes([10, 0, 0, 1])) & (2**64 - 1)`.
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert_eq!(hash(&ip("10.0.0.1")), 11967657435158914590);
        assert_eq!(hash(&ip("192.168.1.20")), 12327525113044541517);
        assert_eq!(hash(&ip("::")), 8556445246977061536);
        assert_eq!(hash(&ip("2001:db8::1")), 17436951306047110292);
        assert_eq!(hash("/cart"), 942833704336206116);
        // A header value (bytes) and a path or cookie (text) with the same bytes agree.
        assert_eq!(hash(&b"/cart"[..]), hash("/cart"));
    }
}
