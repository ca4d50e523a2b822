//! Upstream groups and their servers: where a routed request can be sent, each server with
//! its own pool of kept-alive connections.

mod body;
mod pool;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderValue;

pub use body::{RequestBody, RequestBodyError};
pub use pool::{ConnectError, Connection, Pool, RawConn};

use crate::balance::{self, Balancer};
use crate::config::{HashKey, UpstreamConfig};

/// A named group of servers and the balancer that chooses among them.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub servers: Box<[Arc<Server>]>,
    pub balancer: Box<dyn Balancer>,
    /// What the balancer hashes, for `consistent_hash`.
    pub hash_key: Option<HashKey>,
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
}

impl Server {
    /// Requests in flight to this server now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

impl crate::balance::Loads for Box<[Arc<Server>]> {
    fn active(&self, server: usize) -> usize {
        self[server].active()
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
                })
            })
            .collect();
        Upstream {
            name: config.name.clone(),
            servers,
            balancer: balance::build(config.balance, &config.servers),
            hash_key: config.hash_key.clone(),
            preserve_host: config.preserve_host,
        }
    }
}
