//! Checking what makes a listener L4: `mode = "tcp"` (with routes by TLS SNI and ALPN for
//! passthrough) or `mode = "udp"`, the PROXY protocol on both sides, and the upstream
//! settings an L4 listener cannot honour.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::{Checker, DAY, file, quoted};
use crate::config::model::{
    CheckKind, HashKey, L4Route, ListenerMode, ProxyProtocolVersion, TcpMode, UdpMode,
    UpstreamConfig,
};

/// nginx's `proxy_timeout` for streams.
const TCP_IDLE: Duration = Duration::from_secs(600);
/// Long enough for a DNS client's retries, short enough that flows do not pile up.
const UDP_IDLE: Duration = Duration::from_secs(30);
const MAX_FLOWS: i64 = 10_000;
/// The most a udp listener's `responses` can be.
const MAX_RESPONSES: i64 = 1000;

/// Where an upstream's L4-relevant settings are written, for errors found only once the
/// listeners that use it are known.
#[derive(Default)]
pub(super) struct UpstreamSpans {
    pub proxy_protocol: Option<Range<usize>>,
    pub tls: Option<Range<usize>>,
    pub sticky_cookie: Option<Range<usize>>,
    pub hash_key: Option<Range<usize>>,
    pub circuit: Option<Range<usize>>,
    /// The health check table, and its `type` if written.
    pub health_check: Option<Range<usize>>,
    pub check_type: Option<Range<usize>>,
}

impl UpstreamSpans {
    pub fn of(up: &file::Upstream) -> Self {
        UpstreamSpans {
            proxy_protocol: up.proxy_protocol.as_ref().map(Spanned::span),
            tls: up.tls.as_ref().map(Spanned::span),
            sticky_cookie: up.sticky_cookie.as_ref().map(Spanned::span),
            hash_key: up.hash_key.as_ref().map(Spanned::span),
            circuit: up.max_active_requests.as_ref().map(Spanned::span),
            health_check: up.health_check.as_ref().map(Spanned::span),
            check_type: up
                .health_check
                .as_ref()
                .and_then(|c| c.get_ref().kind.as_ref().map(Spanned::span)),
        }
    }
}

/// Which kind of listener uses an upstream, and the first of each by name.
#[derive(Default)]
pub(super) struct Users {
    pub http: Option<String>,
    pub tcp: Option<String>,
    pub udp: Option<String>,
}

impl Checker {
    /// The listener's `mode`; `None` when it names none of them (an error is recorded).
    pub(super) fn mode_name(&mut self, mode: Option<&Spanned<String>>) -> Option<&'static str> {
        match mode.map(|m| m.get_ref().as_str()) {
            None | Some("http") => Some("http"),
            Some("tcp") => Some("tcp"),
            Some("udp") => Some("udp"),
            Some(other) => {
                let span = mode.map(Spanned::span).unwrap_or_default();
                self.error(
                    span,
                    format!(
                        "unknown listener mode `{other}`: expected \"http\", \"tcp\" or \"udp\""
                    ),
                );
                None
            }
        }
    }

    /// An HTTP listener's settings that only L4 listeners take are errors.
    pub(super) fn no_l4_keys(&mut self, listener: &file::Listener) {
        let keys = [
            ("upstream", listener.upstream.as_ref().map(Spanned::span)),
            (
                "idle_timeout",
                listener.idle_timeout.as_ref().map(Spanned::span),
            ),
            ("max_flows", listener.max_flows.as_ref().map(Spanned::span)),
            ("responses", listener.responses.as_ref().map(Spanned::span)),
        ];
        for (key, span) in keys {
            if let Some(span) = span {
                let hint = match key {
                    "upstream" => " (an http listener routes with [[listeners.NAME.routes]])",
                    "idle_timeout" => " (an http listener's is timeouts.client_idle)",
                    _ => "",
                };
                let modes = match key {
                    "max_flows" | "responses" => "mode = \"udp\"",
                    _ => "mode = \"tcp\" and \"udp\"",
                };
                self.error(span, format!("{key} applies to {modes} listeners{hint}"));
            }
        }
        for route in &listener.routes {
            let route = route.get_ref();
            for (key, value) in [("sni", &route.sni), ("alpn", &route.alpn)] {
                if let Some(value) = value {
                    self.error(value.span(), format!("{key} routes a TLS connection passed through untouched: it applies to mode = \"tcp\" listeners (an http listener routes by host)"));
                }
            }
        }
    }

    /// A `mode = "tcp"` or `"udp"` listener's settings. HTTP settings on it are errors.
    pub(super) fn l4_mode(
        &mut self,
        name: &str,
        mode: &str,
        listener: &mut file::Listener,
        listener_span: Range<usize>,
        upstreams: &HashMap<String, usize>,
    ) -> Option<ListenerMode> {
        let http_keys = [
            ("tls", listener.tls.as_ref().map(Spanned::span)),
            (
                "redirect_to_https",
                listener.redirect_to_https.as_ref().map(Spanned::span),
            ),
            (
                "https_port",
                listener.https_port.as_ref().map(Spanned::span),
            ),
            ("hsts", listener.hsts.as_ref().map(Spanned::span)),
        ];
        for (key, span) in http_keys {
            if let Some(span) = span {
                let hint = if key == "tls" {
                    " (a tcp listener passes TLS through untouched: route it by sni)"
                } else {
                    ""
                };
                self.error(
                    span,
                    format!("{key} applies to http listeners, not to mode = \"{mode}\"{hint}"),
                );
            }
        }
        let upstream = listener
            .upstream
            .as_ref()
            .and_then(|u| self.upstream_named(u, upstreams));
        if mode == "udp" {
            let udp_only = [
                ("routes", listener.routes.first().map(Spanned::span)),
                (
                    "proxy_protocol_from",
                    listener.proxy_protocol_from.as_ref().map(Spanned::span),
                ),
                (
                    "max_connections",
                    listener.max_connections.as_ref().map(Spanned::span),
                ),
                (
                    "defer_accept",
                    listener.defer_accept.as_ref().map(Spanned::span),
                ),
            ];
            for (key, span) in udp_only {
                if let Some(span) = span {
                    let hint = match key {
                        "routes" => ": a udp listener sends every flow to its upstream",
                        "max_connections" => ": a udp listener's limit is max_flows",
                        _ => "",
                    };
                    self.error(
                        span,
                        format!("{key} does not apply to mode = \"udp\" listeners{hint}"),
                    );
                }
            }
            if listener.upstream.is_none() {
                self.error(listener_span, format!("listener `{name}` (mode = \"udp\") has no upstream: set upstream = \"NAME\""));
            }
            let idle_timeout = self.duration(
                listener.idle_timeout.as_ref(),
                "idle_timeout",
                Duration::from_millis(10)..=DAY,
                UDP_IDLE,
            );
            let max_flows = self.int(
                listener.max_flows.as_ref(),
                "max_flows",
                1,
                1_000_000,
                MAX_FLOWS,
            ) as usize;
            let responses = listener.responses.as_ref().map(|responses| {
                self.int(Some(responses), "responses", 1, MAX_RESPONSES, 1) as u32
            });
            return Some(ListenerMode::Udp(UdpMode {
                upstream: upstream?,
                idle_timeout,
                max_flows,
                responses,
            }));
        }
        if let Some(flows) = &listener.max_flows {
            self.error(
                flows.span(),
                "max_flows applies to mode = \"udp\" listeners: a tcp listener's limit is max_connections",
            );
        }
        if let Some(responses) = &listener.responses {
            self.error(
                responses.span(),
                "responses applies to mode = \"udp\" listeners: the datagrams a server sends in answer to each of a client's",
            );
        }
        let idle_timeout = self.duration(
            listener.idle_timeout.as_ref(),
            "idle_timeout",
            Duration::from_secs(1)..=7 * DAY,
            TCP_IDLE,
        );
        let mut routes = Vec::new();
        // The first route with neither sni nor alpn: it takes every connection.
        let mut catch_all: Option<Range<usize>> = None;
        for route in std::mem::take(&mut listener.routes) {
            let span = route.span();
            let route = route.into_inner();
            let http_keys = [
                ("host", route.host.as_ref().map(Spanned::span)),
                ("path_prefix", route.path_prefix.as_ref().map(Spanned::span)),
                (
                    "client_names",
                    route.client_names.as_ref().map(Spanned::span),
                ),
            ];
            for (key, at) in http_keys {
                if let Some(at) = at {
                    self.error(at, format!("{key} routes HTTP requests: a mode = \"tcp\" listener routes by sni and alpn"));
                }
            }
            if catch_all.is_some() {
                self.error(span.clone(), format!("listener `{name}` has a route after one with neither sni nor alpn, which takes every connection first: put the catch-all last, or use upstream = \"NAME\""));
            }
            let sni = route.sni.as_ref().map_or_else(Vec::new, |names| {
                if names.get_ref().is_empty() {
                    self.error(
                        names.span(),
                        "sni is empty: list the server names this route takes, or leave it out",
                    );
                }
                names
                    .get_ref()
                    .iter()
                    .filter_map(|n| self.sni_pattern(n))
                    .collect()
            });
            let alpn = route.alpn.as_ref().map_or_else(Vec::new, |protocols| {
                if protocols.get_ref().is_empty() {
                    self.error(
                        protocols.span(),
                        "alpn is empty: list the protocols this route takes, or leave it out",
                    );
                }
                protocols
                    .get_ref()
                    .iter()
                    .filter_map(|p| {
                        let text = p.get_ref();
                        if text.is_empty() || text.len() > 255 {
                            self.error(
                                p.span(),
                                format!("alpn protocol `{text}` must hold 1 to 255 bytes"),
                            );
                            None
                        } else {
                            Some(text.as_bytes().to_vec())
                        }
                    })
                    .collect()
            });
            if sni.is_empty() && alpn.is_empty() && catch_all.is_none() {
                catch_all = Some(span);
            }
            if let Some(upstream) = self.upstream_named(&route.upstream, upstreams) {
                routes.push(L4Route {
                    sni,
                    alpn,
                    upstream,
                });
            }
        }
        let tls_passthrough = routes
            .iter()
            .any(|r| !r.sni.is_empty() || !r.alpn.is_empty());
        match (upstream, &listener.upstream) {
            (Some(upstream), _) => {
                if let (Some(_), Some(at)) = (&catch_all, &listener.upstream) {
                    self.error(at.span(), format!("listener `{name}` has a route that takes every connection already, so upstream = \"{}\" is never used", at.get_ref()));
                }
                routes.push(L4Route {
                    sni: Vec::new(),
                    alpn: Vec::new(),
                    upstream,
                });
            }
            (None, Some(_)) => {}
            (None, None) if routes.is_empty() && catch_all.is_none() => {
                self.error(listener_span, format!("listener `{name}` (mode = \"tcp\") has no upstream: set upstream = \"NAME\", or add [[listeners.{name}.routes]] with sni and upstream"));
            }
            (None, None) => {}
        }
        Some(ListenerMode::Tcp(TcpMode {
            routes,
            tls_passthrough,
            idle_timeout,
        }))
    }

    /// A server name an `sni` route matches: exact, or `*.` and a domain.
    fn sni_pattern(&mut self, name: &Spanned<String>) -> Option<String> {
        let text = name.get_ref();
        let bare = text.strip_prefix("*.").unwrap_or(text);
        let valid = !bare.is_empty()
            && bare.len() <= 253
            && bare
                .split('.')
                .all(|label| !label.is_empty() && label.len() <= 63)
            && bare
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if valid {
            Some(text.to_ascii_lowercase())
        } else {
            self.error(name.span(), format!("sni `{text}` is not a server name: write it like \"db.example.com\" or \"*.example.com\""));
            None
        }
    }

    fn upstream_named(
        &mut self,
        name: &Spanned<String>,
        upstreams: &HashMap<String, usize>,
    ) -> Option<usize> {
        if let Some(&i) = upstreams.get(name.get_ref()) {
            return Some(i);
        }
        let mut names: Vec<&str> = upstreams.keys().map(String::as_str).collect();
        names.sort_unstable();
        let defined = if names.is_empty() {
            "none is defined: add an [upstreams.NAME] table".to_string()
        } else {
            format!("defined: {}", quoted(&names))
        };
        self.error(
            name.span(),
            format!(
                "listener sends to upstream `{}`, which is not defined ({defined})",
                name.get_ref()
            ),
        );
        None
    }

    /// `proxy_protocol_from`: the networks whose connections open with a PROXY header.
    pub(super) fn proxy_protocol_from(
        &mut self,
        value: Option<&Spanned<Vec<Spanned<String>>>>,
    ) -> Vec<ipnet::IpNet> {
        let Some(value) = value else {
            return Vec::new();
        };
        if value.get_ref().is_empty() {
            self.error(value.span(), "proxy_protocol_from is empty: list the addresses of the proxies in front (like \"10.0.0.0/8\"), or leave it out");
        }
        value
            .get_ref()
            .iter()
            .filter_map(|item| {
                let text = item.get_ref();
                let parsed = text.parse::<ipnet::IpNet>().ok().or_else(|| {
                    text.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from)
                });
                match parsed {
                    Some(net) if net.trunc() == net => Some(net),
                    Some(net) => {
                        self.error(item.span(), format!("proxy_protocol_from `{text}` has host bits set: did you mean \"{}\"?", net.trunc()));
                        None
                    }
                    None => {
                        self.error(item.span(), format!("proxy_protocol_from `{text}` is not an address or network: write it like \"10.0.0.0/8\", \"192.0.2.7\" or \"2001:db8::/32\""));
                        None
                    }
                }
            })
            .collect()
    }

    /// An upstream's `proxy_protocol`.
    pub(super) fn proxy_protocol(
        &mut self,
        value: Option<&Spanned<String>>,
    ) -> Option<ProxyProtocolVersion> {
        let value = value?;
        match value.get_ref().as_str() {
            "v1" => Some(ProxyProtocolVersion::V1),
            "v2" => Some(ProxyProtocolVersion::V2),
            other => {
                self.error(
                    value.span(),
                    format!("proxy_protocol `{other}` is not a version: use \"v1\" or \"v2\""),
                );
                None
            }
        }
    }

    /// What an upstream sets that the listeners using it cannot do.
    pub(super) fn l4_upstream(
        &mut self,
        up: &UpstreamConfig,
        spans: &UpstreamSpans,
        users: &Users,
    ) {
        let name = &up.name;
        if let (Some(at), Some(listener)) = (&spans.proxy_protocol, &users.http) {
            self.error(at.clone(), format!("proxy_protocol is sent on connections from tcp listeners only: upstream `{name}` is used by http listener `{listener}`, whose pooled connections carry many clients"));
        }
        if let (Some(at), Some(listener)) = (&spans.proxy_protocol, &users.udp) {
            self.error(at.clone(), format!("proxy_protocol is sent on connections from tcp listeners only: upstream `{name}` is used by udp listener `{listener}`"));
        }
        let Some(l4) = users.tcp.as_ref().or(users.udp.as_ref()) else {
            return;
        };
        let mode = if users.tcp.is_some() { "tcp" } else { "udp" };
        if let Some(at) = &spans.tls {
            self.error(at.clone(), format!("upstream `{name}` is used by {mode} listener `{l4}`, which relays bytes as they are: [tls] to servers is for http listeners (a tcp listener passes TLS through untouched)"));
        }
        if let Some(at) = &spans.sticky_cookie {
            self.error(at.clone(), format!("sticky_cookie needs HTTP: upstream `{name}` is used by {mode} listener `{l4}` (balance = \"ip_hash\" or \"consistent_hash\" keeps a client on one server)"));
        }
        if let (Some(at), Some(key)) = (&spans.hash_key, &up.hash_key)
            && *key != HashKey::ClientIp
        {
            self.error(at.clone(), format!("upstream `{name}` is used by {mode} listener `{l4}`, which has no paths, headers or cookies: use hash_key = \"client_ip\""));
        }
        if let (Some(listener), Some(check)) = (&users.udp, &up.health_check)
            && check.kind == CheckKind::Http
            && users.http.is_none()
        {
            let at = spans
                .check_type
                .clone()
                .or(spans.health_check.clone())
                .unwrap_or_default();
            self.error(at, format!("upstream `{name}` serves udp listener `{listener}`: its servers answer datagrams, not HTTP (the default check type): set type = \"dns\" for DNS servers, or \"tcp\" if they also listen on TCP"));
        }
        if let Some(at) = &spans.circuit {
            self.warn(at.clone(), format!("max_active_requests limits HTTP requests: connections from {mode} listener `{l4}` to upstream `{name}` are not counted (limit them with the listener's max_connections or each server's)"));
        }
    }
}
