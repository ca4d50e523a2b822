//! The one request pipeline, seen from both client protocols: Fulcrum's own answers obey
//! the framing rules, early answers close lingeringly, deadlines are whole, per-stream
//! timers mean what they say, and HTTP/2 streams reach servers through the same HTTP/1.1
//! client, pool and header policy as HTTP/1.1 requests.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use support::h2raw::{self, Conn};
use support::{Backend, Proxy, RawBackend, config_for, full, read_until_close};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP/2 (prior knowledge) client.
fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A backend that answers each request with its own body.
async fn echo() -> Backend {
    Backend::with(|req| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        hyper::Response::new(full(body))
    })
    .await
}

/// The bytes of one raw HTTP/1.1 response head at the start of `out`, and what follows it.
fn split_head(out: &str) -> (&str, &str) {
    let end = out.find("\r\n\r\n").expect("a complete response head") + 4;
    out.split_at(end)
}

// === Fulcrum's own answers ===

#[tokio::test]
async fn own_answers_to_head_have_no_body_on_a_kept_alive_connection() {
    // 404 (no route for the host) and 502 (nothing listens at the server's address), each
    // followed on the same connection by a request the client must read as its own.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let backend = Backend::named("alive").await;
    let config = format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n\
         [[listeners.web.routes]]\nhost = \"alive\"\nupstream = \"alive\"\n\
         [[listeners.web.routes]]\nhost = \"dead\"\nupstream = \"dead\"\n\
         [upstreams.alive]\nservers = [{{ address = \"{{0}}\" }}]\n\
         [upstreams.dead]\nservers = [{{ address = \"{dead_addr}\" }}]\n"
    );
    let proxy = Proxy::start(&config, &[&backend]).await;
    for (host, status) in [("nowhere", "404"), ("dead", "502")] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let requests = format!(
            "HEAD / HTTP/1.1\r\nHost: {host}\r\n\r\nGET / HTTP/1.1\r\nHost: alive\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(requests.as_bytes()).await.unwrap();
        let out = read_until_close(&mut stream, Duration::from_secs(10)).await;
        let (head, rest) = split_head(&out);
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{out:?}");
        assert!(
            head.to_ascii_lowercase().contains("content-length: "),
            "a HEAD answer states the length a GET would get: {head:?}"
        );
        assert!(
            rest.starts_with("HTTP/1.1 200"),
            "the answer to HEAD carried a body, read as the next response: {rest:?}"
        );
        assert!(rest.ends_with("alive"), "{rest:?}");
    }
}

#[tokio::test]
async fn own_answers_to_head_over_http2_end_with_the_headers() {
    let backend = Backend::named("a").await;
    let config = "[listeners.web]\nbind = \"127.0.0.1:0\"\n\
                  [[listeners.web.routes]]\nhost = \"only.example\"\nupstream = \"app\"\n\
                  [upstreams.app]\nservers = [{ address = \"{0}\" }]\n";
    let proxy = Proxy::start(config, &[&backend]).await;
    let mut conn = Conn::open(proxy.addr).await;
    conn.send(&h2raw::frame(
        h2raw::HEADERS,
        h2raw::END_HEADERS | h2raw::END_STREAM,
        1,
        &h2raw::request_block("HEAD", "/", &[]),
    ))
    .await;
    loop {
        let f = conn
            .next(Duration::from_secs(10))
            .await
            .expect("an answer to the HEAD stream");
        if f.stream != 1 {
            continue;
        }
        assert_ne!(f.kind, h2raw::DATA, "a DATA frame answered HEAD");
        if f.kind == h2raw::HEADERS {
            assert_ne!(
                f.flags & h2raw::END_STREAM,
                0,
                "HEAD answer must end the stream"
            );
            break;
        }
    }
    assert_eq!(backend.seen.count(), 0);
}

// === Closing ===

#[tokio::test]
async fn an_early_response_survives_the_request_body_nobody_read() {
    // The server answers at once with a large body, reading none of the upload; the
    // client's small receive window keeps most of that answer queued at the proxy when the
    // proxy is done with the connection. Closing outright with upload bytes unread would
    // make the kernel reset the connection and throw the queued answer away.
    const ANSWER: usize = 2_000_000;
    let mut reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {ANSWER}\r\n\r\n").into_bytes();
    reply.resize(reply.len() + ANSWER, b'y');
    let backend = RawBackend::start(move |_| (reply.clone(), false)).await;
    let config = config_for(&[backend.addr], "");
    let proxy = Proxy::start(&config, &[]).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(proxy.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let sender = tokio::spawn(async move {
        let _ = write
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
            .await;
        let chunk = vec![b'x'; 16 * 1024];
        for _ in 0..200 {
            if write.write_all(&chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    // A slow reader: the answer stays queued at the proxy meanwhile.
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 8 * 1024];
    let deadline = Instant::now() + Duration::from_secs(20);
    let ended = loop {
        if Instant::now() > deadline {
            break Err("timed out".to_string());
        }
        match tokio::time::timeout(Duration::from_secs(10), read.read(&mut chunk)).await {
            Ok(Ok(0)) => break Ok(()),
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => break Err(e.to_string()),
            Err(_) => break Err("stalled".to_string()),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    sender.abort();
    let text = String::from_utf8_lossy(&out[..out.len().min(200)]).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    let body = out.len() - (text.find("\r\n\r\n").unwrap() + 4);
    assert_eq!((ended, body), (Ok(()), ANSWER), "the answer was cut short");
}

// === Whole deadlines ===

#[tokio::test]
async fn a_server_trickling_its_response_head_gets_one_deadline() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n").await;
                // A header byte every 200 ms, well inside any per-read timeout.
                for _ in 0..100 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if stream.write_all(b"x").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let config = config_for(&[addr], "[timeouts]\nupstream_response_header = \"1s\"\n");
    let proxy = Proxy::start(&config, &[]).await;
    let started = Instant::now();
    let resp = support::client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_client_trickling_its_first_bytes_gets_one_deadline() {
    let backend = Backend::named("a").await;
    let config = "[listeners.web]\nbind = \"127.0.0.1:0\"\ndefer_accept = false\n\
                  [[listeners.web.routes]]\nupstream = \"app\"\n\
                  [upstreams.app]\nservers = [{ address = \"{0}\" }]\n\
                  [timeouts]\nclient_header = \"1s\"\n";
    let proxy = Proxy::start(config, &[&backend]).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    // The HTTP/2 preface, a byte every 200 ms: each read comes well within the deadline.
    for byte in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
        if stream.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut probe = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await
        {
            break;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the connection stayed open {:?} while its preface trickled in",
        started.elapsed()
    );
}

// === HTTP/2 per-stream timers ===

#[tokio::test]
async fn an_http2_upload_longer_than_the_response_header_timeout_is_served() {
    let backend = echo().await;
    let proxy = Proxy::simple(
        &[&backend],
        "[timeouts]\nupstream_response_header = \"1s\"\nclient_idle = \"5s\"\n",
    )
    .await;
    let pieces = futures_util::stream::unfold(0u32, |i| async move {
        if i == 6 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        Some((
            Ok::<_, std::io::Error>(Bytes::from(format!("piece{i};"))),
            i + 1,
        ))
    });
    let started = Instant::now();
    let resp = h2_client()
        .post(proxy.url("/upload"))
        .body(reqwest::Body::wrap_stream(pieces))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() > Duration::from_secs(2));
    assert_eq!(
        resp.text().await.unwrap(),
        "piece0;piece1;piece2;piece3;piece4;piece5;"
    );
    let seen = backend.seen.last();
    assert_eq!(seen.headers["transfer-encoding"], "chunked");
}

#[tokio::test]
async fn a_busy_http2_connection_outlives_client_idle_and_an_idle_one_does_not() {
    let backend = Backend::with(|_req| async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        hyper::Response::new(full("slow"))
    })
    .await;
    let proxy = Proxy::simple(&[&backend], "[timeouts]\nclient_idle = \"1s\"\n").await;
    let client = h2_client();
    let resp = client.get(proxy.url("/slow")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "slow");

    // With no stream open, the connection goes after about `client_idle`.
    let mut conn = Conn::open(proxy.addr).await;
    let started = Instant::now();
    while conn.next(Duration::from_secs(10)).await.is_some() {}
    assert!(conn.closed, "an idle HTTP/2 connection was never closed");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
}

// === One upstream client, one header policy ===

#[tokio::test]
async fn http2_requests_reuse_pooled_upstream_connections() {
    let backend = Backend::named("a").await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let client = h2_client();
    for _ in 0..20 {
        let resp = client.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(resp.text().await.unwrap(), "a");
    }
    // Sequential requests from one worker: one upstream connection carries them all.
    assert_eq!(backend.seen.count(), 20);
    assert_eq!(
        backend
            .seen
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn every_field_a_response_lists_in_connection_stays_behind_for_both_protocols() {
    let names: Vec<String> = (0..24).map(|i| format!("x-hop-{i}")).collect();
    let mut head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: {}\r\nX-Kept: yes\r\n",
        names.join(", ")
    );
    for name in &names {
        head.push_str(&format!("{name}: secret\r\n"));
    }
    head.push_str("\r\nok");
    let backend = RawBackend::start(move |_| (head.clone().into_bytes(), false)).await;
    let config = config_for(&[backend.addr], "");
    let proxy = Proxy::start(&config, &[]).await;
    for client in [support::client(), h2_client()] {
        let resp = client.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(resp.headers()["x-kept"], "yes");
        let leaked: Vec<_> = names
            .iter()
            .filter(|n| resp.headers().contains_key(n.as_str()))
            .collect();
        assert!(leaked.is_empty(), "{:?} leaked: {leaked:?}", resp.version());
        assert_eq!(resp.text().await.unwrap(), "ok");
    }
}

#[tokio::test]
async fn a_non_utf8_forwarded_for_is_kept_for_both_protocols() {
    let backend = Backend::named("a").await;
    let proxy = Proxy::simple(&[&backend], "").await;
    // HTTP/1.1, raw.
    let out = support::raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1 \xe9\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out:?}");
    let seen = backend.seen.last();
    assert_eq!(
        seen.headers["x-forwarded-for"].as_bytes(),
        b"10.0.0.1 \xe9, 127.0.0.1"
    );
    // HTTP/2, raw frames.
    let mut conn = Conn::open(proxy.addr).await;
    conn.send(&h2raw::frame(
        h2raw::HEADERS,
        h2raw::END_HEADERS | h2raw::END_STREAM,
        1,
        &h2raw::request_block("GET", "/", &[("x-forwarded-for", b"10.0.0.2 \xe9")]),
    ))
    .await;
    assert_eq!(
        conn.outcome(1).await,
        h2raw::Outcome::Answered(Some(h2raw::STATUS_200))
    );
    let seen = backend.seen.last();
    assert_eq!(
        seen.headers["x-forwarded-for"].as_bytes(),
        b"10.0.0.2 \xe9, 127.0.0.1"
    );
    assert_eq!(seen.headers["via"], "2 fulcrum");
}

// === The pool ===

/// How many of this process's TCP sockets to `port` are in CLOSE_WAIT (the peer closed,
/// we have not), from /proc/net/tcp.
fn close_wait_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields[2].rsplit(':').next().unwrap();
            u16::from_str_radix(remote_port, 16) == Ok(port) && fields[3] == "08"
        })
        .count()
}

#[tokio::test]
async fn pooled_connections_the_server_closes_are_closed_while_idle() {
    // A server that keeps a connection alive after its response, then closes it 100 ms later.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            });
        }
    });
    let config = config_for(&[addr], "pool_idle_timeout = \"60s\"\n");
    let proxy = Proxy::start(&config, &[]).await;
    let client = support::client();
    for _ in 0..3 {
        // Concurrent, so that several connections go back to the pool.
        let requests = (0..4).map(|_| client.get(proxy.url("/")).send());
        for resp in futures_util::future::join_all(requests).await {
            assert_eq!(resp.unwrap().text().await.unwrap(), "ok");
        }
    }
    // The server has closed them all by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut waiting = close_wait_to(addr.port());
    while waiting > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        waiting = close_wait_to(addr.port());
    }
    assert_eq!(waiting, 0, "pooled connections left half-closed");
}

// === Several workers ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_serve_both_protocols_from_their_own_pools() {
    let a = Backend::named("a").await;
    let b = Backend::named("b").await;
    let proxy = Proxy::start_workers(&support::simple_config(2, ""), &[&a, &b], 3);
    let clients = (0..12).map(|i| {
        let client = if i % 2 == 0 {
            support::client()
        } else {
            h2_client()
        };
        let url = proxy.url("/");
        async move {
            let mut answers = Vec::new();
            for _ in 0..40 {
                let resp = client.get(&url).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                answers.push(resp.text().await.unwrap());
            }
            answers
        }
    });
    let answers: Vec<String> = futures_util::future::join_all(clients)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(answers.len(), 480);
    let to_a = answers.iter().filter(|x| *x == "a").count();
    assert_eq!(to_a, 240, "round robin shares one counter across workers");
    // Connections are pooled per worker: far fewer than requests, and each backend saw
    // at least one per worker that used it.
    let connections = a.seen.connections.load(std::sync::atomic::Ordering::SeqCst)
        + b.seen.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (2..=48).contains(&connections),
        "{connections} upstream connections for 480 requests"
    );
}

// === Connections to a server are capped ===

/// A backend that answers after `delay` and counts the connections it has open at once.
async fn slow_counting(
    delay: Duration,
) -> (Backend, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let busy = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (busy2, most2) = (busy.clone(), most.clone());
    let backend = Backend::with(move |_req| {
        let (busy, most) = (busy2.clone(), most2.clone());
        async move {
            let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            busy.fetch_sub(1, Ordering::SeqCst);
            hyper::Response::new(full("done"))
        }
    })
    .await;
    (backend, most)
}

fn capped_config(max: usize, connect: &str) -> String {
    format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
         [upstreams.app]\nservers = [{{ address = \"{{0}}\", max_connections = {max} }}]\n\
         [timeouts]\nupstream_connect = \"{connect}\"\n"
    )
}

#[tokio::test]
async fn http2_streams_beyond_a_servers_connection_cap_wait_then_get_503_with_retry_after() {
    let (backend, most) = slow_counting(Duration::from_millis(1500)).await;
    let proxy = Proxy::start(&capped_config(2, "300ms"), &[&backend]).await;
    let client = h2_client();
    // Six streams on one client connection: each would open its own upstream connection.
    let requests = (0..6).map(|_| client.get(proxy.url("/")).send());
    let mut statuses = Vec::new();
    for resp in futures_util::future::join_all(requests).await {
        let resp = resp.unwrap();
        if resp.status() == 503 {
            assert_eq!(resp.headers()["retry-after"], "1");
        }
        statuses.push(resp.status().as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 503, 503, 503, 503]);
    assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_request_waiting_for_a_slot_gets_one_when_a_connection_is_done() {
    let (backend, most) = slow_counting(Duration::from_millis(200)).await;
    let proxy = Proxy::start(&capped_config(1, "5s"), &[&backend]).await;
    let client = h2_client();
    let requests = (0..4).map(|_| client.get(proxy.url("/")).send());
    for resp in futures_util::future::join_all(requests).await {
        assert_eq!(resp.unwrap().status(), 200);
    }
    assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_http2_client_that_stops_reading_does_not_hold_its_connection_forever() {
    // A large answer to a client that grants a huge window and then reads nothing: the
    // socket fills, the stream times out, and even the GOAWAY can never be written.
    let big = Bytes::from(vec![b'z'; 32 * 1024 * 1024]);
    let backend = Backend::with(move |_req| {
        let big = big.clone();
        async move { hyper::Response::new(full(big)) }
    })
    .await;
    let proxy = Proxy::simple(&[&backend], "[timeouts]\nclient_idle = \"1s\"\n").await;
    let mut conn = Conn::open(proxy.addr).await;
    let mut settings = vec![0x00, 0x04]; // SETTINGS_INITIAL_WINDOW_SIZE
    settings.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    conn.send(&h2raw::frame(h2raw::SETTINGS, 0, 0, &settings))
        .await;
    conn.send(&h2raw::frame(0x8, 0, 0, &0x7fff_0000u32.to_be_bytes())) // WINDOW_UPDATE
        .await;
    conn.send(&h2raw::frame(
        h2raw::HEADERS,
        h2raw::END_HEADERS | h2raw::END_STREAM,
        1,
        &h2raw::request_block("GET", "/", &[]),
    ))
    .await;
    // Read nothing: after the stream's 1 s, the idle 1 s and 1 s to close, Fulcrum must
    // have let go of its end (which, full of unsent bytes, can only be seen in its state).
    let client_port = conn.stream.local_addr().unwrap().port();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut state = tcp_state(proxy.addr.port(), client_port);
    while state.as_deref() == Some("01") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        state = tcp_state(proxy.addr.port(), client_port);
    }
    assert_ne!(
        state.as_deref(),
        Some("01"),
        "Fulcrum's end is still ESTABLISHED"
    );
}

/// The TCP state (/proc/net/tcp's hex code; `01` is ESTABLISHED) of the socket from
/// `local_port` to `remote_port`, if there is one.
fn tcp_state(local_port: u16, remote_port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |field: &str| u16::from_str_radix(field.rsplit(':').next().unwrap(), 16).ok();
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (port(fields[1]) == Some(local_port) && port(fields[2]) == Some(remote_port))
            .then(|| fields[3].to_string())
    })
}

#[tokio::test]
async fn an_empty_http2_post_goes_upstream_with_a_zero_length() {
    let backend = echo().await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let resp = h2_client().post(proxy.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = backend.seen.last();
    assert_eq!(seen.headers["content-length"], "0");
    assert!(!seen.headers.contains_key("transfer-encoding"));
}

#[tokio::test]
async fn a_response_listing_its_length_in_connection_keeps_it() {
    let backend = RawBackend::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: content-length\r\n\r\nok"
                .to_vec(),
            false,
        )
    })
    .await;
    let config = config_for(&[backend.addr], "");
    let proxy = Proxy::start(&config, &[]).await;
    // Two requests on one kept-alive connection: the first must be framed for the second
    // to be read right.
    let out = support::raw(
        proxy.addr,
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(support::statuses(&out), [200, 200], "{out:?}");
    assert_eq!(
        out.to_ascii_lowercase()
            .matches("content-length: 2")
            .count(),
        2,
        "{out:?}"
    );
}

#[tokio::test]
async fn own_answers_over_http2_carry_a_date() {
    let backend = Backend::named("a").await;
    let config = "[listeners.web]\nbind = \"127.0.0.1:0\"\n\
                  [[listeners.web.routes]]\nhost = \"only.example\"\nupstream = \"app\"\n\
                  [upstreams.app]\nservers = [{ address = \"{0}\" }]\n";
    let proxy = Proxy::start(config, &[&backend]).await;
    let resp = h2_client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.headers().contains_key("date"));
}
