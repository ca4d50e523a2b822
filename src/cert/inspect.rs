//! A description of each certificate in a file (`fulcrum cert inspect`): who it is for,
//! who signed it, until when, with which key, for what, and its fingerprint.

use std::fmt::Write;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::{PemObject, SectionKind};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED448, OID_SIG_ED25519,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::{CertError, files};

/// Describes every certificate in `path`, a PEM file (any number of certificates) or a
/// single DER certificate. A file with no certificate, such as a key, is an error.
pub fn inspect(path: &Path) -> Result<String, CertError> {
    let bytes = files::read(path)?;
    let ders = certificates_in(path, &bytes)?;
    let mut out = String::new();
    for (i, der) in ders.iter().enumerate() {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| {
            CertError::invalid(
                path,
                format!("certificate {} is not valid X.509: {e}", i + 1),
            )
        })?;
        if i > 0 {
            out.push('\n');
        }
        if ders.len() > 1 {
            let _ = writeln!(out, "Certificate {} of {}", i + 1, ders.len());
        }
        describe(&mut out, &cert, der);
    }
    Ok(out)
}

/// The DER of each certificate in `bytes`: PEM if it looks like PEM, else one DER certificate.
fn certificates_in(path: &Path, bytes: &[u8]) -> Result<Vec<Vec<u8>>, CertError> {
    if bytes.is_empty() {
        return Err(CertError::invalid(path, "empty file"));
    }
    if !contains(bytes, b"-----BEGIN ") {
        return match X509Certificate::from_der(bytes) {
            Ok(_) => Ok(vec![bytes.to_vec()]),
            Err(_) => Err(CertError::invalid(
                path,
                "neither a PEM file nor a DER certificate",
            )),
        };
    }
    let mut certs = Vec::new();
    let mut keys = 0;
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes) {
        match section.map_err(|e| CertError::invalid(path, format!("broken PEM: {e}")))? {
            (SectionKind::Certificate, der) => certs.push(der),
            (
                SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey,
                _,
            ) => keys += 1,
            _ => {}
        }
    }
    if certs.is_empty() {
        let what = if keys > 0 || contains(bytes, b"PRIVATE KEY-----") {
            "holds a private key, not a certificate"
        } else {
            "holds no certificate"
        };
        return Err(CertError::invalid(path, what));
    }
    Ok(certs)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn describe(out: &mut String, cert: &X509Certificate<'_>, der: &[u8]) {
    let field = |out: &mut String, label: &str, value: &dyn std::fmt::Display| {
        let _ = writeln!(out, "  {label:<21}{value}");
    };
    field(out, "Subject:", &name_or_empty(cert.subject().to_string()));
    field(out, "Names (SAN):", &alt_names(cert));
    field(out, "Issuer:", &name_or_empty(cert.issuer().to_string()));
    let validity = cert.validity();
    field(out, "Not before:", &date(validity.not_before.timestamp()));
    let left = files::seconds_from_now(validity.not_after.timestamp());
    let status = if files::seconds_from_now(validity.not_before.timestamp()) > 0 {
        "not yet valid".to_string()
    } else if left <= 0 {
        "expired".to_string()
    } else {
        format!("expires in {} days", left / 86_400)
    };
    let not_after = format!("{} ({status})", date(validity.not_after.timestamp()));
    field(out, "Not after:", &not_after);
    field(out, "Key:", &key_type(cert));
    let ca = match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => match bc.value.path_len_constraint {
            Some(n) => format!("yes (path length {n})"),
            None => "yes".into(),
        },
        _ => "no".into(),
    };
    field(out, "CA:", &ca);
    if let Ok(Some(usage)) = cert.key_usage() {
        field(out, "Key usage:", &usage.value);
    }
    field(out, "Extended key usage:", &extended_usage(cert));
    field(out, "SHA-256 fingerprint:", &fingerprint_sha256(der));
}

fn name_or_empty(name: String) -> String {
    if name.is_empty() {
        "(empty)".into()
    } else {
        name
    }
}

fn alt_names(cert: &X509Certificate<'_>) -> String {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return "(none)".into();
    };
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(dns) => format!("DNS:{dns}"),
            GeneralName::IPAddress(bytes) => match ip_from(bytes) {
                Some(ip) => format!("IP:{ip}"),
                None => format!("IP:(malformed, {} bytes)", bytes.len()),
            },
            GeneralName::RFC822Name(email) => format!("email:{email}"),
            GeneralName::URI(uri) => format!("URI:{uri}"),
            other => format!("{other:?}"),
        })
        .collect();
    names.join(", ")
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn key_type(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == OID_PKCS1_RSAENCRYPTION {
        // The modulus's length without its leading zero bytes and bits.
        let bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => {
                let modulus = rsa.modulus;
                match modulus.iter().position(|&b| b != 0) {
                    Some(i) => (modulus.len() - i) * 8 - modulus[i].leading_zeros() as usize,
                    None => 0,
                }
            }
            _ => 0,
        };
        format!("RSA {bits}")
    } else if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => "ECDSA P-256".into(),
            Some(c) if c == OID_NIST_EC_P384 => "ECDSA P-384".into(),
            Some(c) if c == OID_NIST_EC_P521 => "ECDSA P-521".into(),
            Some(c) => format!("ECDSA (curve {c})"),
            None => "ECDSA (unnamed curve)".into(),
        }
    } else if *algorithm == OID_SIG_ED25519 {
        "Ed25519".into()
    } else if *algorithm == OID_SIG_ED448 {
        "Ed448".into()
    } else {
        format!("other ({algorithm})")
    }
}

fn extended_usage(cert: &X509Certificate<'_>) -> String {
    let Ok(Some(eku)) = cert.extended_key_usage() else {
        return "(none: any)".into();
    };
    let eku = eku.value;
    let mut uses: Vec<String> = [
        (eku.any, "any"),
        (eku.server_auth, "serverAuth"),
        (eku.client_auth, "clientAuth"),
        (eku.code_signing, "codeSigning"),
        (eku.email_protection, "emailProtection"),
        (eku.time_stamping, "timeStamping"),
        (eku.ocsp_signing, "OCSPSigning"),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .map(|(_, name)| name.to_string())
    .collect();
    uses.extend(eku.other.iter().map(|oid| oid.to_string()));
    uses.join(", ")
}

/// The SHA-256 of `der` as colon-separated upper-case hex, as `openssl x509 -fingerprint
/// -sha256` prints it.
pub fn fingerprint_sha256(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut out = String::with_capacity(95);
    for (i, byte) in digest.as_ref().iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{byte:02X}");
    }
    out
}

/// A Unix time as `2025-03-05 12:00:00 UTC`.
fn date(unix_seconds: i64) -> String {
    let time = match u64::try_from(unix_seconds) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => return format!("{unix_seconds} seconds since 1970"),
    };
    let rfc3339 = humantime::format_rfc3339_seconds(time).to_string();
    format!(
        "{} UTC",
        rfc3339.trim_end_matches('Z').replacen('T', " ", 1)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_read_as_openssl_prints_them() {
        // SHA-256 of nothing.
        assert_eq!(
            fingerprint_sha256(b""),
            "E3:B0:C4:42:98:FC:1C:14:9A:FB:F4:C8:99:6F:B9:24:\
             27:AE:41:E4:64:9B:93:4C:A4:95:99:1B:78:52:B8:55"
        );
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(date(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(date(1_741_176_000), "2025-03-05 12:00:00 UTC");
    }
}
