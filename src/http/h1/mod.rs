//! HTTP/1.1 clients, on the hand-written codec: one task per connection reads each request
//! head within its deadline and hands the request to the phases (`proxy::serve_request`),
//! with `stream`'s body reader and response writer; it keeps the connection alive between
//! requests, tunnels after a `101`, and closes lingeringly when request bytes may be left.

mod stream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::Request;
use tokio::sync::watch;

use crate::config::Timeouts;
use crate::http1::body::Decoder;
use crate::http1::head::{self, HeadError};
use crate::http1::io::{
    WaitTimer, read_some, read_some_for, read_some_until, wait_readable, write_all,
};
use crate::idle_timeout::IdleTimeout;
use crate::proxy::{self, ClientConn, Finished, Incoming};
use crate::runtime::{Runtime, Shared};
use crate::server::stopping;
use crate::transport::Stream;
use crate::upstream::RawConn;
use stream::{H1Body, H1Writer};

/// How long a kept-alive connection holds its buffers while waiting for its next request.
const BUFFER_LINGER: Duration = Duration::from_secs(1);
/// Room for the heads and small bodies written to each side.
const CLIENT_OUT: usize = 16 * 1024;
const UPSTREAM_OUT: usize = 4 * 1024;
/// Closing with request bytes unread would make the kernel answer them with a reset,
/// which can destroy the response before the client reads it: after the response, what
/// the client still sends is read and dropped for at most this long (nginx's
/// `lingering_close`, bounded by time alone: a byte cap would end the wait early exactly
/// for a client still uploading, which is the one a reset hurts).
const LINGER_TIME: Duration = Duration::from_secs(5);

/// One HTTP/1.1 client connection and the buffers it reuses for every request.
struct Client {
    stream: Stream,
    conn: ClientConn,
    /// Bytes read from the client and not yet used: the rest of a head, body, or pipelined
    /// requests.
    rbuf: BytesMut,
    /// What goes to the client next.
    wbuf: Vec<u8>,
    /// What goes to the upstream next: a request head, then body.
    ubuf: Vec<u8>,
    /// For the waits for request bytes.
    timer: WaitTimer,
}

/// Serves HTTP/1.1 requests on `stream` (whose first bytes are already in `rbuf`) until the
/// client leaves, a timeout or error ends the connection, or shutdown is signalled.
pub async fn serve(
    stream: Stream,
    rbuf: BytesMut,
    conn: ClientConn,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut client = Client {
        stream,
        conn,
        rbuf,
        // Made when the first request arrives: a connection that never completes its head
        // costs no more than its read buffer.
        wbuf: Vec::new(),
        ubuf: Vec::new(),
        timer: WaitTimer::default(),
    };
    let mut runtime = shared.cache();
    drop(shared);
    let mut first = true;
    loop {
        if client.rbuf.is_empty() {
            // A new connection has `client_header` to start its request; a kept-alive one
            // may idle for `client_idle`.
            let timeouts = &arc_swap::cache::Access::load(&mut runtime).config.timeouts;
            let finishing = *shutdown.borrow();
            let wait = if finishing {
                // Asked to finish while idle: a request already on its way (its client
                // cannot know yet) is still read and answered, with `Connection: close`.
                // Closing at once would fail it, and a client may not send it twice.
                super::FIRST_REQUEST_GRACE
            } else if first {
                timeouts.client_header
            } else {
                timeouts.client_idle
            };
            // The buffers are kept for a moment, as a next request usually follows soon; a
            // connection idle for longer gives them back, so idle connections cost little.
            let linger = wait.min(BUFFER_LINGER);
            let Client {
                stream,
                rbuf,
                timer,
                ..
            } = &mut client;
            let read = tokio::select! {
                biased;
                read = read_some_for(stream, rbuf, linger, timer) => Some(read),
                _ = stopping(&mut shutdown), if !finishing => None,
            };
            match read {
                Some(Ok(n)) if n > 0 => {}
                // Asked to finish: wait again, for the next request's last moment.
                None => continue,
                // Nothing yet, and the read found the socket empty: wait on, bufferless.
                Some(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut && wait > linger => {
                    client.release_buffers();
                    let ready = tokio::select! {
                        biased;
                        ready = wait_readable(&client.stream, wait - linger) => Some(ready),
                        _ = stopping(&mut shutdown), if !finishing => None,
                    };
                    match ready {
                        Some(Ok(())) => {}
                        Some(Err(_)) => return,
                        None => continue,
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
                let mut writer = H1Writer::new(
                    &client.stream,
                    &mut client.wbuf,
                    http::Version::HTTP_11,
                    false,
                    timeouts,
                    rt.listener_config(client.conn.listener)
                        .and_then(|l| l.hsts.as_ref()),
                );
                Box::pin(proxy::refuse(&mut writer, e.status(), e.reason())).await;
                Box::pin(client.close_lingering()).await;
                return;
            }
        };
        let keep_alive = head::keep_alive(&req) && !*shutdown.borrow();
        let framing = head::request_framing(&req);
        let version = req.version();
        client.wbuf.reserve(CLIENT_OUT);
        client.ubuf.reserve(UPSTREAM_OUT);
        let mut body = H1Body::new(
            &client.stream,
            &mut client.rbuf,
            Decoder::new(framing),
            timeouts.client_idle,
        );
        let mut writer = H1Writer::new(
            &client.stream,
            &mut client.wbuf,
            version,
            keep_alive,
            timeouts,
            rt.listener_config(client.conn.listener)
                .and_then(|l| l.hsts.as_ref()),
        )
        .closing_on(&shutdown);
        let incoming = Incoming { head: req, framing };
        // Boxed: a request's phases hold several KiB of state while they run, which a
        // connection waiting for its next request should not carry.
        let finished = Box::pin(proxy::serve_request(
            &client.conn,
            rt,
            incoming,
            &mut body,
            &mut writer,
            &mut client.ubuf,
        ))
        .await;
        let body_unread = framing.has_body() && !body.is_done();
        match finished {
            // Asked to finish after the response said the connection stays open: the client
            // may send its next request at once, which the wait above still takes.
            Finished::KeepAlive => {}
            // Rare paths, boxed for the same reason as the phases.
            Finished::Tunnel(conn) => {
                // No request to finish is left: a drain stops counting it (its receivers
                // are the listener's count of connections to wait for).
                drop(shutdown);
                return Box::pin(client.tunnel(conn, timeouts)).await;
            }
            _ => {
                if body_unread || !client.rbuf.is_empty() {
                    Box::pin(client.close_lingering()).await;
                }
                return;
            }
        }
        if first {
            // Set only once a connection is kept alive (or streams, see the writer): a
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
    // Read off the clock only if the head is not all in yet (it usually is).
    let mut deadline = None;
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
        let deadline =
            *deadline.get_or_insert_with(|| Instant::now() + rt.config.timeouts.client_header);
        match read_some_until(
            &client.stream,
            &mut client.rbuf,
            deadline,
            &mut client.timer,
        )
        .await
        {
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

impl Client {
    /// Gives the buffers back while the connection idles; they are made again when the next
    /// request arrives.
    fn release_buffers(&mut self) {
        self.rbuf = BytesMut::new();
        self.wbuf = Vec::new();
        self.ubuf = Vec::new();
        self.timer = WaitTimer::default();
    }

    /// After `101 Switching Protocols`: bytes already read on either side go across first,
    /// then both connections are copied through until one closes or both idle too long.
    async fn tunnel(mut self, mut conn: RawConn, timeouts: &Timeouts) {
        let idle = timeouts.client_idle;
        if write_all(&conn.stream, &self.rbuf, idle).await.is_err()
            || write_all(&self.stream, &conn.buf, idle).await.is_err()
        {
            return;
        }
        self.rbuf.clear();
        let mut down = IdleTimeout::new(&mut self.stream, idle);
        let mut up = IdleTimeout::new(&mut conn.stream, timeouts.upstream_idle);
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            tracing::debug!(error = %e, "tunnel ended with an error");
        }
    }

    /// Closes a connection whose client may still be sending: stop writing (the response
    /// is out), then read and drop what arrives until the client closes too, for at most
    /// `LINGER_TIME`.
    async fn close_lingering(mut self) {
        if self.stream.shutdown_write().is_err() {
            return;
        }
        let deadline = Instant::now() + LINGER_TIME;
        let mut scratch = std::mem::take(&mut self.rbuf);
        loop {
            scratch.clear();
            let left = deadline.saturating_duration_since(Instant::now());
            match read_some(&self.stream, &mut scratch, left).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    }
}
