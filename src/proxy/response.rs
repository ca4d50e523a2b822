//! The response direction: the upstream's head read within one deadline and checked, the
//! client's head prepared by the client's protocol, then the body relayed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::transport::Stream;
use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::sync::Notify;

use super::downstream::{ResponseWriter, UpstreamHead};
use super::exchange::{Context, Responded};
use super::{AccessRecord, Failure, rewrite};
use crate::http1::body::{Decoded, Decoder};
use crate::http1::io::{WaitTimer, read_body, read_some_until};

/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

pub(super) enum Relay {
    /// Nothing reached the client yet: Fulcrum can still answer.
    BeforeHead(Failure),
    /// The upstream failed after the response head went out.
    AfterHead(String),
    /// The client went away after the response head went out.
    ClientGone(String),
}

/// Reads the upstream's response head, has the client's written, and streams the body down.
#[allow(clippy::too_many_arguments)]
pub(super) async fn relay_response<W: ResponseWriter>(
    writer: &mut W,
    upstream: &Stream,
    ubuf: &mut BytesMut,
    timer: &mut WaitTimer,
    cx: &Context<'_>,
    request_done: &AtomicBool,
    request_sent: &Notify,
    head_sent: &AtomicBool,
    log: &mut Option<AccessRecord<'_>>,
) -> Result<Responded, Relay> {
    let wait = cx.response_header;
    // The response header timeout runs from when the whole request is sent; an upstream
    // that answers earlier is read at once.
    if !request_done.load(Ordering::Relaxed) {
        tokio::select! {
            biased;
            _ = request_sent.notified() => {}
            _ = upstream.readable() => {}
            _ = writer.abandoned() => return Err(Relay::BeforeHead(Failure::abandoned())),
        }
    }
    // One deadline for the whole head: a server trickling it a byte at a time gets no more.
    let deadline = Instant::now() + wait;
    let mut received_any = !ubuf.is_empty();
    let mut client_keep_alive = None;
    let facts = loop {
        // Nothing to parse yet (the usual case right after sending): read first.
        let parsed = if ubuf.is_empty() {
            Ok(None)
        } else {
            rewrite::parse_response_head(ubuf, cx.is_head, |parsed, facts| {
                let interim = facts.status.is_informational()
                    && facts.status != StatusCode::SWITCHING_PROTOCOLS;
                let unasked_switch = facts.status == StatusCode::SWITCHING_PROTOCOLS && !cx.upgrade;
                if !interim && !unasked_switch {
                    client_keep_alive = Some(writer.head(&UpstreamHead {
                        parsed,
                        facts,
                        set_cookie: cx.set_cookie,
                        request_done: request_done.load(Ordering::Relaxed),
                    }));
                }
            })
        };
        match parsed {
            // Interim responses (100, 103) are dropped; the final one follows.
            Ok(Some(facts))
                if facts.status.is_informational()
                    && facts.status != StatusCode::SWITCHING_PROTOCOLS =>
            {
                ubuf.advance(facts.head_len);
            }
            Ok(Some(facts)) => break facts,
            Ok(None) if ubuf.len() > MAX_RESPONSE_HEAD => {
                return Err(Relay::BeforeHead(Failure::upstream_invalid(
                    "response head too large",
                )));
            }
            Ok(None) => {
                let read = tokio::select! {
                    biased;
                    read = read_some_until(upstream, ubuf, deadline, timer) => read,
                    _ = writer.abandoned() => return Err(Relay::BeforeHead(Failure::abandoned())),
                };
                match read {
                    Ok(0) => {
                        return Err(Relay::BeforeHead(Failure::upstream_closed(
                            "upstream closed before a complete response head".into(),
                            !received_any,
                        )));
                    }
                    Ok(_) => received_any = true,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        return Err(Relay::BeforeHead(Failure::upstream_timeout(format!(
                            "no complete response header within {wait:?}"
                        ))));
                    }
                    Err(e) => {
                        return Err(Relay::BeforeHead(Failure::upstream_closed(
                            format!("reading the response failed: {e}"),
                            !received_any,
                        )));
                    }
                }
            }
            Err(e) => {
                return Err(Relay::BeforeHead(Failure::upstream_invalid(format!(
                    "invalid response head: {}",
                    e.reason()
                ))));
            }
        }
    };
    let Some(client_keep_alive) = client_keep_alive else {
        return Err(Relay::BeforeHead(Failure::upstream_invalid(
            "101 to a request that asked for no upgrade",
        )));
    };
    ubuf.advance(facts.head_len);
    head_sent.store(true, Ordering::Relaxed);
    let head_arrived = Instant::now();
    let response_time = head_arrived - cx.try_started;
    if let Some(log) = log.as_mut() {
        log.status = facts.status;
        log.upstream_time = Some(head_arrived - cx.started);
    }
    let client_gone =
        |e: std::io::Error| Relay::ClientGone(format!("writing to the client failed: {e}"));
    let switched = facts.status == StatusCode::SWITCHING_PROTOCOLS;
    if switched {
        writer.flush().await.map_err(client_gone)?;
        return Ok(Responded {
            status: facts.status,
            response_time,
            bytes: 0,
            switched,
            upstream_reusable: false,
            client_keep_alive: false,
        });
    }

    let idle = cx.timeouts.upstream_idle;
    let mut decoder = Decoder::new(facts.framing);
    let mut bytes = 0u64;
    loop {
        match decoder.decode(ubuf) {
            Ok(Decoded::Data(n)) => {
                bytes += n as u64;
                writer.data(ubuf, n).await.map_err(client_gone)?;
            }
            Ok(Decoded::NeedMore) => {
                writer.flush().await.map_err(client_gone)?;
                match read_body(upstream, ubuf, idle).await {
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
    writer.end().await.map_err(client_gone)?;
    let upstream_reusable = facts.keep_alive && !decoder.until_close() && ubuf.is_empty();
    Ok(Responded {
        status: facts.status,
        response_time,
        bytes,
        switched,
        upstream_reusable,
        client_keep_alive,
    })
}
