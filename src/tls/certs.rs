//! Loading a TLS listener's certificate chain and key, checked the way a client will check
//! them: key against certificate, dates, and the chain up to a trusted root. Errors name the
//! file and say how to fix it. Choosing among loaded certificates is `resolver`'s job.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{InconsistentKeys, SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime};
use x509_parser::prelude::{ASN1Time, FromDer, GeneralName, X509Certificate};
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// A certificate that expires sooner than this loads with a warning, so that a renewal that
/// stopped working is noticed while there is still time.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// The files of one certificate entry in the config.
pub struct CertFiles<'a> {
    /// PEM: the server's certificate first, then the intermediates (and optionally the root).
    pub cert: &'a Path,
    /// PEM: the private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: &'a Path,
    /// DER: an OCSP response to staple.
    pub ocsp: Option<&'a Path>,
}

/// Which of the files a [`CertError`] is about, so the config checker can point at its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Cert,
    Key,
    Ocsp,
}

/// Why a certificate entry cannot be served; `message` names the file and, where it can,
/// the fix.
#[derive(Debug)]
pub struct CertError {
    pub which: Which,
    pub message: String,
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CertError {}

/// A checked certificate entry, ready to serve.
pub struct Loaded {
    /// What rustls sends: the chain as in the file, the key, the stapled OCSP response.
    pub key: Arc<CertifiedKey>,
    /// The host names the certificate covers, lower-case (wildcards as `*.example.com`, IP
    /// addresses as text): the resolver's index and the config checker's route check.
    pub names: Vec<String>,
    /// The subject, e.g. `CN=app.test`, for logs and the admin view.
    pub subject: String,
    /// When the certificate expires, for logs and expiry monitoring.
    pub not_after: SystemTime,
    /// Which clients can use it; the resolver prefers ECDSA among certificates for one name.
    pub key_kind: KeyKind,
    /// Problems worth telling the operator that do not stop the certificate from serving.
    pub warnings: Vec<String>,
}

/// The kind and size of a certificate's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Ecdsa { curve: &'static str },
    Rsa { bits: usize },
    Ed25519,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::Ecdsa { curve } => write!(f, "ECDSA {curve}"),
            KeyKind::Rsa { bits } => write!(f, "RSA {bits}"),
            KeyKind::Ed25519 => f.write_str("Ed25519"),
        }
    }
}

/// Loads a certificate entry and checks it as of `now`.
pub fn load(
    files: &CertFiles,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<Loaded, CertError> {
    let cert_error = |message| CertError {
        which: Which::Cert,
        message,
    };
    let key_error = |message| CertError {
        which: Which::Key,
        message,
    };

    let chain = read_certificates(files.cert).map_err(cert_error)?;
    let parsed = parse_all(files.cert, &chain).map_err(cert_error)?;
    let key = read_key(files.key).map_err(key_error)?;
    let key = provider.key_provider.load_private_key(key).map_err(|e| {
        let why = match e {
            // Shown without rustls' "unexpected error: " in front.
            rustls::Error::General(why) => why,
            other => other.to_string(),
        };
        key_error(format!(
            "the key in {} cannot be used: {why}",
            files.key.display()
        ))
    })?;
    check_key_matches(&chain, &key, files).map_err(key_error)?;
    let leaf = &parsed[0];
    let key_kind = key_kind(key.as_ref(), leaf.public_key()).ok_or_else(|| {
        key_error(format!(
            "the key in {} is of a kind Fulcrum cannot serve; use an ECDSA, RSA or Ed25519 key",
            files.key.display()
        ))
    })?;
    let not_after = system_time(leaf.validity().not_after);
    check_dates(leaf, now, files.cert).map_err(cert_error)?;
    verify_chain(&chain, &parsed, provider, now, files.cert).map_err(cert_error)?;
    let ocsp = match files.ocsp {
        Some(path) => Some(read_ocsp(path).map_err(|message| CertError {
            which: Which::Ocsp,
            message,
        })?),
        None => None,
    };

    let names = names(leaf);
    let subject = leaf.subject().to_string();
    let warnings = warnings(files.cert, leaf, &names, not_after, now);

    let mut certified = CertifiedKey::new(chain, key);
    certified.ocsp = ocsp;
    Ok(Loaded {
        key: Arc::new(certified),
        names,
        subject,
        not_after,
        key_kind,
        warnings,
    })
}

/// What is worth telling about a certificate that loads: that it expires soon, or that
/// clients will not find a name in it.
fn warnings(
    path: &Path,
    leaf: &X509Certificate,
    names: &[String],
    not_after: SystemTime,
    now: SystemTime,
) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Ok(left) = not_after.duration_since(now)
        && left < EXPIRY_WARNING
    {
        let days = left.as_secs() / (24 * 3600);
        let when = match days {
            0 => "in less than a day".to_string(),
            1 => "in 1 day".to_string(),
            n => format!("in {n} days"),
        };
        warnings.push(format!(
            "certificate {} expires {when} ({}); renew it",
            path.display(),
            date(not_after)
        ));
    }
    if names.is_empty() {
        warnings.push(format!(
            "the certificate in {} names no host; it can only be the listener's default",
            path.display()
        ));
    } else if !has_san(leaf) {
        warnings.push(format!(
            "the certificate in {} has no subject alternative names: clients ignore its common \
             name ({}) and will reject it",
            path.display(),
            names.join(", ")
        ));
    }
    warnings
}

/// Whether `host` (lower-case, no port; may be an IP literal) is covered by `names`. A
/// wildcard `*.example.com` covers exactly one label: `a.example.com`, not `example.com`
/// nor `a.b.example.com`.
pub fn covers(names: &[String], host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        // Compared as addresses, since one IPv6 address has several spellings.
        return names.iter().any(|n| n.parse::<IpAddr>() == Ok(ip));
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    let parent = match host.split_once('.') {
        Some((label, parent)) if !label.is_empty() => Some(parent),
        _ => None,
    };
    names.iter().any(|name| match name.strip_prefix("*.") {
        Some(suffix) => parent == Some(suffix),
        None => name == host,
    })
}

/// The certificates of a CA bundle (PEM), for client CAs and for upstream `ca` files.
pub fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = read_certificates(path)?;
    parse_all(path, &certs)?;
    Ok(certs)
}

// === reading the files ===

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The labels of the PEM blocks in `bytes` (`CERTIFICATE`, `PRIVATE KEY`, ...), including
/// those rustls skips, so that errors can say what the file holds instead.
fn pem_labels(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .map(str::to_string)
        .collect()
}

/// Why a file holds none of the PEM blocks wanted, given that it holds `labels`.
fn not_pem(path: &Path, bytes: &[u8], labels: &[String], wanted: &str, convert: &str) -> String {
    let path = path.display();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        format!("{path} is empty")
    } else if labels.is_empty() && bytes[0] == 0x30 {
        format!(
            "{path} is in DER (binary) form, not PEM; convert it with \
             `openssl {convert} -inform der -in {path} -out {path}.pem`"
        )
    } else if labels.is_empty() {
        format!("{path} is not a PEM file: it has no -----BEGIN {wanted}----- line")
    } else {
        format!("{path} holds no {wanted} block, only {}", labels.join(", "))
    }
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        let labels = pem_labels(&bytes);
        let mut message = not_pem(path, &bytes, &labels, "CERTIFICATE", "x509");
        if labels.iter().any(|l| l.ends_with("PRIVATE KEY")) {
            message.push_str("; is this the key file?");
        }
        return Err(message);
    }
    Ok(certs)
}

fn parse_all<'a>(
    path: &Path,
    chain: &'a [CertificateDer<'static>],
) -> Result<Vec<X509Certificate<'a>>, String> {
    let parse = |(i, der): (usize, &'a CertificateDer<'static>)| {
        X509Certificate::from_der(der)
            .map(|(_, cert)| cert)
            .map_err(|e| {
                format!(
                    "certificate {} in {} cannot be parsed: {e}",
                    i + 1,
                    path.display()
                )
            })
    };
    chain.iter().enumerate().map(parse).collect()
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read(path)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Ok(key),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            let labels = pem_labels(&bytes);
            let shown = path.display();
            Err(if labels.iter().any(|l| l == "ENCRYPTED PRIVATE KEY") {
                format!(
                    "the key in {shown} is encrypted with a passphrase; Fulcrum needs it \
                     unencrypted: `openssl pkey -in {shown} -out {shown}.plain`, then protect \
                     that file with its permissions"
                )
            } else if labels.iter().any(|l| l == "CERTIFICATE") {
                format!(
                    "{shown} holds a certificate but no private key; is this the certificate file?"
                )
            } else {
                not_pem(path, &bytes, &labels, "PRIVATE KEY", "pkey")
            })
        }
        Err(e) => Err(format!("{} is not valid PEM: {e}", path.display())),
    }
}

/// An OCSP response is stapled as it is; this only catches the wrong file (empty, PEM, text)
/// by checking that it is one whole DER SEQUENCE.
fn read_ocsp(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = read(path)?;
    if bytes.is_empty() {
        return Err(format!(
            "{} is empty; fetch a response with `openssl ocsp ... -respout {}`",
            path.display(),
            path.display()
        ));
    }
    if !is_one_der_sequence(&bytes) {
        return Err(format!(
            "{} is not a DER OCSP response; fetch one with `openssl ocsp ... -respout {}`",
            path.display(),
            path.display()
        ));
    }
    Ok(bytes)
}

fn is_one_der_sequence(bytes: &[u8]) -> bool {
    let [0x30, first, rest @ ..] = bytes else {
        return false;
    };
    let (len, body) = if *first < 0x80 {
        (usize::from(*first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return false;
        }
        let len = rest[..n]
            .iter()
            .fold(0, |len, b| len << 8 | usize::from(*b));
        (len, &rest[n..])
    };
    len == body.len()
}

// === checking them ===

fn check_key_matches(
    chain: &[CertificateDer<'static>],
    key: &Arc<dyn SigningKey>,
    files: &CertFiles,
) -> Result<(), String> {
    let matches = |cert: &CertificateDer<'static>| {
        match CertifiedKey::new(vec![cert.clone()], key.clone()).keys_match() {
            // A key that cannot tell its public half is trusted, as rustls does.
            Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => true,
            Err(_) => false,
        }
    };
    if matches(&chain[0]) {
        return Ok(());
    }
    let (key_path, cert_path) = (files.key.display(), files.cert.display());
    match chain.iter().position(matches) {
        Some(i) => Err(format!(
            "the key in {key_path} belongs to certificate {} in {cert_path}, not to the first; \
             the server's own certificate must come first in the file",
            i + 1
        )),
        None => Err(format!(
            "the key in {key_path} does not belong to the certificate in {cert_path}; \
             use the key the certificate was issued for"
        )),
    }
}

fn check_dates(leaf: &X509Certificate, now: SystemTime, path: &Path) -> Result<(), String> {
    let validity = leaf.validity();
    let (not_before, not_after) = (
        system_time(validity.not_before),
        system_time(validity.not_after),
    );
    if now > not_after {
        return Err(format!(
            "the certificate in {} expired on {}; renew it",
            path.display(),
            date(not_after)
        ));
    }
    if now < not_before {
        return Err(format!(
            "the certificate in {} is not valid until {}; if that has passed, check this \
             machine's clock",
            path.display(),
            date(not_before)
        ));
    }
    Ok(())
}

/// The system's trusted roots, read once: reading them takes a directory walk.
fn system_roots() -> &'static [TrustAnchor<'static>] {
    static ROOTS: OnceLock<Vec<TrustAnchor<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        rustls_native_certs::load_native_certs()
            .certs
            .iter()
            .filter_map(|der| webpki::anchor_from_trusted_cert(der).ok())
            .map(|anchor| anchor.to_owned())
            .collect()
    })
}

fn is_self_signed(cert: &X509Certificate) -> bool {
    cert.subject().as_raw() == cert.issuer().as_raw()
}

/// Verifies the chain in the file as a client would, with the system's roots and any
/// self-signed certificate in the file (a private CA) as trust anchors.
fn verify_chain(
    chain: &[CertificateDer<'static>],
    parsed: &[X509Certificate],
    provider: &CryptoProvider,
    now: SystemTime,
    path: &Path,
) -> Result<(), String> {
    // A self-signed server certificate is its own anchor: there is no chain to check, and
    // webpki would refuse the many that also say they are a CA.
    if is_self_signed(&parsed[0]) {
        return Ok(());
    }
    let shown = path.display();
    let leaf = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| format!("the certificate in {shown} cannot be used: {e}"))?;
    let mut anchors = system_roots().to_vec();
    for (der, cert) in chain.iter().zip(parsed).skip(1) {
        if is_self_signed(cert)
            && let Ok(anchor) = webpki::anchor_from_trusted_cert(der)
        {
            anchors.push(anchor.to_owned());
        }
    }
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let verified = leaf.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &anchors,
        &chain[1..],
        UnixTime::since_unix_epoch(since_epoch),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    );
    let Err(error) = verified else {
        return Ok(());
    };
    use webpki::Error as E;
    Err(match error {
        E::UnknownIssuer => {
            let end = chain_end(parsed);
            let mut message = format!(
                "missing intermediate: the chain in {shown} ends at {}, issued by {}, which is \
                 neither in the file nor a trusted root; append the intermediate certificate(s) \
                 (for a private CA, append the CA certificate)",
                end.subject(),
                end.issuer()
            );
            if system_roots().is_empty() {
                message.push_str(" (this machine has no trusted roots at all: install them, e.g. the ca-certificates package)");
            }
            message
        }
        E::InvalidSignatureForPublicKey => format!(
            "the certificates in {shown} are not in order or do not chain: a signature does not \
             verify with the key of the certificate named as its issuer; the file should hold the \
             server's certificate, then the certificate that issued it, and so on"
        ),
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | E::SignatureAlgorithmMismatch => format!(
            "a certificate in the chain of {shown} is signed with an algorithm TLS clients do not \
             accept; have it reissued"
        ),
        E::CertExpired { not_after, .. } => format!(
            "a CA certificate in the chain of {shown} expired on {}; replace the intermediates \
             with current ones from your CA",
            date(UNIX_EPOCH + Duration::from_secs(not_after.as_secs()))
        ),
        E::CertNotValidYet { not_before, .. } => format!(
            "a CA certificate in the chain of {shown} is not valid until {}; if that has passed, \
             check this machine's clock",
            date(UNIX_EPOCH + Duration::from_secs(not_before.as_secs()))
        ),
        E::CaUsedAsEndEntity => format!(
            "the first certificate in {shown} is a CA certificate; the server's own certificate \
             must come first"
        ),
        E::EndEntityUsedAsCa => format!(
            "the chain in {shown} passes through a certificate that is not a CA; only the first \
             certificate may be a server's own"
        ),
        E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => {
            format!(
                "the certificate in {shown} is not for TLS servers: its extended key usage lacks \
                 serverAuth; have it issued for server authentication"
            )
        }
        E::PathLenConstraintViolated | E::NameConstraintViolation => format!(
            "a CA in the chain of {shown} is not allowed to issue this certificate (its path \
             length or name constraints forbid it)"
        ),
        E::CertDistrusted => format!("the chain in {shown} ends at a root that is distrusted"),
        other => format!("the chain in {shown} does not verify: {other}"),
    })
}

/// The last certificate reached by following issuers from the server's certificate through
/// the file, whatever the order of the file.
fn chain_end<'a, 'b>(parsed: &'a [X509Certificate<'b>]) -> &'a X509Certificate<'b> {
    let mut end = &parsed[0];
    for _ in 1..parsed.len() {
        let issuer = parsed
            .iter()
            .find(|c| !std::ptr::eq(*c, end) && c.subject().as_raw() == end.issuer().as_raw());
        match issuer {
            Some(issuer) => end = issuer,
            None => break,
        }
    }
    end
}

// === what the certificate says ===

fn has_san(cert: &X509Certificate) -> bool {
    matches!(cert.subject_alternative_name(), Ok(Some(_)))
}

fn names(cert: &X509Certificate) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push(dns.to_ascii_lowercase()),
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    if names.is_empty() {
        let common_names = cert.subject().iter_common_name();
        names.extend(common_names.filter_map(|cn| Some(cn.as_str().ok()?.to_ascii_lowercase())));
    }
    names
}

fn key_kind(key: &dyn SigningKey, spki: &SubjectPublicKeyInfo) -> Option<KeyKind> {
    match key.algorithm() {
        SignatureAlgorithm::ECDSA => {
            let curves = [
                (SignatureScheme::ECDSA_NISTP256_SHA256, "P-256"),
                (SignatureScheme::ECDSA_NISTP384_SHA384, "P-384"),
                (SignatureScheme::ECDSA_NISTP521_SHA512, "P-521"),
            ];
            let (_, curve) = curves
                .into_iter()
                .find(|(scheme, _)| key.choose_scheme(&[*scheme]).is_some())?;
            Some(KeyKind::Ecdsa { curve })
        }
        SignatureAlgorithm::RSA => match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => Some(KeyKind::Rsa {
                bits: rsa.key_size(),
            }),
            _ => None,
        },
        SignatureAlgorithm::ED25519 => Some(KeyKind::Ed25519),
        _ => None,
    }
}

fn system_time(t: ASN1Time) -> SystemTime {
    let seconds = t.timestamp();
    match u64::try_from(seconds) {
        Ok(after) => UNIX_EPOCH + Duration::from_secs(after),
        Err(_) => UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs()),
    }
}

/// `2026-12-08 09:30 UTC`.
fn date(t: SystemTime) -> String {
    if t < UNIX_EPOCH {
        return "a date before 1970".to_string();
    }
    let text = humantime::format_rfc3339_seconds(t).to_string();
    format!("{} {} UTC", &text[..10], &text[11..16])
}

#[cfg(test)]
pub(crate) mod test_pki {
    //! Real certificates made with rcgen and written to a temporary directory, for the tests
    //! of this module and of `resolver`.

    use std::path::PathBuf;
    use std::time::SystemTime;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SignatureAlgorithm,
    };

    pub(crate) use rcgen::{PKCS_ECDSA_P256_SHA256 as ECDSA, PKCS_RSA_SHA256 as RSA};

    /// The time the tests check certificates at; rcgen's default validity (1975 to 4096)
    /// covers it.
    pub(crate) fn now() -> SystemTime {
        at("2030-06-01T00:00:00Z")
    }

    pub(crate) fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    /// A certificate authority: a root or an intermediate.
    pub(crate) struct Ca {
        params: CertificateParams,
        key: KeyPair,
        pub(crate) pem: String,
    }

    /// A server certificate and its key, in PEM.
    pub(crate) struct Leaf {
        pub(crate) pem: String,
        pub(crate) key: String,
    }

    fn ca_params(name: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    }

    fn leaf_params(names: &[&str]) -> CertificateParams {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        let cn = names.first().map_or("leaf", String::as_str);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params
    }

    impl Ca {
        pub(crate) fn root(name: &str) -> Ca {
            let key = KeyPair::generate().unwrap();
            let params = ca_params(name);
            let pem = params.self_signed(&key).unwrap().pem();
            Ca { params, key, pem }
        }

        pub(crate) fn intermediate(&self, name: &str) -> Ca {
            let key = KeyPair::generate().unwrap();
            let params = ca_params(name);
            let pem = params.signed_by(&key, &self.issuer()).unwrap().pem();
            Ca { params, key, pem }
        }

        fn issuer(&self) -> Issuer<'_, &KeyPair> {
            Issuer::from_params(&self.params, &self.key)
        }

        pub(crate) fn leaf(&self, names: &[&str], alg: &'static SignatureAlgorithm) -> Leaf {
            self.leaf_with(names, alg, |_| {})
        }

        pub(crate) fn leaf_with(
            &self,
            names: &[&str],
            alg: &'static SignatureAlgorithm,
            edit: impl FnOnce(&mut CertificateParams),
        ) -> Leaf {
            let key = KeyPair::generate_for(alg).unwrap();
            let mut params = leaf_params(names);
            edit(&mut params);
            let pem = params.signed_by(&key, &self.issuer()).unwrap().pem();
            Leaf {
                pem,
                key: key.serialize_pem(),
            }
        }
    }

    pub(crate) fn self_signed(names: &[&str], edit: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = leaf_params(names);
        edit(&mut params);
        Leaf {
            pem: params.self_signed(&key).unwrap().pem(),
            key: key.serialize_pem(),
        }
    }

    /// A temporary directory to write certificate files into.
    pub(crate) struct Files(tempfile::TempDir);

    impl Files {
        pub(crate) fn new() -> Files {
            Files(tempfile::tempdir().unwrap())
        }

        /// Writes `parts` one after another into the file `name`.
        pub(crate) fn write(&self, name: &str, parts: &[&[u8]]) -> PathBuf {
            let path = self.0.path().join(name);
            std::fs::write(&path, parts.concat()).unwrap();
            path
        }

        /// Loads a certificate file holding `chain` and a key file holding `key`.
        pub(crate) fn load(
            &self,
            chain: &[&str],
            key: &str,
        ) -> Result<super::Loaded, super::CertError> {
            let chain: Vec<&[u8]> = chain.iter().map(|pem| pem.as_bytes()).collect();
            let cert = self.write("site.pem", &chain);
            let key = self.write("site.key", &[key.as_bytes()]);
            let files = super::CertFiles {
                cert: &cert,
                key: &key,
                ocsp: None,
            };
            super::load(
                &files,
                &rustls::crypto::aws_lc_rs::default_provider(),
                now(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_pki::{Ca, ECDSA, Files, RSA, at, now, self_signed};
    use super::*;

    fn message(result: Result<Loaded, CertError>) -> (Which, String) {
        match result {
            Ok(_) => panic!("loaded, but an error was expected"),
            Err(e) => (e.which, e.message),
        }
    }

    #[test]
    fn a_full_chain_loads_with_what_the_certificate_says() {
        let root = Ca::root("Test Root");
        let intermediate = root.intermediate("Test Intermediate");
        let leaf = intermediate.leaf(&["App.Test", "*.app.test", "10.0.0.1"], &ECDSA);
        let files = Files::new();
        let loaded = files
            .load(&[&leaf.pem, &intermediate.pem, &root.pem], &leaf.key)
            .unwrap();
        assert_eq!(loaded.names, ["app.test", "*.app.test", "10.0.0.1"]);
        assert_eq!(loaded.subject, "CN=App.Test");
        assert_eq!(loaded.key_kind.to_string(), "ECDSA P-256");
        assert_eq!(loaded.key.cert.len(), 3);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.not_after, at("4096-01-01T00:00:00Z"));
    }

    #[test]
    fn a_missing_intermediate_is_named_and_appending_the_chain_fixes_it() {
        let root = Ca::root("Test Root");
        let intermediate = root.intermediate("Test Intermediate");
        let leaf = intermediate.leaf(&["app.test"], &ECDSA);
        let files = Files::new();

        let (which, text) = message(files.load(&[&leaf.pem], &leaf.key));
        assert_eq!(which, Which::Cert);
        assert!(
            text.starts_with("missing intermediate: the chain in "),
            "{text}"
        );
        assert!(
            text.contains(
                "site.pem ends at CN=app.test, issued by CN=Test Intermediate, which is neither"
            ),
            "{text}"
        );

        // With the intermediate but not the private root, the chain now ends one step higher.
        let (_, text) = message(files.load(&[&leaf.pem, &intermediate.pem], &leaf.key));
        assert!(
            text.contains("ends at CN=Test Intermediate, issued by CN=Test Root"),
            "{text}"
        );

        files
            .load(&[&leaf.pem, &intermediate.pem, &root.pem], &leaf.key)
            .unwrap();
        // Clients do not mind the order of intermediates, so neither does the check.
        files
            .load(&[&leaf.pem, &root.pem, &intermediate.pem], &leaf.key)
            .unwrap();
    }

    #[test]
    fn a_leaf_of_a_private_ca_loads_with_the_ca_appended() {
        let ca = Ca::root("Private CA");
        let leaf = ca.leaf(&["app.test"], &ECDSA);
        Files::new().load(&[&leaf.pem, &ca.pem], &leaf.key).unwrap();
    }

    #[test]
    fn a_self_signed_certificate_alone_is_its_own_anchor() {
        let plain = self_signed(&["app.test"], |_| {});
        Files::new().load(&[&plain.pem], &plain.key).unwrap();
        // As `openssl req -x509` makes them: marked as a CA as well.
        let ca_too = self_signed(&["app.test"], |p| {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
        });
        Files::new().load(&[&ca_too.pem], &ca_too.key).unwrap();
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let ca = Ca::root("Test CA");
        let leaf = ca.leaf(&["app.test"], &ECDSA);
        let other = ca.leaf(&["app.test"], &ECDSA);
        let (which, text) = message(Files::new().load(&[&leaf.pem, &ca.pem], &other.key));
        assert_eq!(which, Which::Key);
        assert!(text.starts_with("the key in "), "{text}");
        assert!(
            text.contains("site.key does not belong to the certificate in "),
            "{text}"
        );
        assert!(
            text.ends_with("site.pem; use the key the certificate was issued for"),
            "{text}"
        );
    }

    #[test]
    fn a_chain_in_the_wrong_order_is_told_to_put_the_server_certificate_first() {
        let ca = Ca::root("Test CA");
        let leaf = ca.leaf(&["app.test"], &ECDSA);
        let (which, text) = message(Files::new().load(&[&ca.pem, &leaf.pem], &leaf.key));
        assert_eq!(which, Which::Key);
        assert!(text.contains("belongs to certificate 2 in "), "{text}");
        assert!(
            text.ends_with("the server's own certificate must come first in the file"),
            "{text}"
        );
    }

    #[test]
    fn expired_and_not_yet_valid_certificates_say_when() {
        let ca = Ca::root("Test CA");
        let files = Files::new();
        let expired = ca.leaf_with(&["app.test"], &ECDSA, |p| {
            p.not_after = rcgen::date_time_ymd(2030, 1, 2)
        });
        let (which, text) = message(files.load(&[&expired.pem, &ca.pem], &expired.key));
        assert_eq!(which, Which::Cert);
        assert!(
            text.ends_with("site.pem expired on 2030-01-02 00:00 UTC; renew it"),
            "{text}"
        );

        let early = ca.leaf_with(&["app.test"], &ECDSA, |p| {
            p.not_before = rcgen::date_time_ymd(2031, 3, 4)
        });
        let (_, text) = message(files.load(&[&early.pem, &ca.pem], &early.key));
        assert!(
            text.contains("site.pem is not valid until 2031-03-04 00:00 UTC; "),
            "{text}"
        );
    }

    #[test]
    fn expiry_within_two_weeks_is_a_warning() {
        let ca = Ca::root("Test CA");
        let soon = ca.leaf_with(&["app.test"], &ECDSA, |p| {
            p.not_after = rcgen::date_time_ymd(2030, 6, 10)
        });
        let loaded = Files::new().load(&[&soon.pem, &ca.pem], &soon.key).unwrap();
        assert_eq!(loaded.warnings.len(), 1);
        assert!(
            loaded.warnings[0]
                .ends_with("site.pem expires in 9 days (2030-06-10 00:00 UTC); renew it"),
            "{:?}",
            loaded.warnings
        );
        let later = ca.leaf_with(&["app.test"], &ECDSA, |p| {
            p.not_after = rcgen::date_time_ymd(2030, 6, 16)
        });
        let loaded = Files::new()
            .load(&[&later.pem, &ca.pem], &later.key)
            .unwrap();
        assert!(loaded.warnings.is_empty());
    }

    #[test]
    fn a_certificate_signed_by_another_key_of_the_same_name_does_not_chain() {
        let real = Ca::root("Test CA");
        let impostor = Ca::root("Test CA");
        let leaf = real.leaf(&["app.test"], &ECDSA);
        let (_, text) = message(Files::new().load(&[&leaf.pem, &impostor.pem], &leaf.key));
        assert!(
            text.contains("site.pem are not in order or do not chain"),
            "{text}"
        );
    }

    #[test]
    fn a_certificate_only_for_clients_is_not_for_servers() {
        let ca = Ca::root("Test CA");
        let leaf = ca.leaf_with(&["app.test"], &ECDSA, |p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]
        });
        let (_, text) = message(Files::new().load(&[&leaf.pem, &ca.pem], &leaf.key));
        assert!(text.contains("site.pem is not for TLS servers"), "{text}");
    }

    #[test]
    fn files_that_are_not_what_they_should_be() {
        let leaf = self_signed(&["app.test"], |_| {});
        let files = Files::new();
        let load = |cert: &[u8], key: &[u8]| {
            let cert = files.write("c.pem", &[cert]);
            let key = files.write("k.pem", &[key]);
            let provider = rustls::crypto::aws_lc_rs::default_provider();
            let files = CertFiles {
                cert: &cert,
                key: &key,
                ocsp: None,
            };
            message(load(&files, &provider, now()))
        };
        let pem = leaf.pem.as_bytes();
        let key = leaf.key.as_bytes();
        let der = CertificateDer::from_pem_slice(pem).unwrap();

        let (which, text) = load(b"hello\n", key);
        assert_eq!(which, Which::Cert);
        assert!(
            text.ends_with("c.pem is not a PEM file: it has no -----BEGIN CERTIFICATE----- line"),
            "{text}"
        );
        let (_, text) = load(&der, key);
        assert!(text.contains("c.pem is in DER (binary) form, not PEM; convert it with `openssl x509 -inform der -in "), "{text}");
        let (_, text) = load(b"", key);
        assert!(text.ends_with("c.pem is empty"), "{text}");
        let (_, text) = load(key, key);
        assert!(
            text.ends_with(
                "c.pem holds no CERTIFICATE block, only PRIVATE KEY; is this the key file?"
            ),
            "{text}"
        );
        let (_, text) = load(
            b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
            key,
        );
        assert!(text.contains("c.pem is not valid PEM: "), "{text}");

        let (which, text) = load(pem, pem);
        assert_eq!(which, Which::Key);
        assert!(
            text.ends_with(
                "k.pem holds a certificate but no private key; is this the certificate file?"
            ),
            "{text}"
        );
        let encrypted =
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let (_, text) = load(pem, encrypted);
        assert!(
            text.contains("k.pem is encrypted with a passphrase"),
            "{text}"
        );
        let (_, text) = load(
            pem,
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        );
        assert!(
            text.ends_with("k.pem holds no PRIVATE KEY block, only PUBLIC KEY"),
            "{text}"
        );
        // PKCS#8 framing around a key that is not one.
        let junk = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let (_, text) = load(pem, junk);
        assert!(text.contains("k.pem cannot be used: "), "{text}");
    }

    #[test]
    fn an_unreadable_file_gives_the_system_error() {
        let leaf = self_signed(&["app.test"], |_| {});
        let files = Files::new();
        let key = files.write("k.pem", &[leaf.key.as_bytes()]);
        let missing = files.write("x", &[]).with_file_name("missing.pem");
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let cert_files = CertFiles {
            cert: &missing,
            key: &key,
            ocsp: None,
        };
        let (which, text) = message(load(&cert_files, &provider, now()));
        assert_eq!(which, Which::Cert);
        assert!(text.starts_with("cannot read "), "{text}");
        assert!(
            text.ends_with("missing.pem: No such file or directory (os error 2)"),
            "{text}"
        );
    }

    #[test]
    fn an_ocsp_response_is_stapled_if_it_looks_like_one() {
        let leaf = self_signed(&["app.test"], |_| {});
        let files = Files::new();
        let cert = files.write("c.pem", &[leaf.pem.as_bytes()]);
        let key = files.write("k.pem", &[leaf.key.as_bytes()]);
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let with_ocsp = |bytes: &[u8]| {
            let ocsp = files.write("ocsp.der", &[bytes]);
            let files = CertFiles {
                cert: &cert,
                key: &key,
                ocsp: Some(&ocsp),
            };
            load(&files, &provider, now())
        };
        let response = [&[0x30, 0x81, 0x80][..], &[7; 0x80]].concat();
        let loaded = with_ocsp(&response).unwrap();
        assert_eq!(loaded.key.ocsp.as_deref(), Some(&response[..]));

        for wrong in [
            &b""[..],
            b"-----BEGIN OCSP RESPONSE-----\n",
            &response[..100],
        ] {
            let (which, text) = message(with_ocsp(wrong));
            assert_eq!(which, Which::Ocsp);
            assert!(text.contains("ocsp.der is"), "{text}");
        }
    }

    #[test]
    fn key_kinds_are_told_with_their_size() {
        let ca = Ca::root("Test CA");
        let rsa = ca.leaf(&["app.test"], &RSA);
        let loaded = Files::new().load(&[&rsa.pem, &ca.pem], &rsa.key).unwrap();
        assert_eq!(loaded.key_kind, KeyKind::Rsa { bits: 2048 });
        assert_eq!(loaded.key_kind.to_string(), "RSA 2048");
        let ed = ca.leaf(&["app.test"], &rcgen::PKCS_ED25519);
        let loaded = Files::new().load(&[&ed.pem, &ca.pem], &ed.key).unwrap();
        assert_eq!(loaded.key_kind.to_string(), "Ed25519");
    }

    #[test]
    fn the_common_name_stands_in_for_missing_alternative_names_with_a_warning() {
        let ca = Ca::root("Test CA");
        let leaf = ca.leaf_with(&[], &ECDSA, |p| {
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "Old.Test")
        });
        let loaded = Files::new().load(&[&leaf.pem, &ca.pem], &leaf.key).unwrap();
        assert_eq!(loaded.names, ["old.test"]);
        assert!(
            loaded.warnings[0].contains("has no subject alternative names"),
            "{:?}",
            loaded.warnings
        );
    }

    #[test]
    fn a_ca_bundle_loads_every_certificate() {
        let (a, b) = (Ca::root("A"), Ca::root("B"));
        let files = Files::new();
        let bundle = files.write("ca.pem", &[a.pem.as_bytes(), b.pem.as_bytes()]);
        assert_eq!(load_ca(&bundle).unwrap().len(), 2);
        let text = files.write("ca.txt", &[b"not a bundle"]);
        assert!(
            load_ca(&text)
                .unwrap_err()
                .ends_with("ca.txt is not a PEM file: it has no -----BEGIN CERTIFICATE----- line")
        );
    }

    #[test]
    fn covers_follows_the_wildcard_rules() {
        let names: Vec<String> = ["app.test", "*.example.com", "10.0.0.1", "::1"]
            .map(String::from)
            .to_vec();
        let table = [
            ("app.test", true),
            ("app.test.", true),
            ("other.test", false),
            ("a.app.test", false),
            ("a.example.com", true),
            ("example.com", false),
            ("a.b.example.com", false),
            (".example.com", false),
            ("aexample.com", false),
            ("10.0.0.1", true),
            ("10.0.0.2", false),
            ("0:0::1", true),
            ("[::1]", true),
            ("*.example.com", true),
        ];
        for (host, expected) in table {
            assert_eq!(covers(&names, host), expected, "{host}");
        }
        assert!(!covers(&[], "app.test"));
    }
}
