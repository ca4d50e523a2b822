//! TLS handshakes on a new connection, as the server (a client of a TLS listener) or as
//! the client (to a server of an upstream with TLS), each bounded by one deadline.
//!
//! Driven here rather than through tokio-rustls's streams because what follows reads and
//! writes the session through a shared reference ([`TlsStream`]); a failure is logged with
//! what the session knew (the client's SNI), which a finished stream no longer offers.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::stream::{Socket, TlsStream};

/// Why a handshake did not finish.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake not finished within {0:?}")]
    TimedOut(Duration),
    #[error("peer closed the connection during the TLS handshake")]
    Closed,
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Completes the server side of a handshake within `limit`. On failure the alert rustls
/// chose (protocol version, no certificate for the name, bad client certificate...) has
/// been sent, and the failure is logged with the client's address and SNI.
pub async fn accept(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    peer: SocketAddr,
    limit: Duration,
) -> Option<TlsStream> {
    let mut session: rustls::Connection = match rustls::ServerConnection::new(config) {
        Ok(session) => session.into(),
        Err(e) => {
            tracing::error!(client = %peer, error = %e, "cannot start a TLS session");
            return None;
        }
    };
    match drive(&tcp, &mut session, limit).await {
        Ok(()) => Some(TlsStream::new(tcp, session)),
        Err(e) => {
            let sni = match &session {
                rustls::Connection::Server(server) => server.server_name(),
                rustls::Connection::Client(_) => None,
            }
            .unwrap_or("-");
            match e {
                // A port scan or a client giving up: not worth a line each by default.
                HandshakeError::Closed | HandshakeError::Io(_) => {
                    tracing::debug!(client = %peer, sni, reason = %e, "TLS handshake failed")
                }
                _ => tracing::info!(client = %peer, sni, reason = %e, "TLS handshake failed"),
            }
            None
        }
    }
}

/// Completes the client side of a handshake with a server, within `limit`.
pub async fn connect(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
    limit: Duration,
) -> Result<TlsStream, HandshakeError> {
    let mut session: rustls::Connection = rustls::ClientConnection::new(config, name)?.into();
    drive(&tcp, &mut session, limit).await?;
    Ok(TlsStream::new(tcp, session))
}

/// Exchanges handshake messages until the session is established, then sends what the
/// session still has queued (a server's tickets), all within `limit`.
async fn drive(
    tcp: &TcpStream,
    session: &mut rustls::Connection,
    limit: Duration,
) -> Result<(), HandshakeError> {
    let exchange = async {
        loop {
            while session.wants_write() {
                match session.write_tls(&mut Socket(tcp)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => tcp.writable().await?,
                    Err(e) => return Err(e.into()),
                }
            }
            if !session.is_handshaking() {
                return Ok(());
            }
            match session.read_tls(&mut Socket(tcp)) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) => {
                    if let Err(e) = session.process_new_packets() {
                        // Best effort: the alert explains the refusal to the peer.
                        let _ = session.write_tls(&mut Socket(tcp));
                        return Err(e.into());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => tcp.readable().await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(result) => result,
        Err(_) => Err(HandshakeError::TimedOut(limit)),
    }
}
