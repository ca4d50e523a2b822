//! Per-server pool of HTTP/1.1 connections kept alive between requests. A connection comes
//! back only after its response was read to the end (see `proxy::body`), so a pooled
//! connection never holds bytes of an earlier exchange.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::RequestBody;
use crate::idle_timeout::IdleTimeout;

/// Idle connections to one server, capped in number and in age.
#[derive(Debug)]
pub struct Pool {
    address: SocketAddr,
    /// `None` when pooling is switched off (`pool_max_idle_per_server = 0`).
    idle: Option<ArrayQueue<Idle>>,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// A connection ready to carry one request.
pub struct Connection {
    pub sender: SendRequest<RequestBody>,
    /// Taken from the pool rather than opened for this request: a failure before any
    /// response byte may be the server having closed it while idle, so a retry is safe.
    pub reused: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} failed: {1}")]
    Failed(SocketAddr, std::io::Error),
    #[error("connect to {0} timed out after {1:?}")]
    TimedOut(SocketAddr, Duration),
    #[error("HTTP handshake with {0} failed: {1}")]
    Handshake(SocketAddr, hyper::Error),
}

impl Pool {
    pub fn new(
        address: SocketAddr,
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Self {
        let idle = (max_idle > 0).then(|| ArrayQueue::new(max_idle));
        Pool {
            address,
            idle,
            idle_timeout,
            connect_timeout,
        }
    }

    /// A pooled connection if a live one is idle, else a new one.
    pub async fn get(&self) -> Result<Connection, ConnectError> {
        if let Some(sender) = self.take_idle().await {
            return Ok(Connection {
                sender,
                reused: true,
            });
        }
        self.connect().await.map(|sender| Connection {
            sender,
            reused: false,
        })
    }

    /// Opens a fresh connection, bypassing the pool.
    pub async fn connect(&self) -> Result<SendRequest<RequestBody>, ConnectError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.address))
            .await
            .map_err(|_| ConnectError::TimedOut(self.address, self.connect_timeout))?
            .map_err(|e| ConnectError::Failed(self.address, e))?;
        let _ = stream.set_nodelay(true);
        // The pool's idle timeout also bounds a stalled response: no byte either way for
        // that long ends the connection.
        let io = TokioIo::new(IdleTimeout::new(stream, self.idle_timeout));
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| ConnectError::Handshake(self.address, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn take_idle(&self) -> Option<SendRequest<RequestBody>> {
        let idle = self.idle.as_ref()?;
        while let Some(mut conn) = idle.pop() {
            if conn.since.elapsed() >= self.idle_timeout || conn.sender.is_closed() {
                continue;
            }
            // Usually ready already; waiting covers the moment between a response's last
            // byte and the connection task marking itself idle.
            if conn.sender.ready().await.is_ok() {
                return Some(conn.sender);
            }
        }
        None
    }

    /// Returns a connection whose last response was read completely.
    pub fn put(&self, sender: SendRequest<RequestBody>) {
        if let Some(idle) = &self.idle
            && !sender.is_closed()
        {
            // A full pool drops the connection, which closes it.
            let _ = idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}
