//! The phases for HTTP/1.1 clients, on hand-written I/O: one task per client connection
//! reads each request head, routes it, and moves the request body up and the response down
//! at the same time on a pooled upstream connection, with no channel or extra task between
//! the two sides.

use std::borrow::Cow;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode, Version};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

use super::{
    AccessRecord, client_response_headers, local_body, route, upgrade_protocol,
    upstream_request_headers,
};
use crate::config::Timeouts;
use crate::http::headers::{ClientHop, has_token};
use crate::http::validate;
use crate::http1::body::{self, Decoded, Decoder, Framing};
use crate::http1::head::{self, HeadError};
use crate::http1::io::{pass_body, read_body, read_some, write_all};
use crate::idle_timeout::IdleTimeout;
use crate::runtime::{Runtime, Shared};
use crate::server::stopping;
use crate::upstream::{ConnectError, RawConn, Server, Upstream};

/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

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
        wbuf: Vec::with_capacity(16 * 1024),
        ubuf: Vec::with_capacity(4 * 1024),
    };
    let mut runtime = shared.cache();
    drop(shared);
    let mut first = true;
    loop {
        let rt = arc_swap::cache::Access::load(&mut runtime);
        let timeouts = &rt.config.timeouts;
        if client.rbuf.is_empty() {
            // A new connection has `client_header` to start its request; a kept-alive one
            // may idle for `client_idle`.
            let wait = if first {
                timeouts.client_header
            } else {
                timeouts.client_idle
            };
            tokio::select! {
                read = read_some(&client.stream, &mut client.rbuf, wait) => match read {
                    Ok(n) if n > 0 => {}
                    _ => return,
                },
                _ = stopping(&mut shutdown) => return,
            }
        }
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
                return Err(HeadError::Invalid("request header not received in time"));
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
    let (mut parts, ()) = req.into_parts();
    let expect_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expect_continue {
        // Answered here, once an upstream connection is ready, rather than by the upstream.
        parts.headers.remove(header::EXPECT);
    }
    let hop = ClientHop {
        client_ip: client.peer.ip(),
        host: routed.host.as_ref().and_then(|h| h.to_str().ok()),
        version,
    };
    upstream_request_headers(&mut parts.headers, &hop, upgrade.clone(), &routed);
    match framing {
        Framing::Chunked => {
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        Framing::Length(n)
            if parts
                .headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .nth(1)
                .is_some()
                || parts.headers[header::CONTENT_LENGTH]
                    .as_bytes()
                    .contains(&b',') =>
        {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        _ => {}
    }

    // Balance, connect, and send; a request that never left is retried on a new connection.
    let mut attempt = 0;
    let (server, mut conn, outcome) = loop {
        let (server, mut conn) = match connect(routed.upstream, framing != Framing::Empty).await {
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
        if !parts.headers.contains_key(header::HOST) || !routed.upstream.preserve_host {
            parts
                .headers
                .insert(header::HOST, server.host_header.clone());
        }
        client.ubuf.clear();
        head::write_request_head(&mut client.ubuf, &parts.method, &parts.uri, &parts.headers);
        client.ubuf.extend_from_slice(b"\r\n");
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
        };
        let outcome = forward(client, &mut conn, framing, &context, &mut log).await;
        // A pooled connection the server had already closed fails before any response byte;
        // a request without a body can go again on a fresh one.
        if let Outcome::Upstream(UpstreamFailure {
            nothing_received: true,
            ..
        }) = &outcome
            && conn.reused
            && framing == Framing::Empty
            && attempt == 0
        {
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
    if let Some(log) = log.as_mut() {
        log.bytes = responded.bytes;
        log.complete = true;
    }
    if responded.switched {
        tunnel(client, conn, timeouts).await;
        return Next::Close;
    }
    if responded.upstream_reusable {
        conn.reused = false;
        server.pool.put_raw(conn);
    }
    if responded.client_keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// What an exchange needs to know beside the two connections.
struct Context<'a> {
    timeouts: &'a Timeouts,
    is_head: bool,
    /// The protocol the client asked to upgrade to, if it may be tunnelled.
    upgrade: Option<HeaderValue>,
    client_version: Version,
    /// Whether the client (and shutdown) allow another request on its connection.
    keep_alive: bool,
    max_body: u64,
    started: Instant,
}

enum Outcome {
    Responded(Responded),
    /// The client's request body failed before any response was sent.
    Request(RequestFailure),
    /// The upstream failed before any response was sent.
    Upstream(UpstreamFailure),
    /// Something failed after the response head went out: the connection can only close.
    Broken(Cow<'static, str>),
}

struct Responded {
    bytes: u64,
    switched: bool,
    upstream_reusable: bool,
    client_keep_alive: bool,
}

#[derive(Debug)]
enum RequestFailure {
    TooLarge(u64),
    BadBody(body::BodyError),
    ClientGone,
    UpstreamWrite(std::io::Error),
}

impl RequestFailure {
    fn answer(&self) -> (StatusCode, &'static str) {
        match self {
            RequestFailure::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body is larger than allowed",
            ),
            RequestFailure::BadBody(_) => (StatusCode::BAD_REQUEST, "malformed request body"),
            RequestFailure::ClientGone => (StatusCode::BAD_REQUEST, "request body not received"),
            RequestFailure::UpstreamWrite(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream server stopped reading the request",
            ),
        }
    }

    fn detail(&self) -> String {
        match self {
            RequestFailure::TooLarge(limit) => {
                format!("request body over the limit of {limit} bytes")
            }
            RequestFailure::BadBody(e) => format!("malformed request body: {e}"),
            RequestFailure::ClientGone => {
                "client closed or stalled before sending its whole body".into()
            }
            RequestFailure::UpstreamWrite(e) => format!("writing the request upstream failed: {e}"),
        }
    }
}

struct UpstreamFailure {
    status: StatusCode,
    reason: &'static str,
    detail: String,
    /// The upstream closed without sending a byte: the request may not have been seen.
    nothing_received: bool,
}

/// Sends the request (head in `client.ubuf`, body from the client) and brings the response
/// back, both at once: an upstream may answer before it has read the whole body.
async fn forward(
    client: &mut Client,
    conn: &mut RawConn,
    framing: Framing,
    cx: &Context<'_>,
    log: &mut Option<AccessRecord>,
) -> Outcome {
    let Client {
        stream: client_stream,
        rbuf,
        wbuf,
        ubuf,
        ..
    } = client;
    let request_sent = Notify::new();
    let request_done = AtomicBool::new(false);
    let head_sent = AtomicBool::new(false);
    let request = send_request(
        client_stream,
        rbuf,
        &conn.stream,
        ubuf,
        framing,
        cx,
        &request_done,
        &request_sent,
    );
    let response = relay_response(
        client_stream,
        wbuf,
        &conn.stream,
        &mut conn.buf,
        cx,
        &request_done,
        &request_sent,
        &head_sent,
        log,
    );
    tokio::pin!(request, response);
    let mut request_finished = false;
    loop {
        tokio::select! {
            sent = &mut request, if !request_finished => match sent {
                Ok(()) => request_finished = true,
                Err(failure) if !head_sent.load(Ordering::Relaxed) => return Outcome::Request(failure),
                Err(failure) => return Outcome::Broken(failure.detail().into()),
            },
            relayed = &mut response => {
                return match relayed {
                    Ok(mut responded) => {
                        // An upstream that answered early has not read the whole request:
                        // neither connection is in a known state for another exchange.
                        if !request_finished {
                            responded.upstream_reusable = false;
                            responded.client_keep_alive = false;
                        }
                        Outcome::Responded(responded)
                    }
                    Err(Relay::BeforeHead(failure)) => Outcome::Upstream(failure),
                    Err(Relay::AfterHead(why)) => Outcome::Broken(why.into()),
                };
            }
        }
    }
}

/// Writes the request head and streams the body, re-framed, from client to upstream.
#[allow(clippy::too_many_arguments)]
async fn send_request(
    client: &TcpStream,
    rbuf: &mut BytesMut,
    upstream: &TcpStream,
    out: &mut Vec<u8>,
    framing: Framing,
    cx: &Context<'_>,
    done: &AtomicBool,
    sent: &Notify,
) -> Result<(), RequestFailure> {
    let t = cx.timeouts;
    let mut decoder = Decoder::new(framing);
    let mut total = 0u64;
    loop {
        match decoder.decode(rbuf).map_err(RequestFailure::BadBody)? {
            Decoded::Data(n) => {
                total += n as u64;
                if total > cx.max_body {
                    return Err(RequestFailure::TooLarge(cx.max_body));
                }
                pass_body(
                    upstream,
                    out,
                    &rbuf[..n],
                    framing == Framing::Chunked,
                    t.upstream_idle,
                )
                .await
                .map_err(RequestFailure::UpstreamWrite)?;
                rbuf.advance(n);
            }
            Decoded::NeedMore => {
                if !out.is_empty() {
                    write_all(upstream, out, t.upstream_idle)
                        .await
                        .map_err(RequestFailure::UpstreamWrite)?;
                    out.clear();
                }
                match read_body(client, rbuf, t.client_idle).await {
                    Ok(n) if n > 0 => {}
                    _ => return Err(RequestFailure::ClientGone),
                }
            }
            Decoded::End => {
                if framing == Framing::Chunked {
                    out.extend_from_slice(body::LAST_CHUNK);
                }
                write_all(upstream, out, t.upstream_idle)
                    .await
                    .map_err(RequestFailure::UpstreamWrite)?;
                out.clear();
                done.store(true, Ordering::Relaxed);
                sent.notify_one();
                return Ok(());
            }
        }
    }
}

enum Relay {
    BeforeHead(UpstreamFailure),
    AfterHead(String),
}

fn upstream_failure(
    status: StatusCode,
    reason: &'static str,
    detail: String,
    nothing_received: bool,
) -> Relay {
    Relay::BeforeHead(UpstreamFailure {
        status,
        reason,
        detail,
        nothing_received,
    })
}

/// Reads the upstream's response head, writes the client's, and streams the body down,
/// re-framed for the client.
#[allow(clippy::too_many_arguments)]
async fn relay_response(
    client: &TcpStream,
    out: &mut Vec<u8>,
    upstream: &TcpStream,
    ubuf: &mut BytesMut,
    cx: &Context<'_>,
    request_done: &AtomicBool,
    request_sent: &Notify,
    head_sent: &AtomicBool,
    log: &mut Option<AccessRecord>,
) -> Result<Responded, Relay> {
    let t = cx.timeouts;
    // The response header timeout runs from when the whole request is sent; an upstream
    // that answers earlier is read at once.
    if !request_done.load(Ordering::Relaxed) {
        tokio::select! {
            _ = request_sent.notified() => {}
            _ = upstream.readable() => {}
        }
    }
    let mut received_any = !ubuf.is_empty();
    let head = loop {
        match head::parse_response(ubuf) {
            Ok(Some((len, head))) => {
                ubuf.advance(len);
                // Interim responses (100, 103) are dropped; the final one follows.
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS
                {
                    continue;
                }
                break head;
            }
            Ok(None) if ubuf.len() > MAX_RESPONSE_HEAD => {
                return Err(upstream_failure(
                    StatusCode::BAD_GATEWAY,
                    "upstream server sent an invalid response",
                    "response head too large".into(),
                    false,
                ));
            }
            Ok(None) => match read_some(upstream, ubuf, t.upstream_response_header).await {
                Ok(0) => {
                    return Err(upstream_failure(
                        StatusCode::BAD_GATEWAY,
                        "upstream server closed the connection without answering",
                        "upstream closed before a complete response head".into(),
                        !received_any,
                    ));
                }
                Ok(_) => received_any = true,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Err(upstream_failure(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream server did not answer in time",
                        format!("no response header within {:?}", t.upstream_response_header),
                        false,
                    ));
                }
                Err(e) => {
                    return Err(upstream_failure(
                        StatusCode::BAD_GATEWAY,
                        "upstream server failed to answer",
                        format!("reading the response failed: {e}"),
                        !received_any,
                    ));
                }
            },
            Err(e) => {
                return Err(upstream_failure(
                    StatusCode::BAD_GATEWAY,
                    "upstream server sent an invalid response",
                    format!("invalid response head: {}", e.reason()),
                    false,
                ));
            }
        }
    };
    let framing = response_framing(cx.is_head, &head).map_err(|why| {
        upstream_failure(
            StatusCode::BAD_GATEWAY,
            "upstream server sent an invalid response",
            why.into(),
            false,
        )
    })?;
    let switched = head.status == StatusCode::SWITCHING_PROTOCOLS;
    if switched && cx.upgrade.is_none() {
        return Err(upstream_failure(
            StatusCode::BAD_GATEWAY,
            "upstream server switched protocols unasked",
            "101 to a request that asked for no upgrade".into(),
            false,
        ));
    }
    if let Some(log) = log.as_mut() {
        log.status = head.status;
        log.upstream_time = Some(cx.started.elapsed());
    }
    let upstream_keep_alive =
        head.version == Version::HTTP_11 && !has_token(&head.headers, header::CONNECTION, "close");

    // The client's framing: the upstream's length if it gave one, else chunked for an
    // HTTP/1.1 client and the end of the connection for an HTTP/1.0 one.
    let mut headers = head.headers;
    client_response_headers(
        &mut headers,
        if switched { cx.upgrade.clone() } else { None },
    );
    let unknown_length = matches!(framing, Framing::Chunked | Framing::UntilClose);
    let client_chunked = unknown_length && cx.client_version == Version::HTTP_11;
    // An HTTP/1.0 client learns where a body of unknown length ends only by the close.
    let close_delimited = unknown_length && !client_chunked;
    let keep_alive =
        !switched && !close_delimited && cx.keep_alive && request_done.load(Ordering::Relaxed);
    if unknown_length || switched {
        // Streamed pieces must not wait for the client's ACK of the previous one.
        let _ = client.set_nodelay(true);
    }
    if client_chunked {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    if !keep_alive && !switched {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    } else if keep_alive && cx.client_version == Version::HTTP_10 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    out.clear();
    head::write_response_head(out, head.status, &headers);
    out.extend_from_slice(b"\r\n");
    head_sent.store(true, Ordering::Relaxed);
    if switched {
        write_all(client, out, t.client_idle)
            .await
            .map_err(|e| Relay::AfterHead(format!("writing to the client failed: {e}")))?;
        out.clear();
        return Ok(Responded {
            bytes: 0,
            switched,
            upstream_reusable: false,
            client_keep_alive: false,
        });
    }

    let mut decoder = Decoder::new(framing);
    let mut bytes = 0u64;
    loop {
        match decoder.decode(ubuf) {
            Ok(Decoded::Data(n)) => {
                bytes += n as u64;
                pass_body(client, out, &ubuf[..n], client_chunked, t.client_idle)
                    .await
                    .map_err(|e| Relay::AfterHead(format!("writing to the client failed: {e}")))?;
                ubuf.advance(n);
            }
            Ok(Decoded::NeedMore) => {
                if !out.is_empty() {
                    write_all(client, out, t.client_idle).await.map_err(|e| {
                        Relay::AfterHead(format!("writing to the client failed: {e}"))
                    })?;
                    out.clear();
                }
                match read_body(upstream, ubuf, t.upstream_idle).await {
                    Ok(0) if decoder.until_close() => break,
                    Ok(0) => {
                        return Err(Relay::AfterHead(
                            "upstream closed in the middle of the response body".into(),
                        ));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(Relay::AfterHead(format!(
                            "reading the response body failed: {e}"
                        )));
                    }
                }
            }
            Ok(Decoded::End) => break,
            Err(e) => {
                return Err(Relay::AfterHead(format!(
                    "invalid response body from upstream: {e}"
                )));
            }
        }
    }
    if client_chunked {
        out.extend_from_slice(body::LAST_CHUNK);
    }
    write_all(client, out, t.client_idle)
        .await
        .map_err(|e| Relay::AfterHead(format!("writing to the client failed: {e}")))?;
    out.clear();
    let upstream_reusable = upstream_keep_alive && !decoder.until_close() && ubuf.is_empty();
    Ok(Responded {
        bytes,
        switched,
        upstream_reusable,
        client_keep_alive: keep_alive,
    })
}

/// A pooled or new connection to a server the balancer picks, trying the next server when
/// one cannot be reached. `probe` checks pooled connections for having been closed, for
/// requests that could not be sent again.
async fn connect(upstream: &Upstream, probe: bool) -> Result<(&Server, RawConn), ConnectError> {
    let mut last_error = None;
    for attempt in 0..upstream.servers.len() {
        let Some(index) = upstream.balancer.pick(attempt) else {
            break;
        };
        let server = &upstream.servers[index];
        if let Some(conn) = server.pool.take_raw(probe) {
            return Ok((server, conn));
        }
        match server.pool.connect_raw().await {
            Ok(conn) => return Ok((server, conn)),
            Err(e) => {
                tracing::warn!(upstream = %upstream.name, server = %server.address, error = %e, "upstream server unavailable");
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap_or(ConnectError::NoServer))
}

/// The request's body framing; the headers were validated, so they agree.
fn request_framing(req: &Request<()>) -> Framing {
    if req.headers().contains_key(header::TRANSFER_ENCODING) {
        return Framing::Chunked;
    }
    match validate::content_length(req.headers()) {
        Ok(Some(n)) => Framing::Length(n),
        _ => Framing::Empty,
    }
}

/// How an upstream's response body is delimited (RFC 9112 §6.3).
fn response_framing(
    head_request: bool,
    head: &head::ResponseHead,
) -> Result<Framing, &'static str> {
    let status = head.status;
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    let headers = &head.headers;
    if let Some(te) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err("response has both Content-Length and Transfer-Encoding");
        }
        let last = te
            .to_str()
            .unwrap_or("")
            .rsplit(',')
            .next()
            .unwrap_or("")
            .trim();
        return Ok(if last.eq_ignore_ascii_case("chunked") {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    match validate::content_length(headers) {
        Ok(Some(n)) => Ok(Framing::Length(n)),
        Ok(None) => Ok(Framing::UntilClose),
        Err(_) => Err("response has an invalid Content-Length"),
    }
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
