//! Balancing algorithms through the real proxy, with clients on several loopback addresses.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use support::{Backend, Proxy, get_text};

fn config(balance: &str) -> String {
    format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
         [upstreams.app]\nbalance = \"{balance}\"\nservers = [{{ address = \"{{0}}\" }}, {{ address = \"{{1}}\" }}, {{ address = \"{{2}}\" }}]\n"
    )
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
    let (a, b, c) = (
        Backend::named("a").await,
        Backend::named("b").await,
        Backend::named("c").await,
    );
    let proxy = Proxy::start(&config("ip_hash"), &[&a, &b, &c]).await;
    let mut server_of: HashMap<IpAddr, String> = HashMap::new();
    for last in 2..32u8 {
        let ip = IpAddr::from([127, 0, 0, last]);
        let client = client_from(ip);
        for _ in 0..4 {
            let answer = get_text(&client, &proxy.url("/")).await;
            let first = server_of.entry(ip).or_insert_with(|| answer.clone());
            assert_eq!(*first, answer, "client {ip} moved between servers");
        }
    }
    let used: HashSet<&String> = server_of.values().collect();
    assert_eq!(used.len(), 3, "30 clients all landed on {used:?}");
}

#[tokio::test]
async fn random_reaches_every_server() {
    let (a, b, c) = (
        Backend::named("a").await,
        Backend::named("b").await,
        Backend::named("c").await,
    );
    let proxy = Proxy::start(&config("random"), &[&a, &b, &c]).await;
    let client = support::client();
    let mut seen = HashSet::new();
    for _ in 0..60 {
        seen.insert(get_text(&client, &proxy.url("/")).await);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}
