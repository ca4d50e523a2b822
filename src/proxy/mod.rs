//! The life of one request, written once for every client protocol. [`serve_request`] runs
//! its phases in order:
//!
//! 1. **validate and route**: strict checks, then host and path → upstream ([`route`]);
//! 2. **request filters**: the place for rate limits, auth and cache lookups (none yet);
//! 3. **admit, pick a server and connect**: the upstream's circuit breaker lets the request
//!    in (at once, after a wait in line, or not: 503), the balancer chooses, a pooled
//!    connection is taken or a new one opened (`connect`);
//! 4. **send and relay**: the request head and body go up while the response comes down
//!    (`exchange`), over the one HTTP/1.1 upstream client. A try that fails before any
//!    response byte reached the client is followed by another on a server not tried yet,
//!    within the upstream's `retries` and retry budget: any request whose connection could
//!    not be made, and an idempotent request without a body (which can be sent again) whose
//!    server closed or stayed silent past `try_timeout`;
//! 5. **respond and log**: the response (or Fulcrum's own answer, `answer`) finishes, the
//!    connection goes back to its pool, and the access log line is written (`log`).
//!
//! A client protocol is an adapter that reads request heads and implements
//! [`downstream::RequestBody`] and [`downstream::ResponseWriter`]: `http::h1` and `http::h2`.

mod answer;
mod connect;
pub mod downstream;
mod exchange;
mod log;
mod request;
mod response;
mod rewrite;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::Uri;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, Version};

pub use answer::Failure;
use connect::Connected;
use downstream::{RequestBody, ResponseWriter};
use exchange::{Context, Outcome};
pub use log::AccessRecord;
pub use rewrite::ResponseFacts;

use crate::balance;
use crate::config::{CLIENT_CERT_HEADER, HashKey};
use crate::http::headers;
use crate::http::validate::{self, Reject};
use crate::http1::body::Framing;
use crate::runtime::Runtime;
use crate::upstream::stats::ClassCounts;
use crate::upstream::{Admitted, Affinity, ConnectError, Observed, RawConn, Upstream};

/// The client connection a request arrived on, as the phases see it.
#[derive(Debug)]
pub struct ClientConn {
    pub peer: SocketAddr,
    /// The listener's slot (`crate::runtime::ListenerRuntime::slot`).
    pub listener: usize,
    /// The client's address as `X-Forwarded-For` and `Forwarded` write it, made once per
    /// connection rather than per request.
    pub ip: String,
    pub forwarded_for: String,
    /// The connection is TLS (`X-Forwarded-Proto: https`).
    pub https: bool,
    /// A verified client certificate, described for the server in the listener's
    /// `client_cert_header`.
    pub client_cert: Option<String>,
    /// The names in that certificate, which routes may ask for.
    pub client_names: Vec<String>,
}

impl ClientConn {
    pub fn new(peer: SocketAddr, listener: usize) -> Self {
        ClientConn {
            peer,
            listener,
            ip: ip_text(peer.ip()),
            forwarded_for: match peer.ip() {
                IpAddr::V4(_) => format!("for={}", ip_text(peer.ip())),
                IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
            },
            https: false,
            client_cert: None,
            client_names: Vec::new(),
        }
    }
}

/// A request head as a client adapter hands it to the phases.
pub struct Incoming {
    pub head: Request<()>,
    /// How the request body arrives (HTTP/2: `Empty` when the stream ended with its
    /// headers, `Length` when declared, otherwise `Chunked` as it must go upstream).
    pub framing: Framing,
}

/// How a request left its client connection.
pub enum Finished {
    /// The connection may carry another request.
    KeepAlive,
    Close,
    /// The upstream switched protocols: bytes are copied both ways from now on.
    Tunnel(RawConn),
}

/// Runs one request through every phase and answers it, whatever happens: with the
/// upstream's response, or with Fulcrum's own answer when it cannot be had.
pub async fn serve_request<B, W>(
    client: &ClientConn,
    rt: &Runtime,
    incoming: Incoming,
    body: &mut B,
    writer: &mut W,
    upstream_out: &mut Vec<u8>,
) -> Finished
where
    B: RequestBody + Send,
    W: ResponseWriter + Send,
{
    let started = Instant::now();
    let Incoming { head: req, framing } = incoming;
    // Always there: it counts the request in the metrics when dropped, and writes the
    // access log line if that is on.
    let mut log = Some(AccessRecord::new(
        &req,
        client.peer.ip(),
        started,
        rt,
        client.listener,
    ));
    let is_head = req.method() == Method::HEAD;
    let unread = framing.has_body();

    // 1. Validate and route (or send the client to HTTPS).
    let Some(listener) = rt.listener_index(client.listener) else {
        // The listener was removed by a reload as this request began: its connections are
        // told to close, and this one does so after its answer (`unread`: close).
        let gone = Failure {
            retry_after: true,
            ..Failure::new(StatusCode::SERVICE_UNAVAILABLE, "this listener is closing")
        };
        return answer::write(writer, gone, is_head, true, &mut log).await;
    };
    if let Some(port) = rt.config.listeners[listener].redirect_to_https {
        return answer::redirect_to_https(
            writer,
            &req,
            port,
            &rt.config.limits,
            is_head,
            unread,
            &mut log,
        )
        .await;
    }
    let routed = match route(&req, listener, &client.client_names, rt) {
        Ok(routed) => routed,
        Err(reject) => {
            // A request the checks refuse may be framed in a way another parser reads
            // differently (an invalid Content-Length reads as no body here): nothing after
            // its head can be trusted as the next request. Only a well-formed request
            // without a body that no route takes keeps its connection.
            let unread = unread || reject.status != StatusCode::NOT_FOUND;
            return answer::write(writer, reject.into(), is_head, unread, &mut log).await;
        }
    };

    if let Some(log) = log.as_mut() {
        log.route = Some(routed.requests);
    }

    // 2. Request filters: none yet.

    // 3. Wait for a turn under the upstream's limit, pick a server and connect.
    let upstream = routed.upstream;
    // Without a limit, no wait: nor a watch for the client leaving meanwhile, which costs
    // HTTP/2 streams a waker.
    let admitted = if upstream.limits_requests() {
        tokio::select! {
            biased;
            admitted = upstream.admit() => Some(admitted),
            () = writer.abandoned() => None,
        }
    } else {
        Some(Ok(Admitted::unlimited()))
    };
    let _admitted = match admitted {
        Some(Ok(admitted)) => admitted,
        Some(Err(refused)) => {
            let failure = Failure::refused(refused, upstream.queue_timeout());
            tracing::warn!(upstream = %upstream.name, reason = failure.detail.as_deref().unwrap_or(failure.reason), "request refused by the circuit breaker");
            return answer::write(writer, failure, is_head, unread, &mut log).await;
        }
        None => {
            return answer::write(writer, Failure::abandoned(), is_head, unread, &mut log).await;
        }
    };
    upstream.count_request(started);
    let upgrade = upgrade_protocol(&req);
    // Only a request that is idempotent and has no body (nothing read from the client that
    // would be gone) may be sent again once a server may have seen it.
    let replayable = req.method().is_idempotent() && !framing.has_body();
    let version = req.version();
    let (parts, ()) = req.into_parts();
    // Answered here, once an upstream connection is ready, rather than by the upstream.
    let expect_continue = framing.has_body()
        && parts
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let affinity = Affinity {
        client_ip: client.peer.ip(),
        key: balance_key(upstream, client.peer.ip(), &parts.uri, &parts.headers),
        pinned: upstream.pinned(&parts.headers),
    };
    let timeouts = &rt.config.timeouts;
    // Tries that sent the request: the first and its `retries`. Connections that could not
    // be made are not counted: nothing was sent, and the next server is always tried.
    let most_sent = 1 + upstream.retries();
    let mut sent = 0;
    // Servers this request failed on, not to be tried again.
    let mut failed: Vec<usize> = Vec::new();
    let mut last_failure: Option<Failure> = None;
    let mut fresh_only = false;
    // Every try so far went to a server that was out already: none could take the request.
    let mut all_out = true;
    let (server, conn, outcome, _in_flight) = loop {
        // The first try starts with the request (no second read of the clock) unless the
        // request may have waited for its turn: a wait is not the server's response time,
        // and a pooled connection is judged idle as of now.
        let try_started = if failed.is_empty() && !fresh_only && !upstream.limits_requests() {
            started
        } else {
            Instant::now()
        };
        let connected = connect::connect(
            upstream,
            &affinity,
            failed.len(),
            &failed,
            !replayable,
            fresh_only,
            try_started,
        )
        .await;
        let Connected {
            index,
            server,
            mut conn,
            was_out,
        } = match connected {
            // Every server has been tried: the balancer came back to one that failed.
            Ok(connected) if failed.contains(&connected.index) => {
                let failure = last_failure
                    .take()
                    .unwrap_or_else(|| Failure::from(ConnectError::NoServer));
                let failure = give_up(upstream, failure, all_out);
                return answer::write(writer, failure, is_head, unread, &mut log).await;
            }
            Ok(connected) => connected,
            Err(unconnected) => {
                // Nothing was sent: any request may go to another server, without spending
                // a retry, until every server has been tried.
                all_out &= unconnected.was_out;
                let worth_it = unconnected.worth_another_try();
                let failure = Failure::from(unconnected.error);
                let next = match unconnected.index {
                    Some(index) if worth_it && !failed.contains(&index) => {
                        failed.push(index);
                        failed.len() < upstream.servers.len()
                    }
                    _ => false,
                };
                if next {
                    last_failure = Some(failure);
                    continue;
                }
                let failure = give_up(upstream, failure, all_out);
                return answer::write(writer, failure, is_head, unread, &mut log).await;
            }
        };
        all_out &= was_out;
        if let Some(log) = log.as_mut() {
            log.upstream = Some(server.address);
            log.server = Some(server);
        }
        // Counted from here to the end of the exchange, for load-aware balancing.
        let in_flight = upstream.track(index);

        // 4. Send the request and relay the response.
        let client_host = routed.host.as_ref();
        let host = match client_host {
            Some(host) if upstream.preserve_host => host,
            _ => &server.host_header,
        };
        upstream_out.clear();
        let listener_tls = rt.config.listeners[listener].tls.as_ref();
        rewrite::write_request(
            upstream_out,
            &parts,
            &rewrite::UpstreamHead {
                client_ip: &client.ip,
                forwarded_for: &client.forwarded_for,
                client_host,
                host,
                client_version: version,
                framing,
                upgrade: upgrade.as_ref(),
                drop_expect: expect_continue,
                https: client.https,
                client_cert: (
                    listener_tls.map_or(&CLIENT_CERT_HEADER, |tls| &tls.client_cert_header),
                    client.client_cert.as_deref(),
                ),
            },
        );
        // A request with a body is sent once (it is not replayable), so this is its only
        // `100 Continue`.
        if expect_continue && writer.send_continue().await.is_err() {
            return Finished::Close;
        }
        // A try that another can follow gives up on a silent server sooner; the last one
        // waits as long as any request.
        let followed =
            replayable && sent + 1 < most_sent && failed.len() + 1 < upstream.servers.len();
        let response_header = match upstream.try_timeout() {
            Some(try_timeout) if followed => try_timeout,
            _ => timeouts.upstream_response_header,
        };
        let cx = Context {
            timeouts,
            is_head,
            upgrade: upgrade.is_some(),
            max_body: rt.config.limits.max_body_bytes,
            response_header,
            started,
            try_started,
            set_cookie: upstream.pin_cookie(&affinity, server),
        };
        let outcome = exchange::forward(
            body,
            writer,
            upstream_out,
            &mut conn,
            framing,
            &cx,
            &mut log,
        )
        .await;
        let mut failure = match outcome {
            Outcome::Responded(ref responded) => {
                let observed = if responded.status.is_server_error() {
                    Observed::ServerError
                } else {
                    Observed::Success
                };
                upstream.record_outcome(index, observed);
                break (server, conn, outcome, in_flight);
            }
            Outcome::Broken { upstream: true, .. } => {
                upstream.record_outcome(index, Observed::Broken);
                break (server, conn, outcome, in_flight);
            }
            Outcome::Broken { .. } => break (server, conn, outcome, in_flight),
            Outcome::Failed(failure) => failure,
        };
        let Some(observed) = failure.observed else {
            // The client's doing (its body, or it went away): no server to blame or to try.
            return answer::write(writer, failure, is_head, unread, &mut log).await;
        };
        // A pooled connection the server had already closed fails before any response
        // byte: the request can go again, once, on a new connection, without blaming the
        // server or spending a retry.
        if replayable && conn.reused && failure.nothing_received && !fresh_only {
            fresh_only = true;
            continue;
        }
        upstream.record_outcome(index, observed);
        sent += 1;
        // Sent, but no answer: only a replayable request may go to another server.
        let unanswered = observed == Observed::Timeout || failure.nothing_received;
        if replayable && unanswered {
            failed.push(index);
            fresh_only = false;
            let another_server = failed.len() < upstream.servers.len();
            if sent < most_sent && another_server && retry_allowed(upstream, &mut failure) {
                last_failure = Some(failure);
                continue;
            }
        }
        let failure = give_up(upstream, failure, all_out);
        return answer::write(writer, failure, is_head, unread, &mut log).await;
    };

    // 5. Respond and log.
    let responded = match outcome {
        Outcome::Responded(responded) => responded,
        Outcome::Failed(failure) => {
            return answer::write(writer, failure, is_head, unread, &mut log).await;
        }
        Outcome::Broken { why, .. } => {
            if let Some(log) = log.as_mut() {
                log.reason = Some(why);
            }
            return Finished::Close;
        }
    };
    // The response is all written: one reading of the clock serves the response-time
    // estimate, the log and the pool.
    let ended = Instant::now();
    server.observe(responded.response_time, ended);
    if let Some(log) = log.as_mut() {
        log.bytes = responded.bytes;
        log.complete = true;
        log.ended = Some(ended);
    }
    if responded.switched {
        return Finished::Tunnel(conn);
    }
    if responded.upstream_reusable {
        server.pool.put_raw(conn, ended);
    }
    if responded.client_keep_alive {
        Finished::KeepAlive
    } else {
        Finished::Close
    }
}

/// Whether the retry budget allows another try after a failed one. When it does not, the
/// failure becomes a 503 saying so: the request could have been retried, and the refusal
/// is about load.
fn retry_allowed(upstream: &Upstream, failure: &mut Failure) -> bool {
    if upstream.allow_retry() {
        return true;
    }
    tracing::warn!(upstream = %upstream.name, "retry budget spent: a failed request is not retried");
    *failure = Failure::budget_spent(failure);
    false
}

/// The answer to a request whose last try failed: a 503 saying why, when every server it
/// tried was out already and none is in now, else the last try's own failure.
fn give_up(upstream: &Upstream, failure: Failure, all_out: bool) -> Failure {
    match all_out.then(|| upstream.unavailable()).flatten() {
        Some(why) => {
            let failure = Failure::unavailable(why, &failure);
            tracing::warn!(upstream = %upstream.name, reason = failure.detail.as_deref().unwrap_or(failure.reason), "no upstream server can take the request");
            failure
        }
        None => failure,
    }
}

/// Fulcrum's own answer to a request whose head could not be read (HTTP/1.1's malformed or
/// oversized heads), outside the phases.
pub async fn refuse<W: ResponseWriter>(writer: &mut W, status: StatusCode, reason: &'static str) {
    answer::write(writer, Failure::new(status, reason), false, true, &mut None).await;
}

/// Where a validated request goes.
pub struct Routed<'rt> {
    pub upstream: &'rt Arc<Upstream>,
    /// The route's request counts, which count the request whatever its outcome.
    pub requests: &'rt ClassCounts,
    /// The host the request is for (URI authority or Host header), if it named one.
    pub host: Option<HeaderValue>,
}

/// Validate and route: the upstream for `req`, or the answer Fulcrum gives itself.
pub fn route<'rt, B>(
    req: &Request<B>,
    listener: usize,
    client_names: &[String],
    rt: &'rt Runtime,
) -> Result<Routed<'rt>, Reject> {
    let host = validate::check(req, &rt.config.limits)?;
    let host_str = host.as_ref().and_then(|h| h.to_str().ok());
    match rt.listeners[listener]
        .router
        .route(host_str, req.uri().path(), client_names)
    {
        Some(target) => Ok(Routed {
            upstream: &target.upstream,
            requests: &target.requests,
            host,
        }),
        None => Err(Reject {
            status: StatusCode::NOT_FOUND,
            reason: "no route for this host and path",
        }),
    }
}

/// The protocol a client asks to upgrade to, if it is one that may be tunnelled. `h2c` never
/// is: it would open an HTTP/2 connection to the backend past our routing.
pub fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11
        || !headers::has_token(req.headers(), header::CONNECTION, "upgrade")
    {
        return None;
    }
    let protocol = req.headers().get(header::UPGRADE)?;
    let h2c = headers::tokens(protocol).any(|p| p.len() >= 3 && p[..3].eq_ignore_ascii_case("h2c"));
    (!h2c).then(|| protocol.clone())
}

/// The hash of what `upstream` balances on (`hash_key`), when it balances on one. A missing
/// header or cookie gives `None`, and the balancer falls back to the client's address.
pub fn balance_key(
    upstream: &Upstream,
    client_ip: IpAddr,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<u64> {
    match upstream.hash_key.as_ref()? {
        HashKey::ClientIp => Some(balance::hash(&client_ip)),
        HashKey::Path => Some(balance::hash(&uri.path())),
        HashKey::Header(name) => headers.get(name).map(|v| balance::hash(&v.as_bytes())),
        HashKey::Cookie(name) => cookie(headers, name).map(|v| balance::hash(&v)),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value)
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
