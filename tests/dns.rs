//! Servers given by host name, against a real DNS server on 127.0.0.1 whose answers the
//! tests change while Fulcrum runs: traffic follows the addresses within the answer's TTL,
//! and a DNS server that fails or falls silent leaves the last addresses serving.

mod support;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

use support::{Backend, Proxy, get_text};

/// How long traffic may take to follow a changed answer: its 1 s TTL, a failed try's retry
/// after `min_ttl`, and a noisy machine.
const FOLLOW_WITHIN: Duration = Duration::from_secs(15);

/// What the test DNS server says to a query for one of its names.
#[derive(Clone, Debug)]
enum Answer {
    /// A records, with a 1 s TTL.
    Addresses(Vec<Ipv4Addr>),
    ServFail,
    /// No reply at all, as a DNS server that is down.
    Silent,
}

/// A DNS server on 127.0.0.1 (UDP) authoritative for whatever names it is given.
struct DnsServer {
    addr: SocketAddr,
    answers: Arc<Mutex<Vec<(Name, Answer)>>>,
    /// Queries received, per name.
    queries: Arc<Mutex<Vec<Name>>>,
    task: tokio::task::AbortHandle,
}

impl DnsServer {
    async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let answers: Arc<Mutex<Vec<(Name, Answer)>>> = Arc::default();
        let queries: Arc<Mutex<Vec<Name>>> = Arc::default();
        let (table, log) = (answers.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(query) = request.queries.first().cloned() else {
                    continue;
                };
                let name = query.name().to_lowercase();
                log.lock().unwrap().push(name.clone());
                let answer = table
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, a)| a.clone());
                let mut response =
                    Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
                response.metadata.recursion_desired = request.metadata.recursion_desired;
                response.metadata.recursion_available = true;
                response.metadata.authoritative = true;
                response.add_query(query.clone());
                response.edns = request.edns.clone();
                match answer {
                    None => response.metadata.response_code = ResponseCode::NXDomain,
                    Some(Answer::Silent) => continue,
                    Some(Answer::ServFail) => {
                        response.metadata.response_code = ResponseCode::ServFail
                    }
                    // AAAA and other types: the name exists, with no such records.
                    Some(Answer::Addresses(ips)) if query.query_type() == RecordType::A => {
                        for ip in ips {
                            response.add_answer(Record::from_rdata(
                                name.clone(),
                                1,
                                RData::A(A(ip)),
                            ));
                        }
                    }
                    Some(Answer::Addresses(_)) => {}
                }
                let _ = socket.send_to(&response.to_vec().unwrap(), from).await;
            }
        });
        DnsServer {
            addr,
            answers,
            queries,
            task: task.abort_handle(),
        }
    }

    /// From now on, queries for `name` get `answer`.
    fn set(&self, name: &str, answer: Answer) {
        let name = Name::from_ascii(name).unwrap().to_lowercase();
        let mut answers = self.answers.lock().unwrap();
        answers.retain(|(n, _)| *n != name);
        answers.push((name, answer));
    }

    /// Queries received for `name` (of any type) so far.
    fn queries_for(&self, name: &str) -> usize {
        let name = Name::from_ascii(name).unwrap().to_lowercase();
        self.queries
            .lock()
            .unwrap()
            .iter()
            .filter(|n| **n == name)
            .count()
    }

    /// Waits until `name` has been asked for `more` times beyond `since`.
    async fn wait_for_queries(&self, name: &str, since: usize, more: usize) {
        let deadline = Instant::now() + FOLLOW_WITHIN;
        while self.queries_for(name) < since + more {
            assert!(
                Instant::now() < deadline,
                "{name} was not asked again within {FOLLOW_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Two backends on the same port, one at 127.0.0.1 answering "one", one at 127.0.0.2
/// answering "two" (both loopback on Linux), so that a name can move between them.
async fn two_backends() -> (Backend, Backend, u16) {
    for _ in 0..20 {
        let one = Backend::named("one").await;
        let port = one.addr.port();
        let at = SocketAddr::from(([127, 0, 0, 2], port));
        if tokio::net::TcpListener::bind(at).await.is_ok() {
            let two = Backend::named_at("two", at).await;
            return (one, two, port);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

const ONE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const TWO: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn config(servers: &str, dns: &DnsServer) -> String {
    format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
         [upstreams.app]\nservers = [{servers}]\n\
         [timeouts]\nupstream_connect = \"5s\"\n\
         [dns]\nnameservers = [\"{}\"]\nmin_ttl = \"1s\"\nmax_ttl = \"1s\"\ntimeout = \"1s\"\n\
         [access_log]\nenabled = false\n",
        dns.addr
    )
}

/// The backends that answered `n` requests in a row.
async fn answers(client: &reqwest::Client, url: &str, n: usize) -> HashSet<String> {
    let mut seen = HashSet::new();
    for _ in 0..n {
        seen.insert(get_text(client, url).await);
    }
    seen
}

/// Sends requests until `n` in a row are answered by exactly `expected`, within
/// `FOLLOW_WITHIN`.
async fn until_only(client: &reqwest::Client, url: &str, expected: &[&str], n: usize) {
    let expected: HashSet<String> = expected.iter().map(|s| s.to_string()).collect();
    let deadline = Instant::now() + FOLLOW_WITHIN;
    loop {
        let seen = answers(client, url, n).await;
        if seen == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still answered by {seen:?}, not {expected:?}, after {FOLLOW_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn traffic_follows_the_name_and_the_last_good_answer_outlives_dns_failures() {
    let dns = DnsServer::start().await;
    dns.set("app.test.", Answer::Addresses(vec![ONE]));
    let (one, two, port) = two_backends().await;
    let proxy = Proxy::start(
        &config(&format!("{{ address = \"app.test:{port}\" }}"), &dns),
        &[],
    )
    .await;
    let (client, url) = (support::client(), proxy.url("/"));

    // Resolved before serving: the very first request goes to the address DNS gave.
    assert_eq!(
        answers(&client, &url, 6).await,
        HashSet::from(["one".into()])
    );
    assert!(dns.queries_for("app.test.") >= 1);

    dns.set("app.test.", Answer::Addresses(vec![TWO]));
    until_only(&client, &url, &["two"], 6).await;
    let served_by_one = one.seen.count();

    dns.set("app.test.", Answer::Addresses(vec![ONE, TWO]));
    until_only(&client, &url, &["one", "two"], 6).await;
    assert!(one.seen.count() > served_by_one);

    // The DNS server fails: the name keeps both addresses while it is asked again and
    // again.
    dns.set("app.test.", Answer::ServFail);
    let asked = dns.queries_for("app.test.");
    dns.wait_for_queries("app.test.", asked, 4).await;
    assert_eq!(
        answers(&client, &url, 10).await,
        HashSet::from(["one".into(), "two".into()])
    );

    // It stops answering at all: the same, once lookups have timed out.
    dns.set("app.test.", Answer::Silent);
    let asked = dns.queries_for("app.test.");
    dns.wait_for_queries("app.test.", asked, 4).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        answers(&client, &url, 10).await,
        HashSet::from(["one".into(), "two".into()])
    );

    // Back with one address: the set follows again.
    dns.set("app.test.", Answer::Addresses(vec![TWO]));
    until_only(&client, &url, &["two"], 6).await;
    assert!(two.seen.count() > 0);
    proxy.server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_upstream_with_no_address_yet_answers_503_until_its_name_resolves() {
    let dns = DnsServer::start().await;
    let (_one, _two, port) = two_backends().await;
    // Nothing known for the name: NXDOMAIN.
    let proxy = Proxy::start(
        &config(&format!("{{ address = \"later.test:{port}\" }}"), &dns),
        &[],
    )
    .await;
    let response = support::raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
    assert!(
        response.contains("no upstream server has been resolved yet"),
        "{response}"
    );

    dns.set("later.test.", Answer::Addresses(vec![TWO]));
    let client = support::client();
    let deadline = Instant::now() + FOLLOW_WITHIN;
    loop {
        let response = client.get(proxy.url("/")).send().await.unwrap();
        if response.status() == 200 {
            assert_eq!(response.text().await.unwrap(), "two");
            break;
        }
        assert_eq!(response.status(), 503);
        assert!(Instant::now() < deadline, "the name never took traffic");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_reload_starts_resolving_new_names_and_drops_removed_ones() {
    let dns = DnsServer::start().await;
    dns.set("first.test.", Answer::Addresses(vec![ONE]));
    dns.set("second.test.", Answer::Addresses(vec![TWO]));
    let (_one, _two, port) = two_backends().await;
    let proxy = Proxy::start(
        &config(&format!("{{ address = \"first.test:{port}\" }}"), &dns),
        &[],
    )
    .await;
    let (client, url) = (support::client(), proxy.url("/"));
    assert_eq!(
        answers(&client, &url, 4).await,
        HashSet::from(["one".into()])
    );

    let reloaded = fulcrum::config::parse(
        "test.toml",
        &config(&format!("{{ address = \"second.test:{port}\" }}"), &dns),
    )
    .unwrap();
    proxy.server.reload(reloaded).unwrap();
    until_only(&client, &url, &["two"], 6).await;

    // The removed name is no longer asked for.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let asked = dns.queries_for("first.test.");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(dns.queries_for("first.test."), asked);
    assert!(dns.queries_for("second.test.") >= 2);
    proxy.server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn workers_wait_for_the_first_answers() {
    let dns = DnsServer::start().await;
    dns.set("app.test.", Answer::Addresses(vec![TWO]));
    let (_one, _two, port) = two_backends().await;
    let proxy = Proxy::start_workers(
        &config(&format!("{{ address = \"app.test:{port}\" }}"), &dns),
        &[],
        2,
    );
    let (client, url) = (support::client(), proxy.url("/"));
    assert_eq!(
        answers(&client, &url, 6).await,
        HashSet::from(["two".into()])
    );
    proxy.server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_each_change_of_addresses_and_each_failure() {
    let dns = DnsServer::start().await;
    dns.set("app.test.", Answer::Addresses(vec![ONE]));
    let (_one, _two, port) = two_backends().await;
    let process = support::Process::start(
        &config(&format!("{{ address = \"app.test:{port}\" }}"), &dns),
        &[],
    );
    let first = process
        .log_from("server name resolves to new addresses")
        .await;
    assert!(
        first.contains(&format!("added=[127.0.0.1:{port}] removed=[]")),
        "{first}"
    );
    let client = support::client();
    assert_eq!(get_text(&client, &process.url("/")).await, "one");

    dns.set("app.test.", Answer::Addresses(vec![TWO]));
    let moved = process
        .log_from(&format!(
            "added=[127.0.0.2:{port}] removed=[127.0.0.1:{port}]"
        ))
        .await;
    assert!(
        moved.contains(&format!("server=app.test:{port}")),
        "{moved}"
    );

    dns.set("app.test.", Answer::ServFail);
    let failed = process.log_from("cannot resolve server name").await;
    assert!(
        failed.contains(&format!("server=app.test:{port}")) && failed.contains("kept_addresses=1"),
        "{failed}"
    );
    assert_eq!(get_text(&client, &process.url("/")).await, "two");
}
