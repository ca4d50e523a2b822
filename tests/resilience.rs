//! Retries, the retry budget and the circuit breaker against real servers on 127.0.0.1: a
//! server that accepts and never answers costs a GET one `try_timeout`; a POST is retried
//! only when it never reached a server; retries stay within their budget; over
//! `max_active_requests` requests wait in a bounded line or get a 503 saying why.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use support::{Backend, Proxy, RawBackend, client};

/// One listener routing everything to upstream `app` with `servers` (TOML inline tables),
/// plus `extra` keys for that upstream.
fn config(servers: &[String], extra: &str) -> String {
    format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
         [upstreams.app]\nservers = [{}]\n{extra}",
        servers.join(", ")
    )
}

fn primary(addr: SocketAddr) -> String {
    format!("{{ address = \"{addr}\" }}")
}

fn backup(addr: SocketAddr) -> String {
    format!("{{ address = \"{addr}\", backup = true }}")
}

/// A server that reads each request head and closes without a byte of answer.
async fn closing_server() -> RawBackend {
    RawBackend::start(|_head| (Vec::new(), true)).await
}

#[tokio::test]
async fn a_silent_server_costs_a_get_one_try_timeout_and_another_server_answers() {
    // Bound but never accepting: the kernel completes connections and takes the request,
    // and nothing answers, as with a stopped (SIGSTOP) process.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let alive = Backend::named("alive").await;
    let try_timeout = Duration::from_millis(400);
    let proxy = Proxy::start(
        &config(
            &[primary(silent.local_addr().unwrap()), primary(alive.addr)],
            "try_timeout = \"400ms\"\n",
        ),
        &[],
    )
    .await;
    let client = client();
    let mut waited = 0;
    for _ in 0..8 {
        let started = Instant::now();
        let resp = client.get(proxy.url("/")).send().await.unwrap();
        let took = started.elapsed();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "alive");
        // One try_timeout at the silent server at most, not the 60 s response header
        // timeout (generous: the machine is shared).
        assert!(took < try_timeout + Duration::from_secs(3), "{took:?}");
        if took >= try_timeout {
            waited += 1;
        }
    }
    assert_eq!(alive.seen.count(), 8);
    // Round robin sends every other first try to the silent server.
    assert!(waited >= 2, "only {waited} requests met the silent server");
}

#[tokio::test]
async fn a_post_that_reached_a_server_is_not_retried_but_a_get_is() {
    let closing = closing_server().await;
    let other = Backend::named("other").await;
    let proxy = Proxy::start(
        &config(&[primary(closing.addr), backup(other.addr)], ""),
        &[],
    )
    .await;
    let client = client();

    let resp = client
        .post(proxy.url("/order"))
        .body("pay once")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().starts_with("502 Bad Gateway"));
    assert_eq!(closing.seen.lock().unwrap().len(), 1);
    assert_eq!(other.seen.count(), 0, "the POST went to a second server");

    // Idempotent, but its body was streamed to the first server and is not kept.
    let resp = client
        .put(proxy.url("/doc"))
        .body("new text")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(closing.seen.lock().unwrap().len(), 2);
    assert_eq!(other.seen.count(), 0, "the PUT went to a second server");

    // The same failure on a GET goes on to the other server.
    let resp = client.get(proxy.url("/page")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "other");
    assert_eq!(closing.seen.lock().unwrap().len(), 3);
    assert_eq!(other.seen.count(), 1);
}

#[tokio::test]
async fn a_post_refused_at_connect_is_retried_with_its_body() {
    let echo = Backend::with(|req: http::Request<hyper::body::Incoming>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        http::Response::new(support::full(body))
    })
    .await;
    let proxy = Proxy::start(
        &config(&[primary(support::unused_addr()), backup(echo.addr)], ""),
        &[],
    )
    .await;
    let resp = client()
        .post(proxy.url("/order"))
        .body("pay once")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "pay once");
    assert_eq!(echo.seen.count(), 1);
}

/// Sends `n` GETs one after another through `proxy`; every one must fail.
async fn failing_gets(proxy: &Proxy, n: usize) {
    let client = client();
    for _ in 0..n {
        let status = client.get(proxy.url("/")).send().await.unwrap().status();
        // 503 once outlier detection has ejected every server.
        assert!(status == 502 || status == 503, "{status}");
    }
}

/// `n` servers that close every connection without answering, and their config entries.
async fn closing_servers(n: usize) -> (Vec<RawBackend>, Vec<String>) {
    let mut servers = Vec::new();
    for _ in 0..n {
        servers.push(closing_server().await);
    }
    let entries = servers.iter().map(|s| primary(s.addr)).collect();
    (servers, entries)
}

fn tries(servers: &[RawBackend]) -> usize {
    servers.iter().map(|s| s.seen.lock().unwrap().len()).sum()
}

#[tokio::test]
async fn retries_stay_within_their_share_of_requests() {
    let (servers, addrs) = closing_servers(3).await;
    let proxy = Proxy::start(
        &config(
            &addrs,
            "retries = 2\nretry_budget = 20\nretry_budget_min_per_second = 0\n",
        ),
        &[],
    )
    .await;
    let requests = 60;
    failing_gets(&proxy, requests).await;
    let tries = tries(&servers);
    // Without a budget every request would make three tries (180).
    assert!(tries > requests, "no retry at all: {tries}");
    assert!(tries <= requests + requests * 20 / 100, "{tries} tries");
}

#[tokio::test]
async fn a_quiet_upstream_may_retry_up_to_the_floor() {
    let (servers, addrs) = closing_servers(3).await;
    // No share of requests: only the floor, one retry a second over the ten-second window.
    let proxy = Proxy::start(
        &config(
            &addrs,
            "retry_budget = 0\nretry_budget_min_per_second = 1\n",
        ),
        &[],
    )
    .await;
    let started = Instant::now();
    failing_gets(&proxy, 20).await;
    let tries = tries(&servers);
    if started.elapsed() < Duration::from_secs(9) {
        assert_eq!(tries, 20 + 10);
    } else {
        // A very slow run: the window moved on while it ran.
        assert!((20..=20 + 20).contains(&tries), "{tries} tries");
    }
}

/// A backend that answers after `delay`.
async fn slow_backend(delay: Duration) -> Backend {
    Backend::with(move |_req| async move {
        tokio::time::sleep(delay).await;
        http::Response::new(support::full("slow"))
    })
    .await
}

#[tokio::test]
async fn over_the_limit_one_request_waits_in_line_and_the_next_gets_503() {
    let slow = slow_backend(Duration::from_secs(2)).await;
    let proxy = Proxy::start(
        &config(
            &[primary(slow.addr)],
            "max_active_requests = 1\nmax_pending_requests = 1\nqueue_timeout = \"20s\"\n",
        ),
        &[],
    )
    .await;
    let client = client();
    let send = || {
        let (client, url) = (client.clone(), proxy.url("/"));
        tokio::spawn(async move {
            let resp = client.get(url).send().await.unwrap();
            let status = resp.status().as_u16();
            let retry_after = resp.headers().get("retry-after").cloned();
            (status, retry_after, resp.text().await.unwrap())
        })
    };
    let (a, b, c) = (send(), send(), send());
    let mut answers = vec![a.await.unwrap(), b.await.unwrap(), c.await.unwrap()];
    answers.sort_by_key(|(status, ..)| *status);
    let statuses: Vec<u16> = answers.iter().map(|(s, ..)| *s).collect();
    assert_eq!(statuses, [200, 200, 503], "{answers:?}");
    let (_, retry_after, body) = &answers[2];
    assert!(retry_after.is_some(), "no Retry-After");
    assert_eq!(
        body,
        "503 Service Unavailable: upstream is at its limit of requests and its queue is full\n"
    );
    // One at a time: the queued request reached the server only after the first was done.
    assert_eq!(slow.seen.count(), 2);
}

#[tokio::test]
async fn a_request_waits_in_line_no_longer_than_queue_timeout() {
    let slow = slow_backend(Duration::from_secs(4)).await;
    let proxy = Proxy::start(
        &config(
            &[primary(slow.addr)],
            "max_active_requests = 1\nqueue_timeout = \"300ms\"\n",
        ),
        &[],
    )
    .await;
    let client = client();
    let first = tokio::spawn(client.get(proxy.url("/")).send());
    // Until the first is at the server, holding the only place.
    let deadline = Instant::now() + Duration::from_secs(10);
    while slow.seen.count() == 0 {
        assert!(Instant::now() < deadline, "the first request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let resp = client.get(proxy.url("/")).send().await.unwrap();
    let waited = started.elapsed();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(
        resp.text().await.unwrap(),
        "503 Service Unavailable: upstream is at its limit of requests and none finished in time\n"
    );
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(slow.seen.count(), 1);
}

#[tokio::test]
async fn with_every_server_known_unreachable_the_answer_is_503_saying_so() {
    let proxy = Proxy::start(&config(&[primary(support::unused_addr())], ""), &[]).await;
    let client = client();
    // The first request finds the server gone.
    let resp = client.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    // The next ones know there is no server to take them.
    let resp = client.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(
        resp.text().await.unwrap(),
        "503 Service Unavailable: every upstream server is unreachable\n"
    );
}

#[tokio::test]
async fn a_request_waiting_at_max_connections_gets_the_connection_another_frees() {
    let slow = slow_backend(Duration::from_millis(300)).await;
    let proxy = Proxy::start(
        &config(
            &[format!(
                "{{ address = \"{}\", max_connections = 1 }}",
                slow.addr
            )],
            "[timeouts]\nupstream_connect = \"20s\"\n",
        ),
        &[],
    )
    .await;
    let client = client();
    let requests: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client.get(proxy.url("/")).send()))
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(slow.seen.count(), 3);
    // One connection, handed from each request to the next, rather than closed and opened
    // again for each.
    assert_eq!(
        slow.seen
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn the_limit_holds_across_workers() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (now2, most2) = (now.clone(), most.clone());
    let backend = Backend::with(move |_req| {
        let (now, most) = (now2.clone(), most2.clone());
        async move {
            most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            http::Response::new(support::full("one at a time"))
        }
    })
    .await;
    let proxy = Proxy::start_workers(
        &config(
            &[primary(backend.addr)],
            "max_active_requests = 1\nmax_pending_requests = 10\nqueue_timeout = \"30s\"\n",
        ),
        &[],
        2,
    );
    // A client each, so that their connections spread over the workers.
    let requests: Vec<_> = (0..6)
        .map(|_| tokio::spawn(client().get(proxy.url("/")).send()))
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(backend.seen.count(), 6);
    assert_eq!(most.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn try_timeout_cuts_short_only_a_try_another_can_follow() {
    let slow = slow_backend(Duration::from_millis(1500)).await;
    let fast = Backend::named("fast").await;
    let client = client();

    // Alone, the slow server's GETs and POSTs are all waited for: no other try could follow.
    let alone = Proxy::start(
        &config(&[primary(slow.addr)], "try_timeout = \"300ms\"\n"),
        &[],
    )
    .await;
    let resp = client.post(alone.url("/")).body("x").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client.get(alone.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "slow");

    // Beside a fast server, a GET that lands on the slow one gives up after its try_timeout
    // and is answered by the other.
    let both = Proxy::start(
        &config(
            &[primary(slow.addr), primary(fast.addr)],
            "try_timeout = \"300ms\"\n",
        ),
        &[],
    )
    .await;
    for _ in 0..4 {
        let started = std::time::Instant::now();
        let resp = client.get(both.url("/")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "fast");
        assert!(
            started.elapsed() < Duration::from_millis(1200),
            "{:?}",
            started.elapsed()
        );
    }
}

/// Connections that cannot be made cost no retry and no budget, and every dead server is
/// marked, however many: with two of three servers refusing and no retries at all, no
/// request fails.
#[tokio::test]
async fn refused_connections_move_on_to_the_next_server_whatever_the_retries() {
    let alive = Backend::named("alive").await;
    let (dead1, dead2) = (support::unused_addr(), support::unused_addr());
    let proxy = Proxy::start(
        &config(
            &[primary(dead1), primary(alive.addr), primary(dead2)],
            "retries = 0\nretry_budget = 0\nretry_budget_min_per_second = 0\n",
        ),
        &[],
    )
    .await;
    let client = client();
    for _ in 0..200 {
        let resp = client.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "alive");
    }
    let rt = proxy.server.runtime();
    let states: Vec<_> = rt.upstreams[0]
        .servers
        .iter()
        .map(|s| s.health_state())
        .collect();
    assert_eq!(states, ["unreachable", "up", "unreachable"]);
    assert_eq!(rt.upstreams[0].resilience_stats().budget_exhausted, 0);
}
