//! The pause a planned HA switchover puts on a real Fulcrum's listeners (in-process, two
//! workers, on 127.0.0.1): it takes no new connection yet refuses none, the open ones
//! finish what is in flight and close, and resuming undoes all of it. The switchover
//! itself is in `ha_loopback.rs`.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::Response;
use support::{Backend, Proxy, full, read_until_close, simple_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SLOW: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(10);

/// Answers `done`; `/slow` after a second.
async fn backend() -> Backend {
    Backend::with(|req| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(SLOW).await;
        }
        Response::new(full("done"))
    })
    .await
}

async fn send(stream: &mut TcpStream, path: &str) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: drain.test\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
}

/// Reads one response (its body is `done`), leaving the connection open.
async fn response(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        while !out.ends_with(b"done") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(WAIT, read).await.expect("no response");
    String::from_utf8(out).unwrap()
}

async fn connect_within(addr: SocketAddr, limit: Duration) -> Option<TcpStream> {
    match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Ok(connected) => Some(connected.expect("dropped, never refused")),
        Err(_) => None,
    }
}

#[tokio::test]
async fn a_paused_server_takes_no_new_connection_refuses_none_and_drains_the_open_ones() {
    let backend = backend().await;
    let proxy = Proxy::start_workers(&simple_config(1, ""), &[&backend], 2);
    let quiesce = proxy.server.quiesce();
    assert_eq!(quiesce.open_connections(), 0);

    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    send(&mut idle, "/").await;
    assert!(response(&mut idle).await.starts_with("HTTP/1.1 200"));
    let mut busy = TcpStream::connect(proxy.addr).await.unwrap();
    send(&mut busy, "/slow").await;
    let deadline = Instant::now() + WAIT;
    while backend.seen.count() < 2 {
        assert!(Instant::now() < deadline, "the slow request never came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(quiesce.open_connections(), 2);

    quiesce.pause();
    // A new client is not refused: its SYN goes unanswered, and it tries again later.
    assert!(
        connect_within(proxy.addr, Duration::from_millis(300))
            .await
            .is_none(),
        "a paused listener took a new connection"
    );
    let late = tokio::spawn(async move { TcpStream::connect(proxy.addr).await });
    // The kept-alive connection idle at the pause closes now.
    let closing = Instant::now();
    assert_eq!(read_until_close(&mut idle, WAIT).await, "");
    assert!(closing.elapsed() < SLOW, "the idle connection stayed open");
    // The request in flight is answered, and its connection closes after it.
    let answer = read_until_close(&mut busy, WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(answer.ends_with("done"), "{answer}");
    assert_eq!(quiesce.drained(WAIT).await, 0);
    assert!(!late.is_finished(), "a paused listener took a connection");

    quiesce.resume();
    // The client that connected during the pause gets in on a retry, and is kept alive.
    let mut late = tokio::time::timeout(WAIT, late)
        .await
        .expect("the client's retry was not taken")
        .unwrap()
        .unwrap();
    for _ in 0..2 {
        send(&mut late, "/").await;
        let answer = response(&mut late).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(!answer.contains("connection: close"), "{answer}");
    }
    assert!(
        connect_within(proxy.addr, Duration::from_secs(1))
            .await
            .is_some()
    );
}

#[tokio::test]
async fn a_drain_gives_up_at_its_deadline_with_the_connections_still_open() {
    let backend = backend().await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let quiesce = proxy.server.quiesce();
    let mut busy = TcpStream::connect(proxy.addr).await.unwrap();
    send(&mut busy, "/slow").await;
    let deadline = Instant::now() + WAIT;
    while backend.seen.count() < 1 {
        assert!(Instant::now() < deadline, "the slow request never came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    quiesce.pause();
    let started = Instant::now();
    assert_eq!(quiesce.drained(Duration::from_millis(100)).await, 1);
    assert!(started.elapsed() < SLOW);
    quiesce.resume();
    // Resumed before its answer: kept alive after all.
    let answer = response(&mut busy).await;
    assert!(!answer.contains("connection: close"), "{answer}");
    send(&mut busy, "/").await;
    assert!(response(&mut busy).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_paused_server_answers_the_http2_streams_in_flight_and_closes_the_connection() {
    let backend = backend().await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let quiesce = proxy.server.quiesce();
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(WAIT)
        .build()
        .unwrap();
    let slow = tokio::spawn(client.get(proxy.url("/slow")).send());
    let deadline = Instant::now() + WAIT;
    while backend.seen.count() < 1 {
        assert!(Instant::now() < deadline, "the slow request never came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(quiesce.open_connections(), 1);
    quiesce.pause();
    // GOAWAY: the stream in flight is answered, then the connection closes.
    let response = slow.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.text().await.unwrap(), "done");
    assert_eq!(quiesce.drained(WAIT).await, 0);
    quiesce.resume();
}

#[tokio::test]
async fn a_connection_accepted_just_before_the_pause_is_served_when_its_request_follows() {
    let backend = backend().await;
    // Without defer_accept the kernel hands a connection over before its first bytes.
    let config = simple_config(1, "").replace(
        "bind = \"127.0.0.1:0\"\n",
        "bind = \"127.0.0.1:0\"\ndefer_accept = false\n",
    );
    let proxy = Proxy::start(&config, &[&backend]).await;
    let quiesce = proxy.server.quiesce();
    // Accepted (its handshake done, its task started), its request not yet sent: as when
    // the pause falls between a client's connect and its first bytes.
    let mut fresh = TcpStream::connect(proxy.addr).await.unwrap();
    // And one that never sends anything.
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while quiesce.open_connections() < 2 {
        assert!(Instant::now() < deadline, "never accepted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    quiesce.pause();
    let paused = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&mut fresh, "/").await;
    let answer = read_until_close(&mut fresh, WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    // The silent one goes after a grace (a second), not after `client_header` (30 s).
    assert_eq!(read_until_close(&mut silent, WAIT).await, "");
    assert_eq!(quiesce.drained(WAIT).await, 0);
    assert!(
        paused.elapsed() < Duration::from_secs(3),
        "{:?}",
        paused.elapsed()
    );
}

#[tokio::test]
async fn a_drain_does_not_wait_for_a_websocket_which_goes_on() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let ws = support::websocket_echo().await;
    let config = format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"ws\"\n\
         [upstreams.ws]\nservers = [{{ address = \"{ws}\" }}]\n"
    );
    let proxy = Proxy::start(&config, &[]).await;
    let quiesce = proxy.server.quiesce();
    let (mut socket, response) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.addr))
            .await
            .unwrap();
    assert_eq!(response.status(), 101);
    let mut echo = async |text: &str| {
        socket.send(Message::text(text.to_string())).await.unwrap();
        let back = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("no echo")
            .expect("the WebSocket ended")
            .expect("the WebSocket failed");
        assert_eq!(back.into_text().unwrap().as_str(), text);
    };
    echo("before").await;

    quiesce.pause();
    let started = Instant::now();
    assert_eq!(quiesce.drained(WAIT).await, 0);
    assert!(
        started.elapsed() < SLOW,
        "the drain waited for the WebSocket"
    );
    echo("during the pause").await;
    quiesce.resume();
    echo("after").await;
}
