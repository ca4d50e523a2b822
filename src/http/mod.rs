//! The client side of HTTP: telling an HTTP/1.1 connection from an HTTP/2 one (prior
//! knowledge) by its first bytes and handing it to that protocol's adapter ([`h1`], [`h2`]),
//! which feeds each request into the phases in `proxy`; plus the header policy and request
//! checks every protocol shares.

pub mod h1;
pub mod h2;
pub mod headers;
mod prefixed;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::http1::io::read_some;
use crate::runtime::Shared;
use crate::server::stopping;

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
    // One deadline for the first bytes, however they trickle in.
    let deadline = Instant::now() + runtime.config.timeouts.client_header;
    drop(runtime);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    // Read until the bytes either stop matching the HTTP/2 preface or match all of it.
    let is_h2 = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            biased;
            read = read_some(&stream, &mut buf, left) => match read {
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
    if is_h2 {
        // Boxed: HTTP/2's connection state is large and rare; kept inline it would grow every
        // HTTP/1.1 connection's future too.
        Box::pin(h2::serve(stream, buf, peer, listener, shared, shutdown)).await;
    } else {
        h1::serve(stream, buf, peer, listener, shared, shutdown).await;
    }
}
