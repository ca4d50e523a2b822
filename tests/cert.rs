//! `fulcrum cert` as a user runs it: a CA made once, certificates it signs checked by an
//! independent verifier (rustls-webpki) and by real handshakes, `inspect` against its
//! own fingerprint, and the demo's certificate reused until it must not be.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::SystemTime;

use fulcrum::cert::{self, IssueRequest};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use support::{TempDir, binary};

/// Runs `fulcrum cert ARGS` in `dir`, with the default CA directory `dir/ca` and a home in
/// `dir`, so nothing outside it is touched.
fn fulcrum_cert(dir: &TempDir, args: &[&str]) -> Output {
    binary()
        .arg("cert")
        .args(args)
        .current_dir(&dir.0)
        .env("FULCRUM_CA_DIR", dir.0.join("ca"))
        .env("HOME", &dir.0)
        .env_remove("XDG_DATA_HOME")
        .output()
        .unwrap()
}

fn succeeds(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The stderr of a command that must fail with exit status 1.
fn fails(out: Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).unwrap()
}

/// A CA made by `fulcrum cert ca init` in `dir/ca`.
fn with_ca(dir: &TempDir) -> PathBuf {
    succeeds(fulcrum_cert(dir, &["ca", "init"]));
    dir.0.join("ca/ca.pem")
}

/// Whether webpki, trusting only `ca`, accepts the chain in `chain` for `usage` now.
fn verifies(chain: &Path, ca: &Path, usage: webpki::KeyUsage) -> Result<(), webpki::Error> {
    let chain = certs(chain);
    let ca = certs(ca).remove(0);
    let anchors = [webpki::anchor_from_trusted_cert(&ca).unwrap()];
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map(|_| ())
}

fn valid_for(chain: &Path, name: &str) -> bool {
    let chain = certs(chain);
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    leaf.verify_is_valid_for_subject_name(&ServerName::try_from(name).unwrap())
        .is_ok()
}

fn fingerprint(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

#[test]
fn ca_init_writes_a_private_key_and_refuses_a_second_time() {
    let dir = TempDir::new();
    let out = succeeds(fulcrum_cert(&dir, &["ca", "init"]));
    let (pem, key) = (dir.0.join("ca/ca.pem"), dir.0.join("ca/ca.key"));
    assert!(out.contains(&pem.display().to_string()), "{out}");
    assert!(out.contains("fulcrum cert issue"), "{out}");
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&dir.0.join("ca")), 0o700);

    let ca_der = certs(&pem).remove(0);
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    assert_eq!(ca.subject().to_string(), "CN=Fulcrum Development CA");
    let constraints = ca.basic_constraints().unwrap().unwrap().value;
    assert!(constraints.ca);
    assert_eq!(constraints.path_len_constraint, Some(0));
    let usage = ca.key_usage().unwrap().unwrap().value;
    assert!(usage.key_cert_sign() && usage.crl_sign() && !usage.digital_signature());
    let years = (ca.validity().not_after.timestamp() - ca.validity().not_before.timestamp())
        / (365 * 86_400);
    assert_eq!(years, 10);

    let before = std::fs::read(&pem).unwrap();
    let err = fails(fulcrum_cert(&dir, &["ca", "init"]));
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&pem).unwrap(),
        before,
        "a refused init left the CA as it was"
    );

    succeeds(fulcrum_cert(
        &dir,
        &["ca", "init", "--force", "--name", "Other CA"],
    ));
    assert_ne!(std::fs::read(&pem).unwrap(), before);
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn issue_without_a_ca_names_the_dir_and_how_to_make_one() {
    let dir = TempDir::new();
    let err = fails(fulcrum_cert(&dir, &["issue", "--name", "app.test"]));
    assert!(
        err.contains(&dir.0.join("ca").display().to_string()),
        "{err}"
    );
    assert!(err.contains("fulcrum cert ca init"), "{err}");
    assert!(!dir.0.join("app.test.pem").exists());
}

#[test]
fn a_server_certificate_chains_to_the_ca_for_its_names() {
    let dir = TempDir::new();
    let ca = with_ca(&dir);
    let out = succeeds(fulcrum_cert(
        &dir,
        &[
            "issue",
            "--name",
            "App.test",
            "--name",
            "*.app.test",
            "--name",
            "127.0.0.1",
            "--name",
            "::1",
        ],
    ));
    let (chain, key) = (dir.0.join("app.test.pem"), dir.0.join("app.test.key"));
    assert!(
        out.contains(
            "[listeners.https.tls]\ncertificates = [{ cert = \"app.test.pem\", key = \"app.test.key\" }]"
        ),
        "{out}"
    );
    assert_eq!(mode(&key), 0o600);

    // The chain file is complete: the leaf, then the CA itself.
    let chain_certs = certs(&chain);
    assert_eq!(chain_certs.len(), 2);
    assert_eq!(chain_certs[1], certs(&ca)[0]);

    verifies(&chain, &ca, webpki::KeyUsage::server_auth()).unwrap();
    assert!(verifies(&chain, &ca, webpki::KeyUsage::client_auth()).is_err());
    for name in ["app.test", "www.app.test", "127.0.0.1", "::1"] {
        assert!(valid_for(&chain, name), "{name}");
    }
    for name in ["other.test", "a.b.app.test", "127.0.0.2"] {
        assert!(!valid_for(&chain, name), "{name}");
    }

    let (_, leaf) = x509_parser::parse_x509_certificate(&chain_certs[0]).unwrap();
    assert_eq!(leaf.subject().to_string(), "CN=app.test");
    let validity = leaf.validity();
    let now = unix_now();
    assert!(validity.not_before.timestamp() <= now - 30, "backdated");
    let days = (validity.not_after.timestamp() - now) as f64 / 86_400.0;
    assert!((396.9..=397.1).contains(&days), "{days} days");
    assert!(matches!(key_of(&key), rustls::SignatureAlgorithm::ECDSA));
}

#[test]
fn a_wildcard_first_name_is_written_as_wildcard_files() {
    let dir = TempDir::new();
    with_ca(&dir);
    succeeds(fulcrum_cert(&dir, &["issue", "--name", "*.app.test"]));
    assert!(dir.0.join("_wildcard.app.test.pem").exists());
    assert!(dir.0.join("_wildcard.app.test.key").exists());

    let err = fails(fulcrum_cert(&dir, &["issue", "--name", "a.*.test"]));
    assert!(
        err.contains("a.*.test") && err.contains("wildcard"),
        "{err}"
    );
    let err = fails(fulcrum_cert(&dir, &["issue", "--name", "not a name"]));
    assert!(err.contains("not a DNS name or an IP address"), "{err}");
}

#[test]
fn a_client_certificate_is_for_client_auth_only() {
    let dir = TempDir::new();
    let ca = with_ca(&dir);
    let out = succeeds(fulcrum_cert(
        &dir,
        &[
            "issue",
            "--client",
            "--name",
            "alice.test",
            "--out",
            "certs/alice",
        ],
    ));
    assert!(out.contains("client_auth = \"required\""), "{out}");
    assert!(
        out.contains(&format!("client_ca = \"{}\"", ca.display())),
        "{out}"
    );
    let chain = dir.0.join("certs/alice.pem");
    verifies(&chain, &ca, webpki::KeyUsage::client_auth()).unwrap();
    let wrong_usage = verifies(&chain, &ca, webpki::KeyUsage::server_auth());
    assert!(
        matches!(
            wrong_usage,
            Err(webpki::Error::RequiredEkuNotFoundContext(_))
        ),
        "{wrong_usage:?}"
    );
}

#[test]
fn rsa_gives_an_rsa_2048_key_that_serves_a_handshake() {
    let dir = TempDir::new();
    let ca = with_ca(&dir);
    succeeds(fulcrum_cert(
        &dir,
        &["issue", "--rsa", "--name", "app.test", "--days", "30"],
    ));
    let (chain, key) = (dir.0.join("app.test.pem"), dir.0.join("app.test.key"));
    assert!(matches!(key_of(&key), rustls::SignatureAlgorithm::RSA));
    let leaf = &certs(&chain)[0];
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = parsed.public_key().parsed() else {
        panic!("not an RSA certificate");
    };
    let modulus = rsa.modulus.iter().skip_while(|&&b| b == 0).count();
    assert_eq!(modulus * 8, 2048);
    let usage = parsed.key_usage().unwrap().unwrap().value;
    assert!(usage.digital_signature() && usage.key_encipherment());
    verifies(&chain, &ca, webpki::KeyUsage::server_auth()).unwrap();
    handshake(&chain, &key, &ca, "app.test", None).unwrap();
}

#[test]
fn inspect_shows_subject_names_issuer_key_and_fingerprint() {
    let dir = TempDir::new();
    let ca = with_ca(&dir);
    succeeds(fulcrum_cert(
        &dir,
        &["issue", "--name", "app.test", "--name", "127.0.0.1"],
    ));
    let chain = dir.0.join("app.test.pem");
    let out = succeeds(fulcrum_cert(&dir, &["inspect", "app.test.pem"]));
    let chain_certs = certs(&chain);
    for expected in [
        "Certificate 1 of 2",
        "CN=app.test",
        "DNS:app.test, IP:127.0.0.1",
        "Issuer:",
        "CN=Fulcrum Development CA",
        "expires in 39", // 396 or 397 days, whichever side of the second it reads the clock
        "ECDSA P-256",
        "serverAuth",
        "yes (path length 0)",
        &fingerprint(&chain_certs[0]),
        &fingerprint(&chain_certs[1]),
    ] {
        assert!(out.contains(expected), "{expected:?} not in:\n{out}");
    }

    // A DER file holds one certificate.
    let der = dir.0.join("ca.der");
    std::fs::write(&der, certs(&ca)[0].as_ref()).unwrap();
    let out = succeeds(fulcrum_cert(&dir, &["inspect", der.to_str().unwrap()]));
    assert!(out.contains("CN=Fulcrum Development CA"), "{out}");
    assert!(!out.contains("of 2"), "{out}");
    assert_eq!(
        cert::inspect(&der).unwrap(),
        out,
        "the library and the command say the same"
    );
}

#[test]
fn inspect_refuses_a_key_and_other_files_clearly() {
    let dir = TempDir::new();
    with_ca(&dir);
    let err = fails(fulcrum_cert(&dir, &["inspect", "ca/ca.key"]));
    assert!(
        err.contains("ca/ca.key") && err.contains("private key, not a certificate"),
        "{err}"
    );
    std::fs::write(dir.0.join("notes.txt"), "hello\n").unwrap();
    let err = fails(fulcrum_cert(&dir, &["inspect", "notes.txt"]));
    assert!(
        err.contains("notes.txt") && err.contains("neither a PEM file nor a DER certificate"),
        "{err}"
    );
    let err = fails(fulcrum_cert(&dir, &["inspect", "missing.pem"]));
    assert!(err.contains("missing.pem"), "{err}");
}

#[test]
fn demo_certificate_is_made_once_and_made_again_when_missing_or_expiring() {
    let dir = TempDir::new();
    let demo_dir = dir.0.join("demo");
    let first = cert::demo_certificate(&demo_dir).unwrap();
    verifies(&first.cert, &first.ca, webpki::KeyUsage::server_auth()).unwrap();
    assert!(valid_for(&first.cert, "localhost") && valid_for(&first.cert, "127.0.0.1"));
    assert_eq!(mode(&first.key), 0o600);
    let leaf = |demo: &cert::DemoCert| fingerprint(&certs(&demo.cert)[0]);
    let first_leaf = leaf(&first);
    let ca_pem = std::fs::read(&first.ca).unwrap();

    let again = cert::demo_certificate(&demo_dir).unwrap();
    assert_eq!(again, first);
    assert_eq!(leaf(&again), first_leaf, "reused, not issued again");

    std::fs::remove_file(&first.cert).unwrap();
    let after_delete = cert::demo_certificate(&demo_dir).unwrap();
    assert_ne!(leaf(&after_delete), first_leaf, "issued again");
    assert_eq!(std::fs::read(&first.ca).unwrap(), ca_pem, "by the same CA");
    verifies(
        &after_delete.cert,
        &after_delete.ca,
        webpki::KeyUsage::server_auth(),
    )
    .unwrap();

    // A certificate with 10 days left is replaced; one with a year left would not be.
    let mut short = IssueRequest::server(["localhost", "127.0.0.1"]);
    short.days = 10;
    cert::issue(&demo_dir, &short, &demo_dir.join("localhost")).unwrap();
    let expiring = leaf(&after_delete); // the same path, now holding the short certificate
    let renewed = cert::demo_certificate(&demo_dir).unwrap();
    assert_ne!(leaf(&renewed), expiring);
    let renewed_der = certs(&renewed.cert).remove(0);
    let (_, parsed) = x509_parser::parse_x509_certificate(&renewed_der).unwrap();
    assert!(parsed.validity().not_after.timestamp() > unix_now() + 300 * 86_400);

    handshake(&renewed.cert, &renewed.key, &renewed.ca, "localhost", None).unwrap();
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn issued_certificates_complete_a_mutual_tls_handshake() {
    let dir = TempDir::new();
    let ca = cert::init_ca(&dir.0.join("ca"), "Test CA", false).unwrap();
    let server = cert::issue(
        &dir.0.join("ca"),
        &IssueRequest::server(["app.test", "127.0.0.1"]),
        &dir.0.join("server"),
    )
    .unwrap();
    let client = cert::issue(
        &dir.0.join("ca"),
        &IssueRequest::client(["alice.test"]),
        &dir.0.join("alice"),
    )
    .unwrap();
    assert_eq!(server.ca, ca.cert);
    handshake(
        &server.cert,
        &server.key,
        &ca.cert,
        "app.test",
        Some(&client),
    )
    .unwrap();
    handshake(&server.cert, &server.key, &ca.cert, "127.0.0.1", None).unwrap();
    // The client's certificate is not a server's: a client refuses it.
    let err = handshake(&client.cert, &client.key, &ca.cert, "alice.test", None).unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    // Nor does a client accept the server's certificate for a name it does not have.
    assert!(handshake(&server.cert, &server.key, &ca.cert, "other.test", None).is_err());
}

/// The kind of the private key in `path`, as rustls reads it.
fn key_of(path: &Path) -> rustls::SignatureAlgorithm {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .key_provider
        .load_private_key(key(path))
        .unwrap()
        .algorithm()
}

/// A TLS handshake in memory: a rustls server with `chain` and `key`, a rustls client that
/// trusts only `ca` and asks for `name` (and presents `client` when given, to a server
/// that then requires it).
fn handshake(
    chain: &Path,
    key_file: &Path,
    ca: &Path,
    name: &str,
    client: Option<&cert::Issued>,
) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs(ca).remove(0)).unwrap();
    let roots = Arc::new(roots);

    let server_builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let server_builder = match client {
        Some(_) => server_builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider.clone(),
            )
            .build()
            .unwrap(),
        ),
        None => server_builder.with_no_client_auth(),
    };
    let server_config = server_builder
        .with_single_cert(certs(chain), key(key_file))
        .map_err(|e| e.to_string())?;

    let client_builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let client_config = match client {
        Some(c) => client_builder
            .with_client_auth_cert(certs(&c.cert), key(&c.key))
            .unwrap(),
        None => client_builder.with_no_client_auth(),
    };

    let server_name = ServerName::try_from(name.to_string()).unwrap();
    let mut client_conn =
        rustls::ClientConnection::new(Arc::new(client_config), server_name).unwrap();
    let mut server_conn = rustls::ServerConnection::new(Arc::new(server_config)).unwrap();
    for _ in 0..10 {
        if !client_conn.is_handshaking() && !server_conn.is_handshaking() {
            let peer = server_conn.peer_certificates().map(<[_]>::len);
            assert_eq!(
                peer,
                client.map(|_| 2),
                "the client's chain reached the server"
            );
            return Ok(());
        }
        let mut bytes = Vec::new();
        while client_conn.wants_write() {
            client_conn.write_tls(&mut bytes).unwrap();
        }
        server_conn.read_tls(&mut &bytes[..]).unwrap();
        server_conn
            .process_new_packets()
            .map_err(|e| format!("server: {e}"))?;
        bytes.clear();
        while server_conn.wants_write() {
            server_conn.write_tls(&mut bytes).unwrap();
        }
        client_conn.read_tls(&mut &bytes[..]).unwrap();
        client_conn
            .process_new_packets()
            .map_err(|e| format!("client: {e}"))?;
    }
    Err("the handshake did not finish".into())
}

#[test]
fn the_printed_config_lines_make_a_config_fulcrum_accepts() {
    let dir = TempDir::new();
    with_ca(&dir);
    let server = succeeds(fulcrum_cert(&dir, &["issue", "--name", "app.test"]));
    let client = succeeds(fulcrum_cert(
        &dir,
        &["issue", "--client", "--name", "alice.test"],
    ));
    let pasted: Vec<&str> = server
        .lines()
        .chain(client.lines())
        .filter(|l| {
            ["certificates = ", "client_auth = ", "client_ca = "]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect();
    assert_eq!(pasted.len(), 3, "{server}{client}");
    let config = dir.0.join("fulcrum.toml");
    std::fs::write(
        &config,
        format!(
            "[listeners.https]\nbind = \"127.0.0.1:0\"\n[[listeners.https.routes]]\nupstream = \"app\"\n\n\
             [listeners.https.tls]\n{}\n\n[upstreams.app]\nservers = [{{ address = \"127.0.0.1:9\" }}]\n",
            pasted.join("\n")
        ),
    )
    .unwrap();
    let out = binary()
        .arg("check")
        .arg("-c")
        .arg(&config)
        .output()
        .unwrap();
    succeeds(out);
}
