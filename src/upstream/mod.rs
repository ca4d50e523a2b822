//! Upstream groups and their servers: where a routed request can be sent, each server with
//! its own pool of kept-alive connections.

mod body;
mod pool;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

pub use body::{RequestBody, RequestBodyError};
pub use pool::{ConnectError, Connection, Pool, RawConn};

use crate::balance::{self, Balancer};
use crate::config::UpstreamConfig;

/// A named group of servers and the balancer that chooses among them.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub servers: Box<[Arc<Server>]>,
    pub balancer: Box<dyn Balancer>,
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
                })
            })
            .collect();
        Upstream {
            name: config.name.clone(),
            servers,
            balancer: balance::build(config.balance, &config.servers),
            preserve_host: config.preserve_host,
        }
    }
}
