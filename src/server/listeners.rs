//! The listeners a server runs: each listener's sockets (one per worker, `SO_REUSEPORT`),
//! its accept loops on every worker, its connection limit and its own stop, so that a
//! reload can add, remove or change one listener without touching the others.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, watch};

use crate::config::ListenerConfig;
use crate::listener::{self, Listener};
use crate::runtime::Shared;

/// The listeners running, and those removed whose connections are still finishing.
#[derive(Default)]
pub(super) struct ListenerSet {
    pub running: Vec<Running>,
    pub draining: Vec<Draining>,
}

impl ListenerSet {
    /// Takes out the running listeners whose slot is not in `slots`.
    pub fn retire_all_but(&mut self, slots: &[usize]) -> Vec<Running> {
        let (kept, removed) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| slots.contains(&r.slot));
        self.running = kept;
        removed
    }
}

/// A listener's sockets, bound (or handed over) and not yet accepting.
pub(super) struct Opened {
    pub name: String,
    /// As configured (port 0 stays 0), which a handover matches on.
    bind: SocketAddr,
    pub slot: usize,
    max_connections: usize,
    /// At least one per worker.
    sockets: Vec<std::net::TcpListener>,
}

/// Binds listener `l` with a socket for each of `workers`, taking `handed` sockets (from
/// the process this one took over from) first. A listener that cannot be bound fails with
/// its name, and the sockets bound for it so far are closed.
pub(super) fn open(
    l: &ListenerConfig,
    slot: usize,
    client_header: Duration,
    workers: usize,
    handed: Option<Vec<std::net::TcpListener>>,
) -> io::Result<Opened> {
    let defer = l.defer_accept.then_some(client_header);
    let named = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("listener `{}` cannot bind {}: {e}", l.name, l.bind),
        )
    };
    let sockets = match handed {
        Some(mut sockets) if !sockets.is_empty() => {
            // The old process may have run fewer workers: the extra workers accept from
            // copies of the handed sockets. A socket bound beside them would get its share
            // of new connections at once, before this process is ready, and reset them all
            // if it then failed to start.
            let handed_count = sockets.len();
            for i in 0..workers.saturating_sub(handed_count) {
                let copy = sockets[i % handed_count].try_clone()?;
                sockets.push(copy);
            }
            for socket in &sockets {
                socket.set_nonblocking(true)?;
                // The new config's, whatever the old process had.
                set_defer_accept(&socket2::SockRef::from(socket), defer)?;
            }
            sockets
        }
        _ => bind_each(l.bind, defer, workers).map_err(named)?,
    };
    let addr = sockets[0].local_addr()?;
    tracing::info!(listener = %l.name, %addr, "listening");
    Ok(Opened {
        name: l.name.clone(),
        bind: l.bind,
        slot,
        max_connections: l.max_connections,
        sockets,
    })
}

impl Opened {
    /// Starts an accept loop for each socket, spread over `workers` (a worker takes
    /// several when there are more sockets than workers), each once `ready` is true.
    pub fn start(
        self,
        workers: &[Handle],
        shared: &Arc<Shared>,
        ready: Option<watch::Receiver<bool>>,
    ) -> Running {
        let permits = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        let connections = Arc::new(Semaphore::new(permits as usize));
        let (stop, _) = watch::channel(false);
        let addr = self
            .sockets
            .first()
            .and_then(|s| s.local_addr().ok())
            .unwrap_or(self.bind);
        let accept_loops = self.sockets.len();
        let mut copies = Vec::new();
        for (i, socket) in self.sockets.into_iter().enumerate() {
            match socket.try_clone() {
                Ok(copy) => copies.push(copy),
                Err(e) => {
                    tracing::warn!(listener = %self.name, error = %e, "cannot keep a copy of a socket for a handover")
                }
            }
            let (shared, stop, connections) =
                (shared.clone(), stop.subscribe(), connections.clone());
            let mut ready = ready.clone();
            let slot = self.slot;
            workers[i % workers.len()].spawn(async move {
                if let Some(ready) = ready.as_mut() {
                    let _ = ready.wait_for(|&r| r).await;
                }
                let socket = match TcpListener::from_std(socket) {
                    Ok(socket) => socket,
                    Err(e) => {
                        tracing::error!(error = %e, "a bound listener cannot register with its worker");
                        return;
                    }
                };
                listener::accept_loop(
                    Listener {
                        socket,
                        slot,
                        connections,
                    },
                    shared,
                    stop,
                )
                .await
            });
        }
        Running {
            name: self.name,
            bind: self.bind,
            slot: self.slot,
            addr,
            accept_loops,
            sockets: copies,
            connections,
            permits,
            stop,
        }
    }
}

/// A listener accepting on every worker.
pub(super) struct Running {
    pub name: String,
    bind: SocketAddr,
    pub slot: usize,
    /// Where it is bound.
    pub addr: SocketAddr,
    /// Copies of the sockets its loops accept on, which a handover passes on.
    sockets: Vec<std::net::TcpListener>,
    /// One permit per open connection (and per accept loop waiting for one).
    connections: Arc<Semaphore>,
    /// The permits `connections` has in all: `max_connections`.
    permits: u32,
    accept_loops: usize,
    /// Stops its accept loops and asks its connections to finish and close.
    stop: watch::Sender<bool>,
}

impl Running {
    /// What the admin API shows of it.
    pub fn info(&self) -> crate::admin::ListenerInfo {
        crate::admin::ListenerInfo {
            addr: self.addr,
            connections: self.connections.clone(),
            permits: self.permits,
            accept_loops: self.accept_loops,
        }
    }

    /// Applies a new `max_connections`: a raise at once; a cut takes back free permits now
    /// and the rest as connections close, so no open connection is cut.
    pub fn set_max_connections(&mut self, max: usize) {
        let new = u32::try_from(max).unwrap_or(u32::MAX);
        if new > self.permits {
            self.connections.add_permits((new - self.permits) as usize);
        } else if new < self.permits {
            let cut = (self.permits - new) as usize;
            let now = self.connections.forget_permits(cut);
            if now < cut {
                let connections = self.connections.clone();
                let rest = u32::try_from(cut - now).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(permits) = connections.acquire_many(rest).await {
                        permits.forget();
                    }
                });
            }
        }
        self.permits = new;
    }

    /// Applies a new `defer_accept` to its sockets, which accept on without a gap.
    pub fn set_defer_accept(&self, defer: Option<Duration>) -> io::Result<()> {
        for socket in &self.sockets {
            set_defer_accept(&socket2::SockRef::from(socket), defer)?;
        }
        Ok(())
    }

    /// Duplicates of its sockets, with what a new process matches them on.
    pub fn hand_over(&self) -> io::Result<HandedListener> {
        Ok(HandedListener {
            name: self.name.clone(),
            bind: self.bind,
            sockets: self
                .sockets
                .iter()
                .map(|s| s.try_clone())
                .collect::<io::Result<_>>()?,
        })
    }

    /// Stops accepting (its sockets close once the accept loops have seen the stop) and
    /// tells its connections to finish and close.
    pub fn close(self) -> Draining {
        let _ = self.stop.send(true);
        Draining {
            connections: self.connections,
            permits: self.permits,
        }
    }
}

/// A listener no longer accepting, whose connections are finishing.
pub(super) struct Draining {
    connections: Arc<Semaphore>,
    permits: u32,
}

impl Draining {
    pub fn is_done(&self) -> bool {
        self.connections.available_permits() >= self.permits as usize
    }

    /// Resolves once every connection has closed.
    pub async fn closed(&self) {
        let _ = self.connections.acquire_many(self.permits).await;
    }
}

/// What a running process hands a new one (`crate::upgrade`): every listening socket,
/// the admin listener's, and the sticky-session key.
pub struct Handover {
    pub listeners: Vec<HandedListener>,
    /// The admin listener's configured bind and socket.
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
    pub sticky_key: [u8; 16],
}

/// A listener's sockets, with the name and configured bind the new process matches on.
pub struct HandedListener {
    pub name: String,
    pub bind: SocketAddr,
    pub sockets: Vec<std::net::TcpListener>,
}

/// `count` listening sockets on `addr` (its port chosen once if it is 0), one per worker.
///
/// `SO_REUSEPORT` would also let another process bind the same address and silently take
/// a share of its connections, so the address is first bound without it, which fails if
/// anything listens there already, and let go just before the worker sockets take it.
fn bind_each(
    addr: SocketAddr,
    defer_accept: Option<Duration>,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let probe = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    probe.set_reuse_address(true)?;
    // Bound, never listening: no connection can land on it.
    probe.bind(&addr.into())?;
    let addr = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("a bound socket without an address"))?;
    drop(probe);
    (0..count.max(1))
        .map(|_| bind(addr, defer_accept))
        .collect()
}

/// A listening socket. With `defer_accept`, the kernel hands over a connection only once its
/// first bytes have arrived (or `defer_accept` has passed): a connecting client that sends
/// nothing costs no wakeup, and the first read finds the request there.
fn bind(addr: SocketAddr, defer_accept: Option<Duration>) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    // Lets a restarted Fulcrum bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if defer_accept.is_some() {
        set_defer_accept(&socket, defer_accept)?;
    }
    socket.listen(4096)?;
    Ok(socket.into())
}

#[cfg(target_os = "linux")]
fn set_defer_accept(socket: &socket2::Socket, wait: Option<Duration>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // 0 turns it off.
    let seconds = wait.map_or(0, |wait| {
        libc::c_int::try_from(wait.as_secs().max(1)).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_defer_accept(_socket: &socket2::Socket, _wait: Option<Duration>) -> io::Result<()> {
    Ok(())
}
