//! Routing: which upstream a request goes to, by host and longest matching path prefix, and
//! on a listener that verifies client certificates, by the names in the client's.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::RouteConfig;
use crate::upstream::Upstream;

/// The routes of one listener, indexed for lookup.
#[derive(Debug, Default)]
pub struct Router {
    /// Rules for a named host, longest prefix first.
    by_host: HashMap<Box<str>, Vec<Rule>>,
    /// Rules without a host, longest prefix first; used when no host rule matches.
    any_host: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    prefix: Box<str>,
    /// The rule takes only clients whose verified certificate has one of these names;
    /// empty: any client.
    client_names: Box<[Box<str>]>,
    upstream: Arc<Upstream>,
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
    pub fn build(routes: &[RouteConfig], upstreams: &[Arc<Upstream>]) -> Self {
        let mut router = Router::default();
        for route in routes {
            let rule = Rule {
                prefix: route.path_prefix.as_str().into(),
                client_names: route
                    .client_names
                    .iter()
                    .map(|n| n.as_str().into())
                    .collect(),
                upstream: upstreams[route.upstream].clone(),
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

    /// The upstream for a request to `host` (as sent, port and case allowed) and `path`,
    /// from a client whose verified certificate has `client_names` (none without one).
    pub fn route(
        &self,
        host: Option<&str>,
        path: &str,
        client_names: &[String],
    ) -> Option<&Arc<Upstream>> {
        if let Some(host) = host.map(strip_port)
            && !self.by_host.is_empty()
        {
            let rules = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                self.by_host.get(host.to_ascii_lowercase().as_str())
            } else {
                self.by_host.get(host)
            };
            if let Some(found) = rules.and_then(|rules| first_taker(rules, path, client_names)) {
                return Some(found);
            }
        }
        first_taker(&self.any_host, path, client_names)
    }
}

fn first_taker<'a>(
    rules: &'a [Rule],
    path: &str,
    client_names: &[String],
) -> Option<&'a Arc<Upstream>> {
    rules
        .iter()
        .find(|r| r.takes(path, client_names))
        .map(|r| &r.upstream)
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
        );
        let name = |host, path| router.route(host, path, &[]).map(|u| u.name.as_str());
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
        let router = Router::build(&[route(None, "/api/", 0)], &ups);
        assert!(router.route(Some("a"), "/other", &[]).is_none());
    }

    #[test]
    fn a_route_for_certain_clients_comes_before_the_route_for_the_rest() {
        let ups = vec![upstream("admin"), upstream("public")];
        let mut admin = route(None, "/", 0);
        admin.client_names = vec!["alice.example".into(), "ops".into()];
        let router = Router::build(&[route(None, "/", 1), admin], &ups);
        let name = |names: &[String]| router.route(None, "/x", names).map(|u| u.name.as_str());
        assert_eq!(name(&["alice.example".into()]), Some("admin"));
        assert_eq!(name(&["bob".into(), "ops".into()]), Some("admin"));
        assert_eq!(name(&["bob".into()]), Some("public"));
        assert_eq!(name(&[]), Some("public"));
    }
}
