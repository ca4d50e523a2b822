//! TLS from Fulcrum to an upstream's servers: the client settings built once per upstream
//! from its config (the CA to trust, the name to check, a certificate to show), and the
//! name each connection is checked against.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::UpstreamTls;

/// How an upstream's connections become TLS.
#[derive(Debug)]
pub struct Connector {
    pub config: Arc<rustls::ClientConfig>,
    /// The configured `server_name`; without one, each server's IP address is checked
    /// (and no SNI is sent, as for any IP address).
    name: Option<ServerName<'static>>,
}

impl Connector {
    pub fn build(tls: &UpstreamTls) -> Result<Connector, String> {
        let provider = super::provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?;
        let builder = if tls.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
        } else {
            let mut roots = rustls::RootCertStore::empty();
            match &tls.ca {
                Some(ca) => {
                    for cert in ca.certificates.iter() {
                        roots
                            .add(cert.clone())
                            .map_err(|e| format!("ca {}: {e}", ca.path.display()))?;
                    }
                }
                None => {
                    roots.add_parsable_certificates(system_roots().iter().cloned());
                    if roots.is_empty() {
                        return Err("no trusted roots found on this system (install ca-certificates) and no ca given".into());
                    }
                }
            }
            builder.with_root_certificates(roots)
        };
        let mut config = match &tls.client_cert {
            Some(cert) => builder
                .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
                .map_err(|e| format!("client certificate: {e}"))?,
            None => builder.with_no_client_auth(),
        };
        // Servers are spoken to in HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = match &tls.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|e| format!("server_name `{name}`: {e}"))?,
            ),
            None => None,
        };
        Ok(Connector {
            config: Arc::new(config),
            name,
        })
    }

    /// The name `server`'s certificate must carry.
    pub fn name_for(&self, server: SocketAddr) -> ServerName<'static> {
        self.name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(server.ip().into()))
    }
}

/// The system's trusted roots, read once.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "a system root certificate could not be read");
        }
        found.certs
    })
}

/// `insecure_skip_verify`: any certificate is accepted. Signatures are still checked, so
/// the session is encrypted to whoever holds the key of the certificate shown, whoever
/// that is.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
