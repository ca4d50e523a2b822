//! A running Fulcrum: listeners bound, accept loops started, and the graceful shutdown that
//! stops accepting, lets requests in flight finish, and waits at most the grace period.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::Config;
use crate::listener::{self, Listener};
use crate::runtime::{Runtime, Shared};

pub struct Server {
    shared: Arc<Shared>,
    local_addrs: Vec<SocketAddr>,
    /// Per listener, with the number of permits it started with.
    connection_limits: Vec<(Arc<Semaphore>, u32)>,
    shutdown: watch::Sender<bool>,
}

impl Server {
    /// Binds every listener of `config` and starts serving. Fails without serving anything
    /// if any listener cannot be bound.
    pub async fn start(config: Config) -> io::Result<Server> {
        let mut sockets = Vec::new();
        for l in &config.listeners {
            let socket = bind(l.bind).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("listener `{}` cannot bind {}: {e}", l.name, l.bind),
                )
            })?;
            sockets.push((socket, l.max_connections));
        }
        let shared = Arc::new(Shared::new(Runtime::build(config)));
        let (shutdown, _) = watch::channel(false);
        let mut local_addrs = Vec::new();
        let mut connection_limits = Vec::new();
        for (index, (socket, max)) in sockets.into_iter().enumerate() {
            local_addrs.push(socket.local_addr()?);
            let permits = u32::try_from(max).unwrap_or(u32::MAX);
            let connections = Arc::new(Semaphore::new(permits as usize));
            connection_limits.push((connections.clone(), permits));
            let listener = Listener {
                socket,
                index,
                connections,
            };
            tokio::spawn(listener::accept_loop(
                listener,
                shared.clone(),
                shutdown.subscribe(),
            ));
        }
        for (addr, l) in local_addrs.iter().zip(&shared.load().config.listeners) {
            tracing::info!(listener = %l.name, %addr, "listening");
        }
        Ok(Server {
            shared,
            local_addrs,
            connection_limits,
            shutdown,
        })
    }

    /// The addresses actually bound, in config order (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting, asks every connection to finish its requests in flight and close,
    /// and waits up to `grace`. Returns whether every connection closed in time.
    pub async fn shutdown(self, grace: Duration) -> bool {
        let _ = self.shutdown.send(true);
        let drained = async {
            for (limit, permits) in &self.connection_limits {
                let _ = limit.acquire_many(*permits).await;
            }
        };
        tokio::time::timeout(grace, drained).await.is_ok()
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    // Lets a restarted Fulcrum bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Resolves once shutdown has been signalled (or the server is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}
