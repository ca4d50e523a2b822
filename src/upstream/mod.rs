//! Upstream groups and their servers: where a routed request can be sent, each server with
//! its own pool of kept-alive connections and its load (requests in flight, response
//! times); the order in which a request tries servers (sticky pin, primaries, backups).

mod body;
mod latency;
mod pool;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

pub use body::{RequestBody, RequestBodyError};
use latency::PeakEwma;
pub use pool::{ConnectError, Connection, Pool, RawConn};

use crate::balance::{self, Balancer, Loads, PickContext};
use crate::config::{HashKey, UpstreamConfig};

/// A named group of servers and the balancers that choose among them.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub servers: Box<[Arc<Server>]>,
    /// Servers that take requests first.
    primary: Tier,
    /// Servers that take requests only when no primary could be reached.
    backup: Tier,
    /// What the balancer hashes, for `consistent_hash`.
    pub hash_key: Option<HashKey>,
    /// Pinning clients to a server with a cookie, if sessions are sticky.
    sticky: Option<Sticky>,
    /// Forward the client's Host header rather than the server's own address.
    pub preserve_host: bool,
}

/// One backend server.
#[derive(Debug)]
pub struct Server {
    pub address: SocketAddr,
    /// `address` as a Host header value, for upstreams that do not preserve the client's.
    pub host_header: HeaderValue,
    pub pool: Pool,
    /// Requests in flight to this server from every worker, for load-aware balancers.
    active: AtomicUsize,
    /// Response times seen from this server, for `least_time`.
    latency: PeakEwma,
}

impl Server {
    /// Requests in flight to this server now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Records how long the server took to start answering a request.
    pub fn observe(&self, response_time: Duration) {
        self.latency.observe(response_time);
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// Sticky sessions by a cookie Fulcrum sets: its value is an opaque token per server (a
/// hash of the upstream's name and the server's address, never the address itself).
#[derive(Debug)]
struct Sticky {
    cookie: String,
    /// Per server, the `Set-Cookie` value that pins a client to it.
    set_cookie: Box<[HeaderValue]>,
    /// Token → server index, for servers that take new requests.
    by_token: HashMap<u64, usize>,
}

/// What ties a request to a server beside the balancer's own choice.
#[derive(Debug, Clone, Copy)]
pub struct Affinity {
    pub client_ip: IpAddr,
    /// The hash of the request's `hash_key`, for `consistent_hash`.
    pub key: Option<u64>,
    /// The server the request's sticky cookie names, if it still takes requests.
    pub pinned: Option<usize>,
}

/// Servers of one rank that take new requests (drained ones do not), and the balancer
/// that picks among them by their position in `members`.
#[derive(Debug)]
struct Tier {
    /// Indices into the upstream's server list.
    members: Box<[usize]>,
    balancer: Box<dyn Balancer>,
}

/// A tier's view of the servers' loads, indexed as the tier's balancer sees them.
struct TierLoads<'a> {
    servers: &'a [Arc<Server>],
    members: &'a [usize],
}

impl Loads for TierLoads<'_> {
    fn active(&self, server: usize) -> usize {
        self.servers[self.members[server]].active()
    }

    fn latency_ns(&self, server: usize) -> f64 {
        self.servers[self.members[server]].latency.estimate_ns()
    }
}

/// One request in flight to a server; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight(Arc<Server>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstream {
    /// Builds an upstream whose pools keep one queue per worker.
    pub fn build(
        config: &UpstreamConfig,
        workers: usize,
        connect_timeout: Duration,
        stream_idle: Duration,
    ) -> Self {
        let latency_decay = config.latency_decay;
        let servers = config
            .servers
            .iter()
            .map(|s| {
                Arc::new(Server {
                    address: s.address,
                    host_header: HeaderValue::from_str(&s.address.to_string())
                        .expect("a socket address is a valid header value"),
                    pool: Pool::new(
                        s.address,
                        workers,
                        config.pool_max_idle_per_server,
                        config.pool_idle_timeout,
                        connect_timeout,
                        stream_idle,
                    ),
                    active: AtomicUsize::new(0),
                    latency: PeakEwma::new(latency_decay),
                })
            })
            .collect();
        let tier = |backup: bool| {
            let members: Box<[usize]> = (0..config.servers.len())
                .filter(|&i| config.servers[i].backup == backup && !config.servers[i].drain)
                .collect();
            let configs: Vec<_> = members.iter().map(|&i| config.servers[i].clone()).collect();
            Tier {
                members,
                balancer: balance::build(config.balance, &configs),
            }
        };
        let sticky = config.sticky_cookie.as_ref().map(|cookie| {
            let tokens: Vec<u64> = config
                .servers
                .iter()
                .map(|s| balance::hash(&(&config.name, s.address)))
                .collect();
            Sticky {
                cookie: cookie.clone(),
                set_cookie: tokens
                    .iter()
                    .map(|t| {
                        HeaderValue::from_str(&format!("{cookie}={t:016x}; Path=/; HttpOnly"))
                            .expect("a cookie name and hex are valid")
                    })
                    .collect(),
                by_token: tokens
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| !config.servers[i].drain)
                    .map(|(i, &t)| (t, i))
                    .collect(),
            }
        });
        Upstream {
            name: config.name.clone(),
            sticky,
            servers,
            primary: tier(false),
            backup: tier(true),
            hash_key: config.hash_key.clone(),
            preserve_host: config.preserve_host,
        }
    }
}

impl Upstream {
    /// How many tries a request may make: its pinned server, then each primary once, then
    /// each backup once.
    pub fn tries(&self, affinity: &Affinity) -> usize {
        usize::from(affinity.pinned.is_some())
            + self.primary.members.len()
            + self.backup.members.len()
    }

    /// The server for try number `attempt` of a request: its pinned server first, then
    /// picked among the primaries until every one has been tried, then among the backups.
    /// A server in `failed` (indices of servers this request could not reach) is never
    /// picked again while another is left: a dead server has nothing in flight and no slow
    /// responses on record, so load-aware balancers would otherwise choose it every time.
    pub fn pick(
        &self,
        attempt: usize,
        affinity: &Affinity,
        failed: &[usize],
    ) -> Option<(usize, &Arc<Server>)> {
        let chosen = self.choose(attempt, affinity)?;
        let index = if failed.contains(&chosen) {
            let untried = |tier: &Tier| tier.members.iter().copied().find(|m| !failed.contains(m));
            untried(&self.primary)
                .or_else(|| untried(&self.backup))
                .unwrap_or(chosen)
        } else {
            chosen
        };
        Some((index, &self.servers[index]))
    }

    /// What the pin, the tiers and the balancers choose for try number `attempt`.
    fn choose(&self, attempt: usize, affinity: &Affinity) -> Option<usize> {
        // Past the last server, tries start over: a request that found a pooled connection
        // closed may go once more.
        let mut attempt = attempt % self.tries(affinity).max(1);
        if let Some(pinned) = affinity.pinned {
            if attempt == 0 {
                return Some(pinned);
            }
            attempt -= 1;
        }
        let primaries = self.primary.members.len();
        let (tier, attempt) = if attempt < primaries {
            (&self.primary, attempt)
        } else {
            (&self.backup, attempt - primaries)
        };
        let loads = TierLoads {
            servers: &self.servers,
            members: &tier.members,
        };
        let cx = PickContext {
            attempt,
            client_ip: affinity.client_ip,
            loads: &loads,
            key: affinity.key,
        };
        let index = tier.balancer.pick(&cx)?;
        Some(tier.members[index])
    }

    /// The server the request's sticky cookie names, if sessions are sticky and that server
    /// still takes requests.
    pub fn pinned(&self, headers: &HeaderMap) -> Option<usize> {
        let sticky = self.sticky.as_ref()?;
        let token = crate::proxy::cookie(headers, &sticky.cookie)?;
        sticky
            .by_token
            .get(&u64::from_str_radix(token, 16).ok()?)
            .copied()
    }

    /// The `Set-Cookie` value that pins the client to `server`, when sessions are sticky and
    /// the request was not pinned to it already.
    pub fn pin_cookie(&self, affinity: &Affinity, server: &Arc<Server>) -> Option<&HeaderValue> {
        let sticky = self.sticky.as_ref()?;
        if affinity
            .pinned
            .is_some_and(|p| Arc::ptr_eq(&self.servers[p], server))
        {
            return None;
        }
        let index = self.servers.iter().position(|s| Arc::ptr_eq(s, server))?;
        Some(&sticky.set_cookie[index])
    }
}
