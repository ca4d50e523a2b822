//! The proxy path end to end: balancing, routing, header rewriting, keep-alive, pipelining
//! and HTTP/2, through a real Fulcrum to real backends.

mod support;

use std::sync::atomic::Ordering;

use support::{Backend, Proxy, client, get_text, raw, statuses};

#[tokio::test]
async fn round_robin_rotates_across_servers() {
    let (a, b, c) = (
        Backend::named("a").await,
        Backend::named("b").await,
        Backend::named("c").await,
    );
    let proxy = Proxy::simple(&[&a, &b, &c], "").await;
    let client = client();
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(get_text(&client, &proxy.url("/")).await);
    }
    assert_eq!(answers, ["a", "b", "c", "a", "b", "c"]);
}

#[tokio::test]
async fn routes_by_host_then_longest_path_prefix() {
    let (site, api, other) = (
        Backend::named("site").await,
        Backend::named("api").await,
        Backend::named("other").await,
    );
    let config = r#"
[listeners.web]
bind = "127.0.0.1:0"
[[listeners.web.routes]]
host = "example.com"
upstream = "site"
[[listeners.web.routes]]
host = "example.com"
path_prefix = "/api/"
upstream = "api"
[[listeners.web.routes]]
path_prefix = "/other"
upstream = "other"
[upstreams.site]
servers = [{ address = "{0}" }]
[upstreams.api]
servers = [{ address = "{1}" }]
[upstreams.other]
servers = [{ address = "{2}" }]
"#;
    let proxy = Proxy::start(config, &[&site, &api, &other]).await;
    let client = client();
    let get = |host: &'static str, path: &'static str| {
        let req = client.get(proxy.url(path)).header("host", host);
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    assert_eq!(get("example.com", "/").await, (200, "site".into()));
    assert_eq!(
        get("EXAMPLE.com:80", "/api/users").await,
        (200, "api".into())
    );
    assert_eq!(
        get("elsewhere.org", "/other/x").await,
        (200, "other".into())
    );
    let (status, body) = get("elsewhere.org", "/nothing").await;
    assert_eq!(status, 404);
    assert!(body.contains("no route"), "{body}");
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_and_forwarding_headers_added() {
    let backend = Backend::with(|_req| async {
        http::Response::builder()
            .header("connection", "x-private-reply")
            .header("x-private-reply", "1")
            .header("keep-alive", "timeout=5")
            .header("x-public", "1")
            .body(support::full("ok"))
            .unwrap()
    })
    .await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let resp = client()
        .get(proxy.url("/p?q=1"))
        .header("host", "front.example")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-kept", "yes")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert!(h.get("x-private-reply").is_none() && h.get("keep-alive").is_none());
    assert_eq!(h["x-public"], "1");
    assert_eq!(h["via"], "1.1 fulcrum");

    let seen = backend.seen.last();
    assert_eq!(seen.uri, "/p?q=1");
    for gone in ["x-private", "proxy-authorization", "te"] {
        assert!(seen.headers.get(gone).is_none(), "{gone} was forwarded");
    }
    assert_eq!(seen.headers["x-kept"], "yes");
    assert_eq!(seen.headers["host"], "front.example");
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], "front.example");
    assert_eq!(
        seen.headers["forwarded"],
        "for=127.0.0.1;host=\"front.example\";proto=http"
    );
    assert_eq!(seen.headers["via"], "1.1 fulcrum");
}

#[tokio::test]
async fn host_can_be_replaced_by_the_server_address() {
    let backend = Backend::named("a").await;
    let config = "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
                  [upstreams.app]\npreserve_host = false\nservers = [{ address = \"{0}\" }]\n";
    let proxy = Proxy::start(config, &[&backend]).await;
    client()
        .get(proxy.url("/"))
        .header("host", "front.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        backend.seen.last().headers["host"],
        backend.addr.to_string()
    );
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let backend = Backend::named("a").await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let client = client();
    for _ in 0..50 {
        let resp = client.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(resp.text().await.unwrap(), "a");
    }
    assert_eq!(backend.seen.count(), 50);
    assert_eq!(
        backend.seen.connections.load(Ordering::SeqCst),
        1,
        "sequential requests should share one pooled connection"
    );
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let proxy = Proxy::simple(&[&a, &b], "").await;
    let one = "GET /1 HTTP/1.1\r\nHost: x\r\n\r\n";
    let last = "GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let out = raw(proxy.addr, format!("{one}{one}{last}").as_bytes()).await;
    assert_eq!(statuses(&out), [200, 200, 200], "{out}");
    let backends: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("x-backend: "))
        .collect();
    assert_eq!(backends, ["a", "b", "a"], "{out}");
}

#[tokio::test]
async fn http2_prior_knowledge_is_served_on_the_same_listener() {
    let backend = Backend::named("a").await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..3 {
        let resp = h2.get(proxy.url("/h2")).send().await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.text().await.unwrap(), "a");
    }
    let seen = backend.seen.last();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.headers["host"], proxy.addr.to_string());
    assert_eq!(seen.headers["via"], "2 fulcrum");
    // HTTP/1.1 still works beside it.
    assert_eq!(get_text(&client(), &proxy.url("/")).await, "a");
}

#[tokio::test]
async fn post_bodies_reach_the_backend_intact() {
    let backend = Backend::with(|req| async move {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        http::Response::new(support::full(format!("got {} bytes", body.len())))
    })
    .await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let body = vec![b'x'; 100_000];
    let resp = client()
        .post(proxy.url("/upload"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "got 100000 bytes");
    // And chunked, with no declared length.
    let out = raw(proxy.addr, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n").await;
    assert!(out.ends_with("got 5 bytes"), "{out}");
}
