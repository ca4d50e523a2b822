//! One HTTP/2 stream's two directions as the phases use them: the request body read from
//! its DATA frames, returning flow-control credit only as the bytes are passed upstream, and
//! the response sent as HEADERS and DATA within the client's window.

use std::future::poll_fn;
use std::io;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::http::{headers, validate};
use crate::http1::body::Framing;
use crate::proxy::downstream::{
    ClientBodyError, OwnAnswer, Piece, RequestBody, ResponseWriter, UpstreamHead, has_hsts,
};
use crate::proxy::{self, ClientConn, Finished, Incoming};
use crate::runtime::Runtime;

/// Room for the request head Fulcrum writes upstream.
const UPSTREAM_OUT: usize = 4 * 1024;

/// Runs one stream's request through the phases.
pub async fn serve(
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    client: &ClientConn,
    rt: &Runtime,
) {
    let (parts, recv) = req.into_parts();
    let head = Request::from_parts(parts, ());
    // An HTTP/1.1 upstream needs a length or chunks: a body without a declared length is
    // sent chunked.
    let framing = if recv.is_end_stream() {
        // An empty POST, PUT or PATCH still says so over HTTP/1.1: servers may answer a
        // body-carrying method without a length with 411.
        match *head.method() {
            Method::POST | Method::PUT | Method::PATCH => Framing::Length(0),
            _ => Framing::Empty,
        }
    } else {
        match validate::content_length(head.headers()) {
            Ok(Some(n)) => Framing::Length(n),
            _ => Framing::Chunked,
        }
    };
    let idle = rt.config.timeouts.client_idle;
    let mut body = H2Body {
        recv,
        piece: Bytes::new(),
        ended: false,
        idle,
    };
    let mut writer = H2Writer {
        respond,
        send: None,
        ended: false,
        idle,
        hsts: rt
            .listener_config(client.listener)
            .and_then(|l| l.hsts.clone()),
    };
    let mut upstream_out = Vec::with_capacity(UPSTREAM_OUT);
    let incoming = Incoming { head, framing };
    let finished = proxy::serve_request(
        client,
        rt,
        incoming,
        &mut body,
        &mut writer,
        &mut upstream_out,
    )
    .await;
    if !writer.ended {
        // The response broke off after its head: a reset, so the client cannot take the
        // part it got for the whole.
        writer.reset(Reason::INTERNAL_ERROR);
    } else if !body.ended && !body.recv.is_end_stream() {
        // Answered before the whole body came: the client may stop sending (RFC 9113 §8.1).
        writer.reset(Reason::NO_ERROR);
    }
    debug_assert!(
        !matches!(finished, Finished::Tunnel(_)),
        "HTTP/2 requests never upgrade"
    );
}

/// The request body, one DATA frame at a time.
struct H2Body {
    recv: RecvStream,
    /// What is left of the last frame received.
    piece: Bytes,
    ended: bool,
    idle: Duration,
}

impl RequestBody for H2Body {
    fn next(&mut self) -> Result<Option<Piece<'_>>, ClientBodyError> {
        if !self.piece.is_empty() {
            return Ok(Some(Piece::Data(&self.piece)));
        }
        if self.ended || self.recv.is_end_stream() {
            self.ended = true;
            return Ok(Some(Piece::End));
        }
        Ok(None)
    }

    fn consume(&mut self, n: usize) {
        self.piece.advance(n);
        // Credit goes back only for bytes passed on, so a slow server slows the client.
        let _ = self.recv.flow_control().release_capacity(n);
    }

    async fn fill(&mut self) -> Result<(), ClientBodyError> {
        match tokio::time::timeout(self.idle, self.recv.data()).await {
            Ok(Some(Ok(data))) => {
                self.piece = data;
                Ok(())
            }
            Ok(None) => {
                self.ended = true;
                Ok(())
            }
            Ok(Some(Err(e))) if e.is_reset() || e.is_io() || e.is_go_away() => {
                Err(ClientBodyError::Gone)
            }
            Ok(Some(Err(e))) => Err(ClientBodyError::Malformed(e.to_string().into())),
            Err(_) => Err(ClientBodyError::Gone),
        }
    }
}

/// The response: HEADERS once the upstream's head is in, then DATA.
struct H2Writer {
    respond: SendResponse<Bytes>,
    /// The body's stream, once the head is sent with a body to follow.
    send: Option<SendStream<Bytes>>,
    /// The stream is complete on our side.
    ended: bool,
    idle: Duration,
    /// The listener's `Strict-Transport-Security`, for every response.
    hsts: Option<HeaderValue>,
}

impl H2Writer {
    fn send_head(&mut self, response: Response<()>, end: bool) -> io::Result<()> {
        let send = self
            .respond
            .send_response(response, end)
            .map_err(h2_error)?;
        if end {
            self.ended = true;
        } else {
            self.send = Some(send);
        }
        Ok(())
    }

    fn reset(&mut self, reason: Reason) {
        match self.send.as_mut() {
            Some(send) => send.send_reset(reason),
            None => self.respond.send_reset(reason),
        }
    }
}

impl ResponseWriter for H2Writer {
    fn head(&mut self, head: &UpstreamHead<'_, '_, '_>) -> bool {
        let mut response = Response::new(());
        *response.status_mut() = head.facts.status;
        let fields = response.headers_mut();
        for h in headers::forwarded_fields(head.parsed) {
            // A field HTTP/2 cannot carry (a name with upper case is lowered by
            // `from_bytes`; one with invalid bytes) is left out rather than failing the
            // response.
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(h.name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            ) {
                fields.append(name, value);
            }
        }
        let mut via = Vec::with_capacity(32);
        headers::write_via(&mut via, head.parsed);
        if let Ok(via) = HeaderValue::from_bytes(&via) {
            fields.insert(header::VIA, via);
        }
        if let Some(cookie) = head.set_cookie {
            fields.append(header::SET_COOKIE, cookie.clone());
        }
        if let Some(hsts) = self.hsts.as_ref().filter(|_| !has_hsts(head)) {
            fields.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        // A failure shows on the first body write, or as the reset at the end.
        let _ = self.send_head(response, head.facts.framing == Framing::Empty);
        true
    }

    async fn data(&mut self, buf: &mut BytesMut, n: usize) -> io::Result<()> {
        // Copied out so the upstream connection keeps one reusable read buffer.
        let data = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        let send = self.send.as_mut().ok_or_else(stream_closed)?;
        send_all(send, data, self.idle).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        // The connection's task writes frames as soon as they are queued.
        Ok(())
    }

    async fn end(&mut self) -> io::Result<()> {
        if let Some(send) = self.send.as_mut() {
            send.send_data(Bytes::new(), true).map_err(h2_error)?;
        }
        self.ended = true;
        Ok(())
    }

    async fn answer(&mut self, answer: &OwnAnswer<'_>) -> bool {
        let mut response = Response::new(());
        *response.status_mut() = answer.status;
        let fields = response.headers_mut();
        fields.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        fields.insert(header::CONTENT_LENGTH, HeaderValue::from(answer.body.len()));
        if let Ok(date) =
            HeaderValue::from_str(&httpdate::fmt_http_date(std::time::SystemTime::now()))
        {
            fields.insert(header::DATE, date);
        }
        if answer.retry_after {
            fields.insert(header::RETRY_AFTER, HeaderValue::from(1));
        }
        if let Some(location) = answer.location.and_then(|l| HeaderValue::from_str(l).ok()) {
            fields.insert(header::LOCATION, location);
        }
        if let Some(hsts) = &self.hsts {
            fields.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        // No body after HEAD: the stream ends with the headers.
        if self.send_head(response, answer.head_request).is_err() {
            return true;
        }
        if let Some(send) = self.send.as_mut() {
            let body = Bytes::copy_from_slice(answer.body.as_bytes());
            if send_all(send, body, self.idle).await.is_ok() {
                let _ = send.send_data(Bytes::new(), true);
                self.ended = true;
            }
        }
        true
    }

    async fn send_continue(&mut self) -> io::Result<()> {
        let mut interim = Response::new(());
        *interim.status_mut() = StatusCode::CONTINUE;
        self.respond.send_informational(interim).map_err(h2_error)
    }

    async fn abandoned(&mut self) {
        let _ = poll_fn(|cx| self.respond.poll_reset(cx)).await;
    }
}

/// Sends `data` as the client's window allows, waiting up to `idle` each time it is full.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes, idle: Duration) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let capacity = tokio::time::timeout(idle, poll_fn(|cx| send.poll_capacity(cx)))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "client's window stayed closed")
            })?;
        match capacity {
            Some(Ok(0)) => continue,
            Some(Ok(n)) => {
                let piece = data.split_to(n.min(data.len()));
                send.send_data(piece, false).map_err(h2_error)?;
            }
            Some(Err(e)) => return Err(h2_error(e)),
            None => return Err(stream_closed()),
        }
    }
    Ok(())
}

fn h2_error(e: h2::Error) -> io::Error {
    io::Error::other(e)
}

fn stream_closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the client closed the stream")
}
