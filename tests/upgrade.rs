//! `kill -USR2`: the running Fulcrum starts its binary anew, hands it the listening
//! sockets, and finishes its own connections while the new process takes every new one.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::{Backend, Process};
use tokio_tungstenite::tungstenite::Message;

/// 30 pieces of 10 KiB, one every 100 ms.
const PIECES: usize = 30;
const PIECE: usize = 10 * 1024;

/// A backend that streams `/download` over about 3 s, each piece a repeated letter.
async fn slow_download() -> Backend {
    Backend::with(|_req| async move {
        let pieces = futures_util::stream::unfold(0usize, |i| async move {
            if i == PIECES {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let letter = b'a' + (i % 26) as u8;
            let frame = Frame::data(Bytes::from(vec![letter; PIECE]));
            Some((
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(frame),
                i + 1,
            ))
        });
        http::Response::builder()
            .header("content-length", (PIECES * PIECE).to_string())
            .body(BodyExt::boxed(StreamBody::new(pieces)))
            .unwrap()
    })
    .await
}

fn config(listen: SocketAddr, admin: SocketAddr, ws: SocketAddr) -> String {
    format!(
        "workers = 2\n[admin]\nbind = \"{admin}\"\n[access_log]\nenabled = false\n\
         [timeouts]\nshutdown_grace = \"30s\"\n\
         [listeners.web]\nbind = \"{listen}\"\n\
         [[listeners.web.routes]]\npath_prefix = \"/ws\"\nupstream = \"ws\"\n\
         [[listeners.web.routes]]\npath_prefix = \"/download\"\nupstream = \"dl\"\n\
         [[listeners.web.routes]]\nupstream = \"app\"\n\
         [upstreams.app]\nsticky_cookie = \"s\"\n\
         servers = [{{ address = \"{{0}}\" }}, {{ address = \"{{1}}\" }}]\n\
         [upstreams.dl]\nservers = [{{ address = \"{{2}}\" }}]\n\
         [upstreams.ws]\nservers = [{{ address = \"{ws}\" }}]\n"
    )
}

/// Kills the process a test's upgrade started, which is no child of the test.
struct Started(u32);

impl Drop for Started {
    fn drop(&mut self) {
        // SAFETY: a plain kill(2) of a process id.
        unsafe {
            libc::kill(self.0 as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// Requests to `url` until `stop` (at most 4,000), on kept-alive connections if `reuse`,
/// else each on a connection of its own: how many ran and the ones that failed.
fn steady_load(
    url: String,
    reuse: bool,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let mut builder = reqwest::Client::builder().no_proxy();
        if !reuse {
            builder = builder.pool_max_idle_per_host(0);
        }
        let client = builder.build().unwrap();
        let (mut sent, mut failed) = (0, Vec::new());
        while sent < 4_000 && !stop.load(Ordering::Relaxed) {
            sent += 1;
            match client.get(&url).send().await {
                Ok(resp) if resp.status() == 200 => {
                    if let Err(e) = resp.bytes().await {
                        failed.push(format!("body: {e:?}"));
                    }
                }
                Ok(resp) => failed.push(format!("status {}", resp.status())),
                Err(e) => failed.push(format!("error {e:?}")),
            }
        }
        (sent, failed)
    })
}

/// The `s=TOKEN` values a client without a cookie is given over `n` requests.
async fn tokens(url: &str, n: usize) -> HashSet<String> {
    let client = support::client();
    let mut seen = HashSet::new();
    for _ in 0..n {
        let resp = client.get(url).send().await.unwrap();
        let cookie = resp.headers()["set-cookie"].to_str().unwrap();
        seen.insert(cookie.split(';').next().unwrap().to_string());
    }
    seen
}

/// Which servers answer a client sending `cookie`, over `n` requests.
async fn answers_with(url: &str, cookie: &str, n: usize) -> HashSet<String> {
    let client = support::client();
    let mut seen = HashSet::new();
    for _ in 0..n {
        let resp = client
            .get(url)
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        seen.insert(resp.text().await.unwrap());
    }
    seen
}

/// The pid `/api/status` reports.
async fn admin_pid(admin: SocketAddr) -> Option<u64> {
    let text = support::client()
        .get(format!("http://{admin}/api/status"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["pid"].as_u64()
}

async fn echo(
    ws: &mut (
             impl SinkExt<Message>
             + StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
             + Unpin
         ),
    text: &str,
) {
    assert!(
        ws.send(Message::text(text.to_string())).await.is_ok(),
        "the WebSocket closed"
    );
    let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("no echo within 10 s")
        .expect("the WebSocket ended")
        .expect("the WebSocket failed");
    assert_eq!(back.into_text().unwrap().as_str(), text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_over_to_a_new_process_without_a_failed_request() {
    let (a, b, dl) = (
        Backend::named("a").await,
        Backend::named("b").await,
        slow_download().await,
    );
    let ws_addr = support::websocket_echo().await;
    let (listen, admin) = (support::unused_addr(), support::unused_addr());
    let mut process = Process::start(&config(listen, admin, ws_addr), &[&a, &b, &dl]);
    process.log_from("admin listener").await;
    let old = process.child.id();
    let url = format!("http://{listen}/");
    assert_eq!(admin_pid(admin).await, Some(u64::from(old)));

    // Sticky tokens before: one per server; a client pinned to one of them.
    let issued = tokens(&url, 6).await;
    assert_eq!(issued.len(), 2, "{issued:?}");
    let pinned = issued.iter().next().unwrap().clone();
    let server = answers_with(&url, &pinned, 3).await;
    assert_eq!(server.len(), 1);

    let stop = Arc::new(AtomicBool::new(false));
    let loads = [
        steady_load(url.clone(), true, stop.clone()),
        steady_load(url.clone(), false, stop.clone()),
    ];
    let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{listen}/ws"))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    echo(&mut ws, "before").await;
    let download = tokio::spawn({
        let url = format!("http://{listen}/download");
        async move {
            let resp = support::client().get(url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.bytes().await.map(|b| b.to_vec())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    process.signal("USR2");
    let line = process.log_from("upgraded: process ").await;
    let new: u32 = line
        .split("upgraded: process ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"));
    let _started = Started(new);
    assert_ne!(new, old);

    // The old process finishes what it has: the download arrives whole, the WebSocket goes
    // on echoing.
    let body = download.await.unwrap().expect("the download broke off");
    assert_eq!(body.len(), PIECES * PIECE);
    for (i, piece) in body.chunks(PIECE).enumerate() {
        assert!(
            piece.iter().all(|&c| c == b'a' + (i % 26) as u8),
            "piece {i} damaged"
        );
    }
    for i in 0..5 {
        echo(&mut ws, &format!("after {i}")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        process.child.try_wait().unwrap().is_none(),
        "the old process left its WebSocket"
    );

    // New connections reach the new process, which kept the sticky key.
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin_pid(admin).await != Some(u64::from(new)) {
        assert!(
            Instant::now() < deadline,
            "the admin listener is still the old process's"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answers_with(&url, &pinned, 5).await, server);
    assert_eq!(tokens(&url, 6).await, issued);

    // Its last connection closed, the old process exits.
    ws.close(None).await.unwrap();
    drop(ws);
    assert_eq!(process.wait(Duration::from_secs(20)), 0);
    let log = process.stderr.lock().unwrap().clone();
    assert!(log.contains("all connections closed; exiting"), "{log}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for load in loads {
        let (sent, failed) = load.await.unwrap();
        assert!(sent > 20, "only {sent} requests ran");
        assert!(
            failed.is_empty(),
            "{} of {sent} failed: {failed:?}",
            failed.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_whose_new_process_cannot_start_leaves_the_old_one_serving() {
    let (a, b, dl) = (
        Backend::named("a").await,
        Backend::named("b").await,
        slow_download().await,
    );
    let ws_addr = support::websocket_echo().await;
    let (listen, admin) = (support::unused_addr(), support::unused_addr());
    let process = Process::start(&config(listen, admin, ws_addr), &[&a, &b, &dl]);
    process.log_from("admin listener").await;
    let url = format!("http://{listen}/");
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(url.clone(), true, stop.clone());

    std::fs::write(&process.config, "[listeners.web]\nbind = \"nowhere\"\n").unwrap();
    process.signal("USR2");
    let log = process.log_from("binary upgrade failed").await;
    assert!(log.contains("this process serves on"), "{log}");
    assert!(log.contains("exited before it was ready"), "{log}");
    // The new process said what is wrong with the file, where the old one logs.
    let whole = process.stderr.lock().unwrap().clone();
    assert!(whole.contains("fulcrum.toml:2:"), "{whole}");

    assert_eq!(admin_pid(admin).await, Some(u64::from(process.child.id())));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = load.await.unwrap();
    assert!(sent > 20, "only {sent} requests ran");
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );
}
