//! Per-server pools of HTTP/1.1 connections kept alive between requests, one queue per
//! worker. A connection comes back only after its response was read to the end, so a
//! pooled connection never holds bytes of an earlier exchange.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use crossbeam_queue::ArrayQueue;
use tokio::net::TcpStream;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::stats::ConnectionCounts;
use crate::http1::io::WaitTimer;
use crate::server::worker;
use crate::tls::client::Connector;
use crate::tls::handshake::{self, HandshakeError};
use crate::transport::Stream;

/// Idle connections to one server, capped in number and in age.
#[derive(Debug)]
pub struct Pool {
    address: SocketAddr,
    /// One queue per worker: a connection belongs to the event loop that opened it. Empty
    /// when pooling is switched off (`pool_max_idle_per_server = 0`).
    raw: Box<[ArrayQueue<RawIdle>]>,
    idle_timeout: Duration,
    connect_timeout: Duration,
    /// One permit per connection open to the server, in use or idle, over all workers
    /// (`max_connections`).
    slots: Arc<Semaphore>,
    max_connections: usize,
    /// Requests waiting for a slot: while there are any, a connection whose exchange ends
    /// goes to one waiting on the same worker, or else is closed so that its slot goes to
    /// one on another worker (a connection belongs to the event loop that opened it).
    waiting: AtomicUsize,
    /// Per worker (one per pool queue), requests waiting for a slot there, and how they hear
    /// of a connection handed over to them through the worker's queue.
    waiting_here: Box<[(AtomicUsize, Notify)]>,
    /// Connections handed out, opened or taken from the pool, for the metrics.
    pub handed_out: ConnectionCounts,
}

/// A raw connection to a server with its read buffer, which is empty whenever pooled.
#[derive(Debug)]
pub struct RawConn {
    pub stream: Stream,
    pub buf: BytesMut,
    /// Taken from the pool rather than opened for this request.
    pub reused: bool,
    /// For waits on the server's answers, kept with the connection from one request to
    /// the next.
    pub timer: WaitTimer,
    /// The connection's place under the server's `max_connections`, given back on close.
    slot: OwnedSemaphorePermit,
}

/// A tunnel's place under its server's `max_connections`, given back when dropped.
#[derive(Debug)]
pub struct TunnelSlot {
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug)]
struct RawIdle {
    stream: Stream,
    buf: BytesMut,
    timer: WaitTimer,
    since: Instant,
    slot: OwnedSemaphorePermit,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the upstream has no servers")]
    NoServer,
    /// Every server of the upstream is given by host name, and none has an address yet.
    #[error("no servers resolved for upstream `{0}`")]
    NoneResolved(String),
    #[error("connect to {0} failed: {1}")]
    Failed(SocketAddr, std::io::Error),
    #[error("connect to {0} timed out after {1:?}")]
    TimedOut(SocketAddr, Duration),
    /// Fulcrum itself is out of something a connection needs (descriptors, local ports,
    /// buffers): not the server's fault.
    #[error("cannot open a connection to {0}: {1}")]
    Local(SocketAddr, std::io::Error),
    /// The TLS handshake with the server failed (its certificate is not trusted or not for
    /// the name, say).
    #[error("TLS with {0} failed: {1}")]
    Tls(SocketAddr, String),
    /// The server has `max_connections` open and none came free in time.
    #[error("{0} has its {1} connections open and none came free within {2:?}")]
    Busy(SocketAddr, usize, Duration),
}

impl ConnectError {
    /// Whether the failure says something about the server (and should count against it),
    /// rather than about this process.
    pub fn is_servers_fault(&self) -> bool {
        !matches!(self, ConnectError::Local(..) | ConnectError::Busy(..))
    }

    fn from_io(address: SocketAddr, e: std::io::Error) -> Self {
        let local = matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::EADDRNOTAVAIL | libc::ENOBUFS | libc::ENOMEM)
        );
        if local {
            ConnectError::Local(address, e)
        } else {
            ConnectError::Failed(address, e)
        }
    }
}

impl Pool {
    pub fn new(
        address: SocketAddr,
        workers: usize,
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
        max_connections: usize,
    ) -> Self {
        let queues = if max_idle > 0 { workers } else { 0 };
        let raw = (0..queues).map(|_| ArrayQueue::new(max_idle)).collect();
        let waiting_here = (0..queues)
            .map(|_| (AtomicUsize::new(0), Notify::new()))
            .collect();
        Pool {
            address,
            raw,
            idle_timeout,
            connect_timeout,
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            waiting: AtomicUsize::new(0),
            waiting_here,
            handed_out: ConnectionCounts::new(workers),
        }
    }

    /// A pooled connection, if a fresh one is idle (as of `now`). With `probe`, each
    /// candidate is first checked for having been closed by the server (one non-blocking
    /// read), for requests that could not be retried on another connection.
    pub fn take_raw(&self, probe: bool, now: Instant) -> Option<RawConn> {
        let raw = self.raw.get(worker())?;
        while let Some(idle) = raw.pop() {
            let fresh = now.saturating_duration_since(idle.since) < self.idle_timeout;
            if fresh && !(probe && idle.stream.is_stale()) {
                self.handed_out.reused();
                return Some(RawConn {
                    stream: idle.stream,
                    buf: idle.buf,
                    timer: idle.timer,
                    reused: true,
                    slot: idle.slot,
                });
            }
        }
        None
    }

    /// Opens a new connection, once the server is under its `max_connections`: at the cap,
    /// an idle connection (of any worker) is closed to make room, or else one in use is
    /// waited for, up to `upstream_connect`.
    pub async fn connect_raw(&self, tls: Option<&Connector>) -> Result<RawConn, ConnectError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                self.close_one_idle();
                match self.wait_for_slot(deadline).await {
                    Some(Waited::Slot(slot)) => slot,
                    Some(Waited::HandedOver(conn)) => return Ok(conn),
                    None => {
                        return Err(ConnectError::Busy(
                            self.address,
                            self.max_connections,
                            self.connect_timeout,
                        ));
                    }
                }
            }
        };
        // One deadline for the wait for a slot and the connect together.
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(self.address))
            .await
            .map_err(|_| ConnectError::TimedOut(self.address, self.connect_timeout))?
            .map_err(|e| ConnectError::from_io(self.address, e))?;
        let _ = stream.set_nodelay(true);
        let stream = match tls {
            None => Stream::Plain(stream),
            Some(tls) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let name = tls.name_for(self.address);
                match handshake::connect(stream, tls.config.clone(), name, left).await {
                    Ok(session) => Stream::from(session),
                    Err(HandshakeError::TimedOut(_)) => {
                        return Err(ConnectError::TimedOut(self.address, self.connect_timeout));
                    }
                    Err(e) => return Err(ConnectError::Tls(self.address, e.to_string())),
                }
            }
        };
        self.handed_out.opened();
        Ok(RawConn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            timer: WaitTimer::default(),
            reused: false,
            slot,
        })
    }

    /// Opens a plain TCP connection for an L4 tunnel, under the same `max_connections` and
    /// `upstream_connect` timeout as [`Pool::connect_raw`], but with no read buffer (the
    /// relay brings its own) and never from the pool: a pooled connection has spoken HTTP.
    /// At the cap, an idle pooled connection is closed to make room, or else one is
    /// waited for.
    pub async fn connect_tunnel(&self) -> Result<(TcpStream, TunnelSlot), ConnectError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                self.close_one_idle();
                // Counted among the waiters, so that HTTP exchanges ending meanwhile close
                // their connections rather than pool them, and free a slot.
                let _waiting = Waiting(&self.waiting);
                self.waiting.fetch_add(1, Ordering::Relaxed);
                match tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned()).await {
                    Ok(Ok(slot)) => slot,
                    _ => {
                        return Err(ConnectError::Busy(
                            self.address,
                            self.max_connections,
                            self.connect_timeout,
                        ));
                    }
                }
            }
        };
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(self.address))
            .await
            .map_err(|_| ConnectError::TimedOut(self.address, self.connect_timeout))?
            .map_err(|e| ConnectError::from_io(self.address, e))?;
        // No TCP_NODELAY here: the relay sets it on both sides of a tunnel.
        self.handed_out.opened();
        Ok((stream, TunnelSlot { _permit: slot }))
    }

    /// Waits until `deadline` for a slot to open a connection in, or for a connection that
    /// a request on this worker finished with and handed over.
    async fn wait_for_slot(&self, deadline: tokio::time::Instant) -> Option<Waited> {
        let _waiting = Waiting(&self.waiting);
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let here = self.waiting_here.get(worker());
        let _waiting_here = here.map(|(count, _)| {
            count.fetch_add(1, Ordering::Relaxed);
            Waiting(count)
        });
        let slot = self.slots.clone().acquire_owned();
        tokio::pin!(slot);
        loop {
            let handed_over = async {
                match here {
                    Some((_, notify)) => notify.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                slot = &mut slot => return slot.ok().map(Waited::Slot),
                () = handed_over => {
                    // Another request on this worker may have taken it first: then wait on.
                    if let Some(conn) = self.take_raw(false, Instant::now()) {
                        return Some(Waited::HandedOver(conn));
                    }
                }
                () = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Closes one idle connection, this worker's first, to free its slot.
    fn close_one_idle(&self) {
        let own = worker();
        let others = (0..self.raw.len()).filter(|&w| w != own);
        for queue in std::iter::once(own)
            .chain(others)
            .filter_map(|w| self.raw.get(w))
        {
            // Dropped here even if another worker's: closing a socket needs no event loop.
            if queue.pop().is_some() {
                return;
            }
        }
    }

    /// Closes this worker's idle connections that the server has closed (or that sent
    /// bytes unasked) or that outlived `pool_idle_timeout`, so that none sits half-closed
    /// until it is next taken.
    pub fn sweep(&self) {
        let Some(raw) = self.raw.get(worker()) else {
            return;
        };
        for _ in 0..raw.len() {
            let Some(idle) = raw.pop() else { break };
            if idle.since.elapsed() < self.idle_timeout && !idle.stream.is_stale() {
                let _ = raw.push(idle);
            }
        }
    }

    /// Returns a connection whose last response was read completely (at `done`) and which
    /// holds no unread bytes.
    pub fn put_raw(&self, conn: RawConn, done: Instant) {
        let own = worker();
        let (Some(raw), Some((waiting_here, handed_over))) =
            (self.raw.get(own), self.waiting_here.get(own))
        else {
            return;
        };
        if !conn.buf.is_empty() {
            return;
        }
        let hand_over = waiting_here.load(Ordering::Relaxed) > 0;
        // Waiters only on other workers: closing frees the slot for them.
        if !hand_over && self.waiting.load(Ordering::Relaxed) > 0 {
            return;
        }
        let mut timer = conn.timer;
        timer.forget_task();
        let pushed = raw.push(RawIdle {
            stream: conn.stream,
            buf: conn.buf,
            timer,
            since: done,
            slot: conn.slot,
        });
        if hand_over && pushed.is_ok() {
            handed_over.notify_one();
        }
    }
}

/// What a wait for room under `max_connections` brought.
enum Waited {
    Slot(OwnedSemaphorePermit),
    HandedOver(RawConn),
}

/// Counts a request among those waiting until it stops, however it stops.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
