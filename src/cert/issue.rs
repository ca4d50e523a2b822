//! Certificates signed by the local CA: for servers (`fulcrum cert issue`), for clients
//! (`--client`), and the demo's, made once and reused.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, PublicKeyData, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, PrivatePkcs8KeyDer, ServerName, UnixTime};

use super::ca::{BACKDATE, Ca, CaFiles, init_ca};
use super::{CertError, files};

/// The longest validity browsers accept for a server certificate (398 days, less a day
/// for clocks and time zones).
pub const DEFAULT_DAYS: u32 = 397;

/// Longer than the CA itself lives: a mistake, not a wish.
const MAX_DAYS: u32 = 3650;

/// What the certificate is for, written as its extended key usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A server proving its names to clients (serverAuth).
    Server,
    /// A client proving who it is to a server that asks (clientAuth), as for mTLS.
    Client,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256: small and fast, what every current client takes.
    EcdsaP256,
    /// RSA 2048, for old clients that take nothing else.
    Rsa2048,
}

/// The certificate to issue.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// DNS names (`app.test`, `*.app.test`) and IP addresses, in order; the first is also
    /// the subject's common name.
    pub names: Vec<String>,
    pub usage: Usage,
    pub key: KeyKind,
    /// Validity, counted from now.
    pub days: u32,
}

impl IssueRequest {
    /// A server certificate for `names`: ECDSA P-256, valid for [`DEFAULT_DAYS`].
    pub fn server<S: Into<String>>(names: impl IntoIterator<Item = S>) -> IssueRequest {
        IssueRequest {
            names: names.into_iter().map(Into::into).collect(),
            usage: Usage::Server,
            key: KeyKind::EcdsaP256,
            days: DEFAULT_DAYS,
        }
    }

    /// A client certificate for `names`, otherwise as [`IssueRequest::server`].
    pub fn client<S: Into<String>>(names: impl IntoIterator<Item = S>) -> IssueRequest {
        IssueRequest {
            usage: Usage::Client,
            ..IssueRequest::server(names)
        }
    }
}

/// The files an issued certificate was written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// `PREFIX.pem`: the certificate followed by the CA's, a complete chain.
    pub cert: PathBuf,
    /// `PREFIX.key`: its private key (PKCS#8), readable by its owner only.
    pub key: PathBuf,
    /// The CA certificate that clients must trust.
    pub ca: PathBuf,
}

/// Where `fulcrum cert issue` writes when not told: the first name, in the current
/// directory, with a wildcard's `*` spelled `_wildcard` (`*.app.test` → `_wildcard.app.test`).
pub fn default_prefix(first_name: &str) -> PathBuf {
    PathBuf::from(first_name.replace('*', "_wildcard"))
}

/// Issues a certificate signed by the CA in `ca_dir`, written as `PREFIX.pem` (the chain)
/// and `PREFIX.key`.
pub fn issue(ca_dir: &Path, request: &IssueRequest, prefix: &Path) -> Result<Issued, CertError> {
    let names = request
        .names
        .iter()
        .map(|name| parse_name(name))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(first) = request.names.first() else {
        return Err(CertError::Request(
            "a certificate needs at least one name (--name)".into(),
        ));
    };
    if request.days == 0 || request.days > MAX_DAYS {
        return Err(CertError::Request(format!(
            "a certificate is valid for 1 to {MAX_DAYS} days, not {}",
            request.days
        )));
    }
    let ca = Ca::load(ca_dir)?;

    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, first.to_ascii_lowercase());
    params.subject_alt_names = names;
    params.is_ca = IsCa::ExplicitNoCa;
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + Duration::from_secs(u64::from(request.days) * 86_400)).into();
    params.use_authority_key_identifier_extension = true;
    params.extended_key_usages = vec![match request.usage {
        Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // RSA key exchange (TLS 1.2's non-ECDHE suites) encrypts with the certificate's key.
    if request.key == KeyKind::Rsa2048 {
        params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    let key = generate_key(request.key)?;
    let cert = params.signed_by(&key, &ca.issuer)?;

    let issued = Issued {
        cert: files::with_suffix(prefix, "pem"),
        key: files::with_suffix(prefix, "key"),
        ca: ca.files.cert.clone(),
    };
    let mut chain = cert.pem();
    chain.push_str(ca.pem.trim_start());
    if !chain.ends_with('\n') {
        chain.push('\n');
    }
    files::write(&issued.key, key.serialize_pem().as_bytes(), true)?;
    files::write(&issued.cert, chain.as_bytes(), false)?;
    Ok(issued)
}

/// `name` as a subject alternative name: an IP address, or a DNS name whose leftmost label
/// may be `*`.
fn parse_name(name: &str) -> Result<SanType, CertError> {
    let bad = |why: &str| CertError::Request(format!("--name {name:?}: {why}"));
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    if host.contains('*') {
        return Err(bad(
            "a wildcard may only be the whole leftmost label, as in *.app.test",
        ));
    }
    if DnsName::try_from(host).is_err() {
        return Err(bad("not a DNS name or an IP address"));
    }
    let dns = name
        .to_ascii_lowercase()
        .try_into()
        .map_err(|_| bad("not a DNS name or an IP address"))?;
    Ok(SanType::DnsName(dns))
}

fn generate_key(kind: KeyKind) -> Result<KeyPair, CertError> {
    Ok(match kind {
        KeyKind::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
        // rcgen's ring back end signs with RSA keys but cannot make them; aws-lc-rs can.
        KeyKind::Rsa2048 => {
            use aws_lc_rs::encoding::AsDer;
            let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .map_err(|e| CertError::Request(format!("cannot make an RSA key: {e}")))?;
            let der = rsa
                .as_der()
                .map_err(|e| CertError::Request(format!("cannot encode the RSA key: {e}")))?;
            let pkcs8 = PrivatePkcs8KeyDer::from(der.as_ref().to_vec());
            KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &PKCS_RSA_SHA256)?
        }
    })
}

// === The demo's certificate ===

/// The demo's files: its CA and a server certificate for `localhost` and `127.0.0.1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoCert {
    /// The demo CA's certificate, for clients to trust (`curl --cacert`).
    pub ca: PathBuf,
    /// The server's chain: its certificate, then the CA's.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The names the demo certificate is for.
const DEMO_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// How long before expiry the demo makes its certificates afresh.
const DEMO_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

/// `$XDG_DATA_HOME/fulcrum/demo`, else `~/.local/share/fulcrum/demo`, else (no home at
/// all) `fulcrum-demo` in the system's temporary directory.
pub fn default_demo_dir() -> PathBuf {
    // Without a home, a directory of this user's own in the shared temp dir (which
    // `demo_certificate` checks is theirs before trusting a CA found in it).
    files::data_dir("demo").unwrap_or_else(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        std::env::temp_dir().join(format!("fulcrum-demo-{uid}"))
    })
}

/// The demo's CA and a server certificate for localhost and 127.0.0.1 signed by it, made
/// on first use in `dir` and reused after (re-issued if missing or expiring within 30 days).
pub fn demo_certificate(dir: &Path) -> std::io::Result<DemoCert> {
    // A CA that someone else could have put there must not be trusted: the demo tells its
    // user to trust it.
    if let Ok(meta) = std::fs::metadata(dir) {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if meta.uid() != uid || meta.mode() & 0o022 != 0 {
            return Err(std::io::Error::other(format!(
                "{} belongs to another user or others may write to it: the demo will not trust a CA found there; pass --certs DIR",
                dir.display()
            )));
        }
    }
    let ca_files = CaFiles::in_dir(dir);
    let demo = DemoCert {
        ca: ca_files.cert.clone(),
        cert: dir.join("localhost.pem"),
        key: dir.join("localhost.key"),
    };
    // A CA that cannot be loaded or is about to expire is the demo's own: make a new one.
    let ca_usable = Ca::load(dir).is_ok_and(|ca| {
        x509_parser::parse_x509_certificate(&ca.der).is_ok_and(|(_, cert)| {
            files::seconds_from_now(cert.validity().not_after.timestamp())
                > DEMO_RENEW_BEFORE.as_secs() as i64
        })
    });
    if !ca_usable {
        init_ca(dir, "Fulcrum Demo CA", true)?;
    }
    if !ca_usable || !demo_leaf_usable(&demo) {
        issue(
            dir,
            &IssueRequest::server(DEMO_NAMES),
            &dir.join("localhost"),
        )?;
    }
    Ok(demo)
}

/// Whether the demo's certificate and key are there, belong together, chain to the CA
/// beside them and stay valid for another [`DEMO_RENEW_BEFORE`].
fn demo_leaf_usable(demo: &DemoCert) -> bool {
    let read = |path: &Path| std::fs::read(path).ok();
    let (Some(chain), Some(key), Some(ca)) = (read(&demo.cert), read(&demo.key), read(&demo.ca))
    else {
        return false;
    };
    let (Some(Ok(leaf)), Ok(ca)) = (
        CertificateDer::pem_slice_iter(&chain).next(),
        CertificateDer::from_pem_slice(&ca),
    ) else {
        return false;
    };
    let key_matches = std::str::from_utf8(&key)
        .ok()
        .and_then(|pem| KeyPair::from_pem(pem).ok())
        .zip(x509_parser::parse_x509_certificate(&leaf).ok())
        .is_some_and(|(key, (_, cert))| key.subject_public_key_info() == cert.public_key().raw);
    key_matches && serves_names_until(&leaf, &ca, &DEMO_NAMES, DEMO_RENEW_BEFORE).is_ok()
}

/// Checks that `cert` is a server certificate for `names` that chains to `ca`, and will
/// still be `ahead` from now (the CA's own expiry is not checked: a trust anchor has none).
fn serves_names_until(
    cert: &CertificateDer<'_>,
    ca: &CertificateDer<'_>,
    names: &[&str],
    ahead: Duration,
) -> Result<(), webpki::Error> {
    let anchor = webpki::anchor_from_trusted_cert(ca)?;
    let then = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            + ahead,
    );
    let leaf = webpki::EndEntityCert::try_from(cert)?;
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        then,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )?;
    for name in names {
        let name = ServerName::try_from(*name).map_err(|_| webpki::Error::UnsupportedNameType)?;
        leaf.verify_is_valid_for_subject_name(&name)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_ip_or_dns_alternative_names() {
        assert!(matches!(parse_name("127.0.0.1"), Ok(SanType::IpAddress(ip)) if ip.is_ipv4()));
        assert!(matches!(parse_name("::1"), Ok(SanType::IpAddress(ip)) if ip.is_ipv6()));
        for (name, dns) in [
            ("app.test", "app.test"),
            ("*.app.test", "*.app.test"),
            ("App.Test", "app.test"),
        ] {
            match parse_name(name) {
                Ok(SanType::DnsName(got)) => assert_eq!(got.as_str(), dns),
                other => panic!("{name}: {other:?}"),
            }
        }
        for bad in [
            "",
            "a.*.test",
            "*",
            "*app.test",
            "**.app.test",
            "app test",
            "x..y",
        ] {
            assert!(
                matches!(parse_name(bad), Err(CertError::Request(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_wildcard_prefix_spells_out_its_star() {
        assert_eq!(
            default_prefix("*.app.test"),
            PathBuf::from("_wildcard.app.test")
        );
        assert_eq!(default_prefix("127.0.0.1"), PathBuf::from("127.0.0.1"));
    }

    #[test]
    fn a_bad_request_is_refused_before_the_ca_is_read() {
        let nowhere = Path::new("/nonexistent/fulcrum-ca");
        let out = Path::new("/nonexistent/out");
        let no_names = IssueRequest::server(Vec::<String>::new());
        assert!(
            matches!(issue(nowhere, &no_names, out), Err(CertError::Request(m)) if m.contains("at least one name"))
        );
        let mut zero_days = IssueRequest::server(["app.test"]);
        zero_days.days = 0;
        assert!(matches!(
            issue(nowhere, &zero_days, out),
            Err(CertError::Request(_))
        ));
        assert!(matches!(
            issue(nowhere, &IssueRequest::server(["app.test"]), out),
            Err(CertError::NoCa { .. })
        ));
    }
}
