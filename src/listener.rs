//! Accepting connections: one loop per listener, bounded by its connection limit, backing
//! off when `accept` fails (out of file descriptors, say) instead of spinning, and handing
//! each connection to what the listener speaks: HTTP, or TCP relayed whole.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::ListenerMode;
use crate::http::serve_connection;
use crate::runtime::Shared;
use crate::server::stopping;

/// A bound listener and what its accept loop needs.
pub struct Listener {
    pub socket: TcpListener,
    /// The listener's slot (`crate::runtime::ListenerRuntime::slot`).
    pub slot: usize,
    /// One permit per open connection; a connection task holds its permit until it ends, so
    /// holding all permits means every connection is gone.
    pub connections: Arc<Semaphore>,
    /// Asks its connections to finish what is in flight and close. Each connection holds a
    /// receiver of its own until it closes or becomes a tunnel (a WebSocket, which no such
    /// request ends), so the receivers count the connections a drain waits for.
    pub finish: Arc<watch::Sender<bool>>,
}

/// Accepts until `stop` (shutdown, or a reload removing the listener) is signalled, then
/// drops the socket so no more clients connect. Asking the connections to finish is the
/// listener's `finish`, apart, so that a planned HA switchover can drain them while the
/// loop still takes what is in the accept queue.
pub async fn accept_loop(listener: Listener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(5);
    // Tells the listener's mode without touching a shared count unless a reload happened.
    let mut runtime = shared.cache();
    loop {
        let permit = tokio::select! {
            biased;
            permit = listener.connections.clone().acquire_owned() => permit.expect("the connection semaphore is never closed"),
            _ = stopping(&mut stop) => return,
        };
        let accepted = tokio::select! {
            biased;
            accepted = listener.socket.accept() => accepted,
            _ = stopping(&mut stop) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let (shared, finish) = (shared.clone(), listener.finish.subscribe());
                let slot = listener.slot;
                let tcp = matches!(
                    runtime.load().listener_config(slot).map(|l| &l.mode),
                    Some(ListenerMode::Tcp(_))
                );
                // Boxed: a connection's future is several KiB, which tokio would otherwise copy
                // a few times on the way into its task (measured: ~6k instructions each).
                if tcp {
                    tokio::spawn(Box::pin(async move {
                        crate::l4::tcp::serve(stream, peer, slot, shared, finish).await;
                        drop(permit);
                    }));
                } else {
                    tokio::spawn(Box::pin(async move {
                        serve_connection(stream, peer, slot, shared, finish).await;
                        drop(permit);
                    }));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
