//! Certificates made for a test (a CA and what it signs, written as PEM files in a temp
//! dir), and a rustls client to speak HTTPS to Fulcrum with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::TempDir;

/// A test CA and the directory its files go in.
pub struct Pki {
    pub dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    pub ca_pem: PathBuf,
    pub ca_key: PathBuf,
}

/// A certificate chain and key, as files.
#[derive(Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Copy)]
pub enum Key {
    Ecdsa,
    Rsa,
}

impl Pki {
    pub fn new() -> Pki {
        Pki::named("Fulcrum Test CA")
    }

    pub fn named(name: &str) -> Pki {
        let dir = TempDir::new();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let key_pem = key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(params, key).unwrap();
        let ca_pem = dir.0.join(format!("ca-{}.pem", name.replace(' ', "-")));
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        let ca_key = dir.0.join(format!("ca-{}.key", name.replace(' ', "-")));
        std::fs::write(&ca_key, key_pem).unwrap();
        Pki {
            dir,
            ca,
            ca_pem,
            ca_key,
        }
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A server certificate for `names` (DNS names or IP addresses), chain = leaf + CA.
    pub fn server(&self, file: &str, names: &[&str], key: Key) -> Issued {
        self.issue(
            file,
            names,
            key,
            ExtendedKeyUsagePurpose::ServerAuth,
            |_| {},
        )
    }

    /// A client certificate whose subject is `CN=name`.
    pub fn client(&self, file: &str, name: &str) -> Issued {
        self.issue(
            file,
            &[name],
            Key::Ecdsa,
            ExtendedKeyUsagePurpose::ClientAuth,
            |_| {},
        )
    }

    pub fn issue(
        &self,
        file: &str,
        names: &[&str],
        key: Key,
        usage: ExtendedKeyUsagePurpose,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].clone());
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        adjust(&mut params);
        let pair = match key {
            Key::Ecdsa => KeyPair::generate().unwrap(),
            // rcgen cannot make RSA keys itself; aws-lc-rs can.
            Key::Rsa => {
                use aws_lc_rs::encoding::AsDer;
                let rsa =
                    aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
                let der = rsa.as_der().unwrap();
                KeyPair::from_pkcs8_der_and_sign_algo(
                    &der.as_ref().to_vec().into(),
                    &rcgen::PKCS_RSA_SHA256,
                )
                .unwrap()
            }
        };
        let cert = params.signed_by(&pair, &self.ca).unwrap();
        let issued = Issued {
            cert: self.dir.0.join(format!("{file}.pem")),
            key: self.dir.0.join(format!("{file}.key")),
        };
        std::fs::write(&issued.cert, format!("{}{}", cert.pem(), self.ca.pem())).unwrap();
        std::fs::write(&issued.key, pair.serialize_pem()).unwrap();
        issued
    }
}

/// A client trusting `ca`, offering `alpn`.
pub fn client_config(ca: &Pki, alpn: &[&str]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.ca_der()).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config
}

/// A client trusting `ca` that shows `who`'s certificate.
pub fn client_with_cert(ca: &Pki, who: &Issued) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let chain = CertificateDer::pem_file_iter(&who.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&who.key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.ca_der()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

/// Sends `request` as it is and returns all the server sent until it closed (empty if the
/// write failed, as when the server refused the handshake).
pub async fn exchange(stream: &mut TlsStream<TcpStream>, request: &str) -> String {
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A finished TLS handshake with `addr`, sending `sni`.
pub async fn connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// One HTTP/1.1 GET with `Connection: close`, read to the end: the status and body.
pub async fn get(stream: &mut TlsStream<TcpStream>, host: &str, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// The subject CN of the certificate the server showed.
pub fn peer_cn(stream: &TlsStream<TcpStream>) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, session) = stream.get_ref();
    let der = &session.peer_certificates().unwrap()[0];
    let (_, cert) = X509Certificate::from_der(der.as_ref()).unwrap();
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_string()
}

/// A real HTTPS server (hyper over rustls) for upstream TLS tests: answers `name` and
/// counts the connections it accepted.
pub struct TlsBackend {
    pub addr: SocketAddr,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    accept: tokio::task::AbortHandle,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TlsBackend {
    pub async fn start(name: &'static str, issued: &Issued) -> TlsBackend {
        use rustls::pki_types::pem::PemObject;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&issued.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&issued.key).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = connections.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |_req| async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(super::full(name)))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TlsBackend {
            addr,
            connections,
            accept: accept.abort_handle(),
        }
    }
}
