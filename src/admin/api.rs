//! The admin API's JSON: the running state (`/api/status`), the effective config
//! (`/api/config`, secrets left out), the run-time changes to a server, and the HA
//! switchover, each made
//! through `Shared::update` so that it lasts until the next reload.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Context, Reply};
use crate::config::{
    BalanceKind, CheckKind, ClientAuth, Config, HashKey, HealthCheck, ListenerMode,
    OutlierDetection, ProxyProtocolVersion, ResilienceConfig, ServerConfig, TlsVersion,
};
use crate::runtime::{Inputs, Runtime, ServerOverride};
use crate::upstream::stats::SERVER_ERROR;
use crate::upstream::{HealthReport, Server};

/// What the status says about run-time changes.
const UNTIL: &str = "next reload";
const NOTE: &str = "changes made through the admin API (overrides) last until the next reload";

/// Requests, 5xx answers and failed tries per server (by upstream name and address) at
/// one moment.
pub type Sample = HashMap<(String, SocketAddr), Counts>;

/// The last two samples of request counts: the older one, 10 to 20 seconds old, is what
/// "recent" counts from.
#[derive(Default)]
pub struct RecentWindow {
    samples: VecDeque<(Instant, Sample)>,
}

impl RecentWindow {
    pub fn push(&mut self, at: Instant, sample: Sample) {
        self.samples.push_back((at, sample));
        while self.samples.len() > 2 {
            self.samples.pop_front();
        }
    }

    /// Counts of a server since the older sample, and how long ago that was; with no
    /// sample of it yet, everything since it was counted from.
    fn since(&self, key: &(String, SocketAddr), now: Counts) -> Recent {
        let base = self
            .samples
            .front()
            .and_then(|(at, sample)| Some((at, sample.get(key)?)));
        let (seconds, counts) = match base {
            // Counts that went down belong to a server made anew (its settings changed):
            // everything it counted is recent.
            Some((at, then))
                if then.requests <= now.requests
                    && then.errors <= now.errors
                    && then.failed_tries <= now.failed_tries =>
            {
                (
                    Some(at.elapsed().as_secs_f64()),
                    Counts {
                        requests: now.requests - then.requests,
                        errors: now.errors - then.errors,
                        failed_tries: now.failed_tries - then.failed_tries,
                    },
                )
            }
            _ => (None, now),
        };
        let tries = counts.requests + counts.failed_tries;
        Recent {
            seconds,
            requests: counts.requests,
            errors: counts.errors,
            failed_tries: counts.failed_tries,
            tries,
            error_rate: if tries == 0 {
                0.0
            } else {
                (counts.errors + counts.failed_tries) as f64 / tries as f64
            },
        }
    }
}

/// What the recent rates are worked out from, for one server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counts {
    requests: u64,
    errors: u64,
    failed_tries: u64,
}

impl Counts {
    fn of(server: &Server) -> Counts {
        let totals = server.stats.totals();
        Counts {
            requests: totals.requests(),
            errors: totals.errors(),
            failed_tries: totals.failed_tries,
        }
    }
}

/// Every server's request and error counts now.
pub fn sample(rt: &Runtime) -> Sample {
    let mut sample = HashMap::new();
    for upstream in &rt.upstreams {
        for server in upstream.servers.iter() {
            sample.insert((upstream.name.clone(), server.address), Counts::of(server));
        }
    }
    sample
}

#[derive(Serialize)]
struct Recent {
    /// The window's length; `null`: since the server was first counted.
    seconds: Option<f64>,
    requests: u64,
    /// 5xx answers, the server's own or Fulcrum's for it (a timeout, a broken response).
    errors: u64,
    /// Tries that got no response (see `ServerView::failed_tries`).
    failed_tries: u64,
    /// Requests and failed tries: everything sent to the server.
    tries: u64,
    /// Errors and failed tries over tries.
    error_rate: f64,
}

#[derive(Serialize)]
struct ServerView {
    address: SocketAddr,
    weight: u32,
    backup: bool,
    drain: bool,
    disabled: bool,
    health: HealthReport,
    in_flight: usize,
    /// The recent response time `least_time` balances on, decaying while none arrive.
    latency_ms: f64,
    /// Since the server was added (or its connection settings last changed).
    requests: u64,
    errors: u64,
    /// Tries that timed out, broke or could not connect, including those of requests
    /// retried on another server (which count as that server's requests).
    failed_tries: u64,
    recent: Recent,
    connections: Connections,
}

#[derive(Serialize)]
struct Connections {
    opened: u64,
    reused: u64,
}

fn server_view(
    upstream: &str,
    config: &ServerConfig,
    server: &Server,
    recent: &RecentWindow,
) -> ServerView {
    let counts = Counts::of(server);
    let (opened, reused) = server.pool.handed_out.totals();
    ServerView {
        address: server.address,
        weight: config.weight,
        backup: config.backup,
        drain: config.drain,
        disabled: config.disabled,
        health: server.health_report(),
        in_flight: server.active(),
        latency_ms: (server.latency().as_secs_f64() * 1e6).round() / 1e3,
        requests: counts.requests,
        errors: counts.errors,
        failed_tries: counts.failed_tries,
        recent: recent.since(&(upstream.to_string(), server.address), counts),
        connections: Connections { opened, reused },
    }
}

pub fn balance_name(kind: BalanceKind) -> &'static str {
    BalanceKind::ALL
        .iter()
        .find(|(_, k)| *k == kind)
        .map_or("?", |(name, _)| name)
}

/// `GET /api/status`.
pub fn status(cx: &Context, recent: &RecentWindow) -> Value {
    let rt = cx.shared.load();
    let config = &rt.config;
    let listeners: Vec<Value> = config
        .listeners
        .iter()
        .zip(&rt.listeners)
        .map(|(l, running)| {
            let (bind, open) = cx.listener(running.slot).unwrap_or((l.bind, 0));
            let routes: Vec<Value> = l
                .routes
                .iter()
                .zip(running.router.targets())
                .map(|(r, target)| {
                    let classes = target.requests.totals();
                    json!({
                        "host": r.host,
                        "path_prefix": r.path_prefix,
                        "client_names": r.client_names,
                        "upstream": config.upstreams[r.upstream].name,
                        // Since the route was added (or last sent to another upstream).
                        "requests": classes.iter().sum::<u64>(),
                        "errors": classes[SERVER_ERROR],
                    })
                })
                .collect();
            let mut view = json!({
                "name": l.name,
                "mode": l.mode.name(),
                "bind": bind,
                "tls": l.tls.is_some(),
                "connections_open": open,
                "max_connections": l.max_connections,
                "routes": routes,
            });
            if let (ListenerMode::Tcp(tcp), Some(stats)) = (&l.mode, &running.tcp) {
                let totals = stats.totals();
                let outcomes: serde_json::Map<String, Value> = crate::l4::log::Outcome::ALL
                    .iter()
                    .zip(totals.outcomes)
                    .map(|(outcome, count)| (outcome.name().to_string(), json!(count)))
                    .collect();
                view["routes"] = tcp
                    .routes
                    .iter()
                    .map(|r| json!({
                        "sni": r.sni,
                        "alpn": r.alpn.iter().map(|p| String::from_utf8_lossy(p)).collect::<Vec<_>>(),
                        "upstream": config.upstreams[r.upstream].name,
                    }))
                    .collect();
                // Since the listener was bound; counted as each connection ends.
                view["connections"] = json!({
                    "total": totals.connections(),
                    "by_end": outcomes,
                    "bytes_from_clients": totals.from_client,
                    "bytes_from_servers": totals.from_server,
                });
            }
            if let Some(udp) = cx.udp(running.slot) {
                // Since the listener was bound.
                view["flows"] = json!(udp);
            }
            view
        })
        .collect();
    let upstreams: Vec<Value> = config
        .upstreams
        .iter()
        .zip(&rt.upstreams)
        .map(|(u, running)| {
            let servers: Vec<ServerView> = u
                .servers
                .iter()
                .zip(running.servers.iter())
                .map(|(s, server)| server_view(&u.name, s, server, recent))
                .collect();
            json!({
                "name": u.name,
                "balance": balance_name(u.balance),
                "servers": servers,
                "panic": running.is_panicking(),
                "resilience": running.resilience_stats(),
            })
        })
        .collect();
    let mut overrides: Vec<Value> = cx.shared.inputs(|inputs| {
        inputs
            .overrides
            .iter()
            .map(|((upstream, server), o)| {
                json!({
                    "upstream": upstream,
                    "server": server,
                    "weight": o.weight,
                    "drain": o.drain,
                    "disabled": o.disabled,
                })
            })
            .collect()
    });
    overrides.sort_by_key(|o| (o["upstream"].to_string(), o["server"].to_string()));
    let answered = rt.answers.totals();
    json!({
        // Which process answers: after a binary upgrade, the new one.
        "pid": std::process::id(),
        "listeners": listeners,
        "upstreams": upstreams,
        "fulcrum_answered": { "requests": answered.requests(), "errors": answered.errors() },
        "overrides": overrides,
        "ha": cx.ha.as_ref().map(|ha| ha.status()),
        "note": NOTE,
    })
}

/// `POST /api/ha/switchover`: hands the active role to a peer; answers once one holds it.
pub async fn switchover(cx: &Context) -> Reply {
    let Some(ha) = &cx.ha else {
        return Reply::error(
            StatusCode::NOT_FOUND,
            "this node is not in an HA group: the config has no [ha] section",
        );
    };
    match ha.switchover().await {
        Ok(peer) => Reply::json(
            StatusCode::OK,
            &json!({ "switched_over_to": peer, "ha": ha.status() }),
        ),
        Err(why) => Reply::error(StatusCode::CONFLICT, format!("no switchover: {why}")),
    }
}

/// How a server changes at run time.
enum Change {
    Drain,
    Disable,
    Enable,
    Weight(u32),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: i64,
}

/// `POST …/drain`, `/disable`, `/enable` and `PUT …/weight` on a server of an upstream.
pub fn change(
    cx: &Context,
    upstream: &str,
    server: &str,
    action: &str,
    body: Option<&[u8]>,
) -> Reply {
    let rt = cx.shared.load();
    let Some(u) = rt.config.upstreams.iter().find(|u| u.name == upstream) else {
        let names: Vec<&str> = rt
            .config
            .upstreams
            .iter()
            .map(|u| u.name.as_str())
            .collect();
        return Reply::error(
            StatusCode::NOT_FOUND,
            format!("no upstream `{upstream}` (there are: {})", names.join(", ")),
        );
    };
    let listed: Vec<String> = u.servers.iter().map(|s| s.address.to_string()).collect();
    let Some(address) = percent_decode(server)
        .and_then(|s| s.parse::<SocketAddr>().ok())
        .filter(|a| u.servers.iter().any(|s| s.address == *a))
    else {
        return Reply::error(
            StatusCode::NOT_FOUND,
            format!(
                "upstream `{upstream}` has no server {server} (it has: {})",
                listed.join(", ")
            ),
        );
    };
    let change = match (action, body) {
        ("drain", _) => Change::Drain,
        ("disable", _) => Change::Disable,
        ("enable", _) => Change::Enable,
        (_, body) => match serde_json::from_slice::<WeightBody>(body.unwrap_or_default()) {
            Ok(WeightBody { weight }) if (1..=1000).contains(&weight) => {
                Change::Weight(weight as u32)
            }
            Ok(WeightBody { weight }) => {
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    format!("weight = {weight} is out of range: allowed 1 to 1000"),
                );
            }
            Err(e) => {
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    format!("the body must be {{\"weight\": N}} with N from 1 to 1000: {e}"),
                );
            }
        },
    };
    let key = (upstream.to_string(), address);
    let updated = cx.shared.update(|inputs| {
        let file = file_settings(inputs, &key);
        let o = inputs.overrides.entry(key.clone()).or_default();
        match change {
            Change::Drain => o.drain = Some(true),
            Change::Disable => o.disabled = Some(true),
            Change::Enable => {
                o.drain = Some(false);
                o.disabled = Some(false);
            }
            Change::Weight(weight) => o.weight = Some(weight),
        }
        // What only restates the file is no change, and is not listed as one.
        if let Some(file) = file {
            o.weight = o.weight.filter(|&w| w != file.weight);
            o.drain = o.drain.filter(|&d| d != file.drain);
            o.disabled = o.disabled.filter(|&d| d != file.disabled);
        }
        if *o == ServerOverride::default() {
            inputs.overrides.remove(&key);
        }
    });
    if let Err(e) = updated {
        return Reply::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the change could not be applied: {e}"),
        );
    }
    tracing::info!(upstream, server = %address, action, "admin API: server changed until the next reload");
    let rt = cx.shared.load();
    let found = rt
        .config
        .upstreams
        .iter()
        .zip(&rt.upstreams)
        .find(|(u, _)| u.name == upstream)
        .and_then(|(u, running)| {
            let i = u.servers.iter().position(|s| s.address == address)?;
            Some((&u.servers[i], &running.servers[i]))
        });
    match found {
        Some((config, server)) => {
            let recent = super::lock(&cx.recent);
            let view = server_view(upstream, config, server, &recent);
            Reply::json(
                StatusCode::OK,
                &json!({ "upstream": upstream, "server": view, "until": UNTIL }),
            )
        }
        // A reload removed it in the meantime.
        None => Reply::error(
            StatusCode::NOT_FOUND,
            format!("upstream `{upstream}` no longer has server {address}"),
        ),
    }
}

/// Server `key` as the file sets it (a named server's addresses included), without the
/// admin API's changes.
fn file_settings(inputs: &Inputs, key: &(String, SocketAddr)) -> Option<ServerConfig> {
    let mut file = inputs.file.clone();
    crate::discovery::dns::expand(&mut file, &inputs.resolved);
    let upstream = file.upstreams.into_iter().find(|u| u.name == key.0)?;
    upstream.servers.into_iter().find(|s| s.address == key.1)
}

/// `text` with `%XX` escapes decoded (an IPv6 address's brackets and colons may come
/// escaped); `None` if an escape is broken or the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// `GET /api/config`: the config the runtime was built from, defaults filled in, admin
/// changes applied and the addresses named servers last resolved to listed among the
/// servers; secrets (sticky secret, keys, the admin token) are left out.
pub fn config(c: &Config) -> Value {
    let listeners: Vec<Value> = c
        .listeners
        .iter()
        .map(|l| {
            let tls = l.tls.as_ref().map(|t| {
                let (client_auth, client_ca) = match &t.client_auth {
                    ClientAuth::Off => ("off", None),
                    ClientAuth::Optional(ca) => ("optional", Some(&ca.path)),
                    ClientAuth::Required(ca) => ("required", Some(&ca.path)),
                };
                json!({
                    "certificates": t.certificates.iter().map(|cert| json!({
                        "cert": cert.cert,
                        "key": cert.key,
                        "ocsp": cert.ocsp,
                        "names": cert.loaded.names,
                    })).collect::<Vec<_>>(),
                    "min_version": match t.min_version { TlsVersion::V1_2 => "1.2", TlsVersion::V1_3 => "1.3" },
                    "alpn": t.alpn.iter().map(|p| String::from_utf8_lossy(p)).collect::<Vec<_>>(),
                    "session_tickets": t.session_tickets,
                    "session_cache": t.session_cache,
                    "client_auth": client_auth,
                    "client_ca": client_ca,
                    "client_cert_header": t.client_cert_header.as_str(),
                })
            });
            let proxy_protocol_from: Vec<String> =
                l.proxy_protocol_from.iter().map(ToString::to_string).collect();
            match &l.mode {
                ListenerMode::Http => json!({
                    "name": l.name,
                    "mode": l.mode.name(),
                    "bind": l.bind,
                    "max_connections": l.max_connections,
                    "defer_accept": l.defer_accept,
                    "redirect_to_https": l.redirect_to_https,
                    "hsts": l.hsts.as_ref().and_then(|h| h.to_str().ok()),
                    "tls": tls,
                    "proxy_protocol_from": proxy_protocol_from,
                    "routes": l.routes.iter().map(|r| json!({
                        "host": r.host,
                        "path_prefix": r.path_prefix,
                        "client_names": r.client_names,
                        "upstream": c.upstreams[r.upstream].name,
                    })).collect::<Vec<_>>(),
                }),
                ListenerMode::Tcp(tcp) => json!({
                    "name": l.name,
                    "mode": l.mode.name(),
                    "bind": l.bind,
                    "max_connections": l.max_connections,
                    "defer_accept": l.defer_accept,
                    "idle_timeout": duration(tcp.idle_timeout),
                    "tls_passthrough": tcp.tls_passthrough,
                    "proxy_protocol_from": proxy_protocol_from,
                    // In order; the listener's `upstream` is the last, taking everything.
                    "routes": tcp.routes.iter().map(|r| json!({
                        "sni": r.sni,
                        "alpn": r.alpn.iter().map(|p| String::from_utf8_lossy(p)).collect::<Vec<_>>(),
                        "upstream": c.upstreams[r.upstream].name,
                    })).collect::<Vec<_>>(),
                }),
                ListenerMode::Udp(udp) => json!({
                    "name": l.name,
                    "mode": l.mode.name(),
                    "bind": l.bind,
                    "upstream": c.upstreams[udp.upstream].name,
                    "idle_timeout": duration(udp.idle_timeout),
                    "max_flows": udp.max_flows,
                    "responses": udp.responses,
                }),
            }
        })
        .collect();
    let upstreams: Vec<Value> = c
        .upstreams
        .iter()
        .map(|u| {
            json!({
                "name": u.name,
                "balance": balance_name(u.balance),
                "hash_key": u.hash_key.as_ref().map(|k| match k {
                    HashKey::ClientIp => "client_ip".to_string(),
                    HashKey::Path => "path".to_string(),
                    HashKey::Header(name) => format!("header:{name}"),
                    HashKey::Cookie(name) => format!("cookie:{name}"),
                }),
                "sticky_cookie": u.sticky_cookie,
                "sticky_secret": if u.sticky_secret.is_some() { "(set, hidden)" } else { "(random per process)" },
                "latency_decay": duration(u.latency_decay),
                "slow_start": duration(u.slow_start),
                "fail_timeout": duration(u.fail_timeout),
                "preserve_host": u.preserve_host,
                "pool_max_idle_per_server": u.pool_max_idle_per_server,
                "pool_idle_timeout": duration(u.pool_idle_timeout),
                "tls": u.tls.as_ref().map(|t| json!({
                    "ca": t.ca.as_ref().map_or_else(|| "(system roots)".into(), |ca| ca.path.display().to_string()),
                    "server_name": t.server_name,
                    "client_cert": t.client_cert.is_some(),
                    "insecure_skip_verify": t.insecure_skip_verify,
                })),
                "servers": u.servers.iter().map(|s| json!({
                    "address": s.address,
                    "weight": s.weight,
                    "backup": s.backup,
                    "drain": s.drain,
                    "disabled": s.disabled,
                    "max_connections": s.max_connections,
                })).collect::<Vec<_>>(),
                // Each stands for the servers above at the addresses its name resolved to.
                "named": u.named.iter().map(|n| json!({
                    "address": n.name,
                    "weight": n.weight,
                    "backup": n.backup,
                    "drain": n.drain,
                    "max_connections": n.max_connections,
                })).collect::<Vec<_>>(),
                "health_check": u.health_check.as_ref().map(health_check),
                "outlier_detection": outlier_detection(&u.outlier_detection),
                "panic_threshold": u.panic_threshold,
                "resilience": resilience(&u.resilience),
                "proxy_protocol": u.proxy_protocol.map(|v| match v {
                    ProxyProtocolVersion::V1 => "v1",
                    ProxyProtocolVersion::V2 => "v2",
                }),
            })
        })
        .collect();
    let t = &c.timeouts;
    json!({
        "workers": c.workers,
        "listeners": listeners,
        "upstreams": upstreams,
        "timeouts": {
            "client_header": duration(t.client_header),
            "client_idle": duration(t.client_idle),
            "upstream_connect": duration(t.upstream_connect),
            "upstream_response_header": duration(t.upstream_response_header),
            "upstream_idle": duration(t.upstream_idle),
            "shutdown_grace": duration(t.shutdown_grace),
            "tls_handshake": duration(t.tls_handshake),
        },
        "limits": {
            "max_header_bytes": c.limits.max_header_bytes,
            "max_headers": c.limits.max_headers,
            "max_uri_bytes": c.limits.max_uri_bytes,
            "max_body_bytes": c.limits.max_body_bytes,
        },
        "http2": {
            "max_concurrent_streams": c.http2.max_concurrent_streams,
            "max_header_list_bytes": c.http2.max_header_list_bytes,
            "max_pending_resets": c.http2.max_pending_resets,
        },
        "access_log": {
            "enabled": c.access_log.enabled,
            "format": match c.access_log.format { crate::config::LogFormat::Text => "text", crate::config::LogFormat::Json => "json" },
        },
        "dns": {
            "nameservers": c.dns.nameservers,
            "min_ttl": duration(c.dns.min_ttl),
            "max_ttl": duration(c.dns.max_ttl),
            "timeout": duration(c.dns.timeout),
        },
        "admin": c.admin.as_ref().map(|a| json!({
            "bind": a.bind,
            "token_file": a.token_file,
            "changes_allowed": a.token.is_some(),
        })),
        "control": c.control.as_ref().map(|control| json!({ "socket": control.socket })),
        "ha": c.ha.as_ref().map(|h| json!({
            "node": h.node,
            "priority": h.priority,
            "group": h.group,
            "bind": h.bind,
            "peers": h.peers,
            "key_file": h.key_file,
            "key": "(set, hidden)",
            "interface": h.interface,
            "virtual_addresses": h.virtual_addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "heartbeat_interval": duration(h.heartbeat_interval),
            "dead_after": h.dead_after,
            "preempt": h.preempt,
            "reach": h.reach,
            "reach_upstreams": h.reach_upstreams,
        })),
    })
}

/// `POST /api/reload`: the config file read again and applied by the run loop, as SIGHUP
/// and `fulcrum reload` have it done; 400 with every error when the file is not good.
pub async fn reload(cx: &Context) -> Reply {
    const STOPPING: &str = "Fulcrum is shutting down: the config was not reloaded";
    let Some(requests) = cx.control.get() else {
        return Reply::error(
            StatusCode::CONFLICT,
            "this Fulcrum was not started with a config file (the demo): there is nothing to reload",
        );
    };
    let (reply_to, reply) = tokio::sync::oneshot::channel();
    if requests
        .send((crate::control::Request::Reload, reply_to))
        .await
        .is_err()
    {
        return Reply::error(StatusCode::SERVICE_UNAVAILABLE, STOPPING);
    }
    match reply.await {
        Ok(reply) if reply.ok => Reply::json(
            StatusCode::OK,
            &json!({ "reloaded": true, "message": reply.message }),
        ),
        Ok(reply) => Reply::json(
            StatusCode::BAD_REQUEST,
            &json!({ "reloaded": false, "error": reply.message }),
        ),
        Err(_) => Reply::error(StatusCode::SERVICE_UNAVAILABLE, STOPPING),
    }
}

/// An upstream's `health_check`; the keys of an HTTP check only on one.
fn health_check(h: &HealthCheck) -> Value {
    let mut view = json!({
        "type": match h.kind { CheckKind::Http => "http", CheckKind::Tcp => "tcp", CheckKind::Dns => "dns" },
        "interval": duration(h.interval),
        "timeout": duration(h.timeout),
        "jitter": duration(h.jitter),
        "rise": h.rise,
        "fall": h.fall,
    });
    if h.kind == CheckKind::Http {
        let http = json!({
            "method": h.method.as_str(),
            "path": h.path,
            "host": h.host,
            "expect_status": h.expect_status.iter().map(|&(low, high)| {
                if low == high { low.to_string() } else { format!("{low}-{high}") }
            }).collect::<Vec<_>>(),
            "expect_body": h.expect_body,
        });
        if let (Value::Object(view), Value::Object(http)) = (&mut view, http) {
            view.extend(http);
        }
    }
    view
}

fn outlier_detection(o: &OutlierDetection) -> Value {
    json!({
        "enabled": o.enabled,
        "consecutive_5xx": o.consecutive_5xx,
        "consecutive_failures": o.consecutive_failures,
        "base_ejection_time": duration(o.base_ejection_time),
        "max_ejection_time": duration(o.max_ejection_time),
        "max_ejection_percent": o.max_ejection_percent,
    })
}

/// Retries and the circuit breaker, under the names the upstream's keys have in the file.
fn resilience(r: &ResilienceConfig) -> Value {
    json!({
        "retries": r.retries,
        // `null`: the try waits as long as `timeouts.upstream_response_header`.
        "try_timeout": r.try_timeout.map(duration),
        "retry_budget": r.retry_budget_percent,
        "retry_budget_min_per_second": r.retry_budget_min_per_second,
        // All three `null`: no circuit breaker.
        "max_active_requests": r.circuit.map(|c| c.max_active_requests),
        "max_pending_requests": r.circuit.map(|c| c.max_pending_requests),
        "queue_timeout": r.circuit.map(|c| duration(c.queue_timeout)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_ipv6_addresses_decode() {
        assert_eq!(
            percent_decode("%5B%3A%3A1%5D:8080").as_deref(),
            Some("[::1]:8080")
        );
        assert_eq!(
            percent_decode("127.0.0.1:80").as_deref(),
            Some("127.0.0.1:80")
        );
        assert_eq!(percent_decode("%5"), None);
        assert_eq!(percent_decode("%zz"), None);
    }

    #[test]
    fn recent_counts_start_at_the_older_sample() {
        let key = ("app".to_string(), "127.0.0.1:1".parse().unwrap());
        let counts = |requests, errors, failed_tries| Counts {
            requests,
            errors,
            failed_tries,
        };
        let mut window = RecentWindow::default();
        assert_eq!(window.since(&key, counts(5, 1, 0)).requests, 5);
        window.push(
            Instant::now(),
            HashMap::from([(key.clone(), counts(5, 1, 0))]),
        );
        window.push(
            Instant::now(),
            HashMap::from([(key.clone(), counts(9, 1, 0))]),
        );
        let recent = window.since(&key, counts(15, 3, 0));
        assert_eq!((recent.requests, recent.errors), (10, 2));
        assert_eq!(recent.error_rate, 0.2);
        window.push(
            Instant::now(),
            HashMap::from([(key.clone(), counts(15, 3, 0))]),
        );
        assert_eq!(window.since(&key, counts(15, 3, 0)).requests, 6);
        // A server made anew counts from zero again.
        assert_eq!(window.since(&key, counts(2, 0, 0)).requests, 2);
    }

    #[test]
    fn failed_tries_count_as_errors_among_the_tries() {
        let key = ("app".to_string(), "127.0.0.1:1".parse().unwrap());
        let mut window = RecentWindow::default();
        let then = Counts {
            requests: 10,
            errors: 0,
            failed_tries: 0,
        };
        window.push(Instant::now(), HashMap::from([(key.clone(), then)]));
        // 2 requests answered, 1 of them 5xx, and 2 tries that got nothing.
        let now = Counts {
            requests: 12,
            errors: 1,
            failed_tries: 2,
        };
        let recent = window.since(&key, now);
        assert_eq!((recent.tries, recent.failed_tries), (4, 2));
        assert_eq!(recent.error_rate, 0.75);
    }
}
