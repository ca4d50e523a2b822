//! Balancing algorithms through the real proxy, with clients on several loopback addresses.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use support::{Backend, Proxy, get_text};

/// Held by the tests that measure how traffic divides over time, so that they do not run
/// at once and skew each other's timings on a two-core machine.
static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(balance: &str) -> String {
    format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
         [upstreams.app]\nbalance = \"{balance}\"\nservers = [{{ address = \"{{0}}\" }}, {{ address = \"{{1}}\" }}, {{ address = \"{{2}}\" }}]\n"
    )
}

/// A GET of `url` carrying `cookie` (`name=value`).
async fn get_with_cookie(client: &reqwest::Client, url: &str, cookie: &str) -> reqwest::Response {
    client
        .get(url)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
}

/// The `name=value` the response sets, if it sets a cookie.
fn set_cookie(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
}

/// Three backends answering `a`, `b` and `c`.
async fn abc() -> [Backend; 3] {
    [
        Backend::named("a").await,
        Backend::named("b").await,
        Backend::named("c").await,
    ]
}

/// Asserts that every key got one answer only, and that the keys between them reached all
/// three servers.
fn assert_each_key_stays_and_all_servers_serve<K: std::fmt::Debug>(answers: Vec<(K, Vec<String>)>) {
    let mut used = HashSet::new();
    for (key, got) in &answers {
        assert!(
            got.iter().all(|a| *a == got[0]),
            "{key:?} moved between servers: {got:?}"
        );
        used.insert(got[0].clone());
    }
    assert_eq!(
        used.len(),
        3,
        "{} keys all landed on {used:?}",
        answers.len()
    );
}

fn client_from(ip: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(ip)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test]
async fn ip_hash_keeps_each_client_on_one_server_and_spreads_clients() {
    let [a, b, c] = abc().await;
    let proxy = Proxy::start(&config("ip_hash"), &[&a, &b, &c]).await;
    let mut answers = Vec::new();
    for last in 2..32u8 {
        let ip = IpAddr::from([127, 0, 0, last]);
        let client = client_from(ip);
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(get_text(&client, &proxy.url("/")).await);
        }
        answers.push((ip, got));
    }
    assert_each_key_stays_and_all_servers_serve(answers);
}

#[tokio::test]
async fn random_reaches_every_server() {
    let [a, b, c] = abc().await;
    let proxy = Proxy::start(&config("random"), &[&a, &b, &c]).await;
    let client = support::client();
    let mut seen = HashSet::new();
    for _ in 0..60 {
        seen.insert(get_text(&client, &proxy.url("/")).await);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

/// Four clients each sending requests back to back for `for_how_long`; returns how many
/// answers each backend name gave.
async fn load(proxy: &Proxy, for_how_long: Duration) -> HashMap<String, usize> {
    let deadline = tokio::time::Instant::now() + for_how_long;
    let loops = (0..4).map(|_| {
        let (client, url) = (support::client(), proxy.url("/"));
        async move {
            let mut answers = Vec::new();
            while tokio::time::Instant::now() < deadline {
                answers.push(get_text(&client, &url).await);
            }
            answers
        }
    });
    let mut counts = HashMap::new();
    for answers in futures_util::future::join_all(loops).await {
        for answer in answers {
            *counts.entry(answer).or_insert(0) += 1;
        }
    }
    counts
}

async fn slow_and_fast() -> (Backend, Backend, Backend) {
    let slow = Backend::with(|_req| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        http::Response::new(support::full("slow"))
    })
    .await;
    (
        slow,
        Backend::named("fast1").await,
        Backend::named("fast2").await,
    )
}

#[tokio::test]
async fn load_aware_algorithms_steer_away_from_a_slow_server() {
    let _timed = TIMED.lock().await;
    for balance in ["least_connections", "two_choices"] {
        let (slow, fast1, fast2) = slow_and_fast().await;
        let proxy = Proxy::start(&config(balance), &[&slow, &fast1, &fast2]).await;
        let counts = load(&proxy, Duration::from_millis(1500)).await;
        let total: usize = counts.values().sum();
        let slow_share = *counts.get("slow").unwrap_or(&0) as f64 / total as f64;
        assert!(
            slow_share < 0.10,
            "{balance}: the slow server took {slow_share:.2} of {total}: {counts:?}"
        );
    }
    // Round robin, by contrast, gives it its full third of the requests.
    let (slow, fast1, fast2) = slow_and_fast().await;
    let proxy = Proxy::start(&config("round_robin"), &[&slow, &fast1, &fast2]).await;
    let counts = load(&proxy, Duration::from_millis(1500)).await;
    let total: usize = counts.values().sum();
    assert!(counts["slow"] * 3 + 3 >= total, "round robin: {counts:?}");
}

#[tokio::test]
async fn consistent_hash_on_a_header_keeps_each_user_on_one_server() {
    let [a, b, c] = abc().await;
    let proxy = Proxy::start(
        &config("consistent_hash")
            .replace("servers = ", "hash_key = \"header:x-user\"\nservers = "),
        &[&a, &b, &c],
    )
    .await;
    let client = support::client();
    let mut answers = Vec::new();
    for user in 0..40 {
        let mut got = Vec::new();
        for _ in 0..3 {
            let resp = client
                .get(proxy.url("/"))
                .header("x-user", format!("user-{user}"))
                .send()
                .await
                .unwrap();
            got.push(resp.text().await.unwrap());
        }
        answers.push((user, got));
    }
    assert_each_key_stays_and_all_servers_serve(answers);
}

#[tokio::test]
async fn backups_serve_only_when_no_primary_can_be_reached_and_drained_servers_get_nothing() {
    let (primary, backup, drained) = (
        Backend::named("primary").await,
        Backend::named("backup").await,
        Backend::named("drained").await,
    );
    let upstream = |primary_addr: String| {
        format!(
            "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n[upstreams.app]\nservers = [\
             {{ address = \"{primary_addr}\" }}, {{ address = \"{{1}}\", backup = true }}, {{ address = \"{{2}}\", drain = true }}]\n"
        )
    };
    let client = support::client();

    let proxy = Proxy::start(&upstream("{0}".into()), &[&primary, &backup, &drained]).await;
    for _ in 0..10 {
        assert_eq!(get_text(&client, &proxy.url("/")).await, "primary");
    }

    // The primary gone: every request still succeeds, on the backup.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(&upstream(dead.to_string()), &[&primary, &backup, &drained]).await;
    for _ in 0..10 {
        assert_eq!(get_text(&client, &proxy.url("/")).await, "backup");
    }
    assert_eq!(drained.seen.count(), 0);
}

#[tokio::test]
async fn a_sticky_cookie_keeps_a_client_on_its_server_and_moves_it_when_that_server_goes() {
    let backends = [
        Backend::named("a").await,
        Backend::named("b").await,
        Backend::named("c").await,
    ];
    let config = config("round_robin").replace(
        "servers = ",
        "sticky_cookie = \"fulcrum_server\"\npool_max_idle_per_server = 0\nservers = ",
    );
    let proxy = Proxy::start(&config, &[&backends[0], &backends[1], &backends[2]]).await;
    let client = support::client();

    let first = client.get(proxy.url("/")).send().await.unwrap();
    let cookie = set_cookie(&first).expect("the first response pins the client");
    assert!(cookie.starts_with("fulcrum_server="), "{cookie}");
    let home = first.text().await.unwrap();
    for backend in &backends {
        assert!(
            !cookie.contains(&backend.addr.port().to_string()),
            "the cookie names an address: {cookie}"
        );
    }
    for _ in 0..100 {
        let resp = get_with_cookie(&client, &proxy.url("/"), &cookie).await;
        assert_eq!(set_cookie(&resp), None, "a pinned client was pinned again");
        assert_eq!(resp.text().await.unwrap(), home);
    }

    // Its server goes away: the client is served elsewhere, never an error, and re-pinned.
    let gone = ["a", "b", "c"].iter().position(|n| *n == home).unwrap();
    backends[gone].stop();
    let resp = get_with_cookie(&client, &proxy.url("/"), &cookie).await;
    assert_eq!(resp.status(), 200);
    let new_cookie = set_cookie(&resp).expect("a moved client is pinned again");
    assert_ne!(new_cookie, cookie);
    let new_home = resp.text().await.unwrap();
    assert_ne!(new_home, home);
    for _ in 0..10 {
        let resp = get_with_cookie(&client, &proxy.url("/"), &new_cookie).await;
        assert_eq!(resp.text().await.unwrap(), new_home);
    }
}

#[tokio::test]
async fn least_time_starves_a_slow_server_and_gives_it_back_its_share_when_it_recovers() {
    let _timed = TIMED.lock().await;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let slow_now = Arc::new(AtomicBool::new(true));
    let flag = slow_now.clone();
    let varying = Backend::with(move |_req| {
        let slow = flag.load(Ordering::Relaxed);
        async move {
            if slow {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            http::Response::new(support::full("varying"))
        }
    })
    .await;
    let (fast1, fast2) = (Backend::named("fast1").await, Backend::named("fast2").await);
    let config =
        config("least_time").replace("servers = ", "latency_decay = \"300ms\"\nservers = ");
    let proxy = Proxy::start(&config, &[&varying, &fast1, &fast2]).await;

    let counts = load(&proxy, Duration::from_millis(1500)).await;
    let total: usize = counts.values().sum();
    let share = *counts.get("varying").unwrap_or(&0) as f64 / total as f64;
    assert!(
        share < 0.10,
        "while slow it took {share:.3} of {total}: {counts:?}"
    );

    slow_now.store(false, Ordering::Relaxed);
    // Its old estimate fades, it is tried again, and being fast it is used like the others.
    // How soon depends on this machine's timing, so it is given rounds rather than one
    // fixed moment: it must win back a fair share (a third would be even) within them.
    let mut rounds = Vec::new();
    for _ in 0..10 {
        let counts = load(&proxy, Duration::from_millis(500)).await;
        let total: usize = counts.values().sum();
        let share = *counts.get("varying").unwrap_or(&0) as f64 / total as f64;
        rounds.push(format!("{share:.3} of {total}"));
        if share > 0.20 {
            return;
        }
    }
    panic!("after recovering it never took over 0.20 of a round: {rounds:?}");
}

#[tokio::test]
async fn a_retry_never_goes_back_to_a_server_that_just_failed() {
    // A dead server has nothing in flight and no slow responses on record, so load-aware
    // algorithms like it best; the request must still reach the live one.
    let alive = Backend::named("alive").await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    for balance in [
        "least_connections",
        "two_choices",
        "least_time",
        "ip_hash",
        "consistent_hash",
    ] {
        let config = format!(
            "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
             [upstreams.app]\nbalance = \"{balance}\"\nservers = [{{ address = \"{dead}\" }}, {{ address = \"{{0}}\" }}]\n"
        );
        let proxy = Proxy::start(&config, &[&alive]).await;
        let client = support::client();
        for _ in 0..10 {
            let resp = client.get(proxy.url("/")).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{balance}");
        }
    }
}

#[tokio::test]
async fn least_connections_over_many_servers_steers_away_from_slow_ones() {
    let _timed = TIMED.lock().await;
    // least_connections keeps its servers in a tree ordered by load (at every size): 3 slow
    // servers among 20 must still get little traffic.
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(
            Backend::with(|_req| async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                http::Response::new(support::full("slow"))
            })
            .await,
        );
    }
    for _ in 0..17 {
        backends.push(Backend::named("fast").await);
    }
    let refs: Vec<&Backend> = backends.iter().collect();
    let proxy = Proxy::simple(&refs, "balance = \"least_connections\"").await;
    let counts = load(&proxy, Duration::from_millis(1500)).await;
    let total: usize = counts.values().sum();
    let slow_share = *counts.get("slow").unwrap_or(&0) as f64 / total as f64;
    // Round robin would give them 15%.
    assert!(
        slow_share < 0.05,
        "the slow servers took {slow_share:.3} of {total}: {counts:?}"
    );
}

/// How many of the requests sent one after another during each of `windows` went to
/// `server`, as a share.
async fn shares_over_time(proxy: &Proxy, server: &str, windows: &[(u64, u64)]) -> Vec<f64> {
    let client = support::client();
    let started = tokio::time::Instant::now();
    let end = Duration::from_millis(windows.iter().map(|w| w.1).max().unwrap());
    let mut answers = Vec::new();
    while started.elapsed() < end {
        let at = started.elapsed().as_millis() as u64;
        answers.push((at, get_text(&client, &proxy.url("/")).await));
    }
    let shares: Vec<f64> = windows
        .iter()
        .map(|&(from, to)| {
            let inside: Vec<_> = answers
                .iter()
                .filter(|(at, _)| (from..to).contains(at))
                .collect();
            assert!(inside.len() > 20, "too few requests in {from}..{to} ms");
            inside.iter().filter(|(_, a)| a == server).count() as f64 / inside.len() as f64
        })
        .collect();
    eprintln!("share of {server}: {shares:?} ({} requests)", answers.len());
    shares
}

#[tokio::test]
async fn slow_start_ramps_up_a_server_that_a_reload_adds() {
    let _timed = TIMED.lock().await;
    let (old, new) = (Backend::named("old").await, Backend::named("new").await);
    let config = |servers: &str| {
        format!(
            "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
             [upstreams.app]\nslow_start = \"2s\"\nservers = [{servers}]\n"
        )
    };
    let proxy = Proxy::start(&config("{ address = \"{0}\" }"), &[&old]).await;
    let bigger = support::fill(
        &config("{ address = \"{0}\" }, { address = \"{1}\" }"),
        &[&old, &new],
    );
    let bigger = fulcrum::config::parse("test.toml", &bigger).unwrap();
    proxy.server.reload(bigger).unwrap();
    // Round robin between two: "new" should climb from a sliver towards half.
    let shares = shares_over_time(&proxy, "new", &[(0, 400), (900, 1100), (2300, 2800)]).await;
    assert!(shares[0] < 0.15, "first 400 ms: {shares:?}");
    assert!((0.1..0.45).contains(&shares[1]), "around 1 s: {shares:?}");
    assert!(shares[2] > 0.40, "after 2 s: {shares:?}");
}

#[tokio::test]
async fn a_server_that_cannot_be_reached_is_left_alone_for_fail_timeout_then_ramps_up() {
    let _timed = TIMED.lock().await;
    let steady = Backend::named("steady").await;
    let flaky = Backend::named("flaky").await;
    let proxy = Proxy::simple(
        &[&steady, &flaky],
        "fail_timeout = \"1s\"\nslow_start = \"1s\"",
    )
    .await;
    let client = support::client();
    flaky.stop();
    // Both requests are served: the one that found "flaky" gone went on to "steady".
    for _ in 0..2 {
        assert_eq!(get_text(&client, &proxy.url("/")).await, "steady");
    }
    // Back at once, but left alone until fail_timeout is over; then it ramps up.
    let flaky = Backend::named_at("flaky", flaky.addr).await;
    let shares = shares_over_time(&proxy, "flaky", &[(0, 600), (2300, 2800)]).await;
    assert_eq!(shares[0], 0.0, "{shares:?}");
    assert!(shares[1] > 0.35, "{shares:?}");
    assert!(flaky.seen.count() > 0);
}

#[tokio::test]
async fn draining_keeps_sticky_sessions_and_removing_moves_them() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let config = |servers: &str| {
        support::fill(
            &format!(
                "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
                 [upstreams.app]\nsticky_cookie = \"s\"\nservers = [{servers}]\n"
            ),
            &[&a, &b],
        )
    };
    let proxy = Proxy::start(&config("{ address = \"{0}\" }, { address = \"{1}\" }"), &[]).await;
    let client = support::client();
    // A client pinned to "b".
    let cookie = loop {
        let resp = client.get(proxy.url("/")).send().await.unwrap();
        let cookie = set_cookie(&resp).expect("a new client is pinned");
        if resp.text().await.unwrap() == "b" {
            break cookie;
        }
    };
    let reload = |servers: &str| {
        let config = fulcrum::config::parse("test.toml", &config(servers)).unwrap();
        proxy.server.reload(config).unwrap()
    };
    let pinned = |cookie: String| {
        let (client, url) = (client.clone(), proxy.url("/"));
        async move {
            let mut seen = HashSet::new();
            for _ in 0..20 {
                let resp = get_with_cookie(&client, &url, &cookie).await;
                assert_eq!(resp.status(), 200);
                seen.insert(resp.text().await.unwrap());
            }
            seen
        }
    };

    // "b" drained: its client's session goes on there; new clients go to "a" only.
    reload("{ address = \"{0}\" }, { address = \"{1}\", drain = true }");
    assert_eq!(
        pinned(cookie.clone()).await,
        HashSet::from(["b".to_string()])
    );
    for _ in 0..10 {
        assert_eq!(get_text(&client, &proxy.url("/")).await, "a");
    }

    // "b" removed: the client moves to "a" without an error.
    reload("{ address = \"{0}\" }");
    assert_eq!(pinned(cookie).await, HashSet::from(["a".to_string()]));
}
