//! Chooses the certificate for each TLS client, by the name it asks for (SNI) and the
//! signature schemes it offers. The index is built once per set of certificates and swapped
//! whole when they are reloaded; loading and checking them is `certs`' job.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::SignatureScheme;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::certs::{KeyKind, Loaded};

/// Every scheme a server key can sign a handshake with. Each key's own share of them is found
/// once, in [`CertStore::new`], because asking the key during a handshake allocates.
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ECDSA_NISTP521_SHA512,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PKCS1_SHA256,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA512,
];

/// One certificate as the resolver sees it.
struct Candidate {
    key: Arc<CertifiedKey>,
    /// The schemes of [`SCHEMES`] its key can sign with.
    schemes: Vec<SignatureScheme>,
}

/// The certificates of one listener, indexed by name. Each list of candidates is in order of
/// preference: ECDSA, then Ed25519, then RSA (smaller and faster handshakes first), and in
/// config order among keys of one kind.
pub struct CertStore {
    /// In config order; the lists below hold indices into it.
    certs: Vec<Candidate>,
    /// Exact name (or IP address as text) → the certificates naming it.
    exact: HashMap<String, Vec<usize>>,
    /// `example.com` → the certificates naming `*.example.com`.
    wildcard: HashMap<String, Vec<usize>>,
    /// The first certificate and any others for the same names (its RSA or ECDSA twin), for
    /// clients that send no name or a name no certificate covers, as nginx and HAProxy do.
    default: Vec<usize>,
}

impl CertStore {
    /// Indexes `certs`, given in config order; the first one's group is the default.
    pub fn new(certs: Vec<Arc<Loaded>>) -> CertStore {
        let preference = |i: &usize| match certs[*i].key_kind {
            KeyKind::Ecdsa { .. } => 0,
            KeyKind::Ed25519 => 1,
            KeyKind::Rsa { .. } => 2,
        };
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, cert) in certs.iter().enumerate() {
            for name in &cert.names {
                let list = match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_default(),
                    None => exact.entry(name.clone()).or_default(),
                };
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        for list in exact.values_mut().chain(wildcard.values_mut()) {
            list.sort_by_key(preference);
        }
        let sorted_names = |cert: &Loaded| {
            let mut names = cert.names.clone();
            names.sort();
            names.dedup();
            names
        };
        let mut default = Vec::new();
        if let Some(first) = certs.first() {
            let first = sorted_names(first);
            default = (0..certs.len())
                .filter(|&i| sorted_names(&certs[i]) == first)
                .collect();
            default.sort_by_key(preference);
        }
        let certs = certs
            .iter()
            .map(|cert| Candidate {
                key: cert.key.clone(),
                schemes: SCHEMES
                    .iter()
                    .copied()
                    .filter(|scheme| cert.key.key.choose_scheme(&[*scheme]).is_some())
                    .collect(),
            })
            .collect();
        CertStore {
            certs,
            exact,
            wildcard,
            default,
        }
    }

    /// The certificate for a client that asked for `sni` (lower-case, as rustls gives it) and
    /// offers `offered`: the first that can sign with an offered scheme among those naming
    /// `sni` exactly, then those naming it by wildcard, then the default group.
    pub fn choose(
        &self,
        sni: Option<&str>,
        offered: &[SignatureScheme],
    ) -> Option<&Arc<CertifiedKey>> {
        let name = sni.map(|name| name.strip_suffix('.').unwrap_or(name));
        let exact = name.and_then(|name| self.exact.get(name));
        let wildcard = name.and_then(|name| match name.split_once('.') {
            Some((label, parent)) if !label.is_empty() => self.wildcard.get(parent),
            _ => None,
        });
        [exact, wildcard, Some(&self.default)]
            .into_iter()
            .flatten()
            .flat_map(|group| group.iter().map(|&i| &self.certs[i]))
            .find(|cert| cert.schemes.iter().any(|scheme| offered.contains(scheme)))
            .map(|cert| &cert.key)
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("certificates", &self.certs.len())
            .field("exact", &self.exact)
            .field("wildcard", &self.wildcard)
            .field("default", &self.default)
            .finish()
    }
}

/// The listener's rustls certificate resolver; reloading certificates replaces its store
/// while handshakes go on.
#[derive(Debug)]
pub struct Resolver {
    store: ArcSwap<CertStore>,
}

impl Resolver {
    pub fn new(store: CertStore) -> Resolver {
        Resolver {
            store: ArcSwap::from_pointee(store),
        }
    }

    /// Serves `store` from the next handshake on.
    pub fn replace(&self, store: CertStore) {
        self.store.store(Arc::new(store));
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let store = self.store.load();
        store
            .choose(hello.server_name(), hello.signature_schemes())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::certs::test_pki::{Ca, ECDSA, Files, RSA};
    use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};

    const ANY: &[SignatureScheme] = &[
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PKCS1_SHA256,
        SignatureScheme::ED25519,
        SignatureScheme::ECDSA_NISTP256_SHA256,
    ];
    const RSA_ONLY: &[SignatureScheme] = &[
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PKCS1_SHA256,
    ];
    const ECDSA_ONLY: &[SignatureScheme] = &[SignatureScheme::ECDSA_NISTP256_SHA256];

    /// Loads one certificate per `(names, key algorithm)`, issued by `ca`, in this order.
    fn load_all(
        ca: &Ca,
        specs: &[(&[&str], &'static rcgen::SignatureAlgorithm)],
    ) -> Vec<Arc<Loaded>> {
        let files = Files::new();
        specs
            .iter()
            .map(|(names, alg)| {
                let leaf = ca.leaf(names, alg);
                Arc::new(files.load(&[&leaf.pem, &ca.pem], &leaf.key).unwrap())
            })
            .collect()
    }

    #[test]
    fn exact_then_wildcard_then_default_with_the_key_the_client_can_use() {
        let ca = Ca::root("Test CA");
        let loaded = load_all(
            &ca,
            &[
                (&["default.test"], &ECDSA),
                (&["default.test"], &RSA),
                (&["app.test"], &RSA),
                (&["app.test"], &ECDSA),
                (&["*.wild.test"], &ECDSA),
                (&["exact.wild.test"], &RSA),
                (&["rsa.test"], &RSA),
            ],
        );
        let store = CertStore::new(loaded.clone());
        let index = |sni: Option<&str>, offered: &[SignatureScheme]| {
            let chosen = store.choose(sni, offered)?;
            loaded.iter().position(|l| Arc::ptr_eq(&l.key, chosen))
        };
        let table: &[(Option<&str>, &[SignatureScheme], Option<usize>)] = &[
            // ECDSA is preferred over the RSA twin listed first.
            (Some("app.test"), ANY, Some(3)),
            (Some("app.test"), RSA_ONLY, Some(2)),
            (Some("app.test"), ECDSA_ONLY, Some(3)),
            (Some("app.test."), ANY, Some(3)),
            (Some("a.wild.test"), ANY, Some(4)),
            // An exact name wins over a wildcard, unless its key is of no use to the client.
            (Some("exact.wild.test"), ANY, Some(5)),
            (Some("exact.wild.test"), ECDSA_ONLY, Some(4)),
            // A wildcard covers one label only.
            (Some("wild.test"), ANY, Some(0)),
            (Some("a.b.wild.test"), ANY, Some(0)),
            (None, ANY, Some(0)),
            (None, RSA_ONLY, Some(1)),
            (Some("unknown.test"), RSA_ONLY, Some(1)),
            (Some("rsa.test"), ECDSA_ONLY, Some(0)),
            (Some("app.test"), &[SignatureScheme::ED25519], None),
        ];
        for (sni, offered, expected) in table {
            assert_eq!(
                index(*sni, offered),
                *expected,
                "{sni:?} offering {offered:?}"
            );
        }
        assert!(CertStore::new(Vec::new()).choose(None, ANY).is_none());
    }

    /// A client provider that offers only the signature schemes `offer` keeps (it still
    /// verifies the chain with every algorithm).
    fn client_offering(offer: fn(SignatureScheme) -> bool) -> Arc<CryptoProvider> {
        let mut provider = aws_lc_rs::default_provider();
        let algorithms = provider.signature_verification_algorithms;
        let mapping: Vec<_> = algorithms
            .mapping
            .iter()
            .filter(|(s, _)| offer(*s))
            .copied()
            .collect();
        provider.signature_verification_algorithms = WebPkiSupportedAlgorithms {
            all: algorithms.all,
            mapping: Box::leak(mapping.into_boxed_slice()),
        };
        Arc::new(provider)
    }

    /// Hands what `from` has to send to `to`.
    fn pass(from: &mut rustls::Connection, to: &mut rustls::Connection) {
        let mut wire = Vec::new();
        from.write_tls(&mut wire).unwrap();
        let mut bytes = &wire[..];
        while !bytes.is_empty() {
            to.read_tls(&mut bytes).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    /// Completes a handshake in memory and returns the certificate the server presented.
    fn handshake(
        resolver: &Arc<Resolver>,
        ca: &Ca,
        sni: &str,
        offer: fn(SignatureScheme) -> bool,
    ) -> CertificateDer<'static> {
        let server_config =
            rustls::ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(resolver.clone());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
            .unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(client_offering(offer))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(sni.to_string()).unwrap();
        let mut client: rustls::Connection =
            rustls::ClientConnection::new(Arc::new(client_config), name)
                .unwrap()
                .into();
        let mut server: rustls::Connection = rustls::ServerConnection::new(Arc::new(server_config))
            .unwrap()
            .into();
        for _ in 0..10 {
            pass(&mut client, &mut server);
            pass(&mut server, &mut client);
            if !client.is_handshaking() && !server.is_handshaking() {
                return client.peer_certificates().unwrap()[0].clone();
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn real_handshakes_get_the_certificate_whose_key_the_client_accepts() {
        let ca = Ca::root("Test CA");
        let loaded = load_all(&ca, &[(&["both.test"], &RSA), (&["both.test"], &ECDSA)]);
        let resolver = Arc::new(Resolver::new(CertStore::new(loaded.clone())));
        let is_rsa = |s: SignatureScheme| format!("{s:?}").starts_with("RSA");
        let is_ecdsa = |s: SignatureScheme| format!("{s:?}").starts_with("ECDSA");
        assert_eq!(
            handshake(&resolver, &ca, "both.test", is_rsa),
            loaded[0].key.cert[0]
        );
        assert_eq!(
            handshake(&resolver, &ca, "both.test", is_ecdsa),
            loaded[1].key.cert[0]
        );
        assert_eq!(
            handshake(&resolver, &ca, "both.test", |_| true),
            loaded[1].key.cert[0]
        );

        // A reload serves the new certificates from the next handshake on.
        let renewed = load_all(&ca, &[(&["both.test"], &ECDSA)]);
        resolver.replace(CertStore::new(renewed.clone()));
        assert_eq!(
            handshake(&resolver, &ca, "both.test", |_| true),
            renewed[0].key.cert[0]
        );
    }
}
