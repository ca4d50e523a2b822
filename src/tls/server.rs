//! A TLS listener's running settings, built from its validated config: versions, ALPN,
//! the certificate resolver, client certificate checks, and session resumption (a ticket
//! key that rotates, and a bounded cache), which a reload hands on so returning clients
//! still resume.

use std::sync::Arc;

use rustls::server::{NoServerSessionStorage, ServerSessionMemoryCache, WebPkiClientVerifier};

use super::resolver::{CertStore, Resolver};
use crate::config::{ClientAuth, ListenerTls, TlsVersion};

pub struct TlsListener {
    pub config: Arc<rustls::ServerConfig>,
    /// Swapped in place when certificate files change on disk.
    pub resolver: Arc<Resolver>,
}

impl TlsListener {
    /// `previous`: the same listener before a reload, with the config it was built from;
    /// its ticket keys carry over, and its session cache if the cache's size is unchanged.
    /// Nothing of `previous` is changed: a reload that fails leaves it serving as it was.
    pub fn build(
        tls: &ListenerTls,
        previous: Option<(&TlsListener, &ListenerTls)>,
    ) -> Result<TlsListener, String> {
        let provider = super::provider();
        let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| format!("TLS versions: {e}"))?;
        let builder = match &tls.client_auth {
            ClientAuth::Off => builder.with_no_client_auth(),
            ClientAuth::Optional(ca) | ClientAuth::Required(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in ca.certificates.iter() {
                    roots
                        .add(cert.clone())
                        .map_err(|e| format!("client_ca {}: {e}", ca.path.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                let verifier = if matches!(tls.client_auth, ClientAuth::Optional(_)) {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .map_err(|e| format!("client_ca {}: {e}", ca.path.display()))?,
                )
            }
        };
        let store = CertStore::new(tls.certificates.iter().map(|c| c.loaded.clone()).collect());
        let resolver = Arc::new(Resolver::new(store));
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = tls.alpn.clone();
        // The provider's order of suites, not the client's: most clients list AES-256
        // first, which costs more here for no strength that matters (see `provider`).
        config.ignore_client_order = true;
        // A resumed session keeps the client certificate (or its absence) it was made
        // with, unchecked: sessions made under other client-auth settings must not resume.
        let previous =
            previous.filter(|(_, was)| same_client_auth(&was.client_auth, &tls.client_auth));
        let before = previous.map(|(p, _)| &p.config);
        config.session_storage = match previous {
            _ if tls.session_cache == 0 => Arc::new(NoServerSessionStorage {}),
            Some((p, was)) if was.session_cache == tls.session_cache => {
                p.config.session_storage.clone()
            }
            _ => ServerSessionMemoryCache::new(tls.session_cache),
        };
        if tls.session_tickets {
            config.ticketer = match before {
                Some(before) if before.ticketer.enabled() => before.ticketer.clone(),
                // Rotates its key every few hours, keeping the previous one to decrypt.
                _ => rustls::crypto::aws_lc_rs::Ticketer::new()
                    .map_err(|e| format!("cannot make a session ticket key: {e}"))?,
            };
        }
        Ok(TlsListener {
            config: Arc::new(config),
            resolver,
        })
    }
}

/// Whether two client-auth settings accept exactly the same clients.
fn same_client_auth(a: &ClientAuth, b: &ClientAuth) -> bool {
    match (a, b) {
        (ClientAuth::Off, ClientAuth::Off) => true,
        (ClientAuth::Optional(a), ClientAuth::Optional(b))
        | (ClientAuth::Required(a), ClientAuth::Required(b)) => a.certificates == b.certificates,
        _ => false,
    }
}
