//! Balancing: which server of an upstream gets the next request. One small trait, one file
//! per algorithm; a balancer is built once per runtime snapshot and shared by all requests.

mod round_robin;

pub use round_robin::RoundRobin;

use crate::config::{BalanceKind, ServerConfig};

/// Picks a server for a request. Implementations must be cheap and lock-free: `pick` runs
/// once per request on every core.
pub trait Balancer: Send + Sync + std::fmt::Debug {
    /// Index of the chosen server in the upstream's server list, or `None` if it has none.
    /// `attempt` counts earlier tries of this request, so a retry can avoid the server that
    /// just failed.
    fn pick(&self, attempt: usize) -> Option<usize>;
}

/// Builds the balancer an upstream's config asks for.
pub fn build(kind: BalanceKind, servers: &[ServerConfig]) -> Box<dyn Balancer> {
    match kind {
        BalanceKind::RoundRobin => Box::new(RoundRobin::new(servers.iter().map(|s| s.weight))),
    }
}
