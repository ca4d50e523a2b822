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
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::http1::io::read_some;
use crate::proxy::ClientConn;
use crate::runtime::Shared;
use crate::server::stopping;
use crate::transport::Stream;

/// What every HTTP/2 connection starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long a new connection asked to finish before its first request (its TLS handshake
/// or first bytes still on the way) may go on: a client that connected just before a
/// shutdown or a switchover's pause has its request served; a silent one goes.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Serves requests on `tcp` until the client leaves, a timeout ends it, or shutdown is
/// signalled, in which case requests in flight finish first. From a proxy listed in the
/// listener's `proxy_protocol_from`, a PROXY header comes first and names the client. On a
/// TLS listener the handshake comes next, and ALPN, when the client offers it, names the
/// protocol.
pub async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    listener: usize,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let runtime = shared.load();
    // Accepted just as a reload removed the listener: it is closing.
    let Some(index) = runtime.listener_index(listener) else {
        return;
    };
    let tls = runtime.listeners[index]
        .tls
        .as_ref()
        .map(|tls| tls.config.clone());
    let timeouts = &runtime.config.timeouts;
    let (header_limit, handshake_limit) = (timeouts.client_header, timeouts.tls_handshake);
    let trusted = &runtime.config.listeners[index].proxy_protocol_from;
    // Only a proxy in front may say who the client is; from anyone else a header is not
    // read, and fails as HTTP (400) or as TLS would.
    let proxied = !trusted.is_empty() && crate::proxy_protocol::is_trusted(peer.ip(), trusted);
    drop(runtime);
    let mut peer = peer;
    if proxied {
        match within_grace(proxy_header(&tcp, peer, header_limit), &mut shutdown).await {
            Some(client) => peer = client,
            None => return,
        }
    }
    let mut conn = ClientConn::new(peer, listener);
    let (stream, protocol) = match tls {
        None => (Stream::Plain(tcp), None),
        Some(tls) => {
            let handshake = accept_tls(tcp, tls, &mut conn, handshake_limit);
            match within_grace(handshake, &mut shutdown).await {
                Some(accepted) => accepted,
                None => return,
            }
        }
    };
    let mut buf = BytesMut::new();
    let protocol = match protocol {
        Some(protocol) => protocol,
        None => match within_grace(sniff(&stream, &mut buf, header_limit), &mut shutdown).await {
            Some(protocol) => protocol,
            None => return,
        },
    };
    match protocol {
        // Boxed: HTTP/2's connection state is large and rare; kept inline it would grow
        // every HTTP/1.1 connection's future too.
        Protocol::H2 => Box::pin(h2::serve(stream, buf, conn, shared, shutdown)).await,
        Protocol::Http1 => h1::serve(stream, buf, conn, shared, shutdown).await,
    }
}

enum Protocol {
    Http1,
    H2,
}

/// The client a trusted proxy's PROXY header names, read within `limit` before anything
/// else on the connection (TLS included); the proxy's own address for a header that names
/// none (its health check). `None`: no valid header came, and the connection is closed.
async fn proxy_header(tcp: &TcpStream, proxy: SocketAddr, limit: Duration) -> Option<SocketAddr> {
    match crate::proxy_protocol::read_header(tcp, limit).await {
        Ok(Some(addresses)) => Some(addresses.source),
        Ok(None) => Some(proxy),
        Err(e) => {
            tracing::info!(peer = %proxy, error = %e, "connection closed: no valid PROXY protocol header from a proxy in proxy_protocol_from");
            None
        }
    }
}

/// The TLS handshake of a new connection within `limit`: the session, the protocol ALPN
/// chose (if the client offered any), and in `conn` what the client's certificate says.
async fn accept_tls(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    conn: &mut ClientConn,
    limit: Duration,
) -> Option<(Stream, Option<Protocol>)> {
    let session = crate::tls::handshake::accept(tcp, tls, conn.peer, limit).await?;
    let (protocol, client) = session.session(|s| {
        let protocol = match s.alpn_protocol() {
            Some(b"h2") => Some(Protocol::H2),
            Some(_) => Some(Protocol::Http1),
            None => None,
        };
        let client = s
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(crate::tls::client_cert::identify);
        (protocol, client)
    });
    conn.https = true;
    if let Some(client) = client {
        conn.client_cert = Some(client.header);
        conn.client_names = client.names;
    }
    Some((Stream::from(session), protocol))
}

/// `first_step` of a new connection, given at most [`FIRST_REQUEST_GRACE`] more once
/// `shutdown` asks the connection to finish.
async fn within_grace<T>(
    first_step: impl Future<Output = Option<T>>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<T> {
    tokio::pin!(first_step);
    tokio::select! {
        biased;
        done = &mut first_step => return done,
        _ = stopping(shutdown) => {}
    }
    tokio::time::timeout(FIRST_REQUEST_GRACE, first_step)
        .await
        .ok()
        .flatten()
}

/// Tells HTTP/2 with prior knowledge from HTTP/1.1 by the first bytes, read into `buf`
/// within `limit`. `None` if the client sends nothing, or leaves, in time.
async fn sniff(stream: &Stream, buf: &mut BytesMut, limit: Duration) -> Option<Protocol> {
    // One deadline for the first bytes, however they trickle in.
    let deadline = Instant::now() + limit;
    // Read until the bytes either stop matching the HTTP/2 preface or match all of it.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match read_some(stream, buf, left).await {
            Ok(n) if n > 0 => {}
            _ => return None,
        }
        let seen = buf.len().min(H2_PREFACE.len());
        if buf[..seen] != H2_PREFACE[..seen] {
            return Some(Protocol::Http1);
        }
        if seen == H2_PREFACE.len() {
            return Some(Protocol::H2);
        }
    }
}
