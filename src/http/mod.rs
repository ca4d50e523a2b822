//! The client side of HTTP: telling an HTTP/1.1 connection from an HTTP/2 one (prior
//! knowledge) by its first bytes and handing it to the matching path, plus the header
//! hygiene and request checks both paths share.

pub mod headers;
mod prefixed;
pub mod validate;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::http1::io::read_some;
use crate::idle_timeout::IdleTimeout;
use crate::proxy::{self, ClientConn};
use crate::runtime::Shared;
use crate::server::stopping;
use prefixed::Prefixed;

/// What every HTTP/2 connection starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves requests on `stream` until the client leaves, a timeout ends it, or shutdown is
/// signalled, in which case requests in flight finish first.
pub async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    listener: usize,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let runtime = shared.load();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    // Read until the bytes either stop matching the HTTP/2 preface or match all of it.
    let is_h2 = loop {
        tokio::select! {
            biased;
            read = read_some(&stream, &mut buf, runtime.config.timeouts.client_header) => match read {
                Ok(n) if n > 0 => {}
                _ => return,
            },
            _ = stopping(&mut shutdown) => return,
        }
        let seen = buf.len().min(H2_PREFACE.len());
        if buf[..seen] != H2_PREFACE[..seen] {
            break false;
        }
        if seen == H2_PREFACE.len() {
            break true;
        }
    };
    drop(runtime);
    if is_h2 {
        // Boxed: HTTP/2's connection state is large and rare; kept inline it would grow every
        // HTTP/1.1 connection's future too.
        Box::pin(serve_h2(stream, buf, peer, listener, shared, shutdown)).await;
    } else {
        proxy::h1::serve(stream, buf, peer, listener, shared, shutdown).await;
    }
}

/// Serves an HTTP/2 connection whose first bytes (the preface) are in `read`.
async fn serve_h2(
    stream: TcpStream,
    read: BytesMut,
    peer: SocketAddr,
    listener: usize,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let runtime = shared.load();
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(IdleTimeout::new(
        Prefixed::new(read.freeze(), stream),
        runtime.config.timeouts.client_idle,
    ));
    let client = Arc::new(ClientConn { peer, listener });
    let service = service_fn(move |req| {
        let client = client.clone();
        let runtime = shared.load();
        async move { Ok::<_, Infallible>(proxy::h2::handle(req, &client, runtime).await) }
    });
    let conn = runtime.http2.serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        biased;
        result = conn.as_mut() => result,
        _ = stopping(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HTTP/2 client connection ended with an error");
    }
}
