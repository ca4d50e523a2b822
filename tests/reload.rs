//! `kill -HUP`: the running binary reads its config file again and applies it, or keeps
//! serving with the one it has and says why not.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use support::{Backend, Process, get_text};

fn config(servers: &str, bind: &str) -> String {
    format!(
        "[listeners.web]\nbind = \"{bind}\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
         [upstreams.app]\nservers = [{servers}]\n[access_log]\nenabled = false\n"
    )
}

async fn answers(process: &Process, n: usize) -> HashSet<String> {
    let client = support::client();
    let mut seen = HashSet::new();
    for _ in 0..n {
        seen.insert(get_text(&client, &process.url("/")).await);
    }
    seen
}

#[tokio::test]
async fn sighup_applies_a_good_config_and_keeps_serving_through_a_bad_one() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let process = Process::start(&config("{ address = \"{0}\" }", "127.0.0.1:0"), &[&a]);
    assert_eq!(answers(&process, 4).await, HashSet::from(["a".to_string()]));

    // A server added: after the reload both take requests, on the same listener.
    let both = config(
        "{ address = \"{0}\" }, { address = \"{1}\" }",
        "127.0.0.1:0",
    );
    std::fs::write(&process.config, support::fill(&both, &[&a, &b])).unwrap();
    process.signal("HUP");
    process.log_from("config reloaded").await;
    assert_eq!(
        answers(&process, 6).await,
        HashSet::from(["a".to_string(), "b".to_string()])
    );

    // A broken file: the error says where, and the last good config goes on serving.
    std::fs::write(
        &process.config,
        "[upstreams.app]\nservers = [{ address = \"nowhere\" }]\n",
    )
    .unwrap();
    process.signal("HUP");
    let log = process.log_from("config not reloaded").await;
    assert!(log.contains("fulcrum.toml:2:"), "{log}");
    assert_eq!(answers(&process, 6).await.len(), 2);

    // Workers are set up at start: a reload that changes them is refused as a whole.
    let more = format!(
        "workers = 3\n{}",
        config("{ address = \"{0}\" }", "127.0.0.1:0")
    );
    std::fs::write(&process.config, support::fill(&more, &[&a])).unwrap();
    process.signal("HUP");
    let log = process.log_from("workers changed from").await;
    assert!(log.contains("restart Fulcrum to apply"), "{log}");
    assert_eq!(answers(&process, 6).await.len(), 2);
}

/// One server behind a sticky cookie, with `top` at the top of the file.
fn sticky(top: &str) -> String {
    let config = config("{ address = \"{0}\" }", "127.0.0.1:0");
    format!(
        "{top}{}",
        config.replace("servers = ", "sticky_cookie = \"s\"\nservers = ")
    )
}

/// The `s=TOKEN` that pins a new client to the (only) server.
async fn pin(process: &Process) -> String {
    let resp = support::client()
        .get(process.url("/"))
        .send()
        .await
        .unwrap();
    let value = resp.headers()["set-cookie"].to_str().unwrap();
    value.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn sticky_tokens_survive_a_reload_and_with_a_configured_secret_a_restart() {
    let app = Backend::named("app").await;
    let secret = "sticky_secret = \"0123456789abcdef0123456789abcdef\"\n";

    // Without a secret each process draws its own key: a restart moves pinned clients.
    let first = Process::start(&sticky(""), &[&app]);
    let second = Process::start(&sticky(""), &[&app]);
    let token = pin(&first).await;
    assert_ne!(pin(&second).await, token);
    // A reload keeps the process's key.
    first.signal("HUP");
    first.log_from("config reloaded").await;
    assert_eq!(pin(&first).await, token);

    // A secret configured (here by a reload): the same token in any process given it.
    std::fs::write(&second.config, support::fill(&sticky(secret), &[&app])).unwrap();
    second.signal("HUP");
    second.log_from("config reloaded").await;
    let keyed = pin(&second).await;
    assert_ne!(keyed, token);
    let third = Process::start(&sticky(secret), &[&app]);
    assert_eq!(pin(&third).await, keyed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_steady_load_on_several_workers_fail_no_request() {
    let backends = [
        Backend::named("a").await,
        Backend::named("b").await,
        Backend::named("c").await,
    ];
    let refs: Vec<&Backend> = backends.iter().collect();
    let with = |servers: &str| format!("workers = 2\n{}", config(servers, "127.0.0.1:0"));
    let process = Process::start(&with("{ address = \"{0}\" }, { address = \"{1}\" }"), &refs);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Six clients, HTTP/1.1 and HTTP/2, each at most 2,000 requests or until told to stop.
    let clients = (0..6).map(|i| {
        let client = if i % 2 == 0 {
            support::client()
        } else {
            reqwest::Client::builder()
                .no_proxy()
                .http2_prior_knowledge()
                .build()
                .unwrap()
        };
        let (url, stop) = (process.url("/"), stop.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..2_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let resp = client.get(&url).send().await;
                answers.push(match resp {
                    Ok(resp) if resp.status() == 200 => resp.text().await.unwrap_or_default(),
                    Ok(resp) => format!("status {}", resp.status()),
                    Err(e) => format!("error {e}"),
                });
            }
            answers
        })
    });
    let clients: Vec<_> = clients.collect();
    let sets = [
        "{ address = \"{1}\" }, { address = \"{2}\" }",
        "{ address = \"{0}\", weight = 3 }, { address = \"{2}\" }",
        "{ address = \"{0}\" }, { address = \"{1}\", drain = true }, { address = \"{2}\" }",
        "{ address = \"{2}\" }",
        "{ address = \"{0}\" }, { address = \"{1}\" }, { address = \"{2}\" }",
        "{ address = \"{1}\" }",
    ];
    for servers in sets {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        std::fs::write(&process.config, support::fill(&with(servers), &refs)).unwrap();
        process.signal("HUP");
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        for answer in client.await.unwrap() {
            total += 1;
            assert!(
                ["a", "b", "c"].contains(&answer.as_str()),
                "a request failed: {answer}"
            );
        }
    }
    assert!(total > 100, "only {total} requests ran");
    let log = process.stderr.lock().unwrap().clone();
    assert_eq!(log.matches("config reloaded").count(), 6, "{log}");
    // The last config is the one in force.
    assert_eq!(answers(&process, 6).await, HashSet::from(["b".to_string()]));
}

/// Listeners at `binds`: `keep` routing to `app` (`{0}`, answering `ok`), the others to
/// `side` (`{1}`, answering `side`), so that a request counted against the wrong listener
/// gets the wrong answer; an admin listener to read them from.
fn listeners(workers: usize, admin: SocketAddr, binds: &[(&str, SocketAddr)]) -> String {
    let mut text = format!(
        "workers = {workers}\n[admin]\nbind = \"{admin}\"\n[access_log]\nenabled = false\n\
         [upstreams.app]\nservers = [{{ address = \"{{0}}\" }}]\n\
         [upstreams.side]\nservers = [{{ address = \"{{1}}\" }}]\n"
    );
    for (name, bind) in binds {
        let upstream = if *name == "keep" { "app" } else { "side" };
        text.push_str(&format!(
            "[listeners.{name}]\nbind = \"{bind}\"\n[[listeners.{name}.routes]]\nupstream = \"{upstream}\"\n"
        ));
    }
    text
}

/// A backend answering `answer`, after 1.5 s on `/slow`.
async fn slow_backend(answer: &'static str) -> Backend {
    Backend::with(move |req| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        http::Response::new(support::full(answer))
    })
    .await
}

async fn get(addr: SocketAddr) -> String {
    support::get_text(&support::client(), &format!("http://{addr}/")).await
}

/// Requests to `addr` until `stop` (at most 3,000), on kept-alive connections if `reuse`,
/// else each on a connection of its own: the answers that were not `ok`.
fn steady_load(
    addr: SocketAddr,
    reuse: bool,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let client = if reuse {
            support::client()
        } else {
            reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap()
        };
        let (mut sent, mut failed) = (0, Vec::new());
        while sent < 3_000 && !stop.load(Ordering::Relaxed) {
            sent += 1;
            match client.get(format!("http://{addr}/")).send().await {
                Ok(resp) if resp.status() == 200 => {
                    let body = resp.text().await.unwrap_or_else(|e| format!("body: {e}"));
                    if body != "ok" {
                        failed.push(body);
                    }
                }
                Ok(resp) => failed.push(format!("status {}", resp.status())),
                Err(e) => failed.push(format!("error {e:?}")),
            }
        }
        (sent, failed)
    })
}

/// Waits (up to 5 s) until connections to `addr` are refused.
async fn refused(addr: SocketAddr) -> bool {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn listener_names(admin: SocketAddr) -> Vec<String> {
    let text = support::get_text(&support::client(), &format!("http://{admin}/api/status")).await;
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            format!(
                "{}@{}",
                l["name"].as_str().unwrap(),
                l["bind"].as_str().unwrap()
            )
        })
        .collect()
}

async fn reload_changes_listeners_under_load(workers: usize) {
    let (app, side) = (slow_backend("ok").await, slow_backend("side").await);
    let backends = [&app, &side];
    let [keep, gone, moved, moved_to, new, admin] = std::array::from_fn(|_| support::unused_addr());
    // Listeners are kept in name order: after the change `keep` is first, not second.
    let before = [("gone", gone), ("keep", keep), ("moved", moved)];
    let process = Process::start(&listeners(workers, admin, &before), &backends);
    // Serving, so its signal handlers are in place.
    process.log_from("admin listener").await;
    let stop = Arc::new(AtomicBool::new(false));
    let loads = [
        steady_load(keep, true, stop.clone()),
        steady_load(keep, false, stop.clone()),
    ];

    // A new listener whose port is taken: the reload fails as a whole, naming it, and
    // every listener serves as before.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let blocked = [("keep", keep), ("moved", moved), ("new", taken_addr)];
    std::fs::write(
        &process.config,
        support::fill(&listeners(workers, admin, &blocked), &backends),
    )
    .unwrap();
    process.signal("HUP");
    let log = process.log_from("config not reloaded").await;
    assert!(
        log.contains(&format!("listener `new` cannot bind {taken_addr}")),
        "{log}"
    );
    assert_eq!(
        [get(gone).await, get(keep).await, get(moved).await],
        ["side", "ok", "side"]
    );
    drop(taken);

    // Requests in flight on the listener about to go, over HTTP/1.1 and HTTP/2.
    let mut in_flight = tokio::net::TcpStream::connect(gone).await.unwrap();
    in_flight
        .write_all(b"GET /slow HTTP/1.1\r\nHost: gone\r\n\r\n")
        .await
        .unwrap();
    let h2_in_flight = tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let resp = client.get(format!("http://{gone}/slow")).send().await;
        match resp {
            Ok(resp) => format!(
                "{} {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            ),
            Err(e) => format!("error {e:?}"),
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let after = [("keep", keep), ("moved", moved_to), ("new", new)];
    std::fs::write(
        &process.config,
        support::fill(&listeners(workers, admin, &after), &backends),
    )
    .unwrap();
    process.signal("HUP");
    process.log_from("config reloaded").await;

    // The new listeners serve; the old addresses refuse new connections.
    assert_eq!(
        [get(keep).await, get(moved_to).await, get(new).await],
        ["ok", "side", "side"]
    );
    assert!(refused(gone).await, "the removed listener still accepts");
    assert!(
        refused(moved).await,
        "the moved listener still accepts at its old address"
    );
    // The request in flight there finishes, and its connection closes after it.
    let answer = support::read_until_close(&mut in_flight, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(answer.ends_with("side"), "{answer}");
    assert_eq!(h2_in_flight.await.unwrap(), "200 OK side");
    let mut shown = listener_names(admin).await;
    shown.sort();
    assert_eq!(
        shown,
        [
            format!("keep@{keep}"),
            format!("moved@{moved_to}"),
            format!("new@{new}")
        ]
    );

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
async fn a_reload_adds_removes_and_rebinds_listeners_without_failing_a_request_on_the_others() {
    reload_changes_listeners_under_load(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_two_workers_a_reload_changes_listeners_without_failing_a_request_on_the_others() {
    reload_changes_listeners_under_load(2).await;
}

/// Whether a request sent on a new connection to `addr` is answered within `within`.
async fn answered_within(addr: SocketAddr, within: Duration) -> bool {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = support::read_until_close(&mut stream, within).await;
    answer.starts_with("HTTP/1.1 200")
}

#[tokio::test]
async fn max_connections_changes_apply_to_the_running_listener() {
    let app = Backend::named("app").await;
    let limited = |max: usize| {
        support::fill(
            &format!(
                "[listeners.web]\nbind = \"127.0.0.1:0\"\nmax_connections = {max}\n\
                 [[listeners.web.routes]]\nupstream = \"app\"\n\
                 [upstreams.app]\nservers = [{{ address = \"{{0}}\" }}]\n"
            ),
            &[&app],
        )
    };
    let proxy = support::Proxy::start(&limited(1), &[&app]).await;
    // The one connection allowed, held open: the next waits in the listen queue.
    // (Part of a head: with `defer_accept`, a connection is accepted once bytes arrive.)
    let mut held = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    held.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!answered_within(proxy.addr, Duration::from_millis(500)).await);

    let config = fulcrum::config::parse("test.toml", &limited(3)).unwrap();
    proxy.server.reload(config).unwrap();
    assert_eq!(
        proxy.server.local_addrs(),
        [proxy.addr],
        "the listener was rebound"
    );
    assert!(answered_within(proxy.addr, Duration::from_secs(5)).await);
}
