//! The response direction: the upstream's head read and checked, the client's head written
//! with hop-by-hop headers out and its own framing, then the body relayed.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, BytesMut};
use http::{StatusCode, Version};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::exchange::{Context, Responded, UpstreamFailure};
use super::rewrite::{self, ClientHead, ResponseFacts};
use crate::http1::body::{self, Decoded, Decoder, Framing};
use crate::http1::io::{pass_body, read_body, read_some, write_all};
use crate::proxy::AccessRecord;

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
            biased;
            _ = request_sent.notified() => {}
            _ = upstream.readable() => {}
        }
    }
    let mut received_any = !ubuf.is_empty();
    // Decided while the upstream's head is parsed, so the client's head is written in the
    // same pass.
    let mut plan = None;
    out.clear();
    let facts = loop {
        let parsed = rewrite::relay_response_head(ubuf, cx.is_head, out, |facts| {
            let p = client_plan(facts, cx, request_done.load(Ordering::Relaxed))?;
            let head = p.head(
                cx.client_version,
                cx.set_cookie.as_ref().map(|c| c.as_bytes()),
            );
            plan = Some(p);
            Some(head)
        });
        match parsed {
            // Interim responses (100, 103) are dropped; the final one follows.
            Ok(Some(facts))
                if plan.is_none()
                    && facts.status.is_informational()
                    && facts.status != StatusCode::SWITCHING_PROTOCOLS =>
            {
                ubuf.advance(facts.head_len);
            }
            Ok(Some(facts)) => break facts,
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
    let Some(Plan {
        client_chunked,
        keep_alive,
        switched,
    }) = plan
    else {
        return Err(upstream_failure(
            StatusCode::BAD_GATEWAY,
            "upstream server switched protocols unasked",
            "101 to a request that asked for no upgrade".into(),
            false,
        ));
    };
    ubuf.advance(facts.head_len);
    head_sent.store(true, Ordering::Relaxed);
    let response_time = cx.started.elapsed();
    if let Some(log) = log.as_mut() {
        log.status = facts.status;
        log.upstream_time = Some(response_time);
    }
    let framing = facts.framing;
    if matches!(framing, Framing::Chunked | Framing::UntilClose) || switched {
        // Streamed pieces must not wait for the client's ACK of the previous one.
        let _ = client.set_nodelay(true);
    }
    if switched {
        write_all(client, out, t.client_idle)
            .await
            .map_err(|e| Relay::AfterHead(format!("writing to the client failed: {e}")))?;
        out.clear();
        return Ok(Responded {
            response_time,
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
    let upstream_reusable = facts.keep_alive && !decoder.until_close() && ubuf.is_empty();
    Ok(Responded {
        response_time,
        bytes,
        switched,
        upstream_reusable,
        client_keep_alive: keep_alive,
    })
}

/// What the client's side of a response looks like.
struct Plan {
    client_chunked: bool,
    keep_alive: bool,
    switched: bool,
}

/// The client's framing for a final response: the upstream's length if it gave one, else
/// chunked for an HTTP/1.1 client and the end of the connection for an HTTP/1.0 one.
/// `None` for interim responses, and for a `101` nobody asked for.
fn client_plan(facts: &ResponseFacts, cx: &Context<'_>, request_done: bool) -> Option<Plan> {
    let switched = facts.status == StatusCode::SWITCHING_PROTOCOLS;
    if (facts.status.is_informational() && !switched) || (switched && cx.upgrade.is_none()) {
        return None;
    }
    let unknown_length = matches!(facts.framing, Framing::Chunked | Framing::UntilClose);
    let client_chunked = unknown_length && cx.client_version == Version::HTTP_11;
    // An HTTP/1.0 client learns where a body of unknown length ends only by the close.
    let close_delimited = unknown_length && !client_chunked;
    let keep_alive = !switched && !close_delimited && cx.keep_alive && request_done;
    Some(Plan {
        client_chunked,
        keep_alive,
        switched,
    })
}

impl Plan {
    fn head<'a>(&self, client_version: Version, set_cookie: Option<&'a [u8]>) -> ClientHead<'a> {
        let connection = match (self.switched, self.keep_alive, client_version) {
            (true, _, _) => Some("upgrade"),
            (false, false, _) => Some("close"),
            (false, true, Version::HTTP_10) => Some("keep-alive"),
            _ => None,
        };
        ClientHead {
            chunked: self.client_chunked,
            connection,
            upgrade: self.switched,
            set_cookie,
        }
    }
}
