//! Routing: which upstream a request goes to, by host and longest matching path prefix.

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
    upstream: Arc<Upstream>,
}

impl Router {
    pub fn build(routes: &[RouteConfig], upstreams: &[Arc<Upstream>]) -> Self {
        let mut router = Router::default();
        for route in routes {
            let rule = Rule {
                prefix: route.path_prefix.as_str().into(),
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
            rules.sort_by_key(|rule| std::cmp::Reverse(rule.prefix.len()));
        }
        router
    }

    /// The upstream for a request to `host` (as sent, port and case allowed) and `path`.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Upstream>> {
        if let Some(host) = host.map(strip_port)
            && !self.by_host.is_empty()
        {
            let rules = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                self.by_host.get(host.to_ascii_lowercase().as_str())
            } else {
                self.by_host.get(host)
            };
            if let Some(found) = rules.and_then(|rules| longest_prefix(rules, path)) {
                return Some(found);
            }
        }
        longest_prefix(&self.any_host, path)
    }
}

fn longest_prefix<'a>(rules: &'a [Rule], path: &str) -> Option<&'a Arc<Upstream>> {
    rules
        .iter()
        .find(|r| path.starts_with(&*r.prefix))
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
            preserve_host: true,
            pool_max_idle_per_server: 0,
            pool_idle_timeout: Duration::from_secs(1),
            tls: None,
        };
        Arc::new(Upstream::build(&config, 1, Duration::from_secs(1), None))
    }

    fn route(host: Option<&str>, prefix: &str, upstream: usize) -> RouteConfig {
        RouteConfig {
            host: host.map(Into::into),
            path_prefix: prefix.into(),
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
        let name = |host, path| router.route(host, path).map(|u| u.name.as_str());
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
        assert!(router.route(Some("a"), "/other").is_none());
    }
}
