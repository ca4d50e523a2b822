//! What a server behind Fulcrum learns of a client's verified certificate: one header in
//! the shape Envoy's `x-forwarded-client-cert` gives it, which servers behind proxies
//! often parse already: `Hash=<SHA-256 of the DER>;Subject="CN=…";DNS=…;URI=…`.

use std::fmt::Write;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A verified client certificate as the proxy uses it.
pub struct ClientIdentity {
    /// The header value for servers.
    pub header: String,
    /// Subject CN, DNS, URI and email SANs: what routes match on.
    pub names: Vec<String>,
}

/// `None` if `cert` cannot be parsed (rustls has verified it, so that would be a bug, not a
/// client's doing).
pub fn identify(cert: &CertificateDer<'_>) -> Option<ClientIdentity> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let mut names: Vec<String> = parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_string)
        .collect();
    let mut out = String::with_capacity(160);
    out.push_str("Hash=");
    for byte in aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref()).as_ref() {
        let _ = write!(out, "{byte:02x}");
    }
    out.push_str(";Subject=\"");
    quoted(&mut out, &parsed.subject().to_string());
    out.push('"');
    if let Ok(Some(sans)) = parsed.subject_alternative_name() {
        for name in &sans.value.general_names {
            let (key, value) = match name {
                GeneralName::DNSName(dns) => ("DNS", (*dns).to_string()),
                GeneralName::URI(uri) => ("URI", (*uri).to_string()),
                GeneralName::RFC822Name(email) => ("Email", (*email).to_string()),
                _ => continue,
            };
            names.push(value.clone());
            out.push(';');
            out.push_str(key);
            out.push('=');
            if value.contains([',', ';', '=', '"']) {
                out.push('"');
                quoted(&mut out, &value);
                out.push('"');
            } else {
                quoted(&mut out, &value);
            }
        }
    }
    Some(ClientIdentity { header: out, names })
}

/// Appends `text` so that it cannot end the quoted string or the header: `"` and `\` are
/// escaped, control characters replaced.
fn quoted(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
}
