//! TLS: certificates loaded and checked, chosen per client by SNI, and the transport that
//! carries HTTP/1.1 and HTTP/2 over TLS on either side of the proxy.

pub mod certs;
pub mod client;
pub mod client_cert;
pub mod handshake;
pub mod resolver;
pub mod server;
pub mod stream;
pub mod watch;

use std::sync::{Arc, OnceLock};

/// The cryptography every TLS session uses: rustls' aws-lc-rs provider (AEAD suites only,
/// as rustls offers no others).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}
