//! The response direction: the upstream's head read and checked, the client's head written
//! with hop-by-hop headers out and its own framing, then the body relayed.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderValue};
use http::{StatusCode, Version};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::exchange::{Context, Responded, UpstreamFailure};
use crate::http::headers::has_token;
use crate::http::validate;
use crate::http1::body::{self, Decoded, Decoder, Framing};
use crate::http1::head;
use crate::http1::io::{pass_body, read_body, read_some, write_all};
use crate::proxy::{AccessRecord, client_response_headers};

/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

pub(super) enum Relay {
    BeforeHead(UpstreamFailure),
    AfterHead(String),
}

pub(super) fn upstream_failure(
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
pub(super) async fn relay_response(
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

/// How an upstream's response body is delimited (RFC 9112 §6.3).
pub(super) fn response_framing(
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
