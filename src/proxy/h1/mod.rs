//! The phases for HTTP/1.1 clients, on hand-written I/O: one task per client connection
//! reads each request head, routes it, and moves the request body up and the response down
//! at the same time on a pooled upstream connection, with no channel or extra task between
//! the two sides. [`exchange`] runs the two directions, [`request`] sends, [`response`]
//! relays.

use std::borrow::Cow;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::header;
use http::{Method, Request, StatusCode};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{AccessRecord, balance_key, local_body, route, upgrade_protocol};
use crate::config::Timeouts;
use crate::http1::body::Framing;
use crate::http1::head::{self, HeadError};
use crate::http1::io::{read_some, wait_readable, write_all};
use crate::idle_timeout::IdleTimeout;
use crate::runtime::{Runtime, Shared};
use crate::server::stopping;
use crate::upstream::{Affinity, ConnectError, RawConn, Server, Upstream};

mod exchange;
mod request;
mod response;
mod rewrite;

use exchange::{Context, Outcome, UpstreamFailure, forward};
use request::{RequestFailure, request_framing};
use rewrite::UpstreamHead;

/// How long a kept-alive connection holds its buffers while waiting for its next request.
const BUFFER_LINGER: Duration = Duration::from_secs(1);
/// Room for the heads and small bodies written to each side.
const CLIENT_OUT: usize = 16 * 1024;
const UPSTREAM_OUT: usize = 4 * 1024;

/// One HTTP/1.1 client connection and the buffers it reuses for every request.
struct Client {
    stream: TcpStream,
    peer: SocketAddr,
    listener: usize,
    /// Bytes read from the client and not yet used: the rest of a head, body, or pipelined
    /// requests.
    rbuf: BytesMut,
    /// What goes to the client next.
    wbuf: Vec<u8>,
    /// What goes to the upstream next: a request head, then body.
    ubuf: Vec<u8>,
    /// The client's address as `X-Forwarded-For` and `Forwarded` write it, made once.
    ip: String,
    forwarded_for: String,
}

/// Whether the client connection may carry another request.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// Serves HTTP/1.1 requests on `stream` (whose first bytes are already in `rbuf`) until the
/// client leaves, a timeout or error ends the connection, or shutdown is signalled.
pub async fn serve(
    stream: TcpStream,
    rbuf: BytesMut,
    peer: SocketAddr,
    listener: usize,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut client = Client {
        stream,
        peer,
        listener,
        rbuf,
        wbuf: Vec::with_capacity(CLIENT_OUT),
        ubuf: Vec::with_capacity(UPSTREAM_OUT),
        ip: ip_text(peer.ip()),
        forwarded_for: match peer.ip() {
            IpAddr::V4(_) => format!("for={}", ip_text(peer.ip())),
            IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
        },
    };
    let mut runtime = shared.cache();
    drop(shared);
    let mut first = true;
    loop {
        if client.rbuf.is_empty() {
            // A new connection has `client_header` to start its request; a kept-alive one
            // may idle for `client_idle`.
            let timeouts = &arc_swap::cache::Access::load(&mut runtime).config.timeouts;
            let wait = if first {
                timeouts.client_header
            } else {
                timeouts.client_idle
            };
            // The buffers are kept for a moment, as a next request usually follows soon; a
            // connection idle for longer gives them back, so idle connections cost little.
            let linger = wait.min(BUFFER_LINGER);
            let read = tokio::select! {
                biased;
                read = read_some(&client.stream, &mut client.rbuf, linger) => read,
                _ = stopping(&mut shutdown) => return,
            };
            match read {
                Ok(n) if n > 0 => {}
                // Nothing yet, and the read found the socket empty: wait on, bufferless.
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut && wait > linger => {
                    client.release_buffers();
                    tokio::select! {
                        biased;
                        ready = wait_readable(&client.stream, wait - linger) => if ready.is_err() { return },
                        _ = stopping(&mut shutdown) => return,
                    }
                }
                _ => return,
            }
        }
        // Loaded once the request has begun, so that it sees a reload made while the
        // connection waited for it.
        let rt = arc_swap::cache::Access::load(&mut runtime);
        let timeouts = &rt.config.timeouts;
        let req = match read_head(&mut client, rt).await {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) => {
                let _ = client
                    .answer(e.status(), e.reason(), None, true, None, timeouts)
                    .await;
                return;
            }
        };
        let stopping_now = *shutdown.borrow();
        if exchange(&mut client, req, rt, stopping_now).await == Next::Close || *shutdown.borrow() {
            return;
        }
        if first {
            // Set only once a connection is kept alive (or streams, see `relay_response`): a
            // one-request connection writes its response at once and is spared the call.
            let _ = client.stream.set_nodelay(true);
            first = false;
        }
    }
}

/// Reads one request head: all of it within `client_header`, refusing bare LF and heads
/// over the size limits. `None` when the client closed between requests.
async fn read_head(client: &mut Client, rt: &Runtime) -> Result<Option<Request<()>>, HeadError> {
    let limits = &rt.config.limits;
    let deadline = Instant::now() + rt.config.timeouts.client_header;
    let mut scanned = 0;
    let end = loop {
        if scanned == 0 {
            head::skip_leading_crlf(&mut client.rbuf);
        }
        if let Some(end) = head::find_head_end(&client.rbuf, &mut scanned)? {
            break end;
        }
        if client.rbuf.len() > limits.max_header_bytes {
            return Err(HeadError::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match read_some(&client.stream, &mut client.rbuf, left).await {
            Ok(0) if client.rbuf.is_empty() => return Ok(None),
            Ok(0) => {
                return Err(HeadError::Invalid(
                    "connection closed in the middle of a request head",
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(HeadError::TimedOut);
            }
            Err(_) => return Ok(None),
        }
    };
    if end > limits.max_header_bytes {
        return Err(HeadError::TooLarge);
    }
    let head = client.rbuf.split_to(end).freeze();
    head::parse_request(head, limits.max_headers, limits.max_uri_bytes).map(Some)
}

/// Carries one request to an upstream and its response back.
async fn exchange(client: &mut Client, req: Request<()>, rt: &Runtime, stopping: bool) -> Next {
    let started = Instant::now();
    client.wbuf.reserve(CLIENT_OUT);
    client.ubuf.reserve(UPSTREAM_OUT);
    let timeouts = &rt.config.timeouts;
    let mut log = rt
        .config
        .access_log
        .enabled
        .then(|| AccessRecord::new(&req, client.peer.ip(), started));
    let client_keep_alive = head::keep_alive(&req) && !stopping;

    // Validate and route.
    let routed = match route(&req, client.listener, rt) {
        Ok(routed) => routed,
        Err(reject) => {
            // Only a well-formed request with nothing left unread may keep its connection.
            let clean =
                reject.status == StatusCode::NOT_FOUND && request_framing(&req) == Framing::Empty;
            return client
                .answer(
                    reject.status,
                    reject.reason,
                    None,
                    !(clean && client_keep_alive),
                    log,
                    timeouts,
                )
                .await;
        }
    };
    let framing = request_framing(&req);
    let upgrade = upgrade_protocol(&req);
    let version = req.version();
    let is_head = req.method() == Method::HEAD;
    let idempotent = req.method().is_idempotent();
    let (parts, ()) = req.into_parts();
    // Answered here, once an upstream connection is ready, rather than by the upstream.
    let expect_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));

    let affinity = Affinity {
        client_ip: client.peer.ip(),
        key: balance_key(
            routed.upstream,
            client.peer.ip(),
            &parts.uri,
            &parts.headers,
        ),
        pinned: routed.upstream.pinned(&parts.headers),
    };

    // Balance, connect, and send; a request that never left is retried on a new connection.
    let mut attempt = 0;
    let mut _in_flight = None;
    let (server, conn, outcome) = loop {
        // A retry goes on a new connection: the pool may hold more that the server closed.
        let pooled = if attempt == 0 {
            Pooled::Any {
                probe: framing != Framing::Empty,
            }
        } else {
            Pooled::No
        };
        let (index, server, mut conn) = match connect(routed.upstream, &affinity, pooled).await {
            Ok(found) => found,
            Err(e) => {
                let (status, reason) = match e {
                    ConnectError::TimedOut(..) => (
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream server did not accept the connection in time",
                    ),
                    _ => (
                        StatusCode::BAD_GATEWAY,
                        "upstream server could not be reached",
                    ),
                };
                let close = framing != Framing::Empty || !client_keep_alive;
                return client
                    .answer(
                        status,
                        reason,
                        Some(e.to_string().into()),
                        close,
                        log,
                        timeouts,
                    )
                    .await;
            }
        };
        if let Some(log) = log.as_mut() {
            log.upstream = Some(server.address);
        }
        // Counted from here to the end of the exchange, for load-aware balancing.
        _in_flight = Some(routed.upstream.track(index));
        let client_host = routed.host.as_ref();
        let host = match client_host {
            Some(host) if routed.upstream.preserve_host => host,
            _ => &server.host_header,
        };
        let head = UpstreamHead {
            client_ip: &client.ip,
            forwarded_for: &client.forwarded_for,
            client_host,
            host,
            client_version: version,
            framing,
            upgrade: upgrade.as_ref(),
            drop_expect: expect_continue,
        };
        client.ubuf.clear();
        rewrite::write_request(&mut client.ubuf, &parts, &head);
        if expect_continue
            && framing != Framing::Empty
            && attempt == 0
            && write_all(
                &client.stream,
                b"HTTP/1.1 100 Continue\r\n\r\n",
                timeouts.client_idle,
            )
            .await
            .is_err()
        {
            return Next::Close;
        }
        let context = Context {
            timeouts,
            is_head,
            upgrade: upgrade.clone(),
            client_version: version,
            keep_alive: client_keep_alive,
            max_body: rt.config.limits.max_body_bytes,
            started,
            set_cookie: routed.upstream.pin_cookie(&affinity, server).cloned(),
        };
        let outcome = forward(client, &mut conn, framing, &context, &mut log).await;
        // A pooled connection the server had already closed fails before any response byte;
        // an idempotent request without a body can go again on a fresh one.
        let stale = matches!(
            &outcome,
            Outcome::Upstream(UpstreamFailure {
                nothing_received: true,
                ..
            }) | Outcome::Request(RequestFailure::UpstreamWrite(_))
        );
        if stale && conn.reused && idempotent && framing == Framing::Empty && attempt == 0 {
            attempt += 1;
            continue;
        }
        break (server, conn, outcome);
    };

    let responded = match outcome {
        Outcome::Responded(responded) => responded,
        Outcome::Request(failure) => {
            let (status, reason) = failure.answer();
            return client
                .answer(
                    status,
                    reason,
                    Some(failure.detail().into()),
                    true,
                    log,
                    timeouts,
                )
                .await;
        }
        Outcome::Upstream(failure) => {
            let close = framing != Framing::Empty || !client_keep_alive;
            return client
                .answer(
                    failure.status,
                    failure.reason,
                    Some(failure.detail.into()),
                    close,
                    log,
                    timeouts,
                )
                .await;
        }
        Outcome::Broken(why) => {
            if let Some(log) = log.as_mut() {
                log.reason = Some(why);
            }
            return Next::Close;
        }
    };
    server.observe(responded.response_time);
    if let Some(log) = log.as_mut() {
        log.bytes = responded.bytes;
        log.complete = true;
    }
    if responded.switched {
        tunnel(client, conn, timeouts).await;
        return Next::Close;
    }
    if responded.upstream_reusable {
        server.pool.put_raw(conn);
    }
    if responded.client_keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// Whether a pooled connection may be used.
#[derive(Clone, Copy)]
enum Pooled {
    /// Yes; with `probe`, each is first checked for having been closed by the server (one
    /// non-blocking read), for requests that could not be sent again.
    Any {
        probe: bool,
    },
    No,
}

/// A pooled or new connection to a server the balancer picks, trying the next server when
/// one cannot be reached.
async fn connect<'u>(
    upstream: &'u Upstream,
    affinity: &Affinity,
    pooled: Pooled,
) -> Result<(usize, &'u Arc<Server>, RawConn), ConnectError> {
    let mut last_error = None;
    let mut failed = Vec::new();
    for attempt in 0..upstream.tries(affinity) {
        let Some((index, server)) = upstream.pick(attempt, affinity, &failed) else {
            break;
        };
        if let Pooled::Any { probe } = pooled
            && let Some(conn) = server.pool.take_raw(probe)
        {
            return Ok((index, server, conn));
        }
        match server.pool.connect_raw().await {
            Ok(conn) => {
                upstream.reached(index);
                return Ok((index, server, conn));
            }
            Err(e) => {
                tracing::warn!(upstream = %upstream.name, server = %server.address, error = %e, "upstream server unavailable");
                upstream.unreachable(index);
                last_error = Some(e);
                failed.push(index);
            }
        }
    }
    Err(last_error.unwrap_or(ConnectError::NoServer))
}

/// After `101 Switching Protocols`: bytes already read on either side go across first, then
/// both connections are copied through until one closes or both idle too long.
async fn tunnel(client: &mut Client, mut conn: RawConn, timeouts: &Timeouts) {
    let idle = timeouts.client_idle;
    if write_all(&conn.stream, &client.rbuf, idle).await.is_err()
        || write_all(&client.stream, &conn.buf, idle).await.is_err()
    {
        return;
    }
    client.rbuf.clear();
    let mut down = IdleTimeout::new(&mut client.stream, idle);
    let mut up = IdleTimeout::new(&mut conn.stream, timeouts.upstream_idle);
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "tunnel ended with an error");
    }
}

impl Client {
    /// Gives the buffers back while the connection idles; they are made again when the next
    /// request arrives.
    fn release_buffers(&mut self) {
        self.rbuf = BytesMut::new();
        self.wbuf = Vec::new();
        self.ubuf = Vec::new();
    }

    /// Writes a short plain-text response of Fulcrum's own.
    async fn answer(
        &mut self,
        status: StatusCode,
        reason: &'static str,
        detail: Option<Cow<'static, str>>,
        close: bool,
        mut log: Option<AccessRecord>,
        timeouts: &Timeouts,
    ) -> Next {
        let body = local_body(status, reason);
        self.wbuf.clear();
        let _ = write!(
            self.wbuf,
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\ndate: {}\r\n{}\r\n{body}",
            status.as_str(),
            status.canonical_reason().unwrap_or(""),
            body.len(),
            httpdate::fmt_http_date(std::time::SystemTime::now()),
            if close { "connection: close\r\n" } else { "" },
        );
        let written = write_all(&self.stream, &self.wbuf, timeouts.client_idle).await;
        self.wbuf.clear();
        if let Some(log) = log.as_mut() {
            log.status = status;
            log.reason = Some(detail.unwrap_or(Cow::Borrowed(reason)));
            log.bytes = body.len() as u64;
            log.complete = written.is_ok();
        }
        if close || written.is_err() {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }
}

/// An address as text; IPv4 without the formatting machinery, which costs more than the
/// rest of a short connection's setup.
fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                text.push_str(itoa::Buffer::new().format(octet));
            }
            text
        }
        IpAddr::V6(v6) => v6.to_string(),
    }
}
