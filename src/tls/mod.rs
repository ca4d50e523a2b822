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
/// as rustls offers no others), with the suites hashed by SHA-256 preferred to those hashed
/// by SHA-384. Both are strong; SHA-256 runs on the CPU's SHA instructions where SHA-384
/// has none: its SHA-512 compression was a fifth of a TLS worker's CPU under new
/// connections before (measured with perf; the figures are in bench/README.md).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            provider.cipher_suites.sort_by_key(|suite| {
                let common = match suite {
                    rustls::SupportedCipherSuite::Tls13(s) => &s.common,
                    rustls::SupportedCipherSuite::Tls12(s) => &s.common,
                };
                common.hash_provider.algorithm() != rustls::crypto::hash::HashAlgorithm::SHA256
            });
            Arc::new(provider)
        })
        .clone()
}
