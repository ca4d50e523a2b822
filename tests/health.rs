//! Server health end to end: active checks against real backends take servers down and
//! bring them back through slow start; real traffic ejects servers that answer 5xx, within
//! the ejection cap; too few healthy servers make the upstream balance over all of them.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Response;
use support::{Backend, Proxy, full, get_text};

/// Tests that measure time run one at a time, so that they do not slow each other down.
static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A backend whose `/health` answers what `health` holds (its status), and whose other paths
/// answer `traffic` (its status) with `name` as the body. Every request is recorded with
/// its arrival time.
struct Switchable {
    backend: Backend,
    health: Arc<AtomicU16>,
    traffic: Arc<AtomicU16>,
    body: Arc<Mutex<&'static str>>,
    checks: Arc<Mutex<Vec<Instant>>>,
}

/// A switchable backend for each name, all healthy.
async fn switchables(names: &[&'static str]) -> Vec<Switchable> {
    let mut backends = Vec::new();
    for &name in names {
        backends.push(Switchable::new(name).await);
    }
    backends
}

/// How many servers of the first upstream are in `state` now.
fn servers_in(proxy: &Proxy, state: &str) -> usize {
    proxy.server.runtime().upstreams[0]
        .servers
        .iter()
        .filter(|s| s.health_state() == state)
        .count()
}

impl Switchable {
    async fn new(name: &'static str) -> Switchable {
        let health = Arc::new(AtomicU16::new(200));
        let traffic = Arc::new(AtomicU16::new(200));
        let body = Arc::new(Mutex::new("ready"));
        let checks = Arc::new(Mutex::new(Vec::new()));
        let (h, t, b, c) = (
            health.clone(),
            traffic.clone(),
            body.clone(),
            checks.clone(),
        );
        let backend = Backend::with(move |req| {
            let (h, t, b, c) = (h.clone(), t.clone(), b.clone(), c.clone());
            async move {
                if req.uri().path() == "/health" {
                    c.lock().unwrap().push(Instant::now());
                    let text = *b.lock().unwrap();
                    return Response::builder()
                        .status(h.load(Ordering::SeqCst))
                        .body(full(text))
                        .unwrap();
                }
                Response::builder()
                    .status(t.load(Ordering::SeqCst))
                    .header("x-backend", name)
                    .body(full(name))
                    .unwrap()
            }
        })
        .await;
        Switchable {
            backend,
            health,
            traffic,
            body,
            checks,
        }
    }

    /// Requests other than checks that reached it.
    fn traffic_seen(&self) -> usize {
        self.backend
            .seen
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.uri.path() != "/health")
            .count()
    }

    fn checks_seen(&self) -> usize {
        self.checks.lock().unwrap().len()
    }
}

/// The server at `addr` in the proxy's running upstream `app`.
fn server(proxy: &Proxy, addr: SocketAddr) -> Arc<fulcrum::upstream::Server> {
    proxy.server.runtime().upstreams[0]
        .servers
        .iter()
        .find(|s| s.address == addr)
        .expect("the server is listed")
        .clone()
}

/// Waits up to `limit` for `done`, looking every 10 ms; returns how long it took.
async fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

fn config(n: usize, extra: &str) -> String {
    support::simple_config(n, extra)
}

#[tokio::test]
async fn a_server_failing_http_checks_is_down_until_they_pass_then_ramps_up() {
    let _timed = TIMED.lock().await;
    let (a, b) = (Switchable::new("a").await, Switchable::new("b").await);
    let proxy = Proxy::start(
        &config(
            2,
            "slow_start = \"1s\"\n[upstreams.app.health_check]\npath = \"/health\"\n\
             interval = \"300ms\"\ntimeout = \"250ms\"\nrise = 2\nfall = 2\n",
        ),
        &[&a.backend, &b.backend],
    )
    .await;
    let client = support::client();
    let sick = server(&proxy, a.backend.addr);
    // Checked, and up as it started.
    // The server counts a check when it arrives; Fulcrum records it once the answer is in.
    wait_for(Duration::from_secs(5), "a first check", || {
        a.checks_seen() >= 1 && sick.health_report().last_check.is_some()
    })
    .await;
    assert_eq!(sick.health_state(), "up");
    assert!(sick.health_report().last_check.unwrap().passed);

    a.health.store(503, Ordering::SeqCst);
    // Two failing checks 300 ms apart, plus the rest of the interval, plus slack.
    let took = wait_for(Duration::from_secs(3), "down after fall checks", || {
        sick.health_state() == "down"
    })
    .await;
    eprintln!("down after {took:?}");
    assert!(!sick.is_healthy());
    let report = sick.health_report();
    assert_eq!(report.share, 0);
    let last = report.history.last().unwrap();
    assert_eq!(last.state, "down");
    assert!(last.reason.contains("unexpected status 503"), "{last:?}");

    // Meanwhile nothing reaches it.
    let before = a.traffic_seen();
    for _ in 0..20 {
        assert_eq!(get_text(&client, &proxy.url("/")).await, "b");
    }
    assert_eq!(a.traffic_seen(), before);

    // Two passing checks bring it back, with a small share first.
    a.health.store(200, Ordering::SeqCst);
    wait_for(Duration::from_secs(3), "back after rise checks", || {
        sick.is_healthy()
    })
    .await;
    let share = sick.share();
    assert!(share < 1000, "share {share} right after coming back");
    assert_eq!(sick.health_state(), "ramping");
    // Traffic moves the ramp along; within slow_start and some slack it takes its whole share.
    let started = Instant::now();
    while sick.share() < 1000 && started.elapsed() < Duration::from_secs(5) {
        get_text(&client, &proxy.url("/")).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sick.share(), 1000);
    assert_eq!(sick.health_state(), "up");
    assert!(a.traffic_seen() > before, "it takes requests again");
    let states: Vec<_> = sick
        .health_report()
        .history
        .iter()
        .map(|e| e.state)
        .collect();
    assert_eq!(states, ["down", "ramping", "up"]);
}

#[tokio::test]
async fn a_tcp_check_finds_a_closed_port() {
    let _timed = TIMED.lock().await;
    let good = Backend::named("good").await;
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let text = support::config_for(
        &[good.addr, closed],
        "[upstreams.app.health_check]\ntype = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfall = 2\n",
    );
    let proxy = Proxy::start(&text, &[]).await;
    let dead = server(&proxy, closed);
    wait_for(Duration::from_secs(3), "the closed port down", || {
        dead.health_state() == "down"
    })
    .await;
    let check = dead.health_report().last_check.unwrap();
    assert!(!check.passed);
    assert_eq!(check.detail, "connection refused");
    let alive = server(&proxy, good.addr);
    assert_eq!(alive.health_state(), "up");
    assert_eq!(
        alive.health_report().last_check.unwrap().detail,
        "connected"
    );
    // A TCP check sends nothing.
    assert_eq!(good.seen.count(), 0);
    let client = support::client();
    for _ in 0..10 {
        assert_eq!(get_text(&client, &proxy.url("/")).await, "good");
    }
}

#[tokio::test]
async fn a_body_without_the_expected_text_fails_the_check() {
    let _timed = TIMED.lock().await;
    let (a, b) = (Switchable::new("a").await, Switchable::new("b").await);
    *a.body.lock().unwrap() = "starting";
    let proxy = Proxy::start(
        &config(
            2,
            "[upstreams.app.health_check]\npath = \"/health\"\ninterval = \"200ms\"\n\
             timeout = \"150ms\"\nfall = 2\nrise = 1\nexpect_body = \"ready\"\n",
        ),
        &[&a.backend, &b.backend],
    )
    .await;
    let a_server = server(&proxy, a.backend.addr);
    wait_for(Duration::from_secs(3), "down on the wrong body", || {
        a_server.health_state() == "down"
    })
    .await;
    let last = a_server.health_report().history.pop().unwrap();
    assert!(
        last.reason.contains("body does not contain expect_body"),
        "{last:?}"
    );
    assert_eq!(server(&proxy, b.backend.addr).health_state(), "up");
    *a.body.lock().unwrap() = "all systems ready";
    wait_for(Duration::from_secs(3), "up on the right body", || {
        a_server.is_healthy()
    })
    .await;
}

#[tokio::test]
async fn checks_run_once_per_process_spread_over_the_interval() {
    let _timed = TIMED.lock().await;
    let backends = [
        Switchable::new("a").await,
        Switchable::new("b").await,
        Switchable::new("c").await,
    ];
    let refs: Vec<&Backend> = backends.iter().map(|s| &s.backend).collect();
    // Two workers: checks must still run once, not once per worker.
    let proxy = Proxy::start_workers(
        &config(
            3,
            "[upstreams.app.health_check]\npath = \"/health\"\ninterval = \"300ms\"\njitter = \"0s\"\n",
        ),
        &refs,
        2,
    );
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let elapsed = started.elapsed();
    let mut firsts = Vec::new();
    for b in &backends {
        let checks = b.checks.lock().unwrap().clone();
        // About one per 300 ms: 5 or 6 in 1.6 s, not twice as many.
        assert!(
            (3..=7).contains(&checks.len()),
            "{} checks in {elapsed:?}",
            checks.len()
        );
        firsts.push(checks[0]);
    }
    firsts.sort();
    // Started 100 ms apart (a third of the interval each), not all at once.
    for pair in firsts.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(40),
            "checks {gap:?} apart: {firsts:?}"
        );
    }
    drop(proxy);
}

#[tokio::test]
async fn a_server_answering_500s_is_ejected_then_tried_again() {
    let _timed = TIMED.lock().await;
    let (good, bad) = (Switchable::new("good").await, Switchable::new("bad").await);
    bad.traffic.store(500, Ordering::SeqCst);
    let proxy = Proxy::start(
        &config(
            2,
            "[upstreams.app.outlier_detection]\nconsecutive_5xx = 3\nbase_ejection_time = \"1s\"\n",
        ),
        &[&good.backend, &bad.backend],
    )
    .await;
    let client = support::client();
    let ejected = server(&proxy, bad.backend.addr);
    // Round robin: the third 500 comes with the sixth request.
    for _ in 0..6 {
        client.get(proxy.url("/")).send().await.unwrap();
    }
    assert_eq!(bad.traffic_seen(), 3);
    assert_eq!(ejected.health_state(), "ejected");
    let report = ejected.health_report();
    assert_eq!(report.ejections, 1);
    let last = report.history.last().unwrap();
    assert_eq!(last.state, "ejected");
    assert!(
        last.reason.starts_with("3 5xx responses in a row"),
        "{last:?}"
    );
    let ejected_at = Instant::now();
    for _ in 0..20 {
        assert_eq!(get_text(&client, &proxy.url("/")).await, "good");
    }
    assert_eq!(bad.traffic_seen(), 3);
    // Back after its ejection time, answering well now.
    bad.traffic.store(200, Ordering::SeqCst);
    let mut answers = Vec::new();
    while ejected_at.elapsed() < Duration::from_secs(4) && !answers.contains(&"bad".to_string()) {
        answers.push(get_text(&client, &proxy.url("/")).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back = ejected_at.elapsed();
    assert!(answers.contains(&"bad".to_string()), "never tried again");
    assert!(back >= Duration::from_millis(900), "back after {back:?}");
    assert!(ejected.is_healthy());
}

#[tokio::test]
async fn no_more_than_max_ejection_percent_are_ejected() {
    let _timed = TIMED.lock().await;
    let mut backends = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let s = Switchable::new(name).await;
        s.traffic.store(500, Ordering::SeqCst);
        backends.push(s);
    }
    let refs: Vec<&Backend> = backends.iter().map(|s| &s.backend).collect();
    let proxy = Proxy::start(
        &config(
            4,
            "[upstreams.app.outlier_detection]\nconsecutive_5xx = 2\nmax_ejection_percent = 50\n",
        ),
        &refs,
    )
    .await;
    let client = support::client();
    for _ in 0..40 {
        let resp = client.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(resp.status(), 500);
    }
    let states: Vec<&str> = proxy.server.runtime().upstreams[0]
        .servers
        .iter()
        .map(|s| s.health_state())
        .collect();
    let ejected = states.iter().filter(|s| **s == "ejected").count();
    assert_eq!(ejected, 2, "{states:?}");
    // The two left in take every request.
    let served: Vec<usize> = backends.iter().map(Switchable::traffic_seen).collect();
    assert_eq!(served.iter().sum::<usize>(), 40);
    assert_eq!(served.iter().filter(|&&n| n == 2).count(), 2, "{served:?}");
}

#[tokio::test]
async fn below_the_panic_threshold_traffic_goes_to_every_server() {
    let _timed = TIMED.lock().await;
    let backends = switchables(&["a", "b", "c", "d"]).await;
    // Three of four fail their checks but still answer requests.
    for s in &backends[1..] {
        s.health.store(503, Ordering::SeqCst);
    }
    let refs: Vec<&Backend> = backends.iter().map(|s| &s.backend).collect();
    let proxy = Proxy::start(
        &config(
            4,
            "[upstreams.app.health_check]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfall = 1\nrise = 1\n",
        ),
        &refs,
    )
    .await;
    let runtime = || proxy.server.runtime();
    wait_for(Duration::from_secs(3), "three down", || {
        servers_in(&proxy, "down") == 3
    })
    .await;
    assert!(runtime().upstreams[0].is_panicking());
    let client = support::client();
    let mut answers = std::collections::HashSet::new();
    for _ in 0..40 {
        answers.insert(get_text(&client, &proxy.url("/")).await);
    }
    assert_eq!(answers.len(), 4, "{answers:?}");

    // Two of four healthy is not below half: the panic is over, and only they are used.
    backends[1].health.store(200, Ordering::SeqCst);
    wait_for(Duration::from_secs(3), "panic over", || {
        !runtime().upstreams[0].is_panicking()
    })
    .await;
    let before: Vec<usize> = backends.iter().map(Switchable::traffic_seen).collect();
    for _ in 0..20 {
        let text = get_text(&client, &proxy.url("/")).await;
        assert!(text == "a" || text == "b", "{text}");
    }
    for (s, before) in backends[2..].iter().zip(&before[2..]) {
        assert_eq!(s.traffic_seen(), *before);
    }
}

#[tokio::test]
async fn without_a_panic_threshold_only_healthy_servers_take_traffic() {
    let _timed = TIMED.lock().await;
    let backends = switchables(&["a", "b", "c"]).await;
    for s in &backends[1..] {
        s.health.store(503, Ordering::SeqCst);
    }
    let refs: Vec<&Backend> = backends.iter().map(|s| &s.backend).collect();
    let proxy = Proxy::start(
        &config(
            3,
            "panic_threshold = 0\n[upstreams.app.health_check]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfall = 1\n",
        ),
        &refs,
    )
    .await;
    wait_for(Duration::from_secs(3), "two down", || {
        servers_in(&proxy, "down") == 2
    })
    .await;
    assert!(!proxy.server.runtime().upstreams[0].is_panicking());
    let client = support::client();
    for _ in 0..20 {
        assert_eq!(get_text(&client, &proxy.url("/")).await, "a");
    }
}

#[tokio::test]
async fn checks_go_over_tls_when_the_upstream_does() {
    use support::tls::{Key, Pki, TlsBackend};
    let _timed = TIMED.lock().await;
    let pki = Pki::new();
    let right = pki.server("backend", &["127.0.0.1"], Key::Ecdsa);
    let wrong = pki.server("elsewhere", &["elsewhere.test"], Key::Ecdsa);
    let good = TlsBackend::start("good", &right).await;
    let misnamed = TlsBackend::start("misnamed", &wrong).await;
    let ca = pki.ca_pem.display().to_string();
    let check = "interval = \"200ms\"\ntimeout = \"150ms\"\nfall = 2\nexpect_body = \"good\"\n";
    let config = format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"good\"\n\
         [upstreams.good]\nservers = [{{ address = \"{good}\" }}]\ntls = {{ ca = \"{ca}\" }}\n\
         [upstreams.good.health_check]\n{check}\
         [upstreams.misnamed]\nservers = [{{ address = \"{misnamed}\" }}]\ntls = {{ ca = \"{ca}\" }}\n\
         [upstreams.misnamed.health_check]\n{check}",
        good = good.addr,
        misnamed = misnamed.addr,
    );
    let proxy = Proxy::start(&config, &[]).await;
    let runtime = proxy.server.runtime();
    let upstream = |name: &str| {
        runtime
            .upstreams
            .iter()
            .find(|u| u.name == name)
            .unwrap()
            .servers[0]
            .clone()
    };
    let (trusted, refused) = (upstream("good"), upstream("misnamed"));
    wait_for(Duration::from_secs(3), "the misnamed server down", || {
        refused.health_state() == "down"
    })
    .await;
    let failed = refused.health_report().last_check.unwrap();
    assert!(
        failed.detail.starts_with("TLS handshake failed"),
        "{failed:?}"
    );
    let passed = trusted.health_report().last_check.unwrap();
    assert!(passed.passed, "{passed:?}");
    assert_eq!(passed.detail, "status 200");
    assert_eq!(trusted.health_state(), "up");
}

#[tokio::test]
async fn checks_follow_a_reload_that_adds_and_removes_servers() {
    let _timed = TIMED.lock().await;
    let (a, b) = (Switchable::new("a").await, Switchable::new("b").await);
    let text = |servers: &[&Backend]| {
        support::fill(
            &config(
                servers.len(),
                "[upstreams.app.health_check]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\n",
            ),
            servers,
        )
    };
    let proxy = Proxy::start(&text(&[&a.backend]), &[]).await;
    wait_for(Duration::from_secs(3), "a checked", || a.checks_seen() >= 2).await;
    assert_eq!(b.checks_seen(), 0);

    let both = fulcrum::config::parse("test.toml", &text(&[&a.backend, &b.backend])).unwrap();
    proxy.server.reload(both).unwrap();
    wait_for(Duration::from_secs(3), "b checked once added", || {
        b.checks_seen() >= 2
    })
    .await;

    let only_b = fulcrum::config::parse("test.toml", &text(&[&b.backend])).unwrap();
    proxy.server.reload(only_b).unwrap();
    // The follower looks every 250 ms; a check already under way may still land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a_checks = a.checks_seen();
    let b_checks = b.checks_seen();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        a.checks_seen(),
        a_checks,
        "a removed server is still checked"
    );
    assert!(b.checks_seen() >= b_checks + 3, "b is no longer checked");
}
