//! HTTP/2 from hostile clients, on raw frames: malformed requests are refused and never
//! reach a backend, and floods end in a closed connection rather than unbounded work.

mod support;

use std::time::Duration;

use support::h2raw::{self, Conn, Outcome};
use support::{Backend, Proxy};

async fn setup() -> (Backend, Proxy) {
    let backend = Backend::named("a").await;
    let proxy = Proxy::simple(
        &[&backend],
        "[http2]\nmax_concurrent_streams = 7\nmax_header_list_bytes = 16384\n",
    )
    .await;
    (backend, proxy)
}

fn get(stream: u32, extra: &[(&str, &[u8])]) -> Vec<u8> {
    h2raw::frame(
        h2raw::HEADERS,
        h2raw::END_HEADERS | h2raw::END_STREAM,
        stream,
        &h2raw::request_block("GET", "/", extra),
    )
}

#[tokio::test]
async fn a_well_formed_request_is_answered() {
    let (backend, proxy) = setup().await;
    let mut conn = Conn::open(proxy.addr).await;
    conn.send(&get(1, &[("te", b"trailers")])).await;
    assert_eq!(
        conn.outcome(1).await,
        Outcome::Answered(Some(h2raw::STATUS_200))
    );
    assert_eq!(backend.seen.count(), 1);
}

#[tokio::test]
async fn connection_specific_headers_and_bad_bytes_are_refused() {
    let (backend, proxy) = setup().await;
    let cases: &[(&str, &[u8])] = &[
        ("connection", b"keep-alive"),
        ("keep-alive", b"timeout=5"),
        ("transfer-encoding", b"chunked"),
        ("upgrade", b"websocket"),
        ("te", b"gzip"),
        ("x-split", b"a\r\nx-injected: 1"),
        ("x-nul", b"a\0b"),
        ("x-bare-lf", b"a\nb"),
    ];
    for (name, value) in cases {
        let mut conn = Conn::open(proxy.addr).await;
        conn.send(&get(1, &[(name, value)])).await;
        let outcome = conn.outcome(1).await;
        assert!(
            matches!(
                outcome,
                Outcome::Reset
                    | Outcome::GoAway(_)
                    | Outcome::Closed
                    | Outcome::Answered(Some(0x8c))
            ),
            "{name}: {:?} was answered: {outcome:?}",
            String::from_utf8_lossy(value)
        );
    }
    assert_eq!(
        backend.seen.count(),
        0,
        "a malformed HTTP/2 request reached the backend"
    );
}

#[tokio::test]
async fn content_length_must_match_the_data() {
    let backend = Backend::with(|req| async move {
        use http_body_util::BodyExt;
        match req.into_body().collect().await {
            Ok(b) => http::Response::new(support::full(format!("complete {}", b.to_bytes().len()))),
            Err(_) => http::Response::new(support::full("incomplete")),
        }
    })
    .await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let mut conn = Conn::open(proxy.addr).await;
    let head = h2raw::request_block("POST", "/", &[("content-length", b"10")]);
    conn.send(&h2raw::frame(h2raw::HEADERS, h2raw::END_HEADERS, 1, &head))
        .await;
    conn.send(&h2raw::frame(h2raw::DATA, h2raw::END_STREAM, 1, b"abc"))
        .await;
    let outcome = conn.outcome(1).await;
    assert_ne!(
        outcome,
        Outcome::Answered(Some(h2raw::STATUS_200)),
        "a short body was accepted"
    );
}

#[tokio::test]
async fn the_advertised_stream_limit_is_the_configured_one() {
    let (_backend, proxy) = setup().await;
    let mut conn = Conn::open(proxy.addr).await;
    let settings = conn
        .next(Duration::from_secs(5))
        .await
        .expect("no SETTINGS from the server");
    assert_eq!(settings.kind, h2raw::SETTINGS);
    let max_streams = settings
        .payload
        .chunks(6)
        .find(|p| p[..2] == [0, 3])
        .map(|p| u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
    assert_eq!(max_streams, Some(7));
}

#[tokio::test]
async fn rapid_reset_floods_end_the_connection() {
    let (_backend, proxy) = setup().await;
    let mut conn = Conn::open(proxy.addr).await;
    let mut flood = Vec::new();
    for i in 0..2000u32 {
        let stream = 1 + 2 * i;
        flood.extend(get(stream, &[]));
        flood.extend(h2raw::frame(
            h2raw::RST_STREAM,
            0,
            stream,
            &8u32.to_be_bytes(),
        ));
    }
    conn.send(&flood).await;
    let mut goaway = false;
    while let Some(f) = conn.next(Duration::from_secs(10)).await {
        if f.kind == h2raw::GOAWAY {
            goaway = true;
            break;
        }
    }
    assert!(
        goaway || conn.closed,
        "the flooding connection was neither sent GOAWAY nor closed"
    );
    // The proxy still serves other clients.
    let resp = support::client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off() {
    let (backend, proxy) = setup().await;
    let mut conn = Conn::open(proxy.addr).await;
    let head = h2raw::request_block("GET", "/", &[]);
    conn.send(&h2raw::frame(h2raw::HEADERS, h2raw::END_STREAM, 1, &head))
        .await;
    let big = "v".repeat(1000);
    for i in 0..2000 {
        let block = h2raw::header_block(&[(&format!("x-flood-{i}"), big.as_bytes())]);
        conn.send(&h2raw::frame(h2raw::CONTINUATION, 0, 1, &block))
            .await;
        if conn.closed {
            break;
        }
    }
    let outcome = conn.outcome(1).await;
    eprintln!("CONTINUATION flood: {outcome:?}");
    assert!(
        matches!(
            outcome,
            Outcome::Reset | Outcome::GoAway(_) | Outcome::Closed
        ),
        "2 MB of header fragments ended in {outcome:?}"
    );
    assert_eq!(backend.seen.count(), 0);
}

#[tokio::test]
async fn ping_and_settings_floods_do_not_grow_without_bound() {
    // A client that floods PING (or SETTINGS) and never reads the acknowledgements must not
    // make the proxy queue them without limit (the CVE-2019-9512 class).
    let backend = Backend::named("a").await;
    let fulcrum = support::Process::start(&support::simple_config(1, ""), &[&backend]);
    let before = fulcrum.memory_kib("VmRSS");
    for kind in [0x6u8, h2raw::SETTINGS] {
        let mut conn = Conn::open(fulcrum.addr).await;
        let frame = if kind == 0x6 {
            h2raw::frame(0x6, 0, 0, &[0u8; 8])
        } else {
            h2raw::frame(h2raw::SETTINGS, 0, 0, &[])
        };
        let burst: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(frame.len() * 10_000)
            .collect();
        let started = std::time::Instant::now();
        // Never read: acknowledgements pile up on the server's side unless it stops them.
        while started.elapsed() < Duration::from_secs(3) && !conn.closed {
            match tokio::time::timeout(
                Duration::from_millis(500),
                tokio::io::AsyncWriteExt::write_all(&mut conn.stream, &burst),
            )
            .await
            {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
    }
    let grown_mib = fulcrum.memory_kib("VmHWM").saturating_sub(before) / 1024;
    assert!(
        grown_mib < 64,
        "the proxy grew by {grown_mib} MiB under a PING/SETTINGS flood"
    );
    // And it still serves.
    let resp = support::client()
        .get(fulcrum.url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
