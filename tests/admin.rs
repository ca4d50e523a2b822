//! The admin listener end to end: a real Fulcrum with real backends, its JSON status and
//! config, run-time server changes seen in real traffic, the token that guards them,
//! Prometheus metrics that count exactly what was sent, and `fulcrum status`.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use support::{Backend, Process, Proxy, TempDir, binary, client, get_text, simple_config};

const TOKEN: &str = "test-admin-token-0123456789";

/// `[admin]` on a free port, with a token file in `dir` when `token` is set.
fn admin_section(dir: &TempDir, token: bool) -> String {
    let mut section = "[admin]\nbind = \"127.0.0.1:0\"\n".to_string();
    if token {
        let path = dir.0.join("admin-token");
        std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
        section.push_str(&format!("token_file = \"{}\"\n", path.display()));
    }
    section
}

struct Admin {
    base: String,
    http: reqwest::Client,
}

impl Admin {
    fn of(proxy: &Proxy) -> Admin {
        Admin::at(
            &proxy
                .server
                .admin_addr()
                .expect("the admin listener is bound")
                .to_string(),
        )
    }

    fn at(addr: &str) -> Admin {
        Admin {
            base: format!("http://{addr}"),
            http: client(),
        }
    }

    /// The status once upstream `app`'s servers have counted `requests` in all (a request
    /// is counted just after its client has the response), or after 5 s.
    async fn status_after(&self, requests: u64) -> Value {
        let mut status = self.status().await;
        for _ in 0..100 {
            let counted: u64 = status["upstreams"][0]["servers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["requests"].as_u64().unwrap())
                .sum();
            if counted >= requests {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            status = self.status().await;
        }
        status
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    }

    async fn status(&self) -> Value {
        let (status, body) = self.get("/api/status").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// A state-changing call: `POST …/{action}`, or `PUT …/weight` with `body`.
    async fn change(
        &self,
        server: SocketAddr,
        action: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let url = format!("{}/api/upstreams/app/servers/{server}/{action}", self.base);
        let mut request = match body {
            Some(body) => self.http.put(url).body(body.to_string()),
            None => self.http.post(url),
        };
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        (status, json, headers)
    }
}

/// The status's view of server `addr` of upstream `app`.
fn server(status: &Value, addr: SocketAddr) -> &Value {
    status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "app")
        .and_then(|u| {
            u["servers"]
                .as_array()?
                .iter()
                .find(|s| s["address"] == addr.to_string())
        })
        .unwrap_or_else(|| panic!("no server {addr} in {status:#}"))
}

/// Sends `n` requests and returns how many each backend answered, by its name.
async fn spread(proxy: &Proxy, n: usize) -> HashMap<String, usize> {
    let client = client();
    let mut by_backend = HashMap::new();
    for _ in 0..n {
        *by_backend
            .entry(get_text(&client, &proxy.url("/")).await)
            .or_insert(0) += 1;
    }
    by_backend
}

#[tokio::test]
async fn the_status_lists_listeners_routes_upstreams_and_servers_and_the_config_hides_secrets() {
    let dir = TempDir::new();
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    // An upstream no route sends to, with every upstream key the config view shows, and
    // [dns] for its named server, whose name server is not there.
    let checked = "[upstreams.checked]\n\
         servers = [{ address = \"127.0.0.1:1\" }, { address = \"db.internal:5432\", weight = 3 }]\n\
         retries = 1\ntry_timeout = \"1500ms\"\nmax_active_requests = 50\npanic_threshold = 30\n\
         [upstreams.checked.health_check]\npath = \"/healthz\"\ninterval = \"10s\"\n\
         expect_status = [204, \"300-302\"]\n\
         [upstreams.checked.outlier_detection]\nconsecutive_5xx = 3\n\
         [dns]\nnameservers = [\"127.0.0.1:1\"]\nmin_ttl = \"2s\"\ntimeout = \"1s\"\n";
    let extra = format!(
        "sticky_cookie = \"pin\"\n{}{checked}",
        admin_section(&dir, true)
    );
    let config = format!(
        "sticky_secret = \"0123456789abcdef0123456789abcdef-secret\"\n{}",
        simple_config(2, &extra)
    );
    let proxy = Proxy::start(&config, &[&a, &b]).await;
    let admin = Admin::of(&proxy);
    spread(&proxy, 4).await;

    let status = admin.status_after(4).await;
    let listener = &status["listeners"][0];
    assert_eq!(listener["name"], "web");
    assert_eq!(listener["bind"], proxy.addr.to_string());
    assert_eq!(listener["routes"][0]["path_prefix"], "/");
    assert_eq!(listener["routes"][0]["upstream"], "app");
    assert_eq!(status["upstreams"][0]["balance"], "round_robin");
    for backend in [&a, &b] {
        let s = server(&status, backend.addr);
        assert_eq!(s["weight"], 1);
        assert_eq!(s["health"]["state"], "up");
        assert_eq!(s["in_flight"], 0);
        assert_eq!(s["requests"], 2, "{s:#}");
        assert_eq!(s["errors"], 0);
        assert!(s["latency_ms"].as_f64().unwrap() > 0.0, "{s:#}");
    }
    assert_eq!(status["overrides"], serde_json::json!([]));
    assert!(status["note"].as_str().unwrap().contains("next reload"));

    let (code, config) = admin.get("/api/config").await;
    assert_eq!(code, StatusCode::OK);
    let json: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        json["upstreams"][0]["servers"][1]["address"],
        b.addr.to_string()
    );
    assert_eq!(json["timeouts"]["client_header"], "30s");
    assert_eq!(json["admin"]["changes_allowed"], true);
    let app = &json["upstreams"][0];
    assert_eq!(app["health_check"], Value::Null);
    assert_eq!(app["named"], serde_json::json!([]));
    assert_eq!(app["resilience"]["retries"], 2, "the default: {app:#}");
    assert_eq!(app["resilience"]["max_active_requests"], Value::Null);
    assert_eq!(app["outlier_detection"]["base_ejection_time"], "30s");
    let checked = &json["upstreams"][1];
    assert_eq!(checked["name"], "checked");
    assert_eq!(checked["named"][0]["address"], "db.internal:5432");
    assert_eq!(checked["named"][0]["weight"], 3);
    let check = &checked["health_check"];
    assert_eq!(check["type"], "http");
    assert_eq!(check["path"], "/healthz");
    assert_eq!(check["interval"], "10s");
    assert_eq!(
        check["expect_status"],
        serde_json::json!(["204", "300-302"])
    );
    assert_eq!(checked["outlier_detection"]["consecutive_5xx"], 3);
    assert_eq!(checked["outlier_detection"]["enabled"], true);
    assert_eq!(checked["panic_threshold"], 30);
    let resilience = &checked["resilience"];
    assert_eq!(resilience["retries"], 1);
    assert_eq!(resilience["try_timeout"], "1s 500ms");
    assert_eq!(resilience["max_active_requests"], 50);
    assert_eq!(
        json["dns"]["nameservers"],
        serde_json::json!(["127.0.0.1:1"])
    );
    assert_eq!(json["dns"]["min_ttl"], "2s");
    assert_eq!(json["dns"]["timeout"], "1s");
    assert!(
        !config.contains("-secret"),
        "the sticky secret shows: {config}"
    );
    assert!(!config.contains(TOKEN), "the admin token shows: {config}");

    let (code, body) = admin.get("/api/nothing").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(body.contains("try /api/status"), "{body}");
}

#[tokio::test]
async fn a_server_whose_backend_is_gone_shows_unreachable_once_traffic_reaches_it() {
    let dir = TempDir::new();
    let a = Backend::named("a").await;
    let gone = Backend::named("gone").await;
    gone.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let proxy = Proxy::simple(&[&a, &gone], &admin_section(&dir, false)).await;
    let admin = Admin::of(&proxy);
    assert_eq!(
        server(&admin.status().await, gone.addr)["health"]["state"],
        "up"
    );
    let answered = spread(&proxy, 6).await;
    assert_eq!(answered.get("a"), Some(&6), "{answered:?}");
    let status = admin.status().await;
    assert_eq!(server(&status, gone.addr)["health"]["state"], "unreachable");
    assert_eq!(server(&status, a.addr)["health"]["state"], "up");
    // The refused connection is the server's failure, though another server answered.
    let refused = server(&status, gone.addr)["failed_tries"].as_u64().unwrap();
    assert!(refused >= 1, "{status:#}");
    assert_eq!(server(&status, a.addr)["failed_tries"], 0);
    let metrics = scrape(&admin).await;
    let (gone_addr, a_addr) = (gone.addr.to_string(), a.addr.to_string());
    let gone_labels = [("upstream", "app"), ("server", gone_addr.as_str())];
    let a_labels = [("upstream", "app"), ("server", a_addr.as_str())];
    assert_eq!(sum(&metrics, "fulcrum_server_up", &gone_labels), 0.0);
    assert_eq!(sum(&metrics, "fulcrum_server_up", &a_labels), 1.0);
    let unreachable = [gone_labels[0], gone_labels[1], ("state", "unreachable")];
    assert_eq!(sum(&metrics, "fulcrum_server_state", &unreachable), 1.0);
    assert_eq!(
        sum(&metrics, "fulcrum_server_failed_tries_total", &gone_labels),
        refused as f64
    );
}

/// A backend that accepts connections and closes them without a word, counting them.
async fn hang_up_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn tries_a_server_fails_are_counted_against_it_though_another_server_answers() {
    let dir = TempDir::new();
    let good = Backend::named("good").await;
    let (bad, accepted) = hang_up_backend().await;
    // No outlier detection, so that the bad server keeps getting its turn.
    let extra = format!(
        "[upstreams.app.outlier_detection]
enabled = false
{}",
        admin_section(&dir, false)
    );
    let config = simple_config(2, &extra).replace("{1}", &bad.to_string());
    let proxy = Proxy::start(&config, &[&good]).await;
    let admin = Admin::of(&proxy);

    let sent = 10;
    let answered = spread(&proxy, sent).await;
    assert_eq!(answered.get("good"), Some(&sent), "{answered:?}");
    let status = admin.status_after(sent as u64).await;
    let tries = accepted.load(Ordering::SeqCst) as u64;
    assert!(
        tries >= (sent / 2) as u64,
        "round robin sends it every other request"
    );
    let failing = server(&status, bad);
    assert_eq!(failing["failed_tries"], tries, "{failing:#}");
    assert_eq!(failing["requests"], 0, "{failing:#}");
    assert_eq!(failing["recent"]["tries"], tries, "{failing:#}");
    assert_eq!(failing["recent"]["error_rate"], 1.0, "{failing:#}");
    let answering = server(&status, good.addr);
    assert_eq!(answering["failed_tries"], 0);
    assert_eq!(answering["requests"], sent);
    assert_eq!(answering["recent"]["error_rate"], 0.0);

    let metrics = scrape(&admin).await;
    let bad_addr = bad.to_string();
    let labels = [("upstream", "app"), ("server", bad_addr.as_str())];
    assert_eq!(
        sum(&metrics, "fulcrum_server_failed_tries_total", &labels),
        tries as f64
    );
    let good_addr = good.addr.to_string();
    let labels = [("upstream", "app"), ("server", good_addr.as_str())];
    assert_eq!(
        sum(&metrics, "fulcrum_server_failed_tries_total", &labels),
        0.0
    );

    // `fulcrum status` shows the failing server's errors.
    let table = fulcrum::admin::cli::table(&status);
    let line = table
        .lines()
        .find(|l| l.contains(&bad_addr))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains("100.0%"), "{table}");
}

#[tokio::test]
async fn disable_enable_weight_and_drain_take_effect_on_real_traffic_until_a_reload() {
    let dir = TempDir::new();
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let config = simple_config(2, &admin_section(&dir, true));
    let proxy = Proxy::start(&config, &[&a, &b]).await;
    let admin = Admin::of(&proxy);

    let (code, changed, _) = admin.change(b.addr, "disable", None, Some(TOKEN)).await;
    assert_eq!(code, StatusCode::OK, "{changed:#}");
    assert_eq!(changed["until"], "next reload");
    assert_eq!(changed["server"]["disabled"], true);
    let before = b.seen.count();
    let answered = spread(&proxy, 20).await;
    assert_eq!(answered.get("a"), Some(&20), "{answered:?}");
    assert_eq!(b.seen.count(), before, "a disabled server got requests");
    let status = admin.status().await;
    assert_eq!(server(&status, b.addr)["disabled"], true);
    assert_eq!(status["overrides"][0]["server"], b.addr.to_string());
    assert_eq!(status["overrides"][0]["disabled"], true);

    let (code, changed, _) = admin.change(b.addr, "enable", None, Some(TOKEN)).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(changed["server"]["disabled"], false);
    let answered = spread(&proxy, 20).await;
    assert_eq!(answered.get("b"), Some(&10), "{answered:?}");

    let (code, changed, _) = admin
        .change(b.addr, "weight", Some(r#"{"weight": 3}"#), Some(TOKEN))
        .await;
    assert_eq!(code, StatusCode::OK, "{changed:#}");
    assert_eq!(changed["server"]["weight"], 3);
    let answered = spread(&proxy, 200).await;
    let to_a = answered.get("a").copied().unwrap_or(0);
    assert!((40..=60).contains(&to_a), "1:3 expected: {answered:?}");
    assert_eq!(server(&admin.status().await, b.addr)["weight"], 3);

    let (code, changed, _) = admin.change(a.addr, "drain", None, Some(TOKEN)).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(changed["server"]["drain"], true);
    let answered = spread(&proxy, 10).await;
    assert_eq!(answered.get("b"), Some(&10), "{answered:?}");

    // A reload loads the file again: every change made through the API is gone.
    let file = fulcrum::config::parse("test.toml", &support::fill(&config, &[&a, &b])).unwrap();
    proxy.server.reload(file).unwrap();
    let status = admin.status().await;
    assert_eq!(status["overrides"], serde_json::json!([]));
    assert_eq!(server(&status, a.addr)["drain"], false);
    assert_eq!(server(&status, b.addr)["weight"], 1);
    let answered = spread(&proxy, 10).await;
    assert_eq!(answered.get("a"), Some(&5), "{answered:?}");

    // The admin listener is bound once: moving it needs a restart.
    let moved = config.replace(
        "bind = \"127.0.0.1:0\"\ntoken",
        "bind = \"127.0.0.1:1\"\ntoken",
    );
    assert_ne!(moved, config);
    let file = fulcrum::config::parse("test.toml", &support::fill(&moved, &[&a, &b])).unwrap();
    let refused = proxy.server.reload(file).unwrap_err();
    assert!(
        refused.contains("admin bind changed from 127.0.0.1:0 to 127.0.0.1:1: restart Fulcrum"),
        "{refused}"
    );
}

#[tokio::test]
async fn changes_without_the_right_token_are_refused_and_change_nothing() {
    let dir = TempDir::new();
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let proxy = Proxy::simple(&[&a, &b], &admin_section(&dir, true)).await;
    let admin = Admin::of(&proxy);

    for token in [None, Some("wrong-token-0123456789"), Some("")] {
        let (code, body, headers) = admin.change(b.addr, "disable", None, token).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{token:?}: {body:#}");
        let challenge = headers.get("www-authenticate").unwrap().to_str().unwrap();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        assert!(
            body["error"].as_str().unwrap().contains("token"),
            "{body:#}"
        );
    }
    let (code, _, _) = admin
        .change(b.addr, "weight", Some(r#"{"weight": 5}"#), Some("wrong"))
        .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let status = admin.status().await;
    assert_eq!(status["overrides"], serde_json::json!([]));
    assert_eq!(server(&status, b.addr)["disabled"], false);
    assert_eq!(server(&status, b.addr)["weight"], 1);
    let answered = spread(&proxy, 10).await;
    assert_eq!(answered.get("b"), Some(&5), "{answered:?}");

    // Bad requests with the right token: named, and nothing changes either.
    let (code, body, _) = admin
        .change(b.addr, "weight", Some(r#"{"weight": 0}"#), Some(TOKEN))
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("allowed 1 to 1000"),
        "{body:#}"
    );
    let (code, body, _) = admin
        .change(b.addr, "weight", Some("weight=2"), Some(TOKEN))
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body:#}");
    let huge = format!(r#"{{"weight": 2, "pad": "{}"}}"#, "x".repeat(10_000));
    let (code, _, _) = admin
        .change(b.addr, "weight", Some(&huge), Some(TOKEN))
        .await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    let unknown: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let (code, body, _) = admin.change(unknown, "drain", None, Some(TOKEN)).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains(&b.addr.to_string()),
        "{body:#}"
    );
    let response = admin
        .http
        .post(format!(
            "{}/api/upstreams/nope/servers/{}/drain",
            admin.base, b.addr
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("no upstream `nope`")
    );
    let response = admin
        .http
        .get(format!(
            "{}/api/upstreams/app/servers/{}/drain",
            admin.base, b.addr
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()["allow"], "POST");
    assert_eq!(admin.status().await["overrides"], serde_json::json!([]));
}

#[tokio::test]
async fn without_a_token_file_changes_are_forbidden_and_say_how_to_allow_them() {
    let dir = TempDir::new();
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let proxy = Proxy::simple(&[&a, &b], &admin_section(&dir, false)).await;
    let admin = Admin::of(&proxy);
    let (code, body, _) = admin.change(b.addr, "disable", None, Some(TOKEN)).await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert!(
        body["error"].as_str().unwrap().contains("token_file"),
        "{body:#}"
    );
    assert_eq!(server(&admin.status().await, b.addr)["disabled"], false);
}

/// Every sample of `name` whose labels include `labels`, added up.
fn sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

async fn scrape(admin: &Admin) -> prometheus_parse::Scrape {
    let response = admin
        .http
        .get(format!("{}/metrics", admin.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_exactly_the_requests_sent() {
    let dir = TempDir::new();
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    // Two workers, as `fulcrum run` serves: each counts in its own shard.
    let config = format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\npath_prefix = \"/app\"\nupstream = \"app\"\n\
         [upstreams.app]\nservers = [{{ address = \"{{0}}\" }}, {{ address = \"{{1}}\" }}]\n{}",
        admin_section(&dir, false)
    );
    let proxy = Proxy::start_workers(&config, &[&a, &b], 2);
    let admin = Admin::of(&proxy);
    let app = [("listener", "web"), ("upstream", "app")];
    let own = [("listener", "web"), ("server", "")];

    let before = scrape(&admin).await;
    assert_eq!(sum(&before, "fulcrum_requests_total", &app), 0.0);
    let (sent, unrouted) = (25, 3);
    // A new connection for each request: the kernel spreads them over both workers.
    for i in 0..sent + unrouted {
        let path = if i < sent { "/app/x" } else { "/elsewhere" };
        let response = client()
            .get(proxy.url(path))
            .header("connection", "close")
            .send()
            .await
            .unwrap();
        response.text().await.unwrap();
    }
    // A request is counted when its record is dropped, just after the client has its
    // response: the last ones may take a moment.
    let counted = |s: &prometheus_parse::Scrape| {
        sum(s, "fulcrum_requests_total", &app) + sum(s, "fulcrum_requests_total", &own)
    };
    let mut after = scrape(&admin).await;
    for _ in 0..100 {
        if counted(&after) >= (sent + unrouted) as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = scrape(&admin).await;
    }
    assert_eq!(sum(&after, "fulcrum_requests_total", &app), sent as f64);
    let to_b = [
        ("listener", "web"),
        ("server", &*b.addr.to_string()),
        ("class", "2xx"),
    ];
    assert_eq!(
        sum(&after, "fulcrum_requests_total", &to_b),
        b.seen.count() as f64
    );
    let not_found = [own[0], own[1], ("class", "4xx")];
    assert_eq!(
        sum(&after, "fulcrum_requests_total", &not_found),
        unrouted as f64
    );
    assert_eq!(
        sum(
            &after,
            "fulcrum_upstream_latency_seconds_count",
            &[("upstream", "app")]
        ),
        sent as f64
    );
    let histogram = after
        .samples
        .iter()
        .find(|s| s.metric == "fulcrum_upstream_latency_seconds")
        .expect("a latency histogram");
    assert!(matches!(
        histogram.value,
        prometheus_parse::Value::Histogram(_)
    ));
    let server_up = [("upstream", "app"), ("server", &*a.addr.to_string())];
    assert_eq!(sum(&after, "fulcrum_server_up", &server_up), 1.0);
    let state_up = [server_up[0], server_up[1], ("state", "up")];
    assert_eq!(sum(&after, "fulcrum_server_state", &state_up), 1.0);
    let opened = sum(
        &after,
        "fulcrum_upstream_connections_total",
        &[("upstream", "app")],
    );
    assert_eq!(opened, sent as f64, "each request took one connection");

    // Client connections open: the closed ones are gone once their tasks end; one that is
    // half-way through its head counts.
    let open = [("listener", "web")];
    let mut closed = false;
    for _ in 0..100 {
        if sum(&scrape(&admin).await, "fulcrum_connections_open", &open) == 0.0 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        closed,
        "connections closed by the client still count as open"
    );
    let mut waiting = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut waiting, b"GET /app/x HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut counted = 0.0;
    for _ in 0..100 {
        counted = sum(&scrape(&admin).await, "fulcrum_connections_open", &open);
        if counted == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counted, 1.0);
}

/// Every sample of the latency histogram, by its labels (`le` included for buckets) and
/// name suffix.
fn latency_series(scrape: &prometheus_parse::Scrape) -> HashMap<String, f64> {
    let mut series = HashMap::new();
    for s in &scrape.samples {
        if s.metric != "fulcrum_upstream_latency_seconds" {
            continue;
        }
        let prometheus_parse::Value::Histogram(buckets) = &s.value else {
            panic!("not a histogram: {s:?}");
        };
        let key = format!("{}/{}", s.labels["upstream"], s.labels["server"]);
        for b in buckets {
            series.insert(format!("{key} le={}", b.less_than), b.count);
        }
    }
    for name in ["count", "sum"] {
        let full = format!("fulcrum_upstream_latency_seconds_{name}");
        for s in scrape.samples.iter().filter(|s| s.metric == full) {
            let key = format!("{}/{} {name}", s.labels["upstream"], s.labels["server"]);
            series.insert(key, sum(scrape, &full, &[("server", &s.labels["server"])]));
        }
    }
    series
}

#[tokio::test]
async fn a_reload_that_removes_a_server_lowers_no_latency_series() {
    let dir = TempDir::new();
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let config = simple_config(2, &admin_section(&dir, false));
    let proxy = Proxy::start(&config, &[&a, &b]).await;
    let admin = Admin::of(&proxy);
    spread(&proxy, 10).await;
    admin.status_after(10).await;
    let before = latency_series(&scrape(&admin).await);
    let (a_key, b_key) = (format!("app/{}", a.addr), format!("app/{}", b.addr));
    assert_eq!(before[&format!("{a_key} count")], 5.0, "{before:?}");
    assert_eq!(before[&format!("{b_key} count")], 5.0, "{before:?}");
    assert_eq!(before[&format!("{a_key} le=inf")], 5.0, "{before:?}");

    let kept = simple_config(1, &admin_section(&dir, false));
    let file = fulcrum::config::parse("test.toml", &support::fill(&kept, &[&a])).unwrap();
    proxy.server.reload(file).unwrap();
    let after = latency_series(&scrape(&admin).await);
    for (key, &value) in &after {
        let was = before.get(key).copied().unwrap_or(0.0);
        assert!(value >= was, "{key} went from {was} to {value}");
    }
    assert!(after.contains_key(&format!("{a_key} count")), "{after:?}");
    assert!(
        !after.keys().any(|k| k.starts_with(&b_key)),
        "the removed server's series ends: {after:?}"
    );
}

/// Whether a status request on a new connection is answered or refused, and how long
/// that took.
async fn try_status(admin: &Admin) -> (bool, Duration) {
    let started = Instant::now();
    let answered = client()
        .get(format!("{}/api/status", admin.base))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK);
    (answered, started.elapsed())
}

#[tokio::test]
async fn idle_connections_cannot_hold_the_admin_listener_up() {
    let dir = TempDir::new();
    let a = Backend::named("a").await;
    let proxy = Proxy::simple(&[&a], &admin_section(&dir, false)).await;
    let admin = Admin::of(&proxy);
    let addr = proxy.server.admin_addr().unwrap();
    // As many connections as the admin listener serves at once (and a few more), none
    // sending anything.
    let mut idle = Vec::new();
    for _ in 0..70 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, took) = try_status(&admin).await;
    assert!(
        took < Duration::from_secs(2),
        "a status request waited {took:?} behind idle connections"
    );
    // The idle ones give their slots up within the few seconds a request head may take.
    let started = Instant::now();
    loop {
        let (answered, _) = try_status(&admin).await;
        if answered {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "still no answer after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut byte = [0u8; 1];
    for stream in &mut idle {
        let read = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::io::AsyncReadExt::read(stream, &mut byte),
        )
        .await
        .expect("an idle connection is closed");
        assert!(!matches!(read, Ok(n) if n > 0), "{read:?}");
    }

    // A connection kept alive after a request is closed once idle for a few seconds.
    let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut kept,
        b"GET /api/config HTTP/1.1\r\nhost: admin\r\n\r\n",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut response = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut kept, &mut response),
    )
    .await;
    assert!(read.is_ok(), "a kept-alive connection stayed open 10 s");
    assert!(response.starts_with(b"HTTP/1.1 200"));
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn changes_that_restate_the_file_leave_no_override_and_drained_servers_are_not_up() {
    let dir = TempDir::new();
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let config = simple_config(2, &admin_section(&dir, true)).replace(
        "{ address = \"{1}\" }",
        "{ address = \"{1}\", drain = true }",
    );
    let proxy = Proxy::start(&config, &[&a, &b]).await;
    let admin = Admin::of(&proxy);
    let overrides = || async { admin.status().await["overrides"].clone() };

    // Enabling a server that nothing disabled, or giving it its own weight, changes nothing.
    let (code, _, _) = admin.change(a.addr, "enable", None, Some(TOKEN)).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(overrides().await, serde_json::json!([]));
    admin
        .change(a.addr, "weight", Some(r#"{"weight": 1}"#), Some(TOKEN))
        .await;
    assert_eq!(overrides().await, serde_json::json!([]));
    // Drained, then enabled again: back to the file.
    admin.change(a.addr, "drain", None, Some(TOKEN)).await;
    assert_eq!(overrides().await[0]["drain"], true);
    let a_addr = a.addr.to_string();
    let a_labels = [("upstream", "app"), ("server", a_addr.as_str())];
    let metrics = scrape(&admin).await;
    assert_eq!(sum(&metrics, "fulcrum_server_up", &a_labels), 0.0);
    let a_state = [a_labels[0], a_labels[1], ("state", "up")];
    assert_eq!(sum(&metrics, "fulcrum_server_state", &a_state), 1.0);
    admin.change(a.addr, "enable", None, Some(TOKEN)).await;
    assert_eq!(overrides().await, serde_json::json!([]));
    assert_eq!(
        sum(&scrape(&admin).await, "fulcrum_server_up", &a_labels),
        1.0
    );

    // The file drains b: enabling it is a change, and listed.
    let b_addr = b.addr.to_string();
    let b_labels = [("upstream", "app"), ("server", b_addr.as_str())];
    assert_eq!(
        sum(&scrape(&admin).await, "fulcrum_server_up", &b_labels),
        0.0
    );
    admin.change(b.addr, "enable", None, Some(TOKEN)).await;
    let listed = overrides().await;
    assert_eq!(listed[0]["server"], b_addr, "{listed:#}");
    assert_eq!(listed[0]["drain"], false, "{listed:#}");
    assert_eq!(listed[0]["disabled"], Value::Null, "{listed:#}");
    assert_eq!(
        sum(&scrape(&admin).await, "fulcrum_server_up", &b_labels),
        1.0
    );
}

/// `fulcrum_route_requests_total` of route `route` on listener `web`, for `class` (all
/// classes: `None`).
fn by_route(scrape: &prometheus_parse::Scrape, route: &str, class: Option<&str>) -> f64 {
    let mut labels = vec![("listener", "web"), ("route", route)];
    labels.extend(class.map(|c| ("class", c)));
    sum(scrape, "fulcrum_route_requests_total", &labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_per_route_whatever_their_outcome_and_a_reload_keeps_the_counts() {
    let dir = TempDir::new();
    let (a, gone) = (Backend::named("a").await, Backend::named("gone").await);
    gone.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let routes = "[listeners.web]\nbind = \"127.0.0.1:0\"\n\
         [[listeners.web.routes]]\nhost = \"shop.example.com\"\npath_prefix = \"/api/\"\nupstream = \"app\"\n\
         [[listeners.web.routes]]\npath_prefix = \"/static/\"\nupstream = \"app\"\n\
         [[listeners.web.routes]]\npath_prefix = \"/gone/\"\nupstream = \"dead\"\n";
    let upstreams = format!(
        "[upstreams.app]\nservers = [{{ address = \"{{0}}\" }}]\n\
         [upstreams.dead]\nservers = [{{ address = \"{{1}}\" }}]\n{}",
        admin_section(&dir, false)
    );
    let config = format!("{routes}{upstreams}");
    // Two workers, each counting in its own shard.
    let proxy = Proxy::start_workers(&config, &[&a, &gone], 2);
    let admin = Admin::of(&proxy);
    let (api, stat, dead) = ("shop.example.com/api/", "*/static/", "*/gone/");

    // A new connection for each request, so that both workers take some.
    let send = |path: &'static str, host: &'static str| {
        let url = proxy.url(path);
        async move {
            let response = client()
                .get(url)
                .header("host", host)
                .header("connection", "close")
                .send()
                .await
                .unwrap();
            let status = response.status();
            response.text().await.unwrap();
            status
        }
    };
    let (n, m) = (7, 4);
    for _ in 0..n {
        assert_eq!(send("/api/items", "shop.example.com").await, StatusCode::OK);
    }
    for _ in 0..m {
        assert_eq!(
            send("/static/app.js", "other.example").await,
            StatusCode::OK
        );
    }
    // Routed, then answered by Fulcrum itself: its server cannot be reached.
    assert_eq!(
        send("/gone/x", "other.example").await,
        StatusCode::BAD_GATEWAY
    );
    // Refused before routing: not a route's.
    assert_eq!(
        send("/api/items", "other.example").await,
        StatusCode::NOT_FOUND
    );

    // A request is counted just after its client has the response.
    let expected = (n + m + 1) as f64;
    let all = |s: &prometheus_parse::Scrape| sum(s, "fulcrum_route_requests_total", &[]);
    let mut metrics = scrape(&admin).await;
    for _ in 0..100 {
        if all(&metrics) >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = scrape(&admin).await;
    }
    assert_eq!(all(&metrics), expected);
    assert_eq!(by_route(&metrics, api, Some("2xx")), n as f64);
    assert_eq!(by_route(&metrics, api, None), n as f64);
    assert_eq!(by_route(&metrics, stat, Some("2xx")), m as f64);
    assert_eq!(by_route(&metrics, stat, None), m as f64);
    assert_eq!(by_route(&metrics, dead, Some("5xx")), 1.0);
    let upstream_of = |route: &str| {
        let sample = metrics
            .samples
            .iter()
            .find(|s| {
                s.metric == "fulcrum_route_requests_total" && s.labels.get("route") == Some(route)
            })
            .unwrap_or_else(|| panic!("no series for {route}"));
        sample.labels.get("upstream").unwrap().to_string()
    };
    assert_eq!(
        (upstream_of(api), upstream_of(stat)),
        ("app".into(), "app".into())
    );
    assert_eq!(upstream_of(dead), "dead");
    // The 404 is Fulcrum's own answer, counted without a server.
    let own = [("listener", "web"), ("server", ""), ("class", "4xx")];
    assert_eq!(sum(&metrics, "fulcrum_requests_total", &own), 1.0);

    let status = admin.status().await;
    let counted = |status: &Value| -> Vec<(u64, u64)> {
        status["listeners"][0]["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["requests"].as_u64().unwrap(),
                    r["errors"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(counted(&status), [(n, 0), (m, 0), (1, 1)], "{status:#}");

    // A reload that keeps the routes, adds one and moves none, keeps their counts.
    let added = format!(
        "{routes}[[listeners.web.routes]]\npath_prefix = \"/new/\"\nupstream = \"app\"\n{upstreams}"
    );
    let text = format!("workers = 2\n{}", support::fill(&added, &[&a, &gone]));
    proxy
        .server
        .reload(fulcrum::config::parse("test.toml", &text).unwrap())
        .unwrap();
    assert_eq!(send("/api/items", "shop.example.com").await, StatusCode::OK);
    let mut status = admin.status().await;
    for _ in 0..100 {
        if counted(&status)[0].0 > n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = admin.status().await;
    }
    assert_eq!(
        counted(&status),
        [(n + 1, 0), (m, 0), (1, 1), (0, 0)],
        "{status:#}"
    );
    let metrics = scrape(&admin).await;
    assert_eq!(by_route(&metrics, api, Some("2xx")), (n + 1) as f64);
    assert_eq!(by_route(&metrics, stat, Some("2xx")), m as f64);
    assert_eq!(by_route(&metrics, "*/new/", None), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulcrum_status_prints_the_servers_of_a_running_fulcrum() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let admin = format!("127.0.0.1:{}", support::unused_addr().port());
    let config = simple_config(2, &format!("[admin]\nbind = \"{admin}\"\n"));
    let process = Process::start(&config, &[&a, &b]);
    let http = client();
    for _ in 0..4 {
        get_text(&http, &process.url("/")).await;
    }
    Admin::at(&admin).status_after(4).await;

    let out = binary()
        .args(["status", "-c"])
        .arg(&process.config)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("UPSTREAM  SERVER"), "{table}");
    for backend in [&a, &b] {
        let line = lines
            .iter()
            .find(|l| l.contains(&backend.addr.to_string()))
            .unwrap_or_else(|| panic!("no line for {}: {table}", backend.addr));
        let cells: Vec<&str> = line.split_whitespace().collect();
        // upstream, server, state, weight, in flight, requests, errors, latency
        assert_eq!(
            &cells[..6],
            ["app", &*backend.addr.to_string(), "up", "1", "0", "2"],
            "{table}"
        );
        assert_eq!(cells[6], "0.0%", "{table}");
    }

    let by_address = binary()
        .args(["status", "--admin", &admin])
        .output()
        .unwrap();
    assert!(by_address.status.success());
    assert!(String::from_utf8_lossy(&by_address.stdout).contains(&a.addr.to_string()));
}

#[test]
fn fulcrum_status_says_why_it_cannot_show_anything() {
    let dir = TempDir::new();
    let path = dir.0.join("fulcrum.toml");
    std::fs::write(&path, simple_config(1, "").replace("{0}", "127.0.0.1:9001")).unwrap();
    let off = binary().args(["status", "-c"]).arg(&path).output().unwrap();
    assert_eq!(off.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&off.stderr);
    assert!(
        stderr.contains("the admin listener is off: add an [admin] section"),
        "{stderr}"
    );

    let closed = format!("127.0.0.1:{}", support::unused_addr().port());
    let unreachable = binary()
        .args(["status", "--admin", &closed])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(
        stderr.contains(&format!("cannot reach the admin listener at {closed}")),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_taken_admin_address_stops_the_start_with_a_clear_message() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let backend = Backend::named("a").await;
    let text = support::fill(
        &simple_config(1, &format!("[admin]\nbind = \"{addr}\"\n")),
        &[&backend],
    );
    let config = fulcrum::config::parse("test.toml", &text).unwrap();
    let error = fulcrum::server::Server::start(config).await.err().unwrap();
    assert!(
        error
            .to_string()
            .contains(&format!("the admin listener cannot bind {addr}")),
        "{error}"
    );
}
