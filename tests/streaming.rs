//! Bodies and long-lived exchanges stream through: a 1 GiB transfer each way in bounded
//! memory, a WebSocket echo, and Server-Sent Events that arrive one by one.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::{Backend, Process, Proxy, simple_config};

const GIB: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;

/// A body of `total` bytes, made chunk by chunk as it is read.
fn generated(total: u64) -> support::Body {
    let chunk = Bytes::from(vec![b'z'; CHUNK]);
    let stream = futures_util::stream::unfold(total, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(CHUNK as u64);
            Some((
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(
                    chunk.slice(..n as usize),
                )),
                left - n,
            ))
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// Downloads and uploads 1 GiB through a real Fulcrum with `client`, and checks that the
/// proxy's memory stays flat meanwhile.
async fn a_gibibyte_each_way(client: reqwest::Client) {
    let backend = Backend::with(|req| async move {
        if req.uri().path() == "/download" {
            return http::Response::new(generated(GIB));
        }
        let mut body = req.into_body();
        let mut received = 0u64;
        while let Some(frame) = body.frame().await {
            received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
        }
        http::Response::new(support::full(received.to_string()))
    })
    .await;
    let fulcrum = Process::start(
        &simple_config(1, "[limits]\nmax_body_bytes = 2147483648\n"),
        &[&backend],
    );
    let before = fulcrum.memory_kib("VmRSS");

    let started = Instant::now();
    let mut download = client.get(fulcrum.url("/download")).send().await.unwrap();
    let version = download.version();
    let mut received = 0u64;
    while let Some(chunk) = download.chunk().await.unwrap() {
        received += chunk.len() as u64;
    }
    assert_eq!(received, GIB);
    eprintln!(
        "1 GiB download through the proxy ({version:?}) took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let upload = reqwest::Body::wrap(generated(GIB));
    let resp = client
        .post(fulcrum.url("/upload"))
        .body(upload)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), version);
    assert_eq!(resp.text().await.unwrap(), GIB.to_string());
    eprintln!(
        "1 GiB upload through the proxy ({version:?}) took {:?}",
        started.elapsed()
    );

    let peak = fulcrum.memory_kib("VmHWM");
    let growth_mib = peak.saturating_sub(before) / 1024;
    eprintln!("proxy RSS: {before} KiB before, {peak} KiB peak");
    assert!(
        growth_mib < 64,
        "proxy memory grew by {growth_mib} MiB while streaming"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_each_way_passes_in_bounded_memory() {
    a_gibibyte_each_way(support::client()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_each_way_over_http2_passes_in_bounded_memory() {
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    a_gibibyte_each_way(h2).await;
}

#[tokio::test]
async fn websocket_echo_passes_through_the_upgrade() {
    let ws_addr = support::websocket_echo().await;
    let config = format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"ws\"\n[upstreams.ws]\nservers = [{{ address = \"{ws_addr}\" }}]\n"
    );
    let proxy = Proxy::start(&config, &[]).await;
    let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{}/chat", proxy.addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    for i in 0..5 {
        let text = format!("message {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(text.clone()))
            .await
            .unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let backend = Backend::with(|_req| async {
        let stream = futures_util::stream::unfold(0, |i| async move {
            if i == 3 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let event = Frame::data(Bytes::from(format!("data: event {i}\n\n")));
            Some((
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(event),
                i + 1,
            ))
        });
        http::Response::builder()
            .header("content-type", "text/event-stream")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap()
    })
    .await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let started = Instant::now();
    let mut resp = support::client()
        .get(proxy.url("/events"))
        .send()
        .await
        .unwrap();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        arrivals.push(started.elapsed());
    }
    assert_eq!(text, "data: event 0\n\ndata: event 1\n\ndata: event 2\n\n");
    assert_eq!(arrivals.len(), 3, "events were batched: {arrivals:?}");
    // Each event arrives on its own, well before the stream ends.
    assert!(
        arrivals[0] + Duration::from_millis(400) < arrivals[2],
        "{arrivals:?}"
    );
}
