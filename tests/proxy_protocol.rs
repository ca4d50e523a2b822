//! The PROXY protocol both ways, end to end on 127.0.0.1: Fulcrum's v1 and v2 headers read
//! by a server that parses them with the `ppp` crate; headers from a trusted proxy in front
//! on tcp and http listeners (the client it names reaches the server's header,
//! X-Forwarded-For and the access log, over TLS too); a header from anyone else refused,
//! and a trusted proxy that sends none closed.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ppp::PartialResult;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::l4::{Read, SeenHeader, TcpServer, connect_from, read_line, read_within, servers};
use support::tls::{Key, Pki, client_config};
use support::{Backend, Process, Proxy, simple_config, statuses};

const LONG: Duration = Duration::from_secs(10);

/// The client a trusted proxy names in its headers: another loopback address than the one
/// the test connects from, so that it cannot be mistaken for the connection's own.
const CLIENT: &str = "127.66.0.7:4242";
/// The address that client connected to, as the proxy says.
const ORIGINAL_DESTINATION: &str = "127.0.0.80:7000";

fn v1_header() -> Vec<u8> {
    b"PROXY TCP4 127.66.0.7 127.0.0.80 4242 7000\r\n".to_vec()
}

fn v2_header() -> Vec<u8> {
    let source: SocketAddr = CLIENT.parse().unwrap();
    let destination: SocketAddr = ORIGINAL_DESTINATION.parse().unwrap();
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (source, destination),
    )
    .build()
    .unwrap()
}

/// A tcp listener over `server`, with `listener` and `upstream` lines.
fn tcp_config(server: SocketAddr, listener: &str, upstream: &str) -> String {
    format!(
        "[listeners.t]\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"app\"\n{listener}\n\
         [upstreams.app]\n{}\n{upstream}\n",
        servers(&[server])
    )
}

async fn wait_for_header(server: &TcpServer) -> SeenHeader {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        if let Some(header) = server.counts.headers.lock().unwrap().first() {
            return header.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no header reached the server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn fulcrum_sends_v1_and_v2_with_the_client_and_the_listener_address() {
    for version in ["v1", "v2"] {
        let server = TcpServer::reading_proxy_header("a").await;
        let proxy = Proxy::start(
            &tcp_config(server.addr, "", &format!("proxy_protocol = \"{version}\"")),
            &[],
        )
        .await;
        let mut stream = connect_from("127.0.0.5", proxy.addr).await;
        let client = stream.local_addr().unwrap();
        stream.write_all(b"after the header\n").await.unwrap();
        assert_eq!(read_line(&mut stream).await.unwrap(), "a");
        assert_eq!(read_line(&mut stream).await.unwrap(), "after the header");
        assert_eq!(
            wait_for_header(&server).await,
            Ok(Some((client, proxy.addr))),
            "{version}"
        );
    }
}

#[tokio::test]
async fn a_trusted_proxy_names_the_client_in_the_header_fulcrum_sends_on() {
    for (version, header) in [("v1", v1_header()), ("v2", v2_header())] {
        let server = TcpServer::reading_proxy_header("a").await;
        let proxy = Proxy::start(
            &tcp_config(
                server.addr,
                "proxy_protocol_from = [\"127.0.0.0/8\"]",
                "proxy_protocol = \"v2\"",
            ),
            &[],
        )
        .await;
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        // The header and the first bytes of the client's own in one segment: only the
        // header is taken.
        let mut first = header.clone();
        first.extend_from_slice(b"client bytes\n");
        stream.write_all(&first).await.unwrap();
        assert_eq!(read_line(&mut stream).await.unwrap(), "a");
        assert_eq!(read_line(&mut stream).await.unwrap(), "client bytes");
        assert_eq!(
            wait_for_header(&server).await,
            Ok(Some((
                CLIENT.parse().unwrap(),
                ORIGINAL_DESTINATION.parse().unwrap()
            ))),
            "client sent {version}"
        );
    }
}

/// Reads until the connection ends, which must be by a reset (what came before it, such as
/// the server's greeting, is dropped).
async fn reset_within(stream: &mut TcpStream) {
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(LONG, stream.read_to_end(&mut rest))
        .await
        .expect("the connection was not closed");
    let error = ended.expect_err("closed with FIN, not reset");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn a_header_from_an_untrusted_client_never_reaches_the_server() {
    let server = TcpServer::named("a").await;
    // Only 127.0.0.2 may send headers; the test connects from 127.0.0.1.
    let fulcrum = Process::start(
        &tcp_config(server.addr, "proxy_protocol_from = [\"127.0.0.2\"]", ""),
        &[],
    );
    for header in [v1_header(), v2_header()] {
        // Whole in one segment, and cut inside the signature with a pause between the
        // pieces (so that no single read shows the whole signature).
        // (A write after the reset came would take the error the test looks for.)
        let mut whole = header.clone();
        whole.extend_from_slice(b"more\n");
        for cut in [0, 4, 2] {
            let mut stream = TcpStream::connect(fulcrum.addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            if cut > 0 {
                stream.write_all(&whole[..cut]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            stream.write_all(&whole[cut..]).await.unwrap();
            reset_within(&mut stream).await;
        }
    }
    let line = fulcrum.stdout_line("refused_proxy_header").await;
    assert!(line.contains("client=127.0.0.1:"), "{line}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.counts.received.load(Ordering::SeqCst), 0);
    // The same client without a header is served, even when its bytes begin like one and
    // come in pieces.
    for (first, rest) in [
        (&b"plain\n"[..], &b""[..]),
        (b"P", b"ING\n"),
        (b"PROX", b"IMA\n"),
    ] {
        let mut stream = TcpStream::connect(fulcrum.addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        stream.write_all(first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        stream.write_all(rest).await.unwrap();
        assert_eq!(read_line(&mut stream).await.unwrap(), "a");
        let mut whole = first.to_vec();
        whole.extend_from_slice(rest);
        let whole = String::from_utf8(whole).unwrap();
        assert_eq!(read_line(&mut stream).await.unwrap(), whole.trim_end());
    }
}

#[tokio::test]
async fn a_trusted_proxy_without_a_header_is_closed() {
    let server = TcpServer::named("a").await;
    let proxy = Proxy::start(
        &tcp_config(server.addr, "proxy_protocol_from = [\"127.0.0.1/32\"]", ""),
        &[],
    )
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"hello there\n").await.unwrap();
    let read = read_within(&mut stream, LONG).await;
    assert!(matches!(read, Read::Eof | Read::Error(_)), "{read:?}");
    assert_eq!(server.accepted(), 0);
}

/// An HTTP listener taking PROXY headers from `trusted`, with the access log on.
fn http_config(trusted: &str) -> String {
    simple_config(1, "").replace(
        "bind = \"127.0.0.1:0\"\n",
        &format!("bind = \"127.0.0.1:0\"\nproxy_protocol_from = [\"{trusted}\"]\n"),
    )
}

#[tokio::test]
async fn http_listener_takes_the_client_from_a_trusted_proxy_s_header() {
    let backend = Backend::named("a").await;
    let fulcrum = Process::start(&http_config("127.0.0.1/32"), &[&backend]);
    for (path, header) in [("/v1", v1_header()), ("/v2", v2_header())] {
        let mut request = header;
        request.extend_from_slice(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        );
        let answer = support::raw(fulcrum.addr, &request).await;
        assert_eq!(statuses(&answer), [200], "{answer}");
        let seen = backend.seen.last();
        assert_eq!(seen.headers["x-forwarded-for"], "127.66.0.7", "{path}");
        let forwarded = seen.headers["forwarded"].to_str().unwrap();
        assert!(forwarded.starts_with("for=127.66.0.7;"), "{forwarded}");
        let line = fulcrum.stdout_line(path).await;
        assert!(line.contains("client=127.66.0.7"), "{line}");
    }
}

#[tokio::test]
async fn http_listener_refuses_a_header_from_an_untrusted_client_and_closes_a_silent_proxy() {
    let backend = Backend::named("a").await;
    let untrusted = Proxy::start(&http_config("127.0.0.2/32"), &[&backend]).await;
    let mut request = v1_header();
    request.extend_from_slice(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
    let answer = support::raw(untrusted.addr, &request).await;
    assert_eq!(statuses(&answer), [400], "{answer}");
    let trusted = Proxy::start(&http_config("127.0.0.0/8"), &[&backend]).await;
    let answer = support::raw(trusted.addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(answer, "");
    assert_eq!(backend.seen.count(), 0);
}

#[tokio::test]
async fn https_listener_reads_the_header_before_the_handshake() {
    let pki = Pki::new();
    let cert = pki.server("web", &["web.test"], Key::Ecdsa);
    let backend = Backend::named("a").await;
    let config = format!(
        "[listeners.https]\nbind = \"127.0.0.1:0\"\nproxy_protocol_from = [\"127.0.0.1\"]\n\
         [[listeners.https.routes]]\nupstream = \"app\"\n\
         [listeners.https.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n\
         [upstreams.app]\nservers = [{{ address = \"{{0}}\" }}]\n",
        cert.cert.display(),
        cert.key.display()
    );
    let proxy = Proxy::start(&config, &[&backend]).await;
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(&v2_header()).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&pki, &[])));
    let mut tls = tokio::time::timeout(
        LONG,
        connector.connect(ServerName::try_from("web.test").unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap();
    let (status, body) = support::tls::get(&mut tls, "web.test", "/").await;
    assert_eq!((status, body.as_str()), (200, "a"));
    let seen = backend.seen.last();
    assert_eq!(seen.headers["x-forwarded-for"], "127.66.0.7");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    // From an address not in proxy_protocol_from the header is taken for TLS, which fails.
    let mut tcp = connect_from("127.0.0.2", proxy.addr).await;
    tcp.write_all(&v2_header()).await.unwrap();
    let handshake = tokio::time::timeout(
        LONG,
        connector.connect(ServerName::try_from("web.test").unwrap(), tcp),
    )
    .await
    .unwrap();
    assert!(handshake.is_err());
    assert_eq!(backend.seen.count(), 1);
}

#[tokio::test]
async fn tcp_access_log_names_the_proxied_client_and_how_each_connection_ended() {
    let server = TcpServer::named("a").await;
    let fulcrum = Process::start(
        &tcp_config(server.addr, "proxy_protocol_from = [\"127.0.0.1\"]", ""),
        &[],
    );
    let mut stream = TcpStream::connect(fulcrum.addr).await.unwrap();
    let mut first = v1_header();
    first.extend_from_slice(b"12345\n");
    stream.write_all(&first).await.unwrap();
    assert_eq!(read_line(&mut stream).await.unwrap(), "a");
    assert_eq!(read_line(&mut stream).await.unwrap(), "12345");
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(LONG, stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let line = fulcrum.stdout_line("client=127.66.0.7").await;
    for field in [
        "mode=\"tcp\"",
        "listener=\"t\"",
        &format!("server={}", server.addr),
        "bytes_from_client=6",
        "bytes_from_server=8",
        "end=\"closed\"",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
    // A proxy that sends no header: closed, and logged as such.
    let mut stream = TcpStream::connect(fulcrum.addr).await.unwrap();
    stream.write_all(b"no header here\r\n").await.unwrap();
    let line = fulcrum.stdout_line("bad_proxy_header").await;
    assert!(line.contains("client=127.0.0.1:"), "{line}");
}

/// An HTTP server that wants every connection to open with a PROXY header (parsed with
/// `ppp`): with one, it answers `200 ok` to one request and closes; without, it closes at
/// once. Counts the requests it answered and the connections it turned away.
async fn http_behind_proxy_header() -> (SocketAddr, Arc<[std::sync::atomic::AtomicUsize; 2]>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts: Arc<[std::sync::atomic::AtomicUsize; 2]> = Arc::default();
    let seen = counts.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let served = tokio::time::timeout(LONG, async {
                    let mut chunk = [0u8; 1024];
                    let header_len = loop {
                        let n = stream.read(&mut chunk).await.ok()?;
                        if n == 0 {
                            return None;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let parsed = ppp::HeaderResult::parse(&buf);
                        if parsed.is_incomplete() {
                            continue;
                        }
                        break match parsed {
                            ppp::HeaderResult::V1(Ok(h)) => h.header.len(),
                            ppp::HeaderResult::V2(Ok(h)) => h.header.len(),
                            _ => return None,
                        };
                    };
                    while memchr::memmem::find(&buf[header_len..], b"\r\n\r\n").is_none() {
                        let n = stream.read(&mut chunk).await.ok()?;
                        if n == 0 {
                            return None;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await
                        .ok()
                })
                .await;
                let which = usize::from(!matches!(served, Ok(Some(()))));
                seen[which].fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

#[tokio::test]
async fn health_checks_send_a_header_to_servers_that_want_one() {
    for version in ["v1", "v2"] {
        let (server, counts) = http_behind_proxy_header().await;
        let config = tcp_config(
            server,
            "",
            &format!(
                "proxy_protocol = \"{version}\"\n[upstreams.app.health_check]\npath = \"/health\"\n\
                 interval = \"200ms\"\ntimeout = \"150ms\"\nfall = 1\nrise = 1\n\
                 [admin]\nbind = \"127.0.0.1:0\"\n"
            ),
        );
        let proxy = Proxy::start(&config, &[]).await;
        let deadline = std::time::Instant::now() + LONG;
        while counts[0].load(Ordering::SeqCst) < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "{version}: too few checks answered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            counts[1].load(Ordering::SeqCst),
            0,
            "{version}: a check without a header"
        );
        let admin = proxy.server.admin_addr().unwrap();
        let status: serde_json::Value = serde_json::from_str(
            &reqwest::get(format!("http://{admin}/api/status"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        )
        .unwrap();
        let state = &status["upstreams"][0]["servers"][0]["health"]["state"];
        assert_eq!(state, "up", "{version}: {status}");
    }
}
