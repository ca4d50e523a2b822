//! Loading and checking certificate chains and keys (being written).
// TEMPORARY STUB until helper-certs merges.
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;
pub struct CertFiles<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub ocsp: Option<&'a Path>,
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Cert,
    Key,
    Ocsp,
}
#[derive(Debug)]
pub struct CertError {
    pub which: Which,
    pub message: String,
}
pub struct Loaded {
    pub key: Arc<rustls::sign::CertifiedKey>,
    pub names: Vec<String>,
    pub subject: String,
    pub not_after: SystemTime,
    pub warnings: Vec<String>,
}
pub fn load(
    files: &CertFiles,
    provider: &rustls::crypto::CryptoProvider,
    _now: SystemTime,
) -> Result<Loaded, CertError> {
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(files.cert)
        .map_err(|e| CertError {
            which: Which::Cert,
            message: format!("{e:?}"),
        })?
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(files.key).map_err(|e| CertError {
        which: Which::Key,
        message: format!("{e:?}"),
    })?;
    let key = provider.key_provider.load_private_key(key).unwrap();
    let ck = rustls::sign::CertifiedKey::new(chain, key);
    ck.keys_match().map_err(|e| CertError {
        which: Which::Key,
        message: format!("{e:?}"),
    })?;
    Ok(Loaded {
        key: Arc::new(ck),
        names: vec![],
        subject: String::new(),
        not_after: SystemTime::now(),
        warnings: vec![],
    })
}
pub fn covers(_names: &[String], _host: &str) -> bool {
    true
}
pub fn load_ca(path: &Path) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    Ok(rustls_pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap())
        .collect())
}
