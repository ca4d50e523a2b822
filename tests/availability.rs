//! Dead and slow backends, slow and idle clients, connection limits and graceful shutdown:
//! each ends in a clear status or a closed connection, never a hang.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{Backend, Process, Proxy, client, config_for, raw, simple_config, statuses};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_dead_server_is_skipped_and_no_request_is_lost() {
    let alive = Backend::named("alive").await;
    let proxy = Proxy::start(&config_for(&[support::unused_addr(), alive.addr], ""), &[]).await;
    let client = client();
    for _ in 0..6 {
        let resp = client.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "alive");
    }
}

#[tokio::test]
async fn no_reachable_server_is_502_with_a_logged_reason() {
    let dead = support::unused_addr();
    let fulcrum = Process::start(
        &config_for(&[dead], "[access_log]\nformat = \"json\"\n"),
        &[],
    );
    let resp = client().get(fulcrum.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().starts_with("502 Bad Gateway"));
    let line = fulcrum.stdout_line("\"status\":502").await;
    assert!(
        line.contains(&format!("connect to {dead} failed")),
        "{line}"
    );
    assert!(line.contains("\"path\":\"/x\""), "{line}");
}

/// A server that answers `/slow` after 3 s and anything else at once, behind a Fulcrum that
/// waits 300 ms for a response header.
async fn slow_path_behind_short_header_timeout() -> (Backend, Proxy) {
    let backend = Backend::with(|req| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        http::Response::new(support::full("ok"))
    })
    .await;
    let proxy = Proxy::simple(
        &[&backend],
        "[timeouts]\nupstream_response_header = \"300ms\"\n",
    )
    .await;
    (backend, proxy)
}

#[tokio::test]
async fn a_slow_response_header_is_504() {
    let (_slow, proxy) = slow_path_behind_short_header_timeout().await;
    let started = Instant::now();
    let resp = client().get(proxy.url("/slow")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// An upstream connection keeps one timer from request to request: one whose earlier
/// deadline passed while the connection sat in the pool must not time the next answer out
/// at once, and one still armed must still time out a slow answer.
#[tokio::test]
async fn a_pooled_connection_times_each_response_header_afresh() {
    let (backend, proxy) = slow_path_behind_short_header_timeout().await;
    let client = client();
    let get = |path: &'static str| client.get(proxy.url(path)).send();
    assert_eq!(get("/fast").await.unwrap().status(), 200);
    // The connection's timer, set for 300 ms after that request, goes off in the pool.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        assert_eq!(get("/fast").await.unwrap().status(), 200);
    }
    // At once after an answer: the timer is still armed from it.
    let started = Instant::now();
    assert_eq!(get("/slow").await.unwrap().status(), 504);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "the 504 came after {took:?}"
    );
    assert_eq!(backend.seen.count(), 5);
}

#[tokio::test]
async fn a_connect_that_hangs_is_504() {
    // A listener that never accepts, with its queue filled, drops further SYNs: connects hang.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    let proxy = Proxy::start(
        &config_for(&[addr], "[timeouts]\nupstream_connect = \"300ms\"\n"),
        &[],
    )
    .await;
    let resp = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    drop(socket);
}

#[tokio::test]
async fn a_header_trickled_byte_by_byte_is_cut_off() {
    let backend = Backend::named("a").await;
    let proxy = Proxy::simple(&[&backend], "[timeouts]\nclient_header = \"1s\"\n").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    trickle_until_cut_off(&mut stream).await;
    assert_eq!(backend.seen.count(), 0);
}

/// A connection to `proxy` that has had one request answered with 200 and stays open.
async fn kept_alive_after_one_request(proxy: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    stream
}

/// Sends the start of a request head, then a byte every 100 ms, and fails unless the proxy
/// cuts the client off within 4 s: an idle timeout alone would never fire.
async fn trickle_until_cut_off(stream: &mut TcpStream) {
    let started = Instant::now();
    stream.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut closed = false;
    for _ in 0..50 {
        if stream.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "the trickling client was never cut off");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cut off only after {:?}",
        started.elapsed()
    );
}

/// The deadline for a head holds on a kept-alive connection too, whose waits reuse the
/// timer of the waits before.
#[tokio::test]
async fn a_second_request_trickled_on_a_kept_alive_connection_is_cut_off() {
    let backend = Backend::named("a").await;
    let proxy = Proxy::simple(
        &[&backend],
        "[timeouts]\nclient_header = \"1s\"\nclient_idle = \"30s\"\n",
    )
    .await;
    let mut stream = kept_alive_after_one_request(proxy.addr).await;
    trickle_until_cut_off(&mut stream).await;
    assert_eq!(backend.seen.count(), 1);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let backend = Backend::named("a").await;
    let proxy = Proxy::simple(&[&backend], "[timeouts]\nclient_idle = \"500ms\"\n").await;
    let mut stream = kept_alive_after_one_request(proxy.addr).await;
    let mut buf = vec![0u8; 4096];
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("idle connection left open")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[tokio::test]
async fn the_connection_limit_holds_further_clients_until_a_slot_frees() {
    let backend = Backend::named("a").await;
    let config = limited_config(2);
    let proxy_limited = Proxy::start(&config, &[&backend]).await;
    // Two clients that started a request and are slow to finish it hold both slots.
    let mut first = TcpStream::connect(proxy_limited.addr).await.unwrap();
    let mut second = TcpStream::connect(proxy_limited.addr).await.unwrap();
    first.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    second.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(proxy_limited.addr).await.unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf))
            .await
            .is_err(),
        "a third connection was served"
    );
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_zero() {
    let slow = Backend::with(|_req| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        http::Response::new(support::full("finished"))
    })
    .await;
    let mut fulcrum = Process::start(
        &simple_config(1, "[timeouts]\nshutdown_grace = \"10s\"\n"),
        &[&slow],
    );
    let url = fulcrum.url("/slow");
    let in_flight = tokio::spawn(async move {
        client()
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    fulcrum.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        TcpStream::connect(fulcrum.addr).await.is_err(),
        "still accepting after SIGTERM"
    );
    assert_eq!(in_flight.await.unwrap(), "finished");
    assert_eq!(fulcrum.wait(Duration::from_secs(10)), 0);
}

#[tokio::test]
async fn pipelined_requests_after_an_upstream_error_still_get_answers() {
    let dead = support::unused_addr();
    let proxy = Proxy::start(&config_for(&[dead], ""), &[]).await;
    let request = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let out = raw(
        proxy.addr,
        format!("{request}{request}GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    // The first finds the server gone (502); the next ones know it is (503, no server up).
    assert_eq!(statuses(&out), [502, 503, 503], "{out}");
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_off() {
    let stalling = Backend::with(|_req| async {
        let stream = futures_util::stream::unfold(0, |i| async move {
            if i == 1 {
                // The rest of the body never comes.
                tokio::time::sleep(Duration::from_secs(30)).await;
                return None;
            }
            let chunk = hyper::body::Frame::data(bytes::Bytes::from_static(b"first part"));
            Some((
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(chunk),
                i + 1,
            ))
        });
        http::Response::new(http_body_util::BodyExt::boxed(
            http_body_util::StreamBody::new(stream),
        ))
    })
    .await;
    let proxy = Proxy::simple(&[&stalling], "[timeouts]\nupstream_idle = \"300ms\"\n").await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let out = support::read_until_close(&mut stream, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the stalled response held the client for {:?}",
        started.elapsed()
    );
    assert!(out.contains("first part"), "{out}");
    // Chunked framing never finished: the client can tell the body is incomplete.
    assert!(!out.ends_with("0\r\n\r\n"), "{out:?}");
}

#[tokio::test]
async fn a_client_that_connects_and_sends_nothing_takes_no_slot() {
    // With deferred accept (the default), silent connections wait in the kernel and do not
    // count against the limit.
    let backend = Backend::named("a").await;
    let config = limited_config(1);
    let proxy = Proxy::start(&config, &[&backend]).await;
    let _silent: Vec<TcpStream> =
        futures_util::future::join_all((0..3).map(|_| TcpStream::connect(proxy.addr)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&out), [200], "{out}");
}

#[tokio::test]
async fn a_connection_idle_past_its_buffers_serves_its_next_request() {
    // After a second of idling the connection gives its buffers back; the next request
    // must find new ones.
    let backend = Backend::named("a").await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    for pause in [Duration::ZERO, Duration::from_millis(1300)] {
        tokio::time::sleep(pause).await;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\na"),
            "{text}"
        );
    }
    assert_eq!(backend.seen.count(), 2);
}

/// One listener with at most `max` connections in front of one backend.
fn limited_config(max: usize) -> String {
    simple_config(1, "").replace(
        "bind = \"127.0.0.1:0\"",
        &format!("bind = \"127.0.0.1:0\"\nmax_connections = {max}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulcrums_own_descriptor_shortage_is_not_blamed_on_its_servers() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let config = format!(
        "workers = 1\n{}",
        simple_config(2, "fail_timeout = \"60s\"\n")
    );
    const LIMIT: u64 = 64;
    let fulcrum = Process::start_with_open_files(&config, &[&a, &b], LIMIT);
    // Fill Fulcrum's descriptor table with clients, each sending part of a head (a
    // connection is accepted only once its first bytes arrive).
    let mut clients = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (fulcrum.open_files_below(LIMIT) as u64) < LIMIT && Instant::now() < deadline {
        let before = fulcrum.open_files_below(LIMIT);
        let mut stream = TcpStream::connect(fulcrum.addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let accepted = Instant::now() + Duration::from_secs(2);
        while fulcrum.open_files_below(LIMIT) == before && Instant::now() < accepted {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        clients.push(stream);
    }
    assert_eq!(
        fulcrum.open_files_below(LIMIT) as u64,
        LIMIT,
        "the table did not fill"
    );
    // The first client finishes its request: no descriptor is left for the upstream side.
    let first = &mut clients[0];
    first
        .write_all(b"Host: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let out = support::read_until_close(first, Duration::from_secs(10)).await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out:?}");
    // With descriptors free again, both servers take their turns: neither was marked down.
    clients.clear();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let http = client();
    let mut answers = Vec::new();
    for _ in 0..10 {
        answers.push(support::get_text(&http, &fulcrum.url("/")).await);
    }
    let to_a = answers.iter().filter(|x| *x == "a").count();
    assert_eq!(to_a, 5, "{answers:?}");
    let log = fulcrum.stderr.lock().unwrap().clone();
    assert!(!log.contains("server marked down"), "{log}");
}
