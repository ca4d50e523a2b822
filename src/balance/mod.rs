//! Balancing: which server of an upstream gets the next request. One small trait, one file
//! per algorithm; a balancer is built once per runtime snapshot and shared by all requests.

mod consistent_hash;
mod ip_hash;
mod least_connections;
mod random;
mod round_robin;
mod two_choices;

use std::net::IpAddr;

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

/// The hash behind `ip_hash`, `consistent_hash` and request keys: SipHash with fixed keys,
/// so a key maps the same way on every worker and after a restart.
pub fn hash(value: &impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
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
