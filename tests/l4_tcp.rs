//! `mode = "tcp"` listeners end to end, with real servers and clients on 127.0.0.1:
//! balancing, connect failover (refused and timed out), half-close, resets, the idle
//! timeout, max_connections, TLS passthrough routed by SNI and ALPN (real rustls clients and
//! servers, a ClientHello split into small segments, bytes that are not TLS, PROXY headers
//! before and after it), several workers under load while a server dies, what the admin API
//! shows of L4 listeners (udp ones included), and tunnels through a switchover's pause and
//! at the end of the shutdown grace.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::Proxy;
use support::l4::{
    Read, TcpServer, TlsServer, connect_from, read_line, read_to_end, read_within, server_name,
    servers,
};
use support::tls::{Key, Pki, client_config};

const LONG: Duration = Duration::from_secs(10);

/// A tcp listener sending every connection to upstream `app` over `addrs`, with `listener`
/// and `upstream` TOML lines added to each table, and `extra` tables after.
fn tcp_config(addrs: &[SocketAddr], listener: &str, upstream: &str, extra: &str) -> String {
    format!(
        "[listeners.t]\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"app\"\n{listener}\n\
         [upstreams.app]\n{}\n{upstream}\n{extra}",
        servers(addrs)
    )
}

async fn start(config: &str) -> Proxy {
    Proxy::start(config, &[]).await
}

#[tokio::test]
async fn round_robin_spreads_connections_over_three_servers() {
    let s = [
        TcpServer::named("a").await,
        TcpServer::named("b").await,
        TcpServer::named("c").await,
    ];
    let addrs: Vec<_> = s.iter().map(|s| s.addr).collect();
    let proxy = start(&tcp_config(&addrs, "", "balance = \"round_robin\"", "")).await;
    let mut seen = std::collections::HashMap::new();
    for _ in 0..30 {
        *seen.entry(server_name(proxy.addr).await).or_insert(0) += 1;
    }
    for name in ["a", "b", "c"] {
        assert_eq!(seen.get(name), Some(&10), "{seen:?}");
    }
    // Bytes go through both ways, whole.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    read_line(&mut stream).await.unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (mut rd, mut wr) = stream.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let back = read_to_end(&mut rd, LONG).await;
    writer.await.unwrap();
    assert_eq!(back, payload);
}

#[tokio::test]
async fn least_connections_counts_open_tunnels() {
    let s = [
        TcpServer::named("a").await,
        TcpServer::named("b").await,
        TcpServer::named("c").await,
    ];
    let addrs: Vec<_> = s.iter().map(|s| s.addr).collect();
    let proxy = start(&tcp_config(
        &addrs,
        "",
        "balance = \"least_connections\"",
        "[admin]\nbind = \"127.0.0.1:0\"\n",
    ))
    .await;
    let admin = proxy.server.admin_addr().unwrap();
    // Six tunnels held open: two on each server.
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let name = read_line(&mut stream).await.unwrap();
        held.push((name, stream));
    }
    for name in ["a", "b", "c"] {
        let n = held.iter().filter(|(n, _)| n == name).count();
        assert_eq!(
            n,
            2,
            "{name}: {:?}",
            held.iter().map(|h| &h.0).collect::<Vec<_>>()
        );
    }
    // Both of b's close: the next two go to b, the one with the fewest.
    assert_eq!(server_field(admin, s[1].addr, "in_flight").await, 2);
    held.retain(|(name, _)| name != "b");
    // Fulcrum counts a tunnel as ended once both sides have closed.
    let deadline = Instant::now() + LONG;
    while server_field(admin, s[1].addr, "in_flight").await != 0 {
        assert!(Instant::now() < deadline, "b's tunnels still counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..2 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(read_line(&mut stream).await.unwrap(), "b");
        held.push(("b".into(), stream));
    }
}

#[tokio::test]
async fn ip_hash_keeps_each_client_on_one_server() {
    let s = [
        TcpServer::named("a").await,
        TcpServer::named("b").await,
        TcpServer::named("c").await,
    ];
    let addrs: Vec<_> = s.iter().map(|s| s.addr).collect();
    let proxy = start(&tcp_config(&addrs, "", "balance = \"ip_hash\"", "")).await;
    let mut used = std::collections::HashSet::new();
    for client in 2..12 {
        let from = format!("127.0.0.{client}");
        let mut names = std::collections::HashSet::new();
        for _ in 0..5 {
            let mut stream = connect_from(&from, proxy.addr).await;
            names.insert(read_line(&mut stream).await.unwrap());
        }
        assert_eq!(names.len(), 1, "{from} reached {names:?}");
        used.extend(names);
    }
    assert!(used.len() >= 2, "ten clients all hashed to {used:?}");
}

/// The health state `/api/status` gives server `addr`.
async fn state_of(admin: SocketAddr, addr: SocketAddr) -> String {
    server_field(admin, addr, "health").await["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// What `/api/status` says of server `addr` under `field`.
async fn server_field(admin: SocketAddr, addr: SocketAddr, field: &str) -> serde_json::Value {
    let text = reqwest::get(format!("http://{admin}/api/status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|u| u["servers"].as_array().unwrap().iter())
        .find(|s| s["address"] == addr.to_string())
        .map(|s| s[field].clone())
        .unwrap()
}

#[tokio::test]
async fn a_refused_connect_goes_to_another_server_and_marks_the_dead_one() {
    let (a, b) = (TcpServer::named("a").await, TcpServer::named("b").await);
    let dead = support::unused_addr();
    let proxy = start(&tcp_config(
        &[dead, a.addr, b.addr],
        "",
        "balance = \"round_robin\"\nfail_timeout = \"30s\"",
        "[admin]\nbind = \"127.0.0.1:0\"\n",
    ))
    .await;
    for _ in 0..20 {
        let name = server_name(proxy.addr).await;
        assert!(name == "a" || name == "b", "{name}");
    }
    assert_eq!(a.accepted() + b.accepted(), 20);
    let admin = proxy.server.admin_addr().unwrap();
    assert_eq!(state_of(admin, dead).await, "unreachable");
    assert_eq!(state_of(admin, a.addr).await, "up");
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"fulcrum_tcp_connections_total{listener="t",outcome="closed"} 20"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn with_every_server_dead_the_client_is_closed() {
    let fulcrum = support::Process::start(
        &tcp_config(
            &[support::unused_addr(), support::unused_addr()],
            "",
            "",
            "",
        ),
        &[],
    );
    let mut stream = TcpStream::connect(fulcrum.addr).await.unwrap();
    let read = read_within(&mut stream, LONG).await;
    assert!(matches!(read, Read::Eof | Read::Error(_)), "{read:?}");
    let line = fulcrum.stdout_line("connect_failed").await;
    assert!(line.contains("listener=\"t\""), "{line}");
}

/// A server that reads to the end of what the client sends, then answers how many bytes
/// came and closes.
async fn counting_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                if stream.read_to_end(&mut got).await.is_ok() {
                    let _ = stream
                        .write_all(format!("got {}\n", got.len()).as_bytes())
                        .await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn client_half_close_reaches_the_server_which_still_answers() {
    let server = counting_server().await;
    let proxy = start(&tcp_config(&[server], "", "", "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&[7u8; 5000]).await.unwrap();
    stream.shutdown().await.unwrap();
    let answer = read_to_end(&mut stream, LONG).await;
    assert_eq!(answer, b"got 5000\n");
}

#[tokio::test]
async fn server_half_close_leaves_the_other_direction_flowing() {
    // The server says hello and closes its side first, then still reads the client's bytes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut got = Vec::new();
        let read = stream.read_to_end(&mut got).await;
        let _ = tx.send(read.map(|_| got));
    });
    let proxy = start(&tcp_config(&[addr], "", "", "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(read_to_end(&mut stream, LONG).await, b"hello");
    // The client got the server's FIN and goes on sending.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(b"after your close").await.unwrap();
    stream.shutdown().await.unwrap();
    let got = tokio::time::timeout(LONG, rx)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, b"after your close");
}

fn abort(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

#[tokio::test]
async fn a_client_reset_resets_the_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = start(&tcp_config(&[addr], "", "", "")).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"x").await.unwrap();
    let (mut server, _) = tokio::time::timeout(LONG, listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        read_within(&mut server, LONG).await,
        Read::Bytes(b"x".to_vec())
    );
    abort(client);
    assert_eq!(
        read_within(&mut server, LONG).await,
        Read::Error(std::io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test]
async fn a_server_reset_resets_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = start(&tcp_config(&[addr], "", "", "")).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut server, _) = tokio::time::timeout(LONG, listener.accept())
        .await
        .unwrap()
        .unwrap();
    server.write_all(b"y").await.unwrap();
    assert_eq!(
        read_within(&mut client, LONG).await,
        Read::Bytes(b"y".to_vec())
    );
    abort(server);
    assert_eq!(
        read_within(&mut client, LONG).await,
        Read::Error(std::io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_idle_timeout() {
    let s = TcpServer::named("a").await;
    let proxy = start(&tcp_config(&[s.addr], "idle_timeout = \"1s\"", "", "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(read_line(&mut stream).await.unwrap(), "a");
    // Traffic keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        stream.write_all(b"ping").await.unwrap();
        assert_eq!(
            read_within(&mut stream, LONG).await,
            Read::Bytes(b"ping".to_vec())
        );
    }
    // ...silence does not.
    let quiet = Instant::now();
    assert_eq!(read_within(&mut stream, LONG).await, Read::Eof);
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    wait_until(|| s.open() == 0).await;
}

#[tokio::test]
async fn max_connections_holds_the_next_connection_until_one_closes() {
    let s = TcpServer::named("a").await;
    let proxy = start(&tcp_config(&[s.addr], "max_connections = 2", "", "")).await;
    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(read_line(&mut first).await.unwrap(), "a");
    assert_eq!(read_line(&mut second).await.unwrap(), "a");
    // The third is taken by the kernel's backlog, not by Fulcrum: nothing reaches a server.
    let mut third = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(
        read_within(&mut third, Duration::from_millis(700)).await,
        Read::Nothing
    );
    assert_eq!(s.accepted(), 2);
    drop(first);
    assert_eq!(read_line(&mut third).await.unwrap(), "a");
    assert_eq!(s.accepted(), 3);
    drop(second);
}

/// Three TLS servers behind one passthrough listener, each named by its first line.
struct Sni {
    pki: Pki,
    proxy: Proxy,
    _servers: Vec<TlsServer>,
}

impl Sni {
    async fn start() -> Sni {
        let pki = Pki::new();
        // Every server holds a certificate for every name: which one answered shows in
        // its first line, and the client verifying the certificate shows it was not
        // touched on the way.
        let names = ["a.test", "b.test", "x.w.test", "other.test", "127.0.0.1"];
        let cert = pki.server("all", &names, Key::Ecdsa);
        let servers = vec![
            TlsServer::start("a", &cert, &[]).await,
            TlsServer::start("b", &cert, &[]).await,
            TlsServer::start("wild", &cert, &[]).await,
            TlsServer::start("h2", &cert, &["h2", "http/1.1"]).await,
            TlsServer::start("default", &cert, &[]).await,
        ];
        let up = |name: &str, server: &TlsServer| {
            format!(
                "[upstreams.{name}]\nservers = [{{ address = \"{}\" }}]\n",
                server.addr
            )
        };
        let config = format!(
            "[listeners.tls]\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"default\"\n\
             [[listeners.tls.routes]]\nsni = [\"a.test\"]\nupstream = \"a\"\n\
             [[listeners.tls.routes]]\nsni = [\"b.test\"]\nupstream = \"b\"\n\
             [[listeners.tls.routes]]\nsni = [\"*.w.test\"]\nupstream = \"wild\"\n\
             [[listeners.tls.routes]]\nalpn = [\"h2\"]\nupstream = \"h2\"\n\
             [timeouts]\nclient_header = \"2s\"\n\
             {}{}{}{}{}",
            up("a", &servers[0]),
            up("b", &servers[1]),
            up("wild", &servers[2]),
            up("h2", &servers[3]),
            up("default", &servers[4]),
        );
        let proxy = Proxy::start(&config, &[]).await;
        Sni {
            pki,
            proxy,
            _servers: servers,
        }
    }

    /// The first line of the server a TLS connection naming `sni` and offering `alpn`
    /// reaches through `to`, after an echo through it.
    async fn reach(&self, to: SocketAddr, sni: &str, alpn: &[&str]) -> String {
        let config = Arc::new(client_config(&self.pki, alpn));
        let tcp = TcpStream::connect(to).await.unwrap();
        let name = ServerName::try_from(sni.to_string()).unwrap();
        let mut tls = tokio::time::timeout(
            LONG,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .expect("handshake timed out")
        .expect("handshake failed");
        let line = read_line(&mut tls).await.unwrap();
        tls.write_all(b"echo me\n").await.unwrap();
        assert_eq!(read_line(&mut tls).await.unwrap(), "echo me");
        line
    }
}

#[tokio::test]
async fn tls_passthrough_routes_by_sni_and_alpn() {
    let sni = Sni::start().await;
    let to = sni.proxy.addr;
    assert_eq!(sni.reach(to, "a.test", &[]).await, "a -");
    assert_eq!(sni.reach(to, "b.test", &[]).await, "b -");
    assert_eq!(sni.reach(to, "x.w.test", &[]).await, "wild -");
    // A name no sni route takes, offering h2: the alpn route, whose server chose h2.
    assert_eq!(sni.reach(to, "other.test", &["h2"]).await, "h2 h2");
    // Neither a routed name nor h2: the listener's upstream.
    assert_eq!(
        sni.reach(to, "other.test", &["http/1.1"]).await,
        "default -"
    );
    // No SNI at all (rustls sends none for an address).
    assert_eq!(sni.reach(to, "127.0.0.1", &[]).await, "default -");
}

/// A forwarder to `to` that passes the client's bytes on in pieces of 1 to 7 bytes, each
/// its own TCP segment, with a short pause between them; the other way, as they come.
async fn slicing_forwarder(to: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(to).await.unwrap();
        server.set_nodelay(true).unwrap();
        let (mut client_rd, mut client_wr) = client.into_split();
        let (mut server_rd, mut server_wr) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut server_rd, &mut client_wr).await;
            let _ = client_wr.shutdown().await;
        });
        let mut buf = [0u8; 8192];
        let mut piece = 0usize;
        loop {
            let n = match client_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut at = 0;
            while at < n {
                piece += 1;
                let len = (piece % 7 + 1).min(n - at);
                if server_wr.write_all(&buf[at..at + len]).await.is_err() {
                    return;
                }
                at += len;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let _ = server_wr.shutdown().await;
    });
    addr
}

#[tokio::test]
async fn a_client_hello_split_into_tiny_segments_is_routed() {
    let sni = Sni::start().await;
    let forwarder = slicing_forwarder(sni.proxy.addr).await;
    assert_eq!(sni.reach(forwarder, "b.test", &[]).await, "b -");
}

#[tokio::test]
async fn bytes_that_are_not_tls_are_closed_and_the_listener_goes_on() {
    let sni = Sni::start().await;
    let to = sni.proxy.addr;
    let answer = support::raw(to, b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n").await;
    assert_eq!(answer, "");
    // Half a record header, then silence: closed by client_header, not kept forever.
    let mut stream = TcpStream::connect(to).await.unwrap();
    stream.write_all(&[0x16, 0x03]).await.unwrap();
    let read = read_within(&mut stream, LONG).await;
    assert!(matches!(read, Read::Eof | Read::Error(_)), "{read:?}");
    // A record that claims to be a handshake but holds garbage.
    let garbage = [0x16, 0x03, 0x01, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff, 0xff];
    assert_eq!(support::raw(to, &garbage).await, "");
    assert_eq!(sni.reach(to, "a.test", &[]).await, "a -");
}

#[tokio::test]
async fn openssl_s_client_is_routed_by_its_server_name() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("openssl is not installed: skipped");
        return;
    }
    let sni = Sni::start().await;
    let addr = sni.proxy.addr.to_string();
    let ca = sni.pki.ca_pem.clone();
    let output = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        // -quiet implies -ign_eof; -no_ign_eof after it makes the end of stdin end s_client.
        let mut child = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr, "-servername", "b.test"])
            .args(["-verify_return_error", "-verify_hostname", "b.test"])
            .args(["-quiet", "-no_ign_eof"])
            .arg("-CAfile")
            .arg(&ca)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"through openssl\n").unwrap();
        // Time for the echo to come back before the end of stdin closes the connection.
        std::thread::sleep(Duration::from_millis(1500));
        drop(stdin);
        let deadline = Instant::now() + LONG;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        out.contains("b -") && out.contains("through openssl"),
        "stdout: {out}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn two_workers_lose_no_connection_while_a_server_dies() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = TcpServer::named("a").await;
        let b = TcpServer::named("b").await;
        let c = TcpServer::named("c").await;
        let config = tcp_config(
            &[a.addr, b.addr, c.addr],
            "",
            "balance = \"least_connections\"\nfail_timeout = \"30s\"",
            "",
        );
        let proxy = Proxy::start_workers(&config, &[], 2);
        let to = proxy.addr;
        // Connections that succeeded, begun after b was stopped.
        let done = Arc::new(AtomicUsize::new(0));
        // Connections that failed, and whether each began after b was stopped.
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stopped_at = Arc::new(std::sync::OnceLock::<Instant>::new());
        let started = Instant::now();
        let mut clients = Vec::new();
        for _ in 0..8 {
            let (done, failures, stopped_at) = (done.clone(), failures.clone(), stopped_at.clone());
            clients.push(tokio::spawn(async move {
                // At most 3 s and 400 connections per client.
                for i in 0..400 {
                    if started.elapsed() > Duration::from_secs(3) {
                        break;
                    }
                    let begun = Instant::now();
                    let ok = async {
                        let mut stream = TcpStream::connect(to).await.ok()?;
                        read_line(&mut stream).await?;
                        let message = format!("message {i}\n");
                        stream.write_all(message.as_bytes()).await.ok()?;
                        let echoed = read_line(&mut stream).await?;
                        (echoed == message.trim_end()).then_some(())
                    }
                    .await;
                    match ok {
                        Some(()) if stopped_at.get().is_some_and(|&at| begun > at) => {
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(()) => {}
                        None => {
                            let after = stopped_at.get().is_some_and(|&at| begun > at);
                            failures.lock().unwrap().push(after);
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        stopped_at.set(Instant::now()).unwrap();
        b.stop();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = b.accepted();
        for client in clients {
            client.await.unwrap();
        }
        // Connections Fulcrum had made to b that b had not accepted yet are reset when its
        // listening socket closes: a server dying drops its accept queue. At most one per
        // client can be there; every connection begun after b died must succeed.
        let failures = failures.lock().unwrap().clone();
        assert!(
            !failures.contains(&true),
            "failed after b died: {failures:?}"
        );
        assert!(failures.len() <= 8, "{failures:?}");
        assert!(
            done.load(Ordering::SeqCst) > 100,
            "only {done:?} connections after b died"
        );
        assert!(before > 0, "b took nothing before it died");
        assert_eq!(b.accepted(), before, "b accepted after it was stopped");
        assert!(a.accepted() > 0 && c.accepted() > 0);
        drop(proxy);
    });
}

async fn wait_until(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + LONG;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {LONG:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_admin_api_shows_tcp_listeners_and_their_counts() {
    let a = TcpServer::named("a").await;
    let config = format!(
        "[listeners.t]\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"app\"\n\
         idle_timeout = \"90s\"\nproxy_protocol_from = [\"10.0.0.0/8\"]\n\
         [[listeners.t.routes]]\nsni = [\"*.a.test\"]\nalpn = [\"h2\"]\nupstream = \"app\"\n\
         [upstreams.app]\n{}\nproxy_protocol = \"v1\"\n[admin]\nbind = \"127.0.0.1:0\"\n",
        servers(&[a.addr])
    );
    let proxy = start(&config).await;
    let admin = proxy.server.admin_addr().unwrap();
    let get = |path: &'static str| async move {
        let text = reqwest::get(format!("http://{admin}{path}"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    let config = get("/api/config").await;
    let listener = &config["listeners"][0];
    assert_eq!(listener["mode"], "tcp");
    assert_eq!(listener["idle_timeout"], "1m 30s");
    assert_eq!(listener["tls_passthrough"], true);
    assert_eq!(
        listener["proxy_protocol_from"],
        serde_json::json!(["10.0.0.0/8"])
    );
    assert_eq!(
        listener["routes"],
        serde_json::json!([
            { "sni": ["*.a.test"], "alpn": ["h2"], "upstream": "app" },
            { "sni": [], "alpn": [], "upstream": "app" },
        ])
    );
    assert_eq!(config["upstreams"][0]["proxy_protocol"], "v1");
    // Not TLS, on a passthrough listener: counted as such.
    assert_eq!(support::raw(proxy.addr, b"hello\r\n").await, "");
    let deadline = Instant::now() + LONG;
    loop {
        let status = get("/api/status").await;
        let listener = &status["listeners"][0];
        assert_eq!(listener["mode"], "tcp");
        if listener["connections"]["by_end"]["not_tls"] == 1 {
            assert_eq!(listener["connections"]["total"], 1);
            break;
        }
        assert!(Instant::now() < deadline, "{listener}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn udp_listeners_show_in_the_metrics_and_the_status() {
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let config = format!(
        "[listeners.u]\nbind = \"127.0.0.1:0\"\nmode = \"udp\"\nupstream = \"app\"\n\
         [upstreams.app]\n{}\n[admin]\nbind = \"127.0.0.1:0\"\n",
        servers(&[echo_addr])
    );
    let proxy = start(&config).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(b"seven!!", proxy.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(LONG, client.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"seven!!");
    let admin = proxy.server.admin_addr().unwrap();
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"fulcrum_udp_flows_open{listener="u"} 1"#,
        r#"fulcrum_udp_flows_started_total{listener="u"} 1"#,
        r#"fulcrum_udp_datagrams_total{listener="u",direction="from_clients"} 1"#,
        r#"fulcrum_udp_bytes_total{listener="u",direction="from_servers"} 7"#,
        r#"fulcrum_udp_dropped_total{listener="u",reason="max_flows"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    let text = reqwest::get(format!("http://{admin}/api/status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    let listener = &status["listeners"][0];
    assert_eq!(listener["mode"], "udp");
    assert_eq!(listener["flows"]["flows_started"], 1, "{listener}");
    assert_eq!(listener["flows"]["bytes_from_clients"], 7, "{listener}");
}

/// Memory an idle tunnel costs Fulcrum: 2,000 tunnels held open through the real binary,
/// its resident memory before and after.
#[tokio::test]
async fn idle_tunnels_cost_little_memory() {
    const TUNNELS: usize = 2000;
    let s = TcpServer::named("a").await;
    let fulcrum = support::Process::start(&tcp_config(&[s.addr], "", "", ""), &[]);
    // Warm up: the first connections size the allocator's pools.
    for _ in 0..50 {
        server_name(fulcrum.addr).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = fulcrum.memory_kib("VmRSS");
    let mut held = Vec::with_capacity(TUNNELS);
    for _ in 0..TUNNELS {
        let mut stream = TcpStream::connect(fulcrum.addr).await.unwrap();
        assert_eq!(read_line(&mut stream).await.unwrap(), "a");
        stream.write_all(b"x").await.unwrap();
        assert_eq!(
            read_within(&mut stream, LONG).await,
            Read::Bytes(b"x".to_vec())
        );
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = fulcrum.memory_kib("VmRSS");
    let per_tunnel = (after.saturating_sub(before)) as f64 * 1024.0 / TUNNELS as f64;
    eprintln!(
        "idle tunnel: {per_tunnel:.0} bytes of Fulcrum's RSS each ({before} KiB -> {after} KiB for {TUNNELS})"
    );
    // Two sockets and one task each; no 16 KiB buffers per direction.
    assert!(
        per_tunnel < 8.0 * 1024.0,
        "{per_tunnel:.0} bytes per idle tunnel"
    );
    drop(held);
}

#[tokio::test]
async fn shutdown_waits_for_an_open_tunnel_within_the_grace() {
    let s = TcpServer::named("a").await;
    let proxy = start(&tcp_config(&[s.addr], "", "", "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(read_line(&mut stream).await.unwrap(), "a");
    let began = Instant::now();
    let shutdown = tokio::spawn(proxy.server.shutdown(Duration::from_secs(8)));
    // A tunnel has no request to finish: it is not cut, and goes on until it ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(b"still here\n").await.unwrap();
    assert_eq!(read_line(&mut stream).await.unwrap(), "still here");
    assert!(!shutdown.is_finished());
    drop(stream);
    let drained = tokio::time::timeout(LONG, shutdown).await.unwrap().unwrap();
    assert!(drained, "shutdown gave up on a tunnel that closed");
    assert!(began.elapsed() < Duration::from_secs(8));
}

#[tokio::test]
async fn a_reload_sends_new_tunnels_elsewhere_and_leaves_open_ones_be() {
    let (a, b) = (TcpServer::named("a").await, TcpServer::named("b").await);
    let fulcrum = support::Process::start(&tcp_config(&[a.addr], "", "", ""), &[]);
    let mut open = TcpStream::connect(fulcrum.addr).await.unwrap();
    assert_eq!(read_line(&mut open).await.unwrap(), "a");
    let config = std::fs::read_to_string(&fulcrum.config).unwrap();
    std::fs::write(
        &fulcrum.config,
        config.replace(&a.addr.to_string(), &b.addr.to_string()),
    )
    .unwrap();
    fulcrum.signal("HUP");
    fulcrum.log_from("config reloaded").await;
    assert_eq!(server_name(fulcrum.addr).await, "b");
    open.write_all(b"still a\n").await.unwrap();
    assert_eq!(read_line(&mut open).await.unwrap(), "still a");
}

#[tokio::test]
async fn a_switchover_drain_does_not_wait_for_an_open_tunnel() {
    let s = TcpServer::named("a").await;
    let proxy = start(&tcp_config(&[s.addr], "", "", "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(read_line(&mut stream).await.unwrap(), "a");
    let quiesce = proxy.server.quiesce();
    // Like a WebSocket, a tunnel has no request to finish: a drain waiting for it would
    // keep every new client out for the whole wait.
    assert_eq!(quiesce.open_connections(), 0);
    quiesce.pause();
    let began = Instant::now();
    assert_eq!(quiesce.drained(LONG).await, 0);
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
    // The tunnel goes on through the pause.
    stream.write_all(b"still here\n").await.unwrap();
    assert_eq!(read_line(&mut stream).await.unwrap(), "still here");
    quiesce.resume();
}

#[tokio::test]
async fn a_header_from_an_untrusted_client_on_a_passthrough_listener_is_reset_and_logged() {
    let s = TcpServer::named("a").await;
    let config = format!(
        "[listeners.tls]\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"app\"\n\
         proxy_protocol_from = [\"127.0.0.2\"]\n\
         [[listeners.tls.routes]]\nsni = [\"a.test\"]\nupstream = \"app\"\n\
         [upstreams.app]\n{}\n",
        servers(&[s.addr])
    );
    let fulcrum = support::Process::start(&config, &[]);
    let mut stream = TcpStream::connect(fulcrum.addr).await.unwrap();
    stream
        .write_all(b"PROXY TCP4 6.6.6.6 127.0.0.1 1000 443\r\n\x16\x03\x01")
        .await
        .unwrap();
    let read = read_within(&mut stream, LONG).await;
    assert_eq!(read, Read::Error(std::io::ErrorKind::ConnectionReset));
    let line = fulcrum.stdout_line("refused_proxy_header").await;
    assert!(line.contains("client=127.0.0.1:"), "{line}");
    assert_eq!(s.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_open_when_the_grace_runs_out_are_reset_both_ways_and_logged() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = tcp_config(
        &[listener.local_addr().unwrap()],
        "",
        "",
        "[timeouts]\nshutdown_grace = \"1s\"\n",
    );
    let mut fulcrum = support::Process::start(&config, &[]);
    let mut client = TcpStream::connect(fulcrum.addr).await.unwrap();
    client.write_all(b"hi\n").await.unwrap();
    let (mut server, _) = tokio::time::timeout(LONG, listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read_line(&mut server).await.unwrap(), "hi");
    let began = Instant::now();
    fulcrum.signal("TERM");
    // Nothing is cut within the grace.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.write_all(b"still\n").await.unwrap();
    assert_eq!(read_line(&mut client).await.unwrap(), "still");
    assert_eq!(fulcrum.wait(LONG), 0);
    assert!(began.elapsed() >= Duration::from_secs(1));
    for peer in [&mut client, &mut server] {
        let read = read_within(peer, LONG).await;
        assert_eq!(read, Read::Error(std::io::ErrorKind::ConnectionReset));
    }
    let line = fulcrum.stdout_line("end=\"shutdown\"").await;
    assert!(line.contains("bytes_from_client=3"), "{line}");
}

/// A passthrough listener routing `a.test` to `to`, with `listener` and `upstream` lines.
fn passthrough_config(to: SocketAddr, listener: &str, upstream: &str) -> String {
    format!(
        "[listeners.tls]\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"app\"\n{listener}\n\
         [[listeners.tls.routes]]\nsni = [\"a.test\"]\nupstream = \"app\"\n\
         [upstreams.app]\n{}\n{upstream}\n",
        servers(&[to])
    )
}

#[tokio::test]
async fn a_trusted_proxy_s_header_then_a_client_hello_is_routed_by_its_name() {
    let pki = Pki::new();
    let cert = pki.server("a", &["a.test"], Key::Ecdsa);
    let server = TlsServer::start("a", &cert, &[]).await;
    let proxy = start(&passthrough_config(
        server.addr,
        "proxy_protocol_from = [\"127.0.0.1\"]",
        "",
    ))
    .await;
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 127.66.0.7 127.0.0.80 4242 443\r\n")
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&pki, &[])));
    let mut tls = tokio::time::timeout(
        LONG,
        connector.connect(ServerName::try_from("a.test").unwrap(), tcp),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake failed");
    assert_eq!(read_line(&mut tls).await.unwrap(), "a -");
    tls.write_all(b"echo me\n").await.unwrap();
    assert_eq!(read_line(&mut tls).await.unwrap(), "echo me");
}

#[tokio::test]
async fn a_server_wanting_a_header_gets_it_before_the_client_hello_on_a_passthrough_listener() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = start(&passthrough_config(
        listener.local_addr().unwrap(),
        "",
        "proxy_protocol = \"v1\"",
    ))
    .await;
    // A real ClientHello naming a.test, as rustls writes it.
    let pki = Pki::new();
    let mut hello = Vec::new();
    let mut connection = rustls::ClientConnection::new(
        Arc::new(client_config(&pki, &[])),
        ServerName::try_from("a.test").unwrap(),
    )
    .unwrap();
    while connection.wants_write() {
        connection.write_tls(&mut hello).unwrap();
    }
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(&hello).await.unwrap();
    let (mut server, _) = tokio::time::timeout(LONG, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let header = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
        client.local_addr().unwrap().port(),
        proxy.addr.port()
    );
    let mut expected = header.into_bytes();
    expected.extend_from_slice(&hello);
    let mut got = vec![0; expected.len()];
    tokio::time::timeout(LONG, server.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got == expected, "{:?}", String::from_utf8_lossy(&got));
}

/// A loopback address whose SYNs go unanswered: a listener with a backlog of 0 whose one
/// queued connection is never accepted, so the kernel drops every later SYN. The sockets
/// returned keep it so.
async fn blackhole() -> (SocketAddr, Vec<socket2::Socket>, Vec<TcpStream>) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    for _ in 0..4 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(stream) => queued.push(stream.unwrap()),
            Err(_) => return (addr, vec![socket], queued),
        }
    }
    panic!("the backlog never filled");
}

#[tokio::test]
async fn a_connect_that_times_out_goes_to_another_server() {
    let (dead, _listening, _queued) = blackhole().await;
    let a = TcpServer::named("a").await;
    let proxy = start(&tcp_config(
        &[dead, a.addr],
        "",
        "balance = \"round_robin\"\nfail_timeout = \"30s\"",
        "[timeouts]\nupstream_connect = \"500ms\"\n",
    ))
    .await;
    let began = Instant::now();
    for _ in 0..4 {
        assert_eq!(server_name(proxy.addr).await, "a");
    }
    // One of them waited out the connect timeout to the dead one, which is then left alone.
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(a.accepted(), 4);
}
