//! Checking the TLS parts of a config: a listener's certificates (read, parsed, matched to
//! their keys and chained, now, so that `fulcrum check` finds what a start would), its
//! versions, ALPN and client certificates; and an upstream's TLS to its servers.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use toml::Spanned;

use super::{Checker, file};
use crate::config::model::{
    CLIENT_CERT_HEADER, CertificateConfig, ClientAuth, ClientCertificate, ListenerTls, RouteConfig,
    TlsVersion, TrustedCa, UpstreamTls,
};
use crate::tls::certs::{self, CertFiles, Which};

/// Sessions remembered for resumption by id, unless the config says otherwise.
const SESSION_CACHE: i64 = 10_000;

/// Headers whose place in a forwarded request Fulcrum decides: a client certificate
/// description written under one of these names would add a second framing, host or
/// forwarding header.
const MANAGED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "via",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

impl Checker {
    pub(super) fn listener_tls(
        &mut self,
        listener: &str,
        tls: Spanned<file::ListenerTls>,
    ) -> Option<ListenerTls> {
        let tls = tls.into_inner();
        let provider = crate::tls::provider();
        let now = SystemTime::now();
        let mut certificates = Vec::new();
        if tls.certificates.get_ref().is_empty() {
            self.error(
                tls.certificates.span(),
                format!("listener `{listener}` has TLS but no certificate: add {{ cert = \"site.pem\", key = \"site.key\" }} to certificates"),
            );
        }
        for entry in tls.certificates.into_inner() {
            let entry = entry.into_inner();
            let cert = self.dir.join(entry.cert.get_ref());
            let key = self.dir.join(entry.key.get_ref());
            let ocsp = entry.ocsp.as_ref().map(|o| self.dir.join(o.get_ref()));
            let files = CertFiles {
                cert: &cert,
                key: &key,
                ocsp: ocsp.as_deref(),
            };
            // Taken before reading: a change while the files are read shows as a change.
            let stamps = [Some(&cert), Some(&key), ocsp.as_ref()]
                .into_iter()
                .flatten()
                .map(|p| (p.clone(), crate::tls::watch::stamp(p)))
                .collect();
            match certs::load(&files, &provider, now) {
                Ok(loaded) => {
                    for warning in &loaded.warnings {
                        self.warn(entry.cert.span(), warning.clone());
                    }
                    certificates.push(CertificateConfig {
                        cert,
                        key,
                        ocsp,
                        loaded: Arc::new(loaded),
                        stamps,
                    });
                }
                Err(e) => {
                    let span = match e.which {
                        Which::Cert => entry.cert.span(),
                        Which::Key => entry.key.span(),
                        Which::Ocsp => entry.ocsp.as_ref().map_or(entry.cert.span(), |o| o.span()),
                    };
                    self.error(span, e.message);
                }
            }
        }
        let min_version = match tls.min_version.as_ref() {
            None => TlsVersion::V1_2,
            Some(v) => match v.get_ref().as_str() {
                "1.2" => TlsVersion::V1_2,
                "1.3" => TlsVersion::V1_3,
                other => {
                    self.error(v.span(), format!("min_version \"{other}\" is not a TLS version Fulcrum speaks: use \"1.2\" (1.2 and 1.3) or \"1.3\" (1.3 only)"));
                    TlsVersion::V1_2
                }
            },
        };
        let alpn = match tls.alpn {
            None => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Some(list) => {
                let span = list.span();
                let mut out = Vec::new();
                for p in list.into_inner() {
                    match p.get_ref().as_str() {
                        name @ ("h2" | "http/1.1") if !out.contains(&name.as_bytes().to_vec()) => {
                            out.push(name.as_bytes().to_vec())
                        }
                        name @ ("h2" | "http/1.1") => {
                            self.error(p.span(), format!("alpn lists \"{name}\" twice"))
                        }
                        other => self.error(
                            p.span(),
                            format!("alpn \"{other}\" is not a protocol Fulcrum serves: use \"h2\" and/or \"http/1.1\""),
                        ),
                    }
                }
                if out.is_empty() {
                    self.error(
                        span,
                        "alpn is empty: list \"h2\" and/or \"http/1.1\" (leave it out for both)",
                    );
                }
                out
            }
        };
        let session_cache = self.int(
            tls.session_cache.as_ref(),
            "session_cache",
            0,
            10_000_000,
            SESSION_CACHE,
        ) as usize;
        let client_ca = tls
            .client_ca
            .as_ref()
            .and_then(|ca| self.trusted_ca(ca, "client_ca"));
        let client_auth = match tls.client_auth.as_ref() {
            None => None,
            Some(mode) => match mode.get_ref().as_str() {
                "none" => None,
                "optional" | "required" => Some(mode),
                other => {
                    self.error(mode.span(), format!("client_auth \"{other}\" is not a mode: use \"none\", \"optional\" or \"required\""));
                    None
                }
            },
        };
        let client_auth = match (client_auth, client_ca, &tls.client_ca) {
            (None, _, Some(ca)) => {
                self.error(ca.span(), "client_ca is set but client_auth does not ask for client certificates: set client_auth = \"required\" (or \"optional\"), or remove client_ca");
                ClientAuth::Off
            }
            (None, _, _) => ClientAuth::Off,
            (Some(mode), None, None) => {
                self.error(mode.span(), format!("client_auth = \"{}\" needs client_ca = \"PATH\": the CA that client certificates are verified against", mode.get_ref()));
                ClientAuth::Off
            }
            (Some(_), None, Some(_)) => ClientAuth::Off,
            (Some(mode), Some(ca), _) if mode.get_ref() == "required" => ClientAuth::Required(ca),
            (Some(_), Some(ca), _) => ClientAuth::Optional(ca),
        };
        let client_cert_header = match &tls.client_cert_header {
            None => CLIENT_CERT_HEADER,
            Some(name) => match http::HeaderName::from_bytes(name.get_ref().as_bytes()) {
                Ok(header)
                    if MANAGED_HEADERS.contains(&header.as_str())
                        || header.as_str().starts_with("proxy-") =>
                {
                    self.error(name.span(), format!("client_cert_header `{}` is a header Fulcrum writes or removes itself (framing, hop-by-hop or forwarding): choose another name, such as x-forwarded-client-cert", name.get_ref()));
                    CLIENT_CERT_HEADER
                }
                Ok(header) => header,
                Err(_) => {
                    self.error(
                        name.span(),
                        format!(
                            "client_cert_header `{}` is not a header name",
                            name.get_ref()
                        ),
                    );
                    CLIENT_CERT_HEADER
                }
            },
        };
        if certificates.is_empty() {
            // Reported above: no entry, or none that loads.
            return None;
        }
        Some(ListenerTls {
            certificates,
            min_version,
            alpn,
            session_tickets: tls.session_tickets.unwrap_or(true),
            session_cache,
            client_auth,
            client_cert_header,
        })
    }

    /// Every route host of a TLS listener must be covered by one of its certificates, or
    /// its clients would be shown another name's certificate and refuse it.
    pub(super) fn hosts_covered(
        &mut self,
        listener: &str,
        tls: &ListenerTls,
        routes: &[RouteConfig],
        host_spans: &[(String, Range<usize>)],
    ) {
        if tls.certificates.is_empty() {
            return;
        }
        let mut names: Vec<&str> = Vec::new();
        for c in &tls.certificates {
            names.extend(c.loaded.names.iter().map(String::as_str));
        }
        for route in routes {
            let Some(host) = &route.host else { continue };
            // A client reaching an IP address sends no SNI and is shown the first
            // certificate, whatever the others cover.
            let by_ip = host.parse::<std::net::IpAddr>().is_ok();
            let candidates = if by_ip {
                &tls.certificates[..1]
            } else {
                &tls.certificates[..]
            };
            if candidates
                .iter()
                .any(|c| certs::covers(&c.loaded.names, host))
            {
                continue;
            }
            if by_ip {
                let span = host_spans
                    .iter()
                    .find(|(h, _)| h == host)
                    .map_or(0..0, |(_, s)| s.clone());
                self.error(span, format!("clients reach `{host}` without SNI and are shown the first certificate of listener `{listener}`, which does not cover it: put a certificate for {host} first in certificates"));
                continue;
            }
            let span = host_spans
                .iter()
                .find(|(h, _)| h == host)
                .map_or(0..0, |(_, s)| s.clone());
            self.error(
                span,
                format!(
                    "no certificate of listener `{listener}` covers host `{host}`: its certificates are for {}; add a certificate for it to certificates",
                    names.join(", ")
                ),
            );
        }
    }

    pub(super) fn upstream_tls(&mut self, tls: Spanned<file::UpstreamTls>) -> Option<UpstreamTls> {
        let tls = tls.into_inner();
        let ca = tls.ca.as_ref().and_then(|ca| self.trusted_ca(ca, "ca"));
        let server_name =
            tls.server_name.as_ref().and_then(
                |name| match rustls::pki_types::ServerName::try_from(name.get_ref().as_str()) {
                    Ok(_) => Some(name.get_ref().to_ascii_lowercase()),
                    Err(_) => {
                        self.error(
                            name.span(),
                            format!(
                                "server_name `{}` is not a DNS name or IP address",
                                name.get_ref()
                            ),
                        );
                        None
                    }
                },
            );
        let client_cert = match (&tls.cert, &tls.key) {
            (None, None) => None,
            (Some(cert), Some(key)) => self.client_certificate(cert, key),
            (Some(cert), None) => {
                self.error(cert.span(), "cert needs key = \"PATH\" beside it");
                None
            }
            (None, Some(key)) => {
                self.error(key.span(), "key needs cert = \"PATH\" beside it");
                None
            }
        };
        let insecure_skip_verify = tls
            .insecure_skip_verify
            .as_ref()
            .is_some_and(|v| *v.get_ref());
        if insecure_skip_verify && tls.ca.is_some() {
            let span = tls.ca.as_ref().map_or(0..0, |c| c.span());
            self.error(
                span,
                "ca has no effect with insecure_skip_verify = true: remove one of them",
            );
        }
        Some(UpstreamTls {
            ca,
            server_name,
            client_cert,
            insecure_skip_verify,
        })
    }

    fn trusted_ca(&mut self, path: &Spanned<String>, key: &str) -> Option<TrustedCa> {
        let full = self.dir.join(path.get_ref());
        let loaded = certs::load_ca(&full).and_then(|certificates| {
            // As strict as the verifier that will use them, so `check` finds what a start
            // (or reload) would refuse.
            let mut roots = rustls::RootCertStore::empty();
            for cert in &certificates {
                roots.add(cert.clone()).map_err(|e| {
                    format!(
                        "{} holds a certificate rustls cannot use as a trust anchor: {e}",
                        full.display()
                    )
                })?;
            }
            Ok(certificates)
        });
        match loaded {
            Ok(certificates) => Some(TrustedCa {
                path: full,
                certificates: Arc::new(certificates),
            }),
            Err(e) => {
                self.error(path.span(), format!("{key}: {e}"));
                None
            }
        }
    }

    fn client_certificate(
        &mut self,
        cert: &Spanned<String>,
        key: &Spanned<String>,
    ) -> Option<ClientCertificate> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let cert_path = self.dir.join(cert.get_ref());
        let key_path = self.dir.join(key.get_ref());
        let chain: Result<Vec<_>, _> = CertificateDer::pem_file_iter(&cert_path)
            .map_err(|e| pem_problem(&cert_path, &e))
            .and_then(|certs| {
                certs
                    .collect::<Result<_, _>>()
                    .map_err(|e| pem_problem(&cert_path, &e))
            });
        let chain = match chain {
            Ok(chain) if !chain.is_empty() => chain,
            Ok(_) => {
                self.error(
                    cert.span(),
                    format!("{} holds no CERTIFICATE block", cert_path.display()),
                );
                return None;
            }
            Err(e) => {
                self.error(cert.span(), e);
                return None;
            }
        };
        let key_der = match PrivateKeyDer::from_pem_file(&key_path) {
            Ok(k) => k,
            Err(e) => {
                self.error(key.span(), pem_problem(&key_path, &e));
                return None;
            }
        };
        let provider = crate::tls::provider();
        let signing = match provider.key_provider.load_private_key(key_der.clone_key()) {
            Ok(s) => s,
            Err(e) => {
                self.error(
                    key.span(),
                    format!("the key in {} cannot be used: {e}", key_path.display()),
                );
                return None;
            }
        };
        let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
        if certified.keys_match().is_err() {
            self.error(
                key.span(),
                format!(
                    "the key in {} does not belong to the certificate in {}",
                    key_path.display(),
                    cert_path.display()
                ),
            );
            return None;
        }
        Some(ClientCertificate {
            chain,
            key: Arc::new(key_der),
        })
    }
}

fn pem_problem(path: &Path, e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("{} cannot be read: {io}", path.display()),
        Error::NoItemsFound => format!("{} holds no PEM block of the kind needed", path.display()),
        other => format!("{} is not valid PEM: {other:?}", path.display()),
    }
}
