//! The local CA: made once (`fulcrum cert ca init`), then loaded to sign with.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{CertError, files};

/// The CA's name when `--name` is not given.
pub const DEFAULT_CA_NAME: &str = "Fulcrum Development CA";

/// Long enough that nobody has to think about it again, as mkcert's CA does.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A clock running a little behind another machine's must not find a fresh certificate
/// not yet valid.
pub(crate) const BACKDATE: Duration = Duration::from_secs(60);

/// Where a CA's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// `ca.pem`: the certificate that clients trust.
    pub cert: PathBuf,
    /// `ca.key`: the private key that signs; readable by its owner only.
    pub key: PathBuf,
}

impl CaFiles {
    /// `dir/ca.pem` and `dir/ca.key`.
    pub fn in_dir(dir: &Path) -> CaFiles {
        CaFiles {
            cert: dir.join("ca.pem"),
            key: dir.join("ca.key"),
        }
    }
}

/// `$FULCRUM_CA_DIR`, else `$XDG_DATA_HOME/fulcrum/ca`, else `~/.local/share/fulcrum/ca`;
/// `None` when none of those variables is set.
pub fn default_ca_dir() -> Option<PathBuf> {
    std::env::var_os("FULCRUM_CA_DIR")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| files::data_dir("ca"))
}

/// Makes a CA in `dir`: an ECDSA P-256 key and a self-signed certificate named `name`, for
/// signing end-entity certificates only (path length 0), valid for 10 years. Refuses when
/// `dir` already has a CA, unless `force`.
pub fn init_ca(dir: &Path, name: &str, force: bool) -> Result<CaFiles, CertError> {
    let files = CaFiles::in_dir(dir);
    let existing = [&files.cert, &files.key].into_iter().find(|p| p.exists());
    if let (Some(existing), false) = (existing, force) {
        return Err(CertError::CaExists {
            path: existing.clone(),
        });
    }
    if name.trim().is_empty() {
        return Err(CertError::Request("the CA's name is empty".into()));
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = ca_params(name).self_signed(&key)?;
    files::create_private_dir(dir)?;
    files::write(&files.key, key.serialize_pem().as_bytes(), true)?;
    files::write(&files.cert, cert.pem().as_bytes(), false)?;
    Ok(files)
}

fn ca_params(name: &str) -> CertificateParams {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_VALIDITY).into();
    params
}

/// A CA loaded from its files, ready to sign.
pub(crate) struct Ca {
    pub files: CaFiles,
    pub issuer: Issuer<'static, KeyPair>,
    /// `ca.pem` as it is on disk, appended to each chain it signs.
    pub pem: String,
    pub der: CertificateDer<'static>,
}

impl Ca {
    /// Loads the CA in `dir`, checking that `ca.pem` is a CA certificate and that `ca.key`
    /// is its key.
    pub fn load(dir: &Path) -> Result<Ca, CertError> {
        let files = CaFiles::in_dir(dir);
        match (files.cert.exists(), files.key.exists()) {
            (false, false) => {
                return Err(CertError::NoCa {
                    dir: dir.to_path_buf(),
                });
            }
            (true, false) => {
                return Err(CertError::invalid(
                    &files.key,
                    "missing: the CA's certificate is there but not its key",
                ));
            }
            (false, true) => {
                return Err(CertError::invalid(
                    &files.cert,
                    "missing: the CA's key is there but not its certificate",
                ));
            }
            (true, true) => {}
        }
        let pem = String::from_utf8(files::read(&files.cert)?)
            .map_err(|_| CertError::invalid(&files.cert, "not a PEM file"))?;
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| CertError::invalid(&files.cert, format!("no PEM certificate: {e}")))?;
        let (_, parsed) = X509Certificate::from_der(der.as_ref()).map_err(|e| {
            CertError::invalid(&files.cert, format!("not a valid certificate: {e}"))
        })?;
        if !parsed.is_ca() {
            return Err(CertError::invalid(
                &files.cert,
                "not a CA certificate (no basicConstraints CA:TRUE)",
            ));
        }
        let key_pem = String::from_utf8(files::read(&files.key)?)
            .map_err(|_| CertError::invalid(&files.key, "not a PEM file"))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| CertError::invalid(&files.key, format!("not a usable key: {e}")))?;
        if key.subject_public_key_info() != parsed.public_key().raw {
            return Err(CertError::invalid(
                &files.key,
                format!("not the key of {}", files.cert.display()),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| {
            CertError::invalid(&files.cert, format!("cannot sign with this CA: {e}"))
        })?;
        Ok(Ca {
            files,
            issuer,
            pem,
            der: der.into_owned(),
        })
    }
}
