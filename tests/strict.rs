//! Hostile and malformed requests: each is refused with the right status and never reaches
//! a backend, and no request can hide inside another (the request-smuggling and desync
//! classes that have hit other proxies: CL.TE, TE.CL, obs-fold, bare LF, h2c upgrades).

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::{Backend, Proxy, raw, statuses};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn setup(extra: &str) -> (Backend, Proxy) {
    let backend = Backend::named("a").await;
    let proxy = Proxy::simple(&[&backend], extra).await;
    (backend, proxy)
}

/// Sends `request`, followed by a second request that must never be read as one, and
/// asserts the first is answered `status` and closes the connection, and that the backend
/// saw nothing.
async fn refused(request: &str, status: u16) {
    let (backend, proxy) = setup("[limits]\nmax_uri_bytes = 1024\nmax_body_bytes = 1000\n").await;
    let smuggled = format!("{request}GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
    let out = raw(proxy.addr, smuggled.as_bytes()).await;
    assert_eq!(statuses(&out), [status], "request {request:?} got {out:?}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "request {request:?} left its connection open: {out:?}"
    );
    assert_eq!(
        backend.seen.count(),
        0,
        "request {request:?} reached the backend"
    );
}

#[tokio::test]
async fn ambiguous_framing_is_refused() {
    for request in [
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
        "POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        refused(request, 400).await;
    }
}

#[tokio::test]
async fn malformed_heads_are_refused() {
    for request in [
        // bare LF line endings, in the request line, a header, or as the final empty line
        "GET / HTTP/1.1\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\n\n",
        // obs-fold
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n continued\r\n\r\n",
        // invalid bytes in a header name and value
        "GET / HTTP/1.1\r\nHost: x\r\nX A: 1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\n: empty-name\r\n\r\n",
        // Host missing, doubled, or not a host
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        "GET http://y/ HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        refused(request, 400).await;
    }
}

#[tokio::test]
async fn limits_answer_431_414_and_413() {
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    refused(&big_header, 431).await;
    let many_headers: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    refused(
        &format!("GET / HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n"),
        431,
    )
    .await;
    refused(
        &format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(2000)),
        414,
    )
    .await;
    refused(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
        413,
    )
    .await;
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_413() {
    let backend = Backend::with(|req| async move {
        use http_body_util::BodyExt;
        let _ = req.into_body().collect().await;
        http::Response::new(support::full("read"))
    })
    .await;
    let proxy = Proxy::simple(&[&backend], "[limits]\nmax_body_bytes = 1000\n").await;
    let chunk = format!("400\r\n{}\r\n", "a".repeat(1024));
    let request = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    );
    let out = raw(proxy.addr, request.as_bytes()).await;
    assert_eq!(statuses(&out), [413], "{out}");
}

#[tokio::test]
async fn invalid_chunk_size_is_400_and_the_upstream_request_is_abandoned() {
    let backend = Backend::with(|req| async move {
        use http_body_util::BodyExt;
        match req.into_body().collect().await {
            Ok(_) => http::Response::new(support::full("complete")),
            Err(_) => http::Response::new(support::full("incomplete")),
        }
    })
    .await;
    let proxy = Proxy::simple(&[&backend], "").await;
    for bad_chunks in [
        "zz\r\nhello\r\n0\r\n\r\n",
        "5\r\nhello\r\nffffffffffffffffff\r\n",
        "5\r\nhelloXX0\r\n\r\n",
    ] {
        let request =
            format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{bad_chunks}");
        let out = raw(proxy.addr, request.as_bytes()).await;
        assert_eq!(statuses(&out), [400], "{bad_chunks:?}: {out}");
        assert!(!out.contains("complete"), "{out}");
    }
}

#[tokio::test]
async fn an_early_answer_closes_the_connection_instead_of_reading_the_body_as_a_request() {
    // 404 (no route for the path) and 413 (declared length over the limit) are answered
    // before the body is read; the body holds a smuggled request.
    let backend = Backend::named("a").await;
    let config = "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\npath_prefix = \"/ok\"\nupstream = \"app\"\n\
                  [upstreams.app]\nservers = [{ address = \"{0}\" }]\n[limits]\nmax_body_bytes = 100\n";
    let proxy = Proxy::start(config, &[&backend]).await;
    let smuggled = "GET /ok/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    for (path, length, status) in [("/nope", smuggled.len(), 404), ("/ok", 200, 413)] {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{smuggled}"
        );
        let out = raw(proxy.addr, request.as_bytes()).await;
        assert_eq!(statuses(&out), [status], "{out}");
        assert!(
            out.to_ascii_lowercase().contains("connection: close"),
            "{out}"
        );
    }
    assert_eq!(backend.seen.count(), 0);
}

#[tokio::test]
async fn h2c_upgrade_is_never_forwarded() {
    let (backend, proxy) = setup("").await;
    let out = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&out), [200, 200], "{out}");
    let seen = backend.seen.last();
    for header in ["upgrade", "http2-settings", "connection"] {
        assert!(
            seen.headers.get(header).is_none(),
            "{header} was forwarded: {seen:?}"
        );
    }
}

#[tokio::test]
async fn an_upgrade_answered_200_stays_http() {
    // The backend ignores the upgrade; what follows on the connection must still be parsed
    // as HTTP requests, not tunnelled.
    let (backend, proxy) = setup("").await;
    let out = raw(
        proxy.addr,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&out), [200, 200], "{out}");
    assert_eq!(backend.seen.count(), 2);
    assert_eq!(backend.seen.last().uri, "/second");
}

#[tokio::test]
async fn an_abandoned_response_never_returns_its_connection_to_the_pool() {
    let big = "x".repeat(4 << 20);
    let backend = Backend::with(move |req| {
        let body = if req.uri().path() == "/big" {
            big.clone()
        } else {
            "small".to_string()
        };
        async move { http::Response::new(support::full(body)) }
    })
    .await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut some = [0u8; 1024];
    let _ = stream.read(&mut some).await.unwrap();
    drop(stream);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let out = raw(
            proxy.addr,
            b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.ends_with("small"), "{out}");
    }
    assert!(
        backend.seen.connections.load(Ordering::SeqCst) >= 2,
        "the half-read connection was reused"
    );
}

#[tokio::test]
async fn an_endless_trailer_section_is_refused_not_read_forever() {
    let (_backend, proxy) = setup("").await;
    let mut request =
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n".to_vec();
    for i in 0..8_000 {
        request.extend_from_slice(format!("X-Trailer-{i}: 1\r\n").as_bytes());
    }
    let out = raw(proxy.addr, &request).await;
    assert_eq!(statuses(&out), [400], "{out:?}");
}
