//! `GET /metrics`: Prometheus text exposition, made with prometheus-client.
//!
//! Nothing is recorded through prometheus-client on the request path: workers count in
//! their own shards (`upstream::stats`), and each scrape reads those counters, and the
//! servers' health and load, into a [`Scrape`] that a fresh registry encodes as a
//! collector.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use http::StatusCode;

use super::{Context, Reply};
use crate::l4::log::{Outcome, TcpTotals};
use crate::l4::udp::UdpCounts;
use crate::upstream::ResilienceStats;
use crate::upstream::stats::{CLASSES, LATENCY_BUCKETS, RequestTotals};

/// The states a server's health can be in, each a series of `fulcrum_server_state`.
const STATES: [&str; 5] = ["up", "ramping", "down", "ejected", "unreachable"];

pub fn reply(cx: &Context) -> Reply {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape::take(cx)));
    let mut text = String::new();
    match prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
        Ok(()) => Reply {
            status: StatusCode::OK,
            content_type: prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            body: text.into(),
            extra: None,
        },
        Err(e) => Reply::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics could not be encoded: {e}"),
        ),
    }
}

/// Everything one scrape shows, read at once.
#[derive(Debug, Default)]
struct Scrape {
    listeners: Vec<ListenerScrape>,
    routes: Vec<RouteScrape>,
    upstreams: Vec<UpstreamScrape>,
    /// Requests Fulcrum answered itself without a server.
    answered: RequestTotals,
    dropped_log_lines: Option<u64>,
    /// This node of the active/standby group, with `[ha]`.
    ha: Option<crate::ha::HaStatus>,
    /// `mode = "tcp"` listeners' connections and bytes, by listener name.
    tcp: Vec<(String, TcpTotals)>,
    /// `mode = "udp"` listeners' flows and datagrams, by listener name.
    udp: Vec<(String, UdpCounts)>,
}

#[derive(Debug)]
struct ListenerScrape {
    name: String,
    /// Where its requests are counted in `RequestTotals::by_listener`.
    slot: usize,
    connections_open: usize,
}

#[derive(Debug)]
struct RouteScrape {
    listener: String,
    label: String,
    upstream: String,
    /// Per class, in the order of [`CLASSES`].
    requests: [u64; CLASSES.len()],
}

#[derive(Debug)]
struct UpstreamScrape {
    name: String,
    servers: Vec<ServerScrape>,
    resilience: ResilienceStats,
}

#[derive(Debug)]
struct ServerScrape {
    address: String,
    state: &'static str,
    /// Drained or disabled by the file or the admin API: no new requests, whatever its
    /// health.
    held_back: bool,
    weight: u32,
    in_flight: usize,
    ejections: u64,
    requests: RequestTotals,
    connections_opened: u64,
    connections_reused: u64,
}

impl Scrape {
    fn take(cx: &Context) -> Scrape {
        let rt = cx.shared.load();
        let listeners = rt
            .config
            .listeners
            .iter()
            .zip(&rt.listeners)
            .map(|(l, running)| ListenerScrape {
                name: l.name.clone(),
                slot: running.slot,
                connections_open: cx.listener(running.slot).map_or(0, |(_, open)| open),
            })
            .collect();
        let routes = rt
            .config
            .listeners
            .iter()
            .zip(&rt.listeners)
            .flat_map(|(l, running)| {
                l.routes
                    .iter()
                    .zip(running.router.targets())
                    .map(|(route, target)| RouteScrape {
                        listener: l.name.clone(),
                        label: crate::router::label(route),
                        upstream: target.upstream.name.clone(),
                        requests: target.requests.totals(),
                    })
            })
            .collect();
        let upstreams = rt
            .config
            .upstreams
            .iter()
            .zip(&rt.upstreams)
            .map(|(u, running)| UpstreamScrape {
                name: u.name.clone(),
                resilience: running.resilience_stats(),
                servers: u
                    .servers
                    .iter()
                    .zip(running.servers.iter())
                    .map(|(config, server)| {
                        let health = server.health_report();
                        let (opened, reused) = server.pool.handed_out.totals();
                        ServerScrape {
                            address: server.address.to_string(),
                            state: health.state,
                            held_back: config.drain || config.disabled,
                            weight: config.weight,
                            in_flight: server.active(),
                            ejections: health.ejections,
                            requests: server.stats.totals(),
                            connections_opened: opened,
                            connections_reused: reused,
                        }
                    })
                    .collect(),
            })
            .collect();
        let tcp = rt
            .listeners
            .iter()
            .filter_map(|l| l.tcp.as_ref())
            .map(|stats| (stats.listener.to_string(), stats.totals()))
            .collect();
        let udp = rt
            .config
            .listeners
            .iter()
            .zip(&rt.listeners)
            .filter_map(|(l, running)| Some((l.name.clone(), cx.udp(running.slot)?)))
            .collect();
        Scrape {
            tcp,
            udp,
            listeners,
            routes,
            upstreams,
            answered: rt.answers.totals(),
            dropped_log_lines: crate::logging::dropped_lines(),
            ha: cx.ha.as_ref().map(|ha| ha.status()),
        }
    }

    /// `fulcrum_requests_total`: one series per listener, upstream, server and class that
    /// counted anything.
    fn requests(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "fulcrum_requests",
            "Requests by listener, upstream, server and status class (upstream and server empty: answered by Fulcrum itself without a server)",
            None,
            MetricType::Counter,
        )?;
        let served = self.upstreams.iter().flat_map(|u| {
            u.servers
                .iter()
                .map(move |s| (u.name.as_str(), s.address.as_str(), &s.requests))
        });
        for (upstream, server, totals) in std::iter::once(("", "", &self.answered)).chain(served) {
            for listener in &self.listeners {
                let Some(classes) = totals.by_listener.get(listener.slot) else {
                    continue;
                };
                for (class, &count) in CLASSES.iter().zip(classes) {
                    if count == 0 {
                        continue;
                    }
                    let labels = [
                        ("listener", listener.name.as_str()),
                        ("upstream", upstream),
                        ("server", server),
                        ("class", class),
                    ];
                    counter(&mut family, &labels, count)?;
                }
            }
        }
        Ok(())
    }

    /// `fulcrum_route_requests_total`: one series per listener, route and class that
    /// counted anything. Requests refused before routing are only in `fulcrum_requests_total`.
    fn route_requests(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "fulcrum_route_requests",
            "Requests by listener, route (host, * for any, then path prefix), upstream and status class, whatever their outcome once routed",
            None,
            MetricType::Counter,
        )?;
        for r in &self.routes {
            for (class, &count) in CLASSES.iter().zip(&r.requests) {
                if count == 0 {
                    continue;
                }
                let labels = [
                    ("listener", r.listener.as_str()),
                    ("route", r.label.as_str()),
                    ("upstream", r.upstream.as_str()),
                    ("class", class),
                ];
                counter(&mut family, &labels, count)?;
            }
        }
        Ok(())
    }

    /// `fulcrum_upstream_latency_seconds`: request durations (first byte in to last byte
    /// out) per server. Per server rather than added up per upstream, so that a server a
    /// reload or a DNS change removes takes its series away instead of making the
    /// upstream's counts go down, which Prometheus would take for a restart.
    fn latency(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "fulcrum_upstream_latency_seconds",
            "Request durations by upstream and server, from the request's head to the response's end",
            None,
            MetricType::Histogram,
        )?;
        for u in &self.upstreams {
            for s in &u.servers {
                let latency = &s.requests;
                let count = latency.latency_buckets.iter().sum();
                // Per bucket, not cumulative (the encoder adds up), with the `+Inf` bucket
                // that holds what is slower than the last bound.
                let bounds: Vec<(f64, u64)> = LATENCY_BUCKETS
                    .iter()
                    .copied()
                    .chain([f64::INFINITY])
                    .zip(latency.latency_buckets.iter().copied())
                    .collect();
                family
                    .encode_family(&[
                        ("upstream", u.name.as_str()),
                        ("server", s.address.as_str()),
                    ])?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        latency.latency_sum.as_secs_f64(),
                        count,
                        &bounds,
                        None,
                    )?;
            }
        }
        Ok(())
    }

    fn servers(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let servers = || {
            self.upstreams.iter().flat_map(|u| {
                u.servers.iter().map(move |s| {
                    (
                        [
                            ("upstream", u.name.as_str()),
                            ("server", s.address.as_str()),
                        ],
                        s,
                    )
                })
            })
        };
        let mut family = encoder.encode_descriptor(
            "fulcrum_server_up",
            "1 while the server takes new requests (up or ramping up, neither drained nor disabled), 0 otherwise",
            None,
            MetricType::Gauge,
        )?;
        for (labels, s) in servers() {
            let taking = matches!(s.state, "up" | "ramping") && !s.held_back;
            gauge(&mut family, &labels, i64::from(taking))?;
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_server_state",
            "1 for the state the server's health is in, 0 for the others; a drained or disabled server keeps its health state (fulcrum_server_up is 0 for it)",
            None,
            MetricType::Gauge,
        )?;
        for (labels, s) in servers() {
            for state in STATES {
                let [upstream, server] = labels;
                let labels = [upstream, server, ("state", state)];
                gauge(&mut family, &labels, i64::from(s.state == state))?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_server_weight",
            "The server's weight, admin changes included",
            None,
            MetricType::Gauge,
        )?;
        for (labels, s) in servers() {
            gauge(&mut family, &labels, i64::from(s.weight))?;
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_server_in_flight",
            "Requests in flight to the server",
            None,
            MetricType::Gauge,
        )?;
        for (labels, s) in servers() {
            gauge(&mut family, &labels, s.in_flight as i64)?;
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_server_ejections",
            "Times outlier detection ejected the server",
            None,
            MetricType::Counter,
        )?;
        for (labels, s) in servers() {
            counter(&mut family, &labels, s.ejections)?;
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_server_failed_tries",
            "Tries at the server that got no response (timed out, connection broken or refused), those of requests retried elsewhere included",
            None,
            MetricType::Counter,
        )?;
        for (labels, s) in servers() {
            counter(&mut family, &labels, s.requests.failed_tries)?;
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_upstream_connections",
            "Upstream connections a request used: opened for it (new) or taken from the pool (reused)",
            None,
            MetricType::Counter,
        )?;
        for (labels, s) in servers() {
            let [upstream, server] = labels;
            counter(
                &mut family,
                &[upstream, server, ("kind", "new")],
                s.connections_opened,
            )?;
            counter(
                &mut family,
                &[upstream, server, ("kind", "reused")],
                s.connections_reused,
            )?;
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_upstream_connection_reuse_ratio",
            "Share of the requests to the server that found a pooled connection",
            None,
            MetricType::Gauge,
        )?;
        for (labels, s) in servers() {
            let total = s.connections_opened + s.connections_reused;
            let ratio = if total == 0 {
                0.0
            } else {
                s.connections_reused as f64 / total as f64
            };
            ConstGauge::new(ratio).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Scrape {
    /// Retries, the retry budget and the circuit breaker, per upstream.
    fn resilience(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        type Read = fn(&ResilienceStats) -> u64;
        let counters: [(&str, &str, Read); 4] = [
            (
                "fulcrum_upstream_retries",
                "Tries after a request's first, each on another server",
                |r| r.retries,
            ),
            (
                "fulcrum_upstream_retry_budget_exhausted",
                "Failed requests not retried because the retry budget was spent",
                |r| r.budget_exhausted,
            ),
            (
                "fulcrum_upstream_queue_rejected",
                "Requests refused (503) because the circuit breaker's line was full",
                |r| r.queue_rejected,
            ),
            (
                "fulcrum_upstream_queue_timeouts",
                "Requests refused (503) after waiting out queue_timeout in the circuit breaker's line",
                |r| r.queue_timeouts,
            ),
        ];
        for (name, help, read) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for u in &self.upstreams {
                counter(
                    &mut family,
                    &[("upstream", u.name.as_str())],
                    read(&u.resilience),
                )?;
            }
        }
        let gauges: [(&str, &str, Read); 2] = [
            (
                "fulcrum_upstream_active_requests",
                "Requests in flight to the upstream",
                |r| r.active,
            ),
            (
                "fulcrum_upstream_pending_requests",
                "Requests waiting in the circuit breaker's line",
                |r| r.pending,
            ),
        ];
        for (name, help, read) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for u in &self.upstreams {
                let value = i64::try_from(read(&u.resilience)).unwrap_or(i64::MAX);
                gauge(&mut family, &[("upstream", u.name.as_str())], value)?;
            }
        }
        Ok(())
    }
}

impl Scrape {
    /// The node's role, its peers, its changes of role and the heartbeats it dropped.
    fn ha(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(ha) = &self.ha else { return Ok(()) };
        let family = encoder.encode_descriptor(
            "fulcrum_ha_active",
            "1 while this node holds the group's virtual addresses, 0 otherwise",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(ha.role == "active")).encode(family)?;
        let mut family = encoder.encode_descriptor(
            "fulcrum_ha_peer_up",
            "1 while the peer's heartbeats arrive (heard within the dead time), by its configured address",
            None,
            MetricType::Gauge,
        )?;
        for peer in &ha.peers {
            let address = peer.address.to_string();
            gauge(
                &mut family,
                &[("peer", address.as_str())],
                i64::from(peer.alive),
            )?;
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_ha_transitions",
            "Changes of this node's role, by the role taken and why",
            None,
            MetricType::Counter,
        )?;
        for t in &ha.transitions_by {
            counter(&mut family, &[("to", t.to), ("reason", t.reason)], t.count)?;
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_ha_heartbeats_dropped",
            "Heartbeat datagrams dropped: malformed, unauthenticated (wrong key), of another group, from an address not in peers, replayed, or naming this node",
            None,
            MetricType::Counter,
        )?;
        for (&reason, &count) in &ha.heartbeats_dropped {
            counter(&mut family, &[("reason", reason)], count)?;
        }
        Ok(())
    }
}

impl Scrape {
    /// `mode = "tcp"` listeners: connections by how they ended, and bytes each way. Their
    /// servers' open tunnels are in `fulcrum_server_in_flight`.
    fn tcp(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.tcp.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_tcp_connections",
            "Connections of tcp listeners that ended, by listener and how: closed, client_reset, server_reset, idle_timeout, failed, refused_proxy_header, bad_proxy_header, not_tls, no_route, connect_failed, shutdown",
            None,
            MetricType::Counter,
        )?;
        for (listener, totals) in &self.tcp {
            for (outcome, &count) in Outcome::ALL.iter().zip(&totals.outcomes) {
                let labels = [("listener", listener.as_str()), ("outcome", outcome.name())];
                counter(&mut family, &labels, count)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_tcp_bytes",
            "Bytes relayed by tcp listeners, by listener and direction (from_client: to the servers), counted as each connection ends",
            None,
            MetricType::Counter,
        )?;
        for (listener, totals) in &self.tcp {
            let listener = ("listener", listener.as_str());
            counter(
                &mut family,
                &[listener, ("direction", "from_client")],
                totals.from_client,
            )?;
            counter(
                &mut family,
                &[listener, ("direction", "from_server")],
                totals.from_server,
            )?;
        }
        Ok(())
    }
}

impl Scrape {
    /// `mode = "udp"` listeners: flows, datagrams and bytes each way, and what was dropped.
    fn udp(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.udp.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_udp_flows_open",
            "Flows (client address and port) open now, by udp listener",
            None,
            MetricType::Gauge,
        )?;
        for (listener, c) in &self.udp {
            let value = i64::try_from(c.flows_open).unwrap_or(i64::MAX);
            gauge(&mut family, &[("listener", listener.as_str())], value)?;
        }
        type Read = fn(&UdpCounts) -> u64;
        let mut family = encoder.encode_descriptor(
            "fulcrum_udp_flows_started",
            "Flows started, by udp listener",
            None,
            MetricType::Counter,
        )?;
        for (listener, c) in &self.udp {
            counter(
                &mut family,
                &[("listener", listener.as_str())],
                c.flows_started,
            )?;
        }
        let by_direction: [(&str, &str, Read, Read); 2] = [
            (
                "fulcrum_udp_datagrams",
                "Datagrams relayed, by udp listener and direction (from_clients: to the servers)",
                |c| c.datagrams_from_clients,
                |c| c.datagrams_from_servers,
            ),
            (
                "fulcrum_udp_bytes",
                "Payload bytes relayed, by udp listener and direction (from_clients: to the servers)",
                |c| c.bytes_from_clients,
                |c| c.bytes_from_servers,
            ),
        ];
        for (name, help, from_clients, from_servers) in by_direction {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (listener, c) in &self.udp {
                let listener = ("listener", listener.as_str());
                counter(
                    &mut family,
                    &[listener, ("direction", "from_clients")],
                    from_clients(c),
                )?;
                counter(
                    &mut family,
                    &[listener, ("direction", "from_servers")],
                    from_servers(c),
                )?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_udp_dropped",
            "Datagrams dropped, by udp listener and reason: max_flows (it would have started a flow past the cap), other (no server, a full socket buffer, an HA switchover's pause, a failed send)",
            None,
            MetricType::Counter,
        )?;
        for (listener, c) in &self.udp {
            let listener = ("listener", listener.as_str());
            counter(
                &mut family,
                &[listener, ("reason", "max_flows")],
                c.dropped_at_cap,
            )?;
            counter(&mut family, &[listener, ("reason", "other")], c.dropped)?;
        }
        let mut family = encoder.encode_descriptor(
            "fulcrum_udp_servers_unreachable",
            "Flows ended because their server answered with ICMP port unreachable, by udp listener",
            None,
            MetricType::Counter,
        )?;
        for (listener, c) in &self.udp {
            counter(
                &mut family,
                &[("listener", listener.as_str())],
                c.servers_unreachable,
            )?;
        }
        Ok(())
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.requests(&mut encoder)?;
        self.route_requests(&mut encoder)?;
        self.latency(&mut encoder)?;
        let mut family = encoder.encode_descriptor(
            "fulcrum_connections_open",
            "Client connections open, by listener",
            None,
            MetricType::Gauge,
        )?;
        for l in &self.listeners {
            gauge(
                &mut family,
                &[("listener", l.name.as_str())],
                l.connections_open as i64,
            )?;
        }
        self.servers(&mut encoder)?;
        self.tcp(&mut encoder)?;
        self.udp(&mut encoder)?;
        self.resilience(&mut encoder)?;
        self.ha(&mut encoder)?;
        // Only where the access log is written through `logging::init` (not in-process
        // embedding, which sets up its own logging).
        if let Some(dropped) = self.dropped_log_lines {
            let family = encoder.encode_descriptor(
                "fulcrum_access_log_dropped_lines",
                "Access log lines dropped because stdout did not keep up",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(dropped).encode(family)?;
        }
        Ok(())
    }
}

fn counter(
    family: &mut prometheus_client::encoding::MetricEncoder,
    labels: &impl EncodeLabelSet,
    value: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(family.encode_family(labels)?)
}

fn gauge(
    family: &mut prometheus_client::encoding::MetricEncoder,
    labels: &impl EncodeLabelSet,
    value: i64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(family.encode_family(labels)?)
}
