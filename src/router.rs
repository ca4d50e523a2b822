//! Routing: which upstream a request goes to, by host and longest matching path prefix, and
//! on a listener that verifies client certificates, by the names in the client's. Each
//! route also counts the requests it took, for the metrics and the status.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::RouteConfig;
use crate::upstream::Upstream;
use crate::upstream::stats::ClassCounts;

/// The routes of one listener, indexed for lookup.
#[derive(Debug, Default)]
pub struct Router {
    /// Rules for a named host, longest prefix first.
    by_host: HashMap<Box<str>, Vec<Rule>>,
    /// Rules without a host, longest prefix first; used when no host rule matches.
    any_host: Vec<Rule>,
    /// Where each route sends, in the order of the listener's routes in the config.
    targets: Vec<Target>,
}

#[derive(Debug)]
struct Rule {
    prefix: Box<str>,
    /// The rule takes only clients whose verified certificate has one of these names;
    /// empty: any client.
    client_names: Box<[Box<str>]>,
    /// Index into `Router::targets`.
    target: usize,
}

/// What a route sends its requests to, and where it counts them.
#[derive(Debug)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    /// Requests the route took, by the status they ended with. Shared with the snapshot
    /// before, when it had the same route, so that a rebuild does not reset the count.
    pub requests: Arc<ClassCounts>,
}

impl Rule {
    fn takes(&self, path: &str, client_names: &[String]) -> bool {
        path.starts_with(&*self.prefix)
            && (self.client_names.is_empty()
                || self
                    .client_names
                    .iter()
                    .any(|n| client_names.iter().any(|c| **n == **c)))
    }
}

impl Router {
    /// Indexes `routes`, whose upstreams are `upstreams`, with counts for `workers`
    /// workers. A route that `previous` (the routes and router this one replaces) had
    /// already, sending to the same upstream, keeps its counts; one that now sends
    /// elsewhere counts anew, since its counts are shown by upstream.
    pub fn build(
        routes: &[RouteConfig],
        upstreams: &[Arc<Upstream>],
        workers: usize,
        previous: Option<(&[RouteConfig], &Router)>,
    ) -> Self {
        let mut router = Router::default();
        for (index, route) in routes.iter().enumerate() {
            let upstream = upstreams[route.upstream].clone();
            let kept = previous.and_then(|(old_routes, old_router)| {
                old_routes
                    .iter()
                    .zip(&old_router.targets)
                    .find(|(old, target)| {
                        old.host == route.host
                            && old.path_prefix == route.path_prefix
                            && old.client_names == route.client_names
                            && target.upstream.name == upstream.name
                    })
                    .map(|(_, target)| target.requests.clone())
            });
            router.targets.push(Target {
                upstream,
                requests: kept.unwrap_or_else(|| Arc::new(ClassCounts::new(workers))),
            });
            let rule = Rule {
                prefix: route.path_prefix.as_str().into(),
                client_names: route
                    .client_names
                    .iter()
                    .map(|n| n.as_str().into())
                    .collect(),
                target: index,
            };
            match &route.host {
                Some(host) => router
                    .by_host
                    .entry(host.as_str().into())
                    .or_default()
                    .push(rule),
                None => router.any_host.push(rule),
            }
        }
        for rules in router
            .by_host
            .values_mut()
            .chain(std::iter::once(&mut router.any_host))
        {
            // For one prefix, a rule for certain clients before the rule for the rest.
            rules.sort_by_key(|rule| {
                (
                    std::cmp::Reverse(rule.prefix.len()),
                    rule.client_names.is_empty(),
                )
            });
        }
        router
    }

    /// Where a request to `host` (as sent, port and case allowed) and `path` goes, from a
    /// client whose verified certificate has `client_names` (none without one).
    pub fn route(
        &self,
        host: Option<&str>,
        path: &str,
        client_names: &[String],
    ) -> Option<&Target> {
        if let Some(host) = host.map(strip_port)
            && !self.by_host.is_empty()
        {
            let rules = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                self.by_host.get(host.to_ascii_lowercase().as_str())
            } else {
                self.by_host.get(host)
            };
            if let Some(found) = rules.and_then(|rules| first_taker(rules, path, client_names)) {
                return Some(&self.targets[found]);
            }
        }
        first_taker(&self.any_host, path, client_names).map(|found| &self.targets[found])
    }

    /// Each route's target, in the order of the listener's routes in the config.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }
}

/// How the metrics name a route: its host (`*` for any) and path prefix run together, as
/// in `shop.example.com/api/`, then the client names it is limited to, if any, which tell
/// apart routes that differ only in those.
pub fn label(route: &RouteConfig) -> String {
    let host = route.host.as_deref().unwrap_or("*");
    let mut label = format!("{host}{}", route.path_prefix);
    if !route.client_names.is_empty() {
        label.push_str(&format!(" (clients: {})", route.client_names.join(", ")));
    }
    label
}

/// The index of the target of the first of `rules` that takes the request.
fn first_taker(rules: &[Rule], path: &str, client_names: &[String]) -> Option<usize> {
    rules
        .iter()
        .find(|r| r.takes(path, client_names))
        .map(|r| r.target)
}

fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        // A colon inside brackets belongs to an IPv6 address, not a port.
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BalanceKind, UpstreamConfig};
    use std::time::Duration;

    fn upstream(name: &str) -> Arc<Upstream> {
        let config = UpstreamConfig {
            name: name.into(),
            balance: BalanceKind::RoundRobin,
            hash_key: None,
            sticky_cookie: None,
            sticky_secret: None,
            latency_decay: Duration::from_secs(10),
            slow_start: Duration::ZERO,
            fail_timeout: Duration::ZERO,
            servers: vec![],
            named: vec![],
            preserve_host: true,
            pool_max_idle_per_server: 0,
            pool_idle_timeout: Duration::from_secs(1),
            tls: None,
            health_check: None,
            outlier_detection: Default::default(),
            panic_threshold: 0,
            proxy_protocol: None,
            resilience: Default::default(),
        };
        Arc::new(Upstream::build(&config, 1, Duration::from_secs(1), None))
    }

    fn route(host: Option<&str>, prefix: &str, upstream: usize) -> RouteConfig {
        RouteConfig {
            host: host.map(Into::into),
            path_prefix: prefix.into(),
            client_names: Vec::new(),
            upstream,
        }
    }

    #[test]
    fn host_then_longest_prefix_wins() {
        let ups = vec![
            upstream("default"),
            upstream("api"),
            upstream("site"),
            upstream("site-v2"),
        ];
        let router = Router::build(
            &[
                route(None, "/", 0),
                route(None, "/api", 1),
                route(Some("example.com"), "/", 2),
                route(Some("example.com"), "/v2/", 3),
            ],
            &ups,
            1,
            None,
        );
        let name = |host, path| {
            router
                .route(host, path, &[])
                .map(|t| t.upstream.name.as_str())
        };
        assert_eq!(name(Some("other.org"), "/api/x"), Some("api"));
        assert_eq!(name(None, "/x"), Some("default"));
        assert_eq!(name(Some("Example.COM:8080"), "/v2/x"), Some("site-v2"));
        assert_eq!(name(Some("example.com"), "/api"), Some("site"));
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn unmatched_path_finds_nothing() {
        let ups = vec![upstream("api")];
        let router = Router::build(&[route(None, "/api/", 0)], &ups, 1, None);
        assert!(router.route(Some("a"), "/other", &[]).is_none());
    }

    #[test]
    fn a_route_for_certain_clients_comes_before_the_route_for_the_rest() {
        let ups = vec![upstream("admin"), upstream("public")];
        let mut admin = route(None, "/", 0);
        admin.client_names = vec!["alice.example".into(), "ops".into()];
        let router = Router::build(&[route(None, "/", 1), admin], &ups, 1, None);
        let name = |names: &[String]| {
            router
                .route(None, "/x", names)
                .map(|t| t.upstream.name.as_str())
        };
        assert_eq!(name(&["alice.example".into()]), Some("admin"));
        assert_eq!(name(&["bob".into(), "ops".into()]), Some("admin"));
        assert_eq!(name(&["bob".into()]), Some("public"));
        assert_eq!(name(&[]), Some("public"));
    }

    #[test]
    fn a_rebuild_keeps_the_counts_of_a_route_that_stays_and_to_the_same_upstream() {
        let ups = vec![upstream("api"), upstream("site")];
        let routes = [route(None, "/api/", 0), route(Some("example.com"), "/", 1)];
        let before = Router::build(&routes, &ups, 1, None);
        before
            .route(None, "/api/x", &[])
            .unwrap()
            .requests
            .record(Some(200));
        before
            .route(Some("example.com"), "/", &[])
            .unwrap()
            .requests
            .record(Some(200));
        // The same routes in another order, the second now to another upstream, and one new.
        let changed = [
            route(Some("example.com"), "/", 0),
            route(None, "/api/", 0),
            route(None, "/new/", 1),
        ];
        let after = Router::build(&changed, &ups, 1, Some((&routes, &before)));
        let counted: Vec<u64> = after
            .targets()
            .iter()
            .map(|t| t.requests.totals().iter().sum())
            .collect();
        assert_eq!(counted, [0, 1, 0]);
        assert!(Arc::ptr_eq(
            &after.targets()[1].requests,
            &before.targets()[0].requests
        ));
    }

    #[test]
    fn labels_name_host_prefix_and_client_names() {
        assert_eq!(
            label(&route(Some("shop.example.com"), "/api/", 0)),
            "shop.example.com/api/"
        );
        assert_eq!(label(&route(None, "/", 0)), "*/");
        let mut admin = route(None, "/admin", 0);
        admin.client_names = vec!["alice.example".into(), "ops".into()];
        assert_eq!(label(&admin), "*/admin (clients: alice.example, ops)");
    }
}
