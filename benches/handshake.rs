//! TLS handshakes in memory, as Fulcrum's listeners do them: a rustls `ServerConnection`
//! and a `ClientConnection` exchanging their bytes through a `Vec<u8>` (no sockets), with
//! an ECDSA P-256 certificate issued by a CA (both made with rcgen), for rustls' aws-lc-rs
//! provider (Fulcrum's) against its ring provider.
//!
//! `cargo bench --bench handshake --features bench-ring` (the feature adds rustls' ring
//! provider; results in bench/README.md).
//!
//! The client offers X25519 alone, as the OpenSSL 3.0 clients of `bench/run.py` (wrk,
//! h2load) do, unless a benchmark says otherwise, and checks the certificate against the
//! CA. Each handshake is a fresh pair of connections; the server's side (creating its
//! connection, reading the client's flights, writing its own, dropping it) is timed apart
//! from the client's, with `iter_custom`:
//!
//! - `tls13_full_server`: TLS 1.3, no resumption (no tickets sent: the server has neither a
//!   ticketer nor a session cache, as a listener with `session_tickets = false` and
//!   `session_cache = 0`), with the suite OpenSSL clients get (TLS_AES_256_GCM_SHA384);
//!   also with TLS_AES_128_GCM_SHA256 (a key schedule on SHA-256 rather than SHA-384), and
//!   with X25519MLKEM768, which Fulcrum prefers and current browsers offer (aws-lc-rs
//!   only: ring has no ML-KEM);
//! - `tls13_full_both`: the same handshakes, client and server together;
//! - `tls12_full_server`: TLS 1.2 (ECDHE-ECDSA, extended master secret), no resumption;
//! - `tls13_resumed_server`: TLS 1.3 resumed with a ticket (`psk_dhe_ke`: X25519 still),
//!   the server as Fulcrum's defaults set it up (a rotating ticketer and a session cache),
//!   sending two new tickets after the handshake as it does after a full one;
//! - `tls13_full_tickets_server`: a full TLS 1.3 handshake by that same server, which then
//!   sends two tickets (Fulcrum's default listener, a client without a session);
//! - `primitives`: the server's public-key work in one full handshake, alone: an X25519
//!   key pair and agreement, and one ECDSA P-256 signature.
//!
//! Allocations go through mimalloc, as in Fulcrum. Before the benchmarks, the memory an
//! idle server session holds is printed (resident memory over 4,000 of them).

use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use rustls::client::Resumption;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, ServerSessionMemoryCache};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls::{SignatureScheme, SupportedProtocolVersion};

/// Fulcrum's allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The server's certificate chain (the leaf alone, as `bench/run.py` serves it) and key,
/// and the CA the client trusts.
struct Pki {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

fn pki() -> Pki {
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let ca_key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Fulcrum benchmark CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();

    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = params.signed_by(&key, &ca).unwrap();
    Pki {
        ca: ca.der().clone(),
        chain: vec![leaf.der().clone()],
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    }
}

#[derive(Clone, Copy)]
enum Provider {
    AwsLcRs,
    Ring,
}

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Provider::AwsLcRs => "aws-lc-rs",
            Provider::Ring => "ring",
        }
    }

    fn get(self) -> CryptoProvider {
        match self {
            Provider::AwsLcRs => rustls::crypto::aws_lc_rs::default_provider(),
            Provider::Ring => rustls::crypto::ring::default_provider(),
        }
    }

    fn x25519(self) -> &'static dyn SupportedKxGroup {
        match self {
            Provider::AwsLcRs => rustls::crypto::aws_lc_rs::kx_group::X25519,
            Provider::Ring => rustls::crypto::ring::kx_group::X25519,
        }
    }

    fn ticketer(self) -> Arc<dyn rustls::server::ProducesTickets> {
        match self {
            Provider::AwsLcRs => rustls::crypto::aws_lc_rs::Ticketer::new().unwrap(),
            Provider::Ring => rustls::crypto::ring::Ticketer::new().unwrap(),
        }
    }
}

const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
const BOTH: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A server as a Fulcrum listener sets one up (TLS 1.2 and 1.3, ALPN h2 and http/1.1), with
/// the provider's default key exchange groups; `resumption`: Fulcrum's defaults (tickets
/// and a 10,000-session cache), otherwise neither.
fn server_config(provider: Provider, pki: &Pki, resumption: bool) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider.get()))
        .with_protocol_versions(BOTH)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pki.chain.clone(), PrivateKeyDer::Pkcs8(pki.key.clone_key()))
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if resumption {
        config.session_storage = ServerSessionMemoryCache::new(10_000);
        config.ticketer = provider.ticketer();
    } else {
        config.session_storage = Arc::new(NoServerSessionStorage {});
    }
    Arc::new(config)
}

/// A client offering `versions` and the key exchange `group`, checking the server's
/// certificate, asking for http/1.1; `resumption`: keeps tickets (rustls' default memory
/// store), otherwise none. It offers the provider's cipher suites, which for TLS 1.3 put
/// TLS_AES_256_GCM_SHA384 first (as OpenSSL's clients do, so that is what the servers
/// pick), unless `suite` names the one to offer alone.
fn client_config(
    provider: Provider,
    pki: &Pki,
    versions: &[&'static SupportedProtocolVersion],
    group: &'static dyn SupportedKxGroup,
    resumption: bool,
) -> Arc<ClientConfig> {
    client_config_with(provider, pki, versions, group, resumption, None)
}

fn client_config_with(
    provider: Provider,
    pki: &Pki,
    versions: &[&'static SupportedProtocolVersion],
    group: &'static dyn SupportedKxGroup,
    resumption: bool,
    suite: Option<rustls::CipherSuite>,
) -> Arc<ClientConfig> {
    let mut crypto = CryptoProvider {
        kx_groups: vec![group],
        ..provider.get()
    };
    if let Some(suite) = suite {
        crypto.cipher_suites.retain(|s| s.suite() == suite);
    }
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let mut config = ClientConfig::builder_with_provider(Arc::new(crypto))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resumption {
        config.resumption = Resumption::disabled();
    }
    Arc::new(config)
}

/// Moves everything `from` has to send into `to`, processing it. Returns the time `from`
/// took to write and `to` took to read, as (from, to).
fn transfer(
    from: &mut rustls::Connection,
    to: &mut rustls::Connection,
    buf: &mut Vec<u8>,
) -> (Duration, Duration) {
    buf.clear();
    let start = Instant::now();
    while from.wants_write() {
        from.write_tls(buf).unwrap();
    }
    let wrote = start.elapsed();
    if buf.is_empty() {
        return (wrote, Duration::ZERO);
    }
    let start = Instant::now();
    let mut rest: &[u8] = buf;
    while !rest.is_empty() {
        to.read_tls(&mut rest).unwrap();
        to.process_new_packets().unwrap();
    }
    (wrote, start.elapsed())
}

/// One handshake on fresh connections, until neither side has anything left to send (the
/// server's tickets included). Returns the server's time and the client's.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> (Duration, Duration) {
    let name = ServerName::try_from("localhost").unwrap();
    let start = Instant::now();
    let mut c: rustls::Connection = ClientConnection::new(client.clone(), name).unwrap().into();
    let mut client_time = start.elapsed();
    let start = Instant::now();
    let mut s: rustls::Connection = ServerConnection::new(server.clone()).unwrap().into();
    let mut server_time = start.elapsed();
    let mut buf = Vec::with_capacity(8192);
    loop {
        let (cw, sr) = transfer(&mut c, &mut s, &mut buf);
        let (sw, cr) = transfer(&mut s, &mut c, &mut buf);
        client_time += cw + cr;
        server_time += sr + sw;
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            break;
        }
    }
    let start = Instant::now();
    drop(s);
    server_time += start.elapsed();
    drop(c);
    (server_time, client_time)
}

/// Checks once that the pair negotiates what the benchmark says, and, with `resumed`,
/// that a second handshake resumes; prints the suite and key exchange of the last.
fn check(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>, version: u16, resumed: bool) {
    let name = ServerName::try_from("localhost").unwrap();
    let rounds = if resumed { 2 } else { 1 };
    for round in 0..rounds {
        let mut c: rustls::Connection = ClientConnection::new(client.clone(), name.clone())
            .unwrap()
            .into();
        let mut s: rustls::Connection = ServerConnection::new(server.clone()).unwrap().into();
        let mut buf = Vec::new();
        while c.is_handshaking() || s.is_handshaking() || c.wants_write() || s.wants_write() {
            transfer(&mut c, &mut s, &mut buf);
            transfer(&mut s, &mut c, &mut buf);
        }
        assert_eq!(
            u16::from(s.protocol_version().unwrap()),
            version,
            "protocol version"
        );
        assert_eq!(s.alpn_protocol(), Some(&b"http/1.1"[..]));
        let rustls::Connection::Client(client_conn) = &c else {
            unreachable!()
        };
        let kind = client_conn.handshake_kind().unwrap();
        let want = if round == 1 {
            rustls::HandshakeKind::Resumed
        } else {
            rustls::HandshakeKind::Full
        };
        assert_eq!(kind, want, "handshake kind in round {round}");
        if round + 1 == rounds {
            eprintln!(
                "checked: {:?}, {:?}, {:?}, {:?}",
                s.protocol_version().unwrap(),
                s.negotiated_cipher_suite().unwrap().suite(),
                s.negotiated_key_exchange_group().map(|g| g.name()),
                kind,
            );
        }
    }
}

/// This process's resident memory, in bytes.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// A server session after a full TLS 1.3 handshake, one request and its 1 KiB response,
/// with nothing left to read or send: the client's side is dropped.
fn idle_session(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> rustls::Connection {
    let name = ServerName::try_from("localhost").unwrap();
    let mut c: rustls::Connection = ClientConnection::new(client.clone(), name).unwrap().into();
    let mut s: rustls::Connection = ServerConnection::new(server.clone()).unwrap().into();
    let mut buf = Vec::new();
    while c.is_handshaking() || s.is_handshaking() || c.wants_write() || s.wants_write() {
        transfer(&mut c, &mut s, &mut buf);
        transfer(&mut s, &mut c, &mut buf);
    }
    c.writer()
        .write_all(b"GET /1k HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    transfer(&mut c, &mut s, &mut buf);
    let mut request = [0u8; 256];
    let _ = s.reader().read(&mut request).unwrap();
    s.writer().write_all(&[b'x'; 1024 + 100]).unwrap();
    transfer(&mut s, &mut c, &mut buf);
    let mut response = vec![0u8; 2048];
    let _ = c.reader().read(&mut response).unwrap();
    s
}

/// The memory an idle server session holds (heap of both Rust and aws-lc's or ring's C
/// code, and the session's own 1,168-byte struct): resident memory grown over 4,000 of
/// them, made one after another and kept, divided by 4,000, as bench/memory.py does for
/// whole proxies. Printed once per provider. The sessions are returned, to be kept: the
/// next provider's must not fill the pages these would free.
fn session_memory(provider: Provider, pki: &Pki) -> Vec<rustls::Connection> {
    const SESSIONS: usize = 4000;
    let server = server_config(provider, pki, true);
    let client = client_config(provider, pki, TLS13, provider.x25519(), false);
    // Warm-up: the allocator's first pages and the configs' lazily made parts.
    for _ in 0..200 {
        drop(idle_session(&client, &server));
    }
    let mut sessions = Vec::with_capacity(SESSIONS);
    let before = rss();
    for _ in 0..SESSIONS {
        sessions.push(idle_session(&client, &server));
    }
    let after = rss();
    eprintln!(
        "{}: an idle server session (TLS 1.3, after one request) holds {:.1} KiB (resident memory over {SESSIONS})",
        provider.name(),
        (after - before) as f64 / SESSIONS as f64 / 1024.0,
    );
    sessions
}

/// Times the server's side of `handshake` over `iters` handshakes.
fn server_side(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        total += handshake(client, server).0;
    }
    total
}

fn benches(c: &mut Criterion) {
    let pki = pki();
    let kept: Vec<_> = [Provider::AwsLcRs, Provider::Ring]
        .into_iter()
        .map(|provider| session_memory(provider, &pki))
        .collect();
    drop(kept);
    let providers = [Provider::AwsLcRs, Provider::Ring];

    let mut group = c.benchmark_group("tls13_full_server");
    for provider in providers {
        let server = server_config(provider, &pki, false);
        let client = client_config(provider, &pki, TLS13, provider.x25519(), false);
        check(&client, &server, 0x0304, false);
        group.bench_function(format!("{}, X25519", provider.name()), |b| {
            b.iter_custom(|iters| server_side(&client, &server, iters))
        });
    }
    // TLS_AES_128_GCM_SHA256: its key schedule and transcript hash on SHA-256 rather
    // than SHA-384 (as a server preferring that suite would choose).
    for provider in providers {
        let server = server_config(provider, &pki, false);
        let client = client_config_with(
            provider,
            &pki,
            TLS13,
            provider.x25519(),
            false,
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
        );
        check(&client, &server, 0x0304, false);
        group.bench_function(
            format!("{}, X25519, AES-128-GCM-SHA256", provider.name()),
            |b| b.iter_custom(|iters| server_side(&client, &server, iters)),
        );
    }
    {
        let provider = Provider::AwsLcRs;
        let server = server_config(provider, &pki, false);
        let group_pq = rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768;
        let client = client_config(provider, &pki, TLS13, group_pq, false);
        check(&client, &server, 0x0304, false);
        group.bench_function("aws-lc-rs, X25519MLKEM768", |b| {
            b.iter_custom(|iters| server_side(&client, &server, iters))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("tls13_full_both");
    for provider in providers {
        let server = server_config(provider, &pki, false);
        let client = client_config(provider, &pki, TLS13, provider.x25519(), false);
        group.bench_function(format!("{}, X25519", provider.name()), |b| {
            b.iter(|| black_box(handshake(&client, &server)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("tls12_full_server");
    for provider in providers {
        let server = server_config(provider, &pki, false);
        let client = client_config(provider, &pki, TLS12, provider.x25519(), false);
        check(&client, &server, 0x0303, false);
        group.bench_function(format!("{}, X25519", provider.name()), |b| {
            b.iter_custom(|iters| server_side(&client, &server, iters))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("tls13_resumed_server");
    for provider in providers {
        let server = server_config(provider, &pki, true);
        let client = client_config(provider, &pki, TLS13, provider.x25519(), true);
        check(&client, &server, 0x0304, true);
        // Every handshake after the first resumes: each leaves two fresh tickets behind.
        handshake(&client, &server);
        group.bench_function(format!("{}, X25519", provider.name()), |b| {
            b.iter_custom(|iters| server_side(&client, &server, iters))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("tls13_full_tickets_server");
    for provider in providers {
        let server = server_config(provider, &pki, true);
        let client = client_config(provider, &pki, TLS13, provider.x25519(), false);
        check(&client, &server, 0x0304, false);
        group.bench_function(format!("{}, X25519", provider.name()), |b| {
            b.iter_custom(|iters| server_side(&client, &server, iters))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("primitives");
    for provider in providers {
        let peer = provider.x25519().start().unwrap();
        let peer_pub = peer.pub_key().to_vec();
        group.bench_function(
            format!("{}, X25519 key pair and agreement", provider.name()),
            |b| b.iter(|| black_box(provider.x25519().start_and_complete(&peer_pub).unwrap())),
        );
        let key = provider
            .get()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(pki.key.clone_key()))
            .unwrap();
        let signer = key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .unwrap();
        let message = [0x20u8; 130];
        group.bench_function(format!("{}, ECDSA P-256 signature", provider.name()), |b| {
            b.iter(|| black_box(signer.sign(&message).unwrap()))
        });
    }
    group.finish();
}

criterion_group! {
    name = handshake_benches;
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = benches
}
criterion_main!(handshake_benches);
