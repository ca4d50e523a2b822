//! The client side of HTTP: serving one accepted connection (HTTP/1.1 or HTTP/2 with prior
//! knowledge, told apart by the connection preface), header hygiene and request checks.

pub mod headers;
pub mod validate;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::idle_timeout::IdleTimeout;
use crate::proxy::{self, ClientConn};
use crate::runtime::Shared;
use crate::server::stopping;

/// Serves requests on `stream` until the client leaves, a timeout ends it, or shutdown is
/// signalled, in which case requests in flight finish first.
pub async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    listener: usize,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let runtime = shared.load();
    let io = TokioIo::new(IdleTimeout::new(
        stream,
        runtime.config.timeouts.client_idle,
    ));
    let client = Arc::new(ClientConn { peer, listener });
    let service = service_fn(move |req| {
        let client = client.clone();
        let runtime = shared.load();
        async move { Ok::<_, Infallible>(proxy::handle(req, &client, runtime).await) }
    });
    let conn = runtime.http.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stopping(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}
