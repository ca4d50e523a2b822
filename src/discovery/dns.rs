//! Servers given by host name (`address = "backend.internal:8080"`): each name is resolved
//! (A and AAAA) before Fulcrum serves and again whenever its answer's TTL runs out, bounded
//! by `[dns] min_ttl` and `max_ttl`, and every address it gives becomes a server of its own,
//! with its own pool and state. A failed resolution keeps the addresses last found and is
//! tried again after `min_ttl`. One task per process resolves, and follows reloads.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::{Config, DnsConfig, ServerConfig};
use crate::runtime::{Inputs, Runtime, Shared};
use crate::server::stopping;

/// What `Inputs::resolved` is keyed by: the upstream's name and the server's `host:port`.
pub type Key = (String, String);

/// How often the resolving task looks for a reload that added or removed names.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// Replaces every named server of `config` by one server per address `resolved` holds for
/// it, in address order, with the named server's settings. An address already listed in
/// the upstream (literally, or by an earlier name) is not added twice: the first entry's
/// settings hold. A name with nothing resolved yet adds no server.
pub fn expand(config: &mut Config, resolved: &HashMap<Key, Vec<SocketAddr>>) {
    for upstream in &mut config.upstreams {
        if upstream.named.is_empty() {
            continue;
        }
        let mut listed: HashSet<SocketAddr> = upstream.servers.iter().map(|s| s.address).collect();
        let mut key = (upstream.name.clone(), String::new());
        for named in &upstream.named {
            key.1.clone_from(&named.name);
            let Some(addresses) = resolved.get(&key) else {
                continue;
            };
            let mut addresses = addresses.clone();
            addresses.sort_unstable();
            for address in addresses {
                if listed.insert(address) {
                    upstream.servers.push(ServerConfig {
                        address,
                        weight: named.weight,
                        backup: named.backup,
                        drain: named.drain,
                        disabled: false,
                        max_connections: named.max_connections,
                    });
                }
            }
        }
    }
}

/// Drops what was resolved for names the file no longer lists (a reload removed the
/// server or its upstream), so that they neither serve nor linger; names still listed
/// keep their addresses until they are resolved again.
pub fn forget_unlisted(inputs: &mut Inputs) {
    let listed = listed_names(&inputs.file);
    inputs.resolved.retain(|key, _| listed.contains_key(key));
}

/// How long an answer with time-to-live `ttl` is used before its name is resolved again.
pub fn refresh_after(ttl: Duration, dns: &DnsConfig) -> Duration {
    ttl.clamp(dns.min_ttl, dns.max_ttl.max(dns.min_ttl))
}

/// Every named server of `config`, by key, with the host and port to resolve.
fn listed_names(config: &Config) -> HashMap<Key, (String, u16)> {
    config
        .upstreams
        .iter()
        .flat_map(|u| {
            u.named
                .iter()
                .map(|n| ((u.name.clone(), n.name.clone()), (n.host.clone(), n.port)))
        })
        .collect()
}

/// Resolves once the names known at start have had their first answer (or failure).
#[derive(Clone)]
pub struct FirstAnswers(watch::Receiver<bool>);

impl FirstAnswers {
    /// Waits for the first answers, at most `within`: a slow DNS server delays serving by
    /// that much, not more; upstreams still without addresses answer 503 meanwhile.
    pub async fn wait(mut self, within: Duration) {
        let _ = tokio::time::timeout(within, self.0.wait_for(|&done| done)).await;
    }
}

/// The task that resolves server names for `shared` until shutdown (spawn it once per
/// process), and what tells when its first answers are in.
pub fn resolve_server_names(
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> (impl Future<Output = ()> + Send + 'static, FirstAnswers) {
    let (done, first) = watch::channel(false);
    (
        Resolving::new(shared).run(shutdown, done),
        FirstAnswers(first),
    )
}

/// A name to resolve and when.
struct Tracked {
    host: String,
    port: u16,
    due: Instant,
}

/// What a resolution of one name came to: addresses and how long they hold, or why not.
type Answer = Result<(Vec<IpAddr>, Duration), String>;

struct Resolving {
    shared: Arc<Shared>,
    /// The snapshot whose names `names` follows.
    seen: Option<Arc<Runtime>>,
    dns: Option<DnsConfig>,
    /// Built from `dns`; `None` until it could be (say, with no resolv.conf yet).
    client: Option<TokioResolver>,
    names: HashMap<Key, Tracked>,
}

impl Resolving {
    fn new(shared: Arc<Shared>) -> Self {
        Resolving {
            shared,
            seen: None,
            dns: None,
            client: None,
            names: HashMap::new(),
        }
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>, first: watch::Sender<bool>) {
        loop {
            self.follow_config();
            let round = self.resolve_due();
            tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                () = round => {}
            }
            first.send_replace(true);
            let next = self
                .names
                .values()
                .map(|t| t.due)
                .min()
                .map_or(Instant::now() + FOLLOW_EVERY, |due| {
                    due.min(Instant::now() + FOLLOW_EVERY)
                });
            // A reload is taken up at once, so that its new names have addresses as soon
            // as they can: until then their upstream has no server for them.
            let shared = self.shared.clone();
            tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                () = tokio::time::sleep_until(next) => {}
                () = shared.swapped() => {}
            }
        }
    }

    /// Takes up the names and `[dns]` settings of the current snapshot, if a reload (or
    /// this task's own update) replaced it: names new to it are resolved at once, names
    /// gone are no longer resolved, and changed settings make a new client.
    fn follow_config(&mut self) {
        let runtime = self.shared.load();
        if self.seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &runtime)) {
            return;
        }
        let listed = listed_names(&runtime.config);
        self.names.retain(|key, _| listed.contains_key(key));
        let now = Instant::now();
        for (key, (host, port)) in listed {
            self.names.entry(key).or_insert(Tracked {
                host,
                port,
                due: now,
            });
        }
        if self.dns.as_ref() != Some(&runtime.config.dns) {
            self.dns = Some(runtime.config.dns.clone());
            self.client = None;
            // New name servers may answer what the old ones did not.
            for tracked in self.names.values_mut() {
                tracked.due = now;
            }
        }
        self.seen = Some(runtime);
    }

    /// Resolves every name that is due, all at once, and applies what changed in one
    /// runtime rebuild.
    async fn resolve_due(&mut self) {
        let Some(dns) = self.dns.clone() else { return };
        let now = Instant::now();
        let due: Vec<Key> = self
            .names
            .iter()
            .filter(|(_, t)| t.due <= now)
            .map(|(key, _)| key.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        if self.client.is_none() {
            match client(&dns) {
                Ok(client) => self.client = Some(client),
                Err(e) => {
                    tracing::error!(error = %e, "cannot set up DNS resolution of server names; trying again in {:?}", dns.min_ttl);
                    for key in &due {
                        if let Some(t) = self.names.get_mut(key) {
                            t.due = now + dns.min_ttl;
                        }
                    }
                    return;
                }
            }
        }
        let client = self.client.clone().expect("set just above");
        let mut lookups = JoinSet::new();
        for key in due {
            let host = self.names[&key].host.clone();
            let client = client.clone();
            let timeout = dns.timeout;
            lookups.spawn(async move {
                let answer =
                    match tokio::time::timeout(timeout, client.lookup_ip(host.as_str())).await {
                        Err(_) => Err(format!("no answer within {timeout:?}")),
                        Ok(Err(e)) => Err(e.to_string()),
                        Ok(Ok(lookup)) => {
                            let ttl = lookup
                                .valid_until()
                                .saturating_duration_since(std::time::Instant::now());
                            let ips: Vec<IpAddr> = lookup.iter().collect();
                            if ips.is_empty() {
                                Err("the answer holds no A or AAAA record".to_string())
                            } else {
                                Ok((ips, ttl))
                            }
                        }
                    };
                (key, answer)
            });
        }
        let mut answers = Vec::new();
        while let Some(done) = lookups.join_next().await {
            // A lookup task only ends early if it panicked, which the log shows already.
            if let Ok(answer) = done {
                answers.push(answer);
            }
        }
        self.apply(answers, &dns);
    }

    /// Schedules each name's next resolution, and swaps in a runtime with the new
    /// addresses of names whose set changed.
    fn apply(&mut self, answers: Vec<(Key, Answer)>, dns: &DnsConfig) {
        let now = Instant::now();
        let mut found = Vec::new();
        for (key, answer) in answers {
            let Some(tracked) = self.names.get_mut(&key) else {
                continue;
            };
            match answer {
                Ok((ips, ttl)) => {
                    tracked.due = now + refresh_after(ttl, dns);
                    let mut addresses: Vec<SocketAddr> = ips
                        .into_iter()
                        .map(|ip| SocketAddr::new(ip, tracked.port))
                        .collect();
                    addresses.sort_unstable();
                    addresses.dedup();
                    found.push((key, addresses));
                }
                Err(reason) => {
                    tracked.due = now + dns.min_ttl;
                    let kept = self
                        .shared
                        .inputs(|inputs| inputs.resolved.get(&key).map_or(0, Vec::len));
                    let (upstream, name) = &key;
                    tracing::error!(%upstream, server = %name, %reason, kept_addresses = kept, retry_in = ?dns.min_ttl, "cannot resolve server name; the addresses it last had stay in use");
                }
            }
        }
        found.retain(|(key, addresses)| {
            self.shared
                .inputs(|inputs| inputs.resolved.get(key) != Some(addresses))
        });
        if found.is_empty() {
            return;
        }
        let mut changes = Vec::new();
        let updated = self.shared.update(|inputs| {
            let listed = listed_names(&inputs.file);
            for (key, addresses) in found {
                // A reload since the lookup began may have removed the name.
                if !listed.contains_key(&key) {
                    continue;
                }
                let before = inputs.resolved.insert(key.clone(), addresses.clone());
                changes.push((key, before.unwrap_or_default(), addresses));
            }
        });
        match updated {
            Ok(()) => {
                for ((upstream, name), before, after) in changes {
                    let added: Vec<&SocketAddr> =
                        after.iter().filter(|a| !before.contains(a)).collect();
                    let removed: Vec<&SocketAddr> =
                        before.iter().filter(|a| !after.contains(a)).collect();
                    tracing::info!(%upstream, server = %name, ?added, ?removed, "server name resolves to new addresses");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?dns.min_ttl, "cannot apply newly resolved server addresses");
                for (key, _, _) in changes {
                    if let Some(tracked) = self.names.get_mut(&key) {
                        tracked.due = now + dns.min_ttl;
                    }
                }
            }
        }
    }
}

/// A resolver asking `dns.nameservers`, or as the system's does (`/etc/resolv.conf`, and
/// `/etc/hosts` as it is now). It keeps no cache: when a name is resolved again is decided
/// here, so every resolution must ask.
fn client(dns: &DnsConfig) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if dns.nameservers.is_empty() {
        TokioResolver::builder(provider)
            .map_err(|e| format!("reading the system's DNS settings: {e}"))?
    } else {
        let servers = dns
            .nameservers
            .iter()
            .map(|ns| {
                let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                    .into_iter()
                    .map(|mut c| {
                        c.port = ns.port();
                        c
                    })
                    .collect();
                NameServerConfig::new(ns.ip(), true, connections)
            })
            .collect();
        let mut builder = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            provider,
        );
        // Name servers given: they alone answer.
        builder.options_mut().use_hosts_file = ResolveHosts::Never;
        builder
    };
    let options = builder.options_mut();
    options.cache_size = 0;
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // Two tries within the whole resolution's time.
    options.attempts = 2;
    options.timeout = dns.timeout / 2;
    builder.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const CONFIG: &str = r#"
[listeners.web]
bind = "127.0.0.1:0"
[[listeners.web.routes]]
upstream = "app"

[upstreams.app]
servers = [
    { address = "10.0.0.9:80" },
    { address = "app.internal:8080", weight = 3, max_connections = 7 },
    { address = "Spare.internal:9090", backup = true, drain = true },
]

[dns]
min_ttl = "2s"
max_ttl = "1m"
"#;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn key(name: &str) -> Key {
        ("app".into(), name.into())
    }

    #[test]
    fn named_servers_become_one_server_per_address_with_their_settings() {
        let mut config = parse("test.toml", CONFIG).unwrap();
        let named = &config.upstreams[0].named;
        assert_eq!(named.len(), 2);
        assert_eq!(named[1].name, "spare.internal:9090");
        let resolved = HashMap::from([
            (
                key("app.internal:8080"),
                vec![addr("10.0.0.3:8080"), addr("10.0.0.1:8080")],
            ),
            (key("spare.internal:9090"), vec![addr("[fd00::1]:9090")]),
        ]);
        expand(&mut config, &resolved);
        let servers = &config.upstreams[0].servers;
        let listed: Vec<_> = servers.iter().map(|s| s.address).collect();
        assert_eq!(
            listed,
            [
                addr("10.0.0.9:80"),
                addr("10.0.0.1:8080"),
                addr("10.0.0.3:8080"),
                addr("[fd00::1]:9090")
            ]
        );
        assert_eq!((servers[0].weight, servers[0].max_connections), (1, 10_000));
        assert_eq!((servers[1].weight, servers[1].max_connections), (3, 7));
        assert!(!servers[2].backup && servers[3].backup && servers[3].drain);
    }

    #[test]
    fn an_address_listed_already_is_not_added_again_and_unresolved_names_add_nothing() {
        let mut config = parse("test.toml", CONFIG).unwrap();
        let resolved = HashMap::from([(
            key("app.internal:8080"),
            vec![addr("10.0.0.9:80"), addr("10.0.0.9:8080")],
        )]);
        expand(&mut config, &resolved);
        let servers = &config.upstreams[0].servers;
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].weight, 1, "the literal entry's settings hold");
        assert_eq!(servers[1].address, addr("10.0.0.9:8080"));
    }

    #[test]
    fn an_upstream_of_names_only_may_have_no_server_yet() {
        let text = CONFIG.replace("    { address = \"10.0.0.9:80\" },\n", "");
        let mut config = parse("test.toml", &text).unwrap();
        expand(&mut config, &HashMap::new());
        assert!(config.upstreams[0].servers.is_empty());
        let affinity = crate::upstream::Affinity {
            client_ip: IpAddr::from([127, 0, 0, 1]),
            key: Some(42),
            pinned: None,
        };
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            "pin=0123456789abcdef".parse().unwrap(),
        );
        for &(_, balance) in crate::config::BalanceKind::ALL {
            let mut upstream = config.upstreams[0].clone();
            upstream.balance = balance;
            upstream.sticky_cookie = Some("pin".into());
            let upstream = Arc::new(crate::upstream::Upstream::build(
                &upstream,
                2,
                Duration::from_secs(1),
                None,
            ));
            assert_eq!(upstream.tries(&affinity), 0, "{balance:?}");
            for attempt in 0..3 {
                assert!(
                    upstream.pick(attempt, &affinity, &[]).is_none(),
                    "{balance:?}"
                );
            }
            assert_eq!(upstream.pinned(&headers), None);
        }
        // The whole runtime builds too, and routes to the empty upstream.
        let runtime = Runtime::build(config, None).unwrap();
        assert!(runtime.upstreams[0].servers.is_empty());
    }

    #[test]
    fn answers_are_used_for_their_ttl_within_the_configured_bounds() {
        let config = parse("test.toml", CONFIG).unwrap();
        let dns = &config.dns;
        assert_eq!(refresh_after(Duration::ZERO, dns), Duration::from_secs(2));
        assert_eq!(
            refresh_after(Duration::from_secs(30), dns),
            Duration::from_secs(30)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(86_400), dns),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn a_reload_forgets_the_addresses_of_names_no_longer_listed() {
        let config = parse("test.toml", CONFIG).unwrap();
        let fewer = parse(
            "test.toml",
            &CONFIG.replace("\"Spare.internal:9090\"", "\"10.0.0.8:9090\""),
        )
        .unwrap();
        let mut inputs = Inputs {
            file: config,
            resolved: HashMap::from([
                (key("app.internal:8080"), vec![addr("10.0.0.1:8080")]),
                (key("spare.internal:9090"), vec![addr("10.0.0.2:9090")]),
            ]),
            overrides: HashMap::new(),
        };
        inputs.file = fewer;
        forget_unlisted(&mut inputs);
        assert_eq!(
            inputs.resolved.keys().collect::<Vec<_>>(),
            [&key("app.internal:8080")]
        );
        let effective = inputs.effective();
        let listed: Vec<_> = effective.upstreams[0]
            .servers
            .iter()
            .map(|s| s.address)
            .collect();
        assert_eq!(
            listed,
            [
                addr("10.0.0.9:80"),
                addr("10.0.0.8:9090"),
                addr("10.0.0.1:8080")
            ]
        );
    }
}
