//! `kill -USR2`: the running Fulcrum starts its binary anew, hands it the listening
//! sockets, and finishes its own connections while the new process takes every new one.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// What a load loop saw: requests sent, the failures (each with when it happened, counted
/// from the loop's start), and the requests answered in full so far.
struct Load {
    answered: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Load {
    /// Waits for the loop to end (once told to stop) and asserts none of its requests failed.
    async fn ends_without_a_failure(self) {
        let (sent, failed) = self.task.await.unwrap();
        assert!(
            failed.is_empty(),
            "{} of {sent} failed: {failed:?}",
            failed.len()
        );
    }

    /// Waits (up to 15 s) until `more` requests beyond those answered so far are answered:
    /// the loop still runs, and whoever serves now answers it.
    async fn answers_more(&self, more: usize) {
        let target = self.answered.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.answered.load(Ordering::Relaxed) < target {
            assert!(
                Instant::now() < deadline && !self.task.is_finished(),
                "the load loop stopped being answered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Requests to `url` until `stop` (for at most 40 s), on kept-alive connections if
/// `reuse`, else each on a connection of its own.
fn steady_load(url: String, reuse: bool, stop: Arc<AtomicBool>) -> Load {
    let answered = Arc::new(AtomicUsize::new(0));
    let counter = answered.clone();
    let task = tokio::spawn(async move {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10));
        if !reuse {
            builder = builder.pool_max_idle_per_host(0);
        }
        let client = builder.build().unwrap();
        let (mut sent, mut failed) = (0, Vec::new());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(40) && !stop.load(Ordering::Relaxed) {
            sent += 1;
            let outcome = match client.get(&url).send().await {
                Ok(resp) if resp.status() == 200 => resp
                    .bytes()
                    .await
                    .map(drop)
                    .map_err(|e| format!("body: {e:?}")),
                Ok(resp) => Err(format!("status {}", resp.status())),
                Err(e) => Err(format!("error {e:?}")),
            };
            match outcome {
                Ok(()) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => failed.push(format!("at {:?} (reuse {reuse}): {e}", start.elapsed())),
            }
        }
        (sent, failed)
    });
    Load { answered, task }
}

/// The `s=TOKEN` values a client without a cookie is given, requesting until it has seen
/// `wanted` different ones (at most 200 requests: other clients' requests share the
/// balancer's turns, so a few in a row may go to the same server).
async fn tokens(url: &str, wanted: usize) -> HashSet<String> {
    let client = support::client();
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let resp = client.get(url).send().await.unwrap();
        let cookie = resp.headers()["set-cookie"].to_str().unwrap();
        seen.insert(cookie.split(';').next().unwrap().to_string());
        if seen.len() >= wanted {
            break;
        }
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

/// What every test here runs Fulcrum in front of: servers `a` and `b`, a slow download,
/// a WebSocket echo server, and the addresses of its listener and admin listener.
struct Setup {
    backends: [Backend; 3],
    listen: SocketAddr,
    admin: SocketAddr,
    /// The config for them (two workers).
    config: String,
}

impl Setup {
    async fn new() -> Setup {
        let backends = [
            Backend::named("a").await,
            Backend::named("b").await,
            slow_download().await,
        ];
        let ws_addr = support::websocket_echo().await;
        let (listen, admin) = (support::unused_addr(), support::unused_addr());
        Setup {
            backends,
            listen,
            admin,
            config: config(listen, admin, ws_addr),
        }
    }

    fn start(&self, config: &str) -> Process {
        let [a, b, dl] = &self.backends;
        Process::start(config, &[a, b, dl])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_over_to_a_new_process_without_a_failed_request() {
    let setup = Setup::new().await;
    let (listen, admin) = (setup.listen, setup.admin);
    let mut process = setup.start(&setup.config);
    process.log_from("admin listener").await;
    let old = process.child.id();
    let url = format!("http://{listen}/");
    assert_eq!(admin_pid(admin).await, Some(u64::from(old)));

    // Sticky tokens before: one per server; a client pinned to one of them.
    let issued = tokens(&url, 2).await;
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
    let new = upgraded_to(&process).await;
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
    assert_eq!(tokens(&url, 2).await, issued);

    // Its last connection closed, the old process exits.
    ws.close(None).await.unwrap();
    drop(ws);
    assert_eq!(process.wait(Duration::from_secs(20)), 0);
    let log = process.stderr.lock().unwrap().clone();
    assert!(log.contains("all connections closed; exiting"), "{log}");

    // The old process is gone: what the loops get answered now, the new one answers.
    for load in &loads {
        load.answers_more(50).await;
    }
    stop.store(true, Ordering::Relaxed);
    for load in loads {
        load.ends_without_a_failure().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_whose_new_process_cannot_start_leaves_the_old_one_serving() {
    let setup = Setup::new().await;
    let (listen, admin) = (setup.listen, setup.admin);
    let process = setup.start(&setup.config);
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
    load.answers_more(50).await;
    stop.store(true, Ordering::Relaxed);
    load.ends_without_a_failure().await;
}

/// Waits (up to 10 s) until process `pid` runs `count` worker threads (a thread names
/// itself once it runs, a moment after the process has logged that it listens).
async fn expect_worker_threads(pid: u32, count: usize) {
    let workers = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            // Thread names are cut to 15 bytes: "fulcrum-worker-".
            .filter(|name| name.starts_with("fulcrum-worker-"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers() != count {
        assert!(
            Instant::now() < deadline,
            "process {pid} runs {} worker threads, not {count}",
            workers()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pid in the old process's "upgraded: process PID serves" line.
async fn upgraded_to(process: &Process) -> u32 {
    let line = process.log_from("upgraded: process ").await;
    line.split("upgraded: process ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_more_workers_serves_every_request() {
    let setup = Setup::new().await;
    let listen = setup.listen;
    let one_worker = setup.config.replacen("workers = 2", "workers = 1", 1);
    let mut process = setup.start(&one_worker);
    process.log_from("admin listener").await;
    let old = process.child.id();
    expect_worker_threads(old, 1).await;
    let url = format!("http://{listen}/");
    let stop = Arc::new(AtomicBool::new(false));
    let loads = [
        steady_load(url.clone(), true, stop.clone()),
        steady_load(url.clone(), false, stop.clone()),
    ];
    for load in &loads {
        load.answers_more(20).await;
    }

    let filled =
        std::fs::read_to_string(&process.config)
            .unwrap()
            .replacen("workers = 1", "workers = 2", 1);
    std::fs::write(&process.config, filled).unwrap();
    process.signal("USR2");
    let new = upgraded_to(&process).await;
    let _started = Started(new);
    expect_worker_threads(new, 2).await;
    assert_eq!(process.wait(Duration::from_secs(20)), 0);

    // Only the new process is left: its two workers answer what follows.
    for load in &loads {
        load.answers_more(100).await;
    }
    stop.store(true, Ordering::Relaxed);
    for load in loads {
        load.ends_without_a_failure().await;
    }
}

/// Reads one HTTP/1.1 response with a `Content-Length` body from `stream` (within 10 s):
/// its head, lowercased, or None if the connection closed first.
async fn read_response(stream: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return Some(head);
            }
        }
        let mut buf = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_kept_alive_connection_as_the_upgrade_begins_is_answered() {
    use tokio::io::AsyncWriteExt;
    let setup = Setup::new().await;
    let listen = setup.listen;
    let mut process = setup.start(&setup.config);
    process.log_from("admin listener").await;
    let request = format!("GET / HTTP/1.1\r\nhost: {listen}\r\n\r\n");
    let mut idle = tokio::net::TcpStream::connect(listen).await.unwrap();
    idle.write_all(request.as_bytes()).await.unwrap();
    let head = read_response(&mut idle).await.expect("no first response");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");

    // The old process has been asked to finish just now; this client cannot know, and
    // sends its next request on the connection it was told stays open.
    process.signal("USR2");
    let new = upgraded_to(&process).await;
    let _started = Started(new);
    idle.write_all(request.as_bytes()).await.unwrap();
    let head = read_response(&mut idle)
        .await
        .expect("the old process closed a kept-alive connection with a request on its way");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(process.wait(Duration::from_secs(20)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigusr2_sent_as_the_process_starts_upgrades_it() {
    let setup = Setup::new().await;
    let listen = setup.listen;
    // Returns as soon as the first listener is bound: the admin listener and the workers
    // are yet to start.
    let mut process = setup.start(&setup.config);
    // SAFETY: a plain kill(2) of our child, at once (no `kill` command to start first).
    let sent = unsafe { libc::kill(process.child.id() as libc::pid_t, libc::SIGUSR2) };
    assert_eq!(sent, 0);
    let new = upgraded_to(&process).await;
    let _started = Started(new);
    assert_eq!(process.wait(Duration::from_secs(20)), 0);
    let answer = support::client()
        .get(format!("http://{listen}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}
