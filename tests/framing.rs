//! Message framing across the two hops, with backends that answer in every framing HTTP/1
//! allows and some that misbehave on purpose: each client gets a correctly framed answer,
//! and a connection is reused only when both sides ended cleanly.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::{Proxy, RawBackend, raw, statuses};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(backend: &RawBackend) -> String {
    format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n[upstreams.app]\nservers = [{{ address = \"{}\" }}]\n",
        backend.addr
    )
}

#[tokio::test]
async fn a_chunked_response_reaches_http11_chunked_and_http10_close_delimited() {
    let backend = RawBackend::start(|_| (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_vec(), false)).await;
    let proxy = Proxy::start(&config(&backend), &[]).await;
    let http11 = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        http11.contains("transfer-encoding: chunked\r\n"),
        "{http11}"
    );
    assert!(
        http11.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        "{http11:?}"
    );
    let http10 = raw(
        proxy.addr,
        b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    assert!(
        !http10.to_ascii_lowercase().contains("transfer-encoding"),
        "{http10}"
    );
    assert!(http10.contains("connection: close\r\n"), "{http10}");
    assert!(http10.ends_with("\r\n\r\nhello world"), "{http10:?}");
}

#[tokio::test]
async fn a_close_delimited_response_is_relayed_and_its_connection_not_reused() {
    let backend =
        RawBackend::start(|_| (b"HTTP/1.0 200 OK\r\n\r\nuntil the end".to_vec(), true)).await;
    let proxy = Proxy::start(&config(&backend), &[]).await;
    for _ in 0..2 {
        let out = raw(
            proxy.addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            out.ends_with("\r\n\r\nd\r\nuntil the end\r\n0\r\n\r\n"),
            "{out:?}"
        );
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn head_204_and_304_responses_have_no_body() {
    let backend = RawBackend::start(|head| {
        let reply: &[u8] = if head.starts_with("HEAD") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        } else if head.contains("/204") {
            b"HTTP/1.1 204 No Content\r\n\r\n"
        } else {
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n"
        };
        (reply.to_vec(), false)
    })
    .await;
    let proxy = Proxy::start(&config(&backend), &[]).await;
    let request = "HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET /204 HTTP/1.1\r\nHost: x\r\n\r\nGET /304 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let out = raw(proxy.addr, request.as_bytes()).await;
    assert_eq!(statuses(&out), [200, 204, 304], "{out}");
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        1,
        "the upstream connection should carry all three"
    );
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_retried_on_a_fresh_one() {
    // Keeps no connection alive but says nothing about it: each pooled connection is dead by
    // the time the next request would use it.
    let backend = RawBackend::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            true,
        )
    })
    .await;
    let proxy = Proxy::start(&config(&backend), &[]).await;
    let client = support::client();
    // Several requests at once leave several pooled connections, all dead soon after.
    let burst: Vec<_> = (0..4).map(|_| client.get(proxy.url("/")).send()).collect();
    for resp in futures_util::future::join_all(burst).await {
        assert_eq!(resp.unwrap().status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..5 {
        let resp = client.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "ok");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn invalid_upstream_responses_are_502() {
    for reply in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    ] {
        let backend = RawBackend::start(move |_| (reply.to_vec(), true)).await;
        let proxy = Proxy::start(&config(&backend), &[]).await;
        let out = raw(
            proxy.addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(
            statuses(&out),
            [502],
            "{:?} gave {out}",
            String::from_utf8_lossy(reply)
        );
    }
}

#[tokio::test]
async fn a_response_cut_short_closes_the_client_connection() {
    let backend = RawBackend::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part".to_vec(),
            true,
        )
    })
    .await;
    let proxy = Proxy::start(&config(&backend), &[]).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the client connection was left hanging");
    assert!(String::from_utf8_lossy(&out).ends_with("only part"));
}

#[tokio::test]
async fn expect_100_continue_is_answered_by_the_proxy() {
    let backend = support::Backend::with(|req| async move {
        use http_body_util::BodyExt;
        let expect = req.headers().get("expect").is_some();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        http::Response::new(support::full(format!(
            "expect forwarded: {expect}, body {}",
            body.len()
        )))
    })
    .await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"hello").await.unwrap();
    let rest = support::read_until_close(&mut stream, Duration::from_secs(5)).await;
    assert!(rest.ends_with("expect forwarded: false, body 5"), "{rest}");
}
