//! A `mode = "tcp"` listener's connections, one task each: the PROXY header from a trusted
//! proxy in front (refused from anyone else), the TLS ClientHello on a passthrough listener
//! (read, never answered, and passed on untouched), the route it takes, a server picked by
//! the upstream's balancer and connected to (another one when the connect fails), the PROXY
//! header for a server that wants one, then bytes relayed both ways until both sides close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::client_hello::{self, ClientHello};
use super::log::{ConnectionLog, Outcome, TcpStats};
use super::relay::{self, End, FirstBytes, FirstCheck};
use crate::config::{ListenerMode, ProxyProtocolVersion};
use crate::proxy_protocol;
use crate::runtime::Shared;
use crate::upstream::{Affinity, ConnectError, InFlight, TunnelSlot, Upstream};

/// Serves one connection accepted on the TCP listener in `slot`, until both sides have
/// closed, one has reset, or it was idle too long. `finish` is held only until the server
/// is connected: from then on the connection is a tunnel, with no request boundary to stop
/// at, so a switchover's drain (which counts `finish` receivers) stops waiting for it, as
/// for a WebSocket. Shutdown still waits for it (within `shutdown_grace`) through the
/// listener's connection permit, which the task holds to its end.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    slot: usize,
    shared: Arc<Shared>,
    finish: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let Some(plan) = prepare(&stream, peer, slot, &shared, started).await else {
        return;
    };
    let Plan {
        mut record,
        upstream,
        idle_timeout,
        check_first,
        proxy_header,
        hello,
        connect_timeout,
    } = plan;
    let Some((server, _in_flight, _slot)) = connect(&upstream, &mut record).await else {
        return;
    };
    drop(finish);
    let _tunnel = relay::Tunnel::open();
    // What the server must see before the client's own bytes: the PROXY header, then what
    // was read of the ClientHello (and anything after it in the same reads), in one write.
    let hello = hello.unwrap_or_default();
    let hello_len = hello.len() as u64;
    let first = match proxy_header {
        Some((version, source, destination)) => {
            let mut header = proxy_protocol::encode(version, source, destination);
            header.reserve_exact(hello.len());
            header.extend_from_slice(&hello);
            header
        }
        None => hello,
    };
    let mut server = server;
    if !first.is_empty() {
        let written = tokio::time::timeout(connect_timeout, server.write_all(&first)).await;
        let error = match written {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "the server took no bytes within {connect_timeout:?}"
            )),
        };
        if let Some(error) = error {
            // The client may have sent a request already: a FIN would read as "done".
            reset(&stream);
            return record.end(Outcome::Failed, Some(&error));
        }
    }
    drop(first);
    let relayed = relay::relay(stream, server, idle_timeout, check_first).await;
    record.from_client = relayed.from_client + hello_len;
    record.from_server = relayed.from_server;
    let (outcome, detail) = match &relayed.end {
        End::Closed => (Outcome::Closed, None),
        End::ClientReset => (Outcome::ClientReset, None),
        End::ServerReset => (Outcome::ServerReset, None),
        End::Idle => (Outcome::IdleTimeout, None),
        End::Refused => (
            Outcome::RefusedProxyHeader,
            Some("a PROXY header from a client not in proxy_protocol_from"),
        ),
        End::Shutdown => (
            Outcome::Shutdown,
            Some("still open when shutdown_grace ran out"),
        ),
        End::Failed(why) => (Outcome::Failed, Some(why.as_str())),
    };
    record.end(outcome, detail);
}

/// Everything decided before a server is connected to.
struct Plan {
    record: Record,
    upstream: Arc<Upstream>,
    idle_timeout: Duration,
    /// Refuses a PROXY header from a client not trusted to send one.
    check_first: Option<FirstCheck>,
    /// The header to send the server: version, client, and the address it connected to.
    proxy_header: Option<(ProxyProtocolVersion, SocketAddr, SocketAddr)>,
    /// The ClientHello's bytes as read, on a passthrough listener.
    hello: Option<Vec<u8>>,
    connect_timeout: Duration,
}

/// Reads what the connection opens with (PROXY header, ClientHello) and routes it; `None`
/// when it ends here (logged).
async fn prepare(
    stream: &TcpStream,
    peer: SocketAddr,
    slot: usize,
    shared: &Shared,
    started: Instant,
) -> Option<Plan> {
    let rt = shared.load();
    // Accepted just as a reload removed the listener, or made it another kind: no stats
    // are left to count it in.
    let tcp_stats = rt
        .listener_index(slot)
        .and_then(|index| Some((index, rt.listeners[index].tcp.clone()?)));
    let Some((index, stats)) = tcp_stats else {
        tracing::info!(client = %peer, "connection closed: a reload removed its tcp listener as it was accepted");
        return None;
    };
    let listener = &rt.config.listeners[index];
    let ListenerMode::Tcp(mode) = &listener.mode else {
        return None;
    };
    // One deadline for everything read before routing (PROXY header and ClientHello).
    let header_deadline = tokio::time::Instant::now() + rt.config.timeouts.client_header;
    let mut record = Record {
        stats,
        logged: rt.config.access_log.enabled,
        client: peer,
        started,
        sni: None,
        upstream: None,
        server: None,
        from_client: 0,
        from_server: 0,
    };
    let trusted_from = &listener.proxy_protocol_from;
    let trusted = !trusted_from.is_empty() && proxy_protocol::is_trusted(peer.ip(), trusted_from);
    // The address the client connected to, as the proxy in front saw it when it says.
    let mut destination = None;
    if trusted {
        let within = header_deadline.saturating_duration_since(tokio::time::Instant::now());
        match proxy_protocol::read_header(stream, within).await {
            Ok(Some(addresses)) => {
                record.client = addresses.source;
                destination = Some(addresses.destination);
            }
            // A health check of the proxy in front: the connection's own addresses stand.
            Ok(None) => {}
            Err(e) => {
                record.end(Outcome::BadProxyHeader, Some(&e.to_string()));
                return None;
            }
        }
    }
    let untrusted = !trusted_from.is_empty() && !trusted;
    let (hello, hello_bytes) = if mode.tls_passthrough {
        let mut bytes = Vec::new();
        let within = header_deadline.saturating_duration_since(tokio::time::Instant::now());
        match client_hello::read(stream, &mut bytes, within).await {
            Ok(hello) => (hello, Some(bytes)),
            Err(e) => {
                // What was read is not TLS and is closed either way; only the outcome
                // differs. A PROXY signature not yet whole counts as not TLS.
                if untrusted
                    && proxy_protocol::header_start(&bytes) == proxy_protocol::HeaderStart::Header
                {
                    reset(stream);
                    record.end(
                        Outcome::RefusedProxyHeader,
                        Some("a PROXY header from a client not in proxy_protocol_from"),
                    );
                } else {
                    record.end(Outcome::NotTls, Some(&e.to_string()));
                }
                return None;
            }
        }
    } else {
        (ClientHello::default(), None)
    };
    record.sni = hello.server_name;
    let Some(route) = mode
        .routes
        .iter()
        .find(|r| r.matches(record.sni.as_deref(), &hello.alpn))
    else {
        record.end(
            Outcome::NoRoute,
            Some("no route takes this server name and protocol"),
        );
        return None;
    };
    let upstream = rt.upstreams[route.upstream].clone();
    record.upstream = Some(upstream.clone());
    let proxy_header = match rt.config.upstreams[route.upstream].proxy_protocol {
        Some(version) => {
            let destination = match destination {
                Some(d) => d,
                None => match stream.local_addr() {
                    Ok(local) => local,
                    Err(e) => {
                        record.end(Outcome::Failed, Some(&e.to_string()));
                        return None;
                    }
                },
            };
            Some((version, record.client, destination))
        }
        None => None,
    };
    Some(Plan {
        record,
        upstream,
        idle_timeout: mode.idle_timeout,
        // A ClientHello was read already: nothing else can come first.
        check_first: (untrusted && !mode.tls_passthrough)
            .then_some(refuse_proxy_header as FirstCheck),
        proxy_header,
        hello: hello_bytes,
        connect_timeout: rt.config.timeouts.upstream_connect,
    })
}

/// A connection to a server of `upstream`: the balancer's pick, and after a failed connect
/// (which marks that server unreachable) another, up to the upstream's `retries` more.
/// Counted in flight from the connect on, so that `least_connections` counts tunnels.
async fn connect(
    upstream: &Arc<Upstream>,
    record: &mut Record,
) -> Option<(TcpStream, InFlight, TunnelSlot)> {
    // `consistent_hash` hashes the client's address when given no key: the only key an L4
    // listener has.
    let affinity = Affinity {
        client_ip: record.client.ip(),
        key: None,
        pinned: None,
    };
    let tries = 1 + upstream.retries();
    // Allocates only once a connect failed.
    let mut failed: Vec<usize> = Vec::new();
    let mut last_error: Option<ConnectError> = None;
    loop {
        let picked = upstream.pick(failed.len(), &affinity, &failed);
        let (index, server) = match picked {
            Some((index, server)) if !failed.contains(&index) => (index, server),
            // Every server has been tried, or there is none.
            _ => {
                let error = last_error.unwrap_or(if upstream.servers.is_empty() {
                    ConnectError::NoneResolved(upstream.name.clone())
                } else {
                    ConnectError::NoServer
                });
                give_up(upstream, record, &error);
                return None;
            }
        };
        record.server = Some(server.address);
        let in_flight = upstream.track(index);
        match server.pool.connect_tunnel().await {
            Ok((stream, slot)) => {
                upstream.reached(index);
                return Some((stream, in_flight, slot));
            }
            Err(e) => {
                drop(in_flight);
                match &e {
                    e if e.is_servers_fault() => {
                        tracing::warn!(upstream = %upstream.name, server = %server.address, error = %e, "upstream server unavailable");
                        upstream.unreachable(index);
                    }
                    e @ ConnectError::Busy(..) => {
                        tracing::warn!(upstream = %upstream.name, server = %server.address, error = %e, "upstream server at its connection limit");
                    }
                    e => {
                        tracing::error!(upstream = %upstream.name, server = %server.address, error = %e, "cannot open an upstream connection");
                    }
                }
                // Out of descriptors or ports: another server would not help.
                let local = matches!(e, ConnectError::Local(..));
                failed.push(index);
                if local || failed.len() >= tries || failed.len() >= upstream.servers.len() {
                    give_up(upstream, record, &e);
                    return None;
                }
                last_error = Some(e);
            }
        }
    }
}

/// Ends a connection no server could be connected to, saying why.
fn give_up(upstream: &Upstream, record: &mut Record, error: &ConnectError) {
    let detail = match upstream.unavailable() {
        Some(why) => format!("{}: {error}", why.reason()),
        None => error.to_string(),
    };
    record.end(Outcome::ConnectFailed, Some(&detail));
}

/// The relay's check on an untrusted client's first bytes: a PROXY header (however it is cut
/// into segments) is refused.
fn refuse_proxy_header(first: &[u8]) -> FirstBytes {
    match proxy_protocol::header_start(first) {
        proxy_protocol::HeaderStart::Header => FirstBytes::Refuse,
        proxy_protocol::HeaderStart::NotHeader => FirstBytes::Pass,
        proxy_protocol::HeaderStart::Undecided => FirstBytes::NeedMore,
    }
}

/// Closes `stream` with a reset rather than a FIN once dropped.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// What one connection's log line and counts are made of, gathered as it goes.
struct Record {
    stats: Arc<TcpStats>,
    /// Whether the access log is on.
    logged: bool,
    client: SocketAddr,
    started: Instant,
    sni: Option<String>,
    upstream: Option<Arc<Upstream>>,
    server: Option<SocketAddr>,
    from_client: u64,
    from_server: u64,
}

impl Record {
    /// Counts the connection, and writes its log line if the access log is on.
    fn end(&mut self, outcome: Outcome, detail: Option<&str>) {
        self.stats
            .record(outcome, self.from_client, self.from_server);
        if !self.logged {
            return;
        }
        ConnectionLog {
            listener: &self.stats.listener,
            client: self.client,
            sni: self.sni.as_deref(),
            upstream: self.upstream.as_ref().map(|u| u.name.as_str()),
            server: self.server,
            from_client: self.from_client,
            from_server: self.from_server,
            duration: self.started.elapsed(),
            outcome,
            detail,
        }
        .write();
    }
}
