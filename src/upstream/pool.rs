//! Per-server pools of HTTP/1.1 connections kept alive between requests: raw connections for
//! the hand-written HTTP/1.1 path, hyper client connections for the HTTP/2 path. A
//! connection comes back only after its response was read to the end, so a pooled
//! connection never holds bytes of an earlier exchange.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use crossbeam_queue::ArrayQueue;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::RequestBody;
use crate::idle_timeout::IdleTimeout;
use crate::server::worker;

/// Idle connections to one server, capped in number and in age.
#[derive(Debug)]
pub struct Pool {
    address: SocketAddr,
    /// Hyper client connections for the HTTP/2 path, one queue per worker: a connection
    /// belongs to the event loop that opened it. Empty when pooling is switched off
    /// (`pool_max_idle_per_server = 0`).
    idle: Box<[ArrayQueue<Idle>]>,
    /// Raw connections for the HTTP/1.1 path, one queue per worker; empty when pooling is off.
    raw: Box<[ArrayQueue<RawIdle>]>,
    idle_timeout: Duration,
    connect_timeout: Duration,
    /// How long a hyper connection may stall mid-exchange (`upstream_idle`).
    stream_idle: Duration,
}

/// A raw connection to a server with its read buffer, which is empty whenever pooled.
#[derive(Debug)]
pub struct RawConn {
    pub stream: TcpStream,
    pub buf: BytesMut,
    /// Taken from the pool rather than opened for this request.
    pub reused: bool,
}

#[derive(Debug)]
struct RawIdle {
    stream: TcpStream,
    buf: BytesMut,
    since: Instant,
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
    #[error("the upstream has no servers")]
    NoServer,
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
        workers: usize,
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
        stream_idle: Duration,
    ) -> Self {
        let queues = if max_idle > 0 { workers } else { 0 };
        let idle = (0..queues).map(|_| ArrayQueue::new(max_idle)).collect();
        let raw = (0..queues).map(|_| ArrayQueue::new(max_idle)).collect();
        Pool {
            address,
            idle,
            raw,
            idle_timeout,
            connect_timeout,
            stream_idle,
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

    /// A pooled raw connection, if a fresh one is idle. With `probe`, each candidate is
    /// first checked for having been closed by the server (one non-blocking read), for
    /// requests that could not be retried on another connection.
    pub fn take_raw(&self, probe: bool) -> Option<RawConn> {
        let raw = self.raw.get(worker())?;
        while let Some(idle) = raw.pop() {
            if idle.since.elapsed() < self.idle_timeout
                && !(probe && crate::http1::io::is_stale(&idle.stream))
            {
                return Some(RawConn {
                    stream: idle.stream,
                    buf: idle.buf,
                    reused: true,
                });
            }
        }
        None
    }

    /// Opens a new raw connection.
    pub async fn connect_raw(&self) -> Result<RawConn, ConnectError> {
        let stream = self.connect_tcp().await?;
        Ok(RawConn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            reused: false,
        })
    }

    /// Returns a raw connection whose last response was read completely and which holds
    /// no unread bytes.
    pub fn put_raw(&self, conn: RawConn) {
        if let Some(raw) = self.raw.get(worker())
            && conn.buf.is_empty()
        {
            let _ = raw.push(RawIdle {
                stream: conn.stream,
                buf: conn.buf,
                since: Instant::now(),
            });
        }
    }

    async fn connect_tcp(&self) -> Result<TcpStream, ConnectError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.address))
            .await
            .map_err(|_| ConnectError::TimedOut(self.address, self.connect_timeout))?
            .map_err(|e| ConnectError::Failed(self.address, e))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Opens a fresh hyper client connection, bypassing the pool.
    pub async fn connect(&self) -> Result<SendRequest<RequestBody>, ConnectError> {
        let stream = self.connect_tcp().await?;
        // No byte either way for `upstream_idle` ends the connection: a stalled response,
        // or a pooled connection idle that long (the pool drops those sooner anyway).
        let io = TokioIo::new(IdleTimeout::new(stream, self.stream_idle));
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| ConnectError::Handshake(self.address, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn take_idle(&self) -> Option<SendRequest<RequestBody>> {
        let idle = self.idle.get(worker())?;
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
        if let Some(idle) = self.idle.get(worker())
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
