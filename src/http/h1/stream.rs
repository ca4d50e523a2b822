//! An HTTP/1.1 request's two directions as the phases use them: its body read from the
//! client's connection (de-chunked in place), and its response written there with the
//! client's framing (chunked for a body of unknown length, or the end of the connection
//! for HTTP/1.0).

use std::io;
use std::io::Write as _;
use std::time::Duration;

use crate::transport::Stream;
use bytes::{Buf, BytesMut};
use http::header::HeaderValue;
use http::{StatusCode, Version};

use crate::config::Timeouts;
use crate::http::headers;
use crate::http1::body::{self, Decoded, Decoder, Framing};
use crate::http1::head::write_field;
use crate::http1::io::{pass_body, read_body, write_all};
use crate::proxy::downstream::{
    ClientBodyError, OwnAnswer, Piece, RequestBody, ResponseWriter, UpstreamHead, has_hsts,
};

/// The request body, decoded out of the connection's read buffer.
pub struct H1Body<'a> {
    stream: &'a Stream,
    rbuf: &'a mut BytesMut,
    decoder: Decoder,
    idle: Duration,
}

impl<'a> H1Body<'a> {
    pub fn new(
        stream: &'a Stream,
        rbuf: &'a mut BytesMut,
        decoder: Decoder,
        idle: Duration,
    ) -> Self {
        H1Body {
            stream,
            rbuf,
            decoder,
            idle,
        }
    }

    /// The whole body has been read.
    pub fn is_done(&self) -> bool {
        self.decoder.is_done()
    }
}

impl RequestBody for H1Body<'_> {
    fn next(&mut self) -> Result<Option<Piece<'_>>, ClientBodyError> {
        Ok(match self.decoder.decode(self.rbuf)? {
            Decoded::Data(n) => Some(Piece::Data(&self.rbuf[..n])),
            Decoded::NeedMore => None,
            Decoded::End => Some(Piece::End),
        })
    }

    fn consume(&mut self, n: usize) {
        self.rbuf.advance(n);
    }

    async fn fill(&mut self) -> Result<(), ClientBodyError> {
        match read_body(self.stream, self.rbuf, self.idle).await {
            Ok(n) if n > 0 => Ok(()),
            _ => Err(ClientBodyError::Gone),
        }
    }
}

/// The response, written into `out` and sent in as few writes as the body allows.
pub struct H1Writer<'a> {
    stream: &'a Stream,
    out: &'a mut Vec<u8>,
    version: Version,
    /// The client (and shutdown) allow another request on this connection.
    keep_alive: bool,
    idle: Duration,
    /// The body goes out chunked: the upstream did not say how long it is.
    chunked: bool,
    hsts: Option<&'a HeaderValue>,
    /// The connection's stop (shutdown, or its listener removed by a reload): once given,
    /// the response says `connection: close` even if the request began before it.
    stop: Option<&'a tokio::sync::watch::Receiver<bool>>,
}

impl<'a> H1Writer<'a> {
    /// Closes the connection after this response if `stop` is given by the time it goes.
    pub fn closing_on(mut self, stop: &'a tokio::sync::watch::Receiver<bool>) -> Self {
        self.stop = Some(stop);
        self
    }

    fn keep_alive(&self) -> bool {
        self.keep_alive && !self.stop.is_some_and(|stop| *stop.borrow())
    }

    pub fn new(
        stream: &'a Stream,
        out: &'a mut Vec<u8>,
        version: Version,
        keep_alive: bool,
        timeouts: &Timeouts,
        hsts: Option<&'a HeaderValue>,
    ) -> Self {
        out.clear();
        H1Writer {
            stream,
            out,
            version,
            keep_alive,
            idle: timeouts.client_idle,
            chunked: false,
            hsts,
            stop: None,
        }
    }

    async fn send(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            write_all(self.stream, self.out, self.idle).await?;
            self.out.clear();
        }
        Ok(())
    }
}

impl ResponseWriter for H1Writer<'_> {
    fn head(&mut self, head: &UpstreamHead<'_, '_, '_>) -> bool {
        let switched = head.facts.status == StatusCode::SWITCHING_PROTOCOLS;
        let unknown_length = matches!(head.facts.framing, Framing::Chunked | Framing::UntilClose);
        self.chunked = unknown_length && self.version == Version::HTTP_11;
        // An HTTP/1.0 client learns where a body of unknown length ends only by the close.
        let close_delimited = unknown_length && !self.chunked;
        let keep_alive = !switched && !close_delimited && head.request_done && self.keep_alive();
        if unknown_length || switched {
            // Streamed pieces must not wait for the client's ACK of the previous one.
            let _ = self.stream.set_nodelay(true);
        }
        let connection = match (switched, keep_alive, self.version) {
            (true, _, _) => Some("upgrade"),
            (false, false, _) => Some("close"),
            (false, true, Version::HTTP_10) => Some("keep-alive"),
            _ => None,
        };
        let hsts = self.hsts.filter(|_| !has_hsts(head));
        write_head(self.out, head, self.chunked, connection, switched, hsts);
        keep_alive
    }

    async fn data(&mut self, buf: &mut BytesMut, n: usize) -> io::Result<()> {
        pass_body(self.stream, self.out, &buf[..n], self.chunked, self.idle).await?;
        buf.advance(n);
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.send().await
    }

    async fn end(&mut self) -> io::Result<()> {
        if self.chunked {
            self.out.extend_from_slice(body::LAST_CHUNK);
        }
        self.send().await
    }

    async fn answer(&mut self, answer: &OwnAnswer<'_>) -> bool {
        let keep_alive = !answer.unread && self.keep_alive();
        self.out.clear();
        let _ = write!(
            self.out,
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\ndate: {}\r\n{}{}",
            answer.status.as_str(),
            answer.status.canonical_reason().unwrap_or(""),
            answer.body.len(),
            httpdate::fmt_http_date(std::time::SystemTime::now()),
            if answer.retry_after {
                "retry-after: 1\r\n"
            } else {
                ""
            },
            if keep_alive {
                ""
            } else {
                "connection: close\r\n"
            },
        );
        if let Some(location) = answer.location {
            write_field(self.out, b"location", location.as_bytes());
        }
        if let Some(hsts) = self.hsts {
            write_field(self.out, b"strict-transport-security", hsts.as_bytes());
        }
        self.out.extend_from_slice(b"\r\n");
        // A response to HEAD has no body, whatever its headers say: one written anyway
        // would be read as the start of the next response.
        if !answer.head_request {
            self.out.extend_from_slice(answer.body.as_bytes());
        }
        self.send().await.is_ok() && keep_alive
    }

    async fn send_continue(&mut self) -> io::Result<()> {
        write_all(self.stream, b"HTTP/1.1 100 Continue\r\n\r\n", self.idle).await
    }

    async fn abandoned(&mut self) {
        // A client that closes is noticed when its connection is next read or written.
        std::future::pending().await
    }
}

/// Writes the client's response head from the upstream's, ending with the empty line.
fn write_head(
    out: &mut Vec<u8>,
    head: &UpstreamHead<'_, '_, '_>,
    chunked: bool,
    connection: Option<&str>,
    switched: bool,
    hsts: Option<&HeaderValue>,
) {
    let resp = head.parsed;
    let status = head.facts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    // The upstream's own reason phrase, if it gave one.
    let reason = resp
        .reason
        .filter(|r| !r.is_empty())
        .or(status.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in headers::forwarded_fields(resp) {
        write_field(out, h.name.as_bytes(), h.value);
    }
    if switched {
        for h in resp
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("upgrade"))
        {
            write_field(out, b"upgrade", h.value);
        }
    }
    out.extend_from_slice(b"via: ");
    headers::write_via(out, resp);
    out.extend_from_slice(b"\r\n");
    if chunked {
        write_field(out, b"transfer-encoding", b"chunked");
    }
    if let Some(connection) = connection {
        write_field(out, b"connection", connection.as_bytes());
    }
    if let Some(cookie) = head.set_cookie {
        write_field(out, b"set-cookie", cookie.as_bytes());
    }
    if let Some(hsts) = hsts {
        write_field(out, b"strict-transport-security", hsts.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}
