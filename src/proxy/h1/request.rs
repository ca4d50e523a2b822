//! The request direction: the head Fulcrum wrote, then the client's body, re-framed, to the
//! upstream.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, BytesMut};
use http::{Request, StatusCode, header};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::exchange::Context;
use crate::http::validate;
use crate::http1::body::{self, Decoded, Decoder, Framing};
use crate::http1::io::{pass_body, read_body, write_all};

#[derive(Debug)]
pub(super) enum RequestFailure {
    TooLarge(u64),
    BadBody(body::BodyError),
    ClientGone,
    UpstreamWrite(std::io::Error),
}

impl RequestFailure {
    pub(super) fn answer(&self) -> (StatusCode, &'static str) {
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

    pub(super) fn detail(&self) -> String {
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

/// Writes the request head and streams the body, re-framed, from client to upstream.
#[allow(clippy::too_many_arguments)]
pub(super) async fn send_request(
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

/// The request's body framing; the headers were validated, so they agree.
pub(super) fn request_framing(req: &Request<()>) -> Framing {
    if req.headers().contains_key(header::TRANSFER_ENCODING) {
        return Framing::Chunked;
    }
    match validate::content_length(req.headers()) {
        Ok(Some(n)) => Framing::Length(n),
        _ => Framing::Empty,
    }
}
